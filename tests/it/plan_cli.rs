//! `cairn plan` end to end: the real binary plans `examples/config` against an empty, migrated database,
//! and its text and JSON output are snapshots (the commit id, which hashes the example files, and the
//! planning time are redacted). `--exit-code` says 2 for a plan with changes. The planner's own rendering
//! snapshots are in `plan/src/tests.rs`; these pin what the CLI adds around them.
//!
//! `cargo insta review` (or `INSTA_UPDATE=always`) after an intended change to the output.

use std::process::{Command, Output};

use crate::validate::{copy_dir, root};

fn plan(db_url: &str, args: &[&str]) -> Output {
    let repo = root().join("examples/config");
    let identity = root().join("examples/keys/demo-only-identity.txt");
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["plan", "--database-url", db_url, "--repo"])
        .arg(&repo)
        .arg("--identity")
        .arg(&identity)
        .args(args)
        .env_remove("CAIRN_IDENTITY")
        .env_remove("DATABASE_URL")
        .env_remove("CAIRN_FAILPOINT")
        .env("NO_COLOR", "1")
        .output()
        .expect("run cairn plan")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("cairn prints UTF-8")
}

/// Replaces every directory-source commit id (`dir-` and 16 hex digits) with `[commit]`.
fn redact_commits(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("dir-") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 4..];
        let hex = tail
            .bytes()
            .take_while(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            .count();
        if hex >= 7 {
            out.push_str("[commit]");
            rest = &tail[hex..];
        } else {
            out.push_str("dir-");
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_of_the_example_repository_against_an_empty_database() {
    let db = cairn_testkit::test_db!();
    let out = tokio::task::spawn_blocking({
        let url = db.url().to_owned();
        move || plan(&url, &[])
    })
    .await
    .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("dir-"),
        "the plan names its commit: {stdout}"
    );
    assert!(
        !stdout.contains('\u{1b}'),
        "no colour when stdout is not a terminal"
    );
    insta::assert_snapshot!("plan_examples_text", redact_commits(&stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_json_of_the_example_repository_against_an_empty_database() {
    let db = cairn_testkit::test_db!();
    let url = db.url().to_owned();
    let (json, exit) = tokio::task::spawn_blocking(move || {
        (plan(&url, &["--json"]), plan(&url, &["--exit-code"]))
    })
    .await
    .unwrap();
    assert!(json.status.success(), "{}", text(&json.stderr));
    assert_eq!(exit.status.code(), Some(2), "--exit-code: changes pending");
    let stdout = text(&json.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("--json is JSON");
    assert_eq!(v["format"], 1);
    assert_eq!(v["empty"], false);
    assert!(
        v["target_commit"]
            .as_str()
            .is_some_and(|c| c.starts_with("dir-")),
        "{v}"
    );
    // The document as printed (its key order is part of the format), with the time redacted.
    let time = v["planned_at"].as_str().expect("planned_at is a string");
    assert_eq!(stdout.matches(time).count(), 1);
    let redacted = redact_commits(&stdout.replace(time, "[time]"));
    insta::assert_snapshot!("plan_examples_json", redacted);
}

/// `--git-rewrite` applies to the config repository too, as it does in `cairn serve`: a repository named
/// by its GitHub URL is planned from the local remote the rewrite points at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_fetches_the_config_repository_through_the_git_rewrites() {
    let db = cairn_testkit::test_db!();
    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path().join("work");
    let remotes = scratch.path().join("remotes");
    copy_dir(&root().join("examples/config"), &work);
    std::fs::create_dir_all(&remotes).unwrap();
    use cairn_testkit::git;
    git(&work, &["init", "-q"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "config"]);
    let commit = git(&work, &["rev-parse", "HEAD"]);
    git(&remotes, &["init", "-q", "--bare", "platform-config.git"]);
    let bare = remotes.join("platform-config.git");
    git(&work, &["push", "-q", bare.to_str().unwrap(), "HEAD:main"]);

    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["plan", "--database-url", db.url()])
        .args(["--repo", "https://github.com/acme/platform-config.git"])
        .args(["--ref", "main", "--no-poll-heads", "--json"])
        .arg("--git-rewrite")
        .arg(format!(
            "https://github.com/acme/=file://{}/",
            remotes.display()
        ))
        .arg("--cache-dir")
        .arg(scratch.path().join("cache"))
        .arg("--identity")
        .arg(root().join("examples/keys/demo-only-identity.txt"))
        .env_remove("CAIRN_IDENTITY")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        plan["target_commit"].as_str(),
        Some(commit.as_str()),
        "{plan}"
    );

    // Without the rewrite the URL is the real GitHub, which this machine (and the test) must not reach:
    // the rewrite is what made the fetch local.
    let without = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["plan", "--database-url", db.url()])
        .args(["--repo", "https://127.0.0.1:9/acme/platform-config.git"])
        .args(["--ref", "main", "--no-poll-heads"])
        .arg("--cache-dir")
        .arg(scratch.path().join("cache2"))
        .env_remove("CAIRN_IDENTITY")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!without.status.success());
}
