//! `cairn dev` end to end, as a newcomer runs it: the real binary on a copy of `examples/local` (with
//! `examples/apps` as its app sources), its own PostgreSQL, `cairn serve`, two `cairn-agent`s with the
//! Docker driver and busybox images built from the host's static busybox. The test waits for every app to
//! answer through its node's proxy, edits a manifest and waits for the new release to answer, then sends
//! SIGINT and checks that nothing is left: no process `cairn dev` started, no container of its
//! installation.
//!
//! It needs Docker, the PostgreSQL server binaries, git and a static `/bin/busybox`: without them it is
//! skipped with a message, or fails under `CI` / `CAIRN_TEST_REQUIRE_ALL`.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agents::support::{CAIRN, agent_bin};
use crate::validate::copy_dir;

/// What is missing to run the test, if anything.
fn missing_prerequisite() -> Option<String> {
    let docker = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match docker {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "the Docker engine does not answer: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(e) => return Some(format!("the docker CLI cannot run: {e}")),
    }
    if let Err(e) = cairn_pgdev::find_bindir(None) {
        return Some(e.to_string());
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("/bin/busybox is missing (Debian package busybox-static)".into());
    }
    if Command::new("git").arg("--version").output().is_err() {
        return Some("git is missing".into());
    }
    None
}

/// `GET /` with this Host through a proxy on 127.0.0.1: the status and the body.
fn get(port: u16, host: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

fn alive(pid: i64) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    // A zombie still answers signal 0; it is gone for every purpose that matters here.
    let zombie = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    rustix::process::test_kill_process(pid).is_ok() && !zombie
}

fn containers(installation: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=cairn.installation={installation}"))
        .output()
        .expect("docker ps runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The running `cairn dev`; on a failed test, kills whatever it started and shows its output and logs.
struct Dev {
    child: Child,
    dir: tempfile::TempDir,
    installation: String,
    done: bool,
}

impl Dev {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn manifest(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.state().join("dev.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn output(&self) -> String {
        let mut out = String::new();
        for f in ["dev.out", "dev.err"] {
            out += &format!(
                "--- {f}\n{}\n",
                std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default()
            );
        }
        for e in std::fs::read_dir(self.state().join("logs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!(
                "--- {} (last 40 lines)\n{}\n",
                e.path().display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        out
    }

    /// Polls `f` every 200 ms for at most `limit`, failing with what it waited for and the output.
    fn wait_for<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "cairn dev exited ({status}) while waiting for {what}\n{}",
                    self.output()
                );
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        eprintln!("{}", self.output());
        let pids: Vec<i64> = self
            .manifest()
            .map(|m| {
                let mut p = vec![m["serve_pid"].as_i64(), m["postgres_pid"].as_i64()];
                if let Some(agents) = m["agents"].as_object() {
                    p.extend(agents.values().map(|a| a["pid"].as_i64()));
                }
                p.into_iter().flatten().collect()
            })
            .unwrap_or_default();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in pids {
            if let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let ids = containers(&self.installation);
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
    }
}

#[test]
fn cairn_dev_runs_the_local_example_applies_an_edit_and_leaves_nothing_behind() {
    if let Some(why) = missing_prerequisite() {
        cairn_testkit::missing(
            &cairn_testkit::current_test(),
            "cairn dev's prerequisites",
            why,
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root.join("examples/local"), &dir.path().join("config"));
    copy_dir(&root.join("examples/apps"), &dir.path().join("apps"));
    let installation = format!("dev{:08x}", rand_u32());

    let out = std::fs::File::create(dir.path().join("dev.out")).unwrap();
    let err = std::fs::File::create(dir.path().join("dev.err")).unwrap();
    let child = Command::new(CAIRN)
        .arg("dev")
        .arg(dir.path().join("config"))
        .arg("--app-sources")
        .arg(format!(
            "https://github.com/cairn-examples/={}",
            dir.path().join("apps").display()
        ))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--port", "0", "--proxy-port", "0", "--plain"])
        .args(["--installation", &installation])
        .env_remove("DATABASE_URL")
        .env("CAIRN_AGENT_BIN", agent_bin())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("cairn dev starts");
    let mut dev = Dev {
        child,
        dir,
        installation: installation.clone(),
        done: false,
    };

    let manifest = dev.wait_for("dev.json with both agents", Duration::from_secs(120), |d| {
        d.manifest()
            .filter(|m| m["agents"].as_object().is_some_and(|a| a.len() == 2))
    });
    let ports: Vec<u16> = manifest["agents"]
        .as_object()
        .unwrap()
        .values()
        .map(|a| a["proxy_port"].as_u64().unwrap() as u16)
        .collect();
    let answer = |host: &str, want: &str| {
        ports.iter().find_map(|p| {
            get(*p, host).filter(|(status, body)| *status == 200 && body.contains(want))
        })
    };

    // Every app answers through a node's proxy (the first deploys build the images).
    dev.wait_for(
        "hello and greeter to answer",
        Duration::from_secs(180),
        |_| {
            answer("hello.apps.localhost", "<h1>Hello from Cairn</h1>")?;
            answer("greeter.apps.localhost", "Hello from Cairn")
        },
    );

    // An edit of a manifest is planned, applied and deployed within seconds.
    let file = dev.dir.path().join("config/apps/greeter.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text.replace(
        "GREETING = \"Hello from Cairn\"",
        "GREETING = \"Howdy from an edit\"",
    );
    assert_ne!(
        text, edited,
        "the example's GREETING line changed; update this test"
    );
    std::fs::write(&file, edited).unwrap();
    let edited_at = Instant::now();
    dev.wait_for(
        "the edited GREETING to be served",
        Duration::from_secs(60),
        |_| answer("greeter.apps.localhost", "Howdy from an edit"),
    );
    eprintln!("the edit was served after {:?}", edited_at.elapsed());

    // SIGINT stops everything, and cairn dev exits 0.
    let manifest = dev.manifest().unwrap();
    let mut pids = vec![
        ("serve", manifest["serve_pid"].as_i64().unwrap()),
        ("postgres", manifest["postgres_pid"].as_i64().unwrap()),
    ];
    for (node, a) in manifest["agents"].as_object().unwrap() {
        pids.push((node.as_str(), a["pid"].as_i64().unwrap()));
    }
    for (what, pid) in &pids {
        assert!(alive(*pid), "{what} (pid {pid}) runs before the SIGINT");
    }
    assert!(!containers(&installation).is_empty());
    let pid = rustix::process::Pid::from_raw(dev.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = dev.wait_for_exit(Duration::from_secs(90));
    assert!(
        status.success(),
        "cairn dev exited with {status}\n{}",
        dev.output()
    );
    for (what, pid) in &pids {
        assert!(
            !alive(*pid),
            "{what} (pid {pid}) still runs after cairn dev exited\n{}",
            dev.output()
        );
    }
    let left = containers(&installation);
    assert!(
        left.is_empty(),
        "containers left: {left:?}\n{}",
        dev.output()
    );
    dev.done = true;
}

impl Dev {
    fn wait_for_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "cairn dev did not exit within {limit:?} of SIGINT\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ std::process::id().rotate_left(16)
}
