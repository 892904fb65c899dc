//! tarpc 0.38 over tokio-rustls, bincode on `LengthDelimitedCodec`, as in
//! tarpc's own `tls_over_tcp` example.

use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::StreamExt;
use rustls::pki_types::ServerName;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::LengthDelimitedCodec;

use super::{plain_client_tls, plain_server_tls, BoxFut, Caller, Certs, Handshake, SERVER_NAME};

/// The benchmark's service.
#[tarpc::service]
pub(crate) trait Echo {
    /// Returns `data`.
    async fn echo(data: Bytes) -> Bytes;
}

#[derive(Clone)]
struct EchoImpl;

impl Echo for EchoImpl {
    async fn echo(self, _: tarpc::context::Context, data: Bytes) -> Bytes {
        data
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(16 << 20)
        .new_codec()
}

async fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::spawn(fut);
}

pub(super) async fn serve(listener: TcpListener, certs: &Certs) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(plain_server_tls(certs)?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let framed = tokio_util::codec::Framed::new(tls, codec());
            let transport = tarpc::serde_transport::new(framed, Bincode::default());
            BaseChannel::with_defaults(transport)
                .execute(EchoImpl.serve())
                .for_each(spawn)
                .await;
        });
    }
}

pub(super) struct Dialer {
    addr: SocketAddr,
    connector: TlsConnector,
}

impl Dialer {
    pub(super) fn new(
        addr: SocketAddr,
        certs: &Certs,
        handshake: Handshake,
    ) -> anyhow::Result<Self> {
        Ok(Dialer {
            addr,
            connector: TlsConnector::from(plain_client_tls(certs, handshake)?),
        })
    }

    pub(super) async fn connect(&self) -> anyhow::Result<TarpcCaller> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = self
            .connector
            .connect(ServerName::try_from(SERVER_NAME)?, tcp)
            .await?;
        let framed = tokio_util::codec::Framed::new(tls, codec());
        let transport = tarpc::serde_transport::new(framed, Bincode::default());
        let client = EchoClient::new(tarpc::client::Config::default(), transport).spawn();
        Ok(TarpcCaller(Some(client).into()))
    }
}

/// The client; dropping it (on `close`) ends the connection.
pub(super) struct TarpcCaller(std::sync::RwLock<Option<EchoClient>>);

impl Caller for TarpcCaller {
    fn echo(&self, payload: Bytes) -> BoxFut<'_, usize> {
        let client = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        Box::pin(async move {
            let client = client.ok_or_else(|| anyhow::anyhow!("tarpc client closed"))?;
            Ok(client.echo(tarpc::context::current(), payload).await?.len())
        })
    }

    fn close(&self) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).take();
    }
}
