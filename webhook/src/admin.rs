//! The GitHub integration's part of the admin API: `GET /api/v1/webhooks?limit=N`, the recent deliveries
//! and what each caused, newest first (what `cairn webhooks --server` shows). It is mounted next to the
//! reconciler's admin routes and uses their authentication ([`AdminAuth`]): no token, a wrong or a
//! revoked one is 401.
//!
//! What it must not do: return a delivery's payload (it may carry anything a pusher wrote), or run SQL
//! itself (the deliveries module reads them).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use cairn_reconciler::api::admin::AdminAuth;
use cairn_reconciler::api::{Api, ApiError, Json};
use serde::Deserialize;

use crate::deliveries::{self, DeliveryRecord};

/// The most a request may ask for.
pub const MAX_LIMIT: u32 = 1000;

/// Routes to nest under the admin API's prefix.
pub fn routes() -> Router<Arc<Api>> {
    Router::new().route("/webhooks", get(recent))
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
