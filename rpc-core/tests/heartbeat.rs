//! The heartbeat inside the driver, over in-memory pipes with paused time:
//! a frozen peer is found, an idle one is not, pings give RTTs, floods are
//! cut off, stray pongs are ignored.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{client_with_raw_peer, encode, pair_full};
use futures_util::StreamExt;
use rpc_core::{ConnectionConfig, Error, Frame, FrameCodec};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

fn fast() -> ConnectionConfig {
    let mut c = ConnectionConfig::default();
    c.heartbeat_interval = Duration::from_millis(100);
    c.heartbeat_timeout = Duration::from_millis(300);
    c
}

#[tokio::test(start_paused = true)]
async fn a_frozen_peer_is_declared_dead_and_the_pending_call_fails_distinctly() {
    let (conn, _frozen) = client_with_raw_peer(fast()).await;
    let started = Instant::now();
    let err = conn
        .call("anything", Bytes::new(), Duration::from_secs(3600))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, Error::PeerUnresponsive(_)), "{err}");
    assert!(err.to_string().contains("peer unresponsive"), "{err}");
    // timeout 300 ms after the last byte received (the Hello, at start).
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(450),
        "{took:?}"
    );
    assert!(conn.is_closed());
    // New calls fail at once, as not sent, for the same reason.
    let err = conn
        .call("x", Bytes::new(), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotSent { reason } if reason.starts_with("peer unresponsive")),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_but_healthy_peer_is_never_declared_dead() {
    let p = pair_full(fast(), fast(), false).await;
    tokio::time::sleep(Duration::from_secs(30)).await; // 100 timeouts
    assert!(!p.client.is_closed(), "{:?}", p.client.close_reason());
    assert!(!p.server.is_closed(), "{:?}", p.server.close_reason());
    assert!(p.client.rtt().is_some(), "no pong measured");
    let echoed = p
        .client
        .call("echo", Bytes::from_static(b"ok"), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(&echoed[..], b"ok");
}

#[tokio::test]
async fn explicit_ping_returns_a_round_trip_time() {
    let p = pair_full(
        ConnectionConfig::default(),
        ConnectionConfig::default(),
        false,
    )
    .await;
    let rtt = p.client.ping().await.unwrap();
    assert!(rtt < Duration::from_secs(1), "{rtt:?}");
    assert_eq!(p.client.rtt(), Some(rtt));
}

#[tokio::test(start_paused = true)]
async fn a_ping_flood_gets_goaway_too_many_pings() {
    let (conn, peer) = client_with_raw_peer(ConnectionConfig::default()).await;
    let (read, mut write) = tokio::io::split(peer);
    // 10 ms apart against an announced 5 s interval; the pipe breaks once
    // the connection is cut.
    for nonce in 0..30 {
        if write
            .write_all(&encode(Frame::Ping { nonce }))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut frames = FramedRead::new(read, FrameCodec::new(1 << 20, 1 << 20));
    let mut goaway = None;
    while let Some(Ok(f)) = frames.next().await {
        if let Frame::GoAway { reason } = f {
            goaway = Some(reason);
        }
    }
    assert_eq!(goaway.as_deref(), Some("too many pings"));
    conn.closed().await;
    assert!(conn.close_reason().unwrap().contains("too many pings"));
}

#[tokio::test(start_paused = true)]
async fn a_pong_for_no_ping_is_ignored() {
    let (conn, mut peer) = client_with_raw_peer(ConnectionConfig::default()).await;
    peer.write_all(&encode(Frame::Pong { nonce: 424242 }))
        .await
        .unwrap();
    // Frames are handled in order: the answer to this Ping means the Pong
    // before it was taken.
    peer.write_all(&encode(Frame::Ping { nonce: 5 }))
        .await
        .unwrap();
    let (read, _write) = tokio::io::split(peer);
    let mut frames = FramedRead::new(read, FrameCodec::new(1 << 20, 1 << 20));
    let answer = frames.next().await.unwrap().unwrap();
    assert_eq!(answer, Frame::Pong { nonce: 5 });
    assert!(!conn.is_closed());
    assert_eq!(conn.rtt(), None);
}

#[tokio::test(start_paused = true)]
async fn the_servers_pong_goes_ahead_of_its_queued_replies() {
    // 200 calls, then a Ping, to a server whose peer reads nothing yet: its
    // replies back up behind a 16 KiB pipe, and the Pong must overtake the
    // ones still queued. Then the peer reads and counts.
    let cfg = ConnectionConfig::default();
    let (peer, end, hello) = common::hello_pair(&cfg, 16 * 1024).await;
    let service = std::sync::Arc::new(common::TestService::default());
    let (conn, driver) =
        rpc_core::connection::start(end, &cfg, common::addr(), hello, Some(service));
    tokio::spawn(driver);
    let (read, mut write) = tokio::io::split(peer);
    let burst = tokio::spawn(async move {
        for id in 1..=200u64 {
            let request = encode(Frame::Request {
                id,
                method: "echo".into(),
                deadline_ms: None,
                metadata: rpc_core::Metadata::new(),
                body: Bytes::from(vec![0u8; 4096]),
            });
            write.write_all(&request).await.unwrap();
        }
        write
            .write_all(&encode(Frame::Ping { nonce: 77 }))
            .await
            .unwrap();
        write
    });
    // Every byte of the burst is in the pipe or read by the server.
    let _write = burst.await.unwrap();
    let mut frames = FramedRead::new(read, FrameCodec::new(1 << 20, 1 << 20));
    let mut replies_before_pong = 0;
    while let Some(Ok(f)) = frames.next().await {
        match f {
            Frame::Response { .. } => replies_before_pong += 1,
            Frame::Pong { nonce: 77 } => break,
            _ => {}
        }
    }
    println!("{replies_before_pong} of 200 replies before the Pong");
    assert!(
        replies_before_pong < 100,
        "the Pong waited behind {replies_before_pong} of 200 replies"
    );
    assert!(!conn.is_closed());
}

#[tokio::test(start_paused = true)]
async fn pong_is_answered_ahead_of_queued_replies() {
    // The server answers 200 queued calls; a ping sent behind them must come
    // back before most of the replies. Watch the order on the wire.
    let (conn, peer) = client_with_raw_peer(ConnectionConfig::default()).await;
    let (read, mut write) = tokio::io::split(peer);
    // Fill the client's outbound queue with calls, then ask for a ping.
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let c = conn.clone();
            tokio::spawn(async move {
                c.call("m", Bytes::from(vec![0u8; 1024]), Duration::from_secs(5))
                    .await
            })
        })
        .collect();
    tokio::task::yield_now().await;
    let pinger = {
        let c = conn.clone();
        tokio::spawn(async move { c.ping().await })
    };
    let mut frames = FramedRead::new(read, FrameCodec::new(1 << 20, 1 << 20));
    let mut requests_before_ping = 0;
    while let Some(Ok(f)) = frames.next().await {
        match f {
            Frame::Request { .. } => requests_before_ping += 1,
            Frame::Ping { nonce } => {
                write
                    .write_all(&encode(Frame::Pong { nonce }))
                    .await
                    .unwrap();
                break;
            }
            _ => {}
        }
    }
    assert!(
        requests_before_ping < 200,
        "ping waited behind every queued call"
    );
    pinger.await.unwrap().unwrap();
    drop(calls);
}
