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
    sign_in_at(&plane.url, token).await
}

/// [`sign_in`] to the dashboard of the control plane at `url`.
pub(crate) async fn sign_in_at(url: &str, token: &str) -> String {
    let resp = client()
        .post(format!("{url}/ui/login"))
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
    get_at(&plane.url, path, cookie).await
}

pub(crate) async fn get_at(
    url: &str,
    path: &str,
    cookie: Option<&str>,
) -> (u16, HeaderMap, String) {
    let mut req = client().get(format!("{url}{path}"));
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
    post_form_at(&plane.url, path, cookie, form).await
}

/// A form POSTed to the control plane at `url`: the status and the redirect's target, else the body.
pub(crate) async fn post_form_at(
    url: &str,
    path: &str,
    cookie: &str,
    form: &[(&str, &str)],
) -> (u16, String) {
    let resp = client()
        .post(format!("{url}{path}"))
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
pub(crate) fn csrf(page: &str) -> String {
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

/// A receiver of one kind of request on 127.0.0.1: answers each `200 received` and hands over what it got.
async fn receiver() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then as many body bytes as it announces.
                loop {
                    let Ok(n) = conn.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            let _ = tx.send(text);
                            let _ = conn
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nreceived")
                                .await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, rx)
}

/// The actions on what is not an app: a database's backup now (on the databases page and the app's
/// page, which shows its attached databases), a sink's test message (on the deliveries page, with the
/// receiver's answer and never the sink's URL), an app's certificate renewal (a clear 409 without a
/// certificate to renew). A viewer sees none of the buttons and a forged POST changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_sinks_and_certificates_are_acted_on_from_the_pages() {
    let Some((db, repo, scratch, identity)) = Plane::prepare().await else {
        return;
    };
    let (port, mut received) = receiver().await;
    let canary = format!("cairn-canary-{:016x}", crate::agents::rand_u64());
    let url = format!("http://127.0.0.1:{port}/hooks/{canary}");
    let backups = scratch.path().join("backups");
    repo.node("a", "");
    repo.write(
        "app-web.toml",
        &format!(
            "[app.web]\nplan = \"small\"\nruntime = \"web\"\nreplicas = 1\n\
             databases = {{ main = \"DATABASE_URL\" }}\n\n\
             [app.web.source]\nurl = \"https://example.com/acme/web.git\"\nrev = \"{}\"\n\n\
             [database.main]\nengine = \"postgres\"\nversion = \"15\"\nplan = \"small\"\nnode = \"a\"\n\
             backup = {{ schedule = \"0 3 * * *\", keep = 5, to = \"dir:{}\" }}\n",
            crate::agents::support::COMMIT,
            backups.display()
        ),
    );
    repo.write(
        "notify.toml",
        &format!(
            "[notify.ops]\nkind = \"webhook\"\nevents = [\"certificate.expiring\"]\n{}{}",
            crate::agents::support::secret_line("url", &url, &identity.recipient()),
            crate::agents::support::secret_line(
                "signing_secret",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=",
                &identity.recipient()
            )
        ),
    );
    let plane = Plane::start(
        db,
        repo,
        scratch,
        identity,
        &fast_with("--node-offline-after", "120s"),
    )
    .await;
    plane.wait_generation(1).await;
    let viewer = token(&plane, "watcher", "viewer");
    let operator = token(&plane, "ops", "operator");
    let backups_queued = || async {
        plane
            .rows("SELECT count(*) AS n FROM database_backups WHERE trigger = 'manual'")
            .await[0]["n"]
            .as_i64()
            .unwrap()
    };

    // A viewer reads the databases, the app's attached ones and the sinks, and has no button.
    let vc = sign_in(&plane, &viewer).await;
    let (s, _, page) = get(&plane, "/ui/databases", Some(&vc)).await;
    assert_eq!(s, 200, "{page}");
    assert!(page.contains(r#"<tr data-database="main">"#), "{page}");
    assert!(
        page.contains("postgres 15") && page.contains("never"),
        "{page}"
    );
    assert!(!page.contains("verification failed"), "{page}");
    // A verification restore that failed is red on both pages.
    sqlx::query(
        "INSERT INTO database_verifications (database, backup, node, trigger, state, error, finished_at)
         VALUES ('main', 1, 'a', 'schedule', 'failed', 'other rows', now())",
    )
    .execute(plane.db.pool())
    .await
    .unwrap();
    let (_, _, page) = get(&plane, "/ui/databases", Some(&vc)).await;
    assert!(page.contains("verification failed"), "{page}");
    let (_, _, app) = get(&plane, "/ui/apps/web", Some(&vc)).await;
    assert!(
        app.contains(r#"id="app-databases""#) && app.contains("<code>DATABASE_URL</code>"),
        "{app}"
    );
    assert!(app.contains("verification failed"), "{app}");
    let (_, _, deliveries) = get(&plane, "/ui/deliveries", Some(&vc)).await;
    assert!(deliveries.contains("<code>ops</code>"), "{deliveries}");
    for page in [&page, &app, &deliveries] {
        assert!(
            !page.contains("/actions/") && !page.contains("/test\""),
            "{page}"
        );
        assert!(!page.contains(&canary), "a sink's URL is never shown");
    }
    let vcsrf = csrf(&page);
    for path in ["/ui/databases/main/actions/backup", "/ui/sinks/ops/test"] {
        let (s, _, _) = get(&plane, path, Some(&vc)).await;
        assert_eq!(s, 403, "{path}");
        let (s, body) = post_form(&plane, path, &vc, &[("csrf", &vcsrf)]).await;
        assert_eq!(s, 403, "{path}: {body}");
    }
    assert_eq!(backups_queued().await, 0);
    assert!(received.try_recv().is_err(), "a viewer's POST sent nothing");

    // An operator backs the database up from the app's page: confirm, then POST.
    let oc = sign_in(&plane, &operator).await;
    let (_, _, app) = get(&plane, "/ui/apps/web", Some(&oc)).await;
    assert!(
        app.contains(r#"href="/ui/databases/main/actions/backup""#),
        "{app}"
    );
    let (s, _, confirm) = get(&plane, "/ui/databases/main/actions/backup", Some(&oc)).await;
    assert_eq!(s, 200, "{confirm}");
    assert!(confirm.contains("Back main up now?"), "{confirm}");
    let token = csrf(&confirm);
    let (s, _) = post_form(
        &plane,
        "/ui/databases/main/actions/backup",
        &oc,
        &[("csrf", &vcsrf)],
    )
    .await;
    assert_eq!(s, 403, "another session's CSRF token");
    assert_eq!(backups_queued().await, 0);
    let (s, to) = post_form(
        &plane,
        "/ui/databases/main/actions/backup",
        &oc,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!((s, to.as_str()), (303, "/ui/databases?done=backup"));
    assert_eq!(backups_queued().await, 1);
    let (_, _, page) = get(&plane, &to, Some(&oc)).await;
    assert!(page.contains("Backup queued"), "{page}");
    for (path, status) in [
        ("/ui/databases/main/actions/drop", 404),
        ("/ui/databases/nope/actions/backup", 404),
        ("/ui/databases/Bad%20Name/actions/backup", 400),
    ] {
        let (s, body) = post_form(&plane, path, &oc, &[("csrf", &token)]).await;
        assert_eq!(s, status, "{path}: {body}");
    }
    assert_eq!(backups_queued().await, 1);

    // A test message to the sink: the receiver gets it, the page shows its answer, not the URL.
    let (_, _, deliveries) = get(&plane, "/ui/deliveries", Some(&oc)).await;
    assert!(
        deliveries.contains(r#"href="/ui/sinks/ops/test""#),
        "{deliveries}"
    );
    let (s, tested) = post_form(&plane, "/ui/sinks/ops/test", &oc, &[("csrf", &token)]).await;
    assert_eq!(s, 200, "{tested}");
    assert!(
        tested.contains("HTTP 200") && tested.contains("received"),
        "{tested}"
    );
    assert!(!tested.contains(&canary), "{tested}");
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let got = received.recv().await.unwrap();
            if got.contains("notify.test") {
                return got;
            }
        }
    })
    .await
    .expect("the receiver got the test in time");
    assert!(got.starts_with(&format!("POST /hooks/{canary}")), "{got}");
    let (s, _) = post_form(&plane, "/ui/sinks/nope/test", &oc, &[("csrf", &token)]).await;
    assert_eq!(s, 404);

    // Renewing without a certificate from the CA is a clear conflict, not a crash.
    let (s, body) = post_form(
        &plane,
        "/ui/apps/web/actions/renew",
        &oc,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("no certificate from the CA"), "{body}");
}
