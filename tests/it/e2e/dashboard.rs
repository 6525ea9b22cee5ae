//! The dashboard in a real browser (issue 19): Debian's headless `chromium` driven by `selenium` (from the
//! Python package index, in a venv under `target/`, with Debian's `chromedriver` named explicitly so
//! nothing is downloaded; `browser.py` beside this file), under a real `cairn serve` with an agent on
//! the process driver. Sign in; the overview lists the app healthy; a push: the new release's page shows
//! build lines as they come, without a reload, and a dropped stream resumes without duplicates; rollback
//! from the page makes the old release answer through the node proxy; a viewer has no action and a
//! forged POST is refused; no CSP violation in the console; axe finds no serious violation; every page
//! is screenshot at desktop and phone widths into `target/ui-screenshots/` and none overflows at phone
//! width.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::support::{Driver, E2e, site, wait_body};

const DEPLOY: Duration = Duration::from_secs(90);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The browser process and its command pipe; quit on drop.
struct Browser {
    child: Child,
    /// Closed first when the browser is dropped: the script then quits chromium and its driver.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Browser {
    fn start(test: &str) -> Option<Browser> {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            if !Path::new(path).is_file() {
                cairn_testkit::skip::missing(
                    test,
                    &format!("{path} (Debian package {package})"),
                    "not installed",
                );
                return None;
            }
        }
        let py = crate::pyenv::venv(
            test,
            "browser",
            &["selenium", "axe-selenium-python"],
            "selenium, axe_selenium_python",
        )?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/e2e/browser.py");
        // In a process group of its own, so chromedriver and chromium go with it if it must be killed.
        let mut child = Command::new(py)
            .arg(script)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.contains("ready"), "the browser did not start: {line}");
        Some(Browser {
            child,
            stdin: Some(stdin),
            stdout,
        })
    }

    /// Sends one command; panics with the browser's error when it failed.
    fn cmd(&mut self, c: Value) -> Value {
        writeln!(self.stdin.as_mut().unwrap(), "{c}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the browser answered {line:?} to {c}: {e}"));
        assert_eq!(answer["ok"], true, "{c}: {answer}");
        answer["value"].clone()
    }

    fn get(&mut self, url: &str) {
        self.cmd(json!({"cmd": "get", "url": url}));
    }

    fn texts(&mut self, css: &str) -> Vec<String> {
        serde_json::from_value(self.cmd(json!({"cmd": "text", "css": css}))).unwrap()
    }

    fn wait_text(&mut self, css: &str, text: &str) {
        self.cmd(json!({"cmd": "wait_text", "css": css, "text": text, "timeout": 60}));
    }

    fn click(&mut self, css: &str) {
        self.cmd(json!({"cmd": "click", "css": css}));
    }

    fn js(&mut self, script: &str) -> Value {
        self.cmd(json!({"cmd": "js", "script": script}))
    }

    fn sign_in(&mut self, base: &str, token: &str) {
        self.get(&format!("{base}/ui/login"));
        self.cmd(json!({"cmd": "fill", "css": "#token", "value": token}));
        self.click("form button[type=submit]");
        self.wait_text("h1", "Overview");
    }

    fn sign_out(&mut self) {
        self.click("form.who button");
        self.wait_text("h1", "Sign in");
    }

    /// Console entries that are CSP violations.
    fn csp_violations(&mut self) -> Vec<Value> {
        let all = self.cmd(json!({"cmd": "console"}));
        all.as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                let m = e["message"].as_str().unwrap_or("");
                m.contains("Content Security Policy") || m.contains("Refused to")
            })
            .cloned()
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // End of input quits the browser (the script's `finally: d.quit()`); a script that does not end
        // within 15 s is killed with its whole group, driver and browser included.
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(pid) = i32::try_from(self.child.id())
            && let Some(group) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(db_url: &str, name: &str, role: &str) -> String {
    let out = Command::new(crate::agents::support::CAIRN)
        .args(["token", "create", "--name", name, "--role", role])
        .env("DATABASE_URL", db_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn shots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Screenshots the current page at desktop and phone widths, checks that it does not overflow at phone
/// width, and that axe finds no serious or critical violation.
fn inspect(b: &mut Browser, name: &str) {
    for (label, width, height) in [("desktop", 1280, 900), ("phone", 390, 844)] {
        b.cmd(json!({"cmd": "size", "width": width, "height": height}));
        let path = shots().join(format!("{name}-{label}.png"));
        b.cmd(json!({"cmd": "screenshot", "path": path}));
        let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth");
        if overflow.as_i64().unwrap() > 0 {
            // Which elements stick out, for the message.
            let wide = b.js(
                "return Array.from(document.querySelectorAll('body *')).filter(function (e) { \
                   return e.getBoundingClientRect().right > window.innerWidth + 1; }) \
                   .slice(0, 5).map(function (e) { return e.outerHTML.slice(0, 200); })",
            );
            panic!("{name} overflows by {overflow} px at {width} px: {wide}");
        }
    }
    b.cmd(json!({"cmd": "size", "width": 1280, "height": 900}));
    let serious = b.cmd(json!({"cmd": "axe"}));
    assert_eq!(serious, json!([]), "axe on {name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_in_a_real_browser() {
    const TEST: &str = "the_dashboard_in_a_real_browser";
    let Some(mut browser) = Browser::start(TEST) else {
        return;
    };
    let Some(mut e) = E2e::new(TEST, &[Driver::Process]).await else {
        return;
    };
    // A runtime whose build prints a line, waits, and prints another: the page is open meanwhile.
    let runtime = cairn_testkit::fixtures::runtime("ui-app")
        .drivers(&["process"])
        .build(&[
            "echo building $(cat www/index.html)",
            "sleep 4",
            "echo built $(cat www/index.html)",
        ])
        .start("exec /bin/busybox httpd -f -p 127.0.0.1:$PORT -h www");
    e.repo.write("runtime-ui.toml", &runtime.to_string());
    let a = e.app("web", "ui-app", 1, &site("v1", true));
    let (app, host, src) = (a.name.clone(), a.host.clone(), &a.source);
    e.repo.node("n1", "");
    // A notification sink whose receiver is not there: its test page shows why.
    let seal = |v: &str| {
        cairn_schema::secret::encrypt(v.as_bytes(), &[e.recipient()])
            .unwrap()
            .as_str()
            .to_owned()
    };
    e.repo.write(
        "notify.toml",
        &format!(
            "[notify.ops]\nkind = \"webhook\"\nevents = [\"certificate.expiring\"]\n\
             url = {{ secret = \"\"\"\n{}\"\"\" }}\nsigning_secret = {{ secret = \"\"\"\n{}\"\"\" }}\n",
            seal("http://127.0.0.1:9/hooks"),
            seal("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo="),
        ),
    );
    // Streams end every 2 s: the browser reconnects by itself (Last-Event-ID) while a build prints.
    let plane = e.start(&["--ui-stream-lifetime", "2s"]).await;
    let agent = e.agent(&plane, "n1", Driver::Process, &[]).await;
    plane.wait_release(&app, 1, "live", DEPLOY).await;
    wait_body(agent.proxy, &host, "v1", Duration::from_secs(10)).await;
    let base = plane.url.clone();
    let operator = token(plane.db.url(), "ops", "operator");
    let viewer = token(plane.db.url(), "watcher", "viewer");

    // Sign-in, and the overview lists the app healthy.
    browser.get(&format!("{base}/ui/"));
    browser.wait_text("h1", "Sign in");
    inspect(&mut browser, "login");
    browser.sign_in(&base, &operator);
    browser.wait_text(&format!("tr[data-app='{app}']"), "healthy");
    inspect(&mut browser, "overview");

    // A push: release 2's page shows its build lines as the agent ships them, without a reload.
    src.commit(&site("v2", true));
    let release2 = super::support::wait_for("release 2 to exist", DEPLOY, || async {
        plane.release(&app, 2).await
    })
    .await;
    assert_eq!(release2["number"], 2);
    browser.get(&format!("{base}/ui/apps/{app}/releases/2"));
    browser.wait_text("#live", "Live");
    browser.wait_text("#output", "building v2");
    // The server ends the stream 2 s after it opened, while the build sleeps: the browser's own
    // reconnection sends Last-Event-ID and gets the rest, with no line twice.
    browser.wait_text("#output", "built v2");
    let opens = browser.js("return window.cairnOpens");
    assert!(
        opens.as_u64().is_some_and(|n| n >= 2),
        "the stream was to be reconnected by the browser while the build went on: {opens}"
    );
    let lines = browser.texts("#output li .text");
    for l in &lines {
        assert_eq!(
            lines.iter().filter(|x| *x == l).count(),
            1,
            "a line shown twice after the reconnect: {lines:?}"
        );
    }
    assert!(lines.iter().any(|l| l == "building v2"), "{lines:?}");
    plane.wait_release(&app, 2, "live", DEPLOY).await;
    wait_body(agent.proxy, &host, "v2", Duration::from_secs(10)).await;
    inspect(&mut browser, "build-output");

    // Rollback from the app's page: confirmation, then the old release answers through the proxy.
    browser.get(&format!("{base}/ui/apps/{app}"));
    browser.wait_text("tr[data-release='2']", "live");
    inspect(&mut browser, "app");
    browser.click("a[href$='/actions/rollback?release=1']");
    browser.wait_text("h1", "Roll back");
    inspect(&mut browser, "confirm");
    browser.click("#confirm button[type=submit]");
    browser.wait_text(".notice", "pinned to release #1");
    wait_body(agent.proxy, &host, "v1", DEPLOY).await;
    browser.get(&format!("{base}/ui/apps/{app}"));
    browser.wait_text("tr[data-release='1']", "pinned");

    // The other pages.
    for (path, name) in [
        (format!("/ui/apps/{app}/logs"), "replica-output"),
        ("/ui/nodes/n1".to_owned(), "node"),
        ("/ui/reconciliations".to_owned(), "reconciliations"),
        ("/ui/deliveries".to_owned(), "deliveries"),
        ("/ui/databases".to_owned(), "databases"),
    ] {
        browser.get(&format!("{base}{path}"));
        browser.wait_text("h1", "");
        inspect(&mut browser, name);
    }
    // A sink's test, confirmed: the receiver's answer (here: none, and why).
    browser.get(&format!("{base}/ui/deliveries"));
    browser.click("#sinks a.button");
    browser.wait_text("h1", "Send a test");
    browser.click("#confirm button[type=submit]");
    browser.wait_text("h1", "Test sent to ops");
    browser.wait_text("#tested", "no answer");
    inspect(&mut browser, "sink-tested");
    let violations = browser.csp_violations();
    assert!(violations.is_empty(), "CSP violations: {violations:?}");

    // A viewer sees no action, and a forged POST (with the viewer's own CSRF token) is refused.
    browser.get(&format!("{base}/ui/"));
    browser.sign_out();
    browser.sign_in(&base, &viewer);
    browser.get(&format!("{base}/ui/apps/{app}"));
    browser.wait_text("h1", &app);
    assert!(browser.texts("#actions").is_empty());
    assert!(browser.texts("a.button").is_empty());
    assert!(
        browser.texts("form button[type=submit]").len() <= 1,
        "only sign-out"
    );
    let status = browser.js(&format!(
        "var x = new XMLHttpRequest(); x.open('POST', '/ui/apps/{app}/actions/restart', false); \
         x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded'); \
         x.send('csrf=' + encodeURIComponent(document.querySelector('input[name=csrf]').value)); \
         return x.status;"
    ));
    assert_eq!(status, 403);
    let restarts = plane
        .rows(&format!(
            "SELECT count FROM restart_requests WHERE app = '{app}'"
        ))
        .await;
    assert!(restarts.is_empty(), "{restarts:?}");
    let violations = browser.csp_violations();
    assert!(violations.is_empty(), "CSP violations: {violations:?}");
    drop(browser);
    drop(agent);
    e.clean_up();
}
