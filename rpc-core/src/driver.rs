//! The connection driver: one loop, one task per connection, that wires
//! the reader, the rules, the calls both ways, the writer and the one timer.
//! The same code for both sides.
//!
//! ```text
//!   mailbox (close, drain, ping, re-arm) ─┐
//!   timer (heartbeat, call deadlines) ────┤
//!   reader ─► frame ─► rules.rs ─► verdict┼─► calls/outgoing (Response)
//!                                         ├─► calls/incoming (Request, Open, Cancel)
//!                                         ├─► streams (Data, Credit, End, Reset)
//!                                         ├─► heartbeat (Ping, Pong)
//!                                         └─► lifecycle (GoAway, violation)
//!   writer (writer.rs), polled here after the reader and every 8th frame
//! ```
//!
//! - The timer is armed at the [`Heartbeat`]'s next deadline or the
//!   earliest deadline of this side's own pending calls, which it fails
//!   with `DeadlineExceeded` (and a `Cancel` to the peer) when they pass.
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
//! (`transport.rs`), the rules themselves (`rules.rs`, `heartbeat.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use crate::calls::incoming::{deadline_of, Dispatch, Incoming, ServedCalls};
use crate::calls::Side;
use crate::config::ConnectionConfig;
use crate::error::{escape_peer_text, Error, MAX_PEER_REASON};
use crate::frame::Frame;
use crate::heartbeat::{Action, Heartbeat, PingVerdict};
use crate::lifecycle::CloseCause;
use crate::metadata::Metadata;
use crate::metered::ByteClocks;
use crate::reader::FrameReader;
use crate::rules::{PartialFrameWatch, RequestVerdict, Rules};
use crate::shared::{DriverEvents, Shared};
use crate::streams::handles::{ServedStream, StreamReceiver, StreamSender};
use crate::writer::{write_loop, FrameWriter, StallWatch};

/// Frames the reader decodes in a row before the writer gets a turn: the
/// peer starts on the first replies while this side decodes the rest (the
/// value was chosen by measurement; see bench/RESULTS.md).
const WRITE_EVERY: u64 = 8;

pub(crate) struct Driver {
    shared: Arc<Shared>,
    /// The calls this side serves; `None` on a client.
    served: Option<ServedCalls>,
    rules: Rules,
    /// When the bytes of the frames being handled were read: a request's
    /// deadline counts from there, with no clock read per request.
    arrived: Instant,
    max_recv: usize,
    close_timeout: Duration,
    heartbeat: Heartbeat,
    timer: std::pin::Pin<Box<Sleep>>,
    /// Frames decoded so far, to tell one slow frame from many quick ones.
    frames_decoded: u64,
    partial: PartialFrameWatch,
    write_stall_timeout: Duration,
    /// The highest request id received, for the `Drain` frame.
    last_request_id: u64,
}

impl Driver {
    pub(crate) fn new(
        shared: Arc<Shared>,
        config: &ConnectionConfig,
        dispatch: Option<Arc<dyn Dispatch>>,
        heartbeat: Heartbeat,
    ) -> Self {
        let first = arm(&shared, heartbeat.next_deadline());
        let side = match dispatch {
            Some(_) => Side::Server,
            None => Side::Client,
        };
        Driver {
            shared,
            served: dispatch.map(|d| ServedCalls::new(d, config.max_depth)),
            rules: Rules::new(side, config.max_in_flight),
            arrived: Instant::now(),
            max_recv: config.max_frame,
            close_timeout: config.close_timeout,
            timer: Box::pin(tokio::time::sleep_until(first)),
            heartbeat,
            frames_decoded: 0,
            partial: PartialFrameWatch {
                timeout: config.partial_frame_timeout,
                since: None,
            },
            write_stall_timeout: config.write_stall_timeout,
            last_request_id: 0,
        }
    }

    fn side(&self) -> Side {
        match self.served {
            Some(_) => Side::Server,
            None => Side::Client,
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
            self.shared.streams.clone(),
            self.side(),
            StallWatch {
                clocks: clocks.clone(),
                timeout: self.write_stall_timeout,
            },
        );
        // The writer runs inside this task, polled by the loop below after
        // the reader: replies to a burst of requests are written together,
        // and no other task is woken to write them.
        let mut writer = Box::pin(writer);
        let mut writer_done = false;
        let cause = 'run: loop {
            let mut next = tokio::select! {
                biased;
                raised = std::future::poll_fn(|cx| self.shared.events.poll(cx)) => {
                    if raised & DriverEvents::SHUTDOWN != 0 {
                        break CloseCause::ClosedHere;
                    }
                    if raised & DriverEvents::DRAIN != 0 {
                        // Requests above `last_id` were not taken: the
                        // ones still coming are refused (`ShuttingDown`)
                        // and any not read before the close may go
                        // elsewhere.
                        self.send_control(Frame::Drain {
                            last_id: self.last_request_id,
                            reason: "server shutting down".into(),
                        });
                        info!(last_id = self.last_request_id, "draining: sent Drain (a graceful GoAway)");
                        match &self.served {
                            // Closes once the calls it serves are done
                            // (the branch below).
                            Some(served) => {
                                served.handlers.close();
                            }
                            None => break CloseCause::Drained,
                        }
                    }
                    if raised & DriverEvents::PING != 0 {
                        let nonce = self.heartbeat.ping_now(Instant::now());
                        self.send_control(Frame::Ping { nonce });
                    }
                    if raised & DriverEvents::STREAMS != 0 {
                        self.flush_stream_control();
                    }
                    if raised & (DriverEvents::PING | DriverEvents::DEADLINE) != 0 {
                        self.reset_timer();
                    }
                    continue;
                }
                _ = &mut self.timer => {
                    let mid = reader.mid_frame();
                    if let Err(waited) = self.partial.check(Instant::now(), mid, self.frames_decoded) {
                        break CloseCause::PeerBrokeProtocol(format!(
                            "frame not completed within {waited:?} (partial-frame deadline)"
                        ));
                    }
                    self.shared.expire_calls(Instant::now());
                    self.heartbeat.received(clocks.last_read());
                    self.heartbeat.sent(clocks.last_written());
                    match self.heartbeat.poll(Instant::now()) {
                        Action::PeerDead(silent) => {
                            warn!(?silent, "peer unresponsive: closing");
                            break CloseCause::PeerUnresponsive(silent);
                        }
                        Action::SendPing(nonce) => self.send_control(Frame::Ping { nonce }),
                        Action::Nothing => {}
                    }
                    self.reset_timer();
                    continue;
                }
                // Only once the tracker is closed, which the DRAIN event
                // does after sending GoAway.
                _ = drained(&self.served), if self.served.is_some() && self.shared.stage().draining() => {
                    break CloseCause::Drained;
                }
                // Reading pauses while this side's own replies exceed the
                // outbound queue, until the writer catches up (a peer that
                // sends calls but does not read the replies).
                next = reader.next(), if !self.shared.outbound.over_capacity() => next,
                res = &mut writer => {
                    writer_done = true;
                    break writer_stopped(res);
                }
            };
            self.arrived = clocks.last_read();
            // Frames already in the read buffer are taken one after another
            // without the select above: the events and the timer are
            // looked at once per read, not once per frame.
            loop {
                let frame = match next {
                    None => break 'run CloseCause::PeerClosed("peer closed the connection".into()),
                    Some(Err(Error::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        break 'run CloseCause::PeerClosed(
                            "peer closed the connection without TLS close_notify".into(),
                        );
                    }
                    Some(Err(Error::Io(e))) => {
                        break 'run CloseCause::Io(format!("read failed: {e}"))
                    }
                    Some(Err(e)) => break 'run CloseCause::PeerBrokeProtocol(e.to_string()),
                    Some(Ok(frame)) => frame,
                };
                self.frames_decoded += 1;
                if let Err(reason) = self.on_frame(frame) {
                    break 'run CloseCause::PeerBrokeProtocol(reason);
                }
                // A long run of frames read (the reader is polled first and
                // stays ready while the socket has bytes) must not hold back
                // what is already queued: the writer gets a turn every
                // WRITE_EVERY frames, so the peer starts on the first
                // replies (or calls) while this side decodes the rest,
                // instead of both sides taking turns with whole bursts.
                if self.frames_decoded % WRITE_EVERY == 0 {
                    let turn = std::future::poll_fn(|cx| {
                        Poll::Ready(std::future::Future::poll(writer.as_mut(), cx))
                    })
                    .await;
                    if let Poll::Ready(res) = turn {
                        writer_done = true;
                        break 'run writer_stopped(res);
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
        // The first cause wins: `close()` may have come first.
        let cause = self.shared.close(cause);
        if let Some(reason) = cause.goaway_reason() {
            warn!(%reason, "closing connection: peer broke the protocol");
            self.send_control(Frame::GoAway {
                reason: reason.to_owned(),
            });
        }
        // Boxed: the driver's future lives as long as the connection, so
        // its size is memory per connection, and the closing state need
        // not be part of it.
        let reader = cause.awaits_peer_close().then_some(reader);
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

    /// A `Request`, or an `Open` (`sends_stream` given): served, refused,
    /// or the rule it broke.
    fn on_call(
        &mut self,
        id: u64,
        method: String,
        deadline_ms: Option<u32>,
        metadata: Metadata,
        body: Bytes,
        sends_stream: Option<bool>,
    ) -> Result<(), String> {
        self.last_request_id = self.last_request_id.max(id);
        let (running, is_running) = self.served.as_ref().map_or((0, false), |s| s.running(id));
        let stage = self.shared.stage();
        let verdict = self
            .rules
            .request(stage, id, &method, &metadata, running, |_| is_running);
        // The rules refuse every request on a client.
        let Some(served) = self.served.as_mut() else {
            return Err(match verdict {
                RequestVerdict::Violation(reason) => reason,
                _ => "protocol violation: Request sent to a client".into(),
            });
        };
        match verdict {
            RequestVerdict::Serve => {
                let stream = sends_stream.map(|sends| {
                    self.shared.streams.open(id, sends, true, self.arrived);
                    self.shared.probe_rtt();
                    Box::new(ServedStream {
                        receiver: sends.then(|| StreamReceiver::new(self.shared.clone(), id, None)),
                        sender: StreamSender::new(self.shared.clone(), id, false),
                    })
                });
                let call = Incoming {
                    id,
                    method,
                    deadline: deadline_of(self.arrived, deadline_ms),
                    arrived: self.arrived,
                    metadata,
                    body,
                    stream,
                };
                served.serve(&self.shared, call);
            }
            RequestVerdict::Refuse(status) => served.refuse(&self.shared, id, status),
            RequestVerdict::Violation(reason) => return Err(reason),
        }
        Ok(())
    }

    /// Whether stream `id` could be known to the peer: a request id it
    /// sent (server), or one this side chose (client).
    fn opened(&self, id: u64) -> bool {
        match self.side() {
            Side::Server => id != 0 && id <= self.last_request_id,
            Side::Client => id != 0 && id < self.shared.state().next_id,
        }
    }

    /// Queues the stream credit and `Reset`s waiting to be sent; never
    /// dropped, unlike a `Ping` on a full control queue (credit lost would
    /// stall its stream for good).
    fn flush_stream_control(&self) {
        for frame in self.shared.streams.take_control() {
            self.shared.control.send_now(frame);
        }
    }

    /// Acts on one frame; `Err` is a broken rule, for the `GoAway`.
    fn on_frame(&mut self, frame: Frame) -> Result<(), String> {
        match frame {
            Frame::Request {
                id,
                method,
                deadline_ms,
                metadata,
                body,
            } => self.on_call(id, method, deadline_ms, metadata, body, None),
            Frame::Open {
                id,
                method,
                deadline_ms,
                metadata,
                body,
                sends_stream,
            } => self.on_call(id, method, deadline_ms, metadata, body, Some(sends_stream)),
            Frame::Data { id, more, bytes } => {
                let opened = self.opened(id);
                let result = self
                    .shared
                    .streams
                    .on_data(id, more, bytes, opened, self.max_recv);
                self.flush_stream_control();
                result
            }
            Frame::Credit { id, bytes } => {
                let opened = self.opened(id);
                self.shared.streams.on_credit(id, bytes, opened)
            }
            Frame::End { id } => {
                let opened = self.opened(id);
                self.shared.streams.on_end(id, opened)
            }
            Frame::Reset { id } => {
                let opened = self.opened(id);
                self.shared.streams.on_reset(id, opened)
            }
            Frame::Response { id, result } => {
                let waiter = self.shared.state().calls.remove(id);
                match waiter {
                    Some(call) => {
                        let _ = call.tx.send(result.map_err(Error::Status));
                    }
                    None => {
                        let next_id = self.shared.state().next_id;
                        self.rules.unmatched_response(id, next_id)?;
                        debug!(id, "late response ignored");
                    }
                }
                Ok(())
            }
            Frame::Cancel { id } => {
                if !self.served.as_ref().is_some_and(|s| s.cancel(id)) {
                    // Fine if the call finished as the Cancel crossed it.
                    self.rules.unmatched_cancel(id)?;
                }
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
                        let min = self.shared.min_rtt_nanos.load(Ordering::Relaxed);
                        if min == 0 || nanos < min {
                            self.shared.min_rtt_nanos.store(nanos, Ordering::Relaxed);
                        }
                        for waiter in self.shared.ping_waiters().drain(..) {
                            let _ = waiter.send(rtt);
                        }
                        self.reset_timer();
                    }
                    None => debug!(nonce, "pong for no ping in flight: ignored"),
                }
                Ok(())
            }
            Frame::Drain { last_id, reason } => {
                self.shared.peer_drain(last_id);
                self.on_frame(Frame::GoAway { reason })
            }
            Frame::GoAway { reason } => {
                let reason = escape_peer_text(&reason, MAX_PEER_REASON);
                // One line per connection: a peer repeating GoAway must
                // not flood the log.
                if self.shared.peer_goaway(reason.clone()) {
                    info!(%reason, "peer sent GoAway");
                } else {
                    debug!(%reason, "peer sent GoAway again");
                }
                Ok(())
            }
            Frame::Hello(_) => Err(self.rules.second_hello()),
        }
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
        self.shared.fail_all();
        if let Some(served) = &self.served {
            served.handlers.close();
        }
        self.shared.outbound.stop();
        let wait = async {
            if !writer_done {
                let _ = (&mut writer).await;
            }
            drained(&self.served).await;
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
        debug!(%reason, initiator = ?cause.initiator(), "connection closed");
        self.shared.finish();
        reason
    }
}

/// Completes once every served call's task has ended (after the tracker
/// was closed); at once on a client.
async fn drained(served: &Option<ServedCalls>) {
    if let Some(served) = served {
        served.handlers.wait().await;
    }
}

/// When the driver's timer must fire: at `heartbeat` or at the earliest call
/// deadline, whichever comes first; recorded so a caller with an earlier
/// deadline knows to move it.
fn arm(shared: &Shared, heartbeat: Instant) -> Instant {
    let mut state = shared.state();
    let at = state
        .calls
        .earliest()
        .map_or(heartbeat, |d| d.min(heartbeat));
    state.calls.armed = Some(at);
    at
}

/// Why the connection ends when its writer did.
fn writer_stopped(res: Result<(), Error>) -> CloseCause {
    CloseCause::Io(match res {
        Ok(()) => "writer stopped".into(),
        Err(e) => format!("write failed: {e}"),
    })
}
