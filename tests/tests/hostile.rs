//! Bad input over real sockets: each case is cut off with a clear reason,
//! and an honest client on the same server goes on being served.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rpc_client::Client;
use rpc_core::{Frame, Hello};
use rpc_server::ServerOptions;
use rpc_tests::{
    client_tls_with_alpn, decode_frames, frame_bytes, goaway_after, hello_bytes, read_until_closed,
    send, still_served, TestServer,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const CUTOFF: Duration = Duration::from_secs(5);

#[tokio::test]
async fn plaintext_on_the_tls_port_is_cut_off() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut tcp, CUTOFF).await;
    assert!(got.is_some(), "plaintext connection left open");
    still_served(&honest).await;
}

#[tokio::test]
async fn length_prefix_0xffffffff_is_refused_naming_the_limit() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let mut bytes = hello_bytes();
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let reason = goaway_after(&server, &bytes).await;
    assert!(reason.contains("4294967295"), "{reason}");
    assert!(reason.contains("limit of 4194304 bytes"), "{reason}");
    still_served(&honest).await;
}

#[tokio::test]
async fn length_prefix_one_over_the_limit_is_refused() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let mut bytes = hello_bytes();
    bytes.extend_from_slice(&(4 * 1024 * 1024 + 1u32).to_be_bytes());
    let reason = goaway_after(&server, &bytes).await;
    assert!(reason.contains("4194305"), "{reason}");
    still_served(&honest).await;
}

#[tokio::test]
async fn garbage_after_the_handshake_is_refused() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let mut bytes = hello_bytes();
    // A plausible length, then bytes that are no Frame (bad variant tag).
    bytes.extend_from_slice(&[0, 0, 0, 6, 0x2a, 0xde, 0xad, 0xbe, 0xef, 0x99]);
    let reason = goaway_after(&server, &bytes).await;
    assert!(reason.contains("malformed message"), "{reason}");
    still_served(&honest).await;
}

#[tokio::test]
async fn random_bytes_instead_of_hello_are_refused() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    // A deterministic "random" stream (xorshift), with a small length first
    // so it is read as one frame.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = vec![0, 0, 0, 200];
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.push(x as u8);
    }
    // Read as the first frame: not a Hello (or no frame at all).
    let reason = goaway_after(&server, &bytes).await;
    assert!(
        reason.starts_with("malformed message:")
            || reason.starts_with("protocol violation: expected Hello"),
        "{reason}"
    );
    still_served(&honest).await;
}

#[tokio::test]
async fn an_empty_frame_is_refused() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let mut bytes = hello_bytes();
    bytes.extend_from_slice(&[0, 0, 0, 0]);
    let reason = goaway_after(&server, &bytes).await;
    assert!(reason.contains("malformed message"), "{reason}");
    still_served(&honest).await;
}

#[tokio::test]
async fn a_request_before_hello_is_refused() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let request = frame_bytes(Frame::Request {
        id: 1,
        method: "Demo.echo".into(),
        deadline_ms: None,
        metadata: rpc_core::Metadata::new(),
        body: bytes::Bytes::from_static(b"\x01x"),
    });
    let reason = goaway_after(&server, &request).await;
    assert!(reason.contains("expected Hello"), "{reason}");
    still_served(&honest).await;
}

#[tokio::test]
async fn another_protocol_version_is_refused_with_both_versions_named() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let ours = rpc_core::PROTOCOL_VERSION;
    // A client from before call metadata (version 1), and a newer one.
    for theirs in [1, ours + 1] {
        let hello = frame_bytes(Frame::Hello(Hello {
            version: theirs,
            max_frame: 1 << 20,
            heartbeat_ms: 5000,
            max_in_flight: 100,
        }));
        let reason = goaway_after(&server, &hello).await;
        assert!(
            reason.contains(&format!("unsupported protocol version {theirs}")),
            "{reason}"
        );
        assert!(reason.contains(&format!("version {ours}")), "{reason}");
    }
    still_served(&honest).await;
}

#[tokio::test]
async fn a_response_sent_to_the_server_is_a_protocol_error() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let mut bytes = hello_bytes();
    bytes.extend(frame_bytes(Frame::Response {
        id: 7,
        result: Ok(bytes::Bytes::new()),
    }));
    let reason = goaway_after(&server, &bytes).await;
    assert!(reason.contains("never made"), "{reason}");
    still_served(&honest).await;
}

#[tokio::test]
async fn clients_without_the_srpc_alpn_are_refused() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    for alpn in [vec![], vec![b"h2".to_vec()]] {
        let tls = client_tls_with_alpn(&server.certs, alpn.clone());
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        match tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
        {
            // rustls refuses a client whose ALPN list has no match...
            Err(e) => assert!(
                e.to_string().contains("NoApplicationProtocol") || e.to_string().contains("alert"),
                "{alpn:?}: {e}"
            ),
            // ...but lets one that offers none finish the handshake; the
            // server's own check must then close the connection.
            Ok(mut stream) => {
                send(&mut stream, &hello_bytes()).await;
                let got = read_until_closed(&mut stream, CUTOFF)
                    .await
                    .expect("left open");
                assert!(decode_frames(&got).is_empty(), "{alpn:?}: server answered");
            }
        }
    }
    still_served(&honest).await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_and_existing_ones_unaffected() {
    let mut options = ServerOptions::default();
    options.max_connections = 1;
    let server = TestServer::start(rpc_server::demo::router(), options).await;
    let first = server.client().await;
    let second = Client::connect(&server.address(), rpc_tests::client_tls(&server.certs)).await;
    let err = second.expect_err("second connection accepted over the limit");
    assert!(
        err.to_string()
            .contains("server at connection limit (1 connections)"),
        "{err}"
    );
    still_served(&first).await;
    // The slot is given back when the first client leaves.
    first.close();
    first.closed().await;
    let mut third = None;
    for _ in 0..50 {
        match Client::connect(&server.address(), rpc_tests::client_tls(&server.certs)).await {
            Ok(c) => {
                third = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    still_served(&third.expect("slot never freed")).await;
}

#[tokio::test]
async fn a_client_trusting_another_ca_fails_with_a_certificate_error() {
    let server = TestServer::demo().await;
    let other = rpc_server::devcerts::generate_named("some other CA").unwrap();
    let err = Client::connect(&server.address(), rpc_tests::client_tls(&other))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("not signed by the CA"), "{text}");
    let honest = server.client().await;
    still_served(&honest).await;
}

#[tokio::test]
async fn server_name_mismatch_fails_with_a_certificate_error() {
    let server = TestServer::demo().await;
    let err = Client::builder(rpc_tests::client_tls(&server.certs))
        .server_name("not-localhost.example")
        .connect(&server.address())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn missing_or_garbled_pem_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = rpc_server::devcerts::write_to(dir.path()).unwrap();
    let (cert, key) = (&certs[2], &certs[3]);
    let missing = dir.path().join("missing.pem");
    let err = rpc_core::tls::server_config(&missing, key, None).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let garbled = dir.path().join("garbled.pem");
    std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n").unwrap();
    let err = rpc_core::tls::server_config(&garbled, key, None).unwrap_err();
    assert!(err.to_string().contains("garbled.pem"), "{err}");
    let err = rpc_core::tls::server_config(cert, &garbled, None).unwrap_err();
    assert!(err.to_string().contains("garbled.pem"), "{err}");
}

#[tokio::test]
async fn malformed_bincode_in_a_valid_frame_is_refused_each_way() {
    let server = TestServer::demo().await;
    let honest = server.client().await;
    let request = frame_bytes(Frame::Request {
        id: 1,
        method: "Demo.echo".into(),
        deadline_ms: None,
        metadata: rpc_core::Metadata::new(),
        body: bytes::Bytes::from_static(b"\x02hi"),
    });
    let body = &request[4..];
    let with_len = |b: &[u8]| {
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    };
    let truncated = with_len(&body[..body.len() - 2]);
    let mut trailing = body.to_vec();
    trailing.extend_from_slice(b"!!");
    let trailing = with_len(&trailing);
    // Request id 1, then a 2-byte method name that is not UTF-8.
    let bad_utf8 = with_len(&[1, 1, 2, 0xc3, 0x28, 0, 0]);
    for (name, bytes) in [
        ("truncated", truncated),
        ("trailing bytes", trailing),
        ("invalid UTF-8", bad_utf8),
    ] {
        let mut all = hello_bytes();
        all.extend(bytes);
        let reason = goaway_after(&server, &all).await;
        assert!(reason.contains("malformed message"), "{name}: {reason}");
    }
    still_served(&honest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_silent_sockets_do_not_slow_a_real_client() {
    let server = TestServer::demo().await;
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let started = std::time::Instant::now();
    let client = server.client().await;
    still_served(&client).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "a real client took {took:?}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_cap_wait_for_a_slot() {
    let mut options = ServerOptions::default();
    options.max_handshakes = 2;
    options.connection.handshake_timeout = Duration::from_millis(700);
    let server = TestServer::start(rpc_server::demo::router(), options).await;
    // Two silent sockets hold both handshake slots until they time out.
    let _a = TcpStream::connect(server.addr).await.unwrap();
    let _b = TcpStream::connect(server.addr).await.unwrap();
    // Slots go in arrival order, but a waiter's own timeout must not end in
    // the timer tick that frees the slot: arrive a few ticks later.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let client = server.client().await;
    let waited = started.elapsed();
    still_served(&client).await;
    assert!(
        waited >= Duration::from_millis(500),
        "did not wait for a slot: {waited:?}"
    );
}
