//! The limit of this stack: tokio-rustls and `LengthDelimitedCodec`, nothing
//! else. A frame is `id: u64 BE || payload`; the server sends each frame back
//! as it is, flushing once per burst of frames read. The client keeps a map
//! of waiting calls, as any multiplexing client must.
//!
//! A stream is the limit of TLS itself: a connection of its own whose first
//! frame has id [`STREAM`] and the byte count as payload, after which the
//! server writes that many bytes in 64 KiB `write_all`s and the client reads
//! them into a 64 KiB buffer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_util::codec::{Framed, FramedRead, FramedWrite, LengthDelimitedCodec};

use super::{accept_tls, connect_tls, BoxFut, Caller, Certs};

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(16 << 20)
        .new_codec()
}

/// The id of a frame asking for a stream on its connection.
const STREAM: u64 = u64::MAX;

pub(super) async fn serve(listener: TcpListener, certs: &Certs) -> anyhow::Result<()> {
    accept_tls(listener, certs, |tls| async move {
        let mut framed = Framed::new(tls, codec());
        while let Some(Ok(frame)) = framed.next().await {
            if frame.len() == 16 && frame[..8] == STREAM.to_be_bytes() {
                let total = u64::from_be_bytes(frame[8..16].try_into().unwrap_or([0; 8]));
                let mut tls = framed.into_inner();
                let piece = vec![0x5a; super::STREAM_PIECE];
                let mut sent = 0u64;
                while sent < total {
                    let n = (total - sent).min(piece.len() as u64) as usize;
                    if tls.write_all(&piece[..n]).await.is_err() {
                        return;
                    }
                    sent += n as u64;
                }
                let _ = tls.flush().await;
                let _ = tls.shutdown().await;
                return;
            }
            if framed.feed(frame.freeze()).await.is_err() {
                return;
            }
            // Echo whatever else has already arrived, then flush once.
            loop {
                match framed.next().now_or_never() {
                    Some(Some(Ok(frame))) => {
                        if framed.feed(frame.freeze()).await.is_err() {
                            return;
                        }
                    }
                    Some(_) => return,
                    None => break,
                }
            }
            if SinkExt::<Bytes>::flush(&mut framed).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[derive(Clone)]
pub(super) struct Dialer {
    addr: SocketAddr,
    connector: TlsConnector,
}

impl Dialer {
    pub(super) fn new(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Self {
        Dialer {
            addr,
            connector: TlsConnector::from(tls),
        }
    }

    pub(super) async fn connect(&self) -> anyhow::Result<RawCaller> {
        let tls = connect_tls(self.addr, &self.connector).await?;
        let (read, write) = tokio::io::split(tls);
        let pending: Pending = Arc::default();
        let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
        let mut sink = FramedWrite::new(write, codec());
        let writer = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                sink.feed(frame).await?;
                while let Ok(frame) = rx.try_recv() {
                    sink.feed(frame).await?;
                }
                SinkExt::<Bytes>::flush(&mut sink).await?;
            }
            anyhow::Ok(())
        });
        let mut stream = FramedRead::new(read, codec());
        let waiting = pending.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(mut frame)) = stream.next().await {
                if frame.len() < 8 {
                    break;
                }
                let id = frame.get_u64();
                let waiter = waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if let Some(tx) = waiter {
                    let _ = tx.send(frame.freeze());
                }
            }
            // Dropping the senders fails every waiting call.
            waiting.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        Ok(RawCaller {
            dialer: self.clone(),
            tx,
            pending,
            next_id: AtomicU64::new(0),
            tasks: [writer.abort_handle(), reader.abort_handle()],
        })
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>>;

pub(super) struct RawCaller {
    /// Streams get a connection of their own.
    dialer: Dialer,
    tx: mpsc::Sender<Bytes>,
    pending: Pending,
    next_id: AtomicU64,
    tasks: [tokio::task::AbortHandle; 2],
}

impl Caller for RawCaller {
    fn echo(&self, payload: Bytes) -> BoxFut<'_, usize> {
        Box::pin(async move {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut frame = BytesMut::with_capacity(8 + payload.len());
            frame.put_u64(id);
            frame.put_slice(&payload);
            let (tx, rx) = oneshot::channel();
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, tx);
            self.tx
                .send(frame.freeze())
                .await
                .map_err(|_| anyhow::anyhow!("raw connection closed"))?;
            Ok(rx.await?.len())
        })
    }

    fn stream(&self, total: u64) -> BoxFut<'_, u64> {
        Box::pin(async move {
            let tls = connect_tls(self.dialer.addr, &self.dialer.connector).await?;
            let mut framed = Framed::new(tls, codec());
            let mut ask = BytesMut::with_capacity(16);
            ask.put_u64(STREAM);
            ask.put_u64(total);
            framed.send(ask.freeze()).await?;
            let mut tls = framed.into_inner();
            let mut buf = vec![0u8; super::STREAM_PIECE];
            let mut got = 0u64;
            while got < total {
                match tls.read(&mut buf).await? {
                    0 => break,
                    n => got += n as u64,
                }
            }
            Ok(got)
        })
    }

    fn streams_beside_calls(&self) -> bool {
        false
    }

    fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for RawCaller {
    fn drop(&mut self) {
        self.close();
    }
}
