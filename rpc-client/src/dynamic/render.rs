//! Schemas as Rust-like text, for `rpc-client describe` and error
//! messages: `Vec<Line>`, `struct Line { item: Item, qty: u16 }`,
//! `enum Item { Book { isbn: String }, Pen(u8), Nothing }`.

use std::collections::BTreeSet;

use rpc_core::schema::{ContainerFormat, Format, MethodSchema, Named, Registry, VariantFormat};

/// A format as a Rust type would be written (maps as `Map<K, V>`, byte
/// strings as `bytes`).
pub fn format(format: &Format) -> String {
    match format {
        Format::Variable(_) => "?".to_owned(),
        Format::TypeName(name) => name.clone(),
        Format::Unit => "()".to_owned(),
        Format::Bool => "bool".to_owned(),
        Format::I8 => "i8".to_owned(),
        Format::I16 => "i16".to_owned(),
        Format::I32 => "i32".to_owned(),
        Format::I64 => "i64".to_owned(),
        Format::I128 => "i128".to_owned(),
        Format::U8 => "u8".to_owned(),
        Format::U16 => "u16".to_owned(),
        Format::U32 => "u32".to_owned(),
        Format::U64 => "u64".to_owned(),
        Format::U128 => "u128".to_owned(),
        Format::F32 => "f32".to_owned(),
        Format::F64 => "f64".to_owned(),
        Format::Char => "char".to_owned(),
        Format::Str => "String".to_owned(),
        Format::Bytes => "bytes".to_owned(),
        Format::Option(inner) => format!("Option<{}>", self::format(inner)),
        Format::Seq(inner) => format!("Vec<{}>", self::format(inner)),
        Format::Map { key, value } => {
            format!("Map<{}, {}>", self::format(key), self::format(value))
        }
        Format::Tuple(items) => tuple(items),
        Format::TupleArray { content, size } => format!("[{}; {size}]", self::format(content)),
    }
}

fn tuple(items: &[Format]) -> String {
    let items: Vec<String> = items.iter().map(format).collect();
    format!("({})", items.join(", "))
}

fn fields(fields: &[Named<Format>]) -> String {
    let fields: Vec<String> = fields
        .iter()
        .map(|f| format!("{}: {}", f.name, format(&f.value)))
        .collect();
    format!("{{ {} }}", fields.join(", "))
}

/// A named type's definition, e.g. `struct Point { x: f64, y: f64 }`.
pub fn definition(name: &str, container: &ContainerFormat) -> String {
    match container {
        ContainerFormat::UnitStruct => format!("struct {name};"),
        ContainerFormat::NewTypeStruct(inner) => format!("struct {name}({});", format(inner)),
        ContainerFormat::TupleStruct(items) => format!("struct {name}{};", tuple(items)),
        ContainerFormat::Struct(f) => format!("struct {name} {}", fields(f)),
        ContainerFormat::Enum(variants) => {
            let variants: Vec<String> = variants
                .values()
                .map(|v| match &v.value {
                    VariantFormat::Variable(_) => format!("{}(?)", v.name),
                    VariantFormat::Unit => v.name.clone(),
                    VariantFormat::NewType(inner) => format!("{}({})", v.name, format(inner)),
                    VariantFormat::Tuple(items) => format!("{}{}", v.name, tuple(items)),
                    VariantFormat::Struct(f) => format!("{} {}", v.name, fields(f)),
                })
                .collect();
            format!("enum {name} {{ {} }}", variants.join(", "))
        }
    }
}

/// The definitions of the named types a method's schema uses, in the
/// order they are first reached from its arguments, reply and items.
pub fn definitions(schema: &MethodSchema) -> Vec<String> {
    let mut roots: Vec<&Format> = schema.args.iter().map(|(_, f)| f).collect();
    roots.push(&schema.reply);
    roots.extend(&schema.items_in);
    roots.extend(&schema.items_out);
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for root in roots {
        reach(root, &schema.registry, &mut seen, &mut order, 0);
    }
    order
        .into_iter()
        .filter_map(|name| {
            let container = schema.registry.get(name)?;
            Some(definition(name, container))
        })
        .collect()
}

/// How deeply [`reach`] follows types into types: a schema from a server
/// may chain any number of them.
const MAX_DEPTH: usize = 256;

/// Adds the names `format` reaches to `order`, depth first, each once
/// (the `seen` set also stops a recursive type).
fn reach<'a>(
    format: &'a Format,
    registry: &'a Registry,
    seen: &mut BTreeSet<&'a str>,
    order: &mut Vec<&'a str>,
    depth: usize,
) {
    if depth > MAX_DEPTH {
        return;
    }
    let next = |f: &'a Format, seen: &mut BTreeSet<&'a str>, order: &mut Vec<&'a str>| {
        reach(f, registry, seen, order, depth + 1)
    };
    match format {
        Format::TypeName(name) => {
            if !seen.insert(name) {
                return;
            }
            order.push(name);
            let Some(container) = registry.get(name) else {
                return;
            };
            let mut inner: Vec<&Format> = Vec::new();
            match container {
                ContainerFormat::UnitStruct => {}
                ContainerFormat::NewTypeStruct(f) => inner.push(f),
                ContainerFormat::TupleStruct(items) => inner.extend(items),
                ContainerFormat::Struct(f) => inner.extend(f.iter().map(|n| &n.value)),
                ContainerFormat::Enum(variants) => {
                    for v in variants.values() {
                        match &v.value {
                            VariantFormat::NewType(f) => inner.push(f),
                            VariantFormat::Tuple(items) => inner.extend(items),
                            VariantFormat::Struct(f) => inner.extend(f.iter().map(|n| &n.value)),
                            VariantFormat::Unit | VariantFormat::Variable(_) => {}
                        }
                    }
                }
            }
            for f in inner {
                next(f, seen, order);
            }
        }
        Format::Option(f) | Format::Seq(f) => next(f, seen, order),
        Format::TupleArray { content, .. } => next(content, seen, order),
        Format::Map { key, value } => {
            next(key, seen, order);
            next(value, seen, order);
        }
        Format::Tuple(items) => {
            for f in items {
                next(f, seen, order);
            }
        }
        _ => {}
    }
}
