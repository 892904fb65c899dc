//! Call metrics with OpenTelemetry's names (semantic conventions v1.40.0,
//! RPC): a [`MetricsLayer`] for the server's call stack, recording through
//! the `metrics` facade, so whatever exporter the program installs
//! (Prometheus, OpenTelemetry, StatsD) receives them. Off unless added:
//! `ServerBuilder::layer(MetricsLayer::new(router.methods()))`.
//!
//! | metric | kind | attributes |
//! |---|---|---|
//! | `rpc.server.call.duration` (s) | histogram | `rpc.system.name`, `rpc.service`, `rpc.method`, `rpc.response.status_code` |
//! | `rpc.server.active_calls` | gauge | `rpc.system.name` |
//!
//! `rpc.method` is the call's `Service.method`, or `_OTHER` for one the
//! server does not serve (the peer chooses the name: metrics must not let
//! it choose their cardinality); `rpc.response.status_code` is `OK` or the
//! failure's code (`INVALID_ARGUMENT`, ...). A stream call is recorded
//! once, when it ends.
//!
//! Not here: exporting (the program's choice; `rpc-server
//! --metrics-listen` installs Prometheus's).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use metrics::{Gauge, Histogram};
use rpc_core::{BoxFuture, Status, StatusCode};
use tower::{Layer, Service};

use crate::call::Call;

/// The call duration histogram's name.
pub const SERVER_CALL_DURATION: &str = "rpc.server.call.duration";
/// The calls-in-flight gauge's name.
pub const SERVER_ACTIVE_CALLS: &str = "rpc.server.active_calls";
/// `rpc.system.name` of every srpc metric.
pub const SYSTEM: &str = "srpc";

/// Records every call's duration and outcome (see the module docs).
#[derive(Clone)]
pub struct MetricsLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MetricsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsLayer").finish_non_exhaustive()
    }
}

struct Shared {
    /// The methods the server serves; others are `_OTHER`.
    known: HashSet<String>,
    /// Histogram handles by method and outcome, made on first use: the
    /// facade's lookup by name and labels allocates, a handle does not.
    durations: Mutex<HashMap<(String, Option<StatusCode>), Histogram>>,
    /// Made at the first call, like the histograms: a handle taken before
    /// the program installed its recorder would record nowhere.
    active: OnceLock<Gauge>,
}

impl Shared {
    fn active(&self) -> &Gauge {
        self.active
            .get_or_init(|| metrics::gauge!(SERVER_ACTIVE_CALLS, "rpc.system.name" => SYSTEM))
    }
}

impl MetricsLayer {
    /// Records calls to `methods` (e.g. `router.methods()`) under their
    /// names, and any other under `_OTHER`.
    pub fn new<I, M>(methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        // The reserved methods every server answers are known too.
        let reserved = [
            rpc_core::service::LIST_METHOD,
            rpc_core::stats::STATS_METHOD,
            rpc_core::health::CHECK_METHOD,
            rpc_core::health::WATCH_METHOD,
        ];
        let known = methods
            .into_iter()
            .map(Into::into)
            .chain(reserved.map(String::from))
            .collect();
        MetricsLayer {
            shared: Arc::new(Shared {
                known,
                durations: Mutex::new(HashMap::new()),
                active: OnceLock::new(),
            }),
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`MetricsLayer`] makes.
#[derive(Clone)]
pub struct Metrics<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Metrics<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl<S> Service<Call> for Metrics<S>
where
    S: Service<Call, Response = Bytes, Error = Status>,
    S::Future: Send + 'static,
{
    type Response = Bytes;
    type Error = Status;
    type Future = BoxFuture<Result<Bytes, Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let method = match self.shared.known.contains(call.ctx.method()) {
            true => call.ctx.method().to_owned(),
            false => "_OTHER".to_owned(),
        };
        let started = Instant::now();
        let guard = Active::new(self.shared.clone(), method, started);
        let reply = self.inner.call(call);
        Box::pin(async move {
            let result = reply.await;
            guard.finish(result.as_ref().err().map(|s| s.code));
            result
        })
    }
}

/// One call in flight: counted in the gauge, and recorded when it ends
/// (as `CANCELLED` when dropped unfinished: the caller gave up, or the
/// connection ended).
struct Active {
    shared: Arc<Shared>,
    method: String,
    started: Instant,
    done: bool,
}

impl Active {
    fn new(shared: Arc<Shared>, method: String, started: Instant) -> Self {
        shared.active().increment(1.0);
        Active {
            shared,
            method,
            started,
            done: false,
        }
    }

    fn finish(mut self, code: Option<StatusCode>) {
        self.record(code);
    }

    fn record(&mut self, code: Option<StatusCode>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.shared.active().decrement(1.0);
        let seconds = self.started.elapsed().as_secs_f64();
        let key = (std::mem::take(&mut self.method), code);
        let mut durations = self
            .shared
            .durations
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let histogram = durations
            .entry(key)
            .or_insert_with_key(|(method, code)| histogram(method, *code));
        histogram.record(seconds);
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.record(Some(StatusCode::Cancelled));
    }
}

/// The duration histogram of `method` ending with `code` (`None`: OK).
fn histogram(method: &str, code: Option<StatusCode>) -> Histogram {
    let (service, _) = method.split_once('.').unwrap_or(("", method));
    let status = code.map_or_else(|| "OK".to_owned(), |c| c.name().to_uppercase());
    metrics::histogram!(
        SERVER_CALL_DURATION,
        "rpc.system.name" => SYSTEM,
        "rpc.service" => service.to_owned(),
        "rpc.method" => method.to_owned(),
        "rpc.response.status_code" => status,
    )
}

/// Buckets for call durations in seconds: the semantic conventions'
/// advice (5 ms to 10 s) with five below it, since a call on a LAN takes
/// well under a millisecond.
pub const DURATION_BUCKETS: [f64; 19] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
