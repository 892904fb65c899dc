//! The wire: the [`Frame`] enum and its encoding.
//!
//! Every frame is `u32 length (big endian) || bincode(Frame)`; the length
//! prefix is `framing.rs`'s ([`FrameCodec`](crate::FrameCodec)):
//!
//! ```text
//!  +----------------+------------------------------------------+
//!  | length: u32 BE | bincode(Frame), exactly `length` bytes    |
//!  +----------------+------------------------------------------+
//! ```
//!
//! The body of a `Request`/`Response` is decoded as a [`Bytes`] slice of
//! the buffer the frame was read into: no copy. The two frames of every
//! call are read and written field by field (`decode_common`,
//! `put_common`); anything else goes through serde.
//!
//! Compatibility rule: `Frame::Hello` is variant 0 and `Hello.version` its
//! first field in every protocol version, so any two versions can read each
//! other's `Hello` and refuse cleanly. Append variants; never reorder.
//!
//! This module does not decide what a frame means; the connection driver
//! does.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Status};
use crate::metadata::{Metadata, MAX_ENTRIES};

/// The protocol version this crate speaks.
///
/// Version 2 added call metadata to `Request`; version 3 the `Drain` frame;
/// version 4 streams (`Open`, `Data`, `Credit`, `End`, `Reset`).
pub const PROTOCOL_VERSION: u16 = 4;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// The first frame in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version; must equal [`PROTOCOL_VERSION`] on both sides.
    pub version: u16,
    /// The largest frame (bytes after the length prefix) this side accepts.
    pub max_frame: u32,
    /// This side's heartbeat interval in milliseconds; the peer must not ping
    /// more often than this.
    pub heartbeat_ms: u32,
    /// Calls this side serves at once on this connection. The peer queues
    /// calls beyond it locally (like HTTP/2's `MAX_CONCURRENT_STREAMS`)
    /// instead of having them refused with `Overloaded`.
    pub max_in_flight: u32,
}

/// One message on the wire.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Frame {
    /// First frame in both directions.
    Hello(Hello),
    /// A call. `body` is the bincode encoding of the arguments.
    Request {
        /// Chosen by the caller, unique among its calls on this connection.
        id: u64,
        /// The method's name.
        method: String,
        /// Time the caller will wait, in milliseconds from when it sent this.
        deadline_ms: Option<u32>,
        /// The call's metadata (bounded: see [`crate::metadata`]).
        metadata: Metadata,
        /// The encoded arguments.
        body: Bytes,
    },
    /// The answer to the `Request` with the same id.
    Response {
        /// The request's id.
        id: u64,
        /// The encoded reply, or why there is none.
        result: Result<Bytes, Status>,
    },
    /// The caller gave up on call `id`; the callee should stop its handler.
    Cancel {
        /// The request's id.
        id: u64,
    },
    /// Heartbeat; the peer answers with a `Pong` carrying the same nonce.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// Answer to a `Ping`.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// No new calls on this connection; the reason is for people.
    GoAway {
        /// Why.
        reason: String,
    },
    /// A graceful `GoAway`: no new calls on this connection, and none of
    /// the sender's peer's requests with an id above `last_id` was run, so
    /// those may go elsewhere (HTTP/2's last-stream-id). Requests up to
    /// `last_id` are answered before the connection closes.
    Drain {
        /// The highest request id the sender had received.
        last_id: u64,
        /// Why.
        reason: String,
    },
    /// A call that streams items in one direction or both (see
    /// `streams/`): like `Request`, and the callee may send `Data` before
    /// its `Response`, which ends the call.
    Open {
        /// Chosen by the caller, unique among its calls on this connection.
        id: u64,
        /// The method's name.
        method: String,
        /// Time the caller will wait for the whole stream, in milliseconds.
        deadline_ms: Option<u32>,
        /// The call's metadata (bounded: see [`crate::metadata`]).
        metadata: Metadata,
        /// The encoded arguments.
        body: Bytes,
        /// The caller sends a stream of items too, ended by `End`.
        sends_stream: bool,
    },
    /// A piece of one stream item: at most [`crate::streams::CHUNK`] bytes,
    /// counted against the receiver's credit.
    Data {
        /// The stream's (call's) id.
        id: u64,
        /// The item continues in the next `Data` of this stream.
        more: bool,
        /// The piece's bytes.
        bytes: Bytes,
    },
    /// The receiver of a stream lets its sender send `bytes` more `Data`
    /// bytes on stream `id`, or on the whole connection when `id` is 0.
    Credit {
        /// The stream's id, or 0 for the connection.
        id: u64,
        /// Bytes added to the sender's credit.
        bytes: u64,
    },
    /// The caller's stream of items is complete (its half of the call).
    End {
        /// The stream's id.
        id: u64,
    },
    /// The sender of this frame reads no more of stream `id`: stop sending
    /// its `Data` (QUIC's STOP_SENDING). The call itself goes on.
    Reset {
        /// The stream's id.
        id: u64,
    },
}

impl Frame {
    /// The variant's name, for logs and protocol errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Request { .. } => "Request",
            Frame::Response { .. } => "Response",
            Frame::Cancel { .. } => "Cancel",
            Frame::Ping { .. } => "Ping",
            Frame::Pong { .. } => "Pong",
            Frame::GoAway { .. } => "GoAway",
            Frame::Drain { .. } => "Drain",
            Frame::Open { .. } => "Open",
            Frame::Data { .. } => "Data",
            Frame::Credit { .. } => "Credit",
            Frame::End { .. } => "End",
            Frame::Reset { .. } => "Reset",
        }
    }
}

/// The borrowed twin of [`Frame`], decoded without copying bodies; it must
/// stay field for field identical to `Frame`.
#[derive(Deserialize)]
enum WireFrame<'a> {
    Hello(Hello),
    Request {
        id: u64,
        method: &'a str,
        deadline_ms: Option<u32>,
        #[serde(borrow)]
        metadata: Vec<(&'a str, &'a [u8])>,
        body: &'a [u8],
    },
    Response {
        id: u64,
        #[serde(borrow)]
        result: Result<&'a [u8], Status>,
    },
    Cancel {
        id: u64,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    GoAway {
        reason: String,
    },
    Drain {
        last_id: u64,
        reason: String,
    },
    Open {
        id: u64,
        method: &'a str,
        deadline_ms: Option<u32>,
        #[serde(borrow)]
        metadata: Vec<(&'a str, &'a [u8])>,
        body: &'a [u8],
        sends_stream: bool,
    },
    Data {
        id: u64,
        more: bool,
        bytes: &'a [u8],
    },
    Credit {
        id: u64,
        bytes: u64,
    },
    End {
        id: u64,
    },
    Reset {
        id: u64,
    },
}

/// Decodes one frame's bytes (without the length prefix); bodies become
/// slices of `buf`.
pub fn decode_frame(buf: Bytes, max_frame: usize) -> Result<Frame, Error> {
    if buf.len() <= max_frame {
        if let Some(frame) = decode_common(&buf) {
            return Ok(frame);
        }
    }
    through_serde(&buf, max_frame)
}

/// How deeply a frame's own fields may nest: `Response { result:
/// Err(Status { code }) }` is the deepest, at 5 levels. Bodies are bytes
/// here; their values are decoded later, under the configured limit.
pub(crate) const FRAME_DEPTH: usize = 8;

/// [`decode_frame`] for any frame, through serde.
fn through_serde(buf: &Bytes, max_frame: usize) -> Result<Frame, Error> {
    let wire: WireFrame<'_> = codec::decode(buf, max_frame, FRAME_DEPTH)?;
    Ok(match wire {
        WireFrame::Hello(h) => Frame::Hello(h),
        WireFrame::Request {
            id,
            method,
            deadline_ms,
            metadata,
            body,
        } => Frame::Request {
            id,
            method: method.to_owned(),
            deadline_ms,
            metadata: owned_metadata(buf, metadata),
            body: buf.slice_ref(body),
        },
        WireFrame::Response { id, result } => Frame::Response {
            id,
            result: result.map(|b| buf.slice_ref(b)),
        },
        WireFrame::Cancel { id } => Frame::Cancel { id },
        WireFrame::Ping { nonce } => Frame::Ping { nonce },
        WireFrame::Pong { nonce } => Frame::Pong { nonce },
        WireFrame::GoAway { reason } => Frame::GoAway { reason },
        WireFrame::Drain { last_id, reason } => Frame::Drain { last_id, reason },
        WireFrame::Open {
            id,
            method,
            deadline_ms,
            metadata,
            body,
            sends_stream,
        } => Frame::Open {
            id,
            method: method.to_owned(),
            deadline_ms,
            metadata: owned_metadata(buf, metadata),
            body: buf.slice_ref(body),
            sends_stream,
        },
        WireFrame::Data { id, more, bytes } => Frame::Data {
            id,
            more,
            bytes: buf.slice_ref(bytes),
        },
        WireFrame::Credit { id, bytes } => Frame::Credit { id, bytes },
        WireFrame::End { id } => Frame::End { id },
        WireFrame::Reset { id } => Frame::Reset { id },
    })
}

/// Metadata read as slices of `buf`, owned.
fn owned_metadata(buf: &Bytes, entries: Vec<(&str, &[u8])>) -> Metadata {
    Metadata::from_wire(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), buf.slice_ref(v)))
            .collect(),
    )
}

/// Variant indexes on the wire of the frames `decode_common` and
/// `put_common` handle: `Frame`'s order, and `Result`'s for the reply.
const REQUEST: u32 = 1;
const RESPONSE: u32 = 2;
const OK: u32 = 0;

/// The frames of every call, a `Request` and a `Response` carrying a reply,
/// read field by field (see `codec::Fields`); `None` for any other frame,
/// and for anything unusual, which `decode_frame` then hands to serde. The
/// variant indexes are `Frame`'s order, and a test checks both paths agree.
fn decode_common(buf: &Bytes) -> Option<Frame> {
    let mut fields = codec::Fields::new(buf);
    let frame = match fields.variant()? {
        REQUEST => {
            let id = fields.varint()?;
            let method = fields.str()?;
            let deadline_ms = match fields.option()? {
                true => Some(fields.u32()?),
                false => None,
            };
            let metadata = match fields.varint()? {
                0 => Metadata::new(),
                // Bounded before anything is allocated for them; more is a
                // protocol error serde's path reports in full.
                n if n as usize <= MAX_ENTRIES => {
                    let mut entries = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        let key = fields.str()?;
                        let value = fields.bytes()?;
                        entries.push((key.to_owned(), buf.slice_ref(value)));
                    }
                    Metadata::from_wire(entries)
                }
                _ => return None,
            };
            let body = fields.bytes()?;
            Frame::Request {
                id,
                method: method.to_owned(),
                deadline_ms,
                metadata,
                body: buf.slice_ref(body),
            }
        }
        RESPONSE => {
            let id = fields.varint()?;
            // `Ok` only; a `Status` goes through serde.
            if fields.variant()? != OK {
                return None;
            }
            let reply = fields.bytes()?;
            Frame::Response {
                id,
                result: Ok(buf.slice_ref(reply)),
            }
        }
        _ => return None,
    };
    fields.end().then_some(frame)
}

/// Writes a `Request`, or a `Response` carrying a reply, without serde: the
/// bytes serde would write (the variant index, then the fields in order),
/// in fewer steps. False, writing nothing, for other frames.
pub(crate) fn put_common(frame: &Frame, dst: &mut BytesMut) -> bool {
    match frame {
        Frame::Request {
            id,
            method,
            deadline_ms,
            metadata,
            body,
        } => {
            codec::put_varint(dst, REQUEST.into());
            codec::put_varint(dst, *id);
            codec::put_bytes(dst, method.as_bytes());
            codec::put_option(dst, deadline_ms.is_some());
            if let Some(d) = deadline_ms {
                codec::put_varint(dst, u64::from(*d));
            }
            codec::put_varint(dst, metadata.len() as u64);
            for (key, value) in metadata.entries() {
                codec::put_bytes(dst, key.as_bytes());
                codec::put_bytes(dst, value);
            }
            codec::put_bytes(dst, body);
        }
        Frame::Response { id, result: Ok(b) } => {
            codec::put_varint(dst, RESPONSE.into());
            codec::put_varint(dst, *id);
            codec::put_varint(dst, OK.into());
            codec::put_bytes(dst, b);
        }
        _ => return false,
    }
    true
}

/// The encoded size of `frame` without its length prefix, or
/// [`Error::FrameTooLarge`] past `max_frame`.
pub fn frame_len(frame: &Frame, max_frame: usize) -> Result<usize, Error> {
    codec::encoded_len(frame, max_frame).map_err(|e| {
        if e.is_size_limit() {
            Error::FrameTooLarge {
                len: codec::encoded_len(frame, usize::MAX).map_or(u64::MAX, |n| n as u64),
                max: max_frame as u64,
            }
        } else {
            Error::Codec(e)
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::StatusCode;

    /// One frame of every variant (requests with and without metadata,
    /// both kinds of response).
    pub(crate) fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version: 1,
                max_frame: 4 << 20,
                heartbeat_ms: 5000,
                max_in_flight: 100,
            }),
            Frame::Request {
                id: 7,
                method: "echo".into(),
                deadline_ms: Some(300),
                metadata: Metadata::new(),
                body: Bytes::from_static(b"\x05hello"),
            },
            Frame::Request {
                id: 8,
                method: "echo".into(),
                deadline_ms: None,
                metadata: some_metadata(),
                body: Bytes::from_static(b"\x05hello"),
            },
            Frame::Response {
                id: 7,
                result: Ok(Bytes::from_static(b"abc")),
            },
            Frame::Response {
                id: 8,
                result: Err(Status::new(StatusCode::Overloaded, "busy")),
            },
            Frame::Cancel { id: 9 },
            Frame::Ping { nonce: 1 },
            Frame::Pong { nonce: u64::MAX },
            Frame::GoAway {
                reason: "bye".into(),
            },
            Frame::Drain {
                last_id: 41,
                reason: "draining".into(),
            },
            Frame::Open {
                id: 10,
                method: "Files.upload".into(),
                deadline_ms: Some(60_000),
                metadata: some_metadata(),
                body: Bytes::from_static(b"\x01a"),
                sends_stream: true,
            },
            Frame::Data {
                id: 10,
                more: true,
                bytes: Bytes::from(vec![3u8; 60_000]),
            },
            Frame::Credit {
                id: 0,
                bytes: 1 << 20,
            },
            Frame::End { id: 10 },
            Frame::Reset { id: 11 },
        ]
    }

    /// What serde makes of `bytes` (the path `decode_common` stands in for).
    fn serde_only(bytes: &Bytes) -> Result<Frame, String> {
        through_serde(bytes, 1 << 20).map_err(|e| e.to_string())
    }

    fn some_metadata() -> Metadata {
        let mut m = Metadata::new();
        m.insert("authorization", "Bearer t").unwrap();
        m.insert("traceparent", vec![0u8, 1, 2]).unwrap();
        m
    }

    #[test]
    fn calls_and_replies_encode_and_decode_the_same_without_serde() {
        let mut frames = all_frames();
        for id in [
            0,
            250,
            251,
            65_535,
            65_536,
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            for deadline_ms in [None, Some(0), Some(250), Some(251), Some(u32::MAX)] {
                for len in [0, 250, 251, 70_000] {
                    frames.push(Frame::Request {
                        id,
                        method: "Demo.échο".into(),
                        deadline_ms,
                        metadata: Metadata::new(),
                        body: Bytes::from(vec![7u8; len]),
                    });
                    frames.push(Frame::Request {
                        id,
                        method: "m".into(),
                        deadline_ms,
                        metadata: some_metadata(),
                        body: Bytes::from(vec![7u8; len]),
                    });
                    frames.push(Frame::Response {
                        id,
                        result: Ok(Bytes::from(vec![9u8; len])),
                    });
                }
            }
        }
        for frame in frames {
            let bytes = codec::encode(&frame, 1 << 20).unwrap();
            // Written without serde, the same bytes and the same length.
            let mut ours = BytesMut::new();
            if put_common(&frame, &mut ours) {
                assert_eq!(&ours[..], &bytes[..], "{frame:?}");
            } else {
                assert!(ours.is_empty());
            }
            let common = matches!(
                frame,
                Frame::Request { .. } | Frame::Response { result: Ok(_), .. }
            );
            let fast = decode_common(&bytes);
            if common {
                assert_eq!(fast.as_ref(), Some(&frame));
                assert_eq!(serde_only(&bytes).as_ref(), Ok(&frame));
            } else {
                assert_eq!(fast, None, "{frame:?}");
            }
            assert_eq!(decode_frame(bytes, 1 << 20).unwrap(), frame);
        }
    }

    proptest::proptest! {
        /// Whatever the reader without serde accepts, serde decodes to the
        /// same frame; what it turns down goes to serde anyway.
        #[test]
        fn bytes_read_without_serde_mean_what_serde_reads(
            variant in 0u8..4,
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
            cut in 0usize..24,
        ) {
            // A request or a reply, then the bytes cut or changed at random.
            let frame = if variant % 2 == 0 {
                Frame::Request { id: 300, method: "m".into(), deadline_ms: Some(70_000), metadata: some_metadata(), body: Bytes::from_static(b"ab") }
            } else {
                Frame::Response { id: 5, result: Ok(Bytes::from_static(b"xyz")) }
            };
            let mut bytes = codec::encode(&frame, 1 << 20).unwrap().to_vec();
            match variant {
                0 | 1 => { bytes.truncate(cut.min(bytes.len())); bytes.extend_from_slice(&rest); }
                _ => { for (i, b) in rest.iter().enumerate() { if let Some(x) = bytes.get_mut(i % 16) { *x ^= b; } } }
            }
            let bytes = Bytes::from(bytes);
            if let Some(fast) = decode_common(&bytes) {
                proptest::prop_assert_eq!(Ok(fast), serde_only(&bytes));
            }
        }
    }
}
