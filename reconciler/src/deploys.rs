//! The deploy lifecycle: what happens to a release between a node leasing one of its tasks and the
//! release being live, failed or superseded. The agent API's handlers authenticate, bound and translate;
//! the decisions are here, over the queue and the store, and come back as [`DeployError`] (never an HTTP
//! status).
//!
//! - **At lease time** ([`prepare`]): a deploy whose secrets are not sealed to the leasing node yet (it
//!   had not joined when the task was made, or joined again with another key) is sealed to its recipient
//!   and only the ciphertext is written back; with a registry, [`distribute`] decides where the image
//!   comes from. A task that cannot be made ready is failed, or buried when retrying cannot help.
//! - **Images** a node reports ([`checked_image`]) are recorded only when they are this control plane's
//!   registry, the release's own repository (`<registry>/<app>`) and a `sha256:` digest, since every other
//!   node pulls what is recorded; [`release_image`] records one and wakes the deploys waiting for it.
//! - **Results** ([`finish`]) tell a deploy that ran (`done`) from one the node skipped (`skipped`: its
//!   slot holds a newer generation); a skipped deploy ends `superseded` and never makes its release live,
//!   nor does a `done` from a node that already finished a newer generation for the slot. Once a
//!   release's deploys are all done it is live ([`release_outcome`]), or superseded if a release whose
//!   replicas ran later is live; as soon as one dies, it failed, and the hooks are told in the same
//!   transaction. Stage timings of a deploy that ran are kept on its release.
//!
//! What it must not do: answer HTTP or trust a node name it was not given by the caller (the caller
//! authenticated the node), hold a transaction across anything but Postgres, log a secret, or record
//! an image it did not check.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_proto::{
    DatabasePayload, DeployPayload, DeployedImage, MAX_MESSAGE_BYTES, Outcome, Registry, truncate,
};
use cairn_schema::{Identity, Name, Recipient};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::hooks::Hooks;
use crate::payload;
use crate::queue::{
    self, Backoff, FailOutcome, LeaseToken, LeasedTask, QueueError, TaskId, TaskKind, TaskRow,
    TaskStatus,
};
use crate::store::{Op as _, StoreError, releases};
use cairn_schema::error::chain as error_chain;

/// What the deploy lifecycle works with: the agent API's shared parts, borrowed per request.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub pool: &'a PgPool,
    /// The control plane's identity: seals secrets to nodes at lease time.
    pub identity: Option<&'a Identity>,
    /// Told when a release's deploy finished (commit statuses).
    pub hooks: Option<&'a dyn Hooks>,
    /// Wakes the reconciler (a release failed: the planner rolls its placements back).
    pub wake: &'a Notify,
    /// Where release images are distributed; `None`: each node builds what it lacks.
    pub registry: Option<&'a Registry>,
    /// Backoff of a task whose attempt failed.
    pub backoff: Backoff,
    /// How long a deploy held for another node's push waits, at most, before it is leased again.
    pub image_wait: Duration,
}

/// Why a deploy step did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// `token` is not the task's current lease: its lease expired and it was handed out again, or it
    /// already finished (or its slot moved and it was retired).
    #[error(
        "task {task} is not leased with token {token}: its lease expired and it was handed out again, \
         or it already finished"
    )]
    Stale { task: TaskId, token: LeaseToken },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl From<StoreError> for DeployError {
    fn from(e: StoreError) -> Self {
        DeployError::Queue(QueueError::Store(e))
    }
}

/// A reported image that is not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ImageRefused {
    /// Not this control plane's registry, or not the app's repository in it.
    #[error("{0}")]
    Foreign(String),
    /// Not an image reference a release can hold.
    #[error("{0}")]
    Malformed(String),
}

/// What a release records of a reported image: `(reference, digest)`, or the engine's id alone.
pub type RecordedImage<'i> = Option<(&'i str, Option<&'i str>)>;

/// What [`finish`] recorded: the task's status now, and when a failed one is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    pub status: TaskStatus,
    pub retry_at: Option<DateTime<Utc>>,
}

/// Whether tasks of `kind` run a release (and carry a [`DeployPayload`]).
pub fn carries_release(kind: TaskKind) -> bool {
    matches!(kind, TaskKind::Deploy | TaskKind::Start | TaskKind::Restart)
}

/// Makes leased tasks ready to hand to `node`: a task that carries a release gets its payload, its
/// secrets sealed to `recipient` and its image source decided. A task that cannot be made ready is
/// failed (or, when retrying cannot help, buried) with the reason, and one held back for another node's
/// push is given back; neither is returned.
pub async fn prepare(
    ctx: &Context<'_>,
    node: &Name,
    recipient: Option<&Recipient>,
    leased: Vec<LeasedTask>,
) -> Result<Vec<(LeasedTask, Option<DeployPayload>, Option<DatabasePayload>)>, DeployError> {
    let mut out = Vec::with_capacity(leased.len());
    for t in leased {
        if t.kind.is_database() {
            match crate::databases::ready(ctx.pool, ctx.identity, node, recipient, &t).await? {
                Ok(p) => out.push((t, None, Some(p))),
                Err((error, permanent)) => give_up(ctx, &t, &error, permanent).await?,
            }
            continue;
        }
        let deploy =
            if carries_release(t.kind) && t.payload.as_object().is_some_and(|o| !o.is_empty()) {
                match serde_json::from_value::<DeployPayload>(t.payload.clone()) {
                    Ok(mut p) => match ready(ctx, node, recipient, &t, &mut p).await? {
                        Ok(()) => {
                            if !distribute(ctx, node, &t, &mut p).await? {
                                continue;
                            }
                            Some(p)
                        }
                        Err((error, permanent)) => {
                            give_up(ctx, &t, &error, permanent).await?;
                            continue;
                        }
                    },
                    Err(e) => {
                        give_up(
                            ctx,
                            &t,
                            &format!("the task's payload is not a deploy payload: {e}"),
                            true,
                        )
                        .await?;
                        continue;
                    }
                }
            } else {
                None
            };
        out.push((t, deploy, None));
    }
    Ok(out)
}

/// Seals a payload's secrets to the node if they are not sealed to it yet, writing the ciphertext back.
/// `Err((why, permanent))` when they cannot be.
async fn ready(
    ctx: &Context<'_>,
    node: &Name,
    recipient: Option<&Recipient>,
    t: &LeasedTask,
    p: &mut DeployPayload,
) -> Result<Result<(), (String, bool)>, DeployError> {
    let Some(recipient) = recipient else {
        return Ok(Err((
            format!("node `{node}` has no recipient to encrypt secrets to: join it again"),
            false,
        )));
    };
    if !p.needs_encryption_for(recipient) {
        return Ok(Ok(()));
    }
    let sealed = {
        let mut conn = ctx.pool.acquire().await.op("read an app's env")?;
        payload::seal_payload(&mut conn, ctx.identity, p, node, recipient).await?
    };
    if let Err(e) = sealed {
        return Ok(Err((error_chain(&e), e.is_permanent())));
    }
    let json = serde_json::to_value(&*p).expect("a payload serializes");
    if !queue::set_payload(ctx.pool, t.id, t.token, &json).await? {
        return Ok(Err((
            "the lease ended while its secrets were sealed".into(),
            false,
        )));
    }
    tracing::debug!(%node, task = %t.id, "secrets sealed to the node at lease time");
    Ok(Ok(()))
}

/// Where a deploy gets its image, when serve distributes images through a registry: pulled by digest
/// once a node pushed it, for this release or any other of its build key (a release that changed only
/// env, replicas, plan or domains runs the image an earlier one pushed); otherwise this node gets it (its
/// own copy or a build) and pushes it, unless another node is doing that right now for a release of the
/// key, in which case the task goes back to the queue, without using an attempt, until the push is
/// recorded ([`release_image`] wakes it) or `image_wait` has passed.
/// Nodes without the Docker driver build their own. Returns whether the task is handed out now.
pub async fn distribute(
    ctx: &Context<'_>,
    node: &Name,
    t: &LeasedTask,
    p: &mut DeployPayload,
) -> Result<bool, DeployError> {
    let (Some(registry), Some(release)) = (ctx.registry, t.release) else {
        return Ok(true);
    };
    let mut tx = ctx.pool.begin().await.op("begin a deploy's image lease")?;
    let key = releases::ImageKey::of(&mut tx, &t.app, release).await?;
    releases::lock_image(&mut tx, &key).await?;
    let holders =
        releases::image_holders(&mut tx, &key, node, &registry.repository(&t.app)).await?;
    let (push_to, image) = match holders.pushed {
        _ if !holders.docker => (None, None),
        Some((reference, digest)) => (None, Some(cairn_proto::RegistryImage { reference, digest })),
        _ => match holders.pusher {
            Some(pusher) => {
                let held = queue::give_back(&mut *tx, t.id, t.token, ctx.image_wait).await?;
                tx.commit().await.op("commit a held deploy")?;
                if held {
                    tracing::info!(%node, task = %t.id, app = %t.app, release, %pusher, "deploy waits for another node to push the release's image");
                }
                return Ok(false);
            }
            None => (Some(registry.clone()), None),
        },
    };
    if (&p.push_to, &p.image) != (&push_to, &image) {
        p.push_to = push_to;
        p.image = image;
        let json = serde_json::to_value(&*p).expect("a payload serializes");
        if !queue::set_payload(&mut *tx, t.id, t.token, &json).await? {
            return Ok(false);
        }
    }
    tx.commit().await.op("commit a deploy's image lease")?;
    Ok(true)
}

async fn give_up(
    ctx: &Context<'_>,
    t: &LeasedTask,
    error: &str,
    permanent: bool,
) -> Result<(), DeployError> {
    tracing::warn!(node = %t.node, task = %t.id, app = %t.app, error, permanent, "a leased task cannot be handed out");
    if t.kind == TaskKind::DbUpgrade {
        // Its ledger row ends with it (a no-op for an upgrade that already ended).
        let final_ = permanent || t.attempt >= t.max_attempts;
        crate::databases::record_upgrade(ctx.pool, t.id.0, Err((error, final_))).await?;
    }
    if permanent {
        queue::bury(ctx.pool, t.id, t.token, error).await?;
    } else {
        match queue::fail(ctx.pool, t.id, t.token, error, &ctx.backoff).await {
            Ok(_) | Err(QueueError::StaleLease { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// An image a node reports for a release of `app`, as the release may record it: a registry image only
/// in this control plane's registry (`registry`), in the app's own repository (`<registry>/<app>`),
/// pinned by a `sha256:` digest, since every other node pulls it; anything else is refused, so one node
/// cannot make the others run an image of its choosing. The engine's own image id is kept only when it
/// is a `sha256:` digest (the process driver names a directory; that is not recorded).
pub fn checked_image<'i>(
    registry: Option<&Registry>,
    app: &Name,
    image: &'i DeployedImage,
) -> Result<RecordedImage<'i>, ImageRefused> {
    let sha256 = cairn_proto::registry::is_sha256_digest;
    match &image.registry {
        Some((reference, digest)) => {
            let Some(registry) = registry else {
                return Err(ImageRefused::Foreign(format!(
                    "release images of app `{app}` are not distributed through a registry here:                      a registry image cannot be recorded"
                )));
            };
            let repository = registry.repository(app);
            if *reference != repository {
                return Err(ImageRefused::Foreign(format!(
                    "a release image of app `{app}` must be in `{repository}`, not `{}`",
                    truncate(reference, 300)
                )));
            }
            if !sha256(digest) {
                return Err(ImageRefused::Malformed(format!(
                    "the image digest `{}` is not `sha256:` and 64 lowercase hex digits",
                    truncate(digest, 100)
                )));
            }
            Ok(Some((reference.as_str(), Some(digest.as_str()))))
        }
        None if sha256(&image.id) => Ok(Some((image.id.as_str(), None))),
        None => Ok(None),
    }
}

/// Records a task's progress (extending its lease to `lease_for` from now) and, when its node pushed the
/// release's image (`pushed`: app, release and the image as [`checked_image`] let it be recorded), the
/// image, so the other nodes' deploys pull it now, before this deploy ends. Returns the new lease
/// expiry.
pub async fn progress(
    ctx: &Context<'_>,
    task: TaskId,
    token: LeaseToken,
    message: Option<&str>,
    lease_for: Duration,
    pushed: Option<(Name, u64, RecordedImage<'_>)>,
) -> Result<DateTime<Utc>, DeployError> {
    let expires_at = queue::progress(ctx.pool, task, token, message, lease_for)
        .await?
        .ok_or(DeployError::Stale { task, token })?;
    if let Some((app, release, record)) = pushed {
        release_image(ctx, &app, release, record).await;
    }
    Ok(expires_at)
}

/// Records what a node reports about a task it holds (`row`, with the lease `token`): done, skipped or
/// failed, with what follows for the task's release (its image recorded or its waiters woken, its stage
/// timings, its outcome). `image` is the reported image as [`checked_image`] let it be recorded.
pub async fn finish(
    ctx: &Context<'_>,
    row: &TaskRow,
    token: LeaseToken,
    outcome: &Outcome,
    image: RecordedImage<'_>,
) -> Result<Reported, DeployError> {
    let node = &row.node;
    let task = row.id;
    let stale = |e: QueueError| match e {
        QueueError::StaleLease { .. } | QueueError::NotFound { .. } => {
            DeployError::Stale { task, token }
        }
        other => DeployError::Queue(other),
    };
    // What a backup or a verification read or wrote, or why it failed (and whether for good).
    let report = || match outcome {
        Outcome::Done {
            backup: Some(b), ..
        } => Ok(b),
        Outcome::Done { .. } => Err(("the agent reported no backup", true)),
        Outcome::Failed { error, retry } => {
            Err((error.as_str(), !*retry || row.attempts >= row.max_attempts))
        }
        Outcome::Skipped { .. } => Err(("skipped", true)),
    };
    if row.kind == TaskKind::DbBackup {
        let r = report();
        crate::databases::record_backup(ctx.pool, row.id.0, r).await?;
        if let Err((error, true)) = r {
            crate::databases::backup_failed(ctx.pool, &row.app, &row.node, error).await?;
        }
    }
    if row.kind == TaskKind::DbUpgrade {
        // Only the lease's holder moves the database onto the new instance.
        if !queue::holds_lease(ctx.pool, task, token).await? {
            return Err(DeployError::Stale { task, token });
        }
        let r = match outcome {
            Outcome::Done { detail, .. } => Ok(detail.as_deref()),
            Outcome::Failed { error, retry } => {
                Err((error.as_str(), !*retry || row.attempts >= row.max_attempts))
            }
            Outcome::Skipped { .. } => Err(("skipped", true)),
        };
        if crate::databases::record_upgrade(ctx.pool, row.id.0, r).await? {
            ctx.wake.notify_one();
        }
    }
    if row.kind == TaskKind::DbDrop && matches!(outcome, Outcome::Done { .. }) {
        crate::databases::record_drop(ctx.pool, row.id.0).await?;
    }
    if row.kind == TaskKind::DbVerify {
        crate::databases::record_verification(ctx.pool, row.id.0, &row.node, report()).await?;
    }
    let reported = match outcome {
        Outcome::Done {
            detail, timings, ..
        } => {
            // Recorded before the task is done: a node leasing a deploy of the release in between
            // pulls this image instead of becoming its second pusher. Only by the lease's holder.
            if let Some(release) = row.release.filter(|_| carries_release(row.kind)) {
                if !queue::holds_lease(ctx.pool, task, token).await? {
                    return Err(DeployError::Stale { task, token });
                }
                release_image(ctx, &row.app, release, image).await;
            }
            let status = queue::complete(ctx.pool, task, token)
                .await
                .map_err(stale)?;
            if status == TaskStatus::Superseded {
                tracing::warn!(%node, %task, "a task reported done after the node finished a newer one for its slot: recorded as superseded, not as run");
                Reported {
                    status: TaskStatus::Superseded,
                    retry_at: None,
                }
            } else {
                if let (TaskKind::Deploy, Some(release)) = (row.kind, row.release) {
                    stage_timings(ctx, &row.app, release, timings).await;
                }
                tracing::info!(%node, %task, detail = detail.as_deref().unwrap_or(""), "task done");
                Reported {
                    status: TaskStatus::Done,
                    retry_at: None,
                }
            }
        }
        Outcome::Skipped {
            detail,
            slot_generation,
        } => {
            let why = match slot_generation {
                Some(g) => format!("skipped: the slot holds generation {g}"),
                None => "skipped: the slot holds a newer generation".to_owned(),
            };
            queue::skip(ctx.pool, task, token, &why)
                .await
                .map_err(stale)?;
            tracing::info!(%node, %task, detail = detail.as_deref().map(|d| truncate(d, MAX_MESSAGE_BYTES)).unwrap_or(""), why, "task skipped by its node");
            Reported {
                status: TaskStatus::Superseded,
                retry_at: None,
            }
        }
        Outcome::Failed { error, retry } => {
            let error = truncate(error, MAX_MESSAGE_BYTES);
            tracing::warn!(%node, %task, error, retry, "task failed");
            if *retry {
                match queue::fail(ctx.pool, task, token, error, &ctx.backoff)
                    .await
                    .map_err(stale)?
                {
                    FailOutcome::Retry { run_after } => Reported {
                        status: TaskStatus::Failed,
                        retry_at: Some(run_after),
                    },
                    FailOutcome::Dead => Reported {
                        status: TaskStatus::Dead,
                        retry_at: None,
                    },
                }
            } else {
                if !queue::bury(ctx.pool, task, token, error).await? {
                    return Err(DeployError::Stale { task, token });
                }
                Reported {
                    status: TaskStatus::Dead,
                    retry_at: None,
                }
            }
        }
    };
    if reported.status == TaskStatus::Done {
        meter(ctx, row).await;
    }
    if let (Outcome::Failed { .. }, Some(release)) = (outcome, row.release)
        && carries_release(row.kind)
    {
        release_image(ctx, &row.app, release, None).await;
    }
    if let (TaskKind::Deploy, Some(release)) = (row.kind, row.release) {
        let died = match (outcome, reported.status) {
            (Outcome::Failed { error, .. }, TaskStatus::Dead) => Some(error.as_str()),
            _ => None,
        };
        // A superseded deploy may have been the release's last open one: the others decide.
        if matches!(reported.status, TaskStatus::Done | TaskStatus::Superseded) || died.is_some() {
            let node = died.is_some().then_some(node);
            release_outcome(ctx, &row.app, release, died, node).await?;
        }
    }
    Ok(reported)
}

/// Usage metering of a task reported done: a deploy, start or restart opens its slot's interval on the
/// node (a repeated or in-place one opens nothing more), a stop or remove closes it. A failure costs the
/// record (logged), never the result.
async fn meter(ctx: &Context<'_>, row: &TaskRow) {
    let by = format!("task {} ({})", row.id, row.kind.as_str());
    let done = match (row.kind, row.slot) {
        (TaskKind::Deploy | TaskKind::Start | TaskKind::Restart, Some(slot)) => {
            crate::store::usage::open(ctx.pool, row.app.as_str(), slot, row.node.as_str(), &by)
                .await
                .map(|_| ())
        }
        (TaskKind::Stop | TaskKind::Remove, slot) => crate::store::usage::close(
            ctx.pool,
            row.app.as_str(),
            slot,
            row.node.as_str(),
            None,
            &by,
        )
        .await
        .map(|_| ()),
        _ => Ok(()),
    };
    if let Err(e) = done {
        tracing::warn!(app = %row.app, node = %row.node, task = %row.id, error = %error_chain(&e), "cannot record usage of a finished task");
    }
}

/// Records a deploy's stage timings on its release (stages Cairn knows, at most a day each); a failure
/// costs only the metric, never the result.
async fn stage_timings(
    ctx: &Context<'_>,
    app: &Name,
    release: u64,
    timings: &BTreeMap<String, u64>,
) {
    const DAY_MS: u64 = 86_400_000;
    let known: serde_json::Map<String, serde_json::Value> = timings
        .iter()
        .filter(|(stage, ms)| {
            crate::metrics::STAGES.contains(&stage.as_str())
                && *stage != "release"
                && **ms <= DAY_MS
        })
        .map(|(stage, ms)| (stage.clone(), (*ms).into()))
        .collect();
    if known.is_empty() {
        return;
    }
    let known = serde_json::Value::Object(known);
    if let Err(e) =
        crate::store::metrics::record_stage_timings(ctx.pool, app.as_str(), release, &known).await
    {
        tracing::warn!(%app, release, error = %error_chain(&e), "cannot record a deploy's stage timings");
    }
}

/// Records the image a deploy (or a start or restart) ran on its release, when it reports one (checked by
/// [`checked_image`]): the registry's reference and digest once a node pushed it (or ran the one another
/// release of the build key pushed), else the engine's image id. Then, with a registry, wakes the
/// deploys of the releases of the build key that wait for a push
/// ([`distribute`]): they pull the image now recorded, or, if the deploy failed, one of them gets the
/// image itself. With a registry both happen under the release's image lock, so a deploy being held at
/// this moment is woken too. A failure costs the record or the wake (the waiters look again after
/// `image_wait`), never the result.
pub async fn release_image(ctx: &Context<'_>, app: &Name, release: u64, record: RecordedImage<'_>) {
    let done: Result<u64, StoreError> = async {
        if ctx.registry.is_none() {
            // Nothing is distributed, so nothing waits: the record alone, no lock.
            if let Some((reference, digest)) = record {
                releases::record_image(ctx.pool, app, release, reference, digest).await?;
            }
            return Ok(0);
        }
        let mut tx = ctx
            .pool
            .begin()
            .await
            .op("begin recording a release's image")?;
        let key = releases::ImageKey::of(&mut tx, app, release).await?;
        releases::lock_image(&mut tx, &key).await?;
        if let Some((reference, digest)) = record {
            releases::record_image(&mut *tx, app, release, reference, digest).await?;
        }
        let woken = releases::wake_image_waiters(&mut tx, &key).await?;
        tx.commit().await.op("commit a release's image")?;
        Ok(woken)
    }
    .await;
    match done {
        Ok(0) => {}
        Ok(n) => tracing::debug!(%app, release, tasks = n, "deploys waiting for the image woken"),
        Err(e) => {
            tracing::warn!(%app, release, error = %error_chain(&e), "cannot record a release's image or wake its waiting deploys");
        }
    }
}

/// After one of a release's deploy tasks finished: once none is open and none died, and at least one is
/// done (a replica ran it; superseded deploys never count), the release is live, or superseded if a
/// release whose replicas ran later is live ([`releases::finish_release`]); as soon as one dies (`died`:
/// its error), it failed. Recorded on the release and told to the hooks (the `cairn/deploy` commit
/// status) in one transaction, once per outcome.
pub async fn release_outcome(
    ctx: &Context<'_>,
    app: &Name,
    release: u64,
    died: Option<&str>,
    died_on: Option<&Name>,
) -> Result<(), DeployError> {
    let mut tx = ctx
        .pool
        .begin()
        .await
        .op("begin recording a release's outcome")?;
    let (done, open, dead) = queue::release_deploys(&mut tx, app, release).await?;
    let (ok, reason) = match died {
        Some(e) => (
            false,
            format!(
                "a replica's deploy failed: {}",
                truncate(e, MAX_MESSAGE_BYTES / 2)
            ),
        ),
        None if open == 0 && dead == 0 && done > 0 => {
            (true, format!("{done}/{done} replica deploy(s) done"))
        }
        None => return Ok(()),
    };
    let error = (!ok).then_some(reason.as_str());
    let mut live = None;
    let finished = releases::finish_release(&mut tx, app, release, ok, error).await?;
    let reason = match finished {
        releases::Finished::Superseded => {
            format!(
                "{reason}; a release deployed after it is live, so it is recorded as superseded"
            )
        }
        _ => reason,
    };
    if finished != releases::Finished::Unchanged {
        if finished == releases::Finished::Live {
            live = crate::store::metrics::release_timings(&mut tx, app.as_str(), release).await?;
        }
        tracing::info!(%app, release, ok, status = ?finished, reason, "release deploy finished");
        let event = outcome_event(&mut tx, app, release, ok, &reason, died_on).await?;
        crate::events::record(&mut tx, &[event]).await?;
        crate::hooks::record_deploy_outcome(
            ctx.hooks,
            &mut tx,
            &crate::hooks::DeployOutcome {
                app,
                release,
                ok,
                reason: &reason,
                push_to_running: None,
            },
        )
        .await;
    }
    tx.commit().await.op("commit a release's outcome")?;
    if !ok {
        // The planner moves the app's placements back to its live release (the automatic rollback), so
        // a replica of it that is lost later is repaired instead of the failed release retried.
        ctx.wake.notify_one();
    }
    if let Some((stages, secs)) = live {
        crate::metrics::global().release_live(&stages, secs);
    }
    Ok(())
}

/// The `deploy.succeeded` or `deploy.failed` event of a release's outcome: its source commit, why, on
/// which node a deploy died, and the time from the control plane first seeing the commit as its
/// branch's head (the push) to the outcome.
async fn outcome_event(
    tx: &mut sqlx::PgConnection,
    app: &Name,
    release: u64,
    ok: bool,
    reason: &str,
    died_on: Option<&Name>,
) -> Result<crate::events::NewEvent, DeployError> {
    use crate::events::{EventKind, NewEvent};
    let facts = crate::store::events::release_facts(tx, app.as_str(), release).await?;
    let secs = |s: Option<f64>| s.filter(|s| s.is_finite() && *s >= 0.0);
    let (commit, since_head, release_secs) = match &facts {
        Some(f) => (
            Some(f.source_commit.as_str()),
            secs(f.since_head_secs),
            secs(f.release_secs),
        ),
        None => (None, None, None),
    };
    let short = commit.map(crate::executor::short).unwrap_or("?");
    let (kind, message) = if ok {
        let after = since_head
            .map(|s| format!(" {s:.1}s after the push"))
            .unwrap_or_default();
        (
            EventKind::DeploySucceeded,
            format!("release #{release} of {app} (commit {short}) is running{after}"),
        )
    } else {
        (
            EventKind::DeployFailed,
            format!("release #{release} of {app} (commit {short}) failed: {reason}"),
        )
    };
    let mut e = NewEvent::new(kind, message)
        .app(app)
        .release(release)
        .detail(serde_json::json!({
            "reason": reason,
            "push_to_running_secs": if ok { since_head } else { None },
            "release_secs": release_secs,
        }));
    if let Some(c) = commit {
        e = e.commit(c);
    }
    if let Some(n) = died_on {
        e = e.node(n);
    }
    Ok(e)
}
