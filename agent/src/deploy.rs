//! The health-gated replace: how a deploy task becomes the replica that serves a slot.
//!
//! 1. check the spec (isolation requests and malformed fields are refused before anything happens);
//! 2. get the image of the spec's build key (source commit and recipe): reuse it if this node has it
//!    (built for any release of the key), pull it by digest if the task names one, otherwise fetch the
//!    source at the commit and build it (build output goes to the caller's sink);
//! 3. start the new replica next to the old one;
//! 4. wait, bounded by the spec's attempts and timeout, for its HTTP health check to pass;
//! 5. switch the slot's route in the proxy to it (one atomic swap);
//! 6. drain the old replica (wait for its requests in flight, bounded) and remove it.
//!
//! A failure anywhere before step 5 removes what the deploy started and leaves the route as it was, so the
//! old replica keeps serving; the [`DeployFailure`] says at which [`Stage`] and why. Every stage is timed
//! ([`Timings`]), for the release's record and the commit status.
//!
//! Deploys of one slot run one at a time; an image is fetched and built once even when many slots (or
//! releases of one build key) deploy it at once. A task delivered twice finds its replica running and healthy and only makes sure it
//! is routed.
//!
//! What it must not do: route to a replica that has not passed its health check, stop the old replica
//! before the new one serves, or decrypt secrets (the driver does, right before it starts the replica).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_schema::{Identity, Name};
use serde::Serialize;

use crate::driver::{
    Driver, DriverError, ImageId, Replica, ReplicaId, ReplicaState, ReplicaStatus,
};
use crate::health::{self, HealthError};
use crate::logs::{LogLine, LogSink, LogStream};
use crate::proxy::{Backend, Proxy};
use crate::source::{Checkout, SourceError, Sources};
use crate::spec::{ImageRef, ReplicaSpec, SpecError};

/// The deployer's knobs.
#[derive(Debug, Clone)]
pub struct DeployerConfig {
    /// Build checkouts go under `<work_dir>/builds` and are removed after the build.
    pub work_dir: PathBuf,
    pub fetch_timeout: Duration,
    /// How long after a switch the old replica still gets requests that loaded the old table.
    pub drain_grace: Duration,
    /// The most a drain waits for requests in flight.
    pub drain_max: Duration,
    /// Lines of a failed replica's output kept with the failure.
    pub failure_log_lines: usize,
}

impl DeployerConfig {
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        DeployerConfig {
            work_dir: work_dir.into(),
            fetch_timeout: Duration::from_secs(10 * 60),
            drain_grace: Duration::from_millis(500),
            drain_max: Duration::from_secs(30),
            failure_log_lines: 50,
        }
    }
}

/// A deploy's stages, in order: the wire's vocabulary, which the control plane's release timings and
/// metrics name the same way.
pub use cairn_proto::DeployStage as Stage;

/// How long each stage took; `None` for a stage that did not run (a cached image is neither fetched nor
/// built).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Timings {
    pub fetch: Option<Duration>,
    pub build: Option<Duration>,
    pub pull: Option<Duration>,
    pub push: Option<Duration>,
    pub start: Option<Duration>,
    pub healthy: Option<Duration>,
    pub switch: Option<Duration>,
    pub drain: Option<Duration>,
    pub total: Duration,
}

impl Timings {
    /// Milliseconds per stage that ran, by the stage's name (what a task result reports).
    pub fn by_stage(&self) -> std::collections::BTreeMap<String, u64> {
        [
            (Stage::Fetch, self.fetch),
            (Stage::Build, self.build),
            (Stage::Pull, self.pull),
            (Stage::Push, self.push),
            (Stage::Start, self.start),
            (Stage::Healthy, self.healthy),
            (Stage::Switch, self.switch),
            (Stage::Drain, self.drain),
        ]
        .into_iter()
        .filter_map(|(stage, took)| {
            Some((
                stage.as_str().to_owned(),
                u64::try_from(took?.as_millis()).unwrap_or(u64::MAX),
            ))
        })
        .collect()
    }
}

/// Where the replica's image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// On this node already.
    Cached,
    Built,
    Pulled,
    /// The replica itself was running and healthy already (a task delivered twice).
    AlreadyRunning,
}

/// A deploy that switched the slot to its new replica.
#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    pub replica: Replica,
    pub image: ImageId,
    pub image_source: ImageSource,
    pub checkout: Option<Checkout>,
    /// The image in the registry, pinned by digest, when the task said to push it
    /// ([`ReplicaSpec::push_to`]): what the release records, and what other nodes' tasks carry as
    /// [`ReplicaSpec::image`].
    pub pushed: Option<ImageRef>,
    /// The registry image the replica runs, when it runs one: the one it pushed, or the one the task
    /// named and this node pulled or had (what the release records, by digest).
    pub registry: Option<ImageRef>,
    /// Old replicas of the slot that were drained and removed.
    pub replaced: Vec<ReplicaId>,
    /// Whether the old replicas' requests in flight all finished within the drain bound.
    pub drained: bool,
    /// Old replicas that could not be removed (the new one serves regardless); the next deploy or drift
    /// check retries.
    pub cleanup_errors: Vec<String>,
    pub timings: Timings,
}

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("the task was refused")]
    Refused(#[source] SpecError),
    #[error("the source could not be fetched")]
    Fetch(#[source] SourceError),
    #[error("the image could not be built")]
    Build(#[source] DriverError),
    #[error("the replica could not be started")]
    Start(#[source] DriverError),
    #[error("the new replica did not pass its health check")]
    Unhealthy {
        #[source]
        source: HealthError,
        /// The replica's last lines of output.
        logs: Vec<LogLine>,
    },
    #[error("the agent could not list its replicas")]
    Driver(#[source] DriverError),
    #[error("cannot prepare the build directory {path}")]
    Work {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A deploy that did not switch: nothing of it is routed, and what it started is removed.
#[derive(Debug, thiserror::Error)]
#[error(
    "deploy of {app} release {release} (slot {slot}) failed at the {stage} stage; the route was not changed"
)]
pub struct DeployFailure {
    pub app: Name,
    pub release: u64,
    pub slot: u32,
    pub stage: Stage,
    #[source]
    pub error: DeployError,
    pub timings: Timings,
}

impl DeployFailure {
    /// The whole cause chain on one line, for the release record and the commit status.
    pub fn reason(&self) -> String {
        cairn_schema::error::chain(self)
    }
}

/// The `Host` of health probes: the app's first hostname.
fn probe_host(spec: &ReplicaSpec) -> &str {
    spec.hostnames
        .first()
        .map_or(health::DEFAULT_HOST, |h| h.as_str())
}

/// The image a deploy runs, and how it got it.
struct Prepared {
    image: ImageId,
    source: ImageSource,
    checkout: Option<Checkout>,
    pushed: Option<ImageRef>,
    registry: Option<ImageRef>,
}

type Locks<K> = tokio::sync::Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>;

/// Runs deploy, stop and remove tasks against one driver and the node proxy.
#[derive(Debug)]
pub struct Deployer {
    driver: Arc<dyn Driver>,
    proxy: Arc<Proxy>,
    sources: Sources,
    identity: Arc<Identity>,
    cfg: DeployerConfig,
    slots: Locks<(Name, u32)>,
    images: Locks<(Name, String)>,
}

async fn lock_for<K: std::hash::Hash + Eq + Clone>(
    locks: &Locks<K>,
    key: &K,
) -> Arc<tokio::sync::Mutex<()>> {
    locks.lock().await.entry(key.clone()).or_default().clone()
}

impl Deployer {
    pub fn new(
        driver: Arc<dyn Driver>,
        proxy: Arc<Proxy>,
        sources: Sources,
        identity: Arc<Identity>,
        cfg: DeployerConfig,
    ) -> Self {
        Deployer {
            driver,
            proxy,
            sources,
            identity,
            cfg,
            slots: Default::default(),
            images: Default::default(),
        }
    }

    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Deploys `spec` into its slot with a health-gated replace. Build output goes to `log` as it happens.
    pub async fn deploy(
        &self,
        spec: &ReplicaSpec,
        log: &dyn LogSink,
    ) -> Result<DeployReport, DeployFailure> {
        let t0 = Instant::now();
        let mut timings = Timings::default();
        let failure = |stage, error, timings: &Timings| DeployFailure {
            app: spec.app.clone(),
            release: spec.release,
            slot: spec.slot,
            stage,
            error,
            timings: Timings {
                total: t0.elapsed(),
                ..timings.clone()
            },
        };
        spec.check_for(self.driver.installation())
            .map_err(|e| failure(Stage::Check, DeployError::Refused(e), &timings))?;
        let slot_lock = lock_for(&self.slots, &(spec.app.clone(), spec.slot)).await;
        let _slot = slot_lock.lock().await;
        tracing::info!(app = %spec.app, release = spec.release, slot = spec.slot, "deploy started");

        let before: Vec<ReplicaStatus> = self
            .driver
            .list_replicas()
            .await
            .map_err(|e| failure(Stage::Start, DeployError::Driver(e), &timings))?
            .into_iter()
            .filter(|r| r.app == spec.app && r.slot == spec.slot)
            .collect();

        // A task delivered twice: the replica runs and answers already; make sure it is routed.
        if let Some(cur) = before.iter().find(|r| {
            r.release == spec.release
                && r.source_commit == spec.source.commit
                && r.state == ReplicaState::Running
                && r.name == spec.replica_name()
        }) && let Some(addr) = cur.addr
            && health::passes(
                addr,
                probe_host(spec),
                &spec.health.path,
                Duration::from_millis(spec.health.timeout_ms),
            )
            .await
        {
            let replica = Replica {
                id: cur.id.clone(),
                name: cur.name.clone(),
                app: spec.app.clone(),
                release: spec.release,
                slot: spec.slot,
                addr,
            };
            let image = ImageId(cur.image.clone());
            let pushed = self.push(spec, &image, log, &mut timings).await;
            let prepared = Prepared {
                image,
                source: ImageSource::AlreadyRunning,
                checkout: None,
                registry: pushed.clone(),
                pushed,
            };
            return Ok(self
                .switch_and_drain(spec, replica, prepared, &before, timings, t0)
                .await);
        }

        // The image: once per build key, however many slots (and releases of the key) deploy it at once.
        let (image, image_source, checkout, mut registry) = {
            let image_lock = lock_for(&self.images, &(spec.app.clone(), spec.build_key())).await;
            let _image = image_lock.lock().await;
            match self.driver.find_image(spec).await {
                Ok(Some(found)) => (found.id, ImageSource::Cached, None, found.registry),
                Err(e) => return Err(failure(Stage::Build, DeployError::Build(e), &timings)),
                Ok(None) => {
                    let pulled = match &spec.image {
                        Some(image) if self.driver.can_pull() => {
                            let t = Instant::now();
                            let pulled = self.driver.pull_image(spec, log).await;
                            timings.pull = Some(t.elapsed());
                            // The registry unreachable or the image gone: the source still builds it.
                            pulled
                                .inspect_err(|e| {
                                    let why = cairn_schema::error::chain(e);
                                    tracing::warn!(app = %spec.app, release = spec.release, image = %image.pinned(), error = %why, "cannot pull the release's image; building it here");
                                    log.line(LogLine::new(
                                        LogStream::Agent,
                                        format!("cannot pull {}: {why}; building release {} here instead", image.pinned(), spec.release),
                                    ));
                                })
                                .ok()
                        }
                        _ => None,
                    };
                    match pulled {
                        Some(id) => (id, ImageSource::Pulled, None, spec.image.clone()),
                        None => {
                            let (id, checkout) = self
                                .fetch_and_build(spec, log, &mut timings)
                                .await
                                .map_err(|(stage, e)| failure(stage, e, &timings))?;
                            (id, ImageSource::Built, Some(checkout), None)
                        }
                    }
                }
            }
        };

        let pushed = if registry.is_some() {
            None
        } else {
            self.push(spec, &image, log, &mut timings).await
        };
        if pushed.is_some() {
            registry = pushed.clone();
        }
        tracing::info!(app = %spec.app, release = spec.release, image = %image, source = ?image_source, "image ready");
        let t = Instant::now();
        let started = self
            .driver
            .start_replica(spec, &image, &self.identity)
            .await;
        timings.start = Some(t.elapsed());
        let replica =
            started.map_err(|e| failure(Stage::Start, DeployError::Start(e), &timings))?;

        let t = Instant::now();
        let healthy = self
            .driver
            .wait_healthy(&replica, probe_host(spec), &spec.health)
            .await;
        timings.healthy = Some(t.elapsed());
        if let Err(source) = healthy {
            let logs = self
                .driver
                .logs(&replica.id, self.cfg.failure_log_lines)
                .await
                .unwrap_or_default();
            if let Err(e) = self.driver.remove_replica(&replica.id).await {
                tracing::warn!(replica = %replica.name, error = %e, "cannot remove an unhealthy replica");
            }
            tracing::warn!(app = %spec.app, release = spec.release, replica = %replica.name, error = %source, "new replica unhealthy; the route is unchanged");
            log.line(LogLine::new(
                LogStream::Agent,
                format!(
                    "release {} of {} failed its health check: {source}",
                    spec.release, spec.app
                ),
            ));
            return Err(failure(
                Stage::Healthy,
                DeployError::Unhealthy { source, logs },
                &timings,
            ));
        }

        let prepared = Prepared {
            image,
            source: image_source,
            checkout,
            pushed,
            registry,
        };
        Ok(self
            .switch_and_drain(spec, replica, prepared, &before, timings, t0)
            .await)
    }

    /// Told to push (the first node to deploy the release), puts the image this node has (built or its
    /// own copy) in the registry and reports it at once ([`LogSink::image_pushed`]), so the other nodes
    /// pull it while this one starts its replica. Best effort: a push that fails is said in the build
    /// output and the deploy goes on; the other nodes then get the image themselves.
    async fn push(
        &self,
        spec: &ReplicaSpec,
        image: &ImageId,
        log: &dyn LogSink,
        timings: &mut Timings,
    ) -> Option<ImageRef> {
        let registry = spec.push_to.as_ref()?;
        if spec.image.is_some() || !self.driver.can_pull() {
            return None;
        }
        let t = Instant::now();
        let repository = registry.repository(&spec.app);
        let pushed = self.driver.push_image(spec, image, &repository, log).await;
        timings.push = Some(t.elapsed());
        match pushed {
            Ok(pushed) => {
                log.image_pushed(&cairn_proto::DeployedImage {
                    id: image.0.clone(),
                    registry: Some((pushed.reference.clone(), pushed.digest.clone())),
                });
                Some(pushed)
            }
            Err(e) => {
                let why = cairn_schema::error::chain(&e);
                tracing::warn!(app = %spec.app, release = spec.release, %repository, error = %why, "cannot push the release's image; other nodes get it themselves");
                log.line(LogLine::new(
                    LogStream::Agent,
                    format!("cannot push release {} to {repository}: {why}; other nodes build it themselves", spec.release),
                ));
                None
            }
        }
    }

    async fn fetch_and_build(
        &self,
        spec: &ReplicaSpec,
        log: &dyn LogSink,
        timings: &mut Timings,
    ) -> Result<(ImageId, Checkout), (Stage, DeployError)> {
        let builds = self.cfg.work_dir.join("builds");
        std::fs::create_dir_all(&builds).map_err(|source| {
            (
                Stage::Fetch,
                DeployError::Work {
                    path: builds.clone(),
                    source,
                },
            )
        })?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", spec.replica_name()))
            .tempdir_in(&builds)
            .map_err(|source| {
                (
                    Stage::Fetch,
                    DeployError::Work {
                        path: builds.clone(),
                        source,
                    },
                )
            })?;
        let context = dir.path().join("src");
        let t = Instant::now();
        log.line(LogLine::new(
            LogStream::Agent,
            format!("fetching {} at {}", spec.source.url, spec.source.commit),
        ));
        let checkout = self
            .sources
            .checkout(&spec.source, &context, self.cfg.fetch_timeout)
            .await;
        timings.fetch = Some(t.elapsed());
        let checkout = checkout.map_err(|e| (Stage::Fetch, DeployError::Fetch(e)))?;
        let t = Instant::now();
        let built = self.driver.build_image(spec, &context, log).await;
        timings.build = Some(t.elapsed());
        let id = built.map_err(|e| (Stage::Build, DeployError::Build(e)))?;
        Ok((id, checkout))
    }

    async fn switch_and_drain(
        &self,
        spec: &ReplicaSpec,
        replica: Replica,
        prepared: Prepared,
        before: &[ReplicaStatus],
        mut timings: Timings,
        t0: Instant,
    ) -> DeployReport {
        let t = Instant::now();
        let hostnames: Vec<String> = spec.hostnames.iter().map(|h| h.to_string()).collect();
        let backend = Backend::new(replica.id.clone(), spec.release, spec.slot, replica.addr);
        let unrouted = self.proxy.switch_slot(&spec.app, &hostnames, backend);
        timings.switch = Some(t.elapsed());
        tracing::info!(app = %spec.app, release = spec.release, slot = spec.slot, replica = %replica.name, addr = %replica.addr, "switched");

        let t = Instant::now();
        let olds: Vec<&ReplicaStatus> = before.iter().filter(|r| r.id != replica.id).collect();
        let drained = if unrouted.is_empty() {
            true
        } else {
            self.proxy
                .drain(&unrouted, self.cfg.drain_grace, self.cfg.drain_max)
                .await
        };
        let mut cleanup_errors = Vec::new();
        for old in &olds {
            if let Err(e) = self.driver.remove_replica(&old.id).await {
                cleanup_errors.push(format!("{}: {e}", old.name));
            }
        }
        timings.drain = Some(t.elapsed());
        timings.total = t0.elapsed();
        tracing::info!(app = %spec.app, release = spec.release, slot = spec.slot, replaced = olds.len(), drained, ?timings, "deploy done");
        DeployReport {
            replica,
            image: prepared.image,
            image_source: prepared.source,
            checkout: prepared.checkout,
            pushed: prepared.pushed,
            registry: prepared.registry,
            replaced: olds.iter().map(|r| r.id.clone()).collect(),
            drained,
            cleanup_errors,
            timings,
        }
    }

    /// Takes a slot's replicas out of the proxy, drains them and stops them (a `stop` task, for a
    /// suspended app). Returns the replicas stopped.
    pub async fn stop_slot(&self, app: &Name, slot: u32) -> Result<Vec<ReplicaId>, DriverError> {
        self.retire_slot(app, slot, false).await
    }

    /// As [`Deployer::stop_slot`], and deletes them (a `remove` task).
    pub async fn remove_slot(&self, app: &Name, slot: u32) -> Result<Vec<ReplicaId>, DriverError> {
        self.retire_slot(app, slot, true).await
    }

    async fn retire_slot(
        &self,
        app: &Name,
        slot: u32,
        remove: bool,
    ) -> Result<Vec<ReplicaId>, DriverError> {
        let slot_lock = lock_for(&self.slots, &(app.clone(), slot)).await;
        let _slot = slot_lock.lock().await;
        let mine: Vec<ReplicaStatus> = self
            .driver
            .list_replicas()
            .await?
            .into_iter()
            .filter(|r| &r.app == app && r.slot == slot)
            .collect();
        let unrouted: Vec<Arc<Backend>> = mine
            .iter()
            .filter_map(|r| self.proxy.remove_replica(app, &r.id))
            .collect();
        if !unrouted.is_empty() {
            self.proxy
                .drain(&unrouted, self.cfg.drain_grace, self.cfg.drain_max)
                .await;
        }
        for r in &mine {
            if remove {
                self.driver.remove_replica(&r.id).await?;
            } else {
                self.driver.stop_replica(&r.id).await?;
            }
        }
        // The last replica of an app removed from this node: its hostnames are no longer this node's
        // (404, as for any unknown host), where a stopped app's still are (503 until it starts again).
        if remove
            && !self
                .driver
                .list_replicas()
                .await?
                .iter()
                .any(|r| &r.app == app)
        {
            self.proxy.remove_app(app);
        }
        Ok(mine.into_iter().map(|r| r.id).collect())
    }

    /// Routes the replicas that run and answer on this node (after an agent restart the proxy starts
    /// empty). A replica is routed only if one probe of its health path passes. Returns how many.
    pub async fn restore_routes(&self) -> Result<usize, DriverError> {
        let mut n = 0;
        for r in self.driver.list_replicas().await? {
            let (ReplicaState::Running, Some(addr)) = (&r.state, r.addr) else {
                continue;
            };
            let path = r.health_path.as_deref().unwrap_or("/");
            let host = r
                .hostnames
                .first()
                .map_or(health::DEFAULT_HOST, String::as_str);
            if health::passes(addr, host, path, Duration::from_secs(2)).await {
                let backend = Backend::new(r.id.clone(), r.release, r.slot, addr);
                self.proxy.switch_slot(&r.app, &r.hostnames, backend);
                n += 1;
            }
        }
        Ok(n)
    }
}
