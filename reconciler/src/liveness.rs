//! Node liveness: a node whose agent has not sent a heartbeat for the offline threshold (`cairn serve
//! --node-offline-after`, 90 s by default) is marked offline, and the reconciler is woken so the planner
//! moves the node's replicas where capacity allows (and reports those it cannot place). A heartbeat
//! marks the node online again (the agent API does that, and wakes the reconciler too). Nodes are judged
//! only after this process has reached the database for a whole threshold (after it starts, and after
//! the database was unreachable or slow): heartbeats refused meanwhile were not a node's silence. The
//! planner's view of a stale heartbeat follows the same rule ([`Judging`]).
//!
//! What it must not do: decide where replicas go (the planner does, from the state this records), or
//! use any clock but the database's to judge a heartbeat's age. A node marked offline gets its
//! `node.offline` event in the same transaction (`crate::events`); its `node.online` comes with the
//! heartbeat that brings it back (`api/agent.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;

use crate::events::NewEvent;
use crate::store::{StoreError, nodes};
use crate::worker::{Pass, Shutdown, Woken, Worker};
use cairn_schema::Name;
use cairn_schema::error::chain as error_chain;

/// How often the monitor looks for silent nodes: a quarter of the threshold, between 200 ms and 5 s.
pub fn tick(offline_after: Duration) -> Duration {
    (offline_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// Whether a node's silence may be judged now: false until [`monitor`] has reached the database for a
/// whole threshold (after it starts, and after the database was unreachable or slow). The planner's own
/// view of liveness (a heartbeat older than the threshold counts as offline) follows the same rule
/// through [`crate::controller::Controller::judging`], so neither moves a replica off a node whose
/// heartbeats were refused rather than missing.
#[derive(Debug, Clone)]
pub struct Judging {
    now: Arc<AtomicBool>,
    offline_after: Duration,
}

impl Judging {
    /// Not judging yet, for a node offline threshold of `offline_after`.
    pub fn new(offline_after: Duration) -> Self {
        Judging {
            now: Arc::default(),
            offline_after,
        }
    }

    /// Whether silence may be judged now.
    pub fn now(&self) -> bool {
        self.now.load(Ordering::Relaxed)
    }

    /// The threshold: a node silent this long (while judging) is offline.
    pub fn offline_after(&self) -> Duration {
        self.offline_after
    }

    fn set(&self, judging: bool) {
        self.now.store(judging, Ordering::Relaxed);
    }
}

/// Marks nodes silent for the threshold offline every [`tick`] until `shutdown` is triggered, waking the
/// reconciler whenever it marks one; says through `judging` when silence may be judged.
///
/// `fence`: in `cairn serve`, the leader's term it runs in (it runs on the leader only): each marking
/// transaction checks the lease is still held with it, so a deposed leader marks nothing.
pub async fn monitor(
    pool: PgPool,
    judging: Judging,
    wake: Arc<Notify>,
    fence: Option<crate::store::lease::Fence>,
    shutdown: &Shutdown,
) {
    let offline_after = judging.offline_after();
    // Heartbeats reach the database only through a control plane that can reach it: while none ran, or
    // this one could not reach PostgreSQL, a node's silence proves nothing (its heartbeats were refused,
    // not missing). So nodes are judged only once this process has reached the database for a whole
    // threshold: after it starts, and again after every check that found it unreachable or slow (a query
    // waits for a connection while PostgreSQL is down, then succeeds, so an error alone would miss a
    // short outage), every live agent has heartbeated by then, and only the silent ones are marked.
    judging.set(false);
    let monitor = Monitor {
        period: tick(offline_after).max(Duration::from_secs(1)),
        judge_from: tokio::time::Instant::now() + offline_after,
        pool,
        judging,
        wake,
        fence,
    };
    // Its failures are warnings it logs itself: the database's outage is not this loop's to report.
    Worker::new("checking node liveness", tick(offline_after))
        .fixed_rate()
        .run(shutdown, monitor)
        .await
}

/// The state of [`monitor`] between its checks.
struct Monitor {
    pool: PgPool,
    judging: Judging,
    wake: Arc<Notify>,
    fence: Option<crate::store::lease::Fence>,
    /// How long a check may wait for the database.
    period: Duration,
    /// Silence is judged from then on (unless the database is unreachable or slow again).
    judge_from: tokio::time::Instant,
}

impl Pass for Monitor {
    type Error = std::convert::Infallible;

    async fn run(&mut self, _: Woken) -> Result<Option<Duration>, Self::Error> {
        let offline_after = self.judging.offline_after();
        match tokio::time::timeout(self.period, crate::store::ping(&self.pool)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                // A failover under way: the server answers but takes no writes.
                tracing::warn!("cannot check node liveness: the database is read-only");
                self.judging.set(false);
                self.judge_from = tokio::time::Instant::now() + offline_after;
                return Ok(None);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), "cannot check node liveness");
                self.judging.set(false);
                self.judge_from = tokio::time::Instant::now() + offline_after;
                return Ok(None);
            }
            Err(_) => {
                tracing::warn!(
                    "cannot check node liveness: the database did not answer within {:?}",
                    self.period
                );
                self.judging.set(false);
                self.judge_from = tokio::time::Instant::now() + offline_after;
                return Ok(None);
            }
        }
        if tokio::time::Instant::now() < self.judge_from {
            return Ok(None);
        }
        self.judging.set(true);
        match mark_offline(&self.pool, offline_after, self.fence.as_ref()).await {
            Ok(nodes) if nodes.is_empty() => {}
            Ok(nodes) => {
                for n in &nodes {
                    tracing::warn!(node = %n, after = ?offline_after, "node is offline: no heartbeat");
                }
                self.wake.notify_one();
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot check node liveness");
                self.judging.set(false);
                self.judge_from = tokio::time::Instant::now() + offline_after;
            }
        }
        Ok(None)
    }
}

/// Marks silent nodes offline and records a `node.offline` event for each, in one transaction: the
/// UPDATE changes only nodes still online, so each going offline is one event.
async fn mark_offline(
    pool: &PgPool,
    offline_after: Duration,
    fence: Option<&crate::store::lease::Fence>,
) -> Result<Vec<Name>, StoreError> {
    let mut tx = pool.begin().await.map_err(|source| StoreError::Query {
        op: "begin marking silent nodes offline",
        source,
    })?;
    if let Some(fence) = fence {
        crate::store::lease::check(&mut tx, fence).await?;
    }
    let marked = nodes::mark_offline(&mut tx, offline_after).await?;
    for n in &marked {
        crate::store::usage::close_offline_node(&mut tx, n.as_str()).await?;
    }
    let events: Vec<NewEvent> = marked
        .iter()
        .map(|n| NewEvent::node_offline(n, offline_after))
        .collect();
    crate::events::record(&mut tx, &events).await?;
    tx.commit().await.map_err(|source| StoreError::Query {
        op: "commit marking silent nodes offline",
        source,
    })?;
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_follows_the_threshold_within_bounds() {
        assert_eq!(tick(Duration::from_secs(90)), Duration::from_secs(5));
        assert_eq!(tick(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(tick(Duration::from_millis(100)), Duration::from_millis(200));
    }
}
