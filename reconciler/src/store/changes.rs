//! Whether anything the planner reads changed since the last plan: the marks triggers leave in
//! `observed_changes` (migration `…150500_observed_changes.sql`) when a statement changes a planner
//! table, the applied generation, and the nodes' heartbeats (which leave no mark: the controller judges
//! their age itself). The controller asks before it reads and plans everything, so a tick with nothing
//! new costs a fetch and these three small queries.
//!
//! What it must not do: decide whether to plan (the controller does), or read more than a row per node:
//! this runs on every tick of an idle control plane.

use std::collections::BTreeMap;

use cairn_plan::observed::{Generation, NodeStatus};
use cairn_schema::Name;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row as _};

use super::decode::{name, node_state};
use super::{Op as _, StoreError, to_u64};

/// Consumes the marks this transaction can see; call it in the apply transaction, under the apply lock,
/// before the observed state is read. A mark committed after this statement stays for the next
/// reconcile (its change may or may not be in what this one reads: planning again is never wrong).
pub async fn consume(conn: &mut PgConnection) -> Result<u64, StoreError> {
    let done = sqlx::query("DELETE FROM observed_changes")
        .execute(conn)
        .await
        .op("consume the observed-state change marks")?;
    Ok(done.rows_affected())
}

/// The applied generation and whether a change mark waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub generation: Generation,
    pub marked: bool,
}

/// One query: the applied generation and whether any change is marked.
pub async fn pending(pool: &PgPool) -> Result<Pending, StoreError> {
    let row = sqlx::query(
        "SELECT generation, EXISTS (SELECT 1 FROM observed_changes) AS marked FROM config_state",
    )
    .fetch_one(pool)
    .await
    .op("read the observed-state change marks")?;
    let generation: i64 = row
        .try_get("generation")
        .op("read the observed-state change marks")?;
    Ok(Pending {
        generation: to_u64("config_state", "generation", generation)?,
        marked: row
            .try_get("marked")
            .op("read the observed-state change marks")?,
    })
}

/// Every node's state and last heartbeat, as the planner's liveness judgement reads them (drivers and
/// recipient are left empty: a change to them leaves a mark).
pub async fn node_liveness(pool: &PgPool) -> Result<BTreeMap<Name, NodeStatus>, StoreError> {
    let rows = sqlx::query("SELECT node, state, last_heartbeat FROM node_status")
        .fetch_all(pool)
        .await
        .op("read the nodes' heartbeats")?;
    let mut out = BTreeMap::new();
    for r in rows {
        let node: String = r.try_get("node").op("read the nodes' heartbeats")?;
        let state: String = r.try_get("state").op("read the nodes' heartbeats")?;
        let last_heartbeat: Option<DateTime<Utc>> = r
            .try_get("last_heartbeat")
            .op("read the nodes' heartbeats")?;
        out.insert(
            name("node_status", &node)?,
            NodeStatus {
                state: node_state(&state)?,
                last_heartbeat,
                drivers: Vec::new(),
                recipient: None,
            },
        );
    }
    Ok(out)
}
