//! The root package's integration tests, one binary (one link) for all of them; one module per area.

mod agents;
mod crash;
mod dashboard;
mod dev;
mod e2e;
mod examples;
mod failover;
mod faults;
mod in_process;
mod layout;
mod operations;
mod plan_cli;
mod pyenv;
mod releases;
mod secret;
mod surfaces;
mod validate;
mod webhooks;
