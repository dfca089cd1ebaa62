//! The transformer forward pass over a paged KV cache, built from candle-core
//! ops: RMSNorm, RoPE (HF half-split), grouped-query attention, SwiGLU.
//!
//! **Owns**: the prepared (fused q/k/v and gate/up) weights, the RoPE tables,
//! the paged KV storage and the arithmetic of one step. **Never touches**:
//! scheduling, block allocation (block tables arrive already resolved to slots),
//! sampling, I/O, clocks.
//!
//! # Paged KV storage
//!
//! Per layer, one K and one V tensor of `num_blocks * block_size` rows of
//! `kv_heads * head_dim` f32, i.e. `[num_blocks, block_size, kv_heads,
//! head_dim]` row-major. The token at position `p` of a sequence lives in
//! slot `block_table[p / block_size] * block_size + p % block_size`.
//!
//! # Batch invariance
//!
//! Greedy outputs must not depend on the batch a sequence runs in, on
//! whether its tokens were prefilled or decoded one by one, nor on which
//! instance holds its KV. Every per-row value is therefore computed through
//! kernels whose shapes do not depend on the batch:
//!
//! - Element-wise ops (RoPE, SiLU, residual adds) and last-dimension
//!   reductions (RMSNorm, softmax) are per row in candle's CPU backend.
//! - Linear layers: on the CPU, [`LinearKernel::RowDot`] (the project's own
//!   kernel, [`super::kernel`]) computes every output element as a dot
//!   product in a fixed order, whatever the number of rows. Elsewhere,
//!   [`LinearKernel::FixedChunk`] cuts the rows into chunks of a fixed
//!   number of rows (zero-padded), one candle matmul each: gemm picks its
//!   kernel, blocking and accumulation order from the shape only, so a row's
//!   result does not depend on its neighbours (checked by the tests, bit for
//!   bit). A plain batched matmul ([`LinearKernel::Batched`]) changes shape
//!   with the batch and hence gemm's path (gemv at 1 row, a "horizontal"
//!   kernel for small outputs, k-blocking that depends on m), so it is
//!   offered for measurement only.
//! - Attention is computed per query row over exactly the positions
//!   `0..=p` of its sequence (no mask), so the shapes depend only on `p`:
//!   a prefill row at position `p` and a decode at `p` run the same ops.

use candle_core::{DType, Device, Result, Tensor, D};

use super::kernel::RowDot;
use super::{LlamaConfig, LlamaWeights};

/// How linear layers (`x · Wᵀ`) are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearKernel {
    /// The project's own CPU kernel ([`super::kernel`]): every output element
    /// is a dot product in a fixed order, so any number of rows is
    /// batch-invariant with no padding. CPU only; the default there.
    RowDot,
    /// candle matmuls over chunks of exactly this many rows (the last one
    /// zero-padded): batch-invariant on the CPU (gemm's path depends on the
    /// shape only; verified bit for bit by the tests). The default off the
    /// CPU, with [`DEFAULT_CHUNK_ROWS`]; there it relies on the BLAS (cuBLAS)
    /// choosing its kernel by shape alone, which this project has not
    /// verified on a GPU.
    FixedChunk(usize),
    /// One candle matmul over all rows of the step: NOT batch-invariant
    /// (gemm switches kernels and blocking with the row count); offered for
    /// measurement only.
    Batched,
}

impl LinearKernel {
    /// The batch-invariant default for `device`.
    pub fn default_for(device: &Device) -> Self {
        if device.is_cpu() {
            LinearKernel::RowDot
        } else {
            LinearKernel::FixedChunk(DEFAULT_CHUNK_ROWS)
        }
    }

    /// Whether outputs are independent of the batch.
    pub fn is_batch_invariant(self) -> bool {
        !matches!(self, LinearKernel::Batched)
    }
}

/// Rows per matmul of [`LinearKernel::FixedChunk`] by default.
pub const DEFAULT_CHUNK_ROWS: usize = 16;

/// One decoder layer; linear weights `[out, in]` contiguous, q/k/v and
/// gate/up fused.
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor,
    /// `[q_dim + 2 kv_dim, hidden]`: `[wq; wk; wv]`.
    pub(crate) wqkv: Tensor,
    pub(crate) wo: Tensor,
    pub(crate) ffn_norm: Tensor,
    /// `[2 intermediate, hidden]`: gate then up.
    pub(crate) w_gate_up: Tensor,
    pub(crate) w_down: Tensor,
}

/// The model, ready to run steps.
pub(crate) struct Model {
    pub config: LlamaConfig,
    pub device: Device,
    embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    norm: Tensor,
    /// `[vocab, hidden]`: the LM head (or the embedding).
    pub(crate) lm_head: Tensor,
    /// `[max_position, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    pub kernel: LinearKernel,
}

/// The paged KV cache (see the module doc for the layout).
pub(crate) struct KvCache {
    pub num_blocks: usize,
    pub block_size: usize,
    /// Per layer, `[num_blocks * block_size, kv_dim]`.
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl KvCache {
    pub fn new(
        config: &LlamaConfig,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let rows = num_blocks * block_size;
        let mut k = Vec::with_capacity(config.layers);
        let mut v = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            k.push(Tensor::zeros((rows, config.kv_dim()), DType::F32, device)?);
            v.push(Tensor::zeros((rows, config.kv_dim()), DType::F32, device)?);
        }
        Ok(Self {
            num_blocks,
            block_size,
            k,
            v,
        })
    }
}

/// One sequence of a validated step.
pub(crate) struct SeqPlan {
    /// Its first row among the step's rows.
    pub first_row: usize,
    /// Its number of rows (tokens) this step.
    pub rows: usize,
    /// Position of its first row.
    pub start: usize,
    /// Slots of positions `0 .. start + rows`.
    pub ctx_slots: Vec<u32>,
}

/// A validated step: rows are the sequences' tokens, concatenated in order.
pub(crate) struct StepPlan {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// Where each row's K/V goes.
    pub write_slots: Vec<u32>,
    pub seqs: Vec<SeqPlan>,
}

impl Model {
    pub fn new(config: LlamaConfig, weights: LlamaWeights, kernel: LinearKernel) -> Result<Self> {
        let device = weights.device().clone();
        let mut layers = Vec::with_capacity(weights.layers.len());
        for l in weights.layers {
            layers.push(Layer {
                attn_norm: l.attn_norm,
                wqkv: Tensor::cat(&[&l.wq, &l.wk, &l.wv], 0)?,
                wo: l.wo.contiguous()?,
                ffn_norm: l.ffn_norm,
                w_gate_up: Tensor::cat(&[&l.w_gate, &l.w_up], 0)?,
                w_down: l.w_down.contiguous()?,
            });
        }
        let lm_head = weights
            .lm_head
            .as_ref()
            .unwrap_or(&weights.embed)
            .contiguous()?;
        let half = config.head_dim / 2;
        let mut cos = Vec::with_capacity(config.max_position * half);
        let mut sin = Vec::with_capacity(config.max_position * half);
        for p in 0..config.max_position {
            for i in 0..half {
                let freq = config
                    .rope_theta
                    .powf(-2.0 * i as f64 / config.head_dim as f64);
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (config.max_position, half), &device)?;
        let sin = Tensor::from_vec(sin, (config.max_position, half), &device)?;
        Ok(Self {
            config,
            device,
            embed: weights.embed,
            layers,
            norm: weights.norm,
            lm_head,
            cos,
            sin,
            kernel,
        })
    }

    /// `x · Wᵀ` for `x: [rows, in]`, `w: [out, in]`, per [`LinearKernel`].
    pub(crate) fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let chunk = match self.kernel {
            LinearKernel::RowDot => return x.contiguous()?.apply_op2_no_bwd(w, &RowDot),
            LinearKernel::Batched => return x.matmul(&w.t()?),
            LinearKernel::FixedChunk(c) => c.max(1),
        };
        let w_t = w.t()?;
        let (rows, cols) = x.dims2()?;
        let chunks = rows.div_ceil(chunk);
        let x = if chunks * chunk > rows {
            let pad = Tensor::zeros((chunks * chunk - rows, cols), DType::F32, x.device())?;
            Tensor::cat(&[x, &pad], 0)?
        } else {
            x.clone()
        };
        let mut out = Vec::with_capacity(chunks);
        for c in 0..chunks {
            out.push(x.narrow(0, c * chunk, chunk)?.matmul(&w_t)?);
        }
        Tensor::cat(&out, 0)?.narrow(0, 0, rows)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.config.rms_eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(w)
    }

    /// HF `rotate_half` RoPE on `x: [rows, n_heads, head_dim]`; `cos`/`sin`: `[rows, 1, half]`.
    fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(2)? / 2;
        let x1 = x.narrow(2, 0, half)?;
        let x2 = x.narrow(2, half, half)?;
        let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        Tensor::cat(&[&a, &b], 2)
    }

    /// Runs the step: writes every row's K/V into its slot and returns the
    /// logits of each sequence's last row, `[sequences, vocab]`.
    pub fn forward(&self, cache: &mut KvCache, plan: &StepPlan) -> Result<Tensor> {
        let c = &self.config;
        let rows = plan.tokens.len();
        let (q_dim, kv_dim, d) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let scale = 1.0 / (d as f64).sqrt();
        let tokens = Tensor::from_slice(&plan.tokens, rows, &self.device)?;
        let positions = Tensor::from_slice(&plan.positions, rows, &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(&positions, 0)?.unsqueeze(1)?;
        let ctx: Vec<Tensor> = plan
            .seqs
            .iter()
            .map(|s| Tensor::from_slice(&s.ctx_slots, s.ctx_slots.len(), &self.device))
            .collect::<Result<_>>()?;

        let mut x = self.embed.index_select(&tokens, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let qkv = self.linear(&h, &layer.wqkv)?;
            let q = qkv.narrow(1, 0, q_dim)?.reshape((rows, c.heads, d))?;
            let k = qkv
                .narrow(1, q_dim, kv_dim)?
                .reshape((rows, c.kv_heads, d))?;
            let v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?.contiguous()?;
            let q = Self::rope(&q, &cos, &sin)?.affine(scale, 0.0)?;
            let k = Self::rope(&k, &cos, &sin)?.reshape((rows, kv_dim))?;

            // Write this step's K/V, one run of consecutive slots at a time.
            let mut r = 0;
            while r < rows {
                let mut e = r + 1;
                while e < rows && plan.write_slots[e] == plan.write_slots[e - 1] + 1 {
                    e += 1;
                }
                let at = plan.write_slots[r] as usize;
                cache.k[li].slice_set(&k.narrow(0, r, e - r)?, 0, at)?;
                cache.v[li].slice_set(&v.narrow(0, r, e - r)?, 0, at)?;
                r = e;
            }

            // Attention, one query row at a time over exactly positions 0..=p.
            let mut outs = Vec::with_capacity(rows);
            for (s, ctx) in plan.seqs.iter().zip(&ctx) {
                let len = ctx.dim(0)?;
                // [kv_heads, len, d]
                let keys = cache.k[li]
                    .index_select(ctx, 0)?
                    .reshape((len, c.kv_heads, d))?
                    .transpose(0, 1)?
                    .contiguous()?;
                let vals = cache.v[li]
                    .index_select(ctx, 0)?
                    .reshape((len, c.kv_heads, d))?
                    .transpose(0, 1)?
                    .contiguous()?;
                for i in 0..s.rows {
                    let n = s.start + i + 1;
                    let qr =
                        q.narrow(0, s.first_row + i, 1)?
                            .reshape((c.kv_heads, c.group(), d))?;
                    let kr = keys.narrow(1, 0, n)?;
                    let vr = vals.narrow(1, 0, n)?;
                    let scores = qr.matmul(&kr.t()?)?; // [kv_heads, group, n]
                    let max = scores.max_keepdim(D::Minus1)?;
                    let e = scores.broadcast_sub(&max)?.exp()?;
                    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
                    outs.push(p.matmul(&vr)?.reshape((1, q_dim))?); // [kv_heads, group, d]
                }
            }
            let attn = Tensor::cat(&outs, 0)?;
            x = (x + self.linear(&attn, &layer.wo)?)?;

            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let gu = self.linear(&h, &layer.w_gate_up)?;
            let f = c.intermediate;
            let act = (gu.narrow(1, 0, f)?.silu()? * gu.narrow(1, f, f)?)?;
            x = (x + self.linear(&act, &layer.w_down)?)?;
        }
        let last: Vec<u32> = plan
            .seqs
            .iter()
            .map(|s| (s.first_row + s.rows - 1) as u32)
            .collect();
        let last = Tensor::from_slice(&last, last.len(), &self.device)?;
        let h = self.rms_norm(&x.index_select(&last, 0)?, &self.norm)?;
        self.linear(&h, &self.lm_head)
    }
}
