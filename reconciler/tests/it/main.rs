//! Integration tests of the reconciler, one binary with a module per area.

mod apply;
mod git_source;
mod queue;
mod store;
