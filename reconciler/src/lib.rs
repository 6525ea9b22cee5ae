//! The reconciler: the brain of the control plane.
//!
//! It reads the desired state (a config repository, through `cairn-schema`), the observed state (Postgres),
//! decides with a pure planner and scheduler, and applies the resulting plan with a separate executor in one
//! transaction under an advisory lock, together with the agent tasks it implies.
//!
//! What it must not do: talk to GitHub (that is `cairn-webhook`), talk to Docker (that is `cairn-agent`),
//! or let the planner perform IO. Only its `store` module touches Postgres.

pub mod api;
pub mod controller;
pub mod drift;
pub mod executor;
pub mod hooks;
pub mod liveness;
pub mod metrics;
pub mod observed;
mod panics;
pub mod payload;
pub mod plan;
pub mod queue;
pub mod releases;
pub mod scheduler;
pub mod source;
pub mod status;
pub mod store;
pub mod worker;
