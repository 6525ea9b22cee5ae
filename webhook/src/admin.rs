//! The GitHub integration's and the notifications' part of the admin API, mounted next to the
//! reconciler's admin routes and using their authentication ([`AdminAuth`]): no token, a wrong or a
//! revoked one is 401.
//!
//! - `GET /api/v1/webhooks?limit=N`: the recent deliveries and what each caused, newest first (what
//!   `cairn webhooks --server` shows);
//! - `GET /api/v1/notify/deliveries?sink=S&limit=N`: the notification ledger, newest first (`cairn
//!   notify deliveries`): status, attempts, status code, latency, and why one was not sent;
//! - `POST /api/v1/notify/{sink}/test`: sends a test message to the sink now and answers with what
//!   its receiver said (`cairn notify test`).
//!
//! What it must not do: return a delivery's payload (it may carry anything a pusher wrote) or a sink's
//! URL, or run SQL itself (the deliveries and notify modules do).

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use cairn_reconciler::api::admin::AdminAuth;
use cairn_reconciler::api::ui::{LedgerFuture, LedgerRow};
use cairn_reconciler::api::{Api, ApiError, Json};
use serde::Deserialize;

use crate::deliveries::{self, DeliveryRecord};
use crate::notify::{self, Notifier, NotifyConfig, NotifyError};
use cairn_proto::admin::{NotifyDelivery, NotifyTestAnswer};

/// The most a request may ask for.
pub const MAX_LIMIT: u32 = 1000;

/// Routes to nest under the admin API's prefix.
pub fn routes() -> Router<Arc<Api>> {
    Router::new()
        .route("/webhooks", get(recent))
        .route("/notify/deliveries", get(notify_deliveries))
        .route("/notify/{sink}/test", post(notify_test))
}

#[derive(Debug, Deserialize)]
struct Params {
    limit: Option<u32>,
}

async fn recent(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Query(p): Query<Params>,
) -> Result<Json<Vec<DeliveryRecord>>, ApiError> {
    let limit = p.limit.unwrap_or(20);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {limit}"
        )));
    }
    let rows = deliveries::recent(&api.pool, limit)
        .await
        .map_err(|deliveries::DeliveryError(e)| ApiError::Store(e.into()))?;
    Ok(Json(rows))
}

#[derive(Debug, Deserialize)]
struct DeliveryParams {
    sink: Option<String>,
    limit: Option<u32>,
}

fn notify_error(e: NotifyError) -> ApiError {
    match e {
        NotifyError::UnknownSink(_) => ApiError::NotFound(e.to_string()),
        NotifyError::Store(s) => ApiError::Store(s.into()),
        NotifyError::Client(_) => ApiError::Upstream(e.to_string()),
    }
}

async fn notify_deliveries(
    State(api): State<Arc<Api>>,
    _: AdminAuth,
    Query(p): Query<DeliveryParams>,
) -> Result<Json<Vec<NotifyDelivery>>, ApiError> {
    let limit = p.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, not {limit}"
        )));
    }
    let rows = notify::deliveries(&api.pool, p.sink.as_deref(), limit)
        .await
        .map_err(notify_error)?;
    Ok(Json(rows))
}

async fn notify_test(
    State(api): State<Arc<Api>>,
    admin: AdminAuth,
    Path(sink): Path<String>,
) -> Result<Json<NotifyTestAnswer>, ApiError> {
    admin.operator()?;
    let answer = send_test(&api, &sink).await?;
    tracing::info!(%sink, by = %admin.name, status = ?answer.status_code, "test notification sent");
    Ok(Json(answer))
}

/// Sends `sink` a test message now (`POST /api/v1/notify/{sink}/test`, the dashboard's button).
async fn send_test(api: &Api, sink: &str) -> Result<NotifyTestAnswer, ApiError> {
    cairn_schema::Name::new(sink)
        .map_err(|e| ApiError::BadRequest(format!("`{sink}` is not a sink name: {e}")))?;
    let notifier = Notifier::new(
        api.pool.clone(),
        api.identity.clone(),
        NotifyConfig {
            lease: std::time::Duration::from_secs(20),
            ..NotifyConfig::default()
        },
    )
    .map_err(notify_error)?;
    notifier.test(sink).await.map_err(notify_error)
}

/// The ledgers as the dashboard shows them (`cairn serve` hands this to the reconciler's API, which
/// cannot depend on this crate).
#[derive(Debug, Clone, Copy, Default)]
pub struct UiLedger;

impl cairn_reconciler::api::ui::Ledger for UiLedger {
    fn sinks(&self, pool: sqlx::PgPool) -> cairn_reconciler::api::ui::SinksFuture {
        Box::pin(async move {
            notify::sinks(&pool)
                .await
                .map_err(|e| match notify_error(e) {
                    ApiError::Store(s) => s,
                    other => cairn_reconciler::store::StoreError::Corrupt {
                        table: "notify_sinks",
                        column: "name",
                        detail: other.to_string(),
                    },
                })
        })
    }

    fn test(&self, api: Arc<Api>, sink: String) -> cairn_reconciler::api::ui::TestFuture {
        Box::pin(async move { send_test(&api, &sink).await })
    }

    fn webhooks(&self, pool: sqlx::PgPool, limit: u32) -> LedgerFuture {
        Box::pin(async move {
            let rows = deliveries::recent(&pool, limit).await.map_err(
                |deliveries::DeliveryError(e)| cairn_reconciler::store::StoreError::from(e),
            )?;
            Ok(rows
                .into_iter()
                .map(|d| LedgerRow {
                    at: d.received_at,
                    what: match d.action {
                        Some(a) => format!("{} ({a})", d.event),
                        None => d.event,
                    },
                    status: d.status.as_str().to_owned(),
                    attempts: u32::try_from(d.attempts).unwrap_or(0),
                    detail: d.outcome.unwrap_or_default(),
                })
                .collect())
        })
    }

    fn notifications(&self, pool: sqlx::PgPool, limit: u32) -> LedgerFuture {
        Box::pin(async move {
            let rows = notify::deliveries(&pool, None, limit)
                .await
                .map_err(|e| match e {
                    NotifyError::Store(s) => s.into(),
                    other => cairn_reconciler::store::StoreError::Corrupt {
                        table: "notify_outbox",
                        column: "*",
                        detail: other.to_string(),
                    },
                })?;
            Ok(rows
                .into_iter()
                .map(|d| LedgerRow {
                    at: d.created_at,
                    what: format!("{} → {}", d.event.kind, d.sink),
                    status: d.status,
                    attempts: d.attempts,
                    detail: match (d.status_code, d.latency_ms, d.reason) {
                        (Some(c), Some(ms), _) => format!("HTTP {c} in {ms} ms"),
                        (Some(c), None, _) => format!("HTTP {c}"),
                        (None, _, Some(r)) => r,
                        _ => String::new(),
                    },
                })
                .collect())
        })
    }
}
