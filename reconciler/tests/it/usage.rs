//! Usage metering against a real PostgreSQL (issue 20): intervals opened and closed idempotently, late
//! reports flagged and applied from the window's edge, prices recorded per change and split exactly
//! mid-hour, hourly rollups that recompute to the same rows, and month statements whose bytes and hash
//! recompute the same and never change.

use cairn_proto::admin::UsageBy;
use cairn_reconciler::store::usage;
use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use sqlx::{PgPool, Row as _};

async fn declare(pool: &PgPool, plan: &str, price: &str, app: &str) {
    sqlx::query(
        "INSERT INTO plans (name, cpu_millis, memory_bytes, disk_bytes, price, max_replicas, spec, spec_hash, generation)
         VALUES ($1, 100, 1000000, 0, $2::numeric, 10, '{}', 'x', 1)
         ON CONFLICT (name) DO UPDATE SET price = EXCLUDED.price",
    )
    .bind(plan)
    .bind(price)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO runtimes (name, drivers, spec, spec_hash, generation)
         VALUES ('rt', ARRAY['process'], '{}', 'x', 1) ON CONFLICT DO NOTHING",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO apps (name, plan, runtime, replicas, spec, spec_hash, generation)
         VALUES ($1, $2, 'rt', 2, '{}', 'x', 1)
         ON CONFLICT (name) DO UPDATE SET plan = EXCLUDED.plan",
    )
    .bind(app)
    .bind(plan)
    .execute(pool)
    .await
    .unwrap();
}

async fn price_at(pool: &PgPool, plan: &str, from: DateTime<Utc>, monthly_e4: i64) {
    sqlx::query(
        "INSERT INTO plan_prices (plan, from_at, monthly_e4, generation) VALUES ($1, $2, $3, 1)",
    )
    .bind(plan)
    .bind(from)
    .bind(monthly_e4)
    .execute(pool)
    .await
    .unwrap();
}

async fn interval(
    pool: &PgPool,
    app: &str,
    slot: i32,
    node: &str,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
) {
    sqlx::query(
        "INSERT INTO usage_intervals (app, slot, plan, node, started_at, ended_at, opened_by, closed_by)
         VALUES ($1, $2, 'small', $3, $4, $5, 'test', CASE WHEN $5 IS NULL THEN NULL ELSE 'test' END)",
    )
    .bind(app)
    .bind(slot)
    .bind(node)
    .bind(start)
    .bind(end)
    .execute(pool)
    .await
    .unwrap();
}

/// (app, slot, plan, node, monthly_e4, seconds, numerator) of an hour, sorted.
async fn hour_rows(
    pool: &PgPool,
    hour: DateTime<Utc>,
) -> Vec<(String, i32, String, String, i64, i32, i64)> {
    sqlx::query_as(
        "SELECT app, slot, plan, node, monthly_e4, seconds, numerator FROM usage_hours
         WHERE hour = $1 ORDER BY app, slot, plan, node, monthly_e4",
    )
    .bind(hour)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The hours' totals (kept by triggers, read by the month-to-date gauge and the month closer) are the
/// sums of the hours' rows, hour by hour, and no hour without rows has one.
async fn totals_are_the_rows_sums(pool: &PgPool) {
    let sums = |sql: &'static str| async move {
        sqlx::query_as::<_, (DateTime<Utc>, String, i64)>(sql)
            .fetch_all(pool)
            .await
            .unwrap()
    };
    let rows = sums(
        "SELECT hour, sum(numerator)::text, count(*) FROM usage_hours GROUP BY hour ORDER BY hour",
    )
    .await;
    assert_eq!(
        sums("SELECT hour, numerator::text, rows FROM usage_hour_totals ORDER BY hour").await,
        rows
    );
}

fn at(d: u32, h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, d, h, m, s).unwrap()
}

#[tokio::test]
async fn repeated_reports_open_and_close_nothing_more_and_rollups_are_idempotent() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    declare(pool, "small", "25.92", "web").await;
    assert!(
        usage::open(pool, "web", 0, "n1", "task 1 (deploy)")
            .await
            .unwrap()
    );
    assert!(
        !usage::open(pool, "web", 0, "n1", "task 1 (deploy)")
            .await
            .unwrap()
    );
    // A release replacing the replica in place: the slot goes on.
    assert!(
        !usage::open(pool, "web", 0, "n1", "task 2 (deploy)")
            .await
            .unwrap()
    );
    // Another slot, and an app that is not declared (opens nothing).
    assert!(
        usage::open(pool, "web", 1, "n1", "task 3 (deploy)")
            .await
            .unwrap()
    );
    assert!(
        !usage::open(pool, "gone", 0, "n1", "task 4 (deploy)")
            .await
            .unwrap()
    );
    assert_eq!(
        usage::close(pool, "web", Some(1), "n1", None, "task 5 (remove)")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        usage::close(pool, "web", Some(1), "n1", None, "task 5 (remove)")
            .await
            .unwrap(),
        0
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_intervals")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_intervals WHERE ended_at IS NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(open, 1);
    // A plan change reopens the slot under the new plan.
    declare(pool, "large", "50", "web").await;
    assert!(
        usage::open(pool, "web", 0, "n1", "task 6 (deploy)")
            .await
            .unwrap()
    );
    let plans: Vec<String> = sqlx::query_scalar(
        "SELECT plan FROM usage_intervals WHERE app = 'web' AND slot = 0 ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(plans, ["small", "large"]);

    // Rolling a fixed past hour up twice gives the same rows.
    sqlx::query("DELETE FROM usage_intervals")
        .execute(pool)
        .await
        .unwrap();
    price_at(pool, "small", at(1, 0, 0, 0), 259_200).await;
    interval(
        pool,
        "web",
        0,
        "n1",
        at(10, 10, 0, 0),
        Some(at(10, 10, 30, 0)),
    )
    .await;
    interval(pool, "web", 0, "n1", at(10, 10, 20, 0), None).await; // overlap: counted once
    let now = usage::db_now(pool).await.unwrap();
    usage::rollup_hour(pool, at(10, 10, 0, 0), now)
        .await
        .unwrap();
    let first = hour_rows(pool, at(10, 10, 0, 0)).await;
    usage::rollup_hour(pool, at(10, 10, 0, 0), now)
        .await
        .unwrap();
    assert_eq!(first, hour_rows(pool, at(10, 10, 0, 0)).await);
    // Two at once (the leader's loop and an operator's recompute through another control plane) wait
    // for each other and leave the same rows.
    for _ in 0..5 {
        let (a, b) = tokio::join!(
            usage::rollup_hour(pool, at(10, 10, 0, 0), now),
            usage::rollup_hour(pool, at(10, 10, 0, 0), now)
        );
        a.unwrap();
        b.unwrap();
    }
    assert_eq!(first, hour_rows(pool, at(10, 10, 0, 0)).await);
    // 25.92 (259,200 e4) a month; the hour is 3,600 s whatever overlapped in it.
    assert_eq!(
        first,
        [(
            "web".to_owned(),
            0,
            "small".to_owned(),
            "n1".to_owned(),
            259_200,
            3_600,
            259_200 * 3_600
        )]
    );
    totals_are_the_rows_sums(pool).await;
    db.close().await;
}

#[tokio::test]
async fn prices_are_recorded_once_per_change_with_the_commit_and_split_exactly_mid_hour() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    declare(pool, "small", "7.5", "web").await;
    sqlx::query("UPDATE config_state SET commit = 'abc', generation = 3, applied_at = now()")
        .execute(pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(usage::record_prices(&mut conn).await.unwrap(), 1);
    assert_eq!(
        usage::record_prices(&mut conn).await.unwrap(),
        0,
        "an unchanged price is not recorded again"
    );
    let row =
        sqlx::query("SELECT monthly_e4, commit, generation FROM plan_prices WHERE plan = 'small'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(row.get::<i64, _>("monthly_e4"), 75_000);
    assert_eq!(
        row.get::<Option<String>, _>("commit").as_deref(),
        Some("abc")
    );
    assert_eq!(row.get::<i64, _>("generation"), 3);
    drop(conn);
    sqlx::query("DELETE FROM plan_prices")
        .execute(pool)
        .await
        .unwrap();

    // 2,678,400 e4 a month (31 days) is 1 e4 a second; from 10:15 it is 3 e4 a second.
    price_at(pool, "small", at(1, 0, 0, 0), 2_678_400).await;
    price_at(pool, "small", at(10, 10, 15, 0), 3 * 2_678_400).await;
    interval(
        pool,
        "web",
        0,
        "n1",
        at(10, 9, 0, 0),
        Some(at(10, 11, 0, 0)),
    )
    .await;
    let now = usage::db_now(pool).await.unwrap();
    usage::rollup_hour(pool, at(10, 10, 0, 0), now)
        .await
        .unwrap();
    assert_eq!(
        hour_rows(pool, at(10, 10, 0, 0)).await,
        [
            (
                "web".to_owned(),
                0,
                "small".to_owned(),
                "n1".to_owned(),
                2_678_400,
                900,
                900 * 2_678_400
            ),
            (
                "web".to_owned(),
                0,
                "small".to_owned(),
                "n1".to_owned(),
                3 * 2_678_400,
                2_700,
                2_700 * 3 * 2_678_400
            ),
        ]
    );
    let month = NaiveDate::from_ymd_opt(2026, 10, 1).unwrap();
    let report = usage::report(pool, month, UsageBy::App).await.unwrap();
    // (900 × 1 + 2,700 × 3) e4 = 0.9 currency = 90 minor units.
    assert_eq!((report.total_seconds, report.total_minor), (3_600, 90));
    totals_are_the_rows_sums(pool).await;
    db.close().await;
}

#[tokio::test]
async fn late_reports_are_applied_from_the_window_edge_and_flagged_and_past_hours_recomputed() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    declare(pool, "small", "10", "web").await;
    let now = usage::db_now(pool).await.unwrap();
    price_at(pool, "small", now - Duration::days(30), 100_000).await;
    interval(pool, "web", 0, "n1", now - Duration::hours(72), None).await;
    interval(pool, "web", 1, "n1", now - Duration::hours(5), None).await;
    interval(pool, "web", 0, "n2", now - Duration::hours(5), None).await;
    // A stop that claims to have happened 60 h ago: recorded, flagged, closed at the window's edge.
    let claimed = now - Duration::hours(60);
    assert_eq!(
        usage::close(pool, "web", Some(0), "n1", Some(claimed), "task 9 (stop)")
            .await
            .unwrap(),
        1
    );
    let r = sqlx::query(
        "SELECT ended_at, late, claimed_end FROM usage_intervals WHERE slot = 0 AND node = 'n1'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(r.get::<bool, _>("late"));
    assert_eq!(
        r.get::<Option<DateTime<Utc>>, _>("claimed_end"),
        Some(claimed)
    );
    let ended: DateTime<Utc> = r.get("ended_at");
    assert!(
        ended > now - Duration::hours(48) - Duration::minutes(1)
            && ended <= now - Duration::hours(47)
    );
    // A node going offline closes its intervals at its last heartbeat, 3 h ago: within the window.
    let last = now - Duration::hours(3);
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        usage::close_node(&mut conn, "n1", Some(last), "node offline")
            .await
            .unwrap(),
        1
    );
    drop(conn);
    let (ended, late): (DateTime<Utc>, bool) =
        sqlx::query_as("SELECT ended_at, late FROM usage_intervals WHERE slot = 1 AND node = 'n1'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((ended, late), (last, false));
    // The hours it reached back into are dirty, and the rollup recomputes them.
    let dirty: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT hour FROM usage_dirty_hours ORDER BY hour")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(
        dirty.contains(&cairn_plan::usage::hour_of(last)),
        "{dirty:?}"
    );
    let later = usage::db_now(pool).await.unwrap();
    usage::roll_up(pool, later).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_dirty_hours")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    let seconds: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(seconds), 0)::bigint FROM usage_hours WHERE app = 'web' AND slot = 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        seconds,
        2 * 3_600,
        "slot 1 ran from 5 h ago to the last heartbeat 3 h ago"
    );
    let month = later.date_naive();
    let report = usage::report(pool, month, UsageBy::Slot).await.unwrap();
    assert_eq!(
        report.late_intervals,
        i64::from(month_covers(now - Duration::hours(72), later))
    );
    totals_are_the_rows_sums(pool).await;
    db.close().await;
}

/// Whether the late interval (which started at `start`) reaches into the month of `now`: 1 or 0.
fn month_covers(_start: DateTime<Utc>, _now: DateTime<Utc>) -> u8 {
    // It ended at the window's edge, 48 h before now; it is in this month unless the month began later.
    let edge = _now - Duration::hours(48);
    u8::from(usage::month_start(_now) < edge)
}

#[tokio::test]
async fn a_closed_month_has_one_statement_whose_bytes_recompute_the_same_and_never_change() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    declare(pool, "small", "10", "web").await;
    price_at(pool, "small", at(1, 0, 0, 0), 100_000).await;
    price_at(pool, "small", at(20, 12, 0, 0), 200_000).await;
    interval(
        pool,
        "web",
        0,
        "n1",
        at(19, 23, 30, 0),
        Some(at(20, 13, 0, 7)),
    )
    .await;
    interval(pool, "web", 1, "n2", at(31, 23, 0, 0), None).await; // runs into November
    interval(pool, "api", 0, "n1", at(5, 1, 2, 3), Some(at(5, 1, 2, 4))).await;
    let month = NaiveDate::from_ymd_opt(2026, 10, 1).unwrap();
    let now = usage::db_now(pool).await.unwrap();
    // Not before its late window has passed.
    assert_eq!(
        usage::close_month(pool, now.date_naive(), now)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        usage::recompute_month(pool, month, now).await.unwrap(),
        31 * 24
    );
    let sha = usage::close_month(pool, month, now)
        .await
        .unwrap()
        .expect("closed");
    let (body, stmt) = usage::statement(pool, month).await.unwrap().unwrap();
    assert_eq!(stmt.sha256, sha);
    let text = String::from_utf8(body.clone()).unwrap();
    assert_eq!(
        text,
        "# cairn usage statement 2026-10\n\
         app,slot,plan,node,monthly_price,seconds,amount\n\
         api,0,small,n1,10.0000,1,0.00\n\
         web,0,small,n1,10.0000,45000,0.17\n\
         web,0,small,n1,20.0000,3607,0.03\n\
         web,1,small,n2,20.0000,3600,0.03\n\
         total,,,,,52208,0.22\n"
    );
    for _ in 0..3 {
        usage::recompute_month(pool, month, now).await.unwrap();
        assert_eq!(usage::statement_bytes(pool, month).await.unwrap(), body);
    }
    // Closing again writes nothing; the statement cannot be changed or deleted.
    assert_eq!(usage::close_month(pool, month, now).await.unwrap(), None);
    assert!(
        sqlx::query("UPDATE usage_statements SET sha256 = 'x'")
            .execute(pool)
            .await
            .is_err()
    );
    assert!(
        sqlx::query("DELETE FROM usage_statements")
            .execute(pool)
            .await
            .is_err()
    );
    let report = usage::report(pool, month, UsageBy::Plan).await.unwrap();
    assert_eq!(report.statement.map(|s| s.sha256), Some(sha));
    totals_are_the_rows_sums(pool).await;
    db.close().await;
}

fn running(app: &str, slot: u32) -> cairn_proto::ActualReplica {
    cairn_proto::ActualReplica {
        app: cairn_schema::Name::new(app).unwrap(),
        slot,
        release: 1,
        generation: Some(1),
        state: cairn_proto::RunState::Running,
        healthy: true,
    }
}

#[tokio::test]
async fn a_heartbeat_opens_only_placed_running_slots_without_an_open_interval_and_never_closes() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    declare(pool, "small", "10", "web").await;
    sqlx::query(
        "INSERT INTO nodes (name, cpu_millis, memory_bytes, disk_bytes, spec, spec_hash, generation)
         VALUES ('n1', 1000, 1000000000, 0, '{}', 'x', 1), ('n2', 1000, 1000000000, 0, '{}', 'x', 1)",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO releases (app, number, config_commit, config_generation, source_commit, spec, spec_hash)
         VALUES ('web', 1, 'c', 1, 's', '{}', 'x')",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO placements (app, slot, node, release, state, generation)
         VALUES ('web', 1, 'n1', 1, 'running', 1), ('web', 2, 'n2', 1, 'running', 1)",
    )
    .execute(pool)
    .await
    .unwrap();
    let opened = |replicas: Vec<cairn_proto::ActualReplica>, node: &'static str| async move {
        let mut conn = pool.acquire().await.unwrap();
        usage::open_reported(&mut conn, node, &replicas)
            .await
            .unwrap()
    };
    // Slot 1 is placed on n1: opened; slot 2 runs on n1 but is placed on n2 (a stale duplicate): not.
    assert_eq!(
        opened(vec![running("web", 1), running("web", 2)], "n1").await,
        1
    );
    // Again: already open.
    assert_eq!(opened(vec![running("web", 1)], "n1").await, 0);
    // A heartbeat without slot 1 closes nothing.
    assert_eq!(opened(vec![], "n1").await, 0);
    let open: Vec<(i32, String)> =
        sqlx::query_as("SELECT slot, node FROM usage_intervals WHERE ended_at IS NULL")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(open, [(1, "n1".to_owned())]);
    // Removed (the remove reported done): a stale heartbeat still listing it reopens nothing once the
    // placement is gone.
    usage::close(pool, "web", Some(1), "n1", None, "task 7 (remove)")
        .await
        .unwrap();
    sqlx::query("DELETE FROM placements WHERE slot = 1")
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(opened(vec![running("web", 1)], "n1").await, 0);
    totals_are_the_rows_sums(pool).await;
    db.close().await;
}

/// One app's month to date (the dashboard's app page) is its rows' sum, read through the index by app
/// (`usage_hours_by_app`), not by walking every app's rows of the month.
#[tokio::test]
async fn one_apps_month_to_date_is_its_rows_sum_read_by_its_index() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    // 2,000 apps, 48 hours of this month and one hour of the last (which does not count).
    sqlx::query(
        "INSERT INTO usage_hours
           (hour, app, slot, plan, node, monthly_e4, seconds, numerator, month_seconds)
         SELECT $1 + h * interval '1 hour', 'app-' || a, 1, 'small', 'n1', 50000, 3600,
                3600 * 50000 * (1 + a % 10), 31 * 86400
         FROM generate_series(-1, 47) h, generate_series(0, 1999) a",
    )
    .bind(at(1, 0, 0, 0))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE usage_hours")
        .execute(pool)
        .await
        .unwrap();
    let scans = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'usage_hours_by_app'",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let before = scans().await;
    let now = at(3, 12, 0, 0);
    let got = usage::app_month_to_date_minor(pool, "app-7", now)
        .await
        .unwrap();
    // app-7's 48 hours of this month (October: 31 days), not last month's hour nor any other app's.
    assert_eq!(got, usage::minor(48 * 3600 * 50_000 * 8, 31 * 86_400));
    assert_eq!(got, 258);
    // Statistics reach the view when the backend reports them (at most a second later).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while scans().await == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the read did not use the index by app"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    db.close().await;
}
