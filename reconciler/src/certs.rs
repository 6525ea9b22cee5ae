//! Certificates for the declared names, from an ACME CA (RFC 8555; HTTP-01, or TLS-ALPN-01 of RFC 8737):
//! the control plane's side.
//!
//! For every declared name set (an app's `<app>.<base_domain>` and `domains`, when its `tls` is
//! `"auto"`; [`cairn_schema::Desired::acme_name_sets`], stored by [`declare`]) the [`CertWorker`]:
//!
//! 1. claims the name set ([`store::certs::claim`]: `FOR UPDATE SKIP LOCKED` and a lease, so one order
//!    per name set runs at a time across control planes);
//! 2. probes every name first: a random token goes into the [`Challenges`] set every ingress node serves
//!    at `/.well-known/acme-challenge/`, and each address the name resolves to must answer it over plain
//!    HTTP. A name that does not reach the cluster never reaches the CA (its rate limits are spent on
//!    nothing): the name set waits (`waiting_dns`, with the reason) and is probed again with exponential
//!    backoff and jitter;
//! 3. orders with instant-acme, answers the challenges through the same [`Challenges`] (HTTP-01: the
//!    token's key authorization; TLS-ALPN-01: its digest, which every ingress node's TLS listener puts
//!    into the certificate it answers an `acme-tls/1` handshake for the name with), finalizes
//!    with a fresh key (rcgen, inside instant-acme), and stores the chain with the key sealed to the
//!    control plane's age recipient. The previous certificate stays until the new one replaces it in the
//!    same statement. Renewal is due at a random moment of the window the CA suggests for it when its
//!    directory offers renewal information (ARI, RFC 9773), else at two thirds of the lifetime minus
//!    jitter ([`renewal_time`]); a renewal order names the certificate it replaces when the CA offers ARI.
//!    A failure is retried with exponential backoff and jitter, the old certificate still served.
//!
//! The ACME account (per directory) is created once and its credentials stored sealed the same way.
//!
//! What it must not do: order a name that is not declared (never on demand for an SNI), hold a database
//! transaction while it talks to the CA or probes, put a private key into a log, an error or a column in
//! plaintext, or carry a certificate to the nodes itself (the route table does that, sealed per node).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use cairn_schema::error::chain;
use cairn_schema::secret::encrypt;
use cairn_schema::{Challenge, Ciphertext, Desired, Identity, SecretError};
use chrono::{DateTime, Utc};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, CertificateIdentifier,
    ChallengeType, HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rand::Rng as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::store::certs::{self as store, CertRow, CertState, Outcome};
use crate::store::{Op as _, StoreError};

/// Where ACME HTTP-01 tokens are answered: `GET /.well-known/acme-challenge/<token>`.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// A certificate expiring sooner than this is a warning (status, `cairn certs`, the log).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The ACME answers every ingress node must give: HTTP-01 tokens (and the self-probe's) and
/// TLS-ALPN-01 digests, as this replica's worker puts them up. Cheap to clone (one shared set); every
/// change is published to [`Challenges::subscribe`]rs: `routes::refresh_loop` stores the set
/// (`store::tls`), from which every replica's route table takes the answers to its agents.
#[derive(Debug, Clone)]
pub struct Challenges {
    tx: Arc<watch::Sender<Arc<ChallengeSet>>>,
}

/// The answers in flight at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChallengeSet {
    /// HTTP-01: token to key authorization, served at `/.well-known/acme-challenge/<token>`.
    pub http: BTreeMap<String, String>,
    /// TLS-ALPN-01: name to the hex SHA-256 digest of the key authorization, put into the
    /// acmeIdentifier extension of the certificate an `acme-tls/1` handshake for the name gets.
    pub alpn: BTreeMap<String, String>,
}

impl ChallengeSet {
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.alpn.is_empty()
    }
}

impl Default for Challenges {
    fn default() -> Self {
        Challenges::new()
    }
}

impl Challenges {
    pub fn new() -> Challenges {
        let (tx, _) = watch::channel(Arc::new(ChallengeSet::default()));
        Challenges { tx: Arc::new(tx) }
    }

    /// Answers `token` with `key_authorization` from now on.
    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.tx.send_modify(|m| {
            Arc::make_mut(m)
                .http
                .insert(token.to_owned(), key_authorization.to_owned());
        });
    }

    /// Stops answering `token`.
    pub fn remove(&self, token: &str) {
        self.tx
            .send_if_modified(|m| Arc::make_mut(m).http.remove(token).is_some());
    }

    /// Answers a TLS-ALPN-01 handshake for `name` with `digest` (the key authorization's SHA-256) from
    /// now on.
    pub fn insert_alpn(&self, name: &str, digest: &[u8]) {
        self.tx.send_modify(|m| {
            Arc::make_mut(m)
                .alpn
                .insert(name.to_ascii_lowercase(), hex::encode(digest));
        });
    }

    /// Stops answering TLS-ALPN-01 handshakes for `name`.
    pub fn remove_alpn(&self, name: &str) {
        let name = name.to_ascii_lowercase();
        self.tx
            .send_if_modified(|m| Arc::make_mut(m).alpn.remove(&name).is_some());
    }

    /// The key authorization for `token`, if it is answered.
    pub fn get(&self, token: &str) -> Option<String> {
        self.tx.borrow().http.get(token).cloned()
    }

    /// Every answer now.
    pub fn current(&self) -> Arc<ChallengeSet> {
        self.tx.borrow().clone()
    }

    /// Notified with the whole set on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ChallengeSet>> {
        self.tx.subscribe()
    }

    /// An HTTP router answering `GET /.well-known/acme-challenge/<token>` from this set (404 for any
    /// other token): what an ingress node serves on port 80, and what tests serve.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/.well-known/acme-challenge/{token}", get(answer))
            .with_state(self.clone())
    }
}

async fn answer(State(c): State<Challenges>, Path(token): Path<String>) -> Response {
    match c.get(&token) {
        Some(ka) => ([(header::CONTENT_TYPE, "application/octet-stream")], ka).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Resolves a name to the addresses a client would connect to.
pub type Resolve = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>
        + Send
        + Sync,
>;

/// The system resolver (`getaddrinfo`).
pub fn system_resolve() -> Resolve {
    Arc::new(|name: String| {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((name.as_str(), 80)).await?;
            let mut v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            v.sort();
            v.dedup();
            Ok(v)
        })
    })
}

/// Why a certificate could not be ordered or stored. Never holds a key.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot seal a key to the control plane's recipient")]
    Seal(#[source] SecretError),
    #[error("cannot open the stored ACME account of {directory}")]
    Unseal {
        directory: String,
        #[source]
        source: SecretError,
    },
    #[error("the stored ACME account of {directory} is damaged: {detail}")]
    Account { directory: String, detail: String },
    #[error("cannot read the CA roots: {0}")]
    Roots(String),
    #[error("{step} at {directory}")]
    Acme {
        step: &'static str,
        directory: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("the order for {names} ended {status}{problem}")]
    Order {
        names: String,
        status: String,
        problem: String,
    },
    #[error("the CA issued a certificate this control plane cannot read: {0}")]
    Certificate(String),
}

/// How the worker reaches the names and the CA.
#[derive(Clone)]
pub struct CertSettings {
    /// The ACME directory new name sets are ordered from (cairn.toml's `acme_directory`).
    pub directory: String,
    /// The account's contact email (cairn.toml's `contact`), without `mailto:`.
    pub contact: Option<String>,
    /// How the CA validates the names (cairn.toml's `challenge`).
    pub challenge: Challenge,
    /// Root certificates (PEM) to trust for the directory instead of the system's (`ca_roots`).
    pub ca_roots_pem: Option<String>,
    /// The port the self-probe connects to (80: where the ingress nodes answer HTTP-01).
    pub probe_port: u16,
    /// How the self-probe resolves a name.
    pub resolve: Resolve,
    /// How long one probe request may take.
    pub probe_timeout: Duration,
    /// How long a token just added may take to be served by the ingress nodes (it travels with the
    /// route table) before a probe or a challenge gives up on it.
    pub propagation: Duration,
    /// The first retry after a failure; doubled per failure in a row up to `retry_max`, with jitter.
    pub retry_first: Duration,
    pub retry_max: Duration,
    /// How long a claim holds a name set: longer than an order takes.
    pub lease: Duration,
    /// How long the CA may take to validate and to issue.
    pub order_timeout: Duration,
    /// How many name sets one worker works on at once: a name whose probe waits out `propagation`, or an
    /// order the CA is slow to validate, holds up only its own slot.
    pub parallel: usize,
}

impl std::fmt::Debug for CertSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSettings")
            .field("directory", &self.directory)
            .field("contact", &self.contact)
            .field("challenge", &self.challenge)
            .field("ca_roots", &self.ca_roots_pem.is_some())
            .field("probe_port", &self.probe_port)
            .finish_non_exhaustive()
    }
}

impl CertSettings {
    pub fn new(directory: impl Into<String>) -> CertSettings {
        CertSettings {
            directory: directory.into(),
            contact: None,
            challenge: Challenge::Http01,
            ca_roots_pem: None,
            probe_port: 80,
            resolve: system_resolve(),
            probe_timeout: Duration::from_secs(5),
            propagation: Duration::from_secs(10),
            retry_first: Duration::from_secs(30),
            retry_max: Duration::from_secs(6 * 3600),
            lease: Duration::from_secs(10 * 60),
            order_timeout: Duration::from_secs(120),
            parallel: 8,
        }
    }

    /// From a valid snapshot's `[tls]`, with its `ca_roots` file as the source read it; `None` without
    /// `[tls]` (or when the snapshot is invalid). The probe and retry settings are the defaults.
    pub fn from_snapshot(snap: &crate::source::Snapshot) -> Option<CertSettings> {
        let tls = snap.loaded.desired.as_ref()?.settings.tls.as_ref()?;
        let roots = tls
            .ca_roots
            .as_ref()
            .and_then(|p| snap.referenced.get(p.as_str()))
            .map(|b| String::from_utf8_lossy(b).into_owned());
        Some(CertSettings::from_tls(tls, roots))
    }

    /// From cairn.toml's `[tls]` (`ca_roots_pem`: the contents of its `ca_roots` file, read by the caller).
    pub fn from_tls(tls: &cairn_schema::TlsSettings, ca_roots_pem: Option<String>) -> CertSettings {
        let mut s = CertSettings::new(tls.acme_directory.as_str());
        s.contact = tls.contact.as_ref().map(|c| c.as_str().to_owned());
        s.ca_roots_pem = ca_roots_pem;
        s.challenge = tls.challenge;
        s
    }
}

/// Stores the name sets `desired` declares (none without `[tls]`) as the ones to keep certificates for.
pub async fn declare(pool: &PgPool, desired: &Desired) -> Result<(), StoreError> {
    let directory = match &desired.settings.tls {
        Some(t) => t.acme_directory.as_str().to_owned(),
        None => cairn_schema::model::LETS_ENCRYPT.to_owned(),
    };
    let sets: Vec<store::Declared> = desired
        .acme_name_sets()
        .into_iter()
        .map(|(app, names)| store::Declared {
            app: app.to_string(),
            names,
        })
        .collect();
    store::declare(pool, &directory, &sets).await
}

/// A node came online (`wake`: the certificate loop's): the name sets waiting for DNS are probed again
/// now rather than after their backoff, since the self-probe may have failed only because no ingress node
/// served its token yet (a cluster whose nodes join after the first apply). Costs a probe, never an
/// order: a name still pointing elsewhere waits again with its next backoff.
pub async fn node_online(pool: &PgPool, wake: &tokio::sync::Notify) -> Result<(), StoreError> {
    let n = store::retry_waiting_dns(pool).await?;
    if n > 0 {
        tracing::info!(
            name_sets = n,
            "a node came online: certificates waiting for DNS are probed again now"
        );
        wake.notify_one();
    }
    Ok(())
}

/// Every declared name set's certificate as `cairn certs` and `GET /api/v1/certs` show it (no key).
pub async fn list(pool: &PgPool) -> Result<Vec<cairn_proto::admin::CertificateInfo>, StoreError> {
    let now = Utc::now();
    Ok(store::list(pool)
        .await?
        .into_iter()
        .filter(|r| r.declared)
        .map(|r| cairn_proto::admin::CertificateInfo {
            expires_soon: r.not_after.is_some_and(|t| expires_soon(t, now)),
            app: r.app,
            names: r.names,
            state: r.state.as_str().to_owned(),
            issuer: r.issuer,
            serial: r.serial,
            not_after: r.not_after,
            last_error: r.last_error,
            attempts: r.attempts,
            next_attempt_at: r.next_attempt_at,
            issued_at: r.issued_at,
        })
        .collect())
}

/// One line per certificate that needs attention, for `cairn status`: waiting for DNS or failed (with
/// why), or expiring within 14 days.
pub fn warnings(certs: &[cairn_proto::admin::CertificateInfo]) -> Vec<String> {
    let mut out = Vec::new();
    for c in certs {
        let names = c.names.join(", ");
        let why = c.last_error.as_deref().unwrap_or("no reason recorded");
        match c.state.as_str() {
            "waiting_dns" => out.push(format!("{names} ({}): waiting for DNS: {why}", c.app)),
            "failed" => out.push(format!("{names} ({}): failed: {why}", c.app)),
            _ => {}
        }
        if c.expires_soon
            && let Some(t) = c.not_after
        {
            out.push(format!(
                "{names} ({}): expires {}, within 14 days",
                c.app,
                t.format("%Y-%m-%d %H:%M UTC")
            ));
        }
    }
    out
}

/// The issuance loop's state: run [`CertWorker::pass`] on a [`crate::worker::Worker`].
pub struct CertWorker {
    pool: PgPool,
    identity: Arc<Identity>,
    challenges: Challenges,
    settings: CertSettings,
    owner: Uuid,
    /// ACME accounts by directory. Held across an account's creation, so concurrent attempts on one
    /// directory create one account.
    accounts: tokio::sync::Mutex<HashMap<String, Account>>,
    probe: reqwest::Client,
}

impl std::fmt::Debug for CertWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertWorker")
            .field("owner", &self.owner)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The outcome of one name set's attempt, for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub names: Vec<String>,
    pub state: CertState,
}

impl CertWorker {
    pub fn new(
        pool: PgPool,
        identity: Arc<Identity>,
        challenges: Challenges,
        settings: CertSettings,
    ) -> CertWorker {
        let probe = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.probe_timeout)
            .no_proxy()
            .build()
            .expect("a client without TLS settings builds");
        CertWorker {
            pool,
            identity,
            challenges,
            settings,
            owner: Uuid::new_v4(),
            accounts: tokio::sync::Mutex::new(HashMap::new()),
            probe,
        }
    }

    /// One pass: every due name set is worked on in turn. Returns when the next one is due (for
    /// [`crate::worker::Pass`]).
    pub async fn pass(&mut self) -> Result<Option<Duration>, CertError> {
        self.run_due().await?;
        self.announce_expiring().await?;
        Ok(store::next_due(&self.pool).await?)
    }

    /// Works on every due name set, up to [`CertSettings::parallel`] at once (each claimed before it is
    /// started, so other control planes take the rest); what happened to each.
    pub async fn run_due(&mut self) -> Result<Vec<Attempt>, CertError> {
        let this = &*self;
        // Each slot claims and works until nothing is due. The slots are polled together and nothing
        // else is awaited meanwhile: an attempt suspended in the middle of a query holds a connection,
        // and a claim awaited beside it could wait for that connection forever.
        let slot = |_| async move {
            let mut done = Vec::new();
            loop {
                let row = match store::claim(&this.pool, this.owner, this.settings.lease).await {
                    Ok(Some(row)) => row,
                    Ok(None) => return (done, None),
                    Err(e) => return (done, Some(CertError::from(e))),
                };
                match this.attempt(&row).await {
                    Ok(state) => done.push(Attempt {
                        names: row.names,
                        state,
                    }),
                    Err(e) => return (done, Some(e)),
                }
            }
        };
        let slots =
            futures_util::future::join_all((0..this.settings.parallel.max(1)).map(slot)).await;
        let mut out = Vec::new();
        let mut failed = None;
        for (done, error) in slots {
            out.extend(done);
            if let Some(e) = error {
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    async fn attempt(&self, row: &CertRow) -> Result<CertState, CertError> {
        let names = row.names.join(", ");
        if let Err(reason) = self.probe_names(&row.names).await {
            tracing::warn!(
                names,
                reason,
                "certificate waits: a name does not reach the cluster"
            );
            let outcome = Outcome::Failed {
                state: CertState::WaitingDns,
                error: reason,
                next: self.retry_at(row.attempts),
            };
            self.finish(row, &outcome).await?;
            return Ok(CertState::WaitingDns);
        }
        let renewing = row.chain_pem.is_some();
        let during = if renewing {
            CertState::Renewing
        } else {
            CertState::Ordering
        };
        if !store::mark(&self.pool, &row.names, self.owner, during).await? {
            return Ok(row.state);
        }
        let ordered = self
            .order(&row.directory, &row.names, row.chain_pem.as_deref())
            .await;
        let outcome = match ordered {
            Ok(Ordered {
                cert,
                window,
                replaced,
            }) => {
                let renew_at = renewal_time(window, cert.not_before, cert.not_after, Utc::now());
                tracing::info!(
                    names,
                    serial = cert.serial,
                    not_after = %cert.not_after,
                    %renew_at,
                    renewal_window = window.is_some(),
                    replaced,
                    "certificate issued"
                );
                Outcome::Issued { cert, renew_at }
            }
            Err(e) => {
                let error = chain(&e);
                tracing::warn!(names, error, renewing, "certificate order failed");
                Outcome::Failed {
                    state: CertState::Failed,
                    error,
                    next: self.retry_at(row.attempts),
                }
            }
        };
        let state = match &outcome {
            Outcome::Issued { .. } => CertState::Issued,
            _ => CertState::Failed,
        };
        if !self.finish(row, &outcome).await? {
            tracing::warn!(
                names,
                "certificate lease lost before its outcome was stored"
            );
        }
        Ok(state)
    }

    /// Records a `certificate.expiring` event for each certificate that now expires within 14 days,
    /// once per certificate (its serial). Several control planes may announce one at once; the check and
    /// the event share a transaction, so at worst one is announced twice.
    pub async fn announce_expiring(&self) -> Result<usize, CertError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .op("begin announcing expiring certificates")?;
        let soon = Utc::now() + to_chrono(EXPIRY_WARNING);
        let due = store::expiring_unannounced(&mut tx, soon).await?;
        let events: Vec<crate::events::NewEvent> = due
            .iter()
            .map(|(app, names, serial, not_after)| {
                crate::events::NewEvent::certificate_expiring(app, names, serial, *not_after)
            })
            .collect();
        crate::events::record(&mut tx, &events).await?;
        tx.commit().await.op("announce expiring certificates")?;
        Ok(events.len())
    }

    /// Stores an attempt's outcome while the lease is still this worker's and, for the first failure in
    /// a row (the name set had no failed attempt before), a `certificate.failed` event, in one
    /// transaction: a retry failing again is counted on the row, not announced again.
    async fn finish(&self, row: &CertRow, outcome: &Outcome) -> Result<bool, CertError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .op("begin recording a certificate attempt")?;
        let stored = store::finish(&mut *tx, &row.names, self.owner, outcome).await?;
        if stored
            && row.attempts == 0
            && let Outcome::Failed { state, error, .. } = outcome
        {
            let event = crate::events::NewEvent::certificate_failed(
                &row.app,
                &row.names,
                state.as_str(),
                error,
            );
            crate::events::record(&mut tx, &[event]).await?;
        }
        tx.commit().await.op("record a certificate attempt")?;
        Ok(stored)
    }

    fn retry_at(&self, attempts: u32) -> DateTime<Utc> {
        Utc::now()
            + to_chrono(backoff(
                self.settings.retry_first,
                self.settings.retry_max,
                attempts,
            ))
    }

    /// Whether every name reaches a node serving [`Challenges`]: each address it resolves to must answer
    /// a fresh token with its key authorization. The reason when not.
    async fn probe_names(&self, names: &[String]) -> Result<(), String> {
        let token = random_token();
        let expected = format!("cairn-probe.{}", random_token());
        self.challenges.insert(&token, &expected);
        let result = self.probe_until(names, &token, &expected).await;
        self.challenges.remove(&token);
        result
    }

    /// [`Self::probe_with`] again until it succeeds or [`CertSettings::propagation`] passed: a token
    /// just added reaches the ingress nodes with the next route table, a long-poll round trip later.
    async fn probe_until(
        &self,
        names: &[String],
        token: &str,
        expected: &str,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.settings.propagation;
        loop {
            match self.probe_with(names, token, expected).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn probe_with(
        &self,
        names: &[String],
        token: &str,
        expected: &str,
    ) -> Result<(), String> {
        for name in names {
            let addrs = (self.settings.resolve)(name.clone())
                .await
                .map_err(|e| format!("`{name}` does not resolve: {e}"))?;
            if addrs.is_empty() {
                return Err(format!("`{name}` has no address (no A or AAAA record)"));
            }
            for ip in addrs {
                let host = match ip {
                    IpAddr::V4(v4) => v4.to_string(),
                    IpAddr::V6(v6) => format!("[{v6}]"),
                };
                let url = format!(
                    "http://{host}:{}{CHALLENGE_PREFIX}{token}",
                    self.settings.probe_port
                );
                let why = match self
                    .probe
                    .get(&url)
                    .header("host", name.as_str())
                    .send()
                    .await
                {
                    Err(e) if e.is_timeout() => "did not answer in time".to_owned(),
                    Err(e) if e.is_connect() => {
                        "refused the connection or is unreachable".to_owned()
                    }
                    Err(_) => "failed the request".to_owned(),
                    Ok(rsp) if !rsp.status().is_success() => {
                        format!("answered {} instead of the token", rsp.status().as_u16())
                    }
                    Ok(rsp) => match bounded_body(rsp, expected.len()).await {
                        Ok(b) if b == expected.as_bytes() => continue,
                        Ok(_) => {
                            "answered something else than the token: not a node of this cluster"
                                .to_owned()
                        }
                        Err(_) => "broke off its answer".to_owned(),
                    },
                };
                return Err(format!(
                    "`{name}` resolves to {ip}, which {why} at {CHALLENGE_PREFIX} (port {}): point its DNS at the ingress nodes",
                    self.settings.probe_port
                ));
            }
        }
        Ok(())
    }

    /// The account on `directory`: cached, else the stored one, else a new one (stored sealed).
    async fn account(&self, directory: &str) -> Result<Account, CertError> {
        let mut accounts = self.accounts.lock().await;
        if let Some(a) = accounts.get(directory) {
            return Ok(a.clone());
        }
        let acme = |step| {
            move |source| CertError::Acme {
                step,
                directory: directory.to_owned(),
                source,
            }
        };
        let account = match store::account(&self.pool, directory).await? {
            Some(sealed) => self.open_account(directory, &sealed).await?,
            None => {
                let contact = self
                    .settings
                    .contact
                    .as_ref()
                    .map(|c| format!("mailto:{c}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let (account, creds) = Account::builder_with_http(self.http()?)
                    .create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        directory.to_owned(),
                        None,
                    )
                    .await
                    .map_err(acme("cannot create an ACME account"))?;
                let json =
                    Zeroizing::new(serde_json::to_vec(&creds).map_err(|e| CertError::Account {
                        directory: directory.to_owned(),
                        detail: e.to_string(),
                    })?);
                let sealed = self.seal(&json)?;
                let stored = store::store_account(&self.pool, directory, sealed.as_str()).await?;
                if stored == sealed.as_str() {
                    account
                } else {
                    // Another control plane stored its account first: use that one.
                    self.open_account(directory, &stored).await?
                }
            }
        };
        accounts.insert(directory.to_owned(), account.clone());
        Ok(account)
    }

    async fn open_account(&self, directory: &str, sealed: &str) -> Result<Account, CertError> {
        let damaged = |detail: String| CertError::Account {
            directory: directory.to_owned(),
            detail,
        };
        let ct = Ciphertext::new(sealed).map_err(|e| damaged(e.to_string()))?;
        let plain = self
            .identity
            .decrypt(&ct)
            .map_err(|source| CertError::Unseal {
                directory: directory.to_owned(),
                source,
            })?;
        let creds: AccountCredentials = serde_json::from_slice(plain.expose())
            .map_err(|_| damaged("not account credentials".into()))?;
        Account::builder_with_http(self.http()?)
            .from_credentials(creds)
            .await
            .map_err(|source| CertError::Acme {
                step: "cannot open the ACME account",
                directory: directory.to_owned(),
                source,
            })
    }

    fn seal(&self, plaintext: &[u8]) -> Result<Ciphertext, CertError> {
        encrypt(plaintext, &[self.identity.recipient()]).map_err(CertError::Seal)
    }

    /// An HTTP client for the CA trusting `ca_roots` (else the system's roots).
    fn http(&self) -> Result<Box<dyn HttpClient>, CertError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.settings.ca_roots_pem {
            Some(pem) => {
                for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let c = c.map_err(|e| CertError::Roots(e.to_string()))?;
                    roots.add(c).map_err(|e| CertError::Roots(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(CertError::Roots("the PEM file holds no certificate".into()));
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CertError::Roots(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, BodyWrapper<Bytes>>(https);
        Ok(Box::new(client))
    }

    /// Orders a certificate for `names` (a renewal of `previous`, the current chain, when there is one)
    /// and returns it with its key sealed, and the CA's suggested renewal window for it.
    async fn order(
        &self,
        directory: &str,
        names: &[String],
        previous: Option<&str>,
    ) -> Result<Ordered, CertError> {
        let account = self.account(directory).await?;
        let acme = |step| {
            move |source| CertError::Acme {
                step,
                directory: directory.to_owned(),
                source,
            }
        };
        let ids: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        // A renewal names the certificate it replaces when the CA offers ARI and knows that
        // certificate (it may then allow the renewal past rate limits, RFC 9773 5).
        let replaces = match previous.map(certificate_id) {
            Some(Ok(id)) => match renewal_window(&account, &id).await {
                Ok(Some(_)) => Some(id),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(names = names.join(", "), error = %chain(&e), "the CA's renewal info for the current certificate cannot be read: renewing without `replaces`");
                    None
                }
            },
            _ => None,
        };
        let mut placed = match &replaces {
            Some(id) => {
                account
                    .new_order(&NewOrder::new(&ids).replaces(id.clone()))
                    .await
            }
            None => account.new_order(&NewOrder::new(&ids)).await,
        };
        if replaces.is_some() && is_problem(&placed, ":alreadyReplaced") {
            // An earlier order (one that failed, say) already replaces it: order without the hint.
            placed = account.new_order(&NewOrder::new(&ids)).await;
        }
        let mut order = match placed {
            Ok(o) => o,
            Err(e) => {
                if let instant_acme::Error::Api(p) = &e
                    && p.r#type
                        .as_deref()
                        .is_some_and(|t| t.ends_with(":accountDoesNotExist"))
                {
                    // The CA forgot the account (a test CA restarted, an account deactivated): the
                    // next attempt creates a new one.
                    self.accounts.lock().await.remove(directory);
                    store::forget_account(&self.pool, directory).await?;
                }
                return Err(acme("cannot place an order")(e));
            }
        };
        let mut tokens = Vec::new();
        let mut alpn_names = Vec::new();
        let kind = self.settings.challenge;
        let answered = async {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a.map_err(acme("cannot read an authorization"))?;
                match a.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => {
                        return Err(CertError::Order {
                            names: names.join(", "),
                            status: format!("with an authorization {other:?}"),
                            problem: String::new(),
                        });
                    }
                }
                let ty = match kind {
                    Challenge::Http01 => ChallengeType::Http01,
                    Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                };
                let mut ch = a.challenge(ty).ok_or_else(|| CertError::Order {
                    names: names.join(", "),
                    status: format!("without a {} challenge", kind.as_str()),
                    problem: String::new(),
                })?;
                let ka = ch.key_authorization();
                let (token, expected) = match kind {
                    Challenge::Http01 => (ch.token.clone(), ka.as_str().to_owned()),
                    Challenge::TlsAlpn01 => {
                        let Identifier::Dns(name) = ch.identifier().identifier else {
                            return Err(CertError::Order {
                                names: names.join(", "),
                                status: "with an authorization for something else than a name"
                                    .into(),
                                problem: String::new(),
                            });
                        };
                        let name = name.clone();
                        self.challenges.insert_alpn(&name, ka.digest().as_ref());
                        alpn_names.push(name);
                        // The digest travels in the same TLS table as the HTTP-01 tokens and a node
                        // installs a table whole: a node serving this token, added after the digest,
                        // answers the digest too.
                        (random_token(), format!("cairn-probe.{}", random_token()))
                    }
                };
                self.challenges.insert(&token, &expected);
                tokens.push(token.clone());
                // Tell the CA only once the ingress nodes serve the answer: it validates at once.
                if let Err(problem) = self.probe_until(names, &token, &expected).await {
                    return Err(CertError::Order {
                        names: names.join(", "),
                        status: "before validation: the ingress nodes did not serve the challenge"
                            .into(),
                        problem,
                    });
                }
                ch.set_ready()
                    .await
                    .map_err(acme("cannot answer a challenge"))?;
            }
            let retry = RetryPolicy::new()
                .initial_delay(Duration::from_millis(250))
                .timeout(self.settings.order_timeout);
            order
                .poll_ready(&retry)
                .await
                .map_err(acme("cannot follow the order"))
        }
        .await;
        for t in &tokens {
            self.challenges.remove(t);
        }
        for n in &alpn_names {
            self.challenges.remove_alpn(n);
        }
        let status = answered?;
        if status != OrderStatus::Ready {
            let mut problems: Vec<String> = order
                .state()
                .error
                .as_ref()
                .map(|p| p.detail.clone().unwrap_or_else(|| p.to_string()))
                .into_iter()
                .collect();
            problems.extend(challenge_problems(&mut order).await);
            let problem = if problems.is_empty() {
                String::new()
            } else {
                format!(": {}", problems.join("; "))
            };
            return Err(CertError::Order {
                names: names.join(", "),
                status: format!("{status:?}").to_lowercase(),
                problem,
            });
        }
        let key_pem = Zeroizing::new(
            order
                .finalize()
                .await
                .map_err(acme("cannot finalize the order"))?,
        );
        let retry = RetryPolicy::new().timeout(self.settings.order_timeout);
        let chain_pem = order
            .poll_certificate(&retry)
            .await
            .map_err(acme("cannot fetch the certificate"))?;
        let info = leaf_info(&chain_pem)?;
        let key_sealed = self.seal(key_pem.as_bytes())?;
        let window = match certificate_id(&chain_pem) {
            Ok(id) => renewal_window(&account, &id).await.unwrap_or_else(|e| {
                tracing::warn!(names = names.join(", "), error = %chain(&e), "the CA's renewal info cannot be read: renewing at two thirds of the lifetime");
                None
            }),
            Err(e) => {
                tracing::debug!(names = names.join(", "), error = e, "the certificate names no authority key: no renewal info is asked for");
                None
            }
        };
        Ok(Ordered {
            cert: store::Issued {
                chain_pem,
                key_sealed: key_sealed.as_str().to_owned(),
                serial: info.serial,
                issuer: info.issuer,
                not_before: info.not_before,
                not_after: info.not_after,
            },
            window,
            replaced: replaces.is_some(),
        })
    }
}

impl crate::worker::Pass for CertWorker {
    type Error = CertError;
    fn run(
        &mut self,
        _woken: crate::worker::Woken,
    ) -> impl Future<Output = Result<Option<Duration>, CertError>> + Send {
        self.pass()
    }
}

/// Runs the issuance loop until `shutdown`: a pass at once, whenever `wake` is notified (a new applied
/// state declared names), and when the next name set is due (at most `period` apart). A pass under way
/// is abandoned at shutdown: its lease expires and another control plane takes over.
/// `passes` is a [`CertWorker`] of fixed settings, or [`serve_loop`]'s, which follows the applied ones.
pub async fn run<P: crate::worker::Pass>(
    passes: P,
    wake: Arc<tokio::sync::Notify>,
    period: Duration,
    shutdown: &crate::worker::Shutdown,
) {
    crate::worker::Worker::new("ordering certificates", period)
        .woken_by(wake)
        .backoff(Duration::from_secs(5))
        .abandon_at_shutdown()
        .run(shutdown, passes)
        .await;
}

/// What the CA found wrong with each name's challenge (the reason an order went invalid: "connection
/// refused", a wrong answer), best effort.
async fn challenge_problems(order: &mut instant_acme::Order) -> Vec<String> {
    let mut out = Vec::new();
    let mut authzs = order.authorizations();
    while let Some(Ok(mut a)) = authzs.next().await {
        if a.refresh().await.is_err() {
            continue;
        }
        let id = a.identifier().to_string();
        for c in &a.challenges {
            if let Some(p) = &c.error {
                let what = p.detail.clone().unwrap_or_else(|| p.to_string());
                out.push(format!("{id}: {what}"));
            }
        }
    }
    out
}

/// A response body up to `limit + 1` bytes (enough to tell it from an answer of `limit` bytes): whatever
/// a name points at cannot make the probe read without end.
async fn bounded_body(mut rsp: reqwest::Response, limit: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = rsp.chunk().await? {
        out.extend_from_slice(&chunk[..chunk.len().min(limit + 1 - out.len())]);
        if out.len() > limit {
            break;
        }
    }
    Ok(out)
}

/// What a certificate chain's leaf says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub serial: String,
    pub issuer: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// Its DNS subject alternative names.
    pub names: Vec<String>,
}

/// Reads the leaf (the first certificate) of a PEM chain.
pub fn leaf_info(chain_pem: &str) -> Result<LeafInfo, CertError> {
    let bad = |e: String| CertError::Certificate(e);
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or_else(|| bad("no certificate in the chain".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    let time = |t: x509_parser::time::ASN1Time| {
        DateTime::<Utc>::from_timestamp(t.timestamp(), 0)
            .ok_or_else(|| bad("a date out of range".into()))
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    Ok(LeafInfo {
        serial: cert.raw_serial_as_string().replace(':', ""),
        issuer: cert.issuer().to_string(),
        not_before: time(cert.validity().not_before)?,
        not_after: time(cert.validity().not_after)?,
        names,
    })
}

/// When a certificate valid from `not_before` to `not_after` is renewed: at two thirds of its lifetime,
/// minus up to a twentieth of it at random (so certificates issued together do not renew together).
pub fn renew_at(not_before: DateTime<Utc>, not_after: DateTime<Utc>) -> DateTime<Utc> {
    let life = (not_after - not_before).max(chrono::TimeDelta::zero());
    let jitter = rand::thread_rng().gen_range(0.0..0.05);
    let at = life.as_seconds_f64() * (2.0 / 3.0 - jitter);
    not_before + chrono::TimeDelta::milliseconds((at * 1000.0) as i64)
}

/// A renewal window the CA suggested for a certificate (ARI, RFC 9773 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// When a certificate valid from `not_before` to `not_after` is renewed, at `now`: at a uniformly random
/// moment of the CA's suggested `window`, or at once when that moment has passed (RFC 9773 4.2); without
/// a window (or with one that ends before it starts), at two thirds of the lifetime minus jitter
/// ([`renew_at`]).
pub fn renewal_time(
    window: Option<RenewalWindow>,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    match window {
        Some(w) if w.end >= w.start => {
            let span = (w.end - w.start).num_milliseconds();
            let at =
                w.start + chrono::TimeDelta::milliseconds(rand::thread_rng().gen_range(0..=span));
            at.max(now)
        }
        _ => renew_at(not_before, not_after),
    }
}

/// A certificate as ARI names it (the leaf's authority key identifier and serial).
fn certificate_id(chain_pem: &str) -> Result<CertificateIdentifier<'static>, String> {
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or("no certificate in the chain")?
        .map_err(|e| e.to_string())?;
    CertificateIdentifier::try_from(&der).map(CertificateIdentifier::into_owned)
}

/// The window the CA suggests for renewing certificate `id`; `None` when its directory offers no
/// renewal information.
async fn renewal_window(
    account: &Account,
    id: &CertificateIdentifier<'_>,
) -> Result<Option<RenewalWindow>, instant_acme::Error> {
    match account.renewal_info(id).await {
        Ok((info, _)) => {
            let w = info.suggested_window;
            let start =
                DateTime::<Utc>::from_timestamp(w.start.unix_timestamp(), w.start.nanosecond());
            let end = DateTime::<Utc>::from_timestamp(w.end.unix_timestamp(), w.end.nanosecond());
            Ok(start
                .zip(end)
                .map(|(start, end)| RenewalWindow { start, end }))
        }
        Err(instant_acme::Error::Unsupported(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `result` is the CA's problem document of a type ending in `suffix`.
fn is_problem<T>(result: &Result<T, instant_acme::Error>, suffix: &str) -> bool {
    matches!(result, Err(instant_acme::Error::Api(p)) if p.r#type.as_deref().is_some_and(|t| t.ends_with(suffix)))
}

/// A certificate just ordered, and what the CA suggests for its renewal.
struct Ordered {
    cert: store::Issued,
    window: Option<RenewalWindow>,
    /// The order named the certificate it replaces (ARI).
    replaced: bool,
}

/// The wait before the retry after `failures` failures in a row: `first` doubled per failure up to `max`,
/// then a random point in its upper half (so failures together do not retry together).
pub fn backoff(first: Duration, max: Duration, failures: u32) -> Duration {
    let full = first
        .saturating_mul(2u32.saturating_pow(failures.min(30)))
        .min(max);
    full.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

/// Whether a certificate expiring at `not_after` is within [`EXPIRY_WARNING`] of `now`.
pub fn expires_soon(not_after: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    not_after - now < to_chrono(EXPIRY_WARNING)
}

fn to_chrono(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    rand::thread_rng().fill(&mut b[..]);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_max_with_jitter_in_the_upper_half() {
        let first = Duration::from_secs(10);
        let max = Duration::from_secs(300);
        for (failures, full) in [(0, 10), (1, 20), (2, 40), (5, 300), (40, 300)] {
            for _ in 0..50 {
                let d = backoff(first, max, failures);
                assert!(d <= Duration::from_secs(full), "{failures}: {d:?}");
                assert!(d >= Duration::from_secs(full) / 2, "{failures}: {d:?}");
            }
        }
    }

    #[test]
    fn renewal_is_due_near_two_thirds_of_the_lifetime() {
        let nb = Utc::now();
        let na = nb + chrono::TimeDelta::days(90);
        for _ in 0..50 {
            let at = renew_at(nb, na);
            assert!(at <= nb + chrono::TimeDelta::days(60));
            assert!(at >= nb + chrono::TimeDelta::days(55));
        }
    }

    #[test]
    fn renewal_is_a_random_moment_of_the_cas_window() {
        let now = Utc::now();
        let (nb, na) = (now, now + chrono::TimeDelta::days(90));
        let day = chrono::TimeDelta::days(1);
        let window = RenewalWindow {
            start: now + day * 50,
            end: now + day * 52,
        };
        let picks: Vec<_> = (0..200)
            .map(|_| renewal_time(Some(window), nb, na, now))
            .collect();
        assert!(
            picks.iter().all(|t| *t >= window.start && *t <= window.end),
            "inside the window"
        );
        assert!(
            picks.iter().any(|t| *t < now + day * 51) && picks.iter().any(|t| *t > now + day * 51),
            "spread over it, not one moment"
        );
    }

    #[test]
    fn a_window_reaching_into_the_past_renews_at_once_or_inside_it() {
        let now = Utc::now();
        let (nb, na) = (
            now - chrono::TimeDelta::days(80),
            now + chrono::TimeDelta::days(10),
        );
        let hour = chrono::TimeDelta::hours(1);
        let past = RenewalWindow {
            start: now - hour * 5,
            end: now - hour,
        };
        assert_eq!(
            renewal_time(Some(past), nb, na, now),
            now,
            "already over: at once"
        );
        let open = RenewalWindow {
            start: now - hour,
            end: now + hour,
        };
        for _ in 0..50 {
            let t = renewal_time(Some(open), nb, na, now);
            assert!(t >= now && t <= open.end, "{t}");
        }
    }

    #[test]
    fn without_a_window_renewal_falls_back_to_two_thirds_with_jitter() {
        let now = Utc::now();
        let (nb, na) = (now, now + chrono::TimeDelta::days(90));
        let inverted = RenewalWindow {
            start: now + chrono::TimeDelta::days(10),
            end: now + chrono::TimeDelta::days(5),
        };
        for window in [None, Some(inverted)] {
            for _ in 0..50 {
                let t = renewal_time(window, nb, na, now);
                assert!(t <= nb + chrono::TimeDelta::days(60), "{window:?}: {t}");
                assert!(t >= nb + chrono::TimeDelta::days(55), "{window:?}: {t}");
            }
        }
    }

    #[test]
    fn challenges_publish_every_change() {
        let c = Challenges::new();
        let mut rx = c.subscribe();
        c.insert("t1", "ka1");
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow_and_update().http.get("t1").map(String::as_str),
            Some("ka1")
        );
        c.insert_alpn("Shop.Example.COM", &[0xab; 32]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow_and_update().alpn.get("shop.example.com"),
            Some(&"ab".repeat(32)),
            "names are lowercased, digests in hex"
        );
        c.remove_alpn("shop.example.com");
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        c.remove("nope");
        assert!(
            !rx.has_changed().unwrap(),
            "removing an absent token changes nothing"
        );
        c.remove("t1");
        assert!(rx.has_changed().unwrap());
        assert!(c.current().is_empty());
    }

    #[test]
    fn warnings_name_waiting_failed_and_expiring_certificates_only() {
        let now = Utc::now();
        let cert = |state: &str, error: Option<&str>, days: Option<i64>| {
            cairn_proto::admin::CertificateInfo {
                app: "shop".into(),
                names: vec!["a.example.com".into()],
                state: state.into(),
                issuer: None,
                serial: None,
                not_after: days.map(|d| now + chrono::TimeDelta::days(d)),
                expires_soon: days.is_some_and(|d| d < 14),
                last_error: error.map(str::to_owned),
                attempts: 1,
                next_attempt_at: now,
                issued_at: None,
            }
        };
        let w = warnings(&[
            cert("issued", None, Some(60)),
            cert("waiting_dns", Some("`a.example.com` has no address"), None),
            cert("failed", Some("the CA said no"), Some(3)),
        ]);
        assert_eq!(w.len(), 3, "{w:?}");
        assert_eq!(
            w[0],
            "a.example.com (shop): waiting for DNS: `a.example.com` has no address"
        );
        assert_eq!(w[1], "a.example.com (shop): failed: the CA said no");
        assert!(w[2].ends_with("within 14 days"), "{w:?}");
    }

    #[test]
    fn expiry_warning_is_fourteen_days() {
        let now = Utc::now();
        assert!(expires_soon(now + chrono::TimeDelta::days(13), now));
        assert!(!expires_soon(now + chrono::TimeDelta::days(15), now));
    }
}

/// How `cairn serve` adjusts the settings the applied `[tls]` gives (for names whose reachability it
/// must check another way than the system resolver, and a CA that validates another port).
#[derive(Debug, Clone, Default)]
pub struct ProbeOverrides {
    /// The port the self-probe connects to, instead of 80.
    pub port: Option<u16>,
    /// Names resolved to these addresses instead of through the system resolver.
    pub resolve: Vec<(String, IpAddr)>,
}

impl ProbeOverrides {
    /// `settings` with these overrides.
    pub fn apply(&self, mut settings: CertSettings) -> CertSettings {
        if let Some(p) = self.port {
            settings.probe_port = p;
        }
        if !self.resolve.is_empty() {
            let fixed: HashMap<String, IpAddr> = self.resolve.iter().cloned().collect();
            let system = settings.resolve.clone();
            settings.resolve = Arc::new(move |name: String| match fixed.get(&name) {
                Some(ip) => {
                    let ip = *ip;
                    Box::pin(async move { Ok(vec![ip]) })
                }
                None => system(name),
            });
        }
        settings
    }
}

/// The issuance loop of `cairn serve`: it follows the settings of the applied `[tls]` (`settings`, set by
/// the controller after each apply; `None`: no `[tls]`, nothing is ordered) and is woken by `wake` and
/// by [`store::DUE`] (an operator's renewal on any replica).
pub async fn serve_loop(
    pool: PgPool,
    identity: Option<Arc<Identity>>,
    challenges: Challenges,
    settings: watch::Receiver<Option<CertSettings>>,
    wake: Arc<tokio::sync::Notify>,
    period: Duration,
    shutdown: &crate::worker::Shutdown,
) {
    let Some(identity) = identity else {
        tracing::info!(
            "no control plane identity: certificates are not ordered (their keys could not be sealed)"
        );
        return;
    };
    // An operator's renewal through any replica wakes this loop (the leader's has the settings).
    tokio::spawn({
        let (pool, wake, stop) = (pool.clone(), wake.clone(), shutdown.clone());
        async move {
            crate::store::listen::forward(
                pool,
                store::DUE,
                "certificates made due",
                |_| wake.notify_one(),
                &stop,
            )
            .await
        }
    });
    let passes = Following {
        pool,
        identity,
        challenges,
        settings,
        worker: None,
    };
    run(passes, wake, period, shutdown).await
}

/// [`serve_loop`]'s passes: a [`CertWorker`] for the applied settings, made again when they change.
struct Following {
    pool: PgPool,
    identity: Arc<Identity>,
    challenges: Challenges,
    settings: watch::Receiver<Option<CertSettings>>,
    worker: Option<CertWorker>,
}

impl crate::worker::Pass for Following {
    type Error = CertError;

    async fn run(&mut self, _: crate::worker::Woken) -> Result<Option<Duration>, CertError> {
        if self.settings.has_changed().unwrap_or(false) || self.worker.is_none() {
            self.worker = self.settings.borrow_and_update().clone().map(|s| {
                CertWorker::new(
                    self.pool.clone(),
                    self.identity.clone(),
                    self.challenges.clone(),
                    s,
                )
            });
        }
        match self.worker.as_mut() {
            Some(w) => w.pass().await,
            None => Ok(None),
        }
    }
}
