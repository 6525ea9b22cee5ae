//! Distribution through a real registry (Debian's `docker-registry` on 127.0.0.1): the building node
//! pushes the release's image, a node that lacks it pulls it by digest and builds nothing; when the
//! registry does not answer, a node builds the release from its source instead.

use std::sync::Arc;

use bollard::query_parameters::RemoveImageOptionsBuilder;
use cairn_agent::deploy::ImageSource;
use cairn_agent::spec::ImageRef;
use cairn_agent::{DockerConfig, DockerDriver, Driver, Rewrites};
use cairn_schema::Name;
use cairn_testkit::registry::registry;

use crate::support::{self, AppRepo, Installation, Node, bounded, docker_build, get, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_building_node_pushes_and_another_node_pulls_by_digest_without_building() {
    const TEST: &str = "the_building_node_pushes_and_another_node_pulls";
    let Some(docker) = support::docker(TEST).await else {
        return;
    };
    if !support::tools(TEST) {
        return;
    }
    bounded(240, async {
        let inst = Installation::new(Some(docker.clone()));
        let Some(reg) = registry(TEST, inst.dir.path()).await else {
            return;
        };
        let base = inst.busybox_image().await;
        let repo = AppRepo::new(inst.dir.path(), "web");
        let app = inst.app();
        let host = support::host(&app).to_string();
        let v1 = repo.commit_version("v1");

        // Node A builds and pushes.
        let a = Arc::new(DockerDriver::with_client(
            docker.clone(),
            DockerConfig::new(inst.id.clone(), inst.node.clone()),
        ));
        let registry = format!("{}/cairn-test-{}", reg.addr, inst.id);
        let node_a = Node::start_with(&inst, a.clone(), repo.rewrites(), "a").await;
        let mut task_a = spec(&inst, &app, &repo, 1, &v1, docker_build(&base));
        task_a.push_to = Some(registry.parse().unwrap());
        let ra = node_a
            .deployer
            .deploy(&task_a, &support::Discard)
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        eprintln!("registry node A timings: {:?}", ra.timings);
        assert_eq!(ra.image_source, ImageSource::Built);
        let pushed = ra.pushed.clone().expect("pushed to the registry");
        assert_eq!(pushed.reference, format!("{registry}/{app}"));
        assert!(pushed.digest.starts_with("sha256:"));
        assert!(ra.timings.push.is_some());
        assert_eq!(a.builds_run(), 1);
        node_a.deployer.remove_slot(&app, 0).await.unwrap();

        // The image leaves this engine entirely: node B must get it from the registry.
        docker
            .remove_image(
                &ra.image.0,
                Some(RemoveImageOptionsBuilder::default().force(true).build()),
                None,
            )
            .await
            .unwrap();
        assert!(docker.inspect_image(&ra.image.0).await.is_err());

        // Node B: no source access at all (an empty rewrite table would fetch from github.com), so a
        // build attempt would fail; it pulls by digest instead.
        let b = Arc::new(DockerDriver::with_client(
            docker.clone(),
            DockerConfig::new(inst.id.clone(), Name::new("node-b").unwrap()),
        ));
        let node_b = Node::start_with(&inst, b.clone(), Rewrites::default(), "b").await;
        let mut task = spec(&inst, &app, &repo, 1, &v1, docker_build(&base));
        task.image = Some(pushed.clone());
        let rb = node_b
            .deployer
            .deploy(&task, &support::Discard)
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        eprintln!("registry node B timings: {:?}", rb.timings);
        assert_eq!(rb.image_source, ImageSource::Pulled);
        assert_eq!(b.builds_run(), 0, "node B built nothing");
        assert!(rb.timings.fetch.is_none() && rb.timings.build.is_none());
        assert_eq!(rb.image, ra.image, "the same image, by content");
        let running = b.list_replicas().await.unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].image, ra.image.0);
        let client = support::client();
        assert_eq!(
            get(&client, node_b.proxy_addr, &host, "/").await.unwrap(),
            (200, "v1\n".into())
        );
        node_b.deployer.remove_slot(&app, 0).await.unwrap();

        // A registry that does not answer: a node with the source builds the release itself, and says
        // why in the build output.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let c = Arc::new(DockerDriver::with_client(
            docker.clone(),
            DockerConfig::new(inst.id.clone(), Name::new("node-c").unwrap()),
        ));
        let node_c = Node::start_with(&inst, c.clone(), repo.rewrites(), "c").await;
        // (A new source commit: release 1's build key is on this engine already, tagged by B's pull.)
        let v2 = repo.commit_version("v2");
        let mut task = spec(&inst, &app, &repo, 2, &v2, docker_build(&base));
        task.image = Some(ImageRef {
            reference: format!("{dead_addr}/cairn-test-{}/{app}", inst.id),
            digest: pushed.digest.clone(),
        });
        task.push_to = Some(registry.parse().unwrap());
        let lines = std::sync::Mutex::new(Vec::new());
        let rc = node_c
            .deployer
            .deploy(&task, &lines)
            .await
            .unwrap_or_else(|e| panic!("{}", e.reason()));
        assert_eq!(rc.image_source, ImageSource::Built);
        assert_eq!(c.builds_run(), 1);
        assert!(rc.timings.pull.is_some() && rc.timings.build.is_some());
        assert!(
            rc.pushed.is_none(),
            "nothing is pushed when the task names an image"
        );
        let said: Vec<String> = lines
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|l| l.text)
            .collect();
        assert!(
            said.iter()
                .any(|l| l.starts_with(&format!("cannot pull {dead_addr}/"))
                    && l.ends_with("building release 2 here instead")),
            "{said:#?}"
        );
        assert_eq!(
            get(&client, node_c.proxy_addr, &host, "/").await.unwrap(),
            (200, "v2\n".into())
        );
        node_c.deployer.remove_slot(&app, 0).await.unwrap();
    })
    .await;
}
