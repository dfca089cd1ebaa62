//! The local scheduler of one inference instance: vLLM-0.1-style continuous
//! batching with preemption by recompute, and the hooks live migration uses.
//!
//! **Owns**: every request on this instance (its tokens so far, sampling
//! parameters, priority, headroom, counters), the waiting queue, the running
//! batch, the instance's [`BlockManager`], and the decision of what each
//! engine step computes (a [`StepPlan`] wrapping a [`ForwardBatch`]).
//!
//! **Never touches**: tensors or KV bytes (the model backend runs the batch,
//! exports and imports blocks), QUIC, Wasm, sled, files, threads, randomness
//! or the clock. Time comes in as `now_us` and only stamps sequences. The same
//! calls always give the same decisions, so the simulator and the server run
//! exactly this code.
//!
//! # Step protocol
//!
//! [`Scheduler::schedule`] returns a plan; the caller runs its batch on a
//! backend and hands the sampled tokens to [`Scheduler::complete`], or, when
//! the step failed, calls [`Scheduler::abandon`] (its sequences are preempted
//! and will be recomputed). Exactly one non-empty plan is in flight at a time:
//! `schedule` refuses while one is. [`Scheduler::abort`] and
//! [`Scheduler::attach`] may be called mid-step (an aborted sequence's token
//! is dropped; an attached one joins the next step);
//! [`Scheduler::detach`] refuses a sequence whose step is in flight.
//!
//! # Policy
//!
//! - **Queue order**: higher priority first, then, within a priority class,
//!   sequences that were running before (preempted, or put back after a failed
//!   step or migration) ahead of new ones, then earlier `arrival_us`, then lower
//!   id. Running sequences are ordered the same way (priority, arrival, id);
//!   the preemption victim is the *last* of that order: lowest priority, then
//!   youngest.
//! - **Admission** takes sequences from the queue head, in order, while the
//!   block manager can allocate all their tokens leaving `free >= watermark`,
//!   the running batch (plus incoming migrations, see
//!   [`Scheduler::set_migrating_in`]) stays within `max_batch_size` and the
//!   step within `max_batched_tokens`. It stops at the first sequence that does
//!   not fit (first come, first served; no skipping ahead). A preempted
//!   sequence is re-admitted by recompute: its prompt and all the output so far
//!   are prefilled again, and it samples output number `outputs.len()` next, so
//!   the seeded sampler's counter (`output_index`) continues where it stopped.
//! - **Prefill-only steps** (the default, as in vLLM 0.1 and the Llumnix
//!   artifact): when anything is admitted, the step is the admissions' prefill
//!   only and the running batch skips a step; otherwise every running sequence
//!   decodes one token. With [`SchedulerConfig::mixed_prefill_decode`] the
//!   running batch decodes first and admissions join the same step within the
//!   token budget left, unless that step had to preempt.
//! - **Decode and preemption**: running sequences get the slot of their next
//!   token in queue order (growth may dig into the watermark); when no block is
//!   free, the victim (last in order among those not yet served this step) is
//!   preempted by recompute: its blocks are freed and it goes back to the front
//!   of its priority class in the queue. A sequence that is the only one left
//!   preempts itself. Requests are validated at [`Scheduler::add`] so that a
//!   sequence alone on the instance always fits: everything that is admitted
//!   eventually finishes.
//!
//! # KV bookkeeping
//!
//! A sequence of `len` tokens (prompt + outputs) between steps holds KV for
//! `len - 1` tokens in the block manager: the last sampled token's KV is
//! written by the next step, which decodes it at position `len - 1`. While a
//! step is in flight the block manager counts `len` tokens (slots for every
//! input token were taken). Waiting sequences hold no blocks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use llumen_policy_logic::{InstanceLoad, MigrationCandidate};

use crate::{
    BlockError, BlockId, BlockManager, FinishReason, ForwardBatch, Request, ReservationId,
    SamplingParams, SeqId, SequenceInput, StepOutput, TokenId, DEFAULT_BLOCK_SIZE,
};

/// Limits of one instance's local scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub num_blocks: usize,
    /// Blocks kept free at admission for running sequences to grow into.
    pub watermark_blocks: usize,
    /// Most sequences in the running batch.
    pub max_batch_size: usize,
    /// Most tokens one step processes, prefill included. It also caps the
    /// length of a sequence: a preempted sequence must be re-prefilled whole.
    pub max_batched_tokens: usize,
    /// Longest prompt accepted, when set.
    pub max_prompt_tokens: Option<usize>,
    /// Model context length (prompt + `max_tokens`), when set.
    pub max_model_len: Option<usize>,
    /// Let prefills of admitted sequences share a step with the running
    /// batch's decodes (false: prefill-only steps, as vLLM 0.1).
    pub mixed_prefill_decode: bool,
}

impl Default for SchedulerConfig {
    /// The Llumnix artifact's LLaMA-7B-on-A10 setting: 792 blocks of 16
    /// tokens, a 1% watermark, 256 sequences, 12,000 batched tokens,
    /// prefill-only steps.
    fn default() -> Self {
        Self::with_blocks(792, DEFAULT_BLOCK_SIZE)
    }
}

impl SchedulerConfig {
    /// A pool of `num_blocks` blocks of `block_size` tokens with vLLM's 1%
    /// watermark; other limits as in [`SchedulerConfig::default`].
    pub fn with_blocks(num_blocks: usize, block_size: usize) -> Self {
        SchedulerConfig {
            block_size,
            num_blocks,
            watermark_blocks: num_blocks / 100,
            max_batch_size: 256,
            max_batched_tokens: 12_000,
            max_prompt_tokens: None,
            max_model_len: None,
            mixed_prefill_decode: false,
        }
    }

    /// Checks the limits are consistent.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let bad = |m: String| Err(SchedulerError::InvalidConfig(m));
        if self.block_size == 0 {
            return bad("block_size must be positive".into());
        }
        if self.num_blocks == 0 || self.num_blocks > u32::MAX as usize {
            return bad(format!(
                "num_blocks {} must be in 1..=2^32-1",
                self.num_blocks
            ));
        }
        if self.watermark_blocks >= self.num_blocks {
            return bad(format!(
                "watermark_blocks {} must be below num_blocks {}",
                self.watermark_blocks, self.num_blocks
            ));
        }
        if self.max_batch_size == 0 {
            return bad("max_batch_size must be positive".into());
        }
        if self.max_batched_tokens < self.max_batch_size {
            return bad(format!(
                "max_batched_tokens {} is below max_batch_size {}: a full batch could not decode",
                self.max_batched_tokens, self.max_batch_size
            ));
        }
        if self.max_prompt_tokens == Some(0) {
            return bad("max_prompt_tokens must be positive".into());
        }
        if matches!(self.max_model_len, Some(l) if l < 2) {
            return bad(
                "max_model_len must be at least 2 (one prompt and one output token)".into(),
            );
        }
        Ok(())
    }

    /// Most tokens (prompt + `max_tokens`) a request may ask for: its KV of
    /// `total - 1` tokens must fit both one step and the pool above the
    /// watermark (so that it can always be re-prefilled), and the model length.
    pub fn max_total_tokens(&self) -> usize {
        let kv = self
            .max_batched_tokens
            .min((self.num_blocks - self.watermark_blocks).saturating_mul(self.block_size));
        let total = kv.saturating_add(1);
        self.max_model_len.map_or(total, |l| total.min(l))
    }

    /// Longest prompt accepted (leaving room for one output token).
    pub fn max_prompt_len(&self) -> usize {
        let p = self.max_total_tokens() - 1;
        self.max_prompt_tokens.map_or(p, |m| p.min(m))
    }

    /// Most output tokens a prompt of `prompt_tokens` may ask for (0 when the
    /// prompt is too long): what a server clamps `max_tokens` to.
    pub fn max_new_tokens(&self, prompt_tokens: usize) -> u32 {
        if prompt_tokens == 0 || prompt_tokens > self.max_prompt_len() {
            return 0;
        }
        u32::try_from(self.max_total_tokens() - prompt_tokens).unwrap_or(u32::MAX)
    }
}

/// Why a scheduler call was refused. The scheduler is unchanged after any error.
#[derive(Clone, Debug, PartialEq)]
pub enum SchedulerError {
    /// The configuration is inconsistent.
    InvalidConfig(String),
    /// A sequence with this id is already on the instance.
    DuplicateSequence(SeqId),
    /// The request has no prompt tokens.
    EmptyPrompt(SeqId),
    /// The request asks for no output.
    ZeroMaxTokens(SeqId),
    /// Temperature or top-p out of range.
    InvalidSampling { seq: SeqId, reason: String },
    /// The prompt alone exceeds what the instance accepts.
    PromptTooLong {
        seq: SeqId,
        prompt_tokens: usize,
        limit: usize,
    },
    /// Prompt + `max_tokens` exceeds what the instance can ever hold.
    SequenceTooLong {
        seq: SeqId,
        total_tokens: u64,
        limit: usize,
    },
    /// No such sequence here (never added, finished, aborted or migrated away).
    UnknownSequence(SeqId),
    /// The sequence is waiting, not running.
    NotRunning(SeqId),
    /// The sequence is part of the step in flight.
    SequenceInFlight(SeqId),
    /// A step is in flight: complete or abandon it first.
    StepInFlight { step: u64 },
    /// The plan is not the step in flight.
    StalePlan { step: u64, in_flight: Option<u64> },
    /// The backend returned a different number of tokens than sequences.
    OutputMismatch { expected: usize, got: usize },
    /// The running batch is full.
    BatchFull { running: usize, max: usize },
    /// A migrated sequence is not in a state that can continue decoding here.
    InvalidSequence { seq: SeqId, reason: String },
    /// A block-manager operation failed.
    Block(BlockError),
}

impl fmt::Display for SchedulerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use SchedulerError::*;
        match self {
            InvalidConfig(m) => write!(f, "invalid scheduler configuration: {m}"),
            DuplicateSequence(s) => write!(f, "sequence {s} is already on this instance"),
            EmptyPrompt(s) => write!(f, "request {s} has an empty prompt"),
            ZeroMaxTokens(s) => write!(f, "request {s} asks for 0 output tokens"),
            InvalidSampling { seq, reason } => {
                write!(f, "request {seq} has invalid sampling parameters: {reason}")
            }
            PromptTooLong { seq, prompt_tokens, limit } => write!(
                f,
                "request {seq}: prompt of {prompt_tokens} tokens exceeds the limit of {limit}"
            ),
            SequenceTooLong { seq, total_tokens, limit } => write!(
                f,
                "request {seq}: prompt + max_tokens = {total_tokens} tokens exceeds the limit of {limit}"
            ),
            UnknownSequence(s) => write!(f, "unknown sequence {s}"),
            NotRunning(s) => write!(f, "sequence {s} is not running"),
            SequenceInFlight(s) => write!(f, "sequence {s} is in the step in flight"),
            StepInFlight { step } => {
                write!(f, "step {step} is in flight: complete or abandon it first")
            }
            StalePlan { step, in_flight } => match in_flight {
                Some(cur) => write!(f, "plan of step {step} is stale: step {cur} is in flight"),
                None => write!(f, "plan of step {step} is stale: no step is in flight"),
            },
            OutputMismatch { expected, got } => write!(
                f,
                "step output has {got} tokens for {expected} sequences"
            ),
            BatchFull { running, max } => {
                write!(f, "running batch is full ({running} of {max} sequences)")
            }
            InvalidSequence { seq, reason } => {
                write!(f, "migrated sequence {seq} cannot continue: {reason}")
            }
            Block(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SchedulerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SchedulerError::Block(e) => Some(e),
            _ => None,
        }
    }
}

impl From<BlockError> for SchedulerError {
    fn from(e: BlockError) -> Self {
        SchedulerError::Block(e)
    }
}

/// What kind of work a step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepKind {
    /// Nothing to run (the batch is empty).
    Idle,
    /// Prefills of admitted sequences only.
    Prefill,
    /// One decode token per running sequence.
    Decode,
    /// Decodes and prefills together (`mixed_prefill_decode`).
    Mixed,
}

/// What one engine step runs, and what the scheduler did to make it fit.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPlan {
    /// Step number, unique on this scheduler.
    pub step: u64,
    pub kind: StepKind,
    /// The forward pass: decodes first (in running order), then prefills (in
    /// admission order).
    pub batch: ForwardBatch,
    /// Sequences preempted (by recompute) while building this step.
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    /// No forward pass to run.
    pub fn is_empty(&self) -> bool {
        self.batch.sequences.is_empty()
    }
    /// Sequences prefilled this step (fresh or recomputed).
    pub fn num_prefills(&self) -> usize {
        self.batch
            .sequences
            .iter()
            .filter(|s| s.start_position == 0)
            .count()
    }
    /// Sequences decoding one token this step.
    pub fn num_decodes(&self) -> usize {
        self.batch.sequences.len() - self.num_prefills()
    }
}

/// What happened to a sequence in a completed step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeqEvent {
    /// Output token number `index` (0-based, contiguous per sequence).
    Token {
        seq: SeqId,
        token: TokenId,
        index: u32,
    },
    /// The sequence finished (after its last `Token` event); its blocks are free.
    Finished {
        seq: SeqId,
        reason: FinishReason,
        output_tokens: u32,
        preemptions: u32,
    },
}

/// Where a sequence is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SequenceState {
    Waiting,
    Running,
}

/// A sequence's state and counters, for inspection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceInfo {
    pub id: SeqId,
    pub state: SequenceState,
    /// Part of the step in flight.
    pub in_flight: bool,
    pub priority: u8,
    pub headroom_blocks: u32,
    pub arrival_us: u64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub max_tokens: u32,
    /// KV blocks held (0 while waiting).
    pub blocks: usize,
    /// Times preempted (here or, for a migrated sequence, anywhere).
    pub preemptions: u32,
    /// Tokens prefilled again after preemptions.
    pub tokens_recomputed: u64,
    /// When the scheduler accepted it (`add` or `attach`).
    pub enqueued_us: u64,
    /// When it was first admitted into a step here.
    pub first_scheduled_us: Option<u64>,
    /// When its first token here was completed.
    pub first_token_us: Option<u64>,
}

/// A running sequence taken out of this instance by [`Scheduler::detach`],
/// to be installed elsewhere by [`Scheduler::attach`] (or put back by
/// [`Scheduler::requeue`] when the migration fails).
#[derive(Clone, Debug, PartialEq)]
pub struct DetachedSequence {
    pub id: SeqId,
    pub prompt: Vec<TokenId>,
    /// Outputs so far (at least one); the last one's KV is not written yet.
    pub output: Vec<TokenId>,
    pub sampling: SamplingParams,
    pub priority: u8,
    pub headroom_blocks: u32,
    pub arrival_us: u64,
    pub preemptions: u32,
    pub tokens_recomputed: u64,
    /// Block size of the instance it came from (KV is copied block by block).
    pub block_size: usize,
    /// The blocks it held at the source, in token order. They are free there
    /// now; their contents stay intact until the source next allocates
    /// (`schedule`, `reserve_blocks`, `attach`), so export them before that.
    pub block_table: Vec<BlockId>,
    /// Tokens whose KV those blocks hold: `prompt.len() + output.len() - 1`.
    pub kv_tokens: usize,
}

impl DetachedSequence {
    /// Prompt and output tokens.
    pub fn len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }
    /// Never true for a sequence that came out of `detach`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Totals since the scheduler was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Non-empty steps planned, and their kinds.
    pub steps: u64,
    pub prefill_steps: u64,
    pub decode_steps: u64,
    pub mixed_steps: u64,
    /// Requests accepted by `add`, and refused.
    pub added: u64,
    pub rejected: u64,
    /// Admissions into the running batch (re-admissions after preemption included).
    pub admitted: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    /// Tokens completed (sampled and appended).
    pub generated_tokens: u64,
    pub preemptions: u64,
    /// Tokens prefilled again whose KV a preemption had discarded.
    pub tokens_recomputed: u64,
    pub finished: u64,
    pub aborted: u64,
    pub detached: u64,
    pub attached: u64,
    /// Detached sequences put back in the queue by `requeue`.
    pub requeued: u64,
    /// Steps abandoned (the backend failed).
    pub abandoned_steps: u64,
}

/// Queue order: higher priority, resumed before new, earlier arrival, lower id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct WaitKey {
    priority: Reverse<u8>,
    new: bool,
    arrival_us: u64,
    id: SeqId,
}

/// Running order: higher priority, earlier arrival, lower id. The last one is
/// the preemption victim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RunKey {
    priority: Reverse<u8>,
    arrival_us: u64,
    id: SeqId,
}

#[derive(Clone, Debug)]
struct Sequence {
    id: SeqId,
    prompt: Vec<TokenId>,
    output: Vec<TokenId>,
    sampling: SamplingParams,
    priority: u8,
    headroom_blocks: u32,
    arrival_us: u64,
    state: SequenceState,
    /// Waiting after having run (preempted, failed step, failed migration).
    resumed: bool,
    /// The step this sequence is part of, while in flight.
    in_flight: Option<u64>,
    preemptions: u32,
    /// KV tokens discarded by the last preemption, recomputed at re-admission.
    recompute_pending: usize,
    tokens_recomputed: u64,
    enqueued_us: u64,
    first_scheduled_us: Option<u64>,
    first_token_us: Option<u64>,
}

impl Sequence {
    fn len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }
    fn wait_key(&self) -> WaitKey {
        WaitKey {
            priority: Reverse(self.priority),
            new: !self.resumed,
            arrival_us: self.arrival_us,
            id: self.id,
        }
    }
    fn run_key(&self) -> RunKey {
        RunKey {
            priority: Reverse(self.priority),
            arrival_us: self.arrival_us,
            id: self.id,
        }
    }
    fn finish_reason(&self) -> Option<FinishReason> {
        let last = *self.output.last()?;
        if self.sampling.stop_token_ids.contains(&last) {
            Some(FinishReason::Stop)
        } else if self.output.len() >= self.sampling.max_tokens as usize {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

fn sat_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The local scheduler of one instance. See the module docs.
#[derive(Clone, Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    seqs: BTreeMap<SeqId, Sequence>,
    waiting: BTreeSet<WaitKey>,
    running: BTreeSet<RunKey>,
    next_step: u64,
    in_flight: Option<u64>,
    draining: bool,
    migrating_in: u32,
    migrating_out: u32,
    stats: SchedulerStats,
    /// Inputs of finished steps, their vectors kept for the next decode
    /// (two allocations per decoded token otherwise; see [`Scheduler::recycle`]).
    spare_inputs: Vec<SequenceInput>,
}

/// Most spare step inputs kept for reuse.
const SPARE_INPUTS: usize = 1024;

impl Scheduler {
    /// An empty instance with these limits.
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        config.validate()?;
        let blocks = BlockManager::new(
            config.num_blocks,
            config.block_size,
            config.watermark_blocks,
        );
        Ok(Scheduler {
            config,
            blocks,
            seqs: BTreeMap::new(),
            waiting: BTreeSet::new(),
            running: BTreeSet::new(),
            next_step: 0,
            in_flight: None,
            draining: false,
            migrating_in: 0,
            migrating_out: 0,
            stats: SchedulerStats::default(),
            spare_inputs: Vec::new(),
        })
    }

    /// Takes a finished step's plan back: its per-sequence vectors are
    /// reused by later decodes. Optional (a plan simply dropped is fine).
    pub fn recycle(&mut self, mut plan: StepPlan) {
        let room = SPARE_INPUTS.saturating_sub(self.spare_inputs.len());
        let n = plan.batch.sequences.len().min(room);
        self.spare_inputs.extend(plan.batch.sequences.drain(..n));
    }

    /// Queues a new request. Refused (and counted) when its id is taken, its
    /// prompt is empty, it asks for no output, its sampling is out of range,
    /// or it could never fit this instance (see
    /// [`SchedulerConfig::max_total_tokens`]).
    pub fn add(&mut self, request: Request, now_us: u64) -> Result<(), SchedulerError> {
        let r = self.check_request(&request);
        if r.is_err() {
            self.stats.rejected += 1;
            return r;
        }
        let Request {
            id,
            prompt,
            sampling,
            priority,
            headroom_blocks,
            arrival_us,
        } = request;
        let seq = Sequence {
            id,
            prompt,
            output: Vec::new(),
            sampling,
            priority,
            headroom_blocks,
            arrival_us,
            state: SequenceState::Waiting,
            resumed: false,
            in_flight: None,
            preemptions: 0,
            recompute_pending: 0,
            tokens_recomputed: 0,
            enqueued_us: now_us,
            first_scheduled_us: None,
            first_token_us: None,
        };
        self.waiting.insert(seq.wait_key());
        self.seqs.insert(id, seq);
        self.stats.added += 1;
        Ok(())
    }

    fn check_request(&self, r: &Request) -> Result<(), SchedulerError> {
        if self.seqs.contains_key(&r.id) {
            return Err(SchedulerError::DuplicateSequence(r.id));
        }
        if r.prompt.is_empty() {
            return Err(SchedulerError::EmptyPrompt(r.id));
        }
        self.check_shape(r.id, r.prompt.len(), &r.sampling)
    }

    fn check_shape(
        &self,
        seq: SeqId,
        prompt_tokens: usize,
        s: &SamplingParams,
    ) -> Result<(), SchedulerError> {
        if s.max_tokens == 0 {
            return Err(SchedulerError::ZeroMaxTokens(seq));
        }
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            let reason = format!("temperature {} must be finite and >= 0", s.temperature);
            return Err(SchedulerError::InvalidSampling { seq, reason });
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            let reason = format!("top_p {} must be in (0, 1]", s.top_p);
            return Err(SchedulerError::InvalidSampling { seq, reason });
        }
        let limit = self.config.max_prompt_len();
        if prompt_tokens > limit {
            return Err(SchedulerError::PromptTooLong {
                seq,
                prompt_tokens,
                limit,
            });
        }
        let total_tokens = prompt_tokens as u64 + u64::from(s.max_tokens);
        let limit = self.config.max_total_tokens();
        if total_tokens > limit as u64 {
            return Err(SchedulerError::SequenceTooLong {
                seq,
                total_tokens,
                limit,
            });
        }
        Ok(())
    }

    /// Plans the next step (see the module docs for the policy). An empty
    /// plan needs no forward pass and no `complete`; a non-empty one is in
    /// flight until [`Scheduler::complete`] or [`Scheduler::abandon`].
    pub fn schedule(&mut self, now_us: u64) -> Result<StepPlan, SchedulerError> {
        if let Some(step) = self.in_flight {
            return Err(SchedulerError::StepInFlight { step });
        }
        let step = self.next_step;
        self.next_step += 1;
        let mut plan = StepPlan {
            step,
            kind: StepKind::Idle,
            batch: ForwardBatch::default(),
            preempted: Vec::new(),
        };
        let (decodes, prefills);
        if self.config.mixed_prefill_decode {
            decodes = self.decode(step, &mut plan);
            prefills = if plan.preempted.is_empty() {
                let budget = self.config.max_batched_tokens - decodes;
                self.admit(step, budget, now_us, &mut plan.batch)
            } else {
                0
            };
        } else {
            prefills = self.admit(
                step,
                self.config.max_batched_tokens,
                now_us,
                &mut plan.batch,
            );
            decodes = if prefills == 0 {
                self.decode(step, &mut plan)
            } else {
                0
            };
        }
        plan.kind = match (prefills > 0, decodes > 0) {
            (false, false) => StepKind::Idle,
            (true, false) => StepKind::Prefill,
            (false, true) => StepKind::Decode,
            (true, true) => StepKind::Mixed,
        };
        if !plan.is_empty() {
            self.in_flight = Some(step);
            self.stats.steps += 1;
            match plan.kind {
                StepKind::Prefill => self.stats.prefill_steps += 1,
                StepKind::Decode => self.stats.decode_steps += 1,
                StepKind::Mixed => self.stats.mixed_steps += 1,
                StepKind::Idle => {}
            }
        }
        Ok(plan)
    }

    /// Admits from the queue head; returns how many sequences it admitted.
    fn admit(
        &mut self,
        step: u64,
        token_budget: usize,
        now_us: u64,
        batch: &mut ForwardBatch,
    ) -> usize {
        let mut tokens_used = 0;
        let mut admitted = 0;
        while let Some(&key) = self.waiting.first() {
            let tokens = self.seqs[&key.id].len();
            let batch_room = self
                .config
                .max_batch_size
                .saturating_sub(self.running.len())
                .saturating_sub(self.migrating_in as usize);
            if batch_room == 0
                || tokens_used + tokens > token_budget
                || !self.blocks.can_allocate(tokens)
            {
                break;
            }
            self.waiting.pop_first();
            let table = self
                .blocks
                .allocate(key.id, tokens)
                .expect("can_allocate was checked")
                .to_vec();
            let seq = self.seqs.get_mut(&key.id).expect("waiting sequences exist");
            seq.state = SequenceState::Running;
            seq.resumed = false;
            seq.in_flight = Some(step);
            seq.first_scheduled_us.get_or_insert(now_us);
            let recomputed = std::mem::take(&mut seq.recompute_pending) as u64;
            seq.tokens_recomputed += recomputed;
            self.stats.tokens_recomputed += recomputed;
            self.running.insert(seq.run_key());
            let mut input_tokens = Vec::with_capacity(tokens);
            input_tokens.extend_from_slice(&seq.prompt);
            input_tokens.extend_from_slice(&seq.output);
            batch.sequences.push(SequenceInput {
                seq: key.id,
                tokens: input_tokens,
                start_position: 0,
                block_table: table,
                temperature: seq.sampling.temperature,
                top_p: seq.sampling.top_p,
                seed: seq.sampling.seed,
                output_index: sat_u32(seq.output.len()),
            });
            tokens_used += tokens;
            admitted += 1;
            self.stats.admitted += 1;
            self.stats.prefill_tokens += tokens as u64;
        }
        admitted
    }

    /// Gives every running sequence the slot of its next token, preempting
    /// as needed; returns how many decode.
    fn decode(&mut self, step: u64, plan: &mut StepPlan) -> usize {
        let mut order: VecDeque<RunKey> = self.running.iter().copied().collect();
        let mut decodes = 0;
        while let Some(key) = order.pop_front() {
            loop {
                match self.blocks.append_slot(key.id) {
                    Ok(_) => {
                        let mut input = self.spare_inputs.pop().unwrap_or_else(|| SequenceInput {
                            seq: key.id,
                            tokens: Vec::with_capacity(1),
                            start_position: 0,
                            block_table: Vec::new(),
                            temperature: 0.0,
                            top_p: 1.0,
                            seed: 0,
                            output_index: 0,
                        });
                        input.block_table.clear();
                        input.block_table.extend_from_slice(
                            self.blocks.block_table(key.id).expect("just appended"),
                        );
                        let seq = self.seqs.get_mut(&key.id).expect("running sequences exist");
                        seq.in_flight = Some(step);
                        let last = *seq
                            .output
                            .last()
                            .expect("a running sequence between steps has output");
                        input.tokens.clear();
                        input.tokens.push(last);
                        input.seq = key.id;
                        input.start_position = seq.len() - 1;
                        input.temperature = seq.sampling.temperature;
                        input.top_p = seq.sampling.top_p;
                        input.seed = seq.sampling.seed;
                        input.output_index = sat_u32(seq.output.len());
                        plan.batch.sequences.push(input);
                        decodes += 1;
                        self.stats.decode_tokens += 1;
                        break;
                    }
                    Err(BlockError::OutOfBlocks { .. }) => {
                        // Preempt the lowest-priority, youngest sequence not yet
                        // served; with none left, this one.
                        let victim = order.pop_back().map_or(key.id, |v| v.id);
                        let kv_valid = self
                            .blocks
                            .num_tokens(victim)
                            .expect("running sequences hold blocks");
                        self.preempt(victim, kv_valid);
                        plan.preempted.push(victim);
                        if victim == key.id {
                            break;
                        }
                    }
                    Err(e) => panic!("running sequence {} has no block table: {e}", key.id),
                }
            }
        }
        decodes
    }

    /// Frees a running sequence's blocks and puts it back at the front of its
    /// priority class; `kv_valid` tokens of KV are lost to recompute.
    fn preempt(&mut self, id: SeqId, kv_valid: usize) {
        self.blocks.free(id).expect("running sequences hold blocks");
        let seq = self.seqs.get_mut(&id).expect("running sequences exist");
        self.running.remove(&seq.run_key());
        seq.state = SequenceState::Waiting;
        seq.resumed = true;
        seq.in_flight = None;
        seq.preemptions += 1;
        seq.recompute_pending = kv_valid;
        self.waiting.insert(seq.wait_key());
        self.stats.preemptions += 1;
    }

    /// Applies a step's sampled tokens: one `Token` event per sequence still
    /// here, then `Finished` for those that produced `max_tokens` tokens or a
    /// stop token (their blocks are freed). Sequences aborted mid-step are
    /// skipped. On error nothing changes.
    pub fn complete(
        &mut self,
        plan: &StepPlan,
        output: &StepOutput,
        now_us: u64,
    ) -> Result<Vec<SeqEvent>, SchedulerError> {
        let expected = plan.batch.sequences.len();
        if output.next_tokens.len() != expected {
            return Err(SchedulerError::OutputMismatch {
                expected,
                got: output.next_tokens.len(),
            });
        }
        if expected == 0 {
            return Ok(Vec::new());
        }
        if self.in_flight != Some(plan.step) {
            return Err(SchedulerError::StalePlan {
                step: plan.step,
                in_flight: self.in_flight,
            });
        }
        self.in_flight = None;
        let mut events = Vec::with_capacity(expected);
        for (input, &token) in plan.batch.sequences.iter().zip(&output.next_tokens) {
            let Some(seq) = self.seqs.get_mut(&input.seq) else {
                continue;
            };
            if seq.in_flight != Some(plan.step) {
                continue; // aborted (and maybe re-added) mid-step
            }
            seq.in_flight = None;
            let index = sat_u32(seq.output.len());
            debug_assert_eq!(index, input.output_index);
            seq.output.push(token);
            seq.first_token_us.get_or_insert(now_us);
            self.stats.generated_tokens += 1;
            events.push(SeqEvent::Token {
                seq: input.seq,
                token,
                index,
            });
            if let Some(reason) = seq.finish_reason() {
                let (output_tokens, preemptions) = (sat_u32(seq.output.len()), seq.preemptions);
                self.running.remove(&seq.run_key());
                self.seqs.remove(&input.seq);
                self.blocks
                    .free(input.seq)
                    .expect("running sequences hold blocks");
                self.stats.finished += 1;
                events.push(SeqEvent::Finished {
                    seq: input.seq,
                    reason,
                    output_tokens,
                    preemptions,
                });
            }
        }
        Ok(events)
    }

    /// The step failed (the backend returned an error): every sequence of the
    /// plan still here is preempted by recompute (counted as a preemption)
    /// and will run again. Returns those sequences.
    pub fn abandon(&mut self, plan: &StepPlan) -> Result<Vec<SeqId>, SchedulerError> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        if self.in_flight != Some(plan.step) {
            return Err(SchedulerError::StalePlan {
                step: plan.step,
                in_flight: self.in_flight,
            });
        }
        self.in_flight = None;
        self.stats.abandoned_steps += 1;
        let mut requeued = Vec::new();
        for input in &plan.batch.sequences {
            let Some(seq) = self.seqs.get(&input.seq) else {
                continue;
            };
            if seq.in_flight != Some(plan.step) {
                continue;
            }
            // A decode's earlier KV was valid; a prefill's never got written.
            let kv_valid = if input.start_position > 0 {
                input.start_position
            } else {
                0
            };
            self.preempt(input.seq, kv_valid);
            requeued.push(input.seq);
        }
        Ok(requeued)
    }

    /// Removes a sequence wherever it is (waiting or running, in flight
    /// included) and frees its blocks. False when it is not here.
    pub fn abort(&mut self, seq: SeqId) -> bool {
        let Some(s) = self.seqs.remove(&seq) else {
            return false;
        };
        match s.state {
            SequenceState::Waiting => {
                self.waiting.remove(&s.wait_key());
            }
            SequenceState::Running => {
                self.running.remove(&s.run_key());
                self.blocks
                    .free(seq)
                    .expect("running sequences hold blocks");
            }
        }
        self.stats.aborted += 1;
        true
    }

    /// Running sequences, in running order (highest priority, oldest first).
    pub fn migration_candidates(&self) -> Vec<MigrationCandidate> {
        self.running
            .iter()
            .map(|k| {
                let s = &self.seqs[&k.id];
                MigrationCandidate {
                    id: s.id,
                    priority: s.priority,
                    blocks: sat_u32(self.blocks.num_blocks(s.id).unwrap_or(0)),
                    prompt_tokens: sat_u32(s.prompt.len()),
                    output_tokens: sat_u32(s.output.len()),
                    arrival_us: s.arrival_us,
                }
            })
            .collect()
    }

    /// Takes a running sequence (not in the step in flight) out of this
    /// instance: it is forgotten here and its blocks are freed, their
    /// contents intact until the next allocation (see [`DetachedSequence`]).
    pub fn detach(&mut self, seq: SeqId) -> Result<DetachedSequence, SchedulerError> {
        let s = self
            .seqs
            .get(&seq)
            .ok_or(SchedulerError::UnknownSequence(seq))?;
        if s.state != SequenceState::Running {
            return Err(SchedulerError::NotRunning(seq));
        }
        if s.in_flight.is_some() {
            return Err(SchedulerError::SequenceInFlight(seq));
        }
        let block_table = self.blocks.block_table(seq)?.to_vec();
        let kv_tokens = self.blocks.num_tokens(seq)?;
        self.blocks.free(seq)?;
        let s = self.seqs.remove(&seq).expect("checked above");
        self.running.remove(&s.run_key());
        self.stats.detached += 1;
        Ok(DetachedSequence {
            id: s.id,
            prompt: s.prompt,
            output: s.output,
            sampling: s.sampling,
            priority: s.priority,
            headroom_blocks: s.headroom_blocks,
            arrival_us: s.arrival_us,
            preemptions: s.preemptions,
            tokens_recomputed: s.tokens_recomputed,
            block_size: self.config.block_size,
            block_table,
            kv_tokens,
        })
    }

    fn check_detached(&self, d: &DetachedSequence) -> Result<(), SchedulerError> {
        let invalid = |reason: String| Err(SchedulerError::InvalidSequence { seq: d.id, reason });
        if self.seqs.contains_key(&d.id) {
            return Err(SchedulerError::DuplicateSequence(d.id));
        }
        if d.prompt.is_empty() {
            return Err(SchedulerError::EmptyPrompt(d.id));
        }
        self.check_shape(d.id, d.prompt.len(), &d.sampling)?;
        if d.output.is_empty() {
            return invalid("it has no output yet".into());
        }
        if d.kv_tokens + 1 != d.len() {
            return invalid(format!(
                "KV of {} tokens for a sequence of {}",
                d.kv_tokens,
                d.len()
            ));
        }
        let probe = Sequence {
            id: d.id,
            prompt: Vec::new(),
            output: d.output.clone(),
            sampling: d.sampling.clone(),
            priority: d.priority,
            headroom_blocks: 0,
            arrival_us: 0,
            state: SequenceState::Waiting,
            resumed: true,
            in_flight: None,
            preemptions: 0,
            recompute_pending: 0,
            tokens_recomputed: 0,
            enqueued_us: 0,
            first_scheduled_us: None,
            first_token_us: None,
        };
        if let Some(reason) = probe.finish_reason() {
            return invalid(format!("it has already finished ({reason:?})"));
        }
        Ok(())
    }

    fn install(&mut self, d: &DetachedSequence, state: SequenceState, now_us: u64) {
        let seq = Sequence {
            id: d.id,
            prompt: d.prompt.clone(),
            output: d.output.clone(),
            sampling: d.sampling.clone(),
            priority: d.priority,
            headroom_blocks: d.headroom_blocks,
            arrival_us: d.arrival_us,
            state,
            resumed: state == SequenceState::Waiting,
            in_flight: None,
            preemptions: d.preemptions,
            recompute_pending: if state == SequenceState::Waiting {
                d.kv_tokens
            } else {
                0
            },
            tokens_recomputed: d.tokens_recomputed,
            enqueued_us: now_us,
            first_scheduled_us: None,
            first_token_us: None,
        };
        match state {
            SequenceState::Waiting => self.waiting.insert(seq.wait_key()),
            SequenceState::Running => self.running.insert(seq.run_key()),
        };
        self.seqs.insert(d.id, seq);
    }

    /// Installs a migrated sequence into the running batch, its KV already
    /// imported into `reservation`'s blocks (in token order); it decodes from
    /// the next step on. On error nothing changes and the reservation is
    /// still held (release it, or retry).
    pub fn attach(
        &mut self,
        detached: &DetachedSequence,
        reservation: ReservationId,
        now_us: u64,
    ) -> Result<(), SchedulerError> {
        self.check_detached(detached)?;
        if detached.block_size != self.config.block_size {
            return Err(SchedulerError::InvalidSequence {
                seq: detached.id,
                reason: format!(
                    "block size {} differs from this instance's {}",
                    detached.block_size, self.config.block_size
                ),
            });
        }
        if self.running.len() >= self.config.max_batch_size {
            return Err(SchedulerError::BatchFull {
                running: self.running.len(),
                max: self.config.max_batch_size,
            });
        }
        self.blocks
            .commit(reservation, detached.id, detached.kv_tokens)?;
        self.install(detached, SequenceState::Running, now_us);
        self.stats.attached += 1;
        Ok(())
    }

    /// Puts a detached sequence back in the queue, to be recomputed (the way
    /// back when a migration fails after `detach`). Nothing is lost but the KV.
    pub fn requeue(
        &mut self,
        detached: &DetachedSequence,
        now_us: u64,
    ) -> Result<(), SchedulerError> {
        self.check_detached(detached)?;
        self.install(detached, SequenceState::Waiting, now_us);
        self.stats.requeued += 1;
        Ok(())
    }

    /// Reserves `n` blocks for an incoming migration (respects the watermark).
    pub fn reserve_blocks(&mut self, n: usize) -> Result<ReservationId, SchedulerError> {
        Ok(self.blocks.reserve(n)?)
    }

    /// Adds `n` blocks to a reservation (respects the watermark): the
    /// migrating sequence grew while its KV was being copied.
    pub fn grow_reservation(&mut self, r: ReservationId, n: usize) -> Result<(), SchedulerError> {
        Ok(self.blocks.grow_reservation(r, n)?)
    }

    /// Gives a reservation's blocks back (migration aborted or timed out).
    pub fn release_reservation(&mut self, r: ReservationId) -> Result<(), SchedulerError> {
        Ok(self.blocks.release(r)?)
    }

    /// The blocks of a reservation, for the KV import.
    pub fn reservation_blocks(&self, r: ReservationId) -> Result<&[BlockId], SchedulerError> {
        Ok(self.blocks.reservation_blocks(r)?)
    }

    /// The block table of a running sequence (what a migration stage copies).
    pub fn block_table(&self, seq: SeqId) -> Result<&[BlockId], SchedulerError> {
        match self.seqs.get(&seq) {
            None => Err(SchedulerError::UnknownSequence(seq)),
            Some(s) if s.state != SequenceState::Running => Err(SchedulerError::NotRunning(seq)),
            Some(_) => Ok(self.blocks.block_table(seq)?),
        }
    }

    /// Whether a migration could be attached now without exceeding the batch
    /// (counting the incoming migrations already announced).
    pub fn can_accept_migration(&self) -> bool {
        self.running.len() + (self.migrating_in as usize) < self.config.max_batch_size
    }

    /// The instance-load snapshot of this instance now.
    pub fn load(&self, instance: u32, now_us: u64, step_latency_us: u32) -> InstanceLoad {
        let demand = |s: &Sequence| sat_u32(self.blocks.blocks_needed(s.len()));
        let head = self
            .waiting
            .first()
            .map_or(0, |k| demand(&self.seqs[&k.id]));
        let mut waiting_demand = 0u32;
        let mut preempted = 0u32;
        for k in &self.waiting {
            let s = &self.seqs[&k.id];
            waiting_demand = waiting_demand.saturating_add(demand(s));
            preempted += u32::from(s.resumed);
        }
        let (mut high, mut headroom) = (0u32, 0u32);
        for s in self.seqs.values() {
            high += u32::from(s.priority > 0);
            // The room an instance keeps for its high-priority requests is
            // shared (Llumnix reserves one headroom per instance holding
            // them, not one per request): the largest asked for.
            headroom = headroom.max(s.headroom_blocks);
        }
        InstanceLoad {
            instance,
            timestamp_us: now_us,
            block_size: sat_u32(self.config.block_size),
            total_blocks: sat_u32(self.blocks.total_blocks()),
            used_blocks: sat_u32(self.blocks.used_blocks() + self.blocks.reserved_blocks()),
            watermark_blocks: sat_u32(self.blocks.watermark_blocks()),
            running: sat_u32(self.running.len()),
            waiting: sat_u32(self.waiting.len()),
            preempted,
            head_of_line_demand_blocks: head,
            waiting_demand_blocks: waiting_demand,
            high_priority_requests: high,
            headroom_blocks: headroom,
            migrating_out: self.migrating_out,
            migrating_in: self.migrating_in,
            step_latency_us,
            draining: self.draining,
        }
    }

    /// Marks the instance as draining (reported in the load; scheduling is unchanged).
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }
    pub fn draining(&self) -> bool {
        self.draining
    }
    /// Migrations coming in, as counted by the migration code. Reported in
    /// the load, and admission keeps that many batch slots free for them.
    pub fn set_migrating_in(&mut self, n: u32) {
        self.migrating_in = n;
    }
    pub fn migrating_in(&self) -> u32 {
        self.migrating_in
    }
    /// Migrations going out, as counted by the migration code (reported in the load).
    pub fn set_migrating_out(&mut self, n: u32) {
        self.migrating_out = n;
    }
    pub fn migrating_out(&self) -> u32 {
        self.migrating_out
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
    /// The KV pool (read-only: the scheduler alone allocates).
    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }
    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Sequences on the instance, running or waiting.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }
    /// Nothing running or waiting.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }
    /// The step in flight, if any.
    pub fn step_in_flight(&self) -> Option<u64> {
        self.in_flight
    }
    /// Running sequences in running order (highest priority, oldest first).
    pub fn running_ids(&self) -> Vec<SeqId> {
        self.running.iter().map(|k| k.id).collect()
    }
    /// Waiting sequences in queue order.
    pub fn waiting_ids(&self) -> Vec<SeqId> {
        self.waiting.iter().map(|k| k.id).collect()
    }
    /// A sequence's prompt and its outputs so far.
    pub fn sequence_tokens(&self, seq: SeqId) -> Option<(&[TokenId], &[TokenId])> {
        self.seqs
            .get(&seq)
            .map(|s| (s.prompt.as_slice(), s.output.as_slice()))
    }
    pub fn sequence(&self, seq: SeqId) -> Option<SequenceInfo> {
        let s = self.seqs.get(&seq)?;
        Some(SequenceInfo {
            id: s.id,
            state: s.state,
            in_flight: s.in_flight.is_some(),
            priority: s.priority,
            headroom_blocks: s.headroom_blocks,
            arrival_us: s.arrival_us,
            prompt_tokens: s.prompt.len(),
            output_tokens: s.output.len(),
            max_tokens: s.sampling.max_tokens,
            blocks: self.blocks.num_blocks(seq).unwrap_or(0),
            preemptions: s.preemptions,
            tokens_recomputed: s.tokens_recomputed,
            enqueued_us: s.enqueued_us,
            first_scheduled_us: s.first_scheduled_us,
            first_token_us: s.first_token_us,
        })
    }

    /// Full consistency check (the block manager's included), O(sequences +
    /// blocks). For tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.blocks.check_invariants()?;
        if self.waiting.len() + self.running.len() != self.seqs.len() {
            return Err(format!(
                "{} waiting + {} running != {} sequences",
                self.waiting.len(),
                self.running.len(),
                self.seqs.len()
            ));
        }
        if self.blocks.num_sequences() != self.running.len() {
            return Err(format!(
                "{} block tables for {} running sequences",
                self.blocks.num_sequences(),
                self.running.len()
            ));
        }
        if self.running.len() > self.config.max_batch_size {
            return Err(format!(
                "{} running above the batch limit",
                self.running.len()
            ));
        }
        for (id, s) in &self.seqs {
            if s.id != *id {
                return Err(format!("sequence {} filed under {id}", s.id));
            }
            if s.finish_reason().is_some() {
                return Err(format!("sequence {id} finished but still here"));
            }
            if s.in_flight.is_some() && s.in_flight != self.in_flight {
                return Err(format!(
                    "sequence {id} in flight in {:?}, step {:?}",
                    s.in_flight, self.in_flight
                ));
            }
            match s.state {
                SequenceState::Waiting => {
                    if !self.waiting.contains(&s.wait_key())
                        || self.blocks.contains(*id)
                        || s.in_flight.is_some()
                    {
                        return Err(format!(
                            "waiting sequence {id} misfiled, holds blocks or is in flight"
                        ));
                    }
                }
                SequenceState::Running => {
                    if !self.running.contains(&s.run_key()) {
                        return Err(format!("running sequence {id} misfiled"));
                    }
                    let want = s.len() - usize::from(s.in_flight.is_none());
                    let have = self.blocks.num_tokens(*id).map_err(|e| e.to_string())?;
                    if have != want {
                        return Err(format!(
                            "running sequence {id} of {} tokens holds KV for {have}",
                            s.len()
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: u32 = 16;

    /// The fake model's next token: a hash of the whole context, so any
    /// mistake in block tables, positions or recompute changes the output.
    fn next_token(context: &[TokenId], output_index: u32) -> TokenId {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(output_index);
        for &t in context {
            h = (h ^ u64::from(t)).wrapping_mul(0x0100_0000_01b3);
        }
        ((h >> 29) % u64::from(VOCAB)) as TokenId
    }

    /// What a request must produce, computed without any scheduler.
    fn reference(prompt: &[TokenId], s: &SamplingParams) -> (Vec<TokenId>, FinishReason) {
        let mut ctx = prompt.to_vec();
        let mut out = Vec::new();
        loop {
            let t = next_token(&ctx, out.len() as u32);
            out.push(t);
            ctx.push(t);
            if s.stop_token_ids.contains(&t) {
                return (out, FinishReason::Stop);
            }
            if out.len() >= s.max_tokens as usize {
                return (out, FinishReason::Length);
            }
        }
    }

    /// A paged "KV cache" holding (sequence, position, token) per slot: it
    /// writes every input token where the block table says and reads the
    /// whole context back from the cache, checking each slot.
    struct FakeModel {
        bs: usize,
        kv: Vec<Option<(SeqId, usize, TokenId)>>,
    }

    impl FakeModel {
        fn new(c: &SchedulerConfig) -> Self {
            FakeModel {
                bs: c.block_size,
                kv: vec![None; c.num_blocks * c.block_size],
            }
        }
        fn slot(&self, table: &[BlockId], pos: usize) -> usize {
            table[pos / self.bs].index() * self.bs + pos % self.bs
        }
        fn step(&mut self, batch: &ForwardBatch) -> StepOutput {
            let mut next_tokens = Vec::new();
            for input in &batch.sequences {
                let end = input.start_position + input.tokens.len();
                assert!(
                    input.block_table.len() * self.bs >= end,
                    "block table too short"
                );
                for (i, &t) in input.tokens.iter().enumerate() {
                    let pos = input.start_position + i;
                    let slot = self.slot(&input.block_table, pos);
                    self.kv[slot] = Some((input.seq, pos, t));
                }
                let ctx: Vec<TokenId> = (0..end)
                    .map(|pos| {
                        let (s, p, t) =
                            self.kv[self.slot(&input.block_table, pos)].unwrap_or_else(|| {
                                panic!("seq {} reads unwritten position {pos}", input.seq)
                            });
                        assert_eq!((s, p), (input.seq, pos), "stale KV read");
                        t
                    })
                    .collect();
                next_tokens.push(next_token(&ctx, input.output_index));
            }
            StepOutput {
                next_tokens,
                duration_us: 1000,
            }
        }
        fn export(&self, blocks: &[BlockId]) -> Vec<Option<(SeqId, usize, TokenId)>> {
            blocks
                .iter()
                .flat_map(|b| {
                    self.kv[b.index() * self.bs..(b.index() + 1) * self.bs]
                        .iter()
                        .copied()
                })
                .collect()
        }
        fn import(&mut self, blocks: &[BlockId], data: &[Option<(SeqId, usize, TokenId)>]) {
            for (b, chunk) in blocks.iter().zip(data.chunks(self.bs)) {
                self.kv[b.index() * self.bs..b.index() * self.bs + chunk.len()]
                    .copy_from_slice(chunk);
            }
        }
    }

    fn prompt_of(id: SeqId, len: usize) -> Vec<TokenId> {
        (0..len)
            .map(|i| ((id as usize * 7 + i * 3) % VOCAB as usize) as TokenId + 1)
            .collect()
    }

    fn req(
        id: SeqId,
        prompt_len: usize,
        max_tokens: u32,
        priority: u8,
        arrival_us: u64,
    ) -> Request {
        Request {
            id,
            prompt: prompt_of(id, prompt_len),
            sampling: SamplingParams::greedy(max_tokens),
            priority,
            headroom_blocks: 0,
            arrival_us,
        }
    }

    fn config(num_blocks: usize, block_size: usize, watermark: usize) -> SchedulerConfig {
        SchedulerConfig {
            block_size,
            num_blocks,
            watermark_blocks: watermark,
            max_batch_size: 64,
            max_batched_tokens: 4096,
            max_prompt_tokens: None,
            max_model_len: None,
            mixed_prefill_decode: false,
        }
    }

    /// One scheduler plus its fake model, collecting events.
    struct Harness {
        s: Scheduler,
        m: FakeModel,
        events: Vec<SeqEvent>,
        now: u64,
    }

    impl Harness {
        fn new(c: SchedulerConfig) -> Self {
            Harness {
                m: FakeModel::new(&c),
                s: Scheduler::new(c).unwrap(),
                events: Vec::new(),
                now: 0,
            }
        }
        fn step(&mut self) -> StepPlan {
            self.now += 1000;
            let plan = self.s.schedule(self.now).unwrap();
            self.s.check_invariants().unwrap();
            let out = self.m.step(&plan.batch);
            let ev = self.s.complete(&plan, &out, self.now).unwrap();
            self.s.check_invariants().unwrap();
            self.events.extend(ev);
            plan
        }
        fn run_to_completion(&mut self) {
            for _ in 0..10_000 {
                if self.s.is_idle() {
                    return;
                }
                self.step();
            }
            panic!("did not drain");
        }
        fn tokens_of(&self, seq: SeqId) -> Vec<TokenId> {
            // Contiguous from the first index seen here (0 unless migrated in).
            let mut v = Vec::new();
            let mut first = None;
            for e in &self.events {
                if let SeqEvent::Token {
                    seq: s,
                    token,
                    index,
                } = e
                {
                    if *s == seq {
                        let first = *first.get_or_insert(*index as usize);
                        assert_eq!(
                            *index as usize,
                            first + v.len(),
                            "indices of {seq} not contiguous"
                        );
                        v.push(*token);
                    }
                }
            }
            v
        }
        fn finished(&self, seq: SeqId) -> Option<FinishReason> {
            self.events.iter().find_map(|e| match e {
                SeqEvent::Finished { seq: s, reason, .. } if *s == seq => Some(*reason),
                _ => None,
            })
        }
    }

    fn ids(plan: &StepPlan) -> Vec<SeqId> {
        plan.batch.sequences.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = SchedulerConfig::default();
        assert_eq!(
            (c.block_size, c.num_blocks, c.watermark_blocks),
            (16, 792, 7)
        );
        c.validate().unwrap();
        assert_eq!(c.max_total_tokens(), 12_001);
        let bad = [
            SchedulerConfig {
                block_size: 0,
                ..c.clone()
            },
            SchedulerConfig {
                num_blocks: 0,
                watermark_blocks: 0,
                ..c.clone()
            },
            SchedulerConfig {
                watermark_blocks: 792,
                ..c.clone()
            },
            SchedulerConfig {
                max_batch_size: 0,
                ..c.clone()
            },
            SchedulerConfig {
                max_batched_tokens: 255,
                ..c.clone()
            },
            SchedulerConfig {
                max_prompt_tokens: Some(0),
                ..c.clone()
            },
            SchedulerConfig {
                max_model_len: Some(1),
                ..c.clone()
            },
        ];
        for b in bad {
            let e = Scheduler::new(b.clone()).unwrap_err();
            assert!(matches!(e, SchedulerError::InvalidConfig(_)), "{b:?}");
            assert!(e.to_string().starts_with("invalid scheduler configuration"));
        }
        // Pool-bound: 10 blocks of 4, watermark 2 -> 32 KV tokens.
        let c = config(10, 4, 2);
        assert_eq!((c.max_total_tokens(), c.max_prompt_len()), (33, 32));
        assert_eq!(
            (
                c.max_new_tokens(30),
                c.max_new_tokens(33),
                c.max_new_tokens(0)
            ),
            (3, 0, 0)
        );
        let c = SchedulerConfig {
            max_model_len: Some(20),
            max_prompt_tokens: Some(8),
            ..c
        };
        assert_eq!(
            (
                c.max_total_tokens(),
                c.max_prompt_len(),
                c.max_new_tokens(8)
            ),
            (20, 8, 12)
        );
    }

    #[test]
    fn add_rejects_bad_requests_clearly() {
        let c = SchedulerConfig {
            max_batched_tokens: 24,
            max_batch_size: 4,
            max_prompt_tokens: Some(20),
            ..config(10, 4, 2)
        };
        let mut s = Scheduler::new(c).unwrap();
        s.add(req(1, 4, 4, 0, 0), 0).unwrap();
        let mut nan = req(7, 4, 4, 0, 0);
        nan.sampling.temperature = f32::NAN;
        let mut top_p = req(8, 4, 4, 0, 0);
        top_p.sampling.top_p = 0.0;
        let cases = [
            (req(1, 4, 4, 0, 0), "sequence 1 is already on this instance"),
            (req(2, 0, 4, 0, 0), "request 2 has an empty prompt"),
            (req(3, 4, 0, 0, 0), "request 3 asks for 0 output tokens"),
            (
                req(4, 21, 1, 0, 0),
                "prompt of 21 tokens exceeds the limit of 20",
            ),
            // 20 + 6 - 1 = 25 KV tokens > 24 batched tokens.
            (
                req(5, 20, 6, 0, 0),
                "prompt + max_tokens = 26 tokens exceeds the limit of 25",
            ),
            (req(6, 4, u32::MAX, 0, 0), "exceeds the limit of 25"),
            (nan, "temperature NaN must be finite"),
            (top_p, "top_p 0 must be in (0, 1]"),
        ];
        for (r, want) in cases {
            let e = s.add(r, 0).unwrap_err();
            let boxed: Box<dyn std::error::Error> = Box::new(e);
            assert!(boxed.to_string().contains(want), "{boxed}");
        }
        // Exactly at the limits.
        s.add(req(9, 20, 5, 0, 0), 0).unwrap();
        assert_eq!(
            (s.stats().added, s.stats().rejected, s.num_waiting()),
            (2, 8, 2)
        );
        s.check_invariants().unwrap();
        // Pool bound: 10 blocks of 4 minus watermark 2 = 32 KV tokens.
        let mut s = Scheduler::new(config(10, 4, 2)).unwrap();
        assert!(matches!(
            s.add(req(1, 30, 4, 0, 0), 0),
            Err(SchedulerError::SequenceTooLong { limit: 33, .. })
        ));
        s.add(req(1, 30, 3, 0, 0), 0).unwrap();
    }

    #[test]
    fn admission_respects_watermark_batch_and_token_limits() {
        // 10 blocks of 4, watermark 2: admission may take 8 blocks.
        let mut h = Harness::new(config(10, 4, 2));
        for id in 1..=3 {
            h.s.add(req(id, 16, 4, 0, id), 0).unwrap(); // 4 blocks each
        }
        let p = h.step();
        assert_eq!((p.kind, ids(&p)), (StepKind::Prefill, vec![1, 2]));
        assert_eq!(h.s.waiting_ids(), vec![3]);
        assert_eq!(h.s.block_manager().free_blocks(), 2);
        // Next steps decode 1 and 2 (growing into the watermark), 3 waits.
        let p = h.step();
        assert_eq!((p.kind, ids(&p)), (StepKind::Decode, vec![1, 2]));
        assert_eq!(h.s.block_manager().free_blocks(), 0);
        h.run_to_completion();
        for id in 1..=3 {
            assert_eq!(h.finished(id), Some(FinishReason::Length));
        }

        // Batch size: 2 running at most.
        let mut h = Harness::new(SchedulerConfig {
            max_batch_size: 2,
            ..config(100, 4, 0)
        });
        for id in 1..=3 {
            h.s.add(req(id, 4, 3, 0, id), 0).unwrap();
        }
        assert_eq!(ids(&h.step()), vec![1, 2]);
        assert_eq!(ids(&h.step()), vec![1, 2]);
        // Announced incoming migrations hold batch slots too.
        let mut h = Harness::new(SchedulerConfig {
            max_batch_size: 2,
            ..config(100, 4, 0)
        });
        h.s.set_migrating_in(1);
        for id in 1..=3 {
            h.s.add(req(id, 4, 3, 0, id), 0).unwrap();
        }
        assert_eq!(ids(&h.step()), vec![1]);
        assert!(!h.s.can_accept_migration());

        // Token budget: 20 tokens per step, prompts of 8.
        let mut h = Harness::new(SchedulerConfig {
            max_batched_tokens: 20,
            max_batch_size: 8,
            ..config(100, 4, 0)
        });
        for id in 1..=3 {
            h.s.add(req(id, 8, 3, 0, id), 0).unwrap();
        }
        let p = h.step();
        assert_eq!((ids(&p), p.batch.num_tokens()), (vec![1, 2], 16));
        // vLLM 0.1: a prefill-only step for the third, the others skip a step.
        let p = h.step();
        assert_eq!((p.kind, ids(&p)), (StepKind::Prefill, vec![3]));
        let p = h.step();
        assert_eq!((p.kind, ids(&p)), (StepKind::Decode, vec![1, 2, 3]));
    }

    #[test]
    fn queue_orders_by_priority_then_arrival_then_id() {
        let mut h = Harness::new(SchedulerConfig {
            max_batch_size: 1,
            ..config(100, 4, 0)
        });
        h.s.add(req(10, 4, 1, 0, 5), 0).unwrap();
        h.s.add(req(11, 4, 1, 0, 3), 0).unwrap();
        h.s.add(req(12, 4, 1, 2, 9), 0).unwrap();
        h.s.add(req(13, 4, 1, 1, 1), 0).unwrap();
        h.s.add(req(9, 4, 1, 0, 5), 0).unwrap();
        h.s.add(req(14, 4, 1, 2, 9), 0).unwrap();
        let want = vec![12, 14, 13, 11, 9, 10];
        assert_eq!(h.s.waiting_ids(), want);
        let mut order = Vec::new();
        while !h.s.is_idle() {
            order.extend(ids(&h.step()));
        }
        assert_eq!(order, want);
        let load = h.s.load(0, 0, 0);
        assert_eq!((load.running, load.waiting), (0, 0));
    }

    #[test]
    fn continuous_batching_joins_new_requests_while_others_decode() {
        for mixed in [false, true] {
            let mut h = Harness::new(SchedulerConfig {
                mixed_prefill_decode: mixed,
                ..config(100, 4, 0)
            });
            h.s.add(req(1, 5, 6, 0, 0), 0).unwrap();
            assert_eq!(h.step().kind, StepKind::Prefill);
            assert_eq!(h.step().kind, StepKind::Decode);
            h.s.add(req(2, 3, 3, 0, 1), 0).unwrap();
            let p = h.step();
            if mixed {
                assert_eq!(
                    (p.kind, ids(&p), p.num_decodes(), p.num_prefills()),
                    (StepKind::Mixed, vec![1, 2], 1, 1)
                );
                assert_eq!(p.batch.sequences[0].start_position, 6);
            } else {
                assert_eq!((p.kind, ids(&p)), (StepKind::Prefill, vec![2]));
            }
            let p = h.step();
            assert_eq!((p.kind, ids(&p)), (StepKind::Decode, vec![1, 2]));
            h.run_to_completion();
            for id in [1, 2] {
                let r = req(id, [5, 3][id as usize - 1], [6, 3][id as usize - 1], 0, 0);
                assert_eq!(h.tokens_of(id), reference(&r.prompt, &r.sampling).0);
            }
        }
    }

    #[test]
    fn preemption_picks_lowest_priority_then_youngest_and_recomputes() {
        // 6 blocks of 2, no watermark; three 2-token prompts, 1 block each.
        let mut h = Harness::new(config(6, 2, 0));
        let reqs = [
            req(1, 2, 10, 0, 0),
            req(2, 2, 10, 1, 1),
            req(3, 2, 10, 0, 2),
        ];
        for r in &reqs {
            h.s.add(r.clone(), 0).unwrap();
        }
        assert_eq!(ids(&h.step()), vec![2, 1, 3]); // prefill, priority order
        assert_eq!(h.s.running_ids(), vec![2, 1, 3]);
        assert!(h.step().preempted.is_empty()); // position 2: 6 blocks used
        assert!(h.step().preempted.is_empty()); // position 3
        let p = h.step(); // position 4 needs new blocks: 3 is the victim
        assert_eq!((p.preempted.clone(), ids(&p)), (vec![3], vec![2, 1]));
        let info = h.s.sequence(3).unwrap();
        assert_eq!(
            (
                info.state,
                info.preemptions,
                info.blocks,
                info.output_tokens
            ),
            (SequenceState::Waiting, 1, 0, 3)
        );
        assert_eq!(h.s.load(0, 0, 0).preempted, 1);
        assert!(h.step().preempted.is_empty()); // position 5; 3 cannot come back
        let p = h.step(); // position 6: 1 (priority 0) goes before 2 (younger, priority 1)
        assert_eq!((p.preempted.clone(), ids(&p)), (vec![1], vec![2]));
        // Both preempted wait at the front of the normal class, oldest first.
        assert_eq!(h.s.waiting_ids(), vec![1, 3]);
        assert_eq!(h.s.stats().preemptions, 2);
        h.s.add(req(4, 2, 2, 0, 0), 0).unwrap();
        assert_eq!(h.s.waiting_ids(), vec![1, 3, 4]);
        let before = h.s.sequence_tokens(3).unwrap().1.to_vec();
        assert_eq!(before.len(), 3);
        h.run_to_completion();
        for r in &reqs {
            assert_eq!(
                h.tokens_of(r.id),
                reference(&r.prompt, &r.sampling).0,
                "seq {}",
                r.id
            );
            assert_eq!(h.finished(r.id), Some(FinishReason::Length));
        }
        assert_eq!(h.tokens_of(3)[..3], before[..]);
        let st = *h.s.stats();
        assert!(st.preemptions >= 2 && st.tokens_recomputed > 0);
        assert_eq!(st.finished, 4);
        let finished_preemptions: Vec<u32> = [1, 2, 3]
            .iter()
            .map(|&id| {
                h.events
                    .iter()
                    .find_map(|e| match e {
                        SeqEvent::Finished {
                            seq, preemptions, ..
                        } if *seq == id => Some(*preemptions),
                        _ => None,
                    })
                    .unwrap()
            })
            .collect();
        assert_eq!(
            finished_preemptions[1], 0,
            "the high-priority sequence is never preempted"
        );
        assert!(finished_preemptions[0] >= 1 && finished_preemptions[2] >= 1);
        assert_eq!(h.s.block_manager().free_blocks(), 6);
    }

    #[test]
    fn recompute_prefill_carries_prompt_outputs_and_output_index() {
        let mut s = Scheduler::new(config(3, 2, 0)).unwrap();
        let mut m = FakeModel::new(s.config());
        s.add(req(1, 2, 5, 1, 0), 0).unwrap();
        s.add(req(2, 2, 5, 0, 1), 0).unwrap();
        let mut outs: BTreeMap<SeqId, Vec<TokenId>> = BTreeMap::new();
        let mut run = |s: &mut Scheduler| {
            let p = s.schedule(0).unwrap();
            let o = m.step(&p.batch);
            for e in s.complete(&p, &o, 0).unwrap() {
                if let SeqEvent::Token { seq, token, index } = e {
                    let v = outs.entry(seq).or_default();
                    assert_eq!(index as usize, v.len());
                    v.push(token);
                }
            }
            p
        };
        run(&mut s); // prefill both: 2 blocks
        run(&mut s); // position 2: 1 gets the third block, 2 has none: preempted
        let p = run(&mut s); // 2 cannot be re-admitted; 1 decodes
        assert_eq!(ids(&p), vec![1]);
        assert_eq!(s.sequence(2).unwrap().preemptions, 1);
        let o2 = s.sequence_tokens(2).unwrap().1.to_vec();
        assert_eq!(o2.len(), 1);
        // Drive until 2 is re-admitted and check its recompute prefill.
        loop {
            let p = s.schedule(0).unwrap();
            let hit = p.batch.sequences.iter().find(|i| i.seq == 2).cloned();
            let o = m.step(&p.batch);
            s.complete(&p, &o, 0).unwrap();
            if let Some(i) = hit {
                let mut want = prompt_of(2, 2);
                want.extend(&o2);
                assert_eq!((i.tokens, i.start_position, i.output_index), (want, 0, 1));
                assert_eq!(s.stats().tokens_recomputed, 2);
                assert_eq!(s.sequence(2).unwrap().tokens_recomputed, 2);
                break;
            }
        }
    }

    #[test]
    fn finished_and_aborted_sequences_free_their_blocks() {
        let mut h = Harness::new(config(20, 4, 0));
        let (out, _) = reference(&prompt_of(1, 5), &SamplingParams::greedy(8));
        let mut stop = req(1, 5, 8, 0, 0);
        stop.sampling.stop_token_ids = vec![out[2]];
        let (want, why) = reference(&stop.prompt, &stop.sampling);
        assert!(why == FinishReason::Stop && want.len() <= 3);
        h.s.add(stop, 0).unwrap();
        h.s.add(req(2, 9, 2, 0, 1), 0).unwrap();
        h.s.add(req(3, 4, 5, 0, 2), 0).unwrap();
        h.s.add(req(4, 4, 5, 0, 3), 0).unwrap();
        h.s.add(req(5, 4, 5, 0, 4), 0).unwrap();
        assert!(h.s.abort(5)); // waiting
        assert!(!h.s.abort(5));
        assert!(!h.s.abort(99));
        h.step(); // prefill 1..=4
        assert_eq!(h.s.block_manager().used_blocks(), 2 + 3 + 1 + 1);
        assert!(h.s.abort(3)); // running, between steps
        assert_eq!(h.s.block_manager().used_blocks(), 6);
        // Abort mid-step: its token is dropped, the others are applied.
        let plan = h.s.schedule(0).unwrap();
        assert_eq!(ids(&plan), vec![1, 2, 4]);
        assert!(h.s.abort(4));
        let out = h.m.step(&plan.batch);
        let ev = h.s.complete(&plan, &out, 0).unwrap();
        assert!(ev
            .iter()
            .all(|e| !matches!(e, SeqEvent::Token { seq: 4, .. })));
        // 2 finished by length (2 tokens).
        assert!(ev.contains(&SeqEvent::Finished {
            seq: 2,
            reason: FinishReason::Length,
            output_tokens: 2,
            preemptions: 0
        }));
        h.events.extend(ev);
        h.s.check_invariants().unwrap();
        h.run_to_completion();
        assert_eq!(h.finished(1), Some(FinishReason::Stop));
        assert_eq!(h.tokens_of(1), want);
        assert_eq!(h.s.block_manager().free_blocks(), 20);
        let st = h.s.stats();
        assert_eq!((st.finished, st.aborted), (2, 3));
    }

    #[test]
    fn step_protocol_errors_and_abandon() {
        let mut h = Harness::new(config(20, 4, 0));
        h.s.add(req(1, 5, 4, 0, 0), 0).unwrap();
        let empty = StepOutput {
            next_tokens: vec![],
            duration_us: 0,
        };
        let plan = h.s.schedule(0).unwrap();
        assert_eq!(
            h.s.schedule(0),
            Err(SchedulerError::StepInFlight { step: plan.step })
        );
        assert_eq!(
            h.s.complete(&plan, &empty, 0),
            Err(SchedulerError::OutputMismatch {
                expected: 1,
                got: 0
            })
        );
        assert_eq!(h.s.detach(1), Err(SchedulerError::SequenceInFlight(1)));
        // The backend failed: the sequence goes back to the queue.
        assert_eq!(h.s.abandon(&plan), Ok(vec![1]));
        h.s.check_invariants().unwrap();
        let out = h.m.step(&plan.batch);
        assert_eq!(
            h.s.complete(&plan, &out, 0),
            Err(SchedulerError::StalePlan {
                step: plan.step,
                in_flight: None
            })
        );
        assert_eq!(h.s.waiting_ids(), vec![1]);
        assert_eq!(h.s.stats().abandoned_steps, 1);
        // Empty plans need nothing.
        let mut idle = Scheduler::new(config(4, 4, 0)).unwrap();
        let p = idle.schedule(0).unwrap();
        assert!(p.is_empty() && p.kind == StepKind::Idle);
        assert_eq!(idle.complete(&p, &empty, 0), Ok(vec![]));
        assert_eq!(idle.schedule(0).unwrap().step, p.step + 1);
        // A decode step abandoned keeps outputs and recomputes.
        h.step();
        h.step();
        let plan = h.s.schedule(0).unwrap();
        assert_eq!(plan.kind, StepKind::Decode);
        h.s.abandon(&plan).unwrap();
        h.run_to_completion();
        let r = req(1, 5, 4, 0, 0);
        assert_eq!(h.tokens_of(1), reference(&r.prompt, &r.sampling).0);
    }

    fn migrate(src: &mut Harness, dst: &mut Harness, seq: SeqId) -> Result<(), SchedulerError> {
        let table = src.s.block_table(seq)?.to_vec();
        let n = dst
            .s
            .block_manager()
            .blocks_needed(src.s.block_manager().num_tokens(seq)?);
        let r = dst.s.reserve_blocks(n)?;
        let data = src.m.export(&table);
        let blocks = dst.s.reservation_blocks(r)?.to_vec();
        dst.m.import(&blocks, &data);
        let d = src.s.detach(seq)?;
        assert_eq!(d.block_table, table);
        if let Err(e) = dst.s.attach(&d, r, dst.now) {
            dst.s.release_reservation(r).unwrap();
            src.s.requeue(&d, src.now).unwrap();
            return Err(e);
        }
        Ok(())
    }

    #[test]
    fn detach_attach_round_trip_keeps_the_token_stream() {
        let mut a = Harness::new(config(20, 4, 1));
        let mut b = Harness::new(config(30, 4, 1));
        let r = Request {
            priority: 1,
            headroom_blocks: 3,
            ..req(7, 9, 12, 0, 5)
        };
        a.s.add(r.clone(), 0).unwrap();
        a.s.add(req(8, 3, 12, 0, 6), 0).unwrap();
        assert_eq!(a.s.detach(7), Err(SchedulerError::NotRunning(7)));
        assert_eq!(a.s.detach(70), Err(SchedulerError::UnknownSequence(70)));
        for _ in 0..4 {
            a.step();
        }
        let cands = a.s.migration_candidates();
        assert_eq!(
            cands[0],
            MigrationCandidate {
                id: 7,
                priority: 1,
                blocks: 3,
                prompt_tokens: 9,
                output_tokens: 4,
                arrival_us: 5
            }
        );
        assert_eq!(cands.len(), 2);
        // Error paths leave everything as it was.
        let d8 = {
            let mut probe = a.s.clone();
            probe.detach(8).unwrap()
        };
        let r_small = b.s.reserve_blocks(1).unwrap();
        assert!(matches!(
            b.s.attach(&d8, r_small, 0),
            Err(SchedulerError::Block(
                BlockError::ReservationTooSmall { .. }
            ))
        ));
        b.s.release_reservation(r_small).unwrap();
        b.s.check_invariants().unwrap();

        migrate(&mut a, &mut b, 7).unwrap();
        assert!(!a.s.contains(7) && b.s.contains(7));
        assert_eq!(
            a.s.block_manager().used_blocks(),
            a.s.block_manager().blocks_needed(3 + 4 - 1)
        );
        assert_eq!(b.s.sequence(7).unwrap().state, SequenceState::Running);
        assert_eq!(b.s.load(1, 0, 0).headroom_blocks, 3);
        // Attaching twice is refused.
        let r2 = b.s.reserve_blocks(4).unwrap();
        let mut dup = d8.clone();
        dup.id = 7;
        assert_eq!(
            b.s.attach(&dup, r2, 0),
            Err(SchedulerError::DuplicateSequence(7))
        );
        b.s.release_reservation(r2).unwrap();
        a.run_to_completion();
        b.run_to_completion();
        let mut tokens = a.tokens_of(7);
        tokens.extend(b.tokens_of(7));
        assert_eq!(tokens, reference(&r.prompt, &r.sampling).0);
        let idx: Vec<u32> = b
            .events
            .iter()
            .filter_map(|e| match e {
                SeqEvent::Token { seq: 7, index, .. } => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(idx, (4..12).collect::<Vec<_>>());
        assert_eq!(b.finished(7), Some(FinishReason::Length));
        assert_eq!((a.s.stats().detached, b.s.stats().attached), (1, 1));
        for h in [&a, &b] {
            assert_eq!(h.s.block_manager().free_blocks(), h.s.config().num_blocks);
        }
    }

    #[test]
    fn attach_refuses_when_batch_full_or_block_size_differs_and_requeue_recovers() {
        let mut a = Harness::new(config(20, 4, 0));
        let mut b = Harness::new(SchedulerConfig {
            max_batch_size: 1,
            ..config(20, 4, 0)
        });
        a.s.add(req(1, 4, 6, 0, 0), 0).unwrap();
        b.s.add(req(2, 4, 6, 0, 0), 0).unwrap();
        a.step();
        b.step();
        let e = migrate(&mut a, &mut b, 1).unwrap_err();
        assert_eq!(e, SchedulerError::BatchFull { running: 1, max: 1 });
        assert_eq!(a.s.sequence(1).unwrap().state, SequenceState::Waiting);
        assert_eq!(b.s.block_manager().reserved_blocks(), 0);
        let mut c = Harness::new(config(20, 8, 0));
        a.step(); // re-admit 1 (recompute)
        let e = migrate(&mut a, &mut c, 1).unwrap_err();
        assert!(
            matches!(e, SchedulerError::InvalidSequence { seq: 1, .. }),
            "{e}"
        );
        a.run_to_completion();
        let r = req(1, 4, 6, 0, 0);
        assert_eq!(a.tokens_of(1), reference(&r.prompt, &r.sampling).0);
    }

    #[test]
    fn load_fills_every_counter() {
        let mut h = Harness::new(SchedulerConfig {
            max_batch_size: 2,
            ..config(20, 4, 2)
        });
        let hp = Request {
            priority: 1,
            headroom_blocks: 5,
            ..req(1, 6, 8, 0, 0)
        };
        h.s.add(hp, 0).unwrap();
        h.s.add(req(2, 4, 8, 0, 1), 0).unwrap();
        h.s.add(
            Request {
                headroom_blocks: 2,
                ..req(3, 9, 8, 0, 2)
            },
            0,
        )
        .unwrap();
        h.s.add(req(4, 13, 8, 2, 3), 0).unwrap();
        h.step(); // admits 4 and 1 (batch of 2)
        let r = h.s.reserve_blocks(3).unwrap();
        h.s.set_draining(true);
        h.s.set_migrating_in(1);
        h.s.set_migrating_out(2);
        let l = h.s.load(9, 1234, 56);
        let want = InstanceLoad {
            instance: 9,
            timestamp_us: 1234,
            block_size: 4,
            total_blocks: 20,
            used_blocks: 4 + 2 + 3,
            watermark_blocks: 2,
            running: 2,
            waiting: 2,
            preempted: 0,
            head_of_line_demand_blocks: 1,
            waiting_demand_blocks: 1 + 3,
            high_priority_requests: 2,
            // The largest of 5 and 2: one shared headroom.
            headroom_blocks: 5,
            migrating_out: 2,
            migrating_in: 1,
            step_latency_us: 56,
            draining: true,
        };
        assert_eq!(l, want);
        assert!(h.s.draining() && h.s.migrating_in() == 1 && h.s.migrating_out() == 2);
        h.s.release_reservation(r).unwrap();
        h.s.set_migrating_in(0);
        h.run_to_completion();
        assert_eq!(h.s.load(9, 0, 0).used_blocks, 0);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::{RngAlgorithm, RngSeed};

        #[derive(Clone, Debug)]
        enum Op {
            Add {
                inst: usize,
                prompt: usize,
                max_tokens: u32,
                priority: u8,
                headroom: u32,
                stop: bool,
            },
            /// Re-add an id already used (must be refused while it is live).
            AddDuplicate(usize, usize),
            Step(usize),
            /// Schedule, abort one sequence of the plan, complete.
            AbortMidStep(usize, usize),
            /// Schedule, then the backend fails.
            FailStep(usize),
            Abort(usize),
            /// Migrate the i-th running sequence of an instance to the other.
            Migrate(usize, usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0usize..2, 1usize..14, 1u32..14, 0u8..3, 0u32..3, any::<bool>()).prop_map(
                    |(inst, prompt, max_tokens, priority, headroom, stop)| Op::Add { inst, prompt, max_tokens, priority, headroom, stop }
                ),
                1 => (0usize..2, any::<usize>()).prop_map(|(i, k)| Op::AddDuplicate(i, k)),
                8 => (0usize..2).prop_map(Op::Step),
                1 => (0usize..2, any::<usize>()).prop_map(|(i, k)| Op::AbortMidStep(i, k)),
                1 => (0usize..2).prop_map(Op::FailStep),
                1 => any::<usize>().prop_map(Op::Abort),
                2 => (0usize..2, any::<usize>()).prop_map(|(i, k)| Op::Migrate(i, k)),
            ]
        }

        fn cfg() -> impl Strategy<Value = SchedulerConfig> {
            (
                1usize..5,
                4usize..30,
                0usize..=20,
                1usize..6,
                0usize..60,
                any::<bool>(),
            )
                .prop_map(
                    |(block_size, num_blocks, wm_pct, max_batch_size, extra_tokens, mixed)| {
                        SchedulerConfig {
                            block_size,
                            num_blocks,
                            watermark_blocks: num_blocks * wm_pct / 100,
                            max_batch_size,
                            max_batched_tokens: max_batch_size + 4 + extra_tokens,
                            max_prompt_tokens: None,
                            max_model_len: None,
                            mixed_prefill_decode: mixed,
                        }
                    },
                )
        }

        #[derive(Clone, Debug, PartialEq)]
        enum Fate {
            Live,
            Finished(FinishReason),
            Aborted,
        }

        struct World {
            h: [Harness; 2],
            reqs: BTreeMap<SeqId, Request>,
            fate: BTreeMap<SeqId, Fate>,
            tokens: BTreeMap<SeqId, Vec<TokenId>>,
            next_id: SeqId,
        }

        impl World {
            fn absorb(&mut self, events: Vec<SeqEvent>) -> Result<(), TestCaseError> {
                for e in events {
                    match e {
                        SeqEvent::Token { seq, token, index } => {
                            prop_assert_eq!(&self.fate[&seq], &Fate::Live);
                            let v = self.tokens.entry(seq).or_default();
                            prop_assert_eq!(
                                index as usize,
                                v.len(),
                                "seq {} index gap or duplicate",
                                seq
                            );
                            v.push(token);
                        }
                        SeqEvent::Finished {
                            seq,
                            reason,
                            output_tokens,
                            ..
                        } => {
                            prop_assert_eq!(
                                &self.fate[&seq],
                                &Fate::Live,
                                "seq {} finished twice",
                                seq
                            );
                            let r = &self.reqs[&seq];
                            let (want, want_reason) = reference(&r.prompt, &r.sampling);
                            prop_assert_eq!(
                                &self.tokens[&seq],
                                &want,
                                "seq {} output differs",
                                seq
                            );
                            prop_assert_eq!(
                                (reason, output_tokens as usize),
                                (want_reason, want.len())
                            );
                            self.fate.insert(seq, Fate::Finished(reason));
                        }
                    }
                }
                Ok(())
            }

            fn step(
                &mut self,
                i: usize,
                abort_pick: Option<usize>,
                fail: bool,
            ) -> Result<(), TestCaseError> {
                let h = &mut self.h[i];
                h.now += 1000;
                let plan = h.s.schedule(h.now).unwrap();
                h.s.check_invariants().map_err(TestCaseError::fail)?;
                if let (Some(k), false) = (abort_pick, plan.is_empty()) {
                    let seq = plan.batch.sequences[k % plan.batch.sequences.len()].seq;
                    prop_assert!(h.s.abort(seq));
                    self.fate.insert(seq, Fate::Aborted);
                }
                if fail {
                    h.s.abandon(&plan).unwrap();
                    return Ok(());
                }
                let out = h.m.step(&plan.batch);
                let ev = h.s.complete(&plan, &out, h.now).unwrap();
                self.absorb(ev)
            }

            fn check(&self) -> Result<(), TestCaseError> {
                for h in &self.h {
                    h.s.check_invariants().map_err(TestCaseError::fail)?;
                    let bm = h.s.block_manager();
                    prop_assert_eq!(
                        bm.free_blocks() + bm.used_blocks() + bm.reserved_blocks(),
                        bm.total_blocks()
                    );
                    prop_assert_eq!(bm.reserved_blocks(), 0);
                    let l = h.s.load(0, h.now, 0);
                    prop_assert_eq!((l.running + l.waiting) as usize, h.s.num_sequences());
                    prop_assert!(l.preempted <= l.waiting);
                }
                // Every live request is on exactly one instance.
                for (id, f) in &self.fate {
                    let here = self.h.iter().filter(|h| h.s.contains(*id)).count();
                    prop_assert_eq!(
                        here,
                        usize::from(*f == Fate::Live),
                        "seq {} fate {:?}",
                        id,
                        f
                    );
                }
                Ok(())
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 256,
                failure_persistence: None,
                rng_algorithm: RngAlgorithm::ChaCha,
                rng_seed: RngSeed::Fixed(0x5c4e_d01e),
                ..ProptestConfig::default()
            })]

            #[test]
            fn random_workloads_finish_every_request_exactly_once(
                c0 in cfg(),
                extra_blocks in 0usize..10,
                ops in proptest::collection::vec(op(), 1..150),
            ) {
                let c1 = SchedulerConfig { num_blocks: c0.num_blocks + extra_blocks, ..c0.clone() };
                let mut w = World {
                    h: [Harness::new(c0), Harness::new(c1)],
                    reqs: BTreeMap::new(),
                    fate: BTreeMap::new(),
                    tokens: BTreeMap::new(),
                    next_id: 1,
                };
                for op in &ops {
                    match *op {
                        Op::Add { inst, prompt, max_tokens, priority, headroom, stop } => {
                            let id = w.next_id;
                            w.next_id += 1;
                            let mut r = Request { headroom_blocks: headroom, ..req(id, prompt, max_tokens, priority, w.h[inst].now) };
                            if stop {
                                r.sampling.stop_token_ids = vec![0];
                            }
                            let c = w.h[inst].s.config();
                            let fits = prompt + max_tokens as usize <= c.max_total_tokens();
                            let res = w.h[inst].s.add(r.clone(), w.h[inst].now);
                            prop_assert_eq!(res.is_ok(), fits, "{:?}", res);
                            if fits {
                                w.reqs.insert(id, r);
                                w.fate.insert(id, Fate::Live);
                            } else {
                                let refused = matches!(res, Err(SchedulerError::SequenceTooLong { .. } | SchedulerError::PromptTooLong { .. }));
                                prop_assert!(refused);
                            }
                        }
                        Op::AddDuplicate(inst, k) => {
                            let live: Vec<SeqId> = w.h[inst].s.waiting_ids().into_iter().chain(w.h[inst].s.running_ids()).collect();
                            if let Some(&id) = live.get(k % live.len().max(1)) {
                                let r = w.reqs[&id].clone();
                                prop_assert_eq!(w.h[inst].s.add(r, 0), Err(SchedulerError::DuplicateSequence(id)));
                            }
                        }
                        Op::Step(i) => w.step(i, None, false)?,
                        Op::AbortMidStep(i, k) => w.step(i, Some(k), false)?,
                        Op::FailStep(i) => w.step(i, None, true)?,
                        Op::Abort(k) => {
                            if w.next_id > 1 {
                                let id = 1 + (k as u64) % (w.next_id - 1);
                                let hits = w.h.iter_mut().map(|h| h.s.abort(id)).filter(|b| *b).count();
                                let was_live = w.fate.get(&id) == Some(&Fate::Live);
                                prop_assert_eq!(hits, usize::from(was_live));
                                if was_live {
                                    w.fate.insert(id, Fate::Aborted);
                                }
                            }
                        }
                        Op::Migrate(i, k) => {
                            let cands = w.h[i].s.migration_candidates();
                            if !cands.is_empty() {
                                let seq = cands[k % cands.len()].id;
                                let (x, y) = w.h.split_at_mut(1);
                                let (src, dst) = if i == 0 { (&mut x[0], &mut y[0]) } else { (&mut y[0], &mut x[0]) };
                                let _ = migrate(src, dst, seq);
                            }
                        }
                    }
                    w.check()?;
                }
                // Drive to completion: nothing lost, nothing duplicated.
                let mut steps = 0;
                while w.h.iter().any(|h| !h.s.is_idle()) {
                    steps += 1;
                    prop_assert!(steps < 20_000, "did not drain");
                    for i in 0..2 {
                        w.step(i, None, false)?;
                    }
                }
                w.check()?;
                for (id, f) in &w.fate {
                    prop_assert_ne!(f, &Fate::Live, "seq {} never finished", id);
                }
                for h in &w.h {
                    let st = h.s.stats();
                    prop_assert_eq!(h.s.block_manager().free_blocks(), h.s.config().num_blocks);
                        prop_assert_eq!(st.added + st.attached + st.requeued, st.finished + st.aborted + st.detached);
                }
            }
        }
    }
}
