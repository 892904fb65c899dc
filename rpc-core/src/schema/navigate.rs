//! Finds every enum a type contains, however deeply, and hands each to
//! serde-reflection's tracer as if it were traced on its own.
//!
//! serde-reflection explores one enum variant per pass, and a sequence,
//! option or map only while its content's format is still unknown: so an
//! enum inside a `Vec` is seen once, with its first variant, and never
//! again. Its documented remedy is to trace each enum type separately,
//! which needs the type's name in Rust; a `#[service]` only knows its
//! argument types. The [`Navigator`] reaches the nested types instead:
//!
//! ```text
//! T::deserialize(Navigator)   a stand-in deserializer: zeros, one element
//!   struct / seq / option / map / tuple: walked by the navigator
//!   enum not yet complete ─► tracer.trace_type_once_with_seed(its visitor)
//!                            (serde-reflection records one more variant)
//!   enum complete         ─► walked into, one variant per pass in turn,
//!                            so the enums inside each variant are reached
//! ```
//!
//! Passes repeat until one finds nothing new. Every level down is bounded:
//! the navigator stops at [`MAX_DEPTH`] (empty sequences, `None`), and a
//! hand-over goes through the codec's nesting limit, so a recursive type
//! ends in an error, never a stack overflow.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::OnceLock;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde_reflection::{Samples, Tracer};

use crate::codec::depth::{Budget, Limited};

/// How deep the navigator walks before it stops offering elements.
pub(super) const MAX_DEPTH: usize = 48;
/// The nesting limit of one hand-over to the tracer.
const TRACE_DEPTH: usize = 96;

/// serde-reflection's (empty) samples, borrowed for `'static` so that a
/// visitor of any `DeserializeOwned` type can be handed over.
pub(super) fn samples() -> &'static Samples {
    static SAMPLES: OnceLock<Samples> = OnceLock::new();
    SAMPLES.get_or_init(Samples::new)
}

/// What the passes have learnt.
pub(super) struct State {
    pub(super) tracer: Tracer,
    /// Enums whose variants the tracer has all recorded.
    pub(super) complete: BTreeSet<&'static str>,
    /// Enums being walked into by the navigator now (a recursive type is
    /// handed over instead of walked again).
    walking: BTreeSet<&'static str>,
    /// How many times each complete enum was walked into: the variant
    /// walked is this count modulo the variants.
    walked: BTreeMap<&'static str, usize>,
    /// Something new was found in this pass.
    pub(super) progress: bool,
}

impl State {
    pub(super) fn new(tracer: Tracer) -> Self {
        State {
            tracer,
            complete: BTreeSet::new(),
            walking: BTreeSet::new(),
            walked: BTreeMap::new(),
            progress: false,
        }
    }
}

/// Why navigation failed: a type refused the stand-in values (a validating
/// `Deserialize`), or the tracer refused a hand-over.
#[derive(Debug)]
pub(super) struct NavError(pub(super) String);

impl fmt::Display for NavError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NavError {}

impl de::Error for NavError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        NavError(msg.to_string())
    }
}

/// The stand-in deserializer (see the module docs).
pub(super) struct Navigator<'s> {
    pub(super) state: &'s mut State,
    pub(super) depth: usize,
}

impl Navigator<'_> {
    fn child(&mut self) -> Navigator<'_> {
        Navigator {
            state: self.state,
            depth: self.depth + 1,
        }
    }

    /// Elements offered for a sequence or map here: one, unless too deep.
    fn elements(&self) -> usize {
        usize::from(self.depth < MAX_DEPTH)
    }

    /// Hands an enum to the tracer: it records (at most) one more variant
    /// and returns a value of the enum.
    fn hand_over<V: Visitor<'static>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, NavError> {
        let was_complete = self.state.complete.contains(name);
        // Cleared, or the tracer would only revisit its first variant.
        self.state.tracer.check_incomplete_enum(name);
        let budget = Budget::new(TRACE_DEPTH);
        let seed = Limited {
            inner: EnumSeed {
                name,
                variants,
                visitor,
            },
            budget: &budget,
        };
        let traced = self.state.tracer.trace_type_once_with_seed(samples(), seed);
        let (_, value) = traced.map_err(|e| {
            if budget.exceeded() {
                NavError(format!(
                    "enum {name} nests more than {TRACE_DEPTH} levels when traced \
                     (is its first variant recursive? put a variant without itself first)"
                ))
            } else {
                NavError(super::reason(&e))
            }
        })?;
        if self.state.tracer.check_incomplete_enum(name).is_none() {
            self.state.complete.insert(name);
        }
        if !was_complete {
            self.state.progress = true;
        }
        Ok(value)
    }
}

/// An enum's own `deserialize_enum` call, replayed on the tracer.
struct EnumSeed<V> {
    name: &'static str,
    variants: &'static [&'static str],
    visitor: V,
}

impl<V: Visitor<'static>> DeserializeSeed<'static> for EnumSeed<V> {
    type Value = V::Value;

    fn deserialize<D: de::Deserializer<'static>>(self, d: D) -> Result<V::Value, D::Error> {
        d.deserialize_enum(self.name, self.variants, self.visitor)
    }
}

macro_rules! zero {
    ($($method:ident => $visit:ident($value:expr);)*) => {$(
        fn $method<V: Visitor<'static>>(self, visitor: V) -> Result<V::Value, NavError> {
            visitor.$visit($value)
        }
    )*};
}

impl<'s> de::Deserializer<'static> for Navigator<'s> {
    type Error = NavError;

    fn deserialize_any<V: Visitor<'static>>(self, _: V) -> Result<V::Value, NavError> {
        Err(NavError(
            "a type asks for deserialize_any (untagged or internally tagged enum, \
             #[serde(flatten)]), which a binary format cannot describe"
                .to_owned(),
        ))
    }

    zero! {
        deserialize_bool => visit_bool(false);
        deserialize_i8 => visit_i8(0);
        deserialize_i16 => visit_i16(0);
        deserialize_i32 => visit_i32(0);
        deserialize_i64 => visit_i64(0);
        deserialize_i128 => visit_i128(0);
        deserialize_u8 => visit_u8(0);
        deserialize_u16 => visit_u16(0);
        deserialize_u32 => visit_u32(0);
        deserialize_u64 => visit_u64(0);
        deserialize_u128 => visit_u128(0);
        deserialize_f32 => visit_f32(0.0);
        deserialize_f64 => visit_f64(0.0);
        deserialize_char => visit_char('a');
        deserialize_str => visit_str("");
        deserialize_string => visit_string(String::new());
        deserialize_bytes => visit_bytes(&[]);
        deserialize_byte_buf => visit_byte_buf(Vec::new());
        deserialize_identifier => visit_u32(0);
    }

    fn deserialize_unit<V: Visitor<'static>>(self, visitor: V) -> Result<V::Value, NavError> {
        visitor.visit_unit()
    }

    fn deserialize_ignored_any<V: Visitor<'static>>(
        self,
        visitor: V,
    ) -> Result<V::Value, NavError> {
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'static>>(mut self, visitor: V) -> Result<V::Value, NavError> {
        if self.elements() == 0 {
            return visitor.visit_none();
        }
        visitor.visit_some(self.child())
    }

    fn deserialize_unit_struct<V: Visitor<'static>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, NavError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'static>>(
        mut self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, NavError> {
        visitor.visit_newtype_struct(self.child())
    }

    fn deserialize_seq<V: Visitor<'static>>(self, visitor: V) -> Result<V::Value, NavError> {
        let left = self.elements();
        visitor.visit_seq(Elements { nav: self, left })
    }

    fn deserialize_tuple<V: Visitor<'static>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, NavError> {
        visitor.visit_seq(Elements {
            nav: self,
            left: len,
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'static>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, NavError> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_map<V: Visitor<'static>>(self, visitor: V) -> Result<V::Value, NavError> {
        let left = self.elements();
        visitor.visit_map(Entries { nav: self, left })
    }

    fn deserialize_struct<V: Visitor<'static>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, NavError> {
        self.deserialize_tuple(fields.len(), visitor)
    }

    fn deserialize_enum<V: Visitor<'static>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, NavError> {
        let walk = self.state.complete.contains(name)
            && !self.state.walking.contains(name)
            && self.depth < MAX_DEPTH
            && !variants.is_empty();
        if !walk {
            return self.hand_over(name, variants, visitor);
        }
        let walked = self.state.walked.entry(name).or_insert(0);
        let index = *walked % variants.len();
        if *walked < variants.len() {
            // Not every variant walked into yet.
            self.state.progress = true;
        }
        *walked += 1;
        self.state.walking.insert(name);
        let state = &mut *self.state;
        let value = visitor.visit_enum(Variant {
            nav: Navigator {
                state,
                depth: self.depth + 1,
            },
            index: index as u32,
        });
        self.state.walking.remove(name);
        value
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The elements of a sequence, tuple or struct.
struct Elements<'s> {
    nav: Navigator<'s>,
    left: usize,
}

impl de::SeqAccess<'static> for Elements<'_> {
    type Error = NavError;

    fn next_element_seed<T: DeserializeSeed<'static>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, NavError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(self.nav.child()).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

/// The entries of a map.
struct Entries<'s> {
    nav: Navigator<'s>,
    left: usize,
}

impl de::MapAccess<'static> for Entries<'_> {
    type Error = NavError;

    fn next_key_seed<K: DeserializeSeed<'static>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, NavError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(self.nav.child()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'static>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, NavError> {
        seed.deserialize(self.nav.child())
    }
}

/// One variant of a complete enum, walked into.
struct Variant<'s> {
    nav: Navigator<'s>,
    index: u32,
}

impl<'s> de::EnumAccess<'static> for Variant<'s> {
    type Error = NavError;
    type Variant = Navigator<'s>;

    fn variant_seed<T: DeserializeSeed<'static>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Navigator<'s>), NavError> {
        let index: de::value::U32Deserializer<NavError> = self.index.into_deserializer();
        let id = seed.deserialize(index)?;
        Ok((id, self.nav))
    }
}

impl de::VariantAccess<'static> for Navigator<'_> {
    type Error = NavError;

    fn unit_variant(self) -> Result<(), NavError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'static>>(
        self,
        seed: T,
    ) -> Result<T::Value, NavError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'static>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, NavError> {
        de::Deserializer::deserialize_tuple(self, len, visitor)
    }

    fn struct_variant<V: Visitor<'static>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, NavError> {
        de::Deserializer::deserialize_tuple(self, fields.len(), visitor)
    }
}
