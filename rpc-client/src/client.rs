//! The client: one connection at a time, many concurrent calls, reconnects.
//!
//! ```text
//! Client (clone freely) ──call──► current Connection (rpc-core) ──► server
//!        │                              ▲
//!        └── state watch ◄── supervisor task: waits for the connection to
//!            Connecting / Ready /      end (or GoAway), then reconnects with
//!            BackingOff / Closed       exponential backoff and full jitter
//! ```
//!
//! - Every clone shares the current connection, so thousands of concurrent
//!   calls go out over one TLS session and each waits for its own reply.
//!   Calls beyond the server's announced in-flight limit wait for a slot.
//! - `connect` waits for the first connection (made by the supervisor
//!   task), so a wrong address, CA or name is reported at once. After that
//!   the supervisor task keeps a connection: when one dies (peer
//!   unresponsive, reset, GoAway) it reconnects, backing off between
//!   failed attempts (100 ms doubling up to 10 s by default, each wait
//!   drawn uniformly below the cap).
//! - A call made while there is no usable connection waits for one, up to
//!   its own timeout, then fails with [`ClientError::Unavailable`] naming the
//!   last connection error. Calls are never retried on a new connection when
//!   the server may have run them; the one exception is a call a draining
//!   server refused unrun (`ShuttingDown`, or its `GoAway` crossed the
//!   request), which goes out again on the fresh connection, within its
//!   deadline. So a server restart loses no call.
//! - The supervisor task also runs the current connection's driver, so a
//!   connection costs one task, and closing it wakes only that task. When
//!   the server sends `GoAway`, the old driver moves to a task of its own to
//!   finish its calls while the supervisor reconnects.
//! - The supervisor is owned by the clients: when the last clone is dropped,
//!   or [`Client::close`] is called, the connection is closed and the
//!   supervisor ends.
//!
//! Not here: several endpoints and load balancing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use rpc_core::error::report;
use rpc_core::{codec, transport, Connection, ConnectionConfig};
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::ClientError;

/// Default time a call waits for its reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Builds a [`Client`]: TLS config, server name, limits, timeouts, backoff.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    tls: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
    config: ConnectionConfig,
    timeout: Duration,
    backoff: (Duration, Duration),
}

impl ClientBuilder {
    /// Starts from a TLS config (see `rpc_core::tls::client_config`).
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        ClientBuilder {
            tls,
            server_name: None,
            config: ConnectionConfig::default(),
            timeout: DEFAULT_TIMEOUT,
            backoff: (Duration::from_millis(100), Duration::from_secs(10)),
        }
    }

    /// The name the server's certificate must be valid for. Default: the
    /// host part of the address passed to `connect`.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Default time a call waits for its reply (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How deeply a reply may nest before the call fails with a decode
    /// error (default 128; see [`ConnectionConfig::max_depth`]).
    pub fn max_depth(mut self, levels: usize) -> Self {
        self.config.max_depth = levels;
        self
    }

    /// Connection limits and timers (heartbeat interval and timeout, frame
    /// size, handshake timeout).
    pub fn connection_config(mut self, config: ConnectionConfig) -> Self {
        self.config = config;
        self
    }

    /// Reconnect backoff: the first cap and the largest (default 100 ms and
    /// 10 s).
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = (first, max);
        self
    }

    /// Connects to `addr` (`host:port`), trying each resolved address in
    /// turn, and completes the TLS handshake and `Hello`. Fails at once if
    /// that first connection cannot be made.
    pub async fn connect(self, addr: &str) -> Result<Client, ClientError> {
        self.config
            .validate()
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let host = host_of(addr).ok_or_else(|| ClientError::Resolve {
            addr: addr.to_owned(),
            reason: "expected host:port".into(),
        })?;
        let name = self.server_name.clone().unwrap_or_else(|| host.to_owned());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| ClientError::ServerName(name))?;
        let (state, _) = watch::channel(ConnState::Connecting);
        let core = Arc::new(Core {
            addr: addr.to_owned(),
            server_name,
            connector: TlsConnector::from(self.tls),
            config: self.config,
            timeout: self.timeout,
            backoff: self.backoff,
            current: Mutex::new(None),
            last_error: Mutex::new(None),
            state,
            closed: CancellationToken::new(),
        });
        // The first connection is made in the task that then supervises it,
        // so the handshake runs on the runtime worker that sees each of its
        // socket events. Made in this future instead, a caller in
        // `block_on` (as in `#[tokio::main]`) had every step of it handed
        // from a worker to its thread, and then the connection to a worker.
        let (reply, first) = oneshot::channel();
        let handle = Handle { core: core.clone() };
        tokio::spawn(connect_then_supervise(
            core,
            reply,
            tracing::Span::current(),
        ));
        match first.await {
            Ok(Ok(())) => Ok(Client {
                inner: Arc::new(handle),
            }),
            Ok(Err(e)) => Err(e),
            // The task ends without answering only if it panicked or its
            // runtime is shutting down.
            Err(_) => Err(ClientError::Closed),
        }
    }
}

/// Makes the first connection, tells `reply` how that went, and on success
/// supervises it. Stops as soon as `reply`'s receiver is dropped (the
/// caller gave up on `connect`); a connection made after that is closed by
/// the dropped [`Handle`].
async fn connect_then_supervise(
    core: Arc<Core>,
    mut reply: oneshot::Sender<Result<(), ClientError>>,
    span: tracing::Span,
) {
    // Boxed, as in `supervise`: this task may live as long as the client.
    // The attempt runs in the caller's span, as when `connect` made it.
    let attempt = tokio::select! {
        attempt = Box::pin(core.connect_once().instrument(span)) => attempt,
        _ = reply.closed() => return,
    };
    match attempt {
        Ok((conn, driver)) => {
            *core.current() = Some(conn.clone());
            core.state.send_replace(ConnState::Ready);
            // If the caller is gone, its handle closed the client (and a
            // connection installed after that is closed by `supervise`).
            let _ = reply.send(Ok(()));
            supervise(core, (conn, driver)).await;
        }
        Err(e) => {
            let _ = reply.send(Err(e));
        }
    }
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// What the clients and the supervisor share.
struct Core {
    addr: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    config: ConnectionConfig,
    timeout: Duration,
    backoff: (Duration, Duration),
    current: Mutex<Option<Connection>>,
    last_error: Mutex<Option<String>>,
    state: watch::Sender<ConnState>,
    /// Fires when the client is closed (or its last clone dropped).
    closed: CancellationToken,
}

impl Core {
    fn current(&self) -> MutexGuard<'_, Option<Connection>> {
        // Holds an Option only; a poisoned lock still holds a valid value.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn last_error(&self) -> MutexGuard<'_, Option<String>> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the client: no more connections, and the current one ends
    /// now (its driver, in the supervisor's task, then ends too).
    fn close(&self) {
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
async fn supervise(core: Arc<Core>, first: transport::Started) {
    let mut backoff = Backoff::new(core.backoff.0, core.backoff.1);
    let mut next = Some(first);
    'outer: loop {
        if let Some((conn, mut driver)) = next.take() {
            // A client closed between installing this connection and here
            // closed the one before; this one is closed here (and the loop
            // below then finishes it).
            if core.closed.is_cancelled() {
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
            if core.closed.is_cancelled() {
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
            info!(addr = %core.addr, reason = %why, "connection lost; reconnecting");
        }
        let mut failures: u32 = 0;
        loop {
            core.state.send_replace(ConnState::Connecting);
            // Boxed: an attempt holds a TLS handshake in progress (a few
            // KiB), and this task lives as long as the client; inline, that
            // would stay in the task for a path taken only on reconnects.
            let attempt = tokio::select! {
                r = Box::pin(core.connect_once()) => r,
                _ = core.closed.cancelled() => break 'outer,
            };
            match attempt {
                Ok((conn, driver)) => {
                    *core.current() = Some(conn.clone());
                    *core.last_error() = None;
                    backoff.reset();
                    core.state.send_replace(ConnState::Ready);
                    info!(addr = %core.addr, failures, "reconnected");
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
                            info!(addr = %core.addr, error = %text, ?wait, "reconnect failed; retrying")
                        }
                        OUTAGE_AFTER => {
                            warn!(addr = %core.addr, error = %text, failures, "server unreachable; still retrying")
                        }
                        _ => debug!(addr = %core.addr, error = %text, ?wait, "reconnect failed"),
                    }
                    *core.last_error() = Some(text);
                    core.state.send_replace(ConnState::BackingOff);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = core.closed.cancelled() => break 'outer,
                    }
                }
            }
        }
    }
    let last = core.current().take();
    if let Some(conn) = last {
        conn.close();
        conn.closed().await;
    }
    core.state.send_replace(ConnState::Closed);
}

/// Closes the client when the last clone goes.
struct Handle {
    core: Arc<Core>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.core.close();
    }
}

/// A client of an srpc server. Clone it freely; clones share the connection
/// and its reconnects.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.core.addr)
            .field("state", &*self.inner.core.state.borrow())
            .finish()
    }
}

impl Client {
    /// Connects with default settings; the server name is the host in `addr`.
    pub async fn connect(
        addr: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Client, ClientError> {
        ClientBuilder::new(tls).connect(addr).await
    }

    /// Starts a builder; see [`ClientBuilder`].
    pub fn builder(tls: Arc<rustls::ClientConfig>) -> ClientBuilder {
        ClientBuilder::new(tls)
    }

    fn core(&self) -> &Core {
        &self.inner.core
    }

    /// Calls `method` with `args` and decodes the reply as `R`, waiting at
    /// most the client's default timeout.
    pub async fn call<A, R>(&self, method: &str, args: &A) -> Result<R, ClientError>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned + 'static,
    {
        self.call_with_timeout(method, args, self.core().timeout)
            .await
    }

    /// Like [`call`](Client::call) with its own timeout, which covers waiting
    /// for a connection too and travels to the server as the call's deadline.
    pub async fn call_with_timeout<A, R>(
        &self,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R, ClientError>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned + 'static,
    {
        let encode = || {
            codec::encode(args, self.core().config.max_frame).map_err(|source| {
                ClientError::Encode {
                    method: method.to_owned(),
                    source,
                }
            })
        };
        // Encoded again for a second attempt rather than cloned for every
        // call: cloning the fresh buffer's `Bytes` allocates.
        let mut first = Some(encode()?);
        let deadline = Instant::now() + timeout;
        let reply = loop {
            let conn = self.ready_connection(deadline, timeout).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            let body = match first.take() {
                Some(body) => body,
                None => encode()?,
            };
            match conn.call(method, body, left).await {
                // The server refused the call unrun because it is draining,
                // or its GoAway arrived as we sent: safe to send again, on
                // the fresh connection the supervisor is making.
                Err(rpc_core::Error::GoAway { .. }) => continue,
                Err(rpc_core::Error::Status(s)) if s.code == rpc_core::StatusCode::ShuttingDown => {
                    debug!(method, "server draining; sending the call again");
                    conn.unusable().await;
                    continue;
                }
                other => break other?,
            }
        };
        let max_depth = self.core().config.max_depth;
        codec::decode_owned::<R>(&reply, reply.len(), max_depth).map_err(|source| {
            ClientError::Decode {
                method: method.to_owned(),
                expected: std::any::type_name::<R>(),
                source,
            }
        })
    }

    /// The current connection once usable, waiting for a reconnect until
    /// `deadline`.
    async fn ready_connection(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        let core = self.core();
        if let Some(conn) = core.current().as_ref().filter(|c| c.is_usable()) {
            return Ok(conn.clone());
        }
        // Boxed: its waits would otherwise make every call's future larger.
        Box::pin(self.wait_for_connection(deadline, timeout)).await
    }

    /// [`ready_connection`](Client::ready_connection) when there is none
    /// now: waits for the supervisor's next one.
    async fn wait_for_connection(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        let core = self.core();
        // Subscribed before looking again, so a change in between is seen.
        let mut states = core.state.subscribe();
        loop {
            if let Some(conn) = core.current().as_ref().filter(|c| c.is_usable()) {
                return Ok(conn.clone());
            }
            if core.closed.is_cancelled() {
                return Err(ClientError::Closed);
            }
            match tokio::time::timeout_at(deadline, states.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(ClientError::Closed),
                Err(_) => {
                    return Err(ClientError::Unavailable {
                        addr: core.addr.clone(),
                        waited: timeout,
                        last_error: core.last_error().clone(),
                    })
                }
            }
        }
    }

    /// Pings the server now and returns the round-trip time (waiting for a
    /// connection up to the default timeout). Pinging more often than
    /// [`heartbeat_interval`](Client::heartbeat_interval) gets a connection
    /// cut off by the server.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let timeout = self.core().timeout;
        let deadline = Instant::now() + timeout;
        let conn = self.ready_connection(deadline, timeout).await?;
        tokio::time::timeout_at(deadline, conn.ping())
            .await
            .map_err(|_| ClientError::Call(rpc_core::Error::DeadlineExceeded(timeout)))?
            .map_err(ClientError::Call)
    }

    /// The server's counters: connections, calls in flight and served, errors
    /// by kind, and each connection's heartbeat RTT (reserved method
    /// `srpc.stats`).
    pub async fn stats(&self) -> Result<rpc_core::stats::StatsSnapshot, ClientError> {
        self.call(rpc_core::stats::STATS_METHOD, &()).await
    }

    /// The server's services and methods, with argument and reply type
    /// names (reserved method `srpc.list`).
    pub async fn list(&self) -> Result<Vec<rpc_core::service::ServiceDescription>, ClientError> {
        self.call(rpc_core::service::LIST_METHOD, &()).await
    }

    /// The latest heartbeat round-trip time on the current connection.
    pub fn rtt(&self) -> Option<Duration> {
        self.core().current().as_ref().and_then(Connection::rtt)
    }

    /// The interval heartbeats go at: the larger of this side's and the
    /// server's announced one.
    pub fn heartbeat_interval(&self) -> Duration {
        self.core().current().as_ref().map_or(
            self.core().config.heartbeat_interval,
            Connection::heartbeat_interval,
        )
    }

    /// Watches the connection state; `changed().await` on it to wait.
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.core().state.subscribe()
    }

    /// The server's address, while connected.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.core().current().as_ref().map(Connection::peer_addr)
    }

    /// True once the client is closed.
    pub fn is_closed(&self) -> bool {
        *self.core().state.borrow() == ConnState::Closed
    }

    /// Closes the client for every clone: the connection closes, pending calls
    /// fail at once, and no reconnect follows.
    pub fn close(&self) {
        self.core().close();
    }

    /// Waits until the client is closed and its connection is gone.
    pub async fn closed(&self) {
        let mut states = self.state();
        let _ = states.wait_for(|s| *s == ConnState::Closed).await;
    }
}

impl rpc_core::service::Caller for Client {
    type Error = ClientError;

    fn call_method<A, R>(
        &self,
        method: &'static str,
        args: &A,
    ) -> impl std::future::Future<Output = Result<R, ClientError>> + Send
    where
        A: Serialize + Sync,
        R: DeserializeOwned + Send + 'static,
    {
        self.call(method, args)
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
        let core = Arc::new(Core {
            addr: "127.0.0.1:1".into(),
            server_name: ServerName::try_from("localhost").expect("a valid name"),
            connector: TlsConnector::from(Arc::new(tls)),
            config,
            timeout: Duration::from_secs(1),
            backoff: (Duration::from_millis(100), Duration::from_secs(1)),
            current: Mutex::new(None),
            last_error: Mutex::new(None),
            state,
            closed: CancellationToken::new(),
        });
        let first =
            connect_then_supervise(core.clone(), oneshot::channel().0, tracing::Span::none());
        let size = std::mem::size_of_val(&first);
        assert!(size <= 1024, "the first connection's task is {size} bytes");
        let task = supervise(core, (conn, Box::pin(driver)));
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
