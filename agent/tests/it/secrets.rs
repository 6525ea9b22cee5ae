//! A secret reaches the app in plaintext and nothing else: not the logs (at any level, through the filter
//! the agent binary uses), not build output, not the replica's output, not reports or errors, not the
//! image. A secret encrypted to another node does not start at all.

use std::sync::{Arc, Mutex};

use cairn_agent::{
    BuildSpec, DeployError, DockerConfig, DockerDriver, Driver, DriverError, LogLine,
    ProcessConfig, ProcessDriver, ReplicaSpec, SpecError, Stage,
};
use cairn_schema::{Identity, secret::encrypt};
use rand::Rng;

use crate::support::{self, AppRepo, Installation, Node, bounded, get, spec};

fn canary() -> String {
    format!("canary-{:032x}", rand::thread_rng().r#gen::<u128>())
}

fn with_secret(mut s: ReplicaSpec, canary: &str, to: &Identity) -> ReplicaSpec {
    let json = serde_json::json!({ "CANARY": canary, "OTHER": "x" }).to_string();
    s.secret_env = Some(encrypt(json.as_bytes(), &[to.recipient()]).unwrap());
    s
}

/// Deploys an app that serves its `CANARY` env var at `/`, and checks where the canary is and is not.
async fn check(
    inst: &Installation,
    node: &Node,
    driver: &dyn Driver,
    build: BuildSpec,
    repo: &AppRepo,
    commit: &str,
) -> String {
    let captured = support::capture();
    let app = inst.app();
    let host = support::host(&app).to_string();
    let canary = canary();
    let task = with_secret(
        spec(inst, &app, repo, 1, commit, build.clone()),
        &canary,
        &node.identity,
    );
    assert!(!format!("{task:?}").contains(&canary));
    assert!(
        !serde_json::to_string(&task).unwrap().contains(&canary),
        "the task carries only ciphertext"
    );

    let build_log = Mutex::new(Vec::<LogLine>::new());
    let report = node
        .deployer
        .deploy(&task, &build_log)
        .await
        .unwrap_or_else(|e| panic!("{}", e.reason()));
    let client = support::client();
    assert_eq!(
        get(&client, node.proxy_addr, &host, "/").await.unwrap(),
        (200, canary.clone()),
        "the secret reached the app in plaintext"
    );

    let agent_logs = captured.agent_text();
    assert!(
        agent_logs.contains("switched") && agent_logs.contains(app.as_str()),
        "the capture works: it holds this deploy's own lines"
    );
    assert!(
        !agent_logs.contains(&canary),
        "the canary is in the agent's logs"
    );
    let build_text: String = build_log
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.text.clone() + "\n")
        .collect();
    assert!(!build_text.is_empty());
    assert!(
        !build_text.contains(&canary),
        "the canary is in the build output"
    );
    let replica_logs = driver.logs(&report.replica.id, 1000).await.unwrap();
    assert!(!format!("{replica_logs:?}").contains(&canary));
    assert!(!format!("{report:?}").contains(&canary));
    assert!(!serde_json::to_string(&report).unwrap().contains(&canary));

    // Encrypted to another node: refused at start, nothing left running, the route unchanged.
    let other = Identity::generate();
    let mut task2 = with_secret(spec(inst, &app, repo, 2, commit, build), &canary, &other);
    task2.config_commit = "cfg2".into();
    let err = node
        .deployer
        .deploy(&task2, &support::Discard)
        .await
        .unwrap_err();
    assert_eq!(err.stage, Stage::Start, "{}", err.reason());
    assert!(
        matches!(
            &err.error,
            DeployError::Start(DriverError::Spec(SpecError::Secrets(_)))
        ),
        "{err:?}"
    );
    assert!(!err.reason().contains(&canary));
    let running = driver.list_replicas().await.unwrap();
    assert_eq!(running.len(), 1, "{running:#?}");
    assert_eq!(running[0].release, 1);
    assert_eq!(
        get(&client, node.proxy_addr, &host, "/").await.unwrap(),
        (200, canary.clone())
    );
    assert!(!captured.agent_text().contains(&canary));
    canary
}

fn serve_canary(start_httpd: &str) -> String {
    format!(
        "mkdir -p s && printf %s \"$CANARY\" > s/index.html && echo ok > s/healthz && exec {start_httpd} -h s"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_secrets_reach_the_container_and_nothing_else() {
    const TEST: &str = "docker_secrets_reach_the_container";
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
        let v1 = repo.commit_version("v1");
        let driver = Arc::new(DockerDriver::with_client(
            docker.clone(),
            DockerConfig::new(inst.id.clone(), inst.node.clone()),
        ));
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let mut build = support::docker_build(&base);
        build.start = Some(serve_canary("httpd -f -p $PORT"));
        let canary = check(&inst, &node, driver.as_ref(), build, &repo, &v1).await;

        // Not baked into any image of this installation.
        let replicas = driver.list_replicas().await.unwrap();
        let image = docker.inspect_image(&replicas[0].image).await.unwrap();
        let env = image.config.unwrap().env.unwrap_or_default();
        assert!(!env.iter().any(|e| e.contains(&canary) || e.starts_with("CANARY=")), "{env:?}");
        // Why the agent's log filter caps bollard: uncapped, bollard prints the create request's env.
        assert!(
            support::capture().bollard_text().contains(&canary),
            "bollard no longer logs request bodies at debug; the cap in logs::CAPPED_TARGETS may be relaxed"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_secrets_reach_the_child_and_nothing_else() {
    const TEST: &str = "process_secrets_reach_the_child";
    support::capture();
    if !support::tools(TEST) {
        return;
    }
    bounded(120, async {
        let inst = Installation::new(None);
        let repo = AppRepo::new(inst.dir.path(), "web");
        let v1 = repo.commit_version("v1");
        let driver = Arc::new(ProcessDriver::new(ProcessConfig::new(
            inst.id.clone(),
            inst.node.clone(),
            inst.path("releases"),
        )));
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let mut build = support::process_build();
        build.start = Some(serve_canary(&format!(
            "{} httpd -f -p 127.0.0.1:$PORT",
            support::BUSYBOX
        )));
        check(&inst, &node, driver.as_ref(), build, &repo, &v1).await;
    })
    .await;
}
