//! What the server hands each connection's driver: the user's router, plus
//! the framework's reserved methods and the server-wide counters.
//!
//! ```text
//! Request ─► authorize(ctx)? ─no─► the hook's Status (PermissionDenied)
//!    └─► "srpc.list"? ─yes─► services, methods, argument and reply types
//!    └─► "srpc.stats"? ─yes─► StatsSnapshot (connections, calls, errors, RTTs)
//!                 └─no──► Router (user methods)
//! ```
//!
//! The driver updates [`CallCounters`] as calls start, end and are refused;
//! `handler.rs` registers each live connection here so stats can list peers
//! and their heartbeat RTTs.
//!
//! Not here: method routing itself (`router.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use rpc_core::connection::BoxFuture;
use rpc_core::service::LIST_METHOD;
use rpc_core::stats::{CallCounters, PeerStats, StatsSnapshot, STATS_METHOD};
use rpc_core::{codec, CallContext, Connection, Dispatch, Status};

use crate::Router;

/// Decides per call whether the peer may make it (see
/// `ServerBuilder::authorize`).
pub(crate) type Authorize = Arc<dyn Fn(&CallContext) -> Result<(), Status> + Send + Sync>;

pub(crate) struct ServerDispatch {
    router: Router,
    authorize: Option<Authorize>,
    counters: CallCounters,
    connections: Mutex<HashMap<u64, Connection>>,
    next_id: AtomicU64,
}

impl ServerDispatch {
    pub(crate) fn new(router: Router, authorize: Option<Authorize>) -> Self {
        ServerDispatch {
            router,
            authorize,
            counters: CallCounters::default(),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    fn connections(&self) -> MutexGuard<'_, HashMap<u64, Connection>> {
        // Inserts and removes only; a poisoned map is still consistent.
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists a live connection; returns the key to remove it with.
    pub(crate) fn register(&self, conn: Connection) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.connections().insert(id, conn);
        id
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.connections().remove(&id);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let mut peers: Vec<PeerStats> = self
            .connections()
            .values()
            .map(|c| PeerStats {
                addr: c.peer_addr().to_string(),
                rtt_us: c
                    .rtt()
                    .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            })
            .collect();
        peers.sort_by(|a, b| a.addr.cmp(&b.addr));
        StatsSnapshot {
            connections: peers.len() as u64,
            calls_in_flight: self.counters.in_flight(),
            calls_served: self.counters.served(),
            errors: self.counters.errors(),
            peers,
        }
    }
}

impl Dispatch for ServerDispatch {
    fn dispatch(&self, ctx: CallContext, body: Bytes) -> BoxFuture<Result<Bytes, Status>> {
        if let Some(authorize) = &self.authorize {
            if let Err(status) = authorize(&ctx) {
                return Box::pin(async move { Err(status) });
            }
        }
        if ctx.method == LIST_METHOD {
            let reply = codec::encode(&self.router.describe(), usize::MAX)
                .map_err(|e| Status::internal(format!("listing did not encode: {e}")));
            return Box::pin(async move { reply });
        }
        if ctx.method == STATS_METHOD {
            let reply = codec::encode(&self.snapshot(), usize::MAX)
                .map_err(|e| Status::internal(format!("stats did not encode: {e}")));
            return Box::pin(async move { reply });
        }
        self.router.dispatch(ctx, body)
    }

    fn counters(&self) -> Option<&CallCounters> {
        Some(&self.counters)
    }
}
