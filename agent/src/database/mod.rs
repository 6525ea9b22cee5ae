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
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use cairn_schema::database::{BackupTo, Engine};
use cairn_schema::{Name, Secret};

mod container;
mod mariadb;
mod postgres;
mod redis;
mod server;
mod target;

use server::{Scrub, Tool};

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
    /// Where its server runs: the engine's binaries on this node, or an image with a named volume.
    pub runtime: Runtime,
}

/// Where a server runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Runtime {
    /// The engine's own binaries on this node, the data in [`Instance::dir`].
    #[default]
    Process,
    /// A container of an image, the data in a named volume: the Docker driver's way.
    Container(Container),
}

/// A server's container: [`Instance::dir`] keeps only what the agent needs (the admin password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The engine's image (PostgreSQL: its binaries on `PATH`, an account `postgres` owning
    /// `/var/lib/postgresql`, as in the official `postgres:<version>` images).
    pub image: String,
    /// The container's name, and its volume's.
    pub name: String,
    /// Labels on both (the installation, the node, the instance), so they are found and cleaned.
    pub labels: Vec<(String, String)>,
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
    /// What the database held when it was dumped: its [`counts`] just before and just after the dump,
    /// `None` when those differ (it was written to meanwhile, so no count is the dump's for sure).
    pub counts: Option<BTreeMap<String, u64>>,
}

/// What a verification restore found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The scratch restore's [`counts`].
    pub counts: BTreeMap<String, u64>,
    /// The restored object's size.
    pub bytes: u64,
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
    let scrub = scrub_for(instance, Some(app), None);
    match instance.engine {
        Engine::Postgres => postgres::ensure(instance, app, &scrub).await,
        Engine::Redis => redis::ensure(instance, app, &scrub).await,
        Engine::Mariadb => mariadb::ensure(instance, app, &scrub).await,
    }
}

/// Stops the instance's server, keeping its data directory.
pub async fn stop(instance: &Instance) -> Result<(), DbError> {
    if let Runtime::Container(c) = &instance.runtime {
        return container::stop(c).await;
    }
    let (pidfile, cwd, signal) = match instance.engine {
        Engine::Postgres => postgres::pid_site(instance),
        Engine::Redis => redis::pid_site(instance),
        Engine::Mariadb => mariadb::pid_site(instance),
    };
    if let Some(pid) = server::live_pid(&pidfile, &cwd) {
        server::terminate(pid, &cwd, signal, Duration::from_secs(60)).await;
    }
    Ok(())
}

/// Stops the instance and deletes its data directory (only ever asked for by an explicit drop).
pub async fn destroy(instance: &Instance) -> Result<(), DbError> {
    stop(instance).await?;
    if let Runtime::Container(c) = &instance.runtime {
        container::remove(c).await?;
    }
    match tokio::fs::remove_dir_all(&instance.dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(server::io("removing", &instance.dir, e)),
    }
}

/// Dumps the instance (`pg_dump -Fc`, `mariadb-dump --single-transaction`, a Redis snapshot) and streams
/// it to `target` under `object`, hashing the bytes as they go.
pub async fn backup(
    instance: &Instance,
    login: &Login,
    target: &Target,
    object: &str,
) -> Result<Backup, DbError> {
    let scrub = scrub_for(instance, Some(login), Some(target));
    let started = Instant::now();
    let before = counts(instance, login).await.ok();
    let tool = match instance.engine {
        Engine::Postgres => postgres::dump(instance, login)?,
        Engine::Redis => redis::dump(instance)?,
        Engine::Mariadb => mariadb::dump(instance, login)?,
    };
    let (bytes, sha256) = stream_to(&tool, target, object, &scrub).await?;
    let after = counts(instance, login).await.ok();
    Ok(Backup {
        object: object.to_owned(),
        bytes,
        sha256,
        duration: started.elapsed(),
        counts: before.filter(|b| after.as_ref() == Some(b)),
    })
}

/// Restores `object` (checked against `sha256`) into a scratch server beside the instance and compares
/// its [`counts`] with `expected` (the backup's, when it recorded some): a backup that cannot be
/// restored, or restores other rows than it was taken with, fails here rather than on the day it is
/// needed. The scratch server (`scratch`: its own directory and port, a login made for it) is
/// destroyed whatever the outcome.
pub async fn verify(
    scratch: &Instance,
    login: &Login,
    target: &Target,
    object: &str,
    sha256: &str,
    expected: Option<&BTreeMap<String, u64>>,
) -> Result<Verified, DbError> {
    let started = Instant::now();
    // A scratch server a crashed verification left behind is not adopted: it starts empty.
    destroy(scratch).await?;
    let result = async {
        ensure(scratch, login).await?;
        let bytes = restore(scratch, login, target, object, sha256).await?;
        Ok::<_, DbError>((bytes, counts(scratch, login).await?))
    }
    .await;
    let destroyed = destroy(scratch).await;
    let (bytes, got) = result?;
    destroyed?;
    if let Some(want) = expected {
        let differ: Vec<String> = differing(want, &got)
            .map(|t| {
                let show =
                    |m: &BTreeMap<String, u64>| m.get(t).map_or("none".to_owned(), u64::to_string);
                format!("{t}: {} restored, {} at the dump", show(&got), show(want))
            })
            .collect();
        if !differ.is_empty() {
            return Err(DbError::Unsupported(format!(
                "the restore of {} holds other rows than the backup was taken with: {}",
                target::describe(target, object),
                differ.join("; ")
            )));
        }
    }
    Ok(Verified {
        counts: got,
        bytes,
        duration: started.elapsed(),
    })
}

/// Runs `tool` and streams its stdout to `target`/`object`; a tool that fails or a store that refuses
/// leaves no object behind.
async fn stream_to(
    tool: &Tool<'_>,
    target: &Target,
    object: &str,
    scrub: &Scrub,
) -> Result<(u64, String), DbError> {
    let mut sink = target::Sink::open(target, object, scrub).await?;
    let mut child = match tool
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            sink.abort().await;
            return Err(DbError::Unsupported(format!(
                "cannot run {}: {e}",
                tool.exe.display()
            )));
        }
    };
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    // Its stderr read beside (a tool blocked on a full stderr pipe would never finish its stdout),
    // keeping the last 64 KiB.
    let errors = tokio::spawn(async move {
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 65536 {
                kept.drain(..kept.len() - 65536);
            }
        }
        String::from_utf8_lossy(&kept).into_owned()
    });
    let mut hash = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let copied: Result<(), DbError> = async {
        loop {
            let n = stdout
                .read(&mut buf)
                .await
                .map_err(|e| DbError::Failed(format!("reading the dump: {e}")))?;
            if n == 0 {
                return Ok(());
            }
            hash.update(&buf[..n]);
            bytes += n as u64;
            sink.write(&buf[..n], scrub).await?;
        }
    }
    .await;
    if let Err(e) = copied {
        let _ = child.kill().await;
        sink.abort().await;
        return Err(e);
    }
    let status = child
        .wait()
        .await
        .map_err(|e| DbError::Failed(format!("waiting for the dump: {e}")))?;
    let stderr = errors.await.unwrap_or_default();
    if !status.success() {
        sink.abort().await;
        let name = tool.exe.file_name().unwrap_or_default().to_string_lossy();
        return Err(scrub.failed(
            format_args!(
                "{name} failed ({status}); nothing was kept at {}",
                target::describe(target, object)
            ),
            &stderr,
        ));
    }
    sink.finish(scrub).await?;
    Ok((bytes, hex::encode(hash.finalize())))
}

/// Restores `object` from `target` into `instance` (which [`ensure`] made and which must be empty),
/// refusing it when its SHA-256 is not `sha256`. Returns the object's size.
pub async fn restore(
    instance: &Instance,
    login: &Login,
    target: &Target,
    object: &str,
    sha256: &str,
) -> Result<u64, DbError> {
    let scrub = scrub_for(instance, Some(login), Some(target));
    let existing = counts(instance, login).await?;
    if let Some((table, n)) = existing.iter().find(|(_, n)| **n > 0) {
        return Err(DbError::Unsupported(format!(
            "refusing to restore into {} `{}`: it is not empty ({table} has {n})",
            instance.engine, instance.name
        )));
    }
    // Fetched whole beside the data first: nothing is restored before the checksum is known.
    let file = instance.dir.join("restore.partial");
    let fetched = target::fetch(target, object, &file, &scrub).await;
    let size = fetched.as_ref().map_or(0, |(n, _)| *n);
    let result = match fetched {
        Err(e) => Err(e),
        Ok((_, got)) if !got.eq_ignore_ascii_case(sha256.trim()) => {
            Err(DbError::Unsupported(format!(
                "refusing to restore {}: its SHA-256 is {got}, the backup's record says {}; nothing was \
             restored",
                target::describe(target, object),
                sha256.trim()
            )))
        }
        Ok(_) => match instance.engine {
            Engine::Postgres => postgres::restore(instance, login, &file, &scrub).await,
            Engine::Redis => redis::restore(instance, &file, &scrub).await,
            Engine::Mariadb => mariadb::restore(instance, login, &file, &scrub).await,
        },
    };
    let _ = tokio::fs::remove_file(&file).await;
    result.map(|()| size)
}

/// Row counts per table (PostgreSQL, MariaDB) or keys per database (Redis): what a verification restore
/// compares with the original.
pub async fn counts(instance: &Instance, login: &Login) -> Result<BTreeMap<String, u64>, DbError> {
    let scrub = scrub_for(instance, Some(login), None);
    match instance.engine {
        Engine::Postgres => postgres::counts(instance, login, &scrub).await,
        Engine::Redis => redis::counts(instance, &scrub).await,
        Engine::Mariadb => mariadb::counts(instance, login, &scrub).await,
    }
}

/// What an upgrade compared: the row counts (table or key space -> rows) both instances held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgraded {
    pub counts: BTreeMap<String, u64>,
    /// The dump's size.
    pub bytes: u64,
    pub duration: Duration,
}

impl Upgraded {
    /// One line for the task's detail: tables and rows compared, no data.
    pub fn summary(&self) -> String {
        let rows: u64 = self.counts.values().sum();
        format!(
            "{} tables or key spaces, {rows} rows, counts equal; dump of {} bytes in {:.1}s",
            self.counts.len(),
            self.bytes,
            self.duration.as_secs_f64()
        )
    }
}

/// A version upgrade on this node: `to` (a new instance, its data directory not made yet) is made by
/// [`ensure`] with its own `login` and `to`'s version's binaries, `from` (running the old version) is
/// dumped by its own binaries through a file in `to`'s directory and restored into `to` like a backup,
/// and the row counts of `from` (before and after the dump) and `to` must all be equal. `from` is only
/// read: it keeps serving, and its data directory is never touched. Whatever fails, `to` is removed
/// again (it never served anything), so another attempt starts clean. A mark beside `to`'s directory
/// (`.<to>.upgrading`) says an attempt made it and has not finished: an attempt cut short (the agent
/// stopped, the lease lost) is removed and redone; a directory without the mark is refused, never
/// reused.
pub async fn upgrade(from: &Instance, to: &Instance, login: &Login) -> Result<Upgraded, DbError> {
    if from.engine != to.engine {
        return Err(DbError::Unsupported(format!(
            "an upgrade cannot change the engine ({} to {})",
            from.engine, to.engine
        )));
    }
    if from.dir == to.dir || from.port == to.port || from.name == to.name {
        return Err(DbError::Unsupported(format!(
            "an upgrade goes into a new instance beside `{}`, not into it",
            from.name
        )));
    }
    let mark = to.dir.with_file_name(format!(".{}.upgrading", to.name));
    let exists = |p: &std::path::Path| std::fs::symlink_metadata(p).is_ok();
    if exists(&to.dir) {
        if !exists(&mark) {
            return Err(DbError::Unsupported(format!(
                "instance `{}` already has a data directory ({}): an upgrade only goes into a new one",
                to.name,
                to.dir.display()
            )));
        }
        destroy(to).await?;
    }
    std::fs::write(&mark, b"").map_err(|e| server::io("writing", &mark, e))?;
    let mut result = upgrade_into(from, to, login).await;
    if result.is_ok()
        && let Err(e) = std::fs::remove_file(&mark)
    {
        result = Err(server::io("removing", &mark, e));
    }
    if result.is_err() {
        let _ = destroy(to).await;
        let _ = std::fs::remove_file(&mark);
    }
    result
}

async fn upgrade_into(from: &Instance, to: &Instance, login: &Login) -> Result<Upgraded, DbError> {
    let started = Instant::now();
    // Checked before anything is made: the old version's binaries must be here to dump it.
    let tool = match from.engine {
        Engine::Postgres => postgres::dump(from, login)?,
        Engine::Redis => redis::dump(from)?,
        Engine::Mariadb => mariadb::dump(from, login)?,
    };
    let before = counts(from, login).await?;
    ensure(to, login).await?;
    // The dump runs with the old instance's admin password, the restore with the new one's.
    let mut scrub = scrub_for(to, Some(login), None);
    if let Ok(pw) = std::fs::read_to_string(from.dir.join("admin.password")) {
        scrub.add(pw.trim());
    }
    let local = Target {
        to: BackupTo::Dir {
            path: to.dir.to_string_lossy().into_owned(),
        },
        s3: None,
    };
    const OBJECT: &str = "upgrade.dump";
    let restored = async {
        let (bytes, sha256) = stream_to(&tool, &local, OBJECT, &scrub).await?;
        restore(to, login, &local, OBJECT, &sha256).await?;
        Ok::<_, DbError>(bytes)
    }
    .await;
    let _ = tokio::fs::remove_file(to.dir.join(OBJECT)).await;
    let bytes = restored?;
    let after = counts(from, login).await?;
    let new = counts(to, login).await?;
    if before != after {
        return Err(DbError::Failed(format!(
            "`{}` changed while it was dumped ({}): writes after the dump would be lost, so the upgrade was not used: upgrade while nothing writes",
            from.name,
            first_difference(&before, &after)
        )));
    }
    if new != after {
        return Err(DbError::Unsupported(format!(
            "the upgraded instance `{}` does not hold what `{}` does ({})",
            to.name,
            from.name,
            first_difference(&after, &new)
        )));
    }
    Ok(Upgraded {
        counts: new,
        bytes,
        duration: started.elapsed(),
    })
}

/// The first table whose count differs, as `table: a vs b`.
/// The tables (key spaces) whose counts differ between `a` and `b`, in order.
fn differing<'a>(
    a: &'a BTreeMap<String, u64>,
    b: &'a BTreeMap<String, u64>,
) -> impl Iterator<Item = &'a String> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(move |k| a.get(*k) != b.get(*k))
}

fn first_difference(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> String {
    differing(a, b)
        .next()
        .map(|k| {
            let show = |m: &BTreeMap<String, u64>| {
                m.get(k).map_or("missing".to_owned(), |n| n.to_string())
            };
            format!("{k}: {} vs {}", show(a), show(b))
        })
        .unwrap_or_else(|| "no table differs".to_owned())
}

/// The URL an attached app receives ([`cairn_schema::database::url`]); a secret.
pub fn url(instance: &Instance, login: &Login, host: &str) -> Secret {
    cairn_schema::database::url(
        instance.engine,
        &login.user,
        login.password.expose(),
        host,
        instance.port,
        &login.database,
    )
}

/// `name|count` lines.
fn parse_counts(out: &str) -> Result<BTreeMap<String, u64>, DbError> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (name, n) = line
                .rsplit_once('|')
                .ok_or_else(|| DbError::Failed(format!("cannot read a count in `{line}`")))?;
            let n = n
                .trim()
                .parse()
                .map_err(|_| DbError::Failed(format!("cannot read a count in `{line}`")))?;
            Ok((name.to_owned(), n))
        })
        .collect()
}

/// The secrets an operation may meet: the login's password, the instance's admin password, the
/// target's keys.
fn scrub_for(instance: &Instance, login: Option<&Login>, target: Option<&Target>) -> Scrub {
    let mut scrub = Scrub::default();
    if let Some(pw) = login.and_then(|l| l.password.expose_str().ok()) {
        scrub.add(pw);
        scrub.add(cairn_schema::database::percent_encode(pw.as_bytes()));
    }
    if let Ok(pw) = std::fs::read_to_string(instance.dir.join("admin.password")) {
        scrub.add(pw.trim());
    }
    for s in target.map(target::secrets).unwrap_or_default() {
        scrub.add(s);
    }
    scrub
}

/// The password of a login as text (the engines' clients take text).
fn password(login: &Login) -> Result<&str, DbError> {
    login
        .password
        .expose_str()
        .map_err(|_| DbError::Unsupported(format!("the password of `{}` is not UTF-8", login.user)))
}

/// `version` must be a leading part of what the binaries report (`15` of 15.13, `10.11` of 10.11.6).
fn version_matches(wanted: &str, have: &str) -> bool {
    let have: Vec<&str> = have.split('.').collect();
    let wanted: Vec<&str> = wanted.trim().split('.').collect();
    !wanted.is_empty()
        && wanted.len() <= have.len()
        && wanted.iter().zip(&have).all(|(w, h)| w == h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_percent_encoded_in_the_url() {
        let instance = Instance {
            name: "main".parse().unwrap(),
            engine: Engine::Postgres,
            version: "15".into(),
            dir: PathBuf::from("/x"),
            port: 5433,
            runtime: Runtime::Process,
        };
        let login = Login {
            user: "app".into(),
            password: Secret::new(b"p@ss:w/rd %?#".to_vec()),
            database: "app".into(),
        };
        let url = url(&instance, &login, "10.0.0.2");
        assert_eq!(
            url.expose_str().unwrap(),
            "postgres://app:p%40ss%3Aw%2Frd%20%25%3F%23@10.0.0.2:5433/app"
        );
        assert!(version_matches("15", "15.13"));
        assert!(version_matches("10.11", "10.11.19"));
        assert!(!version_matches("1", "15.13"));
        assert!(!version_matches("16", "15.13"));
    }
}
