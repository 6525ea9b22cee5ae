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
    /// A node went offline too often in a short time: this one message stands for the changes that
    /// follow until it is steady again.
    NodeFlapping,
    ReplicaUnplaceable,
    /// A certificate's first failed attempt in a row: the CA refused, or its names do not reach the
    /// cluster (`waiting_dns`).
    CertificateFailed,
    /// A certificate expires within 14 days (once per certificate, by serial).
    CertificateExpiring,
    /// A node's replicas did not match its placements and repair tasks were enqueued.
    DriftRepaired,
    /// A database backup failed for good (its attempts used up, or retrying cannot help).
    DatabaseBackupFailed,
    /// A database's backups are overdue: none good within two of its schedule's intervals (once per
    /// recovery point).
    DatabaseBackupOverdue,
    /// A database's version upgrade failed for good; its old instance keeps serving.
    DatabaseUpgradeFailed,
    /// A verification restore of a database's backup failed for good: it did not restore, or restored
    /// other rows than the backup was taken with.
    DatabaseVerifyFailed,
}

impl EventKind {
    pub const ALL: [EventKind; 16] = [
        EventKind::DeployStarted,
        EventKind::DeploySucceeded,
        EventKind::DeployFailed,
        EventKind::ApplySucceeded,
        EventKind::ApplyFailed,
        EventKind::NodeOffline,
        EventKind::NodeOnline,
        EventKind::NodeFlapping,
        EventKind::ReplicaUnplaceable,
        EventKind::CertificateFailed,
        EventKind::CertificateExpiring,
        EventKind::DriftRepaired,
        EventKind::DatabaseBackupFailed,
        EventKind::DatabaseBackupOverdue,
        EventKind::DatabaseUpgradeFailed,
        EventKind::DatabaseVerifyFailed,
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
            EventKind::NodeFlapping => "node.flapping",
            EventKind::ReplicaUnplaceable => "replica.unplaceable",
            EventKind::CertificateFailed => "certificate.failed",
            EventKind::CertificateExpiring => "certificate.expiring",
            EventKind::DriftRepaired => "drift.repaired",
            EventKind::DatabaseBackupFailed => "database.backup_failed",
            EventKind::DatabaseBackupOverdue => "database.backup_overdue",
            EventKind::DatabaseUpgradeFailed => "database.upgrade_failed",
            EventKind::DatabaseVerifyFailed => "database.verify_failed",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Failures are errors, what needs a look warnings, the rest (successes, a node back) info.
    pub fn severity(self) -> Severity {
        match self {
            EventKind::DeployFailed
            | EventKind::ApplyFailed
            | EventKind::NodeOffline
            | EventKind::CertificateFailed
            | EventKind::DatabaseBackupFailed
            | EventKind::DatabaseBackupOverdue
            | EventKind::DatabaseUpgradeFailed
            | EventKind::DatabaseVerifyFailed => Severity::Error,
            EventKind::ReplicaUnplaceable
            | EventKind::NodeFlapping
            | EventKind::CertificateExpiring => Severity::Warning,
            EventKind::DeployStarted
            | EventKind::DeploySucceeded
            | EventKind::ApplySucceeded
            | EventKind::NodeOnline
            | EventKind::DriftRepaired => Severity::Info,
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

    /// A certificate's first failed attempt in a row, with why (`state`: `failed` or `waiting_dns`).
    pub fn certificate_failed(app: &str, names: &[String], state: &str, error: &str) -> NewEvent {
        let what = if state == "waiting_dns" {
            "waits for DNS"
        } else {
            "failed"
        };
        let mut e = NewEvent::new(
            EventKind::CertificateFailed,
            format!("certificate for {} {what}: {error}", names.join(", ")),
        )
        .detail(json!({ "names": names, "state": state }));
        e.app = Name::new(app).ok();
        e
    }

    /// A certificate that expires within 14 days.
    pub fn certificate_expiring(
        app: &str,
        names: &[String],
        serial: &str,
        not_after: chrono::DateTime<chrono::Utc>,
    ) -> NewEvent {
        let mut e = NewEvent::new(
            EventKind::CertificateExpiring,
            format!(
                "certificate for {} expires {}",
                names.join(", "),
                not_after.format("%Y-%m-%d %H:%M UTC")
            ),
        )
        .detail(json!({ "names": names, "serial": serial, "not_after": not_after }));
        e.app = Name::new(app).ok();
        e
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

/// A node that went offline more than this many times within [`FLAP_WINDOW`] is flapping: one
/// `node.flapping` message is sent, and its further changes are recorded but not sent until it has been
/// steady for the window.
pub const FLAP_LIMIT: i64 = 3;
/// See [`FLAP_LIMIT`].
pub const FLAP_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Records `events` in the transaction `conn` is in (nothing when empty), and for each the deliveries
/// to the notification sinks that want it ([`deliveries`]), in the same transaction.
pub async fn record(conn: &mut PgConnection, events: &[NewEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let ids = insert(conn, events).await?;
    let sinks = sql::sinks(conn).await?;
    if sinks.is_empty() {
        return Ok(());
    }
    let mut recorded: Vec<(i64, NewEvent)> = ids.into_iter().zip(events.iter().cloned()).collect();
    // A node flapping gets its summary now, recorded beside the change that made it one.
    let mut summaries = Vec::new();
    for (_, e) in &recorded {
        if let (EventKind::NodeOffline, Some(node)) = (e.kind, &e.node) {
            let times = sql::offline_count(conn, node.as_str(), FLAP_WINDOW).await?;
            if times == FLAP_LIMIT + 1 {
                summaries.push(
                    NewEvent::new(
                        EventKind::NodeFlapping,
                        format!(
                            "node {node} went offline {times} times in {} minutes; its next changes are \
                             recorded but not sent until it has been steady for {} minutes",
                            FLAP_WINDOW.as_secs() / 60,
                            FLAP_WINDOW.as_secs() / 60
                        ),
                    )
                    .node(node)
                    .detail(json!({ "offline_times": times, "window_secs": FLAP_WINDOW.as_secs() })),
                );
            }
        }
    }
    if !summaries.is_empty() {
        let ids = insert(conn, &summaries).await?;
        recorded.extend(ids.into_iter().zip(summaries));
    }
    let mut sent_this_hour = sql::sent_this_hour(conn).await?;
    let mut rows = Vec::new();
    for (id, e) in &recorded {
        for sink in &sinks {
            let Some(why_not) = deliverable(conn, sink, e).await? else {
                continue;
            };
            let count = sent_this_hour.entry(sink.name.clone()).or_insert(0);
            let why_not = why_not.or_else(|| {
                (*count >= i64::from(sink.spec.max_per_hour)).then(|| {
                    format!(
                        "not sent: sink `{}` reached its limit of {} messages an hour",
                        sink.name, sink.spec.max_per_hour
                    )
                })
            });
            if why_not.is_none() {
                *count += 1;
            }
            rows.push(sql::NewDelivery {
                event: *id,
                sink: sink.name.clone(),
                suppressed: why_not,
            });
        }
    }
    sql::insert_deliveries(conn, &rows).await
}

async fn insert(conn: &mut PgConnection, events: &[NewEvent]) -> Result<Vec<i64>, StoreError> {
    let rows: Vec<sql::EventRow<'_>> = events
        .iter()
        .map(|e| sql::EventRow {
            kind: e.kind.as_str(),
            severity: e.kind.severity().as_str(),
            app: e.app.as_ref().map(Name::as_str),
            node: e.node.as_ref().map(Name::as_str),
            release: e.release,
            commit: e.commit.as_deref(),
            message: &e.message,
            detail: &e.detail,
        })
        .collect();
    sql::insert(conn, &rows).await
}

/// Whether `sink` wants `e`: `None` when not at all, `Some(None)` to send it, `Some(Some(why))` to
/// record it as not sent (a flapping node's change).
async fn deliverable(
    conn: &mut PgConnection,
    sink: &sql::SinkRow,
    e: &NewEvent,
) -> Result<Option<Option<String>>, StoreError> {
    let spec = &sink.spec;
    let app = e.app.as_ref().map(Name::as_str);
    let wants = |kind: EventKind| {
        cairn_schema::Sink::matches(&spec.events, &spec.apps, kind.as_str(), app)
            && severity_at_least(kind.severity(), spec.severity)
    };
    let node = e.node.as_ref().map(Name::as_str);
    match (e.kind, node) {
        // A resolve goes where its alert went (whatever the sink's severity), and only if it went.
        (EventKind::NodeOnline, Some(node)) => {
            if !wants(EventKind::NodeOnline) && !wants(EventKind::NodeOffline) {
                return Ok(None);
            }
            if !sql::last_offline_sent(conn, &sink.name, node).await? {
                return Ok(Some(Some(format!(
                    "not sent: node {node}'s going offline was not sent to sink `{}` either",
                    sink.name
                ))));
            }
            Ok(Some(flapping(conn, node).await?))
        }
        (EventKind::NodeOffline, Some(node)) => {
            if !wants(EventKind::NodeOffline) {
                return Ok(None);
            }
            Ok(Some(flapping(conn, node).await?))
        }
        (EventKind::NodeFlapping, _) => {
            Ok((wants(EventKind::NodeFlapping) || wants(EventKind::NodeOffline)).then_some(None))
        }
        (kind, _) => Ok(wants(kind).then_some(None)),
    }
}

/// Why a node's change is not sent: it went offline more than [`FLAP_LIMIT`] times in the window.
async fn flapping(conn: &mut PgConnection, node: &str) -> Result<Option<String>, StoreError> {
    let times = sql::offline_count(conn, node, FLAP_WINDOW).await?;
    Ok((times > FLAP_LIMIT).then(|| {
        format!(
            "not sent: node {node} is flapping ({times} times offline in {} minutes); summarised by \
             one node.flapping message",
            FLAP_WINDOW.as_secs() / 60
        )
    }))
}

fn severity_at_least(s: Severity, min: cairn_schema::SinkSeverity) -> bool {
    let min = match min {
        cairn_schema::SinkSeverity::Info => Severity::Info,
        cairn_schema::SinkSeverity::Warning => Severity::Warning,
        cairn_schema::SinkSeverity::Error => Severity::Error,
    };
    s >= min
}

pub use crate::store::events::Filter;

/// Events matching `filter`, oldest first.
pub async fn list(pool: &PgPool, filter: &Filter) -> Result<Vec<EventInfo>, StoreError> {
    sql::list(pool, filter).await
}

/// Deletes events older than `older_than` (their deliveries with them); returns how many.
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
        // What a sink's `events` may name is this very set.
        let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, cairn_schema::model::EVENT_KINDS);
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
