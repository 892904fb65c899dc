//! Per-connection limits and timers, shared by server and client.
//!
//! Every knob is a named field with its default documented here; the server
//! and client builders expose them, and the CLIs map flags onto them.
//! [`ConnectionConfig::validate`] refuses combinations that cannot work
//! (for example a heartbeat interval not shorter than its timeout).
//!
//! This module holds values only; it does not act on them.

use std::time::Duration;

use crate::codec::DEFAULT_MAX_DEPTH;
use crate::error::Error;

/// Default largest frame: 4 MiB.
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;

/// Limits and timers of one connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionConfig {
    /// Largest frame accepted, in bytes after the length prefix. Announced in
    /// `Hello`; the peer writes no larger frame. Default 4 MiB.
    pub max_frame: usize,
    /// Time allowed for the TLS handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time allowed for the peer's `Hello` after the TLS handshake.
    /// Default 10 s.
    pub hello_timeout: Duration,
    /// Heartbeat interval announced in `Hello`. Default 5 s.
    pub heartbeat_interval: Duration,
    /// Silence after which the peer counts as dead. Default 15 s.
    pub heartbeat_timeout: Duration,
    /// Calls from the peer handled at once; the excess gets `Overloaded`.
    /// Default 100.
    pub max_in_flight: usize,
    /// Frames queued for the writer before senders wait. Default 1024.
    pub outbound_queue: usize,
    /// A frame that has begun arriving must be complete within this long,
    /// or the connection is closed (a peer cannot dribble a frame forever;
    /// a 4 MiB frame then needs at least 140 KB/s). Checked at heartbeat
    /// ticks, so it fires up to one heartbeat interval late. Default 30 s.
    pub partial_frame_timeout: Duration,
    /// A peer that accepts no byte at all for this long while frames wait to
    /// be written is cut off (it stopped reading). Default 30 s.
    pub write_stall_timeout: Duration,
    /// Time allowed to flush the last frames (a `GoAway`, TLS close_notify)
    /// when the connection closes, and, when this side closed first, to
    /// read the peer's close_notify before the socket is let go. Default 1 s.
    pub close_timeout: Duration,
    /// How deeply a call's arguments (server) or reply (client) may nest
    /// before it is refused with `InvalidArgument` ("nesting deeper than
    /// 128 levels"); each struct, tuple, sequence, map, enum, `Some` and
    /// newtype is a level. Decoding recurses once per level, so this bounds
    /// the stack a peer's value can take; raise it only with the stack to
    /// match. Default 128 ([`DEFAULT_MAX_DEPTH`]).
    pub max_depth: usize,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max_frame: DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(15),
            max_in_flight: 100,
            outbound_queue: 1024,
            partial_frame_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(1),
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

impl ConnectionConfig {
    /// Checks that the values can work together.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.max_frame < 64 || self.max_frame > u32::MAX as usize {
            return bad(format!(
                "max frame must be between 64 bytes and 4 GiB, not {}",
                self.max_frame
            ));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.heartbeat_timeout {
            return bad(format!(
                "heartbeat interval ({:?}) must be non-zero and shorter than the heartbeat timeout ({:?})",
                self.heartbeat_interval, self.heartbeat_timeout
            ));
        }
        if self.heartbeat_interval.as_millis() > u32::MAX as u128 {
            return bad("heartbeat interval is too long".into());
        }
        if self.max_depth == 0 {
            return bad("max depth must be at least 1".into());
        }
        if self.max_in_flight == 0 || self.outbound_queue == 0 {
            return bad("max in-flight calls and the outbound queue must be at least 1".into());
        }
        for (name, d) in [
            ("handshake timeout", self.handshake_timeout),
            ("hello timeout", self.hello_timeout),
            ("close timeout", self.close_timeout),
            ("write stall timeout", self.write_stall_timeout),
            ("partial frame timeout", self.partial_frame_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be non-zero"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ConnectionConfig::default().validate().unwrap();
    }

    #[test]
    fn interval_must_be_shorter_than_timeout() {
        let mut c = ConnectionConfig::default();
        c.heartbeat_interval = c.heartbeat_timeout;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("heartbeat interval"), "{err}");
    }

    #[test]
    fn tiny_or_huge_frames_are_refused() {
        let mut c = ConnectionConfig {
            max_frame: 10,
            ..ConnectionConfig::default()
        };
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("not 10"), "{err}");
        c.max_frame = u32::MAX as usize + 1;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("not 4294967296"), "{err}");
        c.max_frame = 64;
        c.validate().unwrap();
    }

    #[test]
    fn a_zero_depth_is_refused() {
        let c = ConnectionConfig {
            max_depth: 0,
            ..ConnectionConfig::default()
        };
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("max depth"), "{err}");
    }
}
