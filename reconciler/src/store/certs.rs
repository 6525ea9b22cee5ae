//! Certificates ordered from an ACME CA and the ACME accounts they are ordered with (`crate::certs`
//! does the ordering): which name sets are declared, each one's state, its current certificate, and the
//! lease that lets one control plane at a time order for a name set.
//!
//! Queries here are runtime-checked (`sqlx::query`, not `query!`): they need no `.sqlx/` data.
//!
//! What it must not do: see a private key in plaintext (keys and account credentials arrive sealed to the
//! control plane's recipient and leave the same way; [`CertRow`] does not even carry them), decide when to
//! order or renew (the worker says, through `next_attempt_at`), or write an outcome for a lease that is no
//! longer the caller's.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::decode::millis;
use super::{Op as _, StoreError};

pub use cairn_plan::observed::CertState;

/// A stored state's spelling back to its [`CertState`].
pub(crate) fn parse_state(s: &str) -> Result<CertState, StoreError> {
    CertState::parse(s).ok_or_else(|| StoreError::Corrupt {
        table: "certificates",
        column: "state",
        detail: format!("unknown state {s:?}"),
    })
}

/// One name set's certificate as stored, without its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRow {
    /// Sorted.
    pub names: Vec<String>,
    pub app: String,
    pub directory: String,
    pub declared: bool,
    pub state: CertState,
    pub last_error: Option<String>,
    pub attempts: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub chain_pem: Option<String>,
    pub serial: Option<String>,
    pub issuer: Option<String>,
    pub not_before: Option<DateTime<Utc>>,
    pub not_after: Option<DateTime<Utc>>,
    pub issued_at: Option<DateTime<Utc>>,
}

/// A name set the applied state declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub app: String,
    /// Any order; stored sorted.
    pub names: Vec<String>,
}

/// A newly issued certificate, its key sealed.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain_pem: String,
    pub key_sealed: String,
    pub serial: String,
    pub issuer: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

const COLUMNS: &str = "names, app, directory, declared, state, last_error, attempts, next_attempt_at, \
     chain_pem, serial, issuer, not_before, not_after, issued_at";

fn sorted(names: &[String]) -> Vec<String> {
    let mut v = names.to_vec();
    v.sort();
    v.dedup();
    v
}

fn row(r: &sqlx::postgres::PgRow) -> Result<CertRow, StoreError> {
    let get = |e: sqlx::Error| StoreError::Query {
        op: "read a certificate row",
        source: e,
    };
    let state: String = r.try_get("state").map_err(get)?;
    let attempts: i32 = r.try_get("attempts").map_err(get)?;
    Ok(CertRow {
        names: r.try_get("names").map_err(get)?,
        app: r.try_get("app").map_err(get)?,
        directory: r.try_get("directory").map_err(get)?,
        declared: r.try_get("declared").map_err(get)?,
        state: parse_state(&state)?,
        last_error: r.try_get("last_error").map_err(get)?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_attempt_at: r.try_get("next_attempt_at").map_err(get)?,
        chain_pem: r.try_get("chain_pem").map_err(get)?,
        serial: r.try_get("serial").map_err(get)?,
        issuer: r.try_get("issuer").map_err(get)?,
        not_before: r.try_get("not_before").map_err(get)?,
        not_after: r.try_get("not_after").map_err(get)?,
        issued_at: r.try_get("issued_at").map_err(get)?,
    })
}

/// Makes the declared name sets exactly `sets`, ordered from `directory`: new ones are inserted
/// `pending` and due at once, known ones stay as they are (a changed directory makes them due at once),
/// and the rest are marked undeclared (kept, never worked on; declaring them again resumes them).
pub async fn declare(pool: &PgPool, directory: &str, sets: &[Declared]) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.op("begin declaring certificates")?;
    let mut keys = Vec::with_capacity(sets.len());
    for s in sets {
        let names = sorted(&s.names);
        keys.push(names.join(" "));
        sqlx::query(
            r#"INSERT INTO certificates (names, app, directory) VALUES ($1, $2, $3)
               ON CONFLICT (names) DO UPDATE SET
                 app = EXCLUDED.app,
                 declared = true,
                 directory = EXCLUDED.directory,
                 next_attempt_at = CASE
                   WHEN certificates.directory <> EXCLUDED.directory OR NOT certificates.declared
                   THEN now() ELSE certificates.next_attempt_at END,
                 attempts = CASE WHEN certificates.declared THEN certificates.attempts ELSE 0 END,
                 updated_at = CASE
                   WHEN certificates.directory <> EXCLUDED.directory OR NOT certificates.declared
                     OR certificates.app <> EXCLUDED.app
                   THEN now() ELSE certificates.updated_at END"#,
        )
        .bind(&names)
        .bind(&s.app)
        .bind(directory)
        .execute(&mut *tx)
        .await
        .op("declare a certificate")?;
    }
    sqlx::query(
        r#"UPDATE certificates SET declared = false, updated_at = now()
           WHERE declared AND array_to_string(names, ' ') <> ALL($1::text[])"#,
    )
    .bind(&keys)
    .execute(&mut *tx)
    .await
    .op("undeclare certificates")?;
    tx.commit().await.op("commit declared certificates")?;
    Ok(())
}

/// The channel [`renew_now`] announces on: every replica's certificate loop wakes
/// ([`crate::certs::serve_loop`]), the leader's among them, which has the applied settings.
pub const DUE: &str = "cairn_certs_due";

/// Makes `app`'s declared name sets due now, an operator's request (the dashboard's "renew"): an issued
/// certificate is renewed (the current one serves until the new one replaces it), a waiting or failed
/// one is tried again with its backoff reset. A name set an attempt holds is left to it. How many.
pub async fn renew_now(pool: &PgPool, app: &str) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await.op("begin renewing certificates")?;
    let n = sqlx::query(
        r#"UPDATE certificates SET next_attempt_at = now(), attempts = 0, updated_at = now()
           WHERE app = $1 AND declared AND (lease_until IS NULL OR lease_until < now())"#,
    )
    .bind(app)
    .execute(&mut *tx)
    .await
    .op("make certificates due")?
    .rows_affected();
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(DUE)
        .execute(&mut *tx)
        .await
        .op("wake the certificate loops")?;
    tx.commit().await.op("renew certificates")?;
    Ok(n)
}

/// Claims the declared name set most overdue, for `lease`: no other claim returns it until the lease
/// ends or [`finish`] ends it. `None` when none is due.
pub async fn claim(
    pool: &PgPool,
    owner: Uuid,
    lease: Duration,
) -> Result<Option<CertRow>, StoreError> {
    let q = format!(
        r#"UPDATE certificates SET lease_owner = $1,
             lease_until = now() + $2::float8 * interval '1 millisecond'
           WHERE names = (
             SELECT names FROM certificates
             WHERE declared AND next_attempt_at <= now()
               AND (lease_until IS NULL OR lease_until < now())
             ORDER BY next_attempt_at LIMIT 1
             FOR UPDATE SKIP LOCKED)
           RETURNING {COLUMNS}"#
    );
    let r = sqlx::query(&q)
        .bind(owner)
        .bind(millis(lease))
        .fetch_optional(pool)
        .await
        .op("claim a certificate")?;
    r.as_ref().map(row).transpose()
}

/// How long until the next declared name set is due (zero when one is), `None` when none is declared.
pub async fn next_due(pool: &PgPool) -> Result<Option<Duration>, StoreError> {
    let r = sqlx::query(
        r#"SELECT extract(epoch FROM min(greatest(next_attempt_at, coalesce(lease_until, next_attempt_at)))
                  - now())::float8 AS secs
           FROM certificates WHERE declared"#,
    )
    .fetch_one(pool)
    .await
    .op("read when a certificate is due")?;
    let secs: Option<f64> = r.try_get("secs").op("read when a certificate is due")?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Sets the state of a claimed name set (`ordering`, `renewing`) while the lease is `owner`'s. `false`
/// when the lease is no longer the caller's.
pub async fn mark(
    pool: &PgPool,
    names: &[String],
    owner: Uuid,
    state: CertState,
) -> Result<bool, StoreError> {
    let r = sqlx::query(
        r#"UPDATE certificates SET state = $3, updated_at = now()
           WHERE names = $1 AND lease_owner = $2 AND lease_until > now()"#,
    )
    .bind(names)
    .bind(owner)
    .bind(state.as_str())
    .execute(pool)
    .await
    .op("mark a certificate's state")?;
    Ok(r.rows_affected() == 1)
}

/// How a claimed attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A new certificate; the previous one is replaced in the same statement.
    Issued {
        cert: Issued,
        renew_at: DateTime<Utc>,
    },
    /// Nothing to do before `next` (a current certificate not yet due for renewal).
    NotDue { next: DateTime<Utc> },
    /// The attempt failed in `state` (`waiting_dns` or `failed`) with `error`; retried at `next`. A
    /// current certificate is kept.
    Failed {
        state: CertState,
        error: String,
        next: DateTime<Utc>,
    },
}

/// Records the outcome of a claimed attempt and ends the lease, while the lease is still `owner`'s.
/// `false` when it is not (the outcome is dropped: another control plane holds the name set now).
pub async fn finish<'e>(
    db: impl sqlx::PgExecutor<'e>,
    names: &[String],
    owner: Uuid,
    outcome: &Outcome,
) -> Result<bool, StoreError> {
    let q = match outcome {
        Outcome::Issued { cert, renew_at } => sqlx::query(
            r#"UPDATE certificates SET state = 'issued', last_error = NULL, attempts = 0,
                 next_attempt_at = $3, chain_pem = $4, key_sealed = $5, serial = $6, issuer = $7,
                 not_before = $8, not_after = $9, issued_at = now(),
                 lease_owner = NULL, lease_until = NULL, updated_at = now()
               WHERE names = $1 AND lease_owner = $2 AND lease_until > now()"#,
        )
        .bind(names)
        .bind(owner)
        .bind(renew_at)
        .bind(&cert.chain_pem)
        .bind(&cert.key_sealed)
        .bind(&cert.serial)
        .bind(&cert.issuer)
        .bind(cert.not_before)
        .bind(cert.not_after),
        Outcome::NotDue { next } => sqlx::query(
            r#"UPDATE certificates SET next_attempt_at = $3,
                 lease_owner = NULL, lease_until = NULL, updated_at = now()
               WHERE names = $1 AND lease_owner = $2 AND lease_until > now()"#,
        )
        .bind(names)
        .bind(owner)
        .bind(next),
        Outcome::Failed { state, error, next } => sqlx::query(
            r#"UPDATE certificates SET state = $3, last_error = $4, attempts = attempts + 1,
                 next_attempt_at = $5, lease_owner = NULL, lease_until = NULL, updated_at = now()
               WHERE names = $1 AND lease_owner = $2 AND lease_until > now()"#,
        )
        .bind(names)
        .bind(owner)
        .bind(state.as_str())
        .bind(error)
        .bind(next),
    };
    let r = q.execute(db).await.op("record a certificate attempt")?;
    Ok(r.rows_affected() == 1)
}

/// Every certificate row (declared or not), by app and names.
pub async fn list(pool: &PgPool) -> Result<Vec<CertRow>, StoreError> {
    let q = format!("SELECT {COLUMNS} FROM certificates ORDER BY app, names");
    let rows = sqlx::query(&q)
        .fetch_all(pool)
        .await
        .op("list certificates")?;
    rows.iter().map(row).collect()
}

/// Declared certificates expiring before `before` whose expiry was not announced yet (no
/// `certificate.expiring` event names their serial): app, names, serial, expiry.
pub async fn expiring_unannounced(
    conn: &mut sqlx::PgConnection,
    before: DateTime<Utc>,
) -> Result<Vec<(String, Vec<String>, String, DateTime<Utc>)>, StoreError> {
    let rows = sqlx::query(
        r#"SELECT c.app, c.names, c.serial, c.not_after FROM certificates c
           WHERE c.declared AND c.serial IS NOT NULL AND c.not_after < $1
             AND NOT EXISTS (SELECT 1 FROM events e
                             WHERE e.kind = 'certificate.expiring' AND e.detail->>'serial' = c.serial)
           ORDER BY c.not_after"#,
    )
    .bind(before)
    .fetch_all(&mut *conn)
    .await
    .op("read expiring certificates")?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("app").op("read expiring certificates")?,
                r.try_get("names").op("read expiring certificates")?,
                r.try_get("serial").op("read expiring certificates")?,
                r.try_get("not_after").op("read expiring certificates")?,
            ))
        })
        .collect()
}

/// The declared certificates as the planner sees them (state, expiry, last error; never a key), through
/// the caller's connection so they belong to the same snapshot as the rest of the observed state.
pub async fn observed_in(
    conn: &mut sqlx::PgConnection,
) -> Result<Vec<cairn_plan::observed::ObservedCert>, StoreError> {
    let rows = sqlx::query(
        "SELECT names, state, not_after, last_error FROM certificates WHERE declared ORDER BY names",
    )
    .fetch_all(&mut *conn)
    .await
    .op("read certificates")?;
    rows.iter()
        .map(|r| {
            let state: String = r.try_get("state").op("read certificates")?;
            Ok(cairn_plan::observed::ObservedCert {
                names: r.try_get("names").op("read certificates")?,
                state: parse_state(&state)?,
                not_after: r.try_get("not_after").op("read certificates")?,
                last_error: r.try_get("last_error").op("read certificates")?,
            })
        })
        .collect()
}

/// Declared certificates by state, and the soonest expiry among them (for `/metrics`).
pub async fn summary(
    pool: &PgPool,
) -> Result<(Vec<(CertState, u64)>, Option<DateTime<Utc>>), StoreError> {
    let rows = sqlx::query(
        "SELECT state, count(*) AS n FROM certificates WHERE declared GROUP BY state ORDER BY state",
    )
    .fetch_all(pool)
    .await
    .op("count certificates by state")?;
    let mut counts = Vec::new();
    for r in rows {
        let s: String = r.try_get("state").op("count certificates by state")?;
        let n: i64 = r.try_get("n").op("count certificates by state")?;
        counts.push((parse_state(&s)?, u64::try_from(n).unwrap_or(0)));
    }
    let soonest: Option<DateTime<Utc>> =
        sqlx::query("SELECT min(not_after) AS t FROM certificates WHERE declared")
            .fetch_one(pool)
            .await
            .op("read the soonest certificate expiry")?
            .try_get("t")
            .op("read the soonest certificate expiry")?;
    Ok((counts, soonest))
}

/// The sealed credentials of the ACME account on `directory`, if one was created.
pub async fn account(pool: &PgPool, directory: &str) -> Result<Option<String>, StoreError> {
    let r = sqlx::query("SELECT credentials_sealed FROM acme_accounts WHERE directory = $1")
        .bind(directory)
        .fetch_optional(pool)
        .await
        .op("read the ACME account")?;
    r.map(|r| r.try_get("credentials_sealed"))
        .transpose()
        .op("read the ACME account")
}

/// Stores the sealed credentials of a new account on `directory` unless another control plane stored
/// one first; returns the stored one (so every control plane uses the same account).
pub async fn store_account(
    pool: &PgPool,
    directory: &str,
    sealed: &str,
) -> Result<String, StoreError> {
    sqlx::query(
        r#"INSERT INTO acme_accounts (directory, credentials_sealed) VALUES ($1, $2)
           ON CONFLICT (directory) DO NOTHING"#,
    )
    .bind(directory)
    .bind(sealed)
    .execute(pool)
    .await
    .op("store the ACME account")?;
    account(pool, directory)
        .await?
        .ok_or_else(|| StoreError::Corrupt {
            table: "acme_accounts",
            column: "directory",
            detail: "the account just stored is gone".into(),
        })
}

/// Forgets the account on `directory` (the CA no longer knows it): the next order creates a new one.
pub async fn forget_account(pool: &PgPool, directory: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM acme_accounts WHERE directory = $1")
        .bind(directory)
        .execute(pool)
        .await
        .op("forget the ACME account")?;
    Ok(())
}

/// Makes every declared name set that waits for DNS due now (unless claimed): a node just came online,
/// so a self-probe that failed for want of an ingress node may pass now. How many.
pub async fn retry_waiting_dns(pool: &PgPool) -> Result<u64, StoreError> {
    let r = sqlx::query(
        r#"UPDATE certificates SET next_attempt_at = now(), updated_at = now()
           WHERE declared AND state = 'waiting_dns' AND next_attempt_at > now()
             AND (lease_until IS NULL OR lease_until < now())"#,
    )
    .execute(pool)
    .await
    .op("retry the certificates waiting for DNS")?;
    Ok(r.rows_affected())
}

/// A certificate the ingress nodes serve: a declared name set with a current chain, its key sealed to
/// the control plane's recipient.
#[derive(Debug, Clone)]
pub struct Served {
    /// Sorted.
    pub names: Vec<String>,
    pub chain_pem: String,
    pub key_sealed: String,
}

/// Every declared name set's current certificate (those without one yet are left out).
pub async fn served(pool: &PgPool) -> Result<Vec<Served>, StoreError> {
    let rows = sqlx::query(
        "SELECT names, chain_pem, key_sealed FROM certificates \
         WHERE declared AND chain_pem IS NOT NULL AND key_sealed IS NOT NULL ORDER BY names",
    )
    .fetch_all(pool)
    .await
    .op("read the certificates to serve")?;
    rows.iter()
        .map(|r| {
            Ok(Served {
                names: r.try_get("names").op("read the certificates to serve")?,
                chain_pem: r
                    .try_get("chain_pem")
                    .op("read the certificates to serve")?,
                key_sealed: r
                    .try_get("key_sealed")
                    .op("read the certificates to serve")?,
            })
        })
        .collect()
}
