//! The executor: performs a [`Plan`] exactly as the planner made it, in one transaction under the apply
//! lock, so that the new state, the reconciliation record and the agent tasks commit together or not at
//! all. It decides nothing; see the contract in [`cairn_plan`].
//!
//! What it must not do: choose anything the plan leaves open (there is nothing), hold the lock while
//! reading the config source or decrypting more than the tasks need, or put a secret's plaintext
//! anywhere but the age ciphertext of a task addressed to its node.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_schema::{Desired, EnvValue, Identity, Kind, Name, Recipient};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Postgres, Transaction};

use crate::events::{EventKind, NewEvent};
use crate::queue::{self, NewTask, QueueError, TaskKind};
use crate::store::{
    self, NewReconciliation, ReconcileStatus, RecordedError, ReleaseInsert, StoreError, state,
};
use cairn_plan::observed::{AppliedApp, CommitId, Fingerprints, Observed};
use cairn_plan::{Action, Basis, Changes, DesiredAt, Plan, PlanInput, Planner, plan};

/// Why an apply did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(
        "{count} secret(s) could not be verified: the control plane needs its identity to apply"
    )]
    SecretsUnverified { count: usize },
    #[error(
        "the state changed since the plan was shown (generation {shown} is now {current}): plan again"
    )]
    Changed { shown: u64, current: u64 },
    #[error("cannot encrypt app `{app}`'s secrets to node `{node}`: {reason}")]
    Reencrypt {
        app: String,
        node: String,
        reason: String,
    },
}

/// What one apply did.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub plan: Plan,
    /// `Noop` when the plan was empty: nothing was written but the reconciliation record.
    pub status: ReconcileStatus,
    /// Tasks enqueued (tasks already enqueued under the same key are not counted).
    pub tasks: usize,
    pub reconciliation: i64,
    /// The nodes' liveness as this plan judged it, and until when that judgement holds: what lets the
    /// controller skip the next plan when nothing else changed.
    #[serde(skip)]
    pub liveness: cairn_plan::observed::Liveness,
}

/// The inputs of a reconcile that are not state: identity, seed, clock.
#[derive(Debug)]
pub struct Context<'a> {
    /// Where the config came from, for the history: a URL or a directory.
    pub source: &'a str,
    /// What woke the reconciler.
    pub trigger: crate::store::history::Trigger,
    pub identity: Option<&'a Identity>,
    pub seed: u64,
    pub offline_after: Duration,
    pub started_at: DateTime<Utc>,
    /// Apply only a plan based on this generation: the one an operator was shown.
    pub expect_generation: Option<u64>,
    /// Told about applies and failures inside their transactions (commit statuses, in `cairn serve`).
    pub hooks: Option<&'a dyn crate::hooks::Hooks>,
    /// In `cairn serve`: the leader's term this apply runs in; the apply transaction checks it holds the
    /// lease with it (`store::lease::check`) and fails when deposed. `None`: an operator's own apply
    /// (`cairn apply`), serialized by the apply lock and the generation alone.
    pub fence: Option<crate::store::lease::Fence>,
    /// The planner kept between reconciles (`cairn serve`'s controller): it plans again only the apps
    /// whose inputs changed ([`cairn_plan::Planner`]). `None` plans every app.
    pub planner: Option<&'a std::sync::Mutex<Planner>>,
    /// The applied state kept between reconciles (`cairn serve`'s controller): the apply reads again only
    /// the apps whose rows changed ([`state::KeptObserved`]). `None` reads everything.
    pub observed: Option<&'a state::KeptObserved>,
    /// Which assembly of the config this is, and the apps its manifests changed since the one the
    /// planner last planned (from the config source's assembler): with the observed state's change
    /// marks, the planner compares only those apps ([`cairn_plan::Changes`]).
    pub desired_changes: Option<&'a DesiredChanges>,
}

/// What the config source knows of a desired state: see [`Context::desired_changes`].
#[derive(Debug, Clone)]
pub struct DesiredChanges {
    pub revision: cairn_schema::Revision,
    /// An earlier revision, and the apps whose manifest may differ between it and this one.
    pub since: Option<(cairn_schema::Revision, std::collections::BTreeSet<Name>)>,
    /// The apps with a secret env value (the source's secret sites), so that an apply need not look
    /// through every app for them.
    pub with_secrets: std::collections::BTreeSet<Name>,
}

/// Keyed fingerprints of every secret in `desired`, decrypting each with `identity`. Errors name the app
/// and key, never a value.
pub fn fingerprints(desired: &Desired, identity: &Identity) -> Result<Fingerprints, RecordedError> {
    let mut out = Fingerprints::new();
    for (app, a) in &desired.apps {
        for (key, v) in &a.env {
            if let EnvValue::Secret { secret } = v {
                let plain = identity.decrypt(secret).map_err(|e| RecordedError {
                    path: desired
                        .origins
                        .get(&(Kind::App, app.clone()))
                        .map(|o| o.path.clone()),
                    line: None,
                    col: None,
                    message: format!("secret `{key}` of app `{app}` does not decrypt: {e}"),
                })?;
                out.insert((app.clone(), key.clone()), identity.fingerprint(&plain));
            }
        }
    }
    Ok(out)
}

/// Plans `desired` (or, with `None`, the applied configuration alone) against the observed state read
/// under the apply lock, and applies the plan in the same transaction.
pub async fn reconcile(
    pool: &PgPool,
    desired: Option<(&CommitId, &Desired)>,
    fingerprints: Option<&Fingerprints>,
    cx: &Context<'_>,
) -> Result<Applied, ApplyError> {
    let mut tx = pool.begin().await.map_err(|e| StoreError::Query {
        op: "begin an apply",
        source: e,
    })?;
    state::lock_apply(&mut tx).await?;
    if let Some(fence) = &cx.fence {
        store::lease::check(&mut tx, fence).await?;
    }
    // Before the read: a change committed from here on leaves its mark for the next reconcile.
    let marks = store::changes::consume(&mut tx).await?;
    let (observed, partial) = state::read_observed_in(&mut tx, &marks, cx.observed).await?;
    let now = Utc::now();
    let input = PlanInput {
        desired: desired.map(|(commit, state)| DesiredAt { commit, state }),
        fingerprints,
        observed: &observed,
        seed: cx.seed,
        now,
        offline_after: cx.offline_after,
    };
    // The apps whose inputs changed since the planner's last plan: the manifests the config source
    // says changed, and the rows the change marks name (only when the read before kept this state).
    // A whole read (marks consumed elsewhere, or too many to name) names no apps, but is of known
    // inputs all the same: the next plan can count from it.
    let since: Option<(Basis, std::collections::BTreeSet<Name>)> = match (
        cx.desired_changes.and_then(|d| d.since.as_ref()),
        partial,
        marks.count.checked_sub(1),
    ) {
        (Some((revision, apps)), true, Some(before)) => {
            let basis = Basis {
                desired: *revision,
                observed: before,
            };
            Some((basis, apps.union(&marks.apps).cloned().collect()))
        }
        _ => None,
    };
    let changes = cx.desired_changes.map(|d| Changes {
        now: Basis {
            desired: d.revision,
            observed: marks.count,
        },
        since: since.as_ref().map(|(basis, apps)| (*basis, apps)),
    });
    // Planning is a long synchronous computation at scale (a second at 10,000 apps on 10,000 nodes): off
    // the async workers, so that the requests they serve (heartbeats) do not queue behind it.
    let plan = crate::worker::off_the_workers(|| match cx.planner {
        Some(p) => p
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .plan_with(&input, changes),
        None => plan(&input),
    });
    let liveness =
        cairn_plan::observed::Liveness::judge(&observed.node_status, now, cx.offline_after);
    if let Some(shown) = cx.expect_generation
        && shown != plan.based_on
    {
        return Err(ApplyError::Changed {
            shown,
            current: plan.based_on,
        });
    }
    if !plan.secrets_verified {
        let count = plan
            .changes
            .iter()
            .flat_map(|c| &c.fields)
            .filter(|f| f.unverified)
            .count();
        return Err(ApplyError::SecretsUnverified {
            count: count.max(1),
        });
    }
    let commit = plan.target_commit.as_ref().map(CommitId::as_str);
    let (status, tasks) = if plan.is_empty() {
        (ReconcileStatus::Noop, 0)
    } else {
        let desired = desired.map(|(_, d)| d);
        let with_secrets = cx.desired_changes.map(|d| &d.with_secrets);
        write_state(
            &mut tx,
            &plan,
            desired,
            fingerprints,
            &observed,
            with_secrets,
        )
        .await?;
        // A plan created or repriced by this commit gets a price row (usage metering), in this
        // transaction, after the state names the commit and generation.
        store::usage::record_prices(&mut tx).await?;
        supersede_tasks(&mut tx, &plan).await?;
        let tasks = enqueue_tasks(&mut tx, &plan, desired, &observed, cx.identity).await?;
        (ReconcileStatus::Applied, tasks)
    };
    let reconciliation = store::history::record_reconciliation(
        &mut tx,
        &NewReconciliation {
            source: cx.source,
            commit,
            trigger: cx.trigger.as_str(),
            status,
            generation: Some(if status == ReconcileStatus::Noop {
                plan.based_on
            } else {
                plan.generation
            }),
            summary: &plan.summary(),
            errors: &[],
            started_at: cx.started_at,
            finished_at: Utc::now(),
        },
    )
    .await?;
    if status == ReconcileStatus::Applied {
        crate::events::record(&mut tx, &applied_events(&plan)).await?;
    }
    if let (Some(hooks), ReconcileStatus::Applied) = (cx.hooks, status)
        && let Some(mut savepoint) = crate::hooks::savepoint(&mut tx, "applied").await
    {
        let result = hooks.applied(&mut savepoint, &plan).await;
        crate::hooks::settle(savepoint, "applied", result).await;
    }
    failpoint("apply-before-commit").await;
    tx.commit().await.map_err(|e| StoreError::Query {
        op: "commit an apply",
        source: e,
    })?;
    if let Some(kept) = cx.observed {
        kept.keep(marks.count, observed);
    }
    if status == ReconcileStatus::Applied && bulk(&plan) {
        // Beside what follows, not before it: the apply is committed (at 100,000 apps this takes
        // about 3.5 s, a tenth of the cold apply).
        tokio::spawn(refresh_statistics(pool.clone()));
    }
    Ok(Applied {
        plan,
        status,
        tasks,
        reconciliation,
        liveness,
    })
}

/// Rows an apply writes past which the statistics of the tables it filled are refreshed at once.
const BULK_ROWS: usize = 1_000;

fn bulk(plan: &Plan) -> bool {
    plan.changes.len() + plan.releases.len() + plan.placement_changes.len() + plan.tasks.len()
        > BULK_ROWS
}

/// Refreshes PostgreSQL's statistics of the tables a large apply filled. Until autovacuum gets to them
/// (a minute or more), the planner believes them as small as before, and a lookup of a few apps' rows
/// (the next apply's read, a heartbeat's placements) scans every row: after a cold apply of 100,000 apps,
/// 130-190 ms instead of 6-14 ms for one app. Best effort: autovacuum does it later anyway.
async fn refresh_statistics(pool: PgPool) {
    let started = std::time::Instant::now();
    match sqlx::query("ANALYZE apps, app_env, placements, releases, tasks")
        .execute(&pool)
        .await
    {
        Ok(_) => tracing::debug!(
            took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "table statistics refreshed after a large apply"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot refresh table statistics after a large apply"),
    }
}

/// Records a reconcile that could not plan (an invalid commit, an unreadable source): nothing else is
/// written, so the last good state stays. The hooks hear of a failed commit in the same transaction.
pub async fn record_failure(
    pool: &PgPool,
    cx: &Context<'_>,
    commit: Option<&str>,
    errors: &[RecordedError],
) -> Result<i64, StoreError> {
    let mut tx = pool.begin().await.map_err(|e| StoreError::Query {
        op: "record a failure",
        source: e,
    })?;
    let summary = errors
        .first()
        .map_or_else(|| "failed".to_owned(), |e| e.to_string());
    // The same commit failing the same way again (every interval while it is the head) only counts a
    // repeat on the row already there. The hooks still hear of every failure: a start in between may
    // have set the commit's status to pending again.
    let (id, repeated) = store::history::record_failed(
        &mut tx,
        &NewReconciliation {
            source: cx.source,
            commit,
            trigger: cx.trigger.as_str(),
            status: ReconcileStatus::Failed,
            generation: None,
            summary: &summary,
            errors,
            started_at: cx.started_at,
            finished_at: Utc::now(),
        },
    )
    .await?;
    let errors = &errors[..errors.len().min(store::history::MAX_RECORDED_ERRORS)];
    // Once per failure: the same commit failing the same way again is a repeat, not news.
    if !repeated {
        crate::events::record(&mut tx, &[failure_event(commit, &summary, errors)]).await?;
    }
    if let (Some(hooks), Some(commit), false) = (cx.hooks, commit, errors.is_empty())
        && let Some(mut savepoint) = crate::hooks::savepoint(&mut tx, "failed").await
    {
        let result = hooks.failed(&mut savepoint, commit, errors).await;
        crate::hooks::settle(savepoint, "failed", result).await;
    }
    tx.commit().await.map_err(|e| StoreError::Query {
        op: "record a failure",
        source: e,
    })?;
    Ok(id)
}

/// What an applied plan tells the events table: a new config commit applied, each release it starts
/// deploying, each replica that left its node and that no node can take.
fn applied_events(plan: &Plan) -> Vec<NewEvent> {
    let mut out = Vec::with_capacity(plan.releases.len() + 1);
    if let Some(target) = &plan.target_commit
        && plan.applied_commit.as_ref() != Some(target)
    {
        out.push(
            NewEvent::new(
                EventKind::ApplySucceeded,
                format!(
                    "config commit {} applied. {}",
                    short(target.as_str()),
                    plan.summary()
                ),
            )
            .commit(target.as_str())
            .detail(json!({
                "generation": plan.generation,
                "summary": plan.summary(),
                "tasks": plan.tasks.len(),
            })),
        );
    }
    // The nodes of each release's tasks, in one pass (a cold apply of 100,000 apps has 200,000 tasks).
    let mut by_release: std::collections::HashMap<(&Name, u64), Vec<&str>> =
        std::collections::HashMap::new();
    for t in &plan.tasks {
        by_release
            .entry((&t.app, t.release))
            .or_default()
            .push(t.node.as_str());
    }
    for r in &plan.releases {
        let mut nodes = by_release.remove(&(&r.app, r.number)).unwrap_or_default();
        nodes.sort_unstable();
        nodes.dedup();
        out.push(
            NewEvent::new(
                EventKind::DeployStarted,
                format!(
                    "release #{} of {} (commit {}) is deploying",
                    r.number,
                    r.app,
                    short(r.source_commit.as_str())
                ),
            )
            .app(&r.app)
            .release(r.number)
            .commit(r.source_commit.as_str())
            .detail(json!({
                "config_commit": r.config_commit.as_str(),
                "nodes": nodes,
                "config_changed": r.config_changed,
            })),
        );
    }
    for c in &plan.placement_changes {
        if let cairn_plan::PlacementReason::Unplaced { .. } = c.reason {
            let mut e = NewEvent::new(
                EventKind::ReplicaUnplaceable,
                format!(
                    "replica {} of {} cannot be placed: {}",
                    c.slot,
                    c.app,
                    c.reason.describe()
                ),
            )
            .app(&c.app)
            .detail(json!({ "slot": c.slot, "reason": c.reason.describe() }));
            if let Some(from) = &c.from {
                e = e.node(from);
            }
            out.push(e);
        }
    }
    out
}

/// A config commit that could not be applied, with its first diagnostics.
fn failure_event(commit: Option<&str>, summary: &str, errors: &[RecordedError]) -> NewEvent {
    let diagnostics: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let what = commit.map_or_else(
        || "the config".to_owned(),
        |c| format!("config commit {}", short(c)),
    );
    let mut e = NewEvent::new(
        EventKind::ApplyFailed,
        format!("{what} was not applied: {summary}"),
    )
    .detail(json!({ "diagnostics": diagnostics }));
    if let Some(c) = commit {
        e = e.commit(c);
    }
    e
}

/// The first 12 characters of a commit id, as people quote them.
pub(crate) fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

async fn write_state(
    tx: &mut Transaction<'_, Postgres>,
    plan: &Plan,
    desired: Option<&Desired>,
    fingerprints: Option<&Fingerprints>,
    observed: &Observed,
    with_secrets: Option<&std::collections::BTreeSet<Name>>,
) -> Result<(), ApplyError> {
    let generation = plan.generation;
    let empty = Fingerprints::new();
    let prints = fingerprints.unwrap_or(&empty);
    if let Some(d) = desired {
        let mut deleted: BTreeMap<Kind, Vec<Name>> = BTreeMap::new();
        let mut apps: Vec<(&Name, &cairn_schema::App)> = Vec::new();
        for c in &plan.changes {
            if c.action == Action::Delete {
                deleted.entry(c.kind).or_default().push(c.name.clone());
                continue;
            }
            match c.kind {
                Kind::Plan => {
                    state::upsert_plan(tx, &c.name, &d.plans[&c.name], generation).await?
                }
                Kind::Runtime => {
                    state::upsert_runtime(tx, &c.name, &d.runtimes[&c.name], generation).await?
                }
                Kind::Node => {
                    state::upsert_node(tx, &c.name, &d.nodes[&c.name], generation).await?
                }
                Kind::App => {
                    apps.push((&c.name, &d.apps[&c.name]));
                    continue;
                }
                Kind::Notify => {
                    state::upsert_sink(tx, &c.name, &d.notify[&c.name], generation).await?;
                    continue;
                }
                // Written whole below, with where each one runs.
                Kind::Database => continue,
            };
        }
        state::upsert_apps(tx, &apps, prints, generation).await?;
        // A secret re-encrypted to other recipients is no change (same fingerprint), yet the stored
        // ciphertext and its digest must follow the commit (`plan::next_observed`): otherwise every plan
        // made without the identity would call that secret changed from then on.
        let has_secret = |(_, a): &(&Name, &cairn_schema::App)| {
            a.env.values().any(|v| matches!(v, EnvValue::Secret { .. }))
        };
        let with_secrets: Vec<(&Name, &cairn_schema::App)> = match with_secrets {
            Some(names) => names
                .iter()
                .filter_map(|n| d.apps.get_key_value(n))
                .filter(has_secret)
                .collect(),
            None => d.apps.iter().filter(has_secret).collect(),
        };
        for (name, app) in with_secrets {
            let stale = observed.apps.get(name).is_some_and(|stored| {
                AppliedApp::from_desired(name, app, prints).is_ok_and(|now| &now != stored)
            });
            if stale
                && !plan
                    .changes
                    .iter()
                    .any(|c| c.kind == Kind::App && &c.name == name)
            {
                state::upsert_app(tx, name, app, prints, generation).await?;
            }
        }
        // Apps first: the deferred foreign keys are checked at commit, but deleting dependants first keeps
        // the order obvious to a reader of the statement log.
        for kind in [
            Kind::Notify,
            Kind::App,
            Kind::Node,
            Kind::Runtime,
            Kind::Plan,
        ] {
            if let Some(names) = deleted.get(&kind) {
                state::delete_resources(tx, kind, names).await?;
            }
        }
        if let Some(apps) = deleted.get(&Kind::App) {
            state::delete_source_heads(tx, apps).await?;
        }
        if !plan.databases.is_empty() || !observed.databases.is_empty() {
            let specs = d
                .databases
                .iter()
                .map(|(n, db)| {
                    (
                        n.clone(),
                        cairn_plan::observed::AppliedDatabase::from_desired(db),
                    )
                })
                .collect();
            let next = cairn_plan::next_databases(observed, &specs, &plan.databases);
            store::databases::write(tx, &next, &d.databases, generation).await?;
        }
        // A change to a pinned app's manifest is a deploy: it lifts the rollback pin.
        for p in plan.pins.iter().filter(|p| p.lifted) {
            state::set_rollback_pin(tx, &p.app, None).await?;
        }
        state::advance_generation(
            tx,
            plan.based_on,
            generation,
            plan.target_commit.as_ref(),
            &d.settings,
        )
        .await?;
    } else {
        let settings = state::config_state(tx).await?.settings;
        match settings {
            Some(s) => state::advance_generation(tx, plan.based_on, generation, None, &s).await?,
            None => return Ok(()),
        }
    }
    let build_keys: Vec<String> = plan
        .releases
        .iter()
        .map(|r| release_build_key(r.source_commit.as_str(), &r.spec))
        .collect();
    let releases: Vec<ReleaseInsert<'_>> = plan
        .releases
        .iter()
        .zip(&build_keys)
        .map(|(r, build_key)| ReleaseInsert {
            app: &r.app,
            number: r.number,
            config_commit: &r.config_commit,
            config_generation: generation,
            source_commit: &r.source_commit,
            spec: serde_json::to_value(&r.spec).expect("a release spec serializes"),
            spec_hash: &r.spec_hash,
            build_key,
        })
        .collect();
    state::insert_releases(tx, &releases).await?;
    state::write_placement_changes(tx, plan).await?;
    Ok(())
}

/// A release's build key: what the agent names the release's image by (`cairn_proto::build`), computed
/// from the same fields the deploy payload carries, so releases sharing it share one image.
pub fn release_build_key(source_commit: &str, spec: &cairn_plan::ReleaseSpec) -> String {
    cairn_proto::build::build_key(
        source_commit,
        cairn_proto::build::Recipe {
            dockerfile: spec.dockerfile,
            base_image: spec.image.as_deref(),
            commands: &spec.build,
        },
    )
}

/// Retires the unfinished tasks of older generations of every slot this plan moves to another node or
/// removes, on every node but the slot's new one, in the transaction that moves the placements: a node
/// cut off while its slot moved away never starts the old task when it returns (one instance, always),
/// and the lease it may still hold is refused. (Older tasks on the slot's own node are left to its
/// agent, which skips a generation older than what the slot holds.)
async fn supersede_tasks(
    tx: &mut Transaction<'_, Postgres>,
    plan: &Plan,
) -> Result<(), ApplyError> {
    let mut slots: Vec<(Name, u32, Option<Name>)> = plan
        .placement_changes
        .iter()
        .filter(|c| c.from.is_some() && c.from != c.to)
        .map(|c| (c.app.clone(), c.slot, c.to.clone()))
        .collect();
    slots.sort();
    slots.dedup();
    let retired = queue::supersede_slots(tx, &slots, plan.generation).await?;
    if !retired.is_empty() {
        tracing::info!(generation = plan.generation, tasks = ?retired, "the old nodes' tasks of moved or removed slots superseded");
    }
    Ok(())
}

async fn enqueue_tasks(
    tx: &mut Transaction<'_, Postgres>,
    plan: &Plan,
    desired: Option<&Desired>,
    observed: &Observed,
    identity: Option<&Identity>,
) -> Result<usize, ApplyError> {
    let mut tasks = Vec::with_capacity(plan.tasks.len());
    // By app and number: a cold apply of 100,000 apps has 200,000 tasks and 100,000 releases.
    let made: std::collections::HashMap<(&Name, u64), &cairn_plan::NewRelease> = plan
        .releases
        .iter()
        .map(|r| ((&r.app, r.number), r))
        .collect();
    for t in &plan.tasks {
        let kind = crate::queue::task_kind(t.action);
        let dedup = format!(
            "g{}:{}:{}:{}:r{}:{}",
            plan.generation,
            kind.as_str(),
            t.app,
            t.slot,
            t.release,
            t.node
        );
        let mut task = NewTask::new(t.node.clone(), kind, t.app.clone(), dedup);
        task.slot = Some(t.slot);
        task.release = Some(t.release);
        task.generation = Some(plan.generation);
        // What a deploy (and a start or restart, which may have to run the release again) carries
        // (`cairn_proto::DeployPayload`). A release this plan makes is sealed from the desired secrets
        // now; one recorded earlier (a replica moved off an offline node, say) is read back from
        // `releases`, its secrets left for the agent API to seal when the node leases the task.
        if matches!(kind, TaskKind::Deploy | TaskKind::Start | TaskKind::Restart) {
            if let Some(release) = made.get(&(&t.app, t.release)) {
                let recipient = node_recipient(&t.node, desired, observed);
                let app = desired.and_then(|d| d.apps.get(&t.app));
                let secrets = app
                    .map(|a| {
                        a.env
                            .iter()
                            .filter(|(_, v)| matches!(v, EnvValue::Secret { .. }))
                            .count()
                    })
                    .unwrap_or(0);
                // An attached database's URL needs its credentials, made when a node first needs
                // them: sealed when the node leases the task.
                let with_database = release
                    .spec
                    .env
                    .values()
                    .any(|v| matches!(v, cairn_plan::ReleaseEnv::Database { .. }));
                let (secret_env, secret_recipient, secrets_pending) =
                    match (secrets, recipient, identity, app) {
                        _ if with_database => (None, None, true),
                        (0, ..) => (None, None, false),
                        (_, Some(r), Some(id), Some(a)) => {
                            (Some(reencrypt(&t.app, &t.node, a, id, &r)?), Some(r), false)
                        }
                        _ => (None, None, true),
                    };
                let payload = cairn_proto::DeployPayload {
                    config_commit: release.config_commit.as_str().to_owned(),
                    source_commit: release.source_commit.as_str().to_owned(),
                    spec: crate::payload::wire_spec(&release.spec),
                    hostnames: desired.map(|d| d.hostnames(&t.app)).unwrap_or_default(),
                    secret_env,
                    secret_recipient,
                    secrets_pending,
                    push_to: None,
                    image: None,
                };
                task.payload = serde_json::to_value(&payload).expect("a payload serializes");
            } else if let Some(mut payload) =
                crate::payload::recorded_release(tx, &t.app, t.release).await?
            {
                if let Some(d) = desired {
                    payload.hostnames = d.hostnames(&t.app);
                }
                task.payload = serde_json::to_value(&payload).expect("a payload serializes");
            }
        }
        tasks.push(task);
    }
    let mut upgrades = 0;
    for d in &plan.databases {
        let (Some(action), Some(node), Some(port)) = (d.task, &d.node, d.port) else {
            continue;
        };
        let o = observed.databases.get(&d.name);
        let kind = match action {
            cairn_plan::DatabaseTask::Ensure => TaskKind::DbEnsure,
            cairn_plan::DatabaseTask::Stop => TaskKind::DbStop,
            cairn_plan::DatabaseTask::Upgrade => {
                // Its new instance's row, its ledger row and its task, in this transaction.
                if let Some(o) = o {
                    upgrades += 1;
                    crate::databases::queue_upgrade(
                        tx,
                        &d.name,
                        &o.instance,
                        &d.version,
                        plan.generation,
                    )
                    .await?;
                }
                continue;
            }
        };
        let instance = match (&d.change, o) {
            (cairn_plan::DatabaseChange::Keep | cairn_plan::DatabaseChange::Delete, Some(o)) => {
                o.instance.clone()
            }
            _ => d.name.clone(),
        };
        let dedup = format!("g{}:{}:{}:{}", plan.generation, kind.as_str(), d.name, node);
        let mut task = NewTask::new(node.clone(), kind, d.name.clone(), dedup);
        task.generation = Some(plan.generation);
        let payload = cairn_proto::DatabasePayload {
            database: d.name.clone(),
            instance,
            engine: d.engine,
            version: d.version.clone(),
            port,
            user: "app".to_owned(),
            db: store::databases::login_db(d.engine, &d.name),
            login_sealed: None,
            retire_users: Vec::new(),
            target: None,
            object: None,
            sha256: None,
            backup_id: None,
            upgrade_from: None,
            expected_counts: None,
        };
        task.payload = serde_json::to_value(&payload).expect("a payload serializes");
        tasks.push(task);
    }
    let ids = queue::enqueue_many(tx, &tasks).await?;
    Ok(ids.len() + upgrades)
}

/// The recipient a node's tasks are encrypted to: the one it joined with, else the one its manifest pins.
fn node_recipient(
    node: &Name,
    desired: Option<&Desired>,
    observed: &Observed,
) -> Option<Recipient> {
    observed
        .node_status
        .get(node)
        .and_then(|s| s.recipient.clone())
        .or_else(|| {
            desired
                .and_then(|d| d.nodes.get(node))
                .and_then(|n| n.recipient.clone())
        })
}

/// Decrypts an app's secrets with the control plane's identity and encrypts them, as one JSON object, to
/// the node's recipient only. The plaintext lives in zeroizing buffers for the duration of this call.
fn reencrypt(
    app: &Name,
    node: &Name,
    a: &cairn_schema::App,
    identity: &Identity,
    recipient: &Recipient,
) -> Result<String, ApplyError> {
    let err = |reason: String| ApplyError::Reencrypt {
        app: app.to_string(),
        node: node.to_string(),
        reason,
    };
    let mut map = serde_json::Map::new();
    for (k, v) in &a.env {
        if let EnvValue::Secret { secret } = v {
            let plain = identity.decrypt(secret).map_err(|e| err(e.to_string()))?;
            let s = plain.expose_str().map_err(|e| err(e.to_string()))?;
            map.insert(k.to_string(), serde_json::Value::String(s.to_owned()));
        }
    }
    let json = zeroize::Zeroizing::new(serde_json::to_vec(&map).expect("a map serializes"));
    // serde_json's map holds copies of the values; clear them before it drops.
    for (_, v) in map.iter_mut() {
        if let serde_json::Value::String(s) = v {
            zeroize::Zeroize::zeroize(s);
        }
    }
    let ct = cairn_schema::secret::encrypt(&json, std::slice::from_ref(recipient))
        .map_err(|e| err(e.to_string()))?;
    Ok(ct.as_str().to_owned())
}

/// A named pause for crash-safety tests: with `CAIRN_FAILPOINT=<name>:<millis>` in the environment, the
/// process sleeps there, so a test can kill it inside the open transaction. Does nothing otherwise.
pub async fn failpoint(name: &str) {
    let Ok(spec) = std::env::var("CAIRN_FAILPOINT") else {
        return;
    };
    if let Some((n, ms)) = spec.split_once(':')
        && n == name
        && let Ok(ms) = ms.parse::<u64>()
    {
        eprintln!("failpoint {name}: pausing {ms} ms");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
