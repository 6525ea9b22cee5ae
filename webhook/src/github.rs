//! The GitHub REST API client, on octocrab: commit statuses and the one plan comment per pull request.
//!
//! The base URL is configurable (GitHub Enterprise Server's `https://HOST/api/v3`, or a local fake in
//! tests). Authentication is a token (`CAIRN_GITHUB_TOKEN`) or, better, a GitHub App (app id and
//! private key; octocrab mints and refreshes installation tokens, and the installation of each
//! repository is looked up once unless one is configured).
//!
//! Every request goes through one private `send`, which reads the status and the rate-limit headers
//! itself, so that each failure is classified for the outbox: rate limited (retry when the limit
//! resets, or after `retry-after`), permanent (422, 404, ...: retrying cannot help), or worth retrying.
//!
//! What it must not do: be called from anywhere but the outbox worker (a call made outside the outbox
//! could be made for a change that then rolls back, or be lost on a crash), retry or sleep by itself
//! (the outbox decides when; octocrab's retry layer is not compiled in), follow a URL off the
//! configured host (pagination links are reduced to their path), or let a token reach a log or an
//! error message.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt as _;
use octocrab::Octocrab;
use octocrab::models::{AppId, InstallationId};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The hidden marker that identifies Cairn's plan comment among a pull request's comments.
pub const PLAN_MARKER: &str = "<!-- cairn:plan -->";
/// GitHub's limit on a commit status description, in characters.
pub const MAX_STATUS_DESCRIPTION: usize = 140;
/// GitHub's limit on a comment body, in characters.
pub const MAX_COMMENT_CHARS: usize = 65_536;
/// The public GitHub API.
pub const DEFAULT_API_URL: &str = "https://api.github.com";

pub const API_URL_ENV: &str = "CAIRN_GITHUB_API_URL";
pub const TOKEN_ENV: &str = "CAIRN_GITHUB_TOKEN";
pub const APP_ID_ENV: &str = "CAIRN_GITHUB_APP_ID";
pub const APP_PRIVATE_KEY_FILE_ENV: &str = "CAIRN_GITHUB_APP_PRIVATE_KEY_FILE";
pub const APP_INSTALLATION_ID_ENV: &str = "CAIRN_GITHUB_APP_INSTALLATION_ID";
pub const HOST_ENV: &str = "CAIRN_GITHUB_HOST";

/// How long a wait for a rate limit may be: GitHub's primary limit resets hourly, so a reset further
/// away than this is a wrong clock or a wrong header.
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(3600);
/// GitHub's advice when a secondary rate limit gives no time: wait at least a minute.
const SECONDARY_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// Pages of comments read at most when looking for the plan comment (100 per page).
const MAX_COMMENT_PAGES: usize = 100;

/// A repository on GitHub: `owner/name`, checked so that it can go into an API path as is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoName {
    owner: String,
    name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a GitHub repository name (owner/name)")]
pub struct RepoNameError(String);

impl RepoName {
    pub fn parse(full_name: &str) -> Result<RepoName, RepoNameError> {
        let bad = || RepoNameError(full_name.to_owned());
        let (owner, name) = full_name.split_once('/').ok_or_else(bad)?;
        let owner_ok = !owner.is_empty()
            && owner.len() <= 100
            && owner
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        let name_ok = !name.is_empty()
            && name.len() <= 100
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !owner_ok || !name_ok {
            return Err(bad());
        }
        Ok(RepoName {
            owner: owner.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The repository a GitHub URL names (`https://github.com/o/n(.git)`, `git@github.com:o/n.git`,
    /// `ssh://git@host/o/n`), whatever the host.
    pub fn from_url(url: &str) -> Option<RepoName> {
        let key = crate::events::normalize_repo_url(url)?;
        // The normalised key is lowercase; take the original spelling back from the URL.
        let (_, path) = key.split_once('/')?;
        let at = url.to_ascii_lowercase().rfind(path)?;
        RepoName::parse(&url[at..at + path.len()]).ok()
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `owner/name` in lowercase: GitHub compares repository names without case, and so do Cairn's
    /// keys (coalescing, stored comment ids).
    pub fn key(&self) -> String {
        self.to_string().to_ascii_lowercase()
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

impl TryFrom<String> for RepoName {
    type Error = RepoNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RepoName::parse(&s)
    }
}

impl From<RepoName> for String {
    fn from(r: RepoName) -> String {
        r.to_string()
    }
}

/// A commit status's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusState {
    Pending,
    Success,
    Failure,
    Error,
}

/// A commit status, as `POST /repos/{owner}/{repo}/statuses/{sha}` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStatus {
    /// `cairn/apply`, `cairn/deploy`, `cairn/plan`.
    pub context: String,
    pub state: StatusState,
    /// One line; cut to [`MAX_STATUS_DESCRIPTION`] characters by [`CommitStatus::new`].
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_url: Option<String>,
}

impl CommitStatus {
    /// A status whose description is made to fit: the first line only, cut with `…` past GitHub's
    /// limit (GitHub refuses a longer one with 422).
    pub fn new(
        context: impl Into<String>,
        state: StatusState,
        description: &str,
        target_url: Option<String>,
    ) -> CommitStatus {
        CommitStatus {
            context: context.into(),
            state,
            description: fit_description(description),
            target_url,
        }
    }
}

/// The first line of `text`, at most [`MAX_STATUS_DESCRIPTION`] characters.
pub fn fit_description(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    if line.chars().count() <= MAX_STATUS_DESCRIPTION {
        return line.to_owned();
    }
    let mut cut: String = line.chars().take(MAX_STATUS_DESCRIPTION - 1).collect();
    cut.push('…');
    cut
}

/// A comment body with the plan marker first, cut to GitHub's limit with a note saying so.
pub fn plan_comment_body(markdown: &str) -> String {
    let mut body = if markdown.contains(PLAN_MARKER) {
        markdown.to_owned()
    } else {
        format!("{PLAN_MARKER}\n{markdown}")
    };
    let total = body.chars().count();
    if total > MAX_COMMENT_CHARS {
        // Room for the note below, whatever the number in it.
        const NOTE_ROOM: usize = 120;
        let keep = MAX_COMMENT_CHARS - NOTE_ROOM;
        let end = body.char_indices().nth(keep).map_or(body.len(), |(i, _)| i);
        body.truncate(end);
        body.push_str(&format!(
            "\n\n… the plan is cut here ({} more characters); `cairn plan` shows all of it.",
            total - keep
        ));
    }
    body
}

/// How Cairn authenticates to GitHub.
#[derive(Clone)]
pub enum GitHubAuth {
    /// A personal access token or any other bearer token.
    Token(SecretString),
    /// A GitHub App: installation tokens are minted from the app's JWT. Without an installation id,
    /// each repository's installation is looked up (and remembered).
    App {
        app_id: u64,
        private_key_pem: SecretString,
        installation_id: Option<u64>,
    },
}

impl fmt::Debug for GitHubAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitHubAuth::Token(_) => f.write_str("Token(<redacted>)"),
            GitHubAuth::App {
                app_id,
                installation_id,
                ..
            } => f
                .debug_struct("App")
                .field("app_id", app_id)
                .field("private_key_pem", &"<redacted>")
                .field("installation_id", installation_id)
                .finish(),
        }
    }
}

/// Where and how to reach GitHub.
#[derive(Debug, Clone)]
pub struct GitHubConfig {
    /// `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise Server.
    pub api_url: String,
    pub auth: GitHubAuth,
    pub connect_timeout: Duration,
    /// For each read of a response; a whole call is bounded by the outbox's lease.
    pub read_timeout: Duration,
    /// The host whose repositories this API serves (`github.com` for `api.github.com`, the API URL's
    /// host for GitHub Enterprise), when it cannot be told from the API URL (`CAIRN_GITHUB_HOST`).
    /// Only repositories on it get commit statuses.
    pub web_host: Option<String>,
}

impl GitHubConfig {
    pub fn new(auth: GitHubAuth) -> GitHubConfig {
        GitHubConfig {
            api_url: DEFAULT_API_URL.to_owned(),
            auth,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            web_host: None,
        }
    }

    /// The host whose repositories this API serves: [`GitHubConfig::web_host`], else `github.com` for
    /// `api.github.com`, else the API URL's host (GitHub Enterprise Server serves `/api/v3` on the
    /// same host as its repositories).
    pub fn host(&self) -> String {
        if let Some(host) = &self.web_host {
            return host.to_ascii_lowercase();
        }
        let host = self
            .api_url
            .split_once("://")
            .map_or(self.api_url.as_str(), |(_, rest)| rest)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default();
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        let host = host.to_ascii_lowercase();
        match host.as_str() {
            "api.github.com" => "github.com".to_owned(),
            _ => host,
        }
    }

    /// The repository a git URL names, if it is on [`GitHubConfig::host`]: where its commit statuses
    /// can be set.
    pub fn repo_of(&self, url: &str) -> Option<RepoName> {
        let key = crate::events::normalize_repo_url(url)?;
        let (host, _) = key.split_once('/')?;
        (host == self.host())
            .then(|| RepoName::from_url(url))
            .flatten()
    }

    /// From the environment: `CAIRN_GITHUB_APP_ID` with `CAIRN_GITHUB_APP_PRIVATE_KEY_FILE` (and
    /// optionally `CAIRN_GITHUB_APP_INSTALLATION_ID`) for a GitHub App, else `CAIRN_GITHUB_TOKEN`;
    /// `CAIRN_GITHUB_API_URL` for GitHub Enterprise, `CAIRN_GITHUB_HOST` when the repositories' host
    /// cannot be told from it. `None` when neither credential is set.
    pub fn from_env() -> Result<Option<GitHubConfig>, GitHubError> {
        GitHubConfig::from_vars(|name| match std::env::var(name) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(()),
        })
    }

    /// [`GitHubConfig::from_env`] over any source of variables (`Err` for a value that is not UTF-8).
    fn from_vars(
        get: impl Fn(&'static str) -> Result<Option<String>, ()>,
    ) -> Result<Option<GitHubConfig>, GitHubError> {
        let var = |name: &'static str| -> Result<Option<String>, GitHubError> {
            match get(name) {
                Ok(Some(v)) if v.trim().is_empty() => Ok(None),
                Ok(Some(v)) => Ok(Some(v.trim().to_owned())),
                Ok(None) => Ok(None),
                Err(()) => Err(GitHubError::Env {
                    name,
                    problem: "is not UTF-8",
                }),
            }
        };
        let number = |name: &'static str| -> Result<Option<u64>, GitHubError> {
            var(name)?
                .map(|v| {
                    v.parse::<u64>().map_err(|_| GitHubError::Env {
                        name,
                        problem: "is not a number",
                    })
                })
                .transpose()
        };
        let auth = match (number(APP_ID_ENV)?, var(APP_PRIVATE_KEY_FILE_ENV)?) {
            (Some(app_id), Some(key_file)) => GitHubAuth::App {
                app_id,
                private_key_pem: read_key(Path::new(&key_file))?,
                installation_id: number(APP_INSTALLATION_ID_ENV)?,
            },
            (Some(_), None) => {
                return Err(GitHubError::Env {
                    name: APP_PRIVATE_KEY_FILE_ENV,
                    problem: "must be set with CAIRN_GITHUB_APP_ID",
                });
            }
            (None, Some(_)) => {
                return Err(GitHubError::Env {
                    name: APP_ID_ENV,
                    problem: "must be set with CAIRN_GITHUB_APP_PRIVATE_KEY_FILE",
                });
            }
            (None, None) => match var(TOKEN_ENV)? {
                Some(token) => GitHubAuth::Token(token.into()),
                None => return Ok(None),
            },
        };
        let mut config = GitHubConfig::new(auth);
        if let Some(url) = var(API_URL_ENV)? {
            config.api_url = url;
        }
        config.web_host = var(HOST_ENV)?;
        Ok(Some(config))
    }
}

fn read_key(path: &Path) -> Result<SecretString, GitHubError> {
    std::fs::read_to_string(path)
        .map(SecretString::from)
        .map_err(|source| GitHubError::KeyFile {
            path: path.display().to_string(),
            source,
        })
}

/// A client that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    #[error("the environment variable {name} {problem}")]
    Env {
        name: &'static str,
        problem: &'static str,
    },
    #[error("cannot read the GitHub App private key {path}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the GitHub App private key is not an RSA key in PEM form")]
    Key(#[source] octocrab::jsonwebtoken::errors::Error),
    #[error("cannot set up the GitHub client for {api_url}")]
    Client {
        api_url: String,
        #[source]
        source: octocrab::Error,
    },
}

/// A failed API call, classified for the outbox.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// GitHub's rate limit: nothing is wrong with the call; it may be made again after `retry_in`.
    #[error("{request}: rate limited by GitHub (HTTP {status}); retry in {}s", retry_in.as_secs())]
    RateLimited {
        request: String,
        status: u16,
        retry_in: Duration,
    },
    /// GitHub answered with an error. `permanent` when making the same call again cannot succeed
    /// (400, 404, 410, 422).
    #[error("{request}: GitHub answered HTTP {status}: {message}")]
    Status {
        request: String,
        status: u16,
        message: String,
        permanent: bool,
    },
    /// No answer (connection, timeout, TLS, or the app's token could not be minted).
    #[error("{request}: could not reach GitHub")]
    Transport {
        request: String,
        #[source]
        source: octocrab::Error,
    },
    /// An answer that is not what GitHub documents (a proxy's error page, a truncated body).
    #[error("{request}: unexpected answer from GitHub")]
    Decode {
        request: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ApiError {
    /// Whether making the same call again cannot succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ApiError::Status {
                permanent: true,
                ..
            }
        )
    }

    fn status(&self) -> Option<u16> {
        match self {
            ApiError::RateLimited { status, .. } | ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The GitHub API client.
pub struct GitHub {
    api_url: String,
    /// A token client, or the app's JWT client.
    client: Arc<Octocrab>,
    app: bool,
    /// The configured installation's client. Shared, not cloned: a clone of an installation client
    /// starts with no token and would mint a new one.
    installation: Option<Arc<Octocrab>>,
    /// Installation clients by repository key, when no installation is configured.
    installations: tokio::sync::Mutex<HashMap<String, Arc<Octocrab>>>,
    /// When GitHub last said the limit was used up (`x-ratelimit-remaining: 0`), until when.
    exhausted_until: Mutex<Option<SystemTime>>,
}

impl fmt::Debug for GitHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHub")
            .field("api_url", &self.api_url)
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Deserialize)]
struct Comment {
    id: u64,
    #[serde(default)]
    body: Option<String>,
}

impl GitHub {
    /// Builds the client; must be called within a Tokio runtime.
    pub fn new(config: GitHubConfig) -> Result<GitHub, GitHubError> {
        let client_error = |source| GitHubError::Client {
            api_url: config.api_url.clone(),
            source,
        };
        let builder = Octocrab::builder()
            .base_uri(config.api_url.as_str())
            .map_err(client_error)?
            .add_header(
                http::header::ACCEPT,
                "application/vnd.github+json".to_owned(),
            )
            .set_connect_timeout(Some(config.connect_timeout))
            .set_read_timeout(Some(config.read_timeout));
        let (client, app, installation) = match &config.auth {
            GitHubAuth::Token(token) => (
                builder
                    .personal_token(token.expose_secret().to_owned())
                    .build()
                    .map_err(client_error)?,
                false,
                None,
            ),
            GitHubAuth::App {
                app_id,
                private_key_pem,
                installation_id,
            } => {
                let key =
                    octocrab::EncodingKey::from_rsa_pem(private_key_pem.expose_secret().as_bytes())
                        .map_err(GitHubError::Key)?;
                let client = builder
                    .app(AppId(*app_id), key)
                    .build()
                    .map_err(client_error)?;
                let installation = installation_id
                    .map(|id| client.installation(InstallationId(id)).map(Arc::new))
                    .transpose()
                    .map_err(client_error)?;
                (client, true, installation)
            }
        };
        Ok(GitHub {
            api_url: config.api_url,
            client: Arc::new(client),
            app,
            installation,
            installations: tokio::sync::Mutex::new(HashMap::new()),
            exhausted_until: Mutex::new(None),
        })
    }

    /// How long to hold every call because a successful response said the rate limit is now used up;
    /// `None` once it has reset.
    pub fn rate_limit_pause(&self) -> Option<Duration> {
        let mut until = self
            .exhausted_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match until.map(|t| t.duration_since(SystemTime::now())) {
            Some(Ok(wait)) if !wait.is_zero() => Some(wait),
            _ => {
                *until = None;
                None
            }
        }
    }

    /// Sets a commit status.
    pub async fn create_status(
        &self,
        repo: &RepoName,
        sha: &str,
        status: &CommitStatus,
    ) -> Result<(), ApiError> {
        let client = self.client_for(repo).await?;
        let path = format!("/repos/{repo}/statuses/{sha}");
        let body = serde_json::to_value(status).expect("a commit status serializes");
        self.send(&client, Method::POST, &path, Some(&body)).await?;
        Ok(())
    }

    /// Creates or updates the one plan comment on pull request `pr`, identified by [`PLAN_MARKER`]
    /// (added to `markdown` when missing). `known_id` is the comment's id from an earlier call; when
    /// it is missing or the comment was deleted, the pull request's comments are searched for the
    /// marker before one is created, so a repeated call never makes a second comment. Returns the
    /// comment's id.
    pub async fn upsert_pr_comment(
        &self,
        repo: &RepoName,
        pr: u64,
        markdown: &str,
        known_id: Option<u64>,
    ) -> Result<u64, ApiError> {
        let client = self.client_for(repo).await?;
        let body = json!({ "body": plan_comment_body(markdown) });
        if let Some(id) = known_id {
            let path = format!("/repos/{repo}/issues/comments/{id}");
            match self.send(&client, Method::PATCH, &path, Some(&body)).await {
                Ok(_) => return Ok(id),
                // Deleted by someone: find another or make a new one.
                Err(e) if e.status() == Some(404) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(id) = self.find_plan_comment(&client, repo, pr).await? {
            let path = format!("/repos/{repo}/issues/comments/{id}");
            self.send(&client, Method::PATCH, &path, Some(&body))
                .await?;
            return Ok(id);
        }
        let path = format!("/repos/{repo}/issues/{pr}/comments");
        let answer = self.send(&client, Method::POST, &path, Some(&body)).await?;
        let created: Comment = decode(&format!("POST {path}"), &answer.body)?;
        Ok(created.id)
    }

    async fn find_plan_comment(
        &self,
        client: &Octocrab,
        repo: &RepoName,
        pr: u64,
    ) -> Result<Option<u64>, ApiError> {
        let mut path = format!("/repos/{repo}/issues/{pr}/comments?per_page=100");
        for _ in 0..MAX_COMMENT_PAGES {
            let answer = self.send(client, Method::GET, &path, None).await?;
            let comments: Vec<Comment> = decode(&format!("GET {path}"), &answer.body)?;
            if let Some(found) = comments
                .iter()
                .find(|c| c.body.as_deref().is_some_and(|b| b.contains(PLAN_MARKER)))
            {
                return Ok(Some(found.id));
            }
            match next_page(&answer.headers) {
                Some(next) => path = next,
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The client that may act on `repo`: the token's, the configured installation's, or the
    /// installation looked up for the repository (once).
    async fn client_for(&self, repo: &RepoName) -> Result<Arc<Octocrab>, ApiError> {
        if !self.app {
            return Ok(self.client.clone());
        }
        if let Some(installation) = &self.installation {
            return Ok(installation.clone());
        }
        let mut installations = self.installations.lock().await;
        if let Some(client) = installations.get(&repo.key()) {
            return Ok(client.clone());
        }
        let path = format!("/repos/{repo}/installation");
        let answer = self.send(&self.client, Method::GET, &path, None).await?;
        #[derive(Deserialize)]
        struct Installation {
            id: u64,
        }
        let found: Installation = decode(&format!("GET {path}"), &answer.body)?;
        let client = self
            .client
            .installation(InstallationId(found.id))
            .map(Arc::new)
            .map_err(|source| ApiError::Transport {
                request: format!("installation {} of {repo}", found.id),
                source,
            })?;
        installations.insert(repo.key(), client.clone());
        Ok(client)
    }

    /// Makes one request to a path under the API URL and classifies the answer.
    async fn send(
        &self,
        client: &Octocrab,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ApiError> {
        let request = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let transport = |source| ApiError::Transport {
            request: request.clone(),
            source,
        };
        let response = match method {
            Method::GET => client._get(path).await,
            Method::POST => client._post(path, body).await,
            Method::PATCH => client._patch(path, body).await,
            _ => unreachable!("only GET, POST and PATCH are used"),
        }
        .map_err(transport)?;
        let (parts, response_body) = response.into_parts();
        let body = response_body.collect().await.map_err(transport)?.to_bytes();
        let answer = Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        };
        let now = SystemTime::now();
        if answer.status.is_success() {
            // The call went through but the next would not: hold the others until the reset. (A
            // refusal says so itself, below, and the outbox holds every call for it.)
            if let Some(until) = exhausted_until(&answer.headers, now) {
                let mut exhausted = self
                    .exhausted_until
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *exhausted = Some(exhausted.map_or(until, |t| t.max(until)));
            }
            return Ok(answer);
        }
        let message = error_message(&answer.body);
        if let Some(retry_in) = rate_limit_wait(answer.status, &answer.headers, &message, now) {
            return Err(ApiError::RateLimited {
                request,
                status: answer.status.as_u16(),
                retry_in,
            });
        }
        Err(ApiError::Status {
            request,
            status: answer.status.as_u16(),
            message,
            permanent: matches!(answer.status.as_u16(), 400 | 404 | 410 | 422),
        })
    }
}

fn decode<T: for<'de> Deserialize<'de>>(request: &str, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|source| ApiError::Decode {
        request: request.to_owned(),
        source,
    })
}

/// GitHub's `message` (and its validation errors) from an error body, or the start of the body.
fn error_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(value) => {
            let mut text = value
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .to_owned();
            if let Some(errors) = value.get("errors").filter(|e| !e.is_null()) {
                text.push_str(&format!(" {errors}"));
            }
            text
        }
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = text.trim();
    if text.chars().count() > 300 {
        format!("{}…", text.chars().take(299).collect::<String>())
    } else if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        text.to_owned()
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// `x-ratelimit-reset` as a time. GitHub sends epoch seconds; recordings that normalise it to epoch
/// milliseconds are read as such.
fn reset_time(headers: &HeaderMap) -> Option<SystemTime> {
    let reset: u64 = header(headers, "x-ratelimit-reset")?.parse().ok()?;
    let secs = if reset > 100_000_000_000 {
        reset / 1000
    } else {
        reset
    };
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Until when the rate limit is used up, if the response says so.
fn exhausted_until(headers: &HeaderMap, now: SystemTime) -> Option<SystemTime> {
    if header(headers, "x-ratelimit-remaining")? != "0" {
        return None;
    }
    let until = reset_time(headers)
        .unwrap_or(now + SECONDARY_RATE_LIMIT_WAIT)
        .min(now + MAX_RATE_LIMIT_WAIT);
    (until > now).then_some(until + Duration::from_secs(1))
}

/// How long to wait when a response is a rate limit refusal (403 or 429): `retry-after`, else until
/// `x-ratelimit-reset` when the limit is used up, else a minute for a secondary limit. `None` when
/// the response is not a rate limit refusal.
fn rate_limit_wait(
    status: StatusCode,
    headers: &HeaderMap,
    message: &str,
    now: SystemTime,
) -> Option<Duration> {
    if status != StatusCode::FORBIDDEN && status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    if let Some(secs) = header(headers, "retry-after").and_then(|v| v.parse::<u64>().ok()) {
        return Some(Duration::from_secs(secs.max(1)).min(MAX_RATE_LIMIT_WAIT));
    }
    if header(headers, "x-ratelimit-remaining") == Some("0") {
        let wait = reset_time(headers)
            .and_then(|reset| reset.duration_since(now).ok())
            .unwrap_or_default();
        return Some((wait + Duration::from_secs(1)).min(MAX_RATE_LIMIT_WAIT));
    }
    if status == StatusCode::TOO_MANY_REQUESTS
        || message.to_ascii_lowercase().contains("rate limit")
    {
        return Some(SECONDARY_RATE_LIMIT_WAIT);
    }
    None
}

/// The path and query of the `rel="next"` link, if any. Only the path is kept: a page is always
/// fetched from the configured API host, with its credentials.
fn next_page(headers: &HeaderMap) -> Option<String> {
    let link = header(headers, "link")?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
        if !is_next {
            return None;
        }
        let url = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let uri: http::Uri = url.parse().ok()?;
        uri.path_and_query().map(|pq| pq.as_str().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn from_vars(vars: &[(&str, &str)]) -> Result<Option<GitHubConfig>, GitHubError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        GitHubConfig::from_vars(|name| Ok(vars.get(name).cloned()))
    }

    #[test]
    fn configuration_comes_from_a_token_or_an_app_and_an_optional_api_url() {
        assert!(from_vars(&[]).unwrap().is_none());
        assert!(from_vars(&[(TOKEN_ENV, "  ")]).unwrap().is_none());
        let token = from_vars(&[(TOKEN_ENV, "ghp_x\n")]).unwrap().unwrap();
        assert!(matches!(&token.auth, GitHubAuth::Token(t) if t.expose_secret() == "ghp_x"));
        assert_eq!(token.api_url, DEFAULT_API_URL);
        assert_eq!(format!("{:?}", token.auth), "Token(<redacted>)");

        let key = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/test-app-key.pem");
        let app = from_vars(&[
            (APP_ID_ENV, "12345"),
            (APP_PRIVATE_KEY_FILE_ENV, key),
            (APP_INSTALLATION_ID_ENV, "99"),
            (TOKEN_ENV, "ignored when the app is configured"),
            (API_URL_ENV, "https://github.example.com/api/v3"),
        ])
        .unwrap()
        .unwrap();
        assert!(matches!(
            app.auth,
            GitHubAuth::App {
                app_id: 12345,
                installation_id: Some(99),
                ..
            }
        ));
        assert_eq!(app.api_url, "https://github.example.com/api/v3");
        assert!(!format!("{:?}", app.auth).contains("PRIVATE KEY"));

        for (vars, words) in [
            (
                vec![(APP_ID_ENV, "12345")],
                "CAIRN_GITHUB_APP_PRIVATE_KEY_FILE must be set",
            ),
            (
                vec![(APP_PRIVATE_KEY_FILE_ENV, key)],
                "CAIRN_GITHUB_APP_ID must be set",
            ),
            (
                vec![(APP_ID_ENV, "twelve"), (APP_PRIVATE_KEY_FILE_ENV, key)],
                "CAIRN_GITHUB_APP_ID is not a number",
            ),
            (
                vec![
                    (APP_ID_ENV, "1"),
                    (APP_PRIVATE_KEY_FILE_ENV, "/nonexistent/key.pem"),
                ],
                "cannot read the GitHub App private key /nonexistent/key.pem",
            ),
        ] {
            let error = from_vars(&vars).unwrap_err().to_string();
            assert!(error.contains(words), "{error}");
        }
    }

    #[tokio::test]
    async fn a_private_key_that_is_not_rsa_pem_is_refused() {
        let mut config = GitHubConfig::new(GitHubAuth::App {
            app_id: 1,
            private_key_pem: "not a key".to_owned().into(),
            installation_id: None,
        });
        config.api_url = "http://127.0.0.1:9".to_owned();
        assert!(matches!(GitHub::new(config), Err(GitHubError::Key(_))));
    }

    #[test]
    fn statuses_go_only_to_repositories_on_the_apis_host() {
        let mut config = GitHubConfig::new(GitHubAuth::Token("t".to_owned().into()));
        assert_eq!(config.host(), "github.com");
        assert_eq!(
            config.repo_of("git@github.com:acme/shop.git"),
            Some(RepoName::parse("acme/shop").unwrap())
        );
        assert_eq!(config.repo_of("https://gitlab.com/acme/shop.git"), None);
        assert_eq!(config.repo_of("file:///srv/git/shop.git"), None);
        config.api_url = "https://GHE.example.com/api/v3".to_owned();
        assert_eq!(config.host(), "ghe.example.com");
        assert_eq!(config.repo_of("https://github.com/acme/shop"), None);
        assert!(
            config
                .repo_of("https://ghe.example.com/acme/shop")
                .is_some()
        );
        config.api_url = "http://127.0.0.1:4010".to_owned();
        config.web_host = Some("GitHub.com".to_owned());
        assert_eq!(config.host(), "github.com");
        assert!(config.repo_of("https://github.com/acme/shop").is_some());
    }

    #[test]
    fn repo_names_are_checked_and_found_in_urls() {
        let r = RepoName::parse("Codertocat/Hello-World").unwrap();
        assert_eq!(r.to_string(), "Codertocat/Hello-World");
        assert_eq!(r.key(), "codertocat/hello-world");
        for bad in [
            "", "a", "a/", "/b", "a/b/c", "a/..", "a b/c", "a/b?x", "a/b#",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?}");
        }
        for url in [
            "https://github.com/Codertocat/Hello-World.git",
            "git@github.com:Codertocat/Hello-World.git",
            "https://github.example.com/Codertocat/Hello-World",
        ] {
            assert_eq!(RepoName::from_url(url), Some(r.clone()), "{url}");
        }
        assert_eq!(RepoName::from_url("https://github.com/a/b/c"), None);
    }

    #[test]
    fn descriptions_keep_the_first_line_and_fit_140_characters() {
        assert_eq!(fit_description("ok\nsecond line"), "ok");
        let long = "é".repeat(200);
        let fitted = fit_description(&long);
        assert_eq!(fitted.chars().count(), MAX_STATUS_DESCRIPTION);
        assert!(fitted.ends_with('…'));
        let exact = "x".repeat(140);
        assert_eq!(fit_description(&exact), exact);
    }

    #[test]
    fn plan_comments_carry_the_marker_once_and_fit_githubs_limit() {
        assert_eq!(
            plan_comment_body("# Plan"),
            format!("{PLAN_MARKER}\n# Plan")
        );
        let marked = format!("{PLAN_MARKER}\n# Plan");
        assert_eq!(plan_comment_body(&marked), marked);
        let huge = "x".repeat(100_000);
        let body = plan_comment_body(&huge);
        assert!(body.chars().count() <= MAX_COMMENT_CHARS);
        assert!(body.starts_with(PLAN_MARKER));
        assert!(
            body.ends_with("`cairn plan` shows all of it."),
            "{}",
            &body[body.len() - 100..]
        );
    }

    #[test]
    fn rate_limits_wait_for_retry_after_or_the_reset() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let forbidden = StatusCode::FORBIDDEN;
        assert_eq!(
            rate_limit_wait(forbidden, &headers(&[("retry-after", "30")]), "", now),
            Some(Duration::from_secs(30))
        );
        let reset = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1700000120"),
        ]);
        assert_eq!(
            rate_limit_wait(forbidden, &reset, "API rate limit exceeded", now),
            Some(Duration::from_secs(121))
        );
        // Recordings normalise the reset to milliseconds.
        let reset_ms = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1700000120000"),
        ]);
        assert_eq!(
            rate_limit_wait(StatusCode::TOO_MANY_REQUESTS, &reset_ms, "", now),
            Some(Duration::from_secs(121))
        );
        assert_eq!(
            rate_limit_wait(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), "", now),
            Some(SECONDARY_RATE_LIMIT_WAIT)
        );
        assert_eq!(
            rate_limit_wait(
                forbidden,
                &HeaderMap::new(),
                "You have exceeded a secondary rate limit",
                now
            ),
            Some(SECONDARY_RATE_LIMIT_WAIT)
        );
        // A 403 that is about permissions is not a rate limit; neither is a 500 with the headers.
        assert_eq!(
            rate_limit_wait(
                forbidden,
                &HeaderMap::new(),
                "Resource not accessible by integration",
                now
            ),
            None
        );
        assert_eq!(
            rate_limit_wait(StatusCode::INTERNAL_SERVER_ERROR, &reset, "", now),
            None
        );
        // A reset in the past waits a second; one days away is capped at an hour.
        let past = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "5")]);
        assert_eq!(
            rate_limit_wait(forbidden, &past, "", now),
            Some(Duration::from_secs(1))
        );
        let far = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1800000000"),
        ]);
        assert_eq!(
            rate_limit_wait(forbidden, &far, "", now),
            Some(MAX_RATE_LIMIT_WAIT)
        );
    }

    #[test]
    fn an_exhausted_limit_on_a_success_is_noticed() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1700000060"),
        ]);
        assert_eq!(
            exhausted_until(&h, now),
            Some(now + Duration::from_secs(61))
        );
        let h = headers(&[
            ("x-ratelimit-remaining", "4999"),
            ("x-ratelimit-reset", "1700000060"),
        ]);
        assert_eq!(exhausted_until(&h, now), None);
    }

    #[test]
    fn the_next_page_is_the_path_of_the_next_link() {
        // The shape of the `paginate-issues` recording's header.
        let h = headers(&[(
            "link",
            "<https://api.github.com/repositories/1000/issues?per_page=3&page=1>; rel=\"prev\", \
             <https://api.github.com/repositories/1000/issues?per_page=3&page=3>; rel=\"next\", \
             <https://api.github.com/repositories/1000/issues?per_page=3&page=5>; rel=\"last\"",
        )]);
        assert_eq!(
            next_page(&h).as_deref(),
            Some("/repositories/1000/issues?per_page=3&page=3")
        );
        let last = headers(&[(
            "link",
            "<https://api.github.com/x?page=1>; rel=\"first\", <https://api.github.com/x?page=4>; rel=\"prev\"",
        )]);
        assert_eq!(next_page(&last), None);
        assert_eq!(next_page(&HeaderMap::new()), None);
    }

    #[test]
    fn error_messages_are_githubs_message_and_errors() {
        let body = br#"{"message":"Validation Failed","errors":[{"resource":"Label","code":"invalid","field":"color"}],"documentation_url":"https://docs.github.com"}"#;
        assert_eq!(
            error_message(body),
            r#"Validation Failed [{"code":"invalid","field":"color","resource":"Label"}]"#
        );
        assert_eq!(error_message(b""), "(empty body)");
        assert_eq!(
            error_message(b"<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
    }
}
