//! The call stack: every call a server serves goes through a
//! [`tower::Service`] whose request is a [`Call`] and whose reply is the
//! encoded result or a [`Status`]. Users add middleware with
//! `ServerBuilder::layer` (any `tower::Layer`: tower's concurrency limit,
//! load shedding, timeouts, or their own); the server's own concerns are
//! layers of the same stack (`layers.rs`).
//!
//! ```text
//! driver ─► ServerDispatch::dispatch(ctx, body)
//!             └─ clone the stack ─► poll_ready (at once, usually Ready)
//!                  └─► call(Call) ─► future, polled inline by the driver
//! ```
//!
//! Without user layers the stack is one concrete type, called through a
//! shared reference (its services are always ready), with one box for the
//! whole call; with them, the user part is a `BoxCloneSyncService`, cloned
//! and made ready per call as tower asks. An error a user layer returns becomes the call's
//! [`Status`]: a `Status` as it is, tower's load-shed `Overloaded` as
//! `Overloaded`, its timeout's `Elapsed` as `DeadlineExceeded`, anything
//! else as `Internal`.
//!
//! Not here: the layers themselves (`layers.rs`), method routing
//! (`router.rs`).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use rpc_core::stats::{CallCounters, PeerStats, StatsSnapshot};
use rpc_core::{BoxFuture, CallContext, Dispatch, Status, StatusCode};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::call::{Call, CallService};
use crate::connection_set::ConnectionSet;
use crate::health::Health;
use crate::layers::{
    Authorize, AuthorizeHook, AuthorizeLayer, Listings, ReservedMethods, RouterService, SharedCall,
    Snapshot, Stats,
};
use crate::metrics::{record_bytes, CallMetrics, Sample};
use crate::Router;

/// A user layer, applied when the server is built.
pub(crate) type UserLayer = Arc<dyn Fn(CallService) -> CallService + Send + Sync>;

/// Wraps `layer` so that it applies to a [`CallService`] and its errors
/// become statuses.
pub(crate) fn user_layer<L>(layer: L) -> UserLayer
where
    L: Layer<CallService> + Send + Sync + 'static,
    L::Service: Service<Call, Response = Bytes> + Clone + Send + Sync + 'static,
    <L::Service as Service<Call>>::Error: Into<BoxError>,
    <L::Service as Service<Call>>::Future: Send + 'static,
{
    Arc::new(move |inner| BoxCloneSyncService::new(layer.layer(inner).map_err(status_of)))
}

/// The status a layer's error stands for.
fn status_of(error: impl Into<BoxError>) -> Status {
    let error = error.into();
    let error = match error.downcast::<Status>() {
        Ok(status) => return *status,
        Err(error) => error,
    };
    if error.is::<tower::load_shed::error::Overloaded>() {
        return Status::new(StatusCode::Overloaded, "server overloaded (load shed)");
    }
    if error.is::<tower::timeout::error::Elapsed>() {
        return Status::new(
            StatusCode::DeadlineExceeded,
            "the server's timeout for the call passed",
        );
    }
    Status::internal(format!("middleware failed: {error}"))
}

type Builtin = Stats<Authorize<ReservedMethods<RouterService>>>;

/// The assembled stack: concrete without user layers, boxed with them.
enum Stack {
    Builtin(Builtin),
    Layered(Stats<CallService>),
}

/// What the server hands each connection's driver: the call stack, the
/// counters it keeps and the live connections stats lists.
pub(crate) struct ServerDispatch {
    stack: Stack,
    router: Arc<Router>,
    counters: Arc<CallCounters>,
    /// Every live connection, for stats (`connection_task.rs` adds and
    /// removes).
    pub(crate) connections: Arc<ConnectionSet>,
    /// What `srpc.health` reports.
    pub(crate) health: Health,
    /// Whether calls, connections and bytes are recorded as metrics.
    pub(crate) metrics: bool,
    /// The calls' metrics, when recorded.
    call_metrics: Option<&'static CallMetrics>,
}

impl ServerDispatch {
    pub(crate) fn new(
        router: Router,
        authorize: Option<AuthorizeHook>,
        layers: &[UserLayer],
        metrics: bool,
    ) -> Self {
        let recording = metrics;
        let metrics = metrics.then(|| CallMetrics::leak(router.methods()));
        let call_metrics = metrics;
        let router = Arc::new(router);
        let counters = Arc::new(CallCounters::default());
        let connections = Arc::new(ConnectionSet::default());
        let stats: Snapshot = {
            let (counters, connections) = (counters.clone(), connections.clone());
            Arc::new(move || snapshot(&counters, &connections))
        };
        let list = Listings::new(&router);
        let health = Health::new(
            list.listing
                .services
                .iter()
                .map(|service| service.name.clone())
                .filter(|name| !name.is_empty()),
        );
        let inner = AuthorizeLayer::from_hook(authorize).layer(ReservedMethods {
            inner: RouterService(router.clone()),
            list: Arc::new(list),
            stats,
            health: health.clone(),
        });
        let stack = if layers.is_empty() {
            Stack::Builtin(Stats {
                inner,
                counters: counters.clone(),
                metrics,
            })
        } else {
            // The first layer added is the outermost, as in tower's
            // ServiceBuilder.
            let mut service = BoxCloneSyncService::new(inner);
            for layer in layers.iter().rev() {
                service = layer(service);
            }
            Stack::Layered(Stats {
                inner: service,
                counters: counters.clone(),
                metrics,
            })
        };
        ServerDispatch {
            stack,
            router,
            counters,
            connections,
            health,
            metrics: recording,
            call_metrics,
        }
    }

    /// Records what the metrics sample (see `metrics.rs`): calls in
    /// flight, connections, their round trips, the bytes moved since the
    /// last sample.
    pub(crate) fn sample_metrics(&self) {
        if let Some(calls) = self.call_metrics {
            calls.flush();
        }
        let mut sample = Sample {
            active_calls: self.counters.in_flight(),
            connections: 0,
            rtts: Vec::new(),
            received: 0,
            sent: 0,
        };
        self.connections.for_each(|c| {
            sample.connections += 1;
            sample.rtts.extend(c.rtt());
        });
        (sample.received, sample.sent) = self.connections.unreported_bytes();
        sample.record();
    }

    /// A connection ended: the bytes it moved since the last sample are
    /// recorded, when metrics are.
    pub(crate) fn connection_ended(&self, registered: u64) {
        let (received, sent) = self.connections.remove(registered);
        if self.metrics {
            record_bytes(received, sent);
        }
    }

    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        snapshot(&self.counters, &self.connections)
    }
}

fn snapshot(counters: &CallCounters, connections: &ConnectionSet) -> StatsSnapshot {
    let mut peers = Vec::new();
    connections.for_each(|c| {
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
        calls_in_flight: counters.in_flight(),
        calls_served: counters.served(),
        errors: counters.errors(),
        peers,
    }
}

/// Calls `service` as tower asks: ready first. Its readiness is looked at
/// here, at once; only a service that is not ready yet (a concurrency
/// limit at its limit, say) makes the call wait, inside its future.
fn call_when_ready<S>(mut service: S, call: Call) -> BoxFuture<Result<Bytes, Status>>
where
    S: Service<Call, Response = Bytes, Error = Status> + Send + 'static,
    S::Future: Send + 'static,
{
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => Box::pin(service.call(call)),
        Poll::Ready(Err(status)) => Box::pin(async move { Err(status) }),
        Poll::Pending => Box::pin(async move { service.oneshot(call).await }),
    }
}

impl Dispatch for ServerDispatch {
    fn dispatch(&self, ctx: CallContext, body: Bytes) -> BoxFuture<Result<Bytes, Status>> {
        let call = Call { ctx, body };
        match &self.stack {
            // Always ready, nothing to clone (see `SharedCall`).
            Stack::Builtin(stack) => Box::pin(stack.call_shared(call)),
            Stack::Layered(stack) => call_when_ready(stack.clone(), call),
        }
    }

    fn refused(&self, code: StatusCode) {
        self.counters.failed(code);
    }
}
