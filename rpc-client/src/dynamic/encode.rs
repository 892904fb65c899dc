//! JSON to the wire by a schema: a `Serialize` that walks a JSON value and
//! a serde-reflection [`Format`] together, so the codec encodes exactly
//! what the typed client would have. The first value that does not fit
//! stops it, and its place is kept as a path (`order.lines[2].qty`) for
//! the error.
//!
//! serde-reflection's own `json_converter` encodes too; it is not used here
//! because its errors do not say where, it takes only string map keys, and
//! it ignores unknown struct fields (a typo would be dropped silently).
//!
//! JSON shapes, as serde_json writes the same types: structs are objects
//! (every field, no others), tuples and tuple structs arrays, a newtype
//! struct its inner value, `Option` `null` or the value, maps objects (keys
//! parsed as the key type) or arrays of `[key, value]`, bytes arrays of
//! numbers, 128-bit integers numbers or strings, enums `{"Variant": value}`
//! (`null`, the inner value, an array or an object by the variant's kind)
//! or `"Variant"` for a unit variant.

use std::cell::RefCell;
use std::fmt;

use serde::ser::{
    SerializeMap, SerializeSeq, SerializeStruct, SerializeStructVariant, SerializeTuple,
    SerializeTupleStruct, SerializeTupleVariant,
};
use serde::{Serialize, Serializer};
use serde_json::Value;
use serde_reflection::{ContainerFormat, Format, Named, Registry, VariantFormat};

/// How deeply formats may nest while encoding: bounds a schema that names
/// itself without consuming the value (`struct A(A)` from a hostile
/// server) as much as deep values.
const MAX_DEPTH: usize = 256;

/// Where in the arguments a value sits, e.g. `order.lines[2].qty`.
#[derive(Clone, Copy)]
pub(crate) enum Path<'a> {
    Root(&'a str),
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
    Key(&'a Path<'a>, &'a str),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root(name) => f.write_str(name),
            Path::Field(parent, name) => write!(f, "{parent}.{name}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
            Path::Key(parent, key) => write!(f, "{parent}[{key:?}]"),
        }
    }
}

/// The first place that did not fit, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Where, e.g. `order.lines[2].qty`.
    pub field: String,
    /// What was wrong, e.g. `expected an integer in 0..=65535, got -1`.
    pub problem: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// A JSON value to encode as `format`.
#[derive(Clone, Copy)]
pub(crate) struct Encode<'a> {
    pub(crate) value: &'a Value,
    pub(crate) format: &'a Format,
    pub(crate) registry: &'a Registry,
    pub(crate) path: Path<'a>,
    pub(crate) depth: usize,
    /// The first mismatch, kept here: a serializer's error is only text.
    pub(crate) mismatch: &'a RefCell<Option<Mismatch>>,
}

impl<'a> Encode<'a> {
    fn at<'b>(&'b self, value: &'b Value, format: &'b Format, path: Path<'b>) -> Encode<'b> {
        Encode {
            value,
            format,
            registry: self.registry,
            path,
            depth: self.depth + 1,
            mismatch: self.mismatch,
        }
    }

    /// Records the mismatch here and stops the encoding.
    fn fail<E: serde::ser::Error>(&self, problem: String) -> E {
        let mut slot = self.mismatch.borrow_mut();
        if slot.is_none() {
            *slot = Some(Mismatch {
                field: self.path.to_string(),
                problem: problem.clone(),
            });
        }
        E::custom(problem)
    }

    fn expected<E: serde::ser::Error>(&self, what: &str) -> E {
        self.fail(format!("expected {what}, got {}", shown(self.value)))
    }
}

/// A JSON value as an error message shows it: short.
fn shown(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// An integer of type `T` from a JSON number (or a string, when
/// `strings`).
fn integer<T>(value: &Value, strings: bool) -> Option<T>
where
    T: TryFrom<i64> + TryFrom<u64> + std::str::FromStr,
{
    match value {
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => T::try_from(i).ok(),
            (_, Some(u)) => T::try_from(u).ok(),
            _ => None,
        },
        Value::String(s) if strings => s.parse().ok(),
        _ => None,
    }
}

macro_rules! encode_int {
    ($self:ident, $s:ident, $ty:ty, $strings:expr) => {
        match integer::<$ty>($self.value, $strings) {
            Some(n) => n.serialize($s),
            None => Err($self.expected(&format!("an integer in {}..={}", <$ty>::MIN, <$ty>::MAX))),
        }
    };
}

/// `value` encoded as `format` within `limit` bytes; or the first place
/// that did not fit, named from `root` (or the codec's error, at `root`,
/// when only the size limit refused it).
pub(crate) fn encode_as(
    value: &Value,
    format: &Format,
    registry: &Registry,
    root: &str,
    limit: usize,
) -> Result<bytes::Bytes, Mismatch> {
    let mismatch = RefCell::new(None);
    let encode = Encode {
        value,
        format,
        registry,
        path: Path::Root(root),
        depth: 0,
        mismatch: &mismatch,
    };
    encode_checked(&encode, &mismatch, root, limit)
}

/// `value` (made of [`Encode`]s sharing `mismatch`) encoded within `limit`
/// bytes, or their first mismatch (the codec's error at `root` when only
/// the size limit refused it).
pub(crate) fn encode_checked<T: Serialize + ?Sized>(
    value: &T,
    mismatch: &RefCell<Option<Mismatch>>,
    root: &str,
    limit: usize,
) -> Result<bytes::Bytes, Mismatch> {
    rpc_core::codec::encode(value, limit).map_err(|e| {
        mismatch.take().unwrap_or_else(|| Mismatch {
            field: root.to_owned(),
            problem: e.to_string(),
        })
    })
}

/// A method's arguments: one tuple on the wire.
pub(crate) struct Tuple<'a>(pub(crate) &'a [Encode<'a>]);

impl Serialize for Tuple<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut tuple = s.serialize_tuple(self.0.len())?;
        for item in self.0 {
            tuple.serialize_element(item)?;
        }
        tuple.end()
    }
}

impl Serialize for Encode<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.depth > MAX_DEPTH {
            return Err(self.fail(format!("nests deeper than {MAX_DEPTH} levels")));
        }
        let v = self.value;
        match self.format {
            Format::Variable(_) => Err(self.fail("the schema is incomplete".to_owned())),
            Format::TypeName(name) => match self.registry.get(name) {
                Some(container) => self.container(container, s),
                None => Err(self.fail(format!("the schema names an unknown type {name}"))),
            },
            Format::Unit => match v {
                Value::Null => s.serialize_unit(),
                _ => Err(self.expected("null")),
            },
            Format::Bool => match v {
                Value::Bool(b) => s.serialize_bool(*b),
                _ => Err(self.expected("true or false")),
            },
            Format::I8 => encode_int!(self, s, i8, false),
            Format::I16 => encode_int!(self, s, i16, false),
            Format::I32 => encode_int!(self, s, i32, false),
            Format::I64 => encode_int!(self, s, i64, false),
            Format::I128 => encode_int!(self, s, i128, true),
            Format::U8 => encode_int!(self, s, u8, false),
            Format::U16 => encode_int!(self, s, u16, false),
            Format::U32 => encode_int!(self, s, u32, false),
            Format::U64 => encode_int!(self, s, u64, false),
            Format::U128 => encode_int!(self, s, u128, true),
            // Past f32's range a number would become infinity, which JSON
            // (and the reply's decoder) cannot carry: refused, not rounded.
            Format::F32 => match v.as_f64().map(|x| x as f32) {
                Some(x) if x.is_finite() => s.serialize_f32(x),
                _ => Err(self.expected("a number within f32's range")),
            },
            Format::F64 => match v.as_f64() {
                Some(x) => s.serialize_f64(x),
                None => Err(self.expected("a number")),
            },
            Format::Char => {
                let mut chars = v.as_str().map(str::chars);
                match chars.as_mut().map(|c| (c.next(), c.next())) {
                    Some((Some(c), None)) => s.serialize_char(c),
                    _ => Err(self.expected("a string of one character")),
                }
            }
            Format::Str => match v {
                Value::String(text) => s.serialize_str(text),
                _ => Err(self.expected("a string")),
            },
            Format::Bytes => {
                let bytes = v.as_array().and_then(|items| {
                    items
                        .iter()
                        .map(|b| integer::<u8>(b, false))
                        .collect::<Option<Vec<u8>>>()
                });
                match bytes {
                    Some(bytes) => s.serialize_bytes(&bytes),
                    None => Err(self.expected("an array of bytes (numbers 0..=255)")),
                }
            }
            Format::Option(inner) => match v {
                Value::Null => s.serialize_none(),
                _ => s.serialize_some(&self.at(v, inner, self.path)),
            },
            Format::Seq(item) => {
                let Value::Array(items) = v else {
                    return Err(self.expected("an array"));
                };
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for (i, x) in items.iter().enumerate() {
                    seq.serialize_element(&self.at(x, item, Path::Index(&self.path, i)))?;
                }
                seq.end()
            }
            Format::Map { key, value } => self.map(key, value, s),
            Format::Tuple(formats) => {
                let items = self.array_of(formats.len())?;
                let mut tuple = s.serialize_tuple(formats.len())?;
                for (i, (x, f)) in items.iter().zip(formats).enumerate() {
                    tuple.serialize_element(&self.at(x, f, Path::Index(&self.path, i)))?;
                }
                tuple.end()
            }
            Format::TupleArray { content, size } => {
                let items = self.array_of(*size)?;
                let mut tuple = s.serialize_tuple(*size)?;
                for (i, x) in items.iter().enumerate() {
                    tuple.serialize_element(&self.at(x, content, Path::Index(&self.path, i)))?;
                }
                tuple.end()
            }
        }
    }
}

impl<'a> Encode<'a> {
    /// The value as an array of exactly `len` elements.
    fn array_of<E: serde::ser::Error>(&self, len: usize) -> Result<&'a Vec<Value>, E> {
        match self.value {
            Value::Array(items) if items.len() == len => Ok(items),
            _ => Err(self.expected(&format!("an array of {len}"))),
        }
    }

    fn map<S: Serializer>(
        &self,
        key: &'a Format,
        value: &'a Format,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let entries: Vec<(Value, &'a Value, String)> = match self.value {
            Value::Object(object) => {
                let mut entries = Vec::with_capacity(object.len());
                for (k, v) in object {
                    let parsed = self.key_from_text(k, key).ok_or_else(|| {
                        self.fail::<S::Error>(format!(
                            "key {k:?} is not a {}",
                            super::render::format(key)
                        ))
                    })?;
                    entries.push((parsed, v, k.clone()));
                }
                entries
            }
            Value::Array(pairs) => {
                let mut entries = Vec::with_capacity(pairs.len());
                for pair in pairs {
                    match pair.as_array().map(Vec::as_slice) {
                        Some([k, v]) => entries.push((k.clone(), v, shown(k))),
                        _ => {
                            return Err(
                                self.expected("an object, or an array of [key, value] pairs")
                            )
                        }
                    }
                }
                entries
            }
            _ => return Err(self.expected("an object, or an array of [key, value] pairs")),
        };
        let mut map = s.serialize_map(Some(entries.len()))?;
        for (k, v, text) in &entries {
            let at = Path::Key(&self.path, text);
            map.serialize_entry(&self.at(k, key, at), &self.at(v, value, at))?;
        }
        map.end()
    }

    /// A JSON object's key (always text) as a value of the key's format:
    /// itself for strings, parsed for numbers and booleans, through
    /// newtypes, a variant name for unit variants.
    fn key_from_text(&self, text: &str, format: &Format) -> Option<Value> {
        match format {
            Format::Str | Format::Char => Some(Value::String(text.to_owned())),
            Format::Bool => text.parse::<bool>().ok().map(Value::Bool),
            Format::I128 | Format::U128 => Some(Value::String(text.to_owned())),
            Format::I8 | Format::I16 | Format::I32 | Format::I64 => {
                text.parse::<i64>().ok().map(Value::from)
            }
            Format::U8 | Format::U16 | Format::U32 | Format::U64 => {
                text.parse::<u64>().ok().map(Value::from)
            }
            Format::F32 | Format::F64 => text.parse::<f64>().ok().map(Value::from),
            Format::TypeName(name) => match self.registry.get(name)? {
                ContainerFormat::NewTypeStruct(inner) => self.key_from_text(text, inner),
                ContainerFormat::Enum(_) => Some(Value::String(text.to_owned())),
                _ => None,
            },
            _ => None,
        }
    }

    fn container<S: Serializer>(
        &self,
        container: &'a ContainerFormat,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        // serde's serializers want `&'static str` names; bincode writes none.
        let name_static = "";
        match container {
            ContainerFormat::UnitStruct => match self.value {
                Value::Null => s.serialize_unit_struct(name_static),
                _ => Err(self.expected("null")),
            },
            ContainerFormat::NewTypeStruct(inner) => {
                s.serialize_newtype_struct(name_static, &self.at(self.value, inner, self.path))
            }
            ContainerFormat::TupleStruct(formats) => {
                let items = self.array_of(formats.len())?;
                let mut tuple = s.serialize_tuple_struct(name_static, formats.len())?;
                for (i, (x, f)) in items.iter().zip(formats).enumerate() {
                    tuple.serialize_field(&self.at(x, f, Path::Index(&self.path, i)))?;
                }
                tuple.end()
            }
            ContainerFormat::Struct(fields) => {
                let values = self.fields_of(fields)?;
                let mut st = s.serialize_struct(name_static, fields.len())?;
                for (field, value) in fields.iter().zip(values) {
                    st.serialize_field(
                        "",
                        &self.at(value, &field.value, Path::Field(&self.path, &field.name)),
                    )?;
                }
                st.end()
            }
            ContainerFormat::Enum(variants) => self.variant(variants, s),
        }
    }

    /// The object's value for each field, in order; no field missing and
    /// none unknown.
    fn fields_of<E: serde::ser::Error>(
        &self,
        fields: &'a [Named<Format>],
    ) -> Result<Vec<&'a Value>, E> {
        let Value::Object(object) = self.value else {
            let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
            return Err(self.expected(&format!("an object with {}", names.join(", "))));
        };
        if let Some(unknown) = object
            .keys()
            .find(|k| !fields.iter().any(|f| &f.name == *k))
        {
            let at = Encode {
                path: Path::Field(&self.path, unknown),
                ..*self
            };
            return Err(at.fail("no such field".to_owned()));
        }
        fields
            .iter()
            .map(|field| match object.get(&field.name) {
                Some(value) => Ok(value),
                None => {
                    let at = Encode {
                        path: Path::Field(&self.path, &field.name),
                        ..*self
                    };
                    Err(at.fail("missing".to_owned()))
                }
            })
            .collect()
    }

    fn variant<S: Serializer>(
        &self,
        variants: &'a std::collections::BTreeMap<u32, Named<VariantFormat>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let names = || {
            variants
                .values()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (name, inner) = match self.value {
            Value::String(name) => (name.as_str(), &Value::Null),
            Value::Object(object) if object.len() == 1 => {
                let (name, inner) = object
                    .iter()
                    .next()
                    .ok_or_else(|| self.expected("a variant"))?;
                (name.as_str(), inner)
            }
            _ => {
                return Err(self.expected(&format!(
                    "one of {} as \"Variant\" or {{\"Variant\": value}}",
                    names()
                )))
            }
        };
        let Some((&index, variant)) = variants.iter().find(|(_, v)| v.name == name) else {
            return Err(self.fail(format!("no variant {name:?}; the variants are {}", names())));
        };
        let path = Path::Field(&self.path, &variant.name);
        let at = Encode { path, ..*self };
        match &variant.value {
            VariantFormat::Variable(_) => Err(self.fail("the schema is incomplete".to_owned())),
            VariantFormat::Unit => match inner {
                Value::Null => s.serialize_unit_variant("", index, ""),
                _ => Err(at.expected("null (a unit variant)")),
            },
            VariantFormat::NewType(format) => {
                s.serialize_newtype_variant("", index, "", &self.at(inner, format, path))
            }
            VariantFormat::Tuple(formats) => {
                let items = Encode { value: inner, ..at }.array_of(formats.len())?;
                let mut tuple = s.serialize_tuple_variant("", index, "", formats.len())?;
                for (i, (x, f)) in items.iter().zip(formats).enumerate() {
                    tuple.serialize_field(&self.at(x, f, Path::Index(&path, i)))?;
                }
                tuple.end()
            }
            VariantFormat::Struct(fields) => {
                let values = Encode { value: inner, ..at }.fields_of(fields)?;
                let mut st = s.serialize_struct_variant("", index, "", fields.len())?;
                for (field, value) in fields.iter().zip(values) {
                    st.serialize_field(
                        "",
                        &self.at(value, &field.value, Path::Field(&path, &field.name)),
                    )?;
                }
                st.end()
            }
        }
    }
}
