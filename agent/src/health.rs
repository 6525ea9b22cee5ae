//! The HTTP health check a new replica must pass before the proxy sends it traffic.
//!
//! A probe is one `GET <path>` straight to the replica's address (not through the proxy), bounded by the
//! spec's timeout; a 2xx or 3xx answer passes. A replica gets `attempts` probes with a short pause between
//! them, so every wait is bounded.
//!
//! What it must not do: follow redirects, send traffic anywhere but the replica's loopback address, or
//! wait without a bound.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::spec::HealthSpec;

/// The pause between two probes.
pub const PROBE_PAUSE: Duration = Duration::from_millis(200);

/// Why a replica is not healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    #[error(
        "GET {path} did not pass in {attempts} attempt(s) over {elapsed:?}; the last one: {last}"
    )]
    Failed {
        path: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("{why} while waiting for GET {path} to pass (the last probe: {last})")]
    Died {
        path: String,
        why: String,
        last: String,
    },
}

/// One probe: the HTTP status, or why there is none.
/// `host` is sent as the `Host` header (the app's first hostname), since apps may refuse unknown hosts.
pub async fn probe(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<u16, String> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {addr} failed: {e}"))?;
        let conn = tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "cairn-agent/health")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad health path: {e}"))?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("no HTTP answer from {addr}: {e}"));
        conn.abort();
        Ok(res?.status().as_u16())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Whether one probe passes (2xx or 3xx).
pub async fn passes(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> bool {
    matches!(probe(addr, host, path, timeout).await, Ok(s) if (200..400).contains(&s))
}

/// The `Host` a probe sends for an app without hostnames.
pub const DEFAULT_HOST: &str = "localhost";

/// Probes until a probe passes, `spec.attempts` probes failed, or `died` reports that the replica will not
/// come up (it is asked after each failed probe).
pub async fn wait_healthy<F, Fut>(
    addr: SocketAddr,
    host: &str,
    spec: &HealthSpec,
    died: F,
) -> Result<(), HealthError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let start = Instant::now();
    let timeout = Duration::from_millis(spec.timeout_ms);
    let mut last = String::from("no probe yet");
    for attempt in 1..=spec.attempts {
        match probe(addr, host, &spec.path, timeout).await {
            Ok(status) if (200..400).contains(&status) => return Ok(()),
            Ok(status) => last = format!("HTTP {status}"),
            Err(e) => last = e,
        }
        if let Some(why) = died().await {
            return Err(HealthError::Died {
                path: spec.path.clone(),
                why,
                last,
            });
        }
        if attempt < spec.attempts {
            tokio::time::sleep(PROBE_PAUSE).await;
        }
    }
    Err(HealthError::Failed {
        path: spec.path.clone(),
        attempts: spec.attempts,
        elapsed: start.elapsed(),
        last,
    })
}
