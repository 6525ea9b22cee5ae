//! What events cost an apply: a cold apply of N apps (every app a new release, so N `deploy.started`
//! events and one `apply.succeeded`, written in the apply's transaction) against a fresh database of the
//! testkit's PostgreSQL, with no notification sink and with two sinks that want every event (a
//! notification row per event and sink, in the same transaction). Reported: the apply's time, the events
//! written per second of it, and the time `events::record` takes for the same events on its own
//! (recorded again in a transaction that is rolled back), as a share of the apply: the latency events add.
//!
//! ```text
//! cargo bench -p cairn-reconciler --bench events                 # 1,000 and 10,000 apps, 3 runs each
//! cargo bench -p cairn-reconciler --bench events -- 10000 --runs 5
//! ```

use std::time::{Duration, Instant};

use cairn_plan::observed::{CommitId, Fingerprints};
use cairn_reconciler::events::{EventKind, NewEvent, record};
use cairn_reconciler::executor::{Context, reconcile};
use cairn_reconciler::store::history::Trigger;

const REV: &str = "0123456789abcdef0123456789abcdef01234567";

/// A repository of `apps` one-replica apps pinned to a commit (so each gets a release without a branch
/// head), on 100 nodes large enough for all of them.
fn repo(apps: usize) -> Vec<(String, String)> {
    let mut files = vec![(
        "cairn.toml".to_owned(),
        "base_domain = \"apps.example.com\"\n".to_owned(),
    )];
    let mut infra = String::from(
        "[plan.small]\ncpu = 0.01\nmemory = \"16MiB\"\ndisk = \"100MiB\"\nprice = \"1.00\"\nmax_replicas = 3\n\n\
         [runtime.web]\nimage = \"debian:12\"\nstart = \"./serve\"\nport = 8080\n\n",
    );
    for n in 0..100 {
        infra += &format!("[node.n{n}]\ncpu = 64\nmemory = \"256GiB\"\ndisk = \"4TiB\"\n\n");
    }
    files.push(("platform.toml".to_owned(), infra));
    for chunk in 0..apps.div_ceil(100) {
        let mut f = String::new();
        for a in chunk * 100..((chunk + 1) * 100).min(apps) {
            f += &format!(
                "[app.app-{a}]\nplan = \"small\"\nruntime = \"web\"\n\n\
                 [app.app-{a}.source]\nurl = \"https://github.com/acme/app-{a}.git\"\nrev = \"{REV}\"\n\n"
            );
        }
        files.push((format!("apps/{chunk:04}.toml"), f));
    }
    files
}

struct Run {
    apply: Duration,
    events: i64,
    deliveries: i64,
    record: Duration,
}

async fn one(apps: usize, sinks: bool) -> Run {
    let db = cairn_testkit::pg::TestDb::new()
        .await
        .expect("the benchmark needs PostgreSQL (see testkit/src/pg.rs)");
    let pool = db.pool().clone();
    let mut files = repo(apps);
    if sinks {
        // Two sinks that want every event. The URLs are never opened here: any armored text parses.
        let sealed = "{ secret = \"-----BEGIN AGE ENCRYPTED FILE-----\\nAA==\\n-----END AGE ENCRYPTED FILE-----\" }";
        let mut f = String::new();
        for name in ["ops", "audit"] {
            f += &format!(
                "[notify.{name}]\nkind = \"slack\"\nurl = {sealed}\nevents = [\"*\"]\nseverity = \"info\"\nmax_per_hour = 1000000\n\n"
            );
        }
        files.push(("notify.toml".to_owned(), f));
    }
    let (_, loaded) = cairn_schema::load(files.iter().map(|(p, s)| (p.as_str(), s.as_str())));
    let desired = loaded.desired.expect("the generated repository is valid");
    let commit = CommitId::new("fedcba9876543210fedcba9876543210fedcba98");
    let cx = Context {
        source: "bench",
        trigger: Trigger::Timer,
        identity: None,
        seed: 7,
        offline_after: Duration::from_secs(90),
        started_at: chrono::Utc::now(),
        expect_generation: None,
        fence: None,
        hooks: None,
        planner: None,
        observed: None,
        desired_changes: None,
    };
    let started = Instant::now();
    let applied = reconcile(
        &pool,
        Some((&commit, &desired)),
        Some(&Fingerprints::new()),
        &cx,
    )
    .await
    .expect("the cold apply");
    let apply = started.elapsed();
    assert_eq!(applied.plan.releases.len(), apps);
    assert_eq!(
        applied.status,
        cairn_reconciler::store::ReconcileStatus::Applied
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let deliveries: i64 = sqlx::query_scalar("SELECT count(*) FROM notify_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    // The same events once more, alone, in a transaction that is rolled back.
    let again: Vec<NewEvent> = applied
        .plan
        .releases
        .iter()
        .map(|r| {
            NewEvent::new(
                EventKind::DeployStarted,
                format!("release #{} of {}", r.number, r.app),
            )
            .app(&r.app)
            .release(r.number)
            .commit(r.source_commit.as_str())
        })
        .chain(std::iter::once(
            NewEvent::new(EventKind::ApplySucceeded, "applied").commit(commit.as_str()),
        ))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let started = Instant::now();
    record(&mut tx, &again).await.unwrap();
    let record_took = started.elapsed();
    tx.rollback().await.unwrap();
    Run {
        apply,
        events,
        deliveries,
        record: record_took,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut sizes = Vec::new();
    let mut runs = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).expect("--runs N"),
            "--bench" => {}
            n => sizes.push(n.parse::<usize>().expect("a number of apps")),
        }
    }
    if sizes.is_empty() {
        sizes = vec![1000, 10_000];
    }
    println!(
        "| apps | sinks | events | notifications | apply | events/s of the apply | events::record alone | share of the apply |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for apps in sizes {
        for sinks in [false, true] {
            let mut all = Vec::new();
            for _ in 0..runs {
                all.push(one(apps, sinks).await);
            }
            let (events, deliveries) = (all[0].events, all[0].deliveries);
            let apply = median(all.iter().map(|r| r.apply).collect());
            let rec = median(all.iter().map(|r| r.record).collect());
            println!(
                "| {apps} | {} | {events} | {deliveries} | {} | {:.0} | {} | {:.1} % |",
                if sinks { 2 } else { 0 },
                ms(apply),
                events as f64 / apply.as_secs_f64(),
                ms(rec),
                100.0 * rec.as_secs_f64() / apply.as_secs_f64(),
            );
        }
    }
}
