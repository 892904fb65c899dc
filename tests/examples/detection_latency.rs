//! Measures how long each side takes to find a frozen peer, and the loopback
//! heartbeat RTT, for the figures in docs/protocol.md; fails when a side takes longer
//! than interval + timeout + [`SLACK`]. CI runs it with 2 runs.
//!
//! ```sh
//! cargo run --release -p rpc-tests --example detection_latency -- 20
//! ```
//!
//! Each run: a server and a client (heartbeat interval 500 ms, timeout 1.5 s
//! on both sides) talk through the fault proxy on 127.0.0.1 with a call in
//! flight; the proxy freezes (sockets stay open, nothing moves); we time the
//! client's call failing with "peer unresponsive" and the server dropping
//! the handler.

// A measurement program: a failed step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rpc_client::Client;
use rpc_core::ConnectionConfig;
use rpc_server::ServerOptions;
use rpc_tests::{client_tls, with_hold, FaultProxy, TestServer};

const INTERVAL: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_millis(1500);
/// Allowed past interval + timeout: timer and scheduling delays on a
/// loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(500);

fn config() -> ConnectionConfig {
    let mut c = ConnectionConfig::default();
    c.heartbeat_interval = INTERVAL;
    c.heartbeat_timeout = TIMEOUT;
    c
}

async fn one_run(phase: Duration) -> (Duration, Duration) {
    let stopped = Arc::new(Mutex::new(None));
    let router = with_hold(rpc_server::Router::new(), stopped.clone());
    let mut options = ServerOptions::default();
    options.connection = config();
    let server = TestServer::start(router, options).await;
    let proxy = FaultProxy::start(server.addr).await;
    let client = Client::builder(client_tls(&server.certs))
        .server_name("localhost")
        .connection_config(config())
        .connect(&proxy.address())
        .await
        .unwrap();
    let pending = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call_with_timeout::<_, ()>("hold", &(), Duration::from_secs(60))
                .await
        })
    };
    // Let heartbeats run a while; `phase` moves the freeze across the ping
    // cycle from run to run.
    tokio::time::sleep(Duration::from_millis(1000) + phase).await;
    proxy.freeze(true);
    let frozen_at = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the client did not find the frozen server within 10 s")
        .unwrap()
        .unwrap_err();
    let client_took = frozen_at.elapsed();
    assert!(err.to_string().contains("peer unresponsive"), "{err}");
    let server_took = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(t) = *stopped.lock().unwrap() {
                break t.duration_since(frozen_at);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the server did not find the frozen client within 10 s");
    for (side, took) in [("client", client_took), ("server", server_took)] {
        assert!(
            took <= INTERVAL + TIMEOUT + SLACK,
            "the {side} took {took:?} to find a frozen peer (bound {:?})",
            INTERVAL + TIMEOUT + SLACK
        );
    }
    client.close();
    proxy.freeze(false);
    (client_took, server_took)
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: median {:.0} ms, min {:.0} ms, max {:.0} ms over {} runs",
        ms(v[v.len() / 2]),
        ms(v[0]),
        ms(v[v.len() - 1]),
        v.len()
    );
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map_or(20, |a| a.parse().expect("runs: a number"));
    println!(
        "interval {} ms, timeout {} ms; bound interval + timeout = {} ms",
        INTERVAL.as_millis(),
        TIMEOUT.as_millis(),
        (INTERVAL + TIMEOUT).as_millis()
    );
    let (mut client, mut server) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // Spread over one interval: 0, 25, 50, ... ms (mod 500).
        let phase = Duration::from_millis((i as u64 * 25 * 7) % 500);
        let (c, s) = one_run(phase).await;
        eprintln!("run {i}: client {c:?}, server {s:?}");
        client.push(c);
        server.push(s);
    }
    summary("client detected a frozen server", client);
    summary("server detected a frozen client", server);

    // Loopback RTT: one ping per heartbeat interval on a direct connection.
    let server = TestServer::demo().await;
    let client = server.client().await;
    let mut rtts = Vec::new();
    for _ in 0..10 {
        rtts.push(client.ping().await.unwrap());
        tokio::time::sleep(client.heartbeat_interval()).await;
    }
    rtts.sort();
    println!(
        "loopback heartbeat RTT: median {:.3} ms, max {:.3} ms over {} pings",
        rtts[rtts.len() / 2].as_secs_f64() * 1000.0,
        rtts[rtts.len() - 1].as_secs_f64() * 1000.0,
        rtts.len()
    );
}
