//! `cairn-agent`'s command line: flags and environment, then [`run`]. Everything else is in the library.
//!
//! The join token comes from `--join`, `CAIRN_JOIN_TOKEN` or `--join-file`; once joined, the credential in
//! the data directory is used and no token is needed. The `recording` driver is for tests only and is
//! refused unless `CAIRN_AGENT_TEST_DRIVER=1`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_schema::Driver as DriverName;
use clap::Parser;
use tokio::sync::watch;

use crate::datadir::{Book, DataDir};
use crate::deploy::{Deployer, DeployerConfig};
use crate::driver::Driver;
use crate::node::{self, Agent, AgentError, Config};
use crate::proxy::{Proxy, ProxyConfig};
use crate::recording::{self, RecordingRunner};
use crate::runner::{DriverRunner, Runner};
use crate::source::{Rewrites, Sources};

/// Which runner carries out tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverArg {
    Docker,
    Process,
    /// Records what it is asked to do, runs nothing (tests only: CAIRN_AGENT_TEST_DRIVER=1)
    Recording,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "cairn-agent",
    version,
    about = "Cairn's node agent: joins the control plane, heartbeats, leases and runs the node's tasks"
)]
pub struct Args {
    /// The control plane's URL (or CAIRN_SERVER)
    #[arg(long, env = "CAIRN_SERVER", value_name = "URL")]
    server: String,
    /// A one-time join token (or CAIRN_JOIN_TOKEN); not needed once the node has joined
    #[arg(
        long,
        env = "CAIRN_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    join: Option<String>,
    /// A file holding the join token
    #[arg(long, value_name = "FILE", conflicts_with = "join")]
    join_file: Option<PathBuf>,
    /// Where the agent keeps its age identity, its credential and its book (or CAIRN_DATA_DIR)
    #[arg(
        long,
        env = "CAIRN_DATA_DIR",
        value_name = "DIR",
        default_value = "/var/lib/cairn-agent"
    )]
    data_dir: PathBuf,
    /// What runs the node's replicas (or CAIRN_AGENT_DRIVER)
    #[arg(long, env = "CAIRN_AGENT_DRIVER", value_enum, default_value = "docker")]
    driver: DriverArg,
    /// How often to heartbeat (default: as often as the control plane asks, 30s unless configured)
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    heartbeat: Option<Duration>,
    /// Tasks run at once
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// How long running tasks may finish after SIGTERM before their leases are given back
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    shutdown_grace: Duration,
    /// The node proxy's listen address (docker and process drivers)
    #[arg(long, default_value = "127.0.0.1:8000")]
    proxy_listen: SocketAddr,
    /// Fetch app sources whose URL starts with FROM from TO instead (like git's url.<base>.insteadOf);
    /// repeatable
    #[arg(long = "git-rewrite", value_name = "FROM=TO")]
    git_rewrite: Vec<String>,
    /// Log format on stderr (the level comes from CAIRN_LOG, e.g. `debug`)
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Keep the images of each app's N newest releases (and any a container uses); 0 keeps all
    #[arg(long, default_value_t = 5, value_name = "N")]
    keep_images: usize,
}

/// `cairn-agent completions SHELL`: a shell completion script on stdout. The agent has no subcommands
/// (and `--server` is required), so this is looked for in `argv` before the agent's own flags are
/// parsed; `None` when `argv` is not a completions request.
pub fn completions(
    argv: impl IntoIterator<Item = std::ffi::OsString>,
) -> Option<Result<(), clap::Error>> {
    #[derive(Debug, Parser)]
    #[command(
        name = "cairn-agent completions",
        about = "Print a shell completion script"
    )]
    struct Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    }
    let mut argv = argv.into_iter();
    let program = argv.next()?;
    if argv.next()? != "completions" {
        return None;
    }
    let parsed = Completions::try_parse_from(std::iter::once(program).chain(argv));
    Some(parsed.map(|c| {
        let mut cmd = <Args as clap::CommandFactory>::command();
        clap_complete::generate(c.shell, &mut cmd, "cairn-agent", &mut std::io::stdout());
    }))
}

fn init_logging(format: LogFormat) {
    let directives = std::env::var("CAIRN_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(crate::logs::env_filter(&directives))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Runs the agent until SIGTERM or SIGINT. An error means the agent could not (or may no longer) serve.
pub fn run(args: Args) -> Result<()> {
    init_logging(args.log_format);
    if args.driver == DriverArg::Recording
        && std::env::var(recording::ENABLE_ENV).as_deref() != Ok("1")
    {
        bail!(
            "the recording driver runs nothing and is for tests only; set {}=1 to use it",
            recording::ENABLE_ENV
        );
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let token = match (&args.join, &args.join_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(p)) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the join token file {}", p.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(args, token))
}

async fn serve(args: Args, token: Option<String>) -> Result<()> {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let data = DataDir::open(&args.data_dir)?;
    let identity = Arc::new(data.identity()?);
    let book = Arc::new(Book::open(data.book_path())?);
    let cfg = Config {
        server: args.server.clone(),
        heartbeat: args.heartbeat,
        concurrency: args.concurrency,
        lease_wait: Duration::from_millis(cairn_proto::MAX_LEASE_WAIT_MS),
        shutdown_grace: args.shutdown_grace,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let offered = match args.driver {
        DriverArg::Docker => vec![DriverName::Docker],
        DriverArg::Process => vec![DriverName::Process],
        DriverArg::Recording => vec![DriverName::Docker, DriverName::Process],
    };
    let mut stopping = stop.clone();
    let joined = match node::join(
        &data,
        &identity,
        &cfg,
        &offered,
        token.as_deref(),
        &mut stopping,
    )
    .await
    {
        Err(AgentError::Stopped) => return Ok(()),
        other => other?,
    };

    let mut proxy_task = None;
    let runner: Arc<dyn Runner> = match args.driver {
        DriverArg::Recording => {
            let delay = std::env::var(recording::DELAY_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or_default();
            Arc::new(RecordingRunner::open(
                data.path(),
                identity.clone(),
                book.clone(),
                delay,
            )?)
        }
        DriverArg::Docker | DriverArg::Process => {
            let driver: Arc<dyn Driver> = if args.driver == DriverArg::Docker {
                let cfg =
                    crate::DockerConfig::new(joined.installation.clone(), joined.node.clone());
                Arc::new(
                    crate::DockerDriver::connect(cfg)
                        .await
                        .context("cannot use the Docker engine")?,
                )
            } else {
                let cfg = crate::ProcessConfig::new(
                    joined.installation.clone(),
                    joined.node.clone(),
                    data.path().join("process"),
                );
                Arc::new(crate::ProcessDriver::new(cfg))
            };
            let proxy = Proxy::new(ProxyConfig::default());
            let rewrites = Rewrites::parse(&args.git_rewrite)?;
            let sources = Sources::new(data.path().join("sources"), rewrites);
            let deployer = Arc::new(Deployer::new(
                driver,
                proxy.clone(),
                sources,
                identity.clone(),
                DeployerConfig::new(data.path().join("work")),
            ));
            let routed = deployer.restore_routes().await.unwrap_or(0);
            let listener = tokio::net::TcpListener::bind(args.proxy_listen)
                .await
                .with_context(|| {
                    format!("the node proxy cannot listen on {}", args.proxy_listen)
                })?;
            tracing::info!(addr = %args.proxy_listen, routed, "node proxy listening");
            let mut stop = stop.clone();
            proxy_task = Some(tokio::spawn(proxy.serve(listener, async move {
                let _ = stop.wait_for(|s| *s).await;
            })));
            Arc::new(DriverRunner::new(deployer))
        }
    };

    // Replica output to the control plane, old images away: beside the agent loop, until it stops.
    let client =
        crate::client::Client::new(&args.server)?.with_credential(joined.credential.clone());
    tokio::spawn(crate::housekeeping::ship_loop(
        client,
        runner.clone(),
        crate::housekeeping::ShipConfig::default(),
        stop.clone(),
    ));
    tokio::spawn(crate::housekeeping::prune_loop(
        runner.clone(),
        args.keep_images,
        Duration::from_secs(300),
        stop.clone(),
    ));
    let agent = Agent::new(joined, runner, book, cfg)?;
    tracing::info!(node = %agent.node(), driver = ?args.driver, concurrency = args.concurrency, "agent running");
    let result = agent.run(stop).await;
    if let Some(t) = proxy_task {
        let _ = t.await;
    }
    match result {
        Err(AgentError::Revoked) => {
            data.forget_credential()?;
            Err(AgentError::Revoked.into())
        }
        other => Ok(other?),
    }
}
