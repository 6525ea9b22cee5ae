//! The `git` CLI as tests drive it: a fixed identity, `main` as the first branch, no signing, and no
//! system or user git config (a machine's `insteadOf` or hooks must not change what a test sees). The real CLI,
//! because the code under test reads what real git wrote.

use std::path::Path;
use std::process::Command;

/// Runs `git args` in `dir`; panics with git's stderr when it fails. Returns stdout, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    run(dir, args, false)
}

/// [`git`] with a fixed author and committer date, so the same content on the same parent gives the same
/// commit id on every run (for snapshots that show commit ids).
pub fn git_fixed_clock(dir: &Path, args: &[&str]) -> String {
    run(dir, args, true)
}

fn run(dir: &Path, args: &[&str], fixed_clock: bool) -> String {
    let mut cmd = Command::new("git");
    cmd.args([
        "-c",
        "user.name=Cairn Test",
        "-c",
        "user.email=test@cairn.invalid",
    ])
    .args([
        "-c",
        "init.defaultBranch=main",
        "-c",
        "commit.gpgsign=false",
    ])
    .args(args)
    .current_dir(dir)
    .env("GIT_CONFIG_NOSYSTEM", "1")
    .env("GIT_CONFIG_GLOBAL", "/dev/null");
    if fixed_clock {
        cmd.env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
            .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z");
    }
    let out = cmd.output().expect("the git CLI runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
