//! The cluster route table: for every app, its hosts and the nodes where it has a healthy replica, so
//! that any ingress node's proxy can serve any app (locally, or forwarded one hop to a node that has it).
//!
//! [`Routes`] holds the current table and publishes a new one when its content changes: [`Routes::refresh`]
//! recomputes it from the store (what was applied, and what the agents last reported), and the agents
//! long-poll [`Routes::changed_from`] (`GET /agent/v1/routes`), so a table travels to an agent only when
//! it changed. [`refresh_loop`] recomputes it when poked ([`Routes::poke`]: after a reconcile pass, which
//! follows every apply and every node going offline, and after a heartbeat that changed what a node
//! serves), when another control plane published a new table ([`CHANGED`]: its pokes came from changes
//! this one did not see), and every period as a safety net. A refresh reads every app and node, so it
//! is not made on a timer that finds nothing new: at 10,000 nodes each one held heartbeats up.
//!
//! [`HopKey`] is the secret one node's proxy shows another's on a forwarded request. It is derived from the
//! control plane's identity (every control plane holding the identity derives the same key), or random
//! per process without one, and travels only sealed to one node's age recipient.
//!
//! What it must not do: route to a node that is not online, or to an app's replica that did not pass its
//! health check; put the hop key in a table, a log, an error or the database.

use std::sync::Arc;
use std::time::Duration;

use cairn_proto::routes::{
    AcmeChallenge, AlpnChallenge, AppRoute, HostTls, RouteNode, RouteTable, SealedCertificate,
    SealedHopKey, TlsTable,
};
use cairn_schema::{Identity, Recipient, SecretError};
use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use zeroize::Zeroizing;

use crate::store::StoreError;
use crate::store::listen::Heard;
use crate::store::routes::RouteRows;
use crate::worker::{Shutdown, Worker};

/// The current route table, shared by serve's handlers.
#[derive(Debug, Clone)]
pub struct Routes {
    tx: Arc<watch::Sender<Arc<RouteTable>>>,
    /// The current table turned around (each node's routed apps), which every heartbeat compares its
    /// report with ([`Routes::differs_for`]): made once per published table, not per heartbeat.
    served: Arc<std::sync::RwLock<Arc<Served>>>,
    tls: Arc<watch::Sender<Arc<TlsSource>>>,
    /// The ACME answers this replica's certificate worker puts up (HTTP-01 and TLS-ALPN-01);
    /// [`refresh_loop`] stores them for every replica's agents ([`crate::store::tls`]).
    pub challenges: crate::certs::Challenges,
    /// Whose answers in the store are this process's.
    replica: uuid::Uuid,
    /// Whether the applied apps' own certificates (`tls = { cert, key }`) were ever stored (as of the last
    /// refresh): until then no TLS table is handed out (it would lack them, and an agent installs a
    /// table whole: it would stop serving them).
    own_known: Arc<std::sync::atomic::AtomicBool>,
    dirty: Arc<Notify>,
    /// Wakes the certificate loop (`cairn serve` hands it to [`crate::certs::serve_loop`]): after an
    /// apply, and when a node comes online ([`crate::certs::node_online`]).
    pub certs_wake: Arc<Notify>,
}

/// A route table by node: what [`Routes::differs_for`] reads.
#[derive(Debug, Default)]
struct Served {
    /// The generation of the table it was made from.
    generation: String,
    /// The apps routed to each node, sorted.
    by_node: std::collections::HashMap<cairn_schema::Name, Vec<cairn_schema::Name>>,
    /// Every app in the table.
    apps: std::collections::HashSet<cairn_schema::Name>,
}

impl Served {
    fn of(table: &RouteTable) -> Served {
        let mut by_node: std::collections::HashMap<cairn_schema::Name, Vec<cairn_schema::Name>> =
            std::collections::HashMap::new();
        for a in &table.apps {
            for n in &a.nodes {
                by_node.entry(n.clone()).or_default().push(a.app.clone());
            }
        }
        for apps in by_node.values_mut() {
            apps.sort();
            apps.dedup();
        }
        Served {
            generation: table.generation.clone(),
            by_node,
            apps: table.apps.iter().map(|a| a.app.clone()).collect(),
        }
    }
}

/// What the TLS table is made of, before its keys are sealed to a node: the certificates with their keys
/// sealed to the control plane's own recipient, each host's policy, the ACME challenges in flight.
#[derive(Debug, Clone)]
pub struct TlsSource {
    /// The [`TlsTable`] generation every node's table of this source has.
    pub generation: String,
    pub certificates: Vec<HeldCertificate>,
    pub hosts: Vec<HostTls>,
    pub challenges: Vec<AcmeChallenge>,
    pub alpn: Vec<AlpnChallenge>,
}

/// A certificate as the control plane holds it.
#[derive(Debug, Clone)]
pub struct HeldCertificate {
    pub id: String,
    pub names: Vec<String>,
    pub chain_pem: String,
    /// Sealed to the control plane's recipient.
    pub key: cairn_schema::Ciphertext,
}

impl TlsSource {
    pub fn new(
        mut certificates: Vec<HeldCertificate>,
        mut hosts: Vec<HostTls>,
        mut challenges: Vec<AcmeChallenge>,
        mut alpn: Vec<AlpnChallenge>,
    ) -> TlsSource {
        let generation = TlsTable::sort_and_digest(
            &mut certificates,
            |c| (c.id.as_str(), c.names.as_slice(), c.chain_pem.as_str()),
            &mut hosts,
            &mut challenges,
            &mut alpn,
        );
        TlsSource {
            generation,
            certificates,
            hosts,
            challenges,
            alpn,
        }
    }

    /// The table for one node: every key opened with `identity` and sealed to `recipient`.
    pub fn seal(
        &self,
        identity: &Identity,
        recipient: &Recipient,
    ) -> Result<TlsTable, SecretError> {
        let mut certificates = Vec::with_capacity(self.certificates.len());
        for c in &self.certificates {
            let plain = identity.decrypt(&c.key)?;
            let key =
                cairn_schema::secret::encrypt(plain.expose(), std::slice::from_ref(recipient))?;
            certificates.push(SealedCertificate {
                id: c.id.clone(),
                names: c.names.clone(),
                chain_pem: c.chain_pem.clone(),
                key,
            });
        }
        Ok(TlsTable::new(
            certificates,
            self.hosts.clone(),
            self.challenges.clone(),
            self.alpn.clone(),
        ))
    }
}

impl Default for Routes {
    fn default() -> Self {
        let empty = RouteTable::new(Vec::new(), Vec::new());
        Routes {
            served: Arc::new(std::sync::RwLock::new(Arc::new(Served::of(&empty)))),
            tx: Arc::new(watch::Sender::new(Arc::new(empty))),
            tls: Arc::new(watch::Sender::new(Arc::new(TlsSource::new(
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            )))),
            challenges: crate::certs::Challenges::new(),
            replica: uuid::Uuid::new_v4(),
            own_known: Arc::default(),
            dirty: Arc::new(Notify::new()),
            certs_wake: Arc::new(Notify::new()),
        }
    }
}

impl Routes {
    /// Stores the applied apps' own certificates of `commit` for every replica (in a leader's term,
    /// fenced) and asks for a refresh when they changed.
    pub async fn set_own_certificates(
        &self,
        pool: &PgPool,
        fence: Option<&crate::store::lease::Fence>,
        commit: &str,
        own: Vec<HeldCertificate>,
    ) -> Result<(), StoreError> {
        let own: Vec<crate::store::tls::OwnCertificate> = own
            .into_iter()
            .map(|c| crate::store::tls::OwnCertificate {
                id: c.id,
                names: c.names,
                chain_pem: c.chain_pem,
                key_sealed: c.key.as_str().to_owned(),
            })
            .collect();
        if crate::store::tls::put_own(pool, fence, commit, &own).await? {
            self.poke();
        }
        Ok(())
    }

    /// Whether the TLS table is whole (the own certificates are known): only then is it handed out.
    pub fn tls_ready(&self) -> bool {
        self.own_known.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Asks [`refresh_loop`] for a new table soon (what it is computed from may have changed).
    pub fn poke(&self) {
        self.dirty.notify_one();
    }

    /// Whether the current table disagrees with `healthy`, the apps `node` now reports a healthy replica
    /// of, or with its being online: the heartbeat that brought this report should refresh the table.
    pub fn differs_for(&self, node: &cairn_schema::Name, healthy: &[&cairn_schema::Name]) -> bool {
        let table = self.current();
        let mut served = self
            .served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if served.generation != table.generation {
            // Published meanwhile and not turned around yet: turn this one around (rare).
            served = Arc::new(Served::of(&table));
        }
        let routed: &[cairn_schema::Name] = served.by_node.get(node).map_or(&[], Vec::as_slice);
        let mut healthy: Vec<&cairn_schema::Name> = healthy
            .iter()
            .copied()
            .filter(|a| served.apps.contains(*a))
            .collect();
        healthy.sort();
        healthy.dedup();
        !routed.iter().eq(healthy.iter().copied())
    }

    /// The table as last computed.
    pub fn current(&self) -> Arc<RouteTable> {
        self.tx.borrow().clone()
    }

    /// Recomputes the route table and the TLS source from the store (the ACME answers in flight included) and
    /// publishes what changed; says whether the route table did.
    pub async fn refresh(&self, pool: &PgPool) -> Result<bool, StoreError> {
        let rows = {
            let mut conn = pool.acquire().await.map_err(|source| StoreError::Query {
                op: "connect to read the route table",
                source,
            })?;
            crate::store::routes::rows(&mut conn).await?
        };
        let served = crate::store::certs::served(pool).await?;
        let own = crate::store::tls::own(pool).await?;
        let (http, alpn) = crate::store::tls::answers(pool).await?;
        let known = own.is_some();
        let own: Vec<HeldCertificate> = own
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| match cairn_schema::Ciphertext::new(&c.key_sealed) {
                Ok(key) => Some(HeldCertificate {
                    id: c.id,
                    names: c.names,
                    chain_pem: c.chain_pem,
                    key,
                }),
                Err(_) => {
                    tracing::warn!(
                        id = c.id,
                        "a stored own certificate's key is not an age ciphertext; not served"
                    );
                    None
                }
            })
            .collect();
        self.publish_tls(tls_source(
            &rows,
            &served,
            &own,
            &crate::certs::ChallengeSet { http, alpn },
        ));
        if known
            && !self
                .own_known
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            // The TLS table may be handed out from now on: wake the long-polls that waited without it
            // (its generation may not change, so a publish would not).
            self.tls.send_modify(|_| {});
        }
        // Building and digesting the table is synchronous work that grows with the installation.
        Ok(self.publish(crate::worker::off_the_workers(|| table(&rows))))
    }

    /// Publishes `table` unless it has the current generation; says whether it did.
    pub fn publish(&self, table: RouteTable) -> bool {
        if self.tx.borrow().generation == table.generation {
            // (The periodic refresh, nothing changed: no index to make.)
            return false;
        }
        let served = Served::of(&table);
        let published = self.tx.send_if_modified(|current| {
            if current.generation == table.generation {
                false
            } else {
                *current = Arc::new(table);
                true
            }
        });
        if published {
            let mut current = self.served.write().unwrap_or_else(|p| p.into_inner());
            // (Another publish may have come between: keep the index of the table now current.)
            if served.generation == self.tx.borrow().generation {
                *current = Arc::new(served);
            }
        }
        published
    }

    /// The TLS source as last published.
    pub fn current_tls(&self) -> Arc<TlsSource> {
        self.tls.borrow().clone()
    }

    /// Publishes `source` unless it has the current generation; says whether it did.
    pub fn publish_tls(&self, source: TlsSource) -> bool {
        self.tls.send_if_modified(|current| {
            if current.generation == source.generation {
                false
            } else {
                *current = Arc::new(source);
                true
            }
        })
    }

    /// What differs from the generations an agent holds (`generation` of the route table, `tls` of the
    /// TLS table, once it is whole): at once when something already does, else as soon as something changes within
    /// `wait` (or `stop` resolves); `None` when nothing did.
    pub async fn changed_from(
        &self,
        generation: &str,
        tls: &str,
        wait: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> Option<Changed> {
        let mut tables = self.tx.subscribe();
        let mut sources = self.tls.subscribe();
        let look = |tables: &watch::Receiver<Arc<RouteTable>>,
                    sources: &watch::Receiver<Arc<TlsSource>>| {
            let t = tables.borrow().clone();
            let s = sources.borrow().clone();
            let changed = Changed {
                table: (t.generation != generation).then_some(t),
                // Only a whole TLS table counts (see [`Routes::tls_ready`]).
                tls: (s.generation != tls && self.tls_ready()).then_some(s),
            };
            (changed.table.is_some() || changed.tls.is_some()).then_some(changed)
        };
        tables.mark_unchanged();
        sources.mark_unchanged();
        if let Some(c) = look(&tables, &sources) {
            return Some(c);
        }
        let deadline = tokio::time::Instant::now() + wait;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                r = tables.changed() => if r.is_err() { return None },
                r = sources.changed() => if r.is_err() { return None },
                () = tokio::time::sleep_until(deadline) => return None,
                () = &mut stop => return None,
            }
            if let Some(c) = look(&tables, &sources) {
                return Some(c);
            }
        }
    }
}

/// What changed for an agent: the parts to send it.
#[derive(Debug, Clone)]
pub struct Changed {
    pub table: Option<Arc<RouteTable>>,
    pub tls: Option<Arc<TlsSource>>,
}

/// The TLS source: every served certificate (its id a digest of its name set, stable across renewals),
/// the `[tls]` policy for each of its names, and the challenges in flight (HTTP-01 and TLS-ALPN-01). Without `[tls]` no host gets a
/// policy, but certificates still issued are served (an app's own, or until they expire).
pub fn tls_source(
    rows: &RouteRows,
    served: &[crate::store::certs::Served],
    own: &[HeldCertificate],
    challenges: &crate::certs::ChallengeSet,
) -> TlsSource {
    use sha2::Digest as _;
    let mut certificates = Vec::with_capacity(served.len());
    let mut hosts = Vec::new();
    for c in served {
        let Ok(key) = cairn_schema::Ciphertext::new(&c.key_sealed) else {
            tracing::warn!(names = ?c.names, "a stored certificate key is not an age ciphertext; not served");
            continue;
        };
        let id = hex::encode(&sha2::Sha256::digest(c.names.join("\n"))[..12]);
        if let Some(tls) = &rows.tls {
            for n in &c.names {
                hosts.push(HostTls {
                    host: n.clone(),
                    redirect_http: tls.redirect_http,
                    hsts_max_age: tls.hsts.then_some(HSTS_MAX_AGE),
                });
            }
        }
        certificates.push(HeldCertificate {
            id,
            names: c.names.clone(),
            chain_pem: c.chain_pem.clone(),
            key,
        });
    }
    // An app's own certificate is served with `[tls]`'s policy, or redirects and no HSTS without one.
    let (redirect_http, hsts) = rows
        .tls
        .as_ref()
        .map_or((true, false), |t| (t.redirect_http, t.hsts));
    for c in own {
        for n in &c.names {
            hosts.push(HostTls {
                host: n.clone(),
                redirect_http,
                hsts_max_age: hsts.then_some(HSTS_MAX_AGE),
            });
        }
        certificates.push(c.clone());
    }
    let http = challenges
        .http
        .iter()
        .map(|(token, ka)| AcmeChallenge {
            token: token.clone(),
            key_authorization: ka.clone(),
        })
        .collect();
    let alpn = challenges
        .alpn
        .iter()
        .map(|(name, digest)| AlpnChallenge {
            name: name.clone(),
            digest: digest.clone(),
        })
        .collect();
    TlsSource::new(certificates, hosts, http, alpn)
}

/// `Strict-Transport-Security: max-age` when `[tls] hsts = true`: one year.
pub const HSTS_MAX_AGE: u64 = 365 * 24 * 3600;

/// The channel a control plane announces a route table it published on (the payload: its replica id),
/// so the others refresh theirs.
pub const CHANGED: &str = "cairn_routes";

/// Keeps `routes` current until `shutdown`: a refresh when poked, when another replica published a new
/// table ([`CHANGED`]), when any replica stored ACME answers or own certificates
/// ([`crate::store::tls::CHANGED`]), whenever a listener (re)connects (what was announced meanwhile was
/// missed), and every `period`; and stores this replica's ACME answers whenever its certificate worker
/// changes them, so every ingress node answers them within a long-poll round trip whichever replica its
/// agent polls.
pub async fn refresh_loop(pool: PgPool, routes: Routes, period: Duration, shutdown: &Shutdown) {
    let wake = routes.dirty.clone();
    tokio::spawn({
        let (pool, wake, stop) = (pool.clone(), wake.clone(), shutdown.clone());
        let own = routes.replica.to_string();
        async move {
            crate::store::listen::forward(
                pool,
                CHANGED,
                "route table changes",
                |heard| match heard {
                    // Its own announcement: nothing this replica does not have.
                    Heard::Notified(replica) if replica == own => {}
                    _ => wake.notify_one(),
                },
                &stop,
            )
            .await
        }
    });
    tokio::spawn({
        let (pool, routes, stop) = (pool.clone(), routes.clone(), shutdown.clone());
        async move { store_answers(pool, routes, &stop).await }
    });
    tokio::spawn({
        let (pool, wake, stop) = (pool.clone(), wake.clone(), shutdown.clone());
        async move {
            crate::store::listen::forward(
                pool,
                crate::store::tls::CHANGED,
                "TLS table changes",
                |_| wake.notify_one(),
                &stop,
            )
            .await
        }
    });
    Worker::new("refreshing the route table", period)
        .woken_by(wake)
        .backoff(Duration::from_millis(500))
        .failures_as_warnings()
        .run(shutdown, |_| {
            let (pool, routes) = (pool.clone(), routes.clone());
            async move {
                let started = std::time::Instant::now();
                let changed = routes.refresh(&pool).await?;
                let t = routes.current();
                tracing::debug!(generation = %t.generation, apps = t.apps.len(), nodes = t.nodes.len(), changed, took = ?started.elapsed(), "route table refreshed");
                if changed {
                    // The other replicas refresh theirs: what poked this one (a heartbeat, a reconcile)
                    // happened here only. Failing that, they catch up on their period.
                    if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(CHANGED)
                        .bind(routes.replica.to_string())
                        .execute(&pool)
                        .await
                    {
                        tracing::warn!(error = %e, "cannot announce a new route table to the other control planes");
                    }
                }
                Ok::<_, StoreError>(None)
            }
        })
        .await
}

/// Stores this replica's ACME answers after each change of them (again after a failure, every half
/// second) until `shutdown`, then withdraws them.
async fn store_answers(pool: PgPool, routes: Routes, shutdown: &Shutdown) {
    let mut changes = routes.challenges.subscribe();
    loop {
        // Stored whole (what is current now, from the start on), so a failed attempt is made good by
        // the next with whatever is current then.
        changes.mark_unchanged();
        loop {
            let set = routes.challenges.current();
            match crate::store::tls::put_answers(&pool, routes.replica, &set.http, &set.alpn).await
            {
                Ok(()) => {
                    routes.poke();
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %cairn_schema::error::chain(&e), "cannot store the ACME answers; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        () = shutdown.wait() => return,
                    }
                }
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = shutdown.wait() => break,
        }
    }
    let none = std::collections::BTreeMap::new();
    if let Err(e) = crate::store::tls::put_answers(&pool, routes.replica, &none, &none).await {
        tracing::debug!(error = %cairn_schema::error::chain(&e), "cannot withdraw the ACME answers at shutdown; they age out");
    }
}

/// The key that authenticates the internal hop between node proxies: 32 bytes, shown as 64 hex digits
/// in the hop header. Its `Debug` output shows only its id.
pub struct HopKey {
    id: String,
    hex: Zeroizing<String>,
}

impl std::fmt::Debug for HopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HopKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl HopKey {
    /// The key derived from the control plane's identity (the same for every control plane holding it),
    /// or, without one, a random key of this process.
    pub fn new(identity: Option<&Identity>) -> HopKey {
        let bytes = match identity {
            Some(i) => i.derived_key("cairn hop key v1"),
            None => {
                let mut b = Zeroizing::new(vec![0u8; 32]);
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b[..]);
                b
            }
        };
        let hex = Zeroizing::new(hex::encode(&bytes[..]));
        use sha2::Digest as _;
        let id = hex::encode(&sha2::Sha256::digest(format!("cairn hop key id\0{}", *hex))[..8]);
        HopKey { id, hex }
    }

    /// Names the key without revealing it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key sealed to `recipient` (one node's).
    pub fn seal(&self, recipient: &Recipient) -> Result<SealedHopKey, SecretError> {
        let ciphertext =
            cairn_schema::secret::encrypt(self.hex.as_bytes(), std::slice::from_ref(recipient))?;
        Ok(SealedHopKey {
            id: self.id.clone(),
            ciphertext,
        })
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
    // Each online node's healthy apps, turned around once: linear in what the nodes report, not apps
    // times nodes (10,000 of each made that a second of one core on every refresh).
    let mut serving: std::collections::HashMap<&cairn_schema::Name, Vec<cairn_schema::Name>> =
        std::collections::HashMap::new();
    for n in rows.nodes.iter().filter(|n| n.online) {
        for app in &n.healthy {
            serving.entry(app).or_default().push(n.name.clone());
        }
    }
    let apps = rows
        .apps
        .iter()
        .map(|a| {
            let mut hosts: Vec<String> = a.domains.iter().map(|d| d.to_string()).collect();
            if let Some(base) = &rows.base_domain {
                hosts.push(format!("{}.{base}", a.name));
            }
            AppRoute {
                app: a.name.clone(),
                hosts,
                nodes: serving.remove(&a.name).unwrap_or_default(),
                max_body_bytes: a.max_body,
            }
        })
        .collect();
    RouteTable::new(nodes, apps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_schema::Name;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn app(a: &str, nodes: &[&str]) -> AppRoute {
        AppRoute {
            app: name(a),
            hosts: vec![format!("{a}.example.test")],
            nodes: nodes.iter().map(|n| name(n)).collect(),
            max_body_bytes: None,
        }
    }

    #[test]
    fn a_heartbeat_differs_when_its_healthy_apps_are_not_the_nodes_routed_ones() {
        let routes = Routes::default();
        let n1 = name("n1");
        assert!(!routes.differs_for(&n1, &[]));
        assert!(
            !routes.differs_for(&n1, &[&name("a")]),
            "an app the table does not have is not compared"
        );
        routes.publish(RouteTable::new(
            Vec::new(),
            vec![
                app("b", &["n1", "n2"]),
                app("a", &["n1"]),
                app("c", &["n2"]),
            ],
        ));
        let (a, b, c) = (name("a"), name("b"), name("c"));
        assert!(!routes.differs_for(&n1, &[&b, &a]));
        assert!(
            !routes.differs_for(&n1, &[&a, &b, &a]),
            "duplicates count once"
        );
        assert!(!routes.differs_for(&n1, &[&a, &b, &name("zz")]));
        assert!(routes.differs_for(&n1, &[&a]), "b no longer healthy here");
        assert!(
            routes.differs_for(&n1, &[&a, &b, &c]),
            "c newly healthy here"
        );
        assert!(!routes.differs_for(&name("n2"), &[&c, &b]));
        assert!(routes.differs_for(&name("n3"), &[&c]));
        // A new table is compared with at once.
        routes.publish(RouteTable::new(Vec::new(), vec![app("a", &["n3"])]));
        assert!(routes.differs_for(&n1, &[&a]));
        assert!(!routes.differs_for(&n1, &[&b]));
        assert!(!routes.differs_for(&name("n3"), &[&a]));
    }
}
