//! srpc: a `#[service]` trait, the typed client, default settings.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use srpc::{service, CallOptions, Client, Server, ServerStream};
use tokio::net::TcpListener;

use super::{BoxFut, Caller, Certs, CountingVerifier, Handshake, SERVER_NAME};

/// The benchmark's service.
#[service]
pub(crate) trait Echo {
    /// Returns `data`.
    async fn echo(&self, data: Bytes) -> Bytes;
    /// `total` bytes in items of 64 KiB.
    async fn stream(&self, total: u64) -> ServerStream<Bytes>;
}

struct EchoImpl;

impl Echo for EchoImpl {
    async fn echo(&self, data: Bytes) -> Bytes {
        data
    }

    async fn stream(&self, total: u64) -> ServerStream<Bytes> {
        let piece = Bytes::from(vec![0x5a; super::STREAM_PIECE]);
        let items = futures_util::stream::unfold(0u64, move |sent| {
            let piece = piece.clone();
            async move {
                let n = (total - sent).min(piece.len() as u64);
                (n > 0).then(|| (Ok(piece.slice(..n as usize)), sent + n))
            }
        });
        ServerStream::new(items)
    }
}

pub(super) async fn serve(
    listener: TcpListener,
    certs: &Certs,
    metrics: bool,
) -> anyhow::Result<()> {
    let identity = rpc_core::tls::Identity {
        cert_chain: rpc_core::tls::certs_from_pem(&certs.server_cert)?,
        key: rpc_core::tls::key_from_pem(&certs.server_key)?,
    };
    let tls = rpc_core::tls::server_config_from_der(identity, None)?;
    let builder = Server::builder(tls)
        .add_service(EchoServer::new(EchoImpl))
        .metrics(metrics);
    // Kept while serving: upkeep as the exporter's HTTP listener runs it.
    let mut _upkeep = None;
    if metrics {
        // What `rpc-server --metrics-listen` records into, without the
        // HTTP listener (nobody scrapes here), with the listener's upkeep:
        // every 5 s it folds recorded values into the histograms.
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    srpc::server::metrics::SERVER_CALL_DURATION.into(),
                ),
                &srpc::server::metrics::DURATION_BUCKETS,
            )?
            .build_recorder();
        let handle = recorder.handle();
        // SRPC_BENCH_NO_RECORDER: time and look up as usual, record into
        // the facade's no-op recorder: what the exporter's part costs.
        if std::env::var_os("SRPC_BENCH_NO_RECORDER").is_none() {
            metrics::set_global_recorder(recorder)?;
        }
        _upkeep = Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    handle.run_upkeep();
                }
            },
        )));
    }
    let server = builder.build()?;
    server.serve(listener, std::future::pending()).await?;
    Ok(())
}

pub(super) struct Dialer {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Dialer {
    pub(super) fn new(
        addr: SocketAddr,
        certs: &Certs,
        handshake: Handshake,
        verifier: Arc<CountingVerifier>,
    ) -> anyhow::Result<Self> {
        let ca = rpc_core::tls::certs_from_pem(&certs.ca)?;
        let mut config = (*rpc_core::tls::client_config_from_der(ca, None)?).clone();
        // The same webpki check of the same CA as srpc's own, counted.
        config.dangerous().set_certificate_verifier(verifier);
        if handshake == Handshake::Full {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Dialer {
            addr: addr.to_string(),
            tls: Arc::new(config),
        })
    }

    pub(super) async fn connect(&self) -> anyhow::Result<SrpcCaller> {
        let client = Client::builder(self.tls.clone())
            .server_name(SERVER_NAME)
            .connect(&self.addr)
            .await?;
        Ok(SrpcCaller(EchoClient::new(client)))
    }
}

/// An srpc client over `addrs` (`a,b,c`) with `balance`, for the
/// balancing benchmark: the caller, and the client for its endpoint counts.
pub(crate) async fn caller_over(
    addrs: &str,
    certs: &Certs,
    balance: srpc::Balance,
) -> anyhow::Result<(Arc<dyn Caller>, Client)> {
    let ca = rpc_core::tls::certs_from_pem(&certs.ca)?;
    let tls = rpc_core::tls::client_config_from_der(ca, None)?;
    let client = Client::builder(tls)
        .server_name(SERVER_NAME)
        .balance(balance)
        .connect(addrs)
        .await?;
    Ok((
        Arc::new(SrpcCaller(EchoClient::new(client.clone()))),
        client,
    ))
}

pub(super) struct SrpcCaller(EchoClient<Client>);

impl Caller for SrpcCaller {
    fn echo(&self, payload: Bytes) -> BoxFut<'_, usize> {
        Box::pin(async move { Ok(self.0.echo(payload).await?.len()) })
    }

    fn stream(&self, total: u64) -> BoxFut<'_, u64> {
        Box::pin(async move {
            let options = CallOptions::new().timeout(std::time::Duration::from_secs(600));
            let mut items = self.0.with_options(options).stream(total).await?;
            let mut got = 0u64;
            while let Some(item) = items.message().await? {
                got += item.len() as u64;
            }
            Ok(got)
        })
    }

    fn close(&self) {
        self.0.as_caller().close();
    }
}
