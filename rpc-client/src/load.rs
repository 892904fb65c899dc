//! An endpoint's load as the picker sees it: the Peak-EWMA of its call
//! latency times its calls in flight plus one (Finagle's and
//! linkerd2-proxy's load metric).
//!
//! ```text
//!  sample s at time t (elapsed e since the last one, decay τ = 10 s):
//!    s > estimate  → estimate = s                    (peaks count at once)
//!    otherwise     → estimate = estimate·w + s·(1-w),
//!                    w = min(exp(-e/τ), 0.95)
//!  read at time t:   estimate·exp(-e/τ) × (in flight + 1)
//! ```
//!
//! - Peaks win at once, so an endpoint that slows down loses traffic on its
//!   next reply, not after many; the estimate then decays, so an endpoint
//!   that was slow is tried again within seconds of going quiet.
//! - Unlike Finagle's, each lower sample moves the estimate at least 5 %
//!   of the way toward it. With a purely time-based weight, an endpoint
//!   answering thousands of calls a second keeps one hiccup (several ms on
//!   a loaded machine) in its estimate for seconds, and the in-flight
//!   factor multiplies it, so a slow endpoint looks no worse. With the step
//!   a peak fades within tens of samples; a rise still counts at once
//!   (figures in `docs/balancing.md`).
//! - Before its first reply an endpoint's estimate is its connection's
//!   heartbeat RTT, or 1 ms before a `Pong` has come back.
//! - The in-flight factor reacts within a call: an endpoint that holds
//!   calls (stalled, overloaded) gets fewer new ones before any latency is
//!   measured.
//!
//! Not here: choosing between endpoints (`pool.rs`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How fast an estimate forgets: a sample's weight falls to 1/e after this.
pub(crate) const DECAY: Duration = Duration::from_secs(10);

/// The least a lower sample moves the estimate toward itself.
pub(crate) const MIN_STEP: f64 = 0.05;

/// The estimate of an endpoint nothing has been measured on yet.
pub(crate) const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// One endpoint's calls in flight and latency estimate, in atomics: the
/// picker reads two endpoints' on every call. Two calls ending at once may
/// each write the estimate from the same old one, so one of the two
/// samples is lost; an estimate of recent latency can afford that.
#[derive(Debug)]
pub(crate) struct Load {
    in_flight: AtomicU32,
    /// The estimate in nanoseconds (`f64` bits); 0 until the first sample.
    nanos: AtomicU64,
    /// When it was last written, in nanoseconds since `epoch`.
    at: AtomicU64,
    epoch: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// Nanoseconds; 0 until the first sample.
    nanos: f64,
    at: Instant,
}

impl Estimate {
    /// The estimate decayed to `now`.
    fn at(self, now: Instant) -> f64 {
        self.nanos * weight(now.saturating_duration_since(self.at))
    }
}

/// exp(-elapsed/τ): how much of an estimate is left after `elapsed`.
fn weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

impl Load {
    pub(crate) fn new(now: Instant) -> Self {
        Load {
            in_flight: AtomicU32::new(0),
            nanos: AtomicU64::new(0.0f64.to_bits()),
            at: AtomicU64::new(0),
            epoch: now,
        }
    }

    fn estimate(&self) -> Estimate {
        Estimate {
            nanos: f64::from_bits(self.nanos.load(Ordering::Relaxed)),
            at: self.epoch + Duration::from_nanos(self.at.load(Ordering::Relaxed)),
        }
    }

    fn set_estimate(&self, nanos: f64, at: Instant) {
        let since =
            u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        self.nanos.store(nanos.to_bits(), Ordering::Relaxed);
        self.at.store(since, Ordering::Relaxed);
    }

    /// A call starts on this endpoint.
    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A call started with [`start`](Load::start) was given up before it
    /// ended: no longer in flight, and nothing learnt.
    pub(crate) fn abandon(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// A call started with [`start`](Load::start) ended after `latency`
    /// (failed calls too: a call that took long to fail was slow).
    pub(crate) fn finish(&self, latency: Duration, now: Instant) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let sample = latency.as_nanos() as f64;
        let old = self.estimate();
        let next = if old.nanos == 0.0 || sample > old.nanos {
            sample
        } else {
            let w = weight(now.saturating_duration_since(old.at)).min(1.0 - MIN_STEP);
            old.nanos * w + sample * (1.0 - w)
        };
        self.set_estimate(next, now);
    }

    /// The latency estimate at `now`, once a call has been measured.
    pub(crate) fn latency(&self, now: Instant) -> Option<Duration> {
        let estimate = self.estimate();
        (estimate.nanos != 0.0).then(|| Duration::from_nanos(estimate.at(now) as u64))
    }

    /// Forgets the latency measured (a new connection: perhaps a new
    /// server process); calls still in flight keep counting.
    pub(crate) fn forget_latency(&self) {
        self.nanos.store(0.0f64.to_bits(), Ordering::Relaxed);
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The load at `now`; `rtt` (the connection's heartbeat RTT) stands in
    /// for the estimate until a call has been measured.
    pub(crate) fn cost(&self, now: Instant, rtt: impl FnOnce() -> Option<Duration>) -> f64 {
        let estimate = self.estimate();
        let latency = if estimate.nanos == 0.0 {
            rtt().unwrap_or(DEFAULT_RTT).as_nanos() as f64
        } else {
            estimate.at(now)
        };
        latency * f64::from(self.in_flight() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_peak_counts_at_once_and_then_decays() {
        let t0 = Instant::now();
        let load = Load::new(t0);
        load.start();
        load.finish(MS, t0);
        assert_eq!(load.cost(t0, || None), 1e6);
        load.start();
        load.finish(20 * MS, t0 + MS);
        assert_eq!(load.cost(t0 + MS, || None), 20e6, "the peak, at once");
        // After τ with no sample, 1/e of it is left.
        let later = load.cost(t0 + MS + DECAY, || None);
        assert!((later - 20e6 / std::f64::consts::E).abs() < 1.0, "{later}");
    }

    #[test]
    fn lower_samples_pull_the_estimate_down_by_their_age() {
        let t0 = Instant::now();
        let load = Load::new(t0);
        load.start();
        load.finish(10 * MS, t0);
        // A fast reply right after the slow one moves it 5 % of the way...
        load.start();
        load.finish(MS, t0 + MS);
        let cost = load.cost(t0 + MS, || None);
        assert!((cost - 9.55e6).abs() < 1e3, "{cost}");
        // ...one a whole τ later moves it most of the way.
        load.start();
        load.finish(MS, t0 + MS + DECAY);
        let cost = load.cost(t0 + MS + DECAY, || None);
        assert!(cost < 5e6 && cost > 1e6, "{cost}");
    }

    #[test]
    fn calls_in_flight_multiply_and_the_rtt_seeds() {
        let t0 = Instant::now();
        let load = Load::new(t0);
        assert_eq!(load.cost(t0, || None), DEFAULT_RTT.as_nanos() as f64);
        assert_eq!(
            load.cost(t0, || Some(3 * MS)),
            3e6,
            "the heartbeat RTT seeds"
        );
        load.start();
        load.start();
        assert_eq!(load.in_flight(), 2);
        assert_eq!(load.cost(t0, || Some(3 * MS)), 9e6);
        load.finish(2 * MS, t0);
        assert_eq!(
            load.cost(t0, || Some(3 * MS)),
            4e6,
            "measured now: 2 ms × 2"
        );
    }
}
