//! The HTTP health check a new replica must pass before the proxy sends it traffic.
//!
//! A probe is one `GET <path>` straight to the replica's address (not through the proxy), bounded by the
//! spec's timeout; a 2xx or 3xx answer passes. A replica gets `attempts` probes' worth of waiting: the
//! pauses between probes start at [`FIRST_PAUSE`] and double up to [`PROBE_PAUSE`], and probing ends
//! when the pauses add up to `attempts - 1` full pauses. An app that answers 60 ms after its start is
//! seen at about 75 ms instead of 200 ms, and a slow one gets as long as it always did.
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

/// The longest pause between two probes; the wait budget is `attempts - 1` of them.
pub const PROBE_PAUSE: Duration = Duration::from_millis(200);

/// The pause after the first failed probe; each next pause doubles, up to [`PROBE_PAUSE`].
pub const FIRST_PAUSE: Duration = Duration::from_millis(25);

/// The pauses between probes for a spec of `attempts`: doubling from [`FIRST_PAUSE`] to [`PROBE_PAUSE`],
/// adding up to exactly `attempts - 1` full pauses (the last one shortened to fit).
pub fn pauses(attempts: u32) -> impl Iterator<Item = Duration> {
    let mut left = PROBE_PAUSE * attempts.saturating_sub(1);
    let mut next = FIRST_PAUSE;
    std::iter::from_fn(move || {
        if left.is_zero() {
            return None;
        }
        let pause = next.min(left);
        left -= pause;
        next = (next * 2).min(PROBE_PAUSE);
        Some(pause)
    })
}

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
    let mut last;
    let mut pauses = pauses(spec.attempts);
    let mut probes = 0;
    loop {
        probes += 1;
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
        match pauses.next() {
            Some(pause) => tokio::time::sleep(pause).await,
            None => break,
        }
    }
    Err(HealthError::Failed {
        path: spec.path.clone(),
        attempts: probes,
        elapsed: start.elapsed(),
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_ramp_up_and_add_up_to_the_old_budget() {
        let ms = |attempts| pauses(attempts).map(|p| p.as_millis()).collect::<Vec<_>>();
        assert_eq!(
            ms(1),
            Vec::<u128>::new(),
            "one attempt: one probe, no pause"
        );
        assert_eq!(ms(2), [25, 50, 100, 25]);
        assert_eq!(ms(4), [25, 50, 100, 200, 200, 25]);
        for attempts in 0..50 {
            let total: Duration = pauses(attempts).sum();
            assert_eq!(
                total,
                PROBE_PAUSE * attempts.saturating_sub(1),
                "{attempts}"
            );
        }
    }
}
