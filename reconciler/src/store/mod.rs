//! The store: every SQL statement the control plane runs but the task queue's, and nothing else.
//!
//! It is the only module that touches Postgres, with the task queue's statements (`crate::queue`'s
//! `sql`), which the queue keeps beside its API. Its queries are checked against the schema at compile
//! time (`sqlx::query!`), with the results committed in `.sqlx/` at the workspace root, so building needs
//! no database (`.cargo/config.toml` sets `SQLX_OFFLINE=true`). To change a query or a migration: build
//! with `SQLX_OFFLINE=false DATABASE_URL=<a migrated database>`, then run `cargo sqlx prepare
//! --workspace` against it (`cargo install sqlx-cli --no-default-features --features postgres,rustls`)
//! and commit `.sqlx/`. CI builds offline, so stale data fails the build.
//!
//! - [`state`]: the applied config state (generation, resources, env, placements, releases, pins,
//!   restart requests, source heads) and the apply lock;
//! - [`history`]: the record of reconcile runs;
//! - [`progress`]: open tasks and their stage, for a live view (the queue's own statements are in
//!   `crate::queue::sql`);
//! - [`releases`]: release history, build output and replica output for the operator commands, and
//!   their retention;
//! - [`nodes`]: joins, node credentials, heartbeats and what they report, liveness, the node list;
//! - [`tokens`]: join tokens and admin tokens, as hashes;
//! - [`placements`]: one node's placements and those of the slots it reports (drift checks);
//! - [`routes`]: what the cluster route table is computed from (apps' hosts, nodes' addresses and
//!   healthy replicas);
//! - [`certs`]: certificates for the declared names and the ACME accounts, keys only sealed, the
//!   lease that lets one control plane order per name set;
//! - [`events`]: the events table (`crate::events`), written in its cause's transaction;
//! - [`changes`]: whether anything the planner reads changed since the last plan (marks, generation,
//!   heartbeats), so an idle tick skips planning;
//! - [`lease`]: the leader's lease (epoch, fencing of its transactions) and the replicas registry;
//! - [`status`]: a page of `cairn status` (some apps, every node, use summed), in one snapshot;
//! - [`metrics`]: what `/metrics` reads when scraped (queue depth, nodes by state, release timings).
//!
//! Functions that belong in a larger transaction take `&mut PgConnection` (pass `&mut *tx`); the few that
//! are a transaction of their own take the pool.
//!
//! What it must not do: decide anything (which resources change, where replicas go and which tasks
//! follow are the planner's; the store writes what it is given), hold a connection while waiting on
//! anything but Postgres, or put a secret's plaintext into a column, a log line or an error.

pub mod certs;
pub mod changes;
pub mod databases;
pub mod declarations;
pub(crate) mod decode;
pub mod events;
pub mod failover;
pub mod history;
pub mod lease;
pub mod listen;
pub mod metrics;
pub mod nodes;
pub mod placements;
pub mod progress;
pub mod releases;
pub mod routes;
pub mod state;
pub mod status;
pub mod tls;
pub mod tokens;
pub mod usage;

use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

pub use history::{NewReconciliation, ReconcileStatus, Reconciliation, RecordedError};
pub use state::{ConfigState, ReleaseInsert, Written};

/// The schema, embedded: `migrations/` at the workspace root.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// What went wrong talking to Postgres. The `sqlx` error is chained as the source, never shown in the
/// message itself (it can quote a statement's parameters).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] sqlx::Error),
    /// Several database hosts were given and none of them took writes in time.
    #[error("no writable PostgreSQL primary among {hosts}")]
    NoPrimary { hosts: String },
    #[error("cannot bring the database schema up to date")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("database operation failed: {op}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A value in the database that this version cannot read: a newer control plane wrote it, or it was
    /// edited by hand.
    #[error("unexpected value in {table}.{column}: {detail}")]
    Corrupt {
        table: &'static str,
        column: &'static str,
        detail: String,
    },
    /// A value too large for its column (counts and numbers are `u64` in Rust, `bigint` in SQL).
    #[error("{what} {value} does not fit the database column")]
    OutOfRange { what: &'static str, value: u64 },
    /// The applied state moved on since the caller read it: another control plane applied first.
    #[error(
        "the applied state is at generation {current}, not {expected} as this change assumed: plan again"
    )]
    GenerationConflict { expected: u64, current: u64 },
    /// An app's secret env var has no fingerprint among those given.
    #[error(
        "secret `{key}` of app `{app}` has no fingerprint: apply with the control plane's identity"
    )]
    MissingFingerprint { app: String, key: String },
    /// This control plane's leadership term ended (another took the lease, or it could not renew it in
    /// time): a leader's transaction is refused rather than written.
    #[error("this control plane is no longer the leader (its term {epoch} ended)")]
    Deposed { epoch: u64 },
}

/// Attaches the operation's name to a `sqlx` error.
pub(crate) trait Op<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T> Op<T> for Result<T, sqlx::Error> {
    fn op(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| {
            // Connection lost, read-only, shutting down: the primary may have moved.
            if failover::symptom(&source) {
                failover::suspect();
            }
            StoreError::Query { op, source }
        })
    }
}

/// A pool for the control plane. The acquire timeout turns an exhausted pool or an unreachable server into
/// an error instead of a hang. `url` may name several hosts ([`failover::Database::open`]): the pool
/// goes to the writable one, found when it is made; `cairn serve` makes its pools from one
/// [`failover::Database`] and watches it, so they follow a failover.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    failover::Database::open(url)?.pool(max_connections).await
}

/// Applies the migrations this binary embeds that the database lacks. Refuses a database on which a
/// migration this binary knows was applied with other contents (see `migrations/README.md`).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await.map_err(StoreError::Migrate)
}

/// Whether the database answers and takes writes (the readiness probe): a standby, or a primary that
/// pg_auto_failover holds read-only while it promotes or demotes it, does not.
pub async fn ping(pool: &PgPool) -> Result<bool, StoreError> {
    sqlx::query_scalar::<_, bool>(
        "SELECT NOT (pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on')",
    )
    .fetch_one(pool)
    .await
    .op("ping the database")
}

/// `sha256:` and the hex SHA-256 of bytes: the format of every `spec_hash`.
pub(crate) fn sha256_tagged(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(crate) fn to_i64(what: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}

pub(crate) fn to_u64(
    table: &'static str,
    column: &'static str,
    value: i64,
) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        table,
        column,
        detail: format!("{value} is negative"),
    })
}
