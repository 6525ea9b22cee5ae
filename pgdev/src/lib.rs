//! A private PostgreSQL cluster run from the installed server binaries: what `cairn dev` starts for
//! itself and what the test harness (`cairn-testkit`) shares between test processes.
//!
//! - [`find_bindir`]: `initdb`, `pg_ctl` and `postgres` from an explicit directory, else the highest
//!   `/usr/lib/postgresql/<version>/bin` (Debian and Ubuntu keep them off `PATH`), else `PATH`.
//! - [`server_account`]: as root, the `postgres` account the server runs as (`initdb` refuses root),
//!   through `runuser`; [`reachable_root`] moves the cluster under the temp dir when that account could
//!   not reach the preferred directory (a home directory under `/root`, say).
//! - [`Cluster`]: one data directory, its server log and a lock file under a root directory, a unix
//!   socket in a short `/tmp/cairn-pg-<hash>` directory (socket paths are limited to 107 bytes), and a
//!   server on `127.0.0.1` on a free port. [`Cluster::ensure_running`] initialises it once, reuses a
//!   healthy server, restarts a dead one (stale `postmaster.pid`), and serialises starters with `flock`.
//!   [`Cluster::stop`] stops it.
//!
//! Access: TCP on loopback needs the superuser's password (random, made at `initdb`, kept in
//! `<root>/password`, mode 0600, and handed to the caller in [`Running`]); the unix socket is trusted,
//! and its directory is the server account's alone (0700). Another user of the machine reaches neither.
//!
//! What it must not do: listen anywhere but loopback, trust a TCP connection without the password, or
//! turn durability off (`fsync` stays on: the queue benchmark measures durable commits).

use std::fs::{self, File};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// How to get the server binaries, for messages about their absence.
pub const INSTALL_HINT: &str = "install the PostgreSQL server (Debian/Ubuntu: `sudo apt-get install \
                                postgresql`, which puts it in /usr/lib/postgresql/<version>/bin)";

/// Why a cluster is not available.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something it needs is not installed or not set up (the binaries, `runuser`, the `postgres`
    /// account): a caller may skip, or tell the user what to install.
    #[error("{0}")]
    Unavailable(String),
    /// It is installed but failed (the message includes the tool's output or the server log's tail).
    #[error("{0}")]
    Failed(String),
}

fn failed(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Failed(format!("{what}: {e}"))
}

/// Finds a directory holding `initdb`, `pg_ctl` and `postgres`: `explicit` (with the name of the setting
/// it came from, for the error) when given, else the highest Debian/Ubuntu version, else `PATH`.
pub fn find_bindir(explicit: Option<(PathBuf, &str)>) -> Result<PathBuf, Error> {
    let has_tools = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|t| dir.join(t).is_file())
    };
    if let Some((dir, setting)) = explicit {
        return if has_tools(&dir) {
            Ok(dir)
        } else {
            Err(Error::Unavailable(format!(
                "{setting}={} holds no initdb, pg_ctl and postgres",
                dir.display()
            )))
        };
    }
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
            Error::Unavailable(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found in \
                 /usr/lib/postgresql/*/bin or on PATH"
                    .to_owned(),
            )
        })
}

/// `"15"` from `pg_ctl (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)`: the data directory's format.
pub fn major_version(bin: &Path) -> Result<String, Error> {
    let out = Command::new(bin.join("pg_ctl"))
        .arg("--version")
        .output()
        .map_err(|e| {
            failed(
                format_args!("running {}/pg_ctl --version", bin.display()),
                e,
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|word| {
            let major = word.split('.').next()?;
            (!major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()))
                .then(|| major.to_owned())
        })
        .ok_or_else(|| {
            Error::Failed(format!(
                "cannot read a version in `pg_ctl --version` output: {text}"
            ))
        })
}

/// The unprivileged account the server runs as when we are root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// `None` when we are not root (the server runs as us), else the `postgres` account.
pub fn server_account() -> Result<Option<Account>, Error> {
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let no_runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .iter()
        .all(|p| !Path::new(p).exists());
    if no_runuser {
        return Err(Error::Unavailable(
            "running as root, and `runuser` (util-linux) is missing to drop to the `postgres` \
             account (initdb refuses root)"
                .to_owned(),
        ));
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())?
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Ok(Some(Account { uid, gid })),
        _ => Err(Error::Unavailable(
            "running as root, and there is no `postgres` account to run the server as (initdb \
             refuses root)"
                .to_owned(),
        )),
    }
}

/// `preferred`, or `<temp dir>/<fallback_prefix>-<hash of preferred>` when the server runs as another
/// account that could not reach `preferred` (every ancestor must be searchable by others).
pub fn reachable_root(
    preferred: PathBuf,
    run_as: Option<Account>,
    fallback_prefix: &str,
) -> PathBuf {
    let traversable = preferred
        .ancestors()
        .filter_map(|dir| fs::metadata(dir).ok())
        .all(|meta| meta.permissions().mode() & 0o001 != 0);
    if run_as.is_some() && !traversable {
        return std::env::temp_dir().join(format!("{fallback_prefix}-{}", short_hash(&preferred)));
    }
    preferred
}

/// 32 hex digits from the kernel's random source.
fn random_password() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| failed("reading /dev/urandom", e))?;
    Ok(hex::encode(bytes))
}

/// The first 8 hex digits of a SHA-256 over the path: a short, stable name for a directory.
pub fn short_hash(path: &Path) -> String {
    hex::encode(&Sha256::digest(path.as_os_str().as_encoded_bytes())[..4])
}

/// A server that answered on this port; `fresh` when this call started it. `password` is the
/// `postgres` superuser's (TCP connections need it).
#[derive(Clone, PartialEq, Eq)]
pub struct Running {
    pub port: u16,
    pub fresh: bool,
    pub password: String,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("port", &self.port)
            .field("fresh", &self.fresh)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// One private cluster: binaries, a root directory (lock file, data directory, server log) and a socket
/// directory short enough for the unix socket path limit.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub bin: PathBuf,
    pub root: PathBuf,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    run_as: Option<Account>,
    /// Who the cluster is for, written into its `postgresql.conf`.
    purpose: String,
}

impl Cluster {
    pub fn new(bin: PathBuf, root: PathBuf, run_as: Option<Account>, purpose: &str) -> Cluster {
        let socket_dir = PathBuf::from(format!("/tmp/cairn-pg-{}", short_hash(&root)));
        Cluster {
            bin,
            data: root.join("data"),
            root,
            socket_dir,
            run_as,
            purpose: purpose.to_owned(),
        }
    }

    /// Returns the port of the running cluster, starting it first if needed. Holds an exclusive lock on
    /// `<root>/lock` meanwhile: `flock`, so the kernel releases it when a holder dies, which a lock file
    /// created with `O_EXCL` would not (a crashed run would then block every later one).
    pub fn ensure_running(&self) -> Result<Running, Error> {
        self.prepare_dirs()?;
        let lock_path = self.root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| failed(format_args!("opening {}", lock_path.display()), e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| failed(format_args!("locking {}", lock_path.display()), e))?;
        let password_file = self.root.join("password");
        if self.root.join("initialized").exists() && !password_file.exists() {
            // Made before TCP needed a password (it trusted every local connection): a private
            // cluster's data is disposable, so it is made again rather than left open.
            self.stop()?;
            fs::remove_file(self.root.join("initialized"))
                .map_err(|e| failed(format_args!("resetting {}", self.root.display()), e))?;
        }
        if !self.root.join("initialized").exists() {
            self.init()?;
        }
        let password = fs::read_to_string(&password_file)
            .map_err(|e| failed(format_args!("reading {}", password_file.display()), e))?
            .trim()
            .to_owned();
        if let Some(port) = self.running_port(Duration::from_secs(10)) {
            return Ok(Running {
                port,
                fresh: false,
                password,
            });
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
                return Ok(Running {
                    port,
                    fresh: true,
                    password,
                });
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
        Err(Error::Failed(format!(
            "pg_ctl start failed: {last}\n{}",
            self.log_tail()
        )))
    }

    /// Stops the server (fast shutdown: open sessions are ended, committed work is kept) and waits for
    /// it to be gone. Nothing to do when it is not running.
    pub fn stop(&self) -> Result<(), Error> {
        if self.postmaster_pid().is_none() {
            return Ok(());
        }
        let out = self.pg_ctl(&[
            "stop",
            "-w",
            "-t",
            "60",
            "-m",
            "fast",
            "-D",
            path_str(&self.data)?,
        ])?;
        if out.status.success() || self.postmaster_pid().is_none() {
            Ok(())
        } else {
            Err(Error::Failed(format!(
                "pg_ctl stop failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }

    /// The pid of this cluster's live postmaster, if one runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid = text.lines().next()?.trim().parse().ok()?;
        self.is_our_postmaster(pid).then_some(pid)
    }

    fn prepare_dirs(&self) -> Result<(), Error> {
        for dir in [&self.root, &self.socket_dir] {
            fs::create_dir_all(dir)
                .map_err(|e| failed(format_args!("creating {}", dir.display()), e))?;
            if let Some(account) = self.run_as {
                std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid))
                    .map_err(|e| failed(format_args!("chown {}", dir.display()), e))?;
            }
        }
        fs::set_permissions(&self.socket_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| failed(format_args!("chmod {}", self.socket_dir.display()), e))
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
    pub fn is_our_postmaster(&self, pid: i32) -> bool {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_postgres = args.first().is_some_and(|a| a.ends_with(b"postgres"));
        is_postgres && args.contains(&self.data.as_os_str().as_encoded_bytes())
    }

    /// A from-scratch data directory; `initialized` is written last, so an interrupted `initdb` is
    /// redone rather than trusted.
    fn init(&self) -> Result<(), Error> {
        match fs::remove_dir_all(&self.data) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(format_args!("removing {}", self.data.display()), e)),
        }
        // The superuser's password: written for initdb (which runs as the server's account) and kept
        // for the callers, readable by the owner only.
        let password = random_password()?;
        let password_file = self.root.join("password");
        let _ = fs::remove_file(&password_file);
        File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&password_file)
            .and_then(|mut f| f.write_all(password.as_bytes()))
            .map_err(|e| failed(format_args!("writing {}", password_file.display()), e))?;
        if let Some(account) = self.run_as {
            std::os::unix::fs::chown(&password_file, Some(account.uid), Some(account.gid))
                .map_err(|e| failed(format_args!("chown {}", password_file.display()), e))?;
        }
        let out = self.run(
            "initdb",
            &[
                "-D",
                path_str(&self.data)?,
                "-U",
                "postgres",
                "--pwfile",
                path_str(&password_file)?,
                // Loopback TCP needs the password; the socket's directory is the owner's alone.
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                // Skips only initdb's final flush of the new files; the server itself runs with fsync.
                "--no-sync",
            ],
        )?;
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let conf = self.data.join("postgresql.conf");
        let mut file = File::options()
            .append(true)
            .open(&conf)
            .map_err(|e| failed(format_args!("opening {}", conf.display()), e))?;
        let settings = format!(
            "\n# {}: a private cluster: loopback only, a password over TCP.\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             max_connections = 300\n\
             shared_buffers = 128MB\n\
             # Durable commits stay on: the queue benchmark measures them.\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n",
            self.purpose,
            self.socket_dir.display()
        );
        file.write_all(settings.as_bytes())
            .map_err(|e| failed(format_args!("writing {}", conf.display()), e))?;
        fs::write(self.root.join("initialized"), b"")
            .map_err(|e| failed(format_args!("writing {}", self.root.display()), e))
    }

    /// Makes way for a new server: stops a postmaster that is alive but not answering, and removes the
    /// `postmaster.pid` and socket lock files a killed one left behind.
    fn clear_stale(&self) -> Result<(), Error> {
        let pidfile = self.data.join("postmaster.pid");
        if fs::metadata(&pidfile).is_ok() {
            if self.postmaster_pid().is_some() {
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

    /// Runs `pg_ctl` with these arguments (as the server's account when we are root).
    pub fn pg_ctl(&self, args: &[&str]) -> Result<Output, Error> {
        self.run("pg_ctl", args)
    }

    /// Runs one of the server tools, as the `postgres` account when we are root.
    fn run(&self, tool: &str, args: &[&str]) -> Result<Output, Error> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.run_as.is_some() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&exe);
            cmd
        } else {
            Command::new(&exe)
        };
        // The server's own output goes to server.log (`pg_ctl -l`), so these pipes close when the tool
        // exits and no test runner sees a leaked handle. A process group of its own, which the server
        // inherits: a Ctrl-C meant for the caller's terminal must not stop the server behind its back
        // (the caller stops it, last, when its users are gone).
        cmd.args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .process_group(0)
            .output()
            .map_err(|e| failed(format_args!("running {}", exe.display()), e))
    }

    /// The last 20 lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = self.root.join("server.log");
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("last lines of {}:\n{tail}", log.display())
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, Error> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| failed("finding a free port", e))
}

fn path_str(path: &Path) -> Result<&str, Error> {
    path.to_str()
        .ok_or_else(|| Error::Failed(format!("{} is not UTF-8", path.display())))
}
