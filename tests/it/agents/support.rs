//! What the agent tests share: a real `cairn serve` on a fresh PostgreSQL database with a config directory,
//! real `cairn-agent` processes with the recording driver, a raw HTTP client for the agent and admin
//! APIs, and bounded waits.
//!
//! Thresholds are shortened (offline after 3 s, heartbeats every 300 ms, leases of 3 s) so that node loss
//! and lease expiry happen within seconds; every wait is bounded and says what it waited for.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cairn_schema::Identity;
use cairn_testkit::fixtures;
use cairn_testkit::pg::TestDb;
use serde_json::Value;
use tempfile::TempDir;

pub const CAIRN: &str = env!("CARGO_BIN_EXE_cairn");

/// The `cairn-agent` binary next to `cairn`, built once per test process with the `recording` feature, or
/// `CAIRN_AGENT_BIN`.
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("CAIRN_AGENT_BIN") {
            return PathBuf::from(p);
        }
        // With the test-only recording driver these tests run on (a shipped agent has none).
        cairn_testkit::build::agent(
            env!("CARGO"),
            env!("CARGO_MANIFEST_DIR"),
            &["--bin", "cairn-agent"],
        )
        .join("cairn-agent")
    })
    .clone()
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A config repository (a work tree pushed to a local bare repository that serve fetches with git): the
/// settings, a plan and a runtime; tests add nodes and apps, then [`Repo::commit`].
///
/// A git source rather than a directory: serve watches a directory source for file events, and reading
/// the files for a reconcile is such an event, which would keep the reconciler busy in every test.
pub struct Repo {
    pub dir: TempDir,
    bare: TempDir,
}

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Runs the `git` CLI in `dir` (no user or system configuration needed), panicking with its stderr when
/// it fails; returns its stdout, trimmed.
pub use cairn_testkit::git;

impl Repo {
    pub fn new(recipient: &str) -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let bare = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q"]);
        git(bare.path(), &["init", "-q", "--bare"]);
        let r = Repo { dir, bare };
        let settings = fixtures::settings()
            .base_domain("apps.test")
            .recipients(&[recipient]);
        r.write("cairn.toml", &settings.to_string());
        let plan = fixtures::plan("small").cpu("0.25").memory("256MiB");
        r.write("plans.toml", &plan.max_replicas(8).to_string());
        let web = fixtures::runtime("web")
            .drivers(&["docker", "process"])
            .image("debian:12")
            .start("./serve");
        r.write("runtimes.toml", &web.to_string());
        r
    }

    pub fn write(&self, path: &str, text: &str) {
        std::fs::write(self.dir.path().join(path), text).unwrap();
    }

    pub fn remove(&self, path: &str) {
        std::fs::remove_file(self.dir.path().join(path)).unwrap();
    }

    /// Commits everything and pushes it to `main`, where serve fetches it (on its timer).
    pub fn commit(&self) {
        git(self.dir.path(), &["add", "-A"]);
        git(self.dir.path(), &["commit", "-q", "-m", "config"]);
        let bare = self.bare.path().to_str().unwrap().to_owned();
        git(self.dir.path(), &["push", "-q", &bare, "HEAD:main"]);
    }

    /// The commit `main` points at in the work tree.
    pub fn head(&self) -> String {
        git(self.dir.path(), &["rev-parse", "HEAD"])
    }

    /// What serve is given as `--repo`.
    pub fn url(&self) -> String {
        format!("file://{}", self.bare.path().display())
    }

    /// A node with room for eight small replicas.
    pub fn node(&self, name: &str, extra: &str) {
        self.write(
            &format!("node-{name}.toml"),
            &format!("[node.{name}]\ncpu = 2\nmemory = \"2GiB\"\ndisk = \"10GiB\"\n{extra}"),
        );
    }

    /// An app of `replicas` small replicas pinned to [`COMMIT`], with `env` lines under its env table.
    pub fn app(&self, name: &str, replicas: u32, env: &str) {
        self.write(
            &format!("app-{name}.toml"),
            &format!(
                "[app.{name}]\nplan = \"small\"\nruntime = \"web\"\nreplicas = {replicas}\n\n\
                 [app.{name}.source]\nurl = \"https://example.com/acme/{name}.git\"\nrev = \"{COMMIT}\"\n\n\
                 [app.{name}.env]\n{env}"
            ),
        );
    }
}

/// A secret env line for an app manifest: `KEY = { secret = """...""" }` encrypted to `recipient`.
pub fn secret_line(key: &str, value: &str, recipient: &cairn_schema::Recipient) -> String {
    let ct =
        cairn_schema::secret::encrypt(value.as_bytes(), std::slice::from_ref(recipient)).unwrap();
    format!("{key} = {{ secret = \"\"\"\n{}\"\"\" }}\n", ct.as_str())
}

/// A running `cairn serve`.
pub struct Plane {
    pub db: TestDb,
    pub repo: Repo,
    pub scratch: TempDir,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    serve: Option<Child>,
    agents: Vec<u32>,
    /// What serve was started with (beyond the database, repository and identity), for a restart.
    args: Vec<String>,
    /// What serve's environment has besides the inherited one.
    env: Vec<(String, String)>,
    /// Serve processes started so far (each writes its own log, `serve.log`, `serve-2.log`, ...).
    starts: u32,
    /// Where agents started from now on connect, when not [`Plane::url`] (e.g. a proxy in front of it).
    pub agent_server: Option<String>,
}

/// The shortened thresholds every test plane runs with, unless a test passes its own.
pub const FAST: &[&str] = &[
    "--interval",
    "2s",
    "--node-offline-after",
    "3s",
    "--heartbeat-interval",
    "300ms",
    "--task-lease",
    "3s",
];

/// [`FAST`] with `flag`'s value replaced (serve refuses a flag given twice).
pub fn fast_with(flag: &str, value: &'static str) -> Vec<&'static str> {
    let at = FAST
        .iter()
        .position(|a| *a == flag)
        .expect("a flag FAST sets")
        + 1;
    let mut args = FAST.to_vec();
    args[at] = value;
    args
}

impl Plane {
    /// A database, a control plane identity and an empty repository (settings, a plan, a runtime).
    pub async fn prepare() -> Option<(TestDb, Repo, TempDir, Identity)> {
        let db = TestDb::new().await?;
        let identity = Identity::generate();
        let repo = Repo::new(identity.recipient().as_str());
        let scratch = tempfile::tempdir().unwrap();
        Some((db, repo, scratch, identity))
    }

    /// Starts `cairn serve` on `repo` with `args` (e.g. [`FAST`]) and waits for its API.
    pub async fn start(
        db: TestDb,
        repo: Repo,
        scratch: TempDir,
        identity: Identity,
        args: &[&str],
    ) -> Plane {
        Self::start_with_env(db, repo, scratch, identity, args, &[]).await
    }

    /// [`Plane::start`] with `env` in serve's environment (also after [`Plane::restart_serve`]), e.g. a
    /// `CAIRN_FAILPOINT`.
    pub async fn start_with_env(
        db: TestDb,
        repo: Repo,
        scratch: TempDir,
        identity: Identity,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Plane {
        let identity_path = scratch.path().join("control-plane.key");
        std::fs::write(&identity_path, identity.to_file_text("test").as_bytes()).unwrap();
        repo.commit();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (child, addr) = spawn_serve(&db, &repo, scratch.path(), "serve.log", &args, &env).await;
        let plane = Plane {
            db,
            repo,
            scratch,
            url: format!("http://{addr}"),
            serve: Some(child),
            agents: Vec::new(),
            args,
            env,
            starts: 1,
            agent_server: None,
        };
        plane.wait_api().await;
        plane
    }

    /// Waits until the admin API answers (anything but 503: serve reached its database).
    pub async fn wait_api(&self) {
        let http = reqwest::Client::new();
        let url = format!("{}/api/v1/status", self.url);
        wait_for("the admin API to answer", Duration::from_secs(30), || {
            let req = http.get(&url);
            async move {
                let s = req.send().await.ok()?.status();
                (s != reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(())
            }
        })
        .await;
    }

    /// `Some(status)` when `cairn serve` has exited (it should not have), `None` while it runs.
    pub fn serve_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.serve.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// The log file of the serve process started last.
    pub fn serve_log(&self) -> PathBuf {
        match self.starts {
            1 => self.scratch.path().join("serve.log"),
            n => self.scratch.path().join(format!("serve-{n}.log")),
        }
    }

    /// SIGKILLs `cairn serve` (no chance to finish anything) and reaps it.
    pub fn kill_serve(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts `cairn serve` again (after [`Plane::kill_serve`]) with the same database, repository,
    /// identity and arguments, on a new port ([`Plane::url`] changes), and waits for its API. The
    /// repository is not committed to.
    pub async fn restart_serve(&mut self) {
        assert!(self.serve.is_none(), "serve still runs; kill it first");
        self.starts += 1;
        let log = format!("serve-{}.log", self.starts);
        let (child, addr) = spawn_serve(
            &self.db,
            &self.repo,
            self.scratch.path(),
            &log,
            &self.args,
            &self.env,
        )
        .await;
        self.serve = Some(child);
        self.url = format!("http://{addr}");
        self.wait_api().await;
    }

    /// [`Plane::restart_serve`] with other arguments (kept for later restarts).
    pub async fn restart_serve_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self.restart_serve().await;
    }

    /// Runs the `cairn` CLI against the database.
    pub fn cairn(&self, args: &[&str]) -> Output {
        cairn_db(self.db.url(), args)
    }

    /// A one-time join token for `node`, made through the database.
    pub fn join_token(&self, node: &str) -> String {
        join_token(self.db.url(), node)
    }

    /// Waits until the config applied is generation `n` or later.
    pub async fn wait_generation(&self, n: i64) {
        let pool = self.db.pool().clone();
        wait_for(
            &format!("config generation {n}"),
            Duration::from_secs(30),
            || {
                let pool = pool.clone();
                async move {
                    let g: i64 = sqlx::query_scalar("SELECT generation FROM config_state")
                        .fetch_one(&pool)
                        .await
                        .ok()?;
                    (g >= n).then_some(())
                }
            },
        )
        .await;
    }

    /// Starts an agent for `node` with the recording driver in `data_dir`.
    pub fn agent(
        &mut self,
        node: &str,
        data_dir: &Path,
        join: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Agent {
        let log_path = self.scratch.path().join(format!(
            "agent-{node}-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(agent_bin());
        let server = self.agent_server.as_deref().unwrap_or(&self.url);
        cmd.args(["--server", server, "--driver", "recording"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--concurrency", "2"])
            .env("CAIRN_AGENT_TEST_DRIVER", "1")
            .env("CAIRN_LOG", "debug")
            .env_remove("CAIRN_JOIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(t) = join {
            cmd.env("CAIRN_JOIN_TOKEN", t);
        }
        // 300 ms unless the test chose its own.
        if !args.contains(&"--heartbeat") {
            cmd.args(["--heartbeat", "300ms"]);
        }
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cairn-agent starts");
        self.agents.push(child.id());
        Agent {
            child: Some(child),
            dir: data_dir.to_owned(),
            log: log_path,
        }
    }

    /// Every log file of this plane: serve's and every agent's.
    pub fn logs(&self) -> Vec<(PathBuf, String)> {
        std::fs::read_dir(self.scratch.path())
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                (p.extension()? == "log").then(|| (p.clone(), std::fs::read_to_string(&p).unwrap()))
            })
            .collect()
    }

    /// GET an admin route with `token` (or none), returning the status and the JSON body.
    pub async fn admin_get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new().get(format!("{}/api/v1{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// POST to an agent route as `credential` (or none), returning the status and the JSON body.
    pub async fn agent_post(
        &self,
        path: &str,
        credential: Option<&str>,
        body: &Value,
    ) -> (u16, Value) {
        post_json(
            format!("{}/agent/v1{path}", self.url),
            credential.map(str::to_owned),
            body.clone(),
        )
        .await
    }

    /// GET an agent route as `credential`.
    pub async fn agent_get(&self, path: &str, credential: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new().get(format!("{}/agent/v1{path}", self.url));
        if let Some(c) = credential {
            req = req.bearer_auth(c);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Joins `node` over HTTP with a new identity; returns the credential.
    pub async fn join_raw(&self, node: &str) -> (String, Identity) {
        let id = Identity::generate();
        let token = self.join_token(node);
        let (status, body) = self
            .agent_post(
                "/join",
                None,
                &serde_json::json!({"token": token, "recipient": id.recipient(), "drivers": ["docker"], "agent_version": "test"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (body["credential"].as_str().unwrap().to_owned(), id)
    }

    /// A query's rows as JSON values (`SELECT to_jsonb(x) FROM (...) x`).
    pub async fn rows(&self, sql: &str) -> Vec<Value> {
        rows(&self.db, sql).await
    }
}

/// Spawns a `cairn serve` command (stdout piped here) and returns it with the address it printed
/// (`listening on ADDR`); the rest of its stdout is drained so serve never blocks on a full pipe.
pub async fn start_listening(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("cairn serve starts");
    let stdout = child.stdout.take().unwrap();
    let addr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().expect("serve prints its address").unwrap();
        std::thread::spawn(move || for _ in lines {});
        first
            .strip_prefix("listening on ")
            .expect("listening on ADDR")
            .to_owned()
    })
    .await
    .unwrap();
    (child, addr)
}

/// Spawns `cairn serve` for `db` and `repo` with the identity in `scratch/control-plane.key`, logging to
/// `scratch/<log>`; returns it and the address it printed.
async fn spawn_serve(
    db: &TestDb,
    repo: &Repo,
    scratch: &Path,
    log: &str,
    args: &[String],
    env: &[(String, String)],
) -> (Child, String) {
    let log = std::fs::File::create(scratch.join(log)).unwrap();
    let mut cmd = Command::new(CAIRN);
    cmd.arg("serve")
        .args(["--database-url", db.url()])
        .args(["--repo", &repo.url(), "--ref", "main"])
        .arg("--identity")
        .arg(scratch.join("control-plane.key"))
        .args(["--listen", "127.0.0.1:0", "--no-poll-heads"])
        .args(["--cache-dir"])
        .arg(scratch.join("cache"))
        .args(args)
        // One id across restarts (unless the test names its own): a restarted serve takes its killed
        // predecessor's leader lease at once instead of waiting for it to expire.
        .env("CAIRN_REPLICA_ID", "test-serve")
        .env("CAIRN_LOG", "debug")
        .env_remove("CAIRN_IDENTITY")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(log);
    start_listening(&mut cmd).await
}

/// `cairn ARGS` against the database at `db_url` (no admin API, no token).
pub fn cairn_db(db_url: &str, args: &[&str]) -> Output {
    Command::new(CAIRN)
        .args(args)
        .env("DATABASE_URL", db_url)
        .env_remove("CAIRN_SERVER")
        .env_remove("CAIRN_TOKEN")
        .output()
        .expect("cairn runs")
}

/// A one-time join token for `node`, made through the database at `db_url`.
pub fn join_token(db_url: &str, node: &str) -> String {
    let out = cairn_db(db_url, &["node", "join-token", node]);
    assert!(
        out.status.success(),
        "join-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A query's rows, each as one JSON object.
pub async fn rows(db: &TestDb, sql: &str) -> Vec<Value> {
    sqlx::query_scalar::<_, Value>(&format!("SELECT to_jsonb(x) FROM ({sql}) x"))
        .fetch_all(db.pool())
        .await
        .unwrap()
}

/// POSTs `body` to `url` as `credential`, returning the status and the JSON body.
pub async fn post_json(url: String, credential: Option<String>, body: Value) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(url).json(&body);
    if let Some(c) = credential {
        req = req.bearer_auth(c);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

impl Drop for Plane {
    fn drop(&mut self) {
        for pid in &self.agents {
            kill(*pid, rustix::process::Signal::KILL);
        }
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for (p, text) in self.logs() {
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- last lines of {} ---", p.display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Sends `sig` to process `pid` (gone already: nothing).
pub fn kill(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    pub dir: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// SIGKILL: no chance to give anything back.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits (bounded) for the exit; returns its status.
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("the agent runs");
        kill(c.id(), rustix::process::Signal::TERM);
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > limit {
                let _ = c.kill();
                panic!("the agent did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: rustix::process::Signal) {
        kill(self.child.as_ref().expect("the agent runs").id(), signal);
    }

    /// `Some(status)` when the agent has exited, `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// What this agent process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the recording driver recorded so far.
    pub fn records(&self) -> Vec<Value> {
        match std::fs::read_to_string(self.dir.join("recording.jsonl")) {
            Ok(text) => text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The node's credential, as the agent saved it.
    pub fn credential(&self) -> String {
        let j: Value =
            serde_json::from_slice(&std::fs::read(self.dir.join("credential.json")).unwrap())
                .unwrap();
        j["credential"].as_str().unwrap().to_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a node's agent last reported, `(app, slot, release, state)` sorted.
pub async fn reported(plane: &Plane, node: &str) -> Vec<(String, i64, i64, String)> {
    let rows = plane
        .rows(&format!(
            "SELECT replicas FROM node_status WHERE node = '{node}'"
        ))
        .await;
    let mut out: Vec<(String, i64, i64, String)> = rows
        .first()
        .and_then(|r| r["replicas"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r["app"].as_str().unwrap().to_owned(),
                r["slot"].as_i64().unwrap(),
                r["release"].as_i64().unwrap(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// `(app, slot, node)` of every placement, sorted.
pub async fn placements(plane: &Plane) -> Vec<(String, i64, String)> {
    let rows = plane
        .rows("SELECT app, slot, node FROM placements ORDER BY app, slot")
        .await;
    rows.iter()
        .map(|r| {
            (
                r["app"].as_str().unwrap().to_owned(),
                r["slot"].as_i64().unwrap(),
                r["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Waits until every running placement is reported running, at its release, by its node.
pub async fn wait_converged(plane: &Plane, limit: Duration) {
    wait_converged_db(&plane.db, limit).await
}

/// [`wait_converged`] on the database `db` (several control planes share it).
pub async fn wait_converged_db(db: &TestDb, limit: Duration) {
    wait_for("every placement to run on its node", limit, || async {
        let rows = rows(
            db,
            "SELECT p.app, p.slot, p.node, p.release, s.replicas FROM placements p \
                 LEFT JOIN node_status s ON s.node = p.node WHERE p.state = 'running'",
        )
        .await;
        if rows.is_empty() {
            return None;
        }
        rows.iter()
            .all(|r| {
                r["replicas"].as_array().is_some_and(|reps| {
                    reps.iter().any(|x| {
                        x["app"] == r["app"]
                            && x["slot"] == r["slot"]
                            && x["release"] == r["release"]
                            && x["state"] == "running"
                    })
                })
            })
            .then_some(())
    })
    .await
}
