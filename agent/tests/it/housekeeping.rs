//! Housekeeping with the real Docker engine: images are one per build key, shared by the releases of
//! the key (an env-only release builds nothing); old ones are removed beyond the newest N per app (never
//! one a container uses, never another installation's or an unlabelled one), and replica output is read
//! with the engine's own timestamps (what the agent ships for `cairn logs`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use cairn_agent::deploy::ImageSource;
use cairn_agent::housekeeping::{Cursor, ReplicaOutput};
use cairn_agent::{DockerConfig, DockerDriver, Driver, LogLine};

use crate::support::{self, AppRepo, Installation, Node, bounded, docker_build, spec};

/// The source commits of `app` that have an image of this installation.
async fn image_commits(inst: &Installation, app: &str) -> BTreeSet<String> {
    let docker = inst.docker.as_ref().unwrap();
    let filters = std::collections::HashMap::from([(
        "label".to_owned(),
        vec![
            format!("cairn.installation={}", inst.id),
            format!("cairn.app={app}"),
        ],
    )]);
    docker
        .list_images(Some(
            bollard::query_parameters::ListImagesOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap()
        .iter()
        .filter_map(|i| i.labels.get("cairn.source-commit").cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_release_images_go_unless_a_container_uses_them_and_output_keeps_its_time() {
    const TEST: &str = "old_release_images_go";
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
        let driver = Arc::new(DockerDriver::with_client(
            docker.clone(),
            DockerConfig::new(inst.id.clone(), inst.node.clone()),
        ));
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let started = SystemTime::now();
        let mut build = docker_build(&base);
        build.start = Some("echo hello-from-$PORT; exec httpd -f -p $PORT -h /app/www".into());
        let mut commits = Vec::new();
        for (release, version) in [(1, "v1"), (2, "v2"), (3, "v3")] {
            let commit = repo.commit_version(version);
            let log = Mutex::new(Vec::<LogLine>::new());
            let report = node
                .deployer
                .deploy(
                    &spec(&inst, &app, &repo, release, &commit, build.clone()),
                    &log,
                )
                .await
                .unwrap_or_else(|e| panic!("{}", e.reason()));
            assert_eq!(report.image_source, ImageSource::Built);
            commits.push((commit, report.image));
        }
        assert_eq!(driver.builds_run(), 3);

        // Release 4 changes only what the replica runs with (env, limits, start command, port): the
        // image of release 3, no build, no fetch.
        let mut s4 = spec(&inst, &app, &repo, 4, &commits[2].0, build.clone());
        s4.env.insert(
            cairn_schema::EnvName::new("GREETING").unwrap(),
            "hello".into(),
        );
        s4.limits.memory_bytes = 96 << 20;
        s4.build.start = Some("echo four-from-$PORT; exec httpd -f -p $PORT -h /app/www".into());
        s4.build.port = 8081;
        let r4 = node
            .deployer
            .deploy(&s4, &Mutex::new(Vec::<LogLine>::new()))
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        assert_eq!(r4.image_source, ImageSource::Cached);
        assert_eq!(r4.image, commits[2].1, "release 3's image");
        assert_eq!((r4.timings.build, r4.timings.fetch), (None, None));
        assert_eq!(driver.builds_run(), 3, "an env-only release builds nothing");

        // Release 1 runs again (a rollback): its image is still here, and in use once it runs.
        let r1 = node
            .deployer
            .deploy(
                &spec(&inst, &app, &repo, 1, &commits[0].0, build.clone()),
                &Mutex::new(Vec::<LogLine>::new()),
            )
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        assert_eq!(r1.image_source, ImageSource::Cached);
        assert_eq!(driver.builds_run(), 3);
        let all: BTreeSet<String> = commits.iter().map(|c| c.0.clone()).collect();
        assert_eq!(image_commits(&inst, app.as_str()).await, all);

        // Keep the newest image: v3's stays, v1's stays (a container uses it), v2's goes.
        let removed = driver.prune_images(1).await.unwrap();
        assert_eq!(removed, [commits[1].1.clone()]);
        assert_eq!(
            image_commits(&inst, app.as_str()).await,
            BTreeSet::from([commits[0].0.clone(), commits[2].0.clone()])
        );
        // Nothing else of this installation (the unlabelled-by-app base image) was touched, and a
        // second pass removes nothing.
        assert!(docker.inspect_image(&base).await.is_ok());
        assert!(driver.prune_images(1).await.unwrap().is_empty());

        // The replica's output, with the time the engine recorded (no timestamp prefix in the text).
        let replicas = driver.list_replicas().await.unwrap();
        let r = replicas.iter().find(|r| r.app == app).expect("the replica");
        let lines = driver.logs(&r.id, 20).await.unwrap();
        let hello = lines
            .iter()
            .find(|l| l.text == "hello-from-8080")
            .unwrap_or_else(|| panic!("{lines:?}"));
        assert!(
            hello.at >= started && hello.at <= SystemTime::now(),
            "{hello:?}"
        );
        // What the shipper would send, once.
        let mut cursor = Cursor::new(started);
        let out = vec![ReplicaOutput {
            app: app.clone(),
            slot: r.slot,
            release: r.release,
            lines: lines.clone(),
        }];
        let (first, next) = cursor.unsent(&out);
        assert!(
            first.iter().any(|l| l.text == "hello-from-8080"),
            "{first:?}"
        );
        cursor.advance(next);
        assert!(cursor.unsent(&out).0.is_empty());
        node.deployer.remove_slot(&app, 0).await.unwrap();
    })
    .await;
}
