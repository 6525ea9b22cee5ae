//! Managed databases on this node: an engine's own server (Debian's PostgreSQL, Redis or MariaDB
//! binaries, supervised like a process replica, its data directory under the agent's data directory),
//! its credentials, and its backups and restores streamed with a SHA-256 to a directory or an
//! S3-compatible store.
//!
//! The agent loop calls these for the database tasks the control plane sends; they never decide whether
//! to act. What they must not do: put a password, a connection URL with its password, or an S3 secret
//! key into an error, a log line or a report.
//!
//! CONTRACT (lead, 2026-12-06): the signatures below are what the task runner calls (helper `db` writes
//! the runner and the control plane against them; helper `dbengine` implements them). Change a signature
//! only by agreement through the lead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use cairn_schema::database::{BackupTo, Engine};
use cairn_schema::{Name, Secret};

/// One database server on this node.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The `[database.NAME]` it serves (a restore `--into NEW` is an instance of its own name).
    pub name: Name,
    pub engine: Engine,
    /// The manifest's `version` (PostgreSQL's major version, e.g. "15"); the engine refuses one the
    /// node has no binaries for, naming what it has.
    pub version: String,
    /// Its data directory, under the agent's data directory; created by [`ensure`].
    pub dir: PathBuf,
    /// The port it listens on (the control plane chooses it; loopback and the node's address).
    pub port: u16,
}

/// A login on an instance. Debug redacts the password.
#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub password: Secret,
    /// The database (PostgreSQL, MariaDB) or the number (Redis, "0").
    pub database: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .finish()
    }
}

/// Where one backup goes or comes from, with what reaching it needs.
#[derive(Debug, Clone)]
pub struct Target {
    pub to: BackupTo,
    /// For `S3`: the endpoint URL (e.g. `http://127.0.0.1:9000`; `None` is AWS), region and keys.
    pub s3: Option<S3Access>,
}

/// An S3-compatible store's endpoint and credentials (age secrets in the manifest, opened by the agent).
#[derive(Debug, Clone)]
pub struct S3Access {
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
}

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// The object's key below the target (`<database>/<id>.<ext>`).
    pub object: String,
    pub bytes: u64,
    /// Hex SHA-256 of exactly the bytes stored.
    pub sha256: String,
    pub duration: Duration,
}

/// Why a database operation failed: one line a person can act on, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The node cannot run this (no binaries for the engine or version, a bad target): retrying cannot help.
    #[error("{0}")]
    Unsupported(String),
    /// Anything else; a later attempt may succeed.
    #[error("{0}")]
    Failed(String),
}

/// Creates the instance's data directory if it has none (and the admin login in it), starts its server
/// if it is not running (adopting one a previous agent started), and makes `app` exist with its
/// password (creating or updating it: this is also how a rotation sets the new password). Returns when
/// the server accepts `app`'s login.
pub async fn ensure(instance: &Instance, app: &Login) -> Result<(), DbError> {
    let _ = (instance, app);
    Err(DbError::Unsupported(
        "managed databases are not built yet".into(),
    ))
}

/// Stops the instance's server, keeping its data directory.
pub async fn stop(instance: &Instance) -> Result<(), DbError> {
    let _ = instance;
    Err(DbError::Unsupported(
        "managed databases are not built yet".into(),
    ))
}

/// Stops the instance and deletes its data directory (only ever asked for by an explicit drop).
pub async fn destroy(instance: &Instance) -> Result<(), DbError> {
    let _ = instance;
    Err(DbError::Unsupported(
        "managed databases are not built yet".into(),
    ))
}

/// Dumps the instance (`pg_dump -Fc`, `mariadb-dump --single-transaction`, a Redis snapshot) and streams
/// it to `target` under `object`, hashing the bytes as they go.
pub async fn backup(
    instance: &Instance,
    login: &Login,
    target: &Target,
    object: &str,
) -> Result<Backup, DbError> {
    let _ = (instance, login, target, object);
    Err(DbError::Unsupported(
        "managed databases are not built yet".into(),
    ))
}

/// Restores `object` from `target` into `instance` (which [`ensure`] made and which must be empty),
/// refusing it when its SHA-256 is not `sha256`.
pub async fn restore(
    instance: &Instance,
    login: &Login,
    target: &Target,
    object: &str,
    sha256: &str,
) -> Result<(), DbError> {
    let _ = (instance, login, target, object, sha256);
    Err(DbError::Unsupported(
        "managed databases are not built yet".into(),
    ))
}

/// Row counts per table (PostgreSQL, MariaDB) or keys per database (Redis): what a verification restore
/// compares with the original.
pub async fn counts(instance: &Instance, login: &Login) -> Result<BTreeMap<String, u64>, DbError> {
    let _ = (instance, login);
    Err(DbError::Unsupported(
        "managed databases are not built yet".into(),
    ))
}

/// The URL an attached app receives (`postgres://user:password@host:port/db`, `redis://...`,
/// `mysql://...`), its password percent-encoded; a secret.
pub fn url(instance: &Instance, login: &Login, host: &str) -> Secret {
    let _ = (instance, login, host);
    Secret::new(Vec::new())
}
