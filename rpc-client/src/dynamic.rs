//! Calls by schema: any method of any srpc server, with JSON arguments
//! encoded as the method's schema says and its reply (and stream items)
//! decoded to JSON, as `rpc-client call SERVICE.METHOD JSON` does.
//!
//! ```text
//! client.describe()          srpc.list + ListRequest ─► Listing (schemas, encoded)
//! client.call_json(listing, "Shop.order", json)
//!   ├─ schema of Shop.order  (none: DynamicError::NoSchema, nothing sent)
//!   ├─ JSON ─► bincode        (does not fit: DynamicError::Refused naming the field, nothing sent)
//!   ├─ call (Encoded body, Undecoded reply)
//!   └─ reply ─► JSON          (serde-reflection's json_converter, under the nesting limit)
//! ```
//!
//! Schemas hold serde-reflection formats, which are not `Send`; the
//! futures here keep only the [`Listing`] (encoded schemas) across their
//! awaits and decode the schema again where they need it, so they can be
//! spawned like any call.
//!
//! Arguments are a JSON object by argument name (`{"a": 2, "b": 3}`) or an
//! array in order (`[2, 3]`); see `encode.rs` for how each type is written.

mod encode;
pub mod render;

use std::cell::RefCell;

use bytes::Bytes;
use serde_json::Value;
use serde_reflection::json_converter::{
    DeserializationContext, DeserializationEnvironment, SymbolTableEnvironment,
};
use tokio::task::JoinHandle;

use rpc_core::codec::{self, Encoded, Undecoded};
use rpc_core::schema::{Format, ListRequest, Listing, MethodSchema, Registry};
use rpc_core::service::{ServiceDescription, LIST_METHOD};
use rpc_core::{CallOptions, StreamReceiver};

use crate::client::Client;
use crate::error::ClientError;

pub use encode::Mismatch;
use encode::{Encode, Path, Tuple};

/// Why a call by schema did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum DynamicError {
    /// The server lists no such method.
    #[error("the server has no method {method:?}")]
    UnknownMethod {
        /// The method asked for.
        method: String,
    },
    /// The method has no schema; nothing was sent.
    #[error("{method} has no schema, so it cannot be called with JSON: {reason}")]
    NoSchema {
        /// The method.
        method: String,
        /// Why the server could not trace its types.
        reason: String,
    },
    /// The JSON does not fit the schema; nothing was sent.
    #[error("refused before sending: {mismatch}")]
    Refused {
        /// The method.
        method: String,
        /// Where and why.
        mismatch: Mismatch,
    },
    /// The call failed (status, connection, deadline).
    #[error(transparent)]
    Call(#[from] ClientError),
    /// The reply or an item is not what the schema says.
    #[error("the reply of {method} does not match its schema: {reason}")]
    Reply {
        /// The method.
        method: String,
        /// What did not decode.
        reason: String,
    },
}

impl Client {
    /// The server's services, methods and each method's schema (reserved
    /// method `srpc.list`, asked for schemas). A server older than schemas
    /// answers with the plain listing: every method then has no schema,
    /// saying so.
    pub async fn describe(&self) -> Result<Listing, ClientError> {
        let request = ListRequest { schemas: true };
        let Undecoded(reply) = self.call(LIST_METHOD, &request).await?;
        let max_depth = self.pool().settings.config.max_depth;
        let listing_error = match codec::decode::<Listing>(&reply, reply.len(), max_depth) {
            Ok(listing) => return Ok(listing),
            Err(e) => e,
        };
        // A reply that is the plain listing whole: a server before schemas.
        // Anything else is the listing's own error.
        let services: Vec<ServiceDescription> = codec::decode(&reply, reply.len(), max_depth)
            .map_err(|_| ClientError::Decode {
                method: LIST_METHOD.to_owned(),
                expected: std::any::type_name::<Listing>(),
                source: listing_error,
            })?;
        let schemas = services
            .iter()
            .flat_map(|service| {
                service.methods.iter().map(move |m| {
                    let why = "the server predates method schemas".to_owned();
                    // Plain routes are listed under the service "".
                    let wire = match service.name.as_str() {
                        "" => m.name.clone(),
                        name => format!("{name}.{}", m.name),
                    };
                    (wire, Err(why))
                })
            })
            .collect();
        Ok(Listing { services, schemas })
    }

    /// Calls `method` (`Service.method`, as listed in `listing`) with
    /// `args` as JSON and returns the reply as JSON. The arguments are
    /// checked against the schema before anything is sent. A stream method
    /// goes through [`call_json_stream`](Client::call_json_stream) instead.
    pub async fn call_json(
        &self,
        listing: &Listing,
        method: &str,
        args: &Value,
        options: &CallOptions,
    ) -> Result<Value, DynamicError> {
        let body = {
            let schema = self.schema_of(listing, method)?;
            if schema.items_in.is_some() || schema.items_out.is_some() {
                return Err(DynamicError::Refused {
                    method: method.to_owned(),
                    mismatch: Mismatch {
                        field: method.to_owned(),
                        problem: "a stream method: call it as a stream".to_owned(),
                    },
                });
            }
            self.encode_args(method, &schema, args)?
        };
        let Undecoded(reply) = self.call_with(method, &Encoded(body), options).await?;
        let schema = self.schema_of(listing, method)?;
        self.decode(method, &schema.reply, &schema.registry, &reply)
    }

    /// Opens `method` as a stream call with `args` and the caller's `items`
    /// (for a method taking `Streaming<T>`; otherwise none may be given),
    /// all checked against the schema before anything is sent. The
    /// returned [`JsonStream`] gives the server's items, then the reply.
    pub async fn call_json_stream(
        &self,
        listing: &Listing,
        method: &str,
        args: &Value,
        items: &[Value],
        options: &CallOptions,
    ) -> Result<JsonStream, DynamicError> {
        let (body, items) = {
            let schema = self.schema_of(listing, method)?;
            let body = self.encode_args(method, &schema, args)?;
            let encoded = match &schema.items_in {
                Some(format) => Some(self.encode_items(method, format, &schema.registry, items)?),
                None if items.is_empty() => None,
                None => {
                    return Err(DynamicError::Refused {
                        method: method.to_owned(),
                        mismatch: Mismatch {
                            field: "items".to_owned(),
                            problem: "this method takes no stream of items".to_owned(),
                        },
                    })
                }
            };
            (body, encoded)
        };
        let sends = items.is_some();
        let (sender, receiver) = self
            .open_stream(method, &Encoded(body), options, sends)
            .await?;
        let pump = sender.zip(items).map(|(mut sender, items)| {
            tokio::spawn(async move {
                for item in items {
                    // A failure shows in the call's result.
                    if sender.send(item).await.is_err() {
                        return;
                    }
                }
                let _ = sender.end().await;
            })
        });
        Ok(JsonStream {
            method: method.to_owned(),
            listing: listing.clone(),
            receiver,
            pump,
            max_depth: self.pool().settings.config.max_depth,
        })
    }

    fn schema_of(&self, listing: &Listing, method: &str) -> Result<MethodSchema, DynamicError> {
        schema(listing, method, self.pool().settings.config.max_depth)
    }

    fn encode_args(
        &self,
        method: &str,
        schema: &MethodSchema,
        args: &Value,
    ) -> Result<Bytes, DynamicError> {
        let refused = |mismatch| DynamicError::Refused {
            method: method.to_owned(),
            mismatch,
        };
        let values = arguments(schema, args).map_err(refused)?;
        let mismatch = RefCell::new(None);
        let encoders: Vec<Encode<'_>> = schema
            .args
            .iter()
            .zip(&values)
            .map(|((name, format), value)| Encode {
                value,
                format,
                registry: &schema.registry,
                path: Path::Root(name),
                depth: 0,
                mismatch: &mismatch,
            })
            .collect();
        let max_frame = self.pool().settings.config.max_frame;
        encode::encode_checked(&Tuple(&encoders), &mismatch, "arguments", max_frame).map_err(
            |mismatch| DynamicError::Refused {
                method: method.to_owned(),
                mismatch,
            },
        )
    }

    fn encode_items(
        &self,
        method: &str,
        format: &Format,
        registry: &Registry,
        items: &[Value],
    ) -> Result<Vec<Bytes>, DynamicError> {
        let max_frame = self.pool().settings.config.max_frame;
        items
            .iter()
            .enumerate()
            .map(|(i, value)| {
                encode::encode_as(value, format, registry, &format!("item {i}"), max_frame).map_err(
                    |mismatch| DynamicError::Refused {
                        method: method.to_owned(),
                        mismatch,
                    },
                )
            })
            .collect()
    }

    fn decode(
        &self,
        method: &str,
        format: &Format,
        registry: &Registry,
        bytes: &Bytes,
    ) -> Result<Value, DynamicError> {
        let max_depth = self.pool().settings.config.max_depth;
        decode_value(format, registry, bytes, max_depth).map_err(|reason| DynamicError::Reply {
            method: method.to_owned(),
            reason,
        })
    }
}

/// The schema of `method` (`Service.method`) in `listing`, decoded within
/// `max_depth` levels; an error when the method is not listed or has none.
pub fn schema(
    listing: &Listing,
    method: &str,
    max_depth: usize,
) -> Result<MethodSchema, DynamicError> {
    match listing.schema(method, max_depth) {
        None => Err(DynamicError::UnknownMethod {
            method: method.to_owned(),
        }),
        Some(Err(reason)) => Err(DynamicError::NoSchema {
            method: method.to_owned(),
            reason,
        }),
        Some(Ok(schema)) => Ok(schema),
    }
}

/// A method's arguments in order, from a JSON object by name or an array.
fn arguments(schema: &MethodSchema, args: &Value) -> Result<Vec<Value>, Mismatch> {
    let names: Vec<&str> = schema.args.iter().map(|(n, _)| n.as_str()).collect();
    let listed = || {
        if names.is_empty() {
            "it takes none".to_owned()
        } else {
            format!("the arguments are {}", names.join(", "))
        }
    };
    match args {
        Value::Null if names.is_empty() => Ok(Vec::new()),
        Value::Object(object) => {
            if let Some(unknown) = object.keys().find(|k| !names.contains(&k.as_str())) {
                return Err(Mismatch {
                    field: unknown.clone(),
                    problem: format!("no such argument; {}", listed()),
                });
            }
            names
                .iter()
                .map(|name| {
                    object.get(*name).cloned().ok_or_else(|| Mismatch {
                        field: (*name).to_owned(),
                        problem: "missing".to_owned(),
                    })
                })
                .collect()
        }
        Value::Array(items) if items.len() == names.len() => Ok(items.clone()),
        other => Err(Mismatch {
            field: "arguments".to_owned(),
            problem: format!(
                "expected an object by argument name or an array of {} ({}), got {}",
                names.len(),
                listed(),
                other
            ),
        }),
    }
}

/// The decoder's environment: no types defined outside the registry, and
/// no names. The converter hands serde `&'static str` names for structs,
/// enums and fields, and its default makes them by leaking each new name
/// for the life of the process: a server could grow a long-running
/// client's memory by listing new names. bincode reads none of them, only
/// how many fields a struct has, so empty names of the right count do.
struct Unnamed;

/// Empty names for up to this many fields of one struct.
static NO_NAMES: [&str; 1024] = [""; 1024];

impl SymbolTableEnvironment for Unnamed {
    fn get_static_name(&self, _: &str) -> &'static str {
        ""
    }

    fn get_static_fields<'a>(
        &self,
        fields: impl IntoIterator<Item = &'a str>,
    ) -> &'static [&'static str] {
        // More fields than any honest struct has: the decode then reads
        // fewer fields than the schema says and fails, or stops short.
        let count = fields.into_iter().count().min(NO_NAMES.len());
        &NO_NAMES[..count]
    }
}

impl<'de> DeserializationEnvironment<'de> for Unnamed {
    fn deserialize<D: serde::Deserializer<'de>>(
        &self,
        name: String,
        _: D,
    ) -> Result<Value, String> {
        Err(format!("the schema names an unknown type {name}"))
    }
}

/// Bytes encoded as `format` (from a reply or an item) as JSON.
fn decode_value(
    format: &Format,
    registry: &Registry,
    bytes: &Bytes,
    max_depth: usize,
) -> Result<Value, String> {
    let seed = DeserializationContext {
        format: format.clone(),
        registry,
        environment: &Unnamed,
    };
    codec::decode_seed(seed, bytes, bytes.len(), max_depth).map_err(|e| e.to_string())
}

/// A stream call by schema ([`Client::call_json_stream`]): the server's
/// items as JSON, then its reply. Dropping it stops sending the caller's
/// items.
#[derive(Debug)]
pub struct JsonStream {
    method: String,
    listing: Listing,
    receiver: StreamReceiver,
    pump: Option<JoinHandle<()>>,
    max_depth: usize,
}

impl Drop for JsonStream {
    fn drop(&mut self) {
        if let Some(pump) = &self.pump {
            pump.abort();
        }
    }
}

impl JsonStream {
    /// The next item the server sent, as JSON; `None` after the last.
    pub async fn next(&mut self) -> Option<Result<Value, DynamicError>> {
        let item = match self.receiver.next().await? {
            Ok(item) => item,
            Err(e) => return Some(Err(ClientError::Call(e).into())),
        };
        Some(self.decode(&item, |schema| schema.items_out.as_ref()))
    }

    /// The call's reply once the items are done (items not taken are
    /// dropped), as JSON; its error if the call failed.
    pub async fn reply(&mut self) -> Result<Value, DynamicError> {
        let result = self.receiver.result().await.unwrap_or_else(|| {
            Err(rpc_core::Error::Protocol(
                "stream call without a result".into(),
            ))
        });
        let reply = result.map_err(ClientError::Call)?;
        self.decode(&reply, |schema| Some(&schema.reply))
    }

    fn decode(
        &self,
        bytes: &Bytes,
        pick: impl FnOnce(&MethodSchema) -> Option<&Format>,
    ) -> Result<Value, DynamicError> {
        let reply_error = |reason: String| DynamicError::Reply {
            method: self.method.clone(),
            reason,
        };
        let schema = match self.listing.schema(&self.method, self.max_depth) {
            Some(Ok(schema)) => schema,
            _ => return Err(reply_error("its schema is gone".to_owned())),
        };
        let format = pick(&schema).ok_or_else(|| reply_error("it sends no items".to_owned()))?;
        decode_value(format, &schema.registry, bytes, self.max_depth).map_err(reply_error)
    }
}

#[cfg(test)]
mod tests;
