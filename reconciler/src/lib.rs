//! The reconciler: the brain of the control plane.
//!
//! It reads the desired state (a config repository, through `cairn-schema`), the observed state (Postgres),
//! decides with the pure planner and scheduler of `cairn-plan`, and applies the resulting plan with a
//! separate executor in one transaction under an advisory lock, together with the agent tasks it implies.
//!
//! What it must not do: talk to GitHub (that is `cairn-webhook`), talk to Docker (that is `cairn-agent`),
//! or give the planner a way to perform IO (it is `cairn-plan`, which depends on no IO crate: pass it
//! data). Only its `store` module and the queue's statements (`queue/sql.rs`) touch Postgres.

pub mod api;
pub mod certs;
pub mod controller;
pub mod databases;
pub mod declared;
pub mod deploys;
pub mod drift;
pub mod events;
pub mod executor;
pub mod hooks;
pub mod leader;
pub mod liveness;
pub mod metrics;
mod panics;
pub mod payload;
pub mod queue;
pub mod releases;
pub mod routes;
pub mod source;
pub mod status;
pub mod store;
pub mod usage;
pub mod worker;
