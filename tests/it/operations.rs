//! What operators run around the platform: `/metrics` of a real `cairn serve` (the series are there, and
//! move when a reconcile applies, an agent leases and finishes, a webhook is delivered, a node goes
//! offline), JSON logs with spans from serve and the agent, shell completions, and the agent's install
//! script (in a temporary root, never touching this machine).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::agents::support::{CAIRN, FAST, Plane, agent_bin, wait_for};

const SECRET: &str = "metrics-test-webhook-secret";
const WAIT: Duration = Duration::from_secs(30);

async fn scrape(plane: &Plane) -> String {
    let resp = reqwest::get(format!("{}/metrics", plane.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    resp.text().await.unwrap()
}

/// The value of one sample, `name{labels}` exactly as exposed (labels in declaration order).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

/// Scrapes until `series` is at least `min`.
async fn wait_sample(plane: &Plane, series: &str, min: f64) -> String {
    wait_for(&format!("{series} >= {min}"), WAIT, || async {
        let text = scrape(plane).await;
        (sample(&text, series)? >= min).then_some(text)
    })
    .await
}

async fn deliver(plane: &Plane, event: &str, id: &str, body: &str, signed: bool) -> u16 {
    let secret = cairn_webhook::signature::WebhookSecret::new(SECRET).unwrap();
    let mut req = reqwest::Client::new()
        .post(format!("{}/webhooks/github", plane.url))
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", id)
        .body(body.to_owned());
    if signed {
        req = req.header(
            "x-hub-signature-256",
            cairn_webhook::signature::sign(&secret, body.as_bytes()),
        );
    }
    req.send().await.unwrap().status().as_u16()
}

/// Every line of a log is a JSON object; returns them.
fn json_lines(path: &Path, text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("{}: not a JSON line ({e}): {l}", path.display()))
        })
        .inspect(|v| assert!(v.is_object(), "{v}"))
        .collect()
}

fn has_span(lines: &[Value], name: &str) -> bool {
    lines.iter().any(|l| l["span"]["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_work_and_json_logs_carry_spans() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "");
    let secret_file = scratch.path().join("webhook-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let mut args = FAST.to_vec();
    args.extend(["--log-format", "json", "--github-webhook-secret-file"]);
    args.push(secret_file.to_str().unwrap());
    let mut plane = Plane::start(db, repo, scratch, identity, &args).await;

    // The first reconcile applies the node and the app; its deploy task waits for the node.
    wait_sample(&plane, "cairn_reconciles_total{result=\"applied\"}", 1.0).await;
    // The gauges read from Postgres are read when a scrape starts, the counters when it ends: a scrape
    // running across the apply's commit can show the reconcile counted and the queue still empty. A
    // later scrape shows both.
    let text = wait_sample(
        &plane,
        "cairn_tasks{status=\"queued\",kind=\"deploy\"}",
        1.0,
    )
    .await;
    for family in [
        "cairn_reconcile_duration_seconds histogram",
        "cairn_reconciles counter",
        "cairn_plan_changes counter",
        "cairn_plan_tasks counter",
        "cairn_tasks gauge",
        "cairn_task_lease_latency_seconds histogram",
        "cairn_webhook_deliveries counter",
        "cairn_nodes gauge",
        "cairn_push_to_running_seconds histogram",
        "cairn_metrics_database_up gauge",
    ] {
        assert!(
            text.lines().any(|l| l == format!("# TYPE {family}")),
            "no `# TYPE {family}` in:\n{text}"
        );
    }
    assert_eq!(text.lines().last(), Some("# EOF"));
    assert!(
        sample(
            &text,
            "cairn_reconcile_duration_seconds_count{result=\"applied\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    for (series, want) in [
        (
            "cairn_plan_changes_total{kind=\"app\",action=\"create\"}",
            1.0,
        ),
        (
            "cairn_plan_changes_total{kind=\"node\",action=\"create\"}",
            1.0,
        ),
        ("cairn_plan_tasks_total{kind=\"deploy\"}", 1.0),
        ("cairn_tasks{status=\"queued\",kind=\"deploy\"}", 1.0),
        ("cairn_tasks{status=\"leased\",kind=\"deploy\"}", 0.0),
        ("cairn_nodes{state=\"pending\"}", 1.0),
        ("cairn_nodes{state=\"online\"}", 0.0),
        ("cairn_metrics_database_up", 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series} in:\n{text}");
    }

    // An agent joins, leases the deploy and finishes it: the lease is timed, the release goes live.
    let token = plane.join_token("a");
    let dir = plane.scratch.path().join("agent-a");
    let mut agent = plane.agent("a", &dir, Some(&token), &[], &["--log-format", "json"]);
    let text = wait_sample(
        &plane,
        "cairn_push_to_running_seconds_count{stage=\"release\"}",
        1.0,
    )
    .await;
    for (series, want) in [
        (
            "cairn_task_lease_latency_seconds_count{kind=\"deploy\"}",
            1.0,
        ),
        ("cairn_nodes{state=\"online\"}", 1.0),
        ("cairn_nodes{state=\"pending\"}", 0.0),
        ("cairn_tasks{status=\"queued\",kind=\"deploy\"}", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series} in:\n{text}");
    }

    // Webhooks: a signed delivery is received and then processed (an event Cairn does not act on is
    // ignored); an unsigned one is rejected; a redelivery is a duplicate.
    let body = r#"{"action":"opened"}"#;
    assert_eq!(deliver(&plane, "issues", "d-1", body, true).await, 202);
    assert_eq!(deliver(&plane, "issues", "d-1", body, true).await, 200);
    assert_eq!(deliver(&plane, "issues", "d-2", body, false).await, 401);
    let text = wait_sample(
        &plane,
        "cairn_webhook_deliveries_total{outcome=\"ignored\"}",
        1.0,
    )
    .await;
    for outcome in ["received", "duplicate", "rejected"] {
        let series = format!("cairn_webhook_deliveries_total{{outcome=\"{outcome}\"}}");
        assert_eq!(sample(&text, &series), Some(1.0), "{series} in:\n{text}");
    }

    // The node goes silent: it is offline within the (shortened) threshold.
    agent.kill();
    let text = wait_sample(&plane, "cairn_nodes{state=\"offline\"}", 1.0).await;
    assert_eq!(sample(&text, "cairn_nodes{state=\"online\"}"), Some(0.0));

    // Logs: every line of serve's and the agent's log is JSON; reconciles, leases, tasks (on both
    // sides) and webhook deliveries run in spans.
    let logs = plane.logs();
    let serve = logs
        .iter()
        .find(|(p, _)| p.file_name().unwrap() == "serve.log")
        .expect("serve's log");
    let serve_lines = json_lines(&serve.0, &serve.1);
    for span in ["reconcile", "lease", "task", "delivery"] {
        assert!(
            has_span(&serve_lines, span),
            "no line of serve's log is in a `{span}` span:\n{}",
            serve.1
        );
    }
    let reconcile = serve_lines
        .iter()
        .find(|l| l["span"]["name"] == "reconcile" && l["span"]["commit"].is_string())
        .expect("a reconcile span names its commit");
    assert!(reconcile["span"]["trigger"].is_string(), "{reconcile}");
    let agent_log = logs
        .iter()
        .find(|(p, _)| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("agent-a-")
        })
        .expect("the agent's log");
    let agent_lines = json_lines(&agent_log.0, &agent_log.1);
    assert!(
        agent_lines
            .iter()
            .any(|l| l["span"]["name"] == "task" && l["span"]["kind"] == "deploy"),
        "no line of the agent's log is in a deploy's `task` span:\n{}",
        agent_log.1
    );
}

/// A deploy's stage timings travel with its result, are kept on the release (the slowest replica's per
/// stage, known stages only) and become push-to-running samples when the release goes live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_stage_timings_reach_the_release_and_the_metrics() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "");
    let plane = Plane::start(db, repo, scratch, identity, FAST).await;
    plane.wait_generation(1).await;
    let (credential, _) = plane.join_raw("a").await;
    let (status, body) = plane
        .agent_post(
            "/lease",
            Some(&credential),
            &serde_json::json!({"max": 1, "wait_ms": 5000}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let task = &body["tasks"][0];
    assert_eq!(task["kind"], "deploy", "{body}");
    let result = serde_json::json!({
        "token": task["token"],
        "outcome": "done",
        "timings": {"build": 1500, "start": 250, "made-up": 7, "release": 1},
    });
    let (status, body) = plane
        .agent_post(
            &format!("/tasks/{}/result", task["id"]),
            Some(&credential),
            &result,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rows = plane
        .rows("SELECT status, stage_timings FROM releases WHERE app = 'web'")
        .await;
    assert_eq!(rows[0]["status"], "live", "{rows:?}");
    assert_eq!(
        rows[0]["stage_timings"],
        serde_json::json!({"build": 1500, "start": 250}),
        "known agent stages only"
    );
    let text = scrape(&plane).await;
    for (series, want) in [
        ("cairn_push_to_running_seconds_count{stage=\"build\"}", 1.0),
        ("cairn_push_to_running_seconds_sum{stage=\"build\"}", 1.5),
        ("cairn_push_to_running_seconds_sum{stage=\"start\"}", 0.25),
        ("cairn_push_to_running_seconds_count{stage=\"fetch\"}", 0.0),
        (
            "cairn_push_to_running_seconds_count{stage=\"release\"}",
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series} in:\n{text}");
    }
    assert!(!text.contains("made-up"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_have_a_listener_of_their_own() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    // Plane reads the first line serve prints (the main address); the metrics address is the second.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let mut args = FAST.to_vec();
    args.extend(["--metrics-listen", &listen]);
    let plane = Plane::start(db, repo, scratch, identity, &args).await;
    let own = format!("http://{listen}/metrics");
    let text = wait_for("the metrics listener", WAIT, || async {
        let r = reqwest::get(&own).await.ok()?;
        (r.status() == 200).then_some(())?;
        r.text().await.ok()
    })
    .await;
    assert!(text.contains("# TYPE cairn_reconciles counter"), "{text}");
    let main = reqwest::get(format!("{}/metrics", plane.url))
        .await
        .unwrap();
    assert_ne!(
        main.status(),
        200,
        "with --metrics-listen the main listener does not serve /metrics"
    );
}

#[test]
fn completions_for_each_shell_mention_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(CAIRN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        for word in [
            "validate",
            "plan",
            "apply",
            "serve",
            "secret",
            "completions",
        ] {
            assert!(
                script.contains(word),
                "the {shell} script does not mention `{word}`"
            );
        }
        let out = Command::new(agent_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "cairn-agent {shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["server", "data-dir", "driver"] {
            assert!(
                script.contains(word),
                "cairn-agent's {shell} script does not mention `{word}`"
            );
        }
    }
    let out = Command::new(CAIRN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "an unknown shell is a usage error"
    );
}

/// `scripts/install-agent` with `args`, the token on stdin, as `as_nobody` or as this user.
fn install_agent(
    args: &[&str],
    token_stdin: Option<&str>,
    as_nobody: bool,
) -> (i32, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-agent");
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh"]);
        c.arg(&script);
        c
    } else {
        let mut c = Command::new("sh");
        c.arg(&script);
        c
    };
    cmd.args(args)
        .env_remove("CAIRN_JOIN_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        if let Some(t) = token_stdin {
            stdin.write_all(t.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_install_script_installs_into_a_root_idempotently_and_never_shows_the_token() {
    let root = tempfile::tempdir().unwrap();
    let bin = agent_bin();
    let token = "cairn-join-0123456789abcdefghijklmnopqrstuv";
    let base = [
        "--binary",
        bin.to_str().unwrap(),
        "--server",
        "https://cairn.example.com",
        "--root",
        root.path().to_str().unwrap(),
    ];

    // A dry run says what it would do and writes nothing.
    let mut dry = base.to_vec();
    dry.push("--dry-run");
    let (code, out, err) = install_agent(&dry, Some(token), false);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("would"), "{out}");
    assert!(!out.contains(token) && !err.contains(token), "{out}{err}");
    assert_eq!(
        std::fs::read_dir(root.path()).unwrap().count(),
        0,
        "a dry run writes nothing"
    );

    // The real run, twice: the second changes nothing.
    for run in 0..2 {
        let (code, out, err) = install_agent(&base, (run == 0).then_some(token), false);
        assert_eq!(code, 0, "run {run}: {out}{err}");
        assert!(!out.contains(token) && !err.contains(token), "{out}{err}");
        let installed = root.path().join("usr/local/bin/cairn-agent");
        assert_eq!(
            std::fs::read(&installed).unwrap(),
            std::fs::read(&bin).unwrap()
        );
        let env_file = root.path().join("etc/cairn/agent.env");
        let env = std::fs::read_to_string(&env_file).unwrap();
        assert!(
            env.contains(&format!("CAIRN_JOIN_TOKEN={token}\n")),
            "run {run}: {env}"
        );
        assert!(
            env.contains("CAIRN_SERVER=https://cairn.example.com\n"),
            "{env}"
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the env file holds a token");
        let unit =
            std::fs::read_to_string(root.path().join("etc/systemd/system/cairn-agent.service"))
                .unwrap();
        assert!(
            unit.contains("EnvironmentFile=/etc/cairn/agent.env"),
            "{unit}"
        );
        if run == 1 {
            assert!(out.contains("unchanged"), "{out}");
        }
    }

    // A token on the command line is refused: argv is visible to every user of the machine.
    let mut argv_token = base.to_vec();
    argv_token.extend(["--token", token]);
    let (code, _, err) = install_agent(&argv_token, None, false);
    assert_ne!(code, 0);
    assert!(err.contains("stdin") && !err.contains(token), "{err}");

    // Without --root (or --dry-run) it needs root, and says so.
    let (code, _, err) = install_agent(
        &[
            "--binary",
            bin.to_str().unwrap(),
            "--server",
            "https://x.example",
        ],
        Some(token),
        true,
    );
    assert_ne!(code, 0);
    assert!(err.contains("root"), "{err}");
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify_where_it_is_installed() {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    for (unit, installed, bin) in [
        (
            "cairn.service",
            "/usr/local/bin/cairn",
            Path::new(CAIRN).to_owned(),
        ),
        (
            "cairn-agent.service",
            "/usr/local/bin/cairn-agent",
            agent_bin(),
        ),
    ] {
        // verify wants the binary to exist: point the unit at the one just built.
        let text = std::fs::read_to_string(dist.join(unit)).unwrap();
        assert!(text.contains(&format!("ExecStart={installed} ")), "{unit}");
        let path = dir.path().join(unit);
        std::fs::write(&path, text.replace(installed, bin.to_str().unwrap())).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !said.contains(unit),
            "systemd-analyze verify {unit}:\n{said}"
        );
    }
}
