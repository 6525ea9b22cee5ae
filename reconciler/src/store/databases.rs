//! Managed databases in PostgreSQL: the applied `databases` (spec, node, port, the instance attached
//! apps use, the credential generation), their server instances with the login's password stored only
//! as age ciphertext to the control plane's recipient, the backups ledger, the backup schedules and the
//! upgrades ledger (`database_upgrades`).
//! Runtime-checked queries (no `.sqlx/` data).
//!
//! What it must not do: hold a password in plaintext past the call that needs it, or write one to a
//! column, a log line or an error.

use std::collections::BTreeMap;

use cairn_plan::observed::{AppliedDatabase, ObservedDatabase};
use cairn_schema::{Identity, Name, Recipient, Secret};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row as _};

use super::decode::{json, name};
use super::{Op as _, StoreError, to_i64, to_u64};

/// Reads the applied databases, each with the time of its last good backup.
pub async fn load(conn: &mut PgConnection) -> Result<BTreeMap<Name, ObservedDatabase>, StoreError> {
    let rows = sqlx::query(
        "SELECT d.name, d.spec, d.node, d.port, d.instance, d.credential,
                (SELECT max(b.finished_at) FROM database_backups b
                  WHERE b.database = d.name AND b.state = 'ok') AS last_good
           FROM databases d",
    )
    .fetch_all(conn)
    .await
    .op("read databases")?;
    let mut out = BTreeMap::new();
    for r in rows {
        let op = "read databases";
        let n: String = r.try_get("name").op(op)?;
        let spec: serde_json::Value = r.try_get("spec").op(op)?;
        let node: String = r.try_get("node").op(op)?;
        let port: i32 = r.try_get("port").op(op)?;
        let instance: String = r.try_get("instance").op(op)?;
        let credential: i64 = r.try_get("credential").op(op)?;
        let last_good: Option<DateTime<Utc>> = r.try_get("last_good").op(op)?;
        out.insert(
            name("databases", &n)?,
            ObservedDatabase {
                spec: json("databases", "spec", spec)?,
                node: name("databases", &node)?,
                port: u16::try_from(port)
                    .map_err(|_| super::decode::corrupt("databases", "port", port))?,
                instance: name("databases", &instance)?,
                credential: to_u64("databases", "credential", credential)?,
                last_good_backup: last_good,
            },
        );
    }
    Ok(out)
}

/// Makes `databases` exactly `next` (the plan's `next_databases`), with each one's `backup` as the
/// manifest wrote it (`backup_sealed`: its S3 keys the repository's ciphertexts), and records a server
/// instance for every database placed on a node it had no instance on.
pub async fn write(
    conn: &mut PgConnection,
    next: &BTreeMap<Name, ObservedDatabase>,
    desired: &BTreeMap<Name, cairn_schema::Database>,
    generation: u64,
) -> Result<(), StoreError> {
    let names: Vec<String> = next.keys().map(|n| n.to_string()).collect();
    sqlx::query("DELETE FROM databases WHERE name <> ALL($1)")
        .bind(&names)
        .execute(&mut *conn)
        .await
        .op("delete databases")?;
    for (n, d) in next {
        let spec = serde_json::to_value(&d.spec).expect("a database spec serializes");
        let backup = desired
            .get(n)
            .and_then(|db| db.backup.as_ref())
            .map(|b| serde_json::to_value(b).expect("a backup serializes"));
        sqlx::query(
            "INSERT INTO databases (name, spec, backup_sealed, node, port, instance, credential, generation)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (name) DO UPDATE SET
                 spec = EXCLUDED.spec, backup_sealed = EXCLUDED.backup_sealed, node = EXCLUDED.node,
                 port = EXCLUDED.port, instance = EXCLUDED.instance, credential = EXCLUDED.credential,
                 generation = EXCLUDED.generation, updated_at = now()
             WHERE (databases.spec, databases.backup_sealed, databases.node, databases.port,
                    databases.instance, databases.credential)
                   IS DISTINCT FROM (EXCLUDED.spec, EXCLUDED.backup_sealed, EXCLUDED.node,
                    EXCLUDED.port, EXCLUDED.instance, EXCLUDED.credential)",
        )
        .bind(n.as_str())
        .bind(spec)
        .bind(backup)
        .bind(d.node.as_str())
        .bind(i32::from(d.port))
        .bind(d.instance.as_str())
        .bind(to_i64("credential", d.credential)?)
        .bind(to_i64("generation", generation)?)
        .execute(&mut *conn)
        .await
        .op("write a database")?;
        upsert_instance(conn, &d.instance, n, &d.spec, &d.node, d.port).await?;
        if let Some(db) = desired.get(n)
            && let Some(b) = &db.backup
        {
            let next = |s: &cairn_schema::Schedule| {
                s.cron()
                    .next_after(Utc::now().timestamp())
                    .and_then(|t| DateTime::from_timestamp(t, 0))
            };
            if let Some(next_at) = next(&b.schedule) {
                // A schedule keeps its next run while it is unchanged (an apply does not postpone it).
                sqlx::query(
                    "INSERT INTO database_schedules (database, schedule, next_at, verify, verify_next_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (database) DO UPDATE SET schedule = EXCLUDED.schedule,
                         next_at = CASE WHEN database_schedules.schedule = EXCLUDED.schedule
                                        THEN database_schedules.next_at ELSE EXCLUDED.next_at END,
                         verify = EXCLUDED.verify,
                         verify_next_at = CASE
                             WHEN database_schedules.verify IS NOT DISTINCT FROM EXCLUDED.verify
                                  AND database_schedules.verify_next_at IS NOT NULL
                             THEN database_schedules.verify_next_at ELSE EXCLUDED.verify_next_at END",
                )
                .bind(n.as_str())
                .bind(b.schedule.as_str())
                .bind(next_at)
                .bind(db.verify.as_str())
                .bind(next(&db.verify))
                .execute(&mut *conn)
                .await
                .op("write a backup schedule")?;
            }
        }
    }
    sqlx::query(
        "DELETE FROM database_schedules s WHERE NOT EXISTS (
             SELECT 1 FROM databases d WHERE d.name = s.database AND d.backup_sealed IS NOT NULL)",
    )
    .execute(&mut *conn)
    .await
    .op("delete backup schedules")?;
    Ok(())
}

/// Records the server instance `instance` of `database` on `node`: a new row, or the same name placed
/// afresh (a move), which starts without a password (a new server makes new credentials). An instance
/// staying on its node keeps its version: a new `version` runs in a new instance (an upgrade).
pub async fn upsert_instance(
    conn: &mut PgConnection,
    instance: &Name,
    database: &Name,
    spec: &AppliedDatabase,
    node: &Name,
    port: u16,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO database_instances (name, database, engine, version, node, port, login_user, login_db)
         VALUES ($1, $2, $3, $4, $5, $6, 'app', $7)
         ON CONFLICT (name) DO UPDATE SET
             engine = EXCLUDED.engine, state = 'active',
             version = CASE WHEN database_instances.node = EXCLUDED.node
                            THEN database_instances.version ELSE EXCLUDED.version END,
             node = EXCLUDED.node, port = EXCLUDED.port,
             password_sealed = CASE WHEN database_instances.node = EXCLUDED.node
                                    THEN database_instances.password_sealed END,
             updated_at = now()
         WHERE (database_instances.engine, database_instances.version, database_instances.node,
                database_instances.port, database_instances.state)
               IS DISTINCT FROM (EXCLUDED.engine,
                                 CASE WHEN database_instances.node = EXCLUDED.node
                                      THEN database_instances.version ELSE EXCLUDED.version END,
                                 EXCLUDED.node, EXCLUDED.port, 'active')",
    )
    .bind(instance.as_str())
    .bind(database.as_str())
    .bind(spec.engine.as_str())
    .bind(&spec.version)
    .bind(node.as_str())
    .bind(i32::from(port))
    .bind(login_db(spec.engine, database))
    .execute(conn)
    .await
    .op("write a database instance")?;
    Ok(())
}

/// The ports of every instance on any node, dropped ones too: a dropped instance keeps its row, and
/// `(node, port)` is unique, so its port is never given to another.
pub async fn instance_ports(
    conn: &mut PgConnection,
) -> Result<std::collections::BTreeSet<u16>, StoreError> {
    let ports: Vec<i32> = sqlx::query_scalar("SELECT DISTINCT port FROM database_instances")
        .fetch_all(conn)
        .await
        .op("read the database ports in use")?;
    Ok(ports
        .into_iter()
        .filter_map(|p| u16::try_from(p).ok())
        .collect())
}

/// The database a login uses: the database's name (PostgreSQL and MariaDB), `0` for Redis.
pub fn login_db(engine: cairn_schema::database::Engine, database: &Name) -> String {
    match engine {
        cairn_schema::database::Engine::Redis => "0".to_owned(),
        _ => database.to_string(),
    }
}

/// One server instance as stored (without its password).
#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub name: Name,
    pub database: Name,
    pub engine: cairn_schema::database::Engine,
    pub version: String,
    pub node: Name,
    pub port: u16,
    pub state: String,
    pub user: String,
    pub db: String,
    pub retired_users: Vec<String>,
}

/// An instance by name.
pub async fn instance(
    conn: &mut PgConnection,
    instance: &Name,
) -> Result<Option<InstanceRow>, StoreError> {
    let row = sqlx::query(
        "SELECT name, database, engine, version, node, port, state, login_user, login_db, retired_users
           FROM database_instances WHERE name = $1",
    )
    .bind(instance.as_str())
    .fetch_optional(conn)
    .await
    .op("read a database instance")?;
    let Some(r) = row else { return Ok(None) };
    let op = "read a database instance";
    let engine: String = r.try_get("engine").op(op)?;
    let port: i32 = r.try_get("port").op(op)?;
    Ok(Some(InstanceRow {
        name: name(
            "database_instances",
            &r.try_get::<String, _>("name").op(op)?,
        )?,
        database: name(
            "database_instances",
            &r.try_get::<String, _>("database").op(op)?,
        )?,
        engine: cairn_schema::database::Engine::parse(&engine)
            .ok_or_else(|| super::decode::corrupt("database_instances", "engine", &engine))?,
        version: r.try_get("version").op(op)?,
        node: name(
            "database_instances",
            &r.try_get::<String, _>("node").op(op)?,
        )?,
        port: u16::try_from(port)
            .map_err(|_| super::decode::corrupt("database_instances", "port", port))?,
        state: r.try_get("state").op(op)?,
        user: r.try_get("login_user").op(op)?,
        db: r.try_get("login_db").op(op)?,
        retired_users: r.try_get("retired_users").op(op)?,
    }))
}

/// Why a password could not be had. Never carries one.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "the control plane has no identity (`cairn serve --identity FILE`), so it cannot keep database passwords"
    )]
    NoIdentity,
    #[error(
        "the stored password of database instance `{0}` does not decrypt with the control plane's identity"
    )]
    Decrypt(Name, #[source] cairn_schema::SecretError),
    #[error("cannot encrypt a database password")]
    Encrypt(#[source] cairn_schema::SecretError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The instance's login password: the stored one opened with the control plane's identity, or a new
/// one made now and stored sealed to its recipient (the first caller wins; the others read it).
pub async fn password(
    conn: &mut PgConnection,
    identity: Option<&Identity>,
    instance: &Name,
) -> Result<Secret, CredentialError> {
    let identity = identity.ok_or(CredentialError::NoIdentity)?;
    for _ in 0..2 {
        let sealed: Option<Option<String>> =
            sqlx::query_scalar("SELECT password_sealed FROM database_instances WHERE name = $1")
                .bind(instance.as_str())
                .fetch_optional(&mut *conn)
                .await
                .op("read a database password")?;
        match sealed {
            None => {
                return Err(StoreError::Corrupt {
                    table: "database_instances",
                    column: "name",
                    detail: format!("no instance `{instance}`"),
                }
                .into());
            }
            Some(Some(ct)) => {
                let ct = cairn_schema::Ciphertext::new(&ct)
                    .map_err(|e| CredentialError::Decrypt(instance.clone(), e))?;
                return identity
                    .decrypt(&ct)
                    .map_err(|e| CredentialError::Decrypt(instance.clone(), e));
            }
            Some(None) => {
                let fresh = new_password();
                let ct = cairn_schema::secret::encrypt(fresh.expose(), &[identity.recipient()])
                    .map_err(CredentialError::Encrypt)?;
                let done = sqlx::query(
                    "UPDATE database_instances SET password_sealed = $2, updated_at = now()
                      WHERE name = $1 AND password_sealed IS NULL",
                )
                .bind(instance.as_str())
                .bind(ct.as_str())
                .execute(&mut *conn)
                .await
                .op("store a database password")?;
                if done.rows_affected() == 1 {
                    return Ok(fresh);
                }
            }
        }
    }
    Err(StoreError::Corrupt {
        table: "database_instances",
        column: "password_sealed",
        detail: format!("instance `{instance}`'s password keeps changing"),
    }
    .into())
}

/// 32 random letters and digits (190 bits): nothing in a URL needs escaping.
fn new_password() -> Secret {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let bytes: Vec<u8> = (0..32)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
        .collect();
    Secret::new(bytes)
}

/// `{"password": "..."}` sealed to `recipient`.
pub fn seal_login(password: &Secret, recipient: &Recipient) -> Result<String, CredentialError> {
    let p = password.expose_str().map_err(CredentialError::Encrypt)?;
    let json = zeroize::Zeroizing::new(
        serde_json::to_vec(&serde_json::json!({ "password": p })).expect("a login serializes"),
    );
    let ct = cairn_schema::secret::encrypt(&json, std::slice::from_ref(recipient))
        .map_err(CredentialError::Encrypt)?;
    Ok(ct.as_str().to_owned())
}

/// The URL an attached app gets for `row` reached at `host` ([`cairn_schema::database::url`]: the
/// login's user in it for every engine, Redis's an ACL user). A secret.
pub fn url(row: &InstanceRow, password: &Secret, host: &str) -> Result<Secret, CredentialError> {
    Ok(cairn_schema::database::url(
        row.engine,
        &row.user,
        password.expose(),
        host,
        row.port,
        &row.db,
    ))
}

/// What an app's attached databases' env vars hold now: per env var, the binding fingerprint (what the
/// release was planned with) and the URL. The host is loopback on the database's own node, else the
/// database node's `address` host.
pub async fn app_urls(
    conn: &mut PgConnection,
    identity: Option<&Identity>,
    app: &Name,
    app_node: &Name,
) -> Result<BTreeMap<String, (String, Secret)>, CredentialError> {
    let mut out = BTreeMap::new();
    let Some(applied) = super::state::applied_app(&mut *conn, app).await? else {
        return Ok(out);
    };
    for (db, var) in &applied.databases {
        let row = sqlx::query(
            "SELECT d.node, d.port, d.instance, d.credential, n.spec->>'address' AS address
               FROM databases d LEFT JOIN nodes n ON n.name = d.node WHERE d.name = $1",
        )
        .bind(db.as_str())
        .fetch_optional(&mut *conn)
        .await
        .op("read an attached database")?;
        let Some(r) = row else { continue };
        let op = "read an attached database";
        let node = name("databases", &r.try_get::<String, _>("node").op(op)?)?;
        let port: i32 = r.try_get("port").op(op)?;
        let port =
            u16::try_from(port).map_err(|_| super::decode::corrupt("databases", "port", port))?;
        let instance_name = name("databases", &r.try_get::<String, _>("instance").op(op)?)?;
        let credential = to_u64("databases", "credential", r.try_get("credential").op(op)?)?;
        let address: Option<String> = r.try_get("address").op(op)?;
        let Some(inst) = instance(&mut *conn, &instance_name).await? else {
            continue;
        };
        let fingerprint =
            cairn_plan::databases::binding_fingerprint(db, &node, port, &instance_name, credential);
        let host = if &node == app_node {
            "127.0.0.1".to_owned()
        } else {
            address
                .map(|a| host_of(&a))
                .unwrap_or_else(|| "127.0.0.1".to_owned())
        };
        let pw = password(
            &mut *conn,
            Some(identity.ok_or(CredentialError::NoIdentity)?),
            &instance_name,
        )
        .await?;
        out.insert(var.to_string(), (fingerprint, url(&inst, &pw, &host)?));
    }
    Ok(out)
}

/// The host of a node address (`host`, `host:port`, `[v6]:port`).
fn host_of(a: &str) -> String {
    if let Some(rest) = a.strip_prefix('[') {
        return format!("[{}]", rest.split(']').next().unwrap_or(rest));
    }
    a.split(':').next().unwrap_or(a).to_owned()
}

/// One backup run as the ledger keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BackupRow {
    pub id: i64,
    pub database: String,
    pub instance: String,
    pub node: String,
    pub trigger: String,
    pub state: String,
    pub target: String,
    pub object: String,
    pub bytes: Option<i64>,
    pub sha256: Option<String>,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    pub queued_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Rows per table when it was dumped (`None`: the database changed under the dump, or the run
    /// did not finish).
    #[serde(default)]
    pub counts: Option<BTreeMap<String, u64>>,
    /// Its latest verification restore: `queued`, `running`, `ok` or `failed`.
    #[serde(default)]
    pub verified: Option<String>,
    /// Why that verification failed.
    #[serde(default)]
    pub verify_error: Option<String>,
}

/// A database's backups, newest first.
pub async fn backups(
    conn: &mut PgConnection,
    database: &Name,
    limit: i64,
) -> Result<Vec<BackupRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT b.id, b.database, b.instance, b.node, b.trigger, b.state, b.target, b.object,
                b.bytes, b.sha256, b.duration_ms, b.error, b.queued_at, b.finished_at, b.counts,
                v.state AS verified, v.error AS verify_error
           FROM database_backups b
           LEFT JOIN LATERAL (SELECT state, error FROM database_verifications
                               WHERE backup = b.id ORDER BY id DESC LIMIT 1) v ON true
          WHERE b.database = $1 ORDER BY b.id DESC LIMIT $2",
    )
    .bind(database.as_str())
    .bind(limit)
    .fetch_all(conn)
    .await
    .op("read backups")?;
    rows.into_iter()
        .map(|r| {
            let op = "read backups";
            Ok(BackupRow {
                id: r.try_get("id").op(op)?,
                database: r.try_get("database").op(op)?,
                instance: r.try_get("instance").op(op)?,
                node: r.try_get("node").op(op)?,
                trigger: r.try_get("trigger").op(op)?,
                state: r.try_get("state").op(op)?,
                target: r.try_get("target").op(op)?,
                object: r.try_get("object").op(op)?,
                bytes: r.try_get("bytes").op(op)?,
                sha256: r.try_get("sha256").op(op)?,
                duration_ms: r.try_get("duration_ms").op(op)?,
                error: r.try_get("error").op(op)?,
                queued_at: r.try_get("queued_at").op(op)?,
                finished_at: r.try_get("finished_at").op(op)?,
                counts: r
                    .try_get::<Option<serde_json::Value>, _>("counts")
                    .op(op)?
                    .map(|v| json("database_backups", "counts", v))
                    .transpose()?,
                verified: r.try_get("verified").op(op)?,
                verify_error: r.try_get("verify_error").op(op)?,
            })
        })
        .collect()
}

/// A name for a new instance of `database` that no instance has had: `<database>-v<N>`, the database's
/// name shortened so it stays a valid name (at most 63 characters).
pub async fn new_instance_name(
    conn: &mut PgConnection,
    database: &Name,
) -> Result<Name, StoreError> {
    for n in 2..10_000u32 {
        let suffix = format!("-v{n}");
        let base = database.as_str();
        // A name starts with a letter, so something is left of it.
        let base = base[..base.len().min(63 - suffix.len())].trim_end_matches('-');
        let candidate = name("database_instances", &format!("{base}{suffix}"))?;
        if instance(&mut *conn, &candidate).await?.is_none() {
            return Ok(candidate);
        }
    }
    Err(StoreError::Corrupt {
        table: "database_instances",
        column: "name",
        detail: format!("database `{database}` has no free instance name left"),
    })
}

/// The first port from [`cairn_plan::databases::FIRST_PORT`] that no instance has on any node, as the
/// planner chooses ([`instance_ports`]: nodes sharing a host never collide).
pub async fn free_port(conn: &mut PgConnection) -> Result<u16, StoreError> {
    let taken = instance_ports(conn).await?;
    let mut p = cairn_plan::databases::FIRST_PORT;
    while taken.contains(&p) {
        p = p.checked_add(1).ok_or_else(|| StoreError::Corrupt {
            table: "database_instances",
            column: "port",
            detail: "no free port left for a database instance".to_owned(),
        })?;
    }
    Ok(p)
}

/// Sets an instance's state (`active`, `stopped`, `dropped`).
pub async fn set_instance_state(
    conn: &mut PgConnection,
    instance: &Name,
    state: &str,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE database_instances SET state = $2, updated_at = now() WHERE name = $1")
        .bind(instance.as_str())
        .bind(state)
        .execute(conn)
        .await
        .op("write a database instance's state")?;
    Ok(())
}

/// One version upgrade as its ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpgradeRow {
    pub id: i64,
    pub database: String,
    pub node: String,
    /// The instance it dumps: after a success, the pre-upgrade instance (stopped, its data kept).
    pub from_instance: String,
    pub from_version: String,
    /// The new instance it restores into.
    pub to_instance: String,
    pub to_version: String,
    /// `queued`, `running`, `ok`, `failed`, or `finished` (the pre-upgrade instance dropped).
    pub state: String,
    /// What the agent compared (row counts).
    pub detail: Option<String>,
    pub error: Option<String>,
    pub task: Option<i64>,
    pub queued_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

const UPGRADE_COLUMNS: &str = "id, database, node, from_instance, from_version, to_instance, \
     to_version, state, detail, error, task, queued_at, finished_at";

fn upgrade_row(r: &sqlx::postgres::PgRow) -> Result<UpgradeRow, StoreError> {
    let op = "read a database upgrade";
    Ok(UpgradeRow {
        id: r.try_get("id").op(op)?,
        database: r.try_get("database").op(op)?,
        node: r.try_get("node").op(op)?,
        from_instance: r.try_get("from_instance").op(op)?,
        from_version: r.try_get("from_version").op(op)?,
        to_instance: r.try_get("to_instance").op(op)?,
        to_version: r.try_get("to_version").op(op)?,
        state: r.try_get("state").op(op)?,
        detail: r.try_get("detail").op(op)?,
        error: r.try_get("error").op(op)?,
        task: r.try_get("task").op(op)?,
        queued_at: r.try_get("queued_at").op(op)?,
        finished_at: r.try_get("finished_at").op(op)?,
    })
}

/// Writes an upgrade's ledger row (queued). Returns its id.
pub async fn insert_upgrade(
    conn: &mut PgConnection,
    database: &Name,
    node: &Name,
    from: &InstanceRow,
    to: &Name,
    to_version: &str,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO database_upgrades
             (database, node, from_instance, from_version, to_instance, to_version)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(database.as_str())
    .bind(node.as_str())
    .bind(from.name.as_str())
    .bind(&from.version)
    .bind(to.as_str())
    .bind(to_version)
    .fetch_one(conn)
    .await
    .op("write an upgrade row")
}

/// Links an upgrade's row to its task.
pub async fn set_upgrade_task(
    conn: &mut PgConnection,
    id: i64,
    task: Option<i64>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE database_upgrades SET task = $2 WHERE id = $1")
        .bind(id)
        .bind(task)
        .execute(conn)
        .await
        .op("write an upgrade row")?;
    Ok(())
}

/// The upgrade a `db_upgrade` task runs, locked for the caller's transaction.
pub async fn upgrade_by_task(
    conn: &mut PgConnection,
    task: i64,
) -> Result<Option<UpgradeRow>, StoreError> {
    let r = sqlx::query(&format!(
        "SELECT {UPGRADE_COLUMNS} FROM database_upgrades WHERE task = $1 FOR UPDATE"
    ))
    .bind(task)
    .fetch_optional(conn)
    .await
    .op("read a database upgrade")?;
    r.as_ref().map(upgrade_row).transpose()
}

/// A database's upgrades, newest first.
pub async fn upgrades(
    conn: &mut PgConnection,
    database: &Name,
    limit: i64,
) -> Result<Vec<UpgradeRow>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {UPGRADE_COLUMNS} FROM database_upgrades WHERE database = $1 ORDER BY id DESC LIMIT $2"
    ))
    .bind(database.as_str())
    .bind(limit)
    .fetch_all(conn)
    .await
    .op("read database upgrades")?;
    rows.iter().map(upgrade_row).collect()
}

/// Every database's newest upgrade.
pub async fn latest_upgrades(conn: &mut PgConnection) -> Result<Vec<UpgradeRow>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT DISTINCT ON (database) {UPGRADE_COLUMNS} FROM database_upgrades
          ORDER BY database, id DESC"
    ))
    .fetch_all(conn)
    .await
    .op("read database upgrades")?;
    rows.iter().map(upgrade_row).collect()
}

/// Records where an upgrade is: `running` (an attempt failed, another follows), `ok`, `failed` (for
/// good) or `finished`, with the agent's detail or error.
pub async fn set_upgrade_state(
    conn: &mut PgConnection,
    id: i64,
    state: &str,
    detail: Option<&str>,
    error: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE database_upgrades SET state = $2, detail = COALESCE($3, detail), error = $4,
                finished_at = CASE WHEN $2 IN ('ok', 'failed') THEN now() ELSE finished_at END
          WHERE id = $1",
    )
    .bind(id)
    .bind(state)
    .bind(detail)
    .bind(error)
    .execute(conn)
    .await
    .op("record a database upgrade")?;
    Ok(())
}

/// Points `database` at `instance` on `node`:`port` (a swap, an upgrade's success).
pub async fn point_at(
    conn: &mut PgConnection,
    database: &Name,
    instance: &Name,
    node: &Name,
    port: u16,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE databases SET instance = $2, node = $3, port = $4, updated_at = now() WHERE name = $1",
    )
    .bind(database.as_str())
    .bind(instance.as_str())
    .bind(node.as_str())
    .bind(i32::from(port))
    .execute(conn)
    .await
    .op("point a database at an instance")?;
    Ok(done.rows_affected() == 1)
}

/// The instance `database` points at now, if it is applied.
pub async fn current_instance(
    conn: &mut PgConnection,
    database: &Name,
) -> Result<Option<Name>, StoreError> {
    let v: Option<String> =
        sqlx::query_scalar("SELECT instance FROM databases WHERE name = $1 FOR UPDATE")
            .bind(database.as_str())
            .fetch_optional(conn)
            .await
            .op("read a database")?;
    v.map(|v| name("databases", &v)).transpose()
}

/// The instance a database task's payload names.
pub async fn task_instance(conn: &mut PgConnection, task: i64) -> Result<Option<Name>, StoreError> {
    let v: Option<Option<String>> =
        sqlx::query_scalar("SELECT payload->>'instance' FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_optional(conn)
            .await
            .op("read a task's instance")?;
    v.flatten().map(|v| name("tasks", &v)).transpose()
}

/// Ends, as finished, the succeeded upgrades of `database` whose pre-upgrade instance is `instance`
/// (it is being dropped).
pub async fn finish_upgrades_from(
    conn: &mut PgConnection,
    database: &Name,
    instance: &Name,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE database_upgrades SET state = 'finished'
          WHERE database = $1 AND from_instance = $2 AND state = 'ok'",
    )
    .bind(database.as_str())
    .bind(instance.as_str())
    .execute(conn)
    .await
    .op("finish an upgrade")?;
    Ok(())
}

/// The backup a verification restores: the latest good one of `database`, with what it recorded.
#[derive(Debug, Clone)]
pub struct GoodBackup {
    pub id: i64,
    pub object: String,
    pub sha256: String,
    pub counts: Option<BTreeMap<String, u64>>,
}

/// `database`'s latest good backup, if it has one.
pub async fn latest_good_backup(
    conn: &mut PgConnection,
    database: &Name,
) -> Result<Option<GoodBackup>, StoreError> {
    let op = "read the latest good backup";
    let Some(r) = sqlx::query(
        "SELECT id, object, sha256, counts FROM database_backups
          WHERE database = $1 AND state = 'ok' ORDER BY id DESC LIMIT 1",
    )
    .bind(database.as_str())
    .fetch_optional(&mut *conn)
    .await
    .op(op)?
    else {
        return Ok(None);
    };
    Ok(Some(GoodBackup {
        id: r.try_get("id").op(op)?,
        object: r.try_get("object").op(op)?,
        sha256: r
            .try_get::<Option<String>, _>("sha256")
            .op(op)?
            .unwrap_or_default(),
        counts: r
            .try_get::<Option<serde_json::Value>, _>("counts")
            .op(op)?
            .map(|v| json("database_backups", "counts", v))
            .transpose()?,
    }))
}

/// Writes a verification's ledger row (queued) for backup `backup` of `database` on `node`.
pub async fn insert_verification(
    conn: &mut PgConnection,
    database: &Name,
    backup: i64,
    node: &Name,
    trigger: &str,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO database_verifications (database, backup, node, trigger)
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(database.as_str())
    .bind(backup)
    .bind(node.as_str())
    .bind(trigger)
    .fetch_one(conn)
    .await
    .op("write a verification row")
}

/// Ties a verification's row to the task that runs it.
pub async fn set_verification_task(
    conn: &mut PgConnection,
    id: i64,
    task: Option<i64>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE database_verifications SET task = $2 WHERE id = $1")
        .bind(id)
        .bind(task)
        .execute(conn)
        .await
        .op("write a verification row")?;
    Ok(())
}

/// What a verification restore held (rows per table) and how long it took (ms).
pub type Restored<'a> = (&'a BTreeMap<String, u64>, u64);

/// Records a `db_verify` task's end in its row: the restored counts, or why it failed (`final_`: no
/// attempt follows). Returns the verification's database and backup when the row exists.
pub async fn record_verification(
    conn: &mut PgConnection,
    task: i64,
    outcome: Result<Restored<'_>, (&str, bool)>,
) -> Result<Option<(String, i64)>, StoreError> {
    let op = "record a verification";
    let row = match outcome {
        Ok((counts, duration_ms)) => sqlx::query(
            "UPDATE database_verifications SET state = 'ok', counts = $2, duration_ms = $3,
                    error = NULL, finished_at = now()
              WHERE task = $1 RETURNING database, backup",
        )
        .bind(task)
        .bind(serde_json::to_value(counts).expect("counts serialize"))
        .bind(i64::try_from(duration_ms).unwrap_or(i64::MAX))
        .fetch_optional(conn)
        .await
        .op(op)?,
        Err((error, final_)) => sqlx::query(
            "UPDATE database_verifications
                SET state = CASE WHEN $3 THEN 'failed' ELSE 'running' END, error = $2,
                    finished_at = CASE WHEN $3 THEN now() END
              WHERE task = $1 RETURNING database, backup",
        )
        .bind(task)
        .bind(error)
        .bind(final_)
        .fetch_optional(conn)
        .await
        .op(op)?,
    };
    row.map(|r| Ok((r.try_get("database").op(op)?, r.try_get("backup").op(op)?)))
        .transpose()
}

/// The databases whose verification is due at `now`, claimed (`FOR UPDATE SKIP LOCKED`, so several
/// control planes never queue one twice) and moved to their next run in `tx`.
pub async fn claim_due_verifications(
    tx: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<Vec<Name>, StoreError> {
    let op = "claim due verifications";
    let due = sqlx::query(
        "SELECT database, verify FROM database_schedules
          WHERE verify_next_at <= $1 ORDER BY verify_next_at LIMIT 32 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await
    .op(op)?;
    let mut out = Vec::new();
    for r in due {
        let db: String = r.try_get("database").op(op)?;
        let verify: Option<String> = r.try_get("verify").op(op)?;
        let next = verify
            .and_then(|v| cairn_schema::cron::Cron::parse(&v).ok())
            .and_then(|c| c.next_after(now.timestamp()))
            .and_then(|t| DateTime::from_timestamp(t, 0));
        sqlx::query("UPDATE database_schedules SET verify_next_at = $2 WHERE database = $1")
            .bind(&db)
            .bind(next)
            .execute(&mut *tx)
            .await
            .op(op)?;
        if let Ok(n) = Name::new(&db) {
            out.push(n);
        }
    }
    Ok(out)
}

/// Each database's latest finished verification: whether it failed, and when it finished.
pub async fn last_verifications(
    conn: &mut PgConnection,
) -> Result<BTreeMap<String, (bool, Option<DateTime<Utc>>)>, StoreError> {
    let rows: Vec<(String, String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT DISTINCT ON (database) database, state, finished_at FROM database_verifications
          WHERE state IN ('ok', 'failed') ORDER BY database, id DESC",
    )
    .fetch_all(conn)
    .await
    .op("read verifications")?;
    Ok(rows
        .into_iter()
        .map(|(d, s, t)| (d, (s == "failed", t)))
        .collect())
}
