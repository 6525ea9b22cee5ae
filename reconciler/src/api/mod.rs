//! The control plane's HTTP APIs, which `cairn serve` merges into its router: the agent API under
//! `/agent/v1` ([`agent`]) and the admin API under `/api/v1` ([`admin`]). The wire types and the route
//! table are in `cairn-proto`.
//!
//! Both are bounded: request bodies at [`cairn_proto::MAX_BODY_BYTES`] (413 before the body is read when
//! `Content-Length` says so), request rates per node, per admin token and per client address
//! ([`limit`]), long-polls at 30 s, tasks per lease, log lines per batch and per task. Every error is
//! `{"error": "..."}` ([`ApiError`]); a missing, wrong or revoked credential is 401.
//!
//! What it must not do: run SQL (the statements are in [`crate::store::agents`] and the queue), hold a
//! database connection while a long-poll waits (it waits on the in-memory [`crate::queue::Listener`]),
//! let one node see or touch another node's tasks, or put a token, a credential or a secret into a log
//! line or a response other than the one that hands it out.

pub mod admin;
pub mod agent;
pub mod apps;
pub mod auth;
mod error;
pub mod limit;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::http::request::Parts;
use cairn_schema::{Identity, Name};
use sqlx::PgPool;
use tokio::sync::{Notify, watch};

pub use error::{ApiError, Json};
use limit::{Limiter, Rate};

use crate::hooks::Hooks;
use crate::queue::{Backoff, Listener};

/// The APIs' knobs.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The installation agents join: every replica they run is labelled with it.
    pub installation: Name,
    /// How often agents are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// A node silent this long is offline (the status shows it so).
    pub offline_after: Duration,
    /// How long a lease lasts unless the agent reports progress.
    pub task_lease: Duration,
    /// Backoff of a task whose attempt failed.
    pub backoff: Backoff,
    /// Requests per node (agent API) and per admin token.
    pub node_rate: Rate,
    pub admin_rate: Rate,
    /// Join attempts per client address.
    pub join_rate: Rate,
    /// Failed authentications per client address before its requests are refused unread.
    pub auth_failure_rate: Rate,
    /// Log lines kept per task.
    pub max_log_lines: u32,
    /// Where release images are distributed: the first node to deploy a release pushes its image there,
    /// every other Docker node pulls it by digest. `None`: each node builds what it lacks.
    pub registry: Option<cairn_proto::Registry>,
    /// How long a deploy waits, at most, before its node looks again while another node is getting the
    /// release's image (a recorded push wakes it sooner).
    pub image_wait: Duration,
}

impl ApiConfig {
    pub fn new(installation: Name) -> Self {
        ApiConfig {
            installation,
            heartbeat_interval: Duration::from_secs(30),
            offline_after: crate::plan::DEFAULT_OFFLINE_AFTER,
            task_lease: Duration::from_secs(60),
            backoff: Backoff::default(),
            node_rate: Rate::new(20.0, 60.0),
            admin_rate: Rate::new(10.0, 30.0),
            join_rate: Rate::new(5.0, 50.0),
            auth_failure_rate: Rate::new(5.0, 50.0),
            max_log_lines: 10_000,
            registry: None,
            image_wait: Duration::from_secs(5),
        }
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct Api {
    pub pool: PgPool,
    /// Wakes long-polls when a node's tasks are committed.
    pub listener: Arc<Listener>,
    /// The control plane's identity: seals secrets to nodes at lease time.
    pub identity: Option<Arc<Identity>>,
    /// Wakes the reconciler (a node came back, joined, or its tasks need replanning).
    pub wake: Arc<Notify>,
    /// Told when a release's deploy finished (commit statuses, in `cairn serve`).
    pub hooks: Option<Arc<dyn Hooks>>,
    pub cfg: ApiConfig,
    /// Reads app branch heads for `cairn deploy` (`cairn serve` sets it).
    pub heads: std::sync::OnceLock<Arc<tokio::sync::Mutex<crate::source::heads::HeadPoller>>>,
    /// Ticks when replica output is stored: wakes `cairn logs --follow` long-polls.
    pub log_tick: watch::Sender<u64>,
    /// Turns true when the server shuts down: long-polls answer at once.
    stopping: Option<watch::Receiver<bool>>,
    node_limit: Limiter,
    admin_limit: Limiter,
    join_limit: Limiter,
    failures: Limiter,
}

impl Api {
    pub fn new(
        pool: PgPool,
        listener: Arc<Listener>,
        identity: Option<Arc<Identity>>,
        wake: Arc<Notify>,
        hooks: Option<Arc<dyn Hooks>>,
        cfg: ApiConfig,
        stopping: Option<watch::Receiver<bool>>,
    ) -> Arc<Self> {
        Arc::new(Api {
            stopping,
            hooks,
            heads: std::sync::OnceLock::new(),
            log_tick: watch::channel(0).0,
            node_limit: Limiter::new(cfg.node_rate),
            admin_limit: Limiter::new(cfg.admin_rate),
            join_limit: Limiter::new(cfg.join_rate),
            failures: Limiter::new(cfg.auth_failure_rate),
            pool,
            listener,
            identity,
            wake,
            cfg,
        })
    }

    /// Resolves once the server is shutting down (never, without a shutdown signal).
    async fn stopped(&self) {
        match self.stopping.clone() {
            Some(mut rx) => {
                let _ = rx.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    }

    /// Refuses a client address that failed to authenticate too often lately, before any lookup.
    fn check_failures(&self, client: &str) -> Result<(), ApiError> {
        match self.failures.exhausted(client) {
            Some(wait) => Err(ApiError::TooMany(wait)),
            None => Ok(()),
        }
    }

    /// Counts a failed authentication against the client address.
    fn failed(&self, client: &str) -> ApiError {
        let _ = self.failures.check(client);
        ApiError::unauthorized()
    }
}

/// Both APIs, with their body limit.
pub fn router(api: Arc<Api>) -> Router {
    router_with(api, Router::new())
}

/// Both APIs, the admin API with `extra_admin`'s routes too (another crate's, such as the GitHub
/// integration's: they authenticate with [`admin::AdminAuth`]).
pub fn router_with(api: Arc<Api>, extra_admin: Router<Arc<Api>>) -> Router {
    Router::new()
        .nest(
            cairn_proto::AGENT_API,
            agent::routes().merge(apps::agent_routes()),
        )
        .nest(
            cairn_proto::ADMIN_API,
            admin::routes()
                .merge(apps::admin_routes())
                .merge(extra_admin),
        )
        .layer(DefaultBodyLimit::max(cairn_proto::MAX_BODY_BYTES))
        .with_state(api)
}

/// The client's address, for per-address limits (serve with `into_make_service_with_connect_info`);
/// `unknown` when the router is driven without one (tests through `oneshot`).
fn client(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip())
        .map_or_else(|| "unknown".to_owned(), |ip: IpAddr| ip.to_string())
}
