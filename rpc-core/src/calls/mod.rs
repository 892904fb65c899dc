//! The calls of one connection: those this side made and waits on
//! ([`outgoing`]), and those it serves for the peer ([`incoming`]).
//!
//! Not here: the frames that carry them (`frame.rs`) or the loop that
//! moves them (`driver.rs`).

use std::hash::Hasher;

pub(crate) mod incoming;
pub(crate) mod outgoing;

/// Which side of the calls a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// Makes calls and serves none.
    Client,
    /// Serves the peer's calls.
    Server,
}

/// Hashes this side's call ids with one multiplication instead of std's
/// SipHash, which costs several times more on every lookup. The
/// table only ever holds ids this side chose (counting up from 0), so a
/// peer cannot pick keys that collide; a peer's `Response` id is only
/// looked up.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used for u64 keys; any byte input still hashes correctly.
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: an odd constant near 2^64 / golden ratio spreads
        // consecutive ids over both the low bits (the bucket) and the high
        // bits (hashbrown's tag byte).
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_hash_to_spread_tags_and_buckets() {
        let hash = |id: u64| {
            let mut h = IdHasher::default();
            h.write_u64(id);
            h.finish()
        };
        // hashbrown takes the bucket from the low bits and a tag byte from
        // the top 7: consecutive ids must vary both (the identity would
        // give every small id the same tag).
        let buckets: std::collections::HashSet<u64> = (0..128).map(|id| hash(id) & 127).collect();
        let tags: std::collections::HashSet<u64> = (0..128).map(|id| hash(id) >> 57).collect();
        assert_eq!(buckets.len(), 128);
        assert!(tags.len() > 64, "{} tags for 128 ids", tags.len());
    }
}
