//! `llumen-bench sim`: the discrete-event cluster simulator.
//!
//! A fleet of engine instances serves a workload in **virtual time**: the
//! simulator never sleeps and never reads the wall clock for a decision
//! (the wall clock only times the run, for the speed figure), and the same
//! configuration and workload give the same records, bit for bit.
//!
//! What runs is the code that serves, wherever it can be:
//! - each instance is a real [`llumen_engine::Engine`] (local scheduler,
//!   block manager, preemption by recompute) over the
//!   [`LatencyModelBackend`](llumen_engine::LatencyModelBackend), whose step
//!   returns the modelled duration that advances virtual time;
//! - every scheduling decision (priority, dispatch, migration plan and
//!   picks, scaling) is made by the real Wasm policy components through the
//!   real [`PolicyRuntime`](llumen_host::policy::PolicyRuntime), fed the
//!   instances' real load snapshots;
//! - live migrations run the engine's own state machines
//!   ([`SourceMigration`](llumen_engine::SourceMigration) /
//!   [`DestinationMigration`](llumen_engine::DestinationMigration)) between
//!   two simulated engines, each message taking `bytes / bandwidth + a fixed
//!   latency` of virtual time;
//! - each instance's turn (inputs, timeouts, snapshots, engine steps, live
//!   migrations) is the fleet core's [`InstanceCore`](llumen_fleet::InstanceCore)
//!   and the manager's placement, migration and scaling rounds are its
//!   [`Controller`](llumen_fleet::Controller): the code the server's
//!   llumlets and manager run. `world.rs` lists the few places where the
//!   simulator drives them differently.
//!
//! **Owns**: the event queue and virtual clock, the network delay model
//! between instances, fleet samples, the per-request and fleet records of a
//! run ([`crate::record`]), and the `sim` subcommand.
//! **Never touches**: the wall clock for decisions, threads of its own (the
//! policy runtime keeps its epoch ticker), sockets, sled, files other than
//! the profile and policy components it is told to load, and the workload
//! generators' and report's internals. One run is single-threaded and
//! independent of any other: callers may run several in parallel.

mod cli;
mod policies;
#[cfg(test)]
mod synthetic;
mod world;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use llumen_engine::{LatencyProfile, MigrationConfig, SchedulerConfig};
pub use llumen_fleet::MigrationCadence;
use serde::Serialize;

use crate::record::{FleetRecord, RequestRecord, RequestSpec};

pub use cli::{run, Args};
#[allow(unused_imports)]
pub use policies::{PolicySet, PolicySource};

/// Auto-scaling knobs (the manager's `min_instances` / `max_instances` /
/// `scaling_period`, plus the start-up delay of a new instance).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScalingConfig {
    /// The scaling round never drains below this many serving instances.
    pub min_instances: u32,
    /// Nor grows the fleet (starting and draining instances included) above this.
    pub max_instances: u32,
    /// A new instance serves this long after the scale-up decision (virtual µs).
    pub startup_delay_us: u64,
    /// Period of the scaling round (virtual µs).
    pub period_us: u64,
    /// The first scaling round comes this long plus a period after the
    /// start (virtual µs; the artifact waits 100 s before its first check).
    pub first_check_us: u64,
}

impl Default for ScalingConfig {
    /// Llumnix's auto-scaling experiment: 1–16 instances, a 10 s period, a
    /// 5 s start-up, the first check after 100 s.
    fn default() -> Self {
        Self {
            min_instances: 1,
            max_instances: 16,
            startup_delay_us: 5_000_000,
            period_us: 10_000_000,
            first_check_us: 100_000_000,
        }
    }
}

/// Everything a simulation run depends on (with the workload).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Instances serving at time 0.
    pub instances: u32,
    /// Step times, KV geometry and migration bandwidth of every instance.
    pub profile: Arc<LatencyProfile>,
    /// Limits of every instance's local scheduler (by default the profile's
    /// geometry, see [`SimConfig::new`]).
    pub scheduler: SchedulerConfig,
    /// The policy behind each kind of decision.
    pub policies: PolicySet,
    /// Execute the migration policy's choices (false: no migration round at all).
    pub migration: bool,
    /// When the migration round runs: every `migration_period_us`
    /// ([`MigrationCadence::Period`]) or, by default, the artifact's cadence
    /// (about every 4 steps per instance; the server's default too).
    pub migration_cadence: MigrationCadence,
    /// Period of the migration round with [`MigrationCadence::Period`]
    /// (virtual µs).
    pub migration_period_us: u64,
    /// Most migrations in or out of one instance at a time (the manager's
    /// `max_migrations_per_instance`).
    pub max_migrations_per_instance: u32,
    /// The engine's live-migration knobs (stages, last-stage size, timeouts).
    pub migration_protocol: MigrationConfig,
    /// Fixed latency of every migration message (virtual µs), on top of
    /// `bytes / bandwidth` for the messages that carry KV.
    pub migration_message_latency_us: u64,
    /// Bytes per second of a KV transfer; `None`: the profile's
    /// `migration_bandwidth_bytes_per_s`.
    pub migration_bandwidth_bytes_per_s: Option<f64>,
    /// Auto-scaling, when set.
    pub scaling: Option<ScalingConfig>,
    /// Period of the fleet samples (virtual µs).
    pub sample_period_us: u64,
    /// Seeds the requests' samplers (the latency backend's tokens are a
    /// function of position only, so this changes no timing); kept in the
    /// record of the run.
    pub seed: u64,
    /// The run goes on (rounds, samples) at least until this virtual time,
    /// even when every request has finished.
    pub min_run_us: u64,
}

impl SimConfig {
    /// `instances` instances of `profile` under `policies`, with the
    /// simulator's defaults: the profile's block size, pool and batched-token
    /// limit with vLLM's 1% watermark and 256 sequences per batch; migration
    /// on, about every 4 steps per instance (the artifact's cadence), one
    /// migration in or out per instance, the engine's
    /// default protocol (16-block last stage, 3 pre-copy stages) and 1 ms per
    /// message; no auto-scaling; a sample every second.
    pub fn new(instances: u32, profile: Arc<LatencyProfile>, policies: PolicySet) -> Self {
        let scheduler = profile.scheduler_config();
        Self {
            instances,
            profile,
            scheduler,
            policies,
            migration: true,
            migration_cadence: MigrationCadence::Snapshots { per_instance: 4 },
            migration_period_us: 100_000,
            max_migrations_per_instance: 1,
            migration_protocol: MigrationConfig::default(),
            migration_message_latency_us: 1_000,
            migration_bandwidth_bytes_per_s: None,
            scaling: None,
            sample_period_us: 1_000_000,
            seed: 0,
            min_run_us: 0,
        }
    }
}

/// Loads a latency profile: `None` is the shipped LLaMA-7B-on-A10 stand-in
/// (`engine/profiles/llama-7b-a10-derived.json`, derived, not measured).
pub fn load_profile(path: Option<&std::path::Path>) -> Result<Arc<LatencyProfile>> {
    Ok(Arc::new(match path {
        Some(p) => LatencyProfile::from_path(p)
            .with_context(|| format!("loading the latency profile {}", p.display()))?,
        None => LatencyProfile::shipped_llama7b_a10_derived(),
    }))
}

/// Counters of one run (what the simulator did, not what requests saw).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SimStats {
    /// Events taken off the queue.
    pub events: u64,
    /// Engine steps that ran a forward pass (all instances).
    pub steps: u64,
    /// Engine steps that planned nothing although requests waited.
    pub stalled_steps: u64,
    /// Load snapshots fed to the policies (`PolicyRuntime::observe`).
    pub snapshots: u64,
    /// Decision calls into the policy runtime, per kind.
    pub dispatch_calls: u64,
    pub priority_calls: u64,
    pub migration_plan_calls: u64,
    pub migration_choose_calls: u64,
    pub scaling_calls: u64,
    /// Calls the active policy did not answer (trap, timeout, invalid
    /// answer: a fallback answered). Should be 0: anything else means the
    /// decisions are not the component's alone.
    pub policy_failures: u64,
    /// The first such failure, in words.
    pub first_policy_failure: Option<String>,
    /// Dispatch answers naming an instance that does not serve (replaced by
    /// the first serving one, as the manager does).
    pub dispatch_redirects: u64,
    /// Migrations the rounds asked for, and what became of them.
    pub migrations_planned: u64,
    pub migrations_started: u64,
    /// Not started at the source (request no longer running there, …).
    pub migrations_not_started: u64,
    /// Skipped by the round: an instance already at its migration limit,
    /// or the destination not serving.
    pub migrations_skipped: u64,
    pub migrations_committed: u64,
    /// Refused by the destination or given up by the source.
    pub migrations_aborted: u64,
    /// Of the aborted ones, those whose request had been detached and went
    /// back to the source's queue (recompute).
    pub migrations_requeued: u64,
    /// Migration messages delivered.
    pub migration_messages: u64,
    /// Replies a source state machine refused (unexpected in its state;
    /// the llumlet logs them). Should be 0.
    pub migration_messages_refused: u64,
    /// KV blocks carried by migration messages.
    pub migration_blocks: u64,
    /// Why the aborted migrations ended (`refused: NoSlot`, `aborted: Preempted`, …).
    pub migration_abort_reasons: BTreeMap<String, u64>,
    /// The request's downtime over committed migrations: detach at the
    /// source → commit at the destination (virtual µs). (The engine's
    /// `MigrationOutcome::downtime_us` runs to the source's receipt of
    /// `Committed`, a step boundary later.)
    pub migration_downtime_us_total: u64,
    pub migration_downtime_us_max: u64,
    /// Largest stop-and-copy stage, blocks.
    pub migration_last_stage_blocks_max: u32,
    /// Preemptions by the local schedulers (evictions by recompute). A
    /// request's record also counts its requeues after a failed migration
    /// (`migrations_requeued`) as preemptions: it was evicted and recomputed.
    pub preemptions: u64,
    /// Instances started by scale-up, and removed after draining.
    pub scale_ups: u64,
    pub drains: u64,
    pub removals: u64,
    /// Most instances existing at once.
    pub max_instances: u32,
    /// Requests refused at admission (they carry an error).
    pub rejected_requests: u64,
    /// Requests placed again because a failed migration had detached them
    /// and their instance could not take them back (should be 0).
    pub requests_replaced: u64,
    /// Blocks still held, and sequences still present, on any engine when
    /// the run ended (0 and 0 unless something leaked).
    pub blocks_held_at_end: u64,
    pub sequences_at_end: u64,
    /// Virtual time at the end, seconds.
    pub simulated_seconds: f64,
    /// Wall-clock time of the event loop (not a decision input), seconds.
    pub wall_seconds: f64,
    /// Wall-clock time of the set-up before it (compiling and swapping in
    /// the policy components), seconds. `FleetRecord::wall_seconds` is the sum.
    pub setup_seconds: f64,
    /// simulated_seconds / wall_seconds: the simulator's speed.
    pub speed_x: f64,
    /// simulated_seconds / (wall_seconds + setup_seconds).
    pub speed_x_with_setup: f64,
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct SimOutcome {
    /// One record per workload request, in the workload's order.
    pub records: Vec<RequestRecord>,
    pub fleet: FleetRecord,
    pub stats: SimStats,
}

/// Runs `workload` through a simulated fleet configured by `config`.
pub fn simulate(config: &SimConfig, workload: &[RequestSpec]) -> Result<SimOutcome> {
    let setup = std::time::Instant::now();
    let world = world::World::new(config, workload)?;
    world.run(setup.elapsed().as_secs_f64())
}
