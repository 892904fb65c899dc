//! Byte clocks: a stream wrapper that stamps when a byte was last read and
//! last written.
//!
//! The heartbeat counts any byte as a sign of life, not only whole frames, so
//! a large frame arriving slowly does not look like a dead peer. The reader
//! task and the writer task share the clocks; the heartbeat reads them when
//! its timer fires. Times come from `tokio::time::Instant`, so tests with
//! paused time see paused clocks.
//!
//! It also counts the bytes each way, for metrics. This wrapper only
//! observes; it never changes what is read or written.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes last moved in each direction.
#[derive(Debug)]
pub struct ByteClocks {
    base: Instant,
    /// Nanoseconds after `base` of the last byte read.
    read: AtomicU64,
    /// Nanoseconds after `base` of the last byte written.
    written: AtomicU64,
    /// Bytes read and written so far.
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl ByteClocks {
    /// Clocks that start at `now`.
    pub fn new(now: Instant) -> Arc<Self> {
        Arc::new(ByteClocks {
            base: now,
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        })
    }

    fn stamp(&self, which: &AtomicU64) {
        let nanos = Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos();
        which.fetch_max(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Bytes read and written so far, in that order.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_read.load(Ordering::Relaxed),
            self.bytes_written.load(Ordering::Relaxed),
        )
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.stamp(&self.written);
            self.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// When a byte was last read.
    pub fn last_read(&self) -> Instant {
        self.base + std::time::Duration::from_nanos(self.read.load(Ordering::Relaxed))
    }

    /// When a byte was last written.
    pub fn last_written(&self) -> Instant {
        self.base + std::time::Duration::from_nanos(self.written.load(Ordering::Relaxed))
    }
}

/// A stream that stamps [`ByteClocks`] as bytes move.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    clocks: Arc<ByteClocks>,
}

impl<S> Metered<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, clocks: Arc<ByteClocks>) -> Self {
        Metered { inner, clocks }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.clocks.stamp(&self.clocks.read);
            self.clocks
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.clocks.wrote(n);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.clocks.wrote(n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
