//! `llumen-bench compare`: the Llumnix study in simulation — sweeps of rates
//! × policies × workloads through the simulator, with tables, results,
//! plots and a claim file per experiment.
//!
//! **Owns**: the study's definition (which workloads, rates, policies and
//! fleet settings make up the serving, priority and auto-scaling
//! experiments; overridable from the command line), running its points on
//! worker threads (each point is an independent, deterministic simulation;
//! results are kept in the study's order whatever finishes first), the
//! progress line, and the per-experiment output directories.
//! **Never touches**: the simulator's internals, the metrics and file
//! formats (the report's), the workload grammar (the workloads').
//!
//! The priority experiment's baseline, `llumnix-base`, is llumnix with the
//! requests' priorities withheld from the system (every request is sent as
//! normal; the records keep each request's class so that the classes are
//! measured the same way): Llumnix's own baseline is its scheduler without
//! priority support.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use crate::report::{self, RunMeta, RunResult};
use crate::sim::{self, PolicySet, ScalingConfig, SimConfig};
use crate::workload::WorkloadSpec;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Experiments to run: serving, priority, scaling.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "serving,priority,scaling"
    )]
    experiments: Vec<String>,
    /// Requests per point (the paper: 10,000).
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Instances (serving and priority experiments; the paper: 16).
    #[arg(long, default_value_t = 16)]
    instances: u32,
    /// Policies of the serving experiment.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "llumnix,infaas,round-robin"
    )]
    policies: Vec<String>,
    /// Serving workloads with their rates, `SPEC@R1:R2:…` (repeatable);
    /// default: the paper's four (fixed 128/128, Zipf 256/256, ShareGPT,
    /// the Azure conversation trace rescaled).
    #[arg(long)]
    workload: Vec<String>,
    /// Rate of the priority experiment (the paper: 26 req/s on its fleet;
    /// here a rate at which the stand-in profile's 16 instances are busy).
    #[arg(long, default_value_t = 50.0)]
    priority_rate: f64,
    /// Policy components directory.
    #[arg(long, env = "LLUMEN_POLICY_DIR", default_value = "target/policies")]
    policy_dir: PathBuf,
    /// Latency profile (default: the shipped LLaMA-7B-on-A10 stand-in).
    #[arg(long)]
    profile: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Output directory (one subdirectory per experiment).
    #[arg(long, default_value = "target/bench/compare")]
    out: PathBuf,
    /// Print one JSON document (every run's summary) on stdout.
    #[arg(long)]
    json: bool,
}

/// One simulation of the study.
#[derive(Clone)]
struct Point {
    experiment: &'static str,
    spec: WorkloadSpec,
    rate: f64,
    label: String,
    policies: PolicySet,
    instances: u32,
    high_priority_fraction: f64,
    /// Send every request as normal priority (the `-base` baselines).
    withhold_priorities: bool,
    scaling: Option<ScalingConfig>,
}

/// The paper's serving workloads. The rates are not the paper's (32–38
/// req/s for 128/128 saturated its measured A10 profile but leave the
/// shipped stand-in profile idle): like the paper's, they run from a busy
/// fleet into saturation of this profile's 16 instances.
const SERVING: [(&str, &[f64]); 4] = [
    ("poisson;lengths=fixed:128:128", &[60.0, 90.0, 110.0, 120.0]),
    ("poisson;lengths=zipf:256:256", &[6.0, 8.0, 10.0, 12.0]),
    ("poisson;lengths=sharegpt", &[15.0, 20.0, 25.0, 30.0]),
    ("azure", &[6.0, 8.0, 10.0, 12.0]),
];

fn parse_workload_arg(s: &str) -> Result<(WorkloadSpec, Vec<f64>)> {
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
    Ok((spec, rates))
}

fn points(args: &Args) -> Result<Vec<Point>> {
    let named = |p: &str| PolicySet::named(p, &args.policy_dir);
    let mut out = Vec::new();
    for experiment in &args.experiments {
        match experiment.as_str() {
            "serving" => {
                let workloads: Vec<(WorkloadSpec, Vec<f64>)> = if args.workload.is_empty() {
                    SERVING
                        .iter()
                        .map(|(s, r)| {
                            Ok((
                                WorkloadSpec::parse(s).map_err(|e| anyhow!("{e}"))?,
                                r.to_vec(),
                            ))
                        })
                        .collect::<Result<_>>()?
                } else {
                    args.workload
                        .iter()
                        .map(|w| parse_workload_arg(w))
                        .collect::<Result<_>>()?
                };
                for (spec, rates) in workloads {
                    for &rate in &rates {
                        for p in &args.policies {
                            out.push(Point {
                                experiment: "serving",
                                spec: spec.clone(),
                                rate,
                                label: p.clone(),
                                policies: named(p),
                                instances: args.instances,
                                high_priority_fraction: 0.0,
                                withhold_priorities: false,
                                scaling: None,
                            });
                        }
                    }
                }
            }
            "priority" => {
                // 16 instances, Zipf 128/128, Gamma CV 2–8, 10% high
                // priority: llumnix with and without priorities.
                let rate = args.priority_rate;
                for cv in [2.0, 4.0, 6.0, 8.0] {
                    let spec = WorkloadSpec::parse(&format!(
                        "gamma:cv={cv};lengths=zipf:128:128;rate={rate}"
                    ))
                    .map_err(|e| anyhow!("{e}"))?;
                    for (label, withhold) in [("llumnix", false), ("llumnix-base", true)] {
                        out.push(Point {
                            experiment: "priority",
                            spec: spec.clone(),
                            rate,
                            label: label.into(),
                            policies: named("llumnix"),
                            instances: args.instances,
                            high_priority_fraction: 0.1,
                            withhold_priorities: withhold,
                            scaling: None,
                        });
                    }
                }
            }
            "scaling" => {
                // 512/512, Poisson 2–3 req/s and Gamma CV 2–6 at 2.5 req/s;
                // 1–16 instances, 10 s rounds, 5 s start-up: llumnix vs
                // INFaaS++ (both scale on the same freeness band).
                let mut specs = Vec::new();
                for rate in [2.0, 2.5, 3.0] {
                    specs.push((format!("poisson;lengths=fixed:512:512;rate={rate}"), rate));
                }
                for cv in [2.0, 4.0, 6.0] {
                    specs.push((format!("gamma:cv={cv};lengths=fixed:512:512;rate=2.5"), 2.5));
                }
                for (s, rate) in specs {
                    let spec = WorkloadSpec::parse(&s).map_err(|e| anyhow!("{e}"))?;
                    for p in ["llumnix", "infaas"] {
                        out.push(Point {
                            experiment: "scaling",
                            spec: spec.clone(),
                            rate,
                            label: p.into(),
                            policies: named(p),
                            instances: 1,
                            high_priority_fraction: 0.0,
                            withhold_priorities: false,
                            scaling: Some(ScalingConfig::default()),
                        });
                    }
                }
            }
            other => bail!("unknown experiment {other:?} (serving, priority, scaling)"),
        }
    }
    Ok(out)
}

fn run_point(
    point: &Point,
    args: &Args,
    profile: &Arc<llumen_engine::LatencyProfile>,
) -> Result<(RunResult, sim::SimStats)> {
    let spec = point.spec.with_rate(point.rate);
    let mut workload = spec
        .generate(args.requests, args.seed, point.high_priority_fraction)
        .map_err(|e| anyhow!("{}: {e}", point.spec))?;
    let classes: Vec<bool> = workload.iter().map(|r| r.high_priority).collect();
    if point.withhold_priorities {
        for r in &mut workload {
            r.high_priority = false;
        }
    }
    let mut config = SimConfig::new(point.instances, profile.clone(), point.policies.clone());
    config.seed = args.seed;
    config.scaling = point.scaling.clone();
    let outcome = sim::simulate(&config, &workload)
        .with_context(|| format!("{} {} at {} req/s", point.label, point.spec, point.rate))?;
    let mut records = outcome.records;
    for (r, &high) in records.iter_mut().zip(&classes) {
        r.high_priority = high;
    }
    let result = RunResult::new(
        RunMeta {
            policy: point.label.clone(),
            workload: point.spec.name(),
            rate: point.rate,
            seed: args.seed,
            instances: point.instances,
        },
        &records,
        &outcome.fleet,
    );
    let result = if point.scaling.is_some() {
        result
    } else {
        result.without_samples()
    };
    Ok((result, outcome.stats))
}

pub fn run(args: &Args) -> Result<()> {
    let profile = sim::load_profile(args.profile.as_deref())?;
    let points = points(args)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, points.len().max(1));
    eprintln!(
        "compare: {} simulations ({} requests each) on {threads} threads",
        points.len(),
        args.requests
    );
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    // One slot per point: its simulation's result once a thread ran it.
    type Slot = Mutex<Option<Result<(RunResult, sim::SimStats)>>>;
    let slots: Vec<Slot> = points.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(point) = points.get(i) else { return };
                let result = run_point(point, args, &profile);
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                let k = done.fetch_add(1, Ordering::Relaxed) + 1;
                let elapsed = started.elapsed().as_secs_f64();
                let eta = elapsed / k as f64 * (points.len() - k) as f64;
                eprint!(
                    "\r[{k:>3}/{}] {:>6.1} s elapsed, ~{:>5.0} s left  ",
                    points.len(),
                    elapsed,
                    eta
                );
            });
        }
    });
    eprintln!();
    let wall = started.elapsed().as_secs_f64();
    let mut by_experiment: Vec<(&'static str, Vec<RunResult>)> = Vec::new();
    let mut simulated = 0.0;
    let mut sim_wall = 0.0;
    for (point, slot) in points.iter().zip(slots) {
        let (result, stats) = slot
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .expect("every point ran")?;
        if stats.policy_failures > 0 {
            eprintln!(
                "warning: {} {}: {} policy calls fell back ({})",
                point.label,
                point.spec,
                stats.policy_failures,
                stats.first_policy_failure.as_deref().unwrap_or("")
            );
        }
        simulated += stats.simulated_seconds;
        sim_wall += stats.wall_seconds + stats.setup_seconds;
        match by_experiment
            .iter_mut()
            .find(|(e, _)| *e == point.experiment)
        {
            Some((_, v)) => v.push(result),
            None => by_experiment.push((point.experiment, vec![result])),
        }
    }
    for (experiment, results) in &by_experiment {
        let dir = args.out.join(experiment);
        // This run's files only (a previous sweep's rates would linger).
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        eprintln!("\n== {experiment} ==");
        report::print_table(results);
        report::write_all(&dir, results).with_context(|| format!("writing {}", dir.display()))?;
        report::write_claims(results, &dir.join("llumnix.claim"))?;
        eprintln!(
            "{experiment}: results, plots and llumnix.claim in {}",
            dir.display()
        );
    }
    eprintln!(
        "\ncompare: {} simulations, {:.0} simulated seconds in {:.1} s wall ({:.0}x real time over the whole study; {:.0}x per simulation thread)",
        points.len(),
        simulated,
        wall,
        simulated / wall.max(1e-9),
        simulated / sim_wall.max(1e-9)
    );
    if args.json {
        let all: Vec<&RunResult> = by_experiment.iter().flat_map(|(_, v)| v).collect();
        println!(
            "{}",
            serde_json::json!({
                "points": points.len(),
                "requests_per_point": args.requests,
                "wall_seconds": wall,
                "simulated_seconds": simulated,
                "runs": all,
            })
        );
    }
    Ok(())
}
