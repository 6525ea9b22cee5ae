//! MariaDB from Debian's `mariadbd`: `mariadb-install-db` once, an admin user `cairn_admin` made by an
//! init file on the first start (then deleted), the server detached with its data directory as working
//! directory, its unix socket in a short path under `/tmp`. Clients get their password in `MYSQL_PWD`
//! and their SQL on stdin.
//!
//! Layout of `instance.dir`: `data/`, `mariadbd.pid`, `admin.password` (0600), `server.log`,
//! `initialized`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::server::{self, Account, Scrub, Tool};
use super::{Container, DbError, Instance, Login, Runtime, container, password};

/// In a container: the volume's mount point (the official image's datadir, owned by `mysql`), the data
/// directory and the unix socket in it (the socket only for the image's root, which makes the admin).
const MOUNT: &str = "/var/lib/mysql";
const CONTAINER_DATA: &str = "/var/lib/mysql/data";
const CONTAINER_SOCKET: &str = "/var/lib/mysql/mysqld.sock";

fn container_of(instance: &Instance) -> Option<&Container> {
    match &instance.runtime {
        Runtime::Container(c) => Some(c),
        Runtime::Process => None,
    }
}

const ADMIN: &str = "cairn_admin";

fn data(instance: &Instance) -> PathBuf {
    instance.dir.join("data")
}

pub(crate) fn pid_site(instance: &Instance) -> (PathBuf, PathBuf, rustix::process::Signal) {
    (
        instance.dir.join("mariadbd.pid"),
        data(instance),
        rustix::process::Signal::TERM,
    )
}

/// The unix socket: short, whatever the data directory's path (socket paths are limited to 107 bytes).
fn socket(instance: &Instance) -> PathBuf {
    let hash = hex::encode(
        &<sha2::Sha256 as sha2::Digest>::digest(instance.dir.as_os_str().as_encoded_bytes())[..6],
    );
    PathBuf::from(format!("/tmp/cairn-mariadb-{hash}.sock"))
}

/// The server's temporary directory, the instance's own.
fn tmpdir(instance: &Instance, account: Option<Account>) -> Result<PathBuf, DbError> {
    let dir = instance.dir.join("tmp");
    server::make_dir(&dir, account)?;
    Ok(dir)
}

fn server_binary(version: &str) -> Result<PathBuf, DbError> {
    // `mariadbd  Ver 10.11.19-MariaDB-0+deb12u1 for debian-linux-gnu`
    server::installed("MariaDB", "mariadbd", "mariadb-server", version, |text| {
        let word = text.split_whitespace().skip_while(|w| *w != "Ver").nth(1)?;
        word.split('-').next()
    })
}

/// A MariaDB string literal (backslashes are escapes there).
fn literal(s: &str) -> Result<String, DbError> {
    server::sql_literal(&s.replace('\\', "\\\\"))
}

fn ident(s: &str) -> Result<String, DbError> {
    if s.is_empty() || s.contains('\0') {
        return Err(DbError::Unsupported(format!("`{s}` is not a MariaDB name")));
    }
    Ok(format!("`{}`", s.replace('`', "``")))
}

/// The client over loopback TCP as `user`.
fn client<'a>(instance: &Instance, user: &str, pw: &str) -> Tool<'a> {
    Tool::new("mariadb")
        .args(["--no-defaults", "--protocol=tcp", "-h", "127.0.0.1"])
        .args(["-P", &instance.port.to_string(), "-u", user])
        .args(["--batch", "--skip-column-names", "--connect-timeout=5"])
        .env("MYSQL_PWD", pw)
        .inside(container_of(instance).map(|c| c.name.as_str()))
}

/// The server's arguments besides its data directory, socket and temporary directory.
fn server_args(instance: &Instance) -> Vec<String> {
    vec![
        "--no-defaults".to_owned(),
        format!("--port={}", instance.port),
        "--bind-address=*".to_owned(),
        "--skip-name-resolve".to_owned(),
        "--skip-log-bin".to_owned(),
    ]
}

/// The admin user's SQL (its password in it: stdin or a 0600 file only).
fn admin_sql(admin: &str) -> Result<String, DbError> {
    Ok(format!(
        "CREATE USER IF NOT EXISTS '{ADMIN}'@'%' IDENTIFIED BY {pw};\n\
         ALTER USER '{ADMIN}'@'%' IDENTIFIED BY {pw};\n\
         GRANT ALL PRIVILEGES ON *.* TO '{ADMIN}'@'%' WITH GRANT OPTION;\n",
        pw = literal(admin)?
    ))
}

/// In a container: `mariadb-install-db` into a fresh volume, the server started, the admin user made
/// by the image's root over the unix socket (SQL on stdin), then marked initialized.
async fn start_container(
    instance: &Instance,
    c: &Container,
    admin: &str,
    scrub: &Scrub,
) -> Result<(), DbError> {
    let initialized = instance.dir.join("initialized");
    if !initialized.exists() {
        container::fresh_volume(c, scrub).await?;
        let args: Vec<String> = [
            "--no-defaults".to_owned(),
            "--skip-test-db".to_owned(),
            "--auth-root-authentication-method=socket".to_owned(),
            format!("--datadir={CONTAINER_DATA}"),
            "--tmpdir=/tmp".to_owned(),
        ]
        .to_vec();
        container::run_once(
            c,
            "mysql",
            MOUNT,
            "mariadb-install-db",
            &args,
            Vec::new(),
            scrub,
        )
        .await?;
    }
    match container::state(c).await? {
        Some(true) => {}
        Some(false) => container::start(c, scrub).await?,
        None => {
            let mut args = server_args(instance);
            args.extend([
                format!("--datadir={CONTAINER_DATA}"),
                format!("--socket={CONTAINER_SOCKET}"),
                "--tmpdir=/tmp".to_owned(),
            ]);
            container::create(c, "mysql", MOUNT, "mariadbd", &args, scrub).await?;
            container::start(c, scrub).await?;
        }
    }
    if !initialized.exists() {
        let socket = format!("--socket={CONTAINER_SOCKET}");
        let root = || {
            Tool::new("docker")
                .args([
                    "exec",
                    "--interactive",
                    "--user",
                    "root",
                    &c.name,
                    "mariadb",
                ])
                .args(["--no-defaults", "-u", "root", &socket])
        };
        let log = instance.dir.join("server.log");
        let up = server::wait_ready(Duration::from_secs(60), &log, scrub, || async {
            root().stdin("SELECT 1;").run(scrub).await.map(|_| ())
        })
        .await;
        container::with_logs(c, up, scrub).await?;
        root().stdin(admin_sql(admin)?).run(scrub).await?;
        std::fs::write(&initialized, b"").map_err(|e| server::io("writing", &instance.dir, e))?;
    }
    Ok(())
}

pub(crate) async fn ensure(instance: &Instance, app: &Login, scrub: &Scrub) -> Result<(), DbError> {
    if app.user == ADMIN || app.user == "root" || app.user == "mysql" {
        return Err(DbError::Unsupported(format!(
            "`{}` is one of the instance's own accounts; an app login needs another name",
            app.user
        )));
    }
    let container = container_of(instance);
    let account = match container {
        Some(_) => None,
        None => server::account("mysql")?,
    };
    server::make_dir(&instance.dir, account)?;
    let admin = server::admin_password(&instance.dir)?;
    let data = data(instance);
    let init_sql = instance.dir.join("init.sql");
    let (pidfile, cwd, _) = pid_site(instance);
    let log = instance.dir.join("server.log");
    if let Some(c) = container {
        start_container(instance, c, &admin, scrub).await?;
    } else {
        let exe = server_binary(&instance.version)?;
        if !instance.dir.join("initialized").exists() {
            init(instance, account, scrub).await?;
            // The admin user, made by the server itself on its first start.
            server::write_private(&init_sql, admin_sql(&admin)?.as_bytes(), account)?;
            std::fs::write(instance.dir.join("initialized"), b"")
                .map_err(|e| server::io("writing", &instance.dir, e))?;
        }
        if server::live_pid(&pidfile, &cwd).is_none() {
            let _ = std::fs::remove_file(&pidfile);
            let mut args = server_args(instance);
            args.extend([
                format!("--datadir={}", data.display()),
                format!("--socket={}", socket(instance).display()),
                format!("--pid-file={}", pidfile.display()),
                format!("--tmpdir={}", tmpdir(instance, account)?.display()),
            ]);
            if init_sql.exists() {
                args.push(format!("--init-file={}", init_sql.display()));
            }
            server::spawn_detached(&exe, &args, &data, &log, account)?;
        }
    }
    server::wait_ready(Duration::from_secs(60), &log, scrub, || async {
        client(instance, ADMIN, &admin)
            .stdin("SELECT 1;")
            .run(scrub)
            .await
            .map(|_| ())
    })
    .await?;
    let _ = std::fs::remove_file(&init_sql);
    let user = literal(&app.user)?;
    let pw = literal(password(app)?)?;
    let db = ident(&app.database)?;
    let sql = format!(
        "CREATE USER IF NOT EXISTS {user}@'%' IDENTIFIED BY {pw};\n\
         ALTER USER {user}@'%' IDENTIFIED BY {pw};\n\
         CREATE DATABASE IF NOT EXISTS {db};\n\
         GRANT ALL PRIVILEGES ON {db}.* TO {user}@'%';\n"
    );
    client(instance, ADMIN, &admin)
        .stdin(sql)
        .run(scrub)
        .await?;
    client(instance, &app.user, password(app)?)
        .args(["-D", &app.database])
        .stdin("SELECT 1;")
        .run(scrub)
        .await
        .map(|_| ())
}

async fn init(instance: &Instance, account: Option<Account>, scrub: &Scrub) -> Result<(), DbError> {
    let data = data(instance);
    match std::fs::remove_dir_all(&data) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(server::io("removing the half-made", &data, e)),
    }
    server::make_dir(&data, account)?;
    // As the server's account already (no `--user`: the tool would try to chown the system's PAM
    // helper), with a temporary directory of the instance's own: two bootstraps at once in a shared
    // /tmp collide on their temporary tables' names.
    let tool = Tool::new("mariadb-install-db")
        .args([
            "--no-defaults",
            "--skip-test-db",
            "--auth-root-authentication-method=socket",
        ])
        .args([
            format!("--datadir={}", data.display()),
            format!("--tmpdir={}", tmpdir(instance, account)?.display()),
        ])
        .account(account)
        .cwd(&instance.dir);
    tool.run(scrub).await.map(|_| ())
}

/// `mariadb-dump --single-transaction` of the login's database (no `CREATE DATABASE`, so it restores
/// into any name).
pub(crate) fn dump<'a>(instance: &Instance, login: &Login) -> Result<Tool<'a>, DbError> {
    let admin = server::admin_password(&instance.dir)?;
    Ok(Tool::new("mariadb-dump")
        .args(["--no-defaults", "--protocol=tcp", "-h", "127.0.0.1"])
        .args(["-P", &instance.port.to_string(), "-u", ADMIN])
        .args([
            "--single-transaction",
            "--routines",
            "--triggers",
            "--events",
        ])
        .args(["--", &login.database])
        .env("MYSQL_PWD", admin)
        .inside(container_of(instance).map(|c| c.name.as_str())))
}

/// The verified dump fed to the client, into the login's database.
pub(crate) async fn restore(
    instance: &Instance,
    login: &Login,
    file: &Path,
    scrub: &Scrub,
) -> Result<(), DbError> {
    let admin = server::admin_password(&instance.dir)?;
    let input = std::fs::File::open(file).map_err(|e| server::io("opening", file, e))?;
    let tool = client(instance, ADMIN, &admin).args(["-D", &login.database]);
    let out = tool
        .command()
        .stdin(Stdio::from(input))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| DbError::Unsupported(format!("cannot run mariadb: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(scrub.failed(
            format_args!("mariadb failed restoring ({})", out.status),
            &String::from_utf8_lossy(&out.stderr),
        ))
    }
}

/// Exact row counts of the login's database's tables.
pub(crate) async fn counts(
    instance: &Instance,
    login: &Login,
    scrub: &Scrub,
) -> Result<BTreeMap<String, u64>, DbError> {
    let admin = server::admin_password(&instance.dir)?;
    let tables = client(instance, ADMIN, &admin)
        .stdin(format!(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = {} \
             AND table_type = 'BASE TABLE' ORDER BY 1;",
            literal(&login.database)?
        ))
        .run(scrub)
        .await?;
    let db = ident(&login.database)?;
    let queries = tables
        .lines()
        .filter(|t| !t.is_empty())
        .map(|t| {
            Ok(format!(
                "SELECT CONCAT({}, '|', COUNT(*)) FROM {db}.{};\n",
                literal(t)?,
                ident(t)?
            ))
        })
        .collect::<Result<String, DbError>>()?;
    if queries.is_empty() {
        return Ok(BTreeMap::new());
    }
    let out = client(instance, ADMIN, &admin)
        .stdin(queries)
        .run(scrub)
        .await?;
    super::parse_counts(&out)
}
