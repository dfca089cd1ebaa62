//! The Llumnix study (OSDI'24, §6.3–6.5) as data, and its expansion into
//! simulations.
//!
//! **Owns**: the tables of the study — Fig 11's seven serving workloads
//! with the artifact's rates and migration thresholds
//! (`artifact/63_serving_performance/run.sh` on `osdi24ae`), Fig 13's
//! priority experiment, Fig 14's auto-scaling experiment, Fig 15's
//! scaling-threshold sweep and the ablation — the two rate sets (the
//! paper's rates and the rates rescaled to this profile's capacity, see
//! [`RateSet`]), the policies of each row with their parameters, and
//! [`expand`], which turns all of it into [`Point`]s: one deterministic
//! simulation each.
//! **Never touches**: running a simulation (`compare.rs` runs points),
//! measuring a capacity (`calibrate.rs`), metrics, files, plots
//! (`report.rs`, `results_md.rs`).
//!
//! Departures from the artifact, all deliberate and stated in RESULTS.md:
//! - BurstGPT's trace is not obtainable here: its row uses the vendored
//!   ShareGPT lengths with bursty Gamma arrivals (CV 3) instead (the
//!   artifact fed BurstGPT's GPT-4 conversation lengths with Poisson
//!   arrivals);
//! - every instance's scheduler takes the profile's 12,000 batched tokens
//!   (the artifact's Fig 11: 12,800; Figs 13–15: 12,000).

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;

use crate::sim::{PolicySet, ScalingConfig};
use crate::workload::{Arrival, WorkloadSpec};

/// One figure of the study (a group of points reported together).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    /// Serving: seven workloads, rates, three policies.
    Fig11,
    /// Priorities: llumnix with and without the requests' priorities.
    Fig13,
    /// Auto-scaling: llumnix vs INFaaS++ over rates and burstiness.
    Fig14,
    /// The scaling-threshold sweep: latency against cost.
    Fig15,
    /// Which mechanism contributes how much, at a few points.
    Ablation,
}

impl Figure {
    pub const ALL: [Figure; 5] = [
        Figure::Fig11,
        Figure::Fig13,
        Figure::Fig14,
        Figure::Fig15,
        Figure::Ablation,
    ];

    /// The directory and JSON name: `fig11`, …, `ablation`.
    pub fn name(self) -> &'static str {
        match self {
            Figure::Fig11 => "fig11",
            Figure::Fig13 => "fig13",
            Figure::Fig14 => "fig14",
            Figure::Fig15 => "fig15",
            Figure::Ablation => "ablation",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Figure::Fig11 => "Fig 11: serving",
            Figure::Fig13 => "Fig 13: priorities",
            Figure::Fig14 => "Fig 14: auto-scaling",
            Figure::Fig15 => "Fig 15: scaling thresholds",
            Figure::Ablation => "Ablation",
        }
    }

    /// A figure by name; the first wave's experiment names stay aliases
    /// (`serving` = fig11, `priority` = fig13, `scaling` = fig14).
    pub fn parse(s: &str) -> Option<Figure> {
        Some(match s {
            "fig11" | "serving" => Figure::Fig11,
            "fig13" | "priority" | "priorities" => Figure::Fig13,
            "fig14" | "scaling" | "autoscaling" => Figure::Fig14,
            "fig15" | "thresholds" | "scaling-thresholds" => Figure::Fig15,
            "ablation" => Figure::Ablation,
            _ => return None,
        })
    }
}

/// Which rates a figure runs at.
///
/// **The rescaling rule.** The paper's rates load its A10 fleet; this
/// profile's fleet is faster on some workloads and about as fast on
/// others, so the same rates are a different offered load. For each
/// length distribution the rescaled rates keep the paper's load relative
/// to capacity: `rescaled = paper rate × C / M`, where
/// - `M` is the midpoint of the paper's Fig 11 rate range for that workload
///   (in the artifact's own reproduction, `figure11.png`, the midpoint is
///   within a few percent of the rate at which INFaaS++'s mean prefill
///   latency passes 1 s for 256-256, 512-512, 128-512 and 512-128; the
///   paper's 128-128 range lies wholly above it);
/// - `C` is the same point measured on this profile: the Poisson rate at
///   which INFaaS++ on the study's fleet reaches a mean prefill latency of
///   1 s ([`crate::calibrate`], a seeded bisection, so deterministic).
///
/// Fig 13 (Zipf 128/128) takes the 128-128 factor, Figs 14 and 15 (Zipf
/// 512/512) the 512-512 factor; BurstGPT's stand-in is calibrated on its
/// ShareGPT lengths against BurstGPT's own paper range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateSet {
    /// The paper's (artifact's) rates, as they are.
    Paper,
    /// The paper's rates × (this profile's capacity / the paper's).
    Rescaled,
}

impl RateSet {
    pub fn name(self) -> &'static str {
        match self {
            RateSet::Paper => "paper",
            RateSet::Rescaled => "rescaled",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            RateSet::Paper => "paper rates",
            RateSet::Rescaled => "rescaled rates",
        }
    }

    pub fn parse(s: &str) -> Option<RateSet> {
        match s {
            "paper" => Some(RateSet::Paper),
            "rescaled" | "scaled" => Some(RateSet::Rescaled),
            _ => None,
        }
    }
}

/// One Fig 11 workload: the fidelity note's table with the artifact's
/// exact rate lists.
#[derive(Clone, Copy, Debug)]
pub struct ServingWorkload {
    /// Its name in results, tables and file names.
    pub key: &'static str,
    /// Workload spec (`workload.rs` grammar) without the rate.
    pub spec: &'static str,
    /// The artifact's rates (req/s).
    pub paper_rates: &'static [f64],
    /// Migration threshold T (`migrate-out-below` = `migrate-in-above`).
    pub threshold: u32,
    /// A real trace (the paper reports those apart from generated lengths;
    /// it runs round-robin on these only, and so does the study unless
    /// asked to run it everywhere).
    pub real_trace: bool,
}

/// Fig 11: 16 instances, 10,000 requests per point, Poisson arrivals,
/// Zipf lengths capped at 6144 (the workload module's default alphas:
/// 2.0 for a mean of 128, 1.5 for 256, 1.15 for 512).
pub const FIG11: [ServingWorkload; 7] = [
    ServingWorkload {
        key: "sharegpt",
        spec: "poisson;lengths=sharegpt",
        paper_rates: &[7.0, 7.25, 7.5, 7.75, 8.0],
        threshold: 3,
        real_trace: true,
    },
    // Not BurstGPT: its trace is not obtainable here. ShareGPT lengths with
    // bursty Gamma arrivals (CV 3) stand in for it.
    ServingWorkload {
        key: "burstgpt",
        spec: "gamma:3;lengths=sharegpt",
        paper_rates: &[7.5, 7.75, 8.0, 8.25, 8.5],
        threshold: 3,
        real_trace: true,
    },
    ServingWorkload {
        key: "zipf-128-128",
        spec: "poisson;lengths=zipf:128:128",
        paper_rates: &[32.0, 33.0, 34.0, 35.0, 36.0, 37.0, 38.0],
        threshold: 3,
        real_trace: false,
    },
    ServingWorkload {
        key: "zipf-256-256",
        spec: "poisson;lengths=zipf:256:256",
        paper_rates: &[7.4, 7.5, 7.6, 7.7, 7.8, 7.9, 8.0],
        threshold: 10,
        real_trace: false,
    },
    ServingWorkload {
        key: "zipf-512-512",
        spec: "poisson;lengths=zipf:512:512",
        paper_rates: &[2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2],
        threshold: 3,
        real_trace: false,
    },
    ServingWorkload {
        key: "zipf-128-512",
        spec: "poisson;lengths=zipf:128:512",
        paper_rates: &[4.10, 4.15, 4.20, 4.25, 4.30, 4.35, 4.40],
        threshold: 10,
        real_trace: false,
    },
    ServingWorkload {
        key: "zipf-512-128",
        spec: "poisson;lengths=zipf:512:128",
        paper_rates: &[10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 22.0],
        threshold: 3,
        real_trace: false,
    },
];

/// Fig 13 (`artifact/64_support_for_priorities`).
pub struct PriorityStudy {
    /// Lengths (Gamma arrivals of each CV are added).
    pub lengths: &'static str,
    pub cvs: &'static [f64],
    pub paper_rate: f64,
    pub high_priority_fraction: f64,
    pub threshold: u32,
    /// The Fig 11 workload whose rescaling factor applies.
    pub scaled_like: &'static str,
}

pub const FIG13: PriorityStudy = PriorityStudy {
    lengths: "zipf:128:128",
    cvs: &[2.0, 4.0, 6.0, 8.0],
    paper_rate: 26.0,
    high_priority_fraction: 0.1,
    threshold: 3,
    scaled_like: "zipf-128-128",
};

/// Fig 14 (`artifact/65_auto_scaling`): 8 instances at the start, 1–16.
pub struct ScalingStudy {
    pub lengths: &'static str,
    pub poisson_rates: &'static [f64],
    pub gamma_cvs: &'static [f64],
    pub gamma_rate: f64,
    pub start_instances: u32,
    pub min_instances: u32,
    pub max_instances: u32,
    /// Scale up when the average freeness is below this; down when above
    /// it + [`ScalingStudy::down_offset`] (the artifact: 10 and 60).
    pub scale_up_below: u32,
    pub down_offset: u32,
    /// Llumnix's migration threshold.
    pub threshold: u32,
    pub scaled_like: &'static str,
}

pub const FIG14: ScalingStudy = ScalingStudy {
    lengths: "zipf:512:512",
    poisson_rates: &[2.0, 2.2, 2.4, 2.6, 2.8, 3.0],
    gamma_cvs: &[2.0, 3.0, 4.0, 5.0, 6.0],
    gamma_rate: 2.0,
    start_instances: 8,
    min_instances: 1,
    max_instances: 16,
    scale_up_below: 10,
    down_offset: 50,
    threshold: 3,
    scaled_like: "zipf-512-512",
};

/// Fig 15: the scaling thresholds (up = x, down = x + 50) on one of Fig
/// 14's workloads. The artifact runs the sweep on Gamma CV 2 at 2 req/s
/// (`65_auto_scaling/run.sh`), so this does too.
pub struct ThresholdStudy {
    pub spec: &'static str,
    pub rate: f64,
    pub thresholds: &'static [u32],
}

pub const FIG15: ThresholdStudy = ThresholdStudy {
    spec: "gamma:2;lengths=zipf:512:512",
    rate: 2.0,
    thresholds: &[5, 25, 45, 65, 85],
};

/// One row of the ablation: a policy with parameters, and what it adds to
/// the row before it.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub label: &'static str,
    pub policy: &'static str,
    /// Parameters on top of the workload's threshold (llumnix only).
    pub params: &'static [&'static str],
    /// Send every request as normal priority.
    pub withhold_priorities: bool,
    /// The mechanism this row adds to the previous one.
    pub adds: &'static str,
}

/// The ablation: the serving rows at the middle paper rate of each
/// workload named, the priority rows at one CV of Fig 13.
pub struct AblationStudy {
    pub serving_workloads: &'static [&'static str],
    pub serving: &'static [Variant],
    pub priority_cv: f64,
    pub priority: &'static [Variant],
}

pub const ABLATION: AblationStudy = AblationStudy {
    serving_workloads: &["zipf-512-512", "sharegpt"],
    serving: &[
        Variant {
            label: "round-robin",
            policy: "round-robin",
            params: &[],
            withhold_priorities: false,
            adds: "(baseline)",
        },
        Variant {
            label: "infaas",
            policy: "infaas",
            params: &[],
            withhold_priorities: false,
            adds: "load-balancing dispatch",
        },
        Variant {
            label: "llumnix[migration-load=none]",
            policy: "llumnix",
            params: &["migration-load=none"],
            withhold_priorities: false,
            adds: "migration (load balancing only)",
        },
        Variant {
            label: "llumnix[migration-load=head-of-line]",
            policy: "llumnix",
            params: &["migration-load=head-of-line"],
            withhold_priorities: false,
            adds: "de-fragmentation, head-of-line (the paper's)",
        },
        Variant {
            label: "llumnix",
            policy: "llumnix",
            params: &[],
            withhold_priorities: false,
            adds: "de-fragmentation, all waiting (the artifact's)",
        },
    ],
    priority_cv: 4.0,
    priority: &[
        Variant {
            label: "llumnix-base",
            policy: "llumnix",
            params: &[],
            withhold_priorities: true,
            adds: "(priorities withheld)",
        },
        Variant {
            label: "llumnix[priority-reserve=headroom:0]",
            policy: "llumnix",
            params: &["priority-reserve=headroom:0"],
            withhold_priorities: false,
            adds: "priority in the local queues, no reserve",
        },
        Variant {
            label: "llumnix",
            policy: "llumnix",
            params: &[],
            withhold_priorities: false,
            adds: "the artifact's reserve (all-but:100)",
        },
    ],
};

/// A Fig 11 workload as the study runs it (the table's, or one given on
/// the command line).
#[derive(Clone, Debug)]
pub struct ServingDef {
    pub key: String,
    /// Without a rate.
    pub spec: WorkloadSpec,
    pub paper_rates: Vec<f64>,
    pub threshold: u32,
    pub real_trace: bool,
    /// Round-robin runs on it by default.
    pub round_robin: bool,
}

impl ServingDef {
    pub fn from_table(w: &ServingWorkload) -> ServingDef {
        ServingDef {
            key: w.key.to_string(),
            spec: WorkloadSpec::parse(w.spec).expect("the study's specs parse"),
            paper_rates: w.paper_rates.to_vec(),
            threshold: w.threshold,
            real_trace: w.real_trace,
            round_robin: w.real_trace,
        }
    }

    /// The table's row named `key`.
    pub fn table(key: &str) -> Option<ServingDef> {
        FIG11
            .iter()
            .find(|w| w.key == key)
            .map(ServingDef::from_table)
    }

    /// `SPEC@R1:R2:…` from the command line: its rates stand for the
    /// paper's, T = 3.
    pub fn parse_arg(s: &str) -> Result<ServingDef> {
        let (spec, rates) = s
            .rsplit_once('@')
            .ok_or_else(|| anyhow!("--workload {s:?}: expected SPEC@R1:R2:…"))?;
        let spec = WorkloadSpec::parse(spec).map_err(|e| anyhow!("--workload {s:?}: {e}"))?;
        let rates = rates
            .split(':')
            .map(|r| {
                r.parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r > 0.0)
                    .ok_or_else(|| anyhow!("--workload {s:?}: rate {r:?} is not a positive number"))
            })
            .collect::<Result<Vec<_>>>()?;
        let key = spec.name();
        let real_trace = ["sharegpt", "azure", "trace", "burstgpt"]
            .iter()
            .any(|p| key.starts_with(p));
        Ok(ServingDef {
            key,
            spec,
            paper_rates: rates,
            threshold: 3,
            real_trace,
            round_robin: true,
        })
    }

    /// The midpoint of the paper's rate range (`M` of [`RateSet`]).
    pub fn paper_midpoint(&self) -> f64 {
        let lo = self
            .paper_rates
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let hi = self.paper_rates.iter().copied().fold(0.0, f64::max);
        // Rounded, so 2.6–3.2 gives 2.9 and not 2.9000000000000004.
        ((lo + hi) / 2.0 * 1e6).round() / 1e6
    }

    /// The workload whose capacity is calibrated: the same lengths under
    /// Poisson arrivals, without a rate.
    pub fn calibration_spec(&self) -> WorkloadSpec {
        WorkloadSpec {
            arrival: Some(Arrival::Poisson),
            rate: None,
            scale: None,
            ..self.spec.clone()
        }
    }
}

/// One simulation of the study.
#[derive(Clone, Debug)]
pub struct Point {
    pub figure: Figure,
    /// The latency profile's name (`derived`, `measured`, or a file stem).
    pub profile: String,
    pub rate_set: RateSet,
    /// Its name in results (unique per figure, rate and policy).
    pub workload: String,
    /// Without a rate: [`Point::rate`] applies.
    pub spec: WorkloadSpec,
    /// The paper's rate this point stands for (= `rate` in the paper set).
    pub paper_rate: f64,
    pub rate: f64,
    /// The row's label (`llumnix`, `infaas`, `round-robin`, `llumnix-base`,
    /// `llumnix[param=value]`).
    pub policy: String,
    pub policies: PolicySet,
    /// Instances at the start.
    pub instances: u32,
    pub high_priority_fraction: f64,
    /// Send every request as normal priority (the `-base` baseline; the
    /// records keep each request's class).
    pub withhold_priorities: bool,
    pub scaling: Option<ScalingConfig>,
    /// Llumnix's migration threshold T, where a llumnix policy runs.
    pub migrate_threshold: Option<u32>,
    /// The scale-up threshold (Figs 14 and 15).
    pub scale_threshold: Option<u32>,
    /// A real trace (Fig 11's reporting splits on it).
    pub real_trace: bool,
    /// The figure's x value: the paper's rate, the Gamma CV or the
    /// scaling threshold.
    pub x: f64,
}

impl Point {
    /// Two points with the same key are the same simulation (the ablation
    /// shares rows with Figs 11 and 13): everything the run depends on.
    pub fn sim_key(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}|{:?}",
            self.profile,
            self.spec,
            self.rate,
            self.policies.label(),
            self.instances,
            self.high_priority_fraction,
            self.withhold_priorities,
            self.scaling
        )
    }
}

/// What [`expand`] needs besides the tables.
pub struct Plan<'a> {
    pub figures: &'a [Figure],
    pub profiles: &'a [String],
    pub rate_sets: &'a [RateSet],
    /// Fig 11's workloads (the table, or `--workload`).
    pub serving: &'a [ServingDef],
    pub serving_policies: &'a [String],
    /// Round-robin on every Fig 11 workload (the paper: on the traces only;
    /// a workload given on the command line always runs every policy).
    pub round_robin_everywhere: bool,
    /// Fig 11 and 13's fleet.
    pub instances: u32,
    /// Fig 13's rate in the paper set.
    pub priority_rate: f64,
    /// Keep at most this many values of every swept list (rates, CVs,
    /// thresholds), evenly spread, both ends kept; 1 keeps the middle one.
    pub max_sweep: Option<usize>,
    pub policy_dir: &'a Path,
}

/// At most `n` of `values`, evenly spread (both ends kept; the middle one
/// when `n` is 1).
pub fn thin<T: Copy>(values: &[T], n: Option<usize>) -> Vec<T> {
    match n {
        Some(n) if n < values.len() => {
            if n <= 1 {
                return values.get(values.len() / 2).copied().into_iter().collect();
            }
            let last = values.len() - 1;
            (0..n)
                .map(|i| values[(i * last + (n - 1) / 2) / (n - 1)])
                .collect()
        }
        _ => values.to_vec(),
    }
}

/// The middle value of a sweep.
fn middle(values: &[f64]) -> f64 {
    values[values.len() / 2]
}

/// `llumnix` with threshold T (and more parameters).
fn llumnix(dir: &Path, t: u32, extra: &[&str]) -> Result<PolicySet> {
    let t_params = [
        format!("migrate-out-below={t}"),
        format!("migrate-in-above={t}"),
    ];
    PolicySet::named("llumnix", dir).with_params(
        t_params
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied()),
    )
}

/// A policy of a Fig 11 row: llumnix gets the workload's T; the others
/// run without parameters (INFaaS++ ignores T; round-robin takes none).
fn serving_policy(dir: &Path, name: &str, t: u32, extra: &[&str]) -> Result<PolicySet> {
    if name == "llumnix" {
        llumnix(dir, t, extra)
    } else {
        PolicySet::named(name, dir).with_params(extra.iter().copied())
    }
}

/// The scaling parameters of Figs 14–15 on `name` (llumnix also gets T).
fn scaling_policy(dir: &Path, name: &str, t: u32, up: u32, down: u32) -> Result<PolicySet> {
    let scale = [
        format!("scale-up-below={up}"),
        format!("scale-down-above={down}"),
    ];
    let scale: Vec<&str> = scale.iter().map(String::as_str).collect();
    if name == "llumnix" {
        llumnix(dir, t, &scale)
    } else {
        PolicySet::named(name, dir).with_params(scale)
    }
}

/// Expands the study into points, in a stable order: per profile, rate
/// set and figure. `factor(profile, fig11 key)` is the rescaling factor
/// `C / M` ([`RateSet`]); it is asked only for the rescaled set.
pub fn expand(plan: &Plan, factor: &dyn Fn(&str, &str) -> Result<f64>) -> Result<Vec<Point>> {
    let mut out = Vec::new();
    let dir = plan.policy_dir;
    let thin_f = |v: &[f64]| thin(v, plan.max_sweep);
    for profile in plan.profiles {
        for &rate_set in plan.rate_sets {
            // The rate a paper rate stands for in this set.
            let rate_of = |key: &str, paper: f64| -> Result<f64> {
                Ok(match rate_set {
                    RateSet::Paper => paper,
                    RateSet::Rescaled => round_rate(paper * factor(profile, key)?),
                })
            };
            let base = |figure: Figure, workload: String, spec: WorkloadSpec| Point {
                figure,
                profile: profile.clone(),
                rate_set,
                workload,
                spec,
                paper_rate: 0.0,
                rate: 0.0,
                policy: String::new(),
                policies: PolicySet::named("llumnix", dir),
                instances: plan.instances,
                high_priority_fraction: 0.0,
                withhold_priorities: false,
                scaling: None,
                migrate_threshold: None,
                scale_threshold: None,
                real_trace: false,
                x: 0.0,
            };
            for &figure in plan.figures {
                match figure {
                    Figure::Fig11 => {
                        for w in plan.serving {
                            for paper in thin_f(&w.paper_rates) {
                                let rate = rate_of(&w.key, paper)?;
                                for p in plan.serving_policies {
                                    if p == "round-robin"
                                        && !(w.round_robin || plan.round_robin_everywhere)
                                    {
                                        continue;
                                    }
                                    out.push(Point {
                                        paper_rate: paper,
                                        rate,
                                        policy: p.clone(),
                                        policies: serving_policy(dir, p, w.threshold, &[])?,
                                        migrate_threshold: (p == "llumnix").then_some(w.threshold),
                                        real_trace: w.real_trace,
                                        x: paper,
                                        ..base(figure, w.key.clone(), w.spec.clone())
                                    });
                                }
                            }
                        }
                    }
                    Figure::Fig13 => {
                        let s = &FIG13;
                        let rate = rate_of(s.scaled_like, plan.priority_rate)?;
                        for cv in thin_f(s.cvs) {
                            let spec = parse(&format!("gamma:{cv};lengths={}", s.lengths))?;
                            for (label, withhold) in [("llumnix", false), ("llumnix-base", true)] {
                                out.push(Point {
                                    paper_rate: plan.priority_rate,
                                    rate,
                                    policy: label.into(),
                                    policies: llumnix(dir, s.threshold, &[])?,
                                    high_priority_fraction: s.high_priority_fraction,
                                    withhold_priorities: withhold,
                                    migrate_threshold: Some(s.threshold),
                                    x: cv,
                                    ..base(figure, spec.name(), spec.clone())
                                });
                            }
                        }
                    }
                    Figure::Fig14 => {
                        let s = &FIG14;
                        let scaling = fig14_scaling();
                        let mut rows: Vec<(WorkloadSpec, f64, f64)> = Vec::new();
                        let poisson = parse(&format!("poisson;lengths={}", s.lengths))?;
                        for r in thin_f(s.poisson_rates) {
                            rows.push((poisson.clone(), r, r));
                        }
                        for cv in thin_f(s.gamma_cvs) {
                            let g = parse(&format!("gamma:{cv};lengths={}", s.lengths))?;
                            rows.push((g, s.gamma_rate, cv));
                        }
                        for (spec, paper, x) in rows {
                            let rate = rate_of(s.scaled_like, paper)?;
                            let (up, down) = (s.scale_up_below, s.scale_up_below + s.down_offset);
                            for p in ["llumnix", "infaas"] {
                                out.push(Point {
                                    paper_rate: paper,
                                    rate,
                                    policy: p.into(),
                                    policies: scaling_policy(dir, p, s.threshold, up, down)?,
                                    instances: s.start_instances,
                                    scaling: Some(scaling.clone()),
                                    migrate_threshold: (p == "llumnix").then_some(s.threshold),
                                    scale_threshold: Some(up),
                                    x,
                                    ..base(figure, spec.name(), spec.clone())
                                });
                            }
                        }
                    }
                    Figure::Fig15 => {
                        let s = &FIG15;
                        let f14 = &FIG14;
                        let spec = parse(s.spec)?;
                        let rate = rate_of(f14.scaled_like, s.rate)?;
                        for up in thin(s.thresholds, plan.max_sweep) {
                            let down = up + f14.down_offset;
                            for p in ["llumnix", "infaas"] {
                                out.push(Point {
                                    paper_rate: s.rate,
                                    rate,
                                    policy: p.into(),
                                    policies: scaling_policy(dir, p, f14.threshold, up, down)?,
                                    instances: f14.start_instances,
                                    scaling: Some(fig14_scaling()),
                                    migrate_threshold: (p == "llumnix").then_some(f14.threshold),
                                    scale_threshold: Some(up),
                                    x: f64::from(up),
                                    ..base(figure, format!("{}_up{up}", spec.name()), spec.clone())
                                });
                            }
                        }
                    }
                    Figure::Ablation => {
                        let a = &ABLATION;
                        for key in a.serving_workloads {
                            let w = ServingDef::table(key)
                                .ok_or_else(|| anyhow!("ablation: no Fig 11 workload {key}"))?;
                            let paper = middle(&w.paper_rates);
                            let rate = rate_of(&w.key, paper)?;
                            for v in a.serving {
                                out.push(Point {
                                    paper_rate: paper,
                                    rate,
                                    policy: v.label.into(),
                                    policies: serving_policy(dir, v.policy, w.threshold, v.params)?,
                                    migrate_threshold: (v.policy == "llumnix")
                                        .then_some(w.threshold),
                                    real_trace: w.real_trace,
                                    x: paper,
                                    ..base(figure, w.key.clone(), w.spec.clone())
                                });
                            }
                        }
                        let s = &FIG13;
                        let rate = rate_of(s.scaled_like, plan.priority_rate)?;
                        let spec =
                            parse(&format!("gamma:{};lengths={}", a.priority_cv, s.lengths))?;
                        for v in a.priority {
                            out.push(Point {
                                paper_rate: plan.priority_rate,
                                rate,
                                policy: v.label.into(),
                                policies: llumnix(dir, s.threshold, v.params)?,
                                high_priority_fraction: s.high_priority_fraction,
                                withhold_priorities: v.withhold_priorities,
                                migrate_threshold: Some(s.threshold),
                                x: a.priority_cv,
                                ..base(figure, spec.name(), spec.clone())
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Figs 14–15's fleet bounds with the simulator's Llumnix defaults (10 s
/// rounds, 5 s start-up, first check after 100 s).
pub fn fig14_scaling() -> ScalingConfig {
    ScalingConfig {
        min_instances: FIG14.min_instances,
        max_instances: FIG14.max_instances,
        ..ScalingConfig::default()
    }
}

fn parse(spec: &str) -> Result<WorkloadSpec> {
    WorkloadSpec::parse(spec).map_err(|e| anyhow!("{e}"))
}

/// A rescaled rate to 4 significant digits (readable, and the same bytes
/// from the same factor).
pub fn round_rate(r: f64) -> f64 {
    if !(r.is_finite() && r > 0.0) {
        return r;
    }
    let digits = 3 - r.log10().floor() as i32;
    let k = 10f64.powi(digits);
    (r * k).round() / k
}

/// The Fig 11 workloads that rescaled figures need calibrated: the
/// serving ones run, and those Figs 13–15 and the ablation borrow their
/// factor from.
pub fn calibrated_workloads(figures: &[Figure], serving: &[ServingDef]) -> Result<Vec<ServingDef>> {
    let mut out: Vec<ServingDef> = Vec::new();
    let mut add = |d: ServingDef| {
        if !out.iter().any(|o| o.key == d.key) {
            out.push(d);
        }
    };
    let table =
        |key: &str| ServingDef::table(key).ok_or_else(|| anyhow!("no Fig 11 workload named {key}"));
    for &f in figures {
        match f {
            Figure::Fig11 => serving.iter().cloned().for_each(&mut add),
            Figure::Fig13 => add(table(FIG13.scaled_like)?),
            Figure::Fig14 | Figure::Fig15 => add(table(FIG14.scaled_like)?),
            Figure::Ablation => {
                for k in ABLATION.serving_workloads {
                    add(table(k)?);
                }
                add(table(FIG13.scaled_like)?);
            }
        }
    }
    if out.is_empty() {
        bail!("no figure to run");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIG11_POLICIES: [&str; 3] = ["llumnix", "infaas", "round-robin"];

    fn plan<'a>(
        figures: &'a [Figure],
        profiles: &'a [String],
        serving: &'a [ServingDef],
        policies: &'a [String],
        max_sweep: Option<usize>,
    ) -> Plan<'a> {
        Plan {
            figures,
            profiles,
            rate_sets: &[RateSet::Paper, RateSet::Rescaled],
            serving,
            serving_policies: policies,
            round_robin_everywhere: false,
            instances: 16,
            priority_rate: 26.0,
            max_sweep,
            policy_dir: Path::new("/nowhere"),
        }
    }

    #[test]
    fn the_tables_parse_and_match_the_artifact() {
        let defs: Vec<ServingDef> = FIG11.iter().map(ServingDef::from_table).collect();
        assert_eq!(defs.len(), 7);
        let t: Vec<(&str, u32)> = FIG11.iter().map(|w| (w.key, w.threshold)).collect();
        assert!(t.contains(&("zipf-256-256", 10)) && t.contains(&("zipf-128-512", 10)));
        assert_eq!(defs.iter().filter(|d| d.threshold == 3).count(), 5);
        assert_eq!(
            ServingDef::table("zipf-512-512").unwrap().paper_midpoint(),
            2.9
        );
        assert_eq!(
            ServingDef::table("zipf-512-128").unwrap().paper_midpoint(),
            16.0
        );
        // BurstGPT's stand-in calibrates on plain Poisson ShareGPT.
        let b = ServingDef::table("burstgpt").unwrap();
        assert_eq!(b.calibration_spec().to_string(), "arrival=poisson;sharegpt");
        assert_eq!(
            ServingDef::table("sharegpt").unwrap().calibration_spec(),
            b.calibration_spec()
        );
    }

    #[test]
    fn thinning_keeps_ends_or_the_middle() {
        let v = [1, 2, 3, 4, 5, 6, 7];
        assert_eq!(thin(&v, None), v.to_vec());
        assert_eq!(thin(&v, Some(9)), v.to_vec());
        assert_eq!(thin(&v, Some(1)), vec![4]);
        assert_eq!(thin(&v, Some(2)), vec![1, 7]);
        assert_eq!(thin(&v, Some(3)), vec![1, 4, 7]);
        assert_eq!(thin(&[1, 2, 3, 4, 5], Some(1)), vec![3]);
    }

    #[test]
    fn rounding_keeps_four_digits() {
        assert_eq!(round_rate(7.0 * 2.713_456), 18.99);
        assert_eq!(round_rate(2.6 * 1.234_567), 3.21);
        assert_eq!(round_rate(123.456_7), 123.5);
    }

    #[test]
    fn the_whole_study_expands() {
        let profiles = vec!["derived".to_string(), "measured".to_string()];
        let serving: Vec<ServingDef> = FIG11.iter().map(ServingDef::from_table).collect();
        let policies: Vec<String> = FIG11_POLICIES.iter().map(|s| s.to_string()).collect();
        let factor = |profile: &str, _key: &str| Ok(if profile == "derived" { 2.0 } else { 3.0 });
        let points = expand(
            &plan(&Figure::ALL, &profiles, &serving, &policies, None),
            &factor,
        )
        .unwrap();
        let count = |f: Figure| points.iter().filter(|p| p.figure == f).count();
        // Per profile and rate set: (5 + 5) × 3 + 5 × 7 × 2 (round-robin on
        // the traces only), 4 × 2, 11 × 2, 5 × 2, 2 × 5 + 3.
        assert_eq!(count(Figure::Fig11), 4 * 100);
        assert_eq!(count(Figure::Fig13), 4 * 8);
        assert_eq!(count(Figure::Fig14), 4 * 22);
        assert_eq!(count(Figure::Fig15), 4 * 10);
        assert_eq!(count(Figure::Ablation), 4 * 13);
        // Rescaled rates are the paper's times the factor.
        let p = points
            .iter()
            .find(|p| {
                p.figure == Figure::Fig11
                    && p.profile == "measured"
                    && p.rate_set == RateSet::Rescaled
                    && p.workload == "zipf-512-128"
                    && p.paper_rate == 22.0
            })
            .unwrap();
        assert_eq!(p.rate, 66.0);
        // T reaches llumnix, the scaling band both Fig 14 policies.
        let l = points
            .iter()
            .find(|p| {
                p.figure == Figure::Fig11 && p.workload == "zipf-256-256" && p.policy == "llumnix"
            })
            .unwrap();
        assert_eq!(
            l.policies.label(),
            "llumnix[migrate-out-below=10,migrate-in-above=10]"
        );
        assert_eq!(l.migrate_threshold, Some(10));
        let rr = points.iter().find(|p| p.policy == "round-robin").unwrap();
        assert!(rr.policies.params.is_empty());
        let f15: Vec<&Point> = points
            .iter()
            .filter(|p| p.figure == Figure::Fig15 && p.policy == "infaas")
            .collect();
        assert!(f15[0]
            .policies
            .label()
            .ends_with("[scale-up-below=5,scale-down-above=55]"));
        assert!(f15.iter().all(|p| p.instances == 8 && p.scaling.is_some()));
        // The ablation's baselines are Fig 11's and Fig 13's simulations.
        let keys: std::collections::HashSet<String> = points
            .iter()
            .filter(|p| p.figure != Figure::Ablation)
            .map(Point::sim_key)
            .collect();
        let new = points
            .iter()
            .filter(|p| p.figure == Figure::Ablation && !keys.contains(&p.sim_key()))
            .count();
        // Round-robin on Zipf 512-512 is the ablation's own.
        assert_eq!(new, 4 * (1 + 2 * 2 + 1));
    }

    #[test]
    fn a_short_study_thins_every_sweep() {
        let profiles = vec!["derived".to_string()];
        let serving: Vec<ServingDef> = FIG11.iter().map(ServingDef::from_table).collect();
        let policies: Vec<String> = FIG11_POLICIES.iter().map(|s| s.to_string()).collect();
        let factor = |_: &str, _: &str| Ok(1.5);
        let points = expand(
            &plan(&Figure::ALL, &profiles, &serving, &policies, Some(1)),
            &factor,
        )
        .unwrap();
        let count = |f: Figure| points.iter().filter(|p| p.figure == f).count();
        assert_eq!(count(Figure::Fig11), 2 * (2 * 3 + 5 * 2));
        assert_eq!(count(Figure::Fig13), 2 * 2);
        assert_eq!(count(Figure::Fig14), 2 * 4);
        assert_eq!(count(Figure::Fig15), 2 * 2);
        assert!(points
            .iter()
            .filter(|p| p.figure == Figure::Fig15)
            .all(|p| p.scale_threshold == Some(45)));
    }

    #[test]
    fn calibrations_cover_what_the_figures_borrow() {
        let serving = vec![ServingDef::parse_arg("poisson;lengths=fixed:128:128@20:40").unwrap()];
        let keys: Vec<String> = calibrated_workloads(&Figure::ALL, &serving)
            .unwrap()
            .into_iter()
            .map(|d| d.key)
            .collect();
        assert_eq!(
            keys,
            ["fixed-128-128", "zipf-128-128", "zipf-512-512", "sharegpt"]
        );
        assert_eq!(serving[0].paper_midpoint(), 30.0);
    }
}
