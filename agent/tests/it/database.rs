//! Managed databases on a node (`cairn_agent::database`) with the real servers: Debian's PostgreSQL (the highest installed),
//! `redis-server` and `mariadbd`, their own clients writing the data, backups to a directory and to an
//! S3-compatible server (moto on 127.0.0.1), restores into a second instance compared by counts.
//!
//! Every password is a canary holding the characters that break quoting (`' " \ % @ : /`); the tests
//! check it reaches no error, no server log and no process's command line.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cairn_agent::database::{
    self, Backup, Container, DbError, Instance, Login, Runtime, S3Access, Target,
};
use cairn_schema::Secret;
use cairn_schema::database::{BackupTo, Engine};
use cairn_testkit::s3::Moto;
use object_store::ObjectStore as _;
use sha2::{Digest as _, Sha256};

/// The S3 secret key the tests use: a canary like the passwords.
const S3_SECRET: &str = "s3-secret-canary-7f3b9e";

fn has_binaries(test: &str, engine: Engine) -> bool {
    let (what, exe) = match engine {
        Engine::Postgres => (
            "PostgreSQL server binaries (Debian: postgresql)",
            "/usr/lib/postgresql",
        ),
        Engine::Redis => (
            "redis-server (Debian: redis-server)",
            "/usr/bin/redis-server",
        ),
        Engine::Mariadb => ("mariadbd (Debian: mariadb-server)", "/usr/sbin/mariadbd"),
    };
    if Path::new(exe).exists() {
        true
    } else {
        cairn_testkit::missing(test, what, format!("{exe} is missing"));
        false
    }
}

/// The installed version of each engine (the highest PostgreSQL in /usr/lib/postgresql).
fn version(engine: Engine) -> String {
    let reported = |exe: &str, marker: &str| -> String {
        let out = std::process::Command::new(exe)
            .arg("--version")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let word = text
            .split_whitespace()
            .skip_while(|w| !w.starts_with(marker))
            .find_map(|w| w.strip_prefix(marker).filter(|v| !v.is_empty()))
            .or_else(|| text.split_whitespace().skip_while(|w| *w != marker).nth(1))
            .unwrap()
            .to_owned();
        // Major.minor: what a manifest would pin.
        word.split(['.', '-']).take(2).collect::<Vec<_>>().join(".")
    };
    match engine {
        Engine::Postgres => pg_bin()
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        Engine::Redis => reported("redis-server", "v="),
        Engine::Mariadb => reported("mariadbd", "Ver"),
    }
}

/// `/usr/lib/postgresql/<highest>/bin`.
fn pg_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server").1
}

/// A canary password with every character that breaks naive quoting.
fn canary(tag: &str) -> String {
    let n: u64 = rand::random();
    format!("cAn4ry-{tag}-{n:x}'\"\\ %@:/;$")
}

/// A scratch directory the database servers' own accounts can reach (tempdirs are 0700).
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An instance under `root`; dropping the guard kills its server whatever happened.
struct Db {
    inst: Instance,
}

impl Drop for Db {
    fn drop(&mut self) {
        for pidfile in [
            self.inst.dir.join("data/postmaster.pid"),
            self.inst.dir.join("redis.pid"),
            self.inst.dir.join("mariadbd.pid"),
        ] {
            if let Some(p) = pid_in(&pidfile).and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

fn pid_in(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn db(engine: Engine, root: &Path, name: &str) -> Db {
    Db {
        inst: Instance {
            name: name.parse().unwrap(),
            engine,
            version: version(engine),
            dir: root.join(name),
            port: free_port(),
            runtime: Runtime::Process,
        },
    }
}

fn login(password: &str) -> Login {
    Login {
        user: "shop".into(),
        password: Secret::new(password.as_bytes().to_vec()),
        database: "shopdb".into(),
    }
}

fn redis_login(password: &str) -> Login {
    Login {
        database: "0".into(),
        ..login(password)
    }
}

fn login_for(engine: Engine, password: &str) -> Login {
    if engine == Engine::Redis {
        redis_login(password)
    } else {
        login(password)
    }
}

/// Runs the engine's own client as the app would: the password in the environment, the input on stdin.
fn client(inst: &Instance, login: &Login, input: &str) -> Result<String, String> {
    use std::io::Write as _;
    let pw = login.password.expose_str().unwrap();
    let port = inst.port.to_string();
    let mut cmd = match inst.engine {
        Engine::Postgres => {
            let mut c = std::process::Command::new(pg_bin().join("psql"));
            c.args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args(["-p", &port, "-U", &login.user, "-d", &login.database])
            .env("PGPASSWORD", pw);
            c
        }
        Engine::Redis => {
            let mut c = std::process::Command::new("redis-cli");
            c.args(["-h", "127.0.0.1", "-p", &port, "--user", &login.user])
                .args(["--no-auth-warning"])
                .env("REDISCLI_AUTH", pw);
            c
        }
        Engine::Mariadb => {
            let mut c = std::process::Command::new("mariadb");
            c.args([
                "--no-defaults",
                "--protocol=tcp",
                "-h",
                "127.0.0.1",
                "-P",
                &port,
            ])
            .args(["-u", &login.user, "-D", &login.database, "--batch"])
            .args(["--skip-column-names"])
            .env("MYSQL_PWD", pw);
            c
        }
    };
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // redis-cli exits 0 on a refused AUTH or connection; its output says so.
    let refused = ["WRONGPASS", "NOAUTH", "Could not connect"];
    if out.status.success() && !refused.iter().any(|r| text.contains(r)) {
        Ok(text)
    } else {
        Err(text)
    }
}

/// 1,000 rows (or keys) written by the engine's own client.
fn write_data(inst: &Instance, login: &Login) {
    let input = match inst.engine {
        Engine::Postgres => "CREATE TABLE items (id int PRIMARY KEY, body text);\n\
                             INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 1000) g;\n\
                             CREATE TABLE notes (id int);\nINSERT INTO notes VALUES (1), (2), (3);\n"
            .to_owned(),
        Engine::Mariadb => {
            let mut s = "CREATE TABLE items (id int PRIMARY KEY, body text);\n\
                         CREATE TABLE notes (id int);\nINSERT INTO notes VALUES (1), (2), (3);\n"
                .to_owned();
            for chunk in (1..=1000).collect::<Vec<_>>().chunks(250) {
                let values: Vec<String> =
                    chunk.iter().map(|i| format!("({i}, md5('{i}'))")).collect();
                s.push_str(&format!("INSERT INTO items VALUES {};\n", values.join(",")));
            }
            s
        }
        Engine::Redis => (1..=1000)
            .map(|i| format!("SET item:{i} body-{i}\n"))
            .collect(),
    };
    client(inst, login, &input).expect("the app's client writes its data");
}

fn expected_counts(engine: Engine) -> BTreeMap<String, u64> {
    match engine {
        Engine::Postgres => [("public.items".into(), 1000), ("public.notes".into(), 3)].into(),
        Engine::Mariadb => [("items".into(), 1000), ("notes".into(), 3)].into(),
        Engine::Redis => [("db0".into(), 1000)].into(),
    }
}

fn s3_target(moto: &Moto, bucket: &str) -> Target {
    Target {
        to: BackupTo::S3 {
            bucket: bucket.into(),
            prefix: "nightly".into(),
        },
        s3: Some(S3Access {
            endpoint: Some(moto.endpoint.clone()),
            region: Moto::REGION.into(),
            access_key_id: Secret::new(Moto::ACCESS_KEY_ID.as_bytes().to_vec()),
            secret_access_key: Secret::new(S3_SECRET.as_bytes().to_vec()),
        }),
    }
}

fn dir_target(dir: &Path) -> Target {
    Target {
        to: BackupTo::Dir {
            path: dir.to_string_lossy().into_owned(),
        },
        s3: None,
    }
}

async fn s3_object(moto: &Moto, bucket: &str, key: &str) -> Vec<u8> {
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(Moto::REGION)
        .with_endpoint(&moto.endpoint)
        .with_allow_http(true)
        .with_access_key_id(Moto::ACCESS_KEY_ID)
        .with_secret_access_key(S3_SECRET)
        .build()
        .unwrap();
    store
        .get(&object_store::path::Path::from(key))
        .await
        .unwrap_or_else(|e| panic!("s3://{bucket}/{key}: {e}"))
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Watches every process's command line while the test runs, recording any that holds a canary.
struct ArgvWatch {
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ArgvWatch {
    fn start(canaries: Vec<String>) -> ArgvWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (s, h) = (stop.clone(), hits.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Ok(argv) = std::fs::read(entry.path().join("cmdline")) else {
                        continue;
                    };
                    let argv = String::from_utf8_lossy(&argv);
                    for c in &canaries {
                        if argv.contains(c.as_str()) {
                            h.lock().unwrap().push(argv.replace('\0', " "));
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        ArgvWatch {
            stop,
            hits,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.hits.lock().unwrap().clone()
    }
}

/// No canary in any file under `dir` that a server or the agent wrote as text (logs, configs).
fn assert_no_canary_in_logs(dir: &Path, canaries: &[String]) {
    for entry in walk(dir) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".log") || name.ends_with(".conf") || name.ends_with(".acl") {
            let text = String::from_utf8_lossy(&std::fs::read(&entry).unwrap()).into_owned();
            for c in canaries {
                assert!(
                    !text.contains(c.as_str()),
                    "a password is in {}",
                    entry.display()
                );
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn assert_clean(e: &DbError, canaries: &[String]) {
    let text = e.to_string();
    for c in canaries {
        assert!(!text.contains(c.as_str()), "a secret in the error: {text}");
    }
    assert!(
        !text.contains(S3_SECRET),
        "the S3 secret key in the error: {text}"
    );
}

/// The whole life of one engine's database: ensure, the app's writes, backups to a directory and to S3
/// (objects there, checksums equal to what the backup reports), a restore into a second instance with
/// equal counts, a wrong checksum refused before anything is restored, and no canary anywhere.
async fn backup_and_restore_round_trip(engine: Engine) {
    let test = cairn_testkit::current_test();
    if !has_binaries(&test, engine) {
        return;
    }
    let root = scratch();
    let Some(moto) = Moto::start(&test, root.path()).await else {
        return;
    };
    moto.create_bucket("backups").await;
    let pw = canary("app");
    let restore_pw = canary("restore");
    let canaries = vec![pw.clone(), restore_pw.clone(), S3_SECRET.to_owned()];
    let watch = ArgvWatch::start(canaries.clone());

    let original = db(engine, root.path(), "orders");
    let app = login_for(engine, &pw);
    database::ensure(&original.inst, &app).await.unwrap();
    write_data(&original.inst, &app);
    let counts = database::counts(&original.inst, &app).await.unwrap();
    assert_eq!(counts, expected_counts(engine));

    // To a directory: the object is there under its name, with the checksum the backup reports.
    let dir = root.path().join("backups");
    let to_dir = dir_target(&dir);
    let at_dir: Backup = database::backup(&original.inst, &app, &to_dir, "orders/1.dump")
        .await
        .unwrap();
    let bytes = std::fs::read(dir.join("orders/1.dump")).unwrap();
    assert_eq!(at_dir.object, "orders/1.dump");
    assert_eq!(
        at_dir.counts.as_ref(),
        Some(&counts),
        "a backup of a quiet database records its counts"
    );
    assert_eq!(at_dir.bytes, bytes.len() as u64);
    assert_eq!(at_dir.sha256, sha(&bytes));
    assert!(
        bytes.len() > 1000,
        "a dump of 1,000 rows: {} bytes",
        bytes.len()
    );
    let leftovers: Vec<_> = walk(&dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // To S3: the same.
    let to_s3 = s3_target(&moto, "backups");
    let at_s3 = database::backup(&original.inst, &app, &to_s3, "orders/2.dump")
        .await
        .unwrap();
    let object = s3_object(&moto, "backups", "nightly/orders/2.dump").await;
    assert_eq!(at_s3.bytes, object.len() as u64);
    assert_eq!(at_s3.sha256, sha(&object));

    // A wrong checksum is refused, and the instance stays empty.
    let refused = db(engine, root.path(), "refused");
    let restore_login = login_for(engine, &restore_pw);
    database::ensure(&refused.inst, &restore_login)
        .await
        .unwrap();
    let wrong = sha(b"not the dump");
    let e = database::restore(
        &refused.inst,
        &restore_login,
        &to_s3,
        "orders/2.dump",
        &wrong,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("refusing"), "{e}");
    assert!(e.to_string().contains(&wrong), "{e}");
    assert_clean(&e, &canaries);
    let after = database::counts(&refused.inst, &restore_login)
        .await
        .unwrap();
    assert!(
        after.values().all(|n| *n == 0),
        "restored anyway: {after:?}"
    );

    // From S3 into a new instance (its own login and password): the counts are the original's, and
    // the data is the app login's to use. From the directory into another: equal too.
    let copy = restored(&root, engine, "orders-copy", &restore_login, &to_s3, &at_s3).await;
    let copy2 = restored(
        &root,
        engine,
        "orders-copy2",
        &restore_login,
        &to_dir,
        &at_dir,
    )
    .await;

    // Verification: each backup restored into a scratch server beside the instance, its counts the
    // dump's; the scratch server is gone afterwards, whatever the outcome.
    let scratch = db(engine, root.path(), "orders-verify");
    let scratch_login = login_for(engine, &canary("scratch"));
    for (from, b) in [(&to_dir, &at_dir), (&to_s3, &at_s3)] {
        let v = database::verify(
            &scratch.inst,
            &scratch_login,
            from,
            &b.object,
            &b.sha256,
            b.counts.as_ref(),
        )
        .await
        .unwrap();
        assert_eq!(v.counts, counts);
        assert_eq!(v.bytes, b.bytes);
        assert!(
            !scratch.inst.dir.exists(),
            "the scratch server is destroyed"
        );
    }
    // A backup that restores other rows than it was taken with fails, naming the difference.
    let mut claimed = counts.clone();
    let (table, n) = claimed.iter_mut().next().unwrap();
    let table = table.clone();
    *n += 1;
    let e = database::verify(
        &scratch.inst,
        &scratch_login,
        &to_dir,
        &at_dir.object,
        &at_dir.sha256,
        Some(&claimed),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("other rows"), "{e}");
    assert!(e.to_string().contains(&format!("{table}: ")), "{e}");
    assert!(!scratch.inst.dir.exists(), "destroyed after a failure too");
    // And one whose object does not match its checksum does not restore at all.
    let e = database::verify(
        &scratch.inst,
        &scratch_login,
        &to_dir,
        &at_dir.object,
        &wrong,
        None,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("refusing"), "{e}");
    assert_clean(&e, &canaries);
    assert!(!scratch.inst.dir.exists());

    // Restoring over data is refused (a restore never destroys).
    let e = database::restore(
        &copy2.inst,
        &restore_login,
        &to_dir,
        "orders/1.dump",
        &at_dir.sha256,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");

    let hits = watch.finish();
    assert!(hits.is_empty(), "a password on a command line: {hits:?}");
    assert_no_canary_in_logs(root.path(), &canaries);
    for d in [&original, &refused, &copy, &copy2] {
        database::destroy(&d.inst).await.unwrap();
        assert!(!d.inst.dir.exists());
    }
}

/// A new instance with `backup` restored into it, checked: the original's counts, readable by the login.
async fn restored(
    root: &tempfile::TempDir,
    engine: Engine,
    name: &str,
    login: &Login,
    from: &Target,
    backup: &Backup,
) -> Db {
    let d = db(engine, root.path(), name);
    database::ensure(&d.inst, login).await.unwrap();
    database::restore(&d.inst, login, from, &backup.object, &backup.sha256)
        .await
        .unwrap();
    assert_eq!(
        database::counts(&d.inst, login).await.unwrap(),
        expected_counts(engine)
    );
    client(&d.inst, login, read_probe(engine)).expect("the app reads the restored data");
    d
}

fn read_probe(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres | Engine::Mariadb => "SELECT count(*) FROM items;\n",
        Engine::Redis => "GET item:1\n",
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_backup_to_dir_and_s3_restores_with_equal_counts() {
    backup_and_restore_round_trip(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_backup_to_dir_and_s3_restores_with_equal_counts() {
    backup_and_restore_round_trip(Engine::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_backup_to_dir_and_s3_restores_with_equal_counts() {
    backup_and_restore_round_trip(Engine::Mariadb).await;
}

/// Rotation (the old password refused, the new one works), a killed server started again by the next
/// ensure, and a second ensure (an agent restarted, no state kept) adopting the live server.
async fn rotation_restart_and_adoption(engine: Engine) {
    let test = cairn_testkit::current_test();
    if !has_binaries(&test, engine) {
        return;
    }
    let root = scratch();
    let d = db(engine, root.path(), "main");
    let old = login_for(engine, &canary("old"));
    let new = login_for(engine, &canary("new"));
    database::ensure(&d.inst, &old).await.unwrap();
    write_data(&d.inst, &old);

    database::ensure(&d.inst, &new).await.unwrap();
    let refused = client(&d.inst, &old, read_probe(engine)).unwrap_err();
    assert!(
        refused.contains("password") || refused.contains("WRONGPASS") || refused.contains("denied"),
        "{refused}"
    );
    client(&d.inst, &new, read_probe(engine)).expect("the new password works");

    // Adoption: a fresh call (nothing kept in memory) finds the same server.
    let pidfile = match engine {
        Engine::Postgres => d.inst.dir.join("data/postmaster.pid"),
        Engine::Redis => d.inst.dir.join("redis.pid"),
        Engine::Mariadb => d.inst.dir.join("mariadbd.pid"),
    };
    let first = pid_in(&pidfile).unwrap();
    database::ensure(&d.inst, &new).await.unwrap();
    assert_eq!(pid_in(&pidfile), Some(first), "a second server was started");
    assert_eq!(
        servers_in(&d.inst),
        1,
        "one server process for the instance"
    );

    // SIGKILL: the next ensure starts it again, with the data.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(first).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    while std::fs::read_link(format!("/proc/{first}/cwd")).is_ok() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    database::ensure(&d.inst, &new).await.unwrap();
    let second = pid_in(&pidfile).unwrap();
    assert_ne!(second, first);
    if engine != Engine::Redis {
        // Redis keeps what its last snapshot held; the SQL engines lose no committed row.
        assert_eq!(
            database::counts(&d.inst, &new).await.unwrap(),
            expected_counts(engine)
        );
    }
    client(&d.inst, &new, read_probe(engine)).expect("back after a kill");

    database::stop(&d.inst).await.unwrap();
    assert!(
        client(&d.inst, &new, read_probe(engine)).is_err(),
        "stopped"
    );
    assert!(
        std::fs::read_link(format!("/proc/{second}/cwd")).is_err(),
        "the server is gone"
    );
    assert!(d.inst.dir.exists(), "stop keeps the data");
    database::ensure(&d.inst, &new).await.unwrap();
    database::destroy(&d.inst).await.unwrap();
}

/// Processes whose working directory is the instance's data directory and whose parent is not (the
/// server, not its workers).
fn servers_in(inst: &Instance) -> usize {
    let data = std::fs::canonicalize(inst.dir.join("data")).unwrap();
    let pids: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            (cwd == data).then_some(())?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    pids.iter()
        .filter(|(_, ppid)| !pids.iter().any(|(p, _)| p == ppid))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_rotation_restart_and_adoption() {
    rotation_restart_and_adoption(Engine::Postgres).await;
}

/// The control plane rotates to a new login (old and new coexist while the apps redeploy): the new
/// one reads the tables the old one made, and the old one no longer logs in.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_rotation_to_a_new_login_inherits_the_tables_and_retires_the_old() {
    let test = cairn_testkit::current_test();
    if !has_binaries(&test, Engine::Postgres) {
        return;
    }
    let root = scratch();
    let d = db(Engine::Postgres, root.path(), "main");
    let old = login_for(Engine::Postgres, &canary("old"));
    database::ensure(&d.inst, &old).await.unwrap();
    write_data(&d.inst, &old);
    let mut new = login_for(Engine::Postgres, &canary("new"));
    new.user = format!("{}2", old.user);
    database::ensure(&d.inst, &new).await.unwrap();
    let read = client(&d.inst, &new, read_probe(Engine::Postgres))
        .expect("the new login reads the old login's table");
    assert_eq!(read.trim(), "1000", "{read}");
    let refused = client(&d.inst, &old, read_probe(Engine::Postgres)).unwrap_err();
    assert!(refused.contains("not permitted to log in"), "{refused}");
    // Ensured again (a repeated task): nothing changes.
    database::ensure(&d.inst, &new).await.unwrap();
    client(&d.inst, &new, read_probe(Engine::Postgres)).expect("still");
    database::destroy(&d.inst).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_rotation_restart_and_adoption() {
    rotation_restart_and_adoption(Engine::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_rotation_restart_and_adoption() {
    rotation_restart_and_adoption(Engine::Mariadb).await;
}

/// A failing target says why, leaves nothing behind and holds no secret: a bucket that does not exist,
/// an S3 server that stopped, a dump that fails (its database is gone) to a directory and to S3.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_backup_target_says_why_without_secrets() {
    let test = cairn_testkit::current_test();
    if !has_binaries(&test, Engine::Postgres) {
        return;
    }
    let root = scratch();
    let Some(mut moto) = Moto::start(&test, root.path()).await else {
        return;
    };
    moto.create_bucket("backups").await;
    let pw = canary("app");
    let canaries = vec![pw.clone(), S3_SECRET.to_owned()];
    let d = db(Engine::Postgres, root.path(), "main");
    let app = login(&pw);
    database::ensure(&d.inst, &app).await.unwrap();
    write_data(&d.inst, &app);

    let e = database::backup(
        &d.inst,
        &app,
        &s3_target(&moto, "no-such-bucket"),
        "main/1.dump",
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("no-such-bucket"), "{e}");
    assert_clean(&e, &canaries);

    // A dump that fails (its database is gone) leaves no object in the directory.
    let dir = root.path().join("backups");
    let gone = Login {
        database: "dropped".into(),
        ..app.clone()
    };
    let e = database::backup(&d.inst, &gone, &dir_target(&dir), "main/2.dump")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("pg_dump failed"), "{e}");
    assert!(e.to_string().contains("dropped"), "{e}");
    assert_clean(&e, &canaries);
    assert_eq!(walk(&dir), Vec::<PathBuf>::new(), "nothing left behind");
    // ...nor in S3.
    let e = database::backup(&d.inst, &gone, &s3_target(&moto, "backups"), "main/3.dump")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nothing was kept"), "{e}");
    let listed = moto_keys(&moto, "backups").await;
    assert!(listed.is_empty(), "objects left: {listed:?}");

    moto.stop();
    let e = database::backup(&d.inst, &app, &s3_target(&moto, "backups"), "main/4.dump")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("s3://backups/nightly/main/4.dump"),
        "{e}"
    );
    assert_clean(&e, &canaries);

    assert_no_canary_in_logs(root.path(), &canaries);
    database::destroy(&d.inst).await.unwrap();
}

async fn moto_keys(moto: &Moto, bucket: &str) -> Vec<String> {
    use futures_util::TryStreamExt as _;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(Moto::REGION)
        .with_endpoint(&moto.endpoint)
        .with_allow_http(true)
        .with_access_key_id(Moto::ACCESS_KEY_ID)
        .with_secret_access_key(S3_SECRET)
        .build()
        .unwrap();
    store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

/// A version the node has no binaries for is refused, naming the ones it has.
#[tokio::test]
async fn a_version_without_binaries_is_refused_naming_what_there_is() {
    let test = cairn_testkit::current_test();
    if !has_binaries(&test, Engine::Postgres) {
        return;
    }
    let root = scratch();
    let mut d = db(Engine::Postgres, root.path(), "old");
    d.inst.version = "9".into();
    let e = database::ensure(&d.inst, &login("pw")).await.unwrap_err();
    assert!(matches!(e, DbError::Unsupported(_)), "{e:?}");
    assert!(e.to_string().contains("PostgreSQL 9"), "{e}");
    assert!(e.to_string().contains(&version(Engine::Postgres)), "{e}");
    assert!(!d.inst.dir.exists(), "nothing made");
}

/// The full version the PostgreSQL binaries report (`15.18` of `postgres (PostgreSQL) 15.18 (Debian ...)`).
fn pg_full_version() -> String {
    let out = std::process::Command::new(pg_bin().join("postgres"))
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap()
        .to_owned()
}

/// A version upgrade (issue 18) into a new instance beside the old one, with real dump and restore.
/// Only one PostgreSQL major is installed here, so the "upgrade" goes from `15` to the full minor the
/// binaries report (`15.18`), which the same binaries serve: every step runs, but not a real major
/// upgrade. The old instance keeps serving with its data directory untouched, the counts are equal,
/// the app's new login reads the data, an upgrade into an instance that exists is refused, and a drop
/// (stop, then destroy) deletes the old data and leaves the new instance as it was.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_upgrade_into_a_new_instance_keeps_the_old_until_it_is_dropped() {
    let test = cairn_testkit::current_test();
    if !has_binaries(&test, Engine::Postgres) {
        return;
    }
    let root = scratch();
    let old = db(Engine::Postgres, root.path(), "shop");
    let old_pw = canary("old");
    let old_login = login(&old_pw);
    database::ensure(&old.inst, &old_login).await.unwrap();
    write_data(&old.inst, &old_login);

    let mut new = db(Engine::Postgres, root.path(), "shop-v2");
    new.inst.version = pg_full_version();
    assert_ne!(new.inst.version, old.inst.version, "{}", new.inst.version);
    let new_pw = canary("new");
    let new_login = login(&new_pw);
    let done = database::upgrade(&old.inst, &new.inst, &new_login)
        .await
        .unwrap();
    assert_eq!(done.counts, expected_counts(Engine::Postgres));
    assert!(done.bytes > 0);
    assert!(
        done.summary().contains("counts equal"),
        "{}",
        done.summary()
    );
    assert_eq!(
        database::counts(&new.inst, &new_login).await.unwrap(),
        expected_counts(Engine::Postgres)
    );
    // The app's own login on the new instance reads the data (the tables are its own).
    let read = client(&new.inst, &new_login, "SELECT count(*) FROM items;").unwrap();
    assert_eq!(read.trim(), "1000");
    client(&new.inst, &new_login, "INSERT INTO notes VALUES (4);").unwrap();
    // The old one keeps serving, its data directory in place; nothing of the dump is left behind.
    let read = client(&old.inst, &old_login, "SELECT count(*) FROM notes;").unwrap();
    assert_eq!(read.trim(), "3");
    assert!(old.inst.dir.join("data/PG_VERSION").is_file());
    assert!(!new.inst.dir.join("upgrade.dump").exists());
    assert!(!root.path().join(".shop-v2.upgrading").exists());

    // An instance that exists is never upgraded into (nor removed by the refusal).
    let e = database::upgrade(&old.inst, &new.inst, &new_login)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("already has a data directory"),
        "{e}"
    );
    let read = client(&new.inst, &new_login, "SELECT count(*) FROM notes;").unwrap();
    assert_eq!(read.trim(), "4");

    // A version this node has no binaries for fails and leaves nothing; the old one is untouched.
    let mut bad = db(Engine::Postgres, root.path(), "shop-v3");
    bad.inst.version = "99".into();
    let e = database::upgrade(&old.inst, &bad.inst, &login(&new_pw))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("PostgreSQL 99"), "{e}");
    assert_clean(&e, &[old_pw.clone(), new_pw.clone()]);
    assert!(!bad.inst.dir.exists());
    assert!(!root.path().join(".shop-v3.upgrading").exists());
    assert_eq!(
        database::counts(&old.inst, &old_login).await.unwrap(),
        expected_counts(Engine::Postgres)
    );

    // An attempt cut short (its mark left beside a half-made directory) is redone from scratch.
    let mut cut = db(Engine::Postgres, root.path(), "shop-v4");
    cut.inst.version = pg_full_version();
    std::fs::create_dir_all(cut.inst.dir.join("data")).unwrap();
    std::fs::write(cut.inst.dir.join("data/half"), b"x").unwrap();
    std::fs::write(root.path().join(".shop-v4.upgrading"), b"").unwrap();
    let redone = database::upgrade(&old.inst, &cut.inst, &new_login)
        .await
        .unwrap();
    assert_eq!(redone.counts, expected_counts(Engine::Postgres));
    assert!(!cut.inst.dir.join("data/half").exists());
    database::destroy(&cut.inst).await.unwrap();

    assert_no_canary_in_logs(root.path(), &[old_pw.clone(), new_pw.clone()]);

    // The drop of the pre-upgrade instance: stopped (db_stop at the switch), then its data deleted.
    database::stop(&old.inst).await.unwrap();
    assert!(old.inst.dir.exists(), "a stop keeps the data");
    database::destroy(&old.inst).await.unwrap();
    assert!(!old.inst.dir.exists());
    assert!(client(&old.inst, &old_login, "SELECT 1;").is_err());
    let read = client(&new.inst, &new_login, "SELECT count(*) FROM items;").unwrap();
    assert_eq!(read.trim(), "1000");
}

/// The full release an engine's binaries report (`15.18`, `7.0.15`, `10.11.19`): a version that pins
/// the same binaries `version(engine)` names by their series.
fn full_version(engine: Engine) -> String {
    let (exe, marker) = match engine {
        Engine::Postgres => return pg_full_version(),
        Engine::Redis => ("redis-server", "v="),
        Engine::Mariadb => ("/usr/sbin/mariadbd", "Ver"),
    };
    let out = std::process::Command::new(exe)
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let word = text
        .split_whitespace()
        .skip_while(|w| !w.starts_with(marker))
        .find_map(|w| w.strip_prefix(marker).filter(|v| !v.is_empty()))
        .or_else(|| text.split_whitespace().skip_while(|w| *w != marker).nth(1))
        .unwrap();
    word.split('-').next().unwrap().to_owned()
}

/// The same upgrade with Redis or MariaDB (their installed series to the release it reports): the
/// data comes over with equal counts, the app's new login reads it, the old instance keeps serving
/// until it is dropped.
async fn upgrade_beside(engine: Engine) {
    let test = cairn_testkit::current_test();
    if !has_binaries(&test, engine) {
        return;
    }
    let root = scratch();
    let old = db(engine, root.path(), "shop");
    let old_pw = canary("old");
    let old_login = login_for(engine, &old_pw);
    database::ensure(&old.inst, &old_login).await.unwrap();
    write_data(&old.inst, &old_login);
    let mut new = db(engine, root.path(), "shop-v2");
    new.inst.version = full_version(engine);
    assert_ne!(new.inst.version, old.inst.version);
    let new_pw = canary("new");
    let new_login = login_for(engine, &new_pw);
    let done = database::upgrade(&old.inst, &new.inst, &new_login)
        .await
        .unwrap();
    assert_eq!(done.counts, expected_counts(engine));
    assert_eq!(
        database::counts(&new.inst, &new_login).await.unwrap(),
        expected_counts(engine)
    );
    client(&new.inst, &new_login, read_probe(engine)).expect("the new login reads the data");
    client(&old.inst, &old_login, read_probe(engine)).expect("the old one keeps serving");
    assert_no_canary_in_logs(root.path(), &[old_pw, new_pw]);
    database::stop(&old.inst).await.unwrap();
    database::destroy(&old.inst).await.unwrap();
    assert!(!old.inst.dir.exists());
    client(&new.inst, &new_login, read_probe(engine)).expect("the new one is untouched");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_upgrade_into_a_new_instance_keeps_the_old_until_it_is_dropped() {
    upgrade_beside(Engine::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_upgrade_into_a_new_instance_keeps_the_old_until_it_is_dropped() {
    upgrade_beside(Engine::Mariadb).await;
}

/// A database in a container (the Docker driver's way), from an image made offline from this machine's
/// packages: the data lives in a named volume (nothing of it under the instance's directory), the app
/// logs in over the node's network, a killed container is started again with its data by the next
/// ensure and a second ensure adopts the running one; backups, restores into another container, a
/// verification in a scratch container and an upgrade into a new container carry equal counts; a drop
/// removes container and volume. No
/// password on any command line (the docker CLI gets them by name from its environment), none in the
/// errors or the files.
async fn in_a_container(engine: Engine) {
    let test = cairn_testkit::current_test();
    if !has_binaries(&test, engine) {
        return;
    }
    let label = format!("t{:x}", rand::random::<u64>());
    let image = match engine {
        Engine::Postgres => cairn_testkit::dbimage::postgres(&test, &label),
        Engine::Redis => cairn_testkit::dbimage::redis(&test, &label),
        Engine::Mariadb => cairn_testkit::dbimage::mariadb(&test, &label),
    };
    let Some(image) = image else {
        return;
    };
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            cairn_testkit::dbimage::remove(&self.0, &self.1);
        }
    }
    let _cleanup = Cleanup(image.clone(), label.clone());
    let root = scratch();
    let inst = |name: &str| Instance {
        name: name.parse().unwrap(),
        engine,
        version: version(engine),
        dir: root.path().join(name),
        port: free_port(),
        runtime: Runtime::Container(Container {
            image: image.clone(),
            name: format!("cairn-db-{label}-{name}"),
            labels: vec![
                ("cairn.installation".into(), label.clone()),
                ("cairn.test".into(), label.clone()),
            ],
        }),
    };
    let docker = |args: &[&str]| {
        let o = std::process::Command::new("docker")
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
    };
    let pw = canary("app");
    let copy_pw = canary("copy");
    let canaries = vec![pw.clone(), copy_pw.clone()];
    let watch = ArgvWatch::start(canaries.clone());

    let original = inst("orders");
    let name = format!("cairn-db-{label}-orders");
    let app = login_for(engine, &pw);
    database::ensure(&original, &app).await.unwrap();
    write_data(&original, &app);
    let counts = database::counts(&original, &app).await.unwrap();
    assert_eq!(counts, expected_counts(engine));
    assert_eq!(
        docker(&["volume", "inspect", "--format", "{{.Name}}", &name]),
        (true, name.clone()),
        "a named volume"
    );
    assert!(
        !original.dir.join("data").exists(),
        "no data on the node's disk"
    );

    // Killed: the next ensure starts it again, with the data (Redis: what its last snapshot held, so
    // one is taken first); a second ensure adopts it.
    if engine == Engine::Redis {
        client(&original, &app, "SAVE\n").expect("a snapshot");
    }
    assert!(docker(&["kill", &name]).0);
    database::ensure(&original, &app).await.unwrap();
    let id = docker(&["inspect", "--format", "{{.Id}}", &name]).1;
    database::ensure(&original, &app).await.unwrap();
    assert_eq!(
        docker(&["inspect", "--format", "{{.Id}}", &name]).1,
        id,
        "adopted, not replaced"
    );
    assert_eq!(database::counts(&original, &app).await.unwrap(), counts);
    client(&original, &app, read_probe(engine)).expect("the app reads it");

    // Backed up, restored into another container, verified in a scratch one: equal counts.
    let dir = root.path().join("backups");
    let to_dir = dir_target(&dir);
    let b = database::backup(&original, &app, &to_dir, "orders/1.dump")
        .await
        .unwrap();
    assert_eq!(b.counts.as_ref(), Some(&counts));
    let copy = inst("orders-copy");
    let copy_login = login_for(engine, &copy_pw);
    database::ensure(&copy, &copy_login).await.unwrap();
    database::restore(&copy, &copy_login, &to_dir, &b.object, &b.sha256)
        .await
        .unwrap();
    assert_eq!(database::counts(&copy, &copy_login).await.unwrap(), counts);
    let scratch = inst("orders-verify");
    let v = database::verify(
        &scratch,
        &copy_login,
        &to_dir,
        &b.object,
        &b.sha256,
        b.counts.as_ref(),
    )
    .await
    .unwrap();
    assert_eq!(v.counts, counts);
    assert!(
        !docker(&["inspect", &format!("cairn-db-{label}-orders-verify")]).0,
        "scratch gone"
    );

    // Upgraded into a new container beside it (the image serves both versions here: the mechanism,
    // not a real major upgrade): equal counts, the old one still serving.
    let upgraded = inst("orders-v2");
    let done = database::upgrade(&original, &upgraded, &app).await.unwrap();
    assert_eq!(done.counts, counts);
    assert_eq!(database::counts(&upgraded, &app).await.unwrap(), counts);
    client(&original, &app, read_probe(engine)).expect("the old one keeps serving");
    assert!(
        docker(&["volume", "inspect", &format!("cairn-db-{label}-orders-v2")]).0,
        "the upgrade's own volume"
    );
    database::destroy(&upgraded).await.unwrap();

    // Stopped: the container stays, stopped; dropped: container and volume are gone.
    database::stop(&original).await.unwrap();
    assert_eq!(
        docker(&["inspect", "--format", "{{.State.Running}}", &name]).1,
        "false"
    );
    assert!(client(&original, &app, read_probe(engine)).is_err());
    for d in [&original, &copy] {
        database::destroy(d).await.unwrap();
    }
    assert!(!docker(&["inspect", &name]).0, "the container is removed");
    assert!(
        !docker(&["volume", "inspect", &name]).0,
        "the volume is removed"
    );

    let hits = watch.finish();
    assert!(hits.is_empty(), "a password on a command line: {hits:?}");
    assert_no_canary_in_logs(root.path(), &canaries);
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_in_a_container_keeps_its_data_in_a_named_volume() {
    in_a_container(Engine::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_in_a_container_keeps_its_data_in_a_named_volume() {
    in_a_container(Engine::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_in_a_container_keeps_its_data_in_a_named_volume() {
    in_a_container(Engine::Mariadb).await;
}
