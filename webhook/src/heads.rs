//! The head checker: after a push to a branch apps follow, asks the app's remote (through the
//! operator's `--git-rewrite`s) which commit the branch points at now, records it as the app's source
//! head, and wakes the reconciler, which plans a release for it and its deploy tasks.
//!
//! Asking the remote instead of taking the payload's `after` is what makes the true head win whatever
//! order deliveries arrive in (a late delivery of an older push, a force push back to an older commit):
//! the head recorded is always what the remote says when asked, after the push that woke it.
//!
//! What it must not do: fetch objects or build (it lists refs, as `git ls-remote` does; the agent
//! clones), hold a database transaction while asking a remote, or decide what the head means: moving an
//! app is the planner's business (it honours pins).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_plan::observed::CommitId;
use cairn_reconciler::source::heads::HeadPoller;
use cairn_reconciler::store::state;
use cairn_reconciler::worker::{Shutdown, Worker};
use cairn_schema::Name;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::deliveries::{backoff, next_due};
use crate::store::{self, HeadCheck, StoreError};
use cairn_schema::error::chain;

/// Attempts at a remote that cannot be asked before the check is dropped (the reconciler's poll on
/// its interval is the safety net).
pub const MAX_ATTEMPTS: i32 = 5;
/// How long a claimed check is reserved for its checker.
const LEASE: Duration = Duration::from_secs(120);
/// Checks claimed at once.
const BATCH: i64 = 32;
/// A remote that does not answer in this long counts as a failed attempt.
const ASK_TIMEOUT: Duration = Duration::from_secs(60);

/// What one [`HeadChecker::check_due`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checked {
    /// Apps whose recorded head changed.
    pub moved: usize,
    /// Apps whose head was already the one recorded.
    pub unchanged: usize,
    /// Checks left for a later attempt, or dropped after the last one.
    pub failed: usize,
}

/// A failure of the checker itself (a remote that cannot be asked is recorded on its check).
#[derive(Debug, thiserror::Error)]
pub enum HeadsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] cairn_reconciler::store::StoreError),
}

/// Reads branch heads for recorded push requests.
#[derive(Debug, Clone)]
pub struct HeadChecker {
    pool: PgPool,
    poller: Arc<Mutex<HeadPoller>>,
    reconcile: Arc<Notify>,
}

impl HeadChecker {
    /// `poller` carries the operator's rewrites; `reconcile` is woken when a head moved.
    pub fn new(pool: PgPool, poller: HeadPoller, reconcile: Arc<Notify>) -> HeadChecker {
        HeadChecker {
            pool,
            poller: Arc::new(Mutex::new(poller)),
            reconcile,
        }
    }

    /// Asks for every due head; wakes the reconciler once if any moved.
    pub async fn check_due(&self) -> Result<Checked, HeadsError> {
        let mut checked = Checked::default();
        loop {
            let claimed = store::claim_head_checks(&self.pool, LEASE.as_secs_f64(), BATCH).await?;
            if claimed.is_empty() {
                break;
            }
            for check in claimed {
                self.check(&check, &mut checked).await?;
            }
        }
        if checked.moved > 0 {
            self.reconcile.notify_one();
        }
        Ok(checked)
    }

    async fn check(&self, check: &HeadCheck, checked: &mut Checked) -> Result<(), HeadsError> {
        let result = match Name::new(&check.app) {
            Ok(app) => self.ask(app, check.url.clone(), check.branch.clone()).await,
            Err(e) => Err(format!("`{}` is not an app name: {e}", check.app)),
        };
        match result {
            Ok(Some(commit)) => {
                let app = Name::new(&check.app).expect("checked above");
                let moved = state::record_source_head(
                    &self.pool,
                    &app,
                    &check.branch,
                    &CommitId::new(commit.clone()),
                )
                .await?;
                tracing::info!(app = %check.app, branch = %check.branch, %commit, moved,
                    "source head read after a push");
                if moved {
                    checked.moved += 1;
                } else {
                    checked.unchanged += 1;
                }
                Ok(
                    store::settle_head_check(
                        &self.pool,
                        &check.app,
                        check.version,
                        true,
                        None,
                        0.0,
                    )
                    .await?,
                )
            }
            Ok(None) => {
                // Deleted since the push: nothing to deploy; the reconciler's poll reports it.
                tracing::warn!(app = %check.app, branch = %check.branch,
                    "the branch an app follows no longer exists on its remote");
                checked.unchanged += 1;
                Ok(
                    store::settle_head_check(
                        &self.pool,
                        &check.app,
                        check.version,
                        true,
                        None,
                        0.0,
                    )
                    .await?,
                )
            }
            Err(error) => {
                checked.failed += 1;
                let give_up = check.attempts >= MAX_ATTEMPTS;
                if give_up {
                    tracing::error!(app = %check.app, attempts = check.attempts, %error,
                        "cannot read a source head after a push; left to the reconciler's poll");
                } else {
                    tracing::warn!(app = %check.app, attempts = check.attempts, %error,
                        "cannot read a source head after a push; will retry");
                }
                let delay = backoff(
                    check.attempts as u32,
                    Duration::from_secs(2),
                    Duration::from_secs(120),
                );
                store::settle_head_check(
                    &self.pool,
                    &check.app,
                    check.version,
                    give_up,
                    Some(&error),
                    delay.as_secs_f64(),
                )
                .await?;
                Ok(())
            }
        }
    }

    /// Lists the remote's refs off the async workers, bounded by [`ASK_TIMEOUT`].
    async fn ask(&self, app: Name, url: String, branch: String) -> Result<Option<String>, String> {
        let poller = self.poller.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut poller = poller.lock().unwrap_or_else(|e| e.into_inner());
            poller.head(&app, &url, &branch).map_err(|e| chain(&e))
        });
        match tokio::time::timeout(ASK_TIMEOUT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(format!("the head check panicked: {e}")),
            Err(_) => Err(format!(
                "the remote did not answer within {}s",
                ASK_TIMEOUT.as_secs()
            )),
        }
    }

    /// Checks due heads whenever `wake` is notified (a push was recorded), when a retry is due, and at
    /// least every `poll`, until `shutdown` is triggered.
    pub async fn run(&self, wake: Arc<Notify>, poll: Duration, shutdown: &Shutdown) {
        // A pass stopped midway loses nothing: its lease expires and the work is done again.
        Worker::new("checking source heads", poll)
            .woken_by(wake)
            .abandon_at_shutdown()
            .run(shutdown, |_| async {
                let c = self.check_due().await?;
                if c != Checked::default() {
                    tracing::debug!(?c, "checked source heads");
                }
                let due = store::next_head_check_in(&self.pool).await;
                Ok::<_, HeadsError>(next_due(due, 0.05, "reading source head checks"))
            })
            .await
    }
}
