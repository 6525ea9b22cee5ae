//! The agent API (`/agent/v1`): join, heartbeat, lease, and a leased task's progress, logs, result and
//! release. The route table and the bodies are in `cairn-proto`.
//!
//! - **Join** exchanges a one-time token for the node's credential and records the age recipient the
//!   agent generated; a node whose manifest pins a recipient must join with that one (403 otherwise, and
//!   the token stays usable). A node that holds a live credential joins again only with a token made to
//!   replace it (`cairn node join-token NODE --replace`), and the join revokes the old one; any other
//!   token is refused (409, the token stays usable).
//! - **Heartbeat** records the node as online with what it runs, what that uses and which drivers it
//!   offers. A node coming back from offline is told to stop the replicas that were moved away meanwhile
//!   ([`crate::drift::stop_orders`]), and the reconciler is woken; any other difference between the report
//!   and the placements becomes a repair task ([`crate::drift::repairs`]).
//! - **Lease** long-polls up to 30 s for the node's own tasks. It waits on the in-memory listener, not on a
//!   database connection, and until the node's next task falls due by itself (an expiring lease, an
//!   ending backoff), so an idle node costs two queries per long-poll, not a poll every few seconds. A deploy task whose secrets are still to be sealed (the node had not joined
//!   when it was made, or joined again with another key since) is sealed to the node's recipient right
//!   then, and only the ciphertext is written back.
//! - **Progress, logs, result, release** must carry the lease's fencing token; a stale token is 409 (a
//!   task the control plane retired because its slot moved is stale too). A task id that is not the
//!   caller's node's answers 404, as if it did not exist.
//! - **Results** tell a deploy that ran (`done`) from one the node skipped (`skipped`: its slot holds a
//!   newer generation); a skipped deploy ends `superseded` and never makes its release live, nor does
//!   a `done` from a node that already finished a newer generation for the slot. A release is live only
//!   through deploys that ran, and never replaces a live release whose replicas ran later.
//! - **Images** a node reports are recorded only when they are this control plane's registry, the
//!   release's own repository (`<registry>/<app>`) and a `sha256:` digest; anything else is refused
//!   (403/400) and not recorded, since every other node pulls what is recorded.
//!
//! What it must not do: trust a node name from a request body (the node is whoever the credential
//! belongs to), log a token, a credential or a secret, or hold a connection across a long-poll's wait.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::routing::{get, post};
use cairn_proto::{
    ActualReplica, CREDENTIAL_PREFIX, DeployPayload, Heartbeat, HeartbeatResponse,
    JOIN_TOKEN_PREFIX, JoinRequest, JoinResponse, LeaseRequest, LeaseResponse, LogBatch,
    LogsResponse, MAX_LEASE_TASKS, MAX_LEASE_WAIT_MS, MAX_LOG_LINE_BYTES, MAX_LOG_LINES,
    MAX_MESSAGE_BYTES, Outcome, Progress, ProgressResponse, Release, ResultResponse, TaskResult,
    TaskView, truncate,
};
use cairn_schema::Name;
use tokio::time::Instant;

use super::auth::{self, bearer, hash, well_formed};
use super::{Api, ApiError, Json};
use crate::drift;
use crate::observed::NodeState;
use crate::payload;
use crate::queue::{
    self, FailOutcome, LeaseToken, LeasedTask, NewTask, TaskId, TaskKind, TaskStatus,
};
use crate::store::Op as _;
use crate::store::agents::{self, AuthNode, HeartbeatRecord, JoinOutcome, JoinRecord, NewLogLine};
use crate::store::releases;
use cairn_schema::error::chain as error_chain;

/// The most replicas one heartbeat may report.
pub const MAX_REPORTED_REPLICAS: usize = 10_000;

pub(super) fn routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/join", post(join))
        .route("/heartbeat", post(heartbeat))
        .route("/lease", post(lease))
        .route("/tasks/{id}", get(task))
        .route("/tasks/{id}/progress", post(progress))
        .route("/tasks/{id}/logs", post(logs))
        .route("/tasks/{id}/result", post(result))
        .route("/tasks/{id}/release", post(release))
}

/// The node a request's credential belongs to (401 otherwise), within its rate limit (429 otherwise).
#[derive(Debug)]
pub struct NodeAuth {
    pub node: AuthNode,
    pub credential_hash: String,
}

impl FromRequestParts<Arc<Api>> for NodeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, ApiError> {
        let client = api.client(parts);
        let credential_hash = bearer(&parts.headers)
            .filter(|t| well_formed(t, CREDENTIAL_PREFIX))
            .map(hash);
        api.admit(&client, credential_hash.as_deref())?;
        let Some(credential_hash) = credential_hash else {
            return Err(api.failed(&client));
        };
        let Some(node) = agents::node_by_credential(&api.pool, &credential_hash).await? else {
            return Err(api.failed(&client));
        };
        api.authenticated(&credential_hash);
        api.node_limit
            .check(node.node.as_str())
            .map_err(ApiError::TooMany)?;
        Ok(NodeAuth {
            node,
            credential_hash,
        })
    }
}

/// The client's address.
#[derive(Debug)]
pub struct Client(pub String);

impl FromRequestParts<Arc<Api>> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        api: &Arc<Api>,
    ) -> Result<Self, Self::Rejection> {
        Ok(Client(api.client(parts)))
    }
}

async fn join(
    State(api): State<Arc<Api>>,
    Client(client): Client,
    Json(req): Json<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    api.join_limit.check(&client).map_err(ApiError::TooMany)?;
    api.check_failures(&client)?;
    let invalid = || {
        let _ = api.failures.check(&client);
        ApiError::Unauthorized(
            "the join token is unknown, already used or expired: make a new one with `cairn node \
             join-token NODE`"
                .into(),
        )
    };
    if !well_formed(&req.token, JOIN_TOKEN_PREFIX) {
        return Err(invalid());
    }
    if req.drivers.is_empty() {
        return Err(ApiError::BadRequest(
            "an agent must offer at least one driver".into(),
        ));
    }
    if req.agent_version.is_empty() || req.agent_version.len() > 100 {
        return Err(ApiError::BadRequest(
            "agent_version must be 1 to 100 characters".into(),
        ));
    }
    let (credential, credential_hash) = auth::new_credential();
    let outcome = agents::join(
        &api.pool,
        &JoinRecord {
            token_hash: &hash(&req.token),
            credential_hash: &credential_hash,
            recipient: &req.recipient,
            drivers: &req.drivers,
            agent_version: &req.agent_version,
        },
    )
    .await?;
    match outcome {
        JoinOutcome::Joined { node, previous } => {
            tracing::info!(%node, recipient = %req.recipient, previous = ?previous, "an agent joined");
            api.authenticated(&credential_hash);
            api.wake.notify_one();
            Ok(Json(JoinResponse {
                node,
                credential,
                installation: api.cfg.installation.clone(),
                heartbeat_interval_ms: millis(api.cfg.heartbeat_interval),
            }))
        }
        JoinOutcome::InvalidToken => Err(invalid()),
        JoinOutcome::LiveCredential { node } => {
            tracing::warn!(%node, "a join was refused: the node holds a live credential");
            Err(ApiError::Conflict(format!(
                "node `{node}` already holds a live credential, so this join token cannot join it \
                 again: to replace that credential (it is revoked by the join), make a token with \
                 `cairn node join-token {node} --replace`, or revoke it first with `cairn node revoke \
                 {node}`"
            )))
        }
        JoinOutcome::RecipientMismatch { node, pinned } => {
            tracing::warn!(%node, %pinned, offered = %req.recipient, "a join was refused: recipient mismatch");
            Err(ApiError::Forbidden(format!(
                "node `{node}` pins the age recipient {pinned} in its manifest, but this agent's \
                 identity is {}: give the agent the pinned identity, or change the pin",
                req.recipient
            )))
        }
    }
}

async fn heartbeat(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Json(hb): Json<Heartbeat>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    if hb.replicas.len() > MAX_REPORTED_REPLICAS {
        return Err(ApiError::BadRequest(format!(
            "a heartbeat may report at most {MAX_REPORTED_REPLICAS} replicas"
        )));
    }
    if hb.agent_version.len() > 100 {
        return Err(ApiError::BadRequest(
            "agent_version must be at most 100 characters".into(),
        ));
    }
    let node = &auth.node.node;
    let previous = agents::record_heartbeat(
        &api.pool,
        node,
        &auth.credential_hash,
        &HeartbeatRecord {
            drivers: &hb.drivers,
            agent_version: &hb.agent_version,
            resources: &hb.resources,
            replicas: &hb.replicas,
        },
    )
    .await?
    .ok_or_else(ApiError::unauthorized)?;
    tracing::debug!(%node, replicas = hb.replicas.len(), "heartbeat");

    let slots: Vec<(Name, u32)> = hb
        .replicas
        .iter()
        .map(|r| (r.app.clone(), r.slot))
        .collect();
    let placements = {
        let mut conn = api.pool.acquire().await.op("read a node's placements")?;
        agents::placements_for(&mut conn, node, &slots).await?
    };
    let stop = if previous == NodeState::Offline {
        tracing::info!(%node, "node is back online");
        api.wake.notify_one();
        drift::stop_orders(node, &hb.replicas, &placements)
    } else {
        Vec::new()
    };
    for s in &stop {
        tracing::info!(%node, app = %s.app, slot = s.slot, moved_to = ?s.moved_to, "told a returning node to stop a duplicate");
    }
    let remaining: Vec<ActualReplica> = hb
        .replicas
        .iter()
        .filter(|r| !stop.iter().any(|s| s.app == r.app && s.slot == r.slot))
        .cloned()
        .collect();
    if !drift::repairs(node, &remaining, &placements, &[]).is_empty()
        && let Err(e) = repair(&api, node, &remaining).await
    {
        // The heartbeat is recorded; the next one tries the repair again.
        tracing::warn!(%node, error = %error_chain(&e), "cannot enqueue drift repairs");
    }
    Ok(Json(HeartbeatResponse {
        node: node.clone(),
        stop,
        heartbeat_interval_ms: millis(api.cfg.heartbeat_interval),
    }))
}

/// Enqueues the repairs that make `node` match its placements, under the apply lock (shared), so that the
/// placements and tasks read are not half-way through an apply. Returns how many were enqueued.
async fn repair(api: &Api, node: &Name, reported: &[ActualReplica]) -> Result<usize, ApiError> {
    let mut tx = api.pool.begin().await.op("begin a drift repair")?;
    agents::lock_apply_shared(&mut tx).await?;
    let slots: Vec<(Name, u32)> = reported.iter().map(|r| (r.app.clone(), r.slot)).collect();
    let placements = agents::placements_for(&mut tx, node, &slots).await?;
    let mut apps: Vec<Name> = placements
        .iter()
        .map(|p| p.app.clone())
        .chain(reported.iter().map(|r| r.app.clone()))
        .collect();
    apps.sort();
    apps.dedup();
    let latest = agents::latest_tasks(&mut tx, node, &apps).await?;
    let repairs = drift::repairs(node, reported, &placements, &latest);
    let mut tasks = Vec::with_capacity(repairs.len());
    for r in &repairs {
        let mut t = NewTask::new(node.clone(), r.kind, r.app.clone(), r.dedup_key.clone());
        t.slot = Some(r.slot);
        t.release = Some(r.release);
        t.generation = r.generation;
        if matches!(r.kind, TaskKind::Deploy | TaskKind::Start) {
            match payload::recorded_release(&mut tx, &r.app, r.release).await? {
                Some(p) => t.payload = serde_json::to_value(&p).expect("a payload serializes"),
                None => {
                    tracing::warn!(%node, app = %r.app, release = r.release, "drift: the release to repair is gone");
                    continue;
                }
            }
        }
        tasks.push(t);
    }
    let ids = queue::enqueue_many(&mut tx, &tasks).await?;
    tx.commit().await.op("commit a drift repair")?;
    if !ids.is_empty() {
        for r in &repairs {
            tracing::info!(%node, app = %r.app, slot = r.slot, kind = r.kind.as_str(), release = r.release, why = r.why, "drift: repair enqueued");
        }
    }
    Ok(ids.len())
}

#[tracing::instrument(name = "lease", skip_all, fields(node = %auth.node.node))]
async fn lease(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Json(req): Json<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let max = req.max.clamp(1, MAX_LEASE_TASKS);
    let wait = Duration::from_millis(req.wait_ms.min(MAX_LEASE_WAIT_MS));
    let deadline = Instant::now() + wait;
    let node = &auth.node.node;
    // Made before the first lease, so a commit between that lease and the wait still wakes it.
    let mut waiter = api.listener.waiter(node);
    loop {
        let leased = queue::lease(&api.pool, node, max, api.cfg.task_lease).await?;
        let handed = leased.len();
        let tasks = prepare(&api, &auth.node, leased).await?;
        if !tasks.is_empty() {
            for t in &tasks {
                tracing::debug!(%node, task = t.id, kind = t.kind.as_str(), app = %t.app, attempt = t.attempt, "task leased");
            }
            return Ok(Json(LeaseResponse { tasks }));
        }
        if handed > 0 {
            // Every task leased was unusable (and failed); look again at once.
            continue;
        }
        if Instant::now() >= deadline {
            return Ok(Json(LeaseResponse { tasks: Vec::new() }));
        }
        // New tasks wake the waiter; a task that becomes due by itself (a lease that expires, a backoff
        // that ends) is looked for when it does, not by polling.
        let wake_at = match agents::next_due(&api.pool, node).await? {
            // (At least 50 ms: a due task another long-poll of the node holds locked is not ours.)
            Some(d) => deadline.min(Instant::now() + d.max(Duration::from_millis(50))),
            None => deadline,
        };
        tracing::trace!(%node, wait = ?wake_at.saturating_duration_since(Instant::now()), "long-poll waiting");
        tokio::select! {
            w = waiter.wait() => tracing::trace!(%node, wake = ?w, "long-poll woken"),
            _ = tokio::time::sleep_until(wake_at) => tracing::trace!(%node, "long-poll due"),
            _ = api.stopped() => return Ok(Json(LeaseResponse { tasks: Vec::new() })),
        }
    }
}

/// Turns leased tasks into wire tasks, sealing secrets that still need it. A task that cannot be made
/// ready is failed (or, when retrying cannot help, ended) with the reason, and not handed out.
async fn prepare(
    api: &Api,
    node: &AuthNode,
    leased: Vec<LeasedTask>,
) -> Result<Vec<cairn_proto::Task>, ApiError> {
    let mut out = Vec::with_capacity(leased.len());
    for t in leased {
        let deploy =
            if carries_release(t.kind) && t.payload.as_object().is_some_and(|o| !o.is_empty()) {
                match serde_json::from_value::<DeployPayload>(t.payload.clone()) {
                    Ok(mut p) => match ready(api, node, &t, &mut p).await? {
                        Ok(()) => {
                            if !distribute(api, &node.node, &t, &mut p).await? {
                                continue;
                            }
                            Some(p)
                        }
                        Err((error, permanent)) => {
                            give_up(api, &t, &error, permanent).await?;
                            continue;
                        }
                    },
                    Err(e) => {
                        give_up(
                            api,
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
        out.push(cairn_proto::Task {
            id: t.id.0,
            token: t.token.0,
            kind: wire_kind(t.kind),
            app: t.app,
            slot: t.slot,
            release: t.release,
            generation: t.generation,
            attempt: t.attempt,
            max_attempts: t.max_attempts,
            expires_at: t.expires_at,
            lease_ms: millis(api.cfg.task_lease),
            deploy,
        });
    }
    Ok(out)
}

/// Whether tasks of `kind` run a release (and carry a [`DeployPayload`]).
fn carries_release(kind: TaskKind) -> bool {
    matches!(kind, TaskKind::Deploy | TaskKind::Start | TaskKind::Restart)
}

/// Seals a payload's secrets to the node if they are not sealed to it yet, writing the ciphertext back.
/// `Err((why, permanent))` when they cannot be.
async fn ready(
    api: &Api,
    node: &AuthNode,
    t: &LeasedTask,
    p: &mut DeployPayload,
) -> Result<Result<(), (String, bool)>, ApiError> {
    let Some(recipient) = &node.recipient else {
        return Ok(Err((
            format!(
                "node `{}` has no recipient to encrypt secrets to: join it again",
                node.node
            ),
            false,
        )));
    };
    if !p.needs_encryption_for(recipient) {
        return Ok(Ok(()));
    }
    let sealed = {
        let mut conn = api.pool.acquire().await.op("read an app's env")?;
        payload::seal_payload(&mut conn, api.identity.as_deref(), p, recipient).await?
    };
    if let Err(e) = sealed {
        return Ok(Err((error_chain(&e), e.is_permanent())));
    }
    let json = serde_json::to_value(&*p).expect("a payload serializes");
    if !agents::set_task_payload(&api.pool, t.id, t.token, &json).await? {
        return Ok(Err((
            "the lease ended while its secrets were sealed".into(),
            false,
        )));
    }
    tracing::debug!(node = %node.node, task = %t.id, "secrets sealed to the node at lease time");
    Ok(Ok(()))
}

/// Where a deploy gets its image, when serve distributes images through a registry: pulled by digest
/// once a node pushed it; otherwise this node gets it (its own copy or a build) and pushes it, unless
/// another node is doing that right now, in which case the task goes back to the queue, without using
/// an attempt, until the push is recorded ([`release_image`] wakes it) or `image_wait` has passed.
/// Nodes without the Docker driver build their own. Returns whether the task is handed out now.
async fn distribute(
    api: &Api,
    node: &Name,
    t: &LeasedTask,
    p: &mut DeployPayload,
) -> Result<bool, ApiError> {
    let (Some(registry), Some(release)) = (&api.cfg.registry, t.release) else {
        return Ok(true);
    };
    let mut tx = api.pool.begin().await.op("begin a deploy's image lease")?;
    releases::lock_image(&mut tx, &t.app, release).await?;
    let holders = releases::image_holders(&mut tx, &t.app, release, node).await?;
    let (push_to, image) = match holders.pushed {
        _ if !holders.docker => (None, None),
        Some((reference, digest)) if reference == registry.repository(&t.app) => {
            (None, Some(cairn_proto::RegistryImage { reference, digest }))
        }
        _ => match holders.pusher {
            Some(pusher) => {
                let held =
                    agents::release_task(&mut *tx, t.id, t.token, api.cfg.image_wait).await?;
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
        if !agents::set_task_payload(&mut *tx, t.id, t.token, &json).await? {
            return Ok(false);
        }
    }
    tx.commit().await.op("commit a deploy's image lease")?;
    Ok(true)
}

async fn give_up(api: &Api, t: &LeasedTask, error: &str, permanent: bool) -> Result<(), ApiError> {
    tracing::warn!(node = %t.node, task = %t.id, app = %t.app, error, permanent, "a leased task cannot be handed out");
    if permanent {
        agents::bury_task(&api.pool, t.id, t.token, error).await?;
    } else {
        match queue::fail(&api.pool, t.id, t.token, error, &api.cfg.backoff).await {
            Ok(_) | Err(queue::QueueError::StaleLease { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The task `id` if it is `node`'s; 404 otherwise, whether it is another node's or nobody's.
async fn own(api: &Api, node: &Name, id: i64) -> Result<TaskId, ApiError> {
    match agents::task_node(&api.pool, TaskId(id)).await? {
        Some(n) if &n == node => Ok(TaskId(id)),
        _ => Err(ApiError::NotFound(format!(
            "node `{node}` has no task {id}"
        ))),
    }
}

fn stale(id: TaskId, token: i64) -> ApiError {
    ApiError::Conflict(format!(
        "task {id} is not leased with token {token}: its lease expired and it was handed out again, \
         or it already finished"
    ))
}

async fn task(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Path(id): Path<i64>,
) -> Result<Json<TaskView>, ApiError> {
    let node = &auth.node.node;
    let t = agents::node_task(&api.pool, node, TaskId(id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node `{node}` has no task {id}")))?;
    Ok(Json(TaskView {
        id: t.id.0,
        kind: wire_kind(t.kind),
        app: t.app,
        slot: t.slot,
        status: wire_status(t.status),
        attempts: t.attempts,
        max_attempts: t.max_attempts,
        lease_token: t.lease_token.map(|t| t.0),
        lease_expires_at: t.lease_expires_at,
        progress: t.progress,
        last_error: t.last_error,
    }))
}

#[tracing::instrument(name = "task", skip_all, fields(task = id, node = %auth.node.node))]
async fn progress(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Path(id): Path<i64>,
    Json(p): Json<Progress>,
) -> Result<Json<ProgressResponse>, ApiError> {
    let task = own(&api, &auth.node.node, id).await?;
    let message = p.message.as_deref().map(|m| truncate(m, MAX_MESSAGE_BYTES));
    // A pushed image, checked before anything is recorded: a refused one changes nothing.
    let pushed = match &p.image {
        Some(image) => {
            let row = agents::node_task(&api.pool, &auth.node.node, task)
                .await?
                .filter(|row| carries_release(row.kind))
                .and_then(|row| row.release.map(|release| (row.app, release)));
            match row {
                Some((app, release)) => {
                    let record = checked_image(&api, &app, image)?;
                    Some((app, release, record))
                }
                None => None,
            }
        }
        None => None,
    };
    let expires_at = agents::record_progress(
        &api.pool,
        task,
        LeaseToken(p.token),
        message,
        api.cfg.task_lease,
    )
    .await?
    .ok_or_else(|| stale(task, p.token))?;
    // A pushed image, reported before the deploy ends: the other nodes' deploys pull it now.
    if let Some((app, release, record)) = pushed {
        release_image(&api, &app, release, record).await;
    }
    Ok(Json(ProgressResponse { expires_at }))
}

#[tracing::instrument(name = "task", skip_all, fields(task = id, node = %auth.node.node))]
async fn logs(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Path(id): Path<i64>,
    Json(batch): Json<LogBatch>,
) -> Result<Json<LogsResponse>, ApiError> {
    let task = own(&api, &auth.node.node, id).await?;
    if batch.lines.len() > MAX_LOG_LINES {
        return Err(ApiError::BadRequest(format!(
            "a log batch may hold at most {MAX_LOG_LINES} lines"
        )));
    }
    let lines: Vec<NewLogLine<'_>> = batch
        .lines
        .iter()
        .map(|l| NewLogLine {
            stream: l.stream.as_str(),
            line: truncate(&l.text, MAX_LOG_LINE_BYTES),
            at: l.at,
        })
        .collect();
    let stored = agents::append_logs(
        &api.pool,
        task,
        LeaseToken(batch.token),
        &lines,
        api.cfg.max_log_lines,
    )
    .await?
    .ok_or_else(|| stale(task, batch.token))?;
    Ok(Json(LogsResponse { stored }))
}

#[tracing::instrument(name = "task", skip_all, fields(task = id, node = %auth.node.node))]
async fn result(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Path(id): Path<i64>,
    Json(r): Json<TaskResult>,
) -> Result<Json<ResultResponse>, ApiError> {
    let node = &auth.node.node;
    let row = agents::node_task(&api.pool, node, TaskId(id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node `{node}` has no task {id}")))?;
    let task = row.id;
    let token = LeaseToken(r.token);
    let response = match &r.outcome {
        Outcome::Done {
            detail,
            timings,
            image,
        } => {
            let image: RecordedImage<'_> = match image {
                Some(i) if carries_release(row.kind) => checked_image(&api, &row.app, i)?,
                _ => None,
            };
            // Recorded before the task is done: a node leasing a deploy of the release in between
            // pulls this image instead of becoming its second pusher. Only by the lease's holder.
            if let Some(release) = row.release.filter(|_| carries_release(row.kind)) {
                if !agents::holds_lease(&api.pool, task, token).await? {
                    return Err(stale(task, r.token));
                }
                release_image(&api, &row.app, release, image).await;
            }
            let status = queue::complete(&api.pool, task, token)
                .await
                .map_err(|e| conflict_or(e, task, r.token))?;
            if status == TaskStatus::Superseded {
                tracing::warn!(%node, %task, "a task reported done after the node finished a newer one for its slot: recorded as superseded, not as run");
                ResultResponse {
                    status: cairn_proto::TaskStatus::Superseded,
                    retry_at: None,
                }
            } else {
                if let (TaskKind::Deploy, Some(release)) = (row.kind, row.release) {
                    stage_timings(&api, &row.app, release, timings).await;
                }
                tracing::info!(%node, %task, detail = detail.as_deref().unwrap_or(""), "task done");
                ResultResponse {
                    status: cairn_proto::TaskStatus::Done,
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
            queue::skip(&api.pool, task, token, &why)
                .await
                .map_err(|e| conflict_or(e, task, r.token))?;
            tracing::info!(%node, %task, detail = detail.as_deref().map(|d| truncate(d, MAX_MESSAGE_BYTES)).unwrap_or(""), why, "task skipped by its node");
            ResultResponse {
                status: cairn_proto::TaskStatus::Superseded,
                retry_at: None,
            }
        }
        Outcome::Failed { error, retry } => {
            let error = truncate(error, MAX_MESSAGE_BYTES);
            tracing::warn!(%node, %task, error, retry, "task failed");
            if *retry {
                match queue::fail(&api.pool, task, token, error, &api.cfg.backoff)
                    .await
                    .map_err(|e| conflict_or(e, task, r.token))?
                {
                    FailOutcome::Retry { run_after } => ResultResponse {
                        status: cairn_proto::TaskStatus::Failed,
                        retry_at: Some(run_after),
                    },
                    FailOutcome::Dead => ResultResponse {
                        status: cairn_proto::TaskStatus::Dead,
                        retry_at: None,
                    },
                }
            } else {
                if !agents::bury_task(&api.pool, task, token, error).await? {
                    return Err(stale(task, r.token));
                }
                ResultResponse {
                    status: cairn_proto::TaskStatus::Dead,
                    retry_at: None,
                }
            }
        }
    };
    if let (Outcome::Failed { .. }, Some(release)) = (&r.outcome, row.release)
        && carries_release(row.kind)
    {
        release_image(&api, &row.app, release, None).await;
    }
    if let (TaskKind::Deploy, Some(release)) = (row.kind, row.release) {
        let died = match (&r.outcome, response.status) {
            (Outcome::Failed { error, .. }, cairn_proto::TaskStatus::Dead) => Some(error.as_str()),
            _ => None,
        };
        // A superseded deploy may have been the release's last open one: the others decide.
        if matches!(
            response.status,
            cairn_proto::TaskStatus::Done | cairn_proto::TaskStatus::Superseded
        ) || died.is_some()
        {
            release_outcome(&api, &row.app, release, died).await?;
        }
    }
    Ok(Json(response))
}

/// An image a node reports for a release of `app`, as the release may record it: a registry image only
/// in this control plane's registry, in the app's own repository (`<registry>/<app>`), pinned by a
/// `sha256:` digest, since every other node pulls it; anything else is refused (403), so one node
/// cannot make the others run an image of its choosing. The engine's own image id is kept only when it
/// is a `sha256:` digest (the process driver names a directory; that is not recorded).
fn checked_image<'i>(
    api: &Api,
    app: &Name,
    image: &'i cairn_proto::DeployedImage,
) -> Result<RecordedImage<'i>, ApiError> {
    let sha256 = cairn_proto::registry::is_sha256_digest;
    match &image.registry {
        Some((reference, digest)) => {
            let Some(registry) = &api.cfg.registry else {
                return Err(ApiError::Forbidden(format!(
                    "release images of app `{app}` are not distributed through a registry here:                      a registry image cannot be recorded"
                )));
            };
            let repository = registry.repository(app);
            if *reference != repository {
                return Err(ApiError::Forbidden(format!(
                    "a release image of app `{app}` must be in `{repository}`, not `{}`",
                    truncate(reference, 300)
                )));
            }
            if !sha256(digest) {
                return Err(ApiError::BadRequest(format!(
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

/// What a release records of a reported image: `(reference, digest)`, or the engine's id alone.
type RecordedImage<'i> = Option<(&'i str, Option<&'i str>)>;

/// Records a deploy's stage timings on its release (stages Cairn knows, at most a day each); a failure
/// costs only the metric, never the result.
async fn stage_timings(
    api: &Api,
    app: &Name,
    release: u64,
    timings: &std::collections::BTreeMap<String, u64>,
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
        crate::store::metrics::record_stage_timings(&api.pool, app.as_str(), release, &known).await
    {
        tracing::warn!(%app, release, error = %error_chain(&e), "cannot record a deploy's stage timings");
    }
}

/// Records the image a deploy (or a start or restart) ran on its release, when it reports one (checked by
/// [`checked_image`]): the registry's reference and digest once a node pushed it, else the engine's
/// image id. Then, with a registry, wakes the deploys of the release that wait for a push
/// ([`distribute`]): they pull the image now recorded, or, if the deploy failed, one of them gets the
/// image itself. With a registry both happen under the release's image lock, so a deploy being held at
/// this moment is woken too. A failure costs the record or the wake (the waiters look again after
/// `image_wait`), never the result.
async fn release_image(api: &Api, app: &Name, release: u64, record: RecordedImage<'_>) {
    let done: Result<u64, crate::store::StoreError> = async {
        if api.cfg.registry.is_none() {
            // Nothing is distributed, so nothing waits: the record alone, no lock.
            if let Some((reference, digest)) = record {
                releases::record_image(&api.pool, app, release, reference, digest).await?;
            }
            return Ok(0);
        }
        let mut tx = api
            .pool
            .begin()
            .await
            .op("begin recording a release's image")?;
        releases::lock_image(&mut tx, app, release).await?;
        if let Some((reference, digest)) = record {
            releases::record_image(&mut *tx, app, release, reference, digest).await?;
        }
        let woken = releases::wake_image_waiters(&mut tx, app, release).await?;
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
/// release whose replicas ran later is live ([`agents::finish_release`]); as soon as one dies, it failed. Recorded on the release and told to the hooks (the `cairn/deploy`
/// commit status) in one transaction, once per outcome.
async fn release_outcome(
    api: &Api,
    app: &Name,
    release: u64,
    died: Option<&str>,
) -> Result<(), ApiError> {
    let mut tx = api
        .pool
        .begin()
        .await
        .op("begin recording a release's outcome")?;
    let (done, open, dead) = agents::release_deploys(&mut tx, app, release).await?;
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
    let finished = agents::finish_release(&mut tx, app, release, ok, error).await?;
    let reason = match finished {
        agents::Finished::Superseded => {
            format!(
                "{reason}; a release deployed after it is live, so it is recorded as superseded"
            )
        }
        _ => reason,
    };
    if finished != agents::Finished::Unchanged {
        if finished == agents::Finished::Live {
            live = crate::store::metrics::release_timings(&mut tx, app.as_str(), release).await?;
        }
        tracing::info!(%app, release, ok, status = ?finished, reason, "release deploy finished");
        crate::hooks::record_deploy_outcome(
            api.hooks.as_deref(),
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
        api.wake.notify_one();
    }
    if let Some((stages, secs)) = live {
        crate::metrics::global().release_live(&stages, secs);
    }
    Ok(())
}

#[tracing::instrument(name = "task", skip_all, fields(task = id, node = %auth.node.node))]
async fn release(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Path(id): Path<i64>,
    Json(r): Json<Release>,
) -> Result<Json<ResultResponse>, ApiError> {
    let task = own(&api, &auth.node.node, id).await?;
    if !agents::release_task(&api.pool, task, LeaseToken(r.token), Duration::ZERO).await? {
        return Err(stale(task, r.token));
    }
    tracing::info!(node = %auth.node.node, %task, "task released unstarted");
    Ok(Json(ResultResponse {
        status: cairn_proto::TaskStatus::Queued,
        retry_at: None,
    }))
}

fn conflict_or(e: queue::QueueError, task: TaskId, token: i64) -> ApiError {
    match e {
        queue::QueueError::StaleLease { .. } | queue::QueueError::NotFound { .. } => {
            stale(task, token)
        }
        other => other.into(),
    }
}

fn wire_kind(k: TaskKind) -> cairn_proto::TaskKind {
    match k {
        TaskKind::Deploy => cairn_proto::TaskKind::Deploy,
        TaskKind::Stop => cairn_proto::TaskKind::Stop,
        TaskKind::Start => cairn_proto::TaskKind::Start,
        TaskKind::Restart => cairn_proto::TaskKind::Restart,
        TaskKind::Remove => cairn_proto::TaskKind::Remove,
    }
}

fn wire_status(s: TaskStatus) -> cairn_proto::TaskStatus {
    match s {
        TaskStatus::Queued => cairn_proto::TaskStatus::Queued,
        TaskStatus::Leased => cairn_proto::TaskStatus::Leased,
        TaskStatus::Done => cairn_proto::TaskStatus::Done,
        TaskStatus::Failed => cairn_proto::TaskStatus::Failed,
        TaskStatus::Dead => cairn_proto::TaskStatus::Dead,
        TaskStatus::Superseded => cairn_proto::TaskStatus::Superseded,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
