//! The picker steers around a slow server, where round robin cannot: one
//! of four servers on 127.0.0.1 answers 20 ms late. A test binary of its
//! own, so the other multi-server tests do not load the CPU while it
//! measures latency.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rpc_client::{Balance, Client};
use rpc_tests::replicas::{builder, calls_at, connected, replicas, ReplicaClient};

/// p50 and p99 of `calls` echo calls from `callers` concurrent callers.
async fn latencies(client: &Client, callers: usize, calls: usize) -> (Duration, Duration) {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let replica = ReplicaClient::new(client.clone());
            tokio::spawn(async move {
                let mut took = Vec::with_capacity(calls / callers);
                for n in 0..(calls / callers) as u64 {
                    let t0 = Instant::now();
                    assert_eq!(replica.echo(n).await.unwrap(), n);
                    took.push(t0.elapsed());
                }
                took
            })
        })
        .collect();
    let mut all = vec![];
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    (all[all.len() / 2], all[all.len() * 99 / 100])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_is_steered_around_where_round_robin_is_not() {
    const CALLS: usize = 3200;
    let r = replicas(&[0, 0, 0, 0]).await;
    let slow = r.servers[3].addr;
    let mut runs = vec![];
    for (balance, delay) in [
        (Balance::PeakEwma, 0),
        (Balance::PeakEwma, 20),
        (Balance::RoundRobin, 20),
    ] {
        r.nodes[3].delay_ms.store(delay, Ordering::Relaxed);
        let addrs = r.servers.iter().map(|s| s.addr);
        let client = connected(builder(&r.certs).balance(balance), addrs).await;
        let (p50, p99) = latencies(&client, 8, CALLS).await;
        let share = calls_at(&client, slow) as f64 / CALLS as f64;
        eprintln!(
            "{balance:?}, 4th server +{delay} ms: p50 {p50:?} p99 {p99:?}, {:.2} % of calls to it",
            share * 100.0
        );
        runs.push((p99, share));
    }
    let (fast, ewma, rr) = (runs[0], runs[1], runs[2]);
    assert!(
        rr.0 >= Duration::from_millis(20),
        "round robin p99 {:?}",
        rr.0
    );
    assert!(
        rr.1 > 0.2,
        "round robin sent {:.3} to the slow server",
        rr.1
    );
    assert!(
        ewma.1 < 0.01,
        "p2c sent {:.3} of calls to the slow server",
        ewma.1
    );
    // Near the all-fast p99: well under the slow server's 20 ms.
    assert!(
        ewma.0 < fast.0 * 3 + Duration::from_millis(2) && ewma.0 < Duration::from_millis(15),
        "p2c p99 {:?} with a slow server, {:?} without",
        ewma.0,
        fast.0
    );
}
