//! Keeps the node proxy's cluster table current: long-polls `GET /agent/v1/routes` with the generations
//! it holds and installs each new route table ([`crate::proxy::Proxy::install_cluster`]), TLS table
//! (certificates with their keys opened with this node's identity, host policies, ACME challenges:
//! [`crate::proxy::Proxy::install_tls`]) and the hop key, sealed to this node
//! ([`crate::proxy::Proxy::set_hop_key`]).
//!
//! The last route table and the sealed hop key are kept in the data directory (`routes.json`, 0600; the
//! key stays sealed to this node there) and installed at start before the first poll: a node restarted
//! while the control plane is down still forwards to the nodes it last knew (its certificates come from
//! the proxy's own cache).
//!
//! The control plane's table names nodes by `host:port`; here each is resolved once per table to the
//! socket address the proxy forwards to and accepts hops from. A node whose address does not resolve is
//! left out (its apps are served by the others, or wait) and logged. Installed tables are numbered by a
//! counter of this process, so a table received later always replaces an earlier one.
//!
//! What it must not do: log the hop key or a certificate key (only ids), stop on a failed poll (it
//! retries with a backoff, keeping the tables it has), or install a key it could not decrypt (that
//! certificate is left out; the others are served).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::routes::{RouteTable, RoutesQuery, RoutesResponse, SealedHopKey, TlsTable};
use cairn_schema::Identity;
use cairn_schema::error::chain;
use tokio::sync::watch;

use crate::client::{Client, ClientError};
use crate::proxy::{ClusterApp, ClusterNode, ClusterTable, HopKey, Proxy};
use crate::proxy::{HostPolicy, TlsCertificate};

/// How long one long-poll asks the control plane to wait.
const POLL_WAIT: Duration = Duration::from_secs(25);

/// What is kept of the last answers: the route table and the hop key still sealed to this node.
#[derive(Debug, serde::Deserialize)]
struct Kept {
    table: RouteTable,
    #[serde(default)]
    hop_key: Option<SealedHopKey>,
}

/// [`Kept`] as it is written, borrowing what the loop holds.
#[derive(serde::Serialize)]
struct Keeping<'a> {
    table: &'a RouteTable,
    hop_key: Option<&'a SealedHopKey>,
}

/// Follows the control plane's route table until `stop` turns true or the credential is refused.
/// `static_key`: the proxy holds an operator's hop key (`--proxy-hop-key-file`), which the delivered
/// one does not replace. `cache`: where the last table and sealed key are kept (`None`: nowhere).
pub async fn follow(
    client: Client,
    proxy: Arc<Proxy>,
    identity: Identity,
    static_key: bool,
    cache: Option<PathBuf>,
    mut stop: watch::Receiver<bool>,
) {
    let mut generation = String::new();
    let mut tls = String::new();
    let mut key = String::new();
    let mut installed: u64 = 0;
    let kept: Option<Kept> = cache.as_deref().and_then(|p| {
        let text = std::fs::read(p).ok()?;
        match serde_json::from_slice::<Kept>(&text) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "the kept route table is unreadable; waiting for the control plane");
                None
            }
        }
    });
    if let Some(k) = &kept {
        if let Some(sealed) = &k.hop_key
            && !static_key
        {
            match open(&identity, sealed) {
                Ok(hk) => {
                    proxy.set_hop_key(Some(hk));
                    key = sealed.id.clone();
                }
                Err(e) => tracing::warn!(error = %e, "cannot open the kept hop key"),
            }
        }
        installed += 1;
        proxy.install_cluster(resolve(&k.table, installed).await);
        generation = k.table.generation.clone();
        tracing::info!(generation = %generation, apps = k.table.apps.len(), "kept cluster routes installed");
    }
    let (mut kept_table, mut kept_key) = match kept {
        Some(k) => (Some(k.table), k.hop_key),
        None => (None, None),
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        let q = RoutesQuery {
            generation: generation.clone(),
            tls: tls.clone(),
            key: key.clone(),
            wait_ms: u64::try_from(POLL_WAIT.as_millis()).unwrap_or(25_000),
        };
        let answer = tokio::select! {
            a = client.routes(&q) => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        match answer {
            Ok(None) => backoff = Duration::from_millis(250),
            Ok(Some(RoutesResponse {
                table,
                hop_key,
                tls: tls_table,
            })) => {
                backoff = Duration::from_millis(250);
                let mut keep = false;
                if let Some(sealed) = hop_key {
                    match (static_key, open(&identity, &sealed)) {
                        (true, _) => key = sealed.id.clone(),
                        (false, Ok(k)) => {
                            proxy.set_hop_key(Some(k));
                            tracing::info!(key = %sealed.id, "hop key installed");
                            key = sealed.id.clone();
                        }
                        (false, Err(e)) => {
                            tracing::error!(key = %sealed.id, error = %e, "cannot open the hop key the control plane sealed to this node");
                        }
                    }
                    keep = true;
                    kept_key = Some(sealed);
                }
                if let Some(table) = table {
                    installed += 1;
                    let cluster = resolve(&table, installed).await;
                    let apps = cluster.apps.len();
                    if proxy.install_cluster(cluster) {
                        tracing::info!(generation = %table.generation, apps, "cluster routes installed");
                    }
                    generation = table.generation.clone();
                    kept_table = Some(table);
                    keep = true;
                }
                if keep
                    && let (Some(path), Some(table)) = (&cache, &kept_table)
                    && let Err(e) = crate::datadir::write_private(
                        path,
                        &serde_json::to_vec(&Keeping {
                            table,
                            hop_key: kept_key.as_ref(),
                        })
                        .expect("a route table serializes"),
                    )
                {
                    tracing::warn!(error = %chain(&e), "cannot keep the route table on disk");
                }
                if let Some(t) = tls_table {
                    let report = proxy.install_tls(opened(&identity, &t));
                    tracing::info!(generation = %t.generation, certificates = report.installed, rejected = report.rejected.len(), challenges = t.challenges.len(), alpn_challenges = t.alpn.len(), "TLS table installed");
                    tls = t.generation;
                }
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

/// The proxy's TLS table for `t`: every certificate whose key this node can open (one it cannot is
/// logged by id and left out).
fn opened(identity: &Identity, t: &TlsTable) -> crate::proxy::TlsTable {
    let mut out = crate::proxy::TlsTable::default();
    for c in &t.certificates {
        let key = identity
            .decrypt(&c.key)
            .map_err(|e| chain(&e))
            .and_then(|k| k.expose_str().map(str::to_owned).map_err(|e| chain(&e)));
        match key {
            Ok(k) => out.certificates.push(TlsCertificate {
                id: c.id.clone(),
                names: c.names.clone(),
                chain_pem: c.chain_pem.clone(),
                key_pem: zeroize::Zeroizing::new(k),
            }),
            Err(e) => {
                tracing::error!(certificate = %c.id, error = %e, "cannot open a certificate key sealed to this node; it is not served")
            }
        }
    }
    for h in &t.hosts {
        out.hosts.insert(
            h.host.clone(),
            HostPolicy {
                redirect_http: h.redirect_http,
                hsts: h.hsts_max_age,
            },
        );
    }
    for c in &t.challenges {
        out.challenges
            .insert(c.token.clone(), c.key_authorization.clone());
    }
    for c in &t.alpn {
        let mut digest = [0u8; 32];
        match hex::decode_to_slice(&c.digest, &mut digest) {
            Ok(()) => {
                out.alpn.insert(c.name.clone(), digest);
            }
            Err(_) => {
                tracing::error!(name = %c.name, "a TLS-ALPN-01 challenge whose digest is not 32 bytes in hex; not answered")
            }
        }
    }
    out
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
