//! Cairn's [`DeliveryHandler`]: what each kind of delivery leaves behind for the workers and the
//! reconciler, written in the transaction that marks the delivery handled.
//!
//! - The routes are the applied state's: the config repository `cairn serve` tracks (`--repo`, `--ref`,
//!   when it is a git URL) and every applied app's source URL and branch.
//! - A push to the config branch wakes the reconciler, which fetches and applies the branch head (never
//!   a payload's `after`: deliveries arrive in any order, and the reconciler refuses to go backwards).
//! - A push to a branch apps follow asks the head checker ([`crate::heads`]) to read the branch head
//!   from the remote, and remembers when the push arrived (push to running). Apps pinned by a `rev` in
//!   their manifest or by a rollback are not moved: the delivery says why.
//! - A pull request to the config branch is recorded for the pull-request planner ([`crate::pulls`]),
//!   with a pending `cairn/plan` status on its head.
//!
//! What it must not do: remote IO (no git, no GitHub call: those happen in the workers, after the
//! delivery's transaction commits, woken by `NOTIFY`), or carry a change: the reconciler re-reads
//! everything, and the head checker asks the remote.

use std::fmt::Write as _;
use std::sync::Arc;

use cairn_reconciler::store::state;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Mutex;

use crate::deliveries::{DeliveryContext, DeliveryHandler, HandlerError, Outcome};
use crate::events::{
    AppSource, ConfigPush, NULL_SHA, PullRequest, Routes, SourcePush, TrackedRepo,
};
use crate::github::{CommitStatus, RepoName, StatusState};
use crate::outbox::{self, GitHubCall};
use crate::store::{self, PrRequest};

/// The `cairn/plan` status context.
pub const PLAN_CONTEXT: &str = "cairn/plan";

/// The handler `cairn serve` runs deliveries through.
#[derive(Debug)]
pub struct CairnHandler {
    pool: PgPool,
    config_repo: Option<TrackedRepo>,
    /// Whether GitHub calls can be made (credentials are configured): without them a pull request
    /// cannot get its plan, and is ignored with the reason.
    github: bool,
    /// The apps' sources as of an applied generation: they change only with one (pins do not, and are
    /// read afresh for each push that matches).
    sources: Mutex<Option<(u64, Arc<Vec<AppSource>>)>>,
}

impl CairnHandler {
    /// `config_repo` is the config repository as `cairn serve` was given it (before any rewrite), when
    /// it is a git URL.
    pub fn new(pool: PgPool, config_repo: Option<TrackedRepo>, github: bool) -> CairnHandler {
        CairnHandler {
            pool,
            config_repo,
            github,
            sources: Mutex::new(None),
        }
    }
}

fn short(sha: &str) -> &str {
    sha.get(..7).unwrap_or(sha)
}

fn is_commit_id(sha: &str) -> bool {
    (sha.len() == 40 || sha.len() == 64)
        && sha
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

#[async_trait::async_trait]
impl DeliveryHandler for CairnHandler {
    async fn routes(&self) -> Result<Routes, HandlerError> {
        let generation = {
            let mut conn = self.pool.acquire().await?;
            state::config_state(&mut conn).await?.generation
        };
        let cached = self
            .sources
            .lock()
            .await
            .as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(_, apps)| apps.clone());
        let apps = match cached {
            Some(apps) => apps,
            None => {
                let observed = state::load_observed(&self.pool).await?;
                // Pinned apps stay in: their pushes are matched, then ignored with the reason.
                let apps: Arc<Vec<AppSource>> = Arc::new(
                    observed
                        .apps
                        .iter()
                        .map(|(name, app)| AppSource {
                            app: name.to_string(),
                            url: app.source.url.to_string(),
                            branch: app.source.branch.clone(),
                        })
                        .collect(),
                );
                *self.sources.lock().await = Some((observed.generation, apps.clone()));
                apps
            }
        };
        Ok(Routes {
            config_repo: self.config_repo.clone(),
            apps: apps.to_vec(),
        })
    }

    async fn on_config_push(
        &self,
        conn: &mut PgConnection,
        _delivery: &DeliveryContext,
        push: &ConfigPush,
    ) -> Result<Outcome, HandlerError> {
        store::notify_work(conn, "reconcile").await?;
        Ok(Outcome::Handled(format!(
            "woke the reconciler for {}@{} (pushed {})",
            push.repo.full_name,
            push.branch,
            short(&push.after)
        )))
    }

    async fn on_source_push(
        &self,
        conn: &mut PgConnection,
        delivery: &DeliveryContext,
        push: &SourcePush,
    ) -> Result<Outcome, HandlerError> {
        // Read in the delivery's transaction: the pins as they are now, not as the routes had them.
        let observed = state::load_observed_in(&mut *conn).await?;
        let mut moving = Vec::new();
        let mut held = Vec::new();
        for app in &push.apps {
            let Some((name, applied)) = observed.apps.iter().find(|(n, _)| n.as_str() == app)
            else {
                held.push(format!("`{app}` is no longer applied"));
                continue;
            };
            if let Some(rev) = &applied.source.rev {
                held.push(format!(
                    "`{app}` is pinned to rev `{rev}` by its manifest (a pull request that changes \
                     the pin deploys it)"
                ));
            } else if let Some(release) = observed.rollback_pins.get(name) {
                held.push(format!(
                    "`{app}` is pinned to release #{release} by a rollback (pushes deploy again \
                     once the pin is lifted)"
                ));
            } else {
                moving.push((app.as_str(), applied.source.url.to_string()));
            }
        }
        if moving.is_empty() {
            return Ok(Outcome::Ignored(format!(
                "push to {}@{}: {}",
                push.repo.full_name,
                push.branch,
                held.join("; ")
            )));
        }
        for (app, url) in &moving {
            store::request_head_check(conn, app, url, &push.branch, &delivery.delivery_id).await?;
            if is_commit_id(&push.after) && push.after != NULL_SHA {
                store::record_push(
                    conn,
                    app,
                    &push.after,
                    &delivery.delivery_id,
                    delivery.received_at,
                )
                .await?;
            }
        }
        store::notify_work(conn, "heads").await?;
        let apps: Vec<&str> = moving.iter().map(|(a, _)| *a).collect();
        let mut outcome = format!(
            "asked {} for the head of `{}` for {} (pushed {})",
            push.repo.full_name,
            push.branch,
            apps.join(", "),
            short(&push.after)
        );
        if !held.is_empty() {
            let _ = write!(outcome, "; not moved: {}", held.join("; "));
        }
        Ok(Outcome::Handled(outcome))
    }

    async fn on_pull_request(
        &self,
        conn: &mut PgConnection,
        delivery: &DeliveryContext,
        pr: &PullRequest,
    ) -> Result<Outcome, HandlerError> {
        let name = &pr.repo.full_name;
        if !self.github {
            return Ok(Outcome::Ignored(format!(
                "pull request #{} in {name}: no GitHub credentials are configured \
                 (CAIRN_GITHUB_TOKEN, or a GitHub App), so its plan could not be posted",
                pr.number
            )));
        }
        let repo = RepoName::parse(name)?;
        let head_sha = pr.head_sha.to_ascii_lowercase();
        if !is_commit_id(&head_sha) {
            return Ok(Outcome::Ignored(format!(
                "pull request #{} in {name}: its head `{}` is not a commit id",
                pr.number, pr.head_sha
            )));
        }
        let number = i64::try_from(pr.number)?;
        store::request_pr_plan(
            conn,
            &PrRequest {
                repo: &repo.to_string(),
                pr: number,
                html_url: pr.repo.html_url.trim_end_matches('/'),
                head_sha: &head_sha,
                fork: pr.fork,
                delivery_id: &delivery.delivery_id,
            },
        )
        .await?;
        let description = "Planning…";
        if store::status_is_news(
            conn,
            &repo.key(),
            &head_sha,
            PLAN_CONTEXT,
            "pending",
            description,
            true,
        )
        .await?
        {
            outbox::enqueue(
                conn,
                &GitHubCall::CreateStatus {
                    repo: repo.clone(),
                    sha: head_sha.clone(),
                    status: CommitStatus::new(
                        PLAN_CONTEXT,
                        StatusState::Pending,
                        description,
                        None,
                    ),
                },
            )
            .await?;
        }
        store::notify_work(conn, "pulls").await?;
        Ok(Outcome::Handled(format!(
            "planning pull request #{} in {name} at {}{}",
            pr.number,
            short(&head_sha),
            if pr.fork {
                " (from a fork: secrets are not decrypted)"
            } else {
                ""
            }
        )))
    }
}
