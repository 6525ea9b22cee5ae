//! What an hour's usage rollup costs (issue 20): N apps, each with a slot running all month, a
//! zero-downtime release overlapping in it every hour (a second interval of 5 minutes, counted once), and
//! every tenth app a second slot; three plans, one repriced mid-hour. Each hour is rolled up with
//! `store::usage::rollup_hour` (read the intervals and prices, compute, replace the hour's rows in one
//! transaction) against a fresh database of the testkit's PostgreSQL. Reported: the hour's time (min,
//! median, max over the hours rolled up), its rows, and the month extrapolated (720 hours × the median).
//!
//! ```text
//! cargo bench -p cairn-reconciler --bench usage                 # 10,000 apps, 12 hours
//! cargo bench -p cairn-reconciler --bench usage -- 1000 10000 --hours 24
//! ```

use std::time::{Duration, Instant};

use cairn_reconciler::store::usage;
use chrono::{TimeZone, Utc};

async fn one(apps: i64, hours: i64) -> (Vec<Duration>, usize) {
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
    db.close().await;
    (times, rows)
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
        "| apps | intervals in an hour | rows per hour | hour: min | median | max | month (720 × median) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for apps in sizes {
        let (mut times, rows) = one(apps, hours).await;
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "| {apps} | {} | {rows} | {} | {} | {} | {:.0} s |",
            apps + apps / 10 + apps,
            ms(times[0]),
            ms(median),
            ms(*times.last().unwrap()),
            median.as_secs_f64() * 720.0
        );
    }
}
