//! HTTPS through the node proxy (issue 15, the node side), with real sockets: proxies in this process on
//! their own loopback addresses (127.0.0.5-11) with a plain and a TLS listener, certificates from a test
//! CA made with rcgen, and a rustls client that trusts only that CA. The certificate by SNI (exact, then a
//! one-label wildcard) and nothing for an unknown SNI or none; h2 by ALPN; a renewal served to new
//! connections while an open one keeps working; ACME challenges and redirects on the plain listener, HSTS
//! on HTTPS; TLS-ALPN-01 validation handshakes (`acme-tls/1`) answered only for names with a challenge,
//! normal clients unaffected; the disk cache (0600 keys in a 0700 directory) serving a restarted proxy, and a cache that
//! cannot be written not stopping HTTPS; no key in Debug output or logs; one connection cap for both
//! listeners.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_agent::proxy::{HostPolicy, ProxyConfig, TlsCertificate, TlsTable};
use cairn_agent::{Backend, Proxy, ReplicaId};
use cairn_schema::Name;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use zeroize::Zeroizing;

use crate::support::bounded;

/// A test CA and the leaves it signs.
struct Ca {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "cairn test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` with `serial`: (chain PEM, key PEM, leaf DER).
    fn leaf(&self, names: &[&str], serial: u64) -> (String, String, CertificateDer<'static>) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = format!("{}{}", cert.pem(), self.cert.pem());
        (chain, key.serialize_pem(), cert.der().clone())
    }

    fn client(&self, alpn: &[&[u8]], sni: bool) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg.enable_sni = sni;
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}

fn cert(id: &str, names: &[&str], chain: &str, key: &str) -> TlsCertificate {
    TlsCertificate {
        id: id.to_owned(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        chain_pem: chain.to_owned(),
        key_pem: Zeroizing::new(key.to_owned()),
    }
}

/// An app that answers with what it was asked: `app <name>`, then the request's forwarding headers.
async fn app(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let h = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let text = format!(
                        "app {name}\nx-forwarded-proto: {}\nforwarded: {}\npath: {}\n",
                        h("x-forwarded-proto"),
                        h("forwarded"),
                        req.uri()
                    );
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn route(proxy: &Proxy, app: &str, hosts: &[&str], addr: SocketAddr) {
    proxy.switch_slot(
        &Name::new(app).unwrap(),
        &hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(),
        Backend::new(ReplicaId(format!("{app}-0")), 1, 0, addr),
    );
}

/// A proxy on `ip` with a plain and a TLS listener: (proxy, plain address, TLS address).
async fn proxy_on(ip: &str, cfg: ProxyConfig) -> (Arc<Proxy>, SocketAddr, SocketAddr) {
    let proxy = Proxy::new(cfg);
    let plain = TcpListener::bind((ip, 0)).await.unwrap();
    let plain_addr = plain.local_addr().unwrap();
    let tls = proxy
        .tls_listener(TcpListener::bind((ip, 0)).await.unwrap())
        .unwrap();
    let tls_addr = tls.local_addr().unwrap();
    tokio::spawn(proxy.clone().serve(plain, std::future::pending()));
    tokio::spawn(proxy.clone().serve(tls, std::future::pending()));
    (proxy, plain_addr, tls_addr)
}

/// A TLS connection to `addr` for `sni` (sent unless `send_sni` is false).
async fn connect(
    ca: &Ca,
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
    send_sni: bool,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        ca.client(alpn, send_sni).connect(name, tcp),
    )
    .await
    .expect("the handshake ends in time")
}

fn leaf_of(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1.1 connection over `s`.
async fn http1(s: TlsStream<TcpStream>) -> Sender {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// GET `path` for `host` on `send`: status, headers, body.
async fn get(send: &mut Sender, host: &str, path: &str) -> (u16, hyper::HeaderMap, String) {
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("an answer in time")
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// One plain HTTP/1.1 request on a new connection: status, headers, body.
async fn plain(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        send.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("an answer in time")
    .unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn sni_picks_the_certificate_and_an_unknown_name_gets_none() {
    bounded(60, async {
        let ca = Ca::new();
        let (shop_chain, shop_key, shop_der) = ca.leaf(&["shop.example.test"], 1);
        let (wild_chain, wild_key, wild_der) = ca.leaf(&["*.apps.example.test"], 2);
        let (proxy, _, tls) = proxy_on("127.0.0.5", ProxyConfig::default()).await;
        route(&proxy, "shop", &["shop.example.test"], app("shop").await);
        route(
            &proxy,
            "blog",
            &["blog.apps.example.test"],
            app("blog").await,
        );
        let report = proxy.install_tls(TlsTable {
            certificates: vec![
                cert("shop", &["shop.example.test"], &shop_chain, &shop_key),
                cert("apps", &["*.apps.example.test"], &wild_chain, &wild_key),
            ],
            ..TlsTable::default()
        });
        assert_eq!(report.installed, 2);
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);

        // The exact name, verified against the CA; the app sees https.
        let s = connect(&ca, tls, "shop.example.test", &[b"http/1.1"], true)
            .await
            .expect("the handshake succeeds and verifies");
        assert_eq!(leaf_of(&s), shop_der);
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let mut send = http1(s).await;
        let (status, headers, body) = get(&mut send, "shop.example.test", "/x").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("app shop\n"), "{body}");
        assert!(body.contains("x-forwarded-proto: https\n"), "{body}");
        assert!(body.contains("proto=https"), "{body}");
        assert!(!headers.contains_key("strict-transport-security"));

        // Capitals in the SNI are the same name.
        let s = connect(&ca, tls, "SHOP.example.TEST", &[], true)
            .await
            .unwrap();
        assert_eq!(leaf_of(&s), shop_der);

        // A one-label wildcard.
        let s = connect(&ca, tls, "blog.apps.example.test", &[], true)
            .await
            .unwrap();
        assert_eq!(leaf_of(&s), wild_der);
        let mut send = http1(s).await;
        let (status, _, body) = get(&mut send, "blog.apps.example.test", "/").await;
        assert_eq!((status, body.lines().next()), (200, Some("app blog")));

        // Not two labels under the wildcard, not its parent, not an unknown name, not without SNI: the
        // handshake fails, and no certificate is shown.
        for sni in [
            "a.blog.apps.example.test",
            "apps.example.test",
            "other.example.test",
        ] {
            let r = connect(&ca, tls, sni, &[], true).await;
            assert!(r.is_err(), "{sni}: a handshake succeeded");
        }
        let r = connect(&ca, tls, "shop.example.test", &[], false).await;
        assert!(r.is_err(), "a handshake without SNI succeeded");

        // The proxy serves on after the failed handshakes.
        connect(&ca, tls, "shop.example.test", &[], true)
            .await
            .unwrap();

        // Counted: the refusals by name (before the client learns of them), and at least the
        // handshakes that carried requests and the refused ones (a client that hangs up right after
        // its handshake may leave the server's side unfinished or failed).
        let m = proxy.metrics();
        assert_eq!(m.tls_unknown_names(), 4);
        assert!(m.tls_handshakes(true) >= 2, "{}", m.tls_handshakes(true));
        for _ in 0..100 {
            if m.tls_handshakes(false) >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(m.tls_handshakes(false) >= 4, "{}", m.tls_handshakes(false));
        assert!(m.render().contains("cairn_proxy_tls_certificates 2\n"));
    })
    .await;
}

#[tokio::test]
async fn h2_is_offered_by_alpn() {
    bounded(60, async {
        let ca = Ca::new();
        let (chain, key, _) = ca.leaf(&["shop.example.test"], 1);
        let (proxy, _, tls) = proxy_on("127.0.0.6", ProxyConfig::default()).await;
        route(&proxy, "shop", &["shop.example.test"], app("shop").await);
        proxy.install_tls(TlsTable {
            certificates: vec![cert("shop", &["shop.example.test"], &chain, &key)],
            ..TlsTable::default()
        });
        let s = connect(&ca, tls, "shop.example.test", &[b"h2", b"http/1.1"], true)
            .await
            .unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        for _ in 0..3 {
            let req = Request::get("https://shop.example.test/h2")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let res = send.send_request(req).await.unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(res.version(), hyper::Version::HTTP_2);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8_lossy(&body);
            assert!(body.starts_with("app shop\n"), "{body}");
            assert!(body.contains("x-forwarded-proto: https\n"), "{body}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_renewed_certificate_serves_new_connections_and_open_ones_keep_working() {
    bounded(60, async {
        let ca = Ca::new();
        let (old_chain, old_key, old_der) = ca.leaf(&["shop.example.test"], 10);
        let (new_chain, new_key, new_der) = ca.leaf(&["shop.example.test"], 11);
        let (proxy, _, tls) = proxy_on("127.0.0.7", ProxyConfig::default()).await;
        route(&proxy, "shop", &["shop.example.test"], app("shop").await);
        let table = |chain: &str, key: &str| TlsTable {
            certificates: vec![cert("shop", &["shop.example.test"], chain, key)],
            ..TlsTable::default()
        };
        proxy.install_tls(table(&old_chain, &old_key));
        let s = connect(&ca, tls, "shop.example.test", &[], true)
            .await
            .unwrap();
        assert_eq!(leaf_of(&s), old_der);
        let mut kept = http1(s).await;
        assert_eq!(get(&mut kept, "shop.example.test", "/1").await.0, 200);

        let report = proxy.install_tls(table(&new_chain, &new_key));
        assert_eq!(report.installed, 1);
        let s = connect(&ca, tls, "shop.example.test", &[], true)
            .await
            .unwrap();
        assert_eq!(
            leaf_of(&s),
            new_der,
            "a new connection gets the renewed one"
        );
        let mut fresh = http1(s).await;
        assert_eq!(get(&mut fresh, "shop.example.test", "/2").await.0, 200);

        // The keep-alive connection from before the renewal goes on.
        for i in 0..3 {
            let (status, _, body) = get(&mut kept, "shop.example.test", &format!("/old/{i}")).await;
            assert_eq!(status, 200, "{body}");
        }
    })
    .await;
}

#[tokio::test]
async fn the_plain_listener_answers_challenges_and_redirects_only_hosts_with_a_certificate() {
    bounded(60, async {
        let ca = Ca::new();
        let (chain, key, _) = ca.leaf(&["shop.example.test"], 1);
        let (proxy, http, tls) = proxy_on("127.0.0.8", ProxyConfig::default()).await;
        let shop = app("shop").await;
        route(&proxy, "shop", &["shop.example.test"], shop);
        route(&proxy, "bare", &["bare.example.test"], app("bare").await);
        route(&proxy, "plain", &["plain.example.test"], app("plain").await);
        let policy = |redirect_http, hsts| HostPolicy {
            redirect_http,
            hsts,
        };
        proxy.install_tls(TlsTable {
            certificates: vec![cert("shop", &["shop.example.test"], &chain, &key)],
            hosts: [
                ("shop.example.test".to_owned(), policy(true, Some(31536000))),
                // Asks for a redirect, but has no certificate.
                ("bare.example.test".to_owned(), policy(true, Some(60))),
            ]
            .into(),
            challenges: [(
                "tok-123_abc".to_owned(),
                "tok-123_abc.thumbprint".to_owned(),
            )]
            .into(),
            ..TlsTable::default()
        });

        // The challenge, for any host (the CA asks with the name being validated), before any redirect.
        for host in ["shop.example.test", "new.example.test", "10.1.2.3"] {
            let (status, headers, body) = plain(
                http,
                "GET",
                host,
                "/.well-known/acme-challenge/tok-123_abc",
                &[],
            )
            .await;
            assert_eq!(
                (status, body.as_str()),
                (200, "tok-123_abc.thumbprint"),
                "{host}"
            );
            assert_eq!(headers["content-type"], "text/plain");
        }
        let (status, _, body) = plain(
            http,
            "GET",
            "shop.example.test",
            "/.well-known/acme-challenge/other",
            &[],
        )
        .await;
        assert_eq!(status, 404, "{body}");
        assert!(
            !body.contains("app "),
            "an unknown token is never forwarded: {body}"
        );

        // Redirects with the path and query, whatever the method.
        for method in ["GET", "HEAD", "POST", "DELETE"] {
            let (status, headers, _) = plain(
                http,
                method,
                "Shop.Example.Test:80",
                "/cart?item=1&x=%20",
                &[],
            )
            .await;
            assert_eq!(status, 308, "{method}");
            assert_eq!(
                headers["location"], "https://shop.example.test/cart?item=1&x=%20",
                "{method}"
            );
        }
        // A host without a certificate, and one without a policy: served over plain HTTP.
        for (host, name) in [
            ("bare.example.test", "bare"),
            ("plain.example.test", "plain"),
        ] {
            let (status, headers, body) = plain(http, "GET", host, "/", &[]).await;
            assert_eq!(status, 200, "{host}: {body}");
            assert!(body.starts_with(&format!("app {name}\n")), "{body}");
            assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
            assert!(!headers.contains_key("strict-transport-security"));
        }
        // A request marked as an internal hop is never redirected (its first node decided); without
        // a hop key here it is refused instead.
        let (status, _, _) =
            plain(http, "GET", "shop.example.test", "/", &[("cairn-hop", "x")]).await;
        assert_eq!(status, 403);

        // HTTPS answers carry HSTS, as the policy says.
        let s = connect(&ca, tls, "shop.example.test", &[], true)
            .await
            .unwrap();
        let mut send = http1(s).await;
        let (status, headers, body) = get(&mut send, "shop.example.test", "/").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["strict-transport-security"], "max-age=31536000");
        // Over HTTPS the challenge path is the app's.
        let (status, _, body) = get(
            &mut send,
            "shop.example.test",
            "/.well-known/acme-challenge/tok-123_abc",
        )
        .await;
        assert_eq!(status, 200);
        assert!(body.starts_with("app shop\n"), "{body}");

        // The challenge goes with the next table.
        proxy.install_tls(TlsTable::default());
        let (status, _, _) = plain(
            http,
            "GET",
            "shop.example.test",
            "/.well-known/acme-challenge/tok-123_abc",
            &[],
        )
        .await;
        assert_eq!(status, 404);
        let (status, _, _) = plain(http, "GET", "shop.example.test", "/", &[]).await;
        assert_eq!(status, 200, "no certificate any more, so no redirect");
    })
    .await;
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_restarted_proxy_serves_https_from_its_cache_and_keys_stay_private() {
    bounded(60, async {
        let captured = crate::support::capture();
        let ca = Ca::new();
        let (shop_chain, shop_key, shop_der) = ca.leaf(&["shop.example.test"], 1);
        let (blog_chain, blog_key, _) = ca.leaf(&["blog.example.test"], 2);
        let (_, other_key, _) = ca.leaf(&["other.example.test"], 3);
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("tls");
        let cfg = || ProxyConfig {
            tls_cache: Some(cache.clone()),
            ..ProxyConfig::default()
        };
        let (first, _, _) = proxy_on("127.0.0.9", cfg()).await;
        let bad_key = "-----BEGIN PRIVATE KEY-----\nTHISISNOTAKEYbutmuststaysecret\n-----END PRIVATE KEY-----\n";
        let report = first.install_tls(TlsTable {
            certificates: vec![
                cert("shop", &["shop.example.test"], &shop_chain, &shop_key),
                cert("blog", &["blog.example.test"], &blog_chain, &blog_key),
                // Refused: a key that is no key, a key of another certificate, a name not covered.
                cert("broken", &["broken.example.test"], &shop_chain, bad_key),
                cert("mismatch", &["shop.example.test"], &shop_chain, &other_key),
                cert("wrong-name", &["bank.example.test"], &shop_chain, &shop_key),
                // The same id again: the first keeps it, here and on disk.
                cert("shop", &["blog.example.test"], &blog_chain, &blog_key),
            ],
            hosts: [(
                "shop.example.test".to_owned(),
                HostPolicy {
                    redirect_http: true,
                    hsts: None,
                },
            )]
            .into(),
            ..TlsTable::default()
        });
        assert_eq!(report.installed, 2);
        assert_eq!(report.rejected.len(), 4, "{:?}", report.rejected);
        assert!(report.cache.is_none(), "{:?}", report.cache);
        let errors: Vec<String> = report.rejected.iter().map(|e| e.to_string()).collect();
        assert!(errors[2].contains("does not cover `bank.example.test`"), "{errors:?}");
        assert!(errors[3].contains("`shop` is in the table twice"), "{errors:?}");

        // 0600 files in a 0700 directory; the keys on disk are the installed ones.
        assert_eq!(mode(&cache), 0o700);
        let mut keys = 0;
        for entry in std::fs::read_dir(&cache).unwrap() {
            let path = entry.unwrap().path();
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            let text = std::fs::read_to_string(&path).unwrap();
            if path.to_string_lossy().ends_with(".key.pem") {
                keys += 1;
                assert!(text == shop_key || text == blog_key);
            }
            assert!(!text.contains("THISISNOTAKEY"));
        }
        assert_eq!(keys, 2);

        // A new proxy (a restarted agent) loads the cache before serving: HTTPS without any table.
        let restarted = Proxy::new(cfg());
        assert_eq!(restarted.load_tls_cache().unwrap(), 2);
        let plain_l = TcpListener::bind(("127.0.0.9", 0)).await.unwrap();
        let http = plain_l.local_addr().unwrap();
        let tls_l = restarted
            .tls_listener(TcpListener::bind(("127.0.0.9", 0)).await.unwrap())
            .unwrap();
        let tls = tls_l.local_addr().unwrap();
        tokio::spawn(restarted.clone().serve(plain_l, std::future::pending()));
        tokio::spawn(restarted.clone().serve(tls_l, std::future::pending()));
        route(&restarted, "shop", &["shop.example.test"], app("shop").await);
        let s = connect(&ca, tls, "shop.example.test", &[], true).await.unwrap();
        assert_eq!(leaf_of(&s), shop_der);
        let mut send = http1(s).await;
        let (status, _, body) = get(&mut send, "shop.example.test", "/").await;
        assert_eq!((status, body.lines().next()), (200, Some("app shop")));
        // The host policy came back with it.
        assert_eq!(plain(http, "GET", "shop.example.test", "/", &[]).await.0, 308);

        // A table without `blog`: its files are deleted, `shop`'s stay.
        let report = restarted.install_tls(TlsTable {
            certificates: vec![cert("shop", &["shop.example.test"], &shop_chain, &shop_key)],
            ..TlsTable::default()
        });
        assert_eq!(report.installed, 1);
        let left: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 3, "{left:?}");
        for f in &left {
            if f.ends_with(".key.pem") {
                assert_eq!(std::fs::read_to_string(cache.join(f)).unwrap(), shop_key);
            }
        }
        assert!(connect(&ca, tls, "blog.example.test", &[], true).await.is_err());

        // No key in Debug output or in what the proxies logged.
        let debug = format!("{first:?} {restarted:?} {report:?}");
        let logs = captured.agent_text();
        for key in [&shop_key, &blog_key, &other_key] {
            let body = key.lines().nth(1).unwrap();
            assert!(!debug.contains(body), "a key in Debug output");
            assert!(!logs.contains(body), "a key in the logs");
        }
        assert!(!debug.contains("THISISNOTAKEY") && !logs.contains("THISISNOTAKEY"));
        assert!(logs.contains("a certificate cannot be served"), "the refusals are logged");
    })
    .await;
}

/// The plain and the TLS listener share one connection cap (each connection may also hold one towards
/// a replica, so a cap per listener would overrun the descriptor limit the cap is made from).
#[tokio::test]
async fn the_plain_and_tls_listeners_share_the_connection_cap() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    bounded(60, async {
        let ca = Ca::new();
        let (chain, key, _) = ca.leaf(&["shop.example.test"], 1);
        let (proxy, http, tls) = proxy_on(
            "127.0.0.10",
            ProxyConfig {
                max_connections: Some(2),
                ..ProxyConfig::default()
            },
        )
        .await;
        proxy.install_tls(TlsTable {
            certificates: vec![cert("shop", &["shop.example.test"], &chain, &key)],
            ..TlsTable::default()
        });
        let handshake = |tcp: TcpStream| {
            let name = ServerName::try_from("shop.example.test").unwrap();
            ca.client(&[], true).connect(name, tcp)
        };
        let request = b"GET / HTTP/1.1\r\nhost: nowhere.test\r\n\r\n";
        /// Whether the proxy answers `request` on `s` within `limit`.
        async fn answered(s: &mut TcpStream, request: &[u8], limit: Duration) -> bool {
            s.write_all(request).await.unwrap();
            let mut buf = [0u8; 12];
            tokio::time::timeout(limit, s.read_exact(&mut buf))
                .await
                .is_ok_and(|r| r.is_ok() && buf.starts_with(b"HTTP/1.1 404"))
        }
        // One TLS and one plain connection take the cap of two...
        let tls1 = handshake(TcpStream::connect(tls).await.unwrap())
            .await
            .unwrap();
        let mut plain1 = TcpStream::connect(http).await.unwrap();
        assert!(answered(&mut plain1, request, Duration::from_secs(10)).await);
        // ...so neither listener serves another...
        let mut plain2 = TcpStream::connect(http).await.unwrap();
        assert!(
            !answered(&mut plain2, request, Duration::from_millis(300)).await,
            "a plain connection past the cap was served"
        );
        let tls2 = handshake(TcpStream::connect(tls).await.unwrap());
        tokio::pin!(tls2);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut tls2)
                .await
                .is_err(),
            "a TLS connection past the cap was served"
        );
        // ...until connections go.
        drop(plain1);
        drop(tls1);
        tokio::time::timeout(Duration::from_secs(10), tls2)
            .await
            .expect("served once there is room")
            .unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), plain2.read_exact(&mut buf))
            .await
            .expect("served once there is room")
            .unwrap();
        assert!(buf.starts_with(b"HTTP/1.1 404"));
    })
    .await;
}

/// A cache that cannot be written (a full or read-only disk) is reported and logged, and the
/// certificates are served anyway.
#[tokio::test]
async fn certificates_are_served_when_the_cache_cannot_be_written() {
    bounded(60, async {
        let ca = Ca::new();
        let (chain, key, der) = ca.leaf(&["shop.example.test"], 1);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-directory");
        std::fs::write(&file, "x").unwrap();
        let (proxy, _, tls) = proxy_on(
            "127.0.0.11",
            ProxyConfig {
                tls_cache: Some(file.join("tls")),
                ..ProxyConfig::default()
            },
        )
        .await;
        let report = proxy.install_tls(TlsTable {
            certificates: vec![cert("shop", &["shop.example.test"], &chain, &key)],
            ..TlsTable::default()
        });
        assert_eq!(report.installed, 1);
        let e = report.cache.expect("the cache error is reported");
        assert!(e.to_string().contains("certificate cache"), "{e}");
        let s = connect(&ca, tls, "shop.example.test", &[], true)
            .await
            .unwrap();
        assert_eq!(leaf_of(&s), der);
    })
    .await;
}

/// A client that accepts any server certificate (a TLS-ALPN-01 validation certificate is self-signed;
/// the CA checks its names and extension itself, as this test does).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    // webpki refuses to parse a certificate with a critical extension it does not know (the
    // acmeIdentifier), so the handshake signature is not checked here; the test reads the certificate.
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS-ALPN-01 validation as a CA makes it (RFC 8737, 3): SNI `name`, ALPN `acme-tls/1` only.
async fn acme_tls(addr: SocketAddr, name: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let server = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(server, tcp),
    )
    .await
    .expect("the handshake ends in time")
}

/// What a TLS-ALPN-01 certificate says: its DNS names and its acmeIdentifier extension (critical, value).
fn acme_identifier(der: &CertificateDer<'_>) -> (Vec<String>, Option<(bool, Vec<u8>)>) {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let names = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => (*d).to_owned(),
                    other => format!("not a DNS name: {other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31.
    let oid = x509_parser::oid_registry::Oid::from(&[1, 3, 6, 1, 5, 5, 7, 1, 31]).unwrap();
    let ext = cert
        .extensions()
        .iter()
        .find(|e| e.oid == oid)
        .map(|e| (e.critical, e.value.to_vec()));
    (names, ext)
}

#[tokio::test]
async fn tls_alpn_01_is_answered_only_for_names_with_a_challenge_and_normal_clients_are_unaffected()
{
    bounded(60, async {
        let ca = Ca::new();
        let (chain, key, shop_leaf) = ca.leaf(&["shop.example.test"], 7);
        let (proxy, _, tls) = proxy_on("127.0.0.12", ProxyConfig::default()).await;
        route(&proxy, "shop", &["shop.example.test"], app("shop").await);
        let (shop_digest, new_digest) = ([0x5a; 32], [0xc3; 32]);
        let table = |alpn: &[(&str, [u8; 32])]| TlsTable {
            certificates: vec![cert("shop", &["shop.example.test"], &chain, &key)],
            alpn: alpn.iter().map(|(n, d)| ((*n).to_owned(), *d)).collect(),
            ..TlsTable::default()
        };
        let report = proxy.install_tls(table(&[
            ("shop.example.test", shop_digest),
            ("new.example.test", new_digest),
        ]));
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);

        // The validation gets a self-signed certificate for exactly the name, with the critical
        // extension holding the digest as a DER OCTET STRING, and `acme-tls/1`; then the node closes.
        for (name, digest) in [
            ("new.example.test", new_digest),
            ("SHOP.example.test", shop_digest),
        ] {
            let mut s = acme_tls(tls, name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"acme-tls/1"[..]));
            let leaf = leaf_of(&s);
            assert_ne!(leaf, shop_leaf, "{name}: not the served certificate");
            let (names, ext) = acme_identifier(&leaf);
            assert_eq!(names, [name.to_ascii_lowercase()], "{name}");
            let mut want = vec![0x04, 32];
            want.extend_from_slice(&digest);
            assert_eq!(ext, Some((true, want)), "{name}");
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::io::AsyncReadExt::read(&mut s, &mut buf),
            )
            .await
            .expect("the node closes the validation connection");
            assert!(
                matches!(n, Ok(0) | Err(_)),
                "{name}: no data on a validation connection: {n:?}"
            );
        }

        // A name without a challenge gets no certificate at all over acme-tls/1.
        for name in ["other.example.test", "x.shop.example.test"] {
            assert!(
                acme_tls(tls, name).await.is_err(),
                "{name}: no challenge, no certificate"
            );
        }

        // Normal clients for the name: its real certificate and h2, even when they offer acme-tls/1
        // among other protocols; and a name that has only a challenge has no certificate for them.
        for alpn in [
            &[&b"h2"[..], b"http/1.1"][..],
            &[b"h2", b"http/1.1", b"acme-tls/1"],
        ] {
            let s = connect(&ca, tls, "shop.example.test", alpn, true)
                .await
                .unwrap();
            assert_eq!(leaf_of(&s), shop_leaf);
            assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        }
        let s = connect(&ca, tls, "shop.example.test", &[b"http/1.1"], true)
            .await
            .unwrap();
        let mut send = http1(s).await;
        let (status, _, body) = get(&mut send, "shop.example.test", "/").await;
        assert_eq!((status, body.lines().next()), (200, Some("app shop")));
        assert!(
            connect(&ca, tls, "new.example.test", &[b"http/1.1"], true)
                .await
                .is_err(),
            "a challenge's certificate is only for acme-tls/1"
        );

        // The challenge withdrawn: no answer any more.
        proxy.install_tls(table(&[]));
        assert!(acme_tls(tls, "new.example.test").await.is_err());
        // A name that is not a host name is left out and reported, the rest installed.
        let report = proxy.install_tls(table(&[("*.example.test", [1; 32])]));
        assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);
        assert_eq!(report.installed, 1);
    })
    .await;
}
