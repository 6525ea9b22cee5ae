//! A tiny test app for the node proxy: it serves HTTP/1.1 on `127.0.0.1:$PORT` (or `$LISTEN`), so it runs
//! under the process driver like any app, and in tests and the proxy benchmark as a plain process.
//!
//! - `/` answers 200 `ok <APP_NAME>` (the benchmark's backend);
//! - `/ws` is a WebSocket that echoes every text and binary message;
//! - `/sse?count=N&interval_ms=M` streams N server-sent events (`data: event <i>`), M ms apart, the first
//!   at once, then ends;
//! - `/headers` answers the forwarding headers it received, one `name: value` line each (`-` if absent);
//! - `/upload` reads the request body and answers how many bytes it had;
//! - `/slow?ms=M` answers after M ms.
//!
//! ```text
//! cargo build -p cairn-agent --example ws_echo && PORT=9000 target/debug/examples/ws_echo
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, s: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s)).boxed());
    *r.status_mut() = status;
    r
}

fn query(req: &Request<Incoming>, key: &str, default: u64) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

async fn handle(mut req: Request<Incoming>, name: &'static str) -> Response<Body> {
    match req.uri().path() {
        "/" => text(StatusCode::OK, format!("ok {name}\n")),
        "/headers" => {
            let mut out = String::new();
            for h in [
                "host",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host",
                "x-real-ip",
                "forwarded",
                "cairn-hop",
            ] {
                let v = req
                    .headers()
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                out.push_str(&format!("{h}: {v}\n"));
            }
            text(StatusCode::OK, out)
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms", 1000))).await;
            text(StatusCode::OK, "slow\n".into())
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("body: {e}\n")),
                }
            }
            text(StatusCode::OK, format!("{n}\n"))
        }
        "/sse" => {
            let count = query(&req, "count", 5);
            let interval = Duration::from_millis(query(&req, "interval_ms", 100));
            let events = futures_util::stream::unfold(0u64, move |i| async move {
                if i >= count {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(interval).await;
                }
                let frame = Frame::data(Bytes::from(format!("data: event {i}\n\n")));
                Some((Ok::<_, Infallible>(frame), i + 1))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(events)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r.headers_mut()
                .insert("cache-control", "no-cache".parse().unwrap());
            r
        }
        "/ws" => {
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                return text(StatusCode::BAD_REQUEST, "not a WebSocket request\n".into());
            };
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(io) = upgrade.await else { return };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
                while let Some(Ok(msg)) = ws.next().await {
                    let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                    if matches!(msg, Message::Close(_)) || (echo && ws.send(msg).await.is_err()) {
                        return;
                    }
                }
            });
            let mut r = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
            let h = r.headers_mut();
            h.insert("connection", "upgrade".parse().unwrap());
            h.insert("upgrade", "websocket".parse().unwrap());
            h.insert(
                "sec-websocket-accept",
                derive_accept_key(key.as_bytes()).parse().unwrap(),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::var("LISTEN") {
        Ok(a) => a.parse().expect("LISTEN is an address"),
        Err(_) => {
            let port: u16 = std::env::var("PORT")
                .ok()
                .and_then(|p| p.parse().ok())
                .expect("PORT is set");
            SocketAddr::from(([127, 0, 0, 1], port))
        }
    };
    let name: &'static str = Box::leak(
        std::env::var("APP_NAME")
            .unwrap_or_else(|_| "echo".into())
            .into_boxed_str(),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (io, _) = listener.accept().await?;
        let _ = io.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| async move {
                Ok::<_, Infallible>(handle(req, name).await)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades()
                .await;
        });
    }
}
