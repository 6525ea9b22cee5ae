//! A control plane's steady state at many apps, through the real [`Controller`] against PostgreSQL: the
//! repository of the `git_plan` benchmark (N apps at 100 per file, 100 nodes) in a local git remote, every
//! app's branch head recorded, every node online.
//!
//! - **cold apply**: the first reconcile (fetch, load, plan, one apply transaction writing every
//!   resource, release, placement and task);
//! - **noop plan**: the next run (the apply left change marks): read, plan, nothing written;
//! - **idle tick**: every run after that, with nothing new: a fetch and one query, no plan (median);
//! - **one-file commit**: a commit changing one app's env in one file, then the run a webhook wakes
//!   (fetch, load, read, plan, apply: one release), median; beside it, the observed state read whole;
//! - **status** (`cairn status` through the database) and **metrics** (one `/metrics` scrape with its
//!   database gauges), each alone, then both while a full (manual) reconcile runs beside them: how long
//!   that reconcile took with and without them.
//!
//! ```text
//! cargo bench -p cairn-reconciler --bench scale                    # 10,000 apps
//! cargo bench -p cairn-reconciler --bench scale -- --apps 100000 --runs 5
//! ```

use std::time::{Duration, Instant};

use cairn_reconciler::controller::{ConfigSource, Controller, Outcome, Trigger};
use cairn_reconciler::store::ReconcileStatus;
use sqlx::postgres::PgPoolOptions;

#[path = "support/repo.rs"]
mod repo;

fn arg(name: &str) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let apps = arg("--apps").unwrap_or(10_000);
    let runs = arg("--runs").unwrap_or(5).max(1);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run(apps, runs));
}

async fn run(apps: usize, runs: usize) {
    let Some(db) = cairn_testkit::pg::TestDb::new().await else {
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(db.options())
        .await
        .expect("a pool");
    let t = Instant::now();
    let remote = repo::Remote::new(&repo::generate(apps));
    println!(
        "{apps} apps, 100 nodes; repository generated and pushed in {}",
        ms(t.elapsed())
    );

    repo::record_heads(&pool, apps).await;

    let c = Controller::new(
        pool.clone(),
        ConfigSource::Git(remote.source("cache")),
        None,
    );
    let t = Instant::now();
    match c.reconcile(Trigger::Startup).await.expect("cold apply") {
        Outcome::Applied(a) if a.status == ReconcileStatus::Applied => {
            println!("cold apply: {} ({} tasks)", ms(t.elapsed()), a.tasks)
        }
        other => panic!("expected an apply, got {other:?}"),
    }
    // The agents join: every node online, heard from now.
    sqlx::query(
        "INSERT INTO node_status (node, state, joined_at, last_heartbeat, drivers) \
         SELECT name, 'online', now(), now(), '{docker,process}' FROM nodes",
    )
    .execute(&pool)
    .await
    .expect("nodes online");

    let t = Instant::now();
    match c.reconcile(Trigger::Timer).await.expect("a noop run") {
        Outcome::Applied(a) if a.status == ReconcileStatus::Noop => {
            println!(
                "noop plan (read, plan, nothing written): {}",
                ms(t.elapsed())
            )
        }
        Outcome::Applied(a) => panic!("expected a noop, got {}", a.plan.summary()),
        other => panic!("expected a noop, got {other:?}"),
    }
    let mut idle = Vec::new();
    for _ in 0..runs.max(5) {
        let t = Instant::now();
        let o = c.reconcile(Trigger::Timer).await.expect("an idle run");
        idle.push(t.elapsed());
        assert!(matches!(o, Outcome::Unchanged { .. }), "{o:?}");
    }
    println!(
        "idle tick (fetch, one query, no plan): median {} of {} (max {})",
        ms(median(idle.clone())),
        idle.len(),
        ms(*idle.iter().max().expect("runs"))
    );

    // One-file commits, as a push brings them: the run a webhook wakes, fetch to commit. Each changes
    // one app's env in a different file (a value never committed before), so each is one new release.
    // The first `runs` are timed whole; the next `runs` in two parts: the source read (fetch and
    // incremental load) first, then the reconcile, whose fetch then finds nothing new.
    let (mut commits, mut reads, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..2 * runs {
        remote.commit_one_change(apps, run, 1);
        if run >= runs {
            let t = Instant::now();
            c.read().await.expect("the source read");
            reads.push(t.elapsed());
        }
        let t = Instant::now();
        match c.reconcile(Trigger::Wake).await.expect("a commit's run") {
            Outcome::Applied(a) if a.status == ReconcileStatus::Applied => {
                if run < runs {
                    commits.push(t.elapsed());
                } else {
                    rest.push(t.elapsed());
                }
                assert_eq!(
                    a.plan.summary(),
                    "Plan: 0 to add, 1 to change, 0 to destroy."
                );
            }
            other => panic!("expected an apply, got {other:?}"),
        }
    }
    let t = Instant::now();
    let observed = cairn_reconciler::store::state::load_observed(&pool)
        .await
        .expect("the observed state");
    let read = t.elapsed();
    println!(
        "one-file commit (fetch to commit): median {} of {runs} (max {}); in parts: source read \
         (fetch, load) {}, then the rest (read observed, plan, apply) {}; the observed state read \
         whole: {} ({} placements)",
        ms(median(commits.clone())),
        ms(*commits.iter().max().expect("runs")),
        ms(median(reads)),
        ms(median(rest)),
        ms(read),
        observed.placements.len()
    );

    let offline_after = cairn_plan::DEFAULT_OFFLINE_AFTER;
    let mut status = Vec::new();
    let mut scrape = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let s = cairn_reconciler::status::load(&pool, offline_after, &Default::default())
            .await
            .expect("status");
        status.push(t.elapsed());
        std::hint::black_box(s);
        let t = Instant::now();
        let text = cairn_reconciler::metrics::global()
            .render(Some(&pool))
            .await;
        scrape.push(t.elapsed());
        assert!(text.contains("cairn_metrics_database_up 1"), "{text}");
    }
    println!(
        "status (database): median {}; /metrics scrape: median {} ({runs} runs)",
        ms(median(status)),
        ms(median(scrape))
    );

    // A full reconcile alone, then with status loads and scrapes running beside it the whole time.
    let mut alone = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        c.reconcile(Trigger::Manual).await.expect("a manual run");
        alone.push(t.elapsed());
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let pool = pool.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if i == 0 {
                        let s = cairn_reconciler::status::load(
                            &pool,
                            offline_after,
                            &Default::default(),
                        )
                        .await;
                        std::hint::black_box(s.expect("status"));
                    } else {
                        let text = cairn_reconciler::metrics::global()
                            .render(Some(&pool))
                            .await;
                        std::hint::black_box(text);
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut beside = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        c.reconcile(Trigger::Manual).await.expect("a manual run");
        beside.push(t.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = 0;
    for r in readers {
        reads += r.await.expect("a reader");
    }
    let (alone, beside) = (median(alone), median(beside));
    println!(
        "full reconcile: median {} alone, {} beside status and /metrics readers ({reads} reads), x{:.2}",
        ms(alone),
        ms(beside),
        beside.as_secs_f64() / alone.as_secs_f64()
    );
}
