//! The receiver through a real socket and the real router, against a real PostgreSQL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use cairn_webhook::deliveries::process_pending;
use cairn_webhook::events::{AppSource, Routes, TrackedRepo};
use cairn_webhook::receiver::{self, MAX_BODY_BYTES};
use cairn_webhook::signature;
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower::ServiceExt as _;

use crate::support::{self, Delivery, Recorder, Server};

fn config_routes() -> Routes {
    Routes {
        config_repo: Some(TrackedRepo {
            url: "https://github.com/codertocat/hello-world".to_owned(),
            branch: "master".to_owned(),
        }),
        apps: vec![],
    }
}

/// What each fixture must come to with the config repository at Codertocat/Hello-World, `master`:
/// (status, outcome).
fn expected(file: &str) -> Option<(&'static str, String)> {
    let tag_deleted = "deletion of tag `simple-tag` in Codertocat/Hello-World".to_owned();
    let pr = |action: &str| {
        format!(
            "pull_request #2 {action} changes@ec26c3e57ca3a959ca5aad62de7213c562f8c821 fork=false"
        )
    };
    let ping = "ping from hook 109948940: Anything added dilutes everything else.".to_owned();
    Some(match file {
        "create.json" => (
            "ignored",
            "`create` event: Cairn acts on the `push` event GitHub sends for the same ref"
                .to_owned(),
        ),
        "delete.json" => (
            "ignored",
            "`delete` event: Cairn acts on the `push` event GitHub sends for the same ref"
                .to_owned(),
        ),
        "ping.json" | "ping.with-organization.json" => ("handled", ping),
        "pull_request.closed.json" => (
            "ignored",
            "pull request #2 in Codertocat/Hello-World was closed: nothing to plan".to_owned(),
        ),
        "pull_request.opened.json" | "pull_request.opened.with-organization.json" => {
            ("handled", pr("opened"))
        }
        "pull_request.reopened.json" => ("handled", pr("reopened")),
        "pull_request.synchronize.json" => ("handled", pr("synchronize")),
        "push.json" | "push.1.json" | "push.with-organization.json" => ("ignored", tag_deleted),
        "push.with-new-branch.json" => (
            "handled",
            "config_push master@6113728f27ae82c7b1a177c8d03f9e96e0adf246".to_owned(),
        ),
        _ => return None,
    })
}

#[tokio::test]
async fn every_fixture_payload_is_handled_or_ignored_with_its_reason() {
    let Some(fixtures) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let payloads = support::webhook_fixtures(&fixtures);
    for (file, event, body) in &payloads {
        let (status, answer) = support::post(
            &server.url(),
            Delivery::signed(event, &format!("d-{file}"), body.clone()),
        )
        .await;
        let expected_status = if event == "ping" { 200 } else { 202 };
        assert_eq!(status, expected_status, "{file}: {answer}");
    }

    let handler = Recorder::new(db.pool(), config_routes()).await;
    let processed = process_pending(db.pool(), &*handler).await.unwrap();
    assert_eq!(processed.failed + processed.retrying, 0, "{processed:?}");

    let rows: BTreeMap<String, (String, Option<String>)> = support::deliveries(db.pool())
        .await
        .into_iter()
        .map(|(id, _, _, status, outcome)| (id, (status, outcome)))
        .collect();
    assert_eq!(rows.len(), payloads.len());
    for (file, _, _) in &payloads {
        let (status, outcome) = &rows[&format!("d-{file}")];
        let outcome = outcome.as_deref().unwrap_or_default();
        match expected(file) {
            Some((want_status, want_outcome)) => {
                assert_eq!(
                    (status.as_str(), outcome),
                    (want_status, want_outcome.as_str()),
                    "{file}"
                );
            }
            // A payload added to the fixtures later: it must still come to an end, with a reason.
            None => {
                assert!(
                    status == "handled" || status == "ignored",
                    "{file}: {status}"
                );
                assert!(!outcome.is_empty(), "{file} has no outcome");
            }
        }
    }
    // Each handled push or pull request had exactly one effect, in its own delivery's name.
    let effects = support::effects(db.pool()).await;
    let handled_by_handler = rows
        .iter()
        .filter(|(id, (status, _))| status == "handled" && !id.starts_with("d-ping"))
        .count();
    assert_eq!(effects.len(), handled_by_handler, "{effects:?}");
}

#[tokio::test]
async fn a_push_to_a_followed_branch_of_an_app_repository_is_a_source_push() {
    let Some(fixtures) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let body = std::fs::read(fixtures.join("webhooks/push.with-new-branch.json")).unwrap();
    let (status, _) = support::post(&server.url(), Delivery::signed("push", "push-1", body)).await;
    assert_eq!(status, 202);

    let routes = Routes {
        config_repo: Some(TrackedRepo {
            url: "git@github.com:acme/platform.git".to_owned(),
            branch: "main".to_owned(),
        }),
        apps: vec![
            AppSource {
                app: "hello".to_owned(),
                url: "git@github.com:Codertocat/Hello-World.git".to_owned(),
                branch: "master".to_owned(),
            },
            AppSource {
                app: "hello-next".to_owned(),
                url: "https://github.com/Codertocat/Hello-World".to_owned(),
                branch: "next".to_owned(),
            },
        ],
    };
    let handler = Recorder::new(db.pool(), routes).await;
    process_pending(db.pool(), &*handler).await.unwrap();
    assert_eq!(
        support::effects(db.pool()).await,
        [(
            "push-1".to_owned(),
            "source_push".to_owned(),
            "hello:master@6113728f27ae82c7b1a177c8d03f9e96e0adf246".to_owned()
        )]
    );
    let rows = support::deliveries(db.pool()).await;
    assert_eq!(rows[0].3, "handled");
}

#[tokio::test]
async fn bad_signatures_get_401_and_record_nothing() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let body = br#"{"zen":"Design for failure.","hook_id":1}"#.to_vec();
    let other_secret = signature::WebhookSecret::new("not the secret").unwrap();

    let mut missing = Delivery::signed("ping", "sig-1", body.clone());
    missing.signature = None;
    let mut sha1_only = Delivery::signed("ping", "sig-2", body.clone());
    sha1_only.signature = None;
    sha1_only.extra.push((
        "x-hub-signature",
        "sha1=9cf4a7c5b6e4f1e0b3e1c6a5f4e3d2c1b0a99887".to_owned(),
    ));
    let mut sha1_in_256 = Delivery::signed("ping", "sig-3", body.clone());
    sha1_in_256.signature = Some("sha1=9cf4a7c5b6e4f1e0b3e1c6a5f4e3d2c1b0a99887".to_owned());
    let mut wrong_secret = Delivery::signed("ping", "sig-4", body.clone());
    wrong_secret.signature = Some(signature::sign(&other_secret, &body));
    let mut tampered = Delivery::signed("ping", "sig-5", body.clone());
    tampered.body = br#"{"zen":"Design for failure!","hook_id":1}"#.to_vec();

    for (case, delivery, words) in [
        ("missing", missing, "no X-Hub-Signature-256"),
        ("sha1 only", sha1_only, "only a SHA-1 signature"),
        (
            "sha1 in the sha256 header",
            sha1_in_256,
            "only a SHA-1 signature",
        ),
        ("wrong secret", wrong_secret, "does not match"),
        ("body changed after signing", tampered, "does not match"),
    ] {
        let (status, answer) = support::post(&server.url(), delivery).await;
        assert_eq!(status, 401, "{case}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(words), "{case}: {error}");
    }
    assert_eq!(support::delivery_count(db.pool()).await, 0);
}

#[tokio::test]
async fn a_redelivery_is_already_received_and_has_one_effect() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let push = own_push("refs/heads/master");
    let handler = Recorder::new(db.pool(), config_routes()).await;

    let (status, answer) = support::post(
        &server.url(),
        Delivery::signed("push", "same-id", push.clone()),
    )
    .await;
    assert_eq!((status, answer["status"].as_str()), (202, Some("received")));
    process_pending(db.pool(), &*handler).await.unwrap();

    // GitHub's "Redeliver", before and after processing, and a retry racing the first.
    for _ in 0..3 {
        let (status, answer) = support::post(
            &server.url(),
            Delivery::signed("push", "same-id", push.clone()),
        )
        .await;
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("already received"))
        );
        process_pending(db.pool(), &*handler).await.unwrap();
    }
    assert_eq!(support::delivery_count(db.pool()).await, 1);
    assert_eq!(support::effects(db.pool()).await.len(), 1);
}

/// A push of this project's own making (not a fixture): the smallest body GitHub's shape allows.
fn own_push(git_ref: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ref": git_ref,
        "before": "1111111111111111111111111111111111111111",
        "after": "2222222222222222222222222222222222222222",
        "created": false,
        "deleted": false,
        "repository": {
            "full_name": "Codertocat/Hello-World",
            "clone_url": "https://github.com/Codertocat/Hello-World.git",
            "html_url": "https://github.com/Codertocat/Hello-World",
            "ssh_url": "git@github.com:Codertocat/Hello-World.git"
        },
        "head_commit": {
            "id": "2222222222222222222222222222222222222222",
            "message": "Deploy",
            "timestamp": "2026-11-26T15:00:00Z"
        },
        "pusher": {"name": "Codertocat", "email": "codertocat@example.com"}
    }))
    .unwrap()
}

#[tokio::test]
async fn the_receiver_records_and_wakes_and_does_nothing_else() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let notified = server.wake.notified();
    let (status, _) = support::post(
        &server.url(),
        Delivery::signed("push", "wake-1", own_push("refs/heads/master")),
    )
    .await;
    assert_eq!(status, 202);
    tokio::time::timeout(Duration::from_secs(1), notified)
        .await
        .expect("the receiver wakes the worker");
    let rows = support::deliveries(db.pool()).await;
    assert_eq!(
        rows,
        [(
            "wake-1".to_owned(),
            "push".to_owned(),
            None,
            "received".to_owned(),
            None
        )]
    );
    // The stored payload is the body as sent.
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM webhook_deliveries WHERE delivery_id = 'wake-1'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&own_push("refs/heads/master")).unwrap();
    assert_eq!(stored, sent);
}

#[tokio::test]
async fn signed_bodies_that_are_not_json_or_not_githubs_shape_get_400() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let mut push_without_after: serde_json::Value =
        serde_json::from_slice(&own_push("refs/heads/master")).unwrap();
    push_without_after.as_object_mut().unwrap().remove("after");
    let mut push_with_numeric_ref = push_without_after.clone();
    push_with_numeric_ref["after"] = json!("2222222222222222222222222222222222222222");
    push_with_numeric_ref["ref"] = json!(42);

    for (n, (case, event, body, words)) in [
        (
            "not JSON",
            "push",
            b"ref=refs/heads/main".to_vec(),
            "not JSON",
        ),
        ("empty", "push", Vec::new(), "not JSON"),
        (
            "truncated",
            "push",
            own_push("refs/heads/master")[..50].to_vec(),
            "not JSON",
        ),
        ("an array", "push", b"[1, 2, 3]".to_vec(), "not an object"),
        (
            "a string, unknown event",
            "star",
            b"\"star\"".to_vec(),
            "not an object",
        ),
        (
            "push without after",
            "push",
            serde_json::to_vec(&push_without_after).unwrap(),
            "missing field `after`",
        ),
        (
            "push with a numeric ref",
            "push",
            serde_json::to_vec(&push_with_numeric_ref).unwrap(),
            "the `push` payload is not what GitHub sends",
        ),
        (
            "pull request without number",
            "pull_request",
            br#"{"action":"opened"}"#.to_vec(),
            "missing field",
        ),
        (
            "ping without zen",
            "ping",
            br#"{"hook_id":1}"#.to_vec(),
            "missing field `zen`",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, answer) = support::post(
            &server.url(),
            Delivery::signed(event, &format!("shape-{n}"), body),
        )
        .await;
        assert_eq!(status, 400, "{case}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(words), "{case}: {error}");
    }
    assert_eq!(support::delivery_count(db.pool()).await, 0);
}

#[tokio::test]
async fn missing_or_invalid_event_and_delivery_headers_get_400() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let body = own_push("refs/heads/master");
    let mut no_event = Delivery::signed("push", "h-1", body.clone());
    no_event.event = None;
    let mut no_id = Delivery::signed("push", "h-2", body.clone());
    no_id.id = None;
    let bad_event = Delivery::signed("Push Event", "h-3", body.clone());
    let long_id = Delivery::signed("push", &"x".repeat(101), body.clone());
    for (case, delivery, words) in [
        ("no event", no_event, "x-github-event header is missing"),
        (
            "no delivery id",
            no_id,
            "x-github-delivery header is missing",
        ),
        ("bad event", bad_event, "x-github-event header is not valid"),
        (
            "long delivery id",
            long_id,
            "x-github-delivery header is not valid",
        ),
    ] {
        let (status, answer) = support::post(&server.url(), delivery).await;
        assert_eq!(status, 400, "{case}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(words),
            "{case}: {answer}"
        );
    }
    assert_eq!(support::delivery_count(db.pool()).await, 0);
}

#[tokio::test]
async fn regression_a_nul_character_in_a_signed_payload_is_stored_not_a_5xx() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let mut push: serde_json::Value =
        serde_json::from_slice(&own_push("refs/heads/master")).unwrap();
    push["head_commit"]["message"] = json!("binary\u{0}junk");
    let (status, answer) = support::post(
        &server.url(),
        Delivery::signed("push", "nul-1", serde_json::to_vec(&push).unwrap()),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let message: String = sqlx::query_scalar(
        "SELECT payload->'head_commit'->>'message' FROM webhook_deliveries WHERE delivery_id = 'nul-1'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(message, "binary\u{FFFD}junk");
}

#[tokio::test]
async fn unknown_events_are_recorded_then_ignored_with_their_name() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let (status, _) = support::post(
        &server.url(),
        Delivery::signed(
            "star",
            "star-1",
            br#"{"action":"created","starred_at":null}"#.to_vec(),
        ),
    )
    .await;
    assert_eq!(status, 202);
    let handler = Recorder::new(db.pool(), config_routes()).await;
    process_pending(db.pool(), &*handler).await.unwrap();
    assert_eq!(
        support::deliveries(db.pool()).await,
        [(
            "star-1".to_owned(),
            "star".to_owned(),
            Some("created".to_owned()),
            "ignored".to_owned(),
            Some("`star` events are not something Cairn acts on".to_owned())
        )]
    );
}

/// 26 MiB announced by `Content-Length`: the answer comes before a single body byte is sent.
#[tokio::test]
async fn a_26_mib_body_with_content_length_gets_413_before_it_is_sent() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
         x-github-event: push\r\nx-github-delivery: big-1\r\n\
         x-hub-signature-256: sha256={}\r\ncontent-length: {}\r\n\r\n",
        receiver::WEBHOOK_PATH,
        server.addr,
        "0".repeat(64),
        26 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The server answers and closes without waiting for the body.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("answered without the body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("larger than GitHub's limit"), "{answer}");
    assert_eq!(support::delivery_count(db.pool()).await, 0);
}

/// 26 MiB chunked (no `Content-Length`): refused once the limit is passed, without reading the rest.
#[tokio::test]
async fn a_26_mib_chunked_body_gets_413_without_being_read_whole() {
    let db = cairn_testkit::test_db!();
    let app = receiver::router(
        db.pool().clone(),
        support::secret(),
        Arc::new(tokio::sync::Notify::new()),
    );
    const CHUNK: usize = 64 * 1024;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let chunks = futures_util::stream::iter(0..26 * 16).map(move |_| {
        counter.fetch_add(CHUNK, Ordering::SeqCst);
        Ok::<_, std::io::Error>(Bytes::from(vec![b' '; CHUNK]))
    });
    let request = axum::http::Request::post(receiver::WEBHOOK_PATH)
        .header("x-github-event", "push")
        .header("x-github-delivery", "big-2")
        .header("x-hub-signature-256", format!("sha256={}", "0".repeat(64)))
        .body(Body::from_stream(chunks))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 413);
    let read = pulled.load(Ordering::SeqCst);
    assert!(
        read <= MAX_BODY_BYTES + CHUNK,
        "read {read} bytes of 26 MiB"
    );
    assert_eq!(support::delivery_count(db.pool()).await, 0);
}

#[tokio::test]
async fn a_body_of_exactly_25_mib_is_read_and_judged() {
    let db = cairn_testkit::test_db!();
    let server = Server::start(db.pool().clone()).await;
    // Valid JSON of exactly the limit: an object padded with spaces.
    let mut body = br#"{"zen":"Keep it logically awesome.","hook_id":7}"#.to_vec();
    body.resize(MAX_BODY_BYTES, b' ');
    let (status, answer) =
        support::post(&server.url(), Delivery::signed("ping", "edge-1", body)).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("pong")));
}
