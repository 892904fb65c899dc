//! Call metadata: a short list of `(key, value)` that travels with a
//! `Request` (auth tokens, trace context, tenant ids), like gRPC's headers.
//!
//! - Keys are 1 to [`MAX_KEY_LEN`] bytes of lowercase ASCII letters, digits,
//!   `-`, `_` and `.`; values are any bytes.
//! - At most [`MAX_ENTRIES`] entries and [`MAX_BYTES`] bytes of keys and
//!   values per call. The bounds are fixed by the protocol (version 2), not
//!   negotiated: a peer that sends more breaks the protocol and is told so
//!   with a `GoAway` naming the bound. (8 KiB is gRPC's default limit on a
//!   call's headers.)
//! - Keys starting with [`RESERVED_PREFIX`] (`srpc-`) belong to the
//!   framework; [`Metadata::insert`] refuses them.
//!
//! Not here: where metadata is read (`CallContext::metadata`) or set
//! (`CallOptions`), or its encoding (`frame.rs`).

use bytes::Bytes;

use crate::error::Error;

/// Most entries in one call's metadata.
pub const MAX_ENTRIES: usize = 32;

/// Most bytes of keys plus values in one call's metadata.
pub const MAX_BYTES: usize = 8 * 1024;

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// Keys under this prefix are the framework's.
pub const RESERVED_PREFIX: &str = "srpc-";

/// The metadata of one call. One pointer wide, and cheap to clone while
/// empty (the usual case): every call's future and frame carry one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// `None` when empty, never `Some` of an empty list.
    // Boxed so the field is one pointer wide in every frame and call
    // future (a boxed slice would be two); the extra allocation is paid
    // only by calls that carry metadata.
    #[allow(clippy::box_collection)]
    entries: Option<Box<Vec<(String, Bytes)>>>,
}

impl Metadata {
    /// No entries, as a constant.
    pub const EMPTY: Metadata = Metadata { entries: None };

    /// No entries.
    pub fn new() -> Self {
        Metadata::default()
    }

    /// Sets `key` to `value`, replacing a value it had. Refuses, with
    /// [`Error::Metadata`], a key that is not lowercase ASCII (letters,
    /// digits, `-`, `_`, `.`), a reserved key (`srpc-...`), and an entry
    /// that would take the metadata over its bounds.
    pub fn insert(&mut self, key: &str, value: impl Into<Bytes>) -> Result<(), Error> {
        if key.starts_with(RESERVED_PREFIX) {
            return Err(Error::Metadata(format!(
                "key {key:?} is reserved (keys starting with {RESERVED_PREFIX:?} are srpc's)"
            )));
        }
        self.insert_any(key, value.into())
    }

    /// Like [`insert`](Self::insert), for the framework's own keys
    /// (`srpc-...`).
    #[doc(hidden)]
    pub fn insert_reserved(&mut self, key: &str, value: impl Into<Bytes>) -> Result<(), Error> {
        self.insert_any(key, value.into())
    }

    fn insert_any(&mut self, key: &str, value: Bytes) -> Result<(), Error> {
        check_key(key).map_err(Error::Metadata)?;
        let mut next = self.clone();
        let entries = next.entries.get_or_insert_with(Box::default);
        entries.retain(|(k, _)| k != key);
        entries.push((key.to_owned(), value));
        next.check().map_err(Error::Metadata)?;
        *self = next;
        Ok(())
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&Bytes> {
        self.entries()
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The value of `key` as text, if set and UTF-8.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The entries, in the order they were set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.entries().iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// True with no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_none()
    }

    /// Keys plus values, in bytes.
    pub fn size(&self) -> usize {
        self.entries().iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// Entries as they came off the wire, unchecked (the driver checks
    /// them with [`check`](Self::check) before a handler sees them).
    pub(crate) fn from_wire(entries: Vec<(String, Bytes)>) -> Self {
        Metadata {
            entries: (!entries.is_empty()).then(|| Box::new(entries)),
        }
    }

    pub(crate) fn entries(&self) -> &[(String, Bytes)] {
        self.entries.as_deref().map_or(&[], Vec::as_slice)
    }

    /// `Err` naming the first rule broken: too many entries, too many
    /// bytes, a malformed or repeated key.
    pub fn check(&self) -> Result<(), String> {
        let entries = self.entries();
        if entries.len() > MAX_ENTRIES {
            return Err(format!(
                "call metadata has {} entries; the limit is {MAX_ENTRIES}",
                entries.len()
            ));
        }
        let size = self.size();
        if size > MAX_BYTES {
            return Err(format!(
                "call metadata has {size} bytes of keys and values; the limit is {MAX_BYTES}"
            ));
        }
        for (i, (key, _)) in entries.iter().enumerate() {
            check_key(key)?;
            if entries[..i].iter().any(|(k, _)| k == key) {
                return Err(format!("call metadata repeats the key {key:?}"));
            }
        }
        Ok(())
    }
}

/// On the wire: a sequence of `(key, value)` pairs, the value a byte string.
impl serde::Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let entries = self.entries();
        let mut seq = s.serialize_seq(Some(entries.len()))?;
        for (key, value) in entries {
            seq.serialize_element(&(key.as_str(), value))?;
        }
        seq.end()
    }
}

fn check_key(key: &str) -> Result<(), String> {
    let ok_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(ok_byte) {
        let shown = crate::error::escape_peer_text(key, 64);
        return Err(format!(
            "metadata key {shown:?} is not 1 to {MAX_KEY_LEN} bytes of lowercase ASCII \
             letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_lowercase_ascii_and_not_reserved() {
        let mut m = Metadata::new();
        assert!(m.insert("authorization", "Bearer x").is_ok());
        assert!(m.insert("x-trace_id.v1", vec![0u8, 255]).is_ok());
        for bad in ["", "Upper", "sp ace", "é", &"k".repeat(MAX_KEY_LEN + 1)] {
            let err = m.insert(bad, "v").unwrap_err().to_string();
            assert!(err.contains("lowercase ASCII"), "{bad:?}: {err}");
        }
        let err = m.insert("srpc-deadline", "1").unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
        assert!(m.insert_reserved("srpc-attempt", "2").is_ok());
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn insert_replaces_and_get_finds() {
        let mut m = Metadata::new();
        m.insert("tenant", "a").unwrap();
        m.insert("tenant", "b").unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m.get_str("tenant"), Some("b"));
        assert_eq!(m.get("other"), None);
    }

    #[test]
    fn the_bounds_hold_and_a_refused_entry_changes_nothing() {
        let mut m = Metadata::new();
        for i in 0..MAX_ENTRIES {
            m.insert(&format!("k{i}"), "v").unwrap();
        }
        let err = m.insert("one-more", "v").unwrap_err().to_string();
        assert!(err.contains(&format!("limit is {MAX_ENTRIES}")), "{err}");
        assert_eq!(m.len(), MAX_ENTRIES);

        let mut m = Metadata::new();
        m.insert("big", vec![0u8; MAX_BYTES - 3]).unwrap();
        let err = m.insert("x", "y").unwrap_err().to_string();
        assert!(err.contains(&format!("limit is {MAX_BYTES}")), "{err}");
        assert_eq!(m.size(), MAX_BYTES);
    }

    #[test]
    fn metadata_is_one_pointer_wide() {
        assert_eq!(
            std::mem::size_of::<Metadata>(),
            std::mem::size_of::<usize>()
        );
        assert_eq!(Metadata::from_wire(Vec::new()), Metadata::new());
    }

    #[test]
    fn wire_entries_are_checked_for_repeats_and_syntax() {
        let twice =
            Metadata::from_wire(vec![("a".into(), Bytes::new()), ("a".into(), Bytes::new())]);
        assert!(twice.check().unwrap_err().contains("repeats"));
        let upper = Metadata::from_wire(vec![("A".into(), Bytes::new())]);
        assert!(upper.check().is_err());
        assert!(Metadata::new().check().is_ok());
    }
}
