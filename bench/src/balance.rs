//! `balance`: srpc's client over several servers.
//!
//! - **Three servers vs one.** Three srpc server processes; each round
//!   measures 64 B × 64 in flight through a client over the first one
//!   only and through a client over all three (order alternating), and
//!   takes the ratio. On a 2-core machine the servers share the CPU, so
//!   this measures what spreading costs, not what it gains.
//! - **A slow server.** Four servers, the fourth behind a proxy in this
//!   process that holds every chunk from client to server `--delay`
//!   (20 ms) before passing it on: each call there takes 20 ms longer. The
//!   same load through Peak-EWMA power of two choices and through round
//!   robin, p50 and p99, and the share of calls the slow server got; and
//!   the four fast servers as the baseline.
//!
//! Every loop is bounded by the run's rounds and measure time; every
//! address is 127.0.0.1.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::contenders::srpc_stack::caller_over;
use crate::contenders::{BoxFut, Caller, Certs, Stack};
use crate::scenario;
use crate::ServerProcess;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BalanceArgs {
    /// Rounds of each comparison (the report shows medians).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Measured time of each load.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    measure: Duration,
    /// Warm-up before each load (not counted).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Calls in flight.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Three vs one with round robin instead of Peak-EWMA (to see what
    /// picking costs).
    #[arg(long)]
    round_robin: bool,
    /// Only the three-vs-one comparison (skip the slow server).
    #[arg(long)]
    scaling_only: bool,
    /// What the slow server adds to each call.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    delay: Duration,
}

/// This process's CPU time so far (user + system), from /proc (Linux;
/// zero elsewhere), at the kernel's tick (10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and
    // stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// 64 B calls through `caller` for the run's warm-up and measure time;
/// any failed call fails the run.
async fn measure(caller: Arc<dyn Caller>, args: &BalanceArgs) -> anyhow::Result<scenario::Load> {
    let load = scenario::load(caller, args.in_flight, 64, args.warmup, args.measure).await?;
    anyhow::ensure!(load.errors == 0, "{} calls failed", load.errors);
    Ok(load)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

pub(crate) async fn balance(args: BalanceArgs, dir: &Path, certs: &Certs) -> anyhow::Result<()> {
    let servers: Vec<ServerProcess> = (0..4)
        .map(|_| ServerProcess::start(Stack::Srpc, dir))
        .collect::<anyhow::Result<_>>()?;
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();

    // Informative: one server over three connections, calls dealt out in
    // turn, to tell what splitting the calls over connections costs from
    // what running three server processes costs.
    let split = {
        let mut rates = vec![];
        for _ in 0..args.rounds {
            let mut callers = vec![];
            for _ in 0..3 {
                callers.push(
                    caller_over(&addrs[0], certs, srpc::Balance::PeakEwma)
                        .await?
                        .0,
                );
            }
            let turns = Arc::new(Turns(callers, AtomicUsize::new(0)));
            rates.push(measure(turns.clone(), &args).await?.calls_per_sec);
            turns.close();
        }
        median(rates)
    };

    // Three servers vs one.
    let (mut one, mut three, mut ratios) = (vec![], vec![], vec![]);
    let mut client_cpu = [vec![], vec![]];
    let mut spread_calls = vec![];
    for round in 0..args.rounds {
        let mut rates = [0.0; 2];
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let target = if which == 0 {
                addrs[0].clone()
            } else {
                addrs[..3].join(",")
            };
            let balance = if args.round_robin {
                srpc::Balance::RoundRobin
            } else {
                srpc::Balance::PeakEwma
            };
            let (caller, client) = caller_over(&target, certs, balance).await?;
            let cpu_before = cpu_time();
            let load = measure(caller.clone(), &args).await?;
            let cpu = cpu_time().saturating_sub(cpu_before);
            rates[which] = load.calls_per_sec;
            // Warm-up included in the CPU time: per call of the whole run.
            let whole = load.calls_per_sec * (args.warmup + args.measure).as_secs_f64();
            client_cpu[which].push(cpu.as_secs_f64() * 1e6 / whole);
            if which == 1 {
                spread_calls = client.endpoints().iter().map(|e| e.calls).collect();
            }
            caller.close();
        }
        eprintln!(
            "[{}/{}] one server {:.0} calls/s, three {:.0} calls/s",
            round + 1,
            args.rounds,
            rates[0],
            rates[1]
        );
        one.push(rates[0]);
        three.push(rates[1]);
        ratios.push(rates[1] / rates[0]);
    }
    let (lo, hi) = spread(&ratios);
    println!(
        "## Three servers vs one (64 B × {} in flight, {} rounds)\n",
        args.in_flight, args.rounds
    );
    let [cpu_one, cpu_three] = client_cpu;
    println!("| | calls/s (median) | client CPU µs per call |\n|---|---:|---:|");
    println!(
        "| one server | {:.0} | {:.2} |",
        median(one),
        median(cpu_one)
    );
    println!(
        "| three servers | {:.0} | {:.2} |",
        median(three),
        median(cpu_three)
    );
    println!("| (one server over three connections, in turn) | {split:.0} | |");
    println!(
        "\nthree / one: median {:.3} (lowest {lo:.3}, highest {hi:.3}); calls per server in the last round: {spread_calls:?}\n",
        median(ratios.clone())
    );

    if args.scaling_only {
        return Ok(());
    }

    // A slow server.
    let slow = delay_proxy(servers[3].addr, args.delay).await?;
    let fast = addrs[..3].join(",");
    let cases = [
        (
            "four fast servers, Peak-EWMA",
            addrs.join(","),
            srpc::Balance::PeakEwma,
        ),
        (
            "one of four slow, Peak-EWMA (p2c)",
            format!("{fast},{slow}"),
            srpc::Balance::PeakEwma,
        ),
        (
            "one of four slow, round robin",
            format!("{fast},{slow}"),
            srpc::Balance::RoundRobin,
        ),
    ];
    println!(
        "## One slow server (+{:?} a call) among four (64 B × {} in flight, {} rounds)\n",
        args.delay, args.in_flight, args.rounds
    );
    println!(
        "| | calls/s | p50 µs | p99 µs | calls to the 4th server |\n|---|---:|---:|---:|---:|"
    );
    for (label, target, balance) in cases {
        let (mut rate, mut p50, mut p99, mut share) = (vec![], vec![], vec![], vec![]);
        for round in 0..args.rounds {
            let (caller, client) = caller_over(&target, certs, balance).await?;
            let load = measure(caller.clone(), &args).await?;
            let endpoints = client.endpoints();
            let total: u64 = endpoints.iter().map(|e| e.calls).sum();
            let fourth_addr = target.rsplit(',').next().unwrap_or_default();
            let fourth = endpoints
                .iter()
                .find(|e| e.addr.to_string() == fourth_addr)
                .map_or(0, |e| e.calls);
            eprintln!(
                "[{}/{}] {label}: p50 {:.0} µs p99 {:.0} µs",
                round + 1,
                args.rounds,
                load.p50_us,
                load.p99_us
            );
            rate.push(load.calls_per_sec);
            p50.push(load.p50_us);
            p99.push(load.p99_us);
            share.push(fourth as f64 / total.max(1) as f64 * 100.0);
            caller.close();
        }
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.2} % |",
            median(rate),
            median(p50),
            median(p99),
            median(share)
        );
    }
    drop(servers);
    Ok(())
}

/// Several connections used in turn.
struct Turns(Vec<Arc<dyn Caller>>, AtomicUsize);

impl Caller for Turns {
    fn echo(&self, payload: Bytes) -> BoxFut<'_, usize> {
        let i = self.1.fetch_add(1, Ordering::Relaxed) % self.0.len();
        self.0[i].echo(payload)
    }

    fn close(&self) {
        for caller in &self.0 {
            caller.close();
        }
    }
}

/// A proxy on 127.0.0.1 that holds each chunk from client to server for
/// `delay` before passing it on (a delay line: chunks keep their order and
/// spacing); replies pass at once. Its tasks end with their connections.
async fn delay_proxy(upstream: SocketAddr, delay: Duration) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Bytes)>();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = client_read.read(&mut buf).await {
                    if n == 0
                        || tx
                            .send((Instant::now() + delay, Bytes::copy_from_slice(&buf[..n])))
                            .is_err()
                    {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((due, chunk)) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    if server_write.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                let _ = server_write.shutdown().await;
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                let _ = client_write.shutdown().await;
            });
        }
    });
    Ok(addr)
}
