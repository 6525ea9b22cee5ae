//! Tokens and credentials: how they are made, hashed and checked, and the operations that issue them
//! (shared by the admin API and the CLI's database path, so both make the same tokens).
//!
//! Every token is a fixed prefix (what it is for, so a leaked one is recognisable) and 256 random bits in
//! hex from the operating system's generator. The database keeps `sha256:<hex>` of the whole token and
//! nothing else; a request is authenticated by hashing what it presents and looking the hash up.
//!
//! What it must not do: log, store or return a token anywhere but in the one answer that hands it out.

use std::time::Duration;

use axum::http::{HeaderMap, header};
use cairn_proto::admin::JoinToken;
use cairn_proto::{ADMIN_TOKEN_PREFIX, CREDENTIAL_PREFIX, JOIN_TOKEN_PREFIX};
use cairn_schema::Name;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

use crate::store::{StoreError, tokens};

/// The longest a join token may be valid.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a join token is valid unless asked otherwise.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// A new random token: `prefix` and 64 hex digits.
pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// What the database keeps of a token.
pub fn hash(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// Whether `token` has the shape of a token made with `prefix` (checked before any lookup, so garbage
/// costs no query).
pub fn well_formed(token: &str, prefix: &str) -> bool {
    token
        .strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The bearer token of a request, if it sent one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(
        "node `{0}` is not in the applied configuration: declare it in the config repository and apply \
         first"
    )]
    UnknownNode(Name),
    #[error("a join token may be valid for at most {} hours", MAX_JOIN_TOKEN_TTL.as_secs() / 3600)]
    TtlTooLong,
    #[error("a join token must be valid for at least a second")]
    TtlTooShort,
    #[error(
        "`{0}` is not a token name: use 1 to 100 letters, digits, `.`, `_`, `@` or `-`, starting with \
         a letter or digit"
    )]
    BadName(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Issues a one-time join token for `node`, valid for `ttl`. With `replace`, it may join the node while
/// it holds a live credential, which the join revokes (an operator's explicit re-join); without, such a
/// join is refused.
pub async fn issue_join_token(
    pool: &PgPool,
    node: &Name,
    ttl: Duration,
    replace: bool,
) -> Result<JoinToken, IssueError> {
    if ttl > MAX_JOIN_TOKEN_TTL {
        return Err(IssueError::TtlTooLong);
    }
    if ttl < Duration::from_secs(1) {
        return Err(IssueError::TtlTooShort);
    }
    let token = generate(JOIN_TOKEN_PREFIX);
    let row = tokens::create_join_token(pool, node, &hash(&token), ttl, replace)
        .await?
        .ok_or_else(|| IssueError::UnknownNode(node.clone()))?;
    tracing::info!(node = %node, id = row.id, expires_at = %row.expires_at, replace, "join token issued");
    Ok(JoinToken {
        id: row.id,
        node: row.node,
        token,
        expires_at: row.expires_at,
        replace,
    })
}

/// Issues an admin API token named `name` with `role`; returns its id and the token (shown once).
pub async fn issue_admin_token(
    pool: &PgPool,
    name: &str,
    role: tokens::Role,
) -> Result<(i64, String), IssueError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if !ok {
        return Err(IssueError::BadName(name.to_owned()));
    }
    let token = generate(ADMIN_TOKEN_PREFIX);
    let id = tokens::create_admin_token(pool, name, &hash(&token), role).await?;
    tracing::info!(id, name, role = role.as_str(), "admin token issued");
    Ok((id, token))
}

/// A new agent credential and its hash.
pub fn new_credential() -> (String, String) {
    let c = generate(CREDENTIAL_PREFIX);
    let h = hash(&c);
    (c, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hashed() {
        let a = generate(JOIN_TOKEN_PREFIX);
        let b = generate(JOIN_TOKEN_PREFIX);
        assert_ne!(a, b);
        assert!(well_formed(&a, JOIN_TOKEN_PREFIX));
        assert!(!well_formed(&a, CREDENTIAL_PREFIX));
        assert!(!well_formed("cairn-join-xyz", JOIN_TOKEN_PREFIX));
        let h = hash(&a);
        assert!(h.starts_with("sha256:") && h.len() == 7 + 64 && !h.contains(&a[11..]));
        assert_eq!(h, hash(&a));
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
