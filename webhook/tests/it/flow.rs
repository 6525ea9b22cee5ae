//! What push deliveries cause, from the real receiver through [`CairnHandler`] and the
//! [`HeadChecker`] to the reconciler, against real git remotes and a real PostgreSQL: the head the
//! remote has wins whatever order deliveries arrive in, a new head becomes a release with deploy tasks,
//! pinned apps are not moved (and the delivery says why), and a config push wakes the reconciler at
//! commit.

use std::sync::Arc;
use std::time::Duration;

use cairn_reconciler::controller::Trigger;
use cairn_reconciler::store::state;
use cairn_schema::Name;
use cairn_webhook::deliveries::process_pending;
use cairn_webhook::events::NULL_SHA;
use cairn_webhook::handler::CairnHandler;
use cairn_webhook::heads::HeadChecker;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;

use crate::support::{self, Delivery, Server, post};
use crate::world::{
    APP_BRANCH, World, bounded, platform, push_payload, releases, source_head, tasks,
};

async fn outcome(pool: &sqlx::PgPool, id: &str) -> (String, String) {
    sqlx::query_as("SELECT status, outcome FROM webhook_deliveries WHERE delivery_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remotes_head_wins_whatever_order_pushes_arrive_in_and_becomes_a_release() {
    let Some(dir) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let w = World::new();
        platform(&w.config, &[("web", "")]);
        let c1 = w.source_commit("v1");
        w.config_commit("a platform");
        let c = w.controller(pool, None);
        c.reconcile(Trigger::Startup).await.unwrap();
        assert_eq!(releases(pool, "web").await, [(1, c1.clone())]);

        let c2 = w.source_commit("v2");
        let c3 = w.source_commit("v3");
        // GitHub delivers the second push first, then the first one.
        let server = Server::start(pool.clone()).await;
        for (id, before, after) in [("push-3", &c2, &c3), ("push-2", &c1, &c2)] {
            let (status, _) = post(
                &server.url(),
                Delivery::signed("push", id, push_payload(&dir, before, after)),
            )
            .await;
            assert_eq!(status, 202);
        }
        let handler = CairnHandler::new(pool.clone(), Some(w.tracked()), false);
        let processed = process_pending(pool, &handler).await.unwrap();
        assert_eq!(processed.handled, 2, "{processed:?}");
        let (status, text) = outcome(pool, "push-2").await;
        assert_eq!(status, "handled");
        assert_eq!(
            text,
            format!(
                "asked Codertocat/Hello-World for the head of `{APP_BRANCH}` for web (pushed {})",
                &c2[..7]
            )
        );
        // The handler only asked: nothing moved inside the delivery's transaction.
        assert_eq!(source_head(pool, "web").await, Some(c1.clone()));

        let reconcile = Arc::new(Notify::new());
        let checker = HeadChecker::new(
            pool.clone(),
            w.poller("webhook-heads.git"),
            reconcile.clone(),
        );
        let checked = checker.check_due().await.unwrap();
        assert_eq!((checked.moved, checked.failed), (1, 0), "{checked:?}");
        assert_eq!(source_head(pool, "web").await, Some(c3.clone()));
        tokio::time::timeout(Duration::from_secs(1), reconcile.notified())
            .await
            .expect("a moved head wakes the reconciler");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_head_checks")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(left, 0, "done checks are deleted");

        c.reconcile(Trigger::Wake).await.unwrap();
        assert_eq!(
            releases(pool, "web").await,
            [(1, c1.clone()), (2, c3.clone())]
        );
        let deploys: Vec<_> = tasks(pool, "web")
            .await
            .into_iter()
            .filter(|(kind, release)| kind == "deploy" && *release == Some(2))
            .collect();
        assert_eq!(deploys.len(), 1, "one deploy task for the one replica");

        // A late redelivery of the first push changes nothing.
        let (status, _) = post(
            &server.url(),
            Delivery::signed("push", "push-2", push_payload(&dir, &c1, &c2)),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(process_pending(pool, &handler).await.unwrap().total(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_do_not_move_apps_pinned_by_their_manifest_or_a_rollback() {
    let Some(dir) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let w = World::new();
        platform(
            &w.config,
            &[("web", ""), ("pinned", ", rev = \"v1.0\""), ("held", "")],
        );
        let c1 = w.source_commit("v1");
        w.config_commit("a platform");
        let c = w.controller(pool, None);
        c.reconcile(Trigger::Startup).await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        assert!(
            state::set_rollback_pin(&mut conn, &Name::new("held").unwrap(), Some(1))
                .await
                .unwrap()
        );
        drop(conn);

        let c2 = w.source_commit("v2");
        let server = Server::start(pool.clone()).await;
        post(
            &server.url(),
            Delivery::signed("push", "push-1", push_payload(&dir, &c1, &c2)),
        )
        .await;
        let handler = CairnHandler::new(pool.clone(), Some(w.tracked()), false);
        process_pending(pool, &handler).await.unwrap();
        let (status, text) = outcome(pool, "push-1").await;
        assert_eq!(status, "handled");
        assert_eq!(
            text,
            format!(
                "asked Codertocat/Hello-World for the head of `master` for web (pushed {}); not \
                 moved: `held` is pinned to release #1 by a rollback (pushes deploy again once the \
                 pin is lifted); `pinned` is pinned to rev `v1.0` by its manifest (a pull request \
                 that changes the pin deploys it)",
                &c2[..7]
            )
        );
        let asked: Vec<String> = sqlx::query_scalar("SELECT app FROM webhook_head_checks")
            .fetch_all(pool)
            .await
            .unwrap();
        assert_eq!(asked, ["web"]);

        // Without the app that follows the branch, the push moves nothing and says why.
        std::fs::remove_file(w.config.work.join("apps/web.toml")).unwrap();
        w.config_commit("web is gone");
        c.reconcile(Trigger::Manual).await.unwrap();
        let c3 = w.source_commit("v3");
        post(
            &server.url(),
            Delivery::signed("push", "push-2", push_payload(&dir, &c2, &c3)),
        )
        .await;
        process_pending(pool, &handler).await.unwrap();
        let (status, text) = outcome(pool, "push-2").await;
        assert_eq!(status, "ignored");
        assert_eq!(
            text,
            "push to Codertocat/Hello-World@master: `held` is pinned to release #1 by a rollback \
             (pushes deploy again once the pin is lifted); `pinned` is pinned to rev `v1.0` by its \
             manifest (a pull request that changes the pin deploys it)"
        );
        let releases_of_held = releases(pool, "held").await;
        assert_eq!(releases_of_held, [(1, c1.clone())]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_push_wakes_the_reconciler_when_its_delivery_commits() {
    let Some(dir) = support::fixtures() else {
        return;
    };
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let w = World::new();
        let mut listener = PgListener::connect_with(pool).await.unwrap();
        listener.listen("cairn_webhook_work").await.unwrap();

        let mut push = crate::world::fixture(&dir, "push.with-new-branch.json");
        push["ref"] = "refs/heads/main".into();
        push["before"] = NULL_SHA.into();
        push["after"] = "1111111111111111111111111111111111111111".into();
        push["repository"]["full_name"] = "acme/platform".into();
        push["repository"]["clone_url"] = "https://github.com/acme/platform.git".into();
        push["repository"]["html_url"] = "https://github.com/acme/platform".into();
        push["repository"]["ssh_url"] = "git@github.com:acme/platform.git".into();
        let server = Server::start(pool.clone()).await;
        post(
            &server.url(),
            Delivery::signed("push", "config-1", serde_json::to_vec(&push).unwrap()),
        )
        .await;
        let handler = CairnHandler::new(pool.clone(), Some(w.tracked()), false);
        process_pending(pool, &handler).await.unwrap();
        assert_eq!(
            outcome(pool, "config-1").await,
            (
                "handled".to_owned(),
                "woke the reconciler for acme/platform@main (pushed 1111111)".to_owned()
            )
        );
        let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("notified at commit")
            .unwrap();
        assert_eq!(n.payload(), "reconcile");

        // A push to another branch of the config repository is recorded as ignored, and wakes no one.
        push["ref"] = "refs/heads/feature".into();
        post(
            &server.url(),
            Delivery::signed("push", "config-2", serde_json::to_vec(&push).unwrap()),
        )
        .await;
        process_pending(pool, &handler).await.unwrap();
        assert_eq!(
            outcome(pool, "config-2").await,
            (
                "ignored".to_owned(),
                "push to branch `feature` of the config repository acme/platform, which Cairn \
                 tracks at `main`"
                    .to_owned()
            )
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(300), listener.recv())
                .await
                .is_err()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_what_finished_long_ago_and_keeps_what_still_waits() {
    let db = cairn_testkit::test_db!();
    bounded(async {
        let pool = db.pool();
        let sha = "1111111111111111111111111111111111111111";
        for statement in [
            "INSERT INTO webhook_deliveries (delivery_id, event, payload, status, received_at, handled_at)
             VALUES ('old-done', 'push', '{}', 'handled', now() - interval '10 days', now() - interval '10 days'),
                    ('new-done', 'push', '{}', 'ignored', now(), now())",
            "INSERT INTO webhook_deliveries (delivery_id, event, payload, received_at)
             VALUES ('old-waiting', 'push', '{}', now() - interval '10 days')",
            "INSERT INTO github_outbox (kind, repo, payload, status, finished_at)
             VALUES ('create_status', 'acme/platform', '{}', 'done', now() - interval '10 days'),
                    ('create_status', 'acme/platform', '{}', 'dead', now())",
            "INSERT INTO github_outbox (kind, repo, payload, created_at)
             VALUES ('create_status', 'acme/platform', '{}', now() - interval '10 days')",
            "INSERT INTO webhook_pushes (app, commit, delivery_id, received_at)
             VALUES ('web', '1111111111111111111111111111111111111111', 'd1', now() - interval '10 days'),
                    ('web', '2222222222222222222222222222222222222222', 'd2', now())",
            "INSERT INTO github_commit_statuses (repo, sha, context, state, description, updated_at)
             VALUES ('acme/platform', 'a', 'cairn/apply', 'success', 'x', now() - interval '10 days'),
                    ('acme/platform', 'b', 'cairn/apply', 'success', 'x', now())",
            "INSERT INTO github_deploys (app, release, repo, sha, planned_at)
             VALUES ('web', 1, 'acme/shop', 'a', now() - interval '10 days'),
                    ('web', 2, 'acme/shop', 'b', now())",
        ] {
            sqlx::query(statement).execute(pool).await.unwrap();
        }
        for (pr, requested, planned) in [(1, 1, 1), (2, 2, 1)] {
            sqlx::query(
                "INSERT INTO github_pr_plans (repo_key, repo, pr, html_url, head_sha, fork, delivery_id,
                                              requested_version, planned_version, requested_at)
                 VALUES ('acme/platform', 'acme/platform', $1, 'https://github.com/acme/platform', $2,
                         false, 'd', $3, $4, now() - interval '10 days')",
            )
            .bind(pr)
            .bind(sha)
            .bind(requested)
            .bind(planned)
            .execute(pool)
            .await
            .unwrap();
        }

        let week = Duration::from_secs(7 * 24 * 3600);
        let pruned = cairn_webhook::service::prune_once(pool, week).await.unwrap();
        assert_eq!(
            (pruned.deliveries, pruned.calls, pruned.records),
            (1, 1, 4),
            "{pruned:?}"
        );
        let left: Vec<String> =
            sqlx::query_scalar("SELECT delivery_id FROM webhook_deliveries ORDER BY delivery_id")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(left, ["new-done", "old-waiting"]);
        let calls: Vec<String> = sqlx::query_scalar("SELECT status FROM github_outbox ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
        assert_eq!(calls, ["dead", "pending"]);
        let waiting: Vec<i64> = sqlx::query_scalar("SELECT pr FROM github_pr_plans")
            .fetch_all(pool)
            .await
            .unwrap();
        assert_eq!(waiting, [2], "a pull request still waiting for its plan is kept");
        assert_eq!(
            cairn_webhook::service::prune_once(pool, week).await.unwrap(),
            Default::default()
        );
    })
    .await;
}
