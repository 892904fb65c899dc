//! The pool: a client's endpoints, the client's state drawn from theirs,
//! and the picker.
//!
//! ```text
//!  discovery ──Insert/Remove──► endpoints (copy-on-write list; a call
//!                                 reads it with one atomic load)
//!  call ──pick──► healthy: Ready, not ejected, serving (with health checks)
//!                   ├─ none? panic mode: Ready, ejected or not
//!                   └─ power of two choices on Peak-EWMA × (in flight + 1)
//!                      (or round robin)
//!  call ends ──► latency, in flight, failures in a row → ejection
//! ```
//!
//! - One endpoint (the common case) is not picked at all: its connection
//!   is used as it is, nothing is measured, and a call costs what it did
//!   before there were pools.
//! - The client's state is the best of its endpoints': `Ready` when any
//!   is, `Connecting` while any attempt is under way, `BackingOff` when
//!   every endpoint's last attempt failed (calls then fail fast).
//!
//! Not here: one endpoint's connection (`endpoint.rs`); discovery
//! (`discovery.rs`); the call loop and its retries (`client.rs`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use rpc_core::{Connection, ConnectionConfig};
use rustls::pki_types::ServerName;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::discovery::{Change, Discover};
use crate::endpoint::{supervise, ConnState, Endpoint};
use crate::outlier::OutlierSettings;
use crate::ClientError;

/// How a client spreads calls over its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Balance {
    /// Power of two choices: of two endpoints drawn at random, the one with
    /// the lower Peak-EWMA latency × (calls in flight + 1). Steers away from
    /// slow and stalled servers within a call or two (the default).
    #[default]
    PeakEwma,
    /// Each ready endpoint in turn, whatever its latency.
    RoundRobin,
}

/// What every endpoint of a client shares.
pub(crate) struct Settings {
    pub(crate) connector: TlsConnector,
    pub(crate) config: ConnectionConfig,
    pub(crate) backoff: (Duration, Duration),
    /// The name every server's certificate must be valid for, when the
    /// builder set one; otherwise each endpoint's own.
    pub(crate) server_name: Option<ServerName<'static>>,
    pub(crate) balance: Balance,
    pub(crate) outlier: OutlierSettings,
    /// The service whose health decides whether a server gets calls
    /// (`ClientBuilder::health_check`), if any.
    pub(crate) health_check: Option<String>,
}

/// A picked endpoint and its connection.
pub(crate) struct Picked {
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) conn: Connection,
    /// When it was picked, if the call's latency and outcome are recorded
    /// (several endpoints); while set, the call counts in flight there
    /// (and dropping this uncounts it: the caller gave up).
    started: Option<Instant>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        if self.started.is_some() {
            self.endpoint.load.abandon();
        }
    }
}

/// What [`Client::endpoints`](crate::Client::endpoints) reports of one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The server's address.
    pub addr: SocketAddr,
    /// Where its connection stands.
    pub state: ConnState,
    /// Calls answered there (replies and failures) since it was added.
    pub calls: u64,
    /// Calls in flight there now, when several endpoints are measured.
    pub in_flight: u32,
    /// The picker's latency estimate (Peak-EWMA), once a call has been
    /// measured there with several endpoints.
    pub latency: Option<Duration>,
    /// Whether outlier ejection has taken it out of the pick set for now.
    pub ejected: bool,
    /// What its health service last said, with health checks on
    /// (`ClientBuilder::health_check`); always true without them.
    pub serving: bool,
    /// Why its last connection attempt failed, while it is failing.
    pub last_error: Option<String>,
}

/// A client's endpoints; see the module docs.
pub(crate) struct Pool {
    /// What the client was given, for errors ("a:7443,b:7443").
    pub(crate) target: String,
    pub(crate) settings: Settings,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Serialises changes to the list, and ejections.
    edit: Mutex<()>,
    state: watch::Sender<ConnState>,
    /// The first failed connection attempt, for `connect` to report.
    first_failure: Mutex<Option<ClientError>>,
    /// Wakes discovery to look names up again soon.
    refresh: Arc<Notify>,
    /// Fires when the client is closed.
    pub(crate) closed: CancellationToken,
    turn: AtomicUsize,
}

impl Pool {
    pub(crate) fn new(target: String, settings: Settings) -> Arc<Pool> {
        Arc::new(Pool {
            target,
            settings,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            edit: Mutex::new(()),
            state: watch::channel(ConnState::Connecting).0,
            first_failure: Mutex::new(None),
            refresh: Arc::new(Notify::new()),
            closed: CancellationToken::new(),
            turn: AtomicUsize::new(0),
        })
    }

    fn edit(&self) -> std::sync::MutexGuard<'_, ()> {
        self.edit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The notify discovery listens to.
    pub(crate) fn refresh_signal(&self) -> Arc<Notify> {
        self.refresh.clone()
    }

    /// Asks discovery to look names up again soon (a connection failed,
    /// or a server sent `GoAway`).
    pub(crate) fn refresh(&self) {
        self.refresh.notify_one();
    }

    /// Adds an endpoint for `addr` (nothing if there is one) and starts
    /// connecting it at once.
    pub(crate) fn insert(
        self: &Arc<Self>,
        addr: SocketAddr,
        server_name: &str,
        span: tracing::Span,
    ) -> Result<(), ClientError> {
        let name = match &self.settings.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(server_name.to_owned())
                .map_err(|_| ClientError::ServerName(server_name.to_owned()))?,
        };
        let endpoint = {
            let _edit = self.edit();
            if self.closed.is_cancelled() {
                return Ok(());
            }
            let current = self.endpoints.load();
            if current.iter().any(|e| e.addr == addr) {
                return Ok(());
            }
            let endpoint = Arc::new(Endpoint::new(addr, name, self.closed.clone()));
            let mut next = Vec::with_capacity(current.len() + 1);
            next.extend(current.iter().cloned());
            next.push(endpoint.clone());
            self.endpoints.store(Arc::new(next));
            endpoint
        };
        debug!(%addr, "endpoint added");
        tokio::spawn(supervise(self.clone(), endpoint, span));
        self.update_state();
        Ok(())
    }

    /// Takes the endpoint for `addr` out of the pick set; calls in flight
    /// there finish, then its connection closes (`endpoint.rs`).
    pub(crate) fn remove(&self, addr: SocketAddr) {
        let removed = {
            let _edit = self.edit();
            let current = self.endpoints.load();
            let Some(i) = current.iter().position(|e| e.addr == addr) else {
                return;
            };
            let mut next: Vec<_> = current.iter().cloned().collect();
            let removed = next.remove(i);
            self.endpoints.store(Arc::new(next));
            removed
        };
        info!(%addr, "endpoint removed; draining it");
        removed.closed.cancel();
        self.update_state();
    }

    /// Applies one change from discovery.
    pub(crate) fn apply(self: &Arc<Self>, change: Change) {
        match change {
            Change::Insert { addr, server_name } => {
                if let Err(e) = self.insert(addr, &server_name, tracing::Span::none()) {
                    warn!(%addr, error = %e, "discovered endpoint not added");
                }
            }
            Change::Remove(addr) => self.remove(addr),
        }
    }

    /// Applies `source`'s changes until it ends or the client closes.
    pub(crate) fn follow(self: &Arc<Self>, mut source: impl Discover) {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    change = source.next() => change,
                    _ = pool.closed.cancelled() => return,
                };
                match change {
                    Some(change) => pool.apply(change),
                    None => return,
                }
            }
        });
    }

    /// Closes every endpoint now.
    pub(crate) fn close(&self) {
        {
            // Under the lock, so an endpoint being added sees it.
            let _edit = self.edit();
            self.closed.cancel();
        }
        for endpoint in self.endpoints.load().iter() {
            endpoint.close_now();
        }
        self.update_state();
    }

    /// Recomputes the client's state from its endpoints'.
    pub(crate) fn update_state(&self) {
        let endpoints = self.endpoints.load();
        let states = || endpoints.iter().map(|e| e.state());
        let state = if self.closed.is_cancelled() {
            if states().all(|s| s == ConnState::Closed) {
                ConnState::Closed
            } else {
                return;
            }
        } else if states().any(|s| s == ConnState::Ready) {
            ConnState::Ready
        } else if endpoints.is_empty()
            || states().any(|s| matches!(s, ConnState::Connecting | ConnState::Draining))
        {
            ConnState::Connecting
        } else {
            ConnState::BackingOff
        };
        self.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }

    /// Watches the client's state.
    pub(crate) fn subscribe(&self) -> watch::Receiver<ConnState> {
        self.state.subscribe()
    }

    pub(crate) fn state(&self) -> ConnState {
        *self.state.borrow()
    }

    /// Endpoints ready now.
    pub(crate) fn ready_count(&self) -> usize {
        self.endpoints
            .load()
            .iter()
            .filter(|e| e.is_ready())
            .count()
    }

    /// Keeps the first failed connection attempt for `connect` to report.
    pub(crate) fn first_failure(&self, error: ClientError) {
        let mut first = self.first_failure.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(error);
        }
    }

    pub(crate) fn take_first_failure(&self) -> Option<ClientError> {
        self.first_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Why an endpoint's last connection attempt failed, if one is failing
    /// (with its address when there are several).
    pub(crate) fn last_error(&self) -> Option<String> {
        let endpoints = self.endpoints.load();
        let several = endpoints.len() > 1;
        endpoints.iter().find_map(|e| {
            e.last_error().map(|text| {
                if several && !text.contains(&e.addr.to_string()) {
                    format!("{}: {text}", e.addr)
                } else {
                    text
                }
            })
        })
    }

    /// Each endpoint's address, calls in flight and connection (if any),
    /// for the sampled metrics.
    pub(crate) fn connections(&self) -> Vec<(SocketAddr, u32, Option<Connection>)> {
        self.endpoints
            .load()
            .iter()
            .map(|e| (e.addr, e.load.in_flight(), e.connection()))
            .collect()
    }

    /// Every endpoint's status.
    pub(crate) fn statuses(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.endpoints
            .load()
            .iter()
            .map(|e| EndpointStatus {
                addr: e.addr,
                state: e.state(),
                calls: e.calls.load(Ordering::Relaxed),
                in_flight: e.load.in_flight(),
                latency: e.load.latency(now),
                ejected: e.outlier.is_ejected(now),
                serving: e.serving.load(Ordering::Relaxed),
                last_error: e.last_error(),
            })
            .collect()
    }

    /// Some connection, usable or not (for `rtt`, `peer_addr` and the
    /// like): the first ready endpoint's, else the first one's.
    pub(crate) fn any_connection(&self) -> Option<Connection> {
        let endpoints = self.endpoints.load();
        endpoints
            .iter()
            .find(|e| e.is_ready())
            .or_else(|| endpoints.first())
            .and_then(|e| e.connection())
    }

    /// Whether an endpoint other than `than` is ready.
    pub(crate) fn has_alternative(&self, than: &Endpoint) -> bool {
        self.endpoints
            .load()
            .iter()
            .any(|e| !std::ptr::eq(&**e, than) && e.is_ready())
    }

    /// An endpoint for the next call, and its connection; `avoid` (where
    /// the call just failed) only when nothing else is ready. `None` when
    /// no endpoint is ready.
    pub(crate) fn pick(&self, avoid: Option<&Endpoint>) -> Option<Picked> {
        let endpoints = self.endpoints.load();
        if let [only] = endpoints.as_slice() {
            return only.usable_connection().map(|conn| Picked {
                endpoint: only.clone(),
                conn,
                started: None,
            });
        }
        let now = Instant::now();
        // A chosen endpoint whose connection just became unusable (a GoAway
        // read, a close) changes state right after; choose again.
        for _ in 0..endpoints.len() {
            let endpoint = self.choose(&endpoints, avoid, now)?;
            if let Some(conn) = endpoint.usable_connection() {
                endpoint.load.start();
                return Some(Picked {
                    endpoint: endpoint.clone(),
                    conn,
                    started: Some(now),
                });
            }
        }
        None
    }

    fn choose<'a>(
        &self,
        endpoints: &'a [Arc<Endpoint>],
        avoid: Option<&Endpoint>,
        now: Instant,
    ) -> Option<&'a Arc<Endpoint>> {
        let avoided = |e: &Endpoint| avoid.is_some_and(|a| std::ptr::eq(a, e));
        let healthy = |e: &Endpoint| {
            e.is_ready()
                && !avoided(e)
                && e.serving.load(Ordering::Relaxed)
                && !e.outlier.is_ejected(now)
        };
        if let Some(e) = self.among(endpoints, healthy, now) {
            return Some(e);
        }
        // Panic mode: every ready endpoint is ejected or not serving;
        // better one of them than no call at all.
        let ready = |e: &Endpoint| e.is_ready() && !avoided(e);
        if let Some(e) = self.among(endpoints, ready, now) {
            return Some(e);
        }
        endpoints.iter().find(|e| e.is_ready())
    }

    /// One of the endpoints `keep` accepts, by the balancing rule.
    fn among<'a>(
        &self,
        endpoints: &'a [Arc<Endpoint>],
        keep: impl Fn(&Endpoint) -> bool,
        now: Instant,
    ) -> Option<&'a Arc<Endpoint>> {
        let n = endpoints.iter().filter(|e| keep(e)).count();
        let nth = |i: usize| endpoints.iter().filter(|e| keep(e)).nth(i);
        match n {
            0 => None,
            1 => nth(0),
            _ => match self.settings.balance {
                Balance::RoundRobin => nth(self.turn.fetch_add(1, Ordering::Relaxed) % n),
                Balance::PeakEwma => {
                    let a = fastrand::usize(..n);
                    let mut b = fastrand::usize(..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (a, b) = (nth(a)?, nth(b)?);
                    let cost = |e: &Endpoint| {
                        e.load
                            .cost(now, || e.connection().as_ref().and_then(Connection::rtt))
                    };
                    Some(if cost(a) <= cost(b) { a } else { b })
                }
            },
        }
    }

    /// A call on `picked` ended; `failed`
    /// when it failed in a way that counts against the server (see
    /// `outlier.rs`).
    pub(crate) fn finished(&self, picked: &mut Picked, failed: bool) {
        let endpoint = &picked.endpoint;
        endpoint.calls.fetch_add(1, Ordering::Relaxed);
        let Some(started) = picked.started.take() else {
            return;
        };
        let now = Instant::now();
        endpoint
            .load
            .finish(now.saturating_duration_since(started), now);
        if !failed {
            endpoint.outlier.success();
        } else if endpoint.outlier.failure(&self.settings.outlier) {
            self.try_eject(endpoint, now);
        }
    }

    /// Ejects `endpoint` unless that would eject more than the share
    /// allowed.
    fn try_eject(&self, endpoint: &Endpoint, now: Instant) {
        let _edit = self.edit();
        let endpoints = self.endpoints.load();
        if endpoints.len() < 2 || endpoint.outlier.is_ejected(now) {
            return;
        }
        let ejected = endpoints
            .iter()
            .filter(|e| e.outlier.is_ejected(now))
            .count();
        let allowed = self.settings.outlier.max_ejected(endpoints.len());
        if ejected >= allowed {
            debug!(addr = %endpoint.addr, ejected, allowed, "not ejected: too many are already");
            return;
        }
        let length = endpoint.outlier.eject(&self.settings.outlier, now);
        warn!(
            addr = %endpoint.addr,
            failures = self.settings.outlier.consecutive,
            ejected_for = ?length,
            "endpoint ejected after failures in a row"
        );
    }
}

/// Whether a call's failure counts against the server it went to: the
/// server said it is unavailable or broken. (A lost connection is the
/// endpoint's state's business; see `outlier.rs`.)
pub(crate) fn counts_against_server(result: &Result<bytes::Bytes, rpc_core::Error>) -> bool {
    use rpc_core::{Error, StatusCode};
    match result {
        Err(Error::Status(s)) => matches!(
            s.code,
            StatusCode::Unavailable | StatusCode::Internal | StatusCode::DataLoss
        ),
        _ => false,
    }
}
