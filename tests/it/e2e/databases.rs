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
//! The second test runs the same shape, shorter, with Redis (backed up to a directory) and MariaDB
//! (backed up to S3: moto on 127.0.0.1), and makes the S3 target fail. The third changes `version`:
//! an upgrade into a new instance, the app released onto it, `cairn db finish-upgrade` dropping the old.

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

/// The directories a test's databases need: the scratch directory passable by the engines' accounts
/// (their instances live below it, under `<data-dir>-databases`, as they would below /var/lib), and a
/// backups directory every account may write. Returns the backups directory.
fn database_dirs(e: &E2e) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(e.scratch.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let backups = e.scratch.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    std::fs::set_permissions(&backups, std::fs::Permissions::from_mode(0o777)).unwrap();
    backups
}

/// `cairn ARGS` against the plane's database, which must succeed.
fn cairn_ok(plane: &super::support::Plane, args: &[&str]) {
    let out = plane.cairn(args);
    assert!(
        out.status.success(),
        "cairn {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the app serves at `/count` through `proxy`, once it answers.
async fn served_count(proxy: std::net::SocketAddr, host: &str) -> Option<String> {
    match get(proxy, host, "/count").await {
        Ok((200, body)) => Some(body.trim().to_owned()),
        _ => None,
    }
}

/// Runs `cairn ARGS`, which must release `app` again, and waits for that release to be live.
async fn releases_again(plane: &super::support::Plane, app: &str, args: &[&str]) {
    let before = release_count(plane, app).await;
    cairn_ok(plane, args);
    wait_for(
        &format!("`cairn {}` releases the app", args.join(" ")),
        WAIT,
        || async { (release_count(plane, app).await > before).then_some(()) },
    )
    .await;
    // What the test reads next comes from the new release's replica, not the one it replaces.
    let newest = release_count(plane, app).await;
    plane.wait_release(app, newest, "live", WAIT).await;
}

/// Restores `db`'s latest backup into a new instance `into` beside the original, then swaps it in.
async fn restore_beside_and_swap(plane: &super::support::Plane, app: &str, db: &str, into: &str) {
    cairn_ok(plane, &["db", "restore", db, "--latest", "--into", into]);
    wait_for(&format!("the restore of {db}"), WAIT, || async {
        let rows = plane
            .rows("SELECT status FROM tasks WHERE kind = 'db_restore' ORDER BY id DESC LIMIT 1")
            .await;
        let s = rows.first()?["status"].as_str()?.to_owned();
        assert_ne!(s, "dead", "the restore of {db} failed");
        (s == "done").then_some(())
    })
    .await;
    releases_again(plane, app, &["db", "swap", db, into]).await;
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
    let backups = database_dirs(&e);
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
    // n1 runs its databases in containers (the Docker driver's way) of a PostgreSQL image made offline
    // from this machine's packages; n2, where the database moves later, as processes.
    let label = e.installation.to_string();
    let Some(image) = cairn_testkit::dbimage::postgres(TEST, &label) else {
        return;
    };
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            cairn_testkit::dbimage::remove(&self.0, &self.1);
        }
    }
    let _cleanup = Cleanup(image.clone(), label);
    let plane = e.start(&["--node-offline-after", "6s"]).await;
    let postgres_image = format!("postgres={image}");
    let n1 = e
        .agent(
            &plane,
            "n1",
            Driver::Process,
            &[
                "--database-runtime",
                "docker",
                "--database-image",
                &postgres_image,
            ],
        )
        .await;
    let n2 = e.agent(&plane, "n2", Driver::Process, &[]).await;

    // The app writes its 1,000 rows through the URL it was given.
    let count = |proxy| served_count(proxy, &app.host);
    let first = wait_for("the app counts its rows", WAIT, || count(n2.proxy)).await;
    assert_eq!(first, "1000");

    // A backup now: the file's SHA-256 is the ledger's.
    cairn_ok(&plane, &["db", "backup", "main"]);
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

    // Verified: restored into a scratch server on n1, its rows those the backup recorded at the dump.
    cairn_ok(&plane, &["db", "verify", "main"]);
    let verified = wait_for("the verification is recorded", WAIT, || async {
        let rows = plane
            .rows("SELECT state, counts, error, backup FROM database_verifications ORDER BY id DESC LIMIT 1")
            .await;
        let r = rows.into_iter().next()?;
        assert_ne!(r["state"], "failed", "the verification failed: {r}");
        (r["state"] == "ok").then_some(r)
    })
    .await;
    let restored_rows: u64 = verified["counts"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert_eq!(restored_rows, 1000, "{verified}");
    let listed = plane.cairn(&["db", "backups", "main"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("rows at the dump: 1000"), "{listed}");
    assert!(listed.contains("verification: ok"), "{listed}");
    let volume = format!("cairn-db-{}-main", e.installation);
    let inspect = |what: &str| {
        std::process::Command::new("docker")
            .args(["volume", "inspect", what])
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        inspect(&volume),
        "the database's data is in the volume {volume}"
    );
    assert!(
        !inspect(&format!("{volume}.verify")),
        "the scratch server's volume is left"
    );
    assert!(
        !e.scratch
            .path()
            .join("agent-n1-databases/main.verify")
            .exists()
    );

    // Restore beside the original and swap: the app is released again and finds the restored rows.
    restore_beside_and_swap(&plane, &app.name, "main", "main-restored").await;
    wait_for(
        "the app on the restored instance counts 1000",
        WAIT,
        || async { (count(n2.proxy).await.as_deref() == Some("1000")).then_some(()) },
    )
    .await;

    // Rotate: a new login; the app keeps working with it.
    releases_again(&plane, &app.name, &["db", "rotate", "main"]).await;
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
    cairn_ok(&plane, &["db", "restore", "main", "--latest"]);
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

/// The app of the Redis and MariaDB test: serves at once, waits for both databases, seeds each only when
/// it is new (100 keys beside a `seeded` marker; 100 rows), then serves both counts: `100 101`.
fn two_engines_sh() -> String {
    "/bin/busybox httpd -f -p 127.0.0.1:$PORT -h www &\n\
     rm -f www/count\n\
     u=${STORE_URL#mysql://}; user=${u%%:*}; rest=${u#*:}; pw=${rest%%@*}; hp=${rest#*@}\n\
     hostport=${hp%%/*}; db=${hp#*/}; host=${hostport%:*}; port=${hostport##*:}\n\
     m() { mariadb -h \"$host\" -P \"$port\" -u \"$user\" -p\"$pw\" \"$db\" \"$@\"; }\n\
     r() { redis-cli --no-auth-warning -u \"$CACHE_URL\" \"$@\"; }\n\
     n=0; until m -e 'SELECT 1' >/dev/null 2>&1; do n=$((n+1)); [ $n = 25 ] && m -e 'SELECT 1'; sleep 0.2; done\n\
     n=0; until r PING 2>/dev/null | grep -q PONG; do n=$((n+1)); [ $n = 25 ] && r PING; sleep 0.2; done\n\
     if m -e 'CREATE TABLE items (i int PRIMARY KEY)' >/dev/null 2>&1; then\n\
       m -e 'INSERT INTO items SELECT seq FROM seq_1_to_100'\n\
     fi\n\
     if [ \"$(r SETNX seeded 1)\" = 1 ]; then\n\
       seq 1 100 | sed 's/.*/SET k& v&/' | r >/dev/null\n\
     fi\n\
     echo \"$(m -N -e 'SELECT count(*) FROM items') $(r DBSIZE)\" > www/count.tmp && mv www/count.tmp www/count\n\
     wait\n"
        .to_owned()
}

/// A Redis database backed up to a directory and a MariaDB one to S3 (moto on 127.0.0.1, its endpoint
/// and keys as age secrets), both on n1, attached to one app on n2. Each is backed up (the object's
/// SHA-256 is the ledger's), restored beside the original and swapped in: the app, released again,
/// counts what came back from the backups. Then the S3 target stops answering: the backup row says why
/// and the database is red in `cairn db list` and `cairn status`. The S3 secret key appears in no log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_and_mariadb_back_up_to_a_directory_and_s3_restore_and_swap() {
    const TEST: &str = "redis_and_mariadb_back_up_to_a_directory_and_s3_restore_and_swap";
    for bin in [
        "/usr/bin/redis-server",
        "/usr/bin/redis-cli",
        "/usr/sbin/mariadbd",
        "/usr/bin/mariadb",
        "/usr/bin/mariadb-dump",
    ] {
        if !std::path::Path::new(bin).is_file() {
            cairn_testkit::skip::missing(TEST, "Debian's Redis and MariaDB servers", bin);
            return;
        }
    }
    let Some(mut e) = E2e::new(TEST, &[Driver::Process]).await else {
        return;
    };
    let Some(mut moto) = cairn_testkit::s3::Moto::start(TEST, e.scratch.path()).await else {
        return;
    };
    moto.create_bucket("backups").await;
    let backups = database_dirs(&e);
    let s3_secret = format!("s3-secret-canary-{}", e.installation);
    let secret = |key: &str, value: &str| {
        let ct = cairn_schema::secret::encrypt(value.as_bytes(), &[e.recipient()]).unwrap();
        format!("{key} = {{ secret = \"\"\"\n{}\"\"\" }}\n", ct.as_str())
    };
    e.repo.write(
        "databases.toml",
        &format!(
            "[database.cache]\nengine = \"redis\"\nversion = \"7\"\nplan = \"small\"\nnode = \"n1\"\n\
             backup = {{ schedule = \"0 3 * * *\", keep = 5, to = \"dir:{dir}\" }}\n\n\
             [database.store]\nengine = \"mariadb\"\nversion = \"10.11\"\nplan = \"small\"\nnode = \"n1\"\n\n\
             [database.store.backup]\nschedule = \"0 3 * * *\"\nkeep = 5\nto = \"s3://backups/nightly\"\n\
             endpoint = \"{endpoint}\"\nregion = \"{region}\"\n{id}{key}",
            dir = backups.display(),
            endpoint = moto.endpoint,
            region = cairn_testkit::s3::Moto::REGION,
            id = secret("access_key_id", cairn_testkit::s3::Moto::ACCESS_KEY_ID),
            key = secret("secret_access_key", &s3_secret),
        ),
    );
    e.repo.write(
        "runtimes-engines.toml",
        "[runtime.engines]\ndrivers = [\"process\"]\nstart = \"sh ./run.sh\"\nport = 8080\n",
    );
    let app = e.app(
        "twodb",
        "engines",
        1,
        &[
            ("run.sh", two_engines_sh()),
            ("www/healthz", "ok\n".to_owned()),
        ],
    );
    e.repo.write(
        &format!("app-{}.toml", app.name),
        &format!(
            "[app.{n}]\nplan = \"small\"\nruntime = \"engines\"\nreplicas = 1\n\
             health = {{ path = \"/healthz\", timeout = \"2s\" }}\n\
             databases = {{ cache = \"CACHE_URL\", store = \"STORE_URL\" }}\n\
             placement = {{ labels = {{ app = \"yes\" }} }}\n\n\
             [app.{n}.source]\nurl = \"{u}\"\nbranch = \"main\"\n",
            n = app.name,
            u = app.source.url,
        ),
    );
    e.repo.node("n1", "");
    e.repo.node("n2", "labels = { app = \"yes\" }\n");
    let plane = e.start(&[]).await;
    let _n1 = e.agent(&plane, "n1", Driver::Process, &[]).await;
    let n2 = e.agent(&plane, "n2", Driver::Process, &[]).await;
    let count = |proxy| served_count(proxy, &app.host);
    let first = wait_for("the app counts keys and rows", WAIT, || count(n2.proxy)).await;
    assert_eq!(first, "100 101");

    // A backup of each now: the directory's file and the S3 object have the ledger's SHA-256.
    let backed_up = |db: &'static str| {
        let plane = &plane;
        async move {
            cairn_ok(plane, &["db", "backup", db]);
            wait_for(&format!("the backup of {db}"), WAIT, || async {
                let rows = plane
                    .rows(&format!(
                        "SELECT state, object, sha256, bytes, error FROM database_backups \
                         WHERE database = '{db}' ORDER BY id DESC LIMIT 1"
                    ))
                    .await;
                let r = rows.into_iter().next()?;
                assert_ne!(r["state"], "failed", "the backup of {db} failed: {r}");
                (r["state"] == "ok").then_some(r)
            })
            .await
        }
    };
    // coreutils' sha256sum of a file.
    let sha256 = |path: &std::path::Path| {
        let out = std::process::Command::new("sha256sum")
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let cache = backed_up("cache").await;
    let file = backups.join(cache["object"].as_str().unwrap());
    assert_eq!(Some(sha256(&file).as_str()), cache["sha256"].as_str());
    let store = backed_up("store").await;
    let object = reqwest::get(format!(
        "{}/backups/nightly/{}",
        moto.endpoint,
        store["object"].as_str().unwrap()
    ))
    .await
    .unwrap();
    assert_eq!(object.status(), 200);
    let object = object.bytes().await.unwrap();
    assert_eq!(object.len() as i64, store["bytes"].as_i64().unwrap());
    let fetched = e.scratch.path().join("store-object");
    std::fs::write(&fetched, &object).unwrap();
    assert_eq!(Some(sha256(&fetched).as_str()), store["sha256"].as_str());

    // Each restored beside its original and swapped in: the app counts what came from the backups.
    for db in ["cache", "store"] {
        restore_beside_and_swap(&plane, &app.name, db, &format!("{db}-restored")).await;
    }
    let instances = plane
        .rows("SELECT name, instance FROM databases ORDER BY name")
        .await;
    assert_eq!(instances[0]["instance"], "cache-restored", "{instances:?}");
    assert_eq!(instances[1]["instance"], "store-restored", "{instances:?}");
    wait_for("the app on the restored instances counts", WAIT, || async {
        (count(n2.proxy).await.as_deref() == Some("100 101")).then_some(())
    })
    .await;

    // The S3 target stops answering: the row says why, and the database is red.
    moto.stop();
    cairn_ok(&plane, &["db", "backup", "store"]);
    let failed = wait_for("the backup to S3 fails for good", WAIT, || async {
        let rows = plane
            .rows(
                "SELECT state, error FROM database_backups WHERE database = 'store' \
                 ORDER BY id DESC LIMIT 1",
            )
            .await;
        let r = rows.into_iter().next()?;
        (r["state"] == "failed").then_some(r)
    })
    .await;
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(!why.is_empty(), "the row says why: {failed}");
    assert!(!why.contains(&s3_secret), "{why}");
    let out = plane.cairn(&["db", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let store = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "store")
        .unwrap();
    assert_eq!(store["backup_overdue"], true, "{store}");
    let status = plane.cairn(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        status.contains("store") && status.contains("last backup failed"),
        "{status}"
    );
    for (path, log) in e.logs() {
        assert!(
            !log.contains(&s3_secret),
            "the S3 secret key is in {}",
            path.display()
        );
    }
}

/// The full release the PostgreSQL 15 binaries report (`15.18`).
fn pg_release() -> String {
    let out = std::process::Command::new(std::path::Path::new(PG_BIN).join("postgres"))
        .arg("--version")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap()
        .to_owned()
}

/// Issue 18's upgrade end to end: a commit changing `version` from `15` to the release the installed
/// binaries report (only PostgreSQL 15 is installed, so this is not a real major upgrade) makes the
/// database's node dump its instance into a new one beside it; the app is released onto the new
/// instance and finds its 1,000 rows there (it seeds only an empty database); the old instance's data
/// is kept until `cairn db finish-upgrade`, which deletes it; the current instance cannot be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_change_upgrades_the_database_beside_the_old_one_until_finished() {
    const TEST: &str = "a_version_change_upgrades_the_database_beside_the_old_one_until_finished";
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
    let backups = database_dirs(&e);
    e.repo.write(
        "runtimes-psql.toml",
        "[runtime.psql]\ndrivers = [\"process\"]\nstart = \"sh ./run.sh\"\nport = 8080\n",
    );
    let app = e.app("dbapp", "psql", 1, &files("v1"));
    e.repo.write(
        &format!("app-{}.toml", app.name),
        &format!(
            "[app.{n}]\nplan = \"small\"\nruntime = \"psql\"\nreplicas = 1\n\
             health = {{ path = \"/healthz\", timeout = \"2s\" }}\n\
             databases = {{ main = \"DATABASE_URL\" }}\n\n\
             [app.{n}.source]\nurl = \"{u}\"\nbranch = \"main\"\n",
            n = app.name,
            u = app.source.url,
        ),
    );
    e.repo.write("databases.toml", &database("n1", &backups));
    e.repo.node("n1", "");
    let plane = e.start(&[]).await;
    let n1 = e.agent(&plane, "n1", Driver::Process, &[]).await;
    let count = |proxy| served_count(proxy, &app.host);
    let first = wait_for("the app counts its rows", WAIT, || count(n1.proxy)).await;
    assert_eq!(first, "1000");
    let releases = release_count(&plane, &app.name).await;

    let release = pg_release();
    let generation = plane.generation().await;
    e.repo.write(
        "databases.toml",
        &database("n1", &backups).replace("version = \"15\"", &format!("version = \"{release}\"")),
    );
    e.repo.commit();
    plane.wait_generation(generation + 1).await;
    let row = wait_for("the upgrade ends", WAIT, || async {
        let rows = plane
            .rows("SELECT state, detail, error, from_instance, to_instance FROM database_upgrades")
            .await;
        let r = rows.into_iter().next()?;
        assert_ne!(r["state"], "failed", "the upgrade failed: {r}");
        (r["state"] == "ok").then_some(r)
    })
    .await;
    assert_eq!(row["from_instance"], "main");
    assert_eq!(row["to_instance"], "main-v2");
    assert!(
        row["detail"].as_str().unwrap().contains("counts equal"),
        "{row}"
    );
    // The app is released onto the new instance and finds the rows the upgrade carried over.
    wait_for(
        "the app is released onto the new instance",
        WAIT,
        || async { (release_count(&plane, &app.name).await > releases).then_some(()) },
    )
    .await;
    let newest = release_count(&plane, &app.name).await;
    plane.wait_release(&app.name, newest, "live", WAIT).await;
    wait_for("the upgraded database counts 1000", WAIT, || async {
        (count(n1.proxy).await.as_deref() == Some("1000")).then_some(())
    })
    .await;
    let listed = plane.cairn(&["db", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v[0]["instance"], "main-v2", "{v}");
    assert_eq!(v[0]["upgrade"]["state"], "ok", "{v}");
    let text = String::from_utf8_lossy(&plane.cairn(&["db", "list"]).stdout).into_owned();
    assert!(
        text.contains(&format!("upgrade 15 -> {release} done"))
            && text.contains("`cairn db finish-upgrade main` drops it"),
        "{text}"
    );
    let text =
        String::from_utf8_lossy(&plane.cairn(&["db", "upgrades", "main"]).stdout).into_owned();
    assert!(text.contains("(main -> main-v2) on n1: ok"), "{text}");

    // The pre-upgrade instance is stopped with its data kept; the current one is never dropped.
    let dbs = {
        let mut name = n1.dir.as_os_str().to_owned();
        name.push("-databases");
        std::path::PathBuf::from(name)
    };
    wait_for("the old instance is stopped", WAIT, || async {
        let rows = plane
            .rows("SELECT status FROM tasks WHERE kind = 'db_stop' ORDER BY id DESC LIMIT 1")
            .await;
        (rows.first()?["status"] == "done").then_some(())
    })
    .await;
    assert!(!dbs.join("main/data/postmaster.pid").exists(), "stopped");
    assert!(dbs.join("main/data/PG_VERSION").is_file(), "its data kept");
    let refused = plane.cairn(&["db", "drop", "main", "main-v2"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("current instance"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    cairn_ok(&plane, &["db", "finish-upgrade", "main"]);
    wait_for("the pre-upgrade instance is dropped", WAIT, || async {
        let rows = plane
            .rows("SELECT state FROM database_instances WHERE name = 'main'")
            .await;
        (rows.first()?["state"] == "dropped").then_some(())
    })
    .await;
    assert!(!dbs.join("main").exists(), "its data deleted");
    let text =
        String::from_utf8_lossy(&plane.cairn(&["db", "upgrades", "main"]).stdout).into_owned();
    assert!(text.contains("on n1: finished"), "{text}");
    assert!(dbs.join("main-v2/data/PG_VERSION").is_file());
    assert_eq!(count(n1.proxy).await.as_deref(), Some("1000"));
    for (path, log) in e.logs() {
        assert!(
            !log.contains("postgres://app:"),
            "a database URL is in {}",
            path.display()
        );
    }
    drop(n1);
}
