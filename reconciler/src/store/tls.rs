//! The parts of the TLS table only one control plane knows at first (migration `…200000_shared_tls.sql`):
//! the ACME answers of the orders its certificate worker runs, and the applied apps' own certificates,
//! which the leader reads from the repository. Each is written here by the replica that has it and read
//! by every replica's route table ([`crate::routes::Routes::refresh`]), so an agent polling any replica
//! installs the same table. A write announces itself on [`CHANGED`].
//!
//! What it must not do: hold a key in plaintext (the own certificates' keys stay the manifest's age
//! ciphertext), or let a dead replica's answers linger (they are pruned by age).

use std::collections::BTreeMap;

use sqlx::{PgPool, Row as _};
use uuid::Uuid;

use super::lease::Fence;
use super::{Op as _, StoreError};

/// An applied app's own certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnCertificate {
    pub id: String,
    pub names: Vec<String>,
    pub chain_pem: String,
    /// The manifest's age ciphertext, sealed to the control plane's recipient.
    pub key_sealed: String,
}

/// ACME answers by key: HTTP-01 token to key authorization, or TLS-ALPN-01 name to digest.
pub type Answers = BTreeMap<String, String>;

/// The channel every write here is announced on (no payload): each replica's route table refreshes.
pub const CHANGED: &str = "cairn_tls";

/// Answers older than this are a replica's that died mid-order (an order times out long before).
pub const ANSWER_MAX_AGE_SECS: f64 = 3600.0;

const HTTP: &str = "http-01";
const ALPN: &str = "tls-alpn-01";

/// Replaces the answers `replica` put up with `http` (HTTP-01) and `alpn` (TLS-ALPN-01), prunes a dead
/// replica's, and announces the change.
pub async fn put_answers(
    pool: &PgPool,
    replica: Uuid,
    http: &Answers,
    alpn: &Answers,
) -> Result<(), StoreError> {
    let (mut kinds, mut keys, mut answers) = (Vec::new(), Vec::new(), Vec::new());
    for (token, ka) in http {
        kinds.push(HTTP);
        keys.push(token.as_str());
        answers.push(ka.as_str());
    }
    for (name, digest) in alpn {
        kinds.push(ALPN);
        keys.push(name.as_str());
        answers.push(digest.as_str());
    }
    let mut tx = pool.begin().await.op("begin storing the ACME answers")?;
    sqlx::query(
        "DELETE FROM acme_answers
         WHERE replica = $1 OR added_at < clock_timestamp() - make_interval(secs => $2)",
    )
    .bind(replica)
    .bind(ANSWER_MAX_AGE_SECS)
    .execute(&mut *tx)
    .await
    .op("withdraw the ACME answers")?;
    sqlx::query(
        "INSERT INTO acme_answers (kind, key, answer, replica)
         SELECT k, t, a, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS x(k, t, a)
         ON CONFLICT (kind, key) DO UPDATE
             SET answer = excluded.answer, replica = excluded.replica, added_at = excluded.added_at",
    )
    .bind(&kinds)
    .bind(&keys)
    .bind(&answers)
    .bind(replica)
    .execute(&mut *tx)
    .await
    .op("store the ACME answers")?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANGED)
        .execute(&mut *tx)
        .await
        .op("announce the ACME answers")?;
    tx.commit().await.op("store the ACME answers")
}

/// Every replica's answers in flight: HTTP-01's and TLS-ALPN-01's.
pub async fn answers(pool: &PgPool) -> Result<(Answers, Answers), StoreError> {
    let rows = sqlx::query("SELECT kind, key, answer FROM acme_answers")
        .fetch_all(pool)
        .await
        .op("read the ACME answers")?;
    let (mut http, mut alpn) = (Answers::new(), Answers::new());
    for r in rows {
        let kind: String = r.try_get("kind").op("read the ACME answers")?;
        let key: String = r.try_get("key").op("read the ACME answers")?;
        let answer: String = r.try_get("answer").op("read the ACME answers")?;
        match kind.as_str() {
            ALPN => alpn.insert(key, answer),
            _ => http.insert(key, answer),
        };
    }
    Ok((http, alpn))
}

/// A digest of `own` in order: what [`put_own`] compares with the stored set's.
fn digest(own: &[OwnCertificate]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for c in own {
        let names = c.names.join(",");
        for part in [&c.id, &names, &c.chain_pem, &c.key_sealed] {
            h.update(part.len().to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Stores the applied apps' own certificates of `commit` unless the stored set is the same; says
/// whether it wrote. In a leader's term, `fence` is checked before anything is written.
pub async fn put_own(
    pool: &PgPool,
    fence: Option<&Fence>,
    commit: &str,
    own: &[OwnCertificate],
) -> Result<bool, StoreError> {
    let digest = digest(own);
    let mut tx = pool.begin().await.op("begin storing own certificates")?;
    let stored: Option<String> =
        sqlx::query_scalar("SELECT digest FROM own_certificates_applied FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await
            .op("read the stored own certificates")?;
    if stored.as_deref() == Some(digest.as_str()) {
        return Ok(false);
    }
    if let Some(fence) = fence {
        super::lease::check(&mut tx, fence).await?;
    }
    sqlx::query("DELETE FROM own_certificates")
        .execute(&mut *tx)
        .await
        .op("replace own certificates")?;
    for c in own {
        sqlx::query(
            "INSERT INTO own_certificates (id, names, chain_pem, key_sealed) VALUES ($1, $2, $3, $4)",
        )
        .bind(&c.id)
        .bind(&c.names)
        .bind(&c.chain_pem)
        .bind(&c.key_sealed)
        .execute(&mut *tx)
        .await
        .op("store an own certificate")?;
    }
    sqlx::query(
        "INSERT INTO own_certificates_applied (commit, digest) VALUES ($1, $2)
         ON CONFLICT (singleton) DO UPDATE
             SET commit = excluded.commit, digest = excluded.digest, written_at = excluded.written_at",
    )
    .bind(commit)
    .bind(&digest)
    .execute(&mut *tx)
    .await
    .op("record the own certificates written")?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANGED)
        .execute(&mut *tx)
        .await
        .op("announce own certificates")?;
    tx.commit().await.op("store own certificates")?;
    Ok(true)
}

/// The applied apps' own certificates, or `None` while no control plane has written the set yet.
pub async fn own(pool: &PgPool) -> Result<Option<Vec<OwnCertificate>>, StoreError> {
    let mut tx = pool.begin().await.op("begin reading own certificates")?;
    let written: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM own_certificates_applied)")
            .fetch_one(&mut *tx)
            .await
            .op("read own certificates")?;
    if !written {
        return Ok(None);
    }
    let rows =
        sqlx::query("SELECT id, names, chain_pem, key_sealed FROM own_certificates ORDER BY id")
            .fetch_all(&mut *tx)
            .await
            .op("read own certificates")?;
    tx.commit().await.op("read own certificates")?;
    let op = "read own certificates";
    rows.iter()
        .map(|r| {
            Ok(OwnCertificate {
                id: r.try_get("id").op(op)?,
                names: r.try_get("names").op(op)?,
                chain_pem: r.try_get("chain_pem").op(op)?,
                key_sealed: r.try_get("key_sealed").op(op)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()
        .map(Some)
}
