//! Database failover: the control plane on the writable primary among several PostgreSQL hosts.
//!
//! sqlx connects a pool to one host and cannot fail over by itself (sqlx#3333). A [`Database`] is the
//! hosts an operator named (one URL with several hosts as libpq writes it,
//! `postgres://u:p@h1:5432,h2:5433/db`, or several URLs separated by commas) and the one of them found
//! writable: `pg_is_in_recovery()` false and `transaction_read_only` off (pg_auto_failover keeps a
//! promoted standby read-only until the old primary is known to be down). Then:
//! - every pool it makes ([`Database::pool`]) connects to that host, through `Pool::set_connect_options`
//!   when it changes, so no component re-creates its pool;
//! - a pool refuses a new connection to a server that is not writable (`after_connect`): the pool's own
//!   retry then waits, up to its acquire timeout, for the next primary instead of handing out a
//!   connection every write would fail on;
//! - connections opened before the primary changed are closed on their next acquire (`before_acquire`);
//! - [`Database::watch`] checks the primary every `check`, and at once when a store call failed the way a
//!   failover fails it ([`suspect`]: the connection lost, SQLSTATE 25006 read-only transaction, 57P01-03
//!   the server shutting down or starting), then probes every host until one is writable;
//! - LISTEN connections are taken from the same pools, so they follow (`store/listen.rs`, the queue's
//!   listener), and `/readyz` asks the pool for a writable server ([`super::ping`]).
//!
//! With one host nothing of this runs: the pool is a plain pool, as before.
//!
//! What it must not do: hand out a connection to a read-only server, put the password into a log line,
//! a metric label or an error (hosts are named `host:port`), or restart the process.

use std::fmt;
use std::str::FromStr as _;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};
use tokio::sync::watch;

use super::StoreError;
use crate::worker::Shutdown;

/// How long one host's probe (connect and ask) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a pool waits for a connection (also for a new primary while there is none).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled connection idle longer than this is pinged before it is handed out.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Whether a pooled connection may be handed out: yes when it was in use within [`PING_AFTER_IDLE`],
/// otherwise when it answers a ping (one that does not is closed, and another tried).
async fn alive_if_idle(
    conn: &mut PgConnection,
    meta: sqlx::pool::PoolConnectionMetadata,
) -> Result<bool, sqlx::Error> {
    Ok(meta.idle_for < PING_AFTER_IDLE || conn.ping().await.is_ok())
}

/// How often [`Database::watch`] probes the hosts while none is writable.
const SEARCH_PERIOD: Duration = Duration::from_millis(250);

/// True on the server writes can go to.
const WRITABLE: &str =
    "SELECT NOT (pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on')";

/// Bumped by [`suspect`]; every [`Database::watch`] of the process listens.
static SUSPECT: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

/// Asks every watcher of the process to check its primary now (a store call failed as in a failover).
pub fn suspect() {
    SUSPECT.send_modify(|n| *n = n.wrapping_add(1));
}

/// Whether an error is what a failover looks like to a client: the connection lost or refused, the
/// pool out of time, a read-only transaction (25006), the server shutting down or starting (57P01-03).
pub fn symptom(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(d) => matches!(
            d.code().as_deref(),
            Some("25006" | "57P01" | "57P02" | "57P03")
        ),
        _ => false,
    }
}

/// The PostgreSQL hosts the control plane may use, and the primary among them.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    hosts: Vec<PgConnectOptions>,
    /// `host:port` of each, for logs and metrics (never the user or password).
    names: Vec<String>,
    state: Mutex<State>,
    /// When the primary last changed: connections older than that are closed on acquire.
    switched: Arc<Mutex<Option<Instant>>>,
}

#[derive(Default)]
struct State {
    primary: Option<usize>,
    /// The last host that was the primary (kept while none is).
    last: Option<usize>,
    /// Every pool made here, told when the primary changes.
    pools: Vec<PgPool>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("hosts", &self.inner.names)
            .field("primary", &self.primary())
            .finish()
    }
}

impl Database {
    /// Reads the database URL: one URL, one URL with several comma-separated hosts (libpq's form), or
    /// several URLs separated by commas. Connects to nothing.
    pub fn open(spec: &str) -> Result<Database, StoreError> {
        let hosts = parse(spec).map_err(StoreError::Connect)?;
        let names = hosts
            .iter()
            .map(|o| {
                let host = o.get_host();
                if host.contains(':') && !host.starts_with(['/', '[']) {
                    format!("[{host}]:{}", o.get_port())
                } else {
                    format!("{host}:{}", o.get_port())
                }
            })
            .collect();
        // One host is the primary by definition: nothing to choose.
        let primary = (hosts.len() == 1).then_some(0);
        Ok(Database {
            inner: Arc::new(Inner {
                hosts,
                names,
                state: Mutex::new(State {
                    primary,
                    last: primary,
                    pools: Vec::new(),
                }),
                switched: Arc::default(),
            }),
        })
    }

    /// `host:port` of every host, in the order given.
    pub fn hosts(&self) -> &[String] {
        &self.inner.names
    }

    /// `host:port` of the primary in use, `None` while none is known to be writable.
    pub fn primary(&self) -> Option<String> {
        self.state().primary.map(|i| self.inner.names[i].clone())
    }

    fn single(&self) -> bool {
        self.inner.hosts.len() == 1
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pool of at most `max` connections to the primary, following it when it changes. Finds the
    /// primary first when none is known (waiting up to [`ACQUIRE_TIMEOUT`] for one).
    pub async fn pool(&self, max: u32) -> Result<PgPool, StoreError> {
        // A connection is checked with a ping before it is handed out only when it sat idle (sqlx pings
        // every one by default): on a busy control plane that ping was a round trip more on each of a
        // heartbeat's two acquisitions and an empty long-poll's three. One that broke while in use fails its
        // query, and is closed rather than returned.
        let options = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false);
        if self.single() {
            return options
                .before_acquire(|conn, meta| Box::pin(alive_if_idle(conn, meta)))
                .connect_with(self.inner.hosts[0].clone())
                .await
                .map_err(StoreError::Connect);
        }
        let known = self.state().primary;
        let primary = match known {
            Some(i) => i,
            None => self.find_within(ACQUIRE_TIMEOUT).await?,
        };
        let switched = self.inner.switched.clone();
        let pool = options
            .after_connect(|conn, _| {
                Box::pin(async move {
                    if writable(conn).await? {
                        Ok(())
                    } else {
                        suspect();
                        Err(sqlx::Error::Protocol(
                            "the server is read-only (a standby, or a primary being demoted or \
                             promoted): waiting for the primary"
                                .to_owned(),
                        ))
                    }
                })
            })
            .before_acquire(move |conn, meta| {
                let switched = *switched.lock().unwrap_or_else(|e| e.into_inner());
                Box::pin(async move {
                    // Opened before the primary changed: to the old one, or to a server that was not
                    // writable then.
                    if switched.is_some_and(|at| meta.age > at.elapsed()) {
                        return Ok(false);
                    }
                    alive_if_idle(conn, meta).await
                })
            })
            .connect_with(self.inner.hosts[primary].clone())
            .await
            .map_err(StoreError::Connect)?;
        let mut state = self.state();
        if state.last.is_none() {
            state.last = Some(primary);
        }
        if let Some(now) = state.primary.filter(|&now| now != primary) {
            pool.set_connect_options(self.inner.hosts[now].clone());
        }
        state.pools.retain(|p| !p.is_closed());
        state.pools.push(pool.clone());
        Ok(pool)
    }

    /// Probes the hosts until one is writable or `within` passed.
    async fn find_within(&self, within: Duration) -> Result<usize, StoreError> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.rediscover().await {
                return Ok(i);
            }
            if Instant::now() >= deadline {
                return Err(StoreError::NoPrimary {
                    hosts: self.inner.names.join(", "),
                });
            }
            tokio::time::sleep(SEARCH_PERIOD).await;
        }
    }

    /// Probes every host at once and makes the writable one the primary (the current one when it still
    /// is). `None` when no host is writable: the pools keep their target and their connections fail.
    async fn rediscover(&self) -> Option<usize> {
        let mut probes = tokio::task::JoinSet::new();
        for (i, host) in self.inner.hosts.iter().enumerate() {
            let host = host.clone();
            probes.spawn(async move { (i, probe(&host).await) });
        }
        let mut found = Vec::new();
        while let Some(done) = probes.join_next().await {
            if let Ok((i, true)) = done {
                found.push(i);
            }
        }
        found.sort_unstable();
        let current = self.state().primary;
        let chosen = match current {
            Some(c) if found.contains(&c) => Some(c),
            _ => found.first().copied(),
        };
        if found.len() > 1 {
            tracing::warn!(
                writable = ?found.iter().map(|&i| &self.inner.names[i]).collect::<Vec<_>>(),
                "several database hosts accept writes; using one"
            );
        }
        self.settle(chosen);
        chosen
    }

    /// Records the primary (or its absence), pointing every pool at it.
    fn settle(&self, chosen: Option<usize>) {
        let mut state = self.state();
        if state.primary == chosen {
            return;
        }
        let before = state.last;
        state.primary = chosen;
        state.last = chosen.or(before);
        // The pools' connections are to a host that no longer takes writes (or to the old primary):
        // each is closed on its next acquire, and a new one waits for a writable host.
        *self
            .inner
            .switched
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        match chosen {
            Some(i) => {
                state.pools.retain(|p| !p.is_closed());
                for pool in &state.pools {
                    pool.set_connect_options(self.inner.hosts[i].clone());
                }
                tracing::info!(
                    primary = %self.inner.names[i],
                    previous = ?before.map(|b| &self.inner.names[b]),
                    "database primary"
                );
                if before.is_some_and(|b| b != i) {
                    FAILOVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            None => tracing::warn!(
                hosts = %self.inner.names.join(", "),
                "no writable database primary; the control plane waits for one"
            ),
        }
        show(&self.inner.names, chosen);
    }

    /// Follows the primary until `shutdown`: checks it every `check` (and when [`suspect`] is called),
    /// probes every host while none is writable. Returns at once with one host.
    pub async fn watch(&self, check: Duration, shutdown: &Shutdown) {
        show(&self.inner.names, self.state().primary);
        if self.single() {
            return;
        }
        let mut suspected = SUSPECT.subscribe();
        let mut checker: Option<(usize, PgConnection)> = None;
        loop {
            let current = self.state().primary;
            let ok = match current {
                None => false,
                Some(i) => {
                    let mut conn = match checker.take() {
                        Some((at, conn)) if at == i => Some(conn),
                        _ => connect(&self.inner.hosts[i]).await,
                    };
                    let ok = match conn.as_mut() {
                        Some(c) => matches!(
                            tokio::time::timeout(PROBE_TIMEOUT, writable(c)).await,
                            Ok(Ok(true))
                        ),
                        None => false,
                    };
                    if let (true, Some(conn)) = (ok, conn) {
                        checker = Some((i, conn));
                    }
                    ok
                }
            };
            if !ok {
                self.rediscover().await;
            }
            let wait = if self.state().primary.is_some() {
                check
            } else {
                check.min(SEARCH_PERIOD)
            };
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(wait) => {}
                _ = suspected.changed() => {}
            }
        }
    }
}

/// Whether the server on `conn` takes writes.
async fn writable(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar::<_, bool>(WRITABLE)
        .fetch_one(conn)
        .await
}

async fn connect(host: &PgConnectOptions) -> Option<PgConnection> {
    match tokio::time::timeout(PROBE_TIMEOUT, host.connect()).await {
        Ok(Ok(conn)) => Some(conn),
        _ => None,
    }
}

/// Whether `host` answers and takes writes.
async fn probe(host: &PgConnectOptions) -> bool {
    let Some(mut conn) = connect(host).await else {
        return false;
    };
    let ok = matches!(
        tokio::time::timeout(PROBE_TIMEOUT, writable(&mut conn)).await,
        Ok(Ok(true))
    );
    let _ = conn.close().await;
    ok
}

fn has_scheme(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Every host `spec` names, as connect options (user, password, database and parameters shared by the
/// hosts of one URL).
fn parse(spec: &str) -> Result<Vec<PgConnectOptions>, sqlx::Error> {
    let mut urls: Vec<String> = Vec::new();
    for piece in spec.split(',') {
        match urls.last_mut() {
            Some(last) if !has_scheme(piece.trim_start()) => {
                last.push(',');
                last.push_str(piece);
            }
            _ => urls.push(piece.trim_start().to_owned()),
        }
    }
    let mut hosts = Vec::new();
    for url in urls {
        hosts.extend(split_hosts(url.trim_end())?);
    }
    Ok(hosts)
}

/// `postgres://u:p@h1:1,h2:2/db?x` as `postgres://u:p@h1:1/db?x` and `postgres://u:p@h2:2/db?x`.
fn split_hosts(url: &str) -> Result<Vec<PgConnectOptions>, sqlx::Error> {
    let one = |u: &str| PgConnectOptions::from_str(u);
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(vec![one(url)?]);
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    if !hosts.contains(',') {
        return Ok(vec![one(url)?]);
    }
    hosts
        .split(',')
        .map(|host| {
            if host.trim().is_empty() {
                return Err(sqlx::Error::Configuration(
                    "the database URL names an empty host in its host list".into(),
                ));
            }
            one(&format!("{scheme}://{userinfo}{}{tail}", host.trim()))
        })
        .collect()
}

/// The hosts and the primary in use, as last chosen, for the metrics (read at each scrape by
/// [`seen`], so this module needs nothing of theirs).
static SHOWN: std::sync::Mutex<Option<Shown>> = std::sync::Mutex::new(None);

/// The hosts `cairn serve` was given and the index of the primary in use.
pub type Shown = (Vec<String>, Option<usize>);
/// How many times this process moved to another primary.
static FAILOVERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn show(names: &[String], primary: Option<usize>) {
    *SHOWN.lock().unwrap_or_else(|e| e.into_inner()) = Some((names.to_vec(), primary));
}

/// The database hosts with the index of the primary in use (once a [`Database`] chose), and how many
/// times this process moved to another primary: `cairn_database_primary` and
/// `cairn_database_failovers_total`.
pub fn seen() -> (Option<Shown>, u64) {
    (
        SHOWN.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        FAILOVERS.load(std::sync::atomic::Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(spec: &str) -> Vec<String> {
        Database::open(spec).unwrap().hosts().to_vec()
    }

    #[test]
    fn one_url_is_one_host_and_already_the_primary() {
        let db = Database::open("postgres://u:secret@db.example:5433/cairn").unwrap();
        assert_eq!(db.hosts(), ["db.example:5433"]);
        assert_eq!(db.primary().as_deref(), Some("db.example:5433"));
    }

    #[test]
    fn libpq_host_lists_share_user_database_and_parameters() {
        let hosts =
            parse("postgres://u:p%2Fw@h1:5432,h2,[::1]:5434/cairn?sslmode=disable").unwrap();
        let got: Vec<_> = hosts
            .iter()
            .map(|o| {
                (
                    o.get_host().to_owned(),
                    o.get_port(),
                    o.get_username().to_owned(),
                    o.get_database().map(str::to_owned),
                )
            })
            .collect();
        let db = Some("cairn".to_owned());
        assert_eq!(
            got,
            [
                ("h1".to_owned(), 5432, "u".to_owned(), db.clone()),
                ("h2".to_owned(), 5432, "u".to_owned(), db.clone()),
                ("[::1]".to_owned(), 5434, "u".to_owned(), db),
            ]
        );
    }

    #[test]
    fn comma_separated_urls_and_host_lists_mix() {
        assert_eq!(
            names("postgres://a@h1:1/x, postgresql://b@h2:2,h3:3/y"),
            ["h1:1", "h2:2", "h3:3"]
        );
        assert_eq!(names("postgres://u@[::1]:5,h:6/x"), ["[::1]:5", "h:6"]);
    }

    #[test]
    fn an_empty_host_is_refused_without_echoing_the_password() {
        let err = Database::open("postgres://u:canary-pw@h1:1,,h2:2/x").unwrap_err();
        let text = cairn_schema::error::chain(&err);
        assert!(text.contains("empty host"), "{text}");
        assert!(!text.contains("canary-pw"), "{text}");
    }

    #[test]
    fn failover_symptoms_are_connection_loss_and_read_only_errors() {
        assert!(symptom(&sqlx::Error::PoolTimedOut));
        assert!(symptom(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
        assert!(!symptom(&sqlx::Error::RowNotFound));
    }
}
