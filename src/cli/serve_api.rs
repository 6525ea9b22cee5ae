//! The agent and admin APIs inside `cairn serve`: their flags, their own database pool and LISTEN
//! connection (so a burst of agents cannot starve the reconcile loop of connections, nor the reverse),
//! and the node-liveness monitor that marks silent nodes offline and wakes the reconciler.
//!
//! The HTTP listener starts before the database is reachable (`/healthz` answers from the start); the
//! API routes answer 503 until the database is, through [`Late`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cairn_reconciler::api::limit::Rate;
use cairn_reconciler::api::{Api, ApiConfig};
use cairn_reconciler::queue::Listener;
use cairn_reconciler::worker::Shutdown;
use cairn_schema::Name;
use tokio::sync::Notify;
use tower::ServiceExt as _;

/// Flags of the agent and admin APIs.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The installation agents join; every replica they run is labelled with it
    #[arg(long, default_value = "cairn")]
    installation: Name,
    /// How often agents are told to heartbeat
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    heartbeat_interval: Duration,
    /// How long a task lease lasts unless its agent reports progress
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    task_lease: Duration,
    /// Waiting long-polls look for tasks at least this often: a safety net, as they are woken when a
    /// node's tasks are committed and when its next task falls due (an expired lease, a backoff's end)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    lease_poll: Duration,
    /// Database connections of the agent and admin APIs
    #[arg(long, default_value_t = 16)]
    api_db_connections: u32,
    /// Requests per second each node's agent may make (bursts of three times as many)
    #[arg(long, default_value_t = 20.0)]
    agent_rate_limit: f64,
    /// Join attempts per second per client address (bursts of ten times as many)
    #[arg(long, default_value_t = 5.0)]
    join_rate_limit: f64,
    /// Build output, replica output and failed or no-op reconcile runs older than this are pruned
    /// (checked every 10 minutes)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "14d")]
    pub(super) log_retention: Duration,
    /// Replica output lines kept per app for `cairn logs` (older ones are pruned)
    #[arg(long, default_value_t = 10_000)]
    log_window: u32,
    /// Distribute release images through this registry, e.g. `registry.internal:5000/cairn`: the first
    /// node to deploy a release pushes its image to `<registry>/<app>`, every other Docker node pulls it
    /// by digest, and the release records the digest. Without it each node builds the images it lacks
    #[arg(long, value_name = "HOST[:PORT][/PREFIX]")]
    registry: Option<cairn_proto::Registry>,
    /// A reverse proxy in front of `serve` (repeatable): requests from it are attributed, for the
    /// authentication back-off and the join rate, to the address its X-Forwarded-For names
    #[arg(long, value_name = "IP")]
    trusted_proxy: Vec<std::net::IpAddr>,
}

/// Connects the APIs' pool and listener, starts the liveness monitor, and returns the APIs' router.
pub async fn start(
    args: &ApiArgs,
    src: &super::control::SourceArgs,
    database_url: &str,
    judging: cairn_reconciler::liveness::Judging,
    hooks: Option<Arc<dyn cairn_reconciler::hooks::Hooks>>,
    wake: Arc<Notify>,
    stop: Shutdown,
) -> Result<Router> {
    let identity = super::read_identity(src.identity.as_ref())?;
    let pool = cairn_reconciler::store::connect(database_url, args.api_db_connections)
        .await
        .context("cannot connect the API to the database")?;
    let listener = Listener::start(&pool, args.lease_poll)
        .await
        .context("cannot listen for task notifications")?;
    let mut cfg = ApiConfig::new(args.installation.clone());
    cfg.heartbeat_interval = args.heartbeat_interval;
    cfg.offline_after = judging.offline_after();
    cfg.task_lease = args.task_lease;
    cfg.node_rate = Rate::new(args.agent_rate_limit, args.agent_rate_limit * 3.0);
    cfg.admin_rate = Rate::new(args.agent_rate_limit, args.agent_rate_limit * 3.0);
    cfg.join_rate = Rate::new(args.join_rate_limit, args.join_rate_limit * 10.0);
    cfg.registry = args.registry.clone();
    cfg.trusted_proxies = args.trusted_proxy.clone();
    let api = Api::new(
        pool.clone(),
        Arc::new(listener),
        identity.map(Arc::new),
        wake.clone(),
        hooks,
        cfg,
        Some(stop.clone()),
    );
    // `cairn deploy APP` reads the app's branch head through the same rewrites as the head poller
    // (also with --no-poll-heads: that stops the polling, not an operator's explicit ask).
    let rewrites =
        cairn_schema::source::Rewrites::parse(&src.git_rewrite).map_err(anyhow::Error::msg)?;
    let _ = api.heads.set(Arc::new(tokio::sync::Mutex::new(
        cairn_reconciler::source::heads::HeadPoller::new(
            src.cache_root().join("deploy-heads.git"),
            rewrites,
        )
        .refuse_private(src.refuse_private_sources),
    )));
    let retention = cairn_reconciler::releases::Retention {
        keep: args.log_retention,
        window: args.log_window,
        ..Default::default()
    };
    tokio::spawn({
        let (pool, stop) = (pool.clone(), stop.clone());
        async move { cairn_reconciler::releases::prune_loop(pool, retention, &stop).await }
    });
    tokio::spawn(
        async move { cairn_reconciler::liveness::monitor(pool, judging, wake, &stop).await },
    );
    Ok(cairn_reconciler::api::router_with(
        api,
        cairn_webhook::admin::routes(),
    ))
}

/// Routes set once the database is reachable; until then their requests answer 503.
#[derive(Debug, Clone, Default)]
pub struct Late(Arc<OnceLock<Router>>);

impl Late {
    pub fn set(&self, router: Router) {
        let _ = self.0.set(router);
    }

    /// A fallback handler that hands requests to the routes once they are set.
    pub fn router(&self) -> Router {
        Router::new().fallback(dispatch).with_state(self.clone())
    }
}

async fn dispatch(State(late): State<Late>, req: Request) -> Response {
    match late.0.get() {
        Some(r) => match r.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        },
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(cairn_proto::ErrorBody {
                error: "the control plane is starting; try again".into(),
            }),
        )
            .into_response(),
    }
}
