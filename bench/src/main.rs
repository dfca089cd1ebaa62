//! `llumen-bench`: llumen's benchmarks.
//!
//! Today: `policy-overhead` (the cost of a Wasm policy decision against the
//! same logic compiled natively), `dispatch` (decisions per second through
//! the global scheduler), `quic-overhead` (a request's round trip over
//! llumen's QUIC API against a bare quinn echo) and `engine` (decode/prefill
//! throughput of one instance; measured latency profiles) and `migration`
//! (live migration of a running request over QUIC loopback: downtime,
//! stages, recompute baseline, QUIC vs TCP bandwidth). The simulator
//! (`sim`), the live driver (`live`), the Llumnix study (`compare`) and the
//! simulator-vs-live comparison (`fidelity`) are here too.
//!
//! Contract (see DESIGN.md): with `--json`, stdout is one JSON document with
//! snake_case fields carrying their unit (`p50_ns`); human output goes to
//! stderr.

mod calibrate;
mod compare;
mod dispatch;
mod engine_bench;
mod fidelity;
mod live;
mod migration_bench;
mod policy_overhead;
mod quic_overhead;
mod record;
mod report;
mod results_md;
mod rng;
mod sim;
mod stats;
mod study;
mod workload;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "llumen-bench", version, about = "llumen's benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Wasm vs native cost of policy decisions at several fleet sizes.
    PolicyOverhead(policy_overhead::Args),
    /// Dispatch decisions per second through the manager (Manager::choose_instance), Wasm vs native.
    Dispatch(dispatch::Args),
    /// QUIC round trip of a request: bare quinn echo, llumen framing, llumen serve.
    QuicOverhead(quic_overhead::Args),
    /// Decode and prefill throughput of one engine instance; writes a measured latency profile.
    Engine(engine_bench::Args),
    /// Live migration of a running request between two engines over QUIC loopback: downtime, stages, recompute baseline, QUIC vs TCP bandwidth.
    Migration(migration_bench::Args),
    /// A workload against a running (or spawned) llumen server over QUIC or HTTP, measured from the client's side.
    Live(live::Args),
    /// The whole Llumnix study in simulation (Figs 11, 13, 14, 15 and an ablation) on both latency profiles, at the paper's rates and at rates rescaled to each profile's capacity; tables, plots, claim files and RESULTS.md.
    Compare(compare::Args),
    /// Discrete-event cluster simulation: real engines (latency model) and real Wasm policies in virtual time.
    Sim(sim::Args),
    /// The simulator against the live system: one seeded workload through `sim` and through a spawned `llumen serve --model profile:FILE`, per policy; relative errors of mean and P99 latencies and of migration counts.
    Fidelity(fidelity::Args),
}

fn main() -> Result<()> {
    llumen_host::process::model::pin_cpu_threads();
    match Cli::parse().command {
        Command::PolicyOverhead(args) => policy_overhead::run(&args),
        Command::Dispatch(args) => dispatch::run(&args),
        Command::QuicOverhead(args) => quic_overhead::run(&args),
        Command::Engine(args) => engine_bench::run(&args),
        Command::Migration(args) => migration_bench::run(&args),
        Command::Sim(args) => sim::run(&args),
        Command::Live(args) => live::run(&args),
        Command::Compare(args) => compare::run(&args),
        Command::Fidelity(args) => fidelity::run(&args),
    }
}
