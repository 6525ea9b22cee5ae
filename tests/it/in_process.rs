//! `cairn serve` as a library: a whole control plane in this process ([`cairn_server::serve`]) on a
//! `127.0.0.1:0` listener and a test database, driven over HTTP like any client, and stopped through
//! its [`Shutdown`].

use std::path::Path;
use std::time::Duration;

use cairn_reconciler::api::listen::Bounds;
use cairn_reconciler::controller::{HeadPolling, SourceSettings};
use cairn_reconciler::worker::Shutdown;
use cairn_server::{ApiSettings, Config, WebhookSettings};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(60);

/// `examples/local` without its apps (their sources are remotes this test does not reach).
fn config_repo(into: &Path) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/local");
    std::fs::copy(example.join("cairn.toml"), into.join("cairn.toml")).unwrap();
    for dir in ["plans", "runtimes", "nodes"] {
        std::fs::create_dir(into.join(dir)).unwrap();
        for f in std::fs::read_dir(example.join(dir)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), into.join(dir).join(f.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_control_plane_runs_in_process_and_stops_through_its_shutdown() {
    let db = cairn_testkit::test_db!();
    let repo = tempfile::tempdir().unwrap();
    config_repo(repo.path());
    let cache = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = Config {
        database_url: db.url().to_owned(),
        source: SourceSettings {
            repo: repo.path().display().to_string(),
            git_ref: "main".into(),
            cache_root: cache.path().to_owned(),
            rewrites: Default::default(),
            refuse_private_sources: false,
            head_polling: HeadPolling::All,
            seed: 0,
        },
        identity: None,
        interval: Duration::from_secs(60),
        node_offline_after: Duration::from_secs(90),
        http: Bounds::new(1024),
        metrics_listener: None,
        api: ApiSettings::new("cairn".parse().unwrap()),
        webhooks: WebhookSettings::default(),
        certs: Default::default(),
        ha: cairn_server::HaSettings::new(base.clone()),
    };
    let shutdown = Shutdown::new();
    let running = tokio::spawn(cairn_server::serve(listener, config, shutdown.clone()));

    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let ready = http.get(format!("{base}/readyz")).send().await;
        if let Ok(r) = ready
            && r.status() == 200
        {
            assert_eq!(r.text().await.unwrap(), "ready\n");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The admin API, with a token made as `cairn token create` makes one; the reconcile loop applies
    // the directory's two nodes.
    let (_, token) = cairn_reconciler::api::auth::issue_admin_token(
        db.pool(),
        "in-process",
        cairn_reconciler::store::tokens::Role::Operator,
    )
    .await
    .unwrap();
    // Readiness is the database's; the APIs' routes are installed once their own pool connected, and
    // answer 503 ("starting") until then.
    let unauthenticated = loop {
        let r = http
            .get(format!("{base}{}/status", cairn_proto::ADMIN_API))
            .send()
            .await
            .unwrap();
        if r.status() != 503 {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the admin API never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(unauthenticated.status(), 401);
    let status = loop {
        let r = http
            .get(format!("{base}{}/status", cairn_proto::ADMIN_API))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let status: Value = r.json().await.unwrap();
        if status["applied_commit"].is_string() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never applied: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let nodes: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["local-1", "local-2"], "{status}");

    shutdown.trigger();
    let stopped = tokio::time::timeout(PATIENCE, running)
        .await
        .expect("serve returns once shut down");
    stopped.unwrap().unwrap();
    assert!(
        http.get(format!("{base}/healthz")).send().await.is_err(),
        "the listener is closed"
    );
}
