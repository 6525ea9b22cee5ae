//! `cairn events`: what happened (deploys, applies, nodes going offline and back, replicas no node can
//! take), oldest first, from the admin API or the database; `--follow` keeps printing new ones.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use cairn_proto::admin::EventInfo;
use cairn_reconciler::events::Filter;

use super::control::runtime;
use super::remote::Target;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The admin API (--server, CAIRN_SERVER and CAIRN_TOKEN) or else the database
    #[command(flatten)]
    target: super::args::TargetArgs,
    /// Only this app's events
    #[arg(long, value_name = "APP")]
    app: Option<cairn_schema::Name>,
    /// How many of the newest events to show first
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: u32,
    /// Keep printing new events as they happen
    #[arg(long, short)]
    follow: bool,
    /// One JSON object per event, one per line
    #[arg(long)]
    json: bool,
}

/// How often `--follow` asks for new events.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

pub fn run(args: Args) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let source = match args.target.resolve()? {
            Target::Api(api) => Source::Api(api),
            Target::Db(url) => {
                let pool = cairn_reconciler::store::connect(&url, 2)
                    .await
                    .context("cannot connect to the database")?;
                cairn_reconciler::store::migrate(&pool)
                    .await
                    .context("cannot migrate the database")?;
                Source::Db(pool)
            }
        };
        let mut filter = Filter {
            app: args.app.as_ref().map(|a| a.as_str().to_owned()),
            after: None,
            limit: args.limit,
        };
        loop {
            let events = source.read(&filter).await?;
            for e in &events {
                if args.json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    print!("{}", render(e));
                }
            }
            if let Some(last) = events.last() {
                filter.after = Some(last.id);
            }
            if !args.follow {
                if events.is_empty() && !args.json {
                    println!("No events.");
                }
                return Ok(ExitCode::SUCCESS);
            }
            filter.limit = 1000;
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    })
}

enum Source {
    Api(super::remote::AdminClient),
    Db(sqlx::PgPool),
}

impl Source {
    async fn read(&self, filter: &Filter) -> Result<Vec<EventInfo>> {
        match self {
            Source::Api(api) => {
                let mut path = format!("/events?limit={}", filter.limit);
                if let Some(app) = &filter.app {
                    let _ = write!(path, "&app={app}");
                }
                if let Some(after) = filter.after {
                    let _ = write!(path, "&after={after}");
                }
                api.get(&path).await
            }
            Source::Db(pool) => Ok(cairn_reconciler::events::list(pool, filter).await?),
        }
    }
}

/// One event as a line: time, severity, kind, message.
pub fn render(e: &EventInfo) -> String {
    format!(
        "{} {:<7} {:<20} {}\n",
        e.at.format("%Y-%m-%d %H:%M:%S"),
        e.severity,
        e.kind,
        e.message
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    #[test]
    fn an_event_is_one_line() {
        let e = EventInfo {
            id: 7,
            at: chrono::Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 0).unwrap(),
            kind: "deploy.failed".into(),
            severity: "error".into(),
            app: Some("shop".into()),
            node: Some("a".into()),
            release: Some(4),
            commit: Some("0123456789abcdef".into()),
            message: "release #4 of shop (commit 0123456789ab) failed: health check".into(),
            detail: serde_json::json!({}),
        };
        assert_eq!(
            render(&e),
            "2026-12-06 10:00:00 error   deploy.failed        release #4 of shop (commit 0123456789ab) failed: health check\n"
        );
    }
}
