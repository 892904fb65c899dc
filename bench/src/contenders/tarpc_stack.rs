//! tarpc 0.38 over tokio-rustls, bincode on `LengthDelimitedCodec`, as in
//! tarpc's own `tls_over_tcp` example.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;
use tokio_util::codec::LengthDelimitedCodec;

use super::{accept_tls, connect_tls, BoxFut, Caller, Certs, Slot};

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
    accept_tls(listener, certs, |tls| async move {
        let framed = tokio_util::codec::Framed::new(tls, codec());
        let transport = tarpc::serde_transport::new(framed, Bincode::default());
        BaseChannel::with_defaults(transport)
            .execute(EchoImpl.serve())
            .for_each(spawn)
            .await;
    })
    .await
}

pub(super) struct Dialer {
    addr: SocketAddr,
    connector: TlsConnector,
}

impl Dialer {
    pub(super) fn new(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Self {
        Dialer {
            addr,
            connector: TlsConnector::from(tls),
        }
    }

    pub(super) async fn connect(&self) -> anyhow::Result<TarpcCaller> {
        let tls = connect_tls(self.addr, &self.connector).await?;
        let framed = tokio_util::codec::Framed::new(tls, codec());
        let transport = tarpc::serde_transport::new(framed, Bincode::default());
        let client = EchoClient::new(tarpc::client::Config::default(), transport).spawn();
        Ok(TarpcCaller(Slot::new(client)))
    }
}

/// The client; dropping it (on `close`) ends the connection.
pub(super) struct TarpcCaller(Slot<EchoClient>);

impl Caller for TarpcCaller {
    fn echo(&self, payload: Bytes) -> BoxFut<'_, usize> {
        let client = self.0.get();
        Box::pin(async move {
            Ok(client?
                .echo(tarpc::context::current(), payload)
                .await?
                .len())
        })
    }

    fn close(&self) {
        self.0.close();
    }
}
