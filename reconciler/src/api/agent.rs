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
//!   and the placements becomes a repair task ([`crate::drift::repairs`]), enqueued after the answer
//!   (a heartbeat costs its one update and one read, whatever it reports).
//! - **Lease** long-polls up to 30 s for the node's own tasks. It waits on the in-memory listener, not on a
//!   database connection, and until the node's next task falls due by itself (an expiring lease, an
//!   ending backoff), so an idle node costs two queries per long-poll, not a poll every few seconds. What
//!   a leased deploy needs before it is handed out (secrets sealed to the node, where its image comes
//!   from) is [`crate::deploys::prepare`]'s; the handler counts the lease (`task_leased`).
//! - **Progress, logs, result, release** must carry the lease's fencing token; a stale token is 409 (a
//!   task the control plane retired because its slot moved is stale too). A task id that is not the
//!   caller's node's answers 404, as if it did not exist.
//! - **Results** and **images** go to the deploy lifecycle ([`crate::deploys`]: a skipped deploy ends
//!   `superseded`, a release is live only through deploys that ran); the handler checks a reported image
//!   first ([`crate::deploys::checked_image`]: anything but this control plane's registry, the release's
//!   own repository and a `sha256:` digest is refused, 403/400, and not recorded).
//!
//! The handlers authenticate, bound and translate (a [`crate::deploys::DeployError`] to its status);
//! they decide nothing about a release.
//!
//! What it must not do: trust a node name from a request body (the node is whoever the credential
//! belongs to), log a token, a credential or a secret, or hold a connection across a long-poll's wait.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use cairn_proto::routes::{MAX_ROUTES_WAIT_MS, RouteTable, RoutesQuery, SealedHopKey, TlsTable};
use cairn_schema::SecretError;

use crate::routes::Changed;
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
use crate::queue::{
    self, LeaseToken, LeasedTask, NewLogLine, NewTask, TaskId, TaskKind, TaskStatus,
};
use crate::store::Op as _;
use crate::store::nodes::{self, AuthNode, HeartbeatRecord, JoinOutcome, JoinRecord};
use crate::store::{placements, state};
use crate::{deploys, drift, payload};
use cairn_plan::observed::NodeState;
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
        .route("/routes", get(route_table))
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
        let Some(node) = nodes::node_by_credential(&api.pool, &credential_hash).await? else {
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
    let (credential, credential_hash) = match &req.credential {
        Some(c) if well_formed(c, CREDENTIAL_PREFIX) => (c.clone(), hash(c)),
        Some(_) => {
            return Err(ApiError::BadRequest(format!(
                "credential must be {CREDENTIAL_PREFIX} followed by 64 hex digits"
            )));
        }
        None => auth::new_credential(),
    };
    let outcome = nodes::join(
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
    // When the report was true at the latest (a task that finished after it makes it stale).
    let received = chrono::Utc::now();
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
    // One connection for the heartbeat's write and its read of the node's placements (each acquisition
    // is a round trip more, sqlx pinging a connection on its way back to the pool).
    let mut conn = api.pool.acquire().await.op("acquire a connection")?;
    // The heartbeat and, when it brings the node back, its `node.online` event commit together.
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .op("begin a heartbeat")?;
    let previous = nodes::record_heartbeat(
        &mut tx,
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
    if previous == NodeState::Offline {
        crate::events::record(&mut tx, &[crate::events::NewEvent::node_online(node)]).await?;
    }
    tx.commit().await.op("commit a heartbeat")?;
    let slots: Vec<(Name, u32)> = hb
        .replicas
        .iter()
        .map(|r| (r.app.clone(), r.slot))
        .collect();
    let placements = placements::placements_for(&mut conn, node, &slots).await?;
    drop(conn);
    // Usage metering's safety net, off the heartbeat's request path: its failure or a missing permit
    // costs at most a heartbeat interval of the record, never the heartbeat.
    if let Ok(permit) = api.usage_permits.clone().try_acquire_owned() {
        let (pool, node, replicas) = (api.pool.clone(), node.clone(), hb.replicas.clone());
        tokio::spawn(async move {
            let metered = async {
                let mut conn = pool.acquire().await.op("acquire a connection")?;
                crate::store::usage::open_reported(&mut conn, node.as_str(), &replicas).await
            };
            if let Err(e) = metered.await {
                tracing::warn!(%node, error = %error_chain(&e), "cannot record the usage of reported replicas");
            }
            drop(permit);
        });
    }
    tracing::debug!(%node, replicas = hb.replicas.len(), "heartbeat");
    let healthy: Vec<&Name> = hb
        .replicas
        .iter()
        .filter(|r| r.healthy && r.state == cairn_proto::RunState::Running)
        .map(|r| &r.app)
        .collect();
    if previous != NodeState::Online || api.routes.differs_for(node, &healthy) {
        api.routes.poke();
    }
    if previous != NodeState::Online
        && let Err(e) = crate::certs::node_online(&api.pool, &api.routes.certs_wake).await
    {
        // The certificates then wait out their backoff: not a reason to refuse the heartbeat.
        tracing::warn!(%node, error = %cairn_schema::error::chain(&e), "cannot retry the certificates waiting for DNS");
    }

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
    if !drift::repairs(node, &remaining, &placements, &[], None).is_empty() {
        repair_later(&api, node, remaining, received);
    }
    Ok(Json(HeartbeatResponse {
        node: node.clone(),
        stop,
        heartbeat_interval_ms: millis(api.cfg.heartbeat_interval),
    }))
}

/// The cluster route table, when its generation is not the one the agent holds or the agent does not
/// hold the current hop key (at once), or as soon as it changes within the wait; 204 when it did not.
async fn route_table(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Query(q): Query<RoutesQuery>,
) -> Result<Response, ApiError> {
    let node = &auth.node.node;
    let holds_key = q.key == api.hop_key.id();
    let recipient = auth.node.recipient.as_ref();
    // Certificates go only to a node with a recipient, from a control plane that can open them: without
    // either, the TLS table never counts as changed for this node.
    let can_seal = recipient.is_some() && api.identity.is_some();
    let held_tls = if can_seal {
        q.tls.clone()
    } else {
        api.routes.current_tls().generation.clone()
    };
    let changed = if holds_key {
        let wait = Duration::from_millis(q.wait_ms.min(MAX_ROUTES_WAIT_MS));
        match api
            .routes
            .changed_from(&q.generation, &held_tls, wait, api.stopped())
            .await
        {
            Some(c) => c,
            None => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    } else {
        let (table, tls) = (api.routes.current(), api.routes.current_tls());
        Changed {
            table: (table.generation != q.generation).then_some(table),
            tls: (tls.generation != held_tls && api.routes.tls_ready()).then_some(tls),
        }
    };
    let sealing = |e: SecretError| {
        tracing::error!(%node, error = %error_chain(&e), "cannot seal a key to the node");
        ApiError::Upstream("cannot seal a key to this node; try again".into())
    };
    let hop_key = match (recipient, holds_key) {
        (Some(r), false) => Some(api.hop_key.seal(r).map_err(sealing)?),
        _ => None,
    };
    // Certificates go only to a node that has a recipient, sealed by a control plane that can open them.
    let tls = match (changed.tls, recipient, api.identity.as_deref()) {
        (Some(source), Some(r), Some(identity)) => Some(source.seal(identity, r).map_err(sealing)?),
        _ => None,
    };
    tracing::debug!(%node, table = ?changed.table.as_ref().map(|t| &t.generation), tls = ?tls.as_ref().map(|t| &t.generation), key = hop_key.is_some(), "routes handed out");
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        table: Option<&'a RouteTable>,
        #[serde(skip_serializing_if = "Option::is_none")]
        hop_key: Option<SealedHopKey>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tls: Option<TlsTable>,
    }
    Ok(Json(Answer {
        table: changed.table.as_deref(),
        hop_key,
        tls,
    })
    .into_response())
}

/// Runs a node's drift repair after its heartbeat is answered: a repair waits for the apply lock (shared)
/// and writes tasks, which a heartbeat must not wait for (a node whose first deploy is not done needs one
/// on every heartbeat). One at a time per node: a heartbeat that finds its node's repair still running
/// leaves it; repairs are idempotent (dedup keys), and a failed one is tried again by the next heartbeat.
fn repair_later(
    api: &Arc<Api>,
    node: &Name,
    reported: Vec<ActualReplica>,
    received: chrono::DateTime<chrono::Utc>,
) {
    /// Takes the node off the running list however the repair ends.
    struct Running(Arc<Api>, Name);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0
                .repairing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.1);
        }
    }
    let Ok(permit) = api.repair_permits.clone().try_acquire_owned() else {
        return;
    };
    let started = api
        .repairing
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(node.clone());
    if !started {
        return;
    }
    let running = Running(api.clone(), node.clone());
    tokio::spawn(async move {
        let Running(api, node) = &running;
        if let Err(e) = repair(api, node, &reported, received).await {
            tracing::warn!(%node, error = %error_chain(&e), "cannot enqueue drift repairs");
        }
        drop(running);
        drop(permit);
    });
}

/// Enqueues the repairs that make `node` match its placements, under the apply lock (shared), so that the
/// placements and tasks read are not half-way through an apply. Returns how many were enqueued.
async fn repair(
    api: &Api,
    node: &Name,
    reported: &[ActualReplica],
    received: chrono::DateTime<chrono::Utc>,
) -> Result<usize, ApiError> {
    let mut tx = api.pool.begin().await.op("begin a drift repair")?;
    state::lock_apply_shared(&mut tx).await?;
    let slots: Vec<(Name, u32)> = reported.iter().map(|r| (r.app.clone(), r.slot)).collect();
    let placements = placements::placements_for(&mut tx, node, &slots).await?;
    let mut apps: Vec<Name> = placements
        .iter()
        .map(|p| p.app.clone())
        .chain(reported.iter().map(|r| r.app.clone()))
        .collect();
    apps.sort();
    apps.dedup();
    // The report was taken before the heartbeat arrived: a slot whose newest task finished since (a
    // deploy the report does not show yet) is left to the node's next report, or the repair would run
    // that task's work again. The tasks are read in one statement, so a task that finishes meanwhile is
    // seen either still open or finished with its time, never in between. (A second of slack for the
    // clocks of the control plane and the database.)
    let latest = queue::latest(&mut tx, node, &apps).await?;
    let taken = received - chrono::TimeDelta::seconds(1);
    let repairs = drift::repairs(node, reported, &placements, &latest, Some(taken));
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
    // One by one, so that only a repair that was not already queued (its dedup key) is announced.
    let mut events = Vec::new();
    for t in &tasks {
        if queue::enqueue(&mut tx, t).await?.is_none() {
            continue;
        }
        let Some(r) = repairs
            .iter()
            .find(|r| r.dedup_key == t.dedup_key && r.app == t.app)
        else {
            continue;
        };
        tracing::info!(%node, app = %r.app, slot = r.slot, kind = r.kind.as_str(), release = r.release, why = r.why, "drift: repair enqueued");
        events.push(
            crate::events::NewEvent::new(
                crate::events::EventKind::DriftRepaired,
                format!(
                    "drift on node {node}: {} replica {} gets a {} task ({})",
                    r.app,
                    r.slot,
                    r.kind.as_str(),
                    r.why
                ),
            )
            .app(&r.app)
            .node(node)
            .release(r.release)
            .detail(serde_json::json!({ "slot": r.slot, "task": r.kind.as_str(), "why": r.why })),
        );
    }
    crate::events::record(&mut tx, &events).await?;
    tx.commit().await.op("commit a drift repair")?;
    Ok(events.len())
}

#[tracing::instrument(name = "lease", skip_all, fields(node = %auth.node.node))]
async fn lease(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Json(req): Json<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let max = req.max.clamp(1, MAX_LEASE_TASKS);
    let wait = Duration::from_millis(req.wait_ms.min(MAX_LEASE_WAIT_MS));
    let deadline = Instant::now() + long_poll_wait(wait);
    let node = &auth.node.node;
    // Made before the first lease, so a commit between that lease and the wait still wakes it.
    let mut waiter = api.listener.waiter(node);
    loop {
        let leased = queue::lease(&api.pool, node, max, api.cfg.task_lease).await?;
        let metrics = crate::metrics::global();
        for t in &leased {
            metrics.task_leased(t.kind, t.waited);
        }
        let handed = leased.len();
        let ctx = deploys(&api);
        let recipient = auth.node.recipient.as_ref();
        let tasks: Vec<cairn_proto::Task> = deploys::prepare(&ctx, node, recipient, leased)
            .await?
            .into_iter()
            .map(|(t, deploy, database)| wire_task(&api, t, deploy, database))
            .collect();
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
        let wake_at = match queue::next_due(&api.pool, node).await? {
            // (At least 50 ms: a due task another long-poll of the node holds locked is not ours.)
            Some(d) => deadline.min(Instant::now() + d.max(Duration::from_millis(50))),
            None => deadline,
        };
        tracing::trace!(%node, wait = ?wake_at.saturating_duration_since(Instant::now()), "long-poll waiting");
        tokio::select! {
            w = waiter.wait() => tracing::trace!(%node, wake = ?w, "long-poll woken"),
            // Its wait is over and nothing woke it: no task was committed for the node and none fell due
            // before now (one would have set an earlier wake). The agent asks again at once, and that
            // lease sees what falls due from now: a last lease here would be one more query per empty
            // long-poll, a fifth of the database's work at 10,000 idle agents.
            _ = tokio::time::sleep_until(wake_at) => {
                if wake_at >= deadline {
                    return Ok(Json(LeaseResponse { tasks: Vec::new() }));
                }
                tracing::trace!(%node, "long-poll due");
            }
            _ = api.stopped() => return Ok(Json(LeaseResponse { tasks: Vec::new() })),
        }
    }
}

/// How long a long-poll asked to wait `wait` waits: up to an eighth less, at random. Agents that asked
/// at the same moment (all answered at once after a stall, say) would otherwise ask again together
/// every `wait`, a herd for good; each draw spreads them further.
fn long_poll_wait(wait: Duration) -> Duration {
    use rand::Rng as _;
    wait.saturating_sub(wait.mul_f64(rand::thread_rng().gen_range(0.0..0.125)))
}

/// The task `id` if it is `node`'s; 404 otherwise, whether it is another node's or nobody's.
async fn own(api: &Api, node: &Name, id: i64) -> Result<TaskId, ApiError> {
    match queue::node_of(&api.pool, TaskId(id)).await? {
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
    let t = queue::node_task(&api.pool, node, TaskId(id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node `{node}` has no task {id}")))?;
    Ok(Json(TaskView {
        id: t.id.0,
        kind: t.kind,
        app: t.app,
        slot: t.slot,
        status: t.status,
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
            let row = queue::node_task(&api.pool, &auth.node.node, task)
                .await?
                .filter(|row| deploys::carries_release(row.kind))
                .and_then(|row| row.release.map(|release| (row.app, release)));
            match row {
                Some((app, release)) => {
                    let record = deploys::checked_image(api.cfg.registry.as_ref(), &app, image)?;
                    Some((app, release, record))
                }
                None => None,
            }
        }
        None => None,
    };
    let expires_at = deploys::progress(
        &deploys(&api),
        task,
        LeaseToken(p.token),
        message,
        api.cfg.task_lease,
        pushed,
    )
    .await?;
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
    let stored = queue::append_logs(
        &api.pool,
        task,
        LeaseToken(batch.token),
        &lines,
        api.cfg.max_log_lines,
    )
    .await?
    .ok_or_else(|| stale(task, batch.token))?;
    if stored.lines > 0 {
        api.build_output.wake(&stored.app);
    }
    Ok(Json(LogsResponse {
        stored: stored.lines,
    }))
}

#[tracing::instrument(name = "task", skip_all, fields(task = id, node = %auth.node.node))]
async fn result(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Path(id): Path<i64>,
    Json(r): Json<TaskResult>,
) -> Result<Json<ResultResponse>, ApiError> {
    let node = &auth.node.node;
    let row = queue::node_task(&api.pool, node, TaskId(id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node `{node}` has no task {id}")))?;
    let token = LeaseToken(r.token);
    let image = match &r.outcome {
        Outcome::Done {
            image: Some(image), ..
        } if deploys::carries_release(row.kind) => {
            deploys::checked_image(api.cfg.registry.as_ref(), &row.app, image)?
        }
        _ => None,
    };
    let reported = deploys::finish(&deploys(&api), &row, token, &r.outcome, image).await?;
    Ok(Json(ResultResponse {
        status: reported.status,
        retry_at: reported.retry_at,
    }))
}

#[tracing::instrument(name = "task", skip_all, fields(task = id, node = %auth.node.node))]
async fn release(
    State(api): State<Arc<Api>>,
    auth: NodeAuth,
    Path(id): Path<i64>,
    Json(r): Json<Release>,
) -> Result<Json<ResultResponse>, ApiError> {
    let task = own(&api, &auth.node.node, id).await?;
    if !queue::give_back(&api.pool, task, LeaseToken(r.token), Duration::ZERO).await? {
        return Err(stale(task, r.token));
    }
    tracing::info!(node = %auth.node.node, %task, "task released unstarted");
    Ok(Json(ResultResponse {
        status: TaskStatus::Queued,
        retry_at: None,
    }))
}

/// The deploy lifecycle's view of the API's shared parts.
fn deploys(api: &Api) -> deploys::Context<'_> {
    deploys::Context {
        pool: &api.pool,
        identity: api.identity.as_deref(),
        hooks: api.hooks.as_deref(),
        wake: &api.wake,
        registry: api.cfg.registry.as_ref(),
        backoff: api.cfg.backoff,
        image_wait: api.cfg.image_wait,
    }
}

/// A leased task as its node gets it.
fn wire_task(
    api: &Api,
    t: LeasedTask,
    deploy: Option<DeployPayload>,
    database: Option<cairn_proto::DatabasePayload>,
) -> cairn_proto::Task {
    cairn_proto::Task {
        id: t.id.0,
        token: t.token.0,
        kind: t.kind,
        app: t.app,
        slot: t.slot,
        release: t.release,
        generation: t.generation,
        attempt: t.attempt,
        max_attempts: t.max_attempts,
        expires_at: t.expires_at,
        lease_ms: millis(api.cfg.task_lease),
        deploy,
        database,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_poll_waits_up_to_an_eighth_less_at_random() {
        let wait = Duration::from_secs(30);
        let waits: Vec<Duration> = (0..1000).map(|_| long_poll_wait(wait)).collect();
        assert!(
            waits.iter().all(|w| *w <= wait && *w >= wait - wait / 8),
            "every wait within [7/8, 1] of the asked one"
        );
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(
            distinct.len() > 990,
            "agents that asked together are spread"
        );
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(
            *max - *min > wait / 10,
            "over most of the eighth: {min:?}..{max:?}"
        );
        assert_eq!(long_poll_wait(Duration::ZERO), Duration::ZERO);
    }
}
