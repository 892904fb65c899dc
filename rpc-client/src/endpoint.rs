//! An endpoint: one server address, the connection to it, and the task
//! that keeps that connection up (connect, supervise, reconnect with
//! backoff), with its state for callers to watch.
//!
//! ```text
//!  Endpoint ◄── supervisor task: runs the connection's driver; when the
//!   current       connection ends (or GoAway) reconnects, backing off
//!   state ──►     Connecting / Ready / BackingOff / Closed
//!   last_error    (100 ms doubling up to 10 s, full jitter)
//! ```
//!
//! The supervisor also runs the current connection's driver, so a
//! connection costs one task, and closing it wakes only that task. When the
//! server sends `GoAway`, the old driver moves to a task of its own to
//! finish its calls while the supervisor reconnects. The supervisor is
//! owned by the clients ([`Owner`]): when the last one is dropped, or the
//! client is closed, the connection closes and the supervisor ends.
//!
//! Not here: making calls over the endpoint (`client.rs`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use rpc_core::error::report;
use rpc_core::{transport, Connection, ConnectionConfig};
use rustls::pki_types::ServerName;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::ClientError;

/// Failed reconnects in a row after which the client logs a warning (once
/// per outage).
const OUTAGE_AFTER: u32 = 3;

/// Where the client's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnState {
    /// A connection attempt is under way.
    Connecting,
    /// A connection is up; calls go out at once.
    Ready,
    /// The last attempt failed; waiting before the next one.
    BackingOff,
    /// The client was closed; no more connections.
    Closed,
}

/// Makes the first connection, tells `reply` how that went, and on success
/// supervises it. Stops as soon as `reply`'s receiver is dropped (the
/// caller gave up on `connect`); a connection made after that is closed by
/// the dropped [`Owner`].
pub(crate) async fn connect_then_supervise(
    endpoint: Arc<Endpoint>,
    mut reply: oneshot::Sender<Result<(), ClientError>>,
    span: tracing::Span,
) {
    // Boxed, as in `supervise`: this task may live as long as the client.
    // The attempt runs in the caller's span, as when `connect` made it.
    let attempt = tokio::select! {
        attempt = Box::pin(endpoint.connect_once().instrument(span)) => attempt,
        _ = reply.closed() => return,
    };
    match attempt {
        Ok((conn, driver)) => {
            *endpoint.current() = Some(conn.clone());
            endpoint.state.send_replace(ConnState::Ready);
            // If the caller is gone, its handle closed the client (and a
            // connection installed after that is closed by `supervise`).
            let _ = reply.send(Ok(()));
            supervise(endpoint, (conn, driver)).await;
        }
        Err(e) => {
            let _ = reply.send(Err(e));
        }
    }
}

/// The host part of `host:port` or `[v6]:port`.
pub(crate) fn host_of(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// One server address: its connection, the task that keeps it up, and
/// where it stands. What the clients and the supervisor share.
pub(crate) struct Endpoint {
    pub(crate) addr: String,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) connector: TlsConnector,
    pub(crate) config: ConnectionConfig,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) current: Mutex<Option<Connection>>,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) state: watch::Sender<ConnState>,
    /// Fires when the client is closed (or its last clone dropped).
    pub(crate) closed: CancellationToken,
}

impl Endpoint {
    /// An endpoint for `addr`, not connected yet (see
    /// [`connect_then_supervise`]).
    pub(crate) fn new(
        addr: String,
        server_name: ServerName<'static>,
        connector: TlsConnector,
        config: ConnectionConfig,
        backoff: (Duration, Duration),
    ) -> Self {
        Endpoint {
            addr,
            server_name,
            connector,
            config,
            backoff,
            current: Mutex::new(None),
            last_error: Mutex::new(None),
            state: watch::channel(ConnState::Connecting).0,
            closed: CancellationToken::new(),
        }
    }

    pub(crate) fn current(&self) -> MutexGuard<'_, Option<Connection>> {
        // Holds an Option only; a poisoned lock still holds a valid value.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn last_error(&self) -> MutexGuard<'_, Option<String>> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the client: no more connections, and the current one ends
    /// now (its driver, in the supervisor's task, then ends too).
    pub(crate) fn close(&self) {
        // Cancelled first: a connection the supervisor installs after the
        // look below sees the cancellation (see `supervise`).
        self.closed.cancel();
        if let Some(conn) = self.current().as_ref() {
            conn.close();
        }
    }

    /// One attempt: resolve, then each address in turn until one connects.
    /// Returns the connection and its driver, which the caller runs.
    async fn connect_once(&self) -> Result<transport::Started, ClientError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(self.addr.as_str())
            .await
            .map_err(|e| ClientError::Resolve {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?
            .collect();
        let mut last = None;
        for sa in &addrs {
            match transport::connect(*sa, self.server_name.clone(), &self.connector, &self.config)
                .await
            {
                Ok(started) => {
                    debug!(addr = %sa, "connected");
                    return Ok(started);
                }
                Err(e) => last = Some((sa.to_string(), e)),
            }
        }
        Err(match last {
            Some((addr, source)) => ClientError::Connect { addr, source },
            None => ClientError::Resolve {
                addr: self.addr.clone(),
                reason: "no addresses found".into(),
            },
        })
    }
}

/// Keeps a connection up until the client is closed, running the current
/// connection's driver.
async fn supervise(endpoint: Arc<Endpoint>, first: transport::Started) {
    let mut backoff = Backoff::new(endpoint.backoff.0, endpoint.backoff.1);
    let mut next = Some(first);
    'outer: loop {
        if let Some((conn, mut driver)) = next.take() {
            // A client closed between installing this connection and here
            // closed the one before; this one is closed here (and the loop
            // below then finishes it).
            if endpoint.closed.is_cancelled() {
                conn.close();
            }
            // The driver runs in this poll, so a GoAway it reads, or its
            // starting to close, is seen right after, with no wake-up and no
            // lock (two atomic loads per poll).
            let done = std::future::poll_fn(|cx| match driver.as_mut().poll(cx) {
                Poll::Ready(_) => Poll::Ready(true),
                Poll::Pending if conn.goaway_received() || conn.is_ending() => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            })
            .await;
            if endpoint.closed.is_cancelled() {
                // Closed by the client: finish closing here.
                if !done {
                    driver.await;
                }
                break 'outer;
            }
            if !done {
                // Calls in flight finish on the old connection (GoAway), or
                // its last frames go out (closing, bounded by its close
                // timeout), while the next connection is made.
                tokio::spawn(driver);
            }
            let why = conn
                .close_reason()
                .unwrap_or_else(|| "peer sent GoAway".into());
            info!(addr = %endpoint.addr, reason = %why, "connection lost; reconnecting");
        }
        let mut failures: u32 = 0;
        loop {
            endpoint.state.send_replace(ConnState::Connecting);
            // Boxed: an attempt holds a TLS handshake in progress (a few
            // KiB), and this task lives as long as the client; inline, that
            // would stay in the task for a path taken only on reconnects.
            let attempt = tokio::select! {
                r = Box::pin(endpoint.connect_once()) => r,
                _ = endpoint.closed.cancelled() => break 'outer,
            };
            match attempt {
                Ok((conn, driver)) => {
                    *endpoint.current() = Some(conn.clone());
                    *endpoint.last_error() = None;
                    backoff.reset();
                    endpoint.state.send_replace(ConnState::Ready);
                    info!(addr = %endpoint.addr, failures, "reconnected");
                    next = Some((conn, driver));
                    break;
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    let text = report(&e);
                    failures += 1;
                    // One line per outage at each level: the first failure
                    // is news, a third in a row is an outage worth a
                    // warning, the rest would only repeat them. A command
                    // that reconnects at its second try prints no warning.
                    match failures {
                        1 => {
                            info!(addr = %endpoint.addr, error = %text, ?wait, "reconnect failed; retrying")
                        }
                        OUTAGE_AFTER => {
                            warn!(addr = %endpoint.addr, error = %text, failures, "server unreachable; still retrying")
                        }
                        _ => {
                            debug!(addr = %endpoint.addr, error = %text, ?wait, "reconnect failed")
                        }
                    }
                    *endpoint.last_error() = Some(text);
                    endpoint.state.send_replace(ConnState::BackingOff);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = endpoint.closed.cancelled() => break 'outer,
                    }
                }
            }
        }
    }
    let last = endpoint.current().take();
    if let Some(conn) = last {
        conn.close();
        conn.closed().await;
    }
    endpoint.state.send_replace(ConnState::Closed);
}

/// Owns an endpoint for the clients: closes it when the last clone goes.
pub(crate) struct Owner {
    pub(crate) endpoint: Arc<Endpoint>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.endpoint.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_supervisor_task_stays_small() {
        // Every client keeps one task (`connect_then_supervise`, which runs
        // `supervise`) for its whole life; a reconnect attempt held inline
        // made it 4,808 bytes.
        let (io, _peer) = tokio::io::duplex(64);
        let config = ConnectionConfig::default();
        let hello = transport::hello_for(&config);
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let (conn, driver) = rpc_core::connection::start(io, &config, peer, hello, None);
        let tls = rustls::ClientConfig::builder_with_provider(rpc_core::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let (state, _) = watch::channel(ConnState::Ready);
        let endpoint = Arc::new(Endpoint {
            addr: "127.0.0.1:1".into(),
            server_name: ServerName::try_from("localhost").expect("a valid name"),
            connector: TlsConnector::from(Arc::new(tls)),
            config,
            backoff: (Duration::from_millis(100), Duration::from_secs(1)),
            current: Mutex::new(None),
            last_error: Mutex::new(None),
            state,
            closed: CancellationToken::new(),
        });
        let first = connect_then_supervise(
            endpoint.clone(),
            oneshot::channel().0,
            tracing::Span::none(),
        );
        let size = std::mem::size_of_val(&first);
        assert!(size <= 1024, "the first connection's task is {size} bytes");
        let task = supervise(endpoint, (conn, Box::pin(driver)));
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "the supervisor task is {size} bytes");
    }

    #[test]
    fn host_part_of_addresses() {
        assert_eq!(host_of("localhost:7443"), Some("localhost"));
        assert_eq!(host_of("127.0.0.1:1"), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:7443"), Some("::1"));
        assert_eq!(host_of("localhost"), None);
        assert_eq!(host_of(":7443"), None);
        assert_eq!(host_of("h:notaport"), None);
    }
}
