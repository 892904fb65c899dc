//! The driver's frame writer: frames are encoded into one write buffer, as
//! tokio-util's `FramedWrite` does, except that a large body is not copied
//! there.
//!
//! A `Request` or `Response` body of [`MIN_BUFFER`] bytes or more (an
//! encoded argument or reply) is already a [`Bytes`] of its own. The frame's
//! other bytes (length prefix, id, method, the body's length) go into the
//! buffer, and the body follows as it is: both are handed to the TLS stream
//! in one vectored write, and rustls copies them once, into its records.
//! With `FramedWrite` a 1 MiB reply was copied into the write buffer first.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio_util::codec::Encoder;

use crate::codec::{self, pool::MIN_BUFFER};
use crate::error::Error;
use crate::frame::{frame_len, Frame, FrameCodec};

/// Most pieces handed to one vectored write.
const MAX_SLICES: usize = 64;

/// Writes [`Frame`]s to `io`: [`feed`](FrameWriter::feed) encodes,
/// [`flush`](FrameWriter::flush) writes out.
pub(crate) struct FrameWriter<W> {
    io: W,
    codec: FrameCodec,
    max_send: usize,
    /// Encoded bytes not yet written, in order: all of `out`, then `buf`.
    out: VecDeque<Bytes>,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub(crate) fn new(io: W, max_recv: usize, max_send: usize) -> Self {
        FrameWriter {
            io,
            codec: FrameCodec::new(max_recv, max_send),
            max_send,
            out: VecDeque::new(),
            buf: BytesMut::new(),
        }
    }

    /// Bytes encoded and not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.out.iter().map(Bytes::len).sum::<usize>() + self.buf.len()
    }

    /// Encodes `frame` after what is already pending. A frame over the
    /// send limit fails with [`Error::FrameTooLarge`] and adds nothing.
    pub(crate) fn feed(&mut self, frame: Frame) -> Result<(), Error> {
        let body = match &frame {
            Frame::Request { body, .. }
            | Frame::Response {
                result: Ok(body), ..
            } if body.len() >= MIN_BUFFER => body.clone(),
            _ => return self.codec.encode(frame, &mut self.buf),
        };
        let len = frame_len(&frame, self.max_send)?;
        let mark = self.buf.len();
        self.buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        let mut split = SkipBody {
            head: &mut self.buf,
            body: &body,
            after: None,
        };
        if let Err(e) = codec::encode_sized(&frame, &mut split) {
            self.buf.truncate(mark);
            return Err(e.into());
        }
        // The body was written in one piece (bincode writes a byte string
        // with one `write_all`); had it not been found, all of the frame
        // would be in `buf`, copied, and still right.
        if let Some(after) = split.after {
            self.out.push_back(self.buf.split().freeze());
            self.out.push_back(body);
            self.buf.extend_from_slice(&after);
        }
        Ok(())
    }

    /// Writes out everything pending, then flushes `io`.
    pub(crate) async fn flush(&mut self) -> Result<(), Error> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Flushes, then shuts `io` down (TLS close_notify).
    pub(crate) async fn close(&mut self) -> Result<(), Error> {
        self.flush().await?;
        std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await?;
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while !self.out.is_empty() || !self.buf.is_empty() {
            let n = {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let mut k = 0;
                for piece in self.out.iter().take(MAX_SLICES - 1) {
                    slices[k] = IoSlice::new(piece);
                    k += 1;
                }
                if k < MAX_SLICES - 1 && !self.buf.is_empty() {
                    slices[k] = IoSlice::new(&self.buf);
                    k += 1;
                }
                ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..k]))?
            };
            if n == 0 {
                return Poll::Ready(Err(
                    std::io::Error::from(std::io::ErrorKind::WriteZero).into()
                ));
            }
            self.consume(n);
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    /// Drops the first `n` pending bytes, which were written.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            match self.out.front_mut() {
                Some(piece) if n >= piece.len() => {
                    n -= piece.len();
                    self.out.pop_front();
                }
                Some(piece) => {
                    piece.advance(n);
                    n = 0;
                }
                None => {
                    self.buf.advance(n.min(self.buf.len()));
                    n = 0;
                }
            }
        }
    }
}

/// The `Write` bincode encodes a frame into: everything goes to `head`
/// except the one write of `body` itself, which is only noted; bytes after
/// it go to `after`.
struct SkipBody<'a> {
    head: &'a mut BytesMut,
    body: &'a [u8],
    after: Option<Vec<u8>>,
}

impl Write for SkipBody<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match &mut self.after {
            Some(after) => after.extend_from_slice(bytes),
            None if std::ptr::eq(bytes, self.body) => self.after = Some(Vec::new()),
            None => self.head.extend_from_slice(bytes),
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Status;
    use crate::frame::decode_frame;

    fn frames() -> Vec<Frame> {
        let big = |n: usize, b: u8| Bytes::from(vec![b; n]);
        vec![
            Frame::Ping { nonce: 1 },
            Frame::Request {
                id: 2,
                method: "svc.big".into(),
                deadline_ms: Some(1000),
                body: big(1 << 20, 7),
            },
            Frame::Response {
                id: 3,
                result: Ok(big(100, 1)),
            },
            Frame::Response {
                id: 4,
                result: Ok(big(MIN_BUFFER, 2)),
            },
            Frame::Response {
                id: 5,
                result: Err(Status::new(
                    crate::error::StatusCode::Internal,
                    "no".to_string(),
                )),
            },
            Frame::Request {
                id: 6,
                method: "svc.edge".into(),
                deadline_ms: None,
                body: big(MIN_BUFFER - 1, 3),
            },
            Frame::Response {
                id: 7,
                result: Ok(big(3 << 20, 4)),
            },
        ]
    }

    /// The bytes on the wire are exactly `FrameCodec`'s, whatever the mix
    /// of sizes, and large bodies are not copied into the buffer.
    #[tokio::test]
    async fn writes_the_same_bytes_as_the_codec_without_copying_large_bodies() {
        let mut want = BytesMut::new();
        let mut codec = FrameCodec::new(8 << 20, 8 << 20);
        for f in frames() {
            codec.encode(f, &mut want).unwrap();
        }
        let mut writer = FrameWriter::new(Vec::new(), 8 << 20, 8 << 20);
        let frames = frames();
        for f in frames.iter().cloned() {
            writer.feed(f).unwrap();
        }
        assert_eq!(writer.pending(), want.len());
        // The three large bodies are the very buffers of the frames.
        let large: Vec<*const u8> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Request { body, .. }
                | Frame::Response {
                    result: Ok(body), ..
                } if body.len() >= MIN_BUFFER => Some(body.as_ptr()),
                _ => None,
            })
            .collect();
        assert_eq!(large.len(), 3);
        let shared = writer
            .out
            .iter()
            .filter(|p| large.contains(&p.as_ptr()))
            .count();
        assert_eq!(shared, 3, "a large body was copied");
        writer.flush().await.unwrap();
        assert_eq!(writer.pending(), 0);
        assert!(writer.io == want[..], "different bytes on the wire");
        // And they decode back to the frames.
        let mut wire = Bytes::from(writer.io);
        for f in frames {
            let len = wire.get_u32() as usize;
            assert_eq!(decode_frame(wire.split_to(len), 8 << 20).unwrap(), f);
        }
    }

    /// A writer that takes at most a few bytes per call, from the first
    /// slice only: partial writes resume where they stopped.
    struct Trickle(Vec<u8>, usize);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.1);
            self.0.extend_from_slice(&buf[..n]);
            self.1 = self.1 % 9000 + 1777;
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_writes_resume_where_they_stopped() {
        let mut want = BytesMut::new();
        let mut codec = FrameCodec::new(8 << 20, 8 << 20);
        let mut writer = FrameWriter::new(Trickle(Vec::new(), 5), 8 << 20, 8 << 20);
        for f in frames() {
            codec.encode(f.clone(), &mut want).unwrap();
            writer.feed(f).unwrap();
            if want.len() % 2 == 0 {
                writer.flush().await.unwrap();
            }
        }
        writer.close().await.unwrap();
        assert!(writer.io.0 == want[..], "different bytes on the wire");
    }

    #[test]
    fn a_large_frame_over_the_send_limit_fails_and_adds_nothing() {
        let mut writer = FrameWriter::new(Vec::new(), 8 << 20, 1 << 20);
        writer.feed(Frame::Ping { nonce: 1 }).unwrap();
        let before = writer.pending();
        let too_big = Frame::Response {
            id: 1,
            result: Ok(Bytes::from(vec![0; 1 << 20])),
        };
        assert!(matches!(
            writer.feed(too_big),
            Err(Error::FrameTooLarge { .. })
        ));
        assert_eq!(writer.pending(), before);
        assert!(writer.out.is_empty());
    }
}
