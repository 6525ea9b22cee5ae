//! Notifications: the events the reconciler records are delivered to the sinks declared in git
//! (`[notify.NAME]`) through an outbox with the GitHub outbox's life and statements
//! ([`crate::store::Outbox::Notify`]): a row per (event, sink) inserted in the event's transaction
//! (`cairn_reconciler::events::record`), claimed under a lease, sent, and marked done, retried with
//! backoff and jitter, or dead, with the receiver's status code and latency kept as the ledger
//! `cairn notify deliveries` reads.
//!
//! - a generic `webhook` gets the event as JSON, signed the Standard Webhooks way ([`sign`]): the same
//!   `webhook-id` on every attempt, so a receiver de-duplicates; a fresh `webhook-timestamp` and
//!   signature per attempt;
//! - Slack and Discord get their own message shapes ([`body`]);
//! - retries go on for [`NotifyConfig::retry_window`] (24 h), then the row is dead with its last error;
//!   a refusal that cannot pass (a 4xx other than 408 and 429, a URL that does not open) is dead at once.
//!
//! What it must not do: change an outcome (it runs after the event's transaction committed, on its own
//! connection), hold a transaction open while a receiver answers, or let a sink's URL or signing secret
//! out of memory: they are opened per attempt with the control plane's identity and appear in no log,
//! error, row or answer (reqwest's errors are stripped of the URL).

pub mod body;
pub mod sign;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_proto::admin::{EventInfo, NotifyDelivery, NotifyTestAnswer};
use cairn_reconciler::store::listen::{Heard, forward};
use cairn_reconciler::worker::{Shutdown, Worker};
use cairn_schema::error::chain;
use cairn_schema::{Ciphertext, Identity, SinkKind};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::deliveries::{backoff, next_due};
use crate::store::{self, Failure, Outbox, SealedSink, Settled, StoreError};

/// The channel the notification outbox's trigger notifies on insert.
pub const NOTIFY_CHANNEL: &str = "cairn_notify_outbox";

/// How much of a receiver's answer is kept for `cairn notify test`.
const ANSWER_BYTES: usize = 1024;

/// How the worker paces and gives up.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// The first retry's delay; each further retry doubles it (with jitter) up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// A notification not delivered this long after its event is dead.
    pub retry_window: Duration,
    /// How long a claimed notification is reserved for its worker (a killed worker's claim is taken
    /// again after it); a send takes at most half of it.
    pub lease: Duration,
    /// How often to look for due notifications when no notification arrives.
    pub poll_interval: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            base_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30 * 60),
            retry_window: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(30),
        }
    }
}

/// A notification failure the worker or the admin API reports.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot make an HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("there is no notification sink `{0}` in the applied configuration")]
    UnknownSink(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why one attempt failed. No variant carries a URL or a secret.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("the control plane has no identity (--identity) to open the sink's URL")]
    NoIdentity,
    #[error("the sink's {what} does not decrypt with the control plane's identity")]
    Sealed {
        what: &'static str,
        #[source]
        source: cairn_schema::SecretError,
    },
    #[error("the sink's URL is not an http:// or https:// URL")]
    BadUrl,
    #[error("the sink's signing secret cannot be used")]
    BadSecret(#[source] sign::SigningError),
    #[error("the sink was deleted from the configuration before this was sent")]
    SinkGone,
    #[error("unknown sink kind `{0}`")]
    UnknownKind(String),
    #[error("the request failed: {0}")]
    Http(String),
    #[error("the receiver answered {code}")]
    Status { code: u16 },
}

impl SendError {
    /// Whether a later attempt cannot succeed.
    fn is_permanent(&self) -> bool {
        match self {
            SendError::Status { code } => (400..500).contains(code) && ![408, 429].contains(code),
            SendError::Http(_) => false,
            _ => true,
        }
    }
}

/// What a receiver answered.
struct Answer {
    code: Option<u16>,
    latency: Duration,
    body: String,
}

/// What one [`Notifier::deliver_due`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub done: usize,
    pub retrying: usize,
    pub dead: usize,
}

/// Delivers the notification outbox.
#[derive(Debug, Clone)]
pub struct Notifier {
    pool: PgPool,
    identity: Option<Arc<Identity>>,
    http: reqwest::Client,
    config: NotifyConfig,
}

impl Notifier {
    pub fn new(
        pool: PgPool,
        identity: Option<Arc<Identity>>,
        config: NotifyConfig,
    ) -> Result<Notifier, NotifyError> {
        let http = reqwest::Client::builder()
            // A redirect would send the signed body somewhere the sink does not name.
            .redirect(reqwest::redirect::Policy::none())
            .timeout((config.lease / 2).max(Duration::from_secs(1)))
            .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(NotifyError::Client)?;
        Ok(Notifier {
            pool,
            identity,
            http,
            config,
        })
    }

    /// Sends every notification that is due, one at a time, until none is.
    pub async fn deliver_due(&self) -> Result<Pass, NotifyError> {
        let mut pass = Pass::default();
        while let Some(n) = store::notify_claim(&self.pool, self.config.lease.as_secs_f64()).await?
        {
            // Crash tests stop here: the claim is committed and the receiver has not been called.
            cairn_reconciler::executor::failpoint("notify-before-send").await;
            let result = match &n.sink {
                Some(sink) => self.send(sink, &n.webhook_id, &n.event).await,
                None => Err(SendError::SinkGone),
            };
            let answered = match &result {
                Ok(a) => Some((a.code, a.latency)),
                Err(_) => None,
            };
            let result = result.and_then(|a| match a.code {
                Some(code) if (200..300).contains(&code) => Ok(a),
                Some(code) => Err(SendError::Status { code }),
                None => Err(SendError::Http("no answer".into())),
            });
            if let Some((code, latency)) = answered {
                store::notify_answer(&self.pool, n.id, code, latency.as_millis() as u64).await?;
            }
            let kind = n.event.kind.as_str();
            match result {
                Ok(_) => {
                    let mut conn = self
                        .pool
                        .acquire()
                        .await
                        .map_err(|e| StoreError::from_sqlx("acquiring a connection", e))?;
                    if store::outbox_done(&mut conn, Outbox::Notify, n.id, n.version).await?
                        == Settled::AsIntended
                    {
                        tracing::info!(id = n.id, sink = %n.sink_name, kind, attempts = n.attempts, "notification sent");
                        pass.done += 1;
                    }
                }
                Err(e) => {
                    let error = chain(&e);
                    let window_over = n.age_secs >= self.config.retry_window.as_secs_f64();
                    let failure = if e.is_permanent() || window_over {
                        Failure::Dead
                    } else {
                        let delay = backoff(
                            n.attempts.max(1) as u32,
                            self.config.base_backoff,
                            self.config.max_backoff,
                        );
                        Failure::Retry {
                            in_secs: delay.as_secs_f64(),
                            count: true,
                        }
                    };
                    let dead = matches!(failure, Failure::Dead);
                    let error = if window_over && !e.is_permanent() {
                        format!(
                            "{error}; not delivered within {}h: given up",
                            self.config.retry_window.as_secs() / 3600
                        )
                    } else {
                        error
                    };
                    store::outbox_failed(
                        &self.pool,
                        Outbox::Notify,
                        n.id,
                        n.version,
                        &error,
                        failure,
                    )
                    .await?;
                    if dead {
                        tracing::error!(id = n.id, sink = %n.sink_name, kind, attempts = n.attempts, %error, "notification dead-lettered");
                        pass.dead += 1;
                    } else {
                        tracing::warn!(id = n.id, sink = %n.sink_name, kind, attempts = n.attempts, %error, "notification failed; will retry");
                        pass.retrying += 1;
                    }
                }
            }
        }
        Ok(pass)
    }

    /// Opens the sink's secrets and POSTs `event` to it; any status code is an answer.
    async fn send(
        &self,
        sink: &SealedSink,
        webhook_id: &str,
        event: &EventInfo,
    ) -> Result<Answer, SendError> {
        let identity = self.identity.as_deref().ok_or(SendError::NoIdentity)?;
        let kind = match sink.kind.as_str() {
            "webhook" => SinkKind::Webhook,
            "slack" => SinkKind::Slack,
            "discord" => SinkKind::Discord,
            other => return Err(SendError::UnknownKind(other.to_owned())),
        };
        let open = |what: &'static str, sealed: &str| {
            let ct =
                Ciphertext::new(sealed).map_err(|source| SendError::Sealed { what, source })?;
            identity
                .decrypt(&ct)
                .map_err(|source| SendError::Sealed { what, source })
        };
        let url = open("URL", &sink.url_sealed)?;
        let url = url
            .expose_str()
            .map_err(|source| SendError::Sealed {
                what: "URL",
                source,
            })?
            .trim();
        let parsed = reqwest::Url::parse(url).map_err(|_| SendError::BadUrl)?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(SendError::BadUrl);
        }
        let body = serde_json::to_vec(&body::body(kind, event)).expect("a body serializes");
        let mut req = self
            .http
            .post(parsed)
            .header("content-type", "application/json");
        if kind == SinkKind::Webhook {
            let sealed = sink
                .signing_sealed
                .as_deref()
                .ok_or(SendError::BadSecret(sign::SigningError::NotBase64))?;
            let secret = open("signing secret", sealed)?;
            let secret = secret.expose_str().map_err(|source| SendError::Sealed {
                what: "signing secret",
                source,
            })?;
            let key = zeroize::Zeroizing::new(sign::key(secret).map_err(SendError::BadSecret)?);
            let timestamp = chrono::Utc::now().timestamp();
            req = req
                .header("webhook-id", webhook_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header(
                    "webhook-signature",
                    sign::sign(&key, webhook_id, timestamp, &body),
                );
        }
        let started = Instant::now();
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::Http(chain(&e.without_url())))?;
        let code = resp.status().as_u16();
        let mut text = resp.bytes().await.unwrap_or_default().to_vec();
        text.truncate(ANSWER_BYTES);
        Ok(Answer {
            code: Some(code),
            latency: started.elapsed(),
            body: String::from_utf8_lossy(&text).into_owned(),
        })
    }

    /// Sends a test message to `sink` now (not through the outbox) and returns what its receiver
    /// answered.
    pub async fn test(&self, sink: &str) -> Result<NotifyTestAnswer, NotifyError> {
        let sealed = store::notify_sink(&self.pool, sink)
            .await?
            .ok_or_else(|| NotifyError::UnknownSink(sink.to_owned()))?;
        let id = format!("test_{}", uuid_like());
        let event = body::test_event(sink);
        Ok(match self.send(&sealed, &id, &event).await {
            Ok(a) => NotifyTestAnswer {
                sink: sink.to_owned(),
                status_code: a.code,
                latency_ms: a.latency.as_millis() as u64,
                body: a.body,
                error: a
                    .code
                    .filter(|c| !(200..300).contains(c))
                    .map(|c| SendError::Status { code: c }.to_string()),
            },
            Err(e) => NotifyTestAnswer {
                sink: sink.to_owned(),
                status_code: None,
                latency_ms: 0,
                body: String::new(),
                error: Some(chain(&e)),
            },
        })
    }

    /// Delivers notifications as they become due until `shutdown` is triggered: woken by the outbox
    /// table's NOTIFY, by the earliest scheduled retry, and at least every `poll_interval`.
    pub async fn run(&self, shutdown: &Shutdown) {
        let wake = Arc::new(Notify::new());
        let listen = forward(
            self.pool.clone(),
            NOTIFY_CHANNEL,
            "notifications",
            {
                let wake = wake.clone();
                move |_: Heard<'_>| wake.notify_one()
            },
            shutdown,
        );
        // A send cut short by shutdown stays leased and is made again when its lease ends.
        let deliver = Worker::new("delivering notifications", self.config.poll_interval)
            .woken_by(wake.clone())
            .abandon_at_shutdown()
            .run(shutdown, |_| async {
                self.deliver_due().await?;
                let due = store::outbox_next_due_in(&self.pool, Outbox::Notify).await;
                Ok::<_, NotifyError>(next_due(due, 0.0, "reading the notification outbox"))
            });
        tokio::join!(listen, deliver);
    }
}

/// A random id for a test message (never stored).
fn uuid_like() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The applied sinks' names, in order.
pub async fn sinks(pool: &PgPool) -> Result<Vec<String>, NotifyError> {
    Ok(store::notify_sink_names(pool).await?)
}

/// The newest `limit` deliveries (of `sink`), newest first.
pub async fn deliveries(
    pool: &PgPool,
    sink: Option<&str>,
    limit: u32,
) -> Result<Vec<NotifyDelivery>, NotifyError> {
    Ok(store::notify_deliveries(pool, sink, i64::from(limit)).await?)
}

/// Deletes notifications that finished longer than `older_than` ago.
pub async fn prune(pool: &PgPool, older_than: Duration) -> Result<u64, NotifyError> {
    Ok(store::prune_outbox(pool, Outbox::Notify, older_than.as_secs_f64()).await?)
}
