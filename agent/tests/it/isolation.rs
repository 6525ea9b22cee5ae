//! What an app can reach (issue 12): a process-driver app runs as an unprivileged user and cannot read
//! the agent's identity, credential or replica records; a container runs without capabilities beyond
//! binding a low port, with no-new-privileges, optionally a read-only root filesystem, and no route to
//! the cloud metadata address; a new Docker driver (an agent restart) finds and removes the containers
//! of the one before.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::Duration;

use cairn_agent::driver::process::AppUser;
use cairn_agent::{BuildSpec, DockerConfig, DockerDriver, ProcessConfig, ProcessDriver};

use crate::support::{self, AppRepo, BUSYBOX, Installation, Node, bounded, get, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_apps_run_as_an_unprivileged_user_and_cannot_read_the_agents_identity() {
    const TEST: &str = "process_apps_run_as_an_unprivileged_user";
    if !support::tools(TEST) {
        return;
    }
    if !rustix::process::geteuid().is_root() {
        support::missing(
            TEST,
            "root",
            "switching an app's user needs the agent to be root",
        );
        return;
    }
    bounded(90, async {
        let inst = Installation::new(None);
        let dir = inst.dir.path();
        // The agent's data directory (0700, as DataDir makes it) with its identity, and the apps
        // directory beside it; the temp dir above both lets others through, as /var/lib does.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        let data = cairn_agent::datadir::DataDir::open(dir.join("data")).unwrap();
        data.identity().unwrap();
        let mut cfg = ProcessConfig::new(inst.id.clone(), inst.node.clone(), dir.join("apps"));
        cfg.state = data.path().join("process");
        cfg.run_as = Some(AppUser::NOBODY);
        cfg.stop_grace = Duration::from_secs(2);
        let driver = Arc::new(ProcessDriver::new(cfg));
        let repo = AppRepo::new(dir, "web");
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let app = inst.app();
        let host = support::host(&app).to_string();
        let v1 = repo.commit_version("v1");
        let identity_file = data.identity_path();
        let record_dir = data.path().join("process");
        let probe = format!(
            "{{ id -u; id -g; cat {id} || echo denied-identity; ls {records} || echo denied-records; \
             cat /proc/{agent}/environ || echo denied-environ; touch $HOME/mine && echo home-writable; \
             stat -c %a . ; }} > www/probe.txt 2>&1; exec {BUSYBOX} httpd -f -p 127.0.0.1:$PORT -h www",
            id = identity_file.display(),
            records = record_dir.display(),
            agent = std::process::id(),
        );
        let build = BuildSpec {
            start: Some(probe),
            ..support::process_build()
        };
        let r = node
            .deployer
            .deploy(&spec(&inst, &app, &repo, 1, &v1, build), &support::Discard)
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        let client = support::client();
        let (status, probe) = get(&client, node.proxy_addr, &host, "/probe.txt")
            .await
            .unwrap();
        assert_eq!(status, 200, "{probe}");
        eprintln!("{probe}");
        let lines: Vec<&str> = probe.lines().collect();
        assert_eq!(&lines[..2], ["65534", "65534"], "{probe}");
        for denied in ["denied-identity", "denied-records", "denied-environ"] {
            assert!(probe.contains(denied), "{denied}: {probe}");
        }
        assert!(!probe.contains("AGE-SECRET-KEY"), "{probe}");
        assert!(probe.contains("home-writable"), "its own directory: {probe}");
        assert!(probe.contains("\n700\n"), "private working dir: {probe}");
        // The agent's state stays the agent's.
        let mode = std::fs::metadata(data.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // The build ran as the app user too (its output is in the app's own tree).
        let meta = std::fs::metadata(
            std::path::Path::new(&r.image.0).join("app/www/build.txt"),
        )
        .unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
    })
    .await;
}

/// 169.254.169.254 on the host's loopback for the length of a test.
struct MetadataAddress;

impl MetadataAddress {
    fn add() -> Option<MetadataAddress> {
        let out = std::process::Command::new("ip")
            .args(["addr", "add", "169.254.169.254/32", "dev", "lo"])
            .output()
            .ok()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        (out.status.success() || stderr.contains("File exists")).then_some(MetadataAddress)
    }
}

impl Drop for MetadataAddress {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", "169.254.169.254/32", "dev", "lo"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_containers_cannot_reach_the_metadata_address_and_hold_no_capabilities() {
    const TEST: &str = "docker_containers_cannot_reach_the_metadata_address";
    support::capture();
    let Some(docker) = support::docker(TEST).await else {
        return;
    };
    if !support::tools(TEST) {
        return;
    }
    let Some(_meta) = MetadataAddress::add() else {
        support::missing(
            TEST,
            "169.254.169.254 on lo",
            "`ip addr add` failed (needs root)",
        );
        return;
    };
    bounded(180, async {
        // A listener for the metadata address and for the host's bridge address alike.
        let listener = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::Write;
            for s in listener.incoming().flatten() {
                let mut s = s;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nsecret-role-credentials\n");
            }
        });
        let inst = Installation::new(Some(docker.clone()));
        let base = inst.busybox_image().await;
        let repo = AppRepo::new(inst.dir.path(), "web");
        let app = inst.app();
        let host = support::host(&app).to_string();
        let driver = Arc::new(DockerDriver::with_client(
            docker.clone(),
            DockerConfig::new(inst.id.clone(), inst.node.clone()),
        ));
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let v1 = repo.commit_version("v1");
        // Both fetches in the background, so the health check passes meanwhile.
        let start = format!(
            "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status > www/caps.txt; \
             (printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 169.254.169.254 {port} > www/meta.txt 2>&1; echo rc=$? >> www/meta.txt; \
              gw=$(ip route | awk '/^default/ {{print $3}}'); \
              printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 $gw {port} > www/gw.txt 2>&1; echo rc=$? >> www/gw.txt) & \
             exec httpd -f -p $PORT -h /app/www"
        );
        let build = BuildSpec {
            start: Some(start),
            ..support::docker_build(&base)
        };
        node.deployer
            .deploy(&spec(&inst, &app, &repo, 1, &v1, build), &support::Discard)
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        let client = support::client();
        let mut results = (String::new(), String::new());
        for _ in 0..100 {
            let meta = get(&client, node.proxy_addr, &host, "/meta.txt").await.unwrap();
            let gw = get(&client, node.proxy_addr, &host, "/gw.txt").await.unwrap();
            if meta.1.contains("rc=") && gw.1.contains("rc=") {
                results = (meta.1, gw.1);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (meta, gw) = results;
        eprintln!("metadata: {meta:?}; gateway: {gw:?}");
        assert!(
            gw.contains("secret-role-credentials") && gw.contains("rc=0"),
            "the container reaches the host through its gateway (the probe works): {gw:?}"
        );
        assert!(
            !meta.contains("secret-role-credentials") && !meta.contains("rc=0"),
            "the container reached the metadata address: {meta:?}"
        );
        let (_, caps) = get(&client, node.proxy_addr, &host, "/caps.txt").await.unwrap();
        // CAP_NET_BIND_SERVICE (bit 10) and nothing else; no-new-privileges set.
        assert!(caps.contains("CapEff:\t0000000000000400"), "{caps}");
        assert!(caps.contains("NoNewPrivs:\t1"), "{caps}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_read_only_rootfs_keeps_the_app_from_writing_its_image_and_a_new_driver_adopts_it() {
    const TEST: &str = "docker_read_only_rootfs_keeps_the_app_from_writing";
    support::capture();
    let Some(docker) = support::docker(TEST).await else {
        return;
    };
    if !support::tools(TEST) {
        return;
    }
    bounded(180, async {
        let inst = Installation::new(Some(docker.clone()));
        let base = inst.busybox_image().await;
        let repo = AppRepo::new(inst.dir.path(), "web");
        let app = inst.app();
        let host = support::host(&app).to_string();
        let mut cfg = DockerConfig::new(inst.id.clone(), inst.node.clone());
        cfg.read_only_rootfs = true;
        let driver = Arc::new(DockerDriver::with_client(docker.clone(), cfg.clone()));
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let v1 = repo.commit_version("v1");
        let build = BuildSpec {
            start: Some(
                "mkdir -p /tmp/www && cp -r /app/www/. /tmp/www/ && \
                 { touch /app/probe 2>/dev/null && echo writable || echo read-only; } > /tmp/www/rootfs.txt; \
                 exec httpd -f -p $PORT -h /tmp/www"
                    .into(),
            ),
            ..support::docker_build(&base)
        };
        let r = node
            .deployer
            .deploy(&spec(&inst, &app, &repo, 1, &v1, build), &support::Discard)
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        let client = support::client();
        assert_eq!(
            get(&client, node.proxy_addr, &host, "/rootfs.txt").await.unwrap(),
            (200, "read-only\n".into())
        );

        // An agent restart: a new driver and an empty proxy find the container, route it, remove it.
        drop(node);
        let again = Arc::new(DockerDriver::with_client(docker.clone(), cfg));
        let node = Node::start(&inst, again.clone(), repo.rewrites()).await;
        assert_eq!(node.deployer.restore_routes().await.unwrap(), 1);
        assert_eq!(
            get(&client, node.proxy_addr, &host, "/").await.unwrap(),
            (200, "v1\n".into())
        );
        let removed = node.deployer.remove_slot(&app, 0).await.unwrap();
        assert_eq!(removed, vec![r.replica.id.clone()]);
        assert!(inst.containers().await.is_empty());
    })
    .await;
}
