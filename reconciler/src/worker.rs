//! The shape every background loop of `cairn serve` shares (the reconcile loop, the liveness monitor, the
//! output and history prunes, the GitHub integration's workers), and the one signal that stops them.
//!
//! A [`Worker`] waits for a wake or its period, runs one pass, logs and counts a failed pass without
//! dying (backing off when asked), and returns once [`Shutdown`] is triggered. [`Shutdown`] is one
//! cancellation signal that the loops, the HTTP listeners and the long-polls all take.
//!
//! What it must not do: decide what a pass does or how often it is due (each loop says), end the process
//! on a failed pass, or outlive the shutdown: a loop returns at its next wait once shutdown is triggered
//! (at once, for a loop whose passes may be abandoned).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cairn_schema::error::chain;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// One cancellation signal for everything `cairn serve` runs. Clones share it; once triggered it stays
/// triggered.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts the shutdown: every loop, listener and long-poll holding a clone stops.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    /// A shutdown of its own that this one triggers too: what a component started stops with the whole,
    /// or alone.
    pub fn child(&self) -> Shutdown {
        Shutdown(self.0.child_token())
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once the shutdown is triggered (an owned future: it can move into a task or a listener).
    pub fn wait(&self) -> WaitForCancellationFutureOwned {
        self.0.clone().cancelled_owned()
    }
}

/// What started a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The loop's first pass, as it starts.
    Start,
    /// The loop's wake was notified.
    Wake,
    /// The period (or the sooner time the previous pass asked for) passed.
    Period,
}

/// One pass of a loop. It returns when the next pass is due at the latest if that is sooner than the
/// period (`Some`), or `None` for the period. A closure `FnMut(Woken) -> impl Future` is one; a loop
/// with state between passes implements it on its state.
pub trait Pass: Send {
    type Error: std::error::Error;
    fn run(
        &mut self,
        woken: Woken,
    ) -> impl Future<Output = Result<Option<Duration>, Self::Error>> + Send;
}

impl<F, Fut, E> Pass for F
where
    F: FnMut(Woken) -> Fut + Send,
    Fut: Future<Output = Result<Option<Duration>, E>> + Send,
    E: std::error::Error,
{
    type Error = E;
    fn run(&mut self, woken: Woken) -> impl Future<Output = Result<Option<Duration>, E>> + Send {
        self(woken)
    }
}

/// How a failed pass is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Log {
    Error,
    Warn,
    /// The pass logged it (in its own span, with its own context).
    ByPass,
}

/// A background loop's pacing and failure policy; [`Worker::run`] runs it.
#[derive(Debug, Clone)]
pub struct Worker {
    /// What a failed pass was doing, for its log line ("processing webhook deliveries").
    what: &'static str,
    period: Duration,
    wake: Option<Arc<Notify>>,
    backoff: Option<Duration>,
    fixed_rate: bool,
    abandon: bool,
    log: Log,
}

impl Worker {
    /// A loop that runs a pass at once, then every `period` after the previous pass ended.
    pub fn new(what: &'static str, period: Duration) -> Worker {
        Worker {
            what,
            period,
            wake: None,
            backoff: None,
            fixed_rate: false,
            abandon: false,
            log: Log::Error,
        }
    }

    /// Also runs a pass whenever `wake` is notified.
    pub fn woken_by(mut self, wake: Arc<Notify>) -> Worker {
        self.wake = Some(wake);
        self
    }

    /// After a failed pass, waits `first`, doubled with every further failure in a row (at most the
    /// period), instead of the period.
    pub fn backoff(mut self, first: Duration) -> Worker {
        self.backoff = Some(first);
        self
    }

    /// Counts the period from the start of the previous pass, not its end (a steady tick).
    pub fn fixed_rate(mut self) -> Worker {
        self.fixed_rate = true;
        self
    }

    /// A pass under way is dropped when the shutdown is triggered (its work must survive that, e.g. as a
    /// lease that expires), instead of finishing first.
    pub fn abandon_at_shutdown(mut self) -> Worker {
        self.abandon = true;
        self
    }

    /// Logs a failed pass as a warning rather than an error.
    pub fn failures_as_warnings(mut self) -> Worker {
        self.log = Log::Warn;
        self
    }

    /// The pass logs its failures itself; the loop only counts them.
    pub fn failures_logged_by_pass(mut self) -> Worker {
        self.log = Log::ByPass;
        self
    }

    /// Runs passes until `shutdown` is triggered.
    pub async fn run<P: Pass>(self, shutdown: &Shutdown, mut pass: P) {
        let mut woken = Woken::Start;
        // Failed passes in a row.
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let result = if self.abandon {
                tokio::select! {
                    () = shutdown.wait() => return,
                    r = pass.run(woken) => r,
                }
            } else {
                pass.run(woken).await
            };
            let wait = match result {
                Ok(sooner) => {
                    failures = 0;
                    sooner.map_or(self.period, |s| s.min(self.period))
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    match self.log {
                        Log::Error => {
                            tracing::error!(error = %chain(&e), failures, "{}", self.what)
                        }
                        Log::Warn => tracing::warn!(error = %chain(&e), failures, "{}", self.what),
                        Log::ByPass => {}
                    }
                    match self.backoff {
                        Some(first) => first
                            .saturating_mul(2u32.saturating_pow(failures - 1))
                            .min(self.period),
                        None => self.period,
                    }
                }
            };
            let due = if self.fixed_rate {
                started
            } else {
                Instant::now()
            } + wait;
            let notified = async {
                match &self.wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            };
            woken = tokio::select! {
                () = shutdown.wait() => return,
                () = notified => Woken::Wake,
                () = tokio::time::sleep_until(due) => Woken::Period,
            };
        }
    }
}

/// Runs `f` where it does not hold up the runtime's other tasks: `block_in_place` on a multi-threaded
/// runtime (the worker's queued tasks move to another thread meanwhile), inline on a current-thread one.
pub fn off_the_workers<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed")]
    struct Failed;

    const PATIENCE: Duration = Duration::from_secs(10);

    /// Waits until `done` holds (or fails the test after [`PATIENCE`]).
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_loop_passes_at_start_on_wake_and_after_its_period_until_shutdown() {
        let shutdown = Shutdown::new();
        let wake = Arc::new(Notify::new());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (shutdown, wake, seen) = (shutdown.clone(), wake.clone(), seen.clone());
            async move {
                Worker::new("testing", Duration::from_millis(300))
                    .woken_by(wake)
                    .run(&shutdown, move |w| {
                        seen.lock().unwrap().push(w);
                        async { Ok::<_, Failed>(None) }
                    })
                    .await
            }
        });
        until("the first pass", || seen.lock().unwrap().len() == 1).await;
        wake.notify_one();
        until("a pass after the period", || {
            seen.lock().unwrap().len() >= 3
        })
        .await;
        shutdown.trigger();
        tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[..3], [Woken::Start, Woken::Wake, Woken::Period]);
    }

    #[tokio::test]
    async fn failures_back_off_doubling_up_to_the_period_and_success_resets() {
        let shutdown = Shutdown::new();
        let at = Arc::new(Mutex::new(Vec::new()));
        let period = Duration::from_millis(800);
        let task = tokio::spawn({
            let (shutdown, at) = (shutdown.clone(), at.clone());
            async move {
                Worker::new("testing", period)
                    .backoff(Duration::from_millis(100))
                    .run(&shutdown, move |_| {
                        let mut at = at.lock().unwrap();
                        at.push(Instant::now());
                        // Fails four times, then succeeds.
                        let ok = at.len() > 4;
                        async move { if ok { Ok(None) } else { Err(Failed) } }
                    })
                    .await
            }
        });
        until("six passes", || at.lock().unwrap().len() >= 6).await;
        shutdown.trigger();
        tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
        let at = at.lock().unwrap().clone();
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // 100 ms, 200 ms, 400 ms, then the period (800 ms caps 800 ms), and the period after a success.
        let least = [100, 200, 400, 800, 800].map(Duration::from_millis);
        for (i, (gap, least)) in gaps.iter().zip(least).enumerate() {
            assert!(*gap >= least, "gap {i}: {gap:?} < {least:?} ({gaps:?})");
        }
        assert!(
            gaps[0] < period,
            "the first retry waits the backoff, not the period: {gaps:?}"
        );
    }

    #[tokio::test]
    async fn an_abandoned_pass_ends_at_shutdown_and_a_sooner_next_time_is_kept() {
        let shutdown = Shutdown::new();
        let passes = Arc::new(Mutex::new(0u32));
        let task = tokio::spawn({
            let (shutdown, passes) = (shutdown.clone(), passes.clone());
            async move {
                Worker::new("testing", Duration::from_secs(3600))
                    .abandon_at_shutdown()
                    .run(&shutdown, move |_| {
                        let n = {
                            let mut p = passes.lock().unwrap();
                            *p += 1;
                            *p
                        };
                        async move {
                            if n == 3 {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, Failed>(Some(Duration::from_millis(20)))
                        }
                    })
                    .await
            }
        });
        // Without the sooner time the second pass would wait an hour.
        until("the third pass", || *passes.lock().unwrap() == 3).await;
        shutdown.trigger();
        tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
        assert!(shutdown.is_triggered());
    }
}
