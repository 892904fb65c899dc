//! The connection driver: one implementation used by both server and client.
//!
//! ```text
//!            Connection (cheap clone handle)
//!   call() ──► pending table (id -> oneshot) ──┐
//!      │                                       │ Response{id}
//!      ▼                                       │
//!   outbound queue (bounded mpsc<Frame>) ──► writer task ──► TLS write half
//!      ▲           ▲                            (feeds a batch, one flush)
//!      │           │ Pong, Overloaded
//!   handler     reader loop ◄── TLS read half (FrameCodec)
//!   tasks ◄──── Request{id} (dispatch, one task per call, tracked)
//! ```
//!
//! - The reader loop is the driver future returned by [`start`]; its owner
//!   spawns it. It routes `Response`s to waiting callers, runs `Request`s
//!   through a [`Dispatch`] on tracked tasks (at most `max_in_flight` at once,
//!   the excess refused with `Overloaded`), answers `Ping` with `Pong` and
//!   honours `Cancel`.
//! - The writer task takes one frame, then every frame already queued (up to
//!   [`MAX_BATCH`]), and flushes once.
//! - When the connection ends for any reason, every pending call fails at once
//!   with [`Error::Closed`] naming the reason, every handler is cancelled, and
//!   the writer gets `close_timeout` to flush a last `GoAway` and TLS
//!   close_notify. No call hangs on a dead connection.
//!
//! Not here: TLS handshakes and `Hello` (see [`crate::transport`]), heartbeat
//! timing, reconnects, and method routing (the server's job).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::ConnectionConfig;
use crate::error::{Error, Status, StatusCode};
use crate::frame::{frame_len, Frame, FrameCodec, Hello};

/// Most frames the writer encodes before it flushes.
pub const MAX_BATCH: usize = 128;

/// A boxed, sendable future, as returned by [`Dispatch::dispatch`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Serves the calls a peer makes (implemented by the server's router).
pub trait Dispatch: Send + Sync + 'static {
    /// Runs one call; the reply is the encoded result or a [`Status`].
    fn dispatch(&self, ctx: CallContext, body: Bytes) -> BoxFuture<Result<Bytes, Status>>;
}

/// What a handler knows about the call it is serving.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The caller's address.
    pub peer: SocketAddr,
    /// The request id (unique per connection).
    pub id: u64,
    /// The method called.
    pub method: String,
    /// When the caller stops waiting, if it said.
    pub deadline: Option<Instant>,
    /// Fires when the caller cancels, the deadline passes, or the connection
    /// closes; the handler's future is dropped then too.
    pub cancelled: CancellationToken,
}

type Reply = oneshot::Sender<Result<Bytes, Error>>;

#[derive(Default)]
struct CallTable {
    /// Set once when the connection ends; no call is registered after.
    closed: Option<String>,
    /// The peer said `GoAway`: no new calls on this connection.
    goaway: Option<String>,
    pending: HashMap<u64, Reply>,
}

struct Shared {
    outbound: mpsc::Sender<Frame>,
    calls: Mutex<CallTable>,
    next_id: AtomicU64,
    /// Fires when the connection must end (local close, or the driver ended).
    shutdown: CancellationToken,
    /// Fires to ask for a graceful drain.
    drain: CancellationToken,
    /// Fires once the driver has finished closing.
    done: CancellationToken,
    close_reason: OnceLock<String>,
    peer: SocketAddr,
    peer_hello: Hello,
    max_send: usize,
    /// One permit per call the peer serves at once (its `Hello`); calls
    /// beyond it wait here, within their deadline.
    call_slots: Semaphore,
}

impl Shared {
    fn calls(&self) -> MutexGuard<'_, CallTable> {
        // A panic while holding this lock would be a bug in this module; the
        // table stays consistent (plain inserts/removes), so keep using it.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle to one live connection. Cheap to clone; the connection lives until
/// its driver ends (peer gone, error, [`Connection::close`]).
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
    sent: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let was_pending = self.shared.calls().pending.remove(&self.id).is_some();
        if was_pending && self.sent {
            // Best effort: a full queue means the peer is slow, and the call
            // will be answered into the void instead of stopped.
            let _ = self.shared.outbound.try_send(Frame::Cancel { id: self.id });
        }
    }
}

impl Connection {
    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared.peer
    }

    /// The `Hello` the peer sent.
    pub fn peer_hello(&self) -> Hello {
        self.shared.peer_hello
    }

    /// True once the connection has ended or is ending.
    pub fn is_closed(&self) -> bool {
        self.shared.shutdown.is_cancelled() || self.shared.calls().closed.is_some()
    }

    /// True when new calls can still be made here (not closed, no `GoAway`).
    pub fn is_usable(&self) -> bool {
        let t = self.shared.calls();
        t.closed.is_none() && t.goaway.is_none() && !self.shared.shutdown.is_cancelled()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.close_reason.get().cloned()
    }

    /// Waits until the driver has finished closing the connection.
    pub async fn closed(&self) {
        self.shared.done.cancelled().await
    }

    /// Ends the connection now: pending calls fail, handlers are cancelled.
    pub fn close(&self) {
        self.shared.shutdown.cancel();
    }

    /// Starts a graceful drain: sends `GoAway`, refuses new calls from the
    /// peer with `ShuttingDown`, and closes once running handlers finish.
    pub fn drain(&self) {
        self.shared.drain.cancel();
    }

    /// Calls `method` with encoded arguments and waits for the encoded reply,
    /// at most `timeout`. The deadline travels with the request.
    pub async fn call(&self, method: &str, body: Bytes, timeout: Duration) -> Result<Bytes, Error> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("call", method, id, peer = %self.shared.peer);
        self.call_inner(id, method, body, timeout)
            .instrument(span)
            .await
    }

    async fn call_inner(
        &self,
        id: u64,
        method: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        let deadline_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let frame = Frame::Request {
            id,
            method: method.to_owned(),
            deadline_ms: Some(deadline_ms),
            body,
        };
        frame_len(&frame, self.shared.max_send)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.shared.calls();
            if let Some(reason) = &t.closed {
                return Err(Error::Closed {
                    reason: reason.clone(),
                });
            }
            if let Some(reason) = &t.goaway {
                return Err(Error::GoAway {
                    reason: reason.clone(),
                });
            }
            t.pending.insert(id, tx);
        }
        let mut guard = PendingGuard {
            shared: &self.shared,
            id,
            sent: false,
        };
        let exchange = async {
            // Never fails: the semaphore is not closed.
            let Ok(_slot) = self.shared.call_slots.acquire().await else {
                return Err(self.closed_error());
            };
            if self.shared.outbound.send(frame).await.is_err() {
                return Err(self.closed_error());
            }
            guard.sent = true;
            debug!("request sent");
            // The sender is dropped without a value only if the table was
            // torn down without failing this call, which `fail_all` prevents;
            // report it as closed regardless.
            rx.await.unwrap_or_else(|_| Err(self.closed_error()))
        };
        let result = tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(Error::DeadlineExceeded(timeout)));
        drop(guard);
        if let Err(e) = &result {
            debug!(error = %e, "call failed");
        }
        result
    }

    fn closed_error(&self) -> Error {
        let reason = self
            .shared
            .calls()
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        Error::Closed { reason }
    }
}

/// Wraps an established stream (after `Hello`) in a driver. Returns the handle
/// and the driver future, which the caller must spawn; it resolves with the
/// reason the connection ended.
pub fn start<S>(
    stream: S,
    config: &ConnectionConfig,
    peer: SocketAddr,
    peer_hello: Hello,
    dispatch: Option<Arc<dyn Dispatch>>,
) -> (Connection, impl Future<Output = String> + Send + 'static)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let max_send = config.max_frame.min(peer_hello.max_frame as usize);
    let (read, write) = tokio::io::split(stream);
    let reader = FramedRead::new(read, FrameCodec::new(config.max_frame, max_send));
    let writer = FramedWrite::new(write, FrameCodec::new(config.max_frame, max_send));
    let (tx, rx) = mpsc::channel(config.outbound_queue);
    let shared = Arc::new(Shared {
        outbound: tx,
        calls: Mutex::new(CallTable::default()),
        next_id: AtomicU64::new(1),
        shutdown: CancellationToken::new(),
        drain: CancellationToken::new(),
        done: CancellationToken::new(),
        close_reason: OnceLock::new(),
        peer,
        peer_hello,
        max_send,
        call_slots: Semaphore::new((peer_hello.max_in_flight as usize).min(Semaphore::MAX_PERMITS)),
    });
    let driver = Driver {
        shared: shared.clone(),
        dispatch,
        in_flight: Arc::new(Mutex::new(HashMap::new())),
        handlers: TaskTracker::new(),
        max_in_flight: config.max_in_flight,
        close_timeout: config.close_timeout,
        draining: false,
    };
    let span = tracing::info_span!("conn", %peer);
    let fut = driver.run(reader, writer, rx).instrument(span);
    (Connection { shared }, fut)
}

type InFlight = Arc<Mutex<HashMap<u64, CancellationToken>>>;

fn lock(
    m: &Mutex<HashMap<u64, CancellationToken>>,
) -> MutexGuard<'_, HashMap<u64, CancellationToken>> {
    // Plain map operations only; a poisoned map is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Driver {
    shared: Arc<Shared>,
    dispatch: Option<Arc<dyn Dispatch>>,
    in_flight: InFlight,
    handlers: TaskTracker,
    max_in_flight: usize,
    close_timeout: Duration,
    draining: bool,
}

/// How the read loop ended.
enum End {
    /// Clean end; nothing to tell the peer.
    Quiet(String),
    /// The peer broke a rule: tell it with `GoAway`, then close.
    Tell(String),
}

impl Driver {
    async fn run<R, W>(
        mut self,
        mut reader: FramedRead<R, FrameCodec>,
        writer: FramedWrite<W, FrameCodec>,
        rx: mpsc::Receiver<Frame>,
    ) -> String
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let stop_writer = CancellationToken::new();
        let mut writer_task = tokio::spawn(write_loop(writer, rx, stop_writer.clone()));
        let mut writer_done = false;
        let end = loop {
            let next = tokio::select! {
                biased;
                _ = self.shared.shutdown.cancelled() => break End::Quiet("closed by this side".into()),
                res = &mut writer_task => {
                    writer_done = true;
                    break End::Quiet(match res {
                        Ok(Ok(())) => "writer stopped".into(),
                        Ok(Err(e)) => format!("write failed: {e}"),
                        Err(e) => format!("writer task failed: {e}"),
                    });
                }
                _ = self.shared.drain.cancelled(), if !self.draining => {
                    self.draining = true;
                    self.handlers.close();
                    let _ = self.shared.outbound.send(Frame::GoAway { reason: "server shutting down".into() }).await;
                    info!("draining: sent GoAway");
                    continue;
                }
                _ = self.handlers.wait(), if self.draining => {
                    break End::Quiet("drained after GoAway".into());
                }
                next = reader.next() => next,
            };
            match next {
                None => break End::Quiet("peer closed the connection".into()),
                Some(Err(Error::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break End::Quiet("peer closed the connection without TLS close_notify".into())
                }
                Some(Err(Error::Io(e))) => break End::Quiet(format!("read failed: {e}")),
                Some(Err(e)) => break End::Tell(e.to_string()),
                Some(Ok(frame)) => {
                    if let Err(e) = self.on_frame(frame).await {
                        break End::Tell(e.to_string());
                    }
                }
            }
        };
        let reason = match end {
            End::Quiet(r) => r,
            End::Tell(r) => {
                warn!(reason = %r, "closing connection: peer broke the protocol");
                let _ = self
                    .shared
                    .outbound
                    .try_send(Frame::GoAway { reason: r.clone() });
                r
            }
        };
        self.finish(reason, stop_writer, writer_task, writer_done)
            .await
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), Error> {
        match frame {
            Frame::Request {
                id,
                method,
                deadline_ms,
                body,
            } => self.on_request(id, method, deadline_ms, body).await,
            Frame::Response { id, result } => {
                let waiter = self.shared.calls().pending.remove(&id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(result.map_err(Error::Status));
                    }
                    None if id >= self.shared.next_id.load(Ordering::Relaxed) => {
                        return Err(Error::Protocol(format!(
                            "Response for call {id}, which was never made"
                        )));
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
                }
                Ok(())
            }
            Frame::Ping { nonce } => {
                let _ = self.shared.outbound.send(Frame::Pong { nonce }).await;
                Ok(())
            }
            // Heartbeat timing (RTT from Pongs) is not tracked by this driver.
            Frame::Pong { .. } => Ok(()),
            Frame::GoAway { reason } => {
                info!(%reason, "peer sent GoAway");
                self.shared.calls().goaway = Some(reason);
                Ok(())
            }
            Frame::Hello(_) => Err(Error::Protocol("second Hello on one connection".into())),
        }
    }

    async fn on_request(
        &mut self,
        id: u64,
        method: String,
        deadline_ms: Option<u32>,
        body: Bytes,
    ) -> Result<(), Error> {
        let Some(dispatch) = self.dispatch.clone() else {
            return Err(Error::Protocol(
                "Request sent to a peer that serves no calls".into(),
            ));
        };
        let refuse = |status: Status| Frame::Response {
            id,
            result: Err(status),
        };
        if self.draining {
            let status = Status::new(StatusCode::ShuttingDown, "server is shutting down");
            let _ = self.shared.outbound.send(refuse(status)).await;
            return Ok(());
        }
        let token = {
            let mut in_flight = lock(&self.in_flight);
            if in_flight.contains_key(&id) {
                return Err(Error::Protocol(format!(
                    "request id {id} is already in flight"
                )));
            }
            if in_flight.len() >= self.max_in_flight {
                None
            } else {
                let token = self.shared.shutdown.child_token();
                in_flight.insert(id, token.clone());
                Some(token)
            }
        };
        let Some(token) = token else {
            let status = Status::new(
                StatusCode::Overloaded,
                format!(
                    "more than {} calls in flight on this connection",
                    self.max_in_flight
                ),
            );
            let _ = self.shared.outbound.send(refuse(status)).await;
            return Ok(());
        };
        let deadline = deadline_ms.map(|ms| Instant::now() + Duration::from_millis(ms.into()));
        let ctx = CallContext {
            peer: self.shared.peer,
            id,
            method,
            deadline,
            cancelled: token.clone(),
        };
        let span = tracing::debug_span!("call", method = %ctx.method, id, peer = %ctx.peer);
        let shared = self.shared.clone();
        let in_flight = self.in_flight.clone();
        self.handlers.spawn(
            async move {
                let handler = AssertUnwindSafe(dispatch.dispatch(ctx, body)).catch_unwind();
                let until_deadline = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                let result = tokio::select! {
                    r = handler => Some(r.unwrap_or_else(|_| {
                        warn!("handler panicked");
                        Err(Status::internal("the handler panicked"))
                    })),
                    _ = until_deadline => Some(Err(Status::new(
                        StatusCode::DeadlineExceeded, "the call's deadline passed on the server"))),
                    _ = token.cancelled() => None,
                };
                token.cancel();
                lock(&in_flight).remove(&id);
                let Some(mut result) = result else {
                    debug!("handler stopped: cancelled");
                    return;
                };
                if let Ok(reply) = &result {
                    let probe = Frame::Response {
                        id,
                        result: Ok(reply.clone()),
                    };
                    if let Err(e) = frame_len(&probe, shared.max_send) {
                        result = Err(Status::internal(format!("reply not sent: {e}")));
                    }
                }
                if let Err(status) = &result {
                    debug!(%status, "call failed");
                }
                let _ = shared.outbound.send(Frame::Response { id, result }).await;
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn finish(
        self,
        reason: String,
        stop_writer: CancellationToken,
        mut writer_task: tokio::task::JoinHandle<Result<(), Error>>,
        writer_done: bool,
    ) -> String {
        let _ = self.shared.close_reason.set(reason.clone());
        self.shared.shutdown.cancel();
        fail_all(&self.shared, &reason);
        self.handlers.close();
        stop_writer.cancel();
        let wait = async {
            if !writer_done {
                let _ = (&mut writer_task).await;
            }
            self.handlers.wait().await;
        };
        if tokio::time::timeout(self.close_timeout, wait)
            .await
            .is_err()
        {
            debug!("peer did not take the last frames in time");
            writer_task.abort();
        }
        debug!(%reason, "connection closed");
        self.shared.done.cancel();
        reason
    }
}

/// Marks the table closed and fails every pending call with the reason.
fn fail_all(shared: &Shared, reason: &str) {
    let pending = {
        let mut t = shared.calls();
        t.closed = Some(reason.to_owned());
        std::mem::take(&mut t.pending)
    };
    for (_, tx) in pending {
        let _ = tx.send(Err(Error::Closed {
            reason: reason.to_owned(),
        }));
    }
}

async fn write_loop<W>(
    mut sink: FramedWrite<W, FrameCodec>,
    mut rx: mpsc::Receiver<Frame>,
    stop: CancellationToken,
) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
{
    loop {
        let first = tokio::select! {
            biased;
            f = rx.recv() => f,
            _ = stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        sink.feed(first).await?;
        for _ in 1..MAX_BATCH {
            match rx.try_recv() {
                Ok(f) => sink.feed(f).await?,
                Err(_) => break,
            }
        }
        sink.flush().await?;
    }
    // Closing: send what is already queued (a last GoAway), then close_notify.
    while let Ok(f) = rx.try_recv() {
        sink.feed(f).await?;
    }
    sink.close().await
}
