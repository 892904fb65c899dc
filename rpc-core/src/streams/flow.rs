//! Flow-control credit without I/O: how much a stream's receiver lets its
//! sender send, when it grants more, and how its window grows.
//!
//! ```text
//!  sender: credit ── Data(n) ──► receiver: receive(n)  (n > credit: violation)
//!          ▲                                consume(n) by the application
//!          └───────── Credit(grant) ◄────── once half the window was consumed
//! ```
//!
//! Credit is counted in `Data` payload bytes, per stream and for the whole
//! connection (h2's and QUIC's two levels). The receiver grants credit only
//! for bytes the application has taken, in batches of half a window (h2's
//! WINDOW_UPDATE rule), so a slow consumer stops its producer after one
//! window, and the receiver buffers at most one window per stream.
//!
//! The window grows on fast, long links: when half of it was consumed in
//! less than two round trips since the last grant, the link could carry
//! more than the window per round trip, and the window doubles, up to its
//! cap (yamux's auto-tuning; hyper's BDP estimate serves the same end).
//! The round trip is the heartbeat's.
//!
//! Not here: the table of a connection's streams (`streams/mod.rs`) or the
//! frames that carry credit (`frame.rs`).

use std::time::Duration;

use tokio::time::Instant;

/// Largest `Data` payload: a `Pong` or a small call waits behind at most
/// one such piece per active stream (h2's default frame size is 16 KiB;
/// 64 KiB is the write size the benchmark's raw-TLS baseline uses).
pub const CHUNK: usize = 64 * 1024;

/// Largest `Data` payload when it holds a whole item: [`CHUNK`] and 64
/// bytes, so an item of 64 KiB with its few bytes of encoding (a file read
/// of 64 KiB, say) travels as one piece, not as 64 KiB and a tail.
pub const MAX_PIECE: usize = CHUNK + 64;

/// Credit a new stream starts with in each direction: 1 MiB, sixteen
/// chunks, enough to fill a 1 Gbit/s link at 8 ms round trip before the
/// window grows (yamux starts at 256 KiB, h2 at 64 KiB, the latter a
/// well-known throughput trap).
pub const STREAM_WINDOW: u64 = 1 << 20;

/// Largest window a stream grows to: 16 MiB, hyper's cap for its adaptive
/// window (2.7 Gbit/s at 50 ms).
pub const MAX_STREAM_WINDOW: u64 = 16 << 20;

/// Credit a connection starts with for all of its streams together: 16
/// MiB, what one stream at its largest window may use.
pub const CONNECTION_WINDOW: u64 = 16 << 20;

/// Largest connection window: 64 MiB, four streams at their largest.
pub const MAX_CONNECTION_WINDOW: u64 = 64 << 20;

/// Credit a sender may hold at once; a peer granting more breaks the
/// protocol (h2 caps its windows at 2^31 - 1 for the same reason).
pub const MAX_CREDIT: u64 = 1 << 32;

/// The receiving side of one stream's (or the connection's) credit.
#[derive(Debug, Clone)]
pub(crate) struct RecvWindow {
    window: u64,
    max: u64,
    /// Bytes the peer may still send.
    credit: u64,
    /// Bytes the application took that were not granted back yet.
    consumed: u64,
    /// When credit was last granted (or the window opened).
    last_grant: Instant,
}

impl RecvWindow {
    pub(crate) fn new(window: u64, max: u64, now: Instant) -> Self {
        RecvWindow {
            window,
            max,
            credit: window,
            consumed: 0,
            last_grant: now,
        }
    }

    /// The peer sent `n` bytes; `Err(credit)` when that is more than it
    /// was allowed.
    pub(crate) fn receive(&mut self, n: u64) -> Result<(), u64> {
        if n > self.credit {
            return Err(self.credit);
        }
        self.credit -= n;
        Ok(())
    }

    /// The application took `n` bytes; the credit to grant now, if any.
    pub(crate) fn consume(&mut self, n: u64, now: Instant, rtt: Option<Duration>) -> Option<u64> {
        self.consumed += n;
        if self.consumed < self.window / 2 {
            return None;
        }
        let mut grant = std::mem::take(&mut self.consumed);
        if let Some(rtt) = rtt {
            let fast = now.saturating_duration_since(self.last_grant) < 2 * rtt;
            if fast && self.window < self.max {
                let grown = (self.window * 2).min(self.max);
                grant += grown - self.window;
                self.window = grown;
            }
        }
        self.last_grant = now;
        self.credit += grant;
        Some(grant)
    }

    /// The window now.
    #[cfg(test)]
    pub(crate) fn window(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_is_granted_in_batches_of_half_a_window_and_only_once_consumed() {
        let t0 = Instant::now();
        let mut w = RecvWindow::new(1000, 1000, t0);
        assert_eq!(w.receive(1000), Ok(()));
        assert_eq!(w.receive(1), Err(0), "beyond the credit");
        assert_eq!(w.consume(499, t0, None), None);
        assert_eq!(w.consume(1, t0, None), Some(500));
        assert_eq!(w.receive(500), Ok(()));
        assert_eq!(w.receive(1), Err(0));
        // Received but not consumed: no credit, however long it waits.
        assert_eq!(w.consume(0, t0 + Duration::from_secs(60), None), None);
    }

    #[test]
    fn the_window_doubles_when_half_is_used_within_two_round_trips() {
        let t0 = Instant::now();
        let rtt = Some(Duration::from_millis(50));
        let mut w = RecvWindow::new(1 << 20, 4 << 20, t0);
        let half = 512 * 1024;
        // Half the window in 60 ms (< 100 ms): doubles, and the grant
        // carries the extra.
        w.receive(half).unwrap();
        assert_eq!(
            w.consume(half, t0 + Duration::from_millis(60), rtt),
            Some(half + (1 << 20))
        );
        assert_eq!(w.window(), 2 << 20);
        w.receive(1 << 20).unwrap();
        assert_eq!(
            w.consume(1 << 20, t0 + Duration::from_millis(100), rtt),
            Some(3 << 20)
        );
        assert_eq!(w.window(), 4 << 20, "at its cap");
        w.receive(2 << 20).unwrap();
        assert_eq!(
            w.consume(2 << 20, t0 + Duration::from_millis(120), rtt),
            Some(2 << 20)
        );
        assert_eq!(w.window(), 4 << 20, "never past its cap");
        // A slow consumer (half a window in more than two round trips)
        // keeps the window as it is.
        let mut slow = RecvWindow::new(1 << 20, 4 << 20, t0);
        slow.receive(half).unwrap();
        assert_eq!(
            slow.consume(half, t0 + Duration::from_millis(150), rtt),
            Some(half)
        );
        assert_eq!(slow.window(), 1 << 20);
        // No round trip measured yet: no growth.
        let mut unknown = RecvWindow::new(1 << 20, 4 << 20, t0);
        unknown.receive(half).unwrap();
        assert_eq!(unknown.consume(half, t0, None), Some(half));
    }

    #[test]
    fn a_sender_never_holds_more_than_the_window_whatever_the_pattern() {
        // Whatever order receive and consume come in, the bytes the peer
        // may send plus those buffered never exceed the window.
        let t0 = Instant::now();
        let mut w = RecvWindow::new(4096, 4096, t0);
        let mut buffered = 0u64;
        let mut sent_ok = 0u64;
        for step in 0..10_000u64 {
            let n = (step * 7919) % 1500;
            if step % 3 == 0 {
                let take = buffered.min(n);
                buffered -= take;
                w.consume(take, t0, None);
            } else if w.receive(n).is_ok() {
                buffered += n;
                sent_ok += n;
            }
            assert!(w.credit + buffered <= 4096, "step {step}");
        }
        assert!(sent_ok > 100_000, "credit kept flowing: {sent_ok}");
    }
}
