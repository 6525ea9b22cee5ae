//! The admin API's database routes (`/api/v1/databases/...`), the same operations as `cairn db`:
//!
//! - `GET databases`: every applied database, where it runs, its last good backup;
//! - `GET databases/{db}/backups`: its backups ledger, newest first;
//! - `POST databases/{db}/backup`: a backup now (operators);
//! - `POST databases/{db}/verify`: restore the latest good backup into a scratch server now and compare
//!   its rows with the backup's (operators);
//! - `POST databases/{db}/restore` (`{"backup": ID | null, "into": "NEW"}`): restore beside the original,
//!   never in place; `into` equal to the database's own name restores into its own fresh instance (after
//!   a move, with `--latest`) (operators);
//! - `POST databases/{db}/swap` (`{"instance": "NEW"}`): attached apps point at NEW: a release; a stopped
//!   NEW (a pre-upgrade instance) is started again, a dropped one refused (operators);
//! - `POST databases/{db}/rotate`: a new login; attached apps get a release (operators);
//! - `GET databases/{db}/upgrades`: its version upgrades, newest first;
//! - `POST databases/{db}/finish-upgrade`: drop the last successful upgrade's pre-upgrade instance
//!   (operators);
//! - `POST databases/{db}/drop` (`{"instance": "OLD"}`): drop an instance that is not the database's
//!   current one: its server stopped, its data deleted (operators).
//!
//! What it must not do: answer with a password, a URL or a key.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::admin::AdminAuth;
use super::{Api, ApiError, Json};
use crate::databases::{self, DbOpError};
pub use crate::databases::{DatabaseInfo, list_databases};
use crate::store::Op as _;
use cairn_schema::Name;

pub(super) fn admin_routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/databases", get(list))
        .route("/databases/{db}/backups", get(backups))
        .route("/databases/{db}/backup", post(backup))
        .route("/databases/{db}/verify", post(verify))
        .route("/databases/{db}/restore", post(restore))
        .route("/databases/{db}/swap", post(swap))
        .route("/databases/{db}/rotate", post(rotate))
        .route("/databases/{db}/upgrades", get(upgrades))
        .route("/databases/{db}/finish-upgrade", post(finish_upgrade))
        .route("/databases/{db}/drop", post(drop_instance))
}

impl From<DbOpError> for ApiError {
    fn from(e: DbOpError) -> Self {
        match e {
            DbOpError::Store(s) => ApiError::Store(s),
            DbOpError::Queue(q) => q.into(),
            DbOpError::UnknownDatabase(_) | DbOpError::UnknownInstance { .. } => {
                ApiError::NotFound(e.to_string())
            }
            DbOpError::InstanceExists(_) => ApiError::Conflict(e.to_string()),
            DbOpError::NoBackupTarget(_) | DbOpError::NoBackup { .. } => {
                ApiError::BadRequest(e.to_string())
            }
            DbOpError::CurrentInstance { .. }
            | DbOpError::AlreadyDropped(_)
            | DbOpError::UpgradeRunning { .. }
            | DbOpError::UpgradeNotFinishable { .. } => ApiError::Conflict(e.to_string()),
            DbOpError::NoUpgrade(_) => ApiError::BadRequest(e.to_string()),
        }
    }
}

pub(super) fn db_name(s: &str) -> Result<Name, ApiError> {
    Name::new(s).map_err(|e| ApiError::BadRequest(format!("`{s}` is not a database name: {e}")))
}

async fn list(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
) -> Result<Json<Vec<DatabaseInfo>>, ApiError> {
    Ok(Json(list_databases(&api.pool).await?))
}

async fn backups(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Path(db): Path<String>,
) -> Result<Json<Vec<crate::store::databases::BackupRow>>, ApiError> {
    let db = db_name(&db)?;
    let mut conn = api.pool.acquire().await.op("read backups")?;
    Ok(Json(
        crate::store::databases::backups(&mut conn, &db, 200).await?,
    ))
}

/// A queued backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Queued {
    pub backup: i64,
}

async fn backup(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(db): Path<String>,
) -> Result<Json<Queued>, ApiError> {
    admin.operator()?;
    let db = db_name(&db)?;
    let id = databases::backup_now(&api.pool, &db, "manual").await?;
    tracing::info!(database = %db, backup = id, by = %admin.name, "backup queued through the admin API");
    Ok(Json(Queued { backup: id }))
}

/// A queued verification restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verifying {
    pub verification: i64,
}

async fn verify(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(db): Path<String>,
) -> Result<Json<Verifying>, ApiError> {
    admin.operator()?;
    let db = db_name(&db)?;
    let id = databases::verify_now(&api.pool, &db).await?;
    tracing::info!(database = %db, verification = id, by = %admin.name, "verification queued through the admin API");
    Ok(Json(Verifying { verification: id }))
}

/// `POST restore`'s body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// A backup's id; `None`: the latest good one.
    #[serde(default)]
    pub backup: Option<i64>,
    pub into: String,
}

/// Where a restore runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restoring {
    pub instance: String,
    pub node: String,
}

async fn restore(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(db): Path<String>,
    Json(r): Json<RestoreRequest>,
) -> Result<Json<Restoring>, ApiError> {
    admin.operator()?;
    let db = db_name(&db)?;
    let into = db_name(&r.into)?;
    let node = databases::restore(&api.pool, &db, r.backup, &into).await?;
    tracing::info!(database = %db, into = %into, by = %admin.name, "restore queued through the admin API");
    Ok(Json(Restoring {
        instance: into.to_string(),
        node: node.to_string(),
    }))
}

/// `POST swap`'s body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapRequest {
    pub instance: String,
}

async fn swap(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(db): Path<String>,
    Json(r): Json<SwapRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin.operator()?;
    let db = db_name(&db)?;
    let instance = db_name(&r.instance)?;
    databases::swap(&api.pool, &db, &instance).await?;
    tracing::info!(database = %db, instance = %instance, by = %admin.name, "swap through the admin API");
    api.wake.notify_one();
    Ok(Json(
        serde_json::json!({ "database": db.as_str(), "instance": instance.as_str() }),
    ))
}

async fn rotate(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(db): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin.operator()?;
    let db = db_name(&db)?;
    databases::rotate(&api.pool, &db).await?;
    tracing::info!(database = %db, by = %admin.name, "rotation through the admin API");
    api.wake.notify_one();
    Ok(Json(
        serde_json::json!({ "database": db.as_str(), "rotated": true }),
    ))
}

async fn upgrades(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Path(db): Path<String>,
) -> Result<Json<Vec<crate::store::databases::UpgradeRow>>, ApiError> {
    let db = db_name(&db)?;
    let mut conn = api.pool.acquire().await.op("read database upgrades")?;
    Ok(Json(
        crate::store::databases::upgrades(&mut conn, &db, 200).await?,
    ))
}

/// What a drop queued: the instance and its node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dropping {
    pub database: String,
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

async fn finish_upgrade(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(db): Path<String>,
) -> Result<Json<Dropping>, ApiError> {
    admin.operator()?;
    let db = db_name(&db)?;
    let dropped = databases::finish_upgrade(&api.pool, &db).await?;
    tracing::info!(database = %db, instance = %dropped, by = %admin.name, "upgrade finished through the admin API");
    Ok(Json(Dropping {
        database: db.to_string(),
        instance: dropped.to_string(),
        node: None,
    }))
}

/// `POST drop`'s body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropRequest {
    pub instance: String,
}

async fn drop_instance(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(db): Path<String>,
    Json(r): Json<DropRequest>,
) -> Result<Json<Dropping>, ApiError> {
    admin.operator()?;
    let db = db_name(&db)?;
    let instance = db_name(&r.instance)?;
    let node = databases::drop_instance(&api.pool, &db, &instance).await?;
    tracing::info!(database = %db, instance = %instance, by = %admin.name, "drop queued through the admin API");
    Ok(Json(Dropping {
        database: db.to_string(),
        instance: instance.to_string(),
        node: Some(node.to_string()),
    }))
}

#[cfg(test)]
mod upgrade_tests {
    use super::*;

    /// An operator's refused drop or finish-upgrade is a 4xx naming why, never a 5xx.
    #[test]
    fn refused_drops_and_finishes_are_client_errors() {
        let n = |s: &str| Name::new(s).unwrap();
        let current = ApiError::from(DbOpError::CurrentInstance {
            database: n("main"),
            instance: n("main-v2"),
        });
        assert_eq!(current.status().as_u16(), 409);
        assert!(
            current.to_string().contains("current instance"),
            "{current}"
        );
        for (e, status) in [
            (DbOpError::AlreadyDropped(n("main")), 409),
            (
                DbOpError::UpgradeRunning {
                    database: n("main"),
                    instance: n("main-v2"),
                },
                409,
            ),
            (DbOpError::NoUpgrade(n("main")), 400),
            (
                DbOpError::UpgradeNotFinishable {
                    database: n("main"),
                    version: "16".into(),
                    state: "failed".into(),
                    hint: "main is still the database's instance".into(),
                },
                409,
            ),
            (
                DbOpError::UnknownInstance {
                    database: n("main"),
                    instance: n("nope"),
                },
                404,
            ),
        ] {
            assert_eq!(ApiError::from(e).status().as_u16(), status);
        }
    }
}
