//! Release history and what operators do with it: the releases of an app, rollback pins as operators set
//! them, the build output kept with a release, the replicas' output agents ship, and the retention that
//! prunes both (the statements behind [`crate::releases`]); a release as recorded, for a task that deploys
//! it again; the outcome of a release's deploys ([`finish_release`]) and its image distribution, shared by
//! the releases of one build key ([`ImageKey`]).
//!
//! What it must not do: decide whether a rollback is allowed (the caller does), or keep more output than
//! the retention and the per-app window allow once the prune has run.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use cairn_schema::Name;

use super::decode::corrupt;
use super::{Op as _, StoreError, to_i64, to_u64};
use cairn_plan::observed::AppliedApp;

/// An app as the operator commands see it: its applied form and its rollback pin.
#[derive(Debug, Clone, PartialEq)]
pub struct AppRow {
    pub applied: AppliedApp,
    pub pinned_release: Option<u64>,
}

/// The applied app `app`, or `None` when it is not in the applied configuration. `FOR UPDATE` when
/// `lock` (a rollback holds the row while it decides).
pub async fn app(
    conn: &mut PgConnection,
    app: &Name,
    lock: bool,
) -> Result<Option<AppRow>, StoreError> {
    let row = if lock {
        sqlx::query!(
            "SELECT spec, pinned_release FROM apps WHERE name = $1 FOR UPDATE",
            app.as_str()
        )
        .fetch_optional(conn)
        .await
        .op("read an app")?
        .map(|r| (r.spec, r.pinned_release))
    } else {
        sqlx::query!(
            "SELECT spec, pinned_release FROM apps WHERE name = $1",
            app.as_str()
        )
        .fetch_optional(conn)
        .await
        .op("read an app")?
        .map(|r| (r.spec, r.pinned_release))
    };
    let Some((spec, pin)) = row else {
        return Ok(None);
    };
    Ok(Some(AppRow {
        applied: serde_json::from_value(spec).map_err(|e| corrupt("apps", "spec", e))?,
        pinned_release: pin
            .map(|p| to_u64("apps", "pinned_release", p))
            .transpose()?,
    }))
}

/// One row of `releases`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseRow {
    pub number: u64,
    pub config_commit: String,
    pub config_generation: u64,
    pub source_commit: String,
    /// `plan::ReleaseSpec` as JSON.
    pub spec: serde_json::Value,
    pub image: Option<String>,
    pub image_digest: Option<String>,
    pub status: String,
    pub error: Option<String>,
    pub stage_timings: BTreeMap<String, u64>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The releases of `app`, newest first; `number` alone when given.
pub async fn releases(
    conn: &mut PgConnection,
    app: &Name,
    number: Option<u64>,
    limit: u32,
) -> Result<Vec<ReleaseRow>, StoreError> {
    let number = number.map(|n| to_i64("release", n)).transpose()?;
    let rows = sqlx::query!(
        r#"SELECT number, config_commit, config_generation, source_commit, spec, image, image_digest,
                  status, error, stage_timings, created_at, finished_at
           FROM releases WHERE app = $1 AND ($2::bigint IS NULL OR number = $2)
           ORDER BY number DESC LIMIT $3"#,
        app.as_str(),
        number,
        i64::from(limit),
    )
    .fetch_all(conn)
    .await
    .op("read an app's releases")?;
    rows.into_iter()
        .map(|r| {
            Ok(ReleaseRow {
                number: to_u64("releases", "number", r.number)?,
                config_commit: r.config_commit,
                config_generation: to_u64("releases", "config_generation", r.config_generation)?,
                source_commit: r.source_commit,
                spec: r.spec,
                image: r.image,
                image_digest: r.image_digest,
                status: r.status,
                error: r.error,
                stage_timings: serde_json::from_value(r.stage_timings)
                    .map_err(|e| corrupt("releases", "stage_timings", e))?,
                created_at: r.created_at,
                finished_at: r.finished_at,
            })
        })
        .collect()
}

/// Records the image release `release` of `app` runs: a registry `reference` with its `digest`, or the
/// engine's image id (kept only while nothing better is known). The first digest pushed to a repository
/// stays (other nodes were told to pull it); a digest in another repository (serve's registry changed)
/// replaces it.
pub async fn record_image(
    conn: impl sqlx::PgExecutor<'_>,
    app: &Name,
    release: u64,
    reference: &str,
    digest: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query!(
        r#"UPDATE releases SET image = $3, image_digest = $4
           WHERE app = $1 AND number = $2
             AND (image IS NULL
                  OR ($4::text IS NOT NULL AND (image_digest IS NULL OR image <> $3)))"#,
        app.as_str(),
        to_i64("release", release)?,
        reference,
        digest,
    )
    .execute(conn)
    .await
    .op("record a release's image")?;
    Ok(())
}

/// What a release shares its image with: the other releases of `app` with its build key (its source
/// commit and recipe), or none when it has no key (recorded before build keys). The statements below
/// take it whole, so every question about "the image" asks it of the same releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageKey {
    pub app: Name,
    pub release: u64,
    pub build_key: Option<String>,
}

impl ImageKey {
    /// The key of release `release` of `app`, as recorded.
    pub async fn of(
        conn: &mut PgConnection,
        app: &Name,
        release: u64,
    ) -> Result<ImageKey, StoreError> {
        let build_key: Option<Option<String>> =
            sqlx::query_scalar("SELECT build_key FROM releases WHERE app = $1 AND number = $2")
                .bind(app.as_str())
                .bind(to_i64("release", release)?)
                .fetch_optional(conn)
                .await
                .op("read a release's build key")?;
        Ok(ImageKey {
            app: app.clone(),
            release,
            build_key: build_key.flatten(),
        })
    }

    /// What the advisory lock is taken on: the build key, else the release alone.
    fn lock_name(&self) -> String {
        match &self.build_key {
            Some(k) => format!("cairn-image:{}:{k}", self.app),
            None => format!("cairn-image:{}:r{}", self.app, self.release),
        }
    }
}

/// The SQL condition on a `releases` row's `number` (`$col`) for the releases sharing the image of
/// [`ImageKey`] bound as `$1` (app), `$2` (release), `$3` (build key or NULL).
fn sharing(col: &str) -> String {
    format!(
        "({col} = $2 OR ($3::text IS NOT NULL AND {col} IN \
           (SELECT number FROM releases WHERE app = $1 AND build_key = $3)))"
    )
}

/// Who has the image of a release (and of every release sharing its build key), as a node leasing one
/// of its deploys needs to know when images are distributed through a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHolders {
    /// The registry reference and digest recorded once a node pushed the image (for this release or
    /// another of its build key).
    pub pushed: Option<(String, String)>,
    /// Whether the leasing node offers the Docker driver (only Docker images are pushed and pulled).
    pub docker: bool,
    /// Another node that holds a lease on a task of one of the releases told to push the image: it is
    /// getting the image now.
    pub pusher: Option<String>,
}

/// Locks the image distribution of `key` (a build key of an app, or a release without one) for the
/// rest of the transaction `tx`: who gets to push it, its recorded image, and waking the deploys that
/// wait for it change under this lock only, so two nodes leasing at once (deploys of one release or of
/// two releases of the key) never both push, and a push recorded while a deploy is being held still
/// wakes it.
pub async fn lock_image(tx: &mut PgConnection, key: &ImageKey) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key.lock_name())
        .execute(&mut *tx)
        .await
        .op("lock an image's distribution")?;
    Ok(())
}

/// Who has the image of `key`, for node `node`, in `repository` (the app's repository in serve's
/// registry: a digest recorded in another one is not handed out). Call under [`lock_image`].
pub async fn image_holders(
    tx: &mut PgConnection,
    key: &ImageKey,
    node: &Name,
    repository: &str,
) -> Result<ImageHolders, StoreError> {
    let sql = format!(
        r#"WITH pushed AS (
               SELECT image, image_digest FROM releases
               WHERE app = $1 AND {releases} AND image_digest IS NOT NULL AND image = $5
               ORDER BY number DESC LIMIT 1
           )
           SELECT (SELECT image FROM pushed) AS image,
                  (SELECT image_digest FROM pushed) AS digest,
                  coalesce((SELECT 'docker' = ANY (drivers) FROM node_status WHERE node = $4), false)
                      AS docker,
                  (SELECT node FROM tasks
                   WHERE app = $1 AND {tasks} AND status = 'leased' AND node <> $4
                     AND lease_expires_at > now() AND payload ? 'push_to'
                   ORDER BY id LIMIT 1) AS pusher"#,
        releases = sharing("number"),
        tasks = sharing("release"),
    );
    let (image, digest, docker, pusher): (Option<String>, Option<String>, bool, Option<String>) =
        sqlx::query_as(&sql)
            .bind(key.app.as_str())
            .bind(to_i64("release", key.release)?)
            .bind(key.build_key.as_deref())
            .bind(node.as_str())
            .bind(repository)
            .fetch_one(&mut *tx)
            .await
            .op("read who has an image")?;
    Ok(ImageHolders {
        pushed: image.zip(digest),
        docker,
        pusher,
    })
}

/// Makes the queued tasks of the releases sharing `key`'s image that wait for it due now, and wakes
/// their nodes' long-polls (at commit). Returns how many. Call under [`lock_image`].
pub async fn wake_image_waiters(tx: &mut PgConnection, key: &ImageKey) -> Result<u64, StoreError> {
    let sql = format!(
        r#"WITH woken AS (
               UPDATE tasks SET run_after = now(), updated_at = now()
               WHERE app = $1 AND {tasks} AND status = 'queued' AND run_after > now()
               RETURNING node
           )
           SELECT n.node FROM (SELECT DISTINCT node FROM woken) n,
                  LATERAL (SELECT pg_notify('cairn_tasks', n.node)) AS notified"#,
        tasks = sharing("release"),
    );
    let woken: Vec<String> = sqlx::query_scalar(&sql)
        .bind(key.app.as_str())
        .bind(to_i64("release", key.release)?)
        .bind(key.build_key.as_deref())
        .fetch_all(&mut *tx)
        .await
        .op("wake the tasks waiting for an image")?;
    Ok(woken.len() as u64)
}

/// `(slot, node, release, state)` of every placement of `app`, by slot.
pub async fn placements(
    conn: &mut PgConnection,
    app: &Name,
) -> Result<Vec<(u32, String, u64, String)>, StoreError> {
    let rows = sqlx::query!(
        "SELECT slot, node, release, state FROM placements WHERE app = $1 ORDER BY slot",
        app.as_str()
    )
    .fetch_all(conn)
    .await
    .op("read an app's placements")?;
    rows.into_iter()
        .map(|r| {
            Ok((
                u32::try_from(r.slot).map_err(|e| corrupt("placements", "slot", e))?,
                r.node,
                to_u64("placements", "release", r.release)?,
                r.state,
            ))
        })
        .collect()
}

/// A line of output kept in Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRow {
    /// The row's id (replica lines: the follow cursor) or the task's (build lines).
    pub id: i64,
    pub node: String,
    pub slot: Option<u32>,
    pub release: u64,
    pub stream: String,
    pub line: String,
    pub at: DateTime<Utc>,
}

/// The most build lines one answer carries (a task keeps at most 10,000 by default).
pub const MAX_BUILD_LINES: i64 = 50_000;

/// What the deploy tasks of release `release` of `app` logged about its build (streams `build` and
/// `agent`), task by task, in order.
pub async fn build_logs(
    conn: &mut PgConnection,
    app: &Name,
    release: u64,
) -> Result<Vec<OutputRow>, StoreError> {
    let rows = sqlx::query!(
        r#"SELECT t.id, t.node, t.slot, l.stream, l.line, l.at
           FROM tasks t JOIN task_logs l ON l.task = t.id
           WHERE t.app = $1 AND t.release = $2 AND t.kind = 'deploy'
             AND l.stream IN ('build', 'agent')
           ORDER BY t.id, l.seq
           LIMIT $3"#,
        app.as_str(),
        to_i64("release", release)?,
        MAX_BUILD_LINES,
    )
    .fetch_all(conn)
    .await
    .op("read a release's build output")?;
    rows.into_iter()
        .map(|r| {
            Ok(OutputRow {
                id: r.id,
                node: r.node,
                slot: r
                    .slot
                    .map(|s| u32::try_from(s).map_err(|e| corrupt("tasks", "slot", e)))
                    .transpose()?,
                release,
                stream: r.stream,
                line: r.line,
                at: r.at,
            })
        })
        .collect()
}

/// A build line and its place in its task's output, for a follower's cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildLine {
    pub task: i64,
    pub seq: i32,
    pub node: String,
    pub slot: Option<u32>,
    pub stream: String,
    pub line: String,
    pub at: DateTime<Utc>,
}

/// The build output of release `release` of `app` that a follower has not seen: of each deploy task,
/// the lines after the `seq` the cursor names for it (all of a task it does not name), in task and
/// sequence order, at most `limit`. Each task's lines are appended in sequence order, one batch per
/// statement, so a line committed later always has a larger `seq` than those a reader saw: nothing is
/// skipped, whichever of a release's tasks writes first.
///
/// Runtime-checked (added after the offline query data).
pub async fn build_lines_after(
    pool: &PgPool,
    app: &Name,
    release: u64,
    cursor: &[(i64, i32)],
    limit: i64,
) -> Result<Vec<BuildLine>, StoreError> {
    type Row = (i64, i32, String, Option<i32>, String, String, DateTime<Utc>);
    let (tasks, seqs): (Vec<i64>, Vec<i32>) = cursor.iter().copied().unzip();
    let rows: Vec<Row> = sqlx::query_as(
        r#"SELECT t.id, l.seq, t.node, t.slot, l.stream, l.line, l.at
           FROM tasks t JOIN task_logs l ON l.task = t.id
           WHERE t.app = $1 AND t.release = $2 AND t.kind = 'deploy'
             AND l.stream IN ('build', 'agent')
             AND l.seq > COALESCE(
                   (SELECT c.seq FROM unnest($3::bigint[], $4::int[]) AS c(task, seq) WHERE c.task = t.id),
                   -1)
           ORDER BY t.id, l.seq
           LIMIT $5"#,
    )
    .bind(app.as_str())
    .bind(to_i64("release", release)?)
    .bind(&tasks)
    .bind(&seqs)
    .bind(limit)
    .fetch_all(pool)
    .await
    .op("read a release's new build output")?;
    rows.into_iter()
        .map(|(task, seq, node, slot, stream, line, at)| {
            Ok(BuildLine {
                task,
                seq,
                node,
                slot: slot
                    .map(|s| u32::try_from(s).map_err(|e| corrupt("tasks", "slot", e)))
                    .transpose()?,
                stream,
                line,
                at,
            })
        })
        .collect()
}

/// A replica's line as an agent shipped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReplicaLine<'a> {
    pub app: &'a str,
    pub slot: u32,
    pub release: u64,
    pub stream: &'a str,
    pub line: &'a str,
    pub at: DateTime<Utc>,
}

/// Stores the lines of replica slots placed on `node`; lines of any other slot are dropped (a node only
/// speaks for its own replicas). Returns how many were stored.
pub async fn append_replica_logs(
    pool: &PgPool,
    node: &Name,
    lines: &[NewReplicaLine<'_>],
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await.op("store replica output")?;
    let n = append_replica_logs_in(&mut tx, node, lines).await?;
    tx.commit().await.op("store replica output")?;
    Ok(n)
}

/// [`append_replica_logs`] in the caller's transaction, which must commit soon: it holds each of its
/// apps' output lock until then.
///
/// Followers read an app's lines by id (`id > cursor`), so an app's ids must become visible in order: a
/// line given id 100 by one node's transaction and committed after another node's id 101 was read would
/// be skipped for good. Each app's lines are therefore written under a transaction-scoped advisory lock
/// of that app (taken in name order, so two batches never wait on each other in a cycle): its ids are
/// drawn and committed before the next batch of the same app draws any.
pub async fn append_replica_logs_in(
    conn: &mut PgConnection,
    node: &Name,
    lines: &[NewReplicaLine<'_>],
) -> Result<u64, StoreError> {
    let mut locked: Vec<&str> = lines.iter().map(|l| l.app).collect();
    locked.sort_unstable();
    locked.dedup();
    for app in &locked {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('cairn replica output ' || $1, 0))",
        )
        .bind(app)
        .execute(&mut *conn)
        .await
        .op("lock an app's replica output")?;
    }
    let n = lines.len();
    let (mut apps, mut slots, mut releases) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut streams, mut texts, mut ats) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for l in lines {
        apps.push(l.app.to_owned());
        slots.push(i32::try_from(l.slot).unwrap_or(i32::MAX));
        releases.push(to_i64("release", l.release)?);
        streams.push(l.stream.to_owned());
        texts.push(l.line.to_owned());
        ats.push(l.at);
    }
    let done = sqlx::query!(
        r#"INSERT INTO replica_logs (app, slot, release, node, stream, line, at)
           SELECT l.app, l.slot, l.release, $1, l.stream, l.line, l.at
           FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::text[], $6::text[], $7::timestamptz[])
                WITH ORDINALITY AS l(app, slot, release, stream, line, at, ord)
           WHERE EXISTS (SELECT 1 FROM placements p
                         WHERE p.app = l.app AND p.slot = l.slot AND p.node = $1)
           ORDER BY l.ord"#,
        node.as_str(),
        &apps,
        &slots,
        &releases,
        &streams,
        &texts,
        &ats,
    )
    .execute(&mut *conn)
    .await
    .op("store replica output")?;
    if done.rows_affected() > 0 {
        // Followers on other control planes (`api::wakes`): each app once, never a line.
        sqlx::query("SELECT pg_notify($1, a) FROM unnest($2::text[]) a")
            .bind(super::listen::REPLICA_OUTPUT)
            .bind(&locked)
            .execute(&mut *conn)
            .await
            .op("announce replica output")?;
    }
    Ok(done.rows_affected())
}

/// Lines of `app`'s replicas: those after `after` (a cursor, oldest first, at most `limit`), or without
/// one the last `limit`. Returns them oldest first, and the cursor to ask with next.
pub async fn replica_logs(
    conn: &mut PgConnection,
    app: &Name,
    after: Option<i64>,
    limit: u32,
) -> Result<(Vec<OutputRow>, i64), StoreError> {
    let limit = i64::from(limit.max(1));
    let rows = match after {
        Some(after) => sqlx::query!(
            r#"SELECT id, node, slot, release, stream, line, at FROM replica_logs
               WHERE app = $1 AND id > $2 ORDER BY id LIMIT $3"#,
            app.as_str(),
            after,
            limit,
        )
        .fetch_all(&mut *conn)
        .await
        .op("read replica output")?
        .into_iter()
        .map(|r| (r.id, r.node, r.slot, r.release, r.stream, r.line, r.at))
        .collect::<Vec<_>>(),
        None => {
            let mut v = sqlx::query!(
                r#"SELECT id, node, slot, release, stream, line, at FROM replica_logs
                   WHERE app = $1 ORDER BY id DESC LIMIT $2"#,
                app.as_str(),
                limit,
            )
            .fetch_all(&mut *conn)
            .await
            .op("read replica output")?
            .into_iter()
            .map(|r| (r.id, r.node, r.slot, r.release, r.stream, r.line, r.at))
            .collect::<Vec<_>>();
            v.reverse();
            v
        }
    };
    let cursor = match rows.last() {
        Some(r) => r.0,
        None => match after {
            Some(a) => a,
            // Nothing yet: follow from the newest row of any app (ids only grow).
            None => {
                sqlx::query_scalar!(r#"SELECT coalesce(max(id), 0) AS "id!" FROM replica_logs"#)
                    .fetch_one(&mut *conn)
                    .await
                    .op("read the replica output cursor")?
            }
        },
    };
    let out = rows
        .into_iter()
        .map(|(id, node, slot, release, stream, line, at)| {
            Ok(OutputRow {
                id,
                node,
                slot: Some(u32::try_from(slot).map_err(|e| corrupt("replica_logs", "slot", e))?),
                release: to_u64("replica_logs", "release", release)?,
                stream,
                line,
                at,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok((out, cursor))
}

/// What one prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Build and task output lines older than the retention.
    pub task_lines: u64,
    /// Replica output lines older than the retention or beyond an app's window.
    pub replica_lines: u64,
}

/// Deletes task output written before `before`, replica output received before `before`, and of each
/// app's replica output all but the newest `window` lines. Deletes in batches of `batch` rows, so no
/// statement holds many locks for long.
pub async fn prune_logs(
    pool: &PgPool,
    before: DateTime<Utc>,
    window: u32,
    batch: u32,
) -> Result<Pruned, StoreError> {
    let batch = i64::from(batch.max(1));
    let mut out = Pruned::default();
    loop {
        let tasks = sqlx::query!(
            r#"DELETE FROM task_logs WHERE (task, seq) IN (
                   SELECT task, seq FROM task_logs WHERE at < $1 LIMIT $2)"#,
            before,
            batch,
        )
        .execute(pool)
        .await
        .op("prune task output")?
        .rows_affected();
        let replicas = sqlx::query!(
            r#"DELETE FROM replica_logs WHERE id IN (
                   SELECT id FROM replica_logs WHERE received_at < $1 LIMIT $2)"#,
            before,
            batch,
        )
        .execute(pool)
        .await
        .op("prune replica output")?
        .rows_affected();
        out.task_lines += tasks;
        out.replica_lines += replicas;
        if tasks < batch as u64 && replicas < batch as u64 {
            break;
        }
    }
    // Each app's window: the id of its `window`-th newest line bounds what stays.
    let n = sqlx::query!(
        r#"DELETE FROM replica_logs r USING (
               SELECT a.app, (SELECT id FROM replica_logs x WHERE x.app = a.app
                              ORDER BY id DESC OFFSET $1 LIMIT 1) AS last_gone
               FROM (SELECT DISTINCT app FROM replica_logs) a) w
           WHERE r.app = w.app AND r.id <= w.last_gone"#,
        i64::from(window),
    )
    .execute(pool)
    .await
    .op("trim replica output to its window")?
    .rows_affected();
    out.replica_lines += n;
    Ok(out)
}

/// What a release was deployed with, for a task that deploys it again.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployedRelease {
    pub config_commit: String,
    pub source_commit: String,
    /// `plan::ReleaseSpec` as JSON.
    pub spec: serde_json::Value,
}

/// What release `number` of `app` was deployed with, if it is recorded.
pub async fn deployed(
    conn: &mut PgConnection,
    app: &Name,
    number: u64,
) -> Result<Option<DeployedRelease>, StoreError> {
    let row = sqlx::query!(
        "SELECT config_commit, source_commit, spec FROM releases WHERE app = $1 AND number = $2",
        app.as_str(),
        to_i64("release", number)?,
    )
    .fetch_optional(conn)
    .await
    .op("read a release")?;
    Ok(row.map(|r| DeployedRelease {
        config_commit: r.config_commit,
        source_commit: r.source_commit,
        spec: r.spec,
    }))
}

/// What recording a release's outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// It already was so: someone else reported it.
    Unchanged,
    /// Live now; the live releases that ran before it are superseded.
    Live,
    /// Its replicas ran, but a release whose replicas ran later is live: it stays live, and this one is
    /// recorded as superseded (it ran, so a rollback may still go back to it).
    Superseded,
    Failed,
}

/// Marks a release live or failed, unless it already is. A release is ordered by when its replicas
/// ran (the newest generation among its deploys that are done), not by its number, since a rollback
/// deploys an older number again: marking one live supersedes the live releases that ran before it,
/// and never one that ran after it (a stale deploy's late result cannot demote what runs now). Only the
/// first caller to see an outcome gets it back as changed.
pub async fn finish_release(
    conn: &mut PgConnection,
    app: &Name,
    release: u64,
    ok: bool,
    error: Option<&str>,
) -> Result<Finished, StoreError> {
    let number = to_i64("release", release)?;
    if !ok {
        let changed = sqlx::query!(
            r#"UPDATE releases SET status = 'failed', error = $3, finished_at = now()
               WHERE app = $1 AND number = $2 AND status <> 'failed'"#,
            app.as_str(),
            number,
            error,
        )
        .execute(&mut *conn)
        .await
        .op("record a release's failure")?
        .rows_affected()
            == 1;
        return Ok(if changed {
            Finished::Failed
        } else {
            Finished::Unchanged
        });
    }
    // The rows this decision reads and writes, locked in one order: two releases of the app finishing
    // at once decide one after the other.
    sqlx::query_scalar!(
        r#"SELECT number FROM releases WHERE app = $1 AND (number = $2 OR status = 'live')
           ORDER BY number FOR UPDATE"#,
        app.as_str(),
        number,
    )
    .fetch_all(&mut *conn)
    .await
    .op("lock an app's live releases")?;
    let ran = sqlx::query!(
        r#"WITH ran AS (
               SELECT release, max(coalesce(generation, 0)) AS generation FROM tasks
               WHERE app = $1 AND kind = 'deploy' AND status = 'done' AND release IS NOT NULL
               GROUP BY release
           )
           SELECT (SELECT generation FROM ran WHERE release = $2) AS "mine",
                  (SELECT max(ran.generation) FROM releases r JOIN ran ON ran.release = r.number
                   WHERE r.app = $1 AND r.number <> $2 AND r.status = 'live') AS "newest_other""#,
        app.as_str(),
        number,
    )
    .fetch_one(&mut *conn)
    .await
    .op("read when an app's releases ran")?;
    let mine = ran.mine.unwrap_or(0);
    if ran.newest_other.is_some_and(|other| other > mine) {
        let changed = sqlx::query!(
            r#"UPDATE releases SET status = 'superseded', error = NULL,
                                   finished_at = coalesce(finished_at, now())
               WHERE app = $1 AND number = $2 AND status <> 'superseded'"#,
            app.as_str(),
            number,
        )
        .execute(&mut *conn)
        .await
        .op("record a release that ran before the live one")?
        .rows_affected()
            == 1;
        return Ok(if changed {
            Finished::Superseded
        } else {
            Finished::Unchanged
        });
    }
    let changed = sqlx::query!(
        r#"UPDATE releases SET status = 'live', error = NULL, finished_at = now()
           WHERE app = $1 AND number = $2 AND status <> 'live'"#,
        app.as_str(),
        number,
    )
    .execute(&mut *conn)
    .await
    .op("record a release live")?
    .rows_affected()
        == 1;
    if !changed {
        return Ok(Finished::Unchanged);
    }
    sqlx::query!(
        r#"UPDATE releases SET status = 'superseded'
           WHERE app = $1 AND number <> $2 AND status = 'live'"#,
        app.as_str(),
        number,
    )
    .execute(&mut *conn)
    .await
    .op("supersede the releases that ran before")?;
    Ok(Finished::Live)
}
