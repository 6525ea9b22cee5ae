//! Certificates against a real ACME CA (Debian's `pebble`) and a real PostgreSQL: the self-probe keeps a
//! name whose DNS points elsewhere away from the CA, a name that reaches the cluster is issued (its
//! chain verifies against pebble's root for every name) and renewed, and no key is ever stored in
//! plaintext.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use cairn_reconciler::certs::{self, CertSettings, CertWorker, Challenges, leaf_info};
use cairn_reconciler::store::certs::{self as store, CertState};
use cairn_reconciler::worker::Shutdown;
use cairn_schema::{Ciphertext, Identity};
use cairn_testkit::pebble::{Pebble, resolve_a};
use rustls::client::danger::ServerCertVerifier as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sqlx::PgPool;

/// Serves the challenge set on a free loopback port (what every ingress node does on port 80).
async fn challenge_server(challenges: &Challenges) -> u16 {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = challenges.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    port
}

fn settings(ca: &Pebble, port: u16) -> CertSettings {
    let dns = ca.dns.clone();
    let mut s = CertSettings::new(&ca.directory);
    s.contact = Some("ops@example.test".into());
    s.ca_roots_pem = Some(ca.api_root_pem.clone());
    s.probe_port = port;
    s.probe_timeout = Duration::from_secs(2);
    // The test's challenge server answers a token as soon as it is added.
    s.propagation = Duration::from_millis(500);
    s.retry_first = Duration::from_millis(200);
    s.retry_max = Duration::from_secs(1);
    s.resolve = Arc::new(move |name: String| {
        let dns = dns.clone();
        Box::pin(async move {
            Ok(resolve_a(&dns, &name)
                .await?
                .into_iter()
                .map(IpAddr::V4)
                .collect())
        })
    });
    s
}

/// A repository with `[tls]` on `directory` and app `shop` with `domains = [domain]`, declared.
async fn declare(pool: &PgPool, directory: &str, domain: &str) -> cairn_schema::Desired {
    let cairn = format!(
        "base_domain = \"apps.example.test\"\n[tls]\nacme_directory = \"{directory}\"\ncontact = \"ops@example.test\"\n"
    );
    let apps = format!(
        "{}\n[app.shop]\nplan = \"small\"\nruntime = \"node\"\ndomains = [\"{domain}\"]\n\n[app.shop.source]\nurl = \"https://github.com/acme/shop.git\"\n",
        "[plan.small]\ncpu = 0.5\nmemory = \"512MiB\"\ndisk = \"1GiB\"\nprice = \"5.00\"\nmax_replicas = 3\n\n\
         [runtime.node]\nimage = \"node:22\"\nstart = \"node s.js\"\nport = 3000\n"
    );
    let (_, loaded) = cairn_schema::load([("cairn.toml", cairn), ("apps.toml", apps)]);
    let desired = loaded
        .desired
        .unwrap_or_else(|| panic!("{}", loaded.diagnostics));
    certs::declare(pool, &desired).await.unwrap();
    desired
}

/// Verifies `chain_pem` against `root_pem` for `name` (as a browser would, now).
fn verify(chain_pem: &str, root_pem: &str, name: &str) {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap_or_else(|e| panic!("the chain does not verify for {name}: {e}"));
}

/// Every text column of the certificate and account tables, as one string.
async fn all_rows(pool: &PgPool) -> String {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT t::text FROM certificates t UNION ALL SELECT a::text FROM acme_accounts a",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("\n")
}

/// The whole database as `pg_dump` writes it (the server's own `pg_dump`, beside its `initdb`).
fn pg_dump(url: &str) -> String {
    let mut bins: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin/pg_dump"))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    bins.sort();
    let bin = bins
        .pop()
        .expect("pg_dump beside the PostgreSQL server binaries");
    // libpq refuses sqlx's own URL parameters.
    let url = url.split('?').next().unwrap();
    let out = std::process::Command::new(bin)
        .arg("--dbname")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("COPY public.certificates"),
        "a dump of the database"
    );
    text
}

/// Debian's pebble (2.4) offers no renewal information (ARI, RFC 9773): the renewal falls back to two
/// thirds of the lifetime, minus up to a twentieth of it (and a renewal order goes without `replaces`).
fn renews_at_two_thirds(row: &store::CertRow) {
    let (nb, na) = (row.not_before.unwrap(), row.not_after.unwrap());
    let life = (na - nb).as_seconds_f64();
    let at = (row.next_attempt_at - nb).as_seconds_f64();
    assert!(
        at <= life * 2.0 / 3.0 + 1.0 && at >= life * (2.0 / 3.0 - 0.05) - 1.0,
        "renewal at {:.4} of the lifetime",
        at / life
    );
}

#[tokio::test]
async fn a_name_reaching_the_cluster_is_issued_renewed_and_its_key_is_never_plaintext() {
    let db = cairn_testkit::test_db!();
    let dir = tempfile::tempdir().unwrap();
    let challenges = Challenges::new();
    let port = challenge_server(&challenges).await;
    let test = cairn_testkit::current_test();
    let Some(ca) = Pebble::start(&test, dir.path(), port).await else {
        return;
    };
    ca.dns_a("shop.apps.example.test", "127.0.0.1").await;
    ca.dns_a("shop.example.test", "127.0.0.1").await;
    declare(db.pool(), &ca.directory, "shop.example.test").await;
    let identity = Arc::new(Identity::generate());
    let mut worker = CertWorker::new(
        db.pool().clone(),
        identity.clone(),
        challenges.clone(),
        settings(&ca, port),
    );

    let attempts = worker.run_due().await.unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(
        attempts[0].state,
        CertState::Issued,
        "{:?}",
        store::list(db.pool()).await
    );
    assert!(
        challenges.current().is_empty(),
        "every token is withdrawn after the order"
    );
    let rows = store::list(db.pool()).await.unwrap();
    let row = &rows[0];
    assert_eq!(row.names, ["shop.apps.example.test", "shop.example.test"]);
    assert_eq!(row.state, CertState::Issued);
    assert_eq!(row.last_error, None);
    let chain = row.chain_pem.clone().unwrap();
    let root = ca.issuer_root_pem().await;
    for name in &row.names {
        verify(&chain, &root, name);
    }
    let leaf = leaf_info(&chain).unwrap();
    let mut names = leaf.names.clone();
    names.sort();
    assert_eq!(
        names, row.names,
        "the certificate names exactly the declared names"
    );
    assert_eq!(row.serial.as_deref(), Some(leaf.serial.as_str()));
    assert!(
        row.issuer.as_deref().unwrap().contains("Pebble"),
        "{:?}",
        row.issuer
    );
    assert!(
        row.next_attempt_at > chrono::Utc::now(),
        "renewal is in the future"
    );
    assert!(
        row.next_attempt_at < row.not_after.unwrap(),
        "renewal is before expiry"
    );
    renews_at_two_thirds(row);

    // Not expiring soon: nothing to announce. Within 14 days: announced once for that certificate.
    assert_eq!(worker.announce_expiring().await.unwrap(), 0);
    sqlx::query("UPDATE certificates SET not_after = now() + interval '3 days'")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(worker.announce_expiring().await.unwrap(), 1);
    assert_eq!(
        worker.announce_expiring().await.unwrap(),
        0,
        "once per certificate"
    );
    let (kind, message): (String, String) =
        sqlx::query_as("SELECT kind, message FROM events WHERE kind = 'certificate.expiring'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(kind, "certificate.expiring");
    assert!(message.contains("shop.example.test"), "{message}");

    // The key, only sealed to the control plane.
    let served = store::served(db.pool()).await.unwrap();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].names, row.names);
    let sealed = served[0].key_sealed.clone();
    let key = identity
        .decrypt(&Ciphertext::new(&sealed).unwrap())
        .unwrap();
    let key = key.expose_str().unwrap().to_owned();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "a PEM key");
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let dump = format!("{}\n{}", all_rows(db.pool()).await, pg_dump(db.url()));
    assert!(!dump.contains("PRIVATE KEY"), "no plaintext key in any row");
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!dump.contains(line), "a line of the key appears in a row");
    }
    assert!(!dump.replace(['\n', '\\'], "").contains(&body));

    // Renewal: made due now, it orders again; the old certificate stays until the new one replaces it.
    sqlx::query("UPDATE certificates SET next_attempt_at = now()")
        .execute(db.pool())
        .await
        .unwrap();
    let orders = ca.orders();
    let attempts = worker.run_due().await.unwrap();
    assert_eq!(attempts[0].state, CertState::Issued);
    assert_eq!(ca.orders(), orders + 1);
    let renewed = store::list(db.pool()).await.unwrap().remove(0);
    assert_ne!(renewed.serial, row.serial, "a renewal is a new certificate");
    verify(
        renewed.chain_pem.as_deref().unwrap(),
        &root,
        "shop.example.test",
    );
    assert_eq!(renewed.attempts, 0);
    renews_at_two_thirds(&renewed);

    // Nothing else is due.
    assert!(worker.run_due().await.unwrap().is_empty());

    // Visible: the list the CLI and the admin API show, and the metrics.
    let shown = certs::list(db.pool()).await.unwrap();
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].state, "issued");
    assert_eq!(shown[0].app, "shop");
    assert!(!shown[0].expires_soon);
    assert!(!serde_json::to_string(&shown).unwrap().contains("PRIVATE"));
    let text = cairn_reconciler::metrics::Metrics::new()
        .render(Some(db.pool()))
        .await;
    for line in [
        "cairn_certificates{state=\"issued\"} 1",
        "cairn_certificates{state=\"waiting_dns\"} 0",
        "cairn_metrics_database_up 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    let days: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("cairn_certificate_soonest_expiry_days "))
        .unwrap_or_else(|| panic!("no soonest expiry in:\n{text}"))
        .parse()
        .unwrap();
    assert!(days > 14.0, "pebble's certificates last long: {days}");
}

#[tokio::test]
async fn a_name_not_reaching_the_cluster_never_reaches_the_ca_and_is_issued_once_dns_is_fixed() {
    let db = cairn_testkit::test_db!();
    let dir = tempfile::tempdir().unwrap();
    let challenges = Challenges::new();
    let port = challenge_server(&challenges).await;
    let test = cairn_testkit::current_test();
    let Some(ca) = Pebble::start(&test, dir.path(), port).await else {
        return;
    };
    // The default domain reaches the cluster; the custom domain points at another machine.
    ca.dns_a("shop.apps.example.test", "127.0.0.1").await;
    ca.dns_a("shop.example.test", "127.0.0.2").await;
    let desired = declare(db.pool(), &ca.directory, "shop.example.test").await;
    let mut worker = fresh_worker(&db, &challenges, settings(&ca, port));

    let before = chrono::Utc::now();
    let attempts = worker.run_due().await.unwrap();
    assert_eq!(attempts[0].state, CertState::WaitingDns);
    let row = store::list(db.pool()).await.unwrap().remove(0);
    assert_eq!(row.state, CertState::WaitingDns);
    assert_eq!(row.attempts, 1);
    let why = row.last_error.clone().unwrap();
    assert!(
        why.contains("`shop.example.test` resolves to 127.0.0.2"),
        "the reason names the name and where it points: {why}"
    );
    // At least half the first backoff (200 ms here) after the attempt began, however slow the machine
    // (comparing with the time now failed once under load).
    assert!(
        row.next_attempt_at >= before + chrono::TimeDelta::milliseconds(100),
        "retried later"
    );
    assert!(row.chain_pem.is_none());
    assert_eq!(ca.orders(), 0, "no order reached the CA");
    let failed_events = || async {
        sqlx::query_as::<_, (String, String)>(
            "SELECT message, detail->>'state' FROM events WHERE kind = 'certificate.failed'",
        )
        .fetch_all(db.pool())
        .await
        .unwrap()
    };
    let events = failed_events().await;
    assert_eq!(events.len(), 1, "the first failure is an event: {events:?}");
    assert_eq!(events[0].1, "waiting_dns");
    assert!(
        events[0]
            .0
            .contains("waits for DNS: `shop.example.test` resolves to 127.0.0.2"),
        "{events:?}"
    );
    let status =
        cairn_reconciler::status::load(db.pool(), Duration::from_secs(90), &Default::default())
            .await
            .unwrap();
    assert!(
        status
            .certificate_warnings
            .iter()
            .any(|w| w
                .contains("(shop): waiting for DNS: `shop.example.test` resolves to 127.0.0.2")),
        "status says why the certificate waits: {:?}",
        status.certificate_warnings
    );
    // So does the plan (`cairn plan`, a pull request's comment), from the observed state it reads.
    let observed = cairn_reconciler::store::state::load_observed(db.pool())
        .await
        .unwrap();
    let commit = cairn_plan::observed::CommitId::new("c0ffee0c0ffee0c0ffee0c0ffee0c0ffee0c0ffe");
    let plan = cairn_plan::plan(&cairn_plan::PlanInput {
        desired: Some(cairn_plan::DesiredAt {
            commit: &commit,
            state: &desired,
        }),
        fingerprints: None,
        observed: &observed,
        seed: 1,
        now: chrono::Utc::now(),
        offline_after: cairn_plan::DEFAULT_OFFLINE_AFTER,
    });
    let text = cairn_plan::render::text(&plan, false);
    assert!(
        text.contains(
            "waiting for DNS, nothing asked of the CA: `shop.example.test` resolves to 127.0.0.2"
        ),
        "the plan says why the certificate waits:\n{text}"
    );

    // Retried with backoff, still wrong: still no order, more attempts.
    tokio::time::sleep(Duration::from_millis(600)).await;
    worker.run_due().await.unwrap();
    let row = store::list(db.pool()).await.unwrap().remove(0);
    assert_eq!(row.state, CertState::WaitingDns);
    assert!(row.attempts >= 2, "{row:?}");
    assert_eq!(ca.orders(), 0, "no order reached the CA");
    assert_eq!(
        failed_events().await.len(),
        1,
        "a retry failing again is not announced again"
    );

    // DNS fixed: the running loop issues it without a hand.
    ca.dns_a("shop.example.test", "127.0.0.1").await;
    let shutdown = Shutdown::new();
    let loop_ = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            certs::run(
                worker,
                Arc::new(tokio::sync::Notify::new()),
                Duration::from_secs(1),
                &shutdown,
            )
            .await;
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let row = loop {
        let row = store::list(db.pool()).await.unwrap().remove(0);
        if row.state == CertState::Issued {
            break row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not issued within 30 s of fixing DNS: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    shutdown.trigger();
    loop_.await.unwrap();
    assert_eq!(ca.orders(), 1, "one order, after DNS was fixed");
    assert_eq!(row.last_error, None);
    let root = ca.issuer_root_pem().await;
    verify(
        row.chain_pem.as_deref().unwrap(),
        &root,
        "shop.example.test",
    );
}

#[tokio::test]
async fn one_claim_per_name_set_across_control_planes() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    store::declare(
        pool,
        "https://ca.example.test/dir",
        &[store::Declared {
            app: "shop".into(),
            names: vec!["b.example.test".into(), "a.example.test".into()],
        }],
    )
    .await
    .unwrap();
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let lease = Duration::from_secs(60);
    let claimed = store::claim(pool, a, lease).await.unwrap().unwrap();
    assert_eq!(
        claimed.names,
        ["a.example.test", "b.example.test"],
        "stored sorted"
    );
    assert_eq!(
        store::claim(pool, b, lease).await.unwrap(),
        None,
        "held by a"
    );
    // b cannot write an outcome for a's lease.
    let outcome = store::Outcome::Failed {
        state: CertState::Failed,
        error: "x".into(),
        next: chrono::Utc::now(),
    };
    assert!(
        !store::finish(pool, &claimed.names, b, &outcome)
            .await
            .unwrap()
    );
    assert!(
        store::finish(pool, &claimed.names, a, &outcome)
            .await
            .unwrap()
    );
    // Undeclared, it is never claimed again; declared again, it is.
    store::declare(pool, "https://ca.example.test/dir", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(store::claim(pool, b, lease).await.unwrap(), None);
    let rows = store::list(pool).await.unwrap();
    assert!(!rows[0].declared);
}

/// A CA that lost its state (pebble restarted) no longer knows the stored account: that attempt fails,
/// the account is forgotten, and the next attempt creates a new one and is issued.
#[tokio::test]
async fn a_ca_that_forgot_the_account_gets_a_new_one() {
    let db = cairn_testkit::test_db!();
    let dir = tempfile::tempdir().unwrap();
    let challenges = Challenges::new();
    let port = challenge_server(&challenges).await;
    let test = cairn_testkit::current_test();
    let Some(mut ca) = Pebble::start(&test, dir.path(), port).await else {
        return;
    };
    ca.dns_a("shop.apps.example.test", "127.0.0.1").await;
    ca.dns_a("shop.example.test", "127.0.0.1").await;
    declare(db.pool(), &ca.directory, "shop.example.test").await;
    let mut worker = fresh_worker(&db, &challenges, settings(&ca, port));
    assert_eq!(worker.run_due().await.unwrap()[0].state, CertState::Issued);
    let first_account = store::account(db.pool(), &ca.directory).await.unwrap();

    ca.restart(&test).await;
    sqlx::query("UPDATE certificates SET next_attempt_at = now()")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(worker.run_due().await.unwrap()[0].state, CertState::Failed);
    let row = store::list(db.pool()).await.unwrap().remove(0);
    let why = row.last_error.unwrap();
    assert!(why.contains("cannot place an order"), "{why}");
    assert!(row.chain_pem.is_some(), "the old certificate is kept");
    assert_eq!(
        store::account(db.pool(), &ca.directory).await.unwrap(),
        None
    );

    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(worker.run_due().await.unwrap()[0].state, CertState::Issued);
    let second_account = store::account(db.pool(), &ca.directory).await.unwrap();
    assert!(second_account.is_some() && second_account != first_account);
    let row = store::list(db.pool()).await.unwrap().remove(0);
    verify(
        row.chain_pem.as_deref().unwrap(),
        &ca.issuer_root_pem().await,
        "shop.example.test",
    );
}

/// The names reach the cluster, but the CA cannot validate them (here: it checks a port where nothing
/// answers): the order fails with the CA's reason, is retried with backoff, and nothing is stored.
#[tokio::test]
async fn an_order_the_ca_refuses_fails_with_its_reason_and_is_retried_later() {
    let db = cairn_testkit::test_db!();
    let dir = tempfile::tempdir().unwrap();
    let challenges = Challenges::new();
    let port = challenge_server(&challenges).await;
    let nothing = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let test = cairn_testkit::current_test();
    let Some(ca) = Pebble::start(&test, dir.path(), nothing).await else {
        return;
    };
    ca.dns_a("shop.apps.example.test", "127.0.0.1").await;
    ca.dns_a("shop.example.test", "127.0.0.1").await;
    declare(db.pool(), &ca.directory, "shop.example.test").await;
    // A backoff of an hour: "not again before the backoff" below cannot depend on the machine's speed
    // (with the usual 200 ms it failed once under load).
    let mut s = settings(&ca, port);
    s.retry_first = Duration::from_secs(3600);
    s.retry_max = Duration::from_secs(7200);
    let mut worker = fresh_worker(&db, &challenges, s);
    assert_eq!(worker.run_due().await.unwrap()[0].state, CertState::Failed);
    assert!(
        challenges.current().is_empty(),
        "tokens withdrawn after a failure too"
    );
    let row = store::list(db.pool()).await.unwrap().remove(0);
    assert_eq!(row.state, CertState::Failed);
    assert_eq!(row.attempts, 1);
    assert!(row.chain_pem.is_none());
    assert!(row.next_attempt_at > chrono::Utc::now());
    let why = row.last_error.unwrap();
    assert!(
        why.contains("connection refused") && why.contains("shop."),
        "the CA's reason, per name: {why}"
    );
    assert_eq!(ca.orders(), 1);
    assert!(
        worker.run_due().await.unwrap().is_empty(),
        "not again before the backoff"
    );
}

/// Two control planes working at once: every name set is ordered exactly once and issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_order_each_name_set_once() {
    let db = cairn_testkit::test_db!();
    let dir = tempfile::tempdir().unwrap();
    let challenges = Challenges::new();
    let port = challenge_server(&challenges).await;
    let test = cairn_testkit::current_test();
    let Some(ca) = Pebble::start(&test, dir.path(), port).await else {
        return;
    };
    // Every name resolves to 127.0.0.1 (the DNS server's default).
    let sets: Vec<store::Declared> = (0..6)
        .map(|i| store::Declared {
            app: format!("app{i}"),
            names: vec![format!("app{i}.apps.example.test")],
        })
        .collect();
    store::declare(db.pool(), &ca.directory, &sets)
        .await
        .unwrap();
    let identity = Arc::new(Identity::generate());
    let mut handles = Vec::new();
    for _ in 0..2 {
        let mut w = CertWorker::new(
            db.pool().clone(),
            identity.clone(),
            challenges.clone(),
            settings(&ca, port),
        );
        handles.push(tokio::spawn(async move { w.run_due().await.unwrap() }));
    }
    let mut worked = 0;
    for h in handles {
        worked += h.await.unwrap().len();
    }
    assert_eq!(worked, 6, "each name set worked on once, by one of them");
    assert_eq!(ca.orders(), 6, "one order per name set");
    let rows = store::list(db.pool()).await.unwrap();
    assert!(
        rows.iter().all(|r| r.state == CertState::Issued),
        "{rows:?}"
    );
    let account = store::account(db.pool(), &ca.directory).await.unwrap();
    assert!(account.is_some(), "one account stored");
}

/// Name sets are worked on several at once: one whose DNS points elsewhere (its probe waits out the
/// propagation time) is reported waiting, and the others are issued in the same pass with one account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_waiting_for_dns_does_not_hold_up_the_others() {
    let db = cairn_testkit::test_db!();
    let dir = tempfile::tempdir().unwrap();
    let challenges = Challenges::new();
    let port = challenge_server(&challenges).await;
    let test = cairn_testkit::current_test();
    let Some(ca) = Pebble::start(&test, dir.path(), port).await else {
        return;
    };
    ca.dns_a("lost.example.test", "127.0.0.2").await;
    let mut sets: Vec<store::Declared> = (0..5)
        .map(|i| store::Declared {
            app: format!("app{i}"),
            names: vec![format!("app{i}.apps.example.test")],
        })
        .collect();
    sets.push(store::Declared {
        app: "lost".into(),
        names: vec!["lost.example.test".into()],
    });
    store::declare(db.pool(), &ca.directory, &sets)
        .await
        .unwrap();
    let mut s = settings(&ca, port);
    s.parallel = 3;
    // One connection for three slots: a slot suspended in a query must not starve another's claim
    // (it did once: the claim was awaited outside the attempts, and the pool timed out).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(20))
        .connect_with(db.options())
        .await
        .unwrap();
    let mut worker = CertWorker::new(pool, Arc::new(Identity::generate()), challenges.clone(), s);
    let mut attempts = worker.run_due().await.unwrap();
    attempts.sort_by(|a, b| a.names.cmp(&b.names));
    let states: Vec<(String, CertState)> = attempts
        .into_iter()
        .map(|a| (a.names.join(","), a.state))
        .collect();
    let mut want: Vec<(String, CertState)> = (0..5)
        .map(|i| (format!("app{i}.apps.example.test"), CertState::Issued))
        .collect();
    want.push(("lost.example.test".into(), CertState::WaitingDns));
    assert_eq!(states, want);
    assert_eq!(ca.orders(), 5, "no order for the name that waits");
    assert!(
        challenges.current().is_empty(),
        "every token withdrawn: {:?}",
        challenges.current()
    );
}

/// Issue 15 (review of stop 24): in a cluster whose ingress node comes up after the first apply, the
/// first self-probe finds no node serving its token and the name set waits for DNS with its backoff. A
/// node coming online (its first heartbeat calls `certs::node_online`) makes it due at once: it is issued
/// on the next pass instead of after the backoff (here an hour).
#[tokio::test]
async fn a_node_coming_online_retries_names_waiting_for_dns_without_their_backoff() {
    let db = cairn_testkit::test_db!();
    let dir = tempfile::tempdir().unwrap();
    let challenges = Challenges::new();
    // The ingress node's port is bound but nothing answers on it yet.
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let test = cairn_testkit::current_test();
    let Some(ca) = Pebble::start(&test, dir.path(), port).await else {
        return;
    };
    ca.dns_a("shop.apps.example.test", "127.0.0.1").await;
    ca.dns_a("shop.example.test", "127.0.0.1").await;
    declare(db.pool(), &ca.directory, "shop.example.test").await;
    let mut s = settings(&ca, port);
    s.probe_timeout = Duration::from_millis(300);
    s.retry_first = Duration::from_secs(3600);
    s.retry_max = Duration::from_secs(7200);
    let mut worker = fresh_worker(&db, &challenges, s);

    let attempts = worker.run_due().await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].state, CertState::WaitingDns);
    let row = store::list(db.pool()).await.unwrap().remove(0);
    assert_eq!(row.attempts, 1);
    assert!(row.next_attempt_at > chrono::Utc::now() + chrono::TimeDelta::minutes(20));
    assert!(
        worker.run_due().await.unwrap().is_empty(),
        "without a node coming online it waits out its backoff"
    );
    let wake = tokio::sync::Notify::new();
    assert_eq!(ca.orders(), 0, "the probe kept it away from the CA");

    // The node comes up (its proxy serves the challenges) and its first heartbeat says so.
    let router = challenges.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    certs::node_online(db.pool(), &wake).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), wake.notified())
        .await
        .expect("the certificate loop is woken");
    let attempts = worker.run_due().await.unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].state, CertState::Issued);
    assert_eq!(ca.orders(), 1);
    let row = store::list(db.pool()).await.unwrap().remove(0);
    assert_eq!((row.state, row.attempts), (CertState::Issued, 0));

    // Issued, nothing waits: another node coming online makes nothing due and wakes nothing.
    let quiet = tokio::sync::Notify::new();
    certs::node_online(db.pool(), &quiet).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), quiet.notified())
            .await
            .is_err()
    );
    assert!(worker.run_due().await.unwrap().is_empty());
}

/// A certificate worker on `db` with a fresh control-plane identity.
fn fresh_worker(
    db: &cairn_testkit::pg::TestDb,
    challenges: &Challenges,
    s: CertSettings,
) -> CertWorker {
    CertWorker::new(
        db.pool().clone(),
        Arc::new(Identity::generate()),
        challenges.clone(),
        s,
    )
}
