//! Test support shared by Cairn's crates; a dev-dependency only, never linked into a shipped binary.
//!
//! - [`git()`]: the `git` CLI with a fixed identity and no system config ([`git_fixed_clock`] for
//!   reproducible commit ids).
//! - [`pg`]: a fresh PostgreSQL database per test, cloned from a template with every migration applied,
//!   on a private cluster that one test process starts and every other process of the run shares.
//! - [`poll`]: a client polling an address while a test switches what answers there, and the checks of
//!   what it saw (no failed request, one switch from the old body to the new).
//! - [`proxy`]: a TCP proxy a test controls (pass, refuse, black-hole, a new upstream), to partition a
//!   client from its server and heal it.
//! - [`pg::OwnCluster`]: a private PostgreSQL cluster for one test, which it may stop and restart.
//! - [`registry`]: a local image registry (Debian's `docker-registry`) on a free loopback port.
//! - [`engine`]: a second, private Docker engine (`dockerd` with its own data, socket, bridge and subnet)
//!   for a test's second node.
//! - [`netns`]: hosts with their own addresses (network namespaces on a private bridge), for tests of
//!   traffic between nodes.
//! - [`pebble`]: a real ACME CA (Debian's `pebble`) with a scriptable DNS server (`pebble-challtestsrv`),
//!   its HTTPS certificate made per test, and a count of the orders it accepted.
//! - [`pyenv`]: Python venvs under `target/pyenv/`, made once with pip (tools that are not Cairn's).
//! - [`s3`]: an S3-compatible server (`moto[server]` in a venv) on a free loopback port.
//! - [`build`]: the agent's binary and examples, built once per test process for the suites that run them.
//! - [`fixtures`]: the manifests tests write (`cairn.toml`, plans, runtimes, nodes) as TOML builders.
//! - [`skip`]: what a test does when a prerequisite is missing ([`missing`]: skip with a message, or fail
//!   under CI / `CAIRN_TEST_REQUIRE_ALL`).
//!
//! What it must not do: weaken what the tests measure (the private cluster keeps `fsync` on), or hide a
//! missing prerequisite in CI (`CAIRN_TEST_REQUIRE_ALL` turns every skip into a failure).

pub mod build;
pub mod dbimage;
pub mod engine;
pub mod fixtures;
mod git;
pub mod netns;
pub mod nginx;
pub mod pebble;
pub mod pg;
pub mod poll;
pub mod proxy;
pub mod pyenv;
pub mod registry;
pub mod s3;
pub mod skip;

pub use git::{git, git_fixed_clock};
pub use skip::{current_test, github_fixtures, missing, require_all};

/// A loopback TCP port free a moment ago (for a server a test starts that must be told its port).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
