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

use std::sync::Arc;

use bytes::Bytes;
use rpc_core::connection::BoxFuture;
use rpc_core::service::LIST_METHOD;
use rpc_core::stats::{CallCounters, PeerStats, StatsSnapshot, STATS_METHOD};
use rpc_core::{codec, CallContext, Dispatch, Status};

use crate::handler::ConnectionSet;
use crate::Router;

/// Decides per call whether the peer may make it (see
/// `ServerBuilder::authorize`).
pub(crate) type Authorize = Arc<dyn Fn(&CallContext) -> Result<(), Status> + Send + Sync>;

pub(crate) struct ServerDispatch {
    router: Router,
    authorize: Option<Authorize>,
    counters: CallCounters,
    /// Every live connection, for stats (`handler.rs` adds and removes).
    pub(crate) connections: ConnectionSet,
}

impl ServerDispatch {
    pub(crate) fn new(router: Router, authorize: Option<Authorize>) -> Self {
        ServerDispatch {
            router,
            authorize,
            counters: CallCounters::default(),
            connections: ConnectionSet::default(),
        }
    }

    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let mut peers = Vec::new();
        self.connections.for_each(|c| {
            peers.push(PeerStats {
                addr: c.peer_addr().to_string(),
                rtt_us: c
                    .rtt()
                    .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            })
        });
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
        if ctx.method() == LIST_METHOD {
            let reply = codec::encode(&self.router.describe(), usize::MAX)
                .map_err(|e| Status::internal(format!("listing did not encode: {e}")));
            return Box::pin(async move { reply });
        }
        if ctx.method() == STATS_METHOD {
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
