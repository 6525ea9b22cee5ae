//! The agent's side of the agent API: one method per route of `/agent/v1` (see `cairn-proto`), over
//! reqwest with rustls.
//!
//! Several control planes (`--server` repeated or a comma list): calls go to one of them until it cannot
//! be reached (a refused connection, or a 502/503/504 such as a replica still starting), then to the
//! next, shared by every clone. A request is sent again to the next control plane only when it never
//! reached the first (the connection failed, or the answer was one of those refusals); a call that may
//! have been processed (a timeout mid-way) is not repeated here, and the next call goes elsewhere.
//!
//! **HTTP/2.** With `Http2::Auto` (the default) every call to a control plane goes over one connection
//! multiplexing the long-poll, heartbeats and results: over `https://` by ALPN, and over `http://` by
//! prior knowledge (h2c) once a probe (`GET /readyz`) has been answered that way; a control plane or a
//! proxy in front of it that does not speak h2c gets HTTP/1.1, decided once per URL. HTTP/1.1 needs two
//! connections per agent (the long-poll holds one), which is what a control plane's descriptors run out
//! of first at 10,000 nodes.
//!
//! What it must not do: decide anything (retries, backoff and what to do with a refusal are the agent
//! loop's, [`crate::node`]), or put the credential into an error or a `Debug` output.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use cairn_proto::routes::{RoutesQuery, RoutesResponse};
use cairn_proto::{
    AGENT_API, ErrorBody, Heartbeat, HeartbeatResponse, JoinRequest, JoinResponse, LeaseRequest,
    LeaseResponse, LogBatch, LogsResponse, Progress, ProgressResponse, Release, ResultResponse,
    TaskResult, TaskView,
};
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// 401: the credential (or join token) is missing, wrong or revoked.
    #[error("the control plane refused the credential: {0}")]
    Unauthorized(String),
    /// 409: the fencing token is not the task's current lease.
    #[error("the lease is no longer ours: {0}")]
    Stale(String),
    /// 404.
    #[error("not found: {0}")]
    NotFound(String),
    /// 429: wait this long.
    #[error("rate limited; retry in {0:?}")]
    TooMany(Duration),
    /// Any other refusal, with the control plane's message.
    #[error("the control plane answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
    #[error("cannot reach the control plane")]
    Transport(#[source] reqwest::Error),
    #[error("the control plane's answer is not what this agent expects")]
    Decode(#[source] serde_json::Error),
}

impl ClientError {
    /// Whether trying again later may help (the control plane is restarting, the network is down, or it
    /// asked us to slow down).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::TooMany(_) => true,
            ClientError::Refused { status, .. } => status.is_server_error(),
            _ => false,
        }
    }

    /// Whether the control plane refused the request itself as malformed (a 4xx other than 401, 404,
    /// 409 and 429): sending the same request again cannot succeed.
    pub fn is_malformed(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if status.is_client_error())
    }
}

/// Whether the agent speaks HTTP/2 to the control planes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Http2 {
    /// Over `https://` when ALPN agrees on it; over `http://` when the control plane answers h2c.
    #[default]
    Auto,
    /// HTTP/1.1 only (ALPN still offers HTTP/2 over `https://` unless this is set).
    Never,
}

/// What one control plane's URL was found to speak over plain http.
const UNKNOWN: u8 = 0;
const H2C: u8 = 1;
const HTTP1: u8 = 2;

/// How long the h2c probe may take before the URL is taken for HTTP/1.1 only.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of the control planes, as one node (once joined).
#[derive(Clone)]
pub struct Client {
    /// Each control plane's agent API base URL.
    bases: Arc<[String]>,
    /// Which of them calls go to now (shared by every clone).
    current: Arc<AtomicUsize>,
    /// Per base: [`UNKNOWN`], [`H2C`] or [`HTTP1`] (what a plain-http base speaks).
    protocols: Arc<[AtomicU8]>,
    credential: Option<String>,
    /// HTTP/1.1 over `http://`; over `https://`, HTTP/2 or HTTP/1.1 by ALPN.
    http: reqwest::Client,
    /// HTTP/2 by prior knowledge, for `http://` bases that answered it (none with [`Http2::Never`]).
    h2c: Option<reqwest::Client>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("bases", &self.bases)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The longest any call but a lease may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// A client of the control planes at `server` (`http://` or `https://` URLs, separated by commas),
    /// speaking HTTP/2 where they do.
    pub fn new(server: &str) -> Result<Self, ClientError> {
        Client::with_http2(server, Http2::Auto)
    }

    /// A client of the control planes at `server`, speaking HTTP/2 as `http2` says.
    pub fn with_http2(server: &str, http2: Http2) -> Result<Self, ClientError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                // Above the default heartbeat interval (30 s), so the heartbeat's connection is kept
                // from one to the next, and below serve's idle timeout (75 s by default), so the pool
                // drops a connection before serve closes it rather than racing its close.
                .pool_idle_timeout(Duration::from_secs(60))
        };
        let http = match http2 {
            Http2::Auto => builder(),
            Http2::Never => builder().http1_only(),
        }
        .build()
        .map_err(ClientError::Transport)?;
        let h2c = match http2 {
            Http2::Auto => Some(
                builder()
                    .http2_prior_knowledge()
                    .build()
                    .map_err(ClientError::Transport)?,
            ),
            Http2::Never => None,
        };
        let bases: Vec<String> = servers(server)
            .map(|s| format!("{}{AGENT_API}", s.trim_end_matches('/')))
            .collect();
        Ok(Client {
            protocols: bases.iter().map(|_| AtomicU8::new(UNKNOWN)).collect(),
            bases: bases.into(),
            current: Arc::default(),
            credential: None,
            http,
            h2c,
        })
    }

    /// The same client, authenticating as the node holding `credential`.
    pub fn with_credential(mut self, credential: String) -> Self {
        self.credential = Some(credential);
        self
    }

    pub async fn join(&self, req: &JoinRequest) -> Result<JoinResponse, ClientError> {
        self.post("/join", req, CALL_TIMEOUT).await
    }

    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatResponse, ClientError> {
        self.post("/heartbeat", hb, CALL_TIMEOUT).await
    }

    /// Waits up to `req.wait_ms` (plus slack for the network) for tasks.
    pub async fn lease(&self, req: &LeaseRequest) -> Result<LeaseResponse, ClientError> {
        let timeout = Duration::from_millis(req.wait_ms) + CALL_TIMEOUT;
        self.post("/lease", req, timeout).await
    }

    pub async fn task(&self, id: i64) -> Result<TaskView, ClientError> {
        self.send(
            |http, base| http.get(format!("{base}/tasks/{id}")),
            CALL_TIMEOUT,
        )
        .await
    }

    pub async fn progress(&self, id: i64, p: &Progress) -> Result<ProgressResponse, ClientError> {
        self.post(&format!("/tasks/{id}/progress"), p, CALL_TIMEOUT)
            .await
    }

    pub async fn logs(&self, id: i64, batch: &LogBatch) -> Result<LogsResponse, ClientError> {
        self.post(&format!("/tasks/{id}/logs"), batch, CALL_TIMEOUT)
            .await
    }

    /// Ships replica output (`POST /agent/v1/replica-logs`).
    pub async fn replica_logs(
        &self,
        batch: &cairn_proto::ReplicaLogBatch,
    ) -> Result<LogsResponse, ClientError> {
        self.post("/replica-logs", batch, CALL_TIMEOUT).await
    }

    pub async fn result(&self, id: i64, r: &TaskResult) -> Result<ResultResponse, ClientError> {
        self.post(&format!("/tasks/{id}/result"), r, CALL_TIMEOUT)
            .await
    }

    pub async fn release(&self, id: i64, token: i64) -> Result<ResultResponse, ClientError> {
        self.post(
            &format!("/tasks/{id}/release"),
            &Release { token },
            CALL_TIMEOUT,
        )
        .await
    }

    /// Long-polls the cluster route table (`GET /agent/v1/routes`): `None` when nothing changed within
    /// the wait.
    pub async fn routes(&self, q: &RoutesQuery) -> Result<Option<RoutesResponse>, ClientError> {
        self.send(
            |http, base| http.get(format!("{base}/routes")).query(q),
            Duration::from_millis(q.wait_ms) + CALL_TIMEOUT,
        )
        .await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        self.send(
            |http, base| http.post(format!("{base}{path}")).json(body),
            timeout,
        )
        .await
    }

    /// Sends the request `make` builds for a control plane's base URL to the current one, and to the
    /// next ones while a control plane cannot take it (see the module's notes).
    async fn send<T: DeserializeOwned>(
        &self,
        make: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let n = self.bases.len().max(1);
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in 0..n {
            let at = (first + i) % n;
            let Some(base) = self.bases.get(at) else {
                break;
            };
            let http = self.http_for(at, base).await;
            let result = self.send_to(make(http, base), timeout).await;
            let unavailable = match &result {
                Err(ClientError::Transport(e)) => {
                    // Whatever failed, the next call goes to the next control plane; only a request
                    // that never got through is sent there now.
                    let _ = self.current.compare_exchange(
                        at,
                        (at + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    e.is_connect()
                }
                Err(ClientError::Refused { status, .. }) if unavailable(*status) => {
                    let _ = self.current.compare_exchange(
                        at,
                        (at + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    true
                }
                _ => false,
            };
            if !unavailable || n == 1 {
                return result;
            }
            tracing::warn!(server = %base, "control plane unavailable; trying the next one");
            last = Some(result);
        }
        last.unwrap_or_else(|| {
            Err(ClientError::Refused {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "no control plane configured".into(),
            })
        })
    }

    /// The client for the control plane at `bases[at]`: h2c where it answered so, else the other.
    async fn http_for(&self, at: usize, base: &str) -> &reqwest::Client {
        let (Some(h2c), Some(protocol)) = (&self.h2c, self.protocols.get(at)) else {
            return &self.http;
        };
        if !base.starts_with("http://") {
            return &self.http;
        }
        match protocol.load(Ordering::Relaxed) {
            H2C => return h2c,
            HTTP1 => return &self.http,
            _ => {}
        }
        let root = base.strip_suffix(AGENT_API).unwrap_or(base);
        let probe = h2c
            .get(format!("{root}/readyz"))
            .timeout(PROBE_TIMEOUT)
            .send()
            .await;
        match probe {
            Ok(_) => {
                protocol.store(H2C, Ordering::Relaxed);
                tracing::debug!(server = %root, "the control plane speaks HTTP/2: one connection for every call");
                h2c
            }
            // Not reached at all: nothing learnt; the call itself finds out why.
            Err(e) if e.is_connect() => &self.http,
            Err(e) => {
                protocol.store(HTTP1, Ordering::Relaxed);
                tracing::info!(
                    server = %root,
                    error = %e,
                    "the control plane (or a proxy before it) does not answer HTTP/2 over plain http: using HTTP/1.1"
                );
                &self.http
            }
        }
    }

    async fn send_to<T: DeserializeOwned>(
        &self,
        mut req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        if let Some(c) = &self.credential {
            req = req.bearer_auth(c);
        }
        let resp = req
            .timeout(timeout)
            .send()
            .await
            .map_err(ClientError::Transport)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.bytes().await.map_err(ClientError::Transport)?;
        if status == StatusCode::NO_CONTENT {
            // Nothing to say: an `Option` answer's `None`.
            return serde_json::from_slice(b"null").map_err(ClientError::Decode);
        }
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(ClientError::Decode);
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(500).collect());
        Err(match status {
            StatusCode::UNAUTHORIZED => ClientError::Unauthorized(message),
            StatusCode::CONFLICT => ClientError::Stale(message),
            StatusCode::NOT_FOUND => ClientError::NotFound(message),
            StatusCode::TOO_MANY_REQUESTS => {
                ClientError::TooMany(retry_after.unwrap_or(Duration::from_secs(1)))
            }
            status => ClientError::Refused { status, message },
        })
    }
}

/// The control planes `server` names: URLs separated by commas (blanks ignored).
pub fn servers(server: &str) -> impl Iterator<Item = &str> {
    server.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// An answer that says this control plane cannot take the request now (a proxy without a backend, a
/// replica starting or without its database), so another may.
fn unavailable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}
