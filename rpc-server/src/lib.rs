//! The srpc server: serve typed async handlers over TLS.
//!
//! ```no_run
//! use rpc_server::{Router, Server};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = rpc_core::tls::server_config("server.pem".as_ref(), "server.key".as_ref(), None)?;
//! let router = Router::new()
//!     .route("add", |(a, b): (i64, i64)| async move { Ok(a + b) });
//! let server = Server::builder(tls).router(router).build()?;
//! let listener = Server::bind("127.0.0.1:7443".parse()?).await?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! | file | concept |
//! |---|---|
//! | `server.rs` | builder, accept loop, connection limit, graceful drain |
//! | `connection_task.rs` | one connection's life: handshake, driver, close reason |
//! | `connection_set.rs` | the live connections (for drain and stats) |
//! | `call.rs` | [`Call`]: one call as middleware sees it |
//! | `stack.rs` | the tower stack every call goes through; user layers |
//! | `layers.rs` | the server's own layers: counters, authorization, `srpc.*` |
//! | `metrics.rs` | call metrics with OpenTelemetry's names (`ServerBuilder::metrics`) |
//! | `health.rs` | the statuses `srpc.health` reports; NOT_SERVING once draining |
//! | `router.rs` | method name -> typed async handler |
//! | `demo.rs` | the demo service (`echo`, `add`, `sleep`) |
//! | `files.rs` | the file service (`--files DIR`), confined with cap-std |
//! | `devcerts.rs` | development CA and certificates (rcgen) |
//! | `error.rs` | [`ServerError`] |
//! | `bin/rpc-server.rs` | the CLI |
//!
//! Framing, TLS setup and the connection driver are rpc-core's; this crate
//! accepts, runs calls through its layer stack, routes and drains.

mod call;
mod connection_set;
mod connection_task;
pub mod demo;
pub mod devcerts;
mod error;
pub mod files;
mod health;
mod layers;
pub mod metrics;
mod router;
mod server;
mod stack;

pub use call::{Call, CallService};
pub use error::ServerError;
pub use health::Health;
pub use layers::{Authorize, AuthorizeLayer};
pub use router::Router;
pub use rpc_core::health::HealthStatus;
pub use rpc_core::{CallContext, Metadata, Status, StatusCode};
pub use server::{Server, ServerBuilder, ServerOptions, TlsFiles, MAX_REFUSALS};
