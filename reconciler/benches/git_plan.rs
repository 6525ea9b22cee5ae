//! Planning from a real git remote, as `cairn serve` does on a push: the generated repository is committed
//! with the `git` CLI and pushed to a local bare repository, then read through [`GitSource`] (gix fetch into
//! a cache, manifests read from the commit's tree without a checkout) and planned.
//!
//! - **cold**: a fresh cache; fetch + load (parse and validate every file) + plan against an empty
//!   database (every resource created, every replica placed). Aim for 10,000 apps on 100 nodes: < 1 s.
//! - **incremental**: the applied state of the first commit, then commits that each change one app's env
//!   in one file; fetch (reported on its own), then load (one file re-parsed and the assembly updated in
//!   place, both asserted) + plan (one app changed, asserted) against the state the previous commit left
//!   applied, by the kept `Planner` told which apps changed as the controller tells it (the assembler's
//!   `apps_changed`, and the apps the last apply wrote). Also, untimed in the total, what assembling the
//!   same files afresh costs (as every load did before `cairn_schema::Assembler`) and what a plan of
//!   every app costs, both asserted equal. Aim for 100,000 apps: load + plan < 20 ms.
//!
//! ```text
//! cargo bench -p cairn-reconciler --bench git_plan                          # small: 1,000 / 10,000 apps
//! cargo bench -p cairn-reconciler --bench git_plan -- --cold 10000 --incremental 100000
//! ```
//!
//! Times are medians over runs; `SPLIT=1` also prints each run.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cairn_plan::observed::{CommitId, Fingerprints, NodeState, NodeStatus, Observed};
use cairn_plan::{
    Basis, Changes, DEFAULT_OFFLINE_AFTER, DesiredAt, Plan, PlanInput, Planner, WarningKind,
    next_observed, plan,
};
use cairn_reconciler::source::Snapshot;
use cairn_schema::{Desired, Driver, Name};
use chrono::{DateTime, Utc};

const HEAD: &str = "fedcba9876543210fedcba9876543210fedcba98";

#[path = "support/repo.rs"]
mod repo;
use repo::{Remote, generate};

fn input<'a>(
    commit: &'a CommitId,
    d: &'a Desired,
    fps: &'a Fingerprints,
    o: &'a Observed,
) -> PlanInput<'a> {
    PlanInput {
        desired: Some(DesiredAt { commit, state: d }),
        fingerprints: Some(fps),
        observed: o,
        seed: 1,
        now: DateTime::<Utc>::from_timestamp(1_800_000_000, 0).expect("a time"),
        offline_after: DEFAULT_OFFLINE_AFTER,
    }
}

fn desired(snap: &Snapshot) -> &Desired {
    snap.loaded
        .desired
        .as_ref()
        .unwrap_or_else(|| panic!("generated repository is valid: {}", snap.loaded.diagnostics))
}

/// Source heads for every app, as polling would have recorded them.
fn heads(d: &Desired) -> Observed {
    let mut o = Observed::default();
    for app in d.apps.keys() {
        o.source_heads.insert(app.clone(), CommitId::new(HEAD));
    }
    o
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Cold: a new cache each run.
fn cold(apps: usize, runs: usize, split: bool) {
    let remote = Remote::new(&generate(apps));
    let (mut fetch, mut load, mut planning) = (vec![], vec![], vec![]);
    let (mut both, mut total) = (vec![], vec![]);
    let mut replicas = 0;
    for run in 0..runs {
        let mut src = remote.source(&format!("cold-{run}"));
        let t0 = Instant::now();
        let head = src.fetch().expect("fetch");
        let t1 = Instant::now();
        let snap = src.load(head).expect("load");
        let t2 = Instant::now();
        let d = desired(&snap);
        let empty = heads(d);
        let commit = CommitId::new(head.to_string());
        let fps = Fingerprints::new();
        let p = plan(&input(&commit, d, &fps, &empty));
        let t3 = Instant::now();
        assert_eq!(p.counts().0, 10 + 4 + 100 + apps, "everything is created");
        assert!(
            !p.warnings.iter().any(|w| w.kind == WarningKind::Unplaced),
            "every replica placed"
        );
        replicas = p.placements.len();
        fetch.push(t1 - t0);
        load.push(t2 - t1);
        planning.push(t3 - t2);
        both.push(t3 - t1);
        total.push(t3 - t0);
        if split {
            eprintln!(
                "cold {apps}: fetch {} load {} plan {} total {}",
                ms(t1 - t0),
                ms(t2 - t1),
                ms(t3 - t2),
                ms(t3 - t0)
            );
        }
    }
    println!(
        "| cold | {apps} | {replicas} | {} | {} | - | {} | - | {} | {} | {runs} |",
        ms(median(fetch)),
        ms(median(load)),
        ms(median(planning)),
        ms(median(both)),
        ms(median(total))
    );
}

/// Incremental: one warm source; each run commits a change to one app in one file.
fn incremental(apps: usize, runs: usize, split: bool) {
    let files = generate(apps);
    let remote = Remote::new(&files);
    let mut src = remote.source("warm");
    let head = src.fetch().expect("fetch");
    let snap = src.load(head).expect("load");
    let d = desired(&snap).clone();
    let commit = CommitId::new(head.to_string());
    let fps = Fingerprints::new();
    let empty = heads(&d);
    let first = plan(&input(&commit, &d, &fps, &empty));
    let mut applied = next_observed(&input(&commit, &d, &fps, &empty), &first).expect("applicable");
    for node in applied.nodes.keys() {
        applied.node_status.insert(
            node.clone(),
            NodeStatus {
                state: NodeState::Online,
                last_heartbeat: Some(
                    DateTime::<Utc>::from_timestamp(1_800_000_000, 0).expect("a time"),
                ),
                drivers: vec![Driver::Docker],
                recipient: None,
            },
        );
    }
    let steady: Plan = plan(&input(&commit, &d, &fps, &applied));
    assert!(steady.is_empty(), "{}", steady.summary());
    // The planner the control plane keeps between reconciles, having planned the applied state once.
    // As the controller does, it is told which apps changed: those whose manifest the assembler says
    // changed, and those whose rows the last apply wrote (what the store's change marks would name).
    let mut planner = Planner::new();
    let mut basis = Basis {
        desired: snap.loaded.revision.expect("an assembled revision"),
        observed: 0,
    };
    let now = Changes {
        now: basis,
        since: None,
    };
    assert_eq!(
        planner.plan_with(&input(&commit, &d, &fps, &applied), Some(now)),
        steady
    );
    let mut written: BTreeSet<Name> = BTreeSet::new();

    let (mut fetch, mut load, mut planning) = (vec![], vec![], vec![]);
    let (mut both, mut total, mut afresh, mut plan_afresh) = (vec![], vec![], vec![], vec![]);
    src.give_back(snap);
    for run in 0..runs {
        let a = remote.commit_one_change(apps, run, 0);

        let parses = src.parse_count();
        let t0 = Instant::now();
        let head = src.fetch().expect("fetch");
        let t1 = Instant::now();
        let snap = src.load(head).expect("load");
        let t2 = Instant::now();
        let d = desired(&snap);
        let commit = CommitId::new(head.to_string());
        let now = Basis {
            desired: snap.loaded.revision.expect("an assembled revision"),
            observed: basis.observed + 1,
        };
        let mut changed = src
            .apps_changed(basis.desired, now.desired)
            .expect("the same assembler");
        changed.append(&mut written);
        let changes = Changes {
            now,
            since: Some((basis, &changed)),
        };
        let p = planner.plan_with(&input(&commit, d, &fps, &applied), Some(changes));
        let t3 = Instant::now();
        basis = now;
        // Only this commit's app and the one the last run deployed are compared and planned again, and
        // the plan is the plan of every app, which is timed apart.
        assert!(planner.reuse().named, "{:?}", planner.reuse());
        assert!(planner.reuse().planned <= 2, "{:?}", planner.reuse());
        let t = Instant::now();
        assert_eq!(
            p,
            plan(&input(&commit, d, &fps, &applied)),
            "incremental plan equals full"
        );
        plan_afresh.push(t.elapsed());
        assert_eq!(src.parse_count(), parses + 1, "one file re-parsed");
        assert_eq!(src.fresh_assemblies(), 1, "assembled incrementally");
        assert_eq!(p.summary(), "Plan: 0 to add, 1 to change, 0 to destroy.");
        assert_eq!(p.changes[0].name.as_str(), format!("app-{a}"));
        // Applied, as the control plane would: the next run's commit is one change from here.
        applied = next_observed(&input(&commit, d, &fps, &applied), &p).expect("applicable");
        written = p.releases.iter().map(|r| r.app.clone()).collect();
        written.extend(p.placement_changes.iter().map(|c| c.app.clone()));
        written.extend(p.changes.iter().map(|c| c.name.clone()));
        // What assembling and validating the whole repository again (as before) costs, and that the
        // incremental result equals it.
        let t = Instant::now();
        let again = Snapshot::new(snap.commit.clone(), snap.files.clone(), Vec::new());
        let assemble = t.elapsed();
        assert_eq!(
            again.loaded.desired.as_ref(),
            Some(d),
            "incremental equals full"
        );
        assert_eq!(again.loaded.diagnostics.0, snap.loaded.diagnostics.0);
        fetch.push(t1 - t0);
        load.push(t2 - t1);
        planning.push(t3 - t2);
        both.push(t3 - t1);
        total.push(t3 - t0);
        afresh.push(assemble);
        if split {
            eprintln!(
                "incremental {apps}: fetch {} load {} (a full assembly instead: {}) plan {} (every app instead: {})",
                ms(t1 - t0),
                ms(t2 - t1),
                ms(assemble),
                ms(t3 - t2),
                ms(*plan_afresh.last().expect("timed"))
            );
        }
        drop(again);
        src.give_back(snap);
    }
    println!(
        "| incremental (one file) | {apps} | {} | {} | {} | {} | {} | {} | {} | {} | {runs} |",
        first.placements.len(),
        ms(median(fetch)),
        ms(median(load)),
        ms(median(afresh)),
        ms(median(planning)),
        ms(median(plan_afresh)),
        ms(median(both)),
        ms(median(total))
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = |flag: &str, default: usize| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let cold_apps = size("--cold", 1_000);
    let incremental_apps = size("--incremental", 10_000);
    let runs = size("--runs", 5);
    let split = std::env::var_os("SPLIT").is_some();
    println!(
        "| case | apps | replicas | fetch | load | full assembly instead | plan | plan of every app instead | load + plan | total | runs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    if cold_apps > 0 {
        cold(cold_apps, runs, split);
    }
    if incremental_apps > 0 {
        incremental(incremental_apps, runs, split);
    }
}
