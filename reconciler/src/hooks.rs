//! Hooks: how the reconciler lets others record what it did, in its own transactions, without knowing
//! who they are. `cairn serve` installs the GitHub integration's [`Hooks`] (commit statuses written to
//! its outbox); without hooks nothing is told, and nothing else changes.
//!
//! - [`Hooks::reconcile_started`]: a config commit other than the applied one is about to be applied;
//! - [`Hooks::applied`]: inside the apply transaction, after the state, releases and tasks are written;
//! - [`Hooks::failed`]: inside the transaction that records a failed reconcile of a commit;
//! - [`Hooks::deploy_finished`]: a release's replicas are all healthy, or its deploy failed. The agent
//!   API calls it, through [`record_deploy_outcome`], in the transaction that records the outcome.
//!
//! What it must not do: let a hook do remote IO or wait on anything but Postgres (the apply lock is held
//! while [`Hooks::applied`] runs; a hook writes rows, an outbox, and returns), or let a hook block the
//! platform: a hook that fails is logged and its writes are rolled back to a savepoint, and the apply or
//! record it was called for commits all the same. What a hook writes commits if and only if that does.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use cairn_schema::Name;
use sqlx::{Connection as _, PgConnection, PgPool, Postgres, Transaction};

use crate::store::RecordedError;
use cairn_plan::Plan;
use cairn_plan::observed::ReleaseNumber;

/// What a hook can fail with; logged, never shown to a user.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// The future a hook returns (the trait is object-safe, so hooks are boxed futures).
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HookError>> + Send + 'a>>;

/// A deploy's outcome, as the agent API learns it.
#[derive(Debug, Clone, Copy)]
pub struct DeployOutcome<'a> {
    pub app: &'a Name,
    pub release: ReleaseNumber,
    /// Every replica of the release is running and healthy; `false`: the deploy failed.
    pub ok: bool,
    /// One line: what runs ("3/3 replicas healthy"), or why it failed. No secret may appear in it.
    pub reason: &'a str,
    /// From the push that brought the source commit to the first healthy replica, when the caller
    /// knows it; otherwise the hook measures from when the push was received, if it knows that.
    pub push_to_running: Option<Duration>,
}

/// Listeners for what the reconciler does. Every method is called with the reconciler's own
/// connection or transaction; see the module docs for what they may do.
pub trait Hooks: Send + Sync + fmt::Debug {
    /// A reconcile of `commit` (not the applied one) starts. Called outside any transaction: what the
    /// hook writes commits on its own.
    fn reconcile_started<'a>(&'a self, pool: &'a PgPool, commit: &'a str) -> HookFuture<'a>;

    /// `plan` was applied (it was not empty), in the transaction `conn` is in.
    fn applied<'a>(&'a self, conn: &'a mut PgConnection, plan: &'a Plan) -> HookFuture<'a>;

    /// A reconcile of `commit` failed with `errors` (at least one), recorded in the transaction `conn`
    /// is in. Nothing was applied.
    fn failed<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        commit: &'a str,
        errors: &'a [RecordedError],
    ) -> HookFuture<'a>;

    /// A release's deploy finished, in the caller's transaction `conn`.
    fn deploy_finished<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        outcome: &'a DeployOutcome<'a>,
    ) -> HookFuture<'a>;
}

/// What the agent API calls when a release is running on every replica or failed: tells the hooks (the
/// `cairn/deploy` commit status) in the caller's transaction. Does nothing without hooks.
pub async fn record_deploy_outcome(
    hooks: Option<&dyn Hooks>,
    conn: &mut PgConnection,
    outcome: &DeployOutcome<'_>,
) {
    let Some(hooks) = hooks else { return };
    let Some(mut savepoint) = savepoint(conn, "deploy_finished").await else {
        return;
    };
    let result = hooks.deploy_finished(&mut savepoint, outcome).await;
    settle(savepoint, "deploy_finished", result).await;
}

/// A savepoint of `conn`'s transaction for a hook to write in; `None` (logged) when it cannot be had.
pub(crate) async fn savepoint<'c>(
    conn: &'c mut PgConnection,
    hook: &'static str,
) -> Option<Transaction<'c, Postgres>> {
    match conn.begin().await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(hook, error = %e, "cannot start a savepoint for a hook; skipped");
            None
        }
    }
}

/// Keeps a hook's writes if it succeeded, undoes them with a warning if it failed.
pub(crate) async fn settle(
    savepoint: Transaction<'_, Postgres>,
    hook: &'static str,
    result: Result<(), HookError>,
) {
    match result {
        Ok(()) => {
            if let Err(e) = savepoint.commit().await {
                tracing::warn!(hook, error = %e, "cannot release a hook's savepoint");
            }
        }
        Err(e) => {
            tracing::warn!(hook, error = %cairn_schema::error::chain(&*e),
                "a hook failed; its writes are undone and the reconciler carries on");
            if let Err(e) = savepoint.rollback().await {
                tracing::warn!(hook, error = %e, "cannot roll back a hook's savepoint");
            }
        }
    }
}
