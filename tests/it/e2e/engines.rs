//! The harness's second node pieces: a second, private Docker engine ([`E2e::second_engine`]) and a local
//! registry ([`cairn_testkit::registry`]). An image built on the main engine reaches the second one only
//! through the registry, by digest, and runs there on the second engine's own bridge, answering on
//! loopback.

use std::net::SocketAddr;
use std::time::Duration;

use cairn_testkit::registry::registry;

use super::support::{Clock, Driver, E2e, docker, get, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_engine_runs_a_container_on_loopback() {
    const TEST: &str = "second_engine_runs_a_container_on_loopback";
    let mut clock = Clock::new();
    let Some(mut e) = E2e::new(TEST, &[Driver::Docker]).await else {
        return;
    };
    let bounded = tokio::time::timeout(Duration::from_secs(90), async {
        let Some(b) = e.second_engine().await else {
            return;
        };
        clock.lap("second engine up");
        let Some(reg) = registry(TEST, e.scratch.path()).await else {
            return;
        };
        clock.lap("registry up");
        assert_eq!(
            b.storage_driver(),
            docker(&["info", "--format", "{{.Driver}}"])
        );
        let label = format!("cairn.installation={}", e.installation);

        // Built on the main engine (labelled: the harness removes it, and every tag of it, at the end),
        // pushed to the registry.
        let base = e.busybox_image();
        let id = docker(&["inspect", "--format", "{{.Id}}", &base]);
        let repo = format!("{}/cairn-test-{}/bb", reg.addr, e.installation);
        docker(&["tag", &base, &format!("{repo}:v1")]);
        docker(&["push", &format!("{repo}:v1")]);
        let digests: Vec<String> = serde_json::from_str(&docker(&[
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            &base,
        ]))
        .unwrap();
        let by_digest = digests
            .iter()
            .find(|d| d.starts_with(&format!("{repo}@sha256:")))
            .unwrap_or_else(|| panic!("no digest of {repo} in {digests:?}"))
            .clone();
        clock.lap("built on the main engine and pushed");

        // The second engine has its own images: not this one until it pulls it, by digest.
        assert!(b.try_docker(&["image", "inspect", &by_digest]).is_err());
        assert!(b.try_docker(&["image", "inspect", &id]).is_err());
        b.docker(&["pull", &by_digest]);
        assert_eq!(
            b.docker(&["inspect", "--format", "{{.Id}}", &by_digest]),
            id,
            "the same image, by content"
        );
        clock.lap("pulled by digest on the second engine");

        // It runs there, on the second engine's bridge, published on loopback.
        let cid = b.docker(&[
            "run",
            "-d",
            "--label",
            &label,
            "-p",
            "127.0.0.1::8080",
            &by_digest,
            "sh",
            "-c",
            "mkdir -p /www && echo served-by-the-second-engine > /www/index.html && \
             exec httpd -f -p 8080 -h /www",
        ]);
        let ip = b.docker(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            &cid,
        ]);
        let prefix = b.subnet().trim_end_matches("0/24").to_owned();
        assert!(
            ip.starts_with(&prefix),
            "{ip} is not in the second engine's subnet {}",
            b.subnet()
        );
        assert!(
            e.containers().is_empty(),
            "the main engine does not see the second engine's container"
        );
        let port = b.docker(&["port", &cid, "8080/tcp"]);
        let addr: SocketAddr = port
            .lines()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("docker port said {port:?}"));
        assert!(addr.ip().is_loopback(), "{addr}");
        wait_for(
            &format!("the container on the second engine to answer on {addr}"),
            Duration::from_secs(15),
            || async {
                match get(addr, "second-engine.test", "/").await {
                    Ok((200, body)) if body.trim() == "served-by-the-second-engine" => Some(()),
                    _ => None,
                }
            },
        )
        .await;
        clock.lap("served from the second engine");
        b.docker(&["rm", "-f", &cid]);
    })
    .await;
    assert!(bounded.is_ok(), "the test took longer than 90 s");
    drop(e);
    clock.lap("cleaned up");
}
