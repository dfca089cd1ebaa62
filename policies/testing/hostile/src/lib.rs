//! A hostile policy, built by the test suite to prove the host contains it.
//!
//! It behaves exactly like `llumnix` until a request's `prefix-hash` (or an
//! instance's `step-latency-us`) carries one of the trigger values below; then
//! it misbehaves in the named way. Never install it in a real fleet.

use llumen_policy_logic::{
    Fleet, InstanceId, Llumnix, MigrationCandidate, MigrationPair, Policy, PolicyInfo,
    PriorityAssignment, RequestId, RequestMeta, ScalingDecision,
};

/// `dispatch` loops forever.
pub const SPIN: u64 = 0xBAD1;
/// `dispatch` allocates until memory runs out.
pub const MEMORY_BOMB: u64 = 0xBAD2;
/// `dispatch` panics (a trap).
pub const PANIC: u64 = 0xBAD3;
/// `dispatch` names an instance that does not exist.
pub const UNKNOWN_INSTANCE: u64 = 0xBAD4;
/// `plan` returns 100,000 pairs when an instance reports this step latency.
pub const HUGE_LIST_STEP_LATENCY: u32 = 0xBAD5;
/// `assign` answers an absurd headroom.
pub const ABSURD_HEADROOM: u64 = 0xBAD6;

#[derive(Default)]
struct Hostile(Llumnix);

impl Policy for Hostile {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: "hostile".into(),
            version: "0".into(),
        }
    }

    fn dispatch(&mut self, fleet: &Fleet, request: &RequestMeta) -> Option<InstanceId> {
        match request.prefix_hash {
            SPIN => {
                let mut x = 0u64;
                loop {
                    x = core::hint::black_box(x.wrapping_add(1));
                }
            }
            MEMORY_BOMB => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                // Reserve without touching: growth, not memset, hits the cap.
                loop {
                    hoard.push(core::hint::black_box(Vec::with_capacity(1 << 20)));
                }
            }
            PANIC => panic!("hostile policy panics on purpose"),
            UNKNOWN_INSTANCE => Some(0xDEAD_0000),
            _ => self.0.dispatch(fleet, request),
        }
    }

    fn plan_migration(&mut self, fleet: &Fleet) -> Vec<MigrationPair> {
        if fleet
            .loads()
            .iter()
            .any(|l| l.step_latency_us == HUGE_LIST_STEP_LATENCY)
        {
            return vec![
                MigrationPair {
                    source: 0,
                    destination: 1
                };
                100_000
            ];
        }
        self.0.plan_migration(fleet)
    }

    fn choose_migrations(
        &mut self,
        fleet: &Fleet,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Vec<RequestId> {
        self.0.choose_migrations(fleet, pair, candidates)
    }

    fn assign_priority(&mut self, fleet: &Fleet, request: &RequestMeta) -> PriorityAssignment {
        if request.prefix_hash == ABSURD_HEADROOM {
            return PriorityAssignment {
                priority: 1,
                headroom_blocks: u32::MAX,
            };
        }
        self.0.assign_priority(fleet, request)
    }

    fn decide_scaling(&mut self, fleet: &Fleet) -> ScalingDecision {
        self.0.decide_scaling(fleet)
    }
}

llumen_policy_guest::export_policy!(Hostile::default());
