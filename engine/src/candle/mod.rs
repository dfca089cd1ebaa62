//! The real-transformer model backend: a Llama-family decoder (SmolLM2-135M
//! or a random-weight test model) run with candle-core over a paged KV cache.
//!
//! - [`config`]: the model's shape ([`LlamaConfig`]) and presets.
//! - [`weights`]: weights as candle tensors ([`LlamaWeights`]), their layout
//!   contract for loaders, deterministic random weights.
//! - [`forward`]: the forward pass (RMSNorm, RoPE, GQA attention, SwiGLU)
//!   over the paged KV storage, batch-invariant by construction.
//! - [`kernel`]: the batch-invariant CPU matrix product behind the linear
//!   layers (a candle custom op; AVX2+FMA where available).
//! - [`sampler`]: greedy and seeded temperature / top-p sampling.
//! - this file: [`CandleBackend`], the [`ModelBackend`] implementation:
//!   input validation, the step, KV export/import for migration.
//!
//! **Owns**: the KV memory that [`BlockId`]s index (`num_blocks` blocks of
//! `block_size` tokens, all layers, K and V, f32) and the arithmetic of a
//! step. **Never touches**: scheduling, block allocation (block tables are
//! given by the caller's block manager), QUIC, Wasm, sled, files (a weight
//! loader fills [`LlamaWeights`] elsewhere). The only clock it reads is the
//! step's own duration, which [`StepOutput::duration_us`] reports.
//!
//! # KV export format
//!
//! [`ModelBackend::export_blocks`] returns, for each requested block in
//! order, [`CandleBackend::kv_bytes_per_block`] bytes: for each layer
//! `0..layers`, that block's K then its V, each `[block_size, kv_heads,
//! head_dim]` f32 little-endian, row-major (slot offset, KV head, dim).
//! Blocks are independent chunks, so a migration may ship any subset of a
//! sequence's blocks in any number of stages. Rows past a sequence's last
//! token carry whatever the slot last held; they are never read.

pub mod config;
pub mod forward;
pub mod gguf;
pub mod kernel;
pub mod sampler;
pub mod weights;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::time::Instant;

pub use candle_core::{Device, Tensor};
pub use config::LlamaConfig;
pub use forward::{LinearKernel, DEFAULT_CHUNK_ROWS};
pub use gguf::{load_gguf, GgufError, GgufFile, GgufModel};
pub use weights::{LayerWeights, LlamaWeights, WeightSource};

use crate::{BackendError, BlockId, ForwardBatch, ModelBackend, StepOutput, TokenId};
use forward::{KvCache, Model, SeqPlan, StepPlan};

fn candle_err(e: candle_core::Error) -> BackendError {
    BackendError(format!("candle: {e}"))
}

/// A Llama-family model on a candle [`Device`] with its paged KV cache.
pub struct CandleBackend {
    model: Model,
    cache: KvCache,
    source: WeightSource,
}

impl CandleBackend {
    /// A backend over `weights` (checked against `config`) with a KV cache of
    /// `num_blocks` blocks of `block_size` tokens on `device`. Weights not on
    /// `device` are copied there.
    pub fn new(
        config: LlamaConfig,
        weights: LlamaWeights,
        num_blocks: usize,
        block_size: usize,
        device: Device,
    ) -> Result<Self, BackendError> {
        config.validate().map_err(BackendError)?;
        weights.validate(&config).map_err(BackendError)?;
        if block_size == 0 {
            return Err(BackendError("block_size must be positive".into()));
        }
        if num_blocks
            .checked_mul(block_size)
            .is_none_or(|slots| slots > u32::MAX as usize)
        {
            return Err(BackendError(format!(
                "{num_blocks} blocks of {block_size} tokens: too many KV slots (at most 2^32)"
            )));
        }
        let weights = if weights.device().same_device(&device) {
            weights
        } else {
            to_device(weights, &device)?
        };
        let source = weights.source.clone();
        let cache = KvCache::new(&config, num_blocks, block_size, &device).map_err(candle_err)?;
        let kernel = LinearKernel::default_for(&device);
        let model = Model::new(config, weights, kernel).map_err(candle_err)?;
        Ok(Self {
            model,
            cache,
            source,
        })
    }

    /// Random weights of `config` (see [`LlamaWeights::random`]) on `device`.
    pub fn random(
        config: LlamaConfig,
        seed: u64,
        num_blocks: usize,
        block_size: usize,
        device: Device,
    ) -> Result<Self, BackendError> {
        let weights = LlamaWeights::random(&config, seed, &device)?;
        Self::new(config, weights, num_blocks, block_size, device)
    }

    /// Changes how linear layers are computed (default:
    /// [`LinearKernel::default_for`] the device). [`LinearKernel::Batched`]
    /// is not batch-invariant, and [`LinearKernel::RowDot`] runs on the CPU
    /// only. Backends that exchange KV (migration) must use the same kernel
    /// to stay bit-identical.
    pub fn with_linear_kernel(mut self, kernel: LinearKernel) -> Self {
        self.model.kernel = kernel;
        self
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.model.config
    }
    pub fn device(&self) -> &Device {
        &self.model.device
    }
    pub fn num_blocks(&self) -> usize {
        self.cache.num_blocks
    }
    pub fn block_size(&self) -> usize {
        self.cache.block_size
    }
    pub fn linear_kernel(&self) -> LinearKernel {
        self.model.kernel
    }

    /// Validates `batch` and turns it into rows and slots.
    fn plan(&self, batch: &ForwardBatch) -> Result<StepPlan, BackendError> {
        let c = &self.model.config;
        let bs = self.cache.block_size;
        let mut plan = StepPlan {
            tokens: Vec::new(),
            positions: Vec::new(),
            write_slots: Vec::new(),
            seqs: Vec::new(),
        };
        let mut seen = HashSet::new();
        let mut written = HashSet::new();
        for s in &batch.sequences {
            let id = s.seq;
            if !seen.insert(id) {
                return Err(BackendError(format!(
                    "sequence {id} appears twice in the batch"
                )));
            }
            if s.tokens.is_empty() {
                return Err(BackendError(format!("sequence {id}: no tokens to run")));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(BackendError(format!(
                    "sequence {id}: token id {t} out of vocabulary (size {})",
                    c.vocab
                )));
            }
            let end = s.start_position.saturating_add(s.tokens.len());
            if end > c.max_position {
                return Err(BackendError(format!(
                    "sequence {id}: positions {}..{end} exceed the model's context of {} tokens",
                    s.start_position, c.max_position
                )));
            }
            let needed = end.div_ceil(bs);
            if s.block_table.len() < needed {
                return Err(BackendError(format!(
                    "sequence {id}: block table has {} blocks, positions 0..{end} need {needed} (block size {bs})",
                    s.block_table.len()
                )));
            }
            if let Some(b) = s
                .block_table
                .iter()
                .find(|b| b.index() >= self.cache.num_blocks)
            {
                return Err(BackendError(format!(
                    "sequence {id}: block {} out of range (the cache has {} blocks)",
                    b.0, self.cache.num_blocks
                )));
            }
            if !(s.temperature.is_finite() && s.temperature >= 0.0) {
                return Err(BackendError(format!(
                    "sequence {id}: temperature {} must be finite and >= 0",
                    s.temperature
                )));
            }
            if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                return Err(BackendError(format!(
                    "sequence {id}: top_p {} must be in (0, 1]",
                    s.top_p
                )));
            }
            let slot = |p: usize| (s.block_table[p / bs].index() * bs + p % bs) as u32;
            let first_row = plan.tokens.len();
            for (i, &t) in s.tokens.iter().enumerate() {
                let p = s.start_position + i;
                let sl = slot(p);
                if !written.insert(sl) {
                    return Err(BackendError(format!(
                        "sequence {id}: position {p} writes KV slot {sl} (block {}), which another sequence of the batch also writes",
                        s.block_table[p / bs].0
                    )));
                }
                plan.tokens.push(t);
                plan.positions.push(p as u32);
                plan.write_slots.push(sl);
            }
            plan.seqs.push(SeqPlan {
                first_row,
                rows: s.tokens.len(),
                start: s.start_position,
                ctx_slots: (0..end).map(slot).collect(),
            });
        }
        Ok(plan)
    }

    /// Runs `batch` and returns each sequence's next-token logits (rows of
    /// `vocab` f32, in input order) without sampling. The KV of every input
    /// token is written, exactly as [`ModelBackend::step`] does.
    pub fn forward_logits(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, BackendError> {
        if batch.sequences.is_empty() {
            return Ok(Vec::new());
        }
        let plan = self.plan(batch)?;
        let logits = self
            .model
            .forward(&mut self.cache, &plan)
            .map_err(candle_err)?;
        logits.to_vec2::<f32>().map_err(candle_err)
    }

    fn check_blocks(&self, blocks: &[BlockId]) -> Result<(), BackendError> {
        let mut seen = HashSet::new();
        for b in blocks {
            if b.index() >= self.cache.num_blocks {
                return Err(BackendError(format!(
                    "block {} out of range (the cache has {} blocks)",
                    b.0, self.cache.num_blocks
                )));
            }
            if !seen.insert(b.0) {
                return Err(BackendError(format!("block {} listed twice", b.0)));
            }
        }
        Ok(())
    }

    fn block_floats(&self) -> usize {
        self.cache.block_size * self.model.config.kv_dim()
    }
}

/// Copies every weight tensor to `device`.
fn to_device(w: LlamaWeights, device: &Device) -> Result<LlamaWeights, BackendError> {
    let mv = |t: &Tensor| t.to_device(device).map_err(candle_err);
    let mut layers = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        layers.push(LayerWeights {
            attn_norm: mv(&l.attn_norm)?,
            wq: mv(&l.wq)?,
            wk: mv(&l.wk)?,
            wv: mv(&l.wv)?,
            wo: mv(&l.wo)?,
            ffn_norm: mv(&l.ffn_norm)?,
            w_gate: mv(&l.w_gate)?,
            w_up: mv(&l.w_up)?,
            w_down: mv(&l.w_down)?,
        });
    }
    Ok(LlamaWeights {
        source: w.source.clone(),
        embed: mv(&w.embed)?,
        layers,
        norm: mv(&w.norm)?,
        lm_head: w.lm_head.as_ref().map(mv).transpose()?,
    })
}

fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

impl ModelBackend for CandleBackend {
    fn vocab_size(&self) -> Option<usize> {
        Some(self.model.config.vocab)
    }
    fn describe(&self) -> String {
        let c = &self.model.config;
        let mode = match self.model.kernel {
            LinearKernel::RowDot => {
                format!("batch-invariant row-dot linears ({})", kernel::kernel_isa())
            }
            LinearKernel::FixedChunk(n) => format!("batch-invariant matmuls of {n} rows"),
            LinearKernel::Batched => "batched matmuls (not batch-invariant)".to_string(),
        };
        format!(
            "candle {}, {}, f32 on {}, KV cache {} blocks x {} tokens ({:.1} MiB), {mode}",
            c.shape_summary(),
            self.source,
            device_name(&self.model.device),
            self.cache.num_blocks,
            self.cache.block_size,
            (self.cache.num_blocks * self.kv_bytes_per_block()) as f64 / (1024.0 * 1024.0)
        )
    }

    fn step(&mut self, batch: &ForwardBatch) -> Result<StepOutput, BackendError> {
        let t0 = Instant::now();
        let logits = self.forward_logits(batch)?;
        let next_tokens: Vec<TokenId> = batch
            .sequences
            .iter()
            .zip(&logits)
            .map(|(s, l)| sampler::sample(l, s.temperature, s.top_p, s.seed, s.output_index))
            .collect();
        Ok(StepOutput {
            next_tokens,
            duration_us: t0.elapsed().as_micros() as u64,
        })
    }

    fn kv_bytes_per_block(&self) -> usize {
        self.model.config.layers * 2 * self.block_floats() * std::mem::size_of::<f32>()
    }

    fn export_blocks(&self, blocks: &[BlockId]) -> Result<Vec<u8>, BackendError> {
        self.check_blocks(blocks)?;
        let per = self.block_floats();
        let layers = self.model.config.layers;
        let mut out = vec![0u8; blocks.len() * self.kv_bytes_per_block()];
        if blocks.is_empty() {
            return Ok(out);
        }
        let ids: Vec<u32> = blocks.iter().map(|b| b.0).collect();
        let ids = Tensor::from_slice(&ids, ids.len(), &self.model.device).map_err(candle_err)?;
        for l in 0..layers {
            for (kind, cache) in [&self.cache.k[l], &self.cache.v[l]].into_iter().enumerate() {
                let data = cache
                    .reshape((self.cache.num_blocks, per))
                    .and_then(|t| t.index_select(&ids, 0))
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(candle_err)?;
                for (bi, chunk) in data.chunks_exact(per).enumerate() {
                    let at = (bi * layers * 2 + l * 2 + kind) * per * 4;
                    for (dst, x) in out[at..at + per * 4].chunks_exact_mut(4).zip(chunk) {
                        dst.copy_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
        Ok(out)
    }

    fn import_blocks(&mut self, blocks: &[BlockId], data: &[u8]) -> Result<(), BackendError> {
        self.check_blocks(blocks)?;
        let expected = blocks.len() * self.kv_bytes_per_block();
        if data.len() != expected {
            return Err(BackendError(format!(
                "KV import of {} blocks needs {expected} bytes ({} per block), got {}",
                blocks.len(),
                self.kv_bytes_per_block(),
                data.len()
            )));
        }
        let per = self.block_floats();
        let bs = self.cache.block_size;
        let kv_dim = self.model.config.kv_dim();
        for (bi, b) in blocks.iter().enumerate() {
            for l in 0..self.model.config.layers {
                for kind in 0..2 {
                    let at = (bi * self.model.config.layers * 2 + l * 2 + kind) * per * 4;
                    let floats: Vec<f32> = data[at..at + per * 4]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    let src = Tensor::from_vec(floats, (bs, kv_dim), &self.model.device)
                        .map_err(candle_err)?;
                    let cache = if kind == 0 {
                        &self.cache.k[l]
                    } else {
                        &self.cache.v[l]
                    };
                    cache
                        .slice_set(&src, 0, b.index() * bs)
                        .map_err(candle_err)?;
                }
            }
        }
        Ok(())
    }
}
