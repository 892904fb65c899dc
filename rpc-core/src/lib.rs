//! The transport shared by the srpc server and client.
//!
//! Typed remote procedure calls over TLS: length-delimited frames carry
//! bincode messages, many calls share one connection, and errors travel as
//! data. The server (`rpc-server`) and client (`rpc-client`) crates build on
//! this crate and re-implement none of it.
//!
//! # Layout
//!
//! | file | concept |
//! |---|---|
//! | `frame.rs` | the wire enum [`Frame`] and its framing ([`FrameCodec`]) |
//! | `codec.rs` | bincode 1.3.3 with limits: the only user of bincode |
//! | `tls.rs` | PEM loading, rustls configs, the ALPN check |
//! | `transport.rs` | TCP + TLS handshake + `Hello` exchange, both sides |
//! | `connection.rs` | the handle: calls, pings, close, drain |
//! | `driver.rs` | the driver: reader loop, batching writer, heartbeat timer |
//! | `metered.rs` | byte clocks: when bytes last moved each way |
//! | `heartbeat.rs` | the liveness state machine (no I/O) |
//! | `identity.rs` | the peer certificate's subject and SANs |
//! | `service.rs` | what `#[service]` builds on: `Service`, `Caller`, context |
//! | `stats.rs` | call counters and the stats snapshot (`srpc.stats`) |
//! | `config.rs` | per-connection limits and timers, with defaults |
//! | `error.rs` | [`Error`] and the wire's [`Status`] |
//!
//! ```text
//!  socket (TcpStream, TCP_NODELAY)      transport.rs
//!   └ TLS 1.3, ALPN srpc/1              tls.rs, transport.rs
//!      └ u32 length || bincode(Frame)   frame.rs, codec.rs
//!         └ connection driver           connection.rs
//!            └ calls: ids, deadlines, cancel, Status as data
//! ```
//!
//! Not here: accept loops and method routing (rpc-server), reconnects and the
//! typed client (rpc-client).

pub mod codec;
pub mod config;
pub mod connection;
mod driver;
pub mod error;
pub mod frame;
pub mod heartbeat;
pub mod identity;
pub mod metered;
mod reader;
pub mod service;
pub mod stats;
pub mod tls;
pub mod transport;
mod writer;

pub use config::{ConnectionConfig, DEFAULT_MAX_FRAME};
pub use connection::{BoxFuture, CallContext, Connection, Dispatch};
pub use driver::MAX_BATCH;
pub use error::{Error, Status, StatusCode};
pub use frame::{Frame, FrameCodec, Hello, PROTOCOL_VERSION};
pub use identity::PeerIdentity;

/// Names generated code uses; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use bytes::Bytes;
}

/// Re-exported so users name the same `tokio_util` token type.
pub use tokio_util::sync::CancellationToken;
