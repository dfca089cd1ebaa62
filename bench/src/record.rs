//! The records that flow between the bench harness's parts: what a workload
//! asks for ([`RequestSpec`]), what a run observed per request
//! ([`RequestRecord`]) and per fleet ([`FleetRecord`]).
//!
//! **Owns**: these plain data types only. The workload generators
//! (`workload.rs`) produce `RequestSpec`s; the simulator (`sim/`) and the live
//! driver (`live.rs`) turn them into `RequestRecord`s and a `FleetRecord`;
//! the report (`report.rs`) summarises, prints, writes and plots them.
//! **Never touches**: I/O, clocks, randomness, policies.
//!
//! All times are microseconds from the start of the run (virtual time in the
//! simulator, the client's monotonic clock in the live driver).

use serde::{Deserialize, Serialize};

/// One request of a workload. Workloads are sorted by `arrival_us`, ids are
/// dense from 0 in arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSpec {
    pub id: u64,
    pub arrival_us: u64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub high_priority: bool,
}

/// What one request saw. `first_token_us` / `finish_us` are `None` when the
/// request never got that far (then `error` says why).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: u64,
    pub high_priority: bool,
    pub arrival_us: u64,
    pub prompt_tokens: u32,
    /// Tokens actually generated.
    pub output_tokens: u32,
    pub first_token_us: Option<u64>,
    pub finish_us: Option<u64>,
    /// Times the request was preempted (evicted and later recomputed).
    pub preemptions: u32,
    /// Time lost to preemption: from each eviction until the request had
    /// recomputed its way back to where it was, summed.
    pub preemption_loss_us: u64,
    /// Live migrations the request went through (committed ones).
    pub migrations: u32,
    pub error: Option<String>,
}

/// One sample of the fleet's state.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetSample {
    pub t_us: u64,
    /// Instances that exist (serving, starting or draining).
    pub instances: u32,
    /// Blocks the waiting requests (all instances) need for their prompts.
    pub waiting_demand_blocks: u64,
    /// Of those, blocks of waiting requests that would fit in the fleet's
    /// total free blocks but in no single instance's free blocks
    /// (Llumnix's fragmentation).
    pub fragmented_demand_blocks: u64,
    pub free_blocks_total: u64,
}

/// What a run observed about the fleet as a whole.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetRecord {
    /// Sum over instances of the time each existed (start-up included).
    pub instance_seconds: f64,
    pub migrations_committed: u64,
    pub migrations_aborted: u64,
    pub scale_ups: u64,
    pub scale_downs: u64,
    /// Periodic samples (the simulator samples on a fixed virtual period).
    pub samples: Vec<FleetSample>,
    /// Length of the run in (virtual or real) seconds.
    pub run_seconds: f64,
    /// Wall-clock seconds the run took (for the simulator's speed figure).
    pub wall_seconds: f64,
}

impl FleetRecord {
    /// Adds another run's figures to these (runs of one configuration
    /// pooled): counters and seconds sum, samples follow each other. Every
    /// field is named, so a new one cannot be left out.
    pub fn pool(&mut self, run: FleetRecord) {
        let FleetRecord {
            instance_seconds,
            migrations_committed,
            migrations_aborted,
            scale_ups,
            scale_downs,
            samples,
            run_seconds,
            wall_seconds,
        } = run;
        self.instance_seconds += instance_seconds;
        self.migrations_committed += migrations_committed;
        self.migrations_aborted += migrations_aborted;
        self.scale_ups += scale_ups;
        self.scale_downs += scale_downs;
        self.samples.extend(samples);
        self.run_seconds += run_seconds;
        self.wall_seconds += wall_seconds;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_sums_every_counter_of_the_runs() {
        let run = |k: u64| FleetRecord {
            instance_seconds: 4.0 * k as f64,
            migrations_committed: k,
            migrations_aborted: 2 * k,
            scale_ups: 3 * k,
            scale_downs: 4 * k,
            samples: Vec::new(),
            run_seconds: k as f64,
            wall_seconds: 0.5 * k as f64,
        };
        let mut total = FleetRecord::default();
        total.pool(run(1));
        total.pool(run(2));
        assert_eq!(total, run(3));
    }
}
