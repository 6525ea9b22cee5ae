//! An S3-compatible server for one test: `moto[server]` (from the Python package index, in a venv under
//! `target/pyenv/moto` made on first use) on a free port of 127.0.0.1, killed when dropped.
//!
//! ```no_run
//! # async fn example(dir: &std::path::Path) {
//! let Some(s3) = cairn_testkit::s3::Moto::start("my_test", dir).await else { return };
//! s3.create_bucket("backups").await;
//! // endpoint: s3.endpoint (http://127.0.0.1:PORT), any region, keys: Moto::ACCESS_KEY_ID / SECRET.
//! # }
//! ```
//!
//! moto accepts any credentials and keeps objects in memory: a stopped server loses them.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::skip::{missing, tail};

/// A running moto server.
#[derive(Debug)]
pub struct Moto {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub port: u16,
    /// Its output.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Moto {
    /// Credentials moto accepts (it accepts any); tests use these.
    pub const ACCESS_KEY_ID: &str = "AKIATESTTESTTESTTEST";
    pub const REGION: &str = "us-east-1";

    /// Starts moto, with its log in `dir`; `None` (after [`missing`]) when Python or moto cannot be had.
    pub async fn start(test: &str, dir: &Path) -> Option<Moto> {
        let py = crate::pyenv::venv(test, "moto", &["moto[server]"], "moto.server")?;
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let log = dir.join(format!("moto-{port}.log"));
        let out = std::fs::File::create(&log).expect("moto's log");
        let err = out.try_clone().expect("moto's log");
        let child = Command::new(&py)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                missing(test, "moto_server", e);
                return None;
            }
        };
        let mut moto = Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            let exited = moto
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "moto_server did not come up on port {port}:\n{}",
                    tail(&moto.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(moto)
    }

    /// Creates a bucket (moto needs no signature for it).
    pub async fn create_bucket(&self, name: &str) {
        let resp = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint))
            .send()
            .await
            .expect("moto answers");
        assert!(
            resp.status().is_success(),
            "creating bucket {name}: {}",
            resp.status()
        );
    }

    /// Kills the server (a target that stops answering).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
