//! `llumen-bench dispatch`: dispatch decisions per second through the
//! global scheduler, [`Manager::choose_instance`], on one thread.
//!
//! What it measures: a real [`Manager`] (a temporary sled store, a
//! [`PolicyRuntime`] recording snapshots in it through [`StoreHistory`],
//! [`Metrics`], the byte codec) with the llumnix component swapped into the
//! dispatch slot, and N registered instances whose loads arrive through
//! [`Manager::load_sink`] exactly as a llumlet's would. Each decision is
//! the whole `choose_instance` path: slot lock, fleet read, the guest call
//! (or the native policy), answer validation, stats, the shadow feed, the
//! instance-table lookup and the `decided_by` label. Scenarios, per fleet
//! size:
//! - `wasm`: decisions only, on the llumnix component.
//! - `native`: the same, on a second manager whose runtime has no component
//!   swapped in (the builtin llumnix compiled into the host).
//! - `wasm_with_snapshots` / `native_with_snapshots`: one instance snapshot
//!   goes through the load sink every `--snapshot-every` decisions (fleet
//!   table, sled history, metrics, and for Wasm the push into the guest):
//!   the cost of ingestion, amortised over the decisions.
//!
//! Throughput is N decisions over the wall time of the loop; p50/p99 come
//! from timing every 16th call on its own with `Instant` (whose cost, tens
//! of ns, is in those samples). Loads and requests are seeded
//! ([`llumen_fleet::synthetic`]).
//! Wasm and native must choose the same instance at every step.
//!
//! What it must not touch: engines, the network, tokio. The instances are
//! [`BenchLink`]s, a harness that only counts assignments (and
//! `choose_instance` must make none): the point is the scheduler path, not
//! the engines behind it.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use llumen_engine::SplitMix64;
use llumen_fleet::synthetic;
use llumen_host::control::llumlet::{EventSender, LoadSink};
use llumen_host::control::manager::{InstanceLink, Manager, ManagerConfig};
use llumen_host::control::metrics::Metrics;
use llumen_host::front::api::ServeError;
use llumen_host::policy::{PolicyKind, PolicyRuntime, RuntimeConfig, StoreHistory};
use llumen_host::process::model::TextCodec;
use llumen_host::transport::protocol::Assignment;
use llumen_policy_logic::{InstanceLoad, MigrationCandidate, RequestMeta};
use serde::Serialize;

/// The target: decisions per second at 64 instances, one core.
const TARGET_DECISIONS_PER_S: f64 = 200_000.0;
/// Every how many decisions one call is timed on its own.
const SAMPLE_EVERY: usize = 16;
/// Distinct requests and snapshots cycled through (pre-generated, so the
/// generator stays out of the timed loop).
const RING: usize = 4096;

#[derive(clap::Args)]
pub struct Args {
    /// Fleet sizes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    instances: Vec<u32>,
    /// Timed decisions per scenario and fleet size (a tenth more run first
    /// as warm-up).
    #[arg(long, default_value_t = 200_000)]
    decisions: usize,
    /// In the `*_with_snapshots` scenarios, one snapshot every this many
    /// decisions.
    #[arg(long, default_value_t = 8)]
    snapshot_every: usize,
    /// Swap llumnix into every slot it implements, as `llumen serve` does
    /// (each snapshot is then pushed into each of those guests), not only
    /// into the dispatch slot.
    #[arg(long)]
    all_slots: bool,
    /// Seed of the generated loads and requests.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Directory holding llumnix.wasm (built by scripts/build-policies.sh).
    #[arg(long, env = "LLUMEN_POLICY_DIR", default_value = "target/policies")]
    policy_dir: PathBuf,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

/// The benchmark's stand-in for an instance: it only counts assignments.
/// `choose_instance` hands out a link but must never assign through it.
struct BenchLink {
    assigned: AtomicU64,
}

impl InstanceLink for BenchLink {
    fn assign(&self, _job: Assignment, _events: EventSender) -> Result<(), ServeError> {
        self.assigned.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn set_draining(&self, _draining: bool) {}
    fn candidates(&self) -> Pin<Box<dyn Future<Output = Vec<MigrationCandidate>> + Send + '_>> {
        Box::pin(std::future::ready(Vec::new()))
    }
    fn stop(&self) {}
    fn kind(&self) -> &'static str {
        "bench"
    }
    fn migrate_out(
        &self,
        _migration_id: u64,
        _request: u64,
        _destination: u32,
        _addr: std::net::SocketAddr,
        _transport: &Arc<llumen_host::transport::migration::MigrationTransport>,
    ) -> Result<
        tokio::sync::oneshot::Receiver<llumen_host::control::llumlet::MigrationReport>,
        String,
    > {
        Err("the dispatch benchmark's instances run nothing".into())
    }
}

use crate::stats::{percentiles, Percentiles};

#[derive(Serialize)]
struct Scenario {
    /// Decisions over the loop's wall time (snapshot ingestion included
    /// where the scenario has it).
    decisions_per_s: f64,
    /// Wall time of the loop per decision.
    ns_per_decision: f64,
    /// Single `choose_instance` calls, every 16th timed on its own.
    per_call: Percentiles,
    /// Snapshots through the load sink, each timed (scenarios with them).
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest: Option<Percentiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshots: Option<usize>,
    /// The `decided_by` label of the decisions (must be the component for
    /// Wasm, `builtin:…` for native).
    decided_by: String,
    /// How many instances were chosen at least once.
    distinct_instances_chosen: usize,
    /// Largest share of the decisions one instance got.
    max_instance_share: f64,
}

#[derive(Serialize)]
struct FleetSizeResult {
    instances: u32,
    wasm: Scenario,
    native: Scenario,
    wasm_with_snapshots: Scenario,
    native_with_snapshots: Scenario,
    /// native decisions/s ÷ wasm decisions/s (decisions only).
    wasm_slowdown_vs_native: f64,
    /// Every decision of the Wasm manager matched the native one.
    wasm_native_agree: bool,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    policy: String,
    policy_sha256: String,
    /// Slots running the component (the others run the builtin).
    wasm_slots: Vec<&'static str>,
    decisions: usize,
    warmup_decisions: usize,
    snapshot_every: usize,
    sample_every: usize,
    seed: u64,
    target_decisions_per_s: f64,
    results: Vec<FleetSizeResult>,
    /// Wasm decisions/s (decisions only) at 64 instances ≥ the target;
    /// null when 64 was not measured.
    target_met: Option<bool>,
    /// The same with a snapshot every `snapshot_every` decisions.
    target_met_with_snapshots: Option<bool>,
}

/// A manager as `llumen serve` assembles one, minus the engines.
struct Fleet {
    manager: Manager,
    sink: LoadSink,
    links: Vec<Arc<BenchLink>>,
}

fn build(
    instances: u32,
    policy: Option<&[PolicyKind]>,
    bytes: &[u8],
    loads: &[InstanceLoad],
) -> Result<(Fleet, Option<Arc<llumen_host::policy::CompiledPolicy>>)> {
    // As `llumen serve` configures it: appends only buffer; the server's
    // periodic task flushes (off the decision path), so no flush is timed.
    let store = Arc::new(
        llumen_store::Store::temporary()
            .context("a temporary store")?
            .with_batch_size(1 << 20),
    );
    let runtime = Arc::new(PolicyRuntime::with_history(
        RuntimeConfig::default(),
        "llumnix",
        Arc::new(StoreHistory::new(store.clone())),
    )?);
    let compiled = match policy {
        Some(kinds) => {
            let p = runtime.compile(bytes).context("compiling llumnix.wasm")?;
            for &kind in kinds {
                runtime
                    .swap(kind, p.clone())
                    .with_context(|| format!("swapping llumnix into the {kind} slot"))?;
            }
            Some(p)
        }
        None => None,
    };
    let manager = Manager::new(
        ManagerConfig::default(),
        runtime,
        store,
        Arc::new(Metrics::new()),
        Arc::new(TextCodec::Bytes { vocab: 4096 }),
        None,
    );
    let mut links = Vec::new();
    for _ in 0..instances {
        let link = Arc::new(BenchLink {
            assigned: AtomicU64::new(0),
        });
        manager.register(manager.next_instance_id(), link.clone(), None);
        links.push(link);
    }
    let sink = manager.load_sink();
    for l in loads {
        sink(*l);
    }
    anyhow::ensure!(
        manager.runtime().fleet().len() == instances as usize,
        "the fleet view holds {} instances, not {instances}",
        manager.runtime().fleet().len()
    );
    Ok((
        Fleet {
            manager,
            sink,
            links,
        },
        compiled,
    ))
}

/// Runs `warmup + decisions` decisions; with `snapshots`, one of them
/// goes through the sink every `every` decisions. Returns the scenario
/// and the chosen instance of each timed decision.
fn run_scenario(
    fleet: &Fleet,
    requests: &[RequestMeta],
    snapshots: Option<(&[InstanceLoad], usize)>,
    warmup: usize,
    decisions: usize,
) -> Result<(Scenario, Vec<u32>)> {
    let refused = BTreeSet::new();
    let manager = &fleet.manager;
    let choose = |i: usize| {
        let mut meta = requests[i % RING];
        meta.id = i as u64;
        manager.choose_instance(&meta, &refused)
    };
    let mut snapshot_index = 0usize;
    let mut ingest = Vec::new();
    let mut feed = |i: usize, timed: bool, ingest: &mut Vec<u64>| {
        if let Some((loads, every)) = snapshots {
            if i % every == every - 1 {
                let mut l = loads[snapshot_index % RING];
                l.timestamp_us += snapshot_index as u64;
                snapshot_index += 1;
                if timed {
                    let start = Instant::now();
                    (fleet.sink)(l);
                    ingest.push(start.elapsed().as_nanos() as u64);
                } else {
                    (fleet.sink)(l);
                }
            }
        }
    };
    let mut decided_by = String::new();
    for i in 0..warmup {
        let (_, _, label) = choose(i).context("no instance chosen")?;
        decided_by = label;
        feed(i, false, &mut ingest);
    }
    let mut chosen = Vec::with_capacity(decisions);
    let mut per_call = Vec::with_capacity(decisions / SAMPLE_EVERY + 1);
    let start = Instant::now();
    for i in warmup..warmup + decisions {
        let answer = if i % SAMPLE_EVERY == 0 {
            let t = Instant::now();
            let a = choose(i);
            per_call.push(t.elapsed().as_nanos() as u64);
            a
        } else {
            choose(i)
        };
        match answer {
            Some((id, _link, _label)) => chosen.push(id),
            None => anyhow::bail!("no instance chosen at decision {i}"),
        }
        feed(i, true, &mut ingest);
    }
    let wall = start.elapsed();
    let assigned: u64 = fleet
        .links
        .iter()
        .map(|l| l.assigned.load(Ordering::Relaxed))
        .sum();
    anyhow::ensure!(
        assigned == 0,
        "choose_instance assigned {assigned} requests"
    );
    let mut counts = vec![0u64; fleet.links.len()];
    for &id in &chosen {
        counts[id as usize] += 1;
    }
    let ns = wall.as_nanos() as f64;
    let scenario = Scenario {
        decisions_per_s: decisions as f64 / wall.as_secs_f64(),
        ns_per_decision: ns / decisions as f64,
        per_call: percentiles(per_call),
        snapshots: snapshots.map(|_| ingest.len()),
        ingest: snapshots.map(|_| percentiles(ingest)),
        decided_by,
        distinct_instances_chosen: counts.iter().filter(|&&c| c > 0).count(),
        max_instance_share: counts.iter().copied().max().unwrap_or(0) as f64
            / decisions.max(1) as f64,
    };
    Ok((scenario, chosen))
}

fn measure(
    bytes: &[u8],
    kinds: &[PolicyKind],
    instances: u32,
    args: &Args,
) -> Result<(FleetSizeResult, String, String)> {
    let mut rng = SplitMix64::new(args.seed ^ u64::from(instances));
    // Every instance serves (none draining): a small fleet is never left
    // without one to choose.
    let load = |rng: &mut SplitMix64, instance: u32, t: u64| InstanceLoad {
        draining: false,
        ..synthetic::load(rng, instance, t)
    };
    let initial: Vec<InstanceLoad> = (0..instances).map(|i| load(&mut rng, i, 0)).collect();
    let requests: Vec<RequestMeta> = (0..RING as u64)
        .map(|i| synthetic::request(&mut rng, i))
        .collect();
    let snapshots: Vec<InstanceLoad> = (0..RING as u64)
        .map(|t| {
            let which = rng.below(u64::from(instances)) as u32;
            load(&mut rng, which, 1 + t)
        })
        .collect();

    let (wasm_fleet, policy) = build(instances, Some(kinds), bytes, &initial)?;
    let policy = policy.expect("compiled above");
    let (native_fleet, _) = build(instances, None, bytes, &initial)?;
    let warmup = args.decisions / 10;
    let every = args.snapshot_every.max(1);
    let run = |fleet: &Fleet, snapshots: Option<(&[InstanceLoad], usize)>| {
        run_scenario(fleet, &requests, snapshots, warmup, args.decisions)
    };

    let (wasm, wasm_chosen) = run(&wasm_fleet, None)?;
    let (native, native_chosen) = run(&native_fleet, None)?;
    let (wasm_with_snapshots, wasm_snap_chosen) = run(&wasm_fleet, Some((&snapshots, every)))?;
    let (native_with_snapshots, native_snap_chosen) =
        run(&native_fleet, Some((&snapshots, every)))?;
    anyhow::ensure!(
        wasm.decided_by.starts_with(&format!("{}@", policy.name))
            && native.decided_by.starts_with("builtin:"),
        "unexpected deciders: wasm {:?}, native {:?}",
        wasm.decided_by,
        native.decided_by
    );
    for &kind in kinds {
        let status = wasm_fleet.manager.runtime().status(kind);
        let failures: u64 = status.stats.values().map(|s| s.failures()).sum();
        anyhow::ensure!(
            failures == 0,
            "policy calls failed during the benchmark: {status:?}"
        );
    }
    let result = FleetSizeResult {
        instances,
        wasm_slowdown_vs_native: native.decisions_per_s / wasm.decisions_per_s,
        wasm_native_agree: wasm_chosen == native_chosen && wasm_snap_chosen == native_snap_chosen,
        wasm,
        native,
        wasm_with_snapshots,
        native_with_snapshots,
    };
    Ok((result, policy.name.to_string(), policy.sha256.to_string()))
}

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(args.decisions > 0, "--decisions must be at least 1");
    let path = args.policy_dir.join("llumnix.wasm");
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {}: build the policies first (run scripts/build-policies.sh)",
            path.display()
        )
    })?;
    // The kinds the component implements, from a throwaway compile.
    let kinds: Vec<PolicyKind> = if args.all_slots {
        let probe = PolicyRuntime::new(RuntimeConfig::default(), "llumnix")?;
        probe.compile(&bytes)?.kinds.clone()
    } else {
        vec![PolicyKind::Dispatch]
    };
    let mut results = Vec::new();
    let (mut name, mut sha) = (String::new(), String::new());
    for &instances in &args.instances {
        anyhow::ensure!(instances > 0, "a fleet needs at least one instance");
        let (r, n, s) = measure(&bytes, &kinds, instances, args)?;
        (name, sha) = (n, s);
        results.push(r);
    }
    let at_64 = results.iter().find(|r| r.instances == 64);
    let report = Report {
        benchmark: "dispatch",
        policy: name,
        policy_sha256: sha,
        wasm_slots: kinds.iter().map(|k| k.as_str()).collect(),
        decisions: args.decisions,
        warmup_decisions: args.decisions / 10,
        snapshot_every: args.snapshot_every.max(1),
        sample_every: SAMPLE_EVERY,
        seed: args.seed,
        target_decisions_per_s: TARGET_DECISIONS_PER_S,
        target_met: at_64.map(|r| r.wasm.decisions_per_s >= TARGET_DECISIONS_PER_S),
        target_met_with_snapshots: at_64
            .map(|r| r.wasm_with_snapshots.decisions_per_s >= TARGET_DECISIONS_PER_S),
        results,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &Report) {
    eprintln!(
        "dispatch: Manager::choose_instance on one thread; {} ({}) in slots [{}]; {} decisions per cell (+{} warm-up), every {}th timed alone",
        report.policy,
        &report.policy_sha256[..12.min(report.policy_sha256.len())],
        report.wasm_slots.join(", "),
        report.decisions,
        report.warmup_decisions,
        report.sample_every,
    );
    eprintln!(
        "{:>9} {:>24} | {:>12} {:>9} | {:>8} {:>8} {:>8} | {:>34} | {:>9}",
        "instances",
        "scenario",
        "decisions/s",
        "ns/dec",
        "p50 ns",
        "p99 ns",
        "mean ns",
        "ingest p50/p99/mean/max ns",
        "spread"
    );
    for r in &report.results {
        for (label, s) in [
            ("wasm", &r.wasm),
            ("native", &r.native),
            ("wasm + snapshot/8", &r.wasm_with_snapshots),
            ("native + snapshot/8", &r.native_with_snapshots),
        ] {
            let label = label.replace("/8", &format!("/{}", report.snapshot_every));
            let ingest = s.ingest.as_ref().map_or_else(
                || "-".to_string(),
                |p| format!("{} / {} / {} / {}", p.p50_ns, p.p99_ns, p.mean_ns, p.max_ns),
            );
            eprintln!(
                "{:>9} {:>24} | {:>12.0} {:>9.0} | {:>8} {:>8} {:>8} | {:>34} | {:>3} inst.",
                r.instances,
                label,
                s.decisions_per_s,
                s.ns_per_decision,
                s.per_call.p50_ns,
                s.per_call.p99_ns,
                s.per_call.mean_ns,
                ingest,
                s.distinct_instances_chosen,
            );
        }
        eprintln!(
            "{:>9} wasm is {:.2}x slower than native; wasm and native chose {}; decided by {} / {}",
            r.instances,
            r.wasm_slowdown_vs_native,
            if r.wasm_native_agree {
                "the same instance every time"
            } else {
                "DIFFERENT instances"
            },
            r.wasm.decided_by,
            r.native.decided_by,
        );
    }
    let verdict = |m: Option<bool>| match m {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured (64 not in --instances)",
    };
    eprintln!(
        "target at 64 instances (>= {:.0} wasm decisions/s on one thread): {}; with a snapshot every {} decisions: {}",
        report.target_decisions_per_s,
        verdict(report.target_met),
        report.snapshot_every,
        verdict(report.target_met_with_snapshots),
    );
}
