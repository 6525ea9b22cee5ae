//! Branch heads left to webhooks (`cairn serve --no-poll-heads`, [`HeadPolling::Unknown`]), through the
//! [`Controller`] against a real PostgreSQL and real git remotes reached through a `--git-rewrite`: a new
//! app deploys its branch's current head at once, a later push to that branch is not polled (a webhook
//! records it), switching the app to another branch reads the new branch's head once, and a remote that
//! cannot be asked leaves the app waiting and is asked again on the next run.

use std::path::PathBuf;
use std::time::Duration;

use cairn_plan::WarningKind;
use cairn_plan::observed::CommitId;
use cairn_reconciler::controller::{ConfigSource, Controller, HeadPolling, Outcome, Trigger};
use cairn_reconciler::executor::Applied;
use cairn_reconciler::source::heads::HeadPoller;
use cairn_reconciler::store::{ReconcileStatus, state};
use cairn_schema::source::Rewrites;
use cairn_testkit::{fixtures, git};
use sqlx::PgPool;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Apps' manifests name this; the rewrite sends it to local bare repositories.
const BASE: &str = "https://example.com/acme/";

fn infra() -> String {
    format!(
        "{}\n{}\n{}",
        fixtures::plan("small"),
        fixtures::node_runtime(),
        fixtures::node("n1")
    )
}

/// A config directory and, beside it, the apps' bare remotes (`<name>.git`) with a work tree each.
struct World {
    tmp: tempfile::TempDir,
    config: PathBuf,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config");
        std::fs::create_dir_all(&config).unwrap();
        let settings = fixtures::settings().currency("EUR").to_string();
        std::fs::write(config.join("cairn.toml"), settings).unwrap();
        std::fs::write(config.join("infra.toml"), infra()).unwrap();
        World { tmp, config }
    }

    fn remotes(&self) -> PathBuf {
        self.tmp.path().join("remotes")
    }

    fn work(&self, app: &str) -> PathBuf {
        self.tmp.path().join("work").join(app)
    }

    /// Creates `<app>.git` and a work tree pushing to it.
    fn source(&self, app: &str) {
        let bare = self.remotes().join(format!("{app}.git"));
        let work = self.work(app);
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        git(&bare, &["init", "--bare", "-q"]);
        git(&work, &["init", "-q"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
    }

    /// Commits `index.js = text` on the work tree's current branch, pushes it to `branch`; the commit id.
    fn push(&self, app: &str, branch: &str, text: &str) -> String {
        let work = self.work(app);
        std::fs::write(work.join("index.js"), text).unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", text]);
        git(&work, &["push", "-q", "origin", &format!("HEAD:{branch}")]);
        git(&work, &["rev-parse", "HEAD"])
    }

    /// Declares `app` following `branch` of `https://example.com/acme/<app>.git`.
    fn app(&self, app: &str, branch: &str) {
        let dir = self.config.join("apps");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("{app}.toml")),
            format!(
                "[app.{app}]\nplan = \"small\"\nruntime = \"node\"\nreplicas = 1\n\n\
                 [app.{app}.source]\nurl = \"{BASE}{app}.git\"\nbranch = \"{branch}\"\n"
            ),
        )
        .unwrap();
    }

    /// The controller as `cairn serve --no-poll-heads --git-rewrite BASE=file://<remotes>/` builds it.
    fn controller(&self, pool: &PgPool) -> Controller {
        let rewrites =
            Rewrites::parse([format!("{BASE}=file://{}/", self.remotes().display())]).unwrap();
        let mut c = Controller::new(pool.clone(), ConfigSource::Dir(self.config.clone()), None);
        c.heads = Some(tokio::sync::Mutex::new(HeadPoller::new(
            self.tmp.path().join("heads.git"),
            rewrites,
        )));
        c.head_polling = HeadPolling::Unknown;
        c
    }
}

async fn run(c: &Controller, trigger: Trigger) -> Applied {
    match c.reconcile(trigger).await.unwrap() {
        Outcome::Applied(a) => *a,
        other => panic!("expected an apply, got {other:?}"),
    }
}

/// A run that changes nothing: an empty plan, or (nothing new since one) none at all.
async fn quiet(c: &Controller, trigger: Trigger) {
    match c.reconcile(trigger).await.unwrap() {
        Outcome::Applied(a) => {
            assert_eq!(a.status, ReconcileStatus::Noop, "{trigger}: {:?}", a.plan)
        }
        Outcome::Unchanged { .. } => assert_ne!(trigger, Trigger::Manual, "a manual run plans"),
        other => panic!("{trigger}: expected nothing to change, got {other:?}"),
    }
}

/// `(number, source_commit)` of an app's releases, oldest first.
async fn releases(pool: &PgPool, app: &str) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT number, source_commit FROM releases WHERE app = $1 ORDER BY number")
        .bind(app)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// `(branch, commit)` of an app's recorded head.
async fn head(pool: &PgPool, app: &str) -> Option<(String, String)> {
    sqlx::query_as("SELECT branch, commit FROM source_heads WHERE app = $1")
        .bind(app)
        .fetch_optional(pool)
        .await
        .unwrap()
}

fn waits_for_head(a: &Applied, app: &str) -> bool {
    a.plan.warnings.iter().any(|w| {
        w.kind == WarningKind::NoSourceHead && w.app.as_ref().map(|n| n.as_str()) == Some(app)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_polling_a_new_app_or_branch_reads_its_head_once_and_pushes_wait_for_webhooks() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let w = World::new();
        w.source("web");
        let c1 = w.push("web", "main", "v1");
        let c = w.controller(pool);
        let a = run(&c, Trigger::Startup).await;
        assert_eq!(a.status, ReconcileStatus::Applied);

        // A new app gets release 1 at its branch's current head, in the run that applies it (woken
        // by the config change, not by a push to the app's repository).
        w.app("web", "main");
        let a = run(&c, Trigger::Wake).await;
        assert!(!waits_for_head(&a, "web"), "{:?}", a.plan.warnings);
        assert_eq!(releases(pool, "web").await, [(1, c1.clone())]);
        assert_eq!(head(pool, "web").await, Some(("main".into(), c1.clone())));

        // A push to the branch is not polled: runs on the timer (and manual ones) leave it to a webhook.
        let c2 = w.push("web", "main", "v2");
        for trigger in [Trigger::Timer, Trigger::Timer, Trigger::Manual] {
            quiet(&c, trigger).await;
        }
        assert_eq!(releases(pool, "web").await, [(1, c1.clone())]);
        assert_eq!(head(pool, "web").await, Some(("main".into(), c1.clone())));
        // What a push webhook records is what deploys it.
        assert!(
            state::record_source_head(pool, &"web".parse().unwrap(), "main", &CommitId::new(&c2))
                .await
                .unwrap()
        );
        run(&c, Trigger::Wake).await;
        assert_eq!(
            releases(pool, "web").await,
            [(1, c1.clone()), (2, c2.clone())]
        );

        // Switching the app to another branch: the recorded head is main's, stale; the new branch's
        // head is read once, in the run that applies the switch.
        git(&w.work("web"), &["checkout", "-q", "-b", "next"]);
        let c3 = w.push("web", "next", "v3");
        w.app("web", "next");
        run(&c, Trigger::Wake).await;
        assert_eq!(head(pool, "web").await, Some(("next".into(), c3.clone())));
        assert_eq!(
            releases(pool, "web").await,
            [(1, c1.clone()), (2, c2.clone()), (3, c3.clone())]
        );
        let _c4 = w.push("web", "next", "v4");
        for trigger in [Trigger::Timer, Trigger::Timer] {
            quiet(&c, trigger).await;
        }
        assert_eq!(head(pool, "web").await, Some(("next".into(), c3.clone())));
        assert_eq!(releases(pool, "web").await.len(), 3);

        // A remote that cannot be asked: the run still applies, the app waits for its head and is asked
        // again on the next run (not in a loop of its own).
        w.app("api", "main");
        let a = run(&c, Trigger::Wake).await;
        assert!(waits_for_head(&a, "api"), "{:?}", a.plan.warnings);
        assert_eq!(head(pool, "api").await, None);
        assert!(releases(pool, "api").await.is_empty());
        w.source("api");
        let api1 = w.push("api", "main", "api v1");
        let a = run(&c, Trigger::Timer).await;
        assert!(!waits_for_head(&a, "api"), "{:?}", a.plan.warnings);
        assert_eq!(releases(pool, "api").await, [(1, api1)]);
        assert_eq!(releases(pool, "web").await.len(), 3, "web was not polled");
    })
    .await
    .expect("the test finished within its time bound");
}

/// With polling (the default), a new app still deploys in the run that applies it, whatever woke that
/// run, instead of waiting for the next timer run to read every head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_polling_a_new_app_deploys_in_the_run_that_applies_it() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let w = World::new();
        w.source("web");
        let c1 = w.push("web", "main", "v1");
        let mut c = w.controller(pool);
        c.head_polling = HeadPolling::All;
        run(&c, Trigger::Startup).await;
        w.app("web", "main");
        let a = run(&c, Trigger::Wake).await;
        assert!(!waits_for_head(&a, "web"), "{:?}", a.plan.warnings);
        assert_eq!(releases(pool, "web").await, [(1, c1.clone())]);
        // A known head moves on the timer's runs, not on others.
        let c2 = w.push("web", "main", "v2");
        assert_eq!(run(&c, Trigger::Wake).await.status, ReconcileStatus::Noop);
        run(&c, Trigger::Timer).await;
        assert_eq!(releases(pool, "web").await, [(1, c1), (2, c2)]);
    })
    .await
    .expect("the test finished in time");
}
