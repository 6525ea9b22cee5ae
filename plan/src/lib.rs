//! The pure core of the reconciler (`cairn-plan`): the observed state as plain data ([`observed`]), the
//! scheduler ([`scheduler`]) and the planner, which turns desired state, observed state, a seed and the
//! time into one [`Plan`] that says everything the executor will do, and that `cairn plan`, `cairn apply`
//! and the pull-request comment all show ([`render`]).
//!
//! What it must not do: IO of any kind, clocks (time is [`PlanInput::now`]), randomness not derived from
//! [`PlanInput::seed`], or show a secret: a plan holds neither plaintext nor ciphertext, only that a
//! secret was added, removed or changed. It depends on no database, HTTP, git or async crate, and
//! `scripts/test` fails if `cargo tree -p cairn-plan -e normal` shows one (sqlx, tokio, axum, hyper, gix):
//! loading the observed state and performing a plan are `cairn-reconciler`'s (its `store` and
//! `executor`). It also never decides which config commit is newer; the caller must not plan a commit
//! older than the applied one.
//!
//! A plan leaves the executor no choices (the omicron reconfigurator's rule): it lists every resource
//! create, change and delete with field-level differences, the releases that follow, the complete set of
//! replica placements, every agent task, and what it could not do and why. It carries the generation it
//! was planned from, so an executor holding a plan made from an older state refuses it.
//!
//! # Executing a plan
//!
//! The executor performs a plan as it is, in one transaction under the apply lock, and decides nothing:
//!
//! 1. Take the lock and read the stored generation. If it is not [`Plan::based_on`], apply nothing and
//!    plan again (the state moved since; [`NotApplicable::Stale`]). Refuse a plan whose
//!    [`Plan::secrets_verified`] is false.
//! 2. If [`Plan::is_empty`], write nothing more (record the reconciliation as a no-op if you keep one).
//! 3. Otherwise write the state [`next_observed`] describes: the desired plans, runtimes, nodes and apps
//!    (apps via [`crate::observed::AppliedApp::from_desired`], env ciphertexts in their own table),
//!    [`Plan::target_commit`] as the applied commit, [`Plan::generation`] as the generation, the
//!    placements as exactly [`Plan::placements`] (only its rows whose generation is the plan's are new or
//!    changed, and the slots of [`Plan::placement_changes`] without a `to` are the rows to delete, so a
//!    store can write the difference), a release row per
//!    [`Plan::releases`] entry (with its [`ReleaseSpec`] and the app's env ciphertexts, so a rollback can
//!    deploy it again), and delete the credentials and status of removed nodes, the rollback pins of
//!    deleted apps, and the pins of [`Plan::pins`] that are `lifted` (the app's manifest changed).
//! 4. Retire (status `superseded`) the unfinished tasks of older generations of every slot that
//!    [`Plan::placement_changes`] moves to another node or removes, on every node but its new one: a
//!    node that was cut off while its slot moved away must not start the old task when it returns, and
//!    the lease it may hold must be refused. Then enqueue one task per [`Plan::tasks`] entry, in its order,
//!    for its node, carrying the plan's generation; a deploy task's env is the release's secrets re-encrypted to that node's recipient. Tasks
//!    whose node is pending or offline ([`Task::waits_for`]) are enqueued all the same: the node leases
//!    them when it joins or comes back.
//! 5. Record the reconciliation with [`Plan::summary`] and commit.

mod apply;
pub mod databases;
mod diff;
mod memo;
pub mod observed;
mod planner;
pub mod render;
pub mod scheduler;
pub mod usage;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_schema::model::Origin;
use cairn_schema::{Desired, Driver, EnvName, GitUrl, Health, Kind, Name, Price};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub use apply::{NotApplicable, next_databases, next_observed};
pub use memo::{Basis, Changes, Planner, Reuse};
pub use planner::plan;

use crate::observed::{
    CommitId, Fingerprints, Generation, NodeState, Observed, ReleaseNumber, ReplicaPlacement,
};
use crate::scheduler::{Condition, MoveReason, Resources};

/// How long a node may go without a heartbeat before it counts as offline.
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(90);

/// Everything the planner decides from.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The desired state and the config commit it was read from. `None` plans from the applied
    /// configuration alone: no resource changes, but node liveness, source heads, rollback pins and
    /// restart requests still count (a node going offline wakes the reconciler without a new commit).
    /// An invalid commit is the caller's business: it never reaches the planner.
    pub desired: Option<DesiredAt<'a>>,
    /// Keyed fingerprints of the desired secrets, from the control plane's identity. `None` (a fork's pull
    /// request, or no identity at hand): secrets compare by ciphertext, a rewritten one shows as "changed
    /// (unverified)", and the plan is not applicable ([`Plan::secrets_verified`] is false) if any is.
    pub fingerprints: Option<&'a Fingerprints>,
    pub observed: &'a Observed,
    /// Tie-breaks between equally good nodes derive from it; the same seed gives the same plan.
    pub seed: u64,
    /// The time the plan is made at (node liveness, the plan's timestamp).
    pub now: DateTime<Utc>,
    /// A node heard from longer ago than this counts as offline ([`DEFAULT_OFFLINE_AFTER`]).
    pub offline_after: Duration,
}

/// A desired state and the commit it comes from.
#[derive(Debug, Clone, Copy)]
pub struct DesiredAt<'a> {
    pub commit: &'a CommitId,
    pub state: &'a Desired,
}

/// The decision: what changes, what runs where, and the tasks the agents get.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The generation this plan writes (`based_on + 1`).
    pub generation: Generation,
    /// The observed generation it was planned from; the executor applies it only if that is still current.
    pub based_on: Generation,
    /// The config commit applied now.
    pub applied_commit: Option<CommitId>,
    /// The config commit this plan applies (the applied one when planning without a desired state).
    pub target_commit: Option<CommitId>,
    pub planned_at: DateTime<Utc>,
    pub seed: u64,
    /// False when a secret could not be compared by fingerprint; such a plan can be shown, not applied.
    pub secrets_verified: bool,
    /// Resource creates, changes and deletes: plans, runtimes, nodes, apps, each by name.
    pub changes: Vec<ResourceChange>,
    /// Releases this plan creates.
    pub releases: Vec<NewRelease>,
    /// Apps held on a release by a rollback.
    pub pins: Vec<Pin>,
    /// Replica slots that appear, move or go away.
    pub placement_changes: Vec<PlacementChange>,
    /// Agent tasks, deploys first and removes last.
    pub tasks: Vec<Task>,
    /// Where public traffic enters: the ingress nodes, and the hosts apps answer from now on.
    pub ingress: Ingress,
    pub warnings: Vec<Warning>,
    /// Per node: capacity and use before and after.
    pub nodes: Vec<NodeHeadroom>,
    pub cost: Cost,
    /// The complete set of replica placements after this plan (unchanged ones keep their generation),
    /// by app, then slot. Shared: a [`Planner`] keeps it to patch for its next plan.
    pub placements: std::sync::Arc<Vec<ReplicaPlacement>>,
    /// Managed databases: where each runs, what happens to it, its backups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<DatabasePlan>,
}

/// One managed database in a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatabasePlan {
    pub name: Name,
    pub engine: cairn_schema::database::Engine,
    pub version: String,
    pub change: DatabaseChange,
    /// The node it runs on after this plan (`None`: no node could take it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Its plan's disk.
    pub disk: cairn_schema::ByteSize,
    /// Disk left on its node after this plan (replicas and databases counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_disk_free: Option<cairn_schema::ByteSize>,
    /// Its plan's monthly price (nothing for one being removed).
    pub monthly: Price,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_schedule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_to: Option<String>,
    /// When the last good backup finished: the recovery point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_good_backup: Option<DateTime<Utc>>,
    /// The task this plan gives its node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<DatabaseTask>,
}

/// What a plan does with a database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DatabaseChange {
    /// Placed for the first time, empty.
    Create,
    /// Stays where it is.
    Keep,
    /// Its manifest names another node: it starts there empty and needs a restore.
    Move { from: Name },
    /// Its node is offline or gone: nothing runs it, and it is not moved empty.
    Unavailable { why: String },
    /// A new database no node can take.
    Unplaced { why: String },
    /// No longer declared: stopped, its data kept until dropped explicitly.
    Delete,
    /// Its `version` changed from `from`: a dump and restore into a new instance on its node, beside
    /// the old one, which keeps serving until the upgrade succeeds and stays (stopped) until
    /// `cairn db finish-upgrade`.
    Upgrade { from: String },
    /// A change the planner will not make (its engine changed): it stays as it is.
    Refused { why: String },
}

/// A database task the plan enqueues for the database's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseTask {
    /// Create or start the server and its login.
    Ensure,
    /// Stop the server, keeping its data.
    Stop,
    /// Dump the current instance and restore it into a new one running the new version.
    Upgrade,
}

impl Plan {
    /// Nothing to write at all: no resource, release, placement or task, and the same config commit. A
    /// reconcile of the applied commit with nothing else changed gives an empty plan.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.releases.is_empty()
            && self.placement_changes.is_empty()
            && self.tasks.is_empty()
            && self.databases.iter().all(|d| d.task.is_none())
            && self.target_commit == self.applied_commit
    }

    /// `(to add, to change, to destroy)` resources.
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |a: Action| self.changes.iter().filter(|c| c.action == a).count();
        (n(Action::Create), n(Action::Update), n(Action::Delete))
    }

    /// `Plan: 2 to add, 1 to change, 0 to destroy.`
    pub fn summary(&self) -> String {
        let (a, c, d) = self.counts();
        format!("Plan: {a} to add, {c} to change, {d} to destroy.")
    }

    /// How many tasks of each action, in task order.
    pub fn task_counts(&self) -> Vec<(TaskAction, usize)> {
        TaskAction::ALL
            .into_iter()
            .map(|a| (a, self.tasks.iter().filter(|t| t.action == a).count()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// What happens to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Delete,
}

/// One resource's create, change or delete.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceChange {
    pub kind: Kind,
    pub name: Name,
    pub action: Action,
    /// Field differences (for a create: the fields it is created with; for a delete: none).
    pub fields: Vec<FieldDiff>,
    /// Where the desired resource is declared (none for a delete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// One field's difference. A path is dotted: `source.branch`, `env.DB_URL`, `labels.disk`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldDiff {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Shown>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Shown>,
    /// A secret whose ciphertext changed but whose plaintext could not be compared: it may only have been
    /// re-encrypted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
}

/// A field's value as a plan may show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Shown {
    /// A secret; serialized as `{"secret": true}`, never with its value.
    Secret {
        secret: bool,
    },
    Value(serde_json::Value),
}

impl Shown {
    pub fn secret() -> Self {
        Shown::Secret { secret: true }
    }
    pub fn is_secret(&self) -> bool {
        matches!(self, Shown::Secret { .. })
    }
}

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shown::Secret { .. } => f.write_str("(secret)"),
            Shown::Value(v) => write!(f, "{v}"),
        }
    }
}

/// A release this plan creates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewRelease {
    pub app: Name,
    pub number: ReleaseNumber,
    /// The app's latest release before this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<ReleaseNumber>,
    pub config_commit: CommitId,
    pub source_commit: CommitId,
    /// The previous release's source commit, when it differs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_was: Option<CommitId>,
    /// Whether the spec (env, runtime, plan limits, port, health, source url) differs from the previous
    /// release's.
    pub config_changed: bool,
    /// [`ReleaseSpec::hash`] of `spec`.
    pub spec_hash: String,
    /// What the release runs with (no secret values: fingerprints only). Not serialized in plan output.
    #[serde(skip)]
    pub spec: ReleaseSpec,
}

/// Everything a release runs with besides its source commit. Its hash decides whether a config change
/// needs a new release; changing this type's serialization makes every app redeploy once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    pub app: Name,
    pub source_url: GitUrl,
    /// The port the app listens on (its own or its runtime's).
    pub port: u16,
    pub health: Health,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub drivers: Vec<Driver>,
    pub dockerfile: bool,
    pub image: Option<String>,
    pub build: Vec<String>,
    pub start: Option<String>,
    pub env: BTreeMap<EnvName, ReleaseEnv>,
}

/// An env var in a release spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ReleaseEnv {
    Plain {
        value: String,
    },
    Secret {
        fingerprint: String,
    },
    /// An attached database's URL, made by the control plane and sealed to the node like a secret;
    /// the fingerprint says which instance, node, port and credentials ([`databases::binding_fingerprint`]).
    Database {
        database: Name,
        fingerprint: String,
    },
}

impl ReleaseSpec {
    /// `sha256:` and the hex SHA-256 of the spec's JSON.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("a release spec serializes");
        format!("sha256:{}", crate::observed::hex_sha256(&json))
    }
}

/// An app a rollback holds on a release, or whose pin this plan lifts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pin {
    pub app: Name,
    pub release: ReleaseNumber,
    /// Whether a newer source commit or config waits for the pin to be lifted.
    pub holding_back: bool,
    /// The app's manifest changed: a change to the app is a deploy, so this plan clears the pin (the
    /// executor deletes it) and the app runs the release the change makes, as if it was never pinned.
    pub lifted: bool,
}

/// A replica slot that appears, moves or goes away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlacementChange {
    pub app: Name,
    pub slot: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Name>,
    pub reason: PlacementReason,
}

/// Why a slot appears, moves or goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlacementReason {
    /// A new app, more replicas, or an app that was unplaced so far.
    NewReplica,
    Moved {
        why: MoveReason,
    },
    ScaledDown,
    AppDeleted,
    /// It left its node and no other can take it.
    Unplaced {
        why: Option<MoveReason>,
    },
    /// A stopped replica's node was removed.
    NodeRemoved,
}

impl PlacementReason {
    pub fn describe(&self) -> String {
        match self {
            PlacementReason::NewReplica => "new replica".into(),
            PlacementReason::Moved { why } => format!("moved: {why}"),
            PlacementReason::ScaledDown => "scaled down".into(),
            PlacementReason::AppDeleted => "app deleted".into(),
            PlacementReason::Unplaced { why: Some(w) } => format!("unplaced ({w})"),
            PlacementReason::Unplaced { why: None } => "unplaced".into(),
            PlacementReason::NodeRemoved => "node removed".into(),
        }
    }
}

/// What an agent is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskAction {
    /// Build (or fetch) the release's image and run it in the slot, replacing what runs there.
    Deploy,
    /// Start the slot's stopped replica again (same release).
    Start,
    /// Restart the slot's running replica (same release).
    Restart,
    /// Stop the slot's replica, keeping it (the app is suspended).
    Stop,
    /// Stop and delete the slot's replica.
    Remove,
}

impl TaskAction {
    pub const ALL: [TaskAction; 5] = [
        TaskAction::Deploy,
        TaskAction::Start,
        TaskAction::Restart,
        TaskAction::Stop,
        TaskAction::Remove,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            TaskAction::Deploy => "deploy",
            TaskAction::Start => "start",
            TaskAction::Restart => "restart",
            TaskAction::Stop => "stop",
            TaskAction::Remove => "remove",
        }
    }
}

/// One agent task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    pub node: Name,
    pub action: TaskAction,
    pub app: Name,
    pub slot: u32,
    pub release: ReleaseNumber,
    /// Set when the node is pending or offline: the task waits until it joins or comes back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waits_for: Option<NodeState>,
}

/// Where public traffic enters the cluster. Every node with `ingress = true` and an `address` serves every
/// app (its proxy forwards a request one hop to a node with a healthy replica), so DNS (or a load
/// balancer) points every app's hosts at those nodes; an ingress node without an address serves only the
/// replicas it runs (all of them when it is the cluster's only node).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ingress {
    /// The ingress nodes that serve every app after the plan, by name: those with an address, or the
    /// only node of a one-node cluster.
    pub nodes: Vec<Name>,
    /// The same before the plan (the applied configuration).
    pub nodes_before: Vec<Name>,
    /// Apps that answer hosts after the plan that they did not answer before (every host of a new app),
    /// by app.
    pub new_hosts: Vec<NewHosts>,
    /// With `[tls]`: HTTPS for each app that gains hosts, and for each app whose certificate needs
    /// attention (waiting for DNS, failed), by app. Not a change by itself: a certificate waiting since an
    /// earlier commit is reported on every plan until it is issued.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<AppCertificate>,
}

impl Ingress {
    /// Whether the plan changes where traffic enters or what it is for.
    pub fn changes(&self) -> bool {
        self.nodes != self.nodes_before || !self.new_hosts.is_empty()
    }
}

/// How an app's hosts are served over HTTPS after the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppCertificate {
    pub app: Name,
    /// Every host of the app, sorted (a certificate covers them all).
    pub names: Vec<String>,
    pub https: Https,
}

/// Where an app's certificate comes from, and the state of an automatic one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Https {
    /// `tls = "off"`: plain HTTP only.
    Off,
    /// `tls = { cert = ... }`: the app's own certificate from the repository.
    Own,
    /// `tls = "auto"`: ordered from the ACME CA. `state` is `None` when no certificate is on record for
    /// exactly these names: it is ordered once the plan is applied, after a self-probe finds that every
    /// name reaches an ingress node.
    Auto {
        state: Option<observed::CertState>,
        not_after: Option<DateTime<Utc>>,
        /// Why the last attempt failed.
        last_error: Option<String>,
    },
}

impl Https {
    /// Whether an operator should look: the names wait for DNS or the CA refused.
    pub fn needs_attention(&self) -> bool {
        matches!(
            self,
            Https::Auto {
                state: Some(observed::CertState::WaitingDns | observed::CertState::Failed),
                ..
            }
        )
    }
}

/// Hosts an app answers from this plan on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewHosts {
    pub app: Name,
    /// Lowercase, sorted: its new `domains` and its generated `<app>.<base_domain>`.
    pub hosts: Vec<String>,
}

/// Something the plan could not do, or that will take longer than it looks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub kind: WarningKind,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    /// A replica no node can take.
    Unplaced,
    /// A replica that should move but stays on its node, as no other can take it.
    Stranded,
    /// A pending or offline node has tasks that wait for it.
    NodeWaiting,
    /// An app's branch head is not known yet, so it has no release to run.
    NoSourceHead,
    /// A node joined with another recipient than its manifest pins; it gets nothing.
    RecipientMismatch,
    /// An applied app refers to a plan or runtime that is not applied (only without a desired state).
    MissingReference,
    /// A secret could not be compared by fingerprint.
    SecretsUnverified,
    /// A host would not be served by every ingress node: no node has `ingress = true` and an `address`
    /// (in a cluster of more than one node).
    Unreachable,
    /// A database's node is offline or gone: it is reported with its recovery point, never moved empty.
    DatabaseUnavailable,
    /// A database moves to another node and needs a restore there.
    DatabaseMove,
    /// A new database no node can take.
    DatabaseUnplaced,
    /// A database change the planner refuses (its engine changed).
    DatabaseRefused,
}

/// A node's capacity and use before and after the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeHeadroom {
    pub node: Name,
    /// Liveness at `now`.
    pub state: NodeState,
    /// How the scheduler treated it; `None` for a node the plan removes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<Condition>,
    /// `None` for a node the plan creates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Usage>,
    /// `None` for a node the plan removes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Usage>,
}

/// A node's capacity and what running replicas reserve on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub capacity: Resources,
    pub used: Resources,
    pub replicas: u32,
}

impl Usage {
    pub fn free(&self) -> Resources {
        self.capacity.saturating_sub(&self.used)
    }
}

/// Monthly cost: plan price × replicas of every app that is not suspended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cost {
    pub currency: String,
    pub before: Price,
    pub after: Price,
}

impl Cost {
    pub fn delta(&self) -> Decimal {
        self.after.amount() - self.before.amount()
    }
}
