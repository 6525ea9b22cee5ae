//! The admin API's per-app routes (`/api/v1/apps/{app}/...`) and the agent route that ships replica
//! output (`POST /agent/v1/replica-logs`). The operations are [`crate::releases`]'s; these handlers
//! authenticate, bound and translate, and wake the reconciler after a change it must act on.
//!
//! - `GET releases`: every release, newest first, with placement, status, error, stage timings;
//! - `POST rollback` (`{"release": N}` or `{}`): pin the app to a release that ran; `DELETE pin`: lift it;
//! - `POST restart`: restart the running replicas; `POST deploy`: read the branch head from the app's
//!   remote now and record it, so the next reconcile (woken at once) deploys it;
//! - `GET build-logs[?release=N]`: the build output kept with a release (default: the latest);
//! - `GET logs?after=CURSOR&tail=N&wait_ms=MS`: the replicas' output; with `after` and `wait_ms` it
//!   long-polls for the first new line, woken in memory when an agent ships one (and every 2 s, for lines
//!   another control plane received).
//!
//! The agent route stores a line only for a replica slot placed on the calling node: a node speaks for
//! nothing but its own replicas. Batches are bounded like task logs; the request rate is the node's.
//!
//! What it must not do: log a line's text (it is the app's output, which may hold anything), or hold a
//! database connection while a follow waits.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use cairn_proto::admin::{
    AppLogs, BuildLogs, Deployed, Pinned, Releases, Restarted, RollbackRequest,
};
use cairn_proto::{
    LogsResponse, MAX_LEASE_WAIT_MS, MAX_LOG_LINE_BYTES, MAX_LOG_LINES, ReplicaLogBatch, truncate,
};
use cairn_schema::Name;
use serde::Deserialize;
use tokio::time::Instant;

use super::admin::AdminAuth;
use super::agent::NodeAuth;
use super::{Api, ApiError, Json};
use crate::releases::{self, OpsError};
use crate::store::releases::NewReplicaLine;

/// The admin routes, relative to `/api/v1`.
pub(super) fn admin_routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/apps/{app}/releases", get(list))
        .route("/apps/{app}/rollback", post(rollback))
        .route("/apps/{app}/pin", axum::routing::delete(unpin))
        .route("/apps/{app}/restart", post(restart))
        .route("/apps/{app}/deploy", post(deploy))
        .route("/apps/{app}/build-logs", get(build_logs))
        .route("/apps/{app}/logs", get(logs))
}

/// The agent routes, relative to `/agent/v1`.
pub(super) fn agent_routes() -> Router<Arc<Api>> {
    Router::new().route("/replica-logs", post(ingest))
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::Store(s) => ApiError::Store(s),
            OpsError::UnknownApp(_) | OpsError::UnknownRelease { .. } | OpsError::NoRelease(_) => {
                ApiError::NotFound(e.to_string())
            }
            OpsError::RevPinned { .. } | OpsError::RollbackPinned { .. } => {
                ApiError::Conflict(e.to_string())
            }
            OpsError::Head { .. } | OpsError::NoBranch { .. } | OpsError::NoHeads => {
                ApiError::Upstream(e.to_string())
            }
            _ => ApiError::BadRequest(e.to_string()),
        }
    }
}

pub(super) fn app_name(s: &str) -> Result<Name, ApiError> {
    Name::new(s).map_err(|e| ApiError::BadRequest(format!("`{s}` is not an app name: {e}")))
}

async fn list(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Path(app): Path<String>,
) -> Result<Json<Releases>, ApiError> {
    let app = app_name(&app)?;
    Ok(Json(releases::list(&api.pool, &app).await?))
}

async fn rollback(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(app): Path<String>,
    Json(req): Json<RollbackRequest>,
) -> Result<Json<Pinned>, ApiError> {
    admin.operator()?;
    let app = app_name(&app)?;
    let pinned = releases::rollback(&api.pool, &app, req.release).await?;
    tracing::info!(%app, release = ?pinned.pinned_release, by = %admin.name, "rollback through the admin API");
    api.wake.notify_one();
    Ok(Json(pinned))
}

async fn unpin(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(app): Path<String>,
) -> Result<Json<Pinned>, ApiError> {
    admin.operator()?;
    let app = app_name(&app)?;
    let pinned = releases::unpin(&api.pool, &app).await?;
    tracing::info!(%app, previous = ?pinned.previous, by = %admin.name, "unpin through the admin API");
    api.wake.notify_one();
    Ok(Json(pinned))
}

async fn restart(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(app): Path<String>,
) -> Result<Json<Restarted>, ApiError> {
    admin.operator()?;
    let app = app_name(&app)?;
    let r = releases::restart(&api.pool, &app).await?;
    tracing::info!(%app, count = r.count, by = %admin.name, "restart through the admin API");
    api.wake.notify_one();
    Ok(Json(r))
}

async fn deploy(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(app): Path<String>,
) -> Result<Json<Deployed>, ApiError> {
    admin.operator()?;
    let app = app_name(&app)?;
    let d = deploy_now(&api, &app).await?;
    tracing::info!(%app, branch = %d.branch, commit = %d.commit, moved = d.moved, by = %admin.name, "deploy through the admin API");
    Ok(Json(d))
}

/// Reads `app`'s branch head from its remote now, records it and wakes the reconciler (the admin
/// API's `deploy` and the dashboard's "deploy now").
pub(super) async fn deploy_now(api: &Api, app: &Name) -> Result<Deployed, ApiError> {
    let (url, branch) = releases::deploy_target(&api.pool, app).await?;
    let poller = api.heads.get().ok_or(OpsError::NoHeads)?.clone();
    let (a, b) = (app.clone(), branch.clone());
    // Listing a remote's refs is blocking network IO: off the async workers, one at a time.
    let head = tokio::task::spawn_blocking(move || {
        let mut p = poller.blocking_lock();
        p.head(&a, &url, &b)
    })
    .await
    .map_err(|e| OpsError::Head {
        app: app.clone(),
        reason: e.to_string(),
    })?
    .map_err(|e| OpsError::Head {
        app: app.clone(),
        reason: cairn_schema::error::chain(&e),
    })?
    .ok_or_else(|| OpsError::NoBranch {
        app: app.clone(),
        branch: branch.clone(),
    })?;
    let (moved, latest) = releases::record_head(&api.pool, app, &branch, &head).await?;
    api.wake.notify_one();
    Ok(Deployed {
        app: app.clone(),
        branch,
        commit: head,
        moved,
        latest_release: latest,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildQuery {
    release: Option<u64>,
}

async fn build_logs(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Path(app): Path<String>,
    Query(q): Query<BuildQuery>,
) -> Result<Json<BuildLogs>, ApiError> {
    let app = app_name(&app)?;
    // Release numbers are stored as bigint: a larger one cannot exist (and must not reach the query).
    if let Some(n) = q.release.filter(|n| i64::try_from(*n).is_err()) {
        return Err(OpsError::UnknownRelease { app, release: n }.into());
    }
    Ok(Json(
        releases::build_logs(&api.pool, &app, q.release).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    after: Option<i64>,
    tail: Option<u32>,
    wait_ms: Option<u64>,
}

async fn logs(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Path(app): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<AppLogs>, ApiError> {
    let app = app_name(&app)?;
    let tail = q.tail.unwrap_or(200);
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(MAX_LEASE_WAIT_MS));
    let deadline = Instant::now() + wait;
    // Subscribed before the first read, so a line stored between the read and the wait still wakes it.
    let mut tick = api.replica_output.subscribe(app.as_str());
    loop {
        let page = releases::app_logs(&api.pool, &app, q.after, tail).await?;
        if !page.lines.is_empty() || q.after.is_none() || Instant::now() >= deadline {
            return Ok(Json(page));
        }
        tokio::select! {
            _ = tick.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = api.stopped() => return Ok(Json(page)),
        }
    }
}

async fn ingest(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Json(batch): Json<ReplicaLogBatch>,
) -> Result<Json<LogsResponse>, ApiError> {
    if batch.lines.len() > MAX_LOG_LINES {
        return Err(ApiError::BadRequest(format!(
            "a log batch may hold at most {MAX_LOG_LINES} lines"
        )));
    }
    if let Some(l) = batch
        .lines
        .iter()
        .find(|l| l.stream == cairn_proto::LogStream::Build)
    {
        return Err(ApiError::BadRequest(format!(
            "replica output of app `{}` cannot be on the build stream: build output goes with its task",
            l.app
        )));
    }
    let lines: Vec<NewReplicaLine<'_>> = batch
        .lines
        .iter()
        .map(|l| NewReplicaLine {
            app: l.app.as_str(),
            slot: l.slot,
            release: l.release,
            stream: l.stream.as_str(),
            line: truncate(&l.text, MAX_LOG_LINE_BYTES),
            at: l.at,
        })
        .collect();
    let node = &auth.node.node;
    let stored = if lines.is_empty() {
        0
    } else {
        crate::store::releases::append_replica_logs(&api.pool, node, &lines).await?
    };
    if stored > 0 {
        let mut apps: Vec<&str> = lines.iter().map(|l| l.app).collect();
        apps.sort_unstable();
        apps.dedup();
        for app in apps {
            api.replica_output.wake(app);
        }
    }
    tracing::debug!(%node, sent = lines.len(), stored, "replica output received");
    Ok(Json(LogsResponse {
        stored: u32::try_from(stored).unwrap_or(u32::MAX),
    }))
}
