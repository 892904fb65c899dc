//! The `rpc-server` binary: gen-certs, refusing bad certificate files with an
//! error naming the file, and a clean exit on SIGTERM.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rpc-server"))
}

/// `rpc-server gen-certs --force --out dir`, which must succeed.
fn gen_certs(dir: &std::path::Path) {
    let out = server()
        .args(["gen-certs", "--force", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `rpc-server` on 127.0.0.1:0 with `dir`'s server certificate and
/// returns it with the address from its `listening on ADDR` line.
fn serve(dir: &std::path::Path) -> (std::process::Child, String) {
    serve_with(dir, |c| {
        c.stderr(Stdio::null());
    })
}

/// [`serve`], with `configure` applied to the command first (its log, its
/// environment).
fn serve_with(
    dir: &std::path::Path,
    configure: impl FnOnce(&mut Command),
) -> (std::process::Child, String) {
    let mut command = server();
    command
        .args(["--listen", "127.0.0.1:0", "--cert"])
        .arg(dir.join("server.pem"))
        .arg("--key")
        .arg(dir.join("server.key"))
        .stdout(Stdio::piped());
    configure(&mut command);
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line}");
    let addr = line.trim().trim_start_matches("listening on ").to_owned();
    (child, addr)
}

#[test]
fn gen_certs_writes_six_files_with_private_keys_0600() {
    let dir = tempfile::tempdir().unwrap();
    let out = server()
        .args(["gen-certs", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8(out.stdout).unwrap();
    for name in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ] {
        let path = dir.path().join(name);
        assert!(path.exists(), "{name} missing");
        assert!(listed.contains(name), "{name} not listed: {listed}");
        #[cfg(unix)]
        if name.ends_with(".key") {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
    }
}

#[test]
fn missing_or_garbled_pem_refuses_to_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbled = dir.path().join("garbled.pem");
    std::fs::write(&garbled, "this is not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    for cert in [&missing, &garbled] {
        let out = server()
            .args(["--listen", "127.0.0.1:0", "--cert"])
            .arg(cert)
            .arg("--key")
            .arg(&garbled)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = cert.file_name().unwrap().to_str().unwrap();
        assert!(
            stderr.contains(name),
            "stderr does not name {name}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "printed to stdout: {:?}", out.stdout);
    }
}

#[test]
fn serving_without_certificates_is_a_clear_error() {
    let out = server().args(["--listen", "127.0.0.1:0"]).output().unwrap();
    // A usage error: exit 2, as for any other bad argument.
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--cert and --key are required"), "{stderr}");
    let out = server()
        .args(["--max-connections", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_explains_flags_and_gives_an_example() {
    let out = server().arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "gen-certs",
        "--listen",
        "--cert",
        "--max-frame-bytes",
        "--handshake-timeout",
        "Examples:",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[cfg(unix)]
#[test]
fn sigterm_stops_the_server_with_exit_status_0() {
    let dir = tempfile::tempdir().unwrap();
    gen_certs(dir.path());
    let (mut child, _addr) = serve(dir.path());
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("server did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when a client trusting `ca` completes TLS + Hello with the server.
fn handshake_ok(addr: &str, ca: &std::path::Path) -> bool {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tls = rpc_core::tls::client_config(ca, None).unwrap();
        let connector = tokio_rustls::TlsConnector::from(tls);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let config = rpc_core::ConnectionConfig::default();
        rpc_core::transport::connect(addr.parse().unwrap(), name, &connector, &config)
            .await
            .is_ok()
    })
}

#[cfg(unix)]
#[test]
fn sighup_reloads_the_certificate_and_a_bad_file_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    gen_certs(dir.path());
    std::fs::copy(p("ca.pem"), p("ca_a.pem")).unwrap();
    let (mut child, addr) = serve(dir.path());
    let hup = |pid: u32| {
        assert!(Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    };
    assert!(handshake_ok(&addr, &p("ca_a.pem")));

    // New files in place, SIGHUP: new handshakes use them.
    gen_certs(dir.path());
    std::fs::copy(p("ca.pem"), p("ca_b.pem")).unwrap();
    hup(child.id());
    // The reload is done once a handshake with the new CA succeeds.
    assert!(
        (0..100).any(|_| handshake_ok(&addr, &p("ca_b.pem")) || {
            std::thread::sleep(Duration::from_millis(50));
            false
        }),
        "new certificate not in use within 5 s of SIGHUP"
    );
    assert!(
        !handshake_ok(&addr, &p("ca_a.pem")),
        "old certificate still in use after SIGHUP"
    );

    // A garbled file, SIGHUP: refused, the current certificate stays.
    std::fs::write(p("server.pem"), "garbage\n").unwrap();
    hup(child.id());
    // A refused reload changes nothing that can be waited for: give it
    // time to have happened.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        handshake_ok(&addr, &p("ca_b.pem")),
        "a bad file replaced a good certificate"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "server exited on a bad reload"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Logged to a pipe: plain text (no ANSI colour), and no INFO line per
/// connection (accepts, handshakes and closes are DEBUG).
#[cfg(unix)]
#[test]
fn logs_to_a_pipe_have_no_colour_and_no_line_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    gen_certs(dir.path());
    let (child, addr) = serve_with(dir.path(), |c| {
        c.env_remove("NO_COLOR")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped());
    });
    for _ in 0..3 {
        assert!(handshake_ok(&addr, &dir.path().join("ca.pem")));
    }
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("INFO"), "no INFO line at all: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
    for per_connection in ["accepted", "connection established", "connection closed"] {
        assert!(
            !log.contains(per_connection),
            "{per_connection:?} at INFO: {log}"
        );
    }
}

/// The subject of the first certificate in a PEM file.
fn subject(path: &std::path::Path) -> String {
    let pem = std::fs::read_to_string(path).unwrap();
    let der = rpc_core::tls::certs_from_pem(&pem).unwrap();
    rpc_core::PeerIdentity::from_der(&der[0]).unwrap().subject
}

#[test]
fn gen_certs_refuses_to_overwrite_without_force_and_names_each_ca_apart() {
    let dir = tempfile::tempdir().unwrap();
    gen_certs(dir.path());
    let first_ca = subject(&dir.path().join("ca.pem"));
    assert!(first_ca.starts_with("CN=srpc dev CA "), "{first_ca}");
    // Again without --force: refused, exit 1, nothing replaced.
    let before = std::fs::read(dir.path().join("server.key")).unwrap();
    let out = server()
        .args(["gen-certs", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca.pem exists already; use --force"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("server.key")).unwrap(),
        before
    );
    // With --force and a client name: replaced, by a CA of another name.
    let out = server()
        .args([
            "gen-certs",
            "--force",
            "--client-name",
            "billing-worker",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        std::fs::read(dir.path().join("server.key")).unwrap(),
        before
    );
    let second_ca = subject(&dir.path().join("ca.pem"));
    assert!(second_ca.starts_with("CN=srpc dev CA "), "{second_ca}");
    assert_ne!(first_ca, second_ca);
    assert_eq!(subject(&dir.path().join("client.pem")), "CN=billing-worker");
}

#[test]
fn files_serves_the_directory_and_a_missing_one_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    gen_certs(dir.path());
    let out = server()
        .args(["--listen", "127.0.0.1:0", "--cert"])
        .arg(dir.path().join("server.pem"))
        .arg("--key")
        .arg(dir.path().join("server.key"))
        .arg("--files")
        .arg(dir.path().join("no-such-dir"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--files") && stderr.contains("no-such-dir"),
        "{stderr}"
    );

    let served = dir.path().join("served");
    std::fs::create_dir(&served).unwrap();
    std::fs::write(served.join("a.txt"), b"hello").unwrap();
    let (mut child, addr) = serve_with(dir.path(), |c| {
        c.arg("--files").arg(&served).stderr(Stdio::null());
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listed = runtime.block_on(async {
        let conn = connect(dir.path(), &addr).await;
        let body = rpc_core::codec::encode(&(), 64).unwrap();
        let reply = conn
            .call("Files.list", body, Duration::from_secs(5))
            .await
            .unwrap();
        rpc_core::codec::decode::<Vec<rpc_core::files::FileEntry>>(&reply, 1 << 20, 8).unwrap()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        listed,
        [rpc_core::files::FileEntry {
            name: "a.txt".into(),
            size: 5
        }]
    );
}

#[test]
fn metrics_listen_serves_prometheus_text_counting_the_calls() {
    let dir = tempfile::tempdir().unwrap();
    gen_certs(dir.path());
    // A free port for the exporter, which binds it itself.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let (mut child, addr) = serve_with(dir.path(), |c| {
        c.args(["--metrics-listen", &metrics_addr])
            .stderr(Stdio::null());
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let text = runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let conn = connect(dir.path(), &addr).await;
        let echo = rpc_core::codec::encode(&"hi", 64).unwrap();
        for _ in 0..3 {
            conn.call("Demo.echo", echo.clone(), Duration::from_secs(5))
                .await
                .unwrap();
        }
        let overflow = rpc_core::codec::encode(&(i64::MAX, 1i64), 64).unwrap();
        assert!(conn
            .call("Demo.add", overflow, Duration::from_secs(5))
            .await
            .is_err());
        // The server hands its counts to the exporter once a second.
        let mut text = String::new();
        for _ in 0..30 {
            let mut http = tokio::net::TcpStream::connect(&metrics_addr).await.unwrap();
            let ask = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            http.write_all(ask).await.unwrap();
            text.clear();
            http.read_to_string(&mut text).await.unwrap();
            if text.contains(
                "rpc_method=\"Demo.add\",rpc_response_status_code=\"INVALID_ARGUMENT\"} 1",
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        text
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let count = |method: &str, status: &str| {
        let prefix = "rpc_server_call_duration_count{";
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .find(|l| {
                l.contains(&format!("rpc_method=\"{method}\""))
                    && l.contains(&format!("rpc_response_status_code=\"{status}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.trim().to_owned())
    };
    assert_eq!(count("Demo.echo", "OK").as_deref(), Some("3"), "{text}");
    assert_eq!(
        count("Demo.add", "INVALID_ARGUMENT").as_deref(),
        Some("1"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE rpc_server_call_duration histogram"),
        "{text}"
    );
}

/// A connection (TLS, `Hello`, its driver spawned) to the server at `addr`,
/// trusting `dir`'s CA.
async fn connect(dir: &std::path::Path, addr: &str) -> rpc_core::Connection {
    let tls = rpc_core::tls::client_config(&dir.join("ca.pem"), None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let config = rpc_core::ConnectionConfig::default();
    let (conn, driver) =
        rpc_core::transport::connect(addr.parse().unwrap(), name, &connector, &config)
            .await
            .unwrap();
    tokio::spawn(driver);
    conn
}
