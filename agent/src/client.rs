//! The agent's side of the agent API: one method per route of `/agent/v1` (see `cairn-proto`), over
//! reqwest with rustls.
//!
//! What it must not do: decide anything (retries, backoff and what to do with a refusal are the agent
//! loop's, [`crate::node`]), or put the credential into an error or a `Debug` output.

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

/// A client of one control plane, as one node (once joined).
#[derive(Clone)]
pub struct Client {
    base: String,
    credential: Option<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
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
    /// A client of the control plane at `server` (`http://` or `https://`).
    pub fn new(server: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(ClientError::Transport)?;
        Ok(Client {
            base: format!("{}{AGENT_API}", server.trim_end_matches('/')),
            credential: None,
            http,
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
        let req = self.http.get(format!("{}/tasks/{id}", self.base));
        self.send(req, CALL_TIMEOUT).await
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
        let req = self.http.get(format!("{}/routes", self.base)).query(q);
        self.send(req, Duration::from_millis(q.wait_ms) + CALL_TIMEOUT)
            .await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let req = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send(req, timeout).await
    }

    async fn send<T: DeserializeOwned>(
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
