//! `rpc-client bench`: N concurrent callers over the client's connections
//! (one per server).
//!
//! Each caller sends `echo` with a payload of the given size, checks the reply
//! and records its latency in an HDR histogram (microseconds). When the
//! duration ends no new call starts; calls in flight finish (up to their
//! deadline) and count. `errors` counts calls that failed or came back wrong.
//! A lost connection does not end the run: the client reconnects, and calls
//! made meanwhile wait for it (up to their deadline) or fail and count.
//! On a terminal a progress bar (indicatif) shows the time, calls, rate and
//! errors on stderr.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rpc_client::Client;

/// Flags of `bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Callers running at once (all on one connection).
    #[arg(long, value_name = "N", default_value_t = 64)]
    concurrency: usize,
    /// How long to start new calls.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Payload bytes per call (echoed back).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    payload: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

struct Counters {
    calls: AtomicU64,
    errors: AtomicU64,
}

pub(crate) async fn run(client: Client, args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let payload = Arc::new("x".repeat(args.payload));
    let counters = Arc::new(Counters {
        calls: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let start = Instant::now();
    let end = start + args.duration;
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let client = client.clone();
        let payload = payload.clone();
        let counters = counters.clone();
        callers.spawn(async move {
            // 1 µs to 60 s, 3 significant digits.
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut first_error = None;
            while Instant::now() < end {
                let t0 = Instant::now();
                let result: Result<String, _> = client.call("Demo.echo", payload.as_str()).await;
                let us = t0.elapsed().as_micros() as u64;
                match result {
                    Ok(reply) if reply.len() == payload.len() => {
                        hist.saturating_record(us);
                        counters.calls.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(reply) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert_with(|| {
                            format!(
                                "echo returned {} bytes instead of {}",
                                reply.len(),
                                payload.len()
                            )
                        });
                    }
                    Err(e) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert_with(|| e.to_string());
                        // Only a closed client ends a caller; a lost connection
                        // is reconnected and calls wait for it.
                        if client.is_closed() {
                            break;
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>((hist, first_error))
        });
    }
    // A hidden bar draws nothing: off a terminal, stderr stays empty.
    let bar = match std::io::stderr().is_terminal() {
        true => indicatif::ProgressBar::new(args.duration.as_millis() as u64),
        false => indicatif::ProgressBar::hidden(),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {elapsed} {msg}") {
        bar.set_style(style);
    }
    let progress = tokio::spawn({
        let counters = counters.clone();
        let bar = bar.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let secs = start.elapsed().as_secs_f64().max(0.001);
                let calls = counters.calls.load(Ordering::Relaxed);
                bar.set_position(start.elapsed().as_millis() as u64);
                bar.set_message(format!(
                    "{calls} calls  {:.0} calls/s  {} errors",
                    calls as f64 / secs,
                    counters.errors.load(Ordering::Relaxed)
                ));
            }
        }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut first_error = None;
    while let Some(joined) = callers.join_next().await {
        let (h, err) = joined??;
        hist.add(&h)?;
        if first_error.is_none() {
            first_error = err;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    progress.abort();
    bar.finish_and_clear();
    let calls = counters.calls.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    let rate = calls as f64 / seconds;
    // Calls each server answered (failures included).
    let endpoints: serde_json::Map<String, serde_json::Value> = client
        .endpoints()
        .into_iter()
        .map(|e| (e.addr.to_string(), e.calls.into()))
        .collect();
    if args.json {
        let report = serde_json::json!({
            "calls": calls,
            "seconds": seconds,
            "calls_per_sec": rate,
            "p50_us": hist.value_at_quantile(0.50),
            "p90_us": hist.value_at_quantile(0.90),
            "p99_us": hist.value_at_quantile(0.99),
            "max_us": hist.max(),
            "errors": errors,
            "concurrency": args.concurrency,
            "payload_bytes": args.payload,
            "endpoints": endpoints,
        });
        println!("{report}");
    } else {
        println!("calls {calls}");
        println!("seconds {seconds:.3}");
        println!("calls/s {rate:.0}");
        println!(
            "latency p50 {}us p90 {}us p99 {}us max {}us",
            hist.value_at_quantile(0.50),
            hist.value_at_quantile(0.90),
            hist.value_at_quantile(0.99),
            hist.max()
        );
        println!("errors {errors}");
        if endpoints.len() > 1 {
            for (addr, calls) in &endpoints {
                println!("endpoint {addr} calls {calls}");
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("rpc-client: first error: {e}");
    }
    Ok(())
}
