//! What `cairn status` shows, computed from the observed state: apps (desired and placed replicas, where
//! they run, the latest release), nodes (state, last heartbeat, capacity and use, address and ingress
//! role), and the last reconciliation; what the agents report next to it (each node's own count and use,
//! and for each placed replica whether its node runs it); and where each app is reachable (its hosts, the
//! nodes with a healthy replica, the ingress nodes that take its traffic), from the same route table the
//! agents' proxies get ([`crate::routes::table`]), so the two never disagree. The admin API serves the
//! same value, so the CLI shows the same either way. Fields added later carry serde defaults, so a client
//! reads an older server's status.
//!
//! What it must not do: read anything but the store, or show env values.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::store::routes::RouteRows;
use crate::store::{Reconciliation, StoreError, history, nodes, state};
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

/// The status at `now` (a node heard from longer ago than `offline_after` shows as offline).
pub fn compute(
    obs: &Observed,
    last: Option<Reconciliation>,
    now: DateTime<Utc>,
    offline_after: std::time::Duration,
) -> Status {
    let apps = obs
        .apps
        .iter()
        .map(|(name, a)| {
            let mut replicas: Vec<ReplicaView> = obs
                .placements
                .iter()
                .filter(|p| &p.app == name)
                .map(|p| ReplicaView {
                    slot: p.slot,
                    node: p.node.to_string(),
                    release: p.release,
                    state: match p.state {
                        ReplicaState::Running => "running",
                        ReplicaState::Stopped => "stopped",
                    }
                    .to_owned(),
                    actual: None,
                })
                .collect();
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
            let mut view = NodeView {
                name: name.to_string(),
                state,
                last_heartbeat,
                region: n.region.as_ref().map(|r| r.to_string()),
                drain: n.drain,
                cpu_millis: n.cpu.millis(),
                memory_bytes: n.memory.bytes(),
                disk_bytes: n.disk.bytes(),
                used_cpu_millis: 0,
                used_memory_bytes: 0,
                used_disk_bytes: 0,
                replicas: 0,
                agent: None,
                address: n.address.as_ref().map(|a| a.endpoint()),
                ingress: n.ingress,
            };
            for p in obs
                .placements
                .iter()
                .filter(|p| &p.node == name && p.state == ReplicaState::Running)
            {
                if let Some(plan) = obs.apps.get(&p.app).and_then(|a| obs.plans.get(&a.plan)) {
                    view.used_cpu_millis += plan.cpu.millis();
                    view.used_memory_bytes += plan.memory.bytes();
                    view.used_disk_bytes += plan.disk.bytes();
                }
                view.replicas += 1;
            }
            view
        })
        .collect();
    Status {
        generation: obs.generation,
        applied_commit: obs.applied_commit.as_ref().map(|c| c.to_string()),
        apps,
        nodes,
        last_reconciliation: last,
        certificate_warnings: Vec::new(),
    }
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
    for n in &mut status.nodes {
        let Some(r) = reports.iter().find(|r| r.name.as_str() == n.name) else {
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
    for a in &mut status.apps {
        for v in &mut a.replicas {
            v.actual = reports
                .iter()
                .find(|r| r.name.as_str() == v.node)
                .and_then(|r| {
                    r.replicas
                        .iter()
                        .find(|x| x.app.as_str() == a.name && x.slot == v.slot)
                })
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
    for a in &mut status.apps {
        let Some(route) = table.apps.iter().find(|r| r.app.as_str() == a.name) else {
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

/// Loads the status from the database, with what the agents reported and the route table.
pub async fn load(pool: &PgPool, offline_after: std::time::Duration) -> Result<Status, StoreError> {
    let obs = state::load_observed(pool).await?;
    let reports = nodes::nodes(pool).await?;
    let mut conn = pool.acquire().await.map_err(|e| StoreError::Query {
        op: "read the status",
        source: e,
    })?;
    let last = history::recent_reconciliations(&mut conn, 1)
        .await?
        .into_iter()
        .next();
    let routes = crate::store::routes::rows(&mut conn).await?;
    let mut status = compute(&obs, last, Utc::now(), offline_after);
    attach_reports(&mut status, &reports);
    attach_routes(&mut status, &routes);
    drop(conn);
    status.certificate_warnings = crate::certs::warnings(&crate::certs::list(pool).await?);
    Ok(status)
}
