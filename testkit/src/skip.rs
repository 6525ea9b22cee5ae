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
        panic!(
            "{test}: needs {what} (required: CI or {REQUIRE_ALL_ENV} is set), not usable: {why}"
        );
    }
    let line = format!(
        "SKIPPED {test}: needs {what}, not usable here ({why}); set {REQUIRE_ALL_ENV}=1 to fail instead"
    );
    let _ = writeln!(std::io::stderr(), "{line}");
    // The test runner shows a skipped test as passed; `scripts/test` counts and prints these at the end.
    if let Some(log) = std::env::var_os(SKIP_LOG_ENV).filter(|v| !v.is_empty()) {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| writeln!(f, "{}", line.replace('\n', " ")));
        if let Err(e) = appended {
            let _ = writeln!(
                std::io::stderr(),
                "cannot record the skip in ${SKIP_LOG_ENV}: {e}"
            );
        }
    }
}

/// Where [`missing`] appends a line per skipped test (`scripts/test` sets it and prints the count).
pub const SKIP_LOG_ENV: &str = "CAIRN_TEST_SKIP_LOG";

/// The name of the running test, as the test harness names its thread.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned()
}

/// The directory of GitHub's real webhook payloads and recorded API responses (`CAIRN_GITHUB_FIXTURES`,
/// `../shared/fixtures/github` in CI), or `None` after [`missing`] said why (a failure under CI).
pub fn github_fixtures() -> Option<std::path::PathBuf> {
    const ENV: &str = "CAIRN_GITHUB_FIXTURES";
    let why = match std::env::var_os(ENV).filter(|v| !v.is_empty()) {
        None => format!("{ENV} is not set (CI points it at ../shared/fixtures/github)"),
        Some(dir) => {
            let dir = std::path::PathBuf::from(dir);
            if dir.join("webhooks").is_dir() && dir.join("api").is_dir() {
                return Some(dir);
            }
            format!(
                "{ENV}={} has no webhooks/ and api/ directories",
                dir.display()
            )
        }
    };
    missing(&current_test(), "GitHub's recorded payloads", why);
    None
}

/// The last `n` lines of the file at `path` (empty when it cannot be read), for failure messages.
pub fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
