//! Nodes as their agents make them known: joining (a join token exchanged for the node's credential),
//! authenticating a credential, heartbeats and what they report, liveness, revoking a credential, and
//! the node list the admin API and `cairn status` show.
//!
//! Tokens and credentials arrive here already hashed (`sha256:<hex>`, [`crate::api::auth`]); this module
//! never sees one in the clear. A join consumes its token in the same transaction that stores the node's
//! credential, so a token joins exactly once. Join and admin tokens as such are [`super::tokens`]'.
//!
//! What it must not do: decide anything (which node is offline after how long, who may call what: the
//! callers decide, this module runs the statements), or hold a transaction across a call.

use std::time::Duration;

use cairn_proto::{ActualReplica, Resources};
use cairn_schema::{Driver, Name, Recipient};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::decode::{corrupt, driver_names, drivers, json, millis, name, node_state, recipient};
use super::{Op as _, StoreError};
use cairn_plan::observed::NodeState;

/// A node an agent credential belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthNode {
    pub node: Name,
    /// The recipient it joined with.
    pub recipient: Option<Recipient>,
    pub state: NodeState,
}

/// What a join attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinOutcome {
    /// The node holds the new credential; `previous` is its state before (`None`: it never joined).
    Joined {
        node: Name,
        previous: Option<NodeState>,
    },
    /// No such token, or it was used or expired. Nothing changed.
    InvalidToken,
    /// The node's manifest pins another recipient. Nothing changed; the token can still be used.
    RecipientMismatch { node: Name, pinned: Recipient },
    /// The node holds a live credential and the token was not made to replace it. Nothing changed; the
    /// token can still be used once the operator revoked the credential.
    LiveCredential { node: Name },
}

/// A join to record.
#[derive(Debug, Clone)]
pub struct JoinRecord<'a> {
    pub token_hash: &'a str,
    pub credential_hash: &'a str,
    pub recipient: &'a Recipient,
    pub drivers: &'a [Driver],
    pub agent_version: &'a str,
}

/// Consumes a join token and gives its node a new credential, in one transaction. A node that holds a
/// live credential joins again only with a token made to replace it (`replace_credential`), and the
/// old credential is revoked by the same statement that stores the new one.
pub async fn join(pool: &PgPool, j: &JoinRecord<'_>) -> Result<JoinOutcome, StoreError> {
    let mut tx = pool.begin().await.op("begin a join")?;
    let Some(row) = sqlx::query!(
        r#"SELECT t.id, t.node, t.replace_credential, n.recipient AS pinned
           FROM node_join_tokens t JOIN nodes n ON n.name = t.node
           WHERE t.token_hash = $1 AND t.used_at IS NULL AND t.expires_at > now()
           FOR UPDATE OF t"#,
        j.token_hash,
    )
    .fetch_optional(&mut *tx)
    .await
    .op("find a join token")?
    else {
        return rejoin(&mut tx, j).await;
    };
    let node = name("node_join_tokens", &row.node)?;
    if let Some(pinned) = row.pinned
        && pinned != j.recipient.as_str()
    {
        let pinned = Recipient::new(&pinned).map_err(|e| corrupt("nodes", "recipient", e))?;
        return Ok(JoinOutcome::RecipientMismatch { node, pinned });
    }
    let status = sqlx::query!(
        r#"SELECT state, credential_hash IS NOT NULL AS "live!" FROM node_status
           WHERE node = $1 FOR UPDATE"#,
        node.as_str()
    )
    .fetch_optional(&mut *tx)
    .await
    .op("read a node's status")?;
    if status.as_ref().is_some_and(|s| s.live) && !row.replace_credential {
        return Ok(JoinOutcome::LiveCredential { node });
    }
    let previous = status.map(|s| node_state(&s.state)).transpose()?;
    sqlx::query!(
        "UPDATE node_join_tokens SET used_at = now() WHERE id = $1",
        row.id
    )
    .execute(&mut *tx)
    .await
    .op("use a join token")?;
    sqlx::query!(
        r#"INSERT INTO node_status
               (node, state, last_heartbeat, drivers, recipient, credential_hash, joined_at,
                agent_version, updated_at)
           VALUES ($1, 'online', now(), $2, $3, $4, now(), $5, now())
           ON CONFLICT (node) DO UPDATE SET
               state = 'online', last_heartbeat = now(), drivers = EXCLUDED.drivers,
               recipient = EXCLUDED.recipient, credential_hash = EXCLUDED.credential_hash,
               joined_at = now(), agent_version = EXCLUDED.agent_version, updated_at = now()"#,
        node.as_str(),
        &driver_names(j.drivers),
        j.recipient.as_str(),
        j.credential_hash,
        j.agent_version,
    )
    .execute(&mut *tx)
    .await
    .op("record a join")?;
    tx.commit().await.op("commit a join")?;
    Ok(JoinOutcome::Joined { node, previous })
}

/// A join asked again after its answer was lost: its token already used (and not expired) by a join
/// that recorded this very credential and recipient, which the node still holds. Answered the same,
/// changing nothing; anything else is an invalid token.
async fn rejoin(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    j: &JoinRecord<'_>,
) -> Result<JoinOutcome, StoreError> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT s.node, s.state FROM node_join_tokens t JOIN node_status s ON s.node = t.node
          WHERE t.token_hash = $1 AND t.used_at IS NOT NULL AND t.expires_at > now()
            AND s.credential_hash = $2 AND s.recipient = $3",
    )
    .bind(j.token_hash)
    .bind(j.credential_hash)
    .bind(j.recipient.as_str())
    .fetch_optional(&mut **tx)
    .await
    .op("find a join asked again")?;
    match row {
        None => Ok(JoinOutcome::InvalidToken),
        Some((node, state)) => Ok(JoinOutcome::Joined {
            node: name("node_status", &node)?,
            previous: Some(node_state(&state)?),
        }),
    }
}

/// Whether `node` is in the applied state.
pub async fn node_declared(pool: &PgPool, node: &Name) -> Result<bool, StoreError> {
    let found = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM nodes WHERE name = $1) AS "found!""#,
        node.as_str()
    )
    .fetch_one(pool)
    .await
    .op("look a node up")?;
    Ok(found)
}

/// The node holding a credential, if any (a revoked credential, or one of a removed node, holds none).
pub async fn node_by_credential(
    pool: &PgPool,
    credential_hash: &str,
) -> Result<Option<AuthNode>, StoreError> {
    let row = sqlx::query!(
        "SELECT node, recipient, state FROM node_status WHERE credential_hash = $1",
        credential_hash,
    )
    .fetch_optional(pool)
    .await
    .op("authenticate an agent")?;
    row.map(|r| {
        Ok(AuthNode {
            node: name("node_status", &r.node)?,
            recipient: recipient("node_status", r.recipient)?,
            state: node_state(&r.state)?,
        })
    })
    .transpose()
}

/// Takes a node's credential away. Returns whether it had one.
pub async fn revoke_credential(pool: &PgPool, node: &Name) -> Result<bool, StoreError> {
    let done = sqlx::query!(
        r#"UPDATE node_status SET credential_hash = NULL, updated_at = now()
           WHERE node = $1 AND credential_hash IS NOT NULL"#,
        node.as_str(),
    )
    .execute(pool)
    .await
    .op("revoke a node credential")?;
    Ok(done.rows_affected() == 1)
}

/// What a heartbeat reports.
#[derive(Debug, Clone)]
pub struct HeartbeatRecord<'a> {
    pub drivers: &'a [Driver],
    pub agent_version: &'a str,
    pub resources: &'a Resources,
    pub replicas: &'a [ActualReplica],
}

/// Records a heartbeat of the node holding `credential_hash`: it is online as of now. Returns the state
/// it was in before, or `None` when the credential no longer belongs to the node (revoked or replaced
/// since the caller authenticated it).
pub async fn record_heartbeat(
    conn: &mut PgConnection,
    node: &Name,
    credential_hash: &str,
    hb: &HeartbeatRecord<'_>,
) -> Result<Option<NodeState>, StoreError> {
    let resources = serde_json::to_value(hb.resources).expect("resources serialize");
    let replicas = serde_json::to_value(hb.replicas).expect("replicas serialize");
    let previous = sqlx::query_scalar!(
        r#"WITH before AS (
               SELECT node, state FROM node_status
               WHERE node = $1 AND credential_hash = $2
               FOR UPDATE
           )
           UPDATE node_status s
           SET state = 'online', last_heartbeat = now(), drivers = $3, agent_version = $4,
               resources = $5, replicas = $6, reported_at = now(), updated_at = now()
           FROM before
           WHERE s.node = before.node
           RETURNING before.state"#,
        node.as_str(),
        credential_hash,
        &driver_names(hb.drivers),
        hb.agent_version,
        resources,
        replicas,
    )
    .fetch_optional(conn)
    .await
    .op("record a heartbeat")?;
    previous.map(|s| node_state(&s)).transpose()
}

/// Marks online nodes whose last heartbeat is older than `offline_after` offline; returns them.
pub async fn mark_offline(
    conn: &mut PgConnection,
    offline_after: Duration,
) -> Result<Vec<Name>, StoreError> {
    let nodes = sqlx::query_scalar!(
        r#"UPDATE node_status SET state = 'offline', updated_at = now()
           WHERE state = 'online'
             AND last_heartbeat < now() - $1::float8 * interval '1 millisecond'
           RETURNING node"#,
        millis(offline_after),
    )
    .fetch_all(conn)
    .await
    .op("mark silent nodes offline")?;
    nodes.iter().map(|n| name("node_status", n)).collect()
}

/// A node as the agent side knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub name: Name,
    pub state: NodeState,
    pub joined_at: Option<DateTime<Utc>>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub has_credential: bool,
    pub recipient: Option<Recipient>,
    pub drivers: Vec<Driver>,
    pub agent_version: Option<String>,
    pub resources: Option<Resources>,
    pub replicas: Vec<ActualReplica>,
    pub reported_at: Option<DateTime<Utc>>,
}

/// Every declared node with what its agent reported, by name.
pub async fn nodes(pool: &PgPool) -> Result<Vec<NodeRow>, StoreError> {
    let rows = sqlx::query!(
        r#"SELECT n.name, s.state AS "state?", s.joined_at, s.last_heartbeat,
                  (s.credential_hash IS NOT NULL) AS "has_credential!", s.recipient AS "recipient?",
                  s.drivers AS "drivers?", s.agent_version, s.resources,
                  s.replicas AS "replicas?", s.reported_at
           FROM nodes n LEFT JOIN node_status s ON s.node = n.name
           ORDER BY n.name"#
    )
    .fetch_all(pool)
    .await
    .op("read nodes")?;
    rows.into_iter()
        .map(|r| {
            Ok(NodeRow {
                name: name("nodes", &r.name)?,
                state: r
                    .state
                    .as_deref()
                    .map_or(Ok(NodeState::Pending), node_state)?,
                joined_at: r.joined_at,
                last_heartbeat: r.last_heartbeat,
                has_credential: r.has_credential,
                recipient: recipient("node_status", r.recipient)?,
                drivers: drivers(&r.drivers.unwrap_or_default())?,
                agent_version: r.agent_version,
                resources: r
                    .resources
                    .map(|v| json("node_status", "resources", v))
                    .transpose()?,
                replicas: r
                    .replicas
                    .map(|v| json("node_status", "replicas", v))
                    .transpose()?
                    .unwrap_or_default(),
                reported_at: r.reported_at,
            })
        })
        .collect()
}
