//! `cairn plan`, `cairn apply` and `cairn status`: the control plane's state in PostgreSQL against the
//! config source.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_plan::render;
use cairn_reconciler::controller::{Controller, Outcome, Trigger};
use cairn_reconciler::store::ReconcileStatus;

use super::args::{DbArgs, SourceArgs};
use super::{EXIT_FAILURE, read_identity};

pub async fn controller(db: &DbArgs, src: &SourceArgs) -> Result<Controller> {
    let pool = cairn_reconciler::store::connect(&db.database_url, 4)
        .await
        .context("cannot connect to the database")?;
    cairn_reconciler::store::migrate(&pool)
        .await
        .context("cannot migrate the database")?;
    let identity = read_identity(src.identity.as_ref())?;
    Ok(Controller::open(pool, &src.settings(), identity)?)
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
            // Manual runs always plan.
            Outcome::Unchanged { .. } => {
                println!("\nNothing to apply.");
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The admin API (--server, CAIRN_SERVER and CAIRN_TOKEN) or else the database
    #[command(flatten)]
    target: super::args::TargetArgs,
    /// Print the status as JSON
    #[arg(long)]
    json: bool,
    /// Show only this app
    #[arg(long)]
    app: Option<cairn_schema::Name>,
    /// Show the apps named after this one (the cursor a longer list ends with)
    #[arg(long)]
    after: Option<cairn_schema::Name>,
    /// Show at most this many apps (1 to 1000)
    #[arg(long, default_value_t = cairn_reconciler::status::DEFAULT_APPS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(cairn_reconciler::status::MAX_APPS)))]
    limit: u32,
    /// A node heard from longer ago than this is shown offline (from the database; the API uses the
    /// server's own threshold)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90s")]
    node_offline_after: Duration,
}

pub fn status(args: StatusArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let query = cairn_reconciler::status::StatusQuery {
            app: args.app.as_ref().map(|a| a.to_string()),
            after: args.after.as_ref().map(|a| a.to_string()),
            limit: Some(args.limit),
        };
        let status: cairn_reconciler::status::Status = match args.target.resolve()? {
            super::remote::Target::Api(api) => {
                // Names are DNS labels: nothing in them needs escaping in a query string.
                let mut q = format!("?limit={}", args.limit);
                if let Some(app) = &query.app {
                    q += &format!("&app={app}");
                }
                if let Some(after) = &query.after {
                    q += &format!("&after={after}");
                }
                api.get(&format!("/status{q}")).await?
            }
            super::remote::Target::Db(url) => {
                let pool = cairn_reconciler::store::connect(&url, 2)
                    .await
                    .context("cannot connect to the database")?;
                cairn_reconciler::store::migrate(&pool)
                    .await
                    .context("cannot migrate the database")?;
                cairn_reconciler::status::load(&pool, args.node_offline_after, &query).await?
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
    match (&s.next_after, s.apps_total) {
        (Some(after), Some(total)) => {
            let _ = writeln!(
                out,
                "({} of {total} apps shown; the next ones: `cairn status --after {after}`, one: `--app NAME`)",
                s.apps.len()
            );
        }
        (None, Some(total)) if total as usize > s.apps.len() => {
            let _ = writeln!(out, "({} of {total} apps shown)", s.apps.len());
        }
        _ => {}
    }
    let routes = render_routes(s);
    if !routes.is_empty() {
        let _ = writeln!(
            out,
            "\nROUTES (every ingress node with an address serves every app)"
        );
        out.push_str(&routes);
    }
    let _ = writeln!(out, "\nNODES");
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<20} {:>13} {:>19} {:>19} {:>8} {:>8}  {:<8}  ADDRESS",
        "NAME", "STATE", "LAST HEARTBEAT", "CPU", "MEMORY", "DISK", "REPLICAS", "RUNNING", "ROLE"
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
        let role = if n.ingress { "ingress" } else { "internal" };
        let address = n
            .address
            .as_deref()
            .unwrap_or("no address: serves only its own replicas");
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<20} {:>13} {:>19} {:>19} {:>8} {:>8}  {:<8}  {}",
            n.name,
            state,
            last,
            cpu,
            format!("{}/{}", hb(n.used_memory_bytes), hb(n.memory_bytes)),
            format!("{}/{}", hb(n.used_disk_bytes), hb(n.disk_bytes)),
            n.replicas,
            running,
            role,
            address
        );
    }
    if s.nodes.iter().any(|n| n.drain) {
        let _ = writeln!(out, "(* draining)");
    }
    if let Some(cp) = &s.control_planes {
        out.push_str(&render_control_planes(cp));
    }
    if !s.database_warnings.is_empty() {
        let _ = writeln!(out, "\nDATABASES (`cairn db list` shows every one)");
        for w in &s.database_warnings {
            let _ = writeln!(out, "WARNING {w}");
        }
    }
    if !s.certificate_warnings.is_empty() {
        let _ = writeln!(out, "\nCERTIFICATES (`cairn certs` shows every one)");
        for w in &s.certificate_warnings {
            let _ = writeln!(out, "WARNING {w}");
        }
    }
    out
}

/// The control planes and their leader: which replica holds the lease, its epoch and the lease's age.
fn render_control_planes(cp: &cairn_reconciler::status::ControlPlanes) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    match (&cp.leader, cp.lease_age_secs) {
        (Some(l), Some(age)) => {
            let _ = writeln!(
                out,
                "\nCONTROL PLANES (leader {l}, epoch {}, for {:.0}s, lease renewed {age:.1}s ago)",
                cp.epoch,
                cp.leader_for_secs.unwrap_or(0.0)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "\nCONTROL PLANES (no leader: the lease of epoch {} expired)",
                cp.epoch
            );
        }
    }
    let _ = writeln!(
        out,
        "{:<24} {:<8} {:<12} {:<20} {:>10}  ADDRESS",
        "ID", "ROLE", "VERSION", "STARTED", "LAST SEEN"
    );
    for r in &cp.replicas {
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<12} {:<20} {:>9.1}s  {}",
            r.id,
            if r.leader { "leader" } else { "standby" },
            r.version,
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
            r.last_seen_secs,
            r.address
        );
    }
    out
}

/// Each app's hosts, where its healthy replicas are and which ingress nodes take its traffic (a node
/// that is not online marked so); empty for a status without routes (an older server's).
fn render_routes(s: &cairn_reconciler::status::Status) -> String {
    use std::fmt::Write as _;
    let shown = |node: &str| match s.nodes.iter().find(|n| n.name == node) {
        Some(n) if n.state != cairn_plan::observed::NodeState::Online => {
            format!("{node} ({})", n.state.as_str())
        }
        _ => node.to_owned(),
    };
    let mut out = String::new();
    for a in s.apps.iter().filter(|a| !a.hosts.is_empty()) {
        let _ = writeln!(out, "{:<24} {}", a.name, a.hosts.join(", "));
        let replicas = if a.healthy_nodes.is_empty() {
            "no healthy replica: requests answer 503".to_owned()
        } else {
            format!("healthy replicas on {}", a.healthy_nodes.join(", "))
        };
        let ingress = if a.ingress_nodes.is_empty() {
            "no ingress node takes its traffic: not reachable from outside".to_owned()
        } else {
            let nodes: Vec<String> = a.ingress_nodes.iter().map(|n| shown(n)).collect();
            format!("ingress nodes {}", nodes.join(", "))
        };
        let _ = writeln!(out, "{:<24} {replicas}; {ingress}", "");
    }
    out
}

#[cfg(test)]
mod tests {
    use cairn_plan::observed::NodeState;
    use cairn_reconciler::status::{AppStatus, NodeView, Status};

    use super::render_status;

    fn app(name: &str, hosts: &[&str], healthy: &[&str], ingress: &[&str]) -> AppStatus {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        AppStatus {
            name: name.into(),
            desired_replicas: 1,
            placed_replicas: 1,
            suspended: false,
            replicas: Vec::new(),
            latest_release: Some(1),
            source_commit: None,
            pinned_release: None,
            hosts: strings(hosts),
            healthy_nodes: strings(healthy),
            ingress_nodes: strings(ingress),
        }
    }

    fn node(name: &str, state: NodeState, address: Option<&str>, ingress: bool) -> NodeView {
        NodeView {
            name: name.into(),
            state,
            last_heartbeat: None,
            region: None,
            drain: false,
            cpu_millis: 2000,
            memory_bytes: 1 << 31,
            disk_bytes: 1 << 34,
            used_cpu_millis: 0,
            used_memory_bytes: 0,
            used_disk_bytes: 0,
            replicas: 0,
            agent: None,
            address: address.map(str::to_owned),
            ingress,
        }
    }

    /// Each app says where it is reachable (or that it answers 503), and each node its role and address.
    #[test]
    fn status_shows_where_apps_are_reachable_and_each_nodes_role() {
        let s = Status {
            generation: 2,
            applied_commit: None,
            apps: vec![
                app(
                    "shop",
                    &["shop.apps.example.com", "shop.example.com"],
                    &["fra-2", "nyc-1"],
                    &["fra-1", "nyc-1"],
                ),
                app("blog", &["blog.apps.example.com"], &[], &["fra-1"]),
                app("lonely", &["lonely.apps.example.com"], &["fra-2"], &[]),
            ],
            nodes: vec![
                node("fra-1", NodeState::Offline, Some("10.0.1.11:8000"), true),
                node("fra-2", NodeState::Online, Some("10.0.1.12:8000"), false),
                node("nyc-1", NodeState::Online, None, true),
            ],
            last_reconciliation: None,
            certificate_warnings: Vec::new(),
            database_warnings: Vec::new(),
            apps_total: None,
            next_after: None,
            control_planes: None,
        };
        insta::assert_snapshot!(render_status(&s));

        // An older server's status (no hosts) shows no routes.
        let mut old = s.clone();
        for a in &mut old.apps {
            a.hosts.clear();
        }
        assert!(!render_status(&old).contains("ROUTES"));
    }
}
