//! The srpc client: typed calls to an srpc server over TLS.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = rpc_core::tls::client_config("certs/ca.pem".as_ref(), None)?;
//! let client = rpc_client::Client::connect("localhost:7443", tls).await?;
//! let sum: i64 = client.call("Demo.add", &(2i64, 3i64)).await?;
//! assert_eq!(sum, 5);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! | file | concept |
//! |---|---|
//! | `builder.rs` | [`ClientBuilder`]: a client's settings |
//! | `client.rs` | [`Client`]: connecting, calls, options, fail-fast, failover |
//! | `pool.rs` | the client's servers, its state, the picker |
//! | `endpoint.rs` | one server address: connect, supervise, reconnect, state |
//! | `discovery.rs` | which servers: DNS with TTLs, or your own [`discovery::Change`]s |
//! | `load.rs` | Peak-EWMA latency × calls in flight |
//! | `outlier.rs` | ejecting a server after failures in a row |
//! | `streams.rs` | stream calls: opening one on a picked server |
//! | `metrics.rs` | call metrics with OpenTelemetry's names (`ClientBuilder::metrics`) |
//! | `retry.rs` | which failed calls go again, and the retry budget |
//! | `backoff.rs` | exponential backoff with full jitter |
//! | `error.rs` | [`ClientError`] |
//! | `bin/rpc-client/main.rs` | the CLI (`call`, `bench`) |
//! | `bin/rpc-client/bench.rs` | the load generator behind `bench` |
//!
//! Framing, TLS and the connection driver are rpc-core's.

mod backoff;
mod builder;
mod client;
pub mod discovery;
pub mod dynamic;
mod endpoint;
mod error;
mod load;
pub mod metrics;
mod outlier;
mod pool;
mod retry;
mod streams;

pub use builder::{ClientBuilder, DEFAULT_TIMEOUT};
pub use client::Client;
pub use endpoint::ConnState;
pub use error::ClientError;
pub use pool::{Balance, EndpointStatus};
pub use retry::DEFAULT_MAX_ATTEMPTS;
pub use rpc_core::health::HealthStatus;
pub use rpc_core::{CallOptions, Metadata, Status, StatusCode};
