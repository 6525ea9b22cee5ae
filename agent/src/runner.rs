//! How the agent loop ([`crate::node`]) carries out a task on this node: the [`Runner`] trait, the mapping
//! from a leased task to a [`ReplicaSpec`], and [`DriverRunner`], which runs tasks through the real
//! drivers ([`crate::driver`]) and the health-gated [`Deployer`].
//!
//! A runner acts; it does not decide whether to act. The agent loop checks generations (a task older
//! than what a slot holds never runs), keeps the [`crate::datadir::Book`], and reports.
//!
//! What it must not do: decrypt secrets (the driver does, right before it starts a replica), or report
//! a secret in a result, an error or a log line.

use std::sync::Arc;

use async_trait::async_trait;
use cairn_proto::{ActualReplica, DeployPayload, ReleaseEnv, RunState, TaskKind};
use cairn_schema::error::chain;
use cairn_schema::{Ciphertext, Domain, Driver as DriverName, EnvName, Name};

use crate::deploy::{DeployError, Deployer};
use crate::driver::{DriverError, ReplicaState};
use crate::logs::{LogLine, LogSink};
use crate::spec::{BuildSpec, HealthSpec, Limits, ReplicaSpec, SourceSpec, SpecError};

/// The last lines of one replica, as a runner reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOutput {
    pub app: Name,
    pub slot: u32,
    pub release: u64,
    /// Oldest first.
    pub lines: Vec<LogLine>,
}

/// One task as a runner sees it.
#[derive(Debug, Clone)]
pub struct Work {
    pub task: i64,
    pub kind: TaskKind,
    pub app: Name,
    pub slot: u32,
    pub release: u64,
    pub generation: Option<u64>,
    /// For deploy, start and restart: the replica to run.
    pub spec: Option<ReplicaSpec>,
}

/// Why a task failed on this node. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The task is malformed or asks for something the agent never grants: retrying cannot help.
    #[error("the task was refused")]
    Refused(#[source] SpecError),
    #[error("a {0} task needs the release it runs, and this one carries none")]
    NoRelease(&'static str),
    /// The release itself is broken (its build steps fail, its replica fails its health check): the same
    /// release fails the same way on the next attempt, so it is not retried and the release fails at once
    /// with this reason, while the old release keeps serving.
    #[error("{0}")]
    Broken(String),
    /// What the driver or the deploy said; may work on a later attempt.
    #[error("{0}")]
    Failed(String),
}

impl RunError {
    /// Whether a later attempt may succeed.
    pub fn retry(&self) -> bool {
        matches!(self, RunError::Failed(_))
    }
}

/// A task carried out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ran {
    /// One line: what runs now, or what was done.
    pub summary: String,
    /// A deploy's milliseconds per stage ([`crate::deploy::Timings::by_stage`]); empty otherwise.
    pub timings: std::collections::BTreeMap<String, u64>,
    /// The image a deploy runs (its release records it); `None` otherwise.
    pub image: Option<cairn_proto::DeployedImage>,
}

impl From<String> for Ran {
    fn from(summary: String) -> Ran {
        Ran {
            summary,
            timings: Default::default(),
            image: None,
        }
    }
}

/// What carries out tasks on this node.
#[async_trait]
pub trait Runner: Send + Sync + std::fmt::Debug {
    /// The drivers this node offers.
    fn drivers(&self) -> Vec<DriverName>;

    /// Carries out one task.
    async fn run(&self, work: &Work, log: &dyn LogSink) -> Result<Ran, RunError>;

    /// Stops and removes a slot's replica at once (a heartbeat's stop order).
    async fn stop_now(&self, app: &Name, slot: u32) -> Result<(), RunError>;

    /// The replicas on this node (generation is filled in by the caller from its book).
    async fn actual(&self) -> Result<Vec<ActualReplica>, RunError>;

    /// The last `tail` lines of each replica on this node, for shipping ([`crate::housekeeping`]).
    async fn recent_output(&self, tail: usize) -> Result<Vec<ReplicaOutput>, RunError> {
        let _ = tail;
        Ok(Vec::new())
    }

    /// Removes images beyond each app's `keep` newest that no replica uses.
    async fn prune_images(&self, keep: usize) -> Result<usize, RunError> {
        let _ = keep;
        Ok(0)
    }
}

/// The replica spec a deploy, start or restart task runs: the task's release, this installation, and
/// the secrets as the sealed ciphertext the task carries.
pub fn replica_spec(
    installation: &Name,
    app: &Name,
    slot: u32,
    release: u64,
    p: &DeployPayload,
) -> Result<ReplicaSpec, SpecError> {
    let invalid = |field: &'static str, why: String| SpecError::Invalid { field, why };
    if p.secrets_pending {
        return Err(invalid(
            "secret_env",
            "the secrets were not sealed to this node".into(),
        ));
    }
    let env = p
        .spec
        .env
        .iter()
        .filter_map(|(k, v)| match v {
            ReleaseEnv::Plain { value } => Some((k.clone(), value.clone())),
            ReleaseEnv::Secret { .. } => None,
        })
        .collect::<std::collections::BTreeMap<EnvName, String>>();
    let secret_env = p
        .secret_env
        .as_deref()
        .map(Ciphertext::new)
        .transpose()
        .map_err(|e| invalid("secret_env", e.to_string()))?;
    let hostnames = p
        .hostnames
        .iter()
        .map(|h| Domain::new(h).map_err(|e| invalid("hostnames", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let spec = ReplicaSpec {
        installation: installation.clone(),
        app: app.clone(),
        release,
        slot,
        config_commit: p.config_commit.clone(),
        source: SourceSpec {
            url: p.spec.source_url.clone(),
            commit: p.source_commit.clone(),
        },
        build: BuildSpec {
            dockerfile: p.spec.dockerfile,
            base_image: p.spec.image.clone(),
            commands: p.spec.build.clone(),
            start: p.spec.start.clone(),
            port: p.spec.port,
        },
        image: p.image.clone(),
        push_to: p.push_to.clone(),
        limits: Limits {
            cpu_millis: p.spec.cpu_millis,
            memory_bytes: p.spec.memory_bytes,
        },
        env,
        secret_env,
        health: HealthSpec {
            path: p.spec.health.path.clone(),
            timeout_ms: u64::try_from(p.spec.health.timeout.duration().as_millis())
                .unwrap_or(u64::MAX),
            ..HealthSpec::default()
        },
        hostnames,
        isolation: Default::default(),
    };
    spec.check_for(installation)?;
    Ok(spec)
}

/// Runs tasks with a real driver (Docker or supervised processes) through the health-gated deployer.
#[derive(Debug)]
pub struct DriverRunner {
    deployer: Arc<Deployer>,
}

impl DriverRunner {
    pub fn new(deployer: Arc<Deployer>) -> Self {
        DriverRunner { deployer }
    }
}

#[async_trait]
impl Runner for DriverRunner {
    fn drivers(&self) -> Vec<DriverName> {
        vec![self.deployer.driver().kind()]
    }

    async fn run(&self, work: &Work, log: &dyn LogSink) -> Result<Ran, RunError> {
        let d = &self.deployer;
        let failed = |e: &dyn std::error::Error| RunError::Failed(chain(e));
        match work.kind {
            TaskKind::Deploy | TaskKind::Start | TaskKind::Restart => {
                let spec = work
                    .spec
                    .as_ref()
                    .ok_or(RunError::NoRelease(work.kind.as_str()))?;
                if work.kind == TaskKind::Restart {
                    // The driver interface has no in-place restart: take the slot's replica down and run
                    // the release again (the slot does not serve in between).
                    d.remove_slot(&work.app, work.slot)
                        .await
                        .map_err(|e| failed(&e))?;
                }
                match d.deploy(spec, log).await {
                    Ok(report) => Ok(Ran {
                        summary: format!(
                            "{} runs release {} ({:?} image, {} ms)",
                            report.replica.name,
                            spec.release,
                            report.image_source,
                            report.timings.total.as_millis()
                        ),
                        timings: report.timings.by_stage(),
                        image: Some(cairn_proto::DeployedImage {
                            id: report.image.0.clone(),
                            registry: report
                                .registry
                                .as_ref()
                                .map(|p| (p.reference.clone(), p.digest.clone())),
                        }),
                    }),
                    Err(f) => match f.error {
                        DeployError::Refused(e) => Err(RunError::Refused(e)),
                        DeployError::Build(DriverError::Build { .. })
                        | DeployError::Unhealthy { .. } => Err(RunError::Broken(f.reason())),
                        _ => Err(RunError::Failed(f.reason())),
                    },
                }
            }
            TaskKind::Stop => {
                let stopped = d
                    .stop_slot(&work.app, work.slot)
                    .await
                    .map_err(|e| failed(&e))?;
                Ok(format!("stopped {} replica(s)", stopped.len()).into())
            }
            TaskKind::Remove => {
                let removed = d
                    .remove_slot(&work.app, work.slot)
                    .await
                    .map_err(|e| failed(&e))?;
                Ok(format!("removed {} replica(s)", removed.len()).into())
            }
            k => Err(RunError::Failed(format!(
                "`{}` is a database task, not a replica's",
                k.as_str()
            ))),
        }
    }

    async fn stop_now(&self, app: &Name, slot: u32) -> Result<(), RunError> {
        self.deployer
            .remove_slot(app, slot)
            .await
            .map(|_| ())
            .map_err(|e| RunError::Failed(chain(&e)))
    }

    async fn recent_output(&self, tail: usize) -> Result<Vec<ReplicaOutput>, RunError> {
        let driver = self.deployer.driver();
        let list = driver
            .list_replicas()
            .await
            .map_err(|e| RunError::Failed(chain(&e)))?;
        let mut out = Vec::with_capacity(list.len());
        for r in list {
            match driver.logs(&r.id, tail).await {
                Ok(lines) => out.push(ReplicaOutput {
                    app: r.app,
                    slot: r.slot,
                    release: r.release,
                    lines,
                }),
                // Removed between the listing and the read.
                Err(crate::driver::DriverError::NotFound(_)) => {}
                Err(e) => return Err(RunError::Failed(chain(&e))),
            }
        }
        Ok(out)
    }

    async fn prune_images(&self, keep: usize) -> Result<usize, RunError> {
        self.deployer
            .driver()
            .prune_images(keep)
            .await
            .map(|r| r.len())
            .map_err(|e| RunError::Failed(chain(&e)))
    }

    async fn actual(&self) -> Result<Vec<ActualReplica>, RunError> {
        let routed: std::collections::HashSet<_> = self
            .deployer
            .proxy()
            .routes()
            .into_iter()
            .flat_map(|r| r.backends.into_iter().map(|(id, _)| id))
            .collect();
        let list = self
            .deployer
            .driver()
            .list_replicas()
            .await
            .map_err(|e| RunError::Failed(chain(&e)))?;
        Ok(list
            .into_iter()
            .map(|r| {
                let running = matches!(r.state, ReplicaState::Running | ReplicaState::Restarting);
                ActualReplica {
                    healthy: running && routed.contains(&r.id),
                    app: r.app,
                    slot: r.slot,
                    release: r.release,
                    generation: None,
                    state: if running {
                        RunState::Running
                    } else {
                        RunState::Stopped
                    },
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn payload() -> DeployPayload {
        serde_json::from_value(serde_json::json!({
            "config_commit": "0123456789abcdef0123456789abcdef01234567",
            "source_commit": "89abcdef0123456789abcdef0123456789abcdef",
            "spec": {
                "app": "web", "source_url": "https://example.com/web.git", "port": 8080,
                "health": {"path": "/healthz", "timeout": "2s"}, "cpu_millis": 250,
                "memory_bytes": 268435456, "disk_bytes": 0, "drivers": ["docker"],
                "dockerfile": false, "image": "debian:12", "build": ["make"], "start": "./web",
                "env": {"GREETING": {"kind": "plain", "value": "hi"},
                        "TOKEN": {"kind": "secret", "fingerprint": "f"}}
            },
            "hostnames": ["web.example.com"],
            "secrets_pending": false
        }))
        .unwrap()
    }

    #[test]
    fn a_deploy_payload_becomes_a_replica_spec() {
        let inst = Name::new("cairn").unwrap();
        let web = Name::new("web").unwrap();
        let spec = replica_spec(&inst, &web, 2, 7, &payload()).unwrap();
        assert_eq!(spec.replica_name(), "cairn-cairn-web-r7-s2");
        assert_eq!(
            spec.env.len(),
            1,
            "secrets travel only as the sealed ciphertext"
        );
        assert_eq!(spec.health.timeout_ms, 2000);
        assert_eq!(spec.limits.memory_bytes, 268435456);
        assert_eq!(spec.hostnames[0].as_str(), "web.example.com");
    }

    #[test]
    fn a_broken_release_is_not_retried_and_a_transient_failure_is() {
        assert!(!RunError::Broken("the build failed".into()).retry());
        assert!(RunError::Failed("the engine did not answer".into()).retry());
    }

    #[test]
    fn an_unsealed_or_malformed_payload_is_refused() {
        let inst = Name::new("cairn").unwrap();
        let web = Name::new("web").unwrap();
        let mut p = payload();
        p.secrets_pending = true;
        assert!(replica_spec(&inst, &web, 1, 1, &p).is_err());
        let mut p = payload();
        p.source_commit = "main".into();
        assert!(matches!(
            replica_spec(&inst, &web, 1, 1, &p),
            Err(SpecError::Invalid {
                field: "source.commit",
                ..
            })
        ));
    }
}
