//! The encoder and the listing's helpers against schemas a hostile server
//! might send: they end in errors, not in a stack overflow.

use std::cell::RefCell;

use serde_json::json;
use serde_reflection::{ContainerFormat, Format, Registry};

use super::encode::{Encode, Path};
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
            let registry = cyclic();
            let format = Format::TypeName("A".into());
            let value = json!(1);
            let mismatch = RefCell::new(None);
            let encode = Encode {
                value: &value,
                format: &format,
                registry: &registry,
                path: Path::Root("a"),
                depth: 0,
                mismatch: &mismatch,
            };
            assert!(rpc_core::codec::encode(&encode, 1 << 20).is_err());
            mismatch.take().unwrap()
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(refused.problem.contains("deeper than"), "{refused}");
    assert_eq!(refused.field, "a");
}

#[test]
fn a_schema_naming_a_missing_type_is_refused() {
    let registry = Registry::new();
    let format = Format::Seq(Box::new(Format::TypeName("Ghost".into())));
    let value = json!([1]);
    let mismatch = RefCell::new(None);
    let encode = Encode {
        value: &value,
        format: &format,
        registry: &registry,
        path: Path::Root("xs"),
        depth: 0,
        mismatch: &mismatch,
    };
    assert!(rpc_core::codec::encode(&encode, 1 << 20).is_err());
    let m = mismatch.take().unwrap();
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
