//! What the cluster route table is computed from (`crate::routes`): every app's hosts, every node's
//! address, state and healthy replicas as its agent last reported them.

use std::collections::BTreeSet;

use cairn_proto::{ActualReplica, RunState};
use cairn_schema::{Domain, Name, Node, NodeAddress};
use sqlx::PgConnection;

use super::decode::{json, name};
use super::{Op as _, StoreError};
use cairn_plan::observed::AppliedApp;

/// The rows behind a route table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRows {
    /// `cairn.toml`'s `base_domain`, when a commit has been applied.
    pub base_domain: Option<Domain>,
    /// `cairn.toml`'s `[tls]`, when it has one.
    pub tls: Option<cairn_schema::TlsSettings>,
    /// Every app with the domains of its manifest.
    pub apps: Vec<AppRow>,
    pub nodes: Vec<NodeRoute>,
}

/// An app as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRow {
    pub name: Name,
    pub domains: Vec<Domain>,
    /// `[app.NAME.http] max_body`, in bytes.
    pub max_body: Option<u64>,
}

/// A node as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRoute {
    pub name: Name,
    pub address: Option<NodeAddress>,
    pub ingress: bool,
    /// Whether its agent is online (joined, heartbeats within the threshold).
    pub online: bool,
    /// Apps with at least one running replica that passes its health check there.
    pub healthy: BTreeSet<Name>,
}

/// Reads what the route table is computed from, in one snapshot.
pub async fn rows(conn: &mut PgConnection) -> Result<RouteRows, StoreError> {
    let settings = super::state::config_state(&mut *conn).await?.settings;
    let apps = sqlx::query!("SELECT name, spec FROM apps ORDER BY name")
        .fetch_all(&mut *conn)
        .await
        .op("read the apps for the route table")?;
    let mut out = with_settings(settings);
    // Parsing every app's applied spec is synchronous work that grows with the installation.
    out.apps = crate::worker::off_the_workers(|| {
        apps.into_iter()
            .map(|row| app_row(&row.name, row.spec))
            .collect::<Result<Vec<_>, _>>()
    })?;
    out.nodes = node_routes(conn).await?;
    Ok(out)
}

/// As [`rows`], with only the apps named (a page of `cairn status`): the route of each app depends on
/// nothing but its own row and the nodes.
pub async fn rows_for_apps(
    conn: &mut PgConnection,
    apps: &[String],
) -> Result<RouteRows, StoreError> {
    use sqlx::Row as _;
    const OP: &str = "read the apps for the route table";
    let settings = super::state::config_state(&mut *conn).await?.settings;
    let rows = sqlx::query("SELECT name, spec FROM apps WHERE name = ANY($1) ORDER BY name")
        .bind(apps)
        .fetch_all(&mut *conn)
        .await
        .op(OP)?;
    let mut out = with_settings(settings);
    for row in rows {
        out.apps.push(app_row(
            row.try_get("name").op(OP)?,
            row.try_get("spec").op(OP)?,
        )?);
    }
    out.nodes = node_routes(conn).await?;
    Ok(out)
}

fn with_settings(settings: Option<cairn_schema::Settings>) -> RouteRows {
    let (base_domain, tls) = match settings {
        Some(s) => (Some(s.base_domain), s.tls),
        None => (None, None),
    };
    RouteRows {
        base_domain,
        tls,
        ..RouteRows::default()
    }
}

fn app_row(app: &str, spec: serde_json::Value) -> Result<AppRow, StoreError> {
    let applied: AppliedApp = json("apps", "spec", spec)?;
    Ok(AppRow {
        name: name("apps", app)?,
        domains: applied.domains,
        max_body: applied.http.max_body.map(|b| b.bytes()),
    })
}

async fn node_routes(conn: &mut PgConnection) -> Result<Vec<NodeRoute>, StoreError> {
    let nodes = sqlx::query!(
        r#"SELECT n.name, n.spec, s.state AS "state?", s.replicas AS "replicas?"
           FROM nodes n LEFT JOIN node_status s ON s.node = n.name
           ORDER BY n.name"#
    )
    .fetch_all(&mut *conn)
    .await
    .op("read the nodes for the route table")?;
    // As the apps': off the async workers.
    crate::worker::off_the_workers(|| {
        nodes
            .into_iter()
            .map(|row| {
                let node: Node = json("nodes", "spec", row.spec)?;
                let replicas: Vec<ActualReplica> = match row.replicas {
                    Some(r) => json("node_status", "replicas", r)?,
                    None => Vec::new(),
                };
                Ok(NodeRoute {
                    name: name("nodes", &row.name)?,
                    address: node.address,
                    ingress: node.ingress,
                    online: row.state.as_deref() == Some("online"),
                    healthy: replicas
                        .into_iter()
                        .filter(|r| r.healthy && r.state == RunState::Running)
                        .map(|r| r.app)
                        .collect(),
                })
            })
            .collect()
    })
}
