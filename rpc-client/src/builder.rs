//! [`ClientBuilder`]: the settings of a client, and what its pool is made
//! of.
//!
//! Not here: `connect` and `discover`, which make the [`Client`]
//! (`client.rs`).
//!
//! [`Client`]: crate::Client

use std::sync::Arc;
use std::time::Duration;

use rpc_core::{ConnectionConfig, Metadata};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::outlier::OutlierSettings;
use crate::pool::{Balance, Settings};
use crate::retry::RetrySettings;
use crate::ClientError;

/// Default time a call waits for its reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a [`Client`](crate::Client): TLS config, server name, limits, timeouts, backoff.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) server_name: Option<String>,
    pub(crate) config: ConnectionConfig,
    pub(crate) timeout: Duration,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) wait_for_ready: bool,
    pub(crate) metadata: Metadata,
    pub(crate) retry: RetrySettings,
    pub(crate) balance: Balance,
    pub(crate) outlier: OutlierSettings,
    pub(crate) health_check: Option<String>,
    pub(crate) metrics: bool,
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
            wait_for_ready: false,
            metadata: Metadata::new(),
            retry: RetrySettings::default(),
            balance: Balance::default(),
            outlier: OutlierSettings::default(),
            health_check: None,
            metrics: false,
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

    /// While no server is reachable, calls wait for a connection (within
    /// their timeout) instead of failing at once with
    /// [`ClientError::Unavailable`] (default off: fail fast, as gRPC does).
    /// A call's own
    /// [`CallOptions::wait_for_ready`](rpc_core::CallOptions::wait_for_ready)
    /// overrides it.
    pub fn wait_for_ready(mut self, wait: bool) -> Self {
        self.wait_for_ready = wait;
        self
    }

    /// Attempts an idempotent call may take in all, the first included
    /// (default 3), and its retry budget: retries are at most `percent` of
    /// the idempotent calls of the last `ttl` (1-60 s), plus `min_per_sec`
    /// a second (default 20 % over 10 s, plus 10 a second).
    pub fn retries(
        mut self,
        max_attempts: u32,
        ttl: Duration,
        min_per_sec: u32,
        percent: f32,
    ) -> Self {
        self.retry = RetrySettings {
            max_attempts,
            ttl,
            min_per_sec,
            percent,
        };
        self
    }

    /// Metadata sent with every call (a call's own entries win over these).
    pub fn metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
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

    /// How calls are spread over several servers (default
    /// [`Balance::PeakEwma`]).
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }

    /// Outlier ejection: `consecutive` calls in a row answered
    /// `Unavailable`, `Internal` or `DataLoss` take a server out of
    /// the pick set for `base` × its ejections so far, at most `max`, and
    /// never more than `max_percent` of the servers (at least one) at once
    /// (default 5, 30 s, 300 s, 10 %; `consecutive` 0 turns it off).
    pub fn outlier_ejection(
        mut self,
        consecutive: u32,
        base: Duration,
        max: Duration,
        max_percent: u32,
    ) -> Self {
        self.outlier = OutlierSettings {
            consecutive,
            base,
            max: max.max(base),
            max_percent: max_percent.min(100),
        };
        self
    }

    /// Client-side health checking (gRPC's A17): follow each server's
    /// health of `service` (`""`: the whole server) with
    /// `srpc.health.Watch`, one long-lived call per connection, and send
    /// calls only to servers that answer `SERVING` (a server just
    /// connected gets none until it has). A server without the health
    /// service counts as serving; when none is serving, calls go to them
    /// anyway. Off by default: a draining server is left through its
    /// `Drain` frame and a dead one through heartbeats either way; this is
    /// for servers whose code sets `NOT_SERVING`.
    pub fn health_check(mut self, service: impl Into<String>) -> Self {
        self.health_check = Some(service.into());
        self
    }

    /// Records every call's duration and outcome as
    /// `rpc.client.call.duration` through the `metrics` facade, into
    /// whatever recorder the program installed, and samples calls in
    /// flight, ready connections, round trips and bytes each second (see
    /// `metrics.rs`). Off by default.
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    pub(crate) fn settings(&self) -> Result<Settings, ClientError> {
        let server_name = match &self.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| ClientError::ServerName(name.clone()))?,
            ),
            None => None,
        };
        Ok(Settings {
            connector: TlsConnector::from(self.tls.clone()),
            config: self.config.clone(),
            backoff: self.backoff,
            server_name,
            balance: self.balance,
            outlier: self.outlier,
            health_check: self.health_check.clone(),
        })
    }
}
