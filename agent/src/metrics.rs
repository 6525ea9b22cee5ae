//! What the node proxy counts and times, and `cairn-agent --metrics-listen`'s `/metrics` endpoint that
//! serves it in the OpenMetrics text format (which Prometheus scrapes natively).
//!
//! One [`ProxyMetrics`] per [`crate::Proxy`] (tests run several proxies in one process, so it is not
//! process-wide); the proxy records into it where things happen, and its own counts
//! ([`crate::proxy::ProxyCounts`]) are read from here, so there is one place counting.
//!
//! | series | type | labels | what |
//! |---|---|---|---|
//! | `cairn_proxy_requests_total` | counter | `route`, `class` | answers, by where they came from (`route`: local, this node's replica for its own client; forwarded, another node's proxy; hop, a request another node forwarded here, served or missed; none, the proxy's own answer without reaching anyone: 400, 403, 404, 413 up front, 503 after the pending wait) and status `class` (1xx, an upgrade, to 5xx) |
//! | `cairn_proxy_forward_duration_seconds` | histogram | | from sending a request to another node's proxy to its response head |
//! | `cairn_proxy_unserved_forwards_total` | counter | `reason` | forwards another node could not serve (`reason`: refused, the connection; miss, it had no replica any more; lost, the connection failed before an answer, idempotent requests only); each went on to the next node or waited |
//! | `cairn_proxy_websockets` | gauge | | upgraded connections (WebSockets) open now |
//! | `cairn_proxy_pending_total` | counter | `outcome` | requests no node could serve that waited for the tables to change (`outcome`: served, the wait ended with an answer; timed_out, 503 after the pending timeout) |
//! | `cairn_proxy_pending_wait_seconds` | histogram | `outcome` | how long those requests waited |
//! | `cairn_proxy_refused_hops_total` | counter | | requests marked as an internal hop that were not authenticated (403) |
//! | `cairn_proxy_cluster_generation` | gauge | | the installed cluster table's generation (0: none) |
//! | `cairn_proxy_tls_handshakes_total` | counter | `outcome` | TLS handshakes on the HTTPS listener (`outcome`: ok; failed, for any reason, an unknown name among them) |
//! | `cairn_proxy_tls_unknown_names_total` | counter | | TLS handshakes refused because no certificate covers their SNI (or they sent none; or they offered only `acme-tls/1` for a name with no TLS-ALPN-01 challenge) |
//! | `cairn_proxy_tls_certificates` | gauge | | certificates installed and served |
//!
//! What it must not do: put an app, node or host name, an address or anything else unbounded in a label
//! (every label value is one of the fixed sets above), or serve anything but `GET /metrics`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrape connections served at once (more wait in the kernel's backlog).
const MAX_SCRAPERS: usize = 16;

/// Where a request's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A replica on this node, for a client of this node.
    Local,
    /// Another node's proxy.
    Forwarded,
    /// A replica on this node (or this node's miss), for a request another node forwarded.
    Hop,
    /// The proxy itself, without reaching a replica or another node.
    None,
}

impl Route {
    const ALL: [Route; 4] = [Route::Local, Route::Forwarded, Route::Hop, Route::None];

    fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Forwarded => "forwarded",
            Route::Hop => "hop",
            Route::None => "none",
        }
    }
}

/// Why another node could not serve a forwarded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnservedReason {
    /// The node refused the connection.
    Refused,
    /// The node answered that it has no replica of the app (any more).
    Miss,
    /// The connection failed before any answer (the node died mid-request); only idempotent requests
    /// are sent on to the next node.
    Lost,
}

impl UnservedReason {
    fn as_str(self) -> &'static str {
        match self {
            UnservedReason::Refused => "refused",
            UnservedReason::Miss => "miss",
            UnservedReason::Lost => "lost",
        }
    }
}

/// How a request that waited for a replica ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingOutcome {
    /// A route turned up within the pending timeout.
    Served,
    /// It did not: 503.
    TimedOut,
}

impl PendingOutcome {
    fn as_str(self) -> &'static str {
        match self {
            PendingOutcome::Served => "served",
            PendingOutcome::TimedOut => "timed_out",
        }
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn forward_buckets() -> Histogram {
    // 0.5 ms to 33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

fn pending_buckets() -> Histogram {
    // 10 ms to 41 s (the pending timeout is 10 s by default).
    Histogram::new(exponential_buckets(0.01, 2.0, 13))
}

/// One proxy's metrics and their registry.
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// The series of `requests`, by route and class index: a request is counted with one atomic add,
    /// not a lookup in the family's locked map.
    request_series: [[Counter; 5]; 4],
    forward_duration: Histogram,
    unserved_forwards: Family<ReasonLabel, Counter>,
    websockets: Gauge,
    pending: Family<OutcomeLabel, Counter>,
    pending_wait: Histograms<OutcomeLabel>,
    refused_hops: Counter,
    cluster_generation: Gauge,
    tls_handshakes: Family<OutcomeLabel, Counter>,
    tls_unknown_names: Counter,
    tls_certificates: Gauge,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics::new()
    }
}

impl ProxyMetrics {
    /// A fresh set, every series at zero.
    pub fn new() -> ProxyMetrics {
        let mut registry = Registry::with_prefix("cairn_proxy");
        let m = ProxyMetrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_series: Default::default(),
            forward_duration: forward_buckets(),
            unserved_forwards: Family::default(),
            websockets: Gauge::default(),
            pending: Family::default(),
            pending_wait: Family::new_with_constructor(pending_buckets),
            refused_hops: Counter::default(),
            cluster_generation: Gauge::default(),
            tls_handshakes: Family::default(),
            tls_unknown_names: Counter::default(),
            tls_certificates: Gauge::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by where the answer came from and its status class",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "forward_duration",
            "From sending a request to another node's proxy to its response head",
            Unit::Seconds,
            m.forward_duration.clone(),
        );
        registry.register(
            "unserved_forwards",
            "Requests another node could not serve (refused the connection, or had no replica any more); \
             each went on to the next node or waited for a route",
            m.unserved_forwards.clone(),
        );
        registry.register(
            "websockets",
            "Upgraded connections (WebSockets) open now",
            m.websockets.clone(),
        );
        registry.register(
            "pending",
            "Requests that found no replica anywhere and waited for one, by how the wait ended",
            m.pending.clone(),
        );
        registry.register_with_unit(
            "pending_wait",
            "How long requests waited for a replica, by how the wait ended",
            Unit::Seconds,
            m.pending_wait.clone(),
        );
        registry.register(
            "refused_hops",
            "Requests marked as an internal hop that were not authenticated (403)",
            m.refused_hops.clone(),
        );
        registry.register(
            "cluster_generation",
            "The installed cluster route table's generation (0: none installed)",
            m.cluster_generation.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the HTTPS listener, by outcome (failed includes unknown names)",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "tls_unknown_names",
            "TLS handshakes refused because no certificate covers their SNI, or they sent none",
            m.tls_unknown_names.clone(),
        );
        registry.register(
            "tls_certificates",
            "Certificates installed and served",
            m.tls_certificates.clone(),
        );
        m.zero();
        let request_series = Route::ALL.map(|route| {
            CLASSES.map(|class| {
                m.requests
                    .get_or_create(&RequestLabels {
                        route: route.as_str(),
                        class,
                    })
                    .clone()
            })
        });
        ProxyMetrics {
            registry,
            request_series,
            ..m
        }
    }

    /// Creates every series of the fixed label sets at zero, so a rate over one exists before its first
    /// event.
    fn zero(&self) {
        for route in Route::ALL {
            for class in CLASSES {
                drop(self.requests.get_or_create(&RequestLabels {
                    route: route.as_str(),
                    class,
                }));
            }
        }
        for reason in [
            UnservedReason::Refused,
            UnservedReason::Miss,
            UnservedReason::Lost,
        ] {
            drop(self.unserved_forwards.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        for outcome in [PendingOutcome::Served, PendingOutcome::TimedOut] {
            let l = OutcomeLabel {
                outcome: outcome.as_str(),
            };
            drop(self.pending.get_or_create(&l));
            drop(self.pending_wait.get_or_create(&l));
        }
        for outcome in ["ok", "failed"] {
            drop(self.tls_handshakes.get_or_create(&OutcomeLabel { outcome }));
        }
    }

    /// A request was answered with `status`, from `route`.
    pub fn request(&self, route: Route, status: StatusCode) {
        let class = match status.as_u16() {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.request_series[route as usize][class].inc();
    }

    /// Requests answered from `route` so far, whatever their status.
    pub fn requests(&self, route: Route) -> u64 {
        CLASSES
            .iter()
            .map(|class| {
                self.requests
                    .get_or_create(&RequestLabels {
                        route: route.as_str(),
                        class,
                    })
                    .get()
            })
            .sum()
    }

    /// Another node's proxy sent a response head `took` after the request went out.
    pub fn forwarded(&self, took: Duration) {
        self.forward_duration.observe(took.as_secs_f64());
    }

    /// Another node could not serve a forwarded request.
    pub fn unserved_forward(&self, reason: UnservedReason) {
        self.unserved_forwards
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Requests other nodes could not serve for `reason` so far.
    pub fn unserved_forwards(&self, reason: UnservedReason) -> u64 {
        self.unserved_forwards
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .get()
    }

    /// The gauge of open upgraded connections (the tunnels count themselves in and out).
    pub(crate) fn websockets(&self) -> &Gauge {
        &self.websockets
    }

    /// Upgraded connections open now.
    pub fn open_websockets(&self) -> u64 {
        u64::try_from(self.websockets.get()).unwrap_or(0)
    }

    /// A request that waited `waited` for a replica ended with `outcome`.
    pub fn pending(&self, outcome: PendingOutcome, waited: Duration) {
        let l = OutcomeLabel {
            outcome: outcome.as_str(),
        };
        self.pending.get_or_create(&l).inc();
        self.pending_wait
            .get_or_create(&l)
            .observe(waited.as_secs_f64());
    }

    /// Requests that waited and ended with `outcome` so far.
    pub fn pendings(&self, outcome: PendingOutcome) -> u64 {
        self.pending
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .get()
    }

    /// An unauthenticated internal hop was refused.
    pub fn refused_hop(&self) {
        self.refused_hops.inc();
    }

    /// Unauthenticated internal hops refused so far.
    pub fn refused_hops(&self) -> u64 {
        self.refused_hops.get()
    }

    /// A cluster table of `generation` was installed.
    pub fn cluster_installed(&self, generation: u64) {
        self.cluster_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// A TLS handshake ended, `ok` or not.
    pub fn tls_handshake(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.tls_handshakes
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// TLS handshakes that ended `ok` (or not) so far.
    pub fn tls_handshakes(&self, ok: bool) -> u64 {
        let outcome = if ok { "ok" } else { "failed" };
        self.tls_handshakes
            .get_or_create(&OutcomeLabel { outcome })
            .get()
    }

    /// A TLS handshake named no certificate's name.
    pub fn tls_unknown_name(&self) {
        self.tls_unknown_names.inc();
    }

    /// TLS handshakes refused for their name so far.
    pub fn tls_unknown_names(&self) -> u64 {
        self.tls_unknown_names.get()
    }

    /// `n` certificates are served now.
    pub fn tls_installed(&self, n: usize) {
        self.tls_certificates
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The exposition, every series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding into a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` from `metrics` on `listener` until `shutdown` completes. Unauthenticated: the
/// series carry counts and timings, never a name or an address. Bounded: [`MAX_SCRAPERS`] connections,
/// each sending its request headers within 10 s.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<ProxyMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Ok(()),
            },
            () = &mut shutdown => return Ok(()),
        };
        let (io, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let metrics = metrics.clone();
        let svc = hyper::service::service_fn(move |req| {
            let metrics = metrics.clone();
            async move { Ok::<_, std::convert::Infallible>(scrape(&req, &metrics)) }
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(io), svc);
            let _ = conn.await;
            drop(permit);
        });
    }
}

fn scrape(req: &Request<Incoming>, metrics: &ProxyMetrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, metrics.render()),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".to_owned(),
        ),
    };
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_show_up_with_fixed_labels_and_every_series_starts_at_zero() {
        let m = ProxyMetrics::new();
        m.request(Route::Local, StatusCode::OK);
        m.request(Route::Forwarded, StatusCode::SWITCHING_PROTOCOLS);
        m.request(Route::None, StatusCode::SERVICE_UNAVAILABLE);
        m.forwarded(Duration::from_millis(3));
        m.unserved_forward(UnservedReason::Miss);
        m.pending(PendingOutcome::Served, Duration::from_millis(300));
        m.cluster_installed(7);
        m.tls_handshake(false);
        m.tls_unknown_name();
        m.tls_installed(3);
        let text = m.render();
        for line in [
            "cairn_proxy_requests_total{route=\"local\",class=\"2xx\"} 1",
            "cairn_proxy_requests_total{route=\"forwarded\",class=\"1xx\"} 1",
            "cairn_proxy_requests_total{route=\"none\",class=\"5xx\"} 1",
            "cairn_proxy_requests_total{route=\"hop\",class=\"4xx\"} 0",
            "cairn_proxy_forward_duration_seconds_count 1",
            "cairn_proxy_unserved_forwards_total{reason=\"miss\"} 1",
            "cairn_proxy_unserved_forwards_total{reason=\"refused\"} 0",
            "cairn_proxy_pending_total{outcome=\"served\"} 1",
            "cairn_proxy_pending_total{outcome=\"timed_out\"} 0",
            "cairn_proxy_pending_wait_seconds_sum{outcome=\"served\"} 0.3",
            "cairn_proxy_websockets 0",
            "cairn_proxy_refused_hops_total 0",
            "cairn_proxy_cluster_generation 7",
            "cairn_proxy_tls_handshakes_total{outcome=\"ok\"} 0",
            "cairn_proxy_tls_handshakes_total{outcome=\"failed\"} 1",
            "cairn_proxy_tls_unknown_names_total 1",
            "cairn_proxy_tls_certificates 3",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert_eq!(m.requests(Route::Forwarded), 1);
    }
}
