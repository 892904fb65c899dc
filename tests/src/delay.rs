//! A delay line: a TCP proxy on 127.0.0.1 that holds every chunk it reads
//! for a fixed time before passing it on, both ways, keeping their order. A
//! link with a long round trip, for flow-control tests.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Forwards to an upstream with `one_way` added in each direction; stops
/// when dropped.
pub struct DelayLine {
    /// Where clients connect.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl DelayLine {
    /// Listens on 127.0.0.1; a round trip through it takes `2 * one_way`
    /// more.
    pub async fn start(upstream: SocketAddr, one_way: Duration) -> DelayLine {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = token.cancelled() => return,
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = async { tokio::join!(delay(cr, sw, one_way), delay(sr, cw, one_way)) } => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        DelayLine { addr, stop }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One direction: read, stamp, and write each chunk once its time comes.
async fn delay(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, one_way: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            // A timer costs a tick of the clock (1 ms) even when due: wait
            // only for chunks whose time has not come.
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + one_way, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
