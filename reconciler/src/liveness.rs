//! Node liveness: a node whose agent has not sent a heartbeat for the offline threshold (`cairn serve
//! --node-offline-after`, 90 s by default) is marked offline, and the reconciler is woken so the planner
//! moves the node's replicas where capacity allows (and reports those it cannot place). A heartbeat
//! marks the node online again (the agent API does that, and wakes the reconciler too).
//!
//! What it must not do: decide where replicas go (the planner does, from the state this records), or
//! use any clock but the database's to judge a heartbeat's age.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;

use crate::controller::error_chain;
use crate::store::agents;

/// How often the monitor looks for silent nodes: a quarter of the threshold, between 200 ms and 5 s.
pub fn tick(offline_after: Duration) -> Duration {
    (offline_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// Marks silent nodes offline every [`tick`] until `shutdown` resolves, waking the reconciler whenever it
/// marks one.
pub async fn monitor(
    pool: PgPool,
    offline_after: Duration,
    wake: Arc<Notify>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut every = tokio::time::interval(tick(offline_after));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = every.tick() => {}
        }
        match agents::mark_offline(&pool, offline_after).await {
            Ok(nodes) if nodes.is_empty() => {}
            Ok(nodes) => {
                for n in &nodes {
                    tracing::warn!(node = %n, after = ?offline_after, "node is offline: no heartbeat");
                }
                wake.notify_one();
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "cannot check node liveness"),
        }
    }
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
