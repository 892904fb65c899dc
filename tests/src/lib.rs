//! Shared helpers for the workspace integration tests: certificates made by
//! rcgen inside the test, a demo server on `127.0.0.1:0` that stops when
//! dropped, clients, and raw TLS sockets for sending hostile bytes.
//!
//! Everything talks to 127.0.0.1 only.

// Test support: a failed setup step should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod delay;
pub mod proxy;
pub mod replicas;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rpc_client::Client;
use rpc_core::tls::{client_config_from_der, server_config_from_der, Identity, ALPN};
use rpc_server::devcerts::{self, DevCerts};
use rpc_server::{Router, Server, ServerOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub use proxy::FaultProxy;
pub use rpc_server::devcerts::generate as make_certs;

/// Parses one PEM certificate.
pub fn cert_der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Parses one PEM private key.
pub fn key_der(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A server TLS config from dev certs.
pub fn server_tls(certs: &DevCerts) -> Arc<rustls::ServerConfig> {
    let identity = Identity {
        cert_chain: vec![cert_der(&certs.server_pem)],
        key: key_der(&certs.server_key),
    };
    server_config_from_der(identity, None).unwrap()
}

/// A client TLS config trusting the dev CA.
pub fn client_tls(certs: &DevCerts) -> Arc<rustls::ClientConfig> {
    client_config_from_der(vec![cert_der(&certs.ca_pem)], None).unwrap()
}

/// A server TLS config that requires client certificates signed by
/// `client_ca`'s CA.
pub fn server_tls_mtls(certs: &DevCerts, client_ca: &DevCerts) -> Arc<rustls::ServerConfig> {
    let identity = Identity {
        cert_chain: vec![cert_der(&certs.server_pem)],
        key: key_der(&certs.server_key),
    };
    server_config_from_der(identity, Some(vec![cert_der(&client_ca.ca_pem)])).unwrap()
}

/// A client TLS config trusting `server`'s CA and presenting `identity`'s
/// client certificate.
pub fn client_tls_with_cert(server: &DevCerts, identity: &DevCerts) -> Arc<rustls::ClientConfig> {
    let id = Identity {
        cert_chain: vec![cert_der(&identity.client_pem)],
        key: key_der(&identity.client_key),
    };
    client_config_from_der(vec![cert_der(&server.ca_pem)], Some(id)).unwrap()
}

/// A client TLS config trusting the dev CA, offering the given ALPN list
/// instead of `srpc/1`.
pub fn client_tls_with_alpn(certs: &DevCerts, alpn: Vec<Vec<u8>>) -> Arc<rustls::ClientConfig> {
    let mut config = (*client_tls(certs)).clone();
    config.alpn_protocols = alpn;
    Arc::new(config)
}

/// A running server on 127.0.0.1; shuts down (and drains) when dropped or
/// when [`TestServer::shutdown`] is called.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The certificates it uses.
    pub certs: DevCerts,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), rpc_server::ServerError>>>,
}

impl TestServer {
    /// The demo service with default options.
    pub async fn demo() -> TestServer {
        TestServer::start(rpc_server::demo::router(), ServerOptions::default()).await
    }

    /// Any router and options.
    pub async fn start(router: Router, options: ServerOptions) -> TestServer {
        TestServer::start_with_certs(devcerts::generate().unwrap(), router, options).await
    }

    /// Any router and options, with given certificates (a server that
    /// "comes back" keeps its certificate).
    pub async fn start_with_certs(
        certs: DevCerts,
        router: Router,
        options: ServerOptions,
    ) -> TestServer {
        let tls = server_tls(&certs);
        TestServer::start_with_tls(certs, tls, router, options).await
    }

    /// Any TLS config (mutual TLS, say); `certs` are the ones it was made of.
    pub async fn start_with_tls(
        certs: DevCerts,
        tls: Arc<rustls::ServerConfig>,
        router: Router,
        options: ServerOptions,
    ) -> TestServer {
        let server = Server::builder(tls)
            .options(options)
            .router(router)
            .build()
            .unwrap();
        TestServer::serve(certs, server).await
    }

    /// Serves a server built by the test (with layers, say); `certs` are
    /// the ones its TLS config was made of.
    pub async fn serve(certs: DevCerts, server: Server) -> TestServer {
        let listener = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await
        });
        TestServer {
            addr,
            certs,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// A client connected with the right CA.
    pub async fn client(&self) -> Client {
        Client::connect(&self.address(), client_tls(&self.certs))
            .await
            .unwrap()
    }

    /// Starts the drain and waits (at most `limit`) for `serve` to return.
    pub async fn shutdown(mut self, limit: Duration) -> Result<(), rpc_server::ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(limit, task)
            .await
            .expect("server did not stop in time")
            .unwrap()
    }

    /// A raw TLS stream that negotiated `srpc/1` but has sent nothing yet.
    pub async fn raw_tls(&self) -> TlsStream<TcpStream> {
        raw_tls_with(self.addr, client_tls(&self.certs)).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A raw TLS stream to `addr` with the given client config.
pub async fn raw_tls_with(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(tls).connect(name, tcp).await.unwrap()
}

/// Any frame, as bytes on the wire.
pub fn frame_bytes(frame: rpc_core::Frame) -> Vec<u8> {
    use tokio_util::codec::Encoder;
    let max = rpc_core::DEFAULT_MAX_FRAME;
    let mut buf = bytes::BytesMut::new();
    rpc_core::FrameCodec::new(max, max)
        .encode(frame, &mut buf)
        .unwrap();
    buf.to_vec()
}

/// Our `Hello` frame, as bytes on the wire.
pub fn hello_bytes() -> Vec<u8> {
    let config = rpc_core::ConnectionConfig::default();
    frame_bytes(rpc_core::Frame::Hello(rpc_core::transport::hello_for(
        &config,
    )))
}

/// Reads until the peer closes, for at most `limit`. Returns the bytes read,
/// or `None` if the connection was still open when the time ran out.
pub async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Option<Vec<u8>> {
    let mut all = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    Some(all)
}

/// Decodes the frames in `bytes` (as the server sent them).
pub fn decode_frames(bytes: &[u8]) -> Vec<rpc_core::Frame> {
    use tokio_util::codec::Decoder;
    let mut codec =
        rpc_core::FrameCodec::new(rpc_core::DEFAULT_MAX_FRAME, rpc_core::DEFAULT_MAX_FRAME);
    let mut buf = bytes::BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = codec.decode(&mut buf) {
        frames.push(f);
    }
    frames
}

/// The demo service still answers `client`: an echo and an add.
pub async fn still_served(client: &Client) {
    let reply: String = client.call("Demo.echo", "still served").await.unwrap();
    assert_eq!(reply, "still served");
    let sum: i64 = client.call("Demo.add", &(1i64, 2i64)).await.unwrap();
    assert_eq!(sum, 3);
}

/// Sends `bytes` after a proper TLS handshake and returns the one `GoAway`
/// reason the server answered with before closing (within 5 s).
pub async fn goaway_after(server: &TestServer, bytes: &[u8]) -> String {
    let mut tls = server.raw_tls().await;
    send(&mut tls, bytes).await;
    let got = read_until_closed(&mut tls, Duration::from_secs(5))
        .await
        .expect("server did not close the connection");
    let reasons: Vec<String> = decode_frames(&got)
        .into_iter()
        .filter_map(|f| match f {
            rpc_core::Frame::GoAway { reason } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), 1, "expected one GoAway, got {reasons:?}");
    reasons[0].clone()
}

/// Waits (at most 5 s) until the server reports `n` calls in flight
/// besides the stats call that asks: the signal that calls made on other
/// tasks have reached their handlers.
pub async fn until_in_flight(client: &Client, n: u64) {
    for _ in 0..500 {
        if client.stats().await.unwrap().calls_in_flight > n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never had {n} calls in flight");
}

/// Writes bytes and flushes.
pub async fn send<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    stream.write_all(bytes).await.unwrap();
    stream.flush().await.unwrap();
}

/// Records, when dropped, the moment it was dropped: put one in a handler's
/// future to see when the server stopped that handler.
pub struct StopTime(pub Arc<std::sync::Mutex<Option<std::time::Instant>>>);

impl Drop for StopTime {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = Some(std::time::Instant::now());
    }
}

/// Adds `hold` to `router`: a handler that runs until the server stops it
/// (cancellation, deadline, dead peer), recording when in `stopped`.
pub fn with_hold(
    router: Router,
    stopped: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
) -> Router {
    router.route_with_context("hold", move |ctx: rpc_core::CallContext, (): ()| {
        let guard = StopTime(stopped.clone());
        async move {
            let _guard = guard;
            ctx.cancelled().cancelled().await;
            Ok::<(), rpc_core::Status>(())
        }
    })
}

/// The ALPN protocol, re-exported for tests.
pub const SRPC_ALPN: &[u8] = ALPN;
