//! The GitHub webhook endpoint, `POST /webhooks/github`: an axum [`Router`] that `cairn serve` merges
//! into its own.
//!
//! A delivery is answered in milliseconds. Before any byte of its body is read, its headers are checked:
//! a missing or ill-formed `X-Hub-Signature-256` is 401, a missing or invalid event or delivery id 400,
//! a `Content-Length` past [`MAX_BODY_BYTES`] 413. Bodies not verified yet are bounded in number
//! ([`MAX_UNVERIFIED_BODIES`] at once, 429 with `Retry-After` beyond) and in bytes
//! ([`MAX_BUFFERED_BYTES`] reserved at once, by `Content-Length` or the whole limit for a chunked body:
//! 429 with `Retry-After` beyond), so parallel large unsigned bodies cannot grow memory without bound.
//! Then its body is read (413 as soon as a chunked body passes the limit), its signature verified (401,
//! nothing recorded), its payload parsed for its event (400 when it is not JSON or not the shape GitHub
//! sends), and it is recorded in `webhook_deliveries` under its
//! `X-GitHub-Delivery` id (a redelivery is answered "already received" and changes nothing). Then the
//! worker is woken through the [`Notify`] the caller gave; it does the rest from the durable record
//! ([`crate::deliveries`]).
//!
//! What it must not do: act on a delivery (no reconciler call, no git, no GitHub call happens while
//! GitHub waits for the answer), record anything whose signature did not verify, answer a client's
//! mistake with a 5xx, or let an internal error's text reach the response.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use cairn_reconciler::metrics::DeliveryOutcome;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument as _;

use crate::events::{Event, EventError};
use crate::signature::{self, SignatureError, WebhookSecret};
use crate::store::{self, NewDelivery, StoreError};
use cairn_schema::error::chain;

/// Where GitHub posts deliveries.
pub const WEBHOOK_PATH: &str = "/webhooks/github";
/// GitHub caps payloads at 25 MB; anything larger is not from GitHub.
pub const MAX_BODY_BYTES: usize = 25 * 1024 * 1024;
/// `X-GitHub-Event`.
pub const EVENT_HEADER: &str = "x-github-event";
/// `X-GitHub-Delivery`, a GUID per delivery that a redelivery repeats.
pub const DELIVERY_HEADER: &str = "x-github-delivery";

/// Request bodies read before their signature is verified, at most at once.
pub const MAX_UNVERIFIED_BODIES: usize = 8;
/// Bytes reserved for bodies being read and handled, at most at once (two bodies of GitHub's limit, or
/// many of the usual few kilobytes).
pub const MAX_BUFFERED_BYTES: usize = 2 * MAX_BODY_BYTES + 16 * 1024 * 1024;

struct Receiver {
    pool: PgPool,
    secret: WebhookSecret,
    wake: Arc<Notify>,
    /// One permit per body being read before verification.
    unverified: Arc<Semaphore>,
    /// One permit per KiB reserved for a body.
    buffered: Arc<Semaphore>,
}

/// The webhook endpoint. Deliveries are recorded in `pool`; `wake` is notified after each new one.
///
/// The router reads bodies itself (it does not use axum's `Bytes` extractor or its
/// `DefaultBodyLimit`), so a body limit layered by the merging router only lowers the limit.
pub fn router(pool: PgPool, secret: WebhookSecret, wake: Arc<Notify>) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(receive))
        .with_state(Arc::new(Receiver {
            pool,
            secret,
            wake,
            unverified: Arc::new(Semaphore::new(MAX_UNVERIFIED_BODIES)),
            buffered: Arc::new(Semaphore::new(kib(MAX_BUFFERED_BYTES))),
        }))
}

/// Why a delivery was refused. The response body is `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the body is larger than GitHub's limit of {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("the body could not be read")]
    Body(#[source] axum::Error),
    #[error("the signature was refused")]
    Signature(#[from] SignatureError),
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    #[error("the {0} header is not valid")]
    BadHeader(&'static str),
    #[error("the payload was refused")]
    Payload(#[from] EventError),
    #[error("too many deliveries are being received at once; try again")]
    TooMany,
    #[error("too many bytes of deliveries are being received at once; try again")]
    Busy,
    /// The delivery could not be recorded: GitHub shows the failure and it can be redelivered.
    #[error("the delivery could not be recorded")]
    Store(#[from] StoreError),
}

impl ReceiveError {
    pub fn status(&self) -> StatusCode {
        match self {
            ReceiveError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ReceiveError::Signature(_) => StatusCode::UNAUTHORIZED,
            ReceiveError::Body(_)
            | ReceiveError::MissingHeader(_)
            | ReceiveError::BadHeader(_)
            | ReceiveError::Payload(_) => StatusCode::BAD_REQUEST,
            ReceiveError::TooMany | ReceiveError::Busy => StatusCode::TOO_MANY_REQUESTS,
            ReceiveError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ReceiveError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            // Internals stay in the log.
            ReceiveError::Store(e) => {
                tracing::error!(error = %chain(e), "could not record a webhook delivery");
                self.to_string()
            }
            ReceiveError::Body(e) => {
                tracing::debug!(error = %chain(e), "could not read a webhook body");
                self.to_string()
            }
            // The rest is about what the caller sent, so it may read the details.
            other => chain(other),
        };
        let mut response = (status, axum::Json(json!({ "error": message }))).into_response();
        if matches!(self, ReceiveError::TooMany | ReceiveError::Busy) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn receive(State(receiver): State<Arc<Receiver>>, request: Request) -> Response {
    let metrics = cairn_reconciler::metrics::global();
    let span = tracing::info_span!("webhook", delivery = tracing::field::Empty);
    match accept(&receiver, request).instrument(span).await {
        Ok(response) => response,
        Err(e) => {
            metrics.webhook_delivery(match e {
                ReceiveError::Store(_) => DeliveryOutcome::Unrecorded,
                _ => DeliveryOutcome::Rejected,
            });
            e.into_response()
        }
    }
}

async fn accept(receiver: &Receiver, request: Request) -> Result<Response, ReceiveError> {
    let (parts, body) = request.into_parts();
    // Everything that can be refused from the headers is, before a byte of the body is read.
    signature::check_headers(&parts.headers)?;
    let event = header_value(&parts.headers, EVENT_HEADER, 64, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
    })?;
    let delivery = header_value(&parts.headers, DELIVERY_HEADER, 100, |c| {
        c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
    })?;
    let length = content_length(&parts.headers)?;
    let unverified = receiver
        .unverified
        .clone()
        .try_acquire_owned()
        .map_err(|_| ReceiveError::TooMany)?;
    // Held until the answer: the body (and what is parsed from it) stays within the budget.
    let _reserved = receiver
        .buffered
        .clone()
        .try_acquire_many_owned(kib(length.unwrap_or(MAX_BODY_BYTES)) as u32)
        .map_err(|_| ReceiveError::Busy)?;
    let body = read_body(body).await?;
    signature::verify_headers(&receiver.secret, &parts.headers, &body)?;
    drop(unverified);

    tracing::Span::current().record("delivery", delivery);
    let mut payload: Value = serde_json::from_slice(&body).map_err(EventError::NotJson)?;
    drop(body);
    let parsed = Event::from_value(event, &payload)?;
    let action = payload
        .get("action")
        .and_then(Value::as_str)
        .map(str::to_owned);
    // U+0000 (a commit message can hold one) cannot be stored in jsonb; Cairn never acts on it.
    cairn_reconciler::api::replace_nul(&mut payload);

    // A ping needs no worker: it is recorded as handled, for `cairn webhooks` to show the hook works.
    let ping = match &parsed {
        Event::Ping(ping) => Some(format!("ping from hook {}: {}", ping.hook_id, ping.zen)),
        _ => None,
    };
    let inserted = store::insert_delivery(
        &receiver.pool,
        &NewDelivery {
            id: delivery,
            event,
            action: action.as_deref(),
            payload: &payload,
            status: if ping.is_some() {
                "handled"
            } else {
                "received"
            },
            outcome: ping.as_deref(),
        },
    )
    .await?;

    let answer = |status: StatusCode, what: &str| {
        (
            status,
            axum::Json(json!({ "delivery": delivery, "status": what })),
        )
            .into_response()
    };
    let metrics = cairn_reconciler::metrics::global();
    if !inserted {
        metrics.webhook_delivery(DeliveryOutcome::Duplicate);
        tracing::info!(delivery, event, "webhook redelivery: already received");
        return Ok(answer(StatusCode::OK, "already received"));
    }
    tracing::info!(
        delivery,
        event,
        action = action.as_deref(),
        "webhook delivery recorded"
    );
    metrics.webhook_delivery(DeliveryOutcome::Received);
    if ping.is_some() {
        return Ok(answer(StatusCode::OK, "pong"));
    }
    receiver.wake.notify_one();
    Ok(answer(StatusCode::ACCEPTED, "received"))
}

/// The body's `Content-Length`, refused past [`MAX_BODY_BYTES`] before anything is read; `None` for a
/// chunked body.
fn content_length(headers: &HeaderMap) -> Result<Option<usize>, ReceiveError> {
    let Some(length) = headers.get(header::CONTENT_LENGTH) else {
        return Ok(None);
    };
    let length = length
        .to_str()
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(ReceiveError::BadHeader("Content-Length"))?;
    if length > MAX_BODY_BYTES as u64 {
        return Err(ReceiveError::TooLarge);
    }
    Ok(Some(length as usize))
}

/// Permits of the byte budget for `bytes` (one per KiB started).
fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024).max(1)
}

/// Reads the whole body, refusing more than [`MAX_BODY_BYTES`] as soon as the chunks read pass it.
async fn read_body(body: Body) -> Result<Bytes, ReceiveError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ReceiveError::TooLarge),
        Err(e) => Err(ReceiveError::Body(axum::Error::new(e))),
    }
}

fn header_value<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
    max_len: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<&'h str, ReceiveError> {
    let value = headers
        .get(name)
        .ok_or(ReceiveError::MissingHeader(name))?
        .to_str()
        .map_err(|_| ReceiveError::BadHeader(name))?;
    if value.is_empty() || value.len() > max_len || !value.chars().all(allowed) {
        return Err(ReceiveError::BadHeader(name));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_budget_counts_kibibytes_and_holds_two_full_bodies() {
        assert_eq!(kib(0), 1);
        assert_eq!(kib(1), 1);
        assert_eq!(kib(1025), 2);
        assert!(kib(MAX_BUFFERED_BYTES) >= 2 * kib(MAX_BODY_BYTES));
        assert!(kib(MAX_BUFFERED_BYTES) < 3 * kib(MAX_BODY_BYTES));
        assert!(u32::try_from(kib(MAX_BUFFERED_BYTES)).is_ok());
    }
}
