use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use super::*;

#[derive(Deserialize)]
#[allow(dead_code)]
struct Order {
    id: u64,
    lines: Vec<Line>,
    note: Option<String>,
    tags: BTreeMap<String, u32>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Line {
    item: Item,
    qty: u16,
}

/// Nested inside a struct inside a Vec: found incomplete only at the end
/// of the first session.
#[derive(Deserialize)]
#[allow(dead_code)]
enum Item {
    Book { isbn: String },
    Pen(u8),
    Gift(Box<Item>),
    Nothing,
}

#[derive(Deserialize)]
#[allow(dead_code)]
enum OrderError {
    OutOfStock { item: String },
    Closed,
}

fn variants(registry: &Registry, name: &str) -> Vec<String> {
    match registry.get(name) {
        Some(ContainerFormat::Enum(v)) => v.values().map(|n| n.name.clone()).collect(),
        other => panic!("{name} is not an enum: {other:?}"),
    }
}

#[test]
fn traces_structs_nested_enums_options_vectors_maps_and_results() {
    let schema = trace_method(
        &[
            ("order", Traced::of::<Order>()),
            ("urgent", Traced::of::<bool>()),
        ],
        Traced::of::<Result<u64, OrderError>>(),
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        schema.args,
        vec![
            ("order".to_owned(), Format::TypeName("Order".into())),
            ("urgent".to_owned(), Format::Bool)
        ]
    );
    assert_eq!(schema.reply, Format::TypeName("Result".into()));
    assert_eq!(
        variants(&schema.registry, "Item"),
        ["Book", "Pen", "Gift", "Nothing"]
    );
    assert_eq!(
        variants(&schema.registry, "OrderError"),
        ["OutOfStock", "Closed"]
    );
    assert_eq!(variants(&schema.registry, "Result"), ["Ok", "Err"]);
    let Some(ContainerFormat::Struct(fields)) = schema.registry.get("Order") else {
        panic!("Order is not a struct");
    };
    let names: Vec<_> = fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["id", "lines", "note", "tags"]);
    assert_eq!(fields[2].value, Format::Option(Box::new(Format::Str)));
    assert_eq!(
        fields[3].value,
        Format::Map {
            key: Box::new(Format::Str),
            value: Box::new(Format::U32)
        }
    );
}

#[test]
fn traces_stream_items() {
    let schema = trace_method(
        &[("name", Traced::of::<String>())],
        Traced::of::<()>(),
        Some(Traced::of::<Vec<u8>>()),
        Some(Traced::of::<Item>()),
    )
    .unwrap();
    assert_eq!(schema.args.len(), 1);
    assert_eq!(schema.reply, Format::Unit);
    assert_eq!(schema.items_in, Some(Format::Seq(Box::new(Format::U8))));
    assert_eq!(schema.items_out, Some(Format::TypeName("Item".into())));
}

/// A hand-written `Deserialize` that refuses what the tracer offers.
#[allow(dead_code)]
struct Even(u32);

impl<'de> Deserialize<'de> for Even {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        if n % 2 == 1 || n == 0 {
            return Err(serde::de::Error::custom("not a positive even number"));
        }
        Ok(Even(n))
    }
}

#[allow(dead_code)]
struct Panicky;

impl<'de> Deserialize<'de> for Panicky {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("no")
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
#[allow(dead_code)]
enum Loose {
    A(u32),
    B(String),
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Wrapper<T>(T);

#[test]
fn types_that_do_not_trace_leave_the_method_without_a_schema() {
    let why = trace_method(
        &[("n", Traced::of::<Even>())],
        Traced::of::<()>(),
        None,
        None,
    )
    .unwrap_err();
    assert!(why.contains("not a positive even number"), "{why}");

    let why = trace_method(
        &[("l", Traced::of::<Loose>())],
        Traced::of::<()>(),
        None,
        None,
    )
    .unwrap_err();
    assert!(why.contains("deserialize_any"), "{why}");

    // One name, two shapes.
    let why = trace_method(
        &[("a", Traced::of::<Wrapper<u32>>())],
        Traced::of::<Wrapper<String>>(),
        None,
        None,
    )
    .unwrap_err();
    assert!(why.contains("Incompatible"), "{why}");

    let why = trace_method(
        &[("p", Traced::of::<Panicky>())],
        Traced::of::<()>(),
        None,
        None,
    )
    .unwrap_err();
    assert!(why.contains("panicked"), "{why}");
}

#[test]
fn a_listing_round_trips_through_the_codec_and_an_old_reply_is_too_short() {
    let schema = trace_method(
        &[("order", Traced::of::<Order>())],
        Traced::of::<Result<u64, OrderError>>(),
        None,
        None,
    )
    .unwrap();
    let services = vec![ServiceDescription {
        name: "Shop".into(),
        methods: vec![],
    }];
    let listing = Listing {
        services: services.clone(),
        schemas: [
            ("Shop.order".to_owned(), encode_schema(&schema)),
            ("Shop.other".to_owned(), Err("why".to_owned())),
        ]
        .into(),
    };
    let bytes = crate::codec::encode(&listing, usize::MAX).unwrap();
    let back: Listing = crate::codec::decode(&bytes, bytes.len(), 128).unwrap();
    assert_eq!(back, listing);
    assert_eq!(back.schema("Shop.order", 128), Some(Ok(schema)));
    assert_eq!(back.schema("Shop.other", 128), Some(Err("why".to_owned())));
    assert_eq!(back.schema("Shop.none", 128), None);
    let old = crate::codec::encode(&services, usize::MAX).unwrap();
    assert!(crate::codec::decode::<Listing>(&old, old.len(), 128).is_err());
}

#[derive(Deserialize)]
#[allow(dead_code)]
enum Outer {
    A(BTreeMap<String, Vec<Option<Inner>>>),
    B,
}

#[derive(Deserialize)]
#[allow(dead_code)]
enum Inner {
    X,
    Y { deep: Vec<Deep> },
}

#[derive(Deserialize)]
#[allow(dead_code)]
enum Deep {
    P,
    Q(u8),
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Tree {
    label: String,
    kids: Vec<Tree>,
    shape: Option<Box<Outer>>,
}

#[test]
fn enums_inside_collections_inside_enums_are_traced_whole() {
    let schema = trace_method(
        &[("t", Traced::of::<Tree>())],
        Traced::of::<()>(),
        None,
        None,
    )
    .unwrap();
    assert_eq!(variants(&schema.registry, "Outer"), ["A", "B"]);
    assert_eq!(variants(&schema.registry, "Inner"), ["X", "Y"]);
    assert_eq!(variants(&schema.registry, "Deep"), ["P", "Q"]);
    assert!(
        matches!(schema.registry.get("Tree"), Some(ContainerFormat::Struct(f)) if f.len() == 3)
    );
}

/// serde-reflection's documented limit: a first variant that contains its
/// own enum recurses while traced. Refused with a reason, not a stack
/// overflow.
#[derive(Deserialize)]
#[allow(dead_code)]
enum List {
    Cons(u8, Box<List>),
    Nil,
}

#[test]
fn a_recursive_first_variant_is_refused_not_a_stack_overflow() {
    let why = trace_method(
        &[("l", Traced::of::<List>())],
        Traced::of::<()>(),
        None,
        None,
    )
    .unwrap_err();
    assert!(why.contains("first variant"), "{why}");
}

struct NotDeserialize;

#[test]
#[allow(clippy::needless_borrow)] // the borrow picks `Untraceable` where needed
fn a_type_without_deserialize_is_named_and_compiles() {
    use super::{Traceable as _, Untraceable as _};
    let why = trace_method(
        &[("n", (&Probe::<u32>::new()).traced())],
        (&Probe::<NotDeserialize>::new()).traced(),
        None,
        None,
    )
    .unwrap_err();
    assert!(
        why.contains("NotDeserialize does not implement Deserialize"),
        "{why}"
    );
}
