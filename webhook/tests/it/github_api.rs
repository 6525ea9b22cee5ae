//! The outbox worker and the GitHub client against a local fake GitHub (wiremock) and a real
//! PostgreSQL. Responses are shaped like the recordings in the fixtures' `api/` directory; the tests
//! that replay a recording exactly skip without the fixtures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_webhook::github::{
    CommitStatus, GitHub, GitHubAuth, GitHubConfig, PLAN_MARKER, RepoName, StatusState,
};
use cairn_webhook::outbox::{self, GitHubCall, OutboxConfig, OutboxWorker, Pass};
use serde_json::{Value, json};
use sqlx::PgPool;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::support;

const TOKEN: &str = "test-token-0000000000000000000000000000001";
const SHA: &str = "6113728f27ae82c7b1a177c8d03f9e96e0adf246";

fn config() -> OutboxConfig {
    OutboxConfig {
        max_attempts: 3,
        base_backoff: Duration::from_secs(10),
        max_backoff: Duration::from_secs(60),
        lease: Duration::from_secs(30),
        poll_interval: Duration::from_secs(1),
    }
}

fn worker(pool: &PgPool, server: &MockServer) -> OutboxWorker {
    let mut github = GitHubConfig::new(GitHubAuth::Token(TOKEN.to_owned().into()));
    github.api_url = server.uri();
    OutboxWorker::new(
        pool.clone(),
        Arc::new(GitHub::new(github).unwrap()),
        config(),
    )
}

fn repo() -> RepoName {
    RepoName::parse("acme/platform").unwrap()
}

async fn enqueue(pool: &PgPool, call: GitHubCall) -> i64 {
    let mut tx = pool.begin().await.unwrap();
    let id = outbox::enqueue(&mut tx, &call).await.unwrap();
    tx.commit().await.unwrap();
    id
}

fn status_call(context: &str, state: StatusState) -> GitHubCall {
    GitHubCall::CreateStatus {
        repo: repo(),
        sha: SHA.to_owned(),
        status: CommitStatus::new(
            context,
            state,
            "applied 3 changes",
            Some("https://cairn.example.com/r/1".to_owned()),
        ),
    }
}

fn comment_call(body: &str) -> GitHubCall {
    GitHubCall::UpsertPrComment {
        repo: repo(),
        pr: 7,
        body: body.to_owned(),
    }
}

/// The retry clock, fast-forwarded: what a worker would find after waiting.
async fn make_due(pool: &PgPool) {
    sqlx::query("UPDATE github_outbox SET next_attempt_at = now() WHERE status = 'pending'")
        .execute(pool)
        .await
        .unwrap();
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    status: String,
    attempts: i32,
    last_error: Option<String>,
    /// Seconds from now.
    due_in: f64,
}

async fn rows(pool: &PgPool) -> Vec<Row> {
    sqlx::query_as(
        "SELECT status, attempts, last_error,
                extract(epoch FROM next_attempt_at - now())::float8 AS due_in
         FROM github_outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn requests(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap()
}

fn body(request: &Request) -> Value {
    serde_json::from_slice(&request.body).unwrap()
}

/// A status response shaped like the `create-status` recording's.
fn status_created(context: &str) -> ResponseTemplate {
    ResponseTemplate::new(201)
        .set_body_json(json!({
            "url": format!("https://api.github.com/repos/acme/platform/statuses/{SHA}"),
            "id": 1000,
            "state": "success",
            "description": "applied 3 changes",
            "target_url": "https://cairn.example.com/r/1",
            "context": context,
            "created_at": "2026-11-26T16:00:00Z",
            "updated_at": "2026-11-26T16:00:00Z",
        }))
        .insert_header("x-ratelimit-limit", "5000")
        .insert_header("x-ratelimit-remaining", "4999")
}

fn epoch_in(secs: u64) -> String {
    (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs)
        .to_string()
}

#[tokio::test]
async fn statuses_replay_the_create_status_recording_exactly() {
    let Some(fixtures) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    let recording = support::api_recording(&fixtures, "create-status");
    let posts: Vec<&Value> = recording
        .iter()
        .filter(|r| r["method"].as_str() == Some("post"))
        .collect();
    assert!(!posts.is_empty());
    for exchange in &posts {
        let mut response = ResponseTemplate::new(exchange["status"].as_u64().unwrap() as u16)
            .set_body_json(&exchange["response"]);
        for (name, value) in exchange["headers"].as_object().unwrap() {
            if name != "content-length" && name != "connection" {
                let value = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_owned);
                response = response.insert_header(name.as_str(), value.as_str());
            }
        }
        let recorded_body = exchange["body"].clone();
        Mock::given(method("POST"))
            .and(path(exchange["path"].as_str().unwrap()))
            .and(move |request: &Request| body(request) == recorded_body)
            .respond_with(response)
            .expect(1)
            .mount(&server)
            .await;
    }
    for exchange in &posts {
        let (owner_repo, sha) = exchange["path"]
            .as_str()
            .unwrap()
            .strip_prefix("/repos/")
            .unwrap()
            .split_once("/statuses/")
            .unwrap();
        let recorded = &exchange["body"];
        let state = match recorded["state"].as_str().unwrap() {
            "failure" => StatusState::Failure,
            "success" => StatusState::Success,
            "pending" => StatusState::Pending,
            _ => StatusState::Error,
        };
        enqueue(
            db.pool(),
            GitHubCall::CreateStatus {
                repo: RepoName::parse(owner_repo).unwrap(),
                sha: sha.to_owned(),
                status: CommitStatus::new(
                    recorded["context"].as_str().unwrap(),
                    state,
                    recorded["description"].as_str().unwrap(),
                    recorded["target_url"].as_str().map(str::to_owned),
                ),
            },
        )
        .await;
    }
    let pass = worker(db.pool(), &server).deliver_due().await.unwrap();
    assert_eq!(pass.done, posts.len(), "{pass:?}");
    let sent = requests(&server).await;
    assert_eq!(sent.len(), posts.len());
    for (request, exchange) in sent.iter().zip(&posts) {
        assert_eq!(request.url.path(), exchange["path"].as_str().unwrap());
        assert_eq!(body(request), exchange["body"]);
        assert_eq!(
            request.headers["authorization"].to_str().unwrap(),
            format!("Bearer {TOKEN}")
        );
    }
    server.verify().await;
}

#[tokio::test]
async fn a_status_is_sent_with_its_context_state_and_sha() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/repos/acme/platform/statuses/{SHA}")))
        .respond_with(status_created("cairn/apply"))
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    let pass = worker(db.pool(), &server).deliver_due().await.unwrap();
    assert_eq!(pass.done, 1);
    let sent = requests(&server).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method.as_str(), "POST");
    assert_eq!(
        body(&sent[0]),
        json!({
            "context": "cairn/apply",
            "state": "success",
            "description": "applied 3 changes",
            "target_url": "https://cairn.example.com/r/1"
        })
    );
    let r = rows(db.pool()).await;
    assert_eq!((r[0].status.as_str(), r[0].attempts), ("done", 1));
}

#[tokio::test]
async fn a_later_status_for_the_same_commit_and_context_replaces_an_undelivered_one() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(status_created("cairn/deploy"))
        .mount(&server)
        .await;
    let first = enqueue(db.pool(), status_call("cairn/deploy", StatusState::Pending)).await;
    let second = enqueue(db.pool(), status_call("cairn/deploy", StatusState::Success)).await;
    let other = enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    assert_eq!(first, second);
    assert_ne!(first, other);
    worker(db.pool(), &server).deliver_due().await.unwrap();
    let sent: Vec<(String, String)> = requests(&server)
        .await
        .iter()
        .map(|r| {
            let b = body(r);
            (
                b["context"].as_str().unwrap().to_owned(),
                b["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        sent,
        [
            ("cairn/deploy".to_owned(), "success".to_owned()),
            ("cairn/apply".to_owned(), "success".to_owned())
        ]
    );
}

/// A fake of GitHub's issue comments for one pull request: list (paginated, `page_size` per page,
/// with `Link` headers), create, update; updating an unknown id is a 404.
#[derive(Clone)]
struct FakeComments {
    state: Arc<Mutex<Vec<(u64, String)>>>,
    next_id: Arc<AtomicU64>,
    page_size: usize,
    base: String,
}

impl FakeComments {
    async fn mount(server: &MockServer, page_size: usize) -> FakeComments {
        let fake = FakeComments {
            state: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1000)),
            page_size,
            base: server.uri(),
        };
        Mock::given(path("/repos/acme/platform/issues/7/comments"))
            .respond_with(fake.clone())
            .mount(server)
            .await;
        // Where GitHub's `Link` headers point: the repository by id.
        Mock::given(method("GET"))
            .and(path("/repositories/1000/issues/7/comments"))
            .respond_with(fake.clone())
            .mount(server)
            .await;
        Mock::given(method("PATCH"))
            .and(path_regex(r"^/repos/acme/platform/issues/comments/\d+$"))
            .respond_with(fake.clone())
            .mount(server)
            .await;
        fake
    }

    fn add(&self, body: &str) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.state.lock().unwrap().push((id, body.to_owned()));
        id
    }

    fn comments(&self) -> Vec<(u64, String)> {
        self.state.lock().unwrap().clone()
    }

    fn json(id: u64, body: &str) -> Value {
        json!({
            "id": id,
            "node_id": "MDEyOklzc3VlQ29tbWVudDE=",
            "url": format!("https://api.github.com/repos/acme/platform/issues/comments/{id}"),
            "html_url": format!("https://github.com/acme/platform/pull/7#issuecomment-{id}"),
            "body": body,
            "user": {"login": "cairn[bot]", "id": 1, "type": "Bot"},
            "created_at": "2026-11-26T16:00:00Z",
            "updated_at": "2026-11-26T16:00:00Z",
            "author_association": "NONE"
        })
    }
}

impl Respond for FakeComments {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        match request.method.as_str() {
            "GET" => {
                let page: usize = request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "page")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(1);
                let all = self.comments();
                let pages = all.len().div_ceil(self.page_size).max(1);
                let items: Vec<Value> = all
                    .iter()
                    .skip((page - 1) * self.page_size)
                    .take(self.page_size)
                    .map(|(id, body)| Self::json(*id, body))
                    .collect();
                let mut response = ResponseTemplate::new(200).set_body_json(items);
                if page < pages {
                    let link = |p: usize, rel: &str| {
                        format!(
                            "<{}/repositories/1000/issues/7/comments?per_page=100&page={p}>; rel=\"{rel}\"",
                            self.base
                        )
                    };
                    response = response.insert_header(
                        "link",
                        format!("{}, {}", link(page + 1, "next"), link(pages, "last")).as_str(),
                    );
                }
                response
            }
            "POST" => {
                let text = body(request)["body"].as_str().unwrap().to_owned();
                let id = self.add(&text);
                ResponseTemplate::new(201).set_body_json(Self::json(id, &text))
            }
            "PATCH" => {
                let id: u64 = request
                    .url
                    .path()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                let text = body(request)["body"].as_str().unwrap().to_owned();
                let mut state = self.state.lock().unwrap();
                match state.iter_mut().find(|(i, _)| *i == id) {
                    Some(comment) => {
                        comment.1 = text.clone();
                        ResponseTemplate::new(200).set_body_json(Self::json(id, &text))
                    }
                    None => ResponseTemplate::new(404).set_body_json(json!({
                        "message": "Not Found",
                        "documentation_url": "https://docs.github.com/rest"
                    })),
                }
            }
            other => panic!("unexpected {other}"),
        }
    }
}

fn summary(requests: &[Request]) -> Vec<String> {
    requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.url.path()))
        .collect()
}

fn marked(text: &str) -> String {
    format!("{PLAN_MARKER}\n{text}")
}

#[tokio::test]
async fn the_plan_comment_is_created_once_then_updated_in_place() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    let fake = FakeComments::mount(&server, 30).await;
    fake.add("LGTM");
    let worker = worker(db.pool(), &server);

    enqueue(db.pool(), comment_call("Plan: 1 to add")).await;
    assert_eq!(worker.deliver_due().await.unwrap().done, 1);
    enqueue(db.pool(), comment_call("Plan: 2 to add")).await;
    assert_eq!(worker.deliver_due().await.unwrap().done, 1);

    let sent = requests(&server).await;
    assert_eq!(
        summary(&sent),
        [
            "GET /repos/acme/platform/issues/7/comments",
            "POST /repos/acme/platform/issues/7/comments",
            // The id is known from then on: no listing.
            "PATCH /repos/acme/platform/issues/comments/1001",
        ]
    );
    assert_eq!(sent[0].url.query(), Some("per_page=100"));
    assert_eq!(body(&sent[1]), json!({"body": marked("Plan: 1 to add")}));
    assert_eq!(body(&sent[2]), json!({"body": marked("Plan: 2 to add")}));
    assert_eq!(
        fake.comments(),
        [(1000, "LGTM".to_owned()), (1001, marked("Plan: 2 to add"))]
    );
    let stored: i64 = sqlx::query_scalar(
        "SELECT comment_id FROM github_pr_comments WHERE repo = 'acme/platform' AND pr = 7",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(stored, 1001);
}

#[tokio::test]
async fn an_earlier_plan_comment_is_found_across_pages_by_its_marker() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    let fake = FakeComments::mount(&server, 2).await;
    for text in ["first", "second", "third"] {
        fake.add(text);
    }
    let earlier = fake.add(&marked("Plan: old"));
    fake.add("after the plan");

    enqueue(db.pool(), comment_call("Plan: new")).await;
    assert_eq!(
        worker(db.pool(), &server).deliver_due().await.unwrap().done,
        1
    );
    let sent = requests(&server).await;
    assert_eq!(
        summary(&sent),
        [
            "GET /repos/acme/platform/issues/7/comments",
            // The next page, from the Link header, on the configured host.
            "GET /repositories/1000/issues/7/comments",
            format!("PATCH /repos/acme/platform/issues/comments/{earlier}").as_str(),
        ]
    );
    assert_eq!(sent[1].url.query(), Some("per_page=100&page=2"));
    assert_eq!(
        sent[1].headers["authorization"].to_str().unwrap(),
        format!("Bearer {TOKEN}")
    );
    assert_eq!(fake.comments().len(), 5);
    assert_eq!(fake.comments()[3].1, marked("Plan: new"));
}

#[tokio::test]
async fn a_deleted_plan_comment_is_made_again() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    let fake = FakeComments::mount(&server, 30).await;
    let worker = worker(db.pool(), &server);
    enqueue(db.pool(), comment_call("Plan: v1")).await;
    worker.deliver_due().await.unwrap();
    fake.state.lock().unwrap().clear(); // someone deleted it
    enqueue(db.pool(), comment_call("Plan: v2")).await;
    assert_eq!(worker.deliver_due().await.unwrap().done, 1);
    assert_eq!(
        summary(&requests(&server).await)[2..],
        [
            "PATCH /repos/acme/platform/issues/comments/1000",
            "GET /repos/acme/platform/issues/7/comments",
            "POST /repos/acme/platform/issues/7/comments",
        ]
    );
    assert_eq!(fake.comments(), [(1001, marked("Plan: v2"))]);
}

#[tokio::test]
async fn a_later_plan_supersedes_an_undelivered_one() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    let fake = FakeComments::mount(&server, 30).await;
    let first = enqueue(db.pool(), comment_call("Plan: v1")).await;
    let second = enqueue(db.pool(), comment_call("Plan: v2")).await;
    assert_eq!(first, second, "one pending call per pull request");
    worker(db.pool(), &server).deliver_due().await.unwrap();
    assert_eq!(
        summary(&requests(&server).await),
        [
            "GET /repos/acme/platform/issues/7/comments",
            "POST /repos/acme/platform/issues/7/comments"
        ]
    );
    assert_eq!(fake.comments(), [(1000, marked("Plan: v2"))]);
}

#[tokio::test]
async fn a_plan_that_arrives_while_the_earlier_is_in_flight_is_delivered_after_it() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    let fake = FakeComments::mount(&server, 30).await;
    // Slow answers to creations (mounted first: it wins over the fake's own POST).
    Mock::given(method("POST"))
        .respond_with(SlowCreate(fake.clone(), Duration::from_millis(600)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    enqueue(db.pool(), comment_call("Plan: v1")).await;
    let w = worker(db.pool(), &server);
    let in_flight = tokio::spawn({
        let w = w.clone();
        async move { w.deliver_due().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    enqueue(db.pool(), comment_call("Plan: v2")).await;
    // The same pass sees the newer plan due at once and delivers it too, by the id it just learnt.
    let pass = in_flight.await.unwrap();
    assert_eq!(
        pass,
        Pass {
            done: 1,
            superseded: 1,
            ..Pass::default()
        }
    );
    assert_eq!(fake.comments(), [(1000, marked("Plan: v2"))]);
    assert_eq!(
        summary(&requests(&server).await),
        [
            "GET /repos/acme/platform/issues/7/comments",
            "POST /repos/acme/platform/issues/7/comments",
            "PATCH /repos/acme/platform/issues/comments/1000"
        ]
    );
    assert_eq!(rows(db.pool()).await[0].status, "done");
}

/// Creates the comment at once (GitHub has it) but answers late.
struct SlowCreate(FakeComments, Duration);

impl Respond for SlowCreate {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.0.respond(request).set_delay(self.1)
    }
}

/// The in-process analogue of SIGKILL between committing the outbox row and learning the API's
/// answer: the worker dies mid-call, a second `synchronize` plan arrives 50 ms after the first, and
/// once the lease runs out exactly one comment shows the later plan.
#[tokio::test]
async fn a_worker_killed_mid_call_leaves_exactly_one_comment_with_the_later_plan() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    let fake = FakeComments::mount(&server, 30).await;
    Mock::given(method("POST"))
        .respond_with(SlowCreate(fake.clone(), Duration::from_secs(5)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    enqueue(db.pool(), comment_call("Plan: first push")).await;
    let w = worker(db.pool(), &server);
    let doomed = tokio::spawn({
        let w = w.clone();
        async move { w.deliver_due().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    enqueue(db.pool(), comment_call("Plan: second push")).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());
    assert_eq!(fake.comments().len(), 1, "GitHub made the comment");

    // Leased: nobody takes it before the lease ends.
    let r = rows(db.pool()).await;
    assert_eq!(r.len(), 1);
    assert!(r[0].due_in > 20.0, "{r:?}");
    assert_eq!(w.deliver_due().await.unwrap(), Pass::default());
    make_due(db.pool()).await; // the lease ran out
    assert_eq!(w.deliver_due().await.unwrap().done, 1);
    assert_eq!(fake.comments(), [(1000, marked("Plan: second push"))]);
    assert_eq!(
        summary(&requests(&server).await)[2..],
        [
            "GET /repos/acme/platform/issues/7/comments",
            "PATCH /repos/acme/platform/issues/comments/1000"
        ]
    );
}

#[tokio::test]
async fn a_500_is_retried_after_a_backoff_and_nothing_is_lost() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"message": "Server Error"})))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(status_created("cairn/apply"))
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    let w = worker(db.pool(), &server);

    let pass = w.deliver_due().await.unwrap();
    assert_eq!(pass.retrying, 1, "{pass:?}");
    let r = rows(db.pool()).await;
    assert_eq!((r[0].status.as_str(), r[0].attempts), ("pending", 1));
    assert!(
        r[0].last_error
            .as_deref()
            .unwrap()
            .contains("GitHub answered HTTP 500: Server Error"),
        "{r:?}"
    );
    // Between half and all of the first backoff (10 s).
    assert!(r[0].due_in > 4.0 && r[0].due_in <= 10.0, "{r:?}");
    assert_eq!(w.deliver_due().await.unwrap(), Pass::default());
    assert_eq!(requests(&server).await.len(), 1);

    make_due(db.pool()).await;
    assert_eq!(w.deliver_due().await.unwrap().done, 1);
    let sent = requests(&server).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(body(&sent[0]), body(&sent[1]));
    assert_eq!(rows(db.pool()).await[0].status, "done");
}

#[tokio::test]
async fn a_403_rate_limit_holds_every_call_until_the_reset_without_counting_an_attempt() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(403)
                .set_body_json(json!({
                    "message": "API rate limit exceeded for installation ID 1.",
                    "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api#rate-limiting"
                }))
                .insert_header("x-ratelimit-limit", "5000")
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", epoch_in(120).as_str()),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(status_created("cairn/apply"))
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    enqueue(db.pool(), status_call("cairn/plan", StatusState::Pending)).await;
    let w = worker(db.pool(), &server);

    let pass = w.deliver_due().await.unwrap();
    assert!(pass.rate_limited, "{pass:?}");
    assert_eq!(
        requests(&server).await.len(),
        1,
        "the second call waits too"
    );
    let r = rows(db.pool()).await;
    assert_eq!(r.len(), 2);
    for row in &r {
        assert_eq!(row.status, "pending");
        assert_eq!(
            row.attempts, 0,
            "a rate limit is not a failed attempt: {row:?}"
        );
        assert!(row.due_in > 110.0 && row.due_in <= 122.0, "{row:?}");
    }
    assert!(
        r[0].last_error
            .as_deref()
            .unwrap()
            .starts_with("rate limited by GitHub")
    );

    make_due(db.pool()).await; // the limit reset
    assert_eq!(w.deliver_due().await.unwrap().done, 2);
    assert_eq!(requests(&server).await.len(), 3);
}

#[tokio::test]
async fn a_429_with_retry_after_waits_that_long() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .set_body_json(json!({"message": "You have exceeded a secondary rate limit."}))
                .insert_header("retry-after", "45"),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(status_created("cairn/apply"))
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    let w = worker(db.pool(), &server);
    assert!(w.deliver_due().await.unwrap().rate_limited);
    let r = rows(db.pool()).await;
    assert_eq!(r[0].attempts, 0);
    assert!(r[0].due_in > 40.0 && r[0].due_in <= 45.0, "{r:?}");
    make_due(db.pool()).await;
    assert_eq!(w.deliver_due().await.unwrap().done, 1);
}

#[tokio::test]
async fn a_success_that_uses_up_the_limit_holds_the_next_calls() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            status_created("cairn/apply")
                .insert_header("x-ratelimit-remaining", "0")
                .insert_header("x-ratelimit-reset", epoch_in(300).as_str()),
        )
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    enqueue(db.pool(), status_call("cairn/plan", StatusState::Success)).await;
    let pass = worker(db.pool(), &server).deliver_due().await.unwrap();
    assert_eq!((pass.done, pass.rate_limited), (1, true));
    assert_eq!(requests(&server).await.len(), 1);
    let r = rows(db.pool()).await;
    assert_eq!(r[1].status, "pending");
    assert!(r[1].due_in > 290.0 && r[1].due_in <= 302.0, "{r:?}");
}

#[tokio::test]
async fn a_call_that_keeps_failing_is_dead_after_the_maximum_attempts() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(502).set_body_string("<html>Bad Gateway</html>"))
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Failure)).await;
    let w = worker(db.pool(), &server);
    let mut dead = 0;
    for _ in 0..3 {
        dead += w.deliver_due().await.unwrap().dead;
        make_due(db.pool()).await;
    }
    assert_eq!(dead, 1);
    assert_eq!(
        requests(&server).await.len(),
        3,
        "exactly max_attempts calls"
    );
    assert_eq!(w.deliver_due().await.unwrap(), Pass::default());
    assert_eq!(requests(&server).await.len(), 3);

    let letters = outbox::dead_letters(db.pool(), 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].kind, "create_status");
    assert_eq!(letters[0].repo, "acme/platform");
    assert_eq!(letters[0].attempts, 3);
    assert_eq!(
        letters[0].last_error.as_deref(),
        Some(
            format!(
                "POST /repos/acme/platform/statuses/{SHA}: GitHub answered HTTP 502: \
                 <html>Bad Gateway</html>"
            )
            .as_str()
        )
    );
    assert_eq!(letters[0].payload["state"], "failure");
}

#[tokio::test]
async fn a_validation_error_is_dead_at_once() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    // The shape of the `errors` recording's 422.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "message": "Validation Failed",
            "errors": [{"resource": "Status", "code": "custom", "field": "target_url"}],
            "documentation_url": "https://docs.github.com/rest/commits/statuses#create-a-commit-status"
        })))
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    let pass = worker(db.pool(), &server).deliver_due().await.unwrap();
    assert_eq!(pass.dead, 1);
    let r = rows(db.pool()).await;
    assert_eq!((r[0].status.as_str(), r[0].attempts), ("dead", 1));
    assert!(
        r[0].last_error
            .as_deref()
            .unwrap()
            .contains("HTTP 422: Validation Failed")
    );
}

#[tokio::test]
async fn the_errors_recording_is_a_permanent_failure() {
    let Some(fixtures) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    let exchange = support::api_recording(&fixtures, "errors").remove(0);
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(exchange["status"].as_u64().unwrap() as u16)
                .set_body_json(&exchange["response"]),
        )
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    let pass = worker(db.pool(), &server).deliver_due().await.unwrap();
    assert_eq!(pass.dead, 1);
    let error = rows(db.pool()).await[0].last_error.clone().unwrap();
    assert!(
        error.ends_with(
            r#"GitHub answered HTTP 422: Validation Failed [{"code":"invalid","field":"color","resource":"Label"}]"#
        ),
        "{error}"
    );
}

#[tokio::test]
async fn a_rolled_back_transaction_enqueues_nothing() {
    let db = cairn_testkit::test_db!();
    let mut tx = db.pool().begin().await.unwrap();
    outbox::enqueue(&mut tx, &status_call("cairn/apply", StatusState::Success))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(rows(db.pool()).await.is_empty());
}

#[tokio::test]
async fn calls_that_cannot_be_made_are_refused_at_enqueue() {
    let db = cairn_testkit::test_db!();
    let mut tx = db.pool().begin().await.unwrap();
    let bad_sha = GitHubCall::CreateStatus {
        repo: repo(),
        sha: "main".to_owned(),
        status: CommitStatus::new("cairn/apply", StatusState::Success, "ok", None),
    };
    assert!(matches!(
        outbox::enqueue(&mut tx, &bad_sha).await,
        Err(outbox::OutboxError::BadSha { .. })
    ));
    let no_context = GitHubCall::CreateStatus {
        repo: repo(),
        sha: SHA.to_owned(),
        status: CommitStatus::new(" ", StatusState::Success, "ok", None),
    };
    assert!(matches!(
        outbox::enqueue(&mut tx, &no_context).await,
        Err(outbox::OutboxError::EmptyContext)
    ));
}

#[tokio::test]
async fn the_worker_loop_delivers_on_notify() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(status_created("cairn/apply"))
        .mount(&server)
        .await;
    let mut w_config = config();
    w_config.poll_interval = Duration::from_secs(3600);
    let mut github = GitHubConfig::new(GitHubAuth::Token(TOKEN.to_owned().into()));
    github.api_url = server.uri();
    let w = OutboxWorker::new(
        db.pool().clone(),
        Arc::new(GitHub::new(github).unwrap()),
        w_config,
    );
    let stop = cairn_reconciler::worker::Shutdown::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { w.run(&stop).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while requests(&server).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not woken by NOTIFY"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.trigger();
    running.await.unwrap();
}

fn app_worker(pool: &PgPool, server: &MockServer, installation_id: Option<u64>) -> OutboxWorker {
    let key = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/test-app-key.pem"),
    )
    .unwrap();
    let mut github = GitHubConfig::new(GitHubAuth::App {
        app_id: 12345,
        private_key_pem: key.into(),
        installation_id,
    });
    github.api_url = server.uri();
    OutboxWorker::new(
        pool.clone(),
        Arc::new(GitHub::new(github).unwrap()),
        config(),
    )
}

async fn mount_installation_token(server: &MockServer, installation: u64) {
    Mock::given(method("POST"))
        .and(path(format!(
            "/app/installations/{installation}/access_tokens"
        )))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "token": "ghs_installationtoken",
            "expires_at": "2099-01-01T00:00:00Z",
            "permissions": {"statuses": "write", "pull_requests": "write"},
            "repository_selection": "selected"
        })))
        .mount(server)
        .await;
}

/// The JWT's claims, checked to be an RS256 app token for app 12345.
fn app_jwt_claims(authorization: &str) -> Value {
    let jwt = authorization.strip_prefix("Bearer ").unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    let decode = |part: &str| -> Value {
        use base64_like::decode_url_safe;
        serde_json::from_slice(&decode_url_safe(part)).unwrap()
    };
    assert_eq!(decode(parts[0])["alg"], "RS256");
    decode(parts[1])
}

#[tokio::test]
async fn a_github_app_calls_with_an_installation_token() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    mount_installation_token(&server, 99).await;
    Mock::given(method("POST"))
        .and(path(format!("/repos/acme/platform/statuses/{SHA}")))
        .respond_with(status_created("cairn/apply"))
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    assert_eq!(
        app_worker(db.pool(), &server, Some(99))
            .deliver_due()
            .await
            .unwrap()
            .done,
        1
    );
    let sent = requests(&server).await;
    assert_eq!(
        summary(&sent),
        [
            "POST /app/installations/99/access_tokens",
            format!("POST /repos/acme/platform/statuses/{SHA}").as_str()
        ]
    );
    let claims = app_jwt_claims(sent[0].headers["authorization"].to_str().unwrap());
    assert_eq!(claims["iss"], 12345);
    assert_eq!(
        sent[1].headers["authorization"].to_str().unwrap(),
        "Bearer ghs_installationtoken"
    );
}

#[tokio::test]
async fn a_github_app_finds_each_repositorys_installation_once() {
    let db = cairn_testkit::test_db!();
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/platform/installation"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": 77,
            "app_id": 12345,
            "account": {"login": "acme", "id": 1}
        })))
        .mount(&server)
        .await;
    mount_installation_token(&server, 77).await;
    Mock::given(method("POST"))
        .and(path(format!("/repos/acme/platform/statuses/{SHA}")))
        .respond_with(status_created("cairn/apply"))
        .mount(&server)
        .await;
    enqueue(db.pool(), status_call("cairn/apply", StatusState::Success)).await;
    enqueue(db.pool(), status_call("cairn/plan", StatusState::Success)).await;
    let w = app_worker(db.pool(), &server, None);
    assert_eq!(w.deliver_due().await.unwrap().done, 2);
    let sent = requests(&server).await;
    assert_eq!(
        summary(&sent),
        [
            "GET /repos/acme/platform/installation",
            "POST /app/installations/77/access_tokens",
            format!("POST /repos/acme/platform/statuses/{SHA}").as_str(),
            format!("POST /repos/acme/platform/statuses/{SHA}").as_str(),
        ]
    );
    app_jwt_claims(sent[0].headers["authorization"].to_str().unwrap());
    for status in &sent[2..] {
        assert_eq!(
            status.headers["authorization"].to_str().unwrap(),
            "Bearer ghs_installationtoken"
        );
    }
}

/// Enough base64url decoding to read a JWT, without another dependency.
mod base64_like {
    pub fn decode_url_safe(input: &str) -> Vec<u8> {
        let value = |c: u8| -> u32 {
            match c {
                b'A'..=b'Z' => u32::from(c - b'A'),
                b'a'..=b'z' => u32::from(c - b'a') + 26,
                b'0'..=b'9' => u32::from(c - b'0') + 52,
                b'-' | b'+' => 62,
                b'_' | b'/' => 63,
                _ => panic!("not base64url: {c}"),
            }
        };
        let bytes: Vec<u8> = input.bytes().filter(|&c| c != b'=').collect();
        let mut out = Vec::new();
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            for (i, &c) in chunk.iter().enumerate() {
                n |= value(c) << (18 - 6 * i);
            }
            let produced = chunk.len() * 6 / 8;
            for i in 0..produced {
                out.push((n >> (16 - 8 * i)) as u8);
            }
        }
        out
    }
}
