//! `store::failover` against a real PostgreSQL: a host that refuses is skipped, a server that takes no
//! writes is never handed out (the pool and `/readyz`'s ping wait), and the same pools come back when it
//! takes writes again. (The failover of a real replicated pair is the root package's
//! `tests/it/failover.rs`, with pg_auto_failover.)

use std::time::Duration;

use cairn_reconciler::store::{self, failover::Database};
use cairn_reconciler::worker::Shutdown;
use cairn_testkit::pg::TestDb;

/// A loopback port nothing listens on.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `pool` reaches a writable server within a second.
async fn ready(pool: &sqlx::PgPool) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), store::ping(pool)).await,
        Ok(Ok(true))
    )
}

async fn wait(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_skips_a_dead_host_and_waits_out_a_read_only_server() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let (head, tail) = db.url().split_once('@').unwrap();
    let dead = dead_port();
    let url = format!("{head}@127.0.0.1:{dead},{tail}");
    let database = Database::open(&url).unwrap();
    assert_eq!(database.hosts().len(), 2);
    assert_eq!(database.primary(), None, "nothing probed yet");
    let pool = database.pool(2).await.unwrap();
    let live = database.hosts()[1].clone();
    assert_eq!(database.primary().as_deref(), Some(live.as_str()));
    assert!(ready(&pool).await);
    let shutdown = Shutdown::new();
    let watching = tokio::spawn({
        let (database, stop) = (database.clone(), shutdown.clone());
        async move { database.watch(Duration::from_millis(100), &stop).await }
    });

    // The server stops taking writes (as pg_auto_failover holds a primary being demoted or a standby
    // being promoted) and drops its sessions.
    let name = db.name().to_owned();
    sqlx::query(&format!(
        "ALTER DATABASE \"{name}\" SET default_transaction_read_only = on"
    ))
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .execute(db.pool())
    .await
    .unwrap();
    wait("no primary", async || database.primary().is_none()).await;
    assert!(!ready(&pool).await, "no connection to a read-only server");

    // It takes writes again: the same pool reaches it, and a write goes through.
    let mut admin = db.pool().acquire().await.unwrap();
    sqlx::query("SET default_transaction_read_only = off")
        .execute(&mut *admin)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE \"{name}\" RESET default_transaction_read_only"
    ))
    .execute(&mut *admin)
    .await
    .unwrap();
    drop(admin);
    wait("the primary back", async || {
        database.primary().as_deref() == Some(live.as_str())
    })
    .await;
    wait("the pool ready", async || ready(&pool).await).await;
    sqlx::query("CREATE TEMPORARY TABLE written (x int)")
        .execute(&pool)
        .await
        .unwrap();
    shutdown.trigger();
    watching.await.unwrap();
}

/// A pooled connection is pinged before it is handed out only when it sat idle for
/// `PING_AFTER_IDLE`: one the server dropped while idle is replaced unseen, and one idle for less goes
/// to its next query without the ping's round trip (so a drop in that moment fails that query, and the
/// connection is closed, not returned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_idle_pooled_connection_is_pinged_before_it_is_handed_out() {
    use cairn_reconciler::store::failover::PING_AFTER_IDLE;
    use std::time::Instant;

    let Some(db) = TestDb::new().await else {
        return;
    };
    let database = Database::open(db.url()).unwrap();
    let pool = database.pool(1).await.unwrap();
    let backend = async || -> Result<i32, sqlx::Error> {
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
    };
    // The pool's one connection, once back in the pool (sqlx pings it on its way back), dropped by the
    // server; returns its backend and when it was back.
    let dropped_while_idle = async || -> (i32, Instant) {
        let pid = backend().await.unwrap();
        while pool.num_idle() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let idle_since = Instant::now();
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(db.pool())
            .await
            .unwrap();
        (pid, idle_since)
    };

    let (first, _) = dropped_while_idle().await;
    tokio::time::sleep(PING_AFTER_IDLE + Duration::from_millis(300)).await;
    let second = backend()
        .await
        .expect("the dropped idle connection was replaced before the query");
    assert_ne!(second, first);

    // (A loaded machine may take longer than PING_AFTER_IDLE to drop it: then it was pinged, rightly,
    // and the test tries again.)
    for _ in 0..20 {
        let (pid, idle_since) = dropped_while_idle().await;
        if idle_since.elapsed() >= PING_AFTER_IDLE - Duration::from_millis(200) {
            continue;
        }
        assert!(
            backend().await.is_err(),
            "a connection idle for less than PING_AFTER_IDLE is handed out unpinged"
        );
        let next = backend()
            .await
            .expect("the broken connection was not returned");
        assert_ne!(next, pid);
        return;
    }
    panic!("the server never dropped a pooled connection within PING_AFTER_IDLE of its return");
}
