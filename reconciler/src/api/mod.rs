//! The control plane's HTTP APIs, which `cairn serve` merges into its router: the agent API under
//! `/agent/v1` ([`agent`]) and the admin API under `/api/v1` ([`admin`]). The wire types and the route
//! table are in `cairn-proto`.
//!
//! Both are bounded: request bodies at [`cairn_proto::MAX_BODY_BYTES`] (413 before the body is read when
//! `Content-Length` says so), request rates per node, per admin token and per client address
//! ([`limit`]), long-polls at 30 s, tasks per lease, log lines per batch and per task; connections,
//! header sizes and slow clients by the listener ([`listen`]). Every error is `{"error": "..."}`
//! ([`ApiError`]); a missing, wrong or revoked credential is 401. A malformed request (bad JSON, wrong
//! content type, deep nesting, non-UTF-8, a bad path or query) is a 4xx, never a 5xx. U+0000, which
//! PostgreSQL text cannot hold, is replaced by U+FFFD in every JSON body before it is read ([`Json`]);
//! identifiers (names) then fail their own validation with 400.
//!
//! **Authentication back-off** is per client address: the peer, or, when the peer is one of
//! [`ApiConfig::trusted_proxies`], the address its `X-Forwarded-For` names (so one client behind a
//! reverse proxy does not lock out every other). An address that failed too often is refused (429)
//! before any lookup, except for a credential or admin token this process has seen authenticate (a
//! valid credential is never refused because of other clients' failures), and except within a small
//! global allowance of lookups for well-formed tokens it has not seen yet (after a restart).
//!
//! What it must not do: run SQL (the statements are in [`crate::store`] and the queue), hold a
//! database connection while a long-poll waits (it waits on the in-memory [`crate::queue::Listener`]),
//! let one node see or touch another node's tasks, or put a token, a credential or a secret into a log
//! line or a response other than the one that hands it out.

pub mod admin;
pub mod agent;
pub mod apps;
pub mod auth;
pub mod databases;
mod error;
pub mod limit;
pub mod listen;
pub mod ui;
pub mod wakes;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::http::request::Parts;
use cairn_schema::{Identity, Name};
use sqlx::PgPool;
use tokio::sync::Notify;

pub use error::{ApiError, Json};
use limit::{Limiter, Rate};

use crate::hooks::Hooks;
use crate::queue::{Backoff, Listener};
use crate::worker::Shutdown;

/// How often agents are told to heartbeat unless configured (`cairn serve --heartbeat-interval`).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

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
    /// Lookups, across all clients, of well-formed tokens not seen to authenticate yet, sent from
    /// addresses past their failure limit.
    pub unseen_token_rate: Rate,
    /// Reverse proxies whose `X-Forwarded-For` names the client (the client's address is then the
    /// right-most address in it that is not a trusted proxy).
    pub trusted_proxies: Vec<IpAddr>,
    /// Log lines kept per task.
    pub max_log_lines: u32,
    /// Where release images are distributed: the first node to deploy a release pushes its image there,
    /// every other Docker node pulls it by digest. `None`: each node builds what it lacks.
    pub registry: Option<cairn_proto::Registry>,
    /// How long a deploy waits, at most, before its node looks again while another node is getting the
    /// release's image (a recorded push wakes it sooner).
    pub image_wait: Duration,
    /// The config repository's web address (`https://github.com/acme/platform`): the dashboard links
    /// each app to its declaration's line there. `None`: it names the file and line without a link.
    pub config_browse: Option<String>,
    /// A dashboard live stream ends after this long; the browser reconnects by itself where it was.
    pub ui_stream_lifetime: Duration,
}

impl ApiConfig {
    pub fn new(installation: Name) -> Self {
        ApiConfig {
            installation,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            offline_after: cairn_plan::DEFAULT_OFFLINE_AFTER,
            task_lease: Duration::from_secs(60),
            backoff: Backoff::default(),
            node_rate: Rate::new(20.0, 60.0),
            admin_rate: Rate::new(10.0, 30.0),
            join_rate: Rate::new(5.0, 50.0),
            auth_failure_rate: Rate::new(5.0, 50.0),
            unseen_token_rate: Rate::new(20.0, 40.0),
            trusted_proxies: Vec::new(),
            max_log_lines: 10_000,
            registry: None,
            image_wait: Duration::from_secs(5),
            config_browse: None,
            ui_stream_lifetime: Duration::from_secs(300),
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
    /// Wakes an app's replica output followers (`cairn logs --follow`, the dashboard's streams) when
    /// its lines are stored.
    pub replica_output: Arc<wakes::Wakes>,
    /// Wakes an app's build output followers (the dashboard's release page) when a task's lines are
    /// stored.
    pub build_output: Arc<wakes::Wakes>,
    /// The webhook and notification ledgers the dashboard shows (the GitHub integration's crate, which
    /// this one cannot depend on, sets it in `cairn serve`).
    pub ledger: std::sync::OnceLock<Arc<dyn ui::Ledger>>,
    /// The cluster route table the agents long-poll (`cairn serve` keeps it current).
    pub routes: crate::routes::Routes,
    /// The key of the internal hop between node proxies, handed to each node sealed to it.
    pub hop_key: crate::routes::HopKey,
    /// Triggered when the server shuts down: long-polls answer at once.
    stopping: Option<Shutdown>,
    node_limit: Limiter,
    admin_limit: Limiter,
    join_limit: Limiter,
    failures: Limiter,
    unseen: Limiter,
    /// Hashes of credentials and admin tokens that authenticated lately: their holders pass the
    /// failure back-off of the address they share with others.
    known: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Nodes whose drift repair runs now, after the heartbeat that found it was answered
    /// (`agent::repair_later`): one at a time per node.
    pub(crate) repairing: std::sync::Mutex<std::collections::HashSet<Name>>,
    /// Drift repairs running at once across nodes: each holds a pool connection and the shared apply
    /// lock, so a burst of them (every node's first deploys) must not take the connections heartbeats
    /// need. A repair that finds no permit is left to the node's next heartbeat.
    pub(crate) repair_permits: Arc<tokio::sync::Semaphore>,
    /// Heartbeats' usage-metering checks running at once (`store::usage::open_reported`, after the
    /// answer). One that finds no permit is skipped: the node's next heartbeat checks again.
    pub(crate) usage_permits: Arc<tokio::sync::Semaphore>,
}

/// At most this many drift repairs run at once (a quarter of the API pool's 16 connections).
const MAX_CONCURRENT_REPAIRS: usize = 4;

/// Past this many remembered tokens, those not seen for a day are forgotten (and all, if that is not
/// enough: they are an exemption from a back-off, not an authentication).
const KNOWN_MAX: usize = 100_000;

impl Api {
    pub fn new(
        pool: PgPool,
        listener: Arc<Listener>,
        identity: Option<Arc<Identity>>,
        wake: Arc<Notify>,
        hooks: Option<Arc<dyn Hooks>>,
        cfg: ApiConfig,
        stopping: Option<Shutdown>,
    ) -> Arc<Self> {
        Arc::new(Api {
            routes: crate::routes::Routes::default(),
            hop_key: crate::routes::HopKey::new(identity.as_deref()),
            stopping,
            hooks,
            heads: std::sync::OnceLock::new(),
            replica_output: Default::default(),
            build_output: Default::default(),
            ledger: std::sync::OnceLock::new(),
            node_limit: Limiter::new(cfg.node_rate),
            admin_limit: Limiter::new(cfg.admin_rate),
            join_limit: Limiter::new(cfg.join_rate),
            failures: Limiter::new(cfg.auth_failure_rate),
            unseen: Limiter::new(cfg.unseen_token_rate),
            known: std::sync::Mutex::default(),
            repairing: std::sync::Mutex::default(),
            repair_permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REPAIRS)),
            usage_permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REPAIRS)),
            pool,
            listener,
            identity,
            wake,
            cfg,
        })
    }

    /// Resolves once the server is shutting down (never, without a shutdown signal).
    async fn stopped(&self) {
        match &self.stopping {
            Some(shutdown) => shutdown.wait().await,
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

    /// Whether a request presenting the well-formed token whose hash is `token_hash` (if any) may be
    /// looked up: always, unless its address failed too often lately; then only a token seen to
    /// authenticate before, or within the global allowance for tokens not seen yet.
    fn admit(&self, client: &str, token_hash: Option<&str>) -> Result<(), ApiError> {
        let Some(wait) = self.failures.exhausted(client) else {
            return Ok(());
        };
        if let Some(h) = token_hash {
            let known = self
                .known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(h);
            if known || self.unseen.check("").is_ok() {
                return Ok(());
            }
        }
        Err(ApiError::TooMany(wait))
    }

    /// Remembers a token hash that authenticated (see [`Api::admit`]).
    fn authenticated(&self, token_hash: &str) {
        let now = std::time::Instant::now();
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= KNOWN_MAX && !known.contains_key(token_hash) {
            known.retain(|_, at| now.duration_since(*at) < Duration::from_secs(24 * 3600));
            if known.len() >= KNOWN_MAX {
                known.clear();
            }
        }
        known.insert(token_hash.to_owned(), now);
    }

    /// The client's address, for per-address limits: the peer's, or the one a trusted proxy forwarded
    /// for; `unknown` when the router is driven without connection info (tests through `oneshot`).
    fn client(&self, parts: &Parts) -> String {
        client_address(parts, &self.cfg.trusted_proxies)
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
                .merge(databases::admin_routes())
                .merge(extra_admin),
        )
        .merge(ui::routes())
        .layer(DefaultBodyLimit::max(cairn_proto::MAX_BODY_BYTES))
        .with_state(api)
}

/// The client's address: the peer's, or, when the peer is one of `trusted`, the right-most address of
/// `X-Forwarded-For` that is not (a proxy appends the address it received from; anything left of a
/// trusted hop is the client's own claim).
fn client_address(parts: &Parts, trusted: &[IpAddr]) -> String {
    let Some(peer) = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip())
    else {
        return "unknown".to_owned();
    };
    if !trusted.contains(&peer) {
        return peer.to_string();
    }
    let mut client = peer;
    let hops = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => client = ip,
            Ok(ip) => return ip.to_string(),
            // A malformed entry: nothing left of it can be believed.
            Err(_) => break,
        }
    }
    client.to_string()
}

/// Replaces U+0000, which PostgreSQL text and jsonb cannot hold, by U+FFFD in every string and key of
/// `value`; returns whether anything was replaced.
pub fn replace_nul(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => {
            *s = s.replace('\0', "\u{FFFD}");
            true
        }
        Value::Array(items) => items.iter_mut().fold(false, |r, v| replace_nul(v) | r),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                for (k, mut v) in old {
                    replace_nul(&mut v);
                    map.insert(k.replace('\0', "\u{FFFD}"), v);
                }
                true
            } else {
                map.values_mut().fold(false, |r, v| replace_nul(v) | r)
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(peer: &str, xff: &[&str]) -> Parts {
        let mut b = Request::builder();
        for v in xff {
            b = b.header("x-forwarded-for", *v);
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        parts.extensions.insert(ConnectInfo(
            format!("{peer}:4000").parse::<SocketAddr>().unwrap(),
        ));
        parts
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let trusted = [proxy];
        // Not a trusted peer: its header is ignored.
        assert_eq!(
            client_address(&parts("192.0.2.7", &["198.51.100.1"]), &trusted),
            "192.0.2.7"
        );
        assert_eq!(
            client_address(&parts("10.0.0.1", &["198.51.100.1"]), &trusted),
            "198.51.100.1"
        );
        // The right-most untrusted hop: what a client wrote itself further left is not believed.
        assert_eq!(
            client_address(&parts("10.0.0.1", &["6.6.6.6, 198.51.100.1"]), &trusted),
            "198.51.100.1"
        );
        assert_eq!(
            client_address(
                &parts("10.0.0.1", &["6.6.6.6", "198.51.100.1, 10.0.0.1"]),
                &trusted
            ),
            "198.51.100.1"
        );
        // Nothing usable: the proxy's own address.
        assert_eq!(
            client_address(&parts("10.0.0.1", &["garbage"]), &trusted),
            "10.0.0.1"
        );
        assert_eq!(
            client_address(&parts("10.0.0.1", &[]), &trusted),
            "10.0.0.1"
        );
    }

    #[test]
    fn nul_characters_are_replaced_in_strings_and_keys() {
        let mut value = serde_json::json!({"a\u{0}": ["x\u{0}y", {"k": "\u{0}"}], "n": 1});
        assert!(replace_nul(&mut value));
        assert_eq!(
            value,
            serde_json::json!({"a\u{FFFD}": ["x\u{FFFD}y", {"k": "\u{FFFD}"}], "n": 1})
        );
        assert!(!replace_nul(&mut value));
    }
}
