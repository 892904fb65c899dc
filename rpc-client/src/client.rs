//! The client: typed and untyped calls over the pool's servers, with
//! per-call options, fail-fast and failover.
//!
//! ```text
//! Client (clone freely) ──call──► pool.pick ──► endpoint's Connection ──► server
//!   defaults: timeout,            (pool.rs, endpoint.rs: servers, picking,
//!   metadata, wait_for_ready       reconnects)
//! ```
//!
//! - Every clone shares the connections, so thousands of concurrent calls
//!   go out over one TLS session per server and each waits for its own
//!   reply. Calls beyond a server's announced in-flight limit wait for a
//!   slot.
//! - **Fail fast** (gRPC's default): a call made while no server is ready
//!   and every last attempt failed gets [`ClientError::Unavailable`] at
//!   once, naming that error. A call made while an attempt is under way
//!   waits for it. With wait-for-ready (per call in [`CallOptions`], or
//!   per client) a call waits for a server instead, up to its own timeout.
//! - A call that never ran (refused unrun by a draining server, crossed by
//!   a `GoAway`, above a `Drain`'s `last_id`, or never queued) goes out
//!   again, elsewhere when it can, within its deadline. A call the server
//!   may have run is sent again only if it is idempotent (`#[idempotent]`,
//!   or [`CallOptions::idempotent`]), at most 3 attempts in all, within
//!   its deadline and the client's retry budget (`retry.rs`); otherwise it
//!   fails with [`ClientError::OutcomeUnknown`].
//!
//! Not here: a client's settings (`builder.rs`); the servers and picking
//! (`pool.rs`); connecting and reconnecting (`endpoint.rs`).

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rpc_core::health::{HealthStatus, CHECK_METHOD, WATCH_METHOD};
use rpc_core::{codec, CallOptions, Connection, Metadata};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::builder::{ClientBuilder, DEFAULT_TIMEOUT};
use crate::discovery::{self, Discover, Target};
use crate::endpoint::{ConnState, Endpoint};
use crate::metrics::CallMetrics;
use crate::pool::{counts_against_server, EndpointStatus, Picked, Pool};
use crate::retry::RetryPolicy;
use crate::ClientError;

/// Times a call that no server ran is sent again (within its deadline).
const MAX_UNSENT: u32 = 8;

/// Making a client: its pool, from a list of servers or a discovery source.
impl ClientBuilder {
    fn client(&self, pool: Arc<Pool>) -> Client {
        let defaults = CallOptions::new()
            .timeout(self.timeout)
            .metadata(self.metadata.clone())
            .wait_for_ready(self.wait_for_ready);
        Client::new(pool, defaults, self.retry.policy(), self.metrics)
    }

    /// Connects to the servers at `addr`: one `host:port`, or several
    /// separated by commas. A name that resolves to several addresses
    /// gives a server per address; names are looked up again as their DNS
    /// answers expire (see `discovery.rs`). Completes the TLS handshake
    /// and `Hello` with at least one server, and fails at once if none
    /// can be reached (naming why).
    pub async fn connect(self, addr: &str) -> Result<Client, ClientError> {
        self.config
            .validate()
            .map_err(|source| ClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let targets = addr
            .split(',')
            .filter(|item| !item.trim().is_empty())
            .map(|item| {
                Target::parse(item).ok_or_else(|| ClientError::Resolve {
                    addr: item.trim().to_owned(),
                    reason: "expected host:port".into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err(ClientError::Resolve {
                addr: addr.to_owned(),
                reason: "expected host:port".into(),
            });
        }
        let lookup = discovery::system_lookup();
        let (first, next) = discovery::resolve_all(&targets, lookup.as_ref())
            .await
            .map_err(|(addr, reason)| ClientError::Resolve { addr, reason })?;
        let pool = Pool::new(addr.to_owned(), self.settings()?);
        // Dropped (closing every connection) if this future is.
        let client = self.client(pool.clone());
        // The first connections are made in the tasks that then supervise
        // them, so each handshake runs on the runtime worker that sees its
        // socket events (and, for a caller in `block_on`, not handed from a
        // worker to its thread at each step); they run in this span.
        for (addr, name) in &first {
            pool.insert(*addr, name, tracing::Span::current())?;
        }
        if targets.iter().any(|t| t.ip().is_none()) {
            let (changes, source) = discovery::channel();
            tokio::spawn(discovery::keep_resolved(
                targets,
                lookup,
                first,
                next,
                changes,
                pool.refresh_signal(),
                pool.closed.clone(),
            ));
            pool.follow(source);
        }
        let mut states = pool.subscribe();
        let state = states
            .wait_for(|s| matches!(s, ConnState::Ready | ConnState::BackingOff))
            .await
            .map(|s| *s);
        match state {
            Ok(ConnState::Ready) => Ok(client),
            _ => Err(pool.take_first_failure().unwrap_or(ClientError::Closed)),
        }
    }

    /// A client over the servers `source` names (see
    /// [`discovery`](crate::discovery)): each [`Change::Insert`](crate::discovery::Change::Insert) is
    /// connected at once, each `Remove` drained. Returns at once (within a
    /// Tokio runtime); calls made before a server is ready wait for one
    /// within their timeout.
    pub fn discover(self, source: impl Discover) -> Result<Client, ClientError> {
        self.config
            .validate()
            .map_err(|source| ClientError::Connect {
                addr: "(discovered)".to_owned(),
                source,
            })?;
        let pool = Pool::new("(discovered servers)".to_owned(), self.settings()?);
        let client = self.client(pool.clone());
        pool.follow(source);
        Ok(client)
    }
}

/// A client of one or several srpc servers. Clone it freely; clones share
/// the connections, their reconnects and the retry budget.
#[derive(Clone)]
pub struct Client {
    owner: Arc<Owner>,
    /// The client's defaults, every field set.
    pub(crate) defaults: Arc<CallOptions>,
    /// When idempotent calls are sent again, and the budget they share.
    retry: Arc<RetryPolicy>,
    /// Call metrics, when the builder asked for them.
    metrics: Option<Arc<CallMetrics>>,
}

/// Owns the pool for the clients: closes it when the last clone goes.
struct Owner {
    pool: Arc<Pool>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.pool.close();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("target", &self.pool().target)
            .field("state", &self.pool().state())
            .finish()
    }
}

impl Client {
    /// A client over `pool`, which it closes when its last clone goes.
    pub(crate) fn new(
        pool: Arc<Pool>,
        defaults: CallOptions,
        retry: RetryPolicy,
        metrics: bool,
    ) -> Client {
        if metrics {
            crate::metrics::sample(pool.clone());
        }
        Client {
            owner: Arc::new(Owner { pool }),
            defaults: Arc::new(defaults),
            retry: Arc::new(retry),
            metrics: metrics.then(Arc::default),
        }
    }

    /// `result` of a call to `method` with `timeout` that ends at
    /// `deadline`, recorded when metrics are on.
    fn observed<T>(
        &self,
        method: &str,
        deadline: Instant,
        timeout: Duration,
        result: Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        if let Some(metrics) = &self.metrics {
            let left = deadline.saturating_duration_since(Instant::now());
            metrics.record(method, timeout.saturating_sub(left), &result);
        }
        result
    }

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

    pub(crate) fn pool(&self) -> &Pool {
        &self.owner.pool
    }

    fn default_timeout(&self) -> Duration {
        self.defaults.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// Calls `method` with `args` and decodes the reply as `R`, with the
    /// client's defaults (timeout, metadata, fail-fast).
    pub fn call<'a, A, R>(
        &'a self,
        method: &'a str,
        args: &'a A,
    ) -> impl Future<Output = Result<R, ClientError>> + 'a
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned + 'static,
    {
        // Each method here returns `call_as`'s future itself rather than
        // one wrapped around it: a call's future is moved whole (boxed,
        // spawned), so every layer and every byte of it costs.
        self.call_with_timeout(method, args, self.default_timeout())
    }

    /// Like [`call`](Client::call) with its own timeout, which covers waiting
    /// for a connection too and travels to the server as the call's deadline.
    pub fn call_with_timeout<'a, A, R>(
        &'a self,
        method: &'a str,
        args: &'a A,
        timeout: Duration,
    ) -> impl Future<Output = Result<R, ClientError>> + 'a
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned + 'static,
    {
        let wait_for_ready = self.defaults.wait_for_ready.unwrap_or(false);
        let metadata = Cow::Borrowed(&self.defaults.metadata);
        self.call_as(method, args, timeout, wait_for_ready, metadata, false)
    }

    /// Like [`call`](Client::call) under `options`: its own timeout,
    /// metadata (added to the client's; a call's entry wins on the same
    /// key), wait-for-ready, and whether it is idempotent (then retried
    /// after a failure that leaves its outcome unknown; see `retry.rs`);
    /// unset fields take the client's defaults.
    pub fn call_with<'a, A, R>(
        &'a self,
        method: &'a str,
        args: &'a A,
        options: &'a CallOptions,
    ) -> impl Future<Output = Result<R, ClientError>> + 'a
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned + 'static,
    {
        let defaults = &*self.defaults;
        let timeout = options.timeout.unwrap_or_else(|| self.default_timeout());
        let wait_for_ready = options
            .wait_for_ready
            .or(defaults.wait_for_ready)
            .unwrap_or(false);
        let metadata = match (options.metadata.is_empty(), defaults.metadata.is_empty()) {
            (true, _) => Cow::Borrowed(&defaults.metadata),
            (false, true) => Cow::Borrowed(&options.metadata),
            (false, false) => Cow::Owned(options.or(defaults).metadata),
        };
        let idempotent = options.idempotent.unwrap_or(false);
        self.call_as(method, args, timeout, wait_for_ready, metadata, idempotent)
    }

    /// A call: encode, pick a server and its connection (or fail fast),
    /// send, decode; sent again where that is safe.
    async fn call_as<A, R>(
        &self,
        method: &str,
        args: &A,
        timeout: Duration,
        wait_for_ready: bool,
        metadata: Cow<'_, Metadata>,
        idempotent: bool,
    ) -> Result<R, ClientError>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned + 'static,
    {
        // Few locals live across the call's await, and no closure holding
        // copies of the arguments: the benchmark boxes each call's future,
        // and past 1,032 bytes glibc's malloc leaves its per-thread cache
        // (tests/examples/future_size; bench/RESULTS.md).
        if idempotent {
            self.retry.deposit();
        }
        // The caller's trace goes with the call.
        #[cfg(feature = "otel")]
        let metadata = rpc_core::trace_context::with_current(metadata);
        let mut attempt = 1;
        let mut unsent = 0;
        // Encoded again for a second attempt rather than cloned for every
        // call: cloning the fresh buffer's `Bytes` allocates.
        let mut first = Some(self.encode(method, args)?);
        let deadline = Instant::now() + timeout;
        // Where the last attempt failed: the next goes elsewhere if it can.
        let mut avoid: Option<Arc<Endpoint>> = None;
        let reply = loop {
            let mut picked = match self
                .ready_connection(avoid.as_deref(), deadline, timeout, wait_for_ready)
                .await
            {
                Ok(picked) => picked,
                Err(e) => {
                    // Boxed, as every rare wait in a call's future.
                    if idempotent && Box::pin(self.retry.again(&mut attempt, &e, deadline)).await {
                        continue;
                    }
                    return self.observed(method, deadline, timeout, Err(e));
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let body = match first.take() {
                Some(body) => body,
                None => self.encode(method, args)?,
            };
            // Cloning empty metadata (the common call) copies nothing.
            let sent = picked
                .conn
                .call_with_metadata(method, body, left, metadata.as_ref().clone())
                .await;
            self.pool()
                .finished(&mut picked, counts_against_server(&sent));
            match sent {
                Ok(reply) => break reply,
                // Never reached a handler: the server refused it unrun
                // (draining), its GoAway crossed the request, or the
                // connection ended before the request was queued. Safe to
                // send again, elsewhere if there is an elsewhere, within the
                // deadline (and a bound, against a loop).
                Err(e @ (rpc_core::Error::GoAway { .. } | rpc_core::Error::NotSent { .. }))
                    if unsent < MAX_UNSENT =>
                {
                    debug!(method, error = %e, "call not run; sending it again");
                    unsent += 1;
                    avoid = Some(picked.endpoint.clone());
                }
                Err(rpc_core::Error::Status(s))
                    if s.code == rpc_core::StatusCode::ShuttingDown && unsent < MAX_UNSENT =>
                {
                    debug!(method, "server draining; sending the call again");
                    unsent += 1;
                    if !self.pool().has_alternative(&picked.endpoint) {
                        // Its GoAway follows at once; then the endpoint
                        // reconnects.
                        // Boxed, as every rare wait in a call's future.
                        let wait = tokio::time::timeout_at(deadline, picked.conn.unusable());
                        let _ = Box::pin(wait).await;
                    }
                    avoid = Some(picked.endpoint.clone());
                }
                Err(e) => {
                    let e = ClientError::Call(e);
                    if idempotent && Box::pin(self.retry.again(&mut attempt, &e, deadline)).await {
                        avoid = Some(picked.endpoint.clone());
                        continue;
                    }
                    return self.observed(method, deadline, timeout, Err(e.sent(method)));
                }
            }
        };
        let max_depth = self.pool().settings.config.max_depth;
        let decoded = codec::decode_owned::<R>(&reply, reply.len(), max_depth).map_err(|source| {
            ClientError::Decode {
                method: method.to_owned(),
                expected: std::any::type_name::<R>(),
                source,
            }
        });
        self.observed(method, deadline, timeout, decoded)
    }

    /// A call's arguments, encoded.
    pub(crate) fn encode<A: Serialize + ?Sized>(
        &self,
        method: &str,
        args: &A,
    ) -> Result<Bytes, ClientError> {
        let max_frame = self.pool().settings.config.max_frame;
        codec::encode(args, max_frame).map_err(|source| ClientError::Encode {
            method: method.to_owned(),
            source,
        })
    }

    /// A server and its connection for a call, avoiding `avoid` if another
    /// is ready. With none ready: fails at once if every server's last
    /// attempt failed (unless `wait_for_ready`), and otherwise waits for
    /// one until `deadline`.
    pub(crate) async fn ready_connection(
        &self,
        avoid: Option<&Endpoint>,
        deadline: Instant,
        timeout: Duration,
        wait_for_ready: bool,
    ) -> Result<Picked, ClientError> {
        if let Some(picked) = self.pool().pick(avoid) {
            return Ok(picked);
        }
        // Boxed: its waits would otherwise make every call's future larger.
        Box::pin(self.wait_for_connection(deadline, timeout, wait_for_ready)).await
    }

    /// [`ready_connection`](Client::ready_connection) when there is none
    /// now.
    async fn wait_for_connection(
        &self,
        deadline: Instant,
        timeout: Duration,
        wait_for_ready: bool,
    ) -> Result<Picked, ClientError> {
        let pool = self.pool();
        let started = Instant::now();
        let unavailable = |waited| ClientError::Unavailable {
            addr: pool.target.clone(),
            waited,
            last_error: pool.last_error(),
        };
        // Subscribed before looking again, so a change in between is seen.
        let mut states = pool.subscribe();
        loop {
            if let Some(picked) = pool.pick(None) {
                return Ok(picked);
            }
            if pool.closed.is_cancelled() {
                return Err(ClientError::Closed);
            }
            // Every server's last attempt failed and each is waiting to try
            // again: fail fast rather than wait out the deadline.
            if !wait_for_ready && *states.borrow_and_update() == ConnState::BackingOff {
                let error = unavailable(started.elapsed());
                // A caller that retries in a loop would never yield
                // otherwise, and could starve the tasks that reconnect.
                tokio::task::consume_budget().await;
                return Err(error);
            }
            match tokio::time::timeout_at(deadline, states.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(ClientError::Closed),
                Err(_) => return Err(unavailable(timeout)),
            }
        }
    }

    /// Pings the server now and returns the round-trip time (waiting for a
    /// connection up to the default timeout). Pinging more often than
    /// [`heartbeat_interval`](Client::heartbeat_interval) gets a connection
    /// cut off by the server.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let timeout = self.default_timeout();
        let deadline = Instant::now() + timeout;
        let wait_for_ready = self.defaults.wait_for_ready.unwrap_or(false);
        let picked = self
            .ready_connection(None, deadline, timeout, wait_for_ready)
            .await?;
        tokio::time::timeout_at(deadline, picked.conn.ping())
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

    /// The server's health (`service` `""`) or one service's, as its
    /// health service reports it (reserved method `srpc.health.Check`): a
    /// draining server answers `NotServing`; an unknown service is a
    /// `NotFound` status.
    pub async fn health(&self, service: &str) -> Result<HealthStatus, ClientError> {
        self.call(CHECK_METHOD, service).await
    }

    /// Waits until `service`'s health differs from `seen` (answers at
    /// once without one), within the client's timeout (reserved method
    /// `srpc.health.Watch`).
    pub async fn watch_health(
        &self,
        service: &str,
        seen: Option<HealthStatus>,
    ) -> Result<HealthStatus, ClientError> {
        self.call(WATCH_METHOD, &(service, seen)).await
    }

    /// The server's services and methods, with argument and reply type
    /// names (reserved method `srpc.list`).
    pub async fn list(&self) -> Result<Vec<rpc_core::service::ServiceDescription>, ClientError> {
        self.call(rpc_core::service::LIST_METHOD, &()).await
    }

    /// The latest heartbeat round-trip time (to one of the servers, when
    /// there are several).
    pub fn rtt(&self) -> Option<Duration> {
        self.pool()
            .any_connection()
            .as_ref()
            .and_then(Connection::rtt)
    }

    /// The interval heartbeats go at: the larger of this side's and the
    /// server's announced one.
    pub fn heartbeat_interval(&self) -> Duration {
        self.pool().any_connection().as_ref().map_or(
            self.pool().settings.config.heartbeat_interval,
            Connection::heartbeat_interval,
        )
    }

    /// Watches the client's state: `Ready` while any server is,
    /// `Connecting` while an attempt is under way, `BackingOff` when every
    /// server's last attempt failed. `changed().await` on it to wait.
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.pool().subscribe()
    }

    /// Each server's address, state and calls.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.pool().statuses()
    }

    /// The server's address, while connected (one of them, when there
    /// are several).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.pool()
            .any_connection()
            .as_ref()
            .map(Connection::peer_addr)
    }

    /// True once the client is closed.
    pub fn is_closed(&self) -> bool {
        self.pool().state() == ConnState::Closed
    }

    /// Closes the client for every clone: the connections close, pending
    /// calls fail at once, and no reconnect follows.
    pub fn close(&self) {
        self.pool().close();
    }

    /// Waits until the client is closed and its connections are gone.
    pub async fn closed(&self) {
        let mut states = self.state();
        let _ = states.wait_for(|s| *s == ConnState::Closed).await;
    }
}

impl rpc_core::service::Caller for Client {
    type Error = ClientError;

    fn call_method<'a, A, R>(
        &'a self,
        method: &'static str,
        args: &'a A,
        options: &'a CallOptions,
    ) -> impl Future<Output = Result<R, ClientError>> + Send + 'a
    where
        A: Serialize + Sync,
        R: DeserializeOwned + Send + 'static,
    {
        self.call_with(method, args, options)
    }
}
