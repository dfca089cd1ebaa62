//! Workloads: seeded request streams for the simulator and the live driver.
//!
//! **Owns**: arrival processes (Poisson, Gamma with a coefficient of
//! variation, a trace's own timestamps, rate scaling), length distributions
//! (fixed, uniform, Zipf as Llumnix defines it, exponential), the traces
//! vendored in `bench/data/` (Azure conversation trace, ShareGPT lengths) and
//! any CSV of the same columns, the high-priority draw, and the textual spec
//! that names all of this on the command line. It produces
//! [`RequestSpec`]s sorted by arrival with dense ids from 0.
//! **Never touches**: engines, policies, the simulator's clock, clocks of any
//! kind, the network; the only I/O is reading trace CSVs.
//!
//! # Spec grammar
//!
//! A spec is a `;`-separated list of items, in any order; blanks around items
//! are ignored. An item is either `key=value` or a bare term, which is
//! recognised by its head word as an arrival term or a lengths term.
//!
//! ```text
//! spec      := item (';' item)*
//! item      := 'arrival=' ARRIVAL | 'lengths=' LENGTHS
//!            | 'prompt=' DIST | 'output=' DIST        (both, instead of lengths=)
//!            | 'rate=' R          requests/s (generated arrivals: required;
//!                                  a trace's own arrivals: rescale to mean rate R)
//!            | 'scale=' K         multiply a trace's own rate by K (divide its
//!                                  inter-arrival times by K)
//!            | 'max_total=' N     drop trace rows with prompt+output > N tokens
//!            | ARRIVAL | LENGTHS  (bare terms)
//! ARRIVAL   := 'poisson' [':' R]  | 'poisson:rate=' R
//!            | 'gamma:' CV [':' R] | 'gamma:cv=' CV [':rate=' R]
//!            | 'trace' | 'own'    the trace's own timestamps
//! LENGTHS   := 'fixed:' P ':' O | 'fixed:' N
//!            | 'uniform:' LO ':' HI            (both sides)
//!            | 'uniform:' PLO ':' PHI ':' OLO ':' OHI
//!            | 'zipf:' P ':' O [':' ALPHA [':' ALPHA_O]] | 'zipf:' M
//!            | 'exp:' P ':' O | 'exponential:' P ':' O  (means)
//!            | 'sharegpt'       ShareGPT lengths, filtered (each side >= 4,
//!                               total <= 2048) | 'sharegpt:raw' unfiltered
//!            | 'azure' | 'azure-conv'  Azure conversation trace
//!            | 'trace:' FILE    any CSV with either header (below)
//! DIST      := 'fixed:' N | 'uniform:' LO ':' HI | 'zipf:' MEAN [':' ALPHA]
//!            | 'exp:' MEAN | 'exponential:' MEAN
//! ```
//!
//! Examples: `poisson:rate=32;lengths=fixed:128:128`,
//! `poisson;zipf:256:256;rate=7.5`, `gamma:4;sharegpt;rate=7`,
//! `azure;scale=2`, `trace:/tmp/my.csv;rate=3`,
//! `gamma:cv=2:rate=26;prompt=zipf:128;output=zipf:128`.
//! The command line's `--arrival A --lengths L --rate R` map to
//! [`WorkloadSpec::from_parts`].
//!
//! # Semantics
//!
//! - Arrivals. Generated arrivals start at 0 µs; then gaps are exponential
//!   (Poisson) or Gamma with shape 1/CV² and scale CV²/rate (mean 1/rate).
//!   Timestamped traces (Azure, `trace:FILE` with a `TIMESTAMP` column) use
//!   their own arrivals by default, in µs from the earliest row; `scale=K`
//!   divides every arrival time by K; `rate=R` picks K so that the mean rate,
//!   (n − 1) / (last − first arrival), of the requests used is R. Naming
//!   `poisson` or `gamma` with a timestamped trace replaces its timestamps
//!   (its lengths are then used in file order, cycling when `n` exceeds it).
//! - Lengths. Prompt and output lengths are drawn independently, each from
//!   its own seeded stream. Fixed and uniform (inclusive bounds) are plain.
//!   Zipf follows Llumnix's `benchmark_serving.py`: ranks 1..2·M−1 with
//!   probability ∝ k^−α, the drawn batch is rescaled by M / (its mean) and
//!   rounded up, then capped at [`ZIPF_CAP`] (6144). α defaults to Llumnix's
//!   table (2.0 for M=128, 1.5 for 256, 1.15 for 512, 1.0005 for 1024, 1.0
//!   otherwise) and can be given. Exponential: round(Exp(mean)), at least 1,
//!   capped at [`ZIPF_CAP`].
//! - Traces. Lengths-only traces (ShareGPT shape) are sampled uniformly with
//!   replacement, as Llumnix does; timestamped traces are used in file order
//!   and truncated to `n` (so fewer than `n` requests come back when the trace
//!   is shorter). Token counts of 0 are raised to 1.
//! - Priority: each request is high priority with probability `f`, from its
//!   own stream, so changing `f` leaves arrivals and lengths alone.
//!
//! Trace files: `bench/data/` of this crate (found through
//! `CARGO_MANIFEST_DIR`), or the directory in the environment variable
//! `LLUMEN_BENCH_DATA`. CSV headers accepted (names case-insensitive, extra
//! columns ignored): `TIMESTAMP,ContextTokens,GeneratedTokens` (timestamps
//! `YYYY-MM-DD HH:MM:SS[.fraction]` or plain seconds) and
//! `input_tokens,output_tokens`.

// The simulator and the live driver call into this module; until they do,
// parts of it are only reached from tests.
#![allow(dead_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use crate::record::RequestSpec;
use crate::rng::Rng;

/// Lengths are capped here (Llumnix's `len_range` in its experiments).
pub const ZIPF_CAP: u32 = 6144;
/// The environment variable that points the trace loader at another directory.
pub const DATA_DIR_ENV: &str = "LLUMEN_BENCH_DATA";
/// File names of the vendored traces in the data directory.
pub const AZURE_CONV_FILE: &str = "AzureLLMInferenceTrace_conv.csv";
pub const SHAREGPT_FILE: &str = "sharegpt_opt_lengths.csv";
/// The usual ShareGPT filter.
pub const SHAREGPT_MIN_SIDE: u32 = 4;
pub const SHAREGPT_MAX_TOTAL: u32 = 2048;

/// Why a spec could not be parsed or a workload not generated.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("bad workload spec `{spec}`: {msg}")]
    Parse { spec: String, msg: String },
    #[error("workload `{spec}`: {msg}")]
    Invalid { spec: String, msg: String },
    #[error("cannot read trace {}: {source} (the bench's traces live in bench/data; set {DATA_DIR_ENV}=DIR to use another directory)", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trace {}: line {line}: {msg}", path.display())]
    Csv {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

/// How requests arrive.
#[derive(Clone, Debug, PartialEq)]
pub enum Arrival {
    /// Exponential inter-arrival times.
    Poisson,
    /// Gamma inter-arrival times with this coefficient of variation.
    Gamma { cv: f64 },
    /// The trace's own timestamps.
    Trace,
}

/// One side's length distribution.
#[derive(Clone, Debug, PartialEq)]
pub enum LenDist {
    Fixed(u32),
    /// Uniform on `lo..=hi`.
    Uniform {
        lo: u32,
        hi: u32,
    },
    /// Llumnix's Zipf: mean `mean`, exponent `alpha`.
    Zipf {
        mean: u32,
        alpha: f64,
    },
    /// Exponential with this mean.
    Exponential {
        mean: f64,
    },
}

/// Where prompt and output lengths come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Lengths {
    /// Independent draws per side.
    Dist { prompt: LenDist, output: LenDist },
    /// The vendored ShareGPT lengths, `filter`ed or raw.
    ShareGpt { filter: bool },
    /// The vendored Azure conversation trace (lengths and timestamps).
    AzureConv,
    /// Any CSV with one of the two headers.
    File(PathBuf),
}

/// A parsed workload spec; see the module doc for the grammar.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadSpec {
    /// `None`: the trace's own arrivals when it has timestamps, else Poisson.
    pub arrival: Option<Arrival>,
    pub lengths: Lengths,
    /// Requests per second.
    pub rate: Option<f64>,
    /// Multiplier of a trace's own rate.
    pub scale: Option<f64>,
    /// Drop trace rows longer than this (prompt + output tokens).
    pub max_total: Option<u32>,
}

/// One row of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRow {
    /// µs from the earliest row (0 when the trace has no timestamps).
    pub arrival_us: u64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// A loaded trace: rows sorted by arrival (stable; file order otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub path: PathBuf,
    pub has_timestamps: bool,
    pub rows: Vec<TraceRow>,
}

// ---------------------------------------------------------------- parsing

fn perr(spec: &str, msg: impl Into<String>) -> WorkloadError {
    WorkloadError::Parse {
        spec: spec.to_string(),
        msg: msg.into(),
    }
}

fn num<T: std::str::FromStr>(spec: &str, what: &str, s: &str) -> Result<T, WorkloadError> {
    s.trim()
        .parse::<T>()
        .map_err(|_| perr(spec, format!("{what}: `{s}` is not a valid number")))
}

fn positive(spec: &str, what: &str, s: &str) -> Result<f64, WorkloadError> {
    let v: f64 = num(spec, what, s)?;
    if !(v.is_finite() && v > 0.0) {
        return Err(perr(
            spec,
            format!("{what} must be a positive number, got `{s}`"),
        ));
    }
    Ok(v)
}

fn tokens(spec: &str, what: &str, s: &str) -> Result<u32, WorkloadError> {
    let v: u32 = num(spec, what, s)?;
    if v == 0 {
        return Err(perr(spec, format!("{what} must be at least 1 token")));
    }
    Ok(v)
}

/// Llumnix's Zipf exponent for a mean (its `benchmark_serving.py` table).
pub fn default_zipf_alpha(mean: u32) -> f64 {
    match mean {
        128 => 2.0,
        256 => 1.5,
        512 => 1.15,
        1024 => 1.0005,
        _ => 1.0,
    }
}

const ARRIVAL_HEADS: &[&str] = &["poisson", "gamma", "trace", "own"];
const LENGTH_HEADS: &[&str] = &[
    "fixed",
    "uniform",
    "zipf",
    "exp",
    "exponential",
    "sharegpt",
    "azure",
    "azure-conv",
    "trace",
];
const KEYS: &[&str] = &[
    "arrival",
    "lengths",
    "prompt",
    "output",
    "rate",
    "scale",
    "max_total",
];

/// Parses an arrival term; returns the arrival and a rate given inside it.
fn parse_arrival(spec: &str, term: &str) -> Result<(Arrival, Option<f64>), WorkloadError> {
    let mut parts = term.split(':').map(str::trim);
    let head = parts.next().unwrap_or("").to_ascii_lowercase();
    let params: Vec<&str> = parts.collect();
    let mut rate = None;
    let mut cv = None;
    let mut positional = Vec::new();
    for p in &params {
        match p.split_once('=') {
            Some((k, v)) => match k.trim() {
                "rate" => rate = Some(positive(spec, "rate", v)?),
                "cv" if head == "gamma" => cv = Some(positive(spec, "cv", v)?),
                other => {
                    return Err(perr(
                        spec,
                        format!("`{term}`: unknown parameter `{other}` (poisson takes rate=, gamma takes cv= and rate=)"),
                    ))
                }
            },
            None => positional.push(*p),
        }
    }
    match head.as_str() {
        "poisson" => {
            match positional.as_slice() {
                [] => {}
                [r] if rate.is_none() => rate = Some(positive(spec, "rate", r)?),
                _ => {
                    return Err(perr(
                        spec,
                        format!("`{term}`: expected poisson or poisson:RATE"),
                    ))
                }
            }
            Ok((Arrival::Poisson, rate))
        }
        "gamma" => {
            let mut pos = positional.into_iter();
            if cv.is_none() {
                cv = pos
                    .next()
                    .map(|c| positive(spec, "gamma cv", c))
                    .transpose()?;
            }
            if rate.is_none() {
                rate = pos.next().map(|r| positive(spec, "rate", r)).transpose()?;
            }
            if pos.next().is_some() {
                return Err(perr(
                    spec,
                    format!("`{term}`: expected gamma:CV or gamma:CV:RATE"),
                ));
            }
            let cv = cv.ok_or_else(|| {
                perr(
                    spec,
                    "gamma needs a coefficient of variation: gamma:CV, e.g. gamma:4",
                )
            })?;
            Ok((Arrival::Gamma { cv }, rate))
        }
        "trace" | "own" if params.is_empty() => Ok((Arrival::Trace, None)),
        _ => Err(perr(
            spec,
            format!("`{term}` is not an arrival process (poisson[:RATE], gamma:CV[:RATE], trace)"),
        )),
    }
}

/// Parses one side's distribution (`fixed:N`, `uniform:LO:HI`, `zipf:M[:A]`, `exp:M`).
fn parse_dist(spec: &str, term: &str) -> Result<LenDist, WorkloadError> {
    let parts: Vec<&str> = term.split(':').map(str::trim).collect();
    let head = parts[0].to_ascii_lowercase();
    match (head.as_str(), &parts[1..]) {
        ("fixed", [n]) => Ok(LenDist::Fixed(tokens(spec, "fixed length", n)?)),
        ("uniform", [lo, hi]) => uniform(spec, lo, hi),
        ("zipf", [m]) => {
            let mean = tokens(spec, "zipf mean", m)?;
            Ok(LenDist::Zipf { mean, alpha: default_zipf_alpha(mean) })
        }
        ("zipf", [m, a]) => Ok(LenDist::Zipf {
            mean: tokens(spec, "zipf mean", m)?,
            alpha: positive(spec, "zipf alpha", a)?,
        }),
        ("exp" | "exponential", [m]) => Ok(LenDist::Exponential {
            mean: positive(spec, "exponential mean", m)?,
        }),
        _ => Err(perr(
            spec,
            format!("`{term}` is not a length distribution (fixed:N, uniform:LO:HI, zipf:MEAN[:ALPHA], exp:MEAN)"),
        )),
    }
}

fn uniform(spec: &str, lo: &str, hi: &str) -> Result<LenDist, WorkloadError> {
    let lo = tokens(spec, "uniform low", lo)?;
    let hi = tokens(spec, "uniform high", hi)?;
    if lo > hi {
        return Err(perr(spec, format!("uniform:{lo}:{hi}: low is above high")));
    }
    Ok(LenDist::Uniform { lo, hi })
}

/// Parses a lengths term (both sides, or a trace).
fn parse_lengths(spec: &str, term: &str) -> Result<Lengths, WorkloadError> {
    let (head, rest) = match term.split_once(':') {
        Some((h, r)) => (h.trim().to_ascii_lowercase(), Some(r)),
        None => (term.trim().to_ascii_lowercase(), None),
    };
    if head == "trace" {
        let file = rest.map(str::trim).unwrap_or("");
        if file.is_empty() {
            return Err(perr(spec, "trace needs a file: trace:FILE"));
        }
        return Ok(Lengths::File(PathBuf::from(file)));
    }
    let parts: Vec<&str> = rest
        .map(|r| r.split(':').map(str::trim).collect())
        .unwrap_or_default();
    let both = |d: LenDist| Lengths::Dist {
        prompt: d.clone(),
        output: d,
    };
    match (head.as_str(), parts.as_slice()) {
        ("sharegpt", []) => Ok(Lengths::ShareGpt { filter: true }),
        ("sharegpt", ["raw" | "nofilter" | "unfiltered"]) => Ok(Lengths::ShareGpt { filter: false }),
        ("sharegpt", ["filter" | "filtered"]) => Ok(Lengths::ShareGpt { filter: true }),
        ("azure" | "azure-conv" | "azure_conv", []) => Ok(Lengths::AzureConv),
        ("fixed", [n]) => Ok(both(LenDist::Fixed(tokens(spec, "fixed length", n)?))),
        ("fixed", [p, o]) => Ok(Lengths::Dist {
            prompt: LenDist::Fixed(tokens(spec, "fixed prompt length", p)?),
            output: LenDist::Fixed(tokens(spec, "fixed output length", o)?),
        }),
        ("uniform", [lo, hi]) => Ok(both(uniform(spec, lo, hi)?)),
        ("uniform", [plo, phi, olo, ohi]) => Ok(Lengths::Dist {
            prompt: uniform(spec, plo, phi)?,
            output: uniform(spec, olo, ohi)?,
        }),
        ("zipf", [m]) => Ok(both(parse_dist(spec, &format!("zipf:{m}"))?)),
        ("zipf", [p, o]) => Ok(Lengths::Dist {
            prompt: parse_dist(spec, &format!("zipf:{p}"))?,
            output: parse_dist(spec, &format!("zipf:{o}"))?,
        }),
        ("zipf", [p, o, a]) => Ok(Lengths::Dist {
            prompt: parse_dist(spec, &format!("zipf:{p}:{a}"))?,
            output: parse_dist(spec, &format!("zipf:{o}:{a}"))?,
        }),
        ("zipf", [p, o, ap, ao]) => Ok(Lengths::Dist {
            prompt: parse_dist(spec, &format!("zipf:{p}:{ap}"))?,
            output: parse_dist(spec, &format!("zipf:{o}:{ao}"))?,
        }),
        ("exp" | "exponential", [m]) => Ok(both(parse_dist(spec, &format!("exp:{m}"))?)),
        ("exp" | "exponential", [p, o]) => Ok(Lengths::Dist {
            prompt: parse_dist(spec, &format!("exp:{p}"))?,
            output: parse_dist(spec, &format!("exp:{o}"))?,
        }),
        _ => Err(perr(
            spec,
            format!(
                "`{term}` is not a lengths term (fixed:P:O, uniform:LO:HI, zipf:P:O[:ALPHA], exp:P:O, sharegpt[:raw], azure, trace:FILE)"
            ),
        )),
    }
}

fn set_once<T>(spec: &str, slot: &mut Option<T>, v: T, what: &str) -> Result<(), WorkloadError> {
    if slot.is_some() {
        return Err(perr(spec, format!("{what} given twice")));
    }
    *slot = Some(v);
    Ok(())
}

impl WorkloadSpec {
    /// Parses a spec (grammar in the module doc).
    pub fn parse(spec: &str) -> Result<WorkloadSpec, WorkloadError> {
        let mut arrival: Option<Arrival> = None;
        let mut lengths: Option<Lengths> = None;
        let mut prompt: Option<LenDist> = None;
        let mut output: Option<LenDist> = None;
        let mut rate: Option<f64> = None;
        let mut scale: Option<f64> = None;
        let mut max_total: Option<u32> = None;
        let mut set_arrival =
            |spec: &str, term: &str, rate: &mut Option<f64>| -> Result<(), WorkloadError> {
                let (a, r) = parse_arrival(spec, term)?;
                set_once(spec, &mut arrival, a, "arrival")?;
                if let Some(r) = r {
                    set_once(spec, rate, r, "rate")?;
                }
                Ok(())
            };
        for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let key_value = item
                .split_once('=')
                .filter(|(k, _)| KEYS.contains(&k.trim().to_ascii_lowercase().as_str()));
            if let Some((key, value)) = key_value {
                let value = value.trim();
                match key.trim().to_ascii_lowercase().as_str() {
                    "arrival" => set_arrival(spec, value, &mut rate)?,
                    "lengths" => {
                        set_once(spec, &mut lengths, parse_lengths(spec, value)?, "lengths")?
                    }
                    "prompt" => set_once(spec, &mut prompt, parse_dist(spec, value)?, "prompt")?,
                    "output" => set_once(spec, &mut output, parse_dist(spec, value)?, "output")?,
                    "rate" => set_once(spec, &mut rate, positive(spec, "rate", value)?, "rate")?,
                    "scale" => {
                        set_once(spec, &mut scale, positive(spec, "scale", value)?, "scale")?
                    }
                    "max_total" => set_once(
                        spec,
                        &mut max_total,
                        tokens(spec, "max_total", value)?,
                        "max_total",
                    )?,
                    _ => unreachable!("KEYS lists every key"),
                }
                continue;
            }
            let head = item
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            let is_trace_file = head == "trace" && item.contains(':');
            if ARRIVAL_HEADS.contains(&head.as_str()) && !is_trace_file {
                set_arrival(spec, item, &mut rate)?;
            } else if LENGTH_HEADS.contains(&head.as_str()) {
                set_once(spec, &mut lengths, parse_lengths(spec, item)?, "lengths")?;
            } else {
                return Err(perr(
                    spec,
                    format!(
                        "unknown item `{item}`: expected key=value with key one of {}, or an arrival term ({}) or a lengths term ({})",
                        KEYS.join(", "),
                        "poisson, gamma:CV, trace",
                        "fixed, uniform, zipf, exp, sharegpt, azure, trace:FILE"
                    ),
                ));
            }
        }
        let lengths = match (lengths, prompt, output) {
            (Some(l), None, None) => l,
            (None, Some(prompt), Some(output)) => Lengths::Dist { prompt, output },
            (None, None, None) => return Err(perr(
                spec,
                "no lengths: add e.g. fixed:128:128, zipf:256:256, sharegpt, azure or trace:FILE",
            )),
            (Some(_), _, _) => {
                return Err(perr(
                    spec,
                    "give either lengths or prompt= and output=, not both",
                ))
            }
            (None, Some(_), None) => return Err(perr(spec, "prompt= given without output=")),
            (None, None, Some(_)) => return Err(perr(spec, "output= given without prompt=")),
        };
        let parsed = WorkloadSpec {
            arrival,
            lengths,
            rate,
            scale,
            max_total,
        };
        parsed.check_static(spec)?;
        Ok(parsed)
    }

    /// The command line's `--arrival`, `--lengths` and `--rate`: the same as
    /// parsing `ARRIVAL;LENGTHS;rate=R`. A `None` arrival keeps a trace's own
    /// timestamps (and means Poisson for everything else).
    pub fn from_parts(
        arrival: Option<&str>,
        lengths: &str,
        rate: Option<f64>,
    ) -> Result<WorkloadSpec, WorkloadError> {
        let mut s = String::new();
        if let Some(a) = arrival {
            s.push_str("arrival=");
            s.push_str(a);
            s.push(';');
        }
        s.push_str("lengths=");
        s.push_str(lengths);
        let mut spec = WorkloadSpec::parse(&s)?;
        if let Some(r) = rate {
            if !(r.is_finite() && r > 0.0) {
                return Err(perr(&s, format!("rate must be a positive number, got {r}")));
            }
            spec = spec.with_rate(r);
        }
        Ok(spec)
    }

    /// Checks what can be checked without reading a trace.
    fn check_static(&self, spec: &str) -> Result<(), WorkloadError> {
        let generated = matches!(self.arrival, Some(Arrival::Poisson | Arrival::Gamma { .. }));
        let lengths_only = matches!(
            self.lengths,
            Lengths::Dist { .. } | Lengths::ShareGpt { .. }
        );
        if lengths_only && self.arrival == Some(Arrival::Trace) {
            return Err(perr(
                spec,
                format!(
                    "{} has no timestamps of its own: use poisson or gamma:CV arrivals",
                    self.lengths_name()
                ),
            ));
        }
        if self.scale.is_some() && (generated || lengths_only) {
            return Err(perr(
                spec,
                "scale= applies to a trace's own arrivals; use rate= for generated arrivals",
            ));
        }
        if self.scale.is_some() && self.rate.is_some() {
            return Err(perr(spec, "give rate= or scale=, not both"));
        }
        if self.max_total.is_some() && matches!(self.lengths, Lengths::Dist { .. }) {
            return Err(perr(
                spec,
                "max_total= filters trace rows; it does not apply to generated lengths",
            ));
        }
        Ok(())
    }

    /// The same workload at another rate (the rate sweep). For a trace's own
    /// arrivals it rescales them to this mean rate.
    pub fn with_rate(&self, rate: f64) -> WorkloadSpec {
        WorkloadSpec {
            rate: Some(rate),
            scale: None,
            ..self.clone()
        }
    }

    /// The rate given, if any (requests/s).
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    fn lengths_name(&self) -> String {
        fn d(x: &LenDist) -> String {
            match x {
                LenDist::Fixed(n) => n.to_string(),
                LenDist::Uniform { lo, hi } => format!("{lo}-{hi}"),
                LenDist::Zipf { mean, .. } => mean.to_string(),
                LenDist::Exponential { mean } => fmt_num(*mean),
            }
        }
        match &self.lengths {
            Lengths::Dist { prompt, output } => {
                let kind = |x: &LenDist| match x {
                    LenDist::Fixed(_) => "fixed",
                    LenDist::Uniform { .. } => "uniform",
                    LenDist::Zipf { .. } => "zipf",
                    LenDist::Exponential { .. } => "exp",
                };
                let (kp, ko) = (kind(prompt), kind(output));
                let alpha = |x: &LenDist| match x {
                    LenDist::Zipf { mean, alpha } if *alpha != default_zipf_alpha(*mean) => {
                        format!("a{}", fmt_num(*alpha))
                    }
                    _ => String::new(),
                };
                let (ap, ao) = (alpha(prompt), alpha(output));
                if kp == ko {
                    let mut s = format!("{kp}-{}-{}", d(prompt), d(output));
                    if !ap.is_empty() || !ao.is_empty() {
                        s.push('-');
                        s.push_str(&ap);
                        if ao != ap {
                            s.push_str(&ao);
                        }
                    }
                    s
                } else {
                    format!("{kp}{ap}-{}-{ko}{ao}-{}", d(prompt), d(output))
                }
            }
            Lengths::ShareGpt { filter: true } => "sharegpt".into(),
            Lengths::ShareGpt { filter: false } => "sharegpt-raw".into(),
            Lengths::AzureConv => "azure-conv".into(),
            Lengths::File(p) => {
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let clean: String = stem
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect();
                format!("trace-{clean}")
            }
        }
    }

    /// A short name for tables, plots and file names (no rate: the rate is
    /// reported beside it): lengths, then the arrival process when it is not
    /// the default, e.g. `fixed-128-128`, `zipf-256-256`, `sharegpt_gamma-cv4`,
    /// `azure-conv`. Only `[A-Za-z0-9._-]`.
    pub fn name(&self) -> String {
        let mut s = self.lengths_name();
        match &self.arrival {
            Some(Arrival::Gamma { cv }) => s.push_str(&format!("_gamma-cv{}", fmt_num(*cv))),
            Some(Arrival::Poisson) if self.is_timestamped_source() => s.push_str("_poisson"),
            _ => {}
        }
        if let Some(m) = self.max_total {
            s.push_str(&format!("_max{m}"));
        }
        s
    }

    fn is_timestamped_source(&self) -> bool {
        match &self.lengths {
            Lengths::AzureConv => true,
            // Unknown until loaded; `trace:` files are usually timestamped.
            Lengths::File(_) => true,
            _ => false,
        }
    }

    /// Generates `n` requests (fewer when a trace with its own arrivals is
    /// shorter), sorted by arrival, ids dense from 0; `high_priority_fraction`
    /// in [0, 1].
    pub fn generate(
        &self,
        n: usize,
        seed: u64,
        high_priority_fraction: f64,
    ) -> Result<Vec<RequestSpec>, WorkloadError> {
        let spec = self.to_string();
        let invalid = |msg: String| WorkloadError::Invalid {
            spec: spec.clone(),
            msg,
        };
        if !(0.0..=1.0).contains(&high_priority_fraction) {
            return Err(invalid(format!(
                "high-priority fraction must be in [0, 1], got {high_priority_fraction}"
            )));
        }
        self.check_static(&spec)?;
        let mut arrivals_rng = sub_rng(seed, 1);
        let mut prompt_rng = sub_rng(seed, 2);
        let mut output_rng = sub_rng(seed, 3);
        let mut priority_rng = sub_rng(seed, 4);
        let mut sample_rng = sub_rng(seed, 5);

        // Lengths (and a trace's own arrivals).
        let trace = match &self.lengths {
            Lengths::Dist { .. } => None,
            Lengths::ShareGpt { .. } => Some(load_trace(&data_dir().join(SHAREGPT_FILE))?),
            Lengths::AzureConv => Some(load_trace(&data_dir().join(AZURE_CONV_FILE))?),
            Lengths::File(p) => Some(load_trace(&resolve_trace_path(p))?),
        };
        let trace = trace.map(|mut t| {
            if let Lengths::ShareGpt { filter: true } = self.lengths {
                t.rows.retain(|r| {
                    r.prompt_tokens >= SHAREGPT_MIN_SIDE
                        && r.output_tokens >= SHAREGPT_MIN_SIDE
                        && r.prompt_tokens + r.output_tokens <= SHAREGPT_MAX_TOTAL
                });
            }
            if let Some(m) = self.max_total {
                t.rows
                    .retain(|r| r.prompt_tokens.saturating_add(r.output_tokens) <= m);
            }
            t
        });
        let arrival = match (&self.arrival, &trace) {
            (Some(a), _) => a.clone(),
            (None, Some(t)) if t.has_timestamps => Arrival::Trace,
            (None, _) => Arrival::Poisson,
        };
        if let Some(t) = &trace {
            if t.rows.is_empty() && n > 0 {
                return Err(invalid(format!(
                    "trace {} has no rows left",
                    t.path.display()
                )));
            }
            if arrival == Arrival::Trace && !t.has_timestamps {
                return Err(invalid(format!(
                    "trace {} has no TIMESTAMP column: use poisson or gamma:CV arrivals",
                    t.path.display()
                )));
            }
        }
        if arrival != Arrival::Trace && self.scale.is_some() {
            return Err(invalid(
                "scale= applies to a trace's own arrivals; use rate= for generated arrivals".into(),
            ));
        }

        let mut reqs: Vec<RequestSpec> = Vec::with_capacity(n.min(1 << 20));
        match &trace {
            None => {
                let Lengths::Dist { prompt, output } = &self.lengths else {
                    unreachable!()
                };
                let ps = draw_lengths(prompt, n, &mut prompt_rng);
                let os = draw_lengths(output, n, &mut output_rng);
                for (p, o) in ps.into_iter().zip(os) {
                    reqs.push(req(0, p, o));
                }
            }
            Some(t) if arrival == Arrival::Trace => {
                for r in t.rows.iter().take(n) {
                    reqs.push(req(r.arrival_us, r.prompt_tokens, r.output_tokens));
                }
            }
            Some(t) if !t.has_timestamps => {
                for _ in 0..n {
                    let r = t.rows[sample_rng.below(t.rows.len() as u32) as usize];
                    reqs.push(req(0, r.prompt_tokens, r.output_tokens));
                }
            }
            Some(t) => {
                for i in 0..n {
                    let r = t.rows[i % t.rows.len()];
                    reqs.push(req(0, r.prompt_tokens, r.output_tokens));
                }
            }
        }

        // Arrivals.
        match arrival {
            Arrival::Trace => {
                let first = reqs.first().map_or(0, |r| r.arrival_us);
                for r in &mut reqs {
                    r.arrival_us -= first;
                }
                let k = match (self.rate, self.scale) {
                    (Some(target), _) => {
                        let native = mean_rate(&reqs);
                        if native <= 0.0 {
                            return Err(invalid(
                                "cannot rescale a trace whose requests all arrive at once".into(),
                            ));
                        }
                        target / native
                    }
                    (None, Some(k)) => k,
                    (None, None) => 1.0,
                };
                if k != 1.0 {
                    for r in &mut reqs {
                        r.arrival_us = (r.arrival_us as f64 / k).round() as u64;
                    }
                }
            }
            Arrival::Poisson | Arrival::Gamma { .. } => {
                let rate = self.rate.ok_or_else(|| {
                    invalid("generated arrivals need a rate: add rate=R (or poisson:R / gamma:CV:R), or use with_rate".into())
                })?;
                let mean_gap = 1.0 / rate;
                let mut t = 0.0f64;
                for r in reqs.iter_mut() {
                    r.arrival_us = (t * 1e6).round() as u64;
                    t += match arrival {
                        Arrival::Gamma { cv } => {
                            arrivals_rng.gamma(1.0 / (cv * cv), cv * cv * mean_gap)
                        }
                        _ => arrivals_rng.exponential(mean_gap),
                    };
                }
            }
        }

        for (i, r) in reqs.iter_mut().enumerate() {
            r.id = i as u64;
            r.high_priority = priority_rng.unit_f64() < high_priority_fraction;
        }
        Ok(reqs)
    }
}

fn req(arrival_us: u64, prompt_tokens: u32, output_tokens: u32) -> RequestSpec {
    RequestSpec {
        id: 0,
        arrival_us,
        prompt_tokens: prompt_tokens.max(1),
        output_tokens: output_tokens.max(1),
        high_priority: false,
    }
}

/// An independent stream per purpose, derived from the seed.
fn sub_rng(seed: u64, stream: u64) -> Rng {
    let mut r = Rng::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    Rng::new(r.next())
}

/// Formats a number without a trailing `.0` (`4`, `2.5`).
fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

impl fmt::Display for LenDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LenDist::Fixed(n) => write!(f, "fixed:{n}"),
            LenDist::Uniform { lo, hi } => write!(f, "uniform:{lo}:{hi}"),
            LenDist::Zipf { mean, alpha } => write!(f, "zipf:{mean}:{}", fmt_num(*alpha)),
            LenDist::Exponential { mean } => write!(f, "exp:{}", fmt_num(*mean)),
        }
    }
}

impl fmt::Display for Arrival {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arrival::Poisson => write!(f, "poisson"),
            Arrival::Gamma { cv } => write!(f, "gamma:{}", fmt_num(*cv)),
            Arrival::Trace => write!(f, "trace"),
        }
    }
}

/// The canonical spec: parsing it gives back the same [`WorkloadSpec`].
impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = Vec::new();
        if let Some(a) = &self.arrival {
            items.push(format!("arrival={a}"));
        }
        match &self.lengths {
            Lengths::Dist { prompt, output } => {
                items.push(format!("prompt={prompt}"));
                items.push(format!("output={output}"));
            }
            Lengths::ShareGpt { filter } => items.push(if *filter {
                "sharegpt".into()
            } else {
                "sharegpt:raw".into()
            }),
            Lengths::AzureConv => items.push("azure".into()),
            Lengths::File(p) => items.push(format!("trace:{}", p.display())),
        }
        if let Some(r) = self.rate {
            items.push(format!("rate={}", fmt_num(r)));
        }
        if let Some(k) = self.scale {
            items.push(format!("scale={}", fmt_num(k)));
        }
        if let Some(m) = self.max_total {
            items.push(format!("max_total={m}"));
        }
        f.write_str(&items.join(";"))
    }
}

impl std::str::FromStr for WorkloadSpec {
    type Err = WorkloadError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorkloadSpec::parse(s)
    }
}

// ---------------------------------------------------------------- lengths

/// Draws `n` lengths of one side.
pub fn draw_lengths(dist: &LenDist, n: usize, rng: &mut Rng) -> Vec<u32> {
    match *dist {
        LenDist::Fixed(v) => vec![v; n],
        LenDist::Uniform { lo, hi } => (0..n).map(|_| lo + rng.below(hi - lo + 1)).collect(),
        LenDist::Exponential { mean } => (0..n)
            .map(|_| (rng.exponential(mean).round() as u32).clamp(1, ZIPF_CAP))
            .collect(),
        LenDist::Zipf { mean, alpha } => zipf_lengths(mean, alpha, n, rng),
    }
}

/// Llumnix's Zipf lengths: ranks `1..2·mean` (exclusive) with probability
/// ∝ k^−α, the batch rescaled by `mean / batch mean`, rounded up, capped at
/// [`ZIPF_CAP`].
pub fn zipf_lengths(mean: u32, alpha: f64, n: usize, rng: &mut Rng) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    let max_rank = (2 * mean as u64).saturating_sub(1).max(1);
    let mut cdf = Vec::with_capacity(max_rank as usize);
    let mut acc = 0.0;
    for k in 1..=max_rank {
        acc += (k as f64).powf(-alpha);
        cdf.push(acc);
    }
    let total = acc;
    let ranks: Vec<u64> = (0..n)
        .map(|_| {
            let u = rng.unit_f64() * total;
            (cdf.partition_point(|&c| c <= u) as u64 + 1).min(max_rank)
        })
        .collect();
    let batch_mean = ranks.iter().sum::<u64>() as f64 / n as f64;
    let factor = mean as f64 / batch_mean;
    ranks
        .into_iter()
        .map(|k| ((k as f64 * factor).ceil() as u64).clamp(1, ZIPF_CAP as u64) as u32)
        .collect()
}

// ---------------------------------------------------------------- traces

/// The directory the vendored traces are read from: `$LLUMEN_BENCH_DATA`, or
/// this crate's `data/`.
pub fn data_dir() -> PathBuf {
    match std::env::var_os(DATA_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data")),
    }
}

/// A `trace:FILE` path: as given when it exists, else relative to the data
/// directory when it is relative and exists there, else as given (so the
/// error names what the user typed).
fn resolve_trace_path(p: &Path) -> PathBuf {
    if p.exists() || p.is_absolute() {
        return p.to_path_buf();
    }
    let in_data = data_dir().join(p);
    if in_data.exists() {
        in_data
    } else {
        p.to_path_buf()
    }
}

/// Reads and parses a trace CSV.
pub fn load_trace(path: &Path) -> Result<Trace, WorkloadError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_trace(&text, path)
}

/// Parses a trace CSV (either header shape; see the module doc).
pub fn parse_trace(text: &str, path: &Path) -> Result<Trace, WorkloadError> {
    let csv_err = |line: usize, msg: String| WorkloadError::Csv {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    let (_, header) = lines
        .by_ref()
        .find(|(_, l)| !l.is_empty())
        .ok_or_else(|| csv_err(1, "empty file".into()))?;
    let header = header.trim_start_matches('\u{feff}');
    let cols: Vec<String> = header
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    let find = |name: &str| cols.iter().position(|c| c == name);
    let (ts, p, o) = if let (Some(ts), Some(p), Some(o)) = (
        find("timestamp"),
        find("contexttokens"),
        find("generatedtokens"),
    ) {
        (Some(ts), p, o)
    } else if let (Some(p), Some(o)) = (find("input_tokens"), find("output_tokens")) {
        (None, p, o)
    } else {
        return Err(csv_err(
            1,
            format!("unknown header `{header}`: expected `TIMESTAMP,ContextTokens,GeneratedTokens` or `input_tokens,output_tokens`"),
        ));
    };
    let width = cols.len();
    let mut raw: Vec<(i64, u32, u32)> = Vec::new();
    for (lineno, line) in lines {
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < width {
            return Err(csv_err(
                lineno,
                format!("expected {width} columns, got {}", fields.len()),
            ));
        }
        let count = |i: usize| -> Result<u32, WorkloadError> {
            fields[i]
                .parse::<u32>()
                .map_err(|_| csv_err(lineno, format!("`{}` is not a token count", fields[i])))
        };
        let t = match ts {
            Some(i) => parse_timestamp_us(fields[i]).ok_or_else(|| {
                csv_err(
                    lineno,
                    format!(
                        "`{}` is not a timestamp (YYYY-MM-DD HH:MM:SS[.fraction] or seconds)",
                        fields[i]
                    ),
                )
            })?,
            None => 0,
        };
        raw.push((t, count(p)?, count(o)?));
    }
    let first = raw.iter().map(|r| r.0).min().unwrap_or(0);
    let mut rows: Vec<TraceRow> = raw
        .into_iter()
        .map(|(t, p, o)| TraceRow {
            arrival_us: (t - first) as u64,
            prompt_tokens: p,
            output_tokens: o,
        })
        .collect();
    rows.sort_by_key(|r| r.arrival_us);
    Ok(Trace {
        path: path.to_path_buf(),
        has_timestamps: ts.is_some(),
        rows,
    })
}

/// µs since 1970-01-01 of `YYYY-MM-DD[ T]HH:MM:SS[.fraction]` (UTC assumed),
/// or of a plain number of seconds.
pub fn parse_timestamp_us(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return secs.is_finite().then(|| (secs * 1e6).round() as i64);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let (hms, frac) = match time.split_once('.') {
        Some((a, b)) => (a, b),
        None => (time, ""),
    };
    let mut t = hms.split(':');
    let hh: i64 = t.next()?.parse().ok()?;
    let mm: i64 = t.next()?.parse().ok()?;
    let ss: i64 = t.next()?.parse().ok()?;
    if t.next().is_some() || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // Fraction to nanoseconds (first 9 digits), then rounded to µs.
    let mut nanos: i64 = 0;
    for c in frac.chars().chain(std::iter::repeat('0')).take(9) {
        nanos = nanos * 10 + i64::from(c as u8 - b'0');
    }
    let days = days_from_civil(y, m, day);
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + (nanos + 500) / 1000)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------- helpers

/// Mean arrival rate of a workload in requests/s: (n − 1) gaps over the span
/// from the first to the last arrival (0 when fewer than 2 requests or no span).
pub fn mean_rate(reqs: &[RequestSpec]) -> f64 {
    match (reqs.first(), reqs.last()) {
        (Some(a), Some(b)) if reqs.len() > 1 && b.arrival_us > a.arrival_us => {
            (reqs.len() - 1) as f64 / ((b.arrival_us - a.arrival_us) as f64 / 1e6)
        }
        _ => 0.0,
    }
}

/// Span of a workload's arrivals in seconds.
pub fn duration_s(reqs: &[RequestSpec]) -> f64 {
    match (reqs.first(), reqs.last()) {
        (Some(a), Some(b)) => (b.arrival_us - a.arrival_us) as f64 / 1e6,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(spec: &str, n: usize, seed: u64) -> Vec<RequestSpec> {
        WorkloadSpec::parse(spec)
            .unwrap()
            .generate(n, seed, 0.0)
            .unwrap()
    }

    fn gaps_s(reqs: &[RequestSpec]) -> Vec<f64> {
        reqs.windows(2)
            .map(|w| (w[1].arrival_us - w[0].arrival_us) as f64 / 1e6)
            .collect()
    }

    fn mean_cv(xs: &[f64]) -> (f64, f64) {
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / xs.len() as f64;
        (m, var.sqrt() / m)
    }

    fn assert_well_formed(reqs: &[RequestSpec]) {
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!(r.id, i as u64);
            assert!(r.prompt_tokens >= 1 && r.output_tokens >= 1);
        }
        assert!(reqs.windows(2).all(|w| w[0].arrival_us <= w[1].arrival_us));
    }

    #[test]
    fn same_seed_same_workload_other_seed_other_workload() {
        for spec in [
            "poisson:rate=32;lengths=fixed:128:128",
            "gamma:4;zipf:256:256;rate=8",
            "poisson;exp:300:200;rate=5",
            "poisson;uniform:10:500;rate=5",
            "gamma:2;sharegpt;rate=7",
        ] {
            let w = WorkloadSpec::parse(spec).unwrap();
            let a = w.generate(2000, 7, 0.1).unwrap();
            let b = w.generate(2000, 7, 0.1).unwrap();
            assert_eq!(a, b, "{spec}");
            assert_well_formed(&a);
            let c = w.generate(2000, 8, 0.1).unwrap();
            assert_ne!(a, c, "{spec}");
        }
    }

    #[test]
    fn poisson_mean_rate_and_cv() {
        let reqs = gen("poisson;fixed:128:128;rate=32", 20_000, 1);
        let rate = mean_rate(&reqs);
        assert!((rate - 32.0).abs() / 32.0 < 0.03, "rate {rate}");
        let (_, cv) = mean_cv(&gaps_s(&reqs));
        assert!((cv - 1.0).abs() < 0.05, "poisson cv {cv}");
        assert_eq!(reqs[0].arrival_us, 0);
    }

    #[test]
    fn gamma_mean_rate_and_cv() {
        for (cv_want, tol_cv) in [(0.5, 0.05), (2.0, 0.1), (4.0, 0.1)] {
            let reqs = gen(&format!("gamma:{cv_want};fixed:128:128;rate=26"), 50_000, 3);
            let rate = mean_rate(&reqs);
            assert!(
                (rate - 26.0).abs() / 26.0 < 0.1,
                "cv {cv_want}: rate {rate}"
            );
            let (_, cv) = mean_cv(&gaps_s(&reqs));
            assert!(
                (cv - cv_want).abs() / cv_want < tol_cv,
                "cv {cv_want}: measured {cv}"
            );
        }
    }

    #[test]
    fn gamma_sampler_moments() {
        // Shapes on both sides of 1 (the boost path and Marsaglia–Tsang).
        for (shape, scale) in [(0.25, 2.0), (1.0, 1.0), (3.5, 0.5)] {
            let mut rng = Rng::new(42);
            let xs: Vec<f64> = (0..100_000).map(|_| rng.gamma(shape, scale)).collect();
            let (m, cv) = mean_cv(&xs);
            assert!(
                (m - shape * scale).abs() / (shape * scale) < 0.03,
                "shape {shape}: mean {m}"
            );
            let cv_want = 1.0 / f64::sqrt(shape);
            assert!(
                (cv - cv_want).abs() / cv_want < 0.05,
                "shape {shape}: cv {cv}"
            );
        }
    }

    #[test]
    fn zipf_mean_and_cap() {
        for (mean, alpha) in [(128u32, 2.0), (256, 1.5), (512, 1.15)] {
            let w = WorkloadSpec::parse(&format!("poisson;zipf:{mean}:{mean};rate=1")).unwrap();
            let Lengths::Dist {
                prompt: LenDist::Zipf { alpha: a, .. },
                ..
            } = w.lengths
            else {
                panic!()
            };
            assert_eq!(a, alpha);
            let reqs = w.generate(10_000, 5, 0.0).unwrap();
            for side in [
                reqs.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>(),
                reqs.iter().map(|r| r.output_tokens).collect::<Vec<_>>(),
            ] {
                let m = side.iter().map(|&x| f64::from(x)).sum::<f64>() / side.len() as f64;
                assert!(
                    (m - f64::from(mean)).abs() / f64::from(mean) < 0.05,
                    "zipf {mean}: mean {m}"
                );
                assert!(side.iter().all(|&x| (1..=ZIPF_CAP).contains(&x)));
                // Heavy-tailed: at 128 and 256 the rescaled top ranks pass
                // the cap (at 512, α = 1.15, the top rank lands below it).
                if mean <= 256 {
                    assert_eq!(*side.iter().max().unwrap(), ZIPF_CAP, "zipf {mean}");
                } else {
                    assert!(*side.iter().max().unwrap() > 8 * mean, "zipf {mean}");
                }
            }
            // Prompt and output are drawn independently.
            assert!(reqs.iter().any(|r| r.prompt_tokens != r.output_tokens));
        }
    }

    #[test]
    fn other_length_distributions() {
        let reqs = gen("poisson;rate=1;uniform:10:20:100:100", 5000, 1);
        assert!(reqs
            .iter()
            .all(|r| (10..=20).contains(&r.prompt_tokens) && r.output_tokens == 100));
        assert!(
            reqs.iter().any(|r| r.prompt_tokens == 10)
                && reqs.iter().any(|r| r.prompt_tokens == 20)
        );
        let reqs = gen("poisson;rate=1;exp:200:50", 20_000, 1);
        let mp = reqs.iter().map(|r| f64::from(r.prompt_tokens)).sum::<f64>() / 20_000.0;
        let mo = reqs.iter().map(|r| f64::from(r.output_tokens)).sum::<f64>() / 20_000.0;
        assert!(
            (mp - 200.0).abs() < 8.0 && (mo - 50.0).abs() < 3.0,
            "{mp} {mo}"
        );
        let reqs = gen("poisson;rate=1;prompt=fixed:7;output=zipf:128", 100, 1);
        assert!(reqs.iter().all(|r| r.prompt_tokens == 7));
    }

    #[test]
    fn priority_fraction() {
        let w = WorkloadSpec::parse("gamma:4;zipf:128:128;rate=26").unwrap();
        let a = w.generate(20_000, 9, 0.1).unwrap();
        let high = a.iter().filter(|r| r.high_priority).count() as f64 / a.len() as f64;
        assert!((high - 0.1).abs() < 0.01, "{high}");
        // The fraction does not move arrivals or lengths.
        let b = w.generate(20_000, 9, 0.0).unwrap();
        assert!(b.iter().all(|r| !r.high_priority));
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.arrival_us == y.arrival_us && x.prompt_tokens == y.prompt_tokens));
        assert!(w.generate(10, 9, 1.5).is_err());
    }

    #[test]
    fn vendored_traces_load() {
        let azure = load_trace(&data_dir().join(AZURE_CONV_FILE)).unwrap();
        assert_eq!(azure.rows.len(), 19_366);
        assert!(azure.has_timestamps);
        assert_eq!(
            azure.rows[0],
            TraceRow {
                arrival_us: 0,
                prompt_tokens: 374,
                output_tokens: 44
            }
        );
        // 2023-11-16 18:15:46.6805900 -> 18:15:50.9951690
        assert_eq!(azure.rows[1].arrival_us, 4_314_579);
        let span = azure.rows.last().unwrap().arrival_us as f64 / 1e6;
        assert!((span - 3502.0).abs() < 1.0, "{span}");
        let share = load_trace(&data_dir().join(SHAREGPT_FILE)).unwrap();
        assert_eq!(share.rows.len(), 84_226);
        assert!(!share.has_timestamps);
        let kept = share
            .rows
            .iter()
            .filter(|r| {
                r.prompt_tokens >= 4
                    && r.output_tokens >= 4
                    && r.prompt_tokens + r.output_tokens <= 2048
            })
            .count();
        assert_eq!(kept, 77_543);
    }

    #[test]
    fn azure_own_arrivals_truncation_and_rate_scaling() {
        let all = gen("azure", usize::MAX, 1);
        assert_eq!(all.len(), 19_366);
        assert_well_formed(&all);
        let rate = mean_rate(&all);
        assert!((rate - 5.53).abs() < 0.02, "{rate}");
        let some = gen("azure", 1000, 1);
        assert_eq!(some.len(), 1000);
        assert_eq!(some[..], all[..1000]);
        let doubled = gen("azure;scale=2", 1000, 1);
        let ratio = duration_s(&some) / duration_s(&doubled);
        assert!((ratio - 2.0).abs() < 1e-3, "{ratio}");
        assert!(doubled
            .iter()
            .zip(&some)
            .all(|(a, b)| a.prompt_tokens == b.prompt_tokens));
        let w = WorkloadSpec::parse("azure").unwrap().with_rate(20.0);
        let r = mean_rate(&w.generate(5000, 1, 0.0).unwrap());
        assert!((r - 20.0).abs() < 0.01, "{r}");
        // Azure lengths with generated arrivals.
        let p = gen("poisson:50;azure", 3000, 1);
        assert_eq!(p.len(), 3000);
        assert!((mean_rate(&p) - 50.0).abs() < 3.0);
        assert!(p
            .iter()
            .zip(&all)
            .all(|(a, b)| a.prompt_tokens == b.prompt_tokens));
    }

    #[test]
    fn sharegpt_lengths_with_generated_arrivals() {
        let reqs = gen("poisson;sharegpt;rate=7", 5000, 2);
        assert_eq!(reqs.len(), 5000);
        assert!(reqs.iter().all(|r| r.prompt_tokens >= 4
            && r.output_tokens >= 4
            && r.prompt_tokens + r.output_tokens <= 2048));
        let raw = gen("poisson;sharegpt:raw;rate=7", 20_000, 2);
        assert!(raw.iter().any(|r| r.prompt_tokens + r.output_tokens > 2048));
        assert!((mean_rate(&reqs) - 7.0).abs() < 0.5);
    }

    #[test]
    fn trace_file_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("mine.csv");
        std::fs::write(&a, "TIMESTAMP,ContextTokens,GeneratedTokens\r\n2024-01-01 23:59:59.5,10,20\r\n2024-01-02 00:00:00.5,30,40\r\n2024-01-02 00:00:02.5,50,0\r\n").unwrap();
        let w = WorkloadSpec::parse(&format!("trace:{}", a.display())).unwrap();
        assert_eq!(w.name(), "trace-mine");
        let r = w.generate(10, 0, 0.0).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.iter().map(|x| x.arrival_us).collect::<Vec<_>>(),
            [0, 1_000_000, 3_000_000]
        );
        assert_eq!(r[2].output_tokens, 1, "0 tokens are raised to 1");
        let half = w.with_rate(1.0).generate(10, 0, 0.0).unwrap();
        assert_eq!(half.last().unwrap().arrival_us, 2_000_000);

        let b = dir.path().join("lens.csv");
        std::fs::write(&b, "input_tokens,output_tokens\n5,6\n7,8\n").unwrap();
        let w = WorkloadSpec::parse(&format!("trace:{};rate=2", b.display())).unwrap();
        let r = w.generate(50, 0, 0.0).unwrap();
        assert_eq!(r.len(), 50);
        assert!(r
            .iter()
            .all(|x| (x.prompt_tokens, x.output_tokens) == (5, 6)
                || (x.prompt_tokens, x.output_tokens) == (7, 8)));
        let err = WorkloadSpec::parse(&format!("trace:{}", b.display()))
            .unwrap()
            .generate(5, 0, 0.0)
            .unwrap_err();
        assert!(err.to_string().contains("need a rate"), "{err}");

        let bad = dir.path().join("bad.csv");
        std::fs::write(&bad, "a,b\n1,2\n").unwrap();
        let err = load_trace(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown header"), "{err}");
        std::fs::write(&bad, "input_tokens,output_tokens\n1,x\n").unwrap();
        let err = load_trace(&bad).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("`x`"), "{err}");
        let err = WorkloadSpec::parse("trace:/nonexistent/x.csv")
            .unwrap()
            .generate(1, 0, 0.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read trace /nonexistent/x.csv"),
            "{err}"
        );
    }

    #[test]
    fn spec_forms_and_round_trip() {
        let a = WorkloadSpec::parse("poisson:rate=32;lengths=fixed:128:128").unwrap();
        let b = WorkloadSpec::parse(" poisson ; fixed:128:128 ; rate=32 ").unwrap();
        let c = WorkloadSpec::parse("poisson:32;fixed:128").unwrap();
        let d = WorkloadSpec::from_parts(Some("poisson"), "fixed:128:128", Some(32.0)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, d);
        assert_eq!(a.name(), "fixed-128-128");
        let g = WorkloadSpec::parse("gamma:cv=2:rate=26;prompt=zipf:128;output=zipf:128").unwrap();
        assert_eq!(g, WorkloadSpec::parse("gamma:2:26;zipf:128:128").unwrap());
        assert_eq!(g.arrival, Some(Arrival::Gamma { cv: 2.0 }));
        assert_eq!(g.name(), "zipf-128-128_gamma-cv2");
        assert_eq!(
            WorkloadSpec::parse("zipf:256:256:1.2;rate=1")
                .unwrap()
                .name(),
            "zipf-256-256-a1.2"
        );
        assert_eq!(
            WorkloadSpec::parse("azure;scale=2").unwrap().name(),
            "azure-conv"
        );
        assert_eq!(
            WorkloadSpec::parse("gamma:4;sharegpt;rate=7")
                .unwrap()
                .name(),
            "sharegpt_gamma-cv4"
        );
        assert_eq!(
            WorkloadSpec::from_parts(None, "azure-conv", None)
                .unwrap()
                .lengths,
            Lengths::AzureConv
        );
        for spec in [
            "poisson:rate=32;lengths=fixed:128:128",
            "gamma:4;zipf:256:256;rate=8",
            "poisson;exp:300:200;rate=5",
            "uniform:1:10:20:30;rate=2",
            "gamma:2;sharegpt:raw;rate=7",
            "azure;scale=2;max_total=4096",
            "trace:/tmp/a b.csv;rate=3",
        ] {
            let w = WorkloadSpec::parse(spec).unwrap();
            let again = WorkloadSpec::parse(&w.to_string()).unwrap();
            assert_eq!(w, again, "{spec} -> {w}");
        }
        let r = WorkloadSpec::parse("poisson;fixed:1:1;rate=3")
            .unwrap()
            .with_rate(9.0);
        assert_eq!(r.rate(), Some(9.0));
    }

    #[test]
    fn bad_specs_say_why() {
        let cases = [
            ("", "no lengths"),
            ("poisson", "no lengths"),
            ("poisson;fixed:128", "need a rate"),
            ("bogus;fixed:1:1", "unknown item `bogus`"),
            ("gamma;fixed:1:1;rate=1", "coefficient of variation"),
            ("gamma:-1;fixed:1:1;rate=1", "must be a positive number"),
            ("poisson:abc;fixed:1:1", "`abc` is not a valid number"),
            ("poisson;fixed:0:1;rate=1", "at least 1 token"),
            ("poisson;uniform:10:5;rate=1", "low is above high"),
            ("poisson;zipf:1:2:3:4:5;rate=1", "not a lengths term"),
            ("poisson;fixed:1:1;rate=1;rate=2", "rate given twice"),
            ("poisson;gamma:2;fixed:1:1", "arrival given twice"),
            ("fixed:1:1;sharegpt;rate=1", "lengths given twice"),
            ("prompt=fixed:1;rate=1", "without output="),
            ("fixed:1:1;prompt=fixed:1;output=fixed:1", "not both"),
            ("trace;sharegpt", "no timestamps"),
            ("poisson;fixed:1:1;scale=2", "scale= applies"),
            ("azure;rate=2;scale=2", "not both"),
            ("trace:", "trace needs a file"),
            ("poisson:cv=2;fixed:1:1", "unknown parameter `cv`"),
            ("sharegpt:oops;rate=1", "not a lengths term"),
            ("rate=fast;fixed:1:1", "`fast` is not a valid number"),
        ];
        for (spec, want) in cases {
            let err = WorkloadSpec::parse(spec).and_then(|w| w.generate(10, 0, 0.0).map(|_| w));
            let msg = err.expect_err(spec).to_string();
            assert!(msg.contains(want), "`{spec}`: `{msg}` lacks `{want}`");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp_us("1970-01-01 00:00:01"), Some(1_000_000));
        assert_eq!(
            parse_timestamp_us("1970-01-02T00:00:00.0000015"),
            Some(86_400_000_002)
        );
        assert_eq!(parse_timestamp_us("12.5"), Some(12_500_000));
        assert_eq!(
            parse_timestamp_us("2024-03-01 00:00:00").unwrap()
                - parse_timestamp_us("2024-02-28 00:00:00").unwrap(),
            2 * 86_400_000_000
        );
        assert_eq!(parse_timestamp_us("2024-13-01 00:00:00"), None);
        assert_eq!(parse_timestamp_us("yesterday"), None);
    }
}
