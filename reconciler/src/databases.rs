//! Managed databases' operations in the control plane: a leased database task made ready for its node
//! (the login's password and the S3 keys sealed to that node only), backups queued now or on their
//! schedule (a ledger row and a `db_backup` task in one transaction; schedules claimed with
//! `FOR UPDATE SKIP LOCKED`, so several control planes never queue one run twice), their results
//! recorded in the ledger, restores beside the original (never in place) and swaps, version upgrades
//! (a new instance beside the old one, queued by the apply, switched to by its result) and explicit
//! drops (never of the instance a database uses).
//!
//! What it must not do: keep a password or a key past the call that seals it, or put one into a row,
//! an error or a log line.

use cairn_proto::{BackupReport, BackupTarget, DatabasePayload, TaskKind};
use cairn_schema::{DatabaseBackup, Identity, Name, Recipient};
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row as _};

use crate::queue::{self, LeasedTask, NewTask};
use crate::store::databases::{self as store, CredentialError};
use crate::store::{Op as _, StoreError};

/// Why an operator's database command was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DbOpError {
    #[error("no database `{0}` is applied")]
    UnknownDatabase(Name),
    #[error("database `{0}` has no `backup` in its manifest: nowhere to write or read backups")]
    NoBackupTarget(Name),
    #[error("database `{database}` has no good backup {which}")]
    NoBackup { database: Name, which: String },
    #[error("`{0}` is already a database instance: restore into a new name")]
    InstanceExists(Name),
    #[error("no instance `{instance}` of database `{database}`")]
    UnknownInstance { database: Name, instance: Name },
    #[error(
        "`{instance}` is database `{database}`'s current instance: point the database at another one (`cairn db swap`) before dropping it"
    )]
    CurrentInstance { database: Name, instance: Name },
    #[error("instance `{0}` is already dropped")]
    AlreadyDropped(Name),
    #[error(
        "instance `{instance}` is in database `{database}`'s upgrade that has not ended: wait for it (`cairn db upgrades {database}`)"
    )]
    UpgradeRunning { database: Name, instance: Name },
    #[error("database `{0}` has no upgrade to finish")]
    NoUpgrade(Name),
    #[error("database `{database}`'s upgrade to {version} {state}: {hint}")]
    UpgradeNotFinishable {
        database: Name,
        version: String,
        state: String,
        hint: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
}

/// Makes a leased database task ready for `node`: its login sealed to the node's recipient (the
/// instance's password, made now if it has none), and for a backup or a restore its target with the
/// S3 keys sealed the same way. `Err((why, permanent))` when it cannot be.
pub async fn ready(
    pool: &PgPool,
    identity: Option<&Identity>,
    node: &Name,
    recipient: Option<&Recipient>,
    t: &LeasedTask,
) -> Result<Result<DatabasePayload, (String, bool)>, StoreError> {
    let mut p: DatabasePayload = match serde_json::from_value(t.payload.clone()) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Err((
                format!("the task's payload is not a database payload: {e}"),
                true,
            )));
        }
    };
    let Some(recipient) = recipient else {
        return Ok(Err((
            format!(
                "node `{node}` has no recipient to encrypt the database login to: join it again"
            ),
            false,
        )));
    };
    let mut conn = pool.acquire().await.op("seal a database login")?;
    match t.kind {
        // A drop needs no login: it deletes the instance.
        TaskKind::DbDrop => return Ok(Ok(p)),
        TaskKind::DbUpgrade => {
            if let Err(why) = upgrade_leased(&mut conn, t.id.0).await? {
                return Ok(Err((why, true)));
            }
        }
        _ => {}
    }
    let password = match store::password(&mut conn, identity, &p.instance).await {
        Ok(pw) => pw,
        Err(CredentialError::Store(e)) => return Err(e),
        Err(e) => {
            let permanent = !matches!(e, CredentialError::NoIdentity);
            return Ok(Err((cairn_schema::error::chain(&e), permanent)));
        }
    };
    p.login_sealed = match store::seal_login(&password, recipient) {
        Ok(s) => Some(s),
        Err(e) => return Ok(Err((cairn_schema::error::chain(&e), true))),
    };
    if matches!(
        t.kind,
        TaskKind::DbBackup | TaskKind::DbRestore | TaskKind::DbVerify
    ) {
        let backup = backup_spec(&mut conn, &p.database).await?;
        let Some(b) = backup else {
            return Ok(Err((
                DbOpError::NoBackupTarget(p.database.clone()).to_string(),
                true,
            )));
        };
        match target(&b, identity, recipient) {
            Ok(t) => p.target = Some(t),
            Err(why) => return Ok(Err((why, true))),
        }
    }
    Ok(Ok(p))
}

/// A database's applied `backup` (its keys the repository's ciphertexts).
async fn backup_spec(
    conn: &mut sqlx::PgConnection,
    database: &Name,
) -> Result<Option<DatabaseBackup>, StoreError> {
    let v: Option<Option<serde_json::Value>> =
        sqlx::query_scalar("SELECT backup_sealed FROM databases WHERE name = $1")
            .bind(database.as_str())
            .fetch_optional(conn)
            .await
            .op("read a database's backup target")?;
    match v.flatten() {
        None => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| crate::store::decode::corrupt("databases", "backup_sealed", e)),
    }
}

/// The wire target: the S3 keys opened with the control plane's identity and sealed to the node.
fn target(
    b: &DatabaseBackup,
    identity: Option<&Identity>,
    recipient: &Recipient,
) -> Result<BackupTarget, String> {
    let keys_sealed = match (&b.access_key_id, &b.secret_access_key) {
        (Some(id), Some(secret)) => {
            let identity = identity.ok_or_else(|| {
                "the control plane has no identity, so it cannot open the storage keys".to_owned()
            })?;
            let open = |c: &cairn_schema::SecretRef, what: &str| {
                identity
                    .decrypt(&c.secret)
                    .map_err(|_| {
                        format!(
                            "the backup's {what} does not decrypt with the control plane's identity"
                        )
                    })
                    .and_then(|s| {
                        s.expose_str()
                            .map(str::to_owned)
                            .map_err(|_| format!("the backup's {what} is not text"))
                    })
            };
            let mut id_plain = open(id, "access_key_id")?;
            let mut secret_plain = open(secret, "secret_access_key")?;
            let json = zeroize::Zeroizing::new(
                serde_json::to_vec(&serde_json::json!({
                    "access_key_id": id_plain,
                    "secret_access_key": secret_plain,
                }))
                .expect("keys serialize"),
            );
            zeroize::Zeroize::zeroize(&mut id_plain);
            zeroize::Zeroize::zeroize(&mut secret_plain);
            let ct = cairn_schema::secret::encrypt(&json, std::slice::from_ref(recipient))
                .map_err(|_| "cannot encrypt the storage keys to the node".to_owned())?;
            Some(ct.as_str().to_owned())
        }
        _ => None,
    };
    Ok(BackupTarget {
        to: b.to.to(),
        endpoint: b.endpoint.clone(),
        region: b.region.clone(),
        keys_sealed,
    })
}

/// A database task's payload for instance `inst` of `database`, its login left for the lease to seal.
fn payload(database: &Name, inst: &store::InstanceRow) -> DatabasePayload {
    DatabasePayload {
        database: database.clone(),
        instance: inst.name.clone(),
        engine: inst.engine,
        version: inst.version.clone(),
        port: inst.port,
        user: inst.user.clone(),
        db: inst.db.clone(),
        login_sealed: None,
        retire_users: Vec::new(),
        target: None,
        object: None,
        sha256: None,
        backup_id: None,
        upgrade_from: None,
        expected_counts: None,
    }
}

/// A `kind` task on `inst`'s node carrying its payload (login sealed at lease), deduplicated by `key`.
fn instance_task(
    kind: TaskKind,
    database: &Name,
    inst: &store::InstanceRow,
    key: String,
) -> NewTask {
    let mut task = NewTask::new(inst.node.clone(), kind, database.clone(), key);
    task.payload = serde_json::to_value(payload(database, inst)).expect("a payload serializes");
    task
}

/// The file extension of an engine's dump.
fn extension(engine: cairn_schema::database::Engine) -> &'static str {
    match engine {
        cairn_schema::database::Engine::Postgres => "pgdump",
        cairn_schema::database::Engine::Mariadb => "sql",
        cairn_schema::database::Engine::Redis => "rdb",
    }
}

/// Queues a backup of `database`'s current instance now: its ledger row and its `db_backup` task, in
/// one transaction. Returns the row's id.
pub async fn backup_now(pool: &PgPool, database: &Name, trigger: &str) -> Result<i64, DbOpError> {
    let mut tx = pool.begin().await.op("queue a backup")?;
    let id = queue_backup(&mut tx, database, trigger).await?;
    tx.commit().await.op("queue a backup")?;
    Ok(id)
}

/// The instance `database`'s apps use, and where its backups go (`dir:...` or `s3://...`): what a
/// backup dumps and a verification restores beside.
async fn backed_up_instance(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    database: &Name,
) -> Result<(store::InstanceRow, String), DbOpError> {
    let row = sqlx::query(
        "SELECT instance, backup_sealed->>'to' AS target FROM databases WHERE name = $1",
    )
    .bind(database.as_str())
    .fetch_optional(&mut **tx)
    .await
    .op("read a database")?
    .ok_or_else(|| DbOpError::UnknownDatabase(database.clone()))?;
    let instance: String = row.try_get("instance").op("read a database")?;
    let target: Option<String> = row.try_get("target").op("read a database")?;
    let target = target.ok_or_else(|| DbOpError::NoBackupTarget(database.clone()))?;
    let instance = Name::new(&instance)
        .map_err(|e| crate::store::decode::corrupt("databases", "instance", e))?;
    let inst = store::instance(tx, &instance)
        .await?
        .ok_or_else(|| DbOpError::UnknownInstance {
            database: database.clone(),
            instance: instance.clone(),
        })?;
    Ok((inst, target))
}

async fn queue_backup(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    database: &Name,
    trigger: &str,
) -> Result<i64, DbOpError> {
    let (inst, target) = backed_up_instance(tx, database).await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO database_backups (database, instance, node, trigger, target, object)
         VALUES ($1, $2, $3, $4, $5, '') RETURNING id",
    )
    .bind(database.as_str())
    .bind(inst.name.as_str())
    .bind(inst.node.as_str())
    .bind(trigger)
    .bind(&target)
    .fetch_one(&mut **tx)
    .await
    .op("write a backup row")?;
    let object = format!("{database}/{id}.{}", extension(inst.engine));
    let payload = DatabasePayload {
        object: Some(object.clone()),
        backup_id: Some(id),
        ..payload(database, &inst)
    };
    let mut task = NewTask::new(
        inst.node.clone(),
        TaskKind::DbBackup,
        database.clone(),
        format!("db_backup:{database}:{id}"),
    );
    task.payload = serde_json::to_value(&payload).expect("a payload serializes");
    task.max_attempts = 3;
    let task_id = queue::enqueue(tx, &task).await?;
    sqlx::query("UPDATE database_backups SET object = $2, task = $3 WHERE id = $1")
        .bind(id)
        .bind(&object)
        .bind(task_id.map(|t| t.0))
        .execute(&mut **tx)
        .await
        .op("write a backup row")?;
    Ok(id)
}

/// Queues the backups whose schedule is due, each claimed by one control plane only, and moves each
/// schedule to its next run. Returns how many were queued.
pub async fn run_due(pool: &PgPool, now: DateTime<Utc>) -> Result<usize, DbOpError> {
    let mut tx = pool.begin().await.op("claim due backups")?;
    let due = sqlx::query(
        "SELECT database, schedule FROM database_schedules WHERE next_at <= $1
          ORDER BY next_at LIMIT 32 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await
    .op("claim due backups")?;
    let mut queued = 0;
    for r in due {
        let db: String = r.try_get("database").op("claim due backups")?;
        let schedule: String = r.try_get("schedule").op("claim due backups")?;
        let Ok(database) = Name::new(&db) else {
            continue;
        };
        let next = cairn_schema::cron::Cron::parse(&schedule)
            .ok()
            .and_then(|c| c.next_after(now.timestamp()))
            .and_then(|t| DateTime::from_timestamp(t, 0))
            .unwrap_or(now + chrono::Duration::days(365));
        sqlx::query("UPDATE database_schedules SET next_at = $2 WHERE database = $1")
            .bind(&db)
            .bind(next)
            .execute(&mut *tx)
            .await
            .op("move a backup schedule")?;
        match queue_backup(&mut tx, &database, "schedule").await {
            Ok(_) => queued += 1,
            Err(DbOpError::UnknownDatabase(_) | DbOpError::NoBackupTarget(_)) => {}
            Err(e) => return Err(e),
        }
    }
    for database in store::claim_due_verifications(&mut tx, now).await? {
        match queue_verification(&mut tx, &database, "schedule").await {
            Ok(_) => queued += 1,
            // Nothing to verify yet: the next run will find the first good backup.
            Err(
                DbOpError::UnknownDatabase(_)
                | DbOpError::NoBackupTarget(_)
                | DbOpError::NoBackup { .. },
            ) => {}
            Err(e) => return Err(e),
        }
    }
    tx.commit().await.op("claim due backups")?;
    Ok(queued)
}

/// Queues a verification of `database`'s latest good backup now: its ledger row and its `db_verify`
/// task, in one transaction. Returns the row's id.
pub async fn verify_now(pool: &PgPool, database: &Name) -> Result<i64, DbOpError> {
    let mut tx = pool.begin().await.op("queue a verification")?;
    let id = queue_verification(&mut tx, database, "manual").await?;
    tx.commit().await.op("queue a verification")?;
    Ok(id)
}

/// The verification's row and task: the latest good backup restored into a scratch server on the
/// database's node (where its engine and version are installed), compared with the backup's counts.
async fn queue_verification(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    database: &Name,
    trigger: &str,
) -> Result<i64, DbOpError> {
    let (inst, _) = backed_up_instance(tx, database).await?;
    let good = store::latest_good_backup(tx, database)
        .await?
        .ok_or_else(|| DbOpError::NoBackup {
            database: database.clone(),
            which: "yet to verify".to_owned(),
        })?;
    let id = store::insert_verification(tx, database, good.id, &inst.node, trigger).await?;
    let payload = DatabasePayload {
        object: Some(good.object),
        sha256: Some(good.sha256),
        backup_id: Some(good.id),
        expected_counts: good.counts,
        ..payload(database, &inst)
    };
    let mut task = NewTask::new(
        inst.node.clone(),
        TaskKind::DbVerify,
        database.clone(),
        format!("db_verify:{database}:{id}"),
    );
    task.payload = serde_json::to_value(&payload).expect("a payload serializes");
    task.max_attempts = 2;
    let task_id = queue::enqueue(tx, &task).await?;
    store::set_verification_task(tx, id, task_id.map(|t| t.0)).await?;
    Ok(id)
}

/// Records a `db_verify` task's end in its ledger row; one that failed for good is a
/// `database.verify_failed` event (its error one line, never a secret: the agent's contract).
pub async fn record_verification(
    pool: &PgPool,
    task: i64,
    node: &Name,
    report: Result<&BackupReport, (&str, bool)>,
) -> Result<(), StoreError> {
    let empty = std::collections::BTreeMap::new();
    let outcome = report.map(|b| (b.counts.as_ref().unwrap_or(&empty), b.duration_ms));
    let mut tx = pool.begin().await.op("record a verification")?;
    let row = store::record_verification(&mut tx, task, outcome).await?;
    if let (Err((error, true)), Some((database, backup))) = (report, row) {
        let e = crate::events::NewEvent::new(
            crate::events::EventKind::DatabaseVerifyFailed,
            format!("verifying backup {backup} of database {database} failed: {error}"),
        )
        .node(node)
        .detail(serde_json::json!({ "database": database, "backup": backup }));
        crate::events::record(&mut tx, &[e]).await?;
    }
    tx.commit().await.op("record a verification")?;
    Ok(())
}

/// Whether a database backed up on `schedule` is overdue at `now`: no good backup within two of its
/// schedule's intervals, counted from the last good one (`last_good`), or while none succeeded from
/// when the schedule was declared (`since`).
pub fn backup_overdue(
    schedule: &str,
    last_good: Option<DateTime<Utc>>,
    since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> bool {
    let Ok(cron) = cairn_schema::cron::Cron::parse(schedule) else {
        return false;
    };
    let interval = cron
        .interval_upper_bound(now.timestamp())
        .unwrap_or(i64::MAX / 4);
    last_good
        .or(since)
        .is_some_and(|t| (now - t).num_seconds() > 2 * interval)
}

/// Records a `database.backup_overdue` event for each scheduled database whose backups are overdue at
/// `now` ([`backup_overdue`]), once per recovery point: the check and the event share a transaction
/// with the mark, so several control planes announce it once. How many were announced.
pub async fn announce_overdue(pool: &PgPool, now: DateTime<Utc>) -> Result<usize, StoreError> {
    let op = "read the backup schedules";
    let rows = sqlx::query(
        "SELECT s.database, s.schedule, s.since, s.overdue_announced, d.node,
                (SELECT max(b.finished_at) FROM database_backups b
                  WHERE b.database = s.database AND b.state = 'ok') AS last_good
           FROM database_schedules s JOIN databases d ON d.name = s.database",
    )
    .fetch_all(pool)
    .await
    .op(op)?;
    let mut announced = 0;
    for r in rows {
        let db: String = r.try_get("database").op(op)?;
        let schedule: String = r.try_get("schedule").op(op)?;
        let since: DateTime<Utc> = r.try_get("since").op(op)?;
        let last: Option<String> = r.try_get("overdue_announced").op(op)?;
        let node: String = r.try_get("node").op(op)?;
        let last_good: Option<DateTime<Utc>> = r.try_get("last_good").op(op)?;
        let (Ok(database), Ok(node)) = (Name::new(&db), Name::new(&node)) else {
            continue;
        };
        if !backup_overdue(&schedule, last_good, Some(since), now) {
            continue;
        }
        let point = last_good.map_or_else(String::new, |t| t.to_rfc3339());
        if last.as_deref() == Some(point.as_str()) {
            continue;
        }
        let mut tx = pool.begin().await.op("announce an overdue backup")?;
        let marked = sqlx::query(
            "UPDATE database_schedules SET overdue_announced = $2
              WHERE database = $1 AND overdue_announced IS DISTINCT FROM $2",
        )
        .bind(&db)
        .bind(&point)
        .execute(&mut *tx)
        .await
        .op("announce an overdue backup")?
        .rows_affected();
        if marked == 0 {
            continue;
        }
        let recovery = last_good.map_or_else(
            || "it has no good backup yet".to_owned(),
            |t| format!("its recovery point is {}", t.format("%Y-%m-%d %H:%M UTC")),
        );
        let e = crate::events::NewEvent::new(
            crate::events::EventKind::DatabaseBackupOverdue,
            format!(
                "database {database} has had no good backup within two intervals of its schedule \
                 `{schedule}`: {recovery}"
            ),
        )
        .node(&node)
        .detail(serde_json::json!({
            "database": database.as_str(),
            "recovery_point": last_good,
        }));
        crate::events::record(&mut tx, &[e]).await?;
        tx.commit().await.op("announce an overdue backup")?;
        announced += 1;
    }
    Ok(announced)
}

/// One database as `cairn db list` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DatabaseInfo {
    pub name: String,
    pub engine: String,
    pub version: String,
    pub node: String,
    pub port: u16,
    pub instance: String,
    /// Whether its node is online now: an offline node's database is unavailable.
    pub available: bool,
    /// The recovery point: when the last good backup finished.
    pub last_good_backup: Option<chrono::DateTime<chrono::Utc>>,
    /// The last backup failed, or none succeeded within two of its schedule's intervals.
    pub backup_overdue: bool,
    /// Its last version upgrade, unless it is finished (its pre-upgrade instance dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<crate::store::databases::UpgradeRow>,
    /// When its latest verification restore finished, and whether it failed.
    #[serde(default)]
    pub last_verified: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    pub verify_failed: bool,
}

/// Every applied database, with availability and the recovery point.
pub async fn list_databases(
    pool: &sqlx::PgPool,
) -> Result<Vec<DatabaseInfo>, crate::store::StoreError> {
    let mut conn = pool.acquire().await.op("read databases")?;
    let dbs = crate::store::databases::load(&mut conn).await?;
    let states: Vec<(String, String)> = sqlx::query_as("SELECT node, state FROM node_status")
        .fetch_all(&mut *conn)
        .await
        .op("read node states")?;
    let failed_last: Vec<String> = {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT ON (database) database, state FROM database_backups
              WHERE state IN ('ok', 'failed') ORDER BY database, id DESC",
        )
        .fetch_all(&mut *conn)
        .await
        .op("read backups")?;
        rows.into_iter()
            .filter(|(_, s)| s == "failed")
            .map(|(d, _)| d)
            .collect()
    };
    let since: Vec<(String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT database, since FROM database_schedules")
            .fetch_all(&mut *conn)
            .await
            .op("read backup schedules")?;
    let upgrades = crate::store::databases::latest_upgrades(&mut conn).await?;
    let verified = crate::store::databases::last_verifications(&mut conn).await?;
    let now = chrono::Utc::now();
    Ok(dbs
        .into_iter()
        .map(|(name, d)| {
            let overdue_by_schedule = d.spec.backup.as_ref().is_some_and(|b| {
                let declared = since
                    .iter()
                    .find(|(n, _)| n == name.as_str())
                    .map(|(_, t)| *t);
                backup_overdue(&b.schedule, d.last_good_backup, declared, now)
            });
            DatabaseInfo {
                available: states
                    .iter()
                    .any(|(n, s)| n == d.node.as_str() && s == "online"),
                backup_overdue: overdue_by_schedule || failed_last.contains(&name.to_string()),
                name: name.to_string(),
                engine: d.spec.engine.to_string(),
                version: d.spec.version.clone(),
                node: d.node.to_string(),
                port: d.port,
                instance: d.instance.to_string(),
                last_good_backup: d.last_good_backup,
                upgrade: upgrades
                    .iter()
                    .find(|u| u.database == name.as_str() && u.state != "finished")
                    .cloned(),
                last_verified: verified.get(name.as_str()).and_then(|(_, t)| *t),
                verify_failed: verified.get(name.as_str()).is_some_and(|(f, _)| *f),
            }
        })
        .collect())
}

/// What `cairn status` and the dashboard show red about databases.
pub fn warnings(dbs: &[DatabaseInfo]) -> Vec<String> {
    let point = |d: &DatabaseInfo| {
        d.last_good_backup.map_or_else(
            || "no good backup yet".to_owned(),
            |t| format!("recovery point {}", t.format("%Y-%m-%d %H:%M UTC")),
        )
    };
    let mut out = Vec::new();
    for d in dbs {
        if !d.available {
            out.push(format!(
                "database {} is unavailable: node {} is not online ({}); it is not moved empty",
                d.name,
                d.node,
                point(d)
            ));
        }
        if let Some(u) = d.upgrade.as_ref().filter(|u| u.state == "failed") {
            out.push(format!(
                "database {}: its upgrade from {} to {} failed ({}); {} keeps serving",
                d.name,
                u.from_version,
                u.to_version,
                u.error.as_deref().unwrap_or("no error recorded"),
                u.from_instance
            ));
        }
        if d.backup_overdue {
            out.push(format!(
                "database {}: its last backup failed, or none succeeded within two intervals ({}): `cairn db backups {}`",
                d.name,
                point(d),
                d.name
            ));
        }
        if d.verify_failed {
            out.push(format!(
                "database {}: its latest verification restore failed: `cairn db backups {}` says why",
                d.name, d.name
            ));
        }
    }
    out
}

/// How often `cairn serve` looks for due backups.
pub const BACKUP_PERIOD: std::time::Duration = std::time::Duration::from_secs(15);

/// Queues due scheduled backups every `period` until `shutdown` (several control planes may run it:
/// each due run is claimed once).
pub async fn backup_loop(
    pool: PgPool,
    period: std::time::Duration,
    shutdown: &crate::worker::Shutdown,
) {
    crate::worker::Worker::new("cannot queue scheduled backups", period)
        .failures_as_warnings()
        .run(shutdown, |_| async {
            let now = Utc::now();
            let n = run_due(&pool, now).await?;
            if n > 0 {
                tracing::info!(backups = n, "scheduled backups queued");
            }
            let late = announce_overdue(&pool, now).await?;
            if late > 0 {
                tracing::warn!(databases = late, "database backups overdue");
            }
            Ok::<_, DbOpError>(None)
        })
        .await
}

/// Records a `db_backup` task's end in its ledger row: what it wrote, or why it failed (`final_`: no
/// attempt follows).
pub async fn record_backup(
    pool: &PgPool,
    task: i64,
    report: Result<&BackupReport, (&str, bool)>,
) -> Result<(), StoreError> {
    match report {
        Ok(b) => {
            sqlx::query(
                "UPDATE database_backups SET state = 'ok', bytes = $2, sha256 = $3, duration_ms = $4,
                        object = $5, counts = $6, error = NULL, finished_at = now()
                  WHERE task = $1",
            )
            .bind(task)
            .bind(i64::try_from(b.bytes).unwrap_or(i64::MAX))
            .bind(&b.sha256)
            .bind(i64::try_from(b.duration_ms).unwrap_or(i64::MAX))
            .bind(&b.object)
            .bind(
                b.counts
                    .as_ref()
                    .map(|c| serde_json::to_value(c).expect("counts serialize")),
            )
            .execute(pool)
            .await
            .op("record a backup")?;
        }
        Err((error, final_)) => {
            sqlx::query(
                "UPDATE database_backups SET state = CASE WHEN $3 THEN 'failed' ELSE 'running' END,
                        error = $2, finished_at = CASE WHEN $3 THEN now() END
                  WHERE task = $1",
            )
            .bind(task)
            .bind(error)
            .bind(final_)
            .execute(pool)
            .await
            .op("record a backup")?;
        }
    }
    Ok(())
}

/// Records a backup that failed for good as a `database.backup_failed` event (its error one line,
/// never a secret: the agent's contract).
pub async fn backup_failed(
    pool: &PgPool,
    database: &Name,
    node: &Name,
    error: &str,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.op("record a failed backup")?;
    let e = crate::events::NewEvent::new(
        crate::events::EventKind::DatabaseBackupFailed,
        format!("a backup of database {database} failed: {error}"),
    )
    .node(node)
    .detail(serde_json::json!({ "database": database.as_str() }));
    crate::events::record(&mut tx, &[e]).await?;
    tx.commit().await.op("record a failed backup")?;
    Ok(())
}

/// Restores backup `backup` (or the latest good one) of `database` into a new instance `into` on the
/// database's node, beside the original: a new instance row and a `db_restore` task. The original is
/// untouched; `swap` points the attached apps at the new one.
pub async fn restore(
    pool: &PgPool,
    database: &Name,
    backup: Option<i64>,
    into: &Name,
) -> Result<Name, DbOpError> {
    let mut tx = pool.begin().await.op("queue a restore")?;
    let row = sqlx::query("SELECT spec, node FROM databases WHERE name = $1")
        .bind(database.as_str())
        .fetch_optional(&mut *tx)
        .await
        .op("read a database")?
        .ok_or_else(|| DbOpError::UnknownDatabase(database.clone()))?;
    let spec: cairn_plan::observed::AppliedDatabase = crate::store::decode::json(
        "databases",
        "spec",
        row.try_get("spec").op("read a database")?,
    )?;
    let node = Name::new(&row.try_get::<String, _>("node").op("read a database")?)
        .map_err(|e| crate::store::decode::corrupt("databases", "node", e))?;
    let b = sqlx::query(
        "SELECT id, object, sha256 FROM database_backups
          WHERE database = $1 AND state = 'ok' AND ($2::bigint IS NULL OR id = $2)
          ORDER BY id DESC LIMIT 1",
    )
    .bind(database.as_str())
    .bind(backup)
    .fetch_optional(&mut *tx)
    .await
    .op("read a backup")?
    .ok_or_else(|| DbOpError::NoBackup {
        database: database.clone(),
        which: backup.map_or("yet".to_owned(), |b| format!("with id {b}")),
    })?;
    let object: String = b.try_get("object").op("read a backup")?;
    let sha256: String = b.try_get("sha256").op("read a backup")?;
    // `--latest` on a moved database restores into the database's own (fresh) instance.
    let fresh = into == database;
    if !fresh && store::instance(&mut tx, into).await?.is_some() {
        return Err(DbOpError::InstanceExists(into.clone()));
    }
    let port = if fresh {
        store::instance(&mut tx, into)
            .await?
            .map(|i| i.port)
            .ok_or_else(|| DbOpError::UnknownInstance {
                database: database.clone(),
                instance: into.clone(),
            })?
    } else {
        let taken: Vec<i32> =
            sqlx::query_scalar("SELECT port FROM database_instances WHERE node = $1")
                .bind(node.as_str())
                .fetch_all(&mut *tx)
                .await
                .op("read ports")?;
        let mut p = cairn_plan::databases::FIRST_PORT;
        while taken.contains(&i32::from(p)) {
            p += 1;
        }
        store::upsert_instance(&mut tx, into, database, &spec, &node, p).await?;
        p
    };
    let inst = store::instance(&mut tx, into)
        .await?
        .ok_or_else(|| DbOpError::UnknownInstance {
            database: database.clone(),
            instance: into.clone(),
        })?;
    let payload = DatabasePayload {
        port,
        object: Some(object),
        sha256: Some(sha256),
        backup_id: Some(b.try_get("id").op("read a backup")?),
        ..payload(database, &inst)
    };
    let mut task = NewTask::new(
        node.clone(),
        TaskKind::DbRestore,
        database.clone(),
        format!(
            "db_restore:{database}:{into}:{}",
            Utc::now().timestamp_millis()
        ),
    );
    task.payload = serde_json::to_value(&payload).expect("a payload serializes");
    task.max_attempts = 3;
    queue::enqueue(&mut tx, &task).await?;
    tx.commit().await.op("queue a restore")?;
    Ok(node)
}

/// Points `database`'s attached apps at instance `instance` (a restore's): the planner then makes a new
/// release of each. The previous instance keeps running until it is dropped explicitly. A stopped
/// instance (an upgrade's pre-upgrade one: swapping back is the way back) is started again; a dropped
/// one is refused.
pub async fn swap(pool: &PgPool, database: &Name, instance: &Name) -> Result<(), DbOpError> {
    let mut tx = pool.begin().await.op("swap a database")?;
    let inst = store::instance(&mut tx, instance)
        .await?
        .filter(|i| &i.database == database)
        .ok_or_else(|| DbOpError::UnknownInstance {
            database: database.clone(),
            instance: instance.clone(),
        })?;
    match inst.state.as_str() {
        "dropped" => return Err(DbOpError::AlreadyDropped(instance.clone())),
        "stopped" => {
            store::set_instance_state(&mut tx, instance, "active").await?;
            let task = instance_task(
                TaskKind::DbEnsure,
                database,
                &inst,
                format!(
                    "db_swap_start:{database}:{instance}:{}",
                    Utc::now().timestamp_millis()
                ),
            );
            queue::enqueue(&mut tx, &task).await?;
        }
        _ => {}
    }
    let done = sqlx::query(
        "UPDATE databases SET instance = $2, node = $3, port = $4, updated_at = now() WHERE name = $1",
    )
    .bind(database.as_str())
    .bind(instance.as_str())
    .bind(inst.node.as_str())
    .bind(i32::from(inst.port))
    .execute(&mut *tx)
    .await
    .op("swap a database")?;
    if done.rows_affected() == 0 {
        return Err(DbOpError::UnknownDatabase(database.clone()));
    }
    tx.commit().await.op("swap a database")?;
    Ok(())
}

/// A new password for `database`'s current instance: the new one is made at the next lease, the old
/// login is retired (locked out) by a `db_ensure` once the attached apps have their new release, and
/// the credential generation moves on, so the planner gives every attached app a new release.
pub async fn rotate(pool: &PgPool, database: &Name) -> Result<(), DbOpError> {
    let mut tx = pool.begin().await.op("rotate a database's password")?;
    let row = sqlx::query(
        "UPDATE databases SET credential = credential + 1, updated_at = now()
          WHERE name = $1 RETURNING instance, credential",
    )
    .bind(database.as_str())
    .fetch_optional(&mut *tx)
    .await
    .op("rotate a database's password")?
    .ok_or_else(|| DbOpError::UnknownDatabase(database.clone()))?;
    let instance: String = row.try_get("instance").op("rotate a database's password")?;
    let credential: i64 = row
        .try_get("credential")
        .op("rotate a database's password")?;
    // The new login is a new user, so the running apps keep working on the old one until they are
    // replaced; the old user is retired by the next db_ensure.
    sqlx::query(
        "UPDATE database_instances
            SET retired_users = array_append(retired_users, login_user),
                login_user = $2, password_sealed = NULL, updated_at = now()
          WHERE name = $1",
    )
    .bind(&instance)
    .bind(format!("app{credential}"))
    .execute(&mut *tx)
    .await
    .op("rotate a database's password")?;
    let instance = Name::new(&instance)
        .map_err(|e| crate::store::decode::corrupt("databases", "instance", e))?;
    let inst =
        store::instance(&mut tx, &instance)
            .await?
            .ok_or_else(|| DbOpError::UnknownInstance {
                database: database.clone(),
                instance: instance.clone(),
            })?;
    let task = instance_task(
        TaskKind::DbEnsure,
        database,
        &inst,
        format!("db_rotate:{database}:{credential}"),
    );
    queue::enqueue(&mut tx, &task).await?;
    tx.commit().await.op("rotate a database's password")?;
    Ok(())
}

/// Queues the upgrade of `database` from its instance `from` to `version` (the apply's
/// [`cairn_plan::DatabaseTask::Upgrade`], in its transaction): a new instance row beside `from` on its
/// node with a free port and a login of its own (its password made at lease), the upgrade's ledger row
/// and its `db_upgrade` task. The database keeps pointing at `from` until the task succeeds
/// ([`record_upgrade`]). Returns the ledger row's id (`None`: `from` has no row).
pub async fn queue_upgrade(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    database: &Name,
    from: &Name,
    version: &str,
    generation: u64,
) -> Result<Option<i64>, queue::QueueError> {
    let Some(old) = store::instance(tx, from).await? else {
        tracing::warn!(%database, instance = %from, "a database to upgrade has no instance row: nothing queued");
        return Ok(None);
    };
    // One upgrade at a time: a second `version` change while one runs is recorded as failed, visibly,
    // rather than dumping an instance the first may be about to stop.
    if let Some(running) = store::upgrades(tx, database, 1)
        .await?
        .into_iter()
        .find(|u| matches!(u.state.as_str(), "queued" | "running"))
    {
        let to = store::new_instance_name(tx, database).await?;
        let id = store::insert_upgrade(tx, database, &old.node, &old, &to, version).await?;
        let error = format!(
            "the upgrade of database {database} to {} had not ended: change `version` again once it has",
            running.to_version
        );
        store::set_upgrade_state(tx, id, "failed", None, Some(&error)).await?;
        let e = crate::events::NewEvent::new(
            crate::events::EventKind::DatabaseUpgradeFailed,
            format!("the upgrade of database {database} to {version} was not started: {error}"),
        )
        .node(&old.node)
        .detail(serde_json::json!({ "database": database.as_str(), "to": version }));
        crate::events::record(tx, &[e]).await?;
        return Ok(Some(id));
    }
    let spec: serde_json::Value = sqlx::query_scalar("SELECT spec FROM databases WHERE name = $1")
        .bind(database.as_str())
        .fetch_one(&mut **tx)
        .await
        .op("read a database")?;
    let spec: cairn_plan::observed::AppliedDatabase =
        crate::store::decode::json("databases", "spec", spec)?;
    let spec = cairn_plan::observed::AppliedDatabase {
        version: version.to_owned(),
        ..spec
    };
    let to = store::new_instance_name(tx, database).await?;
    let port = store::free_port(tx).await?;
    store::upsert_instance(tx, &to, database, &spec, &old.node, port).await?;
    let id = store::insert_upgrade(tx, database, &old.node, &old, &to, version).await?;
    let inst = store::instance(tx, &to)
        .await?
        .ok_or_else(|| crate::store::decode::corrupt("database_instances", "name", &to))?;
    let payload = DatabasePayload {
        upgrade_from: Some(cairn_proto::UpgradeSource {
            instance: old.name.clone(),
            version: old.version.clone(),
            port: old.port,
        }),
        ..payload(database, &inst)
    };
    let mut task = NewTask::new(
        old.node.clone(),
        TaskKind::DbUpgrade,
        database.clone(),
        format!("g{generation}:db_upgrade:{database}:{to}"),
    );
    task.generation = Some(generation);
    task.payload = serde_json::to_value(&payload).expect("a payload serializes");
    // The agent removes a failed attempt's new instance, so a second attempt starts clean.
    task.max_attempts = 2;
    let task_id = queue::enqueue(tx, &task).await?;
    store::set_upgrade_task(tx, id, task_id.map(|t| t.0)).await?;
    Ok(Some(id))
}

/// At lease: an upgrade runs only while its ledger row says it has not ended (a task handed out again
/// after its result was recorded must not touch the instance the database now uses). Marks it running.
async fn upgrade_leased(
    conn: &mut sqlx::PgConnection,
    task: i64,
) -> Result<Result<(), String>, StoreError> {
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .op("read a database upgrade")?;
    let Some(u) = store::upgrade_by_task(&mut tx, task).await? else {
        return Ok(Err("this upgrade has no ledger row".to_owned()));
    };
    if !matches!(u.state.as_str(), "queued" | "running") {
        return Ok(Err(format!(
            "this upgrade already ended ({}): not run again",
            u.state
        )));
    }
    store::set_upgrade_state(&mut tx, u.id, "running", None, u.error.as_deref()).await?;
    tx.commit().await.op("read a database upgrade")?;
    Ok(Ok(()))
}

/// Records a `db_upgrade` task's end (`final_`: no attempt follows). On success, in one transaction:
/// the database points at the new instance (its attached apps get a release at the next reconcile), the
/// old one is stopped with its data kept (the pre-upgrade instance, until `finish_upgrade`). On a final
/// failure the old instance keeps serving, the new one is recorded dropped (the agent removes it), and
/// a `database.upgrade_failed` event says why. Returns whether the database now uses the new instance.
pub async fn record_upgrade(
    pool: &PgPool,
    task: i64,
    report: Result<Option<&str>, (&str, bool)>,
) -> Result<bool, queue::QueueError> {
    let mut tx = pool.begin().await.op("record a database upgrade")?;
    let Some(u) = store::upgrade_by_task(&mut tx, task).await? else {
        return Ok(false);
    };
    if !matches!(u.state.as_str(), "queued" | "running") {
        return Ok(false);
    }
    let decode = |column: &'static str, v: &str| {
        Name::new(v).map_err(|e| crate::store::decode::corrupt("database_upgrades", column, e))
    };
    let database = decode("database", &u.database)?;
    let from = decode("from_instance", &u.from_instance)?;
    let to = decode("to_instance", &u.to_instance)?;
    let node = decode("node", &u.node)?;
    let mut failure = match report {
        Ok(_) => None,
        Err((error, final_)) => Some((error.to_owned(), final_)),
    };
    if failure.is_none() {
        let current = store::current_instance(&mut tx, &database).await?;
        let new = store::instance(&mut tx, &to).await?;
        match (current, new) {
            (Some(c), Some(new)) if c == from => {
                store::point_at(&mut tx, &database, &new.name, &new.node, new.port).await?;
                store::set_instance_state(&mut tx, &from, "stopped").await?;
                if let Some(old) = store::instance(&mut tx, &from).await? {
                    let stop = instance_task(
                        TaskKind::DbStop,
                        &database,
                        &old,
                        format!("db_upgrade_stop:{from}:{}", u.id),
                    );
                    queue::enqueue(&mut tx, &stop).await?;
                }
                let detail = report.ok().flatten();
                store::set_upgrade_state(&mut tx, u.id, "ok", detail, None).await?;
            }
            _ => {
                failure = Some((
                    format!(
                        "database {database} no longer uses instance {from} (swapped, moved or removed while it was upgraded): it was not pointed at {to}"
                    ),
                    true,
                ));
            }
        }
    }
    if let Some((error, final_)) = &failure {
        let state = if *final_ { "failed" } else { "running" };
        store::set_upgrade_state(&mut tx, u.id, state, None, Some(error)).await?;
        if *final_ {
            store::set_instance_state(&mut tx, &to, "dropped").await?;
            let e = crate::events::NewEvent::new(
                crate::events::EventKind::DatabaseUpgradeFailed,
                format!(
                    "the upgrade of database {database} from {} to {} failed; {from} keeps serving: {error}",
                    u.from_version, u.to_version
                ),
            )
            .node(&node)
            .detail(serde_json::json!({
                "database": database.as_str(),
                "from": u.from_version,
                "to": u.to_version,
            }));
            crate::events::record(&mut tx, &[e]).await?;
        }
    }
    tx.commit().await.op("record a database upgrade")?;
    Ok(failure.is_none())
}

/// Records a `db_drop` task's success: its instance is `dropped`.
pub async fn record_drop(pool: &PgPool, task: i64) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await.op("record a dropped instance")?;
    if let Some(instance) = store::task_instance(&mut conn, task).await? {
        store::set_instance_state(&mut conn, &instance, "dropped").await?;
    }
    Ok(())
}

/// Drops the pre-upgrade instance of `database`'s last upgrade (a `db_drop` task: its server stopped
/// and its data deleted), refused unless that upgrade succeeded. Returns the instance dropped.
pub async fn finish_upgrade(pool: &PgPool, database: &Name) -> Result<Name, DbOpError> {
    let mut tx = pool.begin().await.op("finish an upgrade")?;
    if store::current_instance(&mut tx, database).await?.is_none() {
        return Err(DbOpError::UnknownDatabase(database.clone()));
    }
    // The newest that ran or runs (one refused because another ran is passed over), else the newest.
    let all = store::upgrades(&mut tx, database, 20).await?;
    let u = all
        .iter()
        .find(|u| matches!(u.state.as_str(), "ok" | "queued" | "running"))
        .or(all.first())
        .cloned()
        .ok_or_else(|| DbOpError::NoUpgrade(database.clone()))?;
    let refuse = |state: &str, hint: String| DbOpError::UpgradeNotFinishable {
        database: database.clone(),
        version: u.to_version.clone(),
        state: state.to_owned(),
        hint,
    };
    match u.state.as_str() {
        "ok" => {}
        "queued" | "running" => {
            return Err(refuse(
                "has not ended",
                format!("`cairn db upgrades {database}` shows it"),
            ));
        }
        "failed" => {
            return Err(refuse(
                "failed",
                format!(
                    "{} is still the database's instance; nothing to finish",
                    u.from_instance
                ),
            ));
        }
        _ => {
            return Err(refuse(
                "is already finished",
                format!("{} was dropped", u.from_instance),
            ));
        }
    }
    let from = Name::new(&u.from_instance)
        .map_err(|e| crate::store::decode::corrupt("database_upgrades", "from_instance", e))?;
    queue_drop(&mut tx, database, &from).await?;
    store::set_upgrade_state(&mut tx, u.id, "finished", None, None).await?;
    tx.commit().await.op("finish an upgrade")?;
    Ok(from)
}

/// Drops `instance` of `database` (a `db_drop` task: its server stopped, its data deleted), refused for
/// the database's current instance and for one an unfinished upgrade reads or writes; the instances of
/// a database no longer declared may all be dropped. Returns its node.
pub async fn drop_instance(
    pool: &PgPool,
    database: &Name,
    instance: &Name,
) -> Result<Name, DbOpError> {
    let mut tx = pool.begin().await.op("drop a database instance")?;
    // A database no longer declared has no current instance: its instances (stopped, their data kept)
    // are dropped this way too.
    let current = store::current_instance(&mut tx, database).await?;
    if current.as_ref() == Some(instance) {
        return Err(DbOpError::CurrentInstance {
            database: database.clone(),
            instance: instance.clone(),
        });
    }
    let busy = store::upgrades(&mut tx, database, 20)
        .await?
        .into_iter()
        .any(|u| {
            matches!(u.state.as_str(), "queued" | "running")
                && (u.to_instance == instance.as_str() || u.from_instance == instance.as_str())
        });
    if busy {
        return Err(DbOpError::UpgradeRunning {
            database: database.clone(),
            instance: instance.clone(),
        });
    }
    let node = queue_drop(&mut tx, database, instance).await?;
    // A pre-upgrade instance dropped by hand ends its upgrade as `finish-upgrade` would.
    store::finish_upgrades_from(&mut tx, database, instance).await?;
    tx.commit().await.op("drop a database instance")?;
    Ok(node)
}

/// The `db_drop` task of `instance`, which must be `database`'s and not dropped yet. Returns its node.
async fn queue_drop(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    database: &Name,
    instance: &Name,
) -> Result<Name, DbOpError> {
    let inst = store::instance(tx, instance)
        .await?
        .filter(|i| &i.database == database)
        .ok_or_else(|| DbOpError::UnknownInstance {
            database: database.clone(),
            instance: instance.clone(),
        })?;
    if inst.state == "dropped" {
        return Err(DbOpError::AlreadyDropped(instance.clone()));
    }
    if store::current_instance(tx, database).await?.as_ref() == Some(instance) {
        return Err(DbOpError::CurrentInstance {
            database: database.clone(),
            instance: instance.clone(),
        });
    }
    let mut task = instance_task(
        TaskKind::DbDrop,
        database,
        &inst,
        format!(
            "db_drop:{database}:{instance}:{}",
            Utc::now().timestamp_millis()
        ),
    );
    task.max_attempts = 3;
    queue::enqueue(tx, &task).await?;
    Ok(inst.node)
}
