//! The leader's lease against a real PostgreSQL: a term ends at once when another replica takes the
//! lease, the deposed leader's apply transaction is refused (fencing) and changes nothing, and epochs
//! only grow.

use std::time::Duration;

use cairn_reconciler::controller::{ConfigSource, Controller, Outcome, Trigger};
use cairn_reconciler::leader::{Leadership, LeaseSettings};
use cairn_reconciler::store::{StoreError, lease};
use cairn_reconciler::worker::Shutdown;
use cairn_testkit::fixtures;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn write_config(dir: &std::path::Path, replicas: u32) {
    std::fs::write(dir.join("cairn.toml"), fixtures::settings().to_string()).unwrap();
    let plan = fixtures::plan("small").price("5").max_replicas(3);
    std::fs::write(
        dir.join("infra.toml"),
        format!(
            "{plan}\n{}\n{}",
            fixtures::node_runtime().start("node ."),
            fixtures::node("n1")
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("app.toml"),
        format!(
            "[app.web]\nplan = \"small\"\nruntime = \"node\"\nreplicas = {replicas}\n\
             [app.web.source]\nurl = \"https://github.com/acme/web.git\"\nrev = \"v1\"\n"
        ),
    )
    .unwrap();
}

async fn generation(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT generation FROM config_state")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_stops_at_once_and_its_apply_is_refused() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool().clone();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let shutdown = Shutdown::new();
        let settings = LeaseSettings {
            ttl: Duration::from_secs(5),
            renew: Duration::from_millis(200),
        };
        let a = Leadership::start(pool.clone(), "a", settings, &shutdown);
        let term = loop {
            if let Some(t) = a.current() {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(term.fence.holder, "a");
        let first_epoch = term.fence.epoch;

        let tmp = tempfile::tempdir().unwrap();
        write_config(tmp.path(), 1);
        let c = Controller::new(pool.clone(), ConfigSource::Dir(tmp.path().to_owned()), None);
        c.set_fence(Some(term.fence.clone()));
        let o = c.reconcile(Trigger::Startup).await.unwrap();
        assert!(matches!(o, Outcome::Applied(_)), "{o:?}");
        let applied = generation(&pool).await;
        let fenced: i64 = sqlx::query_scalar("SELECT fenced_epoch FROM control_plane_lease")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(fenced as u64, first_epoch, "the apply wrote its epoch");

        // Another replica takes the lease (as one would after a partition hid `a`'s renewals).
        sqlx::query(
            "UPDATE control_plane_lease SET holder = 'b', epoch = epoch + 1,
                 expires_at = clock_timestamp() + interval '1 minute'",
        )
        .execute(&pool)
        .await
        .unwrap();
        // `a`'s term ends at its next renewal, well before its own lease would have run out.
        tokio::time::timeout(Duration::from_secs(2), term.stop.wait())
            .await
            .expect("the term ends at the next renewal");
        assert!(a.current().is_none());

        // A reconcile still holding the old term's fence is refused in its transaction: nothing applied.
        write_config(tmp.path(), 2);
        let e = c.reconcile(Trigger::Manual).await.unwrap_err();
        let text = cairn_schema::error::chain(&e);
        assert!(text.contains("no longer the leader"), "{text}");
        assert_eq!(generation(&pool).await, applied);
        let mut tx = pool.begin().await.unwrap();
        assert!(matches!(
            lease::check(&mut tx, &term.fence).await,
            Err(StoreError::Deposed { .. })
        ));
        drop(tx);

        // `b`'s lease runs out: `a` takes it back with a newer epoch still.
        sqlx::query("UPDATE control_plane_lease SET expires_at = clock_timestamp()")
            .execute(&pool)
            .await
            .unwrap();
        let again = loop {
            if let Some(t) = a.current() {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(again.fence.epoch, first_epoch + 2);
        c.set_fence(Some(again.fence.clone()));
        let o = c.reconcile(Trigger::Manual).await.unwrap();
        assert!(matches!(o, Outcome::Applied(_)), "{o:?}");
        assert_eq!(generation(&pool).await, applied + 1);

        // Shutting down gives the lease up at once.
        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                let live: bool = sqlx::query_scalar(
                    "SELECT expires_at > clock_timestamp() FROM control_plane_lease",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                if !live {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the lease is given up on shutdown");
    })
    .await
    .expect("the test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_replicas_leads_and_the_other_takes_over_when_it_stops() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool().clone();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let settings = LeaseSettings {
            ttl: Duration::from_millis(1500),
            renew: Duration::from_millis(200),
        };
        let (stop_a, stop_b) = (Shutdown::new(), Shutdown::new());
        let a = Leadership::start(pool.clone(), "a", settings, &stop_a);
        let b = Leadership::start(pool.clone(), "b", settings, &stop_b);
        let leader = loop {
            match (a.current(), b.current()) {
                (Some(_), Some(_)) => panic!("two leaders at once"),
                (Some(t), None) | (None, Some(t)) => break t,
                (None, None) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        // A while later, still one leader, the same term.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                a.current().is_none() || b.current().is_none(),
                "two leaders at once"
            );
        }
        let (stop, other) = if leader.fence.holder == "a" {
            (&stop_a, &b)
        } else {
            (&stop_b, &a)
        };
        assert_eq!(
            (if leader.fence.holder == "a" { &a } else { &b })
                .current()
                .map(|t| t.fence.epoch),
            Some(leader.fence.epoch)
        );
        stop.trigger();
        let next = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                if let Some(t) = other.current() {
                    break t;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the other replica takes over");
        assert!(next.fence.epoch > leader.fence.epoch);
        stop_a.trigger();
        stop_b.trigger();
    })
    .await
    .expect("the test finished in time");
}

/// What one replica knows first reaches every replica's TLS table through the database, so an agent
/// polling any of them installs the same table: the applied apps' own certificates (written by the
/// leader, refused from a deposed one, the key still the age ciphertext) and the ACME answers of an
/// order one replica's certificate worker runs (withdrawn when it stops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_hands_out_the_same_tls_table() {
    use cairn_reconciler::routes::{HeldCertificate, Routes, refresh_loop};

    let db = cairn_testkit::test_db!();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let pool = db.pool();
        let (a, b) = (Routes::default(), Routes::default());
        b.refresh(pool).await.unwrap();
        assert!(
            !b.tls_ready(),
            "no TLS table before the own certificates were ever stored"
        );

        let identity = cairn_schema::Identity::generate();
        let own = HeldCertificate {
            id: "own-web".into(),
            names: vec!["web.example.com".into()],
            chain_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            key: cairn_schema::secret::encrypt(b"canary-own-key", &[identity.recipient()]).unwrap(),
        };
        let stale = lease::Fence {
            holder: "a-replica-long-gone".into(),
            epoch: 7,
        };
        let refused = a
            .set_own_certificates(pool, Some(&stale), "c1", vec![own.clone()])
            .await
            .unwrap_err();
        assert!(matches!(refused, StoreError::Deposed { .. }), "{refused}");
        b.refresh(pool).await.unwrap();
        assert!(!b.tls_ready(), "a deposed leader's write changed nothing");

        a.set_own_certificates(pool, None, "c1", vec![own.clone()])
            .await
            .unwrap();
        b.refresh(pool).await.unwrap();
        assert!(b.tls_ready(), "the other replica hands out TLS tables now");
        let ids: Vec<String> = b
            .current_tls()
            .certificates
            .iter()
            .map(|c| c.id.clone())
            .collect();
        assert_eq!(ids, ["own-web"]);
        let sealed: String = sqlx::query_scalar("SELECT key_sealed FROM own_certificates")
            .fetch_one(pool)
            .await
            .unwrap();
        assert!(sealed.contains("BEGIN AGE ENCRYPTED FILE") && !sealed.contains("canary"));
        // The same set again writes nothing; an empty set is a set (the table is handed out, without it).
        let written: String =
            sqlx::query_scalar("SELECT written_at::text FROM own_certificates_applied")
                .fetch_one(pool)
                .await
                .unwrap();
        a.set_own_certificates(pool, None, "c2", vec![own.clone()])
            .await
            .unwrap();
        let again: String =
            sqlx::query_scalar("SELECT written_at::text FROM own_certificates_applied")
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(written, again, "an unchanged set is not rewritten");
        a.set_own_certificates(pool, None, "c3", Vec::new())
            .await
            .unwrap();
        b.refresh(pool).await.unwrap();
        assert!(b.tls_ready() && b.current_tls().certificates.is_empty());

        // A's certificate worker puts answers up: B's table gets them without anyone poking B.
        let stop = Shutdown::new();
        for r in [&a, &b] {
            tokio::spawn({
                let (pool, r, stop) = (pool.clone(), r.clone(), stop.clone());
                async move { refresh_loop(pool, r, Duration::from_secs(3600), &stop).await }
            });
        }
        let answered = |r: &Routes| {
            let t = r.current_tls();
            (
                t.challenges
                    .iter()
                    .map(|c| (c.token.clone(), c.key_authorization.clone()))
                    .collect::<Vec<_>>(),
                t.alpn.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
            )
        };
        a.challenges.insert("tok-1", "tok-1.thumbprint");
        a.challenges.insert_alpn("Web.Example.com", &[0xab; 32]);
        while answered(&b)
            != (
                vec![("tok-1".to_owned(), "tok-1.thumbprint".to_owned())],
                vec!["web.example.com".to_owned()],
            )
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.challenges.remove("tok-1");
        a.challenges.remove_alpn("web.example.com");
        while answered(&b) != (Vec::new(), Vec::new()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A replica that stops withdraws what it put up.
        a.challenges.insert("tok-2", "tok-2.thumbprint");
        while answered(&b).0.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.trigger();
        loop {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM acme_answers")
                .fetch_one(pool)
                .await
                .unwrap();
            if n == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the replicas' TLS tables agree in time");
}
