//! The one error type of both HTTP surfaces: every failure answers `{"error": "..."}` with a status that
//! says what kind it is. Internal failures (the database) are logged with their cause chain and answered
//! with a generic message, so nothing internal leaks into a response.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cairn_proto::ErrorBody;

use crate::deploys::{DeployError, ImageRefused};
use crate::queue::QueueError;
use crate::store::StoreError;
use cairn_schema::error::chain as error_chain;

/// A refused or failed API request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credential, a wrong one, or a revoked one.
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// A fencing token that is not the task's current lease.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    /// Something the control plane depends on (an app's git remote) did not answer as it should.
    #[error("{0}")]
    Upstream(String),
    #[error("too many requests: try again in {} ms", .0.as_millis())]
    TooMany(Duration),
    /// Postgres failed; logged, not shown.
    #[error("the control plane could not complete the request; try again")]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn unauthorized() -> Self {
        ApiError::Unauthorized(
            "missing, unknown or revoked credential: send `Authorization: Bearer <token>`".into(),
        )
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Store(s) => ApiError::Store(s),
            stale @ QueueError::StaleLease { .. } => ApiError::Conflict(stale.to_string()),
            QueueError::NotFound { task } => ApiError::NotFound(format!("there is no task {task}")),
        }
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        match e {
            stale @ DeployError::Stale { .. } => ApiError::Conflict(stale.to_string()),
            DeployError::Queue(q) => q.into(),
        }
    }
}

impl From<ImageRefused> for ApiError {
    fn from(e: ImageRefused) -> Self {
        match e {
            ImageRefused::Foreign(m) => ApiError::Forbidden(m),
            ImageRefused::Malformed(m) => ApiError::BadRequest(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Store(e) = &self {
            tracing::error!(error = %error_chain(e), "an API request failed");
        }
        let status = self.status();
        let mut response = (
            status,
            axum::Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if let ApiError::TooMany(after) = self {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

/// A JSON body whose rejections are [`ApiError`]s (so a malformed or oversized body also answers JSON),
/// and a JSON answer.
///
/// U+0000 in any string or key of the body (`\u0000`, which JSON allows and PostgreSQL text does not)
/// is replaced by U+FFFD before the body is read into `T`, so no handler can hand one to the database.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Whether the request says its body is JSON (`application/json` or `application/*+json`).
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

impl<T, S> axum::extract::FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::BadRequest(
                "expected a request with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = match bytes::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::TooLarge(format!(
                    "the request body is larger than {} bytes",
                    cairn_proto::MAX_BODY_BYTES
                )));
            }
            Err(rejection) => return Err(ApiError::BadRequest(rejection.body_text())),
        };
        // `\u0000` escapes (or a `\\u0000` that only looks like one): the slow path, through a value.
        if bytes.windows(6).any(|w| w == b"\\u0000") {
            let mut value: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
            super::replace_nul(&mut value);
            return serde_json::from_value(value).map(Json).map_err(|e| {
                ApiError::BadRequest(format!("the body is not what was expected: {e}"))
            });
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
        }
    }
}
