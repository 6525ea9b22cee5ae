//! Integration tests of the reconciler, one binary with a module per area.

mod apply;
mod certs;
mod databases;
mod deploys;
mod events;
mod failover;
mod git_source;
mod heads;
mod history;
mod idle;
mod leader;
mod queue;
mod store;
mod usage;
