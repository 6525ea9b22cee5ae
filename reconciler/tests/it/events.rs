//! Events and the notifications they queue, against a real PostgreSQL: which sinks get a row, which rows
//! are not sent and why (severity, the hourly limit, a resolve whose alert was not sent), all in the
//! caller's transaction.

use std::time::Duration;

use cairn_plan::observed::AppliedSink;
use cairn_reconciler::events::{EventKind, NewEvent, record};
use cairn_schema::{Name, SinkKind, SinkSeverity};
use sqlx::PgPool;

async fn add_sink(pool: &PgPool, name: &str, events: &[&str], severity: SinkSeverity, max: u32) {
    let spec = AppliedSink {
        kind: SinkKind::Webhook,
        url_sha256: "0".repeat(64),
        signing_secret_sha256: None,
        events: events.iter().map(|e| (*e).to_owned()).collect(),
        apps: vec!["*".into()],
        severity,
        max_per_hour: max,
    };
    sqlx::query(
        "INSERT INTO notify_sinks (name, kind, url_sealed, spec, generation)
         VALUES ($1, 'webhook', '-----BEGIN AGE ENCRYPTED FILE-----', $2, 1)",
    )
    .bind(name)
    .bind(serde_json::to_value(spec).unwrap())
    .execute(pool)
    .await
    .unwrap();
}

/// (event kind, sink, status, reason) of every queued notification, in order.
async fn rows(pool: &PgPool) -> Vec<(String, String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT e.kind, o.sink, o.status, o.last_error
         FROM notify_outbox o JOIN events e ON e.id = o.event_id ORDER BY o.id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn emit(pool: &PgPool, events: &[NewEvent]) {
    let mut tx = pool.begin().await.unwrap();
    record(&mut tx, events).await.unwrap();
    tx.commit().await.unwrap();
}

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

#[tokio::test]
async fn sinks_get_what_they_ask_for_and_every_row_not_sent_says_why() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    add_sink(pool, "all", &["*"], SinkSeverity::Info, 3).await;
    add_sink(
        pool,
        "failures",
        &["deploy.failed"],
        SinkSeverity::Warning,
        30,
    )
    .await;
    add_sink(pool, "nodes", &["node.offline"], SinkSeverity::Error, 30).await;

    let started = NewEvent::new(EventKind::DeployStarted, "started").app(&n("web"));
    let failed = NewEvent::new(EventKind::DeployFailed, "failed").app(&n("web"));
    emit(pool, &[started.clone(), failed.clone()]).await;
    assert_eq!(
        rows(pool).await,
        [
            (
                "deploy.started".into(),
                "all".into(),
                "pending".into(),
                None
            ),
            ("deploy.failed".into(), "all".into(), "pending".into(), None),
            (
                "deploy.failed".into(),
                "failures".into(),
                "pending".into(),
                None
            ),
        ],
        "a success only where asked for (severity info)"
    );

    // A rolled-back cause leaves neither the event nor its notifications.
    let mut tx = pool.begin().await.unwrap();
    record(&mut tx, std::slice::from_ref(&failed))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(rows(pool).await.len(), 3);

    // `all` reaches its limit of 3 an hour: the fourth is recorded as not sent, with the reason.
    let offline = NewEvent::node_offline(&n("a"), Duration::from_secs(90));
    emit(pool, &[offline]).await;
    emit(pool, &[NewEvent::node_online(&n("a"))]).await;
    let r = rows(pool).await;
    assert_eq!(r.len(), 7, "{r:#?}");
    assert_eq!(
        r[3],
        ("node.offline".into(), "all".into(), "pending".into(), None)
    );
    assert_eq!(
        r[4],
        (
            "node.offline".into(),
            "nodes".into(),
            "pending".into(),
            None
        )
    );
    // The resolve goes where the alert went (`nodes` asked for node.offline only, at `error`); `all`
    // is over its limit.
    assert_eq!(r[5].0, "node.online");
    assert_eq!(r[5].1, "all");
    assert_eq!(r[5].2, "suppressed");
    assert!(
        r[5].3
            .as_deref()
            .unwrap()
            .contains("limit of 3 messages an hour"),
        "{r:#?}"
    );
    assert_eq!(
        r[6],
        ("node.online".into(), "nodes".into(), "pending".into(), None)
    );
}

#[tokio::test]
async fn a_resolve_whose_alert_was_not_sent_is_not_sent_either() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    add_sink(pool, "ops", &["node.*"], SinkSeverity::Warning, 1).await;
    emit(
        pool,
        &[NewEvent::new(EventKind::ReplicaUnplaceable, "x").app(&n("web"))],
    )
    .await;
    emit(
        pool,
        &[NewEvent::node_offline(&n("b"), Duration::from_secs(3))],
    )
    .await;
    emit(
        pool,
        &[NewEvent::node_offline(&n("a"), Duration::from_secs(3))],
    )
    .await;
    emit(pool, &[NewEvent::node_online(&n("a"))]).await;
    let r = rows(pool).await;
    assert_eq!(r.len(), 3, "replica.unplaceable is not node.*: {r:#?}");
    assert_eq!(r[0].2, "pending");
    assert_eq!(r[1].2, "suppressed", "over the limit of 1: {r:#?}");
    assert_eq!(r[2].0, "node.online");
    assert_eq!(r[2].2, "suppressed");
    assert!(
        r[2].3.as_deref().unwrap().contains("was not sent"),
        "{r:#?}"
    );
}
