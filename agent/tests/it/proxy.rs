//! The node proxy against small real HTTP servers on loopback: routing by host, round robin, forwarded and
//! hop-by-hop headers, bodies, and its own answers when a replica is missing or misbehaves.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cairn_agent::proxy::ProxyConfig;
use cairn_agent::{Backend, Proxy, ReplicaId};
use cairn_schema::Name;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::support::bounded;

/// An app that answers `<name> <method> <path> host=<host> xff=<x-forwarded-for> conn=<connection>
/// body=<body>`, and stays up until the test ends.
async fn echo_app(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| async move {
                        let h = |k: &str| {
                            req.headers()
                                .get(k)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_owned()
                        };
                        let line = format!(
                            "{name} {} {} host={} xff={} proto={} conn={} custom={}",
                            req.method(),
                            req.uri(),
                            h("host"),
                            h("x-forwarded-for"),
                            h("x-forwarded-proto"),
                            h("connection"),
                            h("x-drop-me"),
                        );
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let text = format!("{line} body={}", String::from_utf8_lossy(&body));
                        let mut res = Response::new(Full::new(Bytes::from(text)));
                        res.headers_mut()
                            .insert("keep-alive", "timeout=5".parse().unwrap());
                        Ok::<_, Infallible>(res)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    addr
}

/// A "replica" that accepts connections and closes them without answering.
async fn rude_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.shutdown().await;
        }
    });
    addr
}

/// A loopback port nobody listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    req: hyper::http::request::Builder,
    body: &str,
) -> (u16, hyper::HeaderMap, String) {
    let req = req
        .uri(format!("http://{proxy}{}", "/some/path?q=1"))
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("the proxy answers in time")
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_proxy_routes_by_host_round_robin_and_answers_for_missing_or_broken_replicas() {
    bounded(60, async {
        let proxy = Proxy::new(ProxyConfig {
            response_timeout: Duration::from_secs(2),
            // The 503s below come after this wait for a replica (ingress.rs tests the wait itself).
            pending_timeout: Duration::from_millis(200),
            ..ProxyConfig::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(proxy.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());

        let web = Name::new("web").unwrap();
        let api = Name::new("api").unwrap();
        let hosts = |h: &str| vec![h.to_owned()];
        proxy.switch_slot(
            &web,
            &hosts("web.example.com"),
            Backend::new(ReplicaId("w0".into()), 1, 0, echo_app("w0").await),
        );
        proxy.switch_slot(
            &web,
            &hosts("web.example.com"),
            Backend::new(ReplicaId("w1".into()), 1, 1, echo_app("w1").await),
        );
        proxy.switch_slot(
            &api,
            &hosts("api.example.com"),
            Backend::new(ReplicaId("a0".into()), 1, 0, echo_app("a0").await),
        );

        // Round robin over the app's replicas; the other app's never.
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (status, _, body) = send(
                &client,
                addr,
                Request::get("/").header("host", "WEB.example.com:8000"),
                "",
            )
            .await;
            assert_eq!(status, 200, "{body}");
            seen.push(body.split(' ').next().unwrap().to_owned());
        }
        assert_eq!(seen, ["w0", "w1", "w0", "w1"]);

        // What reaches the app: method, path and query, the original host, forwarded headers, the body;
        // not hop-by-hop headers or those the Connection header names.
        let (status, headers, body) = send(
            &client,
            addr,
            Request::post("/")
                .header("host", "api.example.com")
                .header("x-forwarded-for", "203.0.113.9")
                .header("connection", "x-drop-me")
                .header("x-drop-me", "secret-hop")
                .header("te", "trailers"),
            "hello body",
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            body.starts_with("a0 POST /some/path?q=1 host=api.example.com"),
            "{body}"
        );
        assert!(
            body.contains("xff=127.0.0.1 "),
            "a client's X-Forwarded-For is replaced, not appended to: {body}"
        );
        assert!(body.contains("proto=http"), "{body}");
        assert!(
            body.contains("custom=-"),
            "a header named by Connection is dropped: {body}"
        );
        assert!(body.ends_with("body=hello body"), "{body}");
        assert!(
            headers.get("keep-alive").is_none(),
            "hop-by-hop response headers are dropped"
        );

        // Unknown host: 404 naming it.
        let (status, _, body) = send(
            &client,
            addr,
            Request::get("/").header("host", "nope.example.com"),
            "",
        )
        .await;
        assert_eq!(status, 404);
        assert!(body.contains("nope.example.com"), "{body}");

        // A replica that refuses connections: 503 after the retries. One that hangs up: 502.
        let gone = Name::new("gone").unwrap();
        proxy.switch_slot(
            &gone,
            &hosts("gone.example.com"),
            Backend::new(ReplicaId("g0".into()), 1, 0, closed_port().await),
        );
        let (status, _, body) = send(
            &client,
            addr,
            Request::get("/").header("host", "gone.example.com"),
            "",
        )
        .await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("`gone` has no healthy replica"), "{body}");
        let rude = Name::new("rude").unwrap();
        proxy.switch_slot(
            &rude,
            &hosts("rude.example.com"),
            Backend::new(ReplicaId("r0".into()), 1, 0, rude_app().await),
        );
        let (status, _, body) = send(
            &client,
            addr,
            Request::get("/").header("host", "rude.example.com"),
            "",
        )
        .await;
        assert_eq!(status, 502, "{body}");

        // An app whose replicas all left: 503, until it is forgotten: 404.
        let backends = proxy.remove_app(&api);
        assert_eq!(backends.len(), 1);
        assert_eq!(
            backends[0].in_flight(),
            0,
            "finished responses released their count"
        );
        let (status, _, _) = send(
            &client,
            addr,
            Request::get("/").header("host", "api.example.com"),
            "",
        )
        .await;
        assert_eq!(status, 404);
        proxy.remove_replica(&web, &ReplicaId("w0".into()));
        proxy.remove_replica(&web, &ReplicaId("w1".into()));
        let (status, _, _) = send(
            &client,
            addr,
            Request::get("/").header("host", "web.example.com"),
            "",
        )
        .await;
        assert_eq!(status, 503);

        let _ = stop.send(());
        served.await.unwrap().unwrap();
    })
    .await;
}
