//! Replies too large for the caller, over real TLS: each fails its own
//! call (`ResourceExhausted` for a reply over the caller's frame limit; a
//! status message cut to 4 KiB), and another call in flight on the same
//! connection completes.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use rpc_core::{Status, StatusCode};
use rpc_server::{Router, ServerOptions};
use rpc_tests::TestServer;
use tokio::sync::{Notify, Semaphore};

const FIVE_MIB: usize = 5 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reply_fails_its_call_alone() {
    // `slow` tells the test it has started, then waits to be released.
    let started = Arc::new(Semaphore::new(0));
    let release = Arc::new(Notify::new());
    let (s, r) = (started.clone(), release.clone());
    let router = Router::new()
        .route("big_err", |(): ()| async {
            Err::<(), _>(Status::internal("x".repeat(FIVE_MIB)))
        })
        .route("big_ok", |(): ()| async { Ok(vec![1u8; FIVE_MIB]) })
        .route("slow", move |(): ()| {
            let (s, r) = (s.clone(), r.clone());
            async move {
                let released = r.notified();
                s.add_permits(1);
                released.await;
                Ok("done".to_string())
            }
        });
    let server = TestServer::start(router, ServerOptions::default()).await;
    let client = server.client().await;
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, String>("slow", &()).await })
    };
    started.acquire().await.unwrap().forget();

    let err = client.call::<_, ()>("big_err", &()).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Internal), "{err}");
    let rpc_client::ClientError::Call(rpc_core::Error::Status(status)) = &err else {
        panic!("expected a status, got {err:?}");
    };
    assert!(
        status.message.len() <= Status::MAX_MESSAGE,
        "{}",
        status.message.len()
    );
    assert!(
        status
            .message
            .ends_with(&format!("[{FIVE_MIB} bytes, cut]")),
        "{}",
        &status.message[4000..]
    );

    let err = client.call::<_, Vec<u8>>("big_ok", &()).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::ResourceExhausted), "{err}");
    assert!(
        err.to_string().contains("frame limit of 4194304 bytes"),
        "{err}"
    );

    // The call in flight all along completes: its connection stayed up.
    release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap(), "done");
}
