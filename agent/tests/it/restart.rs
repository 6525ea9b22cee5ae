//! An agent that restarts finds the process replicas it started (issue 12): a SIGKILLed agent's replica
//! keeps serving, the next agent adopts it (same process, no downtime), supervises it (restarts it with
//! its secrets when it crashes) and really stops it on remove, so no orphan keeps the decrypted secret.
//!
//! The SIGKILLed "agent" is this test binary run again as a child, on the ignored test
//! [`restart_host`], which starts one replica with a process driver that keeps replicas on exit.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_agent::{Driver, ProcessConfig, ProcessDriver, ReplicaSpec, ReplicaState};
use cairn_schema::{Identity, Name};

use crate::support::{self, AppRepo, Installation, bounded, spec};

const HOST_ENV: &str = "CAIRN_TEST_RESTART_HOST";

fn config(inst_id: &Name, node: &Name, dir: &Path) -> ProcessConfig {
    let mut cfg = ProcessConfig::new(inst_id.clone(), node.clone(), dir.join("apps"));
    cfg.state = dir.join("state/process");
    cfg.stop_grace = Duration::from_secs(2);
    cfg.backoff_initial = Duration::from_millis(100);
    cfg
}

/// A source tree for the test app, without git (the driver builds from a directory).
fn context(dir: &Path) -> PathBuf {
    let ctx = dir.join("context");
    std::fs::create_dir_all(ctx.join("www")).unwrap();
    std::fs::write(ctx.join("www/index.html"), "v1\n").unwrap();
    std::fs::write(ctx.join("www/healthz"), "ok\n").unwrap();
    ctx
}

/// Processes whose environment holds `needle`.
fn environ_holding(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(e.path().join("environ"))
            && env.windows(needle.len()).any(|w| w == needle.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

fn answers(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split("\r\n\r\n").nth(1).map(str::to_owned)
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The child "agent": starts the replica described in `$CAIRN_TEST_RESTART_HOST/host.json`, says
/// `READY <pid> <port>`, and waits to be killed.
#[tokio::test]
#[ignore = "the agent that process_agent_restart_* SIGKILLs; run only by that test"]
async fn restart_host() {
    let dir = PathBuf::from(std::env::var(HOST_ENV).expect("run by the restart test"));
    let job: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("host.json")).unwrap()).unwrap();
    let spec: ReplicaSpec = serde_json::from_value(job["spec"].clone()).unwrap();
    let identity =
        Identity::parse(&std::fs::read_to_string(dir.join("identity.txt")).unwrap()).unwrap();
    let mut cfg = config(&spec.installation, &Name::new("node-a").unwrap(), &dir);
    cfg.keep_on_exit = true;
    let driver = ProcessDriver::new(cfg);
    let image = cairn_agent::ImageId(job["image"].as_str().unwrap().to_owned());
    let replica = driver
        .start_replica(&spec, &image, &identity)
        .await
        .unwrap();
    driver
        .wait_healthy(&replica, "x", &spec.health)
        .await
        .unwrap();
    println!(
        "READY {} {}",
        driver.pid(&replica.id).unwrap(),
        replica.addr.port()
    );
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_agent_restart_after_sigkill_adopts_its_replica_and_a_remove_really_stops_it() {
    const TEST: &str = "process_agent_restart_after_sigkill_adopts_its_replica";
    if !support::tools(TEST) {
        return;
    }
    bounded(120, async {
        let inst = Installation::new(None);
        let dir = inst.dir.path();
        let repo = AppRepo::new(dir, "web");
        let app = inst.app();
        let identity = Identity::generate();
        let canary = format!("canary-{}", inst.id);
        let mut s = spec(
            &inst,
            &app,
            &repo,
            1,
            &"a".repeat(40),
            support::process_build(),
        );
        s.build.commands.clear();
        s.secret_env = Some(
            cairn_schema::secret::encrypt(
                serde_json::json!({ "CANARY": canary })
                    .to_string()
                    .as_bytes(),
                &[identity.recipient()],
            )
            .unwrap(),
        );

        // The release, built once by a driver of its own.
        let builder = ProcessDriver::new(config(&inst.id, &inst.node, dir));
        let image = builder
            .build_image(&s, &context(dir), &support::Discard)
            .await
            .unwrap();
        drop(builder);
        std::fs::write(
            dir.join("identity.txt"),
            identity.to_file_text("test").as_bytes(),
        )
        .unwrap();
        std::fs::write(
            dir.join("host.json"),
            serde_json::to_vec(&serde_json::json!({ "spec": s, "image": image.0 })).unwrap(),
        )
        .unwrap();

        // The first agent starts the replica, then is SIGKILLed.
        let mut host = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "restart::restart_host",
                "--ignored",
                "--nocapture",
            ])
            .env(HOST_ENV, dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = host.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| l.strip_prefix("READY ").map(str::to_owned))
        })
        .await
        .unwrap()
        .expect("the first agent started its replica");
        let mut words = ready.split_whitespace().map(|w| w.parse::<i32>().unwrap());
        let (pid, port) = (words.next().unwrap(), words.next().unwrap() as u16);
        host.kill().unwrap();
        host.wait().unwrap();

        // Decided: process replicas outlive their agent (no downtime across an agent upgrade).
        assert_eq!(
            answers(port).as_deref(),
            Some("v1\n"),
            "served while no agent runs"
        );
        assert!(environ_holding(&canary).contains(&pid));

        // The next agent adopts it: the same process, reported as running.
        let driver = Arc::new(ProcessDriver::new(config(&inst.id, &inst.node, dir)));
        let found = driver.adopt(&identity).await.unwrap();
        let name = s.replica_name();
        assert_eq!(found.adopted, vec![name.clone()], "{found:?}");
        let listed = driver.list_replicas().await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].state, ReplicaState::Running);
        assert_eq!(listed[0].addr.map(|a| a.port()), Some(port));
        let id = listed[0].id.clone();
        wait_for("the adopted pid", || driver.pid(&id)).await;
        assert_eq!(driver.pid(&id), Some(pid), "adopted, not restarted");

        // Still supervised: a crash of the adopted process starts it again, secrets and all.
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let again = wait_for("the restarted replica", || {
            driver
                .pid(&id)
                .filter(|p| *p != pid && answers(port).as_deref() == Some("v1\n"))
        })
        .await;
        assert!(environ_holding(&canary).contains(&again));

        // A remove stops it for real: nothing keeps listening, nothing keeps the secret.
        driver.remove_replica(&id).await.unwrap();
        assert!(driver.list_replicas().await.unwrap().is_empty());
        assert_eq!(answers(port), None, "the removed replica still answers");
        assert_eq!(environ_holding(&canary), Vec::<i32>::new());
        assert!(!dir.join("state/process").join(&name).exists());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_agent_restart_kills_an_unrecorded_orphan_and_a_remove_of_an_unknown_replica_stops_it()
 {
    const TEST: &str = "process_agent_restart_kills_an_unrecorded_orphan";
    if !support::tools(TEST) {
        return;
    }
    bounded(60, async {
        let inst = Installation::new(None);
        let dir = inst.dir.path();
        let repo = AppRepo::new(dir, "web");
        let identity = Identity::generate();
        let mk = |app: &Name| {
            let mut s = spec(
                &inst,
                app,
                &repo,
                1,
                &"b".repeat(40),
                support::process_build(),
            );
            s.build.commands.clear();
            s
        };
        let (a, b) = (mk(&inst.app()), mk(&inst.app()));
        let ctx = context(dir);
        let mut cfg = config(&inst.id, &inst.node, dir);
        cfg.keep_on_exit = true;
        let first = ProcessDriver::new(cfg);
        let (ia, ib) = (
            first
                .build_image(&a, &ctx, &support::Discard)
                .await
                .unwrap(),
            first
                .build_image(&b, &ctx, &support::Discard)
                .await
                .unwrap(),
        );
        let ra = first.start_replica(&a, &ia, &identity).await.unwrap();
        let rb = first.start_replica(&b, &ib, &identity).await.unwrap();
        for r in [&ra, &rb] {
            first.wait_healthy(r, "x", &a.health).await.unwrap();
        }
        // A pid is known once the supervisor has recorded it.
        let pa = wait_for("A's pid", || first.pid(&ra.id)).await;
        wait_for("B's pid", || first.pid(&rb.id)).await;
        // The agent "dies" (its replicas kept); A's record is lost, as if the agent died between
        // starting it and recording it.
        drop(first);
        std::fs::remove_dir_all(dir.join("state/process").join(a.replica_name())).unwrap();
        assert!(answers(ra.addr.port()).is_some() && answers(rb.addr.port()).is_some());

        let driver = ProcessDriver::new(config(&inst.id, &inst.node, dir));
        let found = driver.adopt(&identity).await.unwrap();
        assert_eq!(found.adopted, vec![b.replica_name()], "{found:?}");
        wait_for("the orphan to die", || {
            (!std::path::Path::new(&format!("/proc/{pa}")).exists()
                || std::fs::read_to_string(format!("/proc/{pa}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")))
            .then_some(())
        })
        .await;
        assert_eq!(
            answers(ra.addr.port()),
            None,
            "the unrecorded orphan still serves"
        );
        assert!(
            answers(rb.addr.port()).is_some(),
            "the recorded one was adopted"
        );

        // A driver that never adopted (or lost its memory) still stops a recorded replica on remove.
        let blind = ProcessDriver::new(config(&inst.id, &inst.node, dir));
        let id = cairn_agent::ReplicaId(b.replica_name());
        drop(driver);
        blind.remove_replica(&id).await.unwrap();
        assert_eq!(
            answers(rb.addr.port()),
            None,
            "a remove left the replica running"
        );
    })
    .await;
}
