//! `cairn-agent`'s command line: flags and environment, then [`run`]. Everything else is in the library.
//!
//! The join token comes from `--join`, `CAIRN_JOIN_TOKEN` or `--join-file`; once joined, the credential in
//! the data directory is used and no token is needed. The `recording` driver exists only when the crate's
//! `recording` feature is on (test builds) and is refused even then unless `CAIRN_AGENT_TEST_DRIVER=1`.

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
#[cfg(feature = "recording")]
use crate::recording::{self, RecordingRunner};
use crate::runner::{DriverRunner, Runner};
use crate::source::{Rewrite, Rewrites, Sources};

/// Which runner carries out tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverArg {
    Docker,
    Process,
    /// Records what it is asked to do, runs nothing (tests only: CAIRN_AGENT_TEST_DRIVER=1)
    #[cfg(feature = "recording")]
    Recording,
}

/// Where managed database servers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatabaseRuntimeArg {
    /// In containers with `--driver docker`, else as processes
    Auto,
    /// The engines' own binaries installed on this node
    Process,
    /// Containers of the engines' images (`--database-image`), the data in named volumes
    Docker,
}

/// `--database-image ENGINE=IMAGE`.
fn parse_database_image(s: &str) -> Result<(cairn_schema::database::Engine, String), String> {
    let (engine, image) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not ENGINE=IMAGE (e.g. postgres=postgres:{{version}})"))?;
    let engine = cairn_schema::database::Engine::parse(engine)
        .ok_or_else(|| format!("`{engine}` is not an engine: postgres, redis or mariadb"))?;
    if image.is_empty() || image.chars().any(char::is_whitespace) {
        return Err(format!("`{image}` is not an image reference"));
    }
    Ok((engine, image.to_owned()))
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
    /// The control plane's URL (or CAIRN_SERVER); several control planes: repeat it or separate the
    /// URLs with commas (the agent moves to the next when one cannot be reached)
    #[arg(
        long,
        env = "CAIRN_SERVER",
        value_name = "URL",
        value_delimiter = ',',
        required = true
    )]
    server: Vec<String>,
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
    /// Also serve the node proxy over HTTPS on ADDR (e.g. `0.0.0.0:443`), with the certificates the
    /// control plane gives this node (cached in `<data-dir>/tls`); off by default
    #[arg(long, value_name = "ADDR")]
    proxy_tls_listen: Option<SocketAddr>,
    /// The largest request body the proxy passes to an app without a limit of its own (413 beyond):
    /// a size such as `100MiB`, or `none`
    #[arg(long, value_name = "SIZE", default_value = "100MiB", value_parser = parse_body_limit)]
    proxy_max_body: BodyLimit,
    /// A client must send a request's headers within this of connecting or of its previous response
    /// (also the keep-alive idle time)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s", value_name = "DURATION")]
    proxy_header_timeout: Duration,
    /// A request body that pauses this long is cut off (408)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    proxy_body_idle_timeout: Duration,
    /// How long an app (or another node) may take to answer (504 beyond)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    proxy_upstream_timeout: Duration,
    /// An upgraded connection (WebSocket) with no traffic either way for this long is closed
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m", value_name = "DURATION")]
    proxy_websocket_idle_timeout: Duration,
    /// How long a request no node can serve (a replica moving between nodes) waits for one before its
    /// 503; 0 answers at once
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", value_name = "DURATION")]
    proxy_pending_timeout: Duration,
    /// Serve the node proxy's metrics at http://ADDR/metrics (OpenMetrics text, unauthenticated: counts
    /// and timings only, no names); off by default
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// A file holding the cluster's hop key (or CAIRN_PROXY_HOP_KEY_FILE), instead of the one the control
    /// plane seals to this node: requests forwarded between node proxies carry it, and are accepted only
    /// with it and from a node's address (every node must then be given the same file)
    #[arg(long, env = "CAIRN_PROXY_HOP_KEY_FILE", value_name = "FILE")]
    proxy_hop_key_file: Option<PathBuf>,
    /// Fetch app sources whose URL starts with FROM from TO instead (like git's url.<base>.insteadOf);
    /// repeatable
    #[arg(long = "git-rewrite", value_name = "FROM=TO")]
    git_rewrite: Vec<Rewrite>,
    /// Log format on stderr (the level comes from CAIRN_LOG, e.g. `debug`)
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Keep each app's N newest images (one per source commit and recipe) and any a container uses; 0
    /// keeps all
    #[arg(long, default_value_t = 5, value_name = "N")]
    keep_images: usize,
    /// Accept an `http://` --server (credentials and secrets then cross the network in clear): only
    /// on a network you trust, such as loopback or a private link
    #[arg(long)]
    insecure_http_server: bool,
    /// HTTP/2 to the control planes: `auto` multiplexes every call over one connection where the
    /// control plane speaks it (by ALPN over https, h2c over http), `never` keeps to HTTP/1.1
    #[arg(long, value_enum, default_value = "auto", value_name = "WHEN")]
    http2: crate::client::Http2,
    /// Process driver: the user builds and apps run as when the agent runs as root: `UID[:GID]`, a
    /// user name from /etc/passwd, or `agent` (the agent's own user: apps can then read the agent's
    /// identity and credential). Default: nobody (65534:65534). Nothing is created on the host.
    #[arg(long, env = "CAIRN_AGENT_APP_USER", value_name = "USER")]
    app_user: Option<String>,
    /// Process driver: where release directories live (the app user must be able to traverse every
    /// directory above it). Default: `<data-dir>-apps`
    #[arg(long, value_name = "DIR")]
    apps_dir: Option<PathBuf>,
    /// Where managed databases keep their data directories (one per instance, owned by the engine's
    /// account, which must be able to traverse every directory above it; this one is made 0711).
    /// Default: `<data-dir>-databases` (the data directory itself stays 0700)
    #[arg(long, value_name = "DIR")]
    databases_dir: Option<PathBuf>,
    /// Process driver: leave replicas running when the agent stops (SIGTERM), for the next agent to
    /// adopt without a restart (an upgrade with no downtime; the systemd unit sets it). Without it they
    /// are stopped with the agent, and started again by the next one. After a crash or SIGKILL they run
    /// on either way, and the next agent adopts them
    #[arg(long, env = "CAIRN_AGENT_KEEP_REPLICAS_ON_EXIT")]
    keep_replicas_on_exit: bool,
    /// Docker driver: give containers a read-only root filesystem (with a writable tmpfs at /tmp)
    #[arg(long)]
    read_only_rootfs: bool,
    /// Docker driver: let containers reach link-local addresses, the cloud metadata service
    /// (169.254.169.254) among them. By default the agent runs containers on its own network and
    /// drops their traffic to 169.254.0.0/16 with an iptables rule
    #[arg(long)]
    allow_metadata_access: bool,
    /// Where managed database servers run: `process` (the engines' binaries on this node), `docker`
    /// (a container of the engine's image per database, its data in a named volume), `auto` (docker
    /// with `--driver docker`)
    #[arg(long, value_enum, default_value = "auto")]
    database_runtime: DatabaseRuntimeArg,
    /// An engine's image for `--database-runtime docker`, `{version}` standing for the database's
    /// version: ENGINE=IMAGE, repeatable. Default: the official images (`postgres:{version}`)
    #[arg(long, value_name = "ENGINE=IMAGE", value_parser = parse_database_image)]
    database_image: Vec<(cairn_schema::database::Engine, String)>,
}

/// `--proxy-max-body`: a size, or no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimit(Option<u64>);

fn parse_body_limit(s: &str) -> Result<BodyLimit, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(BodyLimit(None));
    }
    cairn_schema::ByteSize::parse(s).map(|b| BodyLimit(Some(b.bytes())))
}

/// The node proxy's settings from the flags; `node` is this node's name in the cluster table.
fn proxy_config(args: &Args, node: &cairn_schema::Name) -> ProxyConfig {
    let listen = args.proxy_listen.ip();
    ProxyConfig {
        header_timeout: args.proxy_header_timeout,
        body_idle_timeout: args.proxy_body_idle_timeout,
        response_timeout: args.proxy_upstream_timeout,
        upgrade_idle_timeout: args.proxy_websocket_idle_timeout,
        max_body_bytes: args.proxy_max_body.0,
        pending_timeout: args.proxy_pending_timeout,
        node: Some(node.clone()),
        forward_from: (!listen.is_unspecified()).then_some(listen),
        // Kept whether or not this node serves HTTPS now, so a later `--proxy-tls-listen` starts with them.
        tls_cache: Some(args.data_dir.join("tls")),
        ..ProxyConfig::default()
    }
}

/// The user the process driver runs apps as, from `--app-user` and whether the agent is root.
fn app_user(arg: Option<&str>, root: bool) -> Result<Option<crate::driver::process::AppUser>> {
    use crate::driver::process::AppUser;
    let Some(arg) = arg else {
        return Ok(root.then_some(AppUser::NOBODY));
    };
    if arg == "agent" {
        return Ok(None);
    }
    if !root {
        bail!("--app-user {arg} needs the agent to run as root (it cannot switch users otherwise)");
    }
    let numeric = |s: &str| s.parse::<u32>().ok();
    let user = if let Some((u, g)) = arg.split_once(':') {
        match (numeric(u), numeric(g)) {
            (Some(uid), Some(gid)) => AppUser { uid, gid },
            _ => bail!("--app-user {arg}: expected UID:GID as numbers"),
        }
    } else if let Some(uid) = numeric(arg) {
        AppUser { uid, gid: uid }
    } else {
        let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == arg)
            .and_then(|f| Some(AppUser { uid: numeric(f[2])?, gid: numeric(f[3])? }))
            .with_context(|| format!("--app-user {arg}: no such user in /etc/passwd (the agent creates none; add it with useradd --system, or pass UID:GID)"))?
    };
    if user.uid == 0 || user.gid == 0 {
        bail!("--app-user {arg}: apps never run as root (uid or gid 0)");
    }
    Ok(Some(user))
}

/// Refuses an `http://` control plane unless it is on this host (loopback never leaves it) or the
/// operator said the network is trusted (`--insecure-http-server`).
pub fn check_server(server: &str, insecure_http: bool) -> Result<()> {
    let url = reqwest::Url::parse(server.trim())
        .with_context(|| format!("--server {server} is not a URL"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = url.host_str().unwrap_or("").trim_matches(['[', ']']);
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                return Ok(());
            }
            if insecure_http {
                tracing::warn!(
                    server,
                    "using a plain-http control plane (--insecure-http-server): the credential and the sealed secrets cross the network unencrypted"
                );
                return Ok(());
            }
            bail!(
                "--server {server} is plain http to another host: the node's credential would cross \
                 the network in clear. Use an https:// URL, or pass --insecure-http-server if this \
                 network is trusted (a private link)"
            )
        }
        other => bail!("--server {server}: expected an https:// URL, not {other}://"),
    }
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
    #[cfg(feature = "recording")]
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
    for server in &args.server {
        check_server(server, args.insecure_http_server)?;
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
        // SIGHUP (a closed terminal, a careless `kill -HUP`) would end the agent by default; it has
        // nothing to reload, so it is logged and ignored like in `cairn serve`.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .expect("a SIGHUP handler installs");
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                Some(()) = hup.recv() => {
                    tracing::info!("SIGHUP ignored: the agent has nothing to reload (SIGTERM stops it)");
                }
            }
        }
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let data = DataDir::open(&args.data_dir)?;
    let identity = Arc::new(data.identity()?);
    let book = Arc::new(Book::open(data.book_path())?);
    let mut cfg = Config {
        server: args.server.join(","),
        http2: args.http2,
        heartbeat: args.heartbeat,
        concurrency: args.concurrency,
        lease_wait: Duration::from_millis(cairn_proto::MAX_LEASE_WAIT_MS),
        shutdown_grace: args.shutdown_grace,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        databases: Some(crate::dbtasks::DatabaseHost {
            dir: args.databases_dir.clone().unwrap_or_else(|| {
                let mut name = args.data_dir.as_os_str().to_owned();
                name.push("-databases");
                PathBuf::from(name)
            }),
            identity: identity.clone(),
            containers: None,
        }),
    };
    let offered = match args.driver {
        DriverArg::Docker => vec![DriverName::Docker],
        DriverArg::Process => vec![DriverName::Process],
        #[cfg(feature = "recording")]
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
    // One client for every call of this node: its clones share one connection under HTTP/2.
    let client = crate::client::Client::with_http2(&cfg.server, cfg.http2)?
        .with_credential(joined.credential.clone());

    let in_containers = match args.database_runtime {
        DatabaseRuntimeArg::Docker => true,
        DatabaseRuntimeArg::Process => false,
        DatabaseRuntimeArg::Auto => args.driver == DriverArg::Docker,
    };
    if in_containers && let Some(host) = cfg.databases.as_mut() {
        let mut images = crate::dbtasks::Containers::official_images();
        images.extend(args.database_image.iter().cloned());
        host.containers = Some(crate::dbtasks::Containers {
            installation: joined.installation.to_string(),
            node: joined.node.to_string(),
            images,
        });
    }

    // The node proxy's task, when a real driver runs (each arm sets it once).
    let proxy_task;
    let runner: Arc<dyn Runner> = match args.driver {
        #[cfg(feature = "recording")]
        DriverArg::Recording => {
            proxy_task = None;
            if args.metrics_listen.is_some() {
                tracing::warn!(
                    "--metrics-listen: the recording driver runs no proxy, so there is nothing to serve"
                );
            }
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
                let mut cfg =
                    crate::DockerConfig::new(joined.installation.clone(), joined.node.clone());
                cfg.read_only_rootfs = args.read_only_rootfs;
                if args.allow_metadata_access {
                    cfg.network = None;
                }
                let driver = crate::DockerDriver::connect(cfg)
                    .await
                    .context("cannot use the Docker engine")?;
                driver.ensure_network().await?;
                Arc::new(driver)
            } else {
                let apps = args.apps_dir.clone().unwrap_or_else(|| {
                    let mut name = args.data_dir.as_os_str().to_owned();
                    name.push("-apps");
                    PathBuf::from(name)
                });
                let mut cfg = crate::ProcessConfig::new(
                    joined.installation.clone(),
                    joined.node.clone(),
                    apps,
                );
                // Records and output stay in the data directory (0700): no app reaches them.
                cfg.state = data.path().join("process");
                cfg.run_as = app_user(
                    args.app_user.as_deref(),
                    rustix::process::geteuid().is_root(),
                )?;
                // Either way the next agent adopts what still runs (after a crash, always).
                cfg.keep_on_exit = args.keep_replicas_on_exit;
                let driver = crate::ProcessDriver::new(cfg);
                let found = driver
                    .adopt(&identity)
                    .await
                    .context("cannot take over the replicas of the previous agent")?;
                if !found.killed.is_empty() {
                    tracing::warn!(killed = ?found.killed, "stopped replicas the previous agent left without a usable record");
                }
                Arc::new(driver)
            };
            let proxy = Proxy::new(proxy_config(&args, &joined.node));
            // Before any listener accepts: HTTPS works from the cache while the control plane is away.
            match proxy.load_tls_cache() {
                Ok(0) => {}
                Ok(n) => tracing::info!(certificates = n, "certificates loaded from the cache"),
                Err(e) => {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(e)),
                        "the certificate cache cannot be read; HTTPS waits for the control plane"
                    )
                }
            }
            if let Some(path) = &args.proxy_hop_key_file {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the hop key file {}", path.display()))?;
                let key = crate::proxy::HopKey::new(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                proxy.set_hop_key(Some(key));
            }
            // The cluster route table and the hop key, from the control plane.
            tokio::spawn(crate::routes::follow(
                client.clone(),
                proxy.clone(),
                (*identity).clone(),
                args.proxy_hop_key_file.is_some(),
                Some(data.path().join("routes.json")),
                stop.clone(),
            ));
            let rewrites = Rewrites::new(args.git_rewrite.iter().cloned());
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
            if let Some(addr) = args.metrics_listen {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("the metrics endpoint cannot listen on {addr}"))?;
                tracing::info!(addr = %addr, "metrics at /metrics");
                let mut stop = stop.clone();
                tokio::spawn(crate::metrics::serve(
                    listener,
                    proxy.metrics().clone(),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                ));
            }
            let tls_task = match args.proxy_tls_listen {
                Some(addr) => {
                    let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                        format!("the node proxy cannot listen for HTTPS on {addr}")
                    })?;
                    let listener = proxy.tls_listener(tcp)?;
                    tracing::info!(addr = %addr, "node proxy listening for HTTPS");
                    let mut stop = stop.clone();
                    Some(tokio::spawn(proxy.clone().serve(listener, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })))
                }
                None => None,
            };
            let mut stop = stop.clone();
            let plain = tokio::spawn(proxy.serve(listener, async move {
                let _ = stop.wait_for(|s| *s).await;
            }));
            proxy_task = Some(async move {
                let _ = plain.await;
                if let Some(t) = tls_task {
                    let _ = t.await;
                }
            });
            Arc::new(DriverRunner::new(deployer))
        }
    };

    // Replica output to the control plane, old images away: beside the agent loop, until it stops.
    tokio::spawn(crate::housekeeping::ship_loop(
        client.clone(),
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
    let agent = Agent::new(client, joined, runner, book, cfg)?;
    tracing::info!(node = %agent.node(), driver = ?args.driver, concurrency = args.concurrency, "agent running");
    let result = agent.run(stop).await;
    if let Some(t) = proxy_task {
        t.await;
    }
    match result {
        Err(AgentError::Revoked) => {
            data.forget_credential()?;
            Err(AgentError::Revoked.into())
        }
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::process::AppUser;

    #[test]
    fn the_proxy_flags_make_its_config() {
        assert_eq!(parse_body_limit("none"), Ok(BodyLimit(None)));
        assert_eq!(parse_body_limit("1GiB"), Ok(BodyLimit(Some(1 << 30))));
        assert!(parse_body_limit("1GB").unwrap_err().contains("GiB"));
        let args = Args::try_parse_from([
            "cairn-agent",
            "--server",
            "https://cp.example",
            "--proxy-listen",
            "10.0.0.7:80",
            "--proxy-max-body",
            "2MiB",
            "--proxy-websocket-idle-timeout",
            "90s",
            "--proxy-pending-timeout",
            "0s",
            "--metrics-listen",
            "127.0.0.1:9100",
            "--proxy-tls-listen",
            "0.0.0.0:443",
            "--data-dir",
            "/srv/agent",
        ])
        .unwrap();
        let cfg = proxy_config(&args, &cairn_schema::Name::new("node-a").unwrap());
        assert_eq!(cfg.max_body_bytes, Some(2 << 20));
        assert_eq!(cfg.upgrade_idle_timeout, Duration::from_secs(90));
        assert_eq!(cfg.pending_timeout, Duration::ZERO);
        assert_eq!(args.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(cfg.header_timeout, Duration::from_secs(30));
        assert_eq!(cfg.forward_from, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(cfg.node.as_ref().map(|n| n.as_str()), Some("node-a"));
        assert_eq!(args.proxy_tls_listen, Some("0.0.0.0:443".parse().unwrap()));
        assert_eq!(cfg.tls_cache, Some(PathBuf::from("/srv/agent/tls")));
        let args = Args::try_parse_from(["cairn-agent", "--server", "https://cp.example"]).unwrap();
        let cfg = proxy_config(&args, &cairn_schema::Name::new("node-a").unwrap());
        assert_eq!(cfg.max_body_bytes, Some(crate::proxy::DEFAULT_MAX_BODY));
        assert_eq!(cfg.forward_from, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(cfg.pending_timeout, crate::proxy::DEFAULT_PENDING_TIMEOUT);
        assert_eq!(args.metrics_listen, None);
        assert_eq!(args.proxy_tls_listen, None, "HTTPS is off by default");
    }

    #[test]
    fn several_control_planes_come_repeated_or_as_a_comma_list() {
        let args = Args::try_parse_from([
            "cairn-agent",
            "--server",
            "https://cp1.example,https://cp2.example",
            "--server",
            "https://cp3.example",
        ])
        .unwrap();
        assert_eq!(
            args.server,
            [
                "https://cp1.example",
                "https://cp2.example",
                "https://cp3.example"
            ]
        );
        let joined = args.server.join(",");
        assert_eq!(crate::client::servers(&joined).count(), 3);
        assert_eq!(
            crate::client::servers(" https://a , ,https://b ").count(),
            2
        );
    }

    #[test]
    fn apps_run_as_nobody_by_default_when_root_and_never_as_root() {
        assert_eq!(app_user(None, true).unwrap(), Some(AppUser::NOBODY));
        assert_eq!(app_user(None, false).unwrap(), None);
        assert_eq!(app_user(Some("agent"), true).unwrap(), None);
        assert_eq!(
            app_user(Some("1000:1001"), true).unwrap(),
            Some(AppUser {
                uid: 1000,
                gid: 1001
            })
        );
        assert_eq!(
            app_user(Some("nobody"), true).unwrap().map(|u| u.uid),
            Some(65534)
        );
        for bad in ["0", "0:0", "1000:0", "root", "no-such-user-here", "1:x"] {
            assert!(app_user(Some(bad), true).is_err(), "{bad}");
        }
        assert!(
            app_user(Some("1000"), false).is_err(),
            "cannot switch without root"
        );
    }
}
