//! The client: connect once, call many times, concurrently.
//!
//! A [`Client`] is a cheap-to-clone handle over one rpc-core connection. Every
//! clone shares it, so thousands of concurrent calls go out over one TLS
//! session and each waits for its own reply (matched by request id). Calls
//! beyond the server's announced in-flight limit wait locally for a slot,
//! within their deadline.
//!
//! The connection's driver runs on a task owned by the client: when the last
//! clone is dropped (or [`Client::close`] is called) the connection closes and
//! the task ends.
//!
//! Not here (yet): reconnects, several endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rpc_core::{codec, transport, Connection, ConnectionConfig};
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::ClientError;

/// Default time a call waits for its reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a [`Client`]: TLS config, server name, limits, default timeout.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    tls: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
    config: ConnectionConfig,
    timeout: Duration,
}

impl ClientBuilder {
    /// Starts from a TLS config (see `rpc_core::tls::client_config`).
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        ClientBuilder {
            tls,
            server_name: None,
            config: ConnectionConfig::default(),
            timeout: DEFAULT_TIMEOUT,
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

    /// Connection limits and timers.
    pub fn connection_config(mut self, config: ConnectionConfig) -> Self {
        self.config = config;
        self
    }

    /// Connects to `addr` (`host:port`), trying each resolved address in
    /// turn, and completes the TLS handshake and `Hello`.
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
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| ClientError::Resolve {
                addr: addr.to_owned(),
                reason: e.to_string(),
            })?
            .collect();
        let connector = TlsConnector::from(self.tls.clone());
        let mut last = None;
        for sa in &addrs {
            match transport::connect(*sa, server_name.clone(), &connector, &self.config).await {
                Ok((conn, driver)) => {
                    debug!(addr = %sa, "connected");
                    tokio::spawn(driver);
                    return Ok(Client {
                        inner: Arc::new(Inner {
                            conn,
                            timeout: self.timeout,
                            max_frame: self.config.max_frame,
                        }),
                    });
                }
                Err(e) => last = Some((sa.to_string(), e)),
            }
        }
        Err(match last {
            Some((addr, source)) => ClientError::Connect { addr, source },
            None => ClientError::Resolve {
                addr: addr.to_owned(),
                reason: "no addresses found".into(),
            },
        })
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

struct Inner {
    conn: Connection,
    timeout: Duration,
    max_frame: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: end the connection and its driver task.
        self.conn.close();
    }
}

/// A connection to an srpc server. Clone it freely; clones share the
/// connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("conn", &self.inner.conn)
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

    /// Calls `method` with `args` and decodes the reply as `R`, waiting at
    /// most the client's default timeout.
    pub async fn call<A, R>(&self, method: &str, args: &A) -> Result<R, ClientError>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with_timeout(method, args, self.inner.timeout)
            .await
    }

    /// Like [`call`](Client::call) with its own timeout, which also travels
    /// to the server as the call's deadline.
    pub async fn call_with_timeout<A, R>(
        &self,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R, ClientError>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let body =
            codec::encode(args, self.inner.max_frame).map_err(|source| ClientError::Encode {
                method: method.to_owned(),
                source,
            })?;
        let reply = self.inner.conn.call(method, body, timeout).await?;
        codec::decode::<R>(&reply, reply.len()).map_err(|source| ClientError::Decode {
            method: method.to_owned(),
            expected: std::any::type_name::<R>(),
            source,
        })
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.conn.peer_addr()
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.conn.is_closed()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.inner.conn.close_reason()
    }

    /// Closes the connection for every clone; pending calls fail at once.
    pub fn close(&self) {
        self.inner.conn.close();
    }

    /// Waits until the connection has closed.
    pub async fn closed(&self) {
        self.inner.conn.closed().await
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

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
