//! The accept loop: limits, per-connection tasks, graceful drain.
//!
//! ```text
//! TcpListener ──accept──► connection slot? ──no──► GoAway("server at connection
//!                              │yes                limit") after TLS, if one of
//!                              │                   64 refusal slots is free;
//!                              │                   else close at once
//!                              │yes
//!                              ▼
//!                 tracked task: ConnectionTask::run (TLS, Hello, driver)
//! shutdown future fires ─► stop accepting ─► drain every connection (GoAway,
//!     in-flight calls finish) ─► after `drain_timeout` close what is left
//! ```
//!
//! Accept errors (for example too many open files) are logged and retried
//! after a short pause instead of ending the server, as in mini-redis.
//!
//! Not here: what happens on one connection (see `connection_task.rs`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rpc_core::{Connection, ConnectionConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{debug, info, warn, Instrument};

/// Refusals (TLS handshake + GoAway) in progress at once when over the
/// connection limit; further excess connections are closed without a word.
pub const MAX_REFUSALS: usize = 64;

use crate::call::{Call, CallService};
use crate::connection_set::ConnectionSet;
use crate::connection_task::ConnectionTask;
use crate::layers::AuthorizeHook;
use crate::stack::{user_layer, ServerDispatch, UserLayer};
use crate::{Router, ServerError};
use rpc_core::stats::StatsSnapshot;

/// Server-wide limits, on top of the per-connection [`ConnectionConfig`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Per-connection limits and timers (frame size, handshake timeout,
    /// heartbeat, in-flight calls).
    pub connection: ConnectionConfig,
    /// Connections served at once; more are closed at once. Default 10 000.
    pub max_connections: usize,
    /// How long a shutdown waits for in-flight calls. Default 10 s.
    pub drain_timeout: Duration,
    /// TLS handshakes (and `Hello` exchanges) in progress at once; further
    /// connections wait for a slot, within the handshake timeout. Bounds
    /// the CPU that connection floods can take. Default 512.
    pub max_handshakes: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            connection: ConnectionConfig::default(),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(10),
            max_handshakes: 512,
        }
    }
}

/// Builds a [`Server`] from a TLS config, limits and methods.
pub struct ServerBuilder {
    tls: Arc<rustls::ServerConfig>,
    options: ServerOptions,
    router: Router,
    authorize: Option<AuthorizeHook>,
    layers: Vec<UserLayer>,
    metrics: bool,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("options", &self.options)
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// Starts from a TLS config (see `rpc_core::tls::server_config`) and the
    /// default limits.
    pub fn new(tls: Arc<rustls::ServerConfig>) -> Self {
        ServerBuilder {
            tls,
            options: ServerOptions::default(),
            router: Router::new(),
            authorize: None,
            layers: Vec::new(),
            metrics: false,
        }
    }

    /// Records every call's duration and outcome, and the calls in flight,
    /// with OpenTelemetry's names through the `metrics` facade, into
    /// whatever recorder the program installed (see [`crate::metrics`]).
    /// Off by default, and then free.
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Runs `hook` before every call, with the call's context (peer address,
    /// certificate identity, method, metadata). An `Err` refuses the call
    /// with that status, typically `Status::new(StatusCode::PermissionDenied,
    /// ...)`. Stats calls go through it too. It is the innermost layer of
    /// the stack, after any added with [`layer`](Self::layer); to run it
    /// earlier, add an [`AuthorizeLayer`](crate::AuthorizeLayer) there.
    pub fn authorize<F>(mut self, hook: F) -> Self
    where
        F: Fn(&rpc_core::CallContext) -> Result<(), rpc_core::Status> + Send + Sync + 'static,
    {
        self.authorize = Some(Arc::new(hook));
        self
    }

    /// Adds a [`tower::Layer`] to the stack every call goes through: its
    /// service gets each [`Call`] (context with method and metadata, and
    /// the encoded arguments) and answers with the encoded reply or an
    /// error, which becomes the call's status (see `stack.rs`: a `Status`
    /// as it is, tower's `Overloaded` and `Elapsed` by their meaning). The
    /// first layer added is the outermost. The service must be `Clone`; a
    /// layer whose service is not (tower's `RateLimit`) goes behind a
    /// `tower::buffer::BufferLayer`.
    ///
    /// ```no_run
    /// # fn f(tls: std::sync::Arc<rustls::ServerConfig>) {
    /// let server = rpc_server::Server::builder(tls)
    ///     .layer(tower::limit::ConcurrencyLimitLayer::new(64));
    /// # }
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<CallService> + Send + Sync + 'static,
        L::Service: tower::Service<Call, Response = bytes::Bytes> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<Call>>::Error: Into<tower::BoxError>,
        <L::Service as tower::Service<Call>>::Future: Send + 'static,
    {
        self.layers.push(user_layer(layer));
        self
    }

    /// Replaces all limits at once.
    pub fn options(mut self, options: ServerOptions) -> Self {
        self.options = options;
        self
    }

    /// Largest frame accepted, in bytes (default 4 MiB).
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.options.connection.max_frame = bytes;
        self
    }

    /// How deeply a call's arguments may nest before the call is refused
    /// with `InvalidArgument` (default 128; see
    /// [`ConnectionConfig::max_depth`]).
    pub fn max_depth(mut self, levels: usize) -> Self {
        self.options.connection.max_depth = levels;
        self
    }

    /// Connections served at once (default 10 000).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.options.max_connections = n;
        self
    }

    /// Calls handled at once per connection (default 100).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.options.connection.max_in_flight = n;
        self
    }

    /// Time allowed for a TLS handshake (default 10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.options.connection.handshake_timeout = timeout;
        self
    }

    /// Heartbeat interval announced to clients, and the dead-peer timeout
    /// (defaults 5 s and 15 s).
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.options.connection.heartbeat_interval = interval;
        self.options.connection.heartbeat_timeout = timeout;
        self
    }

    /// How long shutdown waits for in-flight calls (default 10 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.options.drain_timeout = timeout;
        self
    }

    /// Serves the methods of `router` (added to any registered before). A
    /// method name registered twice makes [`build`](Self::build) fail.
    pub fn router(mut self, router: Router) -> Self {
        self.router = self.router.merge(router);
        self
    }

    /// Serves a service generated by `#[service]`, e.g.
    /// `.add_service(CalculatorServer::new(MyCalculator))`. A method name
    /// registered twice (the same service added twice, say) makes
    /// [`build`](Self::build) fail.
    pub fn add_service<S: rpc_core::service::Service>(mut self, service: S) -> Self {
        self.router = self.router.service(service);
        self
    }

    /// Checks the limits and builds the server.
    pub fn build(self) -> Result<Server, ServerError> {
        self.options
            .connection
            .validate()
            .map_err(ServerError::Config)?;
        if self.options.max_connections == 0 || self.options.max_handshakes == 0 {
            return Err(ServerError::Config(rpc_core::Error::Config(
                "max connections and max handshakes must be at least 1".into(),
            )));
        }
        self.router.check().map_err(ServerError::Routes)?;
        Ok(Server {
            acceptor: Arc::new(RwLock::new(TlsAcceptor::from(self.tls))),
            options: self.options,
            dispatch: Arc::new(ServerDispatch::new(
                self.router,
                self.authorize,
                &self.layers,
                self.metrics,
            )),
        })
    }
}

/// A configured server, ready to [`serve`](Server::serve) a listener.
#[derive(Clone)]
pub struct Server {
    /// Swapped whole by a reload; each new connection takes the current one.
    acceptor: Arc<RwLock<TlsAcceptor>>,
    options: ServerOptions,
    dispatch: Arc<ServerDispatch>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("options", &self.options)
            .field("router", self.dispatch.router())
            .finish_non_exhaustive()
    }
}

/// Where a server's certificate, key and client CA come from, for
/// [`Server::reload_tls_files`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA for client certificates (mutual TLS), if any.
    pub client_ca: Option<PathBuf>,
    /// Key exchange groups offered (default: the post-quantum hybrid
    /// first).
    pub key_exchange: rpc_core::tls::KeyExchange,
}

impl TlsFiles {
    /// The files, with the default key exchange.
    pub fn new(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> Self {
        TlsFiles {
            cert,
            key,
            client_ca,
            key_exchange: rpc_core::tls::KeyExchange::default(),
        }
    }

    /// Reads the files and builds a server TLS config.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, ServerError> {
        Ok(rpc_core::tls::server_config_with(
            &self.cert,
            &self.key,
            self.client_ca.as_deref(),
            self.key_exchange,
        )?)
    }
}

impl Server {
    /// Uses `tls` for every handshake from now on; connections already open
    /// keep the session they have.
    pub fn set_tls(&self, tls: Arc<rustls::ServerConfig>) {
        let acceptor = TlsAcceptor::from(tls);
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
    }

    /// Re-reads certificate, key and client CA and uses them for new
    /// handshakes. On any error (missing file, no key, key not matching) the
    /// current certificate stays in use and the error says what is wrong.
    pub fn reload_tls_files(&self, files: &TlsFiles) -> Result<(), ServerError> {
        let tls = files.load()?;
        self.set_tls(tls);
        info!(cert = %files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    fn current_acceptor(&self) -> TlsAcceptor {
        // A poisoned lock still holds a whole acceptor (writes swap it whole).
        self.acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The statuses the health service (`srpc.health.Check`/`Watch`)
    /// reports: every service starts `Serving`; set one (or `""`, the
    /// whole server) from code, e.g. while a dependency is down. Once
    /// `serve` drains, everything is `NotServing` for good.
    pub fn health(&self) -> crate::Health {
        self.dispatch.health.clone()
    }

    /// Connections, calls and errors so far: what the reserved method
    /// `srpc.stats` returns to clients.
    pub fn stats(&self) -> StatsSnapshot {
        self.dispatch.snapshot()
    }

    /// Starts a builder; see [`ServerBuilder`].
    pub fn builder(tls: Arc<rustls::ServerConfig>) -> ServerBuilder {
        ServerBuilder::new(tls)
    }

    /// Binds `addr` (port 0 picks a free port; see `local_addr`).
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })
    }

    /// Serves connections from `listener` until `shutdown` completes, then
    /// drains: no new connections, `GoAway` on every connection, in-flight
    /// calls get up to `drain_timeout`, then everything left is closed.
    ///
    /// The accept loop runs as a task of its own (aborted if this future is
    /// dropped), so it runs on whichever runtime worker saw the listener
    /// become readable, and each accepted connection's task starts on that
    /// same worker. Awaited in `block_on` (as in `#[tokio::main]`), the loop
    /// would otherwise run on the main thread: every connection would then
    /// be handed from a worker to the main thread and back before its
    /// handshake began.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let tracker = TaskTracker::new();
        let live = Arc::new(ConnectionSet::default());
        let accepting = Accepting {
            server: self.clone(),
            slots: Arc::new(Semaphore::new(self.options.max_connections)),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
            handshakes: Arc::new(Semaphore::new(self.options.max_handshakes)),
            tracker: tracker.clone(),
            drain: CancellationToken::new(),
            kill: CancellationToken::new(),
            live: live.clone(),
            config: Arc::new(self.options.connection.clone()),
        };
        let (drain, kill) = (accepting.drain.clone(), accepting.kill.clone());
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "listening");
        }
        // Metrics sampled each second while this serves; stopped with it.
        let _sampler = self.dispatch.metrics.then(|| {
            let dispatch = self.dispatch.clone();
            AbortOnDropHandle::new(tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::metrics::SAMPLE_EVERY);
                loop {
                    tick.tick().await;
                    dispatch.sample_metrics();
                }
            }))
        });
        let stop = CancellationToken::new();
        // In the caller's span, as when the loop ran in this future.
        let mut task = AbortOnDropHandle::new(tokio::spawn(
            accepting
                .run(listener, stop.clone())
                .instrument(tracing::Span::current()),
        ));
        tokio::pin!(shutdown);
        let ended = tokio::select! {
            _ = &mut shutdown => {
                stop.cancel();
                (&mut task).await
            }
            ended = &mut task => ended,
        };
        match ended {
            Ok(result) => result?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Aborted only by dropping `task`, which this future holds.
            Err(e) => return Err(ServerError::Accept(std::io::Error::other(e))),
        }
        tracker.close();
        // Health checks on the connections still open answer NOT_SERVING.
        self.dispatch.health.drain();
        info!(
            connections = tracker.len(),
            "shutting down: draining connections"
        );
        drain.cancel();
        live.for_each(Connection::drain);
        if tokio::time::timeout(self.options.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                left = tracker.len(),
                "drain timeout passed; closing the remaining connections"
            );
            kill.cancel();
            live.for_each(Connection::close);
            tracker.wait().await;
        }
        if self.dispatch.metrics {
            // The calls since the last sample, before the sampler stops.
            self.dispatch.sample_metrics();
        }
        info!("server stopped");
        Ok(())
    }
}

/// What the accept loop of one `serve` call holds.
struct Accepting {
    server: Server,
    /// One permit per connection served.
    slots: Arc<Semaphore>,
    /// One permit per refusal in progress (over the connection limit).
    refusals: Arc<Semaphore>,
    /// One permit per handshake in progress.
    handshakes: Arc<Semaphore>,
    tracker: TaskTracker,
    drain: CancellationToken,
    kill: CancellationToken,
    live: Arc<ConnectionSet>,
    config: Arc<ConnectionConfig>,
}

impl Accepting {
    /// Accepts until `stop` fires (`Ok`, the listener closed) or accepting
    /// fails for good.
    async fn run(self, listener: TcpListener, stop: CancellationToken) -> Result<(), ServerError> {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, "accept failed; retrying in 100 ms");
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
                Err(e) => return Err(ServerError::Accept(e)),
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                self.refuse(tcp, peer);
                continue;
            };
            debug!(%peer, "accepted");
            let conn = ConnectionTask {
                acceptor: self.server.current_acceptor(),
                config: self.config.clone(),
                dispatch: self.server.dispatch.clone(),
                handshakes: self.handshakes.clone(),
                drain: self.drain.clone(),
                kill: self.kill.clone(),
                live: self.live.clone(),
            };
            self.tracker.spawn(async move {
                conn.run(tcp, peer).await;
                drop(slot);
            });
        }
    }

    /// Over the connection limit: tells the client why, but spends at most
    /// a few handshakes on refusals; past that, just closes.
    fn refuse(&self, tcp: TcpStream, peer: SocketAddr) {
        let max = self.server.options.max_connections;
        debug!(%peer, max, "connection refused: at the connection limit");
        let Ok(refusal) = self.refusals.clone().try_acquire_owned() else {
            return;
        };
        let acceptor = self.server.current_acceptor();
        let config = self.config.clone();
        self.tracker.spawn(async move {
            let reason = format!("server at connection limit ({max} connections)");
            if let Err(e) = rpc_core::transport::refuse(tcp, &acceptor, &config, reason).await {
                debug!(%peer, error = %e, "refusal not delivered");
            }
            drop(refusal);
        });
    }
}

/// Accept errors that concern one connection or a passing shortage.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted
            | ConnectionReset
            | ConnectionRefused
            | Interrupted
            | WouldBlock
            | TimedOut
    ) || matches!(e.raw_os_error(), Some(12 | 23 | 24 | 105))
    // Linux ENOMEM, ENFILE, EMFILE, ENOBUFS: out of a resource for now; wait
    // for connections to close and retry.
}
