//! The agent's integration tests: real git (a local bare remote made with the `git` CLI, reached through a
//! `--git-rewrite`), the real Docker engine (every image built here from `FROM scratch` and the static
//! busybox), real child processes, and the real proxy on a loopback port.
//!
//! Tests that need Docker skip with a message when it is missing, and fail when `CAIRN_TEST_REQUIRE_ALL`
//! is set (CI sets it).

mod database;
mod docker;
mod housekeeping;
mod ingress;
mod isolation;
mod operator;
mod process;
mod proxy;
mod refuse;
mod registry;
mod restart;
mod secrets;
mod source;
mod support;
mod tls;
