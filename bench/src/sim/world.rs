//! The simulation proper: a virtual clock, an event queue, the simulated
//! instances and the global scheduler's rounds.
//!
//! **Owns**: the event loop (a [`BinaryHeap`] keyed by (virtual time,
//! insertion number), so equal times resolve in a fixed order), each
//! instance's step loop (a mirror of `host/src/llumlet.rs`), the
//! migration transport between instances (messages delayed by
//! `bytes / bandwidth + latency`, in order per migration and direction),
//! the manager's rounds (a mirror of `host/src/manager.rs`: `submit`'s
//! priority and dispatch, `migration_round` / `start_migration`,
//! `scaling_round` / `drain`), and the records of the run.
//! **Never touches**: the wall clock for decisions (only to time the run),
//! threads, sockets, files.
//!
//! # An instance, as its llumlet drives it
//!
//! A turn (the llumlet's loop body) happens when an idle instance receives
//! something, and when its step ends: apply the mailbox in order (new
//! requests, migration commands and messages), run due migration
//! timeouts, then `Engine::step(now)` if the engine holds requests. The
//! step's effect is computed at once but lands at `now + duration`: the
//! instance is busy until then, and what arrives meanwhile waits in its
//! mailbox, exactly as the llumlet applies commands only between steps. At
//! the step's end the outgoing migrations see it (`on_engine_step`), the
//! load snapshot is published to the policies (after every step that
//! changed the running/waiting counts, else at most every 5 ms, the
//! llumlet's rule), and the next turn follows; a turn whose commands
//! changed those counts publishes before its step too (the llumlet's rule,
//! so that the dispatcher sees new requests at once).
//!
//! Departures from the llumlet and the manager (they live on threads,
//! channels and QUIC; the simulator runs their logic on one thread):
//! - No idle heartbeat snapshots (every 500 ms): an idle instance's load
//!   changes only when something happens to it, and then it is published
//!   at the end of that turn if it differs from the last one published
//!   (timestamp aside).
//! - Migration messages are passed as values, not encoded bytes. The
//!   latency backend keeps no KV contents here (`without_kv_contents`: no
//!   digest per token written), so a message's KV payload is each block's
//!   filler pattern shrunk to one header (`with_kv_bytes_per_block`); its
//!   transfer time counts the profile's full `kv_bytes_per_block`. That
//!   migrated KV arrives byte for byte is the engine's tests' business.
//! - A request enters the engine with its workload arrival time as
//!   `arrival_us` (the llumlet stamps its own receipt time; dispatch is
//!   instantaneous here, so they only differ while the instance is busy).
//! - A drained instance is removed only when its engine is empty and no
//!   migration or message involves it (the manager trusts the fleet view
//!   and lets the relays re-place anything a stopped instance dropped).
//! - A scale-up instance exists (and costs) from the decision and serves
//!   after the start-up delay; the manager's in-process instances start at
//!   once.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use llumen_engine::latency_model::migration_time_us;
use llumen_engine::{
    DestinationEvent, DestinationMigration, Engine, LatencyModelBackend, MigrationError,
    MigrationId, MigrationMessage as Message, MigrationResult, Request, SamplingParams, SeqEvent,
    SourceMigration,
};
use llumen_host::policy::{Decision, PolicyRuntime};
use llumen_policy_logic::{InstanceLoad, RequestMeta, ScalingDecision};

use super::{policies, SimConfig, SimOutcome, SimStats};
use crate::record::{FleetRecord, FleetSample, RequestRecord, RequestSpec};

/// The llumlet's `MIN_PUBLISH_GAP`: shortest gap between two snapshots of
/// a busy instance whose request counts did not change.
const MIN_PUBLISH_GAP_US: u64 = 5_000;
/// The token every simulated prompt is made of (the latency backend reads
/// only lengths).
const PROMPT_TOKEN: u32 = 100;

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// Something an instance's mailbox receives (the llumlet's `Command`).
#[derive(Debug)]
enum Command {
    /// A new request (with its priority and headroom from the priority policy).
    Assign {
        seq: u64,
        priority: u8,
        headroom_blocks: u32,
    },
    /// Start migrating `seq` to `destination`.
    MigrateOut {
        migration_id: MigrationId,
        seq: u64,
        destination: u32,
    },
    /// A reply of an outgoing migration's destination.
    FromDestination {
        migration_id: MigrationId,
        message: Message,
    },
    /// A message of an incoming migration's source.
    FromSource { source: u32, message: Message },
}

#[derive(Debug)]
enum EventKind {
    /// The next request of the workload arrives.
    Arrival,
    /// An instance's step ends.
    StepEnd(u32),
    /// A migration message reaches an instance's mailbox.
    Deliver(u32, Box<Command>),
    /// A started instance is ready to serve.
    Ready(u32),
    /// An instance's next migration deadline.
    Timer(u32),
    MigrationRound,
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
                | EventKind::Deliver(..)
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

// ---------------------------------------------------------------------------
// Instances and requests
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Scaled up, not serving yet (not in the policies' fleet view).
    Starting,
    Serving,
    /// No new requests; removed once empty.
    Draining,
    Removed,
}

struct Outgoing {
    sm: SourceMigration,
    destination: u32,
}

struct Instance {
    engine: Engine<LatencyModelBackend>,
    phase: Phase,
    created_us: u64,
    /// A step is in flight (until its `StepEnd`).
    busy: bool,
    mailbox: VecDeque<Command>,
    outgoing: BTreeMap<MigrationId, Outgoing>,
    incoming: DestinationMigration,
    /// The last load published to the policies (the fleet view's copy).
    last_load: Option<InstanceLoad>,
    last_publish_us: u64,
    /// (running, waiting) before the step in flight.
    counts_before: (usize, usize),
    /// When the pending `Timer` event fires, if one is pending.
    timer_at: Option<u64>,
    /// Migrations in or out in flight (the manager's count).
    migrating: u32,
}

impl Instance {
    fn counts(&self) -> (usize, usize) {
        let s = self.engine.scheduler();
        (s.num_running(), s.num_waiting())
    }

    fn next_deadline(&self) -> Option<u64> {
        self.outgoing
            .values()
            .filter_map(|o| o.sm.poll_timeout())
            .chain(self.incoming.poll_timeout())
            .min()
    }
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

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// The world
// ---------------------------------------------------------------------------

pub struct World<'a> {
    cfg: &'a SimConfig,
    workload: &'a [RequestSpec],
    /// Workload indices in arrival order.
    order: Vec<u32>,
    next_arrival: usize,
    runtime: PolicyRuntime,
    now: u64,
    queue: BinaryHeap<Event>,
    next_event: u64,
    /// Work events in the queue (see [`EventKind::is_work`]).
    work_events: u64,
    instances: Vec<Instance>,
    reqs: Vec<ReqState>,
    done: usize,
    busy: usize,
    outgoing: usize,
    next_migration: MigrationId,
    /// Delivery time of the last message per (migration, towards the source).
    fifo: HashMap<(MigrationId, bool), u64>,
    /// When the destination committed a migration (until the source settles it).
    committed_at: HashMap<MigrationId, u64>,
    bandwidth: f64,
    kv_bytes_per_block: u64,
    instance_us: u128,
    samples: Vec<FleetSample>,
    stats: SimStats,
    /// Reused list of migration ids.
    scratch: Vec<MigrationId>,
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
        Ok(Self {
            cfg,
            workload,
            order,
            next_arrival: 0,
            runtime,
            now: 0,
            queue: BinaryHeap::new(),
            next_event: 0,
            work_events: 0,
            instances: Vec::new(),
            reqs: vec![ReqState::default(); workload.len()],
            done: 0,
            busy: 0,
            outgoing: 0,
            next_migration: 1,
            fifo: HashMap::new(),
            committed_at: HashMap::new(),
            bandwidth,
            kv_bytes_per_block: cfg.profile.kv_bytes_per_block() as u64,
            instance_us: 0,
            samples: Vec::new(),
            stats: SimStats::default(),
            scratch: Vec::new(),
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

    fn note<T>(&mut self, d: &Decision<T>) {
        if let Some(f) = &d.failure {
            self.stats.policy_failures += 1;
            if self.stats.first_policy_failure.is_none() {
                self.stats.first_policy_failure = Some(format!("{:?}: {f}", d.source));
            }
        }
    }

    fn finished(&self) -> bool {
        self.done == self.workload.len()
            && self.busy == 0
            && self.outgoing == 0
            && self.work_events == 0
            && self.now >= self.cfg.min_run_us
    }

    /// Runs to the end; `setup_seconds` is what building the world took
    /// (compiling the policy components), reported apart.
    pub fn run(mut self, setup_seconds: f64) -> Result<SimOutcome> {
        let wall = Instant::now();
        for _ in 0..self.cfg.instances {
            let id = self.add_instance();
            self.ready(id);
        }
        if let Some(&first) = self.order.first() {
            self.push(self.workload[first as usize].arrival_us, EventKind::Arrival);
        }
        self.push(0, EventKind::Sample);
        if self.cfg.migration {
            self.push(self.cfg.migration_period_us, EventKind::MigrationRound);
        }
        if let Some(s) = &self.cfg.scaling {
            self.push(s.period_us, EventKind::ScalingRound);
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
                EventKind::Deliver(id, cmd) => self.deliver(id, *cmd)?,
                EventKind::Ready(id) => self.ready(id),
                EventKind::Timer(id) => self.timer(id)?,
                EventKind::MigrationRound => {
                    self.migration_round()?;
                    self.push(
                        self.now + self.cfg.migration_period_us,
                        EventKind::MigrationRound,
                    );
                }
                EventKind::ScalingRound => {
                    self.scaling_round();
                    let period = self.cfg.scaling.as_ref().map_or(1, |s| s.period_us);
                    self.push(self.now + period, EventKind::ScalingRound);
                }
                EventKind::Sample => {
                    self.sample();
                    self.push(self.now + self.cfg.sample_period_us, EventKind::Sample);
                }
            }
            if self.work_events == 0 && self.outgoing == 0 && self.done < self.workload.len() {
                bail!("{}", self.stall_report());
            }
        }
        Ok(self.finish(wall.elapsed().as_secs_f64(), setup_seconds))
    }

    fn stall_report(&self) -> String {
        let stuck: Vec<String> = self
            .instances
            .iter()
            .enumerate()
            .filter(|(_, i)| !i.engine.scheduler().is_idle())
            .map(|(id, i)| {
                let s = i.engine.scheduler();
                let bm = s.block_manager();
                format!(
                    "instance {id} ({:?}): {} running, {} waiting, {} free / {} reserved of {} blocks",
                    i.phase,
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
        for inst in &self.instances {
            if inst.phase != Phase::Removed {
                self.instance_us += u128::from(end - inst.created_us);
            }
            let s = inst.engine.scheduler();
            let bm = s.block_manager();
            self.stats.blocks_held_at_end += (bm.total_blocks() - bm.free_blocks()) as u64;
            self.stats.sequences_at_end += s.num_sequences() as u64;
        }
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

    fn add_instance(&mut self) -> u32 {
        let id = self.instances.len() as u32;
        let block_header = 8 + 8 * self.cfg.profile.block_size();
        let backend = LatencyModelBackend::new(self.cfg.profile.clone())
            .with_kv_bytes_per_block(block_header)
            .without_kv_contents();
        let engine = Engine::new(self.cfg.scheduler.clone(), backend)
            .expect("the scheduler configuration was validated");
        self.instances.push(Instance {
            engine,
            phase: Phase::Starting,
            created_us: self.now,
            busy: false,
            mailbox: VecDeque::new(),
            outgoing: BTreeMap::new(),
            incoming: DestinationMigration::new(self.cfg.migration_protocol.clone()),
            last_load: None,
            last_publish_us: 0,
            counts_before: (0, 0),
            timer_at: None,
            migrating: 0,
        });
        let existing = self
            .instances
            .iter()
            .filter(|i| i.phase != Phase::Removed)
            .count() as u32;
        self.stats.max_instances = self.stats.max_instances.max(existing);
        id
    }

    /// A started instance serves: its first snapshot goes to the policies
    /// (the llumlet publishes once when its loop starts).
    fn ready(&mut self, id: u32) {
        let inst = &mut self.instances[id as usize];
        if inst.phase != Phase::Starting {
            return;
        }
        inst.phase = Phase::Serving;
        self.publish(id);
    }

    fn publish(&mut self, id: u32) {
        let now = self.now;
        let inst = &mut self.instances[id as usize];
        let mut load = inst.engine.load(id, now);
        load.draining |= inst.phase == Phase::Draining;
        inst.last_load = Some(load);
        inst.last_publish_us = now;
        self.runtime.observe(load);
        self.stats.snapshots += 1;
    }

    /// Publishes after a turn without a step, if the load changed.
    fn publish_if_changed(&mut self, id: u32) {
        let inst = &self.instances[id as usize];
        if inst.phase == Phase::Starting || inst.phase == Phase::Removed {
            return;
        }
        let mut load = inst.engine.load(id, 0);
        load.draining |= inst.phase == Phase::Draining;
        let same = inst.last_load.is_some_and(|mut l| {
            l.timestamp_us = 0;
            l == load
        });
        if !same {
            self.publish(id);
        }
    }

    /// Something for an instance's mailbox; an idle instance takes a turn.
    fn deliver(&mut self, id: u32, cmd: Command) -> Result<()> {
        let inst = &mut self.instances[id as usize];
        if inst.phase == Phase::Removed {
            bail!("a message for removed instance {id}: {cmd:?}");
        }
        inst.mailbox.push_back(cmd);
        if !inst.busy {
            self.turn(id)?;
        }
        Ok(())
    }

    /// The llumlet's loop body: mailbox, timeouts, one step.
    fn turn(&mut self, id: u32) -> Result<()> {
        let now = self.now;
        let before_commands = self.instances[id as usize].counts();
        while let Some(cmd) = self.instances[id as usize].mailbox.pop_front() {
            self.apply(id, cmd)?;
        }
        self.timeouts(id)?;
        let inst = &mut self.instances[id as usize];
        if inst.engine.scheduler().is_idle() {
            self.publish_if_changed(id);
        } else {
            // As the llumlet: new requests are published before the step.
            if inst.counts() != before_commands && inst.phase != Phase::Starting {
                self.publish(id);
            }
            let inst = &mut self.instances[id as usize];
            inst.counts_before = inst.counts();
            let report = inst
                .engine
                .step(now)
                .map_err(|e| anyhow!("instance {id}: engine step at {now} us: {e}"))?;
            if report.batch_size == 0 {
                // Nothing fits (blocks reserved by an incoming migration):
                // the llumlet waits for news, so does the instance.
                self.stats.stalled_steps += 1;
                self.publish_if_changed(id);
            } else {
                self.stats.steps += 1;
                let end = now + report.duration_us;
                for &p in &report.preempted {
                    let r = &mut self.reqs[p as usize];
                    r.preemptions += 1;
                    r.evicted_at.get_or_insert(now);
                    self.stats.preemptions += 1;
                }
                for ev in &report.events {
                    match *ev {
                        SeqEvent::Token { seq, index, .. } => {
                            let r = &mut self.reqs[seq as usize];
                            if index == 0 {
                                r.first_token_us.get_or_insert(end);
                            }
                            if let Some(at) = r.evicted_at.take() {
                                r.preemption_loss_us += end - at;
                            }
                        }
                        SeqEvent::Finished {
                            seq, output_tokens, ..
                        } => {
                            let r = &mut self.reqs[seq as usize];
                            if r.done {
                                bail!("request {seq} finished twice (again on instance {id})");
                            }
                            r.finish_us = Some(end);
                            r.output_tokens = output_tokens;
                            r.done = true;
                            self.done += 1;
                        }
                    }
                }
                let inst = &mut self.instances[id as usize];
                inst.busy = true;
                self.busy += 1;
                self.push(end, EventKind::StepEnd(id));
            }
        }
        self.arm_timer(id);
        Ok(())
    }

    fn step_end(&mut self, id: u32) -> Result<()> {
        let now = self.now;
        let inst = &mut self.instances[id as usize];
        inst.busy = false;
        self.busy -= 1;
        // The outgoing migrations see the step (a request that finished or
        // was preempted aborts its migration).
        if !inst.outgoing.is_empty() {
            let mut ids = std::mem::take(&mut self.scratch);
            ids.clear();
            ids.extend(inst.outgoing.keys().copied());
            for &mid in &ids {
                let inst = &mut self.instances[id as usize];
                let Some(o) = inst.outgoing.get_mut(&mid) else {
                    continue;
                };
                let out = o.sm.on_engine_step(&mut inst.engine, now);
                let dest = o.destination;
                for m in out {
                    self.send(id, dest, false, m);
                }
                self.settle(id, mid)?;
            }
            self.scratch = ids;
        }
        let inst = &self.instances[id as usize];
        if inst.counts() != inst.counts_before || now >= inst.last_publish_us + MIN_PUBLISH_GAP_US {
            self.publish(id);
        }
        self.turn(id)
    }

    fn apply(&mut self, id: u32, cmd: Command) -> Result<()> {
        let now = self.now;
        match cmd {
            Command::Assign {
                seq,
                priority,
                headroom_blocks,
            } => {
                let spec = self.workload[seq as usize];
                let request = Request {
                    id: seq,
                    prompt: vec![PROMPT_TOKEN; spec.prompt_tokens as usize],
                    sampling: SamplingParams {
                        seed: mix(self.cfg.seed ^ mix(seq)),
                        ..SamplingParams::greedy(spec.output_tokens)
                    },
                    priority,
                    headroom_blocks,
                    arrival_us: spec.arrival_us,
                };
                if let Err(e) = self.instances[id as usize].engine.add(request, now) {
                    self.stats.rejected_requests += 1;
                    let r = &mut self.reqs[seq as usize];
                    r.error = Some(e.to_string());
                    if !r.done {
                        r.done = true;
                        self.done += 1;
                    }
                }
            }
            Command::MigrateOut {
                migration_id,
                seq,
                destination,
            } => {
                let inst = &mut self.instances[id as usize];
                let here = inst.engine.scheduler().contains(seq);
                let already = inst.outgoing.values().any(|o| o.sm.seq() == seq);
                let mut sm =
                    SourceMigration::new(self.cfg.migration_protocol.clone(), migration_id, seq);
                let started = if here && !already {
                    sm.start(&mut inst.engine, now).ok()
                } else {
                    None
                };
                match started {
                    Some(out) => {
                        inst.outgoing
                            .insert(migration_id, Outgoing { sm, destination });
                        self.outgoing += 1;
                        for m in out {
                            self.send(id, destination, false, m);
                        }
                    }
                    None => {
                        self.stats.migrations_not_started += 1;
                        self.migration_ended(id, destination);
                    }
                }
            }
            Command::FromDestination {
                migration_id,
                message,
            } => {
                let inst = &mut self.instances[id as usize];
                if let Some(o) = inst.outgoing.get_mut(&migration_id) {
                    let dest = o.destination;
                    match o.sm.handle(&mut inst.engine, message, now) {
                        Ok(out) => {
                            for m in out {
                                self.send(id, dest, false, m);
                            }
                        }
                        Err(e @ MigrationError::Requeue(_)) => {
                            bail!("instance {id}, migration {migration_id}: {e}")
                        }
                        // The llumlet logs and goes on (a timeout ends it).
                        Err(_) => self.stats.migration_messages_refused += 1,
                    }
                    self.settle(id, migration_id)?;
                }
            }
            Command::FromSource { source, message } => {
                let inst = &mut self.instances[id as usize];
                let out = inst.incoming.handle(&mut inst.engine, message, now);
                while let Some(event) = inst.incoming.poll_event() {
                    if let DestinationEvent::Committed { migration_id, .. } = event {
                        self.committed_at.insert(migration_id, now);
                    }
                }
                for m in out {
                    self.send(id, source, true, m);
                }
            }
        }
        Ok(())
    }

    /// Sends a migration message: it reaches `to`'s mailbox after the fixed
    /// latency plus its KV at the migration bandwidth, never before an
    /// earlier message of the same migration and direction.
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
        let migration_id = message.migration_id();
        let key = (migration_id, to_source);
        let earliest = self.now + self.cfg.migration_message_latency_us + transfer;
        let at = earliest.max(self.fifo.get(&key).copied().unwrap_or(0));
        self.fifo.insert(key, at);
        self.stats.migration_messages += 1;
        self.stats.migration_blocks += blocks;
        let cmd = if to_source {
            Command::FromDestination {
                migration_id,
                message,
            }
        } else {
            Command::FromSource {
                source: from,
                message,
            }
        };
        self.push(at, EventKind::Deliver(to, Box::new(cmd)));
    }

    /// Retires an outgoing migration that reached its end (the llumlet's
    /// `settle` and the manager's `migration_ended`).
    fn settle(&mut self, id: u32, migration_id: MigrationId) -> Result<()> {
        let now = self.now;
        let inst = &mut self.instances[id as usize];
        let ended = inst
            .outgoing
            .get(&migration_id)
            .is_some_and(|o| o.sm.state().is_terminal());
        if !ended {
            return Ok(());
        }
        let mut o = inst.outgoing.remove(&migration_id).expect("checked above");
        self.outgoing -= 1;
        if let Some(d) = o.sm.take_detached() {
            bail!(
                "instance {id}, migration {migration_id}: request {} was detached and could not be put back",
                d.id
            );
        }
        let outcome = o.sm.outcome().expect("a terminal migration has an outcome");
        let r = &mut self.reqs[outcome.seq as usize];
        match outcome.result {
            MigrationResult::Committed => {
                r.migrations += 1;
                self.stats.migrations_committed += 1;
                // The request's downtime: out of the source's batch at
                // detach, in the destination's at its commit.
                let committed = self.committed_at.remove(&migration_id).unwrap_or(now);
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
                self.committed_at.remove(&migration_id);
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
        self.fifo.remove(&(migration_id, false));
        self.fifo.remove(&(migration_id, true));
        self.migration_ended(id, o.destination);
        Ok(())
    }

    /// The manager's per-instance migration count goes down.
    fn migration_ended(&mut self, source: u32, destination: u32) {
        for i in [source, destination] {
            let m = &mut self.instances[i as usize].migrating;
            *m = m.saturating_sub(1);
        }
    }

    /// Migration deadlines that passed (the llumlet's `timeouts`).
    fn timeouts(&mut self, id: u32) -> Result<()> {
        let now = self.now;
        let inst = &mut self.instances[id as usize];
        if inst.next_deadline().is_none_or(|d| d > now) {
            return Ok(());
        }
        let due: Vec<MigrationId> = inst
            .outgoing
            .iter()
            .filter(|(_, o)| o.sm.poll_timeout().is_some_and(|d| d <= now))
            .map(|(&m, _)| m)
            .collect();
        for mid in due {
            let inst = &mut self.instances[id as usize];
            if let Some(o) = inst.outgoing.get_mut(&mid) {
                let dest = o.destination;
                match o.sm.handle_timeout(&mut inst.engine, now) {
                    Ok(out) => {
                        for m in out {
                            self.send(id, dest, false, m);
                        }
                    }
                    Err(e) => bail!("instance {id}, migration {mid}: timeout: {e}"),
                }
            }
            self.settle(id, mid)?;
        }
        let inst = &mut self.instances[id as usize];
        if inst.incoming.poll_timeout().is_some_and(|d| d <= now) {
            inst.incoming.handle_timeout(&mut inst.engine, now);
            while inst.incoming.poll_event().is_some() {}
        }
        Ok(())
    }

    /// Makes sure a `Timer` event fires at the instance's next deadline.
    fn arm_timer(&mut self, id: u32) {
        let inst = &mut self.instances[id as usize];
        let Some(d) = inst.next_deadline() else {
            return;
        };
        if inst.timer_at.is_none_or(|t| d < t) {
            inst.timer_at = Some(d);
            self.push(d, EventKind::Timer(id));
        }
    }

    fn timer(&mut self, id: u32) -> Result<()> {
        let inst = &mut self.instances[id as usize];
        if inst.timer_at != Some(self.now) {
            return Ok(()); // superseded
        }
        inst.timer_at = None;
        if inst.phase == Phase::Removed {
            return Ok(());
        }
        if inst.busy {
            // The turn at the step's end runs the timeouts and re-arms.
            return Ok(());
        }
        self.turn(id)
    }

    // ----- the global scheduler -----

    fn serving(&self, id: u32) -> bool {
        self.instances
            .get(id as usize)
            .is_some_and(|i| i.phase == Phase::Serving)
    }

    /// `Manager::submit`: priority policy, then dispatch policy; the
    /// request is handed to the chosen instance at once.
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
        let priority = self.runtime.assign_priority(&meta);
        self.stats.priority_calls += 1;
        self.note(&priority);
        meta.priority = priority.value.priority;
        let decision = self.runtime.dispatch(&meta);
        self.stats.dispatch_calls += 1;
        self.note(&decision);
        // As `choose_instance`: a target that does not serve is replaced by
        // the first serving instance.
        let target = match decision.value {
            Some(t) if self.serving(t) => Some(t),
            other => {
                let fallback = (0..self.instances.len() as u32).find(|&i| self.serving(i));
                if other.is_some() && fallback.is_some() {
                    self.stats.dispatch_redirects += 1;
                }
                fallback
            }
        };
        let Some(target) = target else {
            self.stats.rejected_requests += 1;
            let r = &mut self.reqs[seq as usize];
            r.error = Some("no instance accepts requests now".into());
            r.done = true;
            self.done += 1;
            return Ok(());
        };
        self.deliver(
            target,
            Command::Assign {
                seq: u64::from(seq),
                priority: meta.priority,
                headroom_blocks: priority.value.headroom_blocks,
            },
        )
    }

    /// `Manager::migration_round`: the policy's pairs, its picks among the
    /// source's running requests, started while the limits allow.
    fn migration_round(&mut self) -> Result<()> {
        let plan = self.runtime.plan_migration();
        self.stats.migration_plan_calls += 1;
        self.note(&plan);
        for pair in plan.value {
            let Some(src) = self.instances.get(pair.source as usize) else {
                continue;
            };
            if matches!(src.phase, Phase::Removed | Phase::Starting) {
                continue;
            }
            let candidates = src.engine.migration_candidates();
            let chosen = self.runtime.choose_migrations(pair, &candidates);
            self.stats.migration_choose_calls += 1;
            self.note(&chosen);
            self.stats.migrations_planned += chosen.value.len() as u64;
            for &request in &chosen.value {
                if !self.start_migration(request, pair.source, pair.destination)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// `Manager::start_migration`: false when the destination does not
    /// serve or either side is at its migration limit.
    fn start_migration(&mut self, seq: u64, source: u32, destination: u32) -> Result<bool> {
        let max = self.cfg.max_migrations_per_instance;
        let ok = source != destination
            && self.serving(destination)
            && self.instances.get(source as usize).is_some_and(|s| {
                matches!(s.phase, Phase::Serving | Phase::Draining) && s.migrating < max
            })
            && self.instances[destination as usize].migrating < max;
        if !ok {
            self.stats.migrations_skipped += 1;
            return Ok(false);
        }
        self.instances[source as usize].migrating += 1;
        self.instances[destination as usize].migrating += 1;
        let migration_id = self.next_migration;
        self.next_migration += 1;
        self.stats.migrations_started += 1;
        self.deliver(
            source,
            Command::MigrateOut {
                migration_id,
                seq,
                destination,
            },
        )?;
        Ok(true)
    }

    /// `Manager::scaling_round`: the policy's decision within the bounds,
    /// then drained instances that are empty are removed.
    fn scaling_round(&mut self) {
        let Some(bounds) = self.cfg.scaling.clone() else {
            return;
        };
        let decision = self.runtime.decide_scaling();
        self.stats.scaling_calls += 1;
        self.note(&decision);
        let existing = |p: Phase| p != Phase::Removed;
        let total = self.instances.iter().filter(|i| existing(i.phase)).count() as u32;
        let serving = self
            .instances
            .iter()
            .filter(|i| matches!(i.phase, Phase::Starting | Phase::Serving))
            .count() as u32;
        match decision.value {
            ScalingDecision::Hold => {}
            ScalingDecision::ScaleUp(n) => {
                let room = bounds.max_instances.saturating_sub(total);
                for _ in 0..n.min(room) {
                    let id = self.add_instance();
                    self.stats.scale_ups += 1;
                    self.push(self.now + bounds.startup_delay_us, EventKind::Ready(id));
                }
            }
            ScalingDecision::Drain(id) => {
                if serving > bounds.min_instances && self.serving(id) {
                    self.drain(id);
                }
            }
        }
        // Stop drained instances that are empty (in the fleet view, and in
        // fact: nothing in flight either).
        for id in 0..self.instances.len() as u32 {
            let inst = &self.instances[id as usize];
            let empty_view = inst
                .last_load
                .is_some_and(|l| l.draining && l.running == 0 && l.waiting == 0);
            let empty = inst.phase == Phase::Draining
                && empty_view
                && !inst.busy
                && inst.mailbox.is_empty()
                && inst.outgoing.is_empty()
                && inst.incoming.num_incoming() == 0
                && inst.migrating == 0
                && inst.engine.scheduler().is_idle();
            if empty {
                self.remove(id);
            }
        }
    }

    /// `Manager::drain`: no new requests; the policies hear of it at once.
    fn drain(&mut self, id: u32) {
        let inst = &mut self.instances[id as usize];
        inst.phase = Phase::Draining;
        inst.engine.scheduler_mut().set_draining(true);
        self.stats.drains += 1;
        if let Some(mut load) = inst.last_load {
            load.draining = true;
            inst.last_load = Some(load);
            self.runtime.observe(load);
            self.stats.snapshots += 1;
        }
    }

    fn remove(&mut self, id: u32) {
        let inst = &mut self.instances[id as usize];
        inst.phase = Phase::Removed;
        self.instance_us += u128::from(self.now - inst.created_us);
        self.runtime.remove_instance(id);
        self.stats.removals += 1;
    }

    /// One fleet sample: instances, waiting demand, fragmentation, free blocks.
    fn sample(&mut self) {
        let mut instances = 0u32;
        let mut free_total = 0u64;
        let mut room_total = 0u64;
        let mut room_max = 0u64;
        for inst in &self.instances {
            if inst.phase == Phase::Removed {
                continue;
            }
            instances += 1;
            if inst.phase == Phase::Starting {
                continue;
            }
            let bm = inst.engine.scheduler().block_manager();
            let free = bm.free_blocks() as u64;
            let room = free.saturating_sub(bm.watermark_blocks() as u64);
            free_total += free;
            room_total += room;
            room_max = room_max.max(room);
        }
        let mut waiting = 0u64;
        let mut fragmented = 0u64;
        for inst in &self.instances {
            if matches!(inst.phase, Phase::Removed | Phase::Starting) {
                continue;
            }
            let s = inst.engine.scheduler();
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
