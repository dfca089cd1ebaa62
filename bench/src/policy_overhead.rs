//! `llumen-bench policy-overhead`: what a scheduling decision costs when the
//! policy is a sandboxed Wasm component, against the same logic compiled
//! natively.
//!
//! For each fleet size it times, per call:
//! - `wasm`: the production data path. One instance reports a new load
//!   (`observe`), then `PolicyRuntime::dispatch` runs: slot lock, sending
//!   the one changed load to the guest (`fleet.upsert`), the deadline-armed
//!   call, validation, accounting. Everything a real dispatch pays.
//! - `wasm_full_list`: the naive data path, for comparison: the whole fleet
//!   passed as a `list<instance-load>` (`fleet.reset`) before every decision.
//! - `native`: the same llumnix logic compiled into the host, after the same
//!   one-load fleet update.
//! - the same three for the migration plan (`plan`), which scans the fleet.
//!
//! Timings use `Instant` around each call (its own cost, ~20–40 ns, is in
//! every figure alike). Inputs are seeded ([`llumen_fleet::synthetic`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use llumen_engine::SplitMix64;
use llumen_fleet::synthetic;
use llumen_host::policy::{PolicyKind, PolicyRuntime, RuntimeConfig};
use llumen_policy_logic::{Fleet, Llumnix, Policy, RequestMeta};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Fleet sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    instances: Vec<u32>,
    /// Timed calls per scenario and fleet size.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Seed of the generated loads.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Directory holding llumnix.wasm (built by scripts/build-policies.sh).
    #[arg(long, env = "LLUMEN_POLICY_DIR", default_value = "target/policies")]
    policy_dir: PathBuf,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

use crate::stats::{percentiles, Percentiles};

#[derive(Serialize)]
struct Scenario {
    /// The production path: the decision call alone; the fleet view was
    /// pushed into the guest when the snapshot arrived (see `ingest`).
    wasm: Percentiles,
    /// Lazy sync: the decision call also sends the one load that changed.
    wasm_with_sync: Percentiles,
    /// The naive path: the whole fleet as a list<record>, then the decision.
    wasm_full_list: Percentiles,
    /// The same logic compiled natively, decision only.
    native: Percentiles,
    /// wasm p50 / native p50.
    wasm_native_ratio_p50: f64,
    /// wasm_with_sync p50 / native p50.
    with_sync_native_ratio_p50: f64,
    /// wasm_full_list p50 / native p50.
    full_list_native_ratio_p50: f64,
}

/// Cost of taking in one instance's snapshot.
#[derive(Serialize)]
struct Ingest {
    /// `PolicyRuntime::observe`: fleet table, history, and the push into the
    /// live dispatch and migration policies (two guest calls).
    wasm: Percentiles,
    /// `Fleet::upsert` for the native policy.
    native: Percentiles,
}

/// Where a Wasm decision's time goes: single guest calls on a synced
/// instance, p50 in ns.
#[derive(Serialize)]
struct CallBreakdown {
    /// `fleet.upsert` with an empty list: the fixed cost of one call.
    upsert_empty_p50_ns: u64,
    /// `fleet.upsert` of one instance load.
    upsert_one_p50_ns: u64,
    /// `dispatch` alone on a `LiveInstance`, without the runtime around it.
    dispatch_only_p50_ns: u64,
}

#[derive(Serialize)]
struct FleetSizeResult {
    instances: u32,
    dispatch: Scenario,
    migration_plan: Scenario,
    ingest: Ingest,
    breakdown: CallBreakdown,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    policy: String,
    policy_sha256: String,
    iterations: usize,
    seed: u64,
    results: Vec<FleetSizeResult>,
    /// The target: at 64 instances, dispatch p50 ≤ 1 µs and ≤ 3× native.
    target_met_at_64: Option<bool>,
}

fn time(f: impl FnOnce()) -> u64 {
    let start = Instant::now();
    f();
    start.elapsed().as_nanos() as u64
}

fn scenario(
    wasm: Vec<u64>,
    with_sync: Vec<u64>,
    full_list: Vec<u64>,
    native: Vec<u64>,
) -> Scenario {
    let [wasm, wasm_with_sync, wasm_full_list, native] =
        [wasm, with_sync, full_list, native].map(percentiles);
    let ratio = |a: &Percentiles| a.p50_ns as f64 / native.p50_ns.max(1) as f64;
    Scenario {
        wasm_native_ratio_p50: ratio(&wasm),
        with_sync_native_ratio_p50: ratio(&wasm_with_sync),
        full_list_native_ratio_p50: ratio(&wasm_full_list),
        wasm,
        wasm_with_sync,
        wasm_full_list,
        native,
    }
}

/// Timings of one decision kind, call by call.
#[derive(Default)]
struct Samples {
    wasm: Vec<u64>,
    with_sync: Vec<u64>,
    full_list: Vec<u64>,
    native: Vec<u64>,
}

impl Samples {
    fn into_scenario(self, warmup: usize) -> Scenario {
        let skip = |mut v: Vec<u64>| v.split_off(warmup.min(v.len()));
        scenario(
            skip(self.wasm),
            skip(self.with_sync),
            skip(self.full_list),
            skip(self.native),
        )
    }
}

fn measure(bytes: &[u8], instances: u32, args: &Args) -> Result<(FleetSizeResult, String, String)> {
    // `eager`: loads are pushed into the guests as they arrive (production);
    // `lazy`: each decision call first sends what changed.
    let eager = PolicyRuntime::new(RuntimeConfig::default(), "llumnix")?;
    let lazy = PolicyRuntime::new(
        RuntimeConfig {
            eager_sync: false,
            ..RuntimeConfig::default()
        },
        "llumnix",
    )?;
    let policy = eager.compile(bytes)?;
    let lazy_policy = lazy.compile(bytes)?;
    for kind in [PolicyKind::Dispatch, PolicyKind::Migration] {
        eager.swap(kind, policy.clone())?;
        lazy.swap(kind, lazy_policy.clone())?;
    }
    // The naive path drives instances directly: reset(all) then decide.
    let mut dispatch_instance = eager.instantiate(&policy, PolicyKind::Dispatch)?;
    let mut migration_instance = eager.instantiate(&policy, PolicyKind::Migration)?;

    let mut rng = SplitMix64::new(args.seed ^ u64::from(instances));
    let mut fleet = Fleet::new();
    for i in 0..instances {
        let l = synthetic::load(&mut rng, i, 0);
        fleet.upsert([l]);
        eager.observe(l);
        lazy.observe(l);
    }
    let mut native = Llumnix::default();
    let warmup = args.iterations / 10;
    let n = args.iterations + warmup;
    let (mut dispatch, mut migration) = (Samples::default(), Samples::default());
    let (mut ingest_wasm, mut ingest_native) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let to_wit = |fleet: &Fleet| {
        fleet
            .loads()
            .iter()
            .map(llumen_host::policy::load_to_wit)
            .collect::<Vec<_>>()
    };
    for k in 0..n as u64 {
        let which = rng.below(u64::from(instances)) as u32;
        let changed = synthetic::load(&mut rng, which, k);
        let request = RequestMeta {
            id: k,
            prompt_tokens: 128,
            max_tokens: 128,
            ..Default::default()
        };

        ingest_wasm.push(time(|| eager.observe(changed)));
        ingest_native.push(time(|| fleet.upsert([changed])));
        lazy.observe(changed);

        let mut answers = [None; 3];
        dispatch
            .wasm
            .push(time(|| answers[0] = eager.dispatch(&request).value));
        dispatch
            .with_sync
            .push(time(|| answers[1] = lazy.dispatch(&request).value));
        dispatch
            .native
            .push(time(|| answers[2] = native.dispatch(&fleet, &request)));
        anyhow::ensure!(
            answers[0] == answers[2] && answers[1] == answers[2],
            "wasm and native disagree at call {k}"
        );
        // The runtime counts a dispatched request at its instance until that
        // instance's next snapshot (`PolicyRuntime::dispatch`): so does the
        // native view, untimed, as in host/tests/policy_runtime.rs.
        if let Some(load) = answers[2].and_then(|i| fleet.get(i).copied()) {
            fleet.upsert([load.with_dispatched(request.prompt_tokens)]);
        }
        dispatch.full_list.push(time(|| {
            dispatch_instance.reset(&to_wit(&fleet)).expect("reset");
            dispatch_instance
                .dispatch(llumen_host::policy::request_to_wit(&request))
                .expect("dispatch");
        }));
        if k % 4 == 0 {
            migration.wasm.push(time(|| drop(eager.plan_migration())));
            migration
                .with_sync
                .push(time(|| drop(lazy.plan_migration())));
            migration
                .native
                .push(time(|| drop(native.plan_migration(&fleet))));
            migration.full_list.push(time(|| {
                migration_instance.reset(&to_wit(&fleet)).expect("reset");
                migration_instance.plan().expect("plan");
            }));
        }
    }
    let breakdown = {
        dispatch_instance.reset(&to_wit(&fleet)).expect("reset");
        let one = to_wit(&fleet)[..1].to_vec();
        let request = llumen_host::policy::request_to_wit(&RequestMeta::default());
        let p50 = |f: &mut dyn FnMut()| {
            percentiles((0..args.iterations).map(|_| time(&mut *f)).collect()).p50_ns
        };
        CallBreakdown {
            upsert_empty_p50_ns: p50(&mut || dispatch_instance.upsert(&[]).expect("upsert")),
            upsert_one_p50_ns: p50(&mut || dispatch_instance.upsert(&one).expect("upsert")),
            dispatch_only_p50_ns: p50(&mut || {
                dispatch_instance.dispatch(request).expect("dispatch");
            }),
        }
    };
    let skip = |mut v: Vec<u64>, w: usize| v.split_off(w.min(v.len()));
    let result = FleetSizeResult {
        instances,
        dispatch: dispatch.into_scenario(warmup),
        migration_plan: migration.into_scenario(warmup / 4),
        ingest: Ingest {
            wasm: percentiles(skip(ingest_wasm, warmup)),
            native: percentiles(skip(ingest_native, warmup)),
        },
        breakdown,
    };
    for rt in [&eager, &lazy] {
        for kind in [PolicyKind::Dispatch, PolicyKind::Migration] {
            let status = rt.status(kind);
            let failures: u64 = status.stats.values().map(|s| s.failures()).sum();
            anyhow::ensure!(
                failures == 0,
                "policy calls failed during the benchmark: {status:?}"
            );
        }
    }
    Ok((result, policy.name.to_string(), policy.sha256.to_string()))
}

pub fn run(args: &Args) -> Result<()> {
    let path = args.policy_dir.join("llumnix.wasm");
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (build it with scripts/build-policies.sh)",
            path.display()
        )
    })?;
    let mut results = Vec::new();
    let (mut name, mut sha) = (String::new(), String::new());
    for &instances in &args.instances {
        let (r, n, s) = measure(&bytes, instances, args)?;
        (name, sha) = (n, s);
        results.push(r);
    }
    let target_met_at_64 = results
        .iter()
        .find(|r| r.instances == 64)
        .map(|r| r.dispatch.wasm.p50_ns <= 1_000 && r.dispatch.wasm_native_ratio_p50 <= 3.0);
    let report = Report {
        benchmark: "policy-overhead",
        policy: name,
        policy_sha256: sha,
        iterations: args.iterations,
        seed: args.seed,
        results,
        target_met_at_64,
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
        "policy-overhead: {} ({}), {} calls per cell, p50 / p99 ns",
        report.policy,
        &report.policy_sha256[..12],
        report.iterations
    );
    eprintln!(
        "{:>9} {:>9} | {:>15} {:>15} {:>15} {:>15} | {:>8} {:>9} {:>9}",
        "instances",
        "decision",
        "wasm",
        "wasm+sync",
        "wasm full-list",
        "native",
        "wasm/nat",
        "+sync/nat",
        "full/nat"
    );
    let cell = |p: &Percentiles| format!("{:>7} / {:>5}", p.p50_ns, p.p99_ns);
    for r in &report.results {
        for (label, s) in [("dispatch", &r.dispatch), ("migration", &r.migration_plan)] {
            eprintln!(
                "{:>9} {:>9} | {} {} {} {} | {:>7.2}x {:>8.2}x {:>8.2}x",
                r.instances,
                label,
                cell(&s.wasm),
                cell(&s.wasm_with_sync),
                cell(&s.wasm_full_list),
                cell(&s.native),
                s.wasm_native_ratio_p50,
                s.with_sync_native_ratio_p50,
                s.full_list_native_ratio_p50
            );
        }
    }
    for r in &report.results {
        let b = &r.breakdown;
        eprintln!(
            "{:>9} ingest p50: wasm {} ns (push into 2 policies), native {} ns; call p50: empty upsert {} ns, upsert of one load {} ns, bare dispatch {} ns",
            r.instances, r.ingest.wasm.p50_ns, r.ingest.native.p50_ns, b.upsert_empty_p50_ns, b.upsert_one_p50_ns, b.dispatch_only_p50_ns
        );
    }
    if let Some(met) = report.target_met_at_64 {
        eprintln!(
            "target at 64 instances (dispatch p50 <= 1000 ns and <= 3x native): {}",
            if met { "met" } else { "NOT met" }
        );
    }
}
