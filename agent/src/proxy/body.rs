//! Bodies passing through the proxy, frame by frame (nothing is collected): a request body held to the
//! app's size limit and to an idle timeout, and a response body that counts against its backend until it
//! ends.
//!
//! What it must not do: buffer a body, or count time the replica spends not reading as the client's idle
//! time.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{BoxError, InFlight, ProxyBody};

/// Why a request body was cut off, so the proxy can answer 413 or 408 instead of 502.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    TooLarge,
    Idle,
}

/// Shared between a [`Limited`] body and the request handler that passed it on.
#[derive(Debug, Default, Clone)]
pub(super) struct CutFlag(Arc<AtomicU8>);

impl CutFlag {
    fn set(&self, c: Cut) {
        let v = match c {
            Cut::TooLarge => 1,
            Cut::Idle => 2,
        };
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<Cut> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(Cut::TooLarge),
            2 => Some(Cut::Idle),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CutError(&'static str);

/// A request body held to `limit` bytes and to `idle` without a frame from the client.
pub(super) struct Limited<B> {
    inner: B,
    limit: Option<u64>,
    seen: u64,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    /// Whether the last poll left us waiting on the client (only that time counts as idle).
    waiting: bool,
    flag: CutFlag,
}

impl<B> Limited<B> {
    pub fn new(inner: B, limit: Option<u64>, idle: Duration, flag: CutFlag) -> Self {
        Limited {
            inner,
            limit,
            seen: 0,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
            flag,
        }
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.waiting {
            // The replica asked for more: the client's idle time starts now.
            let deadline = Instant::now() + this.idle;
            this.sleep.as_mut().reset(deadline);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                this.waiting = true;
                ready!(this.sleep.as_mut().poll(cx));
                this.flag.set(Cut::Idle);
                Poll::Ready(Some(Err(CutError(
                    "the client stopped sending the request body",
                )
                .into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if this.limit.is_some_and(|l| this.seen > l) {
                        this.flag.set(Cut::TooLarge);
                        return Poll::Ready(Some(Err(
                            CutError("the request body is too large").into()
                        )));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.waiting = false;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.waiting = false;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts against its backend until it is finished or dropped.
pub(super) struct Tracked {
    pub inner: ProxyBody,
    pub _guard: Option<InFlight>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
