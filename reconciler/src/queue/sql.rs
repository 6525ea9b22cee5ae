//! Every statement on the `tasks` table that the queue's life needs (enqueue, lease, report, end) and
//! on a task's logs; [`crate::queue`] is the API around them (types, backoff, wake-ups). The functions
//! are the queue's own: callers go through the API.
//!
//! The lease query walks the `tasks_ready` index (`node, run_after, id` over tasks that are queued,
//! failed or leased) with `FOR UPDATE SKIP LOCKED`, so concurrent leasers never wait for each other and
//! never get the same row. A leased task's `run_after` is its lease expiry, which makes an expired lease
//! show up in that same index walk.
//!
//! What it must not do: decide anything (retries, what a refused token means and what to record are
//! the API's), hold a transaction across a call (each function is one statement, except enqueueing and
//! giving a task back, which run in the caller's transaction, and appending logs, which holds the task's
//! row for its one insert), or use any clock but the database's `now()`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};

use super::{
    Backoff, FailOutcome, LatestTask, LeaseToken, LeasedTask, NewLogLine, NewTask, TaskId,
    TaskKind, TaskRow, TaskState, TaskStatus,
};
use crate::store::decode::{self, millis, to_i32};
use crate::store::{Op as _, StoreError, to_i64, to_u64};
use cairn_schema::Name;

/// The NOTIFY channel the `tasks_notify` trigger signals; the payload is the node's name.
pub(super) const CHANNEL: &str = "cairn_tasks";

/// `Some(id)` when inserted, `None` when a task with the same dedup key exists.
pub(super) async fn insert(
    conn: &mut PgConnection,
    t: &NewTask,
) -> Result<Option<TaskId>, StoreError> {
    let id = sqlx::query_scalar!(
        r#"INSERT INTO tasks
               (node, kind, app, slot, release, generation, payload, max_attempts, dedup_key)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
           ON CONFLICT (dedup_key) DO NOTHING
           RETURNING id"#,
        t.node.as_str(),
        t.kind.as_str(),
        t.app.as_str(),
        t.slot.map(|s| to_i32("slot", s)).transpose()?,
        t.release.map(|r| to_i64("release", r)).transpose()?,
        t.generation.map(|g| to_i64("generation", g)).transpose()?,
        t.payload,
        to_i32("max_attempts", t.max_attempts)?,
        t.dedup_key,
    )
    .fetch_optional(conn)
    .await
    .op("enqueue a task")?;
    Ok(id.map(TaskId))
}

/// Tasks per statement of [`insert_many`].
const INSERT_BATCH: usize = 5_000;

/// Inserts many tasks, [`INSERT_BATCH`] per statement; returns the ids of those inserted (not
/// deduplicated away).
pub(super) async fn insert_many(
    conn: &mut PgConnection,
    tasks: &[NewTask],
) -> Result<Vec<TaskId>, StoreError> {
    let mut ids = Vec::with_capacity(tasks.len());
    for chunk in tasks.chunks(INSERT_BATCH) {
        ids.extend(insert_batch(&mut *conn, chunk).await?);
    }
    Ok(ids)
}

async fn insert_batch(
    conn: &mut PgConnection,
    tasks: &[NewTask],
) -> Result<Vec<TaskId>, StoreError> {
    let n = tasks.len();
    let (mut nodes, mut kinds, mut apps) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut slots: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut releases: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut generations: Vec<Option<i64>> = Vec::with_capacity(n);
    let (mut payloads, mut max_attempts, mut keys) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    // Borrowed, not copied: a cold apply of 100,000 apps enqueues 200,000 payloads.
    for t in tasks {
        nodes.push(t.node.as_str());
        kinds.push(t.kind.as_str());
        apps.push(t.app.as_str());
        slots.push(t.slot.map(|s| to_i32("slot", s)).transpose()?);
        releases.push(t.release.map(|r| to_i64("release", r)).transpose()?);
        generations.push(t.generation.map(|g| to_i64("generation", g)).transpose()?);
        payloads.push(&t.payload);
        max_attempts.push(to_i32("max_attempts", t.max_attempts)?);
        keys.push(t.dedup_key.as_str());
    }
    let ids: Vec<i64> = sqlx::query_scalar(
        r#"INSERT INTO tasks
               (node, kind, app, slot, release, generation, payload, max_attempts, dedup_key)
           SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[],
                                $6::bigint[], $7::jsonb[], $8::int[], $9::text[])
           ON CONFLICT (dedup_key) DO NOTHING
           RETURNING id"#,
    )
    .bind(&nodes)
    .bind(&kinds)
    .bind(&apps)
    .bind(&slots)
    .bind(&releases)
    .bind(&generations)
    .bind(&payloads)
    .bind(&max_attempts)
    .bind(&keys)
    .fetch_all(conn)
    .await
    .op("enqueue tasks")?;
    Ok(ids.into_iter().map(TaskId).collect())
}

/// What one [`lease`] statement did.
#[derive(Debug, Default)]
pub(super) struct Leased {
    pub(super) tasks: Vec<LeasedTask>,
    /// The completions it carried that were current leases: `done`, or `superseded` (see
    /// [`complete`]).
    pub(super) completed: Vec<(TaskId, TaskStatus)>,
    /// Tasks whose last allowed attempt's lease had expired, now dead (they took places of the limit).
    pub(super) buried: usize,
}

/// In one statement (one commit): completes `complete` (the caller's finished leases, exactly as
/// [`complete`] would each), then leases up to `limit` tasks of `node` that may run now, oldest first,
/// each with a fresh token and an expiry `lease_for` from now. A due task whose last allowed attempt's
/// lease expired is met by the same walk and becomes dead instead (it counts against `limit`).
///
/// One walk of `tasks_ready` in `(run_after, id)` order finds both the tasks to lease and the expired
/// last attempts, so no other index is needed for the latter. A task this statement is asked to
/// complete is never picked by it, whether or not its token is current (the data-modifying parts of
/// one statement run in no set order; the lists of rows they touch are disjoint).
pub(super) async fn lease(
    pool: &PgPool,
    node: &Name,
    limit: u32,
    lease_for: Duration,
    complete: &[(TaskId, LeaseToken)],
) -> Result<Leased, StoreError> {
    let ids: Vec<i64> = complete.iter().map(|(id, _)| id.0).collect();
    let tokens: Vec<i64> = complete.iter().map(|(_, t)| t.0).collect();
    let rows = sqlx::query!(
        r#"WITH completed AS (
               UPDATE tasks t
               SET status = CASE WHEN newer.id IS NULL THEN 'done' ELSE 'superseded' END,
                   last_error = CASE WHEN newer.id IS NULL THEN t.last_error
                                     ELSE 'superseded: the node had finished task ' || newer.id
                                          || ' of generation ' || newer.generation
                                          || ' for the slot' END,
                   finished_at = now(), updated_at = now()
               FROM UNNEST($4::bigint[], $5::bigint[]) AS c(id, token)
               LEFT JOIN LATERAL (
                   SELECT n.id, n.generation FROM tasks o JOIN tasks n
                       ON n.node = o.node AND n.app = o.app AND n.slot = o.slot
                   WHERE o.id = c.id AND o.slot IS NOT NULL AND o.generation IS NOT NULL
                     AND n.status = 'done' AND n.generation > o.generation
                   LIMIT 1
               ) newer ON true
               WHERE t.id = c.id AND t.lease_token = c.token AND t.status = 'leased'
               RETURNING t.id, t.status
           ),
           picked AS (
               SELECT id, run_after AS due, status = 'leased' AND attempts >= max_attempts AS last
               FROM tasks
               WHERE node = $1 AND status IN ('queued', 'failed', 'leased') AND run_after <= now()
                 AND (attempts < max_attempts OR status = 'leased') AND id <> ALL($4::bigint[])
               ORDER BY run_after, id
               LIMIT $2
               FOR UPDATE SKIP LOCKED
           ),
           buried AS (
               UPDATE tasks t
               SET status = 'dead', finished_at = now(), updated_at = now(),
                   last_error = 'the lease of the last attempt expired'
                                || coalesce(' (earlier: ' || t.last_error || ')', '')
               FROM picked
               WHERE t.id = picked.id AND picked.last
               RETURNING t.id
           ),
           leased AS (
               UPDATE tasks t
               SET status = 'leased', attempts = t.attempts + 1,
                   lease_token = nextval('task_lease_tokens'),
                   lease_expires_at = now() + $3::float8 * interval '1 millisecond',
                   run_after = now() + $3::float8 * interval '1 millisecond',
                   updated_at = now()
               FROM picked
               WHERE t.id = picked.id AND NOT picked.last
               RETURNING t.id, t.node, t.kind, t.app, t.slot, t.release, t.generation, t.payload,
                         t.attempts, t.max_attempts, t.lease_token, t.lease_expires_at,
                         extract(epoch FROM now() - picked.due)::float8 AS waited_secs
           )
           SELECT 'leased' AS "what!", id AS "id!", node AS "node?", kind AS "kind?", app AS "app?",
                  slot AS "slot?", release AS "release?", generation AS "generation?",
                  payload AS "payload?", attempts AS "attempts?", max_attempts AS "max_attempts?",
                  lease_token AS "lease_token?", lease_expires_at AS "lease_expires_at?",
                  waited_secs AS "waited_secs?"
           FROM leased
           UNION ALL
           SELECT status, id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
           FROM completed
           UNION ALL
           SELECT 'buried', id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
           FROM buried"#,
        node.as_str(),
        i64::from(limit),
        millis(lease_for),
        &ids,
        &tokens,
    )
    .fetch_all(pool)
    .await
    .op("lease tasks")?;
    let mut out = Leased::default();
    for r in rows {
        match r.what.as_str() {
            "leased" => {
                let missing = |column: &'static str| StoreError::Corrupt {
                    table: "tasks",
                    column,
                    detail: "missing from a leased row".to_owned(),
                };
                out.tasks.push(LeasedTask {
                    id: TaskId(r.id),
                    token: LeaseToken(r.lease_token.ok_or_else(|| missing("lease_token"))?),
                    node: name(r.node.as_deref().ok_or_else(|| missing("node"))?)?,
                    kind: kind(r.kind.as_deref().ok_or_else(|| missing("kind"))?)?,
                    app: name(r.app.as_deref().ok_or_else(|| missing("app"))?)?,
                    slot: r.slot.map(slot).transpose()?,
                    release: r
                        .release
                        .map(|v| to_u64("tasks", "release", v))
                        .transpose()?,
                    generation: r
                        .generation
                        .map(|v| to_u64("tasks", "generation", v))
                        .transpose()?,
                    payload: r.payload.ok_or_else(|| missing("payload"))?,
                    attempt: u32::try_from(r.attempts.unwrap_or(0)).unwrap_or(0),
                    max_attempts: u32::try_from(r.max_attempts.unwrap_or(0)).unwrap_or(0),
                    expires_at: r
                        .lease_expires_at
                        .ok_or_else(|| missing("lease_expires_at"))?,
                    waited: Duration::try_from_secs_f64(r.waited_secs.unwrap_or(0.0))
                        .unwrap_or_default(),
                });
            }
            "buried" => out.buried += 1,
            s => out.completed.push((TaskId(r.id), status(s)?)),
        }
    }
    // UPDATE ... RETURNING does not keep the sub-select's order.
    out.tasks.sort_by_key(|t| t.id);
    out.completed.sort_by_key(|(id, _)| *id);
    Ok(out)
}

/// Ends a leased task if `token` is its current lease: `done`, or `superseded` when its node already
/// finished a task of a newer generation for the same slot (an agent never runs an older generation
/// after a newer one, so its "done" can only be a skip). `None` when the token is not current.
pub(super) async fn complete(
    pool: &PgPool,
    id: TaskId,
    token: LeaseToken,
) -> Result<Option<TaskStatus>, StoreError> {
    let row = sqlx::query_scalar!(
        r#"UPDATE tasks t
           SET status = CASE WHEN newer.id IS NULL THEN 'done' ELSE 'superseded' END,
               last_error = CASE WHEN newer.id IS NULL THEN t.last_error
                                 ELSE 'superseded: the node had finished task ' || newer.id
                                      || ' of generation ' || newer.generation
                                      || ' for the slot' END,
               finished_at = now(), updated_at = now()
           FROM (SELECT $1::bigint AS id) me
           LEFT JOIN LATERAL (
               SELECT n.id, n.generation FROM tasks o JOIN tasks n
                   ON n.node = o.node AND n.app = o.app AND n.slot = o.slot
               WHERE o.id = me.id AND o.slot IS NOT NULL AND o.generation IS NOT NULL
                 AND n.status = 'done' AND n.generation > o.generation
               LIMIT 1
           ) newer ON true
           WHERE t.id = me.id AND t.lease_token = $2 AND t.status = 'leased'
           RETURNING t.status"#,
        id.0,
        token.0,
    )
    .fetch_optional(pool)
    .await
    .op("complete a task")?;
    row.map(|s| status(&s)).transpose()
}

/// Ends a leased task as superseded (its node skipped it) if `token` is its current lease; `false` when
/// it is not.
pub(super) async fn skip(
    pool: &PgPool,
    id: TaskId,
    token: LeaseToken,
    why: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query!(
        r#"UPDATE tasks
           SET status = 'superseded', last_error = $3, finished_at = now(), updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'"#,
        id.0,
        token.0,
        why,
    )
    .execute(pool)
    .await
    .op("end a skipped task")?;
    Ok(done.rows_affected() == 1)
}

/// Retires the unfinished tasks of the slots `(app, slot, node)` emitted by a generation older than
/// `generation` (or by none) on every node but `node` (every node when `None`: the slot goes away), in the
/// caller's transaction; returns their ids. Their lease tokens stay as they were, so a holder's report
/// is refused as stale.
pub(super) async fn supersede_slots(
    conn: &mut PgConnection,
    slots: &[(Name, u32, Option<Name>)],
    generation: u64,
) -> Result<Vec<TaskId>, StoreError> {
    let apps: Vec<String> = slots.iter().map(|(a, ..)| a.as_str().to_owned()).collect();
    let nums: Vec<i32> = slots
        .iter()
        .map(|(_, s, _)| to_i32("slot", *s))
        .collect::<Result<_, _>>()?;
    let keep: Vec<Option<String>> = slots
        .iter()
        .map(|(.., n)| n.as_ref().map(|n| n.as_str().to_owned()))
        .collect();
    let ids = sqlx::query_scalar!(
        r#"UPDATE tasks t
           SET status = 'superseded', finished_at = now(), updated_at = now(),
               last_error = 'superseded by generation ' || $4::bigint
                            || ': the slot moved to another node or went away'
                            || coalesce(' (earlier: ' || t.last_error || ')', '')
           FROM UNNEST($1::text[], $2::int[], $3::text[]) AS s(app, slot, keep)
           WHERE t.app = s.app AND t.slot = s.slot AND t.node IS DISTINCT FROM s.keep
             AND t.status IN ('queued', 'leased', 'failed')
             AND coalesce(t.generation, 0) < $4
           RETURNING t.id"#,
        &apps,
        &nums,
        &keep as &[Option<String>],
        to_i64("generation", generation)?,
    )
    .fetch_all(conn)
    .await
    .op("retire a moved slot's tasks")?;
    Ok(ids.into_iter().map(TaskId).collect())
}

/// Completes many tasks in one statement, each as [`complete`] would; returns those whose token was
/// current, with what they became (`done` or `superseded`).
pub(super) async fn complete_many(
    pool: &PgPool,
    leases: &[(TaskId, LeaseToken)],
) -> Result<Vec<(TaskId, TaskStatus)>, StoreError> {
    let ids: Vec<i64> = leases.iter().map(|(id, _)| id.0).collect();
    let tokens: Vec<i64> = leases.iter().map(|(_, t)| t.0).collect();
    let rows = sqlx::query!(
        r#"UPDATE tasks t
           SET status = CASE WHEN newer.id IS NULL THEN 'done' ELSE 'superseded' END,
               last_error = CASE WHEN newer.id IS NULL THEN t.last_error
                                 ELSE 'superseded: the node had finished task ' || newer.id
                                      || ' of generation ' || newer.generation
                                      || ' for the slot' END,
               finished_at = now(), updated_at = now()
           FROM UNNEST($1::bigint[], $2::bigint[]) AS c(id, token)
           LEFT JOIN LATERAL (
               SELECT n.id, n.generation FROM tasks o JOIN tasks n
                   ON n.node = o.node AND n.app = o.app AND n.slot = o.slot
               WHERE o.id = c.id AND o.slot IS NOT NULL AND o.generation IS NOT NULL
                 AND n.status = 'done' AND n.generation > o.generation
               LIMIT 1
           ) newer ON true
           WHERE t.id = c.id AND t.lease_token = c.token AND t.status = 'leased'
           RETURNING t.id, t.status"#,
        &ids,
        &tokens,
    )
    .fetch_all(pool)
    .await
    .op("complete tasks")?;
    let mut done = rows
        .into_iter()
        .map(|r| Ok((TaskId(r.id), status(&r.status)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    done.sort_by_key(|(id, _)| *id);
    Ok(done)
}

/// Records a failed attempt if `token` is the current lease: retried after the backoff, or dead when it
/// was the last allowed attempt. `None` when the token is not current.
pub(super) async fn fail(
    pool: &PgPool,
    id: TaskId,
    token: LeaseToken,
    error: &str,
    backoff: &Backoff,
) -> Result<Option<FailOutcome>, StoreError> {
    let row = sqlx::query!(
        r#"UPDATE tasks
           SET status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'failed' END,
               run_after = CASE WHEN attempts >= max_attempts THEN run_after
                                ELSE now() + least($4::float8 * power(2, attempts - 1), $5::float8)
                                             * interval '1 millisecond' END,
               finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
               last_error = $3,
               updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'
           RETURNING status, run_after"#,
        id.0,
        token.0,
        error,
        millis(backoff.base),
        millis(backoff.max),
    )
    .fetch_optional(pool)
    .await
    .op("fail a task")?;
    Ok(row.map(|r| match r.status.as_str() {
        "dead" => FailOutcome::Dead,
        _ => FailOutcome::Retry {
            run_after: r.run_after,
        },
    }))
}

/// Pushes a current lease's expiry to `lease_for` from now; `None` when the token is not current.
pub(super) async fn extend(
    pool: &PgPool,
    id: TaskId,
    token: LeaseToken,
    lease_for: Duration,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    sqlx::query_scalar!(
        r#"UPDATE tasks
           SET lease_expires_at = now() + $3::float8 * interval '1 millisecond',
               run_after = now() + $3::float8 * interval '1 millisecond',
               updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'
           RETURNING lease_expires_at AS "lease_expires_at!""#,
        id.0,
        token.0,
        millis(lease_for),
    )
    .fetch_optional(pool)
    .await
    .op("extend a lease")
}

/// A task's queue state, for error messages, the agent API and tests.
pub(super) async fn state(pool: &PgPool, id: TaskId) -> Result<Option<TaskState>, StoreError> {
    let row = sqlx::query!(
        r#"SELECT status, attempts, max_attempts, lease_token, lease_expires_at, run_after, last_error
           FROM tasks WHERE id = $1"#,
        id.0,
    )
    .fetch_optional(pool)
    .await
    .op("read a task")?;
    row.map(|r| {
        Ok(TaskState {
            status: status(&r.status)?,
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            max_attempts: u32::try_from(r.max_attempts).unwrap_or(0),
            lease_token: r.lease_token.map(LeaseToken),
            lease_expires_at: r.lease_expires_at,
            run_after: r.run_after,
            last_error: r.last_error,
        })
    })
    .transpose()
}

/// The newest task of each of `node`'s slots of `apps`, read in one statement (one snapshot: a task is
/// seen either still open or finished, with its time).
pub(super) async fn latest_tasks(
    conn: &mut PgConnection,
    node: &Name,
    apps: &[Name],
) -> Result<Vec<LatestTask>, StoreError> {
    let apps: Vec<String> = apps.iter().map(|a| a.as_str().to_owned()).collect();
    let rows = sqlx::query!(
        r#"SELECT DISTINCT ON (app, slot) id, app, slot AS "slot!", kind, release, status, finished_at
           FROM tasks
           WHERE node = $1 AND app = ANY($2) AND slot IS NOT NULL
           ORDER BY app, slot, id DESC"#,
        node.as_str(),
        &apps,
    )
    .fetch_all(conn)
    .await
    .op("read a node's latest tasks")?;
    rows.into_iter()
        .map(|r| {
            Ok(LatestTask {
                id: TaskId(r.id),
                app: name(&r.app)?,
                slot: slot(r.slot)?,
                kind: kind(&r.kind)?,
                release: r
                    .release
                    .map(|v| to_u64("tasks", "release", v))
                    .transpose()?,
                status: status(&r.status)?,
                finished_at: r.finished_at,
            })
        })
        .collect()
}

/// How long until the next of `node`'s unfinished tasks may be leased (its backoff ends, or its lease
/// expires), by the database's clock; `None` when the node has none waiting. A long-poll that found
/// nothing sleeps until then instead of polling.
pub(super) async fn next_due(pool: &PgPool, node: &Name) -> Result<Option<Duration>, StoreError> {
    let secs = sqlx::query_scalar!(
        r#"SELECT EXTRACT(EPOCH FROM (min(run_after) - now()))::float8 AS "secs"
           FROM tasks
           WHERE node = $1 AND status IN ('queued', 'failed', 'leased')
             AND attempts < max_attempts + (status = 'leased')::int"#,
        node.as_str(),
    )
    .fetch_one(pool)
    .await
    .op("find a node's next due task")?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// The node a task is for; `None` when there is no such task.
pub(super) async fn task_node(pool: &PgPool, task: TaskId) -> Result<Option<Name>, StoreError> {
    let node = sqlx::query_scalar!("SELECT node FROM tasks WHERE id = $1", task.0)
        .fetch_optional(pool)
        .await
        .op("read a task's node")?;
    node.map(|n| name(&n)).transpose()
}

/// One task, if it is `node`'s.
pub(super) async fn node_task(
    pool: &PgPool,
    node: &Name,
    task: TaskId,
) -> Result<Option<TaskRow>, StoreError> {
    let row = sqlx::query!(
        r#"SELECT id, node, kind, app, slot, release, status, attempts, max_attempts, lease_token,
                  lease_expires_at, progress, last_error
           FROM tasks WHERE id = $1 AND node = $2"#,
        task.0,
        node.as_str(),
    )
    .fetch_optional(pool)
    .await
    .op("read a node's task")?;
    row.map(|r| {
        Ok(TaskRow {
            id: TaskId(r.id),
            node: name(&r.node)?,
            kind: kind(&r.kind)?,
            app: name(&r.app)?,
            slot: r.slot.map(slot).transpose()?,
            release: r
                .release
                .map(|v| to_u64("tasks", "release", v))
                .transpose()?,
            status: status(&r.status)?,
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            max_attempts: u32::try_from(r.max_attempts).unwrap_or(0),
            lease_token: r.lease_token.map(LeaseToken),
            lease_expires_at: r.lease_expires_at,
            progress: r.progress,
            last_error: r.last_error,
        })
    })
    .transpose()
}

/// Records what the agent is doing with a task it holds and extends the lease to `lease_for` from now.
/// `None` when `token` is not the task's current lease.
pub(super) async fn record_progress(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    message: Option<&str>,
    lease_for: Duration,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    sqlx::query_scalar!(
        r#"UPDATE tasks
           SET progress = coalesce($3, progress), progress_at = now(),
               lease_expires_at = now() + $4::float8 * interval '1 millisecond',
               run_after = now() + $4::float8 * interval '1 millisecond',
               updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'
           RETURNING lease_expires_at AS "lease_expires_at!""#,
        task.0,
        token.0,
        message,
        millis(lease_for),
    )
    .fetch_optional(pool)
    .await
    .op("record a task's progress")
}

/// Appends log lines to a task the caller holds, keeping at most `max_lines` per task. `None` when `token`
/// is not the task's current lease; otherwise how many lines were stored.
pub(super) async fn append_logs(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    lines: &[NewLogLine<'_>],
    max_lines: u32,
) -> Result<Option<super::Appended>, StoreError> {
    let mut tx = pool.begin().await.op("begin appending logs")?;
    // Holding the task's row serialises appends, so sequence numbers never collide.
    let held: Option<String> = sqlx::query_scalar(
        "SELECT app FROM tasks WHERE id = $1 AND lease_token = $2 AND status = 'leased' FOR UPDATE",
    )
    .bind(task.0)
    .bind(token.0)
    .fetch_optional(&mut *tx)
    .await
    .op("hold a task for its logs")?;
    let Some(app) = held else {
        return Ok(None);
    };
    let streams: Vec<String> = lines.iter().map(|l| l.stream.to_owned()).collect();
    let texts: Vec<String> = lines.iter().map(|l| l.line.to_owned()).collect();
    let ats: Vec<DateTime<Utc>> = lines.iter().map(|l| l.at).collect();
    let stored = sqlx::query!(
        r#"WITH next AS (SELECT coalesce(max(seq) + 1, 0) AS seq FROM task_logs WHERE task = $1)
           INSERT INTO task_logs (task, seq, stream, line, at)
           SELECT $1, next.seq + l.ord - 1, l.stream, l.line, l.at
           FROM next, UNNEST($2::text[], $3::text[], $4::timestamptz[])
                WITH ORDINALITY AS l(stream, line, at, ord)
           WHERE next.seq + l.ord - 1 < $5"#,
        task.0,
        &streams,
        &texts,
        &ats,
        i64::from(max_lines),
    )
    .execute(&mut *tx)
    .await
    .op("store log lines")?
    .rows_affected();
    if stored > 0 {
        // Followers on other control planes (`api::wakes`): the app, never a line.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::store::listen::BUILD_OUTPUT)
            .bind(&app)
            .execute(&mut *tx)
            .await
            .op("announce log lines")?;
    }
    tx.commit().await.op("commit log lines")?;
    Ok(Some(super::Appended {
        lines: u32::try_from(stored).unwrap_or(u32::MAX),
        app,
    }))
}

/// A task's log lines, in order: `(stream, line, at)`.
pub(super) async fn task_logs(
    pool: &PgPool,
    task: TaskId,
) -> Result<Vec<(String, String, DateTime<Utc>)>, StoreError> {
    let rows = sqlx::query!(
        "SELECT stream, line, at FROM task_logs WHERE task = $1 ORDER BY seq",
        task.0
    )
    .fetch_all(pool)
    .await
    .op("read a task's logs")?;
    Ok(rows.into_iter().map(|r| (r.stream, r.line, r.at)).collect())
}

/// Gives a leased task back unstarted: it may be leased again `after` from now (at once for an agent
/// that shuts down; later for a task held until another node pushed its image), and the attempt does
/// not count. `false` when `token` is not the task's current lease.
pub(super) async fn release_task(
    conn: impl sqlx::PgExecutor<'_>,
    task: TaskId,
    token: LeaseToken,
    after: Duration,
) -> Result<bool, StoreError> {
    let done = sqlx::query!(
        r#"UPDATE tasks
           SET status = 'queued', attempts = greatest(attempts - 1, 0),
               run_after = now() + $3::float8 * interval '1 millisecond',
               lease_expires_at = NULL, progress = NULL, updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'"#,
        task.0,
        token.0,
        millis(after),
    )
    .execute(conn)
    .await
    .op("release a task")?;
    Ok(done.rows_affected() == 1)
}

/// Ends a leased task as dead at once (a failure retrying cannot fix). `false` when `token` is not the
/// task's current lease.
pub(super) async fn bury_task(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
    error: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query!(
        r#"UPDATE tasks
           SET status = 'dead', finished_at = now(), last_error = $3, updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'"#,
        task.0,
        token.0,
        error,
    )
    .execute(pool)
    .await
    .op("end a task")?;
    Ok(done.rows_affected() == 1)
}

/// Replaces the payload of a task its lease holder is about to get (secrets encrypted to the node, in
/// place of a pending marker). `false` when `token` is not the task's current lease.
pub(super) async fn set_task_payload(
    conn: impl sqlx::PgExecutor<'_>,
    task: TaskId,
    token: LeaseToken,
    payload: &serde_json::Value,
) -> Result<bool, StoreError> {
    let done = sqlx::query!(
        r#"UPDATE tasks SET payload = $3, updated_at = now()
           WHERE id = $1 AND lease_token = $2 AND status = 'leased'"#,
        task.0,
        token.0,
        payload,
    )
    .execute(conn)
    .await
    .op("write a task's payload")?;
    Ok(done.rows_affected() == 1)
}

/// How a release's deploy tasks stand: `(done, open, dead)` (open: queued, leased or failed).
pub(super) async fn release_deploys(
    conn: &mut PgConnection,
    app: &Name,
    release: u64,
) -> Result<(u64, u64, u64), StoreError> {
    let r = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE status = 'done') AS "done!",
                  count(*) FILTER (WHERE status IN ('queued', 'leased', 'failed')) AS "open!",
                  count(*) FILTER (WHERE status = 'dead') AS "dead!"
           FROM tasks WHERE app = $1 AND release = $2 AND kind = 'deploy'"#,
        app.as_str(),
        to_i64("release", release)?,
    )
    .fetch_one(conn)
    .await
    .op("count a release's deploys")?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok((n(r.done), n(r.open), n(r.dead)))
}

/// Whether `token` is task `task`'s current lease.
pub(super) async fn holds_lease(
    pool: &PgPool,
    task: TaskId,
    token: LeaseToken,
) -> Result<bool, StoreError> {
    let held = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM tasks WHERE id = $1 AND lease_token = $2 AND status = 'leased')
           AS "held!""#,
        task.0,
        token.0,
    )
    .fetch_one(pool)
    .await
    .op("check a task's lease")?;
    Ok(held)
}

/// One connection LISTENing on [`CHANNEL`].
#[derive(Debug)]
pub(super) struct Notifications {
    listener: PgListener,
}

impl Notifications {
    /// Connects and LISTENs; notifications committed after this returns are delivered.
    pub(super) async fn listen(pool: &PgPool) -> Result<Notifications, StoreError> {
        let mut listener = PgListener::connect_with(pool)
            .await
            .map_err(StoreError::Connect)?;
        listener.listen(CHANNEL).await.op("listen for tasks")?;
        Ok(Notifications { listener })
    }

    /// The next node with new tasks. `Ok(None)` when the connection was lost: notifications may have been
    /// missed meanwhile, and the next call reconnects.
    pub(super) async fn recv(&mut self) -> Result<Option<String>, StoreError> {
        let n = self
            .listener
            .try_recv()
            .await
            .op("wait for task notifications")?;
        Ok(n.map(|n| n.payload().to_owned()))
    }
}

fn name(s: &str) -> Result<Name, StoreError> {
    decode::name("tasks", s)
}

fn slot(s: i32) -> Result<u32, StoreError> {
    decode::slot("tasks", s)
}

fn kind(s: &str) -> Result<TaskKind, StoreError> {
    TaskKind::parse(s).ok_or_else(|| StoreError::Corrupt {
        table: "tasks",
        column: "kind",
        detail: format!("unknown kind `{s}`"),
    })
}

fn status(s: &str) -> Result<TaskStatus, StoreError> {
    TaskStatus::parse(s).ok_or_else(|| StoreError::Corrupt {
        table: "tasks",
        column: "status",
        detail: format!("unknown status `{s}`"),
    })
}
