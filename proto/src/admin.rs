//! Request and response bodies of the admin API (`/api/v1`) besides the status, which is the
//! reconciler's own `Status` value.

use std::collections::BTreeMap;

use cairn_schema::{Driver, Name, Recipient};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{ActualReplica, Resources};

/// `POST /api/v1/nodes/{node}/join-tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// How long the token may be used; the server caps it.
    pub ttl_secs: u64,
    /// Whether the token may join a node that holds a live credential: the join then revokes that
    /// credential. Without it, such a join is refused (the old credential must be revoked first).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
}

/// A new join token. Shown once: only its hash is stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: i64,
    pub node: Name,
    pub token: String,
    pub expires_at: DateTime<Utc>,
    /// Whether it replaces (and revokes) a live credential of the node.
    #[serde(default)]
    pub replace: bool,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("node", &self.node)
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("replace", &self.replace)
            .finish()
    }
}

/// A join token as listed: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenInfo {
    pub id: i64,
    pub node: Name,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
}

/// A node as the agent side knows it (`GET /api/v1/nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: Name,
    /// `pending`, `online` or `offline`.
    pub state: String,
    pub joined_at: Option<DateTime<Utc>>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Whether the node holds a credential (false before it joins and after a revoke).
    pub has_credential: bool,
    pub recipient: Option<Recipient>,
    pub drivers: Vec<Driver>,
    pub agent_version: Option<String>,
    /// What its replicas use, as its last heartbeat said.
    pub resources: Option<Resources>,
    /// What runs on it, as its last heartbeat said.
    pub replicas: Vec<ActualReplica>,
}

/// `DELETE /api/v1/nodes/{node}/credential`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// False when the node had no credential.
    pub revoked: bool,
}

/// One release of an app (`GET /api/v1/apps/{app}/releases`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub number: u64,
    pub config_commit: String,
    pub config_generation: u64,
    /// A commit id, or the tag a manifest's `rev` names.
    pub source_commit: String,
    /// The image reference and its registry digest, once an agent reported them.
    pub image: Option<String>,
    pub image_digest: Option<String>,
    /// `pending`, `building`, `built`, `deploying`, `live`, `failed` or `superseded`.
    pub status: String,
    pub error: Option<String>,
    /// Milliseconds per stage of push-to-running (fetch, build, push, start, healthy), as reported.
    pub stage_timings: BTreeMap<String, u64>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The replica slots placed at this release now.
    pub placement: Vec<SlotPlacement>,
}

/// A replica slot placed on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotPlacement {
    pub slot: u32,
    pub node: Name,
    /// `running`, or `stopped` for a suspended app.
    pub state: String,
}

/// An app's releases, newest first, and its rollback pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Releases {
    pub app: Name,
    /// Whether the app is in the applied configuration (its releases outlive it).
    pub declared: bool,
    pub pinned_release: Option<u64>,
    pub releases: Vec<ReleaseInfo>,
}

/// `POST /api/v1/apps/{app}/rollback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The release to go back to; by default the last release before the current one that ran.
    #[serde(default)]
    pub release: Option<u64>,
}

/// What a rollback or an unpin did: the app's pin before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    pub app: Name,
    pub pinned_release: Option<u64>,
    pub previous: Option<u64>,
}

/// `POST /api/v1/apps/{app}/restart`: the app's restart request count after this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restarted {
    pub app: Name,
    pub count: u64,
}

/// `POST /api/v1/apps/{app}/deploy`: the branch head the control plane read from the app's remote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    pub app: Name,
    pub branch: String,
    pub commit: String,
    /// Whether the head differs from the one recorded before (false: it already was the head).
    pub moved: bool,
    /// The app's latest release when the head was recorded (the next one follows if the head moved).
    pub latest_release: Option<u64>,
}

/// A line of output, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputLine {
    /// `stdout`, `stderr`, `build` or `agent`.
    pub stream: String,
    pub text: String,
    pub at: DateTime<Utc>,
    pub node: Name,
    pub slot: Option<u32>,
}

/// `GET /api/v1/apps/{app}/build-logs[?release=N]`: what the release's deploy tasks logged while they
/// built and started it, in order (task by task).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLogs {
    pub app: Name,
    pub release: u64,
    pub lines: Vec<OutputLine>,
}

/// `GET /api/v1/apps/{app}/logs?after=CURSOR&tail=N&wait_ms=MS`: the app's replicas' output. `after`
/// (from the previous answer's `cursor`) asks for lines received since; `wait_ms` (up to
/// [`crate::MAX_LEASE_WAIT_MS`]) waits for the first new line (a long-poll).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLogs {
    pub app: Name,
    /// Oldest first.
    pub lines: Vec<AppLogLine>,
    /// Ask with `after=cursor` for what comes next.
    pub cursor: i64,
}

/// One line of a replica's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLogLine {
    pub release: u64,
    #[serde(flatten)]
    pub line: OutputLine,
}

/// One certificate the control plane keeps for a declared name set (`GET /api/v1/certs`). Never a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// The app declaring the names.
    pub app: String,
    /// The names, sorted.
    pub names: Vec<String>,
    /// `pending`, `waiting_dns`, `ordering`, `issued`, `renewing` or `failed`.
    pub state: String,
    pub issuer: Option<String>,
    /// Hex, as the CA assigned it.
    pub serial: Option<String>,
    pub not_after: Option<DateTime<Utc>>,
    /// The current certificate expires within 14 days (or has expired).
    pub expires_soon: bool,
    /// Why the last attempt failed (a name not reaching the cluster, the CA's refusal).
    pub last_error: Option<String>,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// When it is next worked on (a retry, or its renewal).
    pub next_attempt_at: DateTime<Utc>,
    pub issued_at: Option<DateTime<Utc>>,
}

/// One event: something that happened to an app, a node or the configuration (`GET /api/v1/events`,
/// `cairn events`). Never a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventInfo {
    /// Increasing; `?after=ID` asks for what came later (`cairn events --follow`).
    pub id: i64,
    pub at: DateTime<Utc>,
    /// `deploy.failed`, `node.offline`, ...
    pub kind: String,
    /// `info`, `warning` or `error`.
    pub severity: String,
    pub app: Option<String>,
    pub node: Option<String>,
    pub release: Option<u64>,
    /// A deploy's source commit, an apply's config commit.
    pub commit: Option<String>,
    /// One line.
    pub message: String,
    /// The fields a machine reads: `reason`, `push_to_running_secs`, `diagnostics`, ...
    pub detail: serde_json::Value,
}

/// One notification of an event to a sink (`GET /api/v1/notify/deliveries`, `cairn notify deliveries`):
/// sent, retrying, dead, or suppressed, and why. Never the sink's URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifyDelivery {
    pub id: i64,
    pub sink: String,
    /// The Standard Webhooks `webhook-id`, the same on every attempt.
    pub webhook_id: String,
    /// `pending` (waiting or retrying), `done`, `dead` or `suppressed`.
    pub status: String,
    pub attempts: u32,
    /// The receiver's last answer.
    pub status_code: Option<u16>,
    pub latency_ms: Option<u64>,
    /// Why the last attempt failed, or why it was not sent.
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub event: EventInfo,
}

/// What `POST /api/v1/notify/{sink}/test` got back from the sink's receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyTestAnswer {
    pub sink: String,
    /// The receiver's status code, when it answered.
    pub status_code: Option<u16>,
    pub latency_ms: u64,
    /// The first kilobyte of its answer's body (lossy UTF-8).
    pub body: String,
    /// Why nothing or an error came back.
    pub error: Option<String>,
}

/// What usage is grouped by (`cairn usage --by`, `GET /api/v1/usage?by=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageBy {
    App,
    /// Each replica slot of each app.
    Slot,
    Plan,
    Node,
}

impl UsageBy {
    pub const fn as_str(self) -> &'static str {
        match self {
            UsageBy::App => "app",
            UsageBy::Slot => "slot",
            UsageBy::Plan => "plan",
            UsageBy::Node => "node",
        }
    }
}

/// A month's usage (`GET /api/v1/usage?month=2026-11&by=app`, `cairn usage`): metered seconds and amounts
/// in minor units (hundredths of `currency`), each row's amount rounded half to even once from its exact
/// sum, and the total rounded once from the exact total (so it may differ from the rows' sum by a few
/// minor units).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// `YYYY-MM`.
    pub month: String,
    pub by: UsageBy,
    /// The currency of `cairn.toml` as applied (`None` before the first apply).
    pub currency: Option<String>,
    pub rows: Vec<UsageRow>,
    pub total_seconds: i64,
    pub total_minor: i64,
    /// Intervals of the month closed by a report older than the late window (recorded, flagged, applied
    /// from the window's edge).
    pub late_intervals: i64,
    /// The month's statement once it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<UsageStatement>,
}

/// One row of a [`UsageReport`]: only the fields of its grouping are set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub seconds: i64,
    pub amount_minor: i64,
}

/// A closed month's immutable statement: when it was closed and the SHA-256 of its canonical bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageStatement {
    pub closed_at: DateTime<Utc>,
    pub sha256: String,
}

/// `POST /api/v1/usage/recompute?month=`: how many hours were rolled up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecomputed {
    pub hours: u64,
}
