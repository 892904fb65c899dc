//! From a TCP socket to a running [`Connection`], for both sides.
//!
//! ```text
//! TcpStream (TCP_NODELAY) ── TLS handshake (timeout, ALPN srpc/1 checked)
//!     ── Hello both ways (timeout, version checked) ── connection::start
//! ```
//!
//! The TCP socket is wrapped in byte clocks (`metered.rs`) *under* TLS, so
//! the heartbeat sees every byte that arrives, not only whole TLS records.
//!
//! Neither side waits for the other's `Hello` before sending its own, and
//! both hand theirs to rustls before the handshake ends: the client's leaves
//! in the same write as its Finished, the server's with its handshake flight
//! (or, when it asks for a client certificate, right after the handshake).
//! Each then reads the peer's, within the smaller of the `Hello` timeout and
//! the heartbeat timeout.
//! The peer's first frame is read with `read_exact` into a buffer of exactly
//! its announced length (after checking it against the frame limit), so no
//! byte that follows it is consumed before the driver takes over.
//!
//! A version mismatch is refused on both sides: each side can read the other's
//! version (see the compatibility rule in [`crate::frame`]), the side that
//! notices sends `GoAway` naming both versions, and both close.
//!
//! Not here: accept loops, connection limits, reconnects (server and client
//! crates).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor, TlsConnector};
use tokio_util::codec::Encoder;
use tracing::debug;

use crate::calls::incoming::Dispatch;
use crate::codec;
use crate::config::ConnectionConfig;
use crate::connection::{self, Connection};
use crate::error::{escape_peer_text, Error, MAX_PEER_REASON};
use crate::frame::{decode_frame, Frame, Hello, FRAME_DEPTH, LENGTH_PREFIX, PROTOCOL_VERSION};
use crate::framing::FrameCodec;
use crate::metered::{ByteClocks, Metered};
use crate::tls::{check_alpn, ALPN};

/// A started connection: the handle, and the driver future to spawn.
pub type Started = (
    Connection,
    std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>,
);

/// Our `Hello` for a config.
pub fn hello_for(config: &ConnectionConfig) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        max_frame: u32::try_from(config.max_frame).unwrap_or(u32::MAX),
        heartbeat_ms: u32::try_from(config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
        max_in_flight: u32::try_from(config.max_in_flight).unwrap_or(u32::MAX),
    }
}

/// Server side: TLS handshake, ALPN check, `Hello`, driver.
pub async fn accept(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    config: &ConnectionConfig,
    dispatch: Arc<dyn Dispatch>,
) -> Result<Started, Error> {
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr()?;
    let clocks = ByteClocks::new(Instant::now());
    let tcp = Metered::new(tcp, clocks.clone());
    let hello = encode_frame(Frame::Hello(hello_for(config)), config.max_frame)?;
    let handshake = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
        let offers_srpc = start
            .client_hello()
            .alpn()
            .is_some_and(|mut names| names.any(|name| name == ALPN));
        // A client offering srpc gets our Hello handed to rustls before the
        // handshake, so it leaves with the server's handshake flight (TLS
        // 1.3 "0.5-RTT" data) when the config allows that and asks for no
        // client certificate, or else as soon as the handshake completes.
        // Either way the client need not wait a round trip for it.
        let mut queued = false;
        let tls = start
            .into_stream_with(acceptor.config().clone(), |conn| {
                queued =
                    offers_srpc && std::io::Write::write_all(&mut conn.writer(), &hello).is_ok();
            })
            .await?;
        Ok::<_, std::io::Error>((tls, queued))
    };
    let (tls, hello_sent) = tokio::time::timeout(config.handshake_timeout, handshake)
        .await
        .map_err(|_| Error::HandshakeTimeout(config.handshake_timeout))?
        .map_err(Error::Handshake)?;
    check_alpn(tls.get_ref().1.alpn_protocol())?;
    debug!(%peer, "TLS handshake done");
    let identity = peer_cert(tls.get_ref().1.peer_certificates());
    let ours = if hello_sent {
        OurHello::Flush
    } else {
        OurHello::Write
    };
    finish(tls, clocks, identity, peer, config, Some(dispatch), ours).await
}

/// Server side, over a limit: completes TLS, then answers the client's
/// `Hello` with `GoAway(reason)` instead of a `Hello`, and closes. The client
/// sees [`Error::GoAway`] with the reason, not a reset.
pub async fn refuse(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    config: &ConnectionConfig,
    reason: String,
) -> Result<(), Error> {
    let _ = tcp.set_nodelay(true);
    let mut tls = tokio::time::timeout(config.handshake_timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| Error::HandshakeTimeout(config.handshake_timeout))?
        .map_err(Error::Handshake)?;
    // Answer first: a client may hold its Hello back until ours arrives.
    // Then read the client's Hello (or its close): closing with unread bytes
    // would reset the connection, and the reset could overtake our answer.
    write_frame(&mut tls, Frame::GoAway { reason }, config.max_frame).await?;
    let hello_wait = config.hello_timeout.min(config.heartbeat_timeout);
    let _ = tokio::time::timeout(hello_wait, read_frame(&mut tls, config.max_frame)).await;
    tls.shutdown().await?;
    Ok(())
}

/// Client side: TCP connect, TLS handshake (the server's certificate is
/// verified for `server_name`), ALPN check, `Hello`, driver.
pub async fn connect(
    addr: SocketAddr,
    server_name: ServerName<'static>,
    connector: &TlsConnector,
    config: &ConnectionConfig,
) -> Result<Started, Error> {
    let tcp = tokio::time::timeout(config.handshake_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::HandshakeTimeout(config.handshake_timeout))??;
    let _ = tcp.set_nodelay(true);
    let clocks = ByteClocks::new(Instant::now());
    let tcp = Metered::new(tcp, clocks.clone());
    // Our Hello is handed to rustls before the handshake: it is sent right
    // after our Finished, in the same write, so the server reads both with
    // one wake-up (written after the handshake, it went on its own or
    // waited for the first call). The server may read it before it has
    // sent its own; our Hello does not depend on the server's.
    let hello = encode_frame(Frame::Hello(hello_for(config)), config.max_frame)?;
    let mut queued = false;
    let handshake = connector.connect_with(server_name, tcp, |conn| {
        queued = std::io::Write::write_all(&mut conn.writer(), &hello).is_ok();
    });
    let tls = tokio::time::timeout(config.handshake_timeout, handshake)
        .await
        .map_err(|_| Error::HandshakeTimeout(config.handshake_timeout))?
        .map_err(Error::Handshake)?;
    check_alpn(tls.get_ref().1.alpn_protocol())?;
    debug!(%addr, "TLS handshake done");
    let identity = peer_cert(tls.get_ref().1.peer_certificates());
    let ours = if queued {
        OurHello::Sent
    } else {
        OurHello::Write
    };
    finish(tls, clocks, identity, addr, config, None, ours).await
}

/// The peer's end-entity certificate, if it sent one (its names are read
/// only when asked for).
fn peer_cert(
    certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
) -> Option<rustls::pki_types::CertificateDer<'static>> {
    certs?.first().cloned()
}

async fn finish<S>(
    mut stream: S,
    clocks: Arc<ByteClocks>,
    identity: Option<rustls::pki_types::CertificateDer<'static>>,
    peer: SocketAddr,
    config: &ConnectionConfig,
    dispatch: Option<Arc<dyn Dispatch>>,
    ours: OurHello,
) -> Result<Started, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A peer silent for the heartbeat timeout is dead in any phase.
    let hello_wait = config.hello_timeout.min(config.heartbeat_timeout);
    let peer_hello = tokio::time::timeout(
        hello_wait,
        hello_both_ways(&mut stream, hello_for(config), config.max_frame, ours),
    )
    .await
    .map_err(|_| Error::Protocol(format!("no Hello from the peer within {hello_wait:?}")))??;
    let (conn, driver) =
        connection::start_metered(stream, clocks, identity, config, peer, peer_hello, dispatch);
    Ok((conn, Box::pin(driver)))
}

/// Sends our `Hello`, reads the peer's, and checks the version. On a mismatch
/// or a wrong first frame, tells the peer with `GoAway` before failing.
pub async fn exchange_hello<S>(io: &mut S, ours: Hello, max_frame: usize) -> Result<Hello, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    hello_both_ways(io, ours, max_frame, OurHello::Write).await
}

/// Where our `Hello` stands when the exchange starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OurHello {
    /// Not written yet: write it.
    Write,
    /// Written into the TLS session: make sure it leaves.
    Flush,
    /// Sent with the TLS handshake's last flight.
    Sent,
}

/// [`exchange_hello`], with our `Hello` possibly already in the TLS session.
async fn hello_both_ways<S>(
    io: &mut S,
    ours: Hello,
    max_frame: usize,
    state: OurHello,
) -> Result<Hello, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match state {
        OurHello::Write => write_frame(io, Frame::Hello(ours), max_frame).await?,
        OurHello::Flush => io.flush().await?,
        OurHello::Sent => {}
    }
    let buf = read_frame(io, max_frame).await?;
    let refusal = match decode_frame(buf.clone(), max_frame) {
        Ok(Frame::Hello(h)) if h.version == ours.version => match check_peer_hello(&h) {
            Ok(()) => return Ok(h),
            Err(e) => e,
        },
        Ok(Frame::GoAway { reason }) => {
            return Err(Error::GoAway {
                reason: escape_peer_text(&reason, MAX_PEER_REASON),
            })
        }
        Ok(Frame::Hello(h)) => Error::VersionMismatch {
            ours: ours.version,
            theirs: h.version,
        },
        Ok(other) => Error::Protocol(format!(
            "expected Hello as the first frame, got {}",
            other.kind()
        )),
        // A later version's Hello may not decode as ours; its version does.
        Err(e) => match codec::decode_prefix::<(u32, u16)>(&buf, max_frame, FRAME_DEPTH) {
            Ok((0, theirs)) if theirs != ours.version => Error::VersionMismatch {
                ours: ours.version,
                theirs,
            },
            _ => e,
        },
    };
    let reason = match &refusal {
        Error::VersionMismatch { ours, theirs } => {
            format!("unsupported protocol version {theirs}; this peer speaks version {ours}")
        }
        e => e.to_string(),
    };
    let _ = write_frame(io, Frame::GoAway { reason }, max_frame).await;
    let _ = io.shutdown().await;
    Err(refusal)
}

/// Refuses a `Hello` whose limits cannot work.
fn check_peer_hello(h: &Hello) -> Result<(), Error> {
    if h.max_frame < 64 {
        return Err(Error::Protocol(format!(
            "peer announced a max frame of {} bytes (at least 64 needed)",
            h.max_frame
        )));
    }
    if h.max_in_flight == 0 || h.heartbeat_ms == 0 {
        return Err(Error::Protocol(
            "peer announced zero in-flight calls or a zero heartbeat interval".into(),
        ));
    }
    Ok(())
}

async fn write_frame<S: AsyncWrite + Unpin>(
    io: &mut S,
    frame: Frame,
    max: usize,
) -> Result<(), Error> {
    let buf = encode_frame(frame, max)?;
    io.write_all(&buf).await?;
    io.flush().await?;
    Ok(())
}

/// One frame with its length prefix.
fn encode_frame(frame: Frame, max: usize) -> Result<BytesMut, Error> {
    let mut buf = BytesMut::new();
    FrameCodec::new(max, max).encode(frame, &mut buf)?;
    Ok(buf)
}

async fn read_frame<S: AsyncRead + Unpin>(io: &mut S, max: usize) -> Result<Bytes, Error> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    io.read_exact(&mut prefix).await?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(Error::FrameTooLarge {
            len: len as u64,
            max: max as u64,
        });
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(Bytes::from(buf))
}
