//! The pull-request planner: for each pull request a delivery recorded, fetches `refs/pull/N/head` of
//! the config repository (through the operator's `--git-rewrite`s), validates it, plans it against the
//! applied state without applying anything, and in one transaction enqueues the plan comment and the
//! `cairn/plan` commit status.
//!
//! Whatever order `synchronize` deliveries arrive in, the newest head wins: the planner plans what
//! `refs/pull/N/head` points at when it fetches, a delivery that arrives meanwhile leaves the request
//! due again, a planner whose lease was taken over writes nothing (fencing token), and the outbox keeps
//! at most one pending comment per pull request, replaced by each newer plan.
//!
//! A pull request from a fork gets a plan, but its secrets are never decrypted: it is planned without
//! fingerprints (a rewritten secret shows as "changed (unverified)"), and its manifests' source URLs
//! are not contacted. For a pull request from the repository itself, the heads of apps it adds (or
//! moves to another branch) are read from their remotes, into the plan's copy of the state only, so
//! their releases and placements show. Validation errors are listed with links to the file and line
//! at the planned head.
//!
//! What it must not do: apply anything or take the apply lock, call GitHub (the outbox does), hold a
//! transaction open while fetching or planning, or put a secret's value into a comment or status: only
//! plans (which hold none) and diagnostics (which quote no value) are rendered.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_plan::observed::{CommitId, Observed};
use cairn_plan::{DesiredAt, Plan, PlanInput, render};
use cairn_reconciler::controller::Controller;
use cairn_reconciler::source::Snapshot;
use cairn_reconciler::source::git::{GitError, GitSource};
use cairn_reconciler::source::heads::HeadPoller;
use cairn_reconciler::store::state;
use cairn_reconciler::worker::{Shutdown, Worker};
use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::deliveries::{backoff, next_due};
use crate::github::{CommitStatus, RepoName, StatusState};
use crate::handler::PLAN_CONTEXT;
use crate::outbox::{self, GitHubCall, OutboxError};
use crate::store::{self, ClaimedPr, PrSettle, StoreError};
use cairn_schema::error::chain;

/// Attempts at a pull request whose head cannot be fetched before the `cairn/plan` status says so.
pub const MAX_ATTEMPTS: i32 = 5;
/// Times a head is planned again when the fetched ref did not show the delivery's head yet.
const MAX_RECHECKS: i32 = 3;
const RECHECK_AFTER: Duration = Duration::from_secs(5);
/// How long a claimed request is reserved for its planner (a planner that dies holds it this long);
/// a plan takes at most half of it.
const LEASE: Duration = Duration::from_secs(120);
/// How long a remote may take to say where an app's branch points.
const HEAD_TIMEOUT: Duration = Duration::from_secs(20);

/// A planner failure of its own (one pull request's failure is recorded on its request).
#[derive(Debug, thiserror::Error)]
pub enum PullsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    State(#[from] cairn_reconciler::store::StoreError),
}

/// What one [`PullPlanner::plan_due`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Planned {
    /// Plans (or validation reports) enqueued.
    pub planned: usize,
    /// Requests left for a later attempt, or given up (with a failure status).
    pub failed: usize,
    /// Plans dropped because another planner took the request over.
    pub lost: usize,
}

/// Where and how pull requests are planned.
#[derive(Debug, Clone)]
pub struct PullPlanner {
    pool: PgPool,
    controller: Arc<Controller>,
    /// The config repository's URL to fetch from (after rewrites).
    fetch_url: String,
    /// A bare repository of its own for pull-request heads (not the reconciler's cache, which it
    /// fetches concurrently).
    cache: PathBuf,
    /// Reads the branch heads of apps a pull request adds or moves to another branch, so their
    /// releases show in the plan; only for pull requests from the repository itself (a fork's
    /// manifests do not get to make the control plane contact a remote).
    heads: Option<Arc<std::sync::Mutex<HeadPoller>>>,
}

/// A finding that stops a head from being planned, located at the head when possible.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Finding {
    path: Option<String>,
    line: usize,
    col: usize,
    message: String,
    hint: Option<String>,
}

impl Finding {
    fn location(&self) -> Option<String> {
        let path = self.path.as_deref()?;
        Some(match (self.line, self.col) {
            (0, _) => path.to_owned(),
            (l, 0) => format!("{path}:{l}"),
            (l, c) => format!("{path}:{l}:{c}"),
        })
    }

    /// `path:line:col: message`, one line.
    fn one_line(&self) -> String {
        let text = match self.location() {
            Some(at) => format!("{at}: {}", self.message),
            None => self.message.clone(),
        };
        text.replace(['\n', '\r'], " ")
    }
}

/// What a head came to.
enum Report {
    Planned(Box<Plan>),
    Invalid(Vec<Finding>),
}

impl PullPlanner {
    /// `fetch_url` is the config repository's URL after the operator's rewrites; `cache` a directory
    /// the planner owns.
    pub fn new(
        pool: PgPool,
        controller: Arc<Controller>,
        fetch_url: String,
        cache: PathBuf,
    ) -> PullPlanner {
        PullPlanner {
            pool,
            controller,
            fetch_url,
            cache,
            heads: None,
        }
    }

    /// Asks `poller` (which carries the operator's rewrites) for the heads of apps that have none
    /// recorded for the branch they follow at the pull request's head.
    pub fn with_heads(mut self, poller: HeadPoller) -> PullPlanner {
        self.heads = Some(Arc::new(std::sync::Mutex::new(poller)));
        self
    }

    /// Plans every request that is due, one at a time.
    pub async fn plan_due(&self) -> Result<Planned, PullsError> {
        let mut planned = Planned::default();
        while let Some(claimed) = store::claim_pr_plan(&self.pool, LEASE.as_secs_f64()).await? {
            self.plan_one(&claimed, &mut planned).await?;
        }
        Ok(planned)
    }

    async fn plan_one(&self, claimed: &ClaimedPr, planned: &mut Planned) -> Result<(), PullsError> {
        let repo = match RepoName::parse(&claimed.repo) {
            Ok(repo) => repo,
            Err(e) => {
                // The receiver only records names GitHub sends; this cannot be planned or reported.
                let mut tx = self.begin().await?;
                let error = e.to_string();
                store::settle_pr_plan(&mut tx, claimed, PrSettle::GaveUp { error: &error }).await?;
                self.commit(tx).await?;
                planned.failed += 1;
                return Ok(());
            }
        };
        let fetched = tokio::time::timeout(LEASE / 2, self.fetch(claimed)).await;
        let (sha, shows_request, snapshot) = match fetched {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                let permanent = matches!(e, GitError::NoSuchRef { .. });
                return self
                    .failed(claimed, &repo, &chain(&e), permanent, planned)
                    .await;
            }
            Err(_) => {
                let error = format!(
                    "fetching refs/pull/{}/head took longer than {}s",
                    claimed.pr,
                    (LEASE / 2).as_secs()
                );
                return self.failed(claimed, &repo, &error, false, planned).await;
            }
        };
        let report = self.report(&snapshot, claimed.fork).await?;
        let (markdown, status) = render_report(&report, claimed, &sha);

        let mut tx = self.begin().await?;
        let settle = if shows_request || claimed.rechecks >= MAX_RECHECKS {
            PrSettle::Planned { sha: &sha }
        } else {
            // GitHub moves refs/pull/N/head after it sends the delivery, sometimes: plan what is
            // there, and look again shortly.
            PrSettle::Recheck {
                sha: &sha,
                in_secs: RECHECK_AFTER.as_secs_f64(),
            }
        };
        if !store::settle_pr_plan(&mut tx, claimed, settle).await? {
            drop(tx);
            tracing::warn!(repo = %repo, pr = claimed.pr,
                "another planner took this pull request over; this plan is dropped");
            planned.lost += 1;
            return Ok(());
        }
        let pr = u64::try_from(claimed.pr).expect("the table keeps pr > 0");
        outbox::enqueue(
            &mut tx,
            &GitHubCall::UpsertPrComment {
                repo: repo.clone(),
                pr,
                body: markdown,
            },
        )
        .await?;
        self.enqueue_status(&mut tx, &repo, &sha, &status).await?;
        self.commit(tx).await?;
        tracing::info!(repo = %repo, pr, head = %sha, status = ?status.state, "pull request planned");
        planned.planned += 1;
        Ok(())
    }

    /// Fetches the pull request's head ref and reads the manifests at it. Also says whether the fetched
    /// head is (or descends from) the head the delivery named.
    async fn fetch(&self, claimed: &ClaimedPr) -> Result<(String, bool, Snapshot), GitError> {
        let url = self.fetch_url.clone();
        let refname = format!("refs/pull/{}/head", claimed.pr);
        let cache = self.cache.clone();
        let requested = claimed.head_sha.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut source = GitSource::new(url, refname, cache);
            let head = source.fetch()?;
            let sha = head.to_string();
            let shows = source.is_ancestor(&requested, &sha).unwrap_or(false);
            let snapshot = source.load(head)?;
            Ok((sha, shows, snapshot))
        });
        task.await.unwrap_or_else(|e| {
            Err(GitError::Read {
                commit: claimed.head_sha.clone(),
                source: format!("the fetch panicked: {e}").into(),
            })
        })
    }

    /// Validates the snapshot and plans it against the applied state.
    async fn report(&self, snapshot: &Snapshot, fork: bool) -> Result<Report, PullsError> {
        let Some(desired) = &snapshot.loaded.desired else {
            let findings = snapshot
                .loaded
                .diagnostics
                .errors()
                .map(|d| Finding {
                    path: Some(d.path.clone()),
                    line: d.line,
                    col: d.col,
                    message: d.message.clone(),
                    hint: d.hint.clone(),
                })
                .collect();
            return Ok(Report::Invalid(findings));
        };
        // A fork's head is not under the repository's control: its secrets are never decrypted.
        let fingerprints = if fork {
            None
        } else {
            match self.controller.fingerprints(desired).await {
                Ok(prints) => prints,
                Err(e) => {
                    return Ok(Report::Invalid(vec![Finding {
                        path: e.path,
                        line: e.line.unwrap_or(0) as usize,
                        col: e.col.unwrap_or(0) as usize,
                        message: e.message,
                        hint: None,
                    }]));
                }
            }
        };
        let mut observed = state::load_observed(&self.pool).await?;
        if !fork {
            self.read_new_heads(desired, &mut observed).await;
        }
        let commit = CommitId::new(snapshot.commit.clone().unwrap_or_default());
        let plan = cairn_plan::plan(&PlanInput {
            desired: Some(DesiredAt {
                commit: &commit,
                state: desired,
            }),
            fingerprints: fingerprints.as_ref(),
            observed: &observed,
            seed: self.controller.seed,
            now: Utc::now(),
            offline_after: self.controller.offline_after,
        });
        Ok(Report::Planned(Box::new(plan)))
    }

    /// Fills in (in the plan's copy of the observed state only) the heads of apps that follow a branch
    /// whose head is not recorded: new apps, and apps moved to another source or branch. A remote
    /// that cannot be asked leaves the app without a head; the plan says so.
    async fn read_new_heads(&self, desired: &cairn_schema::Desired, observed: &mut Observed) {
        let Some(heads) = &self.heads else { return };
        for (name, app) in &desired.apps {
            if app.source.rev.is_some() {
                continue;
            }
            let same_source = observed.apps.get(name).is_some_and(|applied| {
                applied.source.url == app.source.url && applied.source.branch == app.source.branch
            });
            if same_source && observed.source_heads.contains_key(name) {
                continue;
            }
            let (poller, app_name) = (heads.clone(), name.clone());
            let (url, branch) = (app.source.url.to_string(), app.source.branch.clone());
            let ask = tokio::task::spawn_blocking(move || {
                let mut poller = poller.lock().unwrap_or_else(|e| e.into_inner());
                poller.head(&app_name, &url, &branch)
            });
            match tokio::time::timeout(HEAD_TIMEOUT, ask).await {
                Ok(Ok(Ok(Some(commit)))) => {
                    observed
                        .source_heads
                        .insert(name.clone(), CommitId::new(commit));
                }
                Ok(Ok(Ok(None))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(app = %name, error = %chain(&e),
                        "cannot read the head of a branch a pull request's app follows");
                }
                Ok(Err(e)) => tracing::warn!(app = %name, error = %e, "a head check panicked"),
                Err(_) => {
                    tracing::warn!(app = %name, "a remote did not answer a head check in time")
                }
            }
        }
    }

    /// A request that could not be planned: retried after a backoff, or, past [`MAX_ATTEMPTS`] or for
    /// a permanent reason, given up with an `error` status saying why.
    async fn failed(
        &self,
        claimed: &ClaimedPr,
        repo: &RepoName,
        error: &str,
        permanent: bool,
        planned: &mut Planned,
    ) -> Result<(), PullsError> {
        planned.failed += 1;
        let give_up = permanent || claimed.attempts >= MAX_ATTEMPTS;
        let mut tx = self.begin().await?;
        let settle = if give_up {
            PrSettle::GaveUp { error }
        } else {
            let delay = backoff(
                claimed.attempts as u32,
                Duration::from_secs(5),
                Duration::from_secs(300),
            );
            PrSettle::Retry {
                error,
                in_secs: delay.as_secs_f64(),
            }
        };
        if !store::settle_pr_plan(&mut tx, claimed, settle).await? {
            planned.lost += 1;
            return Ok(());
        }
        if give_up {
            tracing::error!(repo = %repo, pr = claimed.pr, %error, "cannot plan a pull request");
            let status = CommitStatus::new(
                PLAN_CONTEXT,
                StatusState::Error,
                &format!("Cairn could not plan this head: {error}"),
                None,
            );
            self.enqueue_status(&mut tx, repo, &claimed.head_sha, &status)
                .await?;
        } else {
            tracing::warn!(repo = %repo, pr = claimed.pr, attempts = claimed.attempts, %error,
                "cannot plan a pull request yet; will retry");
        }
        self.commit(tx).await?;
        Ok(())
    }

    async fn enqueue_status(
        &self,
        tx: &mut sqlx::PgConnection,
        repo: &RepoName,
        sha: &str,
        status: &CommitStatus,
    ) -> Result<(), PullsError> {
        let state = serde_json::to_value(status.state).expect("a state serializes");
        let state = state.as_str().unwrap_or("error");
        if store::status_is_news(
            tx,
            &repo.key(),
            sha,
            &status.context,
            state,
            &status.description,
            false,
        )
        .await?
        {
            outbox::enqueue(
                tx,
                &GitHubCall::CreateStatus {
                    repo: repo.clone(),
                    sha: sha.to_owned(),
                    status: status.clone(),
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        self.pool
            .begin()
            .await
            .map_err(|e| StoreError::from_sqlx("starting a transaction", e))
    }

    async fn commit(&self, tx: sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), StoreError> {
        tx.commit()
            .await
            .map_err(|e| StoreError::from_sqlx("committing a pull request plan", e))
    }

    /// Plans due requests whenever `wake` is notified, when a retry is due, and at least every `poll`,
    /// until `shutdown` is triggered.
    pub async fn run(&self, wake: Arc<Notify>, poll: Duration, shutdown: &Shutdown) {
        // A pass stopped midway loses nothing: its lease expires and the work is done again.
        Worker::new("planning pull requests", poll)
            .woken_by(wake)
            .abandon_at_shutdown()
            .run(shutdown, |_| async {
                let p = self.plan_due().await?;
                if p != Planned::default() {
                    tracing::debug!(?p, "planned pull requests");
                }
                let due = store::next_pr_plan_in(&self.pool).await;
                Ok::<_, PullsError>(next_due(due, 0.05, "reading pull request plans"))
            })
            .await
    }
}

/// The comment and the `cairn/plan` status for a head.
fn render_report(report: &Report, claimed: &ClaimedPr, sha: &str) -> (String, CommitStatus) {
    let blob = format!("{}/blob/{sha}/", claimed.html_url.trim_end_matches('/'));
    match report {
        Report::Planned(plan) => {
            let markdown = render::markdown(
                plan,
                &render::MarkdownOptions {
                    blob_url: Some(blob),
                    ..Default::default()
                },
            );
            let mut description = if plan.is_empty() {
                "No changes: the applied state is up to date.".to_owned()
            } else {
                plan.summary()
            };
            if !plan.secrets_verified {
                description.push_str(" Secrets unverified (fork).");
            }
            let status = CommitStatus::new(PLAN_CONTEXT, StatusState::Success, &description, None);
            (markdown, status)
        }
        Report::Invalid(findings) => {
            let markdown = invalid_markdown(findings, &blob, sha);
            let first = findings
                .first()
                .map(Finding::one_line)
                .unwrap_or_else(|| "invalid".to_owned());
            let description = match findings.len() {
                0 | 1 => first,
                n => format!("{n} errors; first: {first}"),
            };
            let status = CommitStatus::new(PLAN_CONTEXT, StatusState::Failure, &description, None);
            (markdown, status)
        }
    }
}

/// The comment for a head that does not validate: each error, linked to its file and line there.
fn invalid_markdown(findings: &[Finding], blob: &str, sha: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "### Cairn plan for `{}`\n", md_code(short(sha)));
    let n = findings.len();
    let _ = writeln!(
        o,
        "**Invalid: {n} error{}.** Nothing can be planned until {} fixed.\n",
        if n == 1 { "" } else { "s" },
        if n == 1 { "it is" } else { "they are" }
    );
    for f in findings {
        let message = md(&f.message.replace(['\n', '\r'], " "));
        match (&f.path, f.location()) {
            (Some(path), Some(at)) => {
                let mut link = format!("{blob}{}", url_path(path));
                if f.line > 0 {
                    let _ = write!(link, "#L{}", f.line);
                }
                let _ = writeln!(o, "- [`{}`]({link}): {message}", md_code(&at));
            }
            _ => {
                let _ = writeln!(o, "- {message}");
            }
        }
        if let Some(hint) = &f.hint {
            let _ = writeln!(o, "  hint: {}", md(&hint.replace(['\n', '\r'], " ")));
        }
    }
    let _ = writeln!(
        o,
        "\n<sub>Cairn · `cairn validate` shows the same errors locally</sub>"
    );
    o
}

fn short(sha: &str) -> &str {
    sha.get(..7).unwrap_or(sha)
}

/// Text inside a code span: a backtick cannot end it.
fn md_code(s: &str) -> String {
    s.replace('`', "'")
}

/// Escapes text for Markdown prose: no formatting, link, HTML or mention can come from a manifest.
fn md(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '#' | '~' | '(' | ')' | '!' => {
                o.push('\\');
                o.push(c);
            }
            '@' => o.push_str("&#64;"),
            c if c.is_control() => o.push(' '),
            _ => o.push(c),
        }
    }
    o
}

/// A repository path as a URL path: each segment percent-encoded but for unreserved characters.
fn url_path(path: &str) -> String {
    let mut o = String::with_capacity(path.len());
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                o.push(b as char)
            }
            _ => {
                let _ = write!(o, "%{b:02X}");
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed() -> ClaimedPr {
        ClaimedPr {
            repo: "acme/platform".to_owned(),
            pr: 7,
            html_url: "https://github.com/acme/platform".to_owned(),
            head_sha: "3333333333333333333333333333333333333333".to_owned(),
            fork: false,
            version: 1,
            attempts: 1,
            rechecks: 0,
            token: 1,
        }
    }

    #[test]
    fn invalid_heads_link_each_error_to_its_file_and_line_at_the_head() {
        let sha = "4444444444444444444444444444444444444444";
        let findings = vec![
            Finding {
                path: Some("apps/web.toml".to_owned()),
                line: 3,
                col: 8,
                message: "unknown plan `smal`".to_owned(),
                hint: Some("did you mean `small`?".to_owned()),
            },
            Finding {
                path: Some("nodes/a b.toml".to_owned()),
                line: 0,
                col: 0,
                message: "not UTF-8 [see](https://evil.example) @admin".to_owned(),
                hint: None,
            },
        ];
        let (markdown, status) = render_report(&Report::Invalid(findings), &claimed(), sha);
        assert_eq!(
            markdown,
            "### Cairn plan for `4444444`\n\n\
             **Invalid: 2 errors.** Nothing can be planned until they are fixed.\n\n\
             - [`apps/web.toml:3:8`](https://github.com/acme/platform/blob/4444444444444444444444444444444444444444/apps/web.toml#L3): unknown plan \\`smal\\`\n\
             \x20 hint: did you mean \\`small\\`?\n\
             - [`nodes/a b.toml`](https://github.com/acme/platform/blob/4444444444444444444444444444444444444444/nodes/a%20b.toml): not UTF-8 \\[see\\]\\(https://evil.example\\) &#64;admin\n\
             \n<sub>Cairn · `cairn validate` shows the same errors locally</sub>\n"
        );
        assert_eq!(status.state, StatusState::Failure);
        assert_eq!(status.context, "cairn/plan");
        assert_eq!(
            status.description,
            "2 errors; first: apps/web.toml:3:8: unknown plan `smal`"
        );
    }

    #[test]
    fn a_long_first_error_still_fits_a_status() {
        let finding = Finding {
            path: Some("apps/web.toml".to_owned()),
            line: 1,
            col: 1,
            message: "x".repeat(500),
            hint: None,
        };
        let (_, status) = render_report(&Report::Invalid(vec![finding]), &claimed(), "ab");
        assert_eq!(status.description.chars().count(), 140);
        assert!(status.description.starts_with("apps/web.toml:1:1: xxx"));
    }
}
