//! `cairn plan`, `cairn apply` and `cairn status`: the control plane's state in PostgreSQL against the
//! config source.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_reconciler::controller::{Controller, HeadPolling, Outcome, SourceSettings, Trigger};
use cairn_reconciler::plan::render;
use cairn_reconciler::store::ReconcileStatus;
use cairn_schema::source::Rewrites;

use super::{EXIT_FAILURE, read_identity};

/// Where the database is.
#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// PostgreSQL URL (or DATABASE_URL)
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: String,
}

/// Where the desired state is, and the key to its secrets.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// The config repository: a directory, or a git URL
    #[arg(long, value_name = "DIR|GIT_URL", default_value = ".")]
    pub repo: String,
    /// The branch (or full ref) of a git repository
    #[arg(long = "ref", value_name = "REF", default_value = "main")]
    pub git_ref: String,
    /// Where git sources are cached
    #[arg(long, value_name = "DIR", env = "CAIRN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The control plane's age identity (or CAIRN_IDENTITY): fingerprints secrets, re-encrypts them per node
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Fetch app sources whose URL starts with FROM from TO instead (like git's url.<base>.insteadOf);
    /// repeatable. Rewritten URLs are trusted operator configuration
    #[arg(long = "git-rewrite", value_name = "FROM=TO")]
    pub git_rewrite: Vec<String>,
    /// Refuse app sources whose host resolves to a private address (RFC 1918, CGNAT, IPv6 unique-local),
    /// as loopback, link-local and metadata addresses always are
    #[arg(long)]
    pub refuse_private_sources: bool,
    /// Do not poll app branch heads (leave pushes to webhooks); a head never read, or read from another
    /// branch than the app now follows, is still read once, so a new app or branch deploys at once
    #[arg(long)]
    pub no_poll_heads: bool,
    /// Seed for the scheduler's tie-breaks (the same seed gives the same plan)
    #[arg(long, default_value_t = 0, hide = true)]
    pub seed: u64,
}

impl SourceArgs {
    /// What the controller (and `cairn serve`) make of these flags. Every head is polled on the
    /// interval, or with --no-poll-heads only those with no usable record (pushes to known branches
    /// are the webhooks' to record).
    pub fn settings(&self) -> Result<SourceSettings> {
        Ok(SourceSettings {
            repo: self.repo.clone(),
            git_ref: self.git_ref.clone(),
            cache_root: self.cache_root(),
            rewrites: Rewrites::parse(&self.git_rewrite).map_err(anyhow::Error::msg)?,
            refuse_private_sources: self.refuse_private_sources,
            head_polling: if self.no_poll_heads {
                HeadPolling::Unknown
            } else {
                HeadPolling::All
            },
            seed: self.seed,
        })
    }

    pub fn cache_root(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("cairn")
        })
    }
}

pub async fn controller(db: &DbArgs, src: &SourceArgs) -> Result<Controller> {
    let pool = cairn_reconciler::store::connect(&db.database_url, 4)
        .await
        .context("cannot connect to the database")?;
    cairn_reconciler::store::migrate(&pool)
        .await
        .context("cannot migrate the database")?;
    let identity = read_identity(src.identity.as_ref())?;
    Ok(Controller::open(pool, &src.settings()?, identity)?)
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    src: SourceArgs,
    /// Print the plan as JSON
    #[arg(long)]
    json: bool,
    /// Exit 0 when nothing would change, 2 when something would, 1 on error
    #[arg(long)]
    exit_code: bool,
}

pub fn plan(args: PlanArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let c = controller(&args.db, &args.src).await?;
        let (snap, plan) = c.plan().await?;
        for d in snap.loaded.diagnostics.warnings() {
            eprintln!("{d}\n");
        }
        let Some(plan) = plan else {
            for d in snap.loaded.diagnostics.errors() {
                eprintln!("{d}\n");
            }
            eprintln!(
                "invalid: {} errors; nothing can be planned",
                snap.loaded.diagnostics.errors().count()
            );
            return Ok(ExitCode::from(EXIT_FAILURE));
        };
        if args.json {
            println!("{}", render::json(&plan));
        } else {
            print!("{}", render::text(&plan, std::io::stdout().is_terminal()));
        }
        Ok(if args.exit_code && !plan.is_empty() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        })
    })
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    src: SourceArgs,
    /// Apply without asking
    #[arg(long, short = 'y')]
    yes: bool,
}

pub fn apply(args: ApplyArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let c = controller(&args.db, &args.src).await?;
        let (snap, plan) = c.plan().await?;
        let Some(plan) = plan else {
            for d in snap.loaded.diagnostics.errors() {
                eprintln!("{d}\n");
            }
            // Record the failed attempt as serve would, so history shows it.
            let outcome = c.reconcile(Trigger::Manual).await?;
            debug_assert!(matches!(outcome, Outcome::Invalid { .. }));
            eprintln!("invalid: nothing applied");
            return Ok(ExitCode::from(EXIT_FAILURE));
        };
        print!("{}", render::text(&plan, std::io::stdout().is_terminal()));
        if plan.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        if !args.yes {
            if !std::io::stdin().is_terminal() {
                bail!("refusing to apply without confirmation: pass --yes when stdin is not a terminal");
            }
            print!("\nApply this plan? Only `yes` is accepted: ");
            std::io::stdout().flush()?;
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer)?;
            if answer.trim() != "yes" {
                eprintln!("apply cancelled");
                return Ok(ExitCode::from(EXIT_FAILURE));
            }
        }
        match c.reconcile_expecting(Trigger::Manual, Some(plan.based_on)).await? {
            Outcome::Applied(a) if a.status == ReconcileStatus::Applied => {
                println!("\nApplied generation {}: {} ({} tasks)", a.plan.generation, a.plan.summary(), a.tasks);
                Ok(ExitCode::SUCCESS)
            }
            Outcome::Applied(_) => {
                println!("\nNothing to apply.");
                Ok(ExitCode::SUCCESS)
            }
            Outcome::Invalid { .. } => bail!("the repository became invalid while applying; nothing applied"),
            Outcome::Behind { commit, applied } => {
                bail!("{commit} is older than the applied commit {applied}; nothing applied")
            }
        }
    })
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The admin API (--server, CAIRN_SERVER and CAIRN_TOKEN) or else the database
    #[command(flatten)]
    target: super::remote::TargetArgs,
    /// Print the status as JSON
    #[arg(long)]
    json: bool,
    /// A node heard from longer ago than this is shown offline (from the database; the API uses the
    /// server's own threshold)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90s")]
    node_offline_after: Duration,
}

pub fn status(args: StatusArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let status: cairn_reconciler::status::Status = match args.target.resolve()? {
            super::remote::Target::Api(api) => api.get("/status").await?,
            super::remote::Target::Db(url) => {
                let pool = cairn_reconciler::store::connect(&url, 2)
                    .await
                    .context("cannot connect to the database")?;
                cairn_reconciler::store::migrate(&pool)
                    .await
                    .context("cannot migrate the database")?;
                cairn_reconciler::status::load(&pool, args.node_offline_after).await?
            }
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&status)?);
        } else {
            print!("{}", render_status(&status));
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The status as a terminal table.
pub fn render_status(s: &cairn_reconciler::status::Status) -> String {
    use std::fmt::Write as _;
    let hb = render::human_bytes;
    let mut out = String::new();
    let commit = s
        .applied_commit
        .as_deref()
        .map_or("none", |c| &c[..c.len().min(12)]);
    let _ = writeln!(out, "Applied: generation {} at {commit}", s.generation);
    if let Some(r) = &s.last_reconciliation {
        let _ = writeln!(
            out,
            "Last reconcile: {} {} ({}, {} ms, by {}): {}",
            r.status.as_str(),
            r.finished_at.format("%Y-%m-%d %H:%M:%S UTC"),
            r.commit
                .as_deref()
                .map_or("no commit", |c| &c[..c.len().min(12)]),
            r.duration_ms,
            r.trigger,
            r.summary
        );
        for e in &r.errors {
            let _ = writeln!(out, "  {e}");
        }
    }
    let _ = writeln!(out, "\nAPPS");
    let _ = writeln!(
        out,
        "{:<24} {:>8} {:>8} {:>8}  WHERE",
        "NAME", "REPLICAS", "PLACED", "RELEASE"
    );
    for a in &s.apps {
        let wher: Vec<String> = a
            .replicas
            .iter()
            .map(|r| {
                let actual = match (&r.actual, r.state == "running") {
                    (_, false) => " (stopped)".to_owned(),
                    (None, true) => " (not reported)".to_owned(),
                    (Some(a), true) if a.release != r.release => format!(" (runs r{})", a.release),
                    (Some(a), true) if a.state != "running" => " (not running)".to_owned(),
                    (Some(a), true) if !a.healthy => " (unhealthy)".to_owned(),
                    (Some(_), true) => String::new(),
                };
                format!("{}:{}{actual}", r.slot, r.node)
            })
            .collect();
        let release = a.latest_release.map_or("-".to_owned(), |r| {
            if a.pinned_release.is_some() {
                format!("{r} pinned {}", a.pinned_release.unwrap_or(r))
            } else {
                r.to_string()
            }
        });
        let desired = if a.suspended {
            "suspended".to_owned()
        } else {
            a.desired_replicas.to_string()
        };
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:>8} {:>8}  {}",
            a.name,
            desired,
            a.placed_replicas,
            release,
            wher.join(" ")
        );
    }
    let _ = writeln!(out, "\nNODES");
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<20} {:>13} {:>19} {:>19} {:>8} {:>8}",
        "NAME", "STATE", "LAST HEARTBEAT", "CPU", "MEMORY", "DISK", "REPLICAS", "RUNNING"
    );
    for n in &s.nodes {
        let state = if n.drain {
            format!("{}*", n.state.as_str())
        } else {
            n.state.as_str().to_owned()
        };
        let last = n.last_heartbeat.map_or("never".to_owned(), |t| {
            t.format("%Y-%m-%d %H:%M:%S").to_string()
        });
        let cpu = format!(
            "{}/{}",
            n.used_cpu_millis as f64 / 1000.0,
            n.cpu_millis as f64 / 1000.0
        );
        // What the node's agent says runs there (placed or not), next to what is placed there.
        let running = n
            .agent
            .as_ref()
            .map_or("-".to_owned(), |a| a.running.to_string());
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<20} {:>13} {:>19} {:>19} {:>8} {:>8}",
            n.name,
            state,
            last,
            cpu,
            format!("{}/{}", hb(n.used_memory_bytes), hb(n.memory_bytes)),
            format!("{}/{}", hb(n.used_disk_bytes), hb(n.disk_bytes)),
            n.replicas,
            running
        );
    }
    if s.nodes.iter().any(|n| n.drain) {
        let _ = writeln!(out, "(* draining)");
    }
    out
}
