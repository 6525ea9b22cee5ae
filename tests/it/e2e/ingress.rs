//! Ingress across nodes with their own addresses: three agents, each in its own network namespace with
//! its proxy on `<address>:8000`, the control plane on the test's bridge, and a client that talks only to
//! node A. Apps run on B (A and C drain at first), then move: B drained, the replica goes to C; C's agent
//! SIGKILLed with a short offline threshold, the replica goes back to B. A client sending 25 requests/s
//! to A throughout sees no failed request: a request that arrives while no node has a replica waits at
//! A's proxy for the route table to name one (`--proxy-pending-timeout`); how long those waits were (the
//! window with no replica anywhere) is printed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cairn_testkit::netns::Net;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use super::support::{Driver, E2e, site, wait_for};

const TEST: &str = "ingress_across_nodes";

/// Bound of a process-driver deploy (fetch, start, health) on a loaded CI machine.
const DEPLOY: Duration = Duration::from_secs(60);

/// The WebSocket/SSE test app (`agent/examples/ws_echo.rs`), built once per test process.
fn ws_echo() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        cairn_testkit::build::agent(
            env!("CARGO"),
            env!("CARGO_MANIFEST_DIR"),
            &["--example", "ws_echo"],
        )
        .join("examples/ws_echo")
    })
    .clone()
}

/// One request of the load: when it was sent, how long it took, what it got.
#[derive(Debug)]
struct Shot {
    at: Duration,
    took: Duration,
    answer: Result<u16, String>,
}

/// Sends `GET /` with `host` to `addr` every 40 ms (25/s, each request on its own, however long the
/// others take) until `stop`; returns every request's outcome.
fn load(
    addr: SocketAddr,
    host: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<Shot>> {
    let host = host.to_owned();
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .unwrap();
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(40));
        let mut inflight = Vec::new();
        while !*stop.borrow() {
            tick.tick().await;
            let (client, host) = (client.clone(), host.clone());
            inflight.push(tokio::spawn(async move {
                let sent = Instant::now();
                let answer = client
                    .get(format!("http://{addr}/"))
                    .header(reqwest::header::HOST, host)
                    .send()
                    .await
                    .map_err(|e| format!("{e}"))
                    .map(|r| r.status().as_u16());
                Shot {
                    at: sent - start,
                    took: sent.elapsed(),
                    answer,
                }
            }));
        }
        let mut shots = Vec::new();
        for t in inflight {
            shots.push(t.await.unwrap());
        }
        shots
    })
}

/// Checks a load saw only 200s at 20 requests/s or more, and says how long the slowest ones waited.
fn report(phase: &str, shots: &[Shot]) {
    let failed: Vec<&Shot> = shots.iter().filter(|s| s.answer != Ok(200)).collect();
    let span = shots.last().map_or(Duration::ZERO, |s| s.at) + Duration::from_millis(40);
    let rate = shots.len() as f64 / span.as_secs_f64();
    let waited: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.took > Duration::from_millis(300))
        .collect();
    let window = match (waited.first(), waited.iter().map(|s| s.at + s.took).max()) {
        (Some(first), Some(end)) => end.saturating_sub(first.at),
        _ => Duration::ZERO,
    };
    let slowest = shots.iter().map(|s| s.took).max().unwrap_or_default();
    eprintln!(
        "{TEST}: {phase}: {} requests at {rate:.1}/s, {} failed; {} waited for a replica (> 300 ms), \
         the window with no replica anywhere was about {window:?}, the slowest request took {slowest:?}",
        shots.len(),
        failed.len(),
        waited.len(),
    );
    assert!(
        failed.is_empty(),
        "{phase}: {} of {} requests failed: {:?}",
        failed.len(),
        shots.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(rate >= 20.0, "{phase}: only {rate:.1} requests/s were sent");
}

/// The node an app's one replica is placed on.
async fn placed_on(plane: &super::support::Plane, app: &str) -> Option<String> {
    let rows = plane
        .rows(&format!(
            "SELECT node FROM placements WHERE app = '{app}' AND state = 'running'"
        ))
        .await;
    Some(rows.first()?["node"].as_str()?.to_owned())
}

/// Whether `node` reports a healthy running replica of `app`.
async fn healthy_on(plane: &super::support::Plane, app: &str, node: &str) -> bool {
    let rows = plane
        .rows(&format!(
            "SELECT replicas FROM node_status WHERE node = '{node}'"
        ))
        .await;
    rows.first()
        .and_then(|r| r["replicas"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|r| r["app"] == app && r["state"] == "running" && r["healthy"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingress_across_nodes_serves_every_app_from_one_node_and_moves_without_failed_requests() {
    let mut net = match Net::create() {
        Ok(n) => n,
        Err(why) => return cairn_testkit::missing(TEST, "network namespaces", why),
    };
    let Some(mut e) = E2e::new(TEST, &[Driver::Process]).await else {
        return;
    };
    let (ha, hb, hc) = (
        net.host("a").unwrap(),
        net.host("b").unwrap(),
        net.host("c").unwrap(),
    );
    let stranger = net.host("x").unwrap();
    let ws_bin = ws_echo();

    // A takes the public traffic and runs nothing; B runs the apps; C is internal and drains until the move.
    e.repo.node(
        "a",
        &format!("address = \"{}:8000\"\ndrain = true\n", ha.addr),
    );
    e.repo
        .node("b", &format!("address = \"{}:8000\"\n", hb.addr));
    e.repo.node(
        "c",
        &format!(
            "address = \"{}:8000\"\ningress = false\ndrain = true\n",
            hc.addr
        ),
    );
    let web = e.app("web", "process-app", 1, &site("v1", true));
    e.repo.write(
        "runtime-ws.toml",
        &format!(
            "{}",
            cairn_testkit::fixtures::runtime("ws-app")
                .drivers(&["process"])
                .start(&format!("exec {}", ws_bin.display()))
        ),
    );
    let ws_name = format!("ws-{}", &e.installation[3..]);
    let ws_src = e.app_source(&ws_name);
    ws_src.commit(&[("README", "ws\n".to_owned())]);
    e.repo.write(
        &format!("app-{ws_name}.toml"),
        &format!(
            "[app.{ws_name}]\nplan = \"small\"\nruntime = \"ws-app\"\nreplicas = 1\n\
             health = {{ path = \"/\", timeout = \"2s\" }}\n\n\
             [app.{ws_name}.source]\nurl = \"{}\"\nbranch = \"main\"\n\n\
             [app.{ws_name}.http]\nmax_body = \"64KiB\"\n",
            ws_src.url
        ),
    );
    let gateway = net.gateway().to_string();
    let listen = format!("{gateway}:0");
    let plane = e
        .start(&[
            "--listen",
            &listen,
            "--node-offline-after",
            "3s",
            "--routes-refresh",
            "1s",
        ])
        .await;
    let proxy_flags = ["--proxy-pending-timeout", "15s"];
    let metrics = format!("{}:9100", ha.addr);
    let mut a_flags = proxy_flags.to_vec();
    a_flags.extend(["--metrics-listen", &metrics]);
    let a = e
        .agent_in(&plane, "a", &ha, 8000, Driver::Process, &a_flags)
        .await;
    let b = e
        .agent_in(&plane, "b", &hb, 8000, Driver::Process, &proxy_flags)
        .await;
    let c = e
        .agent_in(&plane, "c", &hc, 8000, Driver::Process, &proxy_flags)
        .await;

    // Both apps run on B only, and answer through A (which has no replica: every answer is forwarded).
    plane.wait_release(&web.name, 1, "live", DEPLOY).await;
    plane.wait_release(&ws_name, 1, "live", DEPLOY).await;
    assert_eq!(placed_on(&plane, &web.name).await.as_deref(), Some("b"));
    assert_eq!(placed_on(&plane, &ws_name).await.as_deref(), Some("b"));
    super::support::wait_body(a.proxy, &web.host, "v1", Duration::from_secs(20)).await;
    let ws_host = super::support::host(&ws_name);

    // The headers the app sees: the client's address (the machine, on the bridge) across the hop.
    let (status, headers) = super::support::get(a.proxy, &ws_host, "/headers")
        .await
        .unwrap();
    assert_eq!(status, 200, "{headers}");
    assert!(
        headers.contains(&format!("x-forwarded-for: {gateway}")),
        "the client's address crosses the hop: {headers}"
    );
    assert!(
        headers.contains(&format!("x-forwarded-host: {ws_host}")),
        "{headers}"
    );

    // A WebSocket through A to B echoes both ways, and an SSE stream arrives event by event.
    let stream = tokio::net::TcpStream::connect(a.proxy).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{ws_host}/ws"), stream)
        .await
        .expect("the WebSocket handshake passes through A to B");
    assert_eq!(resp.status().as_u16(), 101);
    for i in 0..5 {
        ws.send(Message::Text(format!("hello {i}").into()))
            .await
            .unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an echo within 5 s")
            .unwrap()
            .unwrap();
        assert_eq!(back, Message::Text(format!("hello {i}").into()));
    }
    ws.send(Message::Binary(vec![0u8, 1, 2, 255].into()))
        .await
        .unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back, Message::Binary(vec![0u8, 1, 2, 255].into()));
    ws.close(None).await.unwrap();

    let sse = super::support::client()
        .get(format!("http://{}/sse?count=3&interval_ms=1500", a.proxy))
        .header(reqwest::header::HOST, &ws_host)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    // The app sends event 0 at once and the last one 3 s later: unbuffered, the first arrives on its
    // own, long before the stream ends (a buffering hop would deliver everything together at the end).
    let mut sse = sse;
    let first = tokio::time::timeout(Duration::from_secs(10), sse.chunk())
        .await
        .expect("the first event arrives")
        .unwrap()
        .unwrap();
    let first_at = Instant::now();
    assert!(
        String::from_utf8_lossy(&first).contains("data: event 0"),
        "{first:?}"
    );
    assert!(
        !String::from_utf8_lossy(&first).contains("event 2"),
        "the events came together: {first:?}"
    );
    while sse.chunk().await.unwrap().is_some() {}
    assert!(
        first_at.elapsed() > Duration::from_millis(1500),
        "the first event came only {:?} before the stream ended",
        first_at.elapsed()
    );

    // The internal hop from an address that is not a node is refused, key or no key.
    let out = stranger
        .command("busybox")
        .args([
            "wget",
            "-q",
            "-S",
            "-O",
            "-",
            "--header",
            &format!("Host: {}", web.host),
            "--header",
            &format!("cairn-hop: {}", "0".repeat(64)),
            &format!("http://{}/", a.proxy),
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("403"), "a hop from a stranger: {said}");
    let (status, body) = super::support::client()
        .get(format!("http://{}/", b.proxy))
        .header(reqwest::header::HOST, &web.host)
        .header("cairn-hop", "0".repeat(64))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(status, 403, "{:?}", body.text().await);

    // The app's own body limit travels with the route table: A answers 413 above 64 KiB, without
    // forwarding, and passes what is below it.
    let upload = |n: usize| {
        super::support::client()
            .post(format!("http://{}/upload", a.proxy))
            .header(reqwest::header::HOST, &ws_host)
            .body(vec![b'x'; n])
            .send()
    };
    let small = upload(10_000).await.unwrap();
    assert_eq!(small.status(), 200);
    assert!(small.text().await.unwrap().contains("10000"));
    // The larger one announces its length and waits for `100 Continue` before its body, so A's early
    // 413 is read whole (a client still writing a body A will not read may see a broken pipe first).
    let big = {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = tokio::net::TcpStream::connect(a.proxy).await.unwrap();
        conn.write_all(
            format!(
                "POST /upload HTTP/1.1\r\nHost: {ws_host}\r\nContent-Length: 100000\r\n\
                 Expect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut head = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut head))
            .await
            .expect("A answers before any body byte")
            .unwrap();
        String::from_utf8_lossy(&head[..n]).into_owned()
    };
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");

    // A's metrics: every answer it gave was forwarded (it has no replica), the WebSocket was counted.
    let scrape = super::support::client()
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let forwarded_2xx = scrape
        .lines()
        .find(|l| {
            l.starts_with("cairn_proxy_requests_total{")
                && l.contains("route=\"forwarded\"")
                && l.contains("class=\"2xx\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(forwarded_2xx >= 3.0, "A's metrics: {scrape}");
    assert!(
        !scrape
            .lines()
            .any(|l| l.starts_with("cairn_proxy_requests_total{")
                && l.contains("route=\"local\"")
                && !l.ends_with(" 0")),
        "A served nothing locally: {scrape}"
    );
    assert!(
        !scrape.contains(&web.name),
        "no app name in a label: {scrape}"
    );

    // Drain B while the client sends 25 requests/s to A: the replica moves to C.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let shots = load(a.proxy, &web.host, stopped);
    tokio::time::sleep(Duration::from_secs(1)).await;
    e.repo.node(
        "b",
        &format!("address = \"{}:8000\"\ndrain = true\n", hb.addr),
    );
    e.repo.node(
        "c",
        &format!("address = \"{}:8000\"\ningress = false\n", hc.addr),
    );
    e.repo.commit();
    wait_for("web to move to c", DEPLOY, || async {
        (placed_on(&plane, &web.name).await.as_deref() == Some("c")
            && healthy_on(&plane, &web.name, "c").await
            && !healthy_on(&plane, &web.name, "b").await)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    report("drain b", &shots.await.unwrap());

    // Lose C (its agent and proxy SIGKILLed) while the client goes on: after the offline threshold the
    // replica is placed on B again (no longer draining) and A forwards there.
    let g = plane.generation().await;
    e.repo
        .node("b", &format!("address = \"{}:8000\"\n", hb.addr));
    e.repo.commit();
    plane.wait_generation(g + 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let shots = load(a.proxy, &web.host, stopped);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill();
    wait_for("web to be placed on b again", DEPLOY, || async {
        (placed_on(&plane, &web.name).await.as_deref() == Some("b")
            && healthy_on(&plane, &web.name, "b").await)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    report("c lost", &shots.await.unwrap());
    drop(b);
    drop(a);
}
