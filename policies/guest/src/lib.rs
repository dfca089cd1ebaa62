//! Glue that turns a [`llumen_policy_logic::Policy`] into a `llumen:policy`
//! `configurable-policy` component (the four kinds of decision plus
//! `params`).
//!
//! This crate owns the guest side of the WIT boundary: the wit-bindgen
//! bindings, the conversions between WIT records and the logic crate's types,
//! and the one piece of guest state (the policy and its fleet view). It must
//! never hold scheduling logic (that belongs to `llumen-policy-logic`, so the
//! host's native fallback runs the same code) and never import anything but
//! `llumen:policy/history`.
//!
//! A policy crate is one line:
//! `llumen_policy_guest::export_policy!(llumen_policy_logic::Llumnix::default());`

use std::cell::RefCell;

use llumen_policy_logic as logic;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "configurable-policy",
        path: "../../policies-wit",
        pub_export_macro: true,
        export_macro_name: "export_full_policy",
        default_bindings_module: "llumen_policy_guest::bindings",
    });
}

use bindings::exports::llumen::policy::{dispatch, fleet, migration, params, priority, scaling};
use bindings::llumen::policy::types as wit;

/// Exports `$make` (an expression building a `llumen_policy_logic::Policy`)
/// as this crate's component.
#[macro_export]
macro_rules! export_policy {
    ($make:expr) => {
        #[unsafe(no_mangle)]
        fn llumen_policy_new() -> ::std::boxed::Box<dyn $crate::Policy> {
            ::std::boxed::Box::new($make)
        }
        use $crate::Adapter as LlumenPolicyAdapter;
        $crate::bindings::export_full_policy!(LlumenPolicyAdapter);
    };
}

pub use logic::Policy;

extern "Rust" {
    /// Defined by [`export_policy!`] in the policy crate.
    fn llumen_policy_new() -> Box<dyn Policy>;
}

struct State {
    fleet: logic::Fleet,
    policy: Box<dyn Policy>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let state = slot.get_or_insert_with(|| State {
            fleet: logic::Fleet::new(),
            // SAFETY: `export_policy!` defines this function with exactly this
            // signature in the crate that links us.
            policy: unsafe { llumen_policy_new() },
        });
        f(state)
    })
}

/// Implements every exported interface by delegating to the policy.
pub struct Adapter;

fn load_from_wit(l: wit::InstanceLoad) -> logic::InstanceLoad {
    logic::InstanceLoad {
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

fn request_from_wit(r: wit::RequestMeta) -> logic::RequestMeta {
    logic::RequestMeta {
        id: r.id,
        prompt_tokens: r.prompt_tokens,
        max_tokens: r.max_tokens,
        requested_priority: r.requested_priority,
        priority: r.priority,
        prefix_hash: r.prefix_hash,
        arrival_us: r.arrival_us,
    }
}

fn candidate_from_wit(c: &wit::MigrationCandidate) -> logic::MigrationCandidate {
    logic::MigrationCandidate {
        id: c.id,
        priority: c.priority,
        blocks: c.blocks,
        prompt_tokens: c.prompt_tokens,
        output_tokens: c.output_tokens,
        arrival_us: c.arrival_us,
    }
}

impl fleet::Guest for Adapter {
    fn info() -> wit::PolicyInfo {
        let info = with_state(|s| s.policy.info());
        wit::PolicyInfo {
            name: info.name,
            version: info.version,
        }
    }
    fn reset(loads: Vec<wit::InstanceLoad>) {
        with_state(|s| s.fleet.reset(loads.into_iter().map(load_from_wit)))
    }
    fn upsert(loads: Vec<wit::InstanceLoad>) {
        with_state(|s| s.fleet.upsert(loads.into_iter().map(load_from_wit)))
    }
    fn remove(instance: wit::InstanceId) {
        with_state(|s| {
            s.fleet.remove(instance);
        })
    }
}

impl params::Guest for Adapter {
    fn describe() -> Vec<params::ParamSpec> {
        with_state(|s| s.policy.param_specs())
            .into_iter()
            .map(|spec| params::ParamSpec {
                name: spec.name,
                default_value: spec.default_value,
                description: spec.description,
            })
            .collect()
    }
    fn configure(values: Vec<params::Param>) -> Result<(), String> {
        let values: Vec<logic::Param> = values
            .into_iter()
            .map(|p| logic::Param::new(p.name, p.value))
            .collect();
        with_state(|s| s.policy.configure(&values)).map_err(|e| e.to_string())
    }
}

impl dispatch::Guest for Adapter {
    fn dispatch(request: wit::RequestMeta) -> wit::InstanceId {
        let request = request_from_wit(request);
        // No serving instance: answer an id no fleet uses; the host rejects it
        // and falls back (it only asks when one exists, so this means the view
        // is out of sync).
        with_state(|s| s.policy.dispatch(&s.fleet, &request)).unwrap_or(u32::MAX)
    }
}

impl migration::Guest for Adapter {
    fn plan() -> Vec<wit::MigrationPair> {
        with_state(|s| s.policy.plan_migration(&s.fleet))
            .into_iter()
            .map(|p| wit::MigrationPair {
                source: p.source,
                destination: p.destination,
            })
            .collect()
    }
    fn choose(
        pair: wit::MigrationPair,
        candidates: Vec<wit::MigrationCandidate>,
    ) -> Vec<wit::RequestId> {
        let pair = logic::MigrationPair {
            source: pair.source,
            destination: pair.destination,
        };
        let candidates: Vec<_> = candidates.iter().map(candidate_from_wit).collect();
        with_state(|s| s.policy.choose_migrations(&s.fleet, pair, &candidates))
    }
}

impl priority::Guest for Adapter {
    fn assign(request: wit::RequestMeta) -> wit::PriorityAssignment {
        let request = request_from_wit(request);
        let a = with_state(|s| s.policy.assign_priority(&s.fleet, &request));
        wit::PriorityAssignment {
            priority: a.priority,
            headroom_blocks: a.headroom_blocks,
        }
    }
}

impl scaling::Guest for Adapter {
    fn decide() -> wit::ScalingDecision {
        match with_state(|s| s.policy.decide_scaling(&s.fleet)) {
            logic::ScalingDecision::Hold => wit::ScalingDecision::Hold,
            logic::ScalingDecision::ScaleUp(k) => wit::ScalingDecision::ScaleUp(k),
            logic::ScalingDecision::Drain(i) => wit::ScalingDecision::Drain(i),
        }
    }
}
