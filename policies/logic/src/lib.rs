//! The scheduling logic of llumen's first-party policies, in plain Rust.
//!
//! This crate owns the decisions themselves: the load metrics (virtual usage,
//! freeness) and the dispatch, migration, priority and scaling rules of the
//! `llumnix`, `infaas`, `round-robin` and `queue-length` policies. The very
//! same source is compiled twice: into the Wasm guests under `policies/`
//! (through `llumen-policy-guest`) and natively into the host, where it is the
//! built-in fallback and the baseline the Wasm cost is measured against.
//!
//! It must never touch I/O, clocks, randomness, floating point (results must
//! be bit-identical on wasm32 and x86_64) or anything host-specific: no
//! wasmtime, no wit-bindgen, no dependencies at all.
//!
//! Invariant: every function is a pure function of the [`Fleet`] view, its
//! arguments and the policy's own state; ties are always broken by the lowest
//! instance id (or as documented), so two copies fed the same calls agree.

mod fleet;
mod freeness;
pub mod params;
mod policies;
mod types;

pub use fleet::Fleet;
pub use freeness::Freeness;
pub use params::{Param, ParamError, ParamSpec};
pub use policies::{
    by_name, configured, Deficit, DrainPick, FitCheck, Infaas, Llumnix, LlumnixParams,
    MigrationLoad, PriorityReserve, QueueLength, RoundRobin, Selection, POLICY_NAMES,
};
pub use types::*;

/// One scheduling policy: the four kinds of decision over a fleet view.
///
/// Implementations keep whatever state they need (e.g. round-robin's counts)
/// in `self`; the fleet view is passed in, owned by the caller.
pub trait Policy: Send {
    /// Short name (e.g. `"llumnix"`) and version.
    fn info(&self) -> PolicyInfo;
    /// The parameters this policy takes, with their defaults and meanings.
    /// Default: none.
    fn param_specs(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    /// Sets parameters, all or nothing: on an error (an unknown name, a
    /// value it cannot take, a name given twice) nothing changes. Called
    /// before any decision; parameters not named keep their defaults.
    /// Default: no parameter is known.
    fn configure(&mut self, params: &[Param]) -> Result<(), ParamError> {
        match params.first() {
            None => Ok(()),
            Some(p) => Err(ParamError::unknown(&p.name, &[])),
        }
    }
    /// The instance that serves `request`, or `None` when no instance can
    /// (the fleet is empty or every instance is draining).
    fn dispatch(&mut self, fleet: &Fleet, request: &RequestMeta) -> Option<InstanceId>;
    /// Migration pairs for this period; each instance appears at most once.
    /// Default: never migrate.
    fn plan_migration(&mut self, _fleet: &Fleet) -> Vec<MigrationPair> {
        Vec::new()
    }
    /// Which of the source's candidates move for a planned pair. Default: none.
    fn choose_migrations(
        &mut self,
        _fleet: &Fleet,
        _pair: MigrationPair,
        _candidates: &[MigrationCandidate],
    ) -> Vec<RequestId> {
        Vec::new()
    }
    /// Scheduling priority and headroom of a new request. Default: the
    /// priority the client asked for, no headroom.
    fn assign_priority(&mut self, _fleet: &Fleet, request: &RequestMeta) -> PriorityAssignment {
        PriorityAssignment {
            priority: request.requested_priority,
            headroom_blocks: 0,
        }
    }
    /// Grow, shrink or hold the fleet. Default: hold.
    fn decide_scaling(&mut self, _fleet: &Fleet) -> ScalingDecision {
        ScalingDecision::Hold
    }
}
