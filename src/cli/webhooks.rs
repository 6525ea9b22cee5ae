//! The GitHub integration on the command line: `cairn webhooks` (recent deliveries and what each
//! caused), and `cairn serve`'s flags for it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use cairn_server::WebhookSettings;
use cairn_webhook::deliveries::{self, DeliveryRecord, DeliveryStatus};
use cairn_webhook::github::GitHubConfig;
use cairn_webhook::signature::WebhookSecret;

use super::control::runtime;

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
    /// How long a notification is retried before it is dead
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    notify_retry_window: Duration,
    /// The first notification retry's delay (each further one doubles, with jitter, up to 30m)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s", hide = true)]
    notify_retry_delay: Duration,
    /// How long a notification being sent is reserved for its worker (a killed one's is sent again
    /// after this)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m", hide = true)]
    notify_lease: Duration,
}

/// What [`cairn_server::serve`] makes of these flags: the secret (from its file or the environment)
/// and the GitHub credentials (from the environment).
pub fn settings(args: &ServeArgs) -> Result<WebhookSettings> {
    let secret = WebhookSecret::from_file_or_env(args.github_webhook_secret_file.as_deref())
        .context("cannot read the GitHub webhook secret")?;
    let github = GitHubConfig::from_env().context("invalid GitHub configuration")?;
    Ok(WebhookSettings {
        secret,
        github,
        retention: args.webhook_retention,
        call_lease: args.github_call_lease,
        poll: args.webhook_poll,
        notify: cairn_webhook::notify::NotifyConfig {
            base_backoff: args.notify_retry_delay,
            retry_window: args.notify_retry_window,
            lease: args.notify_lease,
            ..Default::default()
        },
    })
}

/// `cairn webhooks`: recent deliveries and what each caused.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The admin API (--server, CAIRN_SERVER and CAIRN_TOKEN) or else the database
    #[command(flatten)]
    target: super::args::TargetArgs,
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
