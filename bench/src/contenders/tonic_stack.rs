//! tonic 0.14: unary echo over HTTP/2 and TLS (tonic's `tls-aws-lc`, so the
//! same rustls provider), protobuf from `proto/echo.proto`.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::net::TcpListener;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

use super::{BoxFut, Caller, Certs, Handshake, Slot, SERVER_NAME};

mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("echo");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{Payload, StreamRequest};

struct EchoImpl;

type PayloadStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Payload, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoImpl {
    async fn echo(
        &self,
        request: tonic::Request<Payload>,
    ) -> Result<tonic::Response<Payload>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }

    type StreamStream = PayloadStream;

    async fn stream(
        &self,
        request: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<PayloadStream>, tonic::Status> {
        let total = request.into_inner().total;
        let piece = Bytes::from(vec![0x5a; super::STREAM_PIECE]);
        let items = futures_util::stream::unfold(0u64, move |sent| {
            let piece = piece.clone();
            async move {
                let n = (total - sent).min(piece.len() as u64);
                (n > 0).then(|| {
                    let data = piece.slice(..n as usize);
                    (Ok(Payload { data }), sent + n)
                })
            }
        });
        Ok(tonic::Response::new(Box::pin(items)))
    }
}

pub(super) async fn serve(listener: TcpListener, certs: &Certs) -> anyhow::Result<()> {
    let tls =
        ServerTlsConfig::new().identity(Identity::from_pem(&certs.server_cert, &certs.server_key));
    // `Server::tcp_nodelay` applies only to listeners tonic binds itself;
    // with `serve_with_incoming` the incoming stream must set it, or every
    // accepted socket keeps Nagle's algorithm (connections then waited
    // ~40 ms for a delayed ACK about one time in three).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .add_service(EchoServer::new(EchoImpl).max_decoding_message_size(16 << 20))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

pub(super) struct Dialer {
    uri: String,
    tls: ClientTlsConfig,
    /// Set for `Handshake::Resumed`: one endpoint, so one rustls config
    /// whose session cache resumes. Otherwise a new endpoint (and config)
    /// per connection, so every handshake is a full one.
    shared: Option<Endpoint>,
}

impl Dialer {
    pub(super) fn new(
        addr: SocketAddr,
        certs: &Certs,
        handshake: Handshake,
    ) -> anyhow::Result<Self> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&certs.ca))
            .domain_name(SERVER_NAME);
        let mut dialer = Dialer {
            uri: format!("https://{addr}"),
            tls,
            shared: None,
        };
        if handshake == Handshake::Resumed {
            dialer.shared = Some(dialer.endpoint()?);
        }
        Ok(dialer)
    }

    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Ok(Endpoint::from_shared(self.uri.clone())?
            .tcp_nodelay(true)
            .tls_config(self.tls.clone())?)
    }

    pub(super) async fn connect(&self) -> anyhow::Result<TonicCaller> {
        let channel = match &self.shared {
            Some(endpoint) => endpoint.connect().await?,
            None => self.endpoint()?.connect().await?,
        };
        Ok(TonicCaller(Slot::new(channel)))
    }
}

/// The channel (one HTTP/2 connection); dropping it on `close` ends it.
pub(super) struct TonicCaller(Slot<Channel>);

impl Caller for TonicCaller {
    fn echo(&self, payload: Bytes) -> BoxFut<'_, usize> {
        let channel = self.0.get();
        Box::pin(async move {
            let mut client = EchoClient::new(channel?).max_decoding_message_size(16 << 20);
            let reply = client.echo(Payload { data: payload }).await?;
            Ok(reply.into_inner().data.len())
        })
    }

    fn stream(&self, total: u64) -> BoxFut<'_, u64> {
        let channel = self.0.get();
        Box::pin(async move {
            let mut client = EchoClient::new(channel?);
            let mut items = client.stream(StreamRequest { total }).await?.into_inner();
            let mut got = 0u64;
            while let Some(item) = items.message().await? {
                got += item.data.len() as u64;
            }
            Ok(got)
        })
    }

    fn close(&self) {
        self.0.close();
    }
}
