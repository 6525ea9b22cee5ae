//! HTTPS end to end with a real ACME CA: Debian's pebble (validating HTTP-01 on port 80 of whatever its
//! DNS server, pebble-challtestsrv, names), two agents in network namespaces (A takes the traffic and runs
//! nothing, B runs the app), the control plane on the test's bridge. The app declares
//! `shop.example.test`; the control plane probes the names through A, orders the certificate, and every
//! ingress node gets it sealed to its own key with the route table. A client that trusts only pebble's
//! root reaches the app over HTTPS through A; plain HTTP is redirected. Then `challenge = "tls-alpn-01"`
//! in git: the renewal is validated by pebble over TLS on port 443 of A (RFC 8737), which answers
//! `acme-tls/1` for the names while the order runs.

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
    // Certificates of 90 s: the first renewal (at two thirds of the lifetime, a little earlier at
    // random) comes by itself within a minute of the issuance.
    let options = cairn_testkit::pebble::Options {
        http_port: 80,
        tls_port: 443,
        validity: Some(Duration::from_secs(90)),
    };
    let Some(ca) = Pebble::start_with(TEST, e.scratch.path(), options).await else {
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
    // A second app brings its own certificate (a CA made here): served as is, never ordered.
    let own_domain = "own.example.test";
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let own_ca_key = rcgen::KeyPair::generate().unwrap();
    let own_ca = ca_params.self_signed(&own_ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, own_ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![own_domain.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let key_pem = leaf_key.serialize_pem();
    let key_line = key_pem.lines().nth(1).unwrap().to_owned();
    let key_ct = cairn_schema::secret::encrypt(key_pem.as_bytes(), &[e.recipient()]).unwrap();
    let own = e.app("own", "process-app", 1, &site("own", true));
    let own_manifest =
        std::fs::read_to_string(e.repo.dir.path().join(format!("app-{}.toml", own.name)))
            .unwrap()
            .replace(
                "replicas = 1\n",
                &format!(
                    "replicas = 1\ndomains = [\"{own_domain}\"]\n\
                     tls = {{ cert = \"own.pem\", key = {{ secret = \"\"\"\n{}\"\"\" }} }}\n",
                    key_ct.as_str()
                ),
            );
    e.repo
        .write(&format!("app-{}.toml", own.name), &own_manifest);
    e.repo.write("own.pem", &leaf.pem());

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

    // The certificate is issued (a name set that waits or fails says why). Probes before the agents
    // were up failed (slowly built agents: several); A coming online made the name set due at once, so
    // two more failures are a failure.
    let before = plane
        .rows("SELECT attempts FROM certificates")
        .await
        .first()
        .and_then(|r| r["attempts"].as_i64())
        .unwrap_or(0);
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
                Some("failed" | "waiting_dns") if row["attempts"].as_i64() >= Some(before + 2) => {
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

    // The own certificate is served for its domain, verifying against its own CA.
    let own_client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(own_ca.pem().as_bytes()).unwrap())
        .resolve(own_domain, https_a)
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    plane
        .wait_release(&own.name, 1, "live", Duration::from_secs(60))
        .await;
    let body = wait_for(
        "the own certificate to be served",
        Duration::from_secs(30),
        || async {
            let r = own_client
                .get(format!("https://{own_domain}/"))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(r.text().await.ok()?)
        },
    )
    .await;
    assert_eq!(body.trim(), "own");

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

    // The renewal, due by itself at about two thirds of the 90 s lifetime, while a client polls both
    // ingress nodes over HTTPS at 20 requests/s, each request on a new connection (a new handshake sees
    // whatever certificate the node serves then): a client of its own per request, since a client's
    // session cache would resume, and a resumed TLS 1.3 handshake does not show the certificate again.
    let https_b: SocketAddr = tls_b.parse().unwrap();
    let fresh_to = {
        let root = root.clone();
        move |node: SocketAddr| {
            reqwest::Client::builder()
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).unwrap())
                .resolve(domain, node)
                .tls_info(true)
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap()
        }
    };
    let served = move |c: reqwest::Client| async move {
        let r = c
            .get(format!("https://{domain}/"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let der = r
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|t| t.peer_certificate())
            .map(<[u8]>::to_vec)
            .ok_or("no peer certificate")?;
        let status = r.status().as_u16();
        Ok::<_, String>((status, der))
    };
    let fresh = {
        let fresh_to = fresh_to.clone();
        move || fresh_to(https_a)
    };
    let (first_status, first_der) = served(fresh()).await.unwrap();
    assert_eq!(first_status, 200);
    let serial_before = plane.rows("SELECT serial FROM certificates").await[0]["serial"].clone();
    // (Under a heavy load the first renewal may already have happened: then this waits for the next.)
    let orders_before = ca.orders();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let poller = tokio::spawn({
        let fresh_to = fresh_to.clone();
        async move {
            let mut seen = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            for node in [https_a, https_b].into_iter().cycle() {
                if *stopped.borrow() {
                    break;
                }
                tick.tick().await;
                seen.push(served(fresh_to(node)).await);
            }
            seen
        }
    });
    for (name, node) in [("A", https_a), ("B", https_b)] {
        wait_for(
            &format!("the renewed certificate to be served by {name}"),
            Duration::from_secs(120),
            || {
                let (client, first_der) = (fresh_to(node), first_der.clone());
                async move {
                    let (_, der) = served(client).await.ok()?;
                    (der != first_der).then_some(())
                }
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    let seen = poller.await.unwrap();
    let failed: Vec<_> = seen.iter().filter(|r| !matches!(r, Ok((200, _)))).collect();
    let renewed = seen
        .iter()
        .filter(|r| matches!(r, Ok((_, der)) if *der != first_der))
        .count();
    eprintln!(
        "{TEST}: renewal: {} requests over new connections, {} failed, {renewed} already saw the new certificate",
        seen.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the renewal: {failed:?}"
    );
    assert!(
        seen.len() >= 100,
        "the poll saw {} requests over the wait for the renewal",
        seen.len()
    );
    let serial_after = plane.rows("SELECT serial FROM certificates").await[0]["serial"].clone();
    assert_ne!(serial_before, serial_after, "the stored serial changed");

    // What cairn certs says, and no key in the database in plaintext.
    let rows = plane
        .rows("SELECT state, names, key_sealed FROM certificates")
        .await;
    assert_eq!(rows.len(), 1, "only the ACME name set is ordered: {rows:?}");
    assert_eq!(rows[0]["state"], "issued");
    assert!(
        rows[0]["key_sealed"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN AGE ENCRYPTED FILE-----")
    );
    assert_eq!(ca.orders(), orders_before + 1, "one order for the renewal");

    // The next renewal over TLS-ALPN-01: the challenge type is set in git; pebble validates each name
    // on port 443 of A (where DNS points), whose TLS listener answers the `acme-tls/1` handshakes.
    let settings = std::fs::read_to_string(e.repo.dir.path().join("cairn.toml")).unwrap();
    e.repo.write(
        "cairn.toml",
        &settings.replace(
            "hsts = true\n",
            "hsts = true\nchallenge = \"tls-alpn-01\"\n",
        ),
    );
    sqlx::query("UPDATE certificates SET next_attempt_at = now()")
        .execute(plane.db.pool())
        .await
        .unwrap();
    let g = plane.generation().await;
    e.repo.commit();
    plane.wait_generation(g + 1).await;
    wait_for(
        "the certificate renewed over tls-alpn-01",
        Duration::from_secs(60),
        || async {
            let rows = plane
                .rows("SELECT state, serial, last_error, attempts FROM certificates")
                .await;
            let row = rows.first()?;
            match row["state"].as_str() {
                Some("issued") if row["serial"] != serial_after => Some(()),
                Some("failed" | "waiting_dns") => panic!("the tls-alpn-01 renewal failed: {row}"),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(
        ca.orders(),
        orders_before + 2,
        "one more order, over tls-alpn-01"
    );
    assert!(
        a.log_text()
            .contains("TLS-ALPN-01 validation handshake answered"),
        "pebble validated through A's TLS listener"
    );
    let (status, der) = served(fresh()).await.unwrap();
    assert_eq!(
        status, 200,
        "HTTPS still answers after the tls-alpn-01 renewal"
    );
    assert_ne!(der, first_der);
    // An operator renews from the dashboard: one more order, at once, served by A.
    let serial_alpn = plane.rows("SELECT serial FROM certificates").await[0]["serial"].clone();
    let out = plane.cairn(&["token", "create", "--name", "ops", "--role", "operator"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let operator = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let cookie = crate::dashboard::sign_in_at(&plane.url, &operator).await;
    let app_page = format!("/ui/apps/{}", web.name);
    let (_, _, page) = crate::dashboard::get_at(&plane.url, &app_page, Some(&cookie)).await;
    let renew = format!("{app_page}/actions/renew");
    assert!(page.contains(&format!("href=\"{renew}\"")), "{page}");
    let (_, _, confirm) = crate::dashboard::get_at(&plane.url, &renew, Some(&cookie)).await;
    let csrf = crate::dashboard::csrf(&confirm);
    let (s, to) =
        crate::dashboard::post_form_at(&plane.url, &renew, &cookie, &[("csrf", &csrf)]).await;
    assert_eq!((s, to), (303, format!("{app_page}?done=renew")));
    wait_for(
        "the certificate renewed from the dashboard",
        Duration::from_secs(60),
        || async {
            let rows = plane.rows("SELECT state, serial FROM certificates").await;
            let row = rows.first()?;
            (row["state"] == "issued" && row["serial"] != serial_alpn).then_some(())
        },
    )
    .await;
    assert_eq!(
        ca.orders(),
        orders_before + 3,
        "one order for the renewal asked for"
    );

    // A's disk cache holds the certificates (keys in its 0600 files).
    let cache = a.dir.join("tls");
    assert!(cache.is_dir(), "A caches what it serves");

    // The own key's plaintext is nowhere but the agents' 0600 cache: not in the database, not in any
    // log, not in the status or the certificates the admin API shows.
    let dump = plane
        .rows(
            "SELECT to_jsonb(c)::text AS t FROM certificates c UNION ALL SELECT spec::text FROM apps \
             UNION ALL SELECT to_jsonb(o)::text FROM own_certificates o",
        )
        .await;
    let own_rows = plane
        .rows("SELECT count(*) AS n FROM own_certificates WHERE 'own.example.test' = ANY(names)")
        .await;
    assert_eq!(
        own_rows[0]["n"], 1,
        "the own certificate is stored, for every replica's route table"
    );
    for r in &dump {
        assert!(
            !r["t"].as_str().unwrap_or("").contains(&key_line),
            "a row holds the key"
        );
    }
    for (path, text) in e.logs() {
        assert!(
            !text.contains(&key_line),
            "{} holds the key",
            path.display()
        );
    }
    let status = plane.cairn(&["status", "--json"]);
    assert!(!String::from_utf8_lossy(&status.stdout).contains(&key_line));

    // The control plane stops and A restarts: A still serves HTTPS (its cached certificates) and still
    // forwards to B (its kept route table and hop key).
    e.kill_serve();
    let a = e
        .restart_agent_in(
            &a,
            &plane,
            "a",
            &ha,
            Driver::Process,
            &["--proxy-tls-listen", &tls_a],
        )
        .await;
    let body = wait_for(
        "HTTPS through the restarted A with the control plane down",
        Duration::from_secs(30),
        || async {
            let r = client.get(format!("https://{domain}/")).send().await.ok()?;
            (r.status() == 200).then_some(r.text().await.ok()?)
        },
    )
    .await;
    assert_eq!(body.trim(), "v1");
    assert!(
        a.log_text().contains("kept cluster routes installed"),
        "A forwarded with the table it kept"
    );
}
