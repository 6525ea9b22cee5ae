//! The history of reconcile runs (`reconciliations`): one row per run, applied, failed or a no-op.
//!
//! Bounded: a failed run stores its first [`MAX_RECORDED_ERRORS`] errors (each message at most
//! [`MAX_MESSAGE_CHARS`] characters) and how many there were; a failed run of the same commit with the
//! same errors as the newest row bumps that row's `repeats` instead of adding one (an invalid head would
//! otherwise store all its errors again every interval); failed and no-op rows older than the retention
//! are pruned ([`prune_reconciliations`]).
//!
//! What it must not do: record a secret (error messages come from the schema's diagnostics, which never
//! quote one), or change a row once written other than counting its repeats.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::{PgConnection, PgPool};

use super::{Op as _, StoreError, to_i64, to_u64};

/// How a reconcile run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconcileStatus {
    /// A plan with changes was applied.
    Applied,
    /// Nothing was applied: the commit was invalid, or applying failed. `errors` says why.
    Failed,
    /// The plan was empty.
    Noop,
}

impl ReconcileStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileStatus::Applied => "applied",
            ReconcileStatus::Failed => "failed",
            ReconcileStatus::Noop => "noop",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "applied" => Ok(ReconcileStatus::Applied),
            "failed" => Ok(ReconcileStatus::Failed),
            "noop" => Ok(ReconcileStatus::Noop),
            other => Err(StoreError::Corrupt {
                table: "reconciliations",
                column: "status",
                detail: format!("unknown status `{other}`"),
            }),
        }
    }
}

/// One error of a failed run: `path:line:col: message` when it points into the repository, the message
/// alone otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub col: Option<u32>,
    pub message: String,
}

impl std::fmt::Display for RecordedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.path, self.line, self.col) {
            (Some(p), Some(l), Some(c)) => write!(f, "{p}:{l}:{c}: {}", self.message),
            (Some(p), Some(l), None) => write!(f, "{p}:{l}: {}", self.message),
            (Some(p), None, _) => write!(f, "{p}: {}", self.message),
            (None, ..) => f.write_str(&self.message),
        }
    }
}

/// A run to record.
#[derive(Debug, Clone)]
pub struct NewReconciliation<'a> {
    /// The config source: a git URL or a directory.
    pub source: &'a str,
    /// The commit read; `None` when the source could not be read.
    pub commit: Option<&'a str>,
    /// What woke the reconciler ([`Trigger::as_str`]).
    pub trigger: &'a str,
    pub status: ReconcileStatus,
    /// The generation after the run.
    pub generation: Option<u64>,
    /// The plan's summary line, or the first error.
    pub summary: &'a str,
    /// Why a failed run failed; must not be empty for [`ReconcileStatus::Failed`].
    pub errors: &'a [RecordedError],
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// How many errors of a failed run are stored; `errors_total` says how many there were.
pub const MAX_RECORDED_ERRORS: usize = 20;
/// How many characters of one error's message (and of the summary) are stored.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// A recorded run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reconciliation {
    pub id: i64,
    pub source: String,
    pub commit: Option<String>,
    pub trigger: String,
    pub status: ReconcileStatus,
    pub generation: Option<u64>,
    pub summary: String,
    /// The first [`MAX_RECORDED_ERRORS`] errors.
    pub errors: Vec<RecordedError>,
    /// How many errors the run had (more than `errors` holds when it was cut).
    #[serde(default)]
    pub errors_total: u64,
    /// How many runs this row stands for: the same commit failing the same way again adds one.
    #[serde(default = "one")]
    pub repeats: u32,
    /// When the last of those repeats ended (`None` for a run that did not repeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<DateTime<Utc>>,
    pub duration_ms: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

fn one() -> u32 {
    1
}

/// `s`, cut to `max` characters (with `…` when cut).
fn bounded(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => s.into(),
        Some((i, _)) => format!("{}…", &s[..i]).into(),
    }
}

/// What is stored of a run's errors: the first few, each message bounded.
fn stored_errors(errors: &[RecordedError]) -> Vec<RecordedError> {
    errors
        .iter()
        .take(MAX_RECORDED_ERRORS)
        .map(|e| RecordedError {
            message: bounded(&e.message, MAX_MESSAGE_CHARS).into_owned(),
            ..e.clone()
        })
        .collect()
}

/// A digest of every error (not only the stored ones): equal digests mean the run failed the same way.
fn errors_digest(errors: &[RecordedError]) -> String {
    let mut h = Sha256::new();
    for e in errors {
        let line = e.to_string();
        h.update((line.len() as u64).to_le_bytes());
        h.update(line.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Records a run and returns its id.
pub async fn record_reconciliation(
    conn: &mut PgConnection,
    run: &NewReconciliation<'_>,
) -> Result<i64, StoreError> {
    let generation = run
        .generation
        .map(|g| to_i64("generation", g))
        .transpose()?;
    let duration_ms = (run.finished_at - run.started_at).num_milliseconds().max(0);
    let errors =
        serde_json::to_value(stored_errors(run.errors)).expect("recorded errors serialize");
    let total = i32::try_from(run.errors.len()).unwrap_or(i32::MAX);
    let digest = (!run.errors.is_empty()).then(|| errors_digest(run.errors));
    let summary = bounded(run.summary, MAX_MESSAGE_CHARS);
    sqlx::query_scalar!(
        r#"INSERT INTO reconciliations
               (source, commit, trigger, status, generation, summary, errors, duration_ms, started_at,
                finished_at, errors_total, errors_digest)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
           RETURNING id"#,
        run.source,
        run.commit,
        run.trigger,
        run.status.as_str(),
        generation,
        summary.as_ref(),
        errors,
        duration_ms,
        run.started_at,
        run.finished_at,
        total,
        digest,
    )
    .fetch_one(conn)
    .await
    .op("record a reconciliation")
}

/// Records a failed run, unless the newest row is a failure of the same source and commit with the same
/// errors: then that row's `repeats` goes up by one and its `last_at` is this run's end. Returns the row's
/// id and whether it was such a repeat (the caller then has nothing new to tell anyone).
pub async fn record_failed(
    conn: &mut PgConnection,
    run: &NewReconciliation<'_>,
) -> Result<(i64, bool), StoreError> {
    let digest = errors_digest(run.errors);
    let repeated = sqlx::query_scalar!(
        r#"UPDATE reconciliations r SET repeats = r.repeats + 1, last_at = $4
           WHERE r.id = (SELECT id FROM reconciliations ORDER BY finished_at DESC, id DESC LIMIT 1)
             AND r.status = 'failed' AND r.source = $1 AND r.commit IS NOT DISTINCT FROM $2
             AND r.errors_digest = $3
           RETURNING r.id"#,
        run.source,
        run.commit,
        digest,
        run.finished_at,
    )
    .fetch_optional(&mut *conn)
    .await
    .op("count a repeated failed reconciliation")?;
    match repeated {
        Some(id) => Ok((id, true)),
        None => Ok((record_reconciliation(conn, run).await?, false)),
    }
}

/// Deletes failed and no-op runs that ended (with all their repeats) before `before`, in batches of
/// `batch` rows; applied runs stay (they say which commits were applied), and so does the newest row
/// whatever it is (`cairn status` shows it). Returns how many rows went.
pub async fn prune_reconciliations(
    pool: &PgPool,
    before: DateTime<Utc>,
    batch: u32,
) -> Result<u64, StoreError> {
    let batch = i64::from(batch.max(1));
    let mut pruned = 0;
    loop {
        let n = sqlx::query!(
            r#"DELETE FROM reconciliations WHERE id IN (
                   SELECT id FROM reconciliations
                   WHERE status <> 'applied' AND finished_at < $1 AND (last_at IS NULL OR last_at < $1)
                     AND id <> (SELECT id FROM reconciliations ORDER BY finished_at DESC, id DESC LIMIT 1)
                   LIMIT $2)"#,
            before,
            batch,
        )
        .execute(pool)
        .await
        .op("prune old reconciliations")?
        .rows_affected();
        pruned += n;
        if n < batch as u64 {
            return Ok(pruned);
        }
    }
}

/// The most recent runs, newest first.
pub async fn recent_reconciliations(
    conn: &mut PgConnection,
    limit: u32,
) -> Result<Vec<Reconciliation>, StoreError> {
    let rows = sqlx::query!(
        r#"SELECT id, source, commit, trigger, status, generation, summary, errors, duration_ms,
                  started_at, finished_at, errors_total, repeats, last_at
           FROM reconciliations
           ORDER BY finished_at DESC, id DESC
           LIMIT $1"#,
        i64::from(limit),
    )
    .fetch_all(conn)
    .await
    .op("read recent reconciliations")?;
    rows.into_iter()
        .map(|r| {
            let errors: Vec<RecordedError> =
                serde_json::from_value(r.errors).map_err(|e| StoreError::Corrupt {
                    table: "reconciliations",
                    column: "errors",
                    detail: e.to_string(),
                })?;
            Ok(Reconciliation {
                id: r.id,
                errors_total: r
                    .errors_total
                    .map_or(errors.len() as u64, |t| u64::try_from(t).unwrap_or(0)),
                repeats: u32::try_from(r.repeats).unwrap_or(1),
                last_at: r.last_at,
                errors,
                status: ReconcileStatus::parse(&r.status)?,
                generation: r
                    .generation
                    .map(|g| to_u64("reconciliations", "generation", g))
                    .transpose()?,
                duration_ms: to_u64("reconciliations", "duration_ms", r.duration_ms)?,
                source: r.source,
                commit: r.commit,
                trigger: r.trigger,
                summary: r.summary,
                started_at: r.started_at,
                finished_at: r.finished_at,
            })
        })
        .collect()
}

/// Whether `commit` was applied by an earlier run. The controller asks when its git cache cannot see the
/// applied commit (a cold cache after a force-push): a commit applied before the current one is older and
/// must not be applied again.
///
/// A runtime-checked query: it was added after the offline query data, and it is small enough to read.
pub async fn was_applied(conn: &mut PgConnection, commit: &str) -> Result<bool, StoreError> {
    sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM reconciliations WHERE commit = $1 AND status = 'applied')",
    )
    .bind(commit)
    .fetch_one(conn)
    .await
    .op("look a commit up in the history")
}

/// What woke a reconcile. Triggers only wake: none carries a change. Its text ([`Trigger::as_str`]) is
/// what the history records and the `reconcile` span shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `cairn serve`'s first run.
    Startup,
    /// `cairn serve`'s interval passed.
    Timer,
    /// Something woke `cairn serve`'s loop: a file change, a webhook, a node going offline, an operator's
    /// command through the API.
    Wake,
    /// `cairn apply` (and the failed attempt it records).
    Manual,
    /// `cairn dev` applying its example.
    Dev,
}

impl Trigger {
    /// The text the history stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Timer => "timer",
            Trigger::Wake => "wake",
            Trigger::Manual => "manual",
            Trigger::Dev => "dev",
        }
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
