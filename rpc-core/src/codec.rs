//! The one place bincode is used.
//!
//! Every value that crosses the wire is encoded here with bincode 1.3.3's
//! `DefaultOptions` (varint integers, little endian), a size limit, and
//! `reject_trailing_bytes`. The limit caps both what we write and what a
//! decode may allocate, so a forged length inside a frame cannot make us
//! allocate more than the frame limit. Every decode also has a nesting
//! limit ([`DEFAULT_MAX_DEPTH`] unless configured; see `codec/depth.rs`),
//! so a deeply nested value is refused instead of overflowing the stack,
//! and a bound on elements (two per byte of the message, plus 1,024), so a
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

/// The limits of decoding `bytes`: `max_depth` levels, and two elements
/// per byte plus [`MIN_ELEMENTS`] (each element but a zero-sized one takes a
/// byte; a sequence's end is one call more).
fn budget_for(bytes: &[u8], max_depth: usize) -> depth::Budget {
    let elements = bytes.len().saturating_mul(2).saturating_add(MIN_ELEMENTS);
    depth::Budget::new(max_depth).with_elements(elements)
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
    let budget = budget_for(bytes, max_depth);
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
    let budget = budget_for(bytes, max_depth);
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
mod tests;
