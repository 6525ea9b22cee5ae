//! What `/metrics` reads from Postgres when it is scraped (state rather than events: the queue's depth,
//! nodes by state), and what a release that went live took.

use sqlx::{PgConnection, PgPool};

use super::{Op as _, StoreError, to_i64};

/// Tasks waiting or in flight (queued, leased, failed and waiting for a retry), by status and kind.
/// Finished tasks (done, dead) are not counted: the table keeps them, and counting them would cost a
/// scan of the whole history on every scrape.
pub async fn open_tasks(pool: &PgPool) -> Result<Vec<(String, String, i64)>, StoreError> {
    let rows = sqlx::query!(
        r#"SELECT status, kind, count(*) AS "n!"
           FROM tasks WHERE status IN ('queued', 'leased', 'failed')
           GROUP BY status, kind"#
    )
    .fetch_all(pool)
    .await
    .op("count open tasks")?;
    Ok(rows.into_iter().map(|r| (r.status, r.kind, r.n)).collect())
}

/// Declared nodes by state (a node that never joined is pending).
pub async fn nodes_by_state(pool: &PgPool) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = sqlx::query!(
        r#"SELECT coalesce(s.state, 'pending') AS "state!", count(*) AS "n!"
           FROM nodes n LEFT JOIN node_status s ON s.node = n.name
           GROUP BY 1"#
    )
    .fetch_all(pool)
    .await
    .op("count nodes by state")?;
    Ok(rows.into_iter().map(|r| (r.state, r.n)).collect())
}

/// Merges one replica's deploy stage timings (milliseconds by stage) into its release's: a stage's time is
/// the slowest replica's, since the release runs when its last replica does.
pub async fn record_stage_timings(
    pool: &PgPool,
    app: &str,
    release: u64,
    timings: &serde_json::Value,
) -> Result<(), StoreError> {
    sqlx::query!(
        r#"UPDATE releases r SET stage_timings = (
               SELECT coalesce(jsonb_object_agg(k, v), '{}'::jsonb) FROM (
                   SELECT k, max(v) AS v FROM (
                       SELECT key AS k, value::bigint AS v FROM jsonb_each_text(r.stage_timings)
                       UNION ALL
                       SELECT key, value::bigint FROM jsonb_each_text($3::jsonb)
                   ) s GROUP BY k
               ) m)
           WHERE app = $1 AND number = $2"#,
        app,
        to_i64("release", release)?,
        timings,
    )
    .execute(pool)
    .await
    .op("record a deploy's stage timings")?;
    Ok(())
}

/// A finished release's stage timings (milliseconds by stage, as its agents reported them) and the
/// seconds from its creation to its end.
pub async fn release_timings(
    conn: &mut PgConnection,
    app: &str,
    release: u64,
) -> Result<Option<(serde_json::Value, Option<f64>)>, StoreError> {
    let row = sqlx::query!(
        r#"SELECT stage_timings,
                  extract(epoch FROM finished_at - created_at)::float8 AS "secs"
           FROM releases WHERE app = $1 AND number = $2"#,
        app,
        to_i64("release", release)?,
    )
    .fetch_optional(conn)
    .await
    .op("read a release's stage timings")?;
    Ok(row.map(|r| (r.stage_timings, r.secs)))
}
