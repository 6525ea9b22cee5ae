//! Events: what happened (a deploy started, succeeded or failed, an apply, a node going offline or
//! coming back, a replica no node can take), recorded in the transaction of what caused it, so an event
//! exists if and only if its cause committed. The executor, the release outcome (`deploys.rs`), the
//! failure record and liveness (the monitor and the heartbeat) call [`record`]; `cairn events` and
//! `GET /api/v1/events` read them with [`list`].
//!
//! Each kind fires once per transition: a node is marked offline once (the monitor's UPDATE changes it
//! from online), a release's outcome is recorded once, an invalid commit failing again every interval
//! counts a repeat on its reconcile record instead of a new event.
//!
//! What it must not do: put a secret in an event (writers pass names, numbers, commit ids and error text
//! that already goes to the logs and commit statuses), wait on anything but Postgres inside the
//! caller's transaction, or fail the caller: an event that cannot be written is the caller's database
//! error, the same as its cause's.

use std::time::Duration;

use cairn_proto::admin::EventInfo;
use cairn_schema::Name;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::store::StoreError;
use crate::store::events as sql;

/// Every kind of event, with its severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    DeployStarted,
    DeploySucceeded,
    DeployFailed,
    ApplySucceeded,
    ApplyFailed,
    NodeOffline,
    NodeOnline,
    ReplicaUnplaceable,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::DeployStarted,
        EventKind::DeploySucceeded,
        EventKind::DeployFailed,
        EventKind::ApplySucceeded,
        EventKind::ApplyFailed,
        EventKind::NodeOffline,
        EventKind::NodeOnline,
        EventKind::ReplicaUnplaceable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::DeployStarted => "deploy.started",
            EventKind::DeploySucceeded => "deploy.succeeded",
            EventKind::DeployFailed => "deploy.failed",
            EventKind::ApplySucceeded => "apply.succeeded",
            EventKind::ApplyFailed => "apply.failed",
            EventKind::NodeOffline => "node.offline",
            EventKind::NodeOnline => "node.online",
            EventKind::ReplicaUnplaceable => "replica.unplaceable",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Failures are errors, what needs a look warnings, the rest (successes, a node back) info.
    pub fn severity(self) -> Severity {
        match self {
            EventKind::DeployFailed | EventKind::ApplyFailed | EventKind::NodeOffline => {
                Severity::Error
            }
            EventKind::ReplicaUnplaceable => Severity::Warning,
            EventKind::DeployStarted
            | EventKind::DeploySucceeded
            | EventKind::ApplySucceeded
            | EventKind::NodeOnline => Severity::Info,
        }
    }
}

/// How much an event matters; ordered, so a minimum can be compared.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// An event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub app: Option<Name>,
    pub node: Option<Name>,
    pub release: Option<u64>,
    pub commit: Option<String>,
    /// One line a person reads.
    pub message: String,
    /// What a machine reads.
    pub detail: Value,
}

impl NewEvent {
    pub fn new(kind: EventKind, message: impl Into<String>) -> NewEvent {
        NewEvent {
            kind,
            app: None,
            node: None,
            release: None,
            commit: None,
            message: one_line(&message.into()),
            detail: json!({}),
        }
    }

    pub fn app(mut self, app: &Name) -> Self {
        self.app = Some(app.clone());
        self
    }

    pub fn node(mut self, node: &Name) -> Self {
        self.node = Some(node.clone());
        self
    }

    pub fn release(mut self, release: u64) -> Self {
        self.release = Some(release);
        self
    }

    pub fn commit(mut self, commit: &str) -> Self {
        self.commit = Some(commit.to_owned());
        self
    }

    pub fn detail(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }

    /// A node missed its heartbeats for `after`.
    pub fn node_offline(node: &Name, after: Duration) -> NewEvent {
        NewEvent::new(
            EventKind::NodeOffline,
            format!(
                "node {node} is offline: no heartbeat for {}s",
                after.as_secs_f64()
            ),
        )
        .node(node)
        .detail(json!({ "offline_after_secs": after.as_secs_f64() }))
    }

    /// A node that was offline sent a heartbeat.
    pub fn node_online(node: &Name) -> NewEvent {
        NewEvent::new(
            EventKind::NodeOnline,
            format!("node {node} is online again"),
        )
        .node(node)
        .detail(json!({ "resolves": EventKind::NodeOffline.as_str() }))
    }
}

/// At most this many bytes of a message (a reason quoting an agent's error can be long).
const MAX_MESSAGE_BYTES: usize = 1000;

/// Control characters (a line break in an error) become spaces: a message is one line in every view.
fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    if out.trim().is_empty() {
        out = "(no message)".to_owned();
    }
    out
}

/// Records `events` in the transaction `conn` is in (nothing when empty).
pub async fn record(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    sql::insert(conn, events).await?;
    Ok(())
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub app: Option<String>,
    /// Only events with a larger id (following).
    pub after: Option<i64>,
    /// At most this many: the newest ones, in id order.
    pub limit: u32,
}

/// Events matching `filter`, oldest first.
pub async fn list(pool: &PgPool, filter: &Filter) -> Result<Vec<EventInfo>, StoreError> {
    sql::list(pool, filter).await
}

/// Deletes events older than `older_than`; returns how many.
pub async fn prune(pool: &PgPool, older_than: Duration) -> Result<u64, StoreError> {
    sql::prune(pool, older_than).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_failures_are_errors() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(EventKind::DeployFailed.severity(), Severity::Error);
        assert!(Severity::Info < Severity::Warning && Severity::Warning < Severity::Error);
    }

    #[test]
    fn a_message_is_one_bounded_line() {
        assert_eq!(one_line("a\nb\r\tc"), "a b  c");
        assert_eq!(one_line("\n"), "(no message)");
        let long = "é".repeat(2000);
        let m = one_line(&long);
        assert!(m.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert!(m.ends_with('…'));
    }
}
