//! The GitHub integration end to end: the real `cairn serve` binary on loopback, a real PostgreSQL, real
//! git remotes (bare repositories the `git` CLI pushes to, reached through `--git-rewrite` so the
//! payloads' GitHub URLs resolve to them), GitHub's real payloads (read from `CAIRN_GITHUB_FIXTURES`,
//! rewritten in memory to name these repositories and commits, signed as GitHub signs) and a local fake
//! of GitHub's API that keeps comments and statuses as GitHub would.
//!
//! - a push to an app's branch ends with a new release and its deploy tasks (and `cairn/deploy` pending);
//! - a push to the config branch is applied (and `cairn/apply` succeeds on it);
//! - a push to a pinned app is ignored, and `cairn webhooks` says why;
//! - a pull request gets the expected plan comment (snapshot) and a `cairn/plan` status on its head;
//! - two `synchronize` deliveries 50 ms apart, with `cairn serve` SIGKILLed between committing the
//!   comment's outbox row and calling GitHub, end with exactly one comment showing the later plan.
//!
//! Without `CAIRN_GITHUB_FIXTURES` these tests say so and skip.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub(crate) const SECRET: &str = "It's a Secret to Everybody";
pub(crate) const TOKEN: &str = "test-token-e2e";
const APP_URL: &str = "https://github.com/Codertocat/Hello-World.git";
const CONFIG_URL: &str = "https://github.com/acme/platform.git";
/// How long any one thing may take before the test fails.
const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn fixtures() -> Option<PathBuf> {
    cairn_testkit::github_fixtures()
}

fn fixture(dir: &Path, file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("webhooks").join(file)).unwrap())
        .unwrap()
}

use crate::agents::support::cairn_db;
/// `git` with a fixed identity and clock: the same content gives the same commit on every run.
use cairn_testkit::fixtures;
use cairn_testkit::git_fixed_clock as git;

struct Remote {
    work: PathBuf,
    bare: PathBuf,
}

impl Remote {
    fn new(root: &Path, name: &str) -> Remote {
        let work = root.join(format!("{name}-work"));
        let bare = root.join(format!("{name}.git"));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "--bare", "-q"]);
        git(&work, &["init", "-q"]);
        Remote { work, bare }
    }

    fn write(&self, path: &str, text: &str) {
        let p = self.work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// Commits the work tree and points the remote's `refname` at the commit; returns its id.
    fn commit_to(&self, message: &str, refname: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(
            &self.work,
            &["commit", "-q", "--allow-empty", "-m", message],
        );
        let sha = git(&self.work, &["rev-parse", "HEAD"]);
        let bare = self.bare.to_str().unwrap();
        git(
            &self.work,
            &["push", "-q", "-f", bare, &format!("{sha}:{refname}")],
        );
        sha
    }
}

/// The config and app source remotes, and the flags that make `cairn serve` use them.
struct World {
    tmp: tempfile::TempDir,
    config: Remote,
    source: Remote,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let config = Remote::new(tmp.path(), "platform");
        let source = Remote::new(tmp.path(), "hello-world");
        World {
            tmp,
            config,
            source,
        }
    }

    /// A platform of one plan, one runtime, one node and the apps `(name, replicas, extra source keys)`.
    fn platform(&self, apps: &[(&str, u32, &str)]) {
        self.config.write(
            "cairn.toml",
            &fixtures::settings().currency("EUR").to_string(),
        );
        self.config.write(
            "plans/small.toml",
            &fixtures::plan("small")
                .cpu("0.25")
                .memory("256MiB")
                .max_replicas(3)
                .to_string(),
        );
        self.config.write(
            "runtimes/docker.toml",
            &fixtures::runtime("docker").dockerfile().to_string(),
        );
        self.config.write(
            "nodes/n1.toml",
            &fixtures::node("n1")
                .cpu("2")
                .memory("4GiB")
                .disk("50GiB")
                .to_string(),
        );
        for (name, replicas, extra) in apps {
            self.app(name, *replicas, extra);
        }
    }

    fn app(&self, name: &str, replicas: u32, extra: &str) {
        self.config.write(
            &format!("apps/{name}.toml"),
            &format!(
                "[app.{name}]\nplan = \"small\"\nruntime = \"docker\"\nreplicas = {replicas}\n\
                 source = {{ url = \"{APP_URL}\", branch = \"master\"{extra} }}\n"
            ),
        );
    }

    fn config_commit(&self, message: &str) -> String {
        self.config.commit_to(message, "refs/heads/main")
    }

    fn source_commit(&self, content: &str) -> String {
        self.source.write("index.html", content);
        self.source.commit_to(content, "refs/heads/master")
    }

    fn serve_args(&self) -> Vec<String> {
        let file = |r: &Remote| format!("file://{}", r.bare.display());
        vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--repo".into(),
            CONFIG_URL.into(),
            "--ref".into(),
            "main".into(),
            "--git-rewrite".into(),
            format!("{CONFIG_URL}={}", file(&self.config)),
            "--git-rewrite".into(),
            format!("{APP_URL}={}", file(&self.source)),
            "--cache-dir".into(),
            self.tmp.path().join("cache").display().to_string(),
            // Only deliveries move things in these tests; the interval's poll would hide a bug.
            "--interval".into(),
            "1h".into(),
            "--webhook-poll".into(),
            "2s".into(),
            "--github-call-lease".into(),
            "4s".into(),
            // One id across restarts: a restarted serve takes its predecessor's lease at once.
            "--replica-id".into(),
            "webhooks-serve".into(),
        ]
    }
}

/// A running `cairn serve`.
struct Serve {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Serve {
    fn start(db_url: &str, args: &[String], github: Option<&str>, env: &[(&str, &str)]) -> Serve {
        Serve::start_with_secret(db_url, args, github, env, Some(SECRET))
    }

    fn start_with_secret(
        db_url: &str,
        args: &[String],
        github: Option<&str>,
        env: &[(&str, &str)],
        secret: Option<&str>,
    ) -> Serve {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
        cmd.args(args)
            .env("DATABASE_URL", db_url)
            .env_remove("CAIRN_GITHUB_WEBHOOK_SECRET")
            .env("CAIRN_LOG", "info,cairn_webhook=debug")
            .env_remove("CAIRN_GITHUB_TOKEN")
            .env_remove("CAIRN_GITHUB_APP_ID")
            .env_remove("CAIRN_FAILPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(secret) = secret {
            cmd.env("CAIRN_GITHUB_WEBHOOK_SECRET", secret);
        }
        if let Some(api) = github {
            cmd.env("CAIRN_GITHUB_TOKEN", TOKEN)
                .env("CAIRN_GITHUB_API_URL", api)
                .env("CAIRN_GITHUB_HOST", "github.com");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("cairn serve starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let sink = stderr.clone();
            let pipe = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        Serve {
            child,
            addr,
            stderr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Posts a delivery signed as GitHub signs it; returns the status.
    async fn deliver(&self, event: &str, id: &str, body: &Value) -> u16 {
        let body = serde_json::to_vec(body).unwrap();
        let signature = sign(&body);
        reqwest::Client::new()
            .post(self.url("/webhooks/github"))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", id)
            .header("x-hub-signature-256", signature)
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// SIGTERM, and the exit status within a bound.
    fn terminate(mut self) -> std::process::ExitStatus {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "cairn serve did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `X-Hub-Signature-256` of `body` with the tests' secret, as GitHub signs.
pub(crate) fn sign(body: &[u8]) -> String {
    let secret = cairn_webhook::signature::WebhookSecret::new(SECRET).unwrap();
    cairn_webhook::signature::sign(&secret, body)
}

/// Polls `check` until it returns `Some`, failing with `what` (and the server's log) after [`WAIT`].
async fn eventually<T, F, Fut>(serve: &Serve, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; cairn serve's log:\n{}",
            serve.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn releases(pool: &PgPool, app: &str) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT number, source_commit FROM releases WHERE app = $1 ORDER BY number")
        .bind(app)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn applied_commit(pool: &PgPool) -> Option<String> {
    sqlx::query_scalar("SELECT commit FROM config_state")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// What the fake GitHub was asked and keeps.
#[derive(Debug, Default)]
struct GitHubState {
    /// (id, pr, body)
    comments: Vec<(u64, u64, String)>,
    created: usize,
    /// (repo, sha, context, state, description)
    statuses: Vec<(String, String, String, String, String)>,
}

/// A local GitHub API that keeps issue comments and commit statuses as GitHub does.
pub(crate) struct FakeGitHub {
    server: MockServer,
    state: Arc<Mutex<GitHubState>>,
}

struct Api {
    state: Arc<Mutex<GitHubState>>,
    /// The fixtures' `create-status` response, as GitHub answers a status.
    status_response: Value,
}

impl Respond for Api {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let path = request.url.path().to_owned();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = request.method.as_str();
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let mut state = self.state.lock().unwrap();
        match (method, parts.as_slice()) {
            ("POST", ["repos", owner, repo, "statuses", sha]) => {
                let s = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
                state.statuses.push((
                    format!("{owner}/{repo}"),
                    (*sha).to_owned(),
                    s("context"),
                    s("state"),
                    s("description"),
                ));
                let mut answer = self.status_response.clone();
                answer["state"] = body["state"].clone();
                answer["context"] = body["context"].clone();
                answer["description"] = body["description"].clone();
                ResponseTemplate::new(201).set_body_json(answer)
            }
            ("GET", ["repos", _, _, "issues", pr, "comments"]) => {
                let pr: u64 = pr.parse().unwrap();
                let list: Vec<Value> = state
                    .comments
                    .iter()
                    .filter(|(_, p, _)| *p == pr)
                    .map(|(id, _, body)| json!({ "id": id, "body": body }))
                    .collect();
                ResponseTemplate::new(200).set_body_json(list)
            }
            ("POST", ["repos", _, _, "issues", pr, "comments"]) => {
                let id = 1000 + state.comments.len() as u64;
                let text = body["body"].as_str().unwrap().to_owned();
                state.comments.push((id, pr.parse().unwrap(), text.clone()));
                state.created += 1;
                ResponseTemplate::new(201).set_body_json(json!({ "id": id, "body": text }))
            }
            ("PATCH", ["repos", _, _, "issues", "comments", id]) => {
                let id: u64 = id.parse().unwrap();
                let text = body["body"].as_str().unwrap().to_owned();
                match state.comments.iter_mut().find(|(i, _, _)| *i == id) {
                    Some(comment) => {
                        comment.2 = text.clone();
                        ResponseTemplate::new(200).set_body_json(json!({ "id": id, "body": text }))
                    }
                    None => {
                        ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"}))
                    }
                }
            }
            _ => ResponseTemplate::new(404).set_body_json(json!({ "message": "Not Found" })),
        }
    }
}

impl FakeGitHub {
    pub(crate) async fn start(dir: &Path) -> FakeGitHub {
        let recording: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("api/create-status.json")).unwrap(),
        )
        .unwrap();
        let recording = match recording {
            Value::Array(mut items) => items.remove(0),
            other => other,
        };
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(GitHubState::default()));
        Mock::given(wiremock::matchers::any())
            .and(wiremock::matchers::header(
                "authorization",
                format!("Bearer {TOKEN}").as_str(),
            ))
            .respond_with(Api {
                state: state.clone(),
                status_response: recording["response"].clone(),
            })
            .mount(&server)
            .await;
        FakeGitHub { server, state }
    }

    pub(crate) fn uri(&self) -> String {
        self.server.uri()
    }

    fn status(&self, sha: &str, context: &str) -> Option<(String, String)> {
        self.state
            .lock()
            .unwrap()
            .statuses
            .iter()
            .rev()
            .find(|(_, s, c, _, _)| s == sha && c == context)
            .map(|(_, _, _, state, description)| (state.clone(), description.clone()))
    }

    /// Every status posted, in order: (repo, sha, context, state, description).
    pub(crate) fn statuses(&self) -> Vec<(String, String, String, String, String)> {
        self.state.lock().unwrap().statuses.clone()
    }

    fn comments(&self) -> Vec<(u64, String)> {
        self.state
            .lock()
            .unwrap()
            .comments
            .iter()
            .map(|(_, pr, body)| (*pr, body.clone()))
            .collect()
    }
}

/// The fixtures' push of a new `master` branch, made into a push of `repo` (`owner/name`) from
/// `before` to `after` on `branch`.
pub(crate) fn push(dir: &Path, repo: &str, branch: &str, before: &str, after: &str) -> Value {
    let mut push = fixture(dir, "push.with-new-branch.json");
    if repo != "Codertocat/Hello-World" {
        let r = &mut push["repository"];
        r["full_name"] = repo.into();
        r["name"] = repo.split_once('/').unwrap().1.into();
        r["clone_url"] = format!("https://github.com/{repo}.git").into();
        r["html_url"] = format!("https://github.com/{repo}").into();
        r["ssh_url"] = format!("git@github.com:{repo}.git").into();
    }
    push["ref"] = format!("refs/heads/{branch}").into();
    push["before"] = before.into();
    push["after"] = after.into();
    push["created"] = false.into();
    push["head_commit"]["id"] = after.into();
    push
}

/// The fixtures' `pull_request` `action`, made into pull request `number` to `acme/platform` from
/// a branch of it, with its head at `head`.
fn pull_request(dir: &Path, action: &str, number: u64, head: &str) -> Value {
    let mut pr = fixture(dir, &format!("pull_request.{action}.json"));
    for pointer in [
        "/repository",
        "/pull_request/base/repo",
        "/pull_request/head/repo",
    ] {
        let repo = pr.pointer_mut(pointer).unwrap();
        repo["full_name"] = "acme/platform".into();
        repo["name"] = "platform".into();
        repo["owner"]["login"] = "acme".into();
        repo["html_url"] = "https://github.com/acme/platform".into();
        repo["clone_url"] = CONFIG_URL.into();
        repo["ssh_url"] = "git@github.com:acme/platform.git".into();
        repo["fork"] = false.into();
    }
    pr["number"] = number.into();
    pr["pull_request"]["number"] = number.into();
    pr["pull_request"]["base"]["ref"] = "main".into();
    pr["pull_request"]["head"]["sha"] = head.into();
    pr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_push_to_an_apps_branch_ends_with_a_new_release_and_its_deploy_tasks() {
    let Some(dir) = fixtures() else { return };
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let github = FakeGitHub::start(&dir).await;
    let w = World::new();
    w.platform(&[("web", 1, "")]);
    let c1 = w.source_commit("v1");
    let config = w.config_commit("a platform");
    let serve = Serve::start(db.url(), &w.serve_args(), Some(&github.uri()), &[]);
    eventually(&serve, "the first release", || async {
        (releases(pool, "web").await == [(1, c1.clone())]).then_some(())
    })
    .await;
    eventually(&serve, "cairn/apply success", || async {
        github
            .status(&config, "cairn/apply")
            .filter(|(state, _)| state == "success")
    })
    .await;

    let c2 = w.source_commit("v2");
    let status = serve
        .deliver(
            "push",
            "e2e-push-1",
            &push(&dir, "Codertocat/Hello-World", "master", &c1, &c2),
        )
        .await;
    assert_eq!(status, 202);
    eventually(&serve, "release #2 of the pushed commit", || async {
        (releases(pool, "web").await == [(1, c1.clone()), (2, c2.clone())]).then_some(())
    })
    .await;
    let deploys: Vec<(String, String)> = sqlx::query_as(
        "SELECT node, payload->>'source_commit' FROM tasks
         WHERE app = 'web' AND kind = 'deploy' AND release = 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(deploys, [("n1".to_owned(), c2.clone())]);
    let (state, description) =
        eventually(&serve, "cairn/deploy/web on the pushed commit", || async {
            github.status(&c2, "cairn/deploy/web")
        })
        .await;
    assert_eq!(
        (state.as_str(), description.as_str()),
        ("pending", "Release #2 of web planned; deploying…")
    );

    // `cairn webhooks` shows the delivery and what it caused.
    let out = cairn_db(db.url(), &["webhooks", "--json", "--limit", "5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["delivery_id"], "e2e-push-1");
    assert_eq!(listed[0]["status"], "handled");
    assert_eq!(
        listed[0]["outcome"],
        format!(
            "asked Codertocat/Hello-World for the head of `master` for web (pushed {})",
            &c2[..7]
        )
    );

    let status = serve.terminate();
    assert!(
        status.success(),
        "cairn serve exits 0 on SIGTERM: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_push_to_the_config_branch_is_applied() {
    let Some(dir) = fixtures() else { return };
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let github = FakeGitHub::start(&dir).await;
    let w = World::new();
    w.platform(&[("web", 1, "")]);
    w.source_commit("v1");
    let a = w.config_commit("a platform");
    let serve = Serve::start(db.url(), &w.serve_args(), Some(&github.uri()), &[]);
    eventually(&serve, "the first commit applied", || async {
        (applied_commit(pool).await.as_deref() == Some(a.as_str())).then_some(())
    })
    .await;

    w.app("web", 2, "");
    let b = w.config_commit("two replicas");
    let status = serve
        .deliver(
            "push",
            "e2e-config-1",
            &push(&dir, "acme/platform", "main", &a, &b),
        )
        .await;
    assert_eq!(status, 202);
    eventually(&serve, "the pushed commit applied", || async {
        (applied_commit(pool).await.as_deref() == Some(b.as_str())).then_some(())
    })
    .await;
    let (state, description) = eventually(&serve, "cairn/apply success on it", || async {
        github
            .status(&b, "cairn/apply")
            .filter(|(state, _)| state == "success")
    })
    .await;
    assert_eq!(state, "success");
    assert_eq!(
        description,
        "Applied. Plan: 0 to add, 1 to change, 0 to destroy."
    );
    assert!(serve.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_a_pinned_app_are_ignored_with_the_reason() {
    let Some(dir) = fixtures() else { return };
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let w = World::new();
    w.platform(&[("docs", 1, ", rev = \"v1.0\"")]);
    let c1 = w.source_commit("v1");
    w.config_commit("a pinned app");
    let serve = Serve::start(db.url(), &w.serve_args(), None, &[]);
    eventually(&serve, "the pinned release", || async {
        (releases(pool, "docs").await == [(1, "v1.0".to_owned())]).then_some(())
    })
    .await;

    let c2 = w.source_commit("v2");
    let status = serve
        .deliver(
            "push",
            "e2e-pinned-1",
            &push(&dir, "Codertocat/Hello-World", "master", &c1, &c2),
        )
        .await;
    assert_eq!(status, 202);
    let (status, outcome): (String, String) =
        eventually(&serve, "the delivery processed", || async {
            sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT status, outcome FROM webhook_deliveries WHERE delivery_id = 'e2e-pinned-1'",
            )
            .fetch_one(pool)
            .await
            .ok()
            .filter(|(s, _)| s != "received")
            .map(|(s, o)| (s, o.unwrap_or_default()))
        })
        .await;
    assert_eq!(status, "ignored");
    assert_eq!(
        outcome,
        "push to Codertocat/Hello-World@master: `docs` is pinned to rev `v1.0` by its manifest (a \
         pull request that changes the pin deploys it)"
    );
    let out = cairn_db(db.url(), &["webhooks"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines().any(|l| l.contains("e2e-pinned-1")
            && l.contains("push")
            && l.contains("ignored")
            && l.contains("is pinned to rev `v1.0`")),
        "{text}"
    );

    // The same through the admin API, with an admin token and no database credentials; without a
    // token it is 401.
    let token = cairn_db(db.url(), &["token", "create", "--name", "ops"]);
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let remote = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
        cmd.args(["webhooks", "--json", "--server", &serve.url("")])
            .env_remove("DATABASE_URL")
            .env_remove("CAIRN_TOKEN");
        if let Some(t) = token {
            cmd.env("CAIRN_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = remote(Some(&token));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let local = cairn_db(db.url(), &["webhooks", "--json"]);
    assert_eq!(
        listed,
        serde_json::from_slice::<Value>(&local.stdout).unwrap(),
        "the API shows what the database does"
    );
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["delivery_id"] == "e2e-pinned-1")
    );
    let out = remote(Some("cairn-admin-0000wrong"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(releases(pool, "docs").await, [(1, "v1.0".to_owned())]);
    assert!(serve.terminate().success());
}

/// The plan comment with the moment it was planned taken out.
fn stable(body: &str) -> String {
    body.lines()
        .map(|l| match l.find(" · planned at ") {
            Some(at) => format!("{} · planned at <time></sub>", &l[..at]),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_pull_request_gets_the_expected_plan_comment_and_status() {
    let Some(dir) = fixtures() else { return };
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let github = FakeGitHub::start(&dir).await;
    let w = World::new();
    w.platform(&[("web", 1, "")]);
    w.source_commit("v1");
    let base = w.config_commit("a platform");
    let serve = Serve::start(db.url(), &w.serve_args(), Some(&github.uri()), &[]);
    eventually(&serve, "the base applied", || async {
        (applied_commit(pool).await.as_deref() == Some(base.as_str())).then_some(())
    })
    .await;

    w.app("web", 2, "");
    w.app("api", 1, "");
    let head = w
        .config
        .commit_to("an api, and two web replicas", "refs/pull/7/head");
    let status = serve
        .deliver(
            "pull_request",
            "e2e-pr-1",
            &pull_request(&dir, "opened", 7, &head),
        )
        .await;
    assert_eq!(status, 202);
    let (state, description) = eventually(&serve, "cairn/plan on the head", || async {
        github
            .status(&head, "cairn/plan")
            .filter(|(state, _)| state != "pending")
    })
    .await;
    assert_eq!(
        (state.as_str(), description.as_str()),
        ("success", "Plan: 1 to add, 1 to change, 0 to destroy.")
    );
    let comments = github.comments();
    assert_eq!(comments.len(), 1, "{comments:#?}");
    assert_eq!(comments[0].0, 7);
    insta::assert_snapshot!("pull_request_plan_comment", stable(&comments[0].1));
    // Planned, not applied.
    assert_eq!(applied_commit(pool).await, Some(base));
    assert!(serve.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_synchronize_deliveries_with_a_sigkill_before_the_call_end_with_one_comment_of_the_later_plan()
 {
    let Some(dir) = fixtures() else { return };
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let github = FakeGitHub::start(&dir).await;
    let w = World::new();
    w.platform(&[("web", 1, "")]);
    w.source_commit("v1");
    let base = w.config_commit("a platform");
    // The comment's call waits at the failpoint, its outbox row claimed and committed, GitHub not
    // called yet: the kill lands there.
    let failpoint = ("CAIRN_FAILPOINT", "outbox-before-upsert_pr_comment:60000");
    let serve = Serve::start(db.url(), &w.serve_args(), Some(&github.uri()), &[failpoint]);
    eventually(&serve, "the base applied", || async {
        (applied_commit(pool).await.as_deref() == Some(base.as_str())).then_some(())
    })
    .await;

    w.app("web", 2, "");
    let a = w.config.commit_to("two replicas", "refs/pull/7/head");
    assert_eq!(
        serve
            .deliver(
                "pull_request",
                "e2e-sync-a",
                &pull_request(&dir, "synchronize", 7, &a)
            )
            .await,
        202
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    w.app("web", 3, "");
    let b = w.config.commit_to("three replicas", "refs/pull/7/head");
    assert_eq!(
        serve
            .deliver(
                "pull_request",
                "e2e-sync-b",
                &pull_request(&dir, "synchronize", 7, &b)
            )
            .await,
        202
    );
    eventually(&serve, "the later head planned and the comment call held", || async {
        let (requested, planned, sha): (i32, i32, Option<String>) = sqlx::query_as(
            "SELECT requested_version, planned_version, planned_sha FROM github_pr_plans WHERE pr = 7",
        )
        .fetch_optional(pool)
        .await
        .unwrap()?;
        let held = serve
            .log()
            .contains("failpoint outbox-before-upsert_pr_comment: pausing");
        (requested == 2 && planned == 2 && sha.as_deref() == Some(b.as_str()) && held).then_some(())
    })
    .await;
    // One pending comment call, claimed (its lease runs), holding B's plan (A's, if A was planned
    // apart, was replaced by it).
    let (body, leased): (String, bool) = sqlx::query_as(
        "SELECT payload->>'body', next_attempt_at > now() FROM github_outbox
         WHERE kind = 'upsert_pr_comment' AND status = 'pending'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(leased, "the comment's call is claimed");
    assert!(
        body.contains(&format!("### Cairn plan for `{}`", &b[..7])),
        "{body}"
    );

    // SIGKILL: no chance to finish anything.
    let mut serve = serve;
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    assert!(
        github.comments().is_empty(),
        "GitHub was not called before the kill"
    );
    drop(serve);

    let serve = Serve::start(db.url(), &w.serve_args(), Some(&github.uri()), &[]);
    eventually(&serve, "the comment made after the restart", || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM github_outbox WHERE status = 'pending'")
                .fetch_one(pool)
                .await
                .unwrap();
        (pending == 0 && !github.comments().is_empty()).then_some(())
    })
    .await;
    let comments = github.comments();
    assert_eq!(comments.len(), 1, "exactly one comment: {comments:#?}");
    assert_eq!(github.state.lock().unwrap().created, 1);
    let body = &comments[0].1;
    assert!(
        body.contains(&format!("### Cairn plan for `{}`", &b[..7])),
        "{body}"
    );
    assert!(body.contains("replicas: 1 → 3"), "the later plan: {body}");
    assert_eq!(
        github.status(&b, "cairn/plan"),
        Some((
            "success".to_owned(),
            "Plan: 0 to add, 1 to change, 0 to destroy.".to_owned()
        ))
    );
    assert!(serve.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_the_endpoint_is_off_and_the_log_says_so() {
    let db = cairn_testkit::test_db!();
    let pool = db.pool();
    let w = World::new();
    w.platform(&[]);
    let a = w.config_commit("a platform");
    let serve = Serve::start_with_secret(db.url(), &w.serve_args(), None, &[], None);
    eventually(&serve, "the commit applied", || async {
        (applied_commit(pool).await.as_deref() == Some(a.as_str())).then_some(())
    })
    .await;
    let status = reqwest::Client::new()
        .post(serve.url("/webhooks/github"))
        .body("{}")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404);
    let log = serve.log();
    assert!(
        log.contains("no GitHub webhook secret") && log.contains("POST /webhooks/github is off"),
        "{log}"
    );
    assert!(serve.terminate().success());
}

/// Push to running, end to end with real processes: `cairn serve` with the GitHub integration (a local
/// fake of GitHub's API), `cairn-agent` with the Docker driver, the app's source in a local git remote
/// reached through `--git-rewrite` (the payload names its GitHub URL). A signed push of v2 ends with v2
/// answering through the node proxy and a `cairn/deploy/<app>` success status on the pushed commit,
/// saying how long after the push it ran. The reconcile interval is an hour: only the delivery can have
/// moved it.
///
/// Also the push-to-running benchmark (BENCHMARKS.md): `CAIRN_E2E_PUSHES=N` pushes N versions one after
/// the other and prints the time from each delivery to its first healthy replica answering, and after
/// each, the same work done by hand with the docker CLI on the same engine ([`docker_cli_to_running`]),
/// and the ratio of the medians.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signed_push_ends_with_the_release_running_in_docker_and_a_deploy_success_status() {
    use crate::e2e::support::{Driver, E2e, app_manifest, docker_site, get, host, wait_body};
    let Some(dir) = fixtures() else { return };
    let Some(mut e) = E2e::new("webhook_push_to_running", &[Driver::Docker]).await else {
        return;
    };
    let github = FakeGitHub::start(&dir).await;
    let base = e.busybox_image();
    let app = format!("hook-{}", &e.installation[3..]);
    let source = e.app_source(&app);
    let c1 = source.commit(&docker_site(&base, "v1", true));
    e.repo.node("n1", "");
    e.repo.write(
        &format!("app-{app}.toml"),
        &app_manifest(&app, "docker-app", 1, &source),
    );
    let secret_file = e.scratch.path().join("webhook-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let plane = e
        .start_with_env(
            &[
                // Heads are read once, by the first reconcile; later only a delivery moves the app.
                "--interval",
                "1h",
                "--github-webhook-secret-file",
                secret_file.to_str().unwrap(),
                "--webhook-poll",
                "2s",
            ],
            &[
                ("CAIRN_GITHUB_TOKEN", TOKEN),
                ("CAIRN_GITHUB_API_URL", &github.uri()),
                ("CAIRN_GITHUB_HOST", "github.com"),
            ],
        )
        .await;
    let agent = e.agent(&plane, "n1", Driver::Docker, &[]).await;
    plane
        .wait_release(&app, 1, "live", Duration::from_secs(120))
        .await;
    wait_body(agent.proxy, &host(&app), "v1", Duration::from_secs(30)).await;

    let repo = format!("{}/{app}", e.installation);
    let pushes: usize = std::env::var("CAIRN_E2E_PUSHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut before = c1;
    let mut timings = Vec::new();
    let mut cli = Vec::new();
    for n in 0..pushes {
        let release = n as i64 + 2;
        let version = format!("v{release}");
        let commit = source.commit(&docker_site(&base, &version, true));
        let url = format!("{}/webhooks/github", plane.url);
        let body = serde_json::to_vec(&push(&dir, &repo, "main", &before, &commit)).unwrap();
        let pushed = Instant::now();
        let status = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", format!("e2e-push-{release}"))
            .header("x-hub-signature-256", sign(&body))
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 202);
        let deadline = pushed + Duration::from_secs(120);
        let healthy = loop {
            if matches!(get(agent.proxy, &host(&app), "/").await, Ok((200, b)) if b.trim() == version)
            {
                break pushed.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "{version} never answered through the proxy; release: {:?}\nagent log:\n{}",
                plane.release(&app, release).await,
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let row = plane
            .wait_release(&app, release, "live", Duration::from_secs(60))
            .await;
        assert_eq!(row["source_commit"], commit.as_str());
        let (state, description) = loop {
            if let Some((s, d)) = github.status(&commit, &format!("cairn/deploy/{app}"))
                && s != "pending"
            {
                break (s, d);
            }
            assert!(
                Instant::now() < deadline,
                "no final cairn/deploy status on {commit}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(state, "success", "{description}");
        assert!(
            description.starts_with(&format!("Release #{release} running"))
                && description.contains("after the push"),
            "{description}"
        );
        eprintln!(
            "push {} -> first healthy replica answering {version}: {healthy:?}; stages (ms): {}",
            n + 1,
            row["stage_timings"]
        );
        timings.push(healthy);
        if pushes > 1 {
            let by_hand = docker_cli_to_running(&e, &source.bare, &commit, &version, release).await;
            eprintln!("  the same commit by hand with the docker CLI: {by_hand:?}");
            cli.push(by_hand);
        }
        before = commit;
    }
    if pushes > 1 {
        timings.sort();
        cli.sort();
        let p50 = |t: &[Duration]| t[t.len() / 2];
        eprintln!(
            "push to first healthy over {pushes} pushes: min {:?}, p50 {:?}, max {:?}; docker CLI: min {:?}, \
             p50 {:?}, max {:?}; Cairn / CLI (p50): {:.2}",
            timings[0],
            p50(&timings),
            timings[timings.len() - 1],
            cli[0],
            p50(&cli),
            cli[cli.len() - 1],
            p50(&timings).as_secs_f64() / p50(&cli).as_secs_f64()
        );
    }
}

/// The floor of push to running: what Cairn does for a commit, by hand with the docker CLI on the same
/// engine: clone the source at the commit (one commit deep, as the agent fetches), build its Dockerfile
/// with the same (classic) builder and no cache (Cairn built this very content a moment ago, and its
/// own build of a new commit finds nothing cached), run it with the port published on loopback, and
/// poll it until it answers `version`. What it made is labelled with the test's installation, so the
/// harness removes it.
async fn docker_cli_to_running(
    e: &crate::e2e::support::E2e,
    bare: &Path,
    commit: &str,
    version: &str,
    n: i64,
) -> Duration {
    use crate::e2e::support::docker;
    let dir = e.scratch.path().join(format!("by-hand-{n}"));
    let label = format!("cairn.installation={}", e.installation);
    let tag = format!("cairn-e2e-cli/{}:{n}", e.installation);
    let (bare, commit) = (format!("file://{}", bare.display()), commit.to_owned());
    let started = Instant::now();
    let container = tokio::task::spawn_blocking({
        let (dir, label, tag) = (dir.clone(), label.clone(), tag.clone());
        move || {
            std::fs::create_dir_all(&dir).unwrap();
            git(&dir, &["init", "-q"]);
            git(&dir, &["fetch", "-q", "--depth", "1", &bare, &commit]);
            git(&dir, &["checkout", "-q", "FETCH_HEAD"]);
            docker(&[
                "build",
                "-q",
                "--no-cache",
                "--pull=false",
                "--label",
                &label,
                "-t",
                &tag,
                dir.to_str().unwrap(),
            ]);
            docker(&[
                "run",
                "-d",
                "--label",
                &label,
                "-e",
                "PORT=8080",
                "-p",
                "127.0.0.1::8080",
                &tag,
            ])
        }
    })
    .await
    .unwrap();
    let port = docker(&["port", &container, "8080/tcp"]);
    let addr: SocketAddr = port
        .lines()
        .find(|l| l.starts_with("127.0.0.1:"))
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no loopback port in {port:?}"));
    let client = reqwest::Client::new();
    let deadline = started + Duration::from_secs(120);
    let took = loop {
        if let Ok(r) = client.get(format!("http://{addr}/")).send().await
            && r.status() == 200
            && r.text().await.is_ok_and(|b| b.trim() == version)
        {
            break started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{version} never answered by hand"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    docker(&["rm", "-f", &container]);
    let _ = std::fs::remove_dir_all(&dir);
    took
}
