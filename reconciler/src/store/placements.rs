//! Placements as the agent API reads them for one node: its own, and those of the slots it reports
//! wherever they are placed now (drift checks, a returning node's stop orders). The executor writes
//! placements ([`super::state`]).
//!
//! What it must not do: write a placement, or judge drift (that is [`crate::drift`]).

use cairn_schema::Name;
use sqlx::PgConnection;

use super::decode::{self, corrupt, name, replica_state};
use super::{Op as _, StoreError, to_u64};
use cairn_plan::observed::ReplicaState;

/// A placement as drift checks and heartbeat answers need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPlacement {
    pub app: Name,
    pub slot: u32,
    pub node: Name,
    pub release: u64,
    pub state: ReplicaState,
    pub generation: u64,
}

/// The placements on `node`, and those of the slots `(app, slot)` wherever they are.
pub async fn placements_for(
    conn: &mut PgConnection,
    node: &Name,
    slots: &[(Name, u32)],
) -> Result<Vec<SlotPlacement>, StoreError> {
    let apps: Vec<String> = slots.iter().map(|(a, _)| a.as_str().to_owned()).collect();
    let nums: Vec<i32> = slots
        .iter()
        .map(|(_, s)| i32::try_from(*s).unwrap_or(i32::MAX))
        .collect();
    let rows = sqlx::query!(
        r#"SELECT app, slot, node, release, state, generation FROM placements WHERE node = $1
           UNION
           SELECT p.app, p.slot, p.node, p.release, p.state, p.generation
           FROM placements p JOIN UNNEST($2::text[], $3::int[]) AS s(app, slot)
                ON p.app = s.app AND p.slot = s.slot"#,
        node.as_str(),
        &apps,
        &nums,
    )
    .fetch_all(conn)
    .await
    .op("read a node's placements")?;
    rows.into_iter()
        .map(|r| {
            let (Some(app), Some(slot), Some(node), Some(release), Some(state), Some(generation)) =
                (r.app, r.slot, r.node, r.release, r.state, r.generation)
            else {
                return Err(corrupt("placements", "*", "a NULL in a placement"));
            };
            Ok(SlotPlacement {
                app: name("placements", &app)?,
                slot: decode::slot("placements", slot)?,
                node: name("placements", &node)?,
                release: to_u64("placements", "release", release)?,
                state: replica_state(&state)?,
                generation: to_u64("placements", "generation", generation)?,
            })
        })
        .collect()
}
