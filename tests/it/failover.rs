//! Database failover with pg_auto_failover run locally: a monitor and two PostgreSQL nodes on loopback
//! ports under a temp dir (as the `postgres` account when root), `cairn serve` given both hosts in one
//! URL, an agent with the recording driver, and commits to the config repository applied in a loop.
//! The formation is switched over by command (`pg_autoctl perform switchover`), then the new primary is
//! killed (SIGKILL of its `pg_autoctl` and `postgres`): each time the control plane applies on the new
//! primary within 30 s without a restart, no apply it committed is lost, `/readyz` is false only in the
//! gap, and the agent keeps heartbeating and leasing.
//!
//! The monitor's health checks are shortened (`pgautofailover.*` settings) so a failover takes seconds.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_pgdev::Account;
use cairn_schema::Identity;
use cairn_testkit::skip;
use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tempfile::TempDir;

use crate::agents::support::{CAIRN, Repo, agent_bin, join_token, start_listening, wait_for};

/// The password in serve's URL: it must appear in no log line and no metric.
const PASSWORD: &str = "canary-pg-failover-pw";

/// How long the control plane may take to apply on a new primary.
const RECOVERY: Duration = Duration::from_secs(30);

/// A monitor and two nodes, each `pg_autoctl` in a process group of its own.
struct Formation {
    dir: TempDir,
    bin: PathBuf,
    run_as: Option<Account>,
    monitor: u16,
    nodes: [u16; 2],
    /// Process groups: the monitor's, then each node's (`None` once killed).
    groups: Mutex<Vec<Option<Child>>>,
}

impl Formation {
    /// What the test needs, or why it cannot run here.
    fn prerequisites() -> Result<(PathBuf, Option<Account>), String> {
        let bin = cairn_pgdev::find_bindir(None).map_err(|e| e.to_string())?;
        let major = cairn_pgdev::major_version(&bin).map_err(|e| e.to_string())?;
        let ext = format!("/usr/share/postgresql/{major}/extension/pgautofailover.control");
        if !Path::new(&ext).is_file() {
            return Err(format!(
                "{ext} is missing (Debian: postgresql-{major}-auto-failover)"
            ));
        }
        if Command::new("pg_autoctl")
            .arg("--version")
            .output()
            .is_err()
        {
            return Err("pg_autoctl is not on PATH (Debian: pg-auto-failover-cli)".to_owned());
        }
        let run_as = cairn_pgdev::server_account().map_err(|e| e.to_string())?;
        Ok((bin, run_as))
    }

    fn new(bin: PathBuf, run_as: Option<Account>) -> Formation {
        let dir = tempfile::tempdir().unwrap();
        if let Some(a) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(a.uid), Some(a.gid)).unwrap();
        }
        let port = || cairn_pgdev::free_port().unwrap();
        Formation {
            dir,
            bin,
            run_as,
            monitor: port(),
            nodes: [port(), port()],
            groups: Mutex::new(Vec::new()),
        }
    }

    /// `pg_autoctl ARGS` as the server account, with its configuration under the temp dir.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match self.run_as {
            Some(_) => {
                let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
                    .into_iter()
                    .find(|p| Path::new(p).is_file())
                    .expect("runuser (pgdev checked it)");
                let mut c = Command::new(runuser);
                c.args(["-u", "postgres", "--", "pg_autoctl"]);
                c
            }
            None => Command::new("pg_autoctl"),
        };
        let d = self.dir.path();
        cmd.args(args)
            .current_dir(d)
            .env("PATH", format!("{}:/usr/bin:/bin", self.bin.display()))
            .env("XDG_CONFIG_HOME", d.join("config"))
            .env("XDG_DATA_HOME", d.join("data"))
            .env_remove("PGDATA");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("pg_autoctl runs");
        assert!(
            out.status.success(),
            "pg_autoctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts `pg_autoctl ARGS` in a process group of its own, logging to `<name>.log`.
    fn spawn(&self, name: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("pg_autoctl starts");
        self.groups.lock().unwrap().push(Some(child));
    }

    fn pgdata(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn pgctl(&self) -> String {
        self.bin.join("pg_ctl").display().to_string()
    }

    fn monitor_uri(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=disable",
            self.monitor
        )
    }

    /// The monitor, with health checks every second and a node unhealthy after two.
    async fn start_monitor(&self) {
        let create = self.create("monitor", "monitor", self.monitor, &[]);
        self.run(&create.iter().map(String::as_str).collect::<Vec<_>>());
        let pgdata = self.pgdata("monitor");
        self.spawn("monitor", &["run", "--pgdata", &pgdata]);
        let mut c = connect_when_up(self.monitor, "postgres", "pg_auto_failover").await;
        for (name, value) in [
            ("health_check_period", "1000"),
            ("health_check_timeout", "1000"),
            ("health_check_max_retries", "1"),
            ("health_check_retry_delay", "500"),
            ("node_considered_unhealthy_timeout", "2000"),
            ("startup_grace_period", "1000"),
            ("primary_demote_timeout", "5000"),
        ] {
            exec(
                &mut c,
                &format!("ALTER SYSTEM SET pgautofailover.{name} = {value}"),
            )
            .await;
        }
        exec(&mut c, "SELECT pg_reload_conf()").await;
    }

    /// Node `i` (0 or 1), started and left running.
    fn start_node(&self, i: usize) {
        let name = format!("node{i}");
        let monitor = self.monitor_uri();
        let create = self.create(
            "postgres",
            &name,
            self.nodes[i],
            &["--monitor", &monitor, "--run"],
        );
        self.spawn(
            &name,
            &create.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }

    /// `pg_autoctl create KIND` for a server in `<dir>/NAME` on loopback `port`, trusting loopback.
    fn create(&self, kind: &str, name: &str, port: u16, extra: &[&str]) -> Vec<String> {
        let (pgdata, pgctl, port) = (self.pgdata(name), self.pgctl(), port.to_string());
        let common = [
            "create",
            kind,
            "--pgdata",
            &pgdata,
            "--pgctl",
            &pgctl,
            "--pgport",
            &port,
            "--hostname",
            "127.0.0.1",
            "--listen",
            "127.0.0.1",
            "--auth",
            "trust",
            "--no-ssl",
        ];
        common
            .iter()
            .chain(extra)
            .map(|a| (*a).to_owned())
            .collect()
    }

    /// `(port, reported state, goal state)` of each node, as the monitor has them.
    async fn states(&self) -> Vec<(u16, String, String)> {
        let Ok(mut c) = connect(self.monitor, "postgres", "pg_auto_failover").await else {
            return Vec::new();
        };
        let rows: Vec<(i32, String, String)> = sqlx::query_as(
            "SELECT nodeport, reportedstate::text, goalstate::text FROM pgautofailover.node \
             ORDER BY nodeid",
        )
        .fetch_all(&mut c)
        .await
        .unwrap_or_default();
        rows.into_iter()
            .map(|(p, r, g)| (u16::try_from(p).unwrap(), r, g))
            .collect()
    }

    /// Waits until `primary` is the primary and the other node its secondary, both settled.
    async fn wait_settled(&self, primary: u16, limit: Duration) {
        let want_secondary = self.other(primary);
        wait_for(
            &format!("node {primary} primary and {want_secondary} secondary"),
            limit,
            || async {
                let s = self.states().await;
                let has = |port: u16, state: &str| {
                    s.iter()
                        .any(|(p, r, g)| *p == port && r == state && g == state)
                };
                (has(primary, "primary") && has(want_secondary, "secondary")).then_some(())
            },
        )
        .await;
    }

    fn other(&self, port: u16) -> u16 {
        if port == self.nodes[0] {
            self.nodes[1]
        } else {
            self.nodes[0]
        }
    }

    /// SIGKILL to the whole node (its `pg_autoctl` keeper and its `postgres`).
    fn kill_node(&self, port: u16) {
        let i = self.nodes.iter().position(|p| *p == port).unwrap();
        let mut groups = self.groups.lock().unwrap();
        let child = groups[i + 1].take().expect("the node runs");
        kill_group(child);
    }
}

impl Drop for Formation {
    fn drop(&mut self) {
        for child in self.groups.lock().unwrap().drain(..).flatten() {
            kill_group(child);
        }
    }
}

fn kill_group(mut child: Child) {
    let pid = rustix::process::Pid::from_child(&child);
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    let _ = child.wait();
}

fn options(port: u16, user: &str, db: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username(user)
        .database(db)
        .disable_statement_logging()
}

async fn connect(port: u16, user: &str, db: &str) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(Duration::from_secs(2), options(port, user, db).connect()).await {
        Ok(r) => r,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

async fn connect_when_up(port: u16, user: &str, db: &str) -> PgConnection {
    wait_for(
        &format!("PostgreSQL on port {port}"),
        Duration::from_secs(30),
        || async { connect(port, user, db).await.ok() },
    )
    .await
}

/// The node that takes writes, and a connection to its `cairn` database (found without the code under
/// test: each host asked directly).
async fn writable(f: &Formation) -> Option<(u16, PgConnection)> {
    for port in f.nodes {
        let Ok(mut c) = connect(port, "cairn", "cairn").await else {
            continue;
        };
        let w: Result<bool, _> = sqlx::query_scalar(
            "SELECT NOT (pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on')",
        )
        .fetch_one(&mut c)
        .await;
        if w.unwrap_or(false) {
            return Some((port, c));
        }
    }
    None
}

/// `/readyz` every 100 ms: when, and whether it said ready.
type Probes = Arc<Mutex<Vec<(Instant, bool)>>>;

fn watch_ready(url: String) -> (Probes, tokio::task::JoinHandle<()>) {
    let probes: Probes = Arc::default();
    let task = tokio::spawn({
        let probes = probes.clone();
        async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            loop {
                let ok = match http.get(format!("{url}/readyz")).send().await {
                    Ok(r) => r.status() == 200,
                    Err(_) => false,
                };
                probes.lock().unwrap().push((Instant::now(), ok));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    (probes, task)
}

/// A child process killed when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One apply: the app's env changes (a new release, a deploy task for the agent).
struct Applied {
    generation: i64,
    commit: String,
    port: u16,
    at: Instant,
}

/// Commits change `n` and waits until the control plane applied it on a writable node.
async fn apply(f: &Formation, repo: &Repo, n: u32, limit: Duration) -> Applied {
    repo.app("web", 1, &format!("N = \"{n}\"\n"));
    repo.commit();
    wait_applied(f, repo, limit).await
}

/// Waits until the control plane applied the repository's head on a writable node.
async fn wait_applied(f: &Formation, repo: &Repo, limit: Duration) -> Applied {
    let head = repo.head();
    wait_for(&format!("commit {head} applied"), limit, || async {
        let (port, mut c) = writable(f).await?;
        let (generation, commit): (i64, Option<String>) =
            sqlx::query_as("SELECT generation, commit FROM config_state")
                .fetch_one(&mut c)
                .await
                .ok()?;
        (commit.as_deref() == Some(head.as_str())).then(|| Applied {
            generation,
            commit: head.clone(),
            port,
            at: Instant::now(),
        })
    })
    .await
}

/// Waits until the agent reports the app's current release running and heartbeats after `since` (the
/// database's clock).
async fn wait_agent_current(f: &Formation, limit: Duration) {
    let since: chrono::DateTime<chrono::Utc> = {
        let (_, mut c) = writable(f).await.expect("a primary");
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    wait_for(
        "the agent to heartbeat and run the current release",
        limit,
        || async {
            let (_, mut c) = writable(f).await?;
            let ok: bool = sqlx::query_scalar(
                "SELECT s.last_heartbeat > $1 AND EXISTS (SELECT 1 FROM jsonb_array_elements(s.replicas) r \
                 WHERE r->>'app' = p.app AND (r->>'slot')::int = p.slot \
                 AND (r->>'release')::bigint = p.release AND r->>'state' = 'running') \
                 FROM placements p JOIN node_status s ON s.node = p.node WHERE p.app = 'web'",
            )
            .bind(since)
            .fetch_one(&mut c)
            .await
            .ok()?;
            ok.then_some(())
        },
    )
    .await;
}

/// Serve's `/metrics`, `None` when it does not answer.
async fn metrics(url: &str) -> Option<String> {
    reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// Runs one statement, which must succeed.
async fn exec(c: &mut PgConnection, sql: &str) {
    sqlx::query(sql).execute(c).await.unwrap();
}

/// `/metrics` says `port` is the primary in use.
async fn metrics_primary(url: &str, port: u16) -> bool {
    let Some(text) = metrics(url).await else {
        return false;
    };
    assert!(!text.contains(PASSWORD), "the password is in /metrics");
    text.contains(&format!(
        "cairn_database_primary{{host=\"127.0.0.1:{port}\"}} 1"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_follows_the_primary_through_a_switchover_and_a_killed_primary() {
    let test = skip::current_test();
    let (bin, run_as) = match Formation::prerequisites() {
        Ok(v) => v,
        Err(why) => return skip::missing(&test, "pg_auto_failover", why),
    };
    let started = Instant::now();
    let f = Formation::new(bin, run_as);
    f.start_monitor().await;
    let [a, b] = f.nodes;
    f.start_node(0);
    wait_for(
        "the first node registered",
        Duration::from_secs(30),
        || async { f.states().await.iter().any(|(p, ..)| *p == a).then_some(()) },
    )
    .await;
    f.start_node(1);
    // The standby's base backup waits for a checkpoint on the primary: ask for an immediate one.
    let checkpoints = tokio::spawn(async move {
        loop {
            if let Ok(mut c) = connect(a, "postgres", "postgres").await {
                let _ = sqlx::query("CHECKPOINT").execute(&mut c).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    f.wait_settled(a, Duration::from_secs(90)).await;
    checkpoints.abort();
    let mut c = connect(a, "postgres", "postgres").await.unwrap();
    exec(
        &mut c,
        &format!("CREATE ROLE cairn LOGIN PASSWORD '{PASSWORD}'"),
    )
    .await;
    exec(&mut c, "CREATE DATABASE cairn OWNER cairn").await;
    drop(c);
    eprintln!("formation ready after {:?}", started.elapsed());

    // serve, given both hosts in one URL.
    let url = format!("postgres://cairn:{PASSWORD}@127.0.0.1:{a},127.0.0.1:{b}/cairn");
    let identity = Identity::generate();
    let repo = Repo::new(identity.recipient().as_str());
    repo.node("a", "");
    repo.app("web", 1, "N = \"0\"\n");
    repo.commit();
    let scratch = tempfile::tempdir().unwrap();
    let key = scratch.path().join("control-plane.key");
    std::fs::write(&key, identity.to_file_text("test").as_bytes()).unwrap();
    let serve_log = scratch.path().join("serve.log");
    let mut cmd = Command::new(CAIRN);
    cmd.arg("serve")
        .args(["--repo", &repo.url(), "--ref", "main"])
        .arg("--identity")
        .arg(&key)
        .args(["--listen", "127.0.0.1:0", "--no-poll-heads", "--cache-dir"])
        .arg(scratch.path().join("cache"))
        .args(["--interval", "500ms", "--node-offline-after", "5s"])
        .args(["--heartbeat-interval", "300ms", "--task-lease", "3s"])
        .env("CAIRN_LOG", "debug")
        .env_remove("CAIRN_IDENTITY")
        // Through the environment, as an operator should: argv is readable by every local user.
        .env("DATABASE_URL", &url)
        .stderr(std::fs::File::create(&serve_log).unwrap());
    let (serve, addr) = start_listening(&mut cmd).await;
    let mut serve = Killed(serve);
    let http = format!("http://{addr}");
    let (probes, prober) = watch_ready(http.clone());

    wait_applied(&f, &repo, Duration::from_secs(30)).await;
    // The agent, joined with a token the CLI makes through the same multi-host URL.
    let token = join_token(&url, "a");
    let agent_dir = scratch.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let mut agent = Killed(
        Command::new(agent_bin())
            .args([
                "--server",
                &http,
                "--driver",
                "recording",
                "--concurrency",
                "2",
            ])
            .args(["--heartbeat", "300ms", "--data-dir"])
            .arg(&agent_dir)
            .env("CAIRN_AGENT_TEST_DRIVER", "1")
            .env("CAIRN_JOIN_TOKEN", &token)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );

    let mut applied = Vec::new();
    let mut n = 1;
    for _ in 0..2 {
        applied.push(apply(&f, &repo, n, Duration::from_secs(30)).await);
        n += 1;
    }
    assert!(applied.iter().all(|x| x.port == a));
    wait_agent_current(&f, Duration::from_secs(30)).await;
    assert!(
        metrics_primary(&http, a).await,
        "/metrics names {a} as primary"
    );

    // 1. A switchover by command: `b` becomes the primary, `a` its standby.
    let mut gaps = Vec::new();
    let t0 = Instant::now();
    let switchover = {
        let cmd = f.command(&["perform", "switchover", "--pgdata", &f.pgdata("monitor")]);
        tokio::task::spawn_blocking(move || {
            let mut cmd = cmd;
            cmd.output().unwrap()
        })
    };
    let first = apply(&f, &repo, n, RECOVERY).await;
    n += 1;
    let out = switchover.await.unwrap();
    assert!(
        out.status.success(),
        "switchover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(first.port, b, "applied on the new primary");
    eprintln!(
        "switchover: applied on the new primary after {:?}",
        first.at - t0
    );
    gaps.push((t0, first.at));
    applied.push(first);
    applied.push(apply(&f, &repo, n, Duration::from_secs(30)).await);
    n += 1;
    wait_agent_current(&f, Duration::from_secs(30)).await;
    f.wait_settled(b, Duration::from_secs(60)).await;

    // 2. The primary killed: `a` is promoted.
    let t1 = Instant::now();
    f.kill_node(b);
    let first = apply(&f, &repo, n, RECOVERY).await;
    n += 1;
    assert_eq!(first.port, a, "applied on the promoted standby");
    eprintln!("kill: applied on the new primary after {:?}", first.at - t1);
    gaps.push((t1, first.at));
    applied.push(first);
    applied.push(apply(&f, &repo, n, Duration::from_secs(30)).await);
    wait_agent_current(&f, Duration::from_secs(30)).await;
    wait_for(
        "/metrics to name the new primary",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            async move { metrics_primary(&http, a).await.then_some(()) }
        },
    )
    .await;
    let metrics = metrics(&http).await.unwrap();
    assert!(
        metrics.contains("cairn_database_failovers_total 2"),
        "two moves counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("database"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The last probes after recovery: ready.
    tokio::time::sleep(Duration::from_millis(500)).await;
    prober.abort();

    assert!(
        serve.0.try_wait().unwrap().is_none(),
        "serve did not restart or exit"
    );
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent runs");

    // No apply lost: every generation seen committed is in the last primary's history, with its commit.
    let (last, mut c) = writable(&f).await.expect("a primary");
    assert_eq!(last, a);
    let generation: i64 = sqlx::query_scalar("SELECT generation FROM config_state")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert!(generation >= applied.last().unwrap().generation);
    for x in &applied {
        let kept: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM reconciliations WHERE status = 'applied' \
             AND generation = $1 AND commit = $2)",
        )
        .bind(x.generation)
        .bind(&x.commit)
        .fetch_one(&mut c)
        .await
        .unwrap();
        assert!(kept, "generation {} ({}) was lost", x.generation, x.commit);
    }

    // /readyz: false only in the gaps (from the disruption to the first apply on the new primary, with
    // a probe's round of slack), and false at some point of the killed primary's gap.
    let probes = probes.lock().unwrap().clone();
    let slack = Duration::from_millis(1500);
    let ready_from = probes
        .iter()
        .position(|(_, ok)| *ok)
        .expect("/readyz said ready");
    for (at, ok) in &probes[ready_from..] {
        let in_gap = gaps
            .iter()
            .any(|(from, to)| *at >= *from && *at <= *to + slack);
        assert!(*ok || in_gap, "/readyz false outside a failover gap");
    }
    let (from, to) = gaps[1];
    assert!(
        probes
            .iter()
            .any(|(at, ok)| !*ok && *at >= from && *at <= to),
        "/readyz never said not ready while the primary was down"
    );
    assert!(probes.last().unwrap().1, "/readyz ready at the end");

    let log = std::fs::read_to_string(&serve_log).unwrap();
    let gap_probes = |(from, to): (Instant, Instant)| {
        probes
            .iter()
            .filter(|(at, ok)| !*ok && *at >= from && *at <= to)
            .count()
    };
    eprintln!(
        "not ready: {} probes in the switchover, {} in the kill",
        gap_probes(gaps[0]),
        gap_probes(gaps[1])
    );
    assert!(!log.contains(PASSWORD), "the password is in serve's log");
    assert!(
        log.contains("database primary"),
        "serve logs the primary it uses"
    );
    eprintln!("whole test: {:?}", started.elapsed());
}
