//! The bounded HTTP/1.1 listener `cairn serve` runs its router on (the main listener and
//! `--metrics-listen`), instead of `axum::serve`, which has no timeouts and no connection cap.
//!
//! - **Connections are capped** below the process's file-descriptor limit ([`raise_fd_limit`] raises the
//!   soft limit to the hard one first; [`connection_cap`] keeps a reserve for the database pools, git and
//!   files). At the cap the listener stops accepting: new connections wait in the kernel's backlog until
//!   one closes, so the process never hits `EMFILE` and keeps its descriptors for its own work.
//! - **Header-read and idle timeout**: a connection must deliver a request's complete headers within
//!   [`Bounds::header_timeout`] of connecting or of its previous response (hyper's
//!   `header_read_timeout`, which in the hyper this builds with, 1.12, also runs while a kept-alive
//!   connection waits for its next request), else it is closed. This bounds idle keep-alive
//!   connections and slowloris headers alike. Because it is also the idle timeout, it must be longer
//!   than the agents' heartbeat interval ([`idle_timeout_for`]): equal to it, every heartbeat raced
//!   the close of its own connection and most opened a new one through the listen queue; at 10,000
//!   agents that queue overflowed and a dropped handshake waited out TCP's 1 s retransmission, the
//!   heartbeat p99 stall of issue 16.
//! - **Header size**: at most [`Bounds::max_header_bytes`] (431 beyond).
//! - **Slow bodies**: a request body not received whole within [`Bounds::body_timeout`] of the request's
//!   start fails to read, which the handlers answer 400 (or 413 when too large).
//!
//! Each request carries the peer's `ConnectInfo<SocketAddr>`, as `axum::serve`'s
//! `into_make_service_with_connect_info` gave it.
//!
//! What it must not do: accept past the cap, spin on a failing `accept`, or wait for ever at shutdown
//! (connections get [`Bounds::shutdown_grace`] to finish).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
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
    let shutdown = shutdown.wait();
    let permits = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut warned_full: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
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
            () = &mut shutdown => break,
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
            () = &mut shutdown => break,
        };
        // Answers (a long-poll handing out a task) leave at once, not after a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let body_timeout = bounds.body_timeout;
        let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut req = req.map(|b| Body::new(Deadline::new(b, body_timeout)));
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(bounds.header_timeout)
            .max_buf_size(bounds.max_header_bytes.max(8192))
            .serve_connection(TokioIo::new(tcp), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(bounds.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after the shutdown grace: dropped");
    }
    Ok(())
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
