//! One leader among the control planes on a database: the loops that must not run twice (the reconcile
//! loop with its config fetch timer and head polling, the liveness sweep, the usage rollup) run only in
//! a term of this replica's leadership.
//!
//! The lease is a row (`store::lease`), never a session advisory lock (a backend that dies unnoticed
//! keeps such a lock while another replica believes it free, and nothing fences the old holder). A
//! replica takes the lease when it has expired, by the database's clock, and each new holder raises its
//! epoch; the holder renews it every `renew`. A term ends at once, its [`Term::stop`] triggered, when a
//! renewal is refused (another replica holds the lease) or has not succeeded by the local deadline: the
//! lease's length counted from before the last successful renewal was sent, so the local term ends
//! before the database's lease does. A leader's transactions check their [`Fence`] (`store::lease::check`,
//! which also locks the row until they end): a deposed leader's transaction fails rather than writes.
//!
//! What it must not do: run a term's loops itself (their owners take a [`Term`] and stop on its
//! `stop`), or trust this machine's clock for anything but its own deadline.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::lease::{self, Fence};
use crate::worker::Shutdown;
use cairn_schema::error::chain as error_chain;

/// The lease's timing (`cairn serve --leader-lease`, `--leader-renew`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// How long a lease lasts after each renewal: a dead leader is replaced after at most this plus
    /// `renew`.
    pub ttl: Duration,
    /// How often the leader renews, and how often the others try to take the lease.
    pub renew: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            ttl: Duration::from_secs(15),
            renew: Duration::from_secs(3),
        }
    }
}

/// A term of this replica's leadership: its fence, and the signal that ends it.
#[derive(Debug, Clone)]
pub struct Term {
    pub fence: Fence,
    /// Triggered when the term ends (the lease lost or not renewed in time, or shutdown).
    pub stop: Shutdown,
}

/// This replica's view of the leadership: its id and its current term, if any.
#[derive(Debug, Clone)]
pub struct Leadership {
    id: Arc<str>,
    terms: watch::Receiver<Option<Term>>,
}

impl Leadership {
    /// Starts keeping the lease for replica `id` (a task that runs until `shutdown`, then gives the lease
    /// up if it holds it).
    pub fn start(
        pool: PgPool,
        id: &str,
        settings: LeaseSettings,
        shutdown: &Shutdown,
    ) -> Leadership {
        let (tx, rx) = watch::channel(None);
        let id: Arc<str> = Arc::from(id);
        tokio::spawn({
            let (id, stop) = (id.clone(), shutdown.clone());
            async move { keep(pool, id, settings, tx, stop).await }
        });
        Leadership { id, terms: rx }
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current term, while one runs.
    pub fn current(&self) -> Option<Term> {
        self.terms
            .borrow()
            .clone()
            .filter(|t| !t.stop.is_triggered())
    }

    /// Runs `f` for each term of this replica's leadership, one at a time (`f` must return once the
    /// term's `stop` is triggered), until `shutdown`.
    pub async fn each_term<F, Fut>(&self, shutdown: &Shutdown, mut f: F)
    where
        F: FnMut(Term) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut terms = self.terms.clone();
        loop {
            let term = tokio::select! {
                t = terms.wait_for(|t| t.as_ref().is_some_and(|t| !t.stop.is_triggered())) => match t {
                    Ok(t) => t.clone(),
                    Err(_) => return,
                },
                _ = shutdown.wait() => return,
            };
            let Some(term) = term else { continue };
            f(term.clone()).await;
            // `f` returned: wait for this term to end before looking for the next.
            term.stop.wait().await;
        }
    }
}

/// The lease loop: take or renew every `renew`, end the term on a refusal or a missed deadline.
async fn keep(
    pool: PgPool,
    id: Arc<str>,
    settings: LeaseSettings,
    terms: watch::Sender<Option<Term>>,
    shutdown: Shutdown,
) {
    let ttl_secs = settings.ttl.as_secs_f64();
    // The term and when it ends unless renewed.
    let mut held: Option<(Term, Instant)> = None;
    let mut first = true;
    let end = |held: &mut Option<(Term, Instant)>, why: &str| {
        if let Some((t, _)) = held.take() {
            t.stop.trigger();
            terms.send_replace(None);
            tracing::warn!(epoch = t.fence.epoch, "leadership lost: {why}");
        }
    };
    loop {
        let asked = Instant::now();
        let limit = held
            .as_ref()
            .map(|(_, deadline)| deadline.saturating_duration_since(asked))
            .unwrap_or(settings.ttl)
            .max(Duration::from_millis(1));
        let epoch = held.as_ref().map(|(t, _)| t.fence.epoch);
        let attempt = tokio::select! {
            r = tokio::time::timeout(limit, lease::claim(&pool, &id, epoch, ttl_secs, first)) => r,
            _ = shutdown.wait() => break,
        };
        if matches!(attempt, Ok(Ok(_))) {
            first = false;
        }
        match attempt {
            Ok(Ok(Some(epoch))) => match &mut held {
                Some((t, deadline)) if t.fence.epoch == epoch => *deadline = asked + settings.ttl,
                _ => {
                    end(&mut held, "a new term replaced it");
                    let term = Term {
                        fence: Fence {
                            holder: id.to_string(),
                            epoch,
                        },
                        stop: shutdown.child(),
                    };
                    tracing::info!(epoch, replica = %id, "this control plane is the leader");
                    terms.send_replace(Some(term.clone()));
                    held = Some((term, asked + settings.ttl));
                }
            },
            Ok(Ok(None)) => end(&mut held, "another control plane holds the lease"),
            Ok(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), "cannot take or renew the leader's lease")
            }
            Err(_) => tracing::warn!("the leader's lease was not renewed within its deadline"),
        }
        if held.as_ref().is_some_and(|(_, d)| *d <= Instant::now()) {
            end(&mut held, "the lease was not renewed in time");
        }
        match tokio::time::timeout(settings.renew, lease::seen(&pool, &id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %error_chain(&e), "cannot record that this control plane runs")
            }
            Err(_) => {
                tracing::debug!("cannot record that this control plane runs: no answer in time")
            }
        }
        let next = asked + settings.renew;
        let deadline = held.as_ref().map(|(_, d)| *d);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => end(&mut held, "the lease was not renewed in time"),
            _ = shutdown.wait() => break,
        }
    }
    if let Some((t, _)) = held.take() {
        t.stop.trigger();
        terms.send_replace(None);
        // Given up at once, so another replica need not wait for it to expire.
        let _ = tokio::time::timeout(Duration::from_secs(2), lease::release(&pool, &t.fence)).await;
        tracing::info!(epoch = t.fence.epoch, "leadership given up: shutting down");
    }
}
