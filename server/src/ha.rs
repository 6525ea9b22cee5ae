//! Several `cairn serve` on one database: this replica's registration, its leadership, the loops that
//! run only in a term of it, and the wake-ups every replica forwards to the leader.
//!
//! Active-active (every replica, each job a row claimed with `FOR UPDATE SKIP LOCKED` or a lease): the
//! agent, admin and webhook APIs, webhook deliveries, head checks, pull-request plans, the GitHub and
//! notification outboxes, certificate orders, the route table (computed from the store by each), the
//! output and history prunes. Leader only (a [`Term`]): the reconcile loop (its config fetch timer,
//! head polling, change marks), the liveness sweep and the usage rollup. ARCHITECTURE.md lists why.
//!
//! What it must not do: decide anything (the modules it starts do), or run a leader's loop outside a
//! term: each takes the term's `stop` and its fence.

use std::sync::Arc;
use std::time::Duration;

use cairn_reconciler::controller::Controller;
use cairn_reconciler::leader::{Leadership, LeaseSettings, Term};
use cairn_reconciler::liveness::Judging;
use cairn_reconciler::store::lease;
use cairn_reconciler::store::listen::{Heard, forward};
use cairn_reconciler::worker::Shutdown;
use cairn_schema::error::chain as error_chain;
use sqlx::PgPool;
use tokio::sync::Notify;

/// How `cairn serve` takes part among several control planes.
#[derive(Debug, Clone)]
pub struct HaSettings {
    /// This replica's id in the registry and the lease (`--replica-id`; the binary makes one up from
    /// the host name and a random suffix).
    pub replica_id: String,
    /// Where operators and agents reach this replica (`--advertise-url`, else the listen address), as
    /// `cairn status` shows it.
    pub address: String,
    pub lease: LeaseSettings,
}

impl HaSettings {
    /// A random id, the default lease.
    pub fn new(address: String) -> HaSettings {
        HaSettings {
            replica_id: format!("cp-{:016x}", rand_u64()),
            address,
            lease: LeaseSettings::default(),
        }
    }
}

/// 64 random bits from the standard library's per-process hasher keys.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Registers this replica and starts keeping the lease.
pub(crate) async fn start(
    pool: &PgPool,
    settings: &HaSettings,
    shutdown: &Shutdown,
) -> Result<Leadership, cairn_reconciler::store::StoreError> {
    lease::register(
        pool,
        &settings.replica_id,
        &settings.address,
        env!("CARGO_PKG_VERSION"),
    )
    .await?;
    tracing::info!(replica = %settings.replica_id, "registered among the control planes");
    Ok(Leadership::start(
        pool.clone(),
        &settings.replica_id,
        settings.lease,
        shutdown,
    ))
}

/// Forwards this replica's in-process wakes (`wake`: webhook work, operators' requests, nodes back,
/// head checks) to the leader through `NOTIFY cairn_reconcile`, and turns that channel into `run_wake`,
/// which the reconcile loop waits on (it runs only on the leader). Runs until `shutdown`.
pub(crate) async fn forward_wakes(
    pool: PgPool,
    leadership: Leadership,
    wake: Arc<Notify>,
    run_wake: Arc<Notify>,
    shutdown: &Shutdown,
) {
    let heard = {
        let (pool, run_wake, stop) = (pool.clone(), run_wake.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut connected = false;
            forward(
                pool,
                lease::WAKE_CHANNEL,
                "reconcile wake-ups",
                move |h: Heard<'_>| match h {
                    // Listening again after a lost connection: what was sent meanwhile was missed, so
                    // a pass now covers it (the first time, the loop's own first pass does).
                    Heard::Listening if !connected => connected = true,
                    Heard::Listening | Heard::Notified(_) => run_wake.notify_one(),
                },
                &stop,
            )
            .await
        })
    };
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = shutdown.wait() => break,
        }
        // The leader wakes its own loop at once; the NOTIFY reaches the leader wherever it runs.
        if leadership.current().is_some() {
            run_wake.notify_one();
        }
        if let Err(e) = lease::notify_wake(&pool).await {
            tracing::warn!(error = %error_chain(&e), "cannot wake the leader's reconciler; its timer will");
        }
    }
    let _ = heard.await;
}

/// What runs in each term of this replica's leadership.
pub(crate) struct LeaderLoops {
    pub controller: Arc<Controller>,
    pub run_wake: Arc<Notify>,
    pub interval: Duration,
    /// The liveness monitor's pool and judgement.
    pub pool: PgPool,
    pub judging: Judging,
    pub wake: Arc<Notify>,
    pub usage_period: Duration,
}

impl LeaderLoops {
    /// Runs the leader's loops in each term until `shutdown`; a term's loops stop at once when it ends.
    pub(crate) async fn run(self, leadership: &Leadership, shutdown: &Shutdown) {
        leadership
            .each_term(shutdown, |term: Term| {
                let Term { fence, stop } = term;
                tracing::info!(
                    epoch = fence.epoch,
                    "leader: reconciling, judging liveness, rolling usage up"
                );
                self.controller.set_fence(Some(fence.clone()));
                let liveness = tokio::spawn({
                    let (pool, judging, wake, stop) = (
                        self.pool.clone(),
                        self.judging.clone(),
                        self.wake.clone(),
                        stop.clone(),
                    );
                    let fence = Some(fence.clone());
                    async move {
                        cairn_reconciler::liveness::monitor(pool, judging, wake, fence, &stop).await
                    }
                });
                let usage = tokio::spawn({
                    let (pool, period, stop) = (self.pool.clone(), self.usage_period, stop.clone());
                    async move { cairn_reconciler::usage::rollup_loop(pool, period, &stop).await }
                });
                let forget = tokio::spawn({
                    let (pool, stop) = (self.pool.clone(), stop.clone());
                    async move { forget_gone(pool, &stop).await }
                });
                let (c, run_wake, interval) = (
                    self.controller.clone(),
                    self.run_wake.clone(),
                    self.interval,
                );
                async move {
                    c.run(run_wake, interval, &stop).await;
                    let _ = tokio::join!(liveness, usage, forget);
                    tracing::info!(epoch = fence.epoch, "leader's loops stopped");
                }
            })
            .await
    }
}

/// Deletes the registry rows of replicas not seen for a day, hourly.
async fn forget_gone(pool: PgPool, stop: &Shutdown) {
    loop {
        match lease::forget_gone(&pool, 24.0 * 3600.0).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(replicas = n, "control planes gone for a day forgotten"),
            Err(e) => tracing::warn!(error = %error_chain(&e), "cannot forget gone control planes"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = stop.wait() => return,
        }
    }
}
