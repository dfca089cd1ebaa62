//! A library of hostile policies, for the host's containment tests only.
//!
//! Each [`Behaviour`] is exported as its own component by an example target
//! (`examples/hostile-<behaviour>.rs`, packed by scripts/build-policies.sh
//! into `target/policies/hostile-<behaviour>.wasm`), so every misbehaviour is
//! one file that can be installed live for any kind. Where a behaviour has
//! nothing to say about a kind of decision, that kind answers like `llumnix`.
//!
//! **Evading the trial.** Except [`Behaviour::Blatant`], every adversary
//! answers its instance's first decision honestly and misbehaves from the
//! second one on. The host's hot swap asks a throwaway instance exactly one
//! trial question, so these pass it and misbehave only once live: a trial can
//! always be evaded, and the runtime must contain whatever gets past it.
//! (After a trap the host starts a fresh instance, whose first answer is
//! honest again: a poisoning adversary alternates good and bad answers.)
//!
//! This crate owns adversarial guest code. It must never be installed in a
//! real fleet, and it must never reach outside the sandbox (it imports nothing
//! but what `llumen-policy-guest` does): its attacks are on the host's limits
//! (deadline, memory cap, stack, answer validation), not on its interfaces.

use core::hint::black_box;

use llumen_policy_logic::{
    Fleet, InstanceId, Llumnix, MigrationCandidate, MigrationPair, Policy, PolicyInfo,
    PriorityAssignment, RequestId, RequestMeta, ScalingDecision,
};

/// One way of misbehaving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Every decision loops forever (the deadline must interrupt it).
    Spin,
    /// Every decision allocates until linear memory hits the host's cap.
    MemoryBomb,
    /// Every decision (the first included) keeps 4 MiB more of touched memory
    /// and answers honestly, until memory growth reaches the cap.
    Leak,
    /// Every decision recurses without bound (stack exhaustion).
    Recursion,
    /// Every decision panics (a trap).
    Panic,
    /// Every decision (the first included) does about 5 ms of busy work,
    /// well within the deadline, then answers honestly.
    Slow,
    /// Names things that do not exist: an unknown instance (dispatch, plan,
    /// drain) and a request that is not a candidate (choose).
    WrongIds,
    /// The same migration pair twice in a plan, the same request twice in a
    /// choice.
    Duplicates,
    /// Half a million migration pairs, half a million chosen requests.
    Oversize,
    /// A migration pair whose source is its destination.
    SelfMigration,
    /// An absurd headroom (and priority 255); a scale-up by `u32::MAX`.
    Nonsense,
    /// Panics on every decision, the first (the host's trial) included, so
    /// the host refuses it at swap time.
    Blatant,
}

impl Behaviour {
    /// The component's name (`fleet.info`): `hostile-<behaviour>`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Spin => "hostile-spin",
            Self::MemoryBomb => "hostile-memory",
            Self::Leak => "hostile-leak",
            Self::Recursion => "hostile-recursion",
            Self::Panic => "hostile-panic",
            Self::Slow => "hostile-slow",
            Self::WrongIds => "hostile-wrong-ids",
            Self::Duplicates => "hostile-duplicates",
            Self::Oversize => "hostile-oversize",
            Self::SelfMigration => "hostile-self-migration",
            Self::Nonsense => "hostile-nonsense",
            Self::Blatant => "hostile-blatant",
        }
    }
}

/// An instance id no fleet has.
pub const UNKNOWN_INSTANCE: InstanceId = 0xDEAD_0000;
/// A request id no migration candidate has.
pub const UNKNOWN_REQUEST: RequestId = u64::MAX - 0xDEAD;
/// Length of the oversize answers.
pub const OVERSIZE_LEN: usize = 1 << 19;
/// Memory kept per decision by [`Behaviour::Leak`].
pub const LEAK_BYTES: usize = 4 << 20;
/// Iterations of [`Behaviour::Slow`]'s busy loop (about 5 ms of Wasm).
pub const SLOW_ITERATIONS: u64 = 3_000_000;

/// A [`Behaviour`] wrapped around `llumnix` (which answers whatever the
/// behaviour leaves alone).
pub struct Adversary {
    behaviour: Behaviour,
    honest: Llumnix,
    decisions: u64,
    hoard: Vec<Vec<u8>>,
}

impl Adversary {
    pub fn new(behaviour: Behaviour) -> Self {
        Self {
            behaviour,
            honest: Llumnix::default(),
            decisions: 0,
            hoard: Vec::new(),
        }
    }

    /// Counts a decision; true when this one misbehaves (all but the
    /// instance's first, except for [`Behaviour::Blatant`]). The behaviours
    /// that misbehave on every call ([`Behaviour::Leak`], [`Behaviour::Slow`])
    /// do their thing here.
    fn armed(&mut self) -> bool {
        let first = self.decisions == 0;
        self.decisions += 1;
        match self.behaviour {
            Behaviour::Leak => self.hoard.push(black_box(vec![0xA5u8; LEAK_BYTES])),
            Behaviour::Slow => {
                black_box(busy(SLOW_ITERATIONS));
            }
            Behaviour::Blatant => panic!("hostile-blatant panics on every call"),
            _ => {}
        }
        !first
    }

    /// The misbehaviours every kind of decision shares (they never return).
    fn poison(&self) {
        match self.behaviour {
            Behaviour::Spin => spin(),
            Behaviour::MemoryBomb => memory_bomb(),
            Behaviour::Recursion => {
                black_box(recurse(black_box(0)));
            }
            Behaviour::Panic => panic!("{} panics on purpose", self.behaviour.name()),
            _ => {}
        }
    }
}

fn spin() -> ! {
    let mut x = 0u64;
    loop {
        x = black_box(x.wrapping_add(1));
    }
}

fn memory_bomb() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    // Reserve without touching: growth, not memset, hits the cap.
    loop {
        hoard.push(black_box(Vec::with_capacity(1 << 20)));
    }
}

/// Recursion that never bottoms out in practice (the depth check only keeps
/// the compiler from proving it infinite).
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    black_box(recurse(black_box(depth + 1))).wrapping_add(depth)
}

/// A dependent chain of multiply-xorshift steps (not vectorisable).
fn busy(iterations: u64) -> u64 {
    let mut x = black_box(0x9E37_79B9_7F4A_7C15u64);
    for _ in 0..iterations {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x ^= x >> 33;
    }
    x
}

fn pair(source: InstanceId, destination: InstanceId) -> MigrationPair {
    MigrationPair {
        source,
        destination,
    }
}

impl Policy for Adversary {
    fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: self.behaviour.name().into(),
            version: "0".into(),
        }
    }

    fn dispatch(&mut self, fleet: &Fleet, request: &RequestMeta) -> Option<InstanceId> {
        if self.armed() {
            self.poison();
            if self.behaviour == Behaviour::WrongIds {
                return Some(UNKNOWN_INSTANCE);
            }
        }
        self.honest.dispatch(fleet, request)
    }

    fn plan_migration(&mut self, fleet: &Fleet) -> Vec<MigrationPair> {
        if self.armed() {
            self.poison();
            let first = fleet.loads().first().map_or(0, |l| l.instance);
            let last = fleet.loads().last().map_or(1, |l| l.instance);
            match self.behaviour {
                Behaviour::WrongIds => return vec![pair(UNKNOWN_INSTANCE, UNKNOWN_INSTANCE + 1)],
                Behaviour::Duplicates => return vec![pair(first, last); 2],
                Behaviour::Oversize => return vec![pair(first, last); OVERSIZE_LEN],
                Behaviour::SelfMigration => return vec![pair(first, first)],
                _ => {}
            }
        }
        self.honest.plan_migration(fleet)
    }

    fn choose_migrations(
        &mut self,
        fleet: &Fleet,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Vec<RequestId> {
        if self.armed() {
            self.poison();
            let first = candidates.first().map_or(UNKNOWN_REQUEST, |c| c.id);
            match self.behaviour {
                Behaviour::WrongIds => return vec![UNKNOWN_REQUEST],
                Behaviour::Duplicates => return vec![first; 2],
                Behaviour::Oversize => return vec![first; OVERSIZE_LEN],
                _ => {}
            }
        }
        self.honest.choose_migrations(fleet, pair, candidates)
    }

    fn assign_priority(&mut self, fleet: &Fleet, request: &RequestMeta) -> PriorityAssignment {
        if self.armed() {
            self.poison();
            if self.behaviour == Behaviour::Nonsense {
                return PriorityAssignment {
                    priority: u8::MAX,
                    headroom_blocks: u32::MAX,
                };
            }
        }
        self.honest.assign_priority(fleet, request)
    }

    fn decide_scaling(&mut self, fleet: &Fleet) -> ScalingDecision {
        if self.armed() {
            self.poison();
            match self.behaviour {
                Behaviour::WrongIds => return ScalingDecision::Drain(UNKNOWN_INSTANCE),
                Behaviour::Nonsense => return ScalingDecision::ScaleUp(u32::MAX),
                _ => {}
            }
        }
        self.honest.decide_scaling(fleet)
    }
}
