//! HTTPS end to end with a real ACME CA: Debian's pebble (validating HTTP-01 on port 80 of whatever its
//! DNS server, pebble-challtestsrv, names), two agents in network namespaces (A takes the traffic and runs
//! nothing, B runs the app), the control plane on the test's bridge. The app declares
//! `shop.example.test`; the control plane probes the names through A, orders the certificate, and every
//! ingress node gets it sealed to its own key with the route table. A client that trusts only pebble's
//! root reaches the app over HTTPS through A; plain HTTP is redirected.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cairn_testkit::netns::Net;
use cairn_testkit::pebble::Pebble;

use super::support::{Driver, E2e, site, wait_for};

const TEST: &str = "https_through_an_ingress_node";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_through_an_ingress_node_with_a_certificate_from_an_acme_ca() {
    let mut net = match Net::create() {
        Ok(n) => n,
        Err(why) => return cairn_testkit::missing(TEST, "network namespaces", why),
    };
    let Some(mut e) = E2e::new(TEST, &[Driver::Process]).await else {
        return;
    };
    let Some(ca) = Pebble::start(TEST, e.scratch.path(), 80).await else {
        return;
    };
    let (ha, hb) = (net.host("a").unwrap(), net.host("b").unwrap());
    let web = e.app("shop", "process-app", 1, &site("v1", true));
    let domain = "shop.example.test";
    let generated = super::support::host(&web.name);
    for name in [domain, generated.as_str()] {
        ca.dns_a(name, &ha.addr.to_string()).await;
    }
    // The app declares its own domain as well as the generated one.
    let manifest =
        std::fs::read_to_string(e.repo.dir.path().join(format!("app-{}.toml", web.name)))
            .unwrap()
            .replace(
                "replicas = 1\n",
                &format!("replicas = 1\ndomains = [\"{domain}\"]\n"),
            );
    e.repo.write(&format!("app-{}.toml", web.name), &manifest);
    e.repo.write("pebble-roots.pem", &ca.api_root_pem);
    let settings = std::fs::read_to_string(e.repo.dir.path().join("cairn.toml")).unwrap();
    e.repo.write(
        "cairn.toml",
        &format!(
            "{settings}\n[tls]\nacme_directory = \"{}\"\ncontact = \"ops@example.test\"\n\
             ca_roots = \"pebble-roots.pem\"\nhsts = true\n",
            ca.directory
        ),
    );
    e.repo
        .node("a", &format!("address = \"{}\"\ndrain = true\n", ha.addr));
    e.repo.node("b", &format!("address = \"{}\"\n", hb.addr));

    let gateway = net.gateway().to_string();
    let listen = format!("{gateway}:0");
    let (probe_domain, probe_generated) = (
        format!("{domain}={}", ha.addr),
        format!("{generated}={}", ha.addr),
    );
    let plane = e
        .start(&[
            "--listen",
            &listen,
            "--routes-refresh",
            "1s",
            "--acme-probe-resolve",
            &probe_domain,
            "--acme-probe-resolve",
            &probe_generated,
        ])
        .await;
    let tls = |h: &cairn_testkit::netns::Host| format!("{}:443", h.addr);
    let (tls_a, tls_b) = (tls(&ha), tls(&hb));
    let a = e
        .agent_in(
            &plane,
            "a",
            &ha,
            80,
            Driver::Process,
            &["--proxy-tls-listen", &tls_a],
        )
        .await;
    let _b = e
        .agent_in(
            &plane,
            "b",
            &hb,
            80,
            Driver::Process,
            &["--proxy-tls-listen", &tls_b],
        )
        .await;
    let started = Instant::now();
    plane
        .wait_release(&web.name, 1, "live", Duration::from_secs(60))
        .await;
    super::support::wait_body(a.proxy, domain, "v1", Duration::from_secs(20)).await;

    // The certificate is issued (a name set that waits or fails says why).
    wait_for(
        "the certificate to be issued",
        Duration::from_secs(90),
        || async {
            let rows = plane
                .rows("SELECT state, last_error, attempts FROM certificates")
                .await;
            let row = rows.first()?;
            match row["state"].as_str() {
                Some("issued") => Some(()),
                Some("failed" | "waiting_dns") if row["attempts"].as_i64() >= Some(2) => {
                    panic!("the certificate did not issue: {row}")
                }
                _ => None,
            }
        },
    )
    .await;

    // A client that trusts only pebble's issuing root, connecting to A for the app's domain.
    let root = ca.issuer_root_pem().await;
    let https_a: SocketAddr = tls_a.parse().unwrap();
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).unwrap())
        .resolve(domain, https_a)
        .resolve(&generated, https_a)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let answered = wait_for(
        "the app to answer over HTTPS through A",
        Duration::from_secs(90),
        || async {
            let r = client.get(format!("https://{domain}/")).send().await.ok()?;
            let hsts = r
                .headers()
                .get("strict-transport-security")
                .map(|v| v.to_str().unwrap_or("").to_owned());
            let status = r.status().as_u16();
            let body = r.text().await.ok()?;
            (status == 200).then_some((body, hsts))
        },
    )
    .await;
    eprintln!(
        "{TEST}: HTTPS answered {:?} after the agents were up (release, probe, order, distribution)",
        started.elapsed()
    );
    assert_eq!(answered.0.trim(), "v1");
    assert!(
        answered.1.is_some_and(|h| h.starts_with("max-age=")),
        "[tls] hsts = true"
    );
    // The generated name is in the same certificate.
    let r = client
        .get(format!("https://{generated}/"))
        .send()
        .await
        .expect("the generated name verifies too");
    assert_eq!(r.status(), 200);

    // Plain HTTP to A is redirected to HTTPS, path and query kept.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let r = plain
        .get(format!("http://{}/some/path?q=1", a.proxy))
        .header(reqwest::header::HOST, domain)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://{domain}/some/path?q=1").as_str()
    );

    // What cairn certs says, and no key in the database in plaintext.
    let rows = plane
        .rows("SELECT state, names, key_sealed FROM certificates")
        .await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "issued");
    assert!(
        rows[0]["key_sealed"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN AGE ENCRYPTED FILE-----")
    );
    assert_eq!(ca.orders(), 1, "one order for the name set");
    // A's disk cache holds the certificate's key only in its 0600 files.
    let cache = a.dir.join("tls");
    assert!(cache.is_dir(), "A caches what it serves");
}
