//! The history of reconcile runs stays bounded: a failed run stores its first errors and a count, the same
//! commit failing the same way again counts a repeat on its row instead of adding one, and old failed and
//! no-op runs are pruned while applied ones stay. Through the real [`Controller`] on a directory source and
//! through the store against a real PostgreSQL; rows are read back with plain SQL.

use std::time::Duration;

use cairn_reconciler::controller::{ConfigSource, Controller, Outcome, Trigger};
use cairn_reconciler::store::ReconcileStatus;
use cairn_reconciler::store::history::{
    self, MAX_RECORDED_ERRORS, NewReconciliation, RecordedError,
};
use cairn_testkit::fixtures;
use chrono::Utc;
use sqlx::PgPool;

/// A valid plan.
fn valid() -> String {
    fixtures::plan("small").max_replicas(3).to_string()
}

/// `valid()` with `n` unknown keys in its plan: `n` errors.
fn with_unknown_keys(n: usize) -> String {
    let mut s = valid();
    for i in 0..n {
        s.push_str(&format!("unknown_key_{i:06} = 1\n"));
    }
    s
}

/// (status, commit, number of stored errors, errors_total, repeats) of every run, oldest first.
async fn runs(pool: &PgPool) -> Vec<(String, Option<String>, i32, Option<i32>, i32)> {
    sqlx::query_as(
        "SELECT status, commit, jsonb_array_length(errors), errors_total, repeats
         FROM reconciliations ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn reconcile(c: &Controller) -> Outcome {
    tokio::time::timeout(Duration::from_secs(120), c.reconcile(Trigger::Timer))
        .await
        .expect("a reconcile ends")
        .expect("the run is recorded")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_head_with_50000_errors_is_stored_bounded_and_once() {
    // Before: every interval stored all 50,000 errors again (about 3 GB a day at the default interval).
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("cairn.toml"),
        fixtures::settings().to_string(),
    )
    .unwrap();
    std::fs::write(tmp.path().join("plans.toml"), with_unknown_keys(50_000)).unwrap();
    let c = Controller::new(pool.clone(), ConfigSource::Dir(tmp.path().into()), None);

    for _ in 0..3 {
        let Outcome::Invalid { commit, errors } = reconcile(&c).await else {
            panic!("the commit is invalid")
        };
        assert!(commit.is_some());
        assert_eq!(errors.len(), 50_000);
    }
    let rows = runs(pool).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (status, bad_commit, stored, total, repeats) = rows[0].clone();
    assert_eq!(
        (status.as_str(), stored, total, repeats),
        ("failed", MAX_RECORDED_ERRORS as i32, Some(50_000), 3)
    );
    let size: i64 =
        sqlx::query_scalar("SELECT pg_column_size(errors)::bigint FROM reconciliations")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(size < 16_000, "{size} bytes of errors stored");
    let mut conn = pool.acquire().await.unwrap();
    let last = history::recent_reconciliations(&mut conn, 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!((last.errors_total, last.repeats), (50_000, 3));
    assert!(last.last_at.is_some());
    assert_eq!(
        last.errors[0].to_string(),
        "plans.toml:7:1: unknown key `unknown_key_000000` in plan `small`"
    );
    drop(conn);

    // Fewer errors is another failure: a row of its own. Then a valid commit applies (a no-op plan for
    // a repository with only a plan is still recorded), and the old invalid one failing again after it
    // is a new row too.
    std::fs::write(tmp.path().join("plans.toml"), with_unknown_keys(2)).unwrap();
    reconcile(&c).await;
    std::fs::write(tmp.path().join("plans.toml"), valid()).unwrap();
    let Outcome::Applied(_) = reconcile(&c).await else {
        panic!("the valid commit applies")
    };
    std::fs::write(tmp.path().join("plans.toml"), with_unknown_keys(50_000)).unwrap();
    reconcile(&c).await;
    reconcile(&c).await;
    let rows = runs(pool).await;
    let summary: Vec<(&str, i32, Option<i32>, i32)> = rows
        .iter()
        .map(|(s, _, n, t, r)| (s.as_str(), *n, *t, *r))
        .collect();
    assert_eq!(
        summary,
        [
            ("failed", 20, Some(50_000), 3),
            ("failed", 2, Some(2), 1),
            ("applied", 0, Some(0), 1),
            ("failed", 20, Some(50_000), 2),
        ]
    );
    assert_eq!(rows[3].1, bad_commit);
}

fn run<'a>(
    status: ReconcileStatus,
    commit: &'a str,
    errors: &'a [RecordedError],
    days_ago: i64,
) -> NewReconciliation<'a> {
    let at = Utc::now() - chrono::Duration::days(days_ago);
    NewReconciliation {
        source: "https://example.com/config.git",
        commit: Some(commit),
        trigger: "timer",
        status,
        generation: Some(1),
        summary: "x",
        errors,
        started_at: at,
        finished_at: at,
    }
}

#[tokio::test]
async fn old_failed_and_noop_runs_are_pruned_applied_and_newest_kept() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let err = [RecordedError {
        path: None,
        line: None,
        col: None,
        message: "m".repeat(5000),
    }];
    let mut conn = pool.acquire().await.unwrap();
    let mut record = async |r: NewReconciliation<'_>| {
        history::record_reconciliation(&mut conn, &r).await.unwrap();
    };
    record(run(ReconcileStatus::Applied, "a", &[], 40)).await;
    record(run(ReconcileStatus::Noop, "a", &[], 30)).await;
    record(run(ReconcileStatus::Failed, "b", &err, 20)).await;
    record(run(ReconcileStatus::Noop, "a", &[], 18)).await;
    record(run(ReconcileStatus::Failed, "c", &err, 16)).await;
    // The newest row failing the same way again 2 days ago: a repeat, which keeps the row.
    let (_, repeated) =
        history::record_failed(&mut conn, &run(ReconcileStatus::Failed, "c", &err, 2))
            .await
            .unwrap();
    assert!(repeated);
    drop(conn);
    let left = async || -> Vec<(String, String)> {
        sqlx::query_as("SELECT status, commit FROM reconciliations ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap()
    };
    let pairs = |v: Vec<(String, String)>| -> Vec<String> {
        v.into_iter().map(|(s, c)| format!("{s} {c}")).collect()
    };
    let before = Utc::now() - chrono::Duration::days(14);
    assert_eq!(
        history::prune_reconciliations(pool, before, 1)
            .await
            .unwrap(),
        3
    );
    assert_eq!(pairs(left().await), ["applied a", "failed c"]);
    // However old, the newest row stays (`cairn status` shows it), and applied rows stay.
    let later = Utc::now() + chrono::Duration::days(1);
    assert_eq!(
        history::prune_reconciliations(pool, later, 100)
            .await
            .unwrap(),
        0
    );
    assert_eq!(pairs(left().await), ["applied a", "failed c"]);
    // One message is stored cut to its bound.
    let len: i32 = sqlx::query_scalar(
        "SELECT length(errors->0->>'message') FROM reconciliations WHERE commit = 'c'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(len as usize, history::MAX_MESSAGE_CHARS + 1);
}
