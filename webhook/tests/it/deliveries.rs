//! The delivery worker against a real PostgreSQL: retries, giving up, concurrency, history, pruning.

use std::sync::Arc;
use std::time::Duration;

use cairn_webhook::deliveries::{
    self, DeliveryStatus, MAX_HANDLER_ATTEMPTS, process_pending, prune_deliveries,
};
use cairn_webhook::events::{Routes, TrackedRepo};
use serde_json::json;
use sqlx::PgPool;

use crate::support::{self, Delivery, Recorder, Server};

fn routes() -> Routes {
    Routes {
        config_repo: Some(TrackedRepo {
            url: "https://github.com/acme/platform.git".to_owned(),
            branch: "main".to_owned(),
        }),
        apps: vec![],
    }
}

fn push(n: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ref": "refs/heads/main",
        "before": format!("{:040x}", n),
        "after": format!("{:040x}", n + 1),
        "created": false,
        "deleted": false,
        "repository": {
            "full_name": "acme/platform",
            "clone_url": "https://github.com/acme/platform.git",
            "html_url": "https://github.com/acme/platform",
            "ssh_url": "git@github.com:acme/platform.git"
        },
        "head_commit": null,
        "pusher": {"name": "ops"}
    }))
    .unwrap()
}

async fn make_due(pool: &PgPool) {
    sqlx::query("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE status = 'received'")
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failing_handler_is_retried_later_and_its_writes_are_undone() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    support::post(&server.url(), Delivery::signed("push", "retry-1", push(1))).await;
    let handler = Recorder::new(db.pool(), routes()).await;
    *handler.fail_next.lock().unwrap() = 1;

    let first = process_pending(db.pool(), &*handler).await.unwrap();
    assert_eq!(first.retrying, 1, "{first:?}");
    // The handler wrote its effect before failing: rolled back with it.
    assert!(support::effects(db.pool()).await.is_empty());
    let (status, attempts, outcome, wait): (String, i32, String, f64) = sqlx::query_as(
        "SELECT status, attempts, outcome, extract(epoch FROM next_attempt_at - now())::float8
         FROM webhook_deliveries",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempts), ("received", 1));
    assert_eq!(outcome, "the reconciler is unavailable");
    assert!(wait > 0.5, "retried after a backoff, not at once: {wait}");

    // Not due yet: nothing happens.
    assert_eq!(
        process_pending(db.pool(), &*handler).await.unwrap().total(),
        0
    );
    make_due(db.pool()).await;
    let second = process_pending(db.pool(), &*handler).await.unwrap();
    assert_eq!(second.handled, 1, "{second:?}");
    assert_eq!(support::effects(db.pool()).await.len(), 1);
    let records = deliveries::recent(db.pool(), 10).await.unwrap();
    assert_eq!(records[0].status, DeliveryStatus::Handled);
    assert_eq!(records[0].attempts, 1);
}

#[tokio::test]
async fn a_handler_that_keeps_failing_ends_failed_with_its_error() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    support::post(&server.url(), Delivery::signed("push", "fail-1", push(1))).await;
    let handler = Recorder::new(db.pool(), routes()).await;
    *handler.fail_next.lock().unwrap() = u32::MAX;
    for _ in 0..MAX_HANDLER_ATTEMPTS {
        process_pending(db.pool(), &*handler).await.unwrap();
        make_due(db.pool()).await;
    }
    let records = deliveries::recent(db.pool(), 10).await.unwrap();
    assert_eq!(records[0].status, DeliveryStatus::Failed);
    assert_eq!(
        records[0].outcome.as_deref(),
        Some("gave up after 5 attempts: the reconciler is unavailable")
    );
    assert!(records[0].handled_at.is_some());
    assert!(support::effects(db.pool()).await.is_empty());
    // Finished: never tried again.
    assert_eq!(
        process_pending(db.pool(), &*handler).await.unwrap().total(),
        0
    );
}

#[tokio::test]
async fn concurrent_workers_process_each_delivery_exactly_once_in_order() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    const N: u32 = 40;
    for n in 0..N {
        let (status, _) = support::post(
            &server.url(),
            Delivery::signed("push", &format!("c-{n:03}"), push(n)),
        )
        .await;
        assert_eq!(status, 202);
    }
    let handler = Recorder::new(db.pool(), routes()).await;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let pool = db.pool().clone();
            let handler = handler.clone();
            tokio::spawn(async move { process_pending(&pool, &*handler).await.unwrap() })
        })
        .collect();
    let mut handled = 0;
    for w in workers {
        handled += w.await.unwrap().handled;
    }
    assert_eq!(handled, N as usize);
    let effects = support::effects(db.pool()).await;
    let mut ids: Vec<&str> = effects.iter().map(|(id, _, _)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        N as usize,
        "each delivery had exactly one effect"
    );
}

#[tokio::test]
async fn the_worker_loop_wakes_on_the_receivers_notify() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let handler = Recorder::new(db.pool(), routes()).await;
    let stop = cairn_reconciler::worker::Shutdown::new();
    let worker = tokio::spawn({
        let (pool, handler, wake, stop) = (
            db.pool().clone(),
            handler.clone(),
            server.wake.clone(),
            stop.clone(),
        );
        // No polling to speak of: only the notify can make this test pass in time.
        async move { deliveries::run(pool, handler, wake, Duration::from_secs(3600), &stop).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    support::post(&server.url(), Delivery::signed("push", "loop-1", push(1))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while support::effects(db.pool()).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker was not woken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.trigger();
    worker.await.unwrap();
}

#[tokio::test]
async fn prune_deletes_old_finished_deliveries_only() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    for id in ["old-done", "old-waiting", "new-done"] {
        support::post(&server.url(), Delivery::signed("push", id, push(1))).await;
    }
    let handler = Recorder::new(db.pool(), routes()).await;
    sqlx::query(
        "UPDATE webhook_deliveries SET next_attempt_at = now() + interval '1 hour'
         WHERE delivery_id = 'old-waiting'",
    )
    .execute(db.pool())
    .await
    .unwrap();
    process_pending(db.pool(), &*handler).await.unwrap();
    sqlx::query(
        "UPDATE webhook_deliveries SET received_at = now() - interval '40 days'
         WHERE delivery_id LIKE 'old-%'",
    )
    .execute(db.pool())
    .await
    .unwrap();

    let pruned = prune_deliveries(db.pool(), Duration::from_secs(30 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(pruned, 1);
    let left: Vec<String> = support::deliveries(db.pool())
        .await
        .into_iter()
        .map(|row| row.0)
        .collect();
    assert_eq!(left, ["new-done", "old-waiting"]);
}

#[tokio::test]
async fn recent_lists_the_newest_first_with_what_each_caused() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    support::post(&server.url(), Delivery::signed("push", "r-1", push(1))).await;
    support::post(
        &server.url(),
        Delivery::signed(
            "ping",
            "r-2",
            br#"{"zen":"Speak like a human.","hook_id":3}"#.to_vec(),
        ),
    )
    .await;
    let handler = Arc::new(Recorder::new(db.pool(), routes()).await);
    process_pending(db.pool(), &**handler).await.unwrap();
    let records = deliveries::recent(db.pool(), 10).await.unwrap();
    let seen: Vec<(&str, DeliveryStatus, Option<&str>)> = records
        .iter()
        .map(|r| (r.delivery_id.as_str(), r.status, r.outcome.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "r-2",
                DeliveryStatus::Handled,
                Some("ping from hook 3: Speak like a human.")
            ),
            (
                "r-1",
                DeliveryStatus::Handled,
                Some("config_push main@0000000000000000000000000000000000000002")
            ),
        ]
    );
}
