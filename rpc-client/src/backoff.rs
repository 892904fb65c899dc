//! Exponential backoff with full jitter, for reconnects.
//!
//! Attempt `n` (from 0) waits a uniformly random time in `[0, min(max, base *
//! 2^n)]` ("full jitter", as described in the AWS architecture blog's
//! "Exponential Backoff And Jitter"), so many clients cut off at once do not
//! come back in lockstep. The randomness is std's per-process random hash
//! keys: enough to spread clients, no extra dependency.
//!
//! Not here: what is retried (the client's supervisor decides).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Backoff bounds and the current attempt.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
            random: RandomState::new(),
            draws: 0,
        }
    }

    /// The cap for the current attempt.
    pub(crate) fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The wait before the next attempt; each call moves to the next attempt.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let mut h = self.random.build_hasher();
        h.write_u64(self.draws);
        self.draws += 1;
        let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        cap.mul_f64(unit)
    }

    /// Back to the first attempt (after a success).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn caps_double_up_to_the_maximum() {
        let mut b = Backoff::new(100 * MS, 10_000 * MS);
        let caps: Vec<_> = (0..10)
            .map(|_| {
                let cap = b.cap();
                b.next_wait();
                cap
            })
            .collect();
        assert_eq!(caps[0], 100 * MS);
        assert_eq!(caps[1], 200 * MS);
        assert_eq!(caps[6], 6400 * MS);
        assert_eq!(caps[7], 10_000 * MS);
        assert_eq!(caps[9], 10_000 * MS);
        b.reset();
        assert_eq!(b.cap(), 100 * MS);
    }

    #[test]
    fn waits_are_spread_over_zero_to_cap() {
        let mut b = Backoff::new(100 * MS, 100 * MS);
        let waits: Vec<Duration> = (0..1000).map(|_| b.next_wait()).collect();
        assert!(waits.iter().all(|w| *w <= 100 * MS));
        let low = waits.iter().filter(|w| **w < 50 * MS).count();
        // Uniform: about half below the middle; 1000 draws keep this far
        // from flaky (the chance of leaving 350..650 is below 1e-20).
        assert!((350..650).contains(&low), "{low} of 1000 below 50 ms");
    }

    #[test]
    fn attempts_never_overflow() {
        let mut b = Backoff::new(100 * MS, 10_000 * MS);
        for _ in 0..100 {
            assert!(b.next_wait() <= 10_000 * MS);
        }
    }
}
