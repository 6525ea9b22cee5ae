//! A local image registry for one test: Debian's `docker-registry` (the distribution registry, API v2)
//! on a free `127.0.0.1` port, storing under the test's directory, killed when dropped.
//!
//! ```no_run
//! # async fn example(dir: &std::path::Path) {
//! let Some(reg) = cairn_testkit::registry::registry("my_test", dir).await else { return };
//! let repo = format!("{}/cairn-test-{}/app", reg.addr, "t1234abcd"); // push/pull as `repo:tag` or `repo@sha256:...`
//! # }
//! ```
//!
//! Docker engines push to and pull from it over plain HTTP without configuration: `127.0.0.0/8` is an
//! insecure registry by default. Nothing authenticates; it listens on loopback only.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::skip::{missing, tail};

/// Where the registry binary is looked for: Debian's package, then the upstream image's path.
pub const BINARIES: [&str; 2] = ["/usr/bin/docker-registry", "/usr/local/bin/registry"];

/// A registry listening on `addr`; dropping it kills it.
#[derive(Debug)]
pub struct Registry {
    /// `127.0.0.1:PORT`, the registry part of image references.
    pub addr: String,
    /// Its configuration and storage (`<dir>/registry-<port>/`).
    pub root: PathBuf,
    /// Its log (`<dir>/registry-<port>.log`).
    pub log: PathBuf,
    child: Child,
}

impl Registry {
    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a registry with its configuration, storage and log under `dir` (the test's scratch directory),
/// and waits until it accepts connections.
///
/// `None` (after a `SKIPPED` message) when the binary is not installed (Debian package
/// `docker-registry`); under CI or `CAIRN_TEST_REQUIRE_ALL` that panics instead. A registry that is
/// installed but does not come up panics with the tail of its log.
pub async fn registry(test: &str, dir: &Path) -> Option<Registry> {
    let Some(bin) = BINARIES.into_iter().find(|p| Path::new(p).is_file()) else {
        missing(
            test,
            "docker-registry",
            "not installed (Debian package docker-registry)",
        );
        return None;
    };
    // The port is found free and released before the registry binds it; another process may take it in
    // between, so a registry that exits at once is retried on another port.
    let mut last = String::new();
    for _ in 0..3 {
        match start(bin, dir).await {
            Ok(r) => return Some(r),
            Err(e) => last = e,
        }
    }
    panic!("{test}: the registry ({bin}) did not start: {last}");
}

async fn start(bin: &str, dir: &Path) -> Result<Registry, String> {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let root = dir.join(format!("registry-{port}"));
    let log = dir.join(format!("registry-{port}.log"));
    std::fs::create_dir_all(root.join("data")).map_err(|e| format!("{}: {e}", root.display()))?;
    let config = root.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            root.join("data").display()
        ),
    )
    .map_err(|e| format!("{}: {e}", config.display()))?;
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("spawning {bin}: {e}"))?;
    let mut reg = Registry {
        addr,
        root,
        log,
        child,
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if tokio::net::TcpStream::connect(&reg.addr).await.is_ok() {
            return Ok(reg);
        }
        if let Ok(Some(status)) = reg.child.try_wait() {
            return Err(format!(
                "it exited ({status}); last lines of {}:\n{}",
                reg.log.display(),
                tail(&reg.log, 30)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "it did not listen on {} within 15 s; last lines of {}:\n{}",
        reg.addr,
        reg.log.display(),
        tail(&reg.log, 30)
    ))
}
