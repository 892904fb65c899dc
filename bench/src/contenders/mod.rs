//! The four contenders behind one client interface and one server entry.
//!
//! Every contender speaks TLS 1.3 on 127.0.0.1 with the same certificates
//! and the same crypto provider (rustls with aws-lc-rs). Each echoes a byte
//! payload back; the client checks the reply's length.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};

mod raw;
pub(crate) mod srpc_stack;
mod tarpc_stack;
mod tonic_stack;

/// Bytes per item or write of the stream scenario.
pub(crate) const STREAM_PIECE: usize = 64 * 1024;

/// A boxed future, as the contenders' clients return.
pub(crate) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// One connection to a contender's server; cheap to share among tasks.
pub(crate) trait Caller: Send + Sync + 'static {
    /// Sends `payload`, returns the reply's length.
    fn echo(&self, payload: Bytes) -> BoxFut<'_, usize>;
    /// Receives a one-way stream of `total` bytes from the server in
    /// pieces of about 64 KiB; returns the bytes received.
    fn stream(&self, total: u64) -> BoxFut<'_, u64> {
        let _ = total;
        Box::pin(async { anyhow::bail!("this contender has no streams") })
    }
    /// Whether [`Caller::stream`] runs on this connection (calls made
    /// meanwhile share it) rather than on a connection of its own.
    fn streams_beside_calls(&self) -> bool {
        true
    }
    /// Ends the connection.
    fn close(&self);
}

/// The contenders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stack {
    /// This project.
    Srpc,
    /// tokio-rustls + LengthDelimitedCodec echo with request ids.
    Raw,
    /// tonic 0.14 unary echo (HTTP/2, protobuf).
    Tonic,
    /// tarpc 0.38 over tokio-rustls with bincode.
    Tarpc,
    /// srpc with its server recording call metrics (`MetricsLayer` into a
    /// Prometheus recorder), to measure what recording costs; not in
    /// `ALL`.
    #[value(name = "srpc-metrics")]
    SrpcMetrics,
}

impl Stack {
    /// Every contender, ours first.
    pub(crate) const ALL: [Stack; 4] = [Stack::Srpc, Stack::Raw, Stack::Tarpc, Stack::Tonic];

    /// The name in tables and on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stack::Srpc => "srpc",
            Stack::Raw => "raw",
            Stack::Tonic => "tonic",
            Stack::Tarpc => "tarpc",
            Stack::SrpcMetrics => "srpc-metrics",
        }
    }
}

/// PEM text of the certificates every contender uses.
#[derive(Clone)]
pub(crate) struct Certs {
    /// The CA that signed the server certificate (clients trust it).
    pub(crate) ca: String,
    /// The server's certificate, valid for `localhost` and 127.0.0.1.
    pub(crate) server_cert: String,
    /// The server's private key.
    pub(crate) server_key: String,
}

/// How a client sets up TLS for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// A full handshake every time (no session resumption).
    Full,
    /// Resume an earlier session when the client has one (srpc's default).
    Resumed,
}

/// Makes connections to one contender's server.
pub(crate) struct Dialer {
    inner: DialerKind,
    /// Certificates its clients have checked (not for tonic, which builds
    /// its own TLS config).
    checked: Option<Arc<CountingVerifier>>,
}

enum DialerKind {
    Srpc(srpc_stack::Dialer),
    Raw(raw::Dialer),
    Tonic(Box<tonic_stack::Dialer>),
    Tarpc(tarpc_stack::Dialer),
}

impl Dialer {
    /// A dialer for `stack` at `addr`.
    pub(crate) fn new(
        stack: Stack,
        addr: SocketAddr,
        certs: &Certs,
        handshake: Handshake,
    ) -> anyhow::Result<Self> {
        let verifier = CountingVerifier::new(certs)?;
        let inner = match stack {
            Stack::Srpc | Stack::SrpcMetrics => DialerKind::Srpc(srpc_stack::Dialer::new(
                addr,
                certs,
                handshake,
                verifier.clone(),
            )?),
            Stack::Raw => DialerKind::Raw(raw::Dialer::new(
                addr,
                plain_client_tls(handshake, verifier.clone())?,
            )),
            Stack::Tonic => {
                return Ok(Dialer {
                    inner: DialerKind::Tonic(Box::new(tonic_stack::Dialer::new(
                        addr, certs, handshake,
                    )?)),
                    checked: None,
                })
            }
            Stack::Tarpc => DialerKind::Tarpc(tarpc_stack::Dialer::new(
                addr,
                plain_client_tls(handshake, verifier.clone())?,
            )),
        };
        Ok(Dialer {
            inner,
            checked: Some(verifier),
        })
    }

    /// How many server certificates this dialer's clients have verified so
    /// far (`None` for tonic). A resumed TLS 1.3 handshake carries no
    /// certificate, so this tells full handshakes from resumed ones.
    pub(crate) fn certificates_checked(&self) -> Option<u64> {
        self.checked
            .as_ref()
            .map(|v| v.checked.load(Ordering::Relaxed))
    }

    /// Opens one connection (TLS handshake included).
    pub(crate) async fn connect(&self) -> anyhow::Result<Arc<dyn Caller>> {
        Ok(match &self.inner {
            DialerKind::Srpc(d) => Arc::new(d.connect().await?),
            DialerKind::Raw(d) => Arc::new(d.connect().await?),
            DialerKind::Tonic(d) => Arc::new(d.connect().await?),
            DialerKind::Tarpc(d) => Arc::new(d.connect().await?),
        })
    }
}

/// Serves `stack` on `listener` until the process is killed.
pub(crate) async fn serve(
    stack: Stack,
    listener: TcpListener,
    certs: &Certs,
) -> anyhow::Result<()> {
    match stack {
        Stack::Srpc => srpc_stack::serve(listener, certs, false).await,
        Stack::SrpcMetrics => srpc_stack::serve(listener, certs, true).await,
        Stack::Raw => raw::serve(listener, certs).await,
        Stack::Tonic => tonic_stack::serve(listener, certs).await,
        Stack::Tarpc => tarpc_stack::serve(listener, certs).await,
    }
}

/// Accepts connections on `listener`, completes TLS with the raw/tarpc
/// server config, and runs `serve` on each in a task of its own.
async fn accept_tls<F, Fut>(listener: TcpListener, certs: &Certs, serve: F) -> anyhow::Result<()>
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(plain_server_tls(certs)?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let serve = serve.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(tls) = acceptor.accept(tcp).await {
                serve(tls).await;
            }
        });
    }
}

/// A TCP connection with Nagle off and TLS on top, for raw and tarpc.
async fn connect_tls(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)?;
    Ok(connector.connect(name, tcp).await?)
}

/// A client that `close` drops (tarpc and tonic end a connection that way).
struct Slot<T>(std::sync::RwLock<Option<T>>);

impl<T: Clone> Slot<T> {
    fn new(client: T) -> Self {
        Slot(std::sync::RwLock::new(Some(client)))
    }

    /// A clone of the client, or an error once closed.
    fn get(&self) -> anyhow::Result<T> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| anyhow::anyhow!("connection closed"))
    }

    fn close(&self) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The rustls server config of raw and tarpc: TLS 1.3, the same certificate,
/// the same provider as srpc.
fn plain_server_tls(certs: &Certs) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = rpc_core::tls::certs_from_pem(&certs.server_cert)?;
    let key = rpc_core::tls::key_from_pem(&certs.server_key)?;
    let config = rustls::ServerConfig::builder_with_provider(rpc_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// The rustls client config of raw and tarpc.
fn plain_client_tls(
    handshake: Handshake,
    verifier: Arc<CountingVerifier>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut config = rustls::ClientConfig::builder_with_provider(rpc_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    if handshake == Handshake::Full {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// rustls' own verifier of server certificates (webpki, the benchmark's
/// CA), counting the certificates it is given. Every contender that takes
/// a rustls `ClientConfig` gets one, so the benchmark can check that a
/// "full handshake" scenario did one per connection and a "resumed" one
/// none, instead of trusting the setting.
#[derive(Debug)]
pub(crate) struct CountingVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    checked: AtomicU64,
}

impl CountingVerifier {
    fn new(certs: &Certs) -> anyhow::Result<Arc<Self>> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rpc_core::tls::certs_from_pem(&certs.ca)? {
            roots.add(cert)?;
        }
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            rpc_core::tls::provider(),
        )
        .build()?;
        Ok(Arc::new(CountingVerifier {
            inner,
            checked: AtomicU64::new(0),
        }))
    }
}

impl ServerCertVerifier for CountingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.checked.fetch_add(1, Ordering::Relaxed);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The name every client checks the server certificate against.
pub(crate) const SERVER_NAME: &str = "localhost";
