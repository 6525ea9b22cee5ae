//! The fault suite: real processes (`cairn serve`, `cairn-agent` with the recording driver, PostgreSQL,
//! git config repositories) broken the way machines and networks break, and the invariants that must
//! hold afterwards.
//!
//! - [`serve_kill`]: `cairn serve` SIGKILLed at random (seeded, printed) moments during a stream of
//!   commits: the last commit is applied whole, every recorded reconciliation is whole, no task ran twice.
//! - [`pg_outage`]: the test's own PostgreSQL restarted, then stopped for a minute, under serve and an
//!   agent: both recover without a hand, and a commit made during the outage applies and deploys.
//! - [`leader`]: three `cairn serve` on one database, the leader SIGKILLed again and again while
//!   commits and signed pushes arrive: a new leader within 15 s, epochs increasing, every commit applied
//!   once, no task run twice, each delivery handled and each GitHub status posted once.
//! - [`partition`]: an agent cut off from the control plane (through a TCP proxy the test controls)
//!   past the offline threshold, then healed: one instance of each replica remains, the moved replica is
//!   not deployed again on the returning node, and the stale lease's late completion is refused.
//!
//! Random choices come from `CAIRN_FAULT_SEED` when set (to replay a failure), else from the OS; the seed
//! is printed and named in every failure message. Thresholds are shortened through flags so that each
//! test takes well under two minutes.

mod leader;
mod partition;
mod pg_outage;
mod serve_kill;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::Value;

/// The seed of this test's random choices: `CAIRN_FAULT_SEED`, else a random one (printed either way).
fn seed(test: &str) -> u64 {
    let seed = std::env::var("CAIRN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
                .unwrap();
            u64::from_le_bytes(b) | 1
        });
    eprintln!("{test}: CAIRN_FAULT_SEED={seed}");
    seed
}

/// A small deterministic generator (xorshift64*), so a failing run can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// `127.0.0.1:PORT` of `http://127.0.0.1:PORT`.
fn socket_addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// Task executions a recording agent recorded more than once: by task id, and by what they did
/// (`kind app slot release generation`, which two tasks never share unless one repeats the other).
fn repeated_runs(records: &[Value]) -> Vec<String> {
    let mut by_task: BTreeMap<i64, u32> = BTreeMap::new();
    let mut by_work: BTreeMap<String, u32> = BTreeMap::new();
    for r in records.iter().filter(|r| r["via"] == "task") {
        *by_task.entry(r["task"].as_i64().unwrap()).or_default() += 1;
        let work = format!(
            "{} {} slot {} release {} generation {}",
            r["kind"].as_str().unwrap_or("?"),
            r["app"].as_str().unwrap_or("?"),
            r["slot"],
            r["release"],
            r["generation"]
        );
        *by_work.entry(work).or_default() += 1;
    }
    by_task
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(t, n)| format!("task {t} ran {n} times"))
        .chain(
            by_work
                .into_iter()
                .filter(|(_, n)| *n > 1)
                .map(|(w, n)| format!("{w} ran {n} times")),
        )
        .collect()
}
