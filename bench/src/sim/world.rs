//! The simulation proper: a virtual clock, an event queue, the network
//! delay model between instances, fleet samples and the records of a run.
//! The instances' turns and the manager's decisions are not here: each
//! instance is the fleet core's [`InstanceCore`] and the manager's rounds
//! are its [`Controller`], the very code the server runs.
//!
//! **Owns**: the event loop (a [`BinaryHeap`] keyed by (virtual time,
//! insertion number), so equal times resolve in a fixed order), when each
//! core takes a turn and when its step ends (`now + the step's modelled
//! duration`), the migration transport between instances (messages
//! delayed by `bytes / bandwidth + latency`, in order per migration and
//! direction), the periodic rounds and samples, and the records.
//! **Never touches**: the wall clock for decisions (only to time the run),
//! threads, sockets, files; an instance's turn or a decision rule (those
//! are the fleet core's).
//!
//! Where the simulator's driving differs from the server's llumlet and
//! manager (everything else is the same code):
//! - A step's effects land at its modelled end; what arrives meanwhile
//!   waits in the core's inputs, as a llumlet reads commands only between
//!   steps.
//! - No heartbeat snapshots (`idle_publish_us: None`): an idle instance
//!   publishes when its load changes.
//! - The migration round reads a stepping source's candidates at the end of
//!   its step and its orders land once the next step has begun, as the
//!   manager's round does through a llumlet's channel (the round's pairs
//!   are not asked one after the other as the manager's are).
//! - Migration messages are passed as values, not encoded bytes. The
//!   latency backend keeps no KV here (`headers_only`), so a message's KV
//!   payload is one header per block; its transfer time counts the
//!   profile's full `kv_bytes_per_block`.
//! - A request enters the engine with its workload arrival time as
//!   `arrival_us` (the llumlet stamps its own receipt time; dispatch is
//!   instantaneous here).
//! - A scale-up instance exists (and costs) from the decision and serves
//!   after the start-up delay; the manager's in-process instances start at
//!   once.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use llumen_engine::latency_model::migration_time_us;
use llumen_engine::{
    Engine, LatencyModelBackend, MigrationId, MigrationMessage as Message, MigrationResult,
    SamplingParams,
};
use llumen_fleet::{
    Assign, Controller, ControllerConfig, CoreConfig, CoreEvent, FailKind, Input, InstanceCore,
    InstancePhase as Phase, MigrationReport, ScalingAction, Turn,
};
use llumen_host::policy::{PolicyRuntime, RuntimeDecide};
use llumen_policy_logic::RequestMeta;

use super::{policies, MigrationCadence, SimConfig, SimOutcome, SimStats};
use crate::record::{FleetRecord, FleetSample, RequestRecord, RequestSpec};

/// The token every simulated prompt is made of (the latency backend reads
/// only lengths).
const PROMPT_TOKEN: u32 = 100;

#[derive(Debug)]
enum EventKind {
    /// The next request of the workload arrives.
    Arrival,
    /// An instance's step ends.
    StepEnd(u32),
    /// A migration message from `from` reaches instance `to`.
    Deliver {
        to: u32,
        from: u32,
        message: Box<Message>,
    },
    /// A started instance is ready to serve.
    Ready(u32),
    /// An instance's next deadline (`InstanceCore::poll_timeout`).
    Timer(u32),
    /// The periodic migration round ([`MigrationCadence::Period`]).
    MigrationRound,
    /// A migration round the snapshot cadence made due
    /// ([`MigrationCadence::Snapshots`]; not rescheduled).
    CadenceRound,
    ScalingRound,
    Sample,
}

impl EventKind {
    /// Events that are work in progress (as opposed to the periodic rounds,
    /// samples and timers, which go on forever).
    fn is_work(&self) -> bool {
        matches!(
            self,
            EventKind::Arrival
                | EventKind::StepEnd(_)
                | EventKind::Deliver { .. }
                | EventKind::Ready(_)
        )
    }
}

struct Event {
    at: u64,
    seq: u64,
    kind: EventKind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    /// Reversed: the heap pops the earliest (time, then insertion order).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Node {
    core: InstanceCore<LatencyModelBackend>,
    created_us: u64,
    /// Stopped by the scaling round.
    removed: bool,
    /// When the pending `Timer` event fires, if one is pending.
    timer_at: Option<u64>,
    /// Migration pairs whose candidates this instance owes the round: the
    /// manager asks a llumlet for them through its channel, answered between
    /// two steps (so at this step's end), and the orders it then sends
    /// arrive while the next step runs.
    owed_candidates: Vec<llumen_policy_logic::MigrationPair>,
}

#[derive(Clone, Debug, Default)]
struct ReqState {
    first_token_us: Option<u64>,
    finish_us: Option<u64>,
    output_tokens: u32,
    preemptions: u32,
    preemption_loss_us: u64,
    /// Evicted (preempted, or requeued by a failed migration) at this time
    /// and not yet back where it was.
    evicted_at: Option<u64>,
    migrations: u32,
    error: Option<String>,
    done: bool,
}

/// One SplitMix64 step from state `x`: the first output of
/// `SplitMix64::new(x)`.
fn mix(x: u64) -> u64 {
    llumen_engine::mix64(x.wrapping_add(0x9E37_79B9_7F4A_7C15))
}

/// Calls into the policies the active version did not answer.
#[derive(Default)]
struct Failures {
    count: u64,
    first: Option<String>,
}

/// Runs `$body` with `$d` a [`RuntimeDecide`] over the world's runtime
/// whose failures are added to the world's count (the borrow of the
/// runtime and of the controller stay disjoint).
macro_rules! with_decide {
    ($world:ident, $d:ident, $body:expr) => {{
        let mut $d = RuntimeDecide::new(&$world.runtime);
        let out = $body;
        $world.failures.count += $d.failures;
        if $world.failures.first.is_none() {
            $world.failures.first = $d.first_failure.take();
        }
        out
    }};
}

pub struct World<'a> {
    cfg: &'a SimConfig,
    workload: &'a [RequestSpec],
    /// Workload indices in arrival order.
    order: Vec<u32>,
    next_arrival: usize,
    runtime: PolicyRuntime,
    controller: Controller,
    failures: Failures,
    now: u64,
    queue: BinaryHeap<Event>,
    next_event: u64,
    /// Work events in the queue (see [`EventKind::is_work`]).
    work_events: u64,
    nodes: Vec<Node>,
    reqs: Vec<ReqState>,
    done: usize,
    /// Steps in flight.
    busy: usize,
    /// Delivery time of the last message per (migration, towards the source).
    fifo: HashMap<(MigrationId, bool), u64>,
    /// When the destination committed a migration (until the source ends it).
    committed_at: HashMap<MigrationId, u64>,
    /// A step failure to stop the run with.
    step_failure: Option<String>,
    /// A [`EventKind::CadenceRound`] is queued.
    cadence_round_queued: bool,
    bandwidth: f64,
    kv_bytes_per_block: u64,
    instance_us: u128,
    samples: Vec<FleetSample>,
    stats: SimStats,
}

impl<'a> World<'a> {
    pub fn new(cfg: &'a SimConfig, workload: &'a [RequestSpec]) -> Result<Self> {
        if cfg.instances == 0 {
            bail!("the simulation needs at least one instance");
        }
        if let Some(s) = &cfg.scaling {
            if s.min_instances == 0 || s.min_instances > s.max_instances {
                bail!(
                    "scaling bounds {}..={} are not a range of at least one instance",
                    s.min_instances,
                    s.max_instances
                );
            }
            if s.period_us == 0 {
                bail!("the scaling period must be positive");
            }
        }
        if cfg.migration && cfg.migration_period_us == 0 {
            bail!("the migration period must be positive");
        }
        if cfg.sample_period_us == 0 {
            bail!("the sample period must be positive");
        }
        if workload.len() > u32::MAX as usize {
            bail!("workload too large");
        }
        cfg.scheduler
            .validate()
            .map_err(|e| anyhow!("scheduler configuration: {e}"))?;
        if cfg.scheduler.block_size != cfg.profile.block_size() {
            bail!(
                "the scheduler's block size {} differs from the profile's {}",
                cfg.scheduler.block_size,
                cfg.profile.block_size()
            );
        }
        let bandwidth = match cfg
            .migration_bandwidth_bytes_per_s
            .or(cfg.profile.data().migration_bandwidth_bytes_per_s)
        {
            Some(b) if b.is_finite() && b > 0.0 => b,
            Some(b) => bail!("migration bandwidth {b} B/s is not positive"),
            None if cfg.migration => {
                bail!("the profile has no migration bandwidth: set one, or run without migration")
            }
            None => f64::INFINITY,
        };
        let mut order: Vec<u32> = (0..workload.len() as u32).collect();
        order.sort_by_key(|&i| (workload[i as usize].arrival_us, i));
        let runtime = policies::build_runtime(&cfg.policies)?;
        let (min_instances, max_instances) = match &cfg.scaling {
            Some(s) => (s.min_instances, s.max_instances),
            None => (cfg.instances, cfg.instances),
        };
        let controller = Controller::new(ControllerConfig {
            max_migrations_per_instance: cfg.max_migrations_per_instance,
            min_instances,
            max_instances,
            migrate: cfg.migration,
            migration_cadence: cfg.migration_cadence,
            // The server's admission rule: what an instance's scheduler takes.
            max_total_tokens: Some(
                u32::try_from(cfg.scheduler.max_total_tokens()).unwrap_or(u32::MAX),
            ),
            ..ControllerConfig::default()
        });
        Ok(Self {
            cfg,
            workload,
            order,
            next_arrival: 0,
            runtime,
            controller,
            failures: Failures::default(),
            now: 0,
            queue: BinaryHeap::new(),
            next_event: 0,
            work_events: 0,
            nodes: Vec::new(),
            reqs: vec![ReqState::default(); workload.len()],
            done: 0,
            busy: 0,
            fifo: HashMap::new(),
            committed_at: HashMap::new(),
            step_failure: None,
            cadence_round_queued: false,
            bandwidth,
            kv_bytes_per_block: cfg.profile.kv_bytes_per_block() as u64,
            instance_us: 0,
            samples: Vec::new(),
            stats: SimStats::default(),
        })
    }

    fn push(&mut self, at: u64, kind: EventKind) {
        if kind.is_work() {
            self.work_events += 1;
        }
        self.queue.push(Event {
            at,
            seq: self.next_event,
            kind,
        });
        self.next_event += 1;
    }

    fn finished(&self) -> bool {
        self.done == self.workload.len()
            && self.busy == 0
            && self.controller.migrations_in_flight() == 0
            && self.work_events == 0
            && self.now >= self.cfg.min_run_us
    }

    /// Runs to the end; `setup_seconds` is what building the world took
    /// (compiling the policy components), reported apart.
    pub fn run(mut self, setup_seconds: f64) -> Result<SimOutcome> {
        let wall = Instant::now();
        for id in 0..self.cfg.instances {
            self.add_node(id);
            self.ready(id)?;
        }
        if let Some(&first) = self.order.first() {
            self.push(self.workload[first as usize].arrival_us, EventKind::Arrival);
        }
        self.push(0, EventKind::Sample);
        if self.cfg.migration && self.cfg.migration_cadence == MigrationCadence::Period {
            self.push(self.cfg.migration_period_us, EventKind::MigrationRound);
        }
        if let Some(s) = &self.cfg.scaling {
            self.push(s.first_check_us + s.period_us, EventKind::ScalingRound);
        }
        while !self.finished() {
            let ev = self
                .queue
                .pop()
                .expect("the sample event is always pending");
            debug_assert!(ev.at >= self.now, "time went backwards");
            self.now = ev.at;
            self.stats.events += 1;
            if ev.kind.is_work() {
                self.work_events -= 1;
            }
            match ev.kind {
                EventKind::Arrival => self.arrival()?,
                EventKind::StepEnd(id) => self.step_end(id)?,
                EventKind::Deliver { to, from, message } => self.deliver(to, from, *message)?,
                EventKind::Ready(id) => self.ready(id)?,
                EventKind::Timer(id) => self.timer(id)?,
                EventKind::MigrationRound => {
                    self.migration_round()?;
                    self.push(
                        self.now + self.cfg.migration_period_us,
                        EventKind::MigrationRound,
                    );
                }
                EventKind::CadenceRound => {
                    self.cadence_round_queued = false;
                    self.migration_round()?;
                }
                EventKind::ScalingRound => {
                    self.scaling_round()?;
                    let period = self.cfg.scaling.as_ref().map_or(1, |s| s.period_us);
                    self.push(self.now + period, EventKind::ScalingRound);
                }
                EventKind::Sample => {
                    self.sample();
                    self.push(self.now + self.cfg.sample_period_us, EventKind::Sample);
                }
            }
            if let Some(e) = self.step_failure.take() {
                bail!("{e}");
            }
            if self.work_events == 0
                && self.controller.migrations_in_flight() == 0
                && self.done < self.workload.len()
            {
                bail!("{}", self.stall_report());
            }
        }
        Ok(self.finish(wall.elapsed().as_secs_f64(), setup_seconds))
    }

    fn stall_report(&self) -> String {
        let stuck: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.core.engine().scheduler().is_idle())
            .map(|(id, n)| {
                let s = n.core.engine().scheduler();
                let bm = s.block_manager();
                format!(
                    "instance {id} ({:?}): {} running, {} waiting, {} free / {} reserved of {} blocks",
                    self.controller.phase(id as u32),
                    s.num_running(),
                    s.num_waiting(),
                    bm.free_blocks(),
                    bm.reserved_blocks(),
                    bm.total_blocks()
                )
            })
            .collect();
        format!(
            "simulation stalled at {} us: {} of {} requests done and nothing can make progress; {}",
            self.now,
            self.done,
            self.workload.len(),
            stuck.join("; ")
        )
    }

    fn finish(mut self, wall_seconds: f64, setup_seconds: f64) -> SimOutcome {
        let end = self.now;
        for node in &self.nodes {
            if !node.removed {
                self.instance_us += u128::from(end - node.created_us);
            }
            let s = node.core.engine().scheduler();
            let bm = s.block_manager();
            self.stats.blocks_held_at_end += (bm.total_blocks() - bm.free_blocks()) as u64;
            self.stats.sequences_at_end += s.num_sequences() as u64;
            let cs = node.core.stats();
            self.stats.steps += cs.steps;
            self.stats.stalled_steps += cs.stalled_steps;
            self.stats.migration_messages_refused += cs.messages_refused;
            self.stats.migrations_not_started += cs.migrations_not_started;
        }
        let c = self.controller.stats();
        self.stats.priority_calls = c.priority_calls;
        self.stats.dispatch_calls = c.dispatch_calls;
        self.stats.dispatch_redirects = c.redirects;
        self.stats.migration_plan_calls = c.plan_calls;
        self.stats.migration_choose_calls = c.choose_calls;
        self.stats.migrations_planned = c.migrations_planned;
        self.stats.migrations_started = c.migrations_started;
        self.stats.migrations_skipped = c.migrations_skipped;
        self.stats.scale_ups = c.scale_ups;
        self.stats.drains = c.drains;
        self.stats.removals = c.stops;
        self.stats.snapshots = c.snapshots;
        self.stats.policy_failures = self.failures.count;
        self.stats.first_policy_failure = self.failures.first.take();
        let records = self
            .workload
            .iter()
            .zip(&self.reqs)
            .map(|(spec, r)| RequestRecord {
                id: spec.id,
                high_priority: spec.high_priority,
                arrival_us: spec.arrival_us,
                prompt_tokens: spec.prompt_tokens,
                output_tokens: r.output_tokens,
                first_token_us: r.first_token_us,
                finish_us: r.finish_us,
                preemptions: r.preemptions,
                preemption_loss_us: r.preemption_loss_us,
                migrations: r.migrations,
                error: r.error.clone(),
            })
            .collect();
        let run_seconds = end as f64 / 1e6;
        self.stats.simulated_seconds = run_seconds;
        self.stats.wall_seconds = wall_seconds;
        self.stats.setup_seconds = setup_seconds;
        let ratio = |wall: f64| if wall > 0.0 { run_seconds / wall } else { 0.0 };
        self.stats.speed_x = ratio(wall_seconds);
        self.stats.speed_x_with_setup = ratio(wall_seconds + setup_seconds);
        let fleet = FleetRecord {
            instance_seconds: self.instance_us as f64 / 1e6,
            migrations_committed: self.stats.migrations_committed,
            migrations_aborted: self.stats.migrations_aborted,
            scale_ups: self.stats.scale_ups,
            scale_downs: self.stats.removals,
            samples: std::mem::take(&mut self.samples),
            run_seconds,
            wall_seconds: wall_seconds + setup_seconds,
        };
        SimOutcome {
            records,
            fleet,
            stats: self.stats,
        }
    }

    // ----- instances -----

    /// A new instance `id`, starting (ids are dense: the controller hands
    /// them out in order; a scale-up's instance it knows already).
    fn add_node(&mut self, id: u32) {
        assert_eq!(id as usize, self.nodes.len(), "instance ids are dense");
        let backend = LatencyModelBackend::new(self.cfg.profile.clone()).headers_only();
        let engine = Engine::new(self.cfg.scheduler.clone(), backend)
            .expect("the scheduler configuration was validated");
        let config = CoreConfig {
            migration: self.cfg.migration_protocol.clone(),
            idle_publish_us: None,
            ..CoreConfig::default()
        };
        self.nodes.push(Node {
            core: InstanceCore::new(id, engine, config),
            created_us: self.now,
            removed: false,
            timer_at: None,
            owed_candidates: Vec::new(),
        });
        // A scale-up's instance is known already (then this does nothing).
        self.controller.add_instance(id, Phase::Starting, true);
        let existing = self.nodes.iter().filter(|n| !n.removed).count() as u32;
        self.stats.max_instances = self.stats.max_instances.max(existing);
    }

    /// A started instance serves: its first snapshot goes to the policies
    /// (the llumlet publishes once when its loop starts).
    fn ready(&mut self, id: u32) -> Result<()> {
        if self.controller.phase(id) != Some(Phase::Starting) {
            return Ok(());
        }
        with_decide!(self, d, self.controller.instance_ready(&mut d, id));
        self.nodes[id as usize].core.publish(self.now);
        self.drain_outputs(id)
    }

    /// An input for an instance; an instance without a step in flight
    /// takes a turn at once.
    fn input(&mut self, id: u32, input: Input) -> Result<()> {
        let node = &mut self.nodes[id as usize];
        if node.removed {
            bail!("an input for removed instance {id}: {input:?}");
        }
        node.core.input(input);
        if !node.core.is_stepping() {
            self.turn(id)?;
        }
        Ok(())
    }

    /// A migration message arrives. One for a stopped instance is lost, as
    /// on a network (a stopped instance held no request and no migration).
    fn deliver(&mut self, to: u32, from: u32, message: Message) -> Result<()> {
        self.stats.migration_messages += 1;
        if self.nodes[to as usize].removed {
            return Ok(());
        }
        self.input(
            to,
            Input::Message {
                peer: from,
                message,
            },
        )
    }

    /// One turn of instance `id`; a step it begins ends at its modelled end.
    fn turn(&mut self, id: u32) -> Result<()> {
        let now = self.now;
        let turn = self.nodes[id as usize].core.turn(now);
        if let Turn::Stepping { ends_us } = turn {
            self.busy += 1;
            self.push(ends_us, EventKind::StepEnd(id));
        }
        self.drain_outputs(id)?;
        self.arm_timer(id);
        Ok(())
    }

    fn step_end(&mut self, id: u32) -> Result<()> {
        self.busy -= 1;
        self.nodes[id as usize].core.end_step(self.now);
        self.drain_outputs(id)?;
        // Candidates the round asked for while this step ran: read now, and
        // the orders land after the next turn has begun (as the server's).
        let owed = std::mem::take(&mut self.nodes[id as usize].owed_candidates);
        let candidates: Vec<_> = owed
            .iter()
            .map(|_| self.nodes[id as usize].core.migration_candidates())
            .collect();
        self.turn(id)?;
        for (pair, candidates) in owed.into_iter().zip(candidates) {
            self.choose_migrations(pair, &candidates)?;
        }
        Ok(())
    }

    /// Makes sure a `Timer` event fires at the instance's next deadline.
    fn arm_timer(&mut self, id: u32) {
        let node = &mut self.nodes[id as usize];
        let Some(d) = node.core.poll_timeout() else {
            return;
        };
        if node.timer_at.is_none_or(|t| d < t) {
            node.timer_at = Some(d);
            self.push(d, EventKind::Timer(id));
        }
    }

    fn timer(&mut self, id: u32) -> Result<()> {
        let node = &mut self.nodes[id as usize];
        if node.timer_at != Some(self.now) {
            return Ok(()); // superseded
        }
        node.timer_at = None;
        if node.removed || node.core.is_stepping() {
            // The turn at the step's end runs the timeouts and re-arms.
            return Ok(());
        }
        self.turn(id)
    }

    /// Carries instance `id`'s messages onto the network and its events
    /// into the records and the controller.
    fn drain_outputs(&mut self, id: u32) -> Result<()> {
        while let Some(t) = self.nodes[id as usize].core.poll_transmit() {
            self.send(id, t.peer, t.to_source(), t.message);
        }
        while let Some(event) = self.nodes[id as usize].core.poll_event() {
            self.on_event(id, event)?;
        }
        Ok(())
    }

    fn on_event(&mut self, id: u32, event: CoreEvent) -> Result<()> {
        let now = self.now;
        match event {
            CoreEvent::Token { request, index, .. } => {
                let r = &mut self.reqs[request as usize];
                if index == 0 {
                    r.first_token_us.get_or_insert(now);
                }
                if let Some(at) = r.evicted_at.take() {
                    r.preemption_loss_us += now - at;
                }
            }
            CoreEvent::Finished {
                request,
                output_tokens,
                ..
            } => {
                let r = &mut self.reqs[request as usize];
                if r.done {
                    bail!("request {request} finished twice (again on instance {id})");
                }
                r.finish_us = Some(now);
                r.output_tokens = output_tokens;
                r.done = true;
                self.done += 1;
            }
            CoreEvent::Failed {
                request,
                kind,
                message,
            } => {
                if kind == FailKind::Invalid {
                    self.stats.rejected_requests += 1;
                }
                let r = &mut self.reqs[request as usize];
                r.error = Some(message);
                if !r.done {
                    r.done = true;
                    self.done += 1;
                }
            }
            CoreEvent::Stranded(job) => {
                // Placed again from its history, as the server's relay does.
                self.stats.requests_replaced += 1;
                self.place(*job)?;
            }
            CoreEvent::Preempted { request } => {
                let r = &mut self.reqs[request as usize];
                r.preemptions += 1;
                r.evicted_at.get_or_insert(now);
                self.stats.preemptions += 1;
            }
            CoreEvent::MovedIn { migration_id, .. } => {
                self.committed_at.insert(migration_id, now);
            }
            CoreEvent::MovedOut { .. } | CoreEvent::MoveInRevoked { .. } => {}
            CoreEvent::MigrationEnded {
                migration_id,
                report,
                ..
            } => {
                self.controller.migration_ended(migration_id);
                self.fifo.remove(&(migration_id, false));
                self.fifo.remove(&(migration_id, true));
                let committed_at = self.committed_at.remove(&migration_id);
                if let MigrationReport::Ended(outcome) = *report {
                    self.migration_outcome(&outcome, committed_at);
                }
            }
            CoreEvent::Published(load) => {
                with_decide!(self, d, self.controller.observe(&mut d, load));
                // The artifact's cadence: a round once enough step reports
                // came in (at this instant, after the current event).
                if self.cfg.migration
                    && !self.cadence_round_queued
                    && self.controller.migration_due()
                {
                    self.cadence_round_queued = true;
                    self.push(now, EventKind::CadenceRound);
                }
            }
            CoreEvent::StepFailed { message } => {
                self.step_failure
                    .get_or_insert(format!("instance {id}: engine step at {now} us: {message}"));
            }
        }
        Ok(())
    }

    /// Records what an ended migration did to its request and the fleet.
    fn migration_outcome(
        &mut self,
        outcome: &llumen_engine::MigrationOutcome,
        committed_at: Option<u64>,
    ) {
        let now = self.now;
        let r = &mut self.reqs[outcome.seq as usize];
        match outcome.result {
            MigrationResult::Committed => {
                r.migrations += 1;
                self.stats.migrations_committed += 1;
                // The request's downtime: out of the source's batch at
                // detach, in the destination's at its commit.
                let committed = committed_at.unwrap_or(now);
                let downtime = committed.saturating_sub(outcome.detached_us.unwrap_or(committed));
                self.stats.migration_downtime_us_total += downtime;
                self.stats.migration_downtime_us_max =
                    self.stats.migration_downtime_us_max.max(downtime);
                self.stats.migration_last_stage_blocks_max = self
                    .stats
                    .migration_last_stage_blocks_max
                    .max(outcome.last_stage_blocks().unwrap_or(0));
            }
            MigrationResult::Refused { requeued, .. }
            | MigrationResult::Aborted { requeued, .. } => {
                let why = match outcome.result {
                    MigrationResult::Refused { reason, .. } => format!("refused: {reason:?}"),
                    MigrationResult::Aborted { reason, .. } => format!("aborted: {reason:?}"),
                    MigrationResult::Committed => unreachable!(),
                };
                *self.stats.migration_abort_reasons.entry(why).or_default() += 1;
                self.stats.migrations_aborted += 1;
                if requeued {
                    // Out of the batch since detach and back in the source's
                    // queue, to be recomputed: for the request, a preemption.
                    self.stats.migrations_requeued += 1;
                    r.preemptions += 1;
                    r.evicted_at
                        .get_or_insert(outcome.detached_us.unwrap_or(now));
                }
            }
        }
    }

    /// Sends a migration message: it reaches `to` after the fixed latency
    /// plus its KV at the migration bandwidth, never before an earlier
    /// message of the same migration and direction.
    fn send(&mut self, from: u32, to: u32, to_source: bool, message: Message) {
        let blocks = match &message {
            Message::Blocks { num_blocks, .. } | Message::Commit { num_blocks, .. } => {
                u64::from(*num_blocks)
            }
            _ => 0,
        };
        let transfer = if blocks == 0 {
            0
        } else {
            migration_time_us(blocks * self.kv_bytes_per_block, self.bandwidth)
        };
        let key = (message.migration_id(), to_source);
        let earliest = self.now + self.cfg.migration_message_latency_us + transfer;
        let at = earliest.max(self.fifo.get(&key).copied().unwrap_or(0));
        self.fifo.insert(key, at);
        self.stats.migration_blocks += blocks;
        self.push(
            at,
            EventKind::Deliver {
                to,
                from,
                message: Box::new(message),
            },
        );
    }

    // ----- the controller's rounds -----

    /// Places a request (fresh or resumed) through the controller.
    fn place(&mut self, job: Assign) -> Result<()> {
        let seq = job.request;
        let spec = self.workload[seq as usize];
        let meta = RequestMeta {
            id: seq,
            prompt_tokens: spec.prompt_tokens,
            max_tokens: spec.output_tokens,
            requested_priority: u8::from(spec.high_priority),
            priority: job.priority,
            prefix_hash: mix(seq ^ 0x7072_6566_6978),
            arrival_us: spec.arrival_us,
        };
        let target = with_decide!(
            self,
            d,
            self.controller.place(&mut d, &meta, &BTreeSet::new())
        );
        let Some(target) = target else {
            self.stats.rejected_requests += 1;
            let r = &mut self.reqs[seq as usize];
            r.error = Some("no instance accepts requests now".into());
            if !r.done {
                r.done = true;
                self.done += 1;
            }
            return Ok(());
        };
        self.input(target, Input::Assign(Box::new(job)))
    }

    /// `Manager::submit`: priority policy, then placement.
    fn arrival(&mut self) -> Result<()> {
        let seq = self.order[self.next_arrival];
        self.next_arrival += 1;
        if let Some(&next) = self.order.get(self.next_arrival) {
            self.push(self.workload[next as usize].arrival_us, EventKind::Arrival);
        }
        let spec = self.workload[seq as usize];
        let requested = u8::from(spec.high_priority);
        let mut meta = RequestMeta {
            id: u64::from(seq),
            prompt_tokens: spec.prompt_tokens,
            max_tokens: spec.output_tokens,
            requested_priority: requested,
            priority: requested,
            prefix_hash: mix(u64::from(seq) ^ 0x7072_6566_6978),
            arrival_us: self.now,
        };
        if let Err(too_long) = self.controller.admit(&meta) {
            // Refused before any policy sees it, as the server does.
            self.stats.rejected_requests += 1;
            let r = &mut self.reqs[seq as usize];
            r.error = Some(too_long.to_string());
            r.done = true;
            self.done += 1;
            return Ok(());
        }
        let priority = with_decide!(self, d, self.controller.prioritize(&mut d, &mut meta));
        self.place(Assign {
            request: u64::from(seq),
            prompt: vec![PROMPT_TOKEN; spec.prompt_tokens as usize],
            generated: Vec::new(),
            sampling: SamplingParams {
                seed: mix(self.cfg.seed ^ mix(u64::from(seq))),
                ..SamplingParams::greedy(spec.output_tokens)
            },
            priority: meta.priority,
            headroom_blocks: priority.headroom_blocks,
            arrival_us: spec.arrival_us,
        })
    }

    /// The migration round: the controller's orders go to the sources.
    /// A source that is stepping answers for its candidates at the step's
    /// end (see [`Node::owed_candidates`]); an idle one at once.
    fn migration_round(&mut self) -> Result<()> {
        let pairs = with_decide!(self, d, self.controller.plan_migrations(&mut d));
        for pair in pairs {
            let source = &mut self.nodes[pair.source as usize];
            if source.core.is_stepping() {
                source.owed_candidates.push(pair);
                continue;
            }
            let candidates = source.core.migration_candidates();
            self.choose_migrations(pair, &candidates)?;
        }
        Ok(())
    }

    /// The policy's picks for a pair, started within the limits.
    fn choose_migrations(
        &mut self,
        pair: llumen_policy_logic::MigrationPair,
        candidates: &[llumen_policy_logic::MigrationCandidate],
    ) -> Result<()> {
        let choice = with_decide!(
            self,
            d,
            self.controller.choose_migrations(&mut d, pair, candidates)
        );
        for o in choice.orders {
            self.input(
                o.source,
                Input::MigrateOut {
                    migration_id: o.migration_id,
                    request: o.request,
                    peer: o.destination,
                },
            )?;
        }
        Ok(())
    }

    /// The scaling round: the controller's actions, carried out.
    fn scaling_round(&mut self) -> Result<()> {
        let Some(bounds) = self.cfg.scaling.clone() else {
            return Ok(());
        };
        let actions = with_decide!(self, d, self.controller.scaling_round(&mut d));
        for action in actions {
            match action {
                ScalingAction::Start { instance } => {
                    self.add_node(instance);
                    self.push(
                        self.now + bounds.startup_delay_us,
                        EventKind::Ready(instance),
                    );
                }
                ScalingAction::Drain { instance } => {
                    self.input(instance, Input::SetDraining(true))?;
                }
                ScalingAction::CancelDrain { instance } => {
                    self.input(instance, Input::SetDraining(false))?;
                }
                ScalingAction::Stop { instance } => {
                    let node = &mut self.nodes[instance as usize];
                    if !node.core.is_empty() {
                        bail!(
                            "instance {instance} was stopped while it still held requests or migrations"
                        );
                    }
                    node.removed = true;
                    self.instance_us += u128::from(self.now - node.created_us);
                }
            }
        }
        Ok(())
    }

    /// One fleet sample: instances, waiting demand, fragmentation, free blocks.
    fn sample(&mut self) {
        let mut instances = 0u32;
        let mut free_total = 0u64;
        let mut room_total = 0u64;
        let mut room_max = 0u64;
        let serving =
            |c: &Controller, id: usize| !matches!(c.phase(id as u32), None | Some(Phase::Starting));
        for (id, node) in self.nodes.iter().enumerate() {
            if node.removed {
                continue;
            }
            instances += 1;
            if !serving(&self.controller, id) {
                continue;
            }
            let bm = node.core.engine().scheduler().block_manager();
            let free = bm.free_blocks() as u64;
            let room = free.saturating_sub(bm.watermark_blocks() as u64);
            free_total += free;
            room_total += room;
            room_max = room_max.max(room);
        }
        let mut waiting = 0u64;
        let mut fragmented = 0u64;
        for (id, node) in self.nodes.iter().enumerate() {
            if node.removed || !serving(&self.controller, id) {
                continue;
            }
            let s = node.core.engine().scheduler();
            if s.num_waiting() == 0 {
                continue;
            }
            for seq in s.waiting_ids() {
                let Some(info) = s.sequence(seq) else {
                    continue;
                };
                let demand = s
                    .block_manager()
                    .blocks_needed(info.prompt_tokens + info.output_tokens)
                    as u64;
                waiting += demand;
                if demand <= room_total && demand > room_max {
                    fragmented += demand;
                }
            }
        }
        self.samples.push(FleetSample {
            t_us: self.now,
            instances,
            waiting_demand_blocks: waiting,
            fragmented_demand_blocks: fragmented,
            free_blocks_total: free_total,
        });
    }
}
