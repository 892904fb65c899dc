//! `srpc-bench`: srpc side by side with raw TLS, tarpc and tonic.
//!
//! ```sh
//! cargo run --release -p srpc-bench -- run
//! ```
//!
//! `run` writes throwaway certificates, then for each repetition and each
//! contender starts that contender's server as a separate process
//! (`srpc-bench serve`, this same binary) and measures it from this process
//! over 127.0.0.1: 64-byte calls at 1 and 64 in flight, 1 MiB calls at 4 in
//! flight, new connection + one call, and server memory per idle connection
//! (on a fresh server process), and a one-way 1 GiB stream with 64 B calls
//! beside it (not tarpc, which has no streams). It prints a Markdown table of medians with
//! srpc's ratio to each contender and writes `results.md`, `results.json`
//! and `calls-per-second.svg` to `--out`.
//!
//! `pair` runs two contenders at the same time, round after round, and
//! reports the median ratio of their figures (see `pair.rs`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod balance;
mod contenders;
mod pair;
mod report;
mod scenario;

use contenders::{Certs, Dialer, Handshake, Stack};
use report::{Metric, Samples};

#[derive(Parser, Debug)]
#[command(version, about = "srpc side by side with raw TLS, tarpc and tonic")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs every scenario against every contender and reports medians.
    Run(RunArgs),
    /// Runs two contenders at the same time, round after round, and reports
    /// the median ratio of their figures: both see the same machine, so
    /// small gaps show through the VM's noise.
    Pair(pair::PairArgs),
    /// srpc over several servers: three servers vs one, and one slow
    /// server among four with Peak-EWMA vs round robin.
    Balance(balance::BalanceArgs),
    /// Serves one contender on 127.0.0.1 (started by `run`). Exits when
    /// its stdin reaches end of file, as when the run closes it: started
    /// by hand, keep stdin open (not `< /dev/null`).
    Serve {
        /// Which contender.
        #[arg(long, value_enum)]
        stack: Stack,
        /// Folder with ca.pem, server.pem and server.key.
        #[arg(long)]
        certs: PathBuf,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Repetitions of every scenario (the report shows medians).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Measured time of each timed scenario.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    measure: Duration,
    /// Warm-up before each load scenario (not counted).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Idle connections for the memory scenario.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// How long the idle connections stay idle before the server's memory
    /// is read.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    idle_for: Duration,
    /// MiB the stream scenario sends.
    #[arg(long, default_value_t = 1024)]
    stream_mib: u64,
    /// Contenders to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Stack>,
    /// Scenario groups to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Group>,
    /// Where results.md, results.json and calls-per-second.svg go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Keep idle cores polling instead of halting while the run lasts (a
    /// request of 0 µs wake-up latency through `/dev/cpu_dma_latency`,
    /// Linux, root only; dropped when the run ends). On a VM a halted core
    /// takes a trip through the hypervisor to wake, which then dominates
    /// every row that waits for a wake-up (1 in flight, one dialer).
    #[arg(long)]
    poll_idle: bool,
}

/// Groups of scenarios, to run a part of the benchmark while tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Group {
    /// 64 B at 1 and 64 in flight, 1 MiB at 4 (all three below).
    Load,
    /// 64 B at 1 in flight.
    One,
    /// 64 B at 64 in flight.
    Many,
    /// 1 MiB at 4 in flight.
    Large,
    /// New connection + one call: the three below.
    Connect,
    /// New connection + one call, full handshake, one dialer.
    Full,
    /// New connection + one call, resumed session, one dialer.
    Resumed,
    /// New connection + one call, full and resumed, `scenario::DIALERS`
    /// dialing at once.
    Parallel,
    /// Server memory per idle connection.
    Idle,
    /// A one-way stream of --stream-mib, with small calls beside it.
    Stream,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Two rustls providers could be linked (tonic picks through features);
    // make aws-lc-rs the process default so nothing has to guess.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Cmd::Serve { stack, certs } => runtime.block_on(serve(stack, &certs)),
        Cmd::Run(args) => runtime.block_on(run(args)),
        Cmd::Pair(args) => pair::pair(&args),
        Cmd::Balance(args) => runtime.block_on(async {
            let (dir, certs) = throwaway_certs()?;
            balance::balance(args, dir.path(), &certs).await
        }),
    }
}

async fn serve(stack: Stack, dir: &Path) -> anyhow::Result<()> {
    let certs = read_certs(dir)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    // The parent reads this line to learn the port.
    println!("listening {}", listener.local_addr()?);
    // The parent closes our stdin when it is done with us: exiting then,
    // rather than being killed, lets a profiler wrapped around this process
    // (valgrind, perf) write its report, and no server outlives its run.
    let parent_gone = async {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut sink).await;
    };
    tokio::select! {
        served = contenders::serve(stack, listener, &certs) => served,
        () = parent_gone => Ok(()),
    }
}

/// Fresh certificates in a temporary folder, for the server processes.
fn throwaway_certs() -> anyhow::Result<(tempfile::TempDir, Certs)> {
    let dir = tempfile::tempdir()?;
    let dev = srpc::server::devcerts::generate()?;
    std::fs::write(dir.path().join("ca.pem"), &dev.ca_pem)?;
    std::fs::write(dir.path().join("server.pem"), &dev.server_pem)?;
    std::fs::write(dir.path().join("server.key"), &dev.server_key)?;
    let certs = read_certs(dir.path())?;
    Ok((dir, certs))
}

fn read_certs(dir: &Path) -> anyhow::Result<Certs> {
    Ok(Certs {
        ca: std::fs::read_to_string(dir.join("ca.pem"))?,
        server_cert: std::fs::read_to_string(dir.join("server.pem"))?,
        server_key: std::fs::read_to_string(dir.join("server.key"))?,
    })
}

/// A contender's server process; killed when dropped.
pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl ServerProcess {
    pub(crate) fn start(stack: Stack, certs: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--stack", stack.name(), "--certs"])
            .arg(certs)
            .stdout(Stdio::piped())
            .stdin(Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout from the server"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .ok_or_else(|| anyhow::anyhow!("server said {line:?}, not its address"))?
            .parse()?;
        Ok(ServerProcess { child, addr })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Closing its stdin asks the server to exit (see `serve`); one that
        // has not within 5 s (a profiler writing a large report may take
        // a while) is killed.
        drop(self.child.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                // Its state unknown: kill it below rather than leave it.
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let stacks: Vec<Stack> = if args.only.is_empty() {
        Stack::ALL.to_vec()
    } else {
        args.only.clone()
    };
    let (dir, certs) = throwaway_certs()?;

    // Held until the run ends: closing the file withdraws the request.
    let _poll_idle = args.poll_idle.then(request_polling_idle).transpose()?;
    let mut samples = Samples::default();
    // Repetitions outside, contenders inside: drift on the machine touches
    // every contender alike. Each repetition starts one contender later
    // (srpc, raw, tarpc, tonic; then raw, tarpc, tonic, srpc; ...), so no
    // contender always runs first, right after a pause.
    for rep in 1..=args.reps {
        let n = stacks.len();
        for i in 0..n {
            let stack = stacks[(rep - 1 + i) % n];
            eprintln!("[{rep}/{}] {}", args.reps, stack.name());
            measure_stack(stack, &args, dir.path(), &certs, &mut samples).await?;
        }
    }
    let report = report::Report::new(&stacks, &samples, &args_line(&args));
    println!("{}", report.markdown());
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("results.md"), report.markdown())?;
    std::fs::write(args.out.join("results.json"), report.json()?)?;
    report.chart(&args.out.join("calls-per-second.svg"))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Asks the kernel's PM QoS for 0 µs CPU wake-up latency, which keeps idle
/// cores in the polling idle state; the request lasts while the returned
/// file stays open.
fn request_polling_idle() -> anyhow::Result<std::fs::File> {
    use std::io::Write;
    const PATH: &str = "/dev/cpu_dma_latency";
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(PATH)
        .map_err(|e| {
            anyhow::anyhow!("--poll-idle: cannot open {PATH} ({e}); it needs root on Linux")
        })?;
    file.write_all(&0i32.to_ne_bytes())
        .map_err(|e| anyhow::anyhow!("--poll-idle: cannot write {PATH}: {e}"))?;
    Ok(file)
}

fn args_line(args: &RunArgs) -> String {
    format!(
        "--reps {} --measure {} --warmup {} --idle {} --idle-for {} --stream-mib {}{}{}",
        args.reps,
        humantime::format_duration(args.measure),
        humantime::format_duration(args.warmup),
        args.idle,
        humantime::format_duration(args.idle_for),
        args.stream_mib,
        if args.scenarios.is_empty() {
            String::new()
        } else {
            format!(" --scenarios {}", group_names(&args.scenarios))
        },
        if args.poll_idle { " --poll-idle" } else { "" }
    )
}

/// Scenario groups as `--scenarios` takes them: `load,connect`.
fn group_names(groups: &[Group]) -> String {
    let names: Vec<String> = groups
        .iter()
        .map(|g| format!("{g:?}").to_lowercase())
        .collect();
    names.join(",")
}

async fn measure_stack(
    stack: Stack,
    args: &RunArgs,
    dir: &Path,
    certs: &Certs,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let wants = |g: Group| args.scenarios.is_empty() || args.scenarios.contains(&g);
    let server = ServerProcess::start(stack, dir)?;
    let dialer = Arc::new(Dialer::new(stack, server.addr, certs, Handshake::Full)?);
    load_scenarios(stack, args, &dialer, samples).await?;
    for (group, handshake, dialers, metric) in [
        (Group::Full, Handshake::Full, 1, Metric::ConnFull),
        (Group::Resumed, Handshake::Resumed, 1, Metric::ConnResumed),
        (
            Group::Parallel,
            Handshake::Full,
            scenario::DIALERS,
            Metric::ConnFullParallel,
        ),
        (
            Group::Parallel,
            Handshake::Resumed,
            scenario::DIALERS,
            Metric::ConnResumedParallel,
        ),
    ] {
        if !(wants(Group::Connect) || wants(group)) {
            continue;
        }
        // A dialer of its own: a resuming one starts without sessions.
        let dialer = match handshake {
            Handshake::Full => dialer.clone(),
            Handshake::Resumed => Arc::new(Dialer::new(stack, server.addr, certs, handshake)?),
        };
        let got = scenario::connect_rate(dialer, args.measure, dialers).await?;
        let what = format!("{} ({handshake:?}, {dialers} dialing)", stack.name());
        anyhow::ensure!(got.errors == 0, "{what}: {} connections failed", got.errors);
        // The handshakes were the kind the row says: one certificate check
        // per connection for a full handshake, none when resuming.
        match (handshake, got.full_handshakes) {
            (Handshake::Full, Some(full)) => anyhow::ensure!(
                full >= got.done,
                "{what}: {full} certificates checked for {} connections",
                got.done
            ),
            (Handshake::Resumed, Some(full)) => {
                // Seen rarely (srpc, 4 dialers: 1 of 9,114 and 2 of 11,503
                // in one repetition of two runs), cause not found; say so,
                // and fail only when enough did not resume to move the
                // figure.
                anyhow::ensure!(
                    full * 100 <= got.done,
                    "{what}: {full} of {} connections did not resume",
                    got.done
                );
                if full > 0 {
                    eprintln!(
                        "warning: {what}: {full} of {} connections did not resume",
                        got.done
                    );
                }
            }
            (_, None) => {}
        }
        samples.push(stack, metric, got.per_sec);
    }

    if wants(Group::Stream) && stack != Stack::Tarpc {
        // The rate alone, then again with calls beside it for their latency.
        let caller = dialer.connect().await?;
        let alone = scenario::stream(caller.clone(), args.stream_mib << 20, false).await?;
        samples.push(stack, Metric::StreamMib, alone.mib_per_sec);
        let beside = scenario::stream(caller.clone(), args.stream_mib << 20, true).await?;
        caller.close();
        if let Some(p99) = beside.beside_p99_us {
            samples.push(stack, Metric::StreamP99, p99);
        }
        eprintln!(
            "{}: stream {:.0} MiB/s alone; {:.0} MiB/s with {} calls beside it",
            stack.name(),
            alone.mib_per_sec,
            beside.mib_per_sec,
            beside.beside_calls
        );
    }
    drop(server);

    if wants(Group::Idle) {
        // Memory on a fresh server, so earlier scenarios' heap does not hide it.
        let server = ServerProcess::start(stack, dir)?;
        let dialer = Dialer::new(stack, server.addr, certs, Handshake::Full)?;
        let kib = scenario::idle_rss(&dialer, args.idle, args.idle_for, server.child.id()).await?;
        samples.push(stack, Metric::IdleKib, kib);
    }
    Ok(())
}

async fn load_scenarios(
    stack: Stack,
    args: &RunArgs,
    dialer: &Dialer,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let wants = |g: Group| {
        args.scenarios.is_empty()
            || args.scenarios.contains(&g)
            || args.scenarios.contains(&Group::Load)
    };
    if ![Group::One, Group::Many, Group::Large]
        .into_iter()
        .any(wants)
    {
        return Ok(());
    }
    let caller = dialer.connect().await?;
    for (group, in_flight, payload, rate, p50, p99) in [
        (
            Group::One,
            1,
            64,
            Metric::Calls1,
            Some(Metric::P50x1),
            Some(Metric::P99x1),
        ),
        (
            Group::Many,
            64,
            64,
            Metric::Calls64,
            Some(Metric::P50x64),
            Some(Metric::P99x64),
        ),
        (Group::Large, 4, 1 << 20, Metric::MibPerSec, None, None),
    ] {
        if !wants(group) {
            continue;
        }
        let got = scenario::load(
            caller.clone(),
            in_flight,
            payload,
            args.warmup,
            args.measure,
        )
        .await?;
        anyhow::ensure!(
            got.errors == 0,
            "{}: {} calls failed at {in_flight} in flight, {payload} B",
            stack.name(),
            got.errors
        );
        if rate == Metric::MibPerSec {
            samples.push(stack, rate, got.mib_per_sec);
        } else {
            samples.push(stack, rate, got.calls_per_sec);
        }
        if let (Some(p50), Some(p99)) = (p50, p99) {
            samples.push(stack, p50, got.p50_us);
            samples.push(stack, p99, got.p99_us);
        }
    }
    caller.close();
    Ok(())
}
