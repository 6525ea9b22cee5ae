//! Housekeeping with the real Docker engine: old release images are removed beyond the newest N per app
//! (never one a container uses, never another installation's or an unlabelled one), and replica output
//! is read with the engine's own timestamps (what the agent ships for `cairn logs`).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use cairn_agent::housekeeping::{Cursor, ReplicaOutput};
use cairn_agent::{DockerConfig, DockerDriver, Driver, LogLine};

use crate::support::{self, AppRepo, Installation, Node, bounded, docker_build, spec};

/// Releases of `app` that have an image of this installation.
async fn image_releases(inst: &Installation, app: &str) -> BTreeSet<u64> {
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
        .filter_map(|i| i.labels.get("cairn.release")?.parse().ok())
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
        for (release, version) in [(1, "v1"), (2, "v2"), (3, "v3")] {
            let commit = repo.commit_version(version);
            let log = Mutex::new(Vec::<LogLine>::new());
            node.deployer
                .deploy(
                    &spec(&inst, &app, &repo, release, &commit, build.clone()),
                    &log,
                )
                .await
                .unwrap_or_else(|e| panic!("{}", e.reason()));
        }
        // Release 1 runs again (a rollback): its image is in use.
        let v1 = repo.commit_version("v1");
        node.deployer
            .deploy(
                &spec(&inst, &app, &repo, 1, &v1, build.clone()),
                &Mutex::new(Vec::<LogLine>::new()),
            )
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        assert_eq!(
            image_releases(&inst, app.as_str()).await,
            BTreeSet::from([1, 2, 3])
        );

        // Keep the newest release: 3 stays, 1 stays (a container uses it), 2 goes (and release 1's first
        // image: the second deploy built release 1 again from a new commit of the same content).
        let removed = driver.prune_images(1).await.unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(
            image_releases(&inst, app.as_str()).await,
            BTreeSet::from([1, 3])
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
