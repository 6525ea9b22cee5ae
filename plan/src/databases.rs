//! Where each managed database runs, decided once and then kept.
//!
//! A database holds data that exists on one node only: it is placed once (its manifest's `node`, else
//! the node with the most free disk that fits its plan) and never moved by the planner on its own. A
//! node going offline leaves it there, reported unavailable with its recovery point (the last good
//! backup); only a manifest that names another `node` moves it, and that move is shown as one that
//! needs a restore (`cairn db restore NAME --latest`), because the new node starts empty.
//!
//! Pure, like the rest of the crate.

use std::collections::{BTreeMap, BTreeSet};

use cairn_schema::{ByteSize, Name, Node, Plan as PlanSpec, Price};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::observed::{AppliedDatabase, NodeState, Observed, ObservedDatabase, hex_sha256};
use crate::scheduler::{Condition, Resources};
use crate::{DatabaseChange, DatabasePlan, DatabaseTask, Warning, WarningKind};

/// The first port databases listen on; each further one takes the next port no database uses.
pub const FIRST_PORT: u16 = 15432;

/// What the planner knows of a node for databases.
pub(crate) struct NodeFacts<'a> {
    pub spec: &'a Node,
    pub state: NodeState,
    pub condition: Condition,
}

/// Decides every database's node and port, the tasks that get it there, and what to warn about.
/// `app_use` is what replicas reserve on each node now (a new database goes where there is room
/// beside them).
pub(crate) fn place(
    obs: &Observed,
    target: &BTreeMap<Name, AppliedDatabase>,
    plans: &BTreeMap<Name, PlanSpec>,
    nodes: &BTreeMap<Name, NodeFacts<'_>>,
    app_use: &BTreeMap<Name, Resources>,
    warnings: &mut Vec<Warning>,
) -> Vec<DatabasePlan> {
    let need = |spec: &AppliedDatabase| {
        plans
            .get(&spec.plan)
            .map(Resources::of_plan)
            .unwrap_or_default()
    };
    // Ports taken anywhere: a new or moved database gets one no database uses on any node, so
    // nodes sharing a host (`cairn dev`, a test) never collide, nor a move with the instance it
    // leaves behind. Resources: those of the databases that stay where they are.
    let mut ports: BTreeSet<u16> = obs.databases.values().map(|o| o.port).collect();
    ports.extend(obs.database_ports.iter().copied());
    let mut used: BTreeMap<Name, Resources> = app_use.clone();
    let mut out = Vec::new();
    let mut unplaced: Vec<(&Name, &AppliedDatabase)> = Vec::new();
    for (name, spec) in target {
        let Some(o) = obs.databases.get(name) else {
            unplaced.push((name, spec));
            continue;
        };
        if spec.node.as_ref().is_some_and(|n| *n != o.node) {
            unplaced.push((name, spec));
            continue;
        }
        add(&mut used, &o.node, &need(spec));
        let change = match nodes.get(&o.node) {
            None => DatabaseChange::Unavailable {
                why: format!("node {} is no longer declared", o.node),
            },
            Some(f) if f.state == NodeState::Offline => DatabaseChange::Unavailable {
                why: format!("node {} is offline", o.node),
            },
            Some(_) => DatabaseChange::Keep,
        };
        // Its engine never changes in place; a new version is an upgrade beside the old instance
        // (an unavailable one waits for its node: `next_databases` keeps the running version).
        let change = match change {
            DatabaseChange::Keep if o.spec.engine != spec.engine => DatabaseChange::Refused {
                why: engine_refused(name, o, spec, warnings),
            },
            DatabaseChange::Keep if o.spec.version != spec.version => DatabaseChange::Upgrade {
                from: o.spec.version.clone(),
            },
            other => other,
        };
        if let DatabaseChange::Unavailable { why } = &change {
            warnings.push(Warning {
                kind: WarningKind::DatabaseUnavailable,
                message: format!(
                    "database {name} is unavailable: {why}; recovery point {}; it is never moved empty: set its `node` to another node and run `cairn db restore {name} --latest`",
                    recovery_point(o.last_good_backup)
                ),
                app: None,
                slot: None,
                node: Some(o.node.clone()),
            });
        }
        let task =
            matches!(change, DatabaseChange::Upgrade { .. }).then_some(DatabaseTask::Upgrade);
        out.push(entry(
            name,
            spec,
            o.node.clone(),
            o.port,
            change,
            task,
            Some(o),
        ));
    }
    // New databases and moves, in name order.
    for (name, spec) in unplaced {
        let o = obs.databases.get(name);
        let need = need(spec);
        // A move does not change the engine either: it stays where it is, as it is.
        if let Some(o) = o.filter(|o| o.spec.engine != spec.engine) {
            add(&mut used, &o.node, &need);
            let why = engine_refused(name, o, spec, warnings);
            out.push(entry(
                name,
                &o.spec,
                o.node.clone(),
                o.port,
                DatabaseChange::Refused { why },
                None,
                Some(o),
            ));
            continue;
        }
        let chosen = match &spec.node {
            Some(n) => match nodes.get(n) {
                Some(_) => Ok(n.clone()),
                None => Err(format!("node {n} is not declared")),
            },
            None => pick(nodes, &used, &need),
        };
        match chosen {
            Ok(node) => {
                let port = free_port(&mut ports);
                add(&mut used, &node, &need);
                let change = match o {
                    Some(o) => {
                        warnings.push(Warning {
                            kind: WarningKind::DatabaseMove,
                            message: format!(
                                "database {name} moves from {} to {node} and starts there empty: run `cairn db restore {name} --latest` after this applies (recovery point {}); the data on {} is kept",
                                o.node,
                                recovery_point(o.last_good_backup),
                                o.node
                            ),
                            app: None,
                            slot: None,
                            node: Some(node.clone()),
                        });
                        DatabaseChange::Move {
                            from: o.node.clone(),
                        }
                    }
                    None => DatabaseChange::Create,
                };
                out.push(entry(
                    name,
                    spec,
                    node,
                    port,
                    change,
                    Some(DatabaseTask::Ensure),
                    o,
                ));
            }
            Err(why) => {
                warnings.push(Warning {
                    kind: WarningKind::DatabaseUnplaced,
                    message: format!("database {name}: {why}"),
                    app: None,
                    slot: None,
                    node: None,
                });
                let mut e = entry(
                    name,
                    spec,
                    Name::new("unplaced").expect("a valid name"),
                    0,
                    DatabaseChange::Unplaced { why },
                    None,
                    o,
                );
                e.node = None;
                e.port = None;
                out.push(e);
            }
        }
    }
    // Databases no longer declared: stopped, their data kept until dropped explicitly.
    for (name, o) in &obs.databases {
        if !target.contains_key(name) {
            let mut e = entry(
                name,
                &o.spec,
                o.node.clone(),
                o.port,
                DatabaseChange::Delete,
                Some(DatabaseTask::Stop),
                Some(o),
            );
            e.monthly = Price::default();
            out.push(e);
        }
    }
    for e in &mut out {
        if let (Some(node), Some(f)) = (&e.node, e.node.as_ref().and_then(|n| nodes.get(n))) {
            let cap = Resources::of_node(f.spec);
            let u = used.get(node).copied().unwrap_or_default();
            e.node_disk_free = Some(cap.saturating_sub(&u).disk);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Why a database's engine change is refused.
/// Why an engine change is refused, with its plan warning pushed.
fn engine_refused(
    name: &Name,
    o: &ObservedDatabase,
    spec: &AppliedDatabase,
    warnings: &mut Vec<Warning>,
) -> String {
    let why = format!(
        "its engine cannot change from {} to {}: declare a new database and move the data with a backup and `cairn db restore`",
        o.spec.engine, spec.engine
    );
    warnings.push(Warning {
        kind: WarningKind::DatabaseRefused,
        message: format!("database {name}: {why}"),
        app: None,
        slot: None,
        node: Some(o.node.clone()),
    });
    why
}

fn entry(
    name: &Name,
    spec: &AppliedDatabase,
    node: Name,
    port: u16,
    change: DatabaseChange,
    task: Option<DatabaseTask>,
    o: Option<&ObservedDatabase>,
) -> DatabasePlan {
    DatabasePlan {
        name: name.clone(),
        engine: spec.engine,
        version: spec.version.clone(),
        change,
        node: Some(node),
        port: Some(port),
        disk: ByteSize::default(),
        node_disk_free: None,
        monthly: Price::default(),
        backup_schedule: spec.backup.as_ref().map(|b| b.schedule.clone()),
        backup_to: spec.backup.as_ref().map(|b| b.to.clone()),
        last_good_backup: o.and_then(|o| o.last_good_backup),
        task,
    }
}

/// Fills each entry's disk and price from its plan.
pub(crate) fn price(
    out: &mut [DatabasePlan],
    specs: &BTreeMap<Name, AppliedDatabase>,
    plans: &BTreeMap<Name, PlanSpec>,
) {
    for e in out.iter_mut() {
        if let Some(p) = specs.get(&e.name).and_then(|s| plans.get(&s.plan)) {
            e.disk = p.disk;
            if e.change != DatabaseChange::Delete {
                e.monthly = p.price;
            }
        }
    }
}

/// The monthly price of the databases in `specs` under `plans`.
pub(crate) fn monthly(
    specs: impl IntoIterator<Item = impl std::ops::Deref<Target = AppliedDatabase>>,
    plans: &BTreeMap<Name, PlanSpec>,
) -> Decimal {
    specs
        .into_iter()
        .filter_map(|s| plans.get(&s.plan).map(|p| p.price.amount()))
        .sum()
}

fn recovery_point(t: Option<DateTime<Utc>>) -> String {
    match t {
        Some(t) => t.format("%Y-%m-%d %H:%M UTC").to_string(),
        None => "none: no good backup yet".to_owned(),
    }
}

fn add(used: &mut BTreeMap<Name, Resources>, node: &Name, r: &Resources) {
    let e = used.entry(node.clone()).or_default();
    *e = e.saturating_add(r);
}

/// The schedulable node with the most free disk that fits `need` (ties: by name).
fn pick(
    nodes: &BTreeMap<Name, NodeFacts<'_>>,
    used: &BTreeMap<Name, Resources>,
    need: &Resources,
) -> Result<Name, String> {
    let mut best: Option<(u64, &Name)> = None;
    for (name, f) in nodes {
        if !f.condition.schedulable() {
            continue;
        }
        let free =
            Resources::of_node(f.spec).saturating_sub(&used.get(name).copied().unwrap_or_default());
        if !need.fits_in(&free) {
            continue;
        }
        if best.is_none_or(|(d, _)| free.disk.0 > d) {
            best = Some((free.disk.0, name));
        }
    }
    best.map(|(_, n)| n.clone())
        .ok_or_else(|| "no schedulable node has room for its plan".to_owned())
}

fn free_port(taken: &mut BTreeSet<u16>) -> u16 {
    let mut p = FIRST_PORT;
    while taken.contains(&p) {
        p += 1;
    }
    taken.insert(p);
    p
}

/// What an attached app's env var stands for, as a release's secret fingerprint: the database's
/// instance, node, port and credential generation. A swap, a move or a rotation changes it, and so
/// gives every attached app a new release. Reveals nothing: no password goes into it.
pub fn binding_fingerprint(
    name: &Name,
    node: &Name,
    port: u16,
    instance: &Name,
    credential: u64,
) -> String {
    format!(
        "database:{}",
        hex_sha256(format!("{name}\n{instance}\n{node}\n{port}\n{credential}").as_bytes())
    )
}
