//! The `llumen-bench sim` subcommand: flags, the workload (`workload.rs`),
//! one simulation per policy, the report's table plus the simulator's
//! counters on stderr, the report's files with `--out`, and (with `--json`)
//! one JSON document on stdout.
//!
//! **Owns**: the flags and this subcommand's output. **Never touches**: the
//! simulation's internals (it calls [`super::simulate`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use llumen_host::policy::PolicyKind;
use serde::Serialize;

use super::{
    load_profile, simulate, MigrationCadence, PolicySet, PolicySource, ScalingConfig, SimConfig,
    SimStats,
};
use crate::record::RequestSpec;
use crate::report::{self, RunMeta, RunResult};
use crate::workload::WorkloadSpec;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Instances serving at the start.
    #[arg(long, default_value_t = 16)]
    instances: u32,
    /// Policy (component name under --policy-dir, a .wasm path, or
    /// builtin:NAME) for every kind of decision; several (comma-separated)
    /// run one after the other on the same workload.
    #[arg(
        long,
        alias = "policies",
        value_delimiter = ',',
        default_value = "llumnix"
    )]
    policy: Vec<String>,
    /// Override the dispatch policy (every run).
    #[arg(long)]
    dispatch_policy: Option<String>,
    /// Override the migration policy (every run).
    #[arg(long)]
    migration_policy: Option<String>,
    /// Override the priority policy (every run).
    #[arg(long)]
    priority_policy: Option<String>,
    /// Override the scaling policy (every run).
    #[arg(long)]
    scaling_policy: Option<String>,
    /// Directory of the policy components (built by scripts/build-policies.sh).
    #[arg(long, env = "LLUMEN_POLICY_DIR", default_value = "target/policies")]
    policy_dir: PathBuf,
    /// Workload spec (see workload.rs), e.g. `poisson:rate=32;lengths=fixed:128:128`,
    /// `gamma:4;zipf:128:128;rate=26`, `sharegpt;rate=7`, `azure`.
    #[arg(long, default_value = "poisson:rate=32;lengths=fixed:128:128")]
    workload: String,
    /// Lengths (`fixed:IN:OUT`, `zipf:IN:OUT`, `sharegpt`, `azure-conv`,
    /// `trace:FILE`, …) instead of --workload, with --arrival and --rate.
    #[arg(long, conflicts_with = "workload")]
    lengths: Option<String>,
    /// Arrivals with --lengths: `poisson` or `gamma:CV` (default: Poisson,
    /// or a trace's own timestamps).
    #[arg(long, requires = "lengths")]
    arrival: Option<String>,
    /// Override the workload's rate (requests/s).
    #[arg(long)]
    rate: Option<f64>,
    /// Requests in the workload.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Seed of the workload (and of the requests' samplers).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fraction of high-priority requests.
    #[arg(long, alias = "priority-fraction", default_value_t = 0.0)]
    high_priority_fraction: f64,
    /// Latency profile (JSON); default: the shipped LLaMA-7B-on-A10 stand-in
    /// (derived, not measured).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// No migration round at all.
    #[arg(long)]
    no_migration: bool,
    /// Run the migration round about every N steps per instance (the
    /// Llumnix artifact's cadence, 4; the server's default too); 0: every
    /// --migration-period-ms instead.
    #[arg(long, default_value_t = 4)]
    migration_every_steps: u32,
    /// Period of the migration round with --migration-every-steps 0,
    /// virtual milliseconds.
    #[arg(long, default_value_t = 100.0)]
    migration_period_ms: f64,
    /// A parameter of every run's policies, NAME=VALUE (repeatable; e.g.
    /// migrate-out-below=10, select=sjf; `llumen policy inspect FILE` lists
    /// them). A policy that does not take it stops the run with an error.
    #[arg(long = "policy-param", value_name = "NAME=VALUE")]
    policy_params: Vec<String>,
    /// Auto-scaling: the scaling policy decides every --scaling-period-s.
    #[arg(long)]
    scaling: bool,
    /// Auto-scaling between MIN and MAX instances (= --scaling
    /// --min-instances MIN --max-instances MAX).
    #[arg(long, value_name = "MIN:MAX", conflicts_with_all = ["min_instances", "max_instances"])]
    autoscale: Option<String>,
    /// Fewest serving instances the scaling round keeps.
    #[arg(long, default_value_t = 1)]
    min_instances: u32,
    /// Most instances (starting and draining included); default: the larger
    /// of --instances and 16.
    #[arg(long)]
    max_instances: Option<u32>,
    /// Virtual seconds from a scale-up decision until the instance serves.
    #[arg(long, default_value_t = 5.0)]
    startup_delay_s: f64,
    /// Period of the scaling round, virtual seconds.
    #[arg(long, default_value_t = 10.0)]
    scaling_period_s: f64,
    /// Virtual seconds before the first scaling round (plus a period; the
    /// artifact waits 100 s).
    #[arg(long, default_value_t = 100.0)]
    scaling_first_check_s: f64,
    /// Period of the fleet samples, virtual seconds.
    #[arg(long, default_value_t = 1.0)]
    sample_period_s: f64,
    /// Include every request's record in the JSON output (and results.json).
    #[arg(long)]
    records: bool,
    /// Also write results.json, timing.json, results.csv and the plots here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

fn secs_to_us(s: f64, what: &str) -> Result<u64> {
    if !(s.is_finite() && s >= 0.0) {
        bail!("{what} must be a non-negative number of seconds, got {s}");
    }
    Ok((s * 1e6).round() as u64)
}

fn workload(args: &Args) -> Result<(WorkloadSpec, Vec<RequestSpec>)> {
    let mut spec = match &args.lengths {
        Some(lengths) => WorkloadSpec::from_parts(args.arrival.as_deref(), lengths, None)
            .with_context(|| format!("--lengths {lengths:?}"))?,
        None => WorkloadSpec::parse(&args.workload)
            .with_context(|| format!("--workload {:?}", args.workload))?,
    };
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a positive number of requests/s, got {rate}");
        }
        spec = spec.with_rate(rate);
    }
    let requests = spec.generate(args.requests, args.seed, args.high_priority_fraction)?;
    Ok((spec, requests))
}

fn config(args: &Args, policy: &str) -> Result<SimConfig> {
    let profile = load_profile(args.profile.as_deref())?;
    let mut policies = PolicySet::named(policy, &args.policy_dir);
    for (kind, over) in [
        (PolicyKind::Dispatch, &args.dispatch_policy),
        (PolicyKind::Migration, &args.migration_policy),
        (PolicyKind::Priority, &args.priority_policy),
        (PolicyKind::Scaling, &args.scaling_policy),
    ] {
        if let Some(spec) = over {
            *policies.get_mut(kind) = PolicySource::parse(spec, &args.policy_dir);
        }
    }
    let policies = policies.with_params(args.policy_params.iter().map(String::as_str))?;
    let mut c = SimConfig::new(args.instances, profile, policies);
    c.migration = !args.no_migration;
    c.migration_cadence = MigrationCadence::every_steps(args.migration_every_steps);
    c.migration_period_us = secs_to_us(args.migration_period_ms / 1e3, "--migration-period-ms")?;
    c.sample_period_us = secs_to_us(args.sample_period_s, "--sample-period-s")?;
    c.seed = args.seed;
    let bounds = match &args.autoscale {
        Some(range) => {
            let parsed = range
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
            let Some((min, max)) = parsed else {
                bail!("--autoscale {range:?}: expected MIN:MAX, e.g. 1:16");
            };
            Some((min, max))
        }
        None if args.scaling => Some((
            args.min_instances,
            args.max_instances.unwrap_or(args.instances.max(16)),
        )),
        None => None,
    };
    if let Some((min, max)) = bounds {
        if args.instances > max || args.instances < min {
            bail!(
                "--instances {} is outside the scaling bounds {min}..={max}",
                args.instances,
            );
        }
        c.scaling = Some(ScalingConfig {
            min_instances: min,
            max_instances: max,
            startup_delay_us: secs_to_us(args.startup_delay_s, "--startup-delay-s")?,
            period_us: secs_to_us(args.scaling_period_s, "--scaling-period-s")?,
            first_check_us: secs_to_us(args.scaling_first_check_s, "--scaling-first-check-s")?,
        });
    }
    Ok(c)
}

/// One policy's run in the JSON document: the report's result (summary
/// per class, fleet samples, wall-clock timing, records with `--records`)
/// and the simulator's own counters.
#[derive(Serialize)]
struct SimRun {
    #[serde(flatten)]
    result: RunResult,
    sim: SimStats,
}

#[derive(Serialize)]
struct Output<'a> {
    workload: &'a str,
    requests: usize,
    seed: u64,
    high_priority_fraction: f64,
    profile: String,
    runs: Vec<SimRun>,
    wall_seconds: f64,
}

/// The simulator's lines under the report's table.
fn print_stats(policy: &str, st: &SimStats) {
    eprintln!(
        "{policy}: {:.1} simulated s in {:.3} wall s = {:.0}x real time ({:.0}x with the {:.3} s set-up); {} steps, {} events, {} snapshots",
        st.simulated_seconds,
        st.wall_seconds,
        st.speed_x,
        st.speed_x_with_setup,
        st.setup_seconds,
        st.steps,
        st.events,
        st.snapshots,
    );
    if st.migrations_started > 0 {
        let mean_downtime_ms = if st.migrations_committed > 0 {
            st.migration_downtime_us_total as f64 / st.migrations_committed as f64 / 1e3
        } else {
            0.0
        };
        eprintln!(
            "  migrations: {} started, {} committed (downtime mean {:.1} ms, max {:.1} ms), {} aborted {:?}, {} not started",
            st.migrations_started,
            st.migrations_committed,
            mean_downtime_ms,
            st.migration_downtime_us_max as f64 / 1e3,
            st.migrations_aborted,
            st.migration_abort_reasons,
            st.migrations_not_started,
        );
    }
    if st.scale_ups + st.drains > 0 {
        eprintln!(
            "  scaling: {} scale-ups, {} drains, {} removals, at most {} instances",
            st.scale_ups, st.drains, st.removals, st.max_instances
        );
    }
    if st.policy_failures > 0 {
        eprintln!(
            "  WARNING: {} policy calls failed and were answered by a fallback (first: {})",
            st.policy_failures,
            st.first_policy_failure.as_deref().unwrap_or("?")
        );
    }
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let (spec, workload) = workload(args)?;
    let rate = spec
        .rate()
        .unwrap_or_else(|| crate::workload::mean_rate(&workload));
    let mut runs = Vec::new();
    let mut profile_label = String::new();
    for policy in &args.policy {
        let c = config(args, policy)?;
        profile_label = c.profile.label();
        let outcome = simulate(&c, &workload).with_context(|| format!("simulating {policy}"))?;
        let meta = RunMeta {
            policy: c.policies.label(),
            workload: spec.name(),
            rate,
            seed: args.seed,
            instances: c.instances,
        };
        let mut result = RunResult::new(meta, &outcome.records, &outcome.fleet);
        if args.records {
            result = result.with_requests(&outcome.records);
        }
        runs.push(SimRun {
            result,
            sim: outcome.stats,
        });
    }
    let results: Vec<RunResult> = runs.iter().map(|r| r.result.clone()).collect();
    report::print_table(&results);
    for r in &runs {
        print_stats(&r.result.policy, &r.sim);
    }
    if let Some(dir) = &args.out {
        let written = report::write_all(dir, &results)
            .with_context(|| format!("writing the report into {}", dir.display()))?;
        eprintln!("wrote {} files into {}", written.len(), dir.display());
    }
    if args.json {
        let out = Output {
            workload: &args.workload,
            requests: workload.len(),
            seed: args.seed,
            high_priority_fraction: args.high_priority_fraction,
            profile: profile_label,
            runs,
            wall_seconds: started.elapsed().as_secs_f64(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
