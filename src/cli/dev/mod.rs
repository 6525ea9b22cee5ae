//! `cairn dev [DIR]`: the whole platform on this machine, for trying Cairn and for working on a config
//! repository. In order:
//!
//! 1. validates DIR (an invalid repository stops here with every error);
//! 2. starts a private PostgreSQL under the state directory (`pg.rs`), unless `DATABASE_URL` is given;
//! 3. commits each `--app-sources` directory to a local bare repository and rewrites the manifests' URLs
//!    to it (`sources.rs`);
//! 4. picks the driver (Docker when an engine answers, else supervised processes) and, for Docker,
//!    builds the local base image `cairn-dev/busybox:1` and removes containers a crashed run left;
//! 5. shows the plan and applies it, makes an admin token (`<state>/admin-token`);
//! 6. starts `cairn serve` watching DIR, then one `cairn-agent` per declared node, each with its own
//!    data directory and proxy port (`procs.rs`), and records pids and ports in `<state>/dev.json`;
//! 7. keeps a live view (`view.rs`) until SIGINT or SIGTERM, committing app sources that changed and
//!    starting or stopping agents as nodes are added or removed;
//! 8. then stops the agents, removes the installation's containers, stops serve and PostgreSQL.
//!
//! What it must not do: leave a process or container running after it exits (everything it starts runs
//! in a process group of its own, and is stopped in order), write into DIR or the app sources (state
//! lives in `$XDG_STATE_HOME/cairn/dev/<dir>-<hash>` or `--state-dir`), put a token in an argument (they
//! go through the environment and files), or talk to Docker other than through the agent crate.

mod pg;
mod procs;
mod sources;
mod view;

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_plan::render;
use cairn_reconciler::controller::Outcome;
use cairn_schema::Name;
use cairn_schema::source::Rewrite;
use tokio::sync::watch;

use self::pg::Database;
use self::procs::Proc;
use self::sources::{Mapping, Sources};
use self::view::AgentInfo;
use super::args::{DbArgs, SourceArgs};
use super::control::runtime;

// Output that cannot fail: after a hangup (the terminal closed) stdout is gone, and `println!` would panic
// before the clean-up that must still run.
macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! say_raw {
    ($($t:tt)*) => {{
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! say_err {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// The base image the example runtimes name; built from the host's static busybox when Docker is used.
pub const BUSYBOX_IMAGE: &str = "cairn-dev/busybox:1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverChoice {
    /// Docker when an engine answers, else process
    Auto,
    Docker,
    Process,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config repository (a directory), watched for changes
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Serve each subdirectory NAME of DIR as the git remote FROM + NAME.git (repeatable), e.g.
    /// `https://github.com/cairn-examples/=examples/apps`
    #[arg(long = "app-sources", value_name = "FROM=DIR")]
    app_sources: Vec<String>,
    /// Where the database, the agents' data, the git remotes and the logs go (or CAIRN_DEV_STATE_DIR;
    /// default: $XDG_STATE_HOME/cairn/dev/<dir>-<hash>)
    #[arg(long, env = "CAIRN_DEV_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// PostgreSQL to use instead of a private cluster (or DATABASE_URL)
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Start from an empty database (drops the private cluster's `cairn` database first)
    #[arg(long)]
    reset: bool,
    /// The installation id every container is labelled with
    #[arg(long, default_value = "dev")]
    installation: Name,
    /// What the agents run replicas with
    #[arg(long, value_enum, default_value = "auto")]
    driver: DriverChoice,
    /// The control plane's port on 127.0.0.1 (0: a free one)
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The first node's proxy port on 127.0.0.1; the next nodes get the following ports (0: free ones)
    #[arg(long, default_value_t = 8001)]
    proxy_port: u16,
    /// The control plane's age identity, for repositories with secrets (else CAIRN_IDENTITY)
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Print what changes as lines instead of redrawing the screen (the default when stdout is not a
    /// terminal)
    #[arg(long)]
    plain: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            stop_signal().await;
            let _ = stop_tx.send(true);
        });
        let mut up = Up::default();
        let result = start_and_watch(&args, &mut up, stop).await;
        if let Err(e) = &result {
            say_err!("error: {e:#}");
        }
        let started = up.db.is_some();
        if started {
            say!("\nstopping...");
        }
        let clean = up.shutdown().await;
        match (result, clean) {
            (Ok(()), Ok(())) => {
                if started {
                    say!("stopped; nothing of this dev installation is left running");
                }
                Ok(ExitCode::SUCCESS)
            }
            (Ok(()), Err(e)) => Err(e),
            (Err(_), Ok(())) => Ok(ExitCode::from(super::EXIT_FAILURE)),
            (Err(_), Err(e)) => Err(e),
        }
    })
}

/// Resolves on SIGINT (Ctrl-C), SIGTERM or SIGHUP (the terminal closed): each means stop everything.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        // Without those handlers, Ctrl-C still works.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
}

/// What has been started so far, so that whatever happens it can be stopped.
#[derive(Default)]
struct Up {
    db: Option<Database>,
    pool: Option<sqlx::PgPool>,
    serve: Option<Proc>,
    agents: BTreeMap<String, (Proc, AgentInfo)>,
    docker: Option<(bollard::Docker, Name)>,
    lock: Option<std::fs::File>,
}

impl Up {
    async fn shutdown(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        // Agents first: they give back their leases while the control plane still answers.
        let mut agents: Vec<Proc> = std::mem::take(&mut self.agents)
            .into_values()
            .map(|(p, _)| p)
            .collect();
        if !agents.is_empty() {
            step_line("stopping the agents");
            let killed = tokio::task::spawn_blocking(move || {
                procs::stop_all(&mut agents, Duration::from_secs(20))
            })
            .await?;
            if !killed.is_empty() {
                problems.push(format!("killed after 20 s: {}", killed.join(", ")));
            }
        }
        if let Some((docker, installation)) = self.docker.take() {
            step_line("removing the installation's containers");
            match cairn_agent::dev::remove_containers(
                &docker,
                &installation,
                Duration::from_secs(5),
            )
            .await
            {
                Ok(_) => {}
                Err(e) => problems.push(format!("cannot remove the containers: {e}")),
            }
        }
        if let Some(mut serve) = self.serve.take() {
            step_line("stopping the control plane");
            let stopped = tokio::task::spawn_blocking(move || {
                serve.terminate();
                serve.wait_or_kill(Duration::from_secs(15))
            })
            .await?;
            if !stopped {
                problems.push("killed the control plane after 15 s".to_owned());
            }
        }
        if let Some(pool) = self.pool.take() {
            pool.close().await;
        }
        if let Some(db) = self.db.take()
            && db.cluster.is_some()
        {
            step_line("stopping PostgreSQL");
            if let Err(e) = tokio::task::spawn_blocking(move || db.stop()).await? {
                problems.push(format!("{e:#}"));
            }
        }
        self.lock = None;
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("stopping: {}", problems.join("; "))
        }
    }
}

fn step_line(what: &str) {
    say!("- {what}");
}

/// Runs `fut`, showing `what` and, on a terminal, the seconds it has taken so far; then how long it took.
async fn step<T>(what: &str, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    say_raw!("- {what}...");
    let _ = std::io::stdout().flush();
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let out = loop {
        tokio::select! {
            out = &mut fut => break out,
            _ = tick.tick() => if tty {
                say_raw!("\r- {what}... {}s", start.elapsed().as_secs());
                let _ = std::io::stdout().flush();
            },
        }
    };
    let took = start.elapsed();
    let result = if out.is_ok() { "done" } else { "failed" };
    if tty {
        say!("\r\x1b[K- {what}: {result} ({:.1}s)", took.as_secs_f64());
    } else {
        say!(" {result} ({:.1}s)", took.as_secs_f64());
    }
    out
}

async fn start_and_watch(args: &Args, up: &mut Up, mut stop: watch::Receiver<bool>) -> Result<()> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("cannot open the config directory {}", args.dir.display()))?;
    let repo = super::repo::load_dir(&dir)?;
    for d in repo.loaded.diagnostics.warnings() {
        say_err!("{d}\n");
    }
    let Some(desired) = repo.loaded.desired else {
        for d in repo.loaded.diagnostics.errors() {
            say_err!("{d}\n");
        }
        bail!(
            "{} is invalid ({} errors); fix it and run cairn dev again",
            dir.display(),
            repo.loaded.diagnostics.errors().count()
        );
    };
    let mappings = args
        .app_sources
        .iter()
        .map(|a| Mapping::parse(a))
        .collect::<Result<Vec<_>>>()?;

    let state = match &args.state_dir {
        Some(s) => s.clone(),
        None => default_state_dir(&dir),
    };
    std::fs::create_dir_all(state.join("logs"))
        .with_context(|| format!("cannot create the state directory {}", state.display()))?;
    let state = state.canonicalize()?;
    if state.starts_with(&dir) {
        bail!(
            "the state directory {} is inside the watched directory {}; pick another with --state-dir",
            state.display(),
            dir.display()
        );
    }
    up.lock = Some(lock_state(&state)?);
    say!(
        "cairn dev: {} (state in {})",
        dir.display(),
        state.display()
    );

    // The ports first: a taken one is better refused before anything starts.
    let serve_port = pick_port(args.port, "the control plane (--port)")?;
    let nodes: Vec<String> = desired.nodes.keys().map(|n| n.to_string()).collect();
    let mut proxy_ports = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let want = if args.proxy_port == 0 {
            0
        } else {
            args.proxy_port.saturating_add(i as u16)
        };
        let what = format!("node {node}'s proxy (--proxy-port)");
        proxy_ports.insert(node.clone(), pick_port(want, &what)?);
    }
    let agent_bin = agent_binary()?;

    let db = match &args.database_url {
        Some(url) if !url.is_empty() => pg::given(url)?,
        _ => step("starting PostgreSQL", pg::private(&state, args.reset)).await?,
    };
    let db_url = db.url.clone();
    up.db = Some(db);
    if *stop.borrow() {
        return Ok(());
    }

    let sources = Sources::new(state.join("git"), mappings)?;
    if sources.names().next().is_some() {
        let names: Vec<&str> = sources.names().collect();
        step(
            &format!("committing the app sources ({})", names.join(", ")),
            async { sources.publish() },
        )
        .await?;
    }
    let rewrites = sources.rewrites();

    let driver = pick_driver(args.driver, &desired, &args.installation, up).await?;
    if let Some((docker, installation)) = &up.docker {
        let n = cairn_agent::dev::remove_containers(docker, installation, Duration::from_secs(5))
            .await
            .context("cannot remove the containers an earlier run left")?;
        if n > 0 {
            say!("- removed {n} container(s) an earlier run of installation {installation} left");
        }
    }

    // The plan, then the apply, in this process: the same `Controller` as `cairn apply`.
    let db_args = DbArgs {
        database_url: db_url.clone(),
    };
    let src_args = SourceArgs {
        repo: dir.to_string_lossy().into_owned(),
        git_ref: "main".into(),
        cache_dir: Some(state.join("cache")),
        identity: args.identity.clone(),
        git_rewrite: rewrites.clone(),
        no_poll_heads: false,
        refuse_private_sources: false,
        seed: 0,
    };
    let c = step(
        "reading the state",
        super::control::controller(&db_args, &src_args),
    )
    .await?;
    up.pool = Some(c.pool.clone());
    let (_, plan) = c.plan().await?;
    let tty = std::io::stdout().is_terminal();
    match &plan {
        Some(p) if p.is_empty() => say!(
            "\nNothing to change: the database matches {}.\n",
            dir.display()
        ),
        Some(p) => say_raw!("\n{}\n", render::text(p, tty)),
        None => bail!(
            "{} became invalid; fix it and run cairn dev again",
            dir.display()
        ),
    }
    match step("applying", async {
        Ok(c.reconcile(cairn_reconciler::controller::Trigger::Dev)
            .await?)
    })
    .await?
    {
        Outcome::Applied(a) => say!(
            "- applied generation {}: {}",
            a.plan.generation,
            a.plan.summary()
        ),
        Outcome::Invalid { errors, .. } => {
            for e in errors {
                say_err!("{e}\n");
            }
            bail!("{} is invalid; nothing applied", dir.display());
        }
        Outcome::Behind { commit, applied } => {
            bail!("{commit} is older than the applied {applied}; start over with --reset")
        }
        Outcome::Unchanged { .. } => say!("- nothing changed"),
    }
    let pool = c.pool.clone();
    drop(c);

    let (_, admin) = cairn_reconciler::api::auth::issue_admin_token(
        &pool,
        "cairn-dev",
        cairn_reconciler::store::tokens::Role::Operator,
    )
    .await?;
    let token_file = state.join("admin-token");
    write_private(&token_file, &admin)?;

    // The control plane.
    let server = format!("http://127.0.0.1:{serve_port}");
    let mut cmd = Command::new(std::env::current_exe().context("cannot find the cairn binary")?);
    cmd.arg("serve")
        .arg("--repo")
        .arg(&dir)
        .args(["--listen", &format!("127.0.0.1:{serve_port}")])
        .args(["--installation", args.installation.as_str()])
        .args(["--interval", "10s", "--heartbeat-interval", "2s"])
        // One id across restarts: a restarted serve takes its predecessor's leader lease at once.
        .args(["--replica-id", "dev"])
        .arg("--cache-dir")
        .arg(state.join("cache"))
        .env("DATABASE_URL", &db_url);
    for r in &rewrites {
        cmd.arg("--git-rewrite").arg(r.to_string());
    }
    if let Some(id) = &args.identity {
        cmd.arg("--identity").arg(id);
    }
    let serve = Proc::spawn("cairn serve", cmd, &state.join("logs/serve.log"))?;
    up.serve = Some(serve);
    step("starting the control plane", wait_ready(&server, up)).await?;

    // One agent per node.
    let agent_cfg = AgentCfg {
        bin: agent_bin,
        server: server.clone(),
        state: state.clone(),
        driver,
        rewrites: rewrites.clone(),
    };
    for node in &nodes {
        let port = proxy_ports[node];
        let started = step(
            &format!("starting the agent of node {node} ({driver} driver, proxy 127.0.0.1:{port})"),
            agent_cfg.start(&pool, node, port),
        )
        .await?;
        up.agents.insert(node.clone(), started);
    }
    let header = vec![
        format!(
            "cairn dev: {}  (installation {}, {driver} driver)",
            dir.display(),
            args.installation
        ),
        format!(
            "control plane: {server}   admin: CAIRN_SERVER={server} CAIRN_TOKEN=$(cat {}) cairn status",
            token_file.display()
        ),
        format!(
            "logs: {}   database: {} (the full URL, password included, is in {})",
            state.join("logs").display(),
            redact_password(&db_url),
            state.join("dev.json").display()
        ),
    ];
    for l in &header {
        say!("{l}");
    }
    write_manifest(&state, &server, &db_url, &args.installation, up)?;

    // The live view.
    let plain = args.plain || !tty;
    let mut shown: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut hostnames = hostnames_of(&desired);
    let mut last_read = Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if *stop.borrow() {
            return Ok(());
        }
        if let Some(serve) = up.serve.as_mut()
            && let Some(how) = serve.exited()
        {
            bail!(
                "the control plane exited ({how}); the end of {}:\n{}",
                serve.log.display(),
                serve.log_tail(20)
            );
        }
        for (proc, info) in up.agents.values_mut() {
            if info.exited.is_none()
                && let Some(how) = proc.exited()
            {
                info.exited = Some(how.to_string());
            }
        }
        match sources.publish() {
            Ok(changed) => {
                for name in changed {
                    notes.push(format!(
                        "committed a change of app source {name}: it deploys within 10 s (at the next \
                         poll of its branch)"
                    ));
                }
            }
            Err(e) => notes.push(format!("{e:#}")),
        }
        // The nodes and hostnames as the directory says now (cheap: a few files).
        if last_read.elapsed() >= Duration::from_secs(2) {
            last_read = Instant::now();
            if let Ok(repo) = super::repo::load_dir(&dir)
                && let Some(d) = repo.loaded.desired
            {
                hostnames = hostnames_of(&d);
                let declared: Vec<String> = d.nodes.keys().map(|n| n.to_string()).collect();
                sync_agents(
                    &agent_cfg,
                    &pool,
                    &declared,
                    args.proxy_port,
                    up,
                    &mut notes,
                )
                .await;
                write_manifest(&state, &server, &db_url, &args.installation, up)?;
            }
        }
        let status = match cairn_reconciler::status::load(
            &pool,
            Duration::from_secs(90),
            &Default::default(),
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                notes.push(format!("cannot read the status: {e}"));
                continue;
            }
        };
        let work = cairn_reconciler::store::progress::open_tasks(&pool, 12)
            .await
            .unwrap_or_default()
            .iter()
            .map(|t| {
                if plain {
                    t.to_string()
                } else {
                    format!("{t} {:.0}s", t.age_secs)
                }
            })
            .collect::<Vec<_>>();
        let agents: BTreeMap<String, AgentInfo> = up
            .agents
            .iter()
            .map(|(n, (_, i))| (n.clone(), i.clone()))
            .collect();
        if notes.len() > 50 {
            notes.drain(..notes.len() - 50);
        }
        let recent = &notes[notes.len().saturating_sub(5)..];
        let lines = view::lines(&view::Frame {
            status: &status,
            hostnames: &hostnames,
            agents: &agents,
            work: &work,
            notes: recent,
            clock: !plain,
        });
        if lines != shown {
            if plain {
                say_raw!(
                    "{}",
                    view::changed(
                        &shown,
                        &lines,
                        &chrono::Local::now().format("%H:%M:%S").to_string()
                    )
                );
            } else {
                say_raw!("{}", view::screen(&header, &lines));
            }
            let _ = std::io::stdout().flush();
            shown = lines;
        }
    }
}

/// How to start an agent.
struct AgentCfg {
    bin: PathBuf,
    server: String,
    state: PathBuf,
    driver: &'static str,
    rewrites: Vec<Rewrite>,
}

impl AgentCfg {
    /// Makes a join token and starts the node's agent with a fresh data directory (a new key and
    /// credential each run: the containers of the last run are gone, so is what its book said). The
    /// token replaces the credential of the last run, which this supervisor started and threw away.
    async fn start(&self, pool: &sqlx::PgPool, node: &str, port: u16) -> Result<(Proc, AgentInfo)> {
        let name = Name::new(node).map_err(anyhow::Error::msg)?;
        let token = cairn_reconciler::api::auth::issue_join_token(
            pool,
            &name,
            Duration::from_secs(600),
            true,
        )
        .await
        .with_context(|| format!("cannot make a join token for node {node}"))?;
        let data = self.state.join("agents").join(node);
        match std::fs::remove_dir_all(&data) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot clear {}", data.display())),
        }
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--server", &self.server])
            .arg("--data-dir")
            .arg(&data)
            .args(["--driver", self.driver])
            .args(["--proxy-listen", &format!("127.0.0.1:{port}")])
            .args(["--shutdown-grace", "5s"])
            // A development session runs the developer's own apps as the developer: under root the
            // agent would pick `nobody`, which cannot reach a state directory under /root.
            .args(["--app-user", "agent"])
            .env("CAIRN_JOIN_TOKEN", token.token.as_str())
            .env_remove("DATABASE_URL");
        for r in &self.rewrites {
            cmd.arg("--git-rewrite").arg(r.to_string());
        }
        let log = self.state.join("logs").join(format!("agent-{node}.log"));
        let proc = Proc::spawn(&format!("cairn-agent of {node}"), cmd, &log)?;
        let info = AgentInfo {
            proxy_port: port,
            pid: proc.pid(),
            exited: None,
            log: log.display().to_string(),
        };
        Ok((proc, info))
    }
}

/// Starts agents for declared nodes that have none (once the node is applied: a join token needs it),
/// stops those of nodes no longer declared.
async fn sync_agents(
    cfg: &AgentCfg,
    pool: &sqlx::PgPool,
    declared: &[String],
    base_port: u16,
    up: &mut Up,
    notes: &mut Vec<String>,
) {
    let gone: Vec<String> = up
        .agents
        .keys()
        .filter(|n| !declared.contains(n))
        .cloned()
        .collect();
    for node in gone {
        if let Some((mut proc, _)) = up.agents.remove(&node) {
            proc.terminate();
            let _ = tokio::task::spawn_blocking(move || proc.wait_or_kill(Duration::from_secs(20)))
                .await;
            notes.push(format!("node {node} was removed: its agent stopped"));
        }
    }
    let missing: Vec<&String> = declared
        .iter()
        .filter(|n| !up.agents.contains_key(*n))
        .collect();
    for node in missing {
        let Ok(name) = Name::new(node) else { continue };
        if !cairn_reconciler::store::nodes::node_declared(pool, &name)
            .await
            .unwrap_or(false)
        {
            continue; // not applied yet
        }
        let used: Vec<u16> = up.agents.values().map(|(_, i)| i.proxy_port).collect();
        let port = if base_port == 0 {
            cairn_pgdev::free_port().ok()
        } else {
            (base_port..base_port.saturating_add(100))
                .find(|p| !used.contains(p) && pick_port(*p, "").is_ok())
        };
        let Some(port) = port else {
            notes.push(format!("no free proxy port for node {node}"));
            continue;
        };
        match cfg.start(pool, node, port).await {
            Ok(started) => {
                notes.push(format!(
                    "node {node} was added: its agent runs, proxy 127.0.0.1:{port}"
                ));
                up.agents.insert(node.clone(), started);
            }
            Err(e) => notes.push(format!("cannot start the agent of node {node}: {e:#}")),
        }
    }
}

/// Waits (at most 60 s) until serve answers `/readyz`, or fails with the end of its log if it exits.
async fn wait_ready(server: &str, up: &mut Up) -> Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let url = format!("{server}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(serve) = up.serve.as_mut()
            && let Some(how) = serve.exited()
        {
            bail!(
                "cairn serve exited ({how}); the end of {}:\n{}",
                serve.log.display(),
                serve.log_tail(20)
            );
        }
        if let Ok(r) = client.get(&url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("cairn serve did not become ready within 60 s (see its log)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Docker when asked for or (auto) when an engine answers, else the process driver. For Docker, the
/// busybox base image is built when a runtime names it.
async fn pick_driver(
    choice: DriverChoice,
    desired: &cairn_schema::Desired,
    installation: &Name,
    up: &mut Up,
) -> Result<&'static str> {
    if choice == DriverChoice::Process {
        return Ok("process");
    }
    let engine = tokio::time::timeout(Duration::from_secs(5), cairn_agent::dev::engine()).await;
    let docker = match (choice, engine) {
        (_, Ok(Ok(d))) => d,
        (DriverChoice::Docker, Ok(Err(e))) => {
            return Err(e).context("--driver docker, but the Docker engine does not answer");
        }
        (DriverChoice::Docker, Err(_)) => {
            bail!("--driver docker, but the Docker engine did not answer in 5 s")
        }
        (_, Ok(Err(e))) => {
            say!("- no Docker engine ({e}): apps run as local processes (the process driver)");
            return Ok("process");
        }
        (_, Err(_)) => {
            say!("- the Docker engine did not answer in 5 s: apps run as local processes");
            return Ok("process");
        }
    };
    let wants_busybox = desired
        .runtimes
        .values()
        .any(|r| r.image.as_deref() == Some(BUSYBOX_IMAGE));
    if wants_busybox {
        let busybox = busybox_path()?;
        let built = step(&format!("checking the base image {BUSYBOX_IMAGE}"), async {
            cairn_agent::dev::ensure_busybox_image(&docker, BUSYBOX_IMAGE, &busybox)
                .await
                .with_context(|| format!("cannot build {BUSYBOX_IMAGE} from {}", busybox.display()))
        })
        .await?;
        if built {
            say!("- built {BUSYBOX_IMAGE} from {}", busybox.display());
        }
    }
    up.docker = Some((docker, installation.clone()));
    Ok("docker")
}

/// The host's static busybox (`CAIRN_DEV_BUSYBOX`, else `/bin/busybox`): the image has no C library, so
/// a dynamically linked one would not start.
fn busybox_path() -> Result<PathBuf> {
    let path = std::env::var_os("CAIRN_DEV_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}: install a static busybox (Debian/Ubuntu: `sudo apt-get install \
             busybox-static`) or set CAIRN_DEV_BUSYBOX",
            path.display()
        )
    })?;
    let dynamic = elf_interpreter(&bytes);
    if dynamic {
        bail!(
            "{} is dynamically linked and cannot run in a FROM scratch image: install \
             busybox-static (Debian/Ubuntu) or set CAIRN_DEV_BUSYBOX to a static busybox",
            path.display()
        );
    }
    Ok(path)
}

/// Whether a 64-bit little-endian ELF file names a program interpreter (`PT_INTERP`): a dynamically
/// linked executable. Anything else is not judged here (`false`).
fn elf_interpreter(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap_or_default()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff.saturating_add(i.saturating_mul(size));
        bytes
            .get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == PT_INTERP)
    })
}

/// `cairn-agent`: `CAIRN_AGENT_BIN`, else next to this binary, else on `PATH`.
fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CAIRN_AGENT_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("cairn-agent")))
        .filter(|p| p.is_file());
    let on_path = || {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("cairn-agent"))
            .find(|p| p.is_file())
    };
    beside.or_else(on_path).context(
        "cannot find the cairn-agent binary next to cairn or on PATH: build it with `cargo build -p \
         cairn-agent` (./scripts/dev does), or set CAIRN_AGENT_BIN",
    )
}

/// `want` when it is free (or a free port when `want` is 0).
fn pick_port(want: u16, what: &str) -> Result<u16> {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, want)))
        .with_context(|| format!("port {want} for {what} is taken; pick another"))?;
    Ok(l.local_addr()?.port())
}

/// `$XDG_STATE_HOME/cairn/dev/<name>-<hash>` (or under `~/.local/state`, else the temp dir).
fn default_state_dir(dir: &Path) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    let name = dir
        .file_name()
        .map_or("root".into(), |n| n.to_string_lossy().into_owned());
    base.join("cairn/dev")
        .join(format!("{name}-{}", cairn_pgdev::short_hash(dir)))
}

/// One `cairn dev` per state directory: an exclusive `flock` held until exit.
fn lock_state(state: &Path) -> Result<std::fs::File> {
    let path = state.join("lock");
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        anyhow::anyhow!(
            "another cairn dev runs with the state directory {}; stop it first, or pass --state-dir",
            state.display()
        )
    })?;
    Ok(f)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::File::options()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{text}")?;
    Ok(())
}

/// `url` with its password (if any) replaced by `***`, for the terminal.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// `<state>/dev.json`: what runs, for scripts and tests (pids, ports, URLs; no token).
fn write_manifest(
    state: &Path,
    server: &str,
    db_url: &str,
    installation: &Name,
    up: &Up,
) -> Result<()> {
    let agents: serde_json::Map<String, serde_json::Value> = up
        .agents
        .iter()
        .map(|(n, (_, i))| {
            (
                n.clone(),
                serde_json::json!({ "pid": i.pid, "proxy_port": i.proxy_port, "log": i.log }),
            )
        })
        .collect();
    let doc = serde_json::json!({
        "pid": std::process::id(),
        "server": server,
        "database_url": db_url,
        "installation": installation.as_str(),
        "serve_pid": up.serve.as_ref().map(Proc::pid),
        "postgres_pid": up.db.as_ref().and_then(Database::server_pid),
        "agents": agents,
    });
    // It holds the database password: readable by this user only.
    let tmp = state.join("dev.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, &serde_json::to_string_pretty(&doc)?)?;
    std::fs::rename(&tmp, state.join("dev.json"))?;
    Ok(())
}

fn hostnames_of(d: &cairn_schema::Desired) -> BTreeMap<String, Vec<String>> {
    d.apps
        .keys()
        .map(|a| (a.to_string(), d.hostnames(a)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_busybox_is_told_from_a_dynamic_executable() {
        // The test binary itself is dynamically linked (it has an interpreter).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(elf_interpreter(&me));
        if let Ok(busybox) = std::fs::read("/bin/busybox") {
            let file = Command::new("file").arg("/bin/busybox").output();
            if let Ok(out) = file
                && String::from_utf8_lossy(&out.stdout).contains("statically linked")
            {
                assert!(!elf_interpreter(&busybox));
            }
        }
        assert!(!elf_interpreter(
            b"#!/bin/sh\necho not an ELF file at all, just a script\n"
        ));
    }
}
