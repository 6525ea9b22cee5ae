//! The replica lifecycle with the process driver: busybox httpd as a supervised child process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_agent::deploy::ImageSource;
use cairn_agent::{
    DeployError, Driver, DriverError, HealthSpec, LogLine, LogStream, ProcessConfig, ProcessDriver,
    ReplicaState, Stage,
};

use crate::support::{
    self, AppRepo, Installation, Node, assert_steady, assert_switch, bounded, get, spec,
};

fn driver(inst: &Installation) -> Arc<ProcessDriver> {
    let mut cfg = ProcessConfig::new(inst.id.clone(), inst.node.clone(), inst.path("releases"));
    cfg.stop_grace = Duration::from_secs(2);
    cfg.backoff_initial = Duration::from_millis(100);
    Arc::new(ProcessDriver::new(cfg))
}

/// Live (not zombie) processes in a process group, from /proc: `(pid, command)`.
fn group_members(pgid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces, so split after the last `)`.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let comm = head
            .split_once('(')
            .map(|(_, c)| c)
            .unwrap_or("")
            .to_owned();
        if fields.len() > 2 && fields[0] != "Z" && fields[2].parse() == Ok(pgid) {
            out.push((pid, comm));
        }
    }
    out
}

/// Whether a group still has live members, giving it up to two seconds to go.
async fn group_alive(pgid: i32) -> bool {
    for _ in 0..40 {
        if group_members(pgid).is_empty() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("group {pgid} still has {:?}", group_members(pgid));
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_deploys_switch_without_failed_requests_restart_on_crash_and_stop_whole_groups() {
    const TEST: &str = "process_deploys_switch_without_failed_requests";
    support::capture();
    if !support::tools(TEST) {
        return;
    }
    bounded(180, async {
        let inst = Installation::new(None);
        let repo = AppRepo::new(inst.dir.path(), "web");
        let app = inst.app();
        let host = support::host(&app).to_string();
        let driver = driver(&inst);
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let client = support::client();

        let v1 = repo.commit_version("v1");
        let build_log = Mutex::new(Vec::<LogLine>::new());
        let r1 = node
            .deployer
            .deploy(
                &spec(&inst, &app, &repo, 1, &v1, support::process_build()),
                &build_log,
            )
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        eprintln!("process v1 timings: {:?}", r1.timings);
        assert_eq!(r1.image_source, ImageSource::Built);
        assert!(r1.replica.addr.ip().is_loopback());
        assert_eq!(
            get(&client, node.proxy_addr, &host, "/").await.unwrap(),
            (200, "v1\n".into())
        );
        assert_eq!(
            get(&client, node.proxy_addr, &host, "/build.txt")
                .await
                .unwrap(),
            (200, "built-v1\n".into())
        );
        assert!(
            build_log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.stream == LogStream::Agent && l.text.contains("$ echo built"))
        );

        // A crash: the supervisor restarts it (same port), and it serves again.
        let pid = driver.pid(&r1.replica.id).expect("it runs");
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let mut back = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let st = driver.status(&r1.replica.id).await.unwrap().unwrap();
            if st.restarts >= 1
                && driver.pid(&r1.replica.id).is_some_and(|p| p != pid)
                && get(&client, node.proxy_addr, &host, "/").await == Ok((200, "v1\n".into()))
            {
                back = true;
                break;
            }
        }
        assert!(back, "the crashed replica came back");
        let logs = driver.logs(&r1.replica.id, 20).await.unwrap();
        assert!(
            logs.iter().any(|l| l.text.contains("restarting in")),
            "{logs:#?}"
        );
        let v1_pgid = driver.pid(&r1.replica.id).unwrap();

        // v2 under polling.
        let v2 = repo.commit_version("v2");
        let poller = support::poll(node.proxy_addr, &host, Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r2 = node
            .deployer
            .deploy(
                &spec(&inst, &app, &repo, 2, &v2, support::process_build()),
                &support::Discard,
            )
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (elapsed, seen) = poller.finish().await;
        let (n, rate) = assert_switch(&seen, elapsed, "v1", "v2");
        eprintln!(
            "process v2 timings: {:?}; {n} requests at {rate:.0}/s, none failed",
            r2.timings
        );
        assert_eq!(r2.replaced, vec![r1.replica.id.clone()]);
        assert!(
            !group_alive(v1_pgid).await,
            "the old replica's whole process group is gone"
        );

        // A release that changes only the env and the start command runs from v2's build directory:
        // nothing is copied or built again.
        let builds = driver.builds_run();
        let mut env_only = spec(&inst, &app, &repo, 2, &v2, support::process_build());
        env_only.release = 20;
        env_only
            .env
            .insert(cairn_schema::EnvName::new("GREETING").unwrap(), "hi".into());
        env_only.build.start = Some(format!(
            "GREETING=$GREETING exec {} httpd -f -p 127.0.0.1:$PORT -h www",
            support::BUSYBOX
        ));
        let r20 = node
            .deployer
            .deploy(&env_only, &support::Discard)
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        assert_eq!(r20.image_source, ImageSource::Cached);
        assert_eq!(r20.image, r2.image, "v2's build directory");
        assert_eq!(driver.builds_run(), builds);
        assert_eq!(
            get(&client, node.proxy_addr, &host, "/").await.unwrap(),
            (200, "v2\n".into())
        );
        // Back to release 2 (what the rest expects runs), from the same directory again.
        let back = node
            .deployer
            .deploy(
                &spec(&inst, &app, &repo, 2, &v2, support::process_build()),
                &support::Discard,
            )
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        assert_eq!(back.image_source, ImageSource::Cached);
        assert_eq!(driver.builds_run(), builds);

        // Failures keep v2 serving.
        let poller = support::poll(node.proxy_addr, &host, Duration::from_millis(20));
        let v3 = repo.commit_version("v3");
        let mut broken = support::process_build();
        broken
            .commands
            .push("echo failing on purpose >&2; exit 3".into());
        let build_log = Mutex::new(Vec::<LogLine>::new());
        let err = node
            .deployer
            .deploy(&spec(&inst, &app, &repo, 3, &v3, broken), &build_log)
            .await
            .unwrap_err();
        assert_eq!(err.stage, Stage::Build, "{}", err.reason());
        assert!(matches!(
            &err.error,
            DeployError::Build(DriverError::Build { .. })
        ));
        assert!(
            err.reason().contains("exited with status 3"),
            "{}",
            err.reason()
        );
        assert!(
            build_log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.text == "failing on purpose")
        );

        let v4 = repo.commit_version("v4");
        let mut unhealthy = spec(&inst, &app, &repo, 4, &v4, support::process_build());
        unhealthy.health = HealthSpec {
            path: "/missing".into(),
            timeout_ms: 500,
            attempts: 5,
        };
        let err = node
            .deployer
            .deploy(&unhealthy, &support::Discard)
            .await
            .unwrap_err();
        assert_eq!(err.stage, Stage::Healthy, "{}", err.reason());
        assert!(err.reason().contains("HTTP 404"), "{}", err.reason());

        // A start command that dies at once fails fast instead of using up every attempt.
        let v5 = repo.commit_version("v5");
        let mut crashing = support::process_build();
        crashing.start = Some("echo cannot start >&2; exit 1".into());
        let mut s5 = spec(&inst, &app, &repo, 5, &v5, crashing);
        s5.health.attempts = 100;
        let err = node
            .deployer
            .deploy(&s5, &support::Discard)
            .await
            .unwrap_err();
        assert_eq!(err.stage, Stage::Healthy, "{}", err.reason());
        assert!(
            err.timings.healthy.unwrap() < Duration::from_secs(20),
            "{:?}",
            err.timings
        );
        let DeployError::Unhealthy { logs, .. } = &err.error else {
            panic!("{err:?}")
        };
        assert!(logs.iter().any(|l| l.text == "cannot start"), "{logs:#?}");

        let (_, seen) = poller.finish().await;
        assert_steady(&seen, "v2");
        let left = driver.list_replicas().await.unwrap();
        assert_eq!(left.len(), 1, "{left:#?}");
        assert_eq!(
            (left[0].release, &left[0].state),
            (2, &ReplicaState::Running)
        );

        // Stopping kills the whole process group, including a child the app left behind.
        let v6 = repo.commit_version("v6");
        let mut forking = support::process_build();
        forking.start = Some(format!(
            "sleep 300 & exec {} httpd -f -p 127.0.0.1:$PORT -h www",
            support::BUSYBOX
        ));
        let r6 = node
            .deployer
            .deploy(
                &spec(&inst, &app, &repo, 6, &v6, forking),
                &support::Discard,
            )
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        let pgid = driver.pid(&r6.replica.id).unwrap();
        assert!(
            group_members(pgid).len() >= 2,
            "httpd and sleep run: {:?}",
            group_members(pgid)
        );
        node.deployer.remove_slot(&app, 0).await.unwrap();
        assert!(!group_alive(pgid).await, "sleep 300 went with its group");
        assert!(driver.list_replicas().await.unwrap().is_empty());
        let (status, _) = get(&client, node.proxy_addr, &host, "/").await.unwrap();
        assert_eq!(
            status, 404,
            "the app's last replica is gone: its host is unknown"
        );
    })
    .await;
}
