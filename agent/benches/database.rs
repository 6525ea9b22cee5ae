//! Backup and restore throughput of a managed PostgreSQL database through `cairn_agent::database`
//! (`backup` to a directory: `pg_dump -Fc` streamed with its SHA-256, fsync and rename; `restore`: the
//! object fetched and checked, then `pg_restore`) against plain `pg_dump -Fc -f` and `pg_restore` by hand
//! on the same database in the same run (BENCHMARKS.md).
//!
//! `cargo bench -p cairn-agent --bench database` (`-- 256` for a 256 MiB database; default 1024;
//! `-- 1024 2` for two rounds of each). Needs Debian's PostgreSQL server binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_agent::database::{self, Instance, Login, Target};
use cairn_schema::Secret;
use cairn_schema::database::{BackupTo, Engine};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mib: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    let Some(bin) = pg_bin() else {
        eprintln!("SKIPPED: no PostgreSQL server binaries in /usr/lib/postgresql/*/bin");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run(&bin, mib, rounds));
}

fn pg_bin() -> Option<PathBuf> {
    let mut v: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, b): &(u32, PathBuf)| b.join("postgres").is_file())
        .collect();
    v.sort();
    v.pop().map(|(_, b)| b)
}

fn instance(bin: &Path, root: &Path, name: &str) -> Instance {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Instance {
        name: name.parse().unwrap(),
        engine: Engine::Postgres,
        version: bin
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        dir: root.join(name),
        port,
        runtime: database::Runtime::Process,
    }
}

fn psql(bin: &Path, inst: &Instance, login: &Login, sql: &str) -> String {
    let out = Command::new(bin.join("psql"))
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
        .args([
            "-p",
            &inst.port.to_string(),
            "-U",
            &login.user,
            "-d",
            &login.database,
        ])
        .args(["-c", sql])
        .env("PGPASSWORD", login.password.expose_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn admin(inst: &Instance) -> String {
    std::fs::read_to_string(inst.dir.join("admin.password"))
        .unwrap()
        .trim()
        .to_owned()
}

fn timed(what: &str, mut cmd: Command) -> Duration {
    let started = Instant::now();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

async fn run(bin: &Path, mib: u64, rounds: usize) {
    let root = tempfile::Builder::new()
        .prefix("cairn-db-bench")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let login = Login {
        user: "bench".into(),
        password: Secret::new(b"bench-password".to_vec()),
        database: "bench".into(),
    };
    let src = instance(bin, root.path(), "source");
    database::ensure(&src, &login).await.unwrap();
    // Rows of ~330 bytes on disk: hex text, which compresses about 2:1 as much real text does.
    let rows = mib * 1024 * 1024 / 330;
    let fill = Instant::now();
    psql(
        bin,
        &src,
        &login,
        &format!(
            "CREATE TABLE t (id bigint PRIMARY KEY, a text, b text); \
             INSERT INTO t SELECT g, md5(g::text), md5((g * 7)::text) || md5((g * 11)::text) \
               || md5((g * 13)::text) || md5((g * 17)::text) \
             FROM generate_series(1, {rows}) g;"
        ),
    );
    let size: u64 = psql(
        bin,
        &src,
        &login,
        "SELECT pg_database_size(current_database())",
    )
    .parse()
    .unwrap();
    eprintln!(
        "filled {rows} rows, database {:.0} MiB, in {:.1} s",
        size as f64 / 1048576.0,
        fill.elapsed().as_secs_f64()
    );
    let dumps = root.path().join("dumps");
    std::fs::create_dir_all(&dumps).unwrap();
    let target = Target {
        to: BackupTo::Dir {
            path: dumps.to_string_lossy().into_owned(),
        },
        s3: None,
    };
    let port = src.port.to_string();
    let mut results = Vec::new();
    for round in 0..rounds {
        // Through cairn.
        let ours = database::backup(&src, &login, &target, &format!("bench/{round}.dump"))
            .await
            .unwrap();
        // By hand, the same dump to a file.
        let hand_file = dumps.join(format!("hand-{round}.dump"));
        let mut cmd = Command::new(bin.join("pg_dump"));
        cmd.args(["-Fc", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(["-d", "bench", "-f"])
            .arg(&hand_file)
            .env("PGPASSWORD", admin(&src));
        let hand_dump = timed("pg_dump", cmd);
        let hand_bytes = std::fs::metadata(&hand_file).unwrap().len();

        // Restores into fresh instances: through cairn (fetch, SHA-256, pg_restore), and by hand.
        let into = instance(bin, root.path(), &format!("restored-{round}"));
        database::ensure(&into, &login).await.unwrap();
        let started = Instant::now();
        database::restore(&into, &login, &target, &ours.object, &ours.sha256)
            .await
            .unwrap();
        let our_restore = started.elapsed();
        let by_hand = instance(bin, root.path(), &format!("by-hand-{round}"));
        database::ensure(&by_hand, &login).await.unwrap();
        let mut cmd = Command::new(bin.join("pg_restore"));
        cmd.args(["-h", "127.0.0.1", "-p", &by_hand.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "bench",
                "--no-owner",
                "--no-privileges",
            ])
            .args(["--exit-on-error", "--single-transaction", "--role=bench"])
            .arg(&hand_file)
            .env("PGPASSWORD", admin(&by_hand));
        let hand_restore = timed("pg_restore", cmd);
        let a = database::counts(&into, &login).await.unwrap();
        let b = database::counts(&by_hand, &login).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(a.get("public.t"), Some(&rows));
        results.push((ours, hand_dump, hand_bytes, our_restore, hand_restore));
        database::destroy(&into).await.unwrap();
        database::destroy(&by_hand).await.unwrap();
    }
    println!(
        "database {:.0} MiB ({rows} rows), MB/s are of the database's size (pg_database_size)\n",
        size as f64 / 1048576.0
    );
    println!(
        "| round | backup: cairn | backup: pg_dump -Fc by hand | dump size | restore: cairn (fetch + sha256 + pg_restore) | restore: pg_restore by hand |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (i, (ours, hd, hb, or, hr)) in results.iter().enumerate() {
        println!(
            "| {} | {:.1} s, {:.1} MB/s | {:.1} s, {:.1} MB/s | {:.0} / {:.0} MiB | {:.1} s, {:.1} MB/s | {:.1} s, {:.1} MB/s |",
            i + 1,
            ours.duration.as_secs_f64(),
            mbps(size, ours.duration),
            hd.as_secs_f64(),
            mbps(size, *hd),
            ours.bytes as f64 / 1048576.0,
            *hb as f64 / 1048576.0,
            or.as_secs_f64(),
            mbps(size, *or),
            hr.as_secs_f64(),
            mbps(size, *hr),
        );
    }
    database::destroy(&src).await.unwrap();
}
