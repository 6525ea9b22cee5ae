//! The whole replica lifecycle with the real Docker engine: build, run, health-gated replace under load,
//! failures that leave the old release serving, and what the containers are (and are not) allowed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_agent::deploy::ImageSource;
use cairn_agent::{
    DeployError, DockerConfig, DockerDriver, Driver, DriverError, HealthSpec, LogLine,
    ReplicaState, Stage,
};

use crate::support::{
    self, AppRepo, Installation, Node, assert_steady, assert_switch, bounded, docker_build, get,
    spec,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_deploys_switch_without_failed_requests_and_failures_keep_the_old_release() {
    const TEST: &str = "docker_deploys_switch_without_failed_requests";
    support::capture();
    let Some(docker) = support::docker(TEST).await else {
        return;
    };
    if !support::tools(TEST) {
        return;
    }
    bounded(300, async {
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
        let client = support::client();

        let (status, body) = get(&client, node.proxy_addr, &host, "/").await.unwrap();
        assert_eq!(status, 404, "{body}");
        assert!(body.contains(&host), "{body}");

        // v1: fetched, built, started, healthy, routed.
        let v1 = repo.commit_version("v1");
        let build_log = Mutex::new(Vec::<LogLine>::new());
        let r1 = node
            .deployer
            .deploy(
                &spec(&inst, &app, &repo, 1, &v1, docker_build(&base)),
                &build_log,
            )
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        eprintln!("docker v1 timings: {:?}", r1.timings);
        assert_eq!(r1.image_source, ImageSource::Built);
        assert!(r1.timings.fetch.is_some() && r1.timings.build.is_some());
        let lines: Vec<String> = build_log
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.text.clone())
            .collect();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("RUN") && l.contains("build.txt")),
            "{lines:#?}"
        );
        assert_eq!(
            get(&client, node.proxy_addr, &host, "/").await.unwrap(),
            (200, "v1\n".into())
        );
        assert_eq!(
            get(&client, node.proxy_addr, &host, "/build.txt")
                .await
                .unwrap(),
            (200, "built-v1\n".into()),
            "the runtime's build command ran"
        );
        assert_eq!(driver.builds_run(), 1);

        // What the container is: named, labelled, limited, on loopback, and nothing more.
        let c = docker
            .inspect_container(&r1.replica.id.0, None)
            .await
            .unwrap();
        assert_eq!(
            c.name.as_deref(),
            Some(format!("/cairn-{}-{app}-r1-s0", inst.id).as_str())
        );
        let labels = c.config.as_ref().unwrap().labels.clone().unwrap();
        for (k, v) in [
            ("cairn.installation", inst.id.to_string()),
            ("cairn.app", app.to_string()),
            ("cairn.release", "1".into()),
            ("cairn.slot", "0".into()),
            ("cairn.node", inst.node.to_string()),
            ("cairn.config-commit", "cfg1".into()),
            ("cairn.source-commit", v1.clone()),
        ] {
            assert_eq!(labels.get(k), Some(&v), "label {k}");
        }
        let env = c.config.as_ref().unwrap().env.clone().unwrap();
        assert!(env.contains(&"PORT=8080".to_owned()), "{env:?}");
        let hc = c.host_config.unwrap();
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(
            hc.init,
            Some(true),
            "tini is PID 1, so the app gets SIGTERM"
        );
        assert_eq!(
            hc.network_mode.as_deref(),
            Some("cairn"),
            "the agent's own network"
        );
        assert!(hc.binds.unwrap_or_default().is_empty());
        assert!(hc.mounts.unwrap_or_default().is_empty());
        assert!(hc.devices.unwrap_or_default().is_empty());
        assert!(hc.pid_mode.unwrap_or_default().is_empty());
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(hc.cap_add, Some(vec!["NET_BIND_SERVICE".to_owned()]));
        assert_eq!(hc.memory, Some(64 << 20));
        assert_eq!(hc.nano_cpus, Some(250_000_000));
        assert_eq!(
            hc.restart_policy
                .and_then(|p| p.name)
                .map(|n| n.to_string())
                .as_deref(),
            Some("unless-stopped")
        );
        let bindings = hc.port_bindings.unwrap();
        let b = bindings["8080/tcp"].as_ref().unwrap();
        assert_eq!(b[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert!(
            c.mounts.unwrap_or_default().is_empty(),
            "no volumes or binds at all"
        );
        assert!(r1.replica.addr.ip().is_loopback());
        let s1 = spec(&inst, &app, &repo, 1, &v1, docker_build(&base));
        let tag = format!("cairn/{}/{app}:{}", inst.id, s1.build_key());
        assert_eq!(s1.image_tag(), tag);
        let image = docker.inspect_image(&tag).await.unwrap();
        let config = image.config.unwrap();
        let il = config.labels.unwrap();
        assert_eq!(il.get("cairn.source-commit"), Some(&v1));
        assert_eq!(il.get("cairn.build-key"), Some(&s1.build_key()));
        // Nothing of a release: every release of the key runs these bytes.
        assert_eq!(il.get("cairn.release"), None);
        assert_eq!(il.get("cairn.config-commit"), None);
        // The start command is the container's, not the image's.
        assert_eq!(config.cmd, None, "{:?}", config.cmd);
        assert_eq!(
            c.config.as_ref().unwrap().cmd.as_deref(),
            Some(
                &[
                    "/bin/sh".to_owned(),
                    "-c".to_owned(),
                    "exec httpd -f -p $PORT -h /app/www".to_owned()
                ][..]
            )
        );
        assert_eq!(image.id.as_deref(), Some(r1.image.0.as_str()));

        // v2 while a client polls the proxy: v1 then v2, no failed request.
        let v2 = repo.commit_version("v2");
        let poller = support::poll(node.proxy_addr, &host, Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r2 = node
            .deployer
            .deploy(
                &spec(&inst, &app, &repo, 2, &v2, docker_build(&base)),
                &support::Discard,
            )
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (elapsed, seen) = poller.finish().await;
        let (n, rate) = assert_switch(&seen, elapsed, "v1", "v2");
        eprintln!(
            "docker v2 timings: {:?}; {n} requests at {rate:.0}/s, none failed",
            r2.timings
        );
        assert_eq!(r2.replaced, vec![r1.replica.id.clone()]);
        assert!(r2.drained);
        assert!(
            r2.timings.drain.unwrap() < Duration::from_secs(5),
            "the old replica stopped on SIGTERM, not after the kill timeout: {:?}",
            r2.timings
        );
        assert!(
            driver.status(&r1.replica.id).await.unwrap().is_none(),
            "the v1 container is removed"
        );

        // The same release in another slot reuses the image: no fetch, no build.
        let mut s2b = spec(&inst, &app, &repo, 2, &v2, docker_build(&base));
        s2b.slot = 1;
        let r2b = node.deployer.deploy(&s2b, &support::Discard).await.unwrap();
        assert_eq!(r2b.image_source, ImageSource::Cached);
        assert_eq!(r2b.timings.build, None);
        assert_eq!(driver.builds_run(), 2);
        assert_eq!(node.proxy.routes()[0].backends.len(), 2);
        for _ in 0..4 {
            assert_eq!(
                get(&client, node.proxy_addr, &host, "/").await.unwrap(),
                (200, "v2\n".into())
            );
        }
        node.deployer.remove_slot(&app, 1).await.unwrap();
        assert_eq!(node.proxy.routes()[0].backends.len(), 1);

        // A task delivered twice: nothing is rebuilt or restarted.
        let again = node
            .deployer
            .deploy(
                &spec(&inst, &app, &repo, 2, &v2, docker_build(&base)),
                &support::Discard,
            )
            .await
            .unwrap();
        assert_eq!(again.image_source, ImageSource::AlreadyRunning);
        assert_eq!(again.replica.id, r2.replica.id);

        // A broken build and a failing health check, under polling: v2 answers throughout.
        let poller = support::poll(node.proxy_addr, &host, Duration::from_millis(20));
        let v3 = repo.commit_version("v3");
        let mut broken = docker_build(&base);
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
        assert!(
            matches!(&err.error, DeployError::Build(DriverError::Build { .. })),
            "{err:?}"
        );
        assert!(
            err.reason().contains("non-zero code: 3"),
            "{}",
            err.reason()
        );
        assert!(
            build_log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.text.contains("failing on purpose")),
            "build output reached the sink"
        );

        let v4 = repo.commit_version("v4");
        let mut unhealthy = spec(&inst, &app, &repo, 4, &v4, docker_build(&base));
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
        assert!(err.timings.healthy.unwrap() < Duration::from_secs(10));
        let (_, seen) = poller.finish().await;
        assert_steady(&seen, "v2");

        let left = driver.list_replicas().await.unwrap();
        assert_eq!(left.len(), 1, "{left:#?}");
        assert_eq!(left[0].release, 2);
        assert_eq!(left[0].state, ReplicaState::Running);
        assert_eq!(
            inst.containers().await.len(),
            1,
            "the failed replicas are removed"
        );

        // A stopped replica reports as stopped; removing the slot leaves the app without replicas.
        node.deployer.stop_slot(&app, 0).await.unwrap();
        let stopped = driver.list_replicas().await.unwrap();
        assert_eq!(stopped[0].state, ReplicaState::Stopped);
        let (status, _) = get(&client, node.proxy_addr, &host, "/").await.unwrap();
        assert_eq!(status, 503);
        node.deployer.remove_slot(&app, 0).await.unwrap();
        assert!(inst.containers().await.is_empty());
        let (status, _) = get(&client, node.proxy_addr, &host, "/").await.unwrap();
        assert_eq!(
            status, 404,
            "the app's last replica is gone: its host is unknown"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_base_image_fails_fast_without_pulling() {
    const TEST: &str = "a_missing_base_image_fails_fast";
    let Some(docker) = support::docker(TEST).await else {
        return;
    };
    if !support::tools(TEST) {
        return;
    }
    bounded(60, async {
        let inst = Installation::new(Some(docker.clone()));
        let repo = AppRepo::new(inst.dir.path(), "web");
        let app = inst.app();
        let driver = Arc::new(DockerDriver::with_client(
            docker.clone(),
            DockerConfig::new(inst.id.clone(), inst.node.clone()),
        ));
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let v1 = repo.commit_version("v1");
        let base = format!("cairn-test/absent:{}", inst.id);
        let err = node
            .deployer
            .deploy(&spec(&inst, &app, &repo, 1, &v1, docker_build(&base)), &support::Discard)
            .await
            .unwrap_err();
        assert_eq!(err.stage, Stage::Build);
        assert!(
            matches!(&err.error, DeployError::Build(DriverError::BaseImageMissing { image }) if *image == base),
            "{err:?}"
        );
        assert_eq!(driver.builds_run(), 0);
    })
    .await;
}

/// Regression test (issue 16, push to running 2.15x the docker CLI): the image's four labels were build
/// options, and the classic builder makes a step of each, a container and a commit (about a second each
/// on fuse-overlayfs): 2.8 s of the agent's build over the CLI's. They are one `LABEL` step at the end of
/// the Dockerfile the engine builds, the app's own or the generated one, and the Dockerfile the agent
/// writes for that never reaches the image (not even over a source file of the same name), while the
/// app's files do. An own Dockerfile whose last line runs on (a line continuation) keeps the options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_labels_are_one_build_step_and_the_agents_dockerfile_stays_out_of_the_image() {
    use bollard::query_parameters::{
        CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    };
    use cairn_agent::BuildSpec;
    use futures_util::TryStreamExt;

    const TEST: &str = "image_labels_are_one_build_step";
    let Some(docker) = support::docker(TEST).await else {
        return;
    };
    if !support::tools(TEST) {
        return;
    }
    bounded(240, async {
        let inst = Installation::new(Some(docker.clone()));
        let base = inst.busybox_image().await;
        let repo = AppRepo::new(inst.dir.path(), "web");
        let driver = DockerDriver::with_client(
            docker.clone(),
            DockerConfig::new(inst.id.clone(), inst.node.clone()),
        );
        let own = |dockerfile: &str| {
            (
                BuildSpec {
                    dockerfile: true,
                    base_image: None,
                    commands: vec![],
                    start: None,
                    port: 8080,
                },
                vec![
                    ("Dockerfile", dockerfile.to_owned()),
                    (".dockerignore", "*.tmp".to_owned()),
                ],
            )
        };
        let cases = [
            // (build, files, label steps, the directory the source is copied to)
            (
                own(&format!("FROM {base}\nCOPY . /src\n# the end")),
                1,
                "/src",
            ),
            (
                own(&format!("FROM {base}\nCOPY . /src\nLABEL x=y \\\n")),
                4,
                "/src",
            ),
            (
                (
                    docker_build(&base),
                    vec![("Dockerfile.cairn", "the source's own\n".to_owned())],
                ),
                1,
                "/app",
            ),
        ];
        for (n, ((build, files), label_steps, dir)) in cases.into_iter().enumerate() {
            let app = inst.app();
            let commit = format!("{:040x}", n + 1);
            let s = spec(&inst, &app, &repo, 1, &commit, build);
            let context = inst.path(&format!("context-{n}"));
            std::fs::create_dir_all(context.join("www")).unwrap();
            std::fs::write(context.join("www/index.html"), "v1\n").unwrap();
            std::fs::write(context.join("www/healthz"), "ok\n").unwrap();
            for (path, text) in &files {
                std::fs::write(context.join(path), text).unwrap();
            }
            let log = Mutex::new(Vec::<LogLine>::new());
            let id = driver.build_image(&s, &context, &log).await.unwrap();
            let lines: Vec<String> = log
                .into_inner()
                .unwrap()
                .into_iter()
                .map(|l| l.text)
                .collect();
            let steps = |what: &str| {
                lines
                    .iter()
                    .filter(|l| l.starts_with("Step ") && l.contains(&format!(" : {what} ")))
                    .count()
            };
            assert_eq!(
                steps("LABEL") - usize::from(n == 1),
                label_steps,
                "case {n}: {lines:#?}"
            );
            let image = docker.inspect_image(&id.0).await.unwrap();
            let labels = image.config.unwrap().labels.unwrap();
            for (k, v) in [
                ("cairn.installation", inst.id.to_string()),
                ("cairn.app", app.to_string()),
                ("cairn.source-commit", commit.clone()),
                ("cairn.build-key", s.build_key()),
            ] {
                assert_eq!(labels.get(k), Some(&v), "case {n}: label {k}");
            }
            if n == 1 {
                assert_eq!(
                    labels.get("x").map(String::as_str),
                    Some("y"),
                    "the app's own step ran"
                );
            }

            // What the source became in the image, read from a container that never starts.
            let name = format!("cairn-{}-files-{n}", inst.id);
            let created = docker
                .create_container(
                    Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                    bollard::models::ContainerCreateBody {
                        image: Some(id.0.clone()),
                        cmd: Some(vec!["true".into()]),
                        labels: Some(
                            [("cairn.installation".to_owned(), inst.id.to_string())].into(),
                        ),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let bytes: Vec<u8> = docker
                .download_from_container(
                    &created.id,
                    Some(
                        DownloadFromContainerOptionsBuilder::default()
                            .path(dir)
                            .build(),
                    ),
                )
                .map_ok(|b| b.to_vec())
                .try_concat()
                .await
                .unwrap();
            let mut archive = tar::Archive::new(&bytes[..]);
            let mut found = std::collections::BTreeMap::new();
            for entry in archive.entries().unwrap() {
                let mut entry = entry.unwrap();
                if entry.header().entry_type().is_file() {
                    let path = entry.path().unwrap().to_string_lossy().into_owned();
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
                    found.insert(path, text);
                }
            }
            let mut want: std::collections::BTreeMap<String, String> = files
                .iter()
                .map(|(p, t)| (format!("{}/{p}", &dir[1..]), t.clone()))
                .collect();
            want.insert(format!("{}/www/index.html", &dir[1..]), "v1\n".into());
            want.insert(format!("{}/www/healthz", &dir[1..]), "ok\n".into());
            if n != 1 {
                // The app's `.dockerignore` names the agent's Dockerfile after its own lines; a source
                // without one gets none in the image.
                if let Some(ignore) = want.get_mut(&format!("{}/.dockerignore", &dir[1..])) {
                    ignore.push_str("\nDockerfile.cairn\n");
                }
                if n == 2 {
                    want.insert("app/www/build.txt".into(), "built-v1\n".into());
                }
            }
            assert_eq!(found, want, "case {n}");
            docker
                .remove_container(
                    &created.id,
                    None::<bollard::query_parameters::RemoveContainerOptions>,
                )
                .await
                .unwrap();
        }
    })
    .await;
}
