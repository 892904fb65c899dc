//! The demo service served by the `rpc-server` binary: `echo`, `add`, `sleep`.
//!
//! | method | arguments | reply |
//! |---|---|---|
//! | `echo` | `String` | the same `String` |
//! | `add` | `(i64, i64)` | `i64` (`InvalidArgument` on overflow) |
//! | `sleep` | `u64` milliseconds | `()` after that long |
//! | `whoami` | `()` | the client certificate's subject, or `anonymous` |
//!
//! Not here: anything the CLI prints; see the `rpc-client` binary.

use std::time::Duration;

use rpc_core::{CallContext, Status};

use crate::Router;

/// Method names of the demo service.
pub mod methods {
    /// `echo(String) -> String`
    pub const ECHO: &str = "echo";
    /// `add((i64, i64)) -> i64`
    pub const ADD: &str = "add";
    /// `sleep(u64 ms) -> ()`
    pub const SLEEP: &str = "sleep";
    /// `whoami(()) -> String`
    pub const WHOAMI: &str = "whoami";
}

/// A router with the demo methods.
pub fn router() -> Router {
    Router::new()
        .route(methods::ECHO, |text: String| async move { Ok(text) })
        .route(methods::ADD, |(a, b): (i64, i64)| async move {
            a.checked_add(b).ok_or_else(|| {
                Status::invalid_argument(format!("{a} + {b} overflows a 64-bit integer"))
            })
        })
        .route(methods::SLEEP, |ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        })
        .route_with_context(methods::WHOAMI, |ctx: CallContext, (): ()| async move {
            Ok(ctx
                .identity
                .map_or_else(|| "anonymous".to_owned(), |id| id.subject.clone()))
        })
}
