//! A set of established connections: the server's (listed by
//! `srpc.stats`) and each `serve` call's (drained and closed by it).
//!
//! Not here: what runs on a connection (`connection_task.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rpc_core::Connection;

/// Established connections, by a key of the set's own.
#[derive(Default)]
pub(crate) struct ConnectionSet {
    conns: Mutex<HashMap<u64, Connection>>,
    next_id: AtomicU64,
}

impl ConnectionSet {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Connection>> {
        // Inserts and removes only: a poisoned map is still consistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `conn`; returns the key to remove it with.
    pub(crate) fn add(&self, conn: Connection) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns().insert(id, conn);
        id
    }

    pub(crate) fn remove(&self, id: u64) {
        self.conns().remove(&id);
    }

    /// Runs `f` on every connection in the set.
    pub(crate) fn for_each(&self, f: impl FnMut(&Connection)) {
        self.conns().values().for_each(f);
    }
}
