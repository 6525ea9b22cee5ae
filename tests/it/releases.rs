//! Releases and what operators do with them, end to end against a real `cairn serve` on PostgreSQL with a
//! recording agent: `cairn releases`, `rollback`, `unpin`, `restart`, `logs --build` and `logs --follow`
//! through the admin API (and the database), the pin held across reconciles and lifted by a manifest
//! change; and the retention prune on a bare database.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cairn_testkit::pg::TestDb;
use serde_json::{Value, json};

use crate::agents::support::{CAIRN, FAST, Plane, Repo, post_json, wait_converged, wait_for};

/// Generous: on a loaded machine a config commit can take half a minute to become a live release.
const WAIT: Duration = Duration::from_secs(90);

fn admin_token(plane: &Plane) -> String {
    let out = plane.cairn(&["token", "create", "--name", "ops"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs `cairn ARGS` against the plane's admin API with `token`.
fn remote(plane: &Plane, token: &str, args: &[&str]) -> Output {
    Command::new(CAIRN)
        .args(args)
        .env("CAIRN_SERVER", &plane.url)
        .env("CAIRN_TOKEN", token)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(number, status)` of every release of `app`, oldest first.
async fn statuses(plane: &Plane, app: &str) -> Vec<(i64, String)> {
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

async fn wait_live(plane: &Plane, app: &str, n: i64) {
    wait_for(&format!("release {n} of {app} live"), WAIT, || async move {
        statuses(plane, app)
            .await
            .iter()
            .any(|(m, s)| *m == n && s == "live")
            .then_some(())
    })
    .await;
}

async fn placed_releases(plane: &Plane, app: &str) -> Vec<i64> {
    plane
        .rows(&format!(
            "SELECT release FROM placements WHERE app = '{app}' ORDER BY slot"
        ))
        .await
        .iter()
        .map(|r| r["release"].as_i64().unwrap())
        .collect()
}

async fn pin(plane: &Plane, app: &str) -> Value {
    plane
        .rows(&format!(
            "SELECT pinned_release FROM apps WHERE name = '{app}'"
        ))
        .await[0]["pinned_release"]
        .clone()
}

async fn applied_count(plane: &Plane) -> i64 {
    plane
        .rows("SELECT count(*) AS n FROM reconciliations")
        .await[0]["n"]
        .as_i64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_pins_until_unpin_or_a_manifest_change_and_every_command_answers() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "GREETING = \"one\"\n");
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let token = admin_token(&plane);
    let dir = plane.scratch.path().join("agent-a");
    let join = plane.join_token("a");
    let agent = plane.agent("a", &dir, Some(&join), &[], &[]);
    wait_live(&plane, "web", 1).await;
    plane.repo.app("web", 1, "GREETING = \"two\"\n");
    plane.repo.commit();
    wait_live(&plane, "web", 2).await;
    wait_converged(&plane, WAIT).await;

    // Every new route needs an admin token.
    for (method, path) in [
        ("GET", "/apps/web/releases"),
        ("POST", "/apps/web/rollback"),
        ("DELETE", "/apps/web/pin"),
        ("POST", "/apps/web/restart"),
        ("POST", "/apps/web/deploy"),
        ("GET", "/apps/web/build-logs"),
        ("GET", "/apps/web/logs"),
    ] {
        let url = format!("{}/api/v1{path}", plane.url);
        let c = reqwest::Client::new();
        let req = match method {
            "GET" => c.get(url),
            "DELETE" => c.delete(url),
            _ => c.post(url).json(&json!({})),
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{method} {path}");
    }

    // `cairn releases` through the API: newest first, where it runs, the older one superseded.
    let (s, body) = plane.admin_get("/apps/web/releases", Some(&token)).await;
    assert_eq!(s, 200, "{body}");
    let rels = body["releases"].as_array().unwrap();
    assert_eq!(rels.len(), 2);
    assert_eq!(
        (rels[0]["number"].clone(), rels[0]["status"].clone()),
        (json!(2), json!("live"))
    );
    assert_eq!(
        rels[0]["placement"],
        json!([{"slot": 1, "node": "a", "state": "running"}])
    );
    assert_eq!(rels[1]["status"], "superseded");
    // The image each release ran, as the agent reported it (the recording driver's stand-in ids).
    assert_eq!(rels[0]["image"], format!("sha256:{:064x}", 2));
    assert_eq!(rels[1]["image"], format!("sha256:{:064x}", 1));
    assert_eq!(rels[0]["image_digest"], Value::Null);
    assert_eq!(rels[1]["source_commit"], crate::agents::support::COMMIT);
    let text = ok(&remote(&plane, &token, &["releases", "web"]));
    assert!(
        text.contains("REL") && text.contains("superseded") && text.contains("1:a"),
        "{text}"
    );
    // The same answer from the database.
    let via_db: Value =
        serde_json::from_str(&ok(&plane.cairn(&["releases", "web", "--json"]))).unwrap();
    assert_eq!(via_db, body);

    // The replicas' output, shipped by the agent (the recording driver "prints" a line per deploy).
    wait_for("the agent to ship web's output", WAIT, || async {
        let out = plane.cairn(&["logs", "web"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("a/1 r2 stdout: deploy of web slot 1 release 2 (recorded)")
            .then_some(())
    })
    .await;

    // The build output kept with a release (the recording driver logs what it did as the agent).
    let build = ok(&remote(&plane, &token, &["logs", "web", "--build", "1"]));
    assert!(
        build.contains("recorded deploy of web slot 1 release 1"),
        "{build}"
    );
    assert!(!build.contains("release 2"), "{build}");
    let latest = ok(&remote(&plane, &token, &["logs", "web", "--build"]));
    assert!(
        latest.contains("recorded deploy of web slot 1 release 2"),
        "{latest}"
    );

    // Refusals, with clear errors.
    let out = remote(&plane, &token, &["rollback", "web", "9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("app `web` has no release 9"));
    let out = remote(&plane, &token, &["rollback", "nope"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("app `nope` is not in the applied configuration")
    );

    // Roll back (to the release before the current one, by default): pinned, release 1 runs again.
    let deploys_before = agent
        .records()
        .iter()
        .filter(|r| r["kind"] == "deploy")
        .count();
    let out = ok(&remote(&plane, &token, &["rollback", "web"]));
    assert!(out.contains("pinned to release 1"), "{out}");
    assert_eq!(pin(&plane, "web").await, json!(1));
    wait_for("release 1 to run again", WAIT, || async {
        let deployed = agent
            .records()
            .iter()
            .filter(|r| r["kind"] == "deploy")
            .skip(deploys_before)
            .any(|r| r["release"] == 1);
        (deployed && placed_releases(&plane, "web").await == [1]).then_some(())
    })
    .await;
    wait_live(&plane, "web", 1).await;
    assert_eq!(
        statuses(&plane, "web").await,
        [(1, "live".to_owned()), (2, "superseded".to_owned())],
        "one live release after a rollback"
    );
    let status = ok(&remote(&plane, &token, &["status"]));
    assert!(status.contains("pinned 1"), "{status}");

    // A reconcile that plans keeps the pin: a config commit that leaves web's manifest alone (idle timer
    // ticks do not plan at all).
    let n = applied_count(&plane).await;
    plane
        .repo
        .write("unrelated.toml", "# a commit that does not touch web\n");
    plane.repo.commit();
    wait_for("the commit's reconcile", WAIT, || async {
        (applied_count(&plane).await > n).then_some(())
    })
    .await;
    assert_eq!(pin(&plane, "web").await, json!(1));
    assert_eq!(placed_releases(&plane, "web").await, [1]);

    // Unpin: back to the latest release.
    let out = ok(&remote(&plane, &token, &["unpin", "web"]));
    assert!(out.contains("no longer pinned to release 1"), "{out}");
    assert_eq!(pin(&plane, "web").await, Value::Null);
    wait_for("release 2 placed again", WAIT, || async {
        (placed_releases(&plane, "web").await == [2]).then_some(())
    })
    .await;
    wait_live(&plane, "web", 2).await;
    let out = ok(&remote(&plane, &token, &["unpin", "web"]));
    assert!(out.contains("was not pinned"), "{out}");

    // Restart: the running replica restarts once.
    let out = ok(&remote(&plane, &token, &["restart", "web"]));
    assert!(out.contains("restart 1 of web"), "{out}");
    wait_for("a restart task to run", WAIT, || async {
        agent
            .records()
            .iter()
            .any(|r| r["kind"] == "restart" && r["app"] == "web" && r["release"] == 2)
            .then_some(())
    })
    .await;

    // Deploy needs an app that follows a branch.
    let out = remote(&plane, &token, &["deploy", "web"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pins `rev"),
        "{out:?}"
    );

    // Pinned again (to release 1 by number), then a change to web's manifest lifts the pin.
    ok(&remote(&plane, &token, &["rollback", "web", "1"]));
    wait_for("release 1 placed", WAIT, || async {
        (placed_releases(&plane, "web").await == [1]).then_some(())
    })
    .await;
    plane.repo.app("web", 1, "GREETING = \"three\"\n");
    plane.repo.commit();
    wait_live(&plane, "web", 3).await;
    assert_eq!(
        pin(&plane, "web").await,
        Value::Null,
        "the manifest change lifted the pin"
    );
    assert_eq!(placed_releases(&plane, "web").await, [3]);

    // A release that never ran cannot be rolled back to.
    sqlx::query(
        "UPDATE releases SET status = 'failed', error = 'the build failed: exit 2' \
         WHERE app = 'web' AND number = 2",
    )
    .execute(plane.db.pool())
    .await
    .unwrap();
    let out = remote(&plane, &token, &["rollback", "web", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("release 2 of app `web` never ran (it is failed: the build failed: exit 2)"),
        "{err}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_gets_a_line_shipped_after_it_started_and_nodes_speak_only_for_their_replicas()
{
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 1, "");
    let mut args = FAST.to_vec();
    args[1] = "1h";
    let plane = Plane::start(db, repo, scratch, identity, &args).await;
    plane.wait_generation(1).await;
    let token = admin_token(&plane);
    let (cred_a, _) = plane.join_raw("a").await;
    let (cred_b, _) = plane.join_raw("b").await;
    let node = plane
        .rows("SELECT node FROM placements WHERE app = 'web'")
        .await[0]["node"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mine, other) = if node == "a" {
        (cred_a, cred_b)
    } else {
        (cred_b, cred_a)
    };
    let line = |text: &str| {
        json!({"lines": [{"app": "web", "slot": 1, "release": 1, "stream": "stdout", "text": text,
                          "at": chrono::Utc::now()}]})
    };
    let url = format!("{}/agent/v1/replica-logs", plane.url);
    let (s, _) = post_json(url.clone(), None, line("x")).await;
    assert_eq!(s, 401);
    // Another node cannot speak for web's replica.
    let (s, body) = post_json(url.clone(), Some(other), line("forged")).await;
    assert_eq!((s, body["stored"].clone()), (200, json!(0)));
    let (s, body) = post_json(url.clone(), Some(mine.clone()), line("before follow")).await;
    assert_eq!((s, body["stored"].clone()), (200, json!(1)), "{body}");

    let mut follow = Command::new(CAIRN)
        .args(["logs", "web", "--follow", "--tail", "10"])
        .env("CAIRN_SERVER", &plane.url)
        .env("CAIRN_TOKEN", &token)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the follow prints the line shipped before it started")
        .unwrap();
    assert!(
        first.ends_with(&format!("{node}/1 r1 stdout: before follow")),
        "{first}"
    );
    // Shipped while the follow waits: it arrives within moments.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _) = post_json(url.clone(), Some(mine.clone()), line("after follow")).await;
    assert_eq!(s, 200);
    let next = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the follow prints a line shipped after it started")
        .unwrap();
    assert!(next.ends_with("stdout: after follow"), "{next}");
    let _ = follow.kill();
    let _ = follow.wait();
    let all = ok(&plane.cairn(&["logs", "web"]));
    assert!(
        all.contains("before follow") && all.contains("after follow") && !all.contains("forged")
    );

    // Bounded: too many lines, or build output, are refused.
    let many: Vec<Value> = (0..501)
        .map(|i| json!({"app": "web", "slot": 1, "release": 1, "stream": "stdout", "text": i.to_string(), "at": chrono::Utc::now()}))
        .collect();
    let (s, _) = post_json(url.clone(), Some(mine.clone()), json!({"lines": many})).await;
    assert_eq!(s, 400);
    let (s, body) = post_json(
        url,
        Some(mine),
        json!({"lines": [{"app": "web", "slot": 1, "release": 1, "stream": "build", "text": "x", "at": chrono::Utc::now()}]}),
    )
    .await;
    assert_eq!(s, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_removes_old_output_only_and_keeps_each_apps_window() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let pool = db.pool();
    sqlx::query(
        "INSERT INTO tasks (node, kind, app, slot, release, dedup_key) VALUES ('a', 'deploy', 'web', 1, 1, 'k')",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO task_logs (task, seq, stream, line, at) SELECT id, s, 'build', 'line ' || s, \
         CASE WHEN s < 3 THEN now() - interval '20 days' ELSE now() END FROM tasks, generate_series(0, 4) s",
    )
    .execute(pool)
    .await
    .unwrap();
    // web: 2 old lines and 6 new; api: 2 new.
    sqlx::query(
        "INSERT INTO replica_logs (app, slot, release, node, stream, line, at, received_at) \
         SELECT 'web', 1, 1, 'a', 'stdout', 'web ' || s, now(), \
                CASE WHEN s < 2 THEN now() - interval '20 days' ELSE now() END \
         FROM generate_series(0, 7) s \
         UNION ALL SELECT 'api', 1, 1, 'a', 'stdout', 'api ' || s, now(), now() FROM generate_series(0, 1) s",
    )
    .execute(pool)
    .await
    .unwrap();
    let retention = cairn_reconciler::releases::Retention {
        keep: Duration::from_secs(14 * 24 * 3600),
        window: 4,
        every: Duration::from_secs(600),
    };
    let pruned = cairn_reconciler::releases::prune_once(pool, &retention)
        .await
        .unwrap();
    assert_eq!((pruned.task_lines, pruned.replica_lines), (3, 4));
    let build: Vec<String> = sqlx::query_scalar("SELECT line FROM task_logs ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(build, ["line 3", "line 4"]);
    let lines: Vec<String> = sqlx::query_scalar("SELECT line FROM replica_logs ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(
        lines,
        ["web 4", "web 5", "web 6", "web 7", "api 0", "api 1"]
    );
    let again = cairn_reconciler::releases::prune_once(pool, &retention)
        .await
        .unwrap();
    assert_eq!((again.task_lines, again.replica_lines), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_reads_the_branch_head_now_and_is_refused_under_a_pin() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    const URL: &str = "https://example.com/acme/api.git";
    // The app's own repository (a work tree pushing `main` to a bare one), reached through a rewrite.
    let source = Repo::new(identity.recipient().as_str());
    source.write("index.html", "v1");
    source.commit();
    let c1 = source.head();
    repo.node("a", "");
    repo.write(
        "app-api.toml",
        &format!(
            "[app.api]\nplan = \"small\"\nruntime = \"web\"\nreplicas = 1\n\n\
             [app.api.source]\nurl = \"{URL}\"\nbranch = \"main\"\n"
        ),
    );
    let rewrite = format!("{URL}={}", source.url());
    let mut args = FAST.to_vec();
    args.extend(["--git-rewrite", &rewrite]);
    // (Plane::start passes --no-poll-heads: a new app's head is still read once, so release 1 is `c1`
    // without a deploy; after that only `cairn deploy` reads the head here.)
    let mut plane = Plane::start(db, repo, scratch, identity, &args).await;
    plane.wait_generation(1).await;
    let token = admin_token(&plane);
    let join = plane.join_token("a");
    let dir = plane.scratch.path().join("agent-a");
    let _agent = plane.agent("a", &dir, Some(&join), &[], &[]);
    wait_live(&plane, "api", 1).await;

    let out = ok(&remote(&plane, &token, &["deploy", "api"]));
    assert!(
        out.contains(&format!("branch main is still at {c1}")),
        "{out}"
    );
    source.write("index.html", "v2");
    source.commit();
    let c2 = source.head();
    let out = ok(&remote(&plane, &token, &["deploy", "api"]));
    assert!(out.contains(&format!("branch main is at {c2}")), "{out}");
    wait_live(&plane, "api", 2).await;
    let sources: Vec<Value> = plane
        .rows("SELECT source_commit FROM releases WHERE app = 'api' ORDER BY number")
        .await
        .iter()
        .map(|r| r["source_commit"].clone())
        .collect();
    assert_eq!(sources, [json!(c1), json!(c2)]);
    let out = ok(&remote(&plane, &token, &["deploy", "api"]));
    assert!(out.contains("is still at"), "{out}");

    // Pinned by a rollback: deploy says to unpin first; the database path says deploy needs the server.
    ok(&remote(&plane, &token, &["rollback", "api"]));
    let out = remote(&plane, &token, &["deploy", "api"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pinned to release 1 by a rollback: `cairn unpin api` first"),
        "{err}"
    );
    let out = plane.cairn(&["deploy", "api"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the control plane"));
}
