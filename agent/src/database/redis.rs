//! Redis from Debian's `redis-server`: a `redis.conf` written by the agent, ACL users in an ACL file
//! (passwords stored as SHA-256 by Redis itself), RDB snapshots, no unix socket. The agent talks RESP
//! to it directly (so passwords travel only on the loopback connection, never in argv); backups are
//! `redis-cli --rdb -` (its password in `REDISCLI_AUTH`).
//!
//! Layout of `instance.dir`: `redis.conf`, `users.acl`, `data/` (`dump.rdb`), `redis.pid`,
//! `admin.password` (the `default` user's, 0600), `server.log`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use super::server::{self, Scrub, Tool};
use super::{Container, DbError, Instance, Login, Runtime, container, password};

/// In a container: the volume's mount point (the official image's `/data`, owned by `redis`).
const MOUNT: &str = "/data";

const ADMIN: &str = "default";

pub(crate) fn pid_site(instance: &Instance) -> (PathBuf, PathBuf, rustix::process::Signal) {
    (
        instance.dir.join("redis.pid"),
        instance.dir.join("data"),
        rustix::process::Signal::TERM,
    )
}

/// `redis-server`, when its version is `version`.
fn binary(version: &str) -> Result<PathBuf, DbError> {
    // `Redis server v=7.0.15 sha=...`
    server::installed("Redis", "redis-server", "redis-server", version, |text| {
        text.split_whitespace().find_map(|w| w.strip_prefix("v="))
    })
}

/// A quoted redis.conf argument.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

pub(crate) async fn ensure(instance: &Instance, app: &Login, scrub: &Scrub) -> Result<(), DbError> {
    if app.user == ADMIN {
        return Err(DbError::Unsupported(format!(
            "`{ADMIN}` is the instance's own admin user; an app login needs another name"
        )));
    }
    if let Runtime::Container(c) = &instance.runtime {
        return ensure_container(instance, c, app, scrub).await;
    }
    let exe = binary(&instance.version)?;
    let account = server::account("redis")?;
    let data = instance.dir.join("data");
    server::make_dir(&instance.dir, account)?;
    server::make_dir(&data, account)?;
    let admin = server::admin_password(&instance.dir)?;
    let (pidfile, cwd, _) = pid_site(instance);
    let conf = instance.dir.join("redis.conf");
    let acl = instance.dir.join("users.acl");
    let log = instance.dir.join("server.log");
    if !acl.exists() {
        server::write_private(&acl, admin_acl(&admin).as_bytes(), account)?;
    }
    let mut text =
        "# cairn: a managed database (written by the agent on every ensure).\n".to_owned();
    for (k, v) in settings(
        instance.port,
        &quoted(&data.to_string_lossy()),
        &quoted(&acl.to_string_lossy()),
    ) {
        text.push_str(&format!("{k} {v}\n"));
    }
    text.push_str(&format!(
        "pidfile {}\nlogfile \"\"\n",
        quoted(&pidfile.to_string_lossy())
    ));
    server::write_private(&conf, text.as_bytes(), account)?;
    if server::live_pid(&pidfile, &cwd).is_none() {
        let _ = std::fs::remove_file(&pidfile);
        server::spawn_detached(
            &exe,
            &[conf.to_string_lossy().into_owned()],
            &data,
            &log,
            account,
        )?;
    }
    answers_ping(instance, &admin, &log, scrub, Duration::from_secs(30)).await?;
    set_login(instance, &admin, app, scrub).await
}

/// The admin user's ACL line (its password as Redis stores it: SHA-256).
fn admin_acl(admin: &str) -> String {
    format!(
        "user {ADMIN} on #{} ~* &* +@all\n",
        hex::encode(Sha256::digest(admin.as_bytes()))
    )
}

/// The server's settings, for a config file or (in a container) its command line.
fn settings(port: u16, dir: &str, acl: &str) -> Vec<(&'static str, String)> {
    vec![
        ("bind", "* -::*".to_owned()),
        ("protected-mode", "no".to_owned()),
        ("port", port.to_string()),
        ("daemonize", "no".to_owned()),
        ("dir", dir.to_owned()),
        ("dbfilename", "dump.rdb".to_owned()),
        ("save", "3600 1 300 100 60 10000".to_owned()),
        ("appendonly", "no".to_owned()),
        ("aclfile", acl.to_owned()),
    ]
}

/// In a container: the ACL file written into a fresh volume by the image's `tee` (as `redis`, so the
/// server can save it), the server run with its settings as arguments.
async fn ensure_container(
    instance: &Instance,
    c: &Container,
    app: &Login,
    scrub: &Scrub,
) -> Result<(), DbError> {
    server::make_dir(&instance.dir, None)?;
    let admin = server::admin_password(&instance.dir)?;
    let acl = format!("{MOUNT}/users.acl");
    if !instance.dir.join("initialized").exists() {
        container::fresh_volume(c, scrub).await?;
        container::run_once(
            c,
            "redis",
            MOUNT,
            "tee",
            std::slice::from_ref(&acl),
            admin_acl(&admin).into_bytes(),
            scrub,
        )
        .await?;
        std::fs::write(instance.dir.join("initialized"), b"")
            .map_err(|e| server::io("writing", &instance.dir, e))?;
    }
    match container::state(c).await? {
        Some(true) => {}
        Some(false) => container::start(c, scrub).await?,
        None => {
            let mut args = Vec::new();
            for (k, v) in settings(instance.port, MOUNT, &acl) {
                args.push(format!("--{k}"));
                args.extend(v.split(' ').map(str::to_owned));
            }
            container::create(c, "redis", MOUNT, "redis-server", &args, scrub).await?;
            container::start(c, scrub).await?;
        }
    }
    let log = instance.dir.join("server.log");
    let ready = answers_ping(instance, &admin, &log, scrub, Duration::from_secs(30)).await;
    container::with_logs(c, ready, scrub).await?;
    set_login(instance, &admin, app, scrub).await
}

/// Makes `app` the login its password says (ACL saved), and checks that it logs in.
async fn set_login(
    instance: &Instance,
    admin: &str,
    app: &Login,
    scrub: &Scrub,
) -> Result<(), DbError> {
    let pw = password(app)?;
    let mut c = Conn::open(instance.port, ADMIN, admin).await?;
    // `reset` first: a rotation leaves only the new password.
    let pass = format!(">{pw}");
    c.call(&[
        "ACL", "SETUSER", &app.user, "reset", "on", &pass, "~*", "&*", "+@all",
    ])
    .await
    .map_err(|e| DbError::Failed(scrub.clean(&e.to_string())))?;
    c.call(&["ACL", "SAVE"]).await?;
    let mut mine = Conn::open(instance.port, &app.user, pw)
        .await
        .map_err(|e| DbError::Failed(scrub.clean(&e.to_string())))?;
    mine.call(&["PING"]).await.map(|_| ())
}

/// `redis-cli --rdb -`: the server's snapshot on stdout.
pub(crate) fn dump<'a>(instance: &Instance) -> Result<Tool<'a>, DbError> {
    let admin = server::admin_password(&instance.dir)?;
    let inside = match &instance.runtime {
        Runtime::Container(c) => Some(c.name.as_str()),
        Runtime::Process => None,
    };
    Ok(Tool::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &instance.port.to_string()])
        .args(["--no-auth-warning", "--rdb", "-"])
        .env("REDISCLI_AUTH", admin)
        .inside(inside))
}

/// The verified snapshot becomes the data directory's `dump.rdb` while the server is stopped; it
/// loads it as it starts.
pub(crate) async fn restore(
    instance: &Instance,
    file: &Path,
    scrub: &Scrub,
) -> Result<(), DbError> {
    if let Runtime::Container(c) = &instance.runtime {
        // Stopped (its last save, of nothing: restore checked it is empty, goes first), the snapshot
        // put in its place in the volume, started again: it loads it.
        container::stop(c).await?;
        container::copy_in(c, file, &format!("{MOUNT}/dump.rdb"), scrub).await?;
        container::start(c, scrub).await?;
        let admin = server::admin_password(&instance.dir)?;
        let log = instance.dir.join("server.log");
        return answers_ping(instance, &admin, &log, scrub, Duration::from_secs(60)).await;
    }
    let (pidfile, cwd, signal) = pid_site(instance);
    let Some(pid) = server::live_pid(&pidfile, &cwd) else {
        return Err(DbError::Failed(format!(
            "Redis `{}` is not running; ensure it before restoring into it",
            instance.name
        )));
    };
    // Stopped without a final save, so what it held (nothing: restore checked) is not written over
    // the snapshot below.
    let admin = server::admin_password(&instance.dir)?;
    if let Ok(mut c) = Conn::open(instance.port, ADMIN, &admin).await {
        let _ = c.call(&["SHUTDOWN", "NOSAVE"]).await;
    }
    server::terminate(pid, &cwd, signal, Duration::from_secs(30)).await;
    let account = server::account("redis")?;
    let rdb = cwd.join("dump.rdb");
    std::fs::rename(file, &rdb).map_err(|e| server::io("placing the snapshot at", &rdb, e))?;
    if let Some(a) = account {
        server::chown(&rdb, a)?;
    }
    let log = instance.dir.join("server.log");
    server::spawn_detached(
        Path::new("redis-server"),
        &[instance
            .dir
            .join("redis.conf")
            .to_string_lossy()
            .into_owned()],
        &cwd,
        &log,
        account,
    )?;
    answers_ping(instance, &admin, &log, scrub, Duration::from_secs(60)).await
}

/// Waits until the server answers the admin's PING, for at most `patience` (the log's tail otherwise).
async fn answers_ping(
    instance: &Instance,
    admin: &str,
    log: &Path,
    scrub: &Scrub,
    patience: Duration,
) -> Result<(), DbError> {
    server::wait_ready(patience, log, scrub, || async {
        let mut c = Conn::open(instance.port, ADMIN, admin).await?;
        c.call(&["PING"]).await.map(|_| ())
    })
    .await
}

/// Keys per database (`db0`, ...), from `INFO keyspace`.
pub(crate) async fn counts(
    instance: &Instance,
    scrub: &Scrub,
) -> Result<BTreeMap<String, u64>, DbError> {
    let admin = server::admin_password(&instance.dir)?;
    let mut c = Conn::open(instance.port, ADMIN, &admin)
        .await
        .map_err(|e| DbError::Failed(scrub.clean(&e.to_string())))?;
    let info = c.call(&["INFO", "keyspace"]).await?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (db, rest) = line.trim().split_once(':')?;
            let keys = rest.split(',').find_map(|kv| kv.strip_prefix("keys="))?;
            Some((db.to_owned(), keys.parse().ok()?))
        })
        .collect())
}

/// A RESP connection on loopback, authenticated.
struct Conn {
    io: BufReader<TcpStream>,
}

impl Conn {
    async fn open(port: u16, user: &str, password: &str) -> Result<Conn, DbError> {
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .map_err(|_| DbError::Failed(format!("connecting to Redis on port {port} timed out")))?
        .map_err(|e| DbError::Failed(format!("connecting to Redis on port {port}: {e}")))?;
        let mut c = Conn {
            io: BufReader::new(stream),
        };
        c.call(&["AUTH", user, password])
            .await
            .map_err(|e| DbError::Failed(format!("Redis refused the login of `{user}`: {e}")))?;
        Ok(c)
    }

    /// Sends one command; its reply as text (a simple or bulk string; an array is not needed here).
    async fn call(&mut self, args: &[&str]) -> Result<String, DbError> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        let io_err = |e: std::io::Error| DbError::Failed(format!("talking to Redis: {e}"));
        tokio::time::timeout(Duration::from_secs(30), async {
            self.io.get_mut().write_all(&req).await.map_err(io_err)?;
            let mut line = String::new();
            self.io.read_line(&mut line).await.map_err(io_err)?;
            let line = line.trim_end();
            match line.split_at_checked(1) {
                Some(("+", rest)) | Some((":", rest)) => Ok(rest.to_owned()),
                // The server's own error text (`WRONGPASS ...`): it never echoes arguments.
                Some(("-", rest)) => Err(DbError::Failed(rest.to_owned())),
                Some(("$", len)) => {
                    let len: i64 = len
                        .parse()
                        .map_err(|_| DbError::Failed(format!("a bad Redis reply `{line}`")))?;
                    if len < 0 {
                        return Ok(String::new());
                    }
                    let mut buf = vec![0u8; len as usize + 2];
                    self.io.read_exact(&mut buf).await.map_err(io_err)?;
                    buf.truncate(len as usize);
                    Ok(String::from_utf8_lossy(&buf).into_owned())
                }
                _ => Err(DbError::Failed(format!(
                    "an unexpected Redis reply `{line}`"
                ))),
            }
        })
        .await
        .map_err(|_| DbError::Failed("Redis did not answer within 30 s".into()))?
    }
}
