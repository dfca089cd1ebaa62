//! [`InstanceCore`]: one instance's turn around its engine and its live
//! migrations, as a pure state machine.
//!
//! **Owns**: the order in which an instance does things (apply what it was
//! told, run due migration timeouts, publish its load, step the engine,
//! let the outgoing migrations see the step, publish again), the requests
//! it serves (which are live here, when each was first scheduled), its
//! outgoing migrations ([`SourceMigration`], one per leaving request) and
//! its incoming ones (one [`DestinationMigration`]), and the rules for when
//! a load snapshot is published.
//! **Never touches**: threads, channels, sockets, the clock (time is an
//! argument), policies, the store. Who drives it (the server's llumlet, the
//! simulator, the benches, the fleet harness) carries its transmits and
//! events to wherever they go.
//!
//! # Driving it
//!
//! Inputs are queued with [`InstanceCore::input`] and applied at the next
//! [`InstanceCore::turn`], in order, exactly as a llumlet applies commands
//! between two engine steps. A turn that starts an engine step returns
//! [`Turn::Stepping`]; the step's effects (tokens, finishes, the outgoing
//! migrations' view of it) land at [`InstanceCore::end_step`]: the server
//! ends the step at once, the simulator at `now + duration`. Between the
//! two the core takes inputs but applies none (the instance is busy).
//! Messages for peers come out of [`InstanceCore::poll_transmit`],
//! everything else out of [`InstanceCore::poll_event`]; when nothing else
//! happens, [`InstanceCore::poll_timeout`] says when the next turn is due.
//!
//! Invariants: every request handed over by [`Input::Assign`] ends with
//! exactly one of `Finished`, `Failed`, `Stranded` or `MovedOut` (unless
//! the driver cancelled it first); tokens come in index order, once each;
//! every [`Input::MigrateOut`] ends with exactly one `MigrationEnded`; a
//! migrated-in request appears with `MovedIn` and, if its source takes it
//! back after all, disappears with `MoveInRevoked`.

use std::collections::{BTreeMap, HashMap, VecDeque};

use llumen_engine::{
    AbortReason, DestinationEvent, DestinationMigration, DetachedSequence, Engine, MigrationConfig,
    MigrationError, MigrationId, MigrationMessage, MigrationOutcome, ModelBackend, RefuseReason,
    Request, SamplingParams, SeqEvent, SourceEvent, SourceMigration, SourceState, StepReport,
    TokenId,
};
use llumen_policy_logic::{InstanceLoad, MigrationCandidate};

/// Knobs of an instance's turn.
#[derive(Clone, Debug, PartialEq)]
pub struct CoreConfig {
    /// The migration protocol's timeouts and stage sizes.
    pub migration: MigrationConfig,
    /// Shortest gap between two snapshots of a busy instance whose
    /// running / waiting counts did not change (fast steps would flood the
    /// policies and the store).
    pub min_publish_gap_us: u64,
    /// An instance with no step in flight publishes at least this often
    /// even when nothing changed (a heartbeat for the manager); `None`: only
    /// when its load changed (the simulator, where nobody needs a sign of
    /// life).
    pub idle_publish_us: Option<u64>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            migration: MigrationConfig::default(),
            min_publish_gap_us: 5_000,
            idle_publish_us: Some(500_000),
        }
    }
}

/// A request handed to an instance: fresh, or resumed from outputs
/// generated elsewhere (recomputed, then continued at the next index).
#[derive(Clone, Debug, PartialEq)]
pub struct Assign {
    pub request: u64,
    pub prompt: Vec<TokenId>,
    /// Outputs generated so far elsewhere (empty for a fresh request).
    pub generated: Vec<TokenId>,
    pub sampling: SamplingParams,
    pub priority: u8,
    pub headroom_blocks: u32,
    /// When the request arrived (the driver's clock).
    pub arrival_us: u64,
}

impl Assign {
    /// The request a detached sequence was, resumable elsewhere.
    fn from_detached(d: DetachedSequence) -> Self {
        Self {
            request: d.id,
            prompt: d.prompt,
            generated: d.output,
            sampling: d.sampling,
            priority: d.priority,
            headroom_blocks: d.headroom_blocks,
            arrival_us: d.arrival_us,
        }
    }
}

/// What an instance is told.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Serve a request.
    Assign(Box<Assign>),
    /// Nobody waits for this request any more: drop it (its blocks are
    /// freed; nothing more is reported of it).
    Cancel { request: u64 },
    /// No new requests (the snapshots say so), or serving again.
    SetDraining(bool),
    /// Live-migrate `request` to instance `peer`.
    MigrateOut {
        migration_id: MigrationId,
        request: u64,
        peer: u32,
    },
    /// A migration message from instance `peer`.
    Message {
        peer: u32,
        message: MigrationMessage,
    },
    /// The link of migration `migration_id` broke (either direction): an
    /// outgoing one is given up (a detached request is requeued here), an
    /// incoming one aborted (a committed copy included: its source may never
    /// have heard of the commit).
    LinkLost { migration_id: MigrationId },
}

/// A migration message for a peer instance.
#[derive(Clone, Debug, PartialEq)]
pub struct Transmit {
    pub peer: u32,
    pub migration_id: MigrationId,
    pub message: MigrationMessage,
}

impl Transmit {
    /// Whether the message goes to the migration's source (a reply) rather
    /// than its destination.
    pub fn to_source(&self) -> bool {
        !towards_destination(&self.message)
    }
}

/// Whether a message is one a source sends (`Reserve`, `Blocks`, `Commit`,
/// `Abort`) rather than a destination's reply.
pub fn towards_destination(message: &MigrationMessage) -> bool {
    matches!(
        message,
        MigrationMessage::Reserve { .. }
            | MigrationMessage::Blocks { .. }
            | MigrationMessage::Commit { .. }
            | MigrationMessage::Abort { .. }
    )
}

/// Why a request ended without finishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// The request is invalid for this instance (out-of-vocabulary tokens,
    /// too long, a duplicate id): placing it again will not help.
    Invalid,
    /// The engine aborted it.
    Cancelled,
}

/// How a request finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` produced.
    Length,
    /// A stop token produced.
    Stop,
}

/// Why a [`Input::MigrateOut`] did not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotStarted {
    #[error("request {0} is not served here")]
    NotServed(u64),
    #[error("request {0} is already migrating")]
    AlreadyMigrating(u64),
    #[error("migration {0} is already in flight here")]
    DuplicateMigration(MigrationId),
    #[error("request {request} cannot migrate now: {reason}")]
    Refused { request: u64, reason: String },
}

/// How an outgoing migration ended.
#[derive(Clone, Debug, PartialEq)]
pub enum MigrationReport {
    /// The state machine ran to its end.
    Ended(MigrationOutcome),
    /// It never started.
    NotStarted(NotStarted),
}

impl MigrationReport {
    pub fn committed(&self) -> bool {
        matches!(self, MigrationReport::Ended(o) if o.committed())
    }
}

/// What an instance reports, in the order it happened.
#[derive(Clone, Debug, PartialEq)]
pub enum CoreEvent {
    /// Output token `index` of `request`.
    Token {
        request: u64,
        index: u32,
        token: u32,
    },
    /// The request finished here.
    Finished {
        request: u64,
        reason: Finish,
        output_tokens: u32,
        /// Enqueued here → first scheduled here, µs (0 for a request that
        /// migrated in running).
        queue_us: u64,
    },
    /// The request cannot be served here, for good.
    Failed {
        request: u64,
        kind: FailKind,
        message: String,
    },
    /// A request a failed migration had detached could not be put back in
    /// this instance's queue: it is no longer here. Place it again (the
    /// assignment resumes after its outputs so far).
    Stranded(Box<Assign>),
    /// The request was preempted (by recompute) to make a step fit
    /// (reported when the step begins).
    Preempted { request: u64 },
    /// The request migrated to `peer` and runs there now.
    MovedOut { request: u64, peer: u32 },
    /// A request migrated in from `peer` and runs here now.
    MovedIn {
        request: u64,
        peer: u32,
        migration_id: MigrationId,
    },
    /// A request that had migrated in was taken back by its source (it
    /// never heard of the commit): it is no longer here.
    MoveInRevoked { request: u64 },
    /// An [`Input::MigrateOut`] ended (the report boxed: it is rare and
    /// large, and every token event would otherwise carry its size).
    MigrationEnded {
        migration_id: MigrationId,
        request: u64,
        peer: u32,
        report: Box<MigrationReport>,
    },
    /// A load snapshot for the policies.
    Published(InstanceLoad),
    /// The engine failed a step; its sequences went back to the queue
    /// (recompute). The driver should pause before the next turn.
    StepFailed { message: String },
}

/// What a turn did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Nothing to step: wait for an input or [`InstanceCore::poll_timeout`].
    Idle,
    /// Requests wait but nothing could be scheduled (blocks held by
    /// reservations or other requests): nothing will change until an input
    /// or a timeout, so wait for one.
    Stalled,
    /// The engine failed the step: pause a little, then take another turn.
    Failed,
    /// An engine step is in flight; call [`InstanceCore::end_step`] at
    /// `ends_us` (the step's modelled or measured end).
    Stepping { ends_us: u64 },
}

/// Counters of an instance's turns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub turns: u64,
    pub steps: u64,
    pub stalled_steps: u64,
    pub step_failures: u64,
    pub preemptions: u64,
    pub snapshots: u64,
    /// Migration messages a source state machine would not take (the
    /// migration goes on; a timeout ends it if it must).
    pub messages_refused: u64,
    /// Replies for no outgoing migration (late, after its end).
    pub messages_ignored: u64,
    pub migrations_not_started: u64,
}

struct Live {
    /// Enqueued → first scheduled here, read when the first token comes.
    queue_us: Option<u64>,
}

/// Hashes a request id with one multiply (ids are the driver's own, not an
/// adversary's): the live table is looked up once per token, where the
/// default SipHash cost a tenth of the simulator's time.
#[derive(Clone, Copy, Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type LiveTable = HashMap<u64, Live, std::hash::BuildHasherDefault<IdHasher>>;

struct Outgoing {
    sm: SourceMigration,
    peer: u32,
}

/// One instance's turn. See the module docs.
pub struct InstanceCore<B: ModelBackend> {
    id: u32,
    config: CoreConfig,
    engine: Engine<B>,
    live: LiveTable,
    draining: bool,
    mailbox: VecDeque<Input>,
    outgoing: BTreeMap<MigrationId, Outgoing>,
    incoming: DestinationMigration,
    /// The source instance of each incoming migration.
    incoming_peers: BTreeMap<MigrationId, u32>,
    /// The step in flight, its effects not applied yet.
    pending: Option<StepReport>,
    /// (running, waiting) when the step in flight began.
    counts_before_step: (usize, usize),
    /// The last load published, its timestamp zeroed (for "changed?").
    last_load: Option<InstanceLoad>,
    last_publish_us: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<CoreEvent>,
    stats: CoreStats,
}

impl<B: ModelBackend> InstanceCore<B> {
    /// Instance `id` around `engine`. Requests already in the engine (a
    /// bench installs them directly) are served here like assigned ones.
    /// Nothing is published until the first [`publish`](Self::publish) or
    /// turn.
    pub fn new(id: u32, engine: Engine<B>, config: CoreConfig) -> Self {
        let s = engine.scheduler();
        let live = s
            .running_ids()
            .into_iter()
            .chain(s.waiting_ids())
            .map(|request| (request, Live { queue_us: None }))
            .collect();
        Self {
            id,
            incoming: DestinationMigration::new(config.migration.clone()),
            config,
            engine,
            live,
            draining: false,
            mailbox: VecDeque::new(),
            outgoing: BTreeMap::new(),
            incoming_peers: BTreeMap::new(),
            pending: None,
            counts_before_step: (0, 0),
            last_load: None,
            last_publish_us: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: CoreStats::default(),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn engine(&self) -> &Engine<B> {
        &self.engine
    }
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }
    pub fn is_draining(&self) -> bool {
        self.draining
    }
    /// An engine step is in flight (between `turn` and `end_step`).
    pub fn is_stepping(&self) -> bool {
        self.pending.is_some()
    }
    /// Inputs queued for the next turn.
    pub fn has_input(&self) -> bool {
        !self.mailbox.is_empty()
    }
    /// Requests served here.
    pub fn live_requests(&self) -> impl Iterator<Item = u64> + '_ {
        self.live.keys().copied()
    }
    pub fn serves(&self, request: u64) -> bool {
        self.live.contains_key(&request)
    }
    pub fn num_outgoing(&self) -> usize {
        self.outgoing.len()
    }
    pub fn num_incoming(&self) -> usize {
        self.incoming.num_incoming()
    }
    /// Whether incoming migration `migration_id` holds a reservation here
    /// (it may still send replies).
    pub fn is_incoming(&self, migration_id: MigrationId) -> bool {
        self.incoming.is_incoming(migration_id)
    }
    /// Nothing here at all: no request, no migration, no input, no step.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
            && self.engine.scheduler().is_idle()
            && self.mailbox.is_empty()
            && self.outgoing.is_empty()
            && self.incoming.num_incoming() == 0
            && self.pending.is_none()
    }
    /// Running requests a migration could move.
    pub fn migration_candidates(&self) -> Vec<MigrationCandidate> {
        let mut c = self.engine.migration_candidates();
        c.retain(|c| !self.outgoing.values().any(|o| o.sm.seq() == c.id));
        c
    }

    /// Queues an input for the next turn.
    pub fn input(&mut self, input: Input) {
        self.mailbox.push_back(input);
    }

    /// The next message for a peer.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<CoreEvent> {
        self.events.pop_front()
    }

    /// When the next turn is due if no input comes: a migration deadline,
    /// or (with no step in flight) the heartbeat snapshot.
    pub fn poll_timeout(&self) -> Option<u64> {
        let heartbeat = match (self.config.idle_publish_us, &self.pending) {
            (Some(every), None) => Some(self.last_publish_us.saturating_add(every)),
            _ => None,
        };
        self.outgoing
            .values()
            .filter_map(|o| o.sm.poll_timeout())
            .chain(self.incoming.poll_timeout())
            .chain(heartbeat)
            .min()
    }

    /// Runs what is due at `now_us`: migration timeouts and the heartbeat
    /// snapshot. Does nothing while a step is in flight (the turn after it
    /// runs them).
    pub fn handle_timeout(&mut self, now_us: u64) {
        if self.pending.is_some() {
            return;
        }
        self.timeouts(now_us);
        if self
            .config
            .idle_publish_us
            .is_some_and(|every| now_us >= self.last_publish_us.saturating_add(every))
        {
            self.publish(now_us);
        }
    }

    /// Publishes the load now.
    pub fn publish(&mut self, now_us: u64) {
        let load = self.current_load(now_us);
        self.publish_load(load);
    }

    /// What the policies see of this instance at `now_us`.
    fn current_load(&self, now_us: u64) -> InstanceLoad {
        let mut load = self.engine.load(self.id, now_us);
        load.draining |= self.draining;
        load
    }

    fn publish_load(&mut self, load: InstanceLoad) {
        self.last_publish_us = load.timestamp_us;
        self.last_load = Some(InstanceLoad {
            timestamp_us: 0,
            ..load
        });
        self.stats.snapshots += 1;
        self.events.push_back(CoreEvent::Published(load));
    }

    /// The first half of a turn alone: the queued inputs in order and due
    /// timeouts, no step. For a driver that must see what the inputs did
    /// before the step begins (the migration bench stamps a commit); the
    /// turn that follows finds nothing left to apply.
    ///
    /// Panics if a step is in flight.
    pub fn apply_inputs(&mut self, now_us: u64) {
        assert!(
            self.pending.is_none(),
            "instance {}: inputs applied while a step is in flight",
            self.id
        );
        while let Some(input) = self.mailbox.pop_front() {
            self.apply(input, now_us);
        }
        self.handle_timeout(now_us);
    }

    /// The state of outgoing migration `migration_id`, while it runs (for
    /// measurements: whether the request is still decoding here).
    pub fn outgoing_state(&self, migration_id: MigrationId) -> Option<SourceState> {
        self.outgoing.get(&migration_id).map(|o| o.sm.state())
    }

    /// One turn: the queued inputs in order, due timeouts, a snapshot if
    /// the request counts changed (before the step, so that dispatch sees
    /// new requests at once), then an engine step if there is work.
    ///
    /// Panics if a step is in flight.
    pub fn turn(&mut self, now_us: u64) -> Turn {
        self.stats.turns += 1;
        let before = self.counts();
        self.apply_inputs(now_us);
        if self.engine.scheduler().is_idle() {
            self.publish_if_changed(now_us);
            return Turn::Idle;
        }
        if self.counts() != before {
            self.publish(now_us);
        }
        self.counts_before_step = self.counts();
        match self.engine.step(now_us) {
            Ok(report) if report.batch_size == 0 => {
                self.stats.stalled_steps += 1;
                self.preempted(&report);
                self.publish_if_changed(now_us);
                Turn::Stalled
            }
            Ok(report) => {
                self.stats.steps += 1;
                // Preempted at planning, when the step begins.
                self.preempted(&report);
                let ends_us = now_us + report.duration_us;
                self.pending = Some(report);
                Turn::Stepping { ends_us }
            }
            Err(e) => {
                self.stats.step_failures += 1;
                self.events.push_back(CoreEvent::StepFailed {
                    message: e.to_string(),
                });
                self.publish_if_changed(now_us);
                Turn::Failed
            }
        }
    }

    /// Ends the step in flight at `now_us`: its tokens and finishes, the
    /// outgoing migrations' view of it, and a snapshot if the counts
    /// changed or `min_publish_gap_us` passed. Panics if none is in flight.
    pub fn end_step(&mut self, now_us: u64) {
        let report = self
            .pending
            .take()
            .unwrap_or_else(|| panic!("instance {}: end_step without a step", self.id));
        for event in report.events {
            match event {
                SeqEvent::Token { seq, token, index } => match self.live.get_mut(&seq) {
                    Some(l) => {
                        if l.queue_us.is_none() {
                            l.queue_us = self.engine.scheduler().sequence(seq).and_then(|s| {
                                s.first_scheduled_us
                                    .map(|f| f.saturating_sub(s.enqueued_us))
                            });
                        }
                        self.events.push_back(CoreEvent::Token {
                            request: seq,
                            index,
                            token,
                        });
                    }
                    None => {
                        // Nobody waits for it (cannot happen through the
                        // inputs; never let a request run unaccounted).
                        self.engine.abort(seq);
                    }
                },
                SeqEvent::Finished {
                    seq,
                    reason,
                    output_tokens,
                    ..
                } => {
                    if let Some(l) = self.live.remove(&seq) {
                        let finish = match reason {
                            llumen_engine::FinishReason::Length => Some(Finish::Length),
                            llumen_engine::FinishReason::Stop => Some(Finish::Stop),
                            llumen_engine::FinishReason::Aborted => None,
                        };
                        let event = match finish {
                            Some(reason) => CoreEvent::Finished {
                                request: seq,
                                reason,
                                output_tokens,
                                queue_us: l.queue_us.unwrap_or(0),
                            },
                            None => CoreEvent::Failed {
                                request: seq,
                                kind: FailKind::Cancelled,
                                message: "aborted by the instance".into(),
                            },
                        };
                        self.events.push_back(event);
                    }
                }
            }
        }
        // The outgoing migrations see the step (a request that finished or
        // was preempted aborts its migration).
        let ids: Vec<MigrationId> = self.outgoing.keys().copied().collect();
        for id in ids {
            if let Some(o) = self.outgoing.get_mut(&id) {
                let out = o.sm.on_engine_step(&mut self.engine, now_us);
                let peer = o.peer;
                self.send(peer, id, out);
            }
            self.settle(id);
        }
        if self.counts() != self.counts_before_step
            || now_us >= self.last_publish_us + self.config.min_publish_gap_us
        {
            self.publish(now_us);
        }
    }

    fn counts(&self) -> (usize, usize) {
        let s = self.engine.scheduler();
        (s.num_running(), s.num_waiting())
    }

    fn preempted(&mut self, report: &StepReport) {
        for &request in &report.preempted {
            self.stats.preemptions += 1;
            self.events.push_back(CoreEvent::Preempted { request });
        }
    }

    /// Publishes if the load differs from the last one published
    /// (timestamp aside).
    fn publish_if_changed(&mut self, now_us: u64) {
        let load = self.current_load(now_us);
        let changed = self.last_load
            != Some(InstanceLoad {
                timestamp_us: 0,
                ..load
            });
        if changed {
            self.publish_load(load);
        }
    }

    fn send(&mut self, peer: u32, migration_id: MigrationId, messages: Vec<MigrationMessage>) {
        for message in messages {
            self.transmits.push_back(Transmit {
                peer,
                migration_id,
                message,
            });
        }
    }

    fn apply(&mut self, input: Input, now_us: u64) {
        match input {
            Input::Assign(job) => self.admit(*job, now_us),
            Input::Cancel { request } => self.cancel(request, now_us),
            Input::SetDraining(d) => {
                self.draining = d;
                self.engine.scheduler_mut().set_draining(d);
            }
            Input::MigrateOut {
                migration_id,
                request,
                peer,
            } => self.migrate_out(migration_id, request, peer, now_us),
            Input::Message { peer, message } => self.on_message(peer, message, now_us),
            Input::LinkLost { migration_id } => {
                if let Some(o) = self.outgoing.get_mut(&migration_id) {
                    // Before detach the request just carries on; after it,
                    // it is requeued here (recompute).
                    let out = o.sm.cancel(&mut self.engine, now_us);
                    self.source_result(migration_id, out);
                } else {
                    // Unknown migrations are ignored by the destination;
                    // one committed here is aborted (a request left without
                    // a copy is placed again by whoever waits for it).
                    let abort = MigrationMessage::Abort {
                        migration_id,
                        reason: AbortReason::Cancelled,
                    };
                    // Replies have nowhere to go.
                    let _ = self.incoming.handle(&mut self.engine, abort, now_us);
                    self.destination_events();
                }
            }
        }
    }

    fn admit(&mut self, job: Assign, now_us: u64) {
        let id = job.request;
        if self.live.contains_key(&id) || self.engine.scheduler().contains(id) {
            self.events.push_back(CoreEvent::Failed {
                request: id,
                kind: FailKind::Invalid,
                message: format!("request {id} is already on instance {}", self.id),
            });
            return;
        }
        let result = if job.generated.is_empty() {
            self.engine
                .add(
                    Request {
                        id,
                        prompt: job.prompt,
                        sampling: job.sampling,
                        priority: job.priority,
                        headroom_blocks: job.headroom_blocks,
                        arrival_us: job.arrival_us,
                    },
                    now_us,
                )
                .map_err(|e| e.to_string())
        } else {
            self.resume(job, now_us)
        };
        match result {
            Ok(()) => {
                self.live.insert(id, Live { queue_us: None });
            }
            Err(message) => self.events.push_back(CoreEvent::Failed {
                request: id,
                kind: FailKind::Invalid,
                message,
            }),
        }
    }

    /// Resumes outputs generated elsewhere: prompt + outputs are recomputed
    /// and decoding continues at the next index (the sampler is keyed by
    /// index, so seeded sampling continues as it would have).
    fn resume(&mut self, job: Assign, now_us: u64) -> Result<(), String> {
        let vocab = self.engine.backend().vocab_size();
        let bad = vocab.and_then(|v| {
            job.prompt
                .iter()
                .chain(&job.generated)
                .find(|&&t| t as usize >= v)
                .copied()
        });
        if let Some(t) = bad {
            return Err(format!("token id {t} is outside the model's vocabulary"));
        }
        let block_size = self.engine.scheduler().config().block_size;
        let kv_tokens = job.prompt.len() + job.generated.len() - 1;
        let detached = DetachedSequence {
            id: job.request,
            prompt: job.prompt,
            output: job.generated,
            sampling: job.sampling,
            priority: job.priority,
            headroom_blocks: job.headroom_blocks,
            arrival_us: job.arrival_us,
            preemptions: 0,
            tokens_recomputed: 0,
            block_size,
            block_table: Vec::new(),
            kv_tokens,
        };
        self.engine
            .scheduler_mut()
            .requeue(&detached, now_us)
            .map_err(|e| e.to_string())
    }

    fn cancel(&mut self, request: u64, now_us: u64) {
        self.live.remove(&request);
        let migrating = self
            .outgoing
            .iter()
            .find(|(_, o)| o.sm.seq() == request)
            .map(|(&m, _)| m);
        match migrating {
            Some(m) => {
                let o = self.outgoing.get_mut(&m).expect("found above");
                let out = o.sm.cancel_request(&mut self.engine, now_us);
                let peer = o.peer;
                self.send(peer, m, out);
                self.settle(m);
            }
            None => {
                self.engine.abort(request);
            }
        }
    }

    fn migrate_out(&mut self, migration_id: MigrationId, request: u64, peer: u32, now_us: u64) {
        let refused = if !self.live.contains_key(&request) {
            Some(NotStarted::NotServed(request))
        } else if self.outgoing.contains_key(&migration_id) {
            Some(NotStarted::DuplicateMigration(migration_id))
        } else if self.outgoing.values().any(|o| o.sm.seq() == request) {
            Some(NotStarted::AlreadyMigrating(request))
        } else {
            None
        };
        let refused = refused.or_else(|| {
            let mut sm = SourceMigration::new(self.config.migration.clone(), migration_id, request);
            match sm.start(&mut self.engine, now_us) {
                Ok(out) => {
                    self.outgoing.insert(migration_id, Outgoing { sm, peer });
                    self.send(peer, migration_id, out);
                    None
                }
                Err(e) => Some(NotStarted::Refused {
                    request,
                    reason: e.to_string(),
                }),
            }
        });
        if let Some(why) = refused {
            self.stats.migrations_not_started += 1;
            self.events.push_back(CoreEvent::MigrationEnded {
                migration_id,
                request,
                peer,
                report: Box::new(MigrationReport::NotStarted(why)),
            });
        }
    }

    fn on_message(&mut self, peer: u32, message: MigrationMessage, now_us: u64) {
        let migration_id = message.migration_id();
        if let MigrationMessage::Reserve { seq, .. } = &message {
            // A request this instance still serves, or is moving out (its
            // copy may be detached, so the engine alone would not see it),
            // cannot come in as well: one copy per instance.
            if self.live.contains_key(seq) || self.outgoing.values().any(|o| o.sm.seq() == *seq) {
                self.send(
                    peer,
                    migration_id,
                    vec![MigrationMessage::Refused {
                        migration_id,
                        reason: RefuseReason::DuplicateSequence,
                    }],
                );
                return;
            }
        }
        if towards_destination(&message) {
            self.incoming_peers.insert(migration_id, peer);
            let replies = self.incoming.handle(&mut self.engine, message, now_us);
            self.send(peer, migration_id, replies);
            self.destination_events();
            return;
        }
        match self.outgoing.get_mut(&migration_id) {
            Some(o) => {
                let out = o.sm.handle(&mut self.engine, message, now_us);
                self.source_result(migration_id, out);
            }
            None => self.stats.messages_ignored += 1,
        }
    }

    /// What a source call returned: its messages go out; a refused message
    /// is counted (a timeout ends the migration if it must); a failed
    /// requeue arrives with the end event as a stranded request.
    fn source_result(
        &mut self,
        migration_id: MigrationId,
        out: Result<Vec<MigrationMessage>, MigrationError>,
    ) {
        match out {
            Ok(messages) => {
                let peer = self.outgoing[&migration_id].peer;
                self.send(peer, migration_id, messages);
            }
            Err(MigrationError::Requeue(_)) => {
                // The migration ended; its `Abort` could not be returned
                // with the error, so tell the destination here.
                let peer = self.outgoing[&migration_id].peer;
                self.send(
                    peer,
                    migration_id,
                    vec![MigrationMessage::Abort {
                        migration_id,
                        reason: AbortReason::SourceError,
                    }],
                );
            }
            Err(_) => self.stats.messages_refused += 1,
        }
        self.settle(migration_id);
    }

    /// Retires an outgoing migration that reported its end.
    fn settle(&mut self, migration_id: MigrationId) {
        let Some(o) = self.outgoing.get_mut(&migration_id) else {
            return;
        };
        let Some(SourceEvent::Ended { outcome, stranded }) = o.sm.poll_event() else {
            return;
        };
        let peer = o.peer;
        self.outgoing.remove(&migration_id);
        let request = outcome.seq;
        if outcome.committed() {
            // The destination streams it from now on.
            self.live.remove(&request);
            self.events.push_back(CoreEvent::MovedOut { request, peer });
        } else if let Some(detached) = stranded {
            self.live.remove(&request);
            self.events
                .push_back(CoreEvent::Stranded(Box::new(Assign::from_detached(
                    *detached,
                ))));
        } else if !self.engine.scheduler().contains(request) {
            // Finished or cancelled during the migration (its end was
            // reported, or nobody waits for it).
            self.live.remove(&request);
        }
        self.events.push_back(CoreEvent::MigrationEnded {
            migration_id,
            request,
            peer,
            report: Box::new(MigrationReport::Ended(outcome)),
        });
    }

    /// Acts on what the destination side did.
    fn destination_events(&mut self) {
        while let Some(event) = self.incoming.poll_event() {
            match event {
                DestinationEvent::Committed {
                    migration_id, seq, ..
                } => {
                    let peer = self
                        .incoming_peers
                        .get(&migration_id)
                        .copied()
                        .unwrap_or(u32::MAX);
                    self.live.insert(seq, Live { queue_us: Some(0) });
                    self.events.push_back(CoreEvent::MovedIn {
                        request: seq,
                        peer,
                        migration_id,
                    });
                }
                DestinationEvent::AbortedAfterCommit { seq, .. } => {
                    if self.live.remove(&seq).is_some() {
                        self.events
                            .push_back(CoreEvent::MoveInRevoked { request: seq });
                    }
                }
                DestinationEvent::Released { .. } | DestinationEvent::Reserved { .. } => {}
            }
        }
        let incoming = &self.incoming;
        self.incoming_peers
            .retain(|id, _| incoming.is_incoming(*id));
    }

    /// Migration deadlines that passed.
    fn timeouts(&mut self, now_us: u64) {
        let due: Vec<MigrationId> = self
            .outgoing
            .iter()
            .filter(|(_, o)| o.sm.poll_timeout().is_some_and(|d| d <= now_us))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(o) = self.outgoing.get_mut(&id) {
                let out = o.sm.handle_timeout(&mut self.engine, now_us);
                self.source_result(id, out);
            }
        }
        if self.incoming.poll_timeout().is_some_and(|d| d <= now_us) {
            self.incoming.handle_timeout(&mut self.engine, now_us);
            self.destination_events();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llumen_engine::{LatencyModelBackend, LatencyProfile};

    fn core(id: u32) -> InstanceCore<LatencyModelBackend> {
        let profile = LatencyProfile::shipped_llama7b_a10_derived();
        let engine = Engine::new(
            profile.scheduler_config_for(64),
            LatencyModelBackend::new(profile),
        )
        .unwrap();
        let config = CoreConfig {
            idle_publish_us: None,
            ..CoreConfig::default()
        };
        InstanceCore::new(id, engine, config)
    }

    fn assign(request: u64, prompt: usize, max_tokens: u32) -> Input {
        Input::Assign(Box::new(Assign {
            request,
            prompt: vec![7; prompt],
            generated: Vec::new(),
            sampling: SamplingParams::greedy(max_tokens),
            priority: 0,
            headroom_blocks: 0,
            arrival_us: 0,
        }))
    }

    fn events(c: &mut InstanceCore<LatencyModelBackend>) -> Vec<CoreEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn not_started(events: &[CoreEvent]) -> Vec<NotStarted> {
        events
            .iter()
            .filter_map(|e| match e {
                CoreEvent::MigrationEnded { report, .. } => match report.as_ref() {
                    MigrationReport::NotStarted(why) => Some(why.clone()),
                    MigrationReport::Ended(_) => None,
                },
                _ => None,
            })
            .collect()
    }

    /// A step's effects land at its end: nothing before `end_step`, the
    /// tokens after it; the step ends at its modelled duration.
    #[test]
    fn a_step_lands_at_its_end() {
        let mut c = core(0);
        c.input(assign(1, 32, 2));
        let Turn::Stepping { ends_us } = c.turn(1_000) else {
            panic!("a request to prefill")
        };
        assert!(ends_us > 1_000);
        assert!(c.is_stepping());
        assert!(!events(&mut c)
            .iter()
            .any(|e| matches!(e, CoreEvent::Token { .. })));
        c.input(Input::Cancel { request: 99 });
        assert!(c.has_input(), "inputs wait while the step is in flight");
        c.end_step(ends_us);
        let ev = events(&mut c);
        assert!(ev.contains(&CoreEvent::Token {
            request: 1,
            index: 0,
            token: match ev.iter().find_map(|e| match e {
                CoreEvent::Token { token, .. } => Some(*token),
                _ => None,
            }) {
                Some(t) => t,
                None => panic!("no token in {ev:?}"),
            }
        }));
    }

    /// The one rule for starting a migration out: the request is served
    /// here, running between steps, and not already leaving; every refusal
    /// is reported as the migration's end, with its reason.
    #[test]
    fn migrate_out_starts_only_for_a_running_request_served_here() {
        let mut c = core(0);
        c.input(assign(1, 32, 50));
        c.input(assign(2, 32, 50));
        let Turn::Stepping { ends_us } = c.turn(0) else {
            panic!()
        };
        c.end_step(ends_us);
        events(&mut c);
        let now = ends_us;
        for input in [
            // Not served here.
            Input::MigrateOut {
                migration_id: 1,
                request: 9,
                peer: 1,
            },
            // Starts.
            Input::MigrateOut {
                migration_id: 2,
                request: 1,
                peer: 1,
            },
            // Already leaving.
            Input::MigrateOut {
                migration_id: 3,
                request: 1,
                peer: 1,
            },
            // The id of a migration in flight.
            Input::MigrateOut {
                migration_id: 2,
                request: 2,
                peer: 1,
            },
        ] {
            c.input(input);
        }
        c.apply_inputs(now);
        assert_eq!(
            not_started(&events(&mut c)),
            vec![
                NotStarted::NotServed(9),
                NotStarted::AlreadyMigrating(1),
                NotStarted::DuplicateMigration(2),
            ]
        );
        assert_eq!(c.num_outgoing(), 1);
        let reserve = c.poll_transmit().expect("Reserve for migration 2");
        assert_eq!((reserve.peer, reserve.migration_id), (1, 2));
        assert!(!reserve.to_source());
        assert!(
            !c.migration_candidates().iter().any(|m| m.id == 1),
            "a leaving request is no candidate"
        );
        // A request still waiting (not running) is refused by the machine.
        c.input(assign(3, 32, 10));
        c.input(Input::MigrateOut {
            migration_id: 4,
            request: 3,
            peer: 1,
        });
        c.apply_inputs(now);
        assert!(matches!(
            not_started(&events(&mut c)).as_slice(),
            [NotStarted::Refused { request: 3, .. }]
        ));
        // The link of the started one breaks before detach: the request
        // carries on here and the migration ends, once.
        c.input(Input::LinkLost { migration_id: 2 });
        c.apply_inputs(now);
        let ended: Vec<_> = events(&mut c)
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    CoreEvent::MigrationEnded {
                        migration_id: 2,
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(ended.len(), 1);
        assert!(c.serves(1) && c.num_outgoing() == 0);
    }
}
