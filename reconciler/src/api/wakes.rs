//! Per-app wake-ups of output followers (`cairn logs --follow`, the dashboard's live streams): storing
//! an app's lines wakes only that app's followers, and nothing wakes an idle one, so a thousand open
//! streams cost nothing until their app prints.
//!
//! Lines stored through another control plane arrive as notifications (the store sends one per app and
//! transaction: [`REPLICA_OUTPUT`], [`BUILD_OUTPUT`]), which `cairn serve` forwards here with
//! [`Wakes::follow`]; when its LISTEN connection is (re)made, every follower is woken once, since
//! notifications sent meanwhile were missed.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

pub use crate::store::listen::{BUILD_OUTPUT, REPLICA_OUTPUT};

/// One kind of output's followers, by app.
#[derive(Debug, Default)]
pub struct Wakes {
    apps: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// The map's size after its last sweep of apps nobody follows any more.
    swept: std::sync::atomic::AtomicUsize,
}

impl Wakes {
    /// A receiver that changes whenever `app`'s lines are stored after this call.
    pub fn subscribe(&self, app: &str) -> watch::Receiver<u64> {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        let rx = match apps.get(app) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                apps.insert(app.to_owned(), tx);
                rx
            }
        };
        // Forget apps without followers once the map doubled since the last sweep: amortised O(1).
        let swept = self.swept.load(std::sync::atomic::Ordering::Relaxed);
        if apps.len() > 2 * swept.max(64) {
            apps.retain(|_, tx| tx.receiver_count() > 0);
            self.swept
                .store(apps.len(), std::sync::atomic::Ordering::Relaxed);
        }
        rx
    }

    /// Wakes `app`'s followers.
    pub fn wake(&self, app: &str) {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = apps.get(app) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every follower (what was announced while nobody listened is unknown).
    pub fn wake_all(&self) {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        for tx in apps.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Followers of how many apps are remembered (for tests).
    pub fn len(&self) -> usize {
        self.apps.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forwards `channel`'s notifications (another control plane stored lines) to these followers until
    /// `shutdown`.
    pub async fn follow(
        self: std::sync::Arc<Self>,
        pool: sqlx::PgPool,
        channel: &'static str,
        shutdown: &crate::worker::Shutdown,
    ) {
        use crate::store::listen::{Heard, forward};
        forward(
            pool,
            channel,
            "output",
            |heard| match heard {
                Heard::Listening => self.wake_all(),
                Heard::Notified(app) => self.wake(app),
            },
            shutdown,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_apps_followers_wake_and_the_unfollowed_are_forgotten() {
        let w = Wakes::default();
        let mut web = w.subscribe("web");
        let api = w.subscribe("api");
        w.wake("web");
        assert!(web.has_changed().unwrap());
        assert!(!api.has_changed().unwrap());
        web.mark_unchanged();
        w.wake_all();
        assert!(web.has_changed().unwrap() && api.has_changed().unwrap());
        w.wake("nobody");
        drop((web, api));
        for i in 0..200 {
            drop(w.subscribe(&format!("app-{i}")));
        }
        assert!(w.len() < 200, "apps nobody follows are swept: {}", w.len());
    }
}
