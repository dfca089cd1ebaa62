//! The Wasm policy runtime: every scheduling decision goes through here.
//!
//! [`PolicyRuntime`] holds one slot per [`PolicyKind`]. A slot's active
//! policy is a sandboxed component (wasmtime, component model, no WASI: the
//! only import is read-only snapshot history) with a hard per-call deadline
//! (epoch interruption that traps) and a memory cap. Every answer is
//! validated; when the active version traps, times out, exhausts its memory
//! or answers nonsense, the call is answered by the last good version, else
//! by the built-in native implementation, the failure is counted, and after
//! `max_consecutive_failures` in a row (or `max_failures_in_window` of its
//! last `failure_window` calls) the version is demoted. Hot swap
//! type-checks and trial-calls a candidate off the hot path, then swaps it in
//! between two calls; rollback restores the previous version.
//!
//! Retry with exponential back-off: a demoted version is re-activated on
//! probation once `retry_backoff` has passed (on the runtime's [`Clock`],
//! injectable for tests); any failure on probation demotes it again with
//! twice the back-off (capped at `max_retry_backoff`), `probation_calls`
//! good answers in a row end the probation and forget the back-off, and an
//! admin swap or rollback cancels both. One demoted version waits per slot
//! (the latest).
//!
//! Decision latency (the whole fallback chain included) goes into a
//! histogram per slot. Two clock reads cost about a tenth of a decision, so
//! a settled slot times one decision in [`LATENCY_SAMPLE_EVERY`] and counts
//! it that many times; an unsettled one (a version active for fewer than
//! [`SETTLE_CALLS`] decisions, a failure among the active version's last 64
//! calls, a probation or a pending retry) times every decision. The
//! selection never depends on the decision's own latency, so the weighted
//! histogram estimates the true distribution, and every slow decision of a
//! misbehaving version is timed.
//!
//! Data path: the runtime keeps the authoritative fleet table (latest load
//! per instance) and a change log; before each call it sends a policy only
//! the loads that changed since its last call (`fleet.upsert`), so a
//! decision call carries just the request.
//!
//! This module owns the policies' sandbox and the decision API. It must never
//! act on a decision itself (the scheduler does), never let an unvalidated
//! answer out, and never block on anything but its own slot and fleet locks.

mod bindings;
mod clock;
mod component;
mod decide;
mod error;
mod history;
mod latency;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use llumen_policy_logic::{
    self as logic, Fleet, InstanceId, InstanceLoad, MigrationCandidate, MigrationPair, Policy,
    PriorityAssignment, RequestId, RequestMeta, ScalingDecision,
};
use serde::Serialize;

/// The WIT-generated records and the conversions to them (for callers that
/// drive a [`LiveInstance`] directly, such as benchmarks).
pub use bindings::{load_to_wit, request_to_wit, wit};
pub use clock::{Clock, ManualClock};
pub use component::{componentize, CompiledPolicy, LiveInstance, PolicyEngine, PolicySha};
pub use decide::RuntimeDecide;
pub use error::PolicyError;
pub use history::{RecentHistory, SnapshotHistory, StoreHistory};
use latency::LatencyHistogram;
pub use latency::LatencySummary;

/// The four kinds of scheduling decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    Dispatch,
    Migration,
    Priority,
    Scaling,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 4] = [
        Self::Dispatch,
        Self::Migration,
        Self::Priority,
        Self::Scaling,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The WIT interface name (`dispatch`, `migration`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dispatch => "dispatch",
            Self::Migration => "migration",
            Self::Priority => "priority",
            Self::Scaling => "scaling",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown policy kind {s:?} (expected dispatch, migration, priority or scaling)"
                )
            })
    }
}

/// Limits and knobs of the runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Hard deadline of one call into a policy (epoch interruption traps).
    /// Wall-clock: it also counts time the OS spends running other threads,
    /// so it is set far above a decision's cost (µs) to keep a loaded host
    /// from failing honest calls. Default 50 ms.
    pub call_deadline: Duration,
    /// Granularity of the deadline: how often the epoch advances.
    pub epoch_tick: Duration,
    /// Linear-memory cap of one policy instance.
    pub memory_limit_bytes: usize,
    /// Most snapshots one `history.recent` call returns.
    pub history_max: u32,
    /// Failures in a row after which the active version is demoted.
    pub max_consecutive_failures: u32,
    /// Failures among the active version's last `failure_window` calls after
    /// which it is demoted even when they were not in a row (a policy whose
    /// every other call times out). 0 turns this rule off.
    pub max_failures_in_window: u32,
    /// Calls the rule above looks back over (at most 64).
    pub failure_window: u32,
    /// Wait before a demoted version is retried on probation; it doubles
    /// with each further demotion of that version on probation. Zero: a
    /// demoted version is never retried.
    pub retry_backoff: Duration,
    /// Cap of the doubling back-off.
    pub max_retry_backoff: Duration,
    /// Good answers in a row that end a retried version's probation (and
    /// forget its back-off). Any failure on probation demotes it again.
    pub probation_calls: u32,
    /// Time source of the retry back-off (tests pass a [`ManualClock`]'s).
    pub clock: Clock,
    /// Largest scale-up one scaling answer may ask for.
    pub max_scale_up: u32,
    /// Send each observed load to the idle policies at once (off the
    /// decision path) rather than only at their next call.
    pub eager_sync: bool,
}

/// Why a call into a policy did not produce a usable answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    #[error("deadline exceeded")]
    Timeout,
    #[error("memory cap exceeded")]
    MemoryLimit,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("invalid answer: {0}")]
    Invalid(String),
    #[error("could not be instantiated: {0}")]
    Unavailable(String),
}

impl CallFailure {
    fn wrong_kind() -> Self {
        CallFailure::Unavailable("instance serves another kind of call".into())
    }

    /// A failure after which the instance must not be called again.
    fn poisons(&self) -> bool {
        !matches!(self, CallFailure::Invalid(_))
    }
}

/// Which implementation produced an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "kebab-case")]
pub enum DecisionSource {
    /// The active Wasm version.
    Active { name: Arc<str>, sha256: PolicySha },
    /// The previous Wasm version, standing in for a failed active one.
    LastGood { name: Arc<str>, sha256: PolicySha },
    /// The host's native implementation.
    Builtin { name: Arc<str> },
}

/// A validated answer, where it came from, and what went wrong with the
/// active version if it was not the one answering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision<T> {
    pub value: T,
    pub source: DecisionSource,
    pub failure: Option<CallFailure>,
}

/// Counters of one policy version in one slot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VersionStats {
    pub calls: u64,
    pub timeouts: u64,
    pub memory_limits: u64,
    pub traps: u64,
    pub invalid_answers: u64,
    pub unavailable: u64,
    /// Calls answered by this version as a stand-in for a failed active one.
    pub answered_as_fallback: u64,
    /// Times this version was demoted after repeated failures.
    pub demotions: u64,
    /// Times this version was re-activated on probation after a demotion.
    pub retries: u64,
    /// Latency is measured on one active call in [`LATENCY_SAMPLE_EVERY`]
    /// (reading the clock costs about as much as a tenth of a decision).
    pub sampled_calls: u64,
    pub sampled_call_ns_total: u64,
    pub max_sampled_call_ns: u64,
}

/// One active-version call in this many is timed (and one decision in this
/// many of a settled slot).
pub const LATENCY_SAMPLE_EVERY: u64 = 8;

/// Decisions after a version becomes active (swap, rollback, demotion,
/// retry) during which every decision is timed.
pub const SETTLE_CALLS: u32 = 64;

impl VersionStats {
    fn merge(&mut self, o: &VersionStats) {
        self.calls += o.calls;
        self.timeouts += o.timeouts;
        self.memory_limits += o.memory_limits;
        self.traps += o.traps;
        self.invalid_answers += o.invalid_answers;
        self.unavailable += o.unavailable;
        self.answered_as_fallback += o.answered_as_fallback;
        self.demotions += o.demotions;
        self.retries += o.retries;
        self.sampled_calls += o.sampled_calls;
        self.sampled_call_ns_total += o.sampled_call_ns_total;
        self.max_sampled_call_ns = self.max_sampled_call_ns.max(o.max_sampled_call_ns);
    }

    fn count_failure(&mut self, f: &CallFailure) {
        match f {
            CallFailure::Timeout => self.timeouts += 1,
            CallFailure::MemoryLimit => self.memory_limits += 1,
            CallFailure::Trap(_) => self.traps += 1,
            CallFailure::Invalid(_) => self.invalid_answers += 1,
            CallFailure::Unavailable(_) => self.unavailable += 1,
        }
    }

    /// Failed calls of every sort.
    pub fn failures(&self) -> u64 {
        self.timeouts + self.memory_limits + self.traps + self.invalid_answers + self.unavailable
    }
}

/// What a slot runs now, for status displays.
#[derive(Clone, Debug, Serialize)]
pub struct SlotStatus {
    pub kind: PolicyKind,
    /// Active Wasm version (None: the builtin serves).
    pub active: Option<VersionInfo>,
    /// Earlier versions, newest last (rollback order).
    pub previous: Vec<VersionInfo>,
    pub builtin: String,
    /// Per version label (`<name>@<sha256 prefix>` or `builtin:<name>`).
    pub stats: BTreeMap<String, VersionStats>,
    /// Demotions in this slot (all versions) since the runtime started.
    pub demotions: u64,
    /// Re-activations of demoted versions on probation.
    pub retries: u64,
    /// The active version, when it is a retried one still on probation.
    pub probation: Option<ProbationStatus>,
    /// A demoted version waiting to be retried.
    pub pending_retry: Option<PendingRetryStatus>,
    /// Latency of this slot's decisions, fallbacks included (decisions with
    /// only one possible answer, which ask no policy, are not counted); a
    /// weighted sample, see the module documentation.
    pub decision_latency: LatencySummary,
}

/// A retried version on probation.
#[derive(Clone, Debug, Serialize)]
pub struct ProbationStatus {
    pub version: VersionInfo,
    /// Good answers so far, of `needed` in a row.
    pub good_calls: u32,
    pub needed: u32,
    /// The back-off it waited; the next demotion doubles it.
    pub backoff_ms: u64,
}

/// A demoted version and when it will be retried.
#[derive(Clone, Debug, Serialize)]
pub struct PendingRetryStatus {
    pub version: VersionInfo,
    pub backoff_ms: u64,
    /// Time left until the retry (0: at the slot's next call).
    pub retry_in_ms: u64,
}

/// Identity of one policy version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    pub name: Arc<str>,
    pub version: String,
    pub sha256: PolicySha,
    /// The parameters it is configured with, `name=value` each.
    pub params: Vec<String>,
}

impl From<&CompiledPolicy> for VersionInfo {
    fn from(p: &CompiledPolicy) -> Self {
        Self {
            name: p.name.clone(),
            version: p.version.clone(),
            sha256: p.sha256.clone(),
            params: p.params.iter().map(ToString::to_string).collect(),
        }
    }
}

/// The authoritative fleet view plus a log of which instances changed when.
struct FleetTable {
    fleet: Fleet,
    /// Sequence number of the latest change.
    seq: u64,
    /// (sequence number, instance) of recent changes, ascending.
    log: Vec<(u64, InstanceId)>,
    /// Changes up to and including this sequence number are no longer in `log`.
    log_floor: u64,
}

const FLEET_LOG_MAX: usize = 8192;

impl FleetTable {
    fn changed(&mut self, instance: InstanceId) {
        self.seq += 1;
        if self.log.len() >= FLEET_LOG_MAX {
            let cut = FLEET_LOG_MAX / 2;
            self.log_floor = self.log[cut - 1].0;
            self.log.drain(..cut);
        }
        self.log.push((self.seq, instance));
    }

    /// Brings a policy instance's view up to date: only what changed since
    /// its last sync, or everything if it is new or too far behind.
    fn sync(&self, live: &mut LiveInstance) -> Result<(), CallFailure> {
        if live.synced_seq == self.seq {
            return Ok(());
        }
        if live.synced_seq < self.log_floor || live.synced_seq == 0 {
            let all: Vec<_> = self
                .fleet
                .loads()
                .iter()
                .map(bindings::load_to_wit)
                .collect();
            live.reset(&all)?;
        } else {
            let start = self.log.partition_point(|&(s, _)| s <= live.synced_seq);
            let mut ids: Vec<InstanceId> = self.log[start..].iter().map(|&(_, id)| id).collect();
            ids.sort_unstable();
            ids.dedup();
            let mut upserts = Vec::with_capacity(ids.len());
            for id in ids {
                match self.fleet.get(id) {
                    Some(load) => upserts.push(bindings::load_to_wit(load)),
                    None => live.remove(id)?,
                }
            }
            if !upserts.is_empty() {
                live.upsert(&upserts)?;
            }
        }
        live.synced_seq = self.seq;
        Ok(())
    }
}

struct Slot {
    kind: PolicyKind,
    active: Option<Arc<CompiledPolicy>>,
    /// The instance serving the active version (None until first use or after a trap).
    live: Option<LiveInstance>,
    /// Earlier versions, newest last; the last is the "last good" fallback.
    previous: Vec<Arc<CompiledPolicy>>,
    /// Instance of `previous.last()`, made when first needed.
    fallback_live: Option<LiveInstance>,
    builtin: Box<dyn Policy>,
    /// `builtin`'s name, and its stats label (`builtin:<name>`).
    builtin_name: Arc<str>,
    builtin_label: String,
    consecutive_failures: u32,
    /// The active version's recent outcomes, newest in bit 0 (1: failed).
    recent_outcomes: u64,
    /// Set while the active version is a retried one on probation.
    probation: Option<Probation>,
    /// A demoted version waiting for its retry.
    pending_retry: Option<PendingRetry>,
    demotions: u64,
    retries: u64,
    decision_latency: LatencyHistogram,
    /// Decisions asked of this slot (for the 1-in-8 sampling).
    decisions: u64,
    /// Decisions left to time exactly since the active version changed.
    settling: u32,
    /// Counters of the active version (kept apart: they are bumped on every
    /// call), folded into `stats` when it stops being active.
    active_stats: VersionStats,
    /// Counters of every other version and of the builtin, by label.
    stats: BTreeMap<String, VersionStats>,
}

/// A retried version's probation.
struct Probation {
    /// The back-off it waited before this retry.
    backoff: Duration,
    good_calls: u32,
}

/// A demoted version waiting for its retry.
struct PendingRetry {
    policy: Arc<CompiledPolicy>,
    at: Instant,
    backoff: Duration,
}

impl Slot {
    /// Makes `policy` (served by `fresh`) the active version, with the native
    /// builtin of the same name behind it; returns the version it replaces.
    /// An admin's choice: any probation and pending retry are cancelled.
    fn activate(
        &mut self,
        policy: Arc<CompiledPolicy>,
        fresh: LiveInstance,
    ) -> Option<Arc<CompiledPolicy>> {
        self.fold_active_stats();
        self.set_builtin(&policy.name, &policy.params);
        self.live = Some(fresh);
        self.fallback_live = None;
        self.reset_outcomes();
        self.settling = SETTLE_CALLS;
        self.probation = None;
        if let Some(cancelled) = self.pending_retry.take() {
            tracing::info!(kind = %self.kind, policy = %cancelled.policy.label, "pending retry cancelled by an admin swap");
        }
        self.active.replace(policy)
    }

    fn reset_outcomes(&mut self) {
        self.consecutive_failures = 0;
        self.recent_outcomes = 0;
    }

    /// How many decisions the next one counts for in the latency histogram
    /// (0: not timed); see the module documentation.
    fn latency_weight(&mut self) -> u64 {
        let unsettled = self.settling > 0
            || self.recent_outcomes != 0
            || self.probation.is_some()
            || self.pending_retry.is_some();
        self.settling = self.settling.saturating_sub(1);
        let n = self.decisions;
        self.decisions += 1;
        if unsettled {
            1
        } else if n.is_multiple_of(LATENCY_SAMPLE_EVERY) {
            LATENCY_SAMPLE_EVERY
        } else {
            0
        }
    }

    /// Records the active version's outcome; true when it must be demoted.
    fn record_outcome(&mut self, failed: bool, config: &RuntimeConfig) -> bool {
        self.recent_outcomes = (self.recent_outcomes << 1) | u64::from(failed);
        if !failed {
            self.consecutive_failures = 0;
            if let Some(p) = &mut self.probation {
                p.good_calls += 1;
                if p.good_calls >= config.probation_calls {
                    self.probation = None;
                    tracing::info!(kind = %self.kind, policy = %self.active.as_deref().map(|p| p.label.as_str()).unwrap_or(""), "retried policy passed its probation");
                }
            }
            return false;
        }
        self.consecutive_failures += 1;
        let window = config.failure_window.min(64);
        let mask = if window >= 64 {
            u64::MAX
        } else {
            (1u64 << window) - 1
        };
        self.probation.is_some()
            || self.consecutive_failures >= config.max_consecutive_failures
            || (config.max_failures_in_window > 0
                && (self.recent_outcomes & mask).count_ones() >= config.max_failures_in_window)
    }

    /// Moves the active version's counters into `stats`; call before the
    /// active version changes.
    fn fold_active_stats(&mut self) {
        let counters = std::mem::take(&mut self.active_stats);
        if let Some(active) = &self.active {
            stats_of(&mut self.stats, &active.label).merge(&counters);
        }
    }

    fn set_builtin(&mut self, name: &str, params: &[logic::Param]) {
        self.builtin = builtin_for(name, params);
        let name = self.builtin.info().name;
        self.builtin_label = format!("builtin:{name}");
        self.builtin_name = name.into();
    }
}

/// The native policy named `name` with `params` (llumnix with its defaults
/// when there is none by that name; parameters were checked against it by
/// [`PolicyRuntime::configure`], so a refusal here falls back the same way).
fn builtin_for(name: &str, params: &[logic::Param]) -> Box<dyn Policy> {
    match logic::configured(name, params) {
        Ok(Some(policy)) => policy,
        Ok(None) | Err(_) => Box::new(logic::Llumnix::default()),
    }
}

/// The counters under `label`, creating them on first use (no allocation
/// once they exist: this is on every call's path).
fn stats_of<'a>(
    stats: &'a mut BTreeMap<String, VersionStats>,
    label: &str,
) -> &'a mut VersionStats {
    if !stats.contains_key(label) {
        stats.insert(label.to_owned(), VersionStats::default());
    }
    stats.get_mut(label).expect("inserted above")
}

/// All four policy slots, the fleet table and the engine behind them.
pub struct PolicyRuntime {
    engine: PolicyEngine,
    history: Arc<dyn SnapshotHistory>,
    fleet: RwLock<FleetTable>,
    slots: [Mutex<Slot>; 4],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PolicyRuntime {
    /// A runtime whose slots all start on the built-in `builtin` policy
    /// (e.g. `"llumnix"`), with an in-memory snapshot history.
    pub fn new(config: RuntimeConfig, builtin: &str) -> Result<Self, PolicyError> {
        Self::with_history(config, builtin, Arc::new(RecentHistory::new(1024)))
    }

    /// As [`PolicyRuntime::new`], reading and recording snapshots in `history`.
    pub fn with_history(
        config: RuntimeConfig,
        builtin: &str,
        history: Arc<dyn SnapshotHistory>,
    ) -> Result<Self, PolicyError> {
        let engine = PolicyEngine::new(config, history.clone())?;
        let slot = |kind| {
            let mut slot = Slot {
                kind,
                active: None,
                live: None,
                previous: Vec::new(),
                fallback_live: None,
                builtin: builtin_for(builtin, &[]),
                builtin_name: "".into(),
                builtin_label: String::new(),
                consecutive_failures: 0,
                recent_outcomes: 0,
                probation: None,
                pending_retry: None,
                demotions: 0,
                retries: 0,
                decision_latency: LatencyHistogram::default(),
                decisions: 0,
                settling: SETTLE_CALLS,
                active_stats: VersionStats::default(),
                stats: BTreeMap::new(),
            };
            slot.set_builtin(builtin, &[]);
            Mutex::new(slot)
        };
        Ok(Self {
            engine,
            history,
            fleet: RwLock::new(FleetTable {
                fleet: Fleet::new(),
                seq: 0,
                log: Vec::new(),
                log_floor: 0,
            }),
            slots: PolicyKind::ALL.map(slot),
        })
    }

    /// Compiles a component (or a wit-bindgen core module) into a policy.
    pub fn compile(&self, bytes: &[u8]) -> Result<Arc<CompiledPolicy>, PolicyError> {
        self.engine.compile(bytes)
    }

    /// Reads and compiles a policy file.
    pub fn compile_file(&self, path: &std::path::Path) -> Result<Arc<CompiledPolicy>, PolicyError> {
        let bytes = std::fs::read(path).map_err(|source| PolicyError::Read {
            path: path.into(),
            source,
        })?;
        self.compile(&bytes)
    }

    /// `policy` with `params` set, as a new version (see
    /// [`CompiledPolicy::params`]): refused when the component refuses them,
    /// or when the host's native builtin of the same name (its fallback)
    /// does, so that the fallback decides by the same rules.
    pub fn configure(
        &self,
        policy: &Arc<CompiledPolicy>,
        params: &[logic::Param],
    ) -> Result<Arc<CompiledPolicy>, PolicyError> {
        let configured = self.engine.configure(policy, params)?;
        if let Err(e) = logic::configured(&policy.name, params) {
            return Err(PolicyError::Params {
                policy: format!("builtin:{}", policy.name),
                message: e.to_string(),
            });
        }
        Ok(configured)
    }

    /// The parameters `policy` takes, with their defaults.
    pub fn describe(
        &self,
        policy: &Arc<CompiledPolicy>,
    ) -> Result<Vec<logic::ParamSpec>, PolicyError> {
        self.engine.describe(policy)
    }

    /// Sets the parameters of every slot's native builtin (the policy that
    /// decides while no component is active, and the last fallback): for
    /// runs on the builtin alone. Refused, with nothing changed, when the
    /// builtin refuses them.
    pub fn configure_builtin(&self, params: &[logic::Param]) -> Result<(), PolicyError> {
        for slot in &self.slots {
            let name = lock(slot).builtin_name.clone();
            if let Err(e) = logic::configured(&name, params) {
                return Err(PolicyError::Params {
                    policy: format!("builtin:{name}"),
                    message: e.to_string(),
                });
            }
        }
        for slot in &self.slots {
            let mut slot = lock(slot);
            let name = slot.builtin_name.clone();
            slot.set_builtin(&name, params);
        }
        Ok(())
    }

    /// A standalone instance of `policy` for `kind`, outside any slot: for
    /// tools that drive a policy directly (benchmarks, replay).
    pub fn instantiate(
        &self,
        policy: &Arc<CompiledPolicy>,
        kind: PolicyKind,
    ) -> Result<LiveInstance, PolicyError> {
        self.engine.instantiate(policy, kind)
    }

    // ----- the fleet view -----

    /// Records an instance's new load snapshot and, with `eager_sync`, sends
    /// it on to the policies that are idle right now.
    pub fn observe(&self, load: InstanceLoad) {
        self.history.record(&load);
        {
            let mut table = self.fleet.write().unwrap_or_else(|e| e.into_inner());
            table.fleet.upsert([load]);
            table.changed(load.instance);
        }
        if self.engine.config().eager_sync {
            self.push_changes();
        }
    }

    /// Forgets an instance that left the fleet.
    pub fn remove_instance(&self, instance: InstanceId) {
        let removed = {
            let mut table = self.fleet.write().unwrap_or_else(|e| e.into_inner());
            let removed = table.fleet.remove(instance);
            if removed {
                table.changed(instance);
            }
            removed
        };
        if removed && self.engine.config().eager_sync {
            self.push_changes();
        }
    }

    /// Sends pending fleet changes to each slot's live instance, off the
    /// decision path. A slot busy with a call is skipped: its next call
    /// syncs first anyway. A policy that fails while being updated is
    /// counted and dropped like one that fails a call.
    fn push_changes(&self) {
        for slot in &self.slots {
            let Ok(mut guard) = slot.try_lock() else {
                continue;
            };
            let slot = &mut *guard;
            let Some(live) = slot.live.as_mut() else {
                continue;
            };
            let result = self
                .fleet
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .sync(live);
            if let Err(failure) = result {
                let label = live.policy.label.clone();
                slot.active_stats.count_failure(&failure);
                tracing::warn!(kind = %slot.kind, policy = %label, %failure, "policy failed a fleet update");
                slot.live = None;
            }
        }
    }

    /// A copy of the current fleet view.
    pub fn fleet(&self) -> Fleet {
        self.fleet
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .fleet
            .clone()
    }

    // ----- decisions -----

    /// The instance that serves `request`; `None` only when no instance
    /// accepts requests (then no policy is asked).
    ///
    /// The chosen instance's load in the fleet view then counts the request
    /// as waiting there (its prompt as waiting demand) until the instance's
    /// next snapshot replaces it: an instance applies new requests only
    /// between engine steps, and without this every arrival of a step
    /// would see the same stale loads and go to the same instance.
    pub fn dispatch(&self, request: &RequestMeta) -> Decision<Option<InstanceId>> {
        let wit_request = bindings::request_to_wit(request);
        let decision = self.decide(
            PolicyKind::Dispatch,
            |fleet| fleet.serving().next().is_none().then_some(None),
            |live, fleet| {
                live.dispatch(wit_request)
                    .and_then(|id| validate::dispatch(id, fleet))
                    .map(Some)
            },
            |p, fleet| p.dispatch(fleet, request),
        );
        if let Some(instance) = decision.value {
            self.count_dispatched(instance, request);
        }
        decision
    }

    /// Adds a just-dispatched request to `instance`'s load in the fleet
    /// view (not to the recorded history: the instance's own snapshots are
    /// the record).
    fn count_dispatched(&self, instance: InstanceId, request: &RequestMeta) {
        {
            let mut table = self.fleet.write().unwrap_or_else(|e| e.into_inner());
            let Some(load) = table.fleet.get(instance).copied() else {
                return;
            };
            table
                .fleet
                .upsert([load.with_dispatched(request.prompt_tokens)]);
            table.changed(instance);
        }
        if self.engine.config().eager_sync {
            self.push_changes();
        }
    }

    /// Migration pairs for this period.
    pub fn plan_migration(&self) -> Decision<Vec<MigrationPair>> {
        self.decide(
            PolicyKind::Migration,
            |fleet| (fleet.len() < 2).then(Vec::new),
            |live, fleet| {
                let pairs = live
                    .plan()?
                    .into_iter()
                    .map(bindings::pair_from_wit)
                    .collect();
                validate::plan(pairs, fleet)
            },
            |p, fleet| p.plan_migration(fleet),
        )
    }

    /// Which of the source's `candidates` move for `pair`.
    pub fn choose_migrations(
        &self,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Decision<Vec<RequestId>> {
        let wit_candidates: Vec<_> = candidates.iter().map(bindings::candidate_to_wit).collect();
        self.decide(
            PolicyKind::Migration,
            |_| candidates.is_empty().then(Vec::new),
            |live, _| {
                live.choose(bindings::pair_to_wit(pair), &wit_candidates)
                    .and_then(|ids| validate::choose(ids, candidates))
            },
            |p, fleet| p.choose_migrations(fleet, pair, candidates),
        )
    }

    /// Scheduling priority and headroom of a new request.
    pub fn assign_priority(&self, request: &RequestMeta) -> Decision<PriorityAssignment> {
        let wit_request = bindings::request_to_wit(request);
        self.decide(
            PolicyKind::Priority,
            |_| None,
            |live, fleet| {
                let a = live.assign(wit_request)?;
                validate::assign(
                    PriorityAssignment {
                        priority: a.priority,
                        headroom_blocks: a.headroom_blocks,
                    },
                    fleet,
                )
            },
            |p, fleet| p.assign_priority(fleet, request),
        )
    }

    /// Grow, shrink or hold the fleet.
    pub fn decide_scaling(&self) -> Decision<ScalingDecision> {
        let max = self.engine.config().max_scale_up;
        self.decide(
            PolicyKind::Scaling,
            |_| None,
            |live, fleet| validate::scaling(bindings::scaling_from_wit(live.decide()?), fleet, max),
            |p, fleet| p.decide_scaling(fleet),
        )
    }

    /// One decision: the active version, else the last good one, else the
    /// builtin. `trivial` answers without asking anyone when the question
    /// has only one answer (e.g. no instance to dispatch to). A demoted
    /// version whose back-off has passed is retried first.
    fn decide<T: Clone>(
        &self,
        kind: PolicyKind,
        trivial: impl FnOnce(&Fleet) -> Option<T>,
        wasm: impl Fn(&mut LiveInstance, &Fleet) -> Result<T, CallFailure>,
        native: impl FnOnce(&mut dyn Policy, &Fleet) -> T,
    ) -> Decision<T> {
        let mut guard = lock(&self.slots[kind.index()]);
        let slot = &mut *guard;
        let table = self.fleet.read().unwrap_or_else(|e| e.into_inner());
        if let Some(value) = trivial(&table.fleet) {
            let name = slot.builtin_name.clone();
            return Decision {
                value,
                source: DecisionSource::Builtin { name },
                failure: None,
            };
        }
        let weight = slot.latency_weight();
        let started = (weight > 0).then(Instant::now);
        self.retry_if_due(slot);
        let decision = self.decide_locked(slot, kind, &table, &wasm, native);
        if let Some(started) = started {
            let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            slot.decision_latency.record(elapsed, weight);
        }
        decision
    }

    /// [`Self::decide`] past the trivial case, with the slot locked.
    fn decide_locked<T: Clone>(
        &self,
        slot: &mut Slot,
        kind: PolicyKind,
        table: &FleetTable,
        wasm: &impl Fn(&mut LiveInstance, &Fleet) -> Result<T, CallFailure>,
        native: impl FnOnce(&mut dyn Policy, &Fleet) -> T,
    ) -> Decision<T> {
        let config = self.engine.config();
        let mut failure = None;
        if let Some(active) = slot.active.clone() {
            let stats = &mut slot.active_stats;
            let started = stats
                .calls
                .is_multiple_of(LATENCY_SAMPLE_EVERY)
                .then(Instant::now);
            stats.calls += 1;
            let result = self.call_live(&mut slot.live, &active, kind, table, wasm);
            if let Some(started) = started {
                let elapsed = started.elapsed().as_nanos() as u64;
                stats.sampled_calls += 1;
                stats.sampled_call_ns_total += elapsed;
                stats.max_sampled_call_ns = stats.max_sampled_call_ns.max(elapsed);
            }
            match result {
                Ok(value) => {
                    slot.record_outcome(false, config);
                    return Decision {
                        value,
                        source: DecisionSource::Active {
                            name: active.name.clone(),
                            sha256: active.sha256.clone(),
                        },
                        failure: None,
                    };
                }
                Err(f) => {
                    stats.count_failure(&f);
                    tracing::warn!(%kind, policy = %active.label, failure = %f, "policy call failed; falling back");
                    failure = Some(f);
                }
            }
            let demote = slot.record_outcome(true, config);
            if let Some(previous) = slot.previous.last().cloned() {
                let result = self.call_live(&mut slot.fallback_live, &previous, kind, table, wasm);
                let stats = stats_of(&mut slot.stats, &previous.label);
                stats.calls += 1;
                match result {
                    Ok(value) => {
                        stats.answered_as_fallback += 1;
                        if demote {
                            self.demote(slot);
                        }
                        return Decision {
                            value,
                            source: DecisionSource::LastGood {
                                name: previous.name.clone(),
                                sha256: previous.sha256.clone(),
                            },
                            failure,
                        };
                    }
                    Err(f) => stats.count_failure(&f),
                }
            }
            if demote {
                self.demote(slot);
            }
        }
        let name = slot.builtin_name.clone();
        let stats = stats_of(&mut slot.stats, &slot.builtin_label);
        stats.calls += 1;
        if failure.is_some() {
            stats.answered_as_fallback += 1;
        }
        let value = native(slot.builtin.as_mut(), &table.fleet);
        Decision {
            value,
            source: DecisionSource::Builtin { name },
            failure,
        }
    }

    /// Calls `policy` through `live`, instantiating it first if needed, and
    /// drops the instance after a failure that may have torn its state.
    fn call_live<T>(
        &self,
        live: &mut Option<LiveInstance>,
        policy: &Arc<CompiledPolicy>,
        kind: PolicyKind,
        table: &FleetTable,
        wasm: &impl Fn(&mut LiveInstance, &Fleet) -> Result<T, CallFailure>,
    ) -> Result<T, CallFailure> {
        if live
            .as_ref()
            .is_none_or(|l| !Arc::ptr_eq(&l.policy, policy))
        {
            let fresh = self
                .engine
                .instantiate(policy, kind)
                .map_err(|e| CallFailure::Unavailable(e.to_string()))?;
            *live = Some(fresh);
        }
        let instance = live.as_mut().expect("instantiated above");
        let result = table
            .sync(instance)
            .and_then(|()| wasm(instance, &table.fleet));
        if result.as_ref().is_err_and(CallFailure::poisons) {
            *live = None;
        }
        result
    }

    /// The active version failed too often: the previous version (or the
    /// builtin) takes over, and the failed one waits for its retry, its
    /// back-off doubled when it failed on probation.
    fn demote(&self, slot: &mut Slot) {
        let config = self.engine.config();
        slot.fold_active_stats();
        let failed = slot.active.take();
        let backoff = match slot.probation.take() {
            Some(p) => p.backoff.saturating_mul(2),
            None => config.retry_backoff,
        }
        .min(config.max_retry_backoff);
        slot.live = None;
        slot.reset_outcomes();
        slot.settling = SETTLE_CALLS;
        if let Some(previous) = slot.previous.pop() {
            slot.live = slot
                .fallback_live
                .take()
                .filter(|l| l.policy.sha256 == previous.sha256);
            slot.active = Some(previous);
        }
        let Some(failed) = failed else { return };
        slot.demotions += 1;
        stats_of(&mut slot.stats, &failed.label).demotions += 1;
        tracing::error!(
            kind = %slot.kind,
            demoted = %failed.label,
            now = slot.active.as_deref().map(|p| p.label.clone()).unwrap_or_else(|| slot.builtin_label.clone()),
            retry_in_ms = backoff.as_millis() as u64,
            "policy demoted after repeated failures"
        );
        if config.retry_backoff.is_zero() {
            return;
        }
        let retry = PendingRetry {
            at: config.clock.now() + backoff,
            policy: failed,
            backoff,
        };
        if let Some(dropped) = slot.pending_retry.replace(retry) {
            tracing::warn!(kind = %slot.kind, policy = %dropped.policy.label, "a later demotion replaces this version's pending retry");
        }
    }

    /// Re-activates the slot's demoted version on probation once its back-off
    /// has passed; the version answering until now becomes its fallback.
    fn retry_if_due(&self, slot: &mut Slot) {
        let Some(pending) = &slot.pending_retry else {
            return;
        };
        if self.engine.config().clock.now() < pending.at {
            return;
        }
        let retry = slot.pending_retry.take().expect("checked above");
        slot.fold_active_stats();
        if let Some(current) = slot.active.take() {
            slot.previous.push(current);
            slot.fallback_live = slot.live.take();
        }
        slot.live = None;
        slot.reset_outcomes();
        slot.settling = SETTLE_CALLS;
        slot.retries += 1;
        stats_of(&mut slot.stats, &retry.policy.label).retries += 1;
        tracing::warn!(
            kind = %slot.kind,
            policy = %retry.policy.label,
            backoff_ms = retry.backoff.as_millis() as u64,
            "retrying a demoted policy on probation"
        );
        slot.probation = Some(Probation {
            backoff: retry.backoff,
            good_calls: 0,
        });
        slot.active = Some(retry.policy);
    }

    // ----- hot swap -----

    /// Validates `policy` for `kind` (type check against the kind's world, a
    /// trial call on the current fleet or a sample one, answer validation),
    /// then makes it active between two calls. Calls in flight finish on the
    /// old version, which becomes the rollback target.
    pub fn swap(&self, kind: PolicyKind, policy: Arc<CompiledPolicy>) -> Result<(), PolicyError> {
        self.trial(kind, &policy)?;
        let fresh = self.engine.instantiate(&policy, kind)?;
        let mut slot = lock(&self.slots[kind.index()]);
        if let Some(old) = slot.activate(policy.clone(), fresh) {
            slot.previous.push(old);
        }
        tracing::info!(%kind, policy = %policy.label, "policy swapped in");
        Ok(())
    }

    /// Makes the previous version active again.
    pub fn rollback(&self, kind: PolicyKind) -> Result<VersionInfo, PolicyError> {
        let mut slot = lock(&self.slots[kind.index()]);
        let previous = slot
            .previous
            .last()
            .cloned()
            .ok_or(PolicyError::NothingToRollBack(kind))?;
        let fresh = self.engine.instantiate(&previous, kind)?;
        slot.previous.pop();
        slot.activate(previous.clone(), fresh);
        tracing::info!(%kind, policy = %previous.label, "policy rolled back");
        Ok(VersionInfo::from(&*previous))
    }

    /// Instantiates `policy` for `kind` in a throwaway store and asks it one
    /// question on the current fleet (or a sample fleet when there is none).
    fn trial(&self, kind: PolicyKind, policy: &Arc<CompiledPolicy>) -> Result<(), PolicyError> {
        let mut live = self.engine.instantiate(policy, kind)?;
        let mut fleet = self.fleet();
        if fleet.is_empty() {
            fleet = sample_fleet();
        }
        let loads: Vec<_> = fleet.loads().iter().map(bindings::load_to_wit).collect();
        let request = bindings::request_to_wit(&RequestMeta {
            id: 1,
            prompt_tokens: 64,
            max_tokens: 64,
            ..Default::default()
        });
        let max_scale_up = self.engine.config().max_scale_up;
        let trial_failure = |failure| PolicyError::Trial { kind, failure };
        live.reset(&loads).map_err(trial_failure)?;
        match kind {
            PolicyKind::Dispatch => live
                .dispatch(request)
                .and_then(|id| validate::dispatch(id, &fleet))
                .map(drop),
            PolicyKind::Migration => live
                .plan()
                .and_then(|pairs| {
                    validate::plan(
                        pairs.into_iter().map(bindings::pair_from_wit).collect(),
                        &fleet,
                    )
                })
                .map(drop),
            PolicyKind::Priority => live
                .assign(request)
                .and_then(|a| {
                    validate::assign(
                        PriorityAssignment {
                            priority: a.priority,
                            headroom_blocks: a.headroom_blocks,
                        },
                        &fleet,
                    )
                })
                .map(drop),
            PolicyKind::Scaling => live
                .decide()
                .and_then(|d| {
                    validate::scaling(bindings::scaling_from_wit(d), &fleet, max_scale_up)
                })
                .map(drop),
        }
        .map_err(trial_failure)
    }

    // ----- introspection -----

    /// The active Wasm version of `kind`, if any.
    pub fn active(&self, kind: PolicyKind) -> Option<Arc<CompiledPolicy>> {
        lock(&self.slots[kind.index()]).active.clone()
    }

    /// What `kind`'s slot runs and its counters.
    pub fn status(&self, kind: PolicyKind) -> SlotStatus {
        let slot = lock(&self.slots[kind.index()]);
        SlotStatus {
            kind,
            active: slot.active.as_deref().map(VersionInfo::from),
            previous: slot
                .previous
                .iter()
                .map(|p| VersionInfo::from(&**p))
                .collect(),
            builtin: slot.builtin_name.to_string(),
            stats: {
                let mut stats = slot.stats.clone();
                if let Some(active) = &slot.active {
                    stats_of(&mut stats, &active.label).merge(&slot.active_stats);
                }
                stats
            },
            demotions: slot.demotions,
            retries: slot.retries,
            probation: slot.probation.as_ref().and_then(|p| {
                Some(ProbationStatus {
                    version: VersionInfo::from(&**slot.active.as_ref()?),
                    good_calls: p.good_calls,
                    needed: self.engine.config().probation_calls,
                    backoff_ms: p.backoff.as_millis() as u64,
                })
            }),
            pending_retry: slot.pending_retry.as_ref().map(|r| PendingRetryStatus {
                version: VersionInfo::from(&*r.policy),
                backoff_ms: r.backoff.as_millis() as u64,
                retry_in_ms: r
                    .at
                    .saturating_duration_since(self.engine.config().clock.now())
                    .as_millis() as u64,
            }),
            decision_latency: slot.decision_latency.summary(),
        }
    }
}

/// Four instances with different loads, for trial calls on an empty fleet.
fn sample_fleet() -> Fleet {
    let mut fleet = Fleet::new();
    fleet.reset((0..4u32).map(|i| InstanceLoad {
        instance: i,
        block_size: 16,
        total_blocks: 800,
        used_blocks: 150 * i + 40,
        watermark_blocks: 8,
        running: 2 + 3 * i,
        waiting: i / 2,
        head_of_line_demand_blocks: if i >= 2 { 30 } else { 0 },
        waiting_demand_blocks: 30 * (i / 2),
        step_latency_us: 20_000 + 1_000 * i,
        ..Default::default()
    }));
    fleet
}

/// One question a policy answers, outside the slots: what shadowing and
/// replay ask a candidate version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Question {
    Dispatch(RequestMeta),
    Priority(RequestMeta),
    Plan,
    Scaling,
}

impl Question {
    /// The kind of policy that answers it.
    pub fn kind(&self) -> PolicyKind {
        match self {
            Question::Dispatch(_) => PolicyKind::Dispatch,
            Question::Priority(_) => PolicyKind::Priority,
            Question::Plan => PolicyKind::Migration,
            Question::Scaling => PolicyKind::Scaling,
        }
    }
}

/// A validated answer to a [`Question`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Dispatch(Option<InstanceId>),
    Priority(PriorityAssignment),
    Plan(Vec<MigrationPair>),
    Scaling(ScalingDecision),
}

impl PolicyRuntime {
    /// Asks a standalone instance (see [`PolicyRuntime::instantiate`]) one
    /// question on `fleet` (sent whole first), validating the answer as a
    /// slot's would be.
    pub fn ask(
        &self,
        live: &mut LiveInstance,
        fleet: &Fleet,
        question: &Question,
    ) -> Result<Answer, CallFailure> {
        let loads: Vec<_> = fleet.loads().iter().map(bindings::load_to_wit).collect();
        live.reset(&loads)?;
        Ok(match question {
            Question::Dispatch(r) => {
                if fleet.serving().next().is_none() {
                    return Ok(Answer::Dispatch(None));
                }
                let id = live.dispatch(bindings::request_to_wit(r))?;
                Answer::Dispatch(Some(validate::dispatch(id, fleet)?))
            }
            Question::Priority(r) => {
                let a = live.assign(bindings::request_to_wit(r))?;
                Answer::Priority(validate::assign(
                    PriorityAssignment {
                        priority: a.priority,
                        headroom_blocks: a.headroom_blocks,
                    },
                    fleet,
                )?)
            }
            Question::Plan => {
                if fleet.len() < 2 {
                    return Ok(Answer::Plan(Vec::new()));
                }
                let pairs = live
                    .plan()?
                    .into_iter()
                    .map(bindings::pair_from_wit)
                    .collect();
                Answer::Plan(validate::plan(pairs, fleet)?)
            }
            Question::Scaling => Answer::Scaling(validate::scaling(
                bindings::scaling_from_wit(live.decide()?),
                fleet,
                self.engine.config().max_scale_up,
            )?),
        })
    }
}
