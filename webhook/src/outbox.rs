//! The outbox of GitHub API calls: [`enqueue`] writes a call in the caller's transaction (so it is made
//! if and only if the change that needs it commits), and an [`OutboxWorker`] delivers it later with
//! retries, exponential backoff with jitter, GitHub's rate limits respected, and dead-lettering after
//! [`OutboxConfig::max_attempts`].
//!
//! Calls coalesce: a pull request has one pending plan comment call at most (a later plan replaces an
//! undelivered earlier one), and a commit has one pending status call per context (a later state
//! replaces an undelivered earlier one). A call is leased while in flight; a worker killed mid-call
//! leaves it to be made again when the lease ends, which the client makes harmless (a status is set
//! again; the plan comment is found by its marker and updated, not created twice).
//!
//! What it must not do: make a call outside a claimed lease, hold a database transaction open while
//! waiting on GitHub, drop a call that failed for a reason that may pass (it stays pending until it
//! succeeds or its attempts are used up, and then stays visible as dead), or count a rate-limit
//! refusal as a failed attempt.

use std::sync::Arc;
use std::time::Duration;

use cairn_reconciler::store::listen::{Heard, forward};
use cairn_reconciler::worker::{Shutdown, Worker};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;

use crate::deliveries::{backoff, next_due};
use crate::github::{ApiError, CommitStatus, GitHub, RepoName, fit_description, plan_comment_body};
use crate::store::{self, Failure, Outbox, Settled, StoreError};
use cairn_schema::error::chain;

/// The channel the outbox table's trigger notifies on insert.
pub const NOTIFY_CHANNEL: &str = "cairn_github_outbox";

/// A GitHub API call to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitHubCall {
    /// `POST /repos/{repo}/statuses/{sha}`.
    CreateStatus {
        repo: RepoName,
        sha: String,
        status: CommitStatus,
    },
    /// Create or update the plan comment on pull request `pr` (the body is Markdown; the hidden
    /// marker is added).
    UpsertPrComment {
        repo: RepoName,
        pr: u64,
        body: String,
    },
}

/// What is stored in `github_outbox.payload` for each kind.
#[derive(Debug, Serialize, Deserialize)]
struct StatusPayload {
    sha: String,
    #[serde(flatten)]
    status: CommitStatus,
}

#[derive(Debug, Serialize, Deserialize)]
struct CommentPayload {
    pr: u64,
    body: String,
}

const KIND_STATUS: &str = "create_status";
const KIND_COMMENT: &str = "upsert_pr_comment";

/// An outbox failure: a call that cannot be enqueued, or the database.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("`{sha}` is not a commit id (40 or 64 hexadecimal digits)")]
    BadSha { sha: String },
    #[error("a commit status needs a context")]
    EmptyContext,
    #[error("pull request number 0 does not exist")]
    BadPullRequest,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Adds `call` to the outbox as part of the transaction `tx` is in (pass `&mut tx` for a
/// [`sqlx::Transaction`]); it is delivered after that transaction commits (and never if it rolls
/// back). Returns the outbox row's id (the existing row's, when the call coalesced into one).
pub async fn enqueue(tx: &mut PgConnection, call: &GitHubCall) -> Result<i64, OutboxError> {
    let (kind, repo, payload, key) = match call {
        GitHubCall::CreateStatus { repo, sha, status } => {
            let sha_ok =
                (sha.len() == 40 || sha.len() == 64) && sha.chars().all(|c| c.is_ascii_hexdigit());
            if !sha_ok {
                return Err(OutboxError::BadSha { sha: sha.clone() });
            }
            if status.context.trim().is_empty() {
                return Err(OutboxError::EmptyContext);
            }
            let mut status = status.clone();
            status.description = fit_description(&status.description);
            let sha = sha.to_ascii_lowercase();
            let key = format!("status:{}@{sha}:{}", repo.key(), status.context);
            let payload = StatusPayload { sha, status };
            (KIND_STATUS, repo, to_value(&payload), key)
        }
        GitHubCall::UpsertPrComment { repo, pr, body } => {
            if *pr == 0 {
                return Err(OutboxError::BadPullRequest);
            }
            let key = format!("comment:{}#{pr}", repo.key());
            let payload = CommentPayload {
                pr: *pr,
                body: plan_comment_body(body),
            };
            (KIND_COMMENT, repo, to_value(&payload), key)
        }
    };
    Ok(store::outbox_insert(tx, kind, &repo.to_string(), &payload, Some(&key)).await?)
}

fn to_value<T: Serialize>(payload: &T) -> Value {
    serde_json::to_value(payload).expect("outbox payloads serialize")
}

/// How the worker paces and gives up.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Attempts before a call is dead (rate-limit refusals do not count).
    pub max_attempts: u32,
    /// The first retry's delay; each further retry doubles it (with jitter) up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a claimed call is reserved for its worker; a call takes at most half of it.
    pub lease: Duration,
    /// How often to look for due calls when no notification arrives.
    pub poll_interval: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_attempts: 10,
            base_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30 * 60),
            lease: Duration::from_secs(5 * 60),
            poll_interval: Duration::from_secs(30),
        }
    }
}

/// What one [`OutboxWorker::deliver_due`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub done: usize,
    /// Failed and scheduled again.
    pub retrying: usize,
    pub dead: usize,
    /// Delivered or failed, but a newer payload arrived meanwhile: due again at once.
    pub superseded: usize,
    /// The pass stopped at GitHub's rate limit; every pending call waits for it to reset.
    pub rate_limited: bool,
}

/// Delivers the outbox's calls to GitHub.
#[derive(Debug, Clone)]
pub struct OutboxWorker {
    pool: PgPool,
    github: Arc<GitHub>,
    config: OutboxConfig,
}

impl OutboxWorker {
    pub fn new(pool: PgPool, github: Arc<GitHub>, config: OutboxConfig) -> OutboxWorker {
        OutboxWorker {
            pool,
            github,
            config,
        }
    }

    /// Makes every call that is due, one at a time (GitHub asks integrations not to make concurrent
    /// requests), until none is due or GitHub's rate limit stops the pass.
    pub async fn deliver_due(&self) -> Result<Pass, OutboxError> {
        let mut pass = Pass::default();
        if let Some(wait) = self.github.rate_limit_pause() {
            store::outbox_pause_all(&self.pool, wait.as_secs_f64()).await?;
            pass.rate_limited = true;
            return Ok(pass);
        }
        while let Some(call) =
            store::outbox_claim(&self.pool, self.config.lease.as_secs_f64()).await?
        {
            // Crash tests stop here: the claim is committed and GitHub has not been called.
            cairn_reconciler::executor::failpoint(&format!("outbox-before-{}", call.kind)).await;
            let result = tokio::time::timeout(self.config.lease / 2, self.call(&call)).await;
            let result = match result {
                Ok(result) => result,
                Err(_) => Err(CallError::TimedOut(self.config.lease / 2)),
            };
            let settled = match result {
                Ok(comment_id) => {
                    let mut tx = self
                        .pool
                        .begin()
                        .await
                        .map_err(|e| StoreError::from_sqlx("starting a transaction", e))?;
                    if let Some((repo, pr, id)) = comment_id {
                        store::set_pr_comment_id(&mut tx, &repo, pr, id).await?;
                    }
                    let settled =
                        store::outbox_done(&mut tx, Outbox::GitHub, call.id, call.version).await?;
                    tx.commit().await.map_err(|e| {
                        StoreError::from_sqlx("committing a delivered GitHub call", e)
                    })?;
                    if settled == Settled::AsIntended {
                        tracing::info!(id = call.id, kind = %call.kind, repo = %call.repo, "GitHub call made");
                        pass.done += 1;
                    }
                    settled
                }
                Err(CallError::Api(ApiError::RateLimited { retry_in, .. })) => {
                    let error = format!("rate limited by GitHub; waiting {}s", retry_in.as_secs());
                    tracing::warn!(id = call.id, repo = %call.repo, %error, "GitHub call postponed");
                    let failure = Failure::Retry {
                        in_secs: retry_in.as_secs_f64(),
                        count: false,
                    };
                    store::outbox_failed(
                        &self.pool,
                        Outbox::GitHub,
                        call.id,
                        call.version,
                        &error,
                        failure,
                    )
                    .await?;
                    store::outbox_pause_all(&self.pool, retry_in.as_secs_f64()).await?;
                    pass.rate_limited = true;
                    return Ok(pass);
                }
                Err(e) => {
                    let error = chain(&e);
                    let used_up = call.attempts >= self.config.max_attempts as i32;
                    let failure = if e.is_permanent() || used_up {
                        Failure::Dead
                    } else {
                        let delay = backoff(
                            call.attempts as u32,
                            self.config.base_backoff,
                            self.config.max_backoff,
                        );
                        Failure::Retry {
                            in_secs: delay.as_secs_f64(),
                            count: true,
                        }
                    };
                    let dead = matches!(failure, Failure::Dead);
                    let settled = store::outbox_failed(
                        &self.pool,
                        Outbox::GitHub,
                        call.id,
                        call.version,
                        &error,
                        failure,
                    )
                    .await?;
                    if settled == Settled::AsIntended {
                        if dead {
                            tracing::error!(id = call.id, kind = %call.kind, repo = %call.repo,
                                attempts = call.attempts, %error, "GitHub call dead-lettered");
                            pass.dead += 1;
                        } else {
                            tracing::warn!(id = call.id, kind = %call.kind, repo = %call.repo,
                                attempts = call.attempts, %error, "GitHub call failed; will retry");
                            pass.retrying += 1;
                        }
                    }
                    settled
                }
            };
            if settled == Settled::Superseded {
                pass.superseded += 1;
            }
            if let Some(wait) = self.github.rate_limit_pause() {
                store::outbox_pause_all(&self.pool, wait.as_secs_f64()).await?;
                pass.rate_limited = true;
                return Ok(pass);
            }
        }
        Ok(pass)
    }

    /// Makes one claimed call; for a plan comment, returns what to remember of it.
    async fn call(
        &self,
        call: &store::ClaimedCall,
    ) -> Result<Option<(String, i64, i64)>, CallError> {
        let repo = RepoName::parse(&call.repo).map_err(|e| CallError::Unreadable(e.to_string()))?;
        let unreadable = |e: serde_json::Error| CallError::Unreadable(e.to_string());
        match call.kind.as_str() {
            KIND_STATUS => {
                let payload: StatusPayload =
                    serde_json::from_value(call.payload.clone()).map_err(unreadable)?;
                self.github
                    .create_status(&repo, &payload.sha, &payload.status)
                    .await?;
                Ok(None)
            }
            KIND_COMMENT => {
                let payload: CommentPayload =
                    serde_json::from_value(call.payload.clone()).map_err(unreadable)?;
                let pr = i64::try_from(payload.pr)
                    .map_err(|_| CallError::Unreadable("pull request number".to_owned()))?;
                let known = store::pr_comment_id(&self.pool, &repo.key(), pr)
                    .await?
                    .and_then(|id| u64::try_from(id).ok());
                let id = self
                    .github
                    .upsert_pr_comment(&repo, payload.pr, &payload.body, known)
                    .await?;
                let id = i64::try_from(id)
                    .map_err(|_| CallError::Unreadable(format!("comment id {id}")))?;
                Ok(Some((repo.key(), pr, id)))
            }
            other => Err(CallError::Unreadable(format!("unknown kind `{other}`"))),
        }
    }

    /// Delivers calls as they become due until `shutdown` is triggered: woken by the outbox table's
    /// NOTIFY, by the earliest scheduled retry, and at least every `poll_interval`.
    pub async fn run(&self, shutdown: &Shutdown) {
        let wake = Arc::new(Notify::new());
        let listen = forward(
            self.pool.clone(),
            NOTIFY_CHANNEL,
            "GitHub calls",
            {
                let wake = wake.clone();
                // A (re)connect wakes a pass too: calls enqueued while no one listened are due.
                move |_: Heard<'_>| wake.notify_one()
            },
            shutdown,
        );
        // A call cut short by shutdown stays leased and is made again when its lease ends.
        let deliver = Worker::new("delivering GitHub calls", self.config.poll_interval)
            .woken_by(wake.clone())
            .abandon_at_shutdown()
            .run(shutdown, |_| async {
                self.deliver_due().await?;
                let due = store::outbox_next_due_in(&self.pool, Outbox::GitHub).await;
                Ok::<_, OutboxError>(next_due(due, 0.0, "reading the GitHub outbox"))
            });
        tokio::join!(listen, deliver);
    }
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the stored call cannot be read: {0}")]
    Unreadable(String),
    #[error("the call took longer than {0:?}")]
    TimedOut(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CallError {
    fn is_permanent(&self) -> bool {
        match self {
            CallError::Api(e) => e.is_permanent(),
            CallError::Unreadable(_) => true,
            CallError::TimedOut(_) | CallError::Store(_) => false,
        }
    }
}

/// A finished call, as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadCall {
    pub id: i64,
    pub kind: String,
    pub repo: String,
    pub payload: Value,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The `limit` most recently dead-lettered calls, newest first.
pub async fn dead_letters(pool: &PgPool, limit: u32) -> Result<Vec<DeadCall>, OutboxError> {
    Ok(store::outbox_dead(pool, i64::from(limit))
        .await?
        .into_iter()
        .map(|row| DeadCall {
            id: row.id,
            kind: row.kind,
            repo: row.repo,
            payload: row.payload,
            attempts: row.attempts,
            last_error: row.last_error,
            created_at: row.created_at,
            finished_at: row.finished_at,
        })
        .collect())
}

/// Deletes calls that finished (done or dead) longer than `older_than` ago.
pub async fn prune(pool: &PgPool, older_than: Duration) -> Result<u64, OutboxError> {
    Ok(store::prune_outbox(pool, Outbox::GitHub, older_than.as_secs_f64()).await?)
}
