//! The history of reconcile runs (`reconciliations`): one row per run, applied, failed or a no-op.
//!
//! What it must not do: record a secret (error messages come from the schema's diagnostics, which never
//! quote one) or update a row once written.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

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
    /// What woke the reconciler: `timer`, `webhook`, `file`, `manual`, `node`.
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
    pub errors: Vec<RecordedError>,
    pub duration_ms: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
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
    let errors = serde_json::to_value(run.errors).expect("recorded errors serialize");
    sqlx::query_scalar!(
        r#"INSERT INTO reconciliations
               (source, commit, trigger, status, generation, summary, errors, duration_ms, started_at,
                finished_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           RETURNING id"#,
        run.source,
        run.commit,
        run.trigger,
        run.status.as_str(),
        generation,
        run.summary,
        errors,
        duration_ms,
        run.started_at,
        run.finished_at,
    )
    .fetch_one(conn)
    .await
    .op("record a reconciliation")
}

/// The most recent runs, newest first.
pub async fn recent_reconciliations(
    conn: &mut PgConnection,
    limit: u32,
) -> Result<Vec<Reconciliation>, StoreError> {
    let rows = sqlx::query!(
        r#"SELECT id, source, commit, trigger, status, generation, summary, errors, duration_ms,
                  started_at, finished_at
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
            Ok(Reconciliation {
                id: r.id,
                status: ReconcileStatus::parse(&r.status)?,
                generation: r
                    .generation
                    .map(|g| to_u64("reconciliations", "generation", g))
                    .transpose()?,
                errors: serde_json::from_value(r.errors).map_err(|e| StoreError::Corrupt {
                    table: "reconciliations",
                    column: "errors",
                    detail: e.to_string(),
                })?,
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
