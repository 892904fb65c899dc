//! A set of established connections: the server's (listed by
//! `srpc.stats`, sampled for metrics) and each `serve` call's (drained and
//! closed by it).
//!
//! Not here: what runs on a connection (`connection_task.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rpc_core::Connection;

struct Entry {
    conn: Connection,
    /// Bytes (received, sent) already reported to the metrics.
    reported: (u64, u64),
}

/// Established connections, by a key of the set's own.
#[derive(Default)]
pub(crate) struct ConnectionSet {
    conns: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
}

impl ConnectionSet {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // Inserts, removes and counters: a poisoned map is still consistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `conn`; returns the key to remove it with.
    pub(crate) fn add(&self, conn: Connection) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns().insert(
            id,
            Entry {
                conn,
                reported: (0, 0),
            },
        );
        id
    }

    /// Removes connection `id`; the bytes (received, sent) it moved since
    /// they were last taken with [`ConnectionSet::unreported_bytes`].
    pub(crate) fn remove(&self, id: u64) -> (u64, u64) {
        self.conns()
            .remove(&id)
            .map_or((0, 0), |mut entry| unreported(&mut entry))
    }

    /// Runs `f` on every connection in the set.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Connection)) {
        self.conns().values().for_each(|e| f(&e.conn));
    }

    /// The bytes (received, sent) the connections moved since the last
    /// time this was asked.
    pub(crate) fn unreported_bytes(&self) -> (u64, u64) {
        self.conns()
            .values_mut()
            .map(unreported)
            .fold((0, 0), |(r, s), (dr, ds)| (r + dr, s + ds))
    }
}

fn unreported(entry: &mut Entry) -> (u64, u64) {
    let (read, written) = entry.conn.bytes();
    let (r0, w0) = std::mem::replace(&mut entry.reported, (read, written));
    (read.saturating_sub(r0), written.saturating_sub(w0))
}
