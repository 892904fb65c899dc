//! The health service every server answers, with grpc.health.v1's meaning:
//! is the server (service name `""`) or one of its services serving?
//!
//! ```text
//! srpc.health.Check(service: String)                      -> HealthStatus
//! srpc.health.Watch(service: String, seen: Option<HealthStatus>) -> HealthStatus
//!     (answers once the status differs from `seen`, or at once without one;
//!      a long-lived call, bounded by its deadline)
//! ```
//!
//! A service name the server does not know is `NotFound`. A draining server
//! answers `NotServing` for everything, on connections it still serves
//! (health calls are served while a connection drains; other calls are
//! refused with `ShuttingDown`).
//!
//! Not here: the server's record of statuses (rpc-server `health.rs`).

use serde::{Deserialize, Serialize};

/// The reserved method that answers one status.
pub const CHECK_METHOD: &str = "srpc.health.Check";

/// The reserved method that answers when a status changes.
pub const WATCH_METHOD: &str = "srpc.health.Watch";

/// Whether a server, or one of its services, takes calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Calls are welcome.
    Serving,
    /// Do not send calls here (draining, or set so by the server's code).
    NotServing,
}

impl HealthStatus {
    /// `SERVING` or `NOT_SERVING`, as grpc.health.v1 spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Serving => "SERVING",
            HealthStatus::NotServing => "NOT_SERVING",
        }
    }
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// True for the health methods, which a draining connection still serves.
pub fn is_health_method(method: &str) -> bool {
    method == CHECK_METHOD || method == WATCH_METHOD
}
