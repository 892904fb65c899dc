//! The driver's frame reader: [`FrameCodec`] over a read buffer, except that
//! a large frame is read straight into a buffer of the encode pool.
//!
//! A frame's body is handed on as a slice of the buffer it was read into, so
//! that buffer lives until the caller (or handler) drops the body. With
//! tokio-util's `FramedRead`, a large reply still held by its caller left
//! the read buffer shared, the next large frame got a fresh allocation, and
//! glibc gave that memory back to the kernel when it was freed, to fault it
//! in again for the next. A frame of [`MIN_BUFFER`] bytes or more goes into
//! a pooled buffer, which comes back to the pool when its last slice is
//! dropped, and the read buffer stays small.
//!
//! Errors and end of stream are those of `FramedRead` with [`FrameCodec`]:
//! an oversize length prefix fails before any of the body is read, and the
//! stream ending inside a frame is an error.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::AsyncRead;
use tokio_util::codec::Decoder;
use tokio_util::io::poll_read_buf;

use crate::codec::pool::{Pool, MIN_BUFFER, POOL};
use crate::error::Error;
use crate::frame::{decode_frame, Frame, LENGTH_PREFIX};
use crate::framing::FrameCodec;

/// Room the read buffer starts with, as `FramedRead`'s.
const INITIAL_CAPACITY: usize = 8 * 1024;

/// Reads [`Frame`]s from `io`.
pub(crate) struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    codec: FrameCodec,
    max_recv: usize,
    /// A large frame being read into a pooled buffer, and its length.
    large: Option<(Vec<u8>, usize)>,
    pool: &'static Pool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R, max_recv: usize, max_send: usize) -> Self {
        Self::with_pool(io, max_recv, max_send, &POOL)
    }

    fn with_pool(io: R, max_recv: usize, max_send: usize, pool: &'static Pool) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(INITIAL_CAPACITY),
            codec: FrameCodec::new(max_recv, max_send),
            max_recv,
            large: None,
            pool,
        }
    }

    /// True while part of a frame has been read.
    pub(crate) fn mid_frame(&self) -> bool {
        !self.buf.is_empty() || self.codec.mid_frame() || self.large.is_some()
    }

    /// The next frame; `None` at a clean end of stream.
    pub(crate) async fn next(&mut self) -> Option<Result<Frame, Error>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// The next frame if the read buffer holds all of it already, without
    /// reading; `None` if it does not (or if it is a large frame, which
    /// [`Self::next`] reads into a pooled buffer).
    pub(crate) fn buffered(&mut self) -> Option<Result<Frame, Error>> {
        if self.large.is_some() || self.large_frame_next().is_some() {
            return None;
        }
        self.codec.decode(&mut self.buf).transpose()
    }

    /// The length of the frame whose prefix starts the buffer, if it is one
    /// for a pooled buffer (an oversize one is left to the codec's error).
    fn large_frame_next(&self) -> Option<usize> {
        if self.codec.mid_frame() || self.buf.len() < LENGTH_PREFIX {
            return None;
        }
        let len = (&self.buf[..LENGTH_PREFIX]).get_u32() as usize;
        (len >= MIN_BUFFER && len <= self.max_recv).then_some(len)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, Error>>> {
        loop {
            if let Some((body, len)) = &mut self.large {
                let left = *len - body.len();
                if left == 0 {
                    let Some((body, _)) = self.large.take() else {
                        continue;
                    };
                    let frame = decode_frame(self.pool.bytes(body), self.max_recv);
                    return Poll::Ready(Some(frame));
                }
                let mut room = body.limit(left);
                let n = match ready!(poll_read_buf(Pin::new(&mut self.io), cx, &mut room)) {
                    Ok(n) => n,
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                };
                if n == 0 {
                    return Poll::Ready(Some(Err(ended_mid_frame())));
                }
                continue;
            }
            if let Some(len) = self.large_frame_next() {
                self.buf.advance(LENGTH_PREFIX);
                let mut body = self.pool.take(len);
                let have = self.buf.len().min(len);
                body.extend_from_slice(&self.buf[..have]);
                self.buf.advance(have);
                self.large = Some((body, len));
                continue;
            }
            // Small frames, and the oversize-prefix error, as before.
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            self.buf.reserve(1);
            let n = match ready!(poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            };
            if n == 0 {
                return Poll::Ready(if self.mid_frame() {
                    Some(Err(ended_mid_frame()))
                } else {
                    None
                });
            }
        }
    }
}

/// What `LengthDelimitedCodec` reports for a stream that ends in a frame.
fn ended_mid_frame() -> Error {
    Error::Io(std::io::Error::other("bytes remaining on stream"))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;

    use super::*;

    fn response(id: u64, len: usize) -> Frame {
        Frame::Response {
            id,
            result: Ok(Bytes::from(vec![id as u8; len])),
        }
    }

    fn wire(frames: &[Frame]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        let mut codec = FrameCodec::new(8 << 20, 8 << 20);
        for f in frames {
            codec.encode(f.clone(), &mut buf).unwrap();
        }
        buf.to_vec()
    }

    /// Frames of every size, written a few bytes at a time and all at once,
    /// come out whole and in order.
    #[tokio::test]
    async fn small_and_large_frames_come_out_whole_in_any_chunking() {
        let frames = vec![
            response(1, 10),
            response(2, MIN_BUFFER - 64),
            response(3, MIN_BUFFER),
            response(4, 1 << 20),
            response(5, 0),
            response(6, 3 << 20),
        ];
        let bytes = wire(&frames);
        for chunk in [7, 4096, 70_000, bytes.len()] {
            let (mut tx, rx) = tokio::io::duplex(256 * 1024);
            let data = bytes.clone();
            let writer = tokio::spawn(async move {
                for piece in data.chunks(chunk) {
                    tx.write_all(piece).await.unwrap();
                }
            });
            let mut reader = FrameReader::new(rx, 8 << 20, 8 << 20);
            for want in &frames {
                let got = reader.next().await.expect("a frame").expect("no error");
                assert_eq!(&got, want, "chunks of {chunk}");
            }
            writer.await.unwrap();
            assert!(
                reader.next().await.is_none(),
                "clean end, chunks of {chunk}"
            );
        }
    }

    /// The driver takes frames with `next` and then with `buffered` until
    /// it gives `None`: every frame must come out once, in order, whatever
    /// the chunking, with large ones left to `next` and a frame cut by a
    /// read boundary waiting for the rest.
    #[tokio::test]
    async fn buffered_then_next_gives_every_frame_once_in_order() {
        let frames = vec![
            response(1, 10),
            response(2, 20),
            response(3, MIN_BUFFER),
            response(4, 0),
            response(5, 300),
            response(6, 1 << 20),
            response(7, 5),
        ];
        let bytes = wire(&frames);
        for chunk in [7, 100, 4096, 70_000, bytes.len()] {
            let (mut tx, rx) = tokio::io::duplex(256 * 1024);
            let data = bytes.clone();
            let writer = tokio::spawn(async move {
                for piece in data.chunks(chunk) {
                    tx.write_all(piece).await.unwrap();
                }
            });
            static BUFFERED_POOL: Pool = Pool::new();
            let mut reader = FrameReader::with_pool(rx, 8 << 20, 8 << 20, &BUFFERED_POOL);
            let mut got = Vec::new();
            let mut from_buffer = 0;
            while got.len() < frames.len() {
                got.push(reader.next().await.expect("a frame").expect("no error"));
                while let Some(frame) = reader.buffered() {
                    let frame = frame.expect("no error");
                    // A large frame goes to a pooled buffer through `next`.
                    if let Frame::Response { result: Ok(b), .. } = &frame {
                        assert!(b.len() < MIN_BUFFER, "a large frame from the buffer");
                    }
                    got.push(frame);
                    from_buffer += 1;
                }
            }
            assert_eq!(got, frames, "chunks of {chunk}");
            // The large frames were read into pooled buffers, which come
            // back once their bodies are dropped.
            drop(got);
            assert!(!BUFFERED_POOL.kept().is_empty(), "chunks of {chunk}");
            if chunk == bytes.len() {
                // Read at once: the small frames after the first came from
                // the buffer, the large ones did not.
                assert!(from_buffer >= 2, "{from_buffer} from the buffer");
            }
            writer.await.unwrap();
            assert!(
                reader.next().await.is_none(),
                "clean end, chunks of {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn a_large_body_is_read_into_a_pooled_buffer_that_goes_back() {
        static TEST_POOL: Pool = Pool::new();
        let bytes = wire(&[response(9, 1 << 20), response(10, 1 << 20)]);
        let mut reader = FrameReader::with_pool(&bytes[..], 8 << 20, 8 << 20, &TEST_POOL);
        let mut first = None;
        for _ in 0..2 {
            let Some(Ok(Frame::Response {
                result: Ok(body), ..
            })) = reader.next().await
            else {
                panic!("expected a response");
            };
            assert_eq!(body.len(), 1 << 20);
            assert!(reader.buf.capacity() < 64 * 1024, "the read buffer grew");
            let at = body.as_ptr() as usize;
            // Held while the body lives, back in the pool once it is dropped.
            assert!(TEST_POOL.kept().is_empty());
            drop(body);
            assert_eq!(TEST_POOL.kept().len(), 1);
            // The second frame is read into the first one's buffer.
            match first {
                None => first = Some(at),
                Some(was) => assert_eq!(at, was, "a new buffer for the second frame"),
            }
        }
    }

    #[tokio::test]
    async fn an_oversize_prefix_fails_before_the_body_is_read() {
        let mut bytes = (5u32 << 20).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let mut reader = FrameReader::new(&bytes[..], 4 << 20, 4 << 20);
        match reader.next().await {
            Some(Err(Error::FrameTooLarge { len, max })) => {
                assert_eq!((len, max), (5 << 20, 4 << 20));
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_stream_ending_inside_a_frame_is_an_error() {
        for frame in [response(1, 100), response(2, 1 << 20)] {
            let bytes = wire(&[frame]);
            for cut in [2, LENGTH_PREFIX, LENGTH_PREFIX + 1, bytes.len() - 1] {
                let mut reader = FrameReader::new(&bytes[..cut], 8 << 20, 8 << 20);
                match reader.next().await {
                    Some(Err(Error::Io(e))) => {
                        assert_eq!(e.to_string(), "bytes remaining on stream")
                    }
                    other => panic!("cut at {cut}: expected an error, got {other:?}"),
                }
            }
        }
    }
}
