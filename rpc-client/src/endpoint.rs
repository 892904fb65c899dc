//! An endpoint: one server address, the connection to it, and the task
//! that keeps that connection up (connect, supervise, reconnect with
//! backoff), with what the picker reads about it.
//!
//! ```text
//!  Endpoint ◄── supervisor task: connects at once, runs the connection's
//!   state         driver; when the connection ends reconnects, backing off
//!   load          Connecting → Ready → (GoAway) Draining → Connecting ...
//!   outlier                    └─ (lost) Connecting / BackingOff (100 ms
//!   calls                          doubling up to 10 s, full jitter)
//! ```
//!
//! - Only a `Ready` endpoint is picked: one that is reconnecting, backing
//!   off or whose server sent `GoAway` is never offered a call.
//! - The supervisor runs the current connection's driver, so a connection
//!   costs one task. After a `GoAway` the old driver moves to a task of its
//!   own to finish its calls while the supervisor reconnects.
//! - A removed endpoint (discovery dropped its address) is *retired*: it
//!   leaves the pick set, calls in flight on it finish, then it closes. A
//!   closed client closes every endpoint at once.
//! - A failed attempt or a `GoAway` asks discovery to look names up again
//!   soon ([`Pool::refresh`](crate::pool::Pool)).
//!
//! Not here: the set of endpoints and picking (`pool.rs`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use rpc_core::error::report;
use rpc_core::{transport, Connection};
use rustls::pki_types::ServerName;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::load::Load;
use crate::outlier::Outlier;
use crate::pool::Pool;
use crate::ClientError;

/// Failed reconnects in a row after which an endpoint logs a warning
/// (once per outage).
const OUTAGE_AFTER: u32 = 3;

/// How long a retired endpoint waits for its calls in flight to finish
/// before it closes anyway.
const RETIRE_GRACE: Duration = Duration::from_secs(60);

/// Where a connection (or, for the client as a whole, the best of its
/// endpoints) stands.
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
    /// The server sent `GoAway`: calls in flight finish there, new ones
    /// wait for the reconnect (or go to another endpoint).
    Draining,
}

impl ConnState {
    fn to_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(n: u8) -> ConnState {
        match n {
            0 => ConnState::Connecting,
            1 => ConnState::Ready,
            2 => ConnState::BackingOff,
            3 => ConnState::Closed,
            _ => ConnState::Draining,
        }
    }
}

/// One server address: its connection, the task that keeps it up, and
/// what the picker reads. Shared by the pool, the supervisor and the calls
/// made on it.
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    pub(crate) server_name: ServerName<'static>,
    state: AtomicU8,
    current: Mutex<Option<Connection>>,
    last_error: Mutex<Option<String>>,
    /// Fires when the client is closed or this endpoint retired (the
    /// pool's token's child).
    pub(crate) closed: CancellationToken,
    pub(crate) load: Load,
    pub(crate) outlier: Outlier,
    /// Calls answered here (successes and failures).
    pub(crate) calls: AtomicU64,
    /// What the server's health service last said (true without health
    /// checks): see [`watch_health`].
    pub(crate) serving: AtomicBool,
}

impl Endpoint {
    pub(crate) fn new(
        addr: SocketAddr,
        server_name: ServerName<'static>,
        closed: CancellationToken,
    ) -> Self {
        Endpoint {
            addr,
            server_name,
            state: AtomicU8::new(ConnState::Connecting.to_u8()),
            current: Mutex::new(None),
            last_error: Mutex::new(None),
            closed: closed.child_token(),
            load: Load::new(Instant::now()),
            outlier: Outlier::default(),
            calls: AtomicU64::new(0),
            serving: AtomicBool::new(true),
        }
    }

    pub(crate) fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == ConnState::Ready.to_u8()
    }

    fn set_state(&self, pool: &Pool, state: ConnState) {
        self.state.store(state.to_u8(), Ordering::Release);
        pool.update_state();
    }

    fn current(&self) -> MutexGuard<'_, Option<Connection>> {
        // Holds an Option only; a poisoned lock still holds a valid value.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current connection, if new calls may go out on it.
    pub(crate) fn usable_connection(&self) -> Option<Connection> {
        self.current().as_ref().filter(|c| c.is_usable()).cloned()
    }

    /// The current connection, usable or not.
    pub(crate) fn connection(&self) -> Option<Connection> {
        self.current().clone()
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_last_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Closes this endpoint's current connection now (the client is
    /// closing; the supervisor, which sees `closed`, then ends).
    pub(crate) fn close_now(&self) {
        if let Some(conn) = self.current().as_ref() {
            conn.close();
        }
    }

    /// One attempt: TCP, TLS, `Hello`. Returns the connection and its
    /// driver, which the caller runs.
    async fn connect_once(&self, pool: &Pool) -> Result<transport::Started, ClientError> {
        transport::connect(
            self.addr,
            self.server_name.clone(),
            &pool.settings.connector,
            &pool.settings.config,
        )
        .await
        .map_err(|source| ClientError::Connect {
            addr: self.addr.to_string(),
            source,
        })
    }
}

/// How long one `srpc.health.Watch` call waits for a change before it is
/// made again.
const WATCH_FOR: Duration = Duration::from_secs(30);

/// Client-side health checking (gRPC's A17): follows the health of
/// `service` (`""`: the whole server) on `conn` with `srpc.health.Watch`,
/// keeping `endpoint.serving` up to date, until the connection ends or
/// stops taking calls. A server without the health service counts as
/// serving; a service it does not know, as not serving.
async fn watch_health(
    endpoint: Arc<Endpoint>,
    conn: Connection,
    service: String,
    max_frame: usize,
) {
    use rpc_core::health::{HealthStatus, WATCH_METHOD};
    let mut seen: Option<HealthStatus> = None;
    // Ends with the connection: every call below fails at once then.
    while conn.is_usable() {
        let Ok(args) = rpc_core::codec::encode(&(&service, seen), max_frame) else {
            return;
        };
        match conn.call(WATCH_METHOD, args, WATCH_FOR).await {
            Ok(reply) => {
                let Ok(status) =
                    rpc_core::codec::decode_owned::<HealthStatus>(&reply, reply.len(), 8)
                else {
                    warn!(addr = %endpoint.addr, "health answer did not decode; counting the server as serving");
                    endpoint.serving.store(true, Ordering::Relaxed);
                    return;
                };
                if seen.is_some() || status != HealthStatus::Serving {
                    info!(addr = %endpoint.addr, service = %service, status = status.as_str(), "health changed");
                }
                endpoint
                    .serving
                    .store(status == HealthStatus::Serving, Ordering::Relaxed);
                seen = Some(status);
            }
            // No change within the wait: ask again.
            Err(rpc_core::Error::DeadlineExceeded(_)) => {}
            Err(rpc_core::Error::Status(s)) if s.code == rpc_core::StatusCode::UnknownMethod => {
                debug!(addr = %endpoint.addr, "no health service; counting the server as serving");
                endpoint.serving.store(true, Ordering::Relaxed);
                return;
            }
            Err(rpc_core::Error::Status(s)) => {
                // NotFound (an unknown service) or another refusal: not
                // serving, asked again after a pause.
                debug!(addr = %endpoint.addr, status = %s, "health check refused");
                endpoint.serving.store(false, Ordering::Relaxed);
                seen = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(_) => return,
        }
    }
}

/// Keeps `endpoint` connected until it is retired or the client closed:
/// the endpoint's one task. The first attempt runs in `span` (the caller
/// of `connect`'s).
pub(crate) async fn supervise(pool: Arc<Pool>, endpoint: Arc<Endpoint>, span: tracing::Span) {
    let mut backoff = Backoff::new(pool.settings.backoff.0, pool.settings.backoff.1);
    let mut failures: u32 = 0;
    let mut first = true;
    'outer: loop {
        // Connect, backing off after each failure.
        let (conn, mut driver) = loop {
            // Boxed: an attempt holds a TLS handshake in progress (a few
            // KiB), and this task lives as long as the endpoint.
            let attempt = Box::pin(tracing::Instrument::instrument(
                endpoint.connect_once(&pool),
                if first {
                    span.clone()
                } else {
                    tracing::Span::current()
                },
            ));
            let attempt = tokio::select! {
                r = attempt => r,
                _ = endpoint.closed.cancelled() => break 'outer,
            };
            match attempt {
                Ok(started) => break started,
                Err(e) => {
                    let wait = backoff.next_wait();
                    let text = report(&e);
                    failures += 1;
                    // One line per outage at each level: the first failure
                    // is news, a third in a row is an outage worth a
                    // warning (when no other endpoint is serving), the rest
                    // would only repeat them.
                    let alone = pool.ready_count() == 0;
                    match failures {
                        1 => {
                            info!(addr = %endpoint.addr, error = %text, ?wait, "connection attempt failed; retrying")
                        }
                        OUTAGE_AFTER if alone => {
                            warn!(addr = %endpoint.addr, error = %text, failures, "server unreachable; still retrying")
                        }
                        _ => {
                            debug!(addr = %endpoint.addr, error = %text, ?wait, "connection attempt failed")
                        }
                    }
                    endpoint.set_last_error(Some(text));
                    pool.first_failure(e);
                    endpoint.set_state(&pool, ConnState::BackingOff);
                    pool.refresh();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = endpoint.closed.cancelled() => break 'outer,
                    }
                    endpoint.set_state(&pool, ConnState::Connecting);
                }
            }
        };
        *endpoint.current() = Some(conn.clone());
        endpoint.set_last_error(None);
        // A new connection starts fresh: perhaps a new process, and the
        // failures and latency of the old one are not its own.
        endpoint.load.forget_latency();
        endpoint.outlier.reconnected();
        if let Some(service) = &pool.settings.health_check {
            // Not serving until the server says it is (A17).
            endpoint.serving.store(false, Ordering::Relaxed);
            tokio::spawn(watch_health(
                endpoint.clone(),
                conn.clone(),
                service.clone(),
                pool.settings.config.max_frame,
            ));
        }
        // A closed client, or a retired endpoint, that this connection came
        // up after: `close_now` missed it.
        if endpoint.closed.is_cancelled() {
            conn.close();
        }
        endpoint.set_state(&pool, ConnState::Ready);
        if !first {
            info!(addr = %endpoint.addr, failures, "reconnected");
        } else if failures > 0 {
            info!(addr = %endpoint.addr, failures, "connected");
        } else {
            debug!(addr = %endpoint.addr, "connected");
        }
        backoff.reset();
        failures = 0;
        first = false;
        // The driver runs in this poll, so a GoAway it reads, or its
        // starting to close, is seen right after, with no wake-up and no
        // lock (two atomic loads per poll).
        let done = {
            let retired = endpoint.closed.cancelled();
            tokio::pin!(retired);
            std::future::poll_fn(|cx| match driver.as_mut().poll(cx) {
                Poll::Ready(_) => Poll::Ready(true),
                Poll::Pending if conn.goaway_received() || conn.is_ending() => Poll::Ready(false),
                Poll::Pending if retired.as_mut().poll(cx).is_ready() => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            })
            .await
        };
        if endpoint.closed.is_cancelled() {
            if !pool.closed.is_cancelled() {
                // Retired: calls in flight finish first (bounded), then the
                // connection closes. Nothing new is sent here meanwhile:
                // the endpoint left the pick set before it was retired.
                endpoint.set_state(&pool, ConnState::Draining);
                let calls_done = async {
                    let mut waited = Duration::ZERO;
                    while conn.pending_calls() > 0 && waited < RETIRE_GRACE {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        waited += Duration::from_millis(20);
                    }
                };
                if !done {
                    tokio::select! {
                        _ = calls_done => {}
                        _ = &mut driver => {}
                    }
                }
                conn.close();
            } else {
                conn.close();
            }
            if !done {
                driver.await;
            }
            break 'outer;
        }
        let why = conn
            .close_reason()
            .unwrap_or_else(|| "peer sent GoAway".into());
        if done || conn.is_ending() {
            endpoint.set_state(&pool, ConnState::Connecting);
        } else {
            endpoint.set_state(&pool, ConnState::Draining);
        }
        if !done {
            // Calls in flight finish on the old connection (GoAway), or
            // its last frames go out (closing, bounded by its close
            // timeout), while the next connection is made.
            tokio::spawn(driver);
        }
        info!(addr = %endpoint.addr, reason = %why, "connection lost; reconnecting");
        pool.refresh();
    }
    let last = endpoint.current().take();
    if let Some(conn) = last {
        conn.close();
        conn.closed().await;
    }
    endpoint.set_state(&pool, ConnState::Closed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{Balance, Settings};
    use rpc_core::ConnectionConfig;
    use tokio_rustls::TlsConnector;

    #[tokio::test]
    async fn the_supervisor_task_stays_small() {
        // Every endpoint keeps this task for its whole life; a reconnect
        // attempt held inline made it 4,808 bytes.
        let tls = rustls::ClientConfig::builder_with_provider(rpc_core::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let pool = Pool::new(
            "127.0.0.1:1".into(),
            Settings {
                connector: TlsConnector::from(Arc::new(tls)),
                config: ConnectionConfig::default(),
                backoff: (Duration::from_millis(100), Duration::from_secs(1)),
                server_name: None,
                balance: Balance::default(),
                outlier: crate::outlier::OutlierSettings::default(),
                health_check: None,
            },
        );
        let endpoint = Arc::new(Endpoint::new(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            ServerName::try_from("localhost").expect("a valid name"),
            pool.closed.clone(),
        ));
        let task = supervise(pool, endpoint, tracing::Span::none());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "the supervisor task is {size} bytes");
    }
}
