//! Call counters, and the stats snapshot a server sends when asked.
//!
//! A server's counting layer updates a [`CallCounters`] as calls start,
//! finish or fail, and its [`Dispatch`] counts the calls a connection
//! refused before dispatching; a server shares one set across all its
//! connections. [`StatsSnapshot`] is what the reserved
//! method [`STATS_METHOD`] returns, encoded like any reply.
//!
//! Not here: collecting connections and RTTs (the server does that).
//!
//! [`Dispatch`]: crate::Dispatch

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::StatusCode;

/// The reserved method that returns a [`StatsSnapshot`]. Method names
/// starting with `srpc.` are reserved for the framework.
pub const STATS_METHOD: &str = "srpc.stats";

/// Prefix of the framework's reserved method names.
pub const RESERVED_PREFIX: &str = "srpc.";

/// Counters of calls served, shared by every connection of a server.
#[derive(Debug, Default)]
pub struct CallCounters {
    in_flight: AtomicU64,
    served: AtomicU64,
    errors: [AtomicU64; StatusCode::ALL.len()],
}

impl CallCounters {
    /// A handler started.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A handler ended: answered (`Ok`), failed with a code, or stopped.
    pub fn finished(&self, outcome: Result<(), StatusCode>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                self.served.fetch_add(1, Ordering::Relaxed);
            }
            Err(code) => self.failed(code),
        }
    }

    /// A call failed without running a handler (refused, overloaded).
    pub fn failed(&self, code: StatusCode) {
        self.errors[code.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls running now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Calls answered successfully so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Failed calls by kind (every kind, zeros included).
    pub fn errors(&self) -> Vec<(String, u64)> {
        StatusCode::ALL
            .iter()
            .map(|c| {
                (
                    c.name().to_owned(),
                    self.errors[c.index()].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// One connection's line in the stats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    /// The peer's address.
    pub addr: String,
    /// Latest heartbeat round trip in microseconds, once measured (a busy
    /// connection has no idle time to ping in, so it may have none).
    pub rtt_us: Option<u64>,
}

/// What [`STATS_METHOD`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Connections open now.
    pub connections: u64,
    /// Calls running now (including this one).
    pub calls_in_flight: u64,
    /// Calls answered successfully since the server started.
    pub calls_served: u64,
    /// Failed calls by kind (`unknown_method`, `overloaded`, ...).
    pub errors: Vec<(String, u64)>,
    /// Each open connection.
    pub peers: Vec<PeerStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up() {
        let c = CallCounters::default();
        c.started();
        c.started();
        assert_eq!(c.in_flight(), 2);
        c.finished(Ok(()));
        c.finished(Err(StatusCode::Internal));
        c.failed(StatusCode::Overloaded);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.served(), 1);
        let errors = c.errors();
        assert_eq!(errors.len(), StatusCode::ALL.len());
        let get = |k: &str| errors.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!(get("internal"), 1);
        assert_eq!(get("overloaded"), 1);
        assert_eq!(get("unknown_method"), 0);
    }
}
