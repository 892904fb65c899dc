//! `rpc-server`: serves the demo service over TLS, or makes dev certificates.
//!
//! Thin on purpose: parses flags, sets up logging (stderr, `RUST_LOG`), and
//! calls the rpc-server library. Prints `listening on ADDR` on stdout once the
//! socket is bound (scripts can read the port when `--listen` ends in `:0`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use rpc_core::error::report;
use rpc_core::files::FilesServer;
use rpc_server::files::FileStore;
use rpc_server::{demo, devcerts, metrics, Server, ServerOptions, TlsFiles};

const EXAMPLES: &str = "\
Examples:
  rpc-server gen-certs --out certs/
  rpc-server --cert certs/server.pem --key certs/server.key
  rpc-server --cert certs/server.pem --key certs/server.key --files /srv/shared
  rpc-server --cert certs/server.pem --key certs/server.key --metrics-listen 127.0.0.1:9464
  rpc-server --listen 127.0.0.1:0 --cert certs/server.pem --key certs/server.key \\
             --client-ca certs/ca.pem --heartbeat-interval 1s --heartbeat-timeout 3s

Durations accept 500ms, 2s, 1m. Logs go to stderr; set RUST_LOG=debug for more.
SIGINT/SIGTERM drain in-flight calls (up to --drain-timeout) and exit 0.
SIGHUP re-reads --cert, --key and --client-ca for new connections; if a file
is bad, the error is logged and the current certificate stays.";

/// Serve the srpc demo service (echo, add, sleep) over TLS.
#[derive(Parser, Debug)]
#[command(name = "rpc-server", version, after_help = EXAMPLES, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a development CA, server and client certificates (rcgen):
    /// ca.pem ca.key server.pem server.key client.pem client.key.
    /// The server certificate is for localhost, 127.0.0.1 and ::1; keys are
    /// written with mode 0600. For testing only.
    GenCerts {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace certificate and key files already in DIR.
        #[arg(long)]
        force: bool,
        /// Common name of the client certificate.
        #[arg(long, value_name = "NAME", default_value = devcerts::CLIENT_SUBJECT_CN)]
        client_name: String,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Serve call metrics (OpenTelemetry names: rpc.server.call.duration,
    /// ...) in the Prometheus text format at http://ADDR/metrics: plain
    /// HTTP on a port of its own, for a scraper on a trusted network.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Also serve the file service (upload, download, list) confined to
    /// DIR: names cannot lead out of it (`..`, absolute paths, symlinks).
    #[arg(long, value_name = "DIR")]
    files: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long, value_name = "PEM")]
    cert: Option<PathBuf>,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM")]
    key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, value_name = "PEM")]
    client_ca: Option<PathBuf>,
    /// Heartbeat interval announced to clients.
    #[arg(long, value_name = "D", default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Silence after which a client counts as dead.
    #[arg(long, value_name = "D", default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// Largest frame accepted, in bytes.
    #[arg(long, value_name = "N", default_value_t = rpc_core::DEFAULT_MAX_FRAME)]
    max_frame_bytes: usize,
    /// Connections served at once; more are refused.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_connections: usize,
    /// Calls handled at once per connection (clients queue beyond it).
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_in_flight: usize,
    /// TLS handshakes in progress at once; more connections wait.
    #[arg(long, value_name = "N", default_value_t = 512)]
    max_handshakes: usize,
    /// Time allowed for a client's TLS handshake.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// On SIGINT/SIGTERM, time in-flight calls get to finish.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Key exchange: "post-quantum" (X25519MLKEM768 preferred, classical
    /// groups still accepted) or "classical" (X25519, P-256, P-384 only:
    /// cheaper handshakes, no protection against a future quantum computer).
    #[arg(long, value_name = "KIND", default_value = "post-quantum")]
    key_exchange: rpc_core::tls::KeyExchange,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.is_none() && (cli.serve.cert.is_none() || cli.serve.key.is_none()) {
        // A usage error like any other: clap prints it and exits with 2.
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--cert and --key are required to serve (make development ones with: rpc-server gen-certs --out certs/)",
            )
            .exit();
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour_wanted())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Some(Command::GenCerts {
            out,
            force,
            client_name,
        }) => gen_certs(&out, &client_name, force),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rpc-server: error: {}", report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn gen_certs(out: &std::path::Path, client_name: &str, force: bool) -> anyhow::Result<()> {
    for path in devcerts::write_new(out, client_name, force)? {
        println!("{}", path.display());
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (Some(cert), Some(key)) = (args.cert.as_deref(), args.key.as_deref()) else {
        anyhow::bail!(
            "--cert and --key are required to serve (make development ones with: rpc-server gen-certs --out certs/)"
        );
    };
    let mut files = TlsFiles::new(cert.to_owned(), key.to_owned(), args.client_ca.clone());
    files.key_exchange = args.key_exchange;
    let tls = files.load()?;
    let mut options = ServerOptions::default();
    options.connection.max_frame = args.max_frame_bytes;
    options.connection.heartbeat_interval = args.heartbeat_interval;
    options.connection.heartbeat_timeout = args.heartbeat_timeout;
    options.connection.handshake_timeout = args.handshake_timeout;
    options.connection.max_in_flight = args.max_in_flight;
    options.max_connections = args.max_connections;
    options.max_handshakes = args.max_handshakes;
    options.drain_timeout = args.drain_timeout;
    let mut router = demo::router();
    if let Some(dir) = &args.files {
        let store = FileStore::open(dir).map_err(|e| {
            anyhow::anyhow!("--files {}: cannot open the directory: {e}", dir.display())
        })?;
        router = router.service(FilesServer::new(store));
    }
    let server = Server::builder(tls)
        .options(options)
        .router(router)
        .metrics(args.metrics_listen.is_some())
        .build()?;

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        if let Some(addr) = args.metrics_listen {
            PrometheusBuilder::new()
                .with_http_listener(addr)
                .set_buckets_for_metric(
                    Matcher::Full(metrics::SERVER_CALL_DURATION.into()),
                    &metrics::DURATION_BUCKETS,
                )?
                .install()
                .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
            tracing::info!(%addr, "metrics: Prometheus text at http://{addr}/metrics (plain HTTP)");
        }
        let listener = Server::bind(args.listen).await?;
        // Signal handlers go in before the address is printed: whoever reads
        // it may signal at once, and an unhandled SIGTERM kills the process.
        let shutdown = shutdown_signal()?;
        #[cfg(unix)]
        let reloader = {
            use tokio::signal::unix::{signal, SignalKind};
            let hup = signal(SignalKind::hangup())?;
            tokio::spawn(reload_on_sighup(server.clone(), files, hup))
        };
        println!("listening on {}", listener.local_addr()?);
        server.serve(listener, shutdown).await?;
        #[cfg(unix)]
        reloader.abort();
        Ok(())
    })
}

/// Re-reads the certificate, key and client CA on every SIGHUP; a bad file
/// is logged and the current certificate stays.
#[cfg(unix)]
async fn reload_on_sighup(server: Server, files: TlsFiles, mut hup: tokio::signal::unix::Signal) {
    while hup.recv().await.is_some() {
        if let Err(e) = server.reload_tls_files(&files) {
            tracing::error!(
                error = %report(&e),
                "certificate reload failed; keeping the current certificate"
            );
        }
    }
}

/// Listens for SIGINT and SIGTERM from now on; the future completes on
/// either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutdown signal received");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutdown signal received");
        })
    }
}

/// Colours in the log only on a terminal, and never when `NO_COLOR` is set
/// to anything (no-color.org): a log file or a pipe gets plain text.
fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
