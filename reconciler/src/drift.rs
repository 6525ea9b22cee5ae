//! Drift: what a node's agent reports against what the applied placements say should run there.
//!
//! Two pure decisions, both made from one heartbeat's report and the placements (and, for the second,
//! the newest task of each slot on the node):
//!
//! - [`stop_orders`]: a node coming back from being offline still runs replicas whose slots were
//!   rescheduled elsewhere meanwhile (a newer placement generation on another node). Its heartbeat
//!   answer tells it to stop them at once, so duplicates do not outlive the partition. (The planner's
//!   remove tasks for that node say the same durably; the answer is the fast path.)
//! - [`repairs`]: a replica placed on the node that it does not run (or runs at another release) gets a
//!   deploy task, a stopped one that should run a start task, a running one that should be stopped a stop
//!   task, and a replica no placement wants there a remove task: without a new commit. Nothing is
//!   repaired while the slot's newest task is still open (it is on its way), when it finished after the
//!   report was taken (the report may not show its work yet: repairing would run that work again), or
//!   when the same repair already died (it would only fail again; the task's error says why). Each
//!   repair's dedup key names the slot's newest task, so the same drift seen by two heartbeats is
//!   enqueued once, and drift that comes back after a repair finished is repaired again.
//!
//! What it must not do: IO, clocks, or second-guess the planner: it never moves a replica to another
//! node, it only makes a node match its placements.

use std::collections::BTreeMap;

use cairn_proto::{ActualReplica, RunState, StopReplica};
use cairn_schema::Name;
use chrono::{DateTime, Utc};

use crate::queue::{LatestTask, TaskKind, TaskStatus};
use crate::store::placements::SlotPlacement;
use cairn_plan::observed::ReplicaState;

/// One task that brings a node's slot back to its placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub kind: TaskKind,
    pub app: Name,
    pub slot: u32,
    pub release: u64,
    /// The generation of the placement it restores (`None` for removing a replica no placement wants).
    pub generation: Option<u64>,
    /// Unique per drift episode: the same drift seen again maps to the same key.
    pub dedup_key: String,
    pub why: &'static str,
}

/// Replicas of a node coming back from offline that now run elsewhere.
pub fn stop_orders(
    node: &Name,
    reported: &[ActualReplica],
    placements: &[SlotPlacement],
) -> Vec<StopReplica> {
    let by_slot: BTreeMap<(&Name, u32), &SlotPlacement> =
        placements.iter().map(|p| ((&p.app, p.slot), p)).collect();
    let mut out = Vec::new();
    for r in reported {
        let Some(p) = by_slot.get(&(&r.app, r.slot)) else {
            continue;
        };
        if &p.node == node {
            continue;
        }
        // A replica deployed by a generation at least as new as the placement elsewhere is not the one
        // the move superseded (the slot came back here and moved again; the planner's tasks sort it out).
        if r.generation.is_some_and(|g| g >= p.generation) {
            continue;
        }
        out.push(StopReplica {
            app: r.app.clone(),
            slot: r.slot,
            release: r.release,
            generation: p.generation,
            moved_to: Some(p.node.clone()),
            reason: format!(
                "slot {} of {} was moved to node {} while this node was offline",
                r.slot, r.app, p.node
            ),
        });
    }
    out
}

/// A repair to make: (task, app, slot, release, generation, why).
type Wanted<'a> = (TaskKind, &'a Name, u32, u64, Option<u64>, &'static str);

/// The repairs that make `node` match its placements, given the newest task of each of its slots and the
/// time by which the report was taken at the latest (`taken`: a slot whose newest task finished at or
/// after it is left for a fresher report). With no tasks given, every difference is a candidate (a cheap
/// first check before reading tasks).
pub fn repairs(
    node: &Name,
    reported: &[ActualReplica],
    placements: &[SlotPlacement],
    latest: &[LatestTask],
    taken: Option<DateTime<Utc>>,
) -> Vec<Repair> {
    let here: BTreeMap<(&Name, u32), &SlotPlacement> = placements
        .iter()
        .filter(|p| &p.node == node)
        .map(|p| ((&p.app, p.slot), p))
        .collect();
    let actual: BTreeMap<(&Name, u32), &ActualReplica> =
        reported.iter().map(|r| ((&r.app, r.slot), r)).collect();
    let newest: BTreeMap<(&Name, u32), &LatestTask> =
        latest.iter().map(|t| ((&t.app, t.slot), t)).collect();

    let mut wanted: Vec<Wanted<'_>> = Vec::new();
    for (&(app, slot), p) in &here {
        let a = actual.get(&(app, slot));
        let kind = match (p.state, a) {
            (ReplicaState::Running, None) => Some((TaskKind::Deploy, "the replica is missing")),
            (ReplicaState::Running, Some(a)) if a.release != p.release => {
                Some((TaskKind::Deploy, "the replica runs another release"))
            }
            (ReplicaState::Running, Some(a)) if a.state == RunState::Stopped => {
                Some((TaskKind::Start, "the replica is stopped"))
            }
            (ReplicaState::Stopped, Some(a)) if a.state == RunState::Running => {
                Some((TaskKind::Stop, "the replica runs but its app is suspended"))
            }
            _ => None,
        };
        if let Some((kind, why)) = kind {
            wanted.push((kind, app, slot, p.release, Some(p.generation), why));
        }
    }
    for (&(app, slot), a) in &actual {
        if !here.contains_key(&(app, slot)) {
            let elsewhere = placements
                .iter()
                .find(|p| &p.app == app && p.slot == slot)
                .map(|p| p.generation);
            wanted.push((
                TaskKind::Remove,
                app,
                slot,
                a.release,
                elsewhere,
                "no placement wants the replica on this node",
            ));
        }
    }

    let mut out = Vec::new();
    for (kind, app, slot, release, generation, why) in wanted {
        let last = newest.get(&(app, slot));
        if let Some(t) = last {
            let open = matches!(
                t.status,
                TaskStatus::Queued | TaskStatus::Leased | TaskStatus::Failed
            );
            let died_doing_this =
                t.status == TaskStatus::Dead && t.kind == kind && t.release == Some(release);
            let after_the_report = t
                .finished_at
                .zip(taken)
                .is_some_and(|(finished, taken)| finished >= taken);
            if open || died_doing_this || after_the_report {
                continue;
            }
        }
        let after = last.map_or(0, |t| t.id.0);
        out.push(Repair {
            kind,
            app: app.clone(),
            slot,
            release,
            generation,
            dedup_key: format!(
                "drift:{node}:{app}:{slot}:{}:r{release}:after{after}",
                kind.as_str()
            ),
            why,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::TaskId;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn placed(app: &str, slot: u32, node: &str, release: u64, generation: u64) -> SlotPlacement {
        SlotPlacement {
            app: n(app),
            slot,
            node: n(node),
            release,
            state: ReplicaState::Running,
            generation,
        }
    }

    fn runs(app: &str, slot: u32, release: u64, generation: Option<u64>) -> ActualReplica {
        ActualReplica {
            app: n(app),
            slot,
            release,
            generation,
            state: RunState::Running,
            healthy: true,
        }
    }

    fn task(
        id: i64,
        app: &str,
        slot: u32,
        kind: TaskKind,
        release: u64,
        status: TaskStatus,
    ) -> LatestTask {
        LatestTask {
            id: TaskId(id),
            app: n(app),
            slot,
            kind,
            release: Some(release),
            status,
            finished_at: matches!(
                status,
                TaskStatus::Done | TaskStatus::Dead | TaskStatus::Superseded
            )
            .then(|| at(100)),
        }
    }

    /// A time, `s` seconds into the test's world.
    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn a_node_that_matches_its_placements_has_no_drift() {
        let a = n("a");
        let p = vec![placed("web", 1, "a", 3, 7), placed("web", 2, "b", 3, 7)];
        let r = vec![runs("web", 1, 3, Some(7))];
        assert!(repairs(&a, &r, &p, &[], None).is_empty());
        assert!(stop_orders(&a, &r, &p).is_empty());
    }

    #[test]
    fn a_missing_replica_is_deployed_and_an_extra_one_removed() {
        let a = n("a");
        let p = vec![placed("web", 1, "a", 3, 7), placed("api", 1, "b", 2, 5)];
        let r = vec![runs("old", 1, 9, Some(2))];
        let got = repairs(&a, &r, &p, &[], None);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            (
                got[0].kind,
                got[0].app.as_str(),
                got[0].release,
                got[0].generation
            ),
            (TaskKind::Deploy, "web", 3, Some(7))
        );
        assert_eq!(got[0].dedup_key, "drift:a:web:1:deploy:r3:after0");
        assert_eq!(
            (
                got[1].kind,
                got[1].app.as_str(),
                got[1].release,
                got[1].generation
            ),
            (TaskKind::Remove, "old", 9, None)
        );
    }

    #[test]
    fn wrong_release_stopped_and_suspended_replicas_are_repaired_in_place() {
        let a = n("a");
        let mut suspended = placed("quiet", 1, "a", 1, 4);
        suspended.state = ReplicaState::Stopped;
        let p = vec![
            placed("web", 1, "a", 3, 7),
            placed("web", 2, "a", 3, 7),
            suspended,
        ];
        let mut stopped = runs("web", 2, 3, Some(7));
        stopped.state = RunState::Stopped;
        let r = vec![
            runs("web", 1, 2, Some(6)),
            stopped,
            runs("quiet", 1, 1, Some(4)),
        ];
        let got = repairs(&a, &r, &p, &[], None);
        let kinds: Vec<(TaskKind, u32, &str)> = got
            .iter()
            .map(|x| (x.kind, x.slot, x.app.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (TaskKind::Stop, 1, "quiet"),
                (TaskKind::Deploy, 1, "web"),
                (TaskKind::Start, 2, "web")
            ]
        );
    }

    #[test]
    fn an_open_task_or_the_same_dead_repair_holds_the_slot() {
        let a = n("a");
        let p = vec![placed("web", 1, "a", 3, 7)];
        for status in [TaskStatus::Queued, TaskStatus::Leased, TaskStatus::Failed] {
            let t = [task(40, "web", 1, TaskKind::Deploy, 3, status)];
            assert!(repairs(&a, &[], &p, &t, None).is_empty(), "{status}");
        }
        let dead = [task(41, "web", 1, TaskKind::Deploy, 3, TaskStatus::Dead)];
        assert!(
            repairs(&a, &[], &p, &dead, None).is_empty(),
            "no retry loop"
        );
        // A dead deploy of an older release does not hold a repair to the current one.
        let older = [task(41, "web", 1, TaskKind::Deploy, 2, TaskStatus::Dead)];
        assert_eq!(repairs(&a, &[], &p, &older, None).len(), 1);
        // A finished task: the drift is new, and so is the key.
        let done = [task(42, "web", 1, TaskKind::Deploy, 3, TaskStatus::Done)];
        let got = repairs(&a, &[], &p, &done, None);
        assert_eq!(got[0].dedup_key, "drift:a:web:1:deploy:r3:after42");
        assert_eq!(
            got,
            repairs(&a, &[], &p, &done, None),
            "the same drift, the same key"
        );
    }

    /// Regression: a heartbeat's report was taken before the slot's deploy finished (the deploy still
    /// running, the replica not yet there), and the repair reading it saw the deploy done: it enqueued the
    /// same deploy again, and the node ran the same work twice.
    #[test]
    fn a_report_taken_before_the_slots_newest_task_finished_repairs_nothing() {
        let a = n("a");
        let p = vec![placed("web", 1, "a", 3, 7)];
        let done = [task(42, "web", 1, TaskKind::Deploy, 3, TaskStatus::Done)];
        for taken in [at(99), at(100)] {
            assert!(
                repairs(&a, &[], &p, &done, Some(taken)).is_empty(),
                "taken at {taken}: the deploy finished after it"
            );
        }
        // Taken after the deploy finished: the replica is really missing.
        let got = repairs(&a, &[], &p, &done, Some(at(101)));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].dedup_key, "drift:a:web:1:deploy:r3:after42");
        // Only the slot of the task that finished late waits; another slot's drift is repaired.
        let p = vec![placed("web", 1, "a", 3, 7), placed("web", 2, "a", 3, 7)];
        let got = repairs(&a, &[], &p, &done, Some(at(99)));
        assert_eq!(
            got.iter().map(|r| r.slot).collect::<Vec<_>>(),
            [2],
            "{got:?}"
        );
    }

    #[test]
    fn a_returning_node_stops_what_moved_away_while_it_was_gone() {
        let a = n("a");
        let p = vec![placed("web", 1, "b", 3, 9), placed("web", 2, "a", 3, 7)];
        let r = vec![runs("web", 1, 3, Some(7)), runs("web", 2, 3, Some(7))];
        let stops = stop_orders(&a, &r, &p);
        assert_eq!(stops.len(), 1);
        assert_eq!(
            (
                stops[0].slot,
                stops[0].generation,
                stops[0].moved_to.as_ref()
            ),
            (1, 9, Some(&n("b")))
        );
        // Deployed by the newer generation itself: not a leftover of the move.
        let r = vec![runs("web", 1, 3, Some(9))];
        assert!(stop_orders(&a, &r, &p).is_empty());
        // Unknown generation: the move is newer than anything the node knows about.
        let r = vec![runs("web", 1, 3, None)];
        assert_eq!(stop_orders(&a, &r, &p).len(), 1);
    }
}
