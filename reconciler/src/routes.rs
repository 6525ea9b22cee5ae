//! The cluster route table: for every app, its hosts and the nodes where it has a healthy replica, so
//! that any ingress node's proxy can serve any app (locally, or forwarded one hop to a node that has it).
//!
//! [`Routes`] holds the current table and publishes a new one when its content changes: [`Routes::refresh`]
//! recomputes it from the store (what was applied, and what the agents last reported), and the agents
//! long-poll [`Routes::changed_from`] (`GET /agent/v1/routes`), so a table travels to an agent only when
//! it changed. Serve refreshes it after an apply, a heartbeat that changed a node's healthy replicas, a
//! node going offline, and every period in case another control plane changed the store.
//!
//! What it must not do: route to a node that is not online, or to an app's replica that did not pass its
//! health check; carry the hop key (it travels sealed per node with heartbeats).

use std::sync::Arc;
use std::time::Duration;

use cairn_proto::routes::{AppRoute, RouteNode, RouteTable};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::store::StoreError;
use crate::store::routes::RouteRows;

/// The current route table, shared by serve's handlers.
#[derive(Debug, Clone)]
pub struct Routes {
    tx: Arc<watch::Sender<Arc<RouteTable>>>,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            tx: Arc::new(watch::Sender::new(Arc::new(RouteTable::new(
                Vec::new(),
                Vec::new(),
            )))),
        }
    }
}

impl Routes {
    /// The table as last computed.
    pub fn current(&self) -> Arc<RouteTable> {
        self.tx.borrow().clone()
    }

    /// Recomputes the table from the store and publishes it when it changed; says whether it did.
    pub async fn refresh(&self, pool: &PgPool) -> Result<bool, StoreError> {
        let mut conn = pool.acquire().await.map_err(|source| StoreError::Query {
            op: "connect to read the route table",
            source,
        })?;
        let rows = crate::store::routes::rows(&mut conn).await?;
        Ok(self.publish(table(&rows)))
    }

    /// Publishes `table` unless it has the current generation; says whether it did.
    pub fn publish(&self, table: RouteTable) -> bool {
        self.tx.send_if_modified(|current| {
            if current.generation == table.generation {
                false
            } else {
                *current = Arc::new(table);
                true
            }
        })
    }

    /// The table once its generation is not `generation`: at once when it already differs, else when it
    /// changes within `wait`; `None` when the wait ran out.
    pub async fn changed_from(&self, generation: &str, wait: Duration) -> Option<Arc<RouteTable>> {
        let mut rx = self.tx.subscribe();
        let differs = |t: &Arc<RouteTable>| t.generation != generation;
        match tokio::time::timeout(wait, rx.wait_for(differs)).await {
            Ok(Ok(t)) => Some(t.clone()),
            _ => None,
        }
    }
}

/// The table the rows describe: an app is routed to the online nodes that report a healthy replica of it.
pub fn table(rows: &RouteRows) -> RouteTable {
    let nodes = rows
        .nodes
        .iter()
        .filter_map(|n| {
            Some(RouteNode {
                name: n.name.clone(),
                address: n.address.as_ref()?.endpoint(),
                ingress: n.ingress,
            })
        })
        .collect();
    let apps = rows
        .apps
        .iter()
        .map(|(app, domains)| {
            let mut hosts: Vec<String> = domains.iter().map(|d| d.to_string()).collect();
            if let Some(base) = &rows.base_domain {
                hosts.push(format!("{app}.{base}"));
            }
            AppRoute {
                app: app.clone(),
                hosts,
                nodes: rows
                    .nodes
                    .iter()
                    .filter(|n| n.online && n.healthy.contains(app))
                    .map(|n| n.name.clone())
                    .collect(),
            }
        })
        .collect();
    RouteTable::new(nodes, apps)
}
