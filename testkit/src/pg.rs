//! A fresh PostgreSQL database per test, cloned from a template that has every migration applied.
//!
//! ```no_run
//! # async fn example() {
//! let Some(db) = cairn_testkit::pg::TestDb::new().await else { return }; // skipped: no PostgreSQL
//! sqlx::query("SELECT 1").execute(db.pool()).await.unwrap();
//! // `db.url()` is for subprocesses (`cairn apply --database-url ...`).
//! # }
//! ```
//!
//! Where the server comes from:
//! - `CAIRN_TEST_DATABASE_URL` set: that server; the user must be allowed to `CREATE DATABASE`.
//! - otherwise a private cluster from the PostgreSQL server binaries (`CAIRN_TEST_PG_BINDIR`, else the
//!   highest `/usr/lib/postgresql/<version>/bin` on Debian/Ubuntu, else `initdb` on `PATH`), with its data
//!   under `target/cairn-test-pg/<major>/`, listening on `127.0.0.1` on a free port and on a unix socket
//!   in a short `/tmp/cairn-pg-<hash>` directory. As root it runs as the `postgres` account (`initdb`
//!   refuses root). The first test process of a run starts it under a file lock; the others find it
//!   running and share it. A cluster left dead by an earlier run (stale `postmaster.pid`) is restarted.
//!
//! Tests clone `cairn_template_<hash of the migrations>` (`CREATE DATABASE ... TEMPLATE`, a few
//! milliseconds) instead of migrating each database; the template is rebuilt when a migration changes.
//! A passing test's database is dropped when its [`TestDb`] goes out of scope; a failing test's is kept
//! and its URL printed, for inspection.
//!
//! What it must not do: turn durability off (the cluster runs with `fsync = on` because the queue
//! benchmark measures durable commits; a test that wants speed may `SET synchronous_commit = off` on its
//! own session), or listen anywhere but loopback (the cluster trusts every local connection).

use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use cairn_pgdev::{
    Account, Cluster, Running, find_bindir, major_version, reachable_root, server_account,
};
use sha2::{Digest as _, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgConnection, PgPool};
use tokio::sync::OnceCell;

/// The migrations every test database starts with: the same directory the reconciler embeds.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Use this server instead of starting a private cluster.
pub const DATABASE_URL_ENV: &str = "CAIRN_TEST_DATABASE_URL";
/// When set and non-empty (CI sets it), a missing PostgreSQL fails the test instead of skipping it.
pub use crate::skip::REQUIRE_ALL_ENV;
/// A directory holding `initdb`, `pg_ctl` and `postgres`, searched before the Debian location.
pub const BINDIR_ENV: &str = "CAIRN_TEST_PG_BINDIR";

/// Connections each test's pool may open; the private cluster allows 300 in all.
const POOL_SIZE: u32 = 10;
/// Serialises template builds across every process sharing one server (the file lock only covers the
/// private cluster, and only on this machine). An arbitrary constant: "cairn-tk" in ASCII.
const TEMPLATE_LOCK_KEY: i64 = 0x6361_6972_6e2d_746b;

/// A database of its own for one test, cloned from the migrated template.
///
/// Dropping it drops the database (best effort, on a helper thread) unless the test is panicking, in
/// which case the database is kept and its URL printed.
#[derive(Debug)]
pub struct TestDb {
    pool: PgPool,
    options: PgConnectOptions,
    url: String,
    name: String,
    admin: PgConnectOptions,
    dropped: bool,
}

/// Gets a [`TestDb`], or returns from the calling test when PostgreSQL is unavailable and
/// `CAIRN_TEST_REQUIRE_ALL` is not set (a skip message has then been printed).
///
/// `test_db!()` returns `()`; `test_db!(Ok(()))` suits a test that returns a `Result`.
#[macro_export]
macro_rules! test_db {
    () => {
        $crate::test_db!(())
    };
    ($ret:expr) => {
        match $crate::pg::TestDb::new().await {
            ::std::option::Option::Some(db) => db,
            ::std::option::Option::None => return $ret,
        }
    };
}

impl TestDb {
    /// Creates a fresh database with every migration applied.
    ///
    /// `None` when no PostgreSQL is available and `CAIRN_TEST_REQUIRE_ALL` is unset: the test should
    /// return early (a message saying so has been printed). Panics when PostgreSQL is required and
    /// missing, or present but failing: a broken harness must fail loudly, not skip.
    pub async fn new() -> Option<TestDb> {
        let server = match SERVER.get_or_init(init_server).await {
            Ok(server) => server.clone(),
            Err(reason) => {
                skip_or_panic(reason);
                return None;
            }
        };
        let name = format!("test_{:016x}", rand::random::<u64>());
        let mut admin = connect(&server.admin).await;
        let create = format!(r#"CREATE DATABASE "{name}" TEMPLATE "{}""#, server.template);
        if let Err(e) = sqlx::raw_sql(&create).execute(&mut admin).await {
            panic!("cairn-testkit: {create}: {e}");
        }
        let _ = admin.close().await;
        let options = server.admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options.clone())
            .await
            .unwrap_or_else(|e| panic!("cairn-testkit: connecting to {name}: {e}"));
        Some(TestDb {
            pool,
            url: options.to_url_lossy().to_string(),
            options,
            name,
            admin: server.admin,
            dropped: false,
        })
    }

    /// A pool on this test's database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The database URL, for subprocesses and for pools with other settings.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection options of this test's database (e.g. for a `PgListener` or a second pool).
    pub fn options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// The database's name (`test_<random>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database now, waiting for both; errors are ignored.
    pub async fn close(mut self) {
        self.pool.close().await;
        drop_database(&self.admin, &self.name).await;
        self.dropped = true;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "cairn-testkit: keeping database {} of the failed test: {}",
                self.name, self.url
            );
            return;
        }
        // No async drop: a helper thread with its own runtime, so this works whichever runtime (or none)
        // the test used. `WITH (FORCE)` ends the pool's connections, which are still open here.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(drop_database(&admin, &name));
        })
        .join();
    }
}

async fn drop_database(admin: &PgConnectOptions, name: &str) {
    if let Ok(mut conn) = PgConnection::connect_with(admin).await {
        let _ = sqlx::raw_sql(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
    }
}

fn skip_or_panic(reason: &str) {
    let help = "install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`, which puts \
                it in /usr/lib/postgresql/<version>/bin), or set CAIRN_TEST_PG_BINDIR to a directory \
                holding initdb and pg_ctl, or set CAIRN_TEST_DATABASE_URL to a server where the test \
                user may CREATE DATABASE";
    crate::skip::missing(
        &crate::skip::current_test(),
        "PostgreSQL",
        format!("{reason}. To fix: {help}"),
    );
}

/// What every test of this process needs to create its database. Plain data only: a pool would be bound
/// to the runtime of the test that created it, and `cargo test` gives each test its own runtime.
#[derive(Debug, Clone)]
struct Server {
    admin: PgConnectOptions,
    template: String,
}

/// `Err` holds why PostgreSQL is unavailable (checked again by each test, so each one skips or fails).
static SERVER: OnceCell<Result<Server, String>> = OnceCell::const_new();

async fn init_server() -> Result<Server, String> {
    let (admin, fresh) = match std::env::var(DATABASE_URL_ENV) {
        Ok(url) if !url.is_empty() => {
            let options = PgConnectOptions::from_str(&url)
                .unwrap_or_else(|e| panic!("cairn-testkit: {DATABASE_URL_ENV} is not usable: {e}"));
            (options, false)
        }
        _ => {
            let running = match tokio::task::spawn_blocking(start_private_cluster).await {
                Ok(running) => running?,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            let options = PgConnectOptions::new()
                .host("127.0.0.1")
                .port(running.port)
                .username("postgres")
                .password(&running.password)
                .database("postgres");
            (options, running.fresh)
        }
    };
    if fresh {
        // Just started: no test of this run is using it yet, so whatever `test_*` database exists was
        // kept by a failed test of an earlier run.
        sweep_test_databases(&admin).await;
    }
    let template = ensure_template(&admin).await;
    Ok(Server { admin, template })
}

async fn connect(options: &PgConnectOptions) -> PgConnection {
    PgConnection::connect_with(options)
        .await
        .unwrap_or_else(|e| panic!("cairn-testkit: connecting to PostgreSQL: {e}"))
}

async fn sweep_test_databases(admin: &PgConnectOptions) {
    let mut conn = connect(admin).await;
    let names: Vec<String> =
        sqlx::query_scalar(r"SELECT datname FROM pg_database WHERE datname LIKE 'test\_%'")
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
    for name in names {
        let _ = sqlx::raw_sql(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut conn)
            .await;
    }
    let _ = conn.close().await;
}

/// `cairn_template_` and the first 12 hex digits of a hash over every migration's version, description
/// and checksum: an edited, added or removed migration names a new template.
pub fn template_name() -> String {
    let mut hash = Sha256::new();
    for m in MIGRATOR.iter() {
        hash.update(m.version.to_le_bytes());
        hash.update(m.description.as_bytes());
        hash.update([0]);
        hash.update(&m.checksum);
    }
    format!("cairn_template_{}", &hex::encode(hash.finalize())[..12])
}

/// Makes sure the template for the current migrations exists, building it if needed, and returns its
/// name. The template is marked as such only once fully migrated, so a build that died half-way is
/// recognised and redone.
async fn ensure_template(admin: &PgConnectOptions) -> String {
    let name = template_name();
    let mut conn = connect(admin).await;
    let fail = |what: &str, e: sqlx::Error| -> ! { panic!("cairn-testkit: {what}: {e}") };
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| fail("locking the template", e));
    let state: Option<bool> =
        sqlx::query_scalar("SELECT datistemplate FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_optional(&mut conn)
            .await
            .unwrap_or_else(|e| fail("looking up the template", e));
    if state != Some(true) {
        for sql in [
            format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#),
            format!(r#"CREATE DATABASE "{name}""#),
        ] {
            sqlx::raw_sql(&sql)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| fail(&sql, e));
        }
        let mut template = connect(&admin.clone().database(&name)).await;
        if let Err(e) = MIGRATOR.run(&mut template).await {
            panic!("cairn-testkit: applying the migrations to {name}: {e}");
        }
        let _ = template.close().await;
        // No connections to a template: one would make every `CREATE DATABASE ... TEMPLATE` fail.
        let sql =
            format!(r#"ALTER DATABASE "{name}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"#);
        sqlx::raw_sql(&sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| fail(&sql, e));
        // Older templates (earlier migrations) are garbage now; best effort, one may be in use.
        let old: Vec<String> = sqlx::query_scalar(
            r"SELECT datname FROM pg_database WHERE datname LIKE 'cairn\_template\_%' AND datname <> $1",
        )
        .bind(&name)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        for old in old {
            // Two round trips: DROP DATABASE refuses to run in the implicit transaction of a
            // multi-statement query.
            let unmark = format!(r#"ALTER DATABASE "{old}" WITH IS_TEMPLATE false"#);
            if sqlx::raw_sql(&unmark).execute(&mut conn).await.is_ok() {
                let _ = sqlx::raw_sql(&format!(r#"DROP DATABASE "{old}""#))
                    .execute(&mut conn)
                    .await;
            }
        }
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    name
}

/// Finds the server binaries and brings the run's shared cluster up. `Err` is "unavailable" (skip or
/// fail by policy); a cluster that is present but fails to start panics with its log.
fn start_private_cluster() -> Result<Running, String> {
    let explicit = std::env::var_os(BINDIR_ENV)
        .filter(|v| !v.is_empty())
        .map(|d| (PathBuf::from(d), BINDIR_ENV));
    let bin = find_bindir(explicit).map_err(|e| e.to_string())?;
    let run_as = server_account().map_err(|e| e.to_string())?;
    let major = major_version(&bin).map_err(|e| e.to_string())?;
    let root = cluster_root(&major, run_as);
    let cluster = Cluster::new(bin, root, run_as, "cairn-testkit");
    Ok(cluster.ensure_running().unwrap_or_else(|e| {
        panic!(
            "cairn-testkit: could not start PostgreSQL in {}: {e}",
            cluster.root.display()
        )
    }))
}

/// `<target>/cairn-test-pg/<major>`, or a directory under the system temp dir when the server's
/// account could not reach the target directory (a checkout under `/root`, say).
fn cluster_root(major: &str, run_as: Option<Account>) -> PathBuf {
    let root = target_dir().join("cairn-test-pg").join(major);
    reachable_root(root, run_as, &format!("cairn-test-pg-{major}"))
}

/// The workspace's target directory (`CARGO_TARGET_DIR` or `<workspace>/target`).
fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

/// A PostgreSQL cluster of one test's own, for a test that stops, restarts or kills the server under the
/// processes it tests (the shared cluster must never go away under other tests). Its data lives under
/// `<target>/cairn-test-pg-own/<random>` and is removed, with the server stopped, when this is dropped.
///
/// [`OwnCluster::stop`] and [`OwnCluster::start`] keep the port, so a client's database URL stays valid
/// across an outage.
#[derive(Debug)]
pub struct OwnCluster {
    cluster: Cluster,
    port: u16,
    password: String,
}

impl OwnCluster {
    /// Initialises and starts a new cluster. `None` when PostgreSQL is unavailable and
    /// `CAIRN_TEST_REQUIRE_ALL` is unset (a skip message has been printed).
    pub fn new() -> Option<OwnCluster> {
        let explicit = std::env::var_os(BINDIR_ENV)
            .filter(|v| !v.is_empty())
            .map(|d| (PathBuf::from(d), BINDIR_ENV));
        let prepared = find_bindir(explicit).and_then(|bin| Ok((bin, server_account()?)));
        let (bin, run_as) = match prepared {
            Ok(p) => p,
            Err(e) => {
                skip_or_panic(&e.to_string());
                return None;
            }
        };
        let name = format!("{:016x}", rand::random::<u64>());
        let preferred = target_dir().join("cairn-test-pg-own").join(&name);
        let root = reachable_root(preferred, run_as, &format!("cairn-test-pg-own-{name}"));
        let cluster = Cluster::new(bin, root, run_as, "cairn-testkit (one test's own)");
        let running = cluster.ensure_running().unwrap_or_else(|e| {
            panic!(
                "cairn-testkit: could not start PostgreSQL in {}: {e}",
                cluster.root.display()
            )
        });
        Some(OwnCluster {
            cluster,
            port: running.port,
            password: running.password,
        })
    }

    /// The `postgres` database as the superuser, over TCP on loopback.
    pub fn admin(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .password(&self.password)
            .database("postgres")
    }

    /// A new database on this cluster with every migration applied (no template: this cluster is new).
    pub async fn database(&self) -> TestDb {
        let admin = self.admin();
        let name = format!("test_{:016x}", rand::random::<u64>());
        let mut conn = connect(&admin).await;
        let create = format!(r#"CREATE DATABASE "{name}""#);
        if let Err(e) = sqlx::raw_sql(&create).execute(&mut conn).await {
            panic!("cairn-testkit: {create}: {e}");
        }
        let _ = conn.close().await;
        let options = admin.clone().database(&name);
        let mut conn = connect(&options).await;
        if let Err(e) = MIGRATOR.run(&mut conn).await {
            panic!("cairn-testkit: applying the migrations to {name}: {e}");
        }
        let _ = conn.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options.clone())
            .await
            .unwrap_or_else(|e| panic!("cairn-testkit: connecting to {name}: {e}"));
        TestDb {
            pool,
            url: options.to_url_lossy().to_string(),
            options,
            name,
            admin,
            dropped: false,
        }
    }

    /// Stops the server (fast shutdown: sessions are ended, committed work is kept) and waits until it
    /// is gone.
    pub fn stop(&self) {
        self.cluster.stop().unwrap_or_else(|e| {
            panic!(
                "cairn-testkit: stopping {}: {e}",
                self.cluster.root.display()
            )
        });
    }

    /// SIGKILLs the postmaster (its backends exit when they notice) and waits until it is gone: what a
    /// crashed server or host looks like; the next [`OwnCluster::start`] runs crash recovery.
    pub fn kill(&self) {
        let Some(pid) = self.cluster.postmaster_pid() else {
            return;
        };
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.cluster.is_our_postmaster(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "cairn-testkit: the postmaster survived SIGKILL"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port and waits until it accepts connections. After a
    /// [`OwnCluster::kill`] the old server's backends may still hold its shared memory for a moment (they
    /// exit when they notice the postmaster is gone), so a refused start is retried for a while.
    pub fn start(&self) {
        let data = self.cluster.data.to_str().expect("a UTF-8 data directory");
        let log = self.cluster.root.join("server.log");
        let log = log.to_str().expect("a UTF-8 log path");
        let port = format!("-p {}", self.port);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let out = self
                .cluster
                .pg_ctl(&[
                    "start", "-w", "-t", "60", "-D", data, "-l", log, "-o", &port,
                ])
                .unwrap_or_else(|e| panic!("cairn-testkit: pg_ctl start: {e}"));
            if out.status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cairn-testkit: pg_ctl start failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.cluster.log_tail()
            );
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    /// Stops and starts the server (a restart: every session is ended).
    pub fn restart(&self) {
        self.stop();
        self.start();
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.cluster.root);
        } else {
            eprintln!(
                "cairn-testkit: keeping the failed test's cluster in {}",
                self.cluster.root.display()
            );
        }
        let _ = std::fs::remove_dir_all(&self.cluster.socket_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_test_gets_its_own_migrated_database() {
        let Some(a) = TestDb::new().await else { return };
        let Some(b) = TestDb::new().await else { return };
        assert_ne!(a.name(), b.name());
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(a.pool())
                .await
                .unwrap();
        assert_eq!(applied, MIGRATOR.iter().count() as i64);
        sqlx::raw_sql("CREATE TABLE only_in_a (x int)")
            .execute(a.pool())
            .await
            .unwrap();
        let in_b: Option<String> = sqlx::query_scalar("SELECT to_regclass('only_in_a')::text")
            .fetch_one(b.pool())
            .await
            .unwrap();
        assert_eq!(in_b, None, "databases must not share tables");

        // The URL works for a separate connection (what a subprocess would do).
        let mut conn = PgConnection::connect(b.url()).await.unwrap();
        let db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(db, b.name());
        conn.close().await.unwrap();

        let name = a.name().to_owned();
        let admin = a.admin.clone();
        a.close().await;
        let mut conn = connect(&admin).await;
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0, "close() drops the database");
    }

    /// The private cluster trusted every local TCP connection, so any user of the machine could reach
    /// `cairn dev`'s database (and the tests') on 127.0.0.1: TCP now needs the superuser's password.
    #[tokio::test]
    async fn the_private_cluster_refuses_tcp_connections_without_its_password() {
        if std::env::var_os(DATABASE_URL_ENV).is_some_and(|v| !v.is_empty()) {
            return; // the private cluster is not in use
        }
        let Some(db) = TestDb::new().await else {
            return;
        };
        let with = db.admin.clone();
        let without = PgConnectOptions::new()
            .host("127.0.0.1")
            .port(with.get_port())
            .username("postgres")
            .database("postgres");
        let err = PgConnection::connect_with(&without)
            .await
            .expect_err("a connection without the password must be refused");
        assert!(
            err.to_string().contains("password"),
            "refused for another reason: {err}"
        );
        let wrong = without.clone().password("not-the-password");
        let err = PgConnection::connect_with(&wrong).await.unwrap_err();
        assert!(
            err.to_string().contains("password authentication failed"),
            "{err}"
        );
        PgConnection::connect_with(&with)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
    }

    #[test]
    fn template_name_depends_on_the_migrations() {
        let name = template_name();
        assert!(name.starts_with("cairn_template_") && name.len() == "cairn_template_".len() + 12);
        assert_eq!(name, template_name());
    }

    /// A session that ended with a SIGKILL leaves `postmaster.pid` behind and no server: the next run
    /// must start a new one rather than trust the file or give up.
    #[test]
    fn a_killed_cluster_is_restarted() {
        use std::net::{Ipv4Addr, SocketAddr, TcpStream};
        use std::time::{Duration, Instant};

        if std::env::var_os(DATABASE_URL_ENV).is_some_and(|v| !v.is_empty()) {
            return; // the private cluster is not in use
        }
        let Ok(bin) = find_bindir(None) else {
            skip_or_panic("PostgreSQL server binaries were not found");
            return;
        };
        let run_as = server_account().unwrap();
        let root =
            std::env::temp_dir().join(format!("cairn-testkit-restart-{}", std::process::id()));
        let cluster = Cluster::new(bin, root.clone(), run_as, "cairn-testkit");

        let first = cluster.ensure_running().unwrap();
        assert!(first.fresh);
        let again = cluster.ensure_running().unwrap();
        assert!(!again.fresh, "a healthy cluster is reused");
        assert_eq!(again.port, first.port);

        let pidfile = cluster.data.join("postmaster.pid");
        let pid = cluster.postmaster_pid().expect("the postmaster runs");
        let pid = rustix::process::Pid::from_raw(pid).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.is_our_postmaster(pid.as_raw_nonzero().get()) {
            assert!(Instant::now() < deadline, "postmaster survived SIGKILL");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(pidfile.exists(), "SIGKILL leaves the pid file behind");

        let restarted = cluster.ensure_running().unwrap();
        assert!(restarted.fresh, "a dead cluster is started again");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, restarted.port));
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();

        cluster.stop().unwrap();
        assert_eq!(cluster.postmaster_pid(), None, "stop() leaves no server");
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&cluster.socket_dir);
    }
}
