//! Every SQL statement of the GitHub integration: the `webhook_deliveries` record, the `github_outbox`
//! and the `github_pr_comments` ids (migrations `…153000_webhook_deliveries.sql` and
//! `…153001_github_outbox.sql`).
//!
//! What it must not do: decide anything (when to retry, what a delivery means, whether a call is
//! permanent are the callers'), talk to GitHub, or take a transaction of its own where the caller's is
//! the point (an enqueue joins the caller's transaction, a claim and its outcome commit together).
//!
//! The queries are checked at run time (`sqlx::query` with binds) and exercised by the integration
//! tests against a real PostgreSQL; durations cross as seconds (`make_interval(secs => $n)`) so that
//! every timestamp comes from the database's clock, never from two clocks compared.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row as _};

/// A database failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("database error while {op}")]
pub struct StoreError {
    op: &'static str,
    #[source]
    source: sqlx::Error,
}

impl StoreError {
    pub(crate) fn from_sqlx(op: &'static str, source: sqlx::Error) -> StoreError {
        StoreError { op, source }
    }
}

/// For the admin API, whose errors are the reconciler's (logged, never shown).
impl From<StoreError> for cairn_reconciler::store::StoreError {
    fn from(e: StoreError) -> Self {
        cairn_reconciler::store::StoreError::Query {
            op: e.op,
            source: e.source,
        }
    }
}

fn err(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError { op, source }
}

// ---------------------------------------------------------------------------------------------------
// Deliveries

pub(crate) struct NewDelivery<'a> {
    pub id: &'a str,
    pub event: &'a str,
    pub action: Option<&'a str>,
    pub payload: &'a Value,
    /// `received`, or `handled` for what needs no worker (a ping).
    pub status: &'static str,
    pub outcome: Option<&'a str>,
}

/// Records a delivery; `false` when its id was recorded before (a redelivery), which changes nothing.
pub(crate) async fn insert_delivery(
    pool: &PgPool,
    d: &NewDelivery<'_>,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO webhook_deliveries (delivery_id, event, action, payload, status, outcome, handled_at)
         VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $5 = 'received' THEN NULL ELSE now() END)
         ON CONFLICT (delivery_id) DO NOTHING",
    )
    .bind(d.id)
    .bind(d.event)
    .bind(d.action)
    .bind(Json(d.payload))
    .bind(d.status)
    .bind(d.outcome)
    .execute(pool)
    .await
    .map_err(err("recording a webhook delivery"))?
    .rows_affected();
    Ok(inserted == 1)
}

pub(crate) struct ClaimedDelivery {
    pub id: String,
    pub event: String,
    pub payload: Value,
    pub received_at: DateTime<Utc>,
    pub attempts: i32,
}

/// Locks the oldest delivery waiting to be processed, skipping those other workers hold; the lock
/// lasts until the caller's transaction ends.
pub(crate) async fn claim_delivery(
    conn: &mut PgConnection,
) -> Result<Option<ClaimedDelivery>, StoreError> {
    let row = sqlx::query(
        "SELECT delivery_id, event, payload, received_at, attempts FROM webhook_deliveries
         WHERE status = 'received' AND next_attempt_at <= now()
         ORDER BY received_at, delivery_id
         LIMIT 1
         FOR UPDATE SKIP LOCKED",
    )
    .fetch_optional(conn)
    .await
    .map_err(err("claiming a webhook delivery"))?;
    row.map(|row| {
        Ok(ClaimedDelivery {
            id: row.try_get("delivery_id")?,
            event: row.try_get("event")?,
            payload: row.try_get::<Json<Value>, _>("payload")?.0,
            received_at: row.try_get("received_at")?,
            attempts: row.try_get("attempts")?,
        })
    })
    .transpose()
    .map_err(err("reading a claimed webhook delivery"))
}

/// Marks a claimed delivery `handled`, `ignored` or `failed`, with what it caused or why.
pub(crate) async fn finish_delivery(
    conn: &mut PgConnection,
    id: &str,
    status: &'static str,
    outcome: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE webhook_deliveries SET status = $2, outcome = $3, handled_at = now()
         WHERE delivery_id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(outcome)
    .execute(conn)
    .await
    .map_err(err("finishing a webhook delivery"))?;
    Ok(())
}

/// Leaves a claimed delivery for a later attempt, `retry_in_secs` from now, with the error.
pub(crate) async fn retry_delivery(
    conn: &mut PgConnection,
    id: &str,
    error: &str,
    retry_in_secs: f64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE webhook_deliveries
         SET attempts = attempts + 1, outcome = $2, next_attempt_at = now() + make_interval(secs => $3)
         WHERE delivery_id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(retry_in_secs)
    .execute(conn)
    .await
    .map_err(err("scheduling a webhook delivery's retry"))?;
    Ok(())
}

/// Deletes finished deliveries received more than `older_than_secs` ago.
pub(crate) async fn prune_deliveries(
    pool: &PgPool,
    older_than_secs: f64,
) -> Result<u64, StoreError> {
    Ok(sqlx::query(
        "DELETE FROM webhook_deliveries
         WHERE status <> 'received' AND received_at < now() - make_interval(secs => $1)",
    )
    .bind(older_than_secs)
    .execute(pool)
    .await
    .map_err(err("pruning webhook deliveries"))?
    .rows_affected())
}

pub(crate) struct DeliveryRow {
    pub id: String,
    pub event: String,
    pub action: Option<String>,
    pub received_at: DateTime<Utc>,
    pub status: String,
    pub outcome: Option<String>,
    pub attempts: i32,
    pub handled_at: Option<DateTime<Utc>>,
}

/// The most recent deliveries, newest first.
pub(crate) async fn recent_deliveries(
    pool: &PgPool,
    limit: i64,
) -> Result<Vec<DeliveryRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT delivery_id, event, action, received_at, status, outcome, attempts, handled_at
         FROM webhook_deliveries ORDER BY received_at DESC, delivery_id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(err("listing webhook deliveries"))?;
    rows.into_iter()
        .map(|row| {
            Ok(DeliveryRow {
                id: row.try_get("delivery_id")?,
                event: row.try_get("event")?,
                action: row.try_get("action")?,
                received_at: row.try_get("received_at")?,
                status: row.try_get("status")?,
                outcome: row.try_get("outcome")?,
                attempts: row.try_get("attempts")?,
                handled_at: row.try_get("handled_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(err("reading webhook deliveries"))
}

// ---------------------------------------------------------------------------------------------------
// Outbox

/// The outboxes that share a row's life (pending, claimed under a lease, done, retried, dead: see
/// `…153001_github_outbox.sql`) and so the statements below: GitHub API calls, and notifications
/// (`notify_outbox`, `…170100_notify.sql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outbox {
    GitHub,
    Notify,
}

impl Outbox {
    /// `statement` (written for `github_outbox`) for this outbox's table. The table name is one of two
    /// constants, never input.
    fn sql(self, statement: &str) -> String {
        match self {
            Outbox::GitHub => statement.to_owned(),
            Outbox::Notify => statement.replace("github_outbox", "notify_outbox"),
        }
    }
}

/// Adds a call to the outbox in the caller's transaction, or, when a pending call has the same
/// coalesce key, replaces that call's payload (its `version` goes up, its schedule is kept so a call
/// in flight stays leased). Returns the row's id.
pub(crate) async fn outbox_insert(
    conn: &mut PgConnection,
    kind: &'static str,
    repo: &str,
    payload: &Value,
    coalesce_key: Option<&str>,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO github_outbox (kind, repo, payload, coalesce_key) VALUES ($1, $2, $3, $4)
         ON CONFLICT (coalesce_key) WHERE status = 'pending' DO UPDATE
         SET payload = EXCLUDED.payload, version = github_outbox.version + 1, attempts = 0,
             last_error = NULL, updated_at = now()
         RETURNING id",
    )
    .bind(kind)
    .bind(repo)
    .bind(Json(payload))
    .bind(coalesce_key)
    .fetch_one(conn)
    .await
    .map_err(err("enqueueing a GitHub call"))
}

pub(crate) struct ClaimedCall {
    pub id: i64,
    pub kind: String,
    pub repo: String,
    pub payload: Value,
    pub version: i32,
    /// Including this one.
    pub attempts: i32,
}

/// Takes the next due call: counts the attempt and leases the row for `lease_secs` (its
/// `next_attempt_at` becomes the lease expiry), committed before the caller makes the HTTP call.
pub(crate) async fn outbox_claim(
    pool: &PgPool,
    lease_secs: f64,
) -> Result<Option<ClaimedCall>, StoreError> {
    let row = sqlx::query(
        "UPDATE github_outbox
         SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $1),
             updated_at = now()
         WHERE id = (
             SELECT id FROM github_outbox
             WHERE status = 'pending' AND next_attempt_at <= now()
             ORDER BY next_attempt_at, id
             LIMIT 1
             FOR UPDATE SKIP LOCKED
         )
         RETURNING id, kind, repo, payload, version, attempts",
    )
    .bind(lease_secs)
    .fetch_optional(pool)
    .await
    .map_err(err("claiming a GitHub call"))?;
    row.map(|row| {
        Ok(ClaimedCall {
            id: row.try_get("id")?,
            kind: row.try_get("kind")?,
            repo: row.try_get("repo")?,
            payload: row.try_get::<Json<Value>, _>("payload")?.0,
            version: row.try_get("version")?,
            attempts: row.try_get("attempts")?,
        })
    })
    .transpose()
    .map_err(err("reading a claimed GitHub call"))
}

/// What became of a claimed call whose payload may have been superseded meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The delivered (or failed) version was the current one.
    AsIntended,
    /// A newer payload arrived while the call was in flight: the row stays pending, due now, with its
    /// attempts started afresh.
    Superseded,
    /// The row is gone or no longer pending (it cannot be, short of manual intervention).
    Missing,
}

/// Marks a delivered call `done`, unless its payload was superseded while in flight.
pub(crate) async fn outbox_done(
    conn: &mut PgConnection,
    outbox: Outbox,
    id: i64,
    version: i32,
) -> Result<Settled, StoreError> {
    let sql = outbox.sql(
        "UPDATE github_outbox SET
             status = CASE WHEN version = $2 THEN 'done' ELSE 'pending' END,
             finished_at = CASE WHEN version = $2 THEN now() END,
             next_attempt_at = CASE WHEN version = $2 THEN next_attempt_at ELSE now() END,
             last_error = CASE WHEN version = $2 THEN NULL ELSE last_error END,
             updated_at = now()
         WHERE id = $1 AND status = 'pending'
         RETURNING version = $2",
    );
    let row: Option<bool> = sqlx::query_scalar(&sql)
        .bind(id)
        .bind(version)
        .fetch_optional(conn)
        .await
        .map_err(err("marking an outbox call done"))?;
    Ok(settled(row))
}

fn settled(row: Option<bool>) -> Settled {
    match row {
        Some(true) => Settled::AsIntended,
        Some(false) => Settled::Superseded,
        None => Settled::Missing,
    }
}

/// What to do with a call that failed.
pub(crate) enum Failure {
    /// Try again `in_secs` from now; `count` false gives the attempt back (a rate limit is nobody's
    /// failure).
    Retry { in_secs: f64, count: bool },
    /// Give up: the call is kept as `dead` with the error.
    Dead,
}

/// Records a failed attempt. A superseded call is retried at once with the newer payload instead.
pub(crate) async fn outbox_failed(
    pool: &PgPool,
    outbox: Outbox,
    id: i64,
    version: i32,
    error: &str,
    failure: Failure,
) -> Result<Settled, StoreError> {
    let (dead, in_secs, count) = match failure {
        Failure::Retry { in_secs, count } => (false, in_secs, count),
        Failure::Dead => (true, 0.0, true),
    };
    let sql = outbox.sql(
        "UPDATE github_outbox SET
             status = CASE WHEN version = $2 AND $4 THEN 'dead' ELSE 'pending' END,
             finished_at = CASE WHEN version = $2 AND $4 THEN now() END,
             next_attempt_at = CASE WHEN version = $2 THEN now() + make_interval(secs => $5)
                                    ELSE now() END,
             attempts = CASE WHEN version = $2 AND NOT $6 THEN greatest(attempts - 1, 0)
                             ELSE attempts END,
             last_error = $3,
             updated_at = now()
         WHERE id = $1 AND status = 'pending'
         RETURNING version = $2",
    );
    let row: Option<bool> = sqlx::query_scalar(&sql)
        .bind(id)
        .bind(version)
        .bind(error)
        .bind(dead)
        .bind(in_secs)
        .bind(count)
        .fetch_optional(pool)
        .await
        .map_err(err("recording a failed outbox call"))?;
    Ok(settled(row))
}

/// Holds every pending call until at least `in_secs` from now (GitHub's rate limit applies to all of
/// them, not only to the call that hit it).
pub(crate) async fn outbox_pause_all(pool: &PgPool, in_secs: f64) -> Result<u64, StoreError> {
    Ok(sqlx::query(
        "UPDATE github_outbox
         SET next_attempt_at = greatest(next_attempt_at, now() + make_interval(secs => $1))
         WHERE status = 'pending'",
    )
    .bind(in_secs)
    .execute(pool)
    .await
    .map_err(err("pausing GitHub calls for the rate limit"))?
    .rows_affected())
}

/// Seconds until the earliest pending call is due (negative when one is due now); `None` when none
/// is pending.
pub(crate) async fn outbox_next_due_in(
    pool: &PgPool,
    outbox: Outbox,
) -> Result<Option<f64>, StoreError> {
    let sql = outbox.sql(
        "SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
         FROM github_outbox WHERE status = 'pending'",
    );
    sqlx::query_scalar(&sql)
        .fetch_one(pool)
        .await
        .map_err(err("looking for the next due outbox call"))
}

pub(crate) struct OutboxRow {
    pub id: i64,
    pub kind: String,
    pub repo: String,
    pub payload: Value,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Dead calls, newest first.
pub(crate) async fn outbox_dead(pool: &PgPool, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, kind, repo, payload, attempts, last_error, created_at, finished_at
         FROM github_outbox WHERE status = 'dead' ORDER BY finished_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(err("listing dead GitHub calls"))?;
    rows.into_iter()
        .map(|row| {
            Ok(OutboxRow {
                id: row.try_get("id")?,
                kind: row.try_get("kind")?,
                repo: row.try_get("repo")?,
                payload: row.try_get::<Json<Value>, _>("payload")?.0,
                attempts: row.try_get("attempts")?,
                last_error: row.try_get("last_error")?,
                created_at: row.try_get("created_at")?,
                finished_at: row.try_get("finished_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(err("reading dead GitHub calls"))
}

/// Deletes calls that finished (done or dead) more than `older_than_secs` ago.
pub(crate) async fn prune_outbox(
    pool: &PgPool,
    outbox: Outbox,
    older_than_secs: f64,
) -> Result<u64, StoreError> {
    let sql = outbox.sql(
        "DELETE FROM github_outbox
         WHERE status <> 'pending' AND finished_at < now() - make_interval(secs => $1)",
    );
    Ok(sqlx::query(&sql)
        .bind(older_than_secs)
        .execute(pool)
        .await
        .map_err(err("pruning finished outbox calls"))?
        .rows_affected())
}

/// The id of the plan comment on a pull request, once known.
pub(crate) async fn pr_comment_id(
    pool: &PgPool,
    repo: &str,
    pr: i64,
) -> Result<Option<i64>, StoreError> {
    sqlx::query_scalar("SELECT comment_id FROM github_pr_comments WHERE repo = $1 AND pr = $2")
        .bind(repo)
        .bind(pr)
        .fetch_optional(pool)
        .await
        .map_err(err("reading a pull request's plan comment id"))
}

pub(crate) async fn set_pr_comment_id(
    conn: &mut PgConnection,
    repo: &str,
    pr: i64,
    comment_id: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO github_pr_comments (repo, pr, comment_id) VALUES ($1, $2, $3)
         ON CONFLICT (repo, pr) DO UPDATE SET comment_id = EXCLUDED.comment_id, updated_at = now()",
    )
    .bind(repo)
    .bind(pr)
    .bind(comment_id)
    .execute(conn)
    .await
    .map_err(err("storing a pull request's plan comment id"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Work left by deliveries (migration `…161933_webhook_work.sql`)

/// The channel that wakes the webhook workers and the reconciler; the payload says whom.
pub(crate) const WORK_CHANNEL: &str = "cairn_webhook_work";

/// Wakes `who` (`reconcile`, `heads`, `pulls`) when the caller's transaction commits.
pub(crate) async fn notify_work(conn: &mut PgConnection, who: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(WORK_CHANNEL)
        .bind(who)
        .execute(conn)
        .await
        .map_err(err("waking the webhook workers"))?;
    Ok(())
}

/// Asks for an app's branch head to be read from its remote; a pending request is replaced (its
/// version goes up, and it is due now).
pub(crate) async fn request_head_check(
    conn: &mut PgConnection,
    app: &str,
    url: &str,
    branch: &str,
    delivery_id: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO webhook_head_checks (app, url, branch, delivery_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT (app) DO UPDATE
         SET url = EXCLUDED.url, branch = EXCLUDED.branch, delivery_id = EXCLUDED.delivery_id,
             version = webhook_head_checks.version + 1, attempts = 0, next_attempt_at = now(),
             last_error = NULL, requested_at = now()",
    )
    .bind(app)
    .bind(url)
    .bind(branch)
    .bind(delivery_id)
    .execute(conn)
    .await
    .map_err(err("requesting a source head check"))?;
    Ok(())
}

/// Remembers that a push brought `commit` for `app` (the first delivery of a commit wins).
pub(crate) async fn record_push(
    conn: &mut PgConnection,
    app: &str,
    commit: &str,
    delivery_id: &str,
    received_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO webhook_pushes (app, commit, delivery_id, received_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (app, commit) DO NOTHING",
    )
    .bind(app)
    .bind(commit)
    .bind(delivery_id)
    .bind(received_at)
    .execute(conn)
    .await
    .map_err(err("recording a push"))?;
    Ok(())
}

pub(crate) struct HeadCheck {
    pub app: String,
    pub url: String,
    pub branch: String,
    pub version: i32,
    /// Including this one.
    pub attempts: i32,
}

/// Leases up to `limit` due head checks for `lease_secs`.
pub(crate) async fn claim_head_checks(
    pool: &PgPool,
    lease_secs: f64,
    limit: i64,
) -> Result<Vec<HeadCheck>, StoreError> {
    let rows = sqlx::query(
        "UPDATE webhook_head_checks
         SET attempts = attempts + 1, leased_until = now() + make_interval(secs => $1)
         WHERE app IN (
             SELECT app FROM webhook_head_checks
             WHERE next_attempt_at <= now() AND (leased_until IS NULL OR leased_until <= now())
             ORDER BY requested_at, app
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         RETURNING app, url, branch, version, attempts",
    )
    .bind(lease_secs)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(err("claiming source head checks"))?;
    rows.into_iter()
        .map(|row| {
            Ok(HeadCheck {
                app: row.try_get("app")?,
                url: row.try_get("url")?,
                branch: row.try_get("branch")?,
                version: row.try_get("version")?,
                attempts: row.try_get("attempts")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(err("reading claimed source head checks"))
}

/// Ends a claimed head check: deletes it when `done` and no newer request replaced it; otherwise
/// releases it, due again `retry_in_secs` from now (a newer request is due at once).
pub(crate) async fn settle_head_check(
    pool: &PgPool,
    app: &str,
    version: i32,
    done: bool,
    error: Option<&str>,
    retry_in_secs: f64,
) -> Result<(), StoreError> {
    if done {
        let deleted =
            sqlx::query("DELETE FROM webhook_head_checks WHERE app = $1 AND version = $2")
                .bind(app)
                .bind(version)
                .execute(pool)
                .await
                .map_err(err("finishing a source head check"))?
                .rows_affected();
        if deleted == 1 {
            return Ok(());
        }
    }
    sqlx::query(
        "UPDATE webhook_head_checks SET leased_until = NULL,
             last_error = CASE WHEN version = $2 THEN $3 ELSE last_error END,
             next_attempt_at = CASE WHEN version = $2 THEN now() + make_interval(secs => $4)
                                    ELSE next_attempt_at END
         WHERE app = $1",
    )
    .bind(app)
    .bind(version)
    .bind(error)
    .bind(retry_in_secs)
    .execute(pool)
    .await
    .map_err(err("releasing a source head check"))?;
    Ok(())
}

/// Seconds until the next head check is due (negative: now); `None` when there is none.
pub(crate) async fn next_head_check_in(pool: &PgPool) -> Result<Option<f64>, StoreError> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM min(greatest(next_attempt_at, coalesce(leased_until, next_attempt_at)))
                                   - now())::float8
         FROM webhook_head_checks",
    )
    .fetch_one(pool)
    .await
    .map_err(err("looking for the next source head check"))
}

pub(crate) struct PrRequest<'a> {
    pub repo: &'a str,
    pub pr: i64,
    pub html_url: &'a str,
    pub head_sha: &'a str,
    pub fork: bool,
    pub delivery_id: &'a str,
}

/// Asks for a pull request to be planned (again): its version goes up and it is due now. A plan in
/// flight finishes, and the row stays due for this request.
pub(crate) async fn request_pr_plan(
    conn: &mut PgConnection,
    r: &PrRequest<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO github_pr_plans (repo_key, repo, pr, html_url, head_sha, fork, delivery_id)
         VALUES (lower($1), $1, $2, $3, $4, $5, $6)
         ON CONFLICT (repo_key, pr) DO UPDATE
         SET repo = EXCLUDED.repo, html_url = EXCLUDED.html_url, head_sha = EXCLUDED.head_sha,
             fork = EXCLUDED.fork, delivery_id = EXCLUDED.delivery_id,
             requested_version = github_pr_plans.requested_version + 1, rechecks = 0, attempts = 0,
             next_attempt_at = now(), last_error = NULL, requested_at = now()",
    )
    .bind(r.repo)
    .bind(r.pr)
    .bind(r.html_url)
    .bind(r.head_sha)
    .bind(r.fork)
    .bind(r.delivery_id)
    .execute(conn)
    .await
    .map_err(err("requesting a pull request plan"))?;
    Ok(())
}

pub(crate) struct ClaimedPr {
    pub repo: String,
    pub pr: i64,
    pub html_url: String,
    pub head_sha: String,
    pub fork: bool,
    pub version: i32,
    /// Including this one.
    pub attempts: i32,
    pub rechecks: i32,
    pub token: i64,
}

/// Leases the next pull request due for a plan, with a fresh fencing token.
pub(crate) async fn claim_pr_plan(
    pool: &PgPool,
    lease_secs: f64,
) -> Result<Option<ClaimedPr>, StoreError> {
    let row = sqlx::query(
        "UPDATE github_pr_plans
         SET attempts = attempts + 1, leased_until = now() + make_interval(secs => $1),
             lease_token = nextval('github_pr_plan_leases')
         WHERE (repo_key, pr) = (
             SELECT repo_key, pr FROM github_pr_plans
             WHERE requested_version > planned_version AND next_attempt_at <= now()
               AND (leased_until IS NULL OR leased_until <= now())
             ORDER BY next_attempt_at, repo_key, pr
             LIMIT 1
             FOR UPDATE SKIP LOCKED
         )
         RETURNING repo, pr, html_url, head_sha, fork, requested_version, attempts, rechecks,
                   lease_token",
    )
    .bind(lease_secs)
    .fetch_optional(pool)
    .await
    .map_err(err("claiming a pull request plan"))?;
    row.map(|row| {
        Ok(ClaimedPr {
            repo: row.try_get("repo")?,
            pr: row.try_get("pr")?,
            html_url: row.try_get("html_url")?,
            head_sha: row.try_get("head_sha")?,
            fork: row.try_get("fork")?,
            version: row.try_get("requested_version")?,
            attempts: row.try_get("attempts")?,
            rechecks: row.try_get("rechecks")?,
            token: row.try_get("lease_token")?,
        })
    })
    .transpose()
    .map_err(err("reading a claimed pull request plan"))
}

/// How a leased plan ends.
pub(crate) enum PrSettle<'a> {
    /// Planned `sha` (the comment and status are enqueued in the same transaction).
    Planned { sha: &'a str },
    /// Planned `sha`, but the fetched ref did not show the delivery's head yet: due again then.
    Recheck { sha: &'a str, in_secs: f64 },
    /// Failed; due again then.
    Retry { error: &'a str, in_secs: f64 },
    /// Failed for good (the failure status is enqueued in the same transaction).
    GaveUp { error: &'a str },
}

/// Ends a leased plan in the caller's transaction, if the lease (`token`) is still the row's; `false`
/// when another planner took it over (the caller must then roll back what it wrote).
pub(crate) async fn settle_pr_plan(
    conn: &mut PgConnection,
    claimed: &ClaimedPr,
    how: PrSettle<'_>,
) -> Result<bool, StoreError> {
    let (planned, sha, error, in_secs, recheck) = match how {
        PrSettle::Planned { sha } => (true, Some(sha), None, 0.0, false),
        PrSettle::Recheck { sha, in_secs } => (false, Some(sha), None, in_secs, true),
        PrSettle::Retry { error, in_secs } => (false, None, Some(error), in_secs, false),
        PrSettle::GaveUp { error } => (true, None, Some(error), 0.0, false),
    };
    let row = sqlx::query(
        "UPDATE github_pr_plans SET
             planned_version = CASE WHEN $4 THEN $3 ELSE planned_version END,
             planned_sha = coalesce($5, planned_sha),
             planned_at = CASE WHEN $5 IS NULL THEN planned_at ELSE now() END,
             rechecks = CASE WHEN $8 THEN rechecks + 1 ELSE rechecks END,
             attempts = CASE WHEN $6 IS NULL THEN 0 ELSE attempts END,
             last_error = $6,
             next_attempt_at = CASE WHEN requested_version = $3 AND NOT $4
                                    THEN now() + make_interval(secs => $7)
                                    ELSE next_attempt_at END,
             leased_until = NULL, lease_token = NULL
         WHERE repo_key = lower($1) AND pr = $2 AND lease_token = $9
         RETURNING pr",
    )
    .bind(&claimed.repo)
    .bind(claimed.pr)
    .bind(claimed.version)
    .bind(planned)
    .bind(sha)
    .bind(error)
    .bind(in_secs)
    .bind(recheck)
    .bind(claimed.token)
    .fetch_optional(conn)
    .await
    .map_err(err("finishing a pull request plan"))?;
    Ok(row.is_some())
}

/// Seconds until the next pull request plan is due (negative: now); `None` when none waits.
pub(crate) async fn next_pr_plan_in(pool: &PgPool) -> Result<Option<f64>, StoreError> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM min(greatest(next_attempt_at, coalesce(leased_until, next_attempt_at)))
                                   - now())::float8
         FROM github_pr_plans WHERE requested_version > planned_version",
    )
    .fetch_one(pool)
    .await
    .map_err(err("looking for the next pull request plan"))
}

/// Records the state about to be enqueued for a commit status and says whether it is news: `false`
/// when the same state and description were enqueued last, or, with `only_first`, when any state was.
pub(crate) async fn status_is_news(
    conn: &mut PgConnection,
    repo: &str,
    sha: &str,
    context: &str,
    state: &str,
    description: &str,
    only_first: bool,
) -> Result<bool, StoreError> {
    let statement = if only_first {
        "INSERT INTO github_commit_statuses (repo, sha, context, state, description)
         VALUES (lower($1), lower($2), $3, $4, $5)
         ON CONFLICT (repo, sha, context) DO NOTHING
         RETURNING true"
    } else {
        "INSERT INTO github_commit_statuses (repo, sha, context, state, description)
         VALUES (lower($1), lower($2), $3, $4, $5)
         ON CONFLICT (repo, sha, context) DO UPDATE
         SET state = EXCLUDED.state, description = EXCLUDED.description, updated_at = now()
         WHERE (github_commit_statuses.state, github_commit_statuses.description)
               IS DISTINCT FROM (EXCLUDED.state, EXCLUDED.description)
         RETURNING true"
    };
    let news: Option<bool> = sqlx::query_scalar(statement)
        .bind(repo)
        .bind(sha)
        .bind(context)
        .bind(state)
        .bind(description)
        .fetch_optional(conn)
        .await
        .map_err(err("recording a commit status"))?;
    Ok(news.is_some())
}

/// Remembers where a release's `cairn/deploy` status goes, with the time its push was received.
pub(crate) async fn record_deploy(
    conn: &mut PgConnection,
    app: &str,
    release: i64,
    repo: &str,
    sha: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO github_deploys (app, release, repo, sha, pushed_at)
         VALUES ($1, $2, $3, $4,
                 (SELECT received_at FROM webhook_pushes WHERE app = $1 AND commit = lower($4)))
         ON CONFLICT (app, release) DO NOTHING",
    )
    .bind(app)
    .bind(release)
    .bind(repo)
    .bind(sha)
    .execute(conn)
    .await
    .map_err(err("recording a deploy"))?;
    Ok(())
}

pub(crate) struct DeployRow {
    pub repo: String,
    pub sha: String,
    /// Seconds from the push's receipt to now, when a push brought the commit.
    pub since_push_secs: Option<f64>,
}

/// Marks a release's deploy finished; `None` when its status has nowhere to go.
pub(crate) async fn finish_deploy(
    conn: &mut PgConnection,
    app: &str,
    release: i64,
) -> Result<Option<DeployRow>, StoreError> {
    let row = sqlx::query(
        "UPDATE github_deploys SET finished_at = now() WHERE app = $1 AND release = $2
         RETURNING repo, sha, extract(epoch FROM now() - pushed_at)::float8 AS since_push",
    )
    .bind(app)
    .bind(release)
    .fetch_optional(conn)
    .await
    .map_err(err("finishing a deploy"))?;
    row.map(|row| {
        Ok(DeployRow {
            repo: row.try_get("repo")?,
            sha: row.try_get("sha")?,
            since_push_secs: row.try_get("since_push")?,
        })
    })
    .transpose()
    .map_err(err("reading a finished deploy"))
}

/// Deletes what deliveries left behind and is older than `older_than_secs`: pushes, recorded
/// statuses, deploys, and pull requests planned and not asked about since. Returns the rows deleted.
pub(crate) async fn prune_work(pool: &PgPool, older_than_secs: f64) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for statement in [
        "DELETE FROM webhook_pushes WHERE received_at < now() - make_interval(secs => $1)",
        "DELETE FROM github_commit_statuses WHERE updated_at < now() - make_interval(secs => $1)",
        "DELETE FROM github_deploys WHERE planned_at < now() - make_interval(secs => $1)",
        "DELETE FROM github_pr_plans WHERE requested_version = planned_version
             AND requested_at < now() - make_interval(secs => $1)",
    ] {
        deleted += sqlx::query(statement)
            .bind(older_than_secs)
            .execute(pool)
            .await
            .map_err(err("pruning webhook work"))?
            .rows_affected();
    }
    Ok(deleted)
}

// ---------------------------------------------------------------------------------------------------
// Notifications (`notify_outbox`, `notify_sinks`, `events`: migrations `…170000_events.sql` and
// `…170100_notify.sql`). Rows are inserted by the reconciler, in the events' transactions.

/// A sink as the delivery worker reads it: its URL and signing secret still sealed.
pub(crate) struct SealedSink {
    pub kind: String,
    pub url_sealed: String,
    pub signing_sealed: Option<String>,
}

/// A claimed notification: the row, its event, and its sink (gone if the sink was deleted since).
pub(crate) struct ClaimedNotification {
    pub id: i64,
    pub version: i32,
    /// Including this one.
    pub attempts: i32,
    pub webhook_id: String,
    /// Seconds since the row was queued (retries stop after the window).
    pub age_secs: f64,
    pub sink_name: String,
    pub sink: Option<SealedSink>,
    pub event: cairn_proto::admin::EventInfo,
}

fn event_of(row: &sqlx::postgres::PgRow) -> Result<cairn_proto::admin::EventInfo, sqlx::Error> {
    let release: Option<i64> = row.try_get("release")?;
    Ok(cairn_proto::admin::EventInfo {
        id: row.try_get("event_id")?,
        at: row.try_get("at")?,
        kind: row.try_get("kind")?,
        severity: row.try_get("severity")?,
        app: row.try_get("app")?,
        node: row.try_get("node")?,
        release: release.and_then(|r| u64::try_from(r).ok()),
        commit: row.try_get("commit")?,
        message: row.try_get("message")?,
        detail: row.try_get::<Json<Value>, _>("detail")?.0,
    })
}

/// Takes the next due notification as `outbox_claim` takes a GitHub call: the attempt counted and the
/// row leased for `lease_secs`, committed before the caller sends it.
pub(crate) async fn notify_claim(
    pool: &PgPool,
    lease_secs: f64,
) -> Result<Option<ClaimedNotification>, StoreError> {
    let row = sqlx::query(
        "WITH claimed AS (
             UPDATE notify_outbox
             SET attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $1),
                 updated_at = now()
             WHERE id = (
                 SELECT id FROM notify_outbox
                 WHERE status = 'pending' AND next_attempt_at <= now()
                 ORDER BY next_attempt_at, id
                 LIMIT 1
                 FOR UPDATE SKIP LOCKED
             )
             RETURNING id, event_id, sink, webhook_id, version, attempts, created_at
         )
         SELECT c.id, c.event_id, c.sink, c.webhook_id, c.version, c.attempts,
                extract(epoch FROM now() - c.created_at)::float8 AS age_secs,
                e.at, e.kind, e.severity, e.app, e.node, e.release, e.commit, e.message, e.detail,
                s.kind AS sink_kind, s.url_sealed, s.signing_sealed
         FROM claimed c
         JOIN events e ON e.id = c.event_id
         LEFT JOIN notify_sinks s ON s.name = c.sink",
    )
    .bind(lease_secs)
    .fetch_optional(pool)
    .await
    .map_err(err("claiming a notification"))?;
    row.map(|row| {
        let sink_kind: Option<String> = row.try_get("sink_kind")?;
        let sink = match sink_kind {
            Some(kind) => Some(SealedSink {
                kind,
                url_sealed: row.try_get("url_sealed")?,
                signing_sealed: row.try_get("signing_sealed")?,
            }),
            None => None,
        };
        Ok(ClaimedNotification {
            id: row.try_get("id")?,
            version: row.try_get("version")?,
            attempts: row.try_get("attempts")?,
            webhook_id: row.try_get("webhook_id")?,
            age_secs: row.try_get::<Option<f64>, _>("age_secs")?.unwrap_or(0.0),
            sink_name: row.try_get("sink")?,
            sink,
            event: event_of(&row)?,
        })
    })
    .transpose()
    .map_err(err("reading a claimed notification"))
}

/// Records the receiver's answer to an attempt (its status code, if it answered, and the time taken).
pub(crate) async fn notify_answer(
    pool: &PgPool,
    id: i64,
    status_code: Option<u16>,
    latency_ms: u64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE notify_outbox SET status_code = $2, latency_ms = $3 WHERE id = $1")
        .bind(id)
        .bind(status_code.map(i32::from))
        .bind(i32::try_from(latency_ms).unwrap_or(i32::MAX))
        .execute(pool)
        .await
        .map_err(err("recording a receiver's answer"))?;
    Ok(())
}

/// The applied sinks' names, in order.
pub(crate) async fn notify_sink_names(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar("SELECT name FROM notify_sinks ORDER BY name")
        .fetch_all(pool)
        .await
        .map_err(err("reading the notification sinks"))
}

/// A sink by name, sealed.
pub(crate) async fn notify_sink(
    pool: &PgPool,
    name: &str,
) -> Result<Option<SealedSink>, StoreError> {
    let row =
        sqlx::query("SELECT kind, url_sealed, signing_sealed FROM notify_sinks WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await
            .map_err(err("reading a notification sink"))?;
    row.map(|row| {
        Ok(SealedSink {
            kind: row.try_get("kind")?,
            url_sealed: row.try_get("url_sealed")?,
            signing_sealed: row.try_get("signing_sealed")?,
        })
    })
    .transpose()
    .map_err(err("reading a notification sink"))
}

/// The newest `limit` deliveries (of `sink`), newest first, with their events.
pub(crate) async fn notify_deliveries(
    pool: &PgPool,
    sink: Option<&str>,
    limit: i64,
) -> Result<Vec<cairn_proto::admin::NotifyDelivery>, StoreError> {
    let rows = sqlx::query(
        "SELECT o.id, o.sink, o.webhook_id, o.status, o.attempts, o.last_error, o.status_code,
                o.latency_ms, o.created_at, o.finished_at,
                e.id AS event_id, e.at, e.kind, e.severity, e.app, e.node, e.release, e.commit,
                e.message, e.detail
         FROM notify_outbox o JOIN events e ON e.id = o.event_id
         WHERE ($1::text IS NULL OR o.sink = $1)
         ORDER BY o.id DESC LIMIT $2",
    )
    .bind(sink)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(err("listing notifications"))?;
    rows.iter()
        .map(|row| {
            let code: Option<i32> = row.try_get("status_code")?;
            let latency: Option<i32> = row.try_get("latency_ms")?;
            Ok(cairn_proto::admin::NotifyDelivery {
                id: row.try_get("id")?,
                sink: row.try_get("sink")?,
                webhook_id: row.try_get("webhook_id")?,
                status: row.try_get("status")?,
                attempts: row.try_get::<i32, _>("attempts")?.max(0) as u32,
                status_code: code.and_then(|c| u16::try_from(c).ok()),
                latency_ms: latency.and_then(|l| u64::try_from(l).ok()),
                reason: row.try_get("last_error")?,
                created_at: row.try_get("created_at")?,
                finished_at: row.try_get("finished_at")?,
                event: event_of(row)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(err("reading notifications"))
}
