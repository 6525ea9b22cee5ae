//! The process driver, for hosts without Docker: a release is a directory, a replica is a supervised child
//! process.
//!
//! - Build: the source tree is copied into a per-release directory
//!   (`<root>/<installation>/<app>/r<release>-<recipe>/app`) and the runtime's build commands run there in
//!   order, their output streamed to a [`LogSink`]. The directory is renamed into place only when every
//!   command passed, so a half-built release is never mistaken for a built one.
//! - Run: the start command runs through `/bin/sh -c` in the release directory, in its own process group,
//!   with a clean environment (`PATH`, `HOME`, the spec's env, the decrypted secrets, and `PORT`, a free
//!   port on 127.0.0.1 chosen here). A supervisor restarts it with exponential backoff when it exits, keeps
//!   its stdout and stderr in a bounded ring, and on stop sends SIGTERM to the whole group, then SIGKILL
//!   after the grace period.
//!
//! What it must not do: pass the agent's own environment to an app or a build (it holds the agent's
//! credentials), run a build with the secrets, signal a process group it did not create, or leave a child
//! running when the driver is dropped.
//!
//! Limits (memory, CPU) are not applied by this driver yet: that needs cgroup delegation from the host.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cairn_schema::{Identity, Name, Secret};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{
    Driver, DriverError, DriverKind, ImageId, Replica, ReplicaId, ReplicaState, ReplicaStatus,
    replica_labels,
};
use crate::logs::{LineSplitter, LogLine, LogRing, LogSink, LogStream};
use crate::spec::{ReplicaSpec, SpecError};

/// How the process driver behaves on this node.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub installation: Name,
    pub node: Name,
    /// Where release directories live.
    pub root: PathBuf,
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
    /// `PATH` for builds and replicas.
    pub path: String,
}

impl ProcessConfig {
    pub fn new(installation: Name, node: Name, root: impl Into<PathBuf>) -> Self {
        ProcessConfig {
            installation,
            node,
            root: root.into(),
            build_timeout: Duration::from_secs(20 * 60),
            stop_grace: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(10),
            log_lines: 2000,
            path: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        }
    }
}

const MARKER: &str = ".cairn-built";

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
        let sup = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id.0)
            .cloned()?;
        sup.state.lock().unwrap_or_else(|p| p.into_inner()).pgid
    }

    /// Follows a replica's output from now on.
    pub fn follow(&self, id: &ReplicaId) -> Option<tokio::sync::broadcast::Receiver<LogLine>> {
        let sup = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id.0)
            .cloned()?;
        Some(sup.logs.subscribe())
    }

    fn release_dir(&self, spec: &ReplicaSpec) -> PathBuf {
        self.cfg
            .root
            .join(spec.installation.as_str())
            .join(spec.app.as_str())
            .join(format!("r{}-{}", spec.release, spec.recipe()))
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
        cmd
    }

    async fn run_build(
        &self,
        spec: &ReplicaSpec,
        context: &Path,
        tmp: &Path,
        log: &dyn LogSink,
    ) -> Result<(), DriverError> {
        let app = tmp.join("app");
        let (from, to) = (context.to_owned(), app.clone());
        tokio::task::spawn_blocking(move || copy_tree(&from, &to))
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
        std::fs::write(&marker, spec.recipe()).map_err(|e| DriverError::io("write", &marker, e))
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
        let mut st = sup.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pgid) = st.pgid.take() {
            GroupGuard(Some(pgid)).kill(rustix::process::Signal::KILL);
        }
        st.stopped = true;
    }
}

impl Drop for ProcessDriver {
    fn drop(&mut self) {
        let replicas = self.replicas.get_mut().unwrap_or_else(|p| p.into_inner());
        for sup in replicas.values() {
            let _ = sup.stop.send(true);
            if let Some(task) = sup.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
                task.abort();
            }
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

/// What the supervisor needs to (re)start a replica.
struct Launch {
    start: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
    secrets: Vec<(String, Secret)>,
    port: u16,
    path: String,
    grace: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    stable_after: Duration,
}

impl Launch {
    fn command(&self) -> Command {
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
        cmd.env("PORT", self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }
}

async fn supervise(
    launch: Launch,
    state: Arc<Mutex<ProcState>>,
    logs: Arc<LogRing>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = launch.backoff_initial;
    let set = |f: &dyn Fn(&mut ProcState)| f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
    loop {
        if *stop.borrow() {
            break;
        }
        let began = Instant::now();
        match launch.command().spawn() {
            Err(e) => {
                // Counts as a crash: the health wait sees a restarting replica and gives up early.
                set(&|s| s.started = true);
                logs.line(LogLine::new(LogStream::Agent, format!("cannot start: {e}")));
            }
            Ok(mut child) => {
                let pgid = child.id().and_then(|p| i32::try_from(p).ok());
                let group = GroupGuard(pgid);
                set(&|s| {
                    s.pgid = pgid;
                    s.started = true;
                });
                let out = tokio::spawn({
                    let (r, l) = (child.stdout.take(), logs.clone());
                    async move { pump(r, LogStream::Stdout, &*l).await }
                });
                let err = tokio::spawn({
                    let (r, l) = (child.stderr.take(), logs.clone());
                    async move { pump(r, LogStream::Stderr, &*l).await }
                });
                tokio::select! {
                    status = child.wait() => {
                        // Stragglers of the group go with their leader.
                        group.kill(rustix::process::Signal::KILL);
                        let code = status.ok().and_then(|s| s.code()).map(i64::from);
                        set(&|s| {
                            s.pgid = None;
                            s.last_exit = code;
                        });
                        let _ = tokio::join!(out, err);
                        logs.line(LogLine::new(LogStream::Agent, match code {
                            Some(c) => format!("exited with status {c}"),
                            None => "killed by a signal".to_owned(),
                        }));
                    }
                    _ = stop.changed() => {
                        signal_group(pgid, rustix::process::Signal::TERM);
                        if tokio::time::timeout(launch.grace, child.wait()).await.is_err() {
                            signal_group(pgid, rustix::process::Signal::KILL);
                            let _ = child.wait().await;
                        }
                        group.kill(rustix::process::Signal::KILL);
                        set(&|s| s.pgid = None);
                        let _ = tokio::join!(out, err);
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

    async fn find_image(&self, spec: &ReplicaSpec) -> Result<Option<ImageId>, DriverError> {
        let dir = self.release_dir(spec);
        Ok(match std::fs::read_to_string(dir.join(MARKER)) {
            Ok(recipe) if recipe == spec.recipe() => {
                Some(ImageId(dir.to_string_lossy().into_owned()))
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
            return Ok(found);
        }
        self.builds_run.fetch_add(1, Ordering::Relaxed);
        let parent = dir.parent().expect("release dirs have a parent");
        std::fs::create_dir_all(parent).map_err(|e| DriverError::io("create", parent, e))?;
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
        let start = spec
            .build
            .start
            .clone()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| DriverError::Unsupported {
                what: "process",
                needs: "a start command".into(),
            })?;
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
        let existing = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .cloned();
        if let Some(sup) = existing {
            let stopped = sup.state.lock().unwrap_or_else(|p| p.into_inner()).stopped;
            if !stopped && sup.image == *image {
                return Ok(replica(sup.addr));
            }
            self.remove_replica(&ReplicaId(name.clone())).await?;
        }

        let secrets = spec.open_secrets(identity)?;
        let port = free_port()?;
        let launch = Launch {
            start,
            dir: release_dir.join("app"),
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
            grace: self.cfg.stop_grace,
            backoff_initial: self.cfg.backoff_initial,
            backoff_max: self.cfg.backoff_max,
            stable_after: self.cfg.stable_after,
        };
        drop(secrets);
        if launch.env.iter().any(|(_, v)| v.contains('\0')) {
            return Err(SpecError::Invalid {
                field: "env",
                why: "a value holds a NUL byte".into(),
            }
            .into());
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let (stop_tx, stop_rx) = watch::channel(false);
        let state = Arc::new(Mutex::new(ProcState::default()));
        let logs = Arc::new(LogRing::new(self.cfg.log_lines));
        let task = tokio::spawn(supervise(launch, state.clone(), logs.clone(), stop_rx));
        let sup = Arc::new(Supervised {
            name: name.clone(),
            image: image.clone(),
            labels: replica_labels(spec, &self.cfg.node),
            addr,
            logs,
            state,
            stop: stop_tx,
            task: Mutex::new(Some(task)),
        });
        let out = replica(addr);
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, sup);
        Ok(out)
    }

    async fn stop_replica(&self, id: &ReplicaId) -> Result<(), DriverError> {
        let sup = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id.0)
            .cloned();
        if let Some(sup) = sup {
            self.stop_supervised(&sup).await;
        }
        Ok(())
    }

    async fn remove_replica(&self, id: &ReplicaId) -> Result<(), DriverError> {
        let sup = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id.0)
            .cloned();
        if let Some(sup) = sup {
            self.stop_supervised(&sup).await;
            self.replicas
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id.0);
        }
        Ok(())
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
        let sup = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id.0)
            .cloned();
        sup.map(|s| s.logs.tail(tail))
            .ok_or_else(|| DriverError::NotFound(id.clone()))
    }
}
