//! PostgreSQL restarted, killed (SIGKILL, crash recovery), then stopped for a minute, under `cairn serve`
//! and two agents: all recover without a hand. The test runs its own cluster ([`OwnCluster`]), so stopping it breaks no other test.
//!
//! After each: serve's `/readyz` is ready again, the agents' heartbeats reach the database again, and a
//! commit made meanwhile applies and deploys. During the outage no process exits, `/healthz` answers,
//! and `/readyz` says not ready. At the end nothing moved (the nodes were alive all along: `b`, reached
//! through a proxy, is heard 2 s after `a` once the database is back, within the threshold), no agent
//! stopped anything or ran a task twice, and no task was given up on.

use std::time::{Duration, Instant};

use cairn_schema::Identity;
use cairn_testkit::pg::OwnCluster;
use cairn_testkit::proxy::{Mode, Proxy};

use super::socket_addr;

use crate::agents::support::{Plane, Repo, placements, wait_converged, wait_for};

const ARGS: &[&str] = &[
    "--interval",
    "1s",
    "--node-offline-after",
    "5s",
    "--heartbeat-interval",
    "300ms",
    "--task-lease",
    "3s",
];
/// How long node `b`'s path to serve stays cut after the database is back: shorter than the threshold,
/// so `b` is no more silent than a live node may be, while `a` (heartbeating every 300 ms) is heard first.
const B_LATE: Duration = Duration::from_secs(2);
/// How long the database stays down.
const OUTAGE: Duration = Duration::from_secs(60);

/// GET `url` with a bound: `Some(status)`, or `None` when no answer came within `limit`.
async fn status_of(url: &str, limit: Duration) -> Option<u16> {
    let client = reqwest::Client::builder().timeout(limit).build().unwrap();
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits until serve is ready, the agent's heartbeats are recorded again (one after `since`, the
/// database's clock), the last commit is applied and its release `release` runs.
async fn recovered(plane: &Plane, since: &str, release: i64, what: &str) {
    let readyz = format!("{}/readyz", plane.url);
    wait_for(
        &format!("{what}: /readyz to be ready"),
        Duration::from_secs(60),
        || async { (status_of(&readyz, Duration::from_secs(15)).await == Some(200)).then_some(()) },
    )
    .await;
    wait_for(
        &format!("{what}: both agents' heartbeats to be recorded again"),
        Duration::from_secs(30),
        || async {
            let r = plane
                .rows(&format!(
                    "SELECT state FROM node_status WHERE state = 'online' \
                     AND last_heartbeat > '{since}'::timestamptz"
                ))
                .await;
            (r.len() == 2).then_some(())
        },
    )
    .await;
    let head = plane.repo.head();
    wait_for(
        &format!("{what}: the last commit to be applied"),
        Duration::from_secs(30),
        || async {
            let r = plane.rows("SELECT commit FROM config_state").await;
            (r[0]["commit"] == head.as_str()).then_some(())
        },
    )
    .await;
    wait_for(
        &format!("{what}: release {release} to run"),
        Duration::from_secs(30),
        || async {
            let r = plane
                .rows("SELECT release FROM placements WHERE app = 'web'")
                .await;
            (r.len() == 2 && r.iter().all(|r| r["release"] == release)).then_some(())
        },
    )
    .await;
    wait_converged(plane, Duration::from_secs(30)).await;
}

async fn db_now(plane: &Plane) -> String {
    plane.rows("SELECT now()::text AS t").await[0]["t"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_agents_recover_from_postgres_restart_crash_and_outage_without_moving_replicas() {
    const TEST: &str = "serve_and_an_agent_recover_from_a_postgres_outage";
    let started = Instant::now();
    // Declared first, dropped (stopped) last: after serve and the agent.
    let Some(cluster) = OwnCluster::new() else {
        return;
    };
    let db = cluster.database().await;
    let identity = Identity::generate();
    let repo = Repo::new(identity.recipient().as_str());
    let scratch = tempfile::tempdir().unwrap();
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 2, "V = \"r1\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, ARGS).await;
    plane.wait_generation(1).await;
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    let mut agent = plane.agent("a", &dir, Some(&token), &[], &[]);
    let dir_b = plane.scratch.path().join("agent-b");
    let token_b = plane.join_token("b");
    // `b` reaches serve through a proxy, to be heard a moment later than `a` after the outage.
    let proxy = Proxy::start(socket_addr(&plane.url)).await;
    plane.agent_server = Some(proxy.url());
    let mut agent_b = plane.agent("b", &dir_b, Some(&token_b), &[], &[]);
    wait_converged(&plane, Duration::from_secs(60)).await;
    let placed = placements(&plane).await;
    eprintln!("{TEST}: running at {:?}", started.elapsed());

    // A restart: every connection of serve's pools (and its LISTEN connection) is ended.
    let before = db_now(&plane).await;
    cluster.restart();
    plane.repo.app("web", 2, "V = \"r2\"\n");
    plane.repo.commit();
    recovered(&plane, &before, 2, "after a restart").await;
    eprintln!(
        "{TEST}: recovered from the restart at {:?}",
        started.elapsed()
    );

    // A crash: the postmaster SIGKILLed (its backends exit with it), then crash recovery.
    let before = db_now(&plane).await;
    cluster.kill();
    plane.repo.app("web", 2, "V = \"r3\"\n");
    plane.repo.commit();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start();
    recovered(&plane, &before, 3, "after a crash").await;
    eprintln!(
        "{TEST}: recovered from the crash at {:?}",
        started.elapsed()
    );

    // A minute without the database, with a commit made meanwhile.
    let before = db_now(&plane).await;
    cluster.stop();
    proxy.set_mode(Mode::BlackHole);
    let down = Instant::now();
    plane.repo.app("web", 2, "V = \"r4\"\n");
    plane.repo.commit();
    let healthz = format!("{}/healthz", plane.url);
    let readyz = format!("{}/readyz", plane.url);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        status_of(&healthz, Duration::from_secs(5)).await,
        Some(200),
        "/healthz answers while the database is down"
    );
    let ready = status_of(&readyz, Duration::from_secs(15)).await;
    assert_eq!(
        ready,
        Some(503),
        "/readyz says not ready while the database is down"
    );
    while down.elapsed() < OUTAGE {
        assert_eq!(plane.serve_exited(), None, "serve exited during the outage");
        assert_eq!(agent.exited(), None, "agent a exited during the outage");
        assert_eq!(agent_b.exited(), None, "agent b exited during the outage");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster.start();
    eprintln!("{TEST}: database back at {:?}", started.elapsed());
    // `a` is heard at once; `b` a moment later, well within the threshold: neither was ever silent
    // while serve could hear it.
    tokio::time::sleep(B_LATE).await;
    proxy.set_mode(Mode::Pass);
    recovered(&plane, &before, 4, "after a minute-long outage").await;
    assert_eq!(plane.serve_exited(), None, "serve keeps running");
    assert_eq!(agent.exited(), None, "agent a keeps running");
    assert_eq!(agent_b.exited(), None, "agent b keeps running");
    // The nodes were alive all along: nothing moved, nothing ran twice, nothing was stopped.
    assert_eq!(
        placements(&plane).await,
        placed,
        "no replica moved: the nodes were alive, only the database was not"
    );
    for (node, agent) in [("a", &agent), ("b", &agent_b)] {
        let records = agent.records();
        let again = super::repeated_runs(&records);
        assert!(again.is_empty(), "node {node}: {again:?}");
        let stops: Vec<_> = records
            .iter()
            .filter(|r| r["kind"] == "stop" || r["kind"] == "remove")
            .collect();
        assert!(stops.is_empty(), "node {node} stopped nothing: {stops:?}");
    }
    let stuck = plane
        .rows("SELECT id, kind, status, last_error FROM tasks WHERE status IN ('dead', 'failed')")
        .await;
    assert!(stuck.is_empty(), "no task was given up on: {stuck:?}");
    eprintln!(
        "{TEST}: recovered from the outage at {:?}",
        started.elapsed()
    );
}
