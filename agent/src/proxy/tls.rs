//! The node proxy's HTTPS side: the TLS table the control plane gives it ([`TlsTable`]: certificates,
//! per-host policy, ACME HTTP-01 challenge answers and TLS-ALPN-01 digests), the certificate resolver
//! the TLS listener asks on every handshake, the TLS listener itself ([`TlsListener`]), and the disk
//! cache that keeps HTTPS working while the control plane is away.
//!
//! TLS-ALPN-01 (RFC 8737): a handshake whose ClientHello offers ALPN `acme-tls/1` and nothing else, for
//! a name with a challenge in the table, gets a self-signed certificate for that name carrying the
//! critical acmeIdentifier extension with the table's digest (made when the table is installed, with a
//! fresh key), negotiates `acme-tls/1`, and is then closed without reading a request. Any other
//! handshake never sees such a certificate (a client offering h2 or http/1.1 as well gets the name's
//! real certificate, or none), and an `acme-tls/1` handshake for a name without a challenge gets none.
//!
//! The table is compiled once per install into hash maps (exact names, and one-label wildcards keyed by
//! their parent domain) and swapped in whole, like the cluster table: a handshake looks its SNI up in what
//! it loaded, O(1), allocating nothing (unless the client sent capitals). New handshakes see a renewed
//! certificate at once; a connection keeps the certificate it was opened with.
//!
//! A certificate is installed only if its chain and key parse, the key fits the leaf, and the leaf covers
//! every name it is installed for (so a table mistake cannot serve one app's certificate for another's
//! name). One that fails is left out (and reported), the others are installed.
//!
//! The cache (`<data-dir>/tls/`, 0700): per certificate a chain file and a key file (0600, written whole:
//! a temporary file, then a rename), named by a hash of the certificate's id, and `table.json`, the index
//! (ids, names, host policy; no key). Written on every install that changes it, read once at start
//! before the TLS listener accepts; files of certificates no longer installed are deleted.
//!
//! What it must not do: answer a handshake whose SNI no installed certificate covers (or one without SNI)
//! with any certificate (an `acme-tls/1` one for a name with a challenge excepted), serve HTTP on an
//! `acme-tls/1` connection, or pick one covering a name only by a wildcard over more than one label; print
//! or log a private key (Debug redacts it, errors never quote it); write a key anywhere but the cache
//! directory, or readable by anyone but the agent's user; redirect a host it holds no certificate for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::future::Future as _;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::header::HeaderValue;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::datadir::{DataError, write_private};
use crate::metrics::ProxyMetrics;

/// Where ACME HTTP-01 challenges are asked for (RFC 8555, 8.3).
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The ALPN protocol of a TLS-ALPN-01 validation handshake (RFC 8737, 6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// What the control plane tells a node about HTTPS. Installed whole ([`super::Proxy::install_tls`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsTable {
    /// The certificates to serve, by SNI. When two claim the same name, the first keeps it.
    #[serde(default)]
    pub certificates: Vec<TlsCertificate>,
    /// Per host name (exact, or `*.example.com` for its one-label subdomains): redirects and HSTS. A
    /// host no certificate covers is never redirected.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostPolicy>,
    /// ACME HTTP-01 challenges in flight: token to key authorization, answered on the plain HTTP
    /// listener of every node.
    #[serde(default)]
    pub challenges: BTreeMap<String, String>,
    /// ACME TLS-ALPN-01 challenges in flight: name to the SHA-256 digest of the key authorization,
    /// answered on the TLS listener of every node.
    #[serde(default)]
    pub alpn: BTreeMap<String, [u8; 32]>,
}

/// A certificate chain and its key, for the names it serves.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsCertificate {
    /// Stable across renewals of the same name set (the cache's file names derive from it).
    pub id: String,
    /// Host names (`shop.example.com`) or one-label wildcards (`*.example.com`).
    pub names: Vec<String>,
    /// The leaf first, then intermediates, PEM.
    pub chain_pem: String,
    /// The leaf's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for TlsCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCertificate")
            .field("id", &self.id)
            .field("names", &self.names)
            .field(
                "chain_pem",
                &format_args!("<{} bytes>", self.chain_pem.len()),
            )
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// What a host gets beyond its certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPolicy {
    /// Plain HTTP requests get a 308 to `https://` (ACME challenges excepted).
    #[serde(default)]
    pub redirect_http: bool,
    /// `Strict-Transport-Security: max-age=<secs>` on HTTPS answers.
    #[serde(default)]
    pub hsts: Option<u64>,
}

/// What can go wrong with the TLS table, the listener or the cache. Never quotes a key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate `{id}`: its chain is not PEM")]
    ChainPem {
        id: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("certificate `{id}`: its chain holds no certificate")]
    NoCertificate { id: String },
    /// The PEM parser's error is left out: it may quote a line of the key.
    #[error("certificate `{id}`: its key is not a PEM private key")]
    KeyPem { id: String },
    #[error(
        "certificate `{id}`: its key is not usable, or does not belong to its leaf certificate"
    )]
    Key {
        id: String,
        #[source]
        source: rustls::Error,
    },
    #[error("certificate `{id}`: its leaf certificate cannot be parsed")]
    Leaf {
        id: String,
        #[source]
        source: webpki::Error,
    },
    #[error("certificate `{id}` is in the table twice (the first is served)")]
    DuplicateId { id: String },
    #[error("certificate `{id}` names no host")]
    NoNames { id: String },
    #[error(
        "certificate `{id}`: `{name}` is not a host name or a wildcard over one label (`*.example.com`)"
    )]
    BadName { id: String, name: String },
    #[error("certificate `{id}` does not cover `{name}`")]
    NotCovered { id: String, name: String },
    #[error("the TLS-ALPN-01 challenge for `{name}` cannot be answered")]
    Alpn {
        name: String,
        #[source]
        source: AlpnError,
    },
    #[error("the TLS listener cannot be set up")]
    Config(#[source] rustls::Error),
    #[error("the certificate cache")]
    Cache(#[source] DataError),
    #[error("the certificate cache's index {path} is damaged")]
    Index {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Why a TLS-ALPN-01 answer could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AlpnError {
    #[error("it is not a host name")]
    Name,
    #[error("cannot make its certificate")]
    Certificate(#[source] rcgen::Error),
    #[error("cannot load its certificate")]
    Key(#[source] rustls::Error),
}

/// What an install did.
#[derive(Debug, Default)]
pub struct TlsReport {
    /// Certificates now served.
    pub installed: usize,
    /// Certificates left out, and why.
    pub rejected: Vec<TlsError>,
    /// The disk cache could not be written (the table is served anyway).
    pub cache: Option<TlsError>,
}

/// A host's policy, ready to apply.
#[derive(Debug, Clone)]
struct Policy {
    redirect_http: bool,
    hsts: Option<HeaderValue>,
}

/// The installed table, compiled for lookups.
#[derive(Default)]
pub(super) struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    policy_exact: HashMap<String, Policy>,
    policy_wildcard: HashMap<String, Policy>,
    challenges: HashMap<String, Bytes>,
    /// TLS-ALPN-01 answers by name.
    alpn: HashMap<String, Arc<CertifiedKey>>,
    any_redirect: bool,
    any_hsts: bool,
    /// The certificates as installed, without keys' text (for Debug).
    served: Vec<(String, Vec<String>)>,
    /// Where those are in the table they were compiled from (for the cache).
    positions: Vec<usize>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("certificates", &self.served)
            .field("challenges", &self.challenges.len())
            .field("alpn", &self.alpn.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// `host`'s entry: the exact name, else the wildcard over its first label.
fn by_name<'a, T>(
    exact: &'a HashMap<String, T>,
    wildcard: &'a HashMap<String, T>,
    host: &str,
) -> Option<&'a T> {
    if let Some(v) = exact.get(host) {
        return Some(v);
    }
    let (label, parent) = host.split_once('.')?;
    if label.is_empty() || wildcard.is_empty() {
        return None;
    }
    wildcard.get(parent)
}

/// A name as the table gives it, lowercased without a trailing dot; `Err` unless a DNS name or
/// `*.` + a DNS name of at least two labels.
fn parse_name(name: &str) -> Result<Name, ()> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let valid = |n: &str| DnsName::try_from(n).is_ok() && n.parse::<std::net::IpAddr>().is_err();
    match name.strip_prefix("*.") {
        Some(parent) if valid(parent) && parent.contains('.') && !parent.contains('*') => {
            Ok(Name::Wildcard(parent.to_owned()))
        }
        Some(_) => Err(()),
        None if valid(&name) && !name.contains('*') => Ok(Name::Exact(name)),
        None => Err(()),
    }
}

enum Name {
    Exact(String),
    /// The parent domain.
    Wildcard(String),
}

impl Certs {
    /// Compiles `table`: the certificates that are usable, and why the others are not.
    pub(super) fn compile(table: &TlsTable) -> (Certs, Vec<TlsError>) {
        let mut certs = Certs::default();
        let mut rejected = Vec::new();
        let mut ids = HashSet::new();
        for (i, c) in table.certificates.iter().enumerate() {
            if ids.contains(c.id.as_str()) {
                // Its files in the cache would be the first one's.
                rejected.push(TlsError::DuplicateId { id: c.id.clone() });
                continue;
            }
            match certified(c) {
                Ok((key, names)) => {
                    ids.insert(c.id.as_str());
                    let key = Arc::new(key);
                    for name in names {
                        let map = match name {
                            Name::Exact(n) => certs.exact.entry(n),
                            Name::Wildcard(p) => certs.wildcard.entry(p),
                        };
                        map.or_insert_with(|| key.clone());
                    }
                    certs.served.push((c.id.clone(), c.names.clone()));
                    certs.positions.push(i);
                }
                Err(e) => rejected.push(e),
            }
        }
        for (host, p) in &table.hosts {
            let Ok(name) = parse_name(host) else {
                tracing::warn!(host = %host, "TLS host policy for something that is not a host name: ignored");
                continue;
            };
            let policy = Policy {
                redirect_http: p.redirect_http,
                hsts: p
                    .hsts
                    .and_then(|s| HeaderValue::from_str(&format!("max-age={s}")).ok()),
            };
            certs.any_redirect |= policy.redirect_http;
            certs.any_hsts |= policy.hsts.is_some();
            match name {
                Name::Exact(n) => certs.policy_exact.insert(n, policy),
                Name::Wildcard(n) => certs.policy_wildcard.insert(n, policy),
            };
        }
        certs.challenges = table
            .challenges
            .iter()
            .map(|(t, k)| (t.clone(), Bytes::from(k.clone())))
            .collect();
        for (name, digest) in &table.alpn {
            match acme_tls_alpn_certificate(name, digest) {
                Ok((name, key)) => {
                    certs.alpn.insert(name, Arc::new(key));
                }
                Err(source) => rejected.push(TlsError::Alpn {
                    name: name.clone(),
                    source,
                }),
            }
        }
        (certs, rejected)
    }

    /// The TLS-ALPN-01 answer for `host` (lowercase).
    pub(super) fn alpn(&self, host: &str) -> Option<&Arc<CertifiedKey>> {
        self.alpn.get(host)
    }

    /// The certificate for `host` (lowercase).
    pub(super) fn cert(&self, host: &str) -> Option<&Arc<CertifiedKey>> {
        by_name(&self.exact, &self.wildcard, host)
    }

    fn policy(&self, host: &str) -> Option<&Policy> {
        by_name(&self.policy_exact, &self.policy_wildcard, host)
    }

    /// Whether a plain HTTP request for `host` goes to HTTPS: its policy says so and a certificate
    /// covers it.
    pub(super) fn redirects(&self, host: &str) -> bool {
        self.any_redirect
            && self.policy(host).is_some_and(|p| p.redirect_http)
            && self.cert(host).is_some()
    }

    /// The `Strict-Transport-Security` value for HTTPS answers for `host`.
    pub(super) fn hsts(&self, host: &str) -> Option<HeaderValue> {
        if !self.any_hsts || self.cert(host).is_none() {
            return None;
        }
        self.policy(host)?.hsts.clone()
    }

    pub(super) fn any_redirect(&self) -> bool {
        self.any_redirect
    }

    pub(super) fn any_hsts(&self) -> bool {
        self.any_hsts
    }

    /// The key authorization for an ACME HTTP-01 `token`.
    pub(super) fn challenge(&self, token: &str) -> Option<Bytes> {
        self.challenges.get(token).cloned()
    }

    /// The ids of the certificates served.
    pub(super) fn ids(&self) -> impl Iterator<Item = &str> {
        self.served.iter().map(|(id, _)| id.as_str())
    }

    /// The certificates of `table` (the one these were compiled from) that are served.
    pub(super) fn served_in<'t>(&self, table: &'t TlsTable) -> Vec<&'t TlsCertificate> {
        self.positions
            .iter()
            .filter_map(|&i| table.certificates.get(i))
            .collect()
    }
}

/// `c` parsed and checked: its chain, its key, and the names it covers.
fn certified(c: &TlsCertificate) -> Result<(CertifiedKey, Vec<Name>), TlsError> {
    let id = || c.id.clone();
    let chain = CertificateDer::pem_slice_iter(c.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::ChainPem { id: id(), source })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { id: id() });
    };
    let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
        .map_err(|_| TlsError::KeyPem { id: id() })?;
    if c.names.is_empty() {
        return Err(TlsError::NoNames { id: id() });
    }
    let end_entity = webpki::EndEntityCert::try_from(leaf)
        .map_err(|source| TlsError::Leaf { id: id(), source })?;
    let mut names = Vec::with_capacity(c.names.len());
    for raw in &c.names {
        let bad = || TlsError::BadName {
            id: id(),
            name: raw.clone(),
        };
        let name = parse_name(raw).map_err(|()| bad())?;
        // A wildcard is covered when any one-label name under it is.
        let probe = match &name {
            Name::Exact(n) => n.clone(),
            Name::Wildcard(p) => format!("cairn-probe.{p}"),
        };
        let probe = ServerName::try_from(probe).map_err(|_| bad())?;
        if end_entity.verify_is_valid_for_subject_name(&probe).is_err() {
            return Err(TlsError::NotCovered {
                id: id(),
                name: raw.clone(),
            });
        }
        names.push(name);
    }
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|source| TlsError::Key { id: id(), source })?;
    Ok((key, names))
}

/// The certificate a TLS-ALPN-01 handshake for `name` gets (RFC 8737, 3): self-signed with a fresh key,
/// `name` its only subject alternative name, the critical acmeIdentifier extension holding `digest`.
/// Returns the name lowercased.
fn acme_tls_alpn_certificate(
    name: &str,
    digest: &[u8; 32],
) -> Result<(String, CertifiedKey), AlpnError> {
    let Ok(Name::Exact(name)) = parse_name(name) else {
        return Err(AlpnError::Name);
    };
    let mut params =
        rcgen::CertificateParams::new(vec![name.clone()]).map_err(AlpnError::Certificate)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(AlpnError::Certificate)?;
    let cert = params.self_signed(&key).map_err(AlpnError::Certificate)?;
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    // Not `CertifiedKey::from_der`: its check that the key fits parses the certificate with webpki,
    // which refuses the critical extension it does not know (the very extension the CA looks for).
    let signer = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(AlpnError::Key)?;
    Ok((name, CertifiedKey::new(vec![cert.der().clone()], signer)))
}

/// Whether a ClientHello is a TLS-ALPN-01 validation: it offers `acme-tls/1` and nothing else (RFC
/// 8737, 3: the CA offers only it), so the protocol negotiated is that one and no other client is
/// answered with a validation certificate.
fn only_acme_tls(hello: &ClientHello<'_>) -> bool {
    let Some(mut offered) = hello.alpn() else {
        return false;
    };
    offered.next() == Some(ACME_TLS_ALPN) && offered.next().is_none()
}

/// Picks the certificate by SNI from the installed table; no SNI, or one no certificate covers, ends
/// the handshake. A TLS-ALPN-01 validation gets the challenge's certificate for its SNI, or none.
#[derive(Debug)]
pub(super) struct Resolver {
    certs: Arc<ArcSwap<Certs>>,
    metrics: Arc<ProxyMetrics>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else {
            self.metrics.tls_unknown_name();
            tracing::debug!("TLS handshake without SNI: refused");
            return None;
        };
        let certs = self.certs.load();
        let sni = sni.trim_end_matches('.');
        let lower;
        let sni = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = sni.to_ascii_lowercase();
            lower.as_str()
        } else {
            sni
        };
        if only_acme_tls(&hello) {
            let found = certs.alpn(sni).cloned();
            match found {
                Some(_) => tracing::info!(sni, "TLS-ALPN-01 validation handshake answered"),
                None => {
                    self.metrics.tls_unknown_name();
                    tracing::debug!(
                        sni,
                        "acme-tls/1 handshake for a name without a TLS-ALPN-01 challenge: refused"
                    );
                }
            }
            return found;
        }
        let found = certs.cert(sni).cloned();
        if found.is_none() {
            self.metrics.tls_unknown_name();
            tracing::debug!(
                sni,
                "TLS handshake for a name no certificate covers: refused"
            );
        }
        found
    }
}

/// The proxy's TLS server configuration: certificates from `certs`, ALPN h2 and http/1.1 (and
/// `acme-tls/1`, last, so only a client offering nothing else gets it), TLS 1.2 and 1.3 with rustls'
/// safe defaults on ring.
pub(super) fn server_config(
    certs: Arc<ArcSwap<Certs>>,
    metrics: Arc<ProxyMetrics>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::Config)?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(Resolver { certs, metrics }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// The proxy's HTTPS listener: TCP connections whose TLS handshake runs in the connection's own task
/// (on its first read), so a slow handshake never holds up the accept loop. Made by
/// [`super::Proxy::tls_listener`].
pub struct TlsListener {
    pub(super) tcp: tokio::net::TcpListener,
    pub(super) acceptor: tokio_rustls::TlsAcceptor,
    pub(super) metrics: Arc<ProxyMetrics>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("addr", &self.tcp.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }
}

impl super::Listener for TlsListener {
    type Io = TlsIo;

    async fn accept(&mut self) -> io::Result<(TlsIo, std::net::SocketAddr)> {
        let (s, a) = self.tcp.accept().await?;
        let _ = s.set_nodelay(true);
        let io = TlsIo {
            state: State::Handshake(self.acceptor.accept(s)),
            metrics: self.metrics.clone(),
        };
        Ok((io, a))
    }

    fn scheme(&self) -> &'static str {
        "https"
    }
}

/// A TLS connection that completes its handshake on first use.
pub struct TlsIo {
    state: State,
    metrics: Arc<ProxyMetrics>,
}

impl std::fmt::Debug for TlsIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Handshake(_) => "handshake",
            State::Ready(_) => "ready",
            State::Validated(_) => "acme-tls/1",
            State::Failed => "failed",
        };
        f.debug_tuple("TlsIo").field(&state).finish()
    }
}

enum State {
    Handshake(tokio_rustls::Accept<TcpStream>),
    Ready(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A TLS-ALPN-01 validation handshake is done: nothing more is read (the HTTP server sees the end
    /// of the stream and closes it, with a close_notify).
    Validated(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Failed,
}

impl TlsIo {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let State::Handshake(accept) = &mut self.state {
            let done = ready!(Pin::new(accept).poll(cx));
            self.metrics.tls_handshake(done.is_ok());
            match done {
                Ok(s) if s.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) => {
                    self.state = State::Validated(Box::new(s));
                }
                Ok(s) => self.state = State::Ready(Box::new(s)),
                Err(e) => {
                    self.state = State::Failed;
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn stream(&mut self) -> io::Result<Pin<&mut tokio_rustls::server::TlsStream<TcpStream>>> {
        match &mut self.state {
            State::Ready(s) => Ok(Pin::new(s.as_mut())),
            State::Validated(_) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an acme-tls/1 validation connection carries no data",
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake failed",
            )),
        }
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        if let State::Validated(_) = this.state {
            return Poll::Ready(Ok(()));
        }
        this.stream()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        this.stream()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_handshake(cx))?;
        this.stream()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Ready(s) | State::Validated(s) => Pin::new(s.as_mut()).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Ready(s) | State::Validated(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// The certificate cache in the agent's data directory.
#[derive(Debug, Clone)]
pub(super) struct Cache {
    dir: PathBuf,
}

/// The cache's index: the table without keys and challenges.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    certificates: Vec<IndexEntry>,
    #[serde(default)]
    hosts: BTreeMap<String, HostPolicy>,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexEntry {
    id: String,
    names: Vec<String>,
    /// `<file>.crt.pem` and `<file>.key.pem` in the cache directory.
    file: String,
}

const INDEX: &str = "table.json";

fn cache_err(e: DataError) -> TlsError {
    TlsError::Cache(e)
}

fn data_io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Cache(DataError::Io { op, path, source })
}

impl Cache {
    pub(super) fn new(dir: PathBuf) -> Self {
        Cache { dir }
    }

    fn open(&self) -> Result<(), TlsError> {
        fs::create_dir_all(&self.dir).map_err(data_io("create", &self.dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(data_io("restrict", &self.dir))
    }

    /// The file stem of certificate `id`: a hash, so no id can name a path.
    fn stem(id: &str) -> String {
        let digest = sha2::Sha256::digest(id.as_bytes());
        hex::encode(&digest[..12])
    }

    /// Writes the `served` certificates and `table`'s host policy; deletes the files of every other
    /// certificate.
    pub(super) fn store(
        &self,
        table: &TlsTable,
        served: &[&TlsCertificate],
    ) -> Result<(), TlsError> {
        self.open()?;
        let mut index = Index {
            certificates: Vec::new(),
            hosts: table.hosts.clone(),
        };
        let mut keep: HashSet<String> = HashSet::from([INDEX.to_owned()]);
        for c in served {
            let file = Self::stem(&c.id);
            let crt = format!("{file}.crt.pem");
            let key = format!("{file}.key.pem");
            write_if_changed(&self.dir.join(&crt), c.chain_pem.as_bytes())?;
            write_if_changed(&self.dir.join(&key), c.key_pem.as_bytes())?;
            keep.insert(crt);
            keep.insert(key);
            index.certificates.push(IndexEntry {
                id: c.id.clone(),
                names: c.names.clone(),
                file,
            });
        }
        let json = serde_json::to_vec_pretty(&index).expect("the index serializes");
        write_if_changed(&self.dir.join(INDEX), &json)?;
        for entry in fs::read_dir(&self.dir).map_err(data_io("list", &self.dir))? {
            let entry = entry.map_err(data_io("list", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = name.ends_with(".pem") || name.ends_with(".tmp");
            if ours && !keep.contains(name) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::debug!(path = %path.display(), "removed a certificate file no longer installed")
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(data_io("remove", &path)(e)),
                }
            }
        }
        Ok(())
    }

    /// The cached table (no challenges); empty when there is no cache. A certificate whose files are
    /// gone or unreadable is left out (logged).
    pub(super) fn load(&self) -> Result<TlsTable, TlsError> {
        let path = self.dir.join(INDEX);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(TlsTable::default()),
            Err(e) => return Err(data_io("read", &path)(e)),
        };
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|source| TlsError::Index { path, source })?;
        let mut table = TlsTable {
            hosts: index.hosts,
            ..TlsTable::default()
        };
        for e in index.certificates {
            let crt = self.dir.join(format!("{}.crt.pem", e.file));
            let key = self.dir.join(format!("{}.key.pem", e.file));
            let read = || -> io::Result<(String, Zeroizing<String>)> {
                let chain = fs::read_to_string(&crt)?;
                let key = Zeroizing::new(fs::read_to_string(&key)?);
                Ok((chain, key))
            };
            match read() {
                Ok((chain_pem, key_pem)) => table.certificates.push(TlsCertificate {
                    id: e.id,
                    names: e.names,
                    chain_pem,
                    key_pem,
                }),
                Err(error) => {
                    tracing::warn!(id = %e.id, error = %error, "a cached certificate's files cannot be read: left out");
                }
            }
        }
        Ok(table)
    }
}

/// Writes `bytes` to `path` (0600, whole) unless it already holds them.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    if let Ok(old) = fs::read(path) {
        let old = Zeroizing::new(old);
        let private = fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 == 0);
        if *old == bytes && private {
            return Ok(());
        }
    }
    write_private(path, bytes).map_err(cache_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(keys: &[&str]) -> HashMap<String, u32> {
        keys.iter().map(|k| ((*k).to_owned(), 1)).collect()
    }

    #[test]
    fn a_wildcard_covers_exactly_one_label() {
        let exact = map(&["shop.example.com"]);
        let wild = map(&["example.com"]);
        assert!(by_name(&exact, &wild, "shop.example.com").is_some());
        assert!(by_name(&exact, &wild, "a.example.com").is_some());
        assert!(by_name(&exact, &wild, "a.b.example.com").is_none());
        assert!(by_name(&exact, &wild, "example.com").is_none());
        assert!(by_name(&exact, &wild, ".example.com").is_none());
    }

    #[test]
    fn names_are_host_names_or_one_label_wildcards() {
        assert!(
            matches!(parse_name("Shop.Example.COM."), Ok(Name::Exact(n)) if n == "shop.example.com")
        );
        assert!(matches!(parse_name("*.example.com"), Ok(Name::Wildcard(p)) if p == "example.com"));
        for bad in [
            "*.com",
            "*",
            "a.*.example.com",
            "**.example.com",
            "10.0.0.1",
            "",
            "a b.com",
        ] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_prints_the_key() {
        let c = TlsCertificate {
            id: "shop".into(),
            names: vec!["shop.example.com".into()],
            chain_pem: "chain".into(),
            key_pem: Zeroizing::new("-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES".into()),
        };
        let text = format!(
            "{c:?} {:?}",
            TlsTable {
                certificates: vec![c.clone()],
                ..TlsTable::default()
            }
        );
        assert!(!text.contains("SECRETKEYBYTES"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
