//! What the engine's integration tests share: the tiny random model engine
//! and seeded requests.
#![allow(dead_code)] // each test binary uses a part

use candle_core::Device;
use llumen_engine::candle::{CandleBackend, LlamaConfig};
use llumen_engine::{Engine, Request, SamplingParams, SchedulerConfig, SeqId, TokenId};

pub const BLOCK: usize = 16;
pub const WEIGHT_SEED: u64 = 7;

/// An engine over the tiny random Llama (same weights everywhere, so KV moves
/// between engines) with `num_blocks` KV blocks.
pub fn engine(num_blocks: usize) -> Engine<CandleBackend> {
    let backend = CandleBackend::random(
        LlamaConfig::test_tiny(),
        WEIGHT_SEED,
        num_blocks,
        BLOCK,
        Device::Cpu,
    )
    .expect("tiny random model");
    Engine::new(SchedulerConfig::with_blocks(num_blocks, BLOCK), backend).expect("engine")
}

/// A prompt of `len` tokens drawn from a seeded sequence (ids < 4096, the
/// tiny model's vocabulary).
pub fn prompt(seed: u64, len: usize) -> Vec<TokenId> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 4000) as TokenId + 10
        })
        .collect()
}

/// A greedy, normal-priority request with a seeded prompt.
pub fn normal_request(id: SeqId, prompt_len: usize, max_tokens: u32) -> Request {
    Request {
        id,
        prompt: prompt(id, prompt_len),
        sampling: SamplingParams::greedy(max_tokens),
        priority: 0,
        headroom_blocks: 0,
        arrival_us: id,
    }
}
