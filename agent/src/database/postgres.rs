//! PostgreSQL from Debian's server binaries (`/usr/lib/postgresql/<version>/bin`): `initdb` once, the
//! postmaster started detached with the data directory as its working directory, TCP only (no unix
//! socket, whose path would be limited to ~100 bytes), scram passwords from everywhere.
//!
//! Layout of `instance.dir`: `data/` (PGDATA), `admin.password` (the `postgres` superuser's, 0600),
//! `server.log`, `initialized` (written last by the first `ensure`, so an interrupted `initdb` is redone).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::server::{self, Account, Scrub, Tool, sql_literal};
use super::{DbError, Instance, Login, password, version_matches};

const ROOT: &str = "/usr/lib/postgresql";
const SUPERUSER: &str = "postgres";

fn data(instance: &Instance) -> PathBuf {
    instance.dir.join("data")
}

pub(crate) fn pid_site(instance: &Instance) -> (PathBuf, PathBuf, rustix::process::Signal) {
    let data = data(instance);
    (
        data.join("postmaster.pid"),
        data,
        rustix::process::Signal::INT,
    )
}

/// The binaries of `version`, or what versions there are.
fn bindir(version: &str) -> Result<PathBuf, DbError> {
    let mut have: Vec<String> = std::fs::read_dir(ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("bin/postgres").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    have.sort();
    if let Some(v) = have.iter().find(|v| version_matches(version, v)) {
        return Ok(Path::new(ROOT).join(v).join("bin"));
    }
    // A pinned minor (`15.18`) is matched against what the major's binaries report.
    if let Some(v) = have.iter().find(|v| {
        version_matches(v, version)
            && reported(&Path::new(ROOT).join(v).join("bin/postgres"))
                .is_some_and(|r| version_matches(version, &r))
    }) {
        return Ok(Path::new(ROOT).join(v).join("bin"));
    }
    Err(DbError::Unsupported(format!(
        "this node has no PostgreSQL {version} server binaries; it has {} (in {ROOT}/<version>/bin)",
        if have.is_empty() {
            "none".to_owned()
        } else {
            have.join(", ")
        }
    )))
}

/// The version `postgres --version` reports (`15.18` of `postgres (PostgreSQL) 15.18 (Debian ...)`).
fn reported(postgres: &Path) -> Option<String> {
    let out = std::process::Command::new(postgres)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_owned)
}

fn ident(s: &str) -> Result<String, DbError> {
    if s.contains('\0') || s.is_empty() {
        return Err(DbError::Unsupported(format!(
            "`{s}` is not a PostgreSQL name"
        )));
    }
    Ok(format!("\"{}\"", s.replace('"', "\"\"")))
}

/// psql as the superuser over loopback TCP (the password in `PGPASSWORD`, SQL on stdin).
fn psql<'a>(instance: &Instance, bin: &Path, admin: &str, db: &str) -> Tool<'a> {
    Tool::new(bin.join("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args(["-p", &instance.port.to_string(), "-U", SUPERUSER, "-d", db])
        .env("PGPASSWORD", admin)
        .env("PGCONNECT_TIMEOUT", "5")
}

pub(crate) async fn ensure(instance: &Instance, app: &Login, scrub: &Scrub) -> Result<(), DbError> {
    if app.user == SUPERUSER {
        return Err(DbError::Unsupported(format!(
            "`{SUPERUSER}` is the instance's own superuser; an app login needs another name"
        )));
    }
    let bin = bindir(&instance.version)?;
    let account = server::account("postgres")?;
    server::make_dir(&instance.dir, account)?;
    let admin = server::admin_password(&instance.dir)?;
    let mut scrub_all = Scrub::new([admin.clone()]);
    scrub_all.add(password(app)?);
    let data = data(instance);
    if !instance.dir.join("initialized").exists() {
        init(instance, &bin, &admin, account, &scrub_all).await?;
    }
    let (pidfile, cwd, _) = pid_site(instance);
    let log = instance.dir.join("server.log");
    if server::live_pid(&pidfile, &cwd).is_none() {
        // A killed postmaster leaves its pid file; a new one refuses to start while it names a live
        // process, which after a reboot may be anything.
        let _ = std::fs::remove_file(&pidfile);
        let data_s = data.to_string_lossy().into_owned();
        server::spawn_detached(
            &bin.join("postgres"),
            &["-D".into(), data_s, "-p".into(), instance.port.to_string()],
            &data,
            &log,
            account,
        )?;
    }
    server::wait_ready(Duration::from_secs(60), &log, scrub, || async {
        psql(instance, &bin, &admin, "postgres")
            .stdin("SELECT 1;")
            .run(scrub)
            .await
            .map(|_| ())
    })
    .await?;
    let user = ident(&app.user)?;
    let db = ident(&app.database)?;
    // A rotation may bring a new login: it inherits every earlier login (so it reaches the tables
    // they own), and they stop logging in (the old password is refused from now on; sessions already
    // open end with the replicas that hold them, which the rotation's release replaces).
    let sql = format!(
        "SELECT format('CREATE ROLE %I LOGIN', {u}) WHERE NOT EXISTS \
           (SELECT FROM pg_roles WHERE rolname = {u})\\gexec\n\
         ALTER ROLE {user} WITH LOGIN NOSUPERUSER PASSWORD {pw};\n\
         SELECT format('CREATE DATABASE %I OWNER %I', {d}, {u}) WHERE NOT EXISTS \
           (SELECT FROM pg_database WHERE datname = {d})\\gexec\n\
         ALTER DATABASE {db} OWNER TO {user};\n\
         SELECT format('GRANT %I TO %I', rolname, {u}) FROM pg_roles \
           WHERE rolname <> {u} AND NOT rolsuper AND rolname !~ '^pg_' \
             AND NOT pg_has_role(rolname, {u}, 'MEMBER') AND NOT pg_has_role({u}, rolname, 'MEMBER')\\gexec\n\
         SELECT format('ALTER ROLE %I NOLOGIN', rolname) FROM pg_roles \
           WHERE rolname <> {u} AND NOT rolsuper AND rolname !~ '^pg_' AND rolcanlogin\\gexec\n",
        u = sql_literal(&app.user)?,
        d = sql_literal(&app.database)?,
        pw = sql_literal(password(app)?)?,
    );
    psql(instance, &bin, &admin, "postgres")
        .stdin(sql)
        .run(scrub)
        .await?;
    // The app's own login, the way the app will make it.
    Tool::new(bin.join("psql"))
        .args(["-X", "-q", "-A", "-t", "-h", "127.0.0.1"])
        .args([
            "-p",
            &instance.port.to_string(),
            "-U",
            &app.user,
            "-d",
            &app.database,
        ])
        .args(["-c", "SELECT 1"])
        .env("PGPASSWORD", password(app)?)
        .env("PGCONNECT_TIMEOUT", "5")
        .run(scrub)
        .await
        .map(|_| ())
}

async fn init(
    instance: &Instance,
    bin: &Path,
    admin: &str,
    account: Option<Account>,
    scrub: &Scrub,
) -> Result<(), DbError> {
    let data = data(instance);
    match std::fs::remove_dir_all(&data) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(server::io("removing the half-made", &data, e)),
    }
    // initdb reads the superuser's password from a file (never argv); the file goes right after.
    let pwfile = instance.dir.join("initdb.password");
    server::write_private(&pwfile, admin.as_bytes(), account)?;
    let ran = Tool::new(bin.join("initdb"))
        .args(["-D", &data.to_string_lossy(), "-U", SUPERUSER, "--pwfile"])
        .args([pwfile.to_string_lossy()])
        .args([
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        ])
        .account(account)
        .cwd(&instance.dir)
        .run(scrub)
        .await;
    let _ = std::fs::remove_file(&pwfile);
    ran?;
    let settings = "\n# cairn: a managed database. TCP only (no unix socket: its path is limited to \
                    ~100 bytes), the port on the command line, statements never logged (an ALTER \
                    ROLE carries a password).\n\
                    listen_addresses = '*'\n\
                    unix_socket_directories = ''\n\
                    password_encryption = 'scram-sha-256'\n\
                    log_min_error_statement = panic\n\
                    log_statement = 'none'\n";
    append(&data.join("postgresql.conf"), settings)?;
    append(
        &data.join("pg_hba.conf"),
        "\n# cairn: apps reach it over the node's address, with a password.\n\
         host all all 0.0.0.0/0 scram-sha-256\n\
         host all all ::/0 scram-sha-256\n",
    )?;
    std::fs::write(instance.dir.join("initialized"), b"")
        .map_err(|e| server::io("writing", &instance.dir, e))
}

fn append(path: &Path, text: &str) -> Result<(), DbError> {
    use std::io::Write as _;
    std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| server::io("writing", path, e))
}

/// `pg_dump -Fc` of the login's database, as the superuser.
pub(crate) fn dump<'a>(instance: &Instance, login: &Login) -> Result<Tool<'a>, DbError> {
    let bin = bindir(&instance.version)?;
    let admin = server::admin_password(&instance.dir)?;
    Ok(Tool::new(bin.join("pg_dump"))
        .args(["-Fc", "-h", "127.0.0.1", "-p", &instance.port.to_string()])
        .args(["-U", SUPERUSER, "-d", &login.database])
        .env("PGPASSWORD", admin)
        .env("PGCONNECT_TIMEOUT", "5"))
}

/// `pg_restore` of a verified dump into the login's (empty) database, its objects owned by the login.
pub(crate) async fn restore(
    instance: &Instance,
    login: &Login,
    file: &Path,
    scrub: &Scrub,
) -> Result<(), DbError> {
    let bin = bindir(&instance.version)?;
    let admin = server::admin_password(&instance.dir)?;
    Tool::new(bin.join("pg_restore"))
        .args(["-h", "127.0.0.1", "-p", &instance.port.to_string()])
        .args(["-U", SUPERUSER, "-d", &login.database])
        .args([
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
        ])
        .args([format!("--role={}", login.user)])
        .args([file.to_string_lossy()])
        .env("PGPASSWORD", admin)
        .run(scrub)
        .await
        .map(|_| ())
}

/// Exact row counts of every table of the login's database (`schema.table`).
pub(crate) async fn counts(
    instance: &Instance,
    login: &Login,
    scrub: &Scrub,
) -> Result<BTreeMap<String, u64>, DbError> {
    let bin = bindir(&instance.version)?;
    let admin = server::admin_password(&instance.dir)?;
    let sql = "SELECT format('SELECT %L || ''|'' || count(*) FROM %I.%I', \
                 n.nspname || '.' || c.relname, n.nspname, c.relname) \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE c.relkind IN ('r', 'p') \
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg_toast%' \
               ORDER BY 1\\gexec\n";
    let out = psql(instance, &bin, &admin, &login.database)
        .stdin(sql)
        .run(scrub)
        .await?;
    super::parse_counts(&out)
}
