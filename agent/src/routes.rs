//! Keeps the node proxy's cluster table current: long-polls `GET /agent/v1/routes` with the generation
//! it holds and installs each new table ([`crate::proxy::Proxy::install_cluster`]), and the hop key that
//! comes with it, sealed to this node ([`crate::proxy::Proxy::set_hop_key`]).
//!
//! The control plane's table names nodes by `host:port`; here each is resolved once per table to the
//! socket address the proxy forwards to and accepts hops from. A node whose address does not resolve is
//! left out (its apps are served by the others, or wait) and logged. Installed tables are numbered by a
//! counter of this process, so a table received later always replaces an earlier one.
//!
//! What it must not do: log the hop key or its plaintext (only its id), stop on a failed poll (it retries
//! with a backoff, keeping the table it has), or install a key it could not decrypt.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::routes::{RouteTable, RoutesQuery, RoutesResponse, SealedHopKey};
use cairn_schema::Identity;
use cairn_schema::error::chain;
use tokio::sync::watch;

use crate::client::{Client, ClientError};
use crate::proxy::{ClusterApp, ClusterNode, ClusterTable, HopKey, Proxy};

/// How long one long-poll asks the control plane to wait.
const POLL_WAIT: Duration = Duration::from_secs(25);

/// Follows the control plane's route table until `stop` turns true or the credential is refused.
/// `static_key`: the proxy holds an operator's hop key (`--proxy-hop-key-file`), which the delivered
/// one does not replace.
pub async fn follow(
    client: Client,
    proxy: Arc<Proxy>,
    identity: Identity,
    static_key: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut generation = String::new();
    let mut key = String::new();
    let mut installed: u64 = 0;
    let mut backoff = Duration::from_millis(250);
    loop {
        let q = RoutesQuery {
            generation: generation.clone(),
            key: key.clone(),
            wait_ms: u64::try_from(POLL_WAIT.as_millis()).unwrap_or(25_000),
        };
        let answer = tokio::select! {
            a = client.routes(&q) => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        match answer {
            Ok(None) => backoff = Duration::from_millis(250),
            Ok(Some(RoutesResponse { table, hop_key })) => {
                backoff = Duration::from_millis(250);
                if let Some(sealed) = hop_key {
                    match (static_key, open(&identity, &sealed)) {
                        (true, _) => key = sealed.id,
                        (false, Ok(k)) => {
                            proxy.set_hop_key(Some(k));
                            tracing::info!(key = %sealed.id, "hop key installed");
                            key = sealed.id;
                        }
                        (false, Err(e)) => {
                            tracing::error!(key = %sealed.id, error = %e, "cannot open the hop key the control plane sealed to this node");
                        }
                    }
                }
                installed += 1;
                let cluster = resolve(&table, installed).await;
                let apps = cluster.apps.len();
                if proxy.install_cluster(cluster) {
                    tracing::info!(generation = %table.generation, apps, "cluster routes installed");
                }
                generation = table.generation;
            }
            Err(ClientError::Unauthorized(_)) => {
                // The agent loop sees the refusal too, and stops the agent.
                return;
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot read the route table; retrying");
                let wait = match e {
                    ClientError::TooMany(d) => d,
                    _ => backoff,
                };
                backoff = (backoff * 2).min(Duration::from_secs(10));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

/// The hop key sealed to this node.
fn open(identity: &Identity, sealed: &SealedHopKey) -> Result<HopKey, String> {
    let plain = identity
        .decrypt(&sealed.ciphertext)
        .map_err(|e| chain(&e))?;
    let text = plain.expose_str().map_err(|e| chain(&e))?;
    HopKey::new(text)
}

/// The proxy's table for `table`, numbered `installed`, with each node's address resolved.
async fn resolve(table: &RouteTable, installed: u64) -> ClusterTable {
    let mut nodes = Vec::with_capacity(table.nodes.len());
    for n in &table.nodes {
        match lookup(&n.address).await {
            Some(addr) => nodes.push(ClusterNode {
                name: n.name.clone(),
                addr,
            }),
            None => {
                tracing::warn!(node = %n.name, address = %n.address, "cannot resolve a node's address; requests are not forwarded to it")
            }
        }
    }
    ClusterTable {
        generation: installed,
        nodes,
        apps: table
            .apps
            .iter()
            .map(|a| ClusterApp {
                app: a.app.clone(),
                hostnames: a.hosts.clone(),
                nodes: a.nodes.clone(),
                max_body_bytes: a.max_body_bytes,
            })
            .collect(),
    }
}

/// The first address `host:port` resolves to (an IP literal without a lookup).
async fn lookup(address: &str) -> Option<SocketAddr> {
    if let Ok(a) = address.parse() {
        return Some(a);
    }
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(address)).await {
        Ok(Ok(mut addrs)) => addrs.next(),
        _ => None,
    }
}
