//! Errors of the transport, and `Status`: the error kinds that travel on the
//! wire.
//!
//! Two families live here on purpose:
//! - [`Status`] is *data*: a server handler's failure, sent back in a
//!   `Response` so the connection stays usable. It is part of the wire format.
//! - [`Error`] is what the local side sees: an I/O failure, a malformed frame,
//!   a closed connection, or a `Status` that came back from the peer.
//!
//! TLS configuration errors (which file, what is wrong with it) are
//! [`crate::tls::TlsError`], wrapped here as [`Error::Tls`].
//!
//! This module does not decide *when* a connection closes; the connection
//! driver does. It only names the reasons.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::CodecError;
use crate::tls::TlsError;

/// The kind of a [`Status`]. Encoded on the wire by its position: append new
/// kinds at the end only, never reorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StatusCode {
    /// The server has no method of that name.
    UnknownMethod,
    /// The arguments did not decode as the method's argument type.
    InvalidArgument,
    /// The call's deadline passed before it finished.
    DeadlineExceeded,
    /// The caller cancelled the call.
    Cancelled,
    /// The handler failed (returned an internal error or panicked).
    Internal,
    /// The server refused the call because a limit was reached.
    Overloaded,
    /// The server is draining and takes no new calls.
    ShuttingDown,
    /// The peer did not prove who it is.
    Unauthenticated,
    /// The peer is known but may not call this method.
    PermissionDenied,
    /// A handler's own application-level error.
    Failed,
    /// A resource ran out for this call: its reply was larger than the
    /// caller's frame limit, say. Raising the limit named in the message may
    /// help; sending the same call again will not.
    ResourceExhausted,
    /// Something the call names does not exist (a key, a file, a user).
    NotFound,
    /// What the call tries to create exists already.
    AlreadyExists,
    /// The system is not in the state the call needs (a directory not empty,
    /// an account frozen); retrying will not help until that changes.
    FailedPrecondition,
    /// The call was aborted by a conflict (a transaction conflict, a failed
    /// compare-and-swap); the caller may retry the whole sequence.
    Aborted,
    /// An argument was past the range the data allows (reading past the end
    /// of a file): unlike `InvalidArgument`, a change of the system's state
    /// could make the same call valid.
    OutOfRange,
    /// The method exists but is not implemented or not enabled on this server.
    Unimplemented,
    /// The service cannot serve for now (no server reachable, a connection
    /// lost before the call was handled); a retry with backoff may succeed.
    Unavailable,
    /// Unrecoverable loss or corruption of data.
    DataLoss,
}

impl StatusCode {
    /// Every kind, in wire order.
    pub const ALL: [StatusCode; 19] = [
        StatusCode::UnknownMethod,
        StatusCode::InvalidArgument,
        StatusCode::DeadlineExceeded,
        StatusCode::Cancelled,
        StatusCode::Internal,
        StatusCode::Overloaded,
        StatusCode::ShuttingDown,
        StatusCode::Unauthenticated,
        StatusCode::PermissionDenied,
        StatusCode::Failed,
        StatusCode::ResourceExhausted,
        StatusCode::NotFound,
        StatusCode::AlreadyExists,
        StatusCode::FailedPrecondition,
        StatusCode::Aborted,
        StatusCode::OutOfRange,
        StatusCode::Unimplemented,
        StatusCode::Unavailable,
        StatusCode::DataLoss,
    ];

    /// Position in [`StatusCode::ALL`].
    pub fn index(self) -> usize {
        match self {
            StatusCode::UnknownMethod => 0,
            StatusCode::InvalidArgument => 1,
            StatusCode::DeadlineExceeded => 2,
            StatusCode::Cancelled => 3,
            StatusCode::Internal => 4,
            StatusCode::Overloaded => 5,
            StatusCode::ShuttingDown => 6,
            StatusCode::Unauthenticated => 7,
            StatusCode::PermissionDenied => 8,
            StatusCode::Failed => 9,
            StatusCode::ResourceExhausted => 10,
            StatusCode::NotFound => 11,
            StatusCode::AlreadyExists => 12,
            StatusCode::FailedPrecondition => 13,
            StatusCode::Aborted => 14,
            StatusCode::OutOfRange => 15,
            StatusCode::Unimplemented => 16,
            StatusCode::Unavailable => 17,
            StatusCode::DataLoss => 18,
        }
    }

    /// A snake_case name for stats keys, e.g. `unknown_method`.
    pub fn name(self) -> &'static str {
        match self {
            StatusCode::UnknownMethod => "unknown_method",
            StatusCode::InvalidArgument => "invalid_argument",
            StatusCode::DeadlineExceeded => "deadline_exceeded",
            StatusCode::Cancelled => "cancelled",
            StatusCode::Internal => "internal",
            StatusCode::Overloaded => "overloaded",
            StatusCode::ShuttingDown => "shutting_down",
            StatusCode::Unauthenticated => "unauthenticated",
            StatusCode::PermissionDenied => "permission_denied",
            StatusCode::Failed => "failed",
            StatusCode::ResourceExhausted => "resource_exhausted",
            StatusCode::NotFound => "not_found",
            StatusCode::AlreadyExists => "already_exists",
            StatusCode::FailedPrecondition => "failed_precondition",
            StatusCode::Aborted => "aborted",
            StatusCode::OutOfRange => "out_of_range",
            StatusCode::Unimplemented => "unimplemented",
            StatusCode::Unavailable => "unavailable",
            StatusCode::DataLoss => "data_loss",
        }
    }

    /// A short lowercase name, as shown in messages and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusCode::UnknownMethod => "unknown method",
            StatusCode::InvalidArgument => "invalid argument",
            StatusCode::DeadlineExceeded => "deadline exceeded",
            StatusCode::Cancelled => "cancelled",
            StatusCode::Internal => "internal error",
            StatusCode::Overloaded => "overloaded",
            StatusCode::ShuttingDown => "shutting down",
            StatusCode::Unauthenticated => "unauthenticated",
            StatusCode::PermissionDenied => "permission denied",
            StatusCode::Failed => "failed",
            StatusCode::ResourceExhausted => "resource exhausted",
            StatusCode::NotFound => "not found",
            StatusCode::AlreadyExists => "already exists",
            StatusCode::FailedPrecondition => "failed precondition",
            StatusCode::Aborted => "aborted",
            StatusCode::OutOfRange => "out of range",
            StatusCode::Unimplemented => "unimplemented",
            StatusCode::Unavailable => "unavailable",
            StatusCode::DataLoss => "data loss",
        }
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A call's failure as it travels on the wire: a kind and a message.
///
/// A server sends at most [`Status::MAX_MESSAGE`] bytes of message (see
/// [`Status::bounded`]); text that came from the peer is escaped and cut
/// before it is put in one ([`escape_peer_text`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Status {
    /// What went wrong, for programs to match on.
    pub code: StatusCode,
    /// What went wrong, for people to read.
    pub message: String,
}

impl Status {
    /// The longest message a server sends, in bytes; a longer one is cut,
    /// with a marker saying how long it was.
    pub const MAX_MESSAGE: usize = 4096;

    /// The same status with its message cut to at most `max` bytes (at a
    /// character boundary), ending in a marker that gives the full length.
    pub fn cut_to(mut self, max: usize) -> Self {
        if self.message.len() > max {
            let marker = format!("... [{} bytes, cut]", self.message.len());
            if marker.len() <= max {
                let keep = floor_char_boundary(&self.message, max - marker.len());
                self.message.truncate(keep);
                self.message.push_str(&marker);
            } else {
                let keep = floor_char_boundary(&self.message, max);
                self.message.truncate(keep);
            }
        }
        self
    }

    /// The same status with its message within [`Status::MAX_MESSAGE`].
    pub fn bounded(self) -> Self {
        self.cut_to(Status::MAX_MESSAGE)
    }

    /// A status of the given kind with a message.
    pub fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }

    /// `UnknownMethod` naming the method (escaped and cut, as the name
    /// comes from the peer).
    pub fn unknown_method(method: &str) -> Self {
        Status::new(
            StatusCode::UnknownMethod,
            format!("no method named \"{}\"", escape_peer_text(method, 256)),
        )
    }

    /// `ResourceExhausted` with a message.
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Status::new(StatusCode::ResourceExhausted, message)
    }

    /// `NotFound` with a message: see [`StatusCode::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Status::new(StatusCode::NotFound, message)
    }

    /// `AlreadyExists` with a message: see [`StatusCode::AlreadyExists`].
    pub fn already_exists(message: impl Into<String>) -> Self {
        Status::new(StatusCode::AlreadyExists, message)
    }

    /// `FailedPrecondition` with a message: see [`StatusCode::FailedPrecondition`].
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Status::new(StatusCode::FailedPrecondition, message)
    }

    /// `Aborted` with a message: see [`StatusCode::Aborted`].
    pub fn aborted(message: impl Into<String>) -> Self {
        Status::new(StatusCode::Aborted, message)
    }

    /// `OutOfRange` with a message: see [`StatusCode::OutOfRange`].
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Status::new(StatusCode::OutOfRange, message)
    }

    /// `Unimplemented` with a message: see [`StatusCode::Unimplemented`].
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Status::new(StatusCode::Unimplemented, message)
    }

    /// `Unavailable` with a message: see [`StatusCode::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        Status::new(StatusCode::Unavailable, message)
    }

    /// `DataLoss` with a message: see [`StatusCode::DataLoss`].
    pub fn data_loss(message: impl Into<String>) -> Self {
        Status::new(StatusCode::DataLoss, message)
    }

    /// `PermissionDenied` with a message: see [`StatusCode::PermissionDenied`].
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Status::new(StatusCode::PermissionDenied, message)
    }

    /// `Unauthenticated` with a message: see [`StatusCode::Unauthenticated`].
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Status::new(StatusCode::Unauthenticated, message)
    }

    /// `DeadlineExceeded` with a message.
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Status::new(StatusCode::DeadlineExceeded, message)
    }

    /// `Cancelled` with a message.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Status::new(StatusCode::Cancelled, message)
    }

    /// `InvalidArgument` with a message.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Status::new(StatusCode::InvalidArgument, message)
    }

    /// `Internal` with a message.
    pub fn internal(message: impl Into<String>) -> Self {
        Status::new(StatusCode::Internal, message)
    }

    /// `Failed`: the handler's own application error, with a message.
    pub fn failed(message: impl Into<String>) -> Self {
        Status::new(StatusCode::Failed, message)
    }
}

/// The most of a peer's `GoAway` reason kept, in bytes.
pub const MAX_PEER_REASON: usize = 512;

/// Text that came from the peer (a method name, a `GoAway` reason), made
/// safe to put in a message or a log line: escaped as Rust's `{:?}` does
/// (no control bytes, no terminal escapes) and cut to at most `max` bytes
/// of the original, with `...` after it when longer.
pub fn escape_peer_text(text: &str, max: usize) -> String {
    let cut = floor_char_boundary(text, max);
    let mut out: String = text[..cut].escape_debug().collect();
    if cut < text.len() {
        out.push_str("...");
    }
    out
}

/// The largest char boundary of `s` at or below `at`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// Everything that can go wrong below the application: the transport's error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),

    /// A TLS configuration could not be built (certificate or key files).
    #[error(transparent)]
    Tls(#[from] TlsError),

    /// The TLS handshake failed (bad certificate, wrong name, not TLS at all).
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] std::io::Error),

    /// The TLS handshake did not finish in time.
    #[error("TLS handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),

    /// The peer did not negotiate the `srpc/1` ALPN protocol.
    #[error("peer did not negotiate ALPN \"srpc/1\" (offered {offered})")]
    Alpn {
        /// What the handshake ended with, for the message.
        offered: String,
    },

    /// A length prefix announced more than the frame limit allows.
    #[error(
        "frame of {len} bytes exceeds the limit of {max} bytes (max_frame: ConnectionConfig::max_frame, --max-frame-bytes)"
    )]
    FrameTooLarge {
        /// The announced or actual length.
        len: u64,
        /// The limit in force.
        max: u64,
    },

    /// A frame's bytes did not decode as a message, or a value did not encode.
    #[error("malformed message: {0}")]
    Codec(#[from] CodecError),

    /// The peer broke the protocol (wrong first frame, unexpected message).
    #[error("protocol violation: {0}")]
    Protocol(String),

    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The version in the peer's `Hello`.
        theirs: u16,
    },

    /// The peer said it will take no more calls on this connection.
    #[error("peer sent GoAway: {reason}")]
    GoAway {
        /// The reason the peer gave.
        reason: String,
    },

    /// The call was not sent: the connection ended (or began to end)
    /// before its request was queued for writing, so the peer never saw it
    /// and it may go out again anywhere. The reason is the connection's.
    #[error("call not sent: {reason}")]
    NotSent {
        /// Why the connection ended.
        reason: String,
    },

    /// The connection is closed; the reason says why.
    #[error("connection closed: {reason}")]
    Closed {
        /// Why the connection ended (shared by every call that was pending).
        reason: String,
    },

    /// Nothing at all arrived from the peer for the heartbeat timeout: it is
    /// frozen, gone, or the network path is black-holed. The connection was
    /// closed; calls pending on it fail with this.
    #[error("peer unresponsive: nothing received for {0:?}")]
    PeerUnresponsive(Duration),

    /// The peer stopped reading: no byte could be written for this long while
    /// frames were waiting. The connection was closed rather than let its
    /// queue grow.
    #[error("peer stopped reading: nothing could be written for {0:?}")]
    WriteStalled(Duration),

    /// The call's own deadline passed on this side before a reply came.
    #[error("deadline exceeded: no reply within {0:?}")]
    DeadlineExceeded(Duration),

    /// A configuration value was refused (see the message).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// Call metadata was refused: a malformed or reserved key, or over its
    /// bounds (see `rpc_core::metadata`).
    #[error("invalid call metadata: {0}")]
    Metadata(String),

    /// The peer reads no more of this stream (it sent `Reset`): stop
    /// sending its items. The call itself may still end well.
    #[error("the peer stopped reading stream {id}")]
    StreamReset {
        /// The stream's (call's) id.
        id: u64,
    },

    /// The peer answered the call with an error status.
    #[error("server returned {0}")]
    Status(#[from] Status),
}

impl Error {
    /// The status code, for a call that failed with a [`Status`] from the peer
    /// or with a local deadline.
    pub fn code(&self) -> Option<StatusCode> {
        match self {
            Error::Status(s) => Some(s.code),
            Error::DeadlineExceeded(_) => Some(StatusCode::DeadlineExceeded),
            _ => None,
        }
    }
}

/// An error and its causes on one line, each cause added only when its text
/// is not already part of the line (many errors print their cause too). For
/// CLIs and logs.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_does_not_repeat_causes() {
        let e = Error::Status(Status::invalid_argument("1 + 1 overflows"));
        assert_eq!(
            report(&e),
            "server returned invalid argument: 1 + 1 overflows"
        );
        let io = std::io::Error::other("disk on fire");
        let e = Error::Handshake(io);
        assert_eq!(report(&e), "TLS handshake failed: disk on fire");
    }

    #[test]
    fn status_displays_kind_and_message() {
        let s = Status::unknown_method("nope");
        assert_eq!(s.to_string(), "unknown method: no method named \"nope\"");
        assert_eq!(Error::Status(s).code(), Some(StatusCode::UnknownMethod));
    }

    #[test]
    fn long_messages_are_cut_with_a_marker_at_a_char_boundary() {
        let s = Status::internal("é".repeat(5000)).bounded();
        assert!(
            s.message.len() <= Status::MAX_MESSAGE,
            "{}",
            s.message.len()
        );
        assert!(
            s.message.ends_with("... [10000 bytes, cut]"),
            "{}",
            &s.message[4000..]
        );
        let short = Status::internal("fine").bounded();
        assert_eq!(short.message, "fine");
        // Too small for the marker: cut without it, still within the bound.
        let tiny = Status::internal("x".repeat(100)).cut_to(10);
        assert_eq!(tiny.message, "x".repeat(10));
    }

    #[test]
    fn peer_text_is_escaped_and_cut() {
        let name = format!("\u{1b}[31m{}", "\u{1}".repeat(1000));
        let s = Status::unknown_method(&name);
        assert!(
            !s.message.contains('\u{1b}') && !s.message.contains('\u{1}'),
            "{s}"
        );
        // 256 bytes of the name, each control byte six characters escaped.
        assert!(s.message.len() < 256 * 6 + 64, "{}", s.message.len());
        assert!(s.message.ends_with("...\""), "{s}");
        assert_eq!(escape_peer_text("ok\n", 10), "ok\\n");
        assert_eq!(escape_peer_text("abcdef", 3), "abc...");
    }

    #[test]
    fn every_code_round_trips_on_the_wire_with_its_constructor() {
        let made = [
            Status::not_found("m"),
            Status::already_exists("m"),
            Status::failed_precondition("m"),
            Status::aborted("m"),
            Status::out_of_range("m"),
            Status::unimplemented("m"),
            Status::unavailable("m"),
            Status::data_loss("m"),
            Status::permission_denied("m"),
            Status::unauthenticated("m"),
            Status::resource_exhausted("m"),
            Status::deadline_exceeded("m"),
            Status::cancelled("m"),
            Status::invalid_argument("m"),
            Status::internal("m"),
            Status::failed("m"),
        ];
        for status in made {
            let bytes = crate::codec::encode(&status, 1024).unwrap();
            let back: Status = crate::codec::decode(&bytes, 1024, 8).unwrap();
            assert_eq!(back, status);
            // Its wire tag is its place in ALL.
            assert_eq!(bytes[0] as usize, status.code.index(), "{}", status.code);
        }
        for code in StatusCode::ALL {
            let status = Status::new(code, "m");
            let bytes = crate::codec::encode(&status, 1024).unwrap();
            let back: Status = crate::codec::decode(&bytes, 1024, 8).unwrap();
            assert_eq!(back.code, code);
            assert!(
                !code.name().contains(' ') && !code.as_str().contains('_'),
                "{code}"
            );
        }
    }

    #[test]
    fn all_codes_are_listed_at_their_index() {
        for (i, c) in StatusCode::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{c}");
        }
    }

    #[test]
    fn frame_too_large_names_the_limit() {
        let e = Error::FrameTooLarge { len: 10, max: 4 };
        assert!(e.to_string().contains("limit of 4 bytes"), "{e}");
    }
}
