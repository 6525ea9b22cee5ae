//! `/metrics` in `cairn serve`: on the main listener, or on its own (`--metrics-listen`) when the main
//! one is reachable from where the metrics should not be. The series are in
//! [`cairn_reconciler::metrics`]; they carry counts and timings, never a name, a commit or a secret, so
//! the endpoint needs no token (as is usual for Prometheus targets).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use cairn_reconciler::worker::Shutdown;
use tokio::sync::OnceCell;

/// Connections `--metrics-listen` holds at most.
const METRICS_MAX_CONNECTIONS: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Serve /metrics on this address instead of the main listener (port 0 picks one; the bound
    /// address is printed as `metrics on ADDR`)
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

/// Adds `/metrics` to `app`, or serves it on `--metrics-listen` until `stop`.
pub async fn mount(
    app: Router,
    args: &MetricsArgs,
    pool: Arc<OnceCell<sqlx::PgPool>>,
    stop: Shutdown,
    bounds: &cairn_reconciler::api::listen::Bounds,
) -> Result<Router> {
    let metrics = cairn_reconciler::metrics::router(pool);
    let Some(addr) = args.metrics_listen else {
        return Ok(app.merge(metrics));
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
    let bound = listener.local_addr()?;
    println!("metrics on {bound}");
    tracing::info!(addr = %bound, "serving /metrics");
    // Bounded like the main listener, with a cap of its own (scrapers are few).
    let mut bounds = bounds.clone();
    bounds.max_connections = bounds.max_connections.min(METRICS_MAX_CONNECTIONS);
    tokio::spawn(async move {
        let served = cairn_reconciler::api::listen::serve(listener, metrics, bounds, stop).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    });
    Ok(app)
}
