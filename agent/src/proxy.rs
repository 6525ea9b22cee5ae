//! The node's HTTP reverse proxy: one listen address (127.0.0.1:8000 by default) for every app in the
//! cluster, routing by `Host`: to this node's healthy replicas, round robin, and for an app with none here
//! to another node's proxy that has one (the internal hop, [`cluster`]).
//!
//! Two routing tables, each immutable and swapped atomically ([`arc_swap`]): the local one (this node's
//! replicas, changed by the deployer, one swap per release switch) and the cluster one (the other nodes'
//! proxies that have an app, installed whole by generation: [`Proxy::install_cluster`]). A request works on
//! the tables it loaded. Each local backend counts its requests in flight (until the response body is
//! done), so the deployer can drain an old replica before stopping it.
//!
//! A replica moving (between releases, or between nodes) fails no request:
//! - a refused connection is retried locally on a fresh table (the moment between a switch and the old
//!   replica going away), then on the other nodes in turn;
//! - a node that gets a hop it cannot serve (its replica just went) answers 503 marked with
//!   [`HOP_MISS_HEADER`], and the first node tries the next node (the marker never reaches a client);
//! - a request no node can serve (no route, or every node refused or missed) waits for either table to
//!   change ([`Proxy::install_cluster`], every local switch), looks again and tries again, up to
//!   [`ProxyConfig::pending_timeout`]; only then 503.
//!
//! A request body goes to another attempt only if no attempt has read from it (`body::Replayable`);
//! towards another node it is held back until that node asks for it (`Expect: 100-continue`, answered
//! once its replica takes the body), so a miss leaves it unread. Waiting reads nothing either.
//!
//! Protocols: HTTP/1.1 with keep-alive and HTTP/2 with prior knowledge (h2c) on the listener, HTTP/1.1
//! towards replicas and other nodes. Bodies stream both ways frame by frame (an upload is never held in
//! memory; a server-sent event reaches the client when the app sends it). HTTP/1.1 upgrades (WebSocket)
//! pass through: the `Upgrade` header is kept, and after the replica's `101` the two connections are
//! joined byte for byte ([`tunnel`]) until either side closes or both are idle for
//! [`ProxyConfig::upgrade_idle_timeout`]; [`Proxy::open_upgraded`] counts them.
//!
//! Forwarding headers: at the public edge `X-Forwarded-For/-Proto/-Host`, `X-Real-IP` and `Forwarded` are
//! replaced with what the proxy saw; across an authenticated internal hop the first node's values are kept.
//!
//! Answers of its own, with bodies that say what happened without internals: 400 without a host, 403 for an
//! internal hop that is not authenticated (logged without the key), 404 for a host no app in the cluster
//! serves, 408 when a request body stalls for [`ProxyConfig::body_idle_timeout`], 413 for a body over the
//! app's limit (up front from `Content-Length`, and while streaming), 431 for headers over
//! [`ProxyConfig::max_header_bytes`] (hyper's answer), 502 when a replica fails to answer, 503 when no node
//! has had a healthy replica for the pending timeout (or for a hop this node cannot serve, at once and
//! marked), 504 when the replica does not answer within [`ProxyConfig::response_timeout`].
//!
//! It counts and times what it does into its [`ProxyMetrics`] ([`Proxy::metrics`], `crate::metrics`
//! lists the series).
//!
//! Bounded like `cairn serve`'s listener: the descriptor limit is raised to the hard limit when it starts
//! serving, connections are capped below it over all listeners ([`ProxyConfig::max_connections`]; each
//! may hold a second descriptor towards a replica), and a connection must send a request's complete headers within
//! [`ProxyConfig::header_timeout`] of connecting or of its previous response (hyper's
//! `header_read_timeout`, also the keep-alive idle timeout; it closes the connection without an answer).
//! At the cap new connections wait in the kernel's backlog.
//!
//! HTTPS ([`tls`]): a second listener ([`Proxy::tls_listener`]) serves the same routes over TLS, with the
//! certificate picked by SNI from the TLS table ([`Proxy::install_tls`], one swap, cached on disk and
//! loaded at start: [`Proxy::load_tls_cache`]); its requests carry `https` in the forwarding headers and,
//! when the host's policy says so, `Strict-Transport-Security`. On the plain listener the proxy itself
//! answers ACME HTTP-01 challenges (`/.well-known/acme-challenge/<token>`, from the table, never
//! forwarded) and sends a host whose policy asks for it to `https://` with a 308; neither applies to a
//! request that came over the internal hop (its first node already did).
//!
//! What it must not do: route to anything but the loopback replica addresses the deployer gives it and the
//! node addresses of the cluster table, route to a replica before its health check passed (only the
//! deployer adds backends, after the check), forward a request that came over the internal hop (or make
//! one wait), pass the hop key or hop-by-hop headers to an app or the miss marker to a client, send a
//! request body again once any of it was read, or believe a client's forwarding headers.

mod body;
pub mod cluster;
mod headers;
pub mod tls;
mod tunnel;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use cairn_schema::Name;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::driver::ReplicaId;
use crate::metrics::{PendingOutcome, ProxyMetrics, Route, UnservedReason};
use body::{Cut, CutFlag, Gate, Limited, Replayable, Tracked};
use cluster::{Cluster, RemoteRoute};
pub use cluster::{ClusterApp, ClusterNode, ClusterTable, HOP_HEADER, HOP_MISS_HEADER, HopKey};
use headers::Origin;
pub use tls::{HostPolicy, TlsCertificate, TlsError, TlsListener, TlsReport, TlsTable};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

/// The proxy's listen address unless the operator gives another.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";

/// Where the proxy accepts connections: plain TCP, or TLS ([`TlsListener`], decrypted streams and `https`
/// as its scheme).
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

/// The proxy's limits, timeouts and retry policy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub connect_timeout: Duration,
    /// How long a replica (or another node) may take to send its response headers (504 beyond).
    pub response_timeout: Duration,
    /// How often a bodiless request is retried locally when its replica refuses the connection.
    pub connect_retries: u32,
    /// How long connections may finish their requests after shutdown.
    pub shutdown_grace: Duration,
    /// A client must send a request's complete headers within this of connecting or of its previous
    /// response (also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// Bytes of request line and headers at most (431 beyond).
    pub max_header_bytes: usize,
    /// How long a request body may pause (408 beyond, when the response has not started).
    pub body_idle_timeout: Duration,
    /// The largest request body for an app without a limit of its own (413 beyond); `None`: no limit.
    pub max_body_bytes: Option<u64>,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed.
    pub upgrade_idle_timeout: Duration,
    /// Client connections at most, over all of the proxy's listeners; `None`: from the descriptor limit
    /// ([`connection_cap`]).
    pub max_connections: Option<usize>,
    /// This node's name in the cluster table (left out when forwarding).
    pub node: Option<Name>,
    /// The source address of connections to other nodes: the address this node is listed under in the
    /// cluster table, which the receiving node checks (`None`: the kernel's choice, the address on the
    /// route to the other node).
    pub forward_from: Option<IpAddr>,
    /// How long a request no node can serve waits for the tables to name one (a replica moving between
    /// nodes) before its 503; zero answers at once.
    pub pending_timeout: Duration,
    /// Where the installed certificates are cached (the agent's `<data-dir>/tls`); `None`: not cached.
    pub tls_cache: Option<std::path::PathBuf>,
}

/// How long a request waits for a route by default (`cairn-agent --proxy-pending-timeout`).
pub const DEFAULT_PENDING_TIMEOUT: Duration = Duration::from_secs(10);

/// The default node-wide body limit (`cairn-agent --proxy-max-body`).
pub const DEFAULT_MAX_BODY: u64 = 100 << 20;

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
            body_idle_timeout: Duration::from_secs(60),
            max_body_bytes: Some(DEFAULT_MAX_BODY),
            upgrade_idle_timeout: Duration::from_secs(300),
            max_connections: None,
            node: None,
            forward_from: None,
            pending_timeout: DEFAULT_PENDING_TIMEOUT,
            tls_cache: None,
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

/// What the proxy counted since it started (read from its [`ProxyMetrics`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    /// Upgraded connections (WebSockets) open now.
    pub open_upgraded: usize,
    /// Requests this node's replicas answered for this node's clients.
    pub local: u64,
    /// Requests another node's proxy answered.
    pub forwarded: u64,
    /// Requests other nodes forwarded here (answered by a replica here, or missed).
    pub hop: u64,
    /// Forwarded attempts another node could not serve (refused the connection, or had no replica).
    pub unserved_forwards: u64,
    /// Internal hops refused (403).
    pub refused_hops: u64,
    /// Requests that waited for a route and got one.
    pub pending_served: u64,
    /// Requests that waited for a route in vain (503).
    pub pending_timed_out: u64,
}

/// The node proxy.
#[derive(Debug)]
pub struct Proxy {
    table: ArcSwap<Table>,
    cluster: ArcSwap<Cluster>,
    hop_key: ArcSwapOption<HopKey>,
    /// The TLS table, shared with the TLS listeners' certificate resolver.
    tls: Arc<ArcSwap<tls::Certs>>,
    tls_cache: Option<tls::Cache>,
    /// Serializes writers; readers never wait.
    writer: Mutex<()>,
    /// Serializes TLS installs (which write the cache) apart from route changes.
    tls_writer: Mutex<()>,
    /// The connection cap, shared by every listener [`Proxy::serve`] is given (set by the first).
    permits: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
    /// To this node's replicas.
    client: Client<HttpConnector, ProxyBody>,
    /// To other nodes' proxies (its own pool, from [`ProxyConfig::forward_from`]).
    forward: Client<HttpConnector, ProxyBody>,
    /// Bumped by every change of either table (and of the hop key): what a pending request waits on.
    changes: watch::Sender<u64>,
    metrics: Arc<ProxyMetrics>,
    cfg: ProxyConfig,
}

/// Where a request goes.
enum Target {
    Local(Arc<Backend>),
    Node(SocketAddr),
}

impl Target {
    fn addr(&self) -> SocketAddr {
        match self {
            Target::Local(b) => b.addr,
            Target::Node(a) => *a,
        }
    }
}

impl Proxy {
    pub fn new(cfg: ProxyConfig) -> Arc<Self> {
        let client = |from: Option<IpAddr>| {
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(cfg.connect_timeout));
            connector.set_nodelay(true);
            connector.set_local_address(from);
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_timer(TokioTimer::new())
                .build(connector)
        };
        let (forward, client) = (client(cfg.forward_from), client(None));
        Arc::new(Proxy {
            forward,
            table: ArcSwap::from_pointee(Table::default()),
            cluster: ArcSwap::from_pointee(Cluster::default()),
            hop_key: ArcSwapOption::empty(),
            tls: Arc::new(ArcSwap::from_pointee(tls::Certs::default())),
            tls_cache: cfg.tls_cache.clone().map(tls::Cache::new),
            writer: Mutex::new(()),
            tls_writer: Mutex::new(()),
            permits: std::sync::OnceLock::new(),
            client,
            changes: watch::Sender::new(0),
            metrics: Arc::new(ProxyMetrics::new()),
            cfg,
        })
    }

    /// Installs the cluster route table (one swap), unless the installed one is as new or newer.
    /// Returns whether it was installed.
    pub fn install_cluster(&self, table: ClusterTable) -> bool {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.cluster.load().generation;
        if current.is_some_and(|g| g >= table.generation) {
            return false;
        }
        let generation = table.generation;
        let compiled = Cluster::compile(table, self.cfg.node.as_ref());
        tracing::debug!(
            generation,
            apps = compiled.apps.len(),
            peers = compiled.peers.len(),
            "cluster routes installed"
        );
        self.cluster.store(Arc::new(compiled));
        self.metrics.cluster_installed(generation);
        self.changed();
        true
    }

    /// Installs the TLS table (one swap): its usable certificates, host policy and ACME challenge
    /// answers replace the installed ones; new TLS handshakes use them at once, open connections keep
    /// theirs. The certificates are cached on disk (when [`ProxyConfig::tls_cache`] is set), those no
    /// longer in the table deleted there. A certificate that cannot be served is left out and reported.
    /// The cache is written after the swap, synchronously (small files, fsynced: milliseconds, and
    /// nothing when they did not change).
    pub fn install_tls(&self, table: TlsTable) -> TlsReport {
        let _w = self.tls_writer.lock().unwrap_or_else(|p| p.into_inner());
        let (certs, rejected) = tls::Certs::compile(&table);
        for e in &rejected {
            tracing::warn!(error = %error_chain(e), "a certificate cannot be served: left out");
        }
        let installed = certs.ids().count();
        let certs = Arc::new(certs);
        self.tls.store(certs.clone());
        self.metrics.tls_installed(installed);
        tracing::debug!(
            certificates = installed,
            rejected = rejected.len(),
            challenges = table.challenges.len(),
            "TLS table installed"
        );
        let cache = self.tls_cache.as_ref().and_then(|cache| {
            let stored = cache.store(&table, &certs.served_in(&table)).err();
            if let Some(e) = &stored {
                tracing::warn!(error = %error_chain(e), "the certificates cannot be cached on disk (they are served anyway)");
            }
            stored
        });
        TlsReport {
            installed,
            rejected,
            cache,
        }
    }

    /// Installs the certificates cached on disk by an earlier install (without writing the cache
    /// again); call it before serving. Returns how many are served; none without a cache.
    pub fn load_tls_cache(&self) -> Result<usize, TlsError> {
        let Some(cache) = &self.tls_cache else {
            return Ok(0);
        };
        let _w = self.tls_writer.lock().unwrap_or_else(|p| p.into_inner());
        let table = cache.load()?;
        let (certs, rejected) = tls::Certs::compile(&table);
        for e in &rejected {
            tracing::warn!(error = %error_chain(e), "a cached certificate cannot be served: left out");
        }
        let n = certs.ids().count();
        self.tls.store(Arc::new(certs));
        self.metrics.tls_installed(n);
        Ok(n)
    }

    /// The ids of the certificates served now.
    pub fn tls_certificates(&self) -> Vec<String> {
        self.tls.load().ids().map(str::to_owned).collect()
    }

    /// An HTTPS listener on `tcp` serving the certificates this proxy installs; give it to
    /// [`Proxy::serve`] beside the plain one.
    pub fn tls_listener(&self, tcp: tokio::net::TcpListener) -> Result<TlsListener, TlsError> {
        let config = tls::server_config(self.tls.clone(), self.metrics.clone())?;
        Ok(TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            metrics: self.metrics.clone(),
        })
    }

    /// Wakes the requests waiting for a route.
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The installed cluster table's generation.
    pub fn cluster_generation(&self) -> Option<u64> {
        self.cluster.load().generation
    }

    /// Sets (or with `None` removes) the key that authenticates the internal hop, both ways.
    pub fn set_hop_key(&self, key: Option<HopKey>) {
        self.hop_key.store(key.map(Arc::new));
        self.changed();
    }

    /// Upgraded connections (WebSockets) open now.
    pub fn open_upgraded(&self) -> usize {
        usize::try_from(self.metrics.open_websockets()).unwrap_or(usize::MAX)
    }

    /// What the proxy counts and times (`cairn-agent --metrics-listen` serves it).
    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    /// The proxy's counters.
    pub fn counts(&self) -> ProxyCounts {
        let m = &self.metrics;
        ProxyCounts {
            open_upgraded: self.open_upgraded(),
            local: m.requests(Route::Local),
            forwarded: m.requests(Route::Forwarded),
            hop: m.requests(Route::Hop),
            unserved_forwards: m.unserved_forwards(UnservedReason::Refused)
                + m.unserved_forwards(UnservedReason::Miss),
            refused_hops: m.refused_hops(),
            pending_served: m.pendings(PendingOutcome::Served),
            pending_timed_out: m.pendings(PendingOutcome::TimedOut),
        }
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
        self.changed();
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
    /// Upgraded connections (WebSockets) do not count: they would hold every deploy for `max`.
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

    /// Serves until `shutdown` completes, then lets open connections finish (bounded). Called once per
    /// listener (the plain one, and the TLS one if any); they share the connection cap.
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
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.cfg.header_timeout)
            .max_buf_size(self.cfg.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.cfg.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(self.cfg.header_timeout))
            .keep_alive_timeout(Duration::from_secs(20));
        // One cap for the plain and the TLS listener together: both spend the same descriptors.
        let permits = self
            .permits
            .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(cap)))
            .clone();
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
                    let io = tunnel::FirstBytes::new(io, self.cfg.header_timeout);
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(io), svc)
                        .into_owned();
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

    /// Whether an internal hop from `peer` carrying `headers` is authenticated; the reason if not.
    fn check_hop(&self, headers: &header::HeaderMap, peer: SocketAddr) -> Result<(), &'static str> {
        let Some(key) = self.hop_key.load_full() else {
            return Err("this node has no hop key");
        };
        let peer_ok = self.cluster.load().peers.contains(&peer.ip());
        let key_ok = headers
            .get(HOP_HEADER)
            .is_some_and(|offered| key.matches(offered));
        match (peer_ok, key_ok) {
            (true, true) => Ok(()),
            (false, _) => Err("the peer is not a node of the cluster table"),
            (true, false) => Err("wrong hop key"),
        }
    }

    /// Answers one request and counts it by route and status class.
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> Response<ProxyBody> {
        let https = scheme == "https";
        if !https && let Some(res) = self.plain_answer(&req) {
            self.metrics.request(Route::None, res.status());
            return res;
        }
        let hsts = if https { self.hsts(&req) } else { None };
        let (mut res, route) = self.route(req, peer, scheme).await;
        if route != Route::Hop {
            // The miss marker answers an internal hop only; a client never sees it.
            res.headers_mut().remove(HOP_MISS_HEADER);
        }
        if let Some(v) = hsts {
            res.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, v);
        }
        self.metrics.request(route, res.status());
        res
    }

    /// What the plain listener answers itself: an ACME HTTP-01 challenge (from the TLS table, 404 for a
    /// token it does not hold), or a 308 to `https://` for a host whose policy asks for it and that has
    /// a certificate. Neither for an internal hop.
    fn plain_answer<B>(&self, req: &Request<B>) -> Option<Response<ProxyBody>> {
        if req.headers().contains_key(HOP_HEADER) {
            return None;
        }
        let certs = self.tls.load();
        if let Some(token) = req.uri().path().strip_prefix(tls::CHALLENGE_PREFIX) {
            return Some(match certs.challenge(token) {
                Some(answer) => {
                    let mut res = Response::new(Full::new(answer).map_err(|n| match n {}).boxed());
                    res.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                    res.headers_mut()
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    res
                }
                None => own_answer(
                    StatusCode::NOT_FOUND,
                    "cairn: no such ACME challenge on this node\n".into(),
                ),
            });
        }
        if !certs.any_redirect() {
            return None;
        }
        let host = request_host(req)?;
        if !certs.redirects(&host) {
            return None;
        }
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = HeaderValue::from_str(&format!("https://{host}{pq}")).ok()?;
        let mut res = own_answer(
            StatusCode::PERMANENT_REDIRECT,
            format!("cairn: `{host}` is served over HTTPS\n"),
        );
        res.headers_mut().insert(header::LOCATION, location);
        Some(res)
    }

    /// The `Strict-Transport-Security` value for an HTTPS request, if its host's policy sets one.
    fn hsts<B>(&self, req: &Request<B>) -> Option<HeaderValue> {
        let certs = self.tls.load();
        if !certs.any_hsts() {
            return None;
        }
        certs.hsts(&request_host(req)?)
    }

    /// The tables' view of `host`: its app, this node's route and (unless the request is a hop, or this
    /// node has no hop key) the other nodes that have it. `None`: no app is served at `host`.
    fn lookup(&self, host: &str, hop: bool) -> Option<Lookup> {
        let local = self.table.load().hosts.get(host).cloned();
        let known = self.cluster.load().hosts.get(host).cloned();
        let app = match (&local, &known) {
            (Some(l), _) => l.app.clone(),
            (None, Some(r)) => r.app.clone(),
            (None, None) => return None,
        };
        // A hop is served here or not at all: never forwarded again. Without a hop key nothing is
        // forwarded either (the next node could not tell a hop from a client, and might send it back).
        let remote = if hop || self.hop_key.load().is_none() {
            None
        } else {
            known
        };
        Some(Lookup { app, local, remote })
    }

    /// Where the request's answer comes from, and the answer.
    async fn route(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> (Response<ProxyBody>, Route) {
        let Some(host) = request_host(&req) else {
            return (
                own_answer(
                    StatusCode::BAD_REQUEST,
                    "cairn: the request names no host\n".into(),
                ),
                Route::None,
            );
        };
        let raw_host = match req.headers().get(header::HOST) {
            Some(h) => h.clone(),
            None => match req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                Some(h) => {
                    // HTTP/2 names the host in :authority; the replica (HTTP/1.1) needs a Host header.
                    req.headers_mut().insert(header::HOST, h.clone());
                    h
                }
                None => {
                    return (
                        own_answer(
                            StatusCode::BAD_REQUEST,
                            "cairn: the request names no host\n".into(),
                        ),
                        Route::None,
                    );
                }
            },
        };
        let edge = Origin {
            client: peer.ip(),
            https: scheme == "https",
            host: raw_host,
        };
        let hop = req.headers().contains_key(HOP_HEADER);
        let origin = if hop {
            if let Err(reason) = self.check_hop(req.headers(), peer) {
                self.metrics.refused_hop();
                tracing::warn!(peer = %peer.ip(), host = %host, reason, "refused a request marked as an internal hop");
                return (
                    own_answer(
                        StatusCode::FORBIDDEN,
                        "cairn: this request is marked as forwarded by another node, and is not authenticated\n"
                            .into(),
                    ),
                    Route::None,
                );
            }
            Origin::from_hop(req.headers(), edge)
        } else {
            edge
        };

        // Subscribed before the first look at the tables: a change after that look ends a wait.
        let mut changes = self.changes.subscribe();
        let Some(mut lookup) = self.lookup(&host, hop) else {
            if hop {
                return (hop_miss(&format!("no app at `{host}`")), Route::Hop);
            }
            return (
                own_answer(
                    StatusCode::NOT_FOUND,
                    format!("cairn: no app is served at `{host}`\n"),
                ),
                Route::None,
            );
        };

        let upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
        let mut client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        headers::set_forwarded(&mut parts.headers, &origin);
        // Each hop answers `Expect: 100-continue` itself (hyper sends the `100` when the body is first
        // read, which is when the next hop asks for it); towards another node it is set again.
        parts.headers.remove(header::EXPECT);

        let flag = CutFlag::default();
        let mut limit = None;
        let payload = if body.is_end_stream() {
            Payload::Empty
        } else {
            limit = self
                .cluster
                .load()
                .apps
                .get(&lookup.app)
                .and_then(|r| r.max_body_bytes)
                .or(self.cfg.max_body_bytes);
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let (Some(limit), Some(len)) = (limit, declared)
                && len > limit
            {
                return (too_large(&lookup.app, limit), Route::None);
            }
            let body = Limited::new(body, limit, self.cfg.body_idle_timeout, flag.clone());
            Payload::Body(Replayable::new(body.boxed()))
        };

        let mut waiting: Option<(Instant, tokio::time::Instant)> = None;
        loop {
            match self
                .attempt(&parts, &host, &lookup, hop, &payload, client_upgrade.take())
                .await
            {
                Attempted::Done(sent, route) => {
                    if let Some((since, _)) = waiting {
                        self.metrics
                            .pending(PendingOutcome::Served, since.elapsed());
                    }
                    let res = match (sent, flag.get()) {
                        (Err(_), Some(Cut::TooLarge)) => too_large(&lookup.app, limit.unwrap_or(0)),
                        (Err(_), Some(Cut::Idle)) => own_answer(
                            StatusCode::REQUEST_TIMEOUT,
                            "cairn: the request body stopped arriving\n".into(),
                        ),
                        (sent, _) => answer(sent, &lookup.app),
                    };
                    return (res, route);
                }
                Attempted::Nowhere(up) => client_upgrade = up,
            }
            if hop {
                // The first node tries another node, or waits for a route itself.
                return (
                    hop_miss(&format!("no healthy replica of app `{}`", lookup.app)),
                    Route::Hop,
                );
            }
            if !payload.replayable() {
                return (
                    own_answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "cairn: app `{}` had no healthy replica on the node the request went to, \
                             and its body cannot be sent again\n",
                            lookup.app
                        ),
                    ),
                    Route::Forwarded,
                );
            }
            let timeout = self.cfg.pending_timeout;
            if timeout.is_zero() {
                return (no_replica_anywhere(&lookup.app, None), Route::None);
            }
            if waiting.is_none() {
                tracing::debug!(app = %lookup.app, timeout = ?timeout, "no node can serve the request: waiting for a route");
            }
            let (since, deadline) = *waiting
                .get_or_insert_with(|| (Instant::now(), tokio::time::Instant::now() + timeout));
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // Timed out (or the proxy is gone, which cannot happen while it serves).
                _ => {
                    self.metrics
                        .pending(PendingOutcome::TimedOut, since.elapsed());
                    return (no_replica_anywhere(&lookup.app, Some(timeout)), Route::None);
                }
            }
            match self.lookup(&host, hop) {
                Some(l) => lookup = l,
                None => {
                    self.metrics
                        .pending(PendingOutcome::Served, since.elapsed());
                    return (
                        own_answer(
                            StatusCode::NOT_FOUND,
                            format!("cairn: no app is served at `{host}`\n"),
                        ),
                        Route::None,
                    );
                }
            }
        }
    }

    /// One pass over the request's targets: this node's replicas (a refused connection is retried on a
    /// fresh table, the moment between a switch and the old replica going away), then each other node that
    /// has the app, in turn, past those that refuse the connection or miss. `Nowhere` when none answered.
    async fn attempt(
        &self,
        parts: &hyper::http::request::Parts,
        host: &str,
        lookup: &Lookup,
        hop: bool,
        payload: &Payload,
        mut client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Attempted {
        let here = if hop { Route::Hop } else { Route::Local };
        let mut local = lookup.local.clone();
        let mut retries = 0;
        while let Some(backend) = local.as_ref().and_then(|l| l.pick()) {
            let target = Target::Local(backend);
            let Some((body, gate)) = payload.attempt(&target) else {
                break;
            };
            let req = self.outbound(parts, &target, body, gate.is_some());
            match self.send(req, target, client_upgrade.take(), gate).await {
                Err((Upstream::Connect, up)) if retries < self.cfg.connect_retries => {
                    client_upgrade = up;
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    local = self.table.load().hosts.get(host).cloned();
                }
                Err((Upstream::Connect, up)) => {
                    client_upgrade = up;
                    break;
                }
                sent => return Attempted::Done(sent.map_err(|(e, _)| e), here),
            }
        }
        for node in lookup.remote.iter().flat_map(|r| r.order()) {
            let target = Target::Node(node);
            let Some((body, gate)) = payload.attempt(&target) else {
                break;
            };
            let req = self.outbound(parts, &target, body, gate.is_some());
            match self.send(req, target, client_upgrade.take(), gate).await {
                Err((Upstream::Connect, up)) => {
                    tracing::debug!(node = %node, app = %lookup.app, "another node refused a forwarded request; trying the next");
                    self.metrics.unserved_forward(UnservedReason::Refused);
                    client_upgrade = up;
                }
                Err((Upstream::Miss, up)) => {
                    tracing::debug!(node = %node, app = %lookup.app, "another node has no replica any more; trying the next");
                    self.metrics.unserved_forward(UnservedReason::Miss);
                    client_upgrade = up;
                }
                // The node went away mid-request (killed, its connection reset) before any answer: an
                // idempotent request may be sent again (RFC 9110, 9.2.2), to the next node or, after a
                // wait, to wherever the replica moves.
                Err((Upstream::Failed, up)) if parts.method.is_idempotent() => {
                    tracing::debug!(node = %node, app = %lookup.app, "the connection to another node failed before an answer; trying the next");
                    self.metrics.unserved_forward(UnservedReason::Lost);
                    client_upgrade = up;
                }
                sent => return Attempted::Done(sent.map_err(|(e, _)| e), Route::Forwarded),
            }
        }
        Attempted::Nowhere(client_upgrade)
    }

    /// The request to send to `target`: the original's method, path, query and headers (already
    /// cleaned), with the hop key towards another node, and `Expect: 100-continue` when its body waits
    /// for that node to ask for it.
    fn outbound(
        &self,
        parts: &hyper::http::request::Parts,
        target: &Target,
        body: ProxyBody,
        expect: bool,
    ) -> Request<ProxyBody> {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri: Uri = format!("http://{}{pq}", target.addr())
            .parse()
            .unwrap_or_else(|_| Uri::from_static("http://127.0.0.1/"));
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers.clone();
        if let Target::Node(_) = target
            && let Some(key) = self.hop_key.load().as_ref()
        {
            req.headers_mut().insert(HOP_HEADER, key.header());
        }
        if expect {
            req.headers_mut()
                .insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        }
        req
    }

    /// Sends `req` to `target`; on a `101` joins the client's upgraded connection to the target's. A
    /// refused connection, or another node's miss, gives the client's upgrade back for the next attempt.
    /// `gate` holds the body back until the target's `100 Continue` (or its answer, unless a miss).
    async fn send(
        &self,
        mut req: Request<ProxyBody>,
        target: Target,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        gate: Option<Gate>,
    ) -> Result<Response<ProxyBody>, (Upstream, Option<hyper::upgrade::OnUpgrade>)> {
        let (guard, client) = match &target {
            Target::Local(b) => (Some(InFlight::new(b.clone())), &self.client),
            Target::Node(_) => (None, &self.forward),
        };
        if let Some(gate) = &gate {
            let gate = gate.clone();
            hyper::ext::on_informational(&mut req, move |res| {
                if res.status() == StatusCode::CONTINUE {
                    gate.open();
                }
            });
        }
        let shut = || {
            if let Some(g) = &gate {
                g.shut();
            }
        };
        let started = Instant::now();
        let res = match tokio::time::timeout(self.cfg.response_timeout, client.request(req)).await {
            Err(_) => {
                shut();
                return Err((Upstream::Timeout, None));
            }
            Ok(Err(e)) if e.is_connect() => return Err((Upstream::Connect, client_upgrade)),
            Ok(Err(_)) => {
                shut();
                // No answer came, so the client's upgrade was not used: it goes back for a retry.
                return Err((Upstream::Failed, client_upgrade));
            }
            Ok(Ok(res)) => res,
        };
        let (mut parts, body) = res.into_parts();
        if let Target::Node(_) = target {
            self.metrics.forwarded(started.elapsed());
            if parts.status == StatusCode::SERVICE_UNAVAILABLE
                && parts.headers.contains_key(HOP_MISS_HEADER)
            {
                shut();
                return Err((Upstream::Miss, client_upgrade));
            }
        }
        if let Some(g) = &gate {
            // An answer without asking for the body: the node may still read it.
            g.open();
        }
        // Only this proxy marks a miss, and only towards the node that forwarded the request.
        parts.headers.remove(HOP_MISS_HEADER);
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        if switching && let Some(client) = client_upgrade {
            headers::strip_hop_by_hop(&mut parts.headers, true);
            let mut res = Response::from_parts(parts, body);
            let upstream = hyper::upgrade::on(&mut res);
            tokio::spawn(tunnel::run(
                client,
                upstream,
                self.cfg.upgrade_idle_timeout,
                self.metrics.websockets().clone(),
            ));
            let (parts, _) = res.into_parts();
            return Ok(Response::from_parts(
                parts,
                Empty::new().map_err(|n| match n {}).boxed(),
            ));
        }
        if switching {
            // A 101 to a request that asked for no upgrade: nothing sane to pass on.
            return Err((Upstream::Failed, None));
        }
        headers::strip_hop_by_hop(&mut parts.headers, false);
        let body = Tracked {
            inner: body.map_err(BoxError::from).boxed(),
            _guard: guard,
        };
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

enum Upstream {
    /// The connection was refused (nothing was sent).
    Connect,
    /// Another node answered that it cannot serve the request ([`HOP_MISS_HEADER`]).
    Miss,
    Failed,
    Timeout,
}

/// What a pass over the request's targets came to.
enum Attempted {
    /// An answer (or a failure to get one) from `Route`.
    Done(Result<Response<ProxyBody>, Upstream>, Route),
    /// No target, or every one refused or missed: the client's upgrade, for the next pass.
    Nowhere(Option<hyper::upgrade::OnUpgrade>),
}

/// What a request's host found in the tables.
struct Lookup {
    app: Name,
    local: Option<Arc<AppRoute>>,
    remote: Option<Arc<RemoteRoute>>,
}

/// A request's body, for as many attempts as may send it.
enum Payload {
    Empty,
    Body(Replayable),
}

impl Payload {
    /// The body for the next attempt, and for one `towards` another node the gate that holds it back
    /// until that node asks for it; `None` once an attempt has started reading it.
    fn attempt(&self, towards: &Target) -> Option<(ProxyBody, Option<Gate>)> {
        match self {
            Payload::Empty => Some((Empty::new().map_err(|n| match n {}).boxed(), None)),
            Payload::Body(b) => {
                let gate = matches!(towards, Target::Node(_)).then(Gate::default);
                Some((b.attempt(gate.clone())?, gate))
            }
        }
    }

    /// Whether another attempt could send it.
    fn replayable(&self) -> bool {
        match self {
            Payload::Empty => true,
            Payload::Body(b) => b.untouched(),
        }
    }
}

fn answer(r: Result<Response<ProxyBody>, Upstream>, app: &Name) -> Response<ProxyBody> {
    match r {
        Ok(res) => res,
        Err(Upstream::Connect | Upstream::Miss) => no_replica_anywhere(app, None),
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

/// A node's answer to an internal hop it cannot serve: 503, marked so the forwarding node tries
/// elsewhere.
fn hop_miss(what: &str) -> Response<ProxyBody> {
    let mut res = own_answer(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cairn: this node has {what}\n"),
    );
    res.headers_mut()
        .insert(HOP_MISS_HEADER, HeaderValue::from_static("1"));
    res
}

/// 503: no node could serve the app (after waiting `waited` for one to).
fn no_replica_anywhere(app: &Name, waited: Option<Duration>) -> Response<ProxyBody> {
    let text = match waited {
        Some(w) => format!(
            "cairn: app `{app}` has no healthy replica anywhere (waited {} for one)\n",
            humantime::format_duration(w)
        ),
        None => format!("cairn: app `{app}` has no healthy replica anywhere\n"),
    };
    own_answer(StatusCode::SERVICE_UNAVAILABLE, text)
}

fn too_large(app: &Name, limit: u64) -> Response<ProxyBody> {
    let mut res = own_answer(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("cairn: the request body is larger than app `{app}` accepts ({limit} bytes)\n"),
    );
    // The rest of the body is not read: the connection cannot be reused.
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
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

/// The request's host, lowercased, without port or trailing dot.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())?;
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

/// An error with its sources, for a log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
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
