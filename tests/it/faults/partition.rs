//! An agent cut off from the control plane past the offline threshold, then healed.
//!
//! Node `a` reaches `cairn serve` only through a TCP proxy the test controls; node `b` directly. Each runs
//! one replica of `web`. Node `a`'s tasks take 3 s (the recording driver's delay), so the cut finds it in
//! the middle of deploying release 2 (a lease it holds), with the deploy of release 3 queued for it
//! (committed right after the cut, before the threshold). The proxy then black-holes `a` until it is
//! offline and its replica has moved to `b`, and heals.
//!
//! What must hold:
//! - the stale lease's late completion (release 2's deploy on `a`, reported with its old token after the
//!   replica moved) is refused, and does not make release 2 live over release 3, which ran;
//! - after healing, exactly one instance of each replica runs (on `b`): `a` stops its copy and does NOT
//!   run the deploy of the moved replica that was queued for it before the cut.
//!
//! The violations are collected and reported together, so one run shows every invariant that breaks.

use std::time::{Duration, Instant};

use cairn_testkit::proxy::{Mode, Proxy};
use serde_json::{Value, json};

use super::socket_addr;
use crate::agents::support::{Plane, placements, reported, wait_converged, wait_for};

/// Serve's flags: node loss after 8 s without a heartbeat (room to apply a commit after the cut while
/// `a` still counts as online), reconciles every second.
const ARGS: &[&str] = &[
    "--interval",
    "1s",
    "--node-offline-after",
    "8s",
    "--heartbeat-interval",
    "300ms",
    "--task-lease",
    "3s",
];
/// How long every task of node `a` takes.
const A_TASK_MS: &str = "3000";

/// The task of `node` deploying `release` of `web` to `slot`, once it is in `status` (any if `None`).
async fn deploy_task(
    plane: &Plane,
    node: &str,
    slot: i64,
    release: i64,
    status: Option<&str>,
) -> Option<Value> {
    let status = status.map_or(String::new(), |s| format!(" AND status = '{s}'"));
    plane
        .rows(&format!(
            "SELECT id, lease_token, status FROM tasks WHERE node = '{node}' AND kind = 'deploy' \
             AND app = 'web' AND slot = {slot} AND release = {release}{status}"
        ))
        .await
        .into_iter()
        .next()
}

async fn node_state(plane: &Plane, node: &str) -> String {
    plane
        .rows(&format!(
            "SELECT state FROM node_status WHERE node = '{node}'"
        ))
        .await[0]["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_returns_to_one_instance_and_its_stale_lease_is_refused() {
    const TEST: &str = "a_partitioned_node_returns_to_one_instance";
    let started = Instant::now();
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 2, "V = \"r1\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, ARGS).await;
    plane.wait_generation(1).await;
    let proxy = Proxy::start(socket_addr(&plane.url)).await;
    let (dir_a, dir_b) = (
        plane.scratch.path().join("agent-a"),
        plane.scratch.path().join("agent-b"),
    );
    let (ta, tb) = (plane.join_token("a"), plane.join_token("b"));
    let _b = plane.agent("b", &dir_b, Some(&tb), &[], &[]);
    plane.agent_server = Some(proxy.url());
    let a = plane.agent(
        "a",
        &dir_a,
        Some(&ta),
        &[("CAIRN_AGENT_TEST_DELAY_MS", A_TASK_MS)],
        &[],
    );
    wait_converged(&plane, Duration::from_secs(60)).await;
    let before = placements(&plane).await;
    let slot_a = before
        .iter()
        .find(|(_, _, n)| n == "a")
        .unwrap_or_else(|| panic!("one replica on each node: {before:?}"))
        .1;
    eprintln!("{TEST}: converged at {:?}: {before:?}", started.elapsed());

    // Release 2: cut `a` off while it deploys it (it holds the lease).
    plane.repo.app("web", 2, "V = \"r2\"\n");
    plane.repo.commit();
    let leased = wait_for(
        "a to lease its deploy of release 2",
        Duration::from_secs(30),
        || deploy_task(&plane, "a", slot_a, 2, Some("leased")),
    )
    .await;
    proxy.set_mode(Mode::BlackHole);
    let (stale_id, stale_token) = (
        leased["id"].as_i64().unwrap(),
        leased["lease_token"].as_i64().unwrap(),
    );
    eprintln!(
        "{TEST}: cut at {:?}, a holds task {stale_id} with token {stale_token}",
        started.elapsed()
    );

    // Release 3 and a new app, applied while `a` still counts as online: the deploy of release 3 and
    // of one `api` replica (which `a` never ran) are queued for `a`.
    plane.repo.app("web", 2, "V = \"r3\"\n");
    plane.repo.app("api", 2, "V = \"a1\"\n");
    plane.repo.commit();
    let queued = wait_for(
        "the deploy of release 3 to be queued for a",
        Duration::from_secs(5),
        || deploy_task(&plane, "a", slot_a, 3, None),
    )
    .await;
    let queued_id = queued["id"].as_i64().unwrap();
    let api_on_a = plane
        .rows("SELECT id, slot FROM tasks WHERE node = 'a' AND app = 'api' AND kind = 'deploy'")
        .await;
    assert_eq!(
        api_on_a.len(),
        1,
        "the set-up needs one api replica placed on a: {:?}",
        placements(&plane).await
    );
    assert_eq!(
        node_state(&plane, "a").await,
        "online",
        "the set-up needs release 3 applied before a goes offline"
    );

    // Past the threshold: `a` is offline, its replica moves to `b`, which runs both at release 3.
    wait_for("a to go offline", Duration::from_secs(30), || async {
        (node_state(&plane, "a").await == "offline").then_some(())
    })
    .await;
    wait_for(
        "a's replica to move to b",
        Duration::from_secs(30),
        || async {
            placements(&plane)
                .await
                .iter()
                .all(|(_, _, n)| n == "b")
                .then_some(())
        },
    )
    .await;
    wait_for(
        "b to run every replica (web at release 3, api at release 1)",
        Duration::from_secs(30),
        || async {
            let r = reported(&plane, "b").await;
            let want: Vec<(String, i64, i64, String)> = [("api", 1), ("web", 3)]
                .iter()
                .flat_map(|(app, release)| {
                    (1..=2).map(|s| ((*app).to_owned(), s, *release, "running".to_owned()))
                })
                .collect();
            (r == want).then_some(())
        },
    )
    .await;
    eprintln!("{TEST}: moved at {:?}", started.elapsed());

    let mut violations: Vec<String> = Vec::new();

    // The stale lease's late completion, straight to serve (the agent's own is stuck behind the cut).
    let credential = a.credential();
    let (status, body) = plane
        .agent_post(
            &format!("/tasks/{stale_id}/result"),
            Some(&credential),
            &json!({"token": stale_token, "outcome": "done", "detail": "deploy done"}),
        )
        .await;
    if status != 409 {
        violations.push(format!(
            "the late completion of task {stale_id} (release 2 on a, token {stale_token}) after its \
             replica moved was answered {status} {body}, not refused with 409"
        ));
    }
    let releases = plane
        .rows("SELECT number, status FROM releases WHERE app = 'web' ORDER BY number")
        .await;
    if !releases
        .iter()
        .any(|r| r["number"] == 3 && r["status"] == "live")
    {
        violations.push(format!(
            "release 3 runs on every placement (both on b) but is not live, after the late \
             completion (the deploy queued for a before the cut still counts?): {releases:?}"
        ));
    }

    // Heal.
    let records_before_heal = a.records().len();
    proxy.set_mode(Mode::Pass);
    eprintln!("{TEST}: healed at {:?}", started.elapsed());
    wait_for(
        "a to come back online and stop its copy",
        Duration::from_secs(30),
        || async {
            let online = node_state(&plane, "a").await == "online";
            let runs: Vec<_> = reported(&plane, "a")
                .await
                .into_iter()
                .filter(|r| r.3 == "running")
                .collect();
            (online && runs.is_empty()).then_some(())
        },
    )
    .await;
    // Let `a` do whatever it still has: its open tasks run or go away (each takes 3 s), then settle.
    wait_for(
        "a to have no open task",
        Duration::from_secs(40),
        || async {
            plane
                .rows("SELECT id FROM tasks WHERE node = 'a' AND status IN ('queued', 'leased')")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_converged(&plane, Duration::from_secs(30)).await;

    let after: Vec<Value> = a.records().split_off(records_before_heal);
    let started_again: Vec<&Value> = after
        .iter()
        .filter(|r| {
            r["via"] == "task" && matches!(r["kind"].as_str(), Some("deploy" | "start" | "restart"))
        })
        .collect();
    let queued_before_cut = plane
        .rows(&format!(
            "SELECT id, app, kind, slot, release, generation, status, attempts FROM tasks \
             WHERE id IN ({queued_id}, {})",
            api_on_a[0]["id"]
        ))
        .await;
    if !started_again.is_empty() {
        violations.push(format!(
            "the returning node a started a moved replica again after the heal (a second \
             instance): {started_again:?}; the deploys queued for it before the cut: \
             {queued_before_cut:?}"
        ));
    }
    // A deploy counted done on `a` ran on `a` (a skipped one is not "done").
    let ran_on_a: Vec<i64> = a
        .records()
        .iter()
        .filter(|r| r["via"] == "task")
        .filter_map(|r| r["task"].as_i64())
        .collect();
    let done_on_a = plane
        .rows("SELECT id, app, slot, release FROM tasks WHERE node = 'a' AND kind = 'deploy' AND status = 'done'")
        .await;
    for t in &done_on_a {
        if !ran_on_a.contains(&t["id"].as_i64().unwrap()) {
            violations.push(format!(
                "deploy task {t} is counted done, but node a never ran it"
            ));
        }
    }
    // Exactly one instance of each replica, where it is placed.
    let mut instances: Vec<(String, i64, String)> = Vec::new();
    for node in ["a", "b"] {
        for (app, slot, _, state) in reported(&plane, node).await {
            if state == "running" {
                instances.push((app, slot, node.to_owned()));
            }
        }
    }
    instances.sort();
    let placed = placements(&plane).await;
    if instances != placed {
        violations.push(format!(
            "running instances {instances:?} are not exactly the placements {placed:?}"
        ));
    }
    let releases = plane
        .rows("SELECT number, status FROM releases WHERE app = 'web' ORDER BY number")
        .await;
    if !releases
        .iter()
        .any(|r| r["number"] == 3 && r["status"] == "live")
    {
        violations.push(format!("release 3 is not live at the end: {releases:?}"));
    }
    eprintln!("{TEST}: done at {:?}", started.elapsed());
    assert!(
        violations.is_empty(),
        "{} violation(s):\n- {}",
        violations.len(),
        violations.join("\n- ")
    );
}
