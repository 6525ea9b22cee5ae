//! End to end with real processes and a real Docker engine: `cairn serve` on PostgreSQL with a git config
//! repository, `cairn-agent` with the Docker or the process driver, app sources in local git remotes
//! reached through `--git-rewrite`, requests through the node proxy. The harness is in [`support`].

mod dashboard;
mod databases;
mod engines;
mod https;
mod images;
mod ingress;
mod registry;
pub mod support;
mod usage;

use std::time::{Duration, Instant};

use support::{
    Clock, Driver, E2e, HEARTBEAT, assert_steady, assert_switch, broken_docker_site, docker,
    docker_site, get, poll, site, wait_body, wait_for,
};

/// Bound of a deploy that builds (fetch, build, start, health) on a loaded CI machine.
const DEPLOY: Duration = Duration::from_secs(90);

/// The replica containers of `app` (name, labels).
fn app_containers(e: &E2e, app: &str) -> Vec<(String, serde_json::Value)> {
    e.containers()
        .into_iter()
        .filter(|(_, l)| l["cairn.app"] == app)
        .collect()
}

/// Polls while `during` runs, then checks the answer stayed `body` with no failure.
async fn steady_while<F: std::future::Future<Output = T>, T>(
    proxy: std::net::SocketAddr,
    host: &str,
    body: &str,
    during: F,
) -> T {
    let poller = poll(proxy, host, Duration::from_millis(50));
    let out = during.await;
    let (_, seen) = poller.finish().await;
    assert_steady(&seen, body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_app_deploys_switches_without_errors_survives_bad_releases_and_is_removed() {
    let mut clock = Clock::new();
    let Some(mut e) = E2e::new(
        "docker_app_deploys_switches_without_errors",
        &[Driver::Docker],
    )
    .await
    else {
        return;
    };
    let base = e.busybox_image();
    let a = e.app("web", "docker-app", 1, &docker_site(&base, "v1", true));
    let (app, host, src, v1) = (a.name.clone(), a.host.clone(), &a.source, a.first.clone());
    e.repo.node("n1", "");
    clock.lap("setup");
    let plane = e.start(&[]).await;
    clock.lap("serve up, config applied");
    let agent = e.agent(&plane, "n1", Driver::Docker, &[]).await;
    clock.lap("serve and agent up");

    // v1: polled head, built from the app's Dockerfile, healthy, routed.
    let r1 = plane.wait_release(&app, 1, "live", DEPLOY).await;
    assert_eq!(r1["source_commit"], v1.as_str());
    wait_body(agent.proxy, &host, "v1", Duration::from_secs(10)).await;
    clock.lap("v1 built and serving");
    let containers = app_containers(&e, &app);
    assert_eq!(containers.len(), 1, "{containers:?}");
    let (name, labels) = &containers[0];
    assert_eq!(name, &format!("cairn-{}-{app}-r1-s1", e.installation));
    assert_eq!(labels["cairn.node"], "n1");
    assert_eq!(labels["cairn.source-commit"], v1.as_str());

    // v2 while a client polls the proxy: v1 then v2, no failed request.
    let poller = poll(agent.proxy, &host, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v2 = src.commit(&docker_site(&base, "v2", true));
    let r2 = plane.wait_release(&app, 2, "live", DEPLOY).await;
    assert_eq!(r2["source_commit"], v2.as_str());
    wait_body(agent.proxy, &host, "v2", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (elapsed, seen) = poller.finish().await;
    let (n, rate) = assert_switch(&seen, elapsed, "v1", "v2");
    eprintln!("v1 -> v2: {n} requests at {rate:.0}/s, none failed");
    clock.lap("v2 switched");
    assert_eq!(
        plane.release(&app, 1).await.unwrap()["status"],
        "superseded"
    );
    let names: Vec<String> = app_containers(&e, &app).into_iter().map(|c| c.0).collect();
    assert_eq!(names, [format!("cairn-{}-{app}-r2-s1", e.installation)]);

    // A replica removed by hand is back within a heartbeat (plus its start and health check).
    docker(&["rm", "-f", &names[0]]);
    let gone = Instant::now();
    wait_for(
        "the removed replica to be running again",
        HEARTBEAT * 10,
        || async {
            let c = app_containers(&e, &app);
            (c.len() == 1 && get(agent.proxy, &host, "/").await == Ok((200, "v2\n".into())))
                .then_some(())
        },
    )
    .await;
    let back = gone.elapsed();
    clock.lap("removed replica back");
    eprintln!("a removed replica served again after {back:?} (heartbeat {HEARTBEAT:?})");
    assert!(
        back < HEARTBEAT * 2 + Duration::from_secs(5),
        "back after {back:?}: more than a heartbeat plus a start"
    );

    // A build that fails: release 3 fails with the reason, v2 keeps serving throughout.
    let r3 = steady_while(agent.proxy, &host, "v2", async {
        src.commit(&broken_docker_site(&base, "v3"));
        plane.wait_release(&app, 3, "failed", DEPLOY).await
    })
    .await;
    clock.lap("v3 failed to build");
    let why = r3["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("build") && why.contains("v3 build breaks"),
        "{r3}"
    );

    // A release whose health check fails: release 4 fails, v2 keeps serving.
    let r4 = steady_while(agent.proxy, &host, "v2", async {
        src.commit(&docker_site(&base, "v4", false));
        plane.wait_release(&app, 4, "failed", DEPLOY).await
    })
    .await;
    clock.lap("v4 failed its health check");
    let why = r4["error"].as_str().unwrap_or_default();
    assert!(why.contains("health") && why.contains("404"), "{r4}");
    let names: Vec<String> = app_containers(&e, &app).into_iter().map(|c| c.0).collect();
    assert_eq!(
        names,
        [format!("cairn-{}-{app}-r2-s1", e.installation)],
        "only the serving replica is left"
    );
    // The failed releases are not retried: the placement goes back to release 2 (the automatic
    // rollback), so a replica of it lost now is repaired, not replaced by a failing release 4.
    wait_for(
        "the placement to return to the live release 2",
        Duration::from_secs(30),
        || async {
            let p = plane
                .rows(&format!(
                    "SELECT release FROM placements WHERE app = '{app}'"
                ))
                .await;
            (p.len() == 1 && p[0]["release"] == 2).then_some(())
        },
    )
    .await;
    docker(&["rm", "-f", &names[0]]);
    wait_body(agent.proxy, &host, "v2", HEARTBEAT * 10).await;
    clock.lap("release 2 repaired after the failures");
    let r5 = plane.release(&app, 5).await;
    assert!(
        r5.is_none(),
        "no release was made for the failed commit: {r5:?}"
    );

    // Built once per release that built (v1, v2, v4): the repair and the retries reused the image.
    let log = agent.log_text();
    assert_eq!(log.matches("source=Built").count(), 3, "images built");
    assert!(
        log.contains("source=Cached"),
        "the repair reused r2's image"
    );
    let status = plane.cairn(&["status"]);
    assert!(status.status.success());

    // `cairn rollback` to release 1: release 1's image runs again (the container's image id is the
    // release's), nothing is built, and the pin holds over the next reconciles.
    let out = plane.cairn(&["rollback", &app, "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_body(agent.proxy, &host, "v1", DEPLOY).await;
    let r1_name = format!("cairn-{}-{app}-r1-s1", e.installation);
    wait_for(
        "release 1's replica alone",
        Duration::from_secs(30),
        || async {
            let names: Vec<String> = app_containers(&e, &app).into_iter().map(|c| c.0).collect();
            (names == [r1_name.clone()]).then_some(())
        },
    )
    .await;
    clock.lap("rolled back to release 1");
    let image = docker(&["inspect", "--format", "{{.Image}}", &r1_name]);
    let r1 = plane.release(&app, 1).await.unwrap();
    assert_eq!(
        image.trim(),
        r1["image"].as_str().unwrap_or_default(),
        "the replica runs release 1's image: {r1}"
    );
    let log = agent.log_text();
    assert_eq!(
        log.matches("source=Built").count(),
        3,
        "the rollback built nothing"
    );
    let generation = plane.generation().await;
    tokio::time::sleep(Duration::from_secs(5)).await; // two reconcile intervals
    let placed = plane
        .rows(&format!(
            "SELECT release FROM placements WHERE app = '{app}'"
        ))
        .await;
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0]["release"], 1, "the pin holds over reconciles");
    assert_eq!(plane.generation().await, generation);
    let (status, body) = get(agent.proxy, &host, "/").await.unwrap();
    assert_eq!((status, body.trim()), (200, "v1"));

    // Removed from the config: its containers are gone, the proxy no longer routes it.
    e.remove_app(&plane, &app).await;
    wait_for(
        "the app's containers to be removed",
        Duration::from_secs(30),
        || async { app_containers(&e, &app).is_empty().then_some(()) },
    )
    .await;
    clock.lap("removed");
    let (status, _) = get(agent.proxy, &host, "/").await.unwrap();
    assert_eq!(status, 404, "an app that is gone is not routed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn process_app_deploys_restarts_after_a_crash_and_switches_without_errors() {
    let mut clock = Clock::new();
    let Some(mut e) = E2e::new(
        "process_app_deploys_restarts_after_a_crash",
        &[Driver::Process],
    )
    .await
    else {
        return;
    };
    let a = e.app("proc", "process-app", 1, &site("v1", true));
    let (app, host, src) = (a.name.clone(), a.host.clone(), &a.source);
    e.repo.node("n1", "");
    clock.lap("setup");
    let plane = e.start(&[]).await;
    let agent = e.agent(&plane, "n1", Driver::Process, &[]).await;
    clock.lap("serve and agent up");
    plane.wait_release(&app, 1, "live", DEPLOY).await;
    wait_body(agent.proxy, &host, "v1", Duration::from_secs(10)).await;
    clock.lap("v1 built and serving");

    // The replica is a busybox httpd running in its release directory under the agent's data dir.
    let apps = std::path::PathBuf::from(format!("{}-apps", agent.dir.display()));
    let pids = support::processes_under(&apps);
    assert_eq!(pids.len(), 1, "one replica process: {pids:?}");
    let crashed = pids[0];
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(crashed).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let t = Instant::now();
    wait_body(agent.proxy, &host, "v1", Duration::from_secs(15)).await;
    let now = support::processes_under(&apps);
    assert!(
        now.len() == 1 && now[0] != crashed,
        "restarted as a new process: {now:?}"
    );
    eprintln!("the crashed replica served again after {:?}", t.elapsed());

    // v2 while a client polls: no failed request.
    let poller = poll(agent.proxy, &host, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(500)).await;
    src.commit(&site("v2", true));
    plane.wait_release(&app, 2, "live", DEPLOY).await;
    wait_body(agent.proxy, &host, "v2", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (elapsed, seen) = poller.finish().await;
    let (n, rate) = assert_switch(&seen, elapsed, "v1", "v2");
    eprintln!("v1 -> v2: {n} requests at {rate:.0}/s, none failed");
    clock.lap("v2 switched");

    // A release whose health check fails keeps v2 serving.
    let r3 = steady_while(agent.proxy, &host, "v2", async {
        src.commit(&site("v3", false));
        plane.wait_release(&app, 3, "failed", DEPLOY).await
    })
    .await;
    assert!(
        r3["error"].as_str().unwrap_or_default().contains("health"),
        "{r3}"
    );
    clock.lap("v3 failed its health check");

    // Removed from the config: the process is gone.
    e.remove_app(&plane, &app).await;
    let dir = apps;
    wait_for(
        "the app's process to stop",
        Duration::from_secs(30),
        || async { support::processes_under(&dir).is_empty().then_some(()) },
    )
    .await;
    clock.lap("removed");
}
