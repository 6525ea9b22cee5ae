//! Issue 12, "the truth about releases, and nodes that cannot poison each other": a real `cairn serve` on
//! PostgreSQL, raw HTTP where a test plays a node (a stale one, a partitioned one, a hostile one), and a
//! real `cairn-agent` on the recording driver where the agent's own answer matters.

use std::time::Duration;

use serde_json::{Value, json};

use super::support::{FAST, Plane, fast_with, placements, wait_converged, wait_for};

/// FAST, but no node goes offline while a test plays it by hand without heartbeats.
fn patient() -> Vec<&'static str> {
    fast_with("--node-offline-after", "120s")
}

fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not a JSON error: {body}"))
}

/// The node's tasks of one lease (waiting up to `wait_ms`).
async fn lease(plane: &Plane, credential: &str, wait_ms: u64) -> Vec<Value> {
    let (s, body) = plane
        .agent_post(
            "/lease",
            Some(credential),
            &json!({"max": 10, "wait_ms": wait_ms}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    body["tasks"].as_array().unwrap().clone()
}

/// Reports `outcome` (with its fields) for a leased task; returns the status and body.
async fn report(plane: &Plane, credential: &str, task: &Value, outcome: Value) -> (u16, Value) {
    let mut body = outcome;
    body["token"] = task["token"].clone();
    plane
        .agent_post(
            &format!("/tasks/{}/result", task["id"]),
            Some(credential),
            &body,
        )
        .await
}

/// `(number, status)` of an app's releases, oldest first.
async fn releases(plane: &Plane, app: &str) -> Vec<(i64, String)> {
    plane
        .rows(&format!(
            "SELECT number, status FROM releases WHERE app = '{app}' ORDER BY number"
        ))
        .await
        .iter()
        .map(|r| {
            (
                r["number"].as_i64().unwrap(),
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A copy of task `id` under a new dedup key (`key`), as a stale lease or an older control plane leaves
/// one: the same deploy, release and generation. Returns its id.
async fn copy_task(plane: &Plane, id: i64, key: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO tasks (node, kind, app, slot, release, generation, payload, dedup_key) \
         SELECT node, kind, app, slot, release, generation, payload, $2 FROM tasks WHERE id = $1 \
         RETURNING id",
    )
    .bind(id)
    .bind(key)
    .fetch_one(plane.db.pool())
    .await
    .unwrap()
}

/// Issue 12: a stale lease's late answer made an older, never-run release `live` and marked the one
/// really running superseded (so the next failed release rolled back to one that never ran). A "done"
/// for a generation older than one the node already finished for the slot is counted as superseded: the
/// release stays as it was, and the live one stays live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_done_for_an_older_generation_never_makes_its_release_live() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "GREETING = \"one\"\n");
    let plane = Plane::start(db, repo, scratch, identity, &patient()).await;
    plane.wait_generation(1).await;
    let (ca, _) = plane.join_raw("a").await;

    let first = lease(&plane, &ca, 2000).await;
    assert_eq!(first.len(), 1, "{first:?}");
    let (s, body) = report(&plane, &ca, &first[0], json!({"outcome": "done"})).await;
    assert_eq!((s, body["status"].as_str()), (200, Some("done")), "{body}");
    assert_eq!(releases(&plane, "web").await, [(1, "live".to_owned())]);

    plane.repo.app("web", 1, "GREETING = \"two\"\n");
    plane.repo.commit();
    plane.wait_generation(2).await;
    let second = lease(&plane, &ca, 2000).await;
    assert_eq!(
        (second.len(), second[0]["release"].as_i64()),
        (1, Some(2)),
        "{second:?}"
    );
    let (s, body) = report(&plane, &ca, &second[0], json!({"outcome": "done"})).await;
    assert_eq!((s, body["status"].as_str()), (200, Some("done")), "{body}");
    let before = releases(&plane, "web").await;
    assert_eq!(before, [(1, "superseded".into()), (2, "live".into())]);

    // Release 1's deploy of the slot again, at generation 1: the node has finished generation 2 there,
    // so this "done" (an older agent's answer for a deploy it skipped) is no replica that ran.
    let stale = copy_task(&plane, first[0]["id"].as_i64().unwrap(), "stale-done").await;
    let again = lease(&plane, &ca, 2000).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["id"].as_i64(), Some(stale));
    let (s, body) = report(&plane, &ca, &again[0], json!({"outcome": "done"})).await;
    assert_eq!(
        (s, body["status"].as_str()),
        (200, Some("superseded")),
        "{body}"
    );
    assert_eq!(
        releases(&plane, "web").await,
        before,
        "release 1 never ran again, and release 2 still runs"
    );
    let row = plane
        .rows(&format!(
            "SELECT status, last_error FROM tasks WHERE id = {stale}"
        ))
        .await;
    assert_eq!(row[0]["status"], "superseded", "{row:?}");

    // A skipped report is its own outcome, and never done either.
    let stale = copy_task(&plane, first[0]["id"].as_i64().unwrap(), "stale-skipped").await;
    let again = lease(&plane, &ca, 2000).await;
    assert_eq!(again[0]["id"].as_i64(), Some(stale), "{again:?}");
    let (s, body) = report(
        &plane,
        &ca,
        &again[0],
        json!({"outcome": "skipped", "slot_generation": 2}),
    )
    .await;
    assert_eq!(
        (s, body["status"].as_str()),
        (200, Some("superseded")),
        "{body}"
    );
    assert_eq!(releases(&plane, "web").await, before);
    let (s, body) = report(&plane, &ca, &again[0], json!({"outcome": "done"})).await;
    assert_eq!(s, 409, "a skipped task takes no later result: {body}");

    // The next release fails: the app rolls back to release 2, which runs, never to release 1.
    plane.repo.app("web", 1, "GREETING = \"three\"\n");
    plane.repo.commit();
    plane.wait_generation(3).await;
    let third = lease(&plane, &ca, 2000).await;
    assert_eq!(third[0]["release"].as_i64(), Some(3), "{third:?}");
    let (s, body) = report(
        &plane,
        &ca,
        &third[0],
        json!({"outcome": "failed", "error": "the build broke", "retry": false}),
    )
    .await;
    assert_eq!((s, body["status"].as_str()), (200, Some("dead")), "{body}");
    let back = wait_for(
        "the automatic rollback",
        Duration::from_secs(30),
        || async {
            let r = plane
                .rows("SELECT release FROM placements WHERE app = 'web'")
                .await;
            let release = r[0]["release"].as_i64().unwrap();
            (release != 3).then_some(release)
        },
    )
    .await;
    assert_eq!(back, 2, "rolled back to the release that ran");
}

/// Issue 12, the agent's end: a deploy whose slot already holds a newer generation is reported as
/// skipped (it used to be reported done, and made its never-run release live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reports_a_deploy_it_skipped_as_skipped_not_done() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "GREETING = \"one\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let token = plane.join_token("a");
    let dir = plane.scratch.path().join("agent-a");
    let agent = plane.agent("a", &dir, Some(&token), &[], &[]);
    wait_converged(&plane, Duration::from_secs(30)).await;
    let first: i64 = plane
        .rows("SELECT id FROM tasks WHERE app = 'web' AND release = 1 AND kind = 'deploy'")
        .await[0]["id"]
        .as_i64()
        .unwrap();

    plane.repo.app("web", 1, "GREETING = \"two\"\n");
    plane.repo.commit();
    plane.wait_generation(2).await;
    wait_for("release 2 to go live", Duration::from_secs(30), || async {
        (releases(&plane, "web").await == [(1, "superseded".into()), (2, "live".into())])
            .then_some(())
    })
    .await;

    let stale = copy_task(&plane, first, "stale-for-the-agent").await;
    let row = wait_for(
        "the agent to answer the stale deploy",
        Duration::from_secs(30),
        || async {
            let r = plane
                .rows(&format!(
                    "SELECT status, last_error FROM tasks WHERE id = {stale}"
                ))
                .await;
            (!["queued", "leased"].contains(&r[0]["status"].as_str().unwrap()))
                .then(|| r[0].clone())
        },
    )
    .await;
    assert_eq!(row["status"], "superseded", "{row}");
    assert!(
        row["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("skipped: the slot holds generation 2")),
        "the agent itself said it skipped: {row}"
    );
    assert_eq!(
        releases(&plane, "web").await,
        [(1, "superseded".into()), (2, "live".into())]
    );
    let deploys_of_1 = agent
        .records()
        .iter()
        .filter(|r| r["kind"] == "deploy" && r["release"] == 1)
        .count();
    assert_eq!(deploys_of_1, 1, "release 1 ran once, before release 2");
}

/// Issue 12: after a partition heals, the returning node started the deploy of the replica that had
/// moved away (briefly a second instance). Moving the slot supersedes the old node's open tasks for it:
/// the stale lease's completion is refused and its next lease carries no deploy of the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_slot_supersedes_the_old_nodes_tasks_and_refuses_its_stale_lease() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 1, "");
    let plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let (ca, _) = plane.join_raw("a").await;
    let (cb, _) = plane.join_raw("b").await;
    let placed = placements(&plane).await;
    assert_eq!(placed.len(), 1, "{placed:?}");
    let (x, cx, y, cy) = if placed[0].2 == "a" {
        ("a", ca, "b", cb)
    } else {
        ("b", cb, "a", ca)
    };

    // X leases the deploy, then falls silent; Y keeps heartbeating.
    let mine = lease(&plane, &cx, 2000).await;
    assert_eq!(mine.len(), 1, "{mine:?}");
    let deploy = mine[0].clone();
    assert_eq!(deploy["kind"], "deploy");
    let beat = tokio::spawn({
        let url = format!("{}/agent/v1/heartbeat", plane.url);
        let cy = cy.clone();
        async move {
            loop {
                let hb = json!({"agent_version": "test", "drivers": ["docker"],
                    "resources": {"cpu_millis": 0, "memory_bytes": 0, "disk_bytes": 0},
                    "replicas": []});
                super::support::post_json(url.clone(), Some(cy.clone()), hb).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    wait_for(
        "the slot to move off the silent node",
        Duration::from_secs(30),
        || async {
            let p = placements(&plane).await;
            (p.len() == 1 && p[0].2 == y).then_some(())
        },
    )
    .await;
    beat.abort();
    let row = plane
        .rows(&format!(
            "SELECT status, lease_token FROM tasks WHERE id = {}",
            deploy["id"]
        ))
        .await;
    assert_eq!(
        (row[0]["status"].as_str(), row[0]["lease_token"].as_i64()),
        (Some("superseded"), deploy["token"].as_i64()),
        "retired with the move, its token kept so the holder is refused: {row:?}"
    );

    // X comes back: its lease's progress and completion are refused, and it gets no deploy of the slot.
    let (s, body) = plane
        .agent_post(
            &format!("/tasks/{}/progress", deploy["id"]),
            Some(&cx),
            &json!({"token": deploy["token"], "message": "still building"}),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    let (s, body) = report(&plane, &cx, &deploy, json!({"outcome": "done"})).await;
    assert_eq!(s, 409, "the stale lease's completion: {body}");
    let back = lease(&plane, &cx, 500).await;
    assert!(
        back.iter()
            .all(|t| !["deploy", "start", "restart"].contains(&t["kind"].as_str().unwrap())),
        "a returning node starts nothing of the moved slot: {back:?}"
    );
    let releases = releases(&plane, "web").await;
    assert_eq!(releases, [(1, "pending".into())], "nothing ran yet");
    let _ = x;

    // Y runs it.
    let theirs = lease(&plane, &cy, 2000).await;
    assert!(
        theirs.iter().any(|t| t["kind"] == "deploy"),
        "the slot's deploy is Y's now: {theirs:?}"
    );
}

/// Issue 12: a node could report any image reference for a release, and every other node pulled it.
/// Only `<registry>/<app>` with a sha256 digest is accepted; anything else is refused and not recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_record_an_image_outside_the_releases_own_repository() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 2, "");
    repo.app("api", 1, "");
    let registry = "127.0.0.1:5999/cairn-test";
    let args = [
        "--interval",
        "2s",
        "--node-offline-after",
        "120s",
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
    let a_tasks = lease(&plane, &ca, 0).await;
    let web = a_tasks
        .iter()
        .find(|t| t["app"] == "web")
        .unwrap_or_else(|| panic!("a has a replica of web: {a_tasks:?}"))
        .clone();
    assert_eq!(web["deploy"]["push_to"], registry, "{web}");

    let good_digest = format!("sha256:{}", "ab".repeat(32));
    let id = format!("sha256:{}", "cd".repeat(32));
    let refused = [
        (
            json!({"id": id, "registry": ["evil.example.com/web", good_digest]}),
            403,
        ),
        (
            json!({"id": id, "registry": [format!("{registry}/api"), good_digest]}),
            403,
        ),
        (
            json!({"id": id, "registry": [format!("{registry}/web/../api"), good_digest]}),
            403,
        ),
        (
            json!({"id": id, "registry": [format!("{registry}/web:latest"), good_digest]}),
            403,
        ),
        (
            json!({"id": id, "registry": [format!("{registry}/web"), "sha256:abc"]}),
            400,
        ),
        (
            json!({"id": id, "registry": [format!("{registry}/web"), format!("sha512:{}", "ab".repeat(64))]}),
            400,
        ),
    ];
    let task_row =
        |id: &Value| format!("SELECT status, progress, lease_token FROM tasks WHERE id = {id}");
    let before = plane.rows(&task_row(&web["id"])).await;
    for (image, want) in &refused {
        let (s, body) = plane
            .agent_post(
                &format!("/tasks/{}/progress", web["id"]),
                Some(&ca),
                &json!({"token": web["token"], "message": "pushed", "image": image}),
            )
            .await;
        assert_eq!(s, *want, "progress with {image}: {body}");
        error_of(&body);
        let (s, body) = report(
            &plane,
            &ca,
            &web,
            json!({"outcome": "done", "image": image}),
        )
        .await;
        assert_eq!(s, *want, "result with {image}: {body}");
    }
    assert_eq!(
        plane.rows(&task_row(&web["id"])).await,
        before,
        "a refused report changes nothing"
    );
    let recorded = plane
        .rows("SELECT image, image_digest FROM releases WHERE app = 'web'")
        .await;
    assert_eq!(recorded, [json!({"image": null, "image_digest": null})]);
    assert!(
        lease(&plane, &cb, 0)
            .await
            .iter()
            .all(|t| t["app"] != "web"),
        "b still waits for a real push"
    );

    // The release's own repository, by digest: recorded, and b pulls exactly that.
    let image = json!({"id": id, "registry": [format!("{registry}/web"), good_digest]});
    let (s, body) = plane
        .agent_post(
            &format!("/tasks/{}/progress", web["id"]),
            Some(&ca),
            &json!({"token": web["token"], "message": "pushed", "image": image}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let b_tasks = lease(&plane, &cb, 6000).await;
    let b_web = b_tasks
        .iter()
        .find(|t| t["app"] == "web")
        .unwrap_or_else(|| panic!("{b_tasks:?}"));
    assert_eq!(
        b_web["deploy"]["image"],
        json!({"reference": format!("{registry}/web"), "digest": good_digest})
    );
}

/// Issue 12: a node's credential reaches only its own tasks. Every agent API endpoint, called with b's
/// credential against a's task (its id and its real lease token), is refused or acts on b alone, and
/// nothing of a's changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_credential_reaches_nothing_of_a_node() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    let secret = super::support::secret_line("TOKEN", "only-for-a", &identity.recipient());
    repo.app("web", 2, &secret);
    let plane = Plane::start(db, repo, scratch, identity, &patient()).await;
    plane.wait_generation(1).await;
    let (ca, _) = plane.join_raw("a").await;
    let (cb, _) = plane.join_raw("b").await;
    let a_task = lease(&plane, &ca, 2000).await[0].clone();
    let (id, token) = (a_task["id"].clone(), a_task["token"].clone());
    let slot = a_task["slot"].as_i64().unwrap();
    let (s, body) = plane
        .agent_post(
            &format!("/tasks/{id}/logs"),
            Some(&ca),
            &json!({"token": token, "lines": [{"stream": "build", "text": "a's own line",
                                               "at": "2026-01-01T00:00:00Z"}]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");

    let snapshot = || async {
        json!({
            "tasks": plane.rows("SELECT id, status, lease_token, lease_expires_at, attempts, progress, \
                                 last_error, payload FROM tasks WHERE node = 'a' ORDER BY id").await,
            "status": plane.rows("SELECT state, credential_hash, recipient, replicas, agent_version \
                                  FROM node_status WHERE node = 'a'").await,
            "logs": plane.rows("SELECT task, seq, line FROM task_logs ORDER BY task, seq").await,
            "replica_logs": plane.rows("SELECT app, slot, node, line FROM replica_logs").await,
            "releases": plane.rows("SELECT number, status, image, image_digest FROM releases").await,
        })
    };
    let before = snapshot().await;

    // Join: a credential is no join token, and a's join token does not take a's place while a is live.
    let (s, resp) = plane
        .agent_post(
            "/join",
            Some(&cb),
            &json!({"token": cb, "recipient": cairn_schema::Identity::generate().recipient(),
                    "drivers": ["docker"], "agent_version": "test"}),
        )
        .await;
    assert_eq!(s, 401, "{resp}");
    let a_token = plane.join_token("a");
    let (s, resp) = plane
        .agent_post(
            "/join",
            Some(&cb),
            &json!({"token": a_token, "recipient": cairn_schema::Identity::generate().recipient(),
                    "drivers": ["docker"], "agent_version": "test"}),
        )
        .await;
    assert_eq!(s, 409, "{resp}");
    let now = "2026-01-01T00:00:00Z";
    let image = json!({"id": format!("sha256:{}", "ab".repeat(32))});
    let as_b: Vec<(&str, String, Value)> = vec![
        (
            "POST",
            format!("/tasks/{id}/progress"),
            json!({"token": token, "message": "b was here", "image": image}),
        ),
        (
            "POST",
            format!("/tasks/{id}/logs"),
            json!({"token": token, "lines": [{"stream": "build", "text": "b", "at": now}]}),
        ),
        (
            "POST",
            format!("/tasks/{id}/result"),
            json!({"token": token, "outcome": "done", "image": image}),
        ),
        (
            "POST",
            format!("/tasks/{id}/result"),
            json!({"token": token, "outcome": "failed", "error": "b", "retry": false}),
        ),
        (
            "POST",
            format!("/tasks/{id}/result"),
            json!({"token": token, "outcome": "skipped"}),
        ),
        (
            "POST",
            format!("/tasks/{id}/release"),
            json!({"token": token}),
        ),
        ("GET", format!("/tasks/{id}"), Value::Null),
    ];
    for (method, path, body) in &as_b {
        let (s, resp) = if *method == "GET" {
            plane.agent_get(path, Some(&cb)).await
        } else {
            plane.agent_post(path, Some(&cb), body).await
        };
        assert_eq!(s, 404, "{method} {path} as b: {resp}");
        assert!(!resp.to_string().contains("only-for-a"), "{resp}");
    }
    // Heartbeat, lease and replica output as b act on b alone: b claiming a's replica is told about b's
    // own placements, its lease holds only b's tasks, and a's replica's output is not b's to write.
    let hb = json!({"agent_version": "evil", "drivers": ["docker"],
        "resources": {"cpu_millis": 0, "memory_bytes": 0, "disk_bytes": 0},
        "replicas": [{"app": "web", "slot": slot, "release": 1, "state": "running", "healthy": true}]});
    let (s, resp) = plane.agent_post("/heartbeat", Some(&cb), &hb).await;
    assert_eq!((s, resp["node"].as_str()), (200, Some("b")), "{resp}");
    let b_leased = lease(&plane, &cb, 500).await;
    assert!(
        b_leased.iter().all(|t| t["id"] != id),
        "b never gets a's task: {b_leased:?}"
    );
    assert!(
        !Value::Array(b_leased.clone())
            .to_string()
            .contains("only-for-a")
    );
    let (s, resp) = plane
        .agent_post(
            "/replica-logs",
            Some(&cb),
            &json!({"lines": [{"app": "web", "slot": slot, "release": 1, "stream": "stdout",
                               "text": "forged by b", "at": now}]}),
        )
        .await;
    assert_eq!((s, resp["stored"].as_u64()), (200, Some(0)), "{resp}");

    assert_eq!(snapshot().await, before, "nothing of a's changed");
    // a's own lease still works with its token.
    let (s, resp) = report(&plane, &ca, &a_task, json!({"outcome": "done"})).await;
    assert_eq!((s, resp["status"].as_str()), (200, Some("done")), "{resp}");
}

/// Issue 12: a node that holds a live credential joined again with any fresh token, silently replacing
/// the running node. It now needs a token made with `--replace`, and that join revokes the old
/// credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoining_a_live_node_needs_a_replace_token_and_revokes_the_old_credential() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    let plane = Plane::start(db, repo, scratch, identity, &patient()).await;
    plane.wait_generation(1).await;
    let (old, _) = plane.join_raw("a").await;
    let hb = json!({"agent_version": "test", "drivers": ["docker"],
        "resources": {"cpu_millis": 0, "memory_bytes": 0, "disk_bytes": 0}, "replicas": []});
    let join = |token: String| {
        let plane = &plane;
        async move {
            plane
                .agent_post(
                    "/join",
                    None,
                    &json!({"token": token,
                            "recipient": cairn_schema::Identity::generate().recipient(),
                            "drivers": ["docker"], "agent_version": "test"}),
                )
                .await
        }
    };

    // An unsanctioned join for the live node: refused with what to do, the old credential unharmed.
    let plain = plane.join_token("a");
    let (s, body) = join(plain.clone()).await;
    assert_eq!(s, 409, "{body}");
    let msg = error_of(&body);
    assert!(
        msg.contains("live credential") && msg.contains("cairn node join-token a --replace"),
        "{msg}"
    );
    let (s, _) = plane.agent_post("/heartbeat", Some(&old), &hb).await;
    assert_eq!(s, 200, "the live credential still works");

    // The operator's explicit re-join: the new credential works, the old one is refused.
    let out = plane.cairn(&["node", "join-token", "a", "--replace"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revokes the node's current credential"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replace = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (s, body) = join(replace.clone()).await;
    assert_eq!(s, 200, "{body}");
    let new = body["credential"].as_str().unwrap().to_owned();
    let (s, _) = plane.agent_post("/heartbeat", Some(&old), &hb).await;
    assert_eq!(s, 401, "the replaced credential is revoked");
    let (s, _) = plane
        .agent_post("/lease", Some(&old), &json!({"max": 1, "wait_ms": 0}))
        .await;
    assert_eq!(s, 401);
    let (s, _) = plane.agent_post("/heartbeat", Some(&new), &hb).await;
    assert_eq!(s, 200);
    let (s, _) = join(replace).await;
    assert_eq!(s, 401, "a replace token joins once too");

    // Revoking is the other explicit action: the plain token that was refused joins afterwards.
    let out = plane.cairn(&["node", "revoke", "a"]);
    assert!(out.status.success());
    let (s, body) = join(plain).await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = plane.agent_post("/heartbeat", Some(&new), &hb).await;
    assert_eq!(s, 401);
}
