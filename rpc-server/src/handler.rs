//! One connection's life on the server.
//!
//! ```text
//! accepted TCP ─► handshake slot (at most `max_handshakes` at once)
//!   ─► TLS handshake + ALPN + Hello (rpc-core transport, timeouts)
//!   ─► driver runs (calls dispatched to the router)
//!   ─► ends: peer left, protocol error, drain finished, or killed
//! ```
//!
//! Each step's outcome is logged with the peer address: refused handshakes at
//! info with the reason, established and closed connections at info.
//!
//! Not here: the accept loop and limits (`server.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use rpc_core::{transport, ConnectionConfig};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::dispatch::ServerDispatch;

/// What one connection task needs from the server.
pub(crate) struct ConnectionTask {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) config: Arc<ConnectionConfig>,
    pub(crate) dispatch: Arc<ServerDispatch>,
    /// One permit per handshake in progress.
    pub(crate) handshakes: Arc<Semaphore>,
    /// Fires when the server starts draining.
    pub(crate) drain: CancellationToken,
    /// Fires when the drain deadline has passed.
    pub(crate) kill: CancellationToken,
}

impl ConnectionTask {
    pub(crate) async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        let limit = self.config.handshake_timeout;
        let Ok(Ok(slot)) =
            tokio::time::timeout(limit, self.handshakes.clone().acquire_owned()).await
        else {
            info!(%peer, "connection dropped: no handshake slot within the handshake timeout");
            return;
        };
        // Boxed: the handshake's state (a few KiB) is freed once it is done
        // instead of staying in this task for the connection's whole life.
        let setup = Box::pin(async {
            let started =
                transport::accept(tcp, &self.acceptor, &self.config, self.dispatch.clone()).await;
            drop(slot);
            started
        });
        let started = tokio::select! {
            started = setup => started,
            _ = self.drain.cancelled() => {
                info!(%peer, "connection dropped during setup: server shutting down");
                return;
            }
        };
        let (conn, driver) = match started {
            Ok(started) => started,
            Err(e) => {
                info!(%peer, error = %e, "connection refused");
                return;
            }
        };
        info!(%peer, "connection established");
        let registered = self.dispatch.register(conn.clone());
        tokio::pin!(driver);
        let (mut draining, mut killed) = (false, false);
        // Each signal is acted on once; then only the driver is awaited.
        let reason = loop {
            tokio::select! {
                reason = &mut driver => break reason,
                _ = self.drain.cancelled(), if !draining => {
                    draining = true;
                    conn.drain();
                }
                _ = self.kill.cancelled(), if !killed => {
                    killed = true;
                    conn.close();
                }
            }
        };
        self.dispatch.unregister(registered);
        info!(%peer, %reason, "connection closed");
    }
}
