//! [`Planner`]: the plan [`crate::plan`] makes, without planning again the apps that nothing touched.
//!
//! A plan of every app costs the same whatever changed: at 100,000 apps most of a reconcile is copying,
//! hashing and scheduling apps that end where they are. A `Planner` keeps, between plans, each *quiet*
//! app (one its last plan left exactly as it was: no resource change, release, pin, task, placement
//! change, new host, certificate or warning of its own) with the inputs it was planned from (its desired
//! and applied manifest, its secrets' fingerprints, its latest release, source head, rollback pin,
//! restart request and observed replicas) and what it adds up to (room reserved per node, replicas,
//! price). The next plan compares each app's inputs with what it kept and plans only the apps that
//! differ or were not quiet, against the nodes less the quiet apps' room; the quiet apps' replicas are
//! added back to the result as they were.
//!
//! The result is the plan of every app, exactly (`tests::incremental` proves it on random sequences of
//! commits and observed changes). What every app reads (the plans, runtimes and nodes, applied and
//! desired, the settings, the certificates on record, the seed) is compared whole, and any change to it
//! plans every app; so does a plan that sees the nodes' condition, the databases' bindings or the room
//! on a node differ from what the quiet apps were planned with (see [`crate::planner::plan_in`]).
//!
//! What it must not do: trust anything it did not compare, with one exception its caller vouches for.
//! Comparing every app is itself linear in the apps (a few milliseconds per 10,000). A caller that
//! knows which apps' inputs changed since the last plan (the config source's assembler knows the
//! manifests a commit touched; the store's change marks know the rows an apply or an agent wrote) says
//! so with [`Changes`]: the planner then compares only those apps and the ones its last plan left with
//! something to do, and takes the others as they were. It does so only when the caller names the exact
//! inputs of its last plan ([`Basis`]); debug builds compare every app as well and panic if the caller's
//! list missed one.

use std::collections::{BTreeMap, BTreeSet};

use cairn_schema::model::TlsSettings;
use cairn_schema::{App, Domain, EnvValue, Name, Node, Plan as PlanSpec, Runtime};
use rust_decimal::Decimal;

use crate::observed::{
    AppliedApp, CommitId, Observed, ObservedCert, ReleaseNumber, ReleaseRecord, ReplicaPlacement,
    ReplicaState,
};
use crate::planner::{Planned, Quiet, Scope, monthly, plan_in};
use crate::scheduler::Resources;
use crate::{Plan, PlanInput};

/// Plans like [`crate::plan`], planning again only the apps whose inputs changed since its last plan
/// or that had something to do then. See the module docs.
#[derive(Debug, Default)]
pub struct Planner {
    global: Option<Global>,
    apps: BTreeMap<Name, Entry>,
    quiet: Quiet,
    /// The apps the last plan planned and did not keep: they are compared again whatever changed.
    noisy: BTreeSet<Name>,
    /// The inputs of the last plan, when its caller named them.
    basis: Option<Basis>,
    /// The last plan's placements, complete: the next one patches the apps it plans.
    placements: std::sync::Arc<Vec<ReplicaPlacement>>,
    last: Reuse,
    /// Set while a plan runs: a plan that panicked leaves it set, and the next one starts afresh.
    busy: bool,
}

/// How the last plan of a [`Planner`] went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reuse {
    /// Apps planned.
    pub planned: usize,
    /// Quiet apps taken as they were.
    pub kept: usize,
    /// Whether a scoped plan found a quiet app could not stay as it was and every app was planned.
    pub fell_back: bool,
    /// Whether only the apps the caller named (and those with something to do) were compared.
    pub named: bool,
}

/// Names a plan's inputs as its caller's sources know them: which assembly of the config it is
/// ([`cairn_schema::Revision`]), and after which consumption of the store's change marks the observed
/// state was read. Two equal bases are the same inputs, app by app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Basis {
    pub desired: cairn_schema::Revision,
    pub observed: u64,
}

/// What a caller of [`Planner::plan_with`] knows of a plan's inputs.
#[derive(Debug, Clone, Copy)]
pub struct Changes<'a> {
    /// These inputs.
    pub now: Basis,
    /// Earlier inputs, and every app whose own inputs (desired and applied manifest, secrets'
    /// fingerprints, latest release, source head, rollback pin, restart request, observed replicas)
    /// may differ between those and these; an app added or removed counts. Naming more is safe, fewer
    /// is not.
    pub since: Option<(Basis, &'a BTreeSet<Name>)>,
}

/// What every app's plan reads besides its own inputs.
#[derive(Debug, Clone, PartialEq)]
struct Global {
    desired: bool,
    plans: BTreeMap<Name, PlanSpec>,
    runtimes: BTreeMap<Name, Runtime>,
    nodes: BTreeMap<Name, Node>,
    currency: String,
    base_domain: Option<Domain>,
    tls: Option<TlsSettings>,
    applied_plans: BTreeMap<Name, PlanSpec>,
    applied_runtimes: BTreeMap<Name, Runtime>,
    applied_nodes: BTreeMap<Name, Node>,
    applied_currency: Option<String>,
    applied_base_domain: Option<Domain>,
    certificates: Vec<ObservedCert>,
    seed: u64,
}

impl Global {
    fn of(input: &PlanInput<'_>) -> Global {
        let o = input.observed;
        let d = input.desired.map(|d| d.state);
        Global {
            desired: d.is_some(),
            plans: d.map_or(&o.plans, |d| &d.plans).clone(),
            runtimes: d.map_or(&o.runtimes, |d| &d.runtimes).clone(),
            nodes: d.map_or(&o.nodes, |d| &d.nodes).clone(),
            currency: d.map(|d| d.settings.currency.clone()).unwrap_or_default(),
            base_domain: d.map(|d| d.settings.base_domain.clone()),
            tls: d.and_then(|d| d.settings.tls.clone()),
            applied_plans: o.plans.clone(),
            applied_runtimes: o.runtimes.clone(),
            applied_nodes: o.nodes.clone(),
            applied_currency: o.currency.clone(),
            applied_base_domain: o.base_domain.clone(),
            certificates: o.certificates.clone(),
            seed: input.seed,
        }
    }

    /// Whether `input` reads the same, without copying it.
    fn matches(&self, input: &PlanInput<'_>) -> bool {
        let o = input.observed;
        let d = input.desired.map(|d| d.state);
        self.desired == d.is_some()
            && self.seed == input.seed
            && self.plans == *d.map_or(&o.plans, |d| &d.plans)
            && self.runtimes == *d.map_or(&o.runtimes, |d| &d.runtimes)
            && self.nodes == *d.map_or(&o.nodes, |d| &d.nodes)
            && d.is_none_or(|d| {
                self.currency == d.settings.currency
                    && self.base_domain.as_ref() == Some(&d.settings.base_domain)
                    && self.tls == d.settings.tls
            })
            && self.applied_plans == o.plans
            && self.applied_runtimes == o.runtimes
            && self.applied_nodes == o.nodes
            && self.applied_currency == o.currency
            && self.applied_base_domain == o.base_domain
            && self.certificates == o.certificates
    }
}

/// A quiet app: the inputs it was planned from, and what it adds up to.
#[derive(Debug, Clone)]
struct Entry {
    desired: Option<App>,
    secrets: Vec<Option<String>>,
    applied: Option<AppliedApp>,
    release: Option<ReleaseRecord>,
    head: Option<CommitId>,
    pin: Option<ReleaseNumber>,
    restart: Option<u64>,
    /// Its observed replicas, which are also its target ones (a quiet app changes none).
    placements: Vec<ReplicaPlacement>,
    /// A replica's room under the target plan and under the applied one.
    need: Option<Resources>,
    need_before: Option<Resources>,
    cost_before: Decimal,
    cost_after: Decimal,
}

/// One app's inputs as the planner reads them.
struct Inputs<'a> {
    name: &'a Name,
    desired: Option<&'a App>,
    applied: Option<&'a AppliedApp>,
    release: Option<&'a ReleaseRecord>,
    head: Option<&'a CommitId>,
    pin: Option<&'a ReleaseNumber>,
    restart: Option<&'a u64>,
    placements: &'a [&'a ReplicaPlacement],
}

impl Inputs<'_> {
    /// The fingerprints given for the app's secrets, in its env's order.
    fn secrets(&self, input: &PlanInput<'_>) -> Vec<Option<String>> {
        let Some(app) = self.desired else {
            return Vec::new();
        };
        app.env
            .iter()
            .filter(|(_, v)| matches!(v, EnvValue::Secret { .. }))
            .map(|(k, _)| {
                input
                    .fingerprints
                    .and_then(|f| f.get(&(self.name.clone(), k.clone())))
                    .cloned()
            })
            .collect()
    }

    fn same_as(&self, e: &Entry, input: &PlanInput<'_>) -> bool {
        e.desired.as_ref() == self.desired
            && e.applied.as_ref() == self.applied
            && e.release.as_ref() == self.release
            && e.head.as_ref() == self.head
            && e.pin.as_ref() == self.pin
            && e.restart.as_ref() == self.restart
            && e.placements.len() == self.placements.len()
            && e.placements
                .iter()
                .zip(self.placements)
                .all(|(a, b)| a == *b)
            && e.secrets == self.secrets(input)
    }
}

/// A sorted map's entries looked up in ascending key order, in one pass.
struct Cursor<'a, V, I: Iterator<Item = (&'a Name, V)>> {
    it: std::iter::Peekable<I>,
}

impl<'a, V, I: Iterator<Item = (&'a Name, V)>> Cursor<'a, V, I> {
    fn new(it: I) -> Self {
        Cursor { it: it.peekable() }
    }

    fn key(&mut self) -> Option<&'a Name> {
        self.it.peek().map(|(k, _)| *k)
    }

    /// The value at `name`, skipping the keys before it.
    fn at(&mut self, name: &Name) -> Option<V> {
        while self.it.next_if(|(k, _)| *k < name).is_some() {}
        self.it.next_if(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

/// The apps to plan again, and the kept apps gone from every input.
struct Walk<'a> {
    dirty: Vec<Inputs<'a>>,
    gone: Vec<Name>,
}

impl Planner {
    pub fn new() -> Self {
        Planner::default()
    }

    /// How the last plan went.
    pub fn reuse(&self) -> Reuse {
        self.last
    }

    /// The inputs of the last plan, when its caller named them ([`Planner::plan_with`]).
    pub fn basis(&self) -> Option<Basis> {
        self.basis
    }

    /// The plan [`crate::plan`] makes of `input`.
    pub fn plan(&mut self, input: &PlanInput<'_>) -> Plan {
        self.plan_with(input, None)
    }

    /// The plan [`crate::plan`] makes of `input`, comparing only the apps `changes` names when they are
    /// counted from the inputs of the last plan. The observed placements must be in the store's order
    /// (by app, then slot) for that.
    pub fn plan_with(&mut self, input: &PlanInput<'_>, changes: Option<Changes<'_>>) -> Plan {
        if std::mem::replace(&mut self.busy, true) {
            self.global = None;
        }
        let plan = self.plan_busy(input, changes);
        self.basis = changes.map(|c| c.now);
        self.busy = false;
        plan
    }

    fn plan_busy(&mut self, input: &PlanInput<'_>, changes: Option<Changes<'_>>) -> Plan {
        if !self.global.as_ref().is_some_and(|g| g.matches(input)) {
            self.forget();
            self.global = Some(Global::of(input));
        }
        let named = changes
            .and_then(|c| c.since)
            .filter(|(since, _)| self.basis == Some(*since) && !self.apps.is_empty())
            .map(|(_, apps)| apps);
        let sorted = std::cell::OnceCell::new();
        let every = || {
            sorted.get_or_init(|| {
                let mut all: Vec<&ReplicaPlacement> = input.observed.placements.iter().collect();
                all.sort_by(|a, b| {
                    (&a.app, a.slot, &a.node, a.generation).cmp(&(
                        &b.app,
                        b.slot,
                        &b.node,
                        b.generation,
                    ))
                });
                all
            })
        };
        let some;
        let walk = match named {
            Some(apps) => {
                let names: BTreeSet<Name> = apps.iter().chain(&self.noisy).cloned().collect();
                some = replicas_of(input.observed, &names);
                let walk = self.walk_named(input, &names, &some);
                #[cfg(debug_assertions)]
                self.check_named(input, every(), &walk);
                walk
            }
            None => self.walk(input, every()),
        };
        let was_named = named.is_some();
        if let Some(plan) = self.plan_scoped(input, walk) {
            self.last.named = was_named;
            return plan;
        }
        self.forget();
        let walk = self.walk(input, every());
        let plan = self.plan_scoped(input, walk);
        self.last.fell_back = true;
        plan.expect("a plan without quiet apps never falls back")
    }

    /// Leaves the planner as a plan that panicked half-way would.
    #[cfg(test)]
    pub(crate) fn busy_for_test(&mut self) {
        self.busy = true;
    }

    fn forget(&mut self) {
        self.apps.clear();
        self.noisy.clear();
        self.quiet = Quiet::default();
    }

    /// Every app's inputs, by name (the desired apps, or the applied ones without a desired state, the
    /// applied ones, and those with observed replicas), compared with what was kept of it.
    fn walk<'a>(&self, input: &PlanInput<'a>, placements: &'a [&'a ReplicaPlacement]) -> Walk<'a> {
        let o = input.observed;
        let mut desired = Cursor::new(input.desired.into_iter().flat_map(|d| d.state.apps.iter()));
        let mut applied = Cursor::new(o.apps.iter());
        let mut replicas = Cursor::new(
            placements
                .chunk_by(|a, b| a.app == b.app)
                .map(|c| (&c[0].app, c)),
        );
        let mut releases = Cursor::new(o.releases.iter());
        let mut heads = Cursor::new(o.source_heads.iter());
        let mut pins = Cursor::new(o.rollback_pins.iter());
        let mut restarts = Cursor::new(o.restart_requests.iter());
        let mut kept = Cursor::new(self.apps.iter());
        let mut walk = Walk {
            dirty: Vec::new(),
            gone: Vec::new(),
        };
        while let Some(name) = [desired.key(), applied.key(), replicas.key()]
            .into_iter()
            .flatten()
            .min()
        {
            while let Some(k) = kept.key().filter(|k| *k < name) {
                walk.gone.push(k.clone());
                kept.at(k);
            }
            let app = Inputs {
                name,
                desired: desired.at(name),
                applied: applied.at(name),
                release: releases.at(name),
                head: heads.at(name),
                pin: pins.at(name),
                restart: restarts.at(name),
                placements: replicas.at(name).unwrap_or(&[]),
            };
            if !kept.at(name).is_some_and(|e| app.same_as(e, input)) {
                walk.dirty.push(app);
            }
        }
        while let Some(k) = kept.key() {
            walk.gone.push(k.clone());
            kept.at(k);
        }
        walk
    }

    /// The inputs of the apps `names`, compared with what was kept of them; every other kept app is
    /// taken to be as it was. `replicas` holds the named apps' observed replicas, in the walk's order.
    fn walk_named<'a>(
        &self,
        input: &PlanInput<'a>,
        names: &BTreeSet<Name>,
        replicas: &'a [&'a ReplicaPlacement],
    ) -> Walk<'a> {
        let o = input.observed;
        let desired = input.desired.map(|d| &d.state.apps);
        let mut replicas = Cursor::new(
            replicas
                .chunk_by(|a, b| a.app == b.app)
                .map(|c| (&c[0].app, c)),
        );
        let mut walk = Walk {
            dirty: Vec::new(),
            gone: Vec::new(),
        };
        for name in names {
            let desired = desired.and_then(|d| d.get_key_value(name));
            let applied = o.apps.get_key_value(name);
            let placements = replicas.at(name).unwrap_or(&[]);
            // The name as the inputs hold it, where they hold it.
            let Some(key) = desired
                .map(|(k, _)| k)
                .or(applied.map(|(k, _)| k))
                .or(placements.first().map(|p| &p.app))
            else {
                if self.apps.contains_key(name) {
                    walk.gone.push(name.clone());
                }
                continue;
            };
            let app = Inputs {
                name: key,
                desired: desired.map(|(_, a)| a),
                applied: applied.map(|(_, a)| a),
                release: o.releases.get(name),
                head: o.source_heads.get(name),
                pin: o.rollback_pins.get(name),
                restart: o.restart_requests.get(name),
                placements,
            };
            if !self.apps.get(name).is_some_and(|e| app.same_as(e, input)) {
                walk.dirty.push(app);
            }
        }
        walk
    }

    /// Panics when comparing every app finds one the named walk missed.
    #[cfg(debug_assertions)]
    fn check_named(&self, input: &PlanInput<'_>, every: &[&ReplicaPlacement], named: &Walk<'_>) {
        let full = self.walk(input, every);
        let names = |w: &Walk<'_>| -> (Vec<Name>, Vec<Name>) {
            (
                w.dirty.iter().map(|i| i.name.clone()).collect(),
                w.gone.clone(),
            )
        };
        assert_eq!(
            names(named),
            names(&full),
            "the apps named as changed missed some (left: named walk, right: every app)"
        );
    }

    /// Plans the apps of `walk` against the quiet ones; `None` when that cannot be exact.
    fn plan_scoped(&mut self, input: &PlanInput<'_>, walk: Walk<'_>) -> Option<Plan> {
        let names: BTreeSet<Name> = walk.dirty.iter().map(|i| i.name.clone()).collect();
        for name in walk.gone.iter().chain(&names) {
            if let Some(e) = self.apps.remove(name) {
                e.add_to(&mut self.quiet, Sign::Minus);
            }
        }
        let kept = self.apps.len();
        self.quiet.count = kept;
        let scope = if kept == 0 {
            Scope::all(input.observed)
        } else {
            Scope {
                apps: Some(&names),
                placements: walk
                    .dirty
                    .iter()
                    .flat_map(|i| i.placements.iter().copied())
                    .collect(),
                quiet: Some(&self.quiet),
            }
        };
        let Planned {
            mut plan,
            node_infos,
            bindings,
        } = plan_in(input, &scope)?;
        if kept > 0 {
            // The last plan's list, its planned and gone apps' replicas (and those of the apps it left
            // with something to do) replaced by this plan's.
            let replace: BTreeSet<&Name> =
                names.iter().chain(&walk.gone).chain(&self.noisy).collect();
            let planned = std::mem::take(&mut plan.placements);
            let planned = std::sync::Arc::unwrap_or_clone(planned);
            #[cfg(debug_assertions)]
            let expected = merge(&self.apps, planned.clone());
            let mut all = std::mem::take(&mut self.placements);
            crate::observed::replace_replicas(
                std::sync::Arc::make_mut(&mut all),
                &replace,
                planned,
            );
            #[cfg(debug_assertions)]
            assert_eq!(*all, expected, "the patched placements are the merged ones");
            plan.placements = all;
        }
        self.placements = plan.placements.clone();
        self.last = Reuse {
            planned: walk.dirty.len(),
            kept,
            fell_back: false,
            named: false,
        };
        self.remember(input, &walk.dirty, &plan);
        self.quiet.node_infos = node_infos;
        self.quiet.bindings = bindings;
        Some(plan)
    }

    /// Keeps the planned apps that `plan` leaves as they were.
    fn remember(&mut self, input: &PlanInput<'_>, planned: &[Inputs<'_>], plan: &Plan) {
        // Every app the last plan left noisy was planned again now, or is gone from every input.
        self.noisy.clear();
        let mut noisy: BTreeSet<&Name> = BTreeSet::new();
        noisy.extend(
            plan.changes
                .iter()
                .filter(|c| c.kind == cairn_schema::Kind::App)
                .map(|c| &c.name),
        );
        noisy.extend(plan.releases.iter().map(|r| &r.app));
        noisy.extend(plan.pins.iter().map(|p| &p.app));
        noisy.extend(plan.warnings.iter().filter_map(|w| w.app.as_ref()));
        noisy.extend(plan.tasks.iter().map(|t| &t.app));
        noisy.extend(plan.placement_changes.iter().map(|c| &c.app));
        noisy.extend(plan.ingress.new_hosts.iter().map(|h| &h.app));
        noisy.extend(plan.ingress.certificates.iter().map(|c| &c.app));
        let mut target = Cursor::new(
            plan.placements
                .chunk_by(|a, b| a.app == b.app)
                .map(|c| (&c[0].app, c)),
        );
        let o = input.observed;
        let d = input.desired.map(|d| d.state);
        for app in planned {
            let target_app = match d {
                Some(_) => app.desired.map(|a| (&a.plan, a.replicas, a.suspended)),
                None => app.applied.map(|a| (&a.plan, a.replicas, a.suspended)),
            };
            let replicas = target.at(app.name).unwrap_or(&[]);
            let Some((plan_name, count, suspended)) = target_app else {
                self.noisy.insert(app.name.clone());
                continue;
            };
            if noisy.contains(app.name)
                || replicas.len() != app.placements.len()
                || replicas.iter().zip(app.placements).any(|(a, b)| a != *b)
            {
                self.noisy.insert(app.name.clone());
                continue;
            }
            let plans = d.map_or(&o.plans, |d| &d.plans);
            let price =
                |plans: &BTreeMap<Name, PlanSpec>, plan: &Name, count: u32, suspended: bool| {
                    if suspended {
                        return Decimal::ZERO;
                    }
                    plans
                        .get(plan)
                        .map_or(Decimal::ZERO, |p| p.price.amount() * Decimal::from(count))
                };
            let entry = Entry {
                desired: app.desired.cloned(),
                secrets: app.secrets(input),
                applied: app.applied.cloned(),
                release: app.release.cloned(),
                head: app.head.cloned(),
                pin: app.pin.copied(),
                restart: app.restart.copied(),
                placements: replicas.to_vec(),
                need: plans.get(plan_name).map(Resources::of_plan),
                need_before: app
                    .applied
                    .and_then(|a| o.plans.get(&a.plan))
                    .map(Resources::of_plan),
                cost_before: app
                    .applied
                    .map_or(Decimal::ZERO, |a| monthly(std::iter::once(a), &o.plans)),
                cost_after: price(plans, plan_name, count, suspended),
            };
            entry.add_to(&mut self.quiet, Sign::Plus);
            self.apps.insert(app.name.clone(), entry);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sign {
    Plus,
    Minus,
}

impl Entry {
    /// Adds what this app adds up to to `quiet`, or takes it away.
    fn add_to(&self, quiet: &mut Quiet, sign: Sign) {
        let add = |a: &mut Resources, b: &Resources| {
            *a = match sign {
                Sign::Plus => a.saturating_add(b),
                Sign::Minus => a.saturating_sub(b),
            }
        };
        for p in self
            .placements
            .iter()
            .filter(|p| p.state == ReplicaState::Running)
        {
            if let Some(need) = &self.need {
                add(quiet.used.entry(p.node.clone()).or_default(), need);
            }
            if let Some(need) = &self.need_before {
                let e = quiet.before.entry(p.node.clone()).or_default();
                add(&mut e.0, need);
                e.1 = match sign {
                    Sign::Plus => e.1 + 1,
                    Sign::Minus => e.1.saturating_sub(1),
                };
            }
            let r = quiet.after_replicas.entry(p.node.clone()).or_default();
            *r = match sign {
                Sign::Plus => *r + 1,
                Sign::Minus => r.saturating_sub(1),
            };
        }
        match sign {
            Sign::Plus => {
                quiet.cost_before += self.cost_before;
                quiet.cost_after += self.cost_after;
            }
            Sign::Minus => {
                quiet.cost_before -= self.cost_before;
                quiet.cost_after -= self.cost_after;
            }
        }
    }
}

/// The observed replicas of `names`, by app in the walk's order, found by app in the store's order.
fn replicas_of<'a>(observed: &'a Observed, names: &BTreeSet<Name>) -> Vec<&'a ReplicaPlacement> {
    let all = &observed.placements;
    let mut out = Vec::new();
    for name in names {
        let start = out.len();
        out.extend(&all[crate::observed::app_replicas(all, name)]);
        out[start..]
            .sort_by(|a, b| (a.slot, &a.node, a.generation).cmp(&(b.slot, &b.node, b.generation)));
    }
    out
}

/// The quiet apps' replicas and the planned ones, in the plan's order (by app, then slot).
#[cfg(debug_assertions)]
fn merge(quiet: &BTreeMap<Name, Entry>, planned: Vec<ReplicaPlacement>) -> Vec<ReplicaPlacement> {
    let mut out = Vec::with_capacity(planned.len() + quiet.len());
    let mut planned = planned.into_iter().peekable();
    for (name, e) in quiet {
        while let Some(p) = planned.next_if(|p| p.app < *name) {
            out.push(p);
        }
        out.extend(e.placements.iter().cloned());
    }
    out.extend(planned);
    out
}
