//! The bounded HTTP listener `cairn serve` runs its router on (the main listener and `--metrics-listen`),
//! instead of `axum::serve`, which has no timeouts and no connection cap. It speaks HTTP/1.1, and HTTP/2
//! to a client that opens with HTTP/2's preface (h2c by prior knowledge): agents then multiplex their
//! long-poll, heartbeats and results over one connection instead of two or more.
//!
//! - **Connections are capped** below the process's file-descriptor limit ([`raise_fd_limit`] raises the
//!   soft limit to the hard one first; [`connection_cap`] keeps a reserve for the database pools, git and
//!   files). At the cap the listener stops accepting: new connections wait in the kernel's backlog until
//!   one closes, so the process never hits `EMFILE` and keeps its descriptors for its own work.
//! - **Idle timeout** ([`Bounds::header_timeout`]): a connection with no request in flight (from its
//!   headers to the end of its response body, so a server-sent event stream or a long-poll counts) for
//!   that long is closed, gracefully (HTTP/2's GOAWAY), and dropped if that takes longer than
//!   [`IDLE_CLOSE_GRACE`]. This bounds idle keep-alive connections, connections that never send a whole
//!   request (the preface alone, slowloris headers of either version) and half-open ones alike. On
//!   HTTP/1.1, hyper's `header_read_timeout` also closes a connection whose request's headers are not
//!   complete in that time. It must be longer than the agents' heartbeat interval ([`idle_timeout_for`]):
//!   equal to it, every HTTP/1.1 heartbeat raced the close of its own connection and most opened a new
//!   one through the listen queue; at 10,000 agents that queue overflowed and a dropped handshake waited
//!   out TCP's 1 s retransmission, the heartbeat p99 stall of issue 16.
//! - **Header size**: at most [`Bounds::max_header_bytes`] (431 beyond on HTTP/1.1; HTTP/2's
//!   `SETTINGS_MAX_HEADER_LIST_SIZE`). At most [`MAX_STREAMS`] requests at once on one HTTP/2 connection.
//! - **Slow bodies**: a request body not received whole within [`Bounds::body_timeout`] of the request's
//!   start fails to read, which the handlers answer 400 (or 413 when too large).
//!
//! Each request carries the peer's `ConnectInfo<SocketAddr>`, as `axum::serve`'s
//! `into_make_service_with_connect_info` gave it.
//!
//! What it must not do: accept past the cap, spin on a failing `accept`, or wait for ever at shutdown
//! (connections get [`Bounds::shutdown_grace`] to finish).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

use crate::worker::Shutdown;

/// File descriptors kept for everything but client connections: the database pools and the LISTEN
/// connection, git, config and cache files, the metrics listener.
pub const RESERVED_FDS: u64 = 128;

/// What one listener allows.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Complete request headers must arrive within this of connecting or of the previous response
    /// (also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// A request's body must arrive whole within this of the request's start.
    pub body_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Bytes of request line and headers at most.
    pub max_header_bytes: usize,
    /// How long connections may finish after shutdown.
    pub shutdown_grace: Duration,
}

impl Bounds {
    /// Defaults for a process whose descriptor limit is `fd_limit`.
    pub fn new(fd_limit: u64) -> Bounds {
        Bounds {
            header_timeout: idle_timeout_for(super::DEFAULT_HEARTBEAT_INTERVAL),
            body_timeout: Duration::from_secs(60),
            max_connections: connection_cap(fd_limit),
            max_header_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The header-read and idle timeout for agents that heartbeat every `heartbeat`: 75 s (nginx's
/// keep-alive default), or twice the interval and 15 s more when that is longer, so an agent's
/// connection stays open from one heartbeat to the next, even one a little late.
pub fn idle_timeout_for(heartbeat: Duration) -> Duration {
    (heartbeat * 2 + Duration::from_secs(15)).max(Duration::from_secs(75))
}

/// How many client connections a process with `fd_limit` descriptors may hold: three quarters of what
/// is left after [`RESERVED_FDS`], at least 16.
pub fn connection_cap(fd_limit: u64) -> usize {
    let usable = fd_limit.saturating_sub(RESERVED_FDS) / 4 * 3;
    usize::try_from(usable)
        .unwrap_or(usize::MAX)
        .clamp(16, 1 << 20)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit in force afterwards
/// (`u64::MAX` when unlimited). Failing to raise it is not fatal: the cap is computed from what holds.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
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

/// Serves `app` on `listener` within `bounds` until `shutdown` is triggered, then lets open connections
/// finish for at most [`Bounds::shutdown_grace`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    bounds: Bounds,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let stopped = shutdown.wait();
    let max = bounds.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let builder = Arc::new(builder(&bounds));
    let mut warned_full: Option<tokio::time::Instant> = None;
    tokio::pin!(stopped);
    loop {
        if permits.available_permits() == 0
            && warned_full.is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            warned_full = Some(tokio::time::Instant::now());
            tracing::warn!(
                max = bounds.max_connections,
                "the HTTP listener is at its connection cap: new connections wait"
            );
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut stopped => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors after all (another part of the process) and the like: do not spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        // Answers (a long-poll handing out a task) leave at once, not after a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let svc = service(app.clone(), peer, bounds.body_timeout, activity.clone());
        let builder = builder.clone();
        // Triggered, it shuts this connection down gracefully.
        let stop = shutdown.wait();
        let idle_timeout = bounds.header_timeout;
        let shutdown_grace = bounds.shutdown_grace;
        tokio::spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn, stop);
            // Once asked to close: by when it must have (an HTTP/2 peer that never answers the
            // graceful shutdown's ping would otherwise hold it open).
            let mut closing_by: Option<tokio::time::Instant> = None;
            loop {
                let deadline = closing_by.unwrap_or_else(tokio::time::Instant::now);
                tokio::select! {
                    ended = conn.as_mut() => {
                        if let Err(e) = ended {
                            tracing::debug!(error = %e, %peer, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    () = &mut stop, if closing_by.is_none() => {
                        conn.as_mut().graceful_shutdown();
                        closing_by = Some(tokio::time::Instant::now() + shutdown_grace);
                    }
                    () = activity.idle_for(idle_timeout), if closing_by.is_none() => {
                        conn.as_mut().graceful_shutdown();
                        // Nothing is in flight: what is left is the close itself.
                        closing_by = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                    }
                    () = tokio::time::sleep_until(deadline), if closing_by.is_some() => {
                        tracing::debug!(%peer, "HTTP connection did not close in time: dropped");
                        break;
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    // Every connection holds a permit until it ends: all of them back means all connections ended.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(bounds.shutdown_grace, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after the shutdown grace: dropped");
    }
    Ok(())
}

/// The connection builder: HTTP/1.1, or HTTP/2 when the client opens with its preface (h2c by prior
/// knowledge; agents multiplex their long-poll, heartbeats and results over one connection).
///
/// HTTP/1.1 gets hyper's header-read timeout; both get the idle timeout of [`Activity`], which also
/// closes a connection that never sends a whole request (hyper's own timeout starts only once the
/// version is known, and HTTP/2 has none).
fn builder(bounds: &Bounds) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_timeout)
        .max_buf_size(bounds.max_header_bytes.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(bounds.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_STREAMS);
    b
}

/// How long an idle connection asked to close may take to (HTTP/2's GOAWAY and its ping round trip).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Requests in flight at once on one HTTP/2 connection: an agent has at most a long-poll, a heartbeat,
/// a result, progress and output batches out together.
pub const MAX_STREAMS: u32 = 32;

/// The router as one connection's service: each request carries the peer's address, reads its body
/// within `body_timeout`, and counts in `activity` until its response body is done.
fn service(
    app: Router,
    peer: SocketAddr,
    body_timeout: Duration,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>>
             + Send
             + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let busy = Busy::start(activity.clone());
        let mut req = req.map(|b| Body::new(Deadline::new(b, body_timeout)));
        req.extensions_mut().insert(ConnectInfo(peer));
        let answer = app.clone().oneshot(req);
        async move {
            let res = answer.await?;
            Ok(res.map(|b| {
                Body::new(Counted {
                    inner: b,
                    _busy: busy,
                })
            }))
        }
    })
}

/// When one connection last had nothing in flight, for its idle timeout.
struct Activity {
    /// Requests whose response body is not yet done.
    in_flight: AtomicUsize,
    /// When `in_flight` last fell to zero (or the connection opened).
    idle_since: std::sync::Mutex<tokio::time::Instant>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    fn idle_since(&self) -> tokio::time::Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once nothing has been in flight for `timeout`. It checks when the last idle spell
    /// would end, and again a timeout later while requests are in flight.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let at = if self.in_flight.load(Ordering::Acquire) == 0 {
                let at = self.idle_since() + timeout;
                if at <= tokio::time::Instant::now() && self.in_flight.load(Ordering::Acquire) == 0
                {
                    return;
                }
                at
            } else {
                tokio::time::Instant::now() + timeout
            };
            tokio::time::sleep_until(at).await;
        }
    }
}

/// One request in flight on a connection, from its headers to the end of its response body.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Busy {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) =
                tokio::time::Instant::now();
        }
    }
}

/// A response body that keeps its request counted as in flight until it is done or dropped (a server-
/// sent event stream is busy for as long as it streams).
struct Counted {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails once its deadline passes.
struct Deadline<B> {
    inner: B,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<B> Deadline<B> {
    fn new(inner: B, within: Duration) -> Self {
        Deadline {
            inner,
            sleep: Box::pin(tokio::time::sleep(within)),
        }
    }
}

/// The request body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received in time")]
pub struct BodyTimeout;

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyTimeout.into())));
        }
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_connection_outlives_the_pause_between_its_heartbeats() {
        assert_eq!(
            idle_timeout_for(Duration::from_secs(30)),
            Duration::from_secs(75)
        );
        assert_eq!(
            idle_timeout_for(Duration::from_secs(60)),
            Duration::from_secs(135)
        );
        for s in [1u64, 10, 30, 45, 90, 600] {
            let heartbeat = Duration::from_secs(s);
            assert!(idle_timeout_for(heartbeat) > heartbeat * 2, "{s} s");
        }
        assert_eq!(
            Bounds::new(1024).header_timeout,
            idle_timeout_for(super::super::DEFAULT_HEARTBEAT_INTERVAL)
        );
    }

    #[test]
    fn the_connection_cap_stays_below_the_descriptor_limit() {
        assert_eq!(connection_cap(1024), 672);
        assert_eq!(connection_cap(20_000), 14_904);
        assert_eq!(connection_cap(100), 16);
        assert!(connection_cap(u64::MAX) <= 1 << 20);
        for limit in [256u64, 1024, 4096, 65_536] {
            assert!((connection_cap(limit) as u64) + RESERVED_FDS < limit);
        }
    }
}
