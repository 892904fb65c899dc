//! The calls this side made and waits on: each one's reply channel, its
//! deadline and whether its `Request` went out (tarpc's
//! `in_flight_requests.rs` is the model).
//!
//! The driver enforces the deadlines with its one timer (armed at the
//! earliest of them and the heartbeat's) instead of a tokio timer per call:
//! registering and removing a timer per call costs more than the rest of
//! the table's work at one call in flight.
//!
//! Not here: sending the `Request` (the handle, `connection.rs`), or the
//! lock the table lives under (`shared.rs`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::calls::IdHasher;
use crate::error::Error;

/// More than a `Request` frame adds to its body, method name and metadata:
/// a variant tag, varint id, lengths and deadline (bincode
/// `DefaultOptions`: at most 35 bytes; a test below checks the bound).
pub(crate) const REQUEST_OVERHEAD: usize = 64;

pub(crate) type Reply = oneshot::Sender<Result<Bytes, Error>>;

/// A call waiting for its `Response`.
pub(crate) struct PendingCall {
    pub(crate) tx: Reply,
    /// When the caller stops waiting.
    pub(crate) deadline: Instant,
    /// The caller's timeout, for the error.
    pub(crate) timeout: Duration,
    /// The `Request` is queued: a caller that gives up tells the peer.
    pub(crate) sent: bool,
}

/// Calls waiting for their `Response`, with their deadlines in order.
#[derive(Default)]
pub(crate) struct CallTable {
    pending: HashMap<u64, PendingCall, BuildHasherDefault<IdHasher>>,
    /// Deadlines in the order the calls were made, which is deadline order
    /// too while every call has the same timeout (the usual case): pushing
    /// one is cheap (a sorted set costs far more per call), and a finished
    /// call's entry is left for `prune` to drop. Its front, if any, is a
    /// waiting call's.
    deadlines: VecDeque<(Instant, u64)>,
    /// Deadlines that came before the last one in `deadlines` (a call with
    /// a shorter timeout than the one before it).
    out_of_order: BTreeSet<(Instant, u64)>,
    /// When the driver's timer fires next; a call due earlier must tell it.
    pub(crate) armed: Option<Instant>,
}

impl CallTable {
    /// Registers call `id` (`sent`: its `Request` is queued already); true
    /// when its deadline comes before the driver's timer, which must then be
    /// moved.
    pub(crate) fn insert(
        &mut self,
        id: u64,
        tx: Reply,
        deadline: Instant,
        timeout: Duration,
        sent: bool,
    ) -> bool {
        if self
            .deadlines
            .back()
            .is_none_or(|&(last, _)| deadline >= last)
        {
            self.deadlines.push_back((deadline, id));
        } else {
            self.out_of_order.insert((deadline, id));
        }
        self.pending.insert(
            id,
            PendingCall {
                tx,
                deadline,
                timeout,
                sent,
            },
        );
        self.armed.is_none_or(|at| deadline < at)
    }

    pub(crate) fn mark_sent(&mut self, id: u64) {
        if let Some(call) = self.pending.get_mut(&id) {
            call.sent = true;
        }
    }

    /// How many calls wait for their `Response`.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Takes call `id` out, if it still waits.
    pub(crate) fn remove(&mut self, id: u64) -> Option<PendingCall> {
        let call = self.pending.remove(&id)?;
        if !self.out_of_order.is_empty() {
            self.out_of_order.remove(&(call.deadline, id));
        }
        self.prune();
        Some(call)
    }

    /// Drops finished calls' entries from the front of `deadlines`, and
    /// all of them once they outnumber the waiting calls (a call that waits
    /// long keeps those behind it from reaching the front): each entry is
    /// dropped once, so this is constant time per call on average.
    fn prune(&mut self) {
        while let Some(&(_, id)) = self.deadlines.front() {
            if self.pending.contains_key(&id) {
                break;
            }
            self.deadlines.pop_front();
        }
        if self.deadlines.len() > 2 * self.pending.len() + 64 {
            let pending = &self.pending;
            self.deadlines.retain(|(_, id)| pending.contains_key(id));
        }
    }

    /// The earliest deadline of a waiting call.
    pub(crate) fn earliest(&self) -> Option<Instant> {
        let in_order = self.deadlines.front().map(|&(at, _)| at);
        let other = self.out_of_order.first().map(|&(at, _)| at);
        match (in_order, other) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes out every call whose deadline is at or before `now`.
    pub(crate) fn take_expired(&mut self, now: Instant) -> Vec<(u64, PendingCall)> {
        let mut expired = Vec::new();
        while let Some(at) = self.earliest() {
            if at > now {
                break;
            }
            let id = match self.out_of_order.first() {
                Some(&(first, id)) if first == at => {
                    self.out_of_order.pop_first();
                    id
                }
                _ => match self.deadlines.pop_front() {
                    Some((_, id)) => id,
                    None => break,
                },
            };
            if let Some(call) = self.pending.remove(&id) {
                expired.push((id, call));
            }
            self.prune();
        }
        expired
    }

    pub(crate) fn take_all(&mut self) -> HashMap<u64, PendingCall, BuildHasherDefault<IdHasher>> {
        self.deadlines.clear();
        self.out_of_order.clear();
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{frame_len, Frame};
    use crate::metadata::Metadata;

    #[test]
    fn request_overhead_bounds_every_request_header() {
        // The largest header short of 4 GiB lengths: the largest id and
        // deadline, and lengths that need 5-byte varints.
        let method = "m".repeat(70_000);
        let body = Bytes::from(vec![7u8; 70_000]);
        let frame = Frame::Request {
            id: u64::MAX,
            method: method.clone(),
            deadline_ms: Some(u32::MAX),
            metadata: Metadata::new(),
            body: body.clone(),
        };
        let len = frame_len(&frame, usize::MAX).map_err(|e| e.to_string());
        let header = len.map(|len| len - method.len() - body.len());
        assert!(
            header.as_ref().is_ok_and(|&h| h <= REQUEST_OVERHEAD),
            "{header:?}"
        );
    }

    #[test]
    fn the_call_table_keeps_the_earliest_deadline_through_any_order() {
        // Against a model (id -> deadline): calls with one timeout and
        // with shorter ones, finished in a scrambled order, expired in
        // batches; the earliest deadline must always be the model's, and
        // finished calls' entries must not pile up.
        let start = Instant::now();
        let mut table = CallTable::default();
        let mut model = std::collections::BTreeMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut clock = 0u64;
        for id in 0..5_000u64 {
            clock += next() % 3;
            let timeout = match next() % 10 {
                0 => 5,
                1 => 2_000,
                _ => 30,
            };
            let deadline = start + Duration::from_millis(clock + timeout);
            let (tx, _rx) = oneshot::channel();
            table.insert(id, tx, deadline, Duration::from_millis(timeout), true);
            model.insert(id, deadline);
            // Finish a random waiting call about as often as one starts.
            if next() % 2 == 0 {
                let pick = *model
                    .keys()
                    .nth((next() % model.len() as u64) as usize)
                    .unwrap();
                assert!(table.remove(pick).is_some());
                model.remove(&pick);
            }
            if id % 97 == 0 {
                let now = start + Duration::from_millis(clock);
                let mut got: Vec<u64> = table
                    .take_expired(now)
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect();
                let mut want: Vec<u64> = model
                    .iter()
                    .filter(|(_, &d)| d <= now)
                    .map(|(&id, _)| id)
                    .collect();
                got.sort_unstable();
                want.sort_unstable();
                assert_eq!(got, want, "expired at call {id}");
                model.retain(|_, d| *d > now);
            }
            assert_eq!(
                table.earliest(),
                model.values().min().copied(),
                "after call {id}"
            );
            assert_eq!(table.pending.len(), model.len());
            assert!(
                table.deadlines.len() <= 2 * model.len() + 65,
                "{} entries for {} calls",
                table.deadlines.len(),
                model.len()
            );
        }
        assert_eq!(table.take_all().len(), model.len());
        assert_eq!(table.earliest(), None);
    }
}
