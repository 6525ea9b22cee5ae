//! The processes `cairn dev` starts (the control plane and the agents): each in a process group of its
//! own, so the terminal's Ctrl-C reaches only `cairn dev`, which stops them in order; output appended to
//! a log file under the state directory.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustix::process::{Pid, Signal, kill_process};

/// A started child and where its output goes.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open the log file {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            log: log.to_owned(),
            child,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some` once the process has exited (and was reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Sends SIGTERM (once), without waiting.
    pub fn terminate(&mut self) {
        if self.exited().is_none()
            && let Some(pid) = Pid::from_raw(self.child.id() as i32)
        {
            let _ = kill_process(pid, Signal::TERM);
        }
    }

    /// Waits until the process exited, for at most `grace`; then kills it (SIGKILL) and reaps it.
    /// Returns whether it exited on its own.
    pub fn wait_or_kill(&mut self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
        false
    }

    /// The last `n` lines of its log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Stops every process: SIGTERM to all at once, then each gets the rest of `grace` before SIGKILL.
/// Returns the names of those that had to be killed.
pub fn stop_all(procs: &mut [Proc], grace: Duration) -> Vec<String> {
    for p in procs.iter_mut() {
        p.terminate();
    }
    let deadline = Instant::now() + grace;
    procs
        .iter_mut()
        .filter_map(|p| {
            let left = deadline.saturating_duration_since(Instant::now());
            (!p.wait_or_kill(left)).then(|| p.name.clone())
        })
        .collect()
}
