//! The node's HTTP reverse proxy: one listen address (127.0.0.1:8000 by default) for every app on the node,
//! routing by `Host` to the app's healthy replicas, round robin.
//!
//! The routing table is immutable and swapped atomically ([`arc_swap`]); a request works on the table it
//! loaded, so a release switch is one swap and never a half-updated table. Each backend counts its
//! requests in flight (until the response body is done), so the deployer can drain an old replica before
//! stopping it. A request without a body whose connection to a replica is refused is retried on a fresh
//! table, which covers the moment between a switch and the old replica going away.
//!
//! Answers of its own: 404 for a host no app on this node serves, 503 when the app has no healthy replica
//! here, 502 when the replica fails to answer, 504 when it answers too slowly. Their bodies say what
//! happened without internals.
//!
//! Bounded like `cairn serve`'s listener: the descriptor limit is raised to the hard limit when it starts
//! serving, connections are capped below it ([`ProxyConfig::max_connections`]; each may hold a second
//! descriptor towards a replica), and a connection must send a request's complete headers within
//! [`ProxyConfig::header_timeout`] of connecting or of its previous response (hyper's
//! `header_read_timeout`, also the keep-alive idle timeout), headers at most
//! [`ProxyConfig::max_header_bytes`]. At the cap new connections wait in the kernel's backlog.
//!
//! TLS comes later through [`Listener`]: a TLS listener yields streams that are already (or lazily)
//! decrypted, and reports `https` as its scheme.
//!
//! What it must not do: route to anything but the loopback replica addresses the deployer gives it, route
//! to a replica before its health check passed (only the deployer adds backends, after the check), or
//! pass hop-by-hop headers through.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use cairn_schema::Name;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::driver::ReplicaId;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The proxy's listen address unless the operator gives another.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";

/// Where the proxy accepts connections. Plain TCP today; a TLS listener (ACME certificates) implements the
/// same trait later, yielding decrypted streams and `https` as its scheme.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = std::io::Result<(Self::Io, SocketAddr)>> + Send;
    /// The scheme clients used, for `X-Forwarded-Proto`.
    fn scheme(&self) -> &'static str {
        "http"
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&mut self) -> std::io::Result<(Self::Io, SocketAddr)> {
        let (s, a) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, a))
    }
}

/// The proxy's timeouts and retry policy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub connect_timeout: Duration,
    /// How long a replica may take to send its response headers.
    pub response_timeout: Duration,
    /// How often a bodiless request is retried when its replica refuses the connection.
    pub connect_retries: u32,
    /// How long connections may finish their requests after shutdown.
    pub shutdown_grace: Duration,
    /// A client must send a request's complete headers within this of connecting or of its previous
    /// response (also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// Bytes of request line and headers at most (431 beyond).
    pub max_header_bytes: usize,
    /// Client connections at most; `None`: from the descriptor limit ([`connection_cap`]).
    pub max_connections: Option<usize>,
}

/// File descriptors the agent keeps for everything but proxied connections (Docker, the control plane,
/// sources, its data directory).
pub const RESERVED_FDS: u64 = 256;

/// Client connections the proxy holds at most with `fd_limit` descriptors: each may also hold one to a
/// replica, so three eighths of what is left after [`RESERVED_FDS`], at least 16.
pub fn connection_cap(fd_limit: u64) -> usize {
    let usable = fd_limit.saturating_sub(RESERVED_FDS) / 8 * 3;
    usize::try_from(usable)
        .unwrap_or(usize::MAX)
        .clamp(16, 1 << 20)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force afterwards.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limit = getrlimit(Resource::Nofile),
            Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            connect_retries: 3,
            shutdown_grace: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_connections: None,
        }
    }
}

/// One healthy replica the proxy routes to.
#[derive(Debug)]
pub struct Backend {
    pub replica: ReplicaId,
    pub release: u64,
    pub slot: u32,
    pub addr: SocketAddr,
    in_flight: AtomicUsize,
}

impl Backend {
    pub fn new(replica: ReplicaId, release: u64, slot: u32, addr: SocketAddr) -> Arc<Self> {
        Arc::new(Backend {
            replica,
            release,
            slot,
            addr,
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Requests whose response is not finished yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// An app's routes: its hostnames and healthy backends.
#[derive(Debug)]
struct AppRoute {
    app: Name,
    hostnames: Vec<String>,
    backends: Vec<Arc<Backend>>,
    next: AtomicUsize,
}

impl AppRoute {
    fn pick(&self) -> Option<Arc<Backend>> {
        if self.backends.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.backends.len();
        Some(self.backends[i].clone())
    }
}

#[derive(Debug, Default)]
struct Table {
    hosts: HashMap<String, Arc<AppRoute>>,
    apps: BTreeMap<Name, Arc<AppRoute>>,
}

/// What the routing table holds for one app (for status output and tests).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteInfo {
    pub app: Name,
    pub hostnames: Vec<String>,
    pub backends: Vec<(ReplicaId, SocketAddr)>,
}

/// The node proxy.
#[derive(Debug)]
pub struct Proxy {
    table: ArcSwap<Table>,
    /// Serializes writers; readers never wait.
    writer: Mutex<()>,
    client: Client<HttpConnector, ProxyBody>,
    cfg: ProxyConfig,
}

impl Proxy {
    pub fn new(cfg: ProxyConfig) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Arc::new(Proxy {
            table: ArcSwap::from_pointee(Table::default()),
            writer: Mutex::new(()),
            client,
            cfg,
        })
    }

    /// Changes one app's route with `f(hostnames, backends)` and swaps the new table in.
    fn update(&self, app: &Name, f: impl FnOnce(&mut Vec<String>, &mut Vec<Arc<Backend>>)) {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.table.load_full();
        let mut apps: BTreeMap<Name, Arc<AppRoute>> = old.apps.clone();
        let (mut hostnames, mut backends) = match apps.get(app) {
            Some(r) => (r.hostnames.clone(), r.backends.clone()),
            None => (Vec::new(), Vec::new()),
        };
        f(&mut hostnames, &mut backends);
        if hostnames.is_empty() && backends.is_empty() {
            apps.remove(app);
        } else {
            apps.insert(
                app.clone(),
                Arc::new(AppRoute {
                    app: app.clone(),
                    hostnames,
                    backends,
                    next: AtomicUsize::new(0),
                }),
            );
        }
        let mut hosts = HashMap::new();
        for route in apps.values() {
            for h in &route.hostnames {
                // The control plane keeps hostnames unique; if two apps ever claim one, the first keeps it.
                hosts.entry(h.clone()).or_insert_with(|| route.clone());
            }
        }
        self.table.store(Arc::new(Table { hosts, apps }));
    }

    /// Makes `backend` the only backend of its slot (one swap: the new replica in, the slot's old ones out),
    /// sets the app's hostnames, and returns the backends it took out.
    pub fn switch_slot(
        &self,
        app: &Name,
        hostnames: &[String],
        backend: Arc<Backend>,
    ) -> Vec<Arc<Backend>> {
        let mut removed = Vec::new();
        self.update(app, |hosts, backends| {
            *hosts = normalize_hosts(hostnames);
            let (out, keep): (Vec<_>, Vec<_>) = backends
                .drain(..)
                .partition(|b| b.slot == backend.slot && b.replica != backend.replica);
            removed = out;
            *backends = keep;
            if !backends.iter().any(|b| b.replica == backend.replica) {
                backends.push(backend);
                backends.sort_by_key(|b| b.slot);
            }
        });
        removed
    }

    /// Takes a replica out of its app's route; returns its backend if it was routed.
    pub fn remove_replica(&self, app: &Name, replica: &ReplicaId) -> Option<Arc<Backend>> {
        let mut removed = None;
        self.update(app, |_, backends| {
            if let Some(i) = backends.iter().position(|b| &b.replica == replica) {
                removed = Some(backends.remove(i));
            }
        });
        removed
    }

    /// Forgets an app entirely (its hostnames answer 404 from now on); returns its backends.
    pub fn remove_app(&self, app: &Name) -> Vec<Arc<Backend>> {
        let mut removed = Vec::new();
        self.update(app, |hosts, backends| {
            hosts.clear();
            removed = std::mem::take(backends);
        });
        removed
    }

    /// The current routes.
    pub fn routes(&self) -> Vec<RouteInfo> {
        self.table
            .load()
            .apps
            .values()
            .map(|r| RouteInfo {
                app: r.app.clone(),
                hostnames: r.hostnames.clone(),
                backends: r
                    .backends
                    .iter()
                    .map(|b| (b.replica.clone(), b.addr))
                    .collect(),
            })
            .collect()
    }

    /// Waits `grace` (requests that loaded the table before a switch reach their backend within it), then
    /// until none of `backends` has a request in flight, at most `max`. Returns whether they drained.
    pub async fn drain(&self, backends: &[Arc<Backend>], grace: Duration, max: Duration) -> bool {
        let start = Instant::now();
        tokio::time::sleep(grace).await;
        loop {
            if backends.iter().all(|b| b.in_flight() == 0) {
                return true;
            }
            if start.elapsed() >= max {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Serves until `shutdown` completes, then lets open connections finish (bounded).
    pub async fn serve<L: Listener>(
        self: Arc<Self>,
        mut listener: L,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let scheme = listener.scheme();
        let fds = raise_fd_limit();
        let cap = self
            .cfg
            .max_connections
            .unwrap_or_else(|| connection_cap(fds))
            .max(1);
        tracing::debug!(fd_limit = fds, max_connections = cap, "node proxy bounds");
        let permits = Arc::new(tokio::sync::Semaphore::new(cap));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = &mut shutdown => break,
            };
            tokio::select! {
                accepted = listener.accept() => {
                    let (io, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of file descriptors and the like: do not spin.
                            tracing::warn!(error = %e, "proxy accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let this = self.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.handle(req, peer, scheme).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(self.cfg.header_timeout)
                        .max_buf_size(self.cfg.max_header_bytes.max(8192))
                        .serve_connection(TokioIo::new(io), svc);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _ = conn.await;
                        drop(permit);
                    });
                }
                _ = &mut shutdown => break,
            }
        }
        let _ = tokio::time::timeout(self.cfg.shutdown_grace, graceful.shutdown()).await;
        Ok(())
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> Response<ProxyBody> {
        let Some(host) = request_host(&req) else {
            return own_answer(
                StatusCode::BAD_REQUEST,
                "cairn: the request names no host\n".into(),
            );
        };
        let Some(route) = self.table.load().hosts.get(&host).cloned() else {
            return own_answer(
                StatusCode::NOT_FOUND,
                format!("cairn: no app is served at `{host}` on this node\n"),
            );
        };
        let app = route.app.clone();
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        forwarded_headers(&mut parts.headers, peer, &host, scheme);

        if body.is_end_stream() {
            // No body to lose: a refused connection can be retried on a fresh table.
            let mut route = route;
            for attempt in 0..=self.cfg.connect_retries {
                let Some(backend) = route.pick() else {
                    return no_replica(&app);
                };
                let req = rebuild(
                    &parts,
                    &backend,
                    Empty::new().map_err(|n| match n {}).boxed(),
                );
                match self.send(req, backend).await {
                    Err(Upstream::Connect) if attempt < self.cfg.connect_retries => {
                        tokio::time::sleep(Duration::from_millis(25)).await;
                        match self.table.load().hosts.get(&host).cloned() {
                            Some(r) => route = r,
                            None => return no_replica(&app),
                        }
                    }
                    other => return answer(other, &app),
                }
            }
            no_replica(&app)
        } else {
            let Some(backend) = route.pick() else {
                return no_replica(&app);
            };
            let req = rebuild(&parts, &backend, body.boxed());
            answer(self.send(req, backend).await, &app)
        }
    }

    async fn send(
        &self,
        req: Request<ProxyBody>,
        backend: Arc<Backend>,
    ) -> Result<Response<ProxyBody>, Upstream> {
        let guard = InFlight::new(backend);
        match tokio::time::timeout(self.cfg.response_timeout, self.client.request(req)).await {
            Err(_) => Err(Upstream::Timeout),
            Ok(Err(e)) if e.is_connect() => Err(Upstream::Connect),
            Ok(Err(_)) => Err(Upstream::Failed),
            Ok(Ok(res)) => {
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let body = Tracked {
                    inner: body.boxed(),
                    _guard: guard,
                };
                Ok(Response::from_parts(parts, body.boxed()))
            }
        }
    }
}

enum Upstream {
    Connect,
    Failed,
    Timeout,
}

fn answer(r: Result<Response<ProxyBody>, Upstream>, app: &Name) -> Response<ProxyBody> {
    match r {
        Ok(res) => res,
        Err(Upstream::Connect) => no_replica(app),
        Err(Upstream::Failed) => own_answer(
            StatusCode::BAD_GATEWAY,
            format!("cairn: app `{app}` did not answer the request\n"),
        ),
        Err(Upstream::Timeout) => own_answer(
            StatusCode::GATEWAY_TIMEOUT,
            format!("cairn: app `{app}` did not answer in time\n"),
        ),
    }
}

fn no_replica(app: &Name) -> Response<ProxyBody> {
    own_answer(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cairn: app `{app}` has no healthy replica on this node\n"),
    )
}

fn own_answer(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut res = Response::new(Full::new(Bytes::from(text)).map_err(|n| match n {}).boxed());
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn rebuild(
    parts: &hyper::http::request::Parts,
    backend: &Backend,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: Uri = format!("http://{}{pq}", backend.addr)
        .parse()
        .unwrap_or_else(|_| Uri::from_static("http://127.0.0.1/"));
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// The request's host, lowercased, without port or trailing dot.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().host().map(str::to_owned))?;
    let host = if raw.starts_with('[') {
        raw.split(']').next().map(|h| format!("{h}]"))?
    } else {
        raw.split(':').next()?.to_owned()
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

fn normalize_hosts(hosts: &[String]) -> Vec<String> {
    let mut v: Vec<String> = hosts
        .iter()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    v.sort();
    v.dedup();
    v
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

fn forwarded_headers(headers: &mut HeaderMap, peer: SocketAddr, host: &str, scheme: &str) {
    let ip = peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert("x-forwarded-host", v);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
    );
}

/// Counts a request against its backend until the response body is finished or dropped.
struct InFlight(Arc<Backend>);

impl InFlight {
    fn new(b: Arc<Backend>) -> Self {
        b.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(b)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Tracked {
    inner: ProxyBody,
    _guard: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str) -> Request<()> {
        Request::builder()
            .header(header::HOST, host)
            .body(())
            .unwrap()
    }

    #[test]
    fn hosts_are_matched_without_port_case_or_trailing_dot() {
        assert_eq!(
            request_host(&req("Web.Example.COM:8000")).as_deref(),
            Some("web.example.com")
        );
        assert_eq!(
            request_host(&req("web.example.com.")).as_deref(),
            Some("web.example.com")
        );
        assert_eq!(request_host(&req("[::1]:80")).as_deref(), Some("[::1]"));
    }

    #[test]
    fn switching_a_slot_replaces_only_that_slot() {
        let p = Proxy::new(ProxyConfig::default());
        let app = Name::new("web").unwrap();
        let hosts = vec!["web.example.com".to_owned()];
        let a0 = Backend::new(ReplicaId("a0".into()), 1, 0, "127.0.0.1:1".parse().unwrap());
        let a1 = Backend::new(ReplicaId("a1".into()), 1, 1, "127.0.0.1:2".parse().unwrap());
        assert!(p.switch_slot(&app, &hosts, a0.clone()).is_empty());
        assert!(p.switch_slot(&app, &hosts, a1).is_empty());
        let b0 = Backend::new(ReplicaId("b0".into()), 2, 0, "127.0.0.1:3".parse().unwrap());
        let out = p.switch_slot(&app, &hosts, b0);
        assert_eq!(out.len(), 1);
        assert!(Arc::ptr_eq(&out[0], &a0));
        let routes = p.routes();
        let ids: Vec<&str> = routes[0]
            .backends
            .iter()
            .map(|(r, _)| r.0.as_str())
            .collect();
        assert_eq!(ids, ["b0", "a1"]);
        assert!(p.remove_replica(&app, &ReplicaId("a1".into())).is_some());
        assert_eq!(p.remove_app(&app).len(), 1);
        assert!(p.routes().is_empty());
    }

    /// Sends `request` on a new connection to `addr`; the answer's status, or `None` without one
    /// within `limit`.
    async fn raw(addr: SocketAddr, request: &[u8], limit: Duration) -> Option<u16> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let answer = tokio::time::timeout(limit, async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            let _ = s.write_all(request).await;
            let mut answer = vec![0u8; 12];
            s.read_exact(&mut answer).await.ok()?;
            Some(answer)
        })
        .await
        .ok()??;
        std::str::from_utf8(&answer)
            .ok()?
            .strip_prefix("HTTP/1.1 ")?
            .get(..3)?
            .parse()
            .ok()
    }

    /// Whether the proxy closes `s` (EOF, perhaps after an answer) within `limit`.
    async fn closed(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Regression (issue 12): the node proxy had no connection cap, and its limits were fixed. Idle and
    /// slow clients are closed after the header timeout, connections past the cap wait for room instead
    /// of using descriptors, and malformed requests get a 4xx, never a 5xx.
    #[tokio::test]
    async fn regression_idle_slow_and_malformed_clients_are_bounded_and_get_4xx() {
        use tokio::io::AsyncWriteExt as _;
        let p = Proxy::new(ProxyConfig {
            header_timeout: Duration::from_millis(500),
            max_connections: Some(2),
            ..ProxyConfig::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(p.serve(listener, async move {
            let _ = stopped.await;
        }));

        // Two connections fill the cap: one idle, one slow.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: web")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A third waits for room: no answer while both are open...
        let ok = b"GET / HTTP/1.1\r\nhost: nowhere.test\r\nconnection: close\r\n\r\n";
        assert_eq!(
            raw(addr, ok, Duration::from_millis(200)).await,
            None,
            "past the cap"
        );
        // ...and the header timeout closes them, which makes room.
        assert!(
            closed(&mut idle, Duration::from_secs(5)).await,
            "the idle client is closed"
        );
        assert!(
            closed(&mut slow, Duration::from_secs(5)).await,
            "the slow client is closed"
        );
        assert_eq!(raw(addr, ok, Duration::from_secs(5)).await, Some(404));

        let big = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(100 * 1024)
        );
        let cases: [(&str, &[u8]); 7] = [
            ("garbage", b"\x00\x01 / HTTP/9.9\r\n\r\n"),
            ("no host", b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n"),
            ("bad host", b"GET / HTTP/1.1\r\nhost: a b\xff\r\nconnection: close\r\n\r\n"),
            ("bad path", b"GET /%ff%00/../x?%zz HTTP/1.1\r\nhost: nowhere.test\r\nconnection: close\r\n\r\n"),
            ("bad length", b"POST / HTTP/1.1\r\nhost: nowhere.test\r\ncontent-length: lots\r\n\r\n"),
            ("absolute URI", b"GET http://evil.test/ HTTP/1.1\r\nhost: nowhere.test\r\nconnection: close\r\n\r\n"),
            ("huge header", big.as_bytes()),
        ];
        for (what, request) in cases {
            let status = raw(addr, request, Duration::from_secs(5)).await;
            assert!(
                status.is_some_and(|s| (400..500).contains(&s)),
                "{what}: {status:?}"
            );
        }
        let _ = stop.send(());
        served.await.unwrap().unwrap();
    }

    #[test]
    fn the_connection_cap_leaves_room_for_replica_connections() {
        assert_eq!(connection_cap(1024), 288);
        assert_eq!(connection_cap(100), 16);
        for limit in [1024u64, 4096, 65_536, 1 << 20] {
            assert!(2 * connection_cap(limit) as u64 + RESERVED_FDS < limit);
        }
    }
}
