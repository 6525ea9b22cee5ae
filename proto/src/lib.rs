//! The wire between the control plane and its agents, and the admin API's small request and response
//! bodies: plain serde types, JSON over HTTP.
//!
//! # The agent API (`/agent/v1`)
//!
//! | Route | Body → answer | Auth |
//! |-------|---------------|------|
//! | `POST /agent/v1/join` | [`JoinRequest`] → [`JoinResponse`] | the one-time join token, in the body |
//! | `POST /agent/v1/heartbeat` | [`Heartbeat`] → [`HeartbeatResponse`] | `Authorization: Bearer <credential>` |
//! | `POST /agent/v1/lease` | [`LeaseRequest`] → [`LeaseResponse`] (long-poll) | credential |
//! | `GET /agent/v1/tasks/{id}` | → [`TaskView`] | credential |
//! | `POST /agent/v1/tasks/{id}/progress` | [`Progress`] → [`ProgressResponse`] | credential + fencing token |
//! | `POST /agent/v1/tasks/{id}/logs` | [`LogBatch`] → [`LogsResponse`] | credential + fencing token |
//! | `POST /agent/v1/tasks/{id}/result` | [`TaskResult`] → [`ResultResponse`] | credential + fencing token |
//! | `POST /agent/v1/tasks/{id}/release` | [`Release`] → [`ResultResponse`] | credential + fencing token |
//! | `GET /agent/v1/routes?generation=G&key=K&wait_ms=MS` | → [`routes::RoutesResponse`] or 204 (long-poll) | credential |
//! | `POST /agent/v1/replica-logs` | [`ReplicaLogBatch`] → [`LogsResponse`] | credential (lines of its own placements only) |
//!
//! Every error is [`ErrorBody`] (`{"error": "..."}`) with the HTTP status saying what kind: 400 a
//! malformed request, 401 a missing, wrong or revoked credential (or an unknown, used or expired join
//! token), 403 a node that may not join as it asked, 404 a task that is not this node's, 409 a fencing
//! token that is not the task's current lease, 413 a body over [`MAX_BODY_BYTES`], 429 too many requests.
//!
//! A task is the node's own or it does not exist: another node's task id answers 404, exactly like an id
//! nobody has.
//!
//! # The admin API (`/api/v1`)
//!
//! `Authorization: Bearer <admin token>` (`cairn token create`). `GET /api/v1/status` (the reconciler's
//! `Status`), `GET /api/v1/nodes` ([`admin::NodeInfo`]), `POST /api/v1/nodes/{node}/join-tokens`
//! ([`admin::JoinTokenRequest`] → [`admin::JoinToken`]), `GET /api/v1/nodes/{node}/join-tokens`
//! ([`admin::JoinTokenInfo`], never the token), `DELETE /api/v1/nodes/{node}/credential` (revoke the
//! node's agent credential). Per app: `GET /api/v1/apps/{app}/releases` ([`admin::Releases`]),
//! `POST .../rollback` ([`admin::RollbackRequest`] → [`admin::Pinned`]), `DELETE .../pin` (→
//! [`admin::Pinned`]), `POST .../restart` (→ [`admin::Restarted`]), `POST .../deploy` (→
//! [`admin::Deployed`]), `GET .../build-logs[?release=N]` ([`admin::BuildLogs`]) and
//! `GET .../logs?after=CURSOR&tail=N&wait_ms=MS` ([`admin::AppLogs`], a long-poll with `wait_ms`).
//!
//! What this crate must not do: IO of any kind, or carry a secret in plaintext. A deploy task's secrets
//! travel only as [`DeployPayload::secret_env`], an age ciphertext to the one node that runs the task.

use std::collections::BTreeMap;

use cairn_schema::{Driver, EnvName, GitUrl, Health, Name, Recipient};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub mod admin;
pub mod build;
pub mod registry;
pub mod routes;

pub use registry::{Registry, RegistryImage};

/// Where the agent API lives.
pub const AGENT_API: &str = "/agent/v1";
/// Where the admin API lives.
pub const ADMIN_API: &str = "/api/v1";

/// The largest request body either API reads; a larger one is refused with 413 before it is read.
pub const MAX_BODY_BYTES: usize = 512 * 1024;
/// The longest a lease request may wait for a task.
pub const MAX_LEASE_WAIT_MS: u64 = 30_000;
/// The most tasks one lease request may ask for.
pub const MAX_LEASE_TASKS: u32 = 64;
/// The most log lines in one [`LogBatch`], and the longest line kept (longer lines are cut).
pub const MAX_LOG_LINES: usize = 500;
pub const MAX_LOG_LINE_BYTES: usize = 4096;
/// The longest progress message or error kept.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Prefix of a one-time join token (`cairn node join-token NODE`).
pub const JOIN_TOKEN_PREFIX: &str = "cairn-join-";
/// Prefix of a node's agent credential (what a join returns).
pub const CREDENTIAL_PREFIX: &str = "cairn-node-";
/// Prefix of an admin API token (`cairn token create`).
pub const ADMIN_TOKEN_PREFIX: &str = "cairn-admin-";

/// `POST /agent/v1/join`: an agent exchanges a one-time token for its node's long-lived credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The one-time join token; it names the node.
    pub token: String,
    /// The age recipient of the identity the agent generated: the control plane encrypts this node's
    /// secrets to it. A node whose manifest pins a recipient must join with that one.
    pub recipient: Recipient,
    /// Drivers the node offers.
    pub drivers: Vec<Driver>,
    pub agent_version: String,
    /// The credential the agent chose ([`CREDENTIAL_PREFIX`] and 64 hex digits), kept in its data
    /// directory before it asks: a join whose answer was lost (the agent killed meanwhile) is asked
    /// again with the same token and credential and answered the same, instead of finding its token
    /// used. `None`: the control plane makes one (older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("token", &"<redacted>")
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .field("recipient", &self.recipient)
            .field("drivers", &self.drivers)
            .field("agent_version", &self.agent_version)
            .finish()
    }
}

/// What a join returns. The credential is shown once; the control plane keeps only its hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    pub node: Name,
    /// The node's bearer credential for every later call.
    pub credential: String,
    /// The Cairn installation the node now belongs to: every replica it runs is labelled with it.
    pub installation: Name,
    /// How often the control plane expects a heartbeat.
    pub heartbeat_interval_ms: u64,
}

impl std::fmt::Debug for JoinResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinResponse")
            .field("node", &self.node)
            .field("credential", &"<redacted>")
            .field("installation", &self.installation)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .finish()
    }
}

/// CPU, memory and disk, as a node's capacity or what its replicas use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// Whether a replica the agent has is running or kept stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Stopped,
}

/// One replica as the agent sees it on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualReplica {
    pub app: Name,
    pub slot: u32,
    pub release: u64,
    /// The config generation of the task that put it there; `None` when the agent does not know (a
    /// replica it found on the node without a record of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    pub state: RunState,
    /// Whether it passes its health check (always false when stopped).
    pub healthy: bool,
}

/// `POST /agent/v1/heartbeat`: the node's actual state, every heartbeat interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub agent_version: String,
    pub drivers: Vec<Driver>,
    /// What the node's replicas use (their limits, summed).
    pub resources: Resources,
    /// Every replica of this installation on the node.
    pub replicas: Vec<ActualReplica>,
}

/// What the control plane answers a heartbeat with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub node: Name,
    /// Replicas to stop and remove now: their slot runs on another node since (the node was offline and
    /// its replicas were rescheduled), so they are duplicates.
    #[serde(default)]
    pub stop: Vec<StopReplica>,
    pub heartbeat_interval_ms: u64,
}

/// A replica the agent must stop and remove at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopReplica {
    pub app: Name,
    pub slot: u32,
    /// The release the agent reported for it.
    pub release: u64,
    /// The generation of the placement that supersedes it; the agent remembers it so an older task
    /// cannot bring the replica back.
    pub generation: u64,
    /// Where the slot runs now, when it runs anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<Name>,
    pub reason: String,
}

/// `POST /agent/v1/lease`: wait up to `wait_ms` for up to `max` of the node's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub max: u32,
    pub wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseResponse {
    /// Empty when the wait ran out.
    pub tasks: Vec<Task>,
}

/// What a task tells the agent to do with a replica slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Run the release in the slot, replacing what runs there.
    Deploy,
    /// Stop the slot's replica, keeping it.
    Stop,
    /// Start the slot's stopped replica.
    Start,
    /// Restart the slot's running replica.
    Restart,
    /// Stop and delete the slot's replica.
    Remove,
    /// Create or start a managed database's server and make its login ([`DatabasePayload`]).
    #[serde(rename = "db_ensure")]
    DbEnsure,
    /// Stop a managed database's server, keeping its data.
    #[serde(rename = "db_stop")]
    DbStop,
    /// Dump a managed database to its backup target.
    #[serde(rename = "db_backup")]
    DbBackup,
    /// Restore a backup into a (new, empty) instance.
    #[serde(rename = "db_restore")]
    DbRestore,
    /// Restore a backup into a scratch server and compare its row counts with the backup's.
    #[serde(rename = "db_verify")]
    DbVerify,
    /// Dump an instance into a new instance of another version beside it (a `version` change).
    #[serde(rename = "db_upgrade")]
    DbUpgrade,
    /// Stop an instance and delete its data (an explicit drop, or `cairn db finish-upgrade`).
    #[serde(rename = "db_drop")]
    DbDrop,
}

impl TaskKind {
    pub const ALL: [TaskKind; 12] = [
        TaskKind::Deploy,
        TaskKind::Stop,
        TaskKind::Start,
        TaskKind::Restart,
        TaskKind::Remove,
        TaskKind::DbEnsure,
        TaskKind::DbStop,
        TaskKind::DbBackup,
        TaskKind::DbRestore,
        TaskKind::DbVerify,
        TaskKind::DbUpgrade,
        TaskKind::DbDrop,
    ];

    /// Whether it acts on a managed database (its `app` is the database's name, it has no slot).
    pub const fn is_database(self) -> bool {
        matches!(
            self,
            TaskKind::DbEnsure
                | TaskKind::DbStop
                | TaskKind::DbBackup
                | TaskKind::DbRestore
                | TaskKind::DbVerify
                | TaskKind::DbUpgrade
                | TaskKind::DbDrop
        )
    }

    /// Its name on the wire and in the `tasks.kind` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskKind::Deploy => "deploy",
            TaskKind::Stop => "stop",
            TaskKind::Start => "start",
            TaskKind::Restart => "restart",
            TaskKind::Remove => "remove",
            TaskKind::DbEnsure => "db_ensure",
            TaskKind::DbStop => "db_stop",
            TaskKind::DbBackup => "db_backup",
            TaskKind::DbRestore => "db_restore",
            TaskKind::DbVerify => "db_verify",
            TaskKind::DbUpgrade => "db_upgrade",
            TaskKind::DbDrop => "db_drop",
        }
    }

    pub fn parse(s: &str) -> Option<TaskKind> {
        TaskKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A leased task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: i64,
    /// The lease's fencing token: progress, logs and the result must carry it.
    pub token: i64,
    pub kind: TaskKind,
    pub app: Name,
    pub slot: Option<u32>,
    pub release: Option<u64>,
    /// The config generation that emitted it; an agent never lets an older task undo a newer one.
    pub generation: Option<u64>,
    /// 1 for the first lease.
    pub attempt: u32,
    pub max_attempts: u32,
    /// The lease ends then unless extended ([`Progress`]); the task may then go to someone else.
    pub expires_at: DateTime<Utc>,
    /// How long a lease (and each extension) lasts: report progress well within it (a third is good),
    /// measured on the agent's own clock.
    #[serde(default)]
    pub lease_ms: u64,
    /// What a deploy (and a start or restart, which may need to run the release again) needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployPayload>,
    /// What a database task (`db_*`) needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabasePayload>,
}

/// What a database task carries: the instance, its login (the password an age ciphertext to the
/// node's own recipient, sealed when the node leases the task), and for a backup or a restore the
/// object and where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatabasePayload {
    /// The `[database.NAME]`.
    pub database: Name,
    /// The server instance acted on: the database's own, or a restore's `--into NEW`.
    pub instance: Name,
    pub engine: cairn_schema::database::Engine,
    pub version: String,
    pub port: u16,
    pub user: String,
    /// The database (PostgreSQL, MariaDB) or number (Redis) the login uses.
    pub db: String,
    /// `{"password": "..."}` as age ciphertext to the node; `None` until the node leases the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_sealed: Option<String>,
    /// Logins to lock out (their passwords replaced by unknown ones): those a rotation retired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retire_users: Vec<String>,
    /// `db_backup` and `db_restore`: where the object is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<BackupTarget>,
    /// `db_backup`: the object to write; `db_restore`: the object to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// `db_restore`: the SHA-256 the object must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The backups ledger's row this task fills (`db_backup`), or restores (`db_verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<i64>,
    /// `db_verify`: the rows per table the backup recorded at its dump, which the scratch restore must
    /// hold (`None`: the database changed under the dump, so only the restore itself is checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_counts: Option<BTreeMap<String, u64>>,
    /// `db_upgrade`: the instance dumped into `instance` (which runs `version`); it keeps running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_from: Option<UpgradeSource>,
}

/// The old instance of a `db_upgrade`, on the same node: dumped by its engine's superuser (no login
/// needed), its row counts compared with the new instance's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeSource {
    pub instance: Name,
    pub version: String,
    pub port: u16,
}

/// A backup target on the wire: the location, and for S3 the endpoint, region and the keys sealed to
/// the node (`{"access_key_id": "...", "secret_access_key": "..."}` as one age ciphertext).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupTarget {
    pub to: cairn_schema::database::BackupTo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_sealed: Option<String>,
}

/// What a deploy task carries: the release to run, and its secrets as one age ciphertext of a JSON object
/// `{"KEY": "value"}` addressed to the node's own recipient.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployPayload {
    pub config_commit: String,
    pub source_commit: String,
    pub spec: ReleaseSpec,
    /// The hostnames the node proxy routes to the app.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// `None` when the app has no secrets, or while `secrets_pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// The recipient `secret_env` is encrypted to. A node that joined again with a new key gets its
    /// secrets encrypted again when it leases the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_recipient: Option<Recipient>,
    /// The node's recipient was unknown when the task was made (it had not joined): the agent API
    /// encrypts the secrets when the node leases the task. An agent never sees a task in this state.
    #[serde(default)]
    pub secrets_pending: bool,
    /// Set when the node leases the task, if serve distributes images through a registry and no node has
    /// pushed the release's image yet: this node gets the image (its own copy, or a build) and pushes it
    /// to [`Registry::repository`], for every other node to pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_to: Option<Registry>,
    /// Set when the node leases the task, once a node pushed the release's image: pull it by digest
    /// instead of building.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<RegistryImage>,
}

impl std::fmt::Debug for DeployPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployPayload")
            .field("config_commit", &self.config_commit)
            .field("source_commit", &self.source_commit)
            .field("spec", &self.spec)
            .field("hostnames", &self.hostnames)
            .field(
                "secret_env",
                &self.secret_env.as_ref().map(|_| "<age ciphertext>"),
            )
            .field("secret_recipient", &self.secret_recipient)
            .field("secrets_pending", &self.secrets_pending)
            .field("push_to", &self.push_to)
            .field("image", &self.image)
            .finish()
    }
}

impl DeployPayload {
    /// Whether `secret_env` still has to be (re-)encrypted for a node whose recipient is `recipient`.
    pub fn needs_encryption_for(&self, recipient: &Recipient) -> bool {
        self.secrets_pending
            || (self.secret_env.is_some() && self.secret_recipient.as_ref() != Some(recipient))
    }
}

/// Everything a release runs with besides its source commit: the wire form of the planner's release spec
/// (the same JSON, field for field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    pub app: Name,
    pub source_url: GitUrl,
    pub port: u16,
    pub health: Health,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub drivers: Vec<Driver>,
    pub dockerfile: bool,
    pub image: Option<String>,
    pub build: Vec<String>,
    pub start: Option<String>,
    pub env: BTreeMap<EnvName, ReleaseEnv>,
}

/// An env var of a release: a plain value, or a secret by the keyed fingerprint of its plaintext (the
/// value itself is in [`DeployPayload::secret_env`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ReleaseEnv {
    Plain { value: String },
    Secret { fingerprint: String },
}

/// `POST /agent/v1/tasks/{id}/progress`: what the agent is doing; also extends the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    pub token: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The release's image, once the agent pushed it (before the deploy ends): recorded at once, so the
    /// other nodes' deploys of the release pull it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<DeployedImage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressResponse {
    /// The lease's new expiry.
    pub expires_at: DateTime<Utc>,
}

/// Where a log line came from (the agent's log sinks and the wire alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The app's standard output.
    Stdout,
    /// The app's standard error.
    Stderr,
    /// Output of an image build (Docker's build stream or the process driver's build commands).
    Build,
    /// What the agent itself says about a build or replica (restarts, exits).
    Agent,
}

impl LogStream {
    pub const ALL: [LogStream; 4] = [
        LogStream::Stdout,
        LogStream::Stderr,
        LogStream::Build,
        LogStream::Agent,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Build => "build",
            LogStream::Agent => "agent",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub stream: LogStream,
    pub text: String,
    pub at: DateTime<Utc>,
}

/// `POST /agent/v1/tasks/{id}/logs`: output of a task while it runs (a build's, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogBatch {
    pub token: i64,
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsResponse {
    /// Lines stored; fewer than sent once the task's log is full.
    pub stored: u32,
}

/// `POST /agent/v1/replica-logs`: what the node's replicas printed since the last batch. A line is kept
/// only for a replica slot placed on the calling node; at most [`MAX_LOG_LINES`] lines per batch, each cut
/// at [`MAX_LOG_LINE_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaLogBatch {
    pub lines: Vec<ReplicaLogLine>,
}

/// One line of a replica's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaLogLine {
    pub app: Name,
    pub slot: u32,
    pub release: u64,
    pub stream: LogStream,
    pub text: String,
    pub at: DateTime<Utc>,
}

/// How a task ended on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    /// Done: the task ran (or found the slot already as asked). A deploy reported done counts as a
    /// replica of its release that ran.
    Done {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// A deploy's time per stage in milliseconds (`fetch`, `build`, `pull`, `push`, `start`,
        /// `healthy`, `switch`, `drain`; those that ran): the release's push-to-running stages.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        timings: BTreeMap<String, u64>,
        /// The image a deploy runs, which its release records.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<DeployedImage>,
        /// What a `db_backup` wrote (the backups ledger records it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backup: Option<BackupReport>,
    },
    /// Failed: retried after a backoff if `retry` and attempts remain, dead otherwise.
    Failed { error: String, retry: bool },
    /// Not run: the slot already holds a newer generation than the task's (a stale lease's late
    /// delivery, a task retried after a newer one ran). The task ends `superseded`; a skipped deploy
    /// never counts as a replica of its release that ran.
    Skipped {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// The generation the slot holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot_generation: Option<u64>,
    },
}

/// What a database backup wrote: the object below its target, its size and the SHA-256 of exactly the
/// bytes stored. A verification (`db_verify`) reports the object it restored the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    pub object: String,
    pub bytes: u64,
    pub sha256: String,
    pub duration_ms: u64,
    /// Rows per table (keys per Redis database): for a backup, what the database held when it was
    /// dumped (`None` when the counts before and after the dump differ: it changed under the dump);
    /// for a verification, what the scratch restore held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<BTreeMap<String, u64>>,
}

/// The image a deploy ran: the engine's image id, and where it is in the registry when the agent pushed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedImage {
    /// `sha256:<hex>` as the node's engine (or the process driver's release directory) names it.
    pub id: String,
    /// `host:port/prefix/app` and the `sha256:` digest the registry gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<(String, String)>,
}

/// `POST /agent/v1/tasks/{id}/result`. (serde cannot refuse unknown fields next to a flattened one.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub token: i64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// `POST /agent/v1/tasks/{id}/release`: give a leased task back unstarted (an agent shutting down); it
/// can be leased again at once and the attempt does not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub token: i64,
}

/// Where a task is in its life: in the queue (`tasks.status`), and as the result and release calls
/// report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Waiting for its first lease.
    Queued,
    /// Handed to an agent until its lease expires.
    Leased,
    Done,
    /// An attempt failed; it is leased again once its backoff has passed.
    Failed,
    /// Its last allowed attempt failed or timed out. Not retried.
    Dead,
    /// Never run and never will be: its node skipped it (the slot holds a newer generation), or a newer
    /// plan retired it (its slot moved to another node, or went away). Not done: a superseded
    /// deploy is no replica of its release that ran.
    Superseded,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Queued,
        TaskStatus::Leased,
        TaskStatus::Done,
        TaskStatus::Failed,
        TaskStatus::Dead,
        TaskStatus::Superseded,
    ];

    /// Its name on the wire and in the `tasks.status` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Leased => "leased",
            TaskStatus::Done => "done",
            TaskStatus::Failed => "failed",
            TaskStatus::Dead => "dead",
            TaskStatus::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A deploy's stages, in order: what an agent's deploy goes through, the keys of a result's `timings`
/// (all but [`DeployStage::Check`], which is not timed) and of a release's `stage_timings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployStage {
    Check,
    Fetch,
    Build,
    Pull,
    Push,
    Start,
    Healthy,
    Switch,
    Drain,
}

impl DeployStage {
    /// The stages a deploy reports the time of, in order.
    pub const TIMED: [DeployStage; 8] = [
        DeployStage::Fetch,
        DeployStage::Build,
        DeployStage::Pull,
        DeployStage::Push,
        DeployStage::Start,
        DeployStage::Healthy,
        DeployStage::Switch,
        DeployStage::Drain,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            DeployStage::Check => "check",
            DeployStage::Fetch => "fetch",
            DeployStage::Build => "build",
            DeployStage::Pull => "pull",
            DeployStage::Push => "push",
            DeployStage::Start => "start",
            DeployStage::Healthy => "healthy",
            DeployStage::Switch => "switch",
            DeployStage::Drain => "drain",
        }
    }
}

impl std::fmt::Display for DeployStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultResponse {
    pub status: TaskStatus,
    /// For a failed task that will be retried: not before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
}

/// `GET /agent/v1/tasks/{id}`: one of the node's own tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: i64,
    pub kind: TaskKind,
    pub app: Name,
    pub slot: Option<u32>,
    pub status: TaskStatus,
    pub attempts: u32,
    pub max_attempts: u32,
    /// The current (or last) lease's token.
    pub lease_token: Option<i64>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub progress: Option<String>,
    pub last_error: Option<String>,
}

/// The body of every error answer, in both APIs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    /// The shared vocabulary's wire names are exactly these (they are column values and JSON alike), and
    /// `as_str` says the same as serde.
    #[test]
    fn the_shared_vocabulary_keeps_its_wire_names() {
        use super::{DeployStage, LogStream, TaskKind, TaskStatus};
        fn names<T: serde::Serialize>(all: &[T]) -> Vec<String> {
            all.iter()
                .map(|v| {
                    serde_json::to_value(v)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        }
        assert_eq!(
            names(&TaskKind::ALL),
            [
                "deploy",
                "stop",
                "start",
                "restart",
                "remove",
                "db_ensure",
                "db_stop",
                "db_backup",
                "db_restore",
                "db_verify",
                "db_upgrade",
                "db_drop"
            ]
        );
        assert_eq!(
            names(&TaskStatus::ALL),
            ["queued", "leased", "done", "failed", "dead", "superseded"]
        );
        assert_eq!(
            names(&LogStream::ALL),
            ["stdout", "stderr", "build", "agent"]
        );
        let stages: Vec<DeployStage> = std::iter::once(DeployStage::Check)
            .chain(DeployStage::TIMED)
            .collect();
        assert_eq!(
            names(&stages),
            [
                "check", "fetch", "build", "pull", "push", "start", "healthy", "switch", "drain"
            ]
        );
        for k in TaskKind::ALL {
            assert_eq!(TaskKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for s in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for l in LogStream::ALL {
            assert_eq!(serde_json::to_value(l).unwrap(), l.as_str());
        }
        for d in stages {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
            assert_eq!(d.to_string(), d.as_str());
        }
    }

    use super::*;

    fn recipient() -> Recipient {
        cairn_schema::Identity::generate().recipient()
    }

    #[test]
    fn results_flatten_their_outcome() {
        let r = TaskResult {
            token: 7,
            outcome: Outcome::Failed {
                error: "boom".into(),
                retry: true,
            },
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"token": 7, "outcome": "failed", "error": "boom", "retry": true})
        );
        assert_eq!(serde_json::from_value::<TaskResult>(j).unwrap(), r);
        let skipped: TaskResult =
            serde_json::from_str(r#"{"token": 2, "outcome": "skipped", "slot_generation": 9}"#)
                .unwrap();
        assert_eq!(
            skipped.outcome,
            Outcome::Skipped {
                detail: None,
                slot_generation: Some(9)
            },
            "a skipped task is its own outcome, never done"
        );
        let done: TaskResult = serde_json::from_str(r#"{"token": 1, "outcome": "done"}"#).unwrap();
        assert_eq!(
            done.outcome,
            Outcome::Done {
                detail: None,
                timings: BTreeMap::new(),
                image: None,
                backup: None,
            }
        );
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        assert!(serde_json::from_str::<LeaseRequest>(r#"{"max": 1, "wait_ms": 5}"#).is_ok());
        assert!(
            serde_json::from_str::<LeaseRequest>(r#"{"max": 1, "wait_ms": 5, "node": "b"}"#)
                .is_err(),
            "a lease cannot name another node"
        );
    }

    #[test]
    fn secrets_are_encrypted_again_for_a_new_recipient() {
        let (a, b) = (recipient(), recipient());
        let spec: ReleaseSpec = serde_json::from_value(serde_json::json!({
            "app": "web", "source_url": "https://example.com/web.git", "port": 8080,
            "health": {"path": "/", "timeout": "5s"}, "cpu_millis": 100, "memory_bytes": 1,
            "disk_bytes": 0, "drivers": ["docker"], "dockerfile": true, "image": null, "build": [],
            "start": null, "env": {}
        }))
        .unwrap();
        let mut p = DeployPayload {
            config_commit: "c".into(),
            source_commit: "s".into(),
            spec,
            hostnames: vec![],
            secret_env: None,
            secret_recipient: None,
            secrets_pending: false,
            push_to: None,
            image: None,
        };
        assert!(!p.needs_encryption_for(&a), "no secrets");
        p.secrets_pending = true;
        assert!(p.needs_encryption_for(&a));
        p.secrets_pending = false;
        p.secret_env = Some("-----BEGIN AGE ENCRYPTED FILE-----".into());
        p.secret_recipient = Some(a.clone());
        assert!(!p.needs_encryption_for(&a));
        assert!(p.needs_encryption_for(&b));
        assert!(!format!("{p:?}").contains("BEGIN AGE"));
    }

    #[test]
    fn debug_never_shows_tokens() {
        let j = JoinRequest {
            token: "cairn-join-secret".into(),
            recipient: recipient(),
            drivers: vec![Driver::Docker],
            agent_version: "1".into(),
            credential: Some("cairn-node-chosen".into()),
        };
        assert!(!format!("{j:?}").contains("cairn-join-secret"));
        assert!(!format!("{j:?}").contains("cairn-node-chosen"));
        let r = JoinResponse {
            node: Name::new("a").unwrap(),
            credential: "cairn-node-secret".into(),
            installation: Name::new("cairn").unwrap(),
            heartbeat_interval_ms: 1,
        };
        assert!(!format!("{r:?}").contains("cairn-node-secret"));
    }

    #[test]
    fn truncate_cuts_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
