//! Bodies passing through the proxy, frame by frame (nothing is collected): a request body held to the
//! app's size limit and to an idle timeout, a request body that can go to another target as long as no
//! attempt has read from it ([`Replayable`]), and a response body that counts against its backend until
//! it ends.
//!
//! What it must not do: buffer a body, count time the replica spends not reading as the client's idle
//! time, or let a body that one attempt started reading be sent again.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body_util::BodyExt;
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

/// A request body each attempt gets a handle to ([`Replayable::attempt`]); the first frame the current
/// attempt's handle is asked for takes the body for good. Until then (a refused connection, a node that
/// answered before asking for the body) the next attempt can have it instead, and an older attempt's
/// handle only gets an error: its connection is dropped, never sent a part of the body.
///
/// Towards another node the handle is also held back by a [`Gate`] until that node asks for the body
/// (`Expect: 100-continue`, which its proxy answers with `100 Continue` once its replica takes the body):
/// hyper asks for a body right after the request head, so without it a node's miss would always come
/// too late to send the body elsewhere.
pub(super) struct Replayable {
    slot: Arc<Mutex<Slot>>,
    hint: SizeHint,
    end: bool,
}

struct Slot {
    attempt: u32,
    body: Option<ProxyBody>,
}

impl Replayable {
    pub fn new(body: ProxyBody) -> Self {
        Replayable {
            hint: body.size_hint(),
            end: body.is_end_stream(),
            slot: Arc::new(Mutex::new(Slot {
                attempt: 0,
                body: Some(body),
            })),
        }
    }

    /// The body for a new attempt (held back by `gate` until it opens), or `None` once an attempt has
    /// started reading it.
    pub fn attempt(&self, gate: Option<Gate>) -> Option<ProxyBody> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        slot.body.as_ref()?;
        slot.attempt += 1;
        Some(
            Attempt {
                slot: self.slot.clone(),
                attempt: slot.attempt,
                gate,
                inner: None,
                hint: self.hint,
                end: self.end,
            }
            .boxed(),
        )
    }

    /// Whether no attempt has read from the body (so another one may send it).
    pub fn untouched(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .body
            .is_some()
    }
}

/// One attempt's handle to a [`Replayable`] body.
struct Attempt {
    slot: Arc<Mutex<Slot>>,
    attempt: u32,
    gate: Option<Gate>,
    inner: Option<ProxyBody>,
    hint: SizeHint,
    end: bool,
}

impl Body for Attempt {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.inner.is_none() {
            if let Some(gate) = &this.gate
                && !ready!(gate.poll_open(cx))
            {
                return Poll::Ready(Some(Err(CutError(
                    "the next node did not take the request body",
                )
                .into())));
            }
            let mut slot = this.slot.lock().unwrap_or_else(|p| p.into_inner());
            if slot.attempt != this.attempt || slot.body.is_none() {
                return Poll::Ready(Some(Err(CutError(
                    "the request body went to another attempt",
                )
                .into())));
            }
            this.inner = slot.body.take();
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(inner) => inner.is_end_stream(),
            None => self.end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => self.hint,
        }
    }
}

/// Holds an attempt's body back until [`Gate::open`]; after [`Gate::shut`] the attempt's connection gets
/// an error instead (so it is dropped rather than left waiting).
#[derive(Debug, Clone, Default)]
pub(super) struct Gate(Arc<GateState>);

#[derive(Debug, Default)]
struct GateState {
    /// 0: waiting, 1: open, 2: shut.
    state: AtomicU8,
    waker: AtomicWaker,
}

impl Gate {
    pub fn open(&self) {
        self.set(1);
    }

    pub fn shut(&self) {
        self.set(2);
    }

    fn set(&self, to: u8) {
        // Only from waiting: an open gate stays open (the body is on its way).
        let _ = self
            .0
            .state
            .compare_exchange(0, to, Ordering::AcqRel, Ordering::Acquire);
        self.0.waker.wake();
    }

    /// Ready with whether the gate opened (`false`: shut).
    fn poll_open(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let decided = |s: u8| (s != 0).then_some(s == 1);
        if let Some(open) = decided(self.0.state.load(Ordering::Acquire)) {
            return Poll::Ready(open);
        }
        self.0.waker.register(cx.waker());
        match decided(self.0.state.load(Ordering::Acquire)) {
            Some(open) => Poll::Ready(open),
            None => Poll::Pending,
        }
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
