//! `rpc-client`: calls the demo service or any method by its schema,
//! transfers files, or load-tests a server with `bench`.
//!
//! Thin on purpose: parses flags, sets up logging (stderr, `RUST_LOG`), and
//! calls the rpc-client library. Results go to stdout, one per line; errors go
//! to stderr with exit status 1 (2 for bad command-line arguments).

mod bench;
mod schema;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use rpc_client::Client;
use rpc_core::error::report;
use rpc_core::ConnectionConfig;

const EXAMPLES: &str = "\
Examples:
  rpc-client --ca certs/ca.pem call echo 'hello world'
  rpc-client --ca certs/ca.pem call add 2 3
  rpc-client --ca certs/ca.pem --timeout 300ms call sleep 5000
  rpc-client --ca certs/ca.pem --heartbeat-interval 500ms ping --count 3
  rpc-client --ca certs/ca.pem stats
  rpc-client --ca certs/ca.pem health         (exit 0: SERVING, 1: NOT_SERVING)
  rpc-client --ca certs/ca.pem list
  rpc-client --ca certs/ca.pem describe Demo
  rpc-client --ca certs/ca.pem call Demo.add '{\"a\": 2, \"b\": 3}'
  rpc-client --ca certs/ca.pem --cert certs/client.pem --key certs/client.key call whoami
  rpc-client --ca certs/ca.pem --meta tenant=blue --meta request-id=42 call metadata
  rpc-client --ca certs/ca.pem upload ./report.pdf --name reports/q3.pdf
  rpc-client --ca certs/ca.pem download reports/q3.pdf ./q3.pdf --resume
  rpc-client --ca certs/ca.pem files
  rpc-client --ca certs/ca.pem bench --concurrency 64 --payload 64 --duration 10s --json
  rpc-client --ca certs/ca.pem --server-name localhost \
      --connect 127.0.0.1:7443,127.0.0.1:7444,127.0.0.1:7445 bench --duration 5s

Durations accept 500ms, 2s, 1m. Logs go to stderr; set RUST_LOG=debug for more.";

const CALL_ANY: &str = "\
Any method, by the schema the server lists (see `rpc-client describe`):
  rpc-client call SERVICE.METHOD ['JSON' | @FILE]
  rpc-client call Demo.add '{\"a\": 2, \"b\": 3}'
  rpc-client call Demo.add @args.json
A method returning a stream prints one line per item; one taking a stream
reads its items from stdin, one JSON value per line.";

/// Call an srpc server over TLS: the demo service, or any method by its schema.
#[derive(Parser, Debug)]
#[command(name = "rpc-client", version, after_help = EXAMPLES)]
struct Cli {
    /// Server address(es), host:port[,host:port...]; a name with several
    /// addresses is a server per address, and calls are spread over them.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:7443",
        global = true
    )]
    connect: String,
    /// CA certificate(s) to verify the server with (PEM).
    #[arg(long, value_name = "PEM", global = true)]
    ca: Option<PathBuf>,
    /// Name the server's certificate must be valid for [default: the host in --connect].
    #[arg(long, value_name = "NAME", global = true)]
    server_name: Option<String>,
    /// Client certificate for mutual TLS (PEM); needs --key.
    #[arg(long, value_name = "PEM", requires = "key", global = true)]
    cert: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM); needs --cert.
    #[arg(long, value_name = "PEM", requires = "cert", global = true)]
    key: Option<PathBuf>,
    /// Heartbeat interval (this side's; announced to the server).
    #[arg(long, value_name = "D", default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    heartbeat_interval: Duration,
    /// Silence after which the server counts as dead.
    #[arg(long, value_name = "D", default_value = "15s", value_parser = humantime::parse_duration, global = true)]
    heartbeat_timeout: Duration,
    /// Deadline of each call.
    #[arg(long, value_name = "D", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    /// Largest frame accepted from the server, in bytes.
    #[arg(long, value_name = "N", default_value_t = rpc_core::DEFAULT_MAX_FRAME, global = true)]
    max_frame_bytes: usize,
    /// Key exchange: "post-quantum" (X25519MLKEM768 preferred, classical
    /// groups still offered) or "classical" (X25519, P-256, P-384 only:
    /// cheaper handshakes, no protection against a future quantum computer).
    #[arg(
        long,
        value_name = "KIND",
        default_value = "post-quantum",
        global = true
    )]
    key_exchange: rpc_core::tls::KeyExchange,
    /// Metadata sent with every call of the command, KEY=VALUE (repeat the
    /// flag for more). Keys are lowercase ASCII letters, digits, '-', '_'
    /// and '.'; "srpc-" keys are reserved.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_meta, global = true)]
    meta: Vec<(String, String)>,
    /// While the server is unreachable, calls wait for it (within
    /// --timeout) instead of failing at once. `bench` always waits.
    #[arg(long, global = true)]
    wait_for_ready: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Call a method and print its result: a demo shortcut (echo, add,
    /// sleep, whoami, metadata) or any method as SERVICE.METHOD 'JSON',
    /// the arguments as a JSON object by name (or an array), checked
    /// against the method's schema before sending; the reply is printed as
    /// one line of JSON. See `describe` for the methods and their types.
    #[command(subcommand, after_help = CALL_ANY)]
    Call(CallCmd),
    /// The server's methods with their types, as `list`, each followed by
    /// the structs and enums it uses (what `call SERVICE.METHOD JSON`
    /// expects), or why it has no schema.
    Describe {
        /// Only this service, or one method as SERVICE.METHOD [default: all].
        #[arg(default_value = "")]
        service: String,
        /// One JSON object instead, each method's schema as serde-reflection
        /// writes it (for tools such as serde-generate).
        #[arg(long)]
        json: bool,
    },
    /// Heartbeat round trips: sends Pings one after another (each waits for
    /// its Pong) and prints each round-trip time, e.g. "rtt 0.183ms". Past
    /// the server's ping burst allowance (8), one per heartbeat interval.
    Ping {
        /// How many round trips.
        #[arg(long, value_name = "N", default_value_t = 4)]
        count: u32,
    },
    /// The server's services and methods with argument and reply types,
    /// one method per line, e.g. "Demo.add(a: i64, b: i64) -> i64".
    List,
    /// The server's health, or one service's: prints SERVING (exit 0) or
    /// NOT_SERVING (exit 1); a draining server is NOT_SERVING. Usable as a
    /// readiness probe.
    Health {
        /// The service, e.g. "Demo" [default: the whole server].
        #[arg(default_value = "")]
        service: String,
    },
    /// The server's counters, one "key value" per line: connections,
    /// calls_in_flight, calls_served, errors.KIND, and "rtt ADDR MS" per
    /// connection ("unknown" until a heartbeat measured one).
    Stats,
    /// Load test: N concurrent callers over one connection calling echo.
    /// Keeps going across reconnects; failed calls count as errors.
    Bench(bench::BenchArgs),
    /// Send a file to a server run with --files DIR: stored under NAME only
    /// once complete and its SHA-256 checked. Prints
    /// "uploaded NAME BYTES sha256 HEX".
    Upload(transfer::UploadArgs),
    /// Fetch a file from a server run with --files DIR, SHA-256 checked.
    /// Prints "downloaded NAME BYTES sha256 HEX".
    Download(transfer::DownloadArgs),
    /// The files of a server run with --files DIR: "NAME BYTES" per line.
    Files,
}

#[derive(Subcommand, Debug)]
enum CallCmd {
    /// Prints TEXT back.
    Echo {
        /// The text to send.
        text: String,
    },
    /// Prints A+B (64-bit signed integers).
    Add {
        /// First addend.
        #[arg(allow_negative_numbers = true)]
        a: i64,
        /// Second addend.
        #[arg(allow_negative_numbers = true)]
        b: i64,
    },
    /// Sleeps MS milliseconds on the server, then prints "ok".
    Sleep {
        /// Milliseconds.
        ms: u64,
    },
    /// Prints the subject of the client certificate the server saw
    /// (--cert/--key), or "anonymous".
    Whoami,
    /// Prints the metadata the server received with the call (--meta), one
    /// KEY=VALUE per line, sorted by key.
    Metadata,
    /// SERVICE.METHOD ['JSON']: any method, by its schema.
    #[command(external_subcommand)]
    Method(Vec<String>),
}

/// `KEY=VALUE` of `--meta`.
fn parse_meta(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    // The key's rules are the library's: refuse here what it would refuse.
    rpc_core::Metadata::new()
        .insert(key, value.to_owned())
        .map_err(|e| e.to_string())?;
    Ok((key.to_owned(), value.to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.ca.is_none() {
        // A usage error like any other: clap prints it and exits with 2.
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--ca is required: the CA certificate that signed the server's certificate (e.g. certs/ca.pem)",
            )
            .exit();
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour_wanted())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rpc-client: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::NotServing) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rpc-client: error: {}", report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// How a command that ran ended.
enum Outcome {
    Done,
    /// `health` found the server or service not serving: exit 1.
    NotServing,
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let Some(ca) = cli.ca.as_deref() else {
        anyhow::bail!("--ca is required: the CA certificate that signed the server's certificate (e.g. certs/ca.pem)");
    };
    let identity = cli.cert.as_deref().zip(cli.key.as_deref());
    let tls = rpc_core::tls::client_config_with(ca, identity, cli.key_exchange)?;
    let mut config = ConnectionConfig::default();
    config.heartbeat_interval = cli.heartbeat_interval;
    config.heartbeat_timeout = cli.heartbeat_timeout;
    config.max_frame = cli.max_frame_bytes;
    let mut metadata = rpc_core::Metadata::new();
    for (key, value) in &cli.meta {
        metadata.insert(key, value.clone())?;
    }
    // A load generator keeps going while the server restarts.
    let wait_for_ready = cli.wait_for_ready || matches!(cli.command, Command::Bench(_));
    let mut builder = Client::builder(tls)
        .timeout(cli.timeout)
        .connection_config(config)
        .metadata(metadata)
        .wait_for_ready(wait_for_ready);
    if let Some(name) = cli.server_name {
        builder = builder.server_name(name);
    }
    let client = builder.connect(&cli.connect).await?;
    match cli.command {
        Command::Call(CallCmd::Echo { text }) => {
            let reply: String = client.call("Demo.echo", &text).await?;
            println!("{reply}");
        }
        Command::Call(CallCmd::Add { a, b }) => {
            let sum: i64 = client.call("Demo.add", &(a, b)).await?;
            println!("{sum}");
        }
        Command::Call(CallCmd::Sleep { ms }) => {
            client.call::<_, ()>("Demo.sleep", &ms).await?;
            println!("ok");
        }
        Command::Call(CallCmd::Whoami) => {
            let subject: String = client.call("Demo.whoami", &()).await?;
            println!("{subject}");
        }
        Command::Call(CallCmd::Metadata) => {
            let entries: Vec<(String, Vec<u8>)> = client.call("Demo.metadata", &()).await?;
            for (key, value) in entries {
                println!("{key}={}", String::from_utf8_lossy(&value));
            }
        }
        Command::Call(CallCmd::Method(words)) => schema::call(&client, words).await?,
        Command::Describe { service, json } => schema::describe(&client, &service, json).await?,
        Command::Ping { count } => {
            // Back to back within the server's burst allowance; beyond it,
            // one per heartbeat interval, or the server's flood protection
            // cuts the connection off.
            let interval = client.heartbeat_interval();
            for i in 0..count {
                if i >= rpc_core::heartbeat::PING_BURST {
                    tokio::time::sleep(interval).await;
                }
                let rtt = client.ping().await?;
                println!("rtt {:.3}ms", rtt.as_secs_f64() * 1000.0);
            }
        }
        Command::List => {
            for service in client.list().await? {
                for m in &service.methods {
                    let args: Vec<String> =
                        m.args.iter().map(|(n, t)| format!("{n}: {t}")).collect();
                    let dot = if service.name.is_empty() { "" } else { "." };
                    println!(
                        "{}{dot}{}({}) -> {}",
                        service.name,
                        m.name,
                        args.join(", "),
                        m.returns
                    );
                }
            }
        }
        Command::Health { service } => {
            let status = client.health(&service).await?;
            println!("{status}");
            client.close();
            let _ = tokio::time::timeout(Duration::from_secs(1), client.closed()).await;
            return Ok(match status {
                rpc_client::HealthStatus::Serving => Outcome::Done,
                rpc_client::HealthStatus::NotServing => Outcome::NotServing,
            });
        }
        Command::Stats => {
            let stats = client.stats().await?;
            println!("connections {}", stats.connections);
            println!("calls_in_flight {}", stats.calls_in_flight);
            println!("calls_served {}", stats.calls_served);
            for (kind, n) in &stats.errors {
                println!("errors.{kind} {n}");
            }
            for peer in &stats.peers {
                match peer.rtt_us {
                    Some(us) => println!("rtt {} {:.3}ms", peer.addr, us as f64 / 1000.0),
                    None => println!("rtt {} unknown", peer.addr),
                }
            }
        }
        Command::Bench(args) => bench::run(client.clone(), args).await?,
        Command::Upload(args) => transfer::upload(client.clone(), args).await?,
        Command::Download(args) => transfer::download(client.clone(), args).await?,
        Command::Files => transfer::list(client.clone()).await?,
    }
    // Close cleanly (TLS close_notify) rather than vanish at exit.
    client.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), client.closed()).await;
    Ok(Outcome::Done)
}

/// Colours in the log only on a terminal, and never when `NO_COLOR` is set
/// to anything (no-color.org): a log file or a pipe gets plain text.
fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
