//! The observed state: what Postgres says is applied and running, as plain data for the planner.
//!
//! The store loads one [`Observed`] per reconcile and hands it to [`crate::plan`]; the executor
//! writes what a plan decides, so that the next load reflects it (see [`crate::next_observed`] for
//! the exact state an applied plan must leave behind).
//!
//! What it must not do: hold a secret's plaintext or ciphertext. An applied env var is either its plain
//! value or a secret's keyed fingerprint plus a digest of its ciphertext. Nothing here does IO, reads a
//! clock or knows about SQL; every field says where the store gets it from.

use std::collections::BTreeMap;
use std::fmt;

use cairn_schema::{
    App, Ciphertext, Domain, Driver, EnvName, EnvValue, Health, Http, Name, Node, Placement, Plan,
    Recipient, Runtime, Sink, SinkKind, SinkSeverity, Source,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The generation of the applied state. An empty database is generation 0; every applied plan writes
/// `generation + 1`, and an executor applies a plan only if the stored generation is still the plan's
/// `based_on` (checked under the apply lock), so a stale plan can never move state backwards.
pub type Generation = u64;

/// A release number, per app, starting at 1.
pub type ReleaseNumber = u64;

/// Keyed fingerprints of the desired secrets' plaintexts, computed by the caller with the control plane's
/// identity (`Identity::fingerprint`), per `(app, env key)`.
pub type Fingerprints = BTreeMap<(Name, EnvName), String>;

/// A git commit id (or, for an app's pinned `rev`, the tag or commit the manifest names).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommitId(String);

impl CommitId {
    pub fn new(s: impl Into<String>) -> Self {
        CommitId(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The first 7 characters of a hex commit id, as git abbreviates it; other refs stay whole.
    pub fn short(&self) -> &str {
        let is_hex = self.0.len() >= 12 && self.0.bytes().all(|b| b.is_ascii_hexdigit());
        if is_hex { &self.0[..7] } else { &self.0 }
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Everything the planner needs to know about what is applied and running.
///
/// Filling it: one row set per field, all read in the same transaction (or behind the generation check),
/// so the planner sees one consistent snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// The generation of the applied state (0 before the first apply).
    pub generation: Generation,
    /// The config commit the applied state came from; `None` before the first apply.
    pub applied_commit: Option<CommitId>,
    /// The applied settings' `currency` (ISO 4217); `None` before the first apply.
    pub currency: Option<String>,
    /// The applied settings' `base_domain` (every app answers at `<app>.<base_domain>`); `None` before the
    /// first apply.
    #[serde(default)]
    pub base_domain: Option<Domain>,
    /// Applied plans, as their manifests declared them at `applied_commit`.
    pub plans: BTreeMap<Name, Plan>,
    /// Applied runtimes.
    pub runtimes: BTreeMap<Name, Runtime>,
    /// Applied node specs (capacity, region, labels, drain, pinned recipient). A node's liveness is in
    /// [`Observed::node_status`], not here.
    pub nodes: BTreeMap<Name, Node>,
    /// Applied apps, with env reduced to plain values and secret fingerprints ([`AppliedApp`]).
    pub apps: BTreeMap<Name, AppliedApp>,
    /// What the agent side knows of each node: joined or not, heartbeats, drivers, recipient. A node that
    /// is declared but has no entry here is treated as [`NodeState::Pending`].
    pub node_status: BTreeMap<Name, NodeStatus>,
    /// Every replica slot the applied state assigns to a node (running or stopped), one row each.
    pub placements: Vec<ReplicaPlacement>,
    /// The latest (highest-numbered) release of each app.
    pub releases: BTreeMap<Name, ReleaseRecord>,
    /// The commit each app's branch points at, as last recorded by polling or by a push webhook. Apps
    /// whose head is not known yet are absent.
    pub source_heads: BTreeMap<Name, CommitId>,
    /// Apps an operator pinned to a release by rolling back: they stay on that release until unpinned.
    pub rollback_pins: BTreeMap<Name, ReleaseNumber>,
    /// Applied notification sinks, their secrets as digests of the ciphertexts (`notify_sinks.spec`).
    #[serde(default)]
    pub notify: BTreeMap<Name, AppliedSink>,
    /// Restart requests: per app, a counter `cairn restart APP` increments. A running replica whose
    /// [`ReplicaPlacement::restart`] is lower gets a restart task. Absent means 0.
    pub restart_requests: BTreeMap<Name, u64>,
    /// The certificates the control plane keeps for declared name sets (the `certificates` table, keys
    /// never read), so a plan can say which of its hosts have one and why a name waits.
    #[serde(default)]
    pub certificates: Vec<ObservedCert>,
    /// Managed databases: the applied spec and where each one lives (`databases`).
    #[serde(default)]
    pub databases: BTreeMap<Name, ObservedDatabase>,
    /// The ports of every database server instance on any node, dropped ones too (a swap keeps the
    /// original beside the restored one; a dropped instance keeps its row and `(node, port)` is
    /// unique): a new or moved database takes none of them.
    #[serde(default)]
    pub database_ports: std::collections::BTreeSet<u16>,
}

/// A managed database as applied and placed. Its placement is sticky: the planner keeps it where it
/// is, and only an explicit `node` in its manifest moves it (a move that needs a restore).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedDatabase {
    pub spec: AppliedDatabase,
    /// The node its data lives on.
    pub node: Name,
    pub port: u16,
    /// The instance attached apps are pointed at: the database's own, or what `cairn db swap` chose.
    pub instance: Name,
    /// Bumped by `cairn db rotate` (a new password): attached apps get a new release.
    pub credential: u64,
    /// When the last backup that succeeded finished: the recovery point if the node is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good_backup: Option<DateTime<Utc>>,
}

/// A database's manifest as applied, its S3 keys reduced to digests of their ciphertexts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedDatabase {
    pub engine: cairn_schema::database::Engine,
    pub version: String,
    pub plan: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<AppliedBackup>,
    pub verify: String,
}

/// A database's `backup`, its keys as ciphertext digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedBackup {
    pub schedule: String,
    pub keep: u32,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_sha256: Option<String>,
}

impl AppliedDatabase {
    pub fn from_desired(d: &cairn_schema::Database) -> AppliedDatabase {
        AppliedDatabase {
            engine: d.engine,
            version: d.version.clone(),
            plan: d.plan.clone(),
            node: d.node.clone(),
            backup: d.backup.as_ref().map(|b| AppliedBackup {
                schedule: b.schedule.to_string(),
                keep: b.keep,
                to: b.to.to_string(),
                endpoint: b.endpoint.clone(),
                region: b.region.clone(),
                access_key_id_sha256: b
                    .access_key_id
                    .as_ref()
                    .map(|c| ciphertext_sha256(&c.secret)),
                secret_access_key_sha256: b
                    .secret_access_key
                    .as_ref()
                    .map(|c| ciphertext_sha256(&c.secret)),
            }),
            verify: d.verify.to_string(),
        }
    }
}

/// A certificate's state. `Issued` and `Renewing` (and `Failed` or `WaitingDns` after an issuance) have a
/// current certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertState {
    /// Declared, nothing tried yet.
    Pending,
    /// The self-probe found that the names do not reach the cluster: nothing was asked of the CA.
    WaitingDns,
    /// An order is under way.
    Ordering,
    Issued,
    /// A renewal's order is under way; the old certificate serves meanwhile.
    Renewing,
    /// The CA refused or the order failed; retried with backoff.
    Failed,
}

impl CertState {
    pub const ALL: [CertState; 6] = [
        CertState::Pending,
        CertState::WaitingDns,
        CertState::Ordering,
        CertState::Issued,
        CertState::Renewing,
        CertState::Failed,
    ];

    /// The stored and displayed spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Pending => "pending",
            CertState::WaitingDns => "waiting_dns",
            CertState::Ordering => "ordering",
            CertState::Issued => "issued",
            CertState::Renewing => "renewing",
            CertState::Failed => "failed",
        }
    }

    /// The inverse of [`CertState::as_str`].
    pub fn parse(s: &str) -> Option<CertState> {
        CertState::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// One declared name set's certificate, without its key or chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedCert {
    /// Sorted, lowercase.
    pub names: Vec<String>,
    pub state: CertState,
    /// The current certificate's expiry, if one was ever issued.
    pub not_after: Option<DateTime<Utc>>,
    /// Why the last attempt failed (a name not reaching the cluster, the CA's refusal).
    pub last_error: Option<String>,
}

/// An applied app: the manifest's [`App`] with its env reduced so that no secret material is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedApp {
    pub plan: Name,
    pub runtime: Name,
    pub source: Source,
    pub replicas: u32,
    pub port: Option<u16>,
    #[serde(default)]
    pub domains: Vec<Domain>,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default, skip_serializing_if = "Http::is_default")]
    pub http: Http,
    #[serde(default)]
    pub suspended: bool,
    #[serde(default)]
    pub env: BTreeMap<EnvName, AppliedEnv>,
    /// Attached databases and the env var each one's URL arrives in.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub databases: BTreeMap<Name, EnvName>,
}

/// One applied env var.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AppliedEnv {
    Plain {
        value: String,
    },
    /// A secret: the keyed fingerprint of its plaintext (from the control plane's identity) and the
    /// SHA-256 of its ciphertext ([`ciphertext_sha256`]); the latter lets a plan without the identity
    /// (a fork's pull request) still tell an untouched secret from a rewritten one.
    Secret {
        fingerprint: String,
        ciphertext_sha256: String,
    },
}

/// The hex SHA-256 of an armored ciphertext, as stored in [`AppliedEnv::Secret`].
/// An applied notification sink: the manifest's [`Sink`] with its URL and signing secret reduced to
/// digests of their ciphertexts (a re-encrypted URL shows as changed: without the plaintext nothing
/// better can be compared, and the digest reveals nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSink {
    pub kind: SinkKind,
    pub url_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_sha256: Option<String>,
    pub events: Vec<String>,
    pub apps: Vec<String>,
    pub severity: SinkSeverity,
    pub max_per_hour: u32,
}

impl AppliedSink {
    pub fn from_desired(s: &Sink) -> AppliedSink {
        AppliedSink {
            kind: s.kind,
            url_sha256: ciphertext_sha256(&s.url.secret),
            signing_secret_sha256: s
                .signing_secret
                .as_ref()
                .map(|c| ciphertext_sha256(&c.secret)),
            events: s.events.clone(),
            apps: s.apps.clone(),
            severity: s.severity,
            max_per_hour: s.max_per_hour,
        }
    }
}

pub fn ciphertext_sha256(ct: &Ciphertext) -> String {
    hex_sha256(ct.as_str().as_bytes())
}

pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        use fmt::Write;
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A secret env var of `app` has no fingerprint in the map the caller gave.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret `{key}` of app `{app}` has no fingerprint: plan with the control plane's identity")]
pub struct MissingFingerprint {
    pub app: Name,
    pub key: EnvName,
}

impl AppliedApp {
    /// The applied form of a desired app, as the executor stores it. Every secret needs its fingerprint.
    pub fn from_desired(
        name: &Name,
        app: &App,
        fingerprints: &Fingerprints,
    ) -> Result<Self, MissingFingerprint> {
        let mut env = BTreeMap::new();
        for (k, v) in &app.env {
            let e = match v {
                EnvValue::Plain(value) => AppliedEnv::Plain {
                    value: value.clone(),
                },
                EnvValue::Secret { secret } => {
                    let fingerprint = fingerprints
                        .get(&(name.clone(), k.clone()))
                        .cloned()
                        .ok_or_else(|| MissingFingerprint {
                            app: name.clone(),
                            key: k.clone(),
                        })?;
                    AppliedEnv::Secret {
                        fingerprint,
                        ciphertext_sha256: ciphertext_sha256(secret),
                    }
                }
            };
            env.insert(k.clone(), e);
        }
        Ok(Self::with_env(app, env))
    }

    /// The hosts the app answers, sorted: its `domains` and, under a `base_domain`, the generated
    /// `<app>.<base_domain>` (the same hosts the cluster route table gives the node proxies).
    pub fn hosts(&self, name: &Name, base_domain: Option<&Domain>) -> Vec<String> {
        let mut hosts: Vec<String> = self.domains.iter().map(|d| d.to_string()).collect();
        if let Some(base) = base_domain {
            hosts.push(format!("{name}.{base}"));
        }
        hosts.sort();
        hosts.dedup();
        hosts
    }

    pub(crate) fn with_env(app: &App, env: BTreeMap<EnvName, AppliedEnv>) -> Self {
        AppliedApp {
            plan: app.plan.clone(),
            runtime: app.runtime.clone(),
            source: app.source.clone(),
            replicas: app.replicas,
            port: app.port,
            domains: app.domains.clone(),
            health: app.health.clone(),
            placement: app.placement.clone(),
            http: app.http.clone(),
            suspended: app.suspended,
            env,
            databases: app.databases.clone(),
        }
    }
}

/// Whether a node has joined, and whether it is still heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Declared in the repository, never joined. Schedulable: its tasks wait until it joins.
    Pending,
    /// Joined and heartbeating.
    Online,
    /// Joined, then missed heartbeats for longer than the offline threshold.
    Offline,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Pending => "pending",
            NodeState::Online => "online",
            NodeState::Offline => "offline",
        }
    }
}

/// The agent side of a node, as its join and heartbeats recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// As the node-health monitor last recorded it. The planner also treats an `Online` node whose last
    /// heartbeat is older than the offline threshold as offline, so a plan made before the monitor runs is
    /// still right.
    pub state: NodeState,
    /// When the last heartbeat (or the join) arrived; `None` for a pending node.
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Drivers the node reported in its last heartbeat. Empty for a node that never reported; a pending
    /// node with none reported is assumed to offer `docker`.
    #[serde(default)]
    pub drivers: Vec<Driver>,
    /// The age recipient the node joined with; `None` until it joins.
    pub recipient: Option<Recipient>,
}

impl NodeStatus {
    /// The status of a node that is declared but has not joined.
    pub fn pending() -> Self {
        NodeStatus {
            state: NodeState::Pending,
            last_heartbeat: None,
            drivers: Vec::new(),
            recipient: None,
        }
    }
}

/// Whether a replica slot should be running or is kept stopped (its app is suspended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Running,
    Stopped,
}

/// One replica slot of an app assigned to a node. Slots are numbered from 1 to the app's `replicas`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPlacement {
    pub app: Name,
    /// 1-based slot index; slot `n` is "replica n" in messages.
    pub slot: u32,
    pub node: Name,
    /// The release this slot runs (or ran, when stopped).
    pub release: ReleaseNumber,
    pub state: ReplicaState,
    /// The generation that last wrote this row. An agent that comes back from a partition compares it to
    /// tell which of its replicas are stale.
    pub generation: Generation,
    /// The app's restart counter this replica last (re)started at (see [`Observed::restart_requests`]).
    #[serde(default)]
    pub restart: u64,
}

/// A release as recorded: what was built and deployed for one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub number: ReleaseNumber,
    /// The config commit the release was planned from.
    pub config_commit: CommitId,
    /// The app source commit it builds.
    pub source_commit: CommitId,
    /// [`crate::ReleaseSpec::hash`] of the spec it runs with; a different hash means a new release.
    pub spec_hash: String,
    /// It failed (its build broke, its replicas failed their health check): it is not deployed again, and
    /// the app runs [`ReleaseRecord::fallback`] until its source or spec changes.
    #[serde(default)]
    pub failed: bool,
    /// The newest earlier release that is live: what keeps serving when this one failed.
    #[serde(default)]
    pub fallback: Option<ReleaseNumber>,
}

impl ReleaseRecord {
    /// The release the app's replicas run while this is its latest release: this one, or for a failed
    /// release the live one before it (the automatic rollback). A failed first release has no fallback and
    /// stays where it is.
    pub fn serving(&self) -> ReleaseNumber {
        match (self.failed, self.fallback) {
            (true, Some(live)) => live,
            _ => self.number,
        }
    }
}

/// Replaces, in `all` (by app, then slot, as the store reads them and a plan gives them), the replicas
/// of the apps `apps` with `with` (replicas of some of those apps, in the same order): one splice per
/// app for a few apps (a commit's, an agent's report), one pass for more.
pub fn replace_replicas(
    all: &mut Vec<ReplicaPlacement>,
    apps: &std::collections::BTreeSet<&Name>,
    with: Vec<ReplicaPlacement>,
) {
    let mut with = with.into_iter().peekable();
    if apps.len() <= 16 {
        for &name in apps {
            let range = app_replicas(all, name);
            let mut new = Vec::new();
            while let Some(p) = with.next_if(|p| p.app == *name) {
                new.push(p);
            }
            all.splice(range, new);
        }
        debug_assert!(
            with.next().is_none(),
            "every replica given is of an app named"
        );
        return;
    }
    let old = std::mem::take(all);
    all.reserve(old.len());
    for p in old.into_iter().filter(|p| !apps.contains(&p.app)) {
        while let Some(q) = with.next_if(|q| q.app < p.app) {
            all.push(q);
        }
        all.push(p);
    }
    all.extend(with);
}

/// Where `app`'s replicas are in `all` (by app, as the store reads them and a plan gives them).
pub fn app_replicas(all: &[ReplicaPlacement], app: &Name) -> std::ops::Range<usize> {
    let from = all.partition_point(|p| p.app < *app);
    from..from + all[from..].partition_point(|p| p.app == *app)
}

/// A node's liveness as the planner sees it at `now`: no status is pending, and an online node heard from
/// longer ago than `offline_after` is offline. `cairn status` should show the same.
pub fn effective_state(
    status: Option<&NodeStatus>,
    now: DateTime<Utc>,
    offline_after: std::time::Duration,
) -> NodeState {
    match status {
        None => NodeState::Pending,
        Some(s) => match s.state {
            NodeState::Online => match s.last_heartbeat {
                Some(hb) => {
                    let age = now.signed_duration_since(hb);
                    let limit =
                        chrono::Duration::from_std(offline_after).unwrap_or(chrono::Duration::MAX);
                    if age > limit {
                        NodeState::Offline
                    } else {
                        NodeState::Online
                    }
                }
                None => NodeState::Online,
            },
            other => other,
        },
    }
}

/// The nodes' liveness as the planner judges it at `now` ([`effective_state`] of each status), and the
/// first moment at which that judgement can change by time alone: the earliest heartbeat of a node
/// judged online plus `offline_after` (`None`: no such node, or no threshold). Up to that moment, a plan
/// of the same inputs judges every node the same, so a caller may keep the last plan's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Liveness {
    pub states: BTreeMap<Name, NodeState>,
    pub until: Option<DateTime<Utc>>,
}

impl Liveness {
    pub fn judge(
        node_status: &BTreeMap<Name, NodeStatus>,
        now: DateTime<Utc>,
        offline_after: std::time::Duration,
    ) -> Liveness {
        let limit = chrono::Duration::from_std(offline_after).ok();
        let mut until: Option<DateTime<Utc>> = None;
        let states = node_status
            .iter()
            .map(|(name, s)| {
                let state = effective_state(Some(s), now, offline_after);
                if let (NodeState::Online, Some(hb), Some(limit)) = (state, s.last_heartbeat, limit)
                    && let Some(at) = hb.checked_add_signed(limit)
                {
                    until = Some(until.map_or(at, |u| u.min(at)));
                }
                (name.clone(), state)
            })
            .collect();
        Liveness { states, until }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Replacing some apps' replicas gives what removing them, adding the new ones and sorting
        /// gives, for a few apps (one splice each) and for many (one pass).
        #[test]
        fn replacing_replicas_equals_filtering_and_sorting(
            old in prop::collection::btree_map((0u8..60, 1u32..4), 0u8..3, 0..120),
            apps in prop::collection::btree_set(0u8..60, 0..40),
            new in prop::collection::btree_map((0u8..60, 1u32..4), 0u8..3, 0..60),
        ) {
            let name = |a: u8| -> Name { format!("app{a:02}").parse().unwrap() };
            let replica = |(a, slot): (u8, u32), node: u8| ReplicaPlacement {
                app: name(a),
                slot,
                node: format!("n{node}").parse().unwrap(),
                release: 1,
                state: ReplicaState::Running,
                generation: 1,
                restart: 0,
            };
            let mut all: Vec<ReplicaPlacement> = old.into_iter().map(|(k, n)| replica(k, n)).collect();
            let names: Vec<Name> = apps.iter().map(|a| name(*a)).collect();
            let named: std::collections::BTreeSet<&Name> = names.iter().collect();
            let with: Vec<ReplicaPlacement> = new
                .into_iter()
                .filter(|((a, _), _)| apps.contains(a))
                .map(|(k, n)| replica(k, n))
                .collect();
            let mut expected: Vec<ReplicaPlacement> =
                all.iter().filter(|p| !named.contains(&p.app)).cloned().collect();
            expected.extend(with.iter().cloned());
            expected.sort_by(|a, b| (&a.app, a.slot).cmp(&(&b.app, b.slot)));
            replace_replicas(&mut all, &named, with);
            prop_assert_eq!(all, expected);
        }
    }

    #[test]
    fn heartbeat_age_decides_liveness() {
        let now = DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let st = |secs: i64| NodeStatus {
            state: NodeState::Online,
            last_heartbeat: Some(now - chrono::Duration::seconds(secs)),
            drivers: vec![Driver::Docker],
            recipient: None,
        };
        let limit = std::time::Duration::from_secs(90);
        assert_eq!(
            effective_state(Some(&st(89)), now, limit),
            NodeState::Online
        );
        assert_eq!(
            effective_state(Some(&st(90)), now, limit),
            NodeState::Online
        );
        assert_eq!(
            effective_state(Some(&st(91)), now, limit),
            NodeState::Offline
        );
        assert_eq!(effective_state(None, now, limit), NodeState::Pending);
    }

    #[test]
    fn commit_ids_abbreviate_only_hex() {
        assert_eq!(CommitId::new("0123456789abcdef0123").short(), "0123456");
        assert_eq!(CommitId::new("v2.4.1").short(), "v2.4.1");
    }

    #[test]
    fn observed_round_trips_through_json() {
        let mut o = Observed {
            generation: 3,
            applied_commit: Some(CommitId::new("abc")),
            ..Default::default()
        };
        o.placements.push(ReplicaPlacement {
            app: Name::new("web").unwrap(),
            slot: 1,
            node: Name::new("n1").unwrap(),
            release: 2,
            state: ReplicaState::Running,
            generation: 3,
            restart: 0,
        });
        let back: Observed = serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(back, o);
    }
}
