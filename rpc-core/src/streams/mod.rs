//! Streams: calls that carry a sequence of items in one direction or both,
//! with credit-based flow control.
//!
//! ```text
//!  caller                                         callee
//!  Open{id, method, args, sends_stream} ───────►  handler gets a StreamReceiver
//!  Data{id, piece} ... End{id}          ───────►  (when sends_stream)
//!                                      ◄───────  Data{id, piece} ...
//!  Credit{id | 0, bytes}               ◄──────►  as each side consumes
//!                                      ◄───────  Response{id, result}: the end
//!  Cancel{id}: the caller gives up      Reset{id}: "stop sending me data"
//! ```
//!
//! - An item is split into `Data` pieces of at most [`CHUNK`] bytes (one
//!   of up to [`MAX_PIECE`] when that is the whole rest of it); a
//!   stream has at most one piece in the write queue at a time, so a small
//!   call or a `Pong` waits behind at most one piece per active stream, and
//!   the queue's order interleaves active streams.
//! - Every piece spends credit of its stream and of the connection
//!   (`flow.rs`); the receiver grants it back as its application consumes.
//! - The callee's `Response` ends the call (gRPC's trailers): its `Err` is
//!   the stream's final error, delivered after every item before it.
//!
//! This module holds one connection's `StreamTable`: each open stream's
//! credit and received items, under one lock of its own (unary calls never
//! take it). The handles users hold are in `handles.rs`.
//!
//! | frame | legal when | otherwise |
//! |---|---|---|
//! | `Data` | on a stream opened, within its and the connection's credit, before its `End` | `GoAway`, close (late ones, after a `Cancel` or `Reset`, are dropped and their credit returned) |
//! | `Credit` | for a stream opened, or 0; total at most [`flow::MAX_CREDIT`] | `GoAway`, close |
//! | `End` | once, from a caller that said `sends_stream` | `GoAway`, close |
//! | `Reset` | for a stream opened | `GoAway`, close |

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::calls::IdHasher;
use crate::frame::Frame;

pub(crate) mod flow;
pub(crate) mod handles;

use flow::RecvWindow;
pub use flow::{
    CHUNK, CONNECTION_WINDOW, MAX_CONNECTION_WINDOW, MAX_CREDIT, MAX_PIECE, MAX_STREAM_WINDOW,
    STREAM_WINDOW,
};

/// What a `Data` piece costs in credit besides its payload: what holding
/// it costs the receiver, so that a peer cannot send empty pieces without
/// end (h2 counts payload only, and empty frames are its known flood).
pub const PIECE_COST: u64 = 32;

/// The receiving half of one stream.
struct Inbound {
    /// Whole items, in order, with the credit each cost.
    items: VecDeque<(Bytes, u64)>,
    /// Pieces of the item being received.
    partial: Vec<Bytes>,
    partial_len: usize,
    partial_cost: u64,
    /// Credit spent on what `items` and `partial` hold.
    buffered: u64,
    window: RecvWindow,
    state: InState,
    waker: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InState {
    /// Items may still come.
    Open,
    /// The sender sent `End`: nothing more may come.
    Ended,
    /// The receiver was dropped and `Reset` sent: what still comes is
    /// dropped, and its connection credit returned.
    Dropped,
}

/// The sending half of one stream.
struct Outgoing {
    credit: u64,
    /// A piece of this stream waits in the write queue.
    queued: bool,
    /// The peer sent `Reset`: it reads no more.
    reset: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Entry {
    recv: Option<Inbound>,
    send: Option<Outgoing>,
}

struct Streams {
    entries: HashMap<u64, Entry, BuildHasherDefault<IdHasher>>,
    /// Credit to send on the whole connection.
    send_credit: u64,
    /// Senders waiting for connection credit.
    credit_waiters: Vec<Waker>,
    /// The connection's receive window.
    recv: RecvWindow,
    /// `Credit` and `Reset` frames for the driver to send.
    control: Vec<Frame>,
    /// The connection has ended, and why.
    closed: Option<String>,
}

/// What a stream handle waits for ended in error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// The connection ended (the reason).
    Closed(String),
    /// The peer sent `Reset`.
    Reset,
}

/// One connection's streams (see the module docs).
pub(crate) struct StreamTable {
    inner: Mutex<Streams>,
}

/// A frame that broke the rules: the reason, for the `GoAway`.
pub(crate) type Violation = String;

impl StreamTable {
    pub(crate) fn new(now: Instant) -> Self {
        StreamTable {
            inner: Mutex::new(Streams {
                entries: HashMap::default(),
                send_credit: CONNECTION_WINDOW,
                credit_waiters: Vec::new(),
                recv: RecvWindow::new(CONNECTION_WINDOW, MAX_CONNECTION_WINDOW, now),
                control: Vec::new(),
                closed: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        // Plain inserts, removes and counters: a poisoned table is still
        // consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens stream `id` with a receiving half, a sending half, or both.
    pub(crate) fn open(&self, id: u64, recv: bool, send: bool, now: Instant) {
        let entry = Entry {
            recv: recv.then(|| Inbound {
                items: VecDeque::new(),
                partial: Vec::new(),
                partial_len: 0,
                partial_cost: 0,
                buffered: 0,
                window: RecvWindow::new(STREAM_WINDOW, MAX_STREAM_WINDOW, now),
                state: InState::Open,
                waker: None,
            }),
            send: send.then_some(Outgoing {
                credit: STREAM_WINDOW,
                queued: false,
                reset: false,
                waker: None,
            }),
        };
        self.lock().entries.insert(id, entry);
    }

    /// Streams open now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Bytes received and not yet taken by the application, on all streams.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> u64 {
        let s = self.lock();
        s.entries
            .values()
            .filter_map(|e| e.recv.as_ref())
            .map(|r| r.buffered)
            .sum()
    }

    /// A `Data` piece arrived. `opened` says whether `id` names a stream
    /// the peer could know (one opened, maybe since ended); `max_item` bounds
    /// one whole item.
    pub(crate) fn on_data(
        &self,
        id: u64,
        more: bool,
        bytes: Bytes,
        opened: bool,
        max_item: usize,
    ) -> Result<(), Violation> {
        let n = bytes.len() as u64 + PIECE_COST;
        let mut s = self.lock();
        let s = &mut *s;
        if let Err(left) = s.recv.receive(n) {
            return Err(format!(
                "protocol violation: Data of {n} bytes on stream {id} beyond the connection's \
                 credit ({left} bytes left)"
            ));
        }
        let inbound = match s.entries.get_mut(&id) {
            None if !opened => {
                return Err(format!(
                    "protocol violation: Data on stream {id}, which was never opened"
                ))
            }
            None => None,
            Some(entry) => match &mut entry.recv {
                None => {
                    return Err(format!(
                    "protocol violation: Data on stream {id}, whose caller said it sends no stream"
                ))
                }
                Some(r) if r.state == InState::Ended => {
                    return Err(format!(
                        "protocol violation: Data on stream {id} after its End"
                    ))
                }
                Some(r) if r.state == InState::Dropped => None,
                Some(r) => Some(r),
            },
        };
        let Some(r) = inbound else {
            // A stream this side closed: the piece crossed the `Reset` or
            // `Cancel`. Its connection credit comes back at once.
            connection_consumed(&mut s.recv, &mut s.control, n, Instant::now(), None);
            return Ok(());
        };
        if let Err(left) = r.window.receive(n) {
            return Err(format!(
                "protocol violation: Data of {n} bytes on stream {id} beyond its credit \
                 ({left} bytes left)"
            ));
        }
        if r.partial_len + bytes.len() > max_item {
            return Err(format!(
                "protocol violation: a stream item on stream {id} over the {max_item}-byte limit"
            ));
        }
        r.buffered += n;
        r.partial_cost += n;
        r.partial_len += bytes.len();
        r.partial.push(bytes);
        if !more {
            let item = match r.partial.len() {
                1 => r.partial.pop().unwrap_or_default(),
                _ => {
                    let mut whole = BytesMut::with_capacity(r.partial_len);
                    for piece in r.partial.drain(..) {
                        whole.extend_from_slice(&piece);
                    }
                    whole.freeze()
                }
            };
            r.partial_len = 0;
            r.items
                .push_back((item, std::mem::take(&mut r.partial_cost)));
            if let Some(w) = r.waker.take() {
                w.wake();
            }
        }
        Ok(())
    }

    /// A `Credit` frame arrived.
    pub(crate) fn on_credit(&self, id: u64, bytes: u64, opened: bool) -> Result<(), Violation> {
        let mut s = self.lock();
        let s = &mut *s;
        if id == 0 {
            s.send_credit = add_credit(s.send_credit, bytes, "the connection")?;
            for w in s.credit_waiters.drain(..) {
                w.wake();
            }
            return Ok(());
        }
        match s.entries.get_mut(&id).and_then(|e| e.send.as_mut()) {
            Some(out) => {
                out.credit = add_credit(out.credit, bytes, &format!("stream {id}"))?;
                if let Some(w) = out.waker.take() {
                    w.wake();
                }
                Ok(())
            }
            None if opened => Ok(()),
            None => Err(format!(
                "protocol violation: Credit for stream {id}, which was never opened"
            )),
        }
    }

    /// An `End` arrived: the caller's stream is complete.
    pub(crate) fn on_end(&self, id: u64, opened: bool) -> Result<(), Violation> {
        let mut s = self.lock();
        match s.entries.get_mut(&id) {
            Some(Entry { recv: Some(r), .. }) => match r.state {
                InState::Ended => Err(format!("protocol violation: second End on stream {id}")),
                InState::Dropped => Ok(()),
                InState::Open if !r.partial.is_empty() => Err(format!(
                    "protocol violation: End on stream {id} in the middle of an item"
                )),
                InState::Open => {
                    r.state = InState::Ended;
                    if let Some(w) = r.waker.take() {
                        w.wake();
                    }
                    Ok(())
                }
            },
            Some(_) => Err(format!(
                "protocol violation: End on stream {id}, whose caller said it sends no stream"
            )),
            None if opened => Ok(()),
            None => Err(format!(
                "protocol violation: End on stream {id}, which was never opened"
            )),
        }
    }

    /// A `Reset` arrived: the peer reads no more of stream `id`.
    pub(crate) fn on_reset(&self, id: u64, opened: bool) -> Result<(), Violation> {
        let mut s = self.lock();
        match s.entries.get_mut(&id).and_then(|e| e.send.as_mut()) {
            Some(out) => {
                out.reset = true;
                if let Some(w) = out.waker.take() {
                    w.wake();
                }
                Ok(())
            }
            None if opened => Ok(()),
            None => Err(format!(
                "protocol violation: Reset for stream {id}, which was never opened"
            )),
        }
    }

    /// The writer took stream `id`'s queued piece: the stream may queue
    /// its next one.
    pub(crate) fn taken(&self, id: u64) {
        let mut s = self.lock();
        if let Some(out) = s.entries.get_mut(&id).and_then(|e| e.send.as_mut()) {
            out.queued = false;
            if let Some(w) = out.waker.take() {
                w.wake();
            }
        }
    }

    /// Waits until stream `id` may queue a piece of up to `want` bytes; the
    /// piece's size, its credit (size + [`PIECE_COST`]) spent.
    pub(crate) fn poll_send(
        &self,
        id: u64,
        want: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, StreamEnd>> {
        let mut s = self.lock();
        let s = &mut *s;
        if let Some(reason) = &s.closed {
            return Poll::Ready(Err(StreamEnd::Closed(reason.clone())));
        }
        let Some(out) = s.entries.get_mut(&id).and_then(|e| e.send.as_mut()) else {
            return Poll::Ready(Err(StreamEnd::Reset));
        };
        if out.reset {
            return Poll::Ready(Err(StreamEnd::Reset));
        }
        // At least one payload byte, or the whole of an empty piece.
        let least = PIECE_COST + u64::from(want > 0);
        if out.queued || out.credit < least {
            out.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if s.send_credit < least {
            s.credit_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        let largest = if want <= MAX_PIECE { MAX_PIECE } else { CHUNK };
        let n = (want as u64)
            .min(out.credit - PIECE_COST)
            .min(s.send_credit - PIECE_COST)
            .min(largest as u64);
        out.credit -= n + PIECE_COST;
        s.send_credit -= n + PIECE_COST;
        out.queued = true;
        Poll::Ready(Ok(n as usize))
    }

    /// The next whole item of stream `id`, granting credit for it.
    /// `Ready(None)` once the sender ended the stream; `Pending` while
    /// items may come (the driver wakes the receiver).
    /// The flag says whether credit now waits to be sent.
    pub(crate) fn poll_item(
        &self,
        id: u64,
        cx: &mut Context<'_>,
        rtt: Option<Duration>,
    ) -> (Poll<Option<Result<Bytes, StreamEnd>>>, bool) {
        let mut s = self.lock();
        let s = &mut *s;
        let polled = Self::poll_item_locked(s, id, cx, rtt);
        (polled, !s.control.is_empty())
    }

    fn poll_item_locked(
        s: &mut Streams,
        id: u64,
        cx: &mut Context<'_>,
        rtt: Option<Duration>,
    ) -> Poll<Option<Result<Bytes, StreamEnd>>> {
        let Some(r) = s.entries.get_mut(&id).and_then(|e| e.recv.as_mut()) else {
            return Poll::Ready(None);
        };
        if let Some((item, n)) = r.items.pop_front() {
            r.buffered -= n;
            let now = Instant::now();
            if let Some(grant) = r.window.consume(n, now, rtt) {
                s.control.push(Frame::Credit { id, bytes: grant });
            }
            connection_consumed(&mut s.recv, &mut s.control, n, now, rtt);
            return Poll::Ready(Some(Ok(item)));
        }
        if r.state == InState::Ended {
            return Poll::Ready(None);
        }
        if let Some(reason) = &s.closed {
            return Poll::Ready(Some(Err(StreamEnd::Closed(reason.clone()))));
        }
        r.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The receiving half of `id` was dropped: `Reset` if items may still
    /// come and `reset` asks for it, and the connection credit of what it
    /// held comes back. True when frames now wait to be sent.
    pub(crate) fn drop_recv(&self, id: u64, reset: bool) -> bool {
        let mut s = self.lock();
        let s = &mut *s;
        let Some(entry) = s.entries.get_mut(&id) else {
            return false;
        };
        let Some(r) = entry.recv.as_mut() else {
            return false;
        };
        let held = std::mem::take(&mut r.buffered);
        r.items.clear();
        r.partial.clear();
        r.partial_len = 0;
        r.partial_cost = 0;
        if r.state == InState::Open {
            r.state = InState::Dropped;
            if reset {
                s.control.push(Frame::Reset { id });
            }
        }
        if held > 0 {
            connection_consumed(&mut s.recv, &mut s.control, held, Instant::now(), None);
        }
        if entry.send.is_none() {
            s.entries.remove(&id);
        }
        !s.control.is_empty()
    }

    /// The sending half of `id` was dropped. The stream's entry goes once
    /// both halves have.
    pub(crate) fn drop_send(&self, id: u64) {
        let mut s = self.lock();
        if let Some(entry) = s.entries.get_mut(&id) {
            entry.send = None;
            let receiving = entry
                .recv
                .as_ref()
                .is_some_and(|r| r.state != InState::Dropped);
            if !receiving {
                s.entries.remove(&id);
            }
        }
    }

    /// `Credit` and `Reset` frames waiting to be sent.
    pub(crate) fn take_control(&self) -> Vec<Frame> {
        std::mem::take(&mut self.lock().control)
    }

    /// The connection ended: every waiting handle wakes to the error.
    pub(crate) fn close(&self, reason: String) {
        let mut s = self.lock();
        s.closed = Some(reason);
        let mut wakers: Vec<Waker> = s.credit_waiters.drain(..).collect();
        for entry in s.entries.values_mut() {
            if let Some(w) = entry.recv.as_mut().and_then(|r| r.waker.take()) {
                wakers.push(w);
            }
            if let Some(w) = entry.send.as_mut().and_then(|o| o.waker.take()) {
                wakers.push(w);
            }
        }
        drop(s);
        for w in wakers {
            w.wake();
        }
    }
}

/// The application (or this side, dropping what nobody will read) took
/// `n` bytes: the connection's credit to grant, if any, is queued.
fn connection_consumed(
    recv: &mut RecvWindow,
    control: &mut Vec<Frame>,
    n: u64,
    now: Instant,
    rtt: Option<Duration>,
) {
    if let Some(grant) = recv.consume(n, now, rtt) {
        control.push(Frame::Credit {
            id: 0,
            bytes: grant,
        });
    }
}

/// `credit + bytes`, or the violation when that passes [`MAX_CREDIT`].
fn add_credit(credit: u64, bytes: u64, of: &str) -> Result<u64, Violation> {
    match credit.checked_add(bytes) {
        Some(total) if total <= MAX_CREDIT => Ok(total),
        _ => Err(format!(
            "protocol violation: Credit for {of} beyond {MAX_CREDIT} bytes"
        )),
    }
}

#[cfg(test)]
mod tests;
