//! Reports: what a policy run's records add up to, and how it is shown.
//!
//! **Owns**: the summary of one run per priority class ([`RunResult`],
//! [`Summary`], [`ClassMetrics`]: latencies, preemption loss, migrations,
//! fragmentation, cost), the terminal table, `results.json`, `timing.json`,
//! the CSV, the plots (PNG and SVG, plotters with a vendored font) and the
//! claim file of the `compare` mode.
//! **Never touches**: the simulator, the live driver, engines, policies,
//! randomness, clocks (wall times arrive in [`FleetRecord::wall_seconds`]).
//!
//! Definitions (all times from [`RequestRecord`], µs in, ms out):
//! - request latency = finish − arrival, over completed requests (a finish
//!   time and no error);
//! - prefill latency = first token − arrival (queueing included), over
//!   requests that got a first token;
//! - decode latency = (finish − first token) / (output tokens − 1), the mean
//!   per-token time after the first, over completed requests with more than
//!   one output token;
//! - each as mean, p50, p99; percentiles interpolate linearly between the
//!   closest ranks (numpy's default, as Llumnix's scripts use);
//! - preemption loss: mean per request of the class (requests never
//!   preempted count as 0) and total;
//! - failed = an error or no finish time;
//! - fragmentation ratio = mean over the fleet samples of
//!   `fragmented_demand_blocks / free_blocks_total` (a sample with no free
//!   block counts 0): the share of the fleet's free memory that waiting
//!   requests could use in total but in no single instance;
//! - average instances = instance·seconds / run seconds (the cost metric),
//!   or the mean of the samples' instance counts when those are missing;
//! - simulated seconds per wall second = run seconds / wall seconds, kept in
//!   [`Timing`], which `results.json` leaves out unless asked (so the same
//!   seed gives byte-identical files) and `timing.json` holds.
//!
//! Floats in the summary are rounded (ms to 3 decimals, ratios to 6) so the
//! files read well; serde_json prints the shortest exact form, so identical
//! input gives identical bytes.

// The simulator and the live driver call into this module; until they do,
// parts of it are only reached from tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::record::{FleetRecord, FleetSample, RequestRecord};

// ---------------------------------------------------------------- metrics

/// Mean and percentiles of a latency, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Requests the figures are over.
    pub count: usize,
}

/// One priority class's metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub request_latency: LatencyStats,
    pub prefill_latency: LatencyStats,
    pub decode_latency: LatencyStats,
    pub preemptions: u64,
    pub preempted_requests: usize,
    pub preemption_loss_mean_ms: f64,
    pub preemption_loss_total_s: f64,
    /// Committed migrations the class's requests went through.
    pub migrations: u64,
    pub migrated_requests: usize,
}

/// What one policy run adds up to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub all: ClassMetrics,
    pub high: ClassMetrics,
    pub normal: ClassMetrics,
    pub migrations_committed: u64,
    pub migrations_aborted: u64,
    pub scale_ups: u64,
    pub scale_downs: u64,
    /// Mean over samples of fragmented demand / total free blocks.
    pub fragmentation_ratio: f64,
    pub fragmented_demand_blocks_mean: f64,
    pub waiting_demand_blocks_mean: f64,
    pub avg_instances: f64,
    pub max_instances: u32,
    pub instance_seconds: f64,
    pub run_seconds: f64,
    /// Prefill latency at percentiles 0, 1, …, 100 (ms): the CDF, kept so
    /// plots need not keep every request.
    pub prefill_percentiles_ms: Vec<f64>,
}

/// Wall-clock figures of a run: not reproducible, so not in `results.json`
/// unless asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub wall_seconds: f64,
    pub sim_seconds_per_wall_second: f64,
}

/// Who ran what (the arguments of [`RunResult::new`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RunMeta {
    pub policy: String,
    pub workload: String,
    /// Requests per second.
    pub rate: f64,
    pub seed: u64,
    /// Instances at the start.
    pub instances: u32,
}

/// One policy run on one workload at one rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub policy: String,
    pub workload: String,
    pub rate: f64,
    pub seed: u64,
    pub instances: u32,
    pub summary: Summary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
    /// Fleet samples (instance count over time, fragmentation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<FleetSample>,
    /// Per-request records, when kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<RequestRecord>,
}

fn r3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1e3).round() / 1e3
    } else {
        0.0
    }
}

fn r6(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1e6).round() / 1e6
    } else {
        0.0
    }
}

/// Percentile `q` (0–100) of sorted values, interpolating linearly between
/// the closest ranks (numpy's default); 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let pos = (q / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// Mean, p50, p99 and max of values in ms.
pub fn latency_stats(values: &[f64]) -> LatencyStats {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return LatencyStats::default();
    }
    LatencyStats {
        mean_ms: r3(v.iter().sum::<f64>() / v.len() as f64),
        p50_ms: r3(percentile(&v, 50.0)),
        p99_ms: r3(percentile(&v, 99.0)),
        max_ms: r3(v[v.len() - 1]),
        count: v.len(),
    }
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1e3
}

fn is_failed(r: &RequestRecord) -> bool {
    r.error.is_some() || r.finish_us.is_none()
}

fn prefill_ms(r: &RequestRecord) -> Option<f64> {
    r.first_token_us
        .map(|t| us_to_ms(t.saturating_sub(r.arrival_us)))
}

fn request_ms(r: &RequestRecord) -> Option<f64> {
    (!is_failed(r)).then(|| us_to_ms(r.finish_us.unwrap_or(0).saturating_sub(r.arrival_us)))
}

fn decode_ms(r: &RequestRecord) -> Option<f64> {
    match (r.first_token_us, r.finish_us) {
        (Some(f), Some(e)) if !is_failed(r) && r.output_tokens > 1 => {
            Some(us_to_ms(e.saturating_sub(f)) / f64::from(r.output_tokens - 1))
        }
        _ => None,
    }
}

/// One class's metrics over the records given.
pub fn class_metrics<'a>(records: impl IntoIterator<Item = &'a RequestRecord>) -> ClassMetrics {
    let mut m = ClassMetrics::default();
    let (mut req, mut pre, mut dec) = (Vec::new(), Vec::new(), Vec::new());
    let mut loss_us: u64 = 0;
    for r in records {
        m.requests += 1;
        if is_failed(r) {
            m.failed += 1;
        } else {
            m.completed += 1;
        }
        req.extend(request_ms(r));
        pre.extend(prefill_ms(r));
        dec.extend(decode_ms(r));
        m.preemptions += u64::from(r.preemptions);
        m.preempted_requests += usize::from(r.preemptions > 0);
        loss_us += r.preemption_loss_us;
        m.migrations += u64::from(r.migrations);
        m.migrated_requests += usize::from(r.migrations > 0);
    }
    m.request_latency = latency_stats(&req);
    m.prefill_latency = latency_stats(&pre);
    m.decode_latency = latency_stats(&dec);
    if m.requests > 0 {
        m.preemption_loss_mean_ms = r3(loss_us as f64 / 1e3 / m.requests as f64);
    }
    m.preemption_loss_total_s = r6(loss_us as f64 / 1e6);
    m
}

/// Summarises a run's records and fleet record.
pub fn summarize(records: &[RequestRecord], fleet: &FleetRecord) -> Summary {
    let mut prefill: Vec<f64> = records.iter().filter_map(prefill_ms).collect();
    prefill.sort_by(f64::total_cmp);
    let samples = &fleet.samples;
    let n = samples.len() as f64;
    let mean_of = |f: &dyn Fn(&FleetSample) -> f64| {
        if samples.is_empty() {
            0.0
        } else {
            samples.iter().map(f).sum::<f64>() / n
        }
    };
    let frag = mean_of(&|s| {
        if s.free_blocks_total == 0 {
            0.0
        } else {
            s.fragmented_demand_blocks as f64 / s.free_blocks_total as f64
        }
    });
    let avg_instances = if fleet.instance_seconds > 0.0 && fleet.run_seconds > 0.0 {
        fleet.instance_seconds / fleet.run_seconds
    } else {
        mean_of(&|s| f64::from(s.instances))
    };
    Summary {
        all: class_metrics(records),
        high: class_metrics(records.iter().filter(|r| r.high_priority)),
        normal: class_metrics(records.iter().filter(|r| !r.high_priority)),
        migrations_committed: fleet.migrations_committed,
        migrations_aborted: fleet.migrations_aborted,
        scale_ups: fleet.scale_ups,
        scale_downs: fleet.scale_downs,
        fragmentation_ratio: r6(frag),
        fragmented_demand_blocks_mean: r3(mean_of(&|s| s.fragmented_demand_blocks as f64)),
        waiting_demand_blocks_mean: r3(mean_of(&|s| s.waiting_demand_blocks as f64)),
        avg_instances: r6(avg_instances),
        max_instances: samples.iter().map(|s| s.instances).max().unwrap_or(0),
        instance_seconds: r3(fleet.instance_seconds),
        run_seconds: r6(fleet.run_seconds),
        prefill_percentiles_ms: if prefill.is_empty() {
            Vec::new()
        } else {
            (0..=100)
                .map(|q| r3(percentile(&prefill, f64::from(q))))
                .collect()
        },
    }
}

impl RunResult {
    /// Summarises a run. Keeps the fleet samples (for the instance-count
    /// plot), not the per-request records (see [`RunResult::with_requests`]).
    /// The wall time, when the fleet record has one, goes to `timing`.
    pub fn new(meta: RunMeta, records: &[RequestRecord], fleet: &FleetRecord) -> RunResult {
        let timing = (fleet.wall_seconds > 0.0).then(|| Timing {
            wall_seconds: fleet.wall_seconds,
            sim_seconds_per_wall_second: fleet.run_seconds / fleet.wall_seconds,
        });
        RunResult {
            policy: meta.policy,
            workload: meta.workload,
            rate: meta.rate,
            seed: meta.seed,
            instances: meta.instances,
            summary: summarize(records, fleet),
            timing,
            samples: fleet.samples.clone(),
            requests: Vec::new(),
        }
    }

    /// Keeps the per-request records too (CDFs from every request; large).
    pub fn with_requests(mut self, records: &[RequestRecord]) -> RunResult {
        self.requests = records.to_vec();
        self
    }

    /// Drops the fleet samples.
    pub fn without_samples(mut self) -> RunResult {
        self.samples.clear();
        self
    }
}

// ---------------------------------------------------------------- table

fn policy_order(p: &str) -> usize {
    match p {
        "llumnix" => 0,
        "infaas" => 1,
        "round-robin" => 2,
        "queue-length" => 3,
        _ => 4,
    }
}

/// The terminal table (the bench prints it to stderr).
pub fn table(results: &[RunResult]) -> String {
    let mut out = String::new();
    let pw = results
        .iter()
        .map(|r| r.policy.len())
        .max()
        .unwrap_or(0)
        .max(14);
    let timing = results.iter().any(|r| r.timing.is_some());
    let _ = write!(
        out,
        "{:<pw$} {:<24} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>6} {:>6} {:>7} {:>6}",
        "policy",
        "workload",
        "rate",
        "req_mean",
        "req_p99",
        "pre_mean",
        "pre_p99",
        "dec_mean",
        "dec_p99",
        "preempt",
        "migr",
        "frag%",
        "inst",
        "failed"
    );
    if timing {
        let _ = write!(out, " {:>9}", "sim/wall");
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "{:<pw$} {:<24} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>6} {:>6} {:>7} {:>6}",
        "", "", "req/s", "ms", "ms", "ms", "ms", "ms", "ms", "ms/req", "", "", "avg", ""
    );
    for r in results {
        let s = &r.summary;
        let a = &s.all;
        let _ = write!(
            out,
            "{:<pw$} {:<24} {:>7.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>9.1} {:>6} {:>6.2} {:>7.2} {:>6}",
            r.policy,
            r.workload,
            r.rate,
            a.request_latency.mean_ms,
            a.request_latency.p99_ms,
            a.prefill_latency.mean_ms,
            a.prefill_latency.p99_ms,
            a.decode_latency.mean_ms,
            a.decode_latency.p99_ms,
            a.preemption_loss_mean_ms,
            s.migrations_committed,
            s.fragmentation_ratio * 100.0,
            s.avg_instances,
            a.failed
        );
        if timing {
            match r.timing {
                Some(t) => {
                    let _ = write!(out, " {:>8.0}x", t.sim_seconds_per_wall_second);
                }
                None => {
                    let _ = write!(out, " {:>9}", "-");
                }
            }
        }
        out.push('\n');
    }
    if results.iter().any(|r| r.summary.high.requests > 0) {
        out.push('\n');
        let _ = writeln!(
            out,
            "{:<pw$} {:<24} {:>7} {:<7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
            "policy",
            "workload",
            "rate",
            "class",
            "reqs",
            "pre_mean",
            "pre_p99",
            "req_mean",
            "req_p99",
            "dec_mean",
            "dec_p99"
        );
        for r in results {
            for (class, m) in [("high", &r.summary.high), ("normal", &r.summary.normal)] {
                let _ = writeln!(
                    out,
                    "{:<pw$} {:<24} {:>7.2} {:<7} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8.2}",
                    r.policy,
                    r.workload,
                    r.rate,
                    class,
                    m.requests,
                    m.prefill_latency.mean_ms,
                    m.prefill_latency.p99_ms,
                    m.request_latency.mean_ms,
                    m.request_latency.p99_ms,
                    m.decode_latency.mean_ms,
                    m.decode_latency.p99_ms
                );
            }
        }
    }
    out
}

/// Prints [`table`] to stderr (stdout is reserved for `--json`).
pub fn print_table(results: &[RunResult]) {
    eprint!("{}", table(results));
}

// ---------------------------------------------------------------- files

#[derive(Serialize)]
struct ResultsDoc<'a> {
    runs: &'a [RunResult],
}

/// `results.json`'s text: `{"runs": [...]}`, pretty, newline-terminated.
/// Without `include_timing` the wall-clock figures are left out, so the same
/// seed gives the same bytes.
pub fn results_json(results: &[RunResult], include_timing: bool) -> String {
    let stripped: Vec<RunResult>;
    let runs = if include_timing {
        results
    } else {
        stripped = results
            .iter()
            .map(|r| RunResult {
                timing: None,
                ..r.clone()
            })
            .collect();
        &stripped
    };
    let mut s = serde_json::to_string_pretty(&ResultsDoc { runs }).expect("results serialise");
    s.push('\n');
    s
}

/// Writes [`results_json`] to `path`.
pub fn write_results_json(
    path: &Path,
    results: &[RunResult],
    include_timing: bool,
) -> io::Result<()> {
    std::fs::write(path, results_json(results, include_timing))
}

#[derive(Serialize)]
struct TimingRow<'a> {
    policy: &'a str,
    workload: &'a str,
    rate: f64,
    seed: u64,
    instances: u32,
    run_seconds: f64,
    wall_seconds: f64,
    sim_seconds_per_wall_second: f64,
}

#[derive(Serialize)]
struct TimingDoc<'a> {
    total_wall_seconds: f64,
    runs: Vec<TimingRow<'a>>,
}

/// `timing.json`'s text: the wall-clock figures of the runs that have them.
pub fn timing_json(results: &[RunResult]) -> String {
    let runs: Vec<TimingRow> = results
        .iter()
        .filter_map(|r| {
            r.timing.map(|t| TimingRow {
                policy: &r.policy,
                workload: &r.workload,
                rate: r.rate,
                seed: r.seed,
                instances: r.instances,
                run_seconds: r.summary.run_seconds,
                wall_seconds: t.wall_seconds,
                sim_seconds_per_wall_second: t.sim_seconds_per_wall_second,
            })
        })
        .collect();
    let doc = TimingDoc {
        total_wall_seconds: runs.iter().map(|r| r.wall_seconds).sum(),
        runs,
    };
    let mut s = serde_json::to_string_pretty(&doc).expect("timing serialises");
    s.push('\n');
    s
}

/// Writes [`timing_json`] to `path`.
pub fn write_timing_json(path: &Path, results: &[RunResult]) -> io::Result<()> {
    std::fs::write(path, timing_json(results))
}

const CSV_CLASSES: [&str; 3] = ["all", "high", "normal"];
const CSV_METRICS: [&str; 3] = ["request", "prefill", "decode"];

/// The CSV header: one row per run.
pub fn csv_header() -> String {
    let mut cols: Vec<String> = [
        "policy",
        "workload",
        "rate",
        "seed",
        "instances",
        "requests",
        "completed",
        "failed",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for class in CSV_CLASSES {
        for metric in CSV_METRICS {
            for stat in ["mean_ms", "p50_ms", "p99_ms"] {
                cols.push(format!("{class}_{metric}_{stat}"));
            }
        }
    }
    cols.extend(
        [
            "preemption_loss_mean_ms",
            "preemption_loss_total_s",
            "preemptions",
            "migrations_committed",
            "migrations_aborted",
            "scale_ups",
            "scale_downs",
            "fragmentation_ratio",
            "avg_instances",
            "max_instances",
            "instance_seconds",
            "run_seconds",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    cols.join(",")
}

/// A CSV field, quoted when it must be.
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One CSV row (columns of [`csv_header`]).
pub fn csv_row(r: &RunResult) -> String {
    let s = &r.summary;
    let mut f: Vec<String> = vec![
        csv_field(&r.policy),
        csv_field(&r.workload),
        r.rate.to_string(),
        r.seed.to_string(),
        r.instances.to_string(),
        s.all.requests.to_string(),
        s.all.completed.to_string(),
        s.all.failed.to_string(),
    ];
    for m in [&s.all, &s.high, &s.normal] {
        for l in [&m.request_latency, &m.prefill_latency, &m.decode_latency] {
            f.extend([l.mean_ms, l.p50_ms, l.p99_ms].iter().map(f64::to_string));
        }
    }
    f.extend([
        s.all.preemption_loss_mean_ms.to_string(),
        s.all.preemption_loss_total_s.to_string(),
        s.all.preemptions.to_string(),
        s.migrations_committed.to_string(),
        s.migrations_aborted.to_string(),
        s.scale_ups.to_string(),
        s.scale_downs.to_string(),
        s.fragmentation_ratio.to_string(),
        s.avg_instances.to_string(),
        s.max_instances.to_string(),
        s.instance_seconds.to_string(),
        s.run_seconds.to_string(),
    ]);
    f.join(",")
}

/// The CSV text: header and one row per run.
pub fn csv(results: &[RunResult]) -> String {
    let mut out = csv_header();
    out.push('\n');
    for r in results {
        out.push_str(&csv_row(r));
        out.push('\n');
    }
    out
}

/// Writes [`csv`] to `path`.
pub fn write_csv(path: &Path, results: &[RunResult]) -> io::Result<()> {
    std::fs::write(path, csv(results))
}

/// Writes `results.json` (no wall times), `timing.json` (when any run has
/// them), `results.csv` and the plots into `dir`; returns the paths written.
pub fn write_all(dir: &Path, results: &[RunResult]) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let p = dir.join("results.json");
    write_results_json(&p, results, false)?;
    written.push(p);
    if results.iter().any(|r| r.timing.is_some()) {
        let p = dir.join("timing.json");
        write_timing_json(&p, results)?;
        written.push(p);
    }
    let p = dir.join("results.csv");
    write_csv(&p, results)?;
    written.push(p);
    written.extend(write_plots(dir, results)?);
    Ok(written)
}

// ---------------------------------------------------------------- plots

static FONT_SANS: &[u8] = include_bytes!("../data/fonts/DejaVuSans.ttf");

/// Registers the vendored font as plotters' `sans-serif` (once).
fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // A font that does not parse leaves text failing to draw, which
            // the plot functions report as an error.
            let _ = plotters::style::register_font("sans-serif", style, FONT_SANS);
        }
    });
}

struct Series {
    name: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    markers: bool,
}

struct Panel {
    title: String,
    x_label: String,
    y_label: String,
    series: Vec<Series>,
    log_x: bool,
    log_y: bool,
    /// Fixed y range (else from the data).
    y_range: Option<(f64, f64)>,
    /// Room above the data for the legend (share of the axis).
    headroom: f64,
    legend: SeriesLabelPosition,
    /// Light mesh lines between the labelled ones (on linear axes).
    light_lines: usize,
}

struct Figure {
    title: String,
    panels: Vec<Panel>,
    cols: usize,
    size: (u32, u32),
}

fn policy_color(policy: &str, index: usize) -> RGBColor {
    const OTHERS: [RGBColor; 6] = [
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    match policy {
        "llumnix" => RGBColor(214, 39, 40),
        "infaas" => RGBColor(31, 119, 180),
        "round-robin" => RGBColor(44, 160, 44),
        "queue-length" => RGBColor(255, 127, 14),
        _ => OTHERS[index % OTHERS.len()],
    }
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// A padded data range; for log axes over positive values only.
fn axis_range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        if hi <= lo {
            return (lo / 2.0, hi * 2.0);
        }
        let f = (hi / lo).powf(0.05);
        (lo / f, hi * f)
    } else {
        if hi <= lo {
            let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            return (lo - d, hi + d);
        }
        let d = (hi - lo) * 0.05;
        (lo - d, hi + d)
    }
}

fn wide(values: impl Iterator<Item = f64>, factor: f64) -> bool {
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for v in values.filter(|v| v.is_finite()) {
        if v <= 0.0 {
            return false;
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    lo.is_finite() && hi / lo >= factor
}

fn draw_err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn draw_panel_in<DB, X, Y>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
    x: X,
    y: Y,
) -> Result<(), String>
where
    DB: DrawingBackend,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(62)
        .build_cartesian_2d(x, y)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .x_label_formatter(&|v: &f64| tick(*v))
        .y_label_formatter(&|v: &f64| tick(*v))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(RGBColor(238, 238, 238))
        .max_light_lines(if panel.log_x || panel.log_y {
            0
        } else {
            panel.light_lines
        })
        .x_labels(8)
        .y_labels(8)
        .draw()
        .map_err(draw_err)?;
    let keep = |&(px, py): &(f64, f64)| {
        px.is_finite() && py.is_finite() && (!panel.log_x || px > 0.0) && (!panel.log_y || py > 0.0)
    };
    for s in &panel.series {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(keep).collect();
        let color = s.color;
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(s.name.as_str())
            .legend(move |(lx, ly)| {
                PathElement::new(vec![(lx, ly), (lx + 22, ly)], color.stroke_width(3))
            });
        if s.markers {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(draw_err)?;
        }
    }
    if !panel.series.is_empty() {
        chart
            .configure_series_labels()
            .position(panel.legend.clone())
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
) -> Result<(), String> {
    let xs = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
    };
    let ys = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
    };
    let (x0, x1) = axis_range(xs(), panel.log_x);
    let (y0, y1) = panel.y_range.unwrap_or_else(|| {
        let (a, b) = axis_range(ys(), panel.log_y);
        // A linear axis over values that are all >= 0 starts at 0.
        let all_non_negative = ys().all(|v| !v.is_finite() || v >= 0.0);
        let (a, b) = if !panel.log_y && all_non_negative {
            (0.0, b)
        } else {
            (a, b)
        };
        if panel.log_y {
            (a, b * (b / a).powf(panel.headroom))
        } else {
            (a, b + (b - a) * panel.headroom)
        }
    });
    match (panel.log_x, panel.log_y) {
        (false, false) => draw_panel_in(area, panel, x0..x1, y0..y1),
        (true, false) => draw_panel_in(area, panel, (x0..x1).log_scale(), y0..y1),
        (false, true) => draw_panel_in(area, panel, x0..x1, (y0..y1).log_scale()),
        (true, true) => draw_panel_in(area, panel, (x0..x1).log_scale(), (y0..y1).log_scale()),
    }
}

fn draw_figure<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    fig: &Figure,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(draw_err)?;
    let root = root
        .titled(&fig.title, ("sans-serif", 20))
        .map_err(draw_err)?;
    let cols = fig.cols.max(1);
    let rows = fig.panels.len().div_ceil(cols).max(1);
    let areas = root.split_evenly((rows, cols));
    for (area, panel) in areas.iter().zip(&fig.panels) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

/// Renders a figure to `stem.svg` and `stem.png`.
fn save_figure(stem: &Path, fig: &Figure) -> io::Result<Vec<PathBuf>> {
    register_fonts();
    let to_io = |e: String| io::Error::other(format!("plot {}: {e}", stem.display()));
    // Not `with_extension`: stems hold dots (`r3.5`, `zipf-…-a1.2`).
    let with_ext = |ext: &str| {
        let mut p = stem.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    let svg = with_ext(".svg");
    draw_figure(SVGBackend::new(&svg, fig.size).into_drawing_area(), fig).map_err(to_io)?;
    let (w, h) = fig.size;
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    draw_figure(
        BitMapBackend::with_buffer(&mut buf, fig.size).into_drawing_area(),
        fig,
    )
    .map_err(to_io)?;
    let png_path = with_ext(".png");
    let file = io::BufWriter::new(std::fs::File::create(&png_path)?);
    let mut enc = png::Encoder::new(file, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(io::Error::other)?;
    writer.write_image_data(&buf).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)?;
    Ok(vec![png_path, svg])
}

/// A name safe in a file name.
fn file_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn rate_part(rate: f64) -> String {
    let s = format!("{rate:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("r{s}")
}

/// Workloads in order of first appearance.
fn workloads(results: &[RunResult]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in results {
        if !out.contains(&r.workload.as_str()) {
            out.push(&r.workload);
        }
    }
    out
}

/// Policies in a stable order (llumnix, infaas, round-robin, queue-length,
/// then the others by first appearance).
fn policies<'a>(results: impl IntoIterator<Item = &'a RunResult>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for r in results {
        if !out.contains(&r.policy.as_str()) {
            out.push(&r.policy);
        }
    }
    out.sort_by_key(|p| policy_order(p));
    out
}

/// Rates of a workload's runs, ascending and distinct.
fn rates(runs: &[&RunResult]) -> Vec<f64> {
    let mut out: Vec<f64> = runs.iter().map(|r| r.rate).collect();
    out.sort_by(f64::total_cmp);
    out.dedup();
    out
}

fn prefill_cdf(r: &RunResult) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = r.requests.iter().filter_map(prefill_ms).collect();
    if v.is_empty() {
        let p = &r.summary.prefill_percentiles_ms;
        return p
            .iter()
            .enumerate()
            .map(|(i, &x)| (x, i as f64 / 100.0))
            .collect();
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let step = n.div_ceil(1000).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i], (i + 1) as f64 / n as f64))
        .collect();
    pts.push((v[n - 1], 1.0));
    pts
}

fn instance_steps(samples: &[FleetSample]) -> Vec<(f64, f64)> {
    let mut pts = Vec::with_capacity(samples.len() * 2);
    for (i, s) in samples.iter().enumerate() {
        let t = s.t_us as f64 / 1e6;
        if i > 0 {
            pts.push((t, f64::from(samples[i - 1].instances)));
        }
        pts.push((t, f64::from(s.instances)));
    }
    pts
}

/// Writes the plots into `dir` (PNG and SVG each) and returns their paths:
/// - `latency_vs_rate_{workload}`: prefill mean and P99, request mean and
///   P99 against the rate, one line per policy;
/// - `prefill_cdf_{workload}_r{rate}`: the CDF of prefill latency per policy;
/// - `instances_{workload}_r{rate}`: the instance count over time per policy,
///   where some run's count changed (auto-scaling).
pub fn write_plots(dir: &Path, results: &[RunResult]) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for w in workloads(results) {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.workload == w).collect();
        let pols = policies(runs.iter().copied());
        let first = |p: &str, rate: f64| {
            runs.iter()
                .copied()
                .find(|r| r.policy == p && r.rate == rate)
        };

        // Latency against rate.
        let metric_panel = |title: &str, get: &dyn Fn(&Summary) -> f64| {
            let series: Vec<Series> = pols
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let points = rates(&runs)
                        .into_iter()
                        .filter_map(|rate| first(p, rate).map(|r| (rate, get(&r.summary))))
                        .collect();
                    Series {
                        name: p.to_string(),
                        color: policy_color(p, i),
                        points,
                        markers: true,
                    }
                })
                .collect();
            let log_y = wide(
                series.iter().flat_map(|s| s.points.iter().map(|p| p.1)),
                20.0,
            );
            Panel {
                title: title.to_string(),
                x_label: "rate (req/s)".into(),
                y_label: if log_y {
                    "ms (log)".into()
                } else {
                    "ms".into()
                },
                series,
                log_x: false,
                log_y,
                y_range: None,
                headroom: 0.3,
                legend: SeriesLabelPosition::UpperLeft,
                light_lines: 2,
            }
        };
        let fig = Figure {
            title: format!("{w}: latency vs rate"),
            panels: vec![
                metric_panel("prefill latency, mean", &|s| s.all.prefill_latency.mean_ms),
                metric_panel("prefill latency, P99", &|s| s.all.prefill_latency.p99_ms),
                metric_panel("request latency, mean", &|s| s.all.request_latency.mean_ms),
                metric_panel("request latency, P99", &|s| s.all.request_latency.p99_ms),
            ],
            cols: 2,
            size: (1200, 900),
        };
        written.extend(save_figure(
            &dir.join(format!("latency_vs_rate_{}", file_part(w))),
            &fig,
        )?);

        for rate in rates(&runs) {
            let at: Vec<&RunResult> = pols.iter().filter_map(|p| first(p, rate)).collect();
            // Prefill CDF.
            let series: Vec<Series> = at
                .iter()
                .enumerate()
                .map(|(i, r)| Series {
                    name: r.policy.clone(),
                    color: policy_color(&r.policy, i),
                    points: prefill_cdf(r),
                    markers: false,
                })
                .filter(|s| !s.points.is_empty())
                .collect();
            if !series.is_empty() {
                let log_x = wide(
                    series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
                    100.0,
                );
                let fig = Figure {
                    title: format!("{w} at {} req/s", tick(rate)),
                    panels: vec![Panel {
                        title: "prefill latency CDF".into(),
                        x_label: if log_x {
                            "prefill latency (ms, log)".into()
                        } else {
                            "prefill latency (ms)".into()
                        },
                        y_label: "fraction of requests".into(),
                        series,
                        log_x,
                        log_y: false,
                        y_range: Some((0.0, 1.02)),
                        headroom: 0.0,
                        legend: SeriesLabelPosition::LowerRight,
                        light_lines: 2,
                    }],
                    cols: 1,
                    size: (900, 600),
                };
                let stem = dir.join(format!("prefill_cdf_{}_{}", file_part(w), rate_part(rate)));
                written.extend(save_figure(&stem, &fig)?);
            }
            // Instance count over time (auto-scaling).
            let varies = at.iter().any(|r| {
                r.samples
                    .windows(2)
                    .any(|p| p[0].instances != p[1].instances)
            });
            if varies {
                let series: Vec<Series> = at
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| !r.samples.is_empty())
                    .map(|(i, r)| Series {
                        name: format!("{} (avg {:.2})", r.policy, r.summary.avg_instances),
                        color: policy_color(&r.policy, i),
                        points: instance_steps(&r.samples),
                        markers: false,
                    })
                    .collect();
                let top = at
                    .iter()
                    .flat_map(|r| r.samples.iter().map(|s| s.instances))
                    .max()
                    .unwrap_or(1);
                let fig = Figure {
                    title: format!("{w} at {} req/s", tick(rate)),
                    panels: vec![Panel {
                        title: "instances over time".into(),
                        x_label: "time (s)".into(),
                        y_label: "instances".into(),
                        series,
                        log_x: false,
                        log_y: false,
                        y_range: Some((0.0, f64::from(top) * 1.3 + 1.0)),
                        headroom: 0.0,
                        legend: SeriesLabelPosition::UpperLeft,
                        light_lines: 2,
                    }],
                    cols: 1,
                    size: (900, 600),
                };
                let stem = dir.join(format!("instances_{}_{}", file_part(w), rate_part(rate)));
                written.extend(save_figure(&stem, &fig)?);
            }
        }
    }
    Ok(written)
}

/// One line of a summary plot: a policy's values (its name picks the
/// colour, as in the other plots).
pub struct PlotLine {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel of a summary plot.
pub struct PlotPanel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<PlotLine>,
}

/// Draws `panels` in a grid of `cols` columns into one SVG at `path` (for
/// pages that link plots, e.g. the study's RESULTS.md). A panel's y axis
/// is logarithmic where its values span 20× or more.
pub fn write_panels_svg(
    path: &Path,
    title: &str,
    cols: usize,
    panels: &[PlotPanel],
) -> io::Result<()> {
    register_fonts();
    let cols = cols.max(1);
    let rows = panels.len().div_ceil(cols).max(1);
    let panels: Vec<Panel> = panels
        .iter()
        .map(|p| {
            let series: Vec<Series> = p
                .lines
                .iter()
                .enumerate()
                .map(|(i, l)| Series {
                    name: l.name.clone(),
                    color: policy_color(&l.name, i),
                    points: l.points.clone(),
                    markers: true,
                })
                .collect();
            let log_y = wide(
                series.iter().flat_map(|s| s.points.iter().map(|p| p.1)),
                20.0,
            );
            Panel {
                title: p.title.clone(),
                x_label: p.x_label.clone(),
                y_label: if log_y {
                    format!("{} (log)", p.y_label)
                } else {
                    p.y_label.clone()
                },
                series,
                log_x: false,
                log_y,
                y_range: None,
                headroom: 0.35,
                legend: SeriesLabelPosition::UpperLeft,
                // Small files for a docs page.
                light_lines: 0,
            }
        })
        .collect();
    let fig = Figure {
        title: title.to_string(),
        panels,
        cols,
        size: (cols as u32 * 420, rows as u32 * 300 + 40),
    };
    draw_figure(SVGBackend::new(path, fig.size).into_drawing_area(), &fig)
        .map_err(|e| io::Error::other(format!("plot {}: {e}", path.display())))
}

// ---------------------------------------------------------------- claims

/// Whether a workload name is a real trace (the paper reports those apart).
fn is_real_trace(workload: &str) -> bool {
    ["sharegpt", "azure", "trace", "burstgpt"]
        .iter()
        .any(|p| workload.starts_with(p))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// baseline / llumnix: above 1 is llumnix better.
    Ratio,
    /// (llumnix − baseline) / baseline: negative is llumnix better.
    Change,
}

struct ClaimMetric {
    label: &'static str,
    kind: Kind,
    get: fn(&Summary) -> f64,
    unit: &'static str,
    /// The paper's number against INFaaS++: generated lengths, real traces,
    /// with auto-scaling ("" where it reports none).
    paper_infaas: [&'static str; 3],
    /// Against round-robin.
    paper_rr: &'static str,
    /// Against Llumnix without priorities (a baseline named `llumnix-…`).
    paper_base: &'static str,
}

const CLAIM_METRICS: &[ClaimMetric] = &[
    ClaimMetric {
        label: "prefill latency mean",
        kind: Kind::Ratio,
        get: |s| s.all.prefill_latency.mean_ms,
        unit: "ms",
        paper_infaas: ["up to 7.7x (generated)", "up to 2.2x (real traces)", ""],
        paper_rr: "up to 26.6x",
        paper_base: "",
    },
    ClaimMetric {
        label: "prefill latency P99",
        kind: Kind::Ratio,
        get: |s| s.all.prefill_latency.p99_ms,
        unit: "ms",
        paper_infaas: [
            "up to 14.8x (generated)",
            "up to 5.5x (real traces)",
            "up to 12.2x (auto-scaling)",
        ],
        paper_rr: "up to 34.4x",
        paper_base: "",
    },
    ClaimMetric {
        label: "request latency mean",
        kind: Kind::Ratio,
        get: |s| s.all.request_latency.mean_ms,
        unit: "ms",
        paper_infaas: ["up to 1.5x", "up to 1.5x", ""],
        paper_rr: "",
        paper_base: "",
    },
    ClaimMetric {
        label: "request latency P99",
        kind: Kind::Ratio,
        get: |s| s.all.request_latency.p99_ms,
        unit: "ms",
        paper_infaas: ["up to 1.6x", "up to 1.6x", ""],
        paper_rr: "",
        paper_base: "",
    },
    ClaimMetric {
        label: "decode latency P99",
        kind: Kind::Ratio,
        get: |s| s.all.decode_latency.p99_ms,
        unit: "ms",
        paper_infaas: ["up to 2x", "up to 2x", ""],
        paper_rr: "",
        paper_base: "",
    },
    ClaimMetric {
        label: "preemption loss mean",
        kind: Kind::Change,
        get: |s| s.all.preemption_loss_mean_ms,
        unit: "ms",
        paper_infaas: ["-70%", "-70%", ""],
        paper_rr: "",
        paper_base: "",
    },
    ClaimMetric {
        label: "average instances",
        kind: Kind::Change,
        get: |s| s.avg_instances,
        unit: "",
        paper_infaas: ["", "", "up to -16% to -18% (auto-scaling)"],
        paper_rr: "",
        paper_base: "",
    },
    ClaimMetric {
        label: "high-priority prefill mean",
        kind: Kind::Ratio,
        get: |s| s.high.prefill_latency.mean_ms,
        unit: "ms",
        paper_infaas: ["", "", ""],
        paper_rr: "",
        paper_base: "2.9x-8.6x",
    },
    ClaimMetric {
        label: "high-priority prefill P99",
        kind: Kind::Ratio,
        get: |s| s.high.prefill_latency.p99_ms,
        unit: "ms",
        paper_infaas: ["", "", ""],
        paper_rr: "",
        paper_base: "3.6x-10x",
    },
    ClaimMetric {
        label: "high-priority request mean",
        kind: Kind::Ratio,
        get: |s| s.high.request_latency.mean_ms,
        unit: "ms",
        paper_infaas: ["", "", ""],
        paper_rr: "",
        paper_base: "",
    },
    ClaimMetric {
        label: "normal prefill mean",
        kind: Kind::Change,
        get: |s| s.normal.prefill_latency.mean_ms,
        unit: "ms",
        paper_infaas: ["", "", ""],
        paper_rr: "",
        paper_base: "at most +4.5%",
    },
    ClaimMetric {
        label: "normal request mean",
        kind: Kind::Change,
        get: |s| s.normal.request_latency.mean_ms,
        unit: "ms",
        paper_infaas: ["", "", ""],
        paper_rr: "",
        paper_base: "at most +4.5%",
    },
];

/// What kind of workload a comparison is on.
#[derive(Clone, Copy)]
struct Setting {
    real: bool,
    autoscale: bool,
}

fn paper_for(m: &ClaimMetric, baseline: &str, at: Setting) -> &'static str {
    let s = match baseline {
        "infaas" => {
            let scaled = m.paper_infaas[2];
            if at.autoscale && !scaled.is_empty() {
                scaled
            } else if at.real {
                m.paper_infaas[1]
            } else {
                m.paper_infaas[0]
            }
        }
        "round-robin" => m.paper_rr,
        b if b.starts_with("llumnix") => m.paper_base,
        _ => "",
    };
    if s.is_empty() {
        "not reported"
    } else {
        s
    }
}

/// The figure compared: a ratio or a change; `None` when undefined (0 below).
fn compare(m: &ClaimMetric, llumnix: f64, base: f64) -> Option<f64> {
    match m.kind {
        Kind::Ratio => (llumnix > 0.0).then(|| base / llumnix),
        Kind::Change => (base > 0.0).then(|| (llumnix - base) / base),
    }
}

fn fmt_cmp(m: &ClaimMetric, v: Option<f64>) -> String {
    match (m.kind, v) {
        (_, None) => "n/a".into(),
        (Kind::Ratio, Some(x)) => format!("{x:.2}x"),
        (Kind::Change, Some(x)) => format!("{:+.1}%", x * 100.0),
    }
}

fn fmt_val(v: f64, unit: &str) -> String {
    if unit.is_empty() {
        format!("{v:.2}")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// Better for llumnix: a larger ratio, a more negative change.
fn better(m: &ClaimMetric, a: f64, b: f64) -> bool {
    match m.kind {
        Kind::Ratio => a > b,
        Kind::Change => a < b,
    }
}

/// The claim file's text: per workload and rate, llumnix against every other
/// policy present (infaas, round-robin, queue-length, then the rest), each
/// metric's ratio next to the paper's number; then the best over rates per
/// workload, and over everything per kind of workload. The per-class lines
/// appear where the workload has high-priority requests, the cost line where
/// some run scaled its fleet.
pub fn claims_text(results: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# llumen claims: llumnix against its baselines ({} runs)",
        results.len()
    );
    let _ = writeln!(
        out,
        "# ratio = baseline / llumnix (above 1: llumnix better);"
    );
    let _ = writeln!(
        out,
        "# change = (llumnix - baseline) / baseline (below 0: llumnix better)."
    );
    let _ = writeln!(
        out,
        "# paper = Llumnix (OSDI'24) headline results, 16 instances of LLaMA-7B: against"
    );
    let _ = writeln!(
        out,
        "# INFaaS++ (\"infaas\") and round-robin; the priority figures against Llumnix"
    );
    let _ = writeln!(out, "# without priorities (a baseline named llumnix-...).");
    // (real, auto-scaled, baseline, metric index) -> (value, workload, rate)
    type Key = (bool, bool, String, usize);
    let mut overall: BTreeMap<Key, (f64, String, f64)> = BTreeMap::new();
    for w in workloads(results) {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.workload == w).collect();
        let at = Setting {
            real: is_real_trace(w),
            autoscale: runs
                .iter()
                .any(|r| r.summary.scale_ups + r.summary.scale_downs > 0),
        };
        let pols = policies(runs.iter().copied());
        let baselines: Vec<&str> = pols.iter().copied().filter(|p| *p != "llumnix").collect();
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "== workload {w} ({}{}) ==",
            if at.real {
                "real trace"
            } else {
                "generated lengths"
            },
            if at.autoscale { ", auto-scaling" } else { "" }
        );
        if !pols.contains(&"llumnix") {
            let _ = writeln!(out, "no llumnix run: nothing to compare");
            continue;
        }
        let has_high = runs.iter().any(|r| r.summary.high.requests > 0);
        let metrics: Vec<(usize, &ClaimMetric)> = CLAIM_METRICS
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                let per_class = m.label.starts_with("high") || m.label.starts_with("normal");
                (has_high || !per_class) && (at.autoscale || m.label != "average instances")
            })
            .collect();
        // (baseline index, metric index) -> (best value, rate)
        let mut best: BTreeMap<(usize, usize), (f64, f64)> = BTreeMap::new();
        for rate in rates(&runs) {
            let find = |p: &str| {
                runs.iter()
                    .copied()
                    .find(|r| r.policy == p && r.rate == rate)
            };
            let Some(l) = find("llumnix") else {
                let _ = writeln!(out, "rate {rate:.2} req/s: no llumnix run");
                continue;
            };
            for (bi, b) in baselines.iter().enumerate() {
                let Some(base) = find(b) else { continue };
                let _ = writeln!(
                    out,
                    "rate {rate:.2} req/s, {} instances, seed {}: llumnix vs {b}",
                    l.instances, l.seed
                );
                for &(mi, m) in &metrics {
                    let (lv, bv) = ((m.get)(&l.summary), (m.get)(&base.summary));
                    let v = compare(m, lv, bv);
                    let _ = writeln!(
                        out,
                        "  {:<28} {:>9}  (llumnix {}, {b} {})  paper: {}",
                        m.label,
                        fmt_cmp(m, v),
                        fmt_val(lv, m.unit),
                        fmt_val(bv, m.unit),
                        paper_for(m, b, at)
                    );
                    if let Some(v) = v {
                        let e = best.entry((bi, mi)).or_insert((v, rate));
                        if better(m, v, e.0) {
                            *e = (v, rate);
                        }
                    }
                }
            }
        }
        for (bi, b) in baselines.iter().enumerate() {
            if !best.keys().any(|k| k.0 == bi) {
                continue;
            }
            let _ = writeln!(out, "best over rates: llumnix vs {b} ({w})");
            for &(mi, m) in &metrics {
                let Some(&(v, rate)) = best.get(&(bi, mi)) else {
                    continue;
                };
                let _ = writeln!(
                    out,
                    "  {:<28} {:>9}  at {rate:.2} req/s  paper: {}",
                    m.label,
                    fmt_cmp(m, Some(v)),
                    paper_for(m, b, at)
                );
                let key = (at.real, at.autoscale, b.to_string(), mi);
                let slot = overall.entry(key).or_insert((v, w.to_string(), rate));
                if better(m, v, slot.0) {
                    *slot = (v, w.to_string(), rate);
                }
            }
        }
    }
    if !overall.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "== best over all workloads and rates ==");
        let mut last: Option<(bool, bool, String)> = None;
        for ((real, autoscale, b, mi), (v, w, rate)) in &overall {
            let m = &CLAIM_METRICS[*mi];
            let at = Setting {
                real: *real,
                autoscale: *autoscale,
            };
            let group = (*real, *autoscale, b.clone());
            if last.as_ref() != Some(&group) {
                let _ = writeln!(
                    out,
                    "llumnix vs {b}, {}{}",
                    if *real {
                        "real traces"
                    } else {
                        "generated lengths"
                    },
                    if *autoscale { ", auto-scaling" } else { "" }
                );
                last = Some(group);
            }
            let _ = writeln!(
                out,
                "  {:<28} {:>9}  ({w} at {rate:.2} req/s)  paper: {}",
                m.label,
                fmt_cmp(m, Some(*v)),
                paper_for(m, b, at)
            );
        }
    }
    out
}

/// Writes [`claims_text`] to `path`.
pub fn write_claims(results: &[RunResult], path: &Path) -> io::Result<()> {
    std::fs::write(path, claims_text(results))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, high: bool, arrival: u64, first: u64, finish: u64, out: u32) -> RequestRecord {
        RequestRecord {
            id,
            high_priority: high,
            arrival_us: arrival,
            prompt_tokens: 16,
            output_tokens: out,
            first_token_us: Some(first),
            finish_us: Some(finish),
            preemptions: 0,
            preemption_loss_us: 0,
            migrations: 0,
            error: None,
        }
    }

    fn fleet(samples: Vec<FleetSample>) -> FleetRecord {
        FleetRecord {
            instance_seconds: 40.0,
            migrations_committed: 3,
            migrations_aborted: 1,
            scale_ups: 0,
            scale_downs: 0,
            samples,
            run_seconds: 10.0,
            wall_seconds: 0.01,
        }
    }

    fn sample(t_us: u64, instances: u32, frag: u64, free: u64) -> FleetSample {
        FleetSample {
            t_us,
            instances,
            waiting_demand_blocks: frag * 2,
            fragmented_demand_blocks: frag,
            free_blocks_total: free,
        }
    }

    /// A run whose latencies scale with `slow`.
    fn run(policy: &str, workload: &str, rate: f64, slow: u64, high_every: u64) -> RunResult {
        let records: Vec<RequestRecord> = (0..200u64)
            .map(|i| {
                let a = i * 10_000;
                let mut r = rec(
                    i,
                    high_every > 0 && i % high_every == 0,
                    a,
                    a + slow * (1000 + i * 10),
                    a + slow * 5000 + 100_000,
                    11,
                );
                r.preemption_loss_us = slow * (i % 7) * 100;
                r.preemptions = u32::from(i % 7 != 0);
                r.migrations = u32::from(policy == "llumnix" && i % 5 == 0);
                r
            })
            .collect();
        let samples = (0..20)
            .map(|k| {
                sample(
                    k * 500_000,
                    4 + (k as u32 % 3) * u32::from(policy == "llumnix"),
                    k % 4,
                    100,
                )
            })
            .collect();
        RunResult::new(
            RunMeta {
                policy: policy.into(),
                workload: workload.into(),
                rate,
                seed: 1,
                instances: 4,
            },
            &records,
            &fleet(samples),
        )
    }

    fn sweep() -> Vec<RunResult> {
        let mut v = Vec::new();
        for (w, k) in [("zipf-256-256", 1u64), ("sharegpt", 2)] {
            for rate in [2.0, 3.5] {
                for (p, s) in [("llumnix", 1), ("infaas", 3), ("round-robin", 20)] {
                    v.push(run(p, w, rate, s * k * rate as u64, 10));
                }
            }
        }
        v
    }

    #[test]
    fn percentiles_on_known_vectors() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert!((percentile(&v, 50.0) - 50.5).abs() < 1e-12);
        assert!((percentile(&v, 99.0) - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        let s = latency_stats(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.mean_ms, s.p50_ms, s.max_ms, s.count), (2.5, 2.5, 4.0, 4));
        assert!((s.p99_ms - 3.97).abs() < 1e-9);
        assert_eq!(latency_stats(&[]), LatencyStats::default());
    }

    #[test]
    fn metrics_and_priority_split() {
        let mut recs = vec![
            // high: prefill 1 ms, request 11 ms, 10 decode steps of 1 ms
            rec(0, true, 0, 1_000, 11_000, 11),
            // normal: prefill 5 ms, request 25 ms, 20 decode steps of 1 ms
            rec(1, false, 1_000, 6_000, 26_000, 21),
            // normal, one output token: no decode figure
            rec(2, false, 2_000, 4_000, 4_000, 1),
            // normal, failed after its first token
            RequestRecord {
                finish_us: None,
                error: Some("instance died".into()),
                ..rec(3, false, 3_000, 10_000, 0, 5)
            },
        ];
        recs[1].preemptions = 2;
        recs[1].preemption_loss_us = 8_000;
        recs[0].migrations = 1;
        let s = summarize(
            &recs,
            &fleet(vec![
                sample(0, 4, 10, 100),
                sample(1, 6, 0, 0),
                sample(2, 6, 30, 100),
            ]),
        );
        assert_eq!(s.all.requests, 4);
        assert_eq!((s.all.completed, s.all.failed), (3, 1));
        assert_eq!(s.high.requests, 1);
        assert_eq!(s.normal.requests, 3);
        assert_eq!(s.high.prefill_latency.mean_ms, 1.0);
        assert_eq!(s.high.request_latency.mean_ms, 11.0);
        assert_eq!(s.high.decode_latency.mean_ms, 1.0);
        // Normal prefill over 3 requests with a first token: 5, 2, 7 ms.
        assert_eq!(s.normal.prefill_latency.count, 3);
        assert_eq!(s.normal.prefill_latency.mean_ms, 4.667);
        assert_eq!(s.normal.request_latency.count, 2);
        assert_eq!(s.normal.decode_latency.count, 1);
        assert_eq!(s.all.decode_latency.count, 2);
        assert_eq!(s.normal.preemption_loss_mean_ms, 2.667);
        assert_eq!(s.all.preemption_loss_mean_ms, 2.0);
        assert_eq!(s.all.preemption_loss_total_s, 0.008);
        assert_eq!(s.all.migrations, 1);
        assert_eq!(s.high.migrations, 1);
        assert_eq!(s.normal.migrations, 0);
        assert_eq!(s.fragmentation_ratio, 0.133333);
        assert_eq!(s.avg_instances, 4.0);
        assert_eq!(s.max_instances, 6);
        assert_eq!(s.prefill_percentiles_ms.len(), 101);
        assert_eq!(s.prefill_percentiles_ms[0], 1.0);
        assert_eq!(s.prefill_percentiles_ms[100], 7.0);
        // Without instance-seconds the samples' mean is the cost.
        let mut f = fleet(vec![sample(0, 4, 0, 1), sample(1, 6, 0, 1)]);
        f.instance_seconds = 0.0;
        assert_eq!(summarize(&recs, &f).avg_instances, 5.0);
    }

    #[test]
    fn json_is_byte_identical_and_leaves_wall_time_out() {
        let a = results_json(&sweep(), false);
        let b = results_json(&sweep(), false);
        assert_eq!(a, b);
        assert!(!a.contains("wall"));
        assert!(a.contains("\"p99_ms\""));
        let with = results_json(&sweep(), true);
        assert!(with.contains("wall_seconds"));
        let back: serde_json::Value = serde_json::from_str(&a).unwrap();
        let runs: Vec<RunResult> = serde_json::from_value(back["runs"].clone()).unwrap();
        assert_eq!(runs.len(), 12);
        assert_eq!(results_json(&runs, false), a, "round trip keeps the bytes");
        let t = timing_json(&sweep());
        assert!(t.contains("sim_seconds_per_wall_second"));
        assert!(t.contains("1000.0"), "{t}");
    }

    #[test]
    fn csv_header_and_rows() {
        let h = csv_header();
        assert!(h.starts_with(
            "policy,workload,rate,seed,instances,requests,completed,failed,all_request_mean_ms,"
        ));
        assert!(
            h.contains("high_prefill_p99_ms")
                && h.contains("normal_decode_mean_ms")
                && h.ends_with("run_seconds")
        );
        let text = csv(&sweep());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 13);
        let n = h.split(',').count();
        assert!(lines.iter().all(|l| l.split(',').count() == n));
        assert!(lines[1].starts_with("llumnix,zipf-256-256,2,1,4,200,200,0,"));
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }

    #[test]
    fn table_lists_every_run_and_classes() {
        let t = table(&sweep());
        assert!(t.contains("round-robin") && t.contains("sharegpt") && t.contains("sim/wall"));
        assert!(t.contains("high") && t.contains("normal"));
        assert_eq!(
            t.lines().filter(|l| l.starts_with("llumnix")).count(),
            4 + 8
        );
    }

    #[test]
    fn plots_are_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let mut results = sweep();
        results[0] = results[0].clone().with_requests(&[
            rec(0, false, 0, 1_000, 2_000, 2),
            rec(1, false, 0, 3_000, 9_000, 2),
        ]);
        let files = write_plots(dir.path(), &results).unwrap();
        // Per workload: latency vs rate, and per rate a CDF and an instance plot.
        assert_eq!(files.len(), 2 * (1 + 2 * 2) * 2);
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            match f.extension().and_then(|e| e.to_str()) {
                Some("png") => {
                    assert!(bytes.len() > 1000, "{}", f.display());
                    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
                }
                Some("svg") => {
                    let s = String::from_utf8(bytes).unwrap();
                    assert!(
                        s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
                        "{}",
                        f.display()
                    );
                    assert!(s.contains("<text") && s.contains("llumnix"));
                }
                other => panic!("unexpected file {other:?}"),
            }
        }
        assert!(dir.path().join("latency_vs_rate_zipf-256-256.png").exists());
        assert!(
            dir.path().join("prefill_cdf_sharegpt_r3.5.svg").exists(),
            "{files:?}"
        );
        assert!(dir.path().join("instances_sharegpt_r2.png").exists());
    }

    #[test]
    fn claim_file_has_ratio_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llumnix.claim");
        write_claims(&sweep(), &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("== workload zipf-256-256 (generated lengths) =="));
        assert!(text.contains("== workload sharegpt (real trace) =="));
        assert!(text.contains("rate 2.00 req/s, 4 instances, seed 1: llumnix vs infaas"));
        assert!(text.contains("llumnix vs round-robin"));
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("prefill latency mean"))
            .unwrap();
        assert!(
            line.contains("x  (llumnix") && line.contains("paper: up to 7.7x (generated)"),
            "{line}"
        );
        assert!(text.contains("paper: up to 26.6x"));
        assert!(text.contains("paper: up to 5.5x (real traces)"));
        assert!(text.contains("preemption loss mean"));
        assert!(text.contains("%  (llumnix"));
        assert!(text.contains("best over rates: llumnix vs infaas (zipf-256-256)"));
        assert!(text.contains("== best over all workloads and rates =="));
        assert!(text.contains("high-priority prefill P99"));
        assert!(!text.contains("average instances"), "no run scaled");
        assert!(!text.contains("2.9x-8.6x"), "no llumnix-base run");
        // Auto-scaling and a no-priority llumnix baseline.
        let mut more = sweep();
        for r in more.iter_mut().filter(|r| r.workload == "sharegpt") {
            r.summary.scale_ups = 2;
        }
        let mut base = run("llumnix-base", "zipf-256-256", 2.0, 4, 10);
        base.summary.high.prefill_latency.mean_ms *= 4.0;
        more.push(base);
        let more_text = claims_text(&more);
        assert!(more_text.contains("== workload sharegpt (real trace, auto-scaling) =="));
        assert!(more_text.contains("paper: up to 12.2x (auto-scaling)"));
        assert!(more_text.contains("average instances"));
        assert!(more_text.contains("llumnix vs llumnix-base"));
        assert!(more_text.lines().any(|l| l.contains("high-priority prefill mean") && l.contains("paper: 2.9x-8.6x")), "{more_text}");
        assert!(more_text.contains("llumnix vs infaas, real traces, auto-scaling"));
        // The infaas runs are 3x slower on prefill: the ratio says so.
        assert!(
            more_text
                .lines()
                .any(|l| l.contains("prefill latency mean") && l.contains(" 3.00x")),
            "{more_text}"
        );
        assert_eq!(claims_text(&sweep()), text);
    }
}
