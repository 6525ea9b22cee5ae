//! Processing recorded webhook deliveries: a worker claims each unprocessed delivery from Postgres
//! (`FOR UPDATE SKIP LOCKED`, so several control planes never process one twice), classifies it
//! against the [`Routes`] the reconciler gives, calls the reconciler through [`DeliveryHandler`] in the
//! same transaction that marks the delivery handled, and records what it caused or why it was ignored.
//! Also the delivery history (`cairn webhooks`) and its retention.
//!
//! What it must not do: answer HTTP (the receiver does, before any of this runs), carry a change
//! itself (a handler wakes the reconciler, which re-reads everything), or process a delivery twice:
//! the handler's writes and the delivery's new status commit together or not at all.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use cairn_reconciler::metrics::DeliveryOutcome;
use cairn_reconciler::worker::{Shutdown, Worker};
use cairn_schema::error::chain;
use chrono::{DateTime, Utc};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::events::{self, ConfigPush, Event, Intent, PullRequest, Routes, SourcePush};
use crate::store::{self, StoreError};

/// What a handler can fail with. Its text is stored as the delivery's outcome and shown by
/// `cairn webhooks`, so it must not contain secrets.
pub type HandlerError = Box<dyn StdError + Send + Sync>;

/// What a delivery caused, in a line for `cairn webhooks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It changed something or woke someone: "woke the reconciler for abc1234".
    Handled(String),
    /// It needed nothing after all: "web is pinned to a rev".
    Ignored(String),
}

/// The delivery a handler is called for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryContext {
    /// `X-GitHub-Delivery`.
    pub delivery_id: String,
    /// When Cairn received it: the start of "push to running".
    pub received_at: DateTime<Utc>,
}

/// The reconciler's side of the webhook: what deliveries can be about, and what to do about them.
///
/// Each `on_*` method gets the connection of the transaction that will mark the delivery handled:
/// whatever it writes there (the new source head, a wake-up row, an outbox call) commits with that mark,
/// or not at all when it returns an error (the delivery is then retried after a backoff, and marked
/// `failed` after [`MAX_HANDLER_ATTEMPTS`]). Handlers must be quick and must not do remote IO (no git
/// fetch, no GitHub call): they record and wake; the work happens elsewhere, from what they recorded.
/// Waking an in-process worker is best done after the commit, e.g. by `NOTIFY` (transactional) or by
/// the caller of [`process_pending`] when it returns.
#[async_trait::async_trait]
pub trait DeliveryHandler: Send + Sync {
    /// The config repository and app sources as currently applied.
    async fn routes(&self) -> Result<Routes, HandlerError>;

    /// A push to the config repository's tracked branch.
    async fn on_config_push(
        &self,
        conn: &mut PgConnection,
        delivery: &DeliveryContext,
        push: &ConfigPush,
    ) -> Result<Outcome, HandlerError>;

    /// A push to a branch that apps follow.
    async fn on_source_push(
        &self,
        conn: &mut PgConnection,
        delivery: &DeliveryContext,
        push: &SourcePush,
    ) -> Result<Outcome, HandlerError>;

    /// A pull request to the config repository that needs a plan.
    async fn on_pull_request(
        &self,
        conn: &mut PgConnection,
        delivery: &DeliveryContext,
        pr: &PullRequest,
    ) -> Result<Outcome, HandlerError>;
}

/// Attempts at a delivery whose handler keeps failing before it is marked `failed`.
pub const MAX_HANDLER_ATTEMPTS: i32 = 5;
const RETRY_BASE: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// The delivery worker's failure: only the database's (a handler's failure is recorded on its
/// delivery).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DeliveryError(#[from] pub StoreError);

/// What one [`process_pending`] run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Processed {
    pub handled: usize,
    pub ignored: usize,
    /// Marked `failed`: attempts used up, or a stored payload that no longer parses.
    pub failed: usize,
    /// Left for a later attempt after a handler error.
    pub retrying: usize,
}

impl Processed {
    pub fn total(&self) -> usize {
        self.handled + self.ignored + self.failed + self.retrying
    }
}

/// Processes every delivery that is due, oldest first, one transaction each, until none is left.
pub async fn process_pending(
    pool: &PgPool,
    handler: &dyn DeliveryHandler,
) -> Result<Processed, DeliveryError> {
    let mut processed = Processed::default();
    while process_one(pool, handler, &mut processed).await? {}
    Ok(processed)
}

async fn process_one(
    pool: &PgPool,
    handler: &dyn DeliveryHandler,
    processed: &mut Processed,
) -> Result<bool, DeliveryError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| StoreError::from_sqlx("starting a transaction", e))?;
    let Some(claimed) = store::claim_delivery(&mut tx).await? else {
        return Ok(false);
    };
    let context = DeliveryContext {
        delivery_id: claimed.id.clone(),
        received_at: claimed.received_at,
    };
    // Everything about this delivery is logged in its span.
    let span = tracing::info_span!("delivery", id = %claimed.id, event = %claimed.event);
    async move {
        let metrics = cairn_reconciler::metrics::global();
        let event = match Event::from_value(&claimed.event, &claimed.payload) {
            Ok(event) => event,
            Err(e) => {
                // The receiver parsed it before recording it; only a change to the models can get here,
                // and retrying will not help.
                let outcome = format!("the stored payload no longer parses: {}", chain(&e));
                store::finish_delivery(&mut tx, &claimed.id, "failed", &outcome).await?;
                commit(tx).await?;
                processed.failed += 1;
                metrics.webhook_delivery(DeliveryOutcome::Failed);
                return Ok(true);
            }
        };

        let result = match &event {
            Event::Push(_) | Event::PullRequest(_) => match handler.routes().await {
                Ok(routes) => {
                    let intent = events::classify_event(&event, &routes);
                    dispatch(&mut tx, handler, &context, intent).await
                }
                Err(e) => Err(format!("could not read the routes: {}", chain(&*e))),
            },
            _ => {
                dispatch(
                    &mut tx,
                    handler,
                    &context,
                    events::classify_event(&event, &Routes::default()),
                )
                .await
            }
        };

        let ended = match result {
            Ok(Outcome::Handled(outcome)) => {
                store::finish_delivery(&mut tx, &claimed.id, "handled", &outcome).await?;
                processed.handled += 1;
                DeliveryOutcome::Handled
            }
            Ok(Outcome::Ignored(reason)) => {
                store::finish_delivery(&mut tx, &claimed.id, "ignored", &reason).await?;
                processed.ignored += 1;
                DeliveryOutcome::Ignored
            }
            Err(error) => {
                let attempts = claimed.attempts + 1;
                if attempts >= MAX_HANDLER_ATTEMPTS {
                    let outcome = format!("gave up after {attempts} attempts: {error}");
                    tracing::error!(delivery = %claimed.id, %outcome, "webhook delivery failed");
                    store::finish_delivery(&mut tx, &claimed.id, "failed", &outcome).await?;
                    processed.failed += 1;
                    DeliveryOutcome::Failed
                } else {
                    let delay = backoff(attempts as u32, RETRY_BASE, RETRY_MAX);
                    tracing::warn!(delivery = %claimed.id, attempts, %error, retry_in = ?delay,
                        "webhook delivery handler failed; will retry");
                    store::retry_delivery(&mut tx, &claimed.id, &error, delay.as_secs_f64())
                        .await?;
                    processed.retrying += 1;
                    DeliveryOutcome::Retry
                }
            }
        };
        commit(tx).await?;
        metrics.webhook_delivery(ended);
        Ok(true)
    }
    .instrument(span)
    .await
}

async fn commit(tx: sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), StoreError> {
    tx.commit()
        .await
        .map_err(|e| StoreError::from_sqlx("committing a webhook delivery", e))
}

/// Runs the handler for one intent inside a savepoint, so that a failing handler's writes are undone
/// while the delivery's own bookkeeping still commits. `Err` is the failure's text.
async fn dispatch(
    tx: &mut PgConnection,
    handler: &dyn DeliveryHandler,
    context: &DeliveryContext,
    intent: Intent,
) -> Result<Outcome, String> {
    let (mut savepoint, intent) = match intent {
        Intent::Ignored { reason } => return Ok(Outcome::Ignored(reason)),
        Intent::Ping { hook_id, zen } => {
            return Ok(Outcome::Handled(format!("ping from hook {hook_id}: {zen}")));
        }
        intent => (
            tx.begin()
                .await
                .map_err(|e| format!("could not start a savepoint: {e}"))?,
            intent,
        ),
    };
    let result = match &intent {
        Intent::ConfigPush(push) => {
            match handler.on_config_push(&mut savepoint, context, push).await {
                Ok(config) => match &push.source {
                    Some(source) => handler
                        .on_source_push(&mut savepoint, context, source)
                        .await
                        .map(|source| combine(config, source)),
                    None => Ok(config),
                },
                Err(e) => Err(e),
            }
        }
        Intent::SourcePush(push) => handler.on_source_push(&mut savepoint, context, push).await,
        Intent::PullRequest(pr) => handler.on_pull_request(&mut savepoint, context, pr).await,
        Intent::Ignored { .. } | Intent::Ping { .. } => unreachable!("answered above"),
    };
    match result {
        Ok(outcome) => {
            savepoint
                .commit()
                .await
                .map_err(|e| format!("could not release the savepoint: {e}"))?;
            Ok(outcome)
        }
        Err(e) => {
            let text = chain(&*e);
            savepoint
                .rollback()
                .await
                .map_err(|e| format!("{text} (and rolling back its writes failed: {e})"))?;
            Err(text)
        }
    }
}

/// A config repository that is also an app's source: both outcomes, handled if either was.
fn combine(config: Outcome, source: Outcome) -> Outcome {
    match (config, source) {
        (Outcome::Ignored(a), Outcome::Ignored(b)) => Outcome::Ignored(format!("{a}; {b}")),
        (Outcome::Handled(a) | Outcome::Ignored(a), Outcome::Handled(b) | Outcome::Ignored(b)) => {
            Outcome::Handled(format!("{a}; {b}"))
        }
    }
}

/// When a worker's next pass is due: in the seconds the store found until its earliest due row (at
/// least `floor`), or `None` (the poll) when none is scheduled or that could not be read (logged as
/// `what`).
pub(crate) fn next_due(
    found: Result<Option<f64>, StoreError>,
    floor: f64,
    what: &str,
) -> Option<Duration> {
    match found {
        Ok(due) => due.map(|s| Duration::from_secs_f64(s.max(floor))),
        Err(e) => {
            tracing::error!(error = %chain(&e), "{what}");
            None
        }
    }
}

/// Exponential backoff with equal jitter: between half and all of `base * 2^(attempt-1)`, capped.
pub(crate) fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(30)));
    let full = exp.min(max);
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Waits for work (the receiver's wake-up, or `poll` as the safety net for other control planes'
/// deliveries and for retries) and processes what is due, until `shutdown` is triggered.
pub async fn run(
    pool: PgPool,
    handler: Arc<dyn DeliveryHandler>,
    wake: Arc<Notify>,
    poll: Duration,
    shutdown: &Shutdown,
) {
    Worker::new("processing webhook deliveries", poll)
        .woken_by(wake)
        .run(shutdown, |_| async {
            let p = process_pending(&pool, &*handler).await?;
            if p.total() > 0 {
                tracing::debug!(?p, "processed webhook deliveries");
            }
            Ok::<_, DeliveryError>(None)
        })
        .await
}

/// A recorded delivery, as `cairn webhooks` shows it (and `GET /api/v1/webhooks` sends it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryRecord {
    pub delivery_id: String,
    pub event: String,
    pub action: Option<String>,
    pub received_at: DateTime<Utc>,
    pub status: DeliveryStatus,
    /// What it caused, why it was ignored, or its (last) error.
    pub outcome: Option<String>,
    pub attempts: i32,
    pub handled_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Received,
    Handled,
    Ignored,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Received => "received",
            DeliveryStatus::Handled => "handled",
            DeliveryStatus::Ignored => "ignored",
            DeliveryStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> DeliveryStatus {
        match s {
            "handled" => DeliveryStatus::Handled,
            "ignored" => DeliveryStatus::Ignored,
            "failed" => DeliveryStatus::Failed,
            // The table's CHECK allows nothing else.
            _ => DeliveryStatus::Received,
        }
    }
}

/// The `limit` most recent deliveries, newest first.
pub async fn recent(pool: &PgPool, limit: u32) -> Result<Vec<DeliveryRecord>, DeliveryError> {
    Ok(store::recent_deliveries(pool, i64::from(limit))
        .await?
        .into_iter()
        .map(|row| DeliveryRecord {
            delivery_id: row.id,
            event: row.event,
            action: row.action,
            received_at: row.received_at,
            status: DeliveryStatus::parse(&row.status),
            outcome: row.outcome,
            attempts: row.attempts,
            handled_at: row.handled_at,
        })
        .collect())
}

/// Deletes processed deliveries received longer than `older_than` ago; unprocessed ones are kept
/// whatever their age. Returns how many were deleted.
pub async fn prune_deliveries(pool: &PgPool, older_than: Duration) -> Result<u64, DeliveryError> {
    Ok(store::prune_deliveries(pool, older_than.as_secs_f64()).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        for _ in 0..200 {
            let first = backoff(1, base, max);
            assert!(
                first >= Duration::from_secs(1) && first <= base,
                "{first:?}"
            );
            let third = backoff(3, base, max);
            assert!(third >= Duration::from_secs(4) && third <= Duration::from_secs(8));
            let late = backoff(40, base, max);
            assert!(late >= Duration::from_secs(30) && late <= max, "{late:?}");
        }
    }

    #[test]
    fn combined_outcomes_are_handled_if_either_was() {
        let h = |s: &str| Outcome::Handled(s.to_owned());
        let i = |s: &str| Outcome::Ignored(s.to_owned());
        assert_eq!(combine(h("a"), i("b")), h("a; b"));
        assert_eq!(combine(i("a"), h("b")), h("a; b"));
        assert_eq!(combine(i("a"), i("b")), i("a; b"));
    }
}
