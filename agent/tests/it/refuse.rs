//! A task asking for weaker isolation is refused by the agent before anything is fetched, built or
//! started, by the deployer and by each driver on its own.

use std::sync::Arc;

use cairn_agent::{
    DeployError, DockerConfig, DockerDriver, Driver, DriverError, ImageId, ProcessConfig,
    ProcessDriver, ReplicaSpec, SpecError, Stage,
};
use cairn_schema::Identity;

use crate::support::{self, AppRepo, Installation, Node, bounded, spec};

/// The JSON a hostile control plane might send: a normal task plus one isolation field.
fn hostile(base: &ReplicaSpec, field: &str, value: serde_json::Value) -> ReplicaSpec {
    let mut json = serde_json::to_value(base).unwrap();
    json[field] = value;
    serde_json::from_value(json).expect("an isolation field parses, to be refused by name")
}

fn cases(base: &ReplicaSpec) -> Vec<(&'static str, ReplicaSpec)> {
    vec![
        (
            "privileged",
            hostile(base, "privileged", serde_json::json!(true)),
        ),
        (
            "binds",
            hostile(base, "binds", serde_json::json!(["/:/host"])),
        ),
        (
            "binds",
            hostile(
                base,
                "binds",
                serde_json::json!(["/var/run/docker.sock:/var/run/docker.sock"]),
            ),
        ),
        (
            "network_mode",
            hostile(base, "network_mode", serde_json::json!("host")),
        ),
        (
            "pid_mode",
            hostile(base, "pid_mode", serde_json::json!("host")),
        ),
        (
            "devices",
            hostile(base, "devices", serde_json::json!(["/dev/mem"])),
        ),
    ]
}

async fn assert_refused_everywhere(node: &Node, driver: &dyn Driver, base: &ReplicaSpec) {
    for (field, task) in cases(base) {
        assert!(
            matches!(ReplicaSpec::from_json(&serde_json::to_vec(&task).unwrap()), Err(SpecError::Refused { field: f }) if f == field)
        );
        let err = node
            .deployer
            .deploy(&task, &support::Discard)
            .await
            .unwrap_err();
        assert_eq!(err.stage, Stage::Check);
        assert!(
            matches!(&err.error, DeployError::Refused(SpecError::Refused { field: f }) if *f == field),
            "{err:?}"
        );
        assert!(err.reason().contains(field), "{}", err.reason());
        // The drivers refuse on their own too, whoever calls them.
        let started = driver
            .start_replica(&task, &ImageId("sha256:none".into()), &Identity::generate())
            .await;
        assert!(
            matches!(started, Err(DriverError::Spec(SpecError::Refused { field: f })) if f == field),
            "{started:?}"
        );
    }
}

#[tokio::test]
async fn the_process_driver_refuses_privileged_binds_and_host_namespaces() {
    if !support::tools("the_process_driver_refuses") {
        return;
    }
    bounded(60, async {
        let inst = Installation::new(None);
        let repo = AppRepo::new(inst.dir.path(), "web");
        let app = inst.app();
        let v1 = repo.commit_version("v1");
        let driver = Arc::new(ProcessDriver::new(ProcessConfig::new(
            inst.id.clone(),
            inst.node.clone(),
            inst.path("releases"),
        )));
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let base = spec(&inst, &app, &repo, 1, &v1, support::process_build());
        assert_refused_everywhere(&node, driver.as_ref(), &base).await;
        assert!(driver.list_replicas().await.unwrap().is_empty());
        assert_eq!(driver.builds_run(), 0);
        assert!(!inst.path("node-sources").exists(), "nothing was fetched");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_driver_refuses_privileged_binds_and_host_namespaces() {
    const TEST: &str = "the_docker_driver_refuses";
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
        let v1 = repo.commit_version("v1");
        let driver = Arc::new(DockerDriver::with_client(
            docker.clone(),
            DockerConfig::new(inst.id.clone(), inst.node.clone()),
        ));
        let node = Node::start(&inst, driver.clone(), repo.rewrites()).await;
        let base = spec(
            &inst,
            &app,
            &repo,
            1,
            &v1,
            support::docker_build("busybox:absent"),
        );
        assert_refused_everywhere(&node, driver.as_ref(), &base).await;
        assert!(inst.containers().await.is_empty());
        assert_eq!(driver.builds_run(), 0);
        assert!(!inst.path("node-sources").exists(), "nothing was fetched");

        // And a task for another installation is not this agent's to run.
        let mut other = base.clone();
        other.installation = cairn_schema::Name::new("someone-else").unwrap();
        let err = node
            .deployer
            .deploy(&other, &support::Discard)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err.error,
                DeployError::Refused(SpecError::WrongInstallation { .. })
            ),
            "{err:?}"
        );
    })
    .await;
}
