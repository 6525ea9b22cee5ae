//! The agent task queue: tasks are enqueued in the transaction that changes the state they follow from,
//! leased by a node's agent with an expiring lease and a fencing token, and completed or failed with that
//! token. Delivery is at least once; agents make every task idempotent.
//!
//! - [`enqueue`] takes the caller's transaction: state and tasks commit together or not at all. A task's
//!   `dedup_key` is unique, so the same task is never enqueued twice (two appliers racing on a commit
//!   emit each task once).
//! - [`lease`] hands out up to `n` tasks of a node that may run now (`FOR UPDATE SKIP LOCKED`: concurrent
//!   leasers never wait for or duplicate each other), each with a fresh token from an increasing sequence
//!   and an expiry. A lease that expires is handed out again, with a new token.
//! - [`complete`], [`fail`] and [`extend`] refuse a token that is not the task's current lease
//!   ([`QueueError::StaleLease`]): an agent that stalled past its lease cannot finish a task that was
//!   handed to someone else. (A token whose lease expired but was not handed out again is still current:
//!   nobody else has the task, so its result is accepted.)
//! - A failed attempt is retried after an exponential [`Backoff`]; after `max_attempts` the task is dead
//!   and stays for an operator to look at.
//! - [`Listener`] holds one LISTEN connection for the process and wakes the waiters of a node when its
//!   tasks are committed; waiters also wake every poll interval, which covers lost notifications and
//!   tasks whose backoff or lease ran out.
//!
//! - A task's holder reports [`progress`] (which extends the lease), appends [`append_logs`], gives it
//!   back unstarted ([`give_back`]) or ends it at once as dead ([`bury`]); the agent API reads a node's
//!   own tasks ([`node_task`], [`node_of`]) and when the next one falls due ([`next_due`]).
//!
//! The module is the queue's types and API; `sql` holds every statement of its life (the shape of
//! the Rust registry server's `crates_io_worker` `storage.rs`). Metrics are the callers': a lease is
//! counted by whoever hands it out.
//!
//! What it must not do: run SQL outside `sql`, record metrics, hold a transaction or a connection
//! while an agent works on a task, or read a clock other than the database's for leases and backoff.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_schema::Name;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgExecutor, PgPool, Postgres, Transaction};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::store::StoreError;

mod sql;

/// A task's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub i64);

/// A lease's fencing token: unique, and larger for every later lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseToken(pub i64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What an agent is told to do with a replica slot, and where a task is in its life: the wire's
/// vocabulary (`cairn-proto`), which the `tasks` columns hold by the same names.
pub use cairn_proto::{TaskKind, TaskStatus};

/// The queue's kind of a planned task.
pub fn task_kind(action: cairn_plan::TaskAction) -> TaskKind {
    use cairn_plan::TaskAction;
    match action {
        TaskAction::Deploy => TaskKind::Deploy,
        TaskAction::Start => TaskKind::Start,
        TaskAction::Restart => TaskKind::Restart,
        TaskAction::Stop => TaskKind::Stop,
        TaskAction::Remove => TaskKind::Remove,
    }
}

/// A task to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub node: Name,
    pub kind: TaskKind,
    pub app: Name,
    pub slot: Option<u32>,
    pub release: Option<u64>,
    /// The config generation that emitted it.
    pub generation: Option<u64>,
    /// What the agent needs. Secrets only as age ciphertexts to the node's own recipient.
    pub payload: serde_json::Value,
    /// Unique per task: enqueueing a second task with the same key does nothing.
    pub dedup_key: String,
    pub max_attempts: u32,
}

impl NewTask {
    /// Attempts a task gets unless the caller says otherwise.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

    /// A task with no slot, release, generation or payload, and the default attempts.
    pub fn new(node: Name, kind: TaskKind, app: Name, dedup_key: impl Into<String>) -> NewTask {
        NewTask {
            node,
            kind,
            app,
            slot: None,
            release: None,
            generation: None,
            payload: serde_json::Value::Object(Default::default()),
            dedup_key: dedup_key.into(),
            max_attempts: NewTask::DEFAULT_MAX_ATTEMPTS,
        }
    }
}

/// A task handed to an agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeasedTask {
    pub id: TaskId,
    /// Present it to complete, fail or extend the lease.
    pub token: LeaseToken,
    pub node: Name,
    pub kind: TaskKind,
    pub app: Name,
    pub slot: Option<u32>,
    pub release: Option<u64>,
    pub generation: Option<u64>,
    pub payload: serde_json::Value,
    /// 1 for the first lease.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Past this (database time) the task may be handed to another worker.
    pub expires_at: DateTime<Utc>,
    /// How long the task had been due (enqueued, or its backoff or expired lease over) when leased.
    pub waited: Duration,
}

/// A task's queue state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskState {
    pub status: TaskStatus,
    pub attempts: u32,
    pub max_attempts: u32,
    pub lease_token: Option<LeaseToken>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The earliest time it may be leased (again).
    pub run_after: DateTime<Utc>,
    pub last_error: Option<String>,
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
    /// When it ended (done, dead or superseded), by the database's clock.
    pub finished_at: Option<DateTime<Utc>>,
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

/// What [`append_logs`] stored: how many lines, of which app's task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub lines: u32,
    pub app: String,
}

/// A log line to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLogLine<'a> {
    pub stream: &'a str,
    pub line: &'a str,
    pub at: DateTime<Utc>,
}

/// How long a failed task waits before its next attempt: `base`, doubled per failed attempt, at most
/// `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(5),
            max: Duration::from_secs(10 * 60),
        }
    }
}

impl Backoff {
    /// The wait after the `attempt`-th attempt (1-based) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// What [`fail`] did with the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Leased again from `run_after` on.
    Retry { run_after: DateTime<Utc> },
    /// That was its last allowed attempt.
    Dead,
}

/// Ids sorted by what [`complete_many`] (or [`complete_and_lease`]) did with them, each in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completed {
    pub done: Vec<TaskId>,
    /// Ended `superseded`, as [`complete`] ends a task whose node already finished a newer generation's
    /// task for the same slot.
    pub superseded: Vec<TaskId>,
    /// Not completed: the token was not the task's current lease (or no such task).
    pub stale: Vec<TaskId>,
}

impl Completed {
    fn sort(leases: &[(TaskId, LeaseToken)], ended: Vec<(TaskId, TaskStatus)>) -> Completed {
        let mut out = Completed::default();
        let ended: HashMap<TaskId, TaskStatus> = ended.into_iter().collect();
        let mut asked: Vec<TaskId> = leases.iter().map(|(id, _)| *id).collect();
        asked.sort();
        asked.dedup();
        for id in asked {
            match ended.get(&id) {
                Some(TaskStatus::Superseded) => out.superseded.push(id),
                Some(_) => out.done.push(id),
                None => out.stale.push(id),
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "task {task} is not leased with token {token} (it is {status}): its lease expired and it was \
         handed out again, or it already finished"
    )]
    StaleLease {
        task: TaskId,
        token: LeaseToken,
        status: TaskStatus,
    },
    #[error("there is no task {task}")]
    NotFound { task: TaskId },
    #[error("the task queue's database operation failed")]
    Store(#[from] StoreError),
}

/// Longest `last_error` kept; agents' error output can be large.
const MAX_ERROR_BYTES: usize = 4096;

/// Enqueues a task in the caller's transaction. `None` when a task with the same dedup key exists. Agents
/// listening for the node are woken when the transaction commits.
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    task: &NewTask,
) -> Result<Option<TaskId>, QueueError> {
    Ok(sql::insert(tx, task).await?)
}

/// Enqueues many tasks in one statement, in the caller's transaction; returns the ids of those inserted.
pub async fn enqueue_many(
    tx: &mut Transaction<'_, Postgres>,
    tasks: &[NewTask],
) -> Result<Vec<TaskId>, QueueError> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sql::insert_many(tx, tasks).await?)
}

/// Leases up to `n` of `node`'s tasks that may run now, oldest first, for `lease_for` each. The caller
/// records the lease metric (`task_leased`) for those it hands out.
pub async fn lease(
    pool: &PgPool,
    node: &Name,
    n: u32,
    lease_for: Duration,
) -> Result<Vec<LeasedTask>, QueueError> {
    Ok(complete_and_lease(pool, node, &[], n, lease_for).await?.1)
}

/// Completes `complete` (each as [`complete`] would: done, or superseded) and leases up to `n` more of
/// `node`'s tasks, in one statement and so one commit: a worker that finished a batch asks for the next
/// one with it. The same fencing as [`complete_many`] (a token that is not the task's current lease is
/// refused and reported in [`Completed::stale`]), and a task in `complete` is never among those leased,
/// even when its token was stale. Asked again after a lost answer, the completions already made come
/// back stale (they are no longer leased) and the tasks leased by the lost answer wait for their lease
/// to expire, as with a lost [`lease`].
pub async fn complete_and_lease(
    pool: &PgPool,
    node: &Name,
    complete: &[(TaskId, LeaseToken)],
    n: u32,
    lease_for: Duration,
) -> Result<(Completed, Vec<LeasedTask>), QueueError> {
    if n == 0 && complete.is_empty() {
        return Ok((Completed::default(), Vec::new()));
    }
    let first = sql::lease(pool, node, n, lease_for, complete).await?;
    let completed = Completed::sort(complete, first.completed);
    let mut tasks = first.tasks;
    let mut buried = first.buried;
    // Expired last attempts took places of the limit: look again for the rest.
    while buried > 0 && tasks.len() < n as usize {
        let left = n.saturating_sub(u32::try_from(tasks.len()).unwrap_or(n));
        let more = sql::lease(pool, node, left, lease_for, &[]).await?;
        buried = more.buried;
        tasks.extend(more.tasks);
    }
    Ok((completed, tasks))
}

/// Marks a task done, or superseded when its node already finished a newer generation's task for the
/// same slot: the node cannot have run this one after that (its agent skips an older generation), so
/// an older agent's "done" for a skipped task never counts as a replica that ran. Returns which.
pub async fn complete(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
) -> Result<TaskStatus, QueueError> {
    match sql::complete(pool, task, token).await? {
        Some(status) => Ok(status),
        None => Err(refused(pool, task, token).await),
    }
}

/// Ends a leased task as superseded: its node skipped it (the slot holds a newer generation). It is
/// not retried and does not count as done.
pub async fn skip(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    why: &str,
) -> Result<(), QueueError> {
    if sql::skip(pool, task, token, truncate(why)).await? {
        Ok(())
    } else {
        Err(refused(pool, task, token).await)
    }
}

/// Retires, in the caller's transaction, the unfinished tasks (queued, leased or failed) that an older
/// generation than `generation` emitted for the replica slots `slots` (`(app, slot, node)`) on any node
/// but `node`, the one the slot is placed on now (`None`: the slot goes away, all of them). A node the
/// slot moved away from then never starts them when it comes back, and the token of a lease it still
/// holds is refused. Returns the tasks retired.
pub async fn supersede_slots(
    tx: &mut Transaction<'_, Postgres>,
    slots: &[(Name, u32, Option<Name>)],
    generation: u64,
) -> Result<Vec<TaskId>, QueueError> {
    if slots.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sql::supersede_slots(tx, slots, generation).await?)
}

/// Completes many tasks in one statement, each as [`complete`] would (batching is what makes the queue
/// fast).
pub async fn complete_many(
    pool: &PgPool,
    leases: &[(TaskId, LeaseToken)],
) -> Result<Completed, QueueError> {
    if leases.is_empty() {
        return Ok(Completed::default());
    }
    let ended = sql::complete_many(pool, leases).await?;
    Ok(Completed::sort(leases, ended))
}

/// Records a failed attempt: the task is retried after `backoff`, or dead after its last attempt.
pub async fn fail(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    error: &str,
    backoff: &Backoff,
) -> Result<FailOutcome, QueueError> {
    match sql::fail(pool, task, token, truncate(error), backoff).await? {
        Some(outcome) => Ok(outcome),
        None => Err(refused(pool, task, token).await),
    }
}

/// Extends a lease to `lease_for` from now (the agent's heartbeat while it works); returns the new
/// expiry.
pub async fn extend(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    lease_for: Duration,
) -> Result<DateTime<Utc>, QueueError> {
    match sql::extend(pool, task, token, lease_for).await? {
        Some(expiry) => Ok(expiry),
        None => Err(refused(pool, task, token).await),
    }
}

/// A task's queue state; `None` when there is no such task.
pub async fn state(pool: &PgPool, task: TaskId) -> Result<Option<TaskState>, QueueError> {
    Ok(sql::state(pool, task).await?)
}

/// Gives a leased task back unstarted: it may be leased again `after` from now (at once for an agent
/// that shuts down; later for a task held until another node pushed its image), and the attempt does
/// not count. `false` when `token` is not the task's current lease.
pub async fn give_back(
    conn: impl PgExecutor<'_>,
    task: TaskId,
    token: LeaseToken,
    after: Duration,
) -> Result<bool, QueueError> {
    Ok(sql::release_task(conn, task, token, after).await?)
}

/// Ends a leased task as dead at once (a failure retrying cannot fix). `false` when `token` is not the
/// task's current lease.
pub async fn bury(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    error: &str,
) -> Result<bool, QueueError> {
    Ok(sql::bury_task(pool, task, token, error).await?)
}

/// Replaces the payload of a task its lease holder is about to get (secrets encrypted to the node, in
/// place of a pending marker). `false` when `token` is not the task's current lease.
pub async fn set_payload(
    conn: impl PgExecutor<'_>,
    task: TaskId,
    token: LeaseToken,
    payload: &serde_json::Value,
) -> Result<bool, QueueError> {
    Ok(sql::set_task_payload(conn, task, token, payload).await?)
}

/// Whether `token` is task `task`'s current lease.
pub async fn holds_lease(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
) -> Result<bool, QueueError> {
    Ok(sql::holds_lease(pool, task, token).await?)
}

/// Records what the agent is doing with a task it holds and extends the lease to `lease_for` from now.
/// `None` when `token` is not the task's current lease.
pub async fn progress(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    message: Option<&str>,
    lease_for: Duration,
) -> Result<Option<DateTime<Utc>>, QueueError> {
    Ok(sql::record_progress(pool, task, token, message, lease_for).await?)
}

/// Appends log lines to a task the caller holds, keeping at most `max_lines` per task. `None` when
/// `token` is not the task's current lease; otherwise how many lines were stored.
pub async fn append_logs(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    lines: &[NewLogLine<'_>],
    max_lines: u32,
) -> Result<Option<Appended>, QueueError> {
    Ok(sql::append_logs(pool, task, token, lines, max_lines).await?)
}

/// A task's log lines, in order: `(stream, line, at)`.
pub async fn logs(
    pool: &PgPool,
    task: TaskId,
) -> Result<Vec<(String, String, DateTime<Utc>)>, QueueError> {
    Ok(sql::task_logs(pool, task).await?)
}

/// How long until the next of `node`'s unfinished tasks may be leased (its backoff ends, or its lease
/// expires), by the database's clock; `None` when the node has none waiting.
pub async fn next_due(pool: &PgPool, node: &Name) -> Result<Option<Duration>, QueueError> {
    Ok(sql::next_due(pool, node).await?)
}

/// The node a task is for; `None` when there is no such task.
pub async fn node_of(pool: &PgPool, task: TaskId) -> Result<Option<Name>, QueueError> {
    Ok(sql::task_node(pool, task).await?)
}

/// One task, if it is `node`'s.
pub async fn node_task(
    pool: &PgPool,
    node: &Name,
    task: TaskId,
) -> Result<Option<TaskRow>, QueueError> {
    Ok(sql::node_task(pool, node, task).await?)
}

/// The newest task of each of `node`'s slots of `apps`.
pub async fn latest(
    conn: &mut PgConnection,
    node: &Name,
    apps: &[Name],
) -> Result<Vec<LatestTask>, QueueError> {
    Ok(sql::latest_tasks(conn, node, apps).await?)
}

/// How a release's deploy tasks stand: `(done, open, dead)` (open: queued, leased or failed).
pub async fn release_deploys(
    conn: &mut PgConnection,
    app: &Name,
    release: u64,
) -> Result<(u64, u64, u64), QueueError> {
    Ok(sql::release_deploys(conn, app, release).await?)
}

/// Why a token was refused, as a typed error.
async fn refused(pool: &PgPool, task: TaskId, token: LeaseToken) -> QueueError {
    match sql::state(pool, task).await {
        Ok(Some(s)) => QueueError::StaleLease {
            task,
            token,
            status: s.status,
        },
        Ok(None) => QueueError::NotFound { task },
        Err(e) => QueueError::Store(e),
    }
}

fn truncate(error: &str) -> &str {
    if error.len() <= MAX_ERROR_BYTES {
        return error;
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// Why a [`Waiter`] woke up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Tasks for the node were committed (or the listener lost its connection and may have missed it).
    Notified,
    /// The poll interval passed.
    Poll,
}

/// One LISTEN connection for the whole process, waking in-memory waiters per node.
///
/// Dropping it stops the listening task; waiters then fall back to polling.
#[derive(Debug)]
pub struct Listener {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    /// A counter per node, bumped on each of its notifications; waiters hold receivers.
    nodes: Mutex<HashMap<String, watch::Sender<u64>>>,
    poll: Duration,
}

impl Shared {
    fn bump(&self, node: &str) {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = nodes.get(node) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// After a lost connection: anything may have been missed.
    fn bump_all(&self) {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        for tx in nodes.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

impl Listener {
    /// Starts listening. Tasks committed after this returns wake their node's waiters; waiters also wake
    /// every `poll`.
    pub async fn start(pool: &PgPool, poll: Duration) -> Result<Listener, QueueError> {
        let mut notifications = sql::Notifications::listen(pool).await?;
        let shared = Arc::new(Shared {
            nodes: Mutex::new(HashMap::new()),
            poll,
        });
        let task = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move {
                loop {
                    match notifications.recv().await {
                        Ok(Some(node)) => shared.bump(&node),
                        Ok(None) => shared.bump_all(),
                        Err(e) => {
                            tracing::warn!(error = %e, "task notifications failed; retrying");
                            shared.bump_all();
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        });
        Ok(Listener { shared, task })
    }

    /// A waiter for `node`'s tasks. Create it before the first [`lease`] of a wait loop, so that a
    /// notification between that lease and the wait is not lost.
    pub fn waiter(&self, node: &Name) -> Waiter {
        let mut nodes = self.shared.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|_, tx| tx.receiver_count() > 0);
        let rx = match nodes.get(node.as_str()) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                nodes.insert(node.as_str().to_owned(), tx);
                rx
            }
        };
        Waiter {
            rx,
            poll: self.shared.poll,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits for one node's tasks.
#[derive(Debug)]
pub struct Waiter {
    rx: watch::Receiver<u64>,
    poll: Duration,
}

impl Waiter {
    /// Returns when the node's tasks were notified since the last call (or since the waiter was made),
    /// or after the poll interval.
    pub async fn wait(&mut self) -> Wake {
        match tokio::time::timeout(self.poll, self.rx.changed()).await {
            Ok(Ok(())) => Wake::Notified,
            // The listener is gone: poll only.
            Ok(Err(_)) => {
                tokio::time::sleep(self.poll).await;
                Wake::Poll
            }
            Err(_) => Wake::Poll,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Backoff {
            base: Duration::from_secs(2),
            max: Duration::from_secs(30),
        };
        let delays: Vec<u64> = (1..=6).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 30, 30]);
        assert_eq!(
            b.delay(200),
            Duration::from_secs(30),
            "no overflow for large attempts"
        );
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let e = "é".repeat(MAX_ERROR_BYTES);
        let t = truncate(&e);
        assert!(t.len() <= MAX_ERROR_BYTES && t.len() >= MAX_ERROR_BYTES - 1);
        assert_eq!(truncate("short"), "short");
    }

    #[test]
    fn kinds_and_statuses_round_trip() {
        for k in TaskKind::ALL {
            assert_eq!(TaskKind::parse(k.as_str()), Some(k));
        }
        for s in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(s.as_str()), Some(s));
        }
    }
}
