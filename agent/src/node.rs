//! The agent loop: join (or reuse the credential in the data directory), heartbeat, lease, run, report.
//!
//! - **Heartbeat** first, before any lease: a node coming back from a partition is told which of its
//!   replicas now run elsewhere, and stops them before it does anything else. Then every heartbeat
//!   interval, and at once after a task's result is reported (so the cluster route table learns of a
//!   replica that became healthy, or went away, without waiting for the interval), reporting what runs (the runner's view, with generations from the [`Book`]), what it uses,
//!   and the drivers on offer.
//! - **Lease** with a long-poll for as many tasks as there are free places (`--concurrency`), run each
//!   in its own task, extend its lease while it works (a third of the lease), stream its log lines, and
//!   report its result with the lease's fencing token. A task whose generation is older than what its slot
//!   holds is reported skipped without running: an older task never undoes a newer one, and is never
//!   counted as run.
//! - A result and a heartbeat never interleave: results are reported (and the book updated) under a
//!   shared gate that a heartbeat holds exclusively while it reads the node and sends its report, so the
//!   control plane never sees a report older than a result it already has (and so never "repairs" a
//!   replica that was just deployed).
//! - **Shutdown** (SIGTERM): stop leasing, let running tasks finish for the grace period, give back the
//!   leases of those that did not (they go to the next lease at once), and exit.
//!
//! What it must not do: run a task of another node (the control plane hands out only this node's), run a
//! task without reporting it, or log a credential, a token or a secret.

use std::sync::Arc;
use std::time::Duration;

use cairn_proto::{
    ActualReplica, Heartbeat, JoinRequest, LeaseRequest, LogBatch, Outcome, Progress, Resources,
    RunState, Task, TaskKind, TaskResult,
};
use cairn_schema::{Identity, Name};
use tokio::sync::{OwnedSemaphorePermit, RwLock, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::client::{Client, ClientError};
use crate::datadir::{Book, DataDir, DataError, Joined, PendingJoin, SlotRecord, SlotState};
use crate::logs::{LogLine, LogSink};
use cairn_schema::error::chain;

use crate::runner::{RunError, Runner, Work, replica_spec};

/// How long a stopping agent waits for the answer to the lease request it had in flight (tasks it
/// brings are given back at once).
const STOP_LEASE_ANSWER: Duration = Duration::from_secs(2);

/// The agent loop's knobs.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: String,
    /// Whether calls to the control planes go over HTTP/2.
    pub http2: crate::client::Http2,
    /// `None`: as often as the control plane asks.
    pub heartbeat: Option<Duration>,
    /// Tasks run at once.
    pub concurrency: usize,
    /// How long one lease request waits for tasks.
    pub lease_wait: Duration,
    /// How long running tasks may finish after SIGTERM before their leases are given back.
    pub shutdown_grace: Duration,
    pub agent_version: String,
    /// Where managed databases live on this node (`None`: database tasks fail, unsupported).
    pub databases: Option<crate::dbtasks::DatabaseHost>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "this node has no credential in {dir} and no join token: pass --join TOKEN or set \
         CAIRN_JOIN_TOKEN (`cairn node join-token NODE` makes one)"
    )]
    NoCredential { dir: String },
    #[error("joining the control plane failed")]
    Join(#[source] ClientError),
    #[error(
        "the control plane refused this node's credential: it was revoked, or the node was removed \
         from the configuration. Join again with a new token (`cairn node join-token NODE`)"
    )]
    Revoked,
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("the agent stopped before it could join")]
    Stopped,
}

/// Joins with `token`, or reuses the credential an earlier join left in the data directory. Transient
/// failures (the control plane starting, the network) are retried until `stop` turns true.
pub async fn join(
    data: &DataDir,
    identity: &Identity,
    cfg: &Config,
    drivers: &[cairn_schema::Driver],
    token: Option<&str>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Joined, AgentError> {
    if let Some(j) = data.credential()? {
        if token.is_some() {
            tracing::info!(node = %j.node, "using the credential of an earlier join; the join token is not needed");
        }
        return Ok(j);
    }
    // A join asked before whose answer never arrived (the agent stopped meanwhile) is asked again with
    // its credential, and its token unless a new one is given: the control plane answers the same.
    let pending = data.pending_join()?;
    let token = token
        .map(str::to_owned)
        .or_else(|| pending.as_ref().map(|p| p.token.clone()))
        .ok_or_else(|| AgentError::NoCredential {
            dir: data.path().display().to_string(),
        })?;
    let pending = PendingJoin {
        token,
        credential: pending.map_or_else(new_credential, |p| p.credential),
    };
    data.save_pending_join(&pending)?;
    let client = Client::with_http2(&cfg.server, cfg.http2).map_err(AgentError::Join)?;
    let req = JoinRequest {
        token: pending.token.clone(),
        recipient: identity.recipient(),
        drivers: drivers.to_vec(),
        agent_version: cfg.agent_version.clone(),
        credential: Some(pending.credential.clone()),
    };
    let mut backoff = Backoff::new();
    let resp = loop {
        match client.join(&req).await {
            Ok(r) => break r,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %chain(&e), "cannot join yet; retrying");
                if backoff.sleep(&e, stop).await {
                    return Err(AgentError::Stopped);
                }
            }
            Err(e) => return Err(AgentError::Join(e)),
        }
    };
    let joined = Joined {
        server: cfg.server.clone(),
        node: resp.node,
        credential: resp.credential,
        installation: resp.installation,
    };
    data.save_credential(&joined)?;
    data.forget_pending_join()?;
    tracing::info!(node = %joined.node, installation = %joined.installation, recipient = %identity.recipient(), "joined");
    Ok(joined)
}

/// A node credential of the agent's own making: the prefix and 64 hex digits of the kernel's randomness.
fn new_credential() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{}{}", cairn_proto::CREDENTIAL_PREFIX, hex::encode(bytes))
}

/// A joined agent.
#[derive(Debug)]
pub struct Agent {
    client: Client,
    joined: Joined,
    runner: Arc<dyn Runner>,
    book: Arc<Book>,
    cfg: Config,
    /// Held shared while reporting a result, exclusively while heartbeating.
    gate: RwLock<()>,
    /// Notified when a task's result is reported: what runs here changed, and the next heartbeat goes
    /// at once (the cluster route table follows the healthy replicas the heartbeats report).
    changed: tokio::sync::Notify,
}

impl Agent {
    /// The agent of the node `joined`, calling the control planes through `client` (holding the
    /// node's credential; its clones share its connections).
    pub fn new(
        client: Client,
        joined: Joined,
        runner: Arc<dyn Runner>,
        book: Arc<Book>,
        cfg: Config,
    ) -> Result<Arc<Self>, ClientError> {
        Ok(Arc::new(Agent {
            client,
            joined,
            runner,
            book,
            cfg,
            gate: RwLock::new(()),
            changed: tokio::sync::Notify::new(),
        }))
    }

    pub fn node(&self) -> &Name {
        &self.joined.node
    }

    /// Runs until `stop` turns true (then finishes or gives back what it holds), or until the control
    /// plane refuses the credential.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) -> Result<(), AgentError> {
        let (fatal_tx, fatal_rx) = watch::channel(false);
        // The first heartbeat comes before any lease.
        let mut interval = loop {
            match self.heartbeat().await {
                Ok(d) => break d,
                Err(ClientError::Unauthorized(_)) => return Err(AgentError::Revoked),
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "first heartbeat failed; retrying");
                    let mut stop = stop.clone();
                    if Backoff::new().sleep(&e, &mut stop).await {
                        return Ok(());
                    }
                }
            }
        };
        let heartbeats = tokio::spawn({
            let this = self.clone();
            let mut stop = stop.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = this.changed.notified() => {}
                        _ = raised(&mut stop) => return,
                    }
                    match this.heartbeat().await {
                        Ok(d) => interval = d,
                        Err(ClientError::Unauthorized(m)) => {
                            tracing::error!(message = %m, "the control plane refused this node's credential");
                            let _ = fatal_tx.send(true);
                            return;
                        }
                        Err(e) => tracing::warn!(error = %chain(&e), "heartbeat failed"),
                    }
                }
            }
        });
        let revoked = self.clone().lease_loop(stop, fatal_rx).await;
        heartbeats.abort();
        if revoked {
            Err(AgentError::Revoked)
        } else {
            Ok(())
        }
    }

    /// Sends one heartbeat and carries out its stop orders; returns the interval until the next one.
    async fn heartbeat(&self) -> Result<Duration, ClientError> {
        let resp = {
            let _exclusive = self.gate.write().await;
            let (replicas, resources) = self.actual().await;
            let hb = Heartbeat {
                agent_version: self.cfg.agent_version.clone(),
                drivers: self.runner.drivers(),
                resources,
                replicas,
            };
            self.client.heartbeat(&hb).await?
        };
        for s in &resp.stop {
            tracing::info!(app = %s.app, slot = s.slot, moved_to = ?s.moved_to, reason = %s.reason, "stopping a replica the control plane moved elsewhere");
            match self.runner.stop_now(&s.app, s.slot).await {
                Ok(()) => {
                    let rec = SlotRecord {
                        release: s.release,
                        generation: Some(s.generation),
                        state: SlotState::Removed,
                        limits: Resources::default(),
                    };
                    if let Err(e) = self.book.record(&s.app, s.slot, rec) {
                        tracing::warn!(error = %chain(&e), "cannot write the book");
                    }
                }
                Err(e) => {
                    tracing::warn!(app = %s.app, slot = s.slot, error = %chain(&e), "cannot stop a moved replica")
                }
            }
        }
        let asked = Duration::from_millis(resp.heartbeat_interval_ms.max(100));
        Ok(self.cfg.heartbeat.unwrap_or(asked))
    }

    /// What runs here, with the generations the book remembers, and what it uses.
    async fn actual(&self) -> (Vec<ActualReplica>, Resources) {
        let mut replicas = match self.runner.actual().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot list this node's replicas");
                Vec::new()
            }
        };
        let mut used = Resources::default();
        for r in &mut replicas {
            if let Some(rec) = self.book.get(&r.app, r.slot)
                && rec.release == r.release
            {
                r.generation = r.generation.or(rec.generation);
                if r.state == RunState::Running {
                    used.cpu_millis += rec.limits.cpu_millis;
                    used.memory_bytes += rec.limits.memory_bytes;
                    used.disk_bytes += rec.limits.disk_bytes;
                }
            }
        }
        (replicas, used)
    }

    /// Leases and runs tasks until told to stop; returns whether the credential was refused.
    async fn lease_loop(
        self: Arc<Self>,
        mut stop: watch::Receiver<bool>,
        mut fatal: watch::Receiver<bool>,
    ) -> bool {
        let slots = Arc::new(Semaphore::new(self.cfg.concurrency.max(1)));
        let (abandon_tx, abandon_rx) = watch::channel(false);
        let mut running = JoinSet::new();
        let mut backoff = Backoff::new();
        let mut revoked = false;
        loop {
            while running.try_join_next().is_some() {}
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = raised(&mut stop) => break,
                _ = raised(&mut fatal) => { revoked = true; break }
            };
            let free = 1 + slots.available_permits() as u32;
            let req = LeaseRequest {
                max: free,
                wait_ms: u64::try_from(self.cfg.lease_wait.as_millis()).unwrap_or(30_000),
            };
            let lease = self.client.lease(&req);
            tokio::pin!(lease);
            let leased = tokio::select! {
                r = &mut lease => r,
                _ = raised(&mut stop) => {
                    // The control plane may be handing out tasks this very instant (committed, the
                    // answer on its way): wait briefly for the answer and give back what it brings,
                    // rather than strand those tasks until their leases expire. An idle long-poll
                    // costs the shutdown this bound.
                    if let Ok(Ok(resp)) = tokio::time::timeout(STOP_LEASE_ANSWER, &mut lease).await {
                        for task in resp.tasks {
                            match self.client.release(task.id, task.token).await {
                                Ok(_) => tracing::info!(task = task.id, "stopping: lease given back unstarted"),
                                Err(e) => tracing::warn!(task = task.id, error = %chain(&e), "cannot give the lease back; it will expire"),
                            }
                        }
                    }
                    break;
                }
                _ = raised(&mut fatal) => { revoked = true; break }
            };
            match leased {
                Ok(resp) => {
                    backoff = Backoff::new();
                    let mut first = Some(first);
                    for task in resp.tasks {
                        let permit = match first.take() {
                            Some(p) => p,
                            None => match slots.clone().try_acquire_owned() {
                                Ok(p) => p,
                                // Cannot happen (we asked for no more than were free); give it back.
                                Err(_) => {
                                    let _ = self.client.release(task.id, task.token).await;
                                    continue;
                                }
                            },
                        };
                        running.spawn(self.clone().execute(task, permit, abandon_rx.clone()));
                    }
                }
                Err(ClientError::Unauthorized(m)) => {
                    tracing::error!(message = %m, "the control plane refused this node's credential");
                    revoked = true;
                    break;
                }
                Err(e) => {
                    drop(first);
                    tracing::warn!(error = %chain(&e), "lease failed");
                    if backoff.sleep(&e, &mut stop).await {
                        break;
                    }
                }
            }
        }
        while running.try_join_next().is_some() {}
        if !running.is_empty() {
            tracing::info!(tasks = running.len(), grace = ?self.cfg.shutdown_grace, "stopped leasing; waiting for running tasks");
            let drained = tokio::time::timeout(self.cfg.shutdown_grace, async {
                while running.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    tasks = running.len(),
                    "giving back the leases of unfinished tasks"
                );
                let _ = abandon_tx.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while running.join_next().await.is_some() {}
                })
                .await;
            }
        }
        revoked
    }

    /// Runs one leased task to its reported end, in a `task` span (id, kind, app, slot).
    async fn execute(
        self: Arc<Self>,
        task: Task,
        permit: OwnedSemaphorePermit,
        abandon: watch::Receiver<bool>,
    ) {
        let span = tracing::info_span!("task", id = task.id, kind = task.kind.as_str(), app = %task.app, slot = ?task.slot);
        self.execute_in_span(task, permit, abandon)
            .instrument(span)
            .await
    }

    async fn execute_in_span(
        self: Arc<Self>,
        task: Task,
        _permit: OwnedSemaphorePermit,
        mut abandon: watch::Receiver<bool>,
    ) {
        let (id, token) = (task.id, task.token);
        tracing::info!(task = id, kind = task.kind.as_str(), app = %task.app, slot = ?task.slot, release = ?task.release, generation = ?task.generation, attempt = task.attempt, "task started");
        let (lost_tx, mut lost) = watch::channel(false);
        let extender = tokio::spawn(extend(
            self.client.clone(),
            id,
            token,
            Duration::from_millis(task.lease_ms.max(1000)),
            lost_tx,
        ));
        let logs = TaskLogs::start(self.client.clone(), id, token);
        if task.kind.is_database() {
            // A database task acts on no replica slot: it runs, and its outcome is reported as is.
            let ran = tokio::select! {
                o = crate::dbtasks::run(self.cfg.databases.as_ref(), &task) => Some(o),
                _ = abandon.wait_for(|a| *a) => None,
                _ = lost.wait_for(|l| *l) => None,
            };
            logs.finish().await;
            extender.abort();
            match ran {
                Some(outcome) => {
                    let _shared = self.gate.read().await;
                    self.report(id, token, outcome).await;
                }
                None => {
                    if *abandon.borrow()
                        && let Err(e) = self.client.release(id, token).await
                    {
                        tracing::warn!(task = id, error = %chain(&e), "cannot give the lease back; it will expire");
                    }
                }
            }
            return;
        }
        let outcome = match self.work(&task) {
            Err(e) => Some(Err(e)),
            Ok(work) => match self.book.supersedes(&work.app, work.slot, work.generation) {
                Some(have) => Some(Ok((work, Some(have), Default::default()))),
                None => {
                    let ran = tokio::select! {
                        r = self.runner.run(&work, &logs) => Some(r),
                        _ = abandon.wait_for(|a| *a) => None,
                        _ = lost.wait_for(|l| *l) => None,
                    };
                    ran.map(|r| r.map(|ran| (work, None, ran)))
                }
            },
        };
        logs.finish().await;
        extender.abort();
        let Some(outcome) = outcome else {
            if *abandon.borrow() {
                match self.client.release(id, token).await {
                    Ok(_) => tracing::info!(task = id, "lease given back unfinished"),
                    Err(e) => {
                        tracing::warn!(task = id, error = %chain(&e), "cannot give the lease back; it will expire")
                    }
                }
            } else {
                tracing::warn!(
                    task = id,
                    "the lease was lost (it expired and the task went to another attempt); abandoned"
                );
            }
            return;
        };
        let _shared = self.gate.read().await;
        let result = match outcome {
            Ok((_, Some(have), _)) => {
                tracing::info!(
                    task = id,
                    slot_generation = have,
                    "task superseded by a newer generation; not run"
                );
                // Skipped, never "done": the release of a task that did not run must not count as
                // running here (a stale lease's late delivery would otherwise make it live).
                Outcome::Skipped {
                    detail: Some(format!("superseded: the slot holds generation {have}")),
                    slot_generation: Some(have),
                }
            }
            Ok((work, None, ran)) => {
                self.remember(&work);
                Outcome::Done {
                    detail: Some(format!("{} done", work.kind.as_str())),
                    timings: ran.timings,
                    image: ran.image,
                    backup: None,
                }
            }
            Err(e) => Outcome::Failed {
                error: chain(&e),
                retry: e.retry(),
            },
        };
        self.report(id, token, result).await;
    }

    /// The work a task describes.
    fn work(&self, task: &Task) -> Result<Work, RunError> {
        let slot = task.slot.ok_or_else(|| {
            RunError::Refused(crate::spec::SpecError::Invalid {
                field: "slot",
                why: "a task must name its replica slot".into(),
            })
        })?;
        let release = task.release.unwrap_or(0);
        let spec = match (&task.deploy, task.kind) {
            (Some(p), _) => Some(
                replica_spec(&self.joined.installation, &task.app, slot, release, p)
                    .map_err(RunError::Refused)?,
            ),
            (None, TaskKind::Deploy | TaskKind::Start | TaskKind::Restart) => {
                return Err(RunError::NoRelease(task.kind.as_str()));
            }
            (None, _) => None,
        };
        Ok(Work {
            task: task.id,
            kind: task.kind,
            app: task.app.clone(),
            slot,
            release,
            generation: task.generation,
            spec,
        })
    }

    /// Writes what a finished task left in its slot.
    fn remember(&self, w: &Work) {
        let limits = w.spec.as_ref().map_or_else(
            || {
                self.book
                    .get(&w.app, w.slot)
                    .map(|r| r.limits)
                    .unwrap_or_default()
            },
            |s| Resources {
                cpu_millis: u64::from(s.limits.cpu_millis),
                memory_bytes: s.limits.memory_bytes,
                disk_bytes: 0,
            },
        );
        let state = match w.kind {
            TaskKind::Deploy | TaskKind::Start | TaskKind::Restart => SlotState::Running,
            TaskKind::Stop => SlotState::Stopped,
            TaskKind::Remove => SlotState::Removed,
            // Database tasks never reach the book (they run before a slot is looked at).
            _ => return,
        };
        let rec = SlotRecord {
            release: w.release,
            generation: w.generation,
            state,
            limits,
        };
        if let Err(e) = self.book.record(&w.app, w.slot, rec) {
            tracing::warn!(error = %chain(&e), "cannot write the book");
        }
    }

    /// Reports a result, retrying while the control plane cannot be reached.
    async fn report(&self, id: i64, token: i64, outcome: Outcome) {
        let r = TaskResult { token, outcome };
        for attempt in 0..8u32 {
            match self.client.result(id, &r).await {
                Ok(resp) => {
                    tracing::info!(task = id, status = ?resp.status, "task reported");
                    self.changed.notify_one();
                    return;
                }
                Err(ClientError::Stale(m)) => {
                    tracing::warn!(task = id, message = %m, "result refused: the lease is no longer ours");
                    return;
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(task = id, error = %chain(&e), "cannot report yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250 << attempt.min(5))).await;
                }
                Err(e) => {
                    tracing::warn!(task = id, error = %chain(&e), "result refused");
                    return;
                }
            }
        }
        tracing::warn!(
            task = id,
            "giving up reporting; the lease will expire and the task run again"
        );
    }
}

/// Extends a lease every third of its length until aborted; flags `lost` when the control plane says the
/// lease is no longer ours.
async fn extend(client: Client, id: i64, token: i64, lease: Duration, lost: watch::Sender<bool>) {
    let every = (lease / 3).max(Duration::from_millis(300));
    loop {
        tokio::time::sleep(every).await;
        let p = Progress {
            token,
            message: None,
            image: None,
        };
        match client.progress(id, &p).await {
            Ok(_) => {}
            Err(ClientError::Stale(_)) | Err(ClientError::NotFound(_)) => {
                let _ = lost.send(true);
                return;
            }
            Err(e) => tracing::warn!(task = id, error = %chain(&e), "cannot extend the lease"),
        }
    }
}

/// A task's log lines on their way to the control plane, in batches.
struct TaskLogs {
    tx: mpsc::UnboundedSender<LogLine>,
    flusher: tokio::task::JoinHandle<()>,
    client: Client,
    id: i64,
    token: i64,
}

impl LogSink for TaskLogs {
    fn line(&self, line: LogLine) {
        let _ = self.tx.send(line);
    }

    fn image_pushed(&self, image: &cairn_proto::DeployedImage) {
        let (client, id) = (self.client.clone(), self.id);
        let p = Progress {
            token: self.token,
            message: Some("pushed the release's image".into()),
            image: Some(image.clone()),
        };
        // The result carries the image again: a progress call lost here costs the other nodes only
        // their wait for this deploy's end.
        tokio::spawn(async move {
            if let Err(e) = client.progress(id, &p).await {
                tracing::warn!(task = id, error = %chain(&e), "cannot report the pushed image yet");
            }
        });
    }
}

impl TaskLogs {
    fn start(client: Client, id: i64, token: i64) -> Self {
        let reporter = client.clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<LogLine>();
        let flusher = tokio::spawn(async move {
            let mut open = true;
            while open {
                let mut batch = Vec::new();
                let deadline = tokio::time::sleep(Duration::from_millis(500));
                tokio::pin!(deadline);
                while batch.len() < 200 {
                    tokio::select! {
                        l = rx.recv() => match l {
                            Some(l) => batch.push(l),
                            None => { open = false; break }
                        },
                        _ = &mut deadline => break,
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let lines = batch
                    .into_iter()
                    .map(|l| cairn_proto::LogLine {
                        stream: l.stream,
                        text: cairn_proto::truncate(&l.text, cairn_proto::MAX_LOG_LINE_BYTES)
                            .to_owned(),
                        at: chrono::DateTime::<chrono::Utc>::from(l.at),
                    })
                    .collect();
                if let Err(e) = client.logs(id, &LogBatch { token, lines }).await {
                    tracing::debug!(task = id, error = %chain(&e), "cannot send log lines");
                }
            }
        });
        TaskLogs {
            tx,
            flusher,
            client: reporter,
            id,
            token,
        }
    }

    /// Sends what is left.
    async fn finish(self) {
        drop(self.tx);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.flusher).await;
    }
}

/// Exponential backoff for calls that fail transiently: 200 ms doubling to 5 s, or what a 429 asks.
///
/// Each wait is drawn between half the step and the whole of it ("equal jitter"): when a control plane
/// restarts under thousands of agents, their retries spread over the step instead of arriving together
/// at 200 ms, 400 ms, 800 ms and so on, each wave a herd of new connections.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(200))
    }

    /// The next wait after `e`, and the step doubled.
    fn next_wait(&mut self, e: &ClientError) -> Duration {
        let wait = match e {
            // The control plane said how long: that, exactly.
            ClientError::TooMany(d) => *d,
            _ => {
                use rand::Rng as _;
                let half = self.0 / 2;
                half + half.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
            }
        };
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        wait
    }

    /// Sleeps; returns true when `stop` turned true meanwhile.
    async fn sleep(&mut self, e: &ClientError, stop: &mut watch::Receiver<bool>) -> bool {
        let wait = self.next_wait(e);
        tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = raised(stop) => true,
        }
    }
}

/// Resolves when the flag is raised; never, if its sender is gone without raising it.
async fn raised(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|f| *f).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable() -> ClientError {
        ClientError::Refused {
            status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
            message: String::new(),
        }
    }

    #[test]
    fn backoff_waits_spread_over_half_to_all_of_each_step_up_to_five_seconds() {
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut b = Backoff::new();
            let waits: Vec<Duration> = (0..8).map(|_| b.next_wait(&unavailable())).collect();
            for (wait, step) in waits
                .iter()
                .zip([200u64, 400, 800, 1600, 3200, 5000, 5000, 5000])
            {
                let step = Duration::from_millis(step);
                assert!(
                    *wait >= step / 2 && *wait <= step,
                    "{wait:?} for a step of {step:?}"
                );
            }
            firsts.insert(waits[0]);
        }
        // Two hundred agents refused at once do not all come back at the same instant.
        assert!(
            firsts.len() > 100,
            "only {} distinct first waits",
            firsts.len()
        );
    }

    #[test]
    fn a_429_is_waited_out_exactly_as_asked() {
        let mut b = Backoff::new();
        let asked = Duration::from_secs(3);
        assert_eq!(b.next_wait(&ClientError::TooMany(asked)), asked);
        assert_eq!(b.next_wait(&ClientError::TooMany(asked)), asked);
    }
}
