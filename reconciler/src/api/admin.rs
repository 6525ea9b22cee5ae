//! The admin API (`/api/v1`): what operators' `cairn` commands call when given `--server` and a token,
//! so nobody needs database credentials on a laptop. Every route needs `Authorization: Bearer <admin
//! token>` (`cairn token create`); a missing, wrong or revoked one is 401.
//!
//! - `GET /status?app=&after=&limit=`: the same [`crate::status::Status`] `cairn status` computes from
//!   the database (a page of apps: [`crate::status::StatusQuery`]);
//! - `GET /certs`: every declared name set's certificate: state, issuer, expiry, last error (never a
//!   key);
//! - `GET /events?app=X&after=ID&limit=N`: the newest `limit` events (of `app`, after `after`), oldest
//!   first (`cairn events`, which follows by asking for what came after the last id);
//! - `GET /nodes`: every declared node with what its agent last reported;
//! - `POST /nodes/{node}/join-tokens`, `GET /nodes/{node}/join-tokens`: issue a one-time join token
//!   (shown once), list them (never the token);
//! - `GET /usage?month=YYYY-MM&by=app|slot|plan|node`: a month's metered usage (default: this month,
//!   by app) and its statement's hash once closed; `GET /usage/statements/{YYYY-MM}`: a closed month's
//!   statement (its canonical CSV bytes); `POST /usage/recompute?month=`: roll the month's hours up again
//!   (idempotent);
//! - `DELETE /nodes/{node}/credential`: revoke the node's agent credential (its agent gets 401 until it
//!   joins again with a new token).
//!
//! What it must not do: run SQL (the store does), or return a stored token or credential: only the answer
//! that creates a join token carries it.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{delete, get};
use cairn_proto::ADMIN_TOKEN_PREFIX;
use cairn_proto::admin::{JoinToken, JoinTokenInfo, JoinTokenRequest, NodeInfo, Revoked};
use cairn_schema::Name;

use super::auth::{self, IssueError, bearer, hash, well_formed};
use super::{Api, ApiError, Json};
use crate::status::{self, Status};
use crate::store::{nodes, tokens, usage};
use cairn_proto::admin::{UsageBy, UsageRecomputed, UsageReport};

pub(super) fn routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/status", get(get_status))
        .route("/certs", get(certs))
        .route("/events", get(events))
        .route("/nodes", get(nodes))
        .route(
            "/nodes/{node}/join-tokens",
            get(join_tokens).post(create_join_token),
        )
        .route("/nodes/{node}/credential", delete(revoke_credential))
        .route("/usage", get(usage))
        .route("/usage/recompute", axum::routing::post(usage_recompute))
        .route("/usage/statements/{month}", get(usage_statement))
}

/// An admin token's holder (401 otherwise), within its rate limit.
#[derive(Debug)]
pub struct AdminAuth {
    pub id: i64,
    pub name: String,
    pub role: tokens::Role,
}

impl AdminAuth {
    /// Refuses (403) a token that may only read: every write endpoint asks this first.
    pub fn operator(&self) -> Result<(), ApiError> {
        require_operator(self.role)
    }
}

/// 403 unless `role` may act.
pub fn require_operator(role: tokens::Role) -> Result<(), ApiError> {
    if role == tokens::Role::Operator {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "this token is a viewer's: it may read but not act (make one with `cairn token create \
             --role operator`)"
                .into(),
        ))
    }
}

impl FromRequestParts<Arc<Api>> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, ApiError> {
        let client = api.client(parts);
        let token_hash = bearer(&parts.headers)
            .filter(|t| well_formed(t, ADMIN_TOKEN_PREFIX))
            .map(hash);
        api.admit(&client, token_hash.as_deref())?;
        let Some(token_hash) = token_hash else {
            return Err(api.failed(&client));
        };
        let Some(t) = tokens::admin_by_token(&api.pool, &token_hash).await? else {
            return Err(api.failed(&client));
        };
        api.authenticated(&token_hash);
        api.admin_limit
            .check(&t.id.to_string())
            .map_err(ApiError::TooMany)?;
        Ok(AdminAuth {
            id: t.id,
            name: t.name,
            role: t.role,
        })
    }
}

fn node_name(s: &str) -> Result<Name, ApiError> {
    Name::new(s).map_err(|e| ApiError::BadRequest(format!("`{s}` is not a node name: {e}")))
}

async fn get_status(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Query(query): Query<status::StatusQuery>,
) -> Result<Json<Status>, ApiError> {
    Ok(Json(
        status::load(&api.pool, api.cfg.offline_after, &query).await?,
    ))
}

async fn certs(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
) -> Result<Json<Vec<cairn_proto::admin::CertificateInfo>>, ApiError> {
    Ok(Json(crate::certs::list(&api.pool).await?))
}

/// The most events one request may ask for.
pub const MAX_EVENTS: u32 = 1000;

#[derive(Debug, serde::Deserialize)]
struct EventParams {
    app: Option<String>,
    after: Option<i64>,
    limit: Option<u32>,
}

async fn events(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    axum::extract::Query(p): axum::extract::Query<EventParams>,
) -> Result<Json<Vec<cairn_proto::admin::EventInfo>>, ApiError> {
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_EVENTS {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_EVENTS}, not {limit}"
        )));
    }
    if let Some(app) = &p.app {
        Name::new(app)
            .map_err(|e| ApiError::BadRequest(format!("`{app}` is not an app name: {e}")))?;
    }
    let filter = crate::events::Filter {
        app: p.app,
        after: p.after,
        limit,
    };
    Ok(Json(crate::events::list(&api.pool, &filter).await?))
}

async fn nodes(State(api): State<Arc<Api>>, _: AdminAuth) -> Result<Json<Vec<NodeInfo>>, ApiError> {
    let now = chrono::Utc::now();
    let rows = nodes::nodes(&api.pool).await?;
    Ok(Json(
        rows.into_iter()
            .map(|n| NodeInfo {
                state: status::shown_state(n.state, n.last_heartbeat, now, api.cfg.offline_after)
                    .as_str()
                    .to_owned(),
                name: n.name,
                joined_at: n.joined_at,
                last_heartbeat: n.last_heartbeat,
                has_credential: n.has_credential,
                recipient: n.recipient,
                drivers: n.drivers,
                agent_version: n.agent_version,
                resources: n.resources,
                replicas: n.replicas,
            })
            .collect(),
    ))
}

async fn create_join_token(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(node): Path<String>,
    Json(req): Json<JoinTokenRequest>,
) -> Result<(StatusCode, Json<JoinToken>), ApiError> {
    admin.operator()?;
    let node = node_name(&node)?;
    let ttl = std::time::Duration::from_secs(req.ttl_secs);
    let token = auth::issue_join_token(&api.pool, &node, ttl, req.replace)
        .await
        .map_err(|e| match e {
            IssueError::UnknownNode(_) => ApiError::NotFound(e.to_string()),
            IssueError::Store(s) => ApiError::Store(s),
            other => ApiError::BadRequest(other.to_string()),
        })?;
    tracing::info!(%node, by = %admin.name, replace = req.replace, "join token issued through the admin API");
    Ok((StatusCode::CREATED, Json(token)))
}

async fn join_tokens(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Path(node): Path<String>,
) -> Result<Json<Vec<JoinTokenInfo>>, ApiError> {
    let node = node_name(&node)?;
    if !nodes::node_declared(&api.pool, &node).await? {
        return Err(ApiError::NotFound(format!(
            "node `{node}` is not in the applied configuration"
        )));
    }
    let rows = tokens::join_tokens(&api.pool, &node).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| JoinTokenInfo {
                id: r.id,
                node: r.node,
                created_at: r.created_at,
                expires_at: r.expires_at,
                used_at: r.used_at,
            })
            .collect(),
    ))
}

async fn revoke_credential(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(node): Path<String>,
) -> Result<Json<Revoked>, ApiError> {
    admin.operator()?;
    let node = node_name(&node)?;
    if !nodes::node_declared(&api.pool, &node).await? {
        return Err(ApiError::NotFound(format!(
            "node `{node}` is not in the applied configuration"
        )));
    }
    let revoked = nodes::revoke_credential(&api.pool, &node).await?;
    tracing::info!(%node, revoked, by = %admin.name, "node credential revoked");
    Ok(Json(Revoked { revoked }))
}

#[derive(Debug, serde::Deserialize)]
struct UsageParams {
    month: Option<String>,
    by: Option<String>,
}

/// `month` as `YYYY-MM` (this month when absent), 400 otherwise.
async fn usage_month(api: &Api, month: Option<&str>) -> Result<chrono::NaiveDate, ApiError> {
    match month {
        Some(m) => usage::parse_month(m).ok_or_else(|| {
            ApiError::BadRequest(format!("month `{m}` is not a month such as 2026-11"))
        }),
        None => Ok(usage::db_now(&api.pool).await?.date_naive()),
    }
}

async fn usage(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    axum::extract::Query(p): axum::extract::Query<UsageParams>,
) -> Result<Json<UsageReport>, ApiError> {
    let month = usage_month(&api, p.month.as_deref()).await?;
    let by = match p.by.as_deref() {
        None | Some("app") => UsageBy::App,
        Some("slot") => UsageBy::Slot,
        Some("plan") => UsageBy::Plan,
        Some("node") => UsageBy::Node,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "by `{other}` is not one of app, slot, plan, node"
            )));
        }
    };
    Ok(Json(usage::report(&api.pool, month, by).await?))
}

async fn usage_recompute(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    axum::extract::Query(p): axum::extract::Query<UsageParams>,
) -> Result<Json<UsageRecomputed>, ApiError> {
    admin.operator()?;
    let month = usage_month(&api, p.month.as_deref()).await?;
    let now = usage::db_now(&api.pool).await?;
    let hours = usage::recompute_month(&api.pool, month, now).await?;
    tracing::info!(month = %usage::month_label(month), hours, by = %admin.name, "usage recomputed");
    Ok(Json(UsageRecomputed { hours }))
}

async fn usage_statement(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Path(month): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let m = usage_month(&api, Some(&month)).await?;
    let Some((body, s)) = usage::statement(&api.pool, m).await? else {
        return Err(ApiError::NotFound(format!(
            "month {month} is not closed: it closes 48 hours after its end"
        )));
    };
    Ok(axum::response::Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")
        .header("x-cairn-sha256", s.sha256)
        .body(axum::body::Body::from(body))
        .expect("a statement response builds"))
}
