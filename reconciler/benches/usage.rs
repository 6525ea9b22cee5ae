//! What an hour's usage rollup costs (issue 20): N apps, each with a slot running all month, a
//! zero-downtime release overlapping in it every hour (a second interval of 5 minutes, counted once), and
//! every tenth app a second slot; three plans, one repriced mid-hour. Each hour is rolled up with
//! `store::usage::rollup_hour` (read the intervals and prices, compute, replace the hour's rows in one
//! transaction) against a fresh database of the testkit's PostgreSQL. Reported: the hour's time (min,
//! median, max over the hours rolled up), its rows, and the month extrapolated (720 hours × the median).
//! Then the month-to-date read of the `/metrics` gauge, from the hours' totals
//! (`usage::month_to_date_minor`) and, for comparison, summing the rows as it did before
//! `usage_hour_totals`: the median of 5 of each, and the rows the second reads. Last, one app's month to
//! date (the dashboard's app page, `usage::app_month_to_date_minor`), through its index
//! `usage_hours_by_app` and again with that index dropped (as it was before it).
//!
//! ```text
//! cargo bench -p cairn-reconciler --bench usage                 # 10,000 apps, 12 hours
//! cargo bench -p cairn-reconciler --bench usage -- 1000 10000 --hours 24
//! ```

use std::time::{Duration, Instant};

use cairn_reconciler::store::usage;
use chrono::{TimeZone, Utc};

/// What one size measured.
struct Measured {
    hours: Vec<Duration>,
    rows: usize,
    /// The month-to-date read from the totals, and summing the rows; the rows summed.
    month_to_date: (Duration, Duration, i64),
    /// One app's month to date, by its index and without it.
    app_month_to_date: (Duration, Duration),
}

/// The median of 5 runs of `f`.
async fn median_of_5<F, Fut>(mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        f().await;
        times.push(t.elapsed());
    }
    times.sort();
    times[2]
}

async fn one(apps: i64, hours: i64) -> Measured {
    let db = cairn_testkit::pg::TestDb::new()
        .await
        .expect("the benchmark needs PostgreSQL (see testkit/src/pg.rs)");
    let pool = db.pool();
    let month = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let first_hour = Utc.with_ymd_and_hms(2026, 11, 10, 0, 0, 0).unwrap();
    sqlx::query(
        "INSERT INTO plan_prices (plan, from_at, monthly_e4, generation) VALUES
           ('small', $1, 50000, 1), ('medium', $1, 120000, 1), ('large', $1, 400000, 1),
           ('small', $2, 70000, 2)",
    )
    .bind(month - chrono::Duration::days(30))
    .bind(first_hour + chrono::Duration::minutes(30))
    .execute(pool)
    .await
    .unwrap();
    // A slot running all month per app; every tenth app a second slot.
    sqlx::query(
        "INSERT INTO usage_intervals (app, slot, plan, node, started_at, opened_by)
         SELECT 'app-' || a, s, (ARRAY['small', 'medium', 'large'])[1 + a % 3], 'n' || (a % 100),
                $2, 'bench'
         FROM generate_series(0, $1 - 1) a, generate_series(1, 2) s
         WHERE s = 1 OR a % 10 = 0",
    )
    .bind(apps)
    .bind(month)
    .execute(pool)
    .await
    .unwrap();
    // Every hour rolled up, each app's release overlapping for 5 minutes (closed intervals).
    sqlx::query(
        "INSERT INTO usage_intervals (app, slot, plan, node, started_at, ended_at, opened_by, closed_by)
         SELECT 'app-' || a, 1, (ARRAY['small', 'medium', 'large'])[1 + a % 3], 'n' || ((a + 1) % 100),
                $2 + h * interval '1 hour' + (a % 50) * interval '1 minute',
                $2 + h * interval '1 hour' + (a % 50 + 5) * interval '1 minute', 'bench', 'bench'
         FROM generate_series(0, $1 - 1) a, generate_series(0, $3 - 1) h",
    )
    .bind(apps)
    .bind(first_hour)
    .bind(hours)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE usage_intervals")
        .execute(pool)
        .await
        .unwrap();
    let now = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap();
    let mut times = Vec::new();
    let mut rows = 0;
    for h in 0..hours {
        let t = Instant::now();
        rows = usage::rollup_hour(pool, first_hour + chrono::Duration::hours(h), now)
            .await
            .unwrap();
        times.push(t.elapsed());
    }
    sqlx::query("ANALYZE usage_hours, usage_hour_totals")
        .execute(pool)
        .await
        .unwrap();
    let in_month = first_hour + chrono::Duration::hours(hours);
    let totals = median_of_5(|| async {
        usage::month_to_date_minor(pool, in_month).await.unwrap();
    })
    .await;
    let summed = median_of_5(|| async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT sum(numerator)::text FROM usage_hours WHERE hour >= $1 AND hour < $2",
        )
        .bind(month)
        .bind(month + chrono::Duration::days(30))
        .fetch_one(pool)
        .await
        .unwrap();
    })
    .await;
    let summed_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_hours")
        .fetch_one(pool)
        .await
        .unwrap();
    let one_app = || async {
        let n = usage::app_month_to_date_minor(pool, "app-7", in_month)
            .await
            .unwrap();
        assert!(n > 0, "app-7 has usage this month");
    };
    let by_app = median_of_5(one_app).await;
    sqlx::query("DROP INDEX usage_hours_by_app")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("ANALYZE usage_hours")
        .execute(pool)
        .await
        .unwrap();
    let without = median_of_5(one_app).await;
    db.close().await;
    Measured {
        hours: times,
        rows,
        month_to_date: (totals, summed, summed_rows),
        app_month_to_date: (by_app, without),
    }
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let mut sizes = Vec::new();
    let mut hours = 12;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--hours" => hours = args.next().and_then(|n| n.parse().ok()).expect("--hours N"),
            "--bench" => {}
            n => sizes.push(n.parse::<i64>().expect("a number of apps")),
        }
    }
    if sizes.is_empty() {
        sizes = vec![10_000];
    }
    println!(
        "| apps | intervals in an hour | rows per hour | hour: min | median | max | month (720 × median) \
         | month to date: totals / rows summed (rows) | one app's month to date: by app / without the index |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for apps in sizes {
        let Measured {
            hours: mut times,
            rows,
            month_to_date: (totals, summed, summed_rows),
            app_month_to_date: (by_app, without),
        } = one(apps, hours).await;
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "| {apps} | {} | {rows} | {} | {} | {} | {:.0} s | {} / {} ({summed_rows}) | {} / {} |",
            apps + apps / 10 + apps,
            ms(times[0]),
            ms(median),
            ms(*times.last().unwrap()),
            median.as_secs_f64() * 720.0,
            us(totals),
            us(summed),
            us(by_app),
            us(without),
        );
    }
}
