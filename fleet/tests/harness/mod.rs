//! A deterministic fleet in virtual time, in the manner of quinn's
//! simulated `Pair`: N [`InstanceCore`]s over a seeded network, the
//! client's relay, and (for the drain / scale-up scenarios) the manager's
//! [`Controller`]. Scenarios are data ([`Scenario`]) and all go through one
//! function, [`run`], which checks the fleet's invariants after every
//! scenario (see [`run`]).
//!
//! # Time
//!
//! Virtual microseconds. An engine step takes [`STEP_US`] whatever the
//! backend measured: the candle backend reports wall-clock time, so the
//! `ends_us` of [`Turn::Stepping`] is ignored and the harness ends every
//! step at `now + STEP_US` (this keeps runs bit-for-bit reproducible).
//! Inputs queued while a step is in flight are applied at the turn after
//! its end, as in the server.
//!
//! # Network
//!
//! A transmit from instance `a` to `Transmit::peer` is encoded, decoded
//! (the wire format is exercised too) and delivered after
//! `base_us + per_block_us × KV blocks carried + jitter` (jitter seeded),
//! FIFO per (migration, direction). Faults: drop the n-th message of a kind,
//! delay the n-th message of a kind, cut a link (its in-flight messages are
//! lost and both sides get `LinkLost` for the migrations open on it, as the
//! server's transport reports a broken stream; later sends over it fail the
//! same way), kill an instance (loudly: its peers get `LinkLost`; or
//! silently, [`Action::Vanish`]: nobody is told, timeouts must resolve it).
//!
//! # The client's relay
//!
//! Per request: the tokens by index (an index seen twice must carry the
//! same token, and is delivered once), one end (`Finished` / `Failed`), and
//! the instances holding a copy (`Assign`, `MovedIn` add one; `MovedOut`,
//! `MoveInRevoked`, `Stranded`, the end and the death of an instance remove
//! one). A request left with no copy and no end is placed again, resumed
//! from the tokens the client has seen (`Assign` with `generated`), on the
//! lowest-id live serving instance (or where the controller places it). When
//! the client's stream ends (first end, or a scenario's cancel), every
//! other copy is cancelled (`Input::Cancel`), as the server's llumlets reap
//! a closed stream; a copy that moves in after that is cancelled as well.
//! An `Assign` refused as `Failed(Invalid)` by an instance where the relay
//! counts a second copy (one moved in just before) is not an end: the
//! request is served there. Like the controller, the relay never orders a
//! `MigrateOut` for a request whose previous migration has not ended
//! ([`Action::MigrateOutFrom`] does, to reach the core's corner cases).
//!
//! # Determinism
//!
//! Everything is seeded and iterated in id order; the loads the controller
//! sees carry the virtual step latency. `FLEET_TRACE=1` prints a run's
//! trace (the last [`LOG_LINES`] lines).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, OnceLock};

use llumen_engine::candle::CandleBackend;
use llumen_engine::{
    AbortReason, MigrationConfig, MigrationId, MigrationMessage, MigrationResult, ModelBackend,
    RefuseReason, Request, SamplingParams, SeqEvent, SplitMix64, TokenId,
};
use llumen_fleet::{
    Assign, Controller, ControllerConfig, CoreConfig, CoreEvent, Decide, FailKind, Input,
    InstanceCore, InstancePhase, MigrationReport, NativeDecide, ScalingAction, Transmit, Turn,
};
use llumen_policy_logic::{
    InstanceId, InstanceLoad, Llumnix, MigrationCandidate, MigrationPair, PriorityAssignment,
    RequestId, RequestMeta, ScalingDecision,
};

/// The engine's own test model: the tiny random Llama with the same
/// weights everywhere (so KV moves between instances), its block size and
/// its seeded prompts (ids < 4096): `engine(num_blocks)`, `prompt(seed,
/// len)`, `BLOCK`.
#[path = "../../../engine/tests/common/mod.rs"]
mod engine_common;
pub use engine_common::{engine, prompt, BLOCK};
/// Virtual duration of every engine step.
pub const STEP_US: u64 = 1_000;
/// Manually ordered migrations get ids from here (the controller's start
/// at 1).
pub const MANUAL_MIGRATION_IDS: MigrationId = 1_000;
/// A run that has not settled by then is stuck.
const MAX_VIRTUAL_US: u64 = 20_000_000;
/// Passes at one instant before the run is declared livelocked.
const MAX_PASSES_PER_INSTANT: usize = 5_000;
/// Trace lines kept for a failure report.
const LOG_LINES: usize = 300;

pub type Core = InstanceCore<CandleBackend>;

// ---------------------------------------------------------------------------
// Engines, prompts, reference outputs
// ---------------------------------------------------------------------------

/// The greedy output of `prompt` decoded alone on a fresh engine (cached
/// per process: scenarios share it).
pub fn reference(prompt: &[TokenId], max_tokens: u32) -> Vec<TokenId> {
    type Cache = Mutex<HashMap<(Vec<TokenId>, u32), Vec<TokenId>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (prompt.to_vec(), max_tokens);
    if let Some(out) = cache.lock().unwrap().get(&key) {
        return out.clone();
    }
    let blocks = (prompt.len() + max_tokens as usize).div_ceil(BLOCK) + 2;
    let mut e = engine(blocks);
    e.add(
        Request {
            id: 1,
            prompt: prompt.to_vec(),
            sampling: SamplingParams::greedy(max_tokens),
            priority: 0,
            headroom_blocks: 0,
            arrival_us: 0,
        },
        0,
    )
    .expect("reference request");
    let mut out = Vec::new();
    let mut now = 0;
    while !e.scheduler().is_idle() {
        let r = e.step(now).expect("reference step");
        now += STEP_US;
        for ev in r.events {
            if let SeqEvent::Token { token, index, .. } = ev {
                assert_eq!(index as usize, out.len(), "reference indices");
                out.push(token);
            }
        }
    }
    assert_eq!(out.len(), max_tokens as usize, "reference length");
    cache.lock().unwrap().insert(key, out.clone());
    out
}

/// The migration protocol's knobs for the scenarios: small timeouts in
/// virtual µs (a round trip is well under 2 ms), one block for the last
/// stage so that short prompts still get pre-copy stages.
pub fn migration_config() -> MigrationConfig {
    MigrationConfig {
        max_incoming: 1,
        last_stage_max_blocks: 1,
        max_precopy_stages: 3,
        reserve_slack_blocks: 1,
        source_reply_timeout_us: 5_000,
        destination_idle_timeout_us: 10_000,
        min_transfer_bytes_per_s: 50_000_000,
        committed_memory_us: 50_000,
    }
}

// ---------------------------------------------------------------------------
// Scenarios as data
// ---------------------------------------------------------------------------

/// A request of a scenario; its id is its index + 1, its prompt seeded by
/// the scenario's seed and its id.
#[derive(Clone, Debug)]
pub struct Req {
    pub prompt: usize,
    pub max_tokens: u32,
    /// Instance it is first assigned to.
    pub on: u32,
    /// When it arrives.
    pub at_us: u64,
    /// Handed over already resumed: the first `resume_from` tokens of its
    /// reference output come as `Assign::generated` (and the client counts
    /// them as seen).
    pub resume_from: usize,
}

/// A fresh request of `prompt` tokens and `max_tokens` outputs on `on`, at 0.
pub fn req(prompt: usize, max_tokens: u32, on: u32) -> Req {
    Req {
        prompt,
        max_tokens,
        on,
        at_us: 0,
        resume_from: 0,
    }
}

impl Req {
    pub fn at(mut self, us: u64) -> Self {
        self.at_us = us;
        self
    }
    pub fn resumed(mut self, generated: usize) -> Self {
        self.resume_from = generated;
        self
    }
}

/// When an action fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// At this virtual time (µs).
    At(u64),
    /// Once the client has seen this many tokens of the request.
    Tokens(u64, usize),
    /// Right after the n-th (1-based) message of this kind was sent.
    Sent(&'static str, usize),
    /// Right after the n-th message of this kind was delivered.
    Delivered(&'static str, usize),
}

/// What a scenario does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Migrate the request from where it lives now (its lowest-id copy)
    /// to `to`. Skipped, as the controller does, while a migration of the
    /// request is in flight (ordered and not ended).
    MigrateOut { request: u64, to: u32 },
    /// Migrate the request's copy on `from` to `to`, whatever else is in
    /// flight (counted with the `MigrateOut`s for [`Check::Migration`]).
    MigrateOutFrom { request: u64, from: u32, to: u32 },
    /// Drop the n-th message of this kind (counted from the start).
    Drop { kind: &'static str, nth: usize },
    /// Delay the n-th message of this kind (and, FIFO, what follows it on
    /// its migration's direction).
    Delay {
        kind: &'static str,
        nth: usize,
        by_us: u64,
    },
    /// Cut the link between two instances for good.
    Cut { a: u32, b: u32 },
    /// Kill an instance; its peers hear of it (`LinkLost`).
    Kill { instance: u32 },
    /// Kill an instance silently: nobody is told.
    Vanish { instance: u32 },
    /// The client cancels the request.
    Cancel { request: u64 },
    /// Drain the instance: the controller's next scaling round drains it
    /// (with a controller), else `SetDraining(true)` by hand.
    Drain { instance: u32 },
    /// The controller's next scaling round scales up by n.
    ScaleUp(u32),
}

/// How a migration ended, as a scenario expects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    /// The destination refused (`requeued`: the request had been detached).
    Refused(RefuseReason, bool),
    /// The source gave up (`requeued` as above).
    Aborted(AbortReason, bool),
    NotStarted,
}

impl Outcome {
    pub fn of(report: &MigrationReport) -> Outcome {
        match report {
            MigrationReport::NotStarted(_) => Outcome::NotStarted,
            MigrationReport::Ended(o) => match o.result {
                MigrationResult::Committed => Outcome::Committed,
                MigrationResult::Refused { reason, requeued } => Outcome::Refused(reason, requeued),
                MigrationResult::Aborted { reason, requeued } => Outcome::Aborted(reason, requeued),
            },
        }
    }
}

/// How a request ended for its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Finished (on this instance, if given).
    Finished(Option<u32>),
    /// Cancelled by the scenario.
    Cancelled,
    /// Failed.
    Failed,
}

/// Counters a scenario can check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Migrations that committed.
    Committed,
    /// Migrations that ended without committing (refused, aborted, not
    /// started).
    NotCommitted,
    /// `MoveInRevoked` events.
    Revoked,
    /// Requests placed again by the relay.
    Resumed,
    /// `Stranded` events.
    Stranded,
    /// `Preempted` events.
    Preempted,
    /// `MovedIn` events.
    MovedIn,
    /// Messages dropped by faults, cuts or deaths.
    Dropped,
    /// `LinkLost` inputs given.
    LinkLost,
    /// Controller: drains, cancelled drains, stops, started instances.
    Drains,
    DrainCancels,
    Stops,
    Starts,
}

/// An expected outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// How the request ends (default for every request not named:
    /// `Finished(None)`, or `Cancelled` when the scenario cancels it).
    End(u64, End),
    /// How the n-th `MigrateOut` action (1-based, in the table's order)
    /// ended.
    Migration(usize, Outcome),
    Count(Counter, usize),
    AtLeast(Counter, usize),
    /// The controller stopped this instance.
    Stopped(u32),
    /// This instance is alive at the end, and serving (not draining).
    Serving(u32),
    /// The first token event of the request carried this index.
    FirstIndex(u64, u32),
}

/// The network's delays.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    pub base_us: u64,
    pub per_block_us: u64,
    /// Uniform in `0..=jitter_us`, seeded.
    pub jitter_us: u64,
}

impl Default for Net {
    fn default() -> Self {
        Self {
            base_us: 200,
            per_block_us: 100,
            jitter_us: 100,
        }
    }
}

/// A controller over the fleet (drain / scale-up scenarios): its rounds
/// (migration then scaling) every `round_us`; the migration decisions are
/// the native Llumnix policy's, the scaling decisions the scenario's
/// ([`Action::Drain`], [`Action::ScaleUp`]; `Hold` otherwise).
#[derive(Clone, Copy, Debug)]
pub struct Managed {
    pub config: ControllerConfig,
    pub round_us: u64,
    /// KV blocks of an instance a scale-up starts.
    pub new_instance_blocks: usize,
    /// How long a started instance takes to serve.
    pub startup_us: u64,
}

impl Default for Managed {
    fn default() -> Self {
        Self {
            config: ControllerConfig {
                max_migrations_per_instance: 1,
                min_instances: 1,
                max_instances: 8,
                migrate: true,
                ..ControllerConfig::default()
            },
            round_us: 4_000,
            new_instance_blocks: 24,
            startup_us: 5_000,
        }
    }
}

/// One scenario: a fleet, its requests, a table of timed actions and the
/// expected outcomes.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    /// Seeds the prompts and the network's jitter.
    pub seed: u64,
    /// KV blocks of each instance (instance ids 0..).
    pub blocks: Vec<usize>,
    pub requests: Vec<Req>,
    pub actions: Vec<(When, Action)>,
    pub expect: Vec<Check>,
    pub managed: Option<Managed>,
    pub net: Net,
    pub migration: MigrationConfig,
    /// Every action must fire (scripted scenarios); random ones may have
    /// actions that never come due.
    pub strict_actions: bool,
    /// A second end of a request (from another copy) is tolerated (the
    /// client keeps the first; counted in [`Stats::extra_ends`]). Only for
    /// scenarios with an undetected failure ([`Action::Vanish`]): the relay
    /// places the dead instance's requests again while a destination it was
    /// committing to keeps its copy, never told.
    pub allow_duplicate_ends: bool,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: String::new(),
            seed: 1,
            blocks: vec![32, 32],
            requests: Vec::new(),
            actions: Vec::new(),
            expect: Vec::new(),
            managed: None,
            net: Net::default(),
            migration: migration_config(),
            strict_actions: true,
            allow_duplicate_ends: false,
        }
    }
}

// ---------------------------------------------------------------------------
// What a run reports
// ---------------------------------------------------------------------------

/// Counts of a run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub committed: usize,
    pub not_committed: usize,
    pub revoked: usize,
    pub resumed: usize,
    pub stranded: usize,
    pub preempted: usize,
    pub moved_in: usize,
    pub moved_out: usize,
    pub dropped: usize,
    pub link_lost: usize,
    pub sent: usize,
    pub steps: u64,
    pub turns: u64,
    pub drains: usize,
    pub drain_cancels: usize,
    pub stops: usize,
    pub starts: usize,
    /// End events beyond the first for a request (the client keeps the first).
    pub extra_ends: usize,
}

impl Stats {
    /// Adds another run's counts.
    pub fn add(&mut self, o: &Stats) {
        self.committed += o.committed;
        self.not_committed += o.not_committed;
        self.revoked += o.revoked;
        self.resumed += o.resumed;
        self.stranded += o.stranded;
        self.preempted += o.preempted;
        self.moved_in += o.moved_in;
        self.moved_out += o.moved_out;
        self.dropped += o.dropped;
        self.link_lost += o.link_lost;
        self.sent += o.sent;
        self.steps += o.steps;
        self.turns += o.turns;
        self.drains += o.drains;
        self.drain_cancels += o.drain_cancels;
        self.stops += o.stops;
        self.starts += o.starts;
        self.extra_ends += o.extra_ends;
    }

    fn get(&self, c: Counter) -> usize {
        match c {
            Counter::Committed => self.committed,
            Counter::NotCommitted => self.not_committed,
            Counter::Revoked => self.revoked,
            Counter::Resumed => self.resumed,
            Counter::Stranded => self.stranded,
            Counter::Preempted => self.preempted,
            Counter::MovedIn => self.moved_in,
            Counter::Dropped => self.dropped,
            Counter::LinkLost => self.link_lost,
            Counter::Drains => self.drains,
            Counter::DrainCancels => self.drain_cancels,
            Counter::Stops => self.stops,
            Counter::Starts => self.starts,
        }
    }
}

/// What [`run`] found (it has already panicked if anything was wrong).
#[derive(Debug)]
pub struct Report {
    pub name: String,
    pub stats: Stats,
    /// Per request: how it ended for the client.
    pub ends: BTreeMap<u64, End>,
    /// Per migration id: the manual action's number (if manual) and its
    /// outcomes (exactly one unless its source died).
    pub migrations: BTreeMap<MigrationId, (Option<usize>, Vec<Outcome>)>,
    pub end_us: u64,
    pub violations: Vec<String>,
    pub log: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "scenario {:?}: ended at {} µs", self.name, self.end_us)?;
        writeln!(f, "  stats: {:?}", self.stats)?;
        writeln!(f, "  ends: {:?}", self.ends)?;
        writeln!(f, "  migrations: {:?}", self.migrations)?;
        for v in &self.violations {
            writeln!(f, "  VIOLATION: {v}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The controller's decisions: Llumnix's migrations, scripted scaling
// ---------------------------------------------------------------------------

/// [`Decide`] with the native Llumnix policy for placement and migrations,
/// and scaling decisions queued by the scenario (one per round, `Hold`
/// otherwise).
pub struct Scripted {
    pub inner: NativeDecide<Llumnix>,
    pub scaling: VecDeque<ScalingDecision>,
}

impl Decide for Scripted {
    fn observe(&mut self, load: InstanceLoad) {
        self.inner.observe(load)
    }
    fn remove_instance(&mut self, instance: InstanceId) {
        self.inner.remove_instance(instance)
    }
    fn assign_priority(&mut self, request: &RequestMeta) -> PriorityAssignment {
        self.inner.assign_priority(request)
    }
    fn dispatch(&mut self, request: &RequestMeta) -> Option<InstanceId> {
        self.inner.dispatch(request)
    }
    fn plan_migration(&mut self) -> Vec<MigrationPair> {
        self.inner.plan_migration()
    }
    fn choose_migrations(
        &mut self,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Vec<RequestId> {
        self.inner.choose_migrations(pair, candidates)
    }
    fn decide_scaling(&mut self) -> ScalingDecision {
        self.scaling.pop_front().unwrap_or(ScalingDecision::Hold)
    }
}

// ---------------------------------------------------------------------------
// The simulation
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeState {
    /// Take a turn now.
    Ready,
    /// A step is in flight until then.
    Busy(u64),
    /// Idle or stalled: a turn on an input or a due timeout.
    Waiting,
    /// A failed step: try again then.
    Retry(u64),
}

struct Node {
    core: Core,
    state: NodeState,
    draining: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gone {
    Killed { loud: bool },
    Stopped,
}

struct InFlight {
    at: u64,
    seq: u64,
    from: u32,
    to: u32,
    migration_id: MigrationId,
    kind: &'static str,
    bytes: Vec<u8>,
}

struct Mig {
    /// The manual action's number.
    n: Option<usize>,
    request: u64,
    source: u32,
    destination: u32,
    ends: Vec<Outcome>,
    /// Sides already told `LinkLost`.
    lost: BTreeSet<u32>,
}

struct Client {
    prompt: Vec<TokenId>,
    max_tokens: u32,
    arrival_us: u64,
    reference: Vec<TokenId>,
    /// Tokens the client has seen, by index.
    tokens: Vec<TokenId>,
    /// Instances holding a copy, and how many copies the relay thinks each
    /// holds (an instance can briefly hold a revoked copy and a re-placed
    /// one).
    holders: BTreeMap<u32, u32>,
    /// The end the client saw, and where.
    end: Option<(End, u32)>,
    /// Every end event: (instance, what).
    end_events: Vec<(u32, &'static str)>,
    cancelled: bool,
    /// Next token index expected from each copy.
    next_index: BTreeMap<u32, u32>,
    first_index: Option<u32>,
}

impl Client {
    fn open(&self) -> bool {
        self.end.is_none() && !self.cancelled
    }
    fn hold(&mut self, i: u32) {
        *self.holders.entry(i).or_default() += 1;
    }
    /// One copy on `i` is gone.
    fn unhold(&mut self, i: u32) {
        if let Some(n) = self.holders.get_mut(&i) {
            *n -= 1;
            if *n == 0 {
                self.holders.remove(&i);
                self.next_index.remove(&i);
            }
        }
    }
    /// Every copy on `i` is gone.
    fn unhold_all(&mut self, i: u32) -> bool {
        self.next_index.remove(&i);
        self.holders.remove(&i).is_some()
    }
}

struct Sim<'s> {
    s: &'s Scenario,
    now: u64,
    rng: SplitMix64,
    nodes: BTreeMap<u32, Node>,
    gone: BTreeMap<u32, Gone>,
    queue: Vec<InFlight>,
    next_seq: u64,
    fifo: HashMap<(MigrationId, bool), u64>,
    sent: HashMap<&'static str, usize>,
    delivered: HashMap<&'static str, usize>,
    drops: BTreeSet<(&'static str, usize)>,
    delays: BTreeMap<(&'static str, usize), u64>,
    cuts: BTreeSet<(u32, u32)>,
    migs: BTreeMap<MigrationId, Mig>,
    /// The n-th MigrateOut action's migration id.
    manual_ids: BTreeMap<usize, MigrationId>,
    clients: BTreeMap<u64, Client>,
    fired: Vec<bool>,
    controller: Option<(Controller, Scripted)>,
    next_round: u64,
    pending_ready: Vec<(u64, u32)>,
    per_block_bytes: usize,
    stats: Stats,
    violations: Vec<String>,
    log: VecDeque<String>,
}

fn link(a: u32, b: u32) -> (u32, u32) {
    (a.min(b), a.max(b))
}

impl<'s> Sim<'s> {
    fn new(s: &'s Scenario) -> Self {
        let mut nodes = BTreeMap::new();
        for (i, &blocks) in s.blocks.iter().enumerate() {
            nodes.insert(i as u32, Self::node(i as u32, blocks, s));
        }
        let per_block_bytes = nodes
            .values()
            .next()
            .map_or(1, |n: &Node| n.core.engine().backend().kv_bytes_per_block());
        let mut clients = BTreeMap::new();
        for (i, r) in s.requests.iter().enumerate() {
            let id = i as u64 + 1;
            let p = prompt(s.seed.wrapping_mul(1_000).wrapping_add(id), r.prompt);
            let reference = reference(&p, r.max_tokens);
            clients.insert(
                id,
                Client {
                    prompt: p,
                    max_tokens: r.max_tokens,
                    arrival_us: r.at_us,
                    reference,
                    tokens: Vec::new(),
                    holders: BTreeMap::new(),
                    end: None,
                    end_events: Vec::new(),
                    cancelled: false,
                    next_index: BTreeMap::new(),
                    first_index: None,
                },
            );
        }
        let mut manual_ids = BTreeMap::new();
        let mut n = 0;
        for (_, a) in &s.actions {
            if is_migrate(a) {
                n += 1;
                manual_ids.insert(n, MANUAL_MIGRATION_IDS + n as MigrationId);
            }
        }
        let controller = s.managed.map(|m| {
            let mut c = Controller::new(m.config);
            for &id in nodes.keys() {
                c.add_instance(id, InstancePhase::Serving, true);
            }
            let decide = Scripted {
                inner: NativeDecide::new(Llumnix::default()),
                scaling: VecDeque::new(),
            };
            (c, decide)
        });
        Sim {
            s,
            now: 0,
            rng: SplitMix64(s.seed ^ 0x05EE_D0F4_E700),
            nodes,
            gone: BTreeMap::new(),
            queue: Vec::new(),
            next_seq: 0,
            fifo: HashMap::new(),
            sent: HashMap::new(),
            delivered: HashMap::new(),
            drops: BTreeSet::new(),
            delays: BTreeMap::new(),
            cuts: BTreeSet::new(),
            migs: BTreeMap::new(),
            manual_ids,
            clients,
            fired: vec![false; s.actions.len()],
            controller,
            next_round: 0,
            pending_ready: Vec::new(),
            per_block_bytes,
            stats: Stats::default(),
            violations: Vec::new(),
            log: VecDeque::new(),
        }
    }

    fn node(id: u32, blocks: usize, s: &Scenario) -> Node {
        Node {
            core: InstanceCore::new(
                id,
                engine(blocks),
                CoreConfig {
                    migration: s.migration.clone(),
                    min_publish_gap_us: 5_000,
                    idle_publish_us: None,
                },
            ),
            // A first turn at once: an idle instance publishes its load
            // then (nothing is published before a turn).
            state: NodeState::Ready,
            draining: false,
        }
    }

    fn trace(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(format!("[{:>8}] {line}", self.now));
    }

    fn violation(&mut self, v: String) {
        self.trace(format!("VIOLATION {v}"));
        self.violations.push(format!("t={}µs: {v}", self.now));
    }

    fn input(&mut self, id: u32, input: Input) {
        match self.nodes.get_mut(&id) {
            Some(n) => n.core.input(input),
            None => self.trace(format!("input to gone instance {id} dropped: {input:?}")),
        }
    }

    // ----- the run -----

    fn run(&mut self) {
        // Arrivals at 0 before anything else.
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        let mut arrivals: Vec<(u64, u64)> = ids
            .iter()
            .map(|&id| (self.s.requests[id as usize - 1].at_us, id))
            .collect();
        arrivals.sort();
        let mut arrivals: VecDeque<(u64, u64)> = arrivals.into();
        loop {
            while arrivals.front().is_some_and(|a| a.0 <= self.now) {
                let (_, id) = arrivals.pop_front().unwrap();
                self.arrive(id);
            }
            self.settle();
            if self.now > MAX_VIRTUAL_US {
                self.violation("virtual time ran out: the fleet never settled".into());
                return;
            }
            let next = [self.next_time(), arrivals.front().map(|a| a.0)]
                .into_iter()
                .flatten()
                .min();
            match next {
                None => return,
                Some(t) if t <= self.now => {
                    self.violation(format!("stuck: something is due at {t} but nothing moves"));
                    return;
                }
                Some(t) => self.now = t,
            }
        }
    }

    /// Everything due at `now`, until nothing moves.
    fn settle(&mut self) {
        for pass in 0.. {
            if pass > MAX_PASSES_PER_INSTANT {
                self.violation("livelock: too many passes at one instant".into());
                return;
            }
            // Actions fire between every phase, so that a trigger (a token
            // seen, a message sent or delivered) acts before the instance
            // concerned takes its next turn.
            let mut progress = self.fire_actions();
            progress |= self.deliver_due();
            progress |= self.fire_actions();
            let ids: Vec<u32> = self.nodes.keys().copied().collect();
            for &id in &ids {
                let Some(n) = self.nodes.get_mut(&id) else {
                    continue;
                };
                if let NodeState::Busy(end) = n.state {
                    if end <= self.now {
                        n.core.end_step(self.now);
                        n.state = NodeState::Ready;
                        self.stats.steps += 1;
                        self.pump(id);
                        progress = true;
                    }
                }
            }
            progress |= self.fire_actions();
            for &id in &ids {
                let now = self.now;
                let Some(n) = self.nodes.get_mut(&id) else {
                    continue;
                };
                let due = match n.state {
                    NodeState::Busy(_) => false,
                    NodeState::Ready => true,
                    NodeState::Waiting => {
                        n.core.has_input() || n.core.poll_timeout().is_some_and(|t| t <= now)
                    }
                    NodeState::Retry(t) => t <= now || n.core.has_input(),
                };
                if !due {
                    continue;
                }
                let turn = n.core.turn(now);
                n.state = match turn {
                    Turn::Stepping { .. } => NodeState::Busy(now + STEP_US),
                    Turn::Idle | Turn::Stalled => NodeState::Waiting,
                    Turn::Failed => NodeState::Retry(now + STEP_US),
                };
                self.stats.turns += 1;
                self.pump(id);
                self.fire_actions();
                if turn == Turn::Failed {
                    self.violation(format!("instance {id}: an engine step failed"));
                }
                progress = true;
            }
            progress |= self.controller_round();
            if !progress {
                return;
            }
        }
    }

    fn next_time(&self) -> Option<u64> {
        let mut t: Vec<u64> = Vec::new();
        for (i, (w, _)) in self.s.actions.iter().enumerate() {
            if let (When::At(at), false) = (w, self.fired[i]) {
                t.push(*at);
            }
        }
        t.extend(self.queue.iter().map(|m| m.at));
        for n in self.nodes.values() {
            match n.state {
                NodeState::Busy(e) => t.push(e),
                NodeState::Ready => t.push(self.now),
                NodeState::Retry(r) => t.push(r),
                NodeState::Waiting => t.extend(n.core.poll_timeout()),
            }
        }
        t.extend(self.pending_ready.iter().map(|p| p.0));
        if self.controller.is_some() && self.rounds_needed() {
            t.push(self.next_round);
        }
        t.into_iter().min()
    }

    // ----- actions -----

    fn fire_actions(&mut self) -> bool {
        let mut progress = false;
        for i in 0..self.s.actions.len() {
            if self.fired[i] {
                continue;
            }
            let (when, action) = self.s.actions[i].clone();
            let due = match when {
                When::At(t) => t <= self.now,
                When::Tokens(r, n) => self.clients.get(&r).is_some_and(|c| c.tokens.len() >= n),
                When::Sent(kind, n) => self.sent.get(kind).copied().unwrap_or(0) >= n,
                When::Delivered(kind, n) => self.delivered.get(kind).copied().unwrap_or(0) >= n,
            };
            if due {
                self.fired[i] = true;
                self.trace(format!("action #{i} ({when:?}): {action:?}"));
                self.act(i, action);
                progress = true;
            }
        }
        progress
    }

    fn act(&mut self, index: usize, action: Action) {
        match action {
            Action::MigrateOut { request, .. } | Action::MigrateOutFrom { request, .. } => {
                let n = self.s.actions[..=index]
                    .iter()
                    .filter(|(_, a)| is_migrate(a))
                    .count();
                let (from, to) = match action {
                    Action::MigrateOutFrom { from, to, .. } => (Some(from), to),
                    Action::MigrateOut { to, .. } => (
                        self.clients.get(&request).and_then(|c| {
                            if c.open() {
                                c.holders.keys().next().copied()
                            } else {
                                None
                            }
                        }),
                        to,
                    ),
                    _ => unreachable!(),
                };
                let busy = matches!(action, Action::MigrateOut { .. })
                    && self.migs.values().any(|m| {
                        m.request == request
                            && m.ends.is_empty()
                            && !matches!(self.gone.get(&m.source), Some(Gone::Killed { .. }))
                    });
                if busy {
                    if self.s.strict_actions {
                        self.violation(format!(
                            "MigrateOut #{n}: request {request} is already migrating"
                        ));
                    }
                    self.trace(format!(
                        "MigrateOut #{n} skipped: request {request} is migrating"
                    ));
                    return;
                }
                let Some(from) = from else {
                    if self.s.strict_actions {
                        self.violation(format!(
                            "MigrateOut #{n}: request {request} is not live anywhere"
                        ));
                    }
                    self.trace(format!(
                        "MigrateOut #{n} skipped: request {request} is not live"
                    ));
                    return;
                };
                let migration_id = self.manual_ids[&n];
                self.migrate(Some(n), migration_id, request, from, to);
            }
            Action::Drop { kind, nth } => {
                self.drops.insert((kind, nth));
            }
            Action::Delay { kind, nth, by_us } => {
                self.delays.insert((kind, nth), by_us);
            }
            Action::Cut { a, b } => self.cut(a, b),
            Action::Kill { instance } => self.kill(instance, true),
            Action::Vanish { instance } => self.kill(instance, false),
            Action::Cancel { request } => self.cancel(request),
            Action::Drain { instance } => match self.controller.as_mut() {
                Some((_, d)) => d.scaling.push_back(ScalingDecision::Drain(instance)),
                None => {
                    if let Some(n) = self.nodes.get_mut(&instance) {
                        n.draining = true;
                    }
                    self.input(instance, Input::SetDraining(true));
                }
            },
            Action::ScaleUp(k) => match self.controller.as_mut() {
                Some((_, d)) => d.scaling.push_back(ScalingDecision::ScaleUp(k)),
                None => self.violation("ScaleUp needs a controller".into()),
            },
        }
    }

    fn migrate(
        &mut self,
        n: Option<usize>,
        migration_id: MigrationId,
        request: u64,
        source: u32,
        destination: u32,
    ) {
        self.trace(format!(
            "migrate m{migration_id}: request {request} {source} -> {destination}"
        ));
        self.migs.insert(
            migration_id,
            Mig {
                n,
                request,
                source,
                destination,
                ends: Vec::new(),
                lost: BTreeSet::new(),
            },
        );
        self.input(
            source,
            Input::MigrateOut {
                migration_id,
                request,
                peer: destination,
            },
        );
    }

    fn arrive(&mut self, id: u64) {
        let mut r = self.s.requests[id as usize - 1].clone();
        if !self.nodes.contains_key(&r.on) {
            // Its instance is gone: the relay places it on a live one.
            match self.pick(id) {
                Some(t) => r.on = t,
                None => {
                    self.violation(format!("request {id}: no instance to place it on"));
                    return;
                }
            }
        }
        let c = self.clients.get_mut(&id).unwrap();
        let generated = c.reference[..r.resume_from].to_vec();
        c.tokens = generated.clone();
        c.hold(r.on);
        c.next_index.insert(r.on, r.resume_from as u32);
        let assign = Assign {
            request: id,
            prompt: c.prompt.clone(),
            generated,
            sampling: SamplingParams::greedy(c.max_tokens),
            priority: 0,
            headroom_blocks: 0,
            arrival_us: self.now,
        };
        self.trace(format!(
            "assign request {id} to {} (resume from {})",
            r.on, r.resume_from
        ));
        self.input(r.on, Input::Assign(Box::new(assign)));
    }

    /// The client stops waiting: every copy is cancelled.
    fn cancel(&mut self, request: u64) {
        let Some(c) = self.clients.get_mut(&request) else {
            return;
        };
        if !c.open() {
            self.trace(format!("cancel of request {request}: already ended"));
            return;
        }
        c.cancelled = true;
        let holders: Vec<u32> = std::mem::take(&mut c.holders).into_keys().collect();
        c.next_index.clear();
        for h in holders {
            self.input(h, Input::Cancel { request });
        }
    }

    // ----- the network -----

    fn send(&mut self, from: u32, t: Transmit) {
        let kind = t.message.kind();
        let nth = {
            let c = self.sent.entry(kind).or_default();
            *c += 1;
            *c
        };
        self.stats.sent += 1;
        let bytes = t.message.encode();
        match MigrationMessage::decode(&bytes) {
            Ok(m) if m == t.message => {}
            other => self.violation(format!("{kind} does not survive the wire: {other:?}")),
        }
        let (to, mid) = (t.peer, t.migration_id);
        self.trace(format!("send {from}->{to} m{mid} {kind}#{nth}"));
        if self.drops.remove(&(kind, nth)) {
            self.trace(format!("  dropped (fault) {kind}#{nth}"));
            self.stats.dropped += 1;
            return;
        }
        if self.cuts.contains(&link(from, to)) {
            self.trace("  link is cut: dropped, stream broken".into());
            self.stats.dropped += 1;
            self.lost(mid, from);
            self.lost(mid, to);
            return;
        }
        match self.gone.get(&to) {
            Some(Gone::Killed { loud: true }) | Some(Gone::Stopped) => {
                self.trace(format!("  instance {to} is gone: the stream fails"));
                self.stats.dropped += 1;
                self.lost(mid, from);
                return;
            }
            Some(Gone::Killed { loud: false }) => {
                self.trace(format!("  instance {to} vanished: dropped"));
                self.stats.dropped += 1;
                return;
            }
            None => {}
        }
        if !self.nodes.contains_key(&to) {
            self.violation(format!("message to unknown instance {to}"));
            return;
        }
        let blocks = (t.message.kv_bytes() / self.per_block_bytes) as u64;
        let jitter = if self.s.net.jitter_us > 0 {
            self.rng.next_u64() % (self.s.net.jitter_us + 1)
        } else {
            0
        };
        let mut delay = self.s.net.base_us + self.s.net.per_block_us * blocks + jitter;
        if let Some(by) = self.delays.remove(&(kind, nth)) {
            self.trace(format!("  delayed by {by} µs (fault)"));
            delay += by;
        }
        let key = (mid, t.to_source());
        let at = (self.now + delay).max(self.fifo.get(&key).copied().unwrap_or(0));
        self.fifo.insert(key, at);
        self.next_seq += 1;
        self.queue.push(InFlight {
            at,
            seq: self.next_seq,
            from,
            to,
            migration_id: mid,
            kind,
            bytes,
        });
    }

    fn deliver_due(&mut self) -> bool {
        let now = self.now;
        let mut due: Vec<InFlight> = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].at <= now {
                due.push(self.queue.swap_remove(i));
            } else {
                i += 1;
            }
        }
        if due.is_empty() {
            return false;
        }
        due.sort_by_key(|m| (m.at, m.seq));
        for m in due {
            let message = MigrationMessage::decode(&m.bytes).expect("encoded by send");
            *self.delivered.entry(m.kind).or_default() += 1;
            self.trace(format!(
                "deliver {}->{} m{} {}",
                m.from, m.to, m.migration_id, m.kind
            ));
            self.input(
                m.to,
                Input::Message {
                    peer: m.from,
                    message,
                },
            );
        }
        true
    }

    /// Tells `side` that the link of `migration_id` broke (once).
    fn lost(&mut self, migration_id: MigrationId, side: u32) {
        if !self.nodes.contains_key(&side) {
            return;
        }
        if let Some(m) = self.migs.get_mut(&migration_id) {
            if !m.lost.insert(side) {
                return;
            }
        }
        self.stats.link_lost += 1;
        self.trace(format!("LinkLost m{migration_id} -> instance {side}"));
        self.input(side, Input::LinkLost { migration_id });
    }

    /// A migration's stream is open while its source has not ended it or
    /// messages of it are still under way.
    fn open_migrations(
        &self,
        touching: impl Fn(&Mig) -> bool,
        in_flight: &BTreeSet<MigrationId>,
    ) -> Vec<(MigrationId, u32, u32)> {
        self.migs
            .iter()
            .filter(|(id, m)| touching(m) && (m.ends.is_empty() || in_flight.contains(id)))
            .map(|(&id, m)| (id, m.source, m.destination))
            .collect()
    }

    fn cut(&mut self, a: u32, b: u32) {
        self.cuts.insert(link(a, b));
        let mut in_flight = BTreeSet::new();
        let before = self.queue.len();
        self.queue.retain(|m| {
            let on = link(m.from, m.to) == link(a, b);
            if on {
                in_flight.insert(m.migration_id);
            }
            !on
        });
        self.stats.dropped += before - self.queue.len();
        let open =
            self.open_migrations(|m| link(m.source, m.destination) == link(a, b), &in_flight);
        for (id, s, d) in open {
            self.lost(id, s);
            self.lost(id, d);
        }
    }

    fn kill(&mut self, id: u32, loud: bool) {
        let Some(node) = self.nodes.remove(&id) else {
            self.violation(format!("kill of instance {id}, which is not alive"));
            return;
        };
        drop(node);
        self.gone.insert(id, Gone::Killed { loud });
        let mut in_flight = BTreeSet::new();
        let before = self.queue.len();
        self.queue.retain(|m| {
            let on = m.from == id || m.to == id;
            if on {
                in_flight.insert(m.migration_id);
            }
            !on
        });
        self.stats.dropped += before - self.queue.len();
        if loud {
            let open = self.open_migrations(|m| m.source == id || m.destination == id, &in_flight);
            for (mid, s, d) in open {
                let other = if s == id { d } else { s };
                self.lost(mid, other);
            }
        }
        if let Some((c, d)) = self.controller.as_mut() {
            c.remove_instance(d, id);
        }
        // The relay: requests that lived there are placed again.
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for r in ids {
            let c = self.clients.get_mut(&r).unwrap();
            if c.unhold_all(id) && c.holders.is_empty() && c.open() {
                self.replace(r, None);
            }
        }
    }

    // ----- the relay -----

    /// Where the relay places a request: where the controller says, else
    /// the lowest-id live instance not draining, else any live one.
    fn pick(&mut self, request: u64) -> Option<u32> {
        let c = &self.clients[&request];
        let meta = RequestMeta {
            id: request,
            prompt_tokens: c.prompt.len() as u32,
            max_tokens: c.max_tokens,
            requested_priority: 0,
            priority: 0,
            prefix_hash: 0,
            arrival_us: c.arrival_us,
        };
        let by_controller = self
            .controller
            .as_mut()
            .and_then(|(ctl, d)| ctl.place(d, &meta, &BTreeSet::new()))
            .filter(|t| self.nodes.contains_key(t));
        let target = by_controller
            .or_else(|| {
                self.nodes
                    .iter()
                    .find(|(_, n)| !n.draining && !n.core.is_draining())
                    .map(|(&id, _)| id)
            })
            .or_else(|| self.nodes.keys().next().copied());
        target
    }

    /// Places a request with no copy again, resumed from what the client saw.
    fn replace(&mut self, request: u64, stranded: Option<&Assign>) {
        let c = &self.clients[&request];
        let mut generated = c.tokens.clone();
        if let Some(a) = stranded {
            if a.generated.len() > generated.len() {
                generated = a.generated.clone();
            }
        }
        let target = self.pick(request);
        let Some(target) = target else {
            self.violation(format!(
                "request {request}: no instance left to place it on"
            ));
            return;
        };
        self.stats.resumed += 1;
        let c = self.clients.get_mut(&request).unwrap();
        c.hold(target);
        c.next_index.insert(target, generated.len() as u32);
        let assign = Assign {
            request,
            prompt: c.prompt.clone(),
            generated: generated.clone(),
            sampling: SamplingParams::greedy(c.max_tokens),
            priority: 0,
            headroom_blocks: 0,
            arrival_us: c.arrival_us,
        };
        self.trace(format!(
            "relay: request {request} placed again on {target}, resumed after {} tokens",
            generated.len()
        ));
        self.input(target, Input::Assign(Box::new(assign)));
    }

    /// The client's stream ended: every other copy is cancelled.
    fn close_others(&mut self, request: u64) {
        let c = self.clients.get_mut(&request).unwrap();
        let others: Vec<u32> = std::mem::take(&mut c.holders).into_keys().collect();
        c.next_index.clear();
        for h in others {
            self.trace(format!(
                "relay: request {request} ended, cancel its copy on {h}"
            ));
            self.input(h, Input::Cancel { request });
        }
    }

    fn pump(&mut self, id: u32) {
        loop {
            let Some(n) = self.nodes.get_mut(&id) else {
                return;
            };
            let mut transmits = Vec::new();
            while let Some(t) = n.core.poll_transmit() {
                transmits.push(t);
            }
            let mut events = Vec::new();
            while let Some(e) = n.core.poll_event() {
                events.push(e);
            }
            if transmits.is_empty() && events.is_empty() {
                return;
            }
            for t in transmits {
                self.send(id, t);
            }
            for e in events {
                self.on_event(id, e);
            }
        }
    }

    fn on_event(&mut self, from: u32, event: CoreEvent) {
        if !matches!(event, CoreEvent::Token { .. } | CoreEvent::Published(_)) {
            self.trace(format!("event from {from}: {}", short(&event)));
        }
        match event {
            CoreEvent::Token {
                request,
                index,
                token,
            } => {
                let Some(c) = self.clients.get_mut(&request) else {
                    self.violation(format!("token for unknown request {request}"));
                    return;
                };
                let mut bad = Vec::new();
                if c.reference.get(index as usize) != Some(&token) {
                    bad.push(format!(
                        "request {request}: token #{index} = {token} from instance {from}, the request decoded alone gives {:?}",
                        c.reference.get(index as usize)
                    ));
                }
                match c.next_index.get(&from) {
                    Some(&next) if next != index => bad.push(format!(
                        "request {request}: its copy on {from} emitted index {index}, expected {next}"
                    )),
                    _ => {}
                }
                c.next_index.insert(from, index + 1);
                c.first_index.get_or_insert(index);
                if c.open() {
                    let i = index as usize;
                    if i < c.tokens.len() {
                        if c.tokens[i] != token {
                            bad.push(format!(
                                "request {request}: index {index} seen twice with different tokens ({} then {token})",
                                c.tokens[i]
                            ));
                        }
                    } else if i == c.tokens.len() {
                        c.tokens.push(token);
                    } else {
                        bad.push(format!(
                            "request {request}: gap, index {index} after {} tokens",
                            c.tokens.len()
                        ));
                    }
                }
                for b in bad {
                    self.violation(b);
                }
            }
            CoreEvent::Finished {
                request,
                output_tokens,
                ..
            } => self.on_end(
                from,
                request,
                End::Finished(Some(from)),
                Some(output_tokens),
            ),
            CoreEvent::Failed {
                request,
                kind: FailKind::Invalid,
                ..
            } if self
                .clients
                .get(&request)
                .is_some_and(|c| c.holders.get(&from).is_some_and(|&n| n >= 2)) =>
            {
                // An Assign refused because the request is already there
                // (a copy moved in just before): it is served there; one
                // copy, not an end.
                self.trace(format!(
                    "relay: request {request} already on {from}, Assign refused"
                ));
                self.clients.get_mut(&request).unwrap().unhold(from);
            }
            CoreEvent::Failed { request, .. } => self.on_end(from, request, End::Failed, None),
            CoreEvent::Stranded(assign) => {
                self.stats.stranded += 1;
                let request = assign.request;
                let Some(c) = self.clients.get_mut(&request) else {
                    return;
                };
                c.unhold(from);
                let consistent = assign
                    .generated
                    .iter()
                    .zip(&c.reference)
                    .all(|(a, b)| a == b);
                let place = c.open() && c.holders.is_empty();
                if !consistent {
                    self.violation(format!(
                        "request {request}: stranded with outputs that differ from its reference"
                    ));
                }
                if place {
                    self.replace(request, Some(&assign));
                }
            }
            CoreEvent::Preempted { .. } => self.stats.preempted += 1,
            CoreEvent::MovedOut { request, .. } => {
                self.stats.moved_out += 1;
                let Some(c) = self.clients.get_mut(&request) else {
                    return;
                };
                c.unhold(from);
                if c.open() && c.holders.is_empty() {
                    self.replace(request, None);
                }
            }
            CoreEvent::MovedIn { request, .. } => {
                self.stats.moved_in += 1;
                let Some(c) = self.clients.get_mut(&request) else {
                    self.violation(format!("MovedIn of unknown request {request}"));
                    return;
                };
                if c.open() {
                    c.hold(from);
                    // Where the moved copy resumes is not known here: it
                    // is usually the client's next index, but a stale
                    // commit (its source gave up meanwhile) is behind. Its
                    // indices must be contiguous from its first token on.
                    c.next_index.remove(&from);
                } else {
                    // Nobody waits for it any more.
                    self.trace(format!(
                        "relay: request {request} moved in to {from} after its end: cancel"
                    ));
                    self.input(from, Input::Cancel { request });
                }
            }
            CoreEvent::MoveInRevoked { request } => {
                self.stats.revoked += 1;
                let Some(c) = self.clients.get_mut(&request) else {
                    return;
                };
                c.unhold(from);
                if c.open() && c.holders.is_empty() {
                    self.replace(request, None);
                }
            }
            CoreEvent::MigrationEnded {
                migration_id,
                request,
                peer,
                report,
            } => {
                let outcome = Outcome::of(&report);
                if report.committed() {
                    self.stats.committed += 1;
                } else {
                    self.stats.not_committed += 1;
                }
                match self.migs.get_mut(&migration_id) {
                    Some(m) => {
                        if m.source != from || m.request != request || m.destination != peer {
                            self.violation(format!("MigrationEnded m{migration_id} from {from} (request {request}, peer {peer}) does not match its order"));
                        }
                        self.migs.get_mut(&migration_id).unwrap().ends.push(outcome);
                    }
                    None => self.violation(format!("MigrationEnded for unknown m{migration_id}")),
                }
                if let Some((c, _)) = self.controller.as_mut() {
                    c.migration_ended(migration_id);
                }
            }
            CoreEvent::Published(mut load) => {
                if let Some((c, d)) = self.controller.as_mut() {
                    // The candle backend measures wall-clock step latency:
                    // the policies see the virtual one.
                    load.step_latency_us = STEP_US as u32;
                    c.observe(d, load);
                }
            }
            CoreEvent::StepFailed { message } => {
                self.violation(format!("instance {from}: step failed: {message}"))
            }
        }
    }

    fn on_end(&mut self, from: u32, request: u64, end: End, output_tokens: Option<u32>) {
        let Some(c) = self.clients.get_mut(&request) else {
            self.violation(format!("end of unknown request {request}"));
            return;
        };
        let what = match end {
            End::Finished(_) => "Finished",
            End::Failed => "Failed",
            End::Cancelled => "Cancelled",
        };
        c.end_events.push((from, what));
        c.unhold_all(from);
        if c.cancelled {
            return;
        }
        if c.end.is_some() {
            self.stats.extra_ends += 1;
            let first = c.end;
            let line = format!("request {request} ended twice: {what} on {from} after {first:?}");
            if self.s.allow_duplicate_ends {
                self.trace(format!("tolerated: {line}"));
            } else {
                self.violation(line);
            }
            return;
        }
        c.end = Some((end, from));
        let mut bad = Vec::new();
        if let Some(n) = output_tokens {
            if n != c.max_tokens || c.tokens.len() != c.max_tokens as usize {
                bad.push(format!(
                    "request {request} finished on {from} with output_tokens {n}, client saw {} of {}",
                    c.tokens.len(),
                    c.max_tokens
                ));
            }
        }
        for b in bad {
            self.violation(b);
        }
        self.close_others(request);
    }

    // ----- the controller -----

    fn rounds_needed(&self) -> bool {
        let Some((c, d)) = self.controller.as_ref() else {
            return false;
        };
        self.clients.values().any(|c| c.open())
            || c.count(InstancePhase::Draining) > 0
            || c.count(InstancePhase::Starting) > 0
            || !d.scaling.is_empty()
            || !self.pending_ready.is_empty()
    }

    fn controller_round(&mut self) -> bool {
        let mut progress = false;
        // Started instances that are ready now.
        let now = self.now;
        let ready: Vec<u32> = self
            .pending_ready
            .iter()
            .filter(|p| p.0 <= now)
            .map(|p| p.1)
            .collect();
        self.pending_ready.retain(|p| p.0 > now);
        for id in ready {
            if let Some((c, d)) = self.controller.as_mut() {
                c.instance_ready(d, id);
            }
            self.trace(format!("controller: instance {id} ready"));
            progress = true;
        }
        if self.controller.is_none() || now < self.next_round || !self.rounds_needed() {
            return progress;
        }
        self.next_round = now + self.s.managed.unwrap().round_us;
        // The migration round.
        let pairs = {
            let (c, d) = self.controller.as_mut().unwrap();
            c.plan_migrations(d)
        };
        for pair in pairs {
            let Some(src) = self.nodes.get(&pair.source) else {
                continue;
            };
            let candidates = src.core.migration_candidates();
            let choice = {
                let (c, d) = self.controller.as_mut().unwrap();
                c.choose_migrations(d, pair, &candidates)
            };
            for o in choice.orders {
                self.migrate(None, o.migration_id, o.request, o.source, o.destination);
            }
        }
        // The scaling round.
        let actions = {
            let (c, d) = self.controller.as_mut().unwrap();
            c.scaling_round(d)
        };
        for a in actions {
            self.trace(format!("controller: {a}"));
            match a {
                ScalingAction::Start { instance } => {
                    self.stats.starts += 1;
                    let blocks = self.s.managed.unwrap().new_instance_blocks;
                    self.nodes
                        .insert(instance, Self::node(instance, blocks, self.s));
                    self.pending_ready
                        .push((now + self.s.managed.unwrap().startup_us, instance));
                }
                ScalingAction::Drain { instance } => {
                    self.stats.drains += 1;
                    if let Some(n) = self.nodes.get_mut(&instance) {
                        n.draining = true;
                    }
                    self.input(instance, Input::SetDraining(true));
                }
                ScalingAction::CancelDrain { instance } => {
                    self.stats.drain_cancels += 1;
                    if let Some(n) = self.nodes.get_mut(&instance) {
                        n.draining = false;
                    }
                    self.input(instance, Input::SetDraining(false));
                }
                ScalingAction::Stop { instance } => {
                    self.stats.stops += 1;
                    match self.nodes.remove(&instance) {
                        Some(n) => {
                            let leftovers = leftovers(&n);
                            if !leftovers.is_empty() {
                                self.violation(format!(
                                    "instance {instance} stopped while not empty: {}",
                                    leftovers.join(", ")
                                ));
                            }
                        }
                        None => self.violation(format!("stop of gone instance {instance}")),
                    }
                    self.gone.insert(instance, Gone::Stopped);
                }
            }
        }
        true
    }

    // ----- the end -----

    fn finish(mut self) -> Report {
        // Nothing lost, nothing duplicated.
        let expected_end = |r: u64| {
            self.s.expect.iter().find_map(|c| match c {
                Check::End(q, e) if *q == r => Some(*e),
                _ => None,
            })
        };
        let mut ends = BTreeMap::new();
        let mut bad = Vec::new();
        for (&r, c) in &self.clients {
            let got = if c.cancelled {
                End::Cancelled
            } else {
                match c.end {
                    Some((e, _)) => e,
                    None => {
                        bad.push(format!(
                            "request {r} never ended (client saw {} of {} tokens; holders {:?})",
                            c.tokens.len(),
                            c.max_tokens,
                            c.holders
                        ));
                        continue;
                    }
                }
            };
            ends.insert(r, got);
            if let End::Finished(_) = got {
                if c.tokens != c.reference {
                    bad.push(format!(
                        "request {r}: output differs from the request decoded alone:\n  got  {:?}\n  want {:?}",
                        c.tokens, c.reference
                    ));
                }
            }
            if !c.holders.is_empty() {
                bad.push(format!(
                    "request {r}: still held by {:?} at the end",
                    c.holders
                ));
            }
            let scenario_cancels = self
                .s
                .actions
                .iter()
                .any(|(_, a)| *a == Action::Cancel { request: r });
            let want = expected_end(r);
            let ok = match (want, got) {
                (Some(End::Finished(None)), End::Finished(_)) => true,
                (Some(w), g) => w == g,
                // A request the scenario cancels may finish first.
                (None, End::Cancelled | End::Finished(_)) if scenario_cancels => true,
                (None, g) => matches!(g, End::Finished(_)),
            };
            if !ok {
                bad.push(format!("request {r}: ended {got:?}, expected {want:?}"));
            }
        }
        // Nothing leaked on the survivors.
        for (&id, n) in &self.nodes {
            for l in leftovers(n) {
                bad.push(format!("instance {id}: {l}"));
            }
        }
        if !self.queue.is_empty() {
            bad.push(format!("{} messages still under way", self.queue.len()));
        }
        // Every MigrateOut answered by exactly one MigrationEnded.
        let mut migrations = BTreeMap::new();
        for (&id, m) in &self.migs {
            let source_killed = matches!(self.gone.get(&m.source), Some(Gone::Killed { .. }));
            let ok = if source_killed {
                m.ends.len() <= 1
            } else {
                m.ends.len() == 1
            };
            if !ok {
                bad.push(format!(
                    "migration m{id} (request {} {} -> {}) ended {} times: {:?}",
                    m.request,
                    m.source,
                    m.destination,
                    m.ends.len(),
                    m.ends
                ));
            }
            migrations.insert(id, (m.n, m.ends.clone()));
        }
        if self.s.strict_actions {
            for (i, f) in self.fired.iter().enumerate() {
                if !f {
                    bad.push(format!("action #{i} {:?} never fired", self.s.actions[i]));
                }
            }
        }
        // The scenario's own expectations.
        for check in &self.s.expect {
            match check {
                Check::End(..) => {}
                Check::Migration(n, want) => {
                    let got = self
                        .manual_ids
                        .get(n)
                        .and_then(|id| self.migs.get(id))
                        .map(|m| m.ends.clone());
                    if got.as_deref() != Some(&[*want][..]) {
                        bad.push(format!("migration #{n}: ended {got:?}, expected {want:?}"));
                    }
                }
                Check::Count(c, k) => {
                    if self.stats.get(*c) != *k {
                        bad.push(format!("{c:?} = {}, expected {k}", self.stats.get(*c)));
                    }
                }
                Check::AtLeast(c, k) => {
                    if self.stats.get(*c) < *k {
                        bad.push(format!(
                            "{c:?} = {}, expected at least {k}",
                            self.stats.get(*c)
                        ));
                    }
                }
                Check::Stopped(i) => {
                    if self.gone.get(i) != Some(&Gone::Stopped) {
                        bad.push(format!(
                            "instance {i} was not stopped ({:?})",
                            self.gone.get(i)
                        ));
                    }
                }
                Check::Serving(i) => match self.nodes.get(i) {
                    Some(n) if !n.core.is_draining() && !n.draining => {}
                    Some(_) => bad.push(format!("instance {i} is still draining")),
                    None => bad.push(format!("instance {i} is gone ({:?})", self.gone.get(i))),
                },
                Check::FirstIndex(r, k) => {
                    let got = self.clients.get(r).and_then(|c| c.first_index);
                    if got != Some(*k) {
                        bad.push(format!(
                            "request {r}: first token index {got:?}, expected {k}"
                        ));
                    }
                }
            }
        }
        for b in bad {
            self.violation(b);
        }
        Report {
            name: self.s.name.clone(),
            stats: self.stats,
            ends,
            migrations,
            end_us: self.now,
            violations: self.violations,
            log: self.log.into_iter().collect(),
        }
    }
}

/// What an instance still holds that it should not at the end.
fn leftovers(n: &Node) -> Vec<String> {
    let core = &n.core;
    let s = core.engine().scheduler();
    let bm = s.block_manager();
    let mut l = Vec::new();
    if bm.free_blocks() != bm.total_blocks() {
        l.push(format!(
            "{} of {} blocks not free (used {}, reserved {})",
            bm.total_blocks() - bm.free_blocks(),
            bm.total_blocks(),
            bm.used_blocks(),
            bm.reserved_blocks()
        ));
    }
    if bm.reserved_blocks() != 0 {
        l.push(format!("{} blocks reserved", bm.reserved_blocks()));
    }
    if s.num_sequences() != 0 {
        l.push(format!(
            "{} sequences left (running {:?}, waiting {:?})",
            s.num_sequences(),
            s.running_ids(),
            s.waiting_ids()
        ));
    }
    let live: Vec<u64> = core.live_requests().collect();
    if !live.is_empty() {
        l.push(format!("requests still live: {live:?}"));
    }
    if core.num_outgoing() != 0 {
        l.push(format!("{} outgoing migrations", core.num_outgoing()));
    }
    if core.num_incoming() != 0 {
        l.push(format!("{} incoming migrations", core.num_incoming()));
    }
    if s.migrating_in() != 0 || s.migrating_out() != 0 {
        l.push(format!(
            "migrating_in {} / migrating_out {}",
            s.migrating_in(),
            s.migrating_out()
        ));
    }
    if core.has_input() || core.is_stepping() {
        l.push("inputs or a step pending".into());
    }
    if let Err(e) = s.check_invariants() {
        l.push(format!("scheduler invariants: {e}"));
    }
    l
}

fn is_migrate(a: &Action) -> bool {
    matches!(a, Action::MigrateOut { .. } | Action::MigrateOutFrom { .. })
}

fn short(e: &CoreEvent) -> String {
    match e {
        CoreEvent::Stranded(a) => format!(
            "Stranded(request {}, {} generated)",
            a.request,
            a.generated.len()
        ),
        CoreEvent::MigrationEnded {
            migration_id,
            request,
            peer,
            report,
        } => format!(
            "MigrationEnded m{migration_id} request {request} peer {peer}: {:?}",
            Outcome::of(report)
        ),
        other => format!("{other:?}"),
    }
}

/// Runs a scenario and checks, whatever the scenario:
///
/// - nothing lost: every request ended exactly once for its client
///   (`Finished` unless the scenario expects otherwise, or cancelled by the
///   scenario), and no request is still held anywhere;
/// - nothing duplicated: no index delivered twice with different tokens, no
///   gap, every copy's indices contiguous from where it started, no request
///   ended twice, no request live on two instances at the end;
/// - every token equal to the request decoded alone on a fresh engine
///   (greedy), and every finished output equal to it in full, migrations and
///   resumes included;
/// - no leak on any surviving instance: every block free, no reservation,
///   no sequence, no live request, no migration in or out, scheduler
///   invariants;
/// - every `MigrateOut` answered by exactly one `MigrationEnded` (at most
///   one if its source was killed);
/// - the network is empty, every scripted action fired, and the
///   scenario's own [`Check`]s hold.
///
/// Panics with the violations and the tail of the trace; returns the report.
pub fn run(s: &Scenario) -> Report {
    let mut sim = Sim::new(s);
    sim.run();
    let report = sim.finish();
    if std::env::var_os("FLEET_TRACE").is_some() {
        eprintln!(
            "--- trace of {:?} ---\n{}",
            report.name,
            report.log.join("\n")
        );
    }
    if !report.violations.is_empty() {
        let tail = report
            .log
            .iter()
            .rev()
            .take(120)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        panic!("{report}\n--- trace (last lines) ---\n{tail}");
    }
    report
}

/// Like [`run`] but returns the report instead of panicking (for scenarios
/// documenting a known failure).
pub fn run_unchecked(s: &Scenario) -> Report {
    let mut sim = Sim::new(s);
    sim.run();
    sim.finish()
}

// ---------------------------------------------------------------------------
// Random scenarios
// ---------------------------------------------------------------------------

const KINDS: [&str; 8] = [
    "Reserve",
    "Reserved",
    "Refused",
    "Blocks",
    "Ack",
    "Commit",
    "Committed",
    "Abort",
];

/// A random scenario from `seed`: 2–4 instances, 2–6 requests, random
/// migrations (some to the instance itself), drops, delays, perhaps a cut,
/// a cancel, and at most one kill (loud or silent). Every instance can hold
/// any request, so a killed instance's requests always find a home.
pub fn random_scenario(seed: u64) -> Scenario {
    let mut rng = SplitMix64(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x0123_4567);
    let mut r = |n: u64| rng.next_u64() % n;
    let instances = 2 + r(3) as u32;
    let blocks: Vec<usize> = (0..instances).map(|_| 8 + r(17) as usize).collect();
    let n_req = 2 + r(5);
    let requests: Vec<Req> = (0..n_req)
        .map(|_| {
            let mut q = req(
                10 + r(51) as usize,
                6 + r(19) as u32,
                r(u64::from(instances)) as u32,
            )
            .at(r(6) * 1_000);
            if r(6) == 0 {
                q = q.resumed(1 + r(4) as usize);
            }
            q
        })
        .collect();
    let mut actions = Vec::new();
    for _ in 0..1 + r(5) {
        let request = 1 + r(n_req);
        let q = &requests[request as usize - 1];
        let when = if r(3) > 0 {
            let n = q.resume_from + 1 + r(u64::from(q.max_tokens) - 1) as usize;
            When::Tokens(request, n.min(q.max_tokens as usize - 1))
        } else {
            When::At(r(25) * 1_000)
        };
        // Mostly away from where it started; now and then to itself.
        let to = if r(8) == 0 {
            q.on
        } else {
            (q.on + 1 + r(u64::from(instances) - 1) as u32) % instances
        };
        actions.push((when, Action::MigrateOut { request, to }));
    }
    for _ in 0..r(3) {
        // Never an `Abort`: it is what resolves a commit its source gave up
        // on (a lost `Committed`, a `Commit` later than the source's
        // timeout); losing it while the stream goes on is outside the
        // protocol's assumptions (see the `stale_commit_and_lost_abort`
        // scenario).
        let kind = KINDS[r(7) as usize];
        actions.push((
            When::At(0),
            Action::Drop {
                kind,
                nth: 1 + r(3) as usize,
            },
        ));
    }
    for _ in 0..r(3) {
        let kind = KINDS[r(8) as usize];
        actions.push((
            When::At(0),
            Action::Delay {
                kind,
                nth: 1 + r(3) as usize,
                by_us: 1_000 + r(8) * 1_000,
            },
        ));
    }
    if r(4) == 0 {
        let a = r(u64::from(instances)) as u32;
        let b = (a + 1 + r(u64::from(instances) - 1) as u32) % instances;
        actions.push((When::At(r(20) * 1_000), Action::Cut { a, b }));
    }
    if r(3) == 0 {
        actions.push((
            When::At(r(20) * 1_000),
            Action::Cancel {
                request: 1 + r(n_req),
            },
        ));
    }
    let mut vanish = false;
    if r(2) == 0 {
        let instance = r(u64::from(instances)) as u32;
        let at = When::At(2_000 + r(25) * 1_000);
        vanish = r(2) == 0;
        actions.push(if vanish {
            (at, Action::Vanish { instance })
        } else {
            (at, Action::Kill { instance })
        });
    }
    Scenario {
        name: format!("random seed {seed}"),
        seed,
        blocks,
        requests,
        actions,
        strict_actions: false,
        allow_duplicate_ends: vanish,
        ..Scenario::default()
    }
}
