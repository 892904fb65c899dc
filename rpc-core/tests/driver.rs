//! The connection driver over in-memory pipes: calls, errors as data,
//! cancellation, limits, version refusal, write batching, and no call left
//! hanging when the connection dies.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{pair, pair_with};
use rpc_core::transport::{exchange_hello, hello_for};
use rpc_core::{ConnectionConfig, Error, StatusCode};

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn echo_round_trip_and_unknown_method_keeps_connection_usable() {
    let p = pair(ConnectionConfig::default()).await;
    let reply = p
        .client
        .call("echo", Bytes::from_static(b"hi"), T)
        .await
        .unwrap();
    assert_eq!(&reply[..], b"hi");
    let err = p.client.call("nope", Bytes::new(), T).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::UnknownMethod), "{err}");
    let reply = p
        .client
        .call("echo", Bytes::from_static(b"again"), T)
        .await
        .unwrap();
    assert_eq!(&reply[..], b"again");
}

#[tokio::test]
async fn many_concurrent_calls_each_get_their_own_reply() {
    let p = pair(ConnectionConfig::default()).await;
    let calls = (0..2000u32).map(|i| {
        let c = p.client.clone();
        async move {
            let body = Bytes::from(i.to_le_bytes().to_vec());
            (i, c.call("echo", body, T).await)
        }
    });
    for (i, r) in futures_util::future::join_all(calls).await {
        assert_eq!(&r.unwrap()[..], &i.to_le_bytes()[..]);
    }
}

#[tokio::test]
async fn writer_batches_frames_into_fewer_flushes() {
    let p = pair(ConnectionConfig::default()).await;
    let before = p.client_flushes.load(Ordering::SeqCst);
    let calls = (0..500).map(|_| p.client.call("echo", Bytes::from_static(b"x"), T));
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    let flushes = p.client_flushes.load(Ordering::SeqCst) - before;
    assert!(
        flushes < 250,
        "{flushes} flushes for 500 requests: not batched"
    );
}

#[tokio::test]
async fn pending_calls_fail_at_once_when_the_connection_closes() {
    let p = pair(ConnectionConfig::default()).await;
    let c = p.client.clone();
    let hung = tokio::spawn(async move {
        c.call("hang", Bytes::new(), Duration::from_secs(3600))
            .await
    });
    common::until_count(&p.started, 1).await;
    p.server.close();
    let err = tokio::time::timeout(Duration::from_secs(5), hung)
        .await
        .expect("call hung")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err}");
    p.client.closed().await;
    // New calls on a closed connection fail immediately too, as not sent.
    let err = p.client.call("echo", Bytes::new(), T).await.unwrap_err();
    assert!(
        matches!(&err, Error::NotSent { reason } if reason.starts_with("connection closed")),
        "{err}"
    );
}

#[tokio::test]
async fn dropping_a_call_cancels_the_handler() {
    let p = pair(ConnectionConfig::default()).await;
    let call = p.client.call("hang", Bytes::new(), T);
    assert!(tokio::time::timeout(Duration::from_millis(100), call)
        .await
        .is_err());
    for _ in 0..100 {
        if p.cancelled.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server handler was not cancelled");
}

#[tokio::test(start_paused = true)]
async fn deadline_fails_the_call_and_stops_the_handler() {
    let p = pair(ConnectionConfig::default()).await;
    let err = p
        .client
        .call("hang", Bytes::new(), Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
    assert_eq!(err.code(), Some(StatusCode::DeadlineExceeded));
    // The server drops the handler's future (its count goes up then).
    tokio::time::timeout(Duration::from_secs(5), async {
        while p.cancelled.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the server's handler still runs after the deadline");
}

#[tokio::test]
async fn client_queues_calls_beyond_the_servers_announced_limit() {
    let mut cfg = ConnectionConfig::default();
    cfg.max_in_flight = 3;
    let p = pair(cfg).await;
    assert_eq!(p.client.peer_hello().max_in_flight, 3);
    let calls = (0..50).map(|_| p.client.call("echo", Bytes::from_static(b"q"), T));
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(&r.unwrap()[..], b"q");
    }
}

#[tokio::test]
async fn excess_calls_are_refused_with_overloaded() {
    let mut cfg = ConnectionConfig::default();
    cfg.max_in_flight = 2;
    let p = pair_with(cfg, true).await;
    let c1 = p.client.clone();
    let c2 = p.client.clone();
    let _h1 = tokio::spawn(async move { c1.call("hang", Bytes::new(), T).await });
    let _h2 = tokio::spawn(async move { c2.call("hang", Bytes::new(), T).await });
    common::until_count(&p.started, 2).await;
    let err = p.client.call("echo", Bytes::new(), T).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Overloaded), "{err}");
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_call() {
    let p = pair(ConnectionConfig::default()).await;
    let err = p.client.call("panic", Bytes::new(), T).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Internal), "{err}");
    assert_eq!(
        &p.client
            .call("echo", Bytes::from_static(b"ok"), T)
            .await
            .unwrap()[..],
        b"ok"
    );
}

#[tokio::test]
async fn request_over_the_peers_frame_limit_is_refused_locally() {
    let mut cfg = ConnectionConfig::default();
    cfg.max_frame = 1024;
    let p = pair(cfg).await;
    let err = p
        .client
        .call("echo", Bytes::from(vec![0u8; 4096]), T)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::FrameTooLarge { max: 1024, .. }),
        "{err}"
    );
    assert!(p
        .client
        .call("echo", Bytes::from_static(b"small"), T)
        .await
        .is_ok());
}

#[tokio::test]
async fn version_mismatch_is_refused_on_both_sides() {
    // A newer peer, and one still on version 1 (before call metadata).
    let ours = rpc_core::PROTOCOL_VERSION;
    for theirs in [ours + 1, 1] {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let cfg = ConnectionConfig::default();
        let mut other = hello_for(&cfg);
        other.version = theirs;
        let (ra, rb) = tokio::join!(
            exchange_hello(&mut a, other, cfg.max_frame),
            exchange_hello(&mut b, hello_for(&cfg), cfg.max_frame),
        );
        let ea = ra.unwrap_err();
        let eb = rb.unwrap_err();
        assert!(
            matches!(ea, Error::VersionMismatch { ours: o, theirs: t } if o == theirs && t == ours),
            "{ea}"
        );
        assert!(
            matches!(eb, Error::VersionMismatch { ours: o, theirs: t } if o == ours && t == theirs),
            "{eb}"
        );
    }
}

/// A server connection whose peer is a raw pipe end that completed `Hello`.
async fn server_with_raw_peer() -> (rpc_core::Connection, tokio::io::DuplexStream) {
    server_with_raw_peer_config(ConnectionConfig::default()).await
}

async fn server_with_raw_peer_config(
    cfg: ConnectionConfig,
) -> (rpc_core::Connection, tokio::io::DuplexStream) {
    let (a, b, hello) = common::hello_pair(&cfg, 1 << 16).await;
    let service = std::sync::Arc::new(common::TestService::default());
    let (conn, driver) = rpc_core::connection::start(b, &cfg, common::addr(), hello, Some(service));
    tokio::spawn(driver);
    (conn, a)
}

async fn goaway_reason(peer: impl tokio::io::AsyncRead + Unpin) -> Option<String> {
    use futures_util::StreamExt;
    let mut frames =
        tokio_util::codec::FramedRead::new(peer, rpc_core::FrameCodec::new(1 << 20, 1 << 20));
    while let Some(Ok(f)) = frames.next().await {
        if let rpc_core::Frame::GoAway { reason } = f {
            return Some(reason);
        }
    }
    None
}

fn request(id: u64, method: &str) -> bytes::BytesMut {
    common::encode(rpc_core::Frame::Request {
        id,
        method: method.into(),
        deadline_ms: None,
        metadata: rpc_core::Metadata::new(),
        body: Bytes::new(),
    })
}

#[tokio::test]
async fn a_request_id_already_in_flight_is_a_protocol_error() {
    use tokio::io::AsyncWriteExt;
    let (conn, mut peer) = server_with_raw_peer().await;
    peer.write_all(&request(5, "hang")).await.unwrap();
    peer.write_all(&request(5, "hang")).await.unwrap();
    let reason = goaway_reason(peer).await.unwrap();
    assert!(
        reason.contains("request id 5 is already in flight"),
        "{reason}"
    );
    conn.closed().await;
}

#[tokio::test]
async fn a_cancel_for_a_call_never_requested_is_a_protocol_error_but_a_late_one_is_not() {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let (conn, peer) = server_with_raw_peer().await;
    let (read, mut write) = tokio::io::split(peer);
    let mut frames =
        tokio_util::codec::FramedRead::new(read, rpc_core::FrameCodec::new(1 << 20, 1 << 20));
    write.write_all(&request(3, "echo")).await.unwrap();
    // Call 3 finishes at once (echo); its Cancel arrives late: ignored.
    let answer = tokio::time::timeout(T, frames.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(answer, rpc_core::Frame::Response { id: 3, .. }),
        "{answer:?}"
    );
    write
        .write_all(&common::encode(rpc_core::Frame::Cancel { id: 3 }))
        .await
        .unwrap();
    // Frames are handled in order: the Pong means the Cancel was taken.
    write
        .write_all(&common::encode(rpc_core::Frame::Ping { nonce: 8 }))
        .await
        .unwrap();
    let pong = tokio::time::timeout(T, frames.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, rpc_core::Frame::Pong { nonce: 8 });
    assert!(!conn.is_closed(), "{:?}", conn.close_reason());
    write
        .write_all(&common::encode(rpc_core::Frame::Cancel { id: 99 }))
        .await
        .unwrap();
    let mut reason = None;
    while let Some(Ok(f)) = tokio::time::timeout(T, frames.next()).await.unwrap() {
        if let rpc_core::Frame::GoAway { reason: r } = f {
            reason = Some(r);
        }
    }
    let reason = reason.unwrap();
    assert!(
        reason.contains("Cancel for call 99, which was never requested"),
        "{reason}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_is_cut_off_after_the_write_stall_timeout() {
    use tokio::io::AsyncWriteExt;
    let mut cfg = ConnectionConfig::default();
    cfg.write_stall_timeout = Duration::from_secs(5);
    let (conn, peer) = common::client_with_raw_peer(cfg).await;
    // The peer keeps pinging (so it is alive) but never reads.
    let (_unread, mut write) = tokio::io::split(peer);
    tokio::spawn(async move {
        for nonce in 0..100 {
            if write
                .write_all(&common::encode(rpc_core::Frame::Ping { nonce }))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    });
    let started = tokio::time::Instant::now();
    let calls = (0..64).map(|_| {
        conn.call(
            "m",
            Bytes::from(vec![0u8; 64 * 1024]),
            Duration::from_secs(3600),
        )
    });
    let results = futures_util::future::join_all(calls).await;
    let took = started.elapsed();
    assert!(results.iter().all(|r| r.is_err()));
    let reason = conn.close_reason().unwrap();
    assert!(reason.contains("peer stopped reading"), "{reason}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(7),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_frame_dribbled_forever_hits_the_partial_frame_deadline() {
    use tokio::io::AsyncWriteExt;
    // Default config: heartbeat 5 s / 15 s, partial-frame deadline 30 s.
    let (conn, peer) = server_with_raw_peer().await;
    let (read, mut write) = tokio::io::split(peer);
    let started = tokio::time::Instant::now();
    // Announce 1000 bytes, then one byte every 2 s: alive for the
    // heartbeat, but the frame never completes.
    tokio::spawn(async move {
        let _ = write.write_all(&1000u32.to_be_bytes()).await;
        for _ in 0..999 {
            if write.write_all(&[0]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let reason = goaway_reason(read_only(read)).await.unwrap();
    assert!(reason.contains("partial-frame deadline"), "{reason}");
    let took = started.elapsed();
    // 30 s, checked at heartbeat ticks (5 s apart).
    assert!(
        took >= Duration::from_secs(30) && took <= Duration::from_secs(36),
        "{took:?}"
    );
    conn.closed().await;
}

/// A read half as a full stream for `goaway_reason`.
fn read_only(
    read: tokio::io::ReadHalf<tokio::io::DuplexStream>,
) -> impl tokio::io::AsyncRead + Unpin {
    read
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_sends_calls_but_never_reads_replies_is_held_back_then_cut_off() {
    use tokio::io::AsyncWriteExt;
    let mut cfg = ConnectionConfig::default();
    cfg.write_stall_timeout = Duration::from_secs(5);
    let (conn, a) = server_with_raw_peer_config(cfg.clone()).await;
    // 10,000 echo calls of 16 KiB (160 MiB of replies) into a peer that
    // never reads. The server must stop taking calls once its replies back
    // up, not buffer them all.
    let (_unread, mut write) = tokio::io::split(a);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        for id in 1..=10_000u64 {
            let frame = rpc_core::Frame::Request {
                id,
                method: "echo".into(),
                deadline_ms: None,
                metadata: rpc_core::Metadata::new(),
                body: Bytes::from(vec![1u8; 16 * 1024]),
            };
            if write.write_all(&common::encode(frame)).await.is_err() {
                break;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let started = tokio::time::Instant::now();
    conn.closed().await;
    let took = started.elapsed();
    let reason = conn.close_reason().unwrap();
    assert!(reason.contains("peer stopped reading"), "{reason}");
    assert!(took < Duration::from_secs(7), "{took:?}");
    let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
    let queue = cfg.outbound_queue;
    assert!(
        sent <= queue + 16,
        "the server read {sent} calls with its replies unread (queue {queue})"
    );
}

/// A client connection whose peer is a raw pipe end that completed `Hello`
/// (announcing `peer_max_in_flight`) and never answers.
async fn client_with_silent_peer(
    peer_max_in_flight: usize,
) -> (rpc_core::Connection, tokio::io::DuplexStream) {
    let cfg = ConnectionConfig::default();
    let mut peer_cfg = ConnectionConfig::default();
    peer_cfg.max_in_flight = peer_max_in_flight;
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    let (ha, hb) = tokio::join!(
        exchange_hello(&mut a, hello_for(&peer_cfg), cfg.max_frame),
        exchange_hello(&mut b, hello_for(&cfg), cfg.max_frame),
    );
    ha.unwrap();
    let (conn, driver) = rpc_core::connection::start(b, &cfg, common::addr(), hb.unwrap(), None);
    tokio::spawn(driver);
    (conn, a)
}

/// A call with an hour's deadline to a peer that never answers, running.
fn an_hour_long_call(
    client: &rpc_core::Connection,
) -> tokio::task::JoinHandle<Result<Bytes, Error>> {
    let c = client.clone();
    tokio::spawn(async move {
        c.call("hang", Bytes::new(), Duration::from_secs(3600))
            .await
    })
}

/// The frames the raw peer has received so far.
async fn frames_received(peer: &mut tokio::io::DuplexStream) -> Vec<rpc_core::Frame> {
    use futures_util::StreamExt;
    let mut frames =
        tokio_util::codec::FramedRead::new(peer, rpc_core::FrameCodec::new(1 << 20, 1 << 20));
    let mut got = Vec::new();
    while let Ok(Some(Ok(f))) = tokio::time::timeout(Duration::from_millis(10), frames.next()).await
    {
        got.push(f);
    }
    got
}

#[tokio::test(start_paused = true)]
async fn a_short_deadline_fires_on_time_behind_a_long_one_and_cancels_its_call() {
    let (client, mut peer) = client_with_silent_peer(100).await;
    let long = an_hour_long_call(&client);
    tokio::task::yield_now().await;
    let started = tokio::time::Instant::now();
    let short = tokio::time::timeout(
        Duration::from_secs(10),
        client.call("hang", Bytes::new(), Duration::from_millis(100)),
    )
    .await
    .expect("the short deadline did not fire within 10 s");
    assert!(
        matches!(short, Err(Error::DeadlineExceeded(_))),
        "{short:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(200),
        "{waited:?}"
    );
    assert!(
        !long.is_finished(),
        "the long call failed with the short one"
    );
    let frames = frames_received(&mut peer).await;
    let ids: Vec<String> = frames
        .iter()
        .map(|f| match f {
            rpc_core::Frame::Request { id, .. } => format!("request {id}"),
            rpc_core::Frame::Cancel { id } => format!("cancel {id}"),
            other => other.kind().to_string(),
        })
        .filter(|s| s != "Ping")
        .collect();
    assert_eq!(ids, ["request 1", "request 2", "cancel 2"]);
    long.abort();
}

#[tokio::test(start_paused = true)]
async fn a_call_queued_for_a_slot_fails_at_its_deadline_and_is_never_sent() {
    // The peer serves one call at a time; the second waits locally.
    let (client, mut peer) = client_with_silent_peer(1).await;
    let first = an_hour_long_call(&client);
    tokio::task::yield_now().await;
    let queued = client
        .call("hang", Bytes::new(), Duration::from_millis(100))
        .await;
    assert!(
        matches!(queued, Err(Error::DeadlineExceeded(_))),
        "{queued:?}"
    );
    let frames = frames_received(&mut peer).await;
    let requests: Vec<u64> = frames
        .iter()
        .filter_map(|f| match f {
            rpc_core::Frame::Request { id, .. } | rpc_core::Frame::Cancel { id } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(requests, [1], "only the first call reached the peer");
    assert!(!first.is_finished());
    first.abort();
}

/// Echoes, counting the calls it has been handed.
struct CountingEcho(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl rpc_core::Dispatch for CountingEcho {
    fn dispatch(
        &self,
        _ctx: rpc_core::CallContext,
        body: Bytes,
    ) -> rpc_core::BoxFuture<Result<Bytes, rpc_core::Status>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(body) })
    }
}

/// A stream that notes, at every write, how many calls had been handed to
/// the service by then.
struct NoteWrites {
    inner: tokio::io::DuplexStream,
    handled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    noted: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
}

impl tokio::io::AsyncRead for NoteWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NoteWrites {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let handled = self.handled.load(Ordering::SeqCst);
        self.noted.lock().unwrap().push(handled);
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn replies_to_a_long_burst_leave_before_the_whole_burst_is_handled() {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let cfg = ConnectionConfig::default();
    let (mut peer, b, hello) = common::hello_pair(&cfg, 1 << 20).await;
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let noted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stream = NoteWrites {
        inner: b,
        handled: handled.clone(),
        noted: noted.clone(),
    };
    let service = std::sync::Arc::new(CountingEcho(handled.clone()));
    let (_server, driver) =
        rpc_core::connection::start(stream, &cfg, common::addr(), hello, Some(service));
    tokio::spawn(driver);
    // 64 requests in one write: the server can read them all in one go.
    let mut burst = bytes::BytesMut::new();
    for id in 0..64 {
        burst.extend_from_slice(&request(id, "echo"));
    }
    peer.write_all(&burst).await.unwrap();
    let mut frames =
        tokio_util::codec::FramedRead::new(peer, rpc_core::FrameCodec::new(1 << 20, 1 << 20));
    for _ in 0..64 {
        let frame = tokio::time::timeout(T, frames.next()).await.unwrap();
        assert!(matches!(
            frame,
            Some(Ok(rpc_core::Frame::Response { result: Ok(_), .. }))
        ));
    }
    assert_eq!(handled.load(Ordering::SeqCst), 64);
    let noted = noted.lock().unwrap().clone();
    let first = noted[0];
    assert!(
        first < 64,
        "the first replies left only after all 64 requests were handled ({noted:?})"
    );
}

/// A client connection, its driver's task, and the raw peer, all after
/// `Hello`.
async fn closing_client() -> (
    rpc_core::Connection,
    tokio::task::JoinHandle<String>,
    tokio::io::DuplexStream,
    ConnectionConfig,
) {
    let cfg = ConnectionConfig::default();
    let (peer, end, hello) = common::hello_pair(&cfg, 1 << 16).await;
    let (conn, driver) = rpc_core::connection::start(end, &cfg, common::addr(), hello, None);
    (conn, tokio::spawn(driver), peer, cfg)
}

/// Closes `conn` and reads the raw peer until our close reaches it.
async fn close_and_see_it_arrive(conn: &rpc_core::Connection, peer: &mut tokio::io::DuplexStream) {
    use tokio::io::AsyncReadExt;
    conn.close();
    let mut rest = Vec::new();
    tokio::time::timeout(T, peer.read_to_end(&mut rest))
        .await
        .expect("our close reached the peer")
        .unwrap();
}

/// Over TCP, a socket closed before the peer's answering close_notify
/// arrives makes the kernel answer it with a reset; so the side that closes
/// first keeps reading until the peer's close, then lets go at once.
#[tokio::test(start_paused = true)]
async fn a_side_that_closes_first_lets_go_only_when_the_peer_has_closed() {
    use tokio::io::AsyncWriteExt;
    let (conn, driver, mut peer, cfg) = closing_client().await;
    close_and_see_it_arrive(&conn, &mut peer).await;
    // The driver, which owns the socket, waits for the peer's close,
    // even if a late frame comes first.
    peer.write_all(&common::encode(rpc_core::Frame::Ping { nonce: 7 }))
        .await
        .unwrap();
    tokio::time::sleep(cfg.close_timeout / 2).await;
    assert!(
        !driver.is_finished(),
        "the socket was let go before the peer closed"
    );
    peer.shutdown().await.unwrap();
    let reason = tokio::time::timeout(Duration::from_millis(1), driver)
        .await
        .expect("the peer's close ends the driver at once")
        .unwrap();
    assert_eq!(reason, "closed by this side");
}

/// A peer that never closes holds the closing side for `close_timeout`, no
/// longer.
#[tokio::test(start_paused = true)]
async fn a_peer_that_never_closes_holds_the_closing_side_for_the_close_timeout() {
    let (conn, driver, mut peer, cfg) = closing_client().await;
    let t0 = tokio::time::Instant::now();
    close_and_see_it_arrive(&conn, &mut peer).await;
    let reason = tokio::time::timeout(T, driver)
        .await
        .expect("the driver ends")
        .unwrap();
    let waited = t0.elapsed();
    assert_eq!(reason, "closed by this side");
    assert!(
        waited >= cfg.close_timeout && waited < cfg.close_timeout + Duration::from_millis(50),
        "held for {waited:?}, close timeout {:?}",
        cfg.close_timeout
    );
    drop(peer);
}

#[tokio::test]
async fn a_client_that_drains_says_goaway_first_then_closes() {
    let p = pair(ConnectionConfig::default()).await;
    p.client.drain();
    tokio::time::timeout(Duration::from_secs(2), p.client.closed())
        .await
        .expect("the client's connection did not close");
    assert_eq!(
        p.client.close_reason().as_deref(),
        Some("drained after GoAway")
    );
    // The server heard the GoAway before the close.
    assert!(p.server.goaway_received());
}
