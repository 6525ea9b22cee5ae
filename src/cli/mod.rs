//! Command-line interface. Every command exits 0 on success, 1 on failure or an invalid repository,
//! 2 where a command documents it (`plan --exit-code`: changes pending), and 64 on a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod args;
mod certs;
mod completions;
mod control;
mod db;
mod dev;
mod events;
mod logs;
mod metrics;
mod node;
mod notify;
mod releases;
mod remote;
mod repo;
mod schema_cmd;
mod secret;
mod serve;
mod serve_api;
mod token;
mod usage;
mod validate;
mod webhooks;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
/// `EX_USAGE` from sysexits.h.
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "cairn",
    version,
    about = "GitOps control plane for a self-hosted PaaS"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a config repository and print a summary or every error
    Validate(validate::Args),
    /// Print the JSON Schema of the manifest format (or of cairn.toml)
    Schema(schema_cmd::Args),
    /// Age keys and encrypted env values: keygen, encrypt, set, rotate
    Secret(secret::Args),
    /// Show what applying the config source would change (exit 2 with --exit-code when it would)
    Plan(control::PlanArgs),
    /// Show the plan, ask, and apply it in one transaction
    Apply(control::ApplyArgs),
    /// Apps, replicas, nodes and the last reconciliation
    Status(control::StatusArgs),
    /// Certificates of the declared names: state, issuer, expiry, why one waits or failed
    Certs(certs::Args),
    /// Managed databases: list, backup, backups, restore, swap, rotate
    Db(db::Args),
    /// What happened: deploys, applies, nodes offline and back (--follow to keep printing)
    Events(events::Args),
    /// Metered usage of a month by app, slot, plan or node (table, CSV, JSON); closed months' statements
    Usage(usage::Args),
    /// Notifications: the delivery ledger, a test message to a sink
    Notify(notify::Args),
    /// Run the control plane: the reconcile loop and its HTTP listener
    Serve(serve::Args),
    /// Run the whole platform on this machine (PostgreSQL, control plane, one agent per node) on DIR
    Dev(dev::Args),
    /// An app's releases, newest first: commits, image, status, time per stage, where each runs
    Releases(releases::ReleasesArgs),
    /// Run an earlier release again (no build) and pin the app to it until `unpin`
    Rollback(releases::RollbackArgs),
    /// Lift an app's rollback pin: it deploys its latest release and follows its branch again
    Unpin(releases::AppArgs),
    /// Restart an app's running replicas
    Restart(releases::AppArgs),
    /// Read the head of an app's branch now and deploy it
    Deploy(releases::AppArgs),
    /// An app's replicas' output (--follow to keep printing), or a release's build output (--build)
    Logs(logs::Args),
    /// Nodes' agents: make a join token, revoke a credential
    Node(node::Args),
    /// Admin API tokens: create, list, revoke (against the database)
    Token(token::Args),
    /// Recent GitHub webhook deliveries and what each caused
    Webhooks(webhooks::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(completions::Args),
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Validate(a) => validate::run(a),
        Command::Schema(a) => schema_cmd::run(a),
        Command::Secret(a) => secret::run(a),
        Command::Plan(a) => control::plan(a),
        Command::Apply(a) => control::apply(a),
        Command::Status(a) => control::status(a),
        Command::Certs(a) => certs::run(a),
        Command::Db(a) => db::run(a),
        Command::Events(a) => events::run(a),
        Command::Usage(a) => usage::run(a),
        Command::Notify(a) => notify::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Dev(a) => dev::run(a),
        Command::Releases(a) => releases::list(a),
        Command::Rollback(a) => releases::rollback(a),
        Command::Unpin(a) => releases::unpin(a),
        Command::Restart(a) => releases::restart(a),
        Command::Deploy(a) => releases::deploy(a),
        Command::Logs(a) => logs::run(a),
        Command::Node(a) => node::run(a),
        Command::Token(a) => token::run(a),
        Command::Webhooks(a) => webhooks::run(a),
        Command::Completions(a) => completions::run(a),
    }
}

/// Prints a clap error; help and version are not errors, everything else is a usage error (64).
pub fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::from(EXIT_OK),
        _ => ExitCode::from(EXIT_USAGE),
    }
}

/// Reads an age identity from `--identity FILE` or `CAIRN_IDENTITY`, which holds either a path to an
/// identity file or the `AGE-SECRET-KEY-1...` line itself.
pub fn read_identity(arg: Option<&PathBuf>) -> Result<Option<cairn_schema::Identity>> {
    let text = match arg {
        Some(p) => zeroize::Zeroizing::new(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read identity file {}", p.display()))?,
        ),
        None => match std::env::var("CAIRN_IDENTITY") {
            Ok(v) if v.trim_start().starts_with("AGE-SECRET-KEY-") => zeroize::Zeroizing::new(v),
            Ok(v) if !v.is_empty() => zeroize::Zeroizing::new(
                std::fs::read_to_string(&v)
                    .with_context(|| format!("cannot read identity file {v} (CAIRN_IDENTITY)"))?,
            ),
            _ => return Ok(None),
        },
    };
    cairn_schema::Identity::parse(&text)
        .map(Some)
        .context("invalid identity")
}
