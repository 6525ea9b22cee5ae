//! Agents end to end: a real `cairn serve` on PostgreSQL, real `cairn-agent` processes with the recording
//! driver on loopback, and raw HTTP where a test plays a misbehaving agent.

mod events;
mod notify;
pub(crate) mod support;
mod trust;

use std::process::Command;
use std::time::Duration;

use cairn_schema::Identity;
use serde_json::{Value, json};

use support::{CAIRN, FAST, Plane, placements, reported, secret_line, wait_converged, wait_for};

fn heartbeat() -> Value {
    json!({"agent_version": "test", "drivers": ["docker"],
           "resources": {"cpu_millis": 0, "memory_bytes": 0, "disk_bytes": 0}, "replicas": []})
}

fn join_body(token: &str, id: &Identity) -> Value {
    json!({"token": token, "recipient": id.recipient(), "drivers": ["docker", "process"],
           "agent_version": "test"})
}

fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not a JSON error: {body}"))
}

/// A join whose answer was lost is asked again and answered the same: an agent chooses its credential
/// and keeps it (with the token) in `join.json` before it asks, so one killed before the answer came
/// (the node already shown online) joins on its next start without a new token. The same token with
/// another credential or recipient stays refused; a malformed credential is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_asked_again_with_its_own_credential_is_answered_the_same() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("b", "");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let agent = Identity::generate();
    let token = plane.join_token("b");
    let chosen = format!("cairn-node-{}", "ab".repeat(32));
    let with = |credential: &str, id: &Identity| {
        let mut b = join_body(&token, id);
        b["credential"] = json!(credential);
        b
    };
    let (s, body) = plane
        .agent_post("/join", None, &with("cairn-node-short", &agent))
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(error_of(&body).contains("64 hex digits"), "{body}");
    let (s, first) = plane
        .agent_post("/join", None, &with(&chosen, &agent))
        .await;
    assert_eq!(
        (s, first["credential"].as_str()),
        (200, Some(chosen.as_str())),
        "{first}"
    );
    let (s, again) = plane
        .agent_post("/join", None, &with(&chosen, &agent))
        .await;
    assert_eq!((s, again["node"].as_str()), (200, Some("b")), "{again}");
    let other = format!("cairn-node-{}", "cd".repeat(32));
    let (s, body) = plane.agent_post("/join", None, &with(&other, &agent)).await;
    assert_eq!(s, 401, "another credential: {body}");
    let (s, body) = plane
        .agent_post("/join", None, &with(&chosen, &Identity::generate()))
        .await;
    assert_eq!(s, 401, "another recipient: {body}");
    let (s, _) = plane
        .agent_post("/heartbeat", Some(&chosen), &heartbeat())
        .await;
    assert_eq!(s, 200);

    // An agent that asked and was killed before it saved the answer: its data directory holds the
    // pending join only. Started without a token, it joins with it and comes online.
    let dir = plane.scratch.path().join("agent-b");
    std::fs::create_dir_all(&dir).unwrap();
    let id_text = agent.to_file_text("test");
    std::fs::write(dir.join("identity.txt"), id_text.as_bytes()).unwrap();
    std::fs::write(
        dir.join("join.json"),
        json!({"token": token, "credential": chosen}).to_string(),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for f in ["identity.txt", "join.json"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let _b = plane.agent("b", &dir, None, &[], &[]);
    wait_for(
        "b's credential on disk",
        Duration::from_secs(30),
        || async { dir.join("credential.json").exists().then_some(()) },
    )
    .await;
    assert!(
        !dir.join("join.json").exists(),
        "the pending join is forgotten"
    );
    let saved: Value =
        serde_json::from_slice(&std::fs::read(dir.join("credential.json")).unwrap()).unwrap();
    assert_eq!(saved["credential"], chosen.as_str());
    wait_for("b heartbeats", Duration::from_secs(30), || async {
        let r = plane
            .rows("SELECT agent_version FROM node_status WHERE node = 'b'")
            .await;
        (r[0]["agent_version"] != "test").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_joins_once_and_bad_credentials_get_401() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    let pinned = Identity::generate();
    repo.node("a", "");
    repo.node("p", &format!("recipient = \"{}\"\n", pinned.recipient()));
    let plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;

    let agent = Identity::generate();
    let token = plane.join_token("a");
    let (s, first) = plane
        .agent_post("/join", None, &join_body(&token, &agent))
        .await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(
        (first["node"].as_str(), first["installation"].as_str()),
        (Some("a"), Some("cairn"))
    );
    let credential = first["credential"].as_str().unwrap().to_owned();
    assert!(credential.starts_with("cairn-node-"));

    let (s, again) = plane
        .agent_post("/join", None, &join_body(&token, &agent))
        .await;
    assert_eq!(s, 401, "a join token joins once: {again}");
    assert!(error_of(&again).contains("already used"), "{again}");
    let unknown = format!("cairn-join-{}", "0".repeat(64));
    let (s, _) = plane
        .agent_post("/join", None, &join_body(&unknown, &agent))
        .await;
    assert_eq!(s, 401);
    let out = plane.cairn(&["node", "join-token", "a", "--ttl", "1s"]);
    let expiring = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (s, _) = plane
        .agent_post("/join", None, &join_body(&expiring, &agent))
        .await;
    assert_eq!(s, 401, "an expired token");

    // A node that pins a recipient joins with that one only, and a refused attempt keeps the token.
    let tp = plane.join_token("p");
    let (s, body) = plane
        .agent_post("/join", None, &join_body(&tp, &agent))
        .await;
    assert_eq!(s, 403, "{body}");
    assert!(
        error_of(&body).contains(pinned.recipient().as_str()),
        "{body}"
    );
    let (s, body) = plane
        .agent_post("/join", None, &join_body(&tp, &pinned))
        .await;
    assert_eq!(s, 200, "{body}");
    let p_credential = body["credential"].as_str().unwrap().to_owned();

    // Credentials: missing, wrong, garbage -> 401; the real one works.
    let hb = heartbeat();
    for c in [
        None,
        Some(format!("cairn-node-{}", "0".repeat(64))),
        Some("nonsense".to_owned()),
    ] {
        let (s, body) = plane.agent_post("/heartbeat", c.as_deref(), &hb).await;
        assert_eq!(s, 401, "{c:?}: {body}");
        error_of(&body);
    }
    let (s, body) = plane.agent_post("/heartbeat", Some(&credential), &hb).await;
    assert_eq!((s, body["node"].as_str()), (200, Some("a")), "{body}");

    // Stored as a hash only.
    let stored = plane
        .rows("SELECT node, credential_hash FROM node_status ORDER BY node")
        .await;
    assert!(stored.iter().all(|r| {
        r["credential_hash"]
            .as_str()
            .is_some_and(|h| h.starts_with("sha256:"))
    }));
    assert!(!Value::Array(stored).to_string().contains(&credential[11..]));

    // Revoked through the CLI: 401 from then on.
    let out = plane.cairn(&["node", "revoke", "a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, _) = plane.agent_post("/heartbeat", Some(&credential), &hb).await;
    assert_eq!(s, 401, "a revoked credential");
    let (s, _) = plane
        .agent_post(
            "/lease",
            Some(&credential),
            &json!({"max": 1, "wait_ms": 0}),
        )
        .await;
    assert_eq!(s, 401);

    // A node removed from the repository loses its credential.
    let (s, _) = plane
        .agent_post("/heartbeat", Some(&p_credential), &hb)
        .await;
    assert_eq!(s, 200);
    plane.repo.remove("node-p.toml");
    plane.repo.commit();
    plane.wait_generation(2).await;
    let (s, _) = plane
        .agent_post("/heartbeat", Some(&p_credential), &hb)
        .await;
    assert_eq!(s, 401, "the removed node's credential");

    // Bounded and JSON: an oversized body is 413, a malformed one 400.
    let big = json!({"token": "x".repeat(600 * 1024), "recipient": agent.recipient(),
                     "drivers": ["docker"], "agent_version": "t"});
    let (s, body) = plane.agent_post("/join", None, &big).await;
    assert_eq!(s, 413, "{body}");
    error_of(&body);
    let (s, body) = plane.agent_post("/join", None, &json!({"token": 5})).await;
    assert_eq!(s, 400, "{body}");
    error_of(&body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sees_only_its_own_tasks_and_each_task_is_leased_once() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 4, "GREETING = \"hello\"\n");
    let plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let (ca, _) = plane.join_raw("a").await;
    let (cb, _) = plane.join_raw("b").await;
    let ids = |node: &'static str| {
        let plane = &plane;
        async move {
            plane
                .rows(&format!(
                    "SELECT id FROM tasks WHERE node = '{node}' ORDER BY id"
                ))
                .await
                .iter()
                .map(|r| r["id"].as_i64().unwrap())
                .collect::<Vec<i64>>()
        }
    };
    let (a_tasks, b_tasks) = (ids("a").await, ids("b").await);
    assert_eq!(
        (a_tasks.len(), b_tasks.len()),
        (2, 2),
        "the replicas are spread"
    );

    // A can neither see nor touch B's tasks: they do not exist for it.
    for id in &b_tasks {
        let (s, body) = plane.agent_get(&format!("/tasks/{id}"), Some(&ca)).await;
        assert_eq!(s, 404, "{body}");
        for (route, body) in [
            ("progress", json!({"token": 1})),
            ("logs", json!({"token": 1, "lines": []})),
            ("result", json!({"token": 1, "outcome": "done"})),
            ("release", json!({"token": 1})),
        ] {
            let (s, resp) = plane
                .agent_post(&format!("/tasks/{id}/{route}"), Some(&ca), &body)
                .await;
            assert_eq!(s, 404, "{route} of B's task {id} as A: {resp}");
        }
    }

    // Six long-polls of B at once: each of B's tasks goes to exactly one of them.
    let polls: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(support::post_json(
                format!("{}/agent/v1/lease", plane.url),
                Some(cb.clone()),
                json!({"max": 1, "wait_ms": 1500}),
            ))
        })
        .collect();
    let mut results = Vec::new();
    for p in polls {
        results.push(p.await.unwrap());
    }
    let mut got: Vec<(i64, i64)> = Vec::new();
    for (s, body) in &results {
        assert_eq!(*s, 200, "{body}");
        for t in body["tasks"].as_array().unwrap() {
            got.push((t["id"].as_i64().unwrap(), t["token"].as_i64().unwrap()));
        }
    }
    let mut leased: Vec<i64> = got.iter().map(|(id, _)| *id).collect();
    leased.sort();
    assert_eq!(leased, b_tasks, "every task of B once, none of A: {got:?}");

    // A leases its own and only its own.
    let (s, body) = plane
        .agent_post("/lease", Some(&ca), &json!({"max": 10, "wait_ms": 0}))
        .await;
    assert_eq!(s, 200);
    let mut mine: Vec<i64> = body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    mine.sort();
    assert_eq!(mine, a_tasks);

    // Fencing: a wrong token is refused, the right one completes once.
    let (id, token) = got[0];
    let (s, body) = plane
        .agent_post(
            &format!("/tasks/{id}/result"),
            Some(&cb),
            &json!({"token": token + 1000, "outcome": "done"}),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    let (s, body) = plane
        .agent_post(
            &format!("/tasks/{id}/result"),
            Some(&cb),
            &json!({"token": token, "outcome": "done"}),
        )
        .await;
    assert_eq!((s, body["status"].as_str()), (200, Some("done")), "{body}");
    let (s, _) = plane
        .agent_post(
            &format!("/tasks/{id}/result"),
            Some(&cb),
            &json!({"token": token, "outcome": "done"}),
        )
        .await;
    assert_eq!(s, 409, "a finished task takes no second result");
    let (s, view) = plane.agent_get(&format!("/tasks/{id}"), Some(&cb)).await;
    assert_eq!((s, view["status"].as_str()), (200, Some("done")));

    // A deploy that fails for good fails its release, with the reason.
    let (id, token) = got[1];
    let (s, body) = plane
        .agent_post(
            &format!("/tasks/{id}/result"),
            Some(&cb),
            &json!({"token": token, "outcome": "failed", "error": "the build broke", "retry": false}),
        )
        .await;
    assert_eq!((s, body["status"].as_str()), (200, Some("dead")), "{body}");
    let release = plane.rows("SELECT status, error FROM releases").await;
    assert_eq!(release[0]["status"], "failed");
    assert!(
        release[0]["error"]
            .as_str()
            .unwrap()
            .contains("the build broke")
    );
}

/// With `--registry`, the first node to lease a deploy of a release is told to push its image; another
/// node's deploy of the same release waits (without using an attempt) until the push is recorded, is
/// woken by it, and is told to pull that image by digest. A later release with the same build key (an
/// env change) pulls that image on every node; one with a new recipe is pushed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_image_is_pushed_once_and_other_nodes_pull_it_by_digest() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 2, "");
    let registry = "127.0.0.1:5999/cairn-test";
    let args = [
        "--interval",
        "2s",
        "--heartbeat-interval",
        "300ms",
        "--task-lease",
        "60s",
        "--registry",
        registry,
    ];
    let plane = Plane::start(db, repo, scratch, identity, &args).await;
    plane.wait_generation(1).await;
    let (ca, _) = plane.join_raw("a").await;
    let (cb, _) = plane.join_raw("b").await;
    let lease = |credential: &str, wait_ms: u64| {
        let plane = &plane;
        let credential = credential.to_owned();
        async move {
            let (s, body) = plane
                .agent_post(
                    "/lease",
                    Some(&credential),
                    &json!({"max": 10, "wait_ms": wait_ms}),
                )
                .await;
            assert_eq!(s, 200, "{body}");
            body["tasks"].as_array().unwrap().clone()
        }
    };

    // A leases first: it gets the image and pushes it.
    let a_tasks = lease(&ca, 0).await;
    assert_eq!(a_tasks.len(), 1, "one replica per node: {a_tasks:?}");
    let a_task = &a_tasks[0];
    assert_eq!(a_task["deploy"]["push_to"], registry, "{a_task}");
    assert!(a_task["deploy"].get("image").is_none(), "{a_task}");

    // B's deploy of the same release waits for A's push, and the wait costs it no attempt.
    assert_eq!(lease(&cb, 0).await, Vec::<Value>::new());
    let b_row = plane
        .rows("SELECT status, attempts, run_after > now() AS later FROM tasks WHERE node = 'b'")
        .await;
    assert_eq!(
        b_row,
        vec![json!({"status": "queued", "attempts": 0, "later": true})]
    );

    // A reports the pushed image as soon as it is pushed, before its deploy ends; B's long-poll is woken
    // (well before the 5 s wait ends) and told to pull it by digest.
    let digest = format!("sha256:{}", "ab".repeat(32));
    let reference = format!("{registry}/web");
    let image =
        json!({"id": format!("sha256:{}", "cd".repeat(32)), "registry": [reference, digest]});
    let b_poll = tokio::spawn({
        let url = format!("{}/agent/v1/lease", plane.url);
        support::post_json(url, Some(cb.clone()), json!({"max": 10, "wait_ms": 4000}))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, body) = plane
        .agent_post(
            &format!("/tasks/{}/progress", a_task["id"]),
            Some(&ca),
            &json!({"token": a_task["token"], "message": "pushed", "image": image}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = b_poll.await.unwrap();
    assert_eq!(s, 200, "{body}");
    let b_tasks = body["tasks"].as_array().unwrap();
    assert_eq!(b_tasks.len(), 1, "B's deploy is woken by the push: {body}");
    assert_eq!(b_tasks[0]["attempt"], 1, "{body}");
    assert_eq!(
        b_tasks[0]["deploy"]["image"],
        json!({"reference": reference, "digest": digest})
    );
    assert!(b_tasks[0]["deploy"].get("push_to").is_none(), "{body}");

    // A's result repeats the image, and a second push's digest (a node that pushed anyway) does not
    // replace the one B was told to pull.
    let (s, body) = plane
        .agent_post(
            &format!("/tasks/{}/result", a_task["id"]),
            Some(&ca),
            &json!({"token": a_task["token"], "outcome": "done", "image": image}),
        )
        .await;
    assert_eq!((s, body["status"].as_str()), (200, Some("done")), "{body}");
    let (s, body) = plane
        .agent_post(
            &format!("/tasks/{}/result", b_tasks[0]["id"]),
            Some(&cb),
            &json!({"token": b_tasks[0]["token"], "outcome": "done",
                    "image": {"id": image["id"],
                              "registry": [reference, format!("sha256:{}", "ef".repeat(32))]}}),
        )
        .await;
    assert_eq!((s, body["status"].as_str()), (200, Some("done")), "{body}");
    let release = plane
        .rows("SELECT image, image_digest, status FROM releases WHERE app = 'web'")
        .await;
    assert_eq!(
        release,
        vec![json!({"image": reference, "image_digest": digest, "status": "live"})]
    );

    // Release 2 changes only the env: the same build key, so both nodes are told to pull the image
    // release 1 pushed, and nobody pushes or builds. What they ran is recorded on release 2.
    plane.repo.app("web", 2, "GREETING = \"hello\"\n");
    plane.repo.commit();
    wait_release(&plane, 2).await;
    for (credential, node) in [(&ca, "a"), (&cb, "b")] {
        let tasks = lease(credential, 4000).await;
        assert_eq!(tasks.len(), 1, "{node}: {tasks:?}");
        let t = &tasks[0];
        assert_eq!(t["release"], 2, "{t}");
        assert_eq!(
            t["deploy"]["image"],
            json!({"reference": reference, "digest": digest}),
            "{node} pulls release 1's image: {t}"
        );
        assert!(t["deploy"].get("push_to").is_none(), "{t}");
        let (s, body) = plane
            .agent_post(
                &format!("/tasks/{}/result", t["id"]),
                Some(credential),
                &json!({"token": t["token"], "outcome": "done", "image": image}),
            )
            .await;
        assert_eq!((s, body["status"].as_str()), (200, Some("done")), "{body}");
    }
    let keys = plane
        .rows(
            "SELECT number, image, image_digest, status, build_key IS NOT NULL AS keyed, \
                    build_key = (SELECT build_key FROM releases WHERE app = 'web' AND number = 1) \
                        AS shared \
             FROM releases WHERE app = 'web' ORDER BY number",
        )
        .await;
    assert_eq!(
        keys,
        vec![
            json!({"number": 1, "image": reference, "image_digest": digest, "status": "superseded",
                   "keyed": true, "shared": true}),
            json!({"number": 2, "image": reference, "image_digest": digest, "status": "live",
                   "keyed": true, "shared": true}),
        ]
    );

    // Release 3 changes the recipe (the runtime's base image): a new build key, so the first node to
    // lease its deploy is told to push again.
    let web = cairn_testkit::fixtures::runtime("web")
        .drivers(&["docker", "process"])
        .image("debian:13")
        .start("./serve");
    plane.repo.write("runtimes.toml", &web.to_string());
    plane.repo.commit();
    wait_release(&plane, 3).await;
    let tasks = lease(&ca, 4000).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["release"], 3, "{}", tasks[0]);
    assert_eq!(tasks[0]["deploy"]["push_to"], registry, "{}", tasks[0]);
    assert!(tasks[0]["deploy"].get("image").is_none(), "{}", tasks[0]);
}

/// Waits until release `n` of `web` is recorded (the commit making it applied).
async fn wait_release(plane: &Plane, n: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let sql = format!("SELECT number FROM releases WHERE app = 'web' AND number = {n}");
    while plane.rows(&sql).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "release {n} of web never recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_recording_driver_is_refused_outside_tests() {
    let out = std::process::Command::new(support::agent_bin())
        .args(["--server", "http://127.0.0.1:9", "--driver", "recording"])
        .arg("--data-dir")
        .arg(tempfile::tempdir().unwrap().path())
        .env_remove("CAIRN_AGENT_TEST_DRIVER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("for tests only") && err.contains("CAIRN_AGENT_TEST_DRIVER=1"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_lease_expires_and_its_old_token_is_refused() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "GREETING = \"hello\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    // Every task takes a minute: the agent holds the lease, extending it, when it is killed.
    let mut first = plane.agent(
        "a",
        &dir,
        Some(&token),
        &[("CAIRN_AGENT_TEST_DELAY_MS", "60000")],
        &[],
    );
    let leased = wait_for(
        "the deploy to be leased",
        Duration::from_secs(20),
        || async {
            plane
                .rows("SELECT id, lease_token FROM tasks WHERE node = 'a' AND status = 'leased'")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    let (id, old) = (
        leased["id"].as_i64().unwrap(),
        leased["lease_token"].as_i64().unwrap(),
    );
    // Held past its first lease period: the agent extends it.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let still = plane
        .rows(&format!(
            "SELECT status, lease_token FROM tasks WHERE id = {id}"
        ))
        .await;
    assert_eq!(
        (
            still[0]["status"].as_str(),
            still[0]["lease_token"].as_i64()
        ),
        (Some("leased"), Some(old))
    );
    first.kill();

    let second = plane.agent("a", &dir, None, &[], &[]);
    let done = wait_for(
        "the task to be done again",
        Duration::from_secs(30),
        || async {
            plane
                .rows(&format!(
                    "SELECT attempts, lease_token FROM tasks WHERE id = {id} AND status = 'done'"
                ))
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    assert_eq!(done["attempts"].as_i64(), Some(2));
    assert!(done["lease_token"].as_i64().unwrap() > old);
    // The release's outcome is recorded in its own transaction after the task's: wait for it.
    wait_for(
        "its one replica deployed",
        Duration::from_secs(10),
        || async {
            let release = plane.rows("SELECT status FROM releases").await;
            (release[0]["status"] == "live").then_some(())
        },
    )
    .await;
    let deploys: Vec<Value> = second
        .records()
        .into_iter()
        .filter(|r| r["task"] == id)
        .collect();
    assert_eq!(deploys.len(), 1, "run once to completion: {deploys:?}");

    let credential = second.credential();
    for (route, body) in [
        ("result", json!({"token": old, "outcome": "done"})),
        ("progress", json!({"token": old})),
        ("release", json!({"token": old})),
    ] {
        let (s, resp) = plane
            .agent_post(&format!("/tasks/{id}/{route}"), Some(&credential), &body)
            .await;
        assert_eq!(s, 409, "{route} with the killed agent's token: {resp}");
        assert!(error_of(&resp).contains("not leased with token"), "{resp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_stop_an_agent() {
    // Regression (issue 12): SIGHUP's default action ended the agent (a closed terminal, a stray
    // `kill -HUP` from a log rotation script); it has nothing to reload, so it ignores it like serve.
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    let mut agent = plane.agent("a", &dir, Some(&token), &[], &[]);
    let heartbeats = |plane: &Plane| {
        let pool = plane.db.pool().clone();
        async move {
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
                "SELECT last_heartbeat FROM node_status WHERE node = 'a'",
            )
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
        }
    };
    let first = wait_for("a first heartbeat", Duration::from_secs(20), || {
        heartbeats(&plane)
    })
    .await;
    for _ in 0..2 {
        agent.signal(rustix::process::Signal::HUP);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(agent.exited(), None, "the agent survives SIGHUP");
    wait_for("a heartbeat after SIGHUP", Duration::from_secs(20), || {
        let later = heartbeats(&plane);
        async move { later.await.filter(|t| *t > first) }
    })
    .await;
    assert!(agent.terminate(Duration::from_secs(10)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_short_tasks_and_gives_back_long_ones() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 2, "GREETING = \"hello\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    let leased_all = |plane: &Plane| {
        let pool = plane.db.pool().clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'leased'")
                .fetch_one(&pool)
                .await
                .ok()?;
            (n == 2).then_some(())
        }
    };

    // Long tasks, a short grace: the leases are given back, unstarted attempts not counted.
    let mut agent = plane.agent(
        "a",
        &dir,
        Some(&token),
        &[("CAIRN_AGENT_TEST_DELAY_MS", "60000")],
        &["--shutdown-grace", "500ms"],
    );
    wait_for("both deploys leased", Duration::from_secs(20), || {
        leased_all(&plane)
    })
    .await;
    let status = agent.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    let rows = plane
        .rows("SELECT status, attempts FROM tasks ORDER BY id")
        .await;
    assert!(
        rows.iter()
            .all(|r| r["status"] == "queued" && r["attempts"] == 0),
        "{rows:?}"
    );
    assert!(agent.records().is_empty());

    // Short tasks: finished and reported before the agent exits.
    let mut agent = plane.agent(
        "a",
        &dir,
        None,
        &[("CAIRN_AGENT_TEST_DELAY_MS", "1500")],
        &["--shutdown-grace", "20s"],
    );
    // Started, not only leased: a lease whose answer reaches a stopping agent is given back unstarted.
    wait_for("both deploys started", Duration::from_secs(20), || {
        let started = agent.log().matches("task started").count();
        async move { (started == 2).then_some(()) }
    })
    .await;
    let status = agent.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let rows = plane.rows("SELECT status FROM tasks ORDER BY id").await;
    assert!(rows.iter().all(|r| r["status"] == "done"), "{rows:?}");
    assert_eq!(agent.records().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_is_replaced_and_its_duplicates_stop_when_it_returns() {
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
    let before = placements(&plane).await;
    let on_a: Vec<i64> = before
        .iter()
        .filter(|(_, _, n)| n == "a")
        .map(|(_, s, _)| *s)
        .collect();
    assert_eq!(on_a.len(), 1, "spread over both nodes: {before:?}");

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
    wait_for(
        "a's replica to move to b",
        Duration::from_secs(20),
        || async {
            placements(&plane)
                .await
                .iter()
                .all(|(_, _, n)| n == "b")
                .then_some(())
        },
    )
    .await;
    wait_converged(&plane, Duration::from_secs(20)).await;
    assert_eq!(reported(&plane, "b").await.len(), 2);

    // Back: its first heartbeat tells it to stop the duplicate, before it leases anything.
    let a2 = plane.agent("a", &dir_a, None, &[], &[]);
    wait_for(
        "a to stop its duplicate",
        Duration::from_secs(20),
        || async {
            let online = plane
                .rows("SELECT state FROM node_status WHERE node = 'a'")
                .await[0]["state"]
                == "online";
            (online && reported(&plane, "a").await.is_empty()).then_some(())
        },
    )
    .await;
    let records = a2.records();
    let stops: Vec<i64> = records
        .iter()
        .filter(|r| r["via"] == "heartbeat" && r["kind"] == "stop")
        .map(|r| r["slot"].as_i64().unwrap())
        .collect();
    assert_eq!(
        stops, on_a,
        "stopped by the heartbeat's answer: {records:?}"
    );
    assert_eq!(reported(&plane, "b").await.len(), 2, "b keeps both");
    assert!(
        placements(&plane).await.iter().all(|(_, _, n)| n == "b"),
        "nothing moves back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_only_its_node_in_plaintext() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    let canary = format!("canary-{:016x}", rand_u64());
    let secret = secret_line("CANARY", &canary, &identity.recipient());
    repo.node("a", "");
    repo.node("b", "");
    repo.app("shop", 2, &format!("GREETING = \"hello\"\n{secret}"));
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let pending = plane
        .rows("SELECT payload FROM tasks WHERE kind = 'deploy'")
        .await;
    assert!(
        pending
            .iter()
            .all(|r| r["payload"]["secrets_pending"] == true),
        "the nodes had not joined: {pending:?}"
    );
    let (dir_a, dir_b) = (
        plane.scratch.path().join("agent-a"),
        plane.scratch.path().join("agent-b"),
    );
    let (ta, tb) = (plane.join_token("a"), plane.join_token("b"));
    let a = plane.agent("a", &dir_a, Some(&ta), &[], &[]);
    let b = plane.agent("b", &dir_b, Some(&tb), &[], &[]);
    wait_converged(&plane, Duration::from_secs(30)).await;

    // A new release once the nodes are known: sealed when the task is made, not when it is leased.
    plane
        .repo
        .app("shop", 2, &format!("GREETING = \"hi\"\n{secret}"));
    plane.repo.commit();
    plane.wait_generation(2).await;
    wait_for("release 2 everywhere", Duration::from_secs(30), || async {
        let a = reported(&plane, "a").await;
        let b = reported(&plane, "b").await;
        (a.len() == 1 && b.len() == 1 && a[0].2 == 2 && b[0].2 == 2).then_some(())
    })
    .await;

    // The driver got the plaintext, for both releases, on both nodes.
    for agent in [&a, &b] {
        let deploys: Vec<Value> = agent
            .records()
            .into_iter()
            .filter(|r| r["kind"] == "deploy")
            .collect();
        assert_eq!(deploys.len(), 2, "{deploys:?}");
        assert!(
            deploys
                .iter()
                .all(|d| d["env"]["CANARY"] == canary.as_str())
        );
    }

    // Nowhere else: not in PostgreSQL...
    // pg_dump takes a libpq URL: without the client library's own parameters.
    let url = plane.db.url().split('?').next().unwrap().to_owned();
    let dump = Command::new(pg_dump()).arg(&url).output().unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("BEGIN AGE ENCRYPTED FILE") && dump.contains("secret_env"));
    assert!(
        !dump.contains(&canary),
        "the canary is in the database dump"
    );
    // ...nor in any log line of serve or the agents at debug level...
    let logs = plane.logs();
    assert!(logs.len() >= 3);
    for (path, text) in &logs {
        assert!(
            text.contains("DEBUG"),
            "{} is not at debug level",
            path.display()
        );
        assert!(
            !text.contains(&canary),
            "the canary is in {}",
            path.display()
        );
    }
    // ...nor in an API answer.
    let out = plane.cairn(&["token", "create", "--name", "test"]);
    let admin = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    for path in ["/status", "/nodes", "/nodes/a/join-tokens"] {
        let (s, body) = plane.admin_get(path, Some(&admin)).await;
        assert_eq!(s, 200, "{path}: {body}");
        assert!(!body.to_string().contains(&canary), "{path}");
    }
    let task_a: i64 = plane
        .rows("SELECT max(id) AS id FROM tasks WHERE node = 'a' AND kind = 'deploy'")
        .await[0]["id"]
        .as_i64()
        .unwrap();
    let (_, view) = plane
        .agent_get(&format!("/tasks/{task_a}"), Some(&a.credential()))
        .await;
    assert!(!view.to_string().contains(&canary));

    // Each of node a's deploy payloads opens with a's identity and not with b's (the age CLI).
    let payloads = plane
        .rows("SELECT id, payload FROM tasks WHERE node = 'a' AND kind = 'deploy' ORDER BY id")
        .await;
    assert_eq!(payloads.len(), 2, "sealed at lease time, and at enqueue");
    let a_recipient =
        Identity::parse(&std::fs::read_to_string(dir_a.join("identity.txt")).unwrap())
            .unwrap()
            .recipient();
    for p in &payloads {
        let ct = p["payload"]["secret_env"].as_str().expect("sealed");
        assert_eq!(p["payload"]["secret_recipient"], a_recipient.as_str());
        let file = plane.scratch.path().join(format!("env-{}.age", p["id"]));
        std::fs::write(&file, ct).unwrap();
        let with_b = Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(dir_b.join("identity.txt"))
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            !with_b.status.success(),
            "node b decrypted node a's secrets"
        );
        assert!(!String::from_utf8_lossy(&with_b.stdout).contains(&canary));
        let with_a = Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(dir_a.join("identity.txt"))
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            with_a.status.success(),
            "{}",
            String::from_utf8_lossy(&with_a.stderr)
        );
        let env: Value = serde_json::from_slice(&with_a.stdout).unwrap();
        assert_eq!(env, json!({"CANARY": canary}));
    }
}

pub(crate) fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u64::from_le_bytes(b)
}

/// `pg_dump` of the server the tests use (Debian puts it in /usr/lib/postgresql/<major>/bin).
fn pg_dump() -> std::path::PathBuf {
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.path().join("bin/pg_dump")))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| "pg_dump".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_a_live_token_and_shows_the_status_the_database_does() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "address = \"10.9.0.1\"\n");
    repo.node("b", "ingress = false\n");
    repo.app("web", 2, "GREETING = \"hello\"\n");
    // No timer: a reconcile between the two reads would change the last reconciliation they show.
    let mut args = FAST.to_vec();
    args[1] = "1h";
    assert_eq!(args[0], "--interval");
    let mut plane = Plane::start(db, repo, scratch, identity, &args).await;
    plane.wait_generation(1).await;
    let out = plane.cairn(&["token", "create", "--name", "ops"]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("cairn-admin-"));

    for bad in [
        None,
        Some(format!("cairn-admin-{}", "0".repeat(64))),
        Some("garbage".to_owned()),
    ] {
        let (s, body) = plane.admin_get("/status", bad.as_deref()).await;
        assert_eq!(s, 401, "{bad:?}: {body}");
        error_of(&body);
    }
    let (s, _) = plane.admin_get("/status", Some(&token)).await;
    assert_eq!(s, 200);

    // A join token made through the API joins.
    let server = plane.url.clone();
    let remote = |args: &[&str]| {
        Command::new(CAIRN)
            .args(args)
            .env("CAIRN_SERVER", &server)
            .env("CAIRN_TOKEN", &token)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap()
    };
    let out = remote(&["node", "join-token", "a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ta = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let tb = plane.join_token("b");
    let (dir_a, dir_b) = (
        plane.scratch.path().join("agent-a"),
        plane.scratch.path().join("agent-b"),
    );
    let mut a = plane.agent("a", &dir_a, Some(&ta), &[], &[]);
    let mut b = plane.agent("b", &dir_b, Some(&tb), &[], &[]);
    wait_converged(&plane, Duration::from_secs(30)).await;
    let (s, nodes) = plane.admin_get("/nodes", Some(&token)).await;
    assert_eq!(s, 200);
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    assert!(
        nodes[0]["has_credential"] == true && nodes[0]["replicas"].as_array().unwrap().len() == 1
    );

    // Stop the agents and let the nodes go offline, so nothing changes between the two reads.
    assert!(a.terminate(Duration::from_secs(10)).success());
    assert!(b.terminate(Duration::from_secs(10)).success());
    wait_for("both nodes offline", Duration::from_secs(20), || async {
        let r = plane
            .rows("SELECT count(*) AS n FROM node_status WHERE state = 'offline'")
            .await;
        (r[0]["n"] == 2).then_some(())
    })
    .await;
    let token_file = plane.scratch.path().join("admin-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    for json in [true, true, true, false, false, false] {
        let mut args = vec!["status"];
        if json {
            args.push("--json");
        }
        let via_api = remote(&args);
        assert!(
            via_api.status.success(),
            "{}",
            String::from_utf8_lossy(&via_api.stderr)
        );
        let via_file = Command::new(CAIRN)
            .args(&args)
            .arg("--server")
            .arg(&plane.url)
            .arg("--token-file")
            .arg(&token_file)
            .env_remove("CAIRN_TOKEN")
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        let mut db_args = args.clone();
        db_args.extend(["--node-offline-after", "3s"]);
        let via_db = plane.cairn(&db_args);
        assert!(
            via_db.status.success(),
            "{}",
            String::from_utf8_lossy(&via_db.stderr)
        );
        // The liveness monitor's last wake-up may still be reconciling: read until the API shows the
        // same twice around the database read.
        let again = remote(&args);
        if again.stdout != via_api.stdout {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        assert_eq!(
            String::from_utf8_lossy(&via_api.stdout),
            String::from_utf8_lossy(&via_db.stdout)
        );
        assert_eq!(via_file.stdout, via_db.stdout);
        if !json {
            let text = String::from_utf8_lossy(&via_db.stdout);
            assert!(
                text.contains("offline") && text.contains("RUNNING"),
                "{text}"
            );
            // Both nodes are offline: no healthy replica anywhere, and a still takes the traffic.
            assert!(
                text.contains("no healthy replica: requests answer 503; ingress nodes a (offline)"),
                "{text}"
            );
            assert!(
                text.contains("internal  no address: serves only its own replicas"),
                "{text}"
            );
        } else {
            // (Whichever node went silent first had its replica moved to the other meanwhile.)
            let s: Value = serde_json::from_slice(&via_db.stdout).unwrap();
            assert_eq!(s["nodes"][0]["agent"]["running"], 1, "{s}");
            let replicas = s["apps"][0]["replicas"].as_array().unwrap();
            assert!(
                replicas.iter().any(|r| r["actual"]["state"] == "running"),
                "{s}"
            );
            assert_eq!(
                (&s["nodes"][0]["address"], &s["nodes"][0]["ingress"]),
                (&json!("10.9.0.1:80"), &json!(true)),
                "{s}"
            );
            assert_eq!(s["nodes"][1]["ingress"], false, "{s}");
            assert_eq!(s["apps"][0]["hosts"].as_array().unwrap().len(), 1, "{s}");
            assert_eq!(s["apps"][0]["healthy_nodes"], json!([]), "{s}");
            assert_eq!(s["apps"][0]["ingress_nodes"], json!(["a"]), "{s}");
        }
    }

    // Revoked: refused, and the CLI says so.
    let out = plane.cairn(&["token", "revoke", "ops"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, _) = plane.admin_get("/status", Some(&token)).await;
    assert_eq!(s, 401);
    let out = remote(&["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

/// Issue 16: serve's keep-alive idle timeout (hyper 1.12 runs it as the
/// header-read timeout) was 30 s, the agents' heartbeat interval, so each HTTP/1.1 heartbeat raced the
/// close of its own connection and most opened a new one through the listen queue. Through a proxy
/// that counts connections: over HTTP/1.1 (`--http2 never`), with an idle timeout longer than the
/// interval an agent's heartbeats keep their connection; with one equal to it (the old defaults, scaled
/// down), they open one nearly every time. Over HTTP/2 (the default, h2c to a plain-http serve) every
/// call shares one connection that the long-poll keeps busy, so even that idle timeout opens none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_keeps_its_connection_between_heartbeats_over_http2_or_a_longer_idle_timeout() {
    const HEARTBEATS: u32 = 12;
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    let mut args = support::fast_with("--heartbeat-interval", "500ms");
    args.extend(["--http-header-timeout", "3s"]);
    let mut plane = Plane::start(db, repo, scratch, identity, &args).await;
    plane.wait_generation(1).await;
    let addr = |url: &str| url.trim_start_matches("http://").parse().unwrap();
    let proxy = cairn_testkit::proxy::Proxy::start(addr(&plane.url)).await;
    plane.agent_server = Some(proxy.url());
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    // As often as serve asks (the tests' agents otherwise beat every 300 ms, whatever it asks).
    let http1 = ["--heartbeat", "500ms", "--http2", "never"];
    let mut a = plane.agent("a", &dir, Some(&token), &[], &http1);
    let kept = opened_over_heartbeats(&plane, &proxy, HEARTBEATS, "a 3 s idle timeout").await;
    assert!(
        kept <= 1,
        "{HEARTBEATS} heartbeats opened {kept} connections with an idle timeout six times the interval"
    );

    // The control: the idle timeout equal to the interval.
    plane.kill_serve();
    let mut args = support::fast_with("--heartbeat-interval", "500ms");
    args.extend(["--http-header-timeout", "500ms"]);
    plane.restart_serve_with(&args).await;
    proxy.set_upstream(addr(&plane.url));
    let log = std::fs::read_to_string(plane.serve_log()).unwrap();
    assert!(
        log.contains("not longer than --heartbeat-interval"),
        "serve warns of the setting: {log}"
    );
    let reopened =
        opened_over_heartbeats(&plane, &proxy, HEARTBEATS, "a 500 ms idle timeout").await;
    assert!(
        reopened >= u64::from(HEARTBEATS) / 3,
        "{HEARTBEATS} heartbeats opened only {reopened} connections with an idle timeout equal to the \
         interval: the control shows nothing"
    );

    // The same agent over HTTP/2, against the same short idle timeout.
    a.kill();
    let _a = plane.agent("a", &dir, None, &[], &["--heartbeat", "500ms"]);
    let multiplexed =
        opened_over_heartbeats(&plane, &proxy, HEARTBEATS, "HTTP/2, a 500 ms idle timeout").await;
    eprintln!(
        "{HEARTBEATS} heartbeats opened {kept} connections (HTTP/1.1, 3 s idle), {reopened} (HTTP/1.1, \
         500 ms idle), {multiplexed} (HTTP/2, 500 ms idle)"
    );
    assert_eq!(
        multiplexed, 0,
        "over HTTP/2 the long-poll keeps the one connection busy, so no heartbeat opens another"
    );
}

/// An agent whose control plane sits behind a proxy that speaks only HTTP/1.1 (nginx, as many
/// deployments have) finds out once that h2c is not answered there, and works over HTTP/1.1: it joins,
/// heartbeats and runs its deploy, every call through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_an_http1_proxy_speaks_http1() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "GREETING = \"hello\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let upstream = plane.url.trim_start_matches("http://").parse().unwrap();
    let test = cairn_testkit::skip::current_test();
    let Some(nginx) = cairn_testkit::nginx::Nginx::start(&test, plane.scratch.path(), upstream)
    else {
        return;
    };
    plane.agent_server = Some(nginx.url());
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    let a = plane.agent("a", &dir, Some(&token), &[], &[]);
    wait_converged(&plane, Duration::from_secs(60)).await;
    assert!(
        a.records()
            .iter()
            .any(|r| r["via"] == "task" && r["kind"] == "deploy" && r["app"] == "web"),
        "web deployed: {:?}",
        a.records()
    );
    let agent_log = a.log();
    assert!(
        agent_log.contains("does not answer HTTP/2 over plain http: using HTTP/1.1"),
        "the agent says why it speaks HTTP/1.1: {agent_log}"
    );
    let access = nginx.access_log();
    for route in ["/agent/v1/join", "/agent/v1/heartbeat", "/agent/v1/lease"] {
        assert!(
            access.contains(&format!("POST {route} HTTP/1.1\" 200")),
            "{route} answered through nginx: {access}"
        );
    }
    assert!(
        access.contains("PRI * HTTP/2.0\" 400"),
        "nginx refused the h2c preface: {access}"
    );
}

/// The connections node `a`'s agent opened through `proxy` over its next `heartbeats` heartbeats (each
/// moves `last_heartbeat`, polled ten times per interval here), from a settled start (its first
/// heartbeat and long-polls done).
async fn opened_over_heartbeats(
    plane: &Plane,
    proxy: &cairn_testkit::proxy::Proxy,
    heartbeats: u32,
    with: &str,
) -> u64 {
    let last = || async {
        plane
            .rows("SELECT last_heartbeat::text AS t FROM node_status WHERE node = 'a'")
            .await
            .first()
            .and_then(|r| r["t"].as_str().map(str::to_owned))
    };
    wait_for("a first heartbeat", Duration::from_secs(30), || async {
        last().await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = proxy.accepted();
    let mut seen = std::collections::BTreeSet::new();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() <= heartbeats as usize && std::time::Instant::now() < until {
        seen.extend(last().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen.len() > heartbeats as usize,
        "with {with}: only {} heartbeats in 30 s",
        seen.len()
    );
    proxy.accepted() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_without_a_new_commit() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "GREETING = \"hello\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    let mut a = plane.agent("a", &dir, Some(&token), &[], &[]);
    wait_converged(&plane, Duration::from_secs(30)).await;
    assert!(a.terminate(Duration::from_secs(10)).success());
    let applied = plane
        .rows("SELECT count(*) AS n FROM reconciliations WHERE status = 'applied'")
        .await[0]["n"]
        .clone();

    // The node lost web's replica and runs one nobody placed.
    std::fs::write(
        dir.join("book.json"),
        serde_json::to_vec(
            &json!({"ghost/1": {"release": 3, "generation": 1, "state": "running",
            "limits": {"cpu_millis": 250, "memory_bytes": 268435456, "disk_bytes": 0}}}),
        )
        .unwrap(),
    )
    .unwrap();
    let a = plane.agent("a", &dir, None, &[], &[]);
    let kinds = |a: &support::Agent| -> Vec<(String, String)> {
        a.records()
            .iter()
            .filter(|r| r["via"] == "task")
            .map(|r| {
                (
                    r["kind"].as_str().unwrap().into(),
                    r["app"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    wait_for("the drift to be repaired", Duration::from_secs(30), || {
        let k = kinds(&a);
        async move {
            let deploys = k
                .iter()
                .filter(|x| *x == &("deploy".into(), "web".into()))
                .count();
            (deploys == 2 && k.contains(&("remove".into(), "ghost".into()))).then_some(())
        }
    })
    .await;
    wait_for(
        "the node to report the repair",
        Duration::from_secs(10),
        || async {
            (reported(&plane, "a").await == [("web".to_owned(), 1, 1, "running".to_owned())])
                .then_some(())
        },
    )
    .await;
    let drift = plane
        .rows("SELECT kind, app, status FROM tasks WHERE dedup_key LIKE 'drift:%' ORDER BY id")
        .await;
    assert_eq!(drift.len(), 2, "each repair once: {drift:?}");
    assert!(drift.iter().all(|t| t["status"] == "done"));
    // Each repair is announced once, in the transaction that enqueued it.
    let events = plane
        .rows(
            "SELECT app, node, detail->>'task' AS task FROM events WHERE kind = 'drift.repaired' ORDER BY app",
        )
        .await;
    let events: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("app"), s("node"), s("task"))
        })
        .collect();
    assert_eq!(
        events,
        [
            ("ghost".to_owned(), "a".to_owned(), "remove".to_owned()),
            ("web".to_owned(), "a".to_owned(), "deploy".to_owned())
        ]
    );
    let now = plane
        .rows("SELECT count(*) AS n FROM reconciliations WHERE status = 'applied'")
        .await[0]["n"]
        .clone();
    assert_eq!(now, applied, "no new commit was applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_table_long_polls_by_generation_and_seals_the_hop_key_to_each_node() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "address = \"10.9.0.2:8000\"\n");
    repo.node("b", "address = \"10.9.0.3\"\ningress = false\n");
    repo.app("web", 1, "");
    let plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;

    let (s, body) = plane.agent_get("/routes", None).await;
    assert_eq!(s, 401, "{body}");
    let (ca, ida) = plane.join_raw("a").await;
    let (cb, idb) = plane.join_raw("b").await;
    let (s, _) = plane.agent_get("/routes?wait_ms=soon", Some(&ca)).await;
    assert_eq!(s, 400, "a malformed query is the client's mistake");

    // The first poll answers at once: every node's address (port filled in), every app's hosts.
    // (The TLS table is handed out once the first apply since serve started told it the apps' own
    // certificates: a moment after the generation is visible.)
    let first = wait_for("a whole first answer", Duration::from_secs(10), || async {
        let (s, body) = plane.agent_get("/routes?wait_ms=0", Some(&ca)).await;
        assert_eq!(s, 200, "{body}");
        body.get("tls").is_some().then_some(body)
    })
    .await;
    let table = &first["table"];
    assert_eq!(table["nodes"][0]["name"], "a");
    assert_eq!(table["nodes"][0]["address"], "10.9.0.2:8000");
    assert_eq!(table["nodes"][1]["address"], "10.9.0.3:80");
    assert_eq!(table["nodes"][1]["ingress"], false);
    assert_eq!(table["apps"][0]["app"], "web");
    assert_eq!(table["apps"][0]["hosts"], json!(["web.apps.test"]));
    assert_eq!(
        table["apps"][0]["nodes"],
        json!([]),
        "no replica is healthy yet"
    );
    let generation = table["generation"].as_str().unwrap().to_owned();
    // No certificate yet: an empty TLS table, with its own generation.
    assert_eq!(first["tls"]["certificates"], json!([]), "{first}");
    let tls = first["tls"]["generation"].as_str().unwrap().to_owned();

    // The hop key comes sealed to the asking node alone; every node gets the same key.
    let sealed = &first["hop_key"];
    let key_id = sealed["id"].as_str().unwrap().to_owned();
    let ct = cairn_schema::Ciphertext::new(sealed["ciphertext"].as_str().unwrap()).unwrap();
    let key = ida.decrypt(&ct).unwrap().expose_str().unwrap().to_owned();
    assert_eq!(key.len(), 64, "32 bytes in hex");
    assert!(idb.decrypt(&ct).is_err(), "sealed to node a only");
    let (_, for_b) = plane.agent_get("/routes?wait_ms=0", Some(&cb)).await;
    let ct_b =
        cairn_schema::Ciphertext::new(for_b["hop_key"]["ciphertext"].as_str().unwrap()).unwrap();
    assert_eq!(idb.decrypt(&ct_b).unwrap().expose_str().unwrap(), key);

    // Holding the table and the key: nothing until the wait runs out (204), and nothing is sent.
    let t = std::time::Instant::now();
    let (s, body) = plane
        .agent_get(
            &format!("/routes?generation={generation}&key={key_id}&tls={tls}&wait_ms=400"),
            Some(&ca),
        )
        .await;
    assert_eq!(s, 204, "{body}");
    assert!(
        t.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t.elapsed()
    );
    // Holding the table but not the key: at once, with the key.
    let t = std::time::Instant::now();
    let (s, body) = plane
        .agent_get(
            &format!("/routes?generation={generation}&tls={tls}&wait_ms=20000"),
            Some(&ca),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(body["hop_key"]["ciphertext"].is_string());
    assert!(
        body.get("table").is_none() && body.get("tls").is_none(),
        "only what changed: {body}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A long-poll waiting on the current table is answered by the next change: a new app applied.
    let poll = {
        let (url, ca) = (
            format!(
                "{}/agent/v1/routes?generation={generation}&key={key_id}&tls={tls}&wait_ms=25000",
                plane.url
            ),
            ca.clone(),
        );
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .get(url)
                .bearer_auth(ca)
                .send()
                .await
                .unwrap();
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    plane.repo.app("api", 1, "");
    plane.repo.commit();
    let (s, changed) = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .expect("the long-poll is answered by the change")
        .unwrap();
    assert_eq!(s, 200, "{changed}");
    assert_ne!(changed["table"]["generation"], generation.as_str());
    assert_eq!(changed["table"]["apps"][0]["app"], "api");
    assert!(
        changed.get("hop_key").is_none(),
        "the key is not sent again: {changed}"
    );

    // The key's plaintext is in no log.
    for (path, text) in plane.logs() {
        assert!(!text.contains(&key), "{} holds the hop key", path.display());
    }
}
