//! Helpers shared by the rpc-core integration tests: a test service and a
//! pair of connected drivers over an in-memory pipe.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use rpc_core::connection::start;
use rpc_core::transport::{exchange_hello, hello_for};
use rpc_core::BoxFuture;
use rpc_core::{
    CallContext, Connection, ConnectionConfig, Dispatch, Frame, FrameCodec, Hello, Status,
};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio_util::codec::Encoder;

/// Test service: "echo" returns its body, "hang" never returns (and counts
/// how many handlers started and how many were cancelled), "panic" panics.
#[derive(Default)]
pub struct TestService {
    pub started: Arc<AtomicUsize>,
    pub cancelled: Arc<AtomicUsize>,
}

impl Dispatch for TestService {
    fn dispatch(&self, ctx: CallContext, body: Bytes) -> BoxFuture<Result<Bytes, Status>> {
        let cancelled = self.cancelled.clone();
        let started = self.started.clone();
        Box::pin(async move {
            match ctx.method() {
                "echo" => Ok(body),
                "hang" => {
                    started.fetch_add(1, Ordering::SeqCst);
                    // Counts when the handler's future is dropped (stopped).
                    let _stopped = CountOnDrop(cancelled);
                    std::future::pending().await
                }
                "panic" => panic!("handler bug"),
                m => Err(Status::unknown_method(m)),
            }
        })
    }
}

pub struct CountOnDrop(Arc<AtomicUsize>);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn addr() -> SocketAddr {
    "127.0.0.1:1".parse().unwrap()
}

/// Counts flushes, to see that the writer batches.
pub struct CountingIo {
    pub inner: DuplexStream,
    pub flushes: Arc<AtomicUsize>,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub struct Pair {
    pub client: Connection,
    pub server: Connection,
    pub started: Arc<AtomicUsize>,
    pub cancelled: Arc<AtomicUsize>,
    pub client_flushes: Arc<AtomicUsize>,
}

pub async fn pair(server_cfg: ConnectionConfig) -> Pair {
    pair_with(server_cfg, false).await
}

/// `client_ignores_limit`: the client acts as if the server had announced no
/// in-flight limit (a misbehaving client), so the server's own check shows.
pub async fn pair_with(server_cfg: ConnectionConfig, client_ignores_limit: bool) -> Pair {
    pair_full(
        ConnectionConfig::default(),
        server_cfg,
        client_ignores_limit,
    )
    .await
}

/// Both configs given.
pub async fn pair_full(
    client_cfg: ConnectionConfig,
    server_cfg: ConnectionConfig,
    client_ignores_limit: bool,
) -> Pair {
    let (a, b) = tokio::io::duplex(1 << 20);
    let flushes = Arc::new(AtomicUsize::new(0));
    let mut a = CountingIo {
        inner: a,
        flushes: flushes.clone(),
    };
    let mut b = b;
    let (ch, sh) = tokio::join!(
        exchange_hello(&mut a, hello_for(&client_cfg), client_cfg.max_frame),
        exchange_hello(&mut b, hello_for(&server_cfg), server_cfg.max_frame),
    );
    let service = TestService::default();
    let cancelled = service.cancelled.clone();
    let started = service.started.clone();
    // Each side is started with the Hello it received from the other.
    let mut ch = ch.unwrap();
    if client_ignores_limit {
        ch.max_in_flight = u32::MAX;
    }
    let (client, cdrv) = start(a, &client_cfg, addr(), ch, None);
    let (server, sdrv) = start(b, &server_cfg, addr(), sh.unwrap(), Some(Arc::new(service)));
    tokio::spawn(cdrv);
    tokio::spawn(sdrv);
    Pair {
        client,
        server,
        started,
        cancelled,
        client_flushes: flushes,
    }
}

/// Two ends of a pipe that have exchanged `Hello`s: the first, for a raw
/// peer; the second and the `Hello` it received, for a driver.
pub async fn hello_pair(
    cfg: &ConnectionConfig,
    buffer: usize,
) -> (DuplexStream, DuplexStream, Hello) {
    let (mut peer, mut end) = tokio::io::duplex(buffer);
    let (hp, he) = tokio::join!(
        exchange_hello(&mut peer, hello_for(cfg), cfg.max_frame),
        exchange_hello(&mut end, hello_for(cfg), cfg.max_frame),
    );
    hp.unwrap();
    (peer, end, he.unwrap())
}

/// A client connection whose peer is a raw pipe end that completed `Hello`.
pub async fn client_with_raw_peer(cfg: ConnectionConfig) -> (rpc_core::Connection, DuplexStream) {
    let (peer, end, hello) = hello_pair(&cfg, 1 << 20).await;
    let (conn, driver) = start(end, &cfg, addr(), hello, None);
    tokio::spawn(driver);
    (conn, peer)
}

/// Waits (at most 5 s) until `count` reaches `want`: the signal that
/// handlers have started, or stopped.
pub async fn until_count(count: &AtomicUsize, want: usize) {
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while count.load(Ordering::SeqCst) < want {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "count stayed at {}, below {want}",
            count.load(Ordering::SeqCst)
        )
    });
}

pub fn encode(frame: Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::new(1 << 20, 1 << 20)
        .encode(frame, &mut buf)
        .unwrap();
    buf
}
