//! `llumen-fuzz`: the dedicated fuzzing run (see the library's doc). Runs
//! every target (or `--targets`) for `--executions` inputs each, spread over
//! the machine's cores, and prints the counts; exits non-zero (with the
//! seed and execution to replay) on the first broken invariant.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use llumen_fuzz::{run, Counts, Target};

#[derive(Parser)]
#[command(
    name = "llumen-fuzz",
    about = "Seeded fuzzing of llumen's network parsers"
)]
struct Args {
    /// Inputs per target.
    #[arg(long, default_value_t = 2_000_000)]
    executions: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Targets (frames, chunk-header, migration, snapshot, admin), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "frames,chunk-header,migration,snapshot,admin"
    )]
    targets: Vec<String>,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1) as u64;
    let mut targets = Vec::new();
    for t in &args.targets {
        match Target::parse(t) {
            Some(t) => targets.push(t),
            None => bail!("unknown target {t:?}"),
        }
    }
    let started = Instant::now();
    let mut report = Vec::new();
    let mut total = 0;
    for target in targets {
        let t0 = Instant::now();
        let per = args.executions.div_ceil(threads);
        let counts = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|k| {
                    let range =
                        (k * per).min(args.executions)..((k + 1) * per).min(args.executions);
                    s.spawn(move || run(target, args.seed, range))
                })
                .collect();
            let mut all = Counts::default();
            for h in handles {
                match h.join() {
                    Ok(c) => all.add(&c),
                    Err(e) => std::panic::resume_unwind(e),
                }
            }
            all
        });
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "{:<13} {:>11} executions in {:>6.1} s ({:>9.0}/s): {} pristine, {} accepted, {} refused, {:.1} MB fed",
            target.name(),
            counts.executions,
            secs,
            counts.executions as f64 / secs.max(1e-9),
            counts.pristine,
            counts.accepted,
            counts.refused,
            counts.bytes as f64 / 1e6
        );
        total += counts.executions;
        report.push(serde_json::json!({
            "target": target.name(),
            "executions": counts.executions,
            "pristine": counts.pristine,
            "accepted": counts.accepted,
            "refused": counts.refused,
            "bytes": counts.bytes,
            "seconds": secs,
        }));
    }
    eprintln!(
        "total: {total} executions in {:.1} s, no invariant broken (seed {})",
        started.elapsed().as_secs_f64(),
        args.seed
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({"seed": args.seed, "threads": threads, "executions": total, "targets": report})
        );
    }
    Ok(())
}
