//! What operators do with an app's releases, the same through the admin API (`cairn releases`,
//! `rollback`, `unpin`, `restart`, `deploy`, `logs` with `--server`) and straight against the database:
//! list the releases, pin the app to an earlier one (a rollback), lift the pin, ask for a restart, deploy
//! the branch head now, read a release's build output and the replicas' output; and the retention job
//! that prunes old output.
//!
//! These only record the operator's wish (a pin, a restart count, a source head); the planner turns it
//! into tasks on the next reconcile, which the caller wakes. A rollback pins the app: the planner deploys
//! the pinned release (its recorded spec and image, so nothing is built again) and holds it there against
//! pushes until `unpin` or a change to the app's manifest lifts the pin.
//!
//! What it must not do: write placements or tasks (the executor does), run SQL (the store does), or pin a
//! release that never ran, or one whose secrets changed since (it could not be given them again).

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_proto::admin::{
    AppLogLine, AppLogs, BuildLogs, OutputLine, Pinned, ReleaseInfo, Releases, Restarted,
    SlotPlacement,
};
use cairn_schema::Name;
use sqlx::PgPool;

use crate::store::releases::{self as store, OutputRow};
use crate::store::{Op as _, StoreError, state};
use cairn_plan::observed::AppliedEnv;
use cairn_plan::{ReleaseEnv, ReleaseSpec};

/// The most releases `cairn releases` lists.
pub const MAX_RELEASES: u32 = 1000;
/// The most replica lines one answer carries.
pub const MAX_LOG_LINES: u32 = 5000;

/// Why an operator command was refused. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("app `{0}` is not in the applied configuration")]
    UnknownApp(Name),
    #[error("app `{app}` has no release {release}")]
    UnknownRelease { app: Name, release: u64 },
    #[error("app `{0}` has no release yet")]
    NoRelease(Name),
    #[error(
        "app `{app}` has no release before release {current} that ran: name one with `cairn rollback \
         {app} RELEASE` (see `cairn releases {app}`)"
    )]
    NothingToRollBackTo { app: Name, current: u64 },
    #[error(
        "release {release} of app `{app}` never ran (it is {status}{why}): only a release that was \
         built and ran can be rolled back to"
    )]
    NeverRan {
        app: Name,
        release: u64,
        status: String,
        why: String,
    },
    #[error(
        "release {release} of app `{app}` ran with secret `{key}`, which {how} since: it cannot be given \
         its old value again. Restore the secret in the repository instead"
    )]
    SecretChanged {
        app: Name,
        release: u64,
        key: String,
        how: &'static str,
    },
    #[error(
        "app `{app}` pins `rev = \"{rev}\"` in its manifest: it deploys what the manifest names (change \
         the pin in a pull request)"
    )]
    RevPinned { app: Name, rev: String },
    #[error(
        "app `{app}` is pinned to release {release} by a rollback: `cairn unpin {app}` first (it then \
         deploys its branch head)"
    )]
    RollbackPinned { app: Name, release: u64 },
    #[error("branch `{branch}` does not exist in app `{app}`'s source")]
    NoBranch { app: Name, branch: String },
    #[error("the control plane cannot read app `{app}`'s branch head: {reason}")]
    Head { app: Name, reason: String },
    #[error("this control plane cannot read source heads")]
    NoHeads,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every release of `app`, newest first, where each now runs, and its pin. An app that is no longer
/// declared still has its history.
pub async fn list(pool: &PgPool, app: &Name) -> Result<Releases, OpsError> {
    let mut conn = pool.acquire().await.op("read an app's releases")?;
    let row = store::app(&mut conn, app, false).await?;
    let rows = store::releases(&mut conn, app, None, MAX_RELEASES).await?;
    if row.is_none() && rows.is_empty() {
        return Err(OpsError::UnknownApp(app.clone()));
    }
    let placed = store::placements(&mut conn, app).await?;
    let releases = rows
        .into_iter()
        .map(|r| {
            let placement = placed
                .iter()
                .filter(|p| p.2 == r.number)
                .filter_map(|(slot, node, _, state)| {
                    Some(SlotPlacement {
                        slot: *slot,
                        node: Name::new(node).ok()?,
                        state: state.clone(),
                    })
                })
                .collect();
            ReleaseInfo {
                number: r.number,
                config_commit: r.config_commit,
                config_generation: r.config_generation,
                source_commit: r.source_commit,
                image: r.image,
                image_digest: r.image_digest,
                status: r.status,
                error: r.error,
                stage_timings: r.stage_timings,
                created_at: r.created_at,
                finished_at: r.finished_at,
                placement,
            }
        })
        .collect();
    Ok(Releases {
        app: app.clone(),
        declared: row.is_some(),
        pinned_release: row.and_then(|r| r.pinned_release),
        releases,
    })
}

/// Pins `app` to `release`, or by default to the last release before the current one that ran (the
/// current one: the pinned release, else the newest that ran). Under the apply lock, so no apply in
/// flight can undo it. The caller wakes the reconciler.
pub async fn rollback(pool: &PgPool, app: &Name, release: Option<u64>) -> Result<Pinned, OpsError> {
    let mut tx = pool.begin().await.op("begin a rollback")?;
    state::lock_apply(&mut tx).await?;
    let row = store::app(&mut tx, app, true)
        .await?
        .ok_or_else(|| OpsError::UnknownApp(app.clone()))?;
    let all = store::releases(&mut tx, app, None, MAX_RELEASES).await?;
    let ran = |status: &str| matches!(status, "live" | "superseded");
    let target = match release {
        Some(n) => all
            .iter()
            .find(|r| r.number == n)
            .ok_or(OpsError::UnknownRelease {
                app: app.clone(),
                release: n,
            })?,
        None => {
            let current = row
                .pinned_release
                .or_else(|| all.iter().find(|r| ran(&r.status)).map(|r| r.number))
                .or_else(|| all.first().map(|r| r.number))
                .ok_or_else(|| OpsError::NoRelease(app.clone()))?;
            all.iter()
                .find(|r| r.number < current && ran(&r.status))
                .ok_or_else(|| OpsError::NothingToRollBackTo {
                    app: app.clone(),
                    current,
                })?
        }
    };
    if !ran(&target.status) {
        return Err(OpsError::NeverRan {
            app: app.clone(),
            release: target.number,
            status: target.status.clone(),
            why: target
                .error
                .as_deref()
                .map(|e| format!(": {}", cairn_proto::truncate(e, 300)))
                .unwrap_or_default(),
        });
    }
    check_secrets(app, target.number, &target.spec, &row.applied.env)?;
    state::set_rollback_pin(&mut tx, app, Some(target.number)).await?;
    tx.commit().await.op("commit a rollback")?;
    tracing::info!(%app, release = target.number, previous = ?row.pinned_release, "app pinned by a rollback");
    Ok(Pinned {
        app: app.clone(),
        pinned_release: Some(target.number),
        previous: row.pinned_release,
    })
}

/// A release can run again only with the secrets it was planned with: the agent API seals the applied
/// ciphertexts and refuses a value whose fingerprint is not the release's.
fn check_secrets(
    app: &Name,
    release: u64,
    spec: &serde_json::Value,
    applied: &BTreeMap<cairn_schema::EnvName, AppliedEnv>,
) -> Result<(), OpsError> {
    let spec: ReleaseSpec = serde_json::from_value(spec.clone()).map_err(|e| {
        OpsError::Store(StoreError::Corrupt {
            table: "releases",
            column: "spec",
            detail: e.to_string(),
        })
    })?;
    for (key, v) in &spec.env {
        let ReleaseEnv::Secret { fingerprint } = v else {
            continue;
        };
        let how = match applied.get(key) {
            Some(AppliedEnv::Secret {
                fingerprint: now, ..
            }) if now == fingerprint => continue,
            Some(AppliedEnv::Secret { .. }) => "changed",
            _ => "was removed",
        };
        return Err(OpsError::SecretChanged {
            app: app.clone(),
            release,
            key: key.to_string(),
            how,
        });
    }
    Ok(())
}

/// Lifts `app`'s rollback pin; it deploys its latest release (or its branch head) on the next reconcile.
pub async fn unpin(pool: &PgPool, app: &Name) -> Result<Pinned, OpsError> {
    let mut tx = pool.begin().await.op("begin an unpin")?;
    state::lock_apply(&mut tx).await?;
    let row = store::app(&mut tx, app, true)
        .await?
        .ok_or_else(|| OpsError::UnknownApp(app.clone()))?;
    if row.pinned_release.is_some() {
        state::set_rollback_pin(&mut tx, app, None).await?;
    }
    tx.commit().await.op("commit an unpin")?;
    tracing::info!(%app, previous = ?row.pinned_release, "app unpinned");
    Ok(Pinned {
        app: app.clone(),
        pinned_release: None,
        previous: row.pinned_release,
    })
}

/// Asks for `app`'s running replicas to be restarted (each once, on the next reconcile).
pub async fn restart(pool: &PgPool, app: &Name) -> Result<Restarted, OpsError> {
    let mut conn = pool.acquire().await.op("request a restart")?;
    if store::app(&mut conn, app, false).await?.is_none() {
        return Err(OpsError::UnknownApp(app.clone()));
    }
    let count = state::request_restart(&mut conn, app).await?;
    tracing::info!(%app, count, "restart requested");
    Ok(Restarted {
        app: app.clone(),
        count,
    })
}

/// Where `app`'s source is and which branch it follows, if `cairn deploy` may move it: not under a
/// manifest `rev` (the manifest is the deploy) nor a rollback pin (unpin first).
pub async fn deploy_target(pool: &PgPool, app: &Name) -> Result<(String, String), OpsError> {
    let mut conn = pool.acquire().await.op("read an app")?;
    let row = store::app(&mut conn, app, false)
        .await?
        .ok_or_else(|| OpsError::UnknownApp(app.clone()))?;
    if let Some(rev) = &row.applied.source.rev {
        return Err(OpsError::RevPinned {
            app: app.clone(),
            rev: rev.clone(),
        });
    }
    if let Some(release) = row.pinned_release {
        return Err(OpsError::RollbackPinned {
            app: app.clone(),
            release,
        });
    }
    Ok((
        row.applied.source.url.as_str().to_owned(),
        row.applied.source.branch.clone(),
    ))
}

/// Records `commit` as the head of `app`'s `branch` (read from its remote just now). Returns whether it
/// moved, and the app's latest release.
pub async fn record_head(
    pool: &PgPool,
    app: &Name,
    branch: &str,
    commit: &str,
) -> Result<(bool, Option<u64>), OpsError> {
    let moved = state::record_source_head(
        pool,
        app,
        branch,
        &cairn_plan::observed::CommitId::new(commit),
    )
    .await?;
    let mut conn = pool.acquire().await.op("read an app's releases")?;
    let latest = store::releases(&mut conn, app, None, 1)
        .await?
        .first()
        .map(|r| r.number);
    tracing::info!(%app, branch, commit, moved, "branch head recorded for a deploy");
    Ok((moved, latest))
}

/// What release `release` (default: the latest) of `app` logged while it was built and started.
pub async fn build_logs(
    pool: &PgPool,
    app: &Name,
    release: Option<u64>,
) -> Result<BuildLogs, OpsError> {
    let mut conn = pool.acquire().await.op("read build output")?;
    let rows = store::releases(&mut conn, app, release, 1).await?;
    let Some(r) = rows.first() else {
        return Err(match release {
            Some(n) => OpsError::UnknownRelease {
                app: app.clone(),
                release: n,
            },
            None => OpsError::NoRelease(app.clone()),
        });
    };
    let lines = store::build_logs(&mut conn, app, r.number)
        .await?
        .into_iter()
        .filter_map(output_line)
        .collect();
    Ok(BuildLogs {
        app: app.clone(),
        release: r.number,
        lines,
    })
}

/// The output of `app`'s replicas after `after` (or its last `tail` lines), oldest first.
pub async fn app_logs(
    pool: &PgPool,
    app: &Name,
    after: Option<i64>,
    tail: u32,
) -> Result<AppLogs, OpsError> {
    let mut conn = pool.acquire().await.op("read replica output")?;
    let (rows, cursor) =
        store::replica_logs(&mut conn, app, after, tail.clamp(1, MAX_LOG_LINES)).await?;
    if rows.is_empty() && after.is_none() && store::app(&mut conn, app, false).await?.is_none() {
        return Err(OpsError::UnknownApp(app.clone()));
    }
    let lines = rows
        .into_iter()
        .filter_map(|r| {
            let release = r.release;
            output_line(r).map(|line| AppLogLine { release, line })
        })
        .collect();
    Ok(AppLogs {
        app: app.clone(),
        lines,
        cursor,
    })
}

fn output_line(r: OutputRow) -> Option<OutputLine> {
    Some(OutputLine {
        stream: r.stream,
        text: r.line,
        at: r.at,
        node: Name::new(&r.node).ok()?,
        slot: r.slot,
    })
}

/// How long output is kept, and how much of it per app.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Build and replica output older than this goes.
    pub keep: Duration,
    /// Each app keeps at most this many replica lines.
    pub window: u32,
    /// How often the prune runs.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep: Duration::from_secs(14 * 24 * 3600),
            window: 10_000,
            every: Duration::from_secs(600),
        }
    }
}

/// Prunes once: output older than the retention, and replica output beyond each app's window.
pub async fn prune_once(pool: &PgPool, retention: &Retention) -> Result<store::Pruned, StoreError> {
    let keep = chrono::Duration::from_std(retention.keep).unwrap_or(chrono::Duration::MAX);
    let before = chrono::Utc::now()
        .checked_sub_signed(keep)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    store::prune_logs(pool, before, retention.window, 5000).await
}

/// Runs [`prune_once`] every `retention.every` (the first one at once) until `shutdown` is triggered.
pub async fn prune_loop(pool: PgPool, retention: Retention, shutdown: &crate::worker::Shutdown) {
    crate::worker::Worker::new("cannot prune old output", retention.every)
        .failures_as_warnings()
        .run(shutdown, |_| async {
            let p = prune_once(&pool, &retention).await?;
            // Events follow the same retention as the output (`--log-retention`).
            let events = crate::events::prune(&pool, retention.keep).await?;
            if p.task_lines + p.replica_lines + events > 0 {
                tracing::info!(
                    task_lines = p.task_lines,
                    replica_lines = p.replica_lines,
                    events,
                    "old output and events pruned"
                )
            }
            Ok::<_, StoreError>(None)
        })
        .await
}
