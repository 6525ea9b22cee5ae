//! The database of `cairn dev`: the server at `DATABASE_URL` when one is given, else a private cluster
//! (`cairn-pgdev`) under the state directory, started here and stopped when `cairn dev` stops.

use std::path::Path;

use anyhow::{Context, Result, bail};
use cairn_pgdev::{Cluster, Error as PgError};
use sqlx::Connection as _;

/// The database `cairn dev` uses in its private cluster.
const DATABASE: &str = "cairn";

/// Where the database is, and the cluster to stop afterwards when it is ours.
#[derive(Debug)]
pub struct Database {
    pub url: String,
    pub cluster: Option<Cluster>,
}

impl Database {
    /// Stops the private cluster, if there is one.
    pub fn stop(&self) -> Result<()> {
        if let Some(c) = &self.cluster {
            c.stop().context("cannot stop PostgreSQL")?;
        }
        Ok(())
    }

    /// The pid of the private cluster's server.
    pub fn server_pid(&self) -> Option<i32> {
        self.cluster.as_ref().and_then(Cluster::postmaster_pid)
    }
}

/// Starts (or finds running) the private cluster under `state/pg`, creates its `cairn` database (after
/// dropping it, with `reset`), and returns its URL.
pub async fn private(state: &Path, reset: bool) -> Result<Database> {
    let bin = cairn_pgdev::find_bindir(
        std::env::var_os("CAIRN_PG_BINDIR")
            .filter(|v| !v.is_empty())
            .map(|d| (d.into(), "CAIRN_PG_BINDIR")),
    )
    .map_err(explain)?;
    let run_as = cairn_pgdev::server_account().map_err(explain)?;
    let major = cairn_pgdev::major_version(&bin)?;
    let root = cairn_pgdev::reachable_root(
        state.join("pg").join(&major),
        run_as,
        &format!("cairn-dev-pg-{major}"),
    );
    let cluster = Cluster::new(bin, root, run_as, "cairn dev");
    let running = {
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.ensure_running())
            .await
            .context("the PostgreSQL start-up task failed")?
            .with_context(|| format!("cannot start PostgreSQL in {}", cluster.root.display()))?
    };
    let admin_url = format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres",
        running.password, running.port
    );
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .context("cannot connect to the private PostgreSQL")?;
    if reset {
        sqlx::raw_sql(&format!(
            r#"DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)"#
        ))
        .execute(&mut admin)
        .await
        .context("cannot drop the database for --reset")?;
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DATABASE)
            .fetch_one(&mut admin)
            .await
            .context("cannot list the databases")?;
    if !exists {
        sqlx::raw_sql(&format!(r#"CREATE DATABASE "{DATABASE}""#))
            .execute(&mut admin)
            .await
            .context("cannot create the database")?;
    }
    let _ = admin.close().await;
    Ok(Database {
        url: format!(
            "postgres://postgres:{}@127.0.0.1:{}/{DATABASE}",
            running.password, running.port
        ),
        cluster: Some(cluster),
    })
}

/// A missing server gets the install instructions; other failures pass through.
fn explain(e: PgError) -> anyhow::Error {
    match e {
        PgError::Unavailable(why) => anyhow::anyhow!(
            "cairn dev needs PostgreSQL: {why}.\nTo fix: {}, or set CAIRN_PG_BINDIR to a directory \
             holding initdb, pg_ctl and postgres, or set DATABASE_URL to a database cairn dev may use.",
            cairn_pgdev::INSTALL_HINT
        ),
        other => anyhow::Error::new(other),
    }
}

/// Refuses a `DATABASE_URL` that is not a PostgreSQL URL before anything starts.
pub fn given(url: &str) -> Result<Database> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!("DATABASE_URL must be a postgres:// URL");
    }
    Ok(Database {
        url: url.to_owned(),
        cluster: None,
    })
}
