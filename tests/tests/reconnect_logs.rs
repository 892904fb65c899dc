//! What a client logs when its connection drops: a reconnect that works at
//! once prints no warning, and an outage warns once, however many attempts
//! fail (its own test binary: it installs the global log subscriber).

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rpc_client::{Client, ConnState};
use rpc_tests::{client_tls, still_served, FaultProxy, TestServer};
use tokio::sync::watch;

/// The log, as the CLI would print it.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn take(&self) -> String {
        String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
    }
}

/// Waits (at most 10 s) until `states` has been in `state` `times` more
/// times. Subscribed before the change it waits for: a reconnect can be
/// over before a subscription made after the cut.
async fn until_state(states: &mut watch::Receiver<ConnState>, state: ConnState, times: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = 0;
        while seen < times {
            states.changed().await.unwrap();
            if *states.borrow_and_update() == state {
                seen += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the client was not {state:?} {times} times"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_reconnect_prints_no_warning_and_an_outage_warns_once() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let server = TestServer::demo().await;
    let proxy = FaultProxy::start(server.addr).await;
    let client = Client::builder(client_tls(&server.certs))
        .server_name("localhost")
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .connect(&proxy.address())
        .await
        .unwrap();

    // Dropped, and back at the first try: no WARN line.
    let mut states = client.state();
    proxy.reset_all();
    until_state(&mut states, ConnState::Ready, 1).await;
    still_served(&client).await;
    let quick = log.take();
    assert!(!quick.contains("WARN"), "{quick}");
    assert!(quick.contains("reconnected"), "{quick}");

    // Dropped with nothing behind the proxy: six failed attempts, one
    // INFO for the first, one WARN for the outage, then back.
    let nowhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    proxy.set_upstream(nowhere.local_addr().unwrap());
    drop(nowhere);
    let mut states = client.state();
    proxy.reset_all();
    until_state(&mut states, ConnState::BackingOff, 6).await;
    proxy.set_upstream(server.addr);
    until_state(&mut states, ConnState::Ready, 1).await;
    still_served(&client).await;
    let outage = log.take();
    let count = |text: &str| outage.lines().filter(|l| l.contains(text)).count();
    assert_eq!(count("WARN"), 1, "{outage}");
    assert_eq!(count("server unreachable; still retrying"), 1, "{outage}");
    assert_eq!(count("connection attempt failed; retrying"), 1, "{outage}");
}
