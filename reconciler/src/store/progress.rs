//! Work in progress, for a live view (`cairn dev`): the tasks not finished yet, with what their agent
//! last said about them (a stage such as `building image`, from the agent API's progress calls) and for
//! how long.

use std::fmt;

use sqlx::PgPool;

use super::{Op as _, StoreError};

/// An open task (queued, leased, or failed and waiting for its retry).
#[derive(Debug, Clone, PartialEq)]
pub struct OpenTask {
    pub id: i64,
    pub node: String,
    pub kind: String,
    pub app: String,
    pub slot: Option<i32>,
    pub release: Option<i64>,
    pub status: String,
    pub attempts: i32,
    pub progress: Option<String>,
    pub last_error: Option<String>,
    /// Seconds since it was created.
    pub age_secs: f64,
}

impl fmt::Display for OpenTask {
    /// `deploy hello r2 slot 1 on local-1: building image (leased, attempt 2)`; no age, so that it
    /// changes only when the task does.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.app)?;
        if let Some(r) = self.release {
            write!(f, " r{r}")?;
        }
        if let Some(s) = self.slot {
            write!(f, " slot {s}")?;
        }
        write!(f, " on {}", self.node)?;
        match (&self.progress, self.status.as_str()) {
            (Some(p), _) => write!(f, ": {p}")?,
            (None, "queued") => f.write_str(": waiting for the agent")?,
            (None, _) => {}
        }
        write!(f, " ({}", self.status)?;
        if self.attempts > 1 {
            write!(f, ", attempt {}", self.attempts)?;
        }
        f.write_str(")")?;
        if let (Some(e), "failed") = (&self.last_error, self.status.as_str()) {
            // The whole error is in the agent's log and `cairn logs`; a view line keeps its start.
            let cut: String = e.chars().take(160).collect();
            let more = if cut.len() < e.len() { "..." } else { "" };
            write!(f, "; last error: {cut}{more}")?;
        }
        Ok(())
    }
}

/// The oldest `limit` open tasks.
pub async fn open_tasks(pool: &PgPool, limit: i64) -> Result<Vec<OpenTask>, StoreError> {
    let rows = sqlx::query!(
        r#"SELECT id, node, kind, app, slot, release, status, attempts, progress, last_error,
                  EXTRACT(EPOCH FROM (now() - created_at))::float8 AS "age!"
           FROM tasks
           WHERE status IN ('queued', 'leased', 'failed')
           ORDER BY id
           LIMIT $1"#,
        limit
    )
    .fetch_all(pool)
    .await
    .op("read the open tasks")?;
    Ok(rows
        .into_iter()
        .map(|r| OpenTask {
            id: r.id,
            node: r.node,
            kind: r.kind,
            app: r.app,
            slot: r.slot,
            release: r.release,
            status: r.status,
            attempts: r.attempts,
            progress: r.progress,
            last_error: r.last_error,
            age_secs: r.age,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_task_reads_as_one_line_with_its_stage() {
        let mut t = OpenTask {
            id: 7,
            node: "local-1".into(),
            kind: "deploy".into(),
            app: "hello".into(),
            slot: Some(2),
            release: Some(3),
            status: "leased".into(),
            attempts: 1,
            progress: Some("building image".into()),
            last_error: None,
            age_secs: 12.0,
        };
        assert_eq!(
            t.to_string(),
            "deploy hello r3 slot 2 on local-1: building image (leased)"
        );
        t.progress = None;
        t.status = "failed".into();
        t.attempts = 2;
        t.last_error = Some("x".repeat(500));
        let line = t.to_string();
        assert!(
            line.starts_with(
                "deploy hello r3 slot 2 on local-1 (failed, attempt 2); last error: xxx"
            )
        );
        assert!(line.ends_with("x..."), "{line}");
        assert!(line.len() < 250, "{line}");
    }
}
