//! Agents at scale against one real `cairn serve` on a real PostgreSQL (a fresh database from the
//! testkit): N simulated agents (1,000 by default), each heartbeating every 30 s with one long-poll open
//! at all times, then the queue's dispatch latency, from the commit that enqueues a task to an agent
//! holding it (while the N agents stay connected).
//!
//! ```text
//! cargo bench --bench agents                                  # 1,000 agents, 60 s measured, 300 dispatches
//! cargo bench --bench agents -- --agents 10000 --measure 90s  # not for CI
//! BENCH_SERVE_LOG=debug cargo bench --bench agents            # serve's log kept in /tmp/cairn-bench-serve.log
//! cargo bench --bench agents -- --http1                       # HTTP/1.1 instead of HTTP/2 (h2c)
//! cargo bench --bench agents -- --warm 90s                    # a longer warm-up than 35 s
//! BENCH_SERVE_ENV='MALLOC_ARENA_MAX=2' cargo bench --bench agents  # serve's environment (KEY=VALUE ...)
//! ```
//!
//! Each simulated agent is what a real one does on the wire, over HTTP/2 by prior knowledge on its own
//! connection as the agent speaks to a plain-http serve (with `--http1`, HTTP/1.1 from one shared pool:
//! two connections per agent, the long-poll's and the heartbeat's): it joins with its own one-time token, long-
//! polls with a 30 s wait, completes every task it gets (the config has one app replica per node, so each
//! starts with one deploy), and heartbeats every 30 s (first ones spread over the first 30 s) reporting
//! the replica it runs. The open-file limit is raised to its hard limit first, as a deployment would.
//! Reported: the serve process's CPU (user + system over the measured window) and memory (RSS now and
//! peak), heartbeat latency seen by the agents (p50, p99, max), and dispatch latency (p50, p99, max).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_reconciler::queue::{self, NewTask, TaskKind};
use cairn_schema::Name;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

struct Args {
    agents: usize,
    /// Each agent over HTTP/1.1 (the long-poll and the heartbeats on two connections, from one shared
    /// pool) instead of HTTP/2 (its own client, one multiplexed connection), the agent's default.
    http1: bool,
    /// How long the agents run before the window (their first heartbeats, long-polls and deploys).
    warm: Duration,
    measure: Duration,
    dispatches: usize,
}

fn args() -> Args {
    let mut a = Args {
        agents: 1000,
        http1: false,
        warm: Duration::from_secs(35),
        measure: Duration::from_secs(60),
        dispatches: 300,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--agents" => a.agents = it.next().and_then(|v| v.parse().ok()).expect("--agents N"),
            "--http1" => a.http1 = true,
            "--warm" => {
                a.warm = it
                    .next()
                    .and_then(|v| humantime::parse_duration(&v).ok())
                    .expect("--warm DURATION")
            }
            "--measure" => {
                a.measure = it
                    .next()
                    .and_then(|v| humantime::parse_duration(&v).ok())
                    .expect("--measure DURATION")
            }
            "--dispatch" => {
                a.dispatches = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--dispatch N")
            }
            _ => {} // `cargo bench` passes --bench
        }
    }
    a
}

fn main() {
    let args = args();
    raise_nofile();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(args));
}

/// As a deployment would: the soft open-file limit up to the hard one (serve inherits it).
fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    if let Err(e) = setrlimit(Resource::Nofile, l) {
        eprintln!("cannot raise the open-file limit: {e}");
    }
    eprintln!("open-file limit: {:?}", getrlimit(Resource::Nofile).current);
}

fn node(i: usize) -> String {
    format!("n{i:05}")
}

async fn run(args: Args) {
    let db = cairn_testkit::pg::TestDb::new()
        .await
        .expect("the benchmark needs PostgreSQL (see testkit/src/pg.rs)");
    // A git source, as in production (a directory source is watched for file events, and a reconcile's
    // own reads would count as such).
    let repo = tempfile::tempdir().unwrap();
    let bare = tempfile::tempdir().unwrap();
    write_config(repo.path(), args.agents);
    git(repo.path(), &["init", "-q"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "config"]);
    git(bare.path(), &["init", "-q", "--bare"]);
    git(
        repo.path(),
        &["push", "-q", bare.path().to_str().unwrap(), "HEAD:main"],
    );
    let cache = tempfile::tempdir().unwrap();

    let log = tempfile::NamedTempFile::new().unwrap();
    let serve = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("serve")
        .args(["--database-url", db.url()])
        .args([
            "--repo",
            &format!("file://{}", bare.path().display()),
            "--ref",
            "main",
        ])
        .arg("--cache-dir")
        .arg(cache.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-poll-heads",
            "--interval",
            "1h",
            "--heartbeat-interval",
            "30s",
            "--join-rate-limit",
            "100000",
            // The dispatch agent makes two calls per task, 40 a second: above the default per-node limit
            // (20/s), which would measure the limiter instead of the queue.
            "--agent-rate-limit",
            "1000",
        ])
        // More of serve's flags, e.g. `BENCH_SERVE_ARGS='--http-header-timeout 30s'` to compare settings.
        .args(
            std::env::var("BENCH_SERVE_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env(
            "CAIRN_LOG",
            std::env::var("BENCH_SERVE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        // Serve's own environment, e.g. `BENCH_SERVE_ENV='MALLOC_ARENA_MAX=2'`, or a heap profiler's
        // preload (heaptrack's `LD_PRELOAD=.../libheaptrack_preload.so DUMP_HEAPTRACK_OUTPUT=FILE`),
        // which then profiles serve alone.
        .envs(
            std::env::var("BENCH_SERVE_ENV")
                .unwrap_or_default()
                .split_whitespace()
                .map(|kv| {
                    kv.split_once('=')
                        .expect("BENCH_SERVE_ENV is KEY=VALUE pairs")
                }),
        )
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("cairn serve starts");
    // Killed however the benchmark ends (a timed-out dispatch panics): a serve left behind would load
    // the next run's machine.
    let mut serve = KillOnDrop(serve);
    let pid = serve.0.id();
    let url = {
        use std::io::BufRead as _;
        let out = serve.0.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(out).lines();
        let first = lines.next().unwrap().unwrap();
        std::thread::spawn(move || for _ in lines {});
        format!("http://{}", first.strip_prefix("listening on ").unwrap())
    };
    let pool = db.pool().clone();
    let t = Instant::now();
    loop {
        let g: i64 = sqlx::query_scalar("SELECT generation FROM config_state")
            .fetch_one(&pool)
            .await
            .unwrap();
        if g >= 1 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the config was never applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "applied {} nodes and {} apps in {:?}",
        args.agents + 1,
        args.agents,
        t.elapsed()
    );

    let mut tokens = Vec::with_capacity(args.agents + 1);
    for i in 0..=args.agents {
        let n = Name::new(&node(i)).unwrap();
        let t = cairn_reconciler::api::auth::issue_join_token(
            &pool,
            &n,
            Duration::from_secs(3600),
            false,
        )
        .await
        .unwrap();
        tokens.push(t.token);
    }
    // The agent's own pool setting (`agent/src/client.rs`): idle connections are dropped after 60 s,
    // before serve's 75 s idle timeout closes them.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    // Each agent's client, made before anyone joins: made while the loops start, the last agents'
    // first heartbeats came so late that liveness marked them offline and back in the window.
    let t = Instant::now();
    let mut clients = (0..args.agents)
        .map(|_| {
            if args.http1 {
                http.clone()
            } else {
                // As the agent's client (`agent/src/client.rs`) against a plain-http control plane that
                // answers h2c: its own connection, every call multiplexed on it.
                reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .pool_idle_timeout(Duration::from_secs(60))
                    .build()
                    .unwrap()
            }
        })
        .collect::<Vec<_>>()
        .into_iter();
    eprintln!("{} clients made in {:?}", args.agents, t.elapsed());

    // Join everyone (64 at a time), then start their loops.
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joins = Vec::new();
    for token in &tokens[..args.agents] {
        let (http, url, token, sem) = (http.clone(), url.clone(), token.clone(), sem.clone());
        joins.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            join(&http, &url, &token).await
        }));
    }
    let mut credentials = Vec::new();
    for j in joins {
        credentials.push(j.await.unwrap());
    }
    eprintln!("{} agents joined in {:?}", credentials.len(), t.elapsed());

    let measuring = Arc::new(AtomicBool::new(false));
    let heartbeats: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
    let errors: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let leases: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    for (i, credential) in credentials.into_iter().enumerate() {
        let sim = Arc::new(Sim {
            http: clients.next().unwrap(),
            url: url.clone(),
            credential,
            running: Mutex::new(Vec::new()),
            measuring: measuring.clone(),
            heartbeats: heartbeats.clone(),
            errors: errors.clone(),
            leases: leases.clone(),
        });
        let offset = Duration::from_millis((i as u64 * 30_000) / args.agents as u64);
        tokio::spawn(sim.clone().heartbeat_loop(offset));
        // Its first long-poll at its first heartbeat's offset too: agents that joined over 30 s, not
        // 10,000 connections opened in the same instant.
        tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            sim.lease_loop().await
        });
    }

    // Warm up: every agent's first heartbeat, first long-poll and first deploy.
    tokio::time::sleep(args.warm).await;
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'done'")
        .fetch_one(&pool)
        .await
        .unwrap();
    eprintln!(
        "warm: {done} deploy tasks done; measuring for {:?} from {}",
        args.measure,
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
    measuring.store(true, Ordering::SeqCst);
    let tcp0 = tcp_counters();
    let (cpu0, t0) = (cpu_ticks(pid), Instant::now());
    // Beside the agents, every 100 ms: a durable commit on the same PostgreSQL and serve's `/healthz`
    // (which reads nothing), so a slow heartbeat can be told apart: the database's commits stalled, serve
    // stalled, or neither.
    let probes = tokio::spawn(probe(pool.clone(), format!("{url}/healthz"), args.measure));
    tokio::time::sleep(args.measure).await;
    let (commits, healthz) = probes.await.unwrap();
    for (what, slow) in [("durable commit", commits), ("GET /healthz", healthz)] {
        eprintln!(
            "probe {what}: {} over 100 ms, at (s into the window, ms) {slow:?}",
            slow.len()
        );
    }
    let (cpu1, secs) = (cpu_ticks(pid), t0.elapsed().as_secs_f64());
    measuring.store(false, Ordering::SeqCst);
    let tcp1 = tcp_counters();
    let (rss, hwm) = memory(pid);
    // Serve's open descriptors now (nearly all of them connections), and whether its listener reached
    // its connection cap (new connections then wait in the listen queue, and overflow it).
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let capped = std::fs::read_to_string(log.path())
        .unwrap_or_default()
        .matches("at its connection cap")
        .count();
    eprintln!(
        "serve: {fds} open descriptors at the window's end; connection-cap warnings (one a minute at most): {capped}"
    );
    let timed = heartbeats.lock().await.clone();
    let mut hb: Vec<Duration> = timed.iter().map(|(_, d)| *d).collect();
    hb.sort();
    // When the slow ones started (seconds into the window) and how slow they were: a stall shows as a
    // cluster, a queue as a ramp.
    let slow = pct(&hb, 99.0).max(Duration::from_millis(50));
    let mut by_second: BTreeMap<u64, (usize, Duration, Duration)> = BTreeMap::new();
    for (at, d) in &timed {
        if *d >= slow {
            let e = by_second
                .entry(at.saturating_duration_since(t0).as_secs())
                .or_insert((0, Duration::MAX, Duration::ZERO));
            e.0 += 1;
            e.1 = e.1.min(*d);
            e.2 = e.2.max(*d);
        }
    }
    let mut answered: BTreeMap<u64, usize> = BTreeMap::new();
    for at in leases.lock().unwrap().iter() {
        *answered
            .entry(at.saturating_duration_since(t0).as_secs())
            .or_default() += 1;
    }
    eprintln!("long-polls answered per second of the window: {answered:?}");
    for (s, (n, lo, hi)) in &by_second {
        eprintln!(
            "slow heartbeats started at {s} s: {n} ({:.0}-{:.0} ms)",
            ms(*lo),
            ms(*hi)
        );
    }
    for (k, v) in &tcp1 {
        let d = v - tcp0.get(k).copied().unwrap_or(0);
        if d != 0 {
            eprintln!("TCP {k}: +{d} during the window");
        }
    }
    let hz = clock_ticks();
    println!(
        "| {} agents, {} | heartbeats in {:.0} s: {} | heartbeat p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | serve CPU {:.1}% of one core | RSS {} MiB (peak {} MiB) |",
        args.agents,
        if args.http1 { "HTTP/1.1" } else { "HTTP/2" },
        secs,
        hb.len(),
        ms(pct(&hb, 50.0)),
        ms(pct(&hb, 99.0)),
        ms(hb.last().copied().unwrap_or_default()),
        100.0 * (cpu1 - cpu0) as f64 / hz / secs,
        rss / 1024,
        hwm / 1024,
    );

    // Dispatch: one more agent long-polls; each enqueue is timed from just before its commit to the
    // agent holding the task.
    let dispatch_credential = join(&http, &url, &tokens[args.agents]).await;
    let (got_tx, mut got_rx) = mpsc::unbounded_channel::<(i64, Instant)>();
    // Its own client, as a real agent has.
    tokio::spawn(dispatch_agent(
        reqwest::Client::new(),
        url.clone(),
        dispatch_credential,
        got_tx,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let target = Name::new(&node(args.agents)).unwrap();
    let app = Name::new("bench").unwrap();
    let mut lat = Vec::with_capacity(args.dispatches);
    let mut commits = Vec::with_capacity(args.dispatches);
    for i in 0..args.dispatches {
        let mut task = NewTask::new(
            target.clone(),
            TaskKind::Stop,
            app.clone(),
            format!("bench:{i}"),
        );
        task.slot = Some(1);
        let mut tx = pool.begin().await.unwrap();
        let id = queue::enqueue(&mut tx, &task).await.unwrap().unwrap();
        let t0 = Instant::now();
        tx.commit().await.unwrap();
        let committed = Instant::now();
        let (got, at) = tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
            .await
            .expect("the agent got the task within 10 s")
            .unwrap();
        assert_eq!(got, id.0);
        lat.push(at - t0);
        commits.push(committed - t0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lat.sort();
    commits.sort();
    println!(
        "| dispatch, {} tasks, {} agents connected | commit to held p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms | (of which the commit itself: p50 {:.2} ms, p99 {:.2} ms) |",
        lat.len(),
        args.agents + 1,
        ms(pct(&lat, 50.0)),
        ms(pct(&lat, 99.0)),
        ms(lat.last().copied().unwrap_or_default()),
        ms(pct(&commits, 50.0)),
        ms(pct(&commits, 99.0)),
    );
    let errors = errors.lock().await;
    if !errors.is_empty() {
        println!("errors seen by agents: {errors:?}");
    }
    drop(serve);
    if std::env::var_os("BENCH_SERVE_LOG").is_some() {
        let _ = std::fs::copy(log.path(), "/tmp/cairn-bench-serve.log");
    }
}

use cairn_testkit::git;

/// Times a durable commit and a `GET healthz` every 100 ms for `window`; returns those over 100 ms,
/// as (seconds into the window, milliseconds taken).
async fn probe(
    pool: sqlx::PgPool,
    healthz: String,
    window: Duration,
) -> (Vec<(u64, u64)>, Vec<(u64, u64)>) {
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_probe (id int PRIMARY KEY, at timestamptz)")
        .execute(&pool)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let (mut commits, mut gets) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while start.elapsed() < window {
        let t = Instant::now();
        sqlx::query(
            "INSERT INTO bench_probe VALUES (1, now()) ON CONFLICT (id) DO UPDATE SET at = now()",
        )
        .execute(&pool)
        .await
        .unwrap();
        let d = t.elapsed();
        if d > Duration::from_millis(100) {
            commits.push((t.duration_since(start).as_secs(), d.as_millis() as u64));
        }
        let t = Instant::now();
        let _ = http.get(&healthz).send().await;
        let d = t.elapsed();
        if d > Duration::from_millis(100) {
            gets.push((t.duration_since(start).as_secs(), d.as_millis() as u64));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (commits, gets)
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &Path, n: usize) {
    std::fs::write(dir.join("cairn.toml"), "base_domain = \"bench.test\"\n").unwrap();
    std::fs::write(
        dir.join("base.toml"),
        "[plan.small]\ncpu = 0.25\nmemory = \"256MiB\"\ndisk = \"1GiB\"\nprice = \"5.00\"\nmax_replicas = 4\n\n\
         [runtime.web]\ndrivers = [\"docker\", \"process\"]\nimage = \"debian:12\"\nstart = \"./serve\"\nport = 8080\n",
    )
    .unwrap();
    let mut nodes = String::new();
    let mut apps = String::new();
    for i in 0..=n {
        // The last node is the dispatch benchmark's: draining, so the scheduler places nothing there.
        nodes.push_str(&format!(
            "[node.{}]\ncpu = 4\nmemory = \"8GiB\"\ndisk = \"100GiB\"\ndrain = {}\n\n",
            node(i),
            i == n
        ));
    }
    for i in 0..n {
        apps.push_str(&format!(
            "[app.a{i:05}]\nplan = \"small\"\nruntime = \"web\"\nreplicas = 1\n\n[app.a{i:05}.source]\n\
             url = \"https://example.com/acme/a{i:05}.git\"\nrev = \"0123456789abcdef0123456789abcdef01234567\"\n\n"
        ));
    }
    std::fs::write(dir.join("nodes.toml"), nodes).unwrap();
    std::fs::write(dir.join("apps.toml"), apps).unwrap();
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    credential: Option<&str>,
    body: &Value,
) -> reqwest::Result<(u16, Value)> {
    let mut req = http.post(url).json(body).timeout(Duration::from_secs(60));
    if let Some(c) = credential {
        req = req.bearer_auth(c);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

async fn join(http: &reqwest::Client, url: &str, token: &str) -> String {
    let id = cairn_schema::Identity::generate();
    let body = json!({"token": token, "recipient": id.recipient(), "drivers": ["docker"], "agent_version": "bench"});
    let (s, r) = post(http, &format!("{url}/agent/v1/join"), None, &body)
        .await
        .unwrap();
    assert_eq!(s, 200, "{r}");
    r["credential"].as_str().unwrap().to_owned()
}

/// A replica a simulated agent runs: `(app, slot, release, generation)`.
type Running = (String, u64, u64, Option<u64>);

struct Sim {
    http: reqwest::Client,
    url: String,
    credential: String,
    running: Mutex<Vec<Running>>,
    measuring: Arc<AtomicBool>,
    heartbeats: Arc<Mutex<Vec<(Instant, Duration)>>>,
    /// When each long-poll was answered, in the window.
    leases: Arc<std::sync::Mutex<Vec<Instant>>>,
    errors: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Sim {
    async fn error(&self, what: String) {
        *self.errors.lock().await.entry(what).or_default() += 1;
    }

    async fn heartbeat_loop(self: Arc<Self>, offset: Duration) {
        tokio::time::sleep(offset).await;
        let mut every = tokio::time::interval(Duration::from_secs(30));
        loop {
            every.tick().await;
            let replicas: Vec<Value> = self
                .running
                .lock()
                .await
                .iter()
                .map(|(app, slot, release, generation)| {
                    json!({"app": app, "slot": slot, "release": release, "generation": generation,
                           "state": "running", "healthy": true})
                })
                .collect();
            let body = json!({"agent_version": "bench", "drivers": ["docker"],
                              "resources": {"cpu_millis": 250, "memory_bytes": 268435456, "disk_bytes": 0},
                              "replicas": replicas});
            let t = Instant::now();
            match post(
                &self.http,
                &format!("{}/agent/v1/heartbeat", self.url),
                Some(&self.credential),
                &body,
            )
            .await
            {
                Ok((200, _)) => {
                    if self.measuring.load(Ordering::SeqCst) {
                        self.heartbeats.lock().await.push((t, t.elapsed()));
                    }
                }
                Ok((s, _)) => self.error(format!("heartbeat {s}")).await,
                Err(e) => self.error(format!("heartbeat: {e}")).await,
            }
        }
    }

    async fn lease_loop(self: Arc<Self>) {
        loop {
            let body = json!({"max": 4, "wait_ms": 30000});
            match post(
                &self.http,
                &format!("{}/agent/v1/lease", self.url),
                Some(&self.credential),
                &body,
            )
            .await
            {
                Ok((200, r)) => {
                    if self.measuring.load(Ordering::SeqCst) {
                        self.leases.lock().unwrap().push(Instant::now());
                    }
                    for t in r["tasks"].as_array().cloned().unwrap_or_default() {
                        let id = t["id"].as_i64().unwrap();
                        if t["kind"] == "deploy" {
                            self.running.lock().await.push((
                                t["app"].as_str().unwrap().to_owned(),
                                t["slot"].as_u64().unwrap(),
                                t["release"].as_u64().unwrap(),
                                t["generation"].as_u64(),
                            ));
                        }
                        let result = json!({"token": t["token"], "outcome": "done"});
                        if let Err(e) = post(
                            &self.http,
                            &format!("{}/agent/v1/tasks/{id}/result", self.url),
                            Some(&self.credential),
                            &result,
                        )
                        .await
                        {
                            self.error(format!("result: {e}")).await;
                        }
                    }
                }
                Ok((s, _)) => {
                    self.error(format!("lease {s}")).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    self.error(format!("lease: {e}")).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

async fn dispatch_agent(
    http: reqwest::Client,
    url: String,
    credential: String,
    got: mpsc::UnboundedSender<(i64, Instant)>,
) {
    loop {
        let body = json!({"max": 1, "wait_ms": 30000});
        let r = match post(
            &http,
            &format!("{url}/agent/v1/lease"),
            Some(&credential),
            &body,
        )
        .await
        {
            Ok((200, r)) => r,
            // Serve is gone (the benchmark is over); a refusal would show as a timeout in the loop.
            Err(_) => return,
            Ok(other) => panic!("the dispatch agent's lease was refused: {other:?}"),
        };
        for t in r["tasks"].as_array().cloned().unwrap_or_default() {
            let at = Instant::now();
            let id = t["id"].as_i64().unwrap();
            let _ = got.send((id, at));
            let result = json!({"token": t["token"], "outcome": "done"});
            let _ = post(
                &http,
                &format!("{url}/agent/v1/tasks/{id}/result"),
                Some(&credential),
                &result,
            )
            .await;
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted from after the command name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0)
}

/// The machine's TCP counters of interest (`/proc/net/snmp` and `/proc/net/netstat`): connections
/// opened, and SYNs or handshakes dropped because a listen queue was full.
fn tcp_counters() -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (prefix, names) = names.split_once(':').unwrap_or(("", names));
            let values = values.split_once(':').map_or(*values, |(_, v)| v);
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if matches!(
                    n,
                    "ActiveOpens"
                        | "PassiveOpens"
                        | "ListenOverflows"
                        | "ListenDrops"
                        | "TCPTimeouts"
                        | "RetransSegs"
                        | "TCPSynRetrans"
                        | "EstabResets"
                ) {
                    out.insert(format!("{prefix}.{n}"), v.parse().unwrap_or(0));
                }
            }
        }
    }
    out
}

/// (VmRSS, VmHWM) in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let get = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}
