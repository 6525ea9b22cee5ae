//! The cluster route table: where each app has healthy replicas, so every ingress node serves every app.
//!
//! `GET /agent/v1/routes?generation=G&key=K&tls=T&wait_ms=MS` answers a [`RoutesResponse`] (the whole
//! [`RouteTable`] when its generation is not `G`, the TLS table when its generation is not `T`) when
//! either differs or the cluster's hop key is not `K`, at once,
//! or as soon as either changes within `wait_ms` (a long-poll, at most [`MAX_ROUTES_WAIT_MS`]);
//! otherwise `204 No Content` when the wait runs out. An agent therefore transfers the table only when it
//! changed, never per request or per heartbeat. The generation is a digest of the table's content, so
//! every control plane computes the same one for the same state.
//!
//! The TLS table ([`TlsTable`]: certificates, host policies, ACME challenges: HTTP-01 tokens and
//! TLS-ALPN-01 digests) travels the same way, with its own generation (`tls`), so a challenge coming and
//! going does not resend the route table.
//!
//! The hop key (what one node's proxy shows another's to be served a forwarded request) is never in the
//! table itself: the agent names the key it holds by its id (`key`), and the answer carries the current
//! key sealed to that node's own age recipient ([`SealedHopKey`]) when it differs.

use cairn_schema::{Ciphertext, Name};
use serde::{Deserialize, Serialize};

/// Where every app can be reached, and through which nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// A digest of the rest: equal tables have equal generations.
    pub generation: String,
    /// The nodes that have an address, by name.
    pub nodes: Vec<RouteNode>,
    /// Every app that has a host, by name (suspended apps and apps without a healthy replica included:
    /// an ingress node answers them 503 rather than 404).
    pub apps: Vec<AppRoute>,
}

/// A node as the other nodes' proxies see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteNode {
    pub name: Name,
    /// `host:port` where its proxy takes forwarded requests (the manifest's `address`, port filled in).
    pub address: String,
    /// Whether public traffic reaches it (informational for the agents; DNS decides).
    pub ingress: bool,
}

/// One app: the hosts it answers and the nodes with a healthy replica of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRoute {
    pub app: Name,
    /// Lowercase hostnames: the generated `<app>.<base_domain>` and the manifest's `domains`.
    pub hosts: Vec<String>,
    /// Nodes (names in [`RouteTable::nodes`] or not: a node without an address serves its own replicas
    /// only) with at least one healthy replica, sorted.
    pub nodes: Vec<Name>,
    /// The largest request body the app accepts (`[app.NAME.http] max_body`); `None`: each node's
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
}

/// Query of `GET /agent/v1/routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesQuery {
    /// The generation the agent holds (empty: none).
    #[serde(default)]
    pub generation: String,
    /// The generation of the TLS table the agent holds (empty: none).
    #[serde(default)]
    pub tls: String,
    /// The id of the hop key the agent holds (empty: none).
    #[serde(default)]
    pub key: String,
    /// How long to wait for a different generation; 0 answers at once.
    #[serde(default)]
    pub wait_ms: u64,
}

/// The longest a routes long-poll waits.
pub const MAX_ROUTES_WAIT_MS: u64 = 30_000;

/// The answer of `GET /agent/v1/routes` when something changed: what changed, each part whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesResponse {
    /// The route table, when its generation is not the one the agent named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<RouteTable>,
    /// The cluster's hop key sealed to this node, when the agent did not name it as the one it holds
    /// (`None`: the control plane has none to give, or the agent holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hop_key: Option<SealedHopKey>,
    /// The TLS table, when its generation is not the one the agent named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsTable>,
}

/// What the ingress nodes need for HTTPS: the certificates (keys sealed to the asking node), each
/// host's redirect and HSTS policy, and the ACME answers every node must give while an order or a
/// self-probe runs (HTTP-01 tokens, TLS-ALPN-01 digests). Its generation is a digest of everything but the sealed keys' ciphertexts (which
/// differ per node and per sealing), so it changes when a certificate, a policy or a challenge does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsTable {
    pub generation: String,
    #[serde(default)]
    pub certificates: Vec<SealedCertificate>,
    #[serde(default)]
    pub hosts: Vec<HostTls>,
    #[serde(default)]
    pub challenges: Vec<AcmeChallenge>,
    /// The TLS-ALPN-01 challenges in flight (RFC 8737), by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<AlpnChallenge>,
}

/// One certificate: its chain in the clear, its private key sealed to the node.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCertificate {
    /// Names the certificate's name set: stable across renewals (the chain tells them apart).
    pub id: String,
    /// The names it serves (lowercase; `*.example.com` for a wildcard).
    pub names: Vec<String>,
    pub chain_pem: String,
    pub key: Ciphertext,
}

impl std::fmt::Debug for SealedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedCertificate")
            .field("id", &self.id)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// How a host with a certificate is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTls {
    pub host: String,
    /// Plain HTTP answers 308 to `https://` (the ACME challenge path excepted).
    pub redirect_http: bool,
    /// `Strict-Transport-Security: max-age=N` on HTTPS answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts_max_age: Option<u64>,
}

/// An ACME HTTP-01 answer: `GET /.well-known/acme-challenge/<token>` answers `key_authorization`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeChallenge {
    pub token: String,
    pub key_authorization: String,
}

/// An ACME TLS-ALPN-01 answer (RFC 8737): a TLS handshake for `name` offering only ALPN `acme-tls/1`
/// gets a self-signed certificate for `name` whose critical acmeIdentifier extension holds `digest`.
/// Only the digest travels (never the account key; the key authorization itself is public anyway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlpnChallenge {
    /// The name being validated (lowercase, never a wildcard).
    pub name: String,
    /// The SHA-256 digest of the key authorization, 64 lowercase hex digits.
    pub digest: String,
}

impl TlsTable {
    /// Sorts the parts of a TLS table (certificates by id, hosts, challenges by token or name) and gives
    /// the generation of a table of them: a digest of the certificates' ids, names and chains (`cert`
    /// says which of an item's fields they are; never a key), the hosts and the challenges. What the
    /// control plane holds (keys sealed to itself) and what a node receives (keys sealed to it) therefore
    /// have the same generation.
    pub fn sort_and_digest<C>(
        certificates: &mut [C],
        cert: impl Fn(&C) -> (&str, &[String], &str),
        hosts: &mut [HostTls],
        challenges: &mut [AcmeChallenge],
        alpn: &mut [AlpnChallenge],
    ) -> String {
        certificates.sort_by(|a, b| cert(a).0.cmp(cert(b).0));
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        challenges.sort_by(|a, b| a.token.cmp(&b.token));
        alpn.sort_by(|a, b| a.name.cmp(&b.name));
        let parts: Vec<(&str, &[String], &str)> = certificates.iter().map(&cert).collect();
        if alpn.is_empty() {
            // The generation of a table without TLS-ALPN-01 answers is what it was before they existed.
            digest(&(&parts, &*hosts, &*challenges))
        } else {
            digest(&(&parts, &*hosts, &*challenges, &*alpn))
        }
    }

    /// The table for these parts (sorted here), with its generation.
    pub fn new(
        mut certificates: Vec<SealedCertificate>,
        mut hosts: Vec<HostTls>,
        mut challenges: Vec<AcmeChallenge>,
        mut alpn: Vec<AlpnChallenge>,
    ) -> TlsTable {
        let generation = TlsTable::sort_and_digest(
            &mut certificates,
            |c| (c.id.as_str(), c.names.as_slice(), c.chain_pem.as_str()),
            &mut hosts,
            &mut challenges,
            &mut alpn,
        );
        TlsTable {
            generation,
            certificates,
            hosts,
            challenges,
            alpn,
        }
    }
}

/// The cluster's hop key, sealed to one node: an age ciphertext (armored) of the key's 32 bytes in hex.
/// The agent decrypts it with its own identity (the one it joined with).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedHopKey {
    /// Names the key without revealing it (a digest of it), so agents can say which one they hold.
    pub id: String,
    pub ciphertext: Ciphertext,
}

impl std::fmt::Debug for SealedHopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedHopKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The request header that marks a forwarded request and carries the hop key (hex) to the next node.
pub const HOP_HEADER: &str = "cairn-hop";
/// The header on a forwarded request carrying the first hop's view: the client's address, scheme and
/// host (`for=...;proto=...;host=...`, RFC 7239 syntax), trusted only from an authenticated hop.
pub const HOP_CLIENT_HEADER: &str = "cairn-hop-client";

impl RouteTable {
    /// The table for `nodes` and `apps` (sorted here), with its generation.
    pub fn new(mut nodes: Vec<RouteNode>, mut apps: Vec<AppRoute>) -> RouteTable {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        apps.sort_by(|a, b| a.app.cmp(&b.app));
        for a in &mut apps {
            a.hosts.sort();
            a.hosts.dedup();
            a.nodes.sort();
            a.nodes.dedup();
        }
        let generation = digest(&(&nodes, &apps));
        RouteTable {
            generation,
            nodes,
            apps,
        }
    }
}

/// The first 128 bits of the SHA-256 of a value's JSON, in hex.
fn digest<T: Serialize>(value: &T) -> String {
    use sha2::Digest as _;
    let bytes = serde_json::to_vec(value).expect("route tables serialize");
    hex::encode(&sha2::Sha256::digest(&bytes)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn the_generation_follows_the_content_not_the_order() {
        let node = |n: &str, a: &str| RouteNode {
            name: name(n),
            address: a.into(),
            ingress: true,
        };
        let app = |a: &str, nodes: &[&str]| AppRoute {
            app: name(a),
            hosts: vec![format!("{a}.apps.example.com")],
            nodes: nodes.iter().map(|n| name(n)).collect(),
            max_body_bytes: None,
        };
        let one = RouteTable::new(
            vec![node("a", "10.0.0.2:80"), node("b", "10.0.0.3:80")],
            vec![app("web", &["b", "a"]), app("api", &["a"])],
        );
        let same = RouteTable::new(
            vec![node("b", "10.0.0.3:80"), node("a", "10.0.0.2:80")],
            vec![app("api", &["a"]), app("web", &["a", "b"])],
        );
        assert_eq!(one, same);
        let moved = RouteTable::new(
            vec![node("a", "10.0.0.2:80"), node("b", "10.0.0.3:80")],
            vec![app("web", &["b"]), app("api", &["a"])],
        );
        assert_ne!(one.generation, moved.generation);
        assert_eq!(one.generation.len(), 32);
    }
}
