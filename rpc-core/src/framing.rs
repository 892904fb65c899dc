//! Framing on the stream: [`FrameCodec`], a tokio codec that puts the
//! `u32` big-endian length prefix before each encoded [`Frame`] and takes
//! it off again.
//!
//! Reading uses tokio-util's [`LengthDelimitedCodec`] with
//! `max_frame_length` set; before handing it a buffer, [`FrameCodec`]
//! checks the length prefix itself so that an oversize frame is refused
//! with an error naming both the announced length and the limit. (The
//! driver reads through `reader.rs`, which puts large frames in pooled
//! buffers of their own.)
//!
//! Writing produces the same bytes directly into the write buffer (length,
//! then bincode), which spares the copy `LengthDelimitedCodec::encode`
//! would make of an already-encoded frame.
//!
//! Not here: what a frame holds and how it encodes (`frame.rs`).

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::codec;
use crate::error::Error;
use crate::frame::{decode_frame, frame_len, put_common, Frame, LENGTH_PREFIX};

/// A tokio codec for [`Frame`]s: length-delimited framing plus bincode.
#[derive(Debug)]
pub struct FrameCodec {
    inner: LengthDelimitedCodec,
    max_recv: usize,
    max_send: usize,
    /// The inner codec has consumed a length prefix and waits for the body;
    /// the bytes at the front of the buffer are then body, not a prefix.
    in_body: bool,
}

impl FrameCodec {
    /// A codec accepting frames up to `max_recv` bytes and writing frames up
    /// to `max_send` bytes (the peer's limit, once known).
    pub fn new(max_recv: usize, max_send: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_type::<u32>()
            .big_endian()
            .max_frame_length(max_recv)
            .new_codec();
        FrameCodec {
            inner,
            max_recv,
            max_send,
            in_body: false,
        }
    }

    /// True while the inner codec holds a frame's length prefix and waits
    /// for its body.
    pub fn mid_frame(&self) -> bool {
        self.in_body
    }

    /// The largest frame this side will write.
    pub fn max_send(&self) -> usize {
        self.max_send
    }

    /// Changes the largest frame this side will write (after the peer's
    /// `Hello` announced its limit).
    pub fn set_max_send(&mut self, max_send: usize) {
        self.max_send = max_send;
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Error> {
        let has_prefix = src.len() >= LENGTH_PREFIX;
        if !self.in_body && has_prefix {
            let len = (&src[..LENGTH_PREFIX]).get_u32() as usize;
            if len > self.max_recv {
                return Err(Error::FrameTooLarge {
                    len: len as u64,
                    max: self.max_recv as u64,
                });
            }
        }
        match self.inner.decode(src)? {
            Some(buf) => {
                self.in_body = false;
                decode_frame(buf.freeze(), self.max_recv).map(Some)
            }
            None => {
                // The inner codec takes the prefix as soon as it is whole.
                self.in_body |= has_prefix;
                Ok(None)
            }
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), Error> {
        let mark = dst.len();
        dst.put_u32(0);
        if put_common(&frame, dst) {
            let len = dst.len() - mark - LENGTH_PREFIX;
            if len > self.max_send {
                dst.truncate(mark);
                return Err(Error::FrameTooLarge {
                    len: len as u64,
                    max: self.max_send as u64,
                });
            }
            // len <= max_send, which fits in u32 (Hello carries it as one).
            let prefix = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
            dst[mark..mark + LENGTH_PREFIX].copy_from_slice(&prefix);
            return Ok(());
        }
        dst.truncate(mark);
        let len = frame_len(&frame, self.max_send)?;
        dst.reserve(LENGTH_PREFIX + len);
        // frame_len checked len <= max_send, and max_send fits in u32 because
        // Hello carries it as one; saturate rather than wrap regardless.
        dst.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        let start = dst.len();
        if let Err(e) = codec::encode_sized(&frame, dst.writer()) {
            dst.truncate(start - LENGTH_PREFIX);
            return Err(e.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // One list of every variant, shared with frame.rs's tests.
    use crate::frame::tests::all_frames;
    use crate::frame::Hello;
    use crate::metadata::Metadata;
    use bytes::Bytes;

    #[test]
    fn every_variant_round_trips_through_the_codec() {
        let mut codec = FrameCodec::new(1 << 20, 1 << 20);
        let mut buf = BytesMut::new();
        for f in all_frames() {
            codec.encode(f, &mut buf).unwrap();
        }
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            out.push(f);
        }
        assert_eq!(out, all_frames());
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frame_waits_for_more_bytes() {
        let mut codec = FrameCodec::new(1024, 1024);
        let mut full = BytesMut::new();
        codec.encode(Frame::Ping { nonce: 3 }, &mut full).unwrap();
        let mut partial = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(codec.decode(&mut partial).unwrap(), None);
        partial.extend_from_slice(&full[full.len() - 1..]);
        assert_eq!(
            codec.decode(&mut partial).unwrap(),
            Some(Frame::Ping { nonce: 3 })
        );
    }

    #[test]
    fn frames_arriving_a_few_bytes_at_a_time_decode_in_order() {
        let mut codec = FrameCodec::new(1 << 16, 1 << 16);
        let mut wire = BytesMut::new();
        for f in all_frames() {
            codec.encode(f, &mut wire).unwrap();
        }
        for chunk in [1, 3, 5, 7, 64] {
            let mut src = BytesMut::new();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                src.extend_from_slice(piece);
                while let Some(f) = codec.decode(&mut src).unwrap() {
                    out.push(f);
                }
            }
            assert_eq!(out, all_frames(), "chunk size {chunk}");
        }
    }

    #[test]
    fn oversize_prefix_is_refused_naming_the_limit() {
        let mut codec = FrameCodec::new(1024, 1024);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                Error::FrameTooLarge {
                    len: 0xffff_ffff,
                    max: 1024
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn hello_is_variant_zero_with_version_first() {
        // The compatibility rule in the module docs, pinned.
        let mut codec = FrameCodec::new(1024, 1024);
        let mut buf = BytesMut::new();
        let hello = Hello {
            version: 1,
            max_frame: 2,
            heartbeat_ms: 3,
            max_in_flight: 4,
        };
        codec.encode(Frame::Hello(hello), &mut buf).unwrap();
        assert_eq!(&buf[LENGTH_PREFIX..LENGTH_PREFIX + 2], &[0, 1]);
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let mut codec = FrameCodec::new(1024, 1024);
        let cases: Vec<Vec<u8>> = vec![
            vec![],                          // empty frame
            vec![42],                        // bad enum tag
            vec![1, 7],                      // truncated Request
            vec![4, 1, 0],                   // Ping with a trailing byte
            vec![1, 1, 2, 0xff, 0xfe, 0, 0], // method name not UTF-8
        ];
        for body in cases {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32);
            buf.extend_from_slice(&body);
            assert!(
                matches!(codec.decode(&mut buf), Err(Error::Codec(_))),
                "{body:?} decoded"
            );
        }
    }

    #[test]
    fn body_is_a_slice_of_the_read_buffer() {
        let mut codec = FrameCodec::new(1 << 16, 1 << 16);
        let mut buf = BytesMut::new();
        let body = Bytes::from(vec![9u8; 1000]);
        codec
            .encode(
                Frame::Request {
                    id: 1,
                    method: "m".into(),
                    deadline_ms: None,
                    metadata: Metadata::new(),
                    body: body.clone(),
                },
                &mut buf,
            )
            .unwrap();
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let Some(Frame::Request { body: got, .. }) = codec.decode(&mut buf).unwrap() else {
            panic!("not a request");
        };
        assert_eq!(got, body);
        let p = got.as_ptr() as usize;
        assert!(p >= start && p < end, "body was copied");
    }

    #[test]
    fn encode_refuses_frames_over_the_send_limit() {
        let mut codec = FrameCodec::new(1 << 20, 100);
        let mut buf = BytesMut::new();
        let err = codec
            .encode(
                Frame::Response {
                    id: 1,
                    result: Ok(Bytes::from(vec![0u8; 200])),
                },
                &mut buf,
            )
            .unwrap_err();
        assert!(
            matches!(err, Error::FrameTooLarge { max: 100, .. }),
            "{err}"
        );
        assert!(buf.is_empty());
    }
}
