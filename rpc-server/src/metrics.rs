//! Call metrics with OpenTelemetry's names (semantic conventions v1.40.0,
//! RPC), recorded through the `metrics` facade, so whatever exporter the
//! program installs (Prometheus, OpenTelemetry, StatsD) receives them. On
//! with `ServerBuilder::metrics(true)`; off, nothing is recorded or
//! looked at. The stack's counting layer (`Stats`, `layers.rs`) records
//! them where it counts each call, so they cost no layer of their own.
//!
//! | metric | kind | attributes |
//! |---|---|---|
//! | `rpc.server.call.duration` (s) | histogram | `rpc.system.name`, `rpc.service`, `rpc.method`, `rpc.response.status_code` |
//! | `rpc.server.active_calls` | gauge, sampled each second | `rpc.system.name` |
//! | `srpc.server.connections` | gauge, sampled each second | |
//! | `srpc.server.connection.rtt` (s) | histogram of each connection's heartbeat round trip, sampled each second | |
//! | `srpc.server.received_bytes`, `srpc.server.sent_bytes` | counters (socket bytes, TLS included) | |
//!
//! The first is OpenTelemetry's; the conventions name no metric for the
//! others, so they carry srpc's prefix (and `rpc.server.active_calls`
//! follows the conventions' naming). Gauges and bytes are sampled by a task
//! of `Server::serve`, not counted on each call.
//!
//! A call's duration runs from when its request's bytes were read (the
//! stamp its deadline counts from, so timing adds one clock read per call,
//! at the end) to when its handler's answer is ready.
//!
//! Call durations are counted per thread in [`DURATION_BUCKETS`] and handed
//! to the histograms each [`SAMPLE_EVERY`] (and when serving stops), as
//! each bucket's calls at their mean duration: an exporter's own record per
//! call (a shared atomic queue, in Prometheus's) cost about 9 % of the call
//! rate (bench/RESULTS.md). With the same buckets in the exporter its
//! counts and sums are exact; a call shows up to a second late.
//!
//! `rpc.method` is the call's `Service.method`, or `_OTHER` for one the
//! server does not serve (the peer chooses the name: metrics must not let
//! it choose their cardinality); `rpc.response.status_code` is `OK` or the
//! failure's code (`INVALID_ARGUMENT`, ...); a call dropped unfinished is
//! `CANCELLED` (or `DEADLINE_EXCEEDED` past its deadline), as the counters
//! say. A stream call is recorded once, when it ends.
//!
//! Not here: exporting (the program's choice; `rpc-server
//! --metrics-listen` installs Prometheus's).

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use metrics::Histogram;
use rpc_core::StatusCode;

// The router's: FNV-1a over a method's name (SipHash cost more than the
// rest of a lookup; the names are the server's own).
use crate::router::NameHasher;

/// The call duration histogram's name.
pub const SERVER_CALL_DURATION: &str = "rpc.server.call.duration";
/// The calls-in-flight gauge's name.
pub const SERVER_ACTIVE_CALLS: &str = "rpc.server.active_calls";
/// The connections gauge's name.
pub const SERVER_CONNECTIONS: &str = "srpc.server.connections";
/// The heartbeat round-trip histogram's name.
pub const CONNECTION_RTT: &str = "srpc.server.connection.rtt";
/// The received bytes counter's name.
pub const SERVER_RECEIVED_BYTES: &str = "srpc.server.received_bytes";
/// The sent bytes counter's name.
pub const SERVER_SENT_BYTES: &str = "srpc.server.sent_bytes";
/// How often gauges, round trips and bytes are sampled.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// `rpc.system.name` of every srpc metric.
pub const SYSTEM: &str = "srpc";

/// Buckets for call durations in seconds: the semantic conventions'
/// advice (5 ms to 10 s) with five below it, since a call on a LAN takes
/// well under a millisecond.
pub const DURATION_BUCKETS: [f64; 19] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The metrics of one server's calls. Made once per server built with
/// metrics and kept for the life of the process (`&'static`): a call then
/// holds its row by reference, where an `Arc` clone and drop per call
/// made the threads serving calls fight over one counter.
pub(crate) struct CallMetrics {
    /// One row per method served (fixed when the server is built, so read
    /// without a lock), and one for everything else.
    rows: HashMap<String, Row, BuildHasherDefault<NameHasher>>,
    other: Row,
}

/// Per-thread shards of each outcome's counts: the threads serving calls
/// each add to their own cache line.
const SHARDS: usize = 8;

/// Buckets of the counts: [`DURATION_BUCKETS`], and one past the last.
const BUCKETS: usize = DURATION_BUCKETS.len() + 1;

/// One shard's calls and their total time, by bucket.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    calls: [AtomicU64; BUCKETS],
    nanos: [AtomicU64; BUCKETS],
}

/// One method's outcome: its histogram, and the calls counted since they
/// were last handed to it.
struct Outcome {
    histogram: Histogram,
    shards: Box<[Shard; SHARDS]>,
}

/// One method's outcomes, each made at first use.
struct Row {
    method: String,
    /// `[0]` is OK; `[1 + code.index()]` a failure.
    by_outcome: [OnceLock<Outcome>; 1 + StatusCode::ALL.len()],
}

impl Row {
    fn new(method: String) -> Row {
        Row {
            method,
            by_outcome: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn outcome(&self, outcome: Result<(), StatusCode>) -> &Outcome {
        let slot = outcome.map_or_else(|code| 1 + code.index(), |()| 0);
        self.by_outcome[slot].get_or_init(|| {
            let (service, _) = self.method.split_once('.').unwrap_or(("", &self.method));
            let status = match outcome {
                Ok(()) => "OK".to_owned(),
                Err(code) => code.name().to_uppercase(),
            };
            Outcome {
                histogram: metrics::histogram!(
                    SERVER_CALL_DURATION,
                    "rpc.system.name" => SYSTEM,
                    "rpc.service" => service.to_owned(),
                    "rpc.method" => self.method.clone(),
                    "rpc.response.status_code" => status,
                ),
                shards: Box::default(),
            }
        })
    }

    /// Hands the calls counted since the last time to the histograms:
    /// per bucket, their number at their mean duration, so the exporter's
    /// bucket counts (with [`DURATION_BUCKETS`]) and sum are the calls'.
    fn flush(&self) {
        for outcome in self.by_outcome.iter().filter_map(OnceLock::get) {
            for shard in outcome.shards.iter() {
                for b in 0..BUCKETS {
                    let calls = shard.calls[b].swap(0, Ordering::Relaxed);
                    if calls == 0 {
                        continue;
                    }
                    // A call counted between the two swaps moves to the
                    // next flush with its time in this one: the totals
                    // stay right.
                    let nanos = shard.nanos[b].swap(0, Ordering::Relaxed);
                    let mean = nanos as f64 / calls as f64 / 1e9;
                    outcome
                        .histogram
                        .record_many(mean, usize::try_from(calls).unwrap_or(usize::MAX));
                }
            }
        }
    }
}

/// This thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// [`DURATION_BUCKETS`] in nanoseconds.
const BOUNDS_NANOS: [u64; DURATION_BUCKETS.len()] = {
    let mut nanos = [0; DURATION_BUCKETS.len()];
    let mut i = 0;
    while i < nanos.len() {
        nanos[i] = (DURATION_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

/// The bucket of a call that took `nanos`: the first bound it does not
/// exceed, looked for from the smallest (most calls are short).
fn bucket(nanos: u64) -> usize {
    BOUNDS_NANOS
        .iter()
        .position(|&bound| nanos <= bound)
        .unwrap_or(BOUNDS_NANOS.len())
}

impl CallMetrics {
    /// Metrics for a server serving `methods` (and the reserved methods
    /// every server answers), kept for the life of the process (a few
    /// hundred bytes per method).
    pub(crate) fn leak<'a>(methods: impl IntoIterator<Item = &'a str>) -> &'static Self {
        let reserved = [
            rpc_core::service::LIST_METHOD,
            rpc_core::stats::STATS_METHOD,
            rpc_core::health::CHECK_METHOD,
            rpc_core::health::WATCH_METHOD,
        ];
        let rows = methods
            .into_iter()
            .chain(reserved)
            .map(|m| (m.to_owned(), Row::new(m.to_owned())))
            .collect();
        Box::leak(Box::new(CallMetrics {
            rows,
            other: Row::new("_OTHER".to_owned()),
        }))
    }

    /// A call to `method`, which arrived at `arrived` (when its bytes
    /// were read: a clock read the connection made anyway).
    pub(crate) fn start(&'static self, method: &str, arrived: Instant) -> Timed {
        Timed {
            row: self.row(method),
            started: arrived,
        }
    }

    /// `method`'s row. The last one this thread used is tried first: a
    /// thread serving calls mostly serves a few methods, and comparing a
    /// name costs a fraction of hashing it.
    fn row(&'static self, method: &str) -> &'static Row {
        thread_local! {
            static LAST: Cell<Option<(&'static CallMetrics, &'static Row)>> =
                const { Cell::new(None) };
        }
        LAST.with(|last| match last.get() {
            Some((metrics, row)) if std::ptr::eq(metrics, self) && row.method == method => row,
            _ => {
                let row = self.rows.get(method).unwrap_or(&self.other);
                last.set(Some((self, row)));
                row
            }
        })
    }
}

/// One call being timed.
pub(crate) struct Timed {
    row: &'static Row,
    started: Instant,
}

impl Timed {
    /// The call ended with `outcome`.
    pub(crate) fn finish(self, outcome: Result<(), StatusCode>) {
        let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let shard = &self.row.outcome(outcome).shards[shard()];
        let b = bucket(nanos);
        shard.calls[b].fetch_add(1, Ordering::Relaxed);
        shard.nanos[b].fetch_add(nanos, Ordering::Relaxed);
    }
}

impl CallMetrics {
    /// Hands what calls counted since the last time to the histograms
    /// (each [`SAMPLE_EVERY`], and when the server stops serving).
    pub(crate) fn flush(&self) {
        self.rows.values().for_each(Row::flush);
        self.other.flush();
    }
}

/// What the sampling task records each [`SAMPLE_EVERY`].
pub(crate) struct Sample {
    pub(crate) active_calls: u64,
    pub(crate) connections: u64,
    pub(crate) rtts: Vec<std::time::Duration>,
    pub(crate) received: u64,
    pub(crate) sent: u64,
}

impl Sample {
    pub(crate) fn record(&self) {
        metrics::gauge!(SERVER_ACTIVE_CALLS, "rpc.system.name" => SYSTEM)
            .set(self.active_calls as f64);
        metrics::gauge!(SERVER_CONNECTIONS).set(self.connections as f64);
        let rtt = metrics::histogram!(CONNECTION_RTT);
        for d in &self.rtts {
            rtt.record(d.as_secs_f64());
        }
        record_bytes(self.received, self.sent);
    }
}

/// Adds bytes moved to the byte counters.
pub(crate) fn record_bytes(received: u64, sent: u64) {
    metrics::counter!(SERVER_RECEIVED_BYTES).increment(received);
    metrics::counter!(SERVER_SENT_BYTES).increment(sent);
}
