//! Where the config repository declares each app and node (migration `…190300_declarations.sql`): the
//! statements behind [`crate::declared`], which decides what moved and makes the links.

use sqlx::PgPool;

use super::{Op as _, StoreError};

/// One declaration: its kind (`app`, `node`) and name, and the file and line that declare it.
pub type Row = (String, String, String, i32);

/// Deletes the declarations `gone` (kind, name) and writes `moved` (kind, name, path, line) as of
/// `commit`, in one transaction.
pub async fn write(
    pool: &PgPool,
    commit: &str,
    gone: &[(&str, &str)],
    moved: &[(&str, &str, &str, i32)],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.op("record declarations")?;
    if !gone.is_empty() {
        sqlx::query(
            "DELETE FROM declarations d USING unnest($1::text[], $2::text[]) g(kind, name)
             WHERE d.kind = g.kind AND d.name = g.name",
        )
        .bind(gone.iter().map(|g| g.0).collect::<Vec<_>>())
        .bind(gone.iter().map(|g| g.1).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .op("delete declarations")?;
    }
    for chunk in moved.chunks(10_000) {
        sqlx::query(
            "INSERT INTO declarations (kind, name, commit, path, line)
             SELECT m.kind, m.name, $1, m.path, m.line
             FROM unnest($2::text[], $3::text[], $4::text[], $5::int[]) m(kind, name, path, line)
             ON CONFLICT (kind, name) DO UPDATE SET
                 commit = EXCLUDED.commit, path = EXCLUDED.path, line = EXCLUDED.line",
        )
        .bind(commit)
        .bind(chunk.iter().map(|m| m.0).collect::<Vec<_>>())
        .bind(chunk.iter().map(|m| m.1).collect::<Vec<_>>())
        .bind(chunk.iter().map(|m| m.2).collect::<Vec<_>>())
        .bind(chunk.iter().map(|m| m.3).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .op("write declarations")?;
    }
    tx.commit().await.op("record declarations")
}

/// Every stored declaration.
pub async fn all(pool: &PgPool) -> Result<Vec<Row>, StoreError> {
    sqlx::query_as("SELECT kind, name, path, line FROM declarations")
        .fetch_all(pool)
        .await
        .op("read declarations")
}

/// The declaration of `kind` `name`: the commit whose file has it, the path and the line.
pub async fn one(
    pool: &PgPool,
    kind: &str,
    name: &str,
) -> Result<Option<(String, String, i32)>, StoreError> {
    sqlx::query_as("SELECT commit, path, line FROM declarations WHERE kind = $1 AND name = $2")
        .bind(kind)
        .bind(name)
        .fetch_optional(pool)
        .await
        .op("read a declaration")
}
