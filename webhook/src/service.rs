//! The GitHub integration as `cairn serve` runs it: the receiver's router, and the workers behind it
//! (deliveries, head checks, pull-request plans, the outbox, retention), started together and stopped
//! together.
//!
//! ```text
//!  POST /webhooks/github ──► webhook_deliveries ──► delivery worker (CairnHandler)
//!                                                      │ NOTIFY cairn_webhook_work
//!                     ┌────────────────────────────────┼───────────────────────┐
//!                     ▼ 'reconcile'                    ▼ 'heads'               ▼ 'pulls'
//!              reconciler wakes              head checker: ls-remote,    pull-request planner: fetch
//!              (fetches the config head)     source_heads, wake ──►      refs/pull/N/head, plan,
//!                                            reconciler                  comment + cairn/plan ──► outbox
//!  reconciler applies ── hooks (GitHubStatuses): cairn/apply, cairn/deploy/<app> ──────────────► outbox
//!                                                                            outbox worker ──► GitHub
//! ```
//!
//! What it must not do: decide anything (it only wires the modules that do), or outlive `shutdown`:
//! [`Webhooks::run`] returns once every worker has stopped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use cairn_reconciler::controller::Controller;
use cairn_reconciler::hooks::Hooks;
use cairn_reconciler::source::heads::HeadPoller;
use cairn_reconciler::store::listen::{Heard, forward};
use cairn_reconciler::worker::{Shutdown, Worker};
use cairn_schema::source::Rewrites;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::deliveries;
use crate::events::TrackedRepo;
use crate::github::{GitHub, GitHubConfig, GitHubError};
use crate::handler::CairnHandler;
use crate::heads::HeadChecker;
use crate::outbox::{self, OutboxConfig, OutboxWorker};
use crate::pulls::PullPlanner;
use crate::receiver;
use crate::signature::WebhookSecret;
use crate::statuses::GitHubStatuses;
use crate::store;

/// How `cairn serve` configured the integration.
#[derive(Debug)]
pub struct Settings {
    /// Without a secret the endpoint is not served (the workers still run: statuses need them).
    pub secret: Option<WebhookSecret>,
    /// Without credentials nothing is sent to GitHub: no statuses, no plan comments.
    pub github: Option<GitHubConfig>,
    /// The config repository as `--repo` and `--ref` name it, when it is a git URL.
    pub config_repo: Option<TrackedRepo>,
    /// Where the config repository is fetched from (`--repo` after the rewrites).
    pub config_fetch_url: Option<String>,
    /// `--git-rewrite`: app sources (and the config repository) are fetched through them.
    pub rewrites: Rewrites,
    /// `--refuse-private-sources`: app sources resolving to a private address are not asked for heads.
    pub refuse_private_sources: bool,
    /// Where git caches live (`--cache-dir`).
    pub cache_root: PathBuf,
    /// Finished deliveries, calls and records are deleted after this long.
    pub retention: Duration,
    /// The workers look for work at least this often, notifications or not.
    pub poll: Duration,
    pub outbox: OutboxConfig,
}

/// A failure to start the integration.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    GitHub(#[from] GitHubError),
}

/// The statuses hook for the reconciler, when GitHub credentials are configured; install it on the
/// [`Controller`] before it starts.
pub fn hooks(settings: &Settings) -> Option<Arc<dyn Hooks>> {
    let github = settings.github.clone()?;
    let url = settings.config_repo.as_ref().map(|c| c.url.as_str());
    Some(Arc::new(GitHubStatuses::new(url, github)))
}

/// The running integration.
#[derive(Debug)]
pub struct Webhooks {
    pool: PgPool,
    router: Option<Router>,
    handler: Arc<CairnHandler>,
    deliveries_wake: Arc<Notify>,
    reconcile: Arc<Notify>,
    checker: HeadChecker,
    planner: Option<PullPlanner>,
    outbox: Option<OutboxWorker>,
    retention: Duration,
    poll: Duration,
}

impl Webhooks {
    /// Sets the integration up (within a Tokio runtime); nothing runs before [`Webhooks::run`].
    /// `reconcile` wakes the reconciler.
    pub fn new(
        settings: Settings,
        pool: PgPool,
        controller: Arc<Controller>,
        reconcile: Arc<Notify>,
    ) -> Result<Webhooks, ServiceError> {
        let deliveries_wake = Arc::new(Notify::new());
        let router = settings
            .secret
            .map(|secret| receiver::router(pool.clone(), secret, deliveries_wake.clone()));
        let github = settings
            .github
            .map(|config| GitHub::new(config).map(Arc::new))
            .transpose()?;
        let handler = Arc::new(CairnHandler::new(
            pool.clone(),
            settings.config_repo.clone(),
            github.is_some(),
        ));
        let poller = HeadPoller::new(
            settings.cache_root.join("webhook-heads.git"),
            settings.rewrites.clone(),
        )
        .refuse_private(settings.refuse_private_sources);
        let checker = HeadChecker::new(pool.clone(), poller, reconcile.clone());
        let planner = match (&github, settings.config_fetch_url) {
            (Some(_), Some(url)) => {
                let cache = cairn_reconciler::source::git::cache_dir(
                    &settings.cache_root.join("pulls"),
                    &url,
                );
                let heads = HeadPoller::new(
                    settings.cache_root.join("pull-heads.git"),
                    settings.rewrites.clone(),
                )
                .refuse_private(settings.refuse_private_sources);
                Some(PullPlanner::new(pool.clone(), controller, url, cache).with_heads(heads))
            }
            _ => None,
        };
        let outbox = github.map(|g| OutboxWorker::new(pool.clone(), g, settings.outbox));
        Ok(Webhooks {
            pool,
            router,
            handler,
            deliveries_wake,
            reconcile,
            checker,
            planner,
            outbox,
            retention: settings.retention,
            poll: settings.poll,
        })
    }

    /// `POST /webhooks/github`, when a secret is configured.
    pub fn router(&self) -> Option<Router> {
        self.router.clone()
    }

    /// Runs every worker until `shutdown` is triggered; returns when all have stopped.
    pub async fn run(self, shutdown: Shutdown) {
        let heads_wake = Arc::new(Notify::new());
        let pulls_wake = Arc::new(Notify::new());
        let mut tasks = tokio::task::JoinSet::new();

        {
            let (pool, handler, wake, poll, stop) = (
                self.pool.clone(),
                self.handler.clone(),
                self.deliveries_wake.clone(),
                self.poll,
                shutdown.clone(),
            );
            tasks.spawn(async move { deliveries::run(pool, handler, wake, poll, &stop).await });
        }
        {
            let wakes = Wakes {
                reconcile: self.reconcile.clone(),
                heads: heads_wake.clone(),
                pulls: pulls_wake.clone(),
            };
            let (pool, stop) = (self.pool.clone(), shutdown.clone());
            tasks.spawn(async move { listen(pool, wakes, &stop).await });
        }
        {
            let checker = self.checker.clone();
            let (wake, poll, stop) = (heads_wake, self.poll, shutdown.clone());
            tasks.spawn(async move { checker.run(wake, poll, &stop).await });
        }
        if let Some(planner) = self.planner.clone() {
            let (wake, poll, stop) = (pulls_wake, self.poll, shutdown.clone());
            tasks.spawn(async move { planner.run(wake, poll, &stop).await });
        } else {
            tracing::info!(
                "pull requests are not planned: that needs GitHub credentials and a git config repository"
            );
        }
        if let Some(worker) = self.outbox.clone() {
            let stop = shutdown.clone();
            tasks.spawn(async move { worker.run(&stop).await });
        } else {
            tracing::info!(
                "no GitHub credentials (CAIRN_GITHUB_TOKEN, or CAIRN_GITHUB_APP_ID with \
                 CAIRN_GITHUB_APP_PRIVATE_KEY_FILE): commit statuses and plan comments are off"
            );
        }
        {
            let (pool, retention, stop) = (self.pool.clone(), self.retention, shutdown.clone());
            tasks.spawn(async move { prune(pool, retention, &stop).await });
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a webhook worker stopped abnormally");
            }
        }
    }
}

/// Whom a `cairn_webhook_work` notification wakes.
struct Wakes {
    reconcile: Arc<Notify>,
    heads: Arc<Notify>,
    pulls: Arc<Notify>,
}

/// Turns `NOTIFY cairn_webhook_work` (sent at the commit of a delivery's transaction) into in-process
/// wake-ups; reconnects after a lost connection (the workers' polls cover the gap).
async fn listen(pool: PgPool, wakes: Wakes, shutdown: &Shutdown) {
    let on = |heard: Heard<'_>| match heard {
        // Anything notified while not listening is found by the workers' first pass after this.
        Heard::Listening => {
            wakes.heads.notify_one();
            wakes.pulls.notify_one();
        }
        Heard::Notified("reconcile") => wakes.reconcile.notify_one(),
        Heard::Notified("heads") => wakes.heads.notify_one(),
        Heard::Notified("pulls") => wakes.pulls.notify_one(),
        Heard::Notified(other) => {
            tracing::debug!(payload = other, "unknown webhook work notification")
        }
    };
    forward(pool, store::WORK_CHANNEL, "webhook work", on, shutdown).await
}

/// What one [`prune_once`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Finished deliveries.
    pub deliveries: u64,
    /// Finished (done or dead) GitHub calls and notifications.
    pub calls: u64,
    /// Pushes, commit statuses, deploys and planned pull requests.
    pub records: u64,
}

/// A pruning failure.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Deliveries(#[from] deliveries::DeliveryError),
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    #[error(transparent)]
    Notify(#[from] crate::notify::NotifyError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// Deletes what finished longer than `retention` ago; what is still waiting (a delivery, a call, a
/// pull request to plan) is kept whatever its age.
pub async fn prune_once(pool: &PgPool, retention: Duration) -> Result<Pruned, PruneError> {
    Ok(Pruned {
        deliveries: deliveries::prune_deliveries(pool, retention).await?,
        calls: outbox::prune(pool, retention).await?
            + crate::notify::prune(pool, retention).await?,
        records: store::prune_work(pool, retention.as_secs_f64()).await?,
    })
}

/// Deletes what is older than `retention`, now and then.
async fn prune(pool: PgPool, retention: Duration, shutdown: &Shutdown) {
    let every = (retention / 10).clamp(Duration::from_secs(60), Duration::from_secs(3600));
    Worker::new("pruning webhook history", every)
        .run(shutdown, |_| async {
            let p = prune_once(&pool, retention).await?;
            if p != Pruned::default() {
                tracing::info!(
                    deliveries = p.deliveries,
                    calls = p.calls,
                    records = p.records,
                    "pruned webhook history"
                )
            }
            Ok::<_, PruneError>(None)
        })
        .await
}
