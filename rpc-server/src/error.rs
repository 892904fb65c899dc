//! The server library's error type.
//!
//! Errors a server operator sees: the listener could not bind, the TLS files
//! were unusable, a configuration value was refused, dev certificates could
//! not be written. Per-connection failures are not here: they close that
//! connection only and are logged.

use std::net::SocketAddr;
use std::path::PathBuf;

/// What can stop a server from starting or serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate, key or CA file was unusable.
    #[error(transparent)]
    Tls(#[from] rpc_core::tls::TlsError),
    /// A configuration value was refused.
    #[error("invalid server configuration: {0}")]
    Config(#[source] rpc_core::Error),
    /// A method could not be added: its name was registered twice (the same
    /// service added twice, say) or is under the reserved prefix `srpc.`.
    #[error("cannot serve these methods: {0}")]
    Routes(String),
    /// Development certificates could not be generated.
    #[error("cannot generate development certificates: {0}")]
    CertGen(#[from] rcgen::Error),
    /// A file to be generated exists already (and replacing was not asked
    /// for).
    #[error("{} exists already; use --force to replace it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A generated file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The listener failed in a way that retrying cannot fix.
    #[error("listener failed: {0}")]
    Accept(#[source] std::io::Error),
}
