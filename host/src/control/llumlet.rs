//! The llumlet: one instance's agent, a thread + channels shell over the
//! fleet core's [`InstanceCore`] (the instance's turn: requests, engine
//! steps, live migrations, load snapshots — the very code the simulator
//! runs). The shell owns what the core must not: the thread and its
//! waiting (for a command, a deadline or the heartbeat, by the wall
//! clock), each request's event channel, the migration links (encoded
//! messages through QUIC streams, see [`crate::transport::migration`]) and
//! the route book a migrated request's stream follows.
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
    Engine, MigrationConfig, MigrationId, MigrationMessage, MigrationOutcome, ModelBackend,
    SamplingParams,
};
use llumen_fleet::{Assign, CoreConfig, CoreEvent, FailKind, Finish, Input, InstanceCore, Turn};
use llumen_policy_logic::{InstanceLoad, MigrationCandidate};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::front::api::{ErrorCode, FinishReason, ServeError};
use crate::process::clock;
use crate::transport::protocol::Assignment;

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

/// How often an idle llumlet still publishes its load (the core's
/// heartbeat), and the longest it waits without a look at its channels.
const IDLE_PUBLISH: Duration = Duration::from_millis(500);
/// Pause after an engine step failed (its sequences were requeued), so a
/// persistent failure does not spin.
const FAILED_STEP_PAUSE: Duration = Duration::from_millis(10);
/// The peer id the core is given: the llumlet addresses peers by link, not
/// by instance id.
const LINKED_PEER: u32 = u32::MAX;

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

/// An outgoing migration's link and who waits for its end.
struct OutLink {
    link: MigrationLink,
    done: Option<oneshot::Sender<MigrationReport>>,
}

struct StepLoop<B: ModelBackend> {
    core: InstanceCore<B>,
    sink: LoadSink,
    routes: Routes,
    /// The event channel of every request served here.
    senders: HashMap<u64, EventSender>,
    outgoing: HashMap<MigrationId, OutLink>,
    /// Reply links of incoming migrations.
    replies: HashMap<MigrationId, MigrationLink>,
}

impl<B: ModelBackend> Drop for StepLoop<B> {
    /// However the loop ends (stopped, or a panic), every request still here
    /// is told, so its relay places it again.
    fn drop(&mut self) {
        let instance = self.core.id();
        for (_, events) in self.senders.drain() {
            let _ = events.send(InstanceEvent::Failed(ServeError::new(
                ErrorCode::Unavailable,
                format!("instance {instance} stopped"),
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

impl<B: ModelBackend> StepLoop<B> {
    fn new(
        instance: u32,
        engine: Engine<B>,
        sink: LoadSink,
        routes: Routes,
        migration: MigrationConfig,
    ) -> Self {
        let config = CoreConfig {
            migration,
            idle_publish_us: Some(IDLE_PUBLISH.as_micros() as u64),
            ..CoreConfig::default()
        };
        Self {
            core: InstanceCore::new(instance, engine, config),
            sink,
            routes,
            senders: HashMap::new(),
            outgoing: HashMap::new(),
            replies: HashMap::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        self.core.publish(clock::now_us());
        self.flush();
        let mut last = Turn::Idle;
        loop {
            // Nothing to step, or nothing could be scheduled (requests
            // waiting for blocks held elsewhere): block until a command
            // arrives or the core's next deadline (a migration timeout, the
            // heartbeat) instead of spinning.
            let waits = !matches!(last, Turn::Stepping { .. }) && !self.core.has_input();
            if waits {
                // Waiting: wake promptly for a migration's commit or a new
                // request even while other engines compute.
                crate::process::threads::latency_critical();
                let now = clock::now_us();
                let wait = match last {
                    Turn::Failed => FAILED_STEP_PAUSE,
                    _ => self
                        .core
                        .poll_timeout()
                        .map_or(IDLE_PUBLISH, |d| {
                            Duration::from_micros(d.saturating_sub(now))
                        })
                        .min(IDLE_PUBLISH),
                };
                match rx.recv_timeout(wait) {
                    Ok(cmd) => {
                        if !self.apply(cmd) {
                            return;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
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
            self.reap_cancelled();
            crate::process::threads::compute();
            last = self.core.turn(clock::now_us());
            if let Turn::Stepping { ends_us } = last {
                // The step ran inside the turn and ends at its end: now for
                // a model (its duration was measured), later for a latency
                // profile (modelled: the instance is busy until then, its
                // commands wait, as the simulator's do).
                let now = clock::now_us();
                if ends_us > now {
                    std::thread::sleep(Duration::from_micros(ends_us - now));
                }
                self.core.end_step(clock::now_us());
            }
            self.flush();
        }
    }

    /// Applies one command; false to stop.
    fn apply(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Assign(job, events) => self.admit(job, events),
            Command::SetDraining(d) => self.core.input(Input::SetDraining(d)),
            Command::Candidates(reply) => {
                let _ = reply.send(self.core.migration_candidates());
            }
            Command::MigrateOut {
                migration_id,
                seq,
                link,
                done,
            } => match self.outgoing.entry(migration_id) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    let _ = done.send(MigrationReport::NotStarted(format!(
                        "migration {migration_id} is already in flight here"
                    )));
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(OutLink {
                        link,
                        done: Some(done),
                    });
                    self.core.input(Input::MigrateOut {
                        migration_id,
                        request: seq,
                        peer: LINKED_PEER,
                    });
                }
            },
            Command::FromDestination {
                migration_id,
                bytes,
            } => match MigrationMessage::decode(&bytes) {
                Ok(message) => self.core.input(Input::Message {
                    peer: LINKED_PEER,
                    message,
                }),
                Err(e) => {
                    tracing::warn!(instance = self.core.id(), migration_id, error = %e, "undecodable migration message");
                    self.core.input(Input::LinkLost { migration_id });
                }
            },
            Command::LinkLost { migration_id } | Command::IncomingLost { migration_id } => {
                self.core.input(Input::LinkLost { migration_id })
            }
            Command::FromSource { bytes, reply } => match MigrationMessage::decode(&bytes) {
                Ok(message) => {
                    self.replies.insert(message.migration_id(), reply);
                    self.core.input(Input::Message {
                        peer: LINKED_PEER,
                        message,
                    });
                }
                Err(e) => {
                    tracing::warn!(instance = self.core.id(), error = %e, "undecodable incoming migration message");
                }
            },
            Command::Stop => return false,
        }
        true
    }

    fn admit(&mut self, job: Assignment, events: EventSender) {
        let id = job.request_id;
        if self.senders.contains_key(&id) {
            let _ = events.send(InstanceEvent::Failed(ServeError::new(
                ErrorCode::Internal,
                format!("request {id} is already on instance {}", self.core.id()),
            )));
            return;
        }
        self.senders.insert(id, events);
        self.core.input(Input::Assign(Box::new(Assign {
            request: id,
            prompt: job.prompt,
            generated: job.generated,
            sampling: SamplingParams {
                temperature: job.temperature,
                top_p: job.top_p,
                seed: job.seed,
                max_tokens: job.max_tokens,
                stop_token_ids: job.stop_token_ids,
            },
            priority: job.priority,
            headroom_blocks: job.headroom_blocks,
            // The llumlet stamps its own receipt time.
            arrival_us: clock::now_us(),
        })));
    }

    /// Requests nobody listens to any more (client gone, manager moved
    /// them) are cancelled: their blocks are freed at the next turn.
    fn reap_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .senders
            .iter()
            .filter(|(_, s)| s.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for request in gone {
            self.senders.remove(&request);
            self.core.input(Input::Cancel { request });
        }
    }

    /// Carries the core's messages to their links and its events to the
    /// requests' channels, the manager and the route book.
    fn flush(&mut self) {
        while let Some(t) = self.core.poll_transmit() {
            let link = if t.to_source() {
                self.replies.get(&t.migration_id)
            } else {
                self.outgoing.get(&t.migration_id).map(|o| &o.link)
            };
            if let Some(link) = link {
                let _ = link.send(t.message.encode());
            }
        }
        while let Some(event) = self.core.poll_event() {
            self.on_event(event);
        }
        // Incoming migrations that ended send no more replies.
        let core = &self.core;
        self.replies.retain(|&id, _| core.is_incoming(id));
    }

    fn on_event(&mut self, event: CoreEvent) {
        let instance = self.core.id();
        match event {
            CoreEvent::Token {
                request,
                index,
                token,
            } => {
                if let Some(s) = self.senders.get(&request) {
                    if s.send(InstanceEvent::Token { index, id: token }).is_err() {
                        self.senders.remove(&request);
                        self.core.input(Input::Cancel { request });
                    }
                }
            }
            CoreEvent::Finished {
                request,
                reason,
                output_tokens,
                queue_us,
            } => {
                if let Some(s) = self.senders.remove(&request) {
                    let reason = match reason {
                        Finish::Length => FinishReason::Length,
                        Finish::Stop => FinishReason::Stop,
                    };
                    let _ = s.send(InstanceEvent::Finished {
                        reason,
                        output_tokens,
                        queue_us,
                    });
                }
            }
            CoreEvent::Failed {
                request,
                kind,
                message,
            } => {
                if let Some(s) = self.senders.remove(&request) {
                    let code = match kind {
                        FailKind::Invalid => ErrorCode::InvalidParameter,
                        FailKind::Cancelled => ErrorCode::Cancelled,
                    };
                    let _ = s.send(InstanceEvent::Failed(ServeError::new(code, message)));
                }
            }
            CoreEvent::Stranded(job) => {
                // Its relay places it again from the tokens it has seen.
                if let Some(s) = self.senders.remove(&job.request) {
                    let _ = s.send(InstanceEvent::Failed(ServeError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "request {} could not be put back on instance {instance} after a failed migration",
                            job.request
                        ),
                    )));
                }
            }
            CoreEvent::MovedOut { request, .. } => {
                // The destination streams it from now on; its channel is
                // handed over until the destination claims it.
                if let Some(s) = self.senders.remove(&request) {
                    self.routes.park(request, s);
                }
            }
            CoreEvent::MovedIn {
                request,
                migration_id,
                ..
            } => {
                self.replies.remove(&migration_id);
                match self.routes.claim(request, instance) {
                    Some(s) => {
                        self.senders.insert(request, s);
                    }
                    // Its client is gone: nobody to stream to.
                    None => self.core.input(Input::Cancel { request }),
                }
            }
            CoreEvent::MoveInRevoked { request } => {
                // The source kept the request after all; this copy is gone.
                self.senders.remove(&request);
            }
            CoreEvent::MigrationEnded {
                migration_id,
                report,
                ..
            } => {
                if let Some(mut o) = self.outgoing.remove(&migration_id) {
                    if let Some(done) = o.done.take() {
                        let report = match *report {
                            llumen_fleet::MigrationReport::Ended(outcome) => {
                                MigrationReport::Ended(MigrationSummary::from(&outcome))
                            }
                            llumen_fleet::MigrationReport::NotStarted(why) => {
                                MigrationReport::NotStarted(why.to_string())
                            }
                        };
                        let _ = done.send(report);
                    }
                }
            }
            CoreEvent::Published(load) => (self.sink)(load),
            CoreEvent::Preempted { .. } => {}
            CoreEvent::StepFailed { message } => {
                // The engine requeued the step's sequences (recompute):
                // nothing is lost; the loop pauses before the next turn.
                tracing::error!(instance, error = %message, "engine step failed");
            }
        }
    }
}
