//! The model backend interface: run one engine step's forward pass.
//!
//! The local scheduler decides *what* runs in a step (a [`ForwardBatch`]); a
//! backend computes it and returns one next token per sequence. Backends:
//! the candle transformer (real decoding over the paged KV cache) and the
//! latency model (simulation: tokens are placeholders, the step time comes
//! from a profile). A backend never decides scheduling and never touches
//! block allocation: it reads and writes the KV slots it is given.

use crate::{BlockId, SeqId, TokenId};

/// One sequence's share of a forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceInput {
    pub seq: SeqId,
    /// Tokens to run through the model this step: the whole prompt (plus any
    /// output already produced, when recomputing after preemption) for a
    /// prefill, or the last generated token for a decode.
    pub tokens: Vec<TokenId>,
    /// Position of `tokens[0]` in the sequence (0 for a prefill).
    pub start_position: usize,
    /// The sequence's block table, covering positions
    /// `0 .. start_position + tokens.len()`.
    pub block_table: Vec<BlockId>,
    /// Sampling of the token that follows: temperature, top-p, seed.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Index of the token being sampled among the request's outputs (the
    /// seeded sampler's counter: sampling is reproducible across preemption,
    /// recompute and migration).
    pub output_index: u32,
}

/// Everything one engine step computes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardBatch {
    pub sequences: Vec<SequenceInput>,
}

impl ForwardBatch {
    /// Total tokens processed this step.
    pub fn num_tokens(&self) -> usize {
        self.sequences.iter().map(|s| s.tokens.len()).sum()
    }
    /// Tokens of prefill (more than one token, or starting at 0).
    pub fn prefill_tokens(&self) -> usize {
        self.sequences
            .iter()
            .filter(|s| s.start_position == 0 || s.tokens.len() > 1)
            .map(|s| s.tokens.len())
            .sum()
    }
}

/// What a step produced.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// One sampled next token per input sequence, in input order.
    pub next_tokens: Vec<TokenId>,
    /// How long the step took (measured for real backends, modelled for the
    /// latency model), in microseconds.
    pub duration_us: u64,
}

/// Errors a backend reports (a failed step fails its whole batch).
#[derive(Debug)]
pub struct BackendError(pub String);

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "model backend: {}", self.0)
    }
}

impl std::error::Error for BackendError {}

/// A model that can run engine steps.
pub trait ModelBackend: Send {
    /// Human-readable description: which model, which weights, which device.
    fn describe(&self) -> String;
    /// Size of the vocabulary, when the backend has one: token ids must be
    /// below it (checked when a request is added, not mid-step).
    fn vocab_size(&self) -> Option<usize> {
        None
    }
    /// Runs one forward pass over `batch`, writing the KV of every input
    /// token into the slots its block table names, and samples one token per
    /// sequence.
    fn step(&mut self, batch: &ForwardBatch) -> Result<StepOutput, BackendError>;
    /// Bytes of KV cache per block (all layers, K and V): the unit of
    /// migration transfer.
    fn kv_bytes_per_block(&self) -> usize;
    /// Copies the KV of `blocks` out (for migration), in block order.
    fn export_blocks(&self, blocks: &[BlockId]) -> Result<Vec<u8>, BackendError>;
    /// Writes KV previously exported into `blocks` (same count and order).
    fn import_blocks(&mut self, blocks: &[BlockId], data: &[u8]) -> Result<(), BackendError>;
}
