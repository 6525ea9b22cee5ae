//! A client polling one address at a fixed rate while a test changes what answers there (a release
//! switching, a replica restarting), and the checks of what it saw: every answer a success, and the body
//! going from one version to the next exactly once.
//!
//! The HTTP request itself is the caller's (a closure), so the agent's tests and the end-to-end tests use
//! the same poll with their own clients.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// One request's outcome: `(status, body)`, or why there was no answer.
pub type Answer = Result<(u16, String), String>;

/// One poll: when it finished and what it got.
pub type Sample = (Instant, Answer);

/// Polls with `get` every `every` (one request at a time; a slow answer delays the next tick rather than
/// piling up), until [`Poller::finish`].
#[derive(Debug)]
pub struct Poller {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
    /// When polling started.
    pub started: Instant,
}

impl Poller {
    pub fn start<F, Fut>(every: Duration, mut get: F) -> Poller
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Answer> + Send,
    {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let r = get().await;
                        seen.push((Instant::now(), r));
                    }
                    _ = stopped.changed() => break,
                }
            }
            seen
        });
        Poller {
            stop,
            task,
            started: Instant::now(),
        }
    }

    /// Stops polling; returns how long it polled and what it saw, in order.
    pub async fn finish(self) -> (Duration, Vec<Sample>) {
        let _ = self.stop.send(true);
        let seen = self.task.await.expect("the poller does not panic");
        (self.started.elapsed(), seen)
    }
}

/// Asserts a poll saw only 200s, at 20 requests per second or more, whose bodies (trimmed) went from
/// `from` to `to` once and never back. Returns (requests, rate).
pub fn assert_switch(seen: &[Sample], elapsed: Duration, from: &str, to: &str) -> (usize, f64) {
    let failures: Vec<_> = seen
        .iter()
        .filter(|(_, r)| !matches!(r, Ok((200, _))))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the switch: {:?}",
        failures.len(),
        seen.len(),
        &failures[..failures.len().min(5)]
    );
    let bodies: Vec<&str> = seen
        .iter()
        .map(|(_, r)| r.as_ref().map_or("", |(_, b)| b.trim()))
        .collect();
    let first_to = bodies.iter().position(|b| *b == to).unwrap_or_else(|| {
        panic!(
            "the answer never became {to}: {:?}",
            &bodies[bodies.len().saturating_sub(5)..]
        )
    });
    assert!(first_to > 0, "the poll never saw {from} before the switch");
    assert!(
        bodies[..first_to].iter().all(|b| *b == from),
        "before the switch: {:?}",
        &bodies[..first_to]
    );
    assert!(
        bodies[first_to..].iter().all(|b| *b == to),
        "the answer went back after the switch: {:?}",
        &bodies[first_to..]
    );
    let rate = seen.len() as f64 / elapsed.as_secs_f64();
    assert!(rate >= 20.0, "polled at only {rate:.1} requests/s");
    (seen.len(), rate)
}

/// Asserts a poll saw something, and only 200s whose body (trimmed) is `body`.
pub fn assert_steady(seen: &[Sample], body: &str) {
    assert!(!seen.is_empty(), "the poll saw nothing");
    for (_, r) in seen {
        match r {
            Ok((200, b)) if b.trim() == body => {}
            other => panic!("expected a steady {body}, saw {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(bodies: &[Answer]) -> Vec<Sample> {
        bodies.iter().map(|b| (Instant::now(), b.clone())).collect()
    }

    #[test]
    fn a_clean_switch_passes_and_a_failure_or_a_flap_does_not() {
        let ok = |b: &str| Ok((200, format!("{b}\n")));
        let clean = samples(&[ok("v1"), ok("v1"), ok("v2"), ok("v2")]);
        assert_eq!(
            assert_switch(&clean, Duration::from_millis(100), "v1", "v2").0,
            4
        );
        let failed = samples(&[ok("v1"), Ok((502, String::new())), ok("v2")]);
        let flapped = samples(&[ok("v1"), ok("v2"), ok("v1"), ok("v2")]);
        for bad in [failed, flapped] {
            let r = std::panic::catch_unwind(|| {
                assert_switch(&bad, Duration::from_millis(100), "v1", "v2")
            });
            assert!(r.is_err());
        }
    }

    #[tokio::test]
    async fn the_poller_keeps_what_each_request_answered_in_order() {
        let mut n = 0;
        let p = Poller::start(Duration::from_millis(5), move || {
            n += 1;
            let body = if n <= 3 { "v1" } else { "v2" };
            async move { Ok((200, body.to_owned())) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, seen) = p.finish().await;
        assert!(seen.len() > 4, "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_steady(&seen[..3], "v1");
        assert_steady(&seen[3..], "v2");
    }
}
