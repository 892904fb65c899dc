//! The limit of this stack: tokio-rustls and `LengthDelimitedCodec`, nothing
//! else. A frame is `id: u64 BE || payload`; the server sends each frame back
//! as it is, flushing once per burst of frames read. The client keeps a map
//! of waiting calls, as any multiplexing client must.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
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

pub(super) async fn serve(listener: TcpListener, certs: &Certs) -> anyhow::Result<()> {
    accept_tls(listener, certs, |tls| async move {
        let mut framed = Framed::new(tls, codec());
        while let Some(Ok(frame)) = framed.next().await {
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
            tx,
            pending,
            next_id: AtomicU64::new(0),
            tasks: [writer.abort_handle(), reader.abort_handle()],
        })
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Bytes>>>>;

pub(super) struct RawCaller {
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
