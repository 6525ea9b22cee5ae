//! `cairn serve`: the control plane. Its HTTP listener serves `/healthz` and `/readyz` from the start, and
//! `POST /webhooks/github` when a webhook secret is configured; the reconcile loop runs on a timer and wakes
//! on file changes (directory sources) and webhook deliveries; the GitHub integration's workers run beside
//! it, and all of it stops on SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use cairn_reconciler::controller::ConfigSource;
use tokio::sync::{Notify, watch};

use super::control::{DbArgs, SourceArgs, controller, runtime};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    src: SourceArgs,
    /// Reconcile at least this often (also the poll for missed webhooks)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    interval: Duration,
    /// The HTTP listen address; port 0 picks a free port (the bound address is printed)
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A node with no heartbeat for this long is offline
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90s")]
    node_offline_after: Duration,
    /// Log format on stderr
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    webhooks: super::webhooks::ServeArgs,
    #[command(flatten)]
    api: super::serve_api::ApiArgs,
    #[command(flatten)]
    metrics: super::metrics::MetricsArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr, filtered by `CAIRN_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler installs");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    init_logging(args.log_format);
    let webhooks = super::webhooks::Prepared::new(&args.webhooks)?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("listening on {addr}");
        tracing::info!(%addr, "listening");

        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        // The listener answers /healthz before the database is reachable; /readyz says when it is.
        let ready: Arc<tokio::sync::OnceCell<sqlx::PgPool>> = Arc::default();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(ready.clone());
        let app = webhooks.mount(app);
        // The agent and admin APIs (`/agent/v1`, `/api/v1`) answer 503 until the database is reachable.
        let apis = super::serve_api::Late::default();
        let app = app.merge(apis.router());
        let app = super::metrics::mount(app, &args.metrics, ready.clone(), stop_rx.clone()).await?;
        let server = tokio::spawn(
            axum::serve(
                // Answers (a long-poll handing out a task) leave at once, not after a delayed ACK.
                axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
        );

        let mut c = controller(&args.db, &args.src).await?;
        c.offline_after = args.node_offline_after;
        c.history_retention = args.api.log_retention;
        webhooks.install_hooks(&mut c, &args.src)?;
        let _ = ready.set(c.pool.clone());
        let wake = Arc::new(Notify::new());
        apis.set(
            super::serve_api::start(
                &args.api,
                &args.src,
                &args.db.database_url,
                args.node_offline_after,
                c.hooks.clone(),
                wake.clone(),
                stop_rx.clone(),
            )
            .await?,
        );
        let _watcher = match &*c.source.lock().await {
            ConfigSource::Dir(dir) => {
                let w = wake.clone();
                Some(
                    cairn_reconciler::source::watch::watch(
                        dir,
                        Duration::from_millis(300),
                        Vec::new(),
                        move || w.notify_one(),
                    )
                    .with_context(|| format!("cannot watch {}", dir.display()))?,
                )
            }
            ConfigSource::Git(_) => None,
        };
        let c = Arc::new(c);
        let webhooks = webhooks
            .start(
                &args.db,
                &args.src,
                c.clone(),
                wake.clone(),
                stop_rx.clone(),
            )
            .await?;
        c.clone()
            .run(wake, args.interval, stopped(stop_rx.clone()))
            .await;
        webhooks.await.context("the webhook workers failed")?;
        server.await.context("the HTTP server task failed")??;
        c.pool.close().await;
        Ok(ExitCode::SUCCESS)
    })
}

async fn readyz(
    State(ready): State<Arc<tokio::sync::OnceCell<sqlx::PgPool>>>,
) -> (StatusCode, &'static str) {
    let Some(pool) = ready.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n");
    };
    match cairn_reconciler::store::ping(pool).await {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
    }
}
