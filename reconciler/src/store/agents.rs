//! The agent side of the control plane's state: join tokens, node credentials, what heartbeats report,
//! admin API tokens, node liveness, and what agents say about the tasks they hold.
//!
//! Tokens and credentials arrive here already hashed (`sha256:<hex>`, [`crate::api::auth`]); this module
//! never sees one in the clear. A join consumes its token in the same transaction that stores the node's
//! credential, so a token joins exactly once.
//!
//! What it must not do: decide anything (which replicas drift, which node is offline after how long, who
//! may call what: the callers decide, this module runs the statements), hold a transaction across a call,
//! or store a secret's plaintext (a deploy payload written back here holds only an age ciphertext).

use std::time::Duration;

use cairn_proto::{ActualReplica, Resources};
use cairn_schema::{Driver, Name, Recipient};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::{Op as _, StoreError, to_i64, to_u64};
use crate::queue::{LeaseToken, TaskId, TaskKind, TaskStatus};
use cairn_plan::observed::{AppliedApp, NodeState, ReplicaState};

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
        return Ok(JoinOutcome::InvalidToken);
    };
    let node = name("node_join_tokens", &row.node)?;
    if let Some(pinned) = row.pinned
        && pinned != j.recipient.as_str()
    {
        let pinned =
            Recipient::new(&pinned).map_err(|e| corrupt("nodes", "recipient", e.to_string()))?;
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
        &drivers(j.drivers),
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

/// A join token as stored (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRow {
    pub id: i64,
    pub node: Name,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

/// Stores a join token for `node`, valid for `ttl`, that may replace the node's live credential when
/// `replace`. `None` when the node is not in the applied state.
pub async fn create_join_token(
    pool: &PgPool,
    node: &Name,
    token_hash: &str,
    ttl: Duration,
    replace: bool,
) -> Result<Option<JoinTokenRow>, StoreError> {
    let row = sqlx::query!(
        r#"INSERT INTO node_join_tokens (node, token_hash, expires_at, replace_credential)
           SELECT name, $2, now() + $3::float8 * interval '1 millisecond', $4
           FROM nodes WHERE name = $1
           RETURNING id, node, created_at, expires_at, used_at"#,
        node.as_str(),
        token_hash,
        millis(ttl),
        replace,
    )
    .fetch_optional(pool)
    .await
    .op("store a join token")?;
    row.map(|r| {
        Ok(JoinTokenRow {
            id: r.id,
            node: name("node_join_tokens", &r.node)?,
            created_at: r.created_at,
            expires_at: r.expires_at,
            used_at: r.used_at,
        })
    })
    .transpose()
}

/// A node's join tokens, newest first.
pub async fn join_tokens(pool: &PgPool, node: &Name) -> Result<Vec<JoinTokenRow>, StoreError> {
    let rows = sqlx::query!(
        r#"SELECT id, node, created_at, expires_at, used_at FROM node_join_tokens
           WHERE node = $1 ORDER BY created_at DESC, id DESC"#,
        node.as_str(),
    )
    .fetch_all(pool)
    .await
    .op("list join tokens")?;
    rows.into_iter()
        .map(|r| {
            Ok(JoinTokenRow {
                id: r.id,
                node: name("node_join_tokens", &r.node)?,
                created_at: r.created_at,
                expires_at: r.expires_at,
                used_at: r.used_at,
            })
        })
        .collect()
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
            recipient: r
                .recipient
                .map(|s| {
                    Recipient::new(&s)
                        .map_err(|e| corrupt("node_status", "recipient", e.to_string()))
                })
                .transpose()?,
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
    pool: &PgPool,
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
        &drivers(hb.drivers),
        hb.agent_version,
        resources,
        replicas,
    )
    .fetch_optional(pool)
    .await
    .op("record a heartbeat")?;
    previous.map(|s| node_state(&s)).transpose()
}

/// Marks online nodes whose last heartbeat is older than `offline_after` offline; returns them.
pub async fn mark_offline(pool: &PgPool, offline_after: Duration) -> Result<Vec<Name>, StoreError> {
    let nodes = sqlx::query_scalar!(
        r#"UPDATE node_status SET state = 'offline', updated_at = now()
           WHERE state = 'online'
             AND last_heartbeat < now() - $1::float8 * interval '1 millisecond'
           RETURNING node"#,
        millis(offline_after),
    )
    .fetch_all(pool)
    .await
    .op("mark silent nodes offline")?;
    nodes.iter().map(|n| name("node_status", n)).collect()
}

/// A placement as drift checks and heartbeat answers need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPlacement {
    pub app: Name,
    pub slot: u32,
    pub node: Name,
    pub release: u64,
    pub state: ReplicaState,
    pub generation: u64,
}

/// The placements on `node`, and those of the slots `(app, slot)` wherever they are.
pub async fn placements_for(
    conn: &mut PgConnection,
    node: &Name,
    slots: &[(Name, u32)],
) -> Result<Vec<SlotPlacement>, StoreError> {
    let apps: Vec<String> = slots.iter().map(|(a, _)| a.as_str().to_owned()).collect();
    let nums: Vec<i32> = slots
        .iter()
        .map(|(_, s)| i32::try_from(*s).unwrap_or(i32::MAX))
        .collect();
    let rows = sqlx::query!(
        r#"SELECT app, slot, node, release, state, generation FROM placements WHERE node = $1
           UNION
           SELECT p.app, p.slot, p.node, p.release, p.state, p.generation
           FROM placements p JOIN UNNEST($2::text[], $3::int[]) AS s(app, slot)
                ON p.app = s.app AND p.slot = s.slot"#,
        node.as_str(),
        &apps,
        &nums,
    )
    .fetch_all(conn)
    .await
    .op("read a node's placements")?;
    rows.into_iter()
        .map(|r| {
            let (Some(app), Some(slot), Some(node), Some(release), Some(state), Some(generation)) =
                (r.app, r.slot, r.node, r.release, r.state, r.generation)
            else {
                return Err(corrupt("placements", "*", "a NULL in a placement".into()));
            };
            Ok(SlotPlacement {
                app: name("placements", &app)?,
                slot: u32::try_from(slot)
                    .map_err(|_| corrupt("placements", "slot", slot.to_string()))?,
                node: name("placements", &node)?,
                release: to_u64("placements", "release", release)?,
                state: match state.as_str() {
                    "running" => ReplicaState::Running,
                    "stopped" => ReplicaState::Stopped,
                    other => return Err(corrupt("placements", "state", other.to_owned())),
                },
                generation: to_u64("placements", "generation", generation)?,
            })
        })
        .collect()
}

/// The newest task of one of a node's replica slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestTask {
    pub id: TaskId,
    pub app: Name,
    pub slot: u32,
    pub kind: TaskKind,
    pub release: Option<u64>,
    pub status: TaskStatus,
}

/// The newest task of each of `node`'s slots of `apps`.
pub async fn latest_tasks(
    conn: &mut PgConnection,
    node: &Name,
    apps: &[Name],
) -> Result<Vec<LatestTask>, StoreError> {
    let apps: Vec<String> = apps.iter().map(|a| a.as_str().to_owned()).collect();
    let rows = sqlx::query!(
        r#"SELECT DISTINCT ON (app, slot) id, app, slot AS "slot!", kind, release, status
           FROM tasks
           WHERE node = $1 AND app = ANY($2) AND slot IS NOT NULL
           ORDER BY app, slot, id DESC"#,
        node.as_str(),
        &apps,
    )
    .fetch_all(conn)
    .await
    .op("read a node's latest tasks")?;
    rows.into_iter()
        .map(|r| {
            Ok(LatestTask {
                id: TaskId(r.id),
                app: name("tasks", &r.app)?,
                slot: u32::try_from(r.slot)
                    .map_err(|_| corrupt("tasks", "slot", r.slot.to_string()))?,
                kind: TaskKind::parse(&r.kind)
                    .ok_or_else(|| corrupt("tasks", "kind", r.kind.clone()))?,
                release: r
                    .release
                    .map(|v| to_u64("tasks", "release", v))
                    .transpose()?,
                status: TaskStatus::parse(&r.status)
                    .ok_or_else(|| corrupt("tasks", "status", r.status.clone()))?,
            })
        })
        .collect()
}

/// Waits for the apply lock in shared mode: applies wait for the holder, other shared holders do not.
/// Drift checks hold it so that they read placements and tasks that no apply is halfway through
/// replacing.
pub async fn lock_apply_shared(tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock_shared($1)",
        super::state::APPLY_LOCK_KEY
    )
    .execute(&mut **tx)
    .await
    .op("take the apply lock (shared)")?;
    Ok(())
}

/// How long until the next of `node`'s unfinished tasks may be leased (its backoff ends, or its lease
/// expires), by the database's clock; `None` when the node has none waiting. A long-poll that found
/// nothing sleeps until then instead of polling.
pub async fn next_due(pool: &PgPool, node: &Name) -> Result<Option<Duration>, StoreError> {
    let secs = sqlx::query_scalar!(
        r#"SELECT EXTRACT(EPOCH FROM (min(run_after) - now()))::float8 AS "secs"
           FROM tasks
           WHERE node = $1 AND status IN ('queued', 'failed', 'leased')
             AND attempts < max_attempts + (status = 'leased')::int"#,
        node.as_str(),
    )
    .fetch_one(pool)
    .await
    .op("find a node's next due task")?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// What a release was deployed with, for a task that deploys it again.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseRow {
    pub config_commit: String,
    pub source_commit: String,
    /// `plan::ReleaseSpec` as JSON.
    pub spec: serde_json::Value,
}

/// A recorded release.
pub async fn release(
    conn: &mut PgConnection,
    app: &Name,
    number: u64,
) -> Result<Option<ReleaseRow>, StoreError> {
    let row = sqlx::query!(
        "SELECT config_commit, source_commit, spec FROM releases WHERE app = $1 AND number = $2",
        app.as_str(),
        to_i64("release", number)?,
    )
    .fetch_optional(conn)
    .await
    .op("read a release")?;
    Ok(row.map(|r| ReleaseRow {
        config_commit: r.config_commit,
        source_commit: r.source_commit,
        spec: r.spec,
    }))
}

/// An app as applied (`apps.spec`), if it is.
pub async fn applied_app(
    conn: &mut PgConnection,
    app: &Name,
) -> Result<Option<AppliedApp>, StoreError> {
    let spec = sqlx::query_scalar!("SELECT spec FROM apps WHERE name = $1", app.as_str())
        .fetch_optional(conn)
        .await
        .op("read an applied app")?;
    spec.map(|v| serde_json::from_value(v).map_err(|e| corrupt("apps", "spec", e.to_string())))
        .transpose()
}

/// The node a task is for; `None` when there is no such task.
pub async fn task_node(pool: &PgPool, task: TaskId) -> Result<Option<Name>, StoreError> {
    let node = sqlx::query_scalar!("SELECT node FROM tasks WHERE id = $1", task.0)
        .fetch_optional(pool)
        .await
        .op("read a task's node")?;
    node.map(|n| name("tasks", &n)).transpose()
}

/// A task as its node may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub id: TaskId,
    pub node: Name,
    pub kind: TaskKind,
    pub app: Name,
    pub slot: Option<u32>,
    pub release: Option<u64>,
    pub status: TaskStatus,
    pub attempts: u32,
    pub max_attempts: u32,
    pub lease_token: Option<LeaseToken>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub progress: Option<String>,
    pub last_error: Option<String>,
}

/// One task, if it is `node`'s.
pub async fn node_task(
    pool: &PgPool,
    node: &Name,
    task: TaskId,
) -> Result<Option<TaskRow>, StoreError> {
    let row = sqlx::query!(
        r#"SELECT id, node, kind, app, slot, release, status, attempts, max_attempts, lease_token,
                  lease_expires_at, progress, last_error
           FROM tasks WHERE id = $1 AND node = $2"#,
        task.0,
        node.as_str(),
    )
    .fetch_optional(pool)
    .await
    .op("read a node's task")?;
    row.map(|r| {
        Ok(TaskRow {
            id: TaskId(r.id),
            node: name("tasks", &r.node)?,
            kind: TaskKind::parse(&r.kind)
                .ok_or_else(|| corrupt("tasks", "kind", r.kind.clone()))?,
            app: name("tasks", &r.app)?,
            slot: r
                .slot
                .map(|s| u32::try_from(s).map_err(|_| corrupt("tasks", "slot", s.to_string())))
                .transpose()?,
            release: r
                .release
                .map(|v| to_u64("tasks", "release", v))
                .transpose()?,
            status: TaskStatus::parse(&r.status)
                .ok_or_else(|| corrupt("tasks", "status", r.status.clone()))?,
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            max_attempts: u32::try_from(r.max_attempts).unwrap_or(0),
            lease_token: r.lease_token.map(LeaseToken),
            lease_expires_at: r.lease_expires_at,
            progress: r.progress,
            last_error: r.last_error,
        })
    })
    .transpose()
}

/// Records what the agent is doing with a task it holds and extends the lease to `lease_for` from now.
/// `None` when `token` is not the task's current lease.
pub async fn record_progress(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    message: Option<&str>,
    lease_for: Duration,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    sqlx::query_scalar!(
        r#"UPDATE tasks
           SET progress = coalesce($3, progress), progress_at = now(),
               lease_expires_at = now() + $4::float8 * interval '1 millisecond',
               run_after = now() + $4::float8 * interval '1 millisecond',
               updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'
           RETURNING lease_expires_at AS "lease_expires_at!""#,
        task.0,
        token.0,
        message,
        millis(lease_for),
    )
    .fetch_optional(pool)
    .await
    .op("record a task's progress")
}

/// A log line to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLogLine<'a> {
    pub stream: &'a str,
    pub line: &'a str,
    pub at: DateTime<Utc>,
}

/// Appends log lines to a task the caller holds, keeping at most `max_lines` per task. `None` when `token`
/// is not the task's current lease; otherwise how many lines were stored.
pub async fn append_logs(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    lines: &[NewLogLine<'_>],
    max_lines: u32,
) -> Result<Option<u32>, StoreError> {
    let mut tx = pool.begin().await.op("begin appending logs")?;
    // Holding the task's row serialises appends, so sequence numbers never collide.
    let held = sqlx::query_scalar!(
        r#"SELECT id FROM tasks WHERE id = $1 AND lease_token = $2 AND status = 'leased'
           FOR UPDATE"#,
        task.0,
        token.0,
    )
    .fetch_optional(&mut *tx)
    .await
    .op("hold a task for its logs")?;
    if held.is_none() {
        return Ok(None);
    }
    let streams: Vec<String> = lines.iter().map(|l| l.stream.to_owned()).collect();
    let texts: Vec<String> = lines.iter().map(|l| l.line.to_owned()).collect();
    let ats: Vec<DateTime<Utc>> = lines.iter().map(|l| l.at).collect();
    let stored = sqlx::query!(
        r#"WITH next AS (SELECT coalesce(max(seq) + 1, 0) AS seq FROM task_logs WHERE task = $1)
           INSERT INTO task_logs (task, seq, stream, line, at)
           SELECT $1, next.seq + l.ord - 1, l.stream, l.line, l.at
           FROM next, UNNEST($2::text[], $3::text[], $4::timestamptz[])
                WITH ORDINALITY AS l(stream, line, at, ord)
           WHERE next.seq + l.ord - 1 < $5"#,
        task.0,
        &streams,
        &texts,
        &ats,
        i64::from(max_lines),
    )
    .execute(&mut *tx)
    .await
    .op("store log lines")?
    .rows_affected();
    tx.commit().await.op("commit log lines")?;
    Ok(Some(u32::try_from(stored).unwrap_or(u32::MAX)))
}

/// A task's log lines, in order: `(stream, line, at)`.
pub async fn task_logs(
    pool: &PgPool,
    task: TaskId,
) -> Result<Vec<(String, String, DateTime<Utc>)>, StoreError> {
    let rows = sqlx::query!(
        "SELECT stream, line, at FROM task_logs WHERE task = $1 ORDER BY seq",
        task.0
    )
    .fetch_all(pool)
    .await
    .op("read a task's logs")?;
    Ok(rows.into_iter().map(|r| (r.stream, r.line, r.at)).collect())
}

/// Gives a leased task back unstarted: it may be leased again `after` from now (at once for an agent
/// that shuts down; later for a task held until another node pushed its image), and the attempt does
/// not count. `false` when `token` is not the task's current lease.
pub async fn release_task(
    conn: impl sqlx::PgExecutor<'_>,
    task: TaskId,
    token: LeaseToken,
    after: Duration,
) -> Result<bool, StoreError> {
    let done = sqlx::query!(
        r#"UPDATE tasks
           SET status = 'queued', attempts = greatest(attempts - 1, 0),
               run_after = now() + $3::float8 * interval '1 millisecond',
               lease_expires_at = NULL, progress = NULL, updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'"#,
        task.0,
        token.0,
        after.as_secs_f64() * 1000.0,
    )
    .execute(conn)
    .await
    .op("release a task")?;
    Ok(done.rows_affected() == 1)
}

/// Ends a leased task as dead at once (a failure retrying cannot fix). `false` when `token` is not the
/// task's current lease.
pub async fn bury_task(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    error: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query!(
        r#"UPDATE tasks
           SET status = 'dead', finished_at = now(), last_error = $3, updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'"#,
        task.0,
        token.0,
        error,
    )
    .execute(pool)
    .await
    .op("end a task")?;
    Ok(done.rows_affected() == 1)
}

/// Replaces the payload of a task its lease holder is about to get (secrets encrypted to the node, in
/// place of a pending marker). `false` when `token` is not the task's current lease.
pub async fn set_task_payload(
    conn: impl sqlx::PgExecutor<'_>,
    task: TaskId,
    token: LeaseToken,
    payload: &serde_json::Value,
) -> Result<bool, StoreError> {
    let done = sqlx::query!(
        r#"UPDATE tasks SET payload = $3, updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'"#,
        task.0,
        token.0,
        payload,
    )
    .execute(conn)
    .await
    .op("write a task's payload")?;
    Ok(done.rows_affected() == 1)
}

/// How a release's deploy tasks stand: `(done, open, dead)` (open: queued, leased or failed).
pub async fn release_deploys(
    conn: &mut PgConnection,
    app: &Name,
    release: u64,
) -> Result<(u64, u64, u64), StoreError> {
    let r = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE status = 'done') AS "done!",
                  count(*) FILTER (WHERE status IN ('queued', 'leased', 'failed')) AS "open!",
                  count(*) FILTER (WHERE status = 'dead') AS "dead!"
           FROM tasks WHERE app = $1 AND release = $2 AND kind = 'deploy'"#,
        app.as_str(),
        to_i64("release", release)?,
    )
    .fetch_one(conn)
    .await
    .op("count a release's deploys")?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok((n(r.done), n(r.open), n(r.dead)))
}

/// What recording a release's outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// It already was so: someone else reported it.
    Unchanged,
    /// Live now; the live releases that ran before it are superseded.
    Live,
    /// Its replicas ran, but a release whose replicas ran later is live: it stays live, and this one is
    /// recorded as superseded (it ran, so a rollback may still go back to it).
    Superseded,
    Failed,
}

/// Marks a release live or failed, unless it already is. A release is ordered by when its replicas
/// ran (the newest generation among its deploys that are done), not by its number, since a rollback
/// deploys an older number again: marking one live supersedes the live releases that ran before it,
/// and never one that ran after it (a stale deploy's late result cannot demote what runs now). Only the
/// first caller to see an outcome gets it back as changed.
pub async fn finish_release(
    conn: &mut PgConnection,
    app: &Name,
    release: u64,
    ok: bool,
    error: Option<&str>,
) -> Result<Finished, StoreError> {
    let number = to_i64("release", release)?;
    if !ok {
        let changed = sqlx::query!(
            r#"UPDATE releases SET status = 'failed', error = $3, finished_at = now()
               WHERE app = $1 AND number = $2 AND status <> 'failed'"#,
            app.as_str(),
            number,
            error,
        )
        .execute(&mut *conn)
        .await
        .op("record a release's failure")?
        .rows_affected()
            == 1;
        return Ok(if changed {
            Finished::Failed
        } else {
            Finished::Unchanged
        });
    }
    // The rows this decision reads and writes, locked in one order: two releases of the app finishing
    // at once decide one after the other.
    sqlx::query_scalar!(
        r#"SELECT number FROM releases WHERE app = $1 AND (number = $2 OR status = 'live')
           ORDER BY number FOR UPDATE"#,
        app.as_str(),
        number,
    )
    .fetch_all(&mut *conn)
    .await
    .op("lock an app's live releases")?;
    let ran = sqlx::query!(
        r#"WITH ran AS (
               SELECT release, max(coalesce(generation, 0)) AS generation FROM tasks
               WHERE app = $1 AND kind = 'deploy' AND status = 'done' AND release IS NOT NULL
               GROUP BY release
           )
           SELECT (SELECT generation FROM ran WHERE release = $2) AS "mine",
                  (SELECT max(ran.generation) FROM releases r JOIN ran ON ran.release = r.number
                   WHERE r.app = $1 AND r.number <> $2 AND r.status = 'live') AS "newest_other""#,
        app.as_str(),
        number,
    )
    .fetch_one(&mut *conn)
    .await
    .op("read when an app's releases ran")?;
    let mine = ran.mine.unwrap_or(0);
    if ran.newest_other.is_some_and(|other| other > mine) {
        let changed = sqlx::query!(
            r#"UPDATE releases SET status = 'superseded', error = NULL,
                                   finished_at = coalesce(finished_at, now())
               WHERE app = $1 AND number = $2 AND status <> 'superseded'"#,
            app.as_str(),
            number,
        )
        .execute(&mut *conn)
        .await
        .op("record a release that ran before the live one")?
        .rows_affected()
            == 1;
        return Ok(if changed {
            Finished::Superseded
        } else {
            Finished::Unchanged
        });
    }
    let changed = sqlx::query!(
        r#"UPDATE releases SET status = 'live', error = NULL, finished_at = now()
           WHERE app = $1 AND number = $2 AND status <> 'live'"#,
        app.as_str(),
        number,
    )
    .execute(&mut *conn)
    .await
    .op("record a release live")?
    .rows_affected()
        == 1;
    if !changed {
        return Ok(Finished::Unchanged);
    }
    sqlx::query!(
        r#"UPDATE releases SET status = 'superseded'
           WHERE app = $1 AND number <> $2 AND status = 'live'"#,
        app.as_str(),
        number,
    )
    .execute(&mut *conn)
    .await
    .op("supersede the releases that ran before")?;
    Ok(Finished::Live)
}

/// Whether `token` is task `task`'s current lease.
pub async fn holds_lease(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
) -> Result<bool, StoreError> {
    let held = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM tasks WHERE id = $1 AND lease_token = $2 AND status = 'leased')
           AS "held!""#,
        task.0,
        token.0,
    )
    .fetch_one(pool)
    .await
    .op("check a task's lease")?;
    Ok(held)
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
                recipient: r
                    .recipient
                    .map(|s| {
                        Recipient::new(&s)
                            .map_err(|e| corrupt("node_status", "recipient", e.to_string()))
                    })
                    .transpose()?,
                drivers: r
                    .drivers
                    .unwrap_or_default()
                    .iter()
                    .map(|d| driver(d))
                    .collect::<Result<_, _>>()?,
                agent_version: r.agent_version,
                resources: r
                    .resources
                    .map(|v| {
                        serde_json::from_value(v)
                            .map_err(|e| corrupt("node_status", "resources", e.to_string()))
                    })
                    .transpose()?,
                replicas: r
                    .replicas
                    .map(|v| {
                        serde_json::from_value(v)
                            .map_err(|e| corrupt("node_status", "replicas", e.to_string()))
                    })
                    .transpose()?
                    .unwrap_or_default(),
                reported_at: r.reported_at,
            })
        })
        .collect()
}

/// An admin token as stored (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenRow {
    pub id: i64,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Stores an admin token under `name`; returns its id.
pub async fn create_admin_token(
    pool: &PgPool,
    name: &str,
    token_hash: &str,
) -> Result<i64, StoreError> {
    sqlx::query_scalar!(
        "INSERT INTO admin_tokens (name, token_hash) VALUES ($1, $2) RETURNING id",
        name,
        token_hash,
    )
    .fetch_one(pool)
    .await
    .op("store an admin token")
}

/// The token holding `token_hash` if it is not revoked (its last use is recorded).
pub async fn admin_by_token(
    pool: &PgPool,
    token_hash: &str,
) -> Result<Option<(i64, String)>, StoreError> {
    let row = sqlx::query!(
        r#"UPDATE admin_tokens SET last_used_at = now()
           WHERE token_hash = $1 AND revoked_at IS NULL
           RETURNING id, name"#,
        token_hash,
    )
    .fetch_optional(pool)
    .await
    .op("authenticate an admin")?;
    Ok(row.map(|r| (r.id, r.name)))
}

/// Revokes the admin tokens with id `id_or_name`, or else named `id_or_name`. Returns how many.
pub async fn revoke_admin_token(pool: &PgPool, id_or_name: &str) -> Result<u64, StoreError> {
    let id: Option<i64> = id_or_name.parse().ok();
    let done = sqlx::query!(
        r#"UPDATE admin_tokens SET revoked_at = now()
           WHERE revoked_at IS NULL
             AND (id = $1 OR ($1 IS NULL AND name = $2))"#,
        id,
        id_or_name,
    )
    .execute(pool)
    .await
    .op("revoke an admin token")?;
    Ok(done.rows_affected())
}

/// Every admin token, oldest first.
pub async fn admin_tokens(pool: &PgPool) -> Result<Vec<AdminTokenRow>, StoreError> {
    let rows = sqlx::query!(
        "SELECT id, name, created_at, last_used_at, revoked_at FROM admin_tokens ORDER BY id"
    )
    .fetch_all(pool)
    .await
    .op("list admin tokens")?;
    Ok(rows
        .into_iter()
        .map(|r| AdminTokenRow {
            id: r.id,
            name: r.name,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        })
        .collect())
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn drivers(d: &[Driver]) -> Vec<String> {
    let mut v: Vec<String> = d.iter().map(|d| d.as_str().to_owned()).collect();
    v.sort();
    v.dedup();
    v
}

fn corrupt(table: &'static str, column: &'static str, detail: String) -> StoreError {
    StoreError::Corrupt {
        table,
        column,
        detail,
    }
}

fn name(table: &'static str, s: &str) -> Result<Name, StoreError> {
    Name::new(s).map_err(|e| corrupt(table, "name", e))
}

fn node_state(s: &str) -> Result<NodeState, StoreError> {
    match s {
        "pending" => Ok(NodeState::Pending),
        "online" => Ok(NodeState::Online),
        "offline" => Ok(NodeState::Offline),
        other => Err(corrupt(
            "node_status",
            "state",
            format!("unknown state `{other}`"),
        )),
    }
}

fn driver(s: &str) -> Result<Driver, StoreError> {
    match s {
        "docker" => Ok(Driver::Docker),
        "process" => Ok(Driver::Process),
        other => Err(corrupt(
            "node_status",
            "drivers",
            format!("unknown driver `{other}`"),
        )),
    }
}
