//! Events (issue 17) with a real `cairn serve` and real agents on the recording driver: each written
//! once, in the transaction of its cause, readable through `cairn events` (database and admin API).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::support::{CAIRN, FAST, Plane, wait_converged, wait_for};

/// The events of `node` or `app`, oldest first, as `cairn events --json` prints them from the database.
fn events(plane: &Plane, app: Option<&str>) -> Vec<Value> {
    let mut args = vec!["events", "--json", "--limit", "1000"];
    if let Some(a) = app {
        args.extend(["--app", a]);
    }
    let out = plane.cairn(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn kinds(events: &[Value], node: Option<&str>) -> Vec<String> {
    events
        .iter()
        .filter(|e| node.is_none_or(|n| e["node"] == n))
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_past_the_threshold_gives_one_offline_and_one_online_event() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 2, "GREETING = \"hello\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let (dir_a, dir_b) = (
        plane.scratch.path().join("agent-a"),
        plane.scratch.path().join("agent-b"),
    );
    let (ta, tb) = (plane.join_token("a"), plane.join_token("b"));
    let mut a = plane.agent("a", &dir_a, Some(&ta), &[], &[]);
    let _b = plane.agent("b", &dir_b, Some(&tb), &[], &[]);
    wait_converged(&plane, Duration::from_secs(30)).await;

    // The first apply and the deploy of release 1: one started, one succeeded, with the commit.
    let web = wait_for(
        "web's release 1 to succeed",
        Duration::from_secs(20),
        || async {
            let e = events(&plane, Some("web"));
            kinds(&e, None)
                .contains(&"deploy.succeeded".to_owned())
                .then_some(e)
        },
    )
    .await;
    assert_eq!(
        kinds(&web, None),
        ["deploy.started", "deploy.succeeded"],
        "{web:#?}"
    );
    for e in &web {
        assert_eq!(e["release"], 1);
        assert_eq!(e["commit"], super::support::COMMIT);
    }
    let all = events(&plane, None);
    assert_eq!(
        kinds(&all, None)
            .iter()
            .filter(|k| *k == "apply.succeeded")
            .count(),
        1,
        "{all:#?}"
    );

    a.kill();
    wait_for(
        "node a to be marked offline",
        Duration::from_secs(20),
        || async {
            let r = plane
                .rows("SELECT state FROM node_status WHERE node = 'a'")
                .await;
            (r[0]["state"] == "offline").then_some(())
        },
    )
    .await;
    // Several liveness checks later it is still one event.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(kinds(&events(&plane, None), Some("a")), ["node.offline"]);

    let _a2 = plane.agent("a", &dir_a, None, &[], &[]);
    wait_for("node a to be online", Duration::from_secs(20), || async {
        let r = plane
            .rows("SELECT state FROM node_status WHERE node = 'a'")
            .await;
        (r[0]["state"] == "online").then_some(())
    })
    .await;
    // Heartbeats go on; nothing more is written for a.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = events(&plane, None);
    assert_eq!(
        kinds(&all, Some("a")),
        ["node.offline", "node.online"],
        "{all:#?}"
    );
    assert!(kinds(&all, Some("b")).is_empty(), "{all:#?}");

    // The admin API gives the same events; `--app` and `after` filter them.
    let out = plane.cairn(&["token", "create", "--name", "ops"]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (s, body) = plane.admin_get("/events?limit=1000", Some(&token)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body.as_array().unwrap(), &all);
    let first = all[0]["id"].as_i64().unwrap();
    let (s, body) = plane
        .admin_get(&format!("/events?after={first}&app=web"), Some(&token))
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body.as_array()
            .unwrap()
            .iter()
            .all(|e| e["app"] == "web" && e["id"].as_i64() > Some(first)),
        "{body}"
    );
    let (s, _) = plane.admin_get("/events", None).await;
    assert_eq!(s, 401);
    let (s, _) = plane.admin_get("/events?limit=0", Some(&token)).await;
    assert_eq!(s, 400);
    let out = Command::new(CAIRN)
        .args(["events", "--app", "web"])
        .env("CAIRN_SERVER", &plane.url)
        .env("CAIRN_TOKEN", &token)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines().count() == 2 && text.contains("deploy.succeeded"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_its_health_check_gives_exactly_one_deploy_failed() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 2, "GREETING = \"hello\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    let _a = plane.agent("a", &dir, Some(&token), &[], &[]);
    wait_converged(&plane, Duration::from_secs(30)).await;

    // Release 2 fails its health check on both replicas.
    plane.repo.app(
        "web",
        2,
        "GREETING = \"hello\"\nRECORDING_UNHEALTHY = \"GET /healthz answered 500\"\n",
    );
    plane.repo.commit();
    let failed = wait_for("release 2 to fail", Duration::from_secs(30), || async {
        let e = events(&plane, Some("web"));
        e.iter().any(|e| e["kind"] == "deploy.failed").then_some(e)
    })
    .await;
    // The other replica's failure and the following reconciles add nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = events(&plane, Some("web"));
    let failed_events: Vec<&Value> = all
        .iter()
        .filter(|e| e["kind"] == "deploy.failed")
        .collect();
    assert_eq!(failed_events.len(), 1, "{all:#?}");
    let e = failed_events[0];
    assert_eq!(e["app"], "web");
    assert_eq!(e["release"], 2);
    assert_eq!(e["commit"], super::support::COMMIT);
    assert_eq!(e["severity"], "error");
    assert_eq!(e["node"], "a");
    let reason = e["detail"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("health check") && reason.contains("answered 500"),
        "{reason}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("answered 500"),
        "{e}"
    );
    assert!(failed.len() <= all.len());
}
