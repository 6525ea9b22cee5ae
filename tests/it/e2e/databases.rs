//! Managed databases end to end (issue 18) with real processes: `cairn serve`, two process-driver
//! agents, Debian's PostgreSQL 15 server binaries for the managed database, and an app (a shell script
//! using `psql`) attached to it that creates its table and writes 1,000 rows through `DATABASE_URL`
//! only when the table does not exist yet, then counts the rows and serves the count. So a count of
//! 1,000 after a restore means the rows came back from the backup, not from the app.
//!
//! Steps: backup to a directory (the file's SHA-256 equals the ledger's); restore into a new instance
//! and swap (the app is released again and counts 1,000 restored rows); rotate (the app keeps working
//! with the new login); SIGKILL the database node's agent (reported unavailable with its recovery point,
//! nothing rescheduled); a commit moving it to the other node plus `cairn db restore main --latest`
//! brings the rows back there. A canary app env value and the database password appear in no dump of
//! the control plane's database, no log, no plan.
//!
//! NEEDS THE ENGINE: `cairn-agent`'s `database` module (helper `dbengine`). Until it is merged every
//! database task fails as unsupported and this test fails at its first wait.

use std::time::Duration;

use super::support::{Driver, E2e, get, wait_for};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const WAIT: Duration = Duration::from_secs(120);

/// The app: serves at once (its health check does not wait for the database, which its node may still
/// be creating), waits for its database, creates and fills the table only if it is new, then writes the
/// count it serves.
fn run_sh() -> String {
    format!(
        "PSQL={PG_BIN}/psql\n\
         rm -f www/count\n\
         /bin/busybox httpd -f -p 127.0.0.1:$PORT -h www &\n\
         until $PSQL \"$DATABASE_URL\" -qAtc 'select 1' >/dev/null 2>&1; do sleep 0.2; done\n\
         if $PSQL \"$DATABASE_URL\" -qc 'CREATE TABLE items (i int PRIMARY KEY)' >/dev/null 2>&1; then\n\
           $PSQL \"$DATABASE_URL\" -qc 'INSERT INTO items SELECT g FROM generate_series(1, 1000) g'\n\
         fi\n\
         $PSQL \"$DATABASE_URL\" -qAtc 'SELECT count(*) FROM items' > www/count.tmp && mv www/count.tmp www/count\n\
         wait\n"
    )
}

fn files(version: &str) -> Vec<(&'static str, String)> {
    vec![
        ("run.sh", run_sh()),
        ("www/healthz", "ok\n".to_owned()),
        ("www/version", format!("{version}\n")),
    ]
}

async fn release_count(plane: &super::support::Plane, app: &str) -> i64 {
    plane
        .rows(&format!(
            "SELECT count(*) AS n FROM releases WHERE app = '{app}'"
        ))
        .await[0]["n"]
        .as_i64()
        .unwrap()
}

fn database(node: &str, backups: &std::path::Path) -> String {
    format!(
        "[database.main]\nengine = \"postgres\"\nversion = \"15\"\nplan = \"small\"\nnode = \"{node}\"\n\
         backup = {{ schedule = \"0 3 * * *\", keep = 5, to = \"dir:{}\" }}\n",
        backups.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_backs_up_restores_swaps_rotates_and_survives_its_node() {
    const TEST: &str = "a_database_backs_up_restores_swaps_rotates_and_survives_its_node";
    for bin in ["postgres", "initdb", "pg_dump", "pg_restore", "psql"] {
        let p = std::path::Path::new(PG_BIN).join(bin);
        if !p.is_file() {
            cairn_testkit::skip::missing(
                TEST,
                "Debian's PostgreSQL 15 server binaries",
                p.display(),
            );
            return;
        }
    }
    let Some(mut e) = E2e::new(TEST, &[Driver::Process]).await else {
        return;
    };
    // The engine's account reaches its instance (under `<data-dir>-databases`) through the scratch
    // directory, as it would through /var/lib.
    std::fs::set_permissions(
        e.scratch.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let backups = e.scratch.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    std::fs::set_permissions(
        &backups,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    e.repo.write(
        "runtimes-psql.toml",
        "[runtime.psql]\ndrivers = [\"process\"]\nstart = \"sh ./run.sh\"\nport = 8080\n",
    );
    let app = e.app("dbapp", "psql", 1, &files("v1"));
    let canary = format!("canary-{}", e.installation);
    let ct = cairn_schema::secret::encrypt(canary.as_bytes(), &[e.recipient()]).unwrap();
    e.repo.write(
        &format!("app-{}.toml", app.name),
        &format!(
            "[app.{n}]\nplan = \"small\"\nruntime = \"psql\"\nreplicas = 1\n\
             health = {{ path = \"/healthz\", timeout = \"2s\" }}\n\
             databases = {{ main = \"DATABASE_URL\" }}\nplacement = {{ labels = {{ app = \"yes\" }} }}\n\n\
             [app.{n}.source]\nurl = \"{u}\"\nbranch = \"main\"\n\n\
             [app.{n}.env]\nCANARY = {{ secret = \"\"\"\n{ct}\"\"\" }}\n",
            n = app.name,
            u = app.source.url,
            ct = ct.as_str()
        ),
    );
    e.repo.write("databases.toml", &database("n1", &backups));
    e.repo.node("n1", "");
    e.repo.node("n2", "labels = { app = \"yes\" }\n");
    let plane = e.start(&["--node-offline-after", "6s"]).await;
    let n1 = e.agent(&plane, "n1", Driver::Process, &[]).await;
    let n2 = e.agent(&plane, "n2", Driver::Process, &[]).await;

    // The app writes its 1,000 rows through the URL it was given.
    let count = |proxy| {
        let host = app.host.clone();
        async move {
            match get(proxy, &host, "/count").await {
                Ok((200, body)) => Some(body.trim().to_owned()),
                _ => None,
            }
        }
    };
    let first = wait_for("the app counts its rows", WAIT, || count(n2.proxy)).await;
    assert_eq!(first, "1000");

    // A backup now: the file's SHA-256 is the ledger's.
    let out = plane.cairn(&["db", "backup", "main"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = wait_for("the backup is recorded", WAIT, || async {
        let rows = plane
            .rows("SELECT state, object, sha256, bytes, error FROM database_backups ORDER BY id DESC LIMIT 1")
            .await;
        let r = rows.into_iter().next()?;
        assert_ne!(r["state"], "failed", "the backup failed: {r}");
        (r["state"] == "ok").then_some(r)
    })
    .await;
    let path = backups.join(row["object"].as_str().unwrap());
    let sum = std::process::Command::new("sha256sum")
        .arg(&path)
        .output()
        .unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(
        sum.split_whitespace().next(),
        row["sha256"].as_str(),
        "coreutils' sha256sum of the file"
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().len() as i64,
        row["bytes"].as_i64().unwrap()
    );

    // Restore beside the original and swap: the app is released again and finds the restored rows.
    let out = plane.cairn(&[
        "db",
        "restore",
        "main",
        "--latest",
        "--into",
        "main-restored",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the restore is done", WAIT, || async {
        let rows = plane
            .rows("SELECT status FROM tasks WHERE kind = 'db_restore' ORDER BY id DESC LIMIT 1")
            .await;
        let s = rows.first()?["status"].as_str()?.to_owned();
        assert_ne!(s, "dead", "the restore failed");
        (s == "done").then_some(())
    })
    .await;
    let before = release_count(&plane, &app.name).await;
    let out = plane.cairn(&["db", "swap", "main", "main-restored"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the swap releases the app", WAIT, || async {
        (release_count(&plane, &app.name).await > before).then_some(())
    })
    .await;
    // Counted by the new release's replica, not the one it replaces.
    let newest = release_count(&plane, &app.name).await;
    plane.wait_release(&app.name, newest, "live", WAIT).await;
    wait_for(
        "the app on the restored instance counts 1000",
        WAIT,
        || async { (count(n2.proxy).await.as_deref() == Some("1000")).then_some(()) },
    )
    .await;

    // Rotate: a new login; the app keeps working with it.
    let before = release_count(&plane, &app.name).await;
    let out = plane.cairn(&["db", "rotate", "main"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the rotation releases the app", WAIT, || async {
        (release_count(&plane, &app.name).await > before).then_some(())
    })
    .await;
    // Counted by the new release's replica, not the one it replaces.
    let newest = release_count(&plane, &app.name).await;
    plane.wait_release(&app.name, newest, "live", WAIT).await;
    wait_for("the app works after the rotation", WAIT, || async {
        (count(n2.proxy).await.as_deref() == Some("1000")).then_some(())
    })
    .await;

    // The database's node is lost: unavailable with its recovery point, nothing rescheduled.
    n1.kill();
    let listed = wait_for("the database is unavailable", WAIT, || async {
        let out = plane.cairn(&["db", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let d = v.as_array()?.first()?.clone();
        (d["available"] == false).then_some(d)
    })
    .await;
    assert!(listed["last_good_backup"].is_string(), "{listed}");
    assert_eq!(listed["node"], "n1", "never rescheduled empty");

    // A commit moving it plus `restore --latest` brings the rows back on n2.
    let generation = plane.generation().await;
    e.repo.write("databases.toml", &database("n2", &backups));
    e.repo.commit();
    plane.wait_generation(generation + 1).await;
    let out = plane.cairn(&["db", "restore", "main", "--latest"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the moved database has its rows back", WAIT, || async {
        (count(n2.proxy).await.as_deref() == Some("1000")).then_some(())
    })
    .await;

    // The canary and the database's passwords: in no dump of the control plane's database, no log.
    let plan = plane.cairn(&["plan"]);
    let text = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(!text.contains(&canary));
    for (path, log) in e.logs() {
        assert!(
            !log.contains(&canary),
            "the canary is in {}",
            path.display()
        );
        assert!(
            !log.contains("postgres://app:"),
            "a database URL is in {}",
            path.display()
        );
    }
    drop(n2);
}
