//! Certificates over real TLS on 127.0.0.1: mutual TLS lets in only clients
//! with a certificate from the configured CA, and certificate problems on
//! either side come back as clear errors.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use rpc_client::Client;
use rpc_server::devcerts::{generate, generate_with};
use rpc_server::ServerOptions;
use rpc_tests::{client_tls, client_tls_with_cert, server_tls, server_tls_mtls, TestServer};

async fn mtls_server() -> TestServer {
    let certs = generate().unwrap();
    let tls = server_tls_mtls(&certs, &certs);
    TestServer::start_with_tls(
        certs,
        tls,
        rpc_server::demo::router(),
        ServerOptions::default(),
    )
    .await
}

#[tokio::test]
async fn mutual_tls_serves_a_client_with_a_certificate_from_the_ca() {
    let server = mtls_server().await;
    let client = Client::connect(
        &server.address(),
        client_tls_with_cert(&server.certs, &server.certs),
    )
    .await
    .unwrap();
    let reply: String = client
        .call("Demo.echo", "with a certificate")
        .await
        .unwrap();
    assert_eq!(reply, "with a certificate");
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate_and_says_why() {
    let server = mtls_server().await;
    let err = Client::connect(&server.address(), client_tls(&server.certs))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("CertificateRequired"), "{text}");
    assert!(text.contains("requires a client certificate"), "{text}");
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_certificate_from_another_ca() {
    let server = mtls_server().await;
    let stranger = generate_with("another CA", None).unwrap();
    let err = Client::connect(
        &server.address(),
        client_tls_with_cert(&server.certs, &stranger),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("does not accept this client certificate"),
        "{text}"
    );
    // And an honest client is still served.
    let client = Client::connect(
        &server.address(),
        client_tls_with_cert(&server.certs, &server.certs),
    )
    .await
    .unwrap();
    let reply: String = client.call("Demo.echo", "still served").await.unwrap();
    assert_eq!(reply, "still served");
}

async fn server_with_validity(from: (i32, u8, u8), until: (i32, u8, u8)) -> TestServer {
    let certs = generate_with("srpc dev CA", Some((from, until))).unwrap();
    let tls = server_tls(&certs);
    TestServer::start_with_tls(
        certs,
        tls,
        rpc_server::demo::router(),
        ServerOptions::default(),
    )
    .await
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused_clearly() {
    let server = server_with_validity((2020, 1, 1), (2021, 1, 1)).await;
    let err = Client::connect(&server.address(), client_tls(&server.certs))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(text.contains("has expired"), "{text}");
}

#[tokio::test]
async fn a_server_certificate_not_yet_valid_is_refused_clearly() {
    let server = server_with_validity((2090, 1, 1), (2091, 1, 1)).await;
    let err = Client::connect(&server.address(), client_tls(&server.certs))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(text.contains("not valid yet"), "{text}");
}

#[tokio::test]
async fn handlers_see_the_client_certificate_and_whoami_reports_it() {
    let server = mtls_server().await;
    let client = Client::connect(
        &server.address(),
        client_tls_with_cert(&server.certs, &server.certs),
    )
    .await
    .unwrap();
    let subject: String = client.call("Demo.whoami", &()).await.unwrap();
    assert_eq!(subject, "CN=srpc dev client");
    // Without mutual TLS nobody is identified.
    let plain = TestServer::demo().await;
    let client = plain.client().await;
    let subject: String = client.call("Demo.whoami", &()).await.unwrap();
    assert_eq!(subject, "anonymous");
}

#[tokio::test]
async fn the_authorization_hook_sees_the_identity_and_can_refuse_a_method() {
    use rpc_core::CallContext;
    use rpc_server::{Server, Status, StatusCode};

    let certs = generate().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = {
        let seen = seen.clone();
        Server::builder(server_tls_mtls(&certs, &certs))
            .router(rpc_server::demo::router())
            .authorize(move |ctx: &CallContext| {
                let id = ctx.identity().expect("mTLS gives every call an identity");
                seen.lock()
                    .unwrap()
                    .push((id.subject.clone(), id.sans.clone()));
                if ctx.method() == "Demo.sleep" && id.common_name() != Some("an operator") {
                    return Err(Status::new(
                        StatusCode::PermissionDenied,
                        "sleep is for operators",
                    ));
                }
                Ok(())
            })
            .build()
            .unwrap()
    };
    let listener = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    let client = Client::connect(&addr, client_tls_with_cert(&certs, &certs))
        .await
        .unwrap();
    let reply: String = client.call("Demo.echo", "allowed").await.unwrap();
    assert_eq!(reply, "allowed");
    let err = client.call::<_, ()>("Demo.sleep", &1u64).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::PermissionDenied), "{err}");
    assert!(err.to_string().contains("sleep is for operators"), "{err}");
    // The connection is still fine, and the hook saw subject and SANs.
    let reply: String = client.call("Demo.echo", "after").await.unwrap();
    assert_eq!(reply, "after");
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen[0],
        (
            "CN=srpc dev client".to_string(),
            vec!["DNS:client.srpc.test".to_string()]
        )
    );
}

#[tokio::test]
async fn reloading_certificates_affects_new_handshakes_only_and_refuses_bad_files() {
    use rpc_server::{Server, TlsFiles};

    let dir = tempfile::tempdir().unwrap();
    rpc_server::devcerts::write_to(dir.path()).unwrap();
    std::fs::copy(dir.path().join("ca.pem"), dir.path().join("ca_a.pem")).unwrap();
    let files = TlsFiles::new(
        dir.path().join("server.pem"),
        dir.path().join("server.key"),
        None,
    );
    let server = Server::builder(files.load().unwrap())
        .router(rpc_server::demo::router())
        .build()
        .unwrap();
    let listener = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    {
        let server = server.clone();
        tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    }
    let trust = |name: &str| rpc_core::tls::client_config(&dir.path().join(name), None).unwrap();
    let old = Client::connect(&addr, trust("ca_a.pem")).await.unwrap();

    // New certificate files from a new CA, then a reload.
    rpc_server::devcerts::write_to(dir.path()).unwrap();
    std::fs::copy(dir.path().join("ca.pem"), dir.path().join("ca_b.pem")).unwrap();
    server.reload_tls_files(&files).unwrap();
    let err = Client::connect(&addr, trust("ca_a.pem"))
        .await
        .expect_err("old certificate still served");
    // Refused for the certificate, not for anything else.
    let text = err.to_string();
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(text.contains("not signed by the CA"), "{text}");
    let fresh = Client::connect(&addr, trust("ca_b.pem")).await.unwrap();
    let reply: String = fresh.call("Demo.echo", "new certificate").await.unwrap();
    assert_eq!(reply, "new certificate");
    // The connection made before the reload is unaffected.
    let reply: String = old.call("Demo.echo", "old connection").await.unwrap();
    assert_eq!(reply, "old connection");

    // A bad file is refused, naming it, and the current certificate stays.
    std::fs::write(dir.path().join("server.pem"), "not a certificate\n").unwrap();
    let err = server.reload_tls_files(&files).unwrap_err();
    assert!(err.to_string().contains("server.pem"), "{err}");
    let again = Client::connect(&addr, trust("ca_b.pem")).await.unwrap();
    let reply: String = again.call("Demo.echo", "still b").await.unwrap();
    assert_eq!(reply, "still b");
}

/// TLS handshake (no srpc `Hello`) with a server config; returns how the
/// handshake went on the client side and the certificate the server saw.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (rustls::HandshakeKind, Option<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .unwrap();
        let seen = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        (tls, seen)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut server_side, seen) = accept.await.unwrap();
    // TLS 1.3 tickets arrive after the handshake: let the server send them
    // and the client read them before this connection goes.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    server_side.write_all(b"x").await.unwrap();
    server_side.flush().await.unwrap();
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    (kind, seen)
}

#[tokio::test]
async fn a_client_resumes_its_session_and_keeps_its_identity_under_mutual_tls() {
    let certs = generate().unwrap();
    let server = server_tls_mtls(&certs, &certs);
    let client = client_tls_with_cert(&certs, &certs);
    let (first, cert1) = handshake(server.clone(), client.clone()).await;
    assert_eq!(first, rustls::HandshakeKind::Full);
    let (second, cert2) = handshake(server.clone(), client.clone()).await;
    assert_eq!(
        second,
        rustls::HandshakeKind::Resumed,
        "the default client config resumes"
    );
    assert!(cert1.is_some(), "the server saw the client certificate");
    assert_eq!(
        cert1, cert2,
        "a resumed session carries the same client certificate"
    );
    // The server sends one ticket per handshake, and a resumed handshake
    // brings the ticket for the next: reconnect after reconnect resumes.
    for round in 3..6 {
        let (kind, cert) = handshake(server.clone(), client.clone()).await;
        assert_eq!(kind, rustls::HandshakeKind::Resumed, "handshake {round}");
        assert_eq!(cert, cert1, "handshake {round}");
    }

    // A new server config (what a certificate or CA reload makes) takes no
    // ticket of the old one: the next handshake is a full one again.
    let reloaded = server_tls_mtls(&certs, &certs);
    let (after_reload, _) = handshake(reloaded, client.clone()).await;
    assert_eq!(after_reload, rustls::HandshakeKind::Full);

    // Resumption is the config's, so it can be turned off.
    let mut off = (*client).clone();
    off.resumption = rustls::client::Resumption::disabled();
    let off = Arc::new(off);
    let (a, _) = handshake(server.clone(), off.clone()).await;
    let (b, _) = handshake(server, off).await;
    assert_eq!(
        (a, b),
        (rustls::HandshakeKind::Full, rustls::HandshakeKind::Full)
    );
}

#[tokio::test]
async fn a_reconnecting_client_is_identified_on_its_resumed_connection() {
    let server = mtls_server().await;
    let tls = client_tls_with_cert(&server.certs, &server.certs);
    for round in 0..3 {
        let client = Client::connect(&server.address(), tls.clone())
            .await
            .unwrap();
        let subject: String = client.call("Demo.whoami", &()).await.unwrap();
        assert_eq!(subject, "CN=srpc dev client", "connection {round}");
        client.close();
        client.closed().await;
    }
}

/// Runs a TLS handshake by hand up to the point where the client has read
/// the server's first flight, without ever sending the client's Finished,
/// and returns the application data the client could read by then (within
/// `wait`).
async fn data_before_the_clients_finished(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    wait: std::time::Duration,
) -> Vec<u8> {
    use std::io::Read;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(tls, name).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut client_hello = Vec::new();
    conn.write_tls(&mut client_hello).unwrap();
    tcp.write_all(&client_hello).await.unwrap();
    let mut plain = Vec::new();
    let read = async {
        let mut buf = vec![0u8; 16 * 1024];
        // Bounded: the timeout below ends it.
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            conn.read_tls(&mut &buf[..n]).unwrap();
            conn.process_new_packets().unwrap();
            let mut chunk = [0u8; 256];
            match conn.reader().read(&mut chunk) {
                Ok(got) if got > 0 => {
                    plain.extend_from_slice(&chunk[..got]);
                    return;
                }
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
    plain
}

#[tokio::test]
async fn the_servers_hello_comes_with_its_handshake_flight() {
    // The client learns the server's limits with the handshake, and so can
    // make its first call without waiting another round trip.
    let server = TestServer::demo().await;
    let plain = data_before_the_clients_finished(
        server.addr,
        client_tls(&server.certs),
        std::time::Duration::from_secs(5),
    )
    .await;
    let frames = rpc_tests::decode_frames(&plain);
    assert!(
        matches!(frames.first(), Some(rpc_core::Frame::Hello(_))),
        "{frames:?} from {plain:?}"
    );
}

#[tokio::test]
async fn under_mutual_tls_nothing_reaches_a_client_before_it_is_authenticated() {
    // Positive control: the same probe, with the same wait, sees the Hello
    // of a server without mutual TLS.
    let open = TestServer::demo().await;
    let seen = data_before_the_clients_finished(
        open.addr,
        client_tls(&open.certs),
        std::time::Duration::from_millis(300),
    )
    .await;
    assert!(
        !seen.is_empty(),
        "the probe saw nothing even without mutual TLS"
    );
    let server = mtls_server().await;
    let plain = data_before_the_clients_finished(
        server.addr,
        client_tls_with_cert(&server.certs, &server.certs),
        std::time::Duration::from_millis(300),
    )
    .await;
    assert!(
        plain.is_empty(),
        "sent before the client's Finished: {plain:?}"
    );
}

#[tokio::test]
async fn the_clients_hello_comes_with_its_handshake_flight() {
    // The client's Hello leaves with its Finished, so the server reads both
    // at once; it does not wait for the client's driver (never polled here)
    // or for a first call.
    use tokio::io::AsyncReadExt;
    let certs = generate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(&certs));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        rpc_tests::send(&mut tls, &rpc_tests::hello_bytes()).await;
        let mut first = vec![0u8; rpc_tests::hello_bytes().len()];
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tls.read_exact(&mut first),
        )
        .await;
        (read.is_ok_and(|r| r.is_ok()), first)
    });
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_tls(&certs));
    let config = rpc_core::ConnectionConfig::default();
    let (conn, _driver) = rpc_core::transport::connect(addr, name, &connector, &config)
        .await
        .unwrap();
    let (arrived, first) = server.await.unwrap();
    assert!(
        arrived,
        "no Hello from the client while its driver was idle"
    );
    let frames = rpc_tests::decode_frames(&first);
    assert!(
        matches!(frames.as_slice(), [rpc_core::Frame::Hello(_)]),
        "{frames:?}"
    );
    conn.close();
}

#[tokio::test]
async fn a_client_that_makes_no_call_completes_its_hello() {
    // A client that connects and then makes no call is a full connection
    // on the server all the same, past the server's Hello timeout.
    let mut options = ServerOptions::default();
    options.connection.hello_timeout = std::time::Duration::from_millis(200);
    let server = TestServer::start(rpc_server::demo::router(), options).await;
    let client = server.client().await;
    let state = client.state();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert!(
        !state.has_changed().unwrap(),
        "the connection was lost: {:?}",
        *state.borrow()
    );
    let reply: String = client.call("Demo.echo", "still here").await.unwrap();
    assert_eq!(reply, "still here");
}

#[tokio::test]
async fn a_client_connection_names_the_server_from_its_certificate() {
    let server = TestServer::start(rpc_server::demo::router(), ServerOptions::default()).await;
    let addr: std::net::SocketAddr = server.address().parse().unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_tls(&server.certs));
    let config = rpc_core::ConnectionConfig::default();
    let (conn, driver) = rpc_core::transport::connect(addr, name, &connector, &config)
        .await
        .unwrap();
    tokio::spawn(driver);
    // Read from the certificate when asked, not during the handshake.
    let id = conn.peer_identity().expect("the server's names");
    assert!(
        id.sans.iter().any(|san| san == "DNS:localhost"),
        "{:?}",
        id.sans
    );
    conn.close();
}

/// The key exchange group each side settled on, after a handshake between
/// a server and a client using the dev certificates with these choices.
async fn negotiated_groups(
    server: rpc_core::tls::KeyExchange,
    client: rpc_core::tls::KeyExchange,
) -> (rustls::NamedGroup, rustls::NamedGroup) {
    let dir = tempfile::tempdir().unwrap();
    rpc_server::devcerts::write_to(dir.path()).unwrap();
    let p = |n: &str| dir.path().join(n);
    let server_cfg =
        rpc_core::tls::server_config_with(&p("server.pem"), &p("server.key"), None, server)
            .unwrap();
    let client_cfg = rpc_core::tls::client_config_with(&p("ca.pem"), None, client).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(tcp)
            .await
            .unwrap();
        tls.get_ref()
            .1
            .negotiated_key_exchange_group()
            .unwrap()
            .name()
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let client_group = tls
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .unwrap()
        .name();
    (accept.await.unwrap(), client_group)
}

#[tokio::test]
async fn the_post_quantum_hybrid_is_negotiated_by_default_and_classical_is_an_opt_out() {
    use rpc_core::tls::KeyExchange::{Classical, PostQuantumHybrid};
    use rustls::NamedGroup::{X25519, X25519MLKEM768};
    assert_eq!(
        negotiated_groups(PostQuantumHybrid, PostQuantumHybrid).await,
        (X25519MLKEM768, X25519MLKEM768)
    );
    // Either side opting out gets a classical group, with no failure.
    assert_eq!(
        negotiated_groups(PostQuantumHybrid, Classical).await,
        (X25519, X25519)
    );
    assert_eq!(
        negotiated_groups(Classical, PostQuantumHybrid).await,
        (X25519, X25519)
    );
    // The configs the rest of the suite uses are the default ones.
    assert_eq!(
        rpc_core::tls::provider().kx_groups[0].name(),
        X25519MLKEM768
    );
}

/// A client certificate from another CA of the same name fails the
/// signature check on the server, whose alert (DecryptError) alone would
/// say nothing about certificates: the client's error does.
#[tokio::test]
async fn a_client_certificate_from_a_same_named_ca_is_reported_as_a_certificate_problem() {
    let ours = rpc_server::devcerts::generate_named("one name").unwrap();
    let theirs = rpc_server::devcerts::generate_named("one name").unwrap();
    let server = TestServer::start_with_tls(
        ours.clone(),
        server_tls_mtls(&ours, &ours),
        rpc_server::demo::router(),
        ServerOptions::default(),
    )
    .await;
    let err = Client::connect(&server.address(), client_tls_with_cert(&ours, &theirs))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("client certificate"), "{text}");
}
