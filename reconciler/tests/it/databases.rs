//! Managed databases in the control plane (`cairn_reconciler::databases`, `store::databases`), in
//! process against a real PostgreSQL, with the agents played by the test: an applied `[database.NAME]`
//! gets its row, its instance and a `db_ensure` task for its node; the task's login is sealed to that
//! node only and the password is stored only sealed to the control plane (absent from a pg_dump); the
//! attached app's deploy carries the URL with that password, sealed to the app's node; backups are
//! ledger rows whose result (size, SHA-256) or error is recorded, a final failure is an event; a
//! restore goes into a new instance beside the original; a swap and a rotation make a new release of
//! the attached app. The engine itself is `dbengine`'s (tests/it/e2e/databases.rs runs it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_plan::observed::CommitId;
use cairn_proto::{BackupReport, DatabasePayload, DeployPayload, Outcome, TaskKind};
use cairn_reconciler::controller::{ConfigSource, Controller, Outcome as Reconciled, Trigger};
use cairn_reconciler::deploys::{self, Context};
use cairn_reconciler::queue::{self, Backoff, LeasedTask};
use cairn_reconciler::store::state;
use cairn_schema::{Ciphertext, Identity, Name};
use sqlx::PgPool;
use tokio::sync::Notify;

const LEASE: Duration = Duration::from_secs(60);
const HEAD: &str = "0123456789abcdef0123456789abcdef01234567";

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn demo_identity() -> Identity {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/keys/demo-only-identity.txt");
    Identity::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

struct Plane {
    _tmp: tempfile::TempDir,
    pool: PgPool,
    url: String,
    identity: Identity,
    n1: Identity,
    controller: Controller,
    wake: Notify,
}

impl Plane {
    async fn new(db: &cairn_testkit::pg::TestDb) -> Plane {
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
                "base_domain = \"apps.example.com\"\n[secrets]\nrecipients = [\"{}\"]\n",
                identity.recipient().as_str()
            ),
        );
        write(
            "infra.toml",
            "[plan.small]\ncpu = 0.5\nmemory = \"512MiB\"\ndisk = \"1GiB\"\nprice = \"5.00\"\n\
             max_replicas = 5\n\n[runtime.node]\nimage = \"node:22\"\nstart = \"npm start\"\nport = 3000\n\n\
             [node.n1]\ncpu = 4\nmemory = \"8GiB\"\ndisk = \"100GiB\"\nlabels = { db = \"yes\" }\n\n\
             [node.n2]\ncpu = 4\nmemory = \"8GiB\"\ndisk = \"100GiB\"\n\n\
             [database.main]\nengine = \"postgres\"\nversion = \"15\"\nplan = \"small\"\nnode = \"n1\"\n\
             backup = { schedule = \"0 3 * * *\", to = \"dir:/var/backups/cairn\" }\n",
        );
        write(
            "apps/web.toml",
            "[app.web]\nplan = \"small\"\nruntime = \"node\"\ndatabases = { main = \"DATABASE_URL\" }\n\
             placement = { labels = { db = \"yes\" } }\n\n[app.web.source]\nurl = \"https://github.com/acme/web.git\"\n",
        );
        let controller = Controller::new(
            db.pool().clone(),
            ConfigSource::Dir(dir.clone()),
            Some(demo_identity()),
        );
        state::record_source_head(db.pool(), &name("web"), "main", &CommitId::new(HEAD))
            .await
            .unwrap();
        let plane = Plane {
            _tmp: tmp,
            pool: db.pool().clone(),
            url: db.url().split('?').next().unwrap().to_owned(),
            identity,
            n1: Identity::generate(),
            controller,
            wake: Notify::new(),
        };
        plane.reconcile().await;
        plane
    }

    async fn reconcile(&self) {
        assert!(matches!(
            self.controller.reconcile(Trigger::Manual).await.unwrap(),
            Reconciled::Applied(_)
        ));
    }

    fn ctx(&self) -> Context<'_> {
        Context {
            pool: &self.pool,
            identity: Some(&self.identity),
            hooks: None,
            wake: &self.wake,
            registry: None,
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(2),
            },
            image_wait: Duration::from_secs(5),
        }
    }

    /// Leases n1's due tasks and makes them ready as the agent API does.
    async fn lease(&self) -> Vec<(LeasedTask, Option<DeployPayload>, Option<DatabasePayload>)> {
        let leased = queue::lease(&self.pool, &name("n1"), 10, LEASE)
            .await
            .unwrap();
        deploys::prepare(&self.ctx(), &name("n1"), Some(&self.n1.recipient()), leased)
            .await
            .unwrap()
    }

    async fn report(&self, t: &LeasedTask, outcome: Outcome) {
        let row = queue::node_task(&self.pool, &t.node, t.id)
            .await
            .unwrap()
            .unwrap();
        deploys::finish(&self.ctx(), &row, t.token, &outcome, None)
            .await
            .unwrap();
    }

    /// Queues a backup of `main` now, leases its task and reports it good with `sha256`.
    async fn backed_up_now(&self, sha256: &str) {
        cairn_reconciler::databases::backup_now(&self.pool, &name("main"), "manual")
            .await
            .unwrap();
        let ready = self.lease().await;
        let (t, ..) = ready
            .iter()
            .find(|(t, ..)| t.kind == TaskKind::DbBackup)
            .unwrap();
        self.report(
            t,
            backed_up("main/1.pgdump".to_owned(), 10, sha256.to_owned(), 1),
        )
        .await;
    }

    /// Rewrites `[database.main]`'s `version` in the config directory.
    fn set_version(&self, version: &str) {
        let path = self._tmp.path().join("config/infra.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text.find("version = \"").unwrap() + "version = \"".len();
        let end = start + text[start..].find('"').unwrap();
        std::fs::write(
            &path,
            format!("{}{version}{}", &text[..start], &text[end..]),
        )
        .unwrap();
    }

    async fn instance_state(&self, instance: &str) -> (String, String, i32) {
        sqlx::query_as("SELECT state, version, port FROM database_instances WHERE name = $1")
            .bind(instance)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn current(&self) -> (String, i32) {
        sqlx::query_as("SELECT instance, port FROM databases WHERE name = 'main'")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn upgrade_state(&self) -> String {
        sqlx::query_scalar("SELECT state FROM database_upgrades ORDER BY id DESC LIMIT 1")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    fn open(&self, sealed: &str) -> serde_json::Value {
        let plain = self.n1.decrypt(&Ciphertext::new(sealed).unwrap()).unwrap();
        serde_json::from_slice(plain.expose()).unwrap()
    }

    async fn releases(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM releases WHERE app = 'web'")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    fn dump(&self) -> String {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.path().join("bin/pg_dump")))
                    .filter(|p| p.exists())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        let bin = found.pop().unwrap_or_else(|| "pg_dump".into());
        let out = Command::new(bin).arg(&self.url).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// A `db_backup`'s result as its agent reports it.
fn backed_up(object: String, bytes: u64, sha256: String, duration_ms: u64) -> Outcome {
    Outcome::Done {
        detail: None,
        timings: Default::default(),
        image: None,
        backup: Some(BackupReport {
            object,
            bytes,
            sha256,
            duration_ms,
            counts: None,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_lives_on_its_node_and_its_url_reaches_only_the_attached_app() {
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(&db).await;

    let (node, port, instance): (String, i32, String) =
        sqlx::query_as("SELECT node, port, instance FROM databases WHERE name = 'main'")
            .fetch_one(&plane.pool)
            .await
            .unwrap();
    assert_eq!(
        (node.as_str(), port, instance.as_str()),
        ("n1", 15432, "main")
    );

    let ready = plane.lease().await;
    let kinds: Vec<TaskKind> = ready.iter().map(|(t, ..)| t.kind).collect();
    assert!(
        kinds.contains(&TaskKind::DbEnsure) && kinds.contains(&TaskKind::Deploy),
        "{kinds:?}"
    );
    let (ensure, _, p) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbEnsure)
        .unwrap();
    let p = p.as_ref().expect("a database task carries its payload");
    assert_eq!(
        (p.port, p.user.as_str(), p.db.as_str()),
        (15432, "app", "main")
    );
    let password = plane.open(p.login_sealed.as_deref().expect("sealed at lease"))["password"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(password.len(), 32);
    // Another node cannot open it.
    let other = Identity::generate();
    assert!(
        other
            .decrypt(&Ciphertext::new(p.login_sealed.as_deref().unwrap()).unwrap())
            .is_err()
    );

    let (_, deploy, _) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::Deploy)
        .unwrap();
    let deploy = deploy.as_ref().unwrap();
    let env = plane.open(deploy.secret_env.as_deref().expect("sealed at lease"));
    assert_eq!(
        env["DATABASE_URL"],
        format!("postgres://app:{password}@127.0.0.1:15432/main"),
        "the app on the database's node reaches it on loopback"
    );
    plane
        .report(
            ensure,
            Outcome::Done {
                detail: None,
                timings: Default::default(),
                image: None,
                backup: None,
            },
        )
        .await;

    // A recorded release read back (a drift repair, a replica moved) carries the URL as a secret too:
    // regression, it was refused as a corrupt spec and failed every reconcile after a failed deploy.
    let mut conn = plane.pool.acquire().await.unwrap();
    let recorded = cairn_reconciler::payload::recorded_release(&mut conn, &name("web"), 1)
        .await
        .unwrap()
        .expect("release 1 is recorded");
    assert!(matches!(
        recorded.spec.env.get("DATABASE_URL"),
        Some(cairn_proto::ReleaseEnv::Secret { .. })
    ));
    drop(conn);

    // The password is stored only sealed to the control plane: not in a dump of its database.
    let dump = plane.dump();
    assert!(dump.contains("BEGIN AGE ENCRYPTED FILE"));
    assert!(
        !dump.contains(&password),
        "the database password is in the control plane's dump"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_are_ledger_rows_and_a_final_failure_is_an_event() {
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(&db).await;
    let _ = plane.lease().await;

    let id = cairn_reconciler::databases::backup_now(&plane.pool, &name("main"), "manual")
        .await
        .unwrap();
    let ready = plane.lease().await;
    let (t, _, p) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbBackup)
        .unwrap();
    let p = p.as_ref().unwrap();
    assert_eq!(
        p.object.as_deref(),
        Some(format!("main/{id}.pgdump").as_str())
    );
    let target = p.target.as_ref().expect("a backup carries its target");
    assert_eq!(
        target.to,
        cairn_schema::database::BackupTo::Dir {
            path: "/var/backups/cairn".into()
        }
    );
    let sha = "ab".repeat(32);
    plane
        .report(
            t,
            backed_up(format!("main/{id}.pgdump"), 4096, sha.clone(), 120),
        )
        .await;
    let mut conn = plane.pool.acquire().await.unwrap();
    let rows = cairn_reconciler::store::databases::backups(&mut conn, &name("main"), 10)
        .await
        .unwrap();
    assert_eq!(rows[0].state, "ok");
    assert_eq!(
        (rows[0].bytes, rows[0].sha256.as_deref()),
        (Some(4096), Some(sha.as_str()))
    );
    let list = cairn_reconciler::api::databases::list_databases(&plane.pool)
        .await
        .unwrap();
    assert!(list[0].last_good_backup.is_some() && !list[0].backup_overdue);

    // A backup that fails for good: the row says why, an event is recorded, status is red.
    cairn_reconciler::databases::backup_now(&plane.pool, &name("main"), "manual")
        .await
        .unwrap();
    let ready = plane.lease().await;
    let (t, ..) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbBackup)
        .unwrap();
    plane
        .report(
            t,
            Outcome::Failed {
                error: "the target refused the object: disk full".into(),
                retry: false,
            },
        )
        .await;
    let rows = cairn_reconciler::store::databases::backups(&mut conn, &name("main"), 10)
        .await
        .unwrap();
    assert_eq!(rows[0].state, "failed");
    assert!(rows[0].error.as_deref().unwrap().contains("disk full"));
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'database.backup_failed'")
            .fetch_one(&plane.pool)
            .await
            .unwrap();
    assert_eq!(events, 1);
    let list = cairn_reconciler::api::databases::list_databases(&plane.pool)
        .await
        .unwrap();
    assert!(list[0].backup_overdue, "a failed last backup is red");
    let red = cairn_reconciler::databases::warnings(&list);
    assert!(
        red.iter().any(|w| w.contains("its last backup failed")),
        "cairn status shows it: {red:?}"
    );

    // A scheduled run is queued once, however many control planes look.
    sqlx::query("UPDATE database_schedules SET next_at = now() - interval '1 minute'")
        .execute(&plane.pool)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let (a, b) = tokio::join!(
        cairn_reconciler::databases::run_due(&plane.pool, now),
        cairn_reconciler::databases::run_due(&plane.pool, now)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 1);
}

/// A verification restores the latest good backup on the database's node (a `db_verify` carrying the
/// object, its checksum, the target and the counts recorded at the dump); its result is a ledger row
/// `cairn db backups` shows; one runs on the `verify` schedule, queued once however many control
/// planes look; a failed one is a `database.verify_failed` event and red in status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_restores_the_latest_good_backup_and_a_failure_is_an_event_and_red() {
    use cairn_reconciler::databases::{run_due, verify_now, warnings};
    use cairn_reconciler::store::databases::backups;

    let db = cairn_testkit::test_db!();
    let plane = Plane::new(&db).await;
    let _ = plane.lease().await;
    let e = verify_now(&plane.pool, &name("main")).await.unwrap_err();
    assert!(e.to_string().contains("no good backup"), "{e}");

    // A good backup that recorded its counts at the dump.
    let dumped: std::collections::BTreeMap<String, u64> = [
        ("public.orders".to_owned(), 1000),
        ("public.users".to_owned(), 7),
    ]
    .into();
    let id = cairn_reconciler::databases::backup_now(&plane.pool, &name("main"), "manual")
        .await
        .unwrap();
    let ready = plane.lease().await;
    let (t, ..) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbBackup)
        .unwrap();
    let sha = "cd".repeat(32);
    let mut done = backed_up(format!("main/{id}.pgdump"), 4096, sha.clone(), 80);
    if let Outcome::Done {
        backup: Some(b), ..
    } = &mut done
    {
        b.counts = Some(dumped.clone());
    }
    plane.report(t, done).await;

    let verification = verify_now(&plane.pool, &name("main")).await.unwrap();
    let ready = plane.lease().await;
    let (t, _, p) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbVerify)
        .expect("a db_verify task on the database's node");
    let p = p.as_ref().unwrap();
    assert_eq!(
        p.object.as_deref(),
        Some(format!("main/{id}.pgdump").as_str())
    );
    assert_eq!(p.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(p.backup_id, Some(id));
    assert_eq!(p.expected_counts.as_ref(), Some(&dumped));
    assert!(p.target.is_some(), "it reads the backup from its target");
    assert!(p.login_sealed.is_some());
    let mut verified = backed_up(format!("main/{id}.pgdump"), 4096, sha.clone(), 900);
    if let Outcome::Done {
        backup: Some(b), ..
    } = &mut verified
    {
        b.counts = Some(dumped.clone());
    }
    plane.report(t, verified).await;
    let mut conn = plane.pool.acquire().await.unwrap();
    let rows = backups(&mut conn, &name("main"), 10).await.unwrap();
    assert_eq!(rows[0].id, id);
    assert_eq!(rows[0].counts.as_ref(), Some(&dumped));
    assert_eq!(rows[0].verified.as_deref(), Some("ok"));
    let (state, counts): (String, serde_json::Value) =
        sqlx::query_as("SELECT state, counts FROM database_verifications WHERE id = $1")
            .bind(verification)
            .fetch_one(&plane.pool)
            .await
            .unwrap();
    assert_eq!(state, "ok");
    assert_eq!(counts["public.orders"], 1000);
    let list = cairn_reconciler::api::databases::list_databases(&plane.pool)
        .await
        .unwrap();
    assert!(list[0].last_verified.is_some() && !list[0].verify_failed);

    // On its schedule (weekly unless the manifest says otherwise): queued once, moved a week on.
    sqlx::query("UPDATE database_schedules SET verify_next_at = now() - interval '1 minute'")
        .execute(&plane.pool)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let (a, b) = tokio::join!(run_due(&plane.pool, now), run_due(&plane.pool, now));
    assert_eq!(a.unwrap() + b.unwrap(), 1);
    let (verify, next): (String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT verify, verify_next_at FROM database_schedules")
            .fetch_one(&plane.pool)
            .await
            .unwrap();
    assert_eq!(verify, "@weekly");
    assert!(next > now + chrono::Duration::days(1), "{next}");

    // It fails for good: the row says why, an event, red in status.
    let ready = plane.lease().await;
    let (t, ..) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbVerify)
        .unwrap();
    plane
        .report(
            t,
            Outcome::Failed {
                error: "the restore holds other rows than the backup was taken with: public.orders: 999 restored, 1000 at the dump".into(),
                retry: false,
            },
        )
        .await;
    let rows = backups(&mut conn, &name("main"), 10).await.unwrap();
    assert_eq!(rows[0].verified.as_deref(), Some("failed"));
    assert!(
        rows[0]
            .verify_error
            .as_deref()
            .unwrap()
            .contains("999 restored")
    );
    let events: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT message, detail FROM events WHERE kind = 'database.verify_failed'")
            .fetch_all(&plane.pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].1["backup"], id);
    let list = cairn_reconciler::api::databases::list_databases(&plane.pool)
        .await
        .unwrap();
    assert!(list[0].verify_failed);
    let red = warnings(&list);
    assert!(
        red.iter()
            .any(|w| w.contains("verification restore failed")),
        "{red:?}"
    );
}

/// No good backup within two of the schedule's intervals (daily here) is a `database.backup_overdue`
/// event, once per recovery point however many control planes look, and red in status: counted from
/// the schedule's declaration while no backup succeeded, then from the last good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_overdue_by_two_intervals_are_an_event_once_per_recovery_point() {
    use cairn_reconciler::databases::announce_overdue;

    let db = cairn_testkit::test_db!();
    let plane = Plane::new(&db).await;
    let _ = plane.lease().await;
    let overdue_events = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE kind = 'database.backup_overdue'",
        )
        .fetch_one(&plane.pool)
        .await
        .unwrap()
    };
    let listed_overdue = || async {
        cairn_reconciler::api::databases::list_databases(&plane.pool)
            .await
            .unwrap()[0]
            .backup_overdue
    };
    let day = chrono::Duration::days(1);
    let now = chrono::Utc::now();
    // Declared just now, never backed up: not overdue yet; two days and a bit later it is.
    assert_eq!(announce_overdue(&plane.pool, now).await.unwrap(), 0);
    assert!(!listed_overdue().await);
    let later = now + day * 2 + chrono::Duration::hours(1);
    let (a, b) = tokio::join!(
        announce_overdue(&plane.pool, later),
        announce_overdue(&plane.pool, later)
    );
    assert_eq!(
        a.unwrap() + b.unwrap(),
        1,
        "announced once by two control planes"
    );
    assert_eq!(announce_overdue(&plane.pool, later).await.unwrap(), 0);
    assert_eq!(overdue_events().await, 1);
    let message: String =
        sqlx::query_scalar("SELECT message FROM events WHERE kind = 'database.backup_overdue'")
            .fetch_one(&plane.pool)
            .await
            .unwrap();
    assert!(message.contains("no good backup yet"), "{message}");
    sqlx::query("UPDATE database_schedules SET since = since - interval '3 days'")
        .execute(&plane.pool)
        .await
        .unwrap();
    assert!(listed_overdue().await, "status shows it red");

    // A good backup: not overdue; two intervals past it, overdue again, announced again.
    plane.backed_up_now(&"ef".repeat(32)).await;
    assert!(!listed_overdue().await);
    assert_eq!(announce_overdue(&plane.pool, now).await.unwrap(), 0);
    let much_later = now + day * 3;
    assert_eq!(announce_overdue(&plane.pool, much_later).await.unwrap(), 1);
    assert_eq!(announce_overdue(&plane.pool, much_later).await.unwrap(), 0);
    assert_eq!(overdue_events().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_goes_beside_the_original_and_swap_and_rotate_release_the_attached_app() {
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(&db).await;
    let _ = plane.lease().await;
    // No good backup yet: nothing to restore.
    assert!(
        cairn_reconciler::databases::restore(&plane.pool, &name("main"), None, &name("copy"))
            .await
            .is_err()
    );
    plane.backed_up_now(&"cd".repeat(32)).await;
    // Never into the original.
    assert!(
        cairn_reconciler::databases::restore(&plane.pool, &name("main"), None, &name("main"))
            .await
            .is_ok(),
        "--latest into the database's own name is its own fresh instance"
    );
    cairn_reconciler::databases::restore(&plane.pool, &name("main"), None, &name("copy"))
        .await
        .unwrap();
    assert!(matches!(
        cairn_reconciler::databases::restore(&plane.pool, &name("main"), None, &name("copy")).await,
        Err(cairn_reconciler::databases::DbOpError::InstanceExists(_))
    ));
    let ready = plane.lease().await;
    let restores: Vec<&DatabasePayload> = ready
        .iter()
        .filter(|(t, ..)| t.kind == TaskKind::DbRestore)
        .filter_map(|(_, _, p)| p.as_ref())
        .collect();
    let copy = restores
        .iter()
        .find(|p| p.instance.as_str() == "copy")
        .unwrap();
    assert_eq!(copy.port, 15433, "beside the original");
    assert_eq!(copy.sha256.as_deref(), Some("cd".repeat(32).as_str()));

    let before = plane.releases().await;
    cairn_reconciler::databases::swap(&plane.pool, &name("main"), &name("copy"))
        .await
        .unwrap();
    plane.reconcile().await;
    assert_eq!(
        plane.releases().await,
        before + 1,
        "a swap releases the attached app"
    );
    cairn_reconciler::databases::rotate(&plane.pool, &name("main"))
        .await
        .unwrap();
    plane.reconcile().await;
    assert_eq!(
        plane.releases().await,
        before + 2,
        "a rotation releases the attached app"
    );
}

fn done(detail: &str) -> Outcome {
    Outcome::Done {
        detail: Some(detail.to_owned()),
        timings: Default::default(),
        image: None,
        backup: None,
    }
}

/// Issue 18: a `version` change is an upgrade into a new instance beside the old one. The apply queues
/// a `db_upgrade` with a new instance (own name, free port, new version, own login) while the database
/// keeps its old one; the agent's success points the database at the new instance (the attached app
/// gets a release with its URL), stops the old one (its data kept: the pre-upgrade instance), and
/// `finish-upgrade` drops it; the current instance is never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_change_upgrades_into_a_new_instance_and_finish_upgrade_drops_the_old() {
    use cairn_reconciler::databases::{self as dbs, DbOpError};
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(&db).await;
    let first = plane.lease().await;
    let old_password = first
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbEnsure)
        .and_then(|(_, _, p)| p.as_ref()?.login_sealed.clone())
        .map(|s| plane.open(&s)["password"].as_str().unwrap().to_owned())
        .unwrap();
    for (t, ..) in &first {
        plane.report(t, done("ok")).await;
    }
    let before = plane.releases().await;

    plane.set_version("15.13");
    plane.reconcile().await;
    assert_eq!(
        plane.current().await,
        ("main".to_owned(), 15432),
        "still the old one"
    );
    assert_eq!(
        plane.releases().await,
        before,
        "no release until it succeeds"
    );
    let ready = plane.lease().await;
    let (t, _, p) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbUpgrade)
        .expect("a db_upgrade task");
    let p = p.as_ref().unwrap();
    assert_eq!(
        (p.instance.as_str(), p.port, p.version.as_str()),
        ("main-v2", 15433, "15.13")
    );
    let from = p.upgrade_from.as_ref().expect("names the old instance");
    assert_eq!(
        (from.instance.as_str(), from.version.as_str(), from.port),
        ("main", "15", 15432)
    );
    let new_password = plane.open(p.login_sealed.as_deref().unwrap())["password"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new_password, old_password, "a login of its own");
    assert_eq!(plane.upgrade_state().await, "running");
    assert_eq!(
        plane.instance_state("main").await,
        ("active".to_owned(), "15".to_owned(), 15432),
        "the old instance keeps its version"
    );
    // Neither instance can be dropped while the upgrade runs.
    assert!(matches!(
        dbs::drop_instance(&plane.pool, &name("main"), &name("main-v2")).await,
        Err(DbOpError::UpgradeRunning { .. })
    ));
    assert!(matches!(
        dbs::finish_upgrade(&plane.pool, &name("main")).await,
        Err(DbOpError::UpgradeNotFinishable { .. })
    ));

    plane
        .report(
            t,
            done("upgraded main into main-v2: 2 tables, 1003 rows, counts equal"),
        )
        .await;
    assert_eq!(plane.current().await, ("main-v2".to_owned(), 15433));
    assert_eq!(
        plane.instance_state("main").await,
        ("stopped".to_owned(), "15".to_owned(), 15432)
    );
    assert_eq!(
        plane.instance_state("main-v2").await,
        ("active".to_owned(), "15.13".to_owned(), 15433)
    );
    assert_eq!(plane.upgrade_state().await, "ok");
    let list = dbs::list_databases(&plane.pool).await.unwrap();
    let u = list[0].upgrade.as_ref().expect("db list shows the upgrade");
    assert_eq!((u.state.as_str(), u.from_instance.as_str()), ("ok", "main"));
    assert!(u.detail.as_deref().unwrap().contains("counts equal"));

    // The old instance is stopped (its data kept); the attached app gets a release with the new URL.
    plane.reconcile().await;
    assert_eq!(
        plane.releases().await,
        before + 1,
        "the attached app is released"
    );
    let ready = plane.lease().await;
    let stop = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbStop)
        .expect("the old instance is stopped");
    assert_eq!(
        stop.2.as_ref().map(|p| (p.instance.as_str(), p.port)),
        Some(("main", 15432))
    );
    let (_, deploy, _) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::Deploy)
        .expect("a deploy of web");
    let env = plane.open(deploy.as_ref().unwrap().secret_env.as_deref().unwrap());
    assert_eq!(
        env["DATABASE_URL"],
        format!("postgres://app:{new_password}@127.0.0.1:15433/main")
    );
    for (t, ..) in &ready {
        plane.report(t, done("ok")).await;
    }

    // The current instance is never dropped; the pre-upgrade one is, by finish-upgrade.
    let e = dbs::drop_instance(&plane.pool, &name("main"), &name("main-v2"))
        .await
        .unwrap_err();
    assert!(matches!(e, DbOpError::CurrentInstance { .. }), "{e}");
    assert!(e.to_string().contains("current instance"), "{e}");
    assert!(matches!(
        dbs::drop_instance(&plane.pool, &name("main"), &name("nope")).await,
        Err(DbOpError::UnknownInstance { .. })
    ));
    assert_eq!(
        dbs::finish_upgrade(&plane.pool, &name("main"))
            .await
            .unwrap(),
        name("main")
    );
    assert_eq!(plane.upgrade_state().await, "finished");
    let ready = plane.lease().await;
    let (t, _, p) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbDrop)
        .expect("a db_drop task");
    assert_eq!(p.as_ref().unwrap().instance.as_str(), "main");
    assert!(
        p.as_ref().unwrap().login_sealed.is_none(),
        "a drop carries no login"
    );
    plane.report(t, done("dropped")).await;
    assert_eq!(plane.instance_state("main").await.0, "dropped");
    assert!(matches!(
        dbs::finish_upgrade(&plane.pool, &name("main")).await,
        Err(DbOpError::NoUpgrade(_) | DbOpError::UpgradeNotFinishable { .. })
    ));
    assert!(matches!(
        dbs::drop_instance(&plane.pool, &name("main"), &name("main")).await,
        Err(DbOpError::AlreadyDropped(_))
    ));
    let list = dbs::list_databases(&plane.pool).await.unwrap();
    assert!(
        list[0].upgrade.is_none(),
        "a finished upgrade is not listed"
    );
    // No password in a row in plaintext.
    let dump = plane.dump();
    assert!(!dump.contains(&new_password) && !dump.contains(&old_password));
}

/// A failed upgrade leaves the database on its old instance, says why (`cairn db list`, status, a
/// `database.upgrade_failed` event) and has nothing to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_keeps_the_old_instance_serving_and_says_why() {
    use cairn_reconciler::databases::{self as dbs, DbOpError};
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(&db).await;
    for (t, ..) in &plane.lease().await {
        plane.report(t, done("ok")).await;
    }
    let before = plane.releases().await;
    plane.set_version("16");
    plane.reconcile().await;
    let ready = plane.lease().await;
    let (t, ..) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbUpgrade)
        .expect("a db_upgrade task");
    plane
        .report(
            t,
            Outcome::Failed {
                retry: false,
                error: "this node has no PostgreSQL 16 server binaries; it has 15".to_owned(),
            },
        )
        .await;
    assert_eq!(plane.current().await, ("main".to_owned(), 15432));
    assert_eq!(plane.instance_state("main").await.0, "active");
    assert_eq!(plane.instance_state("main-v2").await.0, "dropped");
    assert_eq!(plane.upgrade_state().await, "failed");
    let events: Vec<String> =
        sqlx::query_scalar("SELECT message FROM events WHERE kind = 'database.upgrade_failed'")
            .fetch_all(&plane.pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].contains("no PostgreSQL 16"), "{}", events[0]);
    let list = dbs::list_databases(&plane.pool).await.unwrap();
    let warnings = dbs::warnings(&list);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("upgrade from 15 to 16 failed") && w.contains("main keeps serving")),
        "{warnings:?}"
    );
    assert!(matches!(
        dbs::finish_upgrade(&plane.pool, &name("main")).await,
        Err(DbOpError::UpgradeNotFinishable { .. })
    ));
    // Reconciling again neither retries it on its own nor releases the app: nothing moved.
    let _ = plane.controller.reconcile(Trigger::Manual).await.unwrap();
    assert_eq!(plane.releases().await, before, "no release: nothing moved");
    let upgrades: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE kind = 'db_upgrade'")
        .fetch_one(&plane.pool)
        .await
        .unwrap();
    assert_eq!(upgrades, 1);
}

/// The way back from an upgrade is a swap to the pre-upgrade instance: it is started again and the app
/// released onto it; then `finish-upgrade` refuses to drop it (it is current again), a dropped instance
/// cannot be swapped to, and a new database never gets a dropped instance's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_back_after_an_upgrade_restarts_the_old_instance_and_finish_upgrade_refuses() {
    use cairn_reconciler::databases::{self as dbs, DbOpError};
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(&db).await;
    for (t, ..) in &plane.lease().await {
        plane.report(t, done("ok")).await;
    }
    plane.set_version("16");
    plane.reconcile().await;
    for (t, ..) in &plane.lease().await {
        plane.report(t, done("upgraded")).await;
    }
    assert_eq!(plane.current().await, ("main-v2".to_owned(), 15433));
    plane.reconcile().await;
    for (t, ..) in &plane.lease().await {
        plane.report(t, done("ok")).await;
    }
    let releases = plane.releases().await;

    dbs::swap(&plane.pool, &name("main"), &name("main"))
        .await
        .unwrap();
    assert_eq!(plane.instance_state("main").await.0, "active");
    plane.reconcile().await;
    assert_eq!(plane.releases().await, releases + 1, "released back");
    let ready = plane.lease().await;
    let ensure = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbEnsure)
        .expect("the old instance is started again");
    assert_eq!(
        ensure
            .2
            .as_ref()
            .map(|p| (p.instance.as_str(), p.port, p.version.as_str())),
        Some(("main", 15432, "15"))
    );
    for (t, ..) in &ready {
        plane.report(t, done("ok")).await;
    }
    let e = dbs::finish_upgrade(&plane.pool, &name("main"))
        .await
        .unwrap_err();
    assert!(matches!(e, DbOpError::CurrentInstance { .. }), "{e}");

    // The upgraded instance is now the one not used: it can be dropped, and never swapped to again.
    dbs::drop_instance(&plane.pool, &name("main"), &name("main-v2"))
        .await
        .unwrap();
    let ready = plane.lease().await;
    let (t, ..) = ready
        .iter()
        .find(|(t, ..)| t.kind == TaskKind::DbDrop)
        .unwrap();
    plane.report(t, done("dropped")).await;
    assert_eq!(plane.instance_state("main-v2").await.0, "dropped");
    assert!(matches!(
        dbs::swap(&plane.pool, &name("main"), &name("main-v2")).await,
        Err(DbOpError::AlreadyDropped(_))
    ));
    let mut conn = plane.pool.acquire().await.unwrap();
    let ports = cairn_reconciler::store::databases::instance_ports(&mut conn)
        .await
        .unwrap();
    assert!(
        ports.contains(&15433),
        "a dropped instance's port stays taken"
    );
}

/// An upgrade's new instance is named `<database>-vN`, shortened to stay a valid name, and never one an
/// instance has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_instance_name_is_new_and_valid_for_the_longest_database_name() {
    let db = cairn_testkit::test_db!();
    let mut conn = db.pool().acquire().await.unwrap();
    let long = name(&"a".repeat(63));
    let n = cairn_reconciler::store::databases::new_instance_name(&mut conn, &long)
        .await
        .unwrap();
    assert_eq!(n.as_str(), format!("{}-v2", "a".repeat(60)));
    let spec: cairn_plan::observed::AppliedDatabase = serde_json::from_value(serde_json::json!({
        "engine": "postgres", "version": "15", "plan": "small", "verify": "weekly"
    }))
    .unwrap();
    cairn_reconciler::store::databases::upsert_instance(
        &mut conn,
        &n,
        &long,
        &spec,
        &name("n1"),
        15432,
    )
    .await
    .unwrap();
    let next = cairn_reconciler::store::databases::new_instance_name(&mut conn, &long)
        .await
        .unwrap();
    assert_eq!(next.as_str(), format!("{}-v3", "a".repeat(60)));
}

/// A second `version` change while an upgrade runs is refused visibly (not run beside it); the first
/// still completes and can be finished. A database no longer declared has no current instance: its
/// instances can all be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_version_change_waits_for_the_running_upgrade_and_undeclared_instances_drop() {
    use cairn_reconciler::databases as dbs;
    let db = cairn_testkit::test_db!();
    let plane = Plane::new(&db).await;
    for (t, ..) in &plane.lease().await {
        plane.report(t, done("ok")).await;
    }
    plane.set_version("16");
    plane.reconcile().await;
    plane.set_version("17");
    plane.reconcile().await;
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT to_version, state, error FROM database_upgrades ORDER BY id")
            .fetch_all(&plane.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("16", "queued"));
    assert_eq!((rows[1].0.as_str(), rows[1].1.as_str()), ("17", "failed"));
    assert!(
        rows[1].2.as_deref().unwrap().contains("had not ended"),
        "{rows:?}"
    );
    let ready = plane.lease().await;
    let upgrades: Vec<_> = ready
        .iter()
        .filter(|(t, ..)| t.kind == TaskKind::DbUpgrade)
        .collect();
    assert_eq!(upgrades.len(), 1, "one upgrade at a time");
    plane.report(&upgrades[0].0, done("upgraded")).await;
    assert_eq!(plane.current().await.0, "main-v2");
    assert_eq!(
        dbs::finish_upgrade(&plane.pool, &name("main"))
            .await
            .unwrap(),
        name("main")
    );

    // Undeclared (its row gone, as an apply removing it leaves it): every instance may be dropped.
    sqlx::query("DELETE FROM databases WHERE name = 'main'")
        .execute(&plane.pool)
        .await
        .unwrap();
    dbs::drop_instance(&plane.pool, &name("main"), &name("main-v2"))
        .await
        .unwrap();
    assert!(matches!(
        dbs::drop_instance(&plane.pool, &name("other"), &name("main-v2")).await,
        Err(dbs::DbOpError::UnknownInstance { .. })
    ));
}
