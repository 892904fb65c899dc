//! The client library's error type.
//!
//! Three families, so a caller knows what to do: the server could not be
//! reached or refused us (`Connect`: check the address, the CA, the name),
//! the call itself failed (`Call`: a [`Status`] from the server, a deadline, a
//! closed connection), or the types did not fit (`Encode` / `Decode`: the
//! client and server disagree on a method's signature).

use rpc_core::{Status, StatusCode};

/// What a client operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address is not `host:port` or did not resolve.
    #[error("cannot resolve {addr:?}: {reason}")]
    Resolve {
        /// The address given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The name to verify the server's certificate against is not valid.
    #[error("invalid server name {0:?} (expected a DNS name or an IP address)")]
    ServerName(String),
    /// Connecting, the TLS handshake or the `Hello` exchange failed.
    #[error("cannot connect to {addr}: {source}{}", hint(.source))]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        #[source]
        source: rpc_core::Error,
    },
    /// The call failed: a status from the server, the deadline, or the
    /// connection.
    #[error(transparent)]
    Call(#[from] rpc_core::Error),
    /// The call was sent, and then its connection was lost: the server may
    /// or may not have run it. It was not sent again because it is not
    /// idempotent (or its retries ran out).
    #[error("call to {method:?} was sent, then {source}; whether the server ran it is unknown (not retried: not idempotent, or its retries ran out)")]
    OutcomeUnknown {
        /// The method.
        method: String,
        /// How the connection was lost.
        #[source]
        source: rpc_core::Error,
    },
    /// No usable connection: the last attempt failed and the call does not
    /// wait for ready (it failed at once), or none came up within the
    /// call's timeout (it waited). The client keeps reconnecting.
    #[error("{}", unavailable(addr, *waited, last_error.as_deref()))]
    Unavailable {
        /// The server address.
        addr: String,
        /// How long the call waited.
        waited: std::time::Duration,
        /// Why the last connection attempt failed, if one did.
        last_error: Option<String>,
    },
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// The arguments could not be encoded.
    #[error("arguments of {method:?} did not encode: {source}")]
    Encode {
        /// The method.
        method: String,
        /// Why.
        #[source]
        source: rpc_core::codec::CodecError,
    },
    /// The reply did not decode as the type the caller expects (client and
    /// server disagree on the method's signature).
    #[error("reply of {method:?} did not decode as {expected}: {source}")]
    Decode {
        /// The method.
        method: String,
        /// The type the caller asked for.
        expected: &'static str,
        /// Why.
        #[source]
        source: rpc_core::codec::CodecError,
    },
}

impl ClientError {
    /// The status code when the call failed with one (from the server, or a
    /// local deadline).
    pub fn code(&self) -> Option<StatusCode> {
        match self {
            ClientError::Call(e) => e.code(),
            _ => None,
        }
    }

    /// The error of a call that was sent: a lost connection becomes
    /// [`ClientError::OutcomeUnknown`].
    pub(crate) fn sent(self, method: &str) -> ClientError {
        use rpc_core::Error;
        match self {
            ClientError::Call(
                source @ (Error::Closed { .. }
                | Error::PeerUnresponsive(_)
                | Error::WriteStalled(_)
                | Error::Io(_)),
            ) => ClientError::OutcomeUnknown {
                method: method.to_owned(),
                source,
            },
            other => other,
        }
    }

    /// The server's status, when the call failed with one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Call(rpc_core::Error::Status(s)) => Some(s),
            _ => None,
        }
    }
}

/// A next step for the common certificate failures.
fn hint(e: &rpc_core::Error) -> &'static str {
    let text = e.to_string().to_lowercase();
    if text.contains("unknownissuer") || text.contains("badsignature") {
        " (the server's certificate is not signed by the CA given to the client)"
    } else if text.contains("not valid for name") || text.contains("notvalidforname") {
        " (the server's certificate is not valid for this server name; see --server-name)"
    } else if text.contains("expired") {
        " (the server's certificate has expired)"
    } else if text.contains("not valid yet") || text.contains("notvalidyet") {
        " (the server's certificate is not valid yet; check the clocks)"
    } else if text.contains("certificaterequired") {
        " (the server requires a client certificate: give --cert and --key)"
    } else if text.contains("unknownca") || text.contains("badcertificate") {
        " (the server does not accept this client certificate)"
    } else if text.contains("alert: decrypterror") {
        // What a server answers when a client certificate's signature does
        // not verify: typically signed by another CA of the same name.
        " (the server could not verify this client certificate: is it from the CA the server trusts?)"
    } else if text.contains("connection refused") {
        " (is the server running on that address?)"
    } else {
        ""
    }
}

/// The words of [`ClientError::Unavailable`].
fn unavailable(addr: &str, waited: std::time::Duration, last_error: Option<&str>) -> String {
    match last_error {
        // Failed fast: the call did not wait.
        Some(e) if waited < std::time::Duration::from_millis(1) => format!(
            "no connection to {addr}: last connection attempt failed: {e} (reconnecting; \
             the call failed at once: set wait_for_ready to wait for a server)"
        ),
        Some(e) => {
            format!("no connection to {addr} within {waited:?} (reconnecting; last error: {e})")
        }
        None => format!("no connection to {addr} within {waited:?}"),
    }
}
