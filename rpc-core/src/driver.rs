//! The connection driver: the reader loop, the batching writer, and the
//! heartbeat timer. One implementation for both sides.
//!
//! - The reader loop is the future [`crate::connection::start`] returns. It
//!   routes `Response`s to waiting callers, runs `Request`s through a
//!   [`Dispatch`] on tracked tasks (at most `max_in_flight` at once; the
//!   excess gets `Overloaded`), answers `Ping` with `Pong` at once through the
//!   control queue, honours `Cancel`, and owns the one timer: armed at the
//!   [`Heartbeat`]'s next deadline or the earliest deadline of this side's
//!   own pending calls, which it fails with `DeadlineExceeded` (and a
//!   `Cancel` to the peer) when they pass.
//! - The writer takes one frame, then every frame already queued (up to
//!   [`MAX_BATCH`]), and flushes once. It runs inside the connection's task,
//!   polled after the reader, and also after every 8th frame the reader
//!   decodes, so a long burst of calls gets its first replies before the
//!   last call is read. Control frames (`Ping`, `Pong`,
//!   `GoAway`) go before any queued data frame, so a `Pong` waits behind at
//!   most the frame being written.
//! - Any byte read or written on the socket moves the heartbeat's clocks
//!   (see `metered.rs`); after `heartbeat_timeout` of silence the peer is
//!   dead.
//! - However the connection ends, every pending call fails at once with the
//!   cause, every handler is cancelled, and the writer gets `close_timeout`
//!   to flush a last `GoAway` and TLS close_notify. When this side chose to
//!   end (`close`, or a drain that finished), it closes first, so within the
//!   same bound it then reads until the peer's close_notify, discarding any
//!   frame before it, and only then lets the socket go.
//!
//! Not here: the handle users call (`connection.rs`), handshakes
//! (`transport.rs`), the heartbeat rules themselves (`heartbeat.rs`).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::ConnectionConfig;
use crate::connection::{CallContext, CallTokens, CloseCause, Dispatch, DriverEvents, Shared};
use crate::error::{escape_peer_text, Error, Status, StatusCode, MAX_PEER_REASON};
use crate::frame::{frame_len, Frame};
use crate::heartbeat::{Action, Heartbeat, PingVerdict};
use crate::metered::ByteClocks;
use crate::reader::FrameReader;
use crate::writer::FrameWriter;

/// Most frames the writer encodes before it flushes.
pub const MAX_BATCH: usize = 128;

/// Encoded bytes past which the writer writes out in the middle of a batch.
const FLUSH_AT: usize = 64 * 1024;

/// Frames the reader decodes in a row before the writer gets a turn: the
/// peer starts on the first replies while this side decodes the rest (the
/// value was chosen by measurement; see bench/RESULTS.md).
const WRITE_EVERY: u64 = 8;

type InFlight = Arc<Mutex<HashMap<u64, CancellationToken>>>;

fn lock(
    m: &Mutex<HashMap<u64, CancellationToken>>,
) -> MutexGuard<'_, HashMap<u64, CancellationToken>> {
    // Plain map operations only; a poisoned map is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The partial-frame deadline: fails when the *same* frame has been
/// incomplete for `timeout`. A busy connection has a partial frame at most
/// ticks, but a different one each time (frames completed in between).
struct PartialFrameWatch {
    timeout: Duration,
    /// When a partial frame was first seen, and the frame count then.
    since: Option<(Instant, u64)>,
}

impl PartialFrameWatch {
    /// `mid`: bytes of an unfinished frame are waiting; `frames`: frames
    /// decoded so far. Returns the deadline as the error when it passed.
    fn check(&mut self, now: Instant, mid: bool, frames: u64) -> Result<(), Duration> {
        match self.since {
            _ if !mid => self.since = None,
            Some((_, count)) if count != frames => self.since = Some((now, frames)),
            Some((since, _)) if now.saturating_duration_since(since) >= self.timeout => {
                return Err(self.timeout);
            }
            Some(_) => {}
            None => self.since = Some((now, frames)),
        }
        Ok(())
    }
}

/// How the read loop ended.
enum End {
    /// This side chose to end while the peer still talks: close first, then
    /// wait for the peer's close (see [`Driver::finish`]).
    Ours(CloseCause),
    /// Nothing to tell the peer.
    Quiet(CloseCause),
    /// The peer broke a rule: tell it with `GoAway(reason)`, then close.
    Tell(String),
}

pub(crate) struct Driver {
    shared: Arc<Shared>,
    dispatch: Option<Arc<dyn Dispatch>>,
    in_flight: InFlight,
    /// Served calls' tokens, made when asked for.
    tokens: Arc<CallTokens>,
    /// Served calls so far: the key of each call's token.
    calls_served: u64,
    /// When the bytes of the frames being handled were read: a request's
    /// deadline counts from there, with no clock read per request.
    arrived: Instant,
    handlers: TaskTracker,
    max_in_flight: usize,
    max_recv: usize,
    /// Nesting allowed in a call's arguments (see `CallContext::max_depth`).
    max_depth: usize,
    close_timeout: Duration,
    draining: bool,
    heartbeat: Heartbeat,
    timer: std::pin::Pin<Box<Sleep>>,
    /// Frames decoded so far, to tell one slow frame from many quick ones.
    frames_decoded: u64,
    partial: PartialFrameWatch,
    /// The highest request id seen.
    last_request_id: Option<u64>,
    write_stall_timeout: Duration,
}

impl Driver {
    pub(crate) fn new(
        shared: Arc<Shared>,
        config: &ConnectionConfig,
        dispatch: Option<Arc<dyn Dispatch>>,
        heartbeat: Heartbeat,
    ) -> Self {
        let first = arm(&shared, heartbeat.next_deadline());
        Driver {
            shared,
            dispatch,
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            tokens: Arc::default(),
            calls_served: 0,
            arrived: Instant::now(),
            handlers: TaskTracker::new(),
            max_in_flight: config.max_in_flight,
            max_recv: config.max_frame,
            max_depth: config.max_depth,
            close_timeout: config.close_timeout,
            draining: false,
            timer: Box::pin(tokio::time::sleep_until(first)),
            heartbeat,
            last_request_id: None,
            frames_decoded: 0,
            partial: PartialFrameWatch {
                timeout: config.partial_frame_timeout,
                since: None,
            },
            write_stall_timeout: config.write_stall_timeout,
        }
    }

    pub(crate) async fn run<S>(mut self, stream: S, clocks: Arc<ByteClocks>) -> String
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let max_send = self.shared.max_send;
        let mut reader = FrameReader::new(read, self.max_recv, max_send);
        let writer = FrameWriter::new(write, self.max_recv, max_send);
        let writer = write_loop(
            writer,
            self.shared.outbound.clone(),
            self.shared.control.clone(),
            // Only a client's frames come from other tasks (its callers);
            // see `gather` in `write_loop`.
            self.dispatch.is_none(),
            Stall {
                clocks: clocks.clone(),
                timeout: self.write_stall_timeout,
            },
        );
        // The writer runs inside this task, polled by the loop below after
        // the reader: replies to a burst of requests are written together,
        // and no other task is woken to write them.
        let mut writer = Box::pin(writer);
        let mut writer_done = false;
        let end = 'run: loop {
            let mut next = tokio::select! {
                biased;
                raised = std::future::poll_fn(|cx| self.shared.events.poll(cx)) => {
                    if raised & DriverEvents::SHUTDOWN != 0 {
                        break End::Ours(CloseCause::Other("closed by this side".into()));
                    }
                    if raised & DriverEvents::DRAIN != 0 && !self.draining {
                        self.draining = true;
                        self.handlers.close();
                        self.send_control(Frame::GoAway { reason: "server shutting down".into() });
                        info!("draining: sent GoAway");
                    }
                    if raised & DriverEvents::PING != 0 {
                        let nonce = self.heartbeat.ping_now(Instant::now());
                        self.send_control(Frame::Ping { nonce });
                    }
                    if raised & (DriverEvents::PING | DriverEvents::DEADLINE) != 0 {
                        self.reset_timer();
                    }
                    continue;
                }
                _ = &mut self.timer => {
                    let mid = reader.mid_frame();
                    if let Err(waited) = self.partial.check(Instant::now(), mid, self.frames_decoded) {
                        break End::Tell(format!(
                            "frame not completed within {waited:?} (partial-frame deadline)"
                        ));
                    }
                    self.shared.expire_calls(Instant::now());
                    self.heartbeat.received(clocks.last_read());
                    self.heartbeat.sent(clocks.last_written());
                    match self.heartbeat.poll(Instant::now()) {
                        Action::PeerDead(silent) => {
                            warn!(?silent, "peer unresponsive: closing");
                            break End::Quiet(CloseCause::Unresponsive(silent));
                        }
                        Action::SendPing(nonce) => self.send_control(Frame::Ping { nonce }),
                        Action::Nothing => {}
                    }
                    self.reset_timer();
                    continue;
                }
                _ = self.handlers.wait(), if self.draining => {
                    break End::Ours(CloseCause::Other("drained after GoAway".into()));
                }
                // Reading pauses while this side's own replies exceed the
                // outbound queue, until the writer catches up (a peer that
                // sends calls but does not read the replies).
                next = reader.next(), if !self.shared.outbound.over_capacity() => next,
                res = &mut writer => {
                    writer_done = true;
                    break End::Quiet(writer_stopped(res));
                }
            };
            self.arrived = clocks.last_read();
            // Frames already in the read buffer are taken one after another
            // without the select above: the events and the timer are
            // looked at once per read, not once per frame.
            loop {
                match next {
                    None => {
                        break 'run End::Quiet(CloseCause::Other(
                            "peer closed the connection".into(),
                        ))
                    }
                    Some(Err(Error::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        break 'run End::Quiet(CloseCause::Other(
                            "peer closed the connection without TLS close_notify".into(),
                        ));
                    }
                    Some(Err(Error::Io(e))) => {
                        break 'run End::Quiet(CloseCause::Other(format!("read failed: {e}")))
                    }
                    Some(Err(e)) => break 'run End::Tell(e.to_string()),
                    Some(Ok(frame)) => {
                        self.frames_decoded += 1;
                        if let Err(reason) = self.on_frame(frame).await {
                            break 'run End::Tell(reason);
                        }
                        // A long run of frames read (the reader is polled first
                        // and stays ready while the socket has bytes) must not
                        // hold back what is already queued: the writer gets a
                        // turn every WRITE_EVERY frames, so the peer starts on
                        // the first replies (or calls) while this side decodes
                        // the rest, instead of both sides taking turns with
                        // whole bursts.
                        if self.frames_decoded % WRITE_EVERY == 0 {
                            let turn = std::future::poll_fn(|cx| {
                                Poll::Ready(std::future::Future::poll(writer.as_mut(), cx))
                            })
                            .await;
                            if let Poll::Ready(res) = turn {
                                writer_done = true;
                                break 'run End::Quiet(writer_stopped(res));
                            }
                        }
                    }
                }
                if self.shared.outbound.over_capacity() {
                    break;
                }
                match reader.buffered() {
                    Some(buffered) => next = Some(buffered),
                    None => break,
                }
            }
        };
        let (cause, peer_open) = match end {
            End::Ours(cause) => (cause, true),
            End::Quiet(cause) => (cause, false),
            End::Tell(reason) => {
                warn!(%reason, "closing connection: peer broke the protocol");
                self.send_control(Frame::GoAway {
                    reason: reason.clone(),
                });
                (CloseCause::Other(reason), false)
            }
        };
        // Boxed, like the rare paths in `on_request`: the driver's future
        // lives as long as the connection, so its size is memory per
        // connection, and the closing state need not be part of it.
        let reader = peer_open.then_some(reader);
        Box::pin(self.finish(cause, writer, writer_done, reader)).await
    }

    /// Arms the timer for the heartbeat's next deadline or the earliest
    /// call deadline, whichever comes first.
    fn reset_timer(&mut self) {
        let at = arm(&self.shared, self.heartbeat.next_deadline());
        self.timer.as_mut().reset(at);
    }

    /// Queues a control frame; if 64 are already waiting the peer is not
    /// reading, and the heartbeat will notice.
    fn send_control(&self, frame: Frame) {
        if self.shared.control.try_send(frame).is_err() {
            debug!("control queue full; frame dropped");
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), String> {
        match frame {
            Frame::Request {
                id,
                method,
                deadline_ms,
                body,
            } => self.on_request(id, method, deadline_ms, body).await,
            Frame::Response { id, result } => {
                let waiter = self.shared.calls().remove(id);
                match waiter {
                    Some(call) => {
                        let _ = call.tx.send(result.map_err(Error::Status));
                    }
                    None if id >= self.shared.next_id.load(Ordering::Relaxed) => {
                        return Err(Error::Protocol(format!(
                            "Response for call {id}, which was never made"
                        ))
                        .to_string());
                    }
                    // The caller gave up (deadline, dropped future) already.
                    None => debug!(id, "late response ignored"),
                }
                Ok(())
            }
            Frame::Cancel { id } => {
                if let Some(token) = lock(&self.in_flight).get(&id) {
                    debug!(id, "cancelled by peer");
                    token.cancel();
                } else if self.last_request_id.is_none_or(|last| id > last) {
                    return Err(Error::Protocol(format!(
                        "Cancel for call {id}, which was never requested"
                    ))
                    .to_string());
                }
                // Otherwise the call finished as the Cancel crossed it.
                Ok(())
            }
            Frame::Ping { nonce } => match self.heartbeat.peer_ping(Instant::now()) {
                PingVerdict::Answer => {
                    self.send_control(Frame::Pong { nonce });
                    Ok(())
                }
                PingVerdict::TooManyPings => Err("too many pings".into()),
            },
            Frame::Pong { nonce } => {
                match self.heartbeat.pong(nonce, Instant::now()) {
                    Some(rtt) => {
                        debug!(?rtt, "pong");
                        let nanos = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1);
                        self.shared.rtt_nanos.store(nanos, Ordering::Relaxed);
                        for waiter in self.shared.ping_waiters().drain(..) {
                            let _ = waiter.send(rtt);
                        }
                        self.reset_timer();
                    }
                    None => debug!(nonce, "pong for no ping in flight: ignored"),
                }
                Ok(())
            }
            Frame::GoAway { reason } => {
                let reason = escape_peer_text(&reason, MAX_PEER_REASON);
                // One line per connection: a peer repeating GoAway must
                // not flood the log.
                if self.shared.goaway_seen.load(Ordering::Acquire) {
                    debug!(%reason, "peer sent GoAway again");
                } else {
                    info!(%reason, "peer sent GoAway");
                }
                self.shared.calls().goaway = Some(reason);
                self.shared.goaway_seen.store(true, Ordering::Release);
                self.shared.goaway.cancel();
                Ok(())
            }
            Frame::Hello(_) => {
                Err(Error::Protocol("second Hello on one connection".into()).to_string())
            }
        }
    }

    async fn on_request(
        &mut self,
        id: u64,
        method: String,
        deadline_ms: Option<u32>,
        body: Bytes,
    ) -> Result<(), String> {
        let Some(dispatch) = self.dispatch.clone() else {
            return Err(
                Error::Protocol("Request sent to a peer that serves no calls".into()).to_string(),
            );
        };
        let max_send = self.shared.max_send;
        let refuse = |status: Status| Frame::Response {
            id,
            result: fitting_reply(id, Err(status), max_send),
        };
        if self.draining {
            if let Some(c) = dispatch.counters() {
                c.failed(StatusCode::ShuttingDown);
            }
            let status = Status::new(StatusCode::ShuttingDown, "server is shutting down");
            self.shared.outbound.send_now(refuse(status));
            return Ok(());
        }
        // Ids need not arrive in order (concurrent calls race to the queue);
        // the highest one tells a late Cancel from one never requested.
        self.last_request_id = Some(self.last_request_id.map_or(id, |last| last.max(id)));
        let overloaded = {
            let in_flight = lock(&self.in_flight);
            // Handlers that finish when first polled never enter the map, so
            // it is mostly empty: skip hashing the id then.
            if !in_flight.is_empty() && in_flight.contains_key(&id) {
                return Err(
                    Error::Protocol(format!("request id {id} is already in flight")).to_string(),
                );
            }
            in_flight.len() >= self.max_in_flight
        };
        if overloaded {
            if let Some(c) = dispatch.counters() {
                c.failed(StatusCode::Overloaded);
            }
            let status = Status::new(
                StatusCode::Overloaded,
                format!(
                    "more than {} calls in flight on this connection",
                    self.max_in_flight
                ),
            );
            self.shared.outbound.send_now(refuse(status));
            return Ok(());
        }
        let deadline = deadline_ms.map(|ms| self.arrived + Duration::from_millis(ms.into()));
        // The token is made only if the handler asks for one, or if the
        // call outlives its first poll (see `CallTokens`).
        self.calls_served += 1;
        let seq = self.calls_served;
        let ctx = CallContext::for_call(
            self.shared.peer,
            id,
            method,
            deadline,
            self.shared.identity.get().cloned(),
            self.tokens.clone(),
            seq,
        )
        .with_max_depth(self.max_depth);
        let span = if crate::connection::debug_spans_wanted() {
            tracing::debug_span!("call", method = %ctx.method(), id, peer = %ctx.peer())
        } else {
            tracing::Span::none()
        };
        if let Some(c) = dispatch.counters() {
            c.started();
        }
        self.tokens.start(seq);
        let mut handler = AssertUnwindSafe(dispatch.dispatch(ctx, body)).catch_unwind();
        // Most handlers finish when first polled: answer those right here,
        // with no task, no timer and no cancellation bookkeeping.
        let ready = if span.is_disabled() {
            (&mut handler).now_or_never()
        } else {
            span.in_scope(|| (&mut handler).now_or_never())
        };
        if let Some(outcome) = ready {
            self.tokens.finished_at_once(seq);
            let result = Some(outcome.unwrap_or_else(|_| panicked()));
            if let Some(frame) = finish_call(&self.shared, dispatch.as_ref(), id, result) {
                self.shared.outbound.send_now(frame);
            }
            return Ok(());
        }
        // The rest run as tasks, which end when the handler does, the
        // deadline passes, the caller cancels, or the connection ends.
        let token = self.tokens.goes_on(seq);
        lock(&self.in_flight).insert(id, token.clone());
        let tokens = self.tokens.clone();
        let shared = self.shared.clone();
        let in_flight = self.in_flight.clone();
        self.handlers.spawn(
            async move {
                let until_deadline = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                // Cancellation first: a handler that returns because it saw
                // the caller cancel is not answered (nobody waits for it).
                let result = tokio::select! {
                    biased;
                    _ = token.cancelled() => None,
                    _ = shared.shutdown.cancelled() => None,
                    r = handler => Some(r.unwrap_or_else(|_| panicked())),
                    _ = until_deadline => Some(Err(Status::new(
                        StatusCode::DeadlineExceeded, "the call's deadline passed on the server"))),
                };
                tokens.end(seq);
                lock(&in_flight).remove(&id);
                if let Some(frame) = finish_call(&shared, dispatch.as_ref(), id, result) {
                    let _ = shared.outbound.send(frame).await;
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    /// Fails what is pending, lets the writer send what is queued and
    /// close_notify, waits for the handlers, and, given `reader` (this side
    /// closed first), reads until the peer's close: all within
    /// `close_timeout`.
    async fn finish<W, R>(
        self,
        cause: CloseCause,
        mut writer: W,
        writer_done: bool,
        reader: Option<FrameReader<R>>,
    ) -> String
    where
        W: std::future::Future<Output = Result<(), Error>> + Unpin,
        R: AsyncRead + Unpin,
    {
        let reason = cause.describe();
        let _ = self.shared.close_reason.set(reason.clone());
        self.shared.begin_shutdown();
        self.shared.fail_all(&cause);
        self.handlers.close();
        self.shared.outbound.stop();
        let wait = async {
            if !writer_done {
                let _ = (&mut writer).await;
            }
            self.handlers.wait().await;
            // The peer answers our close_notify with its own. Were the
            // socket closed before that arrives, this side's kernel would
            // answer it with a TCP reset. Read it, so both directions end
            // with a FIN.
            if let Some(mut reader) = reader {
                while let Some(Ok(_)) = reader.next().await {}
            }
        };
        if tokio::time::timeout(self.close_timeout, wait)
            .await
            .is_err()
        {
            debug!("peer did not take the last frames, or close, in time");
        }
        debug!(%reason, "connection closed");
        self.shared.done.cancel();
        reason
    }
}

/// When the driver's timer must fire: at `heartbeat` or at the earliest call
/// deadline, whichever comes first; recorded so a caller with an earlier
/// deadline knows to move it.
fn arm(shared: &Shared, heartbeat: Instant) -> Instant {
    let mut calls = shared.calls();
    let at = calls.earliest().map_or(heartbeat, |d| d.min(heartbeat));
    calls.armed = Some(at);
    at
}

/// Why the connection ends when its writer did.
fn writer_stopped(res: Result<(), Error>) -> CloseCause {
    CloseCause::Other(match res {
        Ok(()) => "writer stopped".into(),
        Err(e) => format!("write failed: {e}"),
    })
}

fn panicked() -> Result<Bytes, Status> {
    warn!("handler panicked");
    Err(Status::internal("the handler panicked"))
}

/// Counts a finished call and makes its `Response`; `None` when the call
/// was cancelled (nobody waits for an answer).
fn finish_call(
    shared: &Shared,
    dispatch: &dyn Dispatch,
    id: u64,
    result: Option<Result<Bytes, Status>>,
) -> Option<Frame> {
    if let Some(c) = dispatch.counters() {
        c.finished(match &result {
            Some(Ok(_)) => Ok(()),
            Some(Err(status)) => Err(status.code),
            None => Err(StatusCode::Cancelled),
        });
    }
    let Some(result) = result else {
        debug!("handler stopped: cancelled");
        return None;
    };
    let result = fitting_reply(id, result, shared.max_send);
    if let Err(status) = &result {
        debug!(%status, "call failed");
    }
    Some(Frame::Response { id, result })
}

/// `result` as it can be sent to a peer whose frames are limited to
/// `max_send` bytes: a reply too large for that fails this call alone with
/// `ResourceExhausted`, and a status's message is cut to
/// [`Status::MAX_MESSAGE`], or shorter when the limit needs it.
fn fitting_reply(id: u64, result: Result<Bytes, Status>, max_send: usize) -> Result<Bytes, Status> {
    let status = match result {
        // Exact sizing walks the frame; only replies near the limit need it.
        Ok(reply) if reply.len() + RESPONSE_OVERHEAD <= max_send => return Ok(reply),
        Ok(reply) => {
            let probe = Frame::Response {
                id,
                result: Ok(reply.clone()),
            };
            if frame_len(&probe, max_send).is_ok() {
                return Ok(reply);
            }
            Status::resource_exhausted(format!(
                "reply of {} bytes does not fit the caller's frame limit of {max_send} bytes \
                 (its max_frame)",
                reply.len()
            ))
        }
        Err(status) => status,
    };
    // Room for the message: the frame less its other fields, which
    // RESPONSE_OVERHEAD bounds (a test below checks it).
    let room = max_send.saturating_sub(RESPONSE_OVERHEAD);
    Err(status.cut_to(room.min(Status::MAX_MESSAGE)))
}

/// More than a `Response` frame adds to its reply's bytes: variant tags and
/// varint id and length (bincode `DefaultOptions`).
const RESPONSE_OVERHEAD: usize = 32;

/// Why [`Outbound::try_send`] did not queue a frame.
pub(crate) enum TrySend {
    /// The queue is at capacity; `send` would wait.
    Full,
    /// The writer has stopped.
    Closed,
}

/// Frames on their way to the writer, one queue for data (requests,
/// responses, cancels) and one for control (Ping, Pong, GoAway, which the
/// writer takes first):
/// a bounded queue, like a channel, but a deque that allocates nothing
/// while empty (a tokio channel's first block is about 2.4 KiB for every
/// connection, idle or not).
pub(crate) struct Outbound {
    frames: Mutex<Queue>,
    /// One permit per free place; closed when the writer stops.
    space: Semaphore,
    /// The writer, when it waits for a frame.
    ready: AtomicWaker,
    capacity: usize,
    /// More than `capacity` frames wait; updated under the lock.
    over: AtomicBool,
    /// Frames queued; lets the writer see an empty queue without the lock.
    len: AtomicUsize,
    /// Places the writer has freed but not yet given back (it gives them
    /// back once per batch: each `add_permits` takes the semaphore's lock).
    held: AtomicUsize,
    /// The connection is closing: the writer writes what is queued and
    /// stops.
    stopped: AtomicBool,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    closed: bool,
    /// Frames queued by `send_now` without a permit; popping one of them
    /// returns no permit.
    unpermitted: usize,
}

impl Outbound {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        Outbound {
            frames: Mutex::new(Queue::default()),
            space: Semaphore::new(capacity),
            ready: AtomicWaker::new(),
            capacity,
            over: AtomicBool::new(false),
            len: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
        }
    }

    fn frames(&self) -> MutexGuard<'_, Queue> {
        // push_back/pop_front only: a poisoned deque is still consistent.
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame`; `permitted` says whether a place was taken for it,
    /// `wake` whether to wake the writer.
    fn push(&self, frame: Frame, permitted: bool, wake: bool) -> Result<(), Frame> {
        {
            let mut q = self.frames();
            if q.closed {
                return Err(frame);
            }
            q.frames.push_back(frame);
            if !permitted {
                q.unpermitted += 1;
            }
            self.over
                .store(q.frames.len() > self.capacity, Ordering::Relaxed);
            self.len.store(q.frames.len(), Ordering::Release);
        }
        if wake {
            self.ready.wake();
        }
        Ok(())
    }

    /// Queues `frame` at once, past the capacity if need be: for the
    /// connection's own task, which also runs the writer and so must never
    /// wait for it. That task stops reading while the queue is over
    /// capacity ([`Outbound::over_capacity`]), which bounds the excess.
    ///
    /// The writer is not woken: it looks at the queue each time it is
    /// polled, and the task polls it on its next turn anyway. Waking it
    /// would wake the running task itself, which tokio treats as a yield: it
    /// re-queues the task and wakes the other worker thread to steal it.
    pub(crate) fn send_now(&self, frame: Frame) {
        let permitted = match self.space.try_acquire() {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        };
        let _ = self.push(frame, permitted, false);
    }

    /// More frames wait than the capacity (read on every turn of the
    /// driver's loop, so kept in an atomic rather than behind the lock).
    pub(crate) fn over_capacity(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Queues `frame`, waiting for room; gives it back if the writer has
    /// stopped.
    pub(crate) async fn send(&self, frame: Frame) -> Result<(), Frame> {
        match self.space.acquire().await {
            Ok(permit) => {
                permit.forget();
                self.push(frame, true, true)
            }
            Err(_) => Err(frame),
        }
    }

    /// Queues `frame` if there is room now.
    pub(crate) fn try_send(&self, frame: Frame) -> Result<(), TrySend> {
        self.try_push(frame).map_err(|(why, _)| why)
    }

    /// Like [`Outbound::try_send`], giving the frame back when it could not
    /// be queued.
    pub(crate) fn try_push(&self, frame: Frame) -> Result<(), (TrySend, Frame)> {
        match self.space.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.push(frame, true, true)
                    .map_err(|frame| (TrySend::Closed, frame))
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Err((TrySend::Full, frame)),
            Err(tokio::sync::TryAcquireError::Closed) => Err((TrySend::Closed, frame)),
        }
    }

    fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    /// The next frame, giving its place back at once.
    fn pop(&self) -> Option<Frame> {
        let frame = self.pop_held();
        self.release_held();
        frame
    }

    /// The next frame; its place is given back by [`Outbound::release_held`].
    fn pop_held(&self) -> Option<Frame> {
        // Only the writer pops, so an empty queue stays empty until a push,
        // and a push wakes the writer (or is made by its own task).
        if self.is_empty() {
            return None;
        }
        let mut q = self.frames();
        let frame = q.frames.pop_front()?;
        self.took(&mut q, 1);
        Some(frame)
    }

    /// Moves up to `max` frames to `out` under one lock; their places are
    /// given back by [`Outbound::release_held`]. (Popping them one at a
    /// time took the lock once per frame.)
    fn pop_many_held(&self, out: &mut VecDeque<Frame>, max: usize) -> usize {
        if self.is_empty() {
            return 0;
        }
        let mut q = self.frames();
        let n = max.min(q.frames.len());
        out.extend(q.frames.drain(..n));
        self.took(&mut q, n);
        n
    }

    /// Bookkeeping for `n` frames just popped from `q`: the places of the
    /// permitted ones are held for `release_held`.
    fn took(&self, q: &mut Queue, n: usize) {
        let unpermitted = n.min(q.unpermitted);
        q.unpermitted -= unpermitted;
        self.held.fetch_add(n - unpermitted, Ordering::Relaxed);
        self.over
            .store(q.frames.len() > self.capacity, Ordering::Relaxed);
        self.len.store(q.frames.len(), Ordering::Release);
    }

    /// Gives back the places of the frames popped since the last call.
    fn release_held(&self) {
        let held = self.held.swap(0, Ordering::Relaxed);
        if held > 0 {
            self.space.add_permits(held);
        }
    }

    /// The next frame, or `None` once [`Outbound::stop`] was called and
    /// the queue is empty. Each poll looks at the queue, woken or not.
    async fn next(&self) -> Option<Frame> {
        std::future::poll_fn(|cx| {
            if let Some(frame) = self.pop() {
                return Poll::Ready(Some(frame));
            }
            self.ready.register(cx.waker());
            // A frame queued between the first look and the registration
            // woke nobody: look again.
            match self.pop() {
                Some(frame) => Poll::Ready(Some(frame)),
                None if self.stopped.load(Ordering::Acquire) => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Tells the writer to finish: write what is queued, then stop.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.ready.wake();
    }

    /// The writer stopped: senders fail from now on instead of waiting.
    fn close(&self) {
        self.frames().closed = true;
        self.space.close();
    }
}

/// Closes the queue however the writer ends (error, cancel, panic).
struct CloseOnDrop(Arc<Outbound>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// How the writer tells a slow peer from one that stopped reading.
struct Stall {
    clocks: Arc<ByteClocks>,
    timeout: Duration,
}

impl Stall {
    /// Runs a write step; fails if, while it waits, no byte at all is written
    /// for `timeout`. A slow peer that keeps reading never trips this.
    async fn guard<F>(&self, step: F) -> Result<(), Error>
    where
        F: std::future::Future<Output = Result<(), Error>>,
    {
        tokio::pin!(step);
        // The common case completes at once, without arming a timer.
        tokio::select! {
            biased;
            r = &mut step => return r,
            _ = std::future::ready(()) => {}
        }
        let mut mark = self.clocks.last_written();
        loop {
            match tokio::time::timeout(self.timeout, &mut step).await {
                Ok(r) => return r,
                Err(_) => {
                    let now = self.clocks.last_written();
                    if now == mark {
                        return Err(Error::WriteStalled(self.timeout));
                    }
                    mark = now;
                }
            }
        }
    }
}

async fn write_loop<W>(
    mut sink: FrameWriter<W>,
    data: Arc<Outbound>,
    control: Arc<Outbound>,
    gather: bool,
    stall: Stall,
) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
{
    let _close = CloseOnDrop(data.clone());
    // Whatever was written into the TLS session before the driver took
    // over leaves now, if no frame is queued to take it along.
    if data.is_empty() && control.is_empty() {
        stall.guard(sink.flush()).await?;
    }
    let mut last_batch = 0;
    let mut taken = VecDeque::new();
    loop {
        // `data` ends the loop once stopped and empty; `control` never does.
        let first = tokio::select! {
            biased;
            f = control.next() => f,
            f = data.next() => f,
        };
        let Some(first) = first else { break };
        feed(&mut sink, first)?;
        let mut fed = 1;
        // Frames of one burst arrive a few at a time: when they come from
        // other tasks (`gather`: a client's callers), give those one turn
        // of the scheduler before the syscall. A server's frames are
        // replies its own task queued before polling the writer, so a turn
        // finds nothing more there, and tokio's yield wakes the other
        // worker thread to steal the task (a futex call and a migration
        // per batch). Only when the last batch had company: a lone call (one in
        // flight) must not wait for a turn of the scheduler.
        let mut yielded = !gather || last_batch < 2;
        // Data frames are taken from the queue many at a time into
        // `taken`, which is empty again when the batch ends.
        while fed < MAX_BATCH || !taken.is_empty() {
            let next = match control.pop_held() {
                Some(f) => f,
                None => match taken.pop_front() {
                    Some(f) => f,
                    None if fed < MAX_BATCH
                        && data.pop_many_held(&mut taken, MAX_BATCH - fed) > 0 =>
                    {
                        continue
                    }
                    // The producers' one turn (see `yielded` above).
                    None if !yielded => {
                        yielded = true;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    None => break,
                },
            };
            feed(&mut sink, next)?;
            fed += 1;
            // What FramedWrite did at 8 KiB: write out a long batch of
            // small frames as it grows instead of buffering all of it.
            if sink.pending() >= FLUSH_AT {
                stall.guard(sink.flush()).await?;
            }
        }
        data.release_held();
        control.release_held();
        stall.guard(sink.flush()).await?;
        last_batch = fed;
    }
    // Closing: what is already queued (replies, then a last GoAway), then
    // TLS close_notify. The driver bounds this with `close_timeout`.
    while let Some(f) = data.pop() {
        feed(&mut sink, f)?;
    }
    while let Some(f) = control.pop() {
        feed(&mut sink, f)?;
    }
    sink.close().await
}

/// Encodes `frame` for writing. A `Response` that does not fit the peer's
/// frame limit (replies are sized before they are queued, so this is a
/// second line of defence) becomes that call's `ResourceExhausted`, so one
/// reply never ends the connection and the calls on it.
fn feed<W: AsyncWrite + Unpin>(sink: &mut FrameWriter<W>, frame: Frame) -> Result<(), Error> {
    let id = match &frame {
        Frame::Response { id, .. } => Some(*id),
        _ => None,
    };
    match (sink.feed(frame), id) {
        (Err(Error::FrameTooLarge { len, max }), Some(id)) => {
            let status = Status::resource_exhausted(format!(
                "reply frame of {len} bytes does not fit the caller's frame limit of {max} bytes \
                 (its max_frame)"
            ));
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            sink.feed(Frame::Response {
                id,
                result: fitting_reply(id, Err(status), max),
            })
        }
        (result, _) => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::CONTROL_QUEUE;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_same_partial_frame_for_the_timeout_fails() {
        let t0 = Instant::now();
        let mut w = PartialFrameWatch {
            timeout: 30 * S,
            since: None,
        };
        assert_eq!(w.check(t0, true, 7), Ok(()));
        assert_eq!(w.check(t0 + 29 * S, true, 7), Ok(()));
        assert_eq!(w.check(t0 + 30 * S, true, 7), Err(30 * S));
    }

    #[test]
    fn a_new_partial_frame_every_tick_never_fails() {
        let t0 = Instant::now();
        let mut w = PartialFrameWatch {
            timeout: 2 * S,
            since: None,
        };
        for tick in 0..100u32 {
            assert_eq!(
                w.check(t0 + tick * S, true, u64::from(tick)),
                Ok(()),
                "tick {tick}"
            );
        }
    }

    fn ping(nonce: u64) -> Frame {
        Frame::Ping { nonce }
    }

    #[tokio::test]
    async fn the_outbound_queue_is_bounded_ordered_and_fails_once_closed() {
        let q = Arc::new(Outbound::new(2));
        assert!(q.try_send(ping(1)).is_ok());
        assert!(q.send(ping(2)).await.is_ok());
        assert!(matches!(q.try_send(ping(3)), Err(TrySend::Full)));
        // A waiting sender gets in as soon as the writer takes a frame.
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.send(ping(3)).await.is_ok() }
        });
        assert_eq!(q.next().await, Some(ping(1)));
        assert!(waiting.await.unwrap());
        assert_eq!(q.pop(), Some(ping(2)));
        assert_eq!(q.pop(), Some(ping(3)));
        assert_eq!(q.pop(), None);
        // The connection's own replies never wait: past the capacity they
        // are queued all the same, and the queue reports it is over.
        for n in 10..13 {
            q.send_now(ping(n));
        }
        assert!(q.over_capacity());
        assert!(matches!(q.try_send(ping(13)), Err(TrySend::Full)));
        for n in 10..13 {
            assert_eq!(q.pop(), Some(ping(n)));
        }
        assert!(!q.over_capacity());
        // Exactly the capacity is free again: no permit was made up.
        assert!(q.try_send(ping(20)).is_ok());
        assert!(q.try_send(ping(21)).is_ok());
        assert!(matches!(q.try_send(ping(22)), Err(TrySend::Full)));
        assert_eq!(q.pop(), Some(ping(20)));
        assert_eq!(q.pop(), Some(ping(21)));
        q.close();
        assert!(matches!(q.try_send(ping(4)), Err(TrySend::Closed)));
        assert_eq!(q.send(ping(5)).await, Err(ping(5)));
    }

    #[test]
    fn the_writer_gives_places_back_once_per_batch() {
        let q = Outbound::new(2);
        assert!(q.try_send(ping(1)).is_ok());
        assert!(q.try_send(ping(2)).is_ok());
        assert_eq!(q.pop_held(), Some(ping(1)));
        assert_eq!(q.pop_held(), Some(ping(2)));
        assert_eq!(q.pop_held(), None);
        // Popped but not given back: the queue is still full to senders.
        assert!(matches!(q.try_send(ping(3)), Err(TrySend::Full)));
        q.release_held();
        assert!(q.try_send(ping(3)).is_ok());
        assert!(q.try_send(ping(4)).is_ok());
        assert!(matches!(q.try_send(ping(5)), Err(TrySend::Full)));
    }

    #[tokio::test]
    async fn a_stopped_queue_gives_what_it_holds_then_ends() {
        let q = Outbound::new(4);
        assert!(q.try_send(ping(1)).is_ok());
        q.stop();
        assert_eq!(q.next().await, Some(ping(1)));
        assert_eq!(q.next().await, None);
    }

    #[test]
    fn driver_events_are_seen_once_and_wake_the_driver() {
        let events = crate::connection::DriverEvents::default();
        let wakes = Arc::new(CountWakes(0.into()));
        let waker = futures_util::task::waker(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(events.poll(&mut cx).is_pending());
        events.raise(DriverEvents::PING);
        events.raise(DriverEvents::DEADLINE);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "one wake for both");
        assert_eq!(
            events.poll(&mut cx),
            Poll::Ready(DriverEvents::PING | DriverEvents::DEADLINE)
        );
        assert!(events.poll(&mut cx).is_pending(), "seen once");
        // Raised with nobody waiting: seen on the next poll.
        events.raise(DriverEvents::SHUTDOWN);
        assert_eq!(events.poll(&mut cx), Poll::Ready(DriverEvents::SHUTDOWN));
    }

    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl futures_util::task::ArcWake for CountWakes {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_writer_is_woken_only_from_other_tasks_and_finds_frames_anyway() {
        use std::future::Future;
        let q = Outbound::new(4);
        let wakes = Arc::new(CountWakes(0.into()));
        let waker = futures_util::task::waker(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let woken = || wakes.0.load(Ordering::SeqCst);

        // A frame the connection task queues wakes nobody, and the
        // writer's next poll takes it.
        let mut next = Box::pin(q.next());
        assert!(next.as_mut().poll(&mut cx).is_pending());
        q.send_now(ping(1));
        assert_eq!(woken(), 0);
        assert_eq!(next.as_mut().poll(&mut cx), Poll::Ready(Some(ping(1))));
        // Frames from other tasks (callers, spawned handlers) wake it.
        let mut next = Box::pin(q.next());
        assert!(next.as_mut().poll(&mut cx).is_pending());
        assert!(q.try_send(ping(2)).is_ok());
        assert_eq!(woken(), 1);
        assert_eq!(next.as_mut().poll(&mut cx), Poll::Ready(Some(ping(2))));
    }

    #[tokio::test]
    async fn the_control_queue_holds_at_most_its_capacity() {
        let q = Outbound::new(CONTROL_QUEUE);
        for n in 0..CONTROL_QUEUE as u64 {
            assert!(q.try_send(ping(n)).is_ok());
        }
        assert!(
            q.try_send(ping(999)).is_err(),
            "a full control queue drops the frame"
        );
        assert_eq!(q.next().await, Some(ping(0)));
        assert!(q.try_send(ping(1000)).is_ok());
    }

    #[test]
    fn no_partial_frame_resets_the_watch() {
        let t0 = Instant::now();
        let mut w = PartialFrameWatch {
            timeout: 2 * S,
            since: None,
        };
        assert_eq!(w.check(t0, true, 1), Ok(()));
        assert_eq!(w.check(t0 + S, false, 1), Ok(()));
        assert_eq!(w.check(t0 + 2 * S, true, 1), Ok(()));
        assert_eq!(w.check(t0 + 3 * S, true, 1), Ok(()));
        assert_eq!(w.check(t0 + 4 * S, true, 1), Err(2 * S));
    }

    #[test]
    fn every_reply_fits_the_peers_frame_limit_or_fails_alone() {
        let id = u64::MAX;
        for max_send in [64usize, 100, 1000, 5000, 1 << 20] {
            let long = Err(Status::internal("x".repeat(5 << 20)));
            let sent = fitting_reply(id, long, max_send);
            let frame = Frame::Response {
                id,
                result: sent.clone(),
            };
            assert!(frame_len(&frame, max_send).is_ok(), "{max_send}");
            let message = sent.unwrap_err().message;
            assert!(message.len() <= Status::MAX_MESSAGE, "{max_send}");
            if max_send >= 1000 {
                assert!(message.ends_with("bytes, cut]"), "{message}");
            }
            // A reply one byte over the limit fails with ResourceExhausted.
            let body = Bytes::from(vec![7u8; max_send]);
            let status = fitting_reply(id, Ok(body), max_send).unwrap_err();
            assert_eq!(status.code, StatusCode::ResourceExhausted, "{max_send}");
            if max_send >= 1000 {
                assert!(status
                    .message
                    .contains(&format!("frame limit of {max_send} bytes")));
            }
            // The largest reply that fits is sent as it is.
            let fits = (0..max_send)
                .rev()
                .find(|&n| {
                    let probe = Frame::Response {
                        id,
                        result: Ok(Bytes::from(vec![1u8; n])),
                    };
                    frame_len(&probe, max_send).is_ok()
                })
                .unwrap();
            let body = Bytes::from(vec![1u8; fits]);
            assert_eq!(fitting_reply(id, Ok(body.clone()), max_send), Ok(body));
        }
    }
}
