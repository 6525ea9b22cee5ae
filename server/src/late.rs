//! Routes set once the database is reachable: until then their requests answer 503 with a JSON error
//! body, so the listener can serve `/healthz` from the start.
//!
//! What it must not do: queue or hold requests while starting (they are answered at once).

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tower::ServiceExt as _;

/// Routes set later; `starting` is the error their requests get meanwhile.
#[derive(Debug, Clone)]
pub(crate) struct Late {
    routes: Arc<OnceLock<Router>>,
    starting: &'static str,
}

impl Late {
    pub(crate) fn new(starting: &'static str) -> Late {
        Late {
            routes: Arc::default(),
            starting,
        }
    }

    pub(crate) fn set(&self, router: Router) {
        let _ = self.routes.set(router);
    }

    /// A router whose fallback hands every request to the routes once they are set.
    pub(crate) fn router(&self) -> Router {
        Router::new()
            .fallback(|State(late): State<Late>, req: Request| late.dispatch(req))
            .with_state(self.clone())
    }

    /// Hands `req` to the routes, or answers 503 while they are not set.
    pub(crate) async fn dispatch(self, req: Request) -> Response {
        match self.routes.get() {
            Some(r) => match r.clone().oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            },
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(cairn_proto::ErrorBody {
                    error: self.starting.into(),
                }),
            )
                .into_response(),
        }
    }
}
