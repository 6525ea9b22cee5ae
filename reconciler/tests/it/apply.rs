//! Applying desired state through the [`Controller`] against a real PostgreSQL, from a directory or a
//! real git remote: the state written is the desired state, applying the same commit again writes
//! nothing, one changed app gets exactly its replicas' tasks, deletes remove and suspends stop, an invalid
//! commit changes nothing and is recorded, racing appliers emit each task once, a source that moves
//! backwards is refused, and no secret's plaintext reaches any row of any table.
//!
//! Every test reads the database back with plain SQL (row dumps, task rows) rather than through the
//! store, so a store bug cannot hide itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_plan::observed::{AppliedApp, CommitId, Fingerprints, ReplicaState};
use cairn_plan::{TaskAction, WarningKind};
use cairn_reconciler::controller::{ConfigSource, Controller, Outcome, Trigger};
use cairn_reconciler::executor::Applied;
use cairn_reconciler::source::git::GitSource;
use cairn_reconciler::store::{self, ReconcileStatus, state};
use cairn_schema::{Desired, EnvValue, Identity, Recipient};
use cairn_testkit::fixtures;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

/// Every test's bound: the slowest does a few dozen applies of a tiny repository.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// An app's branch head, as polling would record it.
const HEAD: &str = "0123456789abcdef0123456789abcdef01234567";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn demo_identity() -> Identity {
    let path = workspace().join("examples/keys/demo-only-identity.txt");
    Identity::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs a test body with a time bound, so a hung lock or query fails the test instead of the run.
async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("the test finished within its time bound");
}

/// The desired state the controller reads now; panics on an invalid repository.
async fn desired(c: &Controller) -> (String, Desired) {
    let (_, snap) = c.read().await.unwrap();
    let d = snap
        .loaded
        .desired
        .clone()
        .unwrap_or_else(|| panic!("{}", snap.loaded.diagnostics));
    (snap.commit.clone().unwrap(), d)
}

/// Records a branch head for every app of the source's current state, so each gets a release.
async fn record_heads(c: &Controller) {
    let (_, d) = desired(c).await;
    for (name, app) in &d.apps {
        state::record_source_head(&c.pool, name, &app.source.branch, &CommitId::new(HEAD))
            .await
            .unwrap();
    }
}

fn fingerprints(d: &Desired, id: &Identity) -> Fingerprints {
    let mut out = Fingerprints::new();
    for (app, a) in &d.apps {
        for (k, v) in &a.env {
            if let EnvValue::Secret { secret } = v {
                out.insert(
                    (app.clone(), k.clone()),
                    id.fingerprint(&id.decrypt(secret).unwrap()),
                );
            }
        }
    }
    out
}

fn applied(o: Outcome) -> Applied {
    match o {
        Outcome::Applied(a) => *a,
        other => panic!("expected an apply, got {other:?}"),
    }
}

async fn reconcile(c: &Controller) -> Applied {
    applied(c.reconcile(Trigger::Manual).await.unwrap())
}

/// One `tasks` row, as the agents will see it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct TaskRow {
    id: i64,
    kind: String,
    app: String,
    slot: i32,
    node: String,
    release: Option<i64>,
    generation: Option<i64>,
    dedup_key: String,
}

impl TaskRow {
    /// What the task does, whoever emitted it: two rows with the same work are a duplicate.
    fn work(&self) -> (String, String, i32, String, Option<i64>) {
        (
            self.kind.clone(),
            self.app.clone(),
            self.slot,
            self.node.clone(),
            self.release,
        )
    }
}

/// A `tasks` row as selected: id, kind, app, slot, node, release, generation, dedup key.
type RawTask = (
    i64,
    String,
    String,
    Option<i32>,
    String,
    Option<i64>,
    Option<i64>,
    String,
);

/// The replica tasks (database tasks, `db_*`, name no slot: `databases.rs` tests them).
async fn tasks(pool: &PgPool) -> Vec<TaskRow> {
    let rows: Vec<RawTask> = sqlx::query_as(
        "SELECT id, kind, app, slot, node, release, generation, dedup_key FROM tasks
          WHERE kind NOT LIKE 'db\\_%' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(
            |(id, kind, app, slot, node, release, generation, dedup_key)| TaskRow {
                id,
                kind,
                app,
                slot: slot.expect("every reconciler task names its slot"),
                node,
                release,
                generation,
                dedup_key,
            },
        )
        .collect()
}

/// Tasks with an id above `after`: what the last apply emitted.
async fn tasks_after(pool: &PgPool, after: i64) -> Vec<TaskRow> {
    tasks(pool)
        .await
        .into_iter()
        .filter(|t| t.id > after)
        .collect()
}

async fn max_task_id(pool: &PgPool) -> i64 {
    tasks(pool).await.last().map_or(0, |t| t.id)
}

/// `(slot, node, state)` of an app's placements, from the table itself.
async fn placements_of(pool: &PgPool, app: &str) -> Vec<(i32, String, String)> {
    sqlx::query_as("SELECT slot, node, state FROM placements WHERE app = $1 ORDER BY slot")
        .bind(app)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Every row of every table in the public schema, as JSON text, sorted per table; `except` tables are
/// left out.
/// What a reconcile writes besides the state: its record, and the consumed change marks and their count
/// (`store::changes`: the apply's own writes leave some, the next reconcile consumes them).
const BOOKKEEPING: &[&str] = &[
    "reconciliations",
    "observed_changes",
    "observed_app_changes",
    "observed_consumptions",
];

async fn dump(pool: &PgPool, except: &[&str]) -> BTreeMap<String, Vec<String>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        tables.iter().any(|t| t == "tasks") && tables.len() >= 12,
        "the dump sees the schema: {tables:?}"
    );
    let mut out = BTreeMap::new();
    for t in tables {
        if except.contains(&t.as_str()) {
            continue;
        }
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            r#"SELECT row_to_json(t)::text FROM "{t}" t ORDER BY 1"#
        ))
        .fetch_all(pool)
        .await
        .unwrap();
        out.insert(t, rows);
    }
    out
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A small config repository in a directory: three plans' worth of nodes, one app per file, secrets
/// encrypted to the demo recipient (the control plane's) and nothing else.
struct Repo {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// The control plane's recipient (the demo key's).
    cp: Recipient,
}

/// The demo identity's recipient (`examples/keys`).
const RECIPIENT: &str = "age169yga2phn8fzeqx5t4cqqvlamskqa5qyprap3l80j6u2lpz90c4qaxv56m";

fn infra() -> String {
    format!(
        "{}\n{}",
        fixtures::plan("small"),
        fixtures::node_runtime().build(&["npm ci"])
    )
}

impl Repo {
    /// `nodes`: `(name, pinned recipient)`.
    fn new(nodes: &[(&str, Option<&Recipient>)]) -> Repo {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("config");
        std::fs::create_dir_all(&dir).unwrap();
        let repo = Repo {
            _tmp: tmp,
            dir,
            cp: demo_identity().recipient(),
        };
        let settings = fixtures::settings()
            .currency("EUR")
            .recipients(&[RECIPIENT]);
        repo.write("cairn.toml", &settings.to_string());
        repo.write("infra.toml", &infra());
        let mut text = String::new();
        for (name, recipient) in nodes {
            let node = fixtures::node(name);
            let node = match recipient {
                Some(r) => node.recipient(r.as_str()),
                None => node,
            };
            text += &format!("{node}\n");
        }
        repo.write("nodes.toml", &text);
        repo
    }

    fn write(&self, path: &str, text: &str) {
        let p = self.dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn remove(&self, path: &str) {
        std::fs::remove_file(self.dir.join(path)).unwrap();
    }

    /// A `{ secret = ... }` value holding `plain`, encrypted to the control plane (and `extra`).
    fn secret(&self, plain: &str, extra: &[&Recipient]) -> String {
        let mut to = vec![self.cp.clone()];
        to.extend(extra.iter().map(|r| (*r).clone()));
        let ct = cairn_schema::secret::encrypt(plain.as_bytes(), &to).unwrap();
        format!("{{ secret = \"\"\"\n{}\"\"\" }}", ct.as_str())
    }

    /// Writes `apps/<name>.toml`; `env` lines go in its env table.
    fn app(&self, name: &str, replicas: u32, extra: &str, env: &[(&str, String)]) {
        let mut text = format!(
            "[app.{name}]\nplan = \"small\"\nruntime = \"node\"\nreplicas = {replicas}\n{extra}\n\
             [app.{name}.source]\nurl = \"https://github.com/acme/{name}.git\"\n\n[app.{name}.env]\n"
        );
        for (k, v) in env {
            text += &format!("{k} = {v}\n");
        }
        self.write(&format!("apps/{name}.toml"), &text);
    }

    fn controller(&self, pool: &PgPool) -> Controller {
        Controller::new(
            pool.clone(),
            ConfigSource::Dir(self.dir.clone()),
            Some(demo_identity()),
        )
    }
}

/// The example config, in a directory of its own (kept while the returned directory lives), reconciled
/// once with its apps' heads recorded.
async fn example_applied(pool: &PgPool) -> (tempfile::TempDir, Controller) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("config");
    copy_dir(&workspace().join("examples/config"), &dir);
    let c = Controller::new(pool.clone(), ConfigSource::Dir(dir), Some(demo_identity()));
    record_heads(&c).await;
    reconcile(&c).await;
    (tmp, c)
}

/// The route table names every applied app's hosts and the nodes with an address, and routes an app only
/// to online nodes that report a healthy, running replica of it; an unchanged state keeps its generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_table_routes_to_online_nodes_with_a_healthy_replica() {
    use cairn_reconciler::routes::Routes;

    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let (_tmp, _applied) = example_applied(pool).await;

        let routes = Routes::default();
        assert!(routes.refresh(pool).await.unwrap(), "the first table differs from the empty one");
        let t = routes.current();
        let nodes: Vec<_> = t
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.address.as_str(), n.ingress))
            .collect();
        assert_eq!(
            nodes,
            [
                ("fra-1", "10.0.1.11:8000", true),
                ("fra-2", "10.0.1.12:8000", false),
                ("nyc-1", "10.0.2.11:8000", true),
            ]
        );
        let shop = t.apps.iter().find(|a| a.app.as_str() == "shop").unwrap();
        assert_eq!(
            shop.hosts,
            ["shop.apps.example.com", "shop.example.com", "www.shop.example.com"]
        );
        assert!(t.apps.iter().all(|a| a.nodes.is_empty()), "no node is online yet");
        assert_eq!(t.apps.len(), 5);

        // fra-1 online with a healthy shop; fra-2 online with an unhealthy one and a stopped healthy-looking
        // one; nyc-1 offline with a healthy one.
        let replica = |app: &str, state: &str, healthy: bool| {
            serde_json::json!({"app": app, "slot": 1, "release": 1, "state": state, "healthy": healthy})
        };
        for (node, state, replicas) in [
            ("fra-1", "online", vec![replica("shop", "running", true)]),
            (
                "fra-2",
                "online",
                vec![replica("shop", "running", false), replica("blog", "stopped", true)],
            ),
            ("nyc-1", "offline", vec![replica("shop", "running", true)]),
        ] {
            sqlx::query(
                "INSERT INTO node_status (node, state, joined_at, replicas) VALUES ($1, $2, now(), $3)
                 ON CONFLICT (node) DO UPDATE SET state = $2, joined_at = now(), replicas = $3",
            )
            .bind(node)
            .bind(state)
            .bind(serde_json::Value::Array(replicas))
            .execute(pool)
            .await
            .unwrap();
        }
        let before = routes.current().generation.clone();
        assert!(routes.refresh(pool).await.unwrap());
        let t = routes.current();
        let routed: Vec<_> = t
            .apps
            .iter()
            .filter(|a| !a.nodes.is_empty())
            .map(|a| (a.app.as_str(), a.nodes.iter().map(|n| n.as_str()).collect::<Vec<_>>()))
            .collect();
        assert_eq!(routed, [("shop", vec!["fra-1"])]);

        // Nothing changed: the same generation, and a long-poll for it waits and runs out.
        assert!(!routes.refresh(pool).await.unwrap());
        let tls = routes.current_tls().generation.clone();
        let changed = routes
            .changed_from(&before, &tls, Duration::ZERO, std::future::pending())
            .await
            .expect("the table changed");
        assert_eq!(changed.table.map(|t| t.generation.clone()), Some(t.generation.clone()));
        assert!(changed.tls.is_none(), "the TLS table did not change");
        assert!(
            routes
                .changed_from(&t.generation, &tls, Duration::from_millis(100), std::future::pending())
                .await
                .is_none()
        );
    })
    .await;
}

/// A route table one control plane publishes reaches the others at once, not on their timer (an hour
/// here): it announces the table on `routes::CHANGED` and they refresh. A refresh that finds nothing new
/// announces nothing, so the replicas do not wake each other in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_table_one_replica_publishes_reaches_the_others_at_once() {
    use cairn_reconciler::routes::{CHANGED, Routes, refresh_loop};
    use cairn_reconciler::worker::Shutdown;

    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let (_tmp, _applied) = example_applied(pool).await;

        let mut announced = sqlx::postgres::PgListener::connect_with(pool).await.unwrap();
        announced.listen(CHANGED).await.unwrap();
        let (a, b) = (Routes::default(), Routes::default());
        let stop = Shutdown::new();
        for r in [&a, &b] {
            tokio::spawn({
                let (pool, r, stop) = (pool.clone(), r.clone(), stop.clone());
                async move { refresh_loop(pool, r, Duration::from_secs(3600), &stop).await }
            });
        }
        // Each starts with a refresh of its own (and announces its first table).
        while a.current().apps.is_empty() || b.current().apps.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = a.current().generation.clone();
        assert_eq!(b.current().generation, first);
        // What each announced at its start (and what a refresh it woke found: nothing new).
        while tokio::time::timeout(Duration::from_millis(500), announced.recv())
            .await
            .is_ok()
        {}

        // fra-1 comes online with a healthy shop; only A hears of it (the heartbeat reached A).
        let replica = serde_json::json!([
            {"app": "shop", "slot": 1, "release": 1, "state": "running", "healthy": true}
        ]);
        sqlx::query(
            "INSERT INTO node_status (node, state, joined_at, replicas) VALUES ('fra-1', 'online', now(), $1)
             ON CONFLICT (node) DO UPDATE SET state = 'online', joined_at = now(), replicas = $1",
        )
        .bind(&replica)
        .execute(pool)
        .await
        .unwrap();
        a.poke();
        let routed = |r: &Routes| {
            r.current()
                .apps
                .iter()
                .find(|x| x.app.as_str() == "shop")
                .map(|x| x.nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        };
        while routed(&b) != Some(vec!["fra-1".to_owned()]) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_ne!(b.current().generation, first);
        assert_eq!(b.current().generation, a.current().generation);
        // A announced it, and B announced the same table in turn (A, refreshing, found nothing new).
        let mut heard = BTreeSet::new();
        while let Ok(n) = tokio::time::timeout(Duration::from_millis(500), announced.recv()).await {
            heard.insert(n.unwrap().payload().to_owned());
        }
        assert_eq!(heard.len(), 2, "one announcement from each replica: {heard:?}");

        // Poked with nothing new: no table, no announcement, so no refresh anywhere else.
        a.poke();
        b.poke();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), announced.recv())
                .await
                .is_err(),
            "a refresh that found nothing new announced a table"
        );
        stop.trigger();
    })
    .await;
}

/// `cairn status` (and `GET /api/v1/status`) shows each node's address and role and, for each app, its
/// hosts, the nodes with a healthy replica and the ingress nodes that take its traffic: exactly what the
/// route table the agents get says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_where_each_app_is_reachable_as_the_route_table_does() {
    use cairn_reconciler::routes::Routes;
    use cairn_reconciler::status;

    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("config");
        copy_dir(&workspace().join("examples/config"), &dir);
        // nyc-1 takes public traffic but has no address: it serves only its own replicas.
        let us = dir.join("nodes/us-east.toml");
        let text = std::fs::read_to_string(&us).unwrap();
        std::fs::write(&us, text.replace("address = \"10.0.2.11:8000\"\n", "")).unwrap();
        let c = Controller::new(pool.clone(), ConfigSource::Dir(dir), Some(demo_identity()));
        record_heads(&c).await;
        reconcile(&c).await;

        let replica = |app: &str, healthy: bool| {
            serde_json::json!({"app": app, "slot": 1, "release": 1, "state": "running", "healthy": healthy})
        };
        for (node, state, replicas) in [
            ("fra-1", "online", vec![replica("shop", true)]),
            ("fra-2", "online", vec![replica("shop", false), replica("api", true)]),
            ("nyc-1", "online", vec![replica("shop", true)]),
        ] {
            sqlx::query(
                "INSERT INTO node_status (node, state, joined_at, last_heartbeat, replicas)
                 VALUES ($1, $2, now(), now(), $3)
                 ON CONFLICT (node) DO UPDATE SET state = $2, replicas = $3",
            )
            .bind(node)
            .bind(state)
            .bind(serde_json::Value::Array(replicas))
            .execute(pool)
            .await
            .unwrap();
        }

        let s = status::load(pool, Duration::from_secs(90), &Default::default()).await.unwrap();
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.address.as_deref(), n.ingress))
            .collect();
        assert_eq!(
            nodes,
            [
                ("fra-1", Some("10.0.1.11:8000"), true),
                ("fra-2", Some("10.0.1.12:8000"), false),
                ("nyc-1", None, true),
            ]
        );
        let app = |name: &str| s.apps.iter().find(|a| a.name == name).unwrap();
        let shop = app("shop");
        assert_eq!(
            shop.hosts,
            ["shop.apps.example.com", "shop.example.com", "www.shop.example.com"]
        );
        assert_eq!(shop.healthy_nodes, ["fra-1", "nyc-1"], "fra-2's replica is not healthy");
        assert_eq!(shop.ingress_nodes, ["fra-1", "nyc-1"], "nyc-1 serves its own replica");
        let api = app("api");
        assert_eq!(api.healthy_nodes, ["fra-2"]);
        assert_eq!(api.ingress_nodes, ["fra-1"], "fra-2 is internal, nyc-1 has no api replica");
        let blog = app("blog");
        assert!(blog.healthy_nodes.is_empty(), "suspended: every request answers 503");
        assert_eq!(blog.hosts, ["blog.apps.example.com", "blog.example.com"]);

        // The same as the agents' route table, app by app.
        let routes = Routes::default();
        routes.refresh(pool).await.unwrap();
        let table = routes.current();
        assert_eq!(table.apps.len(), s.apps.len());
        for r in &table.apps {
            let a = app(r.app.as_str());
            assert_eq!(a.hosts, r.hosts, "{}", r.app);
            let nodes: Vec<String> = r.nodes.iter().map(|n| n.to_string()).collect();
            assert_eq!(a.healthy_nodes, nodes, "{}", r.app);
        }

        // A status from a server older than these fields reads with their defaults.
        let mut json = serde_json::to_value(&s).unwrap();
        for a in json["apps"].as_array_mut().unwrap() {
            let a = a.as_object_mut().unwrap();
            a.remove("hosts");
            a.remove("healthy_nodes");
            a.remove("ingress_nodes");
        }
        for n in json["nodes"].as_array_mut().unwrap() {
            let n = n.as_object_mut().unwrap();
            n.remove("address");
            n.remove("ingress");
        }
        let old: status::Status = serde_json::from_value(json).unwrap();
        assert!(old.apps.iter().all(|a| a.hosts.is_empty()));
        assert!(old.nodes.iter().all(|n| n.ingress && n.address.is_none()));
    })
    .await;
}

/// A status shows a page of apps (by name, after a cursor, or one app) with the count of all, and every
/// node with what all apps use on it, whatever the page: the pages together are the whole status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pages_apps_and_every_page_shows_every_nodes_use() {
    use cairn_reconciler::status;
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let (_repo, _c) = three_apps(pool).await;
        let load = |app: Option<&str>, after: Option<&str>, limit: Option<u32>| {
            let q = status::StatusQuery {
                app: app.map(str::to_owned),
                after: after.map(str::to_owned),
                limit,
            };
            async move {
                status::load(pool, Duration::from_secs(90), &q)
                    .await
                    .unwrap()
            }
        };
        let whole = load(None, None, None).await;
        assert_eq!(whole.apps_total, Some(3));
        assert_eq!(whole.next_after, None, "three apps fit the default page");
        let names = |s: &status::Status| s.apps.iter().map(|a| a.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&whole), ["api", "web", "worker"]);
        let placed: u32 = whole.nodes.iter().map(|n| n.replicas).sum();
        assert_eq!(placed, 5);
        // What the database sums is what the observed state's placements and plans add up to.
        let usage = status::usage(&state::load_observed(pool).await.unwrap());
        for n in &whole.nodes {
            let node: cairn_schema::Name = n.name.parse().unwrap();
            let u = usage.get(&node).copied().unwrap_or_default();
            assert_eq!(
                (
                    n.replicas,
                    n.used_cpu_millis,
                    n.used_memory_bytes,
                    n.used_disk_bytes
                ),
                (u.replicas, u.cpu_millis, u.memory_bytes, u.disk_bytes),
                "{}",
                n.name
            );
        }

        let first = load(None, None, Some(2)).await;
        assert_eq!(names(&first), ["api", "web"]);
        assert_eq!(first.next_after.as_deref(), Some("web"));
        assert_eq!(first.apps_total, Some(3));
        let second = load(None, first.next_after.as_deref(), Some(2)).await;
        assert_eq!(names(&second), ["worker"]);
        assert_eq!(second.next_after, None);
        let one = load(Some("web"), None, None).await;
        assert_eq!(names(&one), ["web"]);
        assert_eq!(one.next_after, None);
        assert!(load(Some("nope"), None, None).await.apps.is_empty());
        // Each page shows every app it holds as the whole status does, and every node the same.
        for page in [&first, &second, &one] {
            assert_eq!(page.nodes, whole.nodes);
            for a in &page.apps {
                assert_eq!(Some(a), whole.apps.iter().find(|w| w.name == a.name));
            }
        }
        // A limit is bounded.
        assert_eq!(load(None, None, Some(0)).await.apps.len(), 1);
        assert_eq!(load(None, None, Some(u32::MAX)).await.apps.len(), 3);
    })
    .await;
}

/// web (2 replicas, a plain and a secret var), api (2, a secret), worker (1, plain only) on three
/// nodes, applied once with every app's head known.
async fn three_apps(pool: &PgPool) -> (Repo, Controller) {
    let repo = Repo::new(&[("n1", None), ("n2", None), ("n3", None)]);
    repo.app(
        "web",
        2,
        "",
        &[
            ("LOG_LEVEL", "\"info\"".into()),
            ("DB_URL", repo.secret("postgres://web", &[])),
        ],
    );
    repo.app(
        "api",
        2,
        "",
        &[("API_KEY", repo.secret("api-key-one", &[]))],
    );
    repo.app("worker", 1, "", &[("QUEUE", "\"jobs\"".into())]);
    let c = repo.controller(pool);
    record_heads(&c).await;
    let a = reconcile(&c).await;
    assert_eq!(a.status, ReconcileStatus::Applied);
    assert_eq!(a.tasks, 5, "one deploy per replica: {:?}", a.plan.tasks);
    (repo, c)
}

/// `(kind, slot, node)` of tasks, sorted.
fn work_of(rows: &[TaskRow]) -> BTreeSet<(String, String, i32, String)> {
    rows.iter()
        .map(|t| (t.kind.clone(), t.app.clone(), t.slot, t.node.clone()))
        .collect()
}

/// `(kind, app, slot, node)` for every placement of `app`.
async fn expected_for(
    pool: &PgPool,
    kind: &str,
    app: &str,
) -> BTreeSet<(String, String, i32, String)> {
    placements_of(pool, app)
        .await
        .into_iter()
        .map(|(slot, node, _)| (kind.to_owned(), app.to_owned(), slot, node))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_the_example_repository_writes_exactly_the_desired_state() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("config");
        copy_dir(&workspace().join("examples/config"), &dir);
        let id = demo_identity();
        let c = Controller::new(
            pool.clone(),
            ConfigSource::Dir(dir.clone()),
            Some(demo_identity()),
        );
        record_heads(&c).await;
        let (commit, d) = desired(&c).await;

        let a = reconcile(&c).await;
        assert_eq!(a.status, ReconcileStatus::Applied);
        let o = state::load_observed(pool).await.unwrap();
        assert_eq!(
            o.applied_commit.as_ref().map(CommitId::as_str),
            Some(commit.as_str())
        );
        assert_eq!(o.generation, 1);
        assert_eq!(o.plans, d.plans);
        assert_eq!(o.runtimes, d.runtimes);
        assert_eq!(o.nodes, d.nodes);
        let fps = fingerprints(&d, &id);
        let want_apps: BTreeMap<_, _> = d
            .apps
            .iter()
            .map(|(n, app)| (n.clone(), AppliedApp::from_desired(n, app, &fps).unwrap()))
            .collect();
        assert_eq!(o.apps, want_apps);
        assert_eq!(o.placements, *a.plan.placements);

        // Every replica of every running app is placed and has a deploy task; a suspended app runs none.
        let mut want_deploys = BTreeSet::new();
        for (name, app) in &d.apps {
            let placed: Vec<_> = o.placements.iter().filter(|p| &p.app == name).collect();
            let running = placed
                .iter()
                .filter(|p| p.state == ReplicaState::Running)
                .count();
            let want = if app.suspended {
                0
            } else {
                app.replicas as usize
            };
            // What the scheduler could not place is reported, not dropped (api asks for two `large`
            // replicas in us-east, where one node has room for one).
            let unplaced = a
                .plan
                .warnings
                .iter()
                .filter(|w| w.kind == WarningKind::Unplaced && w.app.as_ref() == Some(name))
                .count();
            assert_eq!(running + unplaced, want, "replicas of {name}");
            for p in placed {
                assert!(d.nodes.contains_key(&p.node), "{p:?} is on a declared node");
                assert_eq!(Some(p.release), o.releases.get(name).map(|r| r.number));
                if p.state == ReplicaState::Running {
                    want_deploys.insert((
                        "deploy".to_owned(),
                        name.to_string(),
                        p.slot as i32,
                        p.node.to_string(),
                    ));
                }
            }
        }
        assert_eq!(
            a.plan
                .warnings
                .iter()
                .filter(|w| w.kind == WarningKind::Unplaced)
                .count(),
            1,
            "{:?}",
            a.plan.warnings
        );
        assert!(
            want_deploys.len() >= 5,
            "the example runs several replicas: {want_deploys:?}"
        );
        let rows = tasks(pool).await;
        assert_eq!(work_of(&rows), want_deploys);
        assert_eq!(rows.len(), want_deploys.len(), "each deploy once");
        // ...and the example's database one db_ensure on its node.
        let ensures: Vec<(String, String)> =
            sqlx::query_as("SELECT app, node FROM tasks WHERE kind = 'db_ensure'")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(ensures, [("main".to_owned(), "fra-1".to_owned())]);
        assert_eq!(a.tasks, rows.len() + 1);
        assert!(rows.iter().all(|t| t.generation == Some(1)));

        // The env rows hold the manifest's ciphertexts, the plain values as written.
        for (name, app) in &d.apps {
            let stored = state::app_env(&mut pool.acquire().await.unwrap(), name)
                .await
                .unwrap();
            assert_eq!(stored.len(), app.env.len(), "env of {name}");
            for e in stored {
                let want = match &app.env[e.key.as_str()] {
                    EnvValue::Plain(v) => v.clone(),
                    EnvValue::Secret { secret } => secret.as_str().to_owned(),
                };
                assert_eq!(e.value, want, "{name}.{}", e.key);
            }
        }
        let recorded: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT status, commit FROM reconciliations ORDER BY id")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(recorded, vec![("applied".to_owned(), Some(commit.clone()))]);

        // The same commit again, from this controller and from a fresh one (cold caches): nothing is
        // written but the history.
        let before = dump(pool, BOOKKEEPING).await;
        for c in [
            &c,
            &Controller::new(
                pool.clone(),
                ConfigSource::Dir(dir.clone()),
                Some(demo_identity()),
            ),
        ] {
            let again = reconcile(c).await;
            assert_eq!(
                again.status,
                ReconcileStatus::Noop,
                "{}",
                again.plan.summary()
            );
            assert_eq!(again.tasks, 0);
            assert!(again.plan.is_empty());
        }
        assert_eq!(dump(pool, BOOKKEEPING).await, before);
        assert_eq!(tasks(pool).await.len(), rows.len(), "no task emitted");
        assert_eq!(
            count(
                pool,
                "SELECT count(*) FROM reconciliations WHERE status = 'noop'"
            )
            .await,
            2
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_one_apps_env_deploys_exactly_its_replicas() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let (repo, c) = three_apps(pool).await;
        let releases = |app: &'static str| {
            let pool = pool.clone();
            async move {
                count(
                    &pool,
                    &format!("SELECT count(*) FROM releases WHERE app = '{app}'"),
                )
                .await
            }
        };

        // A plain value: web's two replicas are deployed again, at a new release; nothing else moves.
        let mark = max_task_id(pool).await;
        repo.app(
            "web",
            2,
            "",
            &[
                ("LOG_LEVEL", "\"debug\"".into()),
                ("DB_URL", repo.secret("postgres://web", &[])),
            ],
        );
        let a = reconcile(&c).await;
        assert_eq!(
            a.plan.summary(),
            "Plan: 0 to add, 1 to change, 0 to destroy."
        );
        let new = tasks_after(pool, mark).await;
        assert_eq!(work_of(&new), expected_for(pool, "deploy", "web").await);
        assert_eq!(new.len(), 2);
        assert_eq!(releases("web").await, 2);
        assert_eq!(releases("api").await, 1);

        // api's secret re-encrypted to one more recipient, same plaintext: no change, no task, no
        // release; only the applied commit moves.
        let admin = Identity::generate().recipient();
        let mark = max_task_id(pool).await;
        repo.app(
            "api",
            2,
            "",
            &[("API_KEY", repo.secret("api-key-one", &[&admin]))],
        );
        let a = reconcile(&c).await;
        assert!(a.plan.changes.is_empty(), "{:?}", a.plan.changes);
        assert!(a.plan.tasks.is_empty() && a.plan.releases.is_empty());
        assert_eq!(tasks_after(pool, mark).await, vec![]);
        assert_eq!(releases("api").await, 1);

        // A new plaintext: exactly api's replicas are deployed, and the plan shows no value.
        let mark = max_task_id(pool).await;
        repo.app(
            "api",
            2,
            "",
            &[("API_KEY", repo.secret("api-key-two", &[&admin]))],
        );
        let a = reconcile(&c).await;
        assert_eq!(
            a.plan.summary(),
            "Plan: 0 to add, 1 to change, 0 to destroy."
        );
        let field = &a.plan.changes[0].fields[0];
        assert_eq!(field.path, "env.API_KEY");
        assert!(
            field.after.as_ref().is_some_and(|s| s.is_secret()),
            "{field:?}"
        );
        let json = serde_json::to_string(&a.plan).unwrap();
        assert!(
            !json.contains("api-key-"),
            "the plan shows no secret: {json}"
        );
        let new = tasks_after(pool, mark).await;
        assert_eq!(work_of(&new), expected_for(pool, "deploy", "api").await);
        assert_eq!(new.len(), 2);
        assert_eq!(releases("api").await, 2);
        assert_eq!(releases("worker").await, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_app_removes_its_replicas_and_its_rows() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let (repo, c) = three_apps(pool).await;
        let placed = placements_of(pool, "api").await;
        assert_eq!(placed.len(), 2);
        let mark = max_task_id(pool).await;

        repo.remove("apps/api.toml");
        let a = reconcile(&c).await;
        assert_eq!(
            a.plan.summary(),
            "Plan: 0 to add, 0 to change, 1 to destroy."
        );
        let new = tasks_after(pool, mark).await;
        let want: BTreeSet<_> = placed
            .iter()
            .map(|(slot, node, _)| ("remove".to_owned(), "api".to_owned(), *slot, node.clone()))
            .collect();
        assert_eq!(work_of(&new), want);
        assert_eq!(new.len(), 2);
        for table in [
            "apps WHERE name",
            "app_env WHERE app",
            "placements WHERE app",
            "source_heads WHERE app",
        ] {
            assert_eq!(
                count(pool, &format!("SELECT count(*) FROM {table} = 'api'")).await,
                0,
                "{table}"
            );
        }
        // Releases are history and outlive the app; the other apps are untouched.
        assert_eq!(
            count(pool, "SELECT count(*) FROM releases WHERE app = 'api'").await,
            1
        );
        assert_eq!(placements_of(pool, "web").await.len(), 2);
        assert_eq!(count(pool, "SELECT count(*) FROM apps").await, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_an_app_stops_its_replicas_and_keeps_them() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let (repo, c) = three_apps(pool).await;
        let before = placements_of(pool, "web").await;
        let mark = max_task_id(pool).await;

        let env = [
            ("LOG_LEVEL", "\"info\"".to_owned()),
            ("DB_URL", repo.secret("postgres://web", &[])),
        ];
        repo.app("web", 2, "suspended = true", &env);
        reconcile(&c).await;
        let new = tasks_after(pool, mark).await;
        assert_eq!(work_of(&new), expected_for(pool, "stop", "web").await);
        assert_eq!(new.len(), 2, "{new:?}");
        let after = placements_of(pool, "web").await;
        assert_eq!(
            after,
            before
                .iter()
                .map(|(s, n, _)| (*s, n.clone(), "stopped".to_owned()))
                .collect::<Vec<_>>(),
            "same slots on the same nodes, stopped"
        );
        assert_eq!(
            count(
                pool,
                "SELECT count(*) FROM apps WHERE name = 'web' AND suspended"
            )
            .await,
            1
        );

        // Resuming starts them again, where they were.
        let mark = max_task_id(pool).await;
        repo.app("web", 2, "", &env);
        reconcile(&c).await;
        let new = tasks_after(pool, mark).await;
        assert_eq!(work_of(&new), expected_for(pool, "start", "web").await);
        assert_eq!(new.len(), 2, "{new:?}");
        assert_eq!(placements_of(pool, "web").await, before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_commit_changes_nothing_and_is_recorded_with_locations() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let (repo, c) = three_apps(pool).await;
        let before = dump(pool, &[BOOKKEEPING, &["events"]].concat()).await;
        let history = count(pool, "SELECT count(*) FROM reconciliations").await;

        // Two mistakes in two files, one of them next to a valid change that must not be applied.
        repo.app("worker", 3, "", &[("QUEUE", "\"jobs\"".into())]);
        repo.write(
            "apps/web.toml",
            "[app.web]\nplan = \"smal\"\nruntime = \"node\"\nreplicas = 2\n\
             [app.web.source]\nurl = \"https://github.com/acme/web.git\"\n",
        );
        repo.write(
            "apps/api.toml",
            "[app.api]\nplan = \"small\"\nruntime = \"node\"\nreplicas = \"two\"\n",
        );
        let outcome = c.reconcile(Trigger::Manual).await.unwrap();
        let Outcome::Invalid { commit, errors } = outcome else {
            panic!("expected Invalid, got {outcome:?}");
        };
        assert!(commit.is_some());
        let locations: Vec<String> = errors.iter().map(|e| e.location().to_string()).collect();
        assert!(
            locations.contains(&"apps/web.toml:2:8".to_owned()),
            "{locations:?}"
        );
        assert!(
            locations.iter().any(|l| l.starts_with("apps/api.toml:4:")),
            "{locations:?}"
        );

        // The history: the failed run and its `apply.failed` event.
        assert_eq!(
            dump(pool, &[BOOKKEEPING, &["events"]].concat()).await,
            before,
            "nothing but the history changed"
        );
        assert_eq!(
            count(pool, "SELECT count(*) FROM reconciliations").await,
            history + 1
        );
        assert_eq!(
            count(
                pool,
                "SELECT count(*) FROM events WHERE kind = 'apply.failed' \
                 AND detail->'diagnostics' @> '[\"apps/web.toml:2:8: unknown plan `smal`\"]'"
            )
            .await,
            1,
            "one apply.failed with the diagnostics"
        );
        let mut conn = pool.acquire().await.unwrap();
        let last = &store::history::recent_reconciliations(&mut conn, 1)
            .await
            .unwrap()[0];
        assert_eq!(last.status, ReconcileStatus::Failed);
        assert_eq!(last.commit, commit);
        let recorded: Vec<String> = last.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(recorded.len(), errors.len());
        for (r, e) in recorded.iter().zip(&errors) {
            assert_eq!(r, &format!("{}: {}", e.location(), e.message));
        }
        assert!(
            recorded
                .iter()
                .any(|r| r.starts_with("apps/web.toml:2:8: unknown plan `smal`")),
            "{recorded:?}"
        );

        // Fixing it applies again from the last good state.
        repo.app(
            "web",
            2,
            "",
            &[
                ("LOG_LEVEL", "\"info\"".into()),
                ("DB_URL", repo.secret("postgres://web", &[])),
            ],
        );
        repo.app(
            "api",
            2,
            "",
            &[("API_KEY", repo.secret("api-key-one", &[]))],
        );
        let a = reconcile(&c).await;
        assert_eq!(
            a.plan.summary(),
            "Plan: 0 to add, 1 to change, 0 to destroy."
        );
        assert_eq!(placements_of(pool, "worker").await.len(), 3);
    })
    .await;
}

/// Regression: applying a commit that only re-encrypts a secret (same plaintext, other recipients) kept
/// the old ciphertext and its digest in the store, as the app was not a change; every later plan made
/// without the identity (a fork's pull request, `cairn plan` without `--identity`) then showed that secret
/// as "changed (unverified)" and could not be applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_encrypted_secret_leaves_no_unverified_change_behind() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let (repo, c) = three_apps(pool).await;
        let admin = Identity::generate().recipient();
        let value = repo.secret("api-key-one", &[&admin]);
        repo.app("api", 2, "", &[("API_KEY", value.clone())]);
        let mark = max_task_id(pool).await;
        let a = reconcile(&c).await;
        assert!(a.plan.changes.is_empty(), "{:?}", a.plan.changes);
        assert_eq!(tasks_after(pool, mark).await, vec![]);

        let stored: String =
            sqlx::query_scalar("SELECT value FROM app_env WHERE app = 'api' AND key = 'API_KEY'")
                .fetch_one(pool)
                .await
                .unwrap();
        let written = value
            .trim_start_matches("{ secret = \"\"\"\n")
            .trim_end_matches("\"\"\" }");
        assert_eq!(stored, written, "the store holds the commit's ciphertext");

        let blind = Controller::new(pool.clone(), ConfigSource::Dir(repo.dir.clone()), None);
        let (_, p) = blind.plan().await.unwrap();
        let p = p.unwrap();
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        assert!(p.secrets_verified);
        assert!(p.is_empty());
    })
    .await;
}

/// A named change to the repository.
type Step = (&'static str, Box<dyn Fn(&Repo)>);

/// Holds the apply lock from a third connection until both appliers wait for it, so both are inside
/// the executor at once; returns when the lock is released.
async fn release_when_both_wait(
    pool: &PgPool,
    mut holder: sqlx::Transaction<'static, sqlx::Postgres>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting = count(
            pool,
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE d.datname = current_database() AND l.locktype = 'advisory' AND NOT l.granted",
        )
        .await;
        if waiting >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both appliers reach the apply lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sqlx::query("SELECT 1").execute(&mut *holder).await.unwrap();
    holder.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_appliers_racing_on_the_same_commit_emit_each_task_once() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let repo = Repo::new(&[("n1", None), ("n2", None), ("n3", None)]);
        repo.app("web", 3, "", &[("LOG_LEVEL", "\"info\"".into())]);
        repo.app("api", 2, "", &[("API_KEY", repo.secret("k1", &[]))]);
        let one = repo.controller(pool);
        let two = repo.controller(pool);
        record_heads(&one).await;

        // Round by round: create everything, change an app, delete an app, suspend one.
        let steps: [Step; 4] = [
            ("create", Box::new(|_| {})),
            (
                "change",
                Box::new(|r| r.app("web", 3, "", &[("LOG_LEVEL", "\"debug\"".into())])),
            ),
            ("delete", Box::new(|r| r.remove("apps/api.toml"))),
            (
                "suspend",
                Box::new(|r| {
                    r.app(
                        "web",
                        3,
                        "suspended = true",
                        &[("LOG_LEVEL", "\"debug\"".into())],
                    )
                }),
            ),
        ];
        for (step, change) in steps {
            change(&repo);
            let mark = max_task_id(pool).await;
            let mut holder = pool.begin().await.unwrap();
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(state::APPLY_LOCK_KEY)
                .execute(&mut *holder)
                .await
                .unwrap();
            let (a, b, ()) = tokio::join!(
                one.reconcile(Trigger::Manual),
                two.reconcile(Trigger::Manual),
                release_when_both_wait(pool, holder),
            );
            let (a, b) = (applied(a.unwrap()), applied(b.unwrap()));
            let mut statuses = [a.status, b.status];
            statuses.sort_by_key(|s| s.as_str());
            assert_eq!(
                statuses,
                [ReconcileStatus::Applied, ReconcileStatus::Noop],
                "{step}"
            );
            let winner = if a.status == ReconcileStatus::Applied {
                &a
            } else {
                &b
            };
            let new = tasks_after(pool, mark).await;
            assert!(!new.is_empty(), "{step} emits tasks");
            assert_eq!(new.len(), winner.plan.tasks.len(), "{step}: {new:?}");
            assert_eq!(a.tasks + b.tasks, new.len(), "{step}");
            let distinct: BTreeSet<_> = new.iter().map(TaskRow::work).collect();
            assert_eq!(
                distinct.len(),
                new.len(),
                "{step}: a task emitted twice: {new:?}"
            );
            let plan_work: BTreeSet<_> = winner
                .plan
                .tasks
                .iter()
                .map(|t| {
                    (
                        t.action.as_str().to_owned(),
                        t.app.to_string(),
                        t.slot as i32,
                        t.node.to_string(),
                    )
                })
                .collect();
            assert_eq!(work_of(&new), plan_work, "{step}");
        }
        // Every task of the whole run, across rounds, once.
        let all = tasks(pool).await;
        let keys: BTreeSet<_> = all.iter().map(|t| t.dedup_key.clone()).collect();
        assert_eq!(keys.len(), all.len());
        assert_eq!(
            all.iter()
                .filter(|t| t.kind == TaskAction::Stop.as_str())
                .count(),
            3
        );
    })
    .await;
}

use cairn_testkit::git;

/// [`Repo`]'s directory as a git work tree that pushes to a bare remote beside it.
struct GitRepo {
    repo: Repo,
    bare: PathBuf,
}

impl GitRepo {
    fn new(repo: Repo) -> GitRepo {
        let bare = repo._tmp.path().join("config.git");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "--bare", "-q"]);
        git(&repo.dir, &["init", "-q"]);
        git(
            &repo.dir,
            &["remote", "add", "origin", bare.to_str().unwrap()],
        );
        GitRepo { repo, bare }
    }

    /// Commits the work tree and (force-)pushes it to `main`; returns the commit id.
    fn commit(&self, msg: &str) -> String {
        git(&self.repo.dir, &["add", "-A"]);
        git(&self.repo.dir, &["commit", "-q", "-m", msg]);
        git(&self.repo.dir, &["push", "-q", "-f", "origin", "HEAD:main"]);
        git(&self.repo.dir, &["rev-parse", "HEAD"])
    }

    /// Points the remote's `main` at an existing commit, as `git push --force` would.
    fn force_push(&self, commit: &str) {
        git(
            &self.repo.dir,
            &["push", "-q", "-f", "origin", &format!("{commit}:main")],
        );
    }

    /// A controller reading the remote through its own cache directory `cache`.
    fn controller(&self, pool: &PgPool, cache: &str) -> Controller {
        let source = GitSource::new(
            format!("file://{}", self.bare.display()),
            "main",
            self.repo._tmp.path().join(cache),
        );
        Controller::new(
            pool.clone(),
            ConfigSource::Git(source),
            Some(demo_identity()),
        )
    }

    /// Commits A then B, applying each through `c`.
    async fn a_then_b(&self, c: &Controller) -> (String, String) {
        self.repo
            .app("web", 2, "", &[("LOG_LEVEL", "\"info\"".into())]);
        let a = self.commit("A");
        record_heads(c).await;
        assert_eq!(
            reconcile(c).await.plan.target_commit,
            Some(CommitId::new(a.clone()))
        );
        self.repo
            .app("web", 2, "", &[("LOG_LEVEL", "\"debug\"".into())]);
        let b = self.commit("B");
        assert_eq!(
            reconcile(c).await.plan.target_commit,
            Some(CommitId::new(b.clone()))
        );
        (a, b)
    }
}

fn assert_behind(outcome: Outcome, commit: &str, applied: &str) {
    match outcome {
        Outcome::Behind {
            commit: c,
            applied: a,
        } => {
            assert_eq!((c.as_str(), a.as_str()), (commit, applied))
        }
        other => panic!("expected Behind ({commit} is older than {applied}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_source_that_moves_backwards_is_refused() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let remote = GitRepo::new(Repo::new(&[("n1", None), ("n2", None)]));
        let c = remote.controller(pool, "cache");
        let (a, b) = remote.a_then_b(&c).await;

        // Force-push A back: an ancestor of the applied B. Refused every time, nothing written.
        let before = dump(pool, BOOKKEEPING).await;
        remote.force_push(&a);
        for _ in 0..2 {
            assert_behind(c.reconcile(Trigger::Timer).await.unwrap(), &a, &b);
        }
        assert_eq!(dump(pool, BOOKKEEPING).await, before);

        // A new commit on top of A (history rewritten, not older) is applied.
        git(&remote.repo.dir, &["reset", "-q", "--hard", &a]);
        remote
            .repo
            .app("web", 2, "", &[("LOG_LEVEL", "\"warn\"".into())]);
        let c2 = remote.commit("C");
        assert_eq!(
            reconcile(&c).await.plan.target_commit,
            Some(CommitId::new(c2))
        );
    })
    .await;
}

/// Regression: the ancestry check runs against the source's own cache, and a cache that never saw the
/// applied commit (a second control plane, a cleared or new `--cache-dir`, `cairn apply` from another
/// machine) could not tell that the force-pushed commit is older, so it applied it. The controller now
/// asks the history whether the commit was applied before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_cache_refuses_a_commit_older_than_the_applied_one() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let remote = GitRepo::new(Repo::new(&[("n1", None), ("n2", None)]));
        let (a, b) = remote.a_then_b(&remote.controller(pool, "cache")).await;
        remote.force_push(&a);
        let before = dump(pool, BOOKKEEPING).await;
        let cold = remote.controller(pool, "another-cache");
        assert_behind(cold.reconcile(Trigger::Timer).await.unwrap(), &a, &b);
        assert_eq!(dump(pool, BOOKKEEPING).await, before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_plaintext_reaches_any_row() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let n1 = Identity::generate();
        let n2 = Identity::generate();
        let r1 = n1.recipient();
        let r2 = n2.recipient();
        // n3 pins no recipient: its tasks wait for the agent's key (`secrets_pending`).
        let repo = Repo::new(&[("n1", Some(&r1)), ("n2", Some(&r2)), ("n3", None)]);
        let canaries = [
            "canary-5c4f1e-first-value",
            "canary-9a0b7d-second-value",
            "canary-e2d8a3-suspended-app",
            "canary-71ffc0-pasted-in-an-invalid-commit",
        ];
        repo.app("web", 3, "", &[("DB_URL", repo.secret(canaries[0], &[]))]);
        repo.app(
            "idle",
            1,
            "suspended = true",
            &[("TOKEN", repo.secret(canaries[2], &[]))],
        );
        let c = repo.controller(pool);
        record_heads(&c).await;
        reconcile(&c).await;
        repo.app("web", 3, "", &[("DB_URL", repo.secret(canaries[1], &[]))]);
        reconcile(&c).await;
        // A plaintext pasted where a ciphertext belongs: invalid, recorded, and not quoted anywhere.
        repo.write(
            "apps/web.toml",
            &format!(
                "[app.web]\nplan = \"small\"\nruntime = \"node\"\nreplicas = 3\n\
                 [app.web.source]\nurl = \"https://github.com/acme/web.git\"\n\
                 [app.web.env]\nDB_URL = {{ secret = \"{}\" }}\n",
                canaries[3]
            ),
        );
        assert!(matches!(
            c.reconcile(Trigger::Manual).await.unwrap(),
            Outcome::Invalid { .. }
        ));
        assert_eq!(
            count(
                pool,
                "SELECT count(*) FROM reconciliations WHERE status = 'failed'"
            )
            .await,
            1
        );
        // Deleting an app with a secret: its rows go, the history stays.
        repo.remove("apps/idle.toml");
        repo.app("web", 3, "", &[("DB_URL", repo.secret(canaries[1], &[]))]);
        reconcile(&c).await;

        let rows = dump(pool, &[]).await;
        let text: String = rows
            .values()
            .flatten()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            text.contains("BEGIN AGE ENCRYPTED FILE"),
            "the dump sees the ciphertexts"
        );
        for canary in canaries {
            let unkeyed = hex::encode(Sha256::digest(canary.as_bytes()));
            for (table, rows) in &rows {
                for row in rows {
                    assert!(!row.contains(canary), "{table} holds `{canary}`: {row}");
                    assert!(
                        !row.contains(&unkeyed),
                        "{table} holds an unkeyed hash of `{canary}`"
                    );
                }
            }
        }

        // The test could fail: the secrets are there, encrypted to each task's node only.
        let payloads: Vec<(String, serde_json::Value)> = sqlx::query_as(
            "SELECT node, payload FROM tasks WHERE kind = 'deploy' AND app = 'web' ORDER BY id",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        let mut opened = BTreeSet::new();
        for (node, payload) in &payloads {
            let Some(ct) = payload["secret_env"].as_str() else {
                assert_eq!(
                    node, "n3",
                    "only the node without a recipient waits: {payload}"
                );
                assert_eq!(payload["secrets_pending"], true);
                continue;
            };
            let ct = cairn_schema::Ciphertext::new(ct).unwrap();
            let (mine, other) = match node.as_str() {
                "n1" => (&n1, &n2),
                "n2" => (&n2, &n1),
                other => panic!("a ciphertext for {other}"),
            };
            assert!(
                other.decrypt(&ct).is_err(),
                "another node cannot read {node}'s secrets"
            );
            assert!(
                demo_identity().decrypt(&ct).is_err(),
                "nor can the control plane's key"
            );
            let plain = mine.decrypt(&ct).unwrap();
            let env: BTreeMap<String, String> = serde_json::from_slice(plain.expose()).unwrap();
            opened.insert(env["DB_URL"].clone());
        }
        assert_eq!(
            opened,
            BTreeSet::from([canaries[0].to_owned(), canaries[1].to_owned()]),
            "both values reached their nodes: {payloads:?}"
        );
    })
    .await;
}
