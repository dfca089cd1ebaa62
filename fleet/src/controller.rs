//! [`Controller`]: the manager's decisions as a pure state machine.
//!
//! **Owns**: the fleet's membership (each instance's [`InstancePhase`],
//! whether scaling may drain it, its latest load, its migrations in
//! flight), instance ids (never reused) and migration ids (monotonic from
//! 1), and the rules that turn the policies' answers into orders:
//! placement with its fallback, the migration round (pairs, picks, the
//! per-instance limits), the scaling round (bounds, drains, cancelled
//! drains, stops), and the counts of all of it ([`ControllerStats`]).
//!
//! The policies are asked through the [`Decide`] trait, passed into every
//! call that consults them: the controller never owns them. In the server
//! and the simulator `Decide` is the Wasm `PolicyRuntime`; [`NativeDecide`]
//! runs the native `llumen-policy-logic` policies without Wasm.
//!
//! **Never touches**: a clock, I/O, threads, channels or the instances
//! themselves. It does not run the instances: it hands back what to do
//! ([`MigrationOrder`]s, [`ScalingAction`]s, the chosen instance of a
//! request) for the shell to carry out, and is told what happened
//! ([`Controller::observe`], [`Controller::instance_ready`],
//! [`Controller::migration_ended`], [`Controller::remove_instance`]).
//!
//! Invariants: iteration is by ascending id everywhere (`BTreeMap`), so two
//! controllers fed the same calls make the same decisions; the policies
//! see a load only of an instance that is serving or draining, and a
//! draining instance's loads always say so; `migrations_started ==
//! migrations_ended + migrations_in_flight()`; an instance's count of
//! migrations in flight is the number of [`MigrationOrder`]s it is a side
//! of, whatever order ends, removals and double ends come in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use llumen_engine::MigrationId;
use llumen_policy_logic::{
    Fleet, InstanceId, InstanceLoad, MigrationCandidate, MigrationPair, Policy, PriorityAssignment,
    RequestId, RequestMeta, ScalingDecision,
};

// ---------------------------------------------------------------------------
// Where decisions come from
// ---------------------------------------------------------------------------

/// Where the controller's decisions come from: the Wasm `PolicyRuntime`
/// implements it in the host (server and simulator); tests and tools use
/// [`NativeDecide`].
///
/// Besides the decisions, it keeps the policies' view of the fleet: the
/// controller calls [`Decide::observe`] with every load the policies should
/// see and [`Decide::remove_instance`] when an instance leaves.
pub trait Decide {
    /// An instance's new load (already marked draining where it drains).
    fn observe(&mut self, load: InstanceLoad);
    /// An instance left the fleet: forget its load.
    fn remove_instance(&mut self, instance: InstanceId);
    /// Priority and headroom of a new request.
    fn assign_priority(&mut self, request: &RequestMeta) -> PriorityAssignment;
    /// The instance that should serve `request` (`None`: none can).
    fn dispatch(&mut self, request: &RequestMeta) -> Option<InstanceId>;
    /// This period's migration pairs.
    fn plan_migration(&mut self) -> Vec<MigrationPair>;
    /// Which of the source's `candidates` move for `pair`.
    fn choose_migrations(
        &mut self,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Vec<RequestId>;
    /// Grow, shrink or hold the fleet.
    fn decide_scaling(&mut self) -> ScalingDecision;
}

impl<D: Decide + ?Sized> Decide for &mut D {
    fn observe(&mut self, load: InstanceLoad) {
        (**self).observe(load);
    }
    fn remove_instance(&mut self, instance: InstanceId) {
        (**self).remove_instance(instance);
    }
    fn assign_priority(&mut self, request: &RequestMeta) -> PriorityAssignment {
        (**self).assign_priority(request)
    }
    fn dispatch(&mut self, request: &RequestMeta) -> Option<InstanceId> {
        (**self).dispatch(request)
    }
    fn plan_migration(&mut self) -> Vec<MigrationPair> {
        (**self).plan_migration()
    }
    fn choose_migrations(
        &mut self,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Vec<RequestId> {
        (**self).choose_migrations(pair, candidates)
    }
    fn decide_scaling(&mut self) -> ScalingDecision {
        (**self).decide_scaling()
    }
}

/// A native [`Policy`] and its own [`Fleet`] view, as a [`Decide`]: the
/// first-party policies without Wasm, for tests and tools.
///
/// It mirrors the host's `PolicyRuntime` around the policy calls: no
/// dispatch without a serving instance in the view, no plan with fewer
/// than two instances, no choice among no candidates, and a dispatched
/// request counts as waiting on its instance in the view
/// ([`InstanceLoad::with_dispatched`]) until that instance's next load.
/// `P` may be unsized (`Box<NativeDecide<dyn Policy>>`).
#[derive(Clone, Debug, Default)]
pub struct NativeDecide<P: ?Sized> {
    /// The policies' view of the fleet.
    pub fleet: Fleet,
    /// The policy that decides everything.
    pub policy: P,
}

impl<P: Policy> NativeDecide<P> {
    /// `policy` over an empty fleet view.
    pub fn new(policy: P) -> Self {
        Self {
            fleet: Fleet::new(),
            policy,
        }
    }
}

impl<P: Policy + ?Sized> Decide for NativeDecide<P> {
    fn observe(&mut self, load: InstanceLoad) {
        self.fleet.upsert([load]);
    }

    fn remove_instance(&mut self, instance: InstanceId) {
        self.fleet.remove(instance);
    }

    fn assign_priority(&mut self, request: &RequestMeta) -> PriorityAssignment {
        self.policy.assign_priority(&self.fleet, request)
    }

    fn dispatch(&mut self, request: &RequestMeta) -> Option<InstanceId> {
        // As the runtime: no policy call when nothing serves.
        self.fleet.serving().next()?;
        let chosen = self.policy.dispatch(&self.fleet, request)?;
        if let Some(load) = self.fleet.get(chosen).copied() {
            self.fleet
                .upsert([load.with_dispatched(request.prompt_tokens)]);
        }
        Some(chosen)
    }

    fn plan_migration(&mut self) -> Vec<MigrationPair> {
        if self.fleet.len() < 2 {
            return Vec::new();
        }
        self.policy.plan_migration(&self.fleet)
    }

    fn choose_migrations(
        &mut self,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Vec<RequestId> {
        if candidates.is_empty() {
            return Vec::new();
        }
        self.policy.choose_migrations(&self.fleet, pair, candidates)
    }

    fn decide_scaling(&mut self) -> ScalingDecision {
        self.policy.decide_scaling(&self.fleet)
    }
}

// ---------------------------------------------------------------------------
// Configuration, orders, actions, errors, stats
// ---------------------------------------------------------------------------

/// Knobs of the [`Controller`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Most migrations in or out of one instance at a time (default 1).
    pub max_migrations_per_instance: u32,
    /// A scaling drain never leaves fewer serving instances than this
    /// (default 1).
    pub min_instances: u32,
    /// A scale-up never makes the instances (starting, serving and
    /// draining) more than this (default 1).
    pub max_instances: u32,
    /// Start the migrations the migration round chooses (else they are only
    /// asked for and counted as planned; default true).
    pub migrate: bool,
    /// The first migration id handed out (default 1). The server starts at
    /// its start time in µs, so ids stay unique across restarts for joined
    /// instances that outlive a manager.
    pub first_migration_id: MigrationId,
    /// Longest prompt + `max_tokens` an instance serves (`None`: no check).
    /// A longer request is refused at admission, before any policy sees
    /// it (so it takes no dispatch decision, e.g. no round-robin turn).
    pub max_total_tokens: Option<u32>,
    /// When the migration round is due (default: the artifact's cadence,
    /// every 4 step reports per serving instance).
    pub migration_cadence: MigrationCadence,
}

/// When the migration round runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationCadence {
    /// On the driver's timer alone (its own period).
    Period,
    /// As the Llumnix artifact: once the busy instances' snapshots since the
    /// last round reach `per_instance` × the serving instances (the artifact
    /// counts step reports, `need_migrate_frequency = 4`: about every 4 steps
    /// per instance). A busy instance (something running or waiting)
    /// publishes once per step, or more when inputs land between steps;
    /// idle heartbeats do not count. The driver asks
    /// [`Controller::migration_due`] after each snapshot.
    Snapshots { per_instance: u32 },
}

impl MigrationCadence {
    /// The cadence of a `--migration-every-steps N` setting: about every
    /// `n` steps per instance, or the period when `n` is 0.
    pub fn every_steps(n: u32) -> Self {
        match n {
            0 => MigrationCadence::Period,
            per_instance => MigrationCadence::Snapshots { per_instance },
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            max_migrations_per_instance: 1,
            min_instances: 1,
            max_instances: 1,
            migrate: true,
            first_migration_id: 1,
            max_total_tokens: None,
            migration_cadence: MigrationCadence::Snapshots { per_instance: 4 },
        }
    }
}

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InstancePhase {
    /// Added, not serving yet: not in the policies' view, takes no requests
    /// or migrations.
    Starting,
    /// Takes requests and migrations.
    Serving,
    /// Takes no new requests or incoming migrations; stopped by the scaling
    /// round once empty.
    Draining,
}

/// A migration to start: tell `source` to migrate `request` out to
/// `destination` under `migration_id`, and report its end with
/// [`Controller::migration_ended`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MigrationOrder {
    /// Fresh for every order, monotonic from 1.
    pub migration_id: MigrationId,
    /// The request that moves.
    pub request: RequestId,
    /// The instance it leaves.
    pub source: InstanceId,
    /// The instance it goes to.
    pub destination: InstanceId,
}

/// The answer of [`Controller::choose_migrations`] for one pair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationChoice {
    /// The requests the policy chose, in its order (also when
    /// [`ControllerConfig::migrate`] is off, for logging).
    pub chosen: Vec<RequestId>,
    /// The migrations started, a prefix of `chosen`: the shell carries
    /// them out.
    pub orders: Vec<MigrationOrder>,
    /// The first chosen request that could not start, and why (the ones
    /// after it were not tried).
    pub refused: Option<(RequestId, MigrationNotStarted)>,
}

/// Why a migration did not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum MigrationNotStarted {
    /// Source and destination are the same instance.
    #[error("source and destination are the same instance {instance}")]
    SameInstance {
        /// The instance.
        instance: InstanceId,
    },
    /// The controller does not know the instance (never added, or removed).
    #[error("no instance {instance}")]
    UnknownInstance {
        /// The instance.
        instance: InstanceId,
    },
    /// The destination is starting or draining.
    #[error("destination instance {destination} does not take migrations ({phase:?})")]
    DestinationNotServing {
        /// The destination.
        destination: InstanceId,
        /// Its phase.
        phase: InstancePhase,
    },
    /// The source is still starting.
    #[error("source instance {instance} is not serving or draining ({phase:?})")]
    SourceNotServing {
        /// The source.
        instance: InstanceId,
        /// Its phase.
        phase: InstancePhase,
    },
    /// One side already has the most migrations in flight it may.
    #[error("instance {instance} already has {in_flight} of at most {limit} migrations in flight")]
    AtLimit {
        /// The instance at its limit.
        instance: InstanceId,
        /// Its migrations in flight.
        in_flight: u32,
        /// [`ControllerConfig::max_migrations_per_instance`].
        limit: u32,
    },
    /// The request is already moving.
    #[error("request {request} is already migrating (migration {migration_id})")]
    AlreadyMigrating {
        /// The request.
        request: RequestId,
        /// Its migration in flight.
        migration_id: MigrationId,
    },
}

/// Why [`Controller::admit`] refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the model's limit of {limit} tokens")]
pub struct TooLong {
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub limit: u32,
}

/// Why [`Controller::migrate_now`] started nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ManualMigrationError {
    /// The named request is not among the source's candidates.
    #[error("request {request} is not running on instance {instance}")]
    NotRunning {
        /// The request asked for.
        request: RequestId,
        /// The source.
        instance: InstanceId,
    },
    /// The source has no request that could move.
    #[error("no running request on instance {instance} can move now")]
    NoCandidate {
        /// The source.
        instance: InstanceId,
    },
    /// The migration could not start.
    #[error(transparent)]
    NotStarted(#[from] MigrationNotStarted),
}

/// What the scaling round asks the shell to do, in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScalingAction {
    /// Start a new instance under this id (added as
    /// [`InstancePhase::Starting`]; call [`Controller::instance_ready`]
    /// when it serves, or [`Controller::remove_instance`] if it fails).
    Start {
        /// The new instance's id.
        instance: InstanceId,
    },
    /// Mark the instance draining: no new requests.
    Drain {
        /// The instance.
        instance: InstanceId,
    },
    /// Mark a draining instance serving again.
    CancelDrain {
        /// The instance.
        instance: InstanceId,
    },
    /// Stop the instance: it is drained and empty, and already removed from
    /// the controller and the policies' view.
    Stop {
        /// The instance.
        instance: InstanceId,
    },
}

impl ScalingAction {
    /// The instance the action is about.
    pub fn instance(&self) -> InstanceId {
        match *self {
            ScalingAction::Start { instance }
            | ScalingAction::Drain { instance }
            | ScalingAction::CancelDrain { instance }
            | ScalingAction::Stop { instance } => instance,
        }
    }
}

impl fmt::Display for ScalingAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, instance) = match *self {
            ScalingAction::Start { instance } => ("start", instance),
            ScalingAction::Drain { instance } => ("drain", instance),
            ScalingAction::CancelDrain { instance } => ("cancel the drain of", instance),
            ScalingAction::Stop { instance } => ("stop", instance),
        };
        write!(f, "{what} instance {instance}")
    }
}

/// Counts of the controller's decisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerStats {
    /// [`Decide::assign_priority`] calls.
    pub priority_calls: u64,
    /// [`Decide::dispatch`] calls.
    pub dispatch_calls: u64,
    /// Placements whose dispatch answer (an instance) was replaced by the
    /// fallback.
    pub redirects: u64,
    /// Placements that found no instance.
    pub rejected: u64,
    /// [`Decide::plan_migration`] calls.
    pub plan_calls: u64,
    /// [`Decide::choose_migrations`] calls.
    pub choose_calls: u64,
    /// Requests the migration rounds chose.
    pub migrations_planned: u64,
    /// Migrations started (orders handed out).
    pub migrations_started: u64,
    /// Migrations that could not start.
    pub migrations_skipped: u64,
    /// Migrations that ended, reported or forgotten with a removed
    /// instance.
    pub migrations_ended: u64,
    /// [`Decide::decide_scaling`] calls.
    pub scaling_calls: u64,
    /// Instances started by scale-ups.
    pub scale_ups: u64,
    /// Instances drained.
    pub drains: u64,
    /// Drains cancelled by scale-ups.
    pub drain_cancels: u64,
    /// Drained instances stopped.
    pub stops: u64,
    /// Loads passed to [`Decide::observe`].
    pub snapshots: u64,
}

// ---------------------------------------------------------------------------
// The controller
// ---------------------------------------------------------------------------

/// What the controller knows of one instance.
#[derive(Clone, Debug)]
struct Member {
    phase: InstancePhase,
    /// The scaling round may drain it.
    drainable: bool,
    /// The latest load (marked draining while it drains), plus the
    /// requests placed here since.
    load: Option<InstanceLoad>,
    /// Migrations in flight in or out.
    in_flight: u32,
    /// When it last became draining (a counter): the latest drain is
    /// cancelled first.
    drained_seq: u64,
}

/// The manager's decisions: placement, the migration round and the
/// scaling round over the fleet's membership. See the module docs.
#[derive(Clone, Debug)]
pub struct Controller {
    config: ControllerConfig,
    instances: BTreeMap<InstanceId, Member>,
    migrations: BTreeMap<MigrationId, MigrationOrder>,
    /// 1 + the largest instance id ever seen (u64: never wraps).
    next_instance: u64,
    next_migration: MigrationId,
    drain_seq: u64,
    /// Busy instances' snapshots since the last migration round.
    busy_snapshots: u64,
    stats: ControllerStats,
}

impl Controller {
    /// A controller with no instances.
    pub fn new(config: ControllerConfig) -> Self {
        Self {
            next_migration: config.first_migration_id.max(1),
            config,
            instances: BTreeMap::new(),
            migrations: BTreeMap::new(),
            next_instance: 0,
            drain_seq: 0,
            busy_snapshots: 0,
            stats: ControllerStats::default(),
        }
    }

    /// True when the cadence ([`MigrationCadence::Snapshots`]) says a
    /// migration round is due: the driver runs one (which resets the count).
    /// Never with [`MigrationCadence::Period`] or migration off.
    pub fn migration_due(&self) -> bool {
        match self.config.migration_cadence {
            MigrationCadence::Period => false,
            MigrationCadence::Snapshots { per_instance } => {
                let serving = self.count(InstancePhase::Serving).max(1) as u64;
                self.busy_snapshots >= u64::from(per_instance.max(1)) * serving
            }
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Counts of its decisions.
    pub fn stats(&self) -> &ControllerStats {
        &self.stats
    }

    // ----- membership -----

    /// A fresh instance id for an instance the shell adds (a joined one):
    /// 1 + the largest id ever seen, so ids are never reused.
    ///
    /// # Panics
    /// When all 2³² ids have been used.
    pub fn allocate_instance_id(&mut self) -> InstanceId {
        self.try_allocate_instance_id()
            .expect("all 2^32 instance ids have been used")
    }

    fn try_allocate_instance_id(&mut self) -> Option<InstanceId> {
        let id = InstanceId::try_from(self.next_instance).ok()?;
        self.next_instance += 1;
        Some(id)
    }

    /// Adds an instance. `drainable`: the scaling round may drain it (the
    /// server drains only its in-process instances). A
    /// [`InstancePhase::Serving`] one is placed on at once; the policies
    /// see it from its first load. False (and nothing changes) when `id`
    /// is already known.
    pub fn add_instance(&mut self, id: InstanceId, phase: InstancePhase, drainable: bool) -> bool {
        if self.instances.contains_key(&id) {
            return false;
        }
        self.next_instance = self.next_instance.max(u64::from(id) + 1);
        let drained_seq = if phase == InstancePhase::Draining {
            self.next_drain_seq()
        } else {
            0
        };
        self.instances.insert(
            id,
            Member {
                phase,
                drainable,
                load: None,
                in_flight: 0,
                drained_seq,
            },
        );
        true
    }

    /// A starting instance serves now. The load it published while starting
    /// (held back until now) goes to the policies. False when `id` is not
    /// starting.
    pub fn instance_ready<D: Decide + ?Sized>(&mut self, decide: &mut D, id: InstanceId) -> bool {
        let Some(m) = self.instances.get_mut(&id) else {
            return false;
        };
        if m.phase != InstancePhase::Starting {
            return false;
        }
        m.phase = InstancePhase::Serving;
        if let Some(load) = m.load {
            decide.observe(load);
            self.stats.snapshots += 1;
        }
        true
    }

    /// An instance was lost or stopped: forget it, take it out of the
    /// policies' view, and forget the migrations in flight it is a side of
    /// (returned; their other sides' counts go down, and their later
    /// [`Controller::migration_ended`] is ignored). `None` when `id` was
    /// not known.
    pub fn remove_instance<D: Decide + ?Sized>(
        &mut self,
        decide: &mut D,
        id: InstanceId,
    ) -> Option<Vec<MigrationOrder>> {
        self.instances.remove(&id)?;
        decide.remove_instance(id);
        let involved: Vec<MigrationId> = self
            .migrations
            .values()
            .filter(|o| o.source == id || o.destination == id)
            .map(|o| o.migration_id)
            .collect();
        Some(
            involved
                .into_iter()
                .filter_map(|m| self.migration_ended(m))
                .collect(),
        )
    }

    /// The known instances, ascending.
    pub fn instance_ids(&self) -> impl Iterator<Item = InstanceId> + '_ {
        self.instances.keys().copied()
    }

    /// Number of known instances (starting, serving and draining).
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// True when no instance is known.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Number of instances in `phase`.
    pub fn count(&self, phase: InstancePhase) -> usize {
        self.instances.values().filter(|m| m.phase == phase).count()
    }

    /// The phase of `id` (`None`: unknown or removed).
    pub fn phase(&self, id: InstanceId) -> Option<InstancePhase> {
        self.instances.get(&id).map(|m| m.phase)
    }

    /// True when `id` takes new requests.
    pub fn serving(&self, id: InstanceId) -> bool {
        self.phase(id) == Some(InstancePhase::Serving)
    }

    /// Whether the scaling round may drain `id` (`None`: unknown).
    pub fn drainable(&self, id: InstanceId) -> Option<bool> {
        self.instances.get(&id).map(|m| m.drainable)
    }

    /// Says whether the scaling round may drain `id` (the server knows
    /// whether an instance is its own only once its link registers).
    /// False when `id` is unknown.
    pub fn set_drainable(&mut self, id: InstanceId, drainable: bool) -> bool {
        match self.instances.get_mut(&id) {
            Some(m) => {
                m.drainable = drainable;
                true
            }
            None => false,
        }
    }

    /// The latest load of `id` as the controller keeps it: marked draining
    /// while it drains, and counting the requests placed there since
    /// ([`InstanceLoad::with_dispatched`]).
    pub fn load(&self, id: InstanceId) -> Option<&InstanceLoad> {
        self.instances.get(&id)?.load.as_ref()
    }

    /// Migrations in flight in or out of `id` (0 when unknown).
    pub fn in_flight(&self, id: InstanceId) -> u32 {
        self.instances.get(&id).map_or(0, |m| m.in_flight)
    }

    /// Migrations in flight in the whole fleet.
    pub fn migrations_in_flight(&self) -> usize {
        self.migrations.len()
    }

    /// The migration in flight under `migration_id`.
    pub fn migration(&self, migration_id: MigrationId) -> Option<&MigrationOrder> {
        self.migrations.get(&migration_id)
    }

    /// The migrations in flight, by id.
    pub fn migrations(&self) -> impl Iterator<Item = &MigrationOrder> + '_ {
        self.migrations.values()
    }

    /// An instance's new load. Ignored (false) for an unknown or removed
    /// instance; held back (false) for a starting one, until
    /// [`Controller::instance_ready`]; otherwise marked draining when the
    /// instance drains, remembered, and passed to the policies (true).
    pub fn observe<D: Decide + ?Sized>(&mut self, decide: &mut D, load: InstanceLoad) -> bool {
        let Some(m) = self.instances.get_mut(&load.instance) else {
            return false;
        };
        let mut load = load;
        match m.phase {
            InstancePhase::Starting => {
                m.load = Some(load);
                return false;
            }
            InstancePhase::Serving => {}
            InstancePhase::Draining => load.draining = true,
        }
        m.load = Some(load);
        decide.observe(load);
        self.stats.snapshots += 1;
        if load.running > 0 || load.waiting > 0 {
            self.busy_snapshots += 1;
        }
        true
    }

    // ----- requests -----

    /// Admission: whether an instance can serve the request at all
    /// (`max_total_tokens`). A refusal is counted as rejected.
    pub fn admit(&mut self, meta: &RequestMeta) -> Result<(), TooLong> {
        let Some(limit) = self.config.max_total_tokens else {
            return Ok(());
        };
        if u64::from(meta.prompt_tokens) + u64::from(meta.max_tokens) > u64::from(limit) {
            self.stats.rejected += 1;
            return Err(TooLong {
                prompt_tokens: meta.prompt_tokens,
                max_tokens: meta.max_tokens,
                limit,
            });
        }
        Ok(())
    }

    /// Asks the priority policy about a new request and sets its
    /// `priority`.
    pub fn prioritize<D: Decide + ?Sized>(
        &mut self,
        decide: &mut D,
        meta: &mut RequestMeta,
    ) -> PriorityAssignment {
        let assignment = decide.assign_priority(meta);
        self.stats.priority_calls += 1;
        meta.priority = assignment.priority;
        assignment
    }

    /// The instance a request goes to: the dispatch policy's answer if it
    /// is serving and not in `refused` (instances that turned the request
    /// down already), else the lowest-id serving instance not refused (the
    /// policies' view may lag the membership). `None` when there is none.
    /// The chosen instance's kept load counts the request as waiting
    /// until its next load.
    pub fn place<D: Decide + ?Sized>(
        &mut self,
        decide: &mut D,
        meta: &RequestMeta,
        refused: &BTreeSet<InstanceId>,
    ) -> Option<InstanceId> {
        let answer = decide.dispatch(meta);
        self.stats.dispatch_calls += 1;
        let takes = |id: &InstanceId, m: &Member| {
            m.phase == InstancePhase::Serving && !refused.contains(id)
        };
        let target = match answer {
            Some(t) if self.instances.get(&t).is_some_and(|m| takes(&t, m)) => Some(t),
            _ => {
                let fallback = self
                    .instances
                    .iter()
                    .find(|(id, m)| takes(id, m))
                    .map(|(&id, _)| id);
                match fallback {
                    None => self.stats.rejected += 1,
                    Some(_) if answer.is_some() => self.stats.redirects += 1,
                    Some(_) => {}
                }
                fallback
            }
        }?;
        if let Some(load) = self
            .instances
            .get_mut(&target)
            .and_then(|m| m.load.as_mut())
        {
            *load = load.with_dispatched(meta.prompt_tokens);
        }
        Some(target)
    }

    // ----- the migration round -----

    /// First half of a migration round: the policy's pairs, without those
    /// whose source is unknown or starting or that pair an instance with
    /// itself. For each pair the shell fetches the source's candidates and
    /// calls [`Controller::choose_migrations`].
    pub fn plan_migrations<D: Decide + ?Sized>(&mut self, decide: &mut D) -> Vec<MigrationPair> {
        let pairs = decide.plan_migration();
        self.stats.plan_calls += 1;
        self.busy_snapshots = 0;
        pairs
            .into_iter()
            .filter(|p| p.source != p.destination && self.can_send(p.source))
            .collect()
    }

    /// Second half of a migration round, for one pair: the policy's picks
    /// among the source's `candidates` (not asked when the source has
    /// since gone or is starting), counted as planned; with
    /// [`ControllerConfig::migrate`], each started in order as by
    /// [`Controller::start_migration`] up to the first that cannot start.
    pub fn choose_migrations<D: Decide + ?Sized>(
        &mut self,
        decide: &mut D,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> MigrationChoice {
        if pair.source == pair.destination || !self.can_send(pair.source) {
            return MigrationChoice::default();
        }
        let chosen = decide.choose_migrations(pair, candidates);
        self.stats.choose_calls += 1;
        self.stats.migrations_planned += chosen.len() as u64;
        let mut orders = Vec::new();
        let mut refused = None;
        if self.config.migrate {
            for &request in &chosen {
                match self.start_migration(request, pair.source, pair.destination) {
                    Ok(order) => orders.push(order),
                    Err(why) => {
                        refused = Some((request, why));
                        break;
                    }
                }
            }
        }
        MigrationChoice {
            chosen,
            orders,
            refused,
        }
    }

    fn can_send(&self, source: InstanceId) -> bool {
        matches!(
            self.phase(source),
            Some(InstancePhase::Serving | InstancePhase::Draining)
        )
    }

    /// Whether a migration from `source` to `destination` could start now
    /// (any request not already moving): distinct known instances, the
    /// destination serving, the source serving or draining, both under
    /// [`ControllerConfig::max_migrations_per_instance`]. Counts nothing.
    ///
    /// # Errors
    /// The first condition that fails, as [`MigrationNotStarted`].
    pub fn check_migration(
        &self,
        source: InstanceId,
        destination: InstanceId,
    ) -> Result<(), MigrationNotStarted> {
        if source == destination {
            return Err(MigrationNotStarted::SameInstance { instance: source });
        }
        let member = |instance| {
            self.instances
                .get(&instance)
                .ok_or(MigrationNotStarted::UnknownInstance { instance })
        };
        let (src, dst) = (member(source)?, member(destination)?);
        if dst.phase != InstancePhase::Serving {
            return Err(MigrationNotStarted::DestinationNotServing {
                destination,
                phase: dst.phase,
            });
        }
        if src.phase == InstancePhase::Starting {
            return Err(MigrationNotStarted::SourceNotServing {
                instance: source,
                phase: src.phase,
            });
        }
        let limit = self.config.max_migrations_per_instance;
        for (instance, m) in [(source, src), (destination, dst)] {
            if m.in_flight >= limit {
                return Err(MigrationNotStarted::AtLimit {
                    instance,
                    in_flight: m.in_flight,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Starts migrating `request` from `source` to `destination` if
    /// [`Controller::check_migration`] allows and the request is not
    /// already moving: a fresh migration id, counted in flight on both
    /// sides until [`Controller::migration_ended`]. A refusal counts as
    /// skipped.
    ///
    /// # Errors
    /// Why it cannot start (nothing changes but the skipped count).
    pub fn start_migration(
        &mut self,
        request: RequestId,
        source: InstanceId,
        destination: InstanceId,
    ) -> Result<MigrationOrder, MigrationNotStarted> {
        let allowed = self.check_migration(source, destination).and_then(|()| {
            match self.migrations.values().find(|o| o.request == request) {
                Some(o) => Err(MigrationNotStarted::AlreadyMigrating {
                    request,
                    migration_id: o.migration_id,
                }),
                None => Ok(()),
            }
        });
        if let Err(why) = allowed {
            self.stats.migrations_skipped += 1;
            return Err(why);
        }
        for side in [source, destination] {
            if let Some(m) = self.instances.get_mut(&side) {
                m.in_flight += 1;
            }
        }
        let order = MigrationOrder {
            migration_id: self.next_migration,
            request,
            source,
            destination,
        };
        self.next_migration += 1;
        self.migrations.insert(order.migration_id, order);
        self.stats.migrations_started += 1;
        Ok(order)
    }

    /// A migration ended (committed, aborted, refused, or never started by
    /// the source): its sides' counts go down. The order it was, or `None`
    /// for an unknown id (ended already, or forgotten with a removed
    /// instance), which changes nothing.
    pub fn migration_ended(&mut self, migration_id: MigrationId) -> Option<MigrationOrder> {
        let order = self.migrations.remove(&migration_id)?;
        for side in [order.source, order.destination] {
            if let Some(m) = self.instances.get_mut(&side) {
                m.in_flight = m.in_flight.saturating_sub(1);
            }
        }
        self.stats.migrations_ended += 1;
        Some(order)
    }

    /// A migration an operator asks for: `request` if it is among the
    /// source's `candidates`, else (`None`) the migration policy's pick
    /// among them, else the first candidate; started as by
    /// [`Controller::start_migration`], whatever
    /// [`ControllerConfig::migrate`] says. The instances are checked before
    /// the policy is asked.
    ///
    /// # Errors
    /// The named request is not a candidate, there is no candidate, or the
    /// migration cannot start (counted as skipped).
    pub fn migrate_now<D: Decide + ?Sized>(
        &mut self,
        decide: &mut D,
        source: InstanceId,
        destination: InstanceId,
        request: Option<RequestId>,
        candidates: &[MigrationCandidate],
    ) -> Result<MigrationOrder, ManualMigrationError> {
        if let Err(why) = self.check_migration(source, destination) {
            self.stats.migrations_skipped += 1;
            return Err(why.into());
        }
        let is_candidate = |r: &RequestId| candidates.iter().any(|c| c.id == *r);
        let chosen = match request {
            Some(r) if is_candidate(&r) => r,
            Some(r) => {
                return Err(ManualMigrationError::NotRunning {
                    request: r,
                    instance: source,
                })
            }
            None => {
                let pair = MigrationPair {
                    source,
                    destination,
                };
                let picked = decide.choose_migrations(pair, candidates);
                self.stats.choose_calls += 1;
                picked
                    .into_iter()
                    .find(is_candidate)
                    .or_else(|| candidates.first().map(|c| c.id))
                    .ok_or(ManualMigrationError::NoCandidate { instance: source })?
            }
        };
        Ok(self.start_migration(chosen, source, destination)?)
    }

    // ----- the scaling round -----

    /// One scaling round: the policy's decision within the bounds, then
    /// every drained instance that is empty is stopped.
    ///
    /// - `ScaleUp(n)`: first the drains in progress are cancelled, the
    ///   most recently drained first (the least drained: the older drains
    ///   are closer to their end), each counting as one of the `n`; then
    ///   the rest start as new instances (fresh ids, drainable, added as
    ///   starting) while the instances (starting, serving, draining) stay
    ///   within [`ControllerConfig::max_instances`].
    /// - `Drain(id)`: only if `id` serves, is drainable, and more than
    ///   [`ControllerConfig::min_instances`] instances serve. Its kept
    ///   load, marked draining, goes to the policies at once.
    /// - Then each draining instance whose kept load says draining with
    ///   nothing running, waiting or migrating in or out, and that has no
    ///   migration in flight in the controller's books, is removed (as by
    ///   [`Controller::remove_instance`]) and stopped. One without a load
    ///   is never stopped.
    pub fn scaling_round<D: Decide + ?Sized>(&mut self, decide: &mut D) -> Vec<ScalingAction> {
        let decision = decide.decide_scaling();
        self.stats.scaling_calls += 1;
        let mut actions = Vec::new();
        match decision {
            ScalingDecision::Hold => {}
            ScalingDecision::ScaleUp(n) => {
                let mut draining: Vec<(u64, InstanceId)> = self
                    .instances
                    .iter()
                    .filter(|(_, m)| m.phase == InstancePhase::Draining)
                    .map(|(&id, m)| (m.drained_seq, id))
                    .collect();
                draining.sort_unstable_by(|a, b| b.cmp(a));
                let mut wanted = n;
                for (_, id) in draining.into_iter().take(n as usize) {
                    self.cancel_drain(decide, id);
                    actions.push(ScalingAction::CancelDrain { instance: id });
                    wanted -= 1;
                }
                let existing = u32::try_from(self.instances.len()).unwrap_or(u32::MAX);
                let room = self.config.max_instances.saturating_sub(existing);
                for _ in 0..wanted.min(room) {
                    let Some(id) = self.try_allocate_instance_id() else {
                        break;
                    };
                    self.add_instance(id, InstancePhase::Starting, true);
                    self.stats.scale_ups += 1;
                    actions.push(ScalingAction::Start { instance: id });
                }
            }
            ScalingDecision::Drain(id) => {
                let serving = self.count(InstancePhase::Serving);
                let allowed = self
                    .instances
                    .get(&id)
                    .is_some_and(|m| m.phase == InstancePhase::Serving && m.drainable)
                    && serving > self.config.min_instances as usize;
                if allowed {
                    self.drain(decide, id);
                    actions.push(ScalingAction::Drain { instance: id });
                }
            }
        }
        let empty: Vec<InstanceId> = self
            .instances
            .iter()
            .filter(|(_, m)| {
                m.phase == InstancePhase::Draining
                    && m.in_flight == 0
                    && m.load.is_some_and(|l| {
                        l.draining
                            && l.running == 0
                            && l.waiting == 0
                            && l.migrating_in == 0
                            && l.migrating_out == 0
                    })
            })
            .map(|(&id, _)| id)
            .collect();
        for id in empty {
            self.remove_instance(decide, id);
            self.stats.stops += 1;
            actions.push(ScalingAction::Stop { instance: id });
        }
        actions
    }

    fn next_drain_seq(&mut self) -> u64 {
        self.drain_seq += 1;
        self.drain_seq
    }

    /// Serving → draining; the policies hear of it at once.
    fn drain<D: Decide + ?Sized>(&mut self, decide: &mut D, id: InstanceId) {
        let seq = self.next_drain_seq();
        let Some(m) = self.instances.get_mut(&id) else {
            return;
        };
        m.phase = InstancePhase::Draining;
        m.drained_seq = seq;
        self.stats.drains += 1;
        if let Some(load) = m.load.as_mut() {
            load.draining = true;
            decide.observe(*load);
            self.stats.snapshots += 1;
        }
    }

    /// Draining → serving; the policies hear of it at once.
    fn cancel_drain<D: Decide + ?Sized>(&mut self, decide: &mut D, id: InstanceId) {
        let Some(m) = self.instances.get_mut(&id) else {
            return;
        };
        m.phase = InstancePhase::Serving;
        self.stats.drain_cancels += 1;
        if let Some(load) = m.load.as_mut() {
            load.draining = false;
            decide.observe(*load);
            self.stats.snapshots += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llumen_policy_logic::Llumnix;
    use InstancePhase::{Draining, Serving, Starting};

    /// A [`Decide`] whose answers each test sets, and which records what it
    /// was told.
    struct Script {
        priority: PriorityAssignment,
        dispatch: Option<InstanceId>,
        plan: Vec<MigrationPair>,
        choose: Vec<RequestId>,
        scaling: ScalingDecision,
        observed: Vec<InstanceLoad>,
        removed: Vec<InstanceId>,
        choose_asked: Vec<MigrationPair>,
    }

    impl Default for Script {
        fn default() -> Self {
            Self {
                priority: PriorityAssignment::default(),
                dispatch: None,
                plan: Vec::new(),
                choose: Vec::new(),
                scaling: ScalingDecision::Hold,
                observed: Vec::new(),
                removed: Vec::new(),
                choose_asked: Vec::new(),
            }
        }
    }

    impl Decide for Script {
        fn observe(&mut self, load: InstanceLoad) {
            self.observed.push(load);
        }
        fn remove_instance(&mut self, instance: InstanceId) {
            self.removed.push(instance);
        }
        fn assign_priority(&mut self, _: &RequestMeta) -> PriorityAssignment {
            self.priority
        }
        fn dispatch(&mut self, _: &RequestMeta) -> Option<InstanceId> {
            self.dispatch
        }
        fn plan_migration(&mut self) -> Vec<MigrationPair> {
            self.plan.clone()
        }
        fn choose_migrations(
            &mut self,
            pair: MigrationPair,
            _: &[MigrationCandidate],
        ) -> Vec<RequestId> {
            self.choose_asked.push(pair);
            self.choose.clone()
        }
        fn decide_scaling(&mut self) -> ScalingDecision {
            self.scaling
        }
    }

    /// A busy instance's load.
    fn busy(instance: InstanceId) -> InstanceLoad {
        InstanceLoad {
            instance,
            block_size: 16,
            total_blocks: 100,
            used_blocks: 10,
            running: 1,
            ..Default::default()
        }
    }

    /// An empty instance's load.
    fn idle(instance: InstanceId) -> InstanceLoad {
        InstanceLoad {
            running: 0,
            used_blocks: 0,
            ..busy(instance)
        }
    }

    fn pair(source: InstanceId, destination: InstanceId) -> MigrationPair {
        MigrationPair {
            source,
            destination,
        }
    }

    /// A controller with these instances (id, phase, drainable), each with
    /// a busy load when it is not starting.
    fn fleet(
        config: ControllerConfig,
        members: &[(InstanceId, InstancePhase, bool)],
    ) -> (Controller, Script) {
        let mut c = Controller::new(config);
        let mut d = Script::default();
        for &(id, phase, drainable) in members {
            assert!(c.add_instance(id, phase, drainable));
            if phase != Starting {
                assert!(c.observe(&mut d, busy(id)));
            }
        }
        d.observed.clear();
        (c, d)
    }

    fn meta(id: RequestId) -> RequestMeta {
        RequestMeta {
            id,
            prompt_tokens: 32,
            max_tokens: 8,
            ..Default::default()
        }
    }

    #[test]
    fn placement_falls_back_to_the_lowest_serving_instance() {
        // 0 serving, 1 draining, 2 serving, 3 starting.
        let members = [
            (0, Serving, true),
            (1, Draining, true),
            (2, Serving, true),
            (3, Starting, true),
        ];
        /// (answer, refused, placed, redirects, rejected)
        type Row = (
            Option<InstanceId>,
            &'static [InstanceId],
            Option<InstanceId>,
            u64,
            u64,
        );
        let table: &[Row] = &[
            (Some(2), &[], Some(2), 0, 0),
            (Some(0), &[], Some(0), 0, 0),
            (Some(1), &[], Some(0), 1, 0),  // draining
            (Some(3), &[], Some(0), 1, 0),  // starting
            (Some(9), &[], Some(0), 1, 0),  // unknown
            (Some(2), &[2], Some(0), 1, 0), // refused
            (Some(0), &[0], Some(2), 1, 0),
            (None, &[], Some(0), 0, 0),
            (None, &[0], Some(2), 0, 0),
            (Some(2), &[0, 2], None, 0, 1),
            (None, &[0, 2], None, 0, 1),
        ];
        for (i, &(answer, refused, placed, redirects, rejected)) in table.iter().enumerate() {
            let (mut c, mut d) = fleet(ControllerConfig::default(), &members);
            d.dispatch = answer;
            let refused: BTreeSet<InstanceId> = refused.iter().copied().collect();
            assert_eq!(c.place(&mut d, &meta(7), &refused), placed, "row {i}");
            let s = c.stats();
            assert_eq!(
                (s.dispatch_calls, s.redirects, s.rejected),
                (1, redirects, rejected),
                "row {i}"
            );
        }
    }

    #[test]
    fn a_placed_request_counts_as_waiting_until_the_next_load() {
        let (mut c, mut d) = fleet(ControllerConfig::default(), &[(0, Serving, true)]);
        d.dispatch = Some(0);
        assert_eq!(c.place(&mut d, &meta(1), &BTreeSet::new()), Some(0));
        assert_eq!(c.load(0).unwrap().waiting, 1);
        assert_eq!(c.load(0).unwrap().waiting_demand_blocks, 2);
        c.observe(&mut d, busy(0));
        assert_eq!(c.load(0).unwrap().waiting, 0);
    }

    #[test]
    fn prioritize_sets_the_priority() {
        let (mut c, mut d) = fleet(ControllerConfig::default(), &[(0, Serving, true)]);
        d.priority = PriorityAssignment {
            priority: 3,
            headroom_blocks: 9,
        };
        let mut m = meta(1);
        assert_eq!(c.prioritize(&mut d, &mut m), d.priority);
        assert_eq!(m.priority, 3);
        assert_eq!(c.stats().priority_calls, 1);
    }

    #[test]
    fn plan_drops_pairs_from_unknown_or_starting_sources_and_self_pairs() {
        let members = [
            (0, Serving, true),
            (1, Serving, true),
            (2, Draining, true),
            (3, Starting, true),
        ];
        let (mut c, mut d) = fleet(ControllerConfig::default(), &members);
        d.plan = vec![
            pair(0, 0),
            pair(3, 1),
            pair(9, 1),
            pair(0, 1),
            pair(2, 1),
            pair(1, 2),
        ];
        // A draining destination is kept here: the start refuses it.
        assert_eq!(
            c.plan_migrations(&mut d),
            [pair(0, 1), pair(2, 1), pair(1, 2)]
        );
        assert_eq!(c.stats().plan_calls, 1);
    }

    #[test]
    fn migration_choices_respect_the_limits_and_stop_at_the_first_refusal() {
        use MigrationNotStarted as N;
        let members = [
            (0, Serving, true),
            (1, Serving, true),
            (2, Draining, true),
            (3, Starting, true),
        ];
        struct Row {
            limit: u32,
            migrate: bool,
            pair: MigrationPair,
            chosen: &'static [RequestId],
            started: &'static [RequestId],
            refused: Option<(RequestId, MigrationNotStarted)>,
            asked: bool,
        }
        let row = |limit, pair, chosen, started, refused| Row {
            limit,
            migrate: true,
            pair,
            chosen,
            started,
            refused,
            asked: true,
        };
        let table = [
            row(1, pair(0, 1), &[10], &[10], None),
            row(
                1,
                pair(0, 1),
                &[10, 11, 12],
                &[10],
                Some((
                    11,
                    N::AtLimit {
                        instance: 0,
                        in_flight: 1,
                        limit: 1,
                    },
                )),
            ),
            row(
                2,
                pair(0, 1),
                &[10, 11, 12],
                &[10, 11],
                Some((
                    12,
                    N::AtLimit {
                        instance: 0,
                        in_flight: 2,
                        limit: 2,
                    },
                )),
            ),
            row(
                2,
                pair(0, 1),
                &[10, 10],
                &[10],
                Some((
                    10,
                    N::AlreadyMigrating {
                        request: 10,
                        migration_id: 1,
                    },
                )),
            ),
            row(1, pair(2, 0), &[10], &[10], None), // a draining source sends
            row(
                1,
                pair(0, 2),
                &[10],
                &[],
                Some((
                    10,
                    N::DestinationNotServing {
                        destination: 2,
                        phase: Draining,
                    },
                )),
            ),
            row(
                1,
                pair(0, 3),
                &[10],
                &[],
                Some((
                    10,
                    N::DestinationNotServing {
                        destination: 3,
                        phase: Starting,
                    },
                )),
            ),
            row(
                1,
                pair(0, 9),
                &[10],
                &[],
                Some((10, N::UnknownInstance { instance: 9 })),
            ),
            row(
                0,
                pair(0, 1),
                &[10],
                &[],
                Some((
                    10,
                    N::AtLimit {
                        instance: 0,
                        in_flight: 0,
                        limit: 0,
                    },
                )),
            ),
            // Not asked: the source is starting, unknown, or the destination.
            Row {
                asked: false,
                ..row(1, pair(3, 0), &[], &[], None)
            },
            Row {
                asked: false,
                ..row(1, pair(9, 0), &[], &[], None)
            },
            Row {
                asked: false,
                ..row(1, pair(0, 0), &[], &[], None)
            },
            // Off: chosen and counted, nothing started.
            Row {
                migrate: false,
                ..row(1, pair(0, 1), &[10, 11], &[], None)
            },
        ];
        for (i, r) in table.iter().enumerate() {
            let config = ControllerConfig {
                max_migrations_per_instance: r.limit,
                migrate: r.migrate,
                ..Default::default()
            };
            let (mut c, mut d) = fleet(config, &members);
            d.choose = r.chosen.to_vec();
            let choice = c.choose_migrations(&mut d, r.pair, &[]);
            assert_eq!(choice.chosen, r.chosen, "row {i}");
            let started: Vec<RequestId> = choice.orders.iter().map(|o| o.request).collect();
            assert_eq!(started, r.started, "row {i}");
            assert_eq!(choice.refused, r.refused, "row {i}");
            assert_eq!(d.choose_asked.len(), usize::from(r.asked), "row {i}");
            let s = c.stats();
            assert_eq!(s.migrations_planned, r.chosen.len() as u64, "row {i}");
            assert_eq!(s.migrations_started, r.started.len() as u64, "row {i}");
            assert_eq!(
                s.migrations_skipped,
                u64::from(r.refused.is_some()),
                "row {i}"
            );
            for (k, o) in choice.orders.iter().enumerate() {
                assert_eq!(o.migration_id, k as u64 + 1, "row {i}: ids from 1");
                assert_eq!(
                    (o.source, o.destination),
                    (r.pair.source, r.pair.destination)
                );
            }
            let n = r.started.len() as u32;
            if n > 0 {
                assert_eq!(c.in_flight(r.pair.source), n, "row {i}");
                assert_eq!(c.in_flight(r.pair.destination), n, "row {i}");
            }
            assert_eq!(c.migrations_in_flight(), r.started.len(), "row {i}");
        }
    }

    #[test]
    fn start_migration_refusals_read_well() {
        let (mut c, _) = fleet(
            ControllerConfig::default(),
            &[(0, Serving, true), (1, Starting, true)],
        );
        let e = c.start_migration(5, 0, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "source and destination are the same instance 0"
        );
        let e = c.start_migration(5, 1, 0).unwrap_err();
        assert_eq!(
            e,
            MigrationNotStarted::SourceNotServing {
                instance: 1,
                phase: Starting
            }
        );
        assert!(e.to_string().contains("not serving"), "{e}");
        assert_eq!(
            c.start_migration(5, 7, 0).unwrap_err().to_string(),
            "no instance 7"
        );
        assert_eq!(c.stats().migrations_skipped, 3);
    }

    #[test]
    fn a_migration_ends_once() {
        let (mut c, _) = fleet(
            ControllerConfig::default(),
            &[(0, Serving, true), (1, Serving, true)],
        );
        let o = c.start_migration(5, 0, 1).unwrap();
        assert_eq!(o.migration_id, 1);
        assert_eq!(c.migration_ended(o.migration_id), Some(o));
        assert_eq!(c.migration_ended(o.migration_id), None);
        assert_eq!(c.migration_ended(99), None);
        assert_eq!((c.in_flight(0), c.in_flight(1)), (0, 0));
        let s = c.stats();
        assert_eq!((s.migrations_started, s.migrations_ended), (1, 1));
        // The next migration gets a fresh id, and may start again.
        assert_eq!(c.start_migration(5, 1, 0).unwrap().migration_id, 2);
    }

    #[test]
    fn removal_mid_migration_frees_the_other_sides() {
        let config = ControllerConfig {
            max_migrations_per_instance: 2,
            ..Default::default()
        };
        let members = [(0, Serving, true), (1, Serving, true), (2, Serving, true)];
        let (mut c, mut d) = fleet(config, &members);
        let a = c.start_migration(10, 0, 1).unwrap();
        let b = c.start_migration(11, 2, 1).unwrap();
        let keep = c.start_migration(12, 0, 2).unwrap();
        assert_eq!(c.in_flight(1), 2);
        assert_eq!(c.remove_instance(&mut d, 1), Some(vec![a, b]));
        assert_eq!(d.removed, [1]);
        assert_eq!((c.in_flight(0), c.in_flight(2), c.in_flight(1)), (1, 1, 0));
        assert_eq!(c.migrations_in_flight(), 1);
        // The shell's late reports of the forgotten migrations change nothing.
        assert_eq!(c.migration_ended(a.migration_id), None);
        assert_eq!(c.migration_ended(b.migration_id), None);
        assert_eq!((c.in_flight(0), c.in_flight(2)), (1, 1));
        assert_eq!(c.migration_ended(keep.migration_id), Some(keep));
        let s = c.stats();
        assert_eq!((s.migrations_started, s.migrations_ended), (3, 3));
        assert_eq!(c.remove_instance(&mut d, 1), None, "removed already");
        assert_eq!(d.removed, [1]);
    }

    #[test]
    fn migrate_now_checks_picks_and_starts() {
        let candidates = [10, 11].map(|id| MigrationCandidate {
            id,
            ..Default::default()
        });
        let members = [
            (0, Serving, true),
            (1, Serving, true),
            (2, Draining, true),
            (3, Serving, true),
        ];
        let (mut c, mut d) = fleet(
            ControllerConfig {
                migrate: false,
                ..Default::default()
            },
            &members,
        );
        assert_eq!(
            c.migrate_now(&mut d, 0, 0, None, &candidates),
            Err(MigrationNotStarted::SameInstance { instance: 0 }.into())
        );
        assert_eq!(
            c.migrate_now(&mut d, 0, 1, Some(99), &candidates),
            Err(ManualMigrationError::NotRunning {
                request: 99,
                instance: 0
            })
        );
        assert_eq!(
            c.migrate_now(&mut d, 0, 1, None, &[]),
            Err(ManualMigrationError::NoCandidate { instance: 0 })
        );
        assert_eq!(d.choose_asked.len(), 1, "the policy was asked once, above");
        d.choose = vec![11];
        assert_eq!(
            c.migrate_now(&mut d, 0, 1, None, &candidates)
                .unwrap()
                .request,
            11
        );
        d.choose = vec![];
        let o = c.migrate_now(&mut d, 2, 3, None, &candidates).unwrap();
        assert_eq!((o.request, o.source), (10, 2), "the first candidate");
        assert!(matches!(
            c.migrate_now(&mut d, 1, 0, Some(10), &candidates),
            Err(ManualMigrationError::NotStarted(
                MigrationNotStarted::AtLimit { .. }
            ))
        ));
    }

    /// How to make an instance's load (`None`: it has none).
    type Load = Option<fn(InstanceId) -> InstanceLoad>;

    /// One scaling scenario: instances (id, phase, drainable, load), bounds,
    /// the policy's decision, and what should come of it.
    struct Scaling {
        name: &'static str,
        members: Vec<(InstanceId, InstancePhase, bool, Load)>,
        min: u32,
        max: u32,
        decision: ScalingDecision,
        /// A migration in flight (source, destination) before the round.
        migration: Option<(InstanceId, InstanceId)>,
        actions: &'static [ScalingAction],
        /// Phases after the round (`None`: forgotten).
        after: &'static [(InstanceId, Option<InstancePhase>)],
    }

    fn run(s: &Scaling) -> (Controller, Script) {
        let config = ControllerConfig {
            min_instances: s.min,
            max_instances: s.max,
            max_migrations_per_instance: 4,
            ..Default::default()
        };
        let mut c = Controller::new(config);
        let mut d = Script::default();
        for &(id, phase, drainable, load) in &s.members {
            c.add_instance(id, phase, drainable);
            if let Some(load) = load {
                // A draining instance's loads say so (the overlay).
                c.observe(&mut d, load(id));
            }
        }
        if let Some((from, to)) = s.migration {
            c.start_migration(1, from, to).unwrap();
        }
        d.observed.clear();
        d.scaling = s.decision;
        let actions = c.scaling_round(&mut d);
        assert_eq!(actions, s.actions, "{}", s.name);
        for &(id, phase) in s.after {
            assert_eq!(c.phase(id), phase, "{}: instance {id}", s.name);
        }
        (c, d)
    }

    #[test]
    fn scaling_rounds() {
        use ScalingAction::{CancelDrain, Drain, Start, Stop};
        use ScalingDecision as S;
        let b: Load = Some(busy);
        let e: Load = Some(idle);
        let migrating_out: Load = Some(|id| InstanceLoad {
            migrating_out: 1,
            ..idle(id)
        });
        let waiting: Load = Some(|id| InstanceLoad {
            waiting: 1,
            ..idle(id)
        });
        let m = |v: Vec<(InstanceId, InstancePhase, bool, Load)>| v;
        let table = [
            Scaling {
                name: "drain within the bounds",
                members: m(vec![(0, Serving, true, b), (1, Serving, true, b)]),
                min: 1,
                max: 4,
                decision: S::Drain(1),
                migration: None,
                actions: &[Drain { instance: 1 }],
                after: &[(0, Some(Serving)), (1, Some(Draining))],
            },
            Scaling {
                name: "drain at min_instances",
                members: m(vec![(0, Serving, true, b), (1, Serving, true, b)]),
                min: 2,
                max: 4,
                decision: S::Drain(1),
                migration: None,
                actions: &[],
                after: &[(1, Some(Serving))],
            },
            Scaling {
                name: "starting instances do not count towards min_instances",
                members: m(vec![
                    (0, Serving, true, b),
                    (1, Serving, true, b),
                    (2, Starting, true, None),
                ]),
                min: 2,
                max: 4,
                decision: S::Drain(1),
                migration: None,
                actions: &[],
                after: &[(1, Some(Serving))],
            },
            Scaling {
                name: "an instance that is not drainable",
                members: m(vec![(0, Serving, true, b), (1, Serving, false, b)]),
                min: 1,
                max: 4,
                decision: S::Drain(1),
                migration: None,
                actions: &[],
                after: &[(1, Some(Serving))],
            },
            Scaling {
                name: "drain of a draining instance",
                members: m(vec![
                    (0, Serving, true, b),
                    (1, Serving, true, b),
                    (2, Draining, true, b),
                ]),
                min: 1,
                max: 4,
                decision: S::Drain(2),
                migration: None,
                actions: &[],
                after: &[(2, Some(Draining))],
            },
            Scaling {
                name: "drain of a starting instance",
                members: m(vec![
                    (0, Serving, true, b),
                    (1, Serving, true, b),
                    (3, Starting, true, None),
                ]),
                min: 1,
                max: 4,
                decision: S::Drain(3),
                migration: None,
                actions: &[],
                after: &[(3, Some(Starting))],
            },
            Scaling {
                name: "drain of an unknown instance",
                members: m(vec![(0, Serving, true, b), (1, Serving, true, b)]),
                min: 1,
                max: 4,
                decision: S::Drain(9),
                migration: None,
                actions: &[],
                after: &[(9, None)],
            },
            Scaling {
                name: "an empty instance is drained and stopped at once",
                members: m(vec![(0, Serving, true, b), (1, Serving, true, e)]),
                min: 1,
                max: 4,
                decision: S::Drain(1),
                migration: None,
                actions: &[Drain { instance: 1 }, Stop { instance: 1 }],
                after: &[(0, Some(Serving)), (1, None)],
            },
            Scaling {
                name: "scale-up cancels the latest drains first, then starts",
                members: m(vec![
                    (0, Serving, true, b),
                    (1, Draining, true, b),
                    (2, Draining, true, b),
                ]),
                min: 1,
                max: 10,
                decision: S::ScaleUp(3),
                migration: None,
                actions: &[
                    CancelDrain { instance: 2 },
                    CancelDrain { instance: 1 },
                    Start { instance: 3 },
                ],
                after: &[(1, Some(Serving)), (2, Some(Serving)), (3, Some(Starting))],
            },
            Scaling {
                name: "cancelled drains count towards the scale-up",
                members: m(vec![
                    (0, Serving, true, b),
                    (1, Draining, true, b),
                    (2, Draining, true, b),
                ]),
                min: 1,
                max: 10,
                decision: S::ScaleUp(1),
                migration: None,
                actions: &[CancelDrain { instance: 2 }],
                after: &[(1, Some(Draining)), (2, Some(Serving)), (3, None)],
            },
            Scaling {
                name: "scale-up capped at max_instances (starting ones count)",
                members: m(vec![
                    (0, Serving, true, b),
                    (1, Serving, true, b),
                    (2, Starting, true, None),
                ]),
                min: 1,
                max: 4,
                decision: S::ScaleUp(5),
                migration: None,
                actions: &[Start { instance: 3 }],
                after: &[(3, Some(Starting)), (4, None)],
            },
            Scaling {
                name: "at max_instances a scale-up only cancels drains",
                members: m(vec![(0, Serving, true, b), (1, Draining, true, b)]),
                min: 1,
                max: 2,
                decision: S::ScaleUp(3),
                migration: None,
                actions: &[CancelDrain { instance: 1 }],
                after: &[(1, Some(Serving)), (2, None)],
            },
            Scaling {
                name: "scale-up from nothing",
                members: m(vec![]),
                min: 1,
                max: 4,
                decision: S::ScaleUp(2),
                migration: None,
                actions: &[Start { instance: 0 }, Start { instance: 1 }],
                after: &[(0, Some(Starting)), (1, Some(Starting))],
            },
            Scaling {
                name: "a drained empty instance stops",
                members: m(vec![(0, Serving, true, b), (1, Draining, true, e)]),
                min: 1,
                max: 4,
                decision: S::Hold,
                migration: None,
                actions: &[Stop { instance: 1 }],
                after: &[(1, None)],
            },
            Scaling {
                name: "even one that is not drainable (drained by hand)",
                members: m(vec![(0, Serving, true, b), (1, Draining, false, e)]),
                min: 1,
                max: 4,
                decision: S::Hold,
                migration: None,
                actions: &[Stop { instance: 1 }],
                after: &[(1, None)],
            },
            Scaling {
                name: "a drained instance that still runs something",
                members: m(vec![(0, Serving, true, b), (1, Draining, true, b)]),
                min: 1,
                max: 4,
                decision: S::Hold,
                migration: None,
                actions: &[],
                after: &[(1, Some(Draining))],
            },
            Scaling {
                name: "a drained instance with a request waiting",
                members: m(vec![(0, Serving, true, b), (1, Draining, true, waiting)]),
                min: 1,
                max: 4,
                decision: S::Hold,
                migration: None,
                actions: &[],
                after: &[(1, Some(Draining))],
            },
            Scaling {
                name: "a drained instance whose load shows a migration",
                members: m(vec![
                    (0, Serving, true, b),
                    (1, Draining, true, migrating_out),
                ]),
                min: 1,
                max: 4,
                decision: S::Hold,
                migration: None,
                actions: &[],
                after: &[(1, Some(Draining))],
            },
            Scaling {
                name: "a drained empty instance with a migration in the books",
                members: m(vec![(0, Serving, true, b), (1, Draining, true, e)]),
                min: 1,
                max: 4,
                decision: S::Hold,
                migration: Some((1, 0)),
                actions: &[],
                after: &[(1, Some(Draining))],
            },
            Scaling {
                name: "a drained instance without a load",
                members: m(vec![(0, Serving, true, b), (1, Draining, true, None)]),
                min: 1,
                max: 4,
                decision: S::Hold,
                migration: None,
                actions: &[],
                after: &[(1, Some(Draining))],
            },
            Scaling {
                name: "a serving empty instance is not stopped",
                members: m(vec![(0, Serving, true, e), (1, Serving, true, e)]),
                min: 1,
                max: 4,
                decision: S::Hold,
                migration: None,
                actions: &[],
                after: &[(0, Some(Serving)), (1, Some(Serving))],
            },
        ];
        for s in &table {
            let (c, d) = run(s);
            let stops: Vec<InstanceId> = s
                .actions
                .iter()
                .filter(|a| matches!(a, Stop { .. }))
                .map(ScalingAction::instance)
                .collect();
            assert_eq!(
                d.removed, stops,
                "{}: the policies forget what stops",
                s.name
            );
            assert_eq!(c.stats().stops, stops.len() as u64, "{}", s.name);
            assert_eq!(c.stats().scaling_calls, 1, "{}", s.name);
        }
    }

    #[test]
    fn a_drained_instance_stops_once_its_migration_ends() {
        let (mut c, mut d) = fleet(
            ControllerConfig::default(),
            &[(0, Serving, true), (1, Serving, true)],
        );
        let o = c.start_migration(5, 1, 0).unwrap();
        d.scaling = ScalingDecision::Drain(1);
        assert_eq!(
            c.scaling_round(&mut d),
            [ScalingAction::Drain { instance: 1 }]
        );
        c.observe(&mut d, idle(1));
        d.scaling = ScalingDecision::Hold;
        assert_eq!(c.scaling_round(&mut d), []);
        c.migration_ended(o.migration_id);
        assert_eq!(
            c.scaling_round(&mut d),
            [ScalingAction::Stop { instance: 1 }]
        );
        assert_eq!(c.phase(1), None);
    }

    #[test]
    fn drains_and_cancels_tell_the_policies_at_once() {
        let config = ControllerConfig {
            max_instances: 8,
            ..Default::default()
        };
        let members = [(0, Serving, true), (1, Serving, true), (2, Serving, true)];
        let (mut c, mut d) = fleet(config, &members);
        // Drain 2, then 1: the later drain (1) is cancelled first.
        for id in [2, 1] {
            d.scaling = ScalingDecision::Drain(id);
            assert_eq!(
                c.scaling_round(&mut d),
                [ScalingAction::Drain { instance: id }]
            );
            let seen = d.observed.last().unwrap();
            assert_eq!((seen.instance, seen.draining), (id, true));
            assert!(c.load(id).unwrap().draining);
        }
        // The draining overlay: the instance's own load does not say so yet.
        assert!(c.observe(&mut d, busy(1)));
        assert!(d.observed.last().unwrap().draining);
        assert!(c.load(1).unwrap().draining);
        d.observed.clear();
        d.scaling = ScalingDecision::ScaleUp(1);
        assert_eq!(
            c.scaling_round(&mut d),
            [ScalingAction::CancelDrain { instance: 1 }]
        );
        assert_eq!(d.observed.len(), 1);
        assert_eq!((d.observed[0].instance, d.observed[0].draining), (1, false));
        assert_eq!((c.phase(1), c.phase(2)), (Some(Serving), Some(Draining)));
        let s = c.stats();
        assert_eq!((s.drains, s.drain_cancels, s.scale_ups), (2, 1, 0));
    }

    #[test]
    fn instance_ids_are_never_reused() {
        let config = ControllerConfig {
            max_instances: 8,
            ..Default::default()
        };
        let (mut c, mut d) = fleet(config, &[(0, Serving, true), (1, Serving, true)]);
        d.scaling = ScalingDecision::ScaleUp(1);
        assert_eq!(
            c.scaling_round(&mut d),
            [ScalingAction::Start { instance: 2 }]
        );
        assert_eq!(c.drainable(2), Some(true));
        c.remove_instance(&mut d, 2);
        assert_eq!(
            c.scaling_round(&mut d),
            [ScalingAction::Start { instance: 3 }]
        );
        assert!(c.add_instance(10, Serving, false));
        assert!(!c.add_instance(10, Serving, true), "known already");
        assert_eq!(c.drainable(10), Some(false));
        assert_eq!(c.allocate_instance_id(), 11);
        for id in c.instance_ids().collect::<Vec<_>>() {
            c.remove_instance(&mut d, id);
        }
        assert!(c.is_empty());
        assert_eq!(c.allocate_instance_id(), 12);
        assert_eq!(
            c.scaling_round(&mut d),
            [ScalingAction::Start { instance: 13 }]
        );
    }

    #[test]
    fn loads_of_removed_and_starting_instances() {
        let (mut c, mut d) = fleet(
            ControllerConfig::default(),
            &[(0, Serving, true), (1, Serving, true)],
        );
        c.remove_instance(&mut d, 1);
        assert!(
            !c.observe(&mut d, busy(1)),
            "a removed instance's late load"
        );
        assert!(!c.observe(&mut d, busy(7)), "an instance never added");
        assert!(d.observed.is_empty());
        assert_eq!(c.load(1), None);
        // A starting instance's load is held back until it serves.
        c.add_instance(2, Starting, true);
        assert!(!c.observe(&mut d, busy(2)));
        assert!(d.observed.is_empty());
        assert_eq!(c.load(2), Some(&busy(2)));
        assert!(c.instance_ready(&mut d, 2));
        assert!(!c.instance_ready(&mut d, 2), "serving already");
        assert_eq!(d.observed, [busy(2)]);
        assert_eq!(
            c.stats().snapshots,
            3,
            "two in the fleet set-up, one at ready"
        );
    }

    /// The native Llumnix policy end to end: priority, dispatch, a
    /// migration round, and scaling down to `min_instances`.
    #[test]
    fn native_llumnix() {
        let config = ControllerConfig {
            min_instances: 2,
            max_instances: 4,
            ..Default::default()
        };
        let mut c = Controller::new(config);
        let mut d = NativeDecide::new(Llumnix::default());
        let load = |instance, used_blocks, running| InstanceLoad {
            instance,
            block_size: 16,
            total_blocks: 100,
            watermark_blocks: 1,
            used_blocks,
            running,
            ..Default::default()
        };
        for id in 0..3 {
            c.add_instance(id, Starting, true);
            c.instance_ready(&mut d, id);
        }
        // 0 is full, 1 nearly empty, 2 half full.
        for l in [load(0, 98, 4), load(1, 2, 1), load(2, 50, 2)] {
            assert!(c.observe(&mut d, l));
        }
        assert_eq!(d.fleet.len(), 3);

        let mut m = RequestMeta {
            requested_priority: 1,
            ..meta(1)
        };
        // The artifact's reserve lives in the load metric: no headroom asked.
        let a = c.prioritize(&mut d, &mut m);
        assert_eq!((m.priority, a.headroom_blocks), (1, 0));
        assert_eq!(
            c.place(&mut d, &meta(2), &BTreeSet::new()),
            Some(1),
            "the freest"
        );
        assert_eq!(d.fleet.get(1).unwrap().waiting, 1, "counted in the view");

        let pairs = c.plan_migrations(&mut d);
        assert_eq!(pairs, [pair(0, 1)]);
        let candidate = |id, priority, arrival_us| MigrationCandidate {
            id,
            priority,
            blocks: 10,
            output_tokens: 5,
            arrival_us,
            ..Default::default()
        };
        let candidates = [
            candidate(100, 0, 1),
            candidate(101, 0, 2),
            candidate(102, 1, 3),
        ];
        let choice = c.choose_migrations(&mut d, pairs[0], &candidates);
        assert_eq!(choice.chosen, [101], "the last-come normal request");
        assert_eq!(
            choice.orders,
            [MigrationOrder {
                migration_id: 1,
                request: 101,
                source: 0,
                destination: 1
            }]
        );
        c.migration_ended(1);

        // An idle fleet shrinks, one drain per round, down to min_instances.
        for id in 0..3 {
            c.observe(&mut d, load(id, 0, 0));
        }
        assert_eq!(
            c.scaling_round(&mut d),
            [
                ScalingAction::Drain { instance: 2 },
                ScalingAction::Stop { instance: 2 }
            ]
        );
        assert_eq!(d.fleet.len(), 2, "the stopped instance left the view");
        assert_eq!(d.policy.decide_scaling(&d.fleet), ScalingDecision::Drain(1));
        assert_eq!(c.scaling_round(&mut d), [], "min_instances holds");
        assert_eq!(c.instance_ids().collect::<Vec<_>>(), [0, 1]);
    }
}
