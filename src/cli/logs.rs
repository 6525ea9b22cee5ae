//! `cairn logs APP [--follow]` (what the app's replicas print, as their agents ship it) and
//! `cairn logs APP --build [RELEASE]` (the build output kept with a release). Through the admin API when
//! given `--server` and a token, else against the database. `--follow` long-polls the API (a new line
//! arrives within moments of reaching the control plane), or polls the database every second.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use cairn_proto::admin::{AppLogs, BuildLogs, OutputLine};
use cairn_reconciler::releases;
use cairn_schema::Name;

use super::args::TargetArgs;
use super::control::runtime;
use super::remote::{Target, connect_db};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: TargetArgs,
    app: Name,
    /// The build output of RELEASE (default: the latest release) instead of the replicas' output
    #[arg(long, value_name = "RELEASE", num_args = 0..=1, default_missing_value = "0")]
    build: Option<u64>,
    /// Keep printing new lines as the replicas print them (until interrupted)
    #[arg(long, short = 'f', conflicts_with = "build")]
    follow: bool,
    /// How many of the latest lines to print first
    #[arg(long, default_value_t = 100)]
    tail: u32,
    /// One JSON object per line
    #[arg(long)]
    json: bool,
}

/// How long one follow request waits on the server for a new line.
const FOLLOW_WAIT_MS: u64 = 25_000;

pub fn run(args: Args) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let app = &args.app;
        let target = args.target.resolve()?;
        if let Some(release) = args.build {
            let release = (release != 0).then_some(release);
            let logs: BuildLogs = match &target {
                Target::Api(api) => {
                    let q = release.map_or_else(String::new, |r| format!("?release={r}"));
                    api.get(&format!("/apps/{app}/build-logs{q}")).await?
                }
                Target::Db(url) => {
                    let pool = connect_db(url).await?;
                    releases::build_logs(&pool, app, release).await?
                }
            };
            if !args.json {
                eprintln!("build output of {app} release {}", logs.release);
            }
            for l in &logs.lines {
                print_line(l, None, args.json)?;
            }
            if logs.lines.is_empty() && !args.json {
                eprintln!("(no build output kept for this release)");
            }
            return Ok(ExitCode::SUCCESS);
        }
        let pool = match &target {
            Target::Db(url) => Some(connect_db(url).await?),
            Target::Api(_) => None,
        };
        let fetch = |after: Option<i64>, wait_ms: u64| {
            let target = &target;
            let pool = pool.clone();
            async move {
                let page: AppLogs = match target {
                    Target::Api(api) => {
                        let mut q =
                            format!("?tail={}", args.tail.clamp(1, releases::MAX_LOG_LINES));
                        if let Some(a) = after {
                            q.push_str(&format!("&after={a}&wait_ms={wait_ms}"));
                        }
                        api.get(&format!("/apps/{app}/logs{q}")).await?
                    }
                    Target::Db(_) => {
                        let Some(pool) = pool else {
                            bail!("no database connection");
                        };
                        releases::app_logs(&pool, app, after, args.tail).await?
                    }
                };
                anyhow::Ok(page)
            }
        };
        let mut page = fetch(None, 0).await?;
        loop {
            for l in &page.lines {
                print_line(&l.line, Some(l.release), args.json)?;
            }
            std::io::stdout().flush()?;
            if !args.follow {
                return Ok(ExitCode::SUCCESS);
            }
            let cursor = page.cursor;
            if pool.is_some() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            page = fetch(Some(cursor), FOLLOW_WAIT_MS).await?;
        }
    })
}

fn print_line(l: &OutputLine, release: Option<u64>, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let mut v = serde_json::to_value(l)?;
        if let (Some(r), Some(o)) = (release, v.as_object_mut()) {
            o.insert("release".into(), r.into());
        }
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let slot = l.slot.map_or_else(String::new, |s| format!("/{s}"));
    let release = release.map_or_else(String::new, |r| format!(" r{r}"));
    writeln!(
        out,
        "{} {}{slot}{release} {}: {}",
        l.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        l.node,
        l.stream,
        l.text
    )?;
    Ok(())
}
