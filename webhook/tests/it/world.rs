//! A small world for the tests of what deliveries cause: a config repository and app source
//! repositories as real git remotes (bare repositories the `git` CLI pushes to), a reconciler reading
//! them, the real fixture payloads rewritten to name their commits, and the outbox read back in SQL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_reconciler::controller::{ConfigSource, Controller};
use cairn_reconciler::source::git::GitSource;
use cairn_reconciler::source::heads::HeadPoller;
use cairn_schema::Identity;
use cairn_schema::source::Rewrites;
use cairn_testkit::fixtures;
use cairn_webhook::events::TrackedRepo;
use serde_json::Value;
use sqlx::PgPool;

/// The app source the fixtures' push payloads are about.
pub const APP_URL: &str = "https://github.com/Codertocat/Hello-World.git";
pub const APP_BRANCH: &str = "master";
/// The config repository's GitHub URL, as `cairn serve --repo` would name it.
pub const CONFIG_URL: &str = "https://github.com/acme/platform.git";

/// Every test's bound.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("the test finished within its time bound");
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn demo_identity() -> Identity {
    let path = workspace().join("examples/keys/demo-only-identity.txt");
    Identity::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn demo_recipient() -> String {
    let text =
        std::fs::read_to_string(workspace().join("examples/keys/demo-only-recipient.txt")).unwrap();
    text.lines()
        .find(|l| l.starts_with("age1"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Runs `git` in `dir` with a fixed identity and clock, so the same content gives the same commit.
pub use cairn_testkit::git_fixed_clock as git;

/// A work tree and the bare remote it pushes to.
pub struct Remote {
    pub work: PathBuf,
    pub bare: PathBuf,
}

impl Remote {
    pub fn new(root: &Path, name: &str) -> Remote {
        let work = root.join(format!("{name}-work"));
        let bare = root.join(format!("{name}.git"));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "--bare", "-q"]);
        git(&work, &["init", "-q"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        Remote { work, bare }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    pub fn write(&self, path: &str, text: &str) {
        let p = self.work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// Commits the work tree (on whatever is checked out) and returns the commit id.
    pub fn commit(&self, message: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(
            &self.work,
            &["commit", "-q", "--allow-empty", "-m", message],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Points `refname` of the remote at `commit`, forcing.
    pub fn push(&self, commit: &str, refname: &str) {
        git(
            &self.work,
            &["push", "-q", "-f", "origin", &format!("{commit}:{refname}")],
        );
    }
}

/// The manifests of a small platform: one plan, one runtime, one node, and the apps given as
/// `(name, extra source keys)` (all follow the fixtures' repository).
pub fn platform(config: &Remote, apps: &[(&str, &str)]) {
    config.write(
        "cairn.toml",
        &fixtures::settings()
            .currency("EUR")
            .recipients(&[demo_recipient()])
            .to_string(),
    );
    config.write(
        "plans/small.toml",
        &fixtures::plan("small")
            .cpu("0.25")
            .memory("256MiB")
            .max_replicas(3)
            .to_string(),
    );
    config.write(
        "runtimes/docker.toml",
        &fixtures::runtime("docker").dockerfile().to_string(),
    );
    config.write(
        "nodes/n1.toml",
        &fixtures::node("n1").disk("50GiB").to_string(),
    );
    for (name, extra) in apps {
        app(config, name, 1, extra);
    }
}

/// Writes `apps/<name>.toml`.
pub fn app(config: &Remote, name: &str, replicas: u32, extra_source: &str) {
    config.write(
        &format!("apps/{name}.toml"),
        &format!(
            "[app.{name}]\nplan = \"small\"\nruntime = \"docker\"\nreplicas = {replicas}\n\
             source = {{ url = \"{APP_URL}\", branch = \"{APP_BRANCH}\"{extra_source} }}\n"
        ),
    );
}

/// A config remote and an app source remote, and a controller that reads the first and polls the
/// second through a rewrite (as `cairn serve --git-rewrite` sets it up).
pub struct World {
    pub tmp: tempfile::TempDir,
    pub config: Remote,
    pub source: Remote,
}

impl World {
    pub fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let config = Remote::new(tmp.path(), "platform");
        let source = Remote::new(tmp.path(), "hello-world");
        World {
            tmp,
            config,
            source,
        }
    }

    pub fn rewrites(&self) -> Rewrites {
        Rewrites::parse([
            format!("{APP_URL}={}", self.source.url()),
            format!("{CONFIG_URL}={}", self.config.url()),
        ])
        .unwrap()
    }

    /// A new source commit on the followed branch, pushed; returns its id.
    pub fn source_commit(&self, content: &str) -> String {
        self.source.write("index.html", content);
        let sha = self.source.commit(content);
        self.source.push(&sha, &format!("refs/heads/{APP_BRANCH}"));
        sha
    }

    /// A new config commit on `main`, pushed; returns its id.
    pub fn config_commit(&self, message: &str) -> String {
        let sha = self.config.commit(message);
        self.config.push(&sha, "refs/heads/main");
        sha
    }

    pub fn controller(&self, pool: &PgPool, identity: Option<Identity>) -> Controller {
        let source = GitSource::new(
            self.config.url(),
            "main",
            self.tmp.path().join("config-cache"),
        );
        let mut c = Controller::new(pool.clone(), ConfigSource::Git(source), identity);
        c.heads = Some(tokio::sync::Mutex::new(self.poller("poll-heads.git")));
        c
    }

    pub fn poller(&self, scratch: &str) -> HeadPoller {
        HeadPoller::new(self.tmp.path().join(scratch), self.rewrites())
    }

    pub fn tracked(&self) -> TrackedRepo {
        TrackedRepo {
            url: CONFIG_URL.to_owned(),
            branch: "main".to_owned(),
        }
    }
}

/// A fixture payload, parsed.
pub fn fixture(dir: &Path, file: &str) -> Value {
    let text = std::fs::read_to_string(dir.join("webhooks").join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The fixtures' push of a new `master` branch, made into a push from `before` to `after`.
pub fn push_payload(dir: &Path, before: &str, after: &str) -> Vec<u8> {
    let mut push = fixture(dir, "push.with-new-branch.json");
    assert_eq!(push["ref"], "refs/heads/master");
    assert_eq!(push["repository"]["clone_url"], APP_URL);
    push["before"] = before.into();
    push["after"] = after.into();
    push["created"] = (before == cairn_webhook::events::NULL_SHA).into();
    push["head_commit"]["id"] = after.into();
    serde_json::to_vec(&push).unwrap()
}

/// The fixtures' `pull_request` of `action`, made into pull request `number` to the config
/// repository, with its head at `head_sha` in the head repository `head_repo`.
pub fn pull_request_payload(
    dir: &Path,
    action: &str,
    number: u64,
    head_sha: &str,
    head_repo: &str,
) -> Vec<u8> {
    let mut pr = fixture(dir, &format!("pull_request.{action}.json"));
    let set_repo = |repo: &mut Value, full_name: &str| {
        let (owner, name) = full_name.split_once('/').unwrap();
        repo["full_name"] = full_name.into();
        repo["name"] = name.into();
        repo["owner"]["login"] = owner.into();
        repo["html_url"] = format!("https://github.com/{full_name}").into();
        repo["clone_url"] = format!("https://github.com/{full_name}.git").into();
        repo["ssh_url"] = format!("git@github.com:{full_name}.git").into();
        repo["fork"] = (full_name != "acme/platform").into();
    };
    set_repo(&mut pr["repository"], "acme/platform");
    set_repo(&mut pr["pull_request"]["base"]["repo"], "acme/platform");
    set_repo(&mut pr["pull_request"]["head"]["repo"], head_repo);
    pr["number"] = number.into();
    pr["pull_request"]["number"] = number.into();
    pr["pull_request"]["base"]["ref"] = "main".into();
    pr["pull_request"]["head"]["sha"] = head_sha.into();
    serde_json::to_vec(&pr).unwrap()
}

/// One row of the outbox: (kind, repo, payload), in the order enqueued.
pub async fn outbox(pool: &PgPool) -> Vec<(String, String, Value)> {
    sqlx::query_as::<_, (String, String, sqlx::types::Json<Value>)>(
        "SELECT kind, repo, payload FROM github_outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(k, r, p)| (k, r, p.0))
    .collect()
}

/// The statuses in the outbox: (repo, sha, context, state, description), in the order enqueued.
pub async fn statuses(pool: &PgPool) -> Vec<(String, String, String, String, String)> {
    outbox(pool)
        .await
        .into_iter()
        .filter(|(k, _, _)| k == "create_status")
        .map(|(_, repo, p)| {
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
            (repo, s("sha"), s("context"), s("state"), s("description"))
        })
        .collect()
}

/// `(number, source commit)` of an app's releases, oldest first.
pub async fn releases(pool: &PgPool, app: &str) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT number, source_commit FROM releases WHERE app = $1 ORDER BY number")
        .bind(app)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// `(kind, release)` of an app's tasks, oldest first.
pub async fn tasks(pool: &PgPool, app: &str) -> Vec<(String, Option<i64>)> {
    sqlx::query_as("SELECT kind, release FROM tasks WHERE app = $1 ORDER BY id")
        .bind(app)
        .fetch_all(pool)
        .await
        .unwrap()
}

pub async fn source_head(pool: &PgPool, app: &str) -> Option<String> {
    sqlx::query_scalar("SELECT commit FROM source_heads WHERE app = $1")
        .bind(app)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Marks every pending call done, as a worker that keeps up would: later calls then get rows of their
/// own instead of replacing undelivered ones.
pub async fn drain(pool: &PgPool) {
    sqlx::query(
        "UPDATE github_outbox SET status = 'done', finished_at = now() WHERE status = 'pending'",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// How many times the pending call for a commit status was enqueued (1, or more when later states
/// replaced undelivered ones).
pub async fn status_version(pool: &PgPool, sha: &str, context: &str) -> i32 {
    sqlx::query_scalar(
        "SELECT version FROM github_outbox
         WHERE kind = 'create_status' AND payload->>'sha' = $1 AND payload->>'context' = $2
         ORDER BY id DESC LIMIT 1",
    )
    .bind(sha)
    .bind(context)
    .fetch_one(pool)
    .await
    .unwrap()
}
