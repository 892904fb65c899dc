//! Prints the size of a call's future, untyped and through a generated
//! client. The benchmark boxes each call's future, and glibc serves blocks
//! up to 1,032 bytes from its per-thread cache; past that `malloc` takes
//! its slower path (bench/RESULTS.md, "The core re-cut's cost"). Run it in
//! release: `cargo run --release -p rpc-tests --example future_size`.

// An example: a panic is its error report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;

/// A service like the benchmark's.
#[rpc_macros::service(crate = rpc_core)]
pub trait Echo {
    /// Returns `data`.
    async fn echo(&self, data: Bytes) -> Bytes;
}

#[tokio::main]
async fn main() {
    let tls = rustls::ClientConfig::builder_with_provider(rpc_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    // No server needed: a client over an empty set of servers.
    let (_changes, source) = rpc_client::discovery::channel();
    let client = rpc_client::Client::builder(std::sync::Arc::new(tls))
        .discover(source)
        .unwrap();
    let call = client.call::<_, u64>("Demo.add", &(1i64, 2i64));
    println!("client.call: {} bytes", std::mem::size_of_val(&call));
    let (io, _peer) = tokio::io::duplex(64);
    let config = rpc_core::ConnectionConfig::default();
    let hello = rpc_core::transport::hello_for(&config);
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
    let (conn, _driver) = rpc_core::connection::start(io, &config, peer, hello, None);
    let call = conn.call("Demo.add", Bytes::new(), std::time::Duration::from_secs(1));
    println!("Connection::call: {} bytes", std::mem::size_of_val(&call));
    let echo = EchoClient::new(client.clone());
    let call = echo.echo(Bytes::from_static(b"x"));
    println!(
        "generated client call: {} bytes",
        std::mem::size_of_val(&call)
    );
}
