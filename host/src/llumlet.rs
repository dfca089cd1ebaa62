//! The llumlet: one instance's agent. It owns an [`Engine`] on a thread of
//! its own, drives its step loop, streams each request's tokens to the
//! request's channel, publishes a load snapshot after every step, and
//! applies the manager's decisions (new requests, cancellations, draining,
//! live migrations). It runs the engine's migration state machines on the
//! same thread, between two steps: a [`SourceMigration`] per request leaving
//! and one [`DestinationMigration`] for those coming in; their encoded
//! messages travel through [`MigrationLink`]s (QUIC streams, see
//! [`crate::migration`]).
//!
//! Invariants: every request handed to [`Llumlet::assign`] ends with exactly
//! one `Finished` or `Failed` event, unless its receiver was dropped (then
//! the request is aborted and its blocks freed at the next loop turn); tokens
//! are sent in index order, once each.
//!
//! API boundary: the llumlet talks to the engine only through its public
//! step/load API, and to the rest of the host only through channels and the
//! snapshot callback (migration messages leave as encoded bytes). It never
//! touches sockets, policies or sled.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use llumen_engine::{
    DestinationEvent, DestinationMigration, DetachedSequence, Engine, MigrationConfig, MigrationId,
    MigrationMessage, MigrationOutcome, ModelBackend, Request, SamplingParams, SeqEvent,
    SourceMigration,
};
use llumen_policy_logic::{InstanceLoad, MigrationCandidate};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::api::{ErrorCode, FinishReason, ServeError};
use crate::clock;
use crate::protocol::Assignment;

/// What a request's channel receives from its instance.
#[derive(Clone, Debug, PartialEq)]
pub enum InstanceEvent {
    /// Output token `index`.
    Token { index: u32, id: u32 },
    /// The request finished on this instance.
    Finished {
        reason: FinishReason,
        output_tokens: u32,
        /// Enqueued here → first scheduled, microseconds.
        queue_us: u64,
    },
    /// The instance could not serve it (a clear reason; nothing follows
    /// from it). `Unavailable`: the instance stopped or was lost; the
    /// request is placed again.
    Failed(ServeError),
    /// The request now runs on `instance` (a live migration committed);
    /// its tokens continue from there.
    Moved { instance: u32 },
    /// The request migrated away from the instance this channel served
    /// (sent by a joined instance's route book; the manager parks the
    /// channel until the destination claims it).
    MovedAway,
}

/// Encoded migration messages to the other side of one migration.
pub type MigrationLink = tmpsc::UnboundedSender<Vec<u8>>;

/// How a request's event stream follows it across a live migration.
pub trait RouteBook: Send + Sync {
    /// A request migrated in and committed here: the sender its events go
    /// to from now on (`None`: nobody waits for it any more).
    fn claim(&self, request: u64, instance: u32) -> Option<EventSender>;
    /// A request migrated out of here: hands its sender over until the
    /// destination claims it.
    fn park(&self, request: u64, events: EventSender);
}

/// The route book a llumlet uses.
pub type Routes = Arc<dyn RouteBook>;

/// What an outgoing migration did, for the manager (and over the wire for
/// joined instances).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationSummary {
    pub committed: bool,
    /// The engine's result, in words.
    pub result: String,
    /// Detach → commit (or → requeue), µs.
    pub downtime_us: Option<u64>,
    pub total_us: u64,
    pub blocks_per_stage: Vec<u32>,
    pub bytes: u64,
}

impl From<&MigrationOutcome> for MigrationSummary {
    fn from(o: &MigrationOutcome) -> Self {
        Self {
            committed: o.committed(),
            result: format!("{:?}", o.result),
            downtime_us: o.downtime_us,
            total_us: o.finished_us.saturating_sub(o.started_us),
            blocks_per_stage: o.blocks_per_stage(),
            bytes: o.bytes_copied(),
        }
    }
}

/// How an outgoing migration ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MigrationReport {
    /// The state machine ran to its end.
    Ended(MigrationSummary),
    /// It could not start (request not running here, already migrating…).
    NotStarted(String),
}

/// The sender half a request's events go to.
pub type EventSender = tmpsc::UnboundedSender<InstanceEvent>;

enum Command {
    Assign(Assignment, EventSender),
    SetDraining(bool),
    Candidates(oneshot::Sender<Vec<MigrationCandidate>>),
    MigrateOut {
        migration_id: MigrationId,
        seq: u64,
        link: MigrationLink,
        done: oneshot::Sender<MigrationReport>,
    },
    FromDestination {
        migration_id: MigrationId,
        bytes: Vec<u8>,
    },
    LinkLost {
        migration_id: MigrationId,
    },
    FromSource {
        bytes: Vec<u8>,
        reply: MigrationLink,
    },
    IncomingLost {
        migration_id: MigrationId,
    },
    Stop,
}

/// A cloneable way to post migration traffic into a llumlet.
#[derive(Clone)]
pub struct Mailbox {
    instance: u32,
    commands: mpsc::Sender<Command>,
}

impl Mailbox {
    pub fn instance(&self) -> u32 {
        self.instance
    }

    /// Starts migrating request `seq` out; its messages go to `link`.
    pub fn migrate_out(
        &self,
        migration_id: MigrationId,
        seq: u64,
        link: MigrationLink,
    ) -> oneshot::Receiver<MigrationReport> {
        let (done, rx) = oneshot::channel();
        let _ = self.commands.send(Command::MigrateOut {
            migration_id,
            seq,
            link,
            done,
        });
        rx
    }

    /// A message from the destination of an outgoing migration.
    pub fn from_destination(&self, migration_id: MigrationId, bytes: Vec<u8>) {
        let _ = self.commands.send(Command::FromDestination {
            migration_id,
            bytes,
        });
    }

    /// The link of an outgoing migration broke.
    pub fn link_lost(&self, migration_id: MigrationId) {
        let _ = self.commands.send(Command::LinkLost { migration_id });
    }

    /// The stream of incoming migration `migration_id` broke: it is aborted
    /// here (a committed copy included: the source may never have heard of
    /// the commit, and a request left without any copy is placed again by
    /// its relay).
    pub fn incoming_lost(&self, migration_id: MigrationId) {
        let _ = self.commands.send(Command::IncomingLost { migration_id });
    }

    /// A message from the source of an incoming migration; replies go to
    /// `reply`. False when the llumlet has stopped.
    pub fn from_source(&self, bytes: Vec<u8>, reply: MigrationLink) -> bool {
        self.commands
            .send(Command::FromSource { bytes, reply })
            .is_ok()
    }
}

/// Called with every snapshot the llumlet publishes.
pub type LoadSink = Box<dyn Fn(InstanceLoad) + Send + 'static>;

/// Handle to a running llumlet.
pub struct Llumlet {
    instance: u32,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

/// How often an idle llumlet still publishes its load.
const IDLE_PUBLISH: Duration = Duration::from_millis(500);
/// How long a llumlet whose last step scheduled nothing waits for news.
const STALL_WAIT: Duration = Duration::from_millis(1);
/// Shortest gap between two snapshots of a busy instance whose request
/// counts did not change.
const MIN_PUBLISH_GAP: Duration = Duration::from_millis(5);

impl Llumlet {
    /// Starts the step loop of `engine` as instance `instance` on its own
    /// thread; every snapshot goes to `sink`.
    pub fn spawn<B: ModelBackend + Send + 'static>(
        instance: u32,
        engine: Engine<B>,
        sink: LoadSink,
        routes: Routes,
        migration: MigrationConfig,
    ) -> std::io::Result<Self> {
        let (commands, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("llumlet-{instance}"))
            .spawn(move || StepLoop::new(instance, engine, sink, routes, migration).run(rx))?;
        Ok(Self {
            instance,
            commands,
            thread: Some(thread),
        })
    }

    pub fn instance(&self) -> u32 {
        self.instance
    }

    /// Where migration traffic for this instance goes.
    pub fn mailbox(&self) -> Mailbox {
        Mailbox {
            instance: self.instance,
            commands: self.commands.clone(),
        }
    }

    /// Queues a request; its events go to `events`. Fails when the llumlet
    /// has stopped (the caller dispatches elsewhere).
    pub fn assign(&self, job: Assignment, events: EventSender) -> Result<(), ServeError> {
        self.commands
            .send(Command::Assign(job, events))
            .map_err(|_| {
                ServeError::new(
                    ErrorCode::Unavailable,
                    format!("instance {} has stopped", self.instance),
                )
            })
    }

    /// Marks the instance draining (its snapshots say so) or not.
    pub fn set_draining(&self, draining: bool) {
        let _ = self.commands.send(Command::SetDraining(draining));
    }

    /// Running requests a migration could move.
    pub async fn migration_candidates(&self) -> Vec<MigrationCandidate> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Candidates(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Stops the loop; requests still on it are dropped without a final
    /// event (their relays see the channel close and re-dispatch them).
    pub fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
    }
}

impl Drop for Llumlet {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Live {
    events: EventSender,
    /// Enqueued → first scheduled here, read when the first token comes.
    queue_us: Option<u64>,
}

struct Outgoing {
    sm: SourceMigration,
    link: MigrationLink,
    done: Option<oneshot::Sender<MigrationReport>>,
}

struct StepLoop<B: ModelBackend> {
    instance: u32,
    engine: Engine<B>,
    sink: LoadSink,
    live: HashMap<u64, Live>,
    draining: bool,
    last_publish_us: u64,
    routes: Routes,
    migration: MigrationConfig,
    outgoing: HashMap<MigrationId, Outgoing>,
    incoming: DestinationMigration,
    /// Reply links of incoming migrations.
    replies: HashMap<MigrationId, MigrationLink>,
    /// The last step scheduled nothing although requests wait.
    stalled: bool,
}

impl<B: ModelBackend> Drop for StepLoop<B> {
    /// However the loop ends (stopped, or a panic), every request still here
    /// is told, so its relay places it again.
    fn drop(&mut self) {
        for (_, l) in self.live.drain() {
            let _ = l.events.send(InstanceEvent::Failed(ServeError::new(
                ErrorCode::Unavailable,
                format!("instance {} stopped", self.instance),
            )));
        }
        for (_, mut o) in self.outgoing.drain() {
            if let Some(done) = o.done.take() {
                let _ = done.send(MigrationReport::NotStarted(
                    "the source instance stopped".into(),
                ));
            }
        }
    }
}

fn send_all(link: &MigrationLink, messages: Vec<MigrationMessage>) {
    for m in messages {
        let _ = link.send(m.encode());
    }
}

impl<B: ModelBackend> StepLoop<B> {
    fn new(
        instance: u32,
        engine: Engine<B>,
        sink: LoadSink,
        routes: Routes,
        migration: MigrationConfig,
    ) -> Self {
        Self {
            instance,
            engine,
            sink,
            live: HashMap::new(),
            draining: false,
            last_publish_us: 0,
            routes,
            incoming: DestinationMigration::new(migration.clone()),
            migration,
            outgoing: HashMap::new(),
            replies: HashMap::new(),
            stalled: false,
        }
    }

    /// The next migration deadline, if any.
    fn next_deadline(&self) -> Option<u64> {
        self.outgoing
            .values()
            .filter_map(|o| o.sm.poll_timeout())
            .chain(self.incoming.poll_timeout())
            .min()
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        self.publish();
        loop {
            // Counts before this turn's commands: new requests are
            // published before the step, so that the dispatcher sees them
            // now rather than a step later (load-based dispatch would
            // otherwise herd every arrival of a step onto one instance).
            let before_commands = self.counts();
            // Nothing to step (or nothing could be scheduled last time:
            // requests waiting for blocks held elsewhere): block until a
            // command arrives, a migration deadline passes, or it is time
            // for a heartbeat snapshot, instead of spinning.
            let stalled = std::mem::take(&mut self.stalled);
            if stalled || self.engine.scheduler().is_idle() {
                // Waiting: wake promptly for a migration's commit or a new
                // request even while other engines compute.
                crate::threads::latency_critical();
                let now = clock::now_us();
                let mut wait = if stalled { STALL_WAIT } else { IDLE_PUBLISH };
                if let Some(d) = self.next_deadline() {
                    wait = wait.min(Duration::from_micros(d.saturating_sub(now)));
                }
                match rx.recv_timeout(wait) {
                    Ok(cmd) => {
                        if !self.apply(cmd) {
                            return;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.timeouts();
                        if clock::now_us() >= self.last_publish_us + IDLE_PUBLISH.as_micros() as u64
                        {
                            self.publish();
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !self.apply(cmd) {
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            self.timeouts();
            self.reap_cancelled();
            let before = self.counts();
            if before != before_commands {
                self.publish();
            }
            if !self.engine.scheduler().is_idle() {
                crate::threads::compute();
                self.step();
                self.after_step();
            }
            // A snapshot after every step that changed what policies see
            // (requests running or waiting), else at most every
            // `MIN_PUBLISH_GAP` (fast steps would flood the store).
            if self.counts() != before
                || clock::now_us() >= self.last_publish_us + MIN_PUBLISH_GAP.as_micros() as u64
            {
                self.publish();
            }
        }
    }

    /// Applies one command; false to stop.
    fn apply(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Assign(job, events) => self.admit(job, events),
            Command::SetDraining(d) => {
                self.draining = d;
                self.engine.scheduler_mut().set_draining(d);
            }
            Command::Candidates(reply) => {
                let _ = reply.send(self.engine.migration_candidates());
            }
            Command::MigrateOut {
                migration_id,
                seq,
                link,
                done,
            } => self.migrate_out(migration_id, seq, link, done),
            Command::FromDestination {
                migration_id,
                bytes,
            } => {
                let now = clock::now_us();
                if let Some(o) = self.outgoing.get_mut(&migration_id) {
                    match MigrationMessage::decode(&bytes) {
                        Ok(message) => match o.sm.handle(&mut self.engine, message, now) {
                            Ok(out) => send_all(&o.link, out),
                            Err(e) => {
                                tracing::warn!(instance = self.instance, migration_id, error = %e, "migration message refused")
                            }
                        },
                        Err(e) => {
                            tracing::warn!(instance = self.instance, migration_id, error = %e, "undecodable migration message");
                            if let Ok(out) = o.sm.cancel(&mut self.engine, now) {
                                send_all(&o.link, out);
                            }
                        }
                    }
                }
                self.settle(migration_id);
            }
            Command::LinkLost { migration_id } => {
                if let Some(o) = self.outgoing.get_mut(&migration_id) {
                    // Before detach the request just carries on; after it,
                    // it is requeued here (recompute).
                    let _ = o.sm.cancel(&mut self.engine, clock::now_us());
                }
                self.settle(migration_id);
            }
            Command::FromSource { bytes, reply } => self.on_source_message(bytes, reply),
            Command::IncomingLost { migration_id } => {
                let abort = MigrationMessage::Abort {
                    migration_id,
                    reason: llumen_engine::AbortReason::Cancelled,
                };
                let _ = self
                    .incoming
                    .handle(&mut self.engine, abort, clock::now_us());
                self.replies.remove(&migration_id);
                self.destination_events();
            }
            Command::Stop => return false,
        }
        true
    }

    fn migrate_out(
        &mut self,
        migration_id: MigrationId,
        seq: u64,
        link: MigrationLink,
        done: oneshot::Sender<MigrationReport>,
    ) {
        let refuse = |done: oneshot::Sender<MigrationReport>, why: String| {
            let _ = done.send(MigrationReport::NotStarted(why));
        };
        if !self.live.contains_key(&seq) {
            return refuse(done, format!("request {seq} is not served here"));
        }
        if self.outgoing.values().any(|o| o.sm.seq() == seq)
            || self.outgoing.contains_key(&migration_id)
        {
            return refuse(done, format!("request {seq} is already migrating"));
        }
        let mut sm = SourceMigration::new(self.migration.clone(), migration_id, seq);
        match sm.start(&mut self.engine, clock::now_us()) {
            Ok(out) => {
                send_all(&link, out);
                self.outgoing.insert(
                    migration_id,
                    Outgoing {
                        sm,
                        link,
                        done: Some(done),
                    },
                );
            }
            Err(e) => refuse(done, e.to_string()),
        }
    }

    fn on_source_message(&mut self, bytes: Vec<u8>, reply: MigrationLink) {
        let message = match MigrationMessage::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(instance = self.instance, error = %e, "undecodable incoming migration message");
                return;
            }
        };
        let id = message.migration_id();
        self.replies.insert(id, reply);
        let out = self
            .incoming
            .handle(&mut self.engine, message, clock::now_us());
        if let Some(link) = self.replies.get(&id) {
            send_all(link, out);
        }
        self.destination_events();
    }

    /// Acts on what the destination side did.
    fn destination_events(&mut self) {
        while let Some(event) = self.incoming.poll_event() {
            match event {
                DestinationEvent::Committed {
                    migration_id, seq, ..
                } => {
                    self.replies.remove(&migration_id);
                    match self.routes.claim(seq, self.instance) {
                        Some(events) => {
                            self.live.insert(
                                seq,
                                Live {
                                    events,
                                    queue_us: Some(0),
                                },
                            );
                        }
                        None => {
                            // Its client is gone: nobody to stream to.
                            self.engine.abort(seq);
                        }
                    }
                }
                DestinationEvent::AbortedAfterCommit {
                    migration_id, seq, ..
                } => {
                    // The source kept the request after all (it never heard
                    // `Committed`); this copy is gone.
                    self.replies.remove(&migration_id);
                    self.live.remove(&seq);
                }
                DestinationEvent::Released { migration_id, .. } => {
                    self.replies.remove(&migration_id);
                }
                DestinationEvent::Reserved { .. } => {}
            }
        }
    }

    /// Migration deadlines that passed.
    fn timeouts(&mut self) {
        let now = clock::now_us();
        let due: Vec<MigrationId> = self
            .outgoing
            .iter()
            .filter(|(_, o)| o.sm.poll_timeout().is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(o) = self.outgoing.get_mut(&id) {
                if let Ok(out) = o.sm.handle_timeout(&mut self.engine, now) {
                    send_all(&o.link, out);
                }
            }
            self.settle(id);
        }
        if self.incoming.poll_timeout().is_some_and(|d| d <= now) {
            self.incoming.handle_timeout(&mut self.engine, now);
            self.destination_events();
        }
    }

    /// After a step: the outgoing migrations see what it did.
    fn after_step(&mut self) {
        let now = clock::now_us();
        let ids: Vec<MigrationId> = self.outgoing.keys().copied().collect();
        for id in ids {
            if let Some(o) = self.outgoing.get_mut(&id) {
                let out = o.sm.on_engine_step(&mut self.engine, now);
                send_all(&o.link, out);
            }
            self.settle(id);
        }
    }

    /// Retires an outgoing migration that reached its end.
    fn settle(&mut self, id: MigrationId) {
        let ended = self
            .outgoing
            .get(&id)
            .is_some_and(|o| o.sm.state().is_terminal());
        if !ended {
            return;
        }
        let mut o = self.outgoing.remove(&id).expect("checked above");
        let outcome =
            o.sm.outcome()
                .cloned()
                .expect("a terminal migration has an outcome");
        if outcome.committed() {
            // The destination streams it from now on; its channel is handed
            // over until the destination claims it.
            if let Some(l) = self.live.remove(&outcome.seq) {
                self.routes.park(outcome.seq, l.events);
            }
        } else if !self.engine.scheduler().contains(outcome.seq) {
            // Finished or cancelled during the migration.
            if let Some(l) = self.live.remove(&outcome.seq) {
                if !l.events.is_closed() {
                    tracing::debug!(seq = outcome.seq, "request ended during its migration");
                }
            }
        }
        if let Some(done) = o.done.take() {
            let _ = done.send(MigrationReport::Ended(MigrationSummary::from(&outcome)));
        }
    }

    fn admit(&mut self, job: Assignment, events: EventSender) {
        let now = clock::now_us();
        let id = job.request_id;
        if self.live.contains_key(&id) {
            let _ = events.send(InstanceEvent::Failed(ServeError::new(
                ErrorCode::Internal,
                format!("request {id} is already on instance {}", self.instance),
            )));
            return;
        }
        let sampling = SamplingParams {
            temperature: job.temperature,
            top_p: job.top_p,
            seed: job.seed,
            max_tokens: job.max_tokens,
            stop_token_ids: job.stop_token_ids.clone(),
        };
        let result = if job.generated.is_empty() {
            self.engine
                .add(
                    Request {
                        id,
                        prompt: job.prompt,
                        sampling,
                        priority: job.priority,
                        headroom_blocks: job.headroom_blocks,
                        arrival_us: now,
                    },
                    now,
                )
                .map_err(|e| e.to_string())
        } else {
            // Resuming elsewhere-generated output: recompute prompt + output
            // and continue at the next index (the sampler is keyed by index,
            // so seeded sampling continues as it would have).
            let vocab = self.engine.backend().vocab_size();
            let bad = vocab.and_then(|v| {
                job.prompt
                    .iter()
                    .chain(&job.generated)
                    .find(|&&t| t as usize >= v)
                    .copied()
            });
            match bad {
                Some(t) => Err(format!("token id {t} is outside the model's vocabulary")),
                None => {
                    let block_size = self.engine.scheduler().config().block_size;
                    let kv_tokens = job.prompt.len() + job.generated.len() - 1;
                    let detached = DetachedSequence {
                        id,
                        prompt: job.prompt,
                        output: job.generated,
                        sampling,
                        priority: job.priority,
                        headroom_blocks: job.headroom_blocks,
                        arrival_us: now,
                        preemptions: 0,
                        tokens_recomputed: 0,
                        block_size,
                        block_table: Vec::new(),
                        kv_tokens,
                    };
                    self.engine
                        .scheduler_mut()
                        .requeue(&detached, now)
                        .map_err(|e| e.to_string())
                }
            }
        };
        match result {
            Ok(()) => {
                self.live.insert(
                    id,
                    Live {
                        events,
                        queue_us: None,
                    },
                );
            }
            Err(message) => {
                let _ = events.send(InstanceEvent::Failed(ServeError::new(
                    ErrorCode::InvalidParameter,
                    message,
                )));
            }
        }
    }

    /// Aborts requests nobody listens to any more (client gone, manager
    /// moved them): their blocks are freed now.
    fn reap_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, l)| l.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        let now = clock::now_us();
        for id in gone {
            self.live.remove(&id);
            let migrating = self
                .outgoing
                .iter()
                .find(|(_, o)| o.sm.seq() == id)
                .map(|(&m, _)| m);
            match migrating {
                Some(m) => {
                    let o = self.outgoing.get_mut(&m).expect("found above");
                    let out = o.sm.cancel_request(&mut self.engine, now);
                    send_all(&o.link, out);
                    self.settle(m);
                }
                None => {
                    self.engine.abort(id);
                }
            }
        }
    }

    fn step(&mut self) {
        let now = clock::now_us();
        match self.engine.step(now) {
            Ok(report) => {
                self.stalled = report.batch_size == 0;
                for event in report.events {
                    match event {
                        SeqEvent::Token { seq, token, index } => {
                            if let Some(l) = self.live.get_mut(&seq) {
                                if l.queue_us.is_none() {
                                    l.queue_us =
                                        self.engine.scheduler().sequence(seq).and_then(|s| {
                                            s.first_scheduled_us
                                                .map(|f| f.saturating_sub(s.enqueued_us))
                                        });
                                }
                                if l.events
                                    .send(InstanceEvent::Token { index, id: token })
                                    .is_err()
                                {
                                    self.engine.abort(seq);
                                    self.live.remove(&seq);
                                }
                            }
                        }
                        SeqEvent::Finished {
                            seq,
                            reason,
                            output_tokens,
                            ..
                        } => {
                            if let Some(l) = self.live.remove(&seq) {
                                let queue_us = l.queue_us.unwrap_or(0);
                                let reason = match reason {
                                    llumen_engine::FinishReason::Length => {
                                        Some(FinishReason::Length)
                                    }
                                    llumen_engine::FinishReason::Stop => Some(FinishReason::Stop),
                                    llumen_engine::FinishReason::Aborted => None,
                                };
                                let event = match reason {
                                    Some(reason) => InstanceEvent::Finished {
                                        reason,
                                        output_tokens,
                                        queue_us,
                                    },
                                    None => InstanceEvent::Failed(ServeError::new(
                                        ErrorCode::Cancelled,
                                        "aborted by the instance",
                                    )),
                                };
                                let _ = l.events.send(event);
                            }
                        }
                    }
                }
            }
            Err(e) => {
                // The engine requeued the step's sequences (recompute):
                // nothing is lost; back off a little so a persistent
                // failure does not spin.
                tracing::error!(instance = self.instance, error = %e, "engine step failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn counts(&self) -> (usize, usize) {
        let s = self.engine.scheduler();
        (s.num_running(), s.num_waiting())
    }

    fn publish(&mut self) {
        let now = clock::now_us();
        let mut load = self.engine.load(self.instance, now);
        load.draining = self.draining;
        self.last_publish_us = now;
        (self.sink)(load);
    }
}
