//! The host side of the WIT boundary: wasmtime bindings for
//! `llumen:policy`, conversions to and from the logic crate's types, the
//! per-store state (memory cap, history access) and the history import.

use std::sync::Arc;

use llumen_policy_logic as logic;
use wasmtime::component::HasSelf;

use super::history::SnapshotHistory;

wasmtime::component::bindgen!({
    path: "../policies-wit",
    world: "configurable-policy",
});

pub use exports::llumen::policy::{dispatch, fleet, migration, params, priority, scaling};
pub use llumen::policy::types as wit;

/// Everything a policy's store carries.
pub struct GuestState {
    pub limits: MemoryCap,
    pub history: Arc<dyn SnapshotHistory>,
    /// Most snapshots one `history.recent` call returns.
    pub history_max: u32,
}

/// A memory and table cap that remembers it was hit, so a trap caused by it
/// is reported as memory exhaustion.
pub struct MemoryCap {
    pub max_memory_bytes: usize,
    pub max_table_elements: usize,
    pub exceeded: bool,
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory_bytes {
            self.exceeded = true;
            wasmtime::bail!(
                "policy memory cap of {} bytes exceeded (wanted {desired})",
                self.max_memory_bytes
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_table_elements {
            self.exceeded = true;
            wasmtime::bail!(
                "policy table cap of {} elements exceeded",
                self.max_table_elements
            );
        }
        Ok(true)
    }
}

impl llumen::policy::types::Host for GuestState {}

impl llumen::policy::history::Host for GuestState {
    fn recent(&mut self, instance: wit::InstanceId, max: u32) -> Vec<wit::InstanceLoad> {
        let max = max.min(self.history_max) as usize;
        self.history
            .recent(instance, max)
            .iter()
            .map(load_to_wit)
            .collect()
    }
}

/// Adds the only import a policy may have, `llumen:policy/history`.
pub fn add_imports(linker: &mut wasmtime::component::Linker<GuestState>) -> wasmtime::Result<()> {
    ConfigurablePolicy::add_to_linker::<GuestState, HasSelf<GuestState>>(linker, |s| s)
}

pub fn load_to_wit(l: &logic::InstanceLoad) -> wit::InstanceLoad {
    wit::InstanceLoad {
        instance: l.instance,
        timestamp_us: l.timestamp_us,
        block_size: l.block_size,
        total_blocks: l.total_blocks,
        used_blocks: l.used_blocks,
        watermark_blocks: l.watermark_blocks,
        running: l.running,
        waiting: l.waiting,
        preempted: l.preempted,
        head_of_line_demand_blocks: l.head_of_line_demand_blocks,
        waiting_demand_blocks: l.waiting_demand_blocks,
        high_priority_requests: l.high_priority_requests,
        headroom_blocks: l.headroom_blocks,
        migrating_out: l.migrating_out,
        migrating_in: l.migrating_in,
        step_latency_us: l.step_latency_us,
        draining: l.draining,
    }
}

pub fn request_to_wit(r: &logic::RequestMeta) -> wit::RequestMeta {
    wit::RequestMeta {
        id: r.id,
        prompt_tokens: r.prompt_tokens,
        max_tokens: r.max_tokens,
        requested_priority: r.requested_priority,
        priority: r.priority,
        prefix_hash: r.prefix_hash,
        arrival_us: r.arrival_us,
    }
}

pub fn candidate_to_wit(c: &logic::MigrationCandidate) -> wit::MigrationCandidate {
    wit::MigrationCandidate {
        id: c.id,
        priority: c.priority,
        blocks: c.blocks,
        prompt_tokens: c.prompt_tokens,
        output_tokens: c.output_tokens,
        arrival_us: c.arrival_us,
    }
}

pub fn pair_to_wit(p: logic::MigrationPair) -> wit::MigrationPair {
    wit::MigrationPair {
        source: p.source,
        destination: p.destination,
    }
}

pub fn pair_from_wit(p: wit::MigrationPair) -> logic::MigrationPair {
    logic::MigrationPair {
        source: p.source,
        destination: p.destination,
    }
}

pub fn scaling_from_wit(d: wit::ScalingDecision) -> logic::ScalingDecision {
    match d {
        wit::ScalingDecision::Hold => logic::ScalingDecision::Hold,
        wit::ScalingDecision::ScaleUp(k) => logic::ScalingDecision::ScaleUp(k),
        wit::ScalingDecision::Drain(i) => logic::ScalingDecision::Drain(i),
    }
}
