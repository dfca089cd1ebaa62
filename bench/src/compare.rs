//! `llumen-bench compare`: the whole Llumnix study in simulation — Figs
//! 11, 13, 14 and 15 and an ablation, on every latency profile asked for,
//! at the paper's rates and at rates rescaled to each profile's capacity —
//! and its results page (`RESULTS.md`).
//!
//! **Owns**: the command line, profiles by name, the calibrations of the
//! rescaled rate set (through [`crate::calibrate`]), running simulations on
//! worker threads ([`run_point`] is the one helper that runs a point;
//! every point is an independent, deterministic simulation, identical
//! points run once, results keep the study's order whatever finishes
//! first), a snapshot of the policy components the study runs
//! (`OUT/policies/`, so that a rebuild of `--policy-dir` while the study runs
//! cannot mix two builds; their sha256 goes on the results page), the
//! progress line and wall time, the output directories
//! (`OUT/PROFILE/RATE_SET/FIGURE/`), `OUT/study.json`, and `--json`.
//! **Never touches**: the study's tables (`study.rs`), the simulator's
//! internals, the metrics, plots and file formats (`report.rs`), the
//! results page's content (`results_md.rs`), the workload grammar.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use llumen_engine::LatencyProfile;
use serde::Serialize;

use crate::calibrate::{self, Capacity};
use crate::report::{self, RunMeta, RunResult, Summary};
use crate::results_md::{self, Migration, Page, PolicyInfo, Row};
use crate::sim::{self, PolicySet, SimConfig, SimStats};
use crate::study::{self, Figure, Plan, Point, RateSet, ServingDef};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Figures to run: fig11 (serving), fig13 (priorities), fig14
    /// (auto-scaling), fig15 (scaling thresholds), ablation, or all. The
    /// first wave's names stay: serving = fig11, priority = fig13,
    /// scaling = fig14.
    #[arg(long, alias = "figures", value_delimiter = ',', default_value = "all")]
    experiments: Vec<String>,
    /// Requests per point (the paper: 10,000; --quick: 200).
    #[arg(long)]
    requests: Option<usize>,
    /// Instances of Figs 11 and 13 (the paper: 16; Figs 14–15 start from 8
    /// within 1–16).
    #[arg(long, default_value_t = 16)]
    instances: u32,
    /// Fig 11's policies.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "llumnix,infaas,round-robin"
    )]
    policies: Vec<String>,
    /// Run round-robin on every Fig 11 workload (the paper, and the
    /// default: on the two traces only).
    #[arg(long)]
    round_robin_everywhere: bool,
    /// Fig 11's workloads instead of the paper's seven, `SPEC@R1:R2:…`
    /// (repeatable): the rates stand for paper rates (the rescaled set
    /// moves their midpoint to this profile's capacity), T = 3.
    #[arg(long)]
    workload: Vec<String>,
    /// Fig 13's rate in the paper set (the paper: 26 req/s).
    #[arg(long, default_value_t = study::FIG13.paper_rate)]
    priority_rate: f64,
    /// Latency profiles, comma-separated: `derived` (the shipped roofline
    /// stand-in), `measured` (the shipped measured-basis profile) or JSON
    /// files.
    #[arg(long, value_delimiter = ',', default_value = "derived,measured")]
    profiles: Vec<String>,
    /// One profile file instead of --profiles.
    #[arg(long, conflicts_with = "profiles")]
    profile: Option<PathBuf>,
    /// Rate sets: `paper` (the paper's rates) and `rescaled` (the same
    /// load relative to each profile's measured capacity).
    #[arg(long, value_delimiter = ',', default_value = "paper,rescaled")]
    rate_sets: Vec<String>,
    /// Keep at most N values of every sweep (rates, CVs, thresholds),
    /// evenly spread with both ends; 1 keeps the middle one.
    #[arg(long)]
    max_sweep: Option<usize>,
    /// Requests per calibration probe (default: --requests).
    #[arg(long)]
    calibration_requests: Option<usize>,
    /// Probes per calibration (bisection steps; 8 finds the capacity to
    /// about 1%).
    #[arg(long)]
    calibration_steps: Option<u32>,
    /// Short mode for CI: 200 requests per point, the middle of every
    /// sweep, 3 calibration probes (explicit flags win).
    #[arg(long)]
    quick: bool,
    /// Every point where Llumnix loses to INFaaS++ by more than 5% is run
    /// again with this many further seeds (both policies), and the page
    /// gives the change averaged over all of its seeds: one seed's P99 at
    /// a light load can turn on a handful of migrations. 0: no re-runs.
    #[arg(long, default_value_t = 2)]
    confirm_seeds: u64,
    /// Policy components directory.
    #[arg(long, env = "LLUMEN_POLICY_DIR", default_value = "target/policies")]
    policy_dir: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Output directory: PROFILE/RATE_SET/FIGURE/ per group (table,
    /// results.json, CSV, plots, llumnix.claim), study.json, RESULTS.md
    /// and its plots under results/.
    #[arg(long, default_value = "target/bench/compare")]
    out: PathBuf,
    /// Also write the results page here (e.g. docs/RESULTS.md), with its
    /// plots and CSV in `results/` beside it.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Skip the per-workload plots of the group directories (the results
    /// page's plots are drawn still).
    #[arg(long)]
    no_point_plots: bool,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

/// A latency profile by name.
struct Profile {
    name: String,
    what: String,
    profile: Arc<LatencyProfile>,
}

fn load_profiles(args: &Args) -> Result<Vec<Profile>> {
    let specs: Vec<String> = match &args.profile {
        Some(p) => vec![p.display().to_string()],
        None => args.profiles.clone(),
    };
    let mut out: Vec<Profile> = Vec::new();
    for s in specs {
        let (name, what, profile) = match s.as_str() {
            "derived" => (
                "derived".to_string(),
                "engine/profiles/llama-7b-a10-derived.json (LLaMA-7B on an A10, roofline stand-in)"
                    .to_string(),
                LatencyProfile::shipped_llama7b_a10_derived(),
            ),
            "measured" => (
                "measured".to_string(),
                "engine/profiles/llama-7b-a10-measured.json (LLaMA-7B on an A10, from vidur's measured A40 operator times)"
                    .to_string(),
                LatencyProfile::shipped_llama7b_a10_measured(),
            ),
            path => {
                let p = Path::new(path);
                let name = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.to_string());
                let profile = LatencyProfile::from_path(p)
                    .with_context(|| format!("loading the latency profile {path}"))?;
                (name, path.to_string(), profile)
            }
        };
        if out.iter().any(|o| o.name == name) {
            bail!("profile {name:?} named twice");
        }
        out.push(Profile {
            name,
            what,
            profile: Arc::new(profile),
        });
    }
    if out.is_empty() {
        bail!("no profile to run");
    }
    Ok(out)
}

/// Copies the components named in `names` (plain names; paths and
/// `builtin:` sources stay where they are) from `dir` into `into`, and
/// says what each is. Every simulation then loads these bytes.
fn snapshot_policies(dir: &Path, into: &Path, names: &[&str]) -> Result<Vec<PolicyInfo>> {
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    let runtime = llumen_host::policy::PolicyRuntime::new(Default::default(), "llumnix")
        .context("creating a policy runtime to identify the components")?;
    let mut out = Vec::new();
    for name in names {
        if name.contains('/') || name.ends_with(".wasm") || name.starts_with("builtin:") {
            continue;
        }
        let file = format!("{name}.wasm");
        let from = dir.join(&file);
        if !from.is_file() {
            bail!(
                "{}: no such policy component; build them with scripts/build-policies.sh \
                 (or point --policy-dir / LLUMEN_POLICY_DIR at them)",
                from.display()
            );
        }
        let to = into.join(&file);
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        let c = runtime
            .compile_file(&to)
            .with_context(|| format!("compiling {}", to.display()))?;
        out.push(PolicyInfo {
            file,
            name: c.name.to_string(),
            version: c.version.clone(),
            sha256: c.sha256.to_string(),
        });
    }
    Ok(out)
}

/// The settings every point shares.
struct Setup {
    seed: u64,
    threads: usize,
}

/// What one simulation produced.
pub struct PointRun {
    pub result: RunResult,
    pub stats: SimStats,
}

/// Runs one point: its workload at its rate, `requests` of them, through
/// a simulated fleet of its policies on `profile`.
pub fn run_point(
    point: &Point,
    profile: &Arc<LatencyProfile>,
    requests: usize,
    seed: u64,
) -> Result<PointRun> {
    let spec = point.spec.with_rate(point.rate);
    let mut workload = spec
        .generate(requests, seed, point.high_priority_fraction)
        .map_err(|e| anyhow!("{spec}: {e}"))?;
    let classes: Vec<bool> = workload.iter().map(|r| r.high_priority).collect();
    if point.withhold_priorities {
        for r in &mut workload {
            r.high_priority = false;
        }
    }
    let mut config = SimConfig::new(point.instances, profile.clone(), point.policies.clone());
    config.seed = seed;
    config.scaling = point.scaling.clone();
    let outcome = sim::simulate(&config, &workload).with_context(|| {
        format!(
            "{} ({}) on {} at {} req/s, profile {}",
            point.policy,
            point.policies.label(),
            spec,
            point.rate,
            point.profile
        )
    })?;
    let mut records = outcome.records;
    for (r, &high) in records.iter_mut().zip(&classes) {
        r.high_priority = high;
    }
    let result = RunResult::new(
        RunMeta {
            policy: point.policy.clone(),
            workload: point.workload.clone(),
            rate: point.rate,
            seed,
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
    Ok(PointRun {
        result,
        stats: outcome.stats,
    })
}

/// `f` over `items` on `threads` threads, results in the items' order;
/// a progress line on stderr.
fn parallel_map<T: Sync, R: Send>(
    what: &str,
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                let r = f(item);
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                let k = done.fetch_add(1, Ordering::Relaxed) + 1;
                let elapsed = started.elapsed().as_secs_f64();
                let eta = elapsed / k as f64 * (items.len() - k) as f64;
                eprint!(
                    "\r{what}: [{k:>4}/{}] {elapsed:>6.1} s elapsed, ~{eta:>5.0} s left  ",
                    items.len()
                );
            });
        }
    });
    eprintln!();
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item ran")
        })
        .collect()
}

/// The calibrations the rescaled set needs: per profile, per distinct
/// calibration workload (ShareGPT and BurstGPT's stand-in share one).
fn calibrate_all(
    profiles: &[Profile],
    workloads: &[ServingDef],
    args: &Args,
    policy_dir: &Path,
    setup: &Setup,
    requests: usize,
    steps: u32,
) -> Result<Vec<Capacity>> {
    let mut jobs: Vec<(&Profile, &ServingDef)> = Vec::new();
    for p in profiles {
        for w in workloads {
            let spec = w.calibration_spec().to_string();
            if !jobs
                .iter()
                .any(|(q, v)| q.name == p.name && v.calibration_spec().to_string() == spec)
            {
                jobs.push((p, w));
            }
        }
    }
    eprintln!(
        "compare: calibrating {} capacities ({steps} probes of {requests} requests each)",
        jobs.len()
    );
    let results = parallel_map("calibration", &jobs, setup.threads, |(p, w)| {
        let anchor = w.paper_midpoint();
        let spec = w.calibration_spec();
        let (capacity, bracketed, probes) = calibrate::find_onset(anchor, steps, |rate| {
            let point = Point {
                figure: Figure::Fig11,
                profile: p.name.clone(),
                rate_set: RateSet::Rescaled,
                workload: w.key.clone(),
                spec: spec.clone(),
                paper_rate: anchor,
                rate,
                policy: "infaas".into(),
                policies: PolicySet::named("infaas", policy_dir),
                instances: args.instances,
                high_priority_fraction: 0.0,
                withhold_priorities: false,
                scaling: None,
                migrate_threshold: None,
                scale_threshold: None,
                real_trace: w.real_trace,
                x: rate,
            };
            let run = run_point(&point, &p.profile, requests, setup.seed)?;
            Ok(run.result.summary.all.prefill_latency.mean_ms)
        })?;
        Ok(Capacity {
            profile: p.name.clone(),
            spec: spec.to_string(),
            anchor_rps: anchor,
            capacity_rps: capacity,
            bracketed,
            requests,
            probes,
        })
    });
    let caps = results.into_iter().collect::<Result<Vec<_>>>()?;
    for c in &caps {
        eprintln!(
            "  {:<10} {:<40} capacity {:>8.3} req/s (paper midpoint {:.3}){}",
            c.profile,
            c.spec,
            c.capacity_rps,
            c.anchor_rps,
            if c.bracketed {
                ""
            } else {
                "  NOT BRACKETED: a bound only"
            }
        );
    }
    Ok(caps)
}

/// One run in `study.json` and `--json`: the report's result (without
/// fleet samples) and where it sits in the study.
#[derive(Serialize)]
struct StudyRun<'a> {
    figure: &'static str,
    profile: &'a str,
    rate_set: &'static str,
    paper_rate: f64,
    x: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    migrate_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale_threshold: Option<u32>,
    policy_params: String,
    migration: Migration,
    #[serde(flatten)]
    result: RunResult,
}

fn study_runs<'a>(rows: &[Row<'a>]) -> Vec<StudyRun<'a>> {
    rows.iter()
        .map(|r| StudyRun {
            figure: r.point.figure.name(),
            profile: &r.point.profile,
            rate_set: r.point.rate_set.name(),
            paper_rate: r.point.paper_rate,
            x: r.point.x,
            migrate_threshold: r.point.migrate_threshold,
            scale_threshold: r.point.scale_threshold,
            policy_params: r.point.policies.label(),
            migration: Migration::of(r.stats),
            result: RunResult {
                timing: None,
                samples: Vec::new(),
                ..r.run.clone()
            },
        })
        .collect()
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let requests = args
        .requests
        .unwrap_or(if args.quick { 200 } else { 10_000 });
    let max_sweep = args.max_sweep.or(args.quick.then_some(1));
    let calibration_requests = args.calibration_requests.unwrap_or(requests);
    let calibration_steps = args
        .calibration_steps
        .unwrap_or(if args.quick { 3 } else { 8 });
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let setup = Setup {
        seed: args.seed,
        threads,
    };
    let mut figures: Vec<Figure> = Vec::new();
    for e in &args.experiments {
        let fs: Vec<Figure> = if e == "all" {
            Figure::ALL.to_vec()
        } else {
            vec![Figure::parse(e).ok_or_else(|| {
                anyhow!("unknown figure {e:?} (fig11, fig13, fig14, fig15, ablation, all; serving, priority, scaling)")
            })?]
        };
        for f in fs {
            if !figures.contains(&f) {
                figures.push(f);
            }
        }
    }
    figures.sort();
    let mut rate_sets: Vec<RateSet> = Vec::new();
    for s in &args.rate_sets {
        let r =
            RateSet::parse(s).ok_or_else(|| anyhow!("unknown rate set {s:?} (paper, rescaled)"))?;
        if !rate_sets.contains(&r) {
            rate_sets.push(r);
        }
    }
    rate_sets.sort();
    let profiles = load_profiles(args)?;
    let serving: Vec<ServingDef> = if args.workload.is_empty() {
        study::FIG11.iter().map(ServingDef::from_table).collect()
    } else {
        args.workload
            .iter()
            .map(|w| ServingDef::parse_arg(w))
            .collect::<Result<_>>()?
    };

    let mut names: Vec<&str> = vec!["llumnix", "infaas"];
    for p in &args.policies {
        if !names.contains(&p.as_str()) {
            names.push(p);
        }
    }
    let policy_dir = args.out.join("policies");
    let policy_info = snapshot_policies(&args.policy_dir, &policy_dir, &names)?;
    for p in &policy_info {
        eprintln!(
            "compare: {} = {} {} sha256:{}",
            p.file, p.name, p.version, p.sha256
        );
    }

    let capacities = if rate_sets.contains(&RateSet::Rescaled) {
        let need = study::calibrated_workloads(&figures, &serving)?;
        calibrate_all(
            &profiles,
            &need,
            args,
            &policy_dir,
            &setup,
            calibration_requests,
            calibration_steps,
        )?
    } else {
        Vec::new()
    };
    let calibrated = |profile: &str, key: &str| -> Result<f64> {
        let def = serving
            .iter()
            .find(|d| d.key == key)
            .cloned()
            .or_else(|| ServingDef::table(key))
            .ok_or_else(|| anyhow!("no workload {key} to rescale by"))?;
        let spec = def.calibration_spec().to_string();
        let c = capacities
            .iter()
            .find(|c| c.profile == profile && c.spec == spec)
            .ok_or_else(|| anyhow!("no calibration of {spec} on {profile}"))?;
        Ok(c.capacity_rps / def.paper_midpoint())
    };
    let profile_names: Vec<String> = profiles.iter().map(|p| p.name.clone()).collect();
    let plan = Plan {
        figures: &figures,
        profiles: &profile_names,
        rate_sets: &rate_sets,
        serving: &serving,
        serving_policies: &args.policies,
        round_robin_everywhere: args.round_robin_everywhere,
        instances: args.instances,
        priority_rate: args.priority_rate,
        max_sweep,
        policy_dir: &policy_dir,
    };
    let points = study::expand(&plan, &calibrated)?;

    // Identical points run once; the longest (in virtual time) first.
    let mut unique: Vec<usize> = Vec::new();
    let mut sim_of: Vec<usize> = Vec::with_capacity(points.len());
    {
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        for (i, p) in points.iter().enumerate() {
            let k = *seen.entry(p.sim_key()).or_insert_with(|| {
                unique.push(i);
                unique.len() - 1
            });
            sim_of.push(k);
        }
    }
    let mut order: Vec<usize> = (0..unique.len()).collect();
    order.sort_by(|&a, &b| {
        let cost = |k: usize| -> f64 {
            let p = &points[unique[k]];
            1.0 / p.rate + if p.scaling.is_some() { 1.0 } else { 0.0 }
        };
        cost(b).total_cmp(&cost(a)).then(a.cmp(&b))
    });
    eprintln!(
        "compare: {} points ({} simulations of {requests} requests) on {threads} threads",
        points.len(),
        unique.len()
    );
    let profile_of = |name: &str| {
        &profiles
            .iter()
            .find(|p| p.name == name)
            .expect("points name loaded profiles")
            .profile
    };
    let sims_started = Instant::now();
    let ran = parallel_map("simulations", &order, threads, |&k| {
        let p = &points[unique[k]];
        run_point(p, profile_of(&p.profile), requests, args.seed)
    });
    let sims_wall = sims_started.elapsed().as_secs_f64();
    let mut by_sim: Vec<Option<PointRun>> = (0..unique.len()).map(|_| None).collect();
    for (k, r) in order.iter().zip(ran) {
        by_sim[*k] = Some(r?);
    }
    let by_sim: Vec<PointRun> = by_sim
        .into_iter()
        .map(|r| r.expect("every simulation ran"))
        .collect();
    let mut simulated = 0.0;
    for (k, r) in by_sim.iter().enumerate() {
        simulated += r.stats.simulated_seconds;
        if r.stats.policy_failures > 0 {
            let p = &points[unique[k]];
            eprintln!(
                "warning: {} {} at {} ({}): {} policy calls fell back ({})",
                p.policy,
                p.workload,
                p.rate,
                p.profile,
                r.stats.policy_failures,
                r.stats.first_policy_failure.as_deref().unwrap_or("")
            );
        }
    }
    let rows: Vec<Row> = points
        .iter()
        .zip(&sim_of)
        .map(|(p, &k)| Row {
            point: p,
            run: &by_sim[k].result,
            stats: &by_sim[k].stats,
        })
        .collect();

    // Per group: the report's table and files.
    let mut groups: Vec<(&str, RateSet, Figure)> = Vec::new();
    for r in &rows {
        let g = (r.point.profile.as_str(), r.point.rate_set, r.point.figure);
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    for &(profile, rate_set, figure) in &groups {
        let results: Vec<RunResult> = rows
            .iter()
            .filter(|r| {
                r.point.profile == profile
                    && r.point.rate_set == rate_set
                    && r.point.figure == figure
            })
            .map(|r| r.run.clone())
            .collect();
        let dir = args
            .out
            .join(profile)
            .join(rate_set.name())
            .join(figure.name());
        // This run's files only (a previous sweep's rates would linger).
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        eprintln!(
            "\n== {} · {profile} profile · {} ==",
            figure.title(),
            rate_set.title()
        );
        report::print_table(&results);
        if args.no_point_plots {
            std::fs::create_dir_all(&dir)?;
            report::write_results_json(&dir.join("results.json"), &results, false)?;
            report::write_csv(&dir.join("results.csv"), &results)?;
        } else {
            report::write_all(&dir, &results)
                .with_context(|| format!("writing {}", dir.display()))?;
        }
        report::write_claims(&results, &dir.join("llumnix.claim"))?;
    }

    let wall = started.elapsed().as_secs_f64();
    let mut page = Page {
        rows: &rows,
        capacities: &capacities,
        policies: &policy_info,
        profiles: profiles
            .iter()
            .map(|p| (p.name.clone(), p.what.clone()))
            .collect(),
        figures: &figures,
        rate_sets: &rate_sets,
        requests,
        calibration_requests,
        seed: args.seed,
        threads,
        simulations: unique.len(),
        wall_seconds: wall,
        quick: args.quick || max_sweep.is_some(),
        confirmed: BTreeMap::new(),
    };
    // The losses, again over more seeds.
    if args.confirm_seeds > 0 {
        let losing = results_md::losing_pairs(&page);
        let confirm_started = Instant::now();
        let seeds: Vec<u64> = (1..=args.confirm_seeds).map(|k| args.seed + k).collect();
        let jobs: Vec<(&Point, u64)> = losing
            .iter()
            .flat_map(|&(l, b)| [l, b])
            .flat_map(|p| seeds.iter().map(move |&s| (p, s)))
            .collect();
        eprintln!(
            "compare: {} losing points, each pair again with {} more seeds ({} simulations)",
            losing.len(),
            seeds.len(),
            jobs.len()
        );
        let again = parallel_map("confirmations", &jobs, threads, |&(p, seed)| {
            run_point(p, profile_of(&p.profile), requests, seed)
        });
        let mut summaries: BTreeMap<String, Vec<Summary>> = BTreeMap::new();
        for ((p, _), r) in jobs.iter().zip(again) {
            summaries
                .entry(results_md::point_key(p))
                .or_default()
                .push(r?.result.summary);
        }
        page.confirmed = summaries;
        eprintln!(
            "compare: confirmations in {:.1} s",
            confirm_started.elapsed().as_secs_f64()
        );
        page.wall_seconds = started.elapsed().as_secs_f64();
    }
    std::fs::create_dir_all(&args.out)?;
    let doc = serde_json::json!({
        "requests_per_point": requests,
        "seed": args.seed,
        "policies": &policy_info,
        "calibration": &capacities,
        "claims": results_md::claims(&page),
        "runs": study_runs(&rows),
    });
    let mut text = serde_json::to_string_pretty(&doc)?;
    text.push('\n');
    std::fs::write(args.out.join("study.json"), text)?;
    let mut pages = vec![args.out.join("RESULTS.md")];
    pages.extend(args.results.clone());
    for path in &pages {
        let written = results_md::write(path, &page)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "compare: {} ({} plots beside it)",
            path.display(),
            written.len().saturating_sub(1)
        );
    }
    eprintln!();
    eprint!("{}", results_md::headline_text(&page));
    let wall = started.elapsed().as_secs_f64();
    eprintln!(
        "\ncompare: {} points, {} simulations, {:.0} simulated seconds; {:.1} s wall in all ({:.1} s of simulations) on {threads} threads",
        points.len(),
        unique.len(),
        simulated,
        wall,
        sims_wall
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "points": points.len(),
                "simulations": unique.len(),
                "requests_per_point": requests,
                "threads": threads,
                "policies": &policy_info,
                "wall_seconds": wall,
                "simulated_seconds": simulated,
                "calibration": &capacities,
                "claims": results_md::claims(&page),
                "regressions": results_md::regressions(&page),
                "runs": study_runs(&rows),
            })
        );
    }
    Ok(())
}
