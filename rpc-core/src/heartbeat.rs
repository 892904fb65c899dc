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
//!             now - last_sent >= interval  ──► SendPing(nonce)  (one at a time)
//!             otherwise                    ──► Nothing
//! Pong(nonce) matching the ping in flight  ──► RTT sample; any other Pong ignored
//! Ping from the peer sooner than half our announced interval ──► strike;
//!             3 strikes in a row ──► TooManyPings (GoAway, close)
//! ```
//!
//! Negotiation: both sides ping at the *effective* interval, the larger of
//! their own and the peer's announced one, so neither pings faster than the
//! other allows (the gRPC `too_many_pings` trap). When the peer's interval is
//! the larger, the dead-peer timeout grows by the difference, so a silence the
//! peer is entitled to is never taken for death.
//!
//! Liveness counts bytes, not frames: a 4 MiB frame crawling in over a slow
//! link keeps the peer alive. Every `Instant` comes from the caller, so the
//! logic is tested with plain instants and no sleeps.

use std::time::Duration;

use tokio::time::Instant;

/// Consecutive too-early pings that get a peer cut off.
pub const MAX_PING_STRIKES: u32 = 3;

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
    in_flight: Option<(u64, Instant)>,
    next_nonce: u64,
    rtt: Option<Duration>,
    last_peer_ping: Option<Instant>,
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
        let effective = interval.max(peer_interval);
        Heartbeat {
            interval: effective,
            timeout: timeout + (effective - interval),
            own_interval: interval,
            last_recv: now,
            last_sent: now,
            in_flight: None,
            next_nonce: 1,
            rtt: None,
            last_peer_ping: None,
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
        let dead_at = self.last_recv + self.timeout;
        if self.in_flight.is_some() {
            dead_at
        } else {
            dead_at.min(self.last_sent + self.interval)
        }
    }

    /// What is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Action {
        let silent = now.saturating_duration_since(self.last_recv);
        if silent >= self.timeout {
            return Action::PeerDead(silent);
        }
        if self.in_flight.is_none()
            && now.saturating_duration_since(self.last_sent) >= self.interval
        {
            return Action::SendPing(self.start_ping(now));
        }
        Action::Nothing
    }

    /// Starts a ping now (the driver's timer, or an explicit request) and
    /// returns its nonce; `None` while one is already in flight.
    pub fn ping_now(&mut self, now: Instant) -> Option<u64> {
        self.in_flight.is_none().then(|| self.start_ping(now))
    }

    fn start_ping(&mut self, now: Instant) -> u64 {
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.in_flight = Some((nonce, now));
        nonce
    }

    /// A `Pong` arrived. Returns the round-trip time when it answers the ping
    /// in flight; a pong for a ping never sent is ignored.
    pub fn pong(&mut self, nonce: u64, now: Instant) -> Option<Duration> {
        match self.in_flight {
            Some((n, sent)) if n == nonce => {
                self.in_flight = None;
                let rtt = now.saturating_duration_since(sent);
                self.rtt = Some(rtt);
                Some(rtt)
            }
            _ => None,
        }
    }

    /// The latest round-trip time, once a ping was answered.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// A `Ping` arrived from the peer at `now`.
    pub fn peer_ping(&mut self, now: Instant) -> PingVerdict {
        let too_soon = self
            .last_peer_ping
            .is_some_and(|last| now.saturating_duration_since(last) < self.own_interval / 2);
        self.last_peer_ping = Some(now);
        if too_soon {
            self.strikes += 1;
        } else {
            self.strikes = 0;
        }
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
        // One ping at a time.
        assert_eq!(h.poll(t0 + 11 * S), Action::Nothing);
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
    fn pings_at_the_peers_larger_interval_with_a_timeout_to_match() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(t0, S, 3 * S, 10 * S);
        assert_eq!(h.interval(), 10 * S);
        assert_eq!(h.timeout(), 12 * S);
        assert_eq!(h.poll(t0 + 9 * S), Action::Nothing);
        assert_eq!(h.poll(t0 + 10 * S), Action::SendPing(1));
    }

    #[test]
    fn three_early_pings_in_a_row_are_too_many() {
        let t0 = Instant::now();
        let mut h = hb(t0);
        let ms = Duration::from_millis;
        assert_eq!(h.peer_ping(t0), PingVerdict::Answer);
        assert_eq!(h.peer_ping(t0 + ms(100)), PingVerdict::Answer); // strike 1
        assert_eq!(h.peer_ping(t0 + ms(200)), PingVerdict::Answer); // strike 2
        assert_eq!(h.peer_ping(t0 + ms(300)), PingVerdict::TooManyPings);
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
