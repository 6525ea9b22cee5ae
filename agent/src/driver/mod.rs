//! The driver interface: how a node turns a [`ReplicaSpec`] into an image and a running replica, and
//! reports what runs. Two implementations: [`docker::DockerDriver`] (containers through the engine's API)
//! and [`process::ProcessDriver`] (supervised child processes, for hosts without Docker).
//!
//! Every replica is named and labelled from its spec (installation, app, release, slot, commits, node), and
//! a driver lists, stops and removes only replicas carrying its own installation and node, so two
//! installations or two tests sharing a machine never touch each other's replicas.
//!
//! What it must not do: decide anything about releases or routing (that is [`crate::deploy`]), hold a
//! secret's plaintext longer than the replica that needs it, or grant an isolation option a spec asks for
//! (a driver re-checks the spec before it starts anything).

pub mod docker;
pub mod process;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use cairn_schema::{Identity, Name};

use crate::health::{self, HealthError};
use crate::logs::{LogLine, LogSink};
use crate::spec::{HealthSpec, ImageRef, ReplicaSpec, SpecError};

/// Label keys on every container and image this agent makes (and the fields of a process replica).
pub mod label {
    pub const INSTALLATION: &str = "cairn.installation";
    pub const APP: &str = "cairn.app";
    pub const RELEASE: &str = "cairn.release";
    pub const SLOT: &str = "cairn.slot";
    pub const NODE: &str = "cairn.node";
    pub const CONFIG_COMMIT: &str = "cairn.config-commit";
    pub const SOURCE_COMMIT: &str = "cairn.source-commit";
    /// On images: the build key ([`crate::spec::ReplicaSpec::build_key`]) the image was built for.
    pub const BUILD_KEY: &str = "cairn.build-key";
    pub const HOSTNAMES: &str = "cairn.hostnames";
    pub const PORT: &str = "cairn.port";
    pub const HEALTH_PATH: &str = "cairn.health-path";
}

/// Which driver runs a replica: the manifest's vocabulary (`cairn_schema::Driver`, what runtimes accept
/// and nodes offer), named for this module, whose trait is `Driver`.
pub use cairn_schema::Driver as DriverKind;

/// A release's runnable artifact: a Docker image id (`sha256:...`) or a process driver release directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ImageId(pub String);

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An image a node has already ([`Driver::find_image`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: ImageId,
    /// Set when the image found is the registry image the task names (so the release may record it by
    /// its reference and digest).
    pub registry: Option<ImageRef>,
}

impl Found {
    pub fn local(id: ImageId) -> Found {
        Found { id, registry: None }
    }
}

/// A replica's id: the container id, or the process driver's replica name.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ReplicaId(pub String);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A started replica and where it answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Replica {
    pub id: ReplicaId,
    /// The deterministic name, `cairn-<installation>-<app>-r<release>-s<slot>`.
    pub name: String,
    pub app: Name,
    pub release: u64,
    pub slot: u32,
    /// Always on 127.0.0.1.
    pub addr: SocketAddr,
}

/// What a replica is doing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ReplicaState {
    Created,
    Running,
    /// Between a crash and its restart.
    Restarting,
    /// Stopped on purpose.
    Stopped,
    /// Exited by itself and not (yet) restarted.
    Exited {
        code: Option<i64>,
    },
    Other {
        what: String,
    },
}

/// One replica as a driver observes it: the actual state a heartbeat reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaStatus {
    pub id: ReplicaId,
    pub name: String,
    pub app: Name,
    pub release: u64,
    pub slot: u32,
    pub config_commit: String,
    pub source_commit: String,
    pub image: String,
    pub state: ReplicaState,
    pub addr: Option<SocketAddr>,
    pub hostnames: Vec<String>,
    /// Restarts after crashes, where the driver counts them.
    pub restarts: u32,
    /// The health check path the replica was started with.
    pub health_path: Option<String>,
}

impl ReplicaStatus {
    /// Reads the labels a driver put on a replica. `None` when they are not Cairn's.
    pub(crate) fn from_labels(
        id: String,
        name: String,
        image: String,
        labels: &BTreeMap<String, String>,
        state: ReplicaState,
        addr: Option<SocketAddr>,
        restarts: u32,
    ) -> Option<Self> {
        let get = |k: &str| labels.get(k).cloned();
        Some(ReplicaStatus {
            id: ReplicaId(id),
            name,
            app: Name::new(&get(label::APP)?).ok()?,
            release: get(label::RELEASE)?.parse().ok()?,
            slot: get(label::SLOT)?.parse().ok()?,
            config_commit: get(label::CONFIG_COMMIT).unwrap_or_default(),
            source_commit: get(label::SOURCE_COMMIT).unwrap_or_default(),
            image,
            state,
            addr,
            hostnames: get(label::HOSTNAMES)
                .map(|h| {
                    h.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            restarts,
            health_path: get(label::HEALTH_PATH),
        })
    }
}

/// The labels of a spec's replica on `node`: its image's, and what is the release's own.
pub(crate) fn replica_labels(spec: &ReplicaSpec, node: &Name) -> BTreeMap<String, String> {
    let mut l = image_labels(spec);
    l.insert(label::RELEASE.into(), spec.release.to_string());
    l.insert(label::CONFIG_COMMIT.into(), spec.config_commit.clone());
    l.insert(label::SLOT.into(), spec.slot.to_string());
    l.insert(label::NODE.into(), node.to_string());
    l.insert(label::HEALTH_PATH.into(), spec.health.path.clone());
    l.insert(
        label::HOSTNAMES.into(),
        spec.hostnames
            .iter()
            .map(|h| h.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    l
}

/// The labels of a spec's image: what its build key covers and nothing a release changes without a new
/// image (no release, config commit, slot or node), so every release of the key runs the same bytes.
pub(crate) fn image_labels(spec: &ReplicaSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        (label::INSTALLATION.into(), spec.installation.to_string()),
        (label::APP.into(), spec.app.to_string()),
        (label::SOURCE_COMMIT.into(), spec.source.commit.clone()),
        (label::BUILD_KEY.into(), spec.build_key()),
    ])
}

/// What can go wrong in a driver. No variant carries secret plaintext: messages that come back from a
/// place that saw the env are redacted first.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("the Docker engine failed to {op}")]
    Docker {
        op: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("the Docker engine failed to {op}: {message}")]
    DockerMessage { op: String, message: String },
    #[error("the build of {app} release {release} failed: {reason}")]
    Build {
        app: Name,
        release: u64,
        reason: String,
    },
    #[error("the build of {app} release {release} took longer than {after:?}")]
    BuildTimeout {
        app: Name,
        release: u64,
        after: Duration,
    },
    #[error(
        "base image `{image}` is not on this node, and this agent does not pull base images (build or load it first, or enable pulling)"
    )]
    BaseImageMissing { image: String },
    #[error("a `{what}` runtime needs {needs}")]
    Unsupported { what: &'static str, needs: String },
    #[error("pulling {reference} failed: {reason}")]
    Pull { reference: String, reason: String },
    #[error("pushing {reference} failed: {reason}")]
    Push { reference: String, reason: String },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replica {0} is not known to this driver")]
    NotFound(ReplicaId),
    #[error("replica {id} started but publishes no address for port {port}")]
    NoAddress { id: ReplicaId, port: u16 },
    #[error(
        "the containers' network {network} cannot be made safe: {reason} (run the agent as root with \
         iptables, or pass --allow-metadata-access to run without the rule)"
    )]
    Network { network: String, reason: String },
    #[error("a driver task failed")]
    Join(#[source] tokio::task::JoinError),
}

impl DriverError {
    pub(crate) fn docker(op: impl Into<String>, source: bollard::errors::Error) -> Self {
        DriverError::Docker {
            op: op.into(),
            source,
        }
    }
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        DriverError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// How a node builds and runs replicas.
///
/// Every method is idempotent where a task may be delivered twice: starting a replica whose name already
/// runs the same image returns it; stopping or removing a replica that is gone succeeds.
#[async_trait]
pub trait Driver: Send + Sync + fmt::Debug {
    fn kind(&self) -> DriverKind;

    /// The installation whose replicas this driver manages.
    fn installation(&self) -> &Name;

    /// The spec's image if it is on this node already: built (or pulled) for the same build key, by any
    /// release, or the registry image the task names.
    async fn find_image(&self, spec: &ReplicaSpec) -> Result<Option<Found>, DriverError>;

    /// Builds the spec's image (one per build key) from the source tree in `context`, streaming build output to `log` while
    /// it happens.
    async fn build_image(
        &self,
        spec: &ReplicaSpec,
        context: &Path,
        log: &dyn LogSink,
    ) -> Result<ImageId, DriverError>;

    /// Whether [`Driver::pull_image`] and [`Driver::push_image`] work (images in a registry).
    fn can_pull(&self) -> bool {
        false
    }

    /// Pushes the spec's image to `repository` (`host:port/prefix/app`, tagged with the build key)
    /// and returns it pinned by digest, for the other nodes to pull.
    async fn push_image(
        &self,
        spec: &ReplicaSpec,
        image: &ImageId,
        repository: &str,
        log: &dyn LogSink,
    ) -> Result<ImageRef, DriverError> {
        let _ = (spec, image, repository, log);
        Err(DriverError::Unsupported {
            what: self.kind().as_str(),
            needs: "a Docker engine to push registry images".into(),
        })
    }

    /// Pulls the spec's registry image by digest and tags it as the build key's image.
    async fn pull_image(
        &self,
        spec: &ReplicaSpec,
        log: &dyn LogSink,
    ) -> Result<ImageId, DriverError> {
        let _ = (spec, log);
        Err(DriverError::Unsupported {
            what: self.kind().as_str(),
            needs: "a Docker engine to pull registry images".into(),
        })
    }

    /// Starts the spec's replica from `image`. The secret env is decrypted here, with `identity`, right
    /// before the replica is created; the plaintext goes only into the replica's environment.
    async fn start_replica(
        &self,
        spec: &ReplicaSpec,
        image: &ImageId,
        identity: &Identity,
    ) -> Result<Replica, DriverError>;

    /// Stops a replica, keeping it (a `stop` task). Its process gets a grace period, then is killed.
    async fn stop_replica(&self, id: &ReplicaId) -> Result<(), DriverError>;

    /// Stops and deletes a replica.
    async fn remove_replica(&self, id: &ReplicaId) -> Result<(), DriverError>;

    /// Every replica of this installation on this node, running or not.
    async fn list_replicas(&self) -> Result<Vec<ReplicaStatus>, DriverError>;

    /// The last `tail` lines of a replica's output, each with the time the replica printed it.
    async fn logs(&self, id: &ReplicaId, tail: usize) -> Result<Vec<LogLine>, DriverError>;

    /// Removes this installation's images of each app beyond the app's `keep` newest (by when the image
    /// was built), except any image a container of this installation uses (running or not): those are
    /// what every release still placed runs. Returns what it removed. A driver without images (the
    /// process driver) removes nothing.
    async fn prune_images(&self, keep: usize) -> Result<Vec<ImageId>, DriverError> {
        let _ = keep;
        Ok(Vec::new())
    }

    /// One replica's status, if it exists.
    async fn status(&self, id: &ReplicaId) -> Result<Option<ReplicaStatus>, DriverError> {
        Ok(self
            .list_replicas()
            .await?
            .into_iter()
            .find(|r| &r.id == id))
    }

    /// Waits until the replica answers its HTTP health check (sent with `host` as its `Host`), bounded by the spec's attempts and timeout.
    /// Fails early when the replica exits or starts crash-looping.
    async fn wait_healthy(
        &self,
        replica: &Replica,
        host: &str,
        spec: &HealthSpec,
    ) -> Result<(), HealthError> {
        health::wait_healthy(replica.addr, host, spec, || async {
            match self.status(&replica.id).await {
                Ok(Some(s)) => match s.state {
                    // Still starting (the process driver spawns in the background).
                    ReplicaState::Created => None,
                    ReplicaState::Running if s.restarts == 0 => None,
                    ReplicaState::Running | ReplicaState::Restarting => Some(format!(
                        "the replica crashed and was restarted {} time(s)",
                        s.restarts.max(1)
                    )),
                    ReplicaState::Exited { code } => Some(match code {
                        Some(c) => format!("the replica exited with status {c}"),
                        None => "the replica exited".to_owned(),
                    }),
                    other => Some(format!("the replica is not running ({other:?})")),
                },
                Ok(None) => Some("the replica is gone".to_owned()),
                Err(_) => None,
            }
        })
        .await
    }
}
