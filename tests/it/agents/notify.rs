//! Notifications (issue 17) end to end: a real `cairn serve` and agents on the recording driver, a sink
//! declared in git, and a local HTTP receiver (`tests/it/notify/receiver.py`) that verifies each
//! signature with the `standardwebhooks` package from the Python package index: an implementation that
//! is not Cairn's. The receiver's Python lives in a venv under `target/` made on first use.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::support::{COMMIT, FAST, Plane, secret_line, wait_converged, wait_for};

/// The signing secret the tests' sinks use (Standard Webhooks: `whsec_` and base64 of 32 bytes).
const SIGNING: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=";

/// A Python with `standardwebhooks`: `target/pyenv/notify`, made once (pip from the package index).
fn python() -> Option<PathBuf> {
    crate::pyenv::venv(
        "notifications",
        "notify",
        &["standardwebhooks"],
        "standardwebhooks",
    )
}

/// The receiver process; killed on drop.
struct Receiver {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Receiver {
    /// Starts a receiver answering `statuses` in order (the last repeats); `secret` `None` for an
    /// unsigned sink.
    fn start(scratch: &Path, secret: Option<&str>, statuses: &str) -> Option<Receiver> {
        let py = python()?;
        let log = scratch.join("receiver.jsonl");
        let mut child = Command::new(py)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/notify/receiver.py"))
            .arg(&log)
            .arg(secret.unwrap_or("-"))
            .arg(statuses)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the receiver starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the receiver said {line:?}"));
        Some(Receiver { child, log, port })
    }

    /// Every request so far.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The requests for events of `kind`.
    fn of(&self, kind: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["body"]["type"] == kind)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook sink manifest for `url`, encrypted to `recipient`.
fn sink(name: &str, url: &str, recipient: &cairn_schema::Recipient, extra: &str) -> String {
    format!(
        "[notify.{name}]\nkind = \"webhook\"\n{}{}{extra}",
        secret_line("url", url, recipient),
        secret_line("signing_secret", SIGNING, recipient),
    )
}

/// `cairn notify deliveries --json` from the database.
fn ledger(plane: &Plane) -> Vec<Value> {
    let out = plane.cairn(&["notify", "deliveries", "--json", "--limit", "1000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Node a's state.
async fn node_a(plane: &Plane) -> Option<String> {
    plane
        .rows("SELECT state FROM node_status WHERE node = 'a'")
        .await
        .first()
        .map(|r| r["state"].as_str().unwrap_or_default().to_owned())
}

fn canary() -> String {
    format!("cairn-canary-{:016x}", super::rand_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deploy_reaches_a_flaky_receiver_once_with_one_webhook_id_and_its_url_nowhere() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    let Some(receiver) = Receiver::start(scratch.path(), Some(SIGNING), "500,500,200") else {
        return;
    };
    let canary = canary();
    let url = format!("http://127.0.0.1:{}/hooks/{canary}", receiver.port);
    let recipient = identity.recipient();
    repo.node("a", "");
    repo.app("web", 2, "GREETING = \"hello\"\n");
    repo.write(
        "notify.toml",
        &sink(
            "ops",
            &url,
            &recipient,
            "events = [\"deploy.*\", \"node.*\"]\n",
        ),
    );
    let mut args = FAST.to_vec();
    args.extend(["--notify-retry-delay", "200ms"]);
    let mut plane = Plane::start(db, repo, scratch, identity, &args).await;
    plane.wait_generation(1).await;
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    let _a = plane.agent("a", &dir, Some(&token), &[], &[]);
    wait_converged(&plane, Duration::from_secs(30)).await;

    plane.repo.app(
        "web",
        2,
        "GREETING = \"hello\"\nRECORDING_UNHEALTHY = \"GET /healthz answered 500\"\n",
    );
    plane.repo.commit();
    let tries = wait_for(
        "deploy.failed to be delivered",
        Duration::from_secs(60),
        || async {
            let r = receiver.of("deploy.failed");
            r.iter().any(|r| r["status"] == 200).then_some(r)
        },
    )
    .await;
    // Nothing more comes for it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries_after = receiver.of("deploy.failed");
    assert_eq!(tries_after, tries, "sent again after a 200");
    let statuses: Vec<&Value> = tries.iter().map(|r| &r["status"]).collect();
    assert_eq!(statuses, [500, 500, 200], "{tries:#?}");
    let id = &tries[0]["webhook_id"];
    assert!(id.as_str().is_some_and(|i| i.starts_with("evt_")), "{id}");
    for t in &tries {
        assert_eq!(&t["webhook_id"], id, "one id on every try");
        assert_eq!(t["verified"], true, "standardwebhooks refused it: {t}");
        let data = &t["body"]["data"];
        assert_eq!(data["app"], "web");
        assert_eq!(data["release"], 2);
        assert_eq!(data["commit"], COMMIT);
        assert!(
            data["detail"]["reason"]
                .as_str()
                .unwrap()
                .contains("answered 500"),
            "{data}"
        );
    }
    // Successes are not sent unless asked for (the default severity is `warning`).
    assert!(receiver.of("deploy.succeeded").is_empty());
    assert!(receiver.of("deploy.started").is_empty());

    // The ledger: delivered on the third attempt, with the receiver's answer.
    let rows = ledger(&plane);
    let row = rows
        .iter()
        .find(|r| r["event"]["kind"] == "deploy.failed")
        .expect("a ledger row");
    assert_eq!(row["status"], "done", "{row:#}");
    assert_eq!(row["attempts"], 3);
    assert_eq!(row["status_code"], 200);
    assert!(row["latency_ms"].is_u64());
    assert_eq!(&row["webhook_id"], id);

    // The sink shows in a plan, without its URL.
    plane.repo.write(
        "notify.toml",
        &sink("ops", &url, &recipient, "events = [\"deploy.failed\"]\n"),
    );
    let key = plane.scratch.path().join("control-plane.key");
    let repo_dir = plane.repo.dir.path().to_str().unwrap().to_owned();
    let plan = plane.cairn(&[
        "plan",
        "--repo",
        &repo_dir,
        "--identity",
        key.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    assert!(text.contains("notify ops"), "{text}");
    let plan_json = plane.cairn(&[
        "plan",
        "--json",
        "--repo",
        &repo_dir,
        "--identity",
        key.to_str().unwrap(),
    ]);
    for out in [&plan, &plan_json] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(&canary), "the sink URL is in a plan");
    }

    // The URL's canary is nowhere: not in PostgreSQL...
    let db_url = plane.db.url().split('?').next().unwrap().to_owned();
    let dump = Command::new(super::pg_dump())
        .arg(&db_url)
        .output()
        .unwrap();
    assert!(dump.status.success());
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("notify_sinks") && dump.contains("BEGIN AGE ENCRYPTED FILE"));
    assert!(
        !dump.contains(&canary),
        "the sink URL is in the database dump"
    );
    // ...nor in a log of serve or the agent...
    for (path, text) in plane.logs() {
        assert!(
            !text.contains(&canary),
            "the sink URL is in {}",
            path.display()
        );
    }
    // ...nor in an answer of the admin API.
    let out = plane.cairn(&["token", "create", "--name", "test"]);
    let admin = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    for path in [
        "/status",
        "/events?limit=1000",
        "/notify/deliveries?limit=1000",
    ] {
        let (s, body) = plane.admin_get(path, Some(&admin)).await;
        assert_eq!(s, 200, "{path}: {body}");
        assert!(!body.to_string().contains(&canary), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_flapping_five_times_is_summarised_and_every_unsent_change_says_why() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    let Some(receiver) = Receiver::start(scratch.path(), Some(SIGNING), "200") else {
        return;
    };
    let url = format!("http://127.0.0.1:{}/hooks", receiver.port);
    repo.node("a", "");
    repo.write(
        "notify.toml",
        &sink(
            "ops",
            &url,
            &identity.recipient(),
            "events = [\"node.*\"]\nmax_per_hour = 10\n",
        ),
    );
    let mut plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    let mut join = Some(token);
    for flap in 1..=5 {
        let mut a = plane.agent("a", &dir, join.take().as_deref(), &[], &[]);
        wait_for(
            &format!("a online ({flap})"),
            Duration::from_secs(30),
            || async { (node_a(&plane).await.as_deref() == Some("online")).then_some(()) },
        )
        .await;
        // Killed maybe before it saved the join's answer (the join marks the node online first): the
        // next run asks again with the token and credential it kept in `join.json`.
        a.kill();
        wait_for(
            &format!("a offline ({flap})"),
            Duration::from_secs(30),
            || async { (node_a(&plane).await.as_deref() == Some("offline")).then_some(()) },
        )
        .await;
    }
    let _a = plane.agent("a", &dir, None, &[], &[]);
    wait_for("a online at last", Duration::from_secs(30), || async {
        (node_a(&plane).await.as_deref() == Some("online")).then_some(())
    })
    .await;

    // Recorded: every change, and one summary.
    let events = plane
        .rows("SELECT kind FROM events WHERE node = 'a' ORDER BY id")
        .await;
    let count = |k: &str| events.iter().filter(|e| e["kind"] == k).count();
    assert_eq!(count("node.offline"), 5, "{events:?}");
    assert_eq!(count("node.online"), 5, "{events:?}");
    assert_eq!(count("node.flapping"), 1, "{events:?}");

    // Sent: the first three transitions each way and the summary, then nothing until it is steady.
    wait_for("the summary to arrive", Duration::from_secs(20), || async {
        (!receiver.of("node.flapping").is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent: Vec<String> = receiver
        .requests()
        .iter()
        .map(|r| r["body"]["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        sent,
        [
            "node.offline",
            "node.online",
            "node.offline",
            "node.online",
            "node.offline",
            "node.online",
            "node.flapping"
        ],
        "{sent:?}"
    );
    assert!(sent.len() <= 10, "within the sink's max_per_hour");
    assert!(receiver.requests().iter().all(|r| r["verified"] == true));

    // Every change that was not sent has a ledger row saying why.
    let rows = ledger(&plane);
    let unsent: Vec<&Value> = rows.iter().filter(|r| r["status"] != "done").collect();
    assert_eq!(unsent.len(), 4, "{rows:#?}");
    for r in unsent {
        assert_eq!(r["status"], "suppressed", "{r:#}");
        assert!(
            r["reason"].as_str().unwrap().starts_with("not sent: "),
            "{r:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_mid_delivery_delivers_after_restart_and_notify_test_prints_the_answer() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    let Some(receiver) = Receiver::start(scratch.path(), Some(SIGNING), "200") else {
        return;
    };
    let url = format!("http://127.0.0.1:{}/hooks", receiver.port);
    repo.node("a", "");
    repo.write(
        "notify.toml",
        &sink(
            "ops",
            &url,
            &identity.recipient(),
            "events = [\"node.*\"]\n",
        ),
    );
    let mut args = FAST.to_vec();
    args.extend(["--notify-lease", "2s"]);
    let mut plane = Plane::start_with_env(
        db,
        repo,
        scratch,
        identity,
        &args,
        &[("CAIRN_FAILPOINT", "notify-before-send:4000")],
    )
    .await;
    plane.wait_generation(1).await;
    let dir = plane.scratch.path().join("agent-a");
    let token = plane.join_token("a");
    let mut a = plane.agent("a", &dir, Some(&token), &[], &[]);
    wait_for("a online", Duration::from_secs(30), || async {
        let r = plane
            .rows("SELECT state FROM node_status WHERE node = 'a'")
            .await;
        (r.first().is_some_and(|r| r["state"] == "online")).then_some(())
    })
    .await;
    a.kill();
    // The worker has claimed the notification and waits at the failpoint: serve dies there.
    wait_for(
        "the notification to be claimed",
        Duration::from_secs(30),
        || async {
            let r = plane
                .rows("SELECT attempts FROM notify_outbox WHERE status = 'pending'")
                .await;
            (r.first().is_some_and(|r| r["attempts"] == 1)).then_some(())
        },
    )
    .await;
    plane.kill_serve();
    assert!(receiver.requests().is_empty(), "sent before the kill");
    plane.restart_serve().await;
    let sent = wait_for(
        "node.offline after the restart",
        Duration::from_secs(40),
        || async {
            let r = receiver.of("node.offline");
            (!r.is_empty()).then_some(r)
        },
    )
    .await;
    assert_eq!(sent.len(), 1, "{sent:#?}");
    assert_eq!(sent[0]["verified"], true);
    let rows = ledger(&plane);
    assert_eq!(rows[0]["status"], "done", "{rows:#?}");
    assert_eq!(rows[0]["attempts"], 2, "claimed before the kill and after");

    // `cairn notify test` goes through the admin API and prints the receiver's answer.
    let out = plane.cairn(&["token", "create", "--name", "test"]);
    let admin = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let test = Command::new(super::support::CAIRN)
        .args(["notify", "test", "ops"])
        .env("CAIRN_SERVER", &plane.url)
        .env("CAIRN_TOKEN", &admin)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&test.stdout);
    assert!(
        test.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&test.stderr)
    );
    assert!(
        text.contains("answered 200") && text.contains("received"),
        "{text}"
    );
    let tests = receiver.of("notify.test");
    assert_eq!(tests.len(), 1);
    assert_eq!(tests[0]["verified"], true);
    let unknown = Command::new(super::support::CAIRN)
        .args(["notify", "test", "nope"])
        .env("CAIRN_SERVER", &plane.url)
        .env("CAIRN_TOKEN", &admin)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no notification sink `nope`"));
}
