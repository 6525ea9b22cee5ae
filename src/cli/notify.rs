//! `cairn notify deliveries` (the notification ledger: what was sent to which sink, its status code,
//! latency and attempts, and why anything was not sent) and `cairn notify test SINK` (a test message
//! sent now, and what the receiver answered). Never a sink's URL.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use cairn_proto::admin::{NotifyDelivery, NotifyTestAnswer};
use cairn_schema::Name;

use super::args::TargetArgs;
use super::control::runtime;
use super::remote::Target;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Notifications, newest first: sink, event, status, attempts, status code, latency, reason
    Deliveries {
        #[command(flatten)]
        target: TargetArgs,
        /// Only this sink's
        #[arg(long)]
        sink: Option<Name>,
        /// How many to show (at most 1000)
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Send a test message to SINK through the control plane and print the receiver's answer
    /// (exit 1 unless it answered 2xx)
    Test {
        #[command(flatten)]
        target: TargetArgs,
        sink: Name,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        match args.command {
            Command::Deliveries {
                target,
                sink,
                limit,
                json,
            } => {
                let rows: Vec<NotifyDelivery> = match target.resolve()? {
                    Target::Api(api) => {
                        let mut path = format!("/notify/deliveries?limit={limit}");
                        if let Some(s) = &sink {
                            let _ = write!(path, "&sink={s}");
                        }
                        api.get(&path).await?
                    }
                    Target::Db(url) => {
                        let pool = cairn_reconciler::store::connect(&url, 2)
                            .await
                            .context("cannot connect to the database")?;
                        cairn_reconciler::store::migrate(&pool)
                            .await
                            .context("cannot migrate the database")?;
                        cairn_webhook::notify::deliveries(
                            &pool,
                            sink.as_ref().map(Name::as_str),
                            limit,
                        )
                        .await?
                    }
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    print!("{}", render(&rows));
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Test { target, sink, json } => {
                let answer: NotifyTestAnswer = match target.resolve()? {
                    Target::Api(api) => {
                        api.post(&format!("/notify/{sink}/test"), &serde_json::json!({}))
                            .await?
                    }
                    Target::Db(_) => bail!(
                        "`cairn notify test` goes through the control plane, which holds the \
                         identity that opens the sink's URL: give --server (or CAIRN_SERVER) and \
                         CAIRN_TOKEN"
                    ),
                };
                let ok = answer.status_code.is_some_and(|c| (200..300).contains(&c));
                if json {
                    println!("{}", serde_json::to_string_pretty(&answer)?);
                } else {
                    match answer.status_code {
                        Some(c) => println!(
                            "{}: the receiver answered {c} in {} ms",
                            answer.sink, answer.latency_ms
                        ),
                        None => println!("{}: no answer", answer.sink),
                    }
                    if let Some(e) = &answer.error {
                        println!("error: {e}");
                    }
                    if !answer.body.is_empty() {
                        println!("{}", answer.body.trim_end());
                    }
                }
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
        }
    })
}

/// The ledger as text: one line per notification, and the reason under it when there is one.
pub fn render(rows: &[NotifyDelivery]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("No notifications: declare a sink with `[notify.NAME]` in a manifest.\n");
        return out;
    }
    for d in rows {
        let answer = match (d.status_code, d.latency_ms) {
            (Some(c), Some(ms)) => format!("{c} in {ms} ms"),
            (Some(c), None) => c.to_string(),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{} {:<12} {:<20} {:<10} attempts {:<2} {answer}  event {} ({})",
            d.created_at.format("%Y-%m-%d %H:%M:%S"),
            d.sink,
            d.event.kind,
            d.status,
            d.attempts,
            d.event.id,
            d.webhook_id,
        );
        if let Some(r) = &d.reason {
            let _ = writeln!(out, "    {r}");
        }
    }
    out
}
