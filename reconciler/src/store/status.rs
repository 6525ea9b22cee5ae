//! What `cairn status` reads: one page of apps (by name, after a cursor, or one app) with their
//! placements, latest releases and pins; every node with its status; and what each node's placed replicas
//! use, summed by the database. Read in one read-only snapshot that takes no lock, so a status at any size
//! never waits for an apply nor holds one up, and its cost follows the page, not the installation.
//!
//! What it must not do: read every app (only the count), or decide what is shown (`crate::status` does).

use std::collections::BTreeMap;

use cairn_plan::observed::{
    AppliedApp, CommitId, NodeStatus, Observed, ReleaseRecord, ReplicaPlacement,
};
use cairn_schema::Name;
use sqlx::{PgPool, Row as _};

use super::decode::{drivers, json, name, node_state, recipient, replica_state};
use super::{Op as _, StoreError, to_u64};

/// What the placed, running replicas on one node take from it (their plans' sizes, summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeUse {
    pub replicas: u32,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// One page of the status: `observed` holds only the page's apps (and their placements, releases and
/// pins) but every plan, node and node status.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub observed: Observed,
    pub usage: BTreeMap<Name, NodeUse>,
    pub apps_total: u64,
    /// The last app shown, when more follow it.
    pub next_after: Option<String>,
}

/// Reads a page of at most `limit` apps: the app named `app`, or those named after `after`.
pub async fn page(
    pool: &PgPool,
    app: Option<&str>,
    after: Option<&str>,
    limit: u32,
) -> Result<Page, StoreError> {
    const OP: &str = "read the status";
    let mut tx = pool.begin().await.op(OP)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .op(OP)?;
    let config = super::state::config_state(&mut tx).await?;
    let mut page = Page {
        observed: Observed {
            generation: config.generation,
            applied_commit: config.commit,
            currency: config.settings.as_ref().map(|s| s.currency.clone()),
            base_domain: config.settings.map(|s| s.base_domain),
            ..Observed::default()
        },
        ..Page::default()
    };
    let o = &mut page.observed;

    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM apps")
        .fetch_one(&mut *tx)
        .await
        .op(OP)?;
    page.apps_total = to_u64("apps", "count", total)?;
    let rows = sqlx::query(
        "SELECT name, spec, pinned_release FROM apps
         WHERE ($1::text IS NULL OR name = $1) AND ($2::text IS NULL OR name > $2)
         ORDER BY name LIMIT $3",
    )
    .bind(app)
    .bind(after)
    .bind(i64::from(limit) + 1)
    .fetch_all(&mut *tx)
    .await
    .op(OP)?;
    let more = rows.len() > limit as usize;
    let mut names: Vec<String> = Vec::with_capacity(rows.len());
    for r in rows.into_iter().take(limit as usize) {
        let n: String = r.try_get("name").op(OP)?;
        let app = name("apps", &n)?;
        if let Some(pin) = r.try_get::<Option<i64>, _>("pinned_release").op(OP)? {
            o.rollback_pins
                .insert(app.clone(), to_u64("apps", "pinned_release", pin)?);
        }
        let spec: AppliedApp = json("apps", "spec", r.try_get("spec").op(OP)?)?;
        o.apps.insert(app, spec);
        names.push(n);
    }
    if more {
        page.next_after = names.last().cloned();
    }

    for r in sqlx::query(
        "SELECT app, slot, node, release, state, generation, restart FROM placements
         WHERE app = ANY($1) ORDER BY app, slot",
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await
    .op(OP)?
    {
        o.placements.push(ReplicaPlacement {
            app: name("placements", r.try_get("app").op(OP)?)?,
            slot: super::decode::slot("placements", r.try_get("slot").op(OP)?)?,
            node: name("placements", r.try_get("node").op(OP)?)?,
            release: to_u64("placements", "release", r.try_get("release").op(OP)?)?,
            state: replica_state(r.try_get("state").op(OP)?)?,
            generation: to_u64("placements", "generation", r.try_get("generation").op(OP)?)?,
            restart: to_u64("placements", "restart", r.try_get("restart").op(OP)?)?,
        });
    }
    for r in sqlx::query(
        "SELECT DISTINCT ON (app) app, number, config_commit, source_commit, spec_hash,
                status = 'failed' AS failed
         FROM releases WHERE app = ANY($1) ORDER BY app, number DESC",
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await
    .op(OP)?
    {
        o.releases.insert(
            name("releases", r.try_get("app").op(OP)?)?,
            ReleaseRecord {
                number: to_u64("releases", "number", r.try_get("number").op(OP)?)?,
                config_commit: CommitId::new(r.try_get::<String, _>("config_commit").op(OP)?),
                source_commit: CommitId::new(r.try_get::<String, _>("source_commit").op(OP)?),
                spec_hash: r.try_get("spec_hash").op(OP)?,
                failed: r.try_get("failed").op(OP)?,
                fallback: None,
            },
        );
    }

    for r in sqlx::query("SELECT name, spec FROM plans")
        .fetch_all(&mut *tx)
        .await
        .op(OP)?
    {
        o.plans.insert(
            name("plans", r.try_get("name").op(OP)?)?,
            json("plans", "spec", r.try_get("spec").op(OP)?)?,
        );
    }
    for r in sqlx::query("SELECT name, spec FROM nodes")
        .fetch_all(&mut *tx)
        .await
        .op(OP)?
    {
        o.nodes.insert(
            name("nodes", r.try_get("name").op(OP)?)?,
            json("nodes", "spec", r.try_get("spec").op(OP)?)?,
        );
    }
    for r in sqlx::query("SELECT node, state, last_heartbeat, drivers, recipient FROM node_status")
        .fetch_all(&mut *tx)
        .await
        .op(OP)?
    {
        let ds: Vec<String> = r.try_get("drivers").op(OP)?;
        o.node_status.insert(
            name("node_status", r.try_get("node").op(OP)?)?,
            NodeStatus {
                state: node_state(r.try_get("state").op(OP)?)?,
                last_heartbeat: r.try_get("last_heartbeat").op(OP)?,
                drivers: drivers(&ds)?,
                recipient: recipient("node_status", r.try_get("recipient").op(OP)?)?,
            },
        );
    }
    // Summed by the database: a page shows every node's use, not only its own apps'.
    for r in sqlx::query(
        "SELECT p.node, count(*) AS replicas, sum(pl.cpu_millis)::bigint AS cpu,
                sum(pl.memory_bytes)::bigint AS memory, sum(pl.disk_bytes)::bigint AS disk
         FROM placements p JOIN apps a ON a.name = p.app JOIN plans pl ON pl.name = a.plan
         WHERE p.state = 'running' GROUP BY p.node",
    )
    .fetch_all(&mut *tx)
    .await
    .op(OP)?
    {
        let n = |col: &str| -> Result<u64, StoreError> {
            let v: i64 = r.try_get(col).op(OP)?;
            to_u64("placements", "sum", v)
        };
        page.usage.insert(
            name("placements", r.try_get("node").op(OP)?)?,
            NodeUse {
                replicas: u32::try_from(n("replicas")?).unwrap_or(u32::MAX),
                cpu_millis: u32::try_from(n("cpu")?).unwrap_or(u32::MAX),
                memory_bytes: n("memory")?,
                disk_bytes: n("disk")?,
            },
        );
    }
    tx.commit().await.op(OP)?;
    Ok(page)
}
