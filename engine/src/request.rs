//! A request as the engine sees it: its tokens so far, its sampling state and
//! where it is in its life. Owned by the local scheduler; no I/O.

use crate::SeqId;

/// Token id in the model's vocabulary.
pub type TokenId = u32;

/// How the next token is picked.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise softmax temperature.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Seed of this request's sampler (seeded sampling is reproducible:
    /// the n-th output token depends only on the seed, n and the logits).
    pub seed: u64,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Generation stops after any of these tokens (the model's EOS included
    /// by the caller when wanted).
    pub stop_token_ids: Vec<TokenId>,
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens, no stop tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_tokens,
            stop_token_ids: Vec::new(),
        }
    }
}

/// Why a request stopped generating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// Produced `max_tokens` tokens.
    Length,
    /// Produced a stop token (included in the output).
    Stop,
    /// Cancelled by the client or the host.
    Aborted,
}

/// A request entering the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: SeqId,
    pub prompt: Vec<TokenId>,
    pub sampling: SamplingParams,
    /// Scheduling priority (0 = normal; higher is served first, preempted last).
    pub priority: u8,
    /// KV blocks the priority policy asked to keep free around this request.
    pub headroom_blocks: u32,
    /// Arrival time in microseconds (the caller's clock).
    pub arrival_us: u64,
}
