//! Two Docker nodes and a registry: `cairn serve --registry` with node n1's agent on the main engine and
//! n2's on a second, private engine ([`E2e::second_engine`]), and Debian's `docker-registry` on loopback.
//! Each release is built once, by whichever node leases a deploy of it first; the other node pulls the
//! pushed image by digest, and the release records the digest.

use std::time::Duration;

use cairn_testkit::engine::SecondEngine;
use cairn_testkit::registry::registry;

use super::DEPLOY;
use super::support::{Agent, Clock, Driver, E2e, docker, docker_site, wait_body};

/// The image id the replica of `app` runs on an engine (`b` for the second one), with its container.
fn running_image(b: Option<&SecondEngine>, installation: &str, app: &str) -> Vec<String> {
    let filter = [
        "ps",
        "-q",
        "--filter",
        &format!("label=cairn.installation={installation}"),
        "--filter",
        &format!("label=cairn.app={app}"),
    ];
    let ids = match b {
        Some(b) => b.docker(&filter),
        None => docker(&filter),
    };
    ids.lines()
        .map(|id| {
            let args = ["inspect", "--format", "{{.Image}}", id];
            match b {
                Some(b) => b.docker(&args),
                None => docker(&args),
            }
            .trim()
            .to_owned()
        })
        .collect()
}

/// How many releases the agents built and pulled, from their logs.
fn builds_and_pulls(agents: &[&Agent]) -> (usize, usize) {
    agents.iter().fold((0, 0), |(b, p), a| {
        let log = a.log_text();
        (
            b + log.matches("source=Built").count(),
            p + log.matches("source=Pulled").count(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_docker_nodes_build_each_release_once_and_pull_it_by_digest() {
    const TEST: &str = "two_docker_nodes_build_each_release_once";
    let mut clock = Clock::new();
    let Some(mut e) = E2e::new(TEST, &[Driver::Docker]).await else {
        return;
    };
    let Some(b) = e.second_engine().await else {
        return;
    };
    let Some(reg) = registry(TEST, e.scratch.path()).await else {
        return;
    };
    // Both engines have the base image, so whichever node deploys first can build.
    let base = e.busybox_image();
    b.docker(&[
        "build",
        "-q",
        "--pull=false",
        "--label",
        &format!("cairn.installation={}", e.installation),
        "-t",
        &base,
        e.scratch.path().join("busybox-image").to_str().unwrap(),
    ]);
    let a = e.app("web", "docker-app", 2, &docker_site(&base, "v1", true));
    let (app, host, src) = (a.name.clone(), a.host.clone(), &a.source);
    e.repo.node("n1", "");
    e.repo.node("n2", "");
    let prefix = format!("{}/cairn-e2e-{}", reg.addr(), e.installation);
    clock.lap("second engine, registry and base images");
    let plane = e.start(&["--registry", &prefix]).await;
    let n1 = e.agent(&plane, "n1", Driver::Docker, &[]).await;
    let n2 = e
        .agent_on(&plane, "n2", Driver::Docker, &[], Some(b.host()))
        .await;
    clock.lap("serve and two agents up");

    let placed = plane
        .rows(&format!(
            "SELECT node FROM placements WHERE app = '{app}' ORDER BY node"
        ))
        .await;
    assert_eq!(
        placed,
        [
            serde_json::json!({"node": "n1"}),
            serde_json::json!({"node": "n2"})
        ],
        "one replica per node"
    );

    for (release, version) in [(1, "v1"), (2, "v2")] {
        if release == 2 {
            src.commit(&docker_site(&base, version, true));
        }
        let r = plane.wait_release(&app, release, "live", DEPLOY).await;
        wait_body(n1.proxy, &host, version, Duration::from_secs(10)).await;
        wait_body(n2.proxy, &host, version, Duration::from_secs(10)).await;
        clock.lap(&format!("{version} live on both nodes"));

        // Built once, pulled once: the build count is the agents' own record of each deploy's image.
        assert_eq!(
            builds_and_pulls(&[&n1, &n2]),
            (release as usize, release as usize),
            "after release {release}: one build and one pull per release"
        );

        // The release records the pushed image, and both engines run exactly that image.
        let reference = format!("{prefix}/{app}");
        assert_eq!(r["image"], reference.as_str(), "{r}");
        let digest = r["image_digest"].as_str().unwrap_or_default().to_owned();
        assert!(digest.starts_with("sha256:") && digest.len() == 71, "{r}");
        let pinned = format!("{reference}@{digest}");
        let on_main = docker(&["image", "inspect", "--format", "{{.Id}}", &pinned]);
        let on_b = b.docker(&["image", "inspect", "--format", "{{.Id}}", &pinned]);
        assert_eq!(on_main.trim(), on_b.trim(), "the same image, by content");
        assert_eq!(
            running_image(None, &e.installation, &app),
            [on_main.trim()],
            "n1 runs release {release}'s image"
        );
        assert_eq!(
            running_image(Some(&b), &e.installation, &app),
            [on_b.trim()],
            "n2 runs release {release}'s image"
        );
    }
    eprintln!(
        "registry e2e: n1 {} / n2 {}",
        n1.log_text().matches("source=Built").count(),
        n2.log_text().matches("source=Built").count()
    );
}
