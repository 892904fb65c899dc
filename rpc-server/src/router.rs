//! Method routing: async handlers registered by name, with typed arguments.
//!
//! A [`Router`] maps a method name to a handler that takes a deserialized
//! argument value and returns `Result<Reply, Status>`. It implements
//! rpc-core's [`Dispatch`], which the connection driver calls for each
//! request:
//!
//! ```text
//! Request{method, body} ─► lookup ─► decode args ─► handler ─► encode reply
//!        unknown name ─► UnknownMethod    bad bytes ─► InvalidArgument
//! ```
//!
//! Arguments are decoded with the body's own length as the bincode limit, so
//! a forged length inside the arguments cannot allocate beyond what arrived.
//!
//! Not here: connections, limits, deadlines (the driver enforces those).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use rpc_core::codec;
use rpc_core::schema::{encode_schema, Listing};
use rpc_core::service::{MethodDescription, Service, ServiceDescription};
use rpc_core::stats::RESERVED_PREFIX;
use rpc_core::BoxFuture;
use rpc_core::{CallContext, Dispatch, Status};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) type Handler =
    Arc<dyn Fn(CallContext, Bytes) -> BoxFuture<Result<Bytes, Status>> + Send + Sync>;

/// FNV-1a, for the method table: a short name hashes much faster than with
/// SipHash, on every call. SipHash guards a map
/// whose keys an attacker chooses; here the server's author chooses every
/// key, and a peer's name is only looked up, so the probe lengths are fixed
/// by the table.
#[derive(Default)]
pub(crate) struct NameHasher(u64);

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A set of methods a server offers, by name.
#[derive(Clone, Default)]
pub struct Router {
    routes: HashMap<String, Handler, BuildHasherDefault<NameHasher>>,
    /// What `srpc.list` shows: services added whole, and plain routes.
    services: Vec<ServiceDescription>,
    plain: Vec<MethodDescription>,
    /// Each method's encoded schema or why it has none, by `Service.method`.
    schemas: BTreeMap<String, Result<Bytes, String>>,
    /// Why names were not added, for `check`.
    refused: Vec<String>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("methods", &self.methods())
            .finish()
    }
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Router::default()
    }

    /// Adds a method whose handler takes only its arguments. A name already
    /// registered, or under the reserved prefix `srpc.`, is refused by
    /// `ServerBuilder::build` (see [`Router::check`]); the first
    /// registration stays.
    pub fn route<A, R, F, Fut>(self, name: &str, handler: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Status>> + Send + 'static,
    {
        self.route_with_context(name, move |_ctx: CallContext, args: A| handler(args))
    }

    /// Adds a method whose handler also gets the [`CallContext`] (peer
    /// address, request id, deadline, cancellation). Names are refused as
    /// for [`Router::route`].
    pub fn route_with_context<A, R, F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(CallContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Status>> + Send + 'static,
    {
        self.schemas.insert(
            name.to_owned(),
            Err("added with Router::route (only #[service] methods are traced)".to_owned()),
        );
        self.plain.push(MethodDescription {
            name: name.to_owned(),
            args: vec![("args".to_owned(), std::any::type_name::<A>().to_owned())],
            returns: std::any::type_name::<R>().to_owned(),
        });
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |ctx: CallContext, body: Bytes| {
            let args = codec::decode::<A>(&body, body.len(), ctx.max_depth()).map_err(|e| {
                Status::invalid_argument(format!(
                    "arguments of {:?} did not decode as {}: {e}",
                    ctx.method(),
                    std::any::type_name::<A>()
                ))
            });
            let handler = handler.clone();
            Box::pin(async move {
                let reply = handler(ctx, args?).await?;
                codec::encode(&reply, usize::MAX)
                    .map_err(|e| Status::internal(format!("reply did not encode: {e}")))
            })
        });
        self.insert_erased(name.to_owned(), erased)
    }

    /// Adds every method of a service (generated by `#[service]`), as
    /// `Service.method`. Names are refused as for [`Router::route`]: adding
    /// one service twice makes `ServerBuilder::build` fail.
    pub fn service<S: Service>(mut self, service: S) -> Self {
        let description = service.describe();
        for (method, schema) in service.schemas() {
            let encoded = schema.and_then(|s| encode_schema(&s));
            self.schemas
                .insert(format!("{}.{method}", description.name), encoded);
        }
        let service = Arc::new(service);
        for method in &description.methods {
            let wire = format!("{}.{}", description.name, method.name);
            let service = service.clone();
            // The name for the error below, captured once: cloning the
            // call's own name on every call cost an allocation per call.
            let name: Arc<str> = wire.as_str().into();
            let handler: Handler =
                Arc::new(
                    move |ctx: CallContext, body: Bytes| match service.call(ctx, body) {
                        Some(reply) => reply,
                        None => {
                            let status = Status::unknown_method(&name);
                            Box::pin(async move { Err(status) })
                        }
                    },
                );
            self = self.insert_erased(wire, handler);
        }
        self.services.push(description);
        self
    }

    /// Everything this router offers, as `srpc.list` returns it: services,
    /// then plain routes under the service name `""`.
    pub fn describe(&self) -> Vec<ServiceDescription> {
        let mut all = self.services.clone();
        if !self.plain.is_empty() {
            let mut methods = self.plain.clone();
            methods.sort_by(|a, b| a.name.cmp(&b.name));
            all.push(ServiceDescription {
                name: String::new(),
                methods,
            });
        }
        all
    }

    /// The listing with every method's schema, as `srpc.list` returns it
    /// when asked for schemas.
    pub fn listing(&self) -> Listing {
        Listing {
            services: self.describe(),
            schemas: self.schemas.clone(),
        }
    }

    /// Adds everything `other` offers.
    pub(crate) fn merge(mut self, other: Router) -> Self {
        for (name, handler) in other.routes {
            self = self.insert_erased(name, handler);
        }
        self.services.extend(other.services);
        self.plain.extend(other.plain);
        for (name, schema) in other.schemas {
            self.schemas.entry(name).or_insert(schema);
        }
        self.refused.extend(other.refused);
        self
    }

    pub(crate) fn insert_erased(mut self, name: String, handler: Handler) -> Self {
        use std::collections::hash_map::Entry;
        if name.starts_with(RESERVED_PREFIX) {
            self.refused.push(format!(
                "method names starting with {RESERVED_PREFIX:?} are reserved: {name:?}"
            ));
            return self;
        }
        match self.routes.entry(name) {
            Entry::Occupied(taken) => {
                let refusal = format!("method {:?} is registered twice", taken.key());
                self.refused.push(refusal);
            }
            Entry::Vacant(free) => {
                free.insert(handler);
            }
        }
        self
    }

    /// `Err` naming every method that could not be added (registered twice,
    /// or under the reserved prefix `srpc.`); `ServerBuilder::build` fails
    /// with it.
    pub fn check(&self) -> Result<(), String> {
        if self.refused.is_empty() {
            Ok(())
        } else {
            Err(self.refused.join("; "))
        }
    }

    /// The registered method names, sorted.
    pub fn methods(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

impl Dispatch for Router {
    fn dispatch(&self, ctx: CallContext, body: Bytes) -> BoxFuture<Result<Bytes, Status>> {
        match self.routes.get(ctx.method()) {
            Some(handler) => handler(ctx, body),
            None => {
                let status = Status::unknown_method(ctx.method());
                Box::pin(async move { Err(status) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_core::StatusCode;

    fn ctx(method: &str) -> CallContext {
        CallContext::new("127.0.0.1:9".parse().unwrap(), 1, method)
    }

    fn router() -> Router {
        Router::new().route("add", |(a, b): (i64, i64)| async move { Ok(a + b) })
    }

    #[tokio::test]
    async fn typed_handler_round_trip() {
        let body = codec::encode(&(2i64, 3i64), 1024).unwrap();
        let reply = router().dispatch(ctx("add"), body).await.unwrap();
        assert_eq!(codec::decode::<i64>(&reply, 1024, 8).unwrap(), 5);
    }

    #[tokio::test]
    async fn unknown_method_and_bad_arguments_are_statuses() {
        let err = router()
            .dispatch(ctx("sub"), Bytes::new())
            .await
            .unwrap_err();
        assert_eq!(err.code, StatusCode::UnknownMethod);
        let err = router()
            .dispatch(ctx("add"), Bytes::from_static(b"\x01"))
            .await
            .unwrap_err();
        assert_eq!(err.code, StatusCode::InvalidArgument);
        assert!(err.message.contains("\"add\""), "{err}");
    }

    #[test]
    fn reserved_names_are_refused() {
        let r = router().route("srpc.stats", |x: i64| async move { Ok(x) });
        let err = r.check().unwrap_err();
        assert_eq!(
            err,
            "method names starting with \"srpc.\" are reserved: \"srpc.stats\""
        );
        assert!(!r.methods().contains(&"srpc.stats"));
    }

    #[test]
    fn duplicate_names_are_refused_and_the_first_stays() {
        let r = router().route("add", |x: i64| async move { Ok(x) });
        assert_eq!(r.check().unwrap_err(), "method \"add\" is registered twice");
        assert_eq!(r.methods(), ["add"]);
        assert!(router().check().is_ok());
    }
}
