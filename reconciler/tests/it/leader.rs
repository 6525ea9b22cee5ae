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
