//! The task queue against a real PostgreSQL (a fresh database per test, see `cairn-testkit`).
//!
//! Time-dependent behaviour (lease expiry, backoff) is driven by moving the task's times in the database
//! rather than by sleeping: the queue reads only the database clock.

use std::collections::HashSet;
use std::time::Duration;

use cairn_reconciler::queue::{
    self, Backoff, FailOutcome, Listener, NewTask, QueueError, TaskId, TaskKind, TaskStatus, Wake,
};
use cairn_schema::Name;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn task(node: &str, key: &str) -> NewTask {
    NewTask::new(name(node), TaskKind::Deploy, name("shop"), key)
}

async fn enqueue(pool: &PgPool, tasks: &[NewTask]) -> Vec<TaskId> {
    let mut tx = pool.begin().await.unwrap();
    let ids = queue::enqueue_many(&mut tx, tasks).await.unwrap();
    tx.commit().await.unwrap();
    ids
}

/// Moves a task's next-eligible time (and, when leased, its lease expiry) into the past.
async fn make_due(pool: &PgPool, id: TaskId) {
    sqlx::query(
        "UPDATE tasks SET run_after = now() - interval '1 second',
                          lease_expires_at = CASE WHEN status = 'leased'
                                                  THEN now() - interval '1 second' END
         WHERE id = $1",
    )
    .bind(id.0)
    .execute(pool)
    .await
    .unwrap();
}

async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .unwrap()
}

const LEASE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_concurrent_leasers_never_get_the_same_task() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let tasks: Vec<NewTask> = (0..400).map(|i| task("fra-1", &format!("t{i}"))).collect();
    let ids = enqueue(pool, &tasks).await;
    assert_eq!(ids.len(), 400);
    enqueue(pool, &[task("fra-2", "other-node")]).await;

    let leasers: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = queue::lease(&pool, &name("fra-1"), 7, LEASE).await.unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    assert!(batch.iter().all(|t| t.node.as_str() == "fra-1"));
                    got.extend(batch.into_iter().map(|t| (t.id, t.token)));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut busy_leasers = 0;
    for l in leasers {
        let got = l.await.unwrap();
        busy_leasers += usize::from(!got.is_empty());
        all.extend(got);
    }
    let distinct: HashSet<TaskId> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(all.len(), 400, "every task leased exactly once");
    assert_eq!(distinct, ids.iter().copied().collect::<HashSet<_>>());
    let tokens: HashSet<_> = all.iter().map(|(_, t)| *t).collect();
    assert_eq!(tokens.len(), 400, "every lease has its own token");
    assert!(busy_leasers >= 2, "the leasers ran concurrently");
}

#[tokio::test]
async fn an_expired_lease_is_handed_out_again_and_the_old_token_is_refused() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let [id] = enqueue(pool, &[task("fra-1", "a")]).await[..] else {
        panic!()
    };

    let first = queue::lease(pool, &name("fra-1"), 10, LEASE).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].id, first[0].attempt), (id, 1));
    assert!(
        queue::lease(pool, &name("fra-1"), 10, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "a live lease is not handed out twice"
    );

    make_due(pool, id).await;
    let second = queue::lease(pool, &name("fra-1"), 10, LEASE).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!((second[0].id, second[0].attempt), (id, 2));
    assert!(second[0].token > first[0].token, "fencing tokens increase");

    let old = first[0].token;
    let stale = |r: Result<_, QueueError>| {
        matches!(r, Err(QueueError::StaleLease { task, token, status: TaskStatus::Leased })
            if task == id && token == old)
    };
    assert!(stale(queue::complete(pool, id, old).await.map(|_| ())));
    assert!(stale(
        queue::fail(pool, id, old, "late", &Backoff::default())
            .await
            .map(|_| ())
    ));
    assert!(stale(queue::extend(pool, id, old, LEASE).await.map(|_| ())));

    queue::complete(pool, id, second[0].token).await.unwrap();
    let state = queue::state(pool, id).await.unwrap().unwrap();
    assert_eq!(state.status, TaskStatus::Done);
    assert!(matches!(
        queue::complete(pool, id, second[0].token).await,
        Err(QueueError::StaleLease {
            status: TaskStatus::Done,
            ..
        })
    ));
    assert!(matches!(
        queue::complete(pool, TaskId(id.0 + 1000), old).await,
        Err(QueueError::NotFound { .. })
    ));
}

/// Nobody else holds the task, so accepting the result cannot double-execute it.
#[tokio::test]
async fn an_expired_lease_nobody_took_can_still_complete() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let [id] = enqueue(pool, &[task("fra-1", "a")]).await[..] else {
        panic!()
    };
    let leased = queue::lease(pool, &name("fra-1"), 1, LEASE).await.unwrap();
    make_due(pool, id).await;
    queue::complete(pool, id, leased[0].token).await.unwrap();
    assert!(
        queue::lease(pool, &name("fra-1"), 1, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn failures_back_off_exponentially_then_the_task_is_dead() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let backoff = Backoff {
        base: Duration::from_secs(10),
        max: Duration::from_secs(15),
    };
    let [id] = enqueue(
        pool,
        &[NewTask {
            max_attempts: 3,
            ..task("fra-1", "a")
        }],
    )
    .await[..] else {
        panic!()
    };
    let node = name("fra-1");

    // Attempt 1 fails: retried after `base`.
    let t = queue::lease(pool, &node, 1, LEASE).await.unwrap().remove(0);
    let before = db_now(pool).await;
    let FailOutcome::Retry { run_after } = queue::fail(pool, id, t.token, "exit 1", &backoff)
        .await
        .unwrap()
    else {
        panic!("the first failure is retried")
    };
    let wait = (run_after - before).num_milliseconds();
    assert!(
        (9_000..=11_000).contains(&wait),
        "first backoff is ~10 s, got {wait} ms"
    );
    let state = queue::state(pool, id).await.unwrap().unwrap();
    assert_eq!((state.status, state.attempts), (TaskStatus::Failed, 1));
    assert_eq!(state.last_error.as_deref(), Some("exit 1"));
    assert!(
        queue::lease(pool, &node, 1, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "not before its backoff"
    );

    // Attempt 2 fails: 2 × base = 20 s, capped at 15 s.
    make_due(pool, id).await;
    let t = queue::lease(pool, &node, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(t.attempt, 2);
    let before = db_now(pool).await;
    let FailOutcome::Retry { run_after } = queue::fail(pool, id, t.token, "exit 2", &backoff)
        .await
        .unwrap()
    else {
        panic!("the second failure is retried")
    };
    let wait = (run_after - before).num_milliseconds();
    assert!(
        (14_000..=16_000).contains(&wait),
        "second backoff is capped at 15 s, got {wait} ms"
    );

    // Attempt 3 is the last: dead, and never handed out again.
    make_due(pool, id).await;
    let t = queue::lease(pool, &node, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(t.attempt, 3);
    assert_eq!(
        queue::fail(pool, id, t.token, "exit 3", &backoff)
            .await
            .unwrap(),
        FailOutcome::Dead
    );
    make_due(pool, id).await;
    assert!(
        queue::lease(pool, &node, 1, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    let state = queue::state(pool, id).await.unwrap().unwrap();
    assert_eq!((state.status, state.attempts), (TaskStatus::Dead, 3));
    assert_eq!(state.last_error.as_deref(), Some("exit 3"));
}

#[tokio::test]
async fn a_lease_that_expires_on_the_last_attempt_makes_the_task_dead() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let [id] = enqueue(
        pool,
        &[NewTask {
            max_attempts: 1,
            ..task("fra-1", "a")
        }],
    )
    .await[..] else {
        panic!()
    };
    queue::lease(pool, &name("fra-1"), 1, LEASE).await.unwrap();
    make_due(pool, id).await;
    assert!(
        queue::lease(pool, &name("fra-1"), 1, LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    let state = queue::state(pool, id).await.unwrap().unwrap();
    assert_eq!(state.status, TaskStatus::Dead);
    assert!(
        state
            .last_error
            .unwrap()
            .contains("lease of the last attempt expired")
    );
}

#[tokio::test]
async fn extend_pushes_the_lease_expiry() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let [id] = enqueue(pool, &[task("fra-1", "a")]).await[..] else {
        panic!()
    };
    let t = queue::lease(pool, &name("fra-1"), 1, Duration::from_secs(1))
        .await
        .unwrap()
        .remove(0);
    let expiry = queue::extend(pool, id, t.token, Duration::from_secs(300))
        .await
        .unwrap();
    assert!((expiry - t.expires_at).num_seconds() >= 298);
    let state = queue::state(pool, id).await.unwrap().unwrap();
    assert_eq!(state.lease_expires_at, Some(expiry));
    assert_eq!(
        state.run_after, expiry,
        "a leased task is due again when its lease expires"
    );
}

#[tokio::test]
async fn enqueue_commits_with_the_callers_transaction_and_never_twice() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let node = name("fra-1");

    let mut tx = pool.begin().await.unwrap();
    assert!(
        queue::enqueue(&mut tx, &task("fra-1", "rolled-back"))
            .await
            .unwrap()
            .is_some()
    );
    tx.rollback().await.unwrap();
    assert!(
        queue::lease(pool, &node, 10, LEASE)
            .await
            .unwrap()
            .is_empty()
    );

    let mut tx = pool.begin().await.unwrap();
    let first = queue::enqueue(&mut tx, &task("fra-1", "deploy:shop:1:g1"))
        .await
        .unwrap();
    assert!(first.is_some());
    assert_eq!(
        queue::enqueue(&mut tx, &task("fra-1", "deploy:shop:1:g1"))
            .await
            .unwrap(),
        None
    );
    tx.commit().await.unwrap();

    let again = enqueue(
        pool,
        &[
            task("fra-1", "deploy:shop:1:g1"),
            task("fra-1", "deploy:shop:2:g1"),
        ],
    )
    .await;
    assert_eq!(again.len(), 1, "only the new key is inserted");
    assert_ne!(Some(again[0]), first);
    assert_eq!(queue::lease(pool, &node, 10, LEASE).await.unwrap().len(), 2);
}

#[tokio::test]
async fn complete_many_completes_current_leases_and_reports_stale_ones() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let ids = enqueue(
        pool,
        &[task("fra-1", "a"), task("fra-1", "b"), task("fra-1", "c")],
    )
    .await;
    let leased = queue::lease(pool, &name("fra-1"), 3, LEASE).await.unwrap();
    let mut leases: Vec<_> = leased.iter().map(|t| (t.id, t.token)).collect();
    leases[2].1 = queue::LeaseToken(leases[2].1.0 + 10_000);
    let result = queue::complete_many(pool, &leases).await.unwrap();
    assert_eq!(result.done, ids[..2]);
    assert_eq!(result.stale, [ids[2]]);
    assert_eq!(
        queue::state(pool, ids[2]).await.unwrap().unwrap().status,
        TaskStatus::Leased
    );
}

#[tokio::test]
async fn the_listener_wakes_the_nodes_waiter_when_its_tasks_commit() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let listener = Listener::start(pool, Duration::from_secs(600))
        .await
        .unwrap();
    let mut fra1 = listener.waiter(&name("fra-1"));
    let mut fra2 = listener.waiter(&name("fra-2"));
    let quiet = Duration::from_millis(300);

    let mut tx = pool.begin().await.unwrap();
    queue::enqueue(&mut tx, &task("fra-1", "a")).await.unwrap();
    assert!(
        tokio::time::timeout(quiet, fra1.wait()).await.is_err(),
        "no wake-up before commit"
    );
    tx.commit().await.unwrap();

    let woke = tokio::time::timeout(Duration::from_secs(10), fra1.wait()).await;
    assert_eq!(woke, Ok(Wake::Notified));
    assert!(
        tokio::time::timeout(quiet, fra2.wait()).await.is_err(),
        "another node's waiter sleeps on"
    );
    assert!(
        tokio::time::timeout(quiet, fra1.wait()).await.is_err(),
        "one commit, one wake-up"
    );
}

#[tokio::test]
async fn waiters_fall_back_to_polling() {
    let db = cairn_testkit::test_db!();
    let listener = Listener::start(db.pool(), Duration::from_millis(50))
        .await
        .unwrap();
    let mut waiter = listener.waiter(&name("fra-1"));
    let woke = tokio::time::timeout(Duration::from_secs(5), waiter.wait()).await;
    assert_eq!(woke, Ok(Wake::Poll));
}

#[tokio::test]
async fn the_listener_survives_a_lost_connection() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let listener = Listener::start(pool, Duration::from_secs(600))
        .await
        .unwrap();
    let mut waiter = listener.waiter(&name("fra-1"));

    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(killed, 1, "the listener holds one connection");
    // Notifications sent while it was down are lost, so every waiter is woken to look for itself.
    let woke = tokio::time::timeout(Duration::from_secs(10), waiter.wait()).await;
    assert_eq!(woke, Ok(Wake::Notified));

    // It listens again: a task committed after the reconnect wakes the waiter.
    let mut notified = false;
    for i in 0..20 {
        enqueue(pool, &[task("fra-1", &format!("after-reconnect-{i}"))]).await;
        if tokio::time::timeout(Duration::from_millis(500), waiter.wait()).await
            == Ok(Wake::Notified)
        {
            notified = true;
            break;
        }
    }
    assert!(notified, "notifications arrive again after the reconnect");
}

#[tokio::test]
async fn complete_and_lease_ends_the_last_batch_and_leases_the_next_in_one_statement() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let node = name("fra-1");
    let tasks: Vec<NewTask> = (0..5).map(|i| task("fra-1", &format!("t{i}"))).collect();
    let ids = enqueue(pool, &tasks).await;
    let first = queue::lease(pool, &node, 2, LEASE).await.unwrap();
    let finished: Vec<_> = first.iter().map(|t| (t.id, t.token)).collect();

    let (completed, next) = queue::complete_and_lease(pool, &node, &finished, 2, LEASE)
        .await
        .unwrap();
    assert_eq!(completed.done, ids[..2]);
    assert!(completed.stale.is_empty() && completed.superseded.is_empty());
    assert_eq!(next.iter().map(|t| t.id).collect::<Vec<_>>(), ids[2..4]);
    assert!(
        next.iter()
            .all(|t| t.token > first[1].token && t.attempt == 1)
    );
    for id in &ids[..2] {
        let s = queue::state(pool, *id).await.unwrap().unwrap();
        assert_eq!(s.status, TaskStatus::Done);
    }

    // Asked again (an answer lost on the way): the completions are not made twice.
    let (again, _) = queue::complete_and_lease(pool, &node, &finished, 0, LEASE)
        .await
        .unwrap();
    assert!(again.done.is_empty());
    assert_eq!(again.stale, ids[..2]);

    // The last batch's completions with nothing left to lease.
    let last: Vec<_> = next.iter().map(|t| (t.id, t.token)).collect();
    let (completed, more) = queue::complete_and_lease(pool, &node, &last, 2, LEASE)
        .await
        .unwrap();
    assert_eq!(completed.done, ids[2..4]);
    assert_eq!(more.iter().map(|t| t.id).collect::<Vec<_>>(), [ids[4]]);
}

#[tokio::test]
async fn complete_and_lease_refuses_a_stale_token_and_never_leases_that_task_in_the_same_call() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let node = name("fra-1");
    let [id] = enqueue(pool, &[task("fra-1", "a")]).await[..] else {
        panic!()
    };
    let t = queue::lease(pool, &node, 1, LEASE).await.unwrap().remove(0);
    // Its lease expired: the task is due again, and a wrong token is presented for it.
    make_due(pool, id).await;
    let wrong = queue::LeaseToken(t.token.0 + 10_000);
    let (completed, leased) = queue::complete_and_lease(pool, &node, &[(id, wrong)], 5, LEASE)
        .await
        .unwrap();
    assert_eq!(completed.stale, [id]);
    assert!(completed.done.is_empty());
    assert!(
        leased.is_empty(),
        "a task the call was asked to complete is not leased by it"
    );
    assert_eq!(
        queue::state(pool, id).await.unwrap().unwrap().lease_token,
        Some(t.token)
    );
    // The next lease hands it out again, with a new token; the old one is refused from then on.
    let again = queue::lease(pool, &node, 5, LEASE).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(again[0].token > t.token);
    let (late, _) = queue::complete_and_lease(pool, &node, &[(id, t.token)], 0, LEASE)
        .await
        .unwrap();
    assert_eq!(late.stale, [id]);
    queue::complete(pool, id, again[0].token).await.unwrap();
}

#[tokio::test]
async fn an_expired_last_attempt_met_by_the_lease_is_buried_and_the_rest_still_leased() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let node = name("fra-1");
    let ids = enqueue(
        pool,
        &[
            NewTask {
                max_attempts: 1,
                ..task("fra-1", "last")
            },
            task("fra-1", "b"),
            task("fra-1", "c"),
        ],
    )
    .await;
    let t = queue::lease(pool, &node, 1, LEASE).await.unwrap().remove(0);
    assert_eq!(t.id, ids[0]);
    // Its lease expired long before the other two were enqueued: first in the lease's walk.
    sqlx::query(
        "UPDATE tasks SET run_after = now() - interval '1 hour',
                          lease_expires_at = now() - interval '1 hour'
         WHERE id = $1",
    )
    .bind(ids[0].0)
    .execute(pool)
    .await
    .unwrap();
    let leased = queue::lease(pool, &node, 2, LEASE).await.unwrap();
    assert_eq!(leased.iter().map(|t| t.id).collect::<Vec<_>>(), ids[1..]);
    let state = queue::state(pool, ids[0]).await.unwrap().unwrap();
    assert_eq!(state.status, TaskStatus::Dead);
    assert!(
        state
            .last_error
            .unwrap()
            .contains("lease of the last attempt expired")
    );
}

#[tokio::test]
async fn batched_completions_end_superseded_like_a_single_one() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let node = name("fra-1");
    let gen_task = |key: &str, generation: u64| NewTask {
        slot: Some(1),
        generation: Some(generation),
        ..task("fra-1", key)
    };
    let ids = enqueue(
        pool,
        &[gen_task("g2", 2), gen_task("g1", 1), gen_task("g1b", 1)],
    )
    .await;
    let leased = queue::lease(pool, &node, 3, LEASE).await.unwrap();
    let token = |id: TaskId| leased.iter().find(|t| t.id == id).unwrap().token;
    // The node finished generation 2 for the slot; generation 1's "done" can only have been a skip.
    assert_eq!(
        queue::complete(pool, ids[0], token(ids[0])).await.unwrap(),
        TaskStatus::Done
    );
    let many = queue::complete_many(pool, &[(ids[1], token(ids[1]))])
        .await
        .unwrap();
    assert_eq!(many.superseded, [ids[1]]);
    assert!(many.done.is_empty());
    let (one, _) = queue::complete_and_lease(pool, &node, &[(ids[2], token(ids[2]))], 1, LEASE)
        .await
        .unwrap();
    assert_eq!(one.superseded, [ids[2]]);
    for id in &ids[1..] {
        let s = queue::state(pool, *id).await.unwrap().unwrap();
        assert_eq!(s.status, TaskStatus::Superseded);
    }
}
