//! The GitHub integration on the command line: `cairn webhooks` (recent deliveries and what each
//! caused), and what `cairn serve` needs to run it (its flags, the endpoint, the workers).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use cairn_reconciler::controller::Controller;
use cairn_reconciler::worker::Shutdown;
use cairn_schema::source::Rewrites;
use cairn_webhook::deliveries::{self, DeliveryRecord, DeliveryStatus};
use cairn_webhook::events::TrackedRepo;
use cairn_webhook::github::GitHubConfig;
use cairn_webhook::outbox::OutboxConfig;
use cairn_webhook::receiver::WEBHOOK_PATH;
use cairn_webhook::service::{self, Settings, Webhooks};
use cairn_webhook::signature::WebhookSecret;
use tokio::sync::{Notify, OnceCell};
use tower::ServiceExt as _;

use super::control::{DbArgs, SourceArgs, runtime};

/// `cairn serve`'s flags for the GitHub integration. Credentials come from the environment
/// (`CAIRN_GITHUB_TOKEN`, or `CAIRN_GITHUB_APP_ID` with `CAIRN_GITHUB_APP_PRIVATE_KEY_FILE`;
/// `CAIRN_GITHUB_API_URL` for GitHub Enterprise).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The GitHub webhook secret, read from a file (else CAIRN_GITHUB_WEBHOOK_SECRET); without one,
    /// POST /webhooks/github is not served
    #[arg(long, value_name = "FILE")]
    github_webhook_secret_file: Option<PathBuf>,
    /// Webhook deliveries, GitHub calls and what they caused are kept this long
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
    webhook_retention: Duration,
    /// How long a GitHub call is reserved for the worker making it (a worker that dies holds it
    /// this long)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m", hide = true)]
    github_call_lease: Duration,
    /// How often the webhook workers look for work without being notified
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s", hide = true)]
    webhook_poll: Duration,
}

/// What is known before the database is: the secret and the GitHub credentials.
#[derive(Debug)]
pub struct Prepared {
    args: ServeArgs,
    secret: Option<WebhookSecret>,
    github: Option<GitHubConfig>,
    router: Arc<OnceCell<Router>>,
}

impl Prepared {
    pub fn new(args: &ServeArgs) -> Result<Prepared> {
        let secret = WebhookSecret::from_file_or_env(args.github_webhook_secret_file.as_deref())
            .context("cannot read the GitHub webhook secret")?;
        let github = GitHubConfig::from_env().context("invalid GitHub configuration")?;
        Ok(Prepared {
            args: args.clone(),
            secret,
            github,
            router: Arc::default(),
        })
    }

    /// Adds `POST /webhooks/github` when a secret is configured. Until the database is reachable it
    /// answers 503, which GitHub shows and lets an operator redeliver.
    pub fn mount(&self, app: Router) -> Router {
        if self.secret.is_none() {
            tracing::info!(
                "no GitHub webhook secret (--github-webhook-secret-file or \
                 CAIRN_GITHUB_WEBHOOK_SECRET): POST {WEBHOOK_PATH} is off"
            );
            return app;
        }
        tracing::info!("GitHub webhooks: POST {WEBHOOK_PATH}");
        let router = self.router.clone();
        app.route(
            WEBHOOK_PATH,
            post(move |request: Request| forward(router.clone(), request)),
        )
    }

    /// Installs the commit-status hooks on the controller (before it is shared).
    pub fn install_hooks(&self, controller: &mut Controller, src: &SourceArgs) -> Result<()> {
        controller.hooks = service::hooks(&self.settings_preview(src)?);
        Ok(())
    }

    fn settings_preview(&self, src: &SourceArgs) -> Result<Settings> {
        let rewrites = Rewrites::parse(&src.git_rewrite).map_err(anyhow::Error::msg)?;
        let git = !Path::new(&src.repo).is_dir();
        let branch = src
            .git_ref
            .strip_prefix("refs/heads/")
            .unwrap_or(&src.git_ref);
        let config_repo = (git && !branch.starts_with("refs/")).then(|| TrackedRepo {
            url: src.repo.clone(),
            branch: branch.to_owned(),
        });
        let config_fetch_url = if git {
            Some(config_fetch_url(src)?)
        } else {
            None
        };
        Ok(Settings {
            secret: None,
            github: self.github.clone(),
            config_repo,
            config_fetch_url,
            rewrites,
            refuse_private_sources: src.refuse_private_sources,
            cache_root: src.cache_root(),
            retention: self.args.webhook_retention,
            poll: self.args.webhook_poll,
            outbox: OutboxConfig {
                lease: self.args.github_call_lease,
                ..OutboxConfig::default()
            },
        })
    }

    /// Starts the receiver and the workers; the returned task ends once `shutdown` is triggered and
    /// every worker stopped.
    pub async fn start(
        self,
        db: &DbArgs,
        src: &SourceArgs,
        controller: Arc<Controller>,
        reconcile: Arc<Notify>,
        shutdown: Shutdown,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let mut settings = self.settings_preview(src)?;
        settings.secret = self.secret;
        // A pool of its own: a burst of deliveries never waits behind the reconciler, nor it behind them.
        let pool = cairn_reconciler::store::connect(&db.database_url, 10)
            .await
            .context("cannot connect to the database")?;
        let webhooks = Webhooks::new(settings, pool, controller, reconcile)
            .context("cannot set up the GitHub integration")?;
        if let Some(router) = webhooks.router() {
            let _ = self.router.set(router);
        }
        Ok(tokio::spawn(webhooks.run(shutdown)))
    }
}

/// The URL the config repository is fetched from: `--repo` through the `--git-rewrite`s.
pub fn config_fetch_url(src: &SourceArgs) -> Result<String> {
    let rewrites = Rewrites::parse(&src.git_rewrite).map_err(anyhow::Error::msg)?;
    Ok(rewrites
        .apply(&src.repo)
        .map_err(anyhow::Error::msg)?
        .unwrap_or_else(|| src.repo.clone()))
}

async fn forward(router: Arc<OnceCell<Router>>, request: Request) -> Response {
    match router.get() {
        Some(router) => match router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "error": "the control plane is starting" })),
        )
            .into_response(),
    }
}

/// `cairn webhooks`: recent deliveries and what each caused.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The admin API (--server, CAIRN_SERVER and CAIRN_TOKEN) or else the database
    #[command(flatten)]
    target: super::remote::TargetArgs,
    /// How many deliveries to show, newest first (at most 1000)
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let recent: Vec<DeliveryRecord> = match args.target.resolve()? {
            super::remote::Target::Api(api) => {
                api.get(&format!("/webhooks?limit={}", args.limit)).await?
            }
            super::remote::Target::Db(url) => {
                let pool = cairn_reconciler::store::connect(&url, 2)
                    .await
                    .context("cannot connect to the database")?;
                deliveries::recent(&pool, args.limit).await.context(
                    "cannot read the webhook deliveries (has `cairn serve` run on this database?)",
                )?
            }
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&recent)?);
            return Ok(ExitCode::SUCCESS);
        }
        if recent.is_empty() {
            println!("no webhook deliveries");
            return Ok(ExitCode::SUCCESS);
        }
        let events: Vec<String> = recent
            .iter()
            .map(|d| match &d.action {
                Some(a) => format!("{}.{a}", d.event),
                None => d.event.clone(),
            })
            .collect();
        let id_width = recent
            .iter()
            .map(|d| d.delivery_id.len())
            .max()
            .unwrap_or(8)
            .max(8);
        let event_width = events.iter().map(String::len).max().unwrap_or(5).max(5);
        println!(
            "{:<19}  {:<id_width$}  {:<event_width$}  {:<8}  WHAT IT CAUSED",
            "RECEIVED", "DELIVERY", "EVENT", "STATUS"
        );
        for (d, event) in recent.iter().zip(&events) {
            let mut outcome = d.outcome.clone().unwrap_or_default();
            if d.status == DeliveryStatus::Received && d.attempts > 0 {
                outcome = format!("retrying after {} attempts: {outcome}", d.attempts);
            }
            println!(
                "{:<19}  {:<id_width$}  {:<event_width$}  {:<8}  {}",
                d.received_at.format("%Y-%m-%d %H:%M:%S"),
                d.delivery_id,
                event,
                d.status.as_str(),
                outcome.replace(['\n', '\r'], " ")
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
