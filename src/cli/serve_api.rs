//! The flags of the agent and admin APIs inside `cairn serve` (their own database pool, rates, leases,
//! retention); [`cairn_server::serve`] runs them.

use std::time::Duration;

use cairn_reconciler::api::ApiConfig;
use cairn_reconciler::api::limit::Rate;
use cairn_schema::Name;

/// Flags of the agent and admin APIs.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The installation agents join; every replica they run is labelled with it
    #[arg(long, default_value = "cairn")]
    installation: Name,
    /// How often agents are told to heartbeat
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    heartbeat_interval: Duration,
    /// How long a task lease lasts unless its agent reports progress
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    task_lease: Duration,
    /// Waiting long-polls look for tasks at least this often: a safety net, as they are woken when a
    /// node's tasks are committed and when its next task falls due (an expired lease, a backoff's end)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    lease_poll: Duration,
    /// Database connections of the agent and admin APIs
    #[arg(long, default_value_t = 16)]
    api_db_connections: u32,
    /// Requests per second each node's agent may make (bursts of three times as many)
    #[arg(long, default_value_t = 20.0)]
    agent_rate_limit: f64,
    /// Join attempts per second per client address (bursts of ten times as many)
    #[arg(long, default_value_t = 5.0)]
    join_rate_limit: f64,
    /// Build output, replica output and failed or no-op reconcile runs older than this are pruned
    /// (checked every 10 minutes)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "14d")]
    log_retention: Duration,
    /// Replica output lines kept per app for `cairn logs` (older ones are pruned)
    #[arg(long, default_value_t = 10_000)]
    log_window: u32,
    /// Distribute release images through this registry, e.g. `registry.internal:5000/cairn`: the first
    /// node to deploy a release pushes its image to `<registry>/<app>`, every other Docker node pulls it
    /// by digest, and the release records the digest. Without it each node builds the images it lacks
    #[arg(long, value_name = "HOST[:PORT][/PREFIX]")]
    registry: Option<cairn_proto::Registry>,
    /// A reverse proxy in front of `serve` (repeatable): requests from it are attributed, for the
    /// authentication back-off and the join rate, to the address its X-Forwarded-For names
    #[arg(long, value_name = "IP")]
    trusted_proxy: Vec<std::net::IpAddr>,
    /// The cluster route table is recomputed at least this often, as a safety net: it also is after
    /// every reconcile, every heartbeat that changed what a node serves, and whenever another control
    /// plane published a new one
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    routes_refresh: Duration,
    /// How often usage is rolled up into hourly charges (the current hour's are provisional until it
    /// ends; `cairn usage --recompute` rolls a month up at once)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    usage_rollup_interval: Duration,
    /// The config repository's web page, e.g. `https://git.example.com/acme/platform`: the dashboard
    /// links each app and node to its declaration as `<url>/blob/<commit>/<path>#L<line>` (GitHub, Gitea
    /// and Forgejo pages). Derived for a github.com repository; without it others get the file and line
    /// as text
    #[arg(long, value_name = "URL", value_parser = browse_url)]
    config_browse_url: Option<String>,
    /// A dashboard live stream (build or replica output) ends after this long and the browser
    /// reconnects by itself from its last line: the session is checked again, and behind a load
    /// balancer the connection may move to another control plane
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    ui_stream_lifetime: Duration,
}

/// An `http(s)://` address without a query or fragment (it is the start of a link on every app page).
fn browse_url(s: &str) -> Result<String, String> {
    let fine = (s.starts_with("https://") || s.starts_with("http://"))
        && !s.contains(['?', '#', '"', '<', '>', ' ', '\\'])
        && !s.chars().any(char::is_control);
    if fine {
        Ok(s.trim_end_matches('/').to_owned())
    } else {
        Err("expected an http(s):// address without a query or a fragment".into())
    }
}

impl ApiArgs {
    /// How often agents are told to heartbeat.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// What [`cairn_server::serve`] makes of these flags.
    pub fn settings(&self) -> cairn_server::ApiSettings {
        let mut cfg = ApiConfig::new(self.installation.clone());
        cfg.heartbeat_interval = self.heartbeat_interval;
        cfg.task_lease = self.task_lease;
        cfg.node_rate = Rate::new(self.agent_rate_limit, self.agent_rate_limit * 3.0);
        cfg.admin_rate = Rate::new(self.agent_rate_limit, self.agent_rate_limit * 3.0);
        cfg.join_rate = Rate::new(self.join_rate_limit, self.join_rate_limit * 10.0);
        cfg.registry = self.registry.clone();
        cfg.trusted_proxies = self.trusted_proxy.clone();
        cfg.config_browse = self.config_browse_url.clone();
        cfg.ui_stream_lifetime = self.ui_stream_lifetime;
        cairn_server::ApiSettings {
            config: cfg,
            db_connections: self.api_db_connections,
            lease_poll: self.lease_poll,
            log_retention: self.log_retention,
            log_window: self.log_window,
            routes_period: self.routes_refresh,
            usage_period: self.usage_rollup_interval,
        }
    }
}
