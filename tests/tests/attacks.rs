//! Attack classes against a server over real TLS, each with the outcome it
//! must get: the `GoAway` reason, the status, or that honest clients are
//! served (or refused) as documented.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rpc_core::{Frame, Hello, StatusCode};
use rpc_server::ServerOptions;
use rpc_tests::{
    client_tls, decode_frames, frame_bytes, goaway_after, hello_bytes, read_until_closed, send,
    still_served, TestServer,
};
use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn hello(max_frame: u32, heartbeat_ms: u32, max_in_flight: u32) -> Vec<u8> {
    frame_bytes(Frame::Hello(Hello {
        version: rpc_core::PROTOCOL_VERSION,
        max_frame,
        heartbeat_ms,
        max_in_flight,
    }))
}

fn request(id: u64, method: &str, body: Bytes) -> Vec<u8> {
    frame_bytes(Frame::Request {
        id,
        method: method.into(),
        deadline_ms: None,
        metadata: rpc_core::Metadata::new(),
        body,
    })
}

fn echo(id: u64) -> Vec<u8> {
    request(
        id,
        "Demo.echo",
        rpc_core::codec::encode(&("hi",), 64).unwrap(),
    )
}

/// Reads frames from `stream` until one answers call `id` (within 5 s);
/// returns every frame read, that answer last.
async fn frames_until_answer<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    id: u64,
) -> Vec<Frame> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before call {id} was answered: {:?}",
                decode_frames(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let frames = decode_frames(&got);
            if frames
                .iter()
                .any(|f| matches!(f, Frame::Response { id: i, .. } if *i == id))
            {
                return frames;
            }
        }
    })
    .await
    .expect("no answer in time")
}

#[tokio::test]
async fn a_second_hello_is_a_protocol_error() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let mut bytes = hello_bytes();
    bytes.extend(hello_bytes());
    let reason = goaway_after(&server, &bytes).await;
    assert_eq!(reason, "protocol violation: second Hello on one connection");
    still_served(&honest).await;
}

#[tokio::test]
async fn a_hello_with_limits_that_cannot_work_is_refused_naming_them() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    for (bytes, expected) in [
        // Below a frame header: no reply could ever fit.
        (
            hello(3, 5000, 100),
            "max frame of 3 bytes (at least 64 needed)",
        ),
        (hello(63, 5000, 100), "max frame of 63 bytes"),
        (hello(1 << 20, 5000, 0), "zero in-flight calls"),
        (hello(1 << 20, 0, 100), "zero heartbeat interval"),
    ] {
        let reason = goaway_after(&server, &bytes).await;
        assert!(reason.contains(expected), "{reason}");
    }
    still_served(&honest).await;
}

#[tokio::test]
async fn a_hello_with_the_largest_values_is_served() {
    let server = TestServer::demo().await;
    let mut tls = server.raw_tls().await;
    let mut bytes = hello(u32::MAX, u32::MAX, u32::MAX);
    bytes.extend(echo(1));
    send(&mut tls, &bytes).await;
    let frames = frames_until_answer(&mut tls, 1).await;
    let answer = frames.iter().find_map(|f| match f {
        Frame::Response { id: 1, result } => Some(result.clone()),
        _ => None,
    });
    assert!(matches!(answer, Some(Ok(_))), "{frames:?}");
}

#[tokio::test]
async fn a_cancel_storm_is_harmless_and_a_cancel_for_a_call_never_made_is_refused() {
    let stopped = Arc::new(std::sync::Mutex::new(None));
    let router = rpc_tests::with_hold(rpc_server::demo::router(), stopped.clone());
    let server = TestServer::start(router, ServerOptions::default()).await;
    let mut tls = server.raw_tls().await;
    let mut bytes = hello_bytes();
    bytes.extend(request(5, "hold", rpc_core::codec::encode(&(), 8).unwrap()));
    // Ten thousand cancels of the held call and of ids already past.
    for i in 0..10_000u64 {
        bytes.extend(frame_bytes(Frame::Cancel { id: i % 6 }));
    }
    bytes.extend(echo(6));
    send(&mut tls, &bytes).await;
    let frames = frames_until_answer(&mut tls, 6).await;
    assert!(
        !frames.iter().any(|f| matches!(f, Frame::GoAway { .. })),
        "{frames:?}"
    );
    // The held call was stopped by the first of them, and not answered.
    assert!(
        stopped.lock().unwrap().is_some(),
        "the held handler still runs"
    );
    assert!(!frames
        .iter()
        .any(|f| matches!(f, Frame::Response { id: 5, .. })));
    // A cancel for an id above any requested is a protocol error.
    send(&mut tls, &frame_bytes(Frame::Cancel { id: 999 })).await;
    let rest = read_until_closed(&mut tls, Duration::from_secs(5))
        .await
        .expect("left open");
    let reasons: Vec<_> = decode_frames(&rest)
        .into_iter()
        .filter_map(|f| match f {
            Frame::GoAway { reason } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        ["protocol violation: Cancel for call 999, which was never requested"]
    );
}

#[tokio::test]
async fn pong_and_goaway_floods_leave_the_connection_serving() {
    let server = TestServer::demo().await;
    let mut tls = server.raw_tls().await;
    let mut bytes = hello_bytes();
    for nonce in 0..10_000u64 {
        bytes.extend(frame_bytes(Frame::Pong { nonce }));
    }
    // A client's GoAway says it makes no more calls; a flood of them, with
    // terminal escapes in the reason, changes nothing else.
    for _ in 0..1_000 {
        bytes.extend(frame_bytes(Frame::GoAway {
            reason: "\u{1b}[2J bye".into(),
        }));
    }
    bytes.extend(echo(1));
    send(&mut tls, &bytes).await;
    let frames = frames_until_answer(&mut tls, 1).await;
    assert!(
        !frames.iter().any(|f| matches!(f, Frame::GoAway { .. })),
        "{frames:?}"
    );
    let answer = frames.iter().find_map(|f| match f {
        Frame::Response { id: 1, result } => Some(result.clone()),
        _ => None,
    });
    assert!(matches!(answer, Some(Ok(_))), "{answer:?}");
}

#[tokio::test]
async fn an_unknown_method_is_refused_with_its_name_escaped_and_cut() {
    let server = TestServer::demo().await;
    let mut tls = server.raw_tls().await;
    let name = format!("\u{1b}]0;pwned\u{7}{}", "\u{1}".repeat(100_000));
    let mut bytes = hello_bytes();
    bytes.extend(request(1, &name, Bytes::new()));
    send(&mut tls, &bytes).await;
    let frames = frames_until_answer(&mut tls, 1).await;
    let status = frames
        .iter()
        .find_map(|f| match f {
            Frame::Response {
                id: 1,
                result: Err(s),
            } => Some(s.clone()),
            _ => None,
        })
        .expect("an error status");
    assert_eq!(status.code, StatusCode::UnknownMethod);
    assert!(
        status
            .message
            .starts_with("no method named \"\\u{1b}]0;pwned\\u{7}"),
        "{}",
        &status.message[..60]
    );
    assert!(status.message.len() < 2048, "{}", status.message.len());
    assert!(!status.message.chars().any(char::is_control));
}

#[tokio::test]
async fn a_tls_1_2_only_client_is_refused() {
    let server = TestServer::demo().await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rpc_tests::cert_der(&server.certs.ca_pem))
        .unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![rpc_tests::SRPC_ALPN.to_vec()];
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let err = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect_err("TLS 1.2 was accepted");
    assert!(err.to_string().contains("ProtocolVersion"), "{err}");
    still_served(&server.client().await).await;
}

/// Over the connection limit, at most 64 refusals (TLS handshake, then
/// `GoAway`) run at once; a connection beyond that is closed without a
/// word. Connections within the limit are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_64_refusals_at_once_connections_are_closed_at_once() {
    let mut options = ServerOptions::default();
    options.max_connections = 1;
    options.connection.handshake_timeout = Duration::from_secs(30);
    let server = TestServer::start(rpc_server::demo::router(), options).await;
    let honest = server.client().await;
    // 64 silent sockets over the limit: each holds a refusal slot while
    // the server waits for its TLS handshake. Accepted in order, so the
    // next connection finds the slots taken.
    let mut silent = Vec::new();
    for _ in 0..rpc_server::MAX_REFUSALS {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let closed = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert_eq!(
        closed,
        Some(vec![]),
        "the 65th was not closed at once, without a word"
    );
    still_served(&honest).await;
    // With the slots back, an over-limit client is told why.
    drop(silent);
    let mut told = None;
    for _ in 0..20 {
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        if let Ok(mut tls) = TlsConnector::from(client_tls(&server.certs))
            .connect(name, tcp)
            .await
        {
            // The refusal waits for our Hello (or a close) before it closes.
            send(&mut tls, &hello_bytes()).await;
            let got = read_until_closed(&mut tls, Duration::from_secs(5))
                .await
                .unwrap_or_default();
            told = decode_frames(&got).into_iter().find_map(|f| match f {
                Frame::GoAway { reason } => Some(reason),
                _ => None,
            });
            if told.is_some() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reason = told.expect("no GoAway once the refusal slots were free");
    assert!(reason.contains("connection limit"), "{reason}");
    still_served(&honest).await;
}

/// Silent TLS starts hold handshake slots: later connections wait for one
/// in arrival order, each for at most the handshake timeout, and are
/// dropped (closed before TLS) if none frees in time. Honest clients that
/// arrive once the silent ones have timed out are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_slots_go_in_arrival_order_and_a_wait_ends_at_the_handshake_timeout() {
    let timeout = Duration::from_millis(500);
    let mut options = ServerOptions::default();
    options.max_handshakes = 1;
    options.connection.handshake_timeout = timeout;
    let server = TestServer::start(rpc_server::demo::router(), options).await;
    // The first holds the slot for the timeout; the second is next in line
    // and holds it for another timeout after that.
    let _first = TcpStream::connect(server.addr).await.unwrap();
    // Apart by more than a timer tick, so the second's wait does not end
    // in the same tick as the first's handshake timeout.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _second = TcpStream::connect(server.addr).await.unwrap();
    let started = std::time::Instant::now();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let err = TlsConnector::from(client_tls(&server.certs))
        .connect(name, tcp)
        .await
        .expect_err("a third in line got a handshake slot within the timeout");
    let waited = started.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(100) && waited < 3 * timeout,
        "dropped after {waited:?} ({err})"
    );
    // Once both silent sockets have timed out, an honest client is served.
    tokio::time::sleep(2 * timeout - waited.min(2 * timeout)).await;
    still_served(&server.client().await).await;
}
