//! An image per build input, end to end: real `cairn serve`, `cairn-agent` with the Docker driver and a
//! generated Dockerfile (`FROM` a local busybox, one `COPY`, one `RUN`; the start command given to the
//! container). A commit that changes only the app's env makes a release that goes live on the image an
//! earlier release built: no build, no fetch (the agent's own record of each deploy says where its image
//! came from, and the release's stage timings have no build), the release recording the same image. A
//! commit to the app's source builds.
//!
//! Also the env-change benchmark (BENCHMARKS.md "Env-only change to live"): `CAIRN_E2E_ENV_CHANGES=N`
//! makes N env-only commits one after the other and prints, for each, the time from the commit being
//! pushed to the new value answering through the node proxy, and from the release's creation to live.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::DEPLOY;
use super::support::{Agent, Driver, E2e, app_manifest, get, site, wait_body};

/// How many deploys of the agent found, built or pulled their image, from its log.
fn image_sources(agent: &Agent) -> (usize, usize, usize) {
    let log = agent.log_text();
    (
        log.matches("source=Cached").count(),
        log.matches("source=Built").count(),
        log.matches("source=Pulled").count(),
    )
}

/// The app's manifest with `GREETING` in its env (none when `None`).
fn manifest(app: &str, source: &super::support::AppSource, greeting: Option<&str>) -> String {
    let mut m = app_manifest(app, "docker-gen", 1, source);
    if let Some(g) = greeting {
        m.push_str(&format!("\n[app.{app}.env]\nGREETING = \"{g}\"\n"));
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_env_only_commit_goes_live_without_an_image_build_and_a_source_change_builds() {
    let Some(mut e) = E2e::new("env_only_commit_builds_nothing", &[Driver::Docker]).await else {
        return;
    };
    let base = e.busybox_image();
    // The runtime of a generated Dockerfile; the replica writes its env's GREETING where httpd serves it.
    let runtimes = e.repo.dir.path().join("runtimes.toml");
    let mut text = std::fs::read_to_string(&runtimes).unwrap();
    text.push_str(&format!(
        "\n{}",
        cairn_testkit::fixtures::runtime("docker-gen")
            .drivers(&["docker"])
            .image(&base)
            .build(&["echo built-$(cat www/index.html) > www/build.txt"])
            .start("echo ${GREETING:-none} > www/greeting; exec httpd -f -p $PORT -h /app/www")
    ));
    std::fs::write(&runtimes, text).unwrap();
    let app = format!("env-{}", &e.installation[3..]);
    let source = e.app_source(&app);
    source.commit(&site("v1", true));
    e.repo.node("n1", "");
    let manifest_file = format!("app-{app}.toml");
    e.repo.write(&manifest_file, &manifest(&app, &source, None));
    // A short interval: the config repository is polled, and the benchmark times from the push.
    let plane = e.start(&["--interval", "250ms"]).await;
    let agent = e.agent(&plane, "n1", Driver::Docker, &[]).await;
    let host = super::support::host(&app);

    let r1 = plane.wait_release(&app, 1, "live", DEPLOY).await;
    wait_body(agent.proxy, &host, "v1", Duration::from_secs(10)).await;
    assert_eq!(
        get(agent.proxy, &host, "/build.txt").await,
        Ok((200, "built-v1\n".into())),
        "the build command ran in the image"
    );
    assert_eq!(
        get(agent.proxy, &host, "/greeting").await,
        Ok((200, "none\n".into()))
    );
    assert_eq!(image_sources(&agent), (0, 1, 0));
    let image = r1["image"].as_str().unwrap_or_default().to_owned();
    assert!(image.starts_with("sha256:"), "{r1}");
    assert!(r1["stage_timings"].get("build").is_some(), "{r1}");

    let changes: usize = std::env::var("CAIRN_E2E_ENV_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut took = Vec::new();
    for n in 0..changes {
        let release = n as i64 + 2;
        let greeting = format!("hello-{release}");
        e.repo
            .write(&manifest_file, &manifest(&app, &source, Some(&greeting)));
        let pushed = Instant::now();
        e.repo.commit();
        let deadline = pushed + DEPLOY;
        let answered = loop {
            if matches!(get(agent.proxy, &host, "/greeting").await, Ok((200, b)) if b.trim() == greeting)
            {
                break pushed.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "{greeting} never answered; release: {:?}\nagent log:\n{}",
                plane.release(&app, release).await,
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let r = plane
            .wait_release(&app, release, "live", Duration::from_secs(30))
            .await;
        // The same source and recipe: the image release 1 built, found on the node, never rebuilt.
        assert_eq!(r["source_commit"], r1["source_commit"], "{r}");
        assert_eq!(r["image"], image.as_str(), "{r}");
        let stages = r["stage_timings"].as_object().cloned().unwrap_or_default();
        assert!(
            !stages.contains_key("build") && !stages.contains_key("fetch"),
            "release {release} built: {r}"
        );
        assert!(stages.contains_key("start"), "{r}");
        assert_eq!(
            image_sources(&agent),
            (n + 1, 1, 0),
            "release {release}: one build in all, every env-only release cached"
        );
        let live = live_after(&plane, &app, release).await;
        eprintln!(
            "env change {}: push to the new env answering {answered:?}; release created to live {live:.3} s; stages (ms): {}",
            n + 1,
            Value::Object(stages)
        );
        took.push((answered, live));
    }

    // A source change builds (one more build, with a fetch), and runs the new content.
    let release = changes as i64 + 2;
    let v2 = source.commit(&site("v2", true));
    let r = plane.wait_release(&app, release, "live", DEPLOY).await;
    assert_eq!(r["source_commit"], v2.as_str(), "{r}");
    wait_body(agent.proxy, &host, "v2", Duration::from_secs(10)).await;
    assert_ne!(r["image"], image.as_str(), "{r}");
    assert!(
        r["stage_timings"].get("build").is_some() && r["stage_timings"].get("fetch").is_some(),
        "{r}"
    );
    assert_eq!(image_sources(&agent), (changes, 2, 0));
    // The env of the last release stays with the new image.
    assert_eq!(
        get(agent.proxy, &host, "/greeting").await,
        Ok((200, format!("hello-{}\n", changes + 1)))
    );

    if changes > 1 {
        let mut answered: Vec<Duration> = took.iter().map(|t| t.0).collect();
        let mut live: Vec<f64> = took.iter().map(|t| t.1).collect();
        answered.sort();
        live.sort_by(f64::total_cmp);
        let p = |i: usize| i.min(answered.len() - 1);
        eprintln!(
            "env-only change over {changes} commits: push to answering min {:?}, p50 {:?}, p90 {:?}, max {:?}; \
             created to live min {:.3} s, p50 {:.3} s, max {:.3} s",
            answered[0],
            answered[answered.len() / 2],
            answered[p(answered.len() * 9 / 10)],
            answered[answered.len() - 1],
            live[0],
            live[live.len() / 2],
            live[live.len() - 1],
        );
    }
}

/// Seconds from release `release` of `app` being recorded to its being live.
async fn live_after(plane: &super::support::Plane, app: &str, release: i64) -> f64 {
    let rows = plane
        .rows(&format!(
            "SELECT extract(epoch FROM finished_at - created_at)::float8 AS secs \
             FROM releases WHERE app = '{app}' AND number = {release}"
        ))
        .await;
    rows[0]["secs"].as_f64().unwrap_or(f64::NAN)
}
