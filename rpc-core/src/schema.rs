//! Schemas of service methods: the wire shape of each method's arguments,
//! reply and stream items, traced from their serde implementations with
//! `serde-reflection`, so that a tool which has never seen the types
//! (`rpc-client call`, `rpc-client describe`) can encode arguments and read
//! replies.
//!
//! ```text
//! #[service] method ─► Traced::of::<T>() for each argument, the reply, items
//!     ─► trace_method: one tracing session ─► MethodSchema { args, reply, items, registry }
//!        a type that does not trace ─► Err(why): the method is served, without a schema
//! srpc.list  (empty body)                 ─► Vec<ServiceDescription>      (as before schemas)
//!            ListRequest { schemas: true } ─► Listing { services, schemas }
//! ```
//!
//! Tracing runs each type's `Deserialize` against serde-reflection's
//! deserializer, which records the shape it asks for. Derived impls trace;
//! a hand-written `Deserialize` that validates its input, `deserialize_any`
//! (untagged enums, `#[serde(flatten)]`), or one name standing for two
//! different types (a generic type at two instantiations) does not, and the
//! method is then listed without a schema, with the reason.
//!
//! Not here: reading JSON by a schema (rpc-client's `dynamic` module).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_reflection::{Tracer, TracerConfig};

pub use serde_reflection::{ContainerFormat, Format, Named, Registry, VariantFormat};

use crate::codec::depth::{Budget, Limited};
use crate::service::ServiceDescription;
use navigate::{NavError, Navigator, State};

mod navigate;

/// The wire shape of one method: what its arguments, reply and stream
/// items encode as. Named types (`TypeName` in a [`Format`]) are defined in
/// `registry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodSchema {
    /// Argument names and formats, in order (a `Streaming<T>` argument is
    /// not among them: see `items_in`). They travel as one tuple.
    pub args: Vec<(String, Format)>,
    /// The reply's format (`()` for a method that returns a stream).
    pub reply: Format,
    /// The items the caller sends, for a method taking `Streaming<T>`.
    pub items_in: Option<Format>,
    /// The items the method sends back, for one returning `ServerStream<T>`.
    pub items_out: Option<Format>,
    /// The named types (structs, enums) the formats above refer to.
    pub registry: Registry,
}

/// A method's schema, or why it has none.
pub type SchemaResult = Result<MethodSchema, String>;

/// The argument of `srpc.list` asking for schemas too. Without one (an
/// empty body, as clients before schemas send) the reply is the plain
/// `Vec<ServiceDescription>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {
    /// Include each method's schema.
    pub schemas: bool,
}

/// `srpc.list`'s reply to a [`ListRequest`]: the plain listing, then each
/// method's schema by its wire name (`Service.method`). Its encoding starts
/// with the plain listing's, so a reply from a server that predates
/// schemas (which ignores the argument) is told apart by being too short.
///
/// Each schema travels as its own encoded bytes ([`encode_schema`]): a
/// [`MethodSchema`] holds serde-reflection's formats, which are not `Send`,
/// so servers keep and send them encoded and [`Listing::schema`] decodes
/// the one wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// What the plain `srpc.list` returns.
    pub services: Vec<ServiceDescription>,
    /// Each method's encoded schema, or why it has none, by `Service.method`.
    pub schemas: BTreeMap<String, Result<Bytes, String>>,
}

impl Listing {
    /// The schema of `method` (`Service.method`), or why it has none;
    /// `None` when the listing does not have the method. `max_depth` bounds
    /// the decode's nesting, as for any message.
    pub fn schema(&self, method: &str, max_depth: usize) -> Option<SchemaResult> {
        let encoded = self.schemas.get(method)?;
        Some(match encoded {
            Ok(bytes) => crate::codec::decode(bytes, bytes.len(), max_depth)
                .map_err(|e| format!("the schema of {method} did not decode: {e}")),
            Err(why) => Err(why.clone()),
        })
    }
}

/// A schema as [`Listing`] carries it.
pub fn encode_schema(schema: &MethodSchema) -> Result<Bytes, String> {
    crate::codec::encode(schema, usize::MAX).map_err(|e| format!("schema did not encode: {e}"))
}

type NavigateFn = fn(Navigator<'_>) -> Result<(), NavError>;
type TraceFn = fn(&mut Tracer) -> serde_reflection::Result<Format>;

/// One type to trace (an argument, the reply, the items): made by
/// generated code with [`Traced::of`], or through [`Probe`] where the type
/// may not implement `Deserialize`.
#[derive(Clone, Copy)]
pub struct Traced(Kind);

#[derive(Clone, Copy)]
enum Kind {
    Type {
        navigate: NavigateFn,
        trace: TraceFn,
    },
    /// A type without `Deserialize`, by name: nothing to trace.
    Missing(&'static str),
}

impl std::fmt::Debug for Traced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Kind::Type { .. } => f.write_str("Traced"),
            Kind::Missing(name) => write!(f, "Traced(missing {name})"),
        }
    }
}

impl Traced {
    /// The type `T`.
    pub fn of<T: DeserializeOwned>() -> Self {
        Traced(Kind::Type {
            navigate: |nav| T::deserialize(nav).map(drop),
            trace: |tracer| {
                let budget = Budget::new(navigate::MAX_DEPTH * 2);
                let seed = Limited {
                    inner: PhantomData::<T>,
                    budget: &budget,
                };
                let (format, _) = tracer.trace_type_once_with_seed(navigate::samples(), seed)?;
                Ok(format)
            },
        })
    }

    /// A type that cannot be traced, by name.
    pub fn missing(type_name: &'static str) -> Self {
        Traced(Kind::Missing(type_name))
    }
}

/// Picks [`Traced::of`] for a type that implements `Deserialize` and
/// [`Traced::missing`] for one that does not, so generated code compiles
/// either way: `(&Probe::<T>::new()).traced()` with [`Traceable`] and
/// [`Untraceable`] in scope (method resolution tries `Probe<T>`'s impl
/// first, and `&Probe<T>`'s only when that one does not apply).
#[derive(Debug)]
pub struct Probe<T>(PhantomData<fn() -> T>);

impl<T> Probe<T> {
    /// A probe of `T`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Probe(PhantomData)
    }
}

/// See [`Probe`]: the types that trace.
pub trait Traceable {
    /// `T` to trace.
    fn traced(&self) -> Traced;
}

impl<T: DeserializeOwned> Traceable for Probe<T> {
    fn traced(&self) -> Traced {
        Traced::of::<T>()
    }
}

/// See [`Probe`]: the types that do not.
pub trait Untraceable {
    /// `T`, by name only.
    fn traced(&self) -> Traced;
}

impl<T> Untraceable for &Probe<T> {
    fn traced(&self) -> Traced {
        Traced::missing(std::any::type_name::<T>())
    }
}

/// Navigation passes before giving up: each one that is not the last finds
/// an enum variant not seen before.
const MAX_PASSES: usize = 4096;

/// Traces one method's types into its schema, or says why it cannot.
/// Never panics: a `Deserialize` impl that panics while traced leaves the
/// method without a schema.
pub fn trace_method(
    args: &[(&str, Traced)],
    reply: Traced,
    items_in: Option<Traced>,
    items_out: Option<Traced>,
) -> SchemaResult {
    let mut types: Vec<Traced> = args.iter().map(|(_, t)| *t).collect();
    types.push(reply);
    types.extend(items_in);
    types.extend(items_out);
    let mut roots = Vec::with_capacity(types.len());
    for traced in types {
        match traced.0 {
            Kind::Type { navigate, trace } => roots.push((navigate, trace)),
            Kind::Missing(name) => return Err(format!("{name} does not implement Deserialize")),
        }
    }
    let traced = catch_unwind(AssertUnwindSafe(|| trace_all(&roots)))
        .unwrap_or_else(|_| Err("a Deserialize impl panicked while traced".to_owned()))?;
    let (mut formats, registry) = traced;
    let items_out = items_out.and_then(|_| formats.pop());
    let items_in = items_in.and_then(|_| formats.pop());
    let reply = formats.pop().unwrap_or(Format::Unit);
    let args = args
        .iter()
        .zip(formats)
        .map(|((name, _), format)| ((*name).to_owned(), format))
        .collect();
    Ok(MethodSchema {
        args,
        reply,
        items_in,
        items_out,
        registry,
    })
}

/// Traces `roots` in one session, so their named types share one
/// registry: navigation passes until every enum inside them is complete
/// (see `navigate.rs`), then each root once more for its own format.
fn trace_all(roots: &[(NavigateFn, TraceFn)]) -> Result<(Vec<Format>, Registry), String> {
    let mut state = State::new(Tracer::new(TracerConfig::default()));
    let mut passes = 0;
    loop {
        state.progress = false;
        for (navigate, _) in roots {
            let nav = Navigator {
                state: &mut state,
                depth: 0,
            };
            navigate(nav).map_err(|e| e.0)?;
        }
        if !state.progress {
            break;
        }
        passes += 1;
        if passes >= MAX_PASSES {
            return Err(format!(
                "more than {MAX_PASSES} passes to trace every enum variant"
            ));
        }
    }
    // What the tracer's own exploration marked on the way, cleared: these
    // enums are complete.
    for name in &state.complete {
        state.tracer.check_incomplete_enum(name);
    }
    let formats = roots
        .iter()
        .map(|(_, trace)| trace(&mut state.tracer).map_err(|e| reason(&e)))
        .collect::<Result<Vec<_>, _>>()?;
    let registry = state.tracer.registry().map_err(|e| reason(&e))?;
    Ok((formats, registry))
}

/// serde-reflection's error with its explanation of the likely cause.
fn reason(error: &serde_reflection::Error) -> String {
    let explanation = error.explanation();
    if explanation.is_empty() {
        error.to_string()
    } else {
        format!("{error} ({explanation})")
    }
}

#[cfg(test)]
mod tests;
