//! The agent's binary and examples for the test suites that run them as processes, built once per test
//! process with the `recording` feature (the features the root and agent suites build the agent with, so
//! its library is compiled once for both), in the profile of the running test binary.
//!
//! What it must not do: build into another target directory or profile than the tests' own (a stale
//! binary from elsewhere would be run), or hide a failed build (it panics with cargo's output).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `targets` (cargo arguments such as `["--bin", "cairn-agent"]` or `["--example", "ws_echo"]`)
/// of `cairn-agent` with `cargo` from the workspace at `dir`, and returns the profile directory
/// (`target/<profile>`; examples are in its `examples/`).
pub fn agent(cargo: &str, dir: &str, targets: &[&str]) -> PathBuf {
    // target/<profile>/deps/<test binary> -> target/<profile>
    let exe = std::env::current_exe().expect("the test binary has a path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("a target/<profile>/deps layout")
        .to_path_buf();
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "cairn-agent", "--features", "recording"]);
    build.args(targets);
    if profile.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let out = build.current_dir(dir).output().expect("cargo runs");
    assert!(
        out.status.success(),
        "building {targets:?} of cairn-agent failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    profile
}
