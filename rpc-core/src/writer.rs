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
//!
//! [`write_loop`] drains the outbound queues into a [`FrameWriter`]: one
//! frame, then every frame already queued (up to [`MAX_BATCH`]), one flush.
//! It runs inside the connection's task, polled by the driver after the
//! reader. Control frames (`Ping`, `Pong`, `GoAway`) go before any queued
//! data frame, so a `Pong` waits behind at most the frame being written. A
//! peer that takes no byte for `write_stall_timeout` while frames wait is
//! cut off ([`StallWatch`]).
//!
//! Not here: the queues (`outbound.rs`); deciding what to send (`driver.rs`).

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio_util::codec::Encoder;

use crate::calls::incoming::fitting_reply;
use crate::calls::Side;
use crate::codec::{self, pool::MIN_BUFFER};
use crate::error::{Error, Status};
use crate::frame::{frame_len, Frame};
use crate::framing::FrameCodec;
use crate::metered::ByteClocks;
use crate::outbound::Outbound;
use crate::streams::StreamTable;

/// Most frames the writer encodes before it flushes.
pub const MAX_BATCH: usize = 128;

/// Encoded bytes past which the writer writes out in the middle of a batch.
const FLUSH_AT: usize = 64 * 1024;

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
            | Frame::Open { body, .. }
            | Frame::Data { bytes: body, .. }
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

/// Closes the queue however the writer ends (error, cancel, panic).
struct CloseOnDrop(Arc<Outbound>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// How the writer tells a slow peer from one that stopped reading.
pub(crate) struct StallWatch {
    pub(crate) clocks: Arc<ByteClocks>,
    pub(crate) timeout: Duration,
}

impl StallWatch {
    /// Runs a write step; fails if, while it waits, no byte at all is written
    /// for `timeout`. A slow peer that keeps reading never trips this.
    async fn guard<F>(&self, step: F) -> Result<(), Error>
    where
        F: std::future::Future<Output = Result<(), Error>>,
    {
        tokio::pin!(step);
        // The common case completes at once, without arming a timer.
        tokio::select! {
            biased;
            r = &mut step => return r,
            _ = std::future::ready(()) => {}
        }
        let mut mark = self.clocks.last_written();
        loop {
            match tokio::time::timeout(self.timeout, &mut step).await {
                Ok(r) => return r,
                Err(_) => {
                    let now = self.clocks.last_written();
                    if now == mark {
                        return Err(Error::WriteStalled(self.timeout));
                    }
                    mark = now;
                }
            }
        }
    }
}

/// The writer: takes one frame, then every frame already queued (up to
/// [`MAX_BATCH`]), and flushes once; control frames go first. Ends when
/// `data` is stopped and empty, after writing what is queued and TLS
/// close_notify; fails when a write does, or stalls (see [`StallWatch`]).
pub(crate) async fn write_loop<W>(
    mut sink: FrameWriter<W>,
    data: Arc<Outbound>,
    control: Arc<Outbound>,
    streams: Arc<StreamTable>,
    side: Side,
    stall: StallWatch,
) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
{
    let _close = CloseOnDrop(data.clone());
    // Whatever was written into the TLS session before the driver took
    // over leaves now, if no frame is queued to take it along.
    if data.is_empty() && control.is_empty() {
        stall.guard(sink.flush()).await?;
    }
    let mut last_batch = 0;
    let mut taken = VecDeque::new();
    loop {
        // `data` ends the loop once stopped and empty; `control` never does.
        let first = tokio::select! {
            biased;
            f = control.next() => f,
            f = data.next() => f,
        };
        let Some(first) = first else { break };
        feed(&mut sink, first, &streams)?;
        let mut fed = 1;
        // Frames of one burst arrive a few at a time: when they come from
        // other tasks (a client's callers), give those one turn
        // of the scheduler before the syscall. A server's frames are
        // replies its own task queued before polling the writer, so a turn
        // finds nothing more there, and tokio's yield wakes the other
        // worker thread to steal the task (a futex call and a migration
        // per batch). Only when the last batch had company: a lone call (one in
        // flight) must not wait for a turn of the scheduler.
        let mut yielded = side == Side::Server || last_batch < 2;
        // Data frames are taken from the queue many at a time into
        // `taken`, which is empty again when the batch ends.
        while fed < MAX_BATCH || !taken.is_empty() {
            let next = match control.pop_deferring_release() {
                Some(f) => f,
                None => match taken.pop_front() {
                    Some(f) => f,
                    None if fed < MAX_BATCH
                        && data.pop_many_deferring_release(&mut taken, MAX_BATCH - fed) > 0 =>
                    {
                        continue
                    }
                    // The producers' one turn (see `yielded` above).
                    None if !yielded => {
                        yielded = true;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    None => break,
                },
            };
            feed(&mut sink, next, &streams)?;
            fed += 1;
            // What FramedWrite did at 8 KiB: write out a long batch of
            // small frames as it grows instead of buffering all of it.
            if sink.pending() >= FLUSH_AT {
                stall.guard(sink.flush()).await?;
            }
        }
        data.release_deferred();
        control.release_deferred();
        stall.guard(sink.flush()).await?;
        last_batch = fed;
    }
    // Closing: what is already queued (replies, then a last GoAway), then
    // TLS close_notify. The driver bounds this with `close_timeout`.
    while let Some(f) = data.pop() {
        feed(&mut sink, f, &streams)?;
    }
    while let Some(f) = control.pop() {
        feed(&mut sink, f, &streams)?;
    }
    sink.close().await
}

/// Encodes `frame` for writing. A `Response` that does not fit the peer's
/// frame limit (replies are sized before they are queued, so this is a
/// second line of defence) becomes that call's `ResourceExhausted`, so one
/// reply never ends the connection and the calls on it.
fn feed<W: AsyncWrite + Unpin>(
    sink: &mut FrameWriter<W>,
    frame: Frame,
    streams: &StreamTable,
) -> Result<(), Error> {
    let id = match &frame {
        Frame::Response { id, .. } => Some(*id),
        // Taken from the queue: the stream may queue its next piece.
        Frame::Data { id, .. } => {
            streams.taken(*id);
            None
        }
        _ => None,
    };
    match (sink.feed(frame), id) {
        (Err(Error::FrameTooLarge { len, max }), Some(id)) => {
            let status = Status::resource_exhausted(format!(
                "reply frame of {len} bytes does not fit the caller's frame limit of {max} bytes \
                 (its max_frame)"
            ));
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            sink.feed(Frame::Response {
                id,
                result: fitting_reply(id, Err(status), max),
            })
        }
        (result, _) => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_frame;

    fn frames() -> Vec<Frame> {
        let big = |n: usize, b: u8| Bytes::from(vec![b; n]);
        vec![
            Frame::Ping { nonce: 1 },
            Frame::Request {
                id: 2,
                method: "svc.big".into(),
                deadline_ms: Some(1000),
                metadata: {
                    let mut m = crate::metadata::Metadata::new();
                    m.insert("tenant", big(300, 9)).unwrap();
                    m
                },
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
                metadata: crate::metadata::Metadata::new(),
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
