//! Heartbeats over real TLS on 127.0.0.1, through a fault-injecting proxy:
//! frozen links are found on both sides, silent clients are dropped, slow
//! links are not mistaken for dead ones, resets are survived by reconnecting,
//! ping floods are cut off.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rpc_client::{CallOptions, Client, ClientError, ConnState};
use rpc_core::{ConnectionConfig, Frame};
use rpc_server::ServerOptions;
use rpc_tests::{
    client_tls, decode_frames, frame_bytes, hello_bytes, read_until_closed, send, with_hold,
    FaultProxy, TestServer,
};

fn heartbeat(interval_ms: u64, timeout_ms: u64) -> ConnectionConfig {
    let mut c = ConnectionConfig::default();
    c.heartbeat_interval = Duration::from_millis(interval_ms);
    c.heartbeat_timeout = Duration::from_millis(timeout_ms);
    c
}

fn server_options(interval_ms: u64, timeout_ms: u64) -> ServerOptions {
    let mut o = ServerOptions::default();
    o.connection = heartbeat(interval_ms, timeout_ms);
    o
}

async fn client_via(proxy: &FaultProxy, server: &TestServer, cfg: ConnectionConfig) -> Client {
    Client::builder(client_tls(&server.certs))
        .server_name("localhost")
        .connection_config(cfg)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .connect(&proxy.address())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_link_fails_the_pending_call_and_the_server_drops_its_side() {
    let stopped = Arc::new(Mutex::new(None));
    let server = TestServer::start(
        with_hold(rpc_server::demo::router(), stopped.clone()),
        server_options(200, 600),
    )
    .await;
    let proxy = FaultProxy::start(server.addr).await;
    let client = client_via(&proxy, &server, heartbeat(200, 600)).await;
    let pending = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call_with_timeout::<_, ()>("hold", &(), Duration::from_secs(60))
                .await
        })
    };
    rpc_tests::until_in_flight(&client, 1).await;
    proxy.freeze(true);
    let frozen_at = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the pending call hung on a frozen link")
        .unwrap()
        .unwrap_err();
    let detected = frozen_at.elapsed();
    assert!(
        matches!(
            err,
            ClientError::OutcomeUnknown {
                source: rpc_core::Error::PeerUnresponsive(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("peer unresponsive"), "{err}");
    // interval + timeout + slack for a loaded 2-core machine.
    let bound = Duration::from_millis(200 + 600 + 700);
    assert!(
        detected <= bound,
        "client took {detected:?}, bound {bound:?}"
    );
    // The server found the silence too and stopped the handler.
    let mut server_stop = None;
    for _ in 0..100 {
        server_stop = *stopped.lock().unwrap();
        if server_stop.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server_took = server_stop
        .expect("server never dropped its side")
        .duration_since(frozen_at);
    assert!(
        server_took <= bound,
        "server took {server_took:?}, bound {bound:?}"
    );
    proxy.freeze(false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_says_nothing_is_dropped_within_the_timeout() {
    let server = TestServer::start(rpc_server::demo::router(), server_options(200, 600)).await;
    // After its Hello: silent, never answers pings.
    let mut tls = server.raw_tls().await;
    send(&mut tls, &hello_bytes()).await;
    let started = Instant::now();
    let got = read_until_closed(&mut tls, Duration::from_secs(5)).await;
    assert!(got.is_some(), "silent client still connected after 5 s");
    assert!(
        started.elapsed() <= Duration::from_millis(600 + 700),
        "{:?}",
        started.elapsed()
    );
    // The server pinged it before giving up.
    let frames = decode_frames(&got.unwrap());
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Ping { .. })),
        "{frames:?}"
    );
    // Not even a Hello: the same bound applies.
    let mut tls = server.raw_tls().await;
    let started = Instant::now();
    assert!(read_until_closed(&mut tls, Duration::from_secs(5))
        .await
        .is_some());
    assert!(
        started.elapsed() <= Duration::from_millis(600 + 700),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mib_calls_over_a_1_mb_per_s_link_are_not_mistaken_for_a_dead_peer() {
    let server = TestServer::start(rpc_server::demo::router(), server_options(500, 1500)).await;
    let proxy = FaultProxy::start(server.addr).await;
    let client = client_via(&proxy, &server, heartbeat(500, 1500)).await;
    proxy.throttle(1_000_000);
    let big = "z".repeat(2 * 1024 * 1024);
    let started = Instant::now();
    for _ in 0..2 {
        let echoed: String = client
            .call_with_timeout("Demo.echo", big.as_str(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(echoed.len(), big.len());
    }
    // 8 MiB crossed at ~1 MB/s: the link really was slow...
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // ...and nobody declared anybody dead: still the first connection.
    assert_eq!(
        proxy.accepted(),
        1,
        "the client reconnected: a false positive"
    );
    assert_eq!(*client.state().borrow(), ConnState::Ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reset_under_load_the_client_reconnects_and_calls_succeed_again() {
    let server = TestServer::demo().await;
    let proxy = FaultProxy::start(server.addr).await;
    let client = client_via(&proxy, &server, ConnectionConfig::default()).await;
    let reset_at = Instant::now() + Duration::from_millis(400);
    let end = reset_at + Duration::from_millis(1600);
    let callers: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let (mut ok_after, mut failed) = (0u32, 0u32);
                while Instant::now() < end {
                    let text = format!("caller {i}");
                    match client
                        .call_with_timeout::<_, String>("Demo.echo", &text, Duration::from_secs(2))
                        .await
                    {
                        Ok(reply) => {
                            assert_eq!(reply, text);
                            if Instant::now() > reset_at + Duration::from_millis(100) {
                                ok_after += 1;
                            }
                        }
                        Err(_) => failed += 1,
                    }
                }
                (ok_after, failed)
            })
        })
        .collect();
    tokio::time::sleep_until(reset_at.into()).await;
    proxy.reset_all();
    let (mut ok_after, mut failed) = (0, 0);
    for c in callers {
        let (o, f) = c.await.unwrap();
        ok_after += o;
        failed += f;
    }
    assert!(proxy.accepted() >= 2, "never reconnected");
    assert!(
        ok_after > 0,
        "no call succeeded after the reset ({failed} failed)"
    );
    let reply: String = client.call("Demo.echo", "after").await.unwrap();
    assert_eq!(reply, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_gets_goaway_too_many_pings() {
    let server = TestServer::demo().await;
    let mut tls = server.raw_tls().await;
    let mut bytes = hello_bytes();
    for nonce in 0..20 {
        bytes.extend(frame_bytes(Frame::Ping { nonce }));
    }
    send(&mut tls, &bytes).await;
    let got = read_until_closed(&mut tls, Duration::from_secs(5))
        .await
        .expect("left open");
    let frames = decode_frames(&got);
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Frame::GoAway { reason } if reason == "too many pings")),
        "{frames:?}"
    );
    // The first pings were answered before the cut.
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Pong { nonce: 0 })),
        "{frames:?}"
    );
}

/// A client connected through a proxy to a server that then stopped: the
/// client's attempts fail and it backs off. The proxy and the server's
/// certificates are for the server that comes back.
async fn client_of_a_stopped_server() -> (Client, FaultProxy, rpc_server::devcerts::DevCerts) {
    let first = TestServer::demo().await;
    let certs = first.certs.clone();
    let proxy = FaultProxy::start(first.addr).await;
    let client = client_via(&proxy, &first, ConnectionConfig::default()).await;
    let mut states = client.state();
    assert_eq!(*states.borrow_and_update(), ConnState::Ready);
    let down = first.addr;
    first.shutdown(Duration::from_secs(5)).await.unwrap();
    // Nothing listens there now: attempts fail and back off.
    proxy.set_upstream(down);
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == ConnState::BackingOff),
    )
    .await
    .expect("never backed off")
    .unwrap();
    (client, proxy, certs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_comes_back_is_used_again_and_calls_wait_up_to_their_timeout() {
    let (client, proxy, certs) = client_of_a_stopped_server().await;
    // A call made meanwhile with wait-for-ready waits its own timeout,
    // then fails clearly.
    let started = Instant::now();
    let waiting = CallOptions::new()
        .timeout(Duration::from_millis(300))
        .wait_for_ready(true);
    let err = client
        .call_with::<_, String>("Demo.echo", "x", &waiting)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("no connection"), "{err}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // The server comes back (same certificate, new port behind the proxy).
    let second =
        TestServer::start_with_certs(certs, rpc_server::demo::router(), ServerOptions::default())
            .await;
    proxy.set_upstream(second.addr);
    let waiting = CallOptions::new()
        .timeout(Duration::from_secs(10))
        .wait_for_ready(true);
    let reply: String = client
        .call_with("Demo.echo", "back", &waiting)
        .await
        .unwrap();
    assert_eq!(reply, "back");
    assert_eq!(*client.state().borrow(), ConnState::Ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_server_reachable_a_call_fails_fast_unless_it_waits_for_ready() {
    let (client, proxy, certs) = client_of_a_stopped_server().await;
    // The default: Unavailable at once, naming the last error, though the
    // call could have waited 30 s.
    let started = Instant::now();
    let err = client
        .call::<_, String>("Demo.echo", "x")
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(200), "{took:?}");
    let ClientError::Unavailable { last_error, .. } = &err else {
        panic!("{err}")
    };
    assert!(last_error.is_some(), "{err}");
    assert!(
        err.to_string().contains("last connection attempt failed"),
        "{err}"
    );
    // With wait-for-ready the call waits, and succeeds once the server is
    // back.
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            let opts = CallOptions::new()
                .timeout(Duration::from_secs(10))
                .wait_for_ready(true);
            client
                .call_with::<_, String>("Demo.echo", "waited", &opts)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "a waiting call returned early");
    let second =
        TestServer::start_with_certs(certs, rpc_server::demo::router(), ServerOptions::default())
            .await;
    proxy.set_upstream(second.addr);
    assert_eq!(waiting.await.unwrap().unwrap(), "waited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_reports_a_round_trip_time() {
    let server = TestServer::demo().await;
    let client = server.client().await;
    let rtt = client.ping().await.unwrap();
    assert!(
        rtt > Duration::ZERO && rtt < Duration::from_secs(1),
        "{rtt:?}"
    );
    assert_eq!(client.rtt(), Some(rtt));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_while_a_reconnect_attempt_is_under_way_waits_for_it() {
    let server = TestServer::demo().await;
    let proxy = FaultProxy::start(server.addr).await;
    let client = client_via(&proxy, &server, ConnectionConfig::default()).await;
    let mut states = client.state();
    // The connection dies; the next attempt's TCP connect succeeds but its
    // handshake stalls in the frozen proxy: an attempt under way.
    let before = proxy.accepted();
    proxy.freeze(true);
    proxy.reset_all();
    tokio::time::timeout(Duration::from_secs(5), async {
        while proxy.accepted() == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("no new attempt");
    assert_eq!(*states.borrow_and_update(), ConnState::Connecting);
    // Not waiting for ready, yet the call waits for the attempt...
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call_with_timeout::<_, String>("Demo.echo", "waited", Duration::from_secs(5))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!call.is_finished(), "the call did not wait for the attempt");
    // ...which then succeeds, and so does the call.
    proxy.freeze(false);
    assert_eq!(call.await.unwrap().unwrap(), "waited");
}
