//! What a test does when something it needs is not on this machine: skip with a message that says what
//! and why, or fail when the run asked for everything (CI).

use std::io::Write as _;

/// Set and non-empty: a missing prerequisite fails the test instead of skipping it (`scripts/test` sets
/// it from `CI`).
pub const REQUIRE_ALL_ENV: &str = "CAIRN_TEST_REQUIRE_ALL";

/// Whether a missing prerequisite fails the test: `CAIRN_TEST_REQUIRE_ALL` or `CI` set and non-empty.
pub fn require_all() -> bool {
    [REQUIRE_ALL_ENV, "CI"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

/// Says why `test` cannot run here: a panic under CI / `CAIRN_TEST_REQUIRE_ALL`, otherwise a `SKIPPED`
/// line on the process's stderr (not `eprintln!`, which `cargo test` captures for passing tests) and the
/// caller returns early.
pub fn missing(test: &str, what: &str, why: impl std::fmt::Display) {
    if require_all() {
        panic!("{test}: {what} is required (CI or {REQUIRE_ALL_ENV} is set) but not usable: {why}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {what} is not usable here ({why}); set {REQUIRE_ALL_ENV}=1 to fail instead"
    );
}

/// The last `n` lines of the file at `path` (empty when it cannot be read), for failure messages.
pub fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
