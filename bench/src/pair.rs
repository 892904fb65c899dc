//! `pair`: two contenders measured at the same time.
//!
//! On a shared VM the same code runs up to a fifth faster or slower from one
//! run to the next (steal, neighbours, how deeply idle cores sleep), which
//! hides a gap of a few percent between contenders measured one after the
//! other. `pair` starts two `run`s at once, each with its own client and
//! server processes, so both see the same machine in every round; each gets
//! about half of it. Per round it takes the ratio of their figures, and it
//! reports the median ratio over the rounds.
//!
//! Each side has about half the machine, so for a row bound by the CPU the
//! ratio compares work per connection or per call; it is not the rate either
//! contender reaches alone, which `run` measures.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::contenders::Stack;
use crate::Group;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct PairArgs {
    /// The contender whose figures are divided (the numerator).
    #[arg(long, value_enum, default_value = "srpc")]
    a: Stack,
    /// The contender it is compared with (the denominator).
    #[arg(long, value_enum, default_value = "tarpc")]
    b: Stack,
    /// Scenario groups, as for `run` (default: the connection rows).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "connect")]
    scenarios: Vec<Group>,
    /// Rounds; each is one repetition of both at once.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Measured time of each timed scenario.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    measure: Duration,
    /// Warm-up before each load scenario (not counted).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The srpc-bench binary that measures side a (default: this one).
    /// With `--a-exe` or `--b-exe`, two builds of one contender can be
    /// compared at once: `--a srpc --b srpc --a-exe new/srpc-bench`.
    #[arg(long)]
    a_exe: Option<PathBuf>,
    /// The srpc-bench binary that measures side b (default: this one).
    #[arg(long)]
    b_exe: Option<PathBuf>,
}

/// One round's figures of one side: (row label, value) in report order.
type Figures = Vec<(String, f64)>;

pub(crate) fn pair(args: &PairArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let this = std::env::current_exe()?;
    let exe_a = args.a_exe.clone().unwrap_or_else(|| this.clone());
    let exe_b = args.b_exe.clone().unwrap_or(this);
    let scenarios = crate::group_names(&args.scenarios);
    let mut ratios: Vec<(String, Vec<f64>)> = Vec::new();
    for round in 1..=args.rounds {
        let dir = tempfile::tempdir()?;
        // Started together; which one is spawned first alternates.
        let mut order = [(args.a, "a", &exe_a), (args.b, "b", &exe_b)];
        if round % 2 == 0 {
            order.reverse();
        }
        let mut children = Vec::new();
        for (stack, side, exe) in order {
            let child = Command::new(exe)
                .args(["run", "--reps", "1", "--only", stack.name()])
                .args(["--scenarios", &scenarios])
                .arg("--measure")
                .arg(humantime::format_duration(args.measure).to_string())
                .arg("--warmup")
                .arg(humantime::format_duration(args.warmup).to_string())
                .arg("--out")
                .arg(dir.path().join(side))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            children.push((side, child));
        }
        for (side, child) in children {
            // Progress lines are dropped; warnings and errors are shown.
            let out = child.wait_with_output()?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            for line in stderr
                .lines()
                .filter(|l| !l.starts_with('[') && !l.starts_with("wrote "))
            {
                eprintln!("round {round}, {side}: {line}");
            }
            anyhow::ensure!(
                out.status.success(),
                "round {round}: side {side} failed: {}",
                out.status
            );
        }
        let a = figures(&dir.path().join("a"), args.a)?;
        let b = figures(&dir.path().join("b"), args.b)?;
        let mut line = format!("round {round}:");
        for (label, va) in &a {
            let Some((_, vb)) = b.iter().find(|(l, _)| l == label) else {
                continue;
            };
            if *vb <= 0.0 {
                continue;
            }
            line += &format!(" {} {va:.0}/{vb:.0};", short(label));
            match ratios.iter_mut().find(|(l, _)| l == label) {
                Some((_, v)) => v.push(va / vb),
                None => ratios.push((label.clone(), vec![va / vb])),
            }
        }
        println!("{line}");
    }
    println!();
    println!(
        "| {} / {}, both at once | median | lowest | highest | rounds |",
        args.a.name(),
        args.b.name()
    );
    println!("|---|---:|---:|---:|---:|");
    for (label, v) in ratios {
        // Every entry got its first ratio when it was made.
        let Some(median) = crate::report::median(&v) else {
            continue;
        };
        let (low, high) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &r| {
                (lo.min(r), hi.max(r))
            });
        println!(
            "| {label} | {median:.3} | {low:.3} | {high:.3} | {} |",
            v.len()
        );
    }
    let exes: String = [("--a-exe", &args.a_exe), ("--b-exe", &args.b_exe)]
        .iter()
        .filter_map(|(flag, exe)| exe.as_ref().map(|e| format!(" {flag} {}", e.display())))
        .collect();
    println!(
        "\nCommand: `cargo run --release -p srpc-bench -- pair --a {} --b {} --scenarios {scenarios} --rounds {} --measure {} --warmup {}{exes}`",
        args.a.name(),
        args.b.name(),
        args.rounds,
        humantime::format_duration(args.measure),
        humantime::format_duration(args.warmup)
    );
    Ok(())
}

/// The figures `run` wrote to `dir/results.json` for `stack`.
fn figures(dir: &Path, stack: Stack) -> anyhow::Result<Figures> {
    let text = std::fs::read_to_string(dir.join("results.json"))?;
    let json: Value = serde_json::from_str(&text)?;
    let rows = json["rows"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("{}: no rows", dir.display()))?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let label = row["label"].as_str()?;
            let value = row["median"][stack.name()].as_f64()?;
            Some((label.to_owned(), value))
        })
        .collect())
}

/// A row label without its unit, for the per-round lines.
fn short(label: &str) -> &str {
    label.rsplit_once(',').map_or(label, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::short;

    #[test]
    fn short_labels_drop_the_unit() {
        assert_eq!(
            short("new connection + call, full handshake, conn/s"),
            "new connection + call, full handshake"
        );
        assert_eq!(short("no unit"), "no unit");
    }
}
