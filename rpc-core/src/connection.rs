//! A live connection as its users see it: make calls, ping, close, drain.
//!
//! ```text
//!            Connection (cheap clone handle)
//!   call() ──► pending table (id -> oneshot) ◄── Response{id} ──┐
//!      │                                                        │
//!      ▼                                                        │
//!   data queue (bounded) ──┐                                    │
//!   control queue ─────────┴─► writer task ──► TLS ──► peer ──► reader loop
//!   (Ping, Pong, GoAway: ahead of data)              (driver.rs: dispatch,
//!                                                     heartbeat, close)
//! ```
//!
//! [`start`] wraps an established stream (TLS done, `Hello` exchanged) and
//! returns the handle and the driver future (see `driver.rs`), which the owner
//! spawns. Calls beyond the peer's announced `max_in_flight` wait here for a
//! slot, within their deadline. When the connection ends for any reason,
//! every pending call fails at once: [`Error::PeerUnresponsive`] when the
//! heartbeat found the peer silent, [`Error::Closed`] otherwise.
//!
//! Not here: the read/write loops and the heartbeat timer (`driver.rs`), TLS
//! and `Hello` (`transport.rs`), reconnects (the client crate).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use crate::config::ConnectionConfig;
use crate::driver::{Driver, Outbound};
use crate::error::{Error, Status};
use crate::frame::{frame_len, Frame, Hello};
use crate::heartbeat::Heartbeat;
use crate::identity::{LazyIdentity, PeerIdentity};
use crate::metered::{ByteClocks, Metered};

/// More than a `Request` frame adds to its body and method name: a variant
/// tag, varint id, lengths and deadline (bincode `DefaultOptions`: at most
/// 34 bytes; a test below checks the bound).
const REQUEST_OVERHEAD: usize = 64;

/// Capacity of the control queue (pings, pongs, GoAway).
pub(crate) const CONTROL_QUEUE: usize = 64;

/// A boxed, sendable future, as returned by [`Dispatch::dispatch`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Serves the calls a peer makes (implemented by the server's router).
pub trait Dispatch: Send + Sync + 'static {
    /// Runs one call; the reply is the encoded result or a [`Status`].
    fn dispatch(&self, ctx: CallContext, body: Bytes) -> BoxFuture<Result<Bytes, Status>>;

    /// Counters the driver updates as calls start, end and are refused.
    fn counters(&self) -> Option<&crate::stats::CallCounters> {
        None
    }
}

/// What a handler knows about the call it is serving: read it with the
/// methods below. Cheap to clone (a few reference counts).
#[derive(Clone)]
pub struct CallContext {
    peer: SocketAddr,
    id: u64,
    method: String,
    deadline: Option<Instant>,
    identity: Option<Arc<PeerIdentity>>,
    cancel: CancelSource,
    max_depth: usize,
}

impl CallContext {
    /// A context for calling a handler directly, e.g. in a test: no
    /// deadline, no identity, and a [`cancelled`](Self::cancelled) token
    /// that never fires by itself.
    pub fn new(peer: SocketAddr, id: u64, method: &str) -> Self {
        CallContext {
            peer,
            id,
            method: method.to_owned(),
            deadline: None,
            identity: None,
            cancel: CancelSource::Detached(CancellationToken::new()),
            max_depth: crate::codec::DEFAULT_MAX_DEPTH,
        }
    }

    /// The same context with a deadline.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The context of call `seq` (the driver's count) on a connection.
    pub(crate) fn for_call(
        peer: SocketAddr,
        id: u64,
        method: String,
        deadline: Option<Instant>,
        identity: Option<Arc<PeerIdentity>>,
        tokens: Arc<CallTokens>,
        seq: u64,
    ) -> Self {
        CallContext {
            peer,
            id,
            method,
            deadline,
            identity,
            cancel: CancelSource::Call(tokens, seq),
            max_depth: crate::codec::DEFAULT_MAX_DEPTH,
        }
    }

    /// The same context with another nesting limit for its arguments.
    pub fn with_max_depth(mut self, max_depth: usize) -> Self {
        self.max_depth = max_depth;
        self
    }

    /// How deeply the call's arguments may nest when decoded: the serving
    /// side's [`ConnectionConfig::max_depth`].
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// The caller's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The request id (unique per connection).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The method called.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// When the caller stops waiting, if it said.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The peer's certificate names, when it presented one (mutual TLS).
    pub fn identity(&self) -> Option<&Arc<PeerIdentity>> {
        self.identity.as_ref()
    }

    /// A token that fires when the caller cancels, the deadline passes, the
    /// connection ends (including when the heartbeat declares the peer
    /// dead), or the call is over; the handler's future is dropped then
    /// too. Long handlers, and tasks they start, can watch it. Made when
    /// first asked for: most calls never need one.
    pub fn cancelled(&self) -> CancellationToken {
        match &self.cancel {
            CancelSource::Call(tokens, seq) => tokens.token(*seq),
            CancelSource::Detached(token) => token.clone(),
        }
    }
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("peer", &self.peer)
            .field("id", &self.id)
            .field("method", &self.method())
            .field("deadline", &self.deadline)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Where a context's token comes from.
#[derive(Clone)]
enum CancelSource {
    /// A call on a connection: its token is made when first asked for.
    Call(Arc<CallTokens>, u64),
    /// A context made for a test (`CallContext::new`).
    Detached(CancellationToken),
}

/// The call tokens of one connection's served calls, made only when someone
/// asks for one: most handlers never look at theirs, and a token made for
/// every call was a tenth of a small call's cost.
///
/// Calls are keyed by a sequence number of the driver's own (a peer may
/// reuse request ids). A call is live while it is in its first poll
/// (`polling`) or runs as a task (in `made`, put there by the driver); a
/// token asked for after that is born cancelled.
#[derive(Default)]
pub(crate) struct CallTokens {
    /// The call in its first poll, 0 for none. Set by the driver before the
    /// poll; cleared, with `made` locked, after it.
    polling: AtomicU64,
    made: Mutex<HashMap<u64, CancellationToken, BuildHasherDefault<IdHasher>>>,
}

impl CallTokens {
    fn made(
        &self,
    ) -> MutexGuard<'_, HashMap<u64, CancellationToken, BuildHasherDefault<IdHasher>>> {
        // Inserts and removes only: a poisoned map is still consistent.
        self.made.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Call `seq` is about to be polled for the first time.
    pub(crate) fn start(&self, seq: u64) {
        self.polling.store(seq, Ordering::Release);
    }

    /// Call `seq` finished in its first poll: fires its token, if one was
    /// made.
    pub(crate) fn finished_at_once(&self, seq: u64) {
        let mut made = self.made();
        self.polling.store(0, Ordering::Release);
        if !made.is_empty() {
            if let Some(token) = made.remove(&seq) {
                token.cancel();
            }
        }
    }

    /// Call `seq` goes on after its first poll: its token, made now if
    /// nobody asked yet. The call stays live until [`Self::end`].
    pub(crate) fn goes_on(&self, seq: u64) -> CancellationToken {
        let mut made = self.made();
        self.polling.store(0, Ordering::Release);
        made.entry(seq).or_default().clone()
    }

    /// Call `seq`, which ran as a task, is over: fires its token.
    pub(crate) fn end(&self, seq: u64) {
        if let Some(token) = self.made().remove(&seq) {
            token.cancel();
        }
    }

    fn token(&self, seq: u64) -> CancellationToken {
        let mut made = self.made();
        if let Some(token) = made.get(&seq) {
            return token.clone();
        }
        let token = CancellationToken::new();
        if self.polling.load(Ordering::Acquire) == seq {
            made.insert(seq, token.clone());
        } else {
            // The call is over.
            token.cancel();
        }
        token
    }
}

/// Why a connection ended.
#[derive(Debug, Clone)]
pub(crate) enum CloseCause {
    /// The heartbeat heard nothing for this long.
    Unresponsive(Duration),
    /// Anything else, said in words.
    Other(String),
}

impl CloseCause {
    pub(crate) fn error(&self) -> Error {
        match self {
            CloseCause::Unresponsive(d) => Error::PeerUnresponsive(*d),
            CloseCause::Other(reason) => Error::Closed {
                reason: reason.clone(),
            },
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            CloseCause::Unresponsive(_) => self.error().to_string(),
            CloseCause::Other(reason) => reason.clone(),
        }
    }
}

type Reply = oneshot::Sender<Result<Bytes, Error>>;

/// Requests to the driver from other tasks: a set of flags and the driver's
/// waker. Polling it is two atomic operations, where a `CancellationToken`
/// or `Notify` wait takes a lock on every poll, and the driver polls it on
/// every turn of its loop.
#[derive(Default)]
pub(crate) struct DriverEvents {
    raised: AtomicU8,
    waker: AtomicWaker,
}

impl DriverEvents {
    /// Close now.
    pub(crate) const SHUTDOWN: u8 = 1;
    /// Drain: `GoAway`, then close once handlers are done.
    pub(crate) const DRAIN: u8 = 2;
    /// Send a `Ping` now.
    pub(crate) const PING: u8 = 4;
    /// A call's deadline comes before the timer: re-arm it.
    pub(crate) const DEADLINE: u8 = 8;

    pub(crate) fn raise(&self, event: u8) {
        self.raised.fetch_or(event, Ordering::AcqRel);
        self.waker.wake();
    }

    /// The events raised since the last time, once there are any.
    pub(crate) fn poll(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<u8> {
        let raised = self.raised.swap(0, Ordering::AcqRel);
        if raised != 0 {
            return std::task::Poll::Ready(raised);
        }
        self.waker.register(cx.waker());
        // Raised between the first look and the registration: nobody woke us.
        match self.raised.swap(0, Ordering::AcqRel) {
            0 => std::task::Poll::Pending,
            raised => std::task::Poll::Ready(raised),
        }
    }
}

/// A call waiting for its `Response`.
pub(crate) struct PendingCall {
    pub(crate) tx: Reply,
    /// When the caller stops waiting.
    deadline: Instant,
    /// The caller's timeout, for the error.
    timeout: Duration,
    /// The `Request` is queued: a caller that gives up tells the peer.
    sent: bool,
}

/// Calls waiting for their `Response`, with their deadlines in order.
///
/// The driver enforces the deadlines with its one timer (armed at the
/// earliest of them and the heartbeat's), instead of a tokio timer per call:
/// registering and removing one costs about 4 % of the calls at one in
/// flight.
#[derive(Default)]
pub(crate) struct CallTable {
    /// Set once when the connection ends; no call is registered after.
    pub(crate) closed: Option<CloseCause>,
    /// The peer said `GoAway`: no new calls on this connection.
    pub(crate) goaway: Option<String>,
    pending: HashMap<u64, PendingCall, BuildHasherDefault<IdHasher>>,
    /// Deadlines in the order the calls were made, which is deadline order
    /// too while every call has the same timeout (the usual case): pushing
    /// one is cheap (a sorted set costs far more per call), and a finished
    /// call's entry is left for `prune` to drop. Its front, if any, is a
    /// waiting call's.
    deadlines: VecDeque<(Instant, u64)>,
    /// Deadlines that came before the last one in `deadlines` (a call with
    /// a shorter timeout than the one before it).
    out_of_order: BTreeSet<(Instant, u64)>,
    /// When the driver's timer fires next; a call due earlier must tell it.
    pub(crate) armed: Option<Instant>,
}

impl CallTable {
    /// Registers call `id` (`sent`: its `Request` is queued already); true
    /// when its deadline comes before the driver's timer, which must then be
    /// moved.
    fn insert(
        &mut self,
        id: u64,
        tx: Reply,
        deadline: Instant,
        timeout: Duration,
        sent: bool,
    ) -> bool {
        if self
            .deadlines
            .back()
            .is_none_or(|&(last, _)| deadline >= last)
        {
            self.deadlines.push_back((deadline, id));
        } else {
            self.out_of_order.insert((deadline, id));
        }
        self.pending.insert(
            id,
            PendingCall {
                tx,
                deadline,
                timeout,
                sent,
            },
        );
        self.armed.is_none_or(|at| deadline < at)
    }

    fn mark_sent(&mut self, id: u64) {
        if let Some(call) = self.pending.get_mut(&id) {
            call.sent = true;
        }
    }

    /// Takes call `id` out, if it still waits.
    pub(crate) fn remove(&mut self, id: u64) -> Option<PendingCall> {
        let call = self.pending.remove(&id)?;
        if !self.out_of_order.is_empty() {
            self.out_of_order.remove(&(call.deadline, id));
        }
        self.prune();
        Some(call)
    }

    /// Drops finished calls' entries from the front of `deadlines`, and
    /// all of them once they outnumber the waiting calls (a call that waits
    /// long keeps those behind it from reaching the front): each entry is
    /// dropped once, so this is constant time per call on average.
    fn prune(&mut self) {
        while let Some(&(_, id)) = self.deadlines.front() {
            if self.pending.contains_key(&id) {
                break;
            }
            self.deadlines.pop_front();
        }
        if self.deadlines.len() > 2 * self.pending.len() + 64 {
            let pending = &self.pending;
            self.deadlines.retain(|(_, id)| pending.contains_key(id));
        }
    }

    /// The earliest deadline of a waiting call.
    pub(crate) fn earliest(&self) -> Option<Instant> {
        let in_order = self.deadlines.front().map(|&(at, _)| at);
        let other = self.out_of_order.first().map(|&(at, _)| at);
        match (in_order, other) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes out every call whose deadline is at or before `now`.
    fn take_expired(&mut self, now: Instant) -> Vec<(u64, PendingCall)> {
        let mut expired = Vec::new();
        while let Some(at) = self.earliest() {
            if at > now {
                break;
            }
            let id = match self.out_of_order.first() {
                Some(&(first, id)) if first == at => {
                    self.out_of_order.pop_first();
                    id
                }
                _ => match self.deadlines.pop_front() {
                    Some((_, id)) => id,
                    None => break,
                },
            };
            if let Some(call) = self.pending.remove(&id) {
                expired.push((id, call));
            }
            self.prune();
        }
        expired
    }

    fn take_all(&mut self) -> HashMap<u64, PendingCall, BuildHasherDefault<IdHasher>> {
        self.deadlines.clear();
        self.out_of_order.clear();
        std::mem::take(&mut self.pending)
    }
}

/// Hashes this side's call ids with one multiplication instead of std's
/// SipHash, which costs several times more on every lookup. The
/// table only ever holds ids this side chose (counting up from 0), so a
/// peer cannot pick keys that collide; a peer's `Response` id is only
/// looked up.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used for u64 keys; any byte input still hashes correctly.
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: an odd constant near 2^64 / golden ratio spreads
        // consecutive ids over both the low bits (the bucket) and the high
        // bits (hashbrown's tag byte).
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Whether a subscriber may want `debug` spans at all. Building a span costs
/// even when nobody records it (more when a dependency turns on tracing's
/// `log` feature), on every call on both sides; this is two loads.
pub(crate) fn debug_spans_wanted() -> bool {
    tracing::Level::DEBUG <= tracing::level_filters::STATIC_MAX_LEVEL
        && tracing::Level::DEBUG <= tracing::level_filters::LevelFilter::current()
}

pub(crate) struct Shared {
    pub(crate) outbound: Arc<Outbound>,
    pub(crate) control: Arc<Outbound>,
    calls: Mutex<CallTable>,
    pub(crate) next_id: AtomicU64,
    /// Fires when the connection must end (local close, or the driver ended).
    pub(crate) shutdown: CancellationToken,
    /// Set with `shutdown`: the cheap way to ask whether the connection is
    /// ending (`CancellationToken::is_cancelled` takes a lock), on every call.
    pub(crate) closing: AtomicBool,
    /// What the driver is asked to do: close, drain, ping, re-arm its timer.
    pub(crate) events: DriverEvents,
    /// Fires once the driver has finished closing.
    pub(crate) done: CancellationToken,
    /// Fires when the peer sends `GoAway`.
    pub(crate) goaway: CancellationToken,
    /// Set with `goaway`, for a look without a lock.
    pub(crate) goaway_seen: AtomicBool,
    pub(crate) close_reason: OnceLock<String>,
    pub(crate) peer: SocketAddr,
    pub(crate) identity: LazyIdentity,
    pub(crate) peer_hello: Hello,
    pub(crate) max_send: usize,
    /// One permit per call the peer serves at once (its `Hello`).
    call_slots: Semaphore,
    pub(crate) ping_waiters: Mutex<Vec<oneshot::Sender<Duration>>>,
    /// Latest round-trip time in nanoseconds; 0 until the first pong.
    pub(crate) rtt_nanos: AtomicU64,
    pub(crate) heartbeat_interval: Duration,
}

impl Shared {
    pub(crate) fn calls(&self) -> MutexGuard<'_, CallTable> {
        // Plain inserts and removes only: a poisoned table is still
        // consistent, so keep using it.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn ping_waiters(&self) -> MutexGuard<'_, Vec<oneshot::Sender<Duration>>> {
        self.ping_waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the table closed and fails every pending call with the cause.
    pub(crate) fn fail_all(&self, cause: &CloseCause) {
        let pending = {
            let mut t = self.calls();
            t.closed = Some(cause.clone());
            t.take_all()
        };
        for (_, call) in pending {
            let _ = call.tx.send(Err(cause.error()));
        }
        self.ping_waiters().clear();
    }

    /// Starts ending the connection: from here on it takes no new call, and
    /// the driver closes it.
    pub(crate) fn begin_shutdown(&self) {
        self.closing.store(true, Ordering::Release);
        self.shutdown.cancel();
        self.events.raise(DriverEvents::SHUTDOWN);
    }

    /// Fails every call whose deadline has passed, telling the peer to stop
    /// those it was sent.
    pub(crate) fn expire_calls(&self, now: Instant) {
        let expired = self.calls().take_expired(now);
        for (id, call) in expired {
            debug!(id, "call deadline passed");
            if call.sent {
                let _ = self.outbound.try_send(Frame::Cancel { id });
            }
            let _ = call.tx.send(Err(Error::DeadlineExceeded(call.timeout)));
        }
    }

    fn closed_error(&self) -> Error {
        match &self.calls().closed {
            Some(cause) => cause.error(),
            None => Error::Closed {
                reason: "connection closed".into(),
            },
        }
    }
}

/// A handle to one live connection. Cheap to clone; the connection lives until
/// its driver ends (peer gone or silent, error, [`Connection::close`]).
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.shared.peer)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Removes a call from the table if its future is dropped early, and tells the
/// peer with `Cancel`.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
    /// False once the reply came: whoever answered took the call out.
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let removed = self.shared.calls().remove(self.id);
        if removed.is_some_and(|call| call.sent) {
            // Best effort: a full queue means the peer is slow, and the call
            // is then answered into the void instead of stopped.
            let _ = self.shared.outbound.try_send(Frame::Cancel { id: self.id });
        }
    }
}

impl Connection {
    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared.peer
    }

    /// The names in the peer's certificate, when it presented one.
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.shared.identity.get().map(|id| &**id)
    }

    /// The `Hello` the peer sent.
    pub fn peer_hello(&self) -> Hello {
        self.shared.peer_hello
    }

    /// The interval this side pings at: the larger of its own and the
    /// peer's announced one.
    pub fn heartbeat_interval(&self) -> Duration {
        self.shared.heartbeat_interval
    }

    /// The latest heartbeat round-trip time, once a `Pong` has come back.
    pub fn rtt(&self) -> Option<Duration> {
        match self.shared.rtt_nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    /// True once the connection has ended or is ending.
    pub fn is_closed(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire) || self.shared.calls().closed.is_some()
    }

    /// True when new calls can still be made here (not closed, no `GoAway`).
    ///
    /// Two atomic loads, no lock: asked before every call. (The call table
    /// is closed only after `closing` is set, and a call made as a `GoAway`
    /// arrives is refused by the table, under its lock, with
    /// [`Error::GoAway`].)
    pub fn is_usable(&self) -> bool {
        !self.shared.closing.load(Ordering::Acquire)
            && !self.shared.goaway_seen.load(Ordering::Acquire)
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.close_reason.get().cloned()
    }

    /// Waits until the driver has finished closing the connection.
    pub async fn closed(&self) {
        self.shared.done.cancelled().await
    }

    /// True once the peer has sent `GoAway` (an atomic load: cheap enough to
    /// ask each time the task running the driver is polled).
    pub fn goaway_received(&self) -> bool {
        self.shared.goaway_seen.load(Ordering::Acquire)
    }

    /// True once the connection has begun to end (closed here, or its
    /// driver is finishing); an atomic load, like
    /// [`goaway_received`](Connection::goaway_received).
    pub fn is_ending(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire)
    }

    /// Completes when no new call can be made here: the connection is ending,
    /// or the peer sent `GoAway` (calls in flight may still finish).
    pub async fn unusable(&self) {
        tokio::select! {
            _ = self.shared.shutdown.cancelled() => {}
            _ = self.shared.goaway.cancelled() => {}
        }
    }

    /// Ends the connection now: pending calls fail, handlers are cancelled.
    pub fn close(&self) {
        self.shared.begin_shutdown();
    }

    /// Starts a graceful drain: sends `GoAway`, refuses new calls from the
    /// peer with `ShuttingDown`, and closes once running handlers finish.
    pub fn drain(&self) {
        self.shared.events.raise(DriverEvents::DRAIN);
    }

    /// Sends a `Ping` now (or joins the one in flight) and returns the
    /// round-trip time. Pinging faster than the peer's announced interval
    /// gets a connection cut off; see [`Connection::heartbeat_interval`].
    pub async fn ping(&self) -> Result<Duration, Error> {
        let (tx, rx) = oneshot::channel();
        {
            if self.is_closed() {
                return Err(self.shared.closed_error());
            }
            self.shared.ping_waiters().push(tx);
        }
        self.shared.events.raise(DriverEvents::PING);
        rx.await.map_err(|_| self.shared.closed_error())
    }

    /// Calls `method` with encoded arguments and waits for the encoded reply,
    /// at most `timeout`. The deadline travels with the request.
    pub async fn call(&self, method: &str, body: Bytes, timeout: Duration) -> Result<Bytes, Error> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        if !debug_spans_wanted() {
            return self.call_inner(id, method, body, timeout).await;
        }
        let span = tracing::debug_span!("call", method, id, peer = %self.shared.peer);
        // A span no subscriber wants is not entered: entering and leaving it
        // on every poll still costs (more when a dependency turns on
        // tracing's `log` feature, as tarpc does in the benchmark).
        if span.is_disabled() {
            self.call_inner(id, method, body, timeout).await
        } else {
            self.call_inner(id, method, body, timeout)
                .instrument(span)
                .await
        }
    }

    async fn call_inner(
        &self,
        id: u64,
        method: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        let deadline_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        // Exact sizing walks the whole frame; only requests near the limit
        // need it.
        let near_limit = body.len() + method.len() + REQUEST_OVERHEAD > self.shared.max_send;
        let frame = Frame::Request {
            id,
            method: method.to_owned(),
            deadline_ms: Some(deadline_ms),
            body,
        };
        if near_limit {
            frame_len(&frame, self.shared.max_send)?;
        }
        let deadline = Instant::now() + timeout;
        let slot = self.shared.call_slots.try_acquire().ok();
        let (tx, rx) = oneshot::channel();
        let (move_timer, unsent) = {
            let mut t = self.shared.calls();
            if let Some(cause) = &t.closed {
                return Err(cause.error());
            }
            if let Some(reason) = &t.goaway {
                return Err(Error::GoAway {
                    reason: reason.clone(),
                });
            }
            // Fast path: a free call slot and room in the queue. The request
            // is queued here, and the driver's timer keeps the deadline. Its
            // `Response` cannot be matched before the call is registered
            // below: the driver needs this lock for that.
            let unsent = match slot {
                Some(_) => match self.shared.outbound.try_push(frame) {
                    Ok(()) => None,
                    Err((_, frame)) => Some(frame),
                },
                None => Some(frame),
            };
            let move_timer = t.insert(id, tx, deadline, timeout, unsent.is_none());
            (move_timer, unsent)
        };
        if move_timer {
            self.shared.events.raise(DriverEvents::DEADLINE);
        }
        let mut guard = PendingGuard {
            shared: &self.shared,
            id,
            armed: true,
        };
        // `fail_all` answers every pending call before the table drops, and
        // the driver answers calls past their deadline, so a dropped sender
        // means the same: the connection is gone.
        let reply = async { rx.await.unwrap_or_else(|_| Err(self.shared.closed_error())) };
        let result = match unsent {
            None => {
                debug!("request sent");
                let result = reply.await;
                guard.armed = false;
                drop(slot);
                result
            }
            // Slow path: wait for a slot and room in the queue, within the
            // deadline. Boxed: its waits would otherwise make every call's
            // future larger, and futures are moved (boxed, spawned) whole.
            Some(frame) => {
                let exchange = async {
                    let _slot = match slot {
                        Some(slot) => slot,
                        // The semaphore is never closed: this waits or succeeds.
                        None => match self.shared.call_slots.acquire().await {
                            Ok(slot) => slot,
                            Err(_) => return Err(self.shared.closed_error()),
                        },
                    };
                    if self.shared.outbound.send(frame).await.is_err() {
                        return Err(self.shared.closed_error());
                    }
                    self.shared.calls().mark_sent(id);
                    debug!("request sent");
                    reply.await
                };
                Box::pin(tokio::time::timeout_at(deadline, exchange))
                    .await
                    .unwrap_or(Err(Error::DeadlineExceeded(timeout)))
            }
        };
        drop(guard);
        if let Err(e) = &result {
            debug!(error = %e, "call failed");
        }
        result
    }
}

/// Wraps an established stream (after `Hello`) in a driver. Returns the handle
/// and the driver future, which the caller must spawn; it resolves with the
/// reason the connection ended. Liveness is measured on this stream; see
/// [`start_metered`] to measure it below TLS.
pub fn start<S>(
    stream: S,
    config: &ConnectionConfig,
    peer: SocketAddr,
    peer_hello: Hello,
    dispatch: Option<Arc<dyn Dispatch>>,
) -> (Connection, impl Future<Output = String> + Send + 'static)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let clocks = ByteClocks::new(Instant::now());
    let stream = Metered::new(stream, clocks.clone());
    start_metered(stream, clocks, None, config, peer, peer_hello, dispatch)
}

/// Like [`start`], for a stream whose bytes already stamp `clocks`: the
/// transport wraps the TCP socket *under* TLS, so every byte counts as
/// liveness, not only whole TLS records (up to 16 KiB each). `peer_cert` is
/// the peer's end-entity certificate, whose names handlers see (read from
/// it when first needed).
pub fn start_metered<S>(
    stream: S,
    clocks: Arc<ByteClocks>,
    peer_cert: Option<CertificateDer<'static>>,
    config: &ConnectionConfig,
    peer: SocketAddr,
    peer_hello: Hello,
    dispatch: Option<Arc<dyn Dispatch>>,
) -> (Connection, impl Future<Output = String> + Send + 'static)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let max_send = config.max_frame.min(peer_hello.max_frame as usize);
    let heartbeat = Heartbeat::new(
        Instant::now(),
        config.heartbeat_interval,
        config.heartbeat_timeout,
        Duration::from_millis(peer_hello.heartbeat_ms.into()),
    );
    let shared = Arc::new(Shared {
        outbound: Arc::new(Outbound::new(config.outbound_queue)),
        control: Arc::new(Outbound::new(CONTROL_QUEUE)),
        calls: Mutex::new(CallTable::default()),
        next_id: AtomicU64::new(1),
        shutdown: CancellationToken::new(),
        closing: AtomicBool::new(false),
        events: DriverEvents::default(),
        done: CancellationToken::new(),
        goaway: CancellationToken::new(),
        goaway_seen: AtomicBool::new(false),
        close_reason: OnceLock::new(),
        peer,
        identity: LazyIdentity::new(peer_cert),
        peer_hello,
        max_send,
        call_slots: Semaphore::new((peer_hello.max_in_flight as usize).min(Semaphore::MAX_PERMITS)),
        ping_waiters: Mutex::new(Vec::new()),
        rtt_nanos: AtomicU64::new(0),
        heartbeat_interval: heartbeat.interval(),
    });
    let driver = Driver::new(shared.clone(), config, dispatch, heartbeat);
    let span = tracing::info_span!("conn", %peer);
    let fut = driver.run(stream, clocks);
    // Entered on every poll only when a subscriber wants it (see `call`).
    let fut = if span.is_disabled() {
        futures_util::future::Either::Left(fut)
    } else {
        futures_util::future::Either::Right(fut.instrument(span))
    };
    (Connection { shared }, fut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_of(tokens: &Arc<CallTokens>, seq: u64) -> CallContext {
        let peer = "127.0.0.1:9".parse().unwrap();
        CallContext::for_call(peer, 7, "svc.m".into(), None, None, tokens.clone(), seq)
    }

    #[test]
    fn a_token_taken_in_the_first_poll_is_the_tasks_and_fires_at_its_end() {
        let tokens = Arc::new(CallTokens::default());
        let ctx = ctx_of(&tokens, 1);
        tokens.start(1);
        let first = ctx.cancelled();
        let second = ctx.clone().cancelled();
        assert!(!first.is_cancelled());
        // Still running after its first poll: the driver gets the same token.
        let drivers = tokens.goes_on(1);
        drivers.cancel();
        assert!(first.is_cancelled() && second.is_cancelled());
        // A token asked for while the task runs is the same one.
        assert!(ctx.cancelled().is_cancelled());
        tokens.end(1);
        assert!(tokens.made().is_empty());
        assert_eq!((ctx.method(), ctx.id()), ("svc.m", 7));
    }

    #[test]
    fn a_token_of_a_call_that_finished_on_its_first_poll_fires() {
        let tokens = Arc::new(CallTokens::default());
        let taken = ctx_of(&tokens, 1);
        let untaken = ctx_of(&tokens, 2);
        tokens.start(1);
        let token = taken.cancelled();
        tokens.finished_at_once(1);
        assert!(token.is_cancelled());
        // Never asked for during the call: born cancelled afterwards, and
        // nothing is left in the table.
        tokens.start(2);
        tokens.finished_at_once(2);
        assert!(untaken.cancelled().is_cancelled());
        assert!(taken.cancelled().is_cancelled());
        assert!(tokens.made().is_empty());
        // A task's token, asked for after the task ended, is born cancelled.
        let task = ctx_of(&tokens, 3);
        tokens.start(3);
        let live = tokens.goes_on(3);
        assert!(!task.cancelled().is_cancelled());
        tokens.end(3);
        assert!(live.is_cancelled() && task.cancelled().is_cancelled());
    }

    #[test]
    fn a_test_context_token_never_fires_by_itself() {
        let ctx = CallContext::new("127.0.0.1:9".parse().unwrap(), 1, "m");
        assert!(!ctx.cancelled().is_cancelled());
        let token = ctx.cancelled();
        token.cancel();
        assert!(ctx.cancelled().is_cancelled(), "one token per context");
    }

    #[test]
    fn request_overhead_bounds_every_request_header() {
        // The largest header short of 4 GiB lengths: the largest id and
        // deadline, and lengths that need 5-byte varints.
        let method = "m".repeat(70_000);
        let body = Bytes::from(vec![7u8; 70_000]);
        let frame = Frame::Request {
            id: u64::MAX,
            method: method.clone(),
            deadline_ms: Some(u32::MAX),
            body: body.clone(),
        };
        let len = frame_len(&frame, usize::MAX).map_err(|e| e.to_string());
        let header = len.map(|len| len - method.len() - body.len());
        assert!(
            header.as_ref().is_ok_and(|&h| h <= REQUEST_OVERHEAD),
            "{header:?}"
        );
    }

    #[test]
    fn the_call_table_keeps_the_earliest_deadline_through_any_order() {
        // Against a model (id -> deadline): calls with one timeout and
        // with shorter ones, finished in a scrambled order, expired in
        // batches; the earliest deadline must always be the model's, and
        // finished calls' entries must not pile up.
        let start = Instant::now();
        let mut table = CallTable::default();
        let mut model = std::collections::BTreeMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut clock = 0u64;
        for id in 0..5_000u64 {
            clock += next() % 3;
            let timeout = match next() % 10 {
                0 => 5,
                1 => 2_000,
                _ => 30,
            };
            let deadline = start + Duration::from_millis(clock + timeout);
            let (tx, _rx) = oneshot::channel();
            table.insert(id, tx, deadline, Duration::from_millis(timeout), true);
            model.insert(id, deadline);
            // Finish a random waiting call about as often as one starts.
            if next() % 2 == 0 {
                let pick = *model
                    .keys()
                    .nth((next() % model.len() as u64) as usize)
                    .unwrap();
                assert!(table.remove(pick).is_some());
                model.remove(&pick);
            }
            if id % 97 == 0 {
                let now = start + Duration::from_millis(clock);
                let mut got: Vec<u64> = table
                    .take_expired(now)
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect();
                let mut want: Vec<u64> = model
                    .iter()
                    .filter(|(_, &d)| d <= now)
                    .map(|(&id, _)| id)
                    .collect();
                got.sort_unstable();
                want.sort_unstable();
                assert_eq!(got, want, "expired at call {id}");
                model.retain(|_, d| *d > now);
            }
            assert_eq!(
                table.earliest(),
                model.values().min().copied(),
                "after call {id}"
            );
            assert_eq!(table.pending.len(), model.len());
            assert!(
                table.deadlines.len() <= 2 * model.len() + 65,
                "{} entries for {} calls",
                table.deadlines.len(),
                model.len()
            );
        }
        assert_eq!(table.take_all().len(), model.len());
        assert_eq!(table.earliest(), None);
    }

    #[test]
    fn call_ids_hash_to_spread_tags_and_buckets() {
        let hash = |id: u64| {
            let mut h = IdHasher::default();
            h.write_u64(id);
            h.finish()
        };
        // hashbrown takes the bucket from the low bits and a tag byte from
        // the top 7: consecutive ids must vary both (the identity would
        // give every small id the same tag).
        let buckets: std::collections::HashSet<u64> = (0..128).map(|id| hash(id) & 127).collect();
        let tags: std::collections::HashSet<u64> = (0..128).map(|id| hash(id) >> 57).collect();
        assert_eq!(buckets.len(), 128);
        assert!(tags.len() > 64, "{} tags for 128 ids", tags.len());
    }
}
