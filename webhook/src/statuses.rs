//! Commit statuses for what the reconciler does: the GitHub integration's
//! [`cairn_reconciler::hooks::Hooks`].
//!
//! - `cairn/apply` on the config commit: `pending` when a reconcile of a new commit starts, then
//!   `success` with the plan's summary when it is applied, or `failure` with the first error
//!   (`path:line:col: message`) when it is not. Written in the apply's or the failure record's own
//!   transaction.
//! - `cairn/deploy/<app>` on an app's source commit: `pending` when a release of that commit is planned
//!   (in the apply transaction), then `success` with the time from push to running, or `failure` with
//!   the reason, when the agent API reports the outcome ([`cairn_reconciler::hooks::record_deploy_outcome`]).
//!   The app's name is in the context because several apps can deploy one commit.
//!
//! Only repositories on the configured GitHub host get statuses, only commits named by a commit id
//! (a `rev` pinned to a tag has none), and a status is enqueued only when it differs from the last one
//! enqueued for that commit and context: reconciling the same invalid commit every interval posts its
//! failure once.
//!
//! What it must not do: call GitHub (every status goes through [`crate::outbox`], in the caller's
//! transaction), or fail an apply: the reconciler rolls a failed hook back to a savepoint and carries
//! on.

use std::time::Duration;

use cairn_plan::Plan;
use cairn_reconciler::hooks::{DeployOutcome, HookFuture, Hooks};
use cairn_reconciler::store::RecordedError;
use sqlx::{PgConnection, PgPool};

use crate::github::{CommitStatus, GitHubConfig, RepoName, StatusState};
use crate::outbox::{self, GitHubCall};
use crate::store;

/// The `cairn/apply` status context.
pub const APPLY_CONTEXT: &str = "cairn/apply";
/// The `cairn/deploy/<app>` status contexts' prefix.
pub const DEPLOY_CONTEXT: &str = "cairn/deploy";

/// Commit statuses through the outbox.
#[derive(Debug, Clone)]
pub struct GitHubStatuses {
    /// Where the config repository's statuses go; `None` when it is not on GitHub.
    config_repo: Option<RepoName>,
    github: GitHubConfig,
}

impl GitHubStatuses {
    /// `config_url` is the config repository as `cairn serve` was given it (before any rewrite).
    pub fn new(config_url: Option<&str>, github: GitHubConfig) -> GitHubStatuses {
        GitHubStatuses {
            config_repo: config_url.and_then(|u| github.repo_of(u)),
            github,
        }
    }

    /// The context of an app's deploy status.
    pub fn deploy_context(app: &str) -> String {
        format!("{DEPLOY_CONTEXT}/{app}")
    }
}

fn is_commit_id(sha: &str) -> bool {
    (sha.len() == 40 || sha.len() == 64) && sha.chars().all(|c| c.is_ascii_hexdigit())
}

fn state_str(state: StatusState) -> &'static str {
    match state {
        StatusState::Pending => "pending",
        StatusState::Success => "success",
        StatusState::Failure => "failure",
        StatusState::Error => "error",
    }
}

/// Enqueues `status` on `sha` unless it is what was enqueued last (or, with `only_first`, unless any
/// status was).
async fn post(
    conn: &mut PgConnection,
    repo: &RepoName,
    sha: &str,
    status: CommitStatus,
    only_first: bool,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    if !is_commit_id(sha) {
        return Ok(false);
    }
    let sha = sha.to_ascii_lowercase();
    let news = store::status_is_news(
        conn,
        &repo.key(),
        &sha,
        &status.context,
        state_str(status.state),
        &status.description,
        only_first,
    )
    .await?;
    if news {
        outbox::enqueue(
            conn,
            &GitHubCall::CreateStatus {
                repo: repo.clone(),
                sha,
                status,
            },
        )
        .await?;
    }
    Ok(news)
}

/// "41s", "2m 5s", "1h 3m".
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..=59 => format!("{}.{}s", secs, d.subsec_millis() / 100),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        _ => format!("{}h {}m", secs / 3600, (secs % 3600) / 60),
    }
}

impl Hooks for GitHubStatuses {
    fn reconcile_started<'a>(&'a self, pool: &'a PgPool, commit: &'a str) -> HookFuture<'a> {
        Box::pin(async move {
            let Some(repo) = &self.config_repo else {
                return Ok(());
            };
            let mut tx = pool.begin().await?;
            let status = CommitStatus::new(
                APPLY_CONTEXT,
                StatusState::Pending,
                "Applying this commit…",
                None,
            );
            // Only the first time: a commit reconciled again (a retry, the next interval) keeps the
            // status it has.
            post(&mut tx, repo, commit, status, true).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn applied<'a>(&'a self, conn: &'a mut PgConnection, plan: &'a Plan) -> HookFuture<'a> {
        Box::pin(async move {
            if let (Some(repo), Some(target)) = (&self.config_repo, &plan.target_commit)
                && plan.applied_commit.as_ref() != Some(target)
            {
                let status = CommitStatus::new(
                    APPLY_CONTEXT,
                    StatusState::Success,
                    &format!("Applied. {}", plan.summary()),
                    None,
                );
                post(conn, repo, target.as_str(), status, false).await?;
            }
            for release in &plan.releases {
                let sha = release.source_commit.as_str();
                let Some(repo) = self.github.repo_of(release.spec.source_url.as_str()) else {
                    continue;
                };
                if !is_commit_id(sha) {
                    continue;
                }
                let app = release.app.as_str();
                store::record_deploy(conn, app, release.number as i64, &repo.to_string(), sha)
                    .await?;
                let status = CommitStatus::new(
                    GitHubStatuses::deploy_context(app),
                    StatusState::Pending,
                    &format!("Release #{} of {app} planned; deploying…", release.number),
                    None,
                );
                post(conn, &repo, sha, status, false).await?;
            }
            Ok(())
        })
    }

    fn failed<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        commit: &'a str,
        errors: &'a [RecordedError],
    ) -> HookFuture<'a> {
        Box::pin(async move {
            let Some(repo) = &self.config_repo else {
                return Ok(());
            };
            let first = errors
                .first()
                .map(|e| e.to_string().replace(['\n', '\r'], " "))
                .unwrap_or_else(|| "failed".to_owned());
            let description = match errors.len() {
                0 | 1 => first,
                n => format!("{n} errors; first: {first}"),
            };
            let status = CommitStatus::new(APPLY_CONTEXT, StatusState::Failure, &description, None);
            post(conn, repo, commit, status, false).await?;
            Ok(())
        })
    }

    fn deploy_finished<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        outcome: &'a DeployOutcome<'a>,
    ) -> HookFuture<'a> {
        Box::pin(async move {
            let app = outcome.app.as_str();
            let Some(deploy) = store::finish_deploy(conn, app, outcome.release as i64).await?
            else {
                return Ok(());
            };
            let repo = RepoName::parse(&deploy.repo)?;
            let reason = outcome.reason.replace(['\n', '\r'], " ");
            let status = if outcome.ok {
                let since_push = outcome.push_to_running.or_else(|| {
                    deploy
                        .since_push_secs
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(Duration::from_secs_f64)
                });
                let mut description = format!("Release #{} running", outcome.release);
                if let Some(d) = since_push {
                    description.push_str(&format!(" {} after the push", human_duration(d)));
                }
                if !reason.trim().is_empty() {
                    description.push_str(&format!(": {}", reason.trim()));
                }
                CommitStatus::new(
                    GitHubStatuses::deploy_context(app),
                    StatusState::Success,
                    &description,
                    None,
                )
            } else {
                CommitStatus::new(
                    GitHubStatuses::deploy_context(app),
                    StatusState::Failure,
                    &format!("Release #{} failed: {}", outcome.release, reason.trim()),
                    None,
                )
            };
            post(conn, &repo, &deploy.sha, status, false).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human_duration(Duration::from_millis(41_250)), "41.2s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m 5s");
        assert_eq!(human_duration(Duration::from_secs(3780)), "1h 3m");
    }
}
