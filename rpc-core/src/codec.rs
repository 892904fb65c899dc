//! The one place bincode is used.
//!
//! Every value that crosses the wire is encoded here with bincode 1.3.3's
//! `DefaultOptions` (varint integers, little endian), a size limit, and
//! `reject_trailing_bytes`. The limit caps both what we write and what a
//! decode may allocate, so a forged length inside a frame cannot make us
//! allocate more than the frame limit. Decoding borrows from the frame's
//! bytes where the type allows it (`&[u8]`, `&str`).
//!
//! Swapping bincode for another format means changing this file only; no
//! bincode type appears in this module's public API.
//!
//! This module does not frame: length prefixes are [`crate::frame`]'s job.

use std::fmt;
use std::io;
use std::marker::PhantomData;

use bincode::Options;
use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::de::Visitor;
use serde::{Deserialize, Serialize};

/// A value that did not encode or decode.
#[derive(Debug)]
pub struct CodecError {
    inner: bincode::Error,
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // bincode's messages are already lowercase and specific, e.g.
        // "invalid value: integer `9`, expected variant index 0 <= i < 7".
        fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

impl CodecError {
    /// True when the value was larger than the limit.
    pub fn is_size_limit(&self) -> bool {
        matches!(*self.inner, bincode::ErrorKind::SizeLimit)
    }
}

fn options(limit: usize) -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(limit as u64)
        .reject_trailing_bytes()
}

/// The number of bytes `value` encodes to, or an error past `limit`.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T, limit: usize) -> Result<usize, CodecError> {
    options(limit)
        .serialized_size(value)
        .map(|n| n as usize)
        .map_err(|inner| CodecError { inner })
}

/// Appends the encoding of `value` to `buf`; on error `buf` is unchanged.
pub fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    limit: usize,
    buf: &mut BytesMut,
) -> Result<(), CodecError> {
    let start = buf.len();
    let result = options(limit).serialize_into(buf.writer(), value);
    if result.is_err() {
        buf.truncate(start);
    }
    result.map_err(|inner| CodecError { inner })
}

/// Encodes `value` into a new buffer (a call's arguments or a reply).
pub fn encode<T: Serialize + ?Sized>(value: &T, limit: usize) -> Result<Bytes, CodecError> {
    let mut buf = BytesMut::with_capacity(encoded_len(value, limit)?);
    encode_into(value, limit, &mut buf)?;
    Ok(buf.freeze())
}

/// Like [`decode`], for a value kept past `bytes`: when `T` is [`Bytes`] or
/// `(Bytes,)` (a method taking or returning one byte string), the value is a
/// slice of `bytes`, not a copy. Same result and same errors as `decode`:
/// anything but a well-formed byte string within `limit` goes through it.
pub fn decode_owned<T: DeserializeOwned + 'static>(
    bytes: &Bytes,
    limit: usize,
) -> Result<T, CodecError> {
    use std::any::{Any, TypeId};
    let single = TypeId::of::<T>() == TypeId::of::<Bytes>();
    let tuple = TypeId::of::<T>() == TypeId::of::<(Bytes,)>();
    if single || tuple {
        if let Some(payload) = byte_string(bytes, limit) {
            let value: Box<dyn Any> = if single {
                Box::new(payload)
            } else {
                Box::new((payload,))
            };
            if let Ok(value) = value.downcast::<T>() {
                return Ok(*value);
            }
        }
    }
    decode(bytes, limit)
}

/// The payload when `bytes` is exactly one bincode byte string (varint
/// length, then that many bytes) in its canonical form, within `limit`.
fn byte_string(bytes: &Bytes, limit: usize) -> Option<Bytes> {
    if bytes.len() > limit {
        return None;
    }
    let (&marker, rest) = bytes.split_first()?;
    let (len, head) = match marker {
        0..=250 => (u64::from(marker), 1),
        251 => (
            u64::from(u16::from_le_bytes(rest.get(..2)?.try_into().ok()?)),
            3,
        ),
        252 => (
            u64::from(u32::from_le_bytes(rest.get(..4)?.try_into().ok()?)),
            5,
        ),
        253 => (u64::from_le_bytes(rest.get(..8)?.try_into().ok()?), 9),
        _ => return None,
    };
    // Canonical: the shortest form for the length (what bincode writes).
    let canonical = match head {
        1 => true,
        3 => len >= 251,
        5 => len > u64::from(u16::MAX),
        _ => len > u64::from(u32::MAX),
    };
    (canonical && (bytes.len() - head) as u64 == len).then(|| bytes.slice(head..))
}

/// Decodes one value that must fill `bytes` exactly; borrows from `bytes`
/// where `T` allows it. The size limit applies (see [`LimitedSlice`]).
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], limit: usize) -> Result<T, CodecError> {
    let mut rest = bytes;
    let value = options(limit)
        .deserialize_from_custom_seed(PhantomData::<T>, LimitedSlice { rest: &mut rest })
        .map_err(|inner| CodecError { inner })?;
    if !rest.is_empty() {
        return Err(CodecError {
            inner: Box::new(bincode::ErrorKind::Custom(format!(
                "{} bytes left over after the message",
                rest.len()
            ))),
        });
    }
    Ok(value)
}

/// A byte-slice reader for bincode that keeps the configured size limit.
///
/// bincode 1.3.3's own `deserialize(&[u8])` replaces the limit with
/// "infinite" on the grounds that a slice bounds what can be read; that is
/// true of bytes copied out, but not of what serde may reserve for a forged
/// sequence length. Decoding through this reader and
/// `deserialize_from_custom_seed` keeps `with_limit` in force and still lends
/// `&str` / `&[u8]` straight out of the frame. Trailing bytes are checked by
/// [`decode`] (bincode only checks them on its own slice path).
struct LimitedSlice<'a, 'r> {
    rest: &'r mut &'a [u8],
}

impl<'a> LimitedSlice<'a, '_> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], bincode::Error> {
        if n > self.rest.len() {
            return Err(Box::new(bincode::ErrorKind::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "message truncated: needs {n} more bytes, {} left",
                    self.rest.len()
                ),
            ))));
        }
        let (head, tail) = self.rest.split_at(n);
        *self.rest = tail;
        Ok(head)
    }
}

impl io::Read for LimitedSlice<'_, '_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = out.len().min(self.rest.len());
        out[..n].copy_from_slice(&self.rest[..n]);
        *self.rest = &self.rest[n..];
        Ok(n)
    }
}

impl<'a> bincode::BincodeRead<'a> for LimitedSlice<'a, '_> {
    fn forward_read_str<V: Visitor<'a>>(
        &mut self,
        length: usize,
        visitor: V,
    ) -> bincode::Result<V::Value> {
        let bytes = self.take(length)?;
        let s = std::str::from_utf8(bytes).map_err(bincode::ErrorKind::InvalidUtf8Encoding)?;
        visitor.visit_borrowed_str(s)
    }

    fn get_byte_buffer(&mut self, length: usize) -> bincode::Result<Vec<u8>> {
        self.take(length).map(<[u8]>::to_vec)
    }

    fn forward_read_bytes<V: Visitor<'a>>(
        &mut self,
        length: usize,
        visitor: V,
    ) -> bincode::Result<V::Value> {
        visitor.visit_borrowed_bytes(self.take(length)?)
    }
}

/// Decodes a value from the start of `bytes`, ignoring what follows (used to
/// read the version at the head of a `Hello` from another protocol version).
pub fn decode_prefix<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    limit: usize,
) -> Result<T, CodecError> {
    bincode::DefaultOptions::new()
        .with_limit(limit as u64)
        .allow_trailing_bytes()
        .deserialize(bytes)
        .map_err(|inner| CodecError { inner })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_byte_string_decodes_as_a_slice_with_decodes_result() {
        for size in [0usize, 1, 250, 251, 65_535, 65_536, 70_000] {
            let payload = Bytes::from(vec![3u8; size]);
            let wire = encode(&(payload.clone(),), usize::MAX).unwrap();
            let (sliced,): (Bytes,) = decode_owned(&wire, wire.len()).unwrap();
            let single: Bytes = decode_owned(&wire, wire.len()).unwrap();
            let (copied,): (Bytes,) = decode(&wire, wire.len()).unwrap();
            assert_eq!(sliced, copied, "{size} bytes");
            assert_eq!(single, copied, "{size} bytes");
            if size > 0 {
                // A slice of the frame, not a copy.
                let frame = wire.as_ptr_range();
                assert!(frame.contains(&sliced.as_ptr()), "{size} bytes were copied");
            }
        }
    }

    #[test]
    fn malformed_byte_strings_fail_as_decode_fails() {
        let good = encode(&Bytes::from_static(b"hello"), usize::MAX).unwrap();
        let mut trailing = BytesMut::from(&good[..]);
        trailing.put_u8(0);
        // Length 5 written in the 3-byte form: not what bincode writes.
        let long_form = Bytes::from_static(&[251, 5, 0, b'h', b'e', b'l', b'l', b'o']);
        let cases = [
            good.slice(..good.len() - 1),
            trailing.freeze(),
            Bytes::from_static(&[252, 1]),
            Bytes::from_static(&[255, 1, 2]),
            long_form,
            Bytes::new(),
        ];
        for case in cases {
            let fast = decode_owned::<Bytes>(&case, case.len()).map_err(|e| e.to_string());
            let slow = decode::<Bytes>(&case, case.len()).map_err(|e| e.to_string());
            assert_eq!(fast, slow, "{case:?}");
        }
        // Over the limit: refused like decode refuses it.
        let err = decode_owned::<Bytes>(&good, good.len() - 1).unwrap_err();
        assert!(err.is_size_limit(), "{err}");
    }

    #[test]
    fn round_trip_borrows_str() {
        let bytes = encode(&("hello", 7u32), 1024).unwrap();
        let (s, n): (&str, u32) = decode(&bytes, 1024).unwrap();
        assert_eq!((s, n), ("hello", 7));
        assert_eq!(encoded_len(&("hello", 7u32), 1024).unwrap(), bytes.len());
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&5u32, 64).unwrap().to_vec();
        bytes.push(0);
        assert!(decode::<u32>(&bytes, 64).is_err());
    }

    #[test]
    fn decode_enforces_the_limit() {
        let big = "x".repeat(2000);
        let bytes = encode(&big, 4096).unwrap();
        let err = decode::<String>(&bytes, 1024).unwrap_err();
        assert!(err.is_size_limit(), "{err:?}");
    }

    #[test]
    fn forged_length_prefix_errors_without_allocating() {
        // varint marker 253 = a u64 follows: a length of 2^40 bytes, then
        // nothing. Either the limit or the missing input stops the decode;
        // the test would abort on a 1 TiB allocation.
        let mut forged = vec![253u8];
        forged.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode::<String>(&forged, 1024).is_err());
        assert!(decode::<Vec<u8>>(&forged, 1024).is_err());
    }

    #[test]
    fn encode_past_limit_fails_and_leaves_buffer() {
        let mut buf = BytesMut::from(&b"ab"[..]);
        let big = vec![1u8; 100];
        assert!(encode_into(&big, 10, &mut buf).is_err());
        assert_eq!(&buf[..], b"ab");
    }
}
