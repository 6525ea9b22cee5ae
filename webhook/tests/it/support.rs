//! What the tests share: the GitHub fixtures (read from `CAIRN_GITHUB_FIXTURES`, never copied), a
//! real server around the receiver, a signed-request helper, and a handler that records what it is
//! asked to do in the test's database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cairn_webhook::deliveries::{DeliveryContext, DeliveryHandler, HandlerError, Outcome};
use cairn_webhook::events::{ConfigPush, PullRequest, Routes, SourcePush};
use cairn_webhook::receiver;
use cairn_webhook::signature::{self, WebhookSecret};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;

pub const SECRET: &str = "It's a Secret to Everybody";

pub fn secret() -> WebhookSecret {
    WebhookSecret::new(SECRET).unwrap()
}

/// The fixtures directory, or `None` when the test should skip (a failure under CI).
pub fn fixtures() -> Option<PathBuf> {
    cairn_testkit::github_fixtures()
}

/// Every webhook payload of the fixtures: (file name, `X-GitHub-Event`, raw bytes), sorted by name.
pub fn webhook_fixtures(dir: &std::path::Path) -> Vec<(String, String, Vec<u8>)> {
    let mut found: Vec<_> = std::fs::read_dir(dir.join("webhooks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let file = p.file_name().unwrap().to_string_lossy().into_owned();
            let event = file.split('.').next().unwrap().to_owned();
            (file, event, std::fs::read(&p).unwrap())
        })
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no payloads in {}", dir.display());
    found
}

/// One recorded API exchange of `api/<name>.json`.
pub fn api_recording(dir: &std::path::Path, name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("api").join(format!("{name}.json"))).unwrap();
    match serde_json::from_str(&text).unwrap() {
        Value::Array(items) => items,
        other => vec![other],
    }
}

/// The receiver on a real socket (port 0), with the notify it wakes.
pub struct Server {
    pub addr: SocketAddr,
    pub wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(pool: PgPool) -> Server {
        let wake = Arc::new(Notify::new());
        let app = receiver::router(pool, secret(), wake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Server { addr, wake, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, receiver::WEBHOOK_PATH)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A delivery to send: headers as GitHub sets them unless changed.
pub struct Delivery {
    pub event: Option<String>,
    pub id: Option<String>,
    pub signature: Option<String>,
    pub extra: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Delivery {
    /// Signed with the test secret, as GitHub signs.
    pub fn signed(event: &str, id: &str, body: impl Into<Vec<u8>>) -> Delivery {
        let body = body.into();
        Delivery {
            event: Some(event.to_owned()),
            id: Some(id.to_owned()),
            signature: Some(signature::sign(&secret(), &body)),
            extra: Vec::new(),
            body,
        }
    }
}

/// Posts a delivery; returns the status and the JSON answer.
pub async fn post(url: &str, delivery: Delivery) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("user-agent", "GitHub-Hookshot/test");
    if let Some(event) = &delivery.event {
        request = request.header("x-github-event", event);
    }
    if let Some(id) = &delivery.id {
        request = request.header("x-github-delivery", id);
    }
    if let Some(sig) = &delivery.signature {
        request = request.header("x-hub-signature-256", sig);
    }
    for (name, value) in &delivery.extra {
        request = request.header(*name, value);
    }
    let response = client
        .request(request.body(Full::new(Bytes::from(delivery.body))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&body)));
    (status, json)
}

/// Rows of `webhook_deliveries`: (id, event, action, status, outcome).
pub async fn deliveries(
    pool: &PgPool,
) -> Vec<(String, String, Option<String>, String, Option<String>)> {
    sqlx::query_as(
        "SELECT delivery_id, event, action, status, outcome FROM webhook_deliveries
         ORDER BY delivery_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

pub async fn delivery_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A handler that records each call in the test's `test_effects` table, within the delivery's
/// transaction (so an effect exists only if the delivery was marked handled), and can be made to fail.
pub struct Recorder {
    pub routes: Routes,
    /// Fail this many calls (after writing their effect, to prove it is rolled back).
    pub fail_next: Mutex<u32>,
}

impl Recorder {
    pub async fn new(pool: &PgPool, routes: Routes) -> Arc<Recorder> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS test_effects (
                 seq bigint GENERATED ALWAYS AS IDENTITY, delivery_id text, kind text, detail text)",
        )
        .execute(pool)
        .await
        .unwrap();
        Arc::new(Recorder {
            routes,
            fail_next: Mutex::new(0),
        })
    }

    async fn record(
        &self,
        conn: &mut PgConnection,
        delivery: &DeliveryContext,
        kind: &str,
        detail: String,
    ) -> Result<Outcome, HandlerError> {
        sqlx::query("INSERT INTO test_effects (delivery_id, kind, detail) VALUES ($1, $2, $3)")
            .bind(&delivery.delivery_id)
            .bind(kind)
            .bind(&detail)
            .execute(&mut *conn)
            .await?;
        let fail = {
            let mut n = self.fail_next.lock().unwrap();
            let fail = *n > 0;
            *n = n.saturating_sub(1);
            fail
        };
        if fail {
            return Err("the reconciler is unavailable".into());
        }
        Ok(Outcome::Handled(format!("{kind} {detail}")))
    }
}

#[async_trait::async_trait]
impl DeliveryHandler for Recorder {
    async fn routes(&self) -> Result<Routes, HandlerError> {
        Ok(self.routes.clone())
    }

    async fn on_config_push(
        &self,
        conn: &mut PgConnection,
        delivery: &DeliveryContext,
        push: &ConfigPush,
    ) -> Result<Outcome, HandlerError> {
        let detail = format!("{}@{}", push.branch, push.after);
        self.record(conn, delivery, "config_push", detail).await
    }

    async fn on_source_push(
        &self,
        conn: &mut PgConnection,
        delivery: &DeliveryContext,
        push: &SourcePush,
    ) -> Result<Outcome, HandlerError> {
        let detail = format!("{}:{}@{}", push.apps.join(","), push.branch, push.after);
        self.record(conn, delivery, "source_push", detail).await
    }

    async fn on_pull_request(
        &self,
        conn: &mut PgConnection,
        delivery: &DeliveryContext,
        pr: &PullRequest,
    ) -> Result<Outcome, HandlerError> {
        let detail = format!(
            "#{} {} {}@{} fork={}",
            pr.number,
            pr.action.as_str(),
            pr.head_ref,
            pr.head_sha,
            pr.fork
        );
        self.record(conn, delivery, "pull_request", detail).await
    }
}

/// `test_effects` rows: (delivery id, kind, detail), in the order they were written.
pub async fn effects(pool: &PgPool) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT delivery_id, kind, detail FROM test_effects ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}
