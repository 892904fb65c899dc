//! A live connection as its users see it: make calls, ping, close, drain.
//!
//! ```text
//!            Connection (cheap clone handle)
//!   call() ──► pending calls (id -> oneshot) ◄── Response{id} ──┐
//!      │        (calls/outgoing.rs, under shared.rs's lock)     │
//!      ▼                                                        │
//!   data queue (bounded) ──┐                                    │
//!   control queue ─────────┴─► writer ──► TLS ──► peer ──► reader loop
//!   (Ping, Pong, GoAway: ahead of data)            (driver.rs: rules,
//!                                                   served calls, heartbeat)
//! ```
//!
//! [`start`] wraps an established stream (TLS done, `Hello` exchanged) and
//! returns the handle and the driver future (see `driver.rs`), which the owner
//! spawns. Calls beyond the peer's announced `max_in_flight` wait here for a
//! slot, within their deadline. When the connection ends for any reason,
//! every pending call fails at once: [`Error::PeerUnresponsive`] when the
//! heartbeat found the peer silent, [`Error::Closed`] otherwise.
//!
//! [`Connection::open_stream`] opens a call that streams (see
//! `streams/`): registered like a call, its receiver owns it.
//!
//! Not here: the read/write loops and the heartbeat timer (`driver.rs`), TLS
//! and `Hello` (`transport.rs`), reconnects (the client crate).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, Instrument};

use crate::calls::incoming::Dispatch;
use crate::calls::outgoing::REQUEST_OVERHEAD;
use crate::config::ConnectionConfig;
use crate::driver::Driver;
use crate::error::Error;
use crate::frame::{frame_len, Frame, Hello};
use crate::heartbeat::Heartbeat;
use crate::identity::{LazyIdentity, PeerIdentity};
use crate::lifecycle::{CloseCause, Stage};
use crate::metadata::Metadata;
use crate::metered::{ByteClocks, Metered};
use crate::outbound::{Outbound, CONTROL_QUEUE};
use crate::shared::{debug_spans_wanted, DriverEvents, Shared};
use crate::streams::handles::{CallEnd, StreamReceiver, StreamSender};

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
        let removed = self.shared.state().calls.remove(self.id);
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
        self.shared.stage().ending()
    }

    /// True when new calls can still be made here (not closed, no `GoAway`).
    ///
    /// One atomic load, no lock: asked before every call. (A call made as a
    /// `GoAway` arrives is refused under the connection's lock with
    /// [`Error::GoAway`].)
    pub fn is_usable(&self) -> bool {
        self.shared.stage().usable()
    }

    /// Calls made here that have not been answered yet.
    pub fn pending_calls(&self) -> usize {
        self.shared.state().calls.len()
    }

    /// Bytes received and sent on this connection so far (on the socket:
    /// TLS records included), in that order.
    pub fn bytes(&self) -> (u64, u64) {
        self.shared.clocks.get().map_or((0, 0), |c| c.bytes())
    }

    /// True when `other` is a handle of this same connection (not another
    /// connection to the same peer).
    pub fn same(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.close_reason()
    }

    /// Waits until the driver has finished closing the connection.
    pub async fn closed(&self) {
        self.shared.wait_for(Stage::closed).await
    }

    /// True once the peer has sent `GoAway` (an atomic load: cheap enough to
    /// ask each time the task running the driver is polled).
    pub fn goaway_received(&self) -> bool {
        self.shared.stage().peer_goaway()
    }

    /// True once the connection has begun to end (closed here, or its
    /// driver is finishing); an atomic load, like
    /// [`goaway_received`](Connection::goaway_received).
    pub fn is_ending(&self) -> bool {
        self.shared.stage().ending()
    }

    /// Completes when no new call can be made here: the connection is ending,
    /// or the peer sent `GoAway` (calls in flight may still finish).
    pub async fn unusable(&self) {
        self.shared.wait_for(|stage| !stage.usable()).await
    }

    /// Ends the connection now: pending calls fail, handlers are cancelled.
    pub fn close(&self) {
        self.shared.close(CloseCause::ClosedHere);
    }

    /// Starts a graceful drain: sends `GoAway`, refuses new calls from the
    /// peer with `ShuttingDown`, and closes once running handlers finish.
    pub fn drain(&self) {
        self.shared.drain();
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
    pub fn call<'a>(
        &'a self,
        method: &'a str,
        body: Bytes,
        timeout: Duration,
    ) -> impl Future<Output = Result<Bytes, Error>> + Send + 'a {
        // The same future as `call_with_metadata`, not one wrapped around
        // it: a call's future is moved whole, so every layer costs.
        self.call_with_metadata(method, body, timeout, Metadata::new())
    }

    /// Like [`call`](Self::call), sending `metadata` with the request
    /// (checked here: see [`crate::metadata`]).
    pub fn call_with_metadata<'a>(
        &'a self,
        method: &'a str,
        body: Bytes,
        timeout: Duration,
        metadata: Metadata,
    ) -> impl Future<Output = Result<Bytes, Error>> + Send + 'a {
        let call = self.call_inner(method, body, timeout, metadata);
        // A span no subscriber wants is not entered: entering and leaving it
        // on every poll still costs (more when a dependency turns on
        // tracing's `log` feature, as tarpc does in the benchmark). Either
        // way the call's future is this one, not one wrapped around it.
        let span = if debug_spans_wanted() {
            // The id is recorded once taken (under the connection's lock).
            tracing::debug_span!("call", method, id = tracing::field::Empty, peer = %self.shared.peer)
        } else {
            tracing::Span::none()
        };
        if span.is_disabled() {
            futures_util::future::Either::Left(call)
        } else {
            futures_util::future::Either::Right(call.instrument(span))
        }
    }

    async fn call_inner(
        &self,
        method: &str,
        body: Bytes,
        timeout: Duration,
        metadata: Metadata,
    ) -> Result<Bytes, Error> {
        if !metadata.is_empty() {
            metadata.check().map_err(Error::Metadata)?;
        }
        let deadline_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        // Exact sizing walks the whole frame; only requests near the limit
        // need it. Each metadata entry adds two lengths (at most 10 bytes).
        let near_limit =
            body.len() + method.len() + metadata.size() + 10 * metadata.len() + REQUEST_OVERHEAD
                > self.shared.max_send;
        // The id is taken under the lock, where the request is queued: ids
        // then reach the peer in increasing order, which a `Drain`'s
        // `last_id` relies on (a call waiting for a slot is the exception:
        // see `Error::NotSent`).
        let mut frame = Frame::Request {
            // The largest id until then, so the size check below is never
            // short (ids are variable-length on the wire).
            id: u64::MAX,
            method: method.to_owned(),
            deadline_ms: Some(deadline_ms),
            metadata,
            body,
        };
        if near_limit {
            frame_len(&frame, self.shared.max_send)?;
        }
        let deadline = Instant::now() + timeout;
        let slot = self.shared.call_slots.try_acquire().ok();
        let (tx, rx) = oneshot::channel();
        let (id, move_timer, unsent) = {
            let mut state = self.shared.state();
            if let Some(cause) = state.life.cause() {
                return Err(not_sent(cause.error()));
            }
            if let Some(reason) = &state.peer_goaway {
                return Err(Error::GoAway {
                    reason: reason.clone(),
                });
            }
            let id = state.next_id;
            state.next_id += 1;
            if let Frame::Request { id: slot, .. } = &mut frame {
                *slot = id;
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
            let move_timer = state
                .calls
                .insert(id, tx, deadline, timeout, unsent.is_none());
            (id, move_timer, unsent)
        };
        if debug_spans_wanted() {
            tracing::Span::current().record("id", id);
        }
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
                            Err(_) => return Err(not_sent(self.shared.closed_error())),
                        },
                    };
                    if self.shared.outbound.send(frame).await.is_err() {
                        return Err(not_sent(self.shared.closed_error()));
                    }
                    self.shared.state().calls.mark_sent(id);
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

impl Connection {
    /// Opens a stream call to `method` (see [`crate::streams`]): returns once
    /// its `Open` is queued, with the receiver of the callee's items and
    /// final reply, and a sender when `sends_stream`. `timeout` covers the
    /// whole call; dropping the receiver before the reply cancels it.
    pub async fn open_stream(
        &self,
        method: &str,
        body: Bytes,
        timeout: Duration,
        metadata: Metadata,
        sends_stream: bool,
    ) -> Result<(Option<StreamSender>, StreamReceiver), Error> {
        if !metadata.is_empty() {
            metadata.check().map_err(Error::Metadata)?;
        }
        let deadline = Instant::now() + timeout;
        let mut frame = Frame::Open {
            id: u64::MAX,
            method: method.to_owned(),
            deadline_ms: Some(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)),
            metadata,
            body,
            sends_stream,
        };
        frame_len(&frame, self.shared.max_send)?;
        // A slot of the peer's `max_in_flight`, held until the `Response`.
        match tokio::time::timeout_at(deadline, self.shared.call_slots.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            Ok(Err(_)) => return Err(not_sent(self.shared.closed_error())),
            Err(_) => return Err(Error::DeadlineExceeded(timeout)),
        }
        let (tx, rx) = oneshot::channel();
        let opened = {
            let mut state = self.shared.state();
            let refused = match (&state.life.cause(), &state.peer_goaway) {
                (Some(cause), _) => Some(not_sent(cause.error())),
                (None, Some(reason)) => Some(Error::GoAway {
                    reason: reason.clone(),
                }),
                (None, None) => None,
            };
            match refused {
                Some(e) => Err(e),
                None => {
                    let id = state.next_id;
                    state.next_id += 1;
                    if let Frame::Open { id: slot, .. } = &mut frame {
                        *slot = id;
                    }
                    self.shared
                        .streams
                        .open(id, true, sends_stream, Instant::now());
                    let unsent = self.shared.outbound.try_push(frame).err().map(|(_, f)| f);
                    let move_timer =
                        state
                            .calls
                            .insert(id, tx, deadline, timeout, unsent.is_none());
                    Ok((id, unsent, move_timer))
                }
            }
        };
        let (id, unsent, move_timer) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                self.shared.call_slots.add_permits(1);
                return Err(e);
            }
        };
        if move_timer {
            self.shared.events.raise(DriverEvents::DEADLINE);
        }
        // From here the receiver owns the call: dropping it cancels.
        let receiver = StreamReceiver::new(
            self.shared.clone(),
            id,
            Some(CallEnd {
                reply: rx,
                pending: true,
                slot: true,
            }),
        );
        let sender = sends_stream.then(|| StreamSender::new(self.shared.clone(), id, true));
        if let Some(frame) = unsent {
            match tokio::time::timeout_at(deadline, self.shared.outbound.send(frame)).await {
                Ok(Ok(())) => self.shared.state().calls.mark_sent(id),
                Ok(Err(_)) => return Err(not_sent(self.shared.closed_error())),
                Err(_) => return Err(Error::DeadlineExceeded(timeout)),
            }
        }
        debug!(id, method, "stream opened");
        self.shared.probe_rtt();
        Ok((sender, receiver))
    }
}

/// A close error for a call whose request never entered the write queue.
fn not_sent(error: Error) -> Error {
    Error::NotSent {
        reason: error.to_string(),
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
    let shared = Arc::new(Shared::new(
        Outbound::new(config.outbound_queue),
        Outbound::new(CONTROL_QUEUE),
        peer,
        LazyIdentity::new(peer_cert),
        peer_hello,
        max_send,
        heartbeat.interval(),
    ));
    let _ = shared.clocks.set(clocks.clone());
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
