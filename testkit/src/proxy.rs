//! A TCP proxy a test controls: it forwards a loopback port to an upstream address and can cut the path
//! the way a network fails, so a test can partition a client from its server and heal it again.
//!
//! ```no_run
//! # async fn example(server: std::net::SocketAddr) {
//! use cairn_testkit::proxy::{Mode, Proxy};
//! let proxy = Proxy::start(server).await;         // clients connect to proxy.addr()
//! proxy.set_mode(Mode::BlackHole);                // a partition: nothing passes, nothing is answered
//! proxy.set_mode(Mode::Pass);                     // healed
//! proxy.set_upstream("127.0.0.1:9".parse().unwrap()); // the server moved (e.g. restarted on a new port)
//! # }
//! ```
//!
//! Every mode change ends the connections open at that moment (both sides see the socket closed), so a
//! client never keeps a connection from before a cut or a heal: after a heal, requests go over new
//! connections at once instead of waiting for a client timeout on one the black hole swallowed.
//!
//! What it must not do: listen anywhere but loopback, or change the bytes it forwards.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Pass,
    /// Accepts and closes at once: the client sees its connection closed (a crashed server, a reset).
    Refuse,
    /// Accepts, reads and discards everything, never answers: a partition (packets dropped).
    BlackHole,
}

/// A running proxy; stopped (its listener and every connection closed) when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    mode: watch::Sender<(Mode, u64)>,
    accepted: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Self::start_on(0, upstream).await
    }

    /// Listens on `127.0.0.1:port` (0: a free one), forwarding to `upstream`.
    pub async fn start_on(port: u16, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("the proxy binds a loopback port");
        let addr = listener.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(upstream));
        let (mode, _) = watch::channel((Mode::Pass, 0u64));
        let accepted = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream.clone(),
            mode.subscribe(),
            accepted.clone(),
        ));
        Proxy {
            addr,
            upstream,
            mode,
            accepted,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the mode; the connections open now are closed.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_modify(|(m, epoch)| {
            *m = mode;
            *epoch += 1;
        });
    }

    /// How many client connections it has accepted so far (a client that keeps its connections open
    /// between requests makes few).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode.borrow().0
    }

    /// Forwards new connections to `upstream` from now on; the connections open now are closed.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
        self.set_mode(self.mode());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Ends every connection task (each watches for a new epoch, and the sender's drop counts).
        self.set_mode(Mode::Refuse);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: Arc<Mutex<SocketAddr>>,
    mode: watch::Receiver<(Mode, u64)>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let mut mode = mode.clone();
        let (current, epoch) = *mode.borrow_and_update();
        let upstream = *upstream.lock().unwrap();
        tokio::spawn(async move {
            // Ends when the mode changes (or the proxy is dropped).
            let changed = async move {
                let _ = mode.wait_for(|(_, e)| *e != epoch).await;
            };
            match current {
                Mode::Refuse => drop(client),
                Mode::BlackHole => {
                    let swallow = async move {
                        let mut client = client;
                        let mut buf = vec![0u8; 16 * 1024];
                        while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
                        // The client closed its side; keep nothing open.
                    };
                    tokio::select! {
                        () = swallow => {}
                        () = changed => {}
                    }
                }
                Mode::Pass => {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return; // the client sees its connection closed, as with a dead server
                    };
                    let _ = server.set_nodelay(true);
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = changed => {}
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt as _;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// One round trip through the proxy: `Some(reply)`, or `None` when nothing came back in time or the
    /// connection closed.
    async fn ping(addr: SocketAddr) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn passes_refuses_swallows_and_heals() {
        let proxy = Proxy::start(echo_server().await).await;
        assert_eq!(ping(proxy.addr()).await.as_deref(), Some(&b"ping"[..]));

        // A connection open across a cut is closed by it.
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        open.read_exact(&mut buf).await.unwrap();
        proxy.set_mode(Mode::BlackHole);
        let n = tokio::time::timeout(Duration::from_secs(2), open.read(&mut buf))
            .await
            .expect("the cut closes open connections");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

        assert_eq!(
            ping(proxy.addr()).await,
            None,
            "a black hole answers nothing"
        );
        proxy.set_mode(Mode::Refuse);
        assert_eq!(ping(proxy.addr()).await, None);
        proxy.set_mode(Mode::Pass);
        assert_eq!(ping(proxy.addr()).await.as_deref(), Some(&b"ping"[..]));

        // A new upstream (the old one keeps running: only the proxy's choice changed).
        proxy.set_upstream(echo_server().await);
        assert_eq!(ping(proxy.addr()).await.as_deref(), Some(&b"ping"[..]));
    }
}
