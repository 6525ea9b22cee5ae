//! One copy of each column codec the store's modules (and the queue's statements) share: a value this
//! version cannot read becomes [`StoreError::Corrupt`] naming its table and column, never a panic; a
//! number too large for its column becomes [`StoreError::OutOfRange`].
//!
//! What it must not do: run a statement, or decide anything about the values it converts.

use std::fmt::Display;
use std::time::Duration;

use cairn_schema::{Driver, Name, Recipient};

use super::StoreError;
use cairn_plan::observed::{NodeState, ReplicaState};

pub(crate) fn corrupt(
    table: &'static str,
    column: &'static str,
    detail: impl Display,
) -> StoreError {
    StoreError::Corrupt {
        table,
        column,
        detail: detail.to_string(),
    }
}

/// A resource name (app, node, ...) read from `table`.
pub(crate) fn name(table: &'static str, s: &str) -> Result<Name, StoreError> {
    Name::new(s).map_err(|e| corrupt(table, "name", e))
}

/// A replica slot number read from `table`.
pub(crate) fn slot(table: &'static str, s: i32) -> Result<u32, StoreError> {
    u32::try_from(s).map_err(|_| corrupt(table, "slot", s))
}

/// A JSON column read as `T`.
pub(crate) fn json<T: serde::de::DeserializeOwned>(
    table: &'static str,
    column: &'static str,
    value: serde_json::Value,
) -> Result<T, StoreError> {
    serde_json::from_value(value).map_err(|e| corrupt(table, column, e))
}

/// `node_status.state`.
pub(crate) fn node_state(s: &str) -> Result<NodeState, StoreError> {
    match s {
        "pending" => Ok(NodeState::Pending),
        "online" => Ok(NodeState::Online),
        "offline" => Ok(NodeState::Offline),
        other => Err(corrupt(
            "node_status",
            "state",
            format!("unknown state `{other}`"),
        )),
    }
}

/// `node_status.drivers`.
pub(crate) fn drivers(d: &[String]) -> Result<Vec<Driver>, StoreError> {
    d.iter()
        .map(|s| match s.as_str() {
            "docker" => Ok(Driver::Docker),
            "process" => Ok(Driver::Process),
            other => Err(corrupt(
                "node_status",
                "drivers",
                format!("unknown driver `{other}`"),
            )),
        })
        .collect()
}

/// Drivers as `node_status.drivers` stores them: sorted, each once.
pub(crate) fn driver_names(d: &[Driver]) -> Vec<String> {
    let mut v: Vec<String> = d.iter().map(|d| d.as_str().to_owned()).collect();
    v.sort();
    v.dedup();
    v
}

/// `node_status.recipient` (and `nodes.recipient`, the manifest's pin).
pub(crate) fn recipient(
    table: &'static str,
    s: Option<String>,
) -> Result<Option<Recipient>, StoreError> {
    s.map(|s| Recipient::new(&s).map_err(|e| corrupt(table, "recipient", e)))
        .transpose()
}

/// `placements.state`.
pub(crate) fn replica_state(s: &str) -> Result<ReplicaState, StoreError> {
    match s {
        "running" => Ok(ReplicaState::Running),
        "stopped" => Ok(ReplicaState::Stopped),
        other => Err(corrupt(
            "placements",
            "state",
            format!("unknown state `{other}`"),
        )),
    }
}

pub(crate) fn replica_state_str(s: ReplicaState) -> &'static str {
    match s {
        ReplicaState::Running => "running",
        ReplicaState::Stopped => "stopped",
    }
}

/// A duration as the milliseconds statements multiply `interval '1 millisecond'` by.
pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn to_i32(what: &'static str, value: impl Into<u64>) -> Result<i32, StoreError> {
    let value = value.into();
    i32::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}
