//! Several servers of one small service, for the balancing tests: each
//! answers after a delay the test sets, and counts what it ran.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpc_client::{Client, ClientBuilder};
use rpc_core::{ConnectionConfig, Status};
use rpc_server::devcerts::DevCerts;
use rpc_server::ServerOptions;

use crate::{client_tls, TestServer};

/// What each replica serves.
#[rpc_macros::service(crate = rpc_core)]
pub trait Replica {
    /// Answers `n` after the server's delay (or `Unavailable` while the
    /// server is set to fail): safe to run twice.
    #[idempotent]
    async fn echo(&self, n: u64) -> Result<u64, Status>;
    /// As `echo`, but treated as unsafe to repeat.
    async fn tally(&self, n: u64) -> Result<u64, Status>;
    /// Answers after `ms` milliseconds.
    async fn hold(&self, ms: u64) -> u64;
    /// Always unavailable.
    #[idempotent]
    async fn broken(&self) -> Result<u64, Status>;
}

/// One server's behaviour and counts.
#[derive(Clone, Default)]
pub struct Node {
    /// Milliseconds `echo` and `tally` wait before answering.
    pub delay_ms: Arc<AtomicU64>,
    /// Calls of `echo`, `tally` and `broken` run.
    pub runs: Arc<AtomicU64>,
    /// While set, `echo` and `tally` answer `Unavailable`.
    pub failing: Arc<AtomicBool>,
}

impl Replica for Node {
    async fn echo(&self, n: u64) -> Result<u64, Status> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            return Err(Status::unavailable("set to fail"));
        }
        let ms = self.delay_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(n)
    }

    async fn tally(&self, n: u64) -> Result<u64, Status> {
        self.echo(n).await
    }

    async fn hold(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }

    async fn broken(&self) -> Result<u64, Status> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        Err(Status::unavailable("not now"))
    }
}

/// Servers of `Replica` sharing one certificate.
pub struct Replicas {
    /// The servers.
    pub servers: Vec<TestServer>,
    /// Each one's behaviour and counts.
    pub nodes: Vec<Node>,
    /// Each one's health service, to set from the test.
    pub health: Vec<rpc_server::Health>,
    /// Their certificates.
    pub certs: DevCerts,
}

/// A server per delay (milliseconds), sharing one certificate.
pub async fn replicas(delays: &[u64]) -> Replicas {
    let certs = rpc_server::devcerts::generate().unwrap();
    let mut servers = vec![];
    let mut nodes = vec![];
    let mut health = vec![];
    for ms in delays {
        let node = Node::default();
        node.delay_ms.store(*ms, Ordering::Relaxed);
        let server = rpc_server::Server::builder(crate::server_tls(&certs))
            .options(ServerOptions::default())
            .add_service(ReplicaServer::new(node.clone()))
            .build()
            .unwrap();
        health.push(server.health());
        servers.push(TestServer::serve(certs.clone(), server).await);
        nodes.push(node);
    }
    Replicas {
        servers,
        nodes,
        health,
        certs,
    }
}

/// A client builder for them: server name `localhost`, quick backoff
/// (20-200 ms) and heartbeats (100 ms, dead after 500 ms).
pub fn builder(certs: &DevCerts) -> ClientBuilder {
    let mut config = ConnectionConfig::default();
    config.heartbeat_interval = Duration::from_millis(100);
    config.heartbeat_timeout = Duration::from_millis(500);
    Client::builder(client_tls(certs))
        .server_name("localhost")
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connection_config(config)
}

/// A client from `builder` over `addrs`, once every one of them is ready
/// (at most 5 s).
pub async fn connected(
    builder: ClientBuilder,
    addrs: impl IntoIterator<Item = SocketAddr>,
) -> Client {
    let client = builder.connect(&list(addrs)).await.unwrap();
    until(Duration::from_secs(5), "every server ready", || {
        client
            .endpoints()
            .iter()
            .all(|e| e.state == rpc_client::ConnState::Ready)
    })
    .await;
    client
}

/// `a,b,c` for `connect`.
pub fn list(addrs: impl IntoIterator<Item = SocketAddr>) -> String {
    addrs
        .into_iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Calls the client's endpoint at `addr` answered.
pub fn calls_at(client: &Client, addr: SocketAddr) -> u64 {
    client
        .endpoints()
        .iter()
        .find(|e| e.addr == addr)
        .map_or(0, |e| e.calls)
}

/// Waits (at most `limit`) until `check` holds.
pub async fn until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    tokio::time::timeout(limit, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within {limit:?}"));
    started.elapsed()
}
