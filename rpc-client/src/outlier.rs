//! Passive outlier ejection (gRPC's A50, Envoy's consecutive-failure
//! detector): an endpoint whose calls fail several times in a row leaves
//! the pick set for a while, longer each time.
//!
//! ```text
//!  call fails (Unavailable, Internal, DataLoss from the server)
//!    └► 5th in a row? and fewer than max(1, 10 % of endpoints) ejected?
//!         └► ejected for 30 s × ejections (at most 300 s), then rejoins
//!  call succeeds → the count starts again from 0
//! ```
//!
//! - The multiplier forgets: each 30 s an endpoint spends in the set after
//!   its ejection ended takes one off it (A50 decrements it each interval).
//! - A refused call (`Overloaded`, `ShuttingDown`, a bad argument) is the
//!   server working as meant and does not count; neither does a deadline,
//!   which the latency estimate already steers around.
//! - Nor does a lost connection: the endpoint leaves the pick set while it
//!   reconnects, and rejoins as soon as it is back (`endpoint.rs`). A
//!   server restarted after a crash must get calls again at once, not
//!   after an ejection earned by the calls the crash failed.
//! - When every endpoint is ejected or the cap is reached, the picker still
//!   picks among them (`pool.rs`): better a server that may fail than no
//!   call at all.
//!
//! Not here: which endpoints exist and picking (`pool.rs`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Outlier ejection settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutlierSettings {
    /// Failures in a row that eject an endpoint (0: never eject).
    pub(crate) consecutive: u32,
    /// The first ejection's length; the n-th lasts n times this.
    pub(crate) base: Duration,
    /// The longest ejection.
    pub(crate) max: Duration,
    /// The share of endpoints that may be ejected at once, in percent
    /// (at least one endpoint always may).
    pub(crate) max_percent: u32,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive: 5,
            base: Duration::from_secs(30),
            max: Duration::from_secs(300),
            max_percent: 10,
        }
    }
}

impl OutlierSettings {
    /// How many of `endpoints` may be ejected at once.
    pub(crate) fn max_ejected(&self, endpoints: usize) -> usize {
        (endpoints * self.max_percent as usize / 100).max(1)
    }
}

/// One endpoint's failures in a row and ejections.
#[derive(Debug, Default)]
pub(crate) struct Outlier {
    consecutive: AtomicU32,
    /// Set while an ejection may be running, so the picker's check is one
    /// load for an endpoint that is not ejected.
    ejected: AtomicBool,
    ejection: Mutex<Ejection>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Ejection {
    /// Ejected until then (in the past once it ended).
    until: Option<Instant>,
    /// The multiplier when the last ejection began.
    times: u32,
}

impl Outlier {
    fn ejection(&self) -> std::sync::MutexGuard<'_, Ejection> {
        // Plain values: a poisoned lock still holds valid ones.
        self.ejection.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection: failures on the old one do not count against it.
    pub(crate) fn reconnected(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
    }

    /// A call succeeded. (Written only when there was a count to clear, so
    /// the usual call reads the line and leaves it shared.)
    pub(crate) fn success(&self) {
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
    }

    /// A call failed; true when that makes `settings.consecutive` in a row
    /// (the caller then asks the pool whether this one may be ejected).
    pub(crate) fn failure(&self, settings: &OutlierSettings) -> bool {
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        settings.consecutive != 0 && n >= settings.consecutive
    }

    /// True while ejected.
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        if !self.ejected.load(Ordering::Relaxed) {
            return false;
        }
        let ejection = self.ejection();
        let ejected = ejection.until.is_some_and(|until| now < until);
        if !ejected {
            // Under the lock, so an ejection starting now is not undone.
            self.ejected.store(false, Ordering::Relaxed);
        }
        ejected
    }

    /// Ejects this endpoint from `now`; returns for how long. The count of
    /// failures starts again.
    pub(crate) fn eject(&self, settings: &OutlierSettings, now: Instant) -> Duration {
        self.consecutive.store(0, Ordering::Relaxed);
        let mut ejection = self.ejection();
        // One off the multiplier for each `base` spent in the set since
        // the last ejection ended.
        let forgotten = match ejection.until {
            Some(until) if now > until => {
                let quiet = now.duration_since(until).as_secs_f64();
                (quiet / settings.base.as_secs_f64().max(0.001)) as u32
            }
            _ => 0,
        };
        let times = ejection.times.saturating_sub(forgotten).saturating_add(1);
        let length = settings.base.saturating_mul(times).min(settings.max);
        *ejection = Ejection {
            until: Some(now + length),
            times,
        };
        self.ejected.store(true, Ordering::Relaxed);
        length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn five_failures_in_a_row_are_needed() {
        let settings = OutlierSettings::default();
        let o = Outlier::default();
        for _ in 0..4 {
            assert!(!o.failure(&settings));
        }
        o.success();
        for _ in 0..4 {
            assert!(!o.failure(&settings), "a success starts the count again");
        }
        assert!(o.failure(&settings));
    }

    #[test]
    fn ejections_grow_to_the_cap_and_the_multiplier_forgets() {
        let settings = OutlierSettings::default();
        let o = Outlier::default();
        let t0 = Instant::now();
        assert_eq!(o.eject(&settings, t0), 30 * S);
        assert!(o.is_ejected(t0 + 29 * S));
        assert!(!o.is_ejected(t0 + 30 * S), "back after 30 s");
        // Ejected again at once: twice as long.
        assert_eq!(o.eject(&settings, t0 + 30 * S), 60 * S);
        // Ejected again each time it comes back: 90 s, 120 s, ... 300 s.
        let mut at = t0 + 90 * S;
        let mut lengths = vec![];
        for _ in 0..12 {
            let length = o.eject(&settings, at);
            lengths.push(length.as_secs());
            at += length;
        }
        assert_eq!(&lengths[..3], &[90, 120, 150]);
        assert_eq!(lengths[11], 300, "capped at 300 s");
        // Back, and 10 minutes in the set: 20 intervals forgotten.
        assert_eq!(o.eject(&settings, at + 600 * S), 30 * S);
    }

    #[test]
    fn the_share_ejected_is_at_least_one() {
        let settings = OutlierSettings::default();
        assert_eq!(settings.max_ejected(1), 1);
        assert_eq!(settings.max_ejected(3), 1);
        assert_eq!(settings.max_ejected(25), 2);
    }
}
