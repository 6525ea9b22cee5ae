//! Request rate limits: a token bucket per key (a node, an admin token, a client address), in memory.
//!
//! A bucket holds up to `burst` requests and refills at `per_second`; a request that finds it empty is
//! answered 429 with how long to wait. Buckets of keys that went quiet are forgotten once the table
//! grows, so memory stays bounded by the number of recent callers.
//!
//! What it must not do: touch the database (a limit exists to protect it), or hold its lock across an
//! await.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How fast one key may call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_second: f64, burst: f64) -> Self {
        Rate {
            per_second: per_second.max(0.001),
            burst: burst.max(1.0),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key.
#[derive(Debug)]
pub struct Limiter {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Past this many buckets, full ones are dropped (a full bucket is what a new key gets anyway).
const PRUNE_ABOVE: usize = 50_000;

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Limiter {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `key`'s bucket; `Err(wait)` when it is empty.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// How long until `key` may call again, if its bucket is empty now; takes nothing.
    pub fn exhausted(&self, key: &str) -> Option<Duration> {
        let now = Instant::now();
        let Rate { per_second, burst } = self.rate;
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.get(key)?;
        let tokens =
            (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second).min(burst);
        (tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - tokens) / per_second))
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let Rate { per_second, burst } = self.rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second < burst
            });
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_second).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let l = Limiter::new(Rate::new(2.0, 3.0));
        let t0 = Instant::now();
        for _ in 0..3 {
            l.check_at("a", t0).unwrap();
        }
        let wait = l.check_at("a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        l.check_at("b", t0).expect("keys have their own buckets");
        l.check_at("a", t0 + Duration::from_millis(500)).unwrap();
        assert!(l.check_at("a", t0 + Duration::from_millis(500)).is_err());
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            l.check_at("a", later).unwrap();
        }
        assert!(l.check_at("a", later).is_err());
    }
}
