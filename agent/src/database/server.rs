//! What the three engines share: the unprivileged account a server runs as when the agent is root, a
//! server started detached (so it outlives the agent and a restarted agent adopts it), the proof that a
//! recorded pid is still our server, and the tools run with their passwords in env or on stdin.
//!
//! What it must not do: put a password on a command line (`/proc/*/cmdline` is world-readable), or let
//! one reach an error: every tool's output passes through [`Scrub`] before it becomes a [`DbError`].

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;

use super::DbError;

/// The account a server (and its init tool) runs as: the engine's own Debian account when the agent is
/// root (PostgreSQL refuses to run as root, and a server bug should not own the node), else the agent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// `None` when the agent is not root; else the account `name` (Debian's packages make `postgres`,
/// `redis`, `mysql`).
pub(crate) fn account(name: &str) -> Result<Option<Account>, DbError> {
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let id = |flag: &str| -> Option<u32> {
        let out = std::process::Command::new("id")
            .args([flag, name])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())?
    };
    match (id("-u"), id("-g")) {
        (Some(uid), Some(gid)) => Ok(Some(Account { uid, gid })),
        _ => Err(DbError::Unsupported(format!(
            "the agent runs as root and there is no `{name}` account to run the database server as \
             (its Debian package makes it)"
        ))),
    }
}

/// Creates `dir` (mode 0700) owned by `account`, after checking that the account can reach it.
pub(crate) fn make_dir(dir: &Path, account: Option<Account>) -> Result<(), DbError> {
    fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    if let Some(a) = account {
        let blocked = dir
            .parent()
            .into_iter()
            .flat_map(Path::ancestors)
            .find(|p| {
                fs::metadata(p).is_ok_and(|m| {
                    use std::os::unix::fs::MetadataExt as _;
                    let mode = m.permissions().mode();
                    !(mode & 0o001 != 0 || (m.uid() == a.uid && mode & 0o100 != 0))
                })
            });
        if let Some(p) = blocked {
            return Err(DbError::Unsupported(format!(
                "the database server's account (uid {}) cannot reach {}: {} is not searchable by \
                 others; put the agent's data directory where every parent is (mode o+x)",
                a.uid,
                dir.display(),
                p.display()
            )));
        }
        chown(dir, a)?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| io("chmod", dir, e))
}

pub(crate) fn chown(path: &Path, a: Account) -> Result<(), DbError> {
    std::os::unix::fs::chown(path, Some(a.uid), Some(a.gid)).map_err(|e| io("chown", path, e))
}

/// Writes `bytes` to a new file readable by its owner only (given to `account`): a password file.
pub(crate) fn write_private(
    path: &Path,
    bytes: &[u8],
    account: Option<Account>,
) -> Result<(), DbError> {
    use std::io::Write as _;
    let _ = fs::remove_file(path);
    fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|e| io("writing", path, e))?;
    if let Some(a) = account {
        chown(path, a)?;
    }
    Ok(())
}

pub(crate) fn io(what: &str, path: &Path, e: std::io::Error) -> DbError {
    DbError::Failed(format!("{what} {}: {e}", path.display()))
}

/// 32 hex digits from the kernel's random source: an instance's admin password.
pub(crate) fn random_password() -> Result<String, DbError> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| DbError::Failed(format!("reading /dev/urandom: {e}")))?;
    Ok(hex::encode(bytes))
}

/// The instance's admin password (made at init, kept in `<dir>/admin.password`, mode 0600, owned by
/// the agent: the server never reads it).
pub(crate) fn admin_password(dir: &Path) -> Result<String, DbError> {
    let path = dir.join("admin.password");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pw = random_password()?;
            write_private(&path, pw.as_bytes(), None)?;
            Ok(pw)
        }
        Err(e) => Err(io("reading", &path, e)),
    }
}

/// Replaces each secret it knows with `<redacted>` in text that came from a tool or a server.
#[derive(Default)]
pub(crate) struct Scrub(Vec<String>);

impl std::fmt::Debug for Scrub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrub({} secrets)", self.0.len())
    }
}

impl Scrub {
    pub fn new(secrets: impl IntoIterator<Item = impl Into<String>>) -> Scrub {
        let mut s = Scrub::default();
        for secret in secrets {
            s.add(secret);
        }
        s
    }
    pub fn add(&mut self, secret: impl Into<String>) {
        let secret = secret.into();
        if !secret.is_empty() {
            // Also as a tool would quote it back in SQL ('' for ').
            let doubled = secret.replace('\'', "''");
            if doubled != secret {
                self.0.push(doubled);
            }
            self.0.push(secret);
        }
    }
    pub fn clean(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.0 {
            out = out.replace(s.as_str(), "<redacted>");
        }
        out
    }
    pub fn failed(&self, what: impl std::fmt::Display, detail: &str) -> DbError {
        let detail = self.clean(detail.trim());
        if detail.is_empty() {
            DbError::Failed(self.clean(&what.to_string()))
        } else {
            DbError::Failed(self.clean(&format!("{what}: {}", last_lines(&detail, 15))))
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One run of a client or admin tool: `env` carries passwords, `stdin` the SQL; it runs as `account`
/// when given (the init tools, which write the data directory).
#[derive(Debug)]
pub(crate) struct Tool<'a> {
    pub exe: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(&'a str, String)>,
    pub stdin: Option<Vec<u8>>,
    pub account: Option<Account>,
    pub cwd: Option<&'a Path>,
}

impl<'a> Tool<'a> {
    pub fn new(exe: impl Into<PathBuf>) -> Tool<'a> {
        Tool {
            exe: exe.into(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            account: None,
            cwd: None,
        }
    }
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }
    pub fn env(mut self, key: &'a str, value: impl Into<String>) -> Self {
        self.env.push((key, value.into()));
        self
    }
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }
    pub fn account(mut self, a: Option<Account>) -> Self {
        self.account = a;
        self
    }
    pub fn cwd(mut self, dir: &'a Path) -> Self {
        self.cwd = Some(dir);
        self
    }

    /// The same tool run in the container `name` (`docker exec`): the tool by its name on the image's
    /// `PATH`, its environment passed by name only (`-e NAME`, the value from the CLI's own
    /// environment: a password never reaches a command line). `None`: unchanged.
    pub fn inside(self, name: Option<&str>) -> Self {
        let Some(container) = name else {
            return self;
        };
        let mut args = vec!["exec".to_owned(), "--interactive".to_owned()];
        for (k, _) in &self.env {
            args.push("--env".to_owned());
            args.push((*k).to_owned());
        }
        args.push(container.to_owned());
        args.push(self.name());
        args.extend(self.args);
        Tool {
            exe: PathBuf::from("docker"),
            args,
            env: self.env,
            stdin: self.stdin,
            account: None,
            cwd: None,
        }
    }

    /// The command, its stdio not yet set.
    pub fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(&self.args).kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(a) = self.account {
            cmd.uid(a.uid).gid(a.gid);
        }
        if let Some(dir) = self.cwd {
            cmd.current_dir(dir);
        }
        cmd
    }

    fn name(&self) -> String {
        self.exe
            .file_name()
            .unwrap_or(OsStr::new("tool"))
            .to_string_lossy()
            .into_owned()
    }

    /// Runs it to the end; its stdout when it succeeded, else its output (scrubbed) in the error.
    pub async fn run(&self, scrub: &Scrub) -> Result<String, DbError> {
        let mut cmd = self.command();
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| DbError::Unsupported(format!("cannot run {}: {e}", self.exe.display())))?;
        if let Some(input) = &self.stdin {
            let mut pipe = child.stdin.take().expect("piped");
            // A tool that exits early (a bad login) closes its stdin: its own error says why.
            let _ = pipe.write_all(input).await;
            drop(pipe);
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| DbError::Failed(format!("waiting for {}: {e}", self.name())))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(scrub.failed(
                format_args!("{} failed ({})", self.name(), out.status),
                &format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ))
        }
    }
}

/// Starts a server detached from the agent: a session and process group of its own (a signal for the
/// agent does not reach it), reparented to init by `setsid --fork` (so no one has to reap it and it
/// outlives the agent), its output appended to `log`, its working directory `cwd` (how
/// [`is_server_of`] recognises it later).
pub(crate) fn spawn_detached(
    exe: &Path,
    args: &[String],
    cwd: &Path,
    log: &Path,
    account: Option<Account>,
) -> Result<(), DbError> {
    let file = fs::File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(|e| io("opening", log, e))?;
    if let Some(a) = account {
        chown(log, a)?;
    }
    let err = file.try_clone().map_err(|e| io("opening", log, e))?;
    let mut cmd = std::process::Command::new("setsid");
    cmd.arg("--fork")
        .arg(exe)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0);
    if let Some(a) = account {
        cmd.uid(a.uid).gid(a.gid);
    }
    let status = cmd
        .status()
        .map_err(|e| DbError::Unsupported(format!("cannot run setsid (util-linux): {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(DbError::Failed(format!(
            "starting {} failed ({status})",
            exe.display()
        )))
    }
}

/// Whether `pid` is a live server whose working directory is `dir` (servers chdir into their data
/// directory): a recycled pid or a zombie is not.
pub(crate) fn is_server_of(pid: i32, dir: &Path) -> bool {
    let Ok(cwd) = fs::read_link(format!("/proc/{pid}/cwd")) else {
        return false;
    };
    let Ok(dir) = fs::canonicalize(dir) else {
        return false;
    };
    cwd == dir
}

/// The pid in the first line of `pidfile`, when that process is a live server of `dir`.
pub(crate) fn live_pid(pidfile: &Path, dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(pidfile).ok()?;
    let pid = text.lines().next()?.trim().parse().ok()?;
    is_server_of(pid, dir).then_some(pid)
}

/// Sends `signal` to a live server (its clean shutdown: SIGINT for PostgreSQL's fast one, SIGTERM for
/// the others) and waits for it to be gone (SIGKILL after `patience`).
pub(crate) async fn terminate(
    pid: i32,
    dir: &Path,
    signal: rustix::process::Signal,
    patience: Duration,
) {
    let Some(p) = rustix::process::Pid::from_raw(pid) else {
        return;
    };
    let _ = rustix::process::kill_process(p, signal);
    let deadline = Instant::now() + patience;
    while is_server_of(pid, dir) {
        if Instant::now() >= deadline {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if Instant::now() >= deadline + Duration::from_secs(5) {
            return;
        }
    }
}

/// Polls `ready` until it answers `Ok`, for at most `patience`; the last error otherwise (with the log's
/// tail).
pub(crate) async fn wait_ready<F, Fut>(
    patience: Duration,
    log: &Path,
    scrub: &Scrub,
    mut ready: F,
) -> Result<(), DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), DbError>>,
{
    let deadline = Instant::now() + patience;
    loop {
        match ready().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                let log_text = fs::read_to_string(log).unwrap_or_default();
                return Err(scrub.failed(
                    format_args!("the server did not become ready ({e}); {}", log.display()),
                    &log_text,
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `exe` (from `package`) when `exe --version`, read by `parse`, is `wanted`; else what it is.
pub(crate) fn installed(
    engine: &str,
    exe: &str,
    package: &str,
    wanted: &str,
    parse: impl Fn(&str) -> Option<&str>,
) -> Result<PathBuf, DbError> {
    let out = std::process::Command::new(exe)
        .arg("--version")
        .output()
        .map_err(|e| {
            DbError::Unsupported(format!(
                "this node has no {exe} (Debian: apt-get install {package}): {e}"
            ))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let have = parse(&text).unwrap_or("unknown");
    if super::version_matches(wanted, have) {
        Ok(PathBuf::from(exe))
    } else {
        Err(DbError::Unsupported(format!(
            "this node has no {engine} {wanted}; its {exe} is {have}"
        )))
    }
}

/// A SQL string literal ('' for ').
pub(crate) fn sql_literal(s: &str) -> Result<String, DbError> {
    if s.contains('\0') {
        return Err(DbError::Unsupported(
            "a database name, user or password holds a NUL byte".into(),
        ));
    }
    Ok(format!("'{}'", s.replace('\'', "''")))
}
