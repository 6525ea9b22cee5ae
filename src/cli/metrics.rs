//! `/metrics` in `cairn serve`: on the main listener, or on its own (`--metrics-listen`, bound here) when the main
//! one is reachable from where the metrics should not be. The series are in
//! [`cairn_reconciler::metrics`]; they carry counts and timings, never a name, a commit or a secret, so
//! the endpoint needs no token (as is usual for Prometheus targets).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::TcpListener;

#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Serve /metrics on this address instead of the main listener (port 0 picks one; the bound
    /// address is printed as `metrics on ADDR`)
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

/// Binds `--metrics-listen`, if given, and prints the bound address (`metrics on ADDR`).
pub async fn bind(args: &MetricsArgs) -> Result<Option<TcpListener>> {
    let Some(addr) = args.metrics_listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
    let bound = listener.local_addr()?;
    println!("metrics on {bound}");
    tracing::info!(addr = %bound, "serving /metrics");
    Ok(Some(listener))
}
