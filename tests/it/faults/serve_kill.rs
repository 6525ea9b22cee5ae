//! `cairn serve` SIGKILLed at random moments while commits stream into its config repository (apps
//! added, changed, scaled and removed), and started again each time; two agents (recording driver) reach
//! it through a proxy that follows it to its new port. Some kills land inside an open apply transaction
//! (serve pauses there, through the `apply-before-commit` failpoint, and says so in its log), the others
//! anywhere.
//!
//! Afterwards: the applied state is the last commit whole (apps, env, replicas, placements, what the
//! agents run); every applied reconciliation is whole (generations without gaps, commits never going
//! backwards, exactly the releases its commit implies, deploys only of its own releases and slots); and
//! no agent ran a task, or the same work, twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cairn_testkit::proxy::Proxy;

use super::{Rng, repeated_runs, seed, socket_addr};
use crate::agents::support::{Plane, Repo, wait_converged, wait_for};

/// Commits in the stream.
const COMMITS: u32 = 30;
/// How long serve holds each apply transaction open before COMMIT (the `apply-before-commit` failpoint),
/// and the window after its message in which a kill meant for the open transaction lands (the margin
/// absorbs scheduling delays, so such a kill never comes after the COMMIT).
const FAILPOINT: (&str, &str) = ("CAIRN_FAILPOINT", "apply-before-commit:400");
const KILL_WINDOW_MS: u64 = 200;
/// Serve's flags: a short interval so commits are read often; node loss is not what this test is
/// about, so a node survives serve's restarts (its heartbeats pause meanwhile).
const ARGS: &[&str] = &[
    "--interval",
    "500ms",
    "--node-offline-after",
    "15s",
    "--heartbeat-interval",
    "300ms",
    "--task-lease",
    "3s",
];

/// What the repository declares: app name to (replicas, the value of its env var `V`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model(BTreeMap<String, (u32, String)>);

impl Model {
    /// Makes the work tree hold exactly these apps (beside the nodes and settings).
    fn write(&self, repo: &Repo, before: &Model) {
        for name in before.0.keys().filter(|n| !self.0.contains_key(*n)) {
            repo.remove(&format!("app-{name}.toml"));
        }
        for (name, (replicas, v)) in &self.0 {
            if before.0.get(name) != Some(&(*replicas, v.clone())) {
                repo.app(name, *replicas, &format!("V = \"{v}\"\n"));
            }
        }
    }

    /// One to three random changes: add an app (at most 5, names never reused), remove one (at least
    /// one stays), change its env, or scale it (1 to 3 replicas: 15 at most, two nodes hold 16).
    fn mutate(&mut self, rng: &mut Rng, commit: u32, next_app: &mut u32) {
        for op in 0..=rng.below(3) {
            let names: Vec<String> = self.0.keys().cloned().collect();
            let pick = names[rng.below(names.len() as u64) as usize].clone();
            match rng.below(4) {
                0 if names.len() < 5 => {
                    *next_app += 1;
                    let replicas = 1 + rng.below(2) as u32;
                    self.0
                        .insert(format!("app{next_app}"), (replicas, format!("c{commit}")));
                }
                1 if names.len() > 1 => {
                    self.0.remove(&pick);
                }
                2 => {
                    self.0.get_mut(&pick).unwrap().1 = format!("c{commit}o{op}");
                }
                _ => {
                    let e = self.0.get_mut(&pick).unwrap();
                    e.0 = 1 + (e.0 + rng.below(2) as u32) % 3;
                }
            }
        }
    }
}

/// How many times the serve log at `path` says it paused inside an apply transaction.
fn failpoints(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches("failpoint apply-before-commit")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sigkilled_during_a_commit_stream_applies_the_last_commit_whole_and_runs_no_task_twice()
 {
    const TEST: &str = "serve_sigkilled_during_a_commit_stream";
    let seed = seed(TEST);
    let mut rng = Rng(seed);
    let started = Instant::now();
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    let mut model = Model::default();
    model.0.insert("app1".into(), (2, "c0".into()));
    model.write(&repo, &Model::default());
    let mut next_app = 1;
    let mut plane = Plane::start_with_env(db, repo, scratch, identity, ARGS, &[FAILPOINT]).await;
    // Each commit pushed, with what it declares, in push order.
    let mut history: Vec<(String, Model)> = vec![(plane.repo.head(), model.clone())];

    let proxy = Proxy::start(socket_addr(&plane.url)).await;
    plane.agent_server = Some(proxy.url());
    let (dir_a, dir_b) = (
        plane.scratch.path().join("agent-a"),
        plane.scratch.path().join("agent-b"),
    );
    plane.wait_generation(1).await;
    eprintln!("{TEST}: serve up at {:?}", started.elapsed());
    let (ta, tb) = (plane.join_token("a"), plane.join_token("b"));
    let a = plane.agent("a", &dir_a, Some(&ta), &[], &[]);
    let b = plane.agent("b", &dir_b, Some(&tb), &[], &[]);
    wait_converged(&plane, Duration::from_secs(60)).await;
    eprintln!("{TEST}: first commit deployed at {:?}", started.elapsed());

    let mut kills = Vec::new();
    let mut inside_apply = 0;
    for i in 1..=COMMITS {
        let before = model.clone();
        model.mutate(&mut rng, i, &mut next_app);
        model.write(&plane.repo, &before);
        if model == before {
            continue; // e.g. scaled back to where it was: nothing to commit
        }
        let paused_before = failpoints(&plane.serve_log());
        plane.repo.commit();
        history.push((plane.repo.head(), model.clone()));
        let kill = match rng.below(100) {
            // Inside the open apply transaction of this commit: serve pauses there (the failpoint) and
            // says so in its log.
            0..25 => {
                let limit = Instant::now() + Duration::from_secs(5);
                while failpoints(&plane.serve_log()) == paused_before && Instant::now() < limit {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let seen = failpoints(&plane.serve_log()) > paused_before;
                tokio::time::sleep(Duration::from_millis(rng.below(KILL_WINDOW_MS))).await;
                if seen {
                    inside_apply += 1;
                    Some("inside its apply")
                } else {
                    Some("waiting for an apply that did not come")
                }
            }
            // Anywhere in serve's life: reading, planning, answering a lease, idle.
            25..50 => {
                tokio::time::sleep(Duration::from_millis(rng.below(1300))).await;
                Some("at a random moment")
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(rng.below(900))).await;
                None
            }
        };
        if let Some(when) = kill {
            kills.push(format!("after commit {i} {when} ({:?})", started.elapsed()));
            plane.kill_serve();
            plane.restart_serve().await;
            proxy.set_upstream(socket_addr(&plane.url));
        }
    }
    let last = plane.repo.head();
    eprintln!(
        "{TEST}: seed {seed}: {} commits, serve killed {} times ({inside_apply} inside an open apply \
         transaction): {kills:?}",
        history.len() - 1,
        kills.len()
    );
    let ctx = format!("(CAIRN_FAULT_SEED={seed}, kills {kills:?})");

    // Settled: the last commit applied, every replica reported at its release, no task outstanding.
    wait_for(
        "the last commit to be applied",
        Duration::from_secs(60),
        || async {
            let r = plane.rows("SELECT commit FROM config_state").await;
            (r[0]["commit"] == last.as_str()).then_some(())
        },
    )
    .await;
    wait_converged(&plane, Duration::from_secs(60)).await;
    wait_for(
        "every task to be finished",
        Duration::from_secs(60),
        || async {
            plane
                .rows("SELECT id FROM tasks WHERE status IN ('queued', 'leased')")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;

    assert!(
        inside_apply > 0 || !kills.iter().any(|k| k.contains("apply")),
        "no kill landed inside an open apply transaction {ctx}"
    );

    // 1. The applied state is the last commit, whole.
    let apps: BTreeMap<String, (u32, String)> = plane
        .rows(
            "SELECT a.name, a.replicas, e.value FROM apps a \
             LEFT JOIN app_env e ON e.app = a.name AND e.key = 'V'",
        )
        .await
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                (
                    r["replicas"].as_u64().unwrap() as u32,
                    r["value"].as_str().unwrap_or("<none>").to_owned(),
                ),
            )
        })
        .collect();
    assert_eq!(apps, model.0, "apps as the last commit declares {ctx}");
    let placed: BTreeMap<String, u32> = plane
        .rows("SELECT app, count(*) AS n FROM placements WHERE state = 'running' GROUP BY app")
        .await
        .iter()
        .map(|r| {
            (
                r["app"].as_str().unwrap().to_owned(),
                r["n"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    let want: BTreeMap<String, u32> = model.0.iter().map(|(k, v)| (k.clone(), v.0)).collect();
    assert_eq!(placed, want, "running placements per app {ctx}");
    // What the agents run is exactly what is placed, at each app's newest release.
    let newest = plane
        .rows(
            "SELECT p.app, p.slot, p.node, p.release, \
             (SELECT max(number) FROM releases r WHERE r.app = p.app) AS newest FROM placements p",
        )
        .await;
    for p in &newest {
        assert_eq!(p["release"], p["newest"], "placement {p} {ctx}");
    }
    let placed_set: BTreeSet<(String, i64, i64, String)> = newest
        .iter()
        .map(|p| {
            (
                p["app"].as_str().unwrap().to_owned(),
                p["slot"].as_i64().unwrap(),
                p["release"].as_i64().unwrap(),
                p["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The agents' reports follow their last tasks by a heartbeat: wait (bounded) for them to match.
    let mut running = BTreeSet::new();
    let limit = Instant::now() + Duration::from_secs(20);
    while Instant::now() < limit {
        running.clear();
        for node in ["a", "b"] {
            for (app, slot, release, state) in crate::agents::support::reported(&plane, node).await
            {
                if state == "running" {
                    running.insert((app, slot, release, node.to_owned()));
                }
            }
        }
        if running == placed_set {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running, placed_set, "the agents run what is placed {ctx}");

    // 2. Every reconciliation recorded is whole.
    let failed = plane
        .rows("SELECT commit, summary FROM reconciliations WHERE status = 'failed'")
        .await;
    assert!(
        failed.is_empty(),
        "no commit of the stream is invalid: {failed:?} {ctx}"
    );
    let applied = plane
        .rows("SELECT commit, generation FROM reconciliations WHERE status = 'applied' ORDER BY id")
        .await;
    let generation = plane.rows("SELECT generation FROM config_state").await[0]["generation"]
        .as_i64()
        .unwrap();
    let gens: Vec<i64> = applied
        .iter()
        .map(|r| r["generation"].as_i64().unwrap())
        .collect();
    assert_eq!(
        gens,
        (1..=generation).collect::<Vec<_>>(),
        "one applied reconciliation per generation, in order {ctx}"
    );
    // The commit of each generation, and what it declares.
    let mut at: BTreeMap<i64, (String, Model)> = BTreeMap::new();
    let mut last_index = None;
    for r in &applied {
        let commit = r["commit"].as_str().unwrap();
        let index = history
            .iter()
            .position(|(c, _)| c == commit)
            .unwrap_or_else(|| panic!("applied commit {commit} was never pushed {ctx}"));
        assert!(
            last_index < Some(index),
            "applied commits go forward only: {applied:?} {ctx}"
        );
        last_index = Some(index);
        at.insert(
            r["generation"].as_i64().unwrap(),
            (commit.to_owned(), history[index].1.clone()),
        );
    }
    let releases = plane
        .rows("SELECT app, number, config_commit, config_generation FROM releases ORDER BY app, number")
        .await;
    let mut previous = Model::default();
    for (g, (commit, declared)) in &at {
        // A release for each app that is new or whose env changed since the previous generation.
        let want: BTreeSet<String> = declared
            .0
            .iter()
            .filter(|(name, (_, v))| previous.0.get(*name).is_none_or(|(_, old)| old != v))
            .map(|(name, _)| name.clone())
            .collect();
        let got: BTreeSet<String> = releases
            .iter()
            .filter(|r| r["config_generation"] == *g)
            .map(|r| {
                assert_eq!(r["config_commit"], commit.as_str(), "release {r} {ctx}");
                r["app"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(got, want, "the releases of generation {g} ({commit}) {ctx}");
        previous = declared.clone();
    }
    // Every deploy belongs to its generation's commit: an app and slot it declares, at the release that
    // was the app's newest then.
    let deploys = plane
        .rows("SELECT id, app, slot, release, generation FROM tasks WHERE kind = 'deploy'")
        .await;
    for d in &deploys {
        let g = d["generation"].as_i64().unwrap();
        let (commit, declared) = at
            .get(&g)
            .unwrap_or_else(|| panic!("deploy {d} of a generation never applied {ctx}"));
        let app = d["app"].as_str().unwrap();
        let (replicas, _) = declared
            .0
            .get(app)
            .unwrap_or_else(|| panic!("deploy {d}: {commit} declares no such app {ctx}"));
        assert!(
            d["slot"].as_i64().unwrap() <= i64::from(*replicas),
            "deploy {d}: {commit} declares {replicas} replicas {ctx}"
        );
        let current = releases
            .iter()
            .filter(|r| r["app"] == app && r["config_generation"].as_i64().unwrap() <= g)
            .map(|r| r["number"].as_i64().unwrap())
            .max();
        assert_eq!(
            d["release"].as_i64(),
            current,
            "deploy {d}: the app's release at generation {g} {ctx}"
        );
    }

    // 3. No task, and no piece of work, ran twice on a node.
    for (node, agent) in [("a", &a), ("b", &b)] {
        let again = repeated_runs(&agent.records());
        assert!(again.is_empty(), "node {node}: {again:?} {ctx}");
    }
    eprintln!("{TEST}: passed in {:?}", started.elapsed());
}

/// Regression: `cairn serve` down for longer than the offline threshold (an upgrade, a crash loop) came
/// back and marked every node offline at its first liveness check, before any agent had the chance to
/// heartbeat to it, and the planner moved replicas off nodes that had been running all along. The same
/// happened after a PostgreSQL outage (heartbeats refused meanwhile are not a node's silence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_down_past_the_offline_threshold_marks_no_live_node_offline_when_it_returns() {
    const OFFLINE_AFTER: Duration = Duration::from_secs(3);
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 2, "V = \"r1\"\n");
    let mut plane = Plane::start(
        db,
        repo,
        scratch,
        identity,
        &[
            "--interval",
            "1s",
            "--node-offline-after",
            "3s",
            "--heartbeat-interval",
            "300ms",
            "--task-lease",
            "3s",
        ],
    )
    .await;
    plane.wait_generation(1).await;
    let proxy = Proxy::start(socket_addr(&plane.url)).await;
    plane.agent_server = Some(proxy.url());
    let (dir_a, dir_b) = (
        plane.scratch.path().join("agent-a"),
        plane.scratch.path().join("agent-b"),
    );
    let (ta, tb) = (plane.join_token("a"), plane.join_token("b"));
    let a = plane.agent("a", &dir_a, Some(&ta), &[], &[]);
    let b = plane.agent("b", &dir_b, Some(&tb), &[], &[]);
    wait_converged(&plane, Duration::from_secs(60)).await;
    let placed = crate::agents::support::placements(&plane).await;

    plane.kill_serve();
    tokio::time::sleep(OFFLINE_AFTER + Duration::from_secs(1)).await;
    plane.restart_serve().await;
    proxy.set_upstream(socket_addr(&plane.url));

    // Two thresholds after the restart: the agents heartbeat every 300 ms, so no node may be offline.
    let watch_until = Instant::now() + OFFLINE_AFTER * 2;
    while Instant::now() < watch_until {
        let offline = plane
            .rows("SELECT node FROM node_status WHERE state <> 'online'")
            .await;
        assert!(
            offline.is_empty(),
            "live nodes marked offline after serve's restart: {offline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(plane.serve_log()).unwrap();
    assert!(
        !log.contains("node is offline"),
        "serve marked a live node offline after its restart"
    );
    assert_eq!(
        crate::agents::support::placements(&plane).await,
        placed,
        "no replica moved"
    );
    for (node, agent) in [("a", &a), ("b", &b)] {
        let stops: Vec<_> = agent
            .records()
            .into_iter()
            .filter(|r| r["kind"] == "stop" || r["kind"] == "remove")
            .collect();
        assert!(stops.is_empty(), "node {node} stopped nothing: {stops:?}");
    }

    // A node that really falls silent is still found: `b` killed, offline within the threshold (after
    // the grace), its replica moved to `a`.
    drop(b);
    wait_for(
        "the silent node b to be marked offline",
        Duration::from_secs(20),
        || async {
            let r = plane
                .rows("SELECT state FROM node_status WHERE node = 'b'")
                .await;
            (r[0]["state"] == "offline").then_some(())
        },
    )
    .await;
    wait_for(
        "b's replica to move to a",
        Duration::from_secs(20),
        || async {
            crate::agents::support::placements(&plane)
                .await
                .iter()
                .all(|(_, _, n)| n == "a")
                .then_some(())
        },
    )
    .await;
}

/// Regression (found by the commit-stream test above): serve SIGKILLed while it fetched the config
/// repository left `refs/cairn/heads/main.lock` in its git cache, and every later fetch failed ("A lock
/// could not be obtained for reference ... might need manual deletion"): no commit was applied again
/// until an operator deleted the file. Here the lock such a kill leaves is made directly (deterministic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_lock_left_by_a_killed_serve_does_not_stop_later_config_fetches() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "V = \"r1\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, ARGS).await;
    plane.wait_generation(1).await;
    plane.kill_serve();
    let cache = plane.scratch.path().join("cache");
    let git_dirs: Vec<std::path::PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "git") && p.join("refs").is_dir())
        .collect();
    assert!(
        !git_dirs.is_empty(),
        "serve keeps a git cache under {}",
        cache.display()
    );
    for dir in &git_dirs {
        let heads = dir.join("refs/cairn/heads");
        std::fs::create_dir_all(&heads).unwrap();
        std::fs::write(heads.join("main.lock"), b"").unwrap();
    }
    plane.repo.app("web", 1, "V = \"r2\"\n");
    plane.repo.commit();
    let head = plane.repo.head();
    plane.restart_serve().await;
    let applied = wait_for_applied(&plane, &head, Duration::from_secs(20)).await;
    assert!(
        applied,
        "serve never applied {head} after a restart with a stale ref lock: {}",
        cairn_testkit::skip::tail(&plane.serve_log(), 5)
    );
}

/// Whether the commit `head` is applied within `limit`.
async fn wait_for_applied(plane: &Plane, head: &str, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let r = plane.rows("SELECT commit FROM config_state").await;
        if r[0]["commit"] == head {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
