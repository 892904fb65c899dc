//! Stream calls over real TLS on 127.0.0.1: each shape (server, client,
//! both ways), final errors, cancellation from either side, deadlines,
//! backpressure, and small calls beside a large stream.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rpc_core::streaming::{ServerStream, Streaming};
use rpc_core::Frame;
use rpc_core::{CallOptions, Status, StatusCode};
use rpc_server::ServerOptions;
use rpc_tests::{frame_bytes, goaway_after, hello_bytes, TestServer};

#[rpc_macros::service(crate = rpc_core)]
trait Numbers {
    /// `0..n`, then `fail` as the final error if given.
    async fn count(&self, n: u64, fail: Option<String>) -> Result<ServerStream<u64>, Status>;
    /// The sum of the caller's numbers.
    async fn sum(&self, numbers: Streaming<u64>) -> Result<u64, Status>;
    /// Each number doubled, as it comes.
    async fn double(&self, numbers: Streaming<u64>) -> Result<ServerStream<u64>, Status>;
    /// Items of `size` bytes without end, counting what was sent.
    async fn flood(&self, size: usize) -> Result<ServerStream<bytes::Bytes>, Status>;
    /// Reads `take` numbers, then answers without reading the rest.
    async fn first(&self, take: usize, numbers: Streaming<u64>) -> Result<u64, Status>;
    async fn add(&self, a: u64, b: u64) -> u64;
    /// Holds the caller's stream without reading it until cancelled.
    async fn hold(&self, numbers: Streaming<u64>) -> u64;
}

#[derive(Default)]
struct Impl {
    /// Items the flood produced (handed to its stream).
    flooded: Arc<AtomicU64>,
    /// Flood streams whose producer was dropped (the stream ended).
    flood_ended: Arc<AtomicUsize>,
}

struct Ended(Arc<AtomicUsize>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Numbers for Impl {
    async fn count(&self, n: u64, fail: Option<String>) -> Result<ServerStream<u64>, Status> {
        let items = futures_util::stream::iter(0..n).map(Ok);
        let end = futures_util::stream::iter(fail.map(|m| Err(Status::aborted(m))));
        Ok(ServerStream::new(items.chain(end)))
    }

    async fn sum(&self, mut numbers: Streaming<u64>) -> Result<u64, Status> {
        let mut sum = 0;
        while let Some(n) = numbers.message().await? {
            sum += n;
        }
        Ok(sum)
    }

    async fn double(&self, numbers: Streaming<u64>) -> Result<ServerStream<u64>, Status> {
        Ok(ServerStream::new(numbers.map(|n| n.map(|n| n * 2))))
    }

    async fn flood(&self, size: usize) -> Result<ServerStream<bytes::Bytes>, Status> {
        let count = self.flooded.clone();
        let ended = Ended(self.flood_ended.clone());
        let items = futures_util::stream::repeat_with(move || {
            let _keep = &ended;
            count.fetch_add(1, Ordering::SeqCst);
            Ok(bytes::Bytes::from(vec![7u8; size]))
        });
        Ok(ServerStream::new(items))
    }

    async fn first(&self, take: usize, mut numbers: Streaming<u64>) -> Result<u64, Status> {
        let mut sum = 0;
        for _ in 0..take {
            match numbers.message().await? {
                Some(n) => sum += n,
                None => break,
            }
        }
        Ok(sum)
    }

    async fn add(&self, a: u64, b: u64) -> u64 {
        a + b
    }

    async fn hold(&self, numbers: Streaming<u64>) -> u64 {
        let _held = numbers;
        std::future::pending().await
    }
}

async fn start() -> (TestServer, Arc<Impl>, NumbersClient<rpc_client::Client>) {
    let service = Arc::new(Impl::default());
    let shared = ImplRef(service.clone());
    let router = rpc_server::Router::new().service(NumbersServer::new(shared));
    let server = TestServer::start(router, ServerOptions::default()).await;
    let client = NumbersClient::new(server.client().await);
    (server, service, client)
}

/// The service behind an `Arc`, so the test can read its counters.
struct ImplRef(Arc<Impl>);

impl Numbers for ImplRef {
    async fn count(&self, n: u64, fail: Option<String>) -> Result<ServerStream<u64>, Status> {
        self.0.count(n, fail).await
    }
    async fn sum(&self, numbers: Streaming<u64>) -> Result<u64, Status> {
        self.0.sum(numbers).await
    }
    async fn double(&self, numbers: Streaming<u64>) -> Result<ServerStream<u64>, Status> {
        self.0.double(numbers).await
    }
    async fn flood(&self, size: usize) -> Result<ServerStream<bytes::Bytes>, Status> {
        self.0.flood(size).await
    }
    async fn first(&self, take: usize, numbers: Streaming<u64>) -> Result<u64, Status> {
        self.0.first(take, numbers).await
    }
    async fn add(&self, a: u64, b: u64) -> u64 {
        self.0.add(a, b).await
    }
    async fn hold(&self, numbers: Streaming<u64>) -> u64 {
        self.0.hold(numbers).await
    }
}

#[tokio::test]
async fn a_server_stream_delivers_every_item_in_order_then_ends() {
    let (_server, _svc, client) = start().await;
    let got: Vec<u64> = client
        .count(10_000, None)
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(got, (0..10_000).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_streams_final_error_arrives_after_its_items() {
    let (_server, _svc, client) = start().await;
    let mut stream = client.count(3, Some("disk full".into())).await.unwrap();
    for want in 0..3 {
        assert_eq!(stream.message().await.unwrap(), Some(want));
    }
    let e = stream.message().await.unwrap_err();
    assert_eq!(e.code, StatusCode::Aborted);
    assert!(e.message.contains("disk full"), "{e}");
    assert!(stream.next().await.is_none(), "the error is the last item");
}

#[tokio::test]
async fn a_client_stream_reaches_the_handler_whole() {
    let (_server, _svc, client) = start().await;
    let sum = client
        .sum(futures_util::stream::iter(1..=100_000u64))
        .await
        .unwrap();
    assert_eq!(sum, 100_000 * 100_001 / 2);
    // An empty stream is a stream too.
    assert_eq!(client.sum(futures_util::stream::empty()).await.unwrap(), 0);
}

#[tokio::test]
async fn a_stream_both_ways_answers_as_items_come() {
    let (_server, _svc, client) = start().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<u64>(1);
    let input =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|n| (n, rx)) });
    let mut doubled = client.double(input).await.unwrap();
    // Item by item: each answer comes before the next number is sent.
    for n in 1..=50u64 {
        tx.send(n).await.unwrap();
        assert_eq!(doubled.message().await.unwrap(), Some(n * 2));
    }
    drop(tx);
    assert_eq!(doubled.message().await.unwrap(), None);
}

#[tokio::test]
async fn a_handler_that_stops_reading_ends_the_callers_stream_without_error() {
    let (server, _svc, client) = start().await;
    // The caller would send forever; the server reads 10 and answers.
    let forever = futures_util::stream::iter(1u64..);
    let sum = tokio::time::timeout(Duration::from_secs(10), client.first(10, forever))
        .await
        .expect("the reply ends the call")
        .unwrap();
    assert_eq!(sum, 55);
    assert_eq!(
        client.add(2, 3).await.unwrap(),
        5,
        "the connection serves on"
    );
    drop(server);
}

#[tokio::test]
async fn a_slow_consumer_holds_the_producer_to_the_window() {
    let (_server, svc, client) = start().await;
    let mut flood = client.flood(16 * 1024).await.unwrap();
    // Read a little, then stop reading for a while.
    for _ in 0..4 {
        flood.message().await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let produced = svc.flooded.load(Ordering::SeqCst);
    let conn_usage = client.as_caller().endpoints();
    assert_eq!(conn_usage.len(), 1);
    // 1 MiB of window, one piece queued, and the item in hand: at most
    // about 70 items of 16 KiB, whatever the stream's length.
    assert!(produced <= 80, "{produced} items produced for 4 read");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        svc.flooded.load(Ordering::SeqCst),
        produced,
        "the producer waits"
    );
    // Reading on lets it go on.
    for _ in 0..200 {
        flood.message().await.unwrap().unwrap();
    }
    assert!(svc.flooded.load(Ordering::SeqCst) > 200);
    // Dropping the stream cancels the call: the server's producer ends.
    drop(flood);
    let ended = svc.flood_ended.clone();
    tokio::time::timeout(Duration::from_secs(5), async move {
        while ended.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the server's stream ends when the caller drops its end");
    assert_eq!(client.add(1, 1).await.unwrap(), 2);
}

#[tokio::test]
async fn a_streams_deadline_covers_all_of_it() {
    let (_server, _svc, client) = start().await;
    let short = client.with_options(CallOptions::new().timeout(Duration::from_millis(200)));
    let mut flood = short.flood(1024).await.unwrap();
    let started = std::time::Instant::now();
    let error = loop {
        match flood.message().await {
            Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
            Ok(None) => panic!("an endless stream ended"),
            Err(e) => break e,
        }
    };
    assert_eq!(error.code, StatusCode::DeadlineExceeded, "{error}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_stream_method_called_as_a_plain_call_is_refused_clearly() {
    let (server, _svc, _client) = start().await;
    let client = server.client().await;
    let e = client
        .call::<_, u64>("Numbers.count", &(3u64, None::<String>))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stream method"), "{e}");
}

fn open(id: u64, method: &str, sends_stream: bool) -> Frame {
    open_with(id, method, sends_stream, &())
}

fn open_with<A: serde::Serialize>(id: u64, method: &str, sends_stream: bool, args: &A) -> Frame {
    Frame::Open {
        id,
        method: method.into(),
        deadline_ms: Some(10_000),
        metadata: rpc_core::Metadata::new(),
        body: rpc_core::codec::encode(args, 1024).unwrap(),
        sends_stream,
    }
}

fn data(id: u64, len: usize) -> Frame {
    Frame::Data {
        id,
        more: false,
        bytes: bytes::Bytes::from(vec![1u8; len]),
    }
}

/// `frames` after a `Hello`, as bytes.
fn wire(frames: Vec<Frame>) -> Vec<u8> {
    let mut bytes = hello_bytes();
    for f in frames {
        bytes.extend(frame_bytes(f));
    }
    bytes
}

#[tokio::test]
async fn stream_frames_that_break_the_rules_get_a_goaway_naming_the_rule() {
    let (server, _svc, client) = start().await;
    let piece = rpc_core::streams::CHUNK;
    let cases = [
        (
            vec![data(5, 10)],
            "Data on stream 5, which was never opened",
        ),
        (
            // 16 pieces of 64 KiB and their cost fill more than the 1 MiB
            // window of a stream nobody reads.
            std::iter::once(open(1, "Numbers.hold", true))
                .chain((0..17).map(|_| data(1, piece)))
                .collect(),
            "beyond its credit",
        ),
        (
            vec![
                open(1, "Numbers.hold", true),
                Frame::End { id: 1 },
                data(1, 3),
            ],
            "Data on stream 1 after its End",
        ),
        (
            // A stream that is still running (the endless flood).
            vec![
                open_with(1, "Numbers.flood", false, &(16usize,)),
                data(1, 3),
            ],
            "Data on stream 1, whose caller said it sends no stream",
        ),
        (
            vec![
                open(1, "Numbers.hold", true),
                Frame::End { id: 1 },
                Frame::End { id: 1 },
            ],
            "second End on stream 1",
        ),
        (
            vec![Frame::Credit {
                id: 0,
                bytes: u64::MAX,
            }],
            "beyond",
        ),
        (
            vec![Frame::Reset { id: 3 }],
            "Reset for stream 3, which was never opened",
        ),
    ];
    for (frames, rule) in cases {
        let reason = goaway_after(&server, &wire(frames)).await;
        assert!(reason.contains(rule), "{reason:?} should name {rule:?}");
    }
    // The server serves on, streams included.
    assert_eq!(client.add(2, 2).await.unwrap(), 4);
    assert_eq!(
        client
            .sum(futures_util::stream::iter(1..=3u64))
            .await
            .unwrap(),
        6
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_long_link_the_window_grows_past_its_first_size() {
    let (server, _svc, _client) = start().await;
    // 50 ms round trip: a stream held to its first 1 MiB window would run
    // at 1 MiB / 50 ms = 20 MiB/s at most.
    let line = rpc_tests::delay::DelayLine::start(server.addr, Duration::from_millis(25)).await;
    let client = rpc_tests::replicas::builder(&server.certs)
        .connect(&line.addr.to_string())
        .await
        .unwrap();
    let numbers = NumbersClient::new(client);
    let mut flood = numbers.flood(60 * 1024).await.unwrap();
    const WANT: u64 = 96 << 20;
    let started = std::time::Instant::now();
    let mut got = 0u64;
    while got < WANT {
        got += flood.message().await.unwrap().unwrap().len() as u64;
    }
    let took = started.elapsed();
    let rate = got as f64 / took.as_secs_f64() / f64::from(1 << 20);
    eprintln!(
        "{} MiB over a 50 ms round trip in {took:?}: {rate:.0} MiB/s",
        got >> 20
    );
    // Twice what the first window allows (measured: about 110 MiB/s).
    assert!(rate > 40.0, "{rate:.1} MiB/s: the window did not grow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_see_stream_calls() {
    let certs = rpc_server::devcerts::generate().unwrap();
    let router = rpc_server::Router::new().service(NumbersServer::new(Impl::default()));
    let server = rpc_server::Server::builder(rpc_tests::server_tls(&certs))
        .router(router)
        .authorize(|ctx| match ctx.metadata().get_str("token") {
            None if ctx.method() == "Numbers.sum" => Err(Status::permission_denied("no token")),
            _ => Ok(()),
        })
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .build()
        .unwrap();
    let server = TestServer::serve(certs, server).await;
    let client = NumbersClient::new(server.client().await);

    // The authorization hook refuses a stream call as it would a call.
    let e = client
        .sum(futures_util::stream::iter(0..3u64))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no token"), "{e}");
    let token = CallOptions::new().meta("token", "t").unwrap();
    let with_token = client.with_options(token);
    let sum = with_token.sum(futures_util::stream::iter(0..3u64)).await;
    assert_eq!(sum.unwrap(), 3);

    // A stream holds the one place the concurrency limit has, for as long
    // as it runs: a second stream and a call are shed meanwhile.
    let mut held = client.flood(8).await.unwrap();
    held.message().await.unwrap().unwrap();
    let mut second = client.count(3, None).await.unwrap();
    let e = second.message().await.unwrap_err();
    assert_eq!(e.code, StatusCode::Overloaded, "{e}");
    let e = client.add(1, 2).await.unwrap_err();
    assert!(e.to_string().contains("overloaded"), "{e}");
    drop(held);
    assert_eq!(eventually_add(&client).await, Some(3));
}

/// `add(1, 2)`, tried for up to a second.
async fn eventually_add(client: &NumbersClient<rpc_client::Client>) -> Option<u64> {
    for _ in 0..100 {
        if let Ok(sum) = client.add(1, 2).await {
            return Some(sum);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_count_as_calls_in_flight() {
    let mut options = ServerOptions::default();
    options.connection.max_in_flight = 1;
    let router = rpc_server::Router::new().service(NumbersServer::new(Impl::default()));
    let server = TestServer::start(router, options).await;
    let client = NumbersClient::new(server.client().await);
    let mut held = client.flood(8).await.unwrap();
    held.message().await.unwrap().unwrap();
    // The server serves one call at a time on this connection and the
    // stream is it: a call waits for the place (here until its deadline).
    let short = client.with_options(CallOptions::new().timeout(Duration::from_millis(300)));
    let e = short.add(1, 2).await.unwrap_err();
    assert!(e.to_string().contains("deadline"), "{e}");
    drop(held);
    assert_eq!(eventually_add(&client).await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_holds_up_no_other_and_streams_take_turns() {
    let (_server, _svc, client) = start().await;
    // One stream nobody reads: it fills its window and waits.
    let mut stalled = client.flood(32 * 1024).await.unwrap();
    stalled.message().await.unwrap().unwrap();
    // Two more on the same connection, read side by side: both finish,
    // and neither waits for the other to end.
    let mut a = client.flood(32 * 1024).await.unwrap();
    let mut b = client.flood(32 * 1024).await.unwrap();
    let mut order = Vec::new();
    let mut got = [0usize; 2];
    while got.iter().any(|&n| n < 400) {
        tokio::select! {
            item = a.message(), if got[0] < 400 => { item.unwrap().unwrap(); got[0] += 1; order.push(0); }
            item = b.message(), if got[1] < 400 => { item.unwrap().unwrap(); got[1] += 1; order.push(1); }
        }
    }
    // Turns: by the time either stream had 300 items, the other had many.
    let first_300 = |who: u8| {
        order
            .iter()
            .scan(0, |n, &s| {
                *n += usize::from(s == who);
                Some(*n)
            })
            .position(|n| n == 300)
            .unwrap()
    };
    let (a300, b300) = (first_300(0), first_300(1));
    let other_by = |at: usize, who: u8| order[..at].iter().filter(|&&s| s == who).count();
    assert!(
        other_by(a300, 1) > 100,
        "b starved while a ran: {}",
        other_by(a300, 1)
    );
    assert!(
        other_by(b300, 0) > 100,
        "a starved while b ran: {}",
        other_by(b300, 0)
    );
    // Calls still pass beside the stalled stream.
    assert_eq!(client.add(20, 22).await.unwrap(), 42);
    drop(stalled);
}
