//! Usage metering end to end (issue 20) with real processes: `cairn serve` (rolling usage up every
//! second) and two process-driver agents; an app of 2 replicas, scaled to 1, then a zero-downtime release
//! whose new replica starts 3 s before the old one stops (overlap), then `cairn serve` SIGKILLed for 20 s
//! and started again (a second, crash-looping app metered all along, then removed), then the agent of
//! the node running it
//! SIGKILLed past the offline threshold (its replica process keeps running, unmetered from the node's
//! last heartbeat; the slot is rescheduled on the other node), then removed. The oracle is outside
//! Cairn: each replica process appends its own start and stop times (the shell's `trap` on SIGTERM) to a
//! file, and the agent's process records (`<data dir>/process/<replica>/record.json`, polled) say which
//! slot each port is. Cairn's CSV by slot must match the union of each slot's process lifetimes (those on the
//! killed node cut at the kill) within 2 s (4 s for the slot on the killed node: its last heartbeat is
//! up to a 1 s heartbeat interval before the kill, its replacement metered from the first report that it
//! runs), never count the overlap twice, and be the same bytes when recomputed three times.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::DEPLOY;
use super::support::{Clock, Driver, E2e, HEARTBEAT, app_manifest, site, wait_for};

/// The replica: a busybox httpd started by a shell that records its start and, on SIGTERM, its stop
/// (`spawn`/`stop PORT EPOCH`). A release whose files hold `www/slow` waits 3 s before serving (so
/// its health check, and the old replica, wait with it: the overlap).
fn start_command(oracle: &str) -> String {
    format!(
        "echo spawn $PORT $(date +%s.%N) >> {oracle}; \
         trap 'echo stop $PORT $(date +%s.%N) >> {oracle}; exit 0' TERM; \
         if [ -f www/slow ]; then sleep 3; fi; \
         /bin/busybox httpd -f -p 127.0.0.1:$PORT -h www & wait"
    )
}

/// Each port's (start, stop) pairs from the oracle file.
fn oracle_intervals(text: &str) -> Vec<(u16, f64, Option<f64>)> {
    let mut out: Vec<(u16, f64, Option<f64>)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [what, port, t] = f[..] else { continue };
        let (port, t): (u16, f64) = (port.parse().unwrap(), t.parse().unwrap());
        match what {
            "spawn" => out.push((port, t, None)),
            "stop" => {
                if let Some(i) = out.iter_mut().rev().find(|i| i.0 == port && i.2.is_none()) {
                    i.2 = Some(t);
                }
            }
            _ => {}
        }
    }
    out
}

/// Seconds since the epoch, as the replicas' `date +%s.%N` writes them.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The length of the union of intervals.
fn union_seconds(mut v: Vec<(f64, f64)>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut total = 0.0;
    let mut cur: Option<(f64, f64)> = None;
    for (s, e) in v {
        match cur {
            Some((cs, ce)) if s <= ce => cur = Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                cur = Some((s, e));
            }
            None => cur = Some((s, e)),
        }
    }
    if let Some((s, e)) = cur {
        total += e - s;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metered_usage_matches_the_replicas_own_lifetimes_and_recomputes_to_the_same_bytes() {
    let mut clock = Clock::new();
    let Some(mut e) = E2e::new("metered_usage_matches", &[Driver::Process]).await else {
        return;
    };
    // The oracle's directory: the replicas run as an unprivileged user when the agent is root.
    let oracle_dir = std::env::temp_dir().join(format!("cairn-usage-{}", e.installation));
    std::fs::create_dir_all(&oracle_dir).unwrap();
    std::fs::set_permissions(
        &oracle_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let oracle = oracle_dir.join("lifetimes");
    let runtime = format!(
        "[runtime.metered]\ndrivers = [\"process\"]\nstart = \"{}\"\nport = 8080\n",
        start_command(oracle.to_str().unwrap())
    );
    // A crash-looping app: each start serves for 2 s, then the process exits and its supervisor starts
    // it again. Desired and placed, it is metered all along, from its first start to its removal.
    let crash_oracle = oracle_dir.join("crashes");
    let crashy_runtime = format!(
        "[runtime.crashy]\ndrivers = [\"process\"]\nstart = \"echo spawn $(date +%s.%N) >> {}; \
         /bin/busybox httpd -f -p 127.0.0.1:$PORT -h www & sleep 2; exit 1\"\nport = 8080\n",
        crash_oracle.display()
    );
    e.repo.write(
        "runtimes-metered.toml",
        &format!("{runtime}\n{crashy_runtime}"),
    );
    let a = e.app("meter", "metered", 2, &site("v1", true));
    let (app, src) = (a.name.clone(), &a.source);
    let crashy = e.app("crashy", "crashy", 1, &site("v1", true)).name;
    e.repo.node("n1", "");
    e.repo.node("n2", "");
    let plane = e
        .start(&[
            "--usage-rollup-interval",
            "1s",
            "--node-offline-after",
            "10s",
        ])
        .await;
    let agents = [
        ("n1", e.agent(&plane, "n1", Driver::Process, &[]).await),
        ("n2", e.agent(&plane, "n2", Driver::Process, &[]).await),
    ];
    clock.lap("serve and agents up");

    // Which node and slot each port is, read from the agents' process records while the replicas run.
    let ports: Arc<Mutex<BTreeMap<u16, (String, u32)>>> = Arc::default();
    // When the crash-looping app's replica record was first and last seen (it goes with the replica).
    let crashy_seen: Arc<Mutex<(Option<f64>, Option<f64>)>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (ports, stop) = (ports.clone(), stop.clone());
        let (crashy_seen, crashy) = (crashy_seen.clone(), crashy.clone());
        let records: Vec<(String, std::path::PathBuf)> = agents
            .iter()
            .map(|(n, a)| ((*n).to_owned(), a.dir.join("process")))
            .collect();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (node, d) in records.iter().flat_map(|(node, dir)| {
                    std::fs::read_dir(dir)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(move |d| (node, d))
                }) {
                    let Ok(bytes) = std::fs::read(d.path().join("record.json")) else {
                        continue;
                    };
                    let Ok(r) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                        continue;
                    };
                    if r["spec"]["app"] == crashy.as_str() {
                        let mut seen = crashy_seen.lock().unwrap();
                        let now = unix_now();
                        seen.0.get_or_insert(now);
                        seen.1 = Some(now);
                        continue;
                    }
                    if let (Some(port), Some(slot)) =
                        (r["port"].as_u64(), r["spec"]["slot"].as_u64())
                    {
                        ports
                            .lock()
                            .unwrap()
                            .insert(port as u16, (node.clone(), slot as u32));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    plane.wait_release(&app, 1, "live", DEPLOY).await;
    plane.wait_release(&crashy, 1, "live", DEPLOY).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    clock.lap("2 replicas live");

    // Scale to 1: one slot's replica is removed.
    let generation = plane.generation().await;
    e.repo.write(
        &format!("app-{app}.toml"),
        &app_manifest(&app, "metered", 1, src),
    );
    e.repo.commit();
    plane.wait_generation(generation + 1).await;
    wait_for("one replica stopped", Duration::from_secs(30), || async {
        let text = std::fs::read_to_string(&oracle).unwrap_or_default();
        (text.lines().filter(|l| l.starts_with("stop ")).count() >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    clock.lap("scaled to 1");

    // A zero-downtime release whose new replica waits 3 s before serving: the old one runs meanwhile.
    let mut v2 = site("v2", true);
    v2.push(("www/slow", "yes\n".to_owned()));
    src.commit(&v2);
    plane.wait_release(&app, 2, "live", DEPLOY).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    clock.lap("v2 live");

    // `cairn serve` SIGKILLed for 20 s: the replica runs on, and so does its metering (its interval
    // stays open; nothing is closed or reopened when serve comes back).
    e.kill_serve();
    tokio::time::sleep(Duration::from_secs(20)).await;
    e.restart_serve(&plane).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    clock.lap("serve down for 20 s and back");

    // The crash-looping app is removed: metered from its first start to the end of its replica.
    e.remove_app(&plane, &crashy).await;
    wait_for(
        "the crash-looping app's replica gone and its interval closed",
        Duration::from_secs(30),
        || async {
            let open = plane
                .rows(&format!(
                    "SELECT count(*) AS n FROM usage_intervals \
                     WHERE app = '{crashy}' AND ended_at IS NULL"
                ))
                .await;
            let last = crashy_seen.lock().unwrap().1?;
            (open[0]["n"].as_i64()? == 0 && unix_now() - last > 1.0).then_some(())
        },
    )
    .await;
    clock.lap("crash-looping app removed");

    // The agent of the node running the slot is SIGKILLed: past the offline threshold the slot is
    // rescheduled on the other node. The killed node's replica process runs on, unmetered.
    let placed = plane
        .rows(&format!("SELECT node FROM placements WHERE app = '{app}'"))
        .await;
    let killed = placed[0]["node"].as_str().unwrap().to_owned();
    let other = if killed == "n1" { "n2" } else { "n1" };
    let killed_at = unix_now();
    agents.iter().find(|(n, _)| *n == killed).unwrap().1.kill();
    wait_for(
        "the slot rescheduled and metered on the other node",
        Duration::from_secs(60),
        || async {
            let r = plane
                .rows(&format!(
                    "SELECT count(*) AS n FROM usage_intervals \
                     WHERE node = '{other}' AND ended_at IS NULL"
                ))
                .await;
            (r[0]["n"].as_i64()? >= 1).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    clock.lap("agent killed, slot rescheduled");

    e.remove_app(&plane, &app).await;
    wait_for("every interval closed", Duration::from_secs(30), || async {
        let open = plane
            .rows("SELECT count(*) AS n FROM usage_intervals WHERE ended_at IS NULL")
            .await;
        let text = std::fs::read_to_string(&oracle).unwrap_or_default();
        let ports = ports.lock().unwrap().clone();
        let stopped = oracle_intervals(&text)
            .iter()
            .filter(|i| ports.get(&i.0).is_none_or(|(n, _)| *n != killed))
            .all(|i| i.2.is_some());
        (open[0]["n"].as_i64()? == 0 && stopped).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.await.unwrap();
    clock.lap("removed");

    // The oracle: each slot's process lifetimes, their union, and the overlap in them.
    let text = std::fs::read_to_string(&oracle).unwrap();
    let ports = ports.lock().unwrap().clone();
    let mut by_slot: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
    let mut on_killed = std::collections::BTreeSet::new();
    for (port, s, end) in oracle_intervals(&text) {
        let (node, slot) = ports
            .get(&port)
            .unwrap_or_else(|| panic!("port {port} was never seen in a record: {ports:?}\n{text}"));
        // On the killed node, metering ends with the node's last heartbeat: the kill.
        if *node == killed {
            on_killed.insert(*slot);
        }
        let end = if *node == killed {
            end.unwrap_or(killed_at).min(killed_at)
        } else {
            end.unwrap()
        };
        by_slot.entry(*slot).or_default().push((s, end));
    }
    assert_eq!(by_slot.len(), 2, "two slots ran: {by_slot:?}\n{text}");

    // Cairn's CSV, recomputed three times: the same bytes.
    let mut outputs = Vec::new();
    for _ in 0..3 {
        let out = plane.cairn(&["usage", "--by", "slot", "--format", "csv", "--recompute"]);
        assert!(
            out.status.success(),
            "cairn usage: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(out.stdout);
    }
    assert!(
        outputs.windows(2).all(|w| w[0] == w[1]),
        "recomputing changed the CSV"
    );
    let csv = String::from_utf8(outputs.pop().unwrap()).unwrap();

    // The admin API gives the same bytes through `cairn usage --server`, refuses a bad month or
    // grouping (400) and a missing token (401); /metrics has the month-to-date total.
    let out = plane.cairn(&["token", "create", "--name", "ops"]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = std::process::Command::new(crate::agents::support::CAIRN)
        .args(["usage", "--by", "slot", "--format", "csv"])
        .env("CAIRN_SERVER", &plane.url)
        .env("CAIRN_TOKEN", &token)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), csv);
    let http = reqwest::Client::new();
    for (path, auth, want) in [
        ("/api/v1/usage?month=2026-13", true, 400),
        ("/api/v1/usage?by=colour", true, 400),
        ("/api/v1/usage", false, 401),
        ("/api/v1/usage/statements/2026-11", true, 404),
        ("/api/v1/usage?by=plan", true, 200),
    ] {
        let mut req = http.get(format!("{}{path}", plane.url));
        if auth {
            req = req.bearer_auth(&token);
        }
        let status = req.send().await.unwrap().status().as_u16();
        assert_eq!(status, want, "{path}");
    }
    let metrics = http
        .get(format!("{}/metrics", plane.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cairn_usage_month_to_date_minor "),
        "{metrics}"
    );
    eprintln!("{csv}");
    let mut cairn: BTreeMap<u32, f64> = BTreeMap::new();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f[0] == app {
            cairn.insert(f[1].parse().unwrap(), f[2].parse().unwrap());
        }
    }
    let recorded = plane
        .rows(
            "SELECT slot, node, extract(epoch FROM started_at)::float8 AS s, \
             extract(epoch FROM ended_at)::float8 AS e, opened_by, closed_by \
             FROM usage_intervals ORDER BY id",
        )
        .await;
    eprintln!("killed {killed} at {killed_at:.3}; oracle {by_slot:?}");
    for r in &recorded {
        eprintln!("interval {r}");
    }
    let mut overlapped = false;
    for (slot, lifetimes) in &by_slot {
        let union = union_seconds(lifetimes.clone());
        let summed: f64 = lifetimes.iter().map(|(s, e)| e - s).sum();
        let metered = cairn.get(slot).copied().unwrap_or(0.0);
        eprintln!(
            "slot {slot}: processes {summed:.1} s, their union {union:.1} s, metered {metered} s"
        );
        // 2 s, and for the slot that ran on the killed node two heartbeat intervals more: metering
        // ends at the node's last heartbeat, up to an interval before the kill (the test observes the
        // kill, not the heartbeat), and its replacement is metered from the first report that it runs
        // (a heartbeat or its deploy's result), up to an interval after it started.
        let tolerance = 2.0
            + if on_killed.contains(slot) {
                2.0 * HEARTBEAT.as_secs_f64()
            } else {
                0.0
            };
        assert!(
            (metered - union).abs() <= tolerance,
            "slot {slot}: metered {metered} s, the replicas ran {union:.1} s\n{csv}\n{text}"
        );
        if summed - union >= 3.0 {
            overlapped = true;
            assert!(
                metered < summed - 1.0,
                "slot {slot}: the overlap was counted twice ({metered} s metered, {summed:.1} s summed)"
            );
        }
    }
    assert!(
        overlapped,
        "the release overlapped old and new replicas: {by_slot:?}"
    );

    // The crash-looping app: started over and over, metered as one stretch from its first start to the
    // end of its replica (its record gone), within 2 s and a heartbeat.
    let crashes = std::fs::read_to_string(&crash_oracle).unwrap();
    let spawns: Vec<f64> = crashes
        .lines()
        .filter_map(|l| l.strip_prefix("spawn ")?.trim().parse().ok())
        .collect();
    assert!(
        spawns.len() >= 3,
        "the app crash-looped (it started {} times)",
        spawns.len()
    );
    let (_, gone) = *crashy_seen.lock().unwrap();
    let expected = gone.unwrap() - spawns[0];
    let metered: f64 = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[0] == crashy)
        .map(|f| f[2].parse::<f64>().unwrap())
        .sum();
    eprintln!(
        "crash-looping app: {} starts over {expected:.1} s, metered {metered} s",
        spawns.len()
    );
    assert!(
        (metered - expected).abs() <= 2.0 + HEARTBEAT.as_secs_f64(),
        "crash-looping app: metered {metered} s, desired and placed for {expected:.1} s\n{csv}"
    );
    let _ = std::fs::remove_dir_all(&oracle_dir);
    clock.lap("checked");
}
