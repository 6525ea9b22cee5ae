//! Upgraded connections (WebSocket and any other HTTP/1.1 `Upgrade`): once both the client and the
//! replica switched protocols, bytes are copied both ways as they arrive, each direction on its own (a
//! side that stops reading never blocks the other), until both sides close, either fails, or nothing moved
//! either way for the idle timeout. Each open tunnel counts in the proxy's `cairn_proxy_websockets` gauge.
//!
//! Also the listener's first-bytes deadline: a connection must send the first bytes of a request (enough
//! to tell HTTP/1.1 from HTTP/2's preface) within the header timeout, since hyper's own header timeout
//! starts only once the protocol is known.
//!
//! What it must not do: buffer more than one read per direction, or parse what it copies.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Bytes one read may move (per direction and tunnel).
const CHUNK: usize = 16 * 1024;

/// Waits for both upgrades, then copies until the tunnel ends.
pub(super) async fn run(client: OnUpgrade, upstream: OnUpgrade, idle: Duration, open: Gauge) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "an upgrade did not complete");
            return;
        }
    };
    open.inc();
    let _open = Open(open);
    let (cr, cw) = tokio::io::split(TokioIo::new(client));
    let (ur, uw) = tokio::io::split(TokioIo::new(upstream));
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let copy = async { tokio::try_join!(pipe(cr, uw, &last, start), pipe(ur, cw, &last, start)) };
    let watchdog = async {
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let quiet = start.elapsed().saturating_sub(since);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    tokio::select! {
        r = copy => if let Err(e) = r {
            tracing::debug!(error = %e, "upgraded connection ended");
        },
        () = watchdog => tracing::debug!(idle = ?idle, "upgraded connection idle, closed"),
    }
}

/// Counts a tunnel out of the gauge however it ends.
struct Open(Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn pipe<R, W>(mut r: R, mut w: W, last: &AtomicU64, start: Instant) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half close: the other direction may go on.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        let now = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(now, Ordering::Relaxed);
    }
}

/// A client stream that must deliver its first [`FirstBytes::NEEDED`] bytes before a deadline.
pub(super) struct FirstBytes<I> {
    io: I,
    got: usize,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<I> FirstBytes<I> {
    /// Enough to tell HTTP/2's connection preface from an HTTP/1 request line.
    const NEEDED: usize = 24;

    pub fn new(io: I, limit: Duration) -> Self {
        FirstBytes {
            io,
            got: 0,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstBytes<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if this.deadline.is_some() {
                    this.got += buf.filled().len() - before;
                    if this.got >= Self::NEEDED || buf.filled().len() == before {
                        this.deadline = None;
                    }
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within the header timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstBytes<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
