//! What `cairn status` shows, computed from the observed state: apps (desired and placed replicas, where
//! they run, the latest release), nodes (state, last heartbeat, capacity and use, address and ingress
//! role), and the last reconciliation; what the agents report next to it (each node's own count and use,
//! and for each placed replica whether its node runs it); and where each app is reachable (its hosts, the
//! nodes with a healthy replica, the ingress nodes that take its traffic), from the same route table the
//! agents' proxies get ([`crate::routes::table`]), so the two never disagree. The admin API serves the
//! same value, so the CLI shows the same either way. Fields added later carry serde defaults, so a client
//! reads an older server's status.
//!
//! At any size it shows a page: at most [`DEFAULT_APPS`] apps by default (every one on a small
//! installation, which is what it always showed), one app (`--app`), or the page after a cursor
//! (`--after`, what [`Status::next_after`] says), with the count of all apps; every node, its use summed
//! by the database. It reads one read-only snapshot that takes no lock (`store::status`), so it never
//! waits for a reconcile nor holds one up, and its work follows the page.
//!
//! What it must not do: read anything but the store, show env values, or read every app.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use std::collections::{BTreeMap, HashMap};

use cairn_schema::Name;

use crate::store::routes::RouteRows;
use crate::store::status::NodeUse;
use crate::store::{Reconciliation, StoreError, history, nodes};
use cairn_plan::observed::{NodeState, Observed, ReplicaState};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub generation: u64,
    pub applied_commit: Option<String>,
    pub apps: Vec<AppStatus>,
    pub nodes: Vec<NodeView>,
    pub last_reconciliation: Option<Reconciliation>,
    /// Certificates that need attention (`crate::certs::warnings`): waiting for DNS, failed, or
    /// expiring within 14 days.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificate_warnings: Vec<String>,
    /// Managed databases that need attention: unavailable (their node is not online, with the recovery
    /// point), or whose last backup failed or is older than two of its schedule's intervals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub database_warnings: Vec<String>,
    /// How many apps are applied (`apps` holds a page of them); `None` from an older server, which
    /// showed every app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apps_total: Option<u64>,
    /// The last app of this page when more follow: ask again with `after` set to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
    /// The control planes on this database and their leader; `None` from an older server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_planes: Option<ControlPlanes>,
}

/// The control planes seen within [`REPLICAS_SEEN_WITHIN`], and the leader's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlPlanes {
    /// The replica holding the lease, when it has not expired.
    pub leader: Option<String>,
    /// The lease's epoch: raised by each new leader.
    pub epoch: u64,
    /// Seconds since the leader took the lease, and since it last renewed it (by the database's clock).
    pub leader_for_secs: Option<f64>,
    pub lease_age_secs: Option<f64>,
    pub replicas: Vec<ControlPlaneView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlPlaneView {
    pub id: String,
    pub address: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    /// Seconds since it last took part in the lease (by the database's clock).
    pub last_seen_secs: f64,
    pub leader: bool,
}

/// Replicas not seen for this long are left out of the status (their rows go after a day).
pub const REPLICAS_SEEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// The control planes and the lease, read in `conn`.
async fn control_planes(conn: &mut sqlx::PgConnection) -> Result<ControlPlanes, StoreError> {
    let (lease, rows) = crate::store::lease::read(conn, REPLICAS_SEEN_WITHIN.as_secs_f64()).await?;
    let secs = |t: DateTime<Utc>| (lease.now - t).num_milliseconds().max(0) as f64 / 1000.0;
    let leader = lease.holder.clone().filter(|_| lease.live);
    Ok(ControlPlanes {
        epoch: lease.epoch,
        leader_for_secs: leader.as_ref().and(lease.acquired_at).map(secs),
        lease_age_secs: leader.as_ref().and(lease.renewed_at).map(secs),
        replicas: rows
            .into_iter()
            .map(|r| ControlPlaneView {
                leader: leader.as_deref() == Some(r.id.as_str()),
                last_seen_secs: secs(r.last_seen),
                id: r.id,
                address: r.address,
                version: r.version,
                started_at: r.started_at,
            })
            .collect(),
        leader,
    })
}

/// How many apps a status shows unless asked for more (or fewer).
pub const DEFAULT_APPS: u32 = 100;
/// The most apps one status shows.
pub const MAX_APPS: u32 = 1000;

/// Which apps a status shows: the one named, or a page in name order after a cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many apps (1 to [`MAX_APPS`], default [`DEFAULT_APPS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub desired_replicas: u32,
    /// Slots assigned to a node and meant to run.
    pub placed_replicas: u32,
    pub suspended: bool,
    /// Where each slot runs: `(slot, node, release, state)`.
    pub replicas: Vec<ReplicaView>,
    pub latest_release: Option<u64>,
    pub source_commit: Option<String>,
    /// A rollback pin holds the app on this release.
    pub pinned_release: Option<u64>,
    /// The hosts it answers (the route table's: its `domains` and `<app>.<base_domain>`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The online nodes that report a healthy replica of it, where the proxies route it; none: every
    /// request for it answers 503.
    #[serde(default)]
    pub healthy_nodes: Vec<String>,
    /// The ingress nodes that take its traffic: every one with an address (it forwards to a node with a
    /// replica), and one without an address where it has a healthy replica.
    #[serde(default)]
    pub ingress_nodes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub slot: u32,
    pub node: String,
    pub release: u64,
    pub state: String,
    /// What the node's agent last reported for this slot; `None` when it reported nothing for it (not
    /// deployed yet, lost, or the node never reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<ActualView>,
}

/// A replica as its node's agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualView {
    pub release: u64,
    /// `running` or `stopped`.
    pub state: String,
    pub healthy: bool,
}

/// What a node's agent last reported about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub agent_version: Option<String>,
    pub reported_at: Option<DateTime<Utc>>,
    /// CPU, memory and disk its replicas use, as the agent counts them.
    pub used: Option<cairn_proto::Resources>,
    /// Replicas it runs (of any app, placed there or not).
    pub running: u32,
    pub healthy: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub region: Option<String>,
    pub drain: bool,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub used_cpu_millis: u32,
    pub used_memory_bytes: u64,
    pub used_disk_bytes: u64,
    pub replicas: u32,
    /// The agent's own report; `None` for a node that never reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentReport>,
    /// Where the other nodes reach its proxy (`host:port`); `None`: it serves only its own replicas and
    /// is never forwarded to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Whether it takes public traffic (`ingress = true`: DNS or a load balancer points at it).
    #[serde(default = "yes")]
    pub ingress: bool,
}

fn yes() -> bool {
    true
}

/// The status at `now` of the apps in `obs` (a node heard from longer ago than `offline_after` shows as
/// offline); each node's use is `usage`'s (summed over every app, not only those shown). Linear in the
/// apps, placements and nodes given.
pub fn compute(
    obs: &Observed,
    usage: &BTreeMap<Name, NodeUse>,
    last: Option<Reconciliation>,
    now: DateTime<Utc>,
    offline_after: std::time::Duration,
) -> Status {
    let mut by_app: BTreeMap<&Name, Vec<ReplicaView>> = BTreeMap::new();
    for p in &obs.placements {
        by_app.entry(&p.app).or_default().push(ReplicaView {
            slot: p.slot,
            node: p.node.to_string(),
            release: p.release,
            state: match p.state {
                ReplicaState::Running => "running",
                ReplicaState::Stopped => "stopped",
            }
            .to_owned(),
            actual: None,
        });
    }
    let apps = obs
        .apps
        .iter()
        .map(|(name, a)| {
            let mut replicas = by_app.remove(name).unwrap_or_default();
            replicas.sort_by_key(|r| r.slot);
            let release = obs.releases.get(name);
            AppStatus {
                name: name.to_string(),
                desired_replicas: if a.suspended { 0 } else { a.replicas },
                placed_replicas: replicas.iter().filter(|r| r.state == "running").count() as u32,
                suspended: a.suspended,
                replicas,
                latest_release: release.map(|r| r.number),
                source_commit: release.map(|r| r.source_commit.to_string()),
                pinned_release: obs.rollback_pins.get(name).copied(),
                hosts: Vec::new(),
                healthy_nodes: Vec::new(),
                ingress_nodes: Vec::new(),
            }
        })
        .collect();
    let nodes = obs
        .nodes
        .iter()
        .map(|(name, n)| {
            let status = obs.node_status.get(name);
            let last_heartbeat = status.and_then(|s| s.last_heartbeat);
            let state = shown_state(
                status.map_or(NodeState::Pending, |s| s.state),
                last_heartbeat,
                now,
                offline_after,
            );
            let used = usage.get(name).copied().unwrap_or_default();
            NodeView {
                name: name.to_string(),
                state,
                last_heartbeat,
                region: n.region.as_ref().map(|r| r.to_string()),
                drain: n.drain,
                cpu_millis: n.cpu.millis(),
                memory_bytes: n.memory.bytes(),
                disk_bytes: n.disk.bytes(),
                used_cpu_millis: used.cpu_millis,
                used_memory_bytes: used.memory_bytes,
                used_disk_bytes: used.disk_bytes,
                replicas: used.replicas,
                agent: None,
                address: n.address.as_ref().map(|a| a.endpoint()),
                ingress: n.ingress,
            }
        })
        .collect();
    Status {
        generation: obs.generation,
        applied_commit: obs.applied_commit.as_ref().map(|c| c.to_string()),
        apps,
        nodes,
        last_reconciliation: last,
        certificate_warnings: Vec::new(),
        control_planes: None,
        database_warnings: Vec::new(),
        apps_total: None,
        next_after: None,
    }
}

/// What the placed, running replicas in `obs` take from each node (their plans' sizes), as
/// `store::status` sums them: for a status computed from a whole observed state.
pub fn usage(obs: &Observed) -> BTreeMap<Name, NodeUse> {
    let mut out: BTreeMap<Name, NodeUse> = BTreeMap::new();
    for p in obs
        .placements
        .iter()
        .filter(|p| p.state == ReplicaState::Running)
    {
        let u = out.entry(p.node.clone()).or_default();
        if let Some(plan) = obs.apps.get(&p.app).and_then(|a| obs.plans.get(&a.plan)) {
            u.cpu_millis += plan.cpu.millis();
            u.memory_bytes += plan.memory.bytes();
            u.disk_bytes += plan.disk.bytes();
        }
        u.replicas += 1;
    }
    out
}

/// A node's state as shown at `now`: an online node heard from longer ago than `offline_after` is offline
/// even before the node-health monitor records it.
pub fn shown_state(
    state: NodeState,
    last_heartbeat: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    offline_after: std::time::Duration,
) -> NodeState {
    let silent =
        last_heartbeat.is_some_and(|h| (now - h).to_std().unwrap_or_default() > offline_after);
    if state == NodeState::Online && silent {
        NodeState::Offline
    } else {
        state
    }
}

/// Adds what the agents reported: each node's own report, and for each placed replica what its node
/// says runs in that slot.
pub fn attach_reports(status: &mut Status, reports: &[nodes::NodeRow]) {
    use cairn_proto::RunState;
    let by_node: HashMap<&str, &nodes::NodeRow> =
        reports.iter().map(|r| (r.name.as_str(), r)).collect();
    for n in &mut status.nodes {
        let Some(r) = by_node.get(n.name.as_str()) else {
            continue;
        };
        if r.reported_at.is_none() && r.agent_version.is_none() {
            continue;
        }
        let running = r
            .replicas
            .iter()
            .filter(|x| x.state == RunState::Running)
            .count() as u32;
        n.agent = Some(AgentReport {
            agent_version: r.agent_version.clone(),
            reported_at: r.reported_at,
            used: r.resources,
            running,
            healthy: r.replicas.iter().filter(|x| x.healthy).count() as u32,
        });
    }
    // (node, app, slot) -> what runs there, for the apps shown only.
    let shown: std::collections::HashSet<&str> =
        status.apps.iter().map(|a| a.name.as_str()).collect();
    let mut actual: HashMap<(&str, &str, u32), &cairn_proto::ActualReplica> = HashMap::new();
    for r in reports {
        for x in r.replicas.iter().filter(|x| shown.contains(x.app.as_str())) {
            actual
                .entry((r.name.as_str(), x.app.as_str(), x.slot))
                .or_insert(x);
        }
    }
    for a in &mut status.apps {
        for v in &mut a.replicas {
            v.actual = actual
                .get(&(v.node.as_str(), a.name.as_str(), v.slot))
                .map(|x| ActualView {
                    release: x.release,
                    state: match x.state {
                        RunState::Running => "running",
                        RunState::Stopped => "stopped",
                    }
                    .to_owned(),
                    healthy: x.healthy,
                });
        }
    }
}

/// Adds where each app is reachable, from the route table the rows give (the agents' table).
pub fn attach_routes(status: &mut Status, rows: &RouteRows) {
    let table = crate::routes::table(rows);
    let by_app: HashMap<&str, &cairn_proto::routes::AppRoute> =
        table.apps.iter().map(|r| (r.app.as_str(), r)).collect();
    for a in &mut status.apps {
        let Some(route) = by_app.get(a.name.as_str()) else {
            continue;
        };
        a.hosts = route.hosts.clone();
        a.healthy_nodes = route.nodes.iter().map(|n| n.to_string()).collect();
        a.ingress_nodes = rows
            .nodes
            .iter()
            .filter(|n| n.ingress && (n.address.is_some() || route.nodes.contains(&n.name)))
            .map(|n| n.name.to_string())
            .collect();
    }
}

/// Loads a page of the status from the database (what `query` asks for), with what the agents reported
/// and the route table of the apps shown.
pub async fn load(
    pool: &PgPool,
    offline_after: std::time::Duration,
    query: &StatusQuery,
) -> Result<Status, StoreError> {
    let limit = query.limit.unwrap_or(DEFAULT_APPS).clamp(1, MAX_APPS);
    let page =
        crate::store::status::page(pool, query.app.as_deref(), query.after.as_deref(), limit)
            .await?;
    let reports = nodes::nodes(pool).await?;
    let mut conn = pool.acquire().await.map_err(|e| StoreError::Query {
        op: "read the status",
        source: e,
    })?;
    let last = history::recent_reconciliations(&mut conn, 1)
        .await?
        .into_iter()
        .next();
    let names: Vec<String> = page.observed.apps.keys().map(|n| n.to_string()).collect();
    let routes = crate::store::routes::rows_for_apps(&mut conn, &names).await?;
    let mut status = compute(&page.observed, &page.usage, last, Utc::now(), offline_after);
    status.apps_total = Some(page.apps_total);
    status.next_after = page.next_after;
    attach_reports(&mut status, &reports);
    attach_routes(&mut status, &routes);
    status.control_planes = Some(control_planes(&mut conn).await?);
    drop(conn);
    status.certificate_warnings = crate::certs::warnings(&crate::certs::list(pool).await?);
    status.database_warnings =
        crate::databases::warnings(&crate::databases::list_databases(pool).await?);
    Ok(status)
}
