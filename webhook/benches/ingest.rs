//! Webhook ingest against the real `cairn serve` on loopback, with a real PostgreSQL (`fsync` and
//! `synchronous_commit` on): the time from sending a signed delivery to its `202 Accepted` (read, verify,
//! parse, record durably, wake the worker), at a fixed rate (open loop: a request starts on schedule
//! whether or not earlier ones have answered), and the most deliveries per second a few connections get.
//!
//! ```text
//! cargo build --release --bin cairn
//! CAIRN_GITHUB_FIXTURES=../shared/fixtures/github cargo bench -p cairn-webhook --bench ingest
//! cargo bench -p cairn-webhook --bench ingest -- --rate 500 --seconds 20 --connections 16
//! ```
//!
//! The binary is `CAIRN_BIN`, else `target/release/cairn`. Every delivery is the fixtures' push of a new
//! branch with its own delivery id (GitHub's real payload, 7 KiB), signed as GitHub signs it; `cairn serve`
//! processes each after answering (the delivery worker shares the machine), as it would in production.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_webhook::signature::{WebhookSecret, sign};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const SECRET: &str = "bench-secret";
/// `X-GitHub-Event` of every delivery.
static EVENT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

struct Options {
    rate: u32,
    seconds: u32,
    connections: usize,
    /// `--ping`: GitHub's ping instead of a push (recorded as handled at once: no worker runs).
    ping: bool,
}

fn options() -> Options {
    let mut o = Options {
        rate: 500,
        seconds: 20,
        connections: 16,
        ping: false,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = || {
            args.get(i + 1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--rate" => o.rate = value() as u32,
            "--seconds" => o.seconds = value() as u32,
            "--connections" => o.connections = value() as usize,
            "--ping" => {
                o.ping = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn main() {
    let Some(fixtures) = std::env::var_os("CAIRN_GITHUB_FIXTURES").map(PathBuf::from) else {
        eprintln!("skipped: CAIRN_GITHUB_FIXTURES is not set (the payload is GitHub's real push)");
        return;
    };
    let binary = std::env::var_os("CAIRN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/cairn"));
    if !binary.exists() {
        eprintln!(
            "skipped: {} does not exist (cargo build --release --bin cairn, or set CAIRN_BIN)",
            binary.display()
        );
        return;
    }
    let options = options();
    let (event, file) = if options.ping {
        ("ping", "ping.json")
    } else {
        ("push", "push.with-new-branch.json")
    };
    let payload = std::fs::read(fixtures.join("webhooks").join(file)).expect("the fixture");
    EVENT.set(event).expect("set once");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run(binary, Bytes::from(payload), options));
}

/// `cairn serve` on a fresh database and an empty config directory.
struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(binary: &Path, db_url: &str, config: &Path) -> Serve {
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--interval",
            "1h",
            "--repo",
        ])
        .arg(config)
        .env("DATABASE_URL", db_url)
        .env("CAIRN_GITHUB_WEBHOOK_SECRET", SECRET)
        .env("CAIRN_LOG", "warn")
        .env_remove("CAIRN_GITHUB_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cairn serve starts");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("the address");
    Serve {
        child,
        url: format!("http://{addr}/webhooks/github"),
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Sends one signed delivery; returns its latency, or `None` unless it was accepted.
async fn deliver(
    client: &HttpClient,
    url: &str,
    id: &str,
    body: &Bytes,
    sig: &str,
) -> Option<Duration> {
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("x-github-event", *EVENT.get().expect("set in main"))
        .header("x-github-delivery", id)
        .header("x-hub-signature-256", sig)
        .body(Full::new(body.clone()))
        .unwrap();
    let started = Instant::now();
    let response = client.request(request).await.ok()?;
    let status = response.status();
    let _ = response.into_body().collect().await.ok()?;
    // 202 for a recorded delivery, 200 for a ping (recorded as handled).
    (status == 202 || status == 200).then(|| started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn run(binary: PathBuf, body: Bytes, o: Options) {
    let Some(db) = cairn_testkit::pg::TestDb::new().await else {
        return;
    };
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, current_setting(name) FROM pg_settings
         WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method', 'commit_delay')
         ORDER BY name",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let shown: Vec<String> = settings.iter().map(|(n, v)| format!("{n}={v}")).collect();
    println!("postgres settings: {}", shown.join(" "));
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("cairn.toml"),
        "base_domain = \"apps.example.com\"\n",
    )
    .unwrap();
    let serve = start(&binary, db.url(), config.path());
    let secret = WebhookSecret::new(SECRET).unwrap();
    let sig: Arc<str> = sign(&secret, &body).into();
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(o.connections.max(64))
        .build_http();
    let url: Arc<str> = serve.url.clone().into();

    // The endpoint answers 503 until the database is up; then warm up connections, the server's
    // pool and its statement cache.
    let ready = Instant::now();
    while deliver(&client, &url, "ready", &body, &sig).await.is_none() {
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "cairn serve never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..200 {
        deliver(&client, &url, &format!("warm-{i}"), &body, &sig).await;
    }

    // Open loop at a fixed rate.
    let total = (o.rate * o.seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(o.rate));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (client, url, body, sig) = (client.clone(), url.clone(), body.clone(), sig.clone());
        tasks.push(tokio::spawn(async move {
            deliver(&client, &url, &format!("rate-{i}"), &body, &sig).await
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for t in tasks {
        if let Some(l) = t.await.unwrap() {
            latencies.push(l);
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "open loop at {} deliveries/s for {} s: {} of {} accepted in {:.2} s ({:.0}/s); latency p50 {}, p90 {}, p99 {}, max {}",
        o.rate,
        o.seconds,
        latencies.len(),
        total,
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.90)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap()),
    );

    // The delivery worker's backlog, and how long it takes to drain (it processes deliveries one
    // transaction each, classifying them against the applied state).
    let backlog = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'received'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let left = backlog(db.pool().clone()).await;
    let draining = Instant::now();
    while backlog(db.pool().clone()).await > 0 && draining.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let processed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status <> 'received'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    let (first, last): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT min(handled_at), max(handled_at) FROM webhook_deliveries
             WHERE delivery_id LIKE 'rate-%'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
    let span = (last - first).to_std().unwrap_or_default();
    println!(
        "processing: {left} still waiting when the load stopped, drained {:.2} s later; {processed} \
         processed, the open loop's {total} over {:.2} s ({:.0}/s)",
        draining.elapsed().as_secs_f64(),
        span.as_secs_f64(),
        total as f64 / span.as_secs_f64().max(0.001),
    );

    // Closed loop: as fast as `connections` clients go, for a third of the time.
    let until = Instant::now() + Duration::from_secs(u64::from(o.seconds.div_ceil(3)));
    let started = Instant::now();
    let workers: Vec<_> = (0..o.connections)
        .map(|w| {
            let (client, url, body, sig) = (client.clone(), url.clone(), body.clone(), sig.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut n = 0;
                while Instant::now() < until {
                    if let Some(l) =
                        deliver(&client, &url, &format!("max-{w}-{n}"), &body, &sig).await
                    {
                        done.push(l);
                    }
                    n += 1;
                }
                done
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "closed loop, {} connections: {} accepted in {:.2} s = {:.0} deliveries/s; latency p50 {}, p99 {}",
        o.connections,
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
    );

    // Every accepted delivery is durable and gets processed.
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(db.pool())
        .await
        .unwrap();
    println!("recorded deliveries: {recorded}");
    drop(serve);
    db.close().await;
}
