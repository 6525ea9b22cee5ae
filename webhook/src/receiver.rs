//! The GitHub webhook endpoint, `POST /webhooks/github`: an axum [`Router`] that `cairn serve` merges
//! into its own.
//!
//! A delivery is answered in milliseconds: its body is read (413 past [`MAX_BODY_BYTES`], refused from
//! `Content-Length` before any byte is read, and as soon as a chunked body passes the limit), its
//! `X-Hub-Signature-256` verified (401, nothing recorded), its payload parsed for its event (400 when
//! it is not JSON or not the shape GitHub sends), and it is recorded in `webhook_deliveries` under its
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
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use cairn_reconciler::metrics::DeliveryOutcome;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::deliveries::chain;
use crate::events::{Event, EventError};
use crate::signature::{self, SignatureError, WebhookSecret};
use crate::store::{self, NewDelivery, StoreError};

/// Where GitHub posts deliveries.
pub const WEBHOOK_PATH: &str = "/webhooks/github";
/// GitHub caps payloads at 25 MB; anything larger is not from GitHub.
pub const MAX_BODY_BYTES: usize = 25 * 1024 * 1024;
/// `X-GitHub-Event`.
pub const EVENT_HEADER: &str = "x-github-event";
/// `X-GitHub-Delivery`, a GUID per delivery that a redelivery repeats.
pub const DELIVERY_HEADER: &str = "x-github-delivery";

struct Receiver {
    pool: PgPool,
    secret: WebhookSecret,
    wake: Arc<Notify>,
}

/// The webhook endpoint. Deliveries are recorded in `pool`; `wake` is notified after each new one.
///
/// The router reads bodies itself (it does not use axum's `Bytes` extractor or its
/// `DefaultBodyLimit`), so a body limit layered by the merging router only lowers the limit.
pub fn router(pool: PgPool, secret: WebhookSecret, wake: Arc<Notify>) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(receive))
        .with_state(Arc::new(Receiver { pool, secret, wake }))
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
        (status, axum::Json(json!({ "error": message }))).into_response()
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
    let body = read_body(&parts.headers, body).await?;
    signature::verify_headers(&receiver.secret, &parts.headers, &body)?;

    let event = header_value(&parts.headers, EVENT_HEADER, 64, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
    })?;
    let delivery = header_value(&parts.headers, DELIVERY_HEADER, 100, |c| {
        c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
    })?;

    tracing::Span::current().record("delivery", delivery);
    let mut payload: Value = serde_json::from_slice(&body).map_err(EventError::NotJson)?;
    drop(body);
    let parsed = Event::from_value(event, &payload)?;
    let action = payload
        .get("action")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if contains_escaped_nul(&payload) {
        replace_nul(&mut payload);
    }

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

/// Reads the whole body, refusing more than [`MAX_BODY_BYTES`]: from `Content-Length` before reading
/// anything, else as soon as the chunks read pass the limit.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, ReceiveError> {
    if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        let length = length
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(ReceiveError::BadHeader("Content-Length"))?;
        if length > MAX_BODY_BYTES as u64 {
            return Err(ReceiveError::TooLarge);
        }
    }
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

/// Whether any string or key holds U+0000, which JSON allows and PostgreSQL's jsonb does not.
fn contains_escaped_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_escaped_nul),
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k.contains('\0') || contains_escaped_nul(v)),
        _ => false,
    }
}

/// Replaces U+0000 with U+FFFD everywhere, so the payload can be stored (a commit message can hold
/// one; Cairn never acts on those characters).
fn replace_nul(value: &mut Value) {
    match value {
        Value::String(s) if s.contains('\0') => *s = s.replace('\0', "\u{FFFD}"),
        Value::Array(items) => items.iter_mut().for_each(replace_nul),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                for (k, mut v) in old {
                    replace_nul(&mut v);
                    map.insert(k.replace('\0', "\u{FFFD}"), v);
                }
            } else {
                map.values_mut().for_each(replace_nul);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_replaced_in_strings_and_keys() {
        let mut value = json!({"a\u{0}": ["x\u{0}y", {"k": "\u{0}"}], "n": 1});
        assert!(contains_escaped_nul(&value));
        replace_nul(&mut value);
        assert!(!contains_escaped_nul(&value));
        assert_eq!(
            value,
            json!({"a\u{FFFD}": ["x\u{FFFD}y", {"k": "\u{FFFD}"}], "n": 1})
        );
    }
}
