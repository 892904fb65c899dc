//! Call semantics over real TLS on 127.0.0.1: deadlines stop server
//! handlers, dropped calls are cancelled on the server, a draining server's
//! clients move to a fresh connection, and stats count what happened.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rpc_client::{Client, StatusCode};
use rpc_core::CallContext;
use rpc_core::Frame;
use rpc_server::{Router, ServerOptions, Status};
use rpc_tests::{
    client_tls, decode_frames, frame_bytes, hello_bytes, send, FaultProxy, StopTime, TestServer,
};
use tokio::io::AsyncReadExt;

/// `work(ms)`: a handler that would run `ms` milliseconds, recording when
/// its future goes away.
fn router_with_work(stopped: Arc<Mutex<Option<Instant>>>) -> Router {
    rpc_server::demo::router().route_with_context("work", move |_ctx: CallContext, ms: u64| {
        let guard = StopTime(stopped.clone());
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<(), Status>(())
        }
    })
}

async fn stopped_within(stopped: &Mutex<Option<Instant>>, limit: Duration) -> Option<Instant> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(t) = *stopped.lock().unwrap() {
            return Some(t);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A raw peer that never cancels: only the server's own deadline can stop
/// the handler and answer the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_stops_a_handler_when_the_deadline_passes() {
    let stopped = Arc::new(Mutex::new(None));
    let server =
        TestServer::start(router_with_work(stopped.clone()), ServerOptions::default()).await;
    let mut tls = server.raw_tls().await;
    let mut bytes = hello_bytes();
    bytes.extend(frame_bytes(Frame::Request {
        id: 1,
        method: "work".into(),
        deadline_ms: Some(300),
        metadata: rpc_core::Metadata::new(),
        body: rpc_core::codec::encode(&10_000u64, 16).unwrap(),
    }));
    let sent = Instant::now();
    send(&mut tls, &bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&buf[..n]);
            for f in decode_frames(&got) {
                if let Frame::Response { id: 1, result } = f {
                    return result.unwrap_err();
                }
            }
        }
    })
    .await
    .expect("no answer within 5 s of a 300 ms deadline");
    assert_eq!(status.code, StatusCode::DeadlineExceeded, "{status}");
    assert_eq!(status.message, "the call's deadline passed on the server");
    let at = stopped_within(&stopped, Duration::from_secs(3))
        .await
        .expect("the 10 s handler was not stopped");
    let after = at.duration_since(sent);
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_secs(2),
        "stopped after {after:?}"
    );
}

/// A client's own deadline fails its call and cancels the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_fails_the_call_and_stops_the_handler() {
    let stopped = Arc::new(Mutex::new(None));
    let server =
        TestServer::start(router_with_work(stopped.clone()), ServerOptions::default()).await;
    let client = server.client().await;
    let sent = Instant::now();
    let err = client
        .call_with_timeout::<_, ()>("work", &10_000u64, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::DeadlineExceeded), "{err}");
    let at = stopped_within(&stopped, Duration::from_secs(3))
        .await
        .expect("the 10 s handler was not stopped");
    let after = at.duration_since(sent);
    assert!(after < Duration::from_secs(1), "stopped after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_call_stops_its_handler_on_the_server() {
    let stopped = Arc::new(Mutex::new(None));
    let server =
        TestServer::start(router_with_work(stopped.clone()), ServerOptions::default()).await;
    let client = server.client().await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, ()>("work", &10_000u64).await })
    };
    rpc_tests::until_in_flight(&client, 1).await;
    assert!(stopped.lock().unwrap().is_none(), "handler ended early");
    call.abort();
    let dropped_at = Instant::now();
    let at = stopped_within(&stopped, Duration::from_secs(3))
        .await
        .expect("the server handler kept running after the call was dropped");
    assert!(at.duration_since(dropped_at) < Duration::from_secs(1));
    let stats = server_stats(&client).await;
    assert_eq!(
        stats.calls_in_flight, 1,
        "only the stats call itself: {stats:?}"
    );
    assert_eq!(error_count(&stats, "cancelled"), 1, "{stats:?}");
}

async fn server_stats(client: &Client) -> rpc_core::stats::StatsSnapshot {
    client.stats().await.unwrap()
}

/// The server's connection count once it reaches `want`, or the last one
/// seen after about a second.
async fn connections_settle_at(client: &Client, want: u64) -> u64 {
    let mut connections = u64::MAX;
    for _ in 0..100 {
        connections = server_stats(client).await.connections;
        if connections == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    connections
}

fn error_count(stats: &rpc_core::stats::StatsSnapshot, kind: &str) -> u64 {
    stats
        .errors
        .iter()
        .find(|(k, _)| k == kind)
        .map(|(_, n)| *n)
        .unwrap()
}

/// Waits (at most 5 s) until `count` is no longer `from`; panics with
/// `what` otherwise.
async fn until_moved(count: impl Fn() -> u64, from: u64, what: &str) {
    let moved = async {
        while count() == from {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), moved)
        .await
        .unwrap_or_else(|_| panic!("{what}"));
}

/// A demo server behind a fault proxy, a replacement with its certificate
/// that counts the echoes it serves, and a client connected through the
/// proxy: for tests that drain the first and move clients to the second.
struct Replacement {
    old: TestServer,
    new: TestServer,
    served: Arc<AtomicU64>,
    proxy: FaultProxy,
    client: Client,
}

async fn replacement() -> Replacement {
    let old = TestServer::demo().await;
    let served = Arc::new(AtomicU64::new(0));
    let counting = {
        let served = served.clone();
        Router::new().route("Demo.echo", move |s: String| {
            served.fetch_add(1, Ordering::Relaxed);
            async move { Ok(s) }
        })
    };
    let new =
        TestServer::start_with_certs(old.certs.clone(), counting, ServerOptions::default()).await;
    let proxy = FaultProxy::start(old.addr).await;
    let client = Client::builder(client_tls(&old.certs))
        .server_name("localhost")
        .connect(&proxy.address())
        .await
        .unwrap();
    Replacement {
        old,
        new,
        served,
        proxy,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_goaway_calls_in_flight_finish_and_new_calls_use_a_fresh_connection() {
    let Replacement {
        old,
        new,
        served,
        proxy,
        client,
    } = replacement().await;
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, ()>("Demo.sleep", &600u64).await })
    };
    // Four streams of calls run across the drain; none may fail.
    let streams: Vec<_> = (0..4)
        .map(|s| {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0..400 {
                    let text = format!("stream {s} call {i}");
                    let reply: String = client
                        .call_with_timeout("Demo.echo", &text, Duration::from_secs(5))
                        .await
                        .unwrap_or_else(|e| panic!("{text} failed across the drain: {e}"));
                    assert_eq!(reply, text);
                }
            })
        })
        .collect();
    // The Demo.sleep call is on the old server before the drain begins.
    rpc_tests::until_in_flight(&client, 1).await;
    // New connections reach the replacement; the old server drains.
    proxy.set_upstream(new.addr);
    let draining = tokio::spawn(old.shutdown(Duration::from_secs(10)));
    // The client takes the GoAway and connects afresh...
    let mut states = client.state();
    tokio::time::timeout(Duration::from_secs(5), async {
        while proxy.accepted() < 2 {
            let _ = states.changed().await;
        }
        let _ = states
            .wait_for(|s| *s == rpc_client::ConnState::Ready)
            .await;
    })
    .await
    .expect("no fresh connection after GoAway");
    // ...where new calls go.
    let before = served.load(Ordering::Relaxed);
    let reply: String = client
        .call_with_timeout("Demo.echo", "fresh", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply, "fresh");
    assert!(
        served.load(Ordering::Relaxed) > before,
        "the new call did not reach the new server"
    );
    // The call in flight on the old connection still finished there.
    in_flight.await.unwrap().unwrap();
    for stream in streams {
        stream.await.unwrap();
    }
    draining.await.unwrap().unwrap();
    assert_eq!(proxy.accepted(), 2);
}

/// A call that reaches a server after it began to drain is refused unrun
/// (`ShuttingDown`); the client sends it again on a fresh connection, so
/// the caller sees no error. The proxy holds the server's replies back, so
/// the call is certain to be sent on the draining connection, before the
/// client has read the GoAway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_refused_by_a_draining_server_is_sent_again_on_a_fresh_connection() {
    let Replacement {
        old,
        new,
        served,
        proxy,
        client,
    } = replacement().await;
    // A call in flight keeps the old connection draining for a while.
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, ()>("Demo.sleep", &2_000u64).await })
    };
    rpc_tests::until_in_flight(&client, 1).await;
    proxy.hold_replies(true);
    proxy.set_upstream(new.addr);
    let down = proxy.read_down();
    let draining = tokio::spawn(old.shutdown(Duration::from_secs(10)));
    // The server's GoAway reaches the proxy, which holds it: the server is
    // draining, and the client, which has not read it, sends on.
    until_moved(
        || proxy.read_down(),
        down,
        "no GoAway from the draining server",
    )
    .await;
    let up = proxy.sent_up();
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call_with_timeout::<_, String>("Demo.echo", "again", Duration::from_secs(5))
                .await
        })
    };
    until_moved(
        || proxy.sent_up(),
        up,
        "the call never left on the old connection",
    )
    .await;
    proxy.hold_replies(false);
    assert_eq!(call.await.unwrap().unwrap(), "again");
    assert_eq!(
        served.load(Ordering::Relaxed),
        1,
        "not served by the new server"
    );
    in_flight.await.unwrap().unwrap();
    draining.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_connections_calls_and_errors_by_kind() {
    let server = TestServer::demo().await;
    let a = server.client().await;
    let b = server.client().await;
    for i in 0..5i64 {
        let _: i64 = a.call("Demo.add", &(i, i)).await.unwrap();
    }
    let _ = b.call::<_, ()>("no_such", &()).await.unwrap_err();
    let _ = b
        .call::<_, i64>("Demo.add", "not numbers")
        .await
        .unwrap_err();
    let stats = server_stats(&a).await;
    assert_eq!(stats.connections, 2, "{stats:?}");
    assert_eq!(stats.calls_in_flight, 1, "{stats:?}");
    assert_eq!(stats.calls_served, 5, "{stats:?}");
    assert_eq!(error_count(&stats, "unknown_method"), 1, "{stats:?}");
    assert_eq!(error_count(&stats, "invalid_argument"), 1, "{stats:?}");
    assert_eq!(stats.peers.len(), 2, "{stats:?}");
    b.close();
    b.closed().await;
    // The server notices the close and drops the connection from its list.
    assert_eq!(connections_settle_at(&a, 1).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_clone_of_a_client_closes_its_connection() {
    let server = TestServer::demo().await;
    let watcher = server.client().await;
    let client = server.client().await;
    let copy = client.clone();
    let _: i64 = client.call("Demo.add", &(1i64, 2i64)).await.unwrap();
    let mut states = client.state();
    drop(client);
    // One clone left: the connection stays and still serves calls.
    let _: i64 = copy.call("Demo.add", &(3i64, 4i64)).await.unwrap();
    assert_eq!(server_stats(&watcher).await.connections, 2);
    drop(copy);
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == rpc_client::ConnState::Closed),
    )
    .await
    .expect("the client did not close when its last clone went")
    .unwrap();
    assert_eq!(
        connections_settle_at(&watcher, 1).await,
        1,
        "the server still holds the dropped client's connection"
    );
}

/// A quick handler's call ends on its first poll, with no task of its own;
/// a task it starts with the call's token must still hear that the call
/// is over, and a context kept past the call must give a fired token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_token_kept_past_a_quick_handler_fires_when_the_call_ends() {
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let fired_tx = Arc::new(Mutex::new(Some(fired_tx)));
    let kept: Arc<Mutex<Vec<CallContext>>> = Arc::default();
    let router = {
        let kept = kept.clone();
        let kept2 = kept.clone();
        Router::new()
            .route_with_context("watch", move |ctx: CallContext, (): ()| {
                let token = ctx.cancelled();
                assert!(!token.is_cancelled(), "fired while the call runs");
                let tx = fired_tx.lock().unwrap().take();
                tokio::spawn(async move {
                    token.cancelled().await;
                    if let Some(tx) = tx {
                        let _ = tx.send(());
                    }
                });
                kept.lock().unwrap().push(ctx);
                async { Ok::<(), Status>(()) }
            })
            // Keeps the context without ever asking for the token.
            .route_with_context("keep", move |ctx: CallContext, (): ()| {
                kept2.lock().unwrap().push(ctx);
                async { Ok::<(), Status>(()) }
            })
    };
    let server = TestServer::start(router, ServerOptions::default()).await;
    let client = server.client().await;
    client.call::<_, ()>("watch", &()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), fired_rx)
        .await
        .expect("the token a quick handler took never fired")
        .unwrap();
    client.call::<_, ()>("keep", &()).await.unwrap();
    let kept = kept.lock().unwrap();
    assert_eq!(kept.len(), 2);
    for ctx in kept.iter() {
        assert!(
            ctx.cancelled().is_cancelled(),
            "{ctx:?}: a token asked for after the call ended has not fired"
        );
    }
    assert_eq!(kept[1].method(), "keep");
}

/// `serve` runs its accept loop as a task of its own. Dropping the `serve`
/// future must still stop accepting: the loop's task is aborted and the
/// listener closed, as when the loop ran inside the future.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_serve_future_closes_the_listener() {
    let certs = rpc_tests::make_certs().unwrap();
    let server = rpc_server::Server::builder(rpc_tests::server_tls(&certs))
        .router(rpc_server::demo::router())
        .build()
        .unwrap();
    let listener = rpc_server::Server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    let client = Client::connect(&addr.to_string(), client_tls(&certs))
        .await
        .unwrap();
    let sum: i64 = client.call("Demo.add", &(1i64, 2i64)).await.unwrap();
    assert_eq!(sum, 3);
    serving.abort();
    assert!(serving.await.unwrap_err().is_cancelled());
    // Bounded: 100 tries, 20 ms apart.
    let mut refused = false;
    for _ in 0..100 {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(refused, "the port still accepts after `serve` was dropped");
}

/// `Client::connect` makes its first connection in a task of its own. A
/// caller that gives up on it (here by a timeout) must stop the handshake
/// then, not leave it running until the handshake timeout (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_on_connect_ends_the_handshake_at_once() {
    use tokio::io::AsyncReadExt;
    // A peer that takes the connection and never answers the ClientHello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let certs = rpc_tests::make_certs().unwrap();
    let attempt = tokio::time::timeout(
        Duration::from_millis(200),
        Client::connect(&addr.to_string(), client_tls(&certs)),
    )
    .await;
    assert!(attempt.is_err(), "connected to a peer that never answered");
    let (mut sock, _) = listener.accept().await.unwrap();
    let (mut buf, mut got) = (vec![0u8; 4096], 0);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(got > 0, "no ClientHello arrived");
    assert!(
        closed.is_ok(),
        "the abandoned handshake kept its socket open"
    );
}
