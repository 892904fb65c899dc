//! srpc: typed remote procedure calls over TLS, in one crate.
//!
//! Write a trait, implement it, serve it, call it:
//!
//! ```
//! use srpc::{service, Client, Server};
//!
//! #[service]
//! pub trait Calculator {
//!     /// Adds two numbers.
//!     async fn add(&self, a: i64, b: i64) -> i64;
//! }
//!
//! struct Calc;
//!
//! impl Calculator for Calc {
//!     async fn add(&self, a: i64, b: i64) -> i64 {
//!         a + b
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Throwaway certificates; use your own CA's in production.
//! let certs = srpc::server::devcerts::generate()?;
//! let server = Server::builder(certs.server_tls(false)?)
//!     .add_service(CalculatorServer::new(Calc))
//!     .build()?;
//! let listener = Server::bind("127.0.0.1:0".parse()?).await?;
//! let addr = listener.local_addr()?.to_string();
//! tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
//!
//! let client = Client::connect(&addr, certs.client_tls(false)?).await?;
//! let calc = CalculatorClient::new(client);
//! assert_eq!(calc.add(2, 3).await?, 5);
//! # Ok(())
//! # }
//! ```
//!
//! What `#[service]` generates, what a method may look like, and how errors
//! travel: see [`service`]. Handlers reach the call's peer address,
//! certificate identity, metadata and deadline with [`context`]. One call's
//! timeout, metadata and wait-for-ready go in [`CallOptions`]
//! (`calc.with_options(opts).add(2, 3)`); middleware is any `tower::Layer`
//! over a server's [`Call`]s (`ServerBuilder::layer`).
//!
//! # Layout
//!
//! | crate | re-exported as | what |
//! |---|---|---|
//! | `rpc-core` | [`core`] | transport: TLS, frames, connections, heartbeats |
//! | `rpc-server` | [`server`] | serving: accept loop, limits, drain, routing |
//! | `rpc-client` | [`client`] | calling: connections, reconnects, typed calls |
//! | `rpc-macros` | [`service`] | the `#[service]` attribute |

pub use rpc_client as client;
pub use rpc_core as core;
pub use rpc_macros::service;
pub use rpc_server as server;

#[doc(inline)]
pub use rpc_client::{
    discovery, Balance, Client, ClientBuilder, ClientError, ConnState, EndpointStatus,
};
#[doc(inline)]
pub use rpc_core::service::context;
#[doc(inline)]
pub use rpc_core::streaming::{ServerStream, Stream, Streaming};
#[doc(inline)]
pub use rpc_core::{
    tls, CallContext, CallOptions, ConnectionConfig, Metadata, PeerIdentity, Status, StatusCode,
};
#[doc(inline)]
pub use rpc_server::{
    devcerts, AuthorizeLayer, Call, HealthStatus, Router, Server, ServerBuilder, ServerOptions,
    TlsFiles,
};
