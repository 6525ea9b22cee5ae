//! The recording runner: FOR TESTS ONLY. It runs nothing; it writes what it was asked to do, one JSON
//! object per line, to `recording.jsonl` in the data directory, and keeps "what runs" in the agent's book.
//! The binary refuses it unless `CAIRN_AGENT_TEST_DRIVER=1` is set.
//!
//! A deploy's record holds the replica's whole environment, secrets decrypted with the node's identity:
//! this is the stand-in for the driver that would give them to the app, and the only place a test can
//! check that a secret reached its node in plaintext. `CAIRN_AGENT_TEST_DELAY_MS` makes every task take
//! that long (to catch an agent in the middle of one). A release whose env sets `RECORDING_UNHEALTHY`
//! fails as a replica failing its health check does, with that value in the reason.
//!
//! What it must not do: run in production, or put a secret anywhere but its own record file.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cairn_proto::{ActualReplica, RunState, TaskKind};
use cairn_schema::{Driver as DriverName, Identity, Name};
use serde_json::json;

use crate::datadir::{Book, SlotState};
use crate::logs::{LogLine, LogSink, LogStream};
use crate::runner::{Ran, RunError, Runner, Work};

/// The environment variable that must be `1` for the binary to accept the recording driver.
pub const ENABLE_ENV: &str = "CAIRN_AGENT_TEST_DRIVER";
/// Milliseconds every task takes.
pub const DELAY_ENV: &str = "CAIRN_AGENT_TEST_DELAY_MS";
/// An env var that makes a deploy, start or restart of the release fail its "health check" with the
/// var's value as the reason (a test of what follows a broken release).
pub const UNHEALTHY_ENV: &str = "RECORDING_UNHEALTHY";
/// The record file in the data directory.
pub const RECORD_FILE: &str = "recording.jsonl";

/// Records tasks instead of running them.
#[derive(Debug)]
pub struct RecordingRunner {
    path: PathBuf,
    file: Mutex<File>,
    identity: Arc<Identity>,
    book: Arc<Book>,
    delay: Duration,
    /// What the replicas "print": a line per deploy, start or restart (the last 1,000), which the agent
    /// ships like a real replica's output.
    output: Mutex<std::collections::VecDeque<(Name, u32, u64, LogLine)>>,
}

impl RecordingRunner {
    pub fn open(
        data_dir: &Path,
        identity: Arc<Identity>,
        book: Arc<Book>,
        delay: Duration,
    ) -> std::io::Result<Self> {
        let path = data_dir.join(RECORD_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        Ok(RecordingRunner {
            path,
            file: Mutex::new(file),
            identity,
            book,
            delay,
            output: Mutex::default(),
        })
    }

    fn record(&self, value: serde_json::Value) -> Result<(), RunError> {
        let mut line = serde_json::to_vec(&value).expect("a record serializes");
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(&line)
            .and_then(|_| f.flush())
            .map_err(|e| RunError::Failed(format!("cannot record to {}: {e}", self.path.display())))
    }
}

#[async_trait]
impl Runner for RecordingRunner {
    fn drivers(&self) -> Vec<DriverName> {
        vec![DriverName::Docker, DriverName::Process]
    }

    async fn run(&self, work: &Work, log: &dyn LogSink) -> Result<Ran, RunError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut rec = json!({
            "at": chrono::Utc::now(),
            "via": "task",
            "task": work.task,
            "kind": work.kind.as_str(),
            "app": work.app,
            "slot": work.slot,
            "release": work.release,
            "generation": work.generation,
        });
        if matches!(
            work.kind,
            TaskKind::Deploy | TaskKind::Start | TaskKind::Restart
        ) {
            let spec = work
                .spec
                .as_ref()
                .ok_or(RunError::NoRelease(work.kind.as_str()))?;
            spec.check().map_err(RunError::Refused)?;
            let secrets = spec
                .open_secrets(&self.identity)
                .map_err(RunError::Refused)?;
            let mut env = serde_json::Map::new();
            for (k, v) in &spec.env {
                env.insert(k.to_string(), json!(v));
            }
            for (k, v) in secrets.iter() {
                let s = v
                    .expose_str()
                    .map_err(|_| RunError::Failed(format!("secret `{k}` is not UTF-8")))?;
                env.insert(k.to_owned(), json!(s));
            }
            let unhealthy = env
                .get(UNHEALTHY_ENV)
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            rec["env"] = serde_json::Value::Object(env);
            if let Some(why) = unhealthy {
                rec["unhealthy"] = json!(why);
                self.record(rec)?;
                // What the deploy says of a replica failing its health check: the release is broken.
                return Err(RunError::Broken(format!(
                    "release {} of {} failed its health check: {why}",
                    work.release, work.app
                )));
            }
            rec["hostnames"] = json!(spec.hostnames);
            rec["source_commit"] = json!(spec.source.commit);
            rec["replica"] = json!(spec.replica_name());
        }
        self.record(rec)?;
        if matches!(
            work.kind,
            TaskKind::Deploy | TaskKind::Start | TaskKind::Restart
        ) {
            let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
            if out.len() == 1000 {
                out.pop_front();
            }
            out.push_back((
                work.app.clone(),
                work.slot,
                work.release,
                LogLine::new(
                    LogStream::Stdout,
                    format!(
                        "{} of {} slot {} release {} (recorded)",
                        work.kind.as_str(),
                        work.app,
                        work.slot,
                        work.release
                    ),
                ),
            ));
        }
        log.line(LogLine::new(
            LogStream::Agent,
            format!(
                "recorded {} of {} slot {} release {}",
                work.kind.as_str(),
                work.app,
                work.slot,
                work.release
            ),
        ));
        let mut ran: crate::runner::Ran = format!("recorded {}", work.kind.as_str()).into();
        if work.kind == TaskKind::Deploy {
            // A stand-in image id per release, so a release's recorded image can be checked.
            ran.image = Some(cairn_proto::DeployedImage {
                id: format!("sha256:{:064x}", work.release),
                registry: None,
            });
        }
        Ok(ran)
    }

    async fn stop_now(&self, app: &Name, slot: u32) -> Result<(), RunError> {
        self.record(json!({
            "at": chrono::Utc::now(),
            "via": "heartbeat",
            "kind": "stop",
            "app": app,
            "slot": slot,
        }))
    }

    async fn recent_output(
        &self,
        tail: usize,
    ) -> Result<Vec<crate::runner::ReplicaOutput>, RunError> {
        let out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        Ok(self
            .book
            .live()
            .into_iter()
            .filter(|(_, _, r)| r.state == SlotState::Running)
            .map(|(app, slot, r)| {
                let mine: Vec<LogLine> = out
                    .iter()
                    .filter(|(a, s, rel, _)| *a == app && *s == slot && *rel == r.release)
                    .map(|(.., l)| l.clone())
                    .collect();
                let lines = mine[mine.len().saturating_sub(tail)..].to_vec();
                crate::runner::ReplicaOutput {
                    app,
                    slot,
                    release: r.release,
                    lines,
                }
            })
            .collect())
    }

    async fn actual(&self) -> Result<Vec<ActualReplica>, RunError> {
        Ok(self
            .book
            .live()
            .into_iter()
            .map(|(app, slot, r)| ActualReplica {
                app,
                slot,
                release: r.release,
                generation: r.generation,
                state: if r.state == SlotState::Running {
                    RunState::Running
                } else {
                    RunState::Stopped
                },
                healthy: r.state == SlotState::Running,
            })
            .collect())
    }
}
