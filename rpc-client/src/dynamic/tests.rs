//! The encoder and the listing's helpers against schemas a hostile server
//! might send: they end in errors, not in a stack overflow.

use serde_json::json;
use serde_reflection::{ContainerFormat, Format, Registry};

use super::encode::encode_as;
use super::render;

/// `struct A(A)`: each level consumes no JSON, so only the depth bound
/// stops it.
fn cyclic() -> Registry {
    [(
        "A".to_owned(),
        ContainerFormat::NewTypeStruct(Box::new(Format::TypeName("A".into()))),
    )]
    .into()
}

#[test]
fn a_schema_naming_itself_is_refused_on_a_small_stack() {
    // A tokio worker's stack, as a library caller's task might have.
    let refused = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let format = Format::TypeName("A".into());
            encode_as(&json!(1), &format, &cyclic(), "a", 1 << 20).unwrap_err()
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(refused.problem.contains("deeper than"), "{refused}");
    assert_eq!(refused.field, "a");
}

#[test]
fn a_schema_naming_a_missing_type_is_refused() {
    let format = Format::Seq(Box::new(Format::TypeName("Ghost".into())));
    let m = encode_as(&json!([1]), &format, &Registry::new(), "xs", 1 << 20).unwrap_err();
    assert_eq!(m.field, "xs[0]");
    assert!(m.problem.contains("unknown type Ghost"), "{m}");
}

#[test]
fn definitions_of_a_recursive_schema_end() {
    let schema = rpc_core::schema::MethodSchema {
        args: vec![("a".into(), Format::TypeName("A".into()))],
        reply: Format::Unit,
        items_in: None,
        items_out: None,
        registry: cyclic(),
    };
    assert_eq!(render::definitions(&schema), ["struct A(A);"]);
}

#[test]
fn replies_decode_without_naming_anything_and_a_struct_too_wide_fails() {
    use serde_reflection::Named;
    let wide = |n: usize| {
        let fields = (0..n)
            .map(|i| Named {
                name: format!("f{i}"),
                value: Format::U8,
            })
            .collect();
        let registry: Registry = [("W".to_owned(), ContainerFormat::Struct(fields))].into();
        registry
    };
    let format = Format::TypeName("W".into());
    let bytes = bytes::Bytes::from(vec![7u8; 1100]);
    let small = super::decode_value(&format, &wide(3), &bytes.slice(..3), 128).unwrap();
    assert_eq!(small, json!({"f0": 7, "f1": 7, "f2": 7}));
    let err = super::decode_value(&format, &wide(1100), &bytes, 128).unwrap_err();
    assert!(err.contains("fewer"), "{err}");
}

#[test]
fn a_number_past_f32s_range_is_refused_not_made_infinite() {
    let m = encode_as(&json!(1e300), &Format::F32, &Registry::new(), "x", 64).unwrap_err();
    assert!(m.problem.contains("within f32's range"), "{m}");
    assert!(encode_as(&json!(1.5e38), &Format::F32, &Registry::new(), "x", 64).is_ok());
}

mod arbitrary {
    //! Arbitrary schemas (as a hostile server may list them, recursive
    //! names included) against arbitrary JSON (as a user may type it) and
    //! arbitrary bytes (as a hostile server may reply): encoding, decoding
    //! and describing end in a value or an error, never a panic.

    use bytes::Bytes;
    use proptest::prelude::*;
    use serde_json::Value;
    use serde_reflection::{ContainerFormat, Format, Named, Registry, VariantFormat};

    use super::super::encode::encode_as;
    use super::super::{decode_value, render};

    const NAMES: [&str; 3] = ["A", "B", "C"];

    fn format() -> impl Strategy<Value = Format> {
        let leaf = prop_oneof![
            Just(Format::Unit),
            Just(Format::Bool),
            Just(Format::I8),
            Just(Format::U16),
            Just(Format::I64),
            Just(Format::U128),
            Just(Format::F32),
            Just(Format::Char),
            Just(Format::Str),
            Just(Format::Bytes),
            (0..NAMES.len()).prop_map(|i| Format::TypeName(NAMES[i].into())),
            Just(Format::TypeName("Missing".into())),
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|f| Format::Option(Box::new(f))),
                inner.clone().prop_map(|f| Format::Seq(Box::new(f))),
                (inner.clone(), inner.clone()).prop_map(|(k, v)| Format::Map {
                    key: Box::new(k),
                    value: Box::new(v)
                }),
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Format::Tuple),
                (inner, 0..3usize).prop_map(|(f, size)| Format::TupleArray {
                    content: Box::new(f),
                    size
                }),
            ]
        })
    }

    fn named(f: Format, i: usize) -> Named<Format> {
        Named {
            name: ["x", "y", "z"][i % 3].into(),
            value: f,
        }
    }

    fn container() -> impl Strategy<Value = ContainerFormat> {
        prop_oneof![
            Just(ContainerFormat::UnitStruct),
            format().prop_map(|f| ContainerFormat::NewTypeStruct(Box::new(f))),
            proptest::collection::vec(format(), 0..3).prop_map(ContainerFormat::TupleStruct),
            proptest::collection::vec(format(), 0..3).prop_map(|fs| {
                ContainerFormat::Struct(
                    fs.into_iter()
                        .enumerate()
                        .map(|(i, f)| named(f, i))
                        .collect(),
                )
            }),
            proptest::collection::vec((0..4u8, format()), 1..4).prop_map(|vs| {
                ContainerFormat::Enum(
                    vs.into_iter()
                        .enumerate()
                        .map(|(i, (kind, f))| {
                            let value = match kind {
                                0 => VariantFormat::Unit,
                                1 => VariantFormat::NewType(Box::new(f)),
                                2 => VariantFormat::Tuple(vec![f.clone(), f]),
                                _ => VariantFormat::Struct(vec![named(f, 0)]),
                            };
                            (
                                i as u32,
                                Named {
                                    name: format!("V{i}"),
                                    value,
                                },
                            )
                        })
                        .collect(),
                )
            }),
        ]
    }

    fn registry() -> impl Strategy<Value = Registry> {
        proptest::collection::vec(container(), 3).prop_map(|cs| {
            cs.into_iter()
                .enumerate()
                .map(|(i, c)| (NAMES[i].to_owned(), c))
                .collect()
        })
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z0-9V]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[xyzV0-9]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn encoding_decoding_and_describing_never_panic(
            registry in registry(),
            format in format(),
            value in json(),
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            match encode_as(&value, &format, &registry, "a", 1 << 16) {
                Ok(encoded) => {
                    // What was encoded decodes by the same schema.
                    let back = decode_value(&format, &registry, &encoded, 128);
                    prop_assert!(back.is_ok(), "{value} as {format:?}: {back:?}");
                }
                // A refusal says where: the argument or a place in it.
                Err(m) => prop_assert!(m.field.starts_with('a'), "{m}"),
            }
            let _ = decode_value(&format, &registry, &Bytes::from(bytes), 128);
            let schema = rpc_core::schema::MethodSchema {
                args: vec![("a".into(), format.clone())],
                reply: format,
                items_in: None,
                items_out: None,
                registry,
            };
            let _ = render::definitions(&schema);
        }
    }
}
