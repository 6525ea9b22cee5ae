//! The leader's lease and the replicas registry (migration `…190100_leadership.sql`): the statements
//! [`crate::leader`] runs to take and renew the one lease row, the fence a leader's transaction checks,
//! and the rows `cairn status` reads.
//!
//! Time is the database's (`clock_timestamp()`), never the replicas': their clocks need not agree.
//!
//! What it must not do: decide when to renew or what a term runs (`crate::leader` does), or hold the
//! lease row locked outside a leader's own short transaction.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row as _};

use super::{Op as _, StoreError, to_u64};

/// What a leader's transaction proves it holds: this replica's id and its term's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub holder: String,
    pub epoch: u64,
}

/// Takes the lease for `holder` when it is free or expired (a new epoch), or renews it when `holder`
/// still holds it with `epoch` and it has not expired (the same epoch); the lease then lasts `ttl_secs`
/// from now. `None`: another replica holds it.
///
/// `restarted`: this process is starting, so a lease its id still holds was its predecessor's (a
/// process killed and started again): it takes it over at once with a new epoch, which fences the old
/// holder should it still run.
pub async fn claim(
    pool: &PgPool,
    holder: &str,
    epoch: Option<u64>,
    ttl_secs: f64,
    restarted: bool,
) -> Result<Option<u64>, StoreError> {
    let epoch = epoch.and_then(|e| i64::try_from(e).ok()).unwrap_or(-1);
    let row = sqlx::query(
        "UPDATE control_plane_lease l SET
             epoch = CASE WHEN l.holder = $1 AND l.epoch = $2 AND l.expires_at > clock_timestamp()
                          THEN l.epoch ELSE l.epoch + 1 END,
             acquired_at = CASE WHEN l.holder = $1 AND l.epoch = $2 AND l.expires_at > clock_timestamp()
                          THEN l.acquired_at ELSE clock_timestamp() END,
             holder = $1,
             renewed_at = clock_timestamp(),
             expires_at = clock_timestamp() + make_interval(secs => $3)
         WHERE (l.holder = $1 AND (l.epoch = $2 OR $4)) OR l.expires_at <= clock_timestamp()
         RETURNING l.epoch",
    )
    .bind(holder)
    .bind(epoch)
    .bind(ttl_secs)
    .bind(restarted)
    .fetch_optional(pool)
    .await
    .op("take or renew the leader's lease")?;
    row.map(|r| {
        let e: i64 = r.try_get("epoch").op("read the leader's lease")?;
        to_u64("control_plane_lease", "epoch", e)
    })
    .transpose()
}

/// Gives the lease up at once (a graceful shutdown), so another replica takes it without waiting for
/// it to expire. Nothing when `holder` no longer holds it with `epoch`.
pub async fn release(pool: &PgPool, fence: &Fence) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE control_plane_lease SET expires_at = '-infinity'
         WHERE holder = $1 AND epoch = $2",
    )
    .bind(&fence.holder)
    .bind(i64::try_from(fence.epoch).unwrap_or(i64::MAX))
    .execute(pool)
    .await
    .op("give the leader's lease up")?;
    Ok(())
}

/// The fence: in a leader's transaction, locks the lease row and records the epoch as the last one that
/// wrote, or fails with [`StoreError::Deposed`] when the lease is no longer `fence`'s (taken by another,
/// or expired by the database's clock). The row stays locked until the transaction ends, so no replica
/// takes the lease while a transaction of this term can still commit.
pub async fn check(conn: &mut PgConnection, fence: &Fence) -> Result<(), StoreError> {
    let held = sqlx::query(
        "UPDATE control_plane_lease SET fenced_epoch = epoch
         WHERE holder = $1 AND epoch = $2 AND expires_at > clock_timestamp()",
    )
    .bind(&fence.holder)
    .bind(i64::try_from(fence.epoch).unwrap_or(i64::MAX))
    .execute(conn)
    .await
    .op("check the leader's lease")?
    .rows_affected();
    match held {
        1 => Ok(()),
        _ => Err(StoreError::Deposed { epoch: fence.epoch }),
    }
}

/// Records this replica as running (again): its address and version, started now.
pub async fn register(
    pool: &PgPool,
    id: &str,
    address: &str,
    version: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO control_plane_replicas (id, address, version) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET address = $2, version = $3, started_at = now(), last_seen = now()",
    )
    .bind(id)
    .bind(address)
    .bind(version)
    .execute(pool)
    .await
    .op("register this control plane")?;
    Ok(())
}

/// Moves this replica's `last_seen` to now.
pub async fn seen(pool: &PgPool, id: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE control_plane_replicas SET last_seen = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .op("record that this control plane runs")?;
    Ok(())
}

/// Deletes the rows of replicas not seen for `secs` (the leader does, now and then).
pub async fn forget_gone(pool: &PgPool, secs: f64) -> Result<u64, StoreError> {
    Ok(sqlx::query(
        "DELETE FROM control_plane_replicas WHERE last_seen < now() - make_interval(secs => $1)",
    )
    .bind(secs)
    .execute(pool)
    .await
    .op("forget control planes gone long ago")?
    .rows_affected())
}

/// One replica as `cairn status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRow {
    pub id: String,
    pub address: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// The lease as `cairn status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub holder: Option<String>,
    pub epoch: u64,
    pub acquired_at: Option<DateTime<Utc>>,
    pub renewed_at: Option<DateTime<Utc>>,
    /// Whether it has not expired (by the database's clock).
    pub live: bool,
    /// The database's clock when read, so ages need no agreement between clocks.
    pub now: DateTime<Utc>,
}

/// The lease, and the replicas seen within `recent_secs` (newest start first, at most 100).
pub async fn read(
    conn: &mut PgConnection,
    recent_secs: f64,
) -> Result<(LeaseRow, Vec<ReplicaRow>), StoreError> {
    const OP: &str = "read the leader's lease";
    let r = sqlx::query(
        "SELECT holder, epoch, acquired_at, renewed_at, expires_at > clock_timestamp() AS live,
                clock_timestamp() AS now
         FROM control_plane_lease",
    )
    .fetch_one(&mut *conn)
    .await
    .op(OP)?;
    let lease = LeaseRow {
        holder: r.try_get("holder").op(OP)?,
        epoch: to_u64("control_plane_lease", "epoch", r.try_get("epoch").op(OP)?)?,
        acquired_at: r.try_get("acquired_at").op(OP)?,
        renewed_at: r.try_get("renewed_at").op(OP)?,
        live: r.try_get("live").op(OP)?,
        now: r.try_get("now").op(OP)?,
    };
    const OPR: &str = "read the control planes";
    let rows = sqlx::query(
        "SELECT id, address, version, started_at, last_seen FROM control_plane_replicas
         WHERE last_seen >= now() - make_interval(secs => $1)
         ORDER BY started_at DESC, id LIMIT 100",
    )
    .bind(recent_secs)
    .fetch_all(&mut *conn)
    .await
    .op(OPR)?;
    let replicas = rows
        .into_iter()
        .map(|r| {
            Ok(ReplicaRow {
                id: r.try_get("id").op(OPR)?,
                address: r.try_get("address").op(OPR)?,
                version: r.try_get("version").op(OPR)?,
                started_at: r.try_get("started_at").op(OPR)?,
                last_seen: r.try_get("last_seen").op(OPR)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok((lease, replicas))
}

/// The channel on which any replica asks the leader to reconcile (`cairn serve` forwards its in-process
/// wakes there: a webhook, an operator's request, a node back online may reach any replica).
pub const WAKE_CHANNEL: &str = "cairn_reconcile";

/// `NOTIFY cairn_reconcile`: wakes the leader's reconcile loop, wherever it runs.
pub async fn notify_wake(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WAKE_CHANNEL)
        .execute(pool)
        .await
        .op("wake the leader's reconciler")?;
    Ok(())
}
