//! The Docker driver: builds a release's image with the engine's classic builder and runs replicas as
//! containers, through bollard on the engine's unix socket.
//!
//! - Build: one image per build key (source commit and recipe, [`cairn_proto::build`]), which every
//!   release of the key runs: a release that changes only env, limits, domains, health check, port or
//!   start command starts from the image already here. The source tree is streamed to the engine as a
//!   tar, with a Dockerfile generated from the runtime (`FROM` the base image, one `COPY`, and one `RUN`
//!   for all build commands) unless the runtime uses the app's own; the start command and working
//!   directory are given to the container, not baked into the image. No base image is pulled unless the
//!   agent is told to; build output reaches a [`LogSink`] line by line while the build runs. The image is
//!   tagged `cairn/<installation>/<app>:<build key>` and labelled (installation, app, source commit,
//!   build key; nothing of a release) by one `LABEL` step at the end of the Dockerfile the engine builds:
//!   the generated one, or the app's own with that step added. The agent writes that Dockerfile into the
//!   build context and lists it in the context's `.dockerignore`, so the engine drops it from the
//!   context after reading it (the docker CLI's way with a Dockerfile from outside the context). Not as
//!   build options: the classic builder makes a step of each of those (a container and a commit), about
//!   a second each on a slow storage driver; they are used only for an own Dockerfile that cannot take
//!   the step (a link, over 1 MiB, not UTF-8, or ending in a line continuation). Builds of one tag are
//!   single-flight.
//! - Run: containers named `cairn-<installation>-<app>-r<release>-s<slot>` and labelled (installation,
//!   app, release, slot, commits, node, hostnames), with the plan's memory and CPU limits, restart policy
//!   `unless-stopped`, a pid limit, `no-new-privileges`, every capability dropped but
//!   `NET_BIND_SERVICE`, optionally a read-only root filesystem (tmpfs `/tmp`), bounded json-file logs,
//!   and the app port published on 127.0.0.1 with a port the engine picks. They run on the agent's own
//!   bridge network ([`DockerConfig::network`], `cairn` on an interface `cairn-<8 hex>`), whose traffic to
//!   169.254.0.0/16 (the cloud metadata service) an iptables `raw` rule drops
//!   ([`DockerDriver::ensure_network`]). Containers are created from the image id, not
//!   the tag, so a retag never changes what a replica runs.
//!
//! What it must not do: create a container privileged, on the host's network, PID or IPC namespace, with
//! devices, host bind mounts or the Docker socket (the create request is built here from scratch and has
//! no field for any of them), publish a port beyond loopback, inspect containers (an inspect response
//! holds the env, and bollard logs responses at debug level), or touch containers and images of another
//! installation or node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, ContainerSummaryStateEnum, HostConfig,
    HostConfigLogConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, LogsOptionsBuilder,
    PushImageOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    StopContainerOptionsBuilder, TagImageOptionsBuilder,
};
use bytes::Bytes;
use cairn_schema::{Identity, Name};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{
    Driver, DriverError, DriverKind, Found, ImageId, Replica, ReplicaId, ReplicaState,
    ReplicaStatus, image_labels, label, replica_labels,
};
use crate::logs::{LineSplitter, LogLine, LogSink, LogStream};
use crate::spec::{ImageRef, ReplicaSpec, SpecError};

/// The name of the generated Dockerfile inside the build context.
pub const GENERATED_DOCKERFILE: &str = "Dockerfile.cairn";
/// Where a generated Dockerfile puts the source, and where its container starts.
pub const APP_DIR: &str = "/app";

/// How the Docker driver behaves on this node.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    pub installation: Name,
    pub node: Name,
    /// Pull a generated Dockerfile's base image when it is missing. Off by default: nodes without
    /// registry access fail fast with [`DriverError::BaseImageMissing`] instead of waiting on a pull.
    pub pull_base_images: bool,
    pub build_timeout: Duration,
    /// How long a container gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    pub pids_limit: i64,
    /// Run the engine's init (tini) as PID 1, so the app gets SIGTERM on stop (a process that is PID 1
    /// ignores it by default and would be killed only after `stop_grace`) and zombies are reaped. Needs
    /// `docker-init` on the host, as Docker's packages install it.
    pub init: bool,
    /// Give containers a read-only root filesystem (a tmpfs at `/tmp` stays writable).
    pub read_only_rootfs: bool,
    /// The bridge network containers run on, created if missing, whose traffic to link-local
    /// addresses (the cloud metadata service at 169.254.169.254 among them) is dropped
    /// ([`DockerDriver::ensure_network`]). `None`: Docker's default bridge, with no such rule.
    pub network: Option<String>,
}

impl DockerConfig {
    pub fn new(installation: Name, node: Name) -> Self {
        DockerConfig {
            installation,
            node,
            pull_base_images: false,
            build_timeout: Duration::from_secs(20 * 60),
            stop_grace: Duration::from_secs(10),
            pids_limit: 4096,
            init: true,
            read_only_rootfs: false,
            network: Some(DEFAULT_NETWORK.into()),
        }
    }
}

/// The network containers run on unless configured otherwise, and its bridge interface.
pub const DEFAULT_NETWORK: &str = "cairn";
/// Bridge interfaces of the agent's networks are `cairn-<8 hex>` (what the unit's rule matches).
pub const BRIDGE_PREFIX: &str = "cairn-";
/// Link-local addresses: the cloud metadata service (169.254.169.254) and its kin (ECS task
/// metadata at 169.254.170.2, link-local DNS) live here.
pub const LINK_LOCAL: &str = "169.254.0.0/16";

/// Builds and runs replicas with the local Docker engine.
#[derive(Debug)]
pub struct DockerDriver {
    docker: Docker,
    cfg: DockerConfig,
    builds: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    builds_run: AtomicU64,
    /// Containers this process stopped on purpose (so they report `Stopped`, not `Exited`).
    stopped: Mutex<HashSet<String>>,
    /// Whether [`DockerDriver::ensure_network`] succeeded once.
    network_ready: tokio::sync::Mutex<bool>,
}

impl DockerDriver {
    /// Connects to the engine ([`connect_engine`]).
    pub async fn connect(cfg: DockerConfig) -> Result<Self, DriverError> {
        Ok(DockerDriver::with_client(connect_engine().await?, cfg))
    }

    pub fn with_client(docker: Docker, cfg: DockerConfig) -> Self {
        DockerDriver {
            docker,
            cfg,
            builds: tokio::sync::Mutex::new(HashMap::new()),
            builds_run: AtomicU64::new(0),
            stopped: Mutex::new(HashSet::new()),
            network_ready: tokio::sync::Mutex::new(false),
        }
    }

    /// Makes sure the containers' network ([`DockerConfig::network`]) exists and that its bridge drops
    /// traffic to link-local addresses: a `raw` PREROUTING rule, so it holds for forwarded traffic
    /// (a cloud's metadata service) and for a listener on the host itself alike. Once per driver;
    /// the agent calls it at start, and every container create checks it succeeded.
    pub async fn ensure_network(&self) -> Result<(), DriverError> {
        let Some(name) = self.cfg.network.clone() else {
            return Ok(());
        };
        let mut ready = self.network_ready.lock().await;
        if *ready {
            return Ok(());
        }
        let bridge_option = "com.docker.network.bridge.name";
        let net_err = |reason: String| DriverError::Network {
            network: name.clone(),
            reason,
        };
        let inspected = match self.docker.inspect_network(&name, None).await {
            Ok(n) => Some(n),
            Err(e) if is_status(&e, 404) => None,
            Err(e) => return Err(DriverError::docker(format!("inspect network {name}"), e)),
        };
        let inspected = match inspected {
            Some(n) => n,
            None => {
                // Named per engine and network: two engines in one network namespace (a test's second
                // engine) never share an interface, and every one matches the unit's `cairn-+`. The
                // engine's id alone does not tell them apart (it derives from /etc/docker/key.json,
                // which engines on one host share): its data root does. A shared name let the second
                // engine readdress the first one's bridge, and every deploy's health check failed.
                let info = self
                    .docker
                    .info()
                    .await
                    .map_err(|e| DriverError::docker("read the engine's id", e))?;
                let engine = info.id.unwrap_or_default();
                let root = info.docker_root_dir.unwrap_or_default();
                let digest = <sha2::Sha256 as sha2::Digest>::digest(
                    format!("{engine}\0{root}\0{name}").as_bytes(),
                );
                let bridge = format!("{BRIDGE_PREFIX}{}", &hex::encode(digest)[..8]);
                let req = bollard::models::NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("bridge".into()),
                    options: Some(HashMap::from([(bridge_option.to_owned(), bridge)])),
                    labels: Some(HashMap::from([(
                        "cairn.network".to_owned(),
                        "1".to_owned(),
                    )])),
                    ..Default::default()
                };
                let created = self.docker.create_network(req).await;
                // Another agent (or driver) on this engine may have made it meanwhile: the engine
                // then answers 409, or 403 for the bridge name; what counts is that it exists now.
                match (created, self.docker.inspect_network(&name, None).await) {
                    (_, Ok(n)) => n,
                    (Err(e), Err(_)) => {
                        return Err(DriverError::docker(format!("create network {name}"), e));
                    }
                    (Ok(_), Err(e)) => {
                        return Err(DriverError::docker(format!("inspect network {name}"), e));
                    }
                }
            }
        };
        if inspected.driver.as_deref() != Some("bridge") {
            return Err(net_err(format!(
                "it uses the {:?} driver; a bridge network is needed",
                inspected.driver
            )));
        }
        let bridge = inspected
            .options
            .as_ref()
            .and_then(|o| o.get(bridge_option).cloned())
            .or_else(|| {
                inspected
                    .id
                    .as_ref()
                    .map(|id| format!("br-{}", &id[..id.len().min(12)]))
            })
            .ok_or_else(|| net_err("the engine names no bridge interface for it".into()))?;
        let rule = [
            "-t",
            "raw",
            "PREROUTING",
            "-i",
            &bridge,
            "-d",
            LINK_LOCAL,
            "-j",
            "DROP",
        ];
        let iptables = |op: &str| {
            let mut cmd = tokio::process::Command::new("iptables");
            cmd.arg("-w")
                .args(&rule[..2])
                .arg(op)
                .args(&rule[2..])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            cmd
        };
        if !rustix::process::geteuid().is_root() {
            // The shipped unit runs the agent unprivileged and installs the rule as root before it
            // starts (ExecStartPre=+); an unprivileged process can neither add nor list it.
            tracing::warn!(network = %name, %bridge, "not root: cannot check the rule dropping containers' traffic to {LINK_LOCAL}; expecting it from the service's ExecStartPre (dist/systemd/cairn-agent.service)");
            *ready = true;
            return Ok(());
        }
        let present = iptables("-C")
            .output()
            .await
            .is_ok_and(|o| o.status.success());
        if !present {
            let out = iptables("-I").output().await.map_err(|e| {
                net_err(format!(
                    "cannot run iptables to drop its traffic to {LINK_LOCAL}: {e}"
                ))
            })?;
            if !out.status.success() {
                return Err(net_err(format!(
                    "iptables could not add the rule dropping its traffic to {LINK_LOCAL}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            tracing::info!(network = %name, %bridge, "containers' traffic to link-local addresses is dropped");
        }
        *ready = true;
        Ok(())
    }

    pub fn client(&self) -> &Docker {
        &self.docker
    }

    pub fn config(&self) -> &DockerConfig {
        &self.cfg
    }

    /// How many image builds this driver started (for tests asserting that a release is built once).
    pub fn builds_run(&self) -> u64 {
        self.builds_run.load(Ordering::Relaxed)
    }

    /// The Dockerfile generated for a runtime without its own: the base image, the source in `/app` (one
    /// `COPY`), and the build commands in one `RUN` (each in its own `/bin/sh -c` in `/app`, stopping at
    /// the first that fails). Every step commits a layer (about a second each on a slow storage driver),
    /// so there are no others but the label step the build adds (all labels in one `LABEL`), and the
    /// start command and the working directory are set when the container is created. Commands are arguments of an exec-form `RUN`,
    /// JSON-quoted, so no command can add instructions of its own.
    pub fn generated_dockerfile(spec: &ReplicaSpec) -> Result<String, DriverError> {
        let base = spec
            .build
            .base_image
            .as_deref()
            .ok_or_else(|| DriverError::Unsupported {
                what: "docker",
                needs: "a base image (`image` in the runtime) or `dockerfile = true`".into(),
            })?;
        let q = |s: &str| serde_json::to_string(s).expect("strings serialize");
        let mut df = format!("FROM {base}\nCOPY . {APP_DIR}\n");
        if !spec.build.commands.is_empty() {
            let mut run = vec![
                q("/bin/sh"),
                q("-c"),
                q(&format!(
                    "cd {APP_DIR} || exit; for c in \"$@\"; do /bin/sh -c \"$c\" || exit; done"
                )),
                q("cairn-build"),
            ];
            run.extend(spec.build.commands.iter().map(|c| q(c)));
            df.push_str(&format!("RUN [{}]\n", run.join(", ")));
        }
        Ok(df)
    }

    /// The command and working directory of a container from a generated Dockerfile's image (`None` for
    /// the app's own Dockerfile, whose `CMD` and `WORKDIR` stand).
    fn generated_command(spec: &ReplicaSpec) -> Option<(Vec<String>, String)> {
        (!spec.build.dockerfile).then(|| {
            let start = spec.build.start.clone().unwrap_or_default();
            (
                vec!["/bin/sh".to_owned(), "-c".to_owned(), start],
                APP_DIR.to_owned(),
            )
        })
    }

    async fn image_matches(
        &self,
        reference: &str,
        spec: &ReplicaSpec,
    ) -> Result<Option<ImageId>, DriverError> {
        match self.docker.inspect_image(reference).await {
            Ok(img) => {
                let labels = img.config.and_then(|c| c.labels).unwrap_or_default();
                let want = image_labels(spec);
                let same = [
                    label::INSTALLATION,
                    label::APP,
                    label::SOURCE_COMMIT,
                    label::BUILD_KEY,
                ]
                .iter()
                .all(|k| labels.get(*k) == want.get(*k));
                Ok(same.then(|| img.id.map(ImageId)).flatten())
            }
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(DriverError::docker(format!("inspect image {reference}"), e)),
        }
    }

    async fn build_locked(
        &self,
        spec: &ReplicaSpec,
        context: &Path,
        log: &dyn LogSink,
    ) -> Result<ImageId, DriverError> {
        let tag = spec.image_tag();
        let labels = image_labels(spec);
        let step = label_step(&labels);
        // The Dockerfile the engine builds: ours (the generated one, or the app's own with the label
        // step after it) when the labels fit in one step, else the app's own as it is.
        let written = if spec.build.dockerfile {
            let path = context.join("Dockerfile");
            if !path.is_file() {
                return Err(DriverError::Build {
                    app: spec.app.clone(),
                    release: spec.release,
                    reason: "the runtime builds with the app's own Dockerfile, and the source has no `Dockerfile` at its root".into(),
                });
            }
            // Only a regular file is read here: a link is resolved by the engine, inside the context.
            let own = std::fs::symlink_metadata(&path)
                .is_ok_and(|m| m.is_file() && m.len() <= MAX_DOCKERFILE)
                .then(|| std::fs::read_to_string(&path).ok())
                .flatten();
            own.zip(step.as_deref())
                .and_then(|(own, step)| with_label_step(&own, step))
        } else {
            let base = spec.build.base_image.as_deref().unwrap_or_default();
            if !self.cfg.pull_base_images {
                match self.docker.inspect_image(base).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 404) => {
                        return Err(DriverError::BaseImageMissing {
                            image: base.to_owned(),
                        });
                    }
                    Err(e) => return Err(DriverError::docker(format!("inspect image {base}"), e)),
                }
            }
            let mut text = Self::generated_dockerfile(spec)?;
            text.push_str(step.as_deref().unwrap_or_default());
            Some(text)
        };
        let labels_in_step = written.is_some() && step.is_some();
        let dockerfile = match &written {
            Some(text) => write_hidden_dockerfile(context, text)?,
            None => "Dockerfile".to_owned(),
        };
        self.builds_run.fetch_add(1, Ordering::Relaxed);
        log.line(LogLine::new(
            LogStream::Agent,
            format!(
                "building {tag} from {} ({})",
                spec.source.commit,
                if spec.build.dockerfile {
                    "the app's Dockerfile"
                } else {
                    "a generated Dockerfile"
                }
            ),
        ));
        // The labels hold nothing a release changes without a new key, so every release of the key
        // runs the same image. In the Dockerfile they are one step; as build options the classic
        // builder makes a step of each (a container and a commit, about a second each on a slow
        // storage driver), so options only when the app's own Dockerfile cannot take the step.
        let option_labels: HashMap<String, String> = if labels_in_step {
            HashMap::new()
        } else {
            labels.into_iter().collect()
        };
        let opts = BuildImageOptionsBuilder::default()
            .dockerfile(&dockerfile)
            .t(&tag)
            .rm(true)
            .forcerm(true)
            .labels(&option_labels)
            .build();
        let started = std::time::Instant::now();
        let body = bollard::body_try_stream(tar_stream(context.to_owned()));
        let mut stream = self.docker.build_image(opts, None, Some(body));
        let mut splitter = LineSplitter::default();
        let mut image_id = None;
        let mut failure = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(s) = info.stream {
                        splitter.push(s.as_bytes(), |l| {
                            log.line(LogLine::new(LogStream::Build, l))
                        });
                    }
                    if let Some(s) = info.status {
                        log.line(LogLine::new(LogStream::Build, s));
                    }
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        failure = Some(e);
                    }
                    if let Some(id) = info.aux.and_then(|a| a.id) {
                        image_id = Some(id);
                    }
                }
                Err(BollardError::DockerStreamError { error }) => failure = Some(error),
                Err(e) => failure = Some(e.to_string()),
            }
        }
        splitter.finish(|l| log.line(LogLine::new(LogStream::Build, l)));
        if let Some(reason) = failure {
            log.line(LogLine::new(
                LogStream::Agent,
                format!("build failed: {reason}"),
            ));
            return Err(DriverError::Build {
                app: spec.app.clone(),
                release: spec.release,
                reason,
            });
        }
        let id = match image_id {
            Some(id) => id,
            None => self
                .docker
                .inspect_image(&tag)
                .await
                .map_err(|e| DriverError::docker(format!("inspect image {tag}"), e))?
                .id
                .unwrap_or_default(),
        };
        let took = started.elapsed();
        tracing::info!(app = %spec.app, release = spec.release, %tag, took_ms = took.as_millis() as u64, labels_in_step, "image built");
        log.line(LogLine::new(
            LogStream::Agent,
            format!("built {tag} as {id} in {:.1} s", took.as_secs_f64()),
        ));
        Ok(ImageId(id))
    }

    fn label_filters(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{}={}", label::INSTALLATION, self.cfg.installation),
                format!("{}={}", label::NODE, self.cfg.node),
            ],
        )])
    }

    async fn containers(
        &self,
        extra: Option<(&str, String)>,
    ) -> Result<Vec<ContainerSummary>, DriverError> {
        let mut filters = self.label_filters();
        if let Some((k, v)) = extra {
            filters.insert(k.to_owned(), vec![v]);
        }
        self.docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| DriverError::docker("list containers", e))
    }

    fn status_of(&self, c: &ContainerSummary) -> Option<ReplicaStatus> {
        let labels: BTreeMap<String, String> =
            c.labels.clone().unwrap_or_default().into_iter().collect();
        let id = c.id.clone()?;
        let port: Option<u16> = labels.get(label::PORT).and_then(|p| p.parse().ok());
        let addr = port.and_then(|p| published(c, p));
        let stopped = self
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id);
        let state = match c.state {
            Some(ContainerSummaryStateEnum::RUNNING) => ReplicaState::Running,
            Some(ContainerSummaryStateEnum::RESTARTING) => ReplicaState::Restarting,
            Some(ContainerSummaryStateEnum::CREATED) => ReplicaState::Created,
            Some(ContainerSummaryStateEnum::EXITED) if stopped => ReplicaState::Stopped,
            Some(ContainerSummaryStateEnum::EXITED) => ReplicaState::Exited {
                code: c.status.as_deref().and_then(exit_code),
            },
            other => ReplicaState::Other {
                what: other.map(|s| s.to_string()).unwrap_or_default(),
            },
        };
        let name = c
            .names
            .as_ref()
            .and_then(|n| n.first())
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default();
        ReplicaStatus::from_labels(
            id,
            name,
            c.image_id.clone().unwrap_or_default(),
            &labels,
            state,
            addr,
            0,
        )
    }
}

/// Every container (in any state, of any node) labelled with `installation` on this engine.
pub async fn installation_containers(
    docker: &Docker,
    installation: &Name,
) -> Result<Vec<ContainerSummary>, DriverError> {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{}={installation}", label::INSTALLATION)],
    )]);
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .map_err(|e| DriverError::docker("list containers", e))
}

/// Connects to the engine's unix socket (`DOCKER_HOST` when it names a `unix://` socket, else
/// `/var/run/docker.sock`), negotiates the API version (engines as old as API 1.41 work) and pings it.
pub async fn connect_engine() -> Result<Docker, DriverError> {
    let docker = match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => {
            Docker::connect_with_unix(&host, 120, bollard::API_DEFAULT_VERSION)
        }
        _ => Docker::connect_with_socket_defaults(),
    }
    .map_err(|e| DriverError::docker("connect", e))?
    .negotiate_version()
    .await
    .map_err(|e| DriverError::docker("negotiate the API version", e))?;
    docker
        .ping()
        .await
        .map_err(|e| DriverError::docker("ping", e))?;
    Ok(docker)
}

fn published(c: &ContainerSummary, port: u16) -> Option<SocketAddr> {
    c.ports.as_ref()?.iter().find_map(|p| {
        (p.private_port == port && p.ip.as_deref() == Some("127.0.0.1"))
            .then_some(p.public_port)
            .flatten()
            .map(|pp| SocketAddr::from((Ipv4Addr::LOCALHOST, pp)))
    })
}

/// The exit code in a status such as `Exited (3) 2 seconds ago`.
fn exit_code(status: &str) -> Option<i64> {
    let rest = status.strip_prefix("Exited (")?;
    rest.split(')').next()?.parse().ok()
}

fn is_status(e: &BollardError, code: u16) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// The longest Dockerfile of an app's own the agent reads to add its label step to.
const MAX_DOCKERFILE: u64 = 1 << 20;

/// Every image label in one `LABEL` instruction, or `None` if a key or value holds a character that
/// would need quoting (names and commit ids never do: they are validated before they get here).
fn label_step(labels: &BTreeMap<String, String>) -> Option<String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:/@".contains(&b))
    };
    labels.iter().all(|(k, v)| plain(k) && plain(v)).then(|| {
        let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("LABEL {}\n", pairs.join(" "))
    })
}

/// The app's own Dockerfile with `step` after its last instruction, or `None` when its last
/// instruction line ends in a line continuation (`\`, or `` ` `` under an `escape` directive): that
/// instruction would run on into the step.
fn with_label_step(own: &str, step: &str) -> Option<String> {
    let last = own
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'));
    if last.is_some_and(|l| l.ends_with('\\') || l.ends_with('`')) {
        return None;
    }
    let mut text = own.to_owned();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(step);
    Some(text)
}

/// Writes `text` into the build context under a name no file of the source has, and lists that name
/// in the context's `.dockerignore` (the source's own, with the name appended, or a new one listing
/// itself too), so the engine reads it as the Dockerfile and then drops it from the context: the
/// docker CLI's way with a Dockerfile from outside the context. A `COPY .` sees the source, not the
/// agent's Dockerfile. A `.dockerignore` that is not a regular file is left alone (the Dockerfile then
/// stays in the context). Returns the name.
fn write_hidden_dockerfile(context: &Path, text: &str) -> Result<String, DriverError> {
    let name = (0..)
        .map(|n| match n {
            0 => GENERATED_DOCKERFILE.to_owned(),
            n => format!("{GENERATED_DOCKERFILE}.{n}"),
        })
        .find(|n| std::fs::symlink_metadata(context.join(n)).is_err())
        .expect("some name is free");
    let path = context.join(&name);
    std::fs::write(&path, text).map_err(|e| DriverError::io("write", &path, e))?;
    let ignore = context.join(".dockerignore");
    let listed = match std::fs::symlink_metadata(&ignore) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(b".dockerignore\n".to_vec()),
        Ok(m) if m.is_file() => {
            let mut own =
                std::fs::read(&ignore).map_err(|e| DriverError::io("read", &ignore, e))?;
            if !own.is_empty() && !own.ends_with(b"\n") {
                own.push(b'\n');
            }
            Some(own)
        }
        _ => None,
    };
    if let Some(mut listed) = listed {
        listed.extend_from_slice(name.as_bytes());
        listed.push(b'\n');
        std::fs::write(&ignore, listed).map_err(|e| DriverError::io("write", &ignore, e))?;
    }
    Ok(name)
}

/// Streams `dir` as a tar (deterministic headers: no host uids, names or times), symlinks kept as links.
fn tar_stream(
    dir: std::path::PathBuf,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let result = (|| {
            let mut b = tar::Builder::new(&mut w);
            b.mode(tar::HeaderMode::Deterministic);
            b.follow_symlinks(false);
            b.append_dir_all(".", &dir)?;
            b.into_inner()?.flush()
        })();
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

const CHUNK: usize = 256 * 1024;

struct ChannelWriter {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the engine stopped reading the build context",
            )
        })
    }
}

#[async_trait]
impl Driver for DockerDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Docker
    }

    fn installation(&self) -> &Name {
        &self.cfg.installation
    }

    fn can_pull(&self) -> bool {
        true
    }

    async fn pull_image(
        &self,
        spec: &ReplicaSpec,
        log: &dyn LogSink,
    ) -> Result<ImageId, DriverError> {
        let image = spec
            .image
            .as_ref()
            .ok_or_else(|| DriverError::Unsupported {
                what: "pull",
                needs: "an image reference and digest in the task".into(),
            })?;
        let pinned = image.pinned();
        let opts = CreateImageOptionsBuilder::default()
            .from_image(&pinned)
            .build();
        let mut stream = self.docker.create_image(Some(opts), None, None);
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(status) = info.status {
                        log.line(LogLine::new(LogStream::Build, status));
                    }
                }
                Err(e) => {
                    return Err(DriverError::Pull {
                        reference: pinned,
                        reason: e.to_string(),
                    });
                }
            }
        }
        let inspected = self
            .docker
            .inspect_image(&pinned)
            .await
            .map_err(|e| DriverError::docker(format!("inspect image {pinned}"), e))?;
        let (repo, tag) = spec
            .image_tag()
            .rsplit_once(':')
            .map(|(r, t)| (r.to_owned(), t.to_owned()))
            .expect("tag has a colon");
        self.docker
            .tag_image(
                &pinned,
                Some(
                    TagImageOptionsBuilder::default()
                        .repo(&repo)
                        .tag(&tag)
                        .build(),
                ),
            )
            .await
            .map_err(|e| DriverError::docker(format!("tag {pinned}"), e))?;
        inspected.id.map(ImageId).ok_or_else(|| DriverError::Pull {
            reference: pinned,
            reason: "the engine reports no image id".into(),
        })
    }

    async fn push_image(
        &self,
        spec: &ReplicaSpec,
        image: &ImageId,
        repository: &str,
        log: &dyn LogSink,
    ) -> Result<ImageRef, DriverError> {
        let tag = spec.build_key();
        let reference = format!("{repository}:{tag}");
        let failed = |reason: String| DriverError::Push {
            reference: reference.clone(),
            reason,
        };
        self.docker
            .tag_image(
                &image.0,
                Some(
                    TagImageOptionsBuilder::default()
                        .repo(repository)
                        .tag(&tag)
                        .build(),
                ),
            )
            .await
            .map_err(|e| DriverError::docker(format!("tag {image} as {reference}"), e))?;
        let opts = PushImageOptionsBuilder::default().tag(&tag).build();
        // The engine wants an auth header even for an anonymous registry.
        let mut stream =
            self.docker
                .push_image(repository, Some(opts), Some(DockerCredentials::default()));
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        return Err(failed(e));
                    }
                    if let Some(status) = info.status {
                        log.line(LogLine::new(LogStream::Build, status));
                    }
                }
                Err(BollardError::DockerStreamError { error }) => return Err(failed(error)),
                Err(e) => return Err(failed(e.to_string())),
            }
        }
        let inspected = self
            .docker
            .inspect_image(&image.0)
            .await
            .map_err(|e| DriverError::docker(format!("inspect image {image}"), e))?;
        let prefix = format!("{repository}@");
        let digest = inspected
            .repo_digests
            .unwrap_or_default()
            .into_iter()
            .find_map(|d| d.strip_prefix(&prefix).map(str::to_owned))
            .ok_or_else(|| failed("the engine reports no digest for the pushed image".into()))?;
        log.line(LogLine::new(
            LogStream::Agent,
            format!("pushed {reference} as {repository}@{digest}"),
        ));
        Ok(ImageRef {
            reference: repository.to_owned(),
            digest,
        })
    }

    async fn find_image(&self, spec: &ReplicaSpec) -> Result<Option<Found>, DriverError> {
        // The registry image first: what the task names is what every node of the release runs, and
        // the release can record it by digest.
        if let Some(image) = &spec.image {
            match self.docker.inspect_image(&image.pinned()).await {
                Ok(img) => {
                    if let Some(id) = img.id {
                        return Ok(Some(Found {
                            id: ImageId(id),
                            registry: Some(image.clone()),
                        }));
                    }
                }
                Err(e) if is_status(&e, 404) => {}
                Err(e) => {
                    return Err(DriverError::docker(
                        format!("inspect image {}", image.pinned()),
                        e,
                    ));
                }
            }
        }
        Ok(self
            .image_matches(&spec.image_tag(), spec)
            .await?
            .map(Found::local))
    }

    async fn build_image(
        &self,
        spec: &ReplicaSpec,
        context: &Path,
        log: &dyn LogSink,
    ) -> Result<ImageId, DriverError> {
        spec.check_for(&self.cfg.installation)?;
        let tag = spec.image_tag();
        let lock = self
            .builds
            .lock()
            .await
            .entry(tag.clone())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        // Someone else may have built it while this one waited (another release of the key, too).
        if let Some(found) = self.image_matches(&tag, spec).await? {
            return Ok(found);
        }
        match tokio::time::timeout(
            self.cfg.build_timeout,
            self.build_locked(spec, context, log),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(DriverError::BuildTimeout {
                app: spec.app.clone(),
                release: spec.release,
                after: self.cfg.build_timeout,
            }),
        }
    }

    async fn start_replica(
        &self,
        spec: &ReplicaSpec,
        image: &ImageId,
        identity: &Identity,
    ) -> Result<Replica, DriverError> {
        spec.check_for(&self.cfg.installation)?;
        let name = spec.replica_name();
        let port = spec.build.port;
        let replica = |id: String, addr| Replica {
            id: ReplicaId(id),
            name: name.clone(),
            app: spec.app.clone(),
            release: spec.release,
            slot: spec.slot,
            addr,
        };
        // A task delivered twice: the replica may run already.
        for c in self
            .containers(Some(("name", format!("^/{name}$"))))
            .await?
        {
            let id = c.id.clone().unwrap_or_default();
            if c.state == Some(ContainerSummaryStateEnum::RUNNING)
                && c.image_id.as_deref() == Some(image.0.as_str())
                && let Some(addr) = published(&c, port)
            {
                return Ok(replica(id, addr));
            }
            self.remove_replica(&ReplicaId(id)).await?;
        }

        self.ensure_network().await?;
        let secrets = spec.open_secrets(identity)?;
        let mut env: Vec<String> = spec
            .env
            .iter()
            .filter(|(k, _)| k.as_str() != "PORT" && !secrets.contains(k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for (k, v) in secrets.iter().filter(|(k, _)| *k != "PORT") {
            let v = v.expose_str().map_err(|_| SpecError::SecretsShape)?;
            env.push(format!("{k}={v}"));
        }
        env.push(format!("PORT={port}"));

        let mut labels = replica_labels(spec, &self.cfg.node);
        labels.insert(label::PORT.into(), port.to_string());
        let port_key = format!("{port}/tcp");
        let memory = i64::try_from(spec.limits.memory_bytes).unwrap_or(i64::MAX);
        let host = HostConfig {
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some(i64::from(spec.limits.cpu_millis) * 1_000_000),
            pids_limit: Some(self.cfg.pids_limit),
            init: Some(self.cfg.init),
            port_bindings: Some(HashMap::from([(
                port_key.clone(),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(String::new()),
                }]),
            )])),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            privileged: Some(false),
            network_mode: Some(self.cfg.network.clone().unwrap_or_else(|| "bridge".into())),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            // A web app needs none of root's powers but binding a low port.
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(vec!["NET_BIND_SERVICE".into()]),
            readonly_rootfs: Some(self.cfg.read_only_rootfs),
            tmpfs: self.cfg.read_only_rootfs.then(|| {
                HashMap::from([("/tmp".to_owned(), "rw,nosuid,nodev,size=64m".to_owned())])
            }),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), "10m".to_owned()),
                    ("max-file".to_owned(), "3".to_owned()),
                ])),
            }),
            ..Default::default()
        };
        let (cmd, working_dir) = Self::generated_command(spec).unzip();
        let body = ContainerCreateBody {
            image: Some(image.0.clone()),
            cmd,
            working_dir,
            env: Some(env),
            labels: Some(labels.into_iter().collect()),
            exposed_ports: Some(vec![port_key]),
            stop_timeout: Some(self.cfg.stop_grace.as_secs() as i64),
            host_config: Some(host),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
            .map_err(|e| DriverError::DockerMessage {
                op: format!("create container {name}"),
                message: secrets.redact(&e.to_string()),
            })?;
        drop(secrets);
        let id = created.id;
        self.docker
            .start_container(
                &id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| DriverError::docker(format!("start container {name}"), e))?;
        // The engine assigns the host port on start; it shows in the container list right after.
        for _ in 0..50 {
            if let Some(c) = self.containers(Some(("id", id.clone()))).await?.first()
                && let Some(addr) = published(c, port)
            {
                return Ok(replica(id, addr));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(DriverError::NoAddress {
            id: ReplicaId(id),
            port,
        })
    }

    async fn stop_replica(&self, id: &ReplicaId) -> Result<(), DriverError> {
        // Only ever our own: the id must be one of this installation's and node's containers.
        if self
            .containers(Some(("id", id.0.clone())))
            .await?
            .is_empty()
        {
            return Ok(());
        }
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.0.clone());
        let t = i32::try_from(self.cfg.stop_grace.as_secs()).unwrap_or(i32::MAX);
        match self
            .docker
            .stop_container(
                &id.0,
                Some(StopContainerOptionsBuilder::default().t(t).build()),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 304) || is_status(&e, 404) => Ok(()),
            Err(e) => Err(DriverError::docker(format!("stop container {id}"), e)),
        }
    }

    async fn remove_replica(&self, id: &ReplicaId) -> Result<(), DriverError> {
        if self
            .containers(Some(("id", id.0.clone())))
            .await?
            .is_empty()
        {
            return Ok(());
        }
        self.stop_replica(id).await?;
        let result = self
            .docker
            .remove_container(
                &id.0,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await;
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id.0);
        match result {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            // 409: removal already in progress.
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(DriverError::docker(format!("remove container {id}"), e)),
        }
    }

    async fn list_replicas(&self) -> Result<Vec<ReplicaStatus>, DriverError> {
        Ok(self
            .containers(None)
            .await?
            .iter()
            .filter_map(|c| self.status_of(c))
            .collect())
    }

    async fn status(&self, id: &ReplicaId) -> Result<Option<ReplicaStatus>, DriverError> {
        Ok(self
            .containers(Some(("id", id.0.clone())))
            .await?
            .first()
            .and_then(|c| self.status_of(c)))
    }

    async fn logs(&self, id: &ReplicaId, tail: usize) -> Result<Vec<LogLine>, DriverError> {
        if self
            .containers(Some(("id", id.0.clone())))
            .await?
            .is_empty()
        {
            return Err(DriverError::NotFound(id.clone()));
        }
        let opts = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .tail(&tail.to_string())
            .build();
        let mut stream = self.docker.logs(&id.0, Some(opts));
        let (mut out, mut err) = (LineSplitter::default(), LineSplitter::default());
        let mut lines = Vec::new();
        while let Some(item) = stream.next().await {
            match item.map_err(|e| DriverError::docker(format!("read logs of {id}"), e))? {
                bollard::container::LogOutput::StdErr { message } => {
                    err.push(&message, |l| lines.push(stamped(LogStream::Stderr, l)))
                }
                bollard::container::LogOutput::StdOut { message }
                | bollard::container::LogOutput::Console { message } => {
                    out.push(&message, |l| lines.push(stamped(LogStream::Stdout, l)))
                }
                bollard::container::LogOutput::StdIn { .. } => {}
            }
        }
        out.finish(|l| lines.push(stamped(LogStream::Stdout, l)));
        err.finish(|l| lines.push(stamped(LogStream::Stderr, l)));
        lines.sort_by_key(|l| l.at);
        Ok(lines)
    }

    async fn prune_images(&self, keep: usize) -> Result<Vec<ImageId>, DriverError> {
        let installation = format!("{}={}", label::INSTALLATION, self.cfg.installation);
        let filters = HashMap::from([("label".to_owned(), vec![installation.clone()])]);
        let images = self
            .docker
            .list_images(Some(
                ListImagesOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| DriverError::docker("list images", e))?;
        // Every container of this installation on this engine, whichever node it is for.
        let used: HashSet<String> = installation_containers(&self.docker, &self.cfg.installation)
            .await?
            .into_iter()
            .filter_map(|c| c.image_id)
            .collect();
        // Per app, newest first (images of an older agent, tagged per release, are ordered the same way).
        let mut by_app: BTreeMap<&str, Vec<&bollard::models::ImageSummary>> = BTreeMap::new();
        for i in &images {
            if let Some(app) = i.labels.get(label::APP) {
                by_app.entry(app).or_default().push(i);
            }
        }
        let mut removed = Vec::new();
        for (app, mut list) in by_app {
            list.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
            for i in list.into_iter().skip(keep) {
                if used.contains(&i.id) {
                    continue;
                }
                // Forced: an image pushed to a registry carries a second tag. No container uses it
                // (above).
                let opts = RemoveImageOptionsBuilder::default().force(true).build();
                match self.docker.remove_image(&i.id, Some(opts), None).await {
                    Ok(_) => {
                        tracing::info!(%app, image = %i.id, "old image removed");
                        removed.push(ImageId(i.id.clone()));
                    }
                    // Gone meanwhile, or a container took it after all: leave it.
                    Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
                    Err(e) => {
                        return Err(DriverError::docker(format!("remove image {}", i.id), e));
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// A line from the engine with `timestamps` on: its RFC 3339 time, then a space, then the text. A line
/// without a readable time keeps all its text and gets the time it was read.
fn stamped(stream: LogStream, line: String) -> LogLine {
    if let Some((t, text)) = line.split_once(' ')
        && let Ok(at) = chrono::DateTime::parse_from_rfc3339(t)
    {
        return LogLine {
            stream,
            text: text.to_owned(),
            at: at.with_timezone(&chrono::Utc).into(),
        };
    }
    LogLine::new(stream, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_one_step_after_the_last_instruction_unless_it_runs_on() {
        let labels = BTreeMap::from([
            ("cairn.app".to_owned(), "web".to_owned()),
            ("cairn.build-key".to_owned(), "00ff".to_owned()),
        ]);
        let step = label_step(&labels).unwrap();
        assert_eq!(step, "LABEL cairn.app=web cairn.build-key=00ff\n");
        for odd in ["a b", "a\nRUN x", "$HOME", "\"q\"", ""] {
            let mut l = labels.clone();
            l.insert("cairn.app".into(), odd.into());
            assert_eq!(label_step(&l), None, "{odd:?} would need quoting");
        }
        let s = "LABEL k=v\n";
        assert_eq!(
            with_label_step("FROM x\nCMD [\"a\"]", s).unwrap(),
            "FROM x\nCMD [\"a\"]\nLABEL k=v\n"
        );
        assert_eq!(
            with_label_step("FROM x\r\nRUN a \\\r\n  b\r\n# done \\\r\n\r\n", s).unwrap(),
            "FROM x\r\nRUN a \\\r\n  b\r\n# done \\\r\n\r\nLABEL k=v\n",
            "a comment ending in a backslash continues nothing"
        );
        assert_eq!(with_label_step("FROM x\nRUN a \\", s), None);
        assert_eq!(with_label_step("FROM x\nRUN a \\  \n\n# c\n", s), None);
        assert_eq!(with_label_step("# escape=`\nFROM x\nRUN a `\n", s), None);
    }

    #[test]
    fn generated_dockerfile_quotes_every_command() {
        let spec: ReplicaSpec = serde_json::from_value(serde_json::json!({
            "installation": "t", "app": "web", "release": 1, "slot": 0, "config_commit": "c1",
            "source": {"url": "https://github.com/a/b.git", "commit": "0123456789abcdef0123456789abcdef01234567"},
            "build": {"base_image": "busybox:1", "commands": ["echo a\nRUN evil", "make \"x\""], "start": "httpd -f -p $PORT", "port": 8080},
            "limits": {"cpu_millis": 100, "memory_bytes": 67108864}
        }))
        .unwrap();
        let df = DockerDriver::generated_dockerfile(&spec).unwrap();
        assert_eq!(
            df,
            "FROM busybox:1\n\
             COPY . /app\n\
             RUN [\"/bin/sh\", \"-c\", \"cd /app || exit; for c in \\\"$@\\\"; do /bin/sh -c \\\"$c\\\" || exit; done\", \
             \"cairn-build\", \"echo a\\nRUN evil\", \"make \\\"x\\\"\"]\n"
        );
        // Two steps that commit a layer, whatever the number of commands; nothing of a release in it.
        assert_eq!(df.lines().count(), 3);
        assert!(!df.contains("LABEL") && !df.contains("CMD") && !df.contains("httpd"));
        assert_eq!(
            DockerDriver::generated_command(&spec),
            Some((
                vec!["/bin/sh".into(), "-c".into(), "httpd -f -p $PORT".into()],
                "/app".into()
            ))
        );
        let mut bare = spec.clone();
        bare.build.commands.clear();
        assert_eq!(
            DockerDriver::generated_dockerfile(&bare).unwrap(),
            "FROM busybox:1\nCOPY . /app\n"
        );
        let mut own = spec;
        own.build.dockerfile = true;
        assert_eq!(DockerDriver::generated_command(&own), None);
    }

    #[test]
    fn exit_codes_from_status() {
        assert_eq!(exit_code("Exited (3) 2 seconds ago"), Some(3));
        assert_eq!(exit_code("Up 2 seconds"), None);
    }
}
