//! The `events` table (`crate::events` says what goes in it): inserted in the caller's transaction, all
//! of a call's events in one statement, read oldest first, pruned by age.
//!
//! Queries here are runtime-checked (`sqlx::query`, not `query!`): they need no `.sqlx/` data.
//!
//! What it must not do: decide which events exist (the callers do), or hold a transaction of its own
//! where the caller's is the point.

use std::time::Duration;

use cairn_proto::admin::EventInfo;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row as _};

use super::decode::millis;
use super::{Op as _, StoreError};

/// An event row to insert (`crate::events` builds them).
pub(crate) struct EventRow<'a> {
    pub kind: &'a str,
    pub severity: &'a str,
    pub app: Option<&'a str>,
    pub node: Option<&'a str>,
    pub release: Option<u64>,
    pub commit: Option<&'a str>,
    pub message: &'a str,
    pub detail: &'a Value,
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

/// Inserts `events` (one statement) and returns their ids, in order.
pub(crate) async fn insert(
    conn: &mut PgConnection,
    events: &[EventRow<'_>],
) -> Result<Vec<i64>, StoreError> {
    let mut kinds = Vec::with_capacity(events.len());
    let mut severities = Vec::with_capacity(events.len());
    let mut apps = Vec::with_capacity(events.len());
    let mut nodes = Vec::with_capacity(events.len());
    let mut releases = Vec::with_capacity(events.len());
    let mut commits = Vec::with_capacity(events.len());
    let mut messages = Vec::with_capacity(events.len());
    let mut details = Vec::with_capacity(events.len());
    for e in events {
        kinds.push(e.kind);
        severities.push(e.severity);
        apps.push(e.app);
        nodes.push(e.node);
        releases.push(
            e.release
                .map(|r| super::to_i64("a release number", r))
                .transpose()?,
        );
        commits.push(e.commit);
        messages.push(e.message);
        details.push(Json(e.detail));
    }
    sqlx::query_scalar(
        "INSERT INTO events (kind, severity, app, node, release, commit, message, detail)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                              $6::text[], $7::text[], $8::jsonb[])
         RETURNING id",
    )
    .bind(&kinds)
    .bind(&severities)
    .bind(&apps)
    .bind(&nodes)
    .bind(&releases)
    .bind(&commits)
    .bind(&messages)
    .bind(&details)
    .fetch_all(conn)
    .await
    .op("record events")
}

/// Events matching `filter`: the newest `limit`, oldest first.
pub(crate) async fn list(pool: &PgPool, filter: &Filter) -> Result<Vec<EventInfo>, StoreError> {
    let rows = sqlx::query(
        "SELECT * FROM (
             SELECT id, at, kind, severity, app, node, release, commit, message, detail
             FROM events
             WHERE ($1::text IS NULL OR app = $1) AND ($2::bigint IS NULL OR id > $2)
             ORDER BY id DESC
             LIMIT $3
         ) newest ORDER BY id",
    )
    .bind(filter.app.as_deref())
    .bind(filter.after)
    .bind(i64::from(filter.limit))
    .fetch_all(pool)
    .await
    .op("read events")?;
    rows.into_iter()
        .map(|row| {
            let release: Option<i64> = row.try_get("release")?;
            Ok(EventInfo {
                id: row.try_get("id")?,
                at: row.try_get::<DateTime<Utc>, _>("at")?,
                kind: row.try_get("kind")?,
                severity: row.try_get("severity")?,
                app: row.try_get("app")?,
                node: row.try_get("node")?,
                release: release.and_then(|r| u64::try_from(r).ok()),
                commit: row.try_get("commit")?,
                message: row.try_get("message")?,
                detail: row.try_get::<Json<Value>, _>("detail")?.0,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .op("read events")
}

/// Deletes events older than `older_than`.
pub(crate) async fn prune(pool: &PgPool, older_than: Duration) -> Result<u64, StoreError> {
    Ok(
        sqlx::query("DELETE FROM events WHERE at < now() - $1::float8 * interval '1 millisecond'")
            .bind(millis(older_than))
            .execute(pool)
            .await
            .op("prune old events")?
            .rows_affected(),
    )
}

/// What a deploy event says of its release: the source commit, and the seconds from when the control
/// plane first saw that commit as the branch head (the push, as near as it knows) and from the
/// release's creation, each to the release's end.
pub(crate) struct ReleaseFacts {
    pub source_commit: String,
    pub since_head_secs: Option<f64>,
    pub release_secs: Option<f64>,
}

/// [`ReleaseFacts`] of release `number` of `app`, in the transaction that records its outcome.
pub(crate) async fn release_facts(
    conn: &mut PgConnection,
    app: &str,
    number: u64,
) -> Result<Option<ReleaseFacts>, StoreError> {
    let row = sqlx::query(
        "SELECT r.source_commit,
                extract(epoch FROM coalesce(r.finished_at, now()) - h.observed_at)::float8 AS since_head,
                extract(epoch FROM coalesce(r.finished_at, now()) - r.created_at)::float8 AS release_secs
         FROM releases r
         LEFT JOIN source_heads h ON h.app = r.app AND h.commit = r.source_commit
         WHERE r.app = $1 AND r.number = $2",
    )
    .bind(app)
    .bind(super::to_i64("release", number)?)
    .fetch_optional(conn)
    .await
    .op("read a release for its event")?;
    row.map(|row| {
        Ok(ReleaseFacts {
            source_commit: row.try_get("source_commit")?,
            since_head_secs: row.try_get("since_head")?,
            release_secs: row.try_get("release_secs")?,
        })
    })
    .transpose()
    .op("read a release for its event")
}

/// An applied notification sink, as event recording matches it (no secret: the spec has digests).
pub(crate) struct SinkRow {
    pub name: String,
    pub spec: cairn_plan::observed::AppliedSink,
}

/// Every applied sink.
pub(crate) async fn sinks(conn: &mut PgConnection) -> Result<Vec<SinkRow>, StoreError> {
    let rows = sqlx::query("SELECT name, spec FROM notify_sinks ORDER BY name")
        .fetch_all(conn)
        .await
        .op("read notification sinks")?;
    rows.into_iter()
        .map(|row| {
            let name: String = row.try_get("name").op("read notification sinks")?;
            let spec: Value = row.try_get("spec").op("read notification sinks")?;
            Ok(SinkRow {
                name,
                spec: super::decode::json("notify_sinks", "spec", spec)?,
            })
        })
        .collect()
}

/// How many times `node` went offline within `window` (its events).
pub(crate) async fn offline_count(
    conn: &mut PgConnection,
    node: &str,
    window: Duration,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events
         WHERE node = $1 AND kind = 'node.offline'
           AND at > now() - $2::float8 * interval '1 millisecond'",
    )
    .bind(node)
    .bind(millis(window))
    .fetch_one(conn)
    .await
    .op("count a node's recent offline events")
}

/// Whether `sink` was sent (or is sending) the last `node.offline` of `node`: its resolve follows it.
pub(crate) async fn last_offline_sent(
    conn: &mut PgConnection,
    sink: &str,
    node: &str,
) -> Result<bool, StoreError> {
    let status: Option<String> = sqlx::query_scalar(
        "SELECT o.status FROM events e
         JOIN notify_outbox o ON o.event_id = e.id AND o.sink = $1
         WHERE e.id = (SELECT max(id) FROM events WHERE node = $2 AND kind = 'node.offline')",
    )
    .bind(sink)
    .bind(node)
    .fetch_optional(conn)
    .await
    .op("find a node's last offline notification")?;
    Ok(status.is_some_and(|s| s != "suppressed"))
}

/// Per sink, the messages queued or sent within the last hour (not those suppressed).
pub(crate) async fn sent_this_hour(
    conn: &mut PgConnection,
) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sink, count(*) FROM notify_outbox
         WHERE created_at > now() - interval '1 hour' AND status <> 'suppressed'
         GROUP BY sink",
    )
    .fetch_all(conn)
    .await
    .op("count a sink's recent notifications")?;
    Ok(rows.into_iter().collect())
}

/// A delivery of an event to a sink: pending, or `suppressed` with why.
pub(crate) struct NewDelivery {
    pub event: i64,
    pub sink: String,
    pub suppressed: Option<String>,
}

/// Inserts deliveries (one statement). The `webhook-id` is `evt_<event>_<sink>`: stable across retries.
pub(crate) async fn insert_deliveries(
    conn: &mut PgConnection,
    rows: &[NewDelivery],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let events: Vec<i64> = rows.iter().map(|r| r.event).collect();
    let sinks: Vec<&str> = rows.iter().map(|r| r.sink.as_str()).collect();
    let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.suppressed.as_deref()).collect();
    sqlx::query(
        "INSERT INTO notify_outbox (event_id, sink, webhook_id, status, last_error, finished_at)
         SELECT e, s, 'evt_' || e || '_' || s,
                CASE WHEN r IS NULL THEN 'pending' ELSE 'suppressed' END,
                r,
                CASE WHEN r IS NULL THEN NULL ELSE now() END
         FROM unnest($1::bigint[], $2::text[], $3::text[]) AS t(e, s, r)",
    )
    .bind(&events)
    .bind(&sinks)
    .bind(&reasons)
    .execute(conn)
    .await
    .op("queue notifications")?;
    Ok(())
}
