//! `cairn serve`: the control plane, whose composition is [`cairn_server::serve`]; this parses the flags,
//! reads the secrets and keys they name, binds the listeners and turns SIGTERM into the shutdown. Its
//! HTTP listener serves `/healthz` and `/readyz` from the start, and
//! `POST /webhooks/github` when a webhook secret is configured; the reconcile loop runs on a timer and wakes
//! on file changes (directory sources) and webhook deliveries; the GitHub integration's workers run beside
//! it, and all of it stops on SIGTERM or SIGINT. SIGHUP is ignored (logged): `serve` reads no
//! configuration file to reload, and a closed terminal must not stop the control plane.
//!
//! The listener is bounded ([`cairn_reconciler::api::listen`]): the descriptor limit is raised to its hard
//! limit at startup and connections are capped below it; headers must arrive within
//! `--http-header-timeout` (also the keep-alive idle timeout), bodies within `--http-body-timeout`.
//! `/readyz` answers within about a second even while PostgreSQL does not.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_reconciler::worker::Shutdown;

use super::args::{DbArgs, SourceArgs};
use super::control::runtime;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    src: SourceArgs,
    /// Reconcile at least this often (also the poll for missed webhooks)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    interval: Duration,
    /// The HTTP listen address; port 0 picks a free port (the bound address is printed)
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A node with no heartbeat for this long is offline
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90s")]
    node_offline_after: Duration,
    /// Log format on stderr
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    webhooks: super::webhooks::ServeArgs,
    #[command(flatten)]
    api: super::serve_api::ApiArgs,
    #[command(flatten)]
    metrics: super::metrics::MetricsArgs,
    #[command(flatten)]
    http: HttpArgs,
    /// Before ordering a certificate, the control plane fetches a token from each name over plain HTTP
    /// on this port (where the ingress nodes answer ACME's HTTP-01)
    #[arg(long, default_value_t = 80, value_name = "PORT")]
    acme_probe_port: u16,
    /// Resolve NAME to IP for that self-probe instead of asking the system resolver (repeatable; for
    /// split-horizon DNS, or a test CA's names)
    #[arg(long, value_name = "NAME=IP", value_parser = parse_resolve)]
    acme_probe_resolve: Vec<(String, std::net::IpAddr)>,
    #[command(flatten)]
    ha: HaArgs,
}

/// Several control planes on one database: one leader at a time holds a lease.
#[derive(Debug, Clone, clap::Args)]
pub struct HaArgs {
    /// This control plane's id among several (the registry `cairn status` shows, the leader's lease);
    /// made up at start when not given
    #[arg(long, value_name = "ID", env = "CAIRN_REPLICA_ID")]
    replica_id: Option<String>,
    /// Where operators and agents reach this control plane, as `cairn status` shows it (default: the
    /// listen address)
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// How long the leader's lease lasts after each renewal: a dead leader is replaced after about this
    /// (plus --leader-renew)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    leader_lease: Duration,
    /// How often the leader renews its lease and the others try to take it (less than --leader-lease)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    leader_renew: Duration,
}

impl HaArgs {
    fn settings(&self, addr: SocketAddr) -> Result<cairn_server::HaSettings> {
        if self.leader_renew.is_zero() || self.leader_renew >= self.leader_lease {
            anyhow::bail!("--leader-renew must be shorter than --leader-lease (and not zero)");
        }
        let mut s = cairn_server::HaSettings::new(
            self.advertise_url
                .clone()
                .unwrap_or_else(|| format!("http://{addr}")),
        );
        if let Some(id) = &self.replica_id {
            if id.is_empty() || id.len() > 100 || id.chars().any(|c| c.is_control()) {
                anyhow::bail!("--replica-id must be 1 to 100 printable characters");
            }
            s.replica_id = id.clone();
        }
        s.lease = cairn_server::LeaseSettings {
            ttl: self.leader_lease,
            renew: self.leader_renew,
        };
        Ok(s)
    }
}

/// `NAME=IP`.
fn parse_resolve(s: &str) -> Result<(String, std::net::IpAddr), String> {
    let (name, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=IP"))?;
    let ip = ip
        .parse()
        .map_err(|_| format!("`{ip}` is not an IP address"))?;
    Ok((name.trim().to_ascii_lowercase(), ip))
}

/// Bounds of the HTTP listeners.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// A connection must send a request's complete headers within this of connecting or of its
    /// previous response (also how long an idle keep-alive connection stays open). Default: 75s, or
    /// twice --heartbeat-interval plus 15s when that is longer, so agents keep their connections
    /// between heartbeats
    #[arg(long, value_parser = humantime::parse_duration)]
    http_header_timeout: Option<Duration>,
    /// A request's body must arrive whole within this
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    http_body_timeout: Duration,
    /// Open connections at most (default and ceiling: three quarters of the descriptor limit left after
    /// a reserve of 128)
    #[arg(long)]
    max_connections: Option<usize>,
}

impl HttpArgs {
    /// The listener's bounds for agents that heartbeat every `heartbeat`; raises the descriptor limit
    /// first.
    pub fn bounds(&self, heartbeat: Duration) -> cairn_reconciler::api::listen::Bounds {
        use cairn_reconciler::api::listen;
        let fds = listen::raise_fd_limit();
        let mut b = listen::Bounds::new(fds);
        if let Some(max) = self.max_connections {
            if max > b.max_connections {
                tracing::warn!(
                    asked = max,
                    max = b.max_connections,
                    fd_limit = fds,
                    "--max-connections is above what the descriptor limit allows: capped"
                );
            } else {
                b.max_connections = max.max(1);
            }
        }
        b.header_timeout = match self.http_header_timeout {
            Some(t) => {
                if t <= heartbeat {
                    tracing::warn!(
                        http_header_timeout = ?t,
                        heartbeat_interval = ?heartbeat,
                        "--http-header-timeout is not longer than --heartbeat-interval: agents' idle \
                         connections are closed between heartbeats, so each heartbeat opens a new one"
                    );
                }
                t
            }
            None => listen::idle_timeout_for(heartbeat),
        };
        b.body_timeout = self.http_body_timeout;
        tracing::info!(
            fd_limit = fds,
            max_connections = b.max_connections,
            "HTTP listener bounds"
        );
        b
    }
}

/// Logs and otherwise ignores SIGHUP (whose default action would end the process).
pub fn ignore_sighup() -> Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install a SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP ignored: cairn serve has nothing to reload (SIGTERM stops it)");
        }
    });
    Ok(())
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, filtered by `CAIRN_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler installs");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    init_logging(args.log_format);
    let webhooks = super::webhooks::settings(&args.webhooks)?;
    let source = args.src.settings();
    let identity = super::read_identity(args.src.identity.as_ref())?;
    runtime()?.block_on(async move {
        ignore_sighup()?;
        let http = args.http.bounds(args.api.heartbeat_interval());
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let ha = args.ha.settings(addr)?;
        println!("listening on {addr}");
        tracing::info!(%addr, "listening");
        let metrics_listener = super::metrics::bind(&args.metrics).await?;

        let shutdown = Shutdown::new();
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                shutdown_signal().await;
                tracing::info!("shutting down");
                shutdown.trigger();
            }
        });
        let config = cairn_server::Config {
            database_url: args.db.database_url,
            source,
            identity,
            interval: args.interval,
            node_offline_after: args.node_offline_after,
            http,
            metrics_listener,
            api: args.api.settings(),
            webhooks,
            certs: cairn_server::CertServeSettings {
                probe: cairn_reconciler::certs::ProbeOverrides {
                    port: Some(args.acme_probe_port),
                    resolve: args.acme_probe_resolve,
                },
                ..Default::default()
            },
            ha,
        };
        cairn_server::serve(listener, config, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Http {
        #[command(flatten)]
        http: HttpArgs,
    }

    fn header_timeout(args: &[&str], heartbeat: u64) -> Duration {
        let parsed =
            Http::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).unwrap();
        parsed
            .http
            .bounds(Duration::from_secs(heartbeat))
            .header_timeout
    }

    /// The idle timeout follows the heartbeat interval unless it is given: an agent's connection is kept
    /// from one heartbeat to the next (issue 16's heartbeat stall).
    #[test]
    fn the_idle_timeout_outlives_the_heartbeat_interval_unless_given() {
        assert_eq!(header_timeout(&[], 30), Duration::from_secs(75));
        assert_eq!(header_timeout(&[], 120), Duration::from_secs(255));
        assert_eq!(
            header_timeout(&["--http-header-timeout", "10s"], 30),
            Duration::from_secs(10),
            "an operator's value is kept (with a warning when it is not above the interval)"
        );
    }
}
