//! The GitHub events Cairn acts on, as minimal typed models of their payloads, and the classifier that
//! decides what a delivery means for Cairn: a push to the config repo's tracked branch, a push to a
//! branch an app follows, a pull request to plan, a ping, or nothing (with the reason why).
//!
//! What it must not do: any IO, or decide anything about desired state. Classification only matches
//! repository URLs and branches against the [`Routes`] the caller gives it; whether an app is pinned,
//! which commit gets applied, and what a pull request changes are the reconciler's business. The models
//! keep only the fields Cairn uses, so that GitHub adding fields never breaks parsing, but every field
//! they keep is required: a payload without it is not what GitHub sends (the receiver answers 400).

use serde::{Deserialize, Serialize};

/// The commit id GitHub uses for "no commit" (a created ref's `before`, a deleted ref's `after`).
pub const NULL_SHA: &str = "0000000000000000000000000000000000000000";

/// A repository as push and pull-request payloads describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    /// `owner/name`.
    pub full_name: String,
    /// `https://github.com/owner/name.git`
    pub clone_url: String,
    /// `https://github.com/owner/name`
    pub html_url: String,
    /// `git@github.com:owner/name.git`
    pub ssh_url: String,
}

/// The `push` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushPayload {
    /// The full ref: `refs/heads/main`, `refs/tags/v1`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub before: String,
    pub after: String,
    pub created: bool,
    pub deleted: bool,
    pub repository: Repository,
    /// `None` when the push deleted the ref.
    pub head_commit: Option<HeadCommit>,
    pub pusher: Pusher,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadCommit {
    pub id: String,
    pub message: String,
    /// ISO 8601, as the committer's clock had it.
    pub timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pusher {
    pub name: String,
}

/// The `pull_request` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestPayload {
    pub action: String,
    pub number: u64,
    pub pull_request: PullRequestDetails,
    /// The base repository (the one the pull request asks to merge into).
    pub repository: Repository,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestDetails {
    pub head: PullRequestHead,
    pub base: PullRequestBase,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestHead {
    pub sha: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// `None` when the head repository (a fork) has been deleted.
    pub repo: Option<HeadRepository>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadRepository {
    pub full_name: String,
    pub fork: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestBase {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub repo: BaseRepository,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRepository {
    pub full_name: String,
}

/// The `ping` event GitHub sends when a webhook is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingPayload {
    pub zen: String,
    pub hook_id: u64,
}

/// A parsed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Push(PushPayload),
    PullRequest(PullRequestPayload),
    Ping(PingPayload),
    /// An event Cairn does not act on; only its name is kept.
    Other {
        name: String,
    },
}

/// A payload that is not what GitHub sends for its event.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("the body is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("the body is JSON but not an object")]
    NotAnObject,
    #[error("the `{event}` payload is not what GitHub sends")]
    Shape {
        event: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Event {
    /// Parses a delivery's raw body for its `X-GitHub-Event` name. Unknown events only need to be a
    /// JSON object.
    pub fn parse(name: &str, body: &[u8]) -> Result<Event, EventError> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(EventError::NotJson)?;
        Event::from_value(name, &value)
    }

    /// Parses a stored payload (the worker reads deliveries back from Postgres).
    pub fn from_value(name: &str, payload: &serde_json::Value) -> Result<Event, EventError> {
        if !payload.is_object() {
            return Err(EventError::NotAnObject);
        }
        let shape = |source| EventError::Shape {
            event: name.to_owned(),
            source,
        };
        Ok(match name {
            "push" => Event::Push(PushPayload::deserialize(payload).map_err(shape)?),
            "pull_request" => {
                Event::PullRequest(PullRequestPayload::deserialize(payload).map_err(shape)?)
            }
            "ping" => Event::Ping(PingPayload::deserialize(payload).map_err(shape)?),
            _ => Event::Other {
                name: name.to_owned(),
            },
        })
    }
}

/// What deliveries can be about: the config repository and the branch Cairn applies, and each app's
/// source repository and the branch it follows. The reconciler builds it from the applied state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// `None` when the desired state comes from somewhere that is not a GitHub repository.
    pub config_repo: Option<TrackedRepo>,
    pub apps: Vec<AppSource>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedRepo {
    /// Any of the repository's URLs (https clone, html, ssh).
    pub url: String,
    /// The branch Cairn applies.
    pub branch: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSource {
    pub app: String,
    pub url: String,
    pub branch: String,
}

/// What a delivery means for Cairn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    ConfigPush(ConfigPush),
    SourcePush(SourcePush),
    PullRequest(PullRequest),
    Ping {
        hook_id: u64,
        zen: String,
    },
    /// Nothing to do, and why (shown by `cairn webhooks`).
    Ignored {
        reason: String,
    },
}

/// The URLs of the repository a delivery is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoUrls {
    pub full_name: String,
    pub clone_url: String,
    pub html_url: String,
    pub ssh_url: String,
}

impl From<&Repository> for RepoUrls {
    fn from(r: &Repository) -> Self {
        RepoUrls {
            full_name: r.full_name.clone(),
            clone_url: r.clone_url.clone(),
            html_url: r.html_url.clone(),
            ssh_url: r.ssh_url.clone(),
        }
    }
}

/// A push to the config repository's tracked branch: the reconciler fetches and applies the branch
/// head (which may be newer than `after`; deliveries arrive in any order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPush {
    pub repo: RepoUrls,
    pub branch: String,
    pub before: String,
    pub after: String,
    /// Set when the config repository is also the source of apps following the same branch.
    pub source: Option<SourcePush>,
}

/// A push to a branch one or more apps follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePush {
    /// The apps following this repository and branch, sorted.
    pub apps: Vec<String>,
    pub repo: RepoUrls,
    pub branch: String,
    /// The branch head before the push ([`NULL_SHA`] when the push created the branch).
    pub before: String,
    pub after: String,
    pub pusher: String,
}

/// A pull request to the config repository's tracked branch that needs a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    /// The base repository (the config repository).
    pub repo: RepoUrls,
    pub number: u64,
    pub action: PullRequestAction,
    pub head_sha: String,
    pub head_ref: String,
    /// `owner/name` of the head repository; `None` when it was deleted.
    pub head_repo: Option<String>,
    pub base_ref: String,
    /// The head lives in another repository (a fork, or a deleted one): its content is untrusted and
    /// its plan is made without decrypting secrets.
    pub fork: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullRequestAction {
    Opened,
    Synchronize,
    Reopened,
}

impl PullRequestAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PullRequestAction::Opened => "opened",
            PullRequestAction::Synchronize => "synchronize",
            PullRequestAction::Reopened => "reopened",
        }
    }
}

/// Parses and classifies a delivery's stored payload.
pub fn classify(
    event_name: &str,
    payload: &serde_json::Value,
    routes: &Routes,
) -> Result<Intent, EventError> {
    Ok(classify_event(
        &Event::from_value(event_name, payload)?,
        routes,
    ))
}

/// Classifies a parsed delivery against the routes.
pub fn classify_event(event: &Event, routes: &Routes) -> Intent {
    match event {
        Event::Push(push) => classify_push(push, routes),
        Event::PullRequest(pr) => classify_pull_request(pr, routes),
        Event::Ping(ping) => Intent::Ping {
            hook_id: ping.hook_id,
            zen: ping.zen.clone(),
        },
        Event::Other { name } => Intent::Ignored {
            reason: match name.as_str() {
                "create" | "delete" => format!(
                    "`{name}` event: Cairn acts on the `push` event GitHub sends for the same ref"
                ),
                _ => format!("`{name}` events are not something Cairn acts on"),
            },
        },
    }
}

fn ignored(reason: String) -> Intent {
    Intent::Ignored { reason }
}

fn classify_push(push: &PushPayload, routes: &Routes) -> Intent {
    let repo = &push.repository;
    let name = &repo.full_name;
    let (kind, short) = if let Some(branch) = push.git_ref.strip_prefix("refs/heads/") {
        ("branch", branch)
    } else if let Some(tag) = push.git_ref.strip_prefix("refs/tags/") {
        ("tag", tag)
    } else {
        return ignored(format!(
            "push to `{}` in {name}, which is neither a branch nor a tag",
            push.git_ref
        ));
    };
    if push.deleted || push.after == NULL_SHA {
        return ignored(format!("deletion of {kind} `{short}` in {name}"));
    }
    if kind == "tag" {
        return ignored(format!(
            "push of tag `{short}` in {name}: Cairn follows branches, not tags"
        ));
    }
    let branch = short;

    let urls = repo_keys(repo);
    let is_repo = |url: &str| normalize_repo_url(url).is_some_and(|key| urls.contains(&key));

    let apps_here: Vec<&AppSource> = routes.apps.iter().filter(|a| is_repo(&a.url)).collect();
    let mut following: Vec<String> = apps_here
        .iter()
        .filter(|a| a.branch == branch)
        .map(|a| a.app.clone())
        .collect();
    following.sort();
    following.dedup();
    let source = (!following.is_empty()).then(|| SourcePush {
        apps: following,
        repo: repo.into(),
        branch: branch.to_owned(),
        before: push.before.clone(),
        after: push.after.clone(),
        pusher: push.pusher.name.clone(),
    });

    let config = routes.config_repo.as_ref().filter(|c| is_repo(&c.url));
    match (config, source) {
        (Some(config), source) if config.branch == branch => Intent::ConfigPush(ConfigPush {
            repo: repo.into(),
            branch: branch.to_owned(),
            before: push.before.clone(),
            after: push.after.clone(),
            source,
        }),
        (_, Some(source)) => Intent::SourcePush(source),
        (Some(config), None) if apps_here.is_empty() => ignored(format!(
            "push to branch `{branch}` of the config repository {name}, which Cairn tracks at `{}`",
            config.branch,
        )),
        (Some(config), None) => ignored(format!(
            "push to branch `{branch}` of the config repository {name}, which Cairn tracks at `{}` \
             (and no app follows: {})",
            config.branch,
            followed_branches(&apps_here)
        )),
        (None, None) if !apps_here.is_empty() => ignored(format!(
            "push to branch `{branch}` of {name}, which no app follows ({})",
            followed_branches(&apps_here)
        )),
        (None, None) => ignored(format!(
            "push to {name}, which is neither the config repository nor an app's source"
        )),
    }
}

/// "api follows `develop`, web follows `main`", sorted.
fn followed_branches(apps: &[&AppSource]) -> String {
    let mut pairs: Vec<String> = apps
        .iter()
        .map(|a| format!("{} follows `{}`", a.app, a.branch))
        .collect();
    pairs.sort();
    pairs.dedup();
    pairs.join(", ")
}

fn classify_pull_request(event: &PullRequestPayload, routes: &Routes) -> Intent {
    let number = event.number;
    let name = &event.repository.full_name;
    let action = match event.action.as_str() {
        "opened" => PullRequestAction::Opened,
        "synchronize" => PullRequestAction::Synchronize,
        "reopened" => PullRequestAction::Reopened,
        "closed" => {
            return ignored(format!(
                "pull request #{number} in {name} was closed: nothing to plan"
            ));
        }
        other => {
            return ignored(format!(
                "pull request #{number} in {name} `{other}`: only opened, synchronize and \
                 reopened are planned"
            ));
        }
    };
    let urls = repo_keys(&event.repository);
    let Some(config) = routes
        .config_repo
        .as_ref()
        .filter(|c| normalize_repo_url(&c.url).is_some_and(|key| urls.contains(&key)))
    else {
        return ignored(format!(
            "pull request #{number} in {name}, which is not the config repository"
        ));
    };
    let base = &event.pull_request.base;
    if base.git_ref != config.branch {
        return ignored(format!(
            "pull request #{number} in {name} targets `{}`, but Cairn tracks `{}`",
            base.git_ref, config.branch
        ));
    }
    let head = &event.pull_request.head;
    let head_repo = head.repo.as_ref().map(|r| r.full_name.clone());
    // What matters is whether the head is under the config repository's control, not GitHub's `fork`
    // flag (which is also true for a branch of a repository that is itself a fork).
    let fork = !head_repo
        .as_deref()
        .is_some_and(|h| h.eq_ignore_ascii_case(&base.repo.full_name));
    Intent::PullRequest(PullRequest {
        repo: (&event.repository).into(),
        number,
        action,
        head_sha: head.sha.clone(),
        head_ref: head.git_ref.clone(),
        head_repo,
        base_ref: base.git_ref.clone(),
        fork,
    })
}

fn repo_keys(repo: &Repository) -> Vec<String> {
    [&repo.clone_url, &repo.html_url, &repo.ssh_url]
        .into_iter()
        .filter_map(|u| normalize_repo_url(u))
        .collect()
}

/// A repository URL reduced to `host/path`, lowercase, without scheme, user, default port, trailing
/// slash or `.git`, so that the https clone URL, the html URL and the ssh URL (`git@host:owner/name`
/// or `ssh://git@host/owner/name`) of one repository compare equal. `None` for something that is not a
/// URL of a repository on a host.
pub fn normalize_repo_url(url: &str) -> Option<String> {
    let url = url.trim();
    let (host, path) = if let Some((scheme, rest)) = url.split_once("://") {
        let scheme = scheme.to_ascii_lowercase();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = match (scheme.as_str(), host.rsplit_once(':')) {
            ("https", Some((h, "443"))) | ("http", Some((h, "80"))) | ("ssh", Some((h, "22"))) => h,
            _ => host,
        };
        (host, path)
    } else {
        // scp-like: [user@]host:path (a colon before any slash).
        let (authority, path) = url.split_once(':')?;
        if authority.contains('/') {
            return None;
        }
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        (host, path)
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let path = path.trim_matches('/').to_ascii_lowercase();
    let path = path
        .strip_suffix(".git")
        .unwrap_or(&path)
        .trim_end_matches('/');
    if host.is_empty() || path.is_empty() {
        return None;
    }
    Some(format!("{}/{path}", host.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_repository_has_one_key_whichever_url_names_it() {
        let key = Some("github.com/codertocat/hello-world".to_owned());
        for url in [
            "https://github.com/Codertocat/Hello-World.git",
            "https://github.com/Codertocat/Hello-World",
            "https://github.com/codertocat/hello-world/",
            "https://github.com:443/Codertocat/Hello-World.git",
            "https://x-access-token:abc@github.com/Codertocat/Hello-World.git",
            "HTTPS://GITHUB.COM/CODERTOCAT/HELLO-WORLD.GIT",
            "git@github.com:Codertocat/Hello-World.git",
            "git@github.com:Codertocat/Hello-World",
            "ssh://git@github.com/Codertocat/Hello-World.git",
            "ssh://git@github.com:22/Codertocat/Hello-World.git",
            "git://github.com/Codertocat/Hello-World.git",
        ] {
            assert_eq!(normalize_repo_url(url), key, "{url}");
        }
    }

    #[test]
    fn different_repositories_and_hosts_stay_different() {
        let a = normalize_repo_url("https://github.com/acme/shop");
        for url in [
            "https://github.com/acme/shop-api",
            "https://github.example.com/acme/shop",
            "https://github.com:8443/acme/shop",
            "https://github.com/acme",
        ] {
            assert_ne!(normalize_repo_url(url), a, "{url}");
        }
        assert_eq!(normalize_repo_url("not a url"), None);
        assert_eq!(normalize_repo_url("https://github.com/"), None);
        assert_eq!(normalize_repo_url("/srv/git/shop"), None);
    }

    fn repo(full_name: &str) -> Repository {
        Repository {
            full_name: full_name.to_owned(),
            clone_url: format!("https://github.com/{full_name}.git"),
            html_url: format!("https://github.com/{full_name}"),
            ssh_url: format!("git@github.com:{full_name}.git"),
        }
    }

    fn push(full_name: &str, git_ref: &str) -> PushPayload {
        PushPayload {
            git_ref: git_ref.to_owned(),
            before: "1111111111111111111111111111111111111111".to_owned(),
            after: "2222222222222222222222222222222222222222".to_owned(),
            created: false,
            deleted: false,
            repository: repo(full_name),
            head_commit: None,
            pusher: Pusher {
                name: "dev".to_owned(),
            },
        }
    }

    fn routes() -> Routes {
        Routes {
            config_repo: Some(TrackedRepo {
                url: "git@github.com:acme/platform.git".to_owned(),
                branch: "main".to_owned(),
            }),
            apps: vec![
                AppSource {
                    app: "web".to_owned(),
                    url: "https://github.com/ACME/shop".to_owned(),
                    branch: "main".to_owned(),
                },
                AppSource {
                    app: "worker".to_owned(),
                    url: "https://github.com/acme/shop.git".to_owned(),
                    branch: "main".to_owned(),
                },
                AppSource {
                    app: "staging".to_owned(),
                    url: "git@github.com:acme/shop.git".to_owned(),
                    branch: "develop".to_owned(),
                },
            ],
        }
    }

    fn reason(intent: Intent) -> String {
        match intent {
            Intent::Ignored { reason } => reason,
            other => panic!("expected Ignored, got {other:?}"),
        }
    }

    #[test]
    fn a_push_to_the_tracked_config_branch_is_a_config_push() {
        let intent = classify_event(
            &Event::Push(push("acme/platform", "refs/heads/main")),
            &routes(),
        );
        let Intent::ConfigPush(config) = intent else {
            panic!("{intent:?}")
        };
        assert_eq!(config.after, "2222222222222222222222222222222222222222");
        assert_eq!(config.branch, "main");
        assert_eq!(config.source, None);
    }

    #[test]
    fn a_push_to_another_config_branch_is_ignored_with_the_tracked_branch() {
        let r = reason(classify_event(
            &Event::Push(push("acme/platform", "refs/heads/feature")),
            &routes(),
        ));
        assert_eq!(
            r,
            "push to branch `feature` of the config repository acme/platform, which Cairn tracks at `main`"
        );
    }

    #[test]
    fn a_push_to_a_followed_branch_names_every_app_following_it() {
        let intent = classify_event(
            &Event::Push(push("acme/shop", "refs/heads/main")),
            &routes(),
        );
        let Intent::SourcePush(source) = intent else {
            panic!("{intent:?}")
        };
        assert_eq!(source.apps, ["web", "worker"]);
        assert_eq!(source.branch, "main");
        assert_eq!(source.pusher, "dev");
        let intent = classify_event(
            &Event::Push(push("acme/shop", "refs/heads/develop")),
            &routes(),
        );
        let Intent::SourcePush(source) = intent else {
            panic!("{intent:?}")
        };
        assert_eq!(source.apps, ["staging"]);
    }

    #[test]
    fn a_push_to_an_unfollowed_branch_says_what_is_followed() {
        let r = reason(classify_event(
            &Event::Push(push("acme/shop", "refs/heads/wip")),
            &routes(),
        ));
        assert_eq!(
            r,
            "push to branch `wip` of acme/shop, which no app follows (staging follows `develop`, \
             web follows `main`, worker follows `main`)"
        );
    }

    #[test]
    fn deletions_tags_other_refs_and_strangers_are_ignored() {
        let mut deleted = push("acme/shop", "refs/heads/main");
        deleted.deleted = true;
        deleted.after = NULL_SHA.to_owned();
        assert_eq!(
            reason(classify_event(&Event::Push(deleted), &routes())),
            "deletion of branch `main` in acme/shop"
        );
        assert_eq!(
            reason(classify_event(
                &Event::Push(push("acme/shop", "refs/tags/v1.0")),
                &routes()
            )),
            "push of tag `v1.0` in acme/shop: Cairn follows branches, not tags"
        );
        assert_eq!(
            reason(classify_event(
                &Event::Push(push("acme/shop", "refs/notes/commits")),
                &routes()
            )),
            "push to `refs/notes/commits` in acme/shop, which is neither a branch nor a tag"
        );
        assert_eq!(
            reason(classify_event(
                &Event::Push(push("someone/else", "refs/heads/main")),
                &routes()
            )),
            "push to someone/else, which is neither the config repository nor an app's source"
        );
    }

    #[test]
    fn a_config_repo_that_is_also_an_apps_source_gives_both() {
        let mut routes = routes();
        routes.apps.push(AppSource {
            app: "docs".to_owned(),
            url: "https://github.com/acme/platform".to_owned(),
            branch: "main".to_owned(),
        });
        let intent = classify_event(
            &Event::Push(push("acme/platform", "refs/heads/main")),
            &routes,
        );
        let Intent::ConfigPush(config) = intent else {
            panic!("{intent:?}")
        };
        assert_eq!(config.source.map(|s| s.apps), Some(vec!["docs".to_owned()]));
    }

    fn pull_request(action: &str, head_repo: Option<&str>, base_ref: &str) -> PullRequestPayload {
        PullRequestPayload {
            action: action.to_owned(),
            number: 7,
            pull_request: PullRequestDetails {
                head: PullRequestHead {
                    sha: "3333333333333333333333333333333333333333".to_owned(),
                    git_ref: "add-node".to_owned(),
                    repo: head_repo.map(|name| HeadRepository {
                        full_name: name.to_owned(),
                        fork: name != "acme/platform",
                    }),
                },
                base: PullRequestBase {
                    git_ref: base_ref.to_owned(),
                    repo: BaseRepository {
                        full_name: "acme/platform".to_owned(),
                    },
                },
            },
            repository: repo("acme/platform"),
        }
    }

    #[test]
    fn pull_requests_to_the_tracked_branch_are_planned_and_forks_are_marked() {
        for (action, expected) in [
            ("opened", PullRequestAction::Opened),
            ("synchronize", PullRequestAction::Synchronize),
            ("reopened", PullRequestAction::Reopened),
        ] {
            let intent = classify_event(
                &Event::PullRequest(pull_request(action, Some("acme/platform"), "main")),
                &routes(),
            );
            let Intent::PullRequest(pr) = intent else {
                panic!("{intent:?}")
            };
            assert_eq!(pr.action, expected);
            assert_eq!(pr.number, 7);
            assert_eq!(pr.head_sha, "3333333333333333333333333333333333333333");
            assert!(!pr.fork);
        }
        for head in [Some("mallory/platform"), None] {
            let intent = classify_event(
                &Event::PullRequest(pull_request("opened", head, "main")),
                &routes(),
            );
            let Intent::PullRequest(pr) = intent else {
                panic!("{intent:?}")
            };
            assert!(pr.fork, "{head:?}");
        }
    }

    #[test]
    fn other_pull_requests_are_ignored_with_their_reason() {
        let r = |action, base| {
            reason(classify_event(
                &Event::PullRequest(pull_request(action, Some("acme/platform"), base)),
                &routes(),
            ))
        };
        assert_eq!(
            r("closed", "main"),
            "pull request #7 in acme/platform was closed: nothing to plan"
        );
        assert_eq!(
            r("labeled", "main"),
            "pull request #7 in acme/platform `labeled`: only opened, synchronize and reopened are planned"
        );
        assert_eq!(
            r("opened", "develop"),
            "pull request #7 in acme/platform targets `develop`, but Cairn tracks `main`"
        );
        let mut elsewhere = pull_request("opened", Some("acme/shop"), "main");
        elsewhere.repository = repo("acme/shop");
        assert_eq!(
            reason(classify_event(&Event::PullRequest(elsewhere), &routes())),
            "pull request #7 in acme/shop, which is not the config repository"
        );
    }

    #[test]
    fn wrong_shapes_are_errors_and_unknown_events_only_need_an_object() {
        assert!(matches!(
            Event::parse("push", br#"{"ref": "refs/heads/main"}"#),
            Err(EventError::Shape { .. })
        ));
        assert!(matches!(
            Event::parse("ping", br#"{"zen": 1, "hook_id": 2}"#),
            Err(EventError::Shape { .. })
        ));
        assert!(matches!(
            Event::from_value("star", &serde_json::json!([1, 2])),
            Err(EventError::NotAnObject)
        ));
        assert_eq!(
            Event::from_value("star", &serde_json::json!({"action": "created"})).unwrap(),
            Event::Other {
                name: "star".to_owned()
            }
        );
        assert_eq!(
            reason(classify_event(
                &Event::Other {
                    name: "delete".to_owned()
                },
                &routes()
            )),
            "`delete` event: Cairn acts on the `push` event GitHub sends for the same ref"
        );
    }
}
