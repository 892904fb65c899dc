//! The handles a stream's two ends hold: [`StreamSender`] sends items
//! within the peer's credit, [`StreamReceiver`] takes them and grants
//! credit back. Bytes only: the typed `Streaming<T>` and `ServerStream<T>`
//! wrap these (`streaming.rs`).
//!
//! Dropping a receiver before its stream ended sends `Reset` (the peer
//! stops sending); dropping a caller's receiver before the call's
//! `Response` cancels the call (`Cancel`), like dropping a unary call.
//!
//! Not here: the credit and item bookkeeping (`streams/mod.rs`), opening a
//! stream (`connection.rs`, `calls/incoming.rs`).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::Error;
use crate::frame::Frame;
use crate::shared::{DriverEvents, Shared};
use crate::streams::StreamEnd;

/// Sends one stream's items, each split into pieces the peer has credit
/// for. Dropping it without [`StreamSender::end`] leaves the stream
/// unfinished: a caller's call is then ended by its deadline or by dropping
/// its receiver.
pub struct StreamSender {
    shared: Arc<Shared>,
    id: u64,
    /// A caller's sender ends its half with `End`; a callee's ends with
    /// the call's `Response`.
    caller: bool,
}

impl std::fmt::Debug for StreamSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSender")
            .field("id", &self.id)
            .finish()
    }
}

impl StreamSender {
    pub(crate) fn new(shared: Arc<Shared>, id: u64, caller: bool) -> Self {
        StreamSender { shared, id, caller }
    }

    /// The stream's (call's) id on its connection.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends one encoded item, waiting for credit and for the previous
    /// piece of this stream to be written. An item may be as large as the
    /// peer's frame limit; it travels in pieces of at most
    /// [`CHUNK`](crate::streams::CHUNK) bytes.
    pub async fn send(&mut self, mut item: Bytes) -> Result<(), Error> {
        if item.len() > self.shared.max_send {
            return Err(Error::FrameTooLarge {
                len: item.len() as u64,
                max: self.shared.max_send as u64,
            });
        }
        loop {
            let n =
                std::future::poll_fn(|cx| self.shared.streams.poll_send(self.id, item.len(), cx))
                    .await
                    .map_err(|end| self.ended(end))?;
            let bytes = item.split_to(n);
            let more = !item.is_empty();
            let frame = Frame::Data {
                id: self.id,
                more,
                bytes,
            };
            if self.shared.outbound.send(frame).await.is_err() {
                return Err(self.shared.closed_error());
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Ends a caller's stream of items (`End`); the callee's `Response`
    /// follows. On a callee's sender this does nothing: returning from the
    /// handler ends its stream.
    pub async fn end(self) -> Result<(), Error> {
        if !self.caller {
            return Ok(());
        }
        let frame = Frame::End { id: self.id };
        self.shared
            .outbound
            .send(frame)
            .await
            .map_err(|_| self.shared.closed_error())
    }

    fn ended(&self, end: StreamEnd) -> Error {
        match end {
            StreamEnd::Closed(_) => self.shared.closed_error(),
            StreamEnd::Reset => Error::StreamReset { id: self.id },
        }
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        self.shared.streams.drop_send(self.id);
    }
}

/// The caller's side of a stream call: the call's `Response`, and the call
/// slot held until it comes.
pub(crate) struct CallEnd {
    pub(crate) reply: oneshot::Receiver<Result<Bytes, Error>>,
    /// Cancels the call if the receiver goes before the `Response` came.
    pub(crate) pending: bool,
    /// A slot of the peer's `max_in_flight`, given back at the end.
    pub(crate) slot: bool,
}

/// What a handler serving a stream call gets (through
/// [`CallContext::take_stream`](crate::CallContext::take_stream)).
#[derive(Debug)]
pub struct ServedStream {
    /// The caller's items, when it sends a stream.
    pub receiver: Option<StreamReceiver>,
    /// Items to the caller, before the handler's reply ends the call.
    pub sender: StreamSender,
}

/// Receives one stream's items; see [`StreamReceiver::next`].
pub struct StreamReceiver {
    shared: Arc<Shared>,
    id: u64,
    /// On the caller's side: the call's end.
    call: Option<CallEnd>,
    /// The call's final result, once it came (caller's side).
    last: Option<Result<Bytes, Error>>,
}

impl std::fmt::Debug for StreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReceiver")
            .field("id", &self.id)
            .finish()
    }
}

impl StreamReceiver {
    pub(crate) fn new(shared: Arc<Shared>, id: u64, call: Option<CallEnd>) -> Self {
        StreamReceiver {
            shared,
            id,
            call,
            last: None,
        }
    }

    /// The stream's (call's) id on its connection.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next encoded item; `None` once the stream ended. On the
    /// caller's side the call's result follows the last item: see
    /// [`StreamReceiver::result`].
    pub async fn next(&mut self) -> Option<Result<Bytes, Error>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`StreamReceiver::next`] as a poll.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Error>>> {
        let rtt = self.rtt();
        loop {
            let (polled, credit) = self.shared.streams.poll_item(self.id, cx, rtt);
            if credit {
                self.shared.events.raise(DriverEvents::STREAMS);
            }
            match polled {
                Poll::Ready(Some(Ok(item))) => return Poll::Ready(Some(Ok(item))),
                Poll::Ready(Some(Err(end))) if self.call.is_none() => {
                    let error = match end {
                        StreamEnd::Closed(_) => self.shared.closed_error(),
                        StreamEnd::Reset => Error::StreamReset { id: self.id },
                    };
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) if self.call.is_none() => return Poll::Ready(None),
                _ => {}
            }
            // The caller's side: the call's `Response` ends the stream.
            if self.last.is_some() {
                return Poll::Ready(None);
            }
            let Some(call) = self.call.as_mut() else {
                return Poll::Pending;
            };
            match std::pin::Pin::new(&mut call.reply).poll(cx) {
                Poll::Ready(result) => {
                    call.pending = false;
                    self.last = Some(result.unwrap_or_else(|_| Err(self.shared.closed_error())));
                    self.release_slot();
                    // Items that came before the `Response` are still
                    // delivered first: look again.
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The call's final result (caller's side), once [`next`] returned
    /// `None`: the encoded reply, or why the call failed. Items not taken
    /// yet are dropped. `None` on a callee's receiver.
    ///
    /// [`next`]: StreamReceiver::next
    pub async fn result(&mut self) -> Option<Result<Bytes, Error>> {
        self.call.as_ref()?;
        while self.next().await.is_some() {}
        self.last.take()
    }

    /// The call's final result once [`next`](StreamReceiver::next)
    /// returned `None` (caller's side), taken once.
    pub fn take_result(&mut self) -> Option<Result<Bytes, Error>> {
        self.last.take()
    }

    fn rtt(&self) -> Option<Duration> {
        match self.shared.min_rtt_nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    fn release_slot(&mut self) {
        if let Some(call) = self.call.as_mut() {
            if std::mem::take(&mut call.slot) {
                self.shared.call_slots.add_permits(1);
            }
        }
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        // A caller's stream ends with the call: a pending one is cancelled
        // below, and a finished one needs no word.
        if self.shared.streams.drop_recv(self.id, self.call.is_none()) {
            self.shared.events.raise(DriverEvents::STREAMS);
        }
        if let Some(call) = &self.call {
            if call.pending {
                // Dropped before the `Response`: the call is cancelled.
                if self.shared.state().calls.remove(self.id).is_some() {
                    let _ = self.shared.outbound.try_send(Frame::Cancel { id: self.id });
                }
            }
        }
        self.release_slot();
    }
}
