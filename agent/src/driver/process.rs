//! The process driver, for hosts without Docker: a release is a directory, a replica is a supervised
//! process that outlives the agent.
//!
//! - Build: the source tree is copied into a directory per build key (source commit and recipe,
//!   [`cairn_proto::build`]: `<root>/<installation>/<app>/b-<build key>/app`), shared by every release
//!   of the key (one that changes only env, limits, domains, port or start command builds nothing), and
//!   the runtime's build commands run there in order, their output streamed to a [`LogSink`]. The
//!   directory is renamed into place only when every command passed, so a half-built one is never
//!   mistaken for a built one.
//! - Run: the start command runs through `/bin/sh -c` in the release directory, in its own process group,
//!   with a clean environment (`PATH`, `HOME`, the spec's env, the decrypted secrets, and `PORT`, a free
//!   port on 127.0.0.1 chosen here). A supervisor restarts it with exponential backoff when it exits, keeps
//!   its stdout and stderr (written to files in the agent's state, read back into a bounded ring), and on
//!   stop sends SIGTERM to the whole group, then SIGKILL after the grace period.
//! - Isolation ([`ProcessConfig::run_as`]): when set (the agent's default when it runs as root), builds
//!   and replicas run as that unprivileged user and group, with no supplementary groups, in release
//!   directories owned by that user (mode 0700); the agent's state (`state`, its data directory) stays
//!   unreachable to them.
//! - Restarts of the agent: replicas survive a crash or SIGKILL of the agent, and its exit too with
//!   [`ProcessConfig::keep_on_exit`] (`cairn-agent --keep-replicas-on-exit`, the unit's choice):
//!   each replica has a record in `state` (its spec with the secrets still sealed,
//!   and its process group: leader pid, the kernel's start time of that pid, and the boot id, so a
//!   recycled pid or a reboot is never taken for the replica). A new agent calls
//!   [`ProcessDriver::adopt`]: a recorded process that still runs is supervised again (no downtime
//!   across an agent upgrade), a recorded replica whose process died is started again (its secrets
//!   opened again with the node's identity), and a group that lost its leader is killed. Removing a
//!   replica always kills its recorded group, whether or not this agent started it, and deletes its
//!   record; a remove is never reported done while the process runs.
//!
//! What it must not do: pass the agent's own environment to an app or a build (it holds the agent's
//! credentials), run a build with the secrets, write a secret's plaintext to disk, signal a process group
//! it did not create (a group is signalled only while its recorded leader still runs with the recorded
//! start time, or after that leader died while the group still exists), or, unless told to keep them,
//! leave a child running when the driver is dropped.
//!
//! Limits (memory, CPU) are not applied by this driver yet: that needs cgroup delegation from the host.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read as _, Seek as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cairn_schema::{Identity, Name, Secret};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{
    Driver, DriverError, DriverKind, Found, ImageId, Replica, ReplicaId, ReplicaState,
    ReplicaStatus, replica_labels,
};
use crate::logs::{LineSplitter, LogLine, LogRing, LogSink, LogStream};
use crate::spec::{ReplicaSpec, SpecError};

/// The unprivileged user and group builds and replicas run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppUser {
    pub uid: u32,
    pub gid: u32,
}

impl AppUser {
    /// `nobody`/`nogroup` on Debian and most distributions: exists everywhere, owns nothing.
    pub const NOBODY: AppUser = AppUser {
        uid: 65534,
        gid: 65534,
    };
}

/// How the process driver behaves on this node.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub installation: Name,
    pub node: Name,
    /// Where release directories live. With [`ProcessConfig::run_as`], the app user must be able to
    /// traverse every directory above it (the driver checks, and says which one it cannot).
    pub root: PathBuf,
    /// Where replica records and output files live: the agent's own state (mode 0700), never inside
    /// a directory an app can reach. Default: `<root>/.state`.
    pub state: PathBuf,
    /// Run builds and replicas as this user (needs the agent to be root); `None`: as the agent's user.
    pub run_as: Option<AppUser>,
    /// Leave replicas running when the driver is dropped (the agent exits), for the next agent to
    /// [`ProcessDriver::adopt`]. Off by default (a dropped driver kills what it started).
    pub keep_on_exit: bool,
    pub build_timeout: Duration,
    /// How long a stopping replica gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// The first pause before restarting a crashed replica; it doubles up to `backoff_max`, and resets once
    /// a replica stayed up for `stable_after`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub stable_after: Duration,
    /// Lines of output kept per replica.
    pub log_lines: usize,
    /// Bytes an output file may grow to before it is emptied (after it was read).
    pub output_file_max: u64,
    /// `PATH` for builds and replicas.
    pub path: String,
}

impl ProcessConfig {
    pub fn new(installation: Name, node: Name, root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        ProcessConfig {
            installation,
            node,
            state: root.join(".state"),
            root,
            run_as: None,
            keep_on_exit: false,
            build_timeout: Duration::from_secs(20 * 60),
            stop_grace: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(10),
            log_lines: 2000,
            output_file_max: 8 << 20,
            path: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        }
    }
}

const MARKER: &str = ".cairn-built";
const RECORD: &str = "record.json";
const STDOUT: &str = "stdout";
const STDERR: &str = "stderr";

/// Runs replicas as supervised local processes.
#[derive(Debug)]
pub struct ProcessDriver {
    cfg: ProcessConfig,
    replicas: Mutex<HashMap<String, Arc<Supervised>>>,
    builds: tokio::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    builds_run: AtomicU64,
}

#[derive(Debug)]
struct Supervised {
    name: String,
    image: ImageId,
    labels: BTreeMap<String, String>,
    addr: SocketAddr,
    logs: Arc<LogRing>,
    state: Arc<Mutex<ProcState>>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    tail: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct ProcState {
    /// The process group of the running child (its leader's pid).
    pgid: Option<i32>,
    started: bool,
    restarts: u32,
    last_exit: Option<i64>,
    stopped: bool,
}

/// A replica's record in the agent's state: enough to find its process again and to start it again.
/// The secrets stay sealed to the node's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: ReplicaSpec,
    image: String,
    port: u16,
    stopped: bool,
    process: Option<ProcId>,
}

/// A process, identified so that a recycled pid or a reboot is never mistaken for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ProcId {
    pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks after boot.
    start: u64,
    boot: String,
}

/// What [`ProcessDriver::adopt`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Replicas whose process still ran: supervised again, untouched.
    pub adopted: Vec<String>,
    /// Replicas whose process was gone: started again.
    pub restarted: Vec<String>,
    /// Replicas recorded as stopped: kept stopped.
    pub stopped: Vec<String>,
    /// Records that could not be used (another installation's, damaged, their release gone, their
    /// secrets no longer open): their processes killed, the records removed.
    pub killed: Vec<String>,
}

/// `(pid, pgrp)` of every live process whose working directory is under `root`.
fn processes_under(root: &Path) -> Vec<(i32, i32)> {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            let (state, pgrp, _) = proc_stat(pid)?;
            (cwd.starts_with(root) && state != 'Z' && pid != std::process::id() as i32)
                .then_some((pid, pgrp))
        })
        .collect()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `(state, pgrp, start)` of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`; comm may hold anything, so split after the last `)`.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f.first()?.chars().next()?,
        f.get(2)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
    ))
}

impl ProcId {
    fn of(pid: i32) -> Option<ProcId> {
        let (_, _, start) = proc_stat(pid)?;
        Some(ProcId {
            pid,
            start,
            boot: boot_id(),
        })
    }

    /// Whether this very process still runs (not a zombie, not a recycled pid, same boot), as the
    /// leader of its own group.
    fn alive(&self) -> bool {
        self.boot == boot_id()
            && matches!(proc_stat(self.pid), Some((s, pgrp, start)) if s != 'Z' && start == self.start && pgrp == self.pid)
    }

    /// Whether the group this process led still has members although the leader is gone. Linux never
    /// hands out a pid that still names a process group, so such a group is this one.
    fn orphaned_group(&self) -> bool {
        self.boot == boot_id()
            && proc_stat(self.pid).is_none()
            && rustix::process::Pid::from_raw(self.pid)
                .is_some_and(|p| rustix::process::test_kill_process_group(p).is_ok())
    }

    /// Kills the group if it is provably this one; waits (bounded) until the leader is gone.
    async fn kill_group(&self, sig: rustix::process::Signal, grace: Duration) -> bool {
        if self.alive() || self.orphaned_group() {
            signal_group(Some(self.pid), sig);
        } else {
            return true;
        }
        let t = Instant::now();
        while t.elapsed() < grace {
            if !self.alive() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        !self.alive()
    }
}

impl ProcessDriver {
    pub fn new(cfg: ProcessConfig) -> Self {
        ProcessDriver {
            cfg,
            replicas: Mutex::new(HashMap::new()),
            builds: tokio::sync::Mutex::new(HashMap::new()),
            builds_run: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &ProcessConfig {
        &self.cfg
    }

    /// How many builds this driver ran.
    pub fn builds_run(&self) -> u64 {
        self.builds_run.load(Ordering::Relaxed)
    }

    /// The pid of a replica's current process (its process group id), if it runs.
    pub fn pid(&self, id: &ReplicaId) -> Option<i32> {
        let sup = self.get(&id.0)?;
        sup.state.lock().unwrap_or_else(|p| p.into_inner()).pgid
    }

    /// Follows a replica's output from now on.
    pub fn follow(&self, id: &ReplicaId) -> Option<tokio::sync::broadcast::Receiver<LogLine>> {
        Some(self.get(&id.0)?.logs.subscribe())
    }

    fn get(&self, name: &str) -> Option<Arc<Supervised>> {
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn release_dir(&self, spec: &ReplicaSpec) -> PathBuf {
        self.cfg
            .root
            .join(spec.installation.as_str())
            .join(spec.app.as_str())
            .join(format!("b-{}", spec.build_key()))
    }

    /// A replica's directory in the agent's state.
    fn replica_dir(&self, name: &str) -> PathBuf {
        self.cfg.state.join(name)
    }

    fn base_command(&self, program: &str, dir: &Path) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(program)
            .current_dir(dir)
            .env_clear()
            .env("PATH", &self.cfg.path)
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(u) = self.cfg.run_as {
            cmd.uid(u.uid).gid(u.gid);
        }
        cmd
    }

    /// Creates `dir` (and its parents) as the agent's, mode `mode`.
    fn make_dir(dir: &Path, mode: u32) -> Result<(), DriverError> {
        std::fs::create_dir_all(dir).map_err(|e| DriverError::io("create", dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| DriverError::io("restrict", dir, e))
    }

    /// With an app user: that every directory above the release root lets it through, so a replica
    /// does not fail later with a bare "permission denied".
    fn check_reachable(&self, user: AppUser) -> Result<(), DriverError> {
        let root = std::path::absolute(&self.cfg.root)
            .map_err(|e| DriverError::io("resolve", &self.cfg.root, e))?;
        for dir in root.ancestors() {
            let Ok(meta) = std::fs::metadata(dir) else {
                continue;
            };
            let mode = meta.permissions().mode();
            let through = mode & 0o001 != 0
                || (meta.uid() == user.uid && mode & 0o100 != 0)
                || (meta.gid() == user.gid && mode & 0o010 != 0);
            if !through {
                return Err(DriverError::Unsupported {
                    what: "process",
                    needs: format!(
                        "a release directory the app user (uid {}) can reach, and {} (mode {:o}) \
                         stops it: choose another --apps-dir or let others traverse that directory",
                        user.uid,
                        dir.display(),
                        mode & 0o7777
                    ),
                });
            }
        }
        Ok(())
    }

    async fn run_build(
        &self,
        spec: &ReplicaSpec,
        context: &Path,
        tmp: &Path,
        log: &dyn LogSink,
    ) -> Result<(), DriverError> {
        let app = tmp.join("app");
        let (from, to, owner) = (context.to_owned(), app.clone(), self.cfg.run_as);
        let top = tmp.to_owned();
        tokio::task::spawn_blocking(move || {
            copy_tree(&from, &to)?;
            // The app's private working directory: its own, nobody else's.
            if let Some(u) = owner {
                chown_tree(&top, u)?;
            }
            for d in [&top, &to] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| DriverError::io("restrict", d, e))?;
            }
            Ok::<(), DriverError>(())
        })
        .await
        .map_err(DriverError::Join)??;
        for cmd in &spec.build.commands {
            log.line(LogLine::new(LogStream::Agent, format!("$ {cmd}")));
            let mut child = self
                .base_command(cmd, &app)
                .spawn()
                .map_err(|e| DriverError::io("run /bin/sh in", &app, e))?;
            let group = GroupGuard(child.id().and_then(|p| i32::try_from(p).ok()));
            let (out, err) = (child.stdout.take(), child.stderr.take());
            let pump_out = pump(out, LogStream::Build, log);
            let pump_err = pump(err, LogStream::Build, log);
            let (status, _, _) = tokio::join!(child.wait(), pump_out, pump_err);
            group.kill(rustix::process::Signal::KILL);
            let status =
                status.map_err(|e| DriverError::io("wait for a build command in", &app, e))?;
            if !status.success() {
                let reason = match status.code() {
                    Some(c) => format!("build command `{cmd}` exited with status {c}"),
                    None => format!("build command `{cmd}` was killed"),
                };
                log.line(LogLine::new(
                    LogStream::Agent,
                    format!("build failed: {reason}"),
                ));
                return Err(DriverError::Build {
                    app: spec.app.clone(),
                    release: spec.release,
                    reason,
                });
            }
        }
        let marker = tmp.join(MARKER);
        std::fs::write(&marker, spec.build_key()).map_err(|e| DriverError::io("write", &marker, e))
    }

    fn status_of(&self, sup: &Supervised) -> Option<ReplicaStatus> {
        let st = sup.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = if st.stopped {
            ReplicaState::Stopped
        } else if st.pgid.is_some() {
            ReplicaState::Running
        } else if st.started {
            ReplicaState::Restarting
        } else {
            ReplicaState::Created
        };
        let restarts = st.restarts;
        drop(st);
        ReplicaStatus::from_labels(
            sup.name.clone(),
            sup.name.clone(),
            sup.image.0.clone(),
            &sup.labels,
            state,
            Some(sup.addr),
            restarts,
        )
    }

    async fn stop_supervised(&self, sup: &Supervised) {
        let _ = sup.stop.send(true);
        let task = sup.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut task) = task {
            // The supervisor kills the group after the grace period; this bound only guards against a bug.
            if tokio::time::timeout(self.cfg.stop_grace + Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        let tail = sup.tail.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tail) = tail {
            // The tailer reads what is left and ends (it watches the same flag).
            let _ = tokio::time::timeout(Duration::from_secs(2), tail).await;
        }
        let mut st = sup.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pgid) = st.pgid.take() {
            GroupGuard(Some(pgid)).kill(rustix::process::Signal::KILL);
        }
        st.stopped = true;
    }

    fn read_record(&self, name: &str) -> Option<Record> {
        let bytes = std::fs::read(self.replica_dir(name).join(RECORD)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Kills what a record (or a damaged one) says runs, and deletes the replica's state.
    async fn forget(&self, name: &str) -> Result<(), DriverError> {
        if let Some(proc) = self.read_record(name).and_then(|r| r.process) {
            proc.kill_group(rustix::process::Signal::TERM, self.cfg.stop_grace)
                .await;
            if !proc
                .kill_group(rustix::process::Signal::KILL, Duration::from_secs(5))
                .await
            {
                return Err(DriverError::io(
                    "kill the process of",
                    &self.replica_dir(name),
                    std::io::Error::other(format!("pid {} does not die", proc.pid)),
                ));
            }
        }
        let dir = self.replica_dir(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::io("remove", &dir, e)),
        }
    }

    /// Finds the replicas an earlier agent (this one before a restart, crash or upgrade) left in the
    /// state directory: supervises again those whose process still runs, starts again those whose
    /// process is gone (their secrets opened with `identity`), keeps stopped ones stopped, and kills
    /// and forgets those it cannot use. Call it once, before the first task.
    pub async fn adopt(&self, identity: &Identity) -> Result<Adoption, DriverError> {
        let mut out = Adoption::default();
        let mut found = Vec::new();
        match std::fs::read_dir(&self.cfg.state) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                        continue;
                    };
                    if entry.file_type().is_ok_and(|t| t.is_dir()) && self.get(&name).is_none() {
                        found.push(name);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DriverError::io("read", &self.cfg.state, e)),
        }
        let mut keep = Vec::new();
        for name in found {
            let usable = self.read_record(&name).filter(|r| {
                r.spec.check_for(&self.cfg.installation).is_ok()
                    && r.spec.replica_name() == name
                    && Path::new(&r.image).join(MARKER).is_file()
                    && Path::new(&r.image).starts_with(&self.cfg.root)
            });
            match usable {
                Some(rec) => keep.push(rec),
                None => {
                    // The state dir is this agent's alone: a record it cannot use is stale. Stop its
                    // process rather than leave one nobody manages.
                    tracing::warn!(replica = %name, "unusable replica record; killing its process");
                    self.forget(&name).await?;
                    out.killed.push(name);
                }
            }
        }
        // What still runs under this installation's releases without a usable record (a replica
        // started just before a crash, before its record said so; a build cut short) is killed
        // before anything starts again.
        let adopted: Vec<i32> = keep
            .iter()
            .filter(|r| !r.stopped)
            .filter_map(|r| r.process.as_ref().filter(|p| p.alive()).map(|p| p.pid))
            .collect();
        let mine = self.cfg.root.join(self.cfg.installation.as_str());
        let mine = std::fs::canonicalize(&mine).unwrap_or(mine);
        for (pid, pgrp) in processes_under(&mine) {
            if !adopted.contains(&pgrp) {
                tracing::warn!(pid, pgrp, "killing a process left in a release directory");
                signal_group(Some(pgrp), rustix::process::Signal::KILL);
                if pgrp != pid
                    && let Some(p) = rustix::process::Pid::from_raw(pid)
                {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
        }
        for rec in keep {
            let name = rec.spec.replica_name();
            let running = rec.process.clone().filter(ProcId::alive);
            if rec.stopped {
                self.supervise_record(rec, None, None)?;
                out.stopped.push(name);
                continue;
            }
            if running.is_none()
                && let Some(p) = &rec.process
                && p.orphaned_group()
            {
                signal_group(Some(p.pid), rustix::process::Signal::KILL);
            }
            let secrets = match rec.spec.open_secrets(identity) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(replica = %name, error = %e, "cannot open the secrets of a recorded replica; killing it");
                    self.forget(&name).await?;
                    out.killed.push(name);
                    continue;
                }
            };
            let was_running = running.is_some();
            let launch = self.launch(&rec.spec, &rec.image, rec.port, &secrets);
            drop(secrets);
            self.supervise_record(rec, Some(launch?), running)?;
            if was_running {
                out.adopted.push(name);
            } else {
                out.restarted.push(name);
            }
        }
        tracing::info!(
            adopted = out.adopted.len(),
            restarted = out.restarted.len(),
            stopped = out.stopped.len(),
            killed = out.killed.len(),
            "process replicas found after the agent started"
        );
        Ok(out)
    }

    /// What the supervisor needs to (re)start a spec's replica.
    fn launch(
        &self,
        spec: &ReplicaSpec,
        image: &str,
        port: u16,
        secrets: &crate::spec::SecretEnv,
    ) -> Result<Launch, DriverError> {
        let start = spec
            .build
            .start
            .clone()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| DriverError::Unsupported {
                what: "process",
                needs: "a start command".into(),
            })?;
        let launch = Launch {
            start,
            dir: Path::new(image).join("app"),
            env: spec
                .env
                .iter()
                .filter(|(k, _)| k.as_str() != "PORT" && !secrets.contains(k.as_str()))
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            secrets: secrets
                .iter()
                .filter(|(k, _)| *k != "PORT")
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect(),
            port,
            path: self.cfg.path.clone(),
            run_as: self.cfg.run_as,
            keep: self.cfg.keep_on_exit,
            grace: self.cfg.stop_grace,
            backoff_initial: self.cfg.backoff_initial,
            backoff_max: self.cfg.backoff_max,
            stable_after: self.cfg.stable_after,
            output: self.replica_dir(&spec.replica_name()),
        };
        if launch.env.iter().any(|(_, v)| v.contains('\0')) {
            return Err(SpecError::Invalid {
                field: "env",
                why: "a value holds a NUL byte".into(),
            }
            .into());
        }
        Ok(launch)
    }

    /// Registers a recorded replica and (with a launch) starts its supervisor, adopting `running`.
    fn supervise_record(
        &self,
        rec: Record,
        launch: Option<Launch>,
        running: Option<ProcId>,
    ) -> Result<Arc<Supervised>, DriverError> {
        let name = rec.spec.replica_name();
        let dir = self.replica_dir(&name);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, rec.port));
        let (stop_tx, stop_rx) = watch::channel(launch.is_none());
        // An adopted process runs already: say so from the first listing on.
        let state = Arc::new(Mutex::new(ProcState {
            stopped: launch.is_none(),
            pgid: running.as_ref().map(|p| p.pid),
            started: running.is_some(),
            ..Default::default()
        }));
        let logs = Arc::new(LogRing::new(self.cfg.log_lines));
        let record = Arc::new(Mutex::new(rec.clone()));
        let output = Arc::new(Mutex::new(OutputTail::new(&dir, self.cfg.output_file_max)));
        let task = launch.map(|launch| {
            tokio::spawn(supervise(
                launch,
                Watched {
                    state: state.clone(),
                    logs: logs.clone(),
                    output: output.clone(),
                },
                stop_rx.clone(),
                running,
                record.clone(),
            ))
        });
        let tail = tokio::spawn(tail_output(output, logs.clone(), stop_rx));
        let sup = Arc::new(Supervised {
            name: name.clone(),
            image: ImageId(rec.image.clone()),
            labels: replica_labels(&rec.spec, &self.cfg.node),
            addr,
            logs,
            state,
            stop: stop_tx,
            task: Mutex::new(task),
            tail: Mutex::new(Some(tail)),
        });
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, sup.clone());
        Ok(sup)
    }
}

impl Drop for ProcessDriver {
    fn drop(&mut self) {
        let keep = self.cfg.keep_on_exit;
        let replicas = self.replicas.get_mut().unwrap_or_else(|p| p.into_inner());
        for sup in replicas.values() {
            if let Some(task) = sup.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
                task.abort();
            }
            if let Some(task) = sup.tail.lock().unwrap_or_else(|p| p.into_inner()).take() {
                task.abort();
            }
            if keep {
                continue;
            }
            let _ = sup.stop.send(true);
            if let Some(pgid) = sup
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pgid
                .take()
            {
                GroupGuard(Some(pgid)).kill(rustix::process::Signal::KILL);
            }
        }
    }
}

/// Kills a process group when dropped (the supervisor's future may be dropped at runtime shutdown).
#[derive(Debug)]
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(mut self, sig: rustix::process::Signal) {
        signal_group(self.0.take(), sig);
    }

    /// Lets the group outlive the guard (replicas kept across agent restarts).
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        signal_group(self.0.take(), rustix::process::Signal::KILL);
    }
}

fn signal_group(pgid: Option<i32>, sig: rustix::process::Signal) {
    // Never 0 or 1: kill(0) is our own group, kill(-1) is every process we may signal.
    if let Some(pid) = pgid
        .filter(|p| *p > 1)
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

async fn pump<R: AsyncRead + Unpin>(reader: Option<R>, stream: LogStream, sink: &dyn LogSink) {
    let Some(mut reader) = reader else { return };
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => splitter.push(&buf[..n], |l| sink.line(LogLine::new(stream, l))),
        }
    }
    splitter.finish(|l| sink.line(LogLine::new(stream, l)));
}

/// A replica's output files and how far into each the ring has read. Shared by the tailer, which
/// catches up every 100 ms, and the supervisor, which catches up when the process exits, before it
/// records the exit: whoever sees a replica exited finds its last lines in the ring.
struct OutputTail {
    files: Vec<Tailed>,
    max: u64,
}

struct Tailed {
    path: PathBuf,
    stream: LogStream,
    file: Option<File>,
    at: u64,
    split: LineSplitter,
}

impl OutputTail {
    fn new(dir: &Path, max: u64) -> OutputTail {
        let files = [(STDOUT, LogStream::Stdout), (STDERR, LogStream::Stderr)]
            .into_iter()
            .map(|(n, stream)| Tailed {
                path: dir.join(n),
                stream,
                file: None,
                at: 0,
                split: LineSplitter::default(),
            })
            .collect();
        OutputTail { files, max }
    }

    /// Reads what the files gained since the last call into `logs`. A file past `max` bytes is emptied
    /// after it was read (its writer appends, so it goes on at the start).
    fn catch_up(&mut self, logs: &LogRing) {
        let mut buf = [0u8; 16 * 1024];
        for t in &mut self.files {
            if t.file.is_none() {
                t.file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&t.path)
                    .ok();
            }
            let Some(f) = t.file.as_mut() else { continue };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < t.at {
                t.at = 0;
            }
            if f.seek(std::io::SeekFrom::Start(t.at)).is_err() {
                continue;
            }
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                t.at += n as u64;
                let stream = t.stream;
                t.split
                    .push(&buf[..n], |l| logs.line(LogLine::new(stream, l)));
            }
            if t.at > self.max && f.set_len(0).is_ok() {
                t.at = 0;
            }
        }
    }

    /// Ends the partial last lines.
    fn finish(&mut self, logs: &LogRing) {
        for t in &mut self.files {
            let stream = t.stream;
            t.split.finish(|l| logs.line(LogLine::new(stream, l)));
        }
    }
}

fn lock_tail(tail: &Mutex<OutputTail>) -> std::sync::MutexGuard<'_, OutputTail> {
    tail.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a replica's output files into its ring as they grow, until `stop` (then once more).
async fn tail_output(
    output: Arc<Mutex<OutputTail>>,
    logs: Arc<LogRing>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let last = *stop.borrow();
        {
            let mut tail = lock_tail(&output);
            tail.catch_up(&logs);
            if last {
                tail.finish(&logs);
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Gives a release's tree to the app user (symlinks themselves, never their targets).
fn chown_tree(dir: &Path, user: AppUser) -> Result<(), DriverError> {
    let owner = (
        Some(rustix::fs::Uid::from_raw(user.uid)),
        Some(rustix::fs::Gid::from_raw(user.gid)),
    );
    rustix::fs::chownat(
        rustix::fs::CWD,
        dir,
        owner.0,
        owner.1,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| DriverError::io("give to the app user", dir, e.into()))?;
    for entry in std::fs::read_dir(dir).map_err(|e| DriverError::io("read", dir, e))? {
        let entry = entry.map_err(|e| DriverError::io("read", dir, e))?;
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            chown_tree(&path, user)?;
        } else {
            rustix::fs::chownat(
                rustix::fs::CWD,
                &path,
                owner.0,
                owner.1,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| DriverError::io("give to the app user", &path, e.into()))?;
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), DriverError> {
    std::fs::create_dir_all(to).map_err(|e| DriverError::io("create", to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| DriverError::io("read", from, e))? {
        let entry = entry.map_err(|e| DriverError::io("read", from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ft = entry
            .file_type()
            .map_err(|e| DriverError::io("stat", &src, e))?;
        if ft.is_symlink() {
            let target =
                std::fs::read_link(&src).map_err(|e| DriverError::io("read link", &src, e))?;
            std::os::unix::fs::symlink(target, &dst)
                .map_err(|e| DriverError::io("create link", &dst, e))?;
        } else if ft.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst).map_err(|e| DriverError::io("copy to", &dst, e))?;
        }
    }
    Ok(())
}

fn free_port() -> Result<u16, DriverError> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| DriverError::io("bind a free port for", Path::new("127.0.0.1"), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| DriverError::io("read the address of", Path::new("127.0.0.1"), e))
}

fn write_record(dir: &Path, rec: &Record) -> Result<(), DriverError> {
    let path = dir.join(RECORD);
    let bytes = serde_json::to_vec(rec)
        .map_err(|e| DriverError::io("encode", &path, std::io::Error::other(e)))?;
    crate::datadir::write_private(&path, &bytes)
        .map_err(|e| DriverError::io("write", &path, std::io::Error::other(e)))
}

/// What the supervisor needs to (re)start a replica.
struct Launch {
    start: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
    secrets: Vec<(String, Secret)>,
    port: u16,
    path: String,
    run_as: Option<AppUser>,
    keep: bool,
    grace: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    stable_after: Duration,
    /// The replica's directory in the agent's state: its record and output files.
    output: PathBuf,
}

impl Launch {
    fn output_file(&self, name: &str) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.output.join(name))
    }

    fn command(&self) -> std::io::Result<Command> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&self.start)
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", &self.path)
            .env("HOME", &self.dir);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in &self.secrets {
            cmd.env(k, OsStr::from_bytes(v.expose()));
        }
        // Output goes to files the agent opened (the app cannot reach their directory, only these
        // descriptors): a pipe would break, and kill the app with SIGPIPE, when the agent restarts.
        cmd.env("PORT", self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(self.output_file(STDOUT)?))
            .stderr(Stdio::from(self.output_file(STDERR)?))
            .process_group(0)
            .kill_on_drop(!self.keep);
        if let Some(u) = self.run_as {
            cmd.uid(u.uid).gid(u.gid);
        }
        Ok(cmd)
    }
}

/// A replica's process: a child this agent spawned, or one an earlier agent left (adopted).
enum Running {
    Child(tokio::process::Child),
    Adopted(ProcId),
}

impl Running {
    /// Waits for the process to end; its exit status when this agent is its parent.
    async fn wait(&mut self) -> Option<i64> {
        match self {
            Running::Child(c) => c.wait().await.ok().and_then(|s| s.code()).map(i64::from),
            Running::Adopted(p) => {
                while p.alive() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None
            }
        }
    }
}

/// What a supervisor keeps up to date for the driver's readers.
struct Watched {
    state: Arc<Mutex<ProcState>>,
    logs: Arc<LogRing>,
    output: Arc<Mutex<OutputTail>>,
}

async fn supervise(
    launch: Launch,
    watched: Watched,
    mut stop: watch::Receiver<bool>,
    mut adopted: Option<ProcId>,
    record: Arc<Mutex<Record>>,
) {
    let Watched {
        state,
        logs,
        output,
    } = watched;
    let mut backoff = launch.backoff_initial;
    let set = |f: &dyn Fn(&mut ProcState)| f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
    let remember = |process: Option<ProcId>| {
        let mut rec = record.lock().unwrap_or_else(|p| p.into_inner());
        rec.process = process;
        if let Err(e) = write_record(&launch.output, &rec) {
            tracing::warn!(error = %cairn_schema::error::chain(&e), "cannot record a replica's process");
        }
    };
    loop {
        if *stop.borrow() {
            break;
        }
        let began = Instant::now();
        let running = match adopted.take() {
            Some(p) => Ok(Running::Adopted(p)),
            None => launch
                .command()
                .and_then(|mut c| c.spawn())
                .map(Running::Child),
        };
        match running {
            Err(e) => {
                // Counts as a crash: the health wait sees a restarting replica and gives up early.
                set(&|s| s.started = true);
                logs.line(LogLine::new(LogStream::Agent, format!("cannot start: {e}")));
            }
            Ok(mut running) => {
                let pgid = match &running {
                    Running::Child(c) => c.id().and_then(|p| i32::try_from(p).ok()),
                    Running::Adopted(p) => Some(p.pid),
                };
                if let Running::Child(_) = running {
                    remember(pgid.and_then(ProcId::of));
                } else {
                    logs.line(LogLine::new(
                        LogStream::Agent,
                        "adopted after an agent restart",
                    ));
                }
                // Killed with the supervisor's future unless replicas outlive the agent.
                let group = GroupGuard(pgid.filter(|_| !launch.keep));
                set(&|s| {
                    s.pgid = pgid;
                    s.started = true;
                });
                tokio::select! {
                    code = running.wait() => {
                        // Stragglers of the group go with their leader.
                        signal_group(pgid, rustix::process::Signal::KILL);
                        group.disarm();
                        // Its last words are in the ring before anyone can see it exited.
                        lock_tail(&output).catch_up(&logs);
                        set(&|s| {
                            s.pgid = None;
                            s.last_exit = code;
                        });
                        remember(None);
                        logs.line(LogLine::new(LogStream::Agent, match code {
                            Some(c) => format!("exited with status {c}"),
                            None => "exited".to_owned(),
                        }));
                    }
                    _ = stop.changed() => {
                        signal_group(pgid, rustix::process::Signal::TERM);
                        if tokio::time::timeout(launch.grace, running.wait()).await.is_err() {
                            signal_group(pgid, rustix::process::Signal::KILL);
                            let _ = tokio::time::timeout(Duration::from_secs(5), running.wait()).await;
                        }
                        signal_group(pgid, rustix::process::Signal::KILL);
                        group.disarm();
                        set(&|s| s.pgid = None);
                        remember(None);
                        logs.line(LogLine::new(LogStream::Agent, "stopped"));
                        break;
                    }
                }
            }
        }
        if began.elapsed() >= launch.stable_after {
            backoff = launch.backoff_initial;
        }
        set(&|s| s.restarts += 1);
        logs.line(LogLine::new(
            LogStream::Agent,
            format!("restarting in {backoff:?}"),
        ));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => break,
        }
        backoff = (backoff * 2).min(launch.backoff_max);
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn installation(&self) -> &Name {
        &self.cfg.installation
    }

    async fn find_image(&self, spec: &ReplicaSpec) -> Result<Option<Found>, DriverError> {
        let dir = self.release_dir(spec);
        Ok(match std::fs::read_to_string(dir.join(MARKER)) {
            Ok(key) if key == spec.build_key() => {
                Some(Found::local(ImageId(dir.to_string_lossy().into_owned())))
            }
            _ => None,
        })
    }

    async fn build_image(
        &self,
        spec: &ReplicaSpec,
        context: &Path,
        log: &dyn LogSink,
    ) -> Result<ImageId, DriverError> {
        spec.check_for(&self.cfg.installation)?;
        if spec.build.dockerfile {
            return Err(DriverError::Unsupported {
                what: "process",
                needs: "a runtime with a start command (it cannot build a Dockerfile)".into(),
            });
        }
        if let Some(u) = self.cfg.run_as {
            self.check_reachable(u)?;
        }
        let dir = self.release_dir(spec);
        let lock = self
            .builds
            .lock()
            .await
            .entry(dir.clone())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        if let Some(found) = self.find_image(spec).await? {
            return Ok(found.id);
        }
        self.builds_run.fetch_add(1, Ordering::Relaxed);
        let parent = dir.parent().expect("release dirs have a parent");
        // Others may pass through (to their own release directory), never list or write.
        let through = if self.cfg.run_as.is_some() {
            0o711
        } else {
            0o700
        };
        for d in [
            self.cfg.root.as_path(),
            parent.parent().unwrap_or(parent),
            parent,
        ] {
            Self::make_dir(d, through)?;
        }
        let tmp = parent.join(format!(
            ".build-{}-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_dir_all(&dir);
        let built = match tokio::time::timeout(
            self.cfg.build_timeout,
            self.run_build(spec, context, &tmp, log),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(DriverError::BuildTimeout {
                app: spec.app.clone(),
                release: spec.release,
                after: self.cfg.build_timeout,
            }),
        };
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &dir).map_err(|e| DriverError::io("rename into", &dir, e))?;
        log.line(LogLine::new(
            LogStream::Agent,
            format!("built {}", dir.display()),
        ));
        Ok(ImageId(dir.to_string_lossy().into_owned()))
    }

    async fn start_replica(
        &self,
        spec: &ReplicaSpec,
        image: &ImageId,
        identity: &Identity,
    ) -> Result<Replica, DriverError> {
        spec.check_for(&self.cfg.installation)?;
        let release_dir = PathBuf::from(&image.0);
        if !release_dir.starts_with(&self.cfg.root) || !release_dir.join(MARKER).is_file() {
            return Err(DriverError::NotFound(ReplicaId(image.0.clone())));
        }
        let name = spec.replica_name();
        let replica = |addr| Replica {
            id: ReplicaId(name.clone()),
            name: name.clone(),
            app: spec.app.clone(),
            release: spec.release,
            slot: spec.slot,
            addr,
        };
        if let Some(sup) = self.get(&name) {
            let stopped = sup.state.lock().unwrap_or_else(|p| p.into_inner()).stopped;
            if !stopped && sup.image == *image {
                return Ok(replica(sup.addr));
            }
        }
        // Whatever ran under this name before (in memory or only on record) goes first.
        self.remove_replica(&ReplicaId(name.clone())).await?;

        let secrets = spec.open_secrets(identity)?;
        let port = free_port()?;
        let launch = self.launch(spec, &image.0, port, &secrets);
        drop(secrets);
        let launch = launch?;
        Self::make_dir(&self.cfg.state, 0o700)?;
        let dir = self.replica_dir(&name);
        Self::make_dir(&dir, 0o700)?;
        let rec = Record {
            spec: spec.clone(),
            image: image.0.clone(),
            port,
            stopped: false,
            process: None,
        };
        write_record(&dir, &rec)?;
        let sup = self.supervise_record(rec, Some(launch), None)?;
        Ok(replica(sup.addr))
    }

    async fn stop_replica(&self, id: &ReplicaId) -> Result<(), DriverError> {
        if let Some(sup) = self.get(&id.0) {
            self.stop_supervised(&sup).await;
        }
        if let Some(mut rec) = self.read_record(&id.0) {
            if let Some(p) = rec.process.take() {
                p.kill_group(rustix::process::Signal::KILL, Duration::from_secs(5))
                    .await;
            }
            rec.stopped = true;
            write_record(&self.replica_dir(&id.0), &rec)?;
        }
        Ok(())
    }

    async fn remove_replica(&self, id: &ReplicaId) -> Result<(), DriverError> {
        if let Some(sup) = self.get(&id.0) {
            self.stop_supervised(&sup).await;
            self.replicas
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id.0);
        }
        // Also what only the record knows (an earlier agent's replica this one never adopted).
        self.forget(&id.0).await
    }

    async fn list_replicas(&self) -> Result<Vec<ReplicaStatus>, DriverError> {
        let all: Vec<Arc<Supervised>> = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        Ok(all.iter().filter_map(|s| self.status_of(s)).collect())
    }

    async fn logs(&self, id: &ReplicaId, tail: usize) -> Result<Vec<LogLine>, DriverError> {
        self.get(&id.0)
            .map(|s| s.logs.tail(tail))
            .ok_or_else(|| DriverError::NotFound(id.clone()))
    }
}
