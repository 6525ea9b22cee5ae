//! The deploy lifecycle (`cairn_reconciler::deploys`) in process, against a real PostgreSQL and without
//! `cairn serve`: an applied config gives a release and its deploy tasks; the tests lease them through
//! the queue and report outcomes the way the agent API does, then read the release back with plain SQL.
//! A release is live once every deploy ran, a failed deploy backs off and then dead-letters and fails
//! its release, deploys that were skipped never make it live, a stale token changes nothing, and a
//! deploy leased by a node that joined after it was made has its secrets sealed to that node only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_plan::observed::CommitId;
use cairn_proto::{DeployPayload, Outcome};
use cairn_reconciler::controller::{ConfigSource, Controller, Outcome as Reconciled, Trigger};
use cairn_reconciler::deploys::{self, Context, DeployError};
use cairn_reconciler::queue::{self, Backoff, LeaseToken, LeasedTask, TaskStatus};
use cairn_reconciler::store::state;
use cairn_schema::{Identity, Name};
use sqlx::PgPool;
use tokio::sync::Notify;

const LEASE: Duration = Duration::from_secs(60);
const HEAD: &str = "0123456789abcdef0123456789abcdef01234567";
const SECRET: &str = "postgres://web:canary-4f1d@db/web";

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn demo_identity() -> Identity {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/keys/demo-only-identity.txt");
    Identity::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An applied config: app `web` with a replica on each of `n1` and `n2` (and, with `secret`, a secret
/// env var), its branch head known, so release 1 has one deploy task per node.
struct Plane {
    _tmp: tempfile::TempDir,
    pool: PgPool,
    identity: Identity,
    /// Each node's age identity (as its agent would generate it when it joins).
    nodes: HashMap<&'static str, Identity>,
    wake: Notify,
    backoff: Backoff,
}

impl Plane {
    async fn new(pool: PgPool, secret: bool) -> Plane {
        let identity = demo_identity();
        let tmp = tempfile::tempdir().unwrap();
        let dir: PathBuf = tmp.path().join("config");
        let write = |path: &str, text: &str| {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write(
            "cairn.toml",
            &format!(
                "base_domain = \"apps.example.com\"\ncurrency = \"EUR\"\n[secrets]\nrecipients = [\"{}\"]\n",
                identity.recipient().as_str()
            ),
        );
        write(
            "infra.toml",
            "[plan.small]\ncpu = 0.5\nmemory = \"512MiB\"\ndisk = \"1GiB\"\nprice = \"5.00\"\n\
             max_replicas = 5\n\n[runtime.node]\nimage = \"node:22\"\nbuild = [\"npm ci\"]\n\
             start = \"npm start\"\nport = 3000\n",
        );
        write(
            "nodes.toml",
            "[node.n1]\ncpu = 4\nmemory = \"8GiB\"\ndisk = \"100GiB\"\n\n\
             [node.n2]\ncpu = 4\nmemory = \"8GiB\"\ndisk = \"100GiB\"\n",
        );
        let mut app = "[app.web]\nplan = \"small\"\nruntime = \"node\"\nreplicas = 2\n\n\
                       [app.web.source]\nurl = \"https://github.com/acme/web.git\"\n"
            .to_owned();
        if secret {
            let ct =
                cairn_schema::secret::encrypt(SECRET.as_bytes(), &[identity.recipient()]).unwrap();
            app += &format!(
                "\n[app.web.env]\nDB_URL = {{ secret = \"\"\"\n{}\"\"\" }}\n",
                ct.as_str()
            );
        }
        write("apps/web.toml", &app);

        let c = Controller::new(
            pool.clone(),
            ConfigSource::Dir(dir.clone()),
            Some(demo_identity()),
        );
        let (_, snap) = c.read().await.unwrap();
        let desired = snap.loaded.desired.clone().expect("the config is valid");
        for (app, a) in &desired.apps {
            state::record_source_head(&pool, app, &a.source.branch, &CommitId::new(HEAD))
                .await
                .unwrap();
        }
        assert!(matches!(
            c.reconcile(Trigger::Manual).await.unwrap(),
            Reconciled::Applied(_)
        ));
        Plane {
            _tmp: tmp,
            pool,
            identity,
            nodes: HashMap::from([("n1", Identity::generate()), ("n2", Identity::generate())]),
            wake: Notify::new(),
            backoff: Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(10),
            },
        }
    }

    fn ctx(&self) -> Context<'_> {
        Context {
            pool: &self.pool,
            identity: Some(&self.identity),
            hooks: None,
            wake: &self.wake,
            registry: None,
            backoff: self.backoff,
            image_wait: Duration::from_secs(5),
        }
    }

    /// Leases `node`'s one deploy and makes it ready as the agent API does; returns it with its payload.
    async fn lease(&self, node: &str) -> (LeasedTask, DeployPayload) {
        let leased = queue::lease(&self.pool, &name(node), 10, LEASE)
            .await
            .unwrap();
        assert_eq!(leased.len(), 1, "{node} has one deploy due: {leased:?}");
        let recipient = self.nodes[node].recipient();
        let mut ready = deploys::prepare(&self.ctx(), &name(node), Some(&recipient), leased)
            .await
            .unwrap();
        assert_eq!(ready.len(), 1, "the deploy is handed out");
        let (t, payload, _) = ready.remove(0);
        (t, payload.expect("a deploy carries its payload"))
    }

    /// Reports `outcome` for a leased task, as its node would.
    async fn report(
        &self,
        t: &LeasedTask,
        token: LeaseToken,
        outcome: Outcome,
    ) -> Result<deploys::Reported, DeployError> {
        let row = queue::node_task(&self.pool, &t.node, t.id)
            .await
            .unwrap()
            .unwrap();
        deploys::finish(&self.ctx(), &row, token, &outcome, None).await
    }

    async fn release_status(&self) -> (String, Option<String>) {
        sqlx::query_as("SELECT status, error FROM releases WHERE app = 'web' AND number = 1")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn task_status(&self, t: &LeasedTask) -> String {
        sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
            .bind(t.id.0)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Whether the reconciler was woken (and takes the wake-up).
    async fn woken(&self) -> bool {
        tokio::time::timeout(Duration::from_millis(10), self.wake.notified())
            .await
            .is_ok()
    }
}

fn done() -> Outcome {
    Outcome::Done {
        detail: None,
        timings: BTreeMap::from([("build".to_owned(), 1200), ("start".to_owned(), 300)]),
        image: None,
        backup: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_live_once_every_deploy_is_done() {
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(db.pool().clone(), false).await;
    let (t1, _) = plane.lease("n1").await;
    let (t2, _) = plane.lease("n2").await;

    let r = plane.report(&t1, t1.token, done()).await.unwrap();
    assert_eq!((r.status, r.retry_at), (TaskStatus::Done, None));
    assert_ne!(
        plane.release_status().await.0,
        "live",
        "one deploy is still open"
    );
    let r = plane.report(&t2, t2.token, done()).await.unwrap();
    assert_eq!(r.status, TaskStatus::Done);
    assert_eq!(plane.release_status().await, ("live".to_owned(), None));
    let timings: serde_json::Value =
        sqlx::query_scalar("SELECT stage_timings FROM releases WHERE app = 'web' AND number = 1")
            .fetch_one(&plane.pool)
            .await
            .unwrap();
    assert_eq!(timings["build"], 1200, "stage timings are kept: {timings}");
    assert!(!plane.woken().await, "a live release wakes nobody");

    // A report with a token that is no longer the lease changes nothing.
    assert!(matches!(
        plane.report(&t1, t1.token, done()).await,
        Err(DeployError::Stale { .. })
    ));
    assert!(matches!(
        plane
            .report(&t1, LeaseToken(t1.token.0 + 1000), done())
            .await,
        Err(DeployError::Stale { .. })
    ));
    assert_eq!(plane.release_status().await.0, "live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deploy_backs_off_then_dead_letters_and_fails_its_release() {
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(db.pool().clone(), false).await;
    sqlx::query("UPDATE tasks SET max_attempts = 2 WHERE node = 'n1'")
        .execute(&plane.pool)
        .await
        .unwrap();
    let (t, _) = plane.lease("n1").await;
    let failed = || Outcome::Failed {
        error: "exit status 1".into(),
        retry: true,
    };

    let r = plane.report(&t, t.token, failed()).await.unwrap();
    assert_eq!(r.status, TaskStatus::Failed);
    let now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&plane.pool)
        .await
        .unwrap();
    let wait = r.retry_at.expect("a retry time") - now;
    assert!(
        wait > chrono::Duration::milliseconds(1500) && wait <= chrono::Duration::seconds(2),
        "the first retry waits the backoff's base: {wait}"
    );
    assert_eq!(plane.task_status(&t).await, "failed");
    assert_ne!(plane.release_status().await.0, "failed", "it is retried");
    assert!(
        queue::lease(&plane.pool, &name("n1"), 10, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "not before its backoff ends"
    );

    sqlx::query("UPDATE tasks SET run_after = now() WHERE id = $1")
        .bind(t.id.0)
        .execute(&plane.pool)
        .await
        .unwrap();
    let (again, _) = plane.lease("n1").await;
    assert_eq!((again.id, again.attempt), (t.id, 2));
    let r = plane.report(&again, again.token, failed()).await.unwrap();
    assert_eq!((r.status, r.retry_at), (TaskStatus::Dead, None));
    assert_eq!(plane.task_status(&t).await, "dead");
    let (status, error) = plane.release_status().await;
    assert_eq!(status, "failed");
    assert!(
        error.as_deref().unwrap_or("").contains("exit status 1"),
        "the release says why: {error:?}"
    );
    assert!(plane.woken().await, "a failed release wakes the reconciler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_deploys_never_make_their_release_live() {
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(db.pool().clone(), false).await;
    for node in ["n1", "n2"] {
        let (t, _) = plane.lease(node).await;
        let r = plane
            .report(
                &t,
                t.token,
                Outcome::Skipped {
                    detail: None,
                    slot_generation: Some(7),
                },
            )
            .await
            .unwrap();
        assert_eq!(r.status, TaskStatus::Superseded);
        assert_eq!(plane.task_status(&t).await, "superseded");
    }
    let (status, _) = plane.release_status().await;
    assert!(
        status != "live" && status != "failed",
        "no deploy ran, none died: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealing_at_lease_time_gives_the_leasing_node_its_own_ciphertext() {
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(db.pool().clone(), true).await;
    let pending: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM tasks WHERE node = 'n1' AND kind = 'deploy'")
            .fetch_one(&plane.pool)
            .await
            .unwrap();
    assert_eq!(
        pending["secrets_pending"], true,
        "n1 had not joined: {pending}"
    );

    let (t, payload) = plane.lease("n1").await;
    let n1 = &plane.nodes["n1"];
    assert!(!payload.secrets_pending);
    assert_eq!(payload.secret_recipient, Some(n1.recipient()));
    let ct = cairn_schema::Ciphertext::new(payload.secret_env.as_deref().unwrap()).unwrap();
    let env: BTreeMap<String, String> =
        serde_json::from_slice(n1.decrypt(&ct).unwrap().expose()).unwrap();
    assert_eq!(env["DB_URL"], SECRET);
    assert!(
        plane.nodes["n2"].decrypt(&ct).is_err() && plane.identity.decrypt(&ct).is_err(),
        "sealed to n1 only"
    );

    // Only the ciphertext is written back, for the lease's holder.
    let stored: serde_json::Value = sqlx::query_scalar("SELECT payload FROM tasks WHERE id = $1")
        .bind(t.id.0)
        .fetch_one(&plane.pool)
        .await
        .unwrap();
    assert_eq!(stored["secret_env"], payload.secret_env.as_deref().unwrap());
    assert_eq!(stored["secrets_pending"], false);
    assert!(!stored.to_string().contains(SECRET));
}
