//! Whether anything the planner reads changed since the last plan, and what. Triggers leave marks when
//! a statement changes a planner table: in `observed_changes` (migration `…150500_observed_changes.sql`)
//! for the tables read whole, in `observed_app_changes` naming the apps for the apps' own rows
//! (`…140000_observed_app_changes.sql`). Besides the marks: the applied generation, and the nodes'
//! heartbeats (which leave no mark: the controller judges their age itself). The controller asks before
//! it reads and plans everything, so a tick with nothing new costs a fetch and these small queries; the
//! apply reads again only the apps marked (`store::state::KeptObserved`).
//!
//! What it must not do: decide whether to plan (the controller does), or read more than a row per node:
//! this runs on every tick of an idle control plane.

use std::collections::{BTreeMap, BTreeSet};

use cairn_plan::observed::{Generation, NodeStatus};
use cairn_schema::Name;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row as _};

use super::decode::{name, node_state};
use super::{Op as _, StoreError, to_u64};

/// Whether any change mark waits, as an SQL expression.
macro_rules! marked_sql {
    () => {
        "EXISTS (SELECT 1 FROM observed_changes) OR EXISTS (SELECT 1 FROM observed_app_changes)"
    };
}

/// The mark of a statement that touched too many apps' rows to name them.
const EVERY_APP: &str = "*";

/// What the consumed marks said changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    /// Every app's rows may have changed: a statement touched too many to name them (the mark `*`).
    pub every_app: bool,
    /// The apps whose rows changed (empty with `every_app`).
    pub apps: BTreeSet<Name>,
    /// How many apply transactions have consumed marks, this one included
    /// (`observed_consumptions`): a reader that kept the observed state as of its own last consumption
    /// (`count - 1`) missed nothing; any other count means marks it never saw were consumed.
    pub count: u64,
}

/// Consumes the marks this transaction can see (the table-wide ones say only that something every app
/// reads changed, and an apply reads those tables whole anyway); call it in the apply transaction,
/// under the apply lock, before the observed state is read. A mark committed after a statement here stays for the next
/// reconcile (its change may or may not be in what this one reads: reading and planning again is never
/// wrong).
pub async fn consume(conn: &mut PgConnection) -> Result<Marks, StoreError> {
    let count: i64 =
        sqlx::query_scalar("UPDATE observed_consumptions SET count = count + 1 RETURNING count")
            .fetch_one(&mut *conn)
            .await
            .op("count the consumption of the change marks")?;
    sqlx::query("DELETE FROM observed_changes")
        .execute(&mut *conn)
        .await
        .op("consume the observed-state change marks")?;
    let apps: Vec<String> = sqlx::query_scalar("DELETE FROM observed_app_changes RETURNING app")
        .fetch_all(&mut *conn)
        .await
        .op("consume the apps' change marks")?;
    let every_app = apps.iter().any(|a| a == EVERY_APP);
    Ok(Marks {
        every_app,
        apps: if every_app {
            BTreeSet::new()
        } else {
            apps.iter()
                .map(|a| name("observed_app_changes", a))
                .collect::<Result<_, _>>()?
        },
        count: to_u64("observed_consumptions", "count", count)?,
    })
}

/// The applied generation and whether a change mark waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub generation: Generation,
    pub marked: bool,
}

/// One query: the applied generation and whether any change is marked.
pub async fn pending(pool: &PgPool) -> Result<Pending, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT generation, ",
        marked_sql!(),
        " AS marked FROM config_state"
    ))
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

/// Whether any change mark waits, seen from `conn` (in a transaction that consumed them: whether a change
/// was committed since).
pub async fn marked(conn: &mut PgConnection) -> Result<bool, StoreError> {
    sqlx::query_scalar(concat!("SELECT ", marked_sql!()))
        .fetch_one(conn)
        .await
        .op("read the observed-state change marks")
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
