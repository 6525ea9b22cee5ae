//! The cluster half of the proxy's routing: for each app, the other nodes whose proxies have a healthy
//! replica of it, every node's proxy address, and the hop key that authenticates the internal hop.
//!
//! The control plane computes the table from the applied state and the agents' reports and hands every
//! agent the whole of it, numbered by generation; [`super::Proxy::install_cluster`] swaps it in at once
//! (like the local table) and ignores a table older than the one it has. Addresses are socket addresses:
//! the control plane resolves node names before it sends them, so the peer check below compares IPs.
//!
//! The internal hop: a request the first node forwards carries [`HOP_HEADER`] with the cluster's hop key.
//! The receiving proxy accepts it only when the key matches (compared in constant time, over SHA-256
//! digests so the length leaks nothing either) AND the connection comes from one of the table's node
//! addresses; it then serves it from its own replicas only, never forwarding again, so a loop cannot form.
//! When it has none (the replica just moved away), its 503 carries [`HOP_MISS_HEADER`], so the first node
//! knows to try another one rather than hand the 503 to the client.
//!
//! What it must not do: put the hop key in a log, an error or a `Debug` output, or let it reach an app (the
//! proxy strips [`HOP_HEADER`] from every request it passes on to a replica).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cairn_schema::Name;
use hyper::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header that marks (and authenticates) the internal hop: its value is the cluster's hop key.
pub const HOP_HEADER: HeaderName = HeaderName::from_static("cairn-hop");

/// The response header that marks a node's 503 to an internal hop it cannot serve (it has no replica of
/// the app, or its replica refused the connection): the forwarding node then tries the next node, or waits
/// for a route, and never passes the header on to a client.
pub const HOP_MISS_HEADER: HeaderName = HeaderName::from_static("cairn-hop-miss");

/// The whole cluster route table, as the control plane sends it to every agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTable {
    /// Increases with every table the control plane computes; an older one than installed is ignored.
    pub generation: u64,
    /// Every node's proxy address on the private network (the internal hop is accepted from these only).
    #[serde(default)]
    pub nodes: Vec<ClusterNode>,
    #[serde(default)]
    pub apps: Vec<ClusterApp>,
}

/// One node and the address its proxy is reached at by the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub name: Name,
    pub addr: SocketAddr,
}

/// One app: its hostnames, the nodes with a healthy replica of it, and its per-app limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterApp {
    pub app: Name,
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Nodes (names from [`ClusterTable::nodes`]) with a healthy replica of the app.
    #[serde(default)]
    pub nodes: Vec<Name>,
    /// The largest request body the app accepts (the manifest's `[app.X.http] max_body`); `None`: the
    /// node's default (`cairn-agent --proxy-max-body`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
}

/// Where another node can serve an app.
#[derive(Debug)]
pub(super) struct RemoteRoute {
    pub app: Name,
    /// Other nodes' proxy addresses (this node left out).
    pub nodes: Vec<SocketAddr>,
    pub max_body_bytes: Option<u64>,
    next: AtomicUsize,
}

impl RemoteRoute {
    /// The nodes to try, round robin: a different first node each request, every node at most once.
    pub fn order(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let n = self.nodes.len();
        let start = if n == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        };
        (0..n).map(move |i| self.nodes[(start + i) % n])
    }
}

/// The installed table, compiled for lookups.
#[derive(Debug, Default)]
pub(super) struct Cluster {
    pub generation: Option<u64>,
    /// IPs the internal hop is accepted from.
    pub peers: HashSet<IpAddr>,
    pub hosts: HashMap<String, Arc<RemoteRoute>>,
    pub apps: HashMap<Name, Arc<RemoteRoute>>,
}

impl Cluster {
    /// Compiles `table` as seen from node `me` (left out of every route).
    pub fn compile(table: ClusterTable, me: Option<&Name>) -> Cluster {
        let mut by_name: HashMap<&Name, SocketAddr> = HashMap::new();
        for n in &table.nodes {
            if by_name.insert(&n.name, n.addr).is_some() {
                tracing::warn!(node = %n.name, "the cluster table names a node twice; the last address is used");
            }
        }
        let peers = table.nodes.iter().map(|n| n.addr.ip()).collect();
        let mut hosts = HashMap::new();
        let mut apps = HashMap::new();
        for a in &table.apps {
            let mut nodes = Vec::new();
            for name in &a.nodes {
                if Some(name) == me {
                    continue;
                }
                match by_name.get(name) {
                    Some(addr) if !nodes.contains(addr) => nodes.push(*addr),
                    Some(_) => {}
                    None => {
                        tracing::warn!(app = %a.app, node = %name, "the cluster table routes to a node it has no address for")
                    }
                }
            }
            let route = Arc::new(RemoteRoute {
                app: a.app.clone(),
                nodes,
                max_body_bytes: a.max_body_bytes,
                next: AtomicUsize::new(0),
            });
            for h in super::normalize_hosts(&a.hostnames) {
                hosts.entry(h).or_insert_with(|| route.clone());
            }
            apps.insert(a.app.clone(), route);
        }
        Cluster {
            generation: Some(table.generation),
            peers,
            hosts,
            apps,
        }
    }
}

/// The cluster's hop key. Its `Debug` output shows nothing of it.
#[derive(Clone)]
pub struct HopKey {
    value: HeaderValue,
    digest: [u8; 32],
}

impl HopKey {
    /// A key of 32 to 1024 visible ASCII characters (such as hex or base64 of 32 random bytes).
    pub fn new(text: &str) -> Result<HopKey, String> {
        let text = text.trim();
        if !(32..=1024).contains(&text.len()) || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the hop key must be 32 to 1024 visible ASCII characters (e.g. `openssl rand -hex 32`)"
                    .into(),
            );
        }
        let mut value =
            HeaderValue::from_str(text).map_err(|_| "the hop key is not a valid header value")?;
        value.set_sensitive(true);
        Ok(HopKey {
            value,
            digest: Sha256::digest(text.as_bytes()).into(),
        })
    }

    /// The header value a forwarding node sends.
    pub(super) fn header(&self) -> HeaderValue {
        self.value.clone()
    }

    /// Whether `offered` is this key, in time independent of where they differ.
    pub(super) fn matches(&self, offered: &HeaderValue) -> bool {
        let digest: [u8; 32] = Sha256::digest(offered.as_bytes()).into();
        bool::from(self.digest.ct_eq(&digest))
    }
}

impl fmt::Debug for HopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HopKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn a_node_leaves_itself_out_and_tries_each_other_node_once_round_robin() {
        let table = ClusterTable {
            generation: 3,
            nodes: vec![
                ClusterNode {
                    name: name("a"),
                    addr: "127.0.0.2:8000".parse().unwrap(),
                },
                ClusterNode {
                    name: name("b"),
                    addr: "127.0.0.3:8000".parse().unwrap(),
                },
                ClusterNode {
                    name: name("c"),
                    addr: "127.0.0.4:8000".parse().unwrap(),
                },
            ],
            apps: vec![ClusterApp {
                app: name("web"),
                hostnames: vec!["Web.Example.com.".into()],
                nodes: vec![name("a"), name("b"), name("c"), name("ghost")],
                max_body_bytes: Some(10),
            }],
        };
        let c = Cluster::compile(table, Some(&name("a")));
        assert_eq!(c.peers.len(), 3);
        let r = c.hosts.get("web.example.com").expect("normalized host");
        let first: Vec<SocketAddr> = r.order().collect();
        let second: Vec<SocketAddr> = r.order().collect();
        assert_eq!(
            first.len(),
            2,
            "self and the unknown node are left out: {first:?}"
        );
        assert_eq!(first[0], second[1]);
        assert_eq!(first[1], second[0]);
        assert_eq!(c.apps[&name("web")].max_body_bytes, Some(10));
    }

    #[test]
    fn the_hop_key_matches_only_itself_and_never_shows() {
        let k = HopKey::new(&"k".repeat(40)).unwrap();
        assert!(k.matches(&HeaderValue::from_static(
            "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
        )));
        assert!(!k.matches(&HeaderValue::from_static(
            "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkj"
        )));
        assert!(!k.matches(&HeaderValue::from_static("")));
        assert!(!format!("{k:?}").contains("kkkk"));
        assert!(HopKey::new("short").is_err());
        assert!(HopKey::new(&format!("{} x", "k".repeat(40))).is_err());
    }
}
