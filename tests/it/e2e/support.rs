//! The end-to-end harness: everything real. A `cairn serve` process on a fresh PostgreSQL database with a
//! git config repository, `cairn-agent` processes with the Docker or the process driver, app sources in
//! local bare repositories reached through `--git-rewrite` (the manifests keep `https://github.com/...`
//! URLs), requests through each node's proxy with the app's `Host`, and bounded waits.
//!
//! How a test uses it (see `mod.rs` for complete tests):
//!
//! ```text
//! let Some(mut e) = E2e::new("my_test", &[Driver::Docker]).await else { return };  // skips or fails loudly
//! let base = e.busybox_image();                  // Docker: the FROM of the apps' Dockerfiles
//! let shop = e.app("shop", "docker-app", 1, &docker_site(&base, "v1", true));  // source + manifest
//! e.repo.node("n1", "");
//! let plane = e.start(&[]).await;               // cairn serve (polls the apps' heads every 2 s)
//! let agent = e.agent(&plane, "n1", Driver::Docker, &[]).await;
//! plane.wait_release(&shop.name, 1, "live", LIMIT).await;
//! wait_body(agent.proxy, &shop.host, "v1", LIMIT).await;     // GET / through the node proxy
//! shop.source.commit(&docker_site(&base, "v2", true));     // a push: serve's next poll deploys it
//! e.remove_app(&plane, &shop.name).await;
//! ```
//!
//! A second node on its own Docker engine, with images distributed through a local registry:
//!
//! ```text
//! let Some(b) = e.second_engine().await else { return };     // a private dockerd (skips or fails loudly)
//! let Some(reg) = cairn_testkit::registry::registry(TEST, e.scratch.path()).await else { return };
//! let n2 = e.agent_on(&plane, "n2", Driver::Docker, &[], Some(b.host())).await;  // DOCKER_HOST for it
//! b.docker(&["images"]);                                      // the docker CLI against that engine
//! ```
//!
//! A webhook test would start serve with `--github-webhook-secret-file` in `extra` and a long
//! `--interval` (so the head comes from the push, not the poll), then deliver a signed push.
//!
//! Clean-up happens when [`E2e`] is dropped, even when the test panics: agents get SIGTERM (then SIGKILL),
//! serve is killed, every container and image labelled with this test's installation id is removed (the
//! Docker CLI, by label: other tests' and other installations' are never touched), and any process whose
//! working directory is inside this test's scratch directory (process-driver replicas) is killed. On a
//! panic the last lines of every log are printed.
//!
//! Timings: serve runs with a 2 s interval (heads polled each time), agents heartbeat every second, a
//! node is offline after 10 s, and leases last 10 s. Every wait is bounded and says what it waited for.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_testkit::engine::SecondEngine;
use cairn_testkit::fixtures;
use cairn_testkit::missing;
use serde_json::Value;
use tempfile::TempDir;

pub use crate::agents::support::wait_for;
use crate::agents::support::{
    CAIRN, Plane as AgentsPlane, Repo, agent_bin, cairn_db, git, join_token, rows,
};

/// The static busybox every test image and process app runs (Debian's `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";
/// The agents' heartbeat in these tests.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// The apps' base domain (set by the config repository the harness makes).
pub const BASE_DOMAIN: &str = "apps.test";

/// Which driver an agent runs replicas with.
pub use cairn_schema::Driver;

fn docker_cli(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("docker")
        .args(args)
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null())
        .output()
}

/// Runs the Docker CLI, panicking with its stderr when it fails; returns stdout.
pub fn docker(args: &[&str]) -> String {
    let out = docker_cli(args).expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u32::from_le_bytes(b)
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a test's own listeners).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `cairn serve`'s extra flags and environment.
#[derive(Clone)]
struct ServeArgs {
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

/// One end-to-end test's world: its installation id (every container, image and process of the test is
/// labelled with or lives under it), a database, the config repository, the app sources, and everything
/// it started. Dropping it cleans up.
pub struct E2e {
    /// The installation serve hands to agents; containers and images carry it as `cairn.installation`.
    pub installation: String,
    pub repo: Repo,
    pub scratch: TempDir,
    /// `https://github.com/<installation>/`: the prefix of every app source URL of this test, rewritten
    /// to the bare repositories under `scratch/remotes/`.
    pub github: String,
    db: Option<cairn_testkit::pg::TestDb>,
    identity: Option<cairn_schema::Identity>,
    docker: bool,
    children: Vec<Child>,
    serve_log: Option<PathBuf>,
    /// `cairn serve`'s pid, once started.
    serve_pid: Option<u32>,
    /// The flags serve was started with, for [`E2e::restart_serve`].
    serve_args: Option<ServeArgs>,
    /// Second engines started by [`E2e::second_engine`]: torn down after the agents stopped.
    engines: Vec<Arc<SecondEngine>>,
    test: &'static str,
    cleaned: AtomicBool,
}

impl E2e {
    /// The world for `test` with the drivers it needs, or `None` (after saying why) when something is
    /// missing here: PostgreSQL, git, the static busybox, and the Docker engine for [`Driver::Docker`].
    /// Under CI or `CAIRN_TEST_REQUIRE_ALL` a missing piece fails the test instead.
    pub async fn new(test: &'static str, drivers: &[Driver]) -> Option<E2e> {
        if let Err(e) = Command::new("git").arg("--version").output() {
            missing(test, "the git CLI", e);
            return None;
        }
        if !Path::new(BUSYBOX).is_file() {
            missing(
                test,
                BUSYBOX,
                "not installed (Debian package busybox-static)",
            );
            return None;
        }
        let docker = drivers.contains(&Driver::Docker);
        if docker {
            match docker_cli(&["version", "--format", "{{.Server.Version}}"]) {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    missing(
                        test,
                        "the Docker engine",
                        String::from_utf8_lossy(&o.stderr),
                    );
                    return None;
                }
                Err(e) => {
                    missing(test, "the docker CLI", e);
                    return None;
                }
            }
        }
        let (db, repo, scratch, identity) = AgentsPlane::prepare().await?;
        let installation = format!("e2e{:08x}", random_u32());
        let github = format!("https://github.com/{installation}/");
        let docker_app = fixtures::runtime("docker-app").dockerfile();
        let process = fixtures::runtime("process-app")
            .drivers(&["process"])
            .start("exec /bin/busybox httpd -f -p 127.0.0.1:$PORT -h www");
        repo.write("runtimes.toml", &format!("{docker_app}\n{process}"));
        Some(E2e {
            installation,
            repo,
            scratch,
            github,
            db: Some(db),
            identity: Some(identity),
            docker,
            children: Vec::new(),
            serve_log: None,
            serve_pid: None,
            serve_args: None,
            engines: Vec::new(),
            test,
            cleaned: AtomicBool::new(false),
        })
    }

    /// The busybox base image (`FROM scratch`, the static busybox, its applets linked in `/bin`), built
    /// with the classic builder and no pull, labelled with this installation. Its tag is unique to the
    /// test.
    pub fn busybox_image(&self) -> String {
        let tag = format!("cairn-e2e/busybox:{}", self.installation);
        let ctx = self.scratch.path().join("busybox-image");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::copy(BUSYBOX, ctx.join("busybox")).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
        )
        .unwrap();
        let label = format!("cairn.installation={}", self.installation);
        docker(&[
            "build",
            "-q",
            "--pull=false",
            "--label",
            &label,
            "-t",
            &tag,
            ctx.to_str().unwrap(),
        ]);
        tag
    }

    /// The control plane's age recipient (what the repository's secrets are encrypted to); before
    /// [`E2e::start`].
    pub fn recipient(&self) -> cairn_schema::Recipient {
        self.identity
            .as_ref()
            .expect("before the plane starts")
            .recipient()
    }

    /// A new app source: a bare repository the rewrite reaches, and a work tree to commit to.
    pub fn app_source(&self, name: &str) -> AppSource {
        let bare = self.scratch.path().join(format!("remotes/{name}.git"));
        let work = self.scratch.path().join(format!("work/{name}"));
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        git(&bare, &["init", "-q", "--bare"]);
        git(&work, &["init", "-q"]);
        AppSource {
            url: format!("{}{name}.git", self.github),
            bare,
            work,
        }
    }

    /// Declares an app in the config repository (not committed yet: [`E2e::start`] or a later
    /// `repo.commit()` does): named `<prefix>-<this installation's suffix>` (unique to the test), with
    /// `replicas` of `runtime`, following `main` of a new source whose first commit is `files`.
    pub fn app(
        &self,
        prefix: &str,
        runtime: &str,
        replicas: u32,
        files: &[(&str, String)],
    ) -> TestApp {
        let name = format!("{prefix}-{}", &self.installation[3..]);
        let source = self.app_source(&name);
        let first = source.commit(files);
        self.repo.write(
            &format!("app-{name}.toml"),
            &app_manifest(&name, runtime, replicas, &source),
        );
        TestApp {
            host: host(&name),
            name,
            source,
            first,
        }
    }

    /// Removes `app` from the config repository, commits, and waits until the commit is applied.
    pub async fn remove_app(&self, plane: &Plane, app: &str) {
        let generation = plane.generation().await;
        self.repo.remove(&format!("app-{app}.toml"));
        self.repo.commit();
        plane.wait_generation(generation + 1).await;
    }

    /// `--git-rewrite` for serve and agents: this test's GitHub prefix to its local remotes.
    pub fn rewrite(&self) -> String {
        format!(
            "{}=file://{}/",
            self.github,
            self.scratch.path().join("remotes").display()
        )
    }

    /// Commits the config repository and starts `cairn serve` on it with `extra` flags; waits until its
    /// API answers and the first commit is applied.
    pub async fn start(&mut self, extra: &[&str]) -> Plane {
        self.start_with_env(extra, &[]).await
    }

    /// [`E2e::start`] with `env` set for serve too (the GitHub integration's credentials, say).
    pub async fn start_with_env(&mut self, extra: &[&str], env: &[(&str, &str)]) -> Plane {
        let db = self.db.take().expect("one plane per test");
        let identity = self.identity.take().unwrap();
        let key = self.scratch.path().join("control-plane.key");
        std::fs::write(&key, identity.to_file_text("e2e").as_bytes()).unwrap();
        self.repo.commit();
        let extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let addr = self.spawn_serve(db.url(), &extra, &env, "serve.log").await;
        self.serve_args = Some(ServeArgs { extra, env });
        let plane = Plane {
            url: format!("http://{addr}"),
            db,
        };
        plane.wait_generation(1).await;
        plane
    }

    /// Starts `cairn serve` again after [`E2e::kill_serve`]: the same database, repository, identity and
    /// arguments, on the same address (the agents keep their URL), and waits for its API.
    pub async fn restart_serve(&mut self, plane: &Plane) {
        assert!(self.serve_pid.is_none(), "serve still runs; kill it first");
        let ServeArgs { mut extra, env } = self.serve_args.clone().expect("serve was started");
        let addr = plane.url.trim_start_matches("http://").to_owned();
        if let Some(at) = extra.iter().position(|a| a == "--listen") {
            extra.drain(at..at + 2);
        }
        extra.extend(["--listen".to_owned(), addr.clone()]);
        let log = format!("serve-{}.log", self.children.len());
        let again = self.spawn_serve(plane.db.url(), &extra, &env, &log).await;
        assert_eq!(again, addr, "serve came back on its address");
    }

    /// Spawns `cairn serve` on `db` with the test's defaults and `extra`, logging to `log` in the
    /// scratch directory; returns the address it listens on.
    async fn spawn_serve(
        &mut self,
        db: &str,
        extra: &[String],
        env: &[(String, String)],
        log: &str,
    ) -> String {
        let key = self.scratch.path().join("control-plane.key");
        let log_path = self.scratch.path().join(log);
        let log = std::fs::File::create(&log_path).unwrap();
        let rewrite = self.rewrite();
        let mut child = Command::new(CAIRN)
            .arg("serve")
            .args(["--database-url", db])
            .args(["--repo", &self.repo.url(), "--ref", "main"])
            .arg("--identity")
            .arg(&key)
            .arg("--cache-dir")
            .arg(self.scratch.path().join("serve-cache"))
            .args(["--installation", &self.installation])
            .args(["--git-rewrite", &rewrite])
            // The defaults `extra` does not set itself (serve refuses a flag given twice).
            .args(
                [
                    ("--listen", "127.0.0.1:0"),
                    ("--interval", "2s"),
                    ("--heartbeat-interval", "1s"),
                    ("--node-offline-after", "10s"),
                    ("--task-lease", "10s"),
                    // One id across restarts: a restarted serve takes its predecessor's lease at once.
                    ("--replica-id", "e2e-serve"),
                ]
                .into_iter()
                .filter(|(flag, _)| !extra.iter().any(|a| a == flag))
                .flat_map(|(flag, value)| [flag, value]),
            )
            .args(extra)
            .env("CAIRN_LOG", "info,cairn_reconciler=debug")
            .env_remove("CAIRN_IDENTITY")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("cairn serve starts");
        let stdout = child.stdout.take().unwrap();
        self.serve_pid = Some(child.id());
        self.children.push(child);
        self.serve_log = Some(log_path);
        tokio::task::spawn_blocking(move || {
            use std::io::BufRead as _;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok).unwrap_or_default();
            std::thread::spawn(move || for _ in lines {});
            first.strip_prefix("listening on ").map(str::to_owned)
        })
        .await
        .unwrap()
        .expect("serve prints `listening on ADDR` first")
    }

    /// Starts `cairn-agent` for `node` (declared in the config) with `driver`, its own data directory and
    /// a proxy on a free loopback port; `extra` flags are appended. Returns once the node is online. Its
    /// Docker engine is the one this process's `DOCKER_HOST` names (the main engine); see
    /// [`E2e::agent_on`] for another.
    pub async fn agent(
        &mut self,
        plane: &Plane,
        node: &str,
        driver: Driver,
        extra: &[&str],
    ) -> Agent {
        self.agent_on(plane, node, driver, extra, None).await
    }

    /// [`E2e::agent`] with `DOCKER_HOST=docker_host` in the agent's environment when given (a
    /// `unix://` socket, e.g. [`SecondEngine::host`] of an engine from [`E2e::second_engine`]).
    pub async fn agent_on(
        &mut self,
        plane: &Plane,
        node: &str,
        driver: Driver,
        extra: &[&str],
        docker_host: Option<&str>,
    ) -> Agent {
        let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let mut cmd = Command::new(agent_bin());
        if let Some(host) = docker_host {
            cmd.env("DOCKER_HOST", host);
        }
        self.spawn_agent(plane, node, driver, extra, cmd, proxy, true)
            .await
    }

    /// [`E2e::agent`] inside network namespace `host` (its own address: the proxy listens on
    /// `<host.addr>:<port>`, the node's manifest `address`), talking to serve over the test's bridge
    /// (serve must listen on the net's gateway). Returns once the node is online.
    pub async fn agent_in(
        &mut self,
        plane: &Plane,
        node: &str,
        host: &cairn_testkit::netns::Host,
        port: u16,
        driver: Driver,
        extra: &[&str],
    ) -> Agent {
        let proxy = SocketAddr::from((host.addr, port));
        let cmd = host.command(agent_bin());
        let mut extra = extra.to_vec();
        extra.push("--insecure-http-server");
        self.spawn_agent(plane, node, driver, &extra, cmd, proxy, true)
            .await
    }

    /// SIGKILLs `cairn serve`.
    pub fn kill_serve(&mut self) {
        if let Some(pid) = self.serve_pid.take() {
            crate::agents::support::kill(pid, rustix::process::Signal::KILL);
        }
    }

    /// SIGKILLs `agent` and starts it again in `host` with the same data directory, without waiting for
    /// it to come online (the control plane may be down).
    pub async fn restart_agent_in(
        &mut self,
        agent: &Agent,
        plane: &Plane,
        node: &str,
        host: &cairn_testkit::netns::Host,
        driver: Driver,
        extra: &[&str],
    ) -> Agent {
        agent.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cmd = host.command(agent_bin());
        let mut extra = extra.to_vec();
        extra.push("--insecure-http-server");
        self.spawn_agent(plane, node, driver, &extra, cmd, agent.proxy, false)
            .await
    }

    /// Starts `cmd` (the agent binary, perhaps wrapped) as `node`'s agent with its proxy on `proxy`;
    /// with `wait_online`, returns once the node is online.
    #[allow(clippy::too_many_arguments)]
    async fn spawn_agent(
        &mut self,
        plane: &Plane,
        node: &str,
        driver: Driver,
        extra: &[&str],
        mut cmd: Command,
        proxy: SocketAddr,
        wait_online: bool,
    ) -> Agent {
        let token = plane.join_token(node);
        let dir = self.scratch.path().join(format!("agent-{node}"));
        let mut log_path = self.scratch.path().join(format!("agent-{node}.log"));
        if log_path.exists() {
            log_path = self
                .scratch
                .path()
                .join(format!("agent-{node}-{}.log", self.children.len()));
        }
        let log = std::fs::File::create(&log_path).unwrap();
        let child = cmd
            .args(["--server", &plane.url, "--driver", driver.as_str()])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--heartbeat", &format!("{}ms", HEARTBEAT.as_millis())])
            .args(["--proxy-listen", &proxy.to_string()])
            .args(["--git-rewrite", &self.rewrite()])
            .args(["--shutdown-grace", "5s"])
            .args(extra)
            .env("CAIRN_JOIN_TOKEN", token)
            .env("CAIRN_LOG", "info,cairn_agent=debug")
            .env_remove("CAIRN_AGENT_TEST_DRIVER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cairn-agent starts");
        let pid = child.id();
        self.children.push(child);
        let node_name = node.to_owned();
        if wait_online {
            wait_for(
                &format!("node {node} to be online"),
                Duration::from_secs(30),
                || plane.node_online(&node_name),
            )
            .await;
        }
        Agent {
            proxy,
            dir,
            log: log_path,
            pid,
        }
    }

    /// A second Docker engine for this test (a private `dockerd`: its own images, containers, bridge and
    /// subnet; its log `dockerd-<bridge>.log` in the scratch directory, printed on a panic like the
    /// others), or `None` after saying why it cannot run here (a panic instead under CI /
    /// `CAIRN_TEST_REQUIRE_ALL`). Start an agent on it with [`E2e::agent_on`] and
    /// `Some(engine.host())`. It is torn down (every container on it, its images, its dockerd) when this
    /// `E2e` is, after the agents stopped; [`E2e::containers`] and the label clean-up only see the main
    /// engine.
    pub async fn second_engine(&mut self) -> Option<Arc<SecondEngine>> {
        let engine = Arc::new(SecondEngine::start(self.test, self.scratch.path()).await?);
        self.engines.push(engine.clone());
        Some(engine)
    }

    /// Containers of this installation (all states), as `(name, labels)`: one `docker ps`, so a
    /// container removed meanwhile is simply not listed.
    pub fn containers(&self) -> Vec<(String, Value)> {
        let filter = format!("label=cairn.installation={}", self.installation);
        docker(&["ps", "-a", "--filter", &filter, "--format", "{{json .}}"])
            .lines()
            .map(|l| {
                let j: Value = serde_json::from_str(l).unwrap();
                // `k=v,k=v`: a value holding a comma (several hostnames) is cut, but no label the
                // tests read holds one.
                let labels: serde_json::Map<String, Value> = j["Labels"]
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
                    .collect();
                (
                    j["Names"].as_str().unwrap_or_default().to_owned(),
                    Value::Object(labels),
                )
            })
            .collect()
    }

    /// Every log of this test (serve's and each agent's).
    pub fn logs(&self) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        if let Ok(dir) = std::fs::read_dir(self.scratch.path()) {
            for e in dir.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    out.push((p.clone(), std::fs::read_to_string(&p).unwrap_or_default()));
                }
            }
        }
        out.sort();
        out
    }

    /// Kills what the test started and removes what its installation left in Docker. Idempotent; also
    /// run on drop.
    pub fn clean_up(&mut self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        // Agents first, gracefully (the process driver stops its replicas on the way out); serve last.
        let mut children = std::mem::take(&mut self.children);
        for c in children.iter_mut().rev() {
            terminate(c, Duration::from_secs(10));
        }
        kill_processes_under(self.scratch.path());
        if self.docker {
            let filter = format!("label=cairn.installation={}", self.installation);
            if let Ok(o) = docker_cli(&["ps", "-aq", "--filter", &filter]) {
                let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids.iter().map(String::as_str));
                    let _ = docker_cli(&args);
                }
            }
            // Children before parents: a few passes remove what the pass before freed.
            for _ in 0..5 {
                let Ok(o) = docker_cli(&["images", "-aq", "--no-trunc", "--filter", &filter])
                else {
                    break;
                };
                let mut ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect();
                ids.dedup();
                if ids.is_empty() {
                    break;
                }
                for id in ids {
                    let _ = docker_cli(&["rmi", "-f", &id]);
                }
            }
        }
        // The last reference when the test's own went first (it is declared after this `E2e`): the
        // engine's containers are removed and its dockerd stopped now that no agent uses it.
        self.engines.clear();
    }
}

impl Drop for E2e {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (p, text) in self.logs() {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- last lines of {} ---", p.display());
                for l in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("{l}");
                }
            }
        }
        self.clean_up();
    }
}

/// SIGTERM, a bounded wait, then SIGKILL.
fn terminate(c: &mut Child, limit: Duration) {
    if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Pids of the processes whose working directory is under `root` (the process driver runs each replica
/// in its release directory, inside the agent's data directory).
pub fn processes_under(root: &Path) -> Vec<i32> {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            cwd.starts_with(root).then_some(pid)
        })
        .collect()
}

fn kill_processes_under(root: &Path) {
    for pid in processes_under(root) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// An app declared by [`E2e::app`].
#[derive(Debug)]
pub struct TestApp {
    pub name: String,
    /// The `Host` it answers to.
    pub host: String,
    pub source: AppSource,
    /// The source's first commit.
    pub first: String,
}

/// An app's source repository: a bare remote (what the rewrite points at) and a work tree.
#[derive(Debug)]
pub struct AppSource {
    /// The URL manifests use (`https://github.com/<installation>/<name>.git`).
    pub url: String,
    pub bare: PathBuf,
    work: PathBuf,
}

impl AppSource {
    /// Replaces the work tree's files with `files` (path, contents), commits and pushes to `main`;
    /// returns the commit id.
    pub fn commit(&self, files: &[(&str, String)]) -> String {
        for e in std::fs::read_dir(&self.work).unwrap().flatten() {
            if e.file_name() != ".git" {
                let p = e.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
        for (path, contents) in files {
            let p = self.work.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, contents).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(
            &self.work,
            &["commit", "-q", "--allow-empty", "-m", "version"],
        );
        let bare = self.bare.to_str().unwrap().to_owned();
        git(
            &self.work,
            &["push", "-q", "-f", &bare, "HEAD:refs/heads/main"],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

/// The test web app's files: `www/index.html` says `version`, `www/healthz` says ok unless `healthy` is
/// false (then the health path answers 404).
pub fn site(version: &str, healthy: bool) -> Vec<(&'static str, String)> {
    let mut files = vec![("www/index.html", format!("{version}\n"))];
    if healthy {
        files.push(("www/healthz", "ok\n".to_owned()));
    }
    files
}

/// The site plus a Dockerfile (for the `docker-app` runtime, `dockerfile = true`) that copies it into
/// `base` and serves it with busybox httpd on `$PORT`.
pub fn docker_site(base: &str, version: &str, healthy: bool) -> Vec<(&'static str, String)> {
    let mut files = site(version, healthy);
    files.push((
        "Dockerfile",
        format!(
            "FROM {base}\nCOPY www /www\nCMD [\"/bin/sh\", \"-c\", \"exec httpd -f -p $PORT -h /www\"]\n"
        ),
    ));
    files
}

/// A Dockerfile that fails to build (for the broken-build case).
pub fn broken_docker_site(base: &str, version: &str) -> Vec<(&'static str, String)> {
    let mut files = site(version, true);
    files.push((
        "Dockerfile",
        format!(
            "FROM {base}\nCOPY www /www\nRUN [\"/bin/sh\", \"-c\", \"echo the {version} build breaks >&2; exit 3\"]\n"
        ),
    ));
    files
}

/// An app manifest following `main` of `source`, with the health check on `/healthz`.
pub fn app_manifest(name: &str, runtime: &str, replicas: u32, source: &AppSource) -> String {
    format!(
        "[app.{name}]\nplan = \"small\"\nruntime = \"{runtime}\"\nreplicas = {replicas}\n\
         health = {{ path = \"/healthz\", timeout = \"2s\" }}\n\n\
         [app.{name}.source]\nurl = \"{}\"\nbranch = \"main\"\n",
        source.url
    )
}

/// The `Host` an app answers to.
pub fn host(app: &str) -> String {
    format!("{app}.{BASE_DOMAIN}")
}

/// A running `cairn serve`: its URL and its database.
pub struct Plane {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub db: cairn_testkit::pg::TestDb,
}

impl Plane {
    /// Runs the `cairn` CLI against the database.
    pub fn cairn(&self, args: &[&str]) -> std::process::Output {
        cairn_db(self.db.url(), args)
    }

    fn join_token(&self, node: &str) -> String {
        join_token(self.db.url(), node)
    }

    /// A query's rows as JSON values.
    pub async fn rows(&self, sql: &str) -> Vec<Value> {
        rows(&self.db, sql).await
    }

    async fn node_online(&self, node: &str) -> Option<()> {
        let rows = self
            .rows(&format!(
                "SELECT state FROM node_status WHERE node = '{node}'"
            ))
            .await;
        (rows.first()?["state"] == "online").then_some(())
    }

    /// Waits until the applied config is generation `n` or later.
    pub async fn wait_generation(&self, n: i64) {
        wait_for(
            &format!("config generation {n}"),
            Duration::from_secs(30),
            || async {
                let r = self.rows("SELECT generation FROM config_state").await;
                (r.first()?["generation"].as_i64()? >= n).then_some(())
            },
        )
        .await;
    }

    /// The applied config generation.
    pub async fn generation(&self) -> i64 {
        self.rows("SELECT generation FROM config_state").await[0]["generation"]
            .as_i64()
            .unwrap()
    }

    /// Release `number` of `app` as a row (`status`, `error`, `source_commit`, `image`, `image_digest`,
    /// `stage_timings`), if it exists.
    pub async fn release(&self, app: &str, number: i64) -> Option<Value> {
        self.rows(&format!(
            "SELECT number, status, error, source_commit, image, image_digest, stage_timings \
             FROM releases WHERE app = '{app}' AND number = {number}"
        ))
        .await
        .into_iter()
        .next()
    }

    /// Waits until release `number` of `app` ends `live` or `failed` and returns its row. Panics with the
    /// row when it ends otherwise than `want`.
    pub async fn wait_release(&self, app: &str, number: i64, want: &str, limit: Duration) -> Value {
        let row = wait_for(
            &format!("release {number} of {app} to be {want}"),
            limit,
            || async {
                let r = self.release(app, number).await?;
                matches!(r["status"].as_str(), Some("live" | "failed")).then_some(r)
            },
        )
        .await;
        assert_eq!(row["status"], want, "release {number} of {app}: {row}");
        row
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The node proxy.
    pub proxy: SocketAddr,
    /// Its data directory (process-driver replicas run below it).
    pub dir: PathBuf,
    pub log: PathBuf,
    pub pid: u32,
}

impl Agent {
    /// SIGKILLs the agent (and its proxy): no chance to give anything back. Its replicas keep running.
    pub fn kill(&self) {
        crate::agents::support::kill(self.pid, rustix::process::Signal::KILL);
    }

    /// What the agent logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An HTTP client that keeps connections to a proxy alive, as browsers do.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .unwrap()
}

/// One GET of `path` through the proxy at `proxy` with `host` as the `Host` header: (status, body).
pub async fn get_with(
    client: &reqwest::Client,
    proxy: SocketAddr,
    host: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let resp = client
        .get(format!("http://{proxy}{path}"))
        .header(reqwest::header::HOST, host)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| format!("{e:?}"))?;
    Ok((status, body))
}

/// One GET through a proxy with a fresh client.
pub async fn get(proxy: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    get_with(&client(), proxy, host, path).await
}

/// Waits until `GET /` through `proxy` with `host` answers 200 with `body` (trimmed).
pub async fn wait_body(proxy: SocketAddr, host: &str, body: &str, limit: Duration) {
    let c = client();
    wait_for(
        &format!("{host} to answer {body} through {proxy}"),
        limit,
        || async {
            match get_with(&c, proxy, host, "/").await {
                Ok((200, b)) if b.trim() == body => Some(()),
                _ => None,
            }
        },
    )
    .await
}

pub use cairn_testkit::poll::{Poller, assert_steady, assert_switch};

/// A [`Poller`] of `GET /` through the proxy at `proxy` with `host` as the `Host` header, every `every`,
/// on one keep-alive connection.
pub fn poll(proxy: SocketAddr, host: &str, every: Duration) -> Poller {
    let (c, host) = (client(), host.to_owned());
    Poller::start(every, move || {
        let (c, host) = (c.clone(), host.clone());
        async move { get_with(&c, proxy, &host, "/").await }
    })
}

/// Prints how long each phase of a test took (`phase NAME: 1.2 s (total 3.4 s)`), so a slow run shows
/// where its time went.
#[derive(Debug)]
pub struct Clock {
    start: Instant,
    lap: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        let now = Instant::now();
        Clock {
            start: now,
            lap: now,
        }
    }

    pub fn lap(&mut self, phase: &str) -> Duration {
        let d = self.lap.elapsed();
        self.lap = Instant::now();
        eprintln!(
            "phase {phase}: {:.1} s (total {:.1} s)",
            d.as_secs_f64(),
            self.start.elapsed().as_secs_f64()
        );
        d
    }
}
