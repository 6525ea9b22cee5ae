//! Two Docker nodes: node n1's agent on the main engine and n2's on a second, private engine
//! ([`E2e::second_engine`]). With `cairn serve --registry` (Debian's `docker-registry` on loopback) each
//! release is built once, by whichever node leases a deploy of it first; the other node pulls the pushed
//! image by digest, and the release records the digest. Without a registry each node builds the release
//! from its source.
//!
//! Also a benchmark (BENCHMARKS.md "Two nodes"): `CAIRN_E2E_RELEASES=N` deploys N releases and prints,
//! for each after the first, the time from its creation to live on both nodes and its stage times.

use std::time::Duration;

use serde_json::{Value, json};

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
    two_nodes("two_docker_nodes_build_each_release_once", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_docker_nodes_without_a_registry_each_build_the_release() {
    two_nodes("two_docker_nodes_without_a_registry", false).await;
}

async fn two_nodes(test: &'static str, with_registry: bool) {
    let mut clock = Clock::new();
    let Some(mut e) = E2e::new(test, &[Driver::Docker]).await else {
        return;
    };
    let Some(b) = e.second_engine().await else {
        return;
    };
    let reg = if with_registry {
        let Some(reg) = registry(test, e.scratch.path()).await else {
            return;
        };
        Some(reg)
    } else {
        None
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
    let prefix = reg
        .as_ref()
        .map(|r| format!("{}/cairn-e2e-{}", r.addr(), e.installation));
    clock.lap("second engine, registry and base images");
    let plane = match &prefix {
        Some(prefix) => e.start(&["--registry", prefix]).await,
        None => e.start(&[]).await,
    };
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
        [json!({"node": "n1"}), json!({"node": "n2"})],
        "one replica per node"
    );

    let releases: i64 = std::env::var("CAIRN_E2E_RELEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if with_registry { 2 } else { 1 })
        .max(1);
    let mut took = Vec::new();
    // Each engine's image of the newest release: (n1's, n2's).
    let mut images = (String::new(), String::new());
    for release in 1..=releases {
        let version = format!("v{release}");
        if release > 1 {
            src.commit(&docker_site(&base, &version, true));
        }
        let r = plane.wait_release(&app, release, "live", DEPLOY).await;
        wait_body(n1.proxy, &host, &version, Duration::from_secs(10)).await;
        wait_body(n2.proxy, &host, &version, Duration::from_secs(10)).await;
        clock.lap(&format!("{version} live on both nodes"));
        if release > 1 {
            // (Release 1 was created before the agents started.)
            took.push(live_after(&plane, &app, release).await);
        }

        // The agents' own record of each deploy's image: built once and pulled once per release with
        // a registry, built on each node without.
        let n = release as usize;
        assert_eq!(
            builds_and_pulls(&[&n1, &n2]),
            if with_registry { (n, n) } else { (2 * n, 0) },
            "after release {release}"
        );

        let (on_main, on_b) = match &prefix {
            Some(prefix) => {
                // The release records the pushed image, and both engines have exactly that image.
                let reference = format!("{prefix}/{app}");
                assert_eq!(r["image"], reference.as_str(), "{r}");
                let digest = r["image_digest"].as_str().unwrap_or_default().to_owned();
                assert!(digest.starts_with("sha256:") && digest.len() == 71, "{r}");
                let pinned = format!("{reference}@{digest}");
                let on_main = docker(&["image", "inspect", "--format", "{{.Id}}", &pinned]);
                let on_b = b.docker(&["image", "inspect", "--format", "{{.Id}}", &pinned]);
                assert_eq!(on_main.trim(), on_b.trim(), "the same image, by content");
                (on_main, on_b)
            }
            None => {
                // Each engine has its own build of the release under its build key's tag; nothing
                // was pushed.
                assert_eq!(r["image_digest"], Value::Null, "{r}");
                let key = cairn_proto::build::build_key(
                    r["source_commit"].as_str().unwrap(),
                    cairn_proto::build::Recipe {
                        dockerfile: true,
                        base_image: None,
                        commands: &[],
                    },
                );
                let tag = format!("cairn/{}/{app}:{key}", e.installation);
                let on_main = docker(&["image", "inspect", "--format", "{{.Id}}", &tag]);
                let on_b = b.docker(&["image", "inspect", "--format", "{{.Id}}", &tag]);
                (on_main, on_b)
            }
        };
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
        images = (on_main.trim().to_owned(), on_b.trim().to_owned());
    }

    // A commit that changes only the app's env: the image of the last release on both nodes, neither
    // built nor pulled again, and the release records the same image (and digest).
    let last = plane.release(&app, releases).await.unwrap();
    let mut manifest = super::support::app_manifest(&app, "docker-app", 2, src);
    manifest.push_str(&format!("\n[app.{app}.env]\nGREETING = \"hello\"\n"));
    e.repo.write(&format!("app-{app}.toml"), &manifest);
    e.repo.commit();
    let r = plane.wait_release(&app, releases + 1, "live", DEPLOY).await;
    let n = releases as usize;
    assert_eq!(
        builds_and_pulls(&[&n1, &n2]),
        if with_registry { (n, n) } else { (2 * n, 0) },
        "an env-only release builds and pulls nothing"
    );
    if with_registry {
        assert_eq!(
            (&r["source_commit"], &r["image"], &r["image_digest"]),
            (
                &last["source_commit"],
                &last["image"],
                &last["image_digest"]
            ),
            "{r}"
        );
    } else {
        // Without a registry an image id is one engine's: the release records the first reporter's,
        // which may be either node, so each node is checked for its own.
        assert_eq!(r["source_commit"], last["source_commit"], "{r}");
        assert_eq!(r["image_digest"], Value::Null, "{r}");
        let recorded = r["image"].as_str().unwrap_or_default();
        assert!(
            recorded == images.0 || recorded == images.1,
            "the env-only release records one node's image of the last release: {r}, nodes {images:?}"
        );
    }
    assert_eq!(
        running_image(None, &e.installation, &app),
        [images.0.as_str()],
        "n1 runs the last release's image for the env-only release"
    );
    assert_eq!(
        running_image(Some(&b), &e.installation, &app),
        [images.1.as_str()],
        "n2 runs the last release's image for the env-only release"
    );
    assert!(r["stage_timings"].get("build").is_none(), "{r}");
    clock.lap("env-only release live on both nodes");

    if took.is_empty() {
        return;
    }
    took.sort_by(|x, y| x.0.total_cmp(&y.0));
    for (secs, stages) in &took {
        eprintln!(
            "two nodes (registry: {with_registry}): created to live on both in {secs:.2} s; stages {stages}"
        );
    }
    let p50 = took[took.len() / 2].0;
    eprintln!(
        "two nodes (registry: {with_registry}), {} releases: min {:.2} s, p50 {p50:.2} s, max {:.2} s",
        took.len(),
        took[0].0,
        took[took.len() - 1].0
    );
}

/// Seconds from release `release`'s creation to live on every node, and its stage times (the slowest
/// replica's, in milliseconds).
async fn live_after(plane: &super::support::Plane, app: &str, release: i64) -> (f64, Value) {
    let row = plane
        .rows(&format!(
            "SELECT EXTRACT(EPOCH FROM finished_at - created_at)::float8 AS secs, stage_timings \
             FROM releases WHERE app = '{app}' AND number = {release}"
        ))
        .await;
    (
        row[0]["secs"].as_f64().unwrap_or(f64::NAN),
        row[0]["stage_timings"].clone(),
    )
}
