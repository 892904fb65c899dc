//! What do connections that announce a maximum-size frame and then dribble
//! cost the server in resident memory? Prints the figures, and fails when a
//! dribbling connection costs more than [`LIMIT_KIB`] (the announced 4 MiB
//! becoming resident would cost ~4,096). CI runs it with 100 connections.
//!
//! ```sh
//! cargo run --release -p rpc-tests --example dribble_memory -- 300
//! ```
//!
//! The server runs in a child process (this program, re-run with `server`);
//! the parent opens N TLS connections on 127.0.0.1 and reads the child's
//! VmRSS from /proc three times: with no client, with N idle connections
//! (after `Hello`), and after each connection announced a 4 MiB frame and
//! sent a few bytes of it. `LengthDelimitedCodec` reserves the announced
//! length in its read buffer when it reads the length prefix; this shows
//! whether that reservation becomes resident memory. Each reading is taken
//! once the server has read every byte sent to it (its sockets' receive
//! queues in /proc/net/tcp are empty), not after a guessed pause.

// A measurement program: a failed step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use rpc_server::{Server, ServerOptions};
use rpc_tests::{hello_bytes, raw_tls_with, send};

/// Past this many KiB of resident memory per dribbling connection, fail
/// (measured: about 12).
const LIMIT_KIB: f64 = 64.0;

/// Bytes that arrived for sockets on local port `port` and that the server
/// has not read yet (IPv4 loopback sockets, from /proc/net/tcp).
fn unread_bytes(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            let rx = u64::from_str_radix(fields.get(4)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port).then_some(rx)
        })
        .sum()
}

/// Waits (at most 10 s) until the server has read everything sent to it.
async fn until_read(port: u16) {
    for _ in 0..1000 {
        if unread_bytes(port) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server left {} bytes unread", unread_bytes(port));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn serve() {
    let certs = rpc_server::devcerts::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &certs.ca_pem).unwrap();
    let server = Server::builder(rpc_tests::server_tls(&certs))
        .options(ServerOptions::default())
        .router(rpc_server::demo::router())
        .build()
        .unwrap();
    let listener = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    println!(
        "{} {}",
        listener.local_addr().unwrap(),
        dir.path().display()
    );
    // Runs until the parent kills it.
    server
        .serve(listener, std::future::pending())
        .await
        .unwrap();
}

#[tokio::main]
async fn main() {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "300".into());
    if arg == "server" {
        return serve().await;
    }
    let n: usize = arg.parse().expect("connections: a number");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("server")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut parts = line.split_whitespace();
    let addr: std::net::SocketAddr = parts.next().unwrap().parse().unwrap();
    let ca_pem = std::fs::read_to_string(format!("{}/ca.pem", parts.next().unwrap())).unwrap();
    let pid = child.id();
    let base = rss_kib(pid);

    // The client side only needs the CA.
    let ca = rpc_tests::cert_der(&ca_pem);
    let tls = rpc_core::tls::client_config_from_der(vec![ca], None).unwrap();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = raw_tls_with(addr, tls.clone()).await;
        send(&mut s, &hello_bytes()).await;
        conns.push(s);
    }
    until_read(addr.port()).await;
    let idle = rss_kib(pid);

    // Each announces 4 MiB, then sends 4 KiB of it, a few bytes at a time.
    for s in &mut conns {
        send(s, &(4u32 * 1024 * 1024).to_be_bytes()).await;
    }
    for _ in 0..8 {
        for s in &mut conns {
            send(s, &[0u8; 512]).await;
        }
        until_read(addr.port()).await;
    }
    let dribbling = rss_kib(pid);
    child.kill().unwrap();
    let _ = child.wait();
    let each = dribbling.saturating_sub(idle) as f64 / n as f64;

    println!("server RSS with no client:                  {base} KiB");
    println!(
        "with {n} idle connections:                 {idle} KiB ({:.1} KiB each)",
        (idle - base) as f64 / n as f64
    );
    println!(
        "after each announced 4 MiB and sent 4 KiB: {dribbling} KiB ({each:.1} KiB more each; announced total {} MiB)",
        4 * n
    );
    assert!(
        each < LIMIT_KIB,
        "a dribbling connection cost the server {each:.1} KiB (limit {LIMIT_KIB})"
    );
}
