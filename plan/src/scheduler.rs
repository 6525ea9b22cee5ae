//! The scheduler: which node runs each replica slot of each app.
//!
//! It places replicas on nodes that are schedulable (online or pending, not offline, draining or otherwise
//! unusable), that match the app's region and labels, offer one of its runtime's drivers and have the
//! plan's cpu, memory and disk free. It spreads an app's replicas (softly: the node with the fewest replicas
//! of the app first, then an online node before a pending one, then the one left with the most free
//! resources, then a hash of the seed, app, slot and node; the largest replicas are placed first), never moves a running replica without a reason, moves replicas off offline, draining and removed
//! nodes where it can, and explains every replica it cannot place.
//!
//! What it must not do: IO, clocks, or randomness that is not derived from the seed. The same input and
//! seed give the same [`Schedule`], whatever order the input lists nodes and apps in. It never assigns more
//! than a node's capacity, even when the current placements it is given already do.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use cairn_schema::{ByteSize, Cpu, Driver, Name};
use serde::Serialize;

/// CPU, memory and disk: a node's capacity, a plan's reservation, or what is used or free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Resources {
    pub cpu: Cpu,
    pub memory: ByteSize,
    pub disk: ByteSize,
}

impl Resources {
    pub fn new(cpu: Cpu, memory: ByteSize, disk: ByteSize) -> Self {
        Resources { cpu, memory, disk }
    }
    pub fn of_plan(p: &cairn_schema::Plan) -> Self {
        Resources::new(p.cpu, p.memory, p.disk)
    }
    pub fn of_node(n: &cairn_schema::Node) -> Self {
        Resources::new(n.cpu, n.memory, n.disk)
    }
    /// Whether `self` fits into `free` in every dimension.
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu <= free.cpu && self.memory <= free.memory && self.disk <= free.disk
    }
    pub fn saturating_add(&self, o: &Resources) -> Resources {
        Resources {
            cpu: Cpu::from_millis(self.cpu.millis().saturating_add(o.cpu.millis())),
            memory: ByteSize(self.memory.0.saturating_add(o.memory.0)),
            disk: ByteSize(self.disk.0.saturating_add(o.disk.0)),
        }
    }
    pub fn saturating_sub(&self, o: &Resources) -> Resources {
        Resources {
            cpu: Cpu::from_millis(self.cpu.millis().saturating_sub(o.cpu.millis())),
            memory: ByteSize(self.memory.0.saturating_sub(o.memory.0)),
            disk: ByteSize(self.disk.0.saturating_sub(o.disk.0)),
        }
    }
    pub fn times(&self, n: u32) -> Resources {
        Resources {
            cpu: Cpu::from_millis(self.cpu.millis().saturating_mul(n)),
            memory: ByteSize(self.memory.0.saturating_mul(u64::from(n))),
            disk: ByteSize(self.disk.0.saturating_mul(u64::from(n))),
        }
    }
}

/// Whether a node may receive replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Online: schedulable.
    Ready,
    /// Declared, not joined yet: schedulable; its tasks wait for it.
    Pending,
    /// Missed heartbeats: nothing new; its replicas move where they can.
    Offline,
    /// `drain = true`: nothing new; its replicas move where they can and stay until then.
    Draining,
    /// Joined with another recipient than its manifest pins: it could not decrypt its apps' secrets.
    Unusable,
}

impl Condition {
    pub fn schedulable(self) -> bool {
        matches!(self, Condition::Ready | Condition::Pending)
    }
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: Name,
    pub capacity: Resources,
    pub region: Option<Name>,
    pub labels: BTreeMap<Name, String>,
    /// What the node offers (for a pending node that reported nothing, the caller passes `docker`).
    pub drivers: Vec<Driver>,
    pub condition: Condition,
}

/// An app's replicas to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppDemand {
    pub name: Name,
    pub replicas: u32,
    /// What one replica reserves (its plan).
    pub need: Resources,
    pub region: Option<Name>,
    pub labels: BTreeMap<Name, String>,
    /// The runtime's drivers; a node must offer one of them.
    pub drivers: Vec<Driver>,
    /// Where slots run now (slot → node); slots above `replicas` are ignored.
    pub current: BTreeMap<u32, Name>,
}

/// Why a replica leaves (or should leave) the node it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveReason {
    NodeOffline,
    NodeDraining,
    NodeRemoved,
    NodeUnusable,
    /// The app's region or labels no longer match the node.
    NoLongerMatches,
    /// The node does not offer any of the runtime's drivers any more.
    DriverUnavailable,
    /// The node has no room for it any more (its capacity shrank or the app's plan grew).
    NoRoom,
}

impl MoveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::NodeOffline => "node offline",
            MoveReason::NodeDraining => "node draining",
            MoveReason::NodeRemoved => "node removed",
            MoveReason::NodeUnusable => "node unusable",
            MoveReason::NoLongerMatches => "placement no longer matches",
            MoveReason::DriverUnavailable => "driver not offered",
            MoveReason::NoRoom => "no room left",
        }
    }
    /// Whether a replica may stay on its node while nothing else can take it: it still runs there, or will
    /// when the node comes back.
    fn may_stay(self) -> bool {
        matches!(
            self,
            MoveReason::NodeOffline | MoveReason::NodeDraining | MoveReason::NoLongerMatches
        )
    }
}

impl fmt::Display for MoveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a slot got its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum How {
    /// It was there and stays.
    Kept,
    /// A new slot (a new app or more replicas).
    New,
    /// It moved from another node.
    Moved { from: Name, why: MoveReason },
    /// It should move but no other node can take it (`reason` says why), so it stays where it is.
    Stranded { why: MoveReason, reason: String },
}

/// The outcome for one replica slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Placed {
        node: Name,
        how: How,
    },
    /// No node can take it. `was_on` is the node it leaves (if any); `reason` completes
    /// "app web replica 3: …", e.g. `no node in region eu-west with 512MiB memory free`.
    Unplaced {
        reason: String,
        was_on: Option<Name>,
        why_left: Option<MoveReason>,
    },
}

/// The scheduler's decision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schedule {
    /// Every slot `1..=replicas` of every app given.
    pub slots: BTreeMap<(Name, u32), Outcome>,
    /// What the placed replicas reserve on each node (every node given has an entry).
    pub used: BTreeMap<Name, Resources>,
}

impl Schedule {
    /// The node a slot is placed on.
    pub fn node_of(&self, app: &Name, slot: u32) -> Option<&Name> {
        match self.slots.get(&(app.clone(), slot)) {
            Some(Outcome::Placed { node, .. }) => Some(node),
            _ => None,
        }
    }
}

/// How good a node is for a replica: fewer of the app's replicas, then online before pending (a pending
/// node may take long to join), then more room left, then the hash.
type Score = (u32, bool, std::cmp::Reverse<u64>, u64);

/// A slot still to place.
struct Todo {
    ai: usize,
    slot: u32,
    /// The node it leaves (by index) and why.
    leaving: Option<(usize, MoveReason)>,
    /// The node it was on, when that node is no longer declared.
    removed_from: Option<Name>,
    /// Whether it holds room on the node it leaves.
    held: bool,
}

/// Places every replica slot of `apps` onto `nodes`. See the module docs for the rules.
pub fn schedule(nodes: &[NodeInfo], apps: &[AppDemand], seed: u64) -> Schedule {
    schedule_beside(nodes, apps, seed, &BTreeMap::new())
}

/// As [`schedule`], on nodes where replicas of other apps already hold `held` (per node): their room is
/// taken before anything is placed and counts in [`Schedule::used`], while a node's score still weighs
/// what is left against its whole capacity.
pub(crate) fn schedule_beside(
    nodes: &[NodeInfo],
    apps: &[AppDemand],
    seed: u64,
    held: &BTreeMap<Name, Resources>,
) -> Schedule {
    let mut nodes: Vec<&NodeInfo> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes.dedup_by(|a, b| a.name == b.name);
    let mut apps: Vec<&AppDemand> = apps.iter().collect();
    apps.sort_by(|a, b| a.name.cmp(&b.name));
    apps.dedup_by(|a, b| a.name == b.name);

    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let node_hash: Vec<u64> = nodes.iter().map(|n| hash_str(n.name.as_str())).collect();
    let mut free: Vec<Resources> = nodes
        .iter()
        .map(|n| {
            held.get(&n.name)
                .map_or(n.capacity, |h| n.capacity.saturating_sub(h))
        })
        .collect();
    // Per app, replicas per node index.
    let mut counts: Vec<HashMap<usize, u32>> = vec![HashMap::new(); apps.len()];
    let mut slots: BTreeMap<(Name, u32), Outcome> = BTreeMap::new();
    let mut todo: Vec<Todo> = Vec::new();

    // Pass 1: keep what runs where it still may run. A replica that should move but may stay until it
    // can (offline or draining node, changed constraints) holds its room on its node meanwhile, so no
    // newcomer takes it.
    for (ai, app) in apps.iter().enumerate() {
        for slot in 1..=app.replicas {
            let Some(cur) = app.current.get(&slot) else {
                todo.push(Todo {
                    ai,
                    slot,
                    leaving: None,
                    removed_from: None,
                    held: false,
                });
                continue;
            };
            let Some(&ni) = index.get(cur.as_str()) else {
                todo.push(Todo {
                    ai,
                    slot,
                    leaving: None,
                    removed_from: Some(cur.clone()),
                    held: false,
                });
                continue;
            };
            let n = nodes[ni];
            let why = match n.condition {
                Condition::Offline => Some(MoveReason::NodeOffline),
                Condition::Draining => Some(MoveReason::NodeDraining),
                Condition::Unusable => Some(MoveReason::NodeUnusable),
                Condition::Ready | Condition::Pending => {
                    if !offers_driver(n, app) {
                        Some(MoveReason::DriverUnavailable)
                    } else if !matches_constraints(n, app) {
                        Some(MoveReason::NoLongerMatches)
                    } else if !app.need.fits_in(&free[ni]) {
                        Some(MoveReason::NoRoom)
                    } else {
                        None
                    }
                }
            };
            let fits = app.need.fits_in(&free[ni]);
            match why {
                None => {
                    free[ni] = free[ni].saturating_sub(&app.need);
                    *counts[ai].entry(ni).or_default() += 1;
                    slots.insert(
                        (app.name.clone(), slot),
                        Outcome::Placed {
                            node: cur.clone(),
                            how: How::Kept,
                        },
                    );
                }
                Some(w) => {
                    let held = w.may_stay() && fits;
                    if held {
                        free[ni] = free[ni].saturating_sub(&app.need);
                        *counts[ai].entry(ni).or_default() += 1;
                    }
                    todo.push(Todo {
                        ai,
                        slot,
                        leaving: Some((ni, w)),
                        removed_from: None,
                        held,
                    });
                }
            }
        }
    }

    // Pass 2: move displaced slots, the largest first (they are the hardest to fit). A move frees room a
    // replica held on a matching node, so the ones that found none try again until a round moves nothing;
    // then they stay where they hold room, or are reported. Only then do new slots look, so a newcomer never
    // takes room a moving replica needs, and the same state planned again moves nothing.
    let by_size = |a: &Todo, b: &Todo| {
        let (na, nb) = (&apps[a.ai].need, &apps[b.ai].need);
        (nb.cpu, nb.memory, nb.disk, a.ai, a.slot).cmp(&(na.cpu, na.memory, na.disk, b.ai, b.slot))
    };
    let (mut moving, mut fresh): (Vec<Todo>, Vec<Todo>) = todo
        .into_iter()
        .partition(|t| t.leaving.is_some() || t.removed_from.is_some());
    moving.sort_by(by_size);
    fresh.sort_by(by_size);
    let mut cx = Cx {
        nodes: &nodes,
        node_hash: &node_hash,
        free,
        counts,
        seed,
    };
    loop {
        let mut stuck = Vec::new();
        let before = moving.len();
        for t in moving {
            let app = apps[t.ai];
            if let (true, Some((ni, _))) = (t.held, t.leaving) {
                cx.release(t.ai, ni, app);
            }
            match cx.best(t.ai, app, t.slot) {
                Some(ni) => {
                    cx.take(t.ai, ni, app);
                    let how = match (&t.leaving, &t.removed_from) {
                        (Some((from, why)), _) => How::Moved {
                            from: nodes[*from].name.clone(),
                            why: *why,
                        },
                        (None, Some(from)) => How::Moved {
                            from: from.clone(),
                            why: MoveReason::NodeRemoved,
                        },
                        (None, None) => How::New,
                    };
                    slots.insert(
                        (app.name.clone(), t.slot),
                        Outcome::Placed {
                            node: nodes[ni].name.clone(),
                            how,
                        },
                    );
                }
                None => {
                    if let (true, Some((ni, _))) = (t.held, t.leaving) {
                        cx.take(t.ai, ni, app);
                    }
                    stuck.push(t);
                }
            }
        }
        let done = stuck.len() == before;
        moving = stuck;
        if done {
            break;
        }
    }
    for t in moving {
        let app = apps[t.ai];
        let reason = explain(&nodes, &cx.free, app);
        let outcome = match (t.held, t.leaving) {
            (true, Some((ni, why))) => Outcome::Placed {
                node: nodes[ni].name.clone(),
                how: How::Stranded { why, reason },
            },
            (_, Some((ni, why))) => Outcome::Unplaced {
                reason,
                was_on: Some(nodes[ni].name.clone()),
                why_left: Some(why),
            },
            (_, None) => {
                let why_left = t.removed_from.as_ref().map(|_| MoveReason::NodeRemoved);
                Outcome::Unplaced {
                    reason,
                    was_on: t.removed_from,
                    why_left,
                }
            }
        };
        slots.insert((app.name.clone(), t.slot), outcome);
    }

    // Pass 3: new slots.
    for t in fresh {
        let app = apps[t.ai];
        let outcome = match cx.best(t.ai, app, t.slot) {
            Some(ni) => {
                cx.take(t.ai, ni, app);
                Outcome::Placed {
                    node: nodes[ni].name.clone(),
                    how: How::New,
                }
            }
            None => Outcome::Unplaced {
                reason: explain(&nodes, &cx.free, app),
                was_on: None,
                why_left: None,
            },
        };
        slots.insert((app.name.clone(), t.slot), outcome);
    }
    let free = cx.free;

    let used = nodes
        .iter()
        .zip(&free)
        .map(|(n, f)| (n.name.clone(), n.capacity.saturating_sub(f)))
        .collect();
    Schedule { slots, used }
}

/// The scheduler's running state: what is free on each node and where each app's replicas are.
struct Cx<'a> {
    nodes: &'a [&'a NodeInfo],
    node_hash: &'a [u64],
    free: Vec<Resources>,
    /// Per app, replicas per node index.
    counts: Vec<HashMap<usize, u32>>,
    seed: u64,
}

impl Cx<'_> {
    fn take(&mut self, ai: usize, ni: usize, app: &AppDemand) {
        self.free[ni] = self.free[ni].saturating_sub(&app.need);
        *self.counts[ai].entry(ni).or_default() += 1;
    }

    fn release(&mut self, ai: usize, ni: usize, app: &AppDemand) {
        self.free[ni] = self.free[ni].saturating_add(&app.need);
        if let Some(c) = self.counts[ai].get_mut(&ni) {
            *c = c.saturating_sub(1);
        }
    }

    /// The best node for slot `slot` of `app` (the least [`Score`]), if any can take it.
    fn best(&self, ai: usize, app: &AppDemand, slot: u32) -> Option<usize> {
        let app_hash = hash_str(app.name.as_str());
        let mut best: Option<(usize, Score)> = None;
        for (ni, n) in self.nodes.iter().enumerate() {
            if !n.condition.schedulable()
                || !offers_driver(n, app)
                || !matches_constraints(n, app)
                || !app.need.fits_in(&self.free[ni])
            {
                continue;
            }
            let count = self.counts[ai].get(&ni).copied().unwrap_or(0);
            let room = free_ppm(&self.free[ni].saturating_sub(&app.need), &n.capacity);
            let tie =
                mix(self.seed ^ mix(app_hash ^ mix(u64::from(slot) ^ mix(self.node_hash[ni]))));
            let k = (
                count,
                n.condition == Condition::Pending,
                std::cmp::Reverse(room),
                tie,
            );
            if best.as_ref().is_none_or(|(_, b)| k < *b) {
                best = Some((ni, k));
            }
        }
        best.map(|(ni, _)| ni)
    }
}

fn offers_driver(n: &NodeInfo, app: &AppDemand) -> bool {
    app.drivers.iter().any(|d| n.drivers.contains(d))
}

fn matches_constraints(n: &NodeInfo, app: &AppDemand) -> bool {
    app.region
        .as_ref()
        .is_none_or(|r| n.region.as_ref() == Some(r))
        && app.labels.iter().all(|(k, v)| n.labels.get(k) == Some(v))
}

/// The smallest share of capacity left free across cpu, memory and disk, in millionths.
fn free_ppm(free: &Resources, cap: &Resources) -> u64 {
    let share = |f: u64, c: u64| {
        if c == 0 {
            0
        } else {
            (u128::from(f) * 1_000_000 / u128::from(c)) as u64
        }
    };
    share(u64::from(free.cpu.millis()), u64::from(cap.cpu.millis()))
        .min(share(free.memory.0, cap.memory.0))
        .min(share(free.disk.0, cap.disk.0))
}

/// Why no node can take a replica of `app`, naming the first filter that left no node.
fn explain(nodes: &[&NodeInfo], free: &[Resources], app: &AppDemand) -> String {
    if nodes.is_empty() {
        return "there are no nodes".to_owned();
    }
    let mut quals = Vec::new();
    if let Some(r) = &app.region {
        quals.push(format!("in region {r}"));
    }
    if !app.labels.is_empty() {
        let l: Vec<String> = app.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        quals.push(format!("labelled {}", l.join(", ")));
    }
    let qual = |extra: Option<String>| {
        let mut q = quals.clone();
        q.extend(extra);
        if q.is_empty() {
            String::new()
        } else {
            format!(" {}", q.join(" "))
        }
    };

    let usable: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].condition.schedulable())
        .collect();
    if usable.is_empty() {
        return "every node is offline, draining or unusable".to_owned();
    }
    let matching: Vec<usize> = usable
        .iter()
        .copied()
        .filter(|&i| matches_constraints(nodes[i], app))
        .collect();
    if matching.is_empty() {
        return format!("no schedulable node{}", qual(None));
    }
    let with_driver: Vec<usize> = matching
        .iter()
        .copied()
        .filter(|&i| offers_driver(nodes[i], app))
        .collect();
    if with_driver.is_empty() {
        let d: Vec<&str> = app.drivers.iter().map(|d| d.as_str()).collect();
        return format!(
            "no schedulable node{} offers driver {}",
            qual(None),
            d.join(" or ")
        );
    }
    let (mut cpu, mut mem, mut disk) = (false, false, false);
    for &i in &with_driver {
        cpu |= app.need.cpu > free[i].cpu;
        mem |= app.need.memory > free[i].memory;
        disk |= app.need.disk > free[i].disk;
    }
    let mut short = Vec::new();
    if cpu {
        short.push(format!("{} cpu", app.need.cpu));
    }
    if mem {
        short.push(format!("{} memory", app.need.memory));
    }
    if disk {
        short.push(format!("{} disk", app.need.disk));
    }
    let list = match short.len() {
        0 => String::new(),
        1 => short[0].clone(),
        _ => {
            let last = short.pop().unwrap_or_default();
            format!("{} and {last}", short.join(", "))
        }
    };
    format!("no node{} with {list} free", qual(None))
}

/// FNV-1a: a stable hash of a name (std's hashers may change between Rust releases).
fn hash_str(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
