//! A second Docker engine for one test: a private `dockerd` with its own data, exec root, socket, bridge
//! and subnet, so a test can run a second node whose images and containers are truly its own (an image
//! built on the main engine is not there until that node pulls it).
//!
//! ```no_run
//! # async fn example(scratch: &std::path::Path) {
//! let Some(b) = cairn_testkit::engine::SecondEngine::start("my_test", scratch).await else { return };
//! b.docker(&["pull", "127.0.0.1:5000/app@sha256:..."]);   // the docker CLI against it
//! // an agent on it: `DOCKER_HOST=<b.host()>` in the agent's environment
//! # }
//! ```
//!
//! What it starts: `dockerd` with `--data-root`, `--exec-root`, `--pidfile` and its unix socket in a
//! fresh `/tmp/cairn-de-XXXXXX` directory (short: a unix socket path is limited to 108 bytes, and
//! containerd's socket lives under the exec root), the main engine's storage driver (so it works wherever
//! the main engine does, e.g. `fuse-overlayfs` in a container), a bridge `cairn<8 hex>` made with `ip`
//! on a random `10.x.y.0/24` that no interface or route of this machine overlaps, `--iptables=false
//! --ip6tables=false` (the host's firewall is not touched; published ports still work on loopback
//! through `docker-proxy`), and an empty config file (the machine's `/etc/docker/daemon.json` does not
//! apply). Its stdout and stderr go to `dockerd-<bridge>.log` in the directory the test gives.
//!
//! Dropping it removes every container on it, stops `dockerd` (SIGTERM, then SIGKILL after 20 s), kills
//! whatever is left that runs from its directories (its containerd, shims, container processes,
//! `fuse-overlayfs`), unmounts what is still mounted under them, deletes the bridge and the directories.
//!
//! It needs root (for `dockerd` and `ip link add`), `dockerd`, `ip`, and the main engine answering (for
//! its storage driver); when one is missing or the engine does not come up, the test is skipped with a
//! message, or fails under CI / `CAIRN_TEST_REQUIRE_ALL` (see [`crate::skip`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::skip::{missing, tail};

/// How long `dockerd` gets to answer `docker version`.
pub const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a stopping `dockerd` gets after SIGTERM before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// Bound of one docker CLI call made by [`SecondEngine::docker`] (a pull of a test image takes seconds).
pub const CLI_LIMIT: Duration = Duration::from_secs(120);

/// A private `dockerd` for one test; dropping it tears everything down.
#[derive(Debug)]
pub struct SecondEngine {
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    host: String,
    bridge: String,
    subnet: Ipv4Addr,
    driver: String,
    log: PathBuf,
    ip: PathBuf,
    bridge_made: bool,
    child: Option<Child>,
}

impl SecondEngine {
    /// Starts the engine (on a blocking thread) and waits until it answers, at most [`START_LIMIT`];
    /// `dockerd`'s log goes to `log_dir` (the test's scratch directory). `None` after a `SKIPPED` message
    /// when it cannot run here; a panic instead under CI / `CAIRN_TEST_REQUIRE_ALL`.
    pub async fn start(test: &str, log_dir: &Path) -> Option<SecondEngine> {
        let (test, log_dir) = (test.to_owned(), log_dir.to_owned());
        match tokio::task::spawn_blocking(move || SecondEngine::start_blocking(&test, &log_dir))
            .await
        {
            Ok(e) => e,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// [`SecondEngine::start`] on the calling thread (it sleeps while `dockerd` starts, ~2 s).
    pub fn start_blocking(test: &str, log_dir: &Path) -> Option<SecondEngine> {
        if !rustix::process::geteuid().is_root() {
            missing(
                test,
                "a second Docker engine",
                "dockerd and `ip link add` need root",
            );
            return None;
        }
        let Some(dockerd) = find_bin("dockerd") else {
            missing(
                test,
                "dockerd",
                "not found on PATH or in /usr/sbin, /usr/bin (Debian package docker.io)",
            );
            return None;
        };
        let Some(ip) = find_bin("ip") else {
            missing(
                test,
                "the ip command",
                "not found (Debian package iproute2)",
            );
            return None;
        };
        let driver = match output_within(
            docker_cmd(None, &["info", "--format", "{{.Driver}}"]),
            Duration::from_secs(20),
        ) {
            Some(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            Some(o) => {
                missing(
                    test,
                    "the main Docker engine (for its storage driver)",
                    String::from_utf8_lossy(&o.stderr).trim(),
                );
                return None;
            }
            None => {
                missing(
                    test,
                    "the main Docker engine (for its storage driver)",
                    "`docker info` did not run or answer within 20 s",
                );
                return None;
            }
        };
        if driver.is_empty() {
            missing(
                test,
                "the main Docker engine",
                "`docker info` named no storage driver",
            );
            return None;
        }
        let root = tempfile::Builder::new()
            .prefix("cairn-de-")
            .tempdir_in("/tmp")
            .expect("a directory under /tmp");
        let root_path = root.path().to_owned();
        let host = format!("unix://{}/docker.sock", root_path.display());
        // From here on, dropping `engine` undoes whatever was done, also on a panic.
        let mut engine = SecondEngine {
            root: Some(root),
            root_path,
            host,
            bridge: String::new(),
            subnet: Ipv4Addr::UNSPECIFIED,
            driver,
            log: PathBuf::new(),
            ip,
            bridge_made: false,
            child: None,
        };
        if let Err(e) = engine.make_bridge() {
            missing(test, "a bridge for a second Docker engine", e);
            return None;
        }
        engine.log = log_dir.join(format!("dockerd-{}.log", engine.bridge));
        let config = engine.root_path.join("daemon.json");
        std::fs::write(&config, "{}\n").unwrap();
        let log = std::fs::File::create(&engine.log)
            .unwrap_or_else(|e| panic!("{}: {e}", engine.log.display()));
        let r = &engine.root_path;
        let spawned = Command::new(&dockerd)
            .arg("--data-root")
            .arg(r.join("data"))
            .arg("--exec-root")
            .arg(r.join("exec"))
            .args(["-H", &engine.host])
            .arg("--pidfile")
            .arg(r.join("docker.pid"))
            .args(["--storage-driver", &engine.driver])
            .args(["--bridge", &engine.bridge])
            .args(["--iptables=false", "--ip6tables=false"])
            .arg("--config-file")
            .arg(&config)
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn();
        match spawned {
            Ok(c) => engine.child = Some(c),
            Err(e) => {
                missing(
                    test,
                    "a second Docker engine",
                    format!("{}: {e}", dockerd.display()),
                );
                return None;
            }
        }
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = engine.child.as_mut().map(Child::try_wait) {
                missing(
                    test,
                    "a second Docker engine",
                    format!(
                        "dockerd exited ({status}); last lines of {}:\n{}",
                        engine.log.display(),
                        tail(&engine.log, 40)
                    ),
                );
                return None;
            }
            if output_within(
                engine.command(&["version", "--format", "{{.Server.Version}}"]),
                Duration::from_secs(5),
            )
            .is_some_and(|o| o.status.success())
            {
                return Some(engine);
            }
            if start.elapsed() > START_LIMIT {
                missing(
                    test,
                    "a second Docker engine",
                    format!(
                        "dockerd did not answer on {} within {START_LIMIT:?}; last lines of {}:\n{}",
                        engine.host,
                        engine.log.display(),
                        tail(&engine.log, 40)
                    ),
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `unix:///tmp/cairn-de-XXXXXX/docker.sock`: the value of `DOCKER_HOST` for a process (an agent)
    /// that should use this engine, or of the docker CLI's `-H`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The bridge its containers attach to (`cairn<8 hex>`).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Its containers' subnet, `10.x.y.0/24` (the bridge is `10.x.y.1`).
    pub fn subnet(&self) -> String {
        format!("{}/24", self.subnet)
    }

    /// The storage driver (the main engine's).
    pub fn storage_driver(&self) -> &str {
        &self.driver
    }

    /// `dockerd`'s log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its directory (`/tmp/cairn-de-XXXXXX`: `data/`, `exec/`, `docker.sock`, `daemon.json`).
    pub fn dir(&self) -> &Path {
        &self.root_path
    }

    /// `dockerd`'s process id (to kill it in a test of a crashed engine; dropping still cleans up).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A `docker -H <host> args...` command (classic builder: `DOCKER_BUILDKIT=0`; stdin closed), to run
    /// as the caller likes.
    pub fn command(&self, args: &[&str]) -> Command {
        docker_cmd(Some(&self.host), args)
    }

    /// Runs the docker CLI against this engine (bounded by [`CLI_LIMIT`]); its stdout, trimmed, or `Err`
    /// with its stderr.
    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        let Some(out) = output_within(self.command(args), CLI_LIMIT) else {
            return Err(format!("did not finish within {CLI_LIMIT:?}"));
        };
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// [`SecondEngine::try_docker`], panicking (with the tail of `dockerd`'s log) when it fails.
    pub fn docker(&self, args: &[&str]) -> String {
        self.try_docker(args).unwrap_or_else(|e| {
            panic!(
                "docker -H {} {args:?}: {e}\nlast lines of {}:\n{}",
                self.host,
                self.log.display(),
                tail(&self.log, 20)
            )
        })
    }

    /// Creates the bridge on a free random subnet: a few tries, in case another test took the name.
    fn make_bridge(&mut self) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..20 {
            let name = format!("cairn{:08x}", rand::random::<u32>());
            let subnet = free_subnet(&self.ip)?;
            let gateway = Ipv4Addr::from(u32::from(subnet) | 1);
            match run_ip(&self.ip, &["link", "add", &name, "type", "bridge"]) {
                Ok(()) => {}
                Err(e) if e.contains("File exists") => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e),
            }
            self.bridge = name;
            self.bridge_made = true;
            self.subnet = subnet;
            run_ip(
                &self.ip,
                &["addr", "add", &format!("{gateway}/24"), "dev", &self.bridge],
            )?;
            run_ip(&self.ip, &["link", "set", &self.bridge, "up"])?;
            return Ok(());
        }
        Err(format!("no free bridge name after 20 tries: {last}"))
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                if let Some(o) =
                    output_within(self.command(&["ps", "-aq"]), Duration::from_secs(20))
                {
                    let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect();
                    if !ids.is_empty() {
                        let mut args = vec!["rm", "-f"];
                        args.extend(ids.iter().map(String::as_str));
                        let _ = output_within(self.command(&args), Duration::from_secs(60));
                    }
                }
                signal(child.id() as i32, rustix::process::Signal::TERM);
                let start = Instant::now();
                while start.elapsed() < STOP_LIMIT {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A dockerd that was killed leaves its containerd, the shims and the containers running, and
        // fuse-overlayfs serving its mounts: everything whose command line or root is under our directory.
        for pass in 0..2 {
            let pids = processes_using(&self.root_path);
            for &pid in &pids {
                signal(pid, rustix::process::Signal::KILL);
            }
            let start = Instant::now();
            while !pids.is_empty()
                && start.elapsed() < Duration::from_secs(5)
                && pids
                    .iter()
                    .any(|p| Path::new(&format!("/proc/{p}")).exists())
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            unmount_under(&self.root_path);
            if pass == 0 && mounts_under(&self.root_path).is_empty() && pids.is_empty() {
                break;
            }
        }
        if self.bridge_made {
            let _ = run_ip(&self.ip, &["link", "del", &self.bridge]);
            self.bridge_made = false;
        }
        if let Some(root) = self.root.take() {
            let left = mounts_under(&self.root_path);
            if left.is_empty() {
                drop(root);
            } else {
                let kept = root.keep();
                eprintln!(
                    "cairn-testkit: keeping {} of a second Docker engine: still mounted: {left:?}",
                    kept.display()
                );
            }
        }
    }
}

impl Drop for SecondEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `docker [-H host] args...` with the classic builder and stdin closed.
fn docker_cmd(host: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new("docker");
    if let Some(h) = host {
        cmd.args(["-H", h]);
    }
    cmd.args(args)
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion, capturing its output; `None` when it cannot start or takes longer than
/// `limit` (it is then killed).
fn output_within(mut cmd: Command, limit: Duration) -> Option<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r.ok(),
        Err(_) => {
            signal(pid, rustix::process::Signal::KILL);
            None
        }
    }
}

fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run_ip(ip: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", ip.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The IPv4 networks this machine has addresses or routes in, as (network, prefix length).
fn used_networks(ip: &Path) -> Result<Vec<(u32, u32)>, String> {
    let mut out = Vec::new();
    for args in [
        &["-4", "-o", "addr", "show"][..],
        &["-4", "route", "show", "table", "all"][..],
    ] {
        let o = Command::new(ip)
            .args(args)
            .output()
            .map_err(|e| format!("{}: {e}", ip.display()))?;
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            // `ip -o addr`: `4: docker0 inet 172.17.0.1/16 ...`; `ip route`: `[type] 10.1.0.0/16 dev ...`.
            let candidates = match words.iter().position(|w| *w == "inet") {
                Some(i) => words.get(i + 1).into_iter().collect::<Vec<_>>(),
                None => words.iter().take(2).collect(),
            };
            out.extend(candidates.into_iter().filter_map(|w| parse_net(w)));
        }
    }
    // The main engine's default bridge, even when it is down and has no route.
    out.push((u32::from(Ipv4Addr::new(172, 17, 0, 0)), 16));
    Ok(out)
}

fn parse_net(s: &str) -> Option<(u32, u32)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, l.parse().ok()?),
        None => (s, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    (len <= 32).then_some((u32::from(addr), len))
}

fn overlaps((a, alen): (u32, u32), (b, blen): (u32, u32)) -> bool {
    let len = alen.min(blen);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a & mask == b & mask
}

/// A random `10.x.y.0/24` that no address or route of this machine overlaps.
fn free_subnet(ip: &Path) -> Result<Ipv4Addr, String> {
    let used = used_networks(ip)?;
    for _ in 0..100 {
        let [x, y] = rand::random::<[u8; 2]>();
        if x == 0 || x == 255 {
            continue;
        }
        let net = Ipv4Addr::new(10, x, y, 0);
        if !used.iter().any(|&u| overlaps(u, (u32::from(net), 24))) {
            return Ok(net);
        }
    }
    Err("no free 10.x.y.0/24 in 100 random tries".into())
}

/// Mount points under `root` (itself included), innermost last, as `/proc/self/mountinfo` lists them.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(root))
        .collect()
}

/// `/proc/self/mountinfo` writes space, tab, newline and backslash as `\040`-style octal escapes.
fn unescape_mount_path(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything mounted under `root`, innermost first (`umount -l`; `fusermount -uz` for a
/// FUSE mount the kernel refuses).
fn unmount_under(root: &Path) {
    for _ in 0..3 {
        let mounts = mounts_under(root);
        if mounts.is_empty() {
            return;
        }
        for m in mounts.iter().rev() {
            if rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH).is_err() {
                let _ = Command::new("fusermount")
                    .arg("-uz")
                    .arg(m)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Processes (other than this one) whose command line names `root` or whose root directory is under it
/// (containers).
fn processes_using(root: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    // With the slash: every reference to our directory is to something inside it.
    let needle = format!("{}/", root.display());
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let in_root =
                std::fs::read_link(e.path().join("root")).is_ok_and(|r| r.starts_with(root));
            (cmdline.contains(&needle) || in_root).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Even when its dockerd is killed with a container running (its containerd, shim, container and
    /// mounts left behind), dropping the engine leaves no process, mount, bridge or directory.
    #[test]
    fn a_killed_engine_with_a_running_container_leaves_nothing_behind() {
        const TEST: &str = "a_killed_engine_with_a_running_container_leaves_nothing_behind";
        const BUSYBOX: &str = "/bin/busybox";
        if !Path::new(BUSYBOX).is_file() {
            missing(
                TEST,
                BUSYBOX,
                "not installed (Debian package busybox-static)",
            );
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let Some(engine) = SecondEngine::start_blocking(TEST, scratch.path()) else {
            return;
        };
        let (dir, bridge) = (engine.dir().to_owned(), engine.bridge().to_owned());
        assert!(dir.as_os_str().len() < 40, "{}", dir.display());
        assert_eq!(
            engine.host(),
            format!("unix://{}/docker.sock", dir.display())
        );
        let ctx = scratch.path().join("image");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::copy(BUSYBOX, ctx.join("busybox")).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nCMD [\"/bin/busybox\", \"sleep\", \"600\"]\n",
        )
        .unwrap();
        engine.docker(&["build", "-q", "-t", "bb", ctx.to_str().unwrap()]);
        let cid = engine.docker(&["run", "-d", "-p", "127.0.0.1::8080", "bb"]);
        assert!(engine.docker(&["port", &cid]).contains("127.0.0.1:"));
        assert!(!mounts_under(&dir).is_empty());
        let pid = engine.pid().unwrap() as i32;
        signal(pid, rustix::process::Signal::KILL);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            processes_using(&dir).len() >= 2,
            "containerd and the container outlive a killed dockerd"
        );

        drop(engine);
        assert_eq!(processes_using(&dir), Vec::<i32>::new());
        assert_eq!(mounts_under(&dir), Vec::<PathBuf>::new());
        assert!(!dir.exists(), "{} is removed", dir.display());
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&links.stdout).contains(&bridge));
    }

    #[test]
    fn subnets_overlap_when_they_share_the_shorter_prefix() {
        let n = |s| parse_net(s).unwrap();
        assert!(overlaps(n("10.1.2.0/24"), n("10.0.0.0/8")));
        assert!(overlaps(n("10.1.2.0/24"), n("10.1.2.7")));
        assert!(!overlaps(n("10.1.2.0/24"), n("10.1.3.0/24")));
        assert!(!overlaps(n("10.1.2.0/24"), n("172.17.0.0/16")));
        assert!(overlaps(n("10.1.2.0/24"), n("0.0.0.0/0")));
        assert_eq!(parse_net("default"), None);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/tmp/plain"), "/tmp/plain");
    }
}
