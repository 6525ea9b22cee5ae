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

use std::fs::{self, File};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgConnection, PgPool};
use tokio::sync::OnceCell;

/// The migrations every test database starts with: the same directory the reconciler embeds.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Use this server instead of starting a private cluster.
pub const DATABASE_URL_ENV: &str = "CAIRN_TEST_DATABASE_URL";
/// When set and non-empty (CI sets it), a missing PostgreSQL fails the test instead of skipping it.
pub const REQUIRE_ALL_ENV: &str = "CAIRN_TEST_REQUIRE_ALL";
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
    if std::env::var_os(REQUIRE_ALL_ENV).is_some_and(|v| !v.is_empty()) {
        panic!(
            "cairn-testkit: {reason}.\n{REQUIRE_ALL_ENV} is set, so a test that needs PostgreSQL \
             fails instead of skipping.\nTo fix: {help}."
        );
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    // Straight to the process's stderr: `eprintln!` is captured by the test harness and only shown
    // for failing tests, and a skip must be visible.
    let _ = writeln!(
        std::io::stderr(),
        "cairn-testkit: SKIPPED {test}: {reason}. To run it: {help}. \
         (Set {REQUIRE_ALL_ENV}=1 to make this a failure.)"
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

/// A private cluster that answered on this port; `fresh` when this process started it.
#[derive(Debug, Clone, Copy)]
struct Running {
    port: u16,
    fresh: bool,
}

/// Finds the server binaries and brings the run's shared cluster up. `Err` is "unavailable" (skip or
/// fail by policy); a cluster that is present but fails to start panics with its log.
fn start_private_cluster() -> Result<Running, String> {
    let bin = find_bindir()?;
    let run_as = if rustix::process::geteuid().is_root() {
        Some(postgres_account()?)
    } else {
        None
    };
    let major = major_version(&bin)?;
    let root = cluster_root(&major, run_as.is_some());
    let cluster = Cluster::new(bin, root, run_as);
    Ok(cluster.ensure_running().unwrap_or_else(|e| {
        panic!(
            "cairn-testkit: could not start PostgreSQL in {}: {e}",
            cluster.root.display()
        )
    }))
}

fn find_bindir() -> Result<PathBuf, String> {
    let has_tools = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|t| dir.join(t).is_file())
    };
    if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "{BINDIR_ENV}={} holds no initdb, pg_ctl and postgres",
                dir.display()
            ))
        };
    }
    // Debian and Ubuntu keep the server binaries off PATH, one directory per major version.
    let mut debian: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_tools(dir))
        .ok_or_else(|| {
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found in \
             /usr/lib/postgresql/*/bin or on PATH"
                .to_owned()
        })
}

/// `"15"` from `pg_ctl (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)`: the data directory's format.
fn major_version(bin: &Path) -> Result<String, String> {
    let out = Command::new(bin.join("pg_ctl"))
        .arg("--version")
        .output()
        .map_err(|e| format!("running {}/pg_ctl --version: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|word| {
            let major = word.split('.').next()?;
            (!major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()))
                .then(|| major.to_owned())
        })
        .ok_or_else(|| format!("cannot read a version in `pg_ctl --version` output: {text}"))
}

/// The unprivileged account the server runs as when the tests run as root.
#[derive(Debug, Clone, Copy)]
struct Account {
    uid: u32,
    gid: u32,
}

fn postgres_account() -> Result<Account, String> {
    let no_runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .iter()
        .all(|p| !Path::new(p).exists());
    if no_runuser {
        return Err(
            "running as root, and `runuser` (util-linux) is missing to drop to the \
                    `postgres` account (initdb refuses root)"
                .to_owned(),
        );
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())?
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Ok(Account { uid, gid }),
        _ => Err(
            "running as root, and there is no `postgres` account to run the server as \
                  (initdb refuses root)"
                .to_owned(),
        ),
    }
}

/// `<target>/cairn-test-pg/<major>`, or a directory under the system temp dir when the server's
/// account could not reach the target directory (a checkout under `/root`, say).
fn cluster_root(major: &str, other_account: bool) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let target = match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    let root = target.join("cairn-test-pg").join(major);
    if other_account && !traversable_by_others(&root) {
        return std::env::temp_dir().join(format!("cairn-test-pg-{}-{major}", short_hash(&root)));
    }
    root
}

fn traversable_by_others(path: &Path) -> bool {
    path.ancestors()
        .filter_map(|dir| fs::metadata(dir).ok())
        .all(|meta| meta.permissions().mode() & 0o001 != 0)
}

fn short_hash(path: &Path) -> String {
    hex::encode(&Sha256::digest(path.as_os_str().as_encoded_bytes())[..4])
}

/// One private cluster: binaries, a root directory (lock file, data directory, server log) and a socket
/// directory short enough for the 107-byte unix socket path limit.
#[derive(Debug)]
struct Cluster {
    bin: PathBuf,
    root: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<Account>,
}

impl Cluster {
    fn new(bin: PathBuf, root: PathBuf, run_as: Option<Account>) -> Cluster {
        let socket_dir = PathBuf::from(format!("/tmp/cairn-pg-{}", short_hash(&root)));
        Cluster {
            bin,
            data: root.join("data"),
            root,
            socket_dir,
            run_as,
        }
    }

    /// Returns the port of the running cluster, starting it first if needed. Holds an exclusive lock on
    /// `<root>/lock` meanwhile: `flock`, so the kernel releases it when a holder dies, which a lock file
    /// created with `O_EXCL` would not (a crashed test run would then block every later one).
    fn ensure_running(&self) -> Result<Running, String> {
        self.prepare_dirs()?;
        let lock_path = self.root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
        if let Some(port) = self.running_port(Duration::from_secs(10)) {
            return Ok(Running { port, fresh: false });
        }
        if !self.root.join("initialized").exists() {
            self.init()?;
        }
        self.clear_stale()?;
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let out = self.pg_ctl(&[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                path_str(&self.data)?,
                "-l",
                path_str(&self.root.join("server.log"))?,
                "-o",
                &format!("-p {port}"),
            ])?;
            if out.status.success() && self.running_port(Duration::from_secs(5)) == Some(port) {
                return Ok(Running { port, fresh: true });
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // A port taken between our probe and the server's bind, or a dying old server's shared
            // memory still attached: both pass after a moment.
            self.clear_stale()?;
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(format!("pg_ctl start failed: {last}\n{}", self.log_tail()))
    }

    fn prepare_dirs(&self) -> Result<(), String> {
        for dir in [&self.root, &self.socket_dir] {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            if let Some(account) = self.run_as {
                std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid))
                    .map_err(|e| format!("chown {}: {e}", dir.display()))?;
            }
        }
        fs::set_permissions(&self.socket_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", self.socket_dir.display()))
    }

    /// The port of a healthy cluster on our data directory, waiting up to `patience` for one that is
    /// alive but not ready yet (crash recovery). `None` when none is running or it never became ready.
    fn running_port(&self, patience: Duration) -> Option<u16> {
        let deadline = Instant::now() + patience;
        loop {
            let pidfile = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
            let lines: Vec<&str> = pidfile.lines().map(str::trim).collect();
            let pid: i32 = lines.first()?.parse().ok()?;
            if !self.is_our_postmaster(pid) {
                return None;
            }
            // postmaster.pid: pid, data dir, start time, port, socket dir, listen address, shmem key,
            // status.
            if let (Some(port), Some(&"ready")) =
                (lines.get(3).and_then(|p| p.parse().ok()), lines.get(7))
            {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                    return Some(port);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `pid` is a live postmaster of this data directory (not a recycled pid).
    fn is_our_postmaster(&self, pid: i32) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_postgres = args.first().is_some_and(|a| a.ends_with(b"postgres"));
        is_postgres && args.contains(&self.data.as_os_str().as_encoded_bytes())
    }

    /// A from-scratch data directory; `initialized` is written last, so an interrupted `initdb` is
    /// redone rather than trusted.
    fn init(&self) -> Result<(), String> {
        match fs::remove_dir_all(&self.data) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", self.data.display())),
        }
        let out = self.run(
            "initdb",
            &[
                "-D",
                path_str(&self.data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                // Skips only initdb's final flush of the new files; the server itself runs with fsync.
                "--no-sync",
            ],
        )?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let conf = self.data.join("postgresql.conf");
        let mut file = File::options()
            .append(true)
            .open(&conf)
            .map_err(|e| format!("opening {}: {e}", conf.display()))?;
        let settings = format!(
            "\n# cairn-testkit: a private cluster for tests, trusted on loopback only.\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             max_connections = 300\n\
             shared_buffers = 128MB\n\
             # Durable commits stay on: the queue benchmark measures them.\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n",
            self.socket_dir.display()
        );
        file.write_all(settings.as_bytes())
            .map_err(|e| format!("writing {}: {e}", conf.display()))?;
        fs::write(self.root.join("initialized"), b"")
            .map_err(|e| format!("writing {}: {e}", self.root.display()))
    }

    /// Makes way for a new server: stops a postmaster that is alive but not answering, and removes the
    /// `postmaster.pid` and socket lock files a killed one left behind.
    fn clear_stale(&self) -> Result<(), String> {
        let pidfile = self.data.join("postmaster.pid");
        if let Ok(text) = fs::read_to_string(&pidfile) {
            let pid = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<i32>().ok());
            if pid.is_some_and(|pid| self.is_our_postmaster(pid)) {
                self.pg_ctl(&["stop", "-w", "-m", "immediate", "-D", path_str(&self.data)?])?;
            }
            let _ = fs::remove_file(&pidfile);
        }
        for entry in fs::read_dir(&self.socket_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output, String> {
        self.run("pg_ctl", args)
    }

    /// Runs one of the server tools, as the `postgres` account when we are root.
    fn run(&self, tool: &str, args: &[&str]) -> Result<Output, String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.run_as.is_some() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&exe);
            cmd
        } else {
            Command::new(&exe)
        };
        // The server's own output goes to server.log (`pg_ctl -l`), so these pipes close when the tool
        // exits and no test runner sees a leaked handle.
        cmd.args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", exe.display()))
    }

    fn log_tail(&self) -> String {
        let log = self.root.join("server.log");
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("last lines of {}:\n{tail}", log.display())
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

fn path_str(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
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
        if std::env::var_os(DATABASE_URL_ENV).is_some_and(|v| !v.is_empty()) {
            return; // the private cluster is not in use
        }
        let Ok(bin) = find_bindir() else {
            skip_or_panic("PostgreSQL server binaries were not found");
            return;
        };
        let run_as = rustix::process::geteuid()
            .is_root()
            .then(|| postgres_account().unwrap());
        let root =
            std::env::temp_dir().join(format!("cairn-testkit-restart-{}", std::process::id()));
        let cluster = Cluster::new(bin, root.clone(), run_as);

        let first = cluster.ensure_running().unwrap();
        assert!(first.fresh);
        let again = cluster.ensure_running().unwrap();
        assert!(!again.fresh, "a healthy cluster is reused");
        assert_eq!(again.port, first.port);

        let pidfile = cluster.data.join("postmaster.pid");
        let pid: i32 = fs::read_to_string(&pidfile)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap();
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

        let _ = cluster.pg_ctl(&[
            "stop",
            "-w",
            "-m",
            "immediate",
            "-D",
            path_str(&cluster.data).unwrap(),
        ]);
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_dir_all(&cluster.socket_dir);
    }
}
