//! Join tokens (one-time, per node, expiring; made by `cairn node join-token`) and admin API tokens, as
//! stored: only their hashes (`sha256:<hex>`, [`crate::api::auth`]), never a token in the clear. A
//! join consumes its token in [`super::nodes::join`].
//!
//! What it must not do: see, log or return a token's plaintext, or decide who may do what (the APIs do).

use std::time::Duration;

use cairn_schema::Name;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::decode::{millis, name};
use super::{Op as _, StoreError};

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
    row.map(|r| join_token(r.id, &r.node, r.created_at, r.expires_at, r.used_at))
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
        .map(|r| join_token(r.id, &r.node, r.created_at, r.expires_at, r.used_at))
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
    pub role: Role,
}

/// What an admin token may do: `viewer` only reads; `operator` also acts (rollback, unpin, restart,
/// deploy, join tokens, credentials, notification tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// An authenticated admin token: its id, name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub id: i64,
    pub name: String,
    pub role: Role,
}

/// Stores an admin token under `name` with `role`; returns its id.
pub async fn create_admin_token(
    pool: &PgPool,
    name: &str,
    token_hash: &str,
    role: Role,
) -> Result<i64, StoreError> {
    // Runtime-checked (added after the offline query data).
    sqlx::query_scalar(
        "INSERT INTO admin_tokens (name, token_hash, role) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(name)
    .bind(token_hash)
    .bind(role.as_str())
    .fetch_one(pool)
    .await
    .op("store an admin token")
}

/// The token holding `token_hash` if it is not revoked (its last use is recorded).
pub async fn admin_by_token(
    pool: &PgPool,
    token_hash: &str,
) -> Result<Option<AdminToken>, StoreError> {
    let row: Option<(i64, String, String)> = sqlx::query_as(
        r#"UPDATE admin_tokens SET last_used_at = now()
           WHERE token_hash = $1 AND revoked_at IS NULL
           RETURNING id, name, role"#,
    )
    .bind(token_hash)
    .fetch_optional(pool)
    .await
    .op("authenticate an admin")?;
    row.map(admin_token).transpose()
}

fn admin_token((id, name, role): (i64, String, String)) -> Result<AdminToken, StoreError> {
    let role = Role::parse(&role).ok_or_else(|| StoreError::Corrupt {
        table: "admin_tokens",
        column: "role",
        detail: format!("unknown role `{role}`"),
    })?;
    Ok(AdminToken { id, name, role })
}

/// Stores a dashboard session (the hash of its id) for admin token `token_id`, valid for `ttl`.
pub async fn create_session(
    pool: &PgPool,
    id_hash: &str,
    token_id: i64,
    ttl: Duration,
) -> Result<(), StoreError> {
    sqlx::query(
        r#"INSERT INTO ui_sessions (id_hash, token_id, expires_at)
           VALUES ($1, $2, now() + $3::float8 * interval '1 millisecond')"#,
    )
    .bind(id_hash)
    .bind(token_id)
    .bind(millis(ttl))
    .execute(pool)
    .await
    .op("store a dashboard session")?;
    // Expired sessions go when a new one is made: their number stays bounded by the sign-ins of a ttl.
    sqlx::query("DELETE FROM ui_sessions WHERE expires_at < now()")
        .execute(pool)
        .await
        .op("prune dashboard sessions")?;
    Ok(())
}

/// The admin token of the live session whose id hashes to `id_hash`: `None` when there is no such
/// session, it expired, or its token was revoked.
pub async fn session(pool: &PgPool, id_hash: &str) -> Result<Option<AdminToken>, StoreError> {
    let row: Option<(i64, String, String)> = sqlx::query_as(
        r#"SELECT t.id, t.name, t.role FROM ui_sessions s JOIN admin_tokens t ON t.id = s.token_id
           WHERE s.id_hash = $1 AND s.expires_at > now() AND t.revoked_at IS NULL"#,
    )
    .bind(id_hash)
    .fetch_optional(pool)
    .await
    .op("read a dashboard session")?;
    row.map(admin_token).transpose()
}

/// Ends a dashboard session (sign-out).
pub async fn delete_session(pool: &PgPool, id_hash: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM ui_sessions WHERE id_hash = $1")
        .bind(id_hash)
        .execute(pool)
        .await
        .op("end a dashboard session")?;
    Ok(())
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
    type Row = (
        i64,
        String,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
        String,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, name, created_at, last_used_at, revoked_at, role FROM admin_tokens ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .op("list admin tokens")?;
    rows.into_iter()
        .map(|(id, name, created_at, last_used_at, revoked_at, role)| {
            let t = admin_token((id, name, role))?;
            Ok(AdminTokenRow {
                id,
                name: t.name,
                created_at,
                last_used_at,
                revoked_at,
                role: t.role,
            })
        })
        .collect()
}

/// A `node_join_tokens` row.
fn join_token(
    id: i64,
    node: &str,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    used_at: Option<DateTime<Utc>>,
) -> Result<JoinTokenRow, StoreError> {
    Ok(JoinTokenRow {
        id,
        node: name("node_join_tokens", node)?,
        created_at,
        expires_at,
        used_at,
    })
}
