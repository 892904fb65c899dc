//! The liveness contract as a state machine without I/O.
//!
//! The connection driver owns one [`Heartbeat`], tells it when bytes were
//! last received and sent, and asks it at [`Heartbeat::next_deadline`] what
//! to do: send a ping, declare the peer dead, or nothing.
//!
//! ```text
//!                 any byte received ──► last_recv = now
//!                 any byte sent     ──► last_sent = now
//! poll(now):  now - last_recv >= timeout   ──► PeerDead
//!             now - last_sent >= interval  ──► SendPing(nonce)
//!             otherwise                    ──► Nothing
//! Pong(nonce) matching a recent ping       ──► RTT sample; any other Pong ignored
//! Ping from the peer: takes a token (8 at most, one back per half of our
//!             announced interval); none left ──► strike;
//!             3 strikes in a row ──► TooManyPings (GoAway, close)
//! ```
//!
//! A ping goes out whenever this side has sent nothing for an interval, even
//! if earlier pings are unanswered: the ping is also the peer's proof that we
//! are alive, and its `Pong` may be stuck behind a large frame the peer is
//! still writing.
//!
//! Negotiation: each side pings at `max(own, min(peer's, own_timeout / 2))`.
//! It never pings faster than the peer announced (the gRPC `too_many_pings`
//! trap), unless the peer announced more than half of our timeout: a peer
//! cannot switch off our dead-peer detection by announcing a huge interval.
//! The timeout is never stretched. Two peers whose interval is shorter than
//! the other's timeout, the sane case, never trip each other's flood check.
//!
//! The burst allowance is there because arrival times lie: pings a peer sent
//! on time can queue in its socket buffer behind a large frame and arrive
//! together. A real flood empties the bucket at once and is cut off after
//! 8 + 3 pings.
//!
//! Liveness counts bytes, not frames: a 4 MiB frame crawling in over a slow
//! link keeps the peer alive. Every `Instant` comes from the caller, so the
//! logic is tested with plain instants and no sleeps.

use std::time::Duration;

use tokio::time::Instant;

/// Consecutive too-early pings that get a peer cut off.
pub const MAX_PING_STRIKES: u32 = 3;

/// Pings a peer may send at once before pacing applies (see module docs).
pub const PING_BURST: u32 = 8;

/// Unanswered pings remembered for RTT samples; older ones are forgotten.
const REMEMBERED_PINGS: usize = 8;

/// What the driver should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing is due.
    Nothing,
    /// Send `Ping { nonce }`.
    SendPing(u64),
    /// Nothing was received for the given time: close, failing pending calls.
    PeerDead(Duration),
}

/// What to do with a `Ping` the peer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingVerdict {
    /// Answer with a `Pong` at once.
    Answer,
    /// The peer pings far more often than allowed: `GoAway("too many pings")`.
    TooManyPings,
}

/// Heartbeat state of one connection.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    /// Our announced interval: pings closer together than half of it strike.
    own_interval: Duration,
    last_recv: Instant,
    last_sent: Instant,
    /// Recent unanswered pings: nonce and when each was queued.
    in_flight: std::collections::VecDeque<(u64, Instant)>,
    next_nonce: u64,
    rtt: Option<Duration>,
    /// Pings the peer may still send before pacing applies.
    ping_tokens: u32,
    /// When the last token was credited.
    tokens_at: Instant,
    strikes: u32,
}

impl Heartbeat {
    /// A heartbeat for our `interval`/`timeout` and the interval the peer
    /// announced in its `Hello`.
    pub fn new(
        now: Instant,
        interval: Duration,
        timeout: Duration,
        peer_interval: Duration,
    ) -> Self {
        let effective = interval.max(peer_interval.min(timeout / 2));
        Heartbeat {
            interval: effective,
            timeout,
            own_interval: interval,
            last_recv: now,
            last_sent: now,
            in_flight: std::collections::VecDeque::new(),
            next_nonce: 1,
            rtt: None,
            ping_tokens: PING_BURST,
            tokens_at: now,
            strikes: 0,
        }
    }

    /// The interval this side pings at.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The silence after which the peer is dead.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Bytes arrived at `at`.
    pub fn received(&mut self, at: Instant) {
        self.last_recv = self.last_recv.max(at);
    }

    /// Bytes were written at `at`.
    pub fn sent(&mut self, at: Instant) {
        self.last_sent = self.last_sent.max(at);
    }

    /// When [`poll`](Heartbeat::poll) has something to say next, at the
    /// latest.
    pub fn next_deadline(&self) -> Instant {
        (self.last_recv + self.timeout).min(self.last_sent + self.interval)
    }

    /// What is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Action {
        let silent = now.saturating_duration_since(self.last_recv);
        if silent >= self.timeout {
            return Action::PeerDead(silent);
        }
        if now.saturating_duration_since(self.last_sent) >= self.interval {
            return Action::SendPing(self.ping_now(now));
        }
        Action::Nothing
    }

    /// Starts a ping now (the driver's timer, or an explicit request) and
    /// returns its nonce. Counts as sending, so the next timer ping is an
    /// interval away.
    pub fn ping_now(&mut self, now: Instant) -> u64 {
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        if self.in_flight.len() == REMEMBERED_PINGS {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back((nonce, now));
        self.sent(now);
        nonce
    }

    /// A `Pong` arrived. Returns the round-trip time when it answers a recent
    /// ping (and forgets that ping and older ones); a pong for a ping never
    /// sent, or answered already, is ignored.
    pub fn pong(&mut self, nonce: u64, now: Instant) -> Option<Duration> {
        let i = self.in_flight.iter().position(|(n, _)| *n == nonce)?;
        let (_, sent) = self.in_flight[i];
        self.in_flight.drain(..=i);
        let rtt = now.saturating_duration_since(sent);
        self.rtt = Some(rtt);
        Some(rtt)
    }

    /// The latest round-trip time, once a ping was answered.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// A `Ping` arrived from the peer at `now`.
    pub fn peer_ping(&mut self, now: Instant) -> PingVerdict {
        let per_token = (self.own_interval / 2).max(Duration::from_millis(1));
        let earned =
            now.saturating_duration_since(self.tokens_at).as_nanos() / per_token.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.ping_tokens = self.ping_tokens.saturating_add(earned).min(PING_BURST);
            self.tokens_at += per_token.saturating_mul(earned);
        }
        if self.ping_tokens > 0 {
            self.ping_tokens -= 1;
            self.strikes = 0;
            return PingVerdict::Answer;
        }
        self.strikes += 1;
        if self.strikes >= MAX_PING_STRIKES {
            PingVerdict::TooManyPings
        } else {
            PingVerdict::Answer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn hb(t0: Instant) -> Heartbeat {
        Heartbeat::new(t0, 5 * S, 15 * S, 5 * S)
    }

    #[test]
    fn pings_after_interval_of_sending_nothing() {
        let t0 = Instant::now();
        let mut h = hb(t0);
        assert_eq!(h.poll(t0 + 4 * S), Action::Nothing);
        assert_eq!(h.next_deadline(), t0 + 5 * S);
        assert_eq!(h.poll(t0 + 5 * S), Action::SendPing(1));
        assert_eq!(h.poll(t0 + 9 * S), Action::Nothing);
        // Unanswered, the next ping still goes an interval later: the peer
        // needs our bytes to know we are alive.
        assert_eq!(h.poll(t0 + 10 * S), Action::SendPing(2));
    }

    #[test]
    fn sending_data_postpones_the_ping() {
        let t0 = Instant::now();
        let mut h = hb(t0);
        h.sent(t0 + 3 * S);
        assert_eq!(h.poll(t0 + 5 * S), Action::Nothing);
        assert_eq!(h.next_deadline(), t0 + 8 * S);
        assert_eq!(h.poll(t0 + 8 * S), Action::SendPing(1));
    }

    #[test]
    fn peer_is_dead_after_timeout_of_silence_and_not_before() {
        let t0 = Instant::now();
        let mut h = hb(t0);
        h.received(t0 + 10 * S);
        assert!(!matches!(h.poll(t0 + 24 * S), Action::PeerDead(_)));
        assert_eq!(h.poll(t0 + 25 * S), Action::PeerDead(15 * S));
    }

    #[test]
    fn any_bytes_received_keep_the_peer_alive() {
        let t0 = Instant::now();
        let mut h = hb(t0);
        for sec in 1..100 {
            h.received(t0 + sec * S);
            h.sent(t0 + sec * S);
            assert_eq!(h.poll(t0 + sec * S), Action::Nothing, "at {sec} s");
        }
    }

    #[test]
    fn pong_gives_rtt_and_unknown_pongs_are_ignored() {
        let t0 = Instant::now();
        let mut h = hb(t0);
        let Action::SendPing(n) = h.poll(t0 + 5 * S) else {
            panic!("no ping")
        };
        assert_eq!(h.pong(n + 7, t0 + 6 * S), None);
        assert_eq!(h.rtt(), None);
        let ms = Duration::from_millis(3);
        assert_eq!(h.pong(n, t0 + 5 * S + ms), Some(ms));
        assert_eq!(h.rtt(), Some(ms));
        // The same pong again is not a second sample.
        assert_eq!(h.pong(n, t0 + 7 * S), None);
        assert_eq!(h.rtt(), Some(ms));
    }

    #[test]
    fn pings_no_faster_than_the_peer_announced() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(t0, S, 15 * S, 5 * S);
        assert_eq!(h.interval(), 5 * S);
        assert_eq!(h.timeout(), 15 * S);
        assert_eq!(h.poll(t0 + 4 * S), Action::Nothing);
        assert_eq!(h.poll(t0 + 5 * S), Action::SendPing(1));
    }

    #[test]
    fn a_huge_announced_interval_cannot_switch_off_detection() {
        let t0 = Instant::now();
        let day = 86_400 * S;
        let mut h = Heartbeat::new(t0, S, 3 * S, 49 * day);
        assert_eq!(h.interval(), 1500 * Duration::from_millis(1));
        assert_eq!(h.timeout(), 3 * S);
        assert_eq!(
            h.poll(t0 + 1500 * Duration::from_millis(1)),
            Action::SendPing(1)
        );
        assert_eq!(h.poll(t0 + 3 * S), Action::PeerDead(3 * S));
    }

    #[test]
    fn a_late_pong_for_an_older_ping_still_measures() {
        let t0 = Instant::now();
        let mut h = hb(t0);
        let a = h.ping_now(t0);
        let b = h.ping_now(t0 + S);
        assert_eq!(h.pong(a, t0 + 2 * S), Some(2 * S));
        assert_eq!(h.pong(b, t0 + 3 * S), Some(2 * S));
        assert_eq!(h.pong(b, t0 + 4 * S), None);
    }

    #[test]
    fn a_flood_is_cut_after_the_burst_and_three_strikes() {
        let t0 = Instant::now();
        let mut h = hb(t0);
        let ms = Duration::from_millis;
        let verdicts: Vec<_> = (0..11u32).map(|i| h.peer_ping(t0 + ms(10) * i)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == PingVerdict::Answer));
        assert_eq!(verdicts[10], PingVerdict::TooManyPings);
    }

    #[test]
    fn pings_bunched_behind_a_large_frame_are_tolerated() {
        // Sent every 500 ms, but 8 arrive together after a slow upload.
        let t0 = Instant::now();
        let mut h = Heartbeat::new(
            t0,
            500 * Duration::from_millis(1),
            1500 * Duration::from_millis(1),
            500 * Duration::from_millis(1),
        );
        for i in 0..8u32 {
            let at = t0 + 4 * S + i * Duration::from_micros(100);
            assert_eq!(h.peer_ping(at), PingVerdict::Answer, "ping {i}");
        }
    }

    #[test]
    fn pings_at_the_allowed_pace_never_strike() {
        let t0 = Instant::now();
        let mut h = hb(t0);
        for i in 0..50u32 {
            assert_eq!(h.peer_ping(t0 + i * 5 * S), PingVerdict::Answer);
        }
        // An early ping now and then is forgiven by the next on-time one.
        let mut h = hb(t0);
        let ms = Duration::from_millis;
        for i in 0..20u64 {
            let base = t0 + Duration::from_secs(10 * i);
            assert_eq!(h.peer_ping(base), PingVerdict::Answer);
            assert_eq!(h.peer_ping(base + ms(10)), PingVerdict::Answer);
        }
    }
}
