//! The web dashboard under `/ui`, served by `cairn serve` with the APIs: server-rendered pages
//! (askama templates in `reconciler/templates/ui/`, HTML-escaped by default), one stylesheet and one
//! small script of our own compiled into the binary, every page usable without the script.
//!
//! - Sign-in (`/ui/login`): an admin API token is exchanged for a server-side session (a random id in
//!   an HttpOnly, SameSite=Strict cookie, Secure when a trusted proxy says the request came over HTTPS;
//!   only the id's hash is stored, `store::tokens::create_session`). A session ends at sign-out, after
//!   [`SESSION_TTL`], or when its token is revoked.
//! - Pages ([`pages`]): overview (failing first), an app, a release's build output, an app's replica
//!   output, a node, reconciliations, webhook and notification deliveries. Read-mostly: what git owns
//!   is shown, never edited.
//! - Live ([`live`]): server-sent events for build and replica output, woken in memory like `cairn logs
//!   --follow`, resumable with `Last-Event-ID`.
//! - Actions git does not own (rollback, unpin, restart, deploy now, renew an app's certificates, back a
//!   database up now, send a sink a test message; [`ops`] has the last two and the databases page): a
//!   confirmation page, then a POST carrying the session's CSRF token; an operator's only. A viewer sees
//!   no action and gets 403.
//!
//! Every answer carries `Content-Security-Policy: default-src 'self'` (no inline script or style, no
//! other origin), `X-Content-Type-Options: nosniff`, `Referrer-Policy: same-origin`, and pages are
//! `Cache-Control: no-store`.
//!
//! What it must not do: run SQL (the store does), show a token, a session id or a secret, edit what
//! git owns, or act on a request without a session, the operator role and the session's CSRF token.

mod live;
mod ops;
mod pages;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use sha2::{Digest as _, Sha256};

use super::Api;
use super::auth::{generate, hash, well_formed};
use crate::store::tokens::{self, AdminToken, Role};

/// Where the dashboard is mounted.
pub const PREFIX: &str = "/ui";
/// The session cookie's name.
pub const COOKIE: &str = "cairn_session";
/// The prefix of a session id (256 random bits follow, like every token's).
const SESSION_PREFIX: &str = "cairn-ui-";
/// How long a sign-in lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The policy every answer of the dashboard carries.
pub const CSP: &str =
    "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// The dashboard's routes (under [`PREFIX`]; `/ui` and `/ui/` are both the overview).
pub(super) fn routes() -> Router<Arc<Api>> {
    let r = |path: &str| format!("{PREFIX}{path}");
    Router::new()
        .route(PREFIX, get(pages::overview))
        .route(&r("/"), get(pages::overview))
        .route(&r("/login"), get(pages::login_form).post(pages::login))
        .route(&r("/logout"), post(pages::logout))
        .route(&r("/reconciliations"), get(pages::reconciliations))
        .route(&r("/deliveries"), get(pages::deliveries))
        .route(&r("/databases"), get(ops::databases))
        .route(
            &r("/databases/{db}/actions/{action}"),
            get(ops::db_confirm).post(ops::db_act),
        )
        .route(
            &r("/sinks/{sink}/test"),
            get(ops::sink_confirm).post(ops::sink_act),
        )
        .route(&r("/nodes/{node}"), get(pages::node))
        .route(&r("/apps/{app}"), get(pages::app))
        .route(&r("/apps/{app}/releases/{release}"), get(pages::build))
        .route(
            &r("/apps/{app}/releases/{release}/stream"),
            get(live::build),
        )
        .route(&r("/apps/{app}/logs"), get(pages::logs))
        .route(&r("/apps/{app}/logs/stream"), get(live::logs))
        .route(
            &r("/apps/{app}/actions/{action}"),
            get(pages::confirm).post(pages::act),
        )
        .route(&r("/static/cairn.css"), get(css))
        .route(&r("/static/cairn.js"), get(js))
        .layer(middleware::from_fn(security_headers))
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("static/cairn.css"))
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("static/cairn.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// A signed-in user: the admin token the session was made with, and the session's CSRF token.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: AdminToken,
    id_hash: String,
    csrf: String,
}

impl Session {
    pub fn can_act(&self) -> bool {
        self.token.role == Role::Operator
    }

    /// The CSRF token every form of this session carries.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether `presented` is this session's CSRF token (compared in constant time).
    fn csrf_ok(&self, presented: &str) -> bool {
        let (a, b) = (self.csrf.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The CSRF token of session `id`: derived from the id, which only its cookie holds (the database keeps
/// its hash, from which the CSRF token cannot be computed).
fn csrf_of(id: &str) -> String {
    hex::encode(Sha256::digest(format!("cairn-ui-csrf:{id}").as_bytes()))
}

/// The session id the request's cookie carries, if well formed.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| well_formed(v, SESSION_PREFIX))
}

/// Not signed in: pages send the browser to the sign-in page (303); streams and forms answer 401.
#[derive(Debug)]
pub struct SignIn;

impl IntoResponse for SignIn {
    fn into_response(self) -> Response {
        (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, format!("{PREFIX}/login"))],
        )
            .into_response()
    }
}

impl FromRequestParts<Arc<Api>> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, Response> {
        let Some(id) = session_cookie(&parts.headers) else {
            return Err(SignIn.into_response());
        };
        let id_hash = hash(id);
        match tokens::session(&api.pool, &id_hash).await {
            Ok(Some(token)) => Ok(Session {
                token,
                csrf: csrf_of(id),
                id_hash,
            }),
            Ok(None) => Err(SignIn.into_response()),
            Err(e) => Err(pages::error_page(super::ApiError::Store(e))),
        }
    }
}

/// Makes a session for `token`; returns the `Set-Cookie` value that carries it.
async fn open_session(
    api: &Api,
    token: &AdminToken,
    secure: bool,
) -> Result<String, super::ApiError> {
    let id = generate(SESSION_PREFIX);
    tokens::create_session(&api.pool, &hash(&id), token.id, SESSION_TTL).await?;
    tracing::info!(token = token.id, name = %token.name, role = token.role.as_str(), "dashboard sign-in");
    Ok(cookie(&id, SESSION_TTL.as_secs(), secure))
}

fn cookie(value: &str, max_age: u64, secure: bool) -> String {
    format!(
        "{COOKIE}={value}; Path={PREFIX}; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Whether the request came over HTTPS: only a trusted reverse proxy can say so (`cairn serve` itself
/// listens on plain HTTP).
fn over_https(api: &Api, parts: &Parts) -> bool {
    let peer_trusted = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .is_some_and(|axum::extract::ConnectInfo(a)| api.cfg.trusted_proxies.contains(&a.ip()));
    peer_trusted
        && parts
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// One row of a ledger the dashboard shows (webhook deliveries, notifications).
#[derive(Debug, Clone)]
pub struct LedgerRow {
    pub at: DateTime<Utc>,
    /// What was delivered (`push`, `deploy.failed → ops`).
    pub what: String,
    pub status: String,
    pub attempts: u32,
    /// What it caused, or why it failed.
    pub detail: String,
}

/// What a [`Ledger`] answers.
pub type LedgerFuture = BoxFuture<'static, Result<Vec<LedgerRow>, crate::store::StoreError>>;

/// What a [`Ledger`] answers for the sinks.
pub type SinksFuture = BoxFuture<'static, Result<Vec<String>, crate::store::StoreError>>;

/// What a [`Ledger`] answers for a sink's test.
pub type TestFuture =
    BoxFuture<'static, Result<cairn_proto::admin::NotifyTestAnswer, super::ApiError>>;

/// The ledgers of the GitHub integration and the notifications, and the notification sinks, which live
/// in a crate above this one.
pub trait Ledger: Send + Sync + std::fmt::Debug {
    /// The newest webhook deliveries, newest first.
    fn webhooks(&self, pool: sqlx::PgPool, limit: u32) -> LedgerFuture;
    /// The newest notification deliveries, newest first.
    fn notifications(&self, pool: sqlx::PgPool, limit: u32) -> LedgerFuture;
    /// The applied notification sinks' names.
    fn sinks(&self, pool: sqlx::PgPool) -> SinksFuture;
    /// Sends `sink` a test message now (with the API's pool and identity) and returns what its
    /// receiver answered.
    fn test(&self, api: Arc<Api>, sink: String) -> TestFuture;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_read_only_when_well_formed() {
        let id = generate(SESSION_PREFIX);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=b; {COOKIE}={id}; c=d").parse().unwrap(),
        );
        assert_eq!(session_cookie(&h), Some(id.as_str()));
        h.insert(header::COOKIE, format!("{COOKIE}=x'--").parse().unwrap());
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let c = cookie("v", 10, false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        assert!(cookie("v", 10, true).ends_with("; Secure"));
    }

    #[test]
    fn csrf_tokens_differ_per_session_and_compare_exactly() {
        let (a, b) = (generate(SESSION_PREFIX), generate(SESSION_PREFIX));
        assert_ne!(csrf_of(&a), csrf_of(&b));
        let s = Session {
            token: AdminToken {
                id: 1,
                name: "t".into(),
                role: Role::Viewer,
            },
            id_hash: hash(&a),
            csrf: csrf_of(&a),
        };
        assert!(s.csrf_ok(&csrf_of(&a)));
        assert!(!s.csrf_ok(&csrf_of(&b)));
        assert!(!s.csrf_ok(""));
    }
}
