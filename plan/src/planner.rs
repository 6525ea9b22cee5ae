//! [`plan`]: the pure function from (desired, observed, seed, now) to a [`Plan`].
//!
//! The steps, in order: settle the target configuration (desired, or the applied one), diff it against
//! the applied resources, decide each app's release, schedule the replicas, derive the target placements
//! and the tasks that turn the observed placements into them, then report headroom, cost and warnings.

use std::collections::{BTreeMap, BTreeSet};

use cairn_schema::model::Origin;
use cairn_schema::{
    App, AppTls, Domain, Driver, EnvName, EnvValue, Kind, Name, Node, Plan as PlanSpec, Price,
    Runtime, TlsMode,
};
use rust_decimal::Decimal;

use super::diff::{
    Flat, diff, flat_app, flat_database, flat_node, flat_plan, flat_runtime, flat_sink,
};
use super::{
    Action, AppCertificate, Cost, Https, Ingress, NewHosts, NewRelease, NodeHeadroom, Pin,
    PlacementChange, PlacementReason, Plan, PlanInput, ReleaseEnv, ReleaseSpec, ResourceChange,
    Task, TaskAction, Usage, Warning, WarningKind,
};
use crate::observed::{
    AppliedApp, AppliedDatabase, AppliedEnv, AppliedSink, CommitId, Fingerprints, NodeState,
    ObservedCert, ReleaseNumber, ReplicaPlacement, ReplicaState, ciphertext_sha256,
    effective_state,
};
use crate::scheduler::{
    AppDemand, Condition, How, NodeInfo, Outcome, Resources, schedule, schedule_beside,
};

/// The configuration a plan moves to: the desired one, or the applied one when there is none.
pub(super) struct Target<'a> {
    pub commit: Option<CommitId>,
    pub plans: &'a BTreeMap<Name, PlanSpec>,
    pub runtimes: &'a BTreeMap<Name, Runtime>,
    pub nodes: &'a BTreeMap<Name, Node>,
    /// Apps in applied form; a secret that could not be verified has a stand-in fingerprint.
    pub apps: BTreeMap<Name, AppliedApp>,
    /// Secrets whose fingerprint is a stand-in (their ciphertext changed and no fingerprint was given).
    pub unverified: BTreeSet<(Name, EnvName)>,
    pub currency: String,
    pub base_domain: Option<Domain>,
    pub origins: Option<&'a BTreeMap<(Kind, Name), Origin>>,
    /// Managed databases in applied form.
    pub databases: BTreeMap<Name, AppliedDatabase>,
    /// Per database placed by this plan: what its URL stands for ([`crate::databases::binding_fingerprint`]).
    pub bindings: BTreeMap<Name, String>,
}

impl<'a> Target<'a> {
    /// The target of `input`, its apps only those of `scope`.
    pub(super) fn new(input: &PlanInput<'a>, scope: &Scope<'_>) -> Self {
        let obs = input.observed;
        let Some(d) = input.desired else {
            return Target {
                commit: obs.applied_commit.clone(),
                plans: &obs.plans,
                runtimes: &obs.runtimes,
                nodes: &obs.nodes,
                apps: scope.pick(&obs.apps),
                unverified: BTreeSet::new(),
                currency: obs
                    .currency
                    .clone()
                    .unwrap_or_else(cairn_schema::model::default_currency),
                base_domain: obs.base_domain.clone(),
                origins: None,
                databases: obs
                    .databases
                    .iter()
                    .map(|(n, d)| (n.clone(), d.spec.clone()))
                    .collect(),
                bindings: BTreeMap::new(),
            };
        };
        let mut unverified = BTreeSet::new();
        let apps = scope
            .select(&d.state.apps)
            .map(|(name, app)| {
                let env = applied_env(
                    name,
                    app,
                    input.fingerprints,
                    obs.apps.get(name),
                    &mut unverified,
                );
                (name.clone(), AppliedApp::with_env(app, env))
            })
            .collect();
        Target {
            commit: Some(d.commit.clone()),
            plans: &d.state.plans,
            runtimes: &d.state.runtimes,
            nodes: &d.state.nodes,
            apps,
            unverified,
            currency: d.state.settings.currency.clone(),
            base_domain: Some(d.state.settings.base_domain.clone()),
            origins: Some(&d.state.origins),
            databases: d
                .state
                .databases
                .iter()
                .map(|(n, db)| (n.clone(), AppliedDatabase::from_desired(db)))
                .collect(),
            bindings: BTreeMap::new(),
        }
    }
}

/// A desired app's env in applied form. A secret's fingerprint comes from the caller's map; without one,
/// an unchanged ciphertext keeps the applied fingerprint, and a changed one gets a stand-in and is marked
/// unverified.
fn applied_env(
    name: &Name,
    app: &App,
    fingerprints: Option<&Fingerprints>,
    applied: Option<&AppliedApp>,
    unverified: &mut BTreeSet<(Name, EnvName)>,
) -> BTreeMap<EnvName, AppliedEnv> {
    let mut env = BTreeMap::new();
    for (k, v) in &app.env {
        let e = match v {
            EnvValue::Plain(value) => AppliedEnv::Plain {
                value: value.clone(),
            },
            EnvValue::Secret { secret } => {
                let ct = ciphertext_sha256(secret);
                let given = fingerprints
                    .and_then(|f| f.get(&(name.clone(), k.clone())))
                    .cloned();
                let kept = || match applied.and_then(|a| a.env.get(k)) {
                    Some(AppliedEnv::Secret {
                        fingerprint,
                        ciphertext_sha256,
                    }) if *ciphertext_sha256 == ct => Some(fingerprint.clone()),
                    _ => None,
                };
                let fingerprint = given.or_else(kept).unwrap_or_else(|| {
                    unverified.insert((name.clone(), k.clone()));
                    format!("unverified:{ct}")
                });
                AppliedEnv::Secret {
                    fingerprint,
                    ciphertext_sha256: ct,
                }
            }
        };
        env.insert(k.clone(), e);
    }
    env
}

impl ReleaseSpec {
    /// The spec an app runs with under `plan` and `runtime`.
    pub fn new(name: &Name, app: &AppliedApp, plan: &PlanSpec, runtime: &Runtime) -> Self {
        ReleaseSpec {
            app: name.clone(),
            source_url: app.source.url.clone(),
            port: app.port.unwrap_or(runtime.port),
            health: app.health.clone(),
            cpu_millis: plan.cpu.millis(),
            memory_bytes: plan.memory.bytes(),
            disk_bytes: plan.disk.bytes(),
            drivers: runtime.drivers.clone(),
            dockerfile: runtime.dockerfile,
            image: runtime.image.clone(),
            build: runtime.build.clone(),
            start: runtime.start.clone(),
            env: app
                .env
                .iter()
                .map(|(k, v)| {
                    let e = match v {
                        AppliedEnv::Plain { value } => ReleaseEnv::Plain {
                            value: value.clone(),
                        },
                        AppliedEnv::Secret { fingerprint, .. } => ReleaseEnv::Secret {
                            fingerprint: fingerprint.clone(),
                        },
                    };
                    (k.clone(), e)
                })
                .collect(),
        }
    }
}

/// How the nodes look to this plan.
struct NodeView {
    state: NodeState,
    condition: Condition,
    drivers: Vec<Driver>,
}

/// What an app does in this plan.
enum Run {
    /// Its replicas run `release`.
    Running { release: ReleaseNumber },
    /// Its replicas are kept stopped.
    Suspended,
    /// It runs nothing (no replicas, no release to run, or a missing reference).
    Idle { why: PlacementReason },
}

/// Which apps a plan computes, and what the others (the quiet ones a [`crate::Planner`] kept from its
/// last plan) add up to.
pub(crate) struct Scope<'s> {
    /// The apps planned; `None`: every app.
    pub apps: Option<&'s BTreeSet<Name>>,
    /// The observed placements of the apps planned.
    pub placements: Vec<&'s ReplicaPlacement>,
    /// What the apps left out add up to; `None` when none is.
    pub quiet: Option<&'s Quiet>,
}

impl<'s> Scope<'s> {
    /// Every app of `observed`.
    pub fn all(observed: &'s crate::observed::Observed) -> Self {
        Scope {
            apps: None,
            placements: observed.placements.iter().collect(),
            quiet: None,
        }
    }

    /// The entries of `map` whose app is planned.
    pub fn select<'m, T>(
        &self,
        map: &'m BTreeMap<Name, T>,
    ) -> Box<dyn Iterator<Item = (&'m Name, &'m T)> + 'm>
    where
        's: 'm,
    {
        match self.apps {
            None => Box::new(map.iter()),
            Some(apps) => Box::new(apps.iter().filter_map(|n| map.get_key_value(n))),
        }
    }

    /// A copy of the entries of `map` whose app is planned.
    pub fn pick<T: Clone>(&self, map: &BTreeMap<Name, T>) -> BTreeMap<Name, T> {
        match self.apps {
            None => map.clone(),
            Some(_) => self
                .select(map)
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect(),
        }
    }
}

/// What the quiet apps of a [`Scope`] add up to, and what they were planned against: a plan that finds
/// the nodes or the databases' bindings changed, or that could not keep every quiet replica where it is,
/// plans every app instead.
#[derive(Debug, Clone, Default)]
pub(crate) struct Quiet {
    /// Quiet apps (every one is in the target).
    pub count: usize,
    /// Per node, what the quiet apps' replicas reserve (their observed replicas are their target ones,
    /// so this is also the room they take from the databases).
    pub used: BTreeMap<Name, Resources>,
    /// Per node, what their running observed replicas reserve under the applied plans, and how many.
    pub before: BTreeMap<Name, (Resources, u32)>,
    /// Per node, their running target replicas.
    pub after_replicas: BTreeMap<Name, u32>,
    /// Their monthly price before and after.
    pub cost_before: Decimal,
    pub cost_after: Decimal,
    /// The nodes and the databases' bindings the quiet apps were planned with.
    pub node_infos: Vec<NodeInfo>,
    pub bindings: BTreeMap<Name, String>,
}

/// A plan and what the planner saw of the nodes and the databases' bindings.
pub(crate) struct Planned {
    pub plan: Plan,
    pub node_infos: Vec<NodeInfo>,
    pub bindings: BTreeMap<Name, String>,
}

/// Plans the move from `input.observed` to `input.desired`. See the crate docs.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    plan_in(input, &Scope::all(input.observed))
        .expect("a plan of every app never falls back")
        .plan
}

/// Plans the apps of `scope`, counting the quiet ones as they were. `None` when a quiet app could not
/// stay as it is (the nodes or the bindings changed, or a node could not hold every replica kept on it):
/// only a plan of every app is right then.
pub(crate) fn plan_in(input: &PlanInput<'_>, scope: &Scope<'_>) -> Option<Planned> {
    let obs = input.observed;
    let mut target = Target::new(input, scope);
    let mut warnings = Vec::new();
    let generation = obs.generation + 1;
    let quiet = scope.quiet;
    let quiet_count = quiet.map_or(0, |q| q.count);

    // Resources.
    let mut changes = Vec::new();
    if input.desired.is_some() {
        changes.extend(kind_changes(
            Kind::Plan,
            &obs.plans,
            target.plans,
            target.origins,
            |_, p| flat_plan(p),
        ));
        changes.extend(kind_changes(
            Kind::Runtime,
            &obs.runtimes,
            target.runtimes,
            target.origins,
            |_, r| flat_runtime(r),
        ));
        changes.extend(kind_changes(
            Kind::Node,
            &obs.nodes,
            target.nodes,
            target.origins,
            |_, n| flat_node(n),
        ));
        let unverified = &target.unverified;
        let applied_apps = match scope.apps {
            None => std::borrow::Cow::Borrowed(&obs.apps),
            Some(_) => std::borrow::Cow::Owned(scope.pick(&obs.apps)),
        };
        changes.extend(kind_changes(
            Kind::App,
            &applied_apps,
            &target.apps,
            target.origins,
            |name, a| flat_app(a, |k| unverified.contains(&(name.clone(), k.clone()))),
        ));
        if let Some(d) = input.desired {
            let sinks: BTreeMap<Name, AppliedSink> = d
                .state
                .notify
                .iter()
                .map(|(n, s)| (n.clone(), AppliedSink::from_desired(s)))
                .collect();
            changes.extend(kind_changes(
                Kind::Notify,
                &obs.notify,
                &sinks,
                target.origins,
                |_, s| flat_sink(s),
            ));
        }
        let applied_dbs: BTreeMap<Name, AppliedDatabase> = obs
            .databases
            .iter()
            .map(|(n, d)| (n.clone(), d.spec.clone()))
            .collect();
        changes.extend(kind_changes(
            Kind::Database,
            &applied_dbs,
            &target.databases,
            target.origins,
            |_, d| flat_database(d),
        ));
    }
    if !target.unverified.is_empty() {
        let n = target.unverified.len();
        warnings.push(Warning {
            kind: WarningKind::SecretsUnverified,
            message: format!(
                "{n} secret{} could not be compared without the control plane's identity (shown as changed, unverified); this plan can be shown but not applied",
                if n == 1 { "" } else { "s" }
            ),
            app: None,
            slot: None,
            node: None,
        });
    }

    let views = node_views(input, &target, &mut warnings);
    let databases = place_databases(input, scope, &mut target, &views, &mut warnings);
    if quiet.is_some_and(|q| q.bindings != target.bindings) {
        return None;
    }
    // An app whose manifest changes is deployed even under a rollback pin: the change lifts the pin.
    let changed_apps: BTreeSet<&Name> = changes
        .iter()
        .filter(|c| c.kind == Kind::App && c.action == Action::Update)
        .map(|c| &c.name)
        .collect();
    let (runs, releases, pins) = decide_releases(input, &target, &changed_apps, &mut warnings);

    // Scheduling.
    let mut by_app: BTreeMap<&Name, Vec<&ReplicaPlacement>> = BTreeMap::new();
    for p in &scope.placements {
        by_app.entry(&p.app).or_default().push(p);
    }
    for v in by_app.values_mut() {
        v.sort_by(|a, b| (a.slot, &a.node, a.generation).cmp(&(b.slot, &b.node, b.generation)));
    }
    let node_infos: Vec<NodeInfo> = target
        .nodes
        .iter()
        .map(|(name, spec)| {
            let v = &views[name];
            let reserved = databases
                .iter()
                .filter(|d| d.node.as_ref() == Some(name))
                .filter_map(|d| {
                    target
                        .databases
                        .get(&d.name)
                        .or(obs.databases.get(&d.name).map(|o| &o.spec))
                })
                .filter_map(|s| target.plans.get(&s.plan))
                .fold(Resources::default(), |acc, p| {
                    acc.saturating_add(&Resources::of_plan(p))
                });
            NodeInfo {
                name: name.clone(),
                capacity: Resources::of_node(spec).saturating_sub(&reserved),
                region: spec.region.clone(),
                labels: spec.labels.clone(),
                drivers: v.drivers.clone(),
                condition: v.condition,
            }
        })
        .collect();
    if quiet.is_some_and(|q| q.node_infos != node_infos) {
        return None;
    }
    let demands: Vec<AppDemand> = runs
        .iter()
        .filter(|(_, r)| matches!(r, Run::Running { .. }))
        .map(|(name, _)| {
            let app = &target.apps[*name];
            let current = by_app
                .get(name)
                .into_iter()
                .flatten()
                .filter(|p| p.slot >= 1 && p.slot <= app.replicas)
                .map(|p| (p.slot, p.node.clone()))
                .collect();
            AppDemand {
                name: (*name).clone(),
                replicas: app.replicas,
                need: Resources::of_plan(&target.plans[&app.plan]),
                region: app.placement.region.clone(),
                labels: app.placement.labels.clone(),
                drivers: target.runtimes[&app.runtime].drivers.clone(),
                current,
            }
        })
        .collect();
    let sched = match quiet {
        None => schedule(&node_infos, &demands, input.seed),
        Some(q) if room_for_all(&node_infos, &demands, q) => {
            schedule_beside(&node_infos, &demands, input.seed, &q.used)
        }
        Some(_) => return None,
    };

    // Target placements and the tasks that get there.
    let mut out = Effects {
        generation,
        views: &views,
        placements: Vec::new(),
        tasks: Vec::new(),
        placement_changes: Vec::new(),
    };
    for (name, run) in &runs {
        let app = &target.apps[*name];
        let mut observed: BTreeMap<u32, &ReplicaPlacement> = BTreeMap::new();
        for p in by_app.remove(*name).unwrap_or_default() {
            if p.slot == 0 || observed.contains_key(&p.slot) {
                // A duplicate or malformed row: whatever runs there goes.
                out.remove(p, PlacementReason::ScaledDown);
            } else {
                observed.insert(p.slot, p);
            }
        }
        match run {
            Run::Running { release } => {
                let restart = obs.restart_requests.get(*name).copied().unwrap_or(0);
                for slot in 1..=app.replicas {
                    let op = observed.remove(&slot);
                    match sched.slots.get(&((*name).clone(), slot)) {
                        Some(Outcome::Placed { node, how }) => {
                            if let How::Stranded { why, reason } = how {
                                warnings.push(Warning {
                                    kind: WarningKind::Stranded,
                                    message: format!("app {name} replica {slot}: stays on {node} ({why}): {reason}"),
                                    app: Some((*name).clone()),
                                    slot: Some(slot),
                                    node: Some(node.clone()),
                                });
                            }
                            let reason = match how {
                                How::Moved { why, .. } => PlacementReason::Moved { why: *why },
                                _ => PlacementReason::NewReplica,
                            };
                            out.run(name, slot, node, *release, restart, op, reason);
                        }
                        Some(Outcome::Unplaced {
                            reason, why_left, ..
                        }) => {
                            warnings.push(Warning {
                                kind: WarningKind::Unplaced,
                                message: format!("app {name} replica {slot}: {reason}"),
                                app: Some((*name).clone()),
                                slot: Some(slot),
                                node: None,
                            });
                            if let Some(op) = op {
                                out.remove(op, PlacementReason::Unplaced { why: *why_left });
                            }
                        }
                        None => {}
                    }
                }
            }
            Run::Suspended => {
                for (&slot, &op) in &observed {
                    if slot > app.replicas {
                        continue;
                    }
                    if !target.nodes.contains_key(&op.node) {
                        out.remove(op, PlacementReason::NodeRemoved);
                    } else {
                        out.stop(op);
                    }
                }
                observed.retain(|&slot, _| slot > app.replicas);
            }
            Run::Idle { .. } => {}
        }
        let why = match run {
            Run::Idle { why } => *why,
            _ => PlacementReason::ScaledDown,
        };
        for op in observed.into_values() {
            out.remove(op, why);
        }
    }
    for ps in by_app.into_values() {
        for p in ps {
            out.remove(p, PlacementReason::AppDeleted);
        }
    }
    let Effects {
        mut placements,
        mut tasks,
        mut placement_changes,
        ..
    } = out;
    placements.sort_by(|a, b| (&a.app, a.slot).cmp(&(&b.app, b.slot)));
    tasks.sort_by(|a, b| {
        (a.action, &a.app, a.slot, &a.node).cmp(&(b.action, &b.app, b.slot, &b.node))
    });
    placement_changes.sort_by(|a, b| (&a.app, a.slot, &a.from).cmp(&(&b.app, b.slot, &b.from)));

    // Nodes whose tasks wait.
    let mut waiting: BTreeMap<&Name, (NodeState, usize)> = BTreeMap::new();
    for t in &tasks {
        if let Some(w) = t.waits_for {
            waiting.entry(&t.node).or_insert((w, 0)).1 += 1;
        }
    }
    for (node, (state, n)) in waiting {
        let tasks_wait = if n == 1 {
            "1 task waits".to_owned()
        } else {
            format!("{n} tasks wait")
        };
        let message = match state {
            NodeState::Pending => format!("node {node} has not joined yet: {tasks_wait} for it"),
            _ => format!("node {node} is offline: {tasks_wait} for it to come back"),
        };
        warnings.push(Warning {
            kind: WarningKind::NodeWaiting,
            message,
            app: None,
            slot: None,
            node: Some(node.clone()),
        });
    }

    let ingress = ingress(input, scope, &target, quiet_count, &mut warnings);
    let mut used_after = sched.used.clone();
    for d in &databases {
        if let (Some(node), Some(p)) = (
            &d.node,
            target
                .databases
                .get(&d.name)
                .and_then(|s| target.plans.get(&s.plan)),
        ) {
            let e = used_after.entry(node.clone()).or_default();
            *e = e.saturating_add(&Resources::of_plan(p));
        }
    }
    let nodes = headroom(input, scope, &target, &views, &placements, &used_after);
    let with_dbs = |apps: Decimal, dbs: Decimal| Price::new(apps + dbs).unwrap_or_default();
    let cost = Cost {
        currency: target.currency.clone(),
        before: with_dbs(
            monthly(scope.select(&obs.apps).map(|(_, a)| a), &obs.plans)
                + quiet.map_or(Decimal::ZERO, |q| q.cost_before),
            crate::databases::monthly(obs.databases.values().map(|d| &d.spec), &obs.plans),
        ),
        after: with_dbs(
            monthly(target.apps.values(), target.plans)
                + quiet.map_or(Decimal::ZERO, |q| q.cost_after),
            crate::databases::monthly(target.databases.values(), target.plans),
        ),
    };
    let bindings = std::mem::take(&mut target.bindings);

    let plan = Plan {
        generation,
        based_on: obs.generation,
        applied_commit: obs.applied_commit.clone(),
        target_commit: target.commit.clone(),
        planned_at: input.now,
        seed: input.seed,
        secrets_verified: target.unverified.is_empty(),
        changes,
        releases,
        pins,
        placement_changes,
        tasks,
        ingress,
        warnings,
        nodes,
        cost,
        placements: std::sync::Arc::new(placements),
        databases,
    };
    Some(Planned {
        plan,
        node_infos,
        bindings,
    })
}

/// Whether every node can hold every replica that may stay on it, quiet and planned together. Then
/// the scheduler keeps them all whatever the order it looks at them in, so the quiet ones stay as they
/// were and the planned ones are placed beside them as a plan of every app would place them. Otherwise
/// it keeps some and not others in name order, which only a plan of every app decides right.
fn room_for_all(nodes: &[NodeInfo], demands: &[AppDemand], quiet: &Quiet) -> bool {
    let mut staying: BTreeMap<&Name, Resources> = quiet.used.iter().map(|(n, r)| (n, *r)).collect();
    for d in demands {
        for (_, node) in d.current.range(1..=d.replicas) {
            let e = staying.entry(node).or_default();
            *e = e.saturating_add(&d.need);
        }
    }
    nodes
        .iter()
        .all(|n| staying.get(&n.name).is_none_or(|s| s.fits_in(&n.capacity)))
}

/// Places the databases ([`crate::databases::place`]) and records what each attached app's URL
/// stands for in `target.bindings`.
fn place_databases(
    input: &PlanInput<'_>,
    scope: &Scope<'_>,
    target: &mut Target<'_>,
    views: &BTreeMap<Name, NodeView>,
    warnings: &mut Vec<Warning>,
) -> Vec<crate::DatabasePlan> {
    let obs = input.observed;
    if target.databases.is_empty() && obs.databases.is_empty() {
        return Vec::new();
    }
    let facts: BTreeMap<Name, crate::databases::NodeFacts<'_>> = target
        .nodes
        .iter()
        .map(|(n, spec)| {
            let v = &views[n];
            (
                n.clone(),
                crate::databases::NodeFacts {
                    spec,
                    state: v.state,
                    condition: v.condition,
                },
            )
        })
        .collect();
    let mut app_use: BTreeMap<Name, Resources> =
        scope.quiet.map(|q| q.used.clone()).unwrap_or_default();
    for p in scope
        .placements
        .iter()
        .filter(|p| p.state == ReplicaState::Running)
    {
        if let Some(plan) = target
            .apps
            .get(&p.app)
            .and_then(|a| target.plans.get(&a.plan))
        {
            let e = app_use.entry(p.node.clone()).or_default();
            *e = e.saturating_add(&Resources::of_plan(plan));
        }
    }
    let mut out = crate::databases::place(
        obs,
        &target.databases,
        target.plans,
        &facts,
        &app_use,
        warnings,
    );
    crate::databases::price(&mut out, &target.databases, target.plans);
    for d in &out {
        let (Some(node), Some(port)) = (&d.node, d.port) else {
            continue;
        };
        if d.change == crate::DatabaseChange::Delete {
            continue;
        }
        let o = obs.databases.get(&d.name);
        // A move starts a fresh instance under the database's own name; an upgrade's new instance
        // is bound only once it has succeeded (`databases::record_upgrade` points the database at it).
        let (instance, credential) = match (o, &d.change) {
            (
                Some(o),
                crate::DatabaseChange::Keep
                | crate::DatabaseChange::Unavailable { .. }
                | crate::DatabaseChange::Upgrade { .. }
                | crate::DatabaseChange::Refused { .. },
            ) => (o.instance.clone(), o.credential),
            (Some(o), _) => (d.name.clone(), o.credential),
            (None, _) => (d.name.clone(), 0),
        };
        target.bindings.insert(
            d.name.clone(),
            crate::databases::binding_fingerprint(&d.name, node, port, &instance, credential),
        );
    }
    out
}

/// Where traffic enters before and after, and the hosts apps gain. Warns, for each app with new hosts
/// and once for the cluster when the last one goes, when no ingress node serves every app.
fn ingress(
    input: &PlanInput<'_>,
    scope: &Scope<'_>,
    target: &Target<'_>,
    quiet_apps: usize,
    warnings: &mut Vec<Warning>,
) -> Ingress {
    let obs = input.observed;
    let serving = |nodes: &BTreeMap<Name, Node>| -> Vec<Name> {
        // The only node of a cluster runs every replica: it serves every app without an address.
        let alone = nodes.len() == 1;
        nodes
            .iter()
            .filter(|(_, n)| n.ingress && (n.address.is_some() || alone))
            .map(|(name, _)| name.clone())
            .collect()
    };
    let nodes = serving(target.nodes);
    let nodes_before = serving(&obs.nodes);
    let mut new_hosts = Vec::new();
    for (name, app) in &target.apps {
        let before: BTreeSet<String> = obs
            .apps
            .get(name)
            .map(|a| a.hosts(name, obs.base_domain.as_ref()))
            .unwrap_or_default()
            .into_iter()
            .collect();
        let hosts: Vec<String> = app
            .hosts(name, target.base_domain.as_ref())
            .into_iter()
            .filter(|h| !before.contains(h))
            .collect();
        if !hosts.is_empty() {
            new_hosts.push(NewHosts {
                app: name.clone(),
                hosts,
            });
        }
    }
    if nodes.is_empty() {
        // An ingress node without an address still serves the replicas it runs itself.
        let some_ingress = target.nodes.values().any(|n| n.ingress);
        for h in &new_hosts {
            let message = if some_ingress {
                format!(
                    "app {} answers {}, but no ingress node has an `address`: only an ingress node that runs one of its replicas serves it (give the ingress nodes an `address` so each serves every app)",
                    h.app,
                    h.hosts.join(", ")
                )
            } else {
                format!(
                    "app {} answers {}, but no node has `ingress = true`: it would not be reachable",
                    h.app,
                    h.hosts.join(", ")
                )
            };
            warnings.push(Warning {
                kind: WarningKind::Unreachable,
                message,
                app: Some(h.app.clone()),
                slot: None,
                node: None,
            });
        }
        if !nodes_before.is_empty() && (quiet_apps > 0 || !target.apps.is_empty()) {
            let was = nodes_before
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let message = if some_ingress {
                format!(
                    "no node has `ingress = true` and an `address` any more (before: {was}): an app is served only by the ingress nodes that run one of its replicas"
                )
            } else {
                format!(
                    "no node has `ingress = true` any more (before: {was}): no app would be reachable"
                )
            };
            warnings.push(Warning {
                kind: WarningKind::Unreachable,
                message,
                app: None,
                slot: None,
                node: None,
            });
        }
    }
    let certificates = certificates(input, scope, &new_hosts);
    Ingress {
        nodes,
        nodes_before,
        new_hosts,
        certificates,
    }
}

/// HTTPS for the apps that gain hosts and for those whose certificate needs attention, with `[tls]` in
/// the desired settings (a plan from the applied configuration alone reports none).
fn certificates(
    input: &PlanInput<'_>,
    scope: &Scope<'_>,
    new_hosts: &[NewHosts],
) -> Vec<AppCertificate> {
    let Some(d) = input.desired.map(|d| d.state) else {
        return Vec::new();
    };
    if d.settings.tls.is_none() {
        return Vec::new();
    }
    let on_record: BTreeMap<&[String], &ObservedCert> = input
        .observed
        .certificates
        .iter()
        .map(|c| (c.names.as_slice(), c))
        .collect();
    let gaining: BTreeSet<&Name> = new_hosts.iter().map(|h| &h.app).collect();
    let mut out = Vec::new();
    for (app, _) in scope.select(&d.apps) {
        // Sorted and without repeats, as the store keys a name set.
        let mut names = d.hostnames(app);
        names.sort();
        names.dedup();
        let https = match d.tls(app) {
            Some(AppTls::Mode(TlsMode::Off)) | None => Https::Off,
            Some(AppTls::Own(_)) => Https::Own,
            Some(AppTls::Mode(TlsMode::Auto)) => match on_record.get(names.as_slice()) {
                Some(c) => Https::Auto {
                    state: Some(c.state),
                    not_after: c.not_after,
                    last_error: c.last_error.clone(),
                },
                None => Https::Auto {
                    state: None,
                    not_after: None,
                    last_error: None,
                },
            },
        };
        if gaining.contains(app) || https.needs_attention() {
            out.push(AppCertificate {
                app: app.clone(),
                names,
                https,
            });
        }
    }
    out
}

/// Each target node's liveness, condition and drivers at `input.now`.
fn node_views(
    input: &PlanInput<'_>,
    target: &Target<'_>,
    warnings: &mut Vec<Warning>,
) -> BTreeMap<Name, NodeView> {
    let obs = input.observed;
    let mut views: BTreeMap<Name, NodeView> = BTreeMap::new();
    for (name, spec) in target.nodes {
        let status = obs.node_status.get(name);
        let state = effective_state(status, input.now, input.offline_after);
        let mismatch = match (
            spec.recipient.as_ref(),
            status.and_then(|s| s.recipient.as_ref()),
        ) {
            (Some(want), Some(got)) if want != got => {
                warnings.push(Warning {
                    kind: WarningKind::RecipientMismatch,
                    message: format!(
                        "node {name} joined with recipient {got} but its manifest pins {want}: it gets no new replicas until it joins again"
                    ),
                    app: None,
                    slot: None,
                    node: Some(name.clone()),
                });
                true
            }
            _ => false,
        };
        let condition = match state {
            NodeState::Offline => Condition::Offline,
            _ if mismatch => Condition::Unusable,
            _ if spec.drain => Condition::Draining,
            NodeState::Pending => Condition::Pending,
            NodeState::Online => Condition::Ready,
        };
        let mut drivers = status.map(|s| s.drivers.clone()).unwrap_or_default();
        if drivers.is_empty() && state == NodeState::Pending {
            drivers.push(Driver::Docker);
        }
        views.insert(
            name.clone(),
            NodeView {
                state,
                condition,
                drivers,
            },
        );
    }
    views
}

/// What each app does: the release it runs (a new one when its spec or source commit changed, the pinned
/// one under a rollback pin), or why it runs nothing.
fn decide_releases<'t>(
    input: &PlanInput<'_>,
    target: &'t Target<'_>,
    changed_apps: &BTreeSet<&Name>,
    warnings: &mut Vec<Warning>,
) -> (BTreeMap<&'t Name, Run>, Vec<NewRelease>, Vec<Pin>) {
    let obs = input.observed;
    let mut runs: BTreeMap<&'t Name, Run> = BTreeMap::new();
    let mut releases = Vec::new();
    let mut pins = Vec::new();
    for (name, app) in &target.apps {
        let (Some(plan_spec), Some(runtime)) = (
            target.plans.get(&app.plan),
            target.runtimes.get(&app.runtime),
        ) else {
            warnings.push(Warning {
                kind: WarningKind::MissingReference,
                message: format!(
                    "app {name}: plan `{}` or runtime `{}` is not applied; it runs nothing",
                    app.plan, app.runtime
                ),
                app: Some(name.clone()),
                slot: None,
                node: None,
            });
            runs.insert(
                name,
                Run::Idle {
                    why: PlacementReason::Unplaced { why: None },
                },
            );
            continue;
        };
        if app.suspended {
            runs.insert(name, Run::Suspended);
            continue;
        }
        if app.replicas == 0 {
            runs.insert(
                name,
                Run::Idle {
                    why: PlacementReason::ScaledDown,
                },
            );
            continue;
        }
        let latest = obs.releases.get(name);
        let mut spec = ReleaseSpec::new(name, app, plan_spec, runtime);
        for (db, var) in &app.databases {
            if let Some(fingerprint) = target.bindings.get(db) {
                spec.env.insert(
                    var.clone(),
                    crate::ReleaseEnv::Database {
                        database: db.clone(),
                        fingerprint: fingerprint.clone(),
                    },
                );
            }
        }
        let spec_hash = spec.hash();
        let source = app
            .source
            .rev
            .as_ref()
            .map(|r| CommitId::new(r.clone()))
            .or_else(|| obs.source_heads.get(name).cloned())
            .or_else(|| latest.map(|l| l.source_commit.clone()));
        let differs = |l: &crate::observed::ReleaseRecord, source: Option<&CommitId>| {
            l.spec_hash != spec_hash || source.is_some_and(|s| *s != l.source_commit)
        };
        if let Some(&pinned) = obs.rollback_pins.get(name) {
            let lifted = changed_apps.contains(name);
            pins.push(Pin {
                app: name.clone(),
                release: pinned,
                holding_back: !lifted
                    && latest.is_none_or(|l| l.number != pinned || differs(l, source.as_ref())),
                lifted,
            });
            if !lifted {
                runs.insert(name, Run::Running { release: pinned });
                continue;
            }
        }
        let Some(source) = source else {
            warnings.push(Warning {
                kind: WarningKind::NoSourceHead,
                message: format!(
                    "app {name}: the head of branch `{}` of {} is not known yet; it deploys once the source is polled",
                    app.source.branch, app.source.url
                ),
                app: Some(name.clone()),
                slot: None,
                node: None,
            });
            runs.insert(
                name,
                Run::Idle {
                    why: PlacementReason::Unplaced { why: None },
                },
            );
            continue;
        };
        let release = match latest {
            // A failed release is not retried: the app keeps (or goes back to) the live one before it.
            Some(l) if !differs(l, Some(&source)) => l.serving(),
            _ => {
                let number = latest.map_or(1, |l| l.number + 1);
                releases.push(NewRelease {
                    app: name.clone(),
                    number,
                    previous: latest.map(|l| l.number),
                    config_commit: target.commit.clone().unwrap_or_else(|| CommitId::new("")),
                    source_was: latest
                        .filter(|l| l.source_commit != source)
                        .map(|l| l.source_commit.clone()),
                    source_commit: source,
                    config_changed: latest.is_some_and(|l| l.spec_hash != spec_hash),
                    spec_hash,
                    spec,
                });
                number
            }
        };
        runs.insert(name, Run::Running { release });
    }
    (runs, releases, pins)
}

/// Creates, changes and deletes of one kind, by name.
fn kind_changes<T: PartialEq>(
    kind: Kind,
    before: &BTreeMap<Name, T>,
    after: &BTreeMap<Name, T>,
    origins: Option<&BTreeMap<(Kind, Name), Origin>>,
    flat: impl Fn(&Name, &T) -> Flat,
) -> Vec<ResourceChange> {
    let origin = |name: &Name| origins.and_then(|o| o.get(&(kind, name.clone()))).cloned();
    let mut out = Vec::new();
    let names: BTreeSet<&Name> = before.keys().chain(after.keys()).collect();
    for name in names {
        let change = match (before.get(name), after.get(name)) {
            (None, Some(a)) => ResourceChange {
                kind,
                name: name.clone(),
                action: Action::Create,
                fields: diff(None, Some(&flat(name, a))),
                origin: origin(name),
            },
            (Some(_), None) => ResourceChange {
                kind,
                name: name.clone(),
                action: Action::Delete,
                fields: Vec::new(),
                origin: None,
            },
            (Some(b), Some(a)) if b != a => {
                let fields = diff(Some(&flat(name, b)), Some(&flat(name, a)));
                if fields.is_empty() {
                    continue;
                }
                ResourceChange {
                    kind,
                    name: name.clone(),
                    action: Action::Update,
                    fields,
                    origin: origin(name),
                }
            }
            _ => continue,
        };
        out.push(change);
    }
    out
}

/// Collects target placements, tasks and placement changes.
struct Effects<'v> {
    generation: u64,
    views: &'v BTreeMap<Name, NodeView>,
    placements: Vec<ReplicaPlacement>,
    tasks: Vec<Task>,
    placement_changes: Vec<PlacementChange>,
}

impl Effects<'_> {
    fn task(
        &mut self,
        node: &Name,
        action: TaskAction,
        app: &Name,
        slot: u32,
        release: ReleaseNumber,
    ) {
        let waits_for = self.views.get(node).and_then(|v| match v.state {
            NodeState::Online => None,
            s => Some(s),
        });
        self.tasks.push(Task {
            node: node.clone(),
            action,
            app: app.clone(),
            slot,
            release,
            waits_for,
        });
    }

    /// A slot that runs `release` on `node`; `op` is what the store says about it now.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        app: &Name,
        slot: u32,
        node: &Name,
        release: ReleaseNumber,
        restart: u64,
        op: Option<&ReplicaPlacement>,
        reason: PlacementReason,
    ) {
        let mut next = ReplicaPlacement {
            app: app.clone(),
            slot,
            node: node.clone(),
            release,
            state: ReplicaState::Running,
            generation: self.generation,
            restart,
        };
        match op {
            None => {
                self.task(node, TaskAction::Deploy, app, slot, release);
                self.placement_changes.push(PlacementChange {
                    app: app.clone(),
                    slot,
                    from: None,
                    to: Some(node.clone()),
                    reason,
                });
            }
            Some(op) if op.node != *node => {
                self.task(node, TaskAction::Deploy, app, slot, release);
                if self.views.contains_key(&op.node) {
                    self.task(&op.node, TaskAction::Remove, app, slot, op.release);
                }
                self.placement_changes.push(PlacementChange {
                    app: app.clone(),
                    slot,
                    from: Some(op.node.clone()),
                    to: Some(node.clone()),
                    reason,
                });
            }
            Some(op) => {
                let action = if op.release != release {
                    Some(TaskAction::Deploy)
                } else if op.state == ReplicaState::Stopped {
                    Some(TaskAction::Start)
                } else if op.restart < restart {
                    Some(TaskAction::Restart)
                } else {
                    None
                };
                match action {
                    Some(a) => self.task(node, a, app, slot, release),
                    None => {
                        next.restart = op.restart;
                        next.generation = op.generation;
                    }
                }
            }
        }
        self.placements.push(next);
    }

    /// A suspended app's slot: kept where it is, stopped.
    fn stop(&mut self, op: &ReplicaPlacement) {
        let mut next = op.clone();
        if op.state == ReplicaState::Running {
            self.task(&op.node, TaskAction::Stop, &op.app, op.slot, op.release);
            next.state = ReplicaState::Stopped;
            next.generation = self.generation;
        }
        self.placements.push(next);
    }

    /// A slot that goes away; its node removes the replica if the node is still declared.
    fn remove(&mut self, op: &ReplicaPlacement, reason: PlacementReason) {
        if self.views.contains_key(&op.node) {
            self.task(&op.node, TaskAction::Remove, &op.app, op.slot, op.release);
        }
        self.placement_changes.push(PlacementChange {
            app: op.app.clone(),
            slot: op.slot,
            from: Some(op.node.clone()),
            to: None,
            reason,
        });
    }
}

fn headroom(
    input: &PlanInput<'_>,
    scope: &Scope<'_>,
    target: &Target<'_>,
    views: &BTreeMap<Name, NodeView>,
    placements: &[ReplicaPlacement],
    used_after: &BTreeMap<Name, Resources>,
) -> Vec<NodeHeadroom> {
    let obs = input.observed;
    let mut before_used: BTreeMap<&Name, (Resources, u32)> = scope
        .quiet
        .map(|q| q.before.iter().map(|(n, u)| (n, *u)).collect())
        .unwrap_or_default();
    for p in scope
        .placements
        .iter()
        .filter(|p| p.state == ReplicaState::Running)
    {
        let Some(need) = obs
            .apps
            .get(&p.app)
            .and_then(|a| obs.plans.get(&a.plan))
            .map(Resources::of_plan)
        else {
            continue;
        };
        let e = before_used.entry(&p.node).or_default();
        e.0 = e.0.saturating_add(&need);
        e.1 += 1;
    }
    let mut after_replicas: BTreeMap<&Name, u32> = scope
        .quiet
        .map(|q| q.after_replicas.iter().map(|(n, c)| (n, *c)).collect())
        .unwrap_or_default();
    for p in placements
        .iter()
        .filter(|p| p.state == ReplicaState::Running)
    {
        *after_replicas.entry(&p.node).or_default() += 1;
    }
    let names: BTreeSet<&Name> = obs.nodes.keys().chain(target.nodes.keys()).collect();
    names
        .into_iter()
        .map(|name| {
            let before = obs.nodes.get(name).map(|spec| {
                let (used, replicas) = before_used.get(name).copied().unwrap_or_default();
                Usage {
                    capacity: Resources::of_node(spec),
                    used,
                    replicas,
                }
            });
            let after = target.nodes.get(name).map(|spec| Usage {
                capacity: Resources::of_node(spec),
                used: used_after.get(name).copied().unwrap_or_default(),
                replicas: after_replicas.get(name).copied().unwrap_or(0),
            });
            let state = views.get(name).map_or_else(
                || effective_state(obs.node_status.get(name), input.now, input.offline_after),
                |v| v.state,
            );
            NodeHeadroom {
                node: name.clone(),
                state,
                condition: views.get(name).map(|v| v.condition),
                before,
                after,
            }
        })
        .collect()
}

/// Plan price × replicas over the apps that are not suspended.
pub(crate) fn monthly<'a>(
    apps: impl Iterator<Item = &'a AppliedApp>,
    plans: &BTreeMap<Name, PlanSpec>,
) -> Decimal {
    apps.filter(|a| !a.suspended)
        .filter_map(|a| {
            plans
                .get(&a.plan)
                .map(|p| p.price.amount() * Decimal::from(a.replicas))
        })
        .sum()
}
