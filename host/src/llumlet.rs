//! The llumlet: one instance's agent. It owns an [`Engine`] on a thread of
//! its own, drives its step loop, streams each request's tokens to the
//! request's channel, publishes a load snapshot after every step, and
//! applies the manager's decisions (new requests, cancellations, draining).
//!
//! Invariants: every request handed to [`Llumlet::assign`] ends with exactly
//! one `Finished` or `Failed` event, unless its receiver was dropped (then
//! the request is aborted and its blocks freed at the next loop turn); tokens
//! are sent in index order, once each.
//!
//! API boundary: the llumlet talks to the engine only through its public
//! step/load API, and to the rest of the host only through channels and the
//! snapshot callback. It never touches sockets, policies or sled.

use std::collections::HashMap;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use llumen_engine::{DetachedSequence, Engine, ModelBackend, Request, SamplingParams, SeqEvent};
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
    /// The instance could not serve it (a clear reason; nothing follows).
    Failed(ServeError),
}

/// The sender half a request's events go to.
pub type EventSender = tmpsc::UnboundedSender<InstanceEvent>;

enum Command {
    Assign(Assignment, EventSender),
    SetDraining(bool),
    Candidates(oneshot::Sender<Vec<MigrationCandidate>>),
    Stop,
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
    ) -> std::io::Result<Self> {
        let (commands, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("llumlet-{instance}"))
            .spawn(move || StepLoop::new(instance, engine, sink).run(rx))?;
        Ok(Self {
            instance,
            commands,
            thread: Some(thread),
        })
    }

    pub fn instance(&self) -> u32 {
        self.instance
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

struct StepLoop<B: ModelBackend> {
    instance: u32,
    engine: Engine<B>,
    sink: LoadSink,
    live: HashMap<u64, Live>,
    draining: bool,
    last_publish_us: u64,
}

impl<B: ModelBackend> StepLoop<B> {
    fn new(instance: u32, engine: Engine<B>, sink: LoadSink) -> Self {
        Self {
            instance,
            engine,
            sink,
            live: HashMap::new(),
            draining: false,
            last_publish_us: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        self.publish();
        loop {
            // Idle: block until something arrives (publishing a heartbeat
            // snapshot now and then); busy: take what is there and step.
            if self.live.is_empty() {
                match rx.recv_timeout(IDLE_PUBLISH) {
                    Ok(cmd) => {
                        if !self.apply(cmd) {
                            return;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.publish();
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
            self.reap_cancelled();
            let before = self.counts();
            if !self.live.is_empty() {
                self.step();
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
            Command::Stop => return false,
        }
        true
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
        for id in gone {
            self.engine.abort(id);
            self.live.remove(&id);
        }
    }

    fn step(&mut self) {
        let now = clock::now_us();
        match self.engine.step(now) {
            Ok(report) => {
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
