//! Task queue throughput: lease + complete against a real PostgreSQL with `fsync` and
//! `synchronous_commit` on, so every lease and every completion is a durable commit.
//!
//! ```text
//! cargo bench -p cairn-reconciler --bench queue               # 200,000 tasks batched, 10,000 one by one
//! cargo bench -p cairn-reconciler --bench queue -- --quick    # a tenth of that (or CAIRN_BENCH_QUICK=1)
//! ```
//!
//! The database comes from `cairn-testkit` (the private cluster, or `CAIRN_TEST_DATABASE_URL`). One
//! worker per node, as with agents: each leases its node's tasks and completes them, batched (200) and
//! one at a time, in two shapes: a lease then a completion (`lease` + `complete_many` or `complete`, two
//! commits per batch), and the next lease carrying the last batch's completions (`complete_and_lease`,
//! one commit per batch). Enqueueing happens before the clock starts and is reported separately; then
//! the queue table is vacuumed and a checkpoint taken (`settle`), so each run starts from the same
//! cluster state whatever ran before it.
//!
//! With `CAIRN_BENCH_PGQUEUER=<python>` (a Python with `pgqueuer` and `asyncpg` installed, which
//! `benches/queue.sh` sets up), each task count is followed by the same work done by pgqueuer
//! (`benches/pgqueuer_peer.py`) in a fresh database of the same PostgreSQL: the same task count, batch
//! size, number of workers and settling before the clock; both figures and their ratio are printed.

use std::time::{Duration, Instant};

use cairn_reconciler::queue::{self, LeaseToken, NewTask, TaskId, TaskKind, TaskStatus};
use cairn_schema::Name;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const NODES: usize = 8;
const LEASE: Duration = Duration::from_secs(60);

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("CAIRN_BENCH_QUICK").is_some_and(|v| !v.is_empty());
    let scale = if quick { 10 } else { 1 };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run(200_000 / scale, 10_000 / scale));
}

/// How a worker hands its finished leases back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `lease(n)`, then `complete_many` (or `complete` for one task): two statements, two commits per
    /// batch.
    TwoCommits,
    /// `complete_and_lease`: the next lease carries the last batch's completions, one statement and
    /// one commit per batch.
    OneCommit,
}

async fn run(batched_tasks: usize, single_tasks: usize) {
    for (label, tasks, batch) in [
        ("batched, 8 workers, batches of 200", batched_tasks, 200u32),
        ("one at a time, 8 workers", single_tasks, 1),
    ] {
        let mut rates = Vec::new();
        for shape in [Shape::TwoCommits, Shape::OneCommit] {
            let how = match (shape, batch) {
                (Shape::TwoCommits, 1) => "lease(1) + complete",
                (Shape::TwoCommits, _) => "lease(200) + complete_many",
                (Shape::OneCommit, 1) => "complete_and_lease(previous, 1)",
                (Shape::OneCommit, _) => "complete_and_lease(previous batch, 200)",
            };
            let Some(rate) = cairn(tasks, batch, shape, &format!("{label}, {how}")).await else {
                return;
            };
            rates.push((how, rate));
        }
        if let Some(python) = std::env::var_os("CAIRN_BENCH_PGQUEUER").filter(|p| !p.is_empty()) {
            peer(&python, tasks, batch, &rates).await;
        }
    }
}

/// One Cairn run in a fresh database; its rate in tasks/s (`None`: no PostgreSQL).
async fn cairn(tasks: usize, batch: u32, shape: Shape, label: &str) -> Option<f64> {
    // A fresh database per run, so one run's finished tasks do not slow the next.
    let db = cairn_testkit::pg::TestDb::new().await?;
    let pool = PgPoolOptions::new()
        .max_connections(NODES as u32 + 2)
        .connect_with(db.options())
        .await
        .expect("a pool");
    if batch > 1 && shape == Shape::TwoCommits {
        print_settings(&pool).await;
    }
    let (enqueued, enqueue_time) = enqueue(&pool, tasks, label).await;
    settle(&pool, "tasks").await;
    let load = loadavg();
    let started = Instant::now();
    let workers: Vec<_> = (0..NODES)
        .map(|n| {
            let pool = pool.clone();
            tokio::spawn(async move { work(&pool, &node(n), batch, shape).await })
        })
        .collect();
    let mut done = 0;
    for w in workers {
        done += w.await.expect("a worker");
    }
    let elapsed = started.elapsed();
    assert_eq!(done, enqueued, "every task completed exactly once");
    let finished: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'done'")
        .fetch_one(&pool)
        .await
        .expect("a count");
    assert_eq!(finished as usize, enqueued, "every task is done");
    let rate = done as f64 / elapsed.as_secs_f64();
    println!(
        "{label}: {done} tasks in {:.2} s = {rate:.0} tasks/s (enqueue: {:.0} tasks/s; load {load})",
        elapsed.as_secs_f64(),
        enqueued as f64 / enqueue_time.as_secs_f64(),
    );
    pool.close().await;
    db.close().await;
    Some(rate)
}

/// The same cluster conditions for every side before its clock starts: the queue table vacuumed and
/// analysed (hint bits set, statistics fresh, no autovacuum owed for the enqueue), then a checkpoint,
/// so that no side inherits the WAL and dirty buffers of what ran before it (a test run, the other
/// side) and every side starts its run just after a checkpoint. pgqueuer's side does the same
/// (`benches/pgqueuer_peer.py`).
async fn settle(pool: &PgPool, table: &str) {
    sqlx::query(&format!("VACUUM (ANALYZE) {table}"))
        .execute(pool)
        .await
        .expect("vacuum");
    sqlx::query("CHECKPOINT")
        .execute(pool)
        .await
        .expect("a checkpoint (the benchmark connects as a superuser)");
}

/// The 1-, 5- and 15-minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The same work done by pgqueuer in a fresh database of the same cluster; prints its line and the
/// ratio to each of Cairn's `rates`.
async fn peer(python: &std::ffi::OsStr, tasks: usize, batch: u32, rates: &[(&str, f64)]) {
    let Some(db) = cairn_testkit::pg::TestDb::new().await else {
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/pgqueuer_peer.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        // asyncpg refuses sqlx's connection options (`?statement-cache-capacity=...`): the bare URL.
        .args(["--dsn", db.url().split('?').next().unwrap_or(db.url())])
        .args(["--tasks", &tasks.to_string()])
        .args(["--batch", &batch.to_string()])
        .args(["--workers", &NODES.to_string()])
        .output()
        .await
        .expect("the peer runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the pgqueuer peer failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("pgqueuer:"))
        .expect("the peer prints its result");
    let theirs: f64 = line
        .split(" = ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|r| r.parse().ok())
        .expect("tasks/s in the peer's line");
    println!("  {line}");
    for (how, rate) in rates {
        println!("  Cairn ({how}) / pgqueuer: {:.2}x", rate / theirs);
    }
    db.close().await;
}

fn node(n: usize) -> Name {
    Name::new(&format!("node-{n}")).expect("a valid name")
}

/// Enqueues `tasks` spread over the nodes, 5,000 per transaction.
async fn enqueue(pool: &PgPool, tasks: usize, run: &str) -> (usize, Duration) {
    let app = Name::new("bench").expect("a valid name");
    let started = Instant::now();
    let mut inserted = 0;
    let all: Vec<usize> = (0..tasks).collect();
    for chunk in all.chunks(5_000) {
        let batch: Vec<NewTask> = chunk
            .iter()
            .map(|i| NewTask {
                slot: Some(1),
                payload: serde_json::json!({ "image": "registry.local/bench:1", "port": 8080 }),
                ..NewTask::new(
                    node(i % NODES),
                    TaskKind::Deploy,
                    app.clone(),
                    format!("{run}:{i}"),
                )
            })
            .collect();
        let mut tx = pool.begin().await.expect("begin");
        inserted += queue::enqueue_many(&mut tx, &batch)
            .await
            .expect("enqueue")
            .len();
        tx.commit().await.expect("commit");
    }
    (inserted, started.elapsed())
}

/// Leases and completes `node`'s tasks until there are none; returns how many it completed.
async fn work(pool: &PgPool, node: &Name, batch: u32, shape: Shape) -> usize {
    let mut done = 0;
    let mut finished: Vec<(TaskId, LeaseToken)> = Vec::new();
    loop {
        let leased = match shape {
            Shape::TwoCommits => queue::lease(pool, node, batch, LEASE).await.expect("lease"),
            Shape::OneCommit => {
                let (completed, leased) =
                    queue::complete_and_lease(pool, node, &finished, batch, LEASE)
                        .await
                        .expect("complete and lease");
                assert!(
                    completed.stale.is_empty() && completed.superseded.is_empty(),
                    "no lease expires during the benchmark"
                );
                done += completed.done.len();
                leased
            }
        };
        if leased.is_empty() {
            return done;
        }
        // (The work a task stands for would run here.)
        finished = leased.iter().map(|t| (t.id, t.token)).collect();
        if shape == Shape::OneCommit {
            continue;
        }
        if batch == 1 {
            for (id, token) in &finished {
                let status = queue::complete(pool, *id, *token).await.expect("complete");
                assert_eq!(status, TaskStatus::Done);
            }
            done += finished.len();
        } else {
            let result = queue::complete_many(pool, &finished)
                .await
                .expect("complete");
            assert!(
                result.stale.is_empty() && result.superseded.is_empty(),
                "no lease expires during the benchmark"
            );
            done += result.done.len();
        }
    }
}

async fn print_settings(pool: &PgPool) {
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(pool)
        .await
        .expect("version");
    println!("{version}");
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, current_setting(name) FROM pg_settings
         WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method', 'full_page_writes',
                        'shared_buffers', 'wal_level', 'max_wal_size', 'commit_delay',
                        'checkpoint_timeout', 'wal_buffers')
         ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .expect("settings");
    let shown: Vec<String> = settings.iter().map(|(n, v)| format!("{n}={v}")).collect();
    println!("settings: {}", shown.join(" "));
}
