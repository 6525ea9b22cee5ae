//! Commit statuses from the reconciler's hooks ([`GitHubStatuses`]), through a real reconciler, real
//! git remotes and a real PostgreSQL, read back from the outbox: `cairn/apply` pending, then success
//! or failure, once per commit however often it is reconciled; `cairn/deploy/<app>` pending with the
//! release, then the outcome the agent API reports, with the time since the push.

use std::sync::Arc;

use cairn_reconciler::controller::Trigger;
use cairn_reconciler::hooks::{DeployOutcome, Hooks, record_deploy_outcome};
use cairn_schema::Name;
use cairn_webhook::deliveries::{DeliveryContext, DeliveryHandler};
use cairn_webhook::events::{RepoUrls, SourcePush};
use cairn_webhook::github::{GitHubAuth, GitHubConfig};
use cairn_webhook::handler::CairnHandler;
use cairn_webhook::heads::HeadChecker;
use cairn_webhook::statuses::GitHubStatuses;
use sqlx::Connection as _;
use tokio::sync::Notify;

use crate::world::{CONFIG_URL, World, bounded, drain, platform, status_version, statuses};

fn hooks() -> Arc<dyn Hooks> {
    let github = GitHubConfig::new(GitHubAuth::Token("t".to_owned().into()));
    Arc::new(GitHubStatuses::new(Some(CONFIG_URL), github))
}

fn status(
    sha: &str,
    context: &str,
    state: &str,
    description: &str,
) -> (String, String, String, String, String) {
    let repo = if context == "cairn/apply" {
        "acme/platform"
    } else {
        "Codertocat/Hello-World"
    };
    (
        repo.to_owned(),
        sha.to_owned(),
        context.to_owned(),
        state.to_owned(),
        description.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_statuses_are_posted_once_per_commit_and_state() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let w = World::new();
        platform(&w.config, &[("web", "")]);
        let c1 = w.source_commit("v1");
        let a = w.config_commit("a platform");
        let mut c = w.controller(pool, None);
        c.hooks = Some(hooks());

        c.reconcile(Trigger::Startup).await.unwrap();
        // Pending, then success: undelivered, the success replaced the pending call.
        assert_eq!(status_version(pool, &a, "cairn/apply").await, 2);
        let expected = vec![
            status(
                &a,
                "cairn/apply",
                "success",
                "Applied. Plan: 4 to add, 0 to change, 0 to destroy.",
            ),
            status(
                &c1,
                "cairn/deploy/web",
                "pending",
                "Release #1 of web planned; deploying…",
            ),
        ];
        assert_eq!(statuses(pool).await, expected);
        drain(pool).await;
        c.reconcile(Trigger::Timer).await.unwrap();
        assert_eq!(statuses(pool).await, expected, "the same commit posts nothing");

        // An invalid commit fails once, however often it is reconciled.
        w.config.write(
            "apps/web.toml",
            "[app.web]\nplan = \"smal\"\nruntime = \"docker\"\n\
             source = { url = \"https://github.com/Codertocat/Hello-World.git\", branch = \"master\" }\n",
        );
        let b = w.config_commit("a typo");
        c.reconcile(Trigger::Wake).await.unwrap();
        c.reconcile(Trigger::Timer).await.unwrap();
        let after_b = statuses(pool).await;
        assert_eq!(after_b.len(), 3, "{after_b:#?}");
        let (_, sha, context, state, description) = after_b[2].clone();
        assert_eq!((sha.as_str(), context.as_str(), state.as_str()), (b.as_str(), "cairn/apply", "failure"));
        assert!(description.starts_with("apps/web.toml:2:8: "), "{description}");
        assert_eq!(status_version(pool, &b, "cairn/apply").await, 1, "no pending for an invalid commit");
        drain(pool).await;

        // Fixed: pending, then success.
        platform(&w.config, &[("web", "")]);
        let fixed = w.config_commit("fixed");
        c.reconcile(Trigger::Wake).await.unwrap();
        let all = statuses(pool).await;
        assert_eq!(
            all[3..],
            [status(
                &fixed,
                "cairn/apply",
                "success",
                "Applied. Plan: 0 to add, 0 to change, 0 to destroy."
            )]
        );
        assert_eq!(status_version(pool, &fixed, "cairn/apply").await, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_statuses_carry_the_release_and_the_time_since_the_push() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let w = World::new();
        platform(&w.config, &[("web", "")]);
        w.source_commit("v1");
        w.config_commit("a platform");
        let mut c = w.controller(pool, None);
        let hooks = hooks();
        c.hooks = Some(hooks.clone());
        c.reconcile(Trigger::Startup).await.unwrap();

        // A push, as a delivery's handler records it, then the head check and the reconcile.
        let c2 = w.source_commit("v2");
        let handler = CairnHandler::new(pool.clone(), Some(w.tracked()), true);
        let mut tx = pool.begin().await.unwrap();
        let push = SourcePush {
            apps: vec!["web".to_owned()],
            repo: RepoUrls {
                full_name: "Codertocat/Hello-World".to_owned(),
                clone_url: crate::world::APP_URL.to_owned(),
                html_url: "https://github.com/Codertocat/Hello-World".to_owned(),
                ssh_url: "git@github.com:Codertocat/Hello-World.git".to_owned(),
            },
            branch: "master".to_owned(),
            before: "0".repeat(40),
            after: c2.clone(),
            pusher: "Codertocat".to_owned(),
        };
        let delivery = DeliveryContext {
            delivery_id: "push-1".to_owned(),
            received_at: chrono::Utc::now(),
        };
        handler
            .on_source_push(&mut tx, &delivery, &push)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        HeadChecker::new(pool.clone(), w.poller("heads.git"), Arc::new(Notify::new()))
            .check_due()
            .await
            .unwrap();
        c.reconcile(Trigger::Wake).await.unwrap();
        assert_eq!(
            statuses(pool).await.last().unwrap(),
            &status(
                &c2,
                "cairn/deploy/web",
                "pending",
                "Release #2 of web planned; deploying…"
            )
        );
        drain(pool).await;

        // The agent API reports: release 2 runs, release 1 had failed.
        let web = Name::new("web").unwrap();
        let mut conn = pool.acquire().await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        let ok = DeployOutcome {
            app: &web,
            release: 2,
            ok: true,
            reason: "1/1 replicas healthy",
            push_to_running: None,
        };
        record_deploy_outcome(Some(&*hooks), &mut tx, &ok).await;
        let failed = DeployOutcome {
            app: &web,
            release: 1,
            ok: false,
            reason: "health check failed:\nGET / answered 500",
            push_to_running: None,
        };
        record_deploy_outcome(Some(&*hooks), &mut tx, &failed).await;
        tx.commit().await.unwrap();
        let all = statuses(pool).await;
        let (_, sha, context, state, description) = all[all.len() - 2].clone();
        assert_eq!(
            (sha.as_str(), context.as_str(), state.as_str()),
            (c2.as_str(), "cairn/deploy/web", "success")
        );
        assert!(
            description.starts_with("Release #2 running ")
                && description.ends_with("s after the push: 1/1 replicas healthy"),
            "{description}"
        );
        let (_, _, _, state, description) = all[all.len() - 1].clone();
        assert_eq!(state, "failure");
        assert_eq!(
            description,
            "Release #1 failed: health check failed: GET / answered 500"
        );

        // Told again, nothing new is posted.
        let mut tx = conn.begin().await.unwrap();
        record_deploy_outcome(Some(&*hooks), &mut tx, &failed).await;
        tx.commit().await.unwrap();
        assert_eq!(statuses(pool).await.len(), all.len());
    })
    .await;
}
