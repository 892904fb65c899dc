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

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use rpc_core::codec;
use rpc_core::connection::BoxFuture;
use rpc_core::stats::RESERVED_PREFIX;
use rpc_core::{CallContext, Dispatch, Status};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) type Handler =
    Arc<dyn Fn(CallContext, Bytes) -> BoxFuture<Result<Bytes, Status>> + Send + Sync>;

/// A set of methods a server offers, by name.
#[derive(Clone, Default)]
pub struct Router {
    routes: HashMap<String, Handler>,
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

    /// Adds a method whose handler takes only its arguments.
    ///
    /// # Panics
    ///
    /// If a method of that name is already registered (a programming error,
    /// found at startup).
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
    /// address, request id, deadline, cancellation).
    ///
    /// # Panics
    ///
    /// If a method of that name is already registered, or the name starts
    /// with the reserved prefix `srpc.`.
    pub fn route_with_context<A, R, F, Fut>(self, name: &str, handler: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(CallContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Status>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |ctx: CallContext, body: Bytes| {
            let args = codec::decode::<A>(&body, body.len()).map_err(|e| {
                Status::invalid_argument(format!(
                    "arguments of {:?} did not decode as {}: {e}",
                    ctx.method,
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

    pub(crate) fn into_routes(self) -> impl Iterator<Item = (String, Handler)> {
        self.routes.into_iter()
    }

    pub(crate) fn insert_erased(mut self, name: String, handler: Handler) -> Self {
        if name.starts_with(RESERVED_PREFIX) {
            panic!("method names starting with {RESERVED_PREFIX:?} are reserved: {name:?}");
        }
        if self.routes.contains_key(&name) {
            panic!("method {name:?} is registered twice");
        }
        self.routes.insert(name, handler);
        self
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
        match self.routes.get(&ctx.method) {
            Some(handler) => handler(ctx, body),
            None => {
                let status = Status::unknown_method(&ctx.method);
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
        CallContext {
            peer: "127.0.0.1:9".parse().unwrap(),
            identity: None,
            id: 1,
            method: method.into(),
            deadline: None,
            cancelled: Default::default(),
        }
    }

    fn router() -> Router {
        Router::new().route("add", |(a, b): (i64, i64)| async move { Ok(a + b) })
    }

    #[tokio::test]
    async fn typed_handler_round_trip() {
        let body = codec::encode(&(2i64, 3i64), 1024).unwrap();
        let reply = router().dispatch(ctx("add"), body).await.unwrap();
        assert_eq!(codec::decode::<i64>(&reply, 1024).unwrap(), 5);
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
    #[should_panic(expected = "reserved")]
    fn reserved_names_are_refused() {
        let _ = router().route("srpc.stats", |x: i64| async move { Ok(x) });
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_names_are_refused() {
        let _ = router().route("add", |x: i64| async move { Ok(x) });
    }
}
