//! Plain-Rust mirrors of the records in `policies-wit/policy.wit`
//! (`llumen:policy/types`). Field meanings are documented there; the names
//! here are the same with `_` for `-`.

/// Stable identifier of an engine instance.
pub type InstanceId = u32;
/// Identifier of a request.
pub type RequestId = u64;

/// Raw counters one instance reports after an engine step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InstanceLoad {
    pub instance: InstanceId,
    pub timestamp_us: u64,
    pub block_size: u32,
    pub total_blocks: u32,
    pub used_blocks: u32,
    pub watermark_blocks: u32,
    pub running: u32,
    pub waiting: u32,
    pub preempted: u32,
    pub head_of_line_demand_blocks: u32,
    pub waiting_demand_blocks: u32,
    pub high_priority_requests: u32,
    pub headroom_blocks: u32,
    pub migrating_out: u32,
    pub migrating_in: u32,
    pub step_latency_us: u32,
    pub draining: bool,
}

impl InstanceLoad {
    /// This load with one more waiting request of `prompt_tokens` (the
    /// global scheduler's own count of a request it just dispatched here,
    /// until the instance's next snapshot shows it).
    pub fn with_dispatched(mut self, prompt_tokens: u32) -> InstanceLoad {
        let demand = prompt_tokens.div_ceil(self.block_size.max(1));
        if self.waiting == 0 {
            self.head_of_line_demand_blocks = demand;
        }
        self.waiting = self.waiting.saturating_add(1);
        self.waiting_demand_blocks = self.waiting_demand_blocks.saturating_add(demand);
        self
    }

    /// Free blocks above the watermark (negative when the instance is
    /// already below it).
    pub fn available_blocks(&self) -> i64 {
        i64::from(self.total_blocks)
            - i64::from(self.used_blocks)
            - i64::from(self.watermark_blocks)
    }

    /// Requests on the instance, running or waiting.
    pub fn requests(&self) -> u32 {
        self.running.saturating_add(self.waiting)
    }

    /// True while a migration goes in or out of the instance.
    pub fn migrating(&self) -> bool {
        self.migrating_in > 0 || self.migrating_out > 0
    }
}

/// What a policy knows of a request when it is dispatched or prioritised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RequestMeta {
    pub id: RequestId,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub requested_priority: u8,
    pub priority: u8,
    pub prefix_hash: u64,
    pub arrival_us: u64,
}

/// A running request that could be migrated away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MigrationCandidate {
    pub id: RequestId,
    pub priority: u8,
    pub blocks: u32,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub arrival_us: u64,
}

/// Move requests from `source` to `destination`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationPair {
    pub source: InstanceId,
    pub destination: InstanceId,
}

/// The priority policy's answer for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PriorityAssignment {
    pub priority: u8,
    pub headroom_blocks: u32,
}

/// The scaling policy's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScalingDecision {
    Hold,
    ScaleUp(u32),
    Drain(InstanceId),
}

/// Name and version of a policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolicyInfo {
    pub name: String,
    pub version: String,
}
