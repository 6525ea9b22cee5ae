//! Three `cairn serve` on one PostgreSQL, two agents (recording driver) given all three URLs, the local
//! GitHub API stand-in, and a stream of config commits each announced by a signed push delivered to a
//! random live replica. The leader is SIGKILLed again and again (and started again, as a new replica on
//! the same port, so agents and the webhook sender keep their URLs).
//!
//! Each kill comes at a random moment after the previous commit's `cairn/apply` status reached the
//! stand-in (a status call cut off by a kill is posted again after its lease: at least once, which a
//! count at GitHub cannot tell from a duplicate).
//!
//! Afterwards: a new leader took the lease within 15 s of each kill, epochs strictly increasing; every
//! commit was applied exactly once (one applied reconciliation each, generations without gaps); no
//! agent ran a task, or the same work, twice; every delivery was handled; and each `cairn/apply` status
//! of each commit reached GitHub once (counted at the stand-in).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Rng, repeated_runs, seed};
use crate::agents::support::{
    CAIRN, Plane, Repo, agent_bin, join_token, rows, start_listening, wait_converged_db, wait_for,
};
use crate::webhooks::{FakeGitHub, SECRET, TOKEN, fixtures, push, sign};

/// The config repository as serve and the payloads name it (rewritten to the local bare repository).
const CONFIG_URL: &str = "https://github.com/acme/platform.git";
/// Leader kills (each followed by a commit that must apply under the new leader).
const KILLS: usize = 4;
/// A new leader must hold the lease within this of a kill.
const FAILOVER: Duration = Duration::from_secs(15);

/// Serve's flags: a short lease (a dead leader is replaced within about 3.5 s), a long timer (webhooks
/// and the wake-ups forwarded to the leader drive the reconciles), and GitHub calls leased longer than
/// the test (a call cut off by a kill would not be repeated while it runs: the test fails on a missing
/// status rather than pass on one posted late).
const ARGS: &[&str] = &[
    "--interval",
    "60s",
    "--node-offline-after",
    "20s",
    "--heartbeat-interval",
    "300ms",
    "--task-lease",
    "3s",
    "--leader-lease",
    "3s",
    "--leader-renew",
    "500ms",
    "--webhook-poll",
    "1s",
    "--github-call-lease",
    "120s",
];

/// One of the three control planes: its fixed port, its process, how many times it started.
struct Replica {
    port: u16,
    child: Option<Child>,
    starts: u32,
}

impl Replica {
    fn id(&self) -> String {
        format!("cp-{}-{}", self.port, self.starts)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Prints the tail of every log in its directory when the test panics.
struct Logs(std::path::PathBuf);

impl Drop for Logs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("--- last lines of {} ---", p.display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// A free loopback port (bound and released; serve binds it with SO_REUSEADDR).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_replica(r: &mut Replica, db_url: &str, repo: &Repo, scratch: &Path, github: &str) {
    r.starts += 1;
    let id = r.id();
    let log = std::fs::File::create(scratch.join(format!("{id}.log"))).unwrap();
    let mut cmd = Command::new(CAIRN);
    cmd.arg("serve")
        .args(["--database-url", db_url])
        .args(["--repo", CONFIG_URL, "--ref", "main"])
        .args(["--git-rewrite", &format!("{CONFIG_URL}={}", repo.url())])
        .arg("--identity")
        .arg(scratch.join("control-plane.key"))
        .args([
            "--listen",
            &format!("127.0.0.1:{}", r.port),
            "--no-poll-heads",
        ])
        .arg("--cache-dir")
        .arg(scratch.join(format!("cache-{}", r.port)))
        .args(["--replica-id", &id])
        .args(ARGS)
        .env("CAIRN_LOG", "info,cairn_reconciler=debug")
        .env("CAIRN_GITHUB_WEBHOOK_SECRET", SECRET)
        .env("CAIRN_GITHUB_TOKEN", TOKEN)
        .env("CAIRN_GITHUB_API_URL", github)
        .env("CAIRN_GITHUB_HOST", "github.com")
        .env_remove("CAIRN_IDENTITY")
        .env_remove("CAIRN_REPLICA_ID")
        .env_remove("CAIRN_GITHUB_APP_ID")
        .env_remove("CAIRN_FAILPOINT")
        .stderr(log);
    let (child, _) = start_listening(&mut cmd).await;
    r.child = Some(child);
}

/// Starts an agent for `node` with the recording driver, given every control plane's URL.
fn agent(node: &str, servers: &str, dir: &Path, token: &str, scratch: &Path) -> Child {
    let log = std::fs::File::create(scratch.join(format!("agent-{node}.log"))).unwrap();
    Command::new(agent_bin())
        .args(["--server", servers, "--driver", "recording"])
        .arg("--data-dir")
        .arg(dir)
        .args(["--concurrency", "2", "--heartbeat", "300ms"])
        .env("CAIRN_AGENT_TEST_DRIVER", "1")
        .env("CAIRN_LOG", "debug")
        .env("CAIRN_JOIN_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("cairn-agent starts")
}

/// The lease: (holder, epoch), when held and not expired.
async fn leader(db: &cairn_testkit::pg::TestDb) -> Option<(String, i64)> {
    let r = rows(
        db,
        "SELECT holder, epoch FROM control_plane_lease WHERE expires_at > clock_timestamp()",
    )
    .await;
    let r = r.first()?;
    Some((r["holder"].as_str()?.to_owned(), r["epoch"].as_i64()?))
}

/// Posts a signed push of the config branch from `before` to `after` to `url`; the status, or 0 when
/// the replica could not be reached.
async fn deliver(dir: &Path, url: &str, id: &str, before: &str, after: &str) -> u16 {
    let body = serde_json::to_vec(&push(dir, "acme/platform", "main", before, after)).unwrap();
    match reqwest::Client::new()
        .post(format!("{url}/webhooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", id)
        .header("x-hub-signature-256", sign(&body))
        .body(body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_control_planes_with_the_leader_sigkilled_again_and_again_apply_every_commit_once() {
    const TEST: &str = "leader_sigkilled_again_and_again";
    let Some(dir) = fixtures() else { return };
    let seed = seed(TEST);
    let mut rng = Rng(seed);
    let started = Instant::now();
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    let scratch_path = scratch.path().to_owned();
    std::fs::write(
        scratch_path.join("control-plane.key"),
        identity.to_file_text("test").as_bytes(),
    )
    .unwrap();
    repo.node("a", "");
    repo.node("b", "");
    repo.app("web", 2, "V = \"c0\"\n");
    repo.app("api", 1, "V = \"c0\"\n");
    repo.commit();
    let github = FakeGitHub::start(&dir).await;

    let mut replicas: Vec<Replica> = (0..3)
        .map(|_| Replica {
            port: free_port(),
            child: None,
            starts: 0,
        })
        .collect();
    for r in &mut replicas {
        start_replica(r, db.url(), &repo, &scratch_path, &github.uri()).await;
    }
    let servers: Vec<String> = replicas.iter().map(Replica::url).collect();
    let servers = servers.join(",");
    let first = wait_for("a first leader", FAILOVER, || async { leader(&db).await }).await;
    eprintln!("{TEST}: first leader {first:?} at {:?}", started.elapsed());

    let _logs = Logs(scratch_path.clone());
    let head = repo.head();
    wait_for(
        "the first commit applied",
        Duration::from_secs(30),
        || async {
            let r = rows(&db, "SELECT commit FROM config_state").await;
            (r[0]["commit"] == head.as_str()).then_some(())
        },
    )
    .await;
    let (dir_a, dir_b) = (scratch_path.join("agent-a"), scratch_path.join("agent-b"));
    let mut agents = [
        agent(
            "a",
            &servers,
            &dir_a,
            &join_token(db.url(), "a"),
            &scratch_path,
        ),
        agent(
            "b",
            &servers,
            &dir_b,
            &join_token(db.url(), "b"),
            &scratch_path,
        ),
    ];
    wait_converged_db(&db, Duration::from_secs(60)).await;
    eprintln!("{TEST}: first commit deployed at {:?}", started.elapsed());

    // The commit stream: each commit pushed, announced to a random live replica, and applied before the
    // next; the leader killed before every other commit.
    let mut commits = vec![repo.head()];
    let mut epochs = vec![first.1];
    let mut failovers = Vec::new();
    let mut deliveries = 0;
    let mut leader_now = first;
    let total = 2 * KILLS + 2;
    for i in 1..=total {
        if i % 2 == 0 && failovers.len() < KILLS {
            // SIGKILL the leader; wait for another replica to take the lease; start the dead one again.
            // Not while its outbox may be posting the last commit's status: a call cut off between
            // GitHub's answer and its record is made again after its lease (at least once), which is
            // not what this test counts. So after that status arrived, at a random moment.
            let last = commits.last().unwrap().clone();
            wait_for(
                "the last commit's cairn/apply success at GitHub",
                Duration::from_secs(30),
                || async {
                    github
                        .statuses()
                        .iter()
                        .any(|(_, sha, ctx, st, _)| {
                            *sha == last && ctx == "cairn/apply" && st == "success"
                        })
                        .then_some(())
                },
            )
            .await;
            tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
            let victim = replicas
                .iter_mut()
                .find(|r| r.id() == leader_now.0)
                .expect("the leader is one of the replicas");
            if let Some(mut c) = victim.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let killed = Instant::now();
            let old = leader_now.clone();
            let next = wait_for(
                &format!(
                    "a new leader after killing {} (CAIRN_FAULT_SEED={seed})",
                    old.0
                ),
                FAILOVER,
                || async { leader(&db).await.filter(|(h, _)| *h != old.0) },
            )
            .await;
            let took = killed.elapsed();
            assert!(
                next.1 > old.1,
                "epochs must increase: {old:?} then {next:?} (CAIRN_FAULT_SEED={seed})"
            );
            failovers.push((old.0.clone(), next.clone(), took));
            epochs.push(next.1);
            leader_now = next;
            start_replica(victim, db.url(), &repo, &scratch_path, &github.uri()).await;
        }
        let before = repo.head();
        let v = format!("c{i}");
        match rng.below(3) {
            0 => repo.app("web", 1 + (i as u32 % 3), &format!("V = \"{v}\"\n")),
            1 => repo.app("api", 1, &format!("V = \"{v}\"\n")),
            _ => {
                repo.app("web", 2, &format!("V = \"{v}\"\n"));
                repo.app("api", 1 + (i as u32 % 2), &format!("V = \"{v}\"\n"));
            }
        }
        repo.commit();
        let after = repo.head();
        commits.push(after.clone());
        // To a random replica that answers (a restarted one may still be starting: 503).
        let mut sent = false;
        for attempt in 0..30 {
            let to = &replicas[(rng.below(3) as usize + attempt) % 3];
            if to.child.is_none() {
                continue;
            }
            if deliver(&dir, &to.url(), &format!("ha-{i}"), &before, &after).await == 202 {
                sent = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(sent, "no replica took delivery ha-{i}");
        deliveries += 1;
        wait_for(
            &format!("commit {i} applied (CAIRN_FAULT_SEED={seed})"),
            Duration::from_secs(30),
            || async {
                let r = rows(&db, "SELECT commit FROM config_state").await;
                (r[0]["commit"] == after.as_str()).then_some(())
            },
        )
        .await;
    }
    eprintln!(
        "{TEST}: seed {seed}: {} commits, failovers {failovers:?}, at {:?}",
        commits.len(),
        started.elapsed()
    );
    for (_, _, took) in &failovers {
        assert!(*took < FAILOVER, "a failover took {took:?}: {failovers:?}");
    }
    assert!(
        epochs.windows(2).all(|w| w[0] < w[1]),
        "epochs not strictly increasing: {epochs:?}"
    );
    assert_eq!(failovers.len(), KILLS);

    // Settled: what the agents run is the last commit, nothing outstanding.
    wait_converged_db(&db, Duration::from_secs(60)).await;
    wait_for("every task finished", Duration::from_secs(60), || async {
        rows(
            &db,
            "SELECT id FROM tasks WHERE status IN ('queued', 'leased')",
        )
        .await
        .is_empty()
        .then_some(())
    })
    .await;

    // Every commit applied exactly once, generations without gaps.
    let applied = rows(
        &db,
        "SELECT commit, generation FROM reconciliations WHERE status = 'applied' ORDER BY generation",
    )
    .await;
    let mut per_commit: BTreeMap<String, u32> = BTreeMap::new();
    for r in &applied {
        *per_commit
            .entry(r["commit"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for (i, c) in commits.iter().enumerate() {
        assert_eq!(
            per_commit.get(c).copied(),
            Some(1),
            "commit {i} ({c}) applied {:?} times: {applied:?}",
            per_commit.get(c)
        );
    }
    let gens: Vec<i64> = applied
        .iter()
        .map(|r| r["generation"].as_i64().unwrap())
        .collect();
    assert!(
        gens.windows(2).all(|w| w[1] == w[0] + 1),
        "generations with a gap or a repeat: {gens:?}"
    );

    // No task ran twice, nor the same work.
    for d in [&dir_a, &dir_b] {
        let records: Vec<Value> = std::fs::read_to_string(d.join("recording.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(!records.is_empty(), "{} ran nothing", d.display());
        let repeated = repeated_runs(&records);
        assert!(
            repeated.is_empty(),
            "{}: {repeated:?} (CAIRN_FAULT_SEED={seed})",
            d.display()
        );
    }

    // Each delivery handled once (a claim a kill cut off rolled back and was taken again).
    let handled = rows(
        &db,
        "SELECT delivery_id, status FROM webhook_deliveries WHERE delivery_id LIKE 'ha-%'",
    )
    .await;
    assert_eq!(handled.len(), deliveries, "{handled:?}");
    assert!(
        handled.iter().all(|r| r["status"] == "handled"),
        "{handled:?}"
    );

    // Each status posted once: `cairn/apply` success on every commit announced, at most one of each
    // (commit, context, state).
    let settled = wait_for(
        "every commit's cairn/apply success at GitHub",
        Duration::from_secs(30),
        || async {
            let posted = github.statuses();
            commits[1..]
                .iter()
                .all(|c| {
                    posted.iter().any(|(_, sha, ctx, st, _)| {
                        sha == c && ctx == "cairn/apply" && st == "success"
                    })
                })
                .then_some(posted)
        },
    )
    .await;
    let mut counts: BTreeMap<(String, String, String), u32> = BTreeMap::new();
    for (_, sha, ctx, st, _) in &settled {
        *counts
            .entry((sha.clone(), ctx.clone(), st.clone()))
            .or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "statuses posted more than once: {twice:?}"
    );

    // `cairn status` shows the replicas and the leader.
    let out = Command::new(CAIRN)
        .args(["status"])
        .env("DATABASE_URL", db.url())
        .env_remove("CAIRN_SERVER")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let (holder, epoch) = leader(&db).await.expect("a leader at the end");
    assert!(
        text.contains(&format!("CONTROL PLANES (leader {holder}, epoch {epoch},")),
        "{text}"
    );
    for r in &replicas {
        assert!(text.contains(&r.id()), "{} missing from:\n{text}", r.id());
    }

    for a in &mut agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    eprintln!("{TEST}: done at {:?}", started.elapsed());
}
