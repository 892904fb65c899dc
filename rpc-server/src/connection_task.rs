//! One connection's life on the server.
//!
//! ```text
//! accepted TCP ─► handshake slot (at most `max_handshakes` at once)
//!   ─► TLS handshake + ALPN + Hello (rpc-core transport, timeouts)
//!   ─► driver runs (calls dispatched to the router)
//!   ─► ends: peer left, protocol error, drain finished, or killed
//! ```
//!
//! Each step's outcome is logged with the peer address, at debug: a busy
//! server makes these lines per connection (`RUST_LOG=rpc_server=debug`
//! shows them).
//!
//! Not here: the accept loop and limits (`server.rs`), what a call runs
//! through (`stack.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use rpc_core::{transport, ConnectionConfig};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::connection_set::ConnectionSet;
use crate::stack::ServerDispatch;

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
    /// The connections of this `serve` call, which the server drains and
    /// closes directly. (Each connection waiting on the drain and kill
    /// tokens itself cost two locks every time its task was polled.)
    pub(crate) live: Arc<ConnectionSet>,
}

impl ConnectionTask {
    pub(crate) async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        let limit = self.config.handshake_timeout;
        let Ok(Ok(slot)) =
            tokio::time::timeout(limit, self.handshakes.clone().acquire_owned()).await
        else {
            debug!(%peer, "connection dropped: no handshake slot within the handshake timeout");
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
                debug!(%peer, "connection dropped during setup: server shutting down");
                return;
            }
        };
        let (conn, driver) = match started {
            Ok(started) => started,
            Err(e) => {
                debug!(%peer, error = %e, "connection refused");
                return;
            }
        };
        debug!(%peer, "connection established");
        let registered = self.dispatch.connections.add(conn.clone());
        let live = self.live.add(conn.clone());
        // The server drains (or closes) what `live` holds after it cancels
        // the token; a connection added after that sees the token here.
        if self.drain.is_cancelled() {
            conn.drain();
        }
        if self.kill.is_cancelled() {
            conn.close();
        }
        drop(conn);
        let reason = driver.await;
        self.live.remove(live);
        self.dispatch.connection_ended(registered);
        debug!(%peer, %reason, "connection closed");
    }
}
