//! Retries over real TLS on 127.0.0.1: an idempotent call survives its
//! connection dying mid-call, a plain one is not sent twice, and retries
//! stop at the client's budget.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rpc_client::{CallOptions, Client, ClientError};
use rpc_core::Status;
use rpc_server::ServerOptions;
use rpc_tests::{client_tls, FaultProxy, TestServer};

#[rpc_macros::service(crate = rpc_core)]
trait Counter {
    /// Reads the count, slowly: safe to run twice.
    #[idempotent]
    async fn read(&self) -> u64;
    /// Adds one, slowly: not safe to run twice.
    async fn bump(&self) -> u64;
    /// Always fails as if the server were overloaded elsewhere.
    #[idempotent]
    async fn flaky(&self) -> Result<u64, Status>;
}

#[derive(Clone, Default)]
struct Counts {
    runs: Arc<AtomicU64>,
}

impl Counter for Counts {
    async fn read(&self) -> u64 {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        n
    }

    async fn bump(&self) -> u64 {
        self.read().await
    }

    async fn flaky(&self) -> Result<u64, Status> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Err(Status::unavailable("not now"))
    }
}

async fn until_runs(counts: &Counts, n: u64) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while counts.runs.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the handler did not run");
}

async fn setup() -> (TestServer, FaultProxy, Counts, Client) {
    let counts = Counts::default();
    let router = rpc_server::Router::new().service(CounterServer::new(counts.clone()));
    let server = TestServer::start(router, ServerOptions::default()).await;
    let proxy = FaultProxy::start(server.addr).await;
    let client = Client::builder(client_tls(&server.certs))
        .server_name("localhost")
        .connect(&proxy.address())
        .await
        .unwrap();
    (server, proxy, counts, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_call_survives_its_connection_dying_mid_call() {
    let (_server, proxy, counts, client) = setup().await;
    let counter = CounterClient::new(client.clone());
    let call = tokio::spawn(async move { counter.read().await });
    until_runs(&counts, 1).await;
    // The connection dies with the call in flight: the outcome is unknown,
    // and the method is idempotent, so it goes again on the next one.
    proxy.reset_all();
    assert_eq!(call.await.unwrap().unwrap(), 2);
    assert_eq!(counts.runs.load(Ordering::SeqCst), 2);

    // The same through the untyped client, marked per call.
    let opts = CallOptions::new().idempotent(true);
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call_with::<_, u64>("Counter.read", &(), &opts).await }
    });
    until_runs(&counts, 3).await;
    proxy.reset_all();
    assert_eq!(call.await.unwrap().unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_not_marked_idempotent_is_not_sent_twice() {
    let (_server, proxy, counts, client) = setup().await;
    let counter = CounterClient::new(client.clone());
    let call = tokio::spawn(async move { counter.bump().await });
    until_runs(&counts, 1).await;
    proxy.reset_all();
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown { .. }), "{err}");
    // Marked idempotent = false, a method marked #[idempotent] is not
    // retried either: the call's own word wins.
    let counter = CounterClient::new(client).with_options(CallOptions::new().idempotent(false));
    let call = tokio::spawn(async move { counter.read().await });
    until_runs(&counts, 2).await;
    proxy.reset_all();
    assert!(call.await.unwrap().is_err());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(counts.runs.load(Ordering::SeqCst), 2, "a call ran twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_budget() {
    let counts = Counts::default();
    let router = rpc_server::Router::new().service(CounterServer::new(counts.clone()));
    let server = TestServer::start(router, ServerOptions::default()).await;
    // No reserve, and one retry per 10 idempotent calls.
    let client = Client::builder(client_tls(&server.certs))
        .retries(3, Duration::from_secs(10), 0, 0.1)
        .connect(&server.address())
        .await
        .unwrap();
    let counter = CounterClient::new(client);
    let calls = 40;
    for _ in 0..calls {
        assert!(counter.flaky().await.is_err());
    }
    let runs = counts.runs.load(Ordering::SeqCst);
    let retries = runs - calls;
    // Without the budget every call would have taken 3 attempts (80 retries).
    assert!(
        (1..=5).contains(&retries),
        "{retries} retries for {calls} calls"
    );
}
