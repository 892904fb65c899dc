//! The one place bincode is used.
//!
//! Every value that crosses the wire is encoded here with bincode 1.3.3's
//! `DefaultOptions` (varint integers, little endian), a size limit, and
//! `reject_trailing_bytes`. The limit caps both what we write and what a
//! decode may allocate, so a forged length inside a frame cannot make us
//! allocate more than the frame limit. Every decode also has a nesting
//! limit ([`DEFAULT_MAX_DEPTH`] unless configured; see `codec/depth.rs`),
//! so a deeply nested value is refused instead of overflowing the stack,
//! and a bound on elements (two per byte, plus [`MIN_ELEMENTS`]), so a
//! forged length of zero-sized elements (`Vec<()>`) is refused instead of
//! looping for as long as it says.
//! Decoding borrows from the frame's bytes where the type allows it
//! (`&[u8]`, `&str`).
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
use serde::de::{DeserializeSeed, Visitor};
use serde::{Deserialize, Serialize};

pub(crate) mod depth;

/// How deeply a decoded value may nest unless configured otherwise
/// (`ConnectionConfig::max_depth`): as serde_json's default. A level is a
/// struct, tuple, sequence, map, enum, `Some` or newtype.
pub const DEFAULT_MAX_DEPTH: usize = 128;

/// Elements (of sequences, maps, tuples, structs) a decode may ask for
/// beyond two per byte of the message: see [`decode_seed`].
const MIN_ELEMENTS: usize = 1024;

/// A value that did not encode or decode.
#[derive(Debug)]
pub struct CodecError {
    inner: bincode::Error,
    /// The nesting limit, when that is what refused the value.
    too_deep: Option<usize>,
    /// What bincode's size limit stood for, to say so instead of its bare
    /// "the size limit has been reached".
    size: Option<SizeCheck>,
}

/// What a size limit was.
#[derive(Debug, Clone, Copy)]
enum SizeCheck {
    /// A configured limit (the frame limit) on a value.
    Limit(usize),
    /// The bytes that arrived: a decode that needs more read past them.
    Input(usize),
}

impl From<bincode::Error> for CodecError {
    fn from(inner: bincode::Error) -> Self {
        CodecError {
            inner,
            too_deep: None,
            size: None,
        }
    }
}

impl CodecError {
    fn with_size(mut self, size: SizeCheck) -> Self {
        if self.is_size_limit() {
            self.size = Some(size);
        }
        self
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.too_deep, self.size) {
            (Some(max), _) => write!(f, "nesting deeper than {max} levels (max depth)"),
            (None, Some(SizeCheck::Limit(limit))) => write!(
                f,
                "larger than the frame limit of {limit} bytes (raise max_frame on both sides: \
                 ConnectionConfig::max_frame, --max-frame-bytes)"
            ),
            (None, Some(SizeCheck::Input(len))) => write!(
                f,
                "the value needs more than the {len} bytes that arrived (do both sides agree \
                 on the types?)"
            ),
            // bincode's messages are already lowercase and specific, e.g.
            // "invalid value: integer `9`, expected variant index 0 <= i < 7".
            (None, None) => fmt::Display::fmt(&self.inner, f),
        }
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

    /// True when the value nested deeper than the depth limit.
    pub fn is_depth_limit(&self) -> bool {
        self.too_deep.is_some()
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
        .map_err(|e| CodecError::from(e).with_size(SizeCheck::Limit(limit)))
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
    result.map_err(|e| CodecError::from(e).with_size(SizeCheck::Limit(limit)))
}

/// Writes the encoding of `value`, whose size [`encoded_len`] has just
/// checked against the limit, to `writer`.
///
/// One pass: with a limit set, bincode's `serialize_into` sizes the value
/// again before writing it, which the caller has just done. The encoding
/// does not depend on the limit.
pub(crate) fn encode_sized<T: Serialize + ?Sized, W: std::io::Write>(
    value: &T,
    writer: W,
) -> Result<(), CodecError> {
    bincode::DefaultOptions::new()
        .reject_trailing_bytes()
        .serialize_into(writer, value)
        .map_err(CodecError::from)
}

/// Encodes `value` into a new buffer (a call's arguments or a reply).
pub fn encode<T: Serialize + ?Sized>(value: &T, limit: usize) -> Result<Bytes, CodecError> {
    encode_pooled(value, limit, &pool::POOL)
}

fn encode_pooled<T: Serialize + ?Sized>(
    value: &T,
    limit: usize,
    pool: &'static pool::Pool,
) -> Result<Bytes, CodecError> {
    let len = encoded_len(value, limit)?;
    if len >= pool::MIN_BUFFER {
        let mut buf = pool.take(len);
        encode_sized(value, &mut buf)?;
        return Ok(pool.bytes(buf));
    }
    let mut buf = BytesMut::with_capacity(len);
    encode_sized(value, (&mut buf).writer())?;
    Ok(buf.freeze())
}

pub(crate) mod pool;

/// A message already encoded (by a method's schema, say), sent as it is:
/// encoding an `Encoded` as a whole message gives its bytes unchanged. It
/// serializes as a tuple of its bytes, which this module's format writes
/// as the bytes themselves (no length, a `u8` as one byte); any other
/// format would not, so it belongs here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded(pub Bytes);

impl Serialize for Encoded {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tuple = s.serialize_tuple(self.0.len())?;
        for byte in self.0.iter() {
            tuple.serialize_element(byte)?;
        }
        tuple.end()
    }
}

/// A message left encoded: [`decode_owned`] of a whole message as
/// `Undecoded` gives the message's bytes, for a caller that decodes them
/// later by other means (a method's schema, with [`decode_seed`]). As a
/// part of another value it does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecoded(pub Bytes);

impl<'de> Deserialize<'de> for Undecoded {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "Undecoded stands only for a whole message",
        ))
    }
}

/// Like [`decode`], for a value kept past `bytes`: when `T` is [`Bytes`] or
/// `(Bytes,)` (a method taking or returning one byte string), the value is a
/// slice of `bytes`, not a copy. Same result and same errors as `decode`:
/// anything but a well-formed byte string within `limit` goes through it.
/// As [`Undecoded`], the value is `bytes` themselves (within `limit`).
pub fn decode_owned<T: DeserializeOwned + 'static>(
    bytes: &Bytes,
    limit: usize,
    max_depth: usize,
) -> Result<T, CodecError> {
    use std::any::{Any, TypeId};
    if TypeId::of::<T>() == TypeId::of::<Undecoded>() && bytes.len() <= limit {
        let whole = (&mut Some(Undecoded(bytes.clone())) as &mut dyn Any)
            .downcast_mut::<Option<T>>()
            .and_then(Option::take);
        if let Some(whole) = whole {
            return Ok(whole);
        }
    }
    let single = TypeId::of::<T>() == TypeId::of::<Bytes>();
    let tuple = TypeId::of::<T>() == TypeId::of::<(Bytes,)>();
    if single || tuple {
        if let Some(payload) = byte_string(bytes, limit) {
            // Moved out through `Option<T>` rather than a `Box<dyn Any>`:
            // no allocation per call.
            let value = if single {
                (&mut Some(payload) as &mut dyn Any)
                    .downcast_mut::<Option<T>>()
                    .and_then(Option::take)
            } else {
                (&mut Some((payload,)) as &mut dyn Any)
                    .downcast_mut::<Option<T>>()
                    .and_then(Option::take)
            };
            if let Some(value) = value {
                return Ok(value);
            }
        }
    }
    decode(bytes, limit, max_depth)
}

/// The payload when `bytes` is exactly one bincode byte string (varint
/// length, then that many bytes) in its canonical form, within `limit`.
fn byte_string(bytes: &Bytes, limit: usize) -> Option<Bytes> {
    if bytes.len() > limit {
        return None;
    }
    let mut fields = Fields::new(bytes);
    let payload = fields.bytes()?;
    fields.end().then(|| bytes.slice_ref(payload))
}

/// Reads the fields of a value laid out as this module encodes it, one by
/// one and without serde, for the frames every call carries (see
/// `frame::decode_frame`): much cheaper than bincode's deserializer.
///
/// Only the shortest form of each integer is taken, and every method
/// returns `None` at anything else or at the end of the bytes; the caller
/// then decodes the value through [`decode`] instead, which gives the same
/// value or the error. So this reader can only make a decode faster, never
/// different: a format without such a reader can return `None` throughout.
pub(crate) struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Fields { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(head)
    }

    /// An integer (bincode's varint: one byte up to 250, else a marker and
    /// 2, 4 or 8 little-endian bytes).
    pub(crate) fn varint(&mut self) -> Option<u64> {
        let marker = *self.take(1)?.first()?;
        let (value, shortest) = match marker {
            0..=250 => return Some(u64::from(marker)),
            251 => {
                let v = u64::from(u16::from_le_bytes(self.take(2)?.try_into().ok()?));
                (v, v >= 251)
            }
            252 => {
                let v = u64::from(u32::from_le_bytes(self.take(4)?.try_into().ok()?));
                (v, v > u64::from(u16::MAX))
            }
            253 => {
                let v = u64::from_le_bytes(self.take(8)?.try_into().ok()?);
                (v, v > u64::from(u32::MAX))
            }
            _ => return None,
        };
        shortest.then_some(value)
    }

    /// A `u32`.
    pub(crate) fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.varint()?).ok()
    }

    /// An enum's variant index.
    pub(crate) fn variant(&mut self) -> Option<u32> {
        self.u32()
    }

    /// An `Option`'s tag: whether a value follows.
    pub(crate) fn option(&mut self) -> Option<bool> {
        match *self.take(1)?.first()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// A byte string.
    pub(crate) fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        self.take(len)
    }

    /// A UTF-8 string.
    pub(crate) fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    /// True when every byte was read.
    pub(crate) fn end(&self) -> bool {
        self.rest.is_empty()
    }
}

/// Appends an integer in the shortest form, as bincode writes it; the
/// inverse of [`Fields::varint`], for the frames `frame.rs` writes without
/// serde (a test there checks the bytes are bincode's).
pub(crate) fn put_varint(buf: &mut BytesMut, value: u64) {
    match value {
        0..=250 => buf.put_u8(value as u8),
        251..=0xffff => {
            buf.put_u8(251);
            buf.put_u16_le(value as u16);
        }
        0x1_0000..=0xffff_ffff => {
            buf.put_u8(252);
            buf.put_u32_le(value as u32);
        }
        _ => {
            buf.put_u8(253);
            buf.put_u64_le(value);
        }
    }
}

/// Appends a byte string (its length, then the bytes).
pub(crate) fn put_bytes(buf: &mut BytesMut, bytes: &[u8]) {
    put_varint(buf, bytes.len() as u64);
    buf.put_slice(bytes);
}

/// Appends an `Option`'s tag.
pub(crate) fn put_option(buf: &mut BytesMut, some: bool) {
    buf.put_u8(u8::from(some));
}

/// Decodes one value that must fill `bytes` exactly; borrows from `bytes`
/// where `T` allows it. The size limit applies to what serde may reserve
/// for a sequence length too, not only to the bytes read; a value nested
/// deeper than `max_depth` levels is refused (see [`DEFAULT_MAX_DEPTH`]).
pub fn decode<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    limit: usize,
    max_depth: usize,
) -> Result<T, CodecError> {
    decode_seed(PhantomData::<T>, bytes, limit, max_depth)
}

/// Like [`decode`], for a value whose shape is known only at run time
/// (a `DeserializeSeed`, such as a decoder driven by a method's schema).
pub fn decode_seed<'a, S: DeserializeSeed<'a>>(
    seed: S,
    bytes: &'a [u8],
    limit: usize,
    max_depth: usize,
) -> Result<S::Value, CodecError> {
    let mut rest = bytes;
    // Each element takes a byte at least, and a sequence's end one call
    // more; only zero-sized elements take none, and no message needs many.
    let elements = bytes.len().saturating_mul(2).saturating_add(MIN_ELEMENTS);
    let budget = depth::Budget::new(max_depth).with_elements(elements);
    let seed = depth::Limited {
        inner: seed,
        budget: &budget,
    };
    let value = options(limit)
        .deserialize_from_custom_seed(seed, LimitedSlice { rest: &mut rest })
        .map_err(|inner| {
            let size = if limit >= bytes.len() {
                SizeCheck::Input(bytes.len())
            } else {
                SizeCheck::Limit(limit)
            };
            CodecError {
                inner,
                too_deep: budget.exceeded().then_some(max_depth),
                size: None,
            }
            .with_size(size)
        })?;
    if !rest.is_empty() {
        return Err(CodecError::from(Box::new(bincode::ErrorKind::Custom(
            format!("{} bytes left over after the message", rest.len()),
        ))));
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
    max_depth: usize,
) -> Result<T, CodecError> {
    let elements = bytes.len().saturating_mul(2).saturating_add(MIN_ELEMENTS);
    let budget = depth::Budget::new(max_depth).with_elements(elements);
    let seed = depth::Limited {
        inner: PhantomData::<T>,
        budget: &budget,
    };
    bincode::DefaultOptions::new()
        .with_limit(limit as u64)
        .allow_trailing_bytes()
        .deserialize_seed(seed, bytes)
        .map_err(|inner| CodecError {
            inner,
            too_deep: budget.exceeded().then_some(max_depth),
            size: None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_byte_string_decodes_as_a_slice_with_decodes_result() {
        for size in [0usize, 1, 250, 251, 65_535, 65_536, 70_000] {
            let payload = Bytes::from(vec![3u8; size]);
            let wire = encode(&(payload.clone(),), usize::MAX).unwrap();
            let (sliced,): (Bytes,) = decode_owned(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap();
            let single: Bytes = decode_owned(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap();
            let (copied,): (Bytes,) = decode(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap();
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
            let fast = decode_owned::<Bytes>(&case, case.len(), DEFAULT_MAX_DEPTH)
                .map_err(|e| e.to_string());
            let slow =
                decode::<Bytes>(&case, case.len(), DEFAULT_MAX_DEPTH).map_err(|e| e.to_string());
            assert_eq!(fast, slow, "{case:?}");
        }
        // Over the limit: refused like decode refuses it.
        let err = decode_owned::<Bytes>(&good, good.len() - 1, DEFAULT_MAX_DEPTH).unwrap_err();
        assert!(err.is_size_limit(), "{err}");
    }

    fn test_pool() -> &'static pool::Pool {
        Box::leak(Box::new(pool::Pool::new()))
    }

    #[test]
    fn a_large_value_is_encoded_into_a_kept_buffer_and_given_back() {
        let pool = test_pool();
        let value = (7u8, vec![1u8; 300_000]);
        let first = encode_pooled(&value, usize::MAX, pool).unwrap();
        let plain = {
            let mut buf = BytesMut::new();
            encode_into(&value, usize::MAX, &mut buf).unwrap();
            buf
        };
        assert_eq!(&first[..], &plain[..]);
        let (tag, body): (u8, Vec<u8>) = decode(&first, usize::MAX, DEFAULT_MAX_DEPTH).unwrap();
        assert_eq!((tag, body), value);
        // Kept while any slice of it lives; back in the pool after.
        let at = first.as_ptr();
        let slice = first.slice(10..20);
        drop(first);
        assert!(pool.kept().is_empty());
        drop(slice);
        assert_eq!(pool.kept().len(), 1);
        // The next large value is written over the same memory.
        let second = encode_pooled(&(8u8, vec![2u8; 200_000]), usize::MAX, pool).unwrap();
        assert_eq!(second.as_ptr(), at);
        assert!(pool.kept().is_empty());
        // Small values never touch the pool.
        drop(encode_pooled(&vec![0u8; 1000], usize::MAX, pool).unwrap());
        drop(second);
        assert_eq!(pool.kept().len(), 1);
    }

    #[test]
    fn round_trip_borrows_str() {
        let bytes = encode(&("hello", 7u32), 1024).unwrap();
        let (s, n): (&str, u32) = decode(&bytes, 1024, DEFAULT_MAX_DEPTH).unwrap();
        assert_eq!((s, n), ("hello", 7));
        assert_eq!(encoded_len(&("hello", 7u32), 1024).unwrap(), bytes.len());
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&5u32, 64).unwrap().to_vec();
        bytes.push(0);
        let err = decode::<u32>(&bytes, 64, DEFAULT_MAX_DEPTH).unwrap_err();
        assert_eq!(err.to_string(), "1 bytes left over after the message");
    }

    #[test]
    fn decode_enforces_the_limit() {
        let big = "x".repeat(2000);
        let bytes = encode(&big, 4096).unwrap();
        let err = decode::<String>(&bytes, 1024, DEFAULT_MAX_DEPTH).unwrap_err();
        assert!(err.is_size_limit(), "{err:?}");
    }

    #[test]
    fn forged_length_prefix_errors_without_allocating() {
        // varint marker 253 = a u64 follows: a length of 2^40 bytes, then
        // nothing. Either the limit or the missing input stops the decode;
        // the test would abort on a 1 TiB allocation.
        let mut forged = vec![253u8];
        forged.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let err = decode::<String>(&forged, 1024, DEFAULT_MAX_DEPTH).unwrap_err();
        assert!(err.is_size_limit(), "{err}");
        // A sequence reads element by element (serde caps what it reserves
        // up front) and runs out of input.
        let err = decode::<Vec<u8>>(&forged, 1024, DEFAULT_MAX_DEPTH).unwrap_err();
        assert!(
            err.to_string().contains("failed to fill whole buffer"),
            "{err}"
        );
        // Within the limit, the missing bytes stop a string.
        let mut short = vec![100u8];
        short.extend_from_slice(b"abc");
        let err = decode::<String>(&short, 1024, DEFAULT_MAX_DEPTH).unwrap_err();
        assert!(
            err.to_string().contains("needs 100 more bytes, 3 left"),
            "{err}"
        );
    }

    #[test]
    fn size_errors_say_which_size() {
        // Arguments sent as (i64,) read as (String,): the string's length
        // runs past what arrived.
        let sent = encode(&(300i64,), 64).unwrap();
        let err = decode::<(String,)>(&sent, sent.len(), DEFAULT_MAX_DEPTH).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("the value needs more than the {} bytes that arrived (do both sides agree on the types?)", sent.len())
        );
        let err = encode(&vec![0u8; 100], 10).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("larger than the frame limit of 10 bytes (raise max_frame"),
            "{err}"
        );
    }

    #[test]
    fn encode_past_limit_fails_and_leaves_buffer() {
        let mut buf = BytesMut::from(&b"ab"[..]);
        let big = vec![1u8; 100];
        assert!(encode_into(&big, 10, &mut buf).unwrap_err().is_size_limit());
        assert_eq!(&buf[..], b"ab");
    }

    /// A recursive type, as a user's AST would be.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Expr {
        Lit(i64),
        Neg(Box<Expr>),
        Pair(Vec<Expr>),
        Opt(Option<Box<Expr>>),
    }

    /// `Neg` nested `depth` times around a literal, as bincode writes it
    /// (variant 1, then the inner value), built without recursion.
    fn nested_neg(depth: usize) -> Vec<u8> {
        let mut wire = vec![1u8; depth];
        wire.extend_from_slice(&[0, 14]); // Lit(7): variant 0, zigzag 7
        wire
    }

    #[test]
    fn nesting_up_to_the_limit_decodes_and_deeper_is_refused() {
        // Expr levels count one each.
        let ok: Expr = decode(&nested_neg(9), 1 << 20, 10).unwrap();
        let mut e = &ok;
        let mut n = 0;
        while let Expr::Neg(inner) = e {
            e = inner;
            n += 1;
        }
        assert_eq!((n, e), (9, &Expr::Lit(7)));
        let err = decode::<Expr>(&nested_neg(10), 1 << 20, 10).unwrap_err();
        assert!(err.is_depth_limit(), "{err}");
        assert_eq!(err.to_string(), "nesting deeper than 10 levels (max depth)");
        // Sequences, options and tuples count too.
        let wrapped = encode(
            &(Expr::Pair(vec![Expr::Opt(Some(Box::new(Expr::Lit(1))))]),),
            1024,
        )
        .unwrap();
        // tuple, Pair, its Vec, Opt, Some, Lit: 6 levels.
        assert!(decode::<(Expr,)>(&wrapped, 1024, 6).is_ok());
        assert!(decode::<(Expr,)>(&wrapped, 1024, 5)
            .unwrap_err()
            .is_depth_limit());
        assert!(decode_owned::<(Expr,)>(&wrapped, 1024, 5)
            .unwrap_err()
            .is_depth_limit());
    }

    #[test]
    fn a_million_levels_are_refused_without_overflowing_the_stack() {
        let wire = nested_neg(1_000_000);
        let err = decode::<Expr>(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap_err();
        assert!(err.is_depth_limit(), "{err}");
        assert!(err.to_string().contains("nesting deeper than 128"), "{err}");
        let err = decode_prefix::<Expr>(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap_err();
        assert!(err.is_depth_limit(), "{err}");
    }

    #[test]
    fn the_depth_limit_changes_no_other_result() {
        // Borrowed strings still borrow, errors other than depth keep
        // their text, and flat values decode as before.
        let bytes = encode(&("hi", vec![1u16, 2], Some(3u8)), 1024).unwrap();
        let got: (&str, Vec<u16>, Option<u8>) = decode(&bytes, 1024, 3).unwrap();
        assert_eq!(got, ("hi", vec![1, 2], Some(3)));
        let err = decode::<Expr>(&[9], 16, DEFAULT_MAX_DEPTH).unwrap_err();
        assert!(!err.is_depth_limit());
        assert!(err.to_string().contains("variant index"), "{err}");
    }

    #[test]
    fn a_forged_length_of_zero_sized_elements_is_refused_at_once() {
        // 2^60 units in 9 bytes: without a bound, a loop of 2^60 turns.
        let mut forged = vec![0xfd];
        forged.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let started = std::time::Instant::now();
        let err = decode::<Vec<()>>(&forged, 1 << 20, DEFAULT_MAX_DEPTH).unwrap_err();
        assert!(err.to_string().contains("more elements"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // As a map of units too.
        let err = decode::<std::collections::BTreeMap<(), ()>>(&forged, 1 << 20, DEFAULT_MAX_DEPTH)
            .unwrap_err();
        assert!(err.to_string().contains("more elements"), "{err}");
        // Honest values are far from the bound.
        let units = encode(&vec![(); 1000], 64).unwrap();
        assert_eq!(
            decode::<Vec<()>>(&units, 64, DEFAULT_MAX_DEPTH)
                .unwrap()
                .len(),
            1000
        );
        let bytes: Vec<u16> = (0..5000).collect();
        let encoded = encode(&bytes, 1 << 20).unwrap();
        assert_eq!(
            decode::<Vec<u16>>(&encoded, 1 << 20, DEFAULT_MAX_DEPTH).unwrap(),
            bytes
        );
    }

    #[test]
    fn encoded_is_its_bytes_unchanged() {
        let bytes = encode(&(300u32, -5i64, "text", Some(1u8)), 64).unwrap();
        assert_eq!(encode(&Encoded(bytes.clone()), 64).unwrap(), bytes);
        assert_eq!(
            encoded_len(&Encoded(bytes.clone()), 64).unwrap(),
            bytes.len()
        );
        assert!(encode(&Encoded(bytes.clone()), 2)
            .unwrap_err()
            .is_size_limit());
    }

    #[test]
    fn undecoded_is_the_whole_message_and_nothing_inside_one() {
        let bytes = encode(&(7u32, "seven"), 64).unwrap();
        let whole: Undecoded = decode_owned(&bytes, 64, DEFAULT_MAX_DEPTH).unwrap();
        assert_eq!(whole.0, bytes);
        // Over the limit: refused like any message.
        assert!(decode_owned::<Undecoded>(&bytes, 2, DEFAULT_MAX_DEPTH).is_err());
        assert!(decode_owned::<(Undecoded,)>(&bytes, 64, DEFAULT_MAX_DEPTH).is_err());
        // A seed reads it later, under the same nesting limit.
        let (n, s): (u32, String) =
            decode_seed(PhantomData, &whole.0, 64, DEFAULT_MAX_DEPTH).unwrap();
        assert_eq!((n, s.as_str()), (7, "seven"));
        assert!(decode_seed(PhantomData::<(u32, String)>, &whole.0, 64, 0)
            .unwrap_err()
            .is_depth_limit());
    }
}
