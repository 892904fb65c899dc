//! A client connection facing a hostile server (a raw pipe end after
//! `Hello`): each rule broken gets the client's `GoAway` naming it, and the
//! client's pending calls fail at once instead of hanging.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use rpc_core::transport::{exchange_hello, hello_for};
use rpc_core::{ConnectionConfig, Error, Frame, FrameCodec};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

const T: Duration = Duration::from_secs(5);

/// Sends `frame` to a client with a call pending; returns the client's
/// `GoAway` reason and what the pending call failed with.
async fn client_refuses(frame: Frame) -> (String, Error) {
    let (conn, peer) = common::client_with_raw_peer(ConnectionConfig::default()).await;
    let (read, mut write) = tokio::io::split(peer);
    let mut frames = FramedRead::new(read, FrameCodec::new(1 << 20, 1 << 20));
    let call = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.call("echo", Bytes::from_static(b"x"), T).await })
    };
    // The call is on the wire before the hostile frame goes out.
    let first = tokio::time::timeout(T, frames.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first, Frame::Request { id: 1, .. }), "{first:?}");
    write.write_all(&common::encode(frame)).await.unwrap();
    let mut reason = None;
    while let Some(Ok(f)) = tokio::time::timeout(T, frames.next()).await.unwrap() {
        if let Frame::GoAway { reason: r } = f {
            reason = Some(r);
        }
    }
    let err = tokio::time::timeout(T, call)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    (reason.expect("no GoAway from the client"), err)
}

#[tokio::test]
async fn a_request_from_the_server_is_refused() {
    let (reason, err) = client_refuses(Frame::Request {
        id: 1,
        method: "echo".into(),
        deadline_ms: None,
        metadata: rpc_core::Metadata::new(),
        body: Bytes::new(),
    })
    .await;
    assert_eq!(
        reason,
        "protocol violation: Request sent to a peer that serves no calls"
    );
    assert!(err.to_string().contains("serves no calls"), "{err}");
}

#[tokio::test]
async fn a_response_to_a_call_never_made_is_refused() {
    let (reason, err) = client_refuses(Frame::Response {
        id: 77,
        result: Ok(Bytes::new()),
    })
    .await;
    assert_eq!(
        reason,
        "protocol violation: Response for call 77, which was never made"
    );
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
}

#[tokio::test]
async fn a_second_hello_from_the_server_is_refused() {
    let (reason, _) = client_refuses(Frame::Hello(hello_for(&ConnectionConfig::default()))).await;
    assert_eq!(reason, "protocol violation: second Hello on one connection");
}

#[tokio::test]
async fn a_huge_hello_from_the_server_is_refused_naming_the_limit() {
    let cfg = ConnectionConfig::default();
    let (mut server, mut client) = tokio::io::duplex(1 << 16);
    // A length prefix of 4 GiB - 1 where the Hello should be.
    server.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let err = exchange_hello(&mut client, hello_for(&cfg), cfg.max_frame)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::FrameTooLarge {
                len: 4_294_967_295,
                max: 4_194_304
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_servers_goaway_reason_is_escaped_and_cut() {
    let (conn, peer) = common::client_with_raw_peer(ConnectionConfig::default()).await;
    let (_read, mut write) = tokio::io::split(peer);
    let reason = format!("\u{1b}[2J{}", "x".repeat(10_000));
    write
        .write_all(&common::encode(Frame::GoAway { reason }))
        .await
        .unwrap();
    tokio::time::timeout(T, async {
        while !conn.goaway_received() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let err = conn.call("echo", Bytes::new(), T).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("\\u{1b}[2J"), "{}", &text[..40]);
    assert!(!text.chars().any(char::is_control));
    assert!(text.len() < 600, "{}", text.len());
}
