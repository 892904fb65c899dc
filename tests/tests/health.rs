//! The health service over real TLS on 127.0.0.1: statuses per service and
//! for the whole server, set from code, watched, and NOT_SERVING while the
//! server drains.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rpc_client::{ClientError, HealthStatus, StatusCode};
use rpc_core::health::CHECK_METHOD;
use rpc_core::{codec, Frame};
use rpc_server::{demo, devcerts, Server};
use rpc_tests::{decode_frames, frame_bytes, hello_bytes, send, server_tls, TestServer};
use tokio::io::AsyncReadExt;

/// The demo server, and its health record.
async fn demo_with_health() -> (TestServer, rpc_server::Health) {
    let certs = devcerts::generate().unwrap();
    let server = Server::builder(server_tls(&certs))
        .router(demo::router())
        .build()
        .unwrap();
    let health = server.health();
    (TestServer::serve(certs, server).await, health)
}

#[tokio::test]
async fn every_service_starts_serving_and_code_can_change_it() {
    let (test, health) = demo_with_health().await;
    let client = test.client().await;

    assert_eq!(client.health("").await.unwrap(), HealthStatus::Serving);
    assert_eq!(client.health("Demo").await.unwrap(), HealthStatus::Serving);
    let err = client.health("Nope").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Call(e) if e.code() == Some(StatusCode::NotFound)),
        "{err}"
    );

    // A watcher learns of the change as it happens.
    let watcher = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .watch_health("Demo", Some(HealthStatus::Serving))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!watcher.is_finished(), "Watch answered before a change");
    health.set("Demo", HealthStatus::NotServing);
    assert_eq!(watcher.await.unwrap().unwrap(), HealthStatus::NotServing);
    assert_eq!(
        client.health("Demo").await.unwrap(),
        HealthStatus::NotServing
    );
    // The whole server is still serving; calls still work.
    assert_eq!(client.health("").await.unwrap(), HealthStatus::Serving);
    let sum: i64 = client.call("Demo.add", &(2i64, 3i64)).await.unwrap();
    assert_eq!(sum, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_answers_not_serving_on_the_connections_it_drains() {
    let (test, health) = demo_with_health().await;

    // A connection with a long call in flight, so its drain takes a while.
    let mut tls = test.raw_tls().await;
    let mut bytes = hello_bytes();
    bytes.extend(frame_bytes(Frame::Request {
        id: 1,
        method: "Demo.sleep".into(),
        deadline_ms: None,
        metadata: rpc_core::Metadata::new(),
        body: codec::encode(&(800u64,), 1024).unwrap(),
    }));
    send(&mut tls, &bytes).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stopping = tokio::spawn(test.shutdown(Duration::from_secs(5)));
    // The server's own record turns at once...
    tokio::time::timeout(Duration::from_secs(2), async {
        while health.get("") != Some(HealthStatus::NotServing) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    // ...and a check on the draining connection is answered, not refused.
    let check = frame_bytes(Frame::Request {
        id: 2,
        method: CHECK_METHOD.into(),
        deadline_ms: None,
        metadata: rpc_core::Metadata::new(),
        body: codec::encode(&String::new(), 1024).unwrap(),
    });
    send(&mut tls, &check).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let reply = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the health reply");
            got.extend_from_slice(&buf[..n]);
            let frames = decode_frames(&got);
            if let Some(result) = frames.into_iter().find_map(|f| match f {
                Frame::Response { id: 2, result } => Some(result),
                _ => None,
            }) {
                return result;
            }
        }
    })
    .await
    .unwrap();
    let body = reply.unwrap();
    let status: HealthStatus = codec::decode(&body, body.len(), 8).unwrap();
    assert_eq!(status, HealthStatus::NotServing);
    stopping.await.unwrap().unwrap();
}
