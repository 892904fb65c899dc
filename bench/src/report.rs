//! Medians, ratios, and the three outputs: Markdown, JSON, SVG chart.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::contenders::Stack;

/// What a scenario measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub(crate) enum Metric {
    /// 64 B calls, 1 in flight: calls/s.
    Calls1,
    /// Median latency at 1 in flight.
    P50x1,
    /// 99th percentile latency at 1 in flight.
    P99x1,
    /// 64 B calls, 64 in flight: calls/s.
    Calls64,
    /// Median latency at 64 in flight.
    P50x64,
    /// 99th percentile latency at 64 in flight.
    P99x64,
    /// 1 MiB calls, 4 in flight: MiB/s of payload echoed.
    MibPerSec,
    /// New connection (full handshake) + one call: connections/s.
    ConnFull,
    /// New connection (resumed session where the stack offers it) + one call.
    ConnResumed,
    /// `ConnFull` with several connections being made at once.
    ConnFullParallel,
    /// `ConnResumed` with several connections being made at once.
    ConnResumedParallel,
    /// Server RSS per idle connection, KiB.
    IdleKib,
    /// A 1 GiB one-way stream from the server: MiB/s received.
    StreamMib,
    /// 64 B calls one at a time on the stream's connection meanwhile: p99.
    StreamP99,
}

impl Metric {
    const ALL: [Metric; 14] = [
        Metric::Calls1,
        Metric::P50x1,
        Metric::P99x1,
        Metric::Calls64,
        Metric::P50x64,
        Metric::P99x64,
        Metric::MibPerSec,
        Metric::ConnFull,
        Metric::ConnResumed,
        Metric::ConnFullParallel,
        Metric::ConnResumedParallel,
        Metric::IdleKib,
        Metric::StreamMib,
        Metric::StreamP99,
    ];

    fn label(self) -> &'static str {
        match self {
            Metric::Calls1 => "64 B × 1 in flight, calls/s",
            Metric::P50x1 => "64 B × 1, p50 µs",
            Metric::P99x1 => "64 B × 1, p99 µs",
            Metric::Calls64 => "64 B × 64 in flight, calls/s",
            Metric::P50x64 => "64 B × 64, p50 µs",
            Metric::P99x64 => "64 B × 64, p99 µs",
            Metric::MibPerSec => "1 MiB × 4 in flight, MiB/s",
            Metric::ConnFull => "new connection + call, full handshake, conn/s",
            Metric::ConnResumed => "new connection + call, resumed session, conn/s",
            Metric::ConnFullParallel => "4 dialing at once, full handshake, conn/s",
            Metric::ConnResumedParallel => "4 dialing at once, resumed session, conn/s",
            Metric::IdleKib => "server RSS per idle connection, KiB",
            Metric::StreamMib => "1 GiB one-way stream, MiB/s",
            Metric::StreamP99 => "64 B × 1 beside the stream, p99 µs",
        }
    }

    fn decimals(self) -> usize {
        match self {
            Metric::P50x1
            | Metric::P99x1
            | Metric::P50x64
            | Metric::P99x64
            | Metric::IdleKib
            | Metric::StreamP99 => 1,
            _ => 0,
        }
    }
}

/// Every sample, by contender and metric.
#[derive(Default)]
pub(crate) struct Samples(BTreeMap<(Metric, &'static str), Vec<f64>>);

impl Samples {
    /// Records one repetition's value.
    pub(crate) fn push(&mut self, stack: Stack, metric: Metric, value: f64) {
        self.0
            .entry((metric, stack.name()))
            .or_default()
            .push(value);
    }
}

pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[derive(Serialize)]
struct Row {
    metric: Metric,
    label: &'static str,
    /// Median per contender.
    median: BTreeMap<&'static str, f64>,
    /// Every repetition per contender.
    samples: BTreeMap<&'static str, Vec<f64>>,
}

/// The results of one `run`.
#[derive(Serialize)]
pub(crate) struct Report {
    date: String,
    machine: String,
    command: String,
    stacks: Vec<&'static str>,
    rows: Vec<Row>,
}

impl Report {
    /// Medians of `samples`, with where and how they were taken.
    pub(crate) fn new(stacks: &[Stack], samples: &Samples, args: &str) -> Self {
        let rows = Metric::ALL
            .iter()
            .map(|&metric| {
                let mut row = Row {
                    metric,
                    label: metric.label(),
                    median: BTreeMap::new(),
                    samples: BTreeMap::new(),
                };
                for s in stacks {
                    if let Some(values) = samples.0.get(&(metric, s.name())) {
                        if let Some(m) = median(values) {
                            row.median.insert(s.name(), m);
                        }
                        row.samples.insert(s.name(), values.clone());
                    }
                }
                row
            })
            .collect();
        Report {
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            machine: machine(),
            command: format!("cargo run --release -p srpc-bench -- run {args}"),
            stacks: stacks.iter().map(|s| s.name()).collect(),
            rows,
        }
    }

    /// A Markdown table: medians, then srpc's ratio to each other contender.
    pub(crate) fn markdown(&self) -> String {
        let others: Vec<&str> = self
            .stacks
            .iter()
            .copied()
            .filter(|s| *s != "srpc")
            .collect();
        let mut out = format!(
            "Measured {} on {}.\nCommand: `{}`\n\n| scenario |",
            self.date, self.machine, self.command
        );
        for s in &self.stacks {
            out.push_str(&format!(" {s} |"));
        }
        for s in &others {
            out.push_str(&format!(" srpc / {s} |"));
        }
        out.push_str("\n|---|");
        for _ in 0..self.stacks.len() + others.len() {
            out.push_str("---:|");
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&format!("| {} |", row.label));
            for s in &self.stacks {
                match row.median.get(s) {
                    Some(v) => out.push_str(&format!(" {} |", group(*v, row.metric.decimals()))),
                    None => out.push_str(" – |"),
                }
            }
            for s in &others {
                match (row.median.get("srpc"), row.median.get(s)) {
                    (Some(ours), Some(theirs)) if *theirs > 0.0 => {
                        out.push_str(&format!(" {:.2}× |", ours / theirs));
                    }
                    _ => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
        out
    }

    /// Everything, including each repetition's value.
    pub(crate) fn json(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// A bar chart of calls/s per contender at 1 and 64 in flight.
    pub(crate) fn chart(&self, path: &Path) -> anyhow::Result<()> {
        let groups = [
            (Metric::Calls1, "64 B × 1 in flight"),
            (Metric::Calls64, "64 B × 64 in flight"),
        ];
        let n = self.stacks.len();
        let top = self
            .rows
            .iter()
            .filter(|r| groups.iter().any(|(m, _)| *m == r.metric))
            .flat_map(|r| r.median.values().copied())
            .fold(1.0f64, f64::max)
            * 1.15;
        let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let caption = format!("srpc-bench: calls/s, median of repetitions ({})", self.date);
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..groups.len() as f64, 0.0..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 1e-6 && i < groups.len() {
                    groups[i].1.to_string()
                } else {
                    String::new()
                }
            })
            .y_desc("calls per second")
            .y_label_formatter(&|y| group(*y, 0))
            .draw()?;
        let width = 0.8 / n as f64;
        for (si, stack) in self.stacks.iter().enumerate() {
            let color = Palette99::pick(si).to_rgba();
            let mut bars = Vec::new();
            let mut labels = Vec::new();
            for (gi, (metric, _)) in groups.iter().enumerate() {
                let Some(row) = self.rows.iter().find(|r| r.metric == *metric) else {
                    continue;
                };
                let Some(v) = row.median.get(stack) else {
                    continue;
                };
                let x0 = gi as f64 + 0.1 + si as f64 * width;
                bars.push(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, *v)],
                    color.filled(),
                ));
                labels.push(Text::new(
                    group(*v, 0),
                    (x0, *v + top * 0.01),
                    ("sans-serif", 12),
                ));
            }
            chart
                .draw_series(bars)?
                .label(*stack)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
            chart.draw_series(labels)?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

/// `1234567.8` as `1,234,568` (or with `decimals` places).
fn group(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

/// Cores and CPU model, from /proc/cpuinfo.
fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {model}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_grouping() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(group(1234567.4, 0), "1,234,567");
        assert_eq!(group(999.0, 0), "999");
        assert_eq!(group(1000.25, 1), "1,000.2");
    }

    #[test]
    fn parallel_labels_name_the_number_of_dialers() {
        let n = format!("{} dialing at once", crate::scenario::DIALERS);
        assert!(Metric::ConnFullParallel.label().starts_with(&n));
        assert!(Metric::ConnResumedParallel.label().starts_with(&n));
    }
}
