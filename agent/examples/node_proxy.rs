//! The node proxy alone, in its own process, with routes from the command line: what the memory test
//! measures (a 1 GiB upload through it) and what the proxy benchmark (`benches/proxy.sh`) runs.
//!
//! ```text
//! cargo run --release -p cairn-agent --example node_proxy -- --listen 127.0.0.1:8000 \
//!     [--route HOST=ADDR]... [--cluster TABLE.json] [--node NAME] [--hop-key-file FILE] \
//!     [--max-body BYTES|none] [--tls-listen ADDR --tls-table TLS.json]
//! ```
//!
//! `--route` gives this node a local replica of an app serving HOST at ADDR; `--cluster` installs a
//! cluster route table (the JSON form of `cairn_agent::ClusterTable`); `--tls-table` a TLS table (the
//! JSON form of `cairn_agent::TlsTable`: certificates with their PEM chain and key, host policy,
//! challenges) served over HTTPS on `--tls-listen`. It prints `listening ADDR` once it accepts
//! connections (then `tls ADDR` with `--tls-listen`), and serves until SIGTERM or SIGINT.

use std::net::SocketAddr;

use cairn_agent::proxy::{ClusterTable, HopKey, ProxyConfig, TlsTable};
use cairn_agent::{Backend, Proxy, ReplicaId};
use cairn_schema::Name;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:8000".parse().map_err(|e| format!("{e}"))?;
    let mut routes = Vec::new();
    let mut cluster = None;
    let mut key = None;
    let mut tls_listen: Option<SocketAddr> = None;
    let mut tls_table = None;
    let mut cfg = ProxyConfig::default();
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--route" => {
                let v = value()?;
                let (host, addr) = v.split_once('=').ok_or("--route HOST=ADDR")?;
                let addr: SocketAddr = addr.parse().map_err(|e| format!("--route: {e}"))?;
                routes.push((host.to_owned(), addr));
            }
            "--cluster" => {
                let text =
                    std::fs::read_to_string(value()?).map_err(|e| format!("--cluster: {e}"))?;
                let table: ClusterTable =
                    serde_json::from_str(&text).map_err(|e| format!("--cluster: {e}"))?;
                cluster = Some(table);
            }
            "--node" => cfg.node = Some(Name::new(&value()?).map_err(|e| format!("--node: {e}"))?),
            "--hop-key-file" => {
                let text = std::fs::read_to_string(value()?)
                    .map_err(|e| format!("--hop-key-file: {e}"))?;
                key = Some(HopKey::new(&text)?);
            }
            "--max-body" => {
                let v = value()?;
                cfg.max_body_bytes = if v == "none" {
                    None
                } else {
                    Some(v.parse().map_err(|e| format!("--max-body: {e}"))?)
                };
            }
            "--tls-listen" => {
                tls_listen = Some(value()?.parse().map_err(|e| format!("--tls-listen: {e}"))?);
            }
            "--tls-table" => {
                let text =
                    std::fs::read_to_string(value()?).map_err(|e| format!("--tls-table: {e}"))?;
                let table: TlsTable =
                    serde_json::from_str(&text).map_err(|e| format!("--tls-table: {e}"))?;
                tls_table = Some(table);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !listen.ip().is_unspecified() {
        cfg.forward_from = Some(listen.ip());
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let proxy = Proxy::new(cfg);
        for (i, (host, addr)) in routes.into_iter().enumerate() {
            let app = Name::new(&format!("app{i}")).map_err(|e| e.to_string())?;
            let slot = u32::try_from(i).unwrap_or(0);
            proxy.switch_slot(
                &app,
                &[host],
                Backend::new(ReplicaId(format!("r{i}")), 1, slot, addr),
            );
        }
        if let Some(t) = cluster {
            proxy.install_cluster(t);
        }
        proxy.set_hop_key(key);
        if let Some(t) = tls_table {
            let report = proxy.install_tls(t);
            if let Some(e) = report.rejected.first() {
                return Err(format!("--tls-table: {e}"));
            }
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        println!(
            "listening {}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let tls = match tls_listen {
            Some(addr) => {
                let tcp = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                let tls = proxy.tls_listener(tcp).map_err(|e| e.to_string())?;
                println!("tls {}", tls.local_addr().map_err(|e| e.to_string())?);
                Some(tls)
            }
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let tls_task = tls.map(|l| tokio::spawn(proxy.clone().serve(l, stopped())));
        let plain = tokio::spawn(proxy.serve(listener, stopped()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
        if let Some(t) = tls_task {
            t.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        plain
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    })
}
