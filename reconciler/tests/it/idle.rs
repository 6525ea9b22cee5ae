//! An idle control plane costs a fetch: a reconcile whose config commit, source heads and observed state
//! did not change plans nothing and records nothing ([`Outcome::Unchanged`]), and a change to any of
//! them (a commit, a change mark left by a write to a planner table, a node whose heartbeat aged past the
//! threshold) plans again. Against a real PostgreSQL (the triggers of `observed_changes`) and a real git
//! remote (the config repository, and app sources whose branch heads are listed once per URL).

use std::time::Duration;

use cairn_reconciler::controller::{ConfigSource, Controller, HeadPolling, Outcome, Trigger};
use cairn_reconciler::source::git::GitSource;
use cairn_reconciler::source::heads::HeadPoller;
use cairn_reconciler::store::{ReconcileStatus, state};
use cairn_schema::source::Rewrites;
use cairn_testkit::{fixtures, git};
use sqlx::PgPool;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A bare remote and a work tree that pushes to its `main`.
struct Remote {
    bare: std::path::PathBuf,
    work: std::path::PathBuf,
}

impl Remote {
    fn new(root: &std::path::Path, name: &str) -> Remote {
        let bare = root.join(format!("{name}.git"));
        let work = root.join("work").join(name);
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        git(&bare, &["init", "--bare", "-q"]);
        git(&work, &["init", "-q"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        Remote { bare, work }
    }

    fn write(&self, path: &str, text: &str) {
        let p = self.work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// Commits everything and pushes it to `branch`; the commit id.
    fn push(&self, branch: &str, msg: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", msg]);
        git(
            &self.work,
            &["push", "-q", "origin", &format!("HEAD:{branch}")],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }
}

fn infra() -> String {
    let plan = fixtures::plan("small").price("5").max_replicas(3);
    format!(
        "{plan}\n{}\n{}",
        fixtures::node_runtime().start("node ."),
        fixtures::node("n1")
    )
}

/// An app pinned to a tag (no branch head to read).
fn pinned_app(name: &str, log_level: &str) -> String {
    format!(
        "[app.{name}]\nplan = \"small\"\nruntime = \"node\"\nreplicas = 1\n\
         env = {{ LOG_LEVEL = \"{log_level}\" }}\n\
         [app.{name}.source]\nurl = \"https://github.com/acme/{name}.git\"\nrev = \"v1\"\n"
    )
}

/// A config remote whose `main` declares the infrastructure and three apps pinned to a tag,
/// `app0` to `app2`.
fn three_pinned_apps(root: &std::path::Path) -> Remote {
    let config = Remote::new(root, "config");
    config.write("cairn.toml", &fixtures::settings().to_string());
    config.write("infra.toml", &infra());
    for i in 0..3 {
        config.write(
            &format!("apps/app{i}.toml"),
            &pinned_app(&format!("app{i}"), "info"),
        );
    }
    config.push("main", "initial");
    config
}

/// Runs a reconcile; whether it planned (from the controller's count), and its outcome.
async fn tick(c: &Controller, trigger: Trigger) -> (bool, Outcome) {
    let before = c.plans_made();
    let outcome = c.reconcile(trigger).await.unwrap();
    let planned = c.plans_made() > before;
    match &outcome {
        Outcome::Unchanged { .. } => assert!(!planned, "an unchanged run made a plan"),
        Outcome::Applied(_) => assert!(planned, "an applied run made no plan"),
        other => panic!("unexpected outcome {other:?}"),
    }
    (planned, outcome)
}

fn is_noop(o: &Outcome) -> bool {
    matches!(o, Outcome::Applied(a) if a.status == ReconcileStatus::Noop)
}

/// Ticks until one plans nothing new (the first after a change may apply, the next is then empty; or
/// the last already was), then checks that the following ticks do not plan at all.
async fn settle(c: &Controller) {
    let mut n = 0;
    loop {
        let (_, o) = tick(c, Trigger::Timer).await;
        if is_noop(&o) || matches!(o, Outcome::Unchanged { .. }) {
            break;
        }
        n += 1;
        assert!(n < 5, "the plans never became empty: {o:?}");
    }
    for _ in 0..3 {
        let (planned, o) = tick(c, Trigger::Timer).await;
        assert!(!planned, "an idle tick planned: {o:?}");
    }
}

async fn history_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM reconciliations")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tick_does_not_plan_and_any_new_input_plans_again() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tmp = tempfile::tempdir().unwrap();
        let config = three_pinned_apps(tmp.path());
        let source = GitSource::new(config.url(), "main", tmp.path().join("cache"));
        let mut c = Controller::new(pool.clone(), ConfigSource::Git(source), None);
        // Short enough for the test to wait out a heartbeat's age, long enough not to pass between
        // two ticks that must not plan.
        c.offline_after = Duration::from_secs(3);

        let (planned, o) = tick(&c, Trigger::Startup).await;
        assert!(
            planned && matches!(&o, Outcome::Applied(a) if a.status == ReconcileStatus::Applied)
        );
        settle(&c).await;
        let rows = history_rows(pool).await;
        let plans = c.plans_made();
        for trigger in [Trigger::Timer, Trigger::Wake, Trigger::Timer] {
            assert!(!tick(&c, trigger).await.0, "{trigger}");
        }
        assert_eq!(c.plans_made(), plans);
        assert_eq!(
            history_rows(pool).await,
            rows,
            "an unchanged run records nothing"
        );
        let metrics = cairn_reconciler::metrics::global().render(None).await;
        assert!(
            metrics.lines().any(
                |l| l.starts_with("cairn_reconciles_total{result=\"unchanged\"}")
                    && !l.ends_with(" 0")
            ),
            "{metrics}"
        );
        // An operator's run always plans.
        assert!(tick(&c, Trigger::Manual).await.0);

        // A config commit plans again.
        config.write("apps/app1.toml", &pinned_app("app1", "debug"));
        config.push("main", "app1 debug");
        let (planned, o) = tick(&c, Trigger::Timer).await;
        assert!(planned);
        assert!(
            matches!(&o, Outcome::Applied(a) if a.status == ReconcileStatus::Applied),
            "{o:?}"
        );
        settle(&c).await;
        // The controller let go of each snapshot, so the commit was assembled incrementally: only the
        // first read assembled the repository afresh.
        match &*c.source.lock().await {
            ConfigSource::Git(g) => assert_eq!(g.fresh_assemblies(), 1),
            ConfigSource::Dir(_) => unreachable!("a git source"),
        }

        // A write to a planner table (a restart request, as `cairn restart` makes) plans again.
        let app0: cairn_schema::Name = "app0".parse().unwrap();
        state::request_restart(&mut pool.acquire().await.unwrap(), &app0)
            .await
            .unwrap();
        let (planned, o) = tick(&c, Trigger::Wake).await;
        assert!(planned);
        assert!(
            matches!(&o, Outcome::Applied(a) if a.status == ReconcileStatus::Applied),
            "{o:?}"
        );
        settle(&c).await;

        // The node joins (a new status row): planned again.
        sqlx::query(
            "INSERT INTO node_status (node, state, joined_at, last_heartbeat) \
             VALUES ('n1', 'online', now(), now())",
        )
        .execute(pool)
        .await
        .unwrap();
        assert!(tick(&c, Trigger::Timer).await.0);
        settle(&c).await;

        // A heartbeat that reports what it always does moves the clock only: no plan.
        sqlx::query(
            "UPDATE node_status SET last_heartbeat = now(), reported_at = now(), \
             agent_version = 'test', replicas = '[]'::jsonb WHERE node = 'n1'",
        )
        .execute(pool)
        .await
        .unwrap();
        assert!(!tick(&c, Trigger::Timer).await.0);

        // Its heartbeat ages past the threshold with no write at all: the node is offline to the
        // planner, which must see it.
        let heard: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT last_heartbeat FROM node_status WHERE node = 'n1'")
                .fetch_one(pool)
                .await
                .unwrap();
        let offline_at = heard + chrono::Duration::from_std(c.offline_after).unwrap();
        while chrono::Utc::now() <= offline_at + chrono::Duration::milliseconds(100) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            tick(&c, Trigger::Timer).await.0,
            "an aged heartbeat plans again"
        );
        settle(&c).await;

        // A change committed by someone else's transaction while nothing else moved (the node's state
        // as the liveness monitor writes it) plans again.
        sqlx::query("UPDATE node_status SET state = 'offline' WHERE node = 'n1'")
            .execute(pool)
            .await
            .unwrap();
        assert!(tick(&c, Trigger::Wake).await.0);
        settle(&c).await;
    })
    .await
    .expect("the test finished within its time bound");
}

/// Two remotes serve 40 apps on three branches: one timer run lists each remote's refs once (not once
/// per app) and records every app's own branch head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_heads_are_listed_once_per_remote_url() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tmp = tempfile::tempdir().unwrap();
        let remotes = tmp.path().join("remotes");
        let mono = Remote::new(&remotes, "mono");
        mono.write("index.js", "1");
        let mono_main = mono.push("main", "main");
        mono.write("index.js", "2");
        let mono_next = mono.push("next", "next");
        let other = Remote::new(&remotes, "other");
        let other_main = other.push("main", "main");

        let dir = tmp.path().join("config");
        std::fs::create_dir_all(dir.join("apps")).unwrap();
        std::fs::write(dir.join("cairn.toml"), fixtures::settings().to_string()).unwrap();
        std::fs::write(dir.join("infra.toml"), infra()).unwrap();
        let mut want = Vec::new();
        for i in 0..40 {
            let (repo, branch, head) = match i % 4 {
                0 | 1 => ("mono", "main", &mono_main),
                2 => ("mono", "next", &mono_next),
                _ => ("other", "main", &other_main),
            };
            let name = format!("app{i}");
            std::fs::write(
                dir.join("apps").join(format!("{name}.toml")),
                format!(
                    "[app.{name}]\nplan = \"small\"\nruntime = \"node\"\nreplicas = 1\n\
                     [app.{name}.source]\nurl = \"https://example.com/acme/{repo}.git\"\n\
                     branch = \"{branch}\"\n"
                ),
            )
            .unwrap();
            want.push((name, branch.to_owned(), head.clone()));
        }
        let rewrites = Rewrites::parse([format!(
            "https://example.com/acme/=file://{}/",
            remotes.display()
        )])
        .unwrap();
        let mut c = Controller::new(pool.clone(), ConfigSource::Dir(dir), None);
        c.heads = Some(tokio::sync::Mutex::new(HeadPoller::new(
            tmp.path().join("heads.git"),
            rewrites,
        )));
        c.head_polling = HeadPolling::All;

        let listings = async || c.heads.as_ref().unwrap().lock().await.listings();
        c.reconcile(Trigger::Startup).await.unwrap();
        assert_eq!(listings().await, 2, "one listing per remote URL");
        let mut got: Vec<(String, String, String)> =
            sqlx::query_as("SELECT app, branch, commit FROM source_heads")
                .fetch_all(pool)
                .await
                .unwrap();
        got.sort();
        want.sort();
        assert_eq!(got, want);

        // Every timer run asks again, once per URL; a moved branch is recorded.
        mono.write("index.js", "3");
        let mono_next2 = mono.push("next", "next again");
        c.reconcile(Trigger::Timer).await.unwrap();
        assert_eq!(listings().await, 4);
        let moved: Vec<(String,)> =
            sqlx::query_as("SELECT app FROM source_heads WHERE commit = $1 ORDER BY app")
                .bind(&mono_next2)
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(moved.len(), 10, "{moved:?}");
    })
    .await
    .expect("the test finished within its time bound");
}

/// The apps' own rows of an observed state.
type AppsRows = (
    std::collections::BTreeMap<cairn_schema::Name, cairn_plan::observed::AppliedApp>,
    Vec<cairn_plan::observed::ReplicaPlacement>,
    std::collections::BTreeMap<cairn_schema::Name, cairn_plan::observed::ReleaseRecord>,
    std::collections::BTreeMap<cairn_schema::Name, cairn_plan::observed::CommitId>,
    std::collections::BTreeMap<cairn_schema::Name, u64>,
    std::collections::BTreeMap<cairn_schema::Name, u64>,
);

fn apps_rows(o: cairn_plan::observed::Observed) -> AppsRows {
    (
        o.apps,
        o.placements,
        o.releases,
        o.source_heads,
        o.restart_requests,
        o.rollback_pins,
    )
}

/// What the controller kept, and what a full read gives now.
async fn kept_and_read(c: &Controller, pool: &PgPool) -> (AppsRows, AppsRows) {
    let kept = c.kept_observed().get().expect("a state is kept");
    let read = state::load_observed(pool).await.unwrap();
    (apps_rows(kept), apps_rows(read))
}

/// Between reconciles the controller keeps the observed state, and an apply reads again only the apps
/// whose rows a change touched (their marks in `observed_app_changes`), plus what every app reads: what
/// it keeps equals a full read whenever nothing was written after it. A change too big to name its
/// apps, or marks consumed by another control plane (`cairn apply`), makes it read everything. The
/// planner, told the marked apps and the apps a commit's manifests changed, compares only those (a
/// debug build also compares every app and panics if one was missed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_reads_again_only_the_apps_a_change_touched() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tmp = tempfile::tempdir().unwrap();
        let config = three_pinned_apps(tmp.path());
        let source = || GitSource::new(config.url(), "main", tmp.path().join("cache"));
        let c = Controller::new(pool.clone(), ConfigSource::Git(source()), None);
        let reads = || c.kept_observed().reads();

        assert!(tick(&c, Trigger::Startup).await.0);
        settle(&c).await;
        let after_start = reads();
        assert!(after_start.whole >= 1, "{after_start:?}");
        // Settled on an empty plan: nothing was written after the last read.
        let (kept, read) = kept_and_read(&c, pool).await;
        assert_eq!(kept, read);

        // One app's restart request: its rows are read again, nothing else.
        let app0: cairn_schema::Name = "app0".parse().unwrap();
        state::request_restart(&mut pool.acquire().await.unwrap(), &app0)
            .await
            .unwrap();
        let (planned, o) = tick(&c, Trigger::Wake).await;
        assert!(planned, "{o:?}");
        let reuse = c.planner_reuse();
        assert!(reuse.named && reuse.planned == 1, "{reuse:?}");
        let now = reads();
        assert_eq!(
            (now.whole, now.partial),
            (after_start.whole, after_start.partial + 1),
            "one partial read"
        );
        assert_eq!(
            c.kept_observed().get().unwrap().restart_requests.get(&app0),
            Some(&1)
        );
        settle(&c).await;
        assert_eq!(reads().whole, after_start.whole, "no whole read since");
        let (kept, read) = kept_and_read(&c, pool).await;
        assert_eq!(kept, read);

        // A config commit changing one app: its new release and placements are read back partially.
        config.write("apps/app1.toml", &pinned_app("app1", "debug"));
        config.push("main", "app1 debug");
        assert!(tick(&c, Trigger::Timer).await.0);
        let reuse = c.planner_reuse();
        assert!(reuse.named && reuse.planned == 1, "{reuse:?}");
        settle(&c).await;
        assert_eq!(reads().whole, after_start.whole, "no whole read since");
        let (kept, read) = kept_and_read(&c, pool).await;
        assert_eq!(kept, read);

        // Deletes too: an app removed from the config is gone from what is kept.
        std::fs::remove_file(config.work.join("apps/app2.toml")).unwrap();
        config.push("main", "app2 gone");
        assert!(tick(&c, Trigger::Timer).await.0);
        settle(&c).await;
        let kept = c.kept_observed().get().unwrap();
        let app2: cairn_schema::Name = "app2".parse().unwrap();
        assert!(!kept.apps.contains_key(&app2));
        assert!(kept.placements.iter().all(|p| p.app != app2));
        let (kept, read) = kept_and_read(&c, pool).await;
        assert_eq!(kept, read);

        // Another control plane applies (consuming marks this one never sees): the next read is whole.
        let whole = reads().whole;
        let other = Controller::new(pool.clone(), ConfigSource::Git(source()), None);
        state::request_restart(&mut pool.acquire().await.unwrap(), &app0)
            .await
            .unwrap();
        other.reconcile(Trigger::Manual).await.unwrap();
        assert!(tick(&c, Trigger::Manual).await.0);
        assert!(!c.planner_reuse().named, "a whole read: every app compared");
        assert_eq!(
            reads().whole,
            whole + 1,
            "marks consumed elsewhere: a whole read"
        );
        settle(&c).await;
        let (kept, read) = kept_and_read(&c, pool).await;
        assert_eq!(kept, read);

        // A statement touching more than 1,000 rows leaves the table-wide mark: a whole read.
        let whole = reads().whole;
        sqlx::query(
            "INSERT INTO restart_requests (app, count) \
             SELECT 'bulk-' || i, 1 FROM generate_series(1, 1001) AS i",
        )
        .execute(pool)
        .await
        .unwrap();
        assert!(tick(&c, Trigger::Wake).await.0);
        assert_eq!(reads().whole, whole + 1, "a bulk change: a whole read");
        settle(&c).await;
        let (kept, read) = kept_and_read(&c, pool).await;
        assert_eq!(kept, read);
        assert_eq!(
            c.kept_observed().get().unwrap().restart_requests.len(),
            1002
        );

        // A whole read is of known inputs all the same: the next change is compared by name again.
        state::request_restart(&mut pool.acquire().await.unwrap(), &app0)
            .await
            .unwrap();
        assert!(tick(&c, Trigger::Wake).await.0);
        let reuse = c.planner_reuse();
        assert!(reuse.named && reuse.planned == 1, "{reuse:?}");
    })
    .await
    .expect("the test finished within its time bound");
}
