//! The applied state: what the executor writes in its apply transaction and the planner reads back as
//! [`Observed`].
//!
//! Writes are idempotent: an upsert that would change nothing writes nothing (and says so with
//! [`Written::Unchanged`]), so applying the same commit twice touches no row.
//!
//! What it must not do: compare desired with applied state (the planner does), or store a secret's
//! plaintext: `app_env` gets the manifest's ciphertexts, and a `CHECK` refuses anything else.

use std::collections::{BTreeMap, BTreeSet};

use cairn_schema::{App, EnvValue, Kind, Name, Node, Plan, Recipient, Runtime, Settings};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::decode::{
    drivers, json, name, node_state, recipient, replica_state, replica_state_str, to_i32,
};
use super::{Op as _, StoreError, sha256_tagged, to_i64, to_u64};
use cairn_plan::observed::{
    AppliedApp, AppliedSink, CommitId, Fingerprints, Generation, NodeStatus, Observed,
    ReleaseNumber, ReleaseRecord, ReplicaPlacement,
};

/// Key of the transaction-scoped advisory lock every apply holds: one control plane applies at a time.
/// An arbitrary constant ("cairnapl" in ASCII); nothing else may use it.
pub const APPLY_LOCK_KEY: i64 = 0x6361_6972_6e61_706c;

/// Waits for the apply lock; it is released when `tx` commits or rolls back.
pub async fn lock_apply(tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
    sqlx::query!("SELECT pg_advisory_xact_lock($1)", APPLY_LOCK_KEY)
        .execute(&mut **tx)
        .await
        .op("take the apply lock")?;
    Ok(())
}

/// Waits for the apply lock in shared mode: applies wait for the holder, other shared holders do not.
/// Drift checks hold it so that they read placements and tasks that no apply is halfway through
/// replacing.
pub async fn lock_apply_shared(tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
    sqlx::query!("SELECT pg_advisory_xact_lock_shared($1)", APPLY_LOCK_KEY)
        .execute(&mut **tx)
        .await
        .op("take the apply lock (shared)")?;
    Ok(())
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Written {
    Created,
    Changed,
    Unchanged,
}

impl Written {
    fn from_returning(row: Option<bool>) -> Written {
        match row {
            None => Written::Unchanged,
            Some(true) => Written::Created,
            Some(false) => Written::Changed,
        }
    }
}

/// The single `config_state` row.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigState {
    pub generation: Generation,
    /// `None` before the first apply.
    pub commit: Option<CommitId>,
    /// `None` before the first apply.
    pub settings: Option<Settings>,
    pub applied_at: Option<DateTime<Utc>>,
}

pub async fn config_state(conn: &mut PgConnection) -> Result<ConfigState, StoreError> {
    let row = sqlx::query!("SELECT generation, commit, settings, applied_at FROM config_state")
        .fetch_one(conn)
        .await
        .op("read the config state")?;
    Ok(ConfigState {
        generation: to_u64("config_state", "generation", row.generation)?,
        commit: row.commit.map(CommitId::new),
        settings: row
            .settings
            .map(|s| json("config_state", "settings", s))
            .transpose()?,
        applied_at: row.applied_at,
    })
}

/// Moves the applied state from generation `from` to `to`, recording the commit and settings it now
/// reflects. Fails with [`StoreError::GenerationConflict`] when the stored generation is not `from`:
/// call it under [`lock_apply`], after reading nothing but what the plan was made from.
pub async fn advance_generation(
    conn: &mut PgConnection,
    from: Generation,
    to: Generation,
    commit: Option<&CommitId>,
    settings: &Settings,
) -> Result<(), StoreError> {
    let settings = to_json(settings);
    let updated = sqlx::query!(
        r#"UPDATE config_state
           SET generation = $2, commit = coalesce($3, commit), settings = $4, applied_at = now()
           WHERE generation = $1"#,
        to_i64("generation", from)?,
        to_i64("generation", to)?,
        commit.map(CommitId::as_str),
        settings,
    )
    .execute(&mut *conn)
    .await
    .op("advance the config generation")?;
    if updated.rows_affected() == 1 {
        return Ok(());
    }
    let current = config_state(conn).await?.generation;
    Err(StoreError::GenerationConflict {
        expected: from,
        current,
    })
}

pub async fn upsert_plan(
    conn: &mut PgConnection,
    name: &Name,
    plan: &Plan,
    generation: Generation,
) -> Result<Written, StoreError> {
    let (spec, spec_hash) = spec_of(plan);
    let created = sqlx::query_scalar!(
        r#"INSERT INTO plans
               (name, cpu_millis, memory_bytes, disk_bytes, price, max_replicas, spec, spec_hash, generation)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           ON CONFLICT (name) DO UPDATE SET
               cpu_millis = EXCLUDED.cpu_millis, memory_bytes = EXCLUDED.memory_bytes,
               disk_bytes = EXCLUDED.disk_bytes, price = EXCLUDED.price,
               max_replicas = EXCLUDED.max_replicas, spec = EXCLUDED.spec, spec_hash = EXCLUDED.spec_hash,
               generation = EXCLUDED.generation, updated_at = now()
           WHERE plans.spec_hash <> EXCLUDED.spec_hash
           RETURNING (xmax = 0) AS "created!""#,
        name.as_str(),
        to_i32("cpu", u64::from(plan.cpu.millis()))?,
        to_i64("memory", plan.memory.bytes())?,
        to_i64("disk", plan.disk.bytes())?,
        plan.price.amount(),
        to_i32("max_replicas", u64::from(plan.max_replicas))?,
        spec,
        spec_hash,
        to_i64("generation", generation)?,
    )
    .fetch_optional(conn)
    .await
    .op("write a plan")?;
    Ok(Written::from_returning(created))
}

pub async fn upsert_runtime(
    conn: &mut PgConnection,
    name: &Name,
    runtime: &Runtime,
    generation: Generation,
) -> Result<Written, StoreError> {
    let (spec, spec_hash) = spec_of(runtime);
    let drivers: Vec<String> = runtime
        .drivers
        .iter()
        .map(|d| d.as_str().to_owned())
        .collect();
    let created = sqlx::query_scalar!(
        r#"INSERT INTO runtimes (name, drivers, spec, spec_hash, generation)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (name) DO UPDATE SET
               drivers = EXCLUDED.drivers, spec = EXCLUDED.spec, spec_hash = EXCLUDED.spec_hash,
               generation = EXCLUDED.generation, updated_at = now()
           WHERE runtimes.spec_hash <> EXCLUDED.spec_hash
           RETURNING (xmax = 0) AS "created!""#,
        name.as_str(),
        &drivers,
        spec,
        spec_hash,
        to_i64("generation", generation)?,
    )
    .fetch_optional(conn)
    .await
    .op("write a runtime")?;
    Ok(Written::from_returning(created))
}

pub async fn upsert_node(
    conn: &mut PgConnection,
    name: &Name,
    node: &Node,
    generation: Generation,
) -> Result<Written, StoreError> {
    let (spec, spec_hash) = spec_of(node);
    let created = sqlx::query_scalar!(
        r#"INSERT INTO nodes
               (name, cpu_millis, memory_bytes, disk_bytes, region, labels, drain, recipient, spec,
                spec_hash, generation)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
           ON CONFLICT (name) DO UPDATE SET
               cpu_millis = EXCLUDED.cpu_millis, memory_bytes = EXCLUDED.memory_bytes,
               disk_bytes = EXCLUDED.disk_bytes, region = EXCLUDED.region, labels = EXCLUDED.labels,
               drain = EXCLUDED.drain, recipient = EXCLUDED.recipient, spec = EXCLUDED.spec,
               spec_hash = EXCLUDED.spec_hash, generation = EXCLUDED.generation, updated_at = now()
           WHERE nodes.spec_hash <> EXCLUDED.spec_hash
           RETURNING (xmax = 0) AS "created!""#,
        name.as_str(),
        to_i32("cpu", u64::from(node.cpu.millis()))?,
        to_i64("memory", node.memory.bytes())?,
        to_i64("disk", node.disk.bytes())?,
        node.region.as_ref().map(Name::as_str),
        to_json(&node.labels),
        node.drain,
        node.recipient.as_ref().map(Recipient::as_str),
        spec,
        spec_hash,
        to_i64("generation", generation)?,
    )
    .fetch_optional(conn)
    .await
    .op("write a node")?;
    Ok(Written::from_returning(created))
}

/// Writes an app: `apps.spec` is its applied form ([`AppliedApp::from_desired`]: secrets as
/// fingerprints), `app_env` its env with each secret as the manifest's ciphertext and its fingerprint.
/// Rollback pins and restart requests are operator state and stay as they are.
pub async fn upsert_app(
    conn: &mut PgConnection,
    name: &Name,
    app: &App,
    fingerprints: &Fingerprints,
    generation: Generation,
) -> Result<Written, StoreError> {
    let written = upsert_apps(conn, &[(name, app)], fingerprints, generation).await?;
    Ok(written.into_iter().next().unwrap_or(Written::Unchanged))
}

/// Rows a batched statement carries at most: a cold apply of 100,000 apps is a few dozen statements, not
/// 300,000 round trips, and no statement's parameters grow without bound.
const BATCH: usize = 5_000;

/// Writes apps as [`upsert_app`] does, a batch per statement: what was written of each app (in order;
/// [`Written::Unchanged`] ones are left out).
pub async fn upsert_apps(
    conn: &mut PgConnection,
    apps: &[(&Name, &App)],
    fingerprints: &Fingerprints,
    generation: Generation,
) -> Result<Vec<Written>, StoreError> {
    use sqlx::Row as _;
    let mut out = Vec::new();
    for chunk in apps.chunks(BATCH) {
        let mut names = Vec::with_capacity(chunk.len());
        let mut plans = Vec::with_capacity(chunk.len());
        let mut runtimes = Vec::with_capacity(chunk.len());
        let mut replicas = Vec::with_capacity(chunk.len());
        let mut suspended = Vec::with_capacity(chunk.len());
        let mut specs = Vec::with_capacity(chunk.len());
        let mut hashes = Vec::with_capacity(chunk.len());
        for (name, app) in chunk {
            let applied = AppliedApp::from_desired(name, app, fingerprints).map_err(|e| {
                StoreError::MissingFingerprint {
                    app: e.app.to_string(),
                    key: e.key.to_string(),
                }
            })?;
            let (spec, spec_hash) = spec_of(&applied);
            names.push(name.as_str().to_owned());
            plans.push(app.plan.as_str().to_owned());
            runtimes.push(app.runtime.as_str().to_owned());
            replicas.push(to_i32("replicas", u64::from(app.replicas))?);
            suspended.push(app.suspended);
            specs.push(spec);
            hashes.push(spec_hash);
        }
        let rows = sqlx::query(
            r#"INSERT INTO apps (name, plan, runtime, replicas, suspended, spec, spec_hash, generation)
               SELECT n, p, r, rep, s, sp, h, $8
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::bool[], $6::jsonb[],
                           $7::text[]) AS t(n, p, r, rep, s, sp, h)
               ON CONFLICT (name) DO UPDATE SET
                   plan = EXCLUDED.plan, runtime = EXCLUDED.runtime, replicas = EXCLUDED.replicas,
                   suspended = EXCLUDED.suspended, spec = EXCLUDED.spec, spec_hash = EXCLUDED.spec_hash,
                   generation = EXCLUDED.generation, updated_at = now()
               WHERE apps.spec_hash <> EXCLUDED.spec_hash
               RETURNING name, (xmax = 0) AS created"#,
        )
        .bind(&names)
        .bind(&plans)
        .bind(&runtimes)
        .bind(&replicas)
        .bind(&suspended)
        .bind(&specs)
        .bind(&hashes)
        .bind(to_i64("generation", generation)?)
        .fetch_all(&mut *conn)
        .await
        .op("write apps")?;
        let mut written: BTreeMap<String, Written> = BTreeMap::new();
        for r in rows {
            let (name, created): (String, bool) = (
                r.try_get("name").op("write apps")?,
                r.try_get("created").op("write apps")?,
            );
            written.insert(name, Written::from_returning(Some(created)));
        }
        // The applied spec covers every env value (a secret by fingerprint and ciphertext digest), so an
        // unchanged spec means unchanged env rows.
        let changed: Vec<(&Name, &App)> = chunk
            .iter()
            .filter(|(n, _)| written.contains_key(n.as_str()))
            .copied()
            .collect();
        // A created app has no env rows to clear (a cold apply creates every app).
        let existed: Vec<String> = written
            .iter()
            .filter(|(_, w)| **w == Written::Changed)
            .map(|(n, _)| n.clone())
            .collect();
        replace_env(conn, &changed, &existed, fingerprints).await?;
        out.extend(
            chunk
                .iter()
                .filter_map(|(n, _)| written.get(n.as_str()).copied()),
        );
    }
    Ok(out)
}

/// Writes the env rows of `apps`, first clearing those of the apps `existed` (the others have none).
async fn replace_env(
    conn: &mut PgConnection,
    apps: &[(&Name, &App)],
    existed: &[String],
    fingerprints: &Fingerprints,
) -> Result<(), StoreError> {
    if apps.is_empty() {
        return Ok(());
    }
    let mut owners = Vec::new();
    let mut keys = Vec::new();
    let mut secret = Vec::new();
    let mut values = Vec::new();
    let mut prints: Vec<Option<String>> = Vec::new();
    for (app, a) in apps {
        for (key, value) in &a.env {
            owners.push(app.as_str().to_owned());
            keys.push(key.as_str().to_owned());
            match value {
                EnvValue::Plain(v) => {
                    secret.push(false);
                    values.push(v.clone());
                    prints.push(None);
                }
                EnvValue::Secret { secret: ct } => {
                    let print = fingerprints
                        .get(&((*app).clone(), key.clone()))
                        .ok_or_else(|| StoreError::MissingFingerprint {
                            app: app.to_string(),
                            key: key.to_string(),
                        })?;
                    secret.push(true);
                    values.push(ct.as_str().to_owned());
                    prints.push(Some(print.clone()));
                }
            }
        }
    }
    if !existed.is_empty() {
        // Joined with the array: `app = ANY($1)` scans every row when the statistics are stale, as
        // they are during the apply that filled the table.
        sqlx::query(
            "DELETE FROM app_env e USING unnest($1::text[]) AS gone(app) WHERE e.app = gone.app",
        )
        .bind(existed)
        .execute(&mut *conn)
        .await
        .op("clear the apps' env")?;
    }
    sqlx::query(
        r#"INSERT INTO app_env (app, key, secret, value, fingerprint)
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::bool[], $4::text[], $5::text[])"#,
    )
    .bind(&owners)
    .bind(&keys)
    .bind(&secret)
    .bind(&values)
    .bind(&prints)
    .execute(conn)
    .await
    .op("write the apps' env")?;
    Ok(())
}

/// One stored env var: a plain value, or a secret's ciphertext and fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnv {
    pub key: String,
    /// The plain value, or the armored age ciphertext of a secret.
    pub value: String,
    /// `Some` exactly for a secret.
    pub fingerprint: Option<String>,
}

/// An app's env as applied, by key (what a deploy re-encrypts for its node).
pub async fn app_env(conn: &mut PgConnection, app: &Name) -> Result<Vec<StoredEnv>, StoreError> {
    let rows = sqlx::query!(
        "SELECT key, value, fingerprint FROM app_env WHERE app = $1 ORDER BY key",
        app.as_str()
    )
    .fetch_all(conn)
    .await
    .op("read an app's env")?;
    Ok(rows
        .into_iter()
        .map(|r| StoredEnv {
            key: r.key,
            value: r.value,
            fingerprint: r.fingerprint,
        })
        .collect())
}

/// Writes a notification sink: its URL and signing secret as the manifest's ciphertexts, its spec as the
/// planner compares it ([`AppliedSink`]: digests, no secret).
pub async fn upsert_sink(
    conn: &mut PgConnection,
    name: &Name,
    sink: &cairn_schema::Sink,
    generation: Generation,
) -> Result<(), StoreError> {
    let spec = serde_json::to_value(AppliedSink::from_desired(sink)).expect("a sink serializes");
    sqlx::query(
        "INSERT INTO notify_sinks (name, kind, url_sealed, signing_sealed, spec, generation)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (name) DO UPDATE SET
             kind = EXCLUDED.kind, url_sealed = EXCLUDED.url_sealed,
             signing_sealed = EXCLUDED.signing_sealed, spec = EXCLUDED.spec,
             generation = EXCLUDED.generation, updated_at = now()",
    )
    .bind(name.as_str())
    .bind(sink.kind.as_str())
    .bind(sink.url.secret.as_str())
    .bind(sink.signing_secret.as_ref().map(|s| s.secret.as_str()))
    .bind(spec)
    .bind(to_i64("generation", generation)?)
    .execute(conn)
    .await
    .op("write a notification sink")?;
    Ok(())
}

/// Deletes resources of one kind. Deleting an app deletes its env and placements with it (its releases,
/// source head and restart requests stay: history and operator state).
pub async fn delete_resources(
    conn: &mut PgConnection,
    kind: Kind,
    names: &[Name],
) -> Result<u64, StoreError> {
    let names: Vec<String> = names.iter().map(|n| n.as_str().to_owned()).collect();
    let result = match kind {
        Kind::Plan => {
            sqlx::query!("DELETE FROM plans WHERE name = ANY($1)", &names)
                .execute(conn)
                .await
        }
        Kind::Runtime => {
            sqlx::query!("DELETE FROM runtimes WHERE name = ANY($1)", &names)
                .execute(conn)
                .await
        }
        Kind::Node => {
            sqlx::query!("DELETE FROM nodes WHERE name = ANY($1)", &names)
                .execute(conn)
                .await
        }
        Kind::App => {
            sqlx::query!("DELETE FROM apps WHERE name = ANY($1)", &names)
                .execute(conn)
                .await
        }
        // Written whole by `store::databases::write`.
        Kind::Database => return Ok(0),
        Kind::Notify => {
            sqlx::query("DELETE FROM notify_sinks WHERE name = ANY($1)")
                .bind(&names)
                .execute(conn)
                .await
        }
    };
    Ok(result.op("delete resources")?.rows_affected())
}

/// Makes the stored placements exactly `placements`: rows not listed are deleted, listed ones inserted
/// or updated when they differ (an unchanged row keeps its `updated_at`).
pub async fn replace_placements(
    conn: &mut PgConnection,
    placements: &[ReplicaPlacement],
) -> Result<(), StoreError> {
    let keep = Columns::of(placements.iter())?;
    sqlx::query!(
        r#"DELETE FROM placements p
           WHERE NOT EXISTS (
               SELECT 1 FROM UNNEST($1::text[], $2::int[]) AS keep(app, slot)
               WHERE keep.app = p.app AND keep.slot = p.slot)"#,
        &keep.apps,
        &keep.slots,
    )
    .execute(&mut *conn)
    .await
    .op("delete placements")?;
    upsert_placements(conn, &keep).await
}

/// Writes what `plan` changes of the placements it was planned from: the rows of its generation (new,
/// moved, redeployed, restarted, stopped), and the slots it removes (a placement change without a `to`
/// whose slot it does not keep). Under the apply lock, with the observed state read in the same
/// transaction, the stored placements become exactly [`Plan::placements`] (the executor's contract in
/// `cairn_plan`), without sending the rows that stay as they are: a one-app commit among 100,000 apps
/// writes that app's rows, not 200,000.
pub async fn write_placement_changes(
    conn: &mut PgConnection,
    plan: &cairn_plan::Plan,
) -> Result<(), StoreError> {
    let kept = |app: &Name, slot: u32| {
        plan.placements
            .binary_search_by(|p| (&p.app, p.slot).cmp(&(app, slot)))
            .is_ok()
    };
    let (mut apps, mut slots) = (Vec::new(), Vec::new());
    for c in &plan.placement_changes {
        if c.to.is_none() && !kept(&c.app, c.slot) {
            apps.push(c.app.as_str().to_owned());
            slots.push(to_i32("slot", u64::from(c.slot))?);
        }
    }
    if !apps.is_empty() {
        sqlx::query(
            "DELETE FROM placements p USING UNNEST($1::text[], $2::int[]) AS gone(app, slot)
             WHERE p.app = gone.app AND p.slot = gone.slot",
        )
        .bind(&apps)
        .bind(&slots)
        .execute(&mut *conn)
        .await
        .op("delete placements")?;
    }
    let changed = Columns::of(
        plan.placements
            .iter()
            .filter(|p| p.generation == plan.generation),
    )?;
    if changed.apps.is_empty() {
        return Ok(());
    }
    upsert_placements(conn, &changed).await
}

/// Placements as the columns `UNNEST` reads.
struct Columns {
    apps: Vec<String>,
    slots: Vec<i32>,
    nodes: Vec<String>,
    releases: Vec<i64>,
    states: Vec<String>,
    generations: Vec<i64>,
    restarts: Vec<i64>,
}

impl Columns {
    fn of<'a>(placements: impl Iterator<Item = &'a ReplicaPlacement>) -> Result<Self, StoreError> {
        let mut c = Columns {
            apps: Vec::new(),
            slots: Vec::new(),
            nodes: Vec::new(),
            releases: Vec::new(),
            states: Vec::new(),
            generations: Vec::new(),
            restarts: Vec::new(),
        };
        for p in placements {
            c.apps.push(p.app.as_str().to_owned());
            c.slots.push(to_i32("slot", u64::from(p.slot))?);
            c.nodes.push(p.node.as_str().to_owned());
            c.releases.push(to_i64("release", p.release)?);
            c.states.push(replica_state_str(p.state).to_owned());
            c.generations.push(to_i64("generation", p.generation)?);
            c.restarts.push(to_i64("restart", p.restart)?);
        }
        Ok(c)
    }
}

/// Inserts the placements, or updates the stored ones that differ (an unchanged row keeps its
/// `updated_at`).
async fn upsert_placements(conn: &mut PgConnection, c: &Columns) -> Result<(), StoreError> {
    sqlx::query!(
        r#"INSERT INTO placements (app, slot, node, release, state, generation, restart)
           SELECT * FROM UNNEST($1::text[], $2::int[], $3::text[], $4::bigint[], $5::text[],
                                $6::bigint[], $7::bigint[])
           ON CONFLICT (app, slot) DO UPDATE SET
               node = EXCLUDED.node, release = EXCLUDED.release, state = EXCLUDED.state,
               generation = EXCLUDED.generation, restart = EXCLUDED.restart, updated_at = now()
           WHERE (placements.node, placements.release, placements.state, placements.generation,
                  placements.restart)
                 IS DISTINCT FROM (EXCLUDED.node, EXCLUDED.release, EXCLUDED.state,
                                   EXCLUDED.generation, EXCLUDED.restart)"#,
        &c.apps,
        &c.slots,
        &c.nodes,
        &c.releases,
        &c.states,
        &c.generations,
        &c.restarts,
    )
    .execute(conn)
    .await
    .op("write placements")?;
    Ok(())
}

/// A release to record.
#[derive(Debug, Clone)]
pub struct ReleaseInsert<'a> {
    pub app: &'a Name,
    pub number: ReleaseNumber,
    pub config_commit: &'a CommitId,
    pub config_generation: Generation,
    pub source_commit: &'a CommitId,
    /// What it runs with (`plan::ReleaseSpec`: fingerprints, never secret values).
    pub spec: serde_json::Value,
    pub spec_hash: &'a str,
    /// Its source commit and build recipe (`cairn_proto::build`): releases that share it share an image.
    pub build_key: &'a str,
}

/// Records a new release. A release number is never reused: recording one that exists is an error.
pub async fn insert_release(
    conn: &mut PgConnection,
    r: &ReleaseInsert<'_>,
) -> Result<(), StoreError> {
    insert_releases(conn, std::slice::from_ref(r)).await
}

/// Records new releases as [`insert_release`] does, a batch per statement.
pub async fn insert_releases(
    conn: &mut PgConnection,
    releases: &[ReleaseInsert<'_>],
) -> Result<(), StoreError> {
    for chunk in releases.chunks(BATCH) {
        let mut apps = Vec::with_capacity(chunk.len());
        let mut numbers = Vec::with_capacity(chunk.len());
        let mut config_commits = Vec::with_capacity(chunk.len());
        let mut generations = Vec::with_capacity(chunk.len());
        let mut source_commits = Vec::with_capacity(chunk.len());
        let mut specs = Vec::with_capacity(chunk.len());
        let mut hashes = Vec::with_capacity(chunk.len());
        let mut build_keys = Vec::with_capacity(chunk.len());
        for r in chunk {
            apps.push(r.app.as_str());
            numbers.push(to_i64("release", r.number)?);
            config_commits.push(r.config_commit.as_str());
            generations.push(to_i64("generation", r.config_generation)?);
            source_commits.push(r.source_commit.as_str());
            specs.push(&r.spec);
            hashes.push(r.spec_hash);
            build_keys.push(r.build_key);
        }
        // Checked at run time (no `.sqlx` data for it), as `certs.rs` does.
        sqlx::query(
            r#"INSERT INTO releases
                   (app, number, config_commit, config_generation, source_commit, spec, spec_hash,
                    build_key)
               SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::text[],
                                    $6::jsonb[], $7::text[], $8::text[])"#,
        )
        .bind(&apps)
        .bind(&numbers)
        .bind(&config_commits)
        .bind(&generations)
        .bind(&source_commits)
        .bind(&specs)
        .bind(&hashes)
        .bind(&build_keys)
        .execute(&mut *conn)
        .await
        .op("record releases")?;
    }
    Ok(())
}

/// Pins an app to a release (an operator's rollback), or lifts the pin with `None`. Returns whether the
/// app exists.
pub async fn set_rollback_pin(
    conn: &mut PgConnection,
    app: &Name,
    release: Option<ReleaseNumber>,
) -> Result<bool, StoreError> {
    let release = release.map(|r| to_i64("release", r)).transpose()?;
    let done = sqlx::query!(
        "UPDATE apps SET pinned_release = $2, updated_at = now() WHERE name = $1",
        app.as_str(),
        release,
    )
    .execute(conn)
    .await
    .op("pin an app to a release")?;
    Ok(done.rows_affected() == 1)
}

/// Counts a restart request for an app (`cairn restart APP`) and returns the new count.
pub async fn request_restart(conn: &mut PgConnection, app: &Name) -> Result<u64, StoreError> {
    let count = sqlx::query_scalar!(
        r#"INSERT INTO restart_requests (app, count) VALUES ($1, 1)
           ON CONFLICT (app) DO UPDATE
               SET count = restart_requests.count + 1, requested_at = now()
           RETURNING count"#,
        app.as_str(),
    )
    .fetch_one(conn)
    .await
    .op("request a restart")?;
    to_u64("restart_requests", "count", count)
}

/// Records the commit an app's branch points at. Returns whether it differs from the one recorded.
pub async fn record_source_head(
    pool: &PgPool,
    app: &Name,
    branch: &str,
    commit: &CommitId,
) -> Result<bool, StoreError> {
    let changed = sqlx::query_scalar!(
        r#"INSERT INTO source_heads (app, branch, commit) VALUES ($1, $2, $3)
           ON CONFLICT (app) DO UPDATE
               SET branch = EXCLUDED.branch, commit = EXCLUDED.commit, observed_at = now()
           WHERE (source_heads.branch, source_heads.commit) <> (EXCLUDED.branch, EXCLUDED.commit)
           RETURNING true AS "changed!""#,
        app.as_str(),
        branch,
        commit.as_str(),
    )
    .fetch_optional(pool)
    .await
    .op("record a source head")?;
    Ok(changed.is_some())
}

/// Records many heads (app, branch, commit) in one statement, as [`record_source_head`] does each.
/// Returns how many differ from the ones recorded (new or moved).
pub async fn record_source_heads(
    pool: &PgPool,
    heads: &[(Name, String, CommitId)],
) -> Result<u64, StoreError> {
    if heads.is_empty() {
        return Ok(0);
    }
    let apps: Vec<&str> = heads.iter().map(|(a, _, _)| a.as_str()).collect();
    let branches: Vec<&str> = heads.iter().map(|(_, b, _)| b.as_str()).collect();
    let commits: Vec<&str> = heads.iter().map(|(_, _, c)| c.as_str()).collect();
    let moved: i64 = sqlx::query_scalar(
        r#"WITH written AS (
               INSERT INTO source_heads (app, branch, commit)
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])
               ON CONFLICT (app) DO UPDATE
                   SET branch = EXCLUDED.branch, commit = EXCLUDED.commit, observed_at = now()
               WHERE (source_heads.branch, source_heads.commit) <> (EXCLUDED.branch, EXCLUDED.commit)
               RETURNING 1
           )
           SELECT count(*) FROM written"#,
    )
    .bind(&apps)
    .bind(&branches)
    .bind(&commits)
    .fetch_one(pool)
    .await
    .op("record source heads")?;
    Ok(u64::try_from(moved).unwrap_or(0))
}

/// The branch each recorded source head was read from, by app. A head read from another branch than
/// the one the app follows now is stale.
pub async fn source_head_branches(pool: &PgPool) -> Result<BTreeMap<Name, String>, StoreError> {
    let mut out = BTreeMap::new();
    for r in sqlx::query!("SELECT app, branch FROM source_heads")
        .fetch_all(pool)
        .await
        .op("read the branches of source heads")?
    {
        out.insert(name("source_heads", &r.app)?, r.branch);
    }
    Ok(out)
}

/// Forgets the source heads of apps (the executor prunes those of deleted apps).
pub async fn delete_source_heads(
    conn: &mut PgConnection,
    apps: &[Name],
) -> Result<u64, StoreError> {
    let apps: Vec<String> = apps.iter().map(|n| n.as_str().to_owned()).collect();
    let done = sqlx::query!("DELETE FROM source_heads WHERE app = ANY($1)", &apps)
        .execute(conn)
        .await
        .op("delete source heads")?;
    Ok(done.rows_affected())
}

/// Reads the whole applied state in one consistent snapshot (a read-only repeatable-read transaction).
pub async fn load_observed(pool: &PgPool) -> Result<Observed, StoreError> {
    let mut tx = pool.begin().await.op("begin a snapshot")?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .op("begin a snapshot")?;
    let observed = load_observed_in(&mut tx).await?;
    tx.commit().await.op("end a snapshot")?;
    Ok(observed)
}

/// Reads the whole applied state through the caller's connection (in the apply transaction, say).
pub async fn load_observed_in(conn: &mut PgConnection) -> Result<Observed, StoreError> {
    let mut observed = load_shared_in(&mut *conn).await?;
    load_apps_in(&mut *conn, &mut observed, None).await?;
    Ok(observed)
}

/// The applied state one control plane keeps between its reconciles, so that a reconcile reads again
/// only the apps whose rows changed ([`read_observed_in`]) rather than every app's: at 100,000 apps
/// the whole read is seconds, a commit's few apps a few milliseconds.
///
/// It holds the state as read by the apply transaction that consumed the marks last
/// ([`super::changes::Marks::count`]); a reconcile that fails before it commits leaves it empty.
#[derive(Debug, Default)]
pub struct KeptObserved {
    kept: std::sync::Mutex<Option<(u64, Observed)>>,
    whole: std::sync::atomic::AtomicU64,
    partial: std::sync::atomic::AtomicU64,
}

/// How a [`KeptObserved`]'s reads went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    /// Reads of the whole state.
    pub whole: u64,
    /// Reads of only the apps marked (and what every app reads).
    pub partial: u64,
}

impl KeptObserved {
    pub fn new() -> Self {
        KeptObserved::default()
    }

    /// Takes the state kept if it is as of consumption `count - 1`.
    fn take_after(&self, count: u64) -> Option<Observed> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        match kept.take() {
            Some((c, o)) if c.checked_add(1) == Some(count) => Some(o),
            _ => None,
        }
    }

    /// Keeps `observed`, read after consumption `count`, for the next reconcile.
    pub fn keep(&self, count: u64, observed: Observed) {
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = Some((count, observed));
    }

    /// A copy of the state kept, if any: as the last apply read it, before it wrote.
    pub fn get(&self) -> Option<Observed> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.as_ref().map(|(_, o)| o.clone())
    }

    pub fn reads(&self) -> Reads {
        use std::sync::atomic::Ordering::Relaxed;
        Reads {
            whole: self.whole.load(Relaxed),
            partial: self.partial.load(Relaxed),
        }
    }
}

/// Reads the applied state in the apply transaction, after it consumed `marks`: into what `kept` holds
/// when that is the state as of the consumption before, reading again only the apps marked (and what
/// every app reads, whole); otherwise everything. Says which (`true`: only the marked apps were read
/// again). Debug builds check the result against a full read whenever no change was committed in
/// between.
pub async fn read_observed_in(
    conn: &mut PgConnection,
    marks: &super::changes::Marks,
    kept: Option<&KeptObserved>,
) -> Result<(Observed, bool), StoreError> {
    use std::sync::atomic::Ordering::Relaxed;
    let before = match kept.and_then(|k| k.take_after(marks.count)) {
        Some(o) if !marks.every_app => o,
        _ => {
            if let Some(k) = kept {
                k.whole.fetch_add(1, Relaxed);
            }
            return Ok((load_observed_in(conn).await?, false));
        }
    };
    if let Some(k) = kept {
        k.partial.fetch_add(1, Relaxed);
    }
    let mut observed = load_shared_in(&mut *conn).await?;
    observed.apps = before.apps;
    observed.rollback_pins = before.rollback_pins;
    observed.placements = before.placements;
    observed.releases = before.releases;
    observed.source_heads = before.source_heads;
    observed.restart_requests = before.restart_requests;
    if !marks.apps.is_empty() {
        for app in &marks.apps {
            observed.apps.remove(app);
            observed.rollback_pins.remove(app);
            observed.releases.remove(app);
            observed.source_heads.remove(app);
            observed.restart_requests.remove(app);
        }
        let only: Vec<String> = marks.apps.iter().map(|a| a.as_str().to_owned()).collect();
        let mut fresh = Observed::default();
        load_apps_in(&mut *conn, &mut fresh, Some(&only)).await?;
        observed.apps.extend(fresh.apps);
        observed.rollback_pins.extend(fresh.rollback_pins);
        observed.releases.extend(fresh.releases);
        observed.source_heads.extend(fresh.source_heads);
        observed.restart_requests.extend(fresh.restart_requests);
        // Into their places: a sort of every row would cost more than the read.
        let marked: BTreeSet<&Name> = marks.apps.iter().collect();
        cairn_plan::observed::replace_replicas(&mut observed.placements, &marked, fresh.placements);
    }
    #[cfg(debug_assertions)]
    check_kept(&mut *conn, &observed).await?;
    Ok((observed, true))
}

/// Panics when the apps' rows read incrementally differ from a full read, unless a change was committed
/// since the marks were consumed (then the two reads may both be right).
#[cfg(debug_assertions)]
async fn check_kept(conn: &mut PgConnection, kept: &Observed) -> Result<(), StoreError> {
    let mut full = Observed::default();
    load_apps_in(&mut *conn, &mut full, None).await?;
    if super::changes::marked(&mut *conn).await? {
        return Ok(());
    }
    let parts = |o: &Observed| {
        (
            o.apps.clone(),
            o.rollback_pins.clone(),
            o.placements.clone(),
            o.releases.clone(),
            o.source_heads.clone(),
            o.restart_requests.clone(),
        )
    };
    assert!(
        parts(kept) == parts(&full),
        "the observed state kept between reconciles differs from a full read:\nkept: {:?}\nfull: {:?}",
        parts(kept),
        parts(&full)
    );
    Ok(())
}

/// Reads what every app's plan reads (the settings, plans, runtimes, nodes and their status, databases,
/// sinks, certificates): everything but the apps' own rows ([`load_apps_in`]).
async fn load_shared_in(conn: &mut PgConnection) -> Result<Observed, StoreError> {
    let config = config_state(&mut *conn).await?;
    let mut observed = Observed {
        generation: config.generation,
        applied_commit: config.commit,
        currency: config.settings.as_ref().map(|s| s.currency.clone()),
        base_domain: config.settings.map(|s| s.base_domain),
        ..Observed::default()
    };

    for r in sqlx::query!("SELECT name, spec FROM plans")
        .fetch_all(&mut *conn)
        .await
        .op("read plans")?
    {
        observed
            .plans
            .insert(name("plans", &r.name)?, json("plans", "spec", r.spec)?);
    }
    for r in sqlx::query!("SELECT name, spec FROM runtimes")
        .fetch_all(&mut *conn)
        .await
        .op("read runtimes")?
    {
        observed.runtimes.insert(
            name("runtimes", &r.name)?,
            json("runtimes", "spec", r.spec)?,
        );
    }
    for r in sqlx::query!("SELECT name, spec FROM nodes")
        .fetch_all(&mut *conn)
        .await
        .op("read nodes")?
    {
        observed
            .nodes
            .insert(name("nodes", &r.name)?, json("nodes", "spec", r.spec)?);
    }
    observed.databases = super::databases::load(&mut *conn).await?;
    observed.database_ports = super::databases::instance_ports(&mut *conn).await?;
    for r in sqlx::query("SELECT name, spec FROM notify_sinks")
        .fetch_all(&mut *conn)
        .await
        .op("read notification sinks")?
    {
        use sqlx::Row as _;
        let (n, spec): (String, serde_json::Value) = (
            r.try_get("name").op("read notification sinks")?,
            r.try_get("spec").op("read notification sinks")?,
        );
        observed.notify.insert(
            name("notify_sinks", &n)?,
            json("notify_sinks", "spec", spec)?,
        );
    }
    for r in sqlx::query!("SELECT node, state, last_heartbeat, drivers, recipient FROM node_status")
        .fetch_all(&mut *conn)
        .await
        .op("read node status")?
    {
        let status = NodeStatus {
            state: node_state(&r.state)?,
            last_heartbeat: r.last_heartbeat,
            drivers: drivers(&r.drivers)?,
            recipient: recipient("node_status", r.recipient)?,
        };
        observed
            .node_status
            .insert(name("node_status", &r.node)?, status);
    }

    observed.certificates = super::certs::observed_in(&mut *conn).await?;
    Ok(observed)
}

/// The rows a statement of [`load_apps_in`] reads, given the apps it reads when it reads some.
async fn fetch_rows(
    conn: &mut PgConnection,
    sql: &str,
    only: Option<&[String]>,
    op: &'static str,
) -> Result<Vec<sqlx::postgres::PgRow>, StoreError> {
    let q = sqlx::query(sql);
    let q = match only {
        Some(apps) => q.bind(apps.to_vec()),
        None => q,
    };
    q.fetch_all(conn).await.op(op)
}

/// Reads the apps' own rows (applied spec and rollback pin, placements, latest release, source head,
/// restart requests) into `observed`: every app's, or only those of `only`.
async fn load_apps_in(
    conn: &mut PgConnection,
    observed: &mut Observed,
    only: Option<&[String]>,
) -> Result<(), StoreError> {
    use sqlx::Row as _;
    // The table, or its rows of the apps given: a join with the array, whose generic plan (what a
    // prepared statement settles on after five runs) walks the primary key per app, where
    // `WHERE app = ANY($1)` settled on scanning every row (100 ms at 100,000 apps).
    let from = |table: &str, column: &str| match only {
        Some(_) => format!(
            "unnest($1::text[]) AS wanted(app_name) JOIN {table} ON {column} = wanted.app_name"
        ),
        None => table.to_owned(),
    };
    let sql = format!(
        "SELECT name, spec, pinned_release FROM {}",
        from("apps", "apps.name")
    );
    let rows = fetch_rows(&mut *conn, &sql, only, "read apps").await?;
    for r in rows {
        let (n, spec, pin): (String, serde_json::Value, Option<i64>) = (
            r.try_get("name").op("read apps")?,
            r.try_get("spec").op("read apps")?,
            r.try_get("pinned_release").op("read apps")?,
        );
        let app = name("apps", &n)?;
        if let Some(pin) = pin {
            observed
                .rollback_pins
                .insert(app.clone(), to_u64("apps", "pinned_release", pin)?);
        }
        observed.apps.insert(app, json("apps", "spec", spec)?);
    }

    let sql = format!(
        "SELECT app, slot, node, release, state, generation, restart FROM {}",
        from("placements", "placements.app")
    );
    let rows = fetch_rows(&mut *conn, &sql, only, "read placements").await?;
    for r in rows {
        let row = |c: &str| -> Result<i64, StoreError> { r.try_get(c).op("read placements") };
        let text = |c: &str| -> Result<String, StoreError> { r.try_get(c).op("read placements") };
        let slot: i32 = r.try_get("slot").op("read placements")?;
        observed.placements.push(ReplicaPlacement {
            app: name("placements", &text("app")?)?,
            slot: super::decode::slot("placements", slot)?,
            node: name("placements", &text("node")?)?,
            release: to_u64("placements", "release", row("release")?)?,
            state: replica_state(&text("state")?)?,
            generation: to_u64("placements", "generation", row("generation")?)?,
            restart: to_u64("placements", "restart", row("restart")?)?,
        });
    }
    // In the names' own order, whatever the database's collation.
    observed
        .placements
        .sort_by(|a, b| (&a.app, a.slot).cmp(&(&b.app, b.slot)));

    let sql = format!(
        "SELECT DISTINCT ON (app) app, number, config_commit, source_commit, spec_hash,
                status = 'failed' AS failed,
                (SELECT max(l.number) FROM releases l
                  WHERE l.app = r.app AND l.number < r.number AND l.status = 'live') AS fallback
         FROM {} ORDER BY app, number DESC",
        from("releases r", "r.app")
    );
    let rows = fetch_rows(&mut *conn, &sql, only, "read the latest releases").await?;
    for r in rows {
        let get =
            |c: &str| -> Result<String, StoreError> { r.try_get(c).op("read the latest releases") };
        let number: i64 = r.try_get("number").op("read the latest releases")?;
        let fallback: Option<i64> = r.try_get("fallback").op("read the latest releases")?;
        observed.releases.insert(
            name("releases", &get("app")?)?,
            ReleaseRecord {
                number: to_u64("releases", "number", number)?,
                config_commit: CommitId::new(get("config_commit")?),
                source_commit: CommitId::new(get("source_commit")?),
                spec_hash: get("spec_hash")?,
                failed: r.try_get("failed").op("read the latest releases")?,
                fallback: fallback
                    .map(|n| to_u64("releases", "number", n))
                    .transpose()?,
            },
        );
    }

    let sql = format!(
        "SELECT app, commit FROM {}",
        from("source_heads", "source_heads.app")
    );
    let rows = fetch_rows(&mut *conn, &sql, only, "read source heads").await?;
    for r in rows {
        let (app, commit): (String, String) = (
            r.try_get("app").op("read source heads")?,
            r.try_get("commit").op("read source heads")?,
        );
        observed
            .source_heads
            .insert(name("source_heads", &app)?, CommitId::new(commit));
    }
    let sql = format!(
        "SELECT app, count FROM {}",
        from("restart_requests", "restart_requests.app")
    );
    let rows = fetch_rows(&mut *conn, &sql, only, "read restart requests").await?;
    for r in rows {
        let (app, count): (String, i64) = (
            r.try_get("app").op("read restart requests")?,
            r.try_get("count").op("read restart requests")?,
        );
        observed.restart_requests.insert(
            name("restart_requests", &app)?,
            to_u64("restart_requests", "count", count)?,
        );
    }
    Ok(())
}

/// A resource's `spec` column and its `spec_hash`: the hash of exactly the JSON written.
fn spec_of(value: &impl Serialize) -> (serde_json::Value, String) {
    let bytes = serde_json::to_vec(value).expect("resource specs serialize");
    let hash = sha256_tagged(&bytes);
    (
        serde_json::from_slice(&bytes).expect("serialized JSON parses"),
        hash,
    )
}

fn to_json(value: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).expect("stored values serialize")
}

/// An app as applied (`apps.spec`), if it is.
pub async fn applied_app(
    conn: &mut PgConnection,
    app: &Name,
) -> Result<Option<AppliedApp>, StoreError> {
    let spec = sqlx::query_scalar!("SELECT spec FROM apps WHERE name = $1", app.as_str())
        .fetch_optional(conn)
        .await
        .op("read an applied app")?;
    spec.map(|v| json("apps", "spec", v)).transpose()
}
