//! A client's last handshake flight, held back to leave with its first call.
//!
//! A TLS 1.3 client ends its handshake with one flight (its Finished, and
//! the `Hello` frame srpc hands rustls beforehand). Sent at once, it goes
//! alone, and the server is woken for it and then again, a moment later,
//! for the first call. Held until the connection's writer first runs, it
//! leaves in the same write as that call when the caller made one at once
//! (the usual connect-then-call), or on the writer's first flush otherwise.
//!
//! [`Corked`] sits under TLS, over the TCP socket. It passes every write
//! through, except the first that carries an encrypted record (type 23):
//! in TLS 1.3 without early data, which srpc does not enable, that is the
//! client's last flight; the ClientHello, a second one after a
//! HelloRetryRequest, and the middlebox-compatibility ChangeCipherSpec are
//! plaintext records. Held bytes are reported as written, so rustls
//! completes the handshake; flushes keep them until [`Cork::release`], after
//! which the next write carries them in front of its own bytes (one
//! `writev`), or the next flush writes them alone.
//!
//! The transport releases the cork when the handshake returns, and flushes
//! at once if the server's `Hello` is not there yet (a server asking for a
//! client certificate sends it only after our Finished).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes pass; the first one with an encrypted record will be held.
const ARMED: u8 = 0;
/// Released: held bytes go out with the next write or flush.
const RELEASED: u8 = 1;

/// TLS record type of application data (and of every encrypted TLS 1.3
/// record).
const ENCRYPTED: u8 = 23;

/// The transport's handle on a [`Corked`] stream.
#[derive(Debug, Clone)]
pub(crate) struct Cork(Arc<AtomicU8>);

impl Cork {
    /// Lets held bytes go with the next write or flush, and stops holding.
    pub(crate) fn release(&self) {
        self.0.store(RELEASED, Ordering::Release);
    }

    fn released(&self) -> bool {
        self.0.load(Ordering::Acquire) == RELEASED
    }
}

/// A stream that holds the client's last handshake flight (see the module
/// docs).
#[derive(Debug)]
pub(crate) struct Corked<S> {
    inner: S,
    cork: Cork,
    /// The held flight, and how much of it has been written.
    held: Vec<u8>,
    sent: usize,
    /// Something was held once; nothing more will be.
    done_holding: bool,
}

impl<S> Corked<S> {
    /// Wraps `inner`, armed; returns the handle that releases it.
    pub(crate) fn new(inner: S) -> (Self, Cork) {
        let cork = Cork(Arc::new(AtomicU8::new(ARMED)));
        let corked = Corked {
            inner,
            cork: cork.clone(),
            held: Vec::new(),
            sent: 0,
            done_holding: false,
        };
        (corked, cork)
    }
}

/// Whether `bytes`, a run of whole TLS records, holds an encrypted one. A
/// record cut short at the end is judged by its type byte all the same.
fn has_encrypted_record(bytes: &[u8]) -> bool {
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == ENCRYPTED {
            return true;
        }
        let len = match bytes.get(at + 3..at + 5) {
            Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
            _ => return false,
        };
        at += 5 + len;
    }
    false
}

impl<S: AsyncWrite + Unpin> Corked<S> {
    /// Writes out what is held.
    fn poll_unhold(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Holds `bufs` if this is the write to hold; returns how many bytes
    /// were taken.
    fn hold(&mut self, bufs: &[IoSlice<'_>]) -> Option<usize> {
        if self.done_holding || self.cork.released() {
            return None;
        }
        let bytes: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        if !has_encrypted_record(&bytes) {
            return None;
        }
        self.done_holding = true;
        let n = bytes.len();
        self.held = bytes;
        Some(n)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Corked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Corked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(n) = this.hold(bufs) {
            return Poll::Ready(Ok(n));
        }
        if this.sent < this.held.len() {
            if !this.cork.released() {
                // Held and not yet released: later bytes must not overtake.
                let n: usize = bufs.iter().map(|b| b.len()).sum();
                this.held
                    .extend(bufs.iter().flat_map(|b| b.iter().copied()));
                return Poll::Ready(Ok(n));
            }
            // The held flight in front of this write's bytes, in one call.
            let mut slices = Vec::with_capacity(bufs.len() + 1);
            slices.push(IoSlice::new(&this.held[this.sent..]));
            slices.extend(bufs.iter().map(|b| IoSlice::new(b)));
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let rest = this.held.len() - this.sent;
            if n < rest {
                this.sent += n;
                ready!(this.poll_unhold(cx))?;
            } else {
                this.held = Vec::new();
                this.sent = 0;
                if n > rest {
                    return Poll::Ready(Ok(n - rest));
                }
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cork.released() {
            ready!(self.poll_unhold(cx))?;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_unhold(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Records each write call the corked stream makes.
    #[derive(Default)]
    struct Calls(Vec<Vec<u8>>);

    impl AsyncWrite for Calls {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len();
            self.0.push(all);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn encrypted_records_are_found_behind_plaintext_ones() {
        let ccs = record(20, &[1]);
        let hello = record(22, &[1; 40]);
        let finished = record(23, &[9; 53]);
        assert!(!has_encrypted_record(&hello));
        assert!(!has_encrypted_record(
            &[ccs.clone(), hello.clone()].concat()
        ));
        assert!(has_encrypted_record(&[ccs, finished.clone()].concat()));
        assert!(has_encrypted_record(&finished[..3]));
        assert!(!has_encrypted_record(&[]));
    }

    #[tokio::test]
    async fn the_last_flight_waits_for_the_release_then_leaves_with_the_next_write() {
        let (mut s, cork) = Corked::new(Calls::default());
        let client_hello = record(22, &[1; 200]);
        let finished = [record(20, &[1]), record(23, &[2; 80])].concat();
        let call = record(23, &[3; 30]);
        s.write_all(&client_hello).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            s.inner.0,
            vec![client_hello.clone()],
            "the ClientHello passes"
        );
        s.write_all(&finished).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.inner.0.len(), 1, "the last flight is held, flush or not");
        cork.release();
        s.write_all(&call).await.unwrap();
        assert_eq!(
            s.inner.0,
            vec![client_hello, [finished, call.clone()].concat()]
        );
        s.write_all(&call).await.unwrap();
        assert_eq!(s.inner.0.len(), 3, "later writes pass");
    }

    #[tokio::test]
    async fn with_nothing_to_send_the_first_flush_after_the_release_sends_it() {
        let (mut s, cork) = Corked::new(Calls::default());
        let finished = record(23, &[2; 80]);
        s.write_all(&finished).await.unwrap();
        s.flush().await.unwrap();
        assert!(s.inner.0.is_empty());
        cork.release();
        s.flush().await.unwrap();
        assert_eq!(s.inner.0, vec![finished]);
        s.flush().await.unwrap();
        assert_eq!(s.inner.0.len(), 1, "sent once");
    }

    #[tokio::test]
    async fn a_release_before_any_encrypted_write_holds_nothing() {
        let (mut s, cork) = Corked::new(Calls::default());
        cork.release();
        let finished = record(23, &[2; 80]);
        s.write_all(&finished).await.unwrap();
        assert_eq!(s.inner.0, vec![finished]);
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_held() {
        let (mut s, _cork) = Corked::new(Calls::default());
        let finished = record(23, &[2; 80]);
        s.write_all(&finished).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(s.inner.0, vec![finished]);
    }
}
