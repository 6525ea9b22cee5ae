//! Pull requests to the config repository, from the real receiver through [`CairnHandler`] and the
//! [`PullPlanner`], against a real git remote (its `refs/pull/N/head` pushed by the `git` CLI) and a
//! real PostgreSQL: the plan comment and the `cairn/plan` status are enqueued together, nothing is
//! applied, invalid heads get their errors linked at the head, the newest head wins, and a fork's
//! secrets are never decrypted.

use std::path::Path;
use std::sync::Arc;

use cairn_reconciler::controller::{Controller, Trigger};
use cairn_schema::Identity;
use cairn_webhook::deliveries::process_pending;
use cairn_webhook::handler::CairnHandler;
use cairn_webhook::pulls::PullPlanner;
use sqlx::PgPool;

use crate::support::{self, Delivery, Server, post};
use crate::world::{World, bounded, outbox, platform, pull_request_payload, statuses};

const CANARY: &str = "canary-7f3e-plaintext";

struct Setup {
    w: World,
    base: String,
    server: Server,
    handler: CairnHandler,
    planner: PullPlanner,
}

/// A platform applied at `main`, and the receiver, handler and planner for its pull requests.
async fn setup(pool: &PgPool, identity: Option<Identity>) -> Setup {
    let w = World::new();
    platform(&w.config, &[("web", "")]);
    w.source_commit("v1");
    let base = w.config_commit("a platform");
    let c = Arc::new(w.controller(pool, identity));
    c.reconcile(Trigger::Startup).await.unwrap();
    let planner = planner(pool, &w, c);
    Setup {
        server: Server::start(pool.clone()).await,
        handler: CairnHandler::new(pool.clone(), Some(w.tracked()), true),
        planner,
        base,
        w,
    }
}

fn planner(pool: &PgPool, w: &World, c: Arc<Controller>) -> PullPlanner {
    PullPlanner::new(
        pool.clone(),
        c,
        w.config.url(),
        w.tmp.path().join("pulls.git"),
    )
}

impl Setup {
    /// Commits the work tree on a branch off `base` and pushes it as `refs/pull/<n>/head`.
    fn pull_head(&self, n: u64, message: &str) -> String {
        let sha = self.w.config.commit(message);
        self.w.config.push(&sha, &format!("refs/pull/{n}/head"));
        sha
    }

    async fn deliver(&self, pool: &PgPool, dir: &Path, id: &str, body: Vec<u8>) -> String {
        let (status, _) = post(
            &self.server.url(),
            Delivery::signed("pull_request", id, body),
        )
        .await;
        assert_eq!(status, 202);
        process_pending(pool, &self.handler).await.unwrap();
        let _ = dir;
        sqlx::query_scalar("SELECT outcome FROM webhook_deliveries WHERE delivery_id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap()
    }
}

async fn applied_commit(pool: &PgPool) -> Option<String> {
    sqlx::query_scalar("SELECT commit FROM config_state")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn comments(rows: &[(String, String, serde_json::Value)]) -> Vec<(u64, String)> {
    rows.iter()
        .filter(|(k, _, _)| k == "upsert_pr_comment")
        .map(|(_, _, p)| {
            (
                p["pr"].as_u64().unwrap(),
                p["body"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn secret_env(plaintext: &str, recipient: &cairn_schema::Recipient) -> String {
    let ct = cairn_schema::secret::encrypt(plaintext.as_bytes(), std::slice::from_ref(recipient))
        .unwrap();
    format!(
        "\n[app.web.env]\nAPI_KEY = {{ secret = \"\"\"\n{}\"\"\" }}\n",
        ct.as_str()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_gets_one_plan_comment_and_a_status_and_nothing_is_applied() {
    let Some(dir) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let s = setup(pool, Some(crate::world::demo_identity())).await;
        crate::world::app(&s.w.config, "web", 2, "");
        let head = s.pull_head(7, "two replicas");

        let outcome = s
            .deliver(
                pool,
                &dir,
                "pr-1",
                pull_request_payload(&dir, "opened", 7, &head, "acme/platform"),
            )
            .await;
        assert_eq!(
            outcome,
            format!(
                "planning pull request #7 in acme/platform at {}",
                &head[..7]
            )
        );
        assert_eq!(
            statuses(pool).await,
            [(
                "acme/platform".to_owned(),
                head.clone(),
                "cairn/plan".to_owned(),
                "pending".to_owned(),
                "Planning…".to_owned()
            )]
        );

        let planned = s.planner.plan_due().await.unwrap();
        assert_eq!(planned.planned, 1, "{planned:?}");
        let rows = outbox(pool).await;
        let comments = comments(&rows);
        assert_eq!(comments.len(), 1);
        let (pr, body) = &comments[0];
        assert_eq!(*pr, 7);
        assert!(
            body.starts_with("<!-- cairn:plan -->\n### Cairn plan for `"),
            "{body}"
        );
        assert!(body.contains(&head[..7]), "{body}");
        assert!(
            body.contains("Plan: 0 to add, 1 to change, 0 to destroy."),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "https://github.com/acme/platform/blob/{head}/apps/web.toml#L1"
            )),
            "links point at the head: {body}"
        );
        assert_eq!(
            statuses(pool).await.last().unwrap(),
            &(
                "acme/platform".to_owned(),
                head.clone(),
                "cairn/plan".to_owned(),
                "success".to_owned(),
                "Plan: 0 to add, 1 to change, 0 to destroy.".to_owned()
            )
        );
        // Planned, not applied.
        assert_eq!(applied_commit(pool).await, Some(s.base.clone()));

        // Nothing more to do until another delivery.
        assert_eq!(s.planner.plan_due().await.unwrap().planned, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_head_wins_and_the_outbox_keeps_one_comment() {
    let Some(dir) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let s = setup(pool, Some(crate::world::demo_identity())).await;
        crate::world::app(&s.w.config, "web", 2, "");
        let a = s.pull_head(7, "two replicas");
        s.deliver(
            pool,
            &dir,
            "sync-a",
            pull_request_payload(&dir, "synchronize", 7, &a, "acme/platform"),
        )
        .await;
        crate::world::app(&s.w.config, "web", 3, "");
        let b = s.pull_head(7, "three replicas");
        // The delivery for B arrives, then a late one for A: the plan is B's either way.
        s.deliver(
            pool,
            &dir,
            "sync-b",
            pull_request_payload(&dir, "synchronize", 7, &b, "acme/platform"),
        )
        .await;
        s.deliver(
            pool,
            &dir,
            "sync-a-late",
            pull_request_payload(&dir, "synchronize", 7, &a, "acme/platform"),
        )
        .await;
        let planned = s.planner.plan_due().await.unwrap();
        assert!(planned.planned >= 1, "{planned:?}");
        let rows = outbox(pool).await;
        let comments = comments(&rows);
        assert_eq!(
            comments.len(),
            1,
            "the pending comment is replaced, not added to"
        );
        assert!(comments[0].1.contains(&b[..7]), "{}", comments[0].1);
        assert!(!comments[0].1.contains(&a[..7]), "{}", comments[0].1);
        let planned_sha: String =
            sqlx::query_scalar("SELECT planned_sha FROM github_pr_plans WHERE pr = 7")
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(planned_sha, b);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_head_gets_each_error_linked_to_its_line_at_the_head() {
    let Some(dir) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let s = setup(pool, None).await;
        s.w.config.write(
            "apps/web.toml",
            "[app.web]\nplan = \"smal\"\nruntime = \"docker\"\nreplicas = 1\n\
             source = { url = \"https://github.com/Codertocat/Hello-World.git\", branch = \"master\" }\n",
        );
        let head = s.pull_head(8, "a typo");
        s.deliver(pool, &dir, "pr-8", pull_request_payload(&dir, "opened", 8, &head, "acme/platform"))
            .await;
        s.planner.plan_due().await.unwrap();
        let rows = outbox(pool).await;
        let comments = comments(&rows);
        let body = &comments[0].1;
        assert!(body.contains("**Invalid: 1 error.**"), "{body}");
        assert!(
            body.contains(&format!(
                "[`apps/web.toml:2:8`](https://github.com/acme/platform/blob/{head}/apps/web.toml#L2)"
            )),
            "{body}"
        );
        let (_, sha, context, state, description) = statuses(pool).await.pop().unwrap();
        assert_eq!((sha.as_str(), context.as_str(), state.as_str()), (head.as_str(), "cairn/plan", "failure"));
        assert!(description.starts_with("apps/web.toml:2:8: "), "{description}");
        assert!(description.contains("smal"), "{description}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forks_secrets_are_never_decrypted_and_no_plaintext_reaches_github() {
    let Some(dir) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let s = setup(pool, Some(crate::world::demo_identity())).await;
        // A secret only some other key can open: decrypting it is the only way to fail on it.
        let stranger = Identity::generate().recipient();
        crate::world::app(&s.w.config, "web", 1, "");
        let web = std::fs::read_to_string(s.w.config.work.join("apps/web.toml")).unwrap();
        s.w.config.write(
            "apps/web.toml",
            &format!("{web}{}", secret_env(CANARY, &stranger)),
        );
        let head = s.pull_head(9, "a secret");

        // From a fork: planned without decrypting, so the secret shows as unverified.
        s.deliver(
            pool,
            &dir,
            "fork-9",
            pull_request_payload(&dir, "opened", 9, &head, "mallory/platform"),
        )
        .await;
        s.planner.plan_due().await.unwrap();
        let fork_comment = comments(&outbox(pool).await).pop().unwrap().1;
        assert!(
            fork_comment.contains("Plan: 0 to add, 1 to change"),
            "{fork_comment}"
        );
        assert!(fork_comment.contains("API_KEY"), "{fork_comment}");
        let (_, _, _, state, description) = statuses(pool).await.pop().unwrap();
        assert_eq!(state, "success");
        assert!(
            description.contains("Secrets unverified (fork)"),
            "{description}"
        );

        // The same head from the repository itself is decrypted, and this one cannot be.
        s.w.config.push(&head, "refs/pull/10/head");
        s.deliver(
            pool,
            &dir,
            "same-10",
            pull_request_payload(&dir, "opened", 10, &head, "acme/platform"),
        )
        .await;
        s.planner.plan_due().await.unwrap();
        let same = comments(&outbox(pool).await)
            .into_iter()
            .find(|(pr, _)| *pr == 10)
            .unwrap()
            .1;
        assert!(same.contains("**Invalid: 1 error.**"), "{same}");
        assert!(same.contains("does not decrypt"), "{same}");

        // A secret the control plane can open: its value reaches no comment or status.
        let own = cairn_schema::Recipient::new(&crate::world::demo_recipient()).unwrap();
        s.w.config.write(
            "apps/web.toml",
            &format!("{web}{}", secret_env(CANARY, &own)),
        );
        let readable = s.pull_head(11, "a readable secret");
        s.deliver(
            pool,
            &dir,
            "same-11",
            pull_request_payload(&dir, "opened", 11, &readable, "acme/platform"),
        )
        .await;
        s.planner.plan_due().await.unwrap();
        let rows = outbox(pool).await;
        let eleven = comments(&rows)
            .into_iter()
            .find(|(pr, _)| *pr == 11)
            .unwrap()
            .1;
        assert!(eleven.contains("API_KEY"), "{eleven}");
        let all = serde_json::to_string(&rows.iter().map(|r| &r.2).collect::<Vec<_>>()).unwrap();
        assert!(
            !all.contains(CANARY),
            "a secret's plaintext reached the outbox"
        );
    })
    .await;
}
