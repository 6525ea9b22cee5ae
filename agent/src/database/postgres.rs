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
use super::{Container, DbError, Instance, Login, Runtime, container, password, version_matches};

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

/// The instance's container, when it runs in one.
fn container_of(instance: &Instance) -> Option<&Container> {
    match &instance.runtime {
        Runtime::Container(c) => Some(c),
        Runtime::Process => None,
    }
}

/// Where a tool of the engine is: this node's binaries of the instance's version, or (in a container)
/// the image's `PATH`.
fn bin(instance: &Instance) -> Result<PathBuf, DbError> {
    match &instance.runtime {
        Runtime::Process => bindir(&instance.version),
        Runtime::Container(_) => Ok(PathBuf::new()),
    }
}

/// A client tool of the engine, run on this node or in the instance's container (the same arguments:
/// the container shares the node's network).
fn tool<'a>(bin: &Path, name: &str) -> Tool<'a> {
    Tool::new(bin.join(name))
}

/// In the container, the volume's mount point (the image's `postgres` home, which a new volume
/// takes its owner from) and the data directory in it.
const MOUNT: &str = "/var/lib/postgresql";
const CONTAINER_DATA: &str = "/var/lib/postgresql/cairn";
const CONTAINER_HBA: &str = "/var/lib/postgresql/cairn-hba.conf";

/// psql as the superuser over loopback TCP (the password in `PGPASSWORD`, SQL on stdin).
fn psql<'a>(instance: &Instance, bin: &Path, admin: &str, db: &str) -> Tool<'a> {
    psql_bare(instance, bin, admin, db).inside(container_of(instance).map(|c| c.name.as_str()))
}

fn psql_bare<'a>(instance: &Instance, bin: &Path, admin: &str, db: &str) -> Tool<'a> {
    tool(bin, "psql")
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
    let bin = bin(instance)?;
    let container = container_of(instance);
    let account = match container {
        Some(_) => None,
        None => server::account("postgres")?,
    };
    server::make_dir(&instance.dir, account)?;
    let admin = server::admin_password(&instance.dir)?;
    let mut scrub_all = Scrub::new([admin.clone()]);
    scrub_all.add(password(app)?);
    let data = data(instance);
    let log = instance.dir.join("server.log");
    if let Some(c) = container {
        if !instance.dir.join("initialized").exists() {
            init_volume(instance, c, &admin, &scrub_all).await?;
        }
        match container::state(c).await? {
            Some(true) => {}
            Some(false) => container::start(c, &scrub_all).await?,
            None => {
                create_container(instance, c, &scrub_all).await?;
                container::start(c, &scrub_all).await?;
            }
        }
    } else if !instance.dir.join("initialized").exists() {
        init(instance, &bin, &admin, account, &scrub_all).await?;
    }
    let (pidfile, cwd, _) = pid_site(instance);
    if container.is_none() && server::live_pid(&pidfile, &cwd).is_none() {
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
    let ready = server::wait_ready(Duration::from_secs(60), &log, scrub, || async {
        psql(instance, &bin, &admin, "postgres")
            .stdin("SELECT 1;")
            .run(scrub)
            .await
            .map(|_| ())
    })
    .await;
    match container {
        Some(c) => container::with_logs(c, ready, scrub).await?,
        None => ready?,
    }
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
    tool(&bin, "psql")
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
        .inside(container.map(|c| c.name.as_str()))
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
    let mut settings = "\n# cairn: a managed database, the port on the command line.\n".to_owned();
    for (k, v) in SETTINGS {
        settings.push_str(&format!("{k} = '{v}'\n"));
    }
    append(&data.join("postgresql.conf"), &settings)?;
    append(
        &data.join("pg_hba.conf"),
        &format!("\n# cairn: apps reach it over the node's address, with a password.\n{HBA}"),
    )?;
    std::fs::write(instance.dir.join("initialized"), b"")
        .map_err(|e| server::io("writing", &instance.dir, e))
}

/// The settings a managed server runs with (TCP only: no unix socket, whose path would be limited to
/// ~100 bytes; statements never logged: an ALTER ROLE carries a password).
const SETTINGS: [(&str, &str); 5] = [
    ("listen_addresses", "*"),
    ("unix_socket_directories", ""),
    ("password_encryption", "scram-sha-256"),
    ("log_min_error_statement", "panic"),
    ("log_statement", "none"),
];

/// Apps reach it over the node's address, with a password.
const HBA: &str = "host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n";

/// A container's first start: a fresh volume with `initdb` run in it (the superuser's password read
/// from stdin), then marked initialized beside the admin password.
async fn init_volume(
    instance: &Instance,
    c: &Container,
    admin: &str,
    scrub: &Scrub,
) -> Result<(), DbError> {
    container::fresh_volume(c, scrub).await?;
    let args: Vec<String> = [
        "-D",
        CONTAINER_DATA,
        "-U",
        SUPERUSER,
        "--pwfile=/dev/stdin",
        "--auth-host=scram-sha-256",
        "--auth-local=scram-sha-256",
        "--encoding=UTF8",
        "--locale=C",
    ]
    .map(str::to_owned)
    .to_vec();
    container::run_once(
        c,
        SUPERUSER,
        MOUNT,
        "initdb",
        &args,
        admin.as_bytes().to_vec(),
        scrub,
    )
    .await?;
    std::fs::write(instance.dir.join("initialized"), b"")
        .map_err(|e| server::io("writing", &instance.dir, e))
}

/// The server's container: `postgres` on the instance's port with [`SETTINGS`], its host-based
/// authentication file copied into the volume before the first start.
async fn create_container(
    instance: &Instance,
    c: &Container,
    scrub: &Scrub,
) -> Result<(), DbError> {
    let mut args = vec![
        "-D".to_owned(),
        CONTAINER_DATA.to_owned(),
        "-p".to_owned(),
        instance.port.to_string(),
        "-c".to_owned(),
        format!("hba_file={CONTAINER_HBA}"),
    ];
    for (k, v) in SETTINGS {
        args.push("-c".to_owned());
        args.push(format!("{k}={v}"));
    }
    container::create(c, SUPERUSER, MOUNT, "postgres", &args, scrub).await?;
    let hba = instance.dir.join("pg_hba.conf");
    std::fs::write(&hba, HBA).map_err(|e| server::io("writing", &hba, e))?;
    container::copy_in(c, &hba, CONTAINER_HBA, scrub).await
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
    let bin = bin(instance)?;
    let admin = server::admin_password(&instance.dir)?;
    Ok(tool(&bin, "pg_dump")
        .args(["-Fc", "-h", "127.0.0.1", "-p", &instance.port.to_string()])
        .args(["-U", SUPERUSER, "-d", &login.database])
        .env("PGPASSWORD", admin)
        .env("PGCONNECT_TIMEOUT", "5")
        .inside(container_of(instance).map(|c| c.name.as_str())))
}

/// `pg_restore` of a verified dump into the login's (empty) database, its objects owned by the login.
pub(crate) async fn restore(
    instance: &Instance,
    login: &Login,
    file: &Path,
    scrub: &Scrub,
) -> Result<(), DbError> {
    let bin = bin(instance)?;
    let admin = server::admin_password(&instance.dir)?;
    // In a container the dump is copied into its volume for pg_restore, and removed after.
    let inside = container_of(instance);
    let path = match inside {
        Some(c) => {
            let path = format!("{MOUNT}/restore.dump");
            container::copy_in(c, file, &path, scrub).await?;
            path
        }
        None => file.to_string_lossy().into_owned(),
    };
    let restored = tool(&bin, "pg_restore")
        .args(["-h", "127.0.0.1", "-p", &instance.port.to_string()])
        .args(["-U", SUPERUSER, "-d", &login.database])
        .args([
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "--single-transaction",
        ])
        .args([format!("--role={}", login.user)])
        .args([path.as_str()])
        .env("PGPASSWORD", admin)
        .inside(inside.map(|c| c.name.as_str()))
        .run(scrub)
        .await
        .map(|_| ());
    if let Some(c) = inside {
        container::exec_root(c, &["rm", "-f", &path], scrub).await?;
    }
    restored
}

/// Exact row counts of every table of the login's database (`schema.table`).
pub(crate) async fn counts(
    instance: &Instance,
    login: &Login,
    scrub: &Scrub,
) -> Result<BTreeMap<String, u64>, DbError> {
    let bin = bin(instance)?;
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
