//! What a connection's handle (`connection.rs`) and its driver
//! (`driver.rs`) share: the outbound queues, the one lock over the
//! connection's [`Lifecycle`] and pending calls, and the driver's mailbox.
//!
//! ```text
//!  Connection::call ──lock──► ConnectionState { life, peer_goaway, calls }
//!  driver (Response, deadline, close) ──lock──┘      │ every change
//!                                                    ▼
//!                                  Stage byte (lock-free reads) + wake waiters
//! ```
//!
//! Not here: what the stages mean (`lifecycle.rs`), the pending-call table
//! itself (`calls/outgoing.rs`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use crate::calls::outgoing::CallTable;
use crate::error::Error;
use crate::frame::{Frame, Hello};
use crate::identity::LazyIdentity;
use crate::lifecycle::{CloseCause, Lifecycle, Stage};
use crate::outbound::Outbound;
use crate::streams::StreamTable;

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
    /// Stream credit or a `Reset` waits to be sent.
    pub(crate) const STREAMS: u8 = 16;

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

/// The state a call must see whole: the stage, the peer's `GoAway`, and
/// the calls waiting for replies. A call is registered only while the
/// connection takes new calls, under the same lock that closes it, so no
/// call is left waiting on a connection that has ended.
pub(crate) struct ConnectionState {
    pub(crate) life: Lifecycle,
    /// The reason in the peer's `GoAway`, once it sent one.
    pub(crate) peer_goaway: Option<String>,
    /// The peer drained: it ran none of this side's requests above this id.
    pub(crate) peer_last_id: Option<u64>,
    /// The id the next call takes. Under the lock, where requests are
    /// queued, so ids reach the peer in increasing order.
    pub(crate) next_id: u64,
    pub(crate) calls: CallTable,
}

pub(crate) struct Shared {
    pub(crate) outbound: Arc<Outbound>,
    pub(crate) control: Arc<Outbound>,
    state: Mutex<ConnectionState>,
    /// [`ConnectionState`]'s stage, for reads without the lock.
    stage: AtomicU8,
    /// Woken on every change of `stage`.
    stage_changed: Notify,
    /// What the driver is asked to do: close, drain, ping, re-arm its timer.
    pub(crate) events: DriverEvents,
    pub(crate) peer: SocketAddr,
    pub(crate) identity: LazyIdentity,
    pub(crate) peer_hello: Hello,
    pub(crate) max_send: usize,
    /// One permit per call the peer serves at once (its `Hello`).
    pub(crate) call_slots: Semaphore,
    pub(crate) ping_waiters: Mutex<Vec<oneshot::Sender<Duration>>>,
    /// Latest round-trip time in nanoseconds; 0 until the first pong.
    pub(crate) rtt_nanos: AtomicU64,
    /// The smallest round-trip time measured, in nanoseconds; 0 until the
    /// first pong. Stream windows grow by it: a sample taken behind a
    /// busy stream's data measures the queue, and growing by that would
    /// grow the queue further.
    pub(crate) min_rtt_nanos: AtomicU64,
    pub(crate) heartbeat_interval: Duration,
    /// The connection's streams: credit and received items.
    pub(crate) streams: Arc<StreamTable>,
    /// A ping was asked for to measure the round trip for stream windows.
    rtt_probed: AtomicBool,
    /// When bytes last moved, and how many (set once the driver starts).
    pub(crate) clocks: std::sync::OnceLock<Arc<crate::metered::ByteClocks>>,
}

impl Shared {
    pub(crate) fn new(
        outbound: Outbound,
        control: Outbound,
        peer: SocketAddr,
        identity: LazyIdentity,
        peer_hello: Hello,
        max_send: usize,
        heartbeat_interval: Duration,
    ) -> Self {
        Shared {
            outbound: Arc::new(outbound),
            control: Arc::new(control),
            state: Mutex::new(ConnectionState {
                life: Lifecycle::Open,
                peer_goaway: None,
                peer_last_id: None,
                next_id: 1,
                calls: CallTable::default(),
            }),
            stage: AtomicU8::new(Lifecycle::Open.stage(false).0),
            stage_changed: Notify::new(),
            events: DriverEvents::default(),
            peer,
            identity,
            peer_hello,
            max_send,
            call_slots: Semaphore::new(
                (peer_hello.max_in_flight as usize).min(Semaphore::MAX_PERMITS),
            ),
            ping_waiters: Mutex::new(Vec::new()),
            rtt_nanos: AtomicU64::new(0),
            min_rtt_nanos: AtomicU64::new(0),
            heartbeat_interval,
            streams: Arc::new(StreamTable::new(Instant::now())),
            rtt_probed: AtomicBool::new(false),
            clocks: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, ConnectionState> {
        // Plain inserts, removes and assignments only: a poisoned state is
        // still consistent, so keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stage, without the lock.
    pub(crate) fn stage(&self) -> Stage {
        Stage(self.stage.load(Ordering::Acquire))
    }

    /// Publishes `state`'s stage (called with the lock held, after a
    /// change) and wakes whoever waits for one.
    fn publish(&self, state: &ConnectionState) {
        let stage = state.life.stage(state.peer_goaway.is_some());
        self.stage.store(stage.0, Ordering::Release);
        self.stage_changed.notify_waiters();
    }

    /// Waits until the stage satisfies `done`.
    pub(crate) async fn wait_for(&self, done: impl Fn(Stage) -> bool) {
        loop {
            let changed = self.stage_changed.notified();
            tokio::pin!(changed);
            // Registered before the look, so a change in between wakes it.
            changed.as_mut().enable();
            if done(self.stage()) {
                return;
            }
            changed.await;
        }
    }

    pub(crate) fn ping_waiters(&self) -> MutexGuard<'_, Vec<oneshot::Sender<Duration>>> {
        self.ping_waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts ending the connection with `cause` (the first cause given is
    /// kept) and tells the driver. Returns the cause in force.
    pub(crate) fn close(&self, cause: CloseCause) -> CloseCause {
        let kept = {
            let mut state = self.state();
            if state.life.close(cause) {
                self.publish(&state);
            }
            state
                .life
                .cause()
                .cloned()
                .unwrap_or(CloseCause::ClosedHere)
        };
        self.events.raise(DriverEvents::SHUTDOWN);
        kept
    }

    /// Starts draining (from `Open` only); true when it did, and the driver
    /// is told to send `GoAway`.
    pub(crate) fn drain(&self) -> bool {
        let mut state = self.state();
        if !state.life.drain() {
            return false;
        }
        self.publish(&state);
        drop(state);
        self.events.raise(DriverEvents::DRAIN);
        true
    }

    /// The peer sent `GoAway`: this side makes no new call here. True the
    /// first time.
    pub(crate) fn peer_goaway(&self, reason: String) -> bool {
        let mut state = self.state();
        let first = state.peer_goaway.is_none();
        state.peer_goaway = Some(reason);
        self.publish(&state);
        first
    }

    /// The peer drained, having taken this side's requests up to
    /// `last_id`.
    pub(crate) fn peer_drain(&self, last_id: u64) {
        self.state().peer_last_id = Some(last_id);
    }

    /// The driver has finished: the connection is closed.
    pub(crate) fn finish(&self) {
        let mut state = self.state();
        state.life.finish();
        self.publish(&state);
    }

    /// Fails every pending call with the cause the connection ends with.
    pub(crate) fn fail_all(&self) {
        let (pending, error, last_id) = {
            let mut state = self.state();
            let cause = state
                .life
                .cause()
                .cloned()
                .unwrap_or(CloseCause::ClosedHere);
            (state.calls.take_all(), cause, state.peer_last_id)
        };
        self.streams.close(error.describe());
        for (id, call) in pending {
            let error = match last_id {
                // The peer drained and never took this request: it may go
                // elsewhere.
                Some(last) if id > last => Error::NotSent {
                    reason: format!("the peer drained before taking it; {}", error.error()),
                },
                _ => error.error(),
            };
            let _ = call.tx.send(Err(error));
        }
        self.ping_waiters().clear();
    }

    /// Fails every call whose deadline has passed, telling the peer to stop
    /// those it was sent.
    pub(crate) fn expire_calls(&self, now: Instant) {
        let expired = self.state().calls.take_expired(now);
        for (id, call) in expired {
            debug!(id, "call deadline passed");
            if call.sent {
                let _ = self.outbound.try_send(Frame::Cancel { id });
            }
            let _ = call.tx.send(Err(Error::DeadlineExceeded(call.timeout)));
        }
    }

    /// A stream opened before any round trip was measured: one `Ping` now,
    /// once per connection (stream windows grow with the round trip; the
    /// peer allows a burst of pings, see `heartbeat.rs`, and more than one
    /// here could spend it).
    pub(crate) fn probe_rtt(&self) {
        if self.rtt_nanos.load(Ordering::Relaxed) == 0
            && !self.rtt_probed.swap(true, Ordering::AcqRel)
        {
            self.events.raise(DriverEvents::PING);
        }
    }

    /// What a call fails with once the connection has ended.
    pub(crate) fn closed_error(&self) -> Error {
        match self.state().life.cause() {
            Some(cause) => cause.error(),
            None => Error::Closed {
                reason: "connection closed".into(),
            },
        }
    }

    /// Why the connection ended, once it began to.
    pub(crate) fn close_reason(&self) -> Option<String> {
        self.state().life.cause().map(CloseCause::describe)
    }
}

/// Whether a subscriber may want `debug` spans at all. Building a span costs
/// even when nobody records it (more when a dependency turns on tracing's
/// `log` feature), on every call on both sides; this is two loads.
pub(crate) fn debug_spans_wanted() -> bool {
    tracing::Level::DEBUG <= tracing::level_filters::STATIC_MAX_LEVEL
        && tracing::Level::DEBUG <= tracing::level_filters::LevelFilter::current()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::tests::CountWakes;
    use std::sync::Arc;
    use std::task::Poll;

    #[test]
    fn driver_events_are_seen_once_and_wake_the_driver() {
        let events = DriverEvents::default();
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

    #[tokio::test]
    async fn stage_waiters_wake_on_the_change_they_wait_for() {
        let hello = crate::transport::hello_for(&crate::ConnectionConfig::default());
        let shared = Arc::new(Shared::new(
            Outbound::new(4),
            Outbound::new(4),
            "127.0.0.1:9".parse().unwrap(),
            LazyIdentity::new(None),
            hello,
            1024,
            Duration::from_secs(5),
        ));
        let unusable = tokio::spawn({
            let shared = shared.clone();
            async move { shared.wait_for(|s| !s.usable()).await }
        });
        let closed = tokio::spawn({
            let shared = shared.clone();
            async move { shared.wait_for(Stage::closed).await }
        });
        tokio::task::yield_now().await;
        assert!(shared.peer_goaway("bye".into()));
        assert!(
            !shared.peer_goaway("bye again".into()),
            "the first one counts"
        );
        unusable.await.unwrap();
        assert!(!closed.is_finished());
        let kept = shared.close(CloseCause::PeerUnresponsive(Duration::from_secs(2)));
        assert_eq!(kept, CloseCause::PeerUnresponsive(Duration::from_secs(2)));
        assert_eq!(
            shared.close(CloseCause::ClosedHere),
            kept,
            "the first cause stays"
        );
        shared.finish();
        closed.await.unwrap();
        assert!(matches!(shared.closed_error(), Error::PeerUnresponsive(_)));
    }
}
