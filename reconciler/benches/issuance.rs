//! Issuance time for many names against a real ACME CA: the control plane's [`CertWorker`] ordering one
//! certificate per app for N apps (default 100) from Debian's `pebble`, and, in the same run, Debian's
//! `lego` (an established ACME client) issuing the same number of certificates from its own pebble, one
//! `lego run` per name, as an operator scripting it would.
//!
//! `cargo bench -p cairn-reconciler --bench issuance -- [--names N] [--parallel N] [--skip-lego]`
//! (release; `--parallel` is the worker's `CertSettings::parallel`, 8 by default as in `cairn serve`). Both sides
//! validate HTTP-01 over loopback (pebble's DNS server answers 127.0.0.1 for every name); pebble runs
//! with `PEBBLE_VA_NOSLEEP`, so the figures are the clients' and the CA's work, not pebble's simulated
//! delays. The database comes from `cairn-testkit` (the private cluster).

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use cairn_reconciler::certs::{self, CertSettings, CertWorker, Challenges};
use cairn_reconciler::store::certs::{self as store, CertState};
use cairn_schema::Identity;
use cairn_testkit::pebble::{Pebble, resolve_a};
use sqlx::postgres::PgPoolOptions;

fn main() {
    let mut names = 100usize;
    let mut parallel = 8usize;
    let mut lego = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--names" => names = args.next().and_then(|n| n.parse().ok()).expect("--names N"),
            "--parallel" => {
                parallel = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--parallel N")
            }
            "--skip-lego" => lego = false,
            // cargo bench passes `--bench`.
            _ => {}
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run(names, parallel, lego));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn run(n: usize, parallel: usize, lego: bool) {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let Some(db) = cairn_testkit::pg::TestDb::new().await else {
        return;
    };
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(db.options())
        .await
        .expect("a pool");

    // Cairn: the challenge set served where pebble validates HTTP-01 (an ingress node's port 80).
    let port = free_port();
    let Some(ca) = Pebble::start("issuance bench", dir.path(), port).await else {
        return;
    };
    let challenges = Challenges::new();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .expect("the challenge port");
    let router = challenges.router();
    tokio::spawn(async move { axum::serve(listener, router).await });

    let apps: String = (0..n)
        .map(|i| {
            format!(
                "[app.a{i}]\nplan = \"small\"\nruntime = \"node\"\nsource = {{ url = \"https://github.com/acme/a{i}.git\" }}\n\n"
            )
        })
        .collect();
    let cairn = format!(
        "base_domain = \"bench.test\"\n[tls]\nacme_directory = \"{}\"\ncontact = \"ops@bench.test\"\n",
        ca.directory
    );
    let defs = "[plan.small]\ncpu = 0.01\nmemory = \"16MiB\"\ndisk = \"16MiB\"\nprice = \"1.00\"\nmax_replicas = 3\n\n\
         [runtime.node]\nimage = \"node:22\"\nstart = \"node s.js\"\nport = 3000\n";
    let (_, loaded) = cairn_schema::load([
        ("cairn.toml", cairn),
        ("defs.toml", defs.to_owned()),
        ("apps.toml", apps),
    ]);
    let desired = loaded
        .desired
        .unwrap_or_else(|| panic!("{}", loaded.diagnostics));
    certs::declare(&pool, &desired)
        .await
        .expect("declare the names");

    let dns = ca.dns.clone();
    let mut settings = CertSettings::new(&ca.directory);
    settings.contact = Some("ops@bench.test".into());
    settings.ca_roots_pem = Some(ca.api_root_pem.clone());
    settings.probe_port = port;
    settings.parallel = parallel;
    settings.resolve = Arc::new(move |name: String| {
        let dns = dns.clone();
        Box::pin(async move {
            Ok(resolve_a(&dns, &name)
                .await?
                .into_iter()
                .map(IpAddr::V4)
                .collect())
        })
    });
    let identity = Arc::new(Identity::generate());
    let mut worker = CertWorker::new(pool.clone(), identity, challenges, settings);

    let started = Instant::now();
    let attempts = worker.run_due().await.expect("a pass");
    let cairn_time = started.elapsed();
    let issued = store::list(&pool)
        .await
        .expect("list")
        .into_iter()
        .filter(|r| r.state == CertState::Issued)
        .count();
    assert_eq!(
        issued,
        n,
        "every name set is issued in one pass: {:?}",
        attempts
            .iter()
            .filter(|a| a.state != CertState::Issued)
            .collect::<Vec<_>>()
    );
    assert_eq!(ca.orders(), n, "one order per name set");
    println!(
        "cairn CertWorker ({parallel} at once): {n} certificates (one name each) in {:.2} s: {:.0} ms per certificate",
        cairn_time.as_secs_f64(),
        cairn_time.as_secs_f64() * 1000.0 / n as f64
    );

    if !lego {
        return;
    }
    if Command::new("lego").arg("--version").output().is_err() {
        println!("lego: not installed (Debian package `lego`); no peer figure");
        return;
    }
    let lego_port = free_port();
    let Some(peer_ca) = Pebble::start("issuance bench (lego)", dir.path(), lego_port).await else {
        return;
    };
    let roots = dir.path().join("pebble-api-root.pem");
    std::fs::write(&roots, &peer_ca.api_root_pem).expect("write the root");
    let path = dir.path().join("lego");
    let started = Instant::now();
    for i in 0..n {
        let out = Command::new("lego")
            .env("LEGO_CA_CERTIFICATES", &roots)
            .args(["--server", &peer_ca.directory, "--email", "ops@bench.test"])
            .args(["--accept-tos", "--key-type", "ec256", "--http"])
            .args(["--http.port", &format!("127.0.0.1:{lego_port}")])
            .arg("--path")
            .arg(&path)
            .args(["--domains", &format!("a{i}.bench.test"), "run"])
            .stdin(Stdio::null())
            .output()
            .expect("run lego");
        assert!(
            out.status.success(),
            "lego failed for a{i}.bench.test: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lego_time = started.elapsed();
    assert_eq!(peer_ca.orders(), n, "lego placed one order per name");
    println!(
        "lego (one `lego run` per name): {n} certificates in {:.2} s: {:.0} ms per certificate",
        lego_time.as_secs_f64(),
        lego_time.as_secs_f64() * 1000.0 / n as f64
    );
    println!(
        "ratio (lego time / cairn time): {:.2}",
        lego_time.as_secs_f64() / cairn_time.as_secs_f64()
    );
}
