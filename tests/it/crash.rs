//! Crash safety of `cairn apply`: the real binary is killed with SIGKILL at random moments, some of them
//! inside its open apply transaction (held there by the `apply-before-commit` failpoint), across well over
//! a hundred runs. After every run the database holds exactly the old or the new commit (never a mix of
//! the two) and the tasks of exactly the generations that committed, each once.
//!
//! Each run applies whichever of two repository contents is not applied yet, so every run has work:
//! creates, changes, a delete and replica moves. The expected tasks of a run are what the planner says
//! for that transition (planned by the library against the same database just before the run).
//!
//! `CAIRN_CRASH_RUNS` changes the number of runs (default 120); `CAIRN_CRASH_SEED` replays a run's
//! random kill times (the seed is printed).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cairn_plan::observed::{AppliedApp, Fingerprints};
use cairn_reconciler::controller::{ConfigSource, Controller};
use cairn_reconciler::store::state;
use cairn_schema::{Desired, EnvValue, Identity};
use cairn_testkit::fixtures;
use sqlx::PgPool;

use crate::agents::support::{FAST, Plane, wait_for};
use crate::validate::root;

/// The whole test's bound, and one run's (a run that hangs fails instead of stalling the suite).
const TEST_BUDGET: Duration = Duration::from_secs(240);
const RUN_BOUND: Duration = Duration::from_secs(20);
/// How long the failpoint holds the transaction open before COMMIT, and the window after its message in
/// which the kill lands: the margin between them absorbs scheduling delays on a loaded machine, so a kill
/// meant for the open transaction never arrives after the COMMIT.
const FAILPOINT_MS: u64 = 800;
const KILL_WINDOW_MS: u64 = 400;
const HEAD: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// The demo identity's recipient (`examples/keys`).
const RECIPIENT: &str = "age169yga2phn8fzeqx5t4cqqvlamskqa5qyprap3l80j6u2lpz90c4qaxv56m";

fn infra() -> String {
    let mut s = format!("{}\n{}", fixtures::plan("small"), fixtures::node_runtime());
    for n in ["n1", "n2", "n3"] {
        s += &format!("\n{}", fixtures::node(n));
    }
    s
}

fn app(name: &str, replicas: u32, env: &str) -> String {
    format!(
        "[app.{name}]\nplan = \"small\"\nruntime = \"node\"\nreplicas = {replicas}\n\
         [app.{name}.source]\nurl = \"https://github.com/acme/{name}.git\"\n[app.{name}.env]\n{env}"
    )
}

/// The two repository contents, as `(path, text)`: they differ in a plain env value, a replica count,
/// an app only the first has and one only the second has.
fn versions(secret: &str) -> [Vec<(String, String)>; 2] {
    let common = || {
        vec![
            (
                "cairn.toml".to_owned(),
                fixtures::settings()
                    .currency("EUR")
                    .recipients(&[RECIPIENT])
                    .to_string(),
            ),
            ("infra.toml".to_owned(), infra()),
        ]
    };
    let mut one = common();
    one.push((
        "apps/web.toml".into(),
        app(
            "web",
            2,
            &format!("LOG_LEVEL = \"info\"\nDB_URL = {secret}\n"),
        ),
    ));
    one.push(("apps/api.toml".into(), app("api", 1, "MODE = \"a\"\n")));
    one.push(("apps/worker.toml".into(), app("worker", 1, "")));
    let mut two = common();
    two.push((
        "apps/web.toml".into(),
        app(
            "web",
            3,
            &format!("LOG_LEVEL = \"debug\"\nDB_URL = {secret}\n"),
        ),
    ));
    two.push(("apps/api.toml".into(), app("api", 1, "MODE = \"b\"\n")));
    two.push(("apps/cron.toml".into(), app("cron", 2, "")));
    [one, two]
}

/// Makes `dir` hold exactly `files`.
fn write_version(dir: &Path, files: &[(String, String)]) {
    let _ = std::fs::remove_dir_all(dir);
    for (path, text) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
}

/// A small deterministic generator (xorshift64*), so a failing run can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// One version as the control plane reads it: its commit id, desired state and secret fingerprints.
struct Known {
    commit: String,
    desired: Desired,
    fingerprints: Fingerprints,
}

async fn read_version(pool: &PgPool, dir: &Path, id: &Identity) -> Known {
    let c = Controller::new(pool.clone(), ConfigSource::Dir(dir.to_owned()), None);
    let (_, snap) = c.read().await.unwrap();
    let desired = snap
        .loaded
        .desired
        .clone()
        .unwrap_or_else(|| panic!("{}", snap.loaded.diagnostics));
    let mut fingerprints = Fingerprints::new();
    for (a, spec) in &desired.apps {
        for (k, v) in &spec.env {
            if let EnvValue::Secret { secret } = v {
                fingerprints.insert(
                    (a.clone(), k.clone()),
                    id.fingerprint(&id.decrypt(secret).unwrap()),
                );
            }
        }
    }
    Known {
        commit: snap.commit.clone().unwrap(),
        desired,
        fingerprints,
    }
}

/// `(kind, app, slot, node, release)` of a task: its work, whoever emitted it.
type Work = (String, String, i32, String, i64);

async fn task_work(pool: &PgPool, generation: i64) -> Vec<Work> {
    let mut rows: Vec<Work> = sqlx::query_as(
        "SELECT kind, app, slot, node, release FROM tasks WHERE generation = $1 ORDER BY id",
    )
    .bind(generation)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.sort();
    rows
}

async fn generation(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT generation FROM config_state")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The applied state is exactly one of the known versions: returns its index.
async fn assert_whole(pool: &PgPool, known: &[Known; 2], run: usize) -> Option<usize> {
    let o = state::load_observed(pool).await.unwrap();
    let Some(commit) = &o.applied_commit else {
        assert_eq!(o.generation, 0, "run {run}: a generation without a commit");
        assert!(
            o.apps.is_empty() && o.nodes.is_empty() && o.placements.is_empty(),
            "run {run}: resources without a commit"
        );
        return None;
    };
    let v = known
        .iter()
        .position(|k| k.commit == commit.as_str())
        .unwrap_or_else(|| panic!("run {run}: applied commit {commit} is neither version"));
    let k = &known[v];
    assert_eq!(o.plans, k.desired.plans, "run {run}: plans");
    assert_eq!(o.runtimes, k.desired.runtimes, "run {run}: runtimes");
    assert_eq!(o.nodes, k.desired.nodes, "run {run}: nodes");
    let apps: BTreeMap<_, _> = k
        .desired
        .apps
        .iter()
        .map(|(n, a)| {
            (
                n.clone(),
                AppliedApp::from_desired(n, a, &k.fingerprints).unwrap(),
            )
        })
        .collect();
    assert_eq!(o.apps, apps, "run {run}: apps of version {v}");
    for (name, a) in &k.desired.apps {
        let placed: Vec<_> = o.placements.iter().filter(|p| &p.app == name).collect();
        assert_eq!(
            placed.len(),
            a.replicas as usize,
            "run {run}: placements of {name}"
        );
        let latest = o.releases.get(name).map(|r| r.number);
        assert!(
            placed.iter().all(|p| Some(p.release) == latest),
            "run {run}: {name} runs its latest release"
        );
    }
    assert!(
        o.placements
            .iter()
            .all(|p| k.desired.apps.contains_key(&p.app)),
        "run {run}: a placement of an app of the other version"
    );
    Some(v)
}

/// How one run ended.
#[derive(Debug, Default)]
struct Tally {
    /// Killed while paused at the failpoint: inside the open transaction, after every write.
    killed_in_transaction: usize,
    /// Killed at a random moment without the failpoint.
    killed_elsewhere: usize,
    /// Exited by itself (the kill came too late).
    completed: usize,
    /// Runs whose apply committed (the generation moved).
    committed: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_apply_at_random_moments_leaves_the_old_or_the_new_commit_whole() {
    let db = cairn_testkit::test_db!();
    let started = Instant::now();
    let pool = db.pool();
    let runs: usize = std::env::var("CAIRN_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("CAIRN_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test: {runs} runs, CAIRN_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("config");
    let identity_file = root().join("examples/keys/demo-only-identity.txt");
    let id = Identity::parse(&std::fs::read_to_string(&identity_file).unwrap()).unwrap();
    let ct = cairn_schema::secret::encrypt(b"postgres://crash-test", &[id.recipient()]).unwrap();
    let secret = format!("{{ secret = \"\"\"\n{}\"\"\" }}", ct.as_str());
    let contents = versions(&secret);
    let mut known = Vec::new();
    for files in &contents {
        write_version(&dir, files);
        known.push(read_version(pool, &dir, &id).await);
    }
    let known: [Known; 2] = known.try_into().map_err(|_| ()).unwrap();
    assert_ne!(known[0].commit, known[1].commit);
    for k in &known {
        for (name, a) in &k.desired.apps {
            sqlx::query("INSERT INTO source_heads (app, branch, commit) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(name.as_str())
                .bind(&a.source.branch)
                .bind(HEAD)
                .execute(pool)
                .await
                .unwrap();
        }
    }

    let apply = |failpoint: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
        cmd.args(["apply", "--yes", "--database-url", db.url(), "--repo"])
            .arg(&dir)
            .arg("--identity")
            .arg(&identity_file)
            .env_remove("CAIRN_IDENTITY")
            .env_remove("DATABASE_URL")
            .env_remove("CAIRN_FAILPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if failpoint {
            cmd.env(
                "CAIRN_FAILPOINT",
                format!("apply-before-commit:{FAILPOINT_MS}"),
            );
        }
        cmd.spawn().expect("start cairn apply")
    };

    // Calibrate: how long a whole apply takes here, so random kills spread over its lifetime.
    let mut whole = Vec::new();
    for _ in 0..2 {
        let target = match assert_whole(pool, &known, 0).await {
            Some(v) => 1 - v,
            None => 0,
        };
        write_version(&dir, &contents[target]);
        let t = Instant::now();
        let out = apply(false).wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        whole.push(t.elapsed());
    }
    let lifetime = whole.iter().max().unwrap().as_millis() as u64;
    eprintln!("crash test: an uninterrupted apply takes about {lifetime} ms");

    let mut tally = Tally::default();
    let mut expected_total = task_count(pool).await;
    for run in 1..=runs {
        assert!(
            started.elapsed() < TEST_BUDGET,
            "crash test over its time budget after {run} runs: {tally:?}"
        );
        let before_gen = generation(pool).await;
        let current = assert_whole(pool, &known, run).await;
        let target = current.map_or(0, |v| 1 - v);
        write_version(&dir, &contents[target]);
        // What this run must emit if it commits: the planner's tasks for this transition.
        let oracle = Controller::new(
            pool.clone(),
            ConfigSource::Dir(dir.clone()),
            Some(Identity::parse(&std::fs::read_to_string(&identity_file).unwrap()).unwrap()),
        );
        let (_, plan) = oracle.plan().await.unwrap();
        let plan = plan.unwrap();
        assert!(!plan.tasks.is_empty(), "run {run} has work");
        let mut want: Vec<Work> = plan
            .tasks
            .iter()
            .map(|t| {
                (
                    t.action.as_str().to_owned(),
                    t.app.to_string(),
                    t.slot as i32,
                    t.node.to_string(),
                    t.release as i64,
                )
            })
            .collect();
        want.sort();

        // Half the runs pause at the failpoint and are killed during the pause; the others are killed
        // at a random moment within twice their usual lifetime (about half of them finish first).
        let failpoint = run % 2 == 0;
        let mut child = apply(failpoint);
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + RUN_BOUND;
        let mut paused = false;
        if failpoint {
            // Wait for the pause, then kill somewhere inside it.
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(line) if line.starts_with("failpoint apply-before-commit") => {
                        paused = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            assert!(paused, "run {run}: the failpoint was reached");
            std::thread::sleep(Duration::from_millis(rng.below(KILL_WINDOW_MS)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.below(lifetime * 2)));
        }
        // Kills a running process; a finished one is reaped below with its own exit status.
        let _ = child.kill();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "run {run}: cairn apply hangs");
            std::thread::sleep(Duration::from_millis(5));
        };
        reader.join().unwrap();
        // A COMMIT the client sent just before the kill still completes on the server: wait until the
        // killed client's backend is gone before reading the state, or the check races that commit.
        loop {
            let busy: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND (state <> 'idle' OR xact_start IS NOT NULL)",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            if busy == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "run {run}: the killed apply's backend lingers"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let lines: Vec<String> = rx.try_iter().collect();
        let killed = status.signal() == Some(9);
        assert!(
            killed || status.success(),
            "run {run}: cairn apply failed: {status:?}\n{}",
            lines.join("\n")
        );

        let after_gen = generation(pool).await;
        let now = assert_whole(pool, &known, run).await;
        if after_gen == before_gen {
            assert_eq!(now, current, "run {run}: the state moved without a commit");
        } else {
            assert_eq!(after_gen, before_gen + 1, "run {run}");
            assert_eq!(now, Some(target), "run {run}");
            tally.committed += 1;
            expected_total += want.len() as i64;
        }
        // Tasks: those of this generation are exactly the plan's, once each, or there are none.
        let emitted = task_work(pool, before_gen + 1).await;
        if after_gen == before_gen {
            assert_eq!(emitted, vec![], "run {run}: tasks of an uncommitted apply");
        } else {
            assert_eq!(emitted, want, "run {run}: the committed apply's tasks");
        }
        assert_eq!(
            task_count(pool).await,
            expected_total,
            "run {run}: a task lost or added"
        );

        match (killed, paused) {
            (true, true) => {
                assert_eq!(
                    after_gen, before_gen,
                    "run {run}: killed inside the open transaction, yet it committed"
                );
                tally.killed_in_transaction += 1;
            }
            (true, false) => tally.killed_elsewhere += 1,
            (false, _) => tally.completed += 1,
        }
    }

    // Across all runs: every applied generation has its tasks, each dedup key once, no other tasks.
    let gens: BTreeSet<i64> = sqlx::query_scalar::<_, i64>("SELECT DISTINCT generation FROM tasks")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let final_gen = generation(pool).await;
    assert_eq!(gens, (1..=final_gen).collect::<BTreeSet<_>>());
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconciliations WHERE status = 'applied'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        applied, final_gen,
        "one applied record per committed generation"
    );
    let (rows, keys): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT dedup_key) FROM tasks")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(rows, keys);

    eprintln!(
        "crash test: {tally:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        runs < 20 || tally.killed_in_transaction >= runs / 4,
        "{tally:?}"
    );
    assert!(tally.killed_in_transaction > 0, "{tally:?}");
    assert!(tally.killed_elsewhere > 0, "{tally:?}");
    assert!(tally.committed > 0, "{tally:?}");
}

async fn task_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(pool)
        .await
        .unwrap()
}

// ---- A panic inside one reconcile of `cairn serve` ----

/// The failed run of `commit` (or of no commit: a run that panicked before its commit was known) whose
/// first error contains `needle`, once serve has recorded it.
async fn failed_run(plane: &Plane, commit: Option<&str>, needle: &str) -> serde_json::Value {
    let sql = match commit {
        Some(c) => format!("SELECT commit, errors, repeats FROM reconciliations WHERE status = 'failed' AND commit = '{c}'"),
        None => "SELECT commit, errors, repeats FROM reconciliations WHERE status = 'failed' AND commit IS NULL".to_owned(),
    };
    let needle = needle.to_owned();
    wait_for(
        &format!("a failed run of {commit:?} saying {needle:?}"),
        Duration::from_secs(60),
        || {
            let f = plane.rows(&sql);
            let needle = needle.clone();
            async move {
                f.await.into_iter().find(|r| {
                    r["errors"][0]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(&needle))
                })
            }
        },
    )
    .await
}

/// Serve's API answers (the process that took the panic is still the one serving).
async fn serve_answers(plane: &Plane) {
    let s = reqwest::get(format!("{}/healthz", plane.url))
        .await
        .unwrap()
        .status();
    assert_eq!(s, 200);
}

async fn applied_commit(plane: &Plane) -> String {
    plane.rows("SELECT commit FROM config_state").await[0]["commit"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_survives_a_panic_in_a_reconcile_and_applies_the_next_good_commit() {
    // Before: a panic while validating (`url = "https://€/x.git"` did this) unwound through serve's
    // reconcile loop and took the control plane down; restarted, it read the same head and died again.
    // The test build of cairn has the `test-panic` feature: `# cairn-test-panic: STAGE` in a manifest
    // panics at that stage, standing in for bugs no known input reaches any more.
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("n1", "");
    let plane = Plane::start(db, repo, scratch, identity, FAST).await;
    let first = plane.repo.head();
    wait_for("the first commit applied", Duration::from_secs(60), || {
        let plane = &plane;
        let first = first.clone();
        async move { (applied_commit(plane).await == first).then_some(()) }
    })
    .await;

    for (stage, says) in [
        (
            "validate",
            "while validating this commit: injected test panic at stage `validate`",
        ),
        (
            "apply",
            "while planning or applying this commit: injected test panic at stage `apply`",
        ),
    ] {
        plane
            .repo
            .write("panic.toml", &format!("# cairn-test-panic: {stage}\n"));
        plane.repo.node("n2", &format!("# {stage}\n"));
        plane.repo.commit();
        let bad = plane.repo.head();
        let run = failed_run(&plane, Some(&bad), says).await;
        assert!(
            run["errors"][0]["message"]
                .as_str()
                .unwrap()
                .starts_with("internal error (a panic in cairn; please report it)"),
            "{run}"
        );
        serve_answers(&plane).await;
        assert_eq!(
            applied_commit(&plane).await,
            first,
            "nothing of the commit is applied"
        );
        let nodes = plane.rows("SELECT name FROM nodes").await;
        assert_eq!(nodes.len(), 1, "{nodes:?}");
    }

    // A panic where the run's commit is not known to the code that catches it: the run's task.
    plane
        .repo
        .write("panic.toml", "# cairn-test-panic: reconcile\n");
    plane.repo.commit();
    failed_run(
        &plane,
        None,
        "during a reconcile: injected test panic at stage `reconcile`",
    )
    .await;
    serve_answers(&plane).await;

    // The next good commit applies, in the same process.
    plane.repo.remove("panic.toml");
    plane.repo.commit();
    let good = plane.repo.head();
    wait_for("the good commit applied", Duration::from_secs(60), || {
        let plane = &plane;
        let good = good.clone();
        async move { (applied_commit(plane).await == good).then_some(()) }
    })
    .await;
    let nodes = plane.rows("SELECT name FROM nodes ORDER BY name").await;
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    serve_answers(&plane).await;
}
