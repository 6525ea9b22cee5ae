//! The dashboard's overview at many apps: time to first byte of `GET /ui/` (signed in) through the real
//! router, against the state the real `Controller` applied from the `git_plan` benchmark's repository
//! (N apps at 100 per file, 100 nodes, every node online), and the memory held by open live-output
//! streams (server-sent events).
//!
//! ```text
//! cargo bench -p cairn-reconciler --bench dashboard                      # 1,000 apps, 1,000 viewers
//! cargo bench -p cairn-reconciler --bench dashboard -- --apps 10000 --runs 20 --viewers 1000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_reconciler::api::{Api, ApiConfig, auth};
use cairn_reconciler::controller::{ConfigSource, Controller, Outcome, Trigger};
use cairn_reconciler::queue::Listener;
use cairn_reconciler::store::{ReconcileStatus, tokens};
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

/// This process's resident memory, from `/proc/self/status`.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let apps = arg("--apps").unwrap_or(1_000);
    let runs = arg("--runs").unwrap_or(20).max(1);
    let viewers = arg("--viewers").unwrap_or(1_000);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run(apps, runs, viewers));
}

async fn run(apps: usize, runs: usize, viewers: usize) {
    let Some(db) = cairn_testkit::pg::TestDb::new().await else {
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(db.options())
        .await
        .expect("a pool");
    let remote = repo::Remote::new(&repo::generate(apps));
    repo::record_heads(&pool, apps).await;
    let c = Controller::new(
        pool.clone(),
        ConfigSource::Git(remote.source("cache")),
        None,
    );
    match c.reconcile(Trigger::Startup).await.expect("cold apply") {
        Outcome::Applied(a) if a.status == ReconcileStatus::Applied => {}
        other => panic!("expected an apply, got {other:?}"),
    }
    sqlx::query(
        "INSERT INTO node_status (node, state, joined_at, last_heartbeat, drivers) \
         SELECT name, 'online', now(), now(), '{docker,process}' FROM nodes",
    )
    .execute(&pool)
    .await
    .expect("nodes online");

    let listener = Listener::start(&pool, Duration::from_secs(1))
        .await
        .expect("a listener");
    let api = Api::new(
        pool.clone(),
        Arc::new(listener),
        None,
        Arc::default(),
        None,
        ApiConfig::new("bench".parse().expect("a name")),
        None,
    );
    let router = cairn_reconciler::api::router(api);
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let base = format!("http://{}", tcp.local_addr().expect("an address"));
    tokio::spawn(async move { axum::serve(tcp, router).await });

    let (id, _) = auth::issue_admin_token(&pool, "bench", tokens::Role::Viewer)
        .await
        .expect("a token");
    let session = auth::generate("cairn-ui-");
    tokens::create_session(&pool, &auth::hash(&session), id, Duration::from_secs(3600))
        .await
        .expect("a session");
    let cookie = format!("cairn_session={session}");
    let http = reqwest::Client::new();

    let mut ttfb = Vec::new();
    let mut size = 0;
    for _ in 0..runs + 2 {
        let t = Instant::now();
        let resp = http
            .get(format!("{base}/ui/"))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("the overview");
        ttfb.push(t.elapsed());
        assert_eq!(resp.status(), 200);
        size = resp.bytes().await.expect("a body").len();
    }
    // The first two warm the pool and the caches.
    let mut ttfb = ttfb.split_off(2);
    ttfb.sort();
    println!(
        "{apps} apps, 100 nodes: overview TTFB median {}, p90 {}, max {} ({runs} runs, {} KiB page)",
        ms(ttfb[ttfb.len() / 2]),
        ms(ttfb[ttfb.len() * 9 / 10]),
        ms(*ttfb.last().expect("runs")),
        size / 1024
    );

    // Live viewers: each a connection holding the replica output stream of an app.
    let before = rss_kib();
    let mut open = Vec::with_capacity(viewers);
    for v in 0..viewers {
        let resp = http
            .get(format!(
                "{base}/ui/apps/app-{}/logs/stream?after=0",
                v % apps
            ))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("a stream");
        assert_eq!(resp.status(), 200);
        open.push(resp);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kib();
    println!(
        "{viewers} live viewers open: RSS {} MiB -> {} MiB (+{} MiB, server and client in one process)",
        before / 1024,
        after / 1024,
        after.saturating_sub(before) / 1024
    );
    drop(open);
}
