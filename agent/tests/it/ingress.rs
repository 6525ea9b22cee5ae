//! Ingress through the node proxy (issue 14), with real sockets and processes: WebSocket and server-sent
//! events passing through (locally and across the internal hop), HTTP/2 with prior knowledge and
//! keep-alive on the listener, the limits and their answers, forwarding between three proxies on their
//! own loopback addresses (127.0.0.2-4) with the hop authenticated, and the memory of a proxy process
//! while a 1 GiB upload streams through it.
//!
//! The app is `examples/ws_echo.rs` and the separate proxy process `examples/node_proxy.rs`, both built
//! here once per test process (like the agents tests build `cairn-agent`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_agent::proxy::{ClusterApp, ClusterNode, ClusterTable, HopKey, ProxyConfig};
use cairn_agent::{Backend, Proxy, ReplicaId};
use cairn_schema::Name;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::Request;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

use crate::support::bounded;

const KEY: &str = "0123456789abcdef0123456789abcdef-test-hop-key";

/// The agent crate's examples, built once per test process.
fn example(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        cairn_testkit::build::agent(
            env!("CARGO"),
            env!("CARGO_MANIFEST_DIR"),
            &["--example", "ws_echo", "--example", "node_proxy"],
        )
        .join("examples")
    })
    .join(name)
}

/// A child process that printed `listening ADDR`; killed when dropped.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Proc {
    async fn start(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("the example starts");
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(20),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .expect("it says where it listens in time")
        .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{} said {line:?}", program.display()));
        Proc { child, addr }
    }

    /// The echo app on a free loopback port.
    async fn app(name: &str) -> Proc {
        Proc::start(
            &example("ws_echo"),
            &[],
            &[("LISTEN", "127.0.0.1:0"), ("APP_NAME", name)],
        )
        .await
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }
}

/// A proxy in this process on `ip`, until the test ends.
async fn proxy_on(ip: &str, cfg: ProxyConfig) -> (Arc<Proxy>, SocketAddr) {
    let proxy = Proxy::new(cfg);
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(proxy.clone().serve(listener, std::future::pending()));
    (proxy, addr)
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn route(proxy: &Proxy, app: &str, host: &str, addr: SocketAddr) {
    proxy.switch_slot(
        &name(app),
        &[host.to_owned()],
        Backend::new(ReplicaId(format!("{app}-0")), 1, 0, addr),
    );
}

/// A connection to `to` from the loopback address `from` (so the proxy sees a client address of ours).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// One HTTP/1.1 request from `from` to `to` on a new connection: status and body.
async fn get(
    from: &str,
    to: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let (status, _, body) = request(from, to, "GET", host, path, headers, None).await;
    (status, body)
}

/// One HTTP/1.1 request from `from` to `to` on a new connection, with `body` if given: status, headers
/// and body.
async fn request(
    from: &str,
    to: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, hyper::HeaderMap, String) {
    let io = TokioIo::new(connect_from(from, to).await);
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = http_body_util::Full::new(Bytes::copy_from_slice(body.unwrap_or_default()));
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        send.send_request(req.body(body).unwrap()),
    )
    .await
    .expect("an answer in time")
    .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// Opens a WebSocket to `host` through `proxy` and checks that text and binary messages echo.
async fn websocket_echoes(
    proxy: SocketAddr,
    host: &str,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut ws, res) = tokio_tungstenite::client_async(format!("ws://{host}/ws"), stream)
        .await
        .expect("the WebSocket handshake passes through the proxy");
    assert_eq!(res.status(), 101);
    for i in 0..3 {
        let m = format!("hello {i}");
        ws.send(Message::text(m.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an echo in time")
            .unwrap()
            .unwrap();
        assert_eq!(back, Message::text(m));
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(
        back,
        Message::binary(blob),
        "a 200 kB binary message echoes whole"
    );
    ws
}

/// Reads an SSE stream of two events 3 s apart through `proxy`: the first must arrive while the
/// response is still open (not buffered until the end).
async fn sse_is_unbuffered(proxy: SocketAddr, host: &str) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("GET /sse?count=2&interval_ms=3000 HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: event 0") {
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("the first event arrives within 2 s, long before the response ends")
            .unwrap();
        assert!(n > 0, "the stream closed early");
        got.extend_from_slice(&buf[..n]);
    }
    let first = start.elapsed();
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.contains("event 1"),
        "the second event is 3 s later: {text}"
    );
    assert!(first < Duration::from_secs(2), "{first:?}");
    // ...and the second follows, then the end of the chunked body.
    while !String::from_utf8_lossy(&got).contains("0\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the stream ends")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).contains("data: event 1"));
    assert!(start.elapsed() >= Duration::from_secs(3));
}

#[tokio::test]
async fn websocket_sse_h2c_and_keep_alive_pass_through_the_node_proxy() {
    // Built before the clock starts (a cold build takes minutes).
    example("ws_echo");
    bounded(120, async {
        let app = Proc::app("web").await;
        let (proxy, addr) = proxy_on(
            "127.0.0.1",
            ProxyConfig {
                upgrade_idle_timeout: Duration::from_millis(800),
                ..ProxyConfig::default()
            },
        )
        .await;
        route(&proxy, "web", "web.test", app.addr);

        // WebSocket: bidirectional, counted while open, closed by the idle timeout.
        let mut ws = websocket_echoes(addr, "web.test").await;
        assert_eq!(proxy.open_upgraded(), 1);
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an idle upgraded connection is closed after its timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(proxy.open_upgraded(), 0, "the gauge counts it down");
        // A busy one is not: messages every 300 ms for longer than the idle timeout.
        let mut ws = websocket_echoes(addr, "web.test").await;
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            ws.send(Message::text(format!("tick {i}"))).await.unwrap();
            let back = ws.next().await.unwrap().unwrap();
            assert_eq!(back, Message::text(format!("tick {i}")));
        }
        ws.close(None).await.unwrap();

        sse_is_unbuffered(addr, "web.test").await;

        // HTTP/2 with prior knowledge (h2c): several streams on one connection.
        let h2: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http();
        for _ in 0..3 {
            let res = h2
                .request(
                    Request::get(format!("http://{addr}/headers"))
                        .header("host", "web.test")
                        .body(Empty::new())
                        .unwrap(),
                )
                .await
                .expect("the proxy speaks h2c");
            assert_eq!(res.version(), hyper::Version::HTTP_2);
            assert_eq!(res.status(), 200);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("host: web.test"), "{body}");
            assert!(body.contains("x-forwarded-host: web.test"), "{body}");
        }

        // HTTP/1.1 keep-alive: three requests, one connection.
        let mut s = TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            s.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&got).contains("ok web") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the connection stays open between requests");
                got.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        }
    })
    .await;
}

/// A one-shot HTTP/1.1 exchange on a raw socket: the status line's code.
async fn raw_status(addr: SocketAddr, request: &[u8], then: Option<&[u8]>) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    if let Some(more) = then {
        let _ = s.write_all(more).await;
    }
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .expect("an answer in time")
        .unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_limits_answer_431_413_408_and_504() {
    // Built before the clock starts (a cold build takes minutes).
    example("ws_echo");
    bounded(60, async {
        let app = Proc::app("web").await;
        let (proxy, addr) = proxy_on(
            "127.0.0.1",
            ProxyConfig {
                max_body_bytes: Some(1000),
                body_idle_timeout: Duration::from_millis(500),
                response_timeout: Duration::from_secs(1),
                max_header_bytes: 16 * 1024,
                ..ProxyConfig::default()
            },
        )
        .await;
        route(&proxy, "web", "web.test", app.addr);
        route(&proxy, "big", "big.test", app.addr);
        proxy.install_cluster(ClusterTable {
            generation: 1,
            nodes: vec![],
            apps: vec![ClusterApp {
                app: name("big"),
                hostnames: vec!["big.test".into()],
                nodes: vec![],
                max_body_bytes: Some(5000),
            }],
        });

        let header = format!(
            "GET / HTTP/1.1\r\nhost: web.test\r\nx-big: {}\r\n\r\n",
            "a".repeat(32 * 1024)
        );
        assert_eq!(raw_status(addr, header.as_bytes(), None).await, 431);

        // Declared too large: refused before a byte of the body is read.
        let post = |host: &str, len: usize| {
            format!("POST /upload HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len}\r\n\r\n")
        };
        assert_eq!(
            raw_status(addr, post("web.test", 1001).as_bytes(), None).await,
            413
        );
        let body = vec![b'x'; 1000];
        assert_eq!(
            raw_status(addr, post("web.test", 1000).as_bytes(), Some(&body)).await,
            200,
            "the limit itself is allowed"
        );
        // The app's own limit wins over the node's.
        let body = vec![b'x'; 4000];
        assert_eq!(
            raw_status(addr, post("big.test", 4000).as_bytes(), Some(&body)).await,
            200
        );
        assert_eq!(
            raw_status(addr, post("big.test", 5001).as_bytes(), None).await,
            413
        );
        // Chunked, so only counting while streaming finds it too large.
        let chunked =
            b"POST /upload HTTP/1.1\r\nhost: web.test\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut chunks = Vec::new();
        for _ in 0..3 {
            chunks.extend_from_slice(b"258\r\n");
            chunks.extend_from_slice(&[b'y'; 600]);
            chunks.extend_from_slice(b"\r\n");
        }
        chunks.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(raw_status(addr, chunked, Some(&chunks)).await, 413);
        // A body that stops arriving: 408.
        let started = Instant::now();
        assert_eq!(
            raw_status(addr, post("web.test", 900).as_bytes(), Some(&[b'z'; 100])).await,
            408
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // A replica too slow to answer: 504.
        let (status, body) = get("127.0.0.1", addr, "web.test", "/slow?ms=3000", &[]).await;
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("did not answer in time"), "{body}");
    })
    .await;
}

/// Three proxies on 127.0.0.2, .3 and .4 (nodes a, b, c), the same cluster table and hop key on each;
/// a request no node can serve waits `pending` for one.
async fn three_nodes(
    apps: Vec<ClusterApp>,
    extra: Vec<ClusterNode>,
    pending: Duration,
) -> Vec<(Arc<Proxy>, SocketAddr)> {
    let mut nodes = Vec::new();
    for (n, ip) in [("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4")] {
        let cfg = ProxyConfig {
            node: Some(name(n)),
            forward_from: Some(ip.parse().unwrap()),
            pending_timeout: pending,
            ..ProxyConfig::default()
        };
        nodes.push(proxy_on(ip, cfg).await);
    }
    let mut table_nodes: Vec<ClusterNode> = ["a", "b", "c"]
        .iter()
        .zip(&nodes)
        .map(|(n, (_, addr))| ClusterNode {
            name: name(n),
            addr: *addr,
        })
        .collect();
    table_nodes.extend(extra);
    let table = ClusterTable {
        generation: 1,
        nodes: table_nodes,
        apps,
    };
    for (p, _) in &nodes {
        p.set_hop_key(Some(HopKey::new(KEY).unwrap()));
        assert!(p.install_cluster(table.clone()));
    }
    nodes
}

fn app_on(app: &str, host: &str, nodes: &[&str]) -> ClusterApp {
    ClusterApp {
        app: name(app),
        hostnames: vec![host.into()],
        nodes: nodes.iter().map(|n| name(n)).collect(),
        max_body_bytes: None,
    }
}

fn header_line<'a>(body: &'a str, h: &str) -> &'a str {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{h}: ")))
        .unwrap_or_else(|| panic!("no {h} in {body}"))
}

#[tokio::test]
async fn a_node_without_a_replica_forwards_once_to_one_that_has_it_authenticated() {
    // Built before the clock starts (a cold build takes minutes).
    example("ws_echo");
    bounded(120, async {
        let app = Proc::app("web-on-b").await;
        // A port nobody listens on: node d "has" the app but refuses connections.
        let gone = TcpListener::bind("127.0.0.5:0").await.unwrap();
        let d_addr = gone.local_addr().unwrap();
        drop(gone);
        let nodes = three_nodes(
            vec![
                app_on("web", "web.test", &["d", "b"]),
                app_on("ghost", "ghost.test", &[]),
                // Stale tables: a thinks c has it, c thinks... the same table; c has no replica.
                app_on("stale", "stale.test", &["c"]),
            ],
            vec![ClusterNode {
                name: name("d"),
                addr: d_addr,
            }],
            Duration::from_millis(500),
        )
        .await;
        let [(a, a_addr), (b, b_addr), (c, c_addr)] = &nodes[..] else {
            unreachable!()
        };
        route(b, "web", "web.test", app.addr);

        // Through a, from a client at 127.0.0.9 claiming to be someone else: served by b's replica,
        // with the client's own address, scheme and host, and no hop key reaching the app.
        for _ in 0..4 {
            let (status, body) = get(
                "127.0.0.9",
                *a_addr,
                "web.test:8080",
                "/headers",
                &[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("forwarded", "for=6.6.6.6"),
                    ("x-forwarded-proto", "https"),
                ],
            )
            .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(header_line(&body, "x-forwarded-for"), "127.0.0.9");
            assert_eq!(header_line(&body, "x-real-ip"), "127.0.0.9");
            assert_eq!(header_line(&body, "x-forwarded-proto"), "http");
            assert_eq!(header_line(&body, "x-forwarded-host"), "web.test:8080");
            assert_eq!(
                header_line(&body, "forwarded"),
                "for=127.0.0.9;proto=http;host=\"web.test:8080\""
            );
            assert_eq!(header_line(&body, "host"), "web.test:8080");
            assert_eq!(
                header_line(&body, "cairn-hop"),
                "-",
                "the key never reaches an app"
            );
        }
        // Round robin over d (refused: retried on b) and b: every request answered.
        assert_eq!(a.counts().forwarded, 4, "{:?}", a.counts());
        assert_eq!(a.counts().unserved_forwards, 2, "{:?}", a.counts());
        assert_eq!(a.counts().local, 0);
        assert_eq!(b.counts().hop, 4, "{:?}", b.counts());
        assert_eq!(b.counts().local + b.counts().forwarded, 0);

        // WebSocket and SSE across the hop.
        let mut ws = websocket_echoes(*a_addr, "web.test").await;
        assert_eq!(a.open_upgraded(), 1);
        assert_eq!(b.open_upgraded(), 1);
        ws.close(None).await.unwrap();
        sse_is_unbuffered(*a_addr, "web.test").await;

        // No replica anywhere: 503 after the pending timeout, saying so.
        let t = Instant::now();
        let (status, body) = get("127.0.0.9", *a_addr, "ghost.test", "/", &[]).await;
        assert_eq!(status, 503);
        assert!(
            body.contains("`ghost` has no healthy replica anywhere (waited 500ms for one)"),
            "{body}"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        let (status, _) = get("127.0.0.9", *a_addr, "nowhere.test", "/", &[]).await;
        assert_eq!(status, 404);

        // A table that routes to a node without the replica: one hop, a miss there, then (no other node
        // having it) 503 after the wait; never a loop, and never the miss marker.
        let before = (a.counts(), c.counts());
        let (status, headers, body) =
            request("127.0.0.9", *a_addr, "GET", "stale.test", "/", &[], None).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("no healthy replica anywhere"), "{body}");
        assert!(!headers.contains_key("cairn-hop-miss"), "{headers:?}");
        assert_eq!(a.counts().unserved_forwards, before.0.unserved_forwards + 1);
        assert_eq!(a.counts().pending_timed_out, before.0.pending_timed_out + 1);
        assert_eq!(c.counts().hop, before.1.hop + 1);
        assert_eq!(
            c.counts().forwarded,
            before.1.forwarded,
            "a hop is never forwarded again"
        );
        let before = (a.counts().forwarded, c.counts().forwarded);

        // The hop itself: only with the key AND from a node's address.
        let hop = [("cairn-hop", KEY), ("x-forwarded-for", "198.51.100.7")];
        let refused = b.counts().refused_hops;
        let (status, body) = get("127.0.0.9", *b_addr, "web.test", "/headers", &hop).await;
        assert_eq!(status, 403, "the key from a non-node address: {body}");
        assert!(!body.contains(KEY));
        let wrong = [("cairn-hop", "0123456789abcdef0123456789abcdef-guessed")];
        let (status, _) = get("127.0.0.4", *b_addr, "web.test", "/headers", &wrong).await;
        assert_eq!(status, 403, "a wrong key from a node's address");
        let (status, _) = get(
            "127.0.0.4",
            *b_addr,
            "web.test",
            "/headers",
            &[("cairn-hop", "")],
        )
        .await;
        assert_eq!(status, 403, "an empty key");
        assert_eq!(b.counts().refused_hops, refused + 3);
        let (status, body) = get("127.0.0.4", *b_addr, "web.test", "/headers", &hop).await;
        assert_eq!(status, 200, "the key from a node's address: {body}");
        assert_eq!(
            header_line(&body, "x-forwarded-for"),
            "198.51.100.7",
            "an authenticated hop's client address is kept"
        );
        // An authenticated hop for an app c does not run locally is not forwarded to b: a miss, marked
        // for the node that sent it.
        let t = Instant::now();
        let (status, headers, _) =
            request("127.0.0.2", *c_addr, "GET", "web.test", "/", &hop, None).await;
        assert_eq!(status, 503);
        assert_eq!(headers["cairn-hop-miss"], "1");
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "a miss does not wait"
        );
        assert_eq!(c.counts().forwarded, before.1);

        // A node without a hop key refuses every hop, and a table that is not newer is ignored.
        c.set_hop_key(None);
        let (status, _) = get("127.0.0.2", *c_addr, "stale.test", "/", &hop).await;
        assert_eq!(status, 403);
        // ...and forwards nothing (the next node could not tell its request from a client's).
        let (status, _) = get("127.0.0.9", *c_addr, "web.test", "/", &[]).await;
        assert_eq!(status, 503);
        assert_eq!(c.counts().forwarded, before.1);
        assert!(!c.install_cluster(ClusterTable {
            generation: 1,
            ..ClusterTable::default()
        }));
        assert_eq!(c.cluster_generation(), Some(1));
    })
    .await;
}

/// Issue 14: a replica moving between nodes must not fail a request. A hop to a node whose replica just
/// went is answered with a marked miss and tried on the next node; a request no node can serve waits for
/// the tables to name one (bodies too); only with no change does it get its 503, after the wait.
#[tokio::test]
async fn a_replica_moving_between_nodes_is_invisible_to_clients() {
    // Built before the clock starts (a cold build takes minutes).
    example("ws_echo");
    bounded(120, async {
        let on_b = Proc::app("web-on-b").await;
        let on_c = Proc::app("web-on-c").await;
        let pending = Duration::from_secs(1);
        let nodes = three_nodes(
            vec![
                app_on("web", "web.test", &["b", "c"]),
                app_on("moving", "moving.test", &[]),
                app_on("ghost", "ghost.test", &[]),
            ],
            vec![],
            pending,
        )
        .await;
        let [(a, a_addr), (b, _), (c, _)] = &nodes[..] else {
            unreachable!()
        };
        route(b, "web", "web.test", on_b.addr);
        route(c, "web", "web.test", on_c.addr);

        // (i) b's replica is unrouted (the move's first half) while the cluster table still names b:
        // a's hops to b miss and go on to c. Requests with a body too: a holds the body back until the
        // next node asks for it, so a miss leaves it to send to c.
        assert!(
            b.remove_replica(&name("web"), &ReplicaId("web-0".into()))
                .is_some()
        );
        let upload = vec![b'q'; 70_000];
        for i in 0..8 {
            let (method, path, body) = if i % 4 < 2 {
                ("GET", "/", None)
            } else {
                ("POST", "/upload", Some(&upload[..]))
            };
            let (status, headers, text) =
                request("127.0.0.9", *a_addr, method, "web.test", path, &[], body).await;
            assert_eq!(status, 200, "{method} {i}: {text}");
            let expected = if body.is_some() {
                "70000\n"
            } else {
                "ok web-on-c\n"
            };
            assert_eq!(text, expected, "{method} {i}");
            assert!(
                !headers.contains_key("cairn-hop-miss"),
                "the miss marker never reaches a client: {headers:?}"
            );
        }
        let (ac, bc, cc) = (a.counts(), b.counts(), c.counts());
        assert_eq!(ac.forwarded, 8, "{ac:?}");
        assert_eq!(
            ac.unserved_forwards, 4,
            "round robin: every other request went to b first: {ac:?}"
        );
        assert_eq!(bc.hop, 4, "b answered four misses: {bc:?}");
        assert_eq!(cc.hop, 8, "{cc:?}");
        assert_eq!(
            ac.pending_served + ac.pending_timed_out,
            0,
            "no request waited"
        );

        // (ii) Nobody has `moving` yet. A GET waits for a cluster table naming b, a POST for a local
        // route on a itself; both turn up ~300 ms after the requests arrived.
        route(b, "moving", "moving.test", on_b.addr);
        let t = Instant::now();
        let waiting_get = tokio::spawn(request(
            "127.0.0.9",
            *a_addr,
            "GET",
            "moving.test",
            "/",
            &[],
            None,
        ));
        let to = *a_addr;
        let waiting_post = tokio::spawn(async move {
            let body = vec![b'm'; 5000];
            request(
                "127.0.0.9",
                to,
                "POST",
                "moving.test",
                "/upload",
                &[],
                Some(&body),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting_get.is_finished() && !waiting_post.is_finished());
        let mut table = ClusterTable {
            generation: 2,
            nodes: ["a", "b", "c"]
                .iter()
                .zip(&nodes)
                .map(|(n, (_, addr))| ClusterNode {
                    name: name(n),
                    addr: *addr,
                })
                .collect(),
            apps: vec![
                app_on("web", "web.test", &["c"]),
                app_on("moving", "moving.test", &["b"]),
                app_on("ghost", "ghost.test", &[]),
            ],
        };
        for (p, _) in &nodes {
            assert!(p.install_cluster(table.clone()));
        }
        let (status, headers, text) = waiting_get.await.unwrap();
        let waited = t.elapsed();
        assert_eq!(
            (status, text.as_str()),
            (200, "ok web-on-b\n"),
            "{headers:?}"
        );
        assert!(
            waited >= Duration::from_millis(300) && waited < pending,
            "served when the table came: {waited:?}"
        );
        // The POST waited the same way, its body unread, and went to b whole.
        let (status, _, text) = waiting_post.await.unwrap();
        assert_eq!((status, text.as_str()), (200, "5000\n"));
        // A POST that only a local route can serve: `moving` on a itself.
        table.generation = 3;
        table.apps[1].nodes.clear();
        for (p, _) in &nodes {
            assert!(p.install_cluster(table.clone()));
        }
        let to = *a_addr;
        let waiting_post = tokio::spawn(async move {
            let body = vec![b'm'; 3000];
            request(
                "127.0.0.9",
                to,
                "POST",
                "moving.test",
                "/upload",
                &[],
                Some(&body),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting_post.is_finished());
        route(a, "moving", "moving.test", on_c.addr);
        let (status, _, text) = waiting_post.await.unwrap();
        assert_eq!((status, text.as_str()), (200, "3000\n"));
        assert_eq!(a.counts().pending_served, 3, "{:?}", a.counts());

        // (iii) No change that helps: 503 after the pending timeout, not before (an unrelated change
        // in between does not end the wait) and not much after.
        let t = Instant::now();
        let unrelated = {
            let a = a.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                route(&a, "other", "other.test", "127.0.0.1:9".parse().unwrap());
            })
        };
        let (status, headers, text) =
            request("127.0.0.9", *a_addr, "GET", "ghost.test", "/", &[], None).await;
        let waited = t.elapsed();
        unrelated.await.unwrap();
        assert_eq!(status, 503, "{text}");
        assert_eq!(
            text,
            "cairn: app `ghost` has no healthy replica anywhere (waited 1s for one)\n"
        );
        assert!(!headers.contains_key("cairn-hop-miss"));
        assert!(
            waited >= pending && waited < pending + Duration::from_secs(1),
            "{waited:?}"
        );
        assert_eq!(a.counts().pending_timed_out, 1, "{:?}", a.counts());
    })
    .await;
}

/// `cairn-agent --metrics-listen`: what a proxy did shows in its `/metrics`, by route and status class,
/// and nothing there names an app, a host or an address.
#[tokio::test]
async fn the_metrics_endpoint_counts_local_forwarded_and_hop_requests() {
    // Built before the clock starts (a cold build takes minutes).
    example("ws_echo");
    bounded(60, async {
        let app = Proc::app("web-on-b").await;
        let nodes = three_nodes(
            vec![app_on("web", "web.test", &["b"])],
            vec![],
            Duration::ZERO,
        )
        .await;
        let [(a, a_addr), (b, b_addr), _] = &nodes[..] else {
            unreachable!()
        };
        route(b, "web", "web.test", app.addr);
        assert_eq!(get("127.0.0.9", *b_addr, "web.test", "/", &[]).await.0, 200);
        assert_eq!(get("127.0.0.9", *a_addr, "web.test", "/", &[]).await.0, 200);
        assert_eq!(
            get("127.0.0.9", *a_addr, "nowhere.test", "/", &[]).await.0,
            404
        );

        let scrape = |proxy: &Arc<Proxy>| {
            let metrics = proxy.metrics().clone();
            async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                tokio::spawn(cairn_agent::metrics::serve(
                    listener,
                    metrics,
                    std::future::pending(),
                ));
                let (status, headers, text) =
                    request("127.0.0.1", addr, "GET", "x", "/metrics", &[], None).await;
                assert_eq!(status, 200);
                assert_eq!(headers["content-type"], cairn_agent::metrics::CONTENT_TYPE);
                let (status, ..) =
                    request("127.0.0.1", addr, "POST", "x", "/metrics", &[], None).await;
                assert_eq!(status, 405);
                let (status, ..) = request("127.0.0.1", addr, "GET", "x", "/", &[], None).await;
                assert_eq!(status, 404);
                text
            }
        };
        let has = |text: &str, line: &str| {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        };
        let text = scrape(a).await;
        has(
            &text,
            r#"cairn_proxy_requests_total{route="forwarded",class="2xx"} 1"#,
        );
        has(
            &text,
            r#"cairn_proxy_requests_total{route="local",class="2xx"} 0"#,
        );
        has(
            &text,
            r#"cairn_proxy_requests_total{route="none",class="4xx"} 1"#,
        );
        has(&text, "cairn_proxy_forward_duration_seconds_count 1");
        has(&text, r#"cairn_proxy_pending_total{outcome="timed_out"} 0"#);
        has(&text, "cairn_proxy_refused_hops_total 0");
        has(&text, "cairn_proxy_websockets 0");
        has(&text, "cairn_proxy_cluster_generation 1");
        let text_b = scrape(b).await;
        has(
            &text_b,
            r#"cairn_proxy_requests_total{route="local",class="2xx"} 1"#,
        );
        has(
            &text_b,
            r#"cairn_proxy_requests_total{route="hop",class="2xx"} 1"#,
        );
        has(&text_b, "cairn_proxy_forward_duration_seconds_count 0");
        for t in [&text, &text_b] {
            for private in ["web.test", "nowhere", "127.0.0", "\"web\""] {
                assert!(!t.contains(private), "{private} in:\n{t}");
            }
        }
    })
    .await;
}

/// VmHWM (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// The bound this test states: a proxy process streaming a 1 GiB upload stays under 64 MiB resident at its
/// peak (it would need more than 1 GiB if it held the body).
const RSS_BOUND_KIB: u64 = 64 * 1024;

#[tokio::test]
async fn a_1_gib_upload_streams_through_a_proxy_process_in_bounded_memory() {
    // Built before the clock starts (a cold build takes minutes).
    example("ws_echo");
    bounded(300, async {
        let app = Proc::app("sink").await;
        let proxy = Proc::start(
            &example("node_proxy"),
            &[
                "--listen",
                "127.0.0.1:0",
                "--route",
                &format!("upload.test={}", app.addr),
                "--max-body",
                "none",
            ],
            &[],
        )
        .await;
        let before = peak_rss_kib(proxy.pid());

        const CHUNK: usize = 256 * 1024;
        const TOTAL: u64 = 1 << 30;
        let chunk = Bytes::from(vec![0x5au8; CHUNK]);
        let n = TOTAL / CHUNK as u64;
        let frames = futures_util::stream::iter(
            (0..n).map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))),
        );
        let io = TokioIo::new(TcpStream::connect(proxy.addr).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::post("/upload")
            .header("host", "upload.test")
            .header("content-length", TOTAL.to_string())
            .body(StreamBody::new(frames))
            .unwrap();
        let t = Instant::now();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(String::from_utf8_lossy(&body).trim(), TOTAL.to_string());
        let peak = peak_rss_kib(proxy.pid());
        eprintln!(
            "1 GiB upload through the proxy process in {:?}: peak RSS {} KiB before, {} KiB after (bound {} KiB)",
            t.elapsed(),
            before,
            peak,
            RSS_BOUND_KIB
        );
        assert!(
            peak < RSS_BOUND_KIB,
            "the proxy's peak RSS was {peak} KiB streaming 1 GiB (bound {RSS_BOUND_KIB} KiB)"
        );

        // And the node default limit refuses the same upload up front.
        let limited = Proc::start(
            &example("node_proxy"),
            &[
                "--listen",
                "127.0.0.1:0",
                "--route",
                &format!("upload.test={}", app.addr),
            ],
            &[],
        )
        .await;
        let status = raw_status(
            limited.addr,
            format!("POST /upload HTTP/1.1\r\nhost: upload.test\r\ncontent-length: {TOTAL}\r\n\r\n").as_bytes(),
            None,
        )
        .await;
        assert_eq!(status, 413);
    })
    .await;
}
