//! One inference instance: the local scheduler driving a model backend, step
//! by step.
//!
//! [`Engine`] owns the pairing of a [`Scheduler`] with a [`ModelBackend`]:
//! plan a step, run it, apply its tokens; on a backend failure every
//! sequence in the step goes back to the queue (recompute), nothing is lost.
//! It also packages the migration hooks (detach + export KV, reserve +
//! import KV + attach). It reads no clock: `now_us` comes from the caller
//! (a real clock in the server, virtual time in the simulator). It never
//! touches QUIC, Wasm or sled.

use llumen_policy_logic::{InstanceLoad, MigrationCandidate};

use crate::{
    BackendError, DetachedSequence, ModelBackend, Request, ReservationId, Scheduler,
    SchedulerConfig, SchedulerError, SeqEvent, SeqId, StepKind, TokenId,
};

/// What one [`Engine::step`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepReport {
    pub kind: StepKind,
    /// Token and finish events, in batch order.
    pub events: Vec<SeqEvent>,
    /// Sequences preempted (by recompute) to make this step fit.
    pub preempted: Vec<SeqId>,
    /// Sequences in the forward pass.
    pub batch_size: usize,
    /// Tokens the forward pass processed (prefill + decode).
    pub tokens: usize,
    /// Duration of the forward pass (measured or modelled), microseconds.
    pub duration_us: u64,
}

/// Why a step or a migration hook failed.
#[derive(Debug)]
pub enum EngineError {
    /// The scheduler refused (a bug in the caller's use of the step protocol,
    /// or an invalid migrated sequence).
    Scheduler(SchedulerError),
    /// The backend failed the step; `requeued` went back to the waiting queue
    /// to be recomputed.
    Backend {
        error: BackendError,
        requeued: Vec<SeqId>,
    },
    /// The KV of a migrated sequence could not be exported or imported.
    Kv(BackendError),
    /// A request names a token outside the model's vocabulary.
    TokenOutOfVocabulary {
        seq: SeqId,
        token: TokenId,
        vocab: usize,
    },
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::Scheduler(e) => write!(f, "{e}"),
            EngineError::Backend { error, requeued } => {
                write!(
                    f,
                    "{error} ({} sequences requeued for recompute)",
                    requeued.len()
                )
            }
            EngineError::Kv(e) => write!(f, "migrating KV: {e}"),
            EngineError::TokenOutOfVocabulary { seq, token, vocab } => {
                write!(
                    f,
                    "request {seq}: token id {token} is outside the model's vocabulary of {vocab}"
                )
            }
        }
    }
}

impl std::error::Error for EngineError {}

impl From<SchedulerError> for EngineError {
    fn from(e: SchedulerError) -> Self {
        EngineError::Scheduler(e)
    }
}

/// A scheduler and the backend it drives.
pub struct Engine<B: ModelBackend> {
    scheduler: Scheduler,
    backend: B,
    last_step_us: u64,
}

impl<B: ModelBackend> Engine<B> {
    pub fn new(config: SchedulerConfig, backend: B) -> Result<Self, EngineError> {
        Ok(Self {
            scheduler: Scheduler::new(config)?,
            backend,
            last_step_us: 0,
        })
    }

    /// Queues a request (its tokens checked against the model's vocabulary,
    /// the rest validated by the scheduler).
    pub fn add(&mut self, request: Request, now_us: u64) -> Result<(), EngineError> {
        if let Some(vocab) = self.backend.vocab_size() {
            let bad = request
                .prompt
                .iter()
                .chain(&request.sampling.stop_token_ids)
                .find(|&&t| t as usize >= vocab);
            if let Some(&token) = bad {
                return Err(EngineError::TokenOutOfVocabulary {
                    seq: request.id,
                    token,
                    vocab,
                });
            }
        }
        Ok(self.scheduler.add(request, now_us)?)
    }

    /// Cancels a request wherever it is; its blocks are freed.
    pub fn abort(&mut self, seq: SeqId) -> bool {
        self.scheduler.abort(seq)
    }

    /// Runs one step starting at `now_us`: plan, forward pass, tokens. The
    /// step's events are stamped at its end (`now_us + duration_us`).
    pub fn step(&mut self, now_us: u64) -> Result<StepReport, EngineError> {
        let plan = self.scheduler.schedule(now_us)?;
        if plan.is_empty() {
            return Ok(StepReport {
                kind: plan.kind,
                events: Vec::new(),
                preempted: plan.preempted,
                batch_size: 0,
                tokens: 0,
                duration_us: 0,
            });
        }
        match self.backend.step(&plan.batch) {
            Ok(output) => {
                let events =
                    self.scheduler
                        .complete(&plan, &output, now_us + output.duration_us)?;
                self.last_step_us = output.duration_us;
                let mut plan = plan;
                let report = StepReport {
                    kind: plan.kind,
                    events,
                    preempted: std::mem::take(&mut plan.preempted),
                    batch_size: plan.batch.sequences.len(),
                    tokens: plan.batch.num_tokens(),
                    duration_us: output.duration_us,
                };
                // The step's input vectors serve the next decodes.
                self.scheduler.recycle(plan);
                Ok(report)
            }
            Err(error) => {
                let requeued = self.scheduler.abandon(&plan)?;
                Err(EngineError::Backend { error, requeued })
            }
        }
    }

    /// The load snapshot policies see.
    pub fn load(&self, instance: u32, now_us: u64) -> InstanceLoad {
        let step_us = u32::try_from(self.last_step_us).unwrap_or(u32::MAX);
        self.scheduler.load(instance, now_us, step_us)
    }

    /// Running requests a migration could move.
    pub fn migration_candidates(&self) -> Vec<MigrationCandidate> {
        self.scheduler.migration_candidates()
    }

    /// The KV of blocks `range` of a sequence's block table, read while it
    /// keeps decoding (a migration's copy stages: blocks already full never
    /// change again).
    pub fn export_kv(
        &self,
        seq: SeqId,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<u8>, EngineError> {
        let table = self.scheduler.block_table(seq)?;
        let blocks = table.get(range.clone()).ok_or_else(|| {
            EngineError::Kv(BackendError(format!(
                "blocks {range:?} of sequence {seq}: it holds {} blocks",
                table.len()
            )))
        })?;
        self.backend.export_blocks(blocks).map_err(EngineError::Kv)
    }

    /// Reserves `blocks` KV blocks for an incoming migration (refused below
    /// the watermark).
    pub fn reserve_for_migration(&mut self, blocks: usize) -> Result<ReservationId, EngineError> {
        Ok(self.scheduler.reserve_blocks(blocks)?)
    }

    /// Writes KV exported elsewhere into blocks `first ..` of a reservation
    /// (in token order): one copy stage of an incoming migration.
    pub fn import_kv(
        &mut self,
        reservation: ReservationId,
        first: usize,
        kv: &[u8],
    ) -> Result<(), EngineError> {
        let per_block = self.backend.kv_bytes_per_block();
        let count = kv.len().checked_div(per_block).unwrap_or(0);
        let blocks = self.scheduler.reservation_blocks(reservation)?;
        let target = blocks.get(first..first + count).ok_or_else(|| {
            EngineError::Kv(BackendError(format!(
                "{count} blocks at {first} do not fit a reservation of {}",
                blocks.len()
            )))
        })?;
        let target = target.to_vec();
        self.backend
            .import_blocks(&target, kv)
            .map_err(EngineError::Kv)
    }

    /// Commits an incoming migration: the detached sequence, whose KV is
    /// imported in `reservation`, joins the running batch.
    pub fn commit_migration(
        &mut self,
        detached: &DetachedSequence,
        reservation: ReservationId,
        now_us: u64,
    ) -> Result<(), EngineError> {
        Ok(self.scheduler.attach(detached, reservation, now_us)?)
    }

    /// Gives back a reservation (an aborted incoming migration).
    pub fn release_reservation(&mut self, reservation: ReservationId) -> Result<(), EngineError> {
        Ok(self.scheduler.release_reservation(reservation)?)
    }

    /// Takes a running sequence out (between steps) with the KV of all its
    /// blocks: what a migration's final stage carries. On a KV failure the
    /// sequence is put back (to be recomputed): nothing is lost.
    pub fn detach_with_kv(
        &mut self,
        seq: SeqId,
        now_us: u64,
    ) -> Result<(DetachedSequence, Vec<u8>), EngineError> {
        let detached = self.scheduler.detach(seq)?;
        match self.backend.export_blocks(&detached.block_table) {
            Ok(kv) => Ok((detached, kv)),
            Err(e) => {
                self.scheduler.requeue(&detached, now_us)?;
                Err(EngineError::Kv(e))
            }
        }
    }

    /// Installs a sequence detached elsewhere, with its KV: reserves blocks,
    /// imports the KV, and puts it in the running batch. On failure nothing
    /// is held here (the reservation is released).
    pub fn attach_with_kv(
        &mut self,
        detached: &DetachedSequence,
        kv: &[u8],
        now_us: u64,
    ) -> Result<(), EngineError> {
        let reservation = self.reserve_for_migration(detached.block_table.len())?;
        let result = self
            .import_kv(reservation, 0, kv)
            .and_then(|()| self.commit_migration(detached, reservation, now_us));
        if result.is_err() {
            // The reservation exists (reserve succeeded above); give it back.
            let _ = self.release_reservation(reservation);
        }
        result
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// For the migration protocol and tests; the step protocol is [`Engine::step`].
    pub fn scheduler_mut(&mut self) -> &mut Scheduler {
        &mut self.scheduler
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }
}
