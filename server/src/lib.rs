//! `cairn serve` as a library: [`serve`] composes the control plane (its database pools, the HTTP
//! routes, the reconcile loop and every background loop beside it) on a listener the caller bound, and
//! runs it until the caller's [`Shutdown`] is triggered. The `cairn` binary parses flags into a
//! [`Config`] and calls it; tests start a whole control plane in process the same way.
//!
//! It sits above `cairn-reconciler` and `cairn-webhook`: the reconciler depends on no webhook and the
//! webhook crate on the reconciler, so neither can hold what wires both together.
//!
//! What it must not do: parse arguments, read files or the environment, print, or handle signals (the
//! binary does all of that, and binds the listeners); decide anything (it only wires the modules that
//! do); or outlive its shutdown: [`serve`] returns once every loop and listener it started stopped, and
//! on an error it stops what it started first.

mod ha;
mod late;

pub use cairn_reconciler::leader::LeaseSettings;
pub use ha::HaSettings;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use cairn_reconciler::api::limit::Rate;
use cairn_reconciler::api::listen::{self, Bounds};
use cairn_reconciler::api::{Api, ApiConfig};
use cairn_reconciler::controller::{ConfigSource, Controller, SourceSettings};
use cairn_reconciler::declared::Declarations;
use cairn_reconciler::liveness::Judging;
use cairn_reconciler::queue::{Listener, QueueError};
use cairn_reconciler::routes::Routes;
use cairn_reconciler::source::heads::HeadPoller;
use cairn_reconciler::store::StoreError;
use cairn_reconciler::store::failover::Database;
use cairn_reconciler::worker::Shutdown;
use cairn_schema::Identity;
use cairn_schema::source::RewriteError;
use cairn_webhook::events::TrackedRepo;
use cairn_webhook::github::GitHubConfig;
use cairn_webhook::outbox::OutboxConfig;
use cairn_webhook::receiver::WEBHOOK_PATH;
use cairn_webhook::service::{self, ServiceError, Settings, Webhooks};
use cairn_webhook::signature::WebhookSecret;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OnceCell};

use late::Late;

/// Connections the `/metrics` listener of its own holds at most (scrapers are few).
const METRICS_MAX_CONNECTIONS: usize = 64;

/// How often `cairn serve` checks that its database host is still the writable primary (given several).
const DB_CHECK: Duration = Duration::from_secs(1);

/// How long `/readyz` waits for the database.
const READYZ_DB_TIMEOUT: Duration = Duration::from_millis(800);

/// Everything [`serve`] runs with: values, never flags or files.
#[derive(Debug)]
pub struct Config {
    pub database_url: String,
    /// The config repository and how it is followed.
    pub source: SourceSettings,
    /// The control plane's age identity: fingerprints secrets and re-encrypts them per node.
    pub identity: Option<Identity>,
    /// Reconcile at least this often (also the poll for missed webhooks).
    pub interval: Duration,
    /// A node with no heartbeat for this long is offline.
    pub node_offline_after: Duration,
    /// The bounds of the HTTP listeners (the descriptor limit is the caller's to raise).
    pub http: Bounds,
    /// `/metrics` on a listener of its own; `None` serves it on the main one.
    pub metrics_listener: Option<TcpListener>,
    pub api: ApiSettings,
    pub webhooks: WebhookSettings,
    /// Certificates from the ACME CA the applied `[tls]` names.
    pub certs: CertServeSettings,
    /// This replica among several control planes: its id, address and the leader's lease.
    pub ha: HaSettings,
}

/// How `cairn serve` runs the certificate loop.
#[derive(Debug, Clone)]
pub struct CertServeSettings {
    /// The self-probe's port and name overrides.
    pub probe: cairn_reconciler::certs::ProbeOverrides,
    /// The loop looks for due certificates at least this often (it is woken by applies and by the
    /// next due time sooner).
    pub period: Duration,
}

impl Default for CertServeSettings {
    fn default() -> Self {
        CertServeSettings {
            probe: Default::default(),
            period: Duration::from_secs(300),
        }
    }
}

/// The agent and admin APIs.
#[derive(Debug)]
pub struct ApiSettings {
    /// Their configuration; its `offline_after` is set from [`Config::node_offline_after`].
    pub config: ApiConfig,
    /// Database connections of their own pool (so agents cannot starve the reconcile loop, nor it them).
    pub db_connections: u32,
    /// Waiting long-polls look for tasks at least this often.
    pub lease_poll: Duration,
    /// Build output, replica output and failed or no-op reconcile runs older than this are pruned.
    pub log_retention: Duration,
    /// Replica output lines kept per app.
    pub log_window: u32,
    /// The route table is recomputed at least this often, as a safety net (also when poked: after a
    /// reconcile pass, a heartbeat that changed what a node serves, and another control plane's new
    /// table, announced on `routes::CHANGED`).
    pub routes_period: Duration,
    /// How often usage is rolled up (the current hour's rows are provisional until then).
    pub usage_period: Duration,
}

impl ApiSettings {
    /// The defaults of `cairn serve`'s flags, for `installation`.
    pub fn new(installation: cairn_schema::Name) -> Self {
        let mut config = ApiConfig::new(installation);
        config.node_rate = Rate::new(20.0, 60.0);
        config.admin_rate = Rate::new(20.0, 60.0);
        config.join_rate = Rate::new(5.0, 50.0);
        ApiSettings {
            config,
            db_connections: 16,
            lease_poll: Duration::from_secs(30),
            log_retention: Duration::from_secs(14 * 24 * 3600),
            log_window: 10_000,
            routes_period: Duration::from_secs(300),
            usage_period: cairn_reconciler::usage::DEFAULT_PERIOD,
        }
    }
}

/// The GitHub integration.
#[derive(Debug)]
pub struct WebhookSettings {
    /// Without one, `POST /webhooks/github` is not served.
    pub secret: Option<WebhookSecret>,
    /// Without credentials nothing is sent to GitHub.
    pub github: Option<GitHubConfig>,
    /// Deliveries, GitHub calls and what they caused are kept this long.
    pub retention: Duration,
    /// How long a GitHub call is reserved for the worker making it.
    pub call_lease: Duration,
    /// How often the webhook workers look for work without being notified.
    pub poll: Duration,
    /// How notifications are retried and leased.
    pub notify: cairn_webhook::notify::NotifyConfig,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            secret: None,
            github: None,
            retention: Duration::from_secs(7 * 24 * 3600),
            call_lease: Duration::from_secs(300),
            poll: Duration::from_secs(30),
            notify: cairn_webhook::notify::NotifyConfig::default(),
        }
    }
}

/// Why the control plane could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot connect to the database")]
    Connect(#[source] StoreError),
    #[error("cannot migrate the database")]
    Migrate(#[source] StoreError),
    #[error("cannot connect the API to the database")]
    ConnectApi(#[source] StoreError),
    #[error("cannot listen for task notifications")]
    Notifications(#[source] QueueError),
    #[error(transparent)]
    Rewrite(#[from] RewriteError),
    #[error("cannot watch {}", .path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot set up the GitHub integration")]
    Webhooks(#[source] ServiceError),
    #[error("the webhook workers failed")]
    WebhookTask(#[source] tokio::task::JoinError),
    #[error("cannot set up notifications")]
    Notifier(#[source] cairn_webhook::notify::NotifyError),
    #[error("the HTTP server task failed")]
    ServerTask(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Server(std::io::Error),
}

/// Triggers a shutdown when dropped: whatever way [`serve`] returns, what it started stops.
struct StopOnDrop(Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

/// Runs the control plane on `listener` until `shutdown` is triggered. The listener answers
/// `/healthz` at once and `/readyz` (ready once the database is), the agent, admin and webhook routes
/// answer 503 until the database is reachable, and the reconcile loop runs on `config.interval`, woken by
/// file changes (directory sources), webhook deliveries, nodes going offline and operators.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let Config {
        database_url,
        source,
        identity,
        interval,
        node_offline_after,
        http,
        metrics_listener,
        api,
        webhooks,
        certs,
        ha,
    } = config;
    // Stops everything started here when this returns, early (an error) or not; the caller's shutdown
    // stops it too.
    let stop = StopOnDrop(shutdown.child());
    let shutdown = stop.0.clone();

    // The listener answers /healthz before the database is reachable; /readyz says when it is.
    let ready: Arc<OnceCell<PgPool>> = Arc::default();
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ready.clone());
    // Until the database is reachable the webhook endpoint answers 503, which GitHub shows and lets an
    // operator redeliver.
    let hook_routes = Late::new("the control plane is starting");
    if webhooks.secret.is_some() {
        tracing::info!("GitHub webhooks: POST {WEBHOOK_PATH}");
        let late = hook_routes.clone();
        app = app.route(WEBHOOK_PATH, post(move |r| late.clone().dispatch(r)));
    } else {
        tracing::info!(
            "no GitHub webhook secret (--github-webhook-secret-file or \
             CAIRN_GITHUB_WEBHOOK_SECRET): POST {WEBHOOK_PATH} is off"
        );
    }
    // The agent and admin APIs (`/agent/v1`, `/api/v1`) answer 503 until the database is reachable.
    let apis = Late::new("the control plane is starting; try again");
    let mut app = app.merge(apis.router());
    let metrics = cairn_reconciler::metrics::router(ready.clone());
    match metrics_listener {
        None => app = app.merge(metrics),
        Some(l) => {
            let mut bounds = http.clone();
            bounds.max_connections = bounds.max_connections.min(METRICS_MAX_CONNECTIONS);
            let stop = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = listen::serve(l, metrics, bounds, stop).await {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            });
        }
    }
    let server = tokio::spawn(listen::serve(listener, app, http, shutdown.clone()));

    // Every pool comes from one `Database`: with several hosts it finds the primary and repoints them
    // all when it moves (`store::failover`).
    let db = Database::open(&database_url).map_err(ServeError::Connect)?;
    let pool = db.pool(4).await.map_err(ServeError::Connect)?;
    tokio::spawn({
        let (db, stop) = (db.clone(), shutdown.clone());
        async move { db.watch(DB_CHECK, &stop).await }
    });
    cairn_reconciler::store::migrate(&pool)
        .await
        .map_err(ServeError::Migrate)?;
    // The lease on a pool of its own: a busy reconciler or API never delays a renewal.
    let lease_pool = db.pool(2).await.map_err(ServeError::Connect)?;
    let leadership = ha::start(&lease_pool, &ha, &shutdown)
        .await
        .map_err(ServeError::Connect)?;
    let mut c = Controller::open(pool, &source, identity.clone())?;
    c.offline_after = node_offline_after;
    let judging = Judging::new(node_offline_after);
    c.judging = Some(judging.clone());
    c.history_retention = api.log_retention;
    let notify = webhooks.notify.clone();
    let settings = webhook_settings(&source, webhooks)?;
    c.hooks = service::hooks(&settings);
    let wake = Arc::new(Notify::new());
    c.declared = Some(Declarations::default());
    let (router, routes, api_pool) = start_apis(
        &api,
        &source,
        &db,
        identity,
        judging.offline_after(),
        c.hooks.clone(),
        wake.clone(),
        &shutdown,
    )
    .await?;
    // Certificates: the controller hands the loop the applied `[tls]` after each apply; the loop's
    // challenges travel to every ingress node with the route table.
    let (cert_settings, cert_rx) = tokio::sync::watch::channel(None);
    // Woken after each apply (the controller) and when a node comes online (the heartbeat handler).
    let cert_wake = routes.certs_wake.clone();
    c.certs = Some(cairn_reconciler::controller::CertsHook {
        settings: cert_settings,
        overrides: certs.probe.clone(),
        wake: cert_wake.clone(),
        last: std::sync::Mutex::new(None),
    });
    tokio::spawn({
        let (pool, identity) = (c.pool.clone(), c.identity.clone().map(Arc::new));
        let (challenges, stop) = (routes.challenges.clone(), shutdown.clone());
        async move {
            cairn_reconciler::certs::serve_loop(
                pool,
                identity,
                challenges,
                cert_rx,
                cert_wake,
                certs.period,
                &stop,
            )
            .await
        }
    });
    c.routes = Some(routes);
    apis.set(router);
    // Ready (for a load balancer in front of several control planes) once this replica's APIs answer,
    // and then while its database does.
    let _ = ready.set(c.pool.clone());
    let _watcher = match &*c.source.lock().await {
        ConfigSource::Dir(dir) => {
            let w = wake.clone();
            Some(
                cairn_reconciler::source::watch::watch(
                    dir,
                    Duration::from_millis(300),
                    Vec::new(),
                    move || w.notify_one(),
                )
                .map_err(|e| ServeError::Watch {
                    path: dir.clone(),
                    source: Box::new(e),
                })?,
            )
        }
        ConfigSource::Git(_) => None,
    };
    // Notifications: the events' deliveries to the sinks declared in git, on a pool of their own.
    let notify_pool = db.pool(2).await.map_err(ServeError::Connect)?;
    let notifier = cairn_webhook::notify::Notifier::new(
        notify_pool,
        c.identity.clone().map(Arc::new),
        cairn_webhook::notify::NotifyConfig {
            poll_interval: notify.poll_interval.min(settings.poll),
            ..notify
        },
    )
    .map_err(ServeError::Notifier)?;
    let notifying = tokio::spawn({
        let stop = shutdown.clone();
        async move { notifier.run(&stop).await }
    });
    let c = Arc::new(c);
    // A pool of its own: a burst of deliveries never waits behind the reconciler, nor it behind them.
    let hooks_pool = db.pool(10).await.map_err(ServeError::Connect)?;
    let integration = Webhooks::new(settings, hooks_pool, c.clone(), wake.clone())
        .map_err(ServeError::Webhooks)?;
    if let Some(router) = integration.router() {
        hook_routes.set(router);
    }
    let integration = tokio::spawn(integration.run(shutdown.clone()));
    // The reconcile loop runs on the leader only, woken through the database from any replica.
    let run_wake = Arc::new(Notify::new());
    let forwarding = tokio::spawn({
        let (pool, leadership, wake, run_wake, stop) = (
            lease_pool.clone(),
            leadership.clone(),
            wake.clone(),
            run_wake.clone(),
            shutdown.clone(),
        );
        async move { ha::forward_wakes(pool, leadership, wake, run_wake, &stop).await }
    });
    ha::LeaderLoops {
        controller: c.clone(),
        run_wake,
        interval,
        pool: api_pool,
        judging,
        wake,
        usage_period: api.usage_period,
    }
    .run(&leadership, &shutdown)
    .await;
    forwarding.await.map_err(ServeError::WebhookTask)?;
    integration.await.map_err(ServeError::WebhookTask)?;
    notifying.await.map_err(ServeError::WebhookTask)?;
    server
        .await
        .map_err(ServeError::ServerTask)?
        .map_err(ServeError::Server)?;
    c.pool.close().await;
    Ok(())
}

/// Connects the APIs' pool and listener, starts the output prune and the route table's refresh, and
/// returns the APIs' router, the route table and the pool (the leader's liveness sweep and usage rollup
/// use it too).
#[allow(clippy::too_many_arguments)]
async fn start_apis(
    settings: &ApiSettings,
    source: &SourceSettings,
    db: &Database,
    identity: Option<Identity>,
    offline_after: Duration,
    hooks: Option<Arc<dyn cairn_reconciler::hooks::Hooks>>,
    wake: Arc<Notify>,
    shutdown: &Shutdown,
) -> Result<(Router, Routes, PgPool), ServeError> {
    let pool = db
        .pool(settings.db_connections)
        .await
        .map_err(ServeError::ConnectApi)?;
    let listener = Listener::start(&pool, settings.lease_poll)
        .await
        .map_err(ServeError::Notifications)?;
    let mut cfg = settings.config.clone();
    cfg.offline_after = offline_after;
    if cfg.config_browse.is_none() && source.is_git() {
        cfg.config_browse = cairn_reconciler::declared::browse_url(&source.repo);
    }
    let api = Api::new(
        pool.clone(),
        Arc::new(listener),
        identity.map(Arc::new),
        wake.clone(),
        hooks,
        cfg,
        Some(shutdown.clone()),
    );
    // Output stored through another control plane wakes this one's followers of that app.
    for (wakes, channel) in [
        (
            &api.replica_output,
            cairn_reconciler::api::wakes::REPLICA_OUTPUT,
        ),
        (
            &api.build_output,
            cairn_reconciler::api::wakes::BUILD_OUTPUT,
        ),
    ] {
        tokio::spawn({
            let (wakes, pool, stop) = (wakes.clone(), pool.clone(), shutdown.clone());
            async move { wakes.follow(pool, channel, &stop).await }
        });
    }
    // The dashboard's deliveries page reads the GitHub integration's and the notifications' ledgers.
    let _ = api.ledger.set(Arc::new(cairn_webhook::admin::UiLedger));
    // `cairn deploy APP` reads the app's branch head through the same rewrites as the head poller
    // (also with --no-poll-heads: that stops the polling, not an operator's explicit ask).
    let _ = api.heads.set(Arc::new(tokio::sync::Mutex::new(
        HeadPoller::new(
            source.cache_root.join("deploy-heads.git"),
            source.rewrites.clone(),
        )
        .refuse_private(source.refuse_private_sources),
    )));
    let retention = cairn_reconciler::releases::Retention {
        keep: settings.log_retention,
        window: settings.log_window,
        ..Default::default()
    };
    tokio::spawn({
        let (pool, stop) = (pool.clone(), shutdown.clone());
        async move { cairn_reconciler::releases::prune_loop(pool, retention, &stop).await }
    });
    // The agents' first long-poll gets the table of the store, not an empty one (which would take
    // every forwarded route away until the first refresh).
    let routes = api.routes.clone();
    if let Err(e) = routes.refresh(&pool).await {
        tracing::warn!(error = %cairn_schema::error::chain(&e), "cannot compute the route table yet; retrying");
    }
    tokio::spawn({
        let (pool, routes, stop) = (pool.clone(), routes.clone(), shutdown.clone());
        let period = settings.routes_period;
        async move { cairn_reconciler::routes::refresh_loop(pool, routes, period, &stop).await }
    });
    // Scheduled backups: each due schedule is a row claimed with SKIP LOCKED, so every replica may
    // run this loop and none queues a run twice.
    tokio::spawn({
        let (pool, stop) = (pool.clone(), shutdown.clone());
        let period = cairn_reconciler::databases::BACKUP_PERIOD;
        async move { cairn_reconciler::databases::backup_loop(pool, period, &stop).await }
    });
    Ok((
        cairn_reconciler::api::router_with(api, cairn_webhook::admin::routes()),
        routes,
        pool,
    ))
}

/// The GitHub integration's settings: the config repository as `source` names it (tracked for
/// webhooks and statuses when it is a git branch), and where it is fetched from.
fn webhook_settings(
    source: &SourceSettings,
    webhooks: WebhookSettings,
) -> Result<Settings, RewriteError> {
    let git = source.is_git();
    let branch = source
        .git_ref
        .strip_prefix("refs/heads/")
        .unwrap_or(&source.git_ref);
    let config_repo = (git && !branch.starts_with("refs/")).then(|| TrackedRepo {
        url: source.repo.clone(),
        branch: branch.to_owned(),
    });
    let config_fetch_url = if git { Some(source.fetch_url()?) } else { None };
    Ok(Settings {
        secret: webhooks.secret,
        github: webhooks.github,
        config_repo,
        config_fetch_url,
        rewrites: source.rewrites.clone(),
        refuse_private_sources: source.refuse_private_sources,
        cache_root: source.cache_root.clone(),
        retention: webhooks.retention,
        poll: webhooks.poll,
        outbox: OutboxConfig {
            lease: webhooks.call_lease,
            ..OutboxConfig::default()
        },
    })
}

async fn readyz(State(ready): State<Arc<OnceCell<PgPool>>>) -> (StatusCode, &'static str) {
    let Some(pool) = ready.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n");
    };
    // The pool would wait up to its acquire timeout (10 s) for a connection to a database that is
    // down; a readiness probe needs its answer sooner.
    match tokio::time::timeout(READYZ_DB_TIMEOUT, cairn_reconciler::store::ping(pool)).await {
        Ok(Ok(true)) => (StatusCode::OK, "ready\n"),
        Ok(Ok(false)) => (StatusCode::SERVICE_UNAVAILABLE, "database read-only\n"),
        Ok(Err(_)) | Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
    }
}
