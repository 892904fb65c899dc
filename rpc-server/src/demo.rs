//! The demo service served by the `rpc-server` binary, declared with
//! `#[service]`.
//!
//! | method | arguments | reply |
//! |---|---|---|
//! | `Demo.echo` | `text: String` | the same `String` |
//! | `Demo.add` | `a: i64, b: i64` | `i64` (`InvalidArgument` on overflow) |
//! | `Demo.sleep` | `ms: u64` | `()` after that long |
//! | `Demo.whoami` | none | the client certificate's subject, or `anonymous` |
//! | `Demo.metadata` | none | the call's metadata, `(key, value)` sorted by key |
//!
//! Not here: anything the CLI prints; see the `rpc-client` binary.

use std::time::Duration;

use rpc_core::Status;

use crate::Router;

/// The demo service.
#[rpc_macros::service(crate = rpc_core)]
pub trait Demo {
    /// Returns `text` unchanged.
    async fn echo(&self, text: String) -> String;
    /// Returns `a + b`; `InvalidArgument` when the sum does not fit.
    async fn add(&self, a: i64, b: i64) -> Result<i64, Status>;
    /// Sleeps `ms` milliseconds on the server, then returns.
    async fn sleep(&self, ms: u64);
    /// The subject of the client's certificate (mutual TLS), or
    /// `anonymous`.
    async fn whoami(&self) -> String;
    /// The metadata the call carried, sorted by key.
    async fn metadata(&self) -> Vec<(String, Vec<u8>)>;
}

/// The demo's implementation.
#[derive(Debug, Clone, Copy, Default)]
pub struct DemoService;

impl Demo for DemoService {
    async fn echo(&self, text: String) -> String {
        text
    }

    async fn add(&self, a: i64, b: i64) -> Result<i64, Status> {
        a.checked_add(b).ok_or_else(|| {
            Status::invalid_argument(format!("{a} + {b} overflows a 64-bit integer"))
        })
    }

    async fn sleep(&self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    async fn whoami(&self) -> String {
        rpc_core::service::context()
            .and_then(|ctx| ctx.identity().cloned())
            .map_or_else(|| "anonymous".to_owned(), |id| id.subject.clone())
    }

    async fn metadata(&self) -> Vec<(String, Vec<u8>)> {
        let mut entries: Vec<(String, Vec<u8>)> = rpc_core::service::context()
            .map(|ctx| {
                ctx.metadata()
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        entries.sort();
        entries
    }
}

/// Wire names of the demo methods.
pub mod methods {
    /// `Demo.echo(text: String) -> String`
    pub const ECHO: &str = "Demo.echo";
    /// `Demo.add(a: i64, b: i64) -> i64`
    pub const ADD: &str = "Demo.add";
    /// `Demo.sleep(ms: u64)`
    pub const SLEEP: &str = "Demo.sleep";
    /// `Demo.whoami() -> String`
    pub const WHOAMI: &str = "Demo.whoami";
    /// `Demo.metadata() -> Vec<(String, Vec<u8>)>`
    pub const METADATA: &str = "Demo.metadata";
}

/// A router serving the demo service.
pub fn router() -> Router {
    Router::new().service(DemoServer::new(DemoService))
}
