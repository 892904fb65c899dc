//! The measurements, run from the client process against a server process.
//!
//! Every loop is bounded by a deadline; a failed call is counted and the
//! scenario reports it instead of hiding it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::contenders::{Caller, Dialer};

/// Calls made back to back by `in_flight` tasks on one connection.
#[derive(Debug, Clone)]
pub(crate) struct Load {
    /// Calls completed per second (after the warm-up).
    pub(crate) calls_per_sec: f64,
    /// Payload bytes echoed per second, in MiB.
    pub(crate) mib_per_sec: f64,
    /// Median latency.
    pub(crate) p50_us: f64,
    /// 99th percentile latency.
    pub(crate) p99_us: f64,
    /// Calls that failed or came back with the wrong length.
    pub(crate) errors: u64,
}

/// Runs `in_flight` callers for `warmup + measure`; counts only calls that
/// started after the warm-up and finished before the end.
pub(crate) async fn load(
    caller: Arc<dyn Caller>,
    in_flight: usize,
    payload: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Load> {
    let body = Bytes::from(vec![0x5a; payload]);
    let start = Instant::now();
    let from = start + warmup;
    let end = from + measure;
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let caller = caller.clone();
        let body = body.clone();
        let errors = errors.clone();
        tasks.spawn(async move {
            // 1 µs .. 60 s in nanoseconds, 3 significant digits.
            let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let reply = caller.echo(body.clone()).await;
                let t1 = Instant::now();
                match reply {
                    Ok(len) if len == body.len() => {
                        if t0 >= from && t1 <= end {
                            let ns = u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX);
                            hist.saturating_record(ns.max(1_000));
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        // A broken connection must not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            anyhow::Ok(hist)
        });
    }
    let mut all = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    while let Some(done) = tasks.join_next().await {
        all.add(done??)?;
    }
    let secs = measure.as_secs_f64();
    let calls = all.len() as f64;
    Ok(Load {
        calls_per_sec: calls / secs,
        mib_per_sec: calls * payload as f64 / secs / f64::from(1u32 << 20),
        p50_us: all.value_at_quantile(0.50) as f64 / 1e3,
        p99_us: all.value_at_quantile(0.99) as f64 / 1e3,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// How many loops dial at once in the parallel connection scenarios:
/// enough to keep both processes busy on a small machine.
pub(crate) const DIALERS: usize = 4;

/// What [`connect_rate`] measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Connects {
    /// Connections (with their call) per second, all loops together.
    pub(crate) per_sec: f64,
    /// Connections whose call came back.
    pub(crate) done: u64,
    /// Connections or calls that failed.
    pub(crate) errors: u64,
    /// Server certificates verified while measuring, i.e. full handshakes
    /// (`None` where the dialer cannot tell).
    pub(crate) full_handshakes: Option<u64>,
}

/// New connection, one 64-byte call, close, again and again for `measure`,
/// by `dialers` loops at once.
///
/// One dialer measures how long a connection takes end to end; on an idle
/// machine that is mostly waiting for the other process to wake up. Several
/// dialers keep both processes busy, so the rate is bounded by the CPU each
/// connection costs, which is what a server meets when many clients
/// (re)connect at once.
pub(crate) async fn connect_rate(
    dialer: Arc<Dialer>,
    measure: Duration,
    dialers: usize,
) -> anyhow::Result<Connects> {
    let body = Bytes::from(vec![0x5a; 64]);
    // Warm-up: one connection per dialer at once, so that when resuming
    // there is a session for each.
    let warm = (0..dialers).map(|_| async {
        let conn = dialer.connect().await?;
        conn.echo(body.clone()).await?;
        conn.close();
        anyhow::Ok(())
    });
    for result in futures_util::future::join_all(warm).await {
        result?;
    }
    let checked_before = dialer.certificates_checked();
    let start = Instant::now();
    let end = start + measure;
    let (mut done, mut errors) = (0u64, 0u64);
    if dialers == 1 {
        // In this task, as every run before several dialers existed did, so
        // the one-dialer figure stays comparable with them.
        (done, errors) = dial_until(&dialer, &body, end).await;
    } else {
        let loops: Vec<_> = (0..dialers)
            .map(|_| {
                let (dialer, body) = (dialer.clone(), body.clone());
                tokio::spawn(async move { dial_until(&dialer, &body, end).await })
            })
            .collect();
        for handle in loops {
            let (d, e) = handle.await?;
            done += d;
            errors += e;
        }
    }
    let per_sec = done as f64 / start.elapsed().as_secs_f64();
    let full_handshakes = dialer
        .certificates_checked()
        .zip(checked_before)
        .map(|(after, before)| after - before);
    Ok(Connects {
        per_sec,
        done,
        errors,
        full_handshakes,
    })
}

/// One dialer's loop: connect, call, close until `end`; returns the
/// connections that worked and those that did not.
async fn dial_until(dialer: &Dialer, body: &Bytes, end: Instant) -> (u64, u64) {
    let (mut done, mut errors) = (0u64, 0u64);
    while Instant::now() < end {
        let ok = match dialer.connect().await {
            Ok(conn) => {
                let reply = conn.echo(body.clone()).await;
                conn.close();
                matches!(reply, Ok(64))
            }
            Err(_) => false,
        };
        if ok {
            done += 1;
        } else {
            errors += 1;
            // A refused connection must not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    (done, errors)
}

/// Opens `n` connections (each makes one call, then idles for `settle`) and
/// returns the server's resident memory per connection in KiB, read from
/// `/proc/<server_pid>/status` before and after.
pub(crate) async fn idle_rss(
    dialer: &Dialer,
    n: usize,
    settle: Duration,
    server_pid: u32,
) -> anyhow::Result<f64> {
    let body = Bytes::from(vec![0x5a; 64]);
    // Warm the server up (runtime, TLS, first allocations) and let it settle.
    let first = dialer.connect().await?;
    first.echo(body.clone()).await?;
    first.close();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(server_pid)?;
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let conn = dialer.connect().await?;
        let len = conn.echo(body.clone()).await?;
        anyhow::ensure!(len == 64, "echo came back with {len} bytes");
        open.push(conn);
    }
    // Idle means idle for a while: past a few heartbeat intervals, whatever
    // a stack keeps for a quiet connection is all that is left.
    tokio::time::sleep(settle).await;
    let after = rss_kib(server_pid)?;
    for conn in &open {
        conn.close();
    }
    drop(open);
    Ok((after.saturating_sub(before)) as f64 / n as f64)
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// A one-way stream, and small calls on the same connection meanwhile.
#[derive(Debug, Clone)]
pub(crate) struct StreamRun {
    /// Payload MiB received per second, from asking to the last byte.
    pub(crate) mib_per_sec: f64,
    /// 99th percentile latency of 64 B calls made one after another while
    /// the stream ran, when they share its connection.
    pub(crate) beside_p99_us: Option<f64>,
    /// How many such calls completed during the stream.
    pub(crate) beside_calls: u64,
}

/// Receives `total` bytes as a stream from the server; meanwhile, with
/// `beside` and when the stream shares the connection, makes 64 B calls
/// one at a time (they take CPU from the stream: measure its rate without).
pub(crate) async fn stream(
    caller: Arc<dyn Caller>,
    total: u64,
    beside: bool,
) -> anyhow::Result<StreamRun> {
    let started = Instant::now();
    let transfer = tokio::spawn({
        let caller = caller.clone();
        async move { caller.stream(total).await }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let body = Bytes::from(vec![0x5a; 64]);
    if beside && caller.streams_beside_calls() {
        // Bounded by the transfer, and by a count against a runaway.
        while !transfer.is_finished() && hist.len() < 10_000_000 {
            let t0 = Instant::now();
            let len = caller.echo(body.clone()).await?;
            anyhow::ensure!(
                len == body.len(),
                "a call beside the stream came back short"
            );
            if !transfer.is_finished() {
                let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                hist.saturating_record(ns.max(1_000));
            }
        }
    }
    let got = transfer.await??;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(got == total, "the stream brought {got} of {total} bytes");
    Ok(StreamRun {
        mib_per_sec: got as f64 / secs / f64::from(1 << 20),
        beside_p99_us: (!hist.is_empty()).then(|| hist.value_at_quantile(0.99) as f64 / 1000.0),
        beside_calls: hist.len(),
    })
}
