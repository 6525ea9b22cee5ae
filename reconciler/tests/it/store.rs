//! The store against a real PostgreSQL: what the executor writes is what the planner reads back.

use std::path::Path;

use cairn_plan::observed::{AppliedApp, CommitId, Fingerprints, ReplicaPlacement, ReplicaState};
use cairn_reconciler::store::{
    self, NewReconciliation, ReconcileStatus, RecordedError, ReleaseInsert, StoreError, Written,
    state,
};
use cairn_schema::{Desired, EnvValue, Identity, Kind, Name};
use chrono::Utc;
use sqlx::PgConnection;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn example() -> (Desired, Fingerprints) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let rel = path
                    .strip_prefix(&root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                files.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    let (_, loaded) = cairn_schema::load(files);
    let desired = loaded.desired.expect("examples/config is valid");
    let identity = Identity::parse(
        &std::fs::read_to_string(root.join("../keys/demo-only-identity.txt")).unwrap(),
    )
    .unwrap();
    let mut prints = Fingerprints::new();
    for (app, spec) in &desired.apps {
        for (key, value) in &spec.env {
            if let EnvValue::Secret { secret } = value {
                let plain = identity.decrypt(secret).unwrap();
                prints.insert((app.clone(), key.clone()), identity.fingerprint(&plain));
            }
        }
    }
    (desired, prints)
}

/// Writes every resource of `desired` at `generation`; returns what each upsert did.
async fn write_all(
    conn: &mut PgConnection,
    desired: &Desired,
    prints: &Fingerprints,
    generation: u64,
) -> Vec<Written> {
    let mut done = Vec::new();
    for (n, p) in &desired.plans {
        done.push(state::upsert_plan(conn, n, p, generation).await.unwrap());
    }
    for (n, r) in &desired.runtimes {
        done.push(state::upsert_runtime(conn, n, r, generation).await.unwrap());
    }
    for (n, node) in &desired.nodes {
        done.push(state::upsert_node(conn, n, node, generation).await.unwrap());
    }
    for (n, a) in &desired.apps {
        done.push(
            state::upsert_app(conn, n, a, prints, generation)
                .await
                .unwrap(),
        );
    }
    done
}

#[tokio::test]
async fn the_example_config_reads_back_as_written_and_a_second_write_changes_nothing() {
    let db = cairn_testkit::test_db!();
    let (desired, prints) = example();
    let commit = CommitId::new("0123456789abcdef0123456789abcdef01234567");

    let mut tx = db.pool().begin().await.unwrap();
    state::lock_apply(&mut tx).await.unwrap();
    let written = write_all(&mut tx, &desired, &prints, 1).await;
    assert!(written.iter().all(|w| *w == Written::Created));
    state::advance_generation(&mut tx, 0, 1, Some(&commit), &desired.settings)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let observed = state::load_observed(db.pool()).await.unwrap();
    assert_eq!(observed.generation, 1);
    assert_eq!(observed.applied_commit, Some(commit.clone()));
    assert_eq!(observed.currency.as_deref(), Some("EUR"));
    assert_eq!(observed.plans, desired.plans);
    assert_eq!(observed.runtimes, desired.runtimes);
    assert_eq!(observed.nodes, desired.nodes);
    for (n, app) in &desired.apps {
        assert_eq!(
            observed.apps[n],
            AppliedApp::from_desired(n, app, &prints).unwrap()
        );
    }
    assert_eq!(observed.apps.len(), desired.apps.len());

    let mut conn = db.pool().acquire().await.unwrap();
    let again = write_all(&mut conn, &desired, &prints, 2).await;
    assert!(again.iter().all(|w| *w == Written::Unchanged), "{again:?}");
    let generations: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT generation FROM apps")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        generations,
        [1],
        "an unchanged row keeps the generation that wrote it"
    );

    // One app changes: only it is written.
    let mut changed = desired.clone();
    changed.apps.get_mut(&name("shop")).unwrap().replicas = 2;
    let third = write_all(&mut conn, &changed, &prints, 3).await;
    assert_eq!(third.iter().filter(|w| **w == Written::Changed).count(), 1);
}

#[tokio::test]
async fn secrets_are_stored_as_ciphertext_only() {
    let db = cairn_testkit::test_db!();
    let (desired, prints) = example();
    let mut conn = db.pool().acquire().await.unwrap();
    write_all(&mut conn, &desired, &prints, 1).await;

    let identity = Identity::parse(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/keys/demo-only-identity.txt"),
        )
        .unwrap(),
    )
    .unwrap();
    let env = state::app_env(&mut conn, &name("shop")).await.unwrap();
    let secrets: Vec<_> = env.iter().filter(|e| e.fingerprint.is_some()).collect();
    assert!(!secrets.is_empty(), "the example's shop app has secrets");
    let everything: String = sqlx::query_scalar(
        "SELECT concat((SELECT string_agg(e::text, '') FROM app_env e),
                       (SELECT string_agg(a::text, '') FROM apps a))",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    for s in secrets {
        assert!(s.value.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        let ct = cairn_schema::Ciphertext::new(&s.value).unwrap();
        let plain = identity.decrypt(&ct).unwrap();
        let plain = plain.expose_str().unwrap();
        assert!(
            !everything.contains(plain),
            "plaintext of {} is in the database",
            s.key
        );
    }

    // The database itself refuses a plaintext secret.
    let refused = sqlx::query(
        "INSERT INTO app_env (app, key, secret, value, fingerprint)
         VALUES ('shop', 'LEAKED', true, 'hunter2', 'x')",
    )
    .execute(&mut *conn)
    .await;
    let err = refused.unwrap_err();
    assert!(
        err.to_string().contains("secret_is_age_ciphertext"),
        "{err}"
    );
}

#[tokio::test]
async fn a_stale_generation_cannot_be_applied() {
    let db = cairn_testkit::test_db!();
    let (desired, _) = example();
    let mut conn = db.pool().acquire().await.unwrap();
    let commit = CommitId::new("c1");
    state::advance_generation(&mut conn, 0, 1, Some(&commit), &desired.settings)
        .await
        .unwrap();
    let err = state::advance_generation(&mut conn, 0, 1, Some(&commit), &desired.settings)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::GenerationConflict {
                expected: 0,
                current: 1
            }
        ),
        "{err}"
    );
    let config = state::config_state(&mut conn).await.unwrap();
    assert_eq!((config.generation, config.commit), (1, Some(commit)));
    assert_eq!(config.settings, Some(desired.settings));
}

#[tokio::test]
async fn placements_releases_pins_restarts_and_heads_read_back() {
    let db = cairn_testkit::test_db!();
    let (desired, prints) = example();
    let mut tx = db.pool().begin().await.unwrap();
    write_all(&mut tx, &desired, &prints, 1).await;
    let shop = name("shop");
    let config = CommitId::new("c1");
    let source = CommitId::new("89abcdef0123456789abcdef0123456789abcdef");
    for number in [1, 2] {
        state::insert_release(
            &mut tx,
            &ReleaseInsert {
                app: &shop,
                number,
                config_commit: &config,
                config_generation: 1,
                source_commit: &source,
                spec: serde_json::json!({ "n": number }),
                spec_hash: &format!("sha256:{number}"),
                build_key: "0123456789abcdef0123456789abcdef",
            },
        )
        .await
        .unwrap();
    }
    let placement = |slot, node: &str, st| ReplicaPlacement {
        app: shop.clone(),
        slot,
        node: name(node),
        release: 2,
        state: st,
        generation: 1,
        restart: 0,
    };
    let first = vec![
        placement(1, "fra-1", ReplicaState::Running),
        placement(2, "fra-2", ReplicaState::Running),
        placement(3, "fra-1", ReplicaState::Running),
    ];
    state::replace_placements(&mut tx, &first).await.unwrap();
    assert!(
        state::set_rollback_pin(&mut tx, &shop, Some(1))
            .await
            .unwrap()
    );
    assert_eq!(state::request_restart(&mut tx, &shop).await.unwrap(), 1);
    assert_eq!(state::request_restart(&mut tx, &shop).await.unwrap(), 2);
    tx.commit().await.unwrap();
    assert!(
        state::record_source_head(db.pool(), &shop, "main", &source)
            .await
            .unwrap()
    );
    assert!(
        !state::record_source_head(db.pool(), &shop, "main", &source)
            .await
            .unwrap()
    );

    let observed = state::load_observed(db.pool()).await.unwrap();
    assert_eq!(observed.placements, first);
    assert_eq!(observed.releases[&shop].number, 2, "the latest release");
    assert_eq!(observed.releases[&shop].spec_hash, "sha256:2");
    assert_eq!(observed.rollback_pins[&shop], 1);
    assert_eq!(observed.restart_requests[&shop], 2);
    assert_eq!(observed.source_heads[&shop], source);

    // Replacing placements: slot 3 goes, slot 2 moves and stops, slot 1 is untouched.
    let mut conn = db.pool().acquire().await.unwrap();
    let before: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT updated_at FROM placements WHERE slot = 1")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let second = vec![
        placement(1, "fra-1", ReplicaState::Running),
        ReplicaPlacement {
            generation: 2,
            ..placement(2, "fra-1", ReplicaState::Stopped)
        },
    ];
    state::replace_placements(&mut conn, &second).await.unwrap();
    let after: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT updated_at FROM placements WHERE slot = 1")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(before, after, "an unchanged placement is not rewritten");
    assert_eq!(
        state::load_observed(db.pool()).await.unwrap().placements,
        second
    );

    // Deleting the app takes its placements and pin, and leaves releases and restart requests.
    assert_eq!(
        state::delete_resources(&mut conn, Kind::App, std::slice::from_ref(&shop))
            .await
            .unwrap(),
        1
    );
    let observed = state::load_observed(db.pool()).await.unwrap();
    assert!(observed.placements.is_empty() && !observed.rollback_pins.contains_key(&shop));
    assert_eq!(observed.releases[&shop].number, 2);
    assert_eq!(observed.restart_requests[&shop], 2);
    assert!(state::app_env(&mut conn, &shop).await.unwrap().is_empty());
}

#[tokio::test]
async fn reconciliations_are_recorded_newest_first() {
    let db = cairn_testkit::test_db!();
    let mut conn = db.pool().acquire().await.unwrap();
    let t0 = Utc::now();
    let errors = [RecordedError {
        path: Some("apps/shop.toml".into()),
        line: Some(3),
        col: Some(8),
        message: "unknown plan `larg`".into(),
    }];
    for (i, status) in [ReconcileStatus::Applied, ReconcileStatus::Failed]
        .into_iter()
        .enumerate()
    {
        let run = NewReconciliation {
            source: "https://example.com/config.git",
            commit: Some("c1"),
            trigger: "timer",
            status,
            generation: Some(1),
            summary: "Plan: 1 to add, 0 to change, 0 to destroy.",
            errors: if status == ReconcileStatus::Failed {
                &errors
            } else {
                &[]
            },
            started_at: t0 + chrono::Duration::seconds(i as i64),
            finished_at: t0
                + chrono::Duration::seconds(i as i64)
                + chrono::Duration::milliseconds(250),
        };
        store::history::record_reconciliation(&mut conn, &run)
            .await
            .unwrap();
    }
    let runs = store::history::recent_reconciliations(&mut conn, 10)
        .await
        .unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].status, ReconcileStatus::Failed);
    assert_eq!(runs[0].errors, errors);
    assert_eq!(
        runs[0].errors[0].to_string(),
        "apps/shop.toml:3:8: unknown plan `larg`"
    );
    assert_eq!(runs[0].duration_ms, 250);
    assert_eq!(runs[1].status, ReconcileStatus::Applied);

    // A failed run must say why.
    let run = NewReconciliation {
        status: ReconcileStatus::Failed,
        errors: &[],
        source: "x",
        commit: None,
        trigger: "timer",
        generation: None,
        summary: "failed",
        started_at: t0,
        finished_at: t0,
    };
    assert!(
        store::history::record_reconciliation(&mut conn, &run)
            .await
            .is_err()
    );
}

/// The example configuration with `shop`'s slots 1 and 2 placed on fra-1 and fra-2.
async fn shop_on_two_nodes(db: &cairn_testkit::pg::TestDb) -> Name {
    let (desired, prints) = example();
    let mut tx = db.pool().begin().await.unwrap();
    write_all(&mut tx, &desired, &prints, 1).await;
    let shop = name("shop");
    state::insert_release(
        &mut tx,
        &ReleaseInsert {
            app: &shop,
            number: 1,
            config_commit: &CommitId::new("c1"),
            config_generation: 1,
            source_commit: &CommitId::new("89abcdef0123456789abcdef0123456789abcdef"),
            spec: serde_json::json!({}),
            spec_hash: "sha256:1",
            build_key: "0123456789abcdef0123456789abcdef",
        },
    )
    .await
    .unwrap();
    let placed = |slot, node: &str| ReplicaPlacement {
        app: shop.clone(),
        slot,
        node: name(node),
        release: 1,
        state: ReplicaState::Running,
        generation: 1,
        restart: 0,
    };
    state::replace_placements(&mut tx, &[placed(1, "fra-1"), placed(2, "fra-2")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    shop
}

/// Two nodes' batches of one app's output: a follower reading by id sees every line even when the batch
/// that drew the lower ids commits last (it would skip them for good if a higher id could be read first).
#[tokio::test]
async fn replica_output_ids_become_visible_in_order() {
    use cairn_reconciler::store::releases::{
        NewReplicaLine, append_replica_logs, append_replica_logs_in, replica_logs,
    };
    let db = cairn_testkit::test_db!();
    let shop = shop_on_two_nodes(&db).await;
    let lines = |slot, text: &'static str| {
        (0..3)
            .map(|_| NewReplicaLine {
                app: "shop",
                slot,
                release: 1,
                stream: "stdout",
                line: text,
                at: Utc::now(),
            })
            .collect::<Vec<_>>()
    };
    let mut seen: Vec<String> = Vec::new();
    let mut cursor = 0;
    let mut follow = async |seen: &mut Vec<String>| {
        let mut conn = db.pool().acquire().await.unwrap();
        let (rows, next) = replica_logs(&mut conn, &shop, Some(cursor), 100)
            .await
            .unwrap();
        seen.extend(rows.into_iter().map(|r| r.line));
        cursor = next;
    };
    // fra-1's batch draws its ids and stays uncommitted; fra-2's batch of the same app comes meanwhile.
    let mut first = db.pool().begin().await.unwrap();
    append_replica_logs_in(&mut first, &name("fra-1"), &lines(1, "first"))
        .await
        .unwrap();
    let second = tokio::spawn({
        let pool = db.pool().clone();
        async move { append_replica_logs(&pool, &name("fra-2"), &lines(2, "second")).await }
    });
    // Whatever the second batch does meanwhile, a follower reading now must not move past the first's ids.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    follow(&mut seen).await;
    first.commit().await.unwrap();
    assert_eq!(second.await.unwrap().unwrap(), 3);
    follow(&mut seen).await;
    assert_eq!(
        seen,
        ["first", "first", "first", "second", "second", "second"],
        "every line, in the order the batches were drawn"
    );
}

/// Lines stored through another control plane wake this one's followers of that app (a notification per
/// app and transaction), and only theirs.
#[tokio::test]
async fn stored_output_is_announced_to_the_apps_followers() {
    use cairn_reconciler::api::wakes::{REPLICA_OUTPUT, Wakes};
    use cairn_reconciler::store::releases::{NewReplicaLine, append_replica_logs};
    let db = cairn_testkit::test_db!();
    let shop = shop_on_two_nodes(&db).await;
    let wakes = std::sync::Arc::new(Wakes::default());
    let stop = cairn_reconciler::worker::Shutdown::new();
    let mut shop_rx = wakes.subscribe(shop.as_str());
    let mut other_rx = wakes.subscribe("web");
    let follower = tokio::spawn({
        let (wakes, pool, stop) = (wakes.clone(), db.pool().clone(), stop.clone());
        async move { wakes.follow(pool, REPLICA_OUTPUT, &stop).await }
    });
    // Listening wakes everyone once (what was announced before is unknown).
    tokio::time::timeout(std::time::Duration::from_secs(10), shop_rx.changed())
        .await
        .expect("woken when the listener is up")
        .unwrap();
    other_rx.mark_unchanged();
    let line = NewReplicaLine {
        app: "shop",
        slot: 1,
        release: 1,
        stream: "stdout",
        line: "hello",
        at: Utc::now(),
    };
    append_replica_logs(db.pool(), &name("fra-1"), &[line])
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), shop_rx.changed())
        .await
        .expect("woken by the notification")
        .unwrap();
    assert!(
        !other_rx.has_changed().unwrap(),
        "another app's follower sleeps on"
    );
    stop.trigger();
    follower.await.unwrap();
}

/// Where apps and nodes are declared: only the rows that moved are written, each with the commit whose
/// file has it there; a control plane that starts afresh compares with the stored rows.
#[tokio::test]
async fn declarations_write_only_what_moved() {
    use cairn_reconciler::declared::{Declarations, lookup};
    use cairn_schema::model::Origin;
    use std::collections::BTreeMap;
    let db = cairn_testkit::test_db!();
    let origins = |entries: &[(Kind, &str, &str, usize)]| -> BTreeMap<(Kind, Name), Origin> {
        entries
            .iter()
            .map(|(k, n, p, l)| {
                (
                    (*k, name(n)),
                    Origin {
                        path: (*p).to_owned(),
                        line: *l,
                        col: 1,
                    },
                )
            })
            .collect()
    };
    let rows = || async {
        sqlx::query_as::<_, (String, String, String, String, i32)>(
            "SELECT kind, name, commit, path, line FROM declarations ORDER BY kind, name",
        )
        .fetch_all(db.pool())
        .await
        .unwrap()
    };
    let row = |k: &str, n: &str, c: &str, p: &str, l: i32| {
        (k.to_owned(), n.to_owned(), c.to_owned(), p.to_owned(), l)
    };
    let d = Declarations::default();
    let first = origins(&[
        (Kind::App, "web", "apps.toml", 1),
        (Kind::App, "api", "apps.toml", 9),
        (Kind::Node, "a", "nodes.toml", 1),
        (Kind::Plan, "small", "plans.toml", 1),
    ]);
    d.record(db.pool(), "c1", &first).await.unwrap();
    assert_eq!(
        rows().await,
        [
            row("app", "api", "c1", "apps.toml", 9),
            row("app", "web", "c1", "apps.toml", 1),
            row("node", "a", "c1", "nodes.toml", 1),
        ],
        "plans have no page: not stored"
    );
    // c2 inserts a line above `api` and removes the node: only `api` moves to c2.
    let second = origins(&[
        (Kind::App, "web", "apps.toml", 1),
        (Kind::App, "api", "apps.toml", 10),
    ]);
    d.record(db.pool(), "c2", &second).await.unwrap();
    let want = [
        row("app", "api", "c2", "apps.toml", 10),
        row("app", "web", "c1", "apps.toml", 1),
    ];
    assert_eq!(rows().await, want);
    // Another control plane (or this one after a restart) compares with the table: nothing to write.
    Declarations::default()
        .record(db.pool(), "c3", &second)
        .await
        .unwrap();
    assert_eq!(rows().await, want);
    let got = lookup(
        db.pool(),
        Kind::App,
        &name("api"),
        Some("https://github.com/acme/platform"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(got.at, "apps.toml:10");
    assert_eq!(
        got.href.as_deref(),
        Some("https://github.com/acme/platform/blob/c2/apps.toml#L10")
    );
    assert_eq!(
        lookup(db.pool(), Kind::Node, &name("a"), None)
            .await
            .unwrap(),
        None
    );
}
