//! The reconcile loop: what `cairn serve`, `cairn plan` and `cairn apply` share. A trigger (timer, file
//! change, webhook, node going offline, an operator) only wakes it; every run re-reads the whole desired
//! state (through the source's caches) and the whole observed state, plans, and applies.
//!
//! What it must not do: carry a change from a trigger into the plan, apply a config commit older than the
//! applied one, or leave a failed run unrecorded. Nor die with one commit: a panic while a commit is
//! validated, planned or applied is caught (around the synchronous parse and validation, around the
//! apply, and around the whole run as the loop spawns it), the commit is recorded as failed with the
//! panic's message, nothing of it is applied (the apply's transaction rolls back), and the loop goes on,
//! so the previous state keeps running and the next good commit applies.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;

use cairn_schema::error::chain as error_chain;
use cairn_schema::source::{RewriteError, Rewrites};
use cairn_schema::{Desired, Diagnostic, Identity};
use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::{Mutex, Notify};
use tracing::Instrument as _;

use crate::executor::{self, Applied, ApplyError, Context};
use crate::metrics::ReconcileResult;
use crate::panics::{PANIC_REASON, inject_panic, panic_message};
use crate::source::Snapshot;
use crate::source::heads::HeadPoller;
use crate::store::{ReconcileStatus, RecordedError, StoreError, state};
use crate::worker::{Pass, Shutdown, Woken, Worker};
use cairn_plan::observed::{CommitId, Fingerprints};
use cairn_plan::{DesiredAt, Plan, PlanInput};

/// The controller reads from a [`ConfigSource`] (`source/config.rs`).
pub use crate::source::{ConfigSource, ReadError};

/// One reconcile's result.
#[derive(Debug)]
pub enum Outcome {
    Applied(Box<Applied>),
    /// The commit is invalid: recorded as failed with its errors; nothing else changed.
    Invalid {
        commit: Option<String>,
        errors: Vec<Diagnostic>,
    },
    /// The source's commit is older than the applied one; nothing was done.
    Behind {
        commit: String,
        applied: String,
    },
    /// Nothing the planner reads changed since the last reconcile planned nothing (same commit and
    /// referenced files, no change mark, same generation, every node judged as then): not planned,
    /// nothing recorded.
    Unchanged {
        commit: String,
    },
}

/// What the last reconcile that planned nothing saw. While all of it still holds, a plan would again be
/// empty, so the next reconcile skips reading the observed state and planning ([`Outcome::Unchanged`]).
#[derive(Debug, Clone)]
struct Idle {
    commit: Option<String>,
    referenced: std::collections::BTreeMap<String, Arc<[u8]>>,
    generation: u64,
    offline_after: Duration,
    liveness: cairn_plan::observed::Liveness,
}

pub use crate::store::history::Trigger;

/// Which app branch heads the controller reads itself (with a [`Controller::heads`] poller).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HeadPolling {
    /// Every followed branch on startup, timer and manual runs (webhooks record pushes sooner), and the
    /// heads without a usable record on every other run, as [`HeadPolling::Unknown`] does.
    #[default]
    All,
    /// Only the heads without a usable record (never read, or read from another branch than the app
    /// follows now), on every run: a new app or a changed branch deploys at once, and pushes to known
    /// branches are left to webhooks (`cairn serve --no-poll-heads`).
    Unknown,
}

/// Where the desired state is and how the controller follows it: what `--repo`, `--ref`, `--cache-dir`,
/// `--git-rewrite`, `--refuse-private-sources`, `--no-poll-heads` and `--seed` say.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// A directory, or a git URL.
    pub repo: String,
    /// The branch (or full ref) of a git repository.
    pub git_ref: String,
    /// Where git caches live.
    pub cache_root: PathBuf,
    /// App sources and the config repository are fetched through these.
    pub rewrites: Rewrites,
    pub refuse_private_sources: bool,
    pub head_polling: HeadPolling,
    /// The scheduler's tie-breaks.
    pub seed: u64,
}

impl SourceSettings {
    /// The URL the config repository is fetched from: `repo` through the rewrites (a mirror, GitHub
    /// Enterprise, a local remote in tests); it keeps its own URL for webhooks and statuses.
    pub fn fetch_url(&self) -> Result<String, RewriteError> {
        Ok(self
            .rewrites
            .apply(&self.repo)?
            .unwrap_or_else(|| self.repo.clone()))
    }

    /// Whether the config repository is a git remote rather than a directory.
    pub fn is_git(&self) -> bool {
        !std::path::Path::new(&self.repo).is_dir()
    }
}

/// Everything a reconcile needs besides the database.
#[derive(Debug)]
pub struct Controller {
    pub pool: PgPool,
    pub source: Mutex<ConfigSource>,
    pub identity: Option<Identity>,
    pub seed: u64,
    pub offline_after: Duration,
    /// Fingerprints by (ciphertext sha256): decrypting every secret on every run would be wasted work.
    cache: Mutex<std::collections::HashMap<String, String>>,
    /// Reads app branch heads as [`Controller::head_polling`] says; `None` leaves every head to webhooks
    /// (and `cairn deploy`).
    pub heads: Option<Mutex<HeadPoller>>,
    /// Which heads `heads` reads, and when.
    pub head_polling: HeadPolling,
    /// Told when a commit's reconcile starts, is applied or fails (commit statuses, in `cairn serve`).
    pub hooks: Option<Arc<dyn crate::hooks::Hooks>>,
    /// In `cairn serve`: whether the liveness monitor judges silence now; while it does not (after a
    /// start or a database outage), plans treat a node its state calls online as online whatever the
    /// age of its last heartbeat. `None` (the CLI): the heartbeat's age always counts.
    pub judging: Option<crate::liveness::Judging>,
    /// Failed and no-op runs older than this leave the history ([`Controller::run`] prunes them every
    /// [`PRUNE_EVERY`]); `cairn serve` passes its `--log-retention`.
    pub history_retention: Duration,
    /// In `cairn serve`: the cluster route table, poked after every pass (an apply, or a node that went
    /// offline, may change where apps are reachable).
    pub routes: Option<crate::routes::Routes>,
    /// In `cairn serve`: where the applied `[tls]` goes after each apply (the certificate loop).
    pub certs: Option<CertsHook>,
    /// In `cairn serve`: records where each applied commit declares its apps and nodes (the
    /// dashboard's link to the file and line).
    pub declared: Option<crate::declared::Declarations>,
    /// What the last empty plan saw (`None` after anything else): see [`Outcome::Unchanged`].
    idle: std::sync::Mutex<Option<Idle>>,
    /// Plans made by reconciles (not by [`Controller::plan`]): what an idle tick must not add to.
    plans: std::sync::atomic::AtomicU64,
    /// In `cairn serve`: the leader's term its reconciles apply in ([`Controller::set_fence`]); each
    /// apply transaction checks it still holds the lease with it.
    fence: std::sync::Mutex<Option<crate::store::lease::Fence>>,
    /// Kept between reconciles: a reconcile plans again only the apps whose inputs changed.
    planner: std::sync::Mutex<cairn_plan::Planner>,
    /// The applied state as the last apply read it (`store::state::KeptObserved`).
    observed: state::KeptObserved,
}

/// What the controller tells the certificate loop after an apply: the name sets to keep certificates
/// for (stored), and the settings of the applied `[tls]`.
#[derive(Debug)]
pub struct CertsHook {
    pub settings: tokio::sync::watch::Sender<Option<crate::certs::CertSettings>>,
    pub overrides: crate::certs::ProbeOverrides,
    pub wake: Arc<Notify>,
    /// What the settings last sent were made of, to send only a change.
    pub last: std::sync::Mutex<Option<CertSettingsKey>>,
}

/// What makes the certificate loop's settings differ: the directory, the contact, the roots, the
/// challenge type.
pub type CertSettingsKey = (
    String,
    Option<String>,
    Option<String>,
    cairn_schema::Challenge,
);

/// The applied apps' own certificates (`tls = { cert, key }`): the chain from the repository, the key
/// as the manifest's ciphertext (which the control plane's identity opens, as validation checked), the
/// names the leaf covers. One that cannot be read is logged and left out.
fn own_certificates(
    desired: &cairn_schema::Desired,
    snap: &crate::source::Snapshot,
) -> Vec<crate::routes::HeldCertificate> {
    let mut out = Vec::new();
    for app in desired.apps.keys() {
        let Some(cairn_schema::model::AppTls::Own(own)) = desired.tls(app) else {
            continue;
        };
        let Some(chain) = snap.referenced.get(own.cert.as_str()) else {
            tracing::warn!(%app, cert = own.cert.as_str(), "an app's own certificate file was not read; not served");
            continue;
        };
        let chain = String::from_utf8_lossy(chain).into_owned();
        match crate::certs::leaf_info(&chain) {
            Ok(leaf) => out.push(crate::routes::HeldCertificate {
                id: format!("own-{app}"),
                names: leaf.names,
                chain_pem: chain,
                key: own.key.secret.clone(),
            }),
            Err(e) => {
                tracing::warn!(%app, error = %error_chain(&e), "an app's own certificate cannot be read; not served")
            }
        }
    }
    out
}

/// How often [`Controller::run`] prunes the history.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// A failed run: the error, already recorded in the history when it could be.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Secrets(String),
    /// Planning or applying panicked; the apply's transaction rolled back and the run is recorded as failed.
    #[error("{PANIC_REASON}: {0}")]
    Panicked(String),
}

impl Controller {
    pub fn new(pool: PgPool, source: ConfigSource, identity: Option<Identity>) -> Self {
        Controller {
            pool,
            source: Mutex::new(source),
            identity,
            seed: 0,
            offline_after: cairn_plan::DEFAULT_OFFLINE_AFTER,
            cache: Mutex::new(Default::default()),
            heads: None,
            head_polling: HeadPolling::All,
            hooks: None,
            judging: None,
            history_retention: Duration::from_secs(14 * 24 * 3600),
            routes: None,
            certs: None,
            declared: None,
            idle: std::sync::Mutex::new(None),
            plans: std::sync::atomic::AtomicU64::new(0),
            fence: std::sync::Mutex::new(None),
            planner: std::sync::Mutex::new(cairn_plan::Planner::new()),
            observed: state::KeptObserved::new(),
        }
    }

    /// The applied state the last apply read, kept for the next one (`store::state::KeptObserved`), and
    /// how its reads went.
    pub fn kept_observed(&self) -> &state::KeptObserved {
        &self.observed
    }

    /// How this controller's last plan went: how many apps it planned, and whether it compared only
    /// the apps the source and the change marks named ([`cairn_plan::Reuse`]).
    pub fn planner_reuse(&self) -> cairn_plan::Reuse {
        self.planner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reuse()
    }

    /// How many plans this controller's reconciles made (an unchanged reconcile makes none).
    pub fn plans_made(&self) -> u64 {
        self.plans.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A controller of the source `settings` name, reading app branch heads as they say (through the same
    /// rewrites).
    pub fn open(
        pool: PgPool,
        settings: &SourceSettings,
        identity: Option<Identity>,
    ) -> Result<Self, RewriteError> {
        let fetch_url = settings.fetch_url()?;
        let source = ConfigSource::open(&fetch_url, &settings.git_ref, &settings.cache_root);
        let mut c = Controller::new(pool, source, identity);
        c.seed = settings.seed;
        c.heads = Some(Mutex::new(
            HeadPoller::new(
                settings.cache_root.join("heads.git"),
                settings.rewrites.clone(),
            )
            .refuse_private(settings.refuse_private_sources),
        ));
        c.head_polling = settings.head_polling;
        Ok(c)
    }

    /// Reads the source (blocking IO runs off the async workers).
    pub async fn read(&self) -> Result<(String, Arc<Snapshot>), ReadError> {
        let mut source = self.source.lock().await;
        let label = source.label();
        let snap = tokio::task::block_in_place(|| source.read())?;
        Ok((label, snap))
    }

    /// Fingerprints of the desired secrets, or `None` without an identity.
    pub async fn fingerprints(
        &self,
        desired: &Desired,
    ) -> Result<Option<Fingerprints>, RecordedError> {
        let Some(id) = &self.identity else {
            return Ok(None);
        };
        let mut cache = self.cache.lock().await;
        let mut out = Fingerprints::new();
        for (app, a) in &desired.apps {
            for (key, v) in &a.env {
                let cairn_schema::EnvValue::Secret { secret } = v else {
                    continue;
                };
                let k = cairn_plan::observed::ciphertext_sha256(secret);
                let print = match cache.get(&k) {
                    Some(fp) => fp.clone(),
                    None => {
                        let plain = id.decrypt(secret).map_err(|e| RecordedError {
                            path: desired.origins.get(&(cairn_schema::Kind::App, app.clone())).map(|o| o.path.clone()),
                            line: None,
                            col: None,
                            message: format!("secret `{key}` of app `{app}` does not decrypt with the control plane's identity: {e}"),
                        })?;
                        let fp = id.fingerprint(&plain);
                        cache.insert(k, fp.clone());
                        fp
                    }
                };
                out.insert((app.clone(), key.clone()), print);
            }
        }
        Ok(Some(out))
    }

    /// Asks the followed branches `which` names for their heads and records those that moved. Remotes
    /// that cannot be asked are logged; their apps keep the head recorded last (or wait for one), and a
    /// head still unknown is asked for again on the next run.
    pub async fn poll_heads(
        &self,
        desired: &Desired,
        which: HeadPolling,
    ) -> Result<usize, StoreError> {
        let Some(poller) = &self.heads else {
            return Ok(0);
        };
        let known = match which {
            HeadPolling::All => None,
            HeadPolling::Unknown => Some(state::source_head_branches(&self.pool).await?),
        };
        let wanted = |name: &cairn_schema::Name, app: &cairn_schema::App| {
            known
                .as_ref()
                .is_none_or(|k| k.get(name) != Some(&app.source.branch))
        };
        let mut poller = poller.lock().await;
        let (heads, errors) = tokio::task::block_in_place(|| poller.poll(desired, wanted));
        drop(poller);
        for e in &errors {
            tracing::warn!(error = %error_chain(e), "cannot read a source head");
        }
        // One statement for every head: a timer tick of 100,000 apps is not 100,000 round trips.
        let heads: Vec<_> = heads
            .into_iter()
            .map(|h| (h.app, h.branch, CommitId::new(h.commit)))
            .collect();
        let moved = state::record_source_heads(&self.pool, &heads).await?;
        Ok(usize::try_from(moved).unwrap_or(usize::MAX))
    }

    /// Plans the source's newest state against the database without applying (no lock taken).
    pub async fn plan(&self) -> Result<(Arc<Snapshot>, Option<Plan>), ReconcileError> {
        let (_, snap) = self.read().await?;
        let Some(desired) = &snap.loaded.desired else {
            return Ok((snap, None));
        };
        let fingerprints = self
            .fingerprints(desired)
            .await
            .map_err(|e| ReconcileError::Secrets(e.to_string()))?;
        let observed = state::load_observed(&self.pool).await?;
        let commit = CommitId::new(snap.commit.clone().unwrap_or_default());
        let plan = cairn_plan::plan(&PlanInput {
            desired: Some(DesiredAt {
                commit: &commit,
                state: desired,
            }),
            fingerprints: fingerprints.as_ref(),
            observed: &observed,
            seed: self.seed,
            now: Utc::now(),
            offline_after: self.planning_offline_after(),
        });
        Ok((snap, Some(plan)))
    }

    /// The threshold plans judge heartbeats by: none while the liveness monitor does not judge silence.
    fn planning_offline_after(&self) -> Duration {
        match &self.judging {
            Some(j) if !j.now() => Duration::MAX,
            _ => self.offline_after,
        }
    }

    /// One full reconcile: read, validate, plan and apply; failures are recorded.
    pub async fn reconcile(&self, trigger: Trigger) -> Result<Outcome, ReconcileError> {
        self.reconcile_expecting(trigger, None).await
    }

    /// As [`Controller::reconcile`], refusing to apply unless the plan is based on `generation` (what an
    /// operator was shown). Runs in a `reconcile` span (trigger, commit), logs how it ended, and counts
    /// it in [`crate::metrics`].
    pub async fn reconcile_expecting(
        &self,
        trigger: Trigger,
        generation: Option<u64>,
    ) -> Result<Outcome, ReconcileError> {
        let span = tracing::info_span!(
            "reconcile",
            trigger = trigger.as_str(),
            commit = tracing::field::Empty
        );
        let started = std::time::Instant::now();
        let result = self
            .reconcile_once(trigger, generation)
            .instrument(span.clone())
            .await;
        let metrics = crate::metrics::global();
        let _in = span.enter();
        let ended = match &result {
            Ok(outcome) => {
                log_outcome(outcome);
                match outcome {
                    Outcome::Applied(a) if a.status == ReconcileStatus::Noop => {
                        ReconcileResult::Noop
                    }
                    Outcome::Applied(a) => {
                        metrics.plan_applied(&a.plan);
                        ReconcileResult::Applied
                    }
                    Outcome::Invalid { .. } => ReconcileResult::Invalid,
                    Outcome::Behind { .. } => ReconcileResult::Behind,
                    Outcome::Unchanged { .. } => ReconcileResult::Unchanged,
                }
            }
            Err(e) => {
                tracing::error!(error = %error_chain(e), "reconcile failed");
                ReconcileResult::Error
            }
        };
        metrics.reconciled(ended, started.elapsed());
        result
    }

    async fn reconcile_once(
        &self,
        trigger: Trigger,
        generation: Option<u64>,
    ) -> Result<Outcome, ReconcileError> {
        let started_at = Utc::now();
        let label = self.source.lock().await.label();
        let mut cx = Context {
            source: &label,
            trigger,
            identity: self.identity.as_ref(),
            seed: self.seed,
            offline_after: self.planning_offline_after(),
            started_at,
            expect_generation: generation,
            fence: self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            hooks: self.hooks.as_deref(),
            planner: Some(&self.planner),
            observed: Some(&self.observed),
            desired_changes: None,
        };
        let snap = match self.read().await {
            Ok((_, s)) => s,
            Err(e) => {
                let err = RecordedError {
                    path: None,
                    line: None,
                    col: None,
                    message: error_chain(&e),
                };
                executor::record_failure(&self.pool, &cx, None, &[err]).await?;
                return Err(e.into());
            }
        };
        let Some(desired) = &snap.loaded.desired else {
            self.set_idle(None);
            let errors: Vec<Diagnostic> = snap.loaded.diagnostics.errors().cloned().collect();
            let recorded: Vec<RecordedError> = errors.iter().map(recorded).collect();
            executor::record_failure(&self.pool, &cx, snap.commit.as_deref(), &recorded).await?;
            return Ok(Outcome::Invalid {
                commit: snap.commit.clone(),
                errors,
            });
        };
        let which = match (self.head_polling, trigger) {
            (HeadPolling::All, Trigger::Startup | Trigger::Timer | Trigger::Manual) => {
                HeadPolling::All
            }
            // Cheap when every head is known (one query), so every other run: a new app or branch
            // arrives with a config change, whatever woke the run, and deploys without waiting for the
            // timer.
            _ => HeadPolling::Unknown,
        };
        self.poll_heads(desired, which).await?;
        let commit = snap.commit.clone().unwrap_or_default();
        tracing::Span::current().record("commit", commit.as_str());
        // An operator's run (and one checked against a shown generation) always plans.
        if trigger != Trigger::Manual && generation.is_none() && self.unchanged(&snap).await? {
            return Ok(Outcome::Unchanged { commit });
        }
        self.set_idle(None);
        let applied = {
            let mut conn = self.pool.acquire().await.map_err(|e| StoreError::Query {
                op: "read the config state",
                source: e,
            })?;
            state::config_state(&mut conn).await?.commit
        };
        let behind = match &applied {
            Some(a) if a.as_str() != commit => {
                let mut source = self.source.lock().await;
                match tokio::task::block_in_place(|| source.is_behind(&commit, a.as_str())) {
                    Some(b) => b,
                    // The cache never saw the applied commit: the history still says whether this
                    // commit was applied before it.
                    None => {
                        drop(source);
                        let mut conn =
                            self.pool.acquire().await.map_err(|e| StoreError::Query {
                                op: "read the history",
                                source: e,
                            })?;
                        crate::store::history::was_applied(&mut conn, &commit).await?
                    }
                }
            }
            _ => false,
        };
        if let (true, Some(applied)) = (behind, &applied) {
            return Ok(Outcome::Behind {
                commit,
                applied: applied.as_str().to_owned(),
            });
        }
        if let Some(hooks) = &self.hooks
            && applied.as_ref().is_none_or(|a| a.as_str() != commit)
            && let Err(e) = hooks.reconcile_started(&self.pool, &commit).await
        {
            tracing::warn!(%commit, error = %error_chain(&*e), "a hook failed at the start of a reconcile");
        }
        let fingerprints = match self.fingerprints(desired).await {
            Ok(f) => f,
            Err(e) => {
                executor::record_failure(&self.pool, &cx, Some(&commit), std::slice::from_ref(&e))
                    .await?;
                return Err(ReconcileError::Secrets(e.to_string()));
            }
        };
        let commit_id = CommitId::new(commit.clone());
        let changes = self.desired_changes(&snap).await;
        cx.desired_changes = changes.as_ref();
        inject_panic("reconcile", &snap.files);
        let apply = async {
            inject_panic("apply", &snap.files);
            executor::reconcile(
                &self.pool,
                Some((&commit_id, desired)),
                fingerprints.as_ref(),
                &cx,
            )
            .await
        };
        // A panic in the planner or the executor unwinds out of the apply's transaction, which rolls back:
        // nothing of this commit is applied, and it is recorded as failed like an invalid one.
        self.plans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let applied = match AssertUnwindSafe(apply).catch_unwind().await {
            Ok(r) => r,
            Err(payload) => {
                let why = panic_message(&*payload);
                let err = RecordedError {
                    path: None,
                    line: None,
                    col: None,
                    message: format!(
                        "{PANIC_REASON} while planning or applying this commit: {why}"
                    ),
                };
                executor::record_failure(&self.pool, &cx, Some(&commit), &[err]).await?;
                return Err(ReconcileError::Panicked(why));
            }
        };
        match applied {
            Ok(a) => {
                if a.status == ReconcileStatus::Noop {
                    self.set_idle(Some(Idle {
                        commit: snap.commit.clone(),
                        referenced: snap.referenced.clone(),
                        generation: a.plan.based_on,
                        offline_after: cx.offline_after,
                        liveness: a.liveness.clone(),
                    }));
                }
                if let Some(hook) = &self.certs {
                    self.tell_certs(hook, desired, &snap).await;
                }
                if let Some(declared) = &self.declared
                    && let Err(e) = declared.record(&self.pool, &commit, &desired.origins).await
                {
                    // Display only: the pages go on showing the lines recorded before.
                    tracing::warn!(error = %error_chain(&e), "cannot record where resources are declared");
                }
                Ok(Outcome::Applied(Box::new(a)))
            }
            Err(e) => {
                let err = RecordedError {
                    path: None,
                    line: None,
                    col: None,
                    message: error_chain(&e),
                };
                executor::record_failure(&self.pool, &cx, Some(&commit), &[err]).await?;
                Err(e.into())
            }
        }
    }

    /// What the source knows changed between the desired state the planner last planned and `snap`'s.
    async fn desired_changes(&self, snap: &Snapshot) -> Option<executor::DesiredChanges> {
        let revision = snap.loaded.revision?;
        let last = self
            .planner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .basis();
        let since = match last {
            Some(b) => self
                .source
                .lock()
                .await
                .apps_changed(b.desired, revision)
                .map(|apps| (b.desired, apps)),
            None => None,
        };
        let with_secrets = snap.loaded.secrets.iter().map(|s| s.app.clone()).collect();
        Some(executor::DesiredChanges {
            revision,
            since,
            with_secrets,
        })
    }

    /// The leader's term the next reconciles apply in (`cairn serve` sets it when a term starts); a
    /// reconcile of an ended term fails in its apply transaction.
    pub fn set_fence(&self, fence: Option<crate::store::lease::Fence>) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = fence;
        // What the last empty plan saw was seen by the previous term: plan afresh.
        self.set_idle(None);
    }

    fn set_idle(&self, idle: Option<Idle>) {
        *self.idle.lock().unwrap_or_else(|p| p.into_inner()) = idle;
    }

    /// Whether a plan of `snap` now would again be empty, as the last one was: same commit and
    /// referenced files, same liveness threshold, the same applied generation, no change marked since
    /// (`store::changes`), and every node judged as then (re-judged from the heartbeats only once the
    /// earliest of them could have aged past the threshold). Costs one query, and one more per
    /// heartbeat deadline.
    async fn unchanged(&self, snap: &Snapshot) -> Result<bool, StoreError> {
        let Some(last) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(false);
        };
        let offline_after = self.planning_offline_after();
        if last.commit != snap.commit
            || last.offline_after != offline_after
            || last.referenced != snap.referenced
        {
            return Ok(false);
        }
        let pending = crate::store::changes::pending(&self.pool).await?;
        if pending.marked || pending.generation != last.generation {
            return Ok(false);
        }
        let now = Utc::now();
        if last.liveness.until.is_some_and(|until| now >= until) {
            let status = crate::store::changes::node_liveness(&self.pool).await?;
            let fresh = cairn_plan::observed::Liveness::judge(&status, now, offline_after);
            if fresh.states != last.liveness.states {
                return Ok(false);
            }
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(idle) = idle.as_mut() {
                idle.liveness.until = fresh.until;
            }
        }
        Ok(true)
    }

    /// Runs until `shutdown` is triggered: reconciles now, then whenever `wake` is notified or `interval`
    /// passes. Errors are logged (by [`Controller::reconcile`], in its span) and retried with backoff
    /// (capped at the interval).
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, interval: Duration, shutdown: &Shutdown) {
        Worker::new("reconciling", interval)
            .woken_by(wake)
            .backoff(Duration::from_secs(1))
            .failures_logged_by_pass()
            .run(
                shutdown,
                Runs {
                    controller: self,
                    pruned_at: None,
                },
            )
            .await
    }
}

/// The passes of [`Controller::run`]: one reconcile each, and the history's prune when it is due.
struct Runs {
    controller: Arc<Controller>,
    pruned_at: Option<std::time::Instant>,
}

impl Pass for Runs {
    type Error = ReconcileError;

    async fn run(&mut self, woken: Woken) -> Result<Option<Duration>, ReconcileError> {
        if self.pruned_at.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            self.pruned_at = Some(std::time::Instant::now());
            self.controller.prune_history().await;
        }
        let trigger = match woken {
            Woken::Start => Trigger::Startup,
            Woken::Wake => Trigger::Wake,
            Woken::Period => Trigger::Timer,
        };
        // The outcome is logged (in the reconcile's span) by `reconcile` itself. Each run is a task of
        // its own, so a panic anywhere in it (past the places that catch one with its commit) ends that
        // run, not the loop.
        let run = tokio::spawn({
            let this = self.controller.clone();
            async move { this.reconcile(trigger).await }
        });
        let (result, unchanged) = match run.await {
            Ok(Ok(Outcome::Unchanged { .. })) => (Ok(None), true),
            Ok(r) => (r.map(|_| None), false),
            Err(e) => (
                Err(self.controller.record_panicked_run(trigger, e).await),
                false,
            ),
        };
        // Nothing changed that the route table is made of when nothing the planner reads did.
        if let (false, Some(routes)) = (unchanged, &self.controller.routes) {
            routes.poke();
        }
        result
    }
}

impl Controller {
    /// Stores the applied name sets and hands the certificate loop the applied `[tls]` when it changed.
    async fn tell_certs(
        &self,
        hook: &CertsHook,
        desired: &cairn_schema::Desired,
        snap: &crate::source::Snapshot,
    ) {
        if let Err(e) = crate::certs::declare(&self.pool, desired).await {
            tracing::warn!(error = %error_chain(&e), "cannot store the name sets to keep certificates for");
        }
        let settings = crate::certs::CertSettings::from_snapshot(snap);
        let key = settings.as_ref().map(|s| {
            (
                s.directory.clone(),
                s.contact.clone(),
                s.ca_roots_pem.clone(),
                s.challenge,
            )
        });
        {
            let mut last = hook.last.lock().unwrap_or_else(|p| p.into_inner());
            if *last != key || settings.is_some() != hook.settings.borrow().is_some() {
                *last = key;
                hook.settings
                    .send_replace(settings.map(|s| hook.overrides.apply(s)));
            }
        }
        hook.wake.notify_one();
        if let Some(routes) = &self.routes {
            let fence = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let own = own_certificates(desired, snap);
            let commit = snap.commit.as_deref().unwrap_or_default();
            if let Err(e) = routes
                .set_own_certificates(&self.pool, fence.as_ref(), commit, own)
                .await
            {
                tracing::warn!(error = %error_chain(&e), "cannot store the apps' own certificates; the ingress nodes keep the last stored");
            }
        }
    }

    /// Deletes failed and no-op runs older than [`Controller::history_retention`]; failures are logged.
    pub async fn prune_history(&self) {
        let keep =
            chrono::Duration::from_std(self.history_retention).unwrap_or(chrono::Duration::MAX);
        let before = Utc::now()
            .checked_sub_signed(keep)
            .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
        match crate::store::history::prune_reconciliations(&self.pool, before, 5000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "old reconcile runs pruned from the history"),
            Err(e) => tracing::warn!(error = %error_chain(&e), "cannot prune the history"),
        }
    }

    /// Records a run whose task panicked outside the places that know its commit (or was cancelled).
    async fn record_panicked_run(
        &self,
        trigger: Trigger,
        e: tokio::task::JoinError,
    ) -> ReconcileError {
        let why = match e.try_into_panic() {
            Ok(payload) => panic_message(&*payload),
            Err(e) => e.to_string(),
        };
        tracing::error!(panic = %why, "a reconcile panicked: recorded as failed");
        let label = self.source.lock().await.label();
        let cx = Context {
            source: &label,
            trigger,
            identity: self.identity.as_ref(),
            seed: self.seed,
            offline_after: self.offline_after,
            started_at: Utc::now(),
            expect_generation: None,
            fence: None,
            hooks: None,
            planner: None,
            observed: None,
            desired_changes: None,
        };
        let err = RecordedError {
            path: None,
            line: None,
            col: None,
            message: format!("{PANIC_REASON} during a reconcile: {why}"),
        };
        if let Err(e) = executor::record_failure(&self.pool, &cx, None, &[err]).await {
            tracing::error!(error = %error_chain(&e), "cannot record a panicked reconcile");
        }
        ReconcileError::Panicked(why)
    }
}

fn log_outcome(o: &Outcome) {
    match o {
        Outcome::Applied(a) if a.status == ReconcileStatus::Noop => {
            tracing::debug!(commit = ?a.plan.target_commit, "no changes")
        }
        Outcome::Applied(a) => tracing::info!(
            commit = ?a.plan.target_commit,
            generation = a.plan.generation,
            tasks = a.tasks,
            "{}",
            a.plan.summary()
        ),
        Outcome::Invalid { commit, errors } => {
            tracing::warn!(commit = ?commit, errors = errors.len(), first = %errors.first().map(|e| e.to_string()).unwrap_or_default(), "invalid commit: nothing applied")
        }
        Outcome::Behind { commit, applied } => {
            tracing::warn!(%commit, %applied, "the source is behind the applied commit: nothing applied")
        }
        Outcome::Unchanged { commit } => {
            tracing::trace!(%commit, "nothing changed: not planned")
        }
    }
}

/// A diagnostic as the history stores it (no source line: it could hold a pasted secret).
pub fn recorded(d: &Diagnostic) -> RecordedError {
    RecordedError {
        path: (!d.path.is_empty()).then(|| d.path.clone()),
        line: (d.line > 0).then_some(d.line as u32),
        col: (d.col > 0).then_some(d.col as u32),
        message: d.message.clone(),
    }
}
