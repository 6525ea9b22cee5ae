//! The web dashboard (`/ui`, issue 19) against a real `cairn serve` on PostgreSQL, driven over HTTP like
//! a browser without JavaScript: sign-in and its cookie, the security headers, roles (a viewer sees no
//! action and a forged POST is refused, on the pages and on the admin API), CSRF, escaping of hostile
//! output, and the live streams resuming with `Last-Event-ID` without a duplicated or a lost line.

use std::time::Duration;

use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::{Value, json};

use crate::agents::support::{Plane, fast_with};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

fn token(plane: &Plane, name: &str, role: &str) -> String {
    let out = plane.cairn(&["token", "create", "--name", name, "--role", role]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Signs in with `token`; returns the `Cookie` header value of the session.
async fn sign_in(plane: &Plane, token: &str) -> String {
    let resp = client()
        .post(format!("{}/ui/login", plane.url))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()[LOCATION], "/ui/");
    let set = resp.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(set.contains(flag), "{set}");
    }
    // Served over plain HTTP without a trusted proxy saying otherwise: not Secure (a browser would
    // drop it).
    assert!(!set.contains("Secure"), "{set}");
    assert!(!set.contains(token), "the token is never the cookie");
    set.split(';').next().unwrap().to_owned()
}

async fn get(plane: &Plane, path: &str, cookie: Option<&str>) -> (u16, HeaderMap, String) {
    let mut req = client().get(format!("{}{path}", plane.url));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.text().await.unwrap())
}

async fn post_form(
    plane: &Plane,
    path: &str,
    cookie: &str,
    form: &[(&str, &str)],
) -> (u16, String) {
    let resp = client()
        .post(format!("{}{path}", plane.url))
        .header("cookie", cookie)
        .form(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get(LOCATION)
        .map(|l| l.to_str().unwrap().to_owned());
    (status, location.unwrap_or(resp.text().await.unwrap()))
}

/// The hidden CSRF field of a page.
fn csrf(page: &str) -> String {
    let at = page
        .find(r#"name="csrf" value=""#)
        .unwrap_or_else(|| panic!("no CSRF field in {page}"));
    let rest = &page[at + r#"name="csrf" value=""#.len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

async fn restarts(plane: &Plane) -> i64 {
    plane
        .rows("SELECT count FROM restart_requests WHERE app = 'web'")
        .await
        .first()
        .map_or(0, |r| r["count"].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_roles_csrf_and_escaping() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "");
    let mut args = fast_with("--node-offline-after", "120s");
    args.extend([
        "--config-browse-url",
        "https://git.example.com/acme/platform/",
    ]);
    let plane = Plane::start(db, repo, scratch, identity, &args).await;
    plane.wait_generation(1).await;
    let viewer = token(&plane, "watcher", "viewer");
    let operator = token(&plane, "ops", "operator");

    // Not signed in: pages send the browser to the sign-in page; every answer carries the policy.
    let (s, h, _) = get(&plane, "/ui/", None).await;
    assert_eq!((s, h[LOCATION].to_str().unwrap()), (303, "/ui/login"));
    let (s, h, page) = get(&plane, "/ui/login", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        h["content-security-policy"].to_str().unwrap(),
        cairn_reconciler::api::ui::CSP
    );
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'self'")
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(page.contains(r#"<script src="/ui/static/cairn.js" defer></script>"#));
    assert!(!page.contains("<script>"), "no inline script");
    let (s, h, js) = get(&plane, "/ui/static/cairn.js", None).await;
    assert_eq!(s, 200);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(js.contains("EventSource"));
    // A forged session cookie is no session.
    let forged = format!("cairn_session=cairn-ui-{}", "0".repeat(64));
    let (s, _, _) = get(&plane, "/ui/", Some(&forged)).await;
    assert_eq!(s, 303);

    // A wrong token is refused with the form again; nothing is set.
    let resp = client()
        .post(format!("{}/ui/login", plane.url))
        .form(&[("token", format!("cairn-admin-{}", "1".repeat(64)))])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get(SET_COOKIE).is_none());
    assert!(resp.text().await.unwrap().contains("id=\"login-error\""));

    // A viewer reads every page and sees no action.
    let vc = sign_in(&plane, &viewer).await;
    let (s, _, page) = get(&plane, "/ui/", Some(&vc)).await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains(r#"<tr data-app="web">"#), "{page}");
    assert!(page.contains("href=\"/ui/nodes/a\""), "{page}");
    assert!(page.contains("watcher"), "{page}");
    // The app's month to date: one rolled-up hour charging exactly 12.34.
    sqlx::query(
        "WITH m AS (SELECT extract(epoch FROM date_trunc('month', now()) + interval '1 month' \
                                - date_trunc('month', now()))::bigint AS secs) \
         INSERT INTO usage_hours (hour, app, slot, plan, node, monthly_e4, seconds, numerator, month_seconds) \
         SELECT date_trunc('hour', now()), 'web', 1, 'small', 'a', 100000, 3600, 1234 * secs * 100, secs FROM m",
    )
    .execute(plane.db.pool())
    .await
    .unwrap();
    let (s, _, app) = get(&plane, "/ui/apps/web", Some(&vc)).await;
    assert_eq!(s, 200, "{app}");
    assert!(app.contains(r#"<strong id="cost">12.34"#), "{app}");
    assert!(!app.contains("id=\"actions\""), "{app}");
    assert!(!app.contains("/actions/"), "a viewer sees no action: {app}");
    // Where git declares it, linked to that line of the applied commit: what to change instead.
    let applied: String = sqlx::query_scalar("SELECT commit FROM config_state")
        .fetch_one(plane.db.pool())
        .await
        .unwrap();
    assert!(
        app.contains(&format!(
            "<a href=\"https://git.example.com/acme/platform/blob/{applied}/app-web.toml#L1\" \
             rel=\"noopener noreferrer\"><code>app-web.toml:1</code></a>"
        )),
        "{app}"
    );
    let (_, _, node) = get(&plane, "/ui/nodes/a", Some(&vc)).await;
    assert!(
        node.contains("<code>node-a.toml:1</code>") && node.contains("[node.a]"),
        "{node}"
    );
    for path in [
        "/ui/nodes/a",
        "/ui/reconciliations",
        "/ui/deliveries",
        "/ui/apps/web/logs",
    ] {
        let (s, _, page) = get(&plane, path, Some(&vc)).await;
        assert_eq!(s, 200, "{path}: {page}");
    }
    for (path, status) in [
        ("/ui/apps/nope", 404),
        ("/ui/apps/Bad%20Name", 400),
        ("/ui/nodes/nope", 404),
        ("/ui/apps/web/releases/99", 404),
        ("/ui/apps/web/releases/18446744073709551615", 404),
    ] {
        let (s, _, page) = get(&plane, path, Some(&vc)).await;
        assert_eq!(s, status, "{path}: {page}");
    }
    // A forged POST with the viewer's own valid CSRF token is still refused: the role decides.
    let vcsrf = csrf(&get(&plane, "/ui/", Some(&vc)).await.2);
    let (s, body) = post_form(
        &plane,
        "/ui/apps/web/actions/restart",
        &vc,
        &[("csrf", &vcsrf)],
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (s, _, _) = get(&plane, "/ui/apps/web/actions/restart", Some(&vc)).await;
    assert_eq!(s, 403);
    assert_eq!(restarts(&plane).await, 0);
    // The admin API's write endpoints enforce the role too; reads are a viewer's.
    let (s, _) = plane.admin_get("/status", Some(&viewer)).await;
    assert_eq!(s, 200);
    let resp = client()
        .post(format!("{}/api/v1/apps/web/restart", plane.url))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = client()
        .post(format!("{}/api/v1/nodes/a/join-tokens", plane.url))
        .bearer_auth(&viewer)
        .json(&json!({"ttl_secs": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(restarts(&plane).await, 0);

    // An operator sees the actions; each asks for a confirmation, then a POST with the CSRF token.
    let oc = sign_in(&plane, &operator).await;
    let (_, _, app) = get(&plane, "/ui/apps/web", Some(&oc)).await;
    assert!(
        app.contains("href=\"/ui/apps/web/actions/restart\""),
        "{app}"
    );
    let (s, _, confirm) = get(&plane, "/ui/apps/web/actions/restart", Some(&oc)).await;
    assert_eq!(s, 200);
    assert!(
        confirm.contains("Restart every replica of web?"),
        "{confirm}"
    );
    let token = csrf(&confirm);
    assert_ne!(token, vcsrf, "each session has its own CSRF token");
    for bad in [
        &[][..],
        &[("csrf", "")][..],
        &[("csrf", vcsrf.as_str())][..],
    ] {
        let (s, body) = post_form(&plane, "/ui/apps/web/actions/restart", &oc, bad).await;
        assert!(s == 403 || s == 422, "{s}: {body}");
    }
    assert_eq!(restarts(&plane).await, 0);
    let (s, to) = post_form(
        &plane,
        "/ui/apps/web/actions/restart",
        &oc,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(s, 303, "{to}");
    assert_eq!(to, "/ui/apps/web?done=restart");
    assert_eq!(restarts(&plane).await, 1);
    let (_, _, app) = get(&plane, &to, Some(&oc)).await;
    assert!(app.contains("Restart requested."), "{app}");
    // What the page says was done comes from a fixed set, never from the URL's text.
    let (_, _, app) = get(&plane, "/ui/apps/web?done=Your+token+expired", Some(&oc)).await;
    assert!(
        !app.contains("token expired") && !app.contains("class=\"notice\""),
        "{app}"
    );
    let (s, _, _) = get(&plane, "/ui/?after=%00", Some(&oc)).await;
    assert_eq!(s, 400);
    // Rolling back without a live release is a clear 4xx page, not a crash.
    let (s, body) = post_form(
        &plane,
        "/ui/apps/web/actions/rollback",
        &oc,
        &[("csrf", &token), ("release", "1")],
    )
    .await;
    assert!((400..500).contains(&s), "{s}: {body}");
    let (s, _) = post_form(
        &plane,
        "/ui/apps/web/actions/explode",
        &oc,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(s, 404);

    // Hostile output is text, never markup.
    let (cred, _) = plane.join_raw("a").await;
    let hostile = "<script>alert('x')</script><img src=x onerror=alert(1)>";
    let (s, body) = plane
        .agent_post(
            "/replica-logs",
            Some(&cred),
            &json!({"lines": [{"app": "web", "slot": 1, "release": 1, "stream": "stdout",
                               "text": hostile, "at": chrono::Utc::now()}]}),
        )
        .await;
    assert_eq!((s, body["stored"].clone()), (200, json!(1)), "{body}");
    let (_, _, logs) = get(&plane, "/ui/apps/web/logs", Some(&vc)).await;
    assert!(!logs.contains(hostile), "{logs}");
    assert!(!logs.contains("<img"), "{logs}");
    assert!(
        logs.contains("&#60;script&#62;alert(&#39;x&#39;)"),
        "{logs}"
    );

    // Sign-out ends the session (with the CSRF token); the cookie no longer opens a page.
    let (s, _) = post_form(&plane, "/ui/logout", &oc, &[("csrf", &vcsrf)]).await;
    assert_eq!(s, 403);
    let (s, to) = post_form(&plane, "/ui/logout", &oc, &[("csrf", &token)]).await;
    assert_eq!((s, to.as_str()), (303, "/ui/login"));
    let (s, _, _) = get(&plane, "/ui/", Some(&oc)).await;
    assert_eq!(s, 303);
    // Revoking the viewer's token ends its session too.
    let out = plane.cairn(&["token", "revoke", "watcher"]);
    assert!(out.status.success());
    let (s, _, _) = get(&plane, "/ui/", Some(&vc)).await;
    assert_eq!(s, 303);
}

/// Reads server-sent events from `resp` until `n` `lines` events came (or `limit` passed); returns
/// each event's id and its lines' texts.
async fn events(
    resp: &mut reqwest::Response,
    n: usize,
    limit: Duration,
) -> Vec<(String, Vec<String>)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while out.len() < n {
        let chunk = match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            _ => break,
        };
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut data, mut kind) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_owned();
                }
            }
            if kind == "lines" {
                let lines: Vec<Value> = serde_json::from_str(&data).unwrap();
                out.push((
                    id,
                    lines
                        .iter()
                        .map(|l| l["text"].as_str().unwrap().to_owned())
                        .collect(),
                ));
            }
        }
    }
    out
}

async fn stream(plane: &Plane, path: &str, cookie: &str, last: Option<&str>) -> reqwest::Response {
    let mut req = client()
        .get(format!("{}{path}", plane.url))
        .header("cookie", cookie);
    if let Some(l) = last {
        req = req.header("last-event-id", l);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_output_streams_resume_without_duplicates_or_losses() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    repo.node("a", "");
    repo.app("web", 1, "");
    let mut args = fast_with("--node-offline-after", "120s");
    args[1] = "1h";
    let plane = Plane::start(db, repo, scratch, identity, &args).await;
    plane.wait_generation(1).await;
    let viewer = token(&plane, "watcher", "viewer");
    let vc = sign_in(&plane, &viewer).await;
    let (cred, _) = plane.join_raw("a").await;

    // Replica output: a line before, then lines while the stream is open.
    let ship = |texts: Vec<String>| {
        let cred = cred.clone();
        let plane = &plane;
        async move {
            let lines: Vec<Value> = texts
                .iter()
                .map(|t| json!({"app": "web", "slot": 1, "release": 1, "stream": "stdout", "text": t, "at": chrono::Utc::now()}))
                .collect();
            let (s, body) = plane
                .agent_post("/replica-logs", Some(&cred), &json!({ "lines": lines }))
                .await;
            assert_eq!(s, 200, "{body}");
        }
    };
    ship(vec!["r0".into()]).await;
    let (_, _, page) = get(&plane, "/ui/apps/web/logs", Some(&vc)).await;
    assert!(page.contains(">r0<"), "{page}");
    let after = {
        let at = page.find("data-after=\"").unwrap() + "data-after=\"".len();
        page[at..at + page[at..].find('"').unwrap()].to_owned()
    };
    let mut resp = stream(
        &plane,
        &format!("/ui/apps/web/logs/stream?after={after}"),
        &vc,
        None,
    )
    .await;
    ship(vec!["r1".into(), "r2".into()]).await;
    let got = events(&mut resp, 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, ["r1", "r2"]);
    // The connection drops; lines shipped meanwhile arrive after a resume, once each.
    drop(resp);
    ship(vec!["r3".into()]).await;
    ship(vec!["r4".into()]).await;
    let mut resp = stream(
        &plane,
        "/ui/apps/web/logs/stream?after=0",
        &vc,
        Some(&got[0].0),
    )
    .await;
    let more = events(&mut resp, 1, Duration::from_secs(20)).await;
    let texts: Vec<&String> = more.iter().flat_map(|(_, l)| l).collect();
    assert_eq!(texts, ["r3", "r4"], "Last-Event-ID wins over ?after=");
    drop(resp);
    let (s, _, _) = get(&plane, "/ui/apps/web/logs/stream?after=x", Some(&vc)).await;
    assert_eq!(s, 400);
    let (s, _, _) = get(&plane, "/ui/apps/web/logs/stream", None).await;
    assert_eq!(s, 303, "a stream needs a session");

    // Build output: lines of the release's deploy task, appended with its lease.
    let (s, body) = plane
        .agent_post("/lease", Some(&cred), &json!({"max": 10, "wait_ms": 5000}))
        .await;
    assert_eq!(s, 200, "{body}");
    let task = body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["app"] == "web")
        .unwrap_or_else(|| panic!("{body}"))
        .clone();
    let (id, lease) = (task["id"].clone(), task["token"].clone());
    let release = task["release"].as_u64().unwrap();
    let build = |texts: Vec<&'static str>| {
        let (cred, lease, plane) = (cred.clone(), lease.clone(), &plane);
        let id = id.clone();
        async move {
            let lines: Vec<Value> = texts
                .iter()
                .map(|t| json!({"stream": "build", "text": t, "at": chrono::Utc::now()}))
                .collect();
            let (s, body) = plane
                .agent_post(
                    &format!("/tasks/{id}/logs"),
                    Some(&cred),
                    &json!({"token": lease, "lines": lines}),
                )
                .await;
            assert_eq!(s, 200, "{body}");
        }
    };
    build(vec!["step 1", "<b>step 2</b>"]).await;
    let path = format!("/ui/apps/web/releases/{release}");
    let (s, _, page) = get(&plane, &path, Some(&vc)).await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains("&#60;b&#62;step 2&#60;/b&#62;"), "{page}");
    assert!(!page.contains("<b>"), "{page}");
    let after = {
        let at = page.find("data-after=\"").unwrap() + "data-after=\"".len();
        page[at..at + page[at..].find('"').unwrap()].to_owned()
    };
    assert_eq!(after, format!("{id}.1"));
    let mut resp = stream(&plane, &format!("{path}/stream?after={after}"), &vc, None).await;
    build(vec!["step 3"]).await;
    let got = events(&mut resp, 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].0.as_str(), got[0].1.clone()),
        (format!("{id}.2").as_str(), vec!["step 3".to_owned()])
    );
    drop(resp);
    build(vec!["step 4", "step 5"]).await;
    let mut resp = stream(&plane, &format!("{path}/stream"), &vc, Some(&got[0].0)).await;
    let more = events(&mut resp, 1, Duration::from_secs(20)).await;
    let texts: Vec<&String> = more.iter().flat_map(|(_, l)| l).collect();
    assert_eq!(texts, ["step 4", "step 5"]);
    drop(resp);
    // From the start (no cursor): everything, once.
    let mut resp = stream(&plane, &format!("{path}/stream"), &vc, None).await;
    let all = events(&mut resp, 1, Duration::from_secs(20)).await;
    assert_eq!(
        all[0].1,
        ["step 1", "<b>step 2</b>", "step 3", "step 4", "step 5"]
    );
    let (s, _, _) = get(&plane, &format!("{path}/stream?after=1.x"), Some(&vc)).await;
    assert_eq!(s, 400);
}
