//! A nesting limit for decoding: a serde adapter that counts how deep a
//! value goes and refuses it past a maximum.
//!
//! bincode 1.3.3 recurses once per level of a nested value and has no
//! limit of its own, so a few kilobytes of `enum Expr { Neg(Box<Expr>), .. }`
//! nested ten thousand deep overflow the decoding thread's stack, which
//! aborts the process. Every decode in `codec.rs` goes through [`Limited`]:
//!
//! ```text
//! seed ─► Limited<Deserializer> ─► bincode ─► Limited<Visitor>
//!            visit_seq / visit_map / visit_enum / visit_some /
//!            visit_newtype_struct: one level down (refused past the max),
//!            their accesses and seeds wrapped again, so every nested value
//!            is counted too
//! ```
//!
//! A level is a struct, tuple, sequence, map, enum, `Some` or newtype:
//! every way a Rust type can contain itself passes through one of them.
//! Counting happens in the visitor, so it holds whichever `deserialize_*`
//! method a (possibly hand-written) `Deserialize` impl calls.
//!
//! Not here: the size limit (bincode's own `with_limit`, in `codec.rs`).

use std::cell::Cell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// The levels a decode may still go down, shared by every wrapper of one
/// decode.
pub(crate) struct Budget {
    left: Cell<usize>,
    max: usize,
    exceeded: Cell<bool>,
    /// Elements of sequences, maps, tuples and structs the decode may
    /// still ask for. Bytes bound the rest, but not a forged length of
    /// zero-sized elements (`Vec<()>`), which take none: that would loop
    /// for as long as the length says.
    elements: Cell<usize>,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Self {
        Budget {
            left: Cell::new(max),
            max,
            exceeded: Cell::new(false),
            elements: Cell::new(usize::MAX),
        }
    }

    /// The same budget allowing `elements` elements in all.
    pub(crate) fn with_elements(self, elements: usize) -> Self {
        self.elements.set(elements);
        self
    }

    fn element<E: de::Error>(&self) -> Result<(), E> {
        match self.elements.get().checked_sub(1) {
            Some(left) => {
                self.elements.set(left);
                Ok(())
            }
            None => Err(E::custom(
                "more elements than the message's bytes can hold (a forged length?)",
            )),
        }
    }

    /// True when the decode was refused for its depth.
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    fn enter<E: de::Error>(&self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.exceeded.set(true);
                Err(E::custom(format_args!(
                    "nesting deeper than {} levels",
                    self.max
                )))
            }
        }
    }

    fn leave(&self) {
        self.left.set(self.left.get() + 1);
    }

    /// Runs `f` one level down.
    fn nested<T, E: de::Error>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        self.enter()?;
        let result = f();
        self.leave();
        result
    }
}

/// A deserializer, visitor, access or seed whose nested values are counted
/// against `budget`.
pub(crate) struct Limited<'b, T> {
    pub(crate) inner: T,
    pub(crate) budget: &'b Budget,
}

impl<'b, T> Limited<'b, T> {
    fn wrap<U>(&self, inner: U) -> Limited<'b, U> {
        Limited {
            inner,
            budget: self.budget,
        }
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Limited<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        let wrapped = self.wrap(deserializer);
        self.inner.deserialize(wrapped)
    }
}

/// `deserialize_*(args.., visitor)`: the same call with the visitor wrapped.
macro_rules! forward_deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $method<V: Visitor<'de>>(self $(, $arg: $ty)*, visitor: V) -> Result<V::Value, D::Error> {
            let visitor = self.wrap(visitor);
            self.inner.$method($($arg,)* visitor)
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<'_, D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// `visit_*(value)` of a value that contains nothing: passed on as it is.
macro_rules! forward_visit {
    ($($method:ident($ty:ty);)*) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Limited<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        let budget = self.budget;
        budget.nested(|| self.inner.visit_some(Limited { inner: d, budget }))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        let budget = self.budget;
        budget.nested(|| {
            self.inner
                .visit_newtype_struct(Limited { inner: d, budget })
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        let budget = self.budget;
        budget.nested(|| self.inner.visit_seq(Limited { inner: a, budget }))
    }

    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        let budget = self.budget;
        budget.nested(|| self.inner.visit_map(Limited { inner: a, budget }))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        let budget = self.budget;
        budget.nested(|| self.inner.visit_enum(Limited { inner: a, budget }))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Limited<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.budget.element()?;
        let seed = self.wrap(seed);
        self.inner.next_element_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Limited<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.budget.element()?;
        let seed = self.wrap(seed);
        self.inner.next_key_seed(seed)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        let seed = self.wrap(seed);
        self.inner.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'b, 'de, A: EnumAccess<'de>> EnumAccess<'de> for Limited<'b, A> {
    type Error = A::Error;
    type Variant = Limited<'b, A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let budget = self.budget;
        let (value, variant) = self.inner.variant_seed(Limited {
            inner: seed,
            budget,
        })?;
        Ok((
            value,
            Limited {
                inner: variant,
                budget,
            },
        ))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Limited<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        let seed = self.wrap(seed);
        self.inner.newtype_variant_seed(seed)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let visitor = self.wrap(visitor);
        self.inner.tuple_variant(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let visitor = self.wrap(visitor);
        self.inner.struct_variant(fields, visitor)
    }
}
