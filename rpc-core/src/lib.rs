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
//! | `frame.rs` | the wire enum [`Frame`] and its encoding |
//! | `framing.rs` | the length prefix on the stream: [`FrameCodec`] |
//! | `codec.rs` | bincode 1.3.3 with limits: the only user of bincode |
//! | `tls.rs` | PEM loading, rustls configs, the ALPN check |
//! | `transport.rs` | TCP + TLS handshake + `Hello` exchange, both sides |
//! | `connection.rs` | the handle: calls, pings, close, drain |
//! | `driver.rs` | the loop that wires reader, rules, calls, writer, timer |
//! | `lifecycle.rs` | the connection's life stage and close cause (no I/O) |
//! | `rules.rs` | which frame is legal when, and the answer if not (no I/O) |
//! | `shared.rs` | what the handle and the driver share, under one lock |
//! | `calls/outgoing.rs` | this side's pending calls and their deadlines |
//! | `calls/incoming.rs` | the calls this side serves: dispatch, tasks, replies |
//! | `context.rs` | [`CallContext`]: what a handler knows about its call |
//! | `metadata.rs` | [`Metadata`]: the `(key, value)` list a call carries |
//! | `options.rs` | [`CallOptions`]: per-call timeout, metadata, waiting |
//! | `reader.rs`, `writer.rs` | frames off and onto the stream; the writer loop |
//! | `outbound.rs` | the bounded queues between the connection and its writer |
//! | `metered.rs` | byte clocks: when bytes last moved each way |
//! | `heartbeat.rs` | the liveness state machine (no I/O) |
//! | `identity.rs` | the peer certificate's subject and SANs |
//! | `service.rs` | what `#[service]` builds on: `Service`, `Caller`, context |
//! | `streaming.rs` | typed streams: [`Streaming<T>`](streaming::Streaming), [`ServerStream<T>`](streaming::ServerStream) |
//! | `streams/` | stream calls: the table of credit and items (`mod.rs`), credit without I/O (`flow.rs`), the handles (`handles.rs`) |
//! | `trace_context.rs` | W3C trace context in call metadata (feature `otel`) |
//! | `stats.rs` | call counters and the stats snapshot (`srpc.stats`) |
//! | `files.rs` | the file service's contract and SHA-256 (`rpc-server --files`) |
//! | `health.rs` | the health service's methods and statuses (`srpc.health`) |
//! | `config.rs` | per-connection limits and timers, with defaults |
//! | `error.rs` | [`Error`] and the wire's [`Status`] |
//!
//! ```text
//!  socket (TcpStream, TCP_NODELAY)      transport.rs
//!   └ TLS 1.3, ALPN srpc/1              tls.rs, transport.rs
//!      └ u32 length || bincode(Frame)   framing.rs, frame.rs, codec.rs
//!         └ connection driver           connection.rs, driver.rs
//!            └ calls: ids, deadlines, cancel, Status as data
//! ```
//!
//! Not here: accept loops and method routing (rpc-server), reconnects and the
//! typed client (rpc-client).

mod calls;
pub mod codec;
pub mod config;
pub mod connection;
mod context;
mod driver;
pub mod error;
pub mod files;
pub mod frame;
mod framing;
pub mod health;
pub mod heartbeat;
pub mod identity;
mod lifecycle;
pub mod metadata;
pub mod metered;
mod options;
mod outbound;
mod reader;
mod rules;
pub mod schema;
pub mod service;
mod shared;
pub mod stats;
pub mod streaming;
pub mod streams;
pub mod tls;
#[cfg(feature = "otel")]
pub mod trace_context;
pub mod transport;
mod writer;

pub use calls::incoming::{BoxFuture, Dispatch};
pub use config::{ConnectionConfig, DEFAULT_MAX_FRAME};
pub use connection::Connection;
pub use context::CallContext;
pub use error::{Error, Status, StatusCode};
pub use frame::{Frame, Hello, PROTOCOL_VERSION};
pub use framing::FrameCodec;
pub use identity::PeerIdentity;
pub use metadata::Metadata;
pub use options::CallOptions;
pub use streams::handles::{ServedStream, StreamReceiver, StreamSender};
pub use writer::MAX_BATCH;

/// Names generated code uses; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use bytes::Bytes;
}

/// Re-exported so users name the same `tokio_util` token type.
pub use tokio_util::sync::CancellationToken;
