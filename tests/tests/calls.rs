//! Calls over real TLS on 127.0.0.1: round trips, many calls on one
//! connection, errors as data, deadlines, graceful drain.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rpc_client::{ClientError, StatusCode};
use rpc_server::{Router, ServerOptions, Status};
use rpc_tests::TestServer;

#[tokio::test]
async fn echo_and_add_round_trip() {
    let server = TestServer::demo().await;
    let client = server.client().await;
    let text: String = client.call("Demo.echo", "hello, world").await.unwrap();
    assert_eq!(text, "hello, world");
    let sum: i64 = client.call("Demo.add", &(40i64, 2i64)).await.unwrap();
    assert_eq!(sum, 42);
    let sum: i64 = client.call("Demo.add", &(-7i64, 3i64)).await.unwrap();
    assert_eq!(sum, -4);
    client.call::<_, ()>("Demo.sleep", &1u64).await.unwrap();
}

#[tokio::test]
async fn a_thousand_concurrent_calls_on_one_connection_each_get_their_own_reply() {
    let server = TestServer::demo().await;
    let client = server.client().await;
    let calls = (0..1000i64).map(|i| {
        let client = client.clone();
        async move {
            let sum: i64 = client.call("Demo.add", &(i, 1_000_000i64)).await?;
            let echo: String = client.call("Demo.echo", &format!("call {i}")).await?;
            Ok::<_, ClientError>((i, sum, echo))
        }
    });
    let results = futures_util::future::join_all(calls).await;
    assert_eq!(results.len(), 1000);
    for r in results {
        let (i, sum, echo) = r.unwrap();
        assert_eq!(sum, i + 1_000_000);
        assert_eq!(echo, format!("call {i}"));
    }
    // Still one connection, to the same server.
    assert_eq!(client.peer_addr(), Some(server.addr));
    assert!(!client.is_closed());
}

#[tokio::test]
async fn unknown_method_and_bad_arguments_return_status_and_the_connection_still_works() {
    let server = TestServer::demo().await;
    let client = server.client().await;

    let err = client
        .call::<_, String>("no_such_method", "x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::UnknownMethod), "{err}");
    assert!(err.to_string().contains("no_such_method"), "{err}");
    let ok: String = client.call("Demo.echo", "after unknown").await.unwrap();
    assert_eq!(ok, "after unknown");

    // `add` takes (i64, i64); send a string.
    let err = client
        .call::<_, i64>("Demo.add", "two and three")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::InvalidArgument), "{err}");
    assert!(err.to_string().contains("Demo.add"), "{err}");
    // One argument instead of two: too short.
    let err = client.call::<_, i64>("Demo.add", &1i64).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::InvalidArgument), "{err}");
    let sum: i64 = client.call("Demo.add", &(2i64, 3i64)).await.unwrap();
    assert_eq!(sum, 5);

    // An application error travels as data too.
    let err = client
        .call::<_, i64>("Demo.add", &(i64::MAX, 1i64))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::InvalidArgument), "{err}");
    assert!(err.to_string().contains("overflows"), "{err}");
    assert!(!client.is_closed());
}

#[tokio::test]
async fn reply_of_the_wrong_type_is_a_decode_error() {
    let server = TestServer::demo().await;
    let client = server.client().await;
    // echo returns a String; ask for a u64 from a 1-byte string.
    let err = client
        .call::<_, (u64, u64, u64)>("Demo.echo", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Decode { .. }), "{err}");
    let ok: String = client.call("Demo.echo", "fine").await.unwrap();
    assert_eq!(ok, "fine");
}

#[tokio::test]
async fn a_call_past_its_deadline_fails_with_deadline_exceeded() {
    let server = TestServer::demo().await;
    let client = server.client().await;
    let started = std::time::Instant::now();
    let err = client
        .call_with_timeout::<_, ()>("Demo.sleep", &5_000u64, Duration::from_millis(300))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Some(StatusCode::DeadlineExceeded), "{err}");
    assert!(err.to_string().contains("deadline"), "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let ok: String = client.call("Demo.echo", "still here").await.unwrap();
    assert_eq!(ok, "still here");
}

#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish_then_stops() {
    let server = TestServer::demo().await;
    let client = server.client().await;
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, ()>("Demo.sleep", &300u64).await })
    };
    rpc_tests::until_in_flight(&client, 1).await;
    let addr = server.addr;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
    // The call in flight when the drain began was answered.
    slow.await.unwrap().unwrap();
    // The listener is gone.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn drain_timeout_cuts_off_calls_that_do_not_finish() {
    let mut options = ServerOptions::default();
    options.drain_timeout = Duration::from_millis(200);
    let server = TestServer::start(rpc_server::demo::router(), options).await;
    let client = server.client().await;
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, ()>("Demo.sleep", &60_000u64).await })
    };
    rpc_tests::until_in_flight(&client, 1).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("call hung after the server closed")
        .unwrap()
        .unwrap_err();
    // It was sent and may have run: not retried (not idempotent), and
    // the error says so.
    assert!(
        matches!(
            &err,
            ClientError::OutcomeUnknown { method, source: rpc_core::Error::Closed { .. } }
                if method == "Demo.sleep"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("unknown"), "{err}");
}

#[tokio::test]
async fn calls_on_one_connection_run_concurrently() {
    let server = TestServer::demo().await;
    let client = server.client().await;
    let started = std::time::Instant::now();
    let sleeps = (0..20).map(|_| client.call::<_, ()>("Demo.sleep", &200u64));
    for r in futures_util::future::join_all(sleeps).await {
        r.unwrap();
    }
    // Run one after another they would take 4 s.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_own_call() {
    let router = Router::new()
        .route("boom", |_: ()| async move {
            if true {
                panic!("handler bug");
            }
            Ok::<(), Status>(())
        })
        .route("Demo.echo", |s: String| async move { Ok(s) });
    let server = TestServer::start(router, ServerOptions::default()).await;
    let client = server.client().await;
    let err = client.call::<_, ()>("boom", &()).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::Internal), "{err}");
    let ok: String = client.call("Demo.echo", "alive").await.unwrap();
    assert_eq!(ok, "alive");
}
