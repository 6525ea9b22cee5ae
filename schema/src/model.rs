//! The desired state: what the config repository declares, after parsing and validation.
//!
//! These types serialize back to the manifest format (`render` in the tests parses what they render), and
//! the JSON Schema that editors use is generated from them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Serialize;

use crate::database::Engine;
use crate::secret::{Ciphertext, Recipient};
use crate::source::GitUrl;
use crate::units::{
    AcmeDirectory, BackupLocation, ByteSize, Cpu, Domain, Email, EnvName, Name, NodeAddress, Price,
    RepoPath, Schedule, Span,
};

/// The repository settings file, `cairn.toml` at the repository root.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Cairn repository settings (cairn.toml)")]
pub struct Settings {
    /// Apps answer at `<app>.<base_domain>` unless they list their own domains too.
    pub base_domain: Domain,
    /// ISO 4217 code of the currency plan prices are in.
    #[serde(default = "default_currency")]
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
    #[serde(default)]
    pub secrets: SecretSettings,
    /// `[tls]`: HTTPS for the apps. Without it apps are served over plain HTTP only (unless one brings its
    /// own certificate); with it every app gets a certificate from the ACME CA unless it says `tls = "off"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
}

/// `cairn.toml [tls]`: where certificates come from and how HTTPS is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The ACME (RFC 8555) directory certificates are ordered from; Let's Encrypt production by default.
    #[serde(default = "default_acme_directory")]
    pub acme_directory: AcmeDirectory,
    /// The ACME account's contact: the CA writes here about expiring certificates and problems.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<Email>,
    /// A PEM file in this repository with the root certificates to trust for the ACME directory (a private
    /// or test CA); the system's roots otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_roots: Option<RepoPath>,
    /// How the CA checks that a name is ours.
    #[serde(default)]
    pub challenge: Challenge,
    /// Plain HTTP requests are redirected to HTTPS (ACME's `/.well-known/acme-challenge/` never is).
    #[serde(default = "yes")]
    pub redirect_http: bool,
    /// Sends `Strict-Transport-Security` on HTTPS answers.
    #[serde(default)]
    pub hsts: bool,
}

/// Let's Encrypt's production directory, the default `acme_directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

pub fn default_acme_directory() -> AcmeDirectory {
    AcmeDirectory::new(LETS_ENCRYPT).expect("a valid URL")
}

/// The ACME challenge type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
pub enum Challenge {
    /// A token served over plain HTTP on port 80 at `/.well-known/acme-challenge/` by every ingress node
    /// (works behind CDNs and load balancers).
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// A self-signed certificate for the name, carrying the key authorization's digest, answered by
    /// every ingress node's TLS listener (port 443) to a handshake offering ALPN `acme-tls/1`
    /// (RFC 8737): for clusters that do not serve plain HTTP to the CA; not behind a CDN that ends TLS.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// An app's `tls`: `"auto"` (the default when cairn.toml has `[tls]`), `"off"`, or its own certificate.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum AppTls {
    Mode(TlsMode),
    Own(OwnCertificate),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// A certificate from the ACME CA of cairn.toml's `[tls]`, issued and renewed by the control plane.
    Auto,
    /// Plain HTTP only.
    Off,
}

/// A certificate the app brings: the chain in a PEM file of the repository, the key as an age secret.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OwnCertificate {
    /// The certificate chain (leaf first), PEM, a file in this repository.
    pub cert: RepoPath,
    /// The private key (PEM), encrypted like an env secret: `{ secret = "<age ciphertext>" }`.
    pub key: SecretRef,
}

/// `{ secret = "<age ciphertext>" }`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub secret: Ciphertext,
}

pub fn default_currency() -> String {
    "USD".to_owned()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSettings {
    /// age X25519 public keys that can decrypt the repository's secrets (the control plane's among them).
    #[serde(default)]
    pub recipients: Vec<Recipient>,
}

/// A priced bundle of resources one replica gets.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub cpu: Cpu,
    pub memory: ByteSize,
    pub disk: ByteSize,
    /// Monthly price of one replica.
    pub price: Price,
    /// The most replicas an app on this plan may ask for.
    #[schemars(range(min = 1))]
    pub max_replicas: u32,
}

/// How an app is run.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    serde::Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// A container built and run by the node's Docker engine.
    Docker,
    /// A supervised child process on the node itself (hosts without Docker).
    Process,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Docker => "docker",
            Driver::Process => "process",
        }
    }
}

/// How apps of a language are built and started.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Drivers that can run this runtime; a node must offer one of them.
    #[serde(
        default = "default_drivers",
        skip_serializing_if = "is_default_drivers"
    )]
    pub drivers: Vec<Driver>,
    /// Build with the app's own `Dockerfile` instead of one made from this runtime.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dockerfile: bool,
    /// Base image of the generated Dockerfile (required unless `dockerfile = true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Commands run in the source directory at build time, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub build: Vec<String>,
    /// The command that starts the app (required unless `dockerfile = true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// The port the app listens on; it is given to the app as `PORT`.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

pub fn default_drivers() -> Vec<Driver> {
    vec![Driver::Docker]
}
fn is_default_drivers(d: &[Driver]) -> bool {
    d == [Driver::Docker]
}

/// A worker machine.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub cpu: Cpu,
    pub memory: ByteSize,
    pub disk: ByteSize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Name>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<Name, String>,
    /// A draining node keeps what runs until it is moved, and gets nothing new.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
    /// Pins the age recipient the node must join with; without it the node's first join decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<Recipient>,
    /// Where the control plane and the other nodes reach this node's proxy on the private network. A node
    /// without one serves its own replicas only and is never forwarded to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<NodeAddress>,
    /// Whether the node takes public traffic (DNS or a load balancer points at it).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub ingress: bool,
}

/// An application: where its code is, how it is built and run, and where.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub plan: Name,
    pub runtime: Name,
    pub source: Source,
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: u32,
    /// Overrides the runtime's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<Domain>,
    #[serde(default, skip_serializing_if = "Health::is_default")]
    pub health: Health,
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
    /// How the node proxies treat the app's requests.
    #[serde(default, skip_serializing_if = "Http::is_default")]
    pub http: Http,
    /// A suspended app keeps its configuration and releases but runs no replica.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<EnvName, EnvValue>,
    /// HTTPS: `"auto"` (the default when cairn.toml has `[tls]`), `"off"`, or
    /// `{ cert = "certs/x.pem", key = { secret = "..." } }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<AppTls>,
    /// Managed databases the app is attached to, each with the env var its connection URL arrives in
    /// (`{ main = "DATABASE_URL" }`): a secret the control plane makes, sealed to the app's node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub databases: BTreeMap<Name, EnvName>,
}

/// `[app.NAME.http]`: the node proxies' limits for the app's requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Http {
    /// The largest request body the app accepts (`"100MiB"`); larger ones are answered 413 by the proxy
    /// before they reach a replica. Unset: the node's default (`cairn-agent --proxy-max-body`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<ByteSize>,
}

impl Http {
    pub fn is_default(&self) -> bool {
        *self == Http::default()
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn one() -> u32 {
    1
}

/// The git repository an app is built from.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub url: GitUrl,
    /// The branch the app follows; every push to it deploys.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Pins an exact commit or tag; the app then ignores pushes until the pin changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
}

pub fn default_branch() -> String {
    "main".to_owned()
}

/// The HTTP check a replica must pass before it gets traffic.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_timeout")]
    pub timeout: Span,
}

pub fn default_health_path() -> String {
    "/".to_owned()
}
pub fn default_health_timeout() -> Span {
    Span(std::time::Duration::from_secs(5))
}

impl Default for Health {
    fn default() -> Self {
        Health {
            path: default_health_path(),
            timeout: default_health_timeout(),
        }
    }
}
impl Health {
    fn is_default(&self) -> bool {
        *self == Health::default()
    }
}

/// Constraints on the nodes an app's replicas may run on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Name>,
    /// Every label here must be on the node with the same value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<Name, String>,
}
impl Placement {
    fn is_empty(&self) -> bool {
        self.region.is_none() && self.labels.is_empty()
    }
}

/// An environment variable's value: plain text, or an age ciphertext that only holders of the repository's
/// identities (and, per task, the target node) can read.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum EnvValue {
    Plain(String),
    Secret { secret: Ciphertext },
}

/// The engine versions a `[database.NAME]` may ask for (PostgreSQL's major versions; Redis's and
/// MariaDB's release series). Whether a node has the binaries is the agent's to say.
pub fn engine_versions(engine: Engine) -> &'static [&'static str] {
    match engine {
        Engine::Postgres => &["13", "14", "15", "16", "17"],
        Engine::Redis => &["6", "7"],
        Engine::Mariadb => &["10.11", "11.4"],
    }
}

/// Whether `version` is one of [`engine_versions`], or one of them with a pinned release after it
/// (`15.18`, `10.11.6`: digits after each dot), which a node's binaries must report.
pub fn engine_version_known(engine: Engine, version: &str) -> bool {
    engine_versions(engine).iter().any(|k| {
        version == *k
            || version
                .strip_prefix(k)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|rest| {
                    rest.split('.').all(|p| {
                        !p.is_empty() && p.len() <= 6 && p.bytes().all(|b| b.is_ascii_digit())
                    })
                })
    })
}

/// A managed database (`[database.NAME]`): an engine's own server on one node, its backups and their
/// verification. Placed once (its `node`, else by the scheduler) and then sticky: it never moves
/// without a planned restore.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub engine: Engine,
    /// The engine's version: PostgreSQL 13-17, Redis 6 or 7, MariaDB 10.11 or 11.4, optionally with a
    /// pinned release (`15.18`). A change is an upgrade: a dump and restore into a new instance.
    pub version: String,
    /// Capacity (its disk is the database's) and monthly price, like an app's one replica.
    pub plan: Name,
    /// The node it runs on; without it the scheduler places it once, and it stays there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<DatabaseBackup>,
    /// When the latest backup is restored into a scratch database and its row counts compared
    /// (weekly by default).
    #[serde(default = "default_verify", skip_serializing_if = "is_default_verify")]
    pub verify: Schedule,
}

pub fn default_verify() -> Schedule {
    Schedule::new("@weekly").expect("a valid schedule")
}
fn is_default_verify(s: &Schedule) -> bool {
    *s == default_verify()
}

pub fn default_keep() -> u32 {
    7
}

/// `backup = { schedule = "0 3 * * *", keep = 7, to = "dir:/var/backups" }`: when and where a
/// database is dumped. For `s3://` the endpoint and keys are beside it, the keys as age secrets.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatabaseBackup {
    pub schedule: Schedule,
    /// How many good backups are kept (older ones are deleted after a newer one succeeded).
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1))]
    pub keep: u32,
    pub to: BackupLocation,
    /// `s3://` only: the store's URL (e.g. `http://127.0.0.1:9000`); AWS without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `s3://` only: the region (`us-east-1` without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `s3://` only: the access key id, as an age secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<SecretRef>,
    /// `s3://` only: the secret access key, as an age secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<SecretRef>,
}

/// Every event the control plane records (`cairn_reconciler::events::EventKind` names the same set): what
/// a notification sink's `events` patterns may match.
pub const EVENT_KINDS: [&str; 16] = [
    "deploy.started",
    "deploy.succeeded",
    "deploy.failed",
    "apply.succeeded",
    "apply.failed",
    "node.offline",
    "node.online",
    "node.flapping",
    "replica.unplaceable",
    "certificate.failed",
    "certificate.expiring",
    "drift.repaired",
    "database.backup_failed",
    "database.backup_overdue",
    "database.upgrade_failed",
    "database.verify_failed",
];

/// Where a notification sink sends events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// A JSON POST signed the Standard Webhooks way (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`) with the sink's `signing_secret`.
    Webhook,
    /// A Slack incoming webhook.
    Slack,
    /// A Discord webhook.
    Discord,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Webhook => "webhook",
            SinkKind::Slack => "slack",
            SinkKind::Discord => "discord",
        }
    }
}

/// The least severity a sink is sent.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SinkSeverity {
    /// Everything, successes included.
    Info,
    /// Warnings and errors (the default: successes only when asked for).
    #[default]
    Warning,
    Error,
}

impl SinkSeverity {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkSeverity::Info => "info",
            SinkSeverity::Warning => "warning",
            SinkSeverity::Error => "error",
        }
    }
}

pub fn default_sink_patterns() -> Vec<String> {
    vec!["*".to_owned()]
}

pub fn default_max_per_hour() -> u32 {
    30
}

/// A notification sink (`[notify.NAME]`): which events go where.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sink {
    pub kind: SinkKind,
    /// The URL events are posted to, as an age secret: webhook URLs are credentials.
    pub url: SecretRef,
    /// `webhook` only, and required there: the Standard Webhooks secret (`whsec_` and base64), as an age
    /// secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<SecretRef>,
    /// Event names or globs (`deploy.*`, `*`).
    #[serde(default = "default_sink_patterns")]
    pub events: Vec<String>,
    /// App names, or `*` for all (events without an app, such as a node going offline, go to every
    /// sink whose events match).
    #[serde(default = "default_sink_patterns")]
    pub apps: Vec<String>,
    /// The least severity sent: `info` (successes too), `warning` (the default) or `error`.
    #[serde(default)]
    pub severity: SinkSeverity,
    /// At most this many messages an hour; what goes beyond is recorded as not sent, with the reason.
    #[serde(default = "default_max_per_hour")]
    pub max_per_hour: u32,
}

impl Sink {
    /// Whether `pattern` (`*` for any run of characters) matches `name`.
    pub fn glob(pattern: &str, name: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == name,
            Some((head, rest)) => {
                let Some(tail) = name.strip_prefix(head) else {
                    return false;
                };
                (0..=tail.len())
                    .filter(|i| tail.is_char_boundary(*i))
                    .any(|i| Sink::glob(rest, &tail[i..]))
            }
        }
    }

    /// Whether the sink wants an event of `kind` (an [`EVENT_KINDS`] name) about `app`.
    pub fn wants(&self, kind: &str, app: Option<&str>) -> bool {
        Sink::matches(&self.events, &self.apps, kind, app)
    }

    /// [`Sink::wants`] for a sink's `events` and `apps` patterns.
    pub fn matches(events: &[String], apps: &[String], kind: &str, app: Option<&str>) -> bool {
        events.iter().any(|p| Sink::glob(p, kind))
            && match app {
                None => true,
                Some(a) => apps.iter().any(|p| p == "*" || p == a),
            }
    }
}

/// The six kinds of resource a manifest declares.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Plan,
    Runtime,
    Node,
    App,
    /// A notification sink.
    Notify,
    /// A managed database.
    Database,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Plan,
        Kind::Runtime,
        Kind::Node,
        Kind::App,
        Kind::Notify,
        Kind::Database,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Plan => "plan",
            Kind::Runtime => "runtime",
            Kind::Node => "node",
            Kind::App => "app",
            Kind::Notify => "notify",
            Kind::Database => "database",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Plan => "plans",
            Kind::Runtime => "runtimes",
            Kind::Node => "nodes",
            Kind::App => "apps",
            Kind::Notify => "notification sinks",
            Kind::Database => "databases",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Where a resource is declared: file and 1-based line/column of its table header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Origin {
    pub path: String,
    pub line: usize,
    pub col: usize,
}

/// One manifest file's resources, as the JSON Schema describes a file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Cairn manifest")]
pub struct ManifestFile {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plan: BTreeMap<Name, Plan>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runtime: BTreeMap<Name, Runtime>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node: BTreeMap<Name, Node>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub app: BTreeMap<Name, App>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub notify: BTreeMap<Name, Sink>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub database: BTreeMap<Name, Database>,
}

/// The whole desired state of a repository at one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub settings: Settings,
    pub plans: BTreeMap<Name, Plan>,
    pub runtimes: BTreeMap<Name, Runtime>,
    pub nodes: BTreeMap<Name, Node>,
    pub apps: BTreeMap<Name, App>,
    /// Notification sinks (`[notify.NAME]`).
    pub notify: BTreeMap<Name, Sink>,
    /// Managed databases (`[database.NAME]`).
    pub databases: BTreeMap<Name, Database>,
    /// Where each resource is declared, for plans and PR comments that link to the line.
    pub origins: BTreeMap<(Kind, Name), Origin>,
}

impl Desired {
    /// The generated default domain of an app: `<app>.<base_domain>`.
    pub fn default_domain(&self, app: &Name) -> String {
        format!("{app}.{}", self.settings.base_domain)
    }

    /// Every hostname an app answers to, the default domain first.
    pub fn hostnames(&self, app: &Name) -> Vec<String> {
        let mut v = vec![self.default_domain(app)];
        if let Some(a) = self.apps.get(app) {
            v.extend(a.domains.iter().map(|d| d.to_string()));
        }
        v
    }

    /// How an app is served over HTTPS, its `tls` with the default filled in.
    pub fn tls(&self, app: &Name) -> Option<AppTls> {
        let a = self.apps.get(app)?;
        match (&a.tls, &self.settings.tls) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(_)) => Some(AppTls::Mode(TlsMode::Auto)),
            (None, None) => Some(AppTls::Mode(TlsMode::Off)),
        }
    }

    /// The name sets the control plane orders certificates for: one per app whose `tls` is `"auto"`
    /// (its hostnames, the default domain first). Empty without `[tls]`.
    pub fn acme_name_sets(&self) -> Vec<(Name, Vec<String>)> {
        if self.settings.tls.is_none() {
            return Vec::new();
        }
        self.apps
            .keys()
            .filter(|a| self.tls(a) == Some(AppTls::Mode(TlsMode::Auto)))
            .map(|a| (a.clone(), self.hostnames(a)))
            .collect()
    }

    /// Counts per kind, for summaries.
    pub fn counts(&self) -> [(Kind, usize); 4] {
        [
            (Kind::Plan, self.plans.len()),
            (Kind::Runtime, self.runtimes.len()),
            (Kind::Node, self.nodes.len()),
            (Kind::App, self.apps.len()),
        ]
    }

    /// The resources as one manifest file (for rendering).
    pub fn to_manifest(&self) -> ManifestFile {
        ManifestFile {
            plan: self.plans.clone(),
            runtime: self.runtimes.clone(),
            node: self.nodes.clone(),
            app: self.apps.clone(),
            notify: self.notify.clone(),
            database: self.databases.clone(),
        }
    }
}
