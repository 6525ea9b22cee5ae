//! `cairn releases APP`, `cairn rollback APP [RELEASE]`, `cairn unpin APP`, `cairn restart APP` and
//! `cairn deploy APP`: through the admin API when given `--server` and a token, else against the database
//! (`deploy` needs the control plane: it reads the branch head through the server's `--git-rewrite`s and
//! wakes its reconciler). Against the database, a running `cairn serve` acts on the change at its next
//! reconcile (its `--interval`); through the API, at once.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::{Result, bail};
use cairn_proto::admin::{Deployed, Pinned, ReleaseInfo, Releases, Restarted, RollbackRequest};
use cairn_reconciler::releases;
use cairn_schema::Name;

use super::args::TargetArgs;
use super::control::runtime;
use super::remote::{Target, connect_db};

#[derive(Debug, clap::Args)]
pub struct ReleasesArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The app (its releases outlive it in the configuration)
    app: Name,
    /// Print the releases as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    target: TargetArgs,
    app: Name,
    /// The release to go back to (default: the last one before the current one that ran)
    release: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct AppArgs {
    #[command(flatten)]
    target: TargetArgs,
    app: Name,
}

pub fn list(args: ReleasesArgs) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let app = &args.app;
        let r: Releases = match args.target.resolve()? {
            Target::Api(api) => api.get(&format!("/apps/{app}/releases")).await?,
            Target::Db(url) => {
                let pool = connect_db(&url).await?;
                releases::list(&pool, app).await?
            }
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print!("{}", render(&r));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The releases as a terminal table, newest first.
pub fn render(r: &Releases) -> String {
    let mut o = String::new();
    match (r.declared, r.pinned_release) {
        (false, _) => {
            let _ = writeln!(o, "App {} is no longer in the configuration.", r.app);
        }
        (true, Some(p)) => {
            let _ = writeln!(
                o,
                "App {} is pinned to release {p} by a rollback: pushes do not deploy until `cairn unpin {}` or a change to its manifest.",
                r.app, r.app
            );
        }
        (true, None) => {}
    }
    let _ = writeln!(
        o,
        "{:>4}  {:<10}  {:<12}  {:<12}  {:<19}  {:<19}  {:<28}  WHERE",
        "REL", "STATUS", "SOURCE", "CONFIG", "IMAGE", "CREATED", "STAGES"
    );
    for x in &r.releases {
        let pin = if r.pinned_release == Some(x.number) {
            "*"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "{:>4}  {:<10}  {:<12}  {:<12}  {:<19}  {:<19}  {:<28}  {}",
            format!("{pin}{}", x.number),
            x.status,
            short(&x.source_commit, 12),
            short(&x.config_commit, 12),
            image(x),
            x.created_at.format("%Y-%m-%d %H:%M:%S"),
            stages(x),
            placement(x),
        );
        if let Some(e) = &x.error {
            let _ = writeln!(o, "      error: {e}");
        }
    }
    if r.releases.is_empty() {
        let _ = writeln!(o, "(no releases yet)");
    }
    if r.pinned_release.is_some() {
        let _ = writeln!(o, "(* pinned)");
    }
    o
}

fn short(s: &str, n: usize) -> &str {
    let is_hex = s.len() > n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if is_hex { &s[..n] } else { s }
}

fn image(x: &ReleaseInfo) -> String {
    match (&x.image_digest, &x.image) {
        (Some(d), _) => short(d.trim_start_matches("sha256:"), 12).to_owned(),
        (None, Some(i)) => i.clone(),
        (None, None) => "-".to_owned(),
    }
}

/// `fetch 0.8s build 41s ...`, in the order push-to-running goes.
fn stages(x: &ReleaseInfo) -> String {
    const ORDER: &[&str] = &[
        "fetch", "clone", "build", "push", "pull", "start", "healthy",
    ];
    let mut keys: Vec<&String> = x.stage_timings.keys().collect();
    keys.sort_by_key(|k| ORDER.iter().position(|o| o == k).unwrap_or(ORDER.len()));
    let parts: Vec<String> = keys
        .into_iter()
        .map(|k| {
            let ms = x.stage_timings[k];
            if ms < 1000 {
                format!("{k} {ms}ms")
            } else {
                format!("{k} {:.1}s", ms as f64 / 1000.0)
            }
        })
        .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(" ")
    }
}

fn placement(x: &ReleaseInfo) -> String {
    if x.placement.is_empty() {
        return "-".to_owned();
    }
    x.placement
        .iter()
        .map(|p| {
            let stopped = if p.state == "running" {
                ""
            } else {
                " (stopped)"
            };
            format!("{}:{}{stopped}", p.slot, p.node)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn rollback(args: RollbackArgs) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let app = &args.app;
        let (p, via_db): (Pinned, bool) = match args.target.resolve()? {
            Target::Api(api) => (
                api.post(
                    &format!("/apps/{app}/rollback"),
                    &RollbackRequest {
                        release: args.release,
                    },
                )
                .await?,
                false,
            ),
            Target::Db(url) => {
                let pool = connect_db(&url).await?;
                (releases::rollback(&pool, app, args.release).await?, true)
            }
        };
        let n = p.pinned_release.unwrap_or_default();
        println!(
            "{app} is pinned to release {n}: it runs release {n}'s image again (no build) and pushes do \
             not deploy until `cairn unpin {app}` or a change to its manifest"
        );
        next_reconcile(via_db);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn unpin(args: AppArgs) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let app = &args.app;
        let (p, via_db): (Pinned, bool) = match args.target.resolve()? {
            Target::Api(api) => (api.delete(&format!("/apps/{app}/pin")).await?, false),
            Target::Db(url) => {
                let pool = connect_db(&url).await?;
                (releases::unpin(&pool, app).await?, true)
            }
        };
        match p.previous {
            Some(n) => {
                println!("{app} is no longer pinned to release {n}: it deploys its latest release");
                next_reconcile(via_db);
            }
            None => println!("{app} was not pinned"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn restart(args: AppArgs) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let app = &args.app;
        let (r, via_db): (Restarted, bool) = match args.target.resolve()? {
            Target::Api(api) => (
                api.post(&format!("/apps/{app}/restart"), &serde_json::json!({}))
                    .await?,
                false,
            ),
            Target::Db(url) => {
                let pool = connect_db(&url).await?;
                (releases::restart(&pool, app).await?, true)
            }
        };
        println!(
            "restart {} of {app} requested: each running replica restarts once",
            r.count
        );
        next_reconcile(via_db);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn deploy(args: AppArgs) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let app = &args.app;
        let Target::Api(api) = args.target.resolve()? else {
            bail!(
                "`cairn deploy` needs the control plane (--server URL or CAIRN_SERVER, with \
                 CAIRN_TOKEN): it reads the branch head through the server's git rewrites and wakes \
                 its reconciler"
            );
        };
        let d: Deployed = api
            .post(&format!("/apps/{app}/deploy"), &serde_json::json!({}))
            .await?;
        let latest = d
            .latest_release
            .map_or_else(|| "none yet".to_owned(), |n| n.to_string());
        if d.moved {
            println!(
                "{app}: branch {} is at {}; the control plane deploys it now (latest release: {latest}; \
                 `cairn releases {app}` shows the new one)",
                d.branch, d.commit
            );
        } else {
            println!(
                "{app}: branch {} is still at {}, already recorded (latest release: {latest}); the \
                 control plane was woken to make sure it runs",
                d.branch, d.commit
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn next_reconcile(via_db: bool) {
    if via_db {
        eprintln!(
            "recorded in the database; a running `cairn serve` acts on it at its next reconcile (use \
             --server to have it act at once)"
        );
    }
}
