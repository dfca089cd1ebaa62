//! The measured-basis LLaMA-7B / A10 profile: measured A40 operator times
//! composed into engine steps.
//!
//! **Owns**: the parser of vidur's per-operator table (the vendored
//! `profiles/data/vidur_a40_llama2_7b_tp1_mlp_median_ms.csv`, MIT,
//! Copyright (c) Microsoft Corporation), the step model that composes it
//! ([`MeasuredStepModel`]) and the generator of the shipped
//! `profiles/llama-7b-a10-measured.json`
//! ([`LatencyProfile::measured_llama7b_a10`]).
//!
//! # The step model
//!
//! vidur's composition (Agrawal et al., MLSys 2024), 32 layers, times in ms:
//!
//! - *Non-attention time per layer* M(n): the sum of the table's per-layer
//!   operators (input_layernorm, attn_pre_proj, attn_rope, attn_post_proj,
//!   post_attention_layernorm, mlp_up_proj, mlp_act, mlp_down_proj, add) at
//!   n tokens, linear between rows. The token embedding (`emb`) runs once
//!   per forward pass, so it is added once per step, not per layer. Rows
//!   measured twice (2048, 4096) are averaged; a running maximum over
//!   `num_tokens` absorbs the table's small non-monotone dips (timing noise
//!   and tile effects), so more tokens never cost less. Above the last row
//!   (4096 tokens) M grows in proportion to the tokens (the GEMMs are
//!   compute-bound there).
//! - *Decode attention per layer*, memory-bound: A_decode(C) = t₀ +
//!   C · 16 KiB / BW (K and V of C context tokens, fp16, one layer), with t₀
//!   and BW fitted by least squares to vidur's four measured A40 decode
//!   attention medians ([`A40_ATTENTION_DECODE_POINTS`]), and vidur's 10%
//!   batching overhead on top.
//! - *Prefill attention per layer*: A_prefill = t₀ + N · 16 KiB / BW (the KV
//!   write) + Σ_seq 2 · 4096 · l² / R (the causal QKᵀ and PV FLOPs of each
//!   sequence of l tokens) at R, the A40's effective fp16 GEMM rate measured
//!   by the table itself (the four projections' FLOPs at 4096 tokens over
//!   their measured time). A profile's prefill table is keyed by total
//!   tokens only, so a step of N tokens is taken as sequences of LLaMA-7B's
//!   full 2,048-token context and a remainder: the costliest split, since
//!   attention grows with the square of the sequence length.
//! - decode(B, C) = 32 · [M(B) + 1.1 · A_decode(C)] + emb(B) + CPU;
//!   prefill(N) = 32 · [M(N) + A_prefill] + emb(N) + CPU, with a fixed
//!   per-step host overhead CPU = [`CPU_OVERHEAD_MS`].
//! - *A40 → A10*: both Ampere GA102; the GPU part of a decode step is scaled
//!   by [`A10_DECODE_SCALE`] (the bandwidth ratio, ~696 / ~600 GB/s) and of a
//!   prefill by [`A10_PREFILL_SCALE`] (the fp16 tensor ratio, ~150 / ~125
//!   TFLOP/s); the CPU overhead is not scaled. This is an assumption, not a
//!   measurement.

use std::collections::BTreeMap;

use super::{
    shipped_tables, LatencyProfile, ProfileData, ProfileError, ProfileKind, Provenance,
    RooflineModel, PROFILE_FORMAT, PROFILE_VERSION,
};

/// vidur's A40 Llama-2-7B operator table (TP1 rows, median columns), as
/// vendored in `profiles/data/` (see the README there for its licence).
pub const VIDUR_A40_LLAMA2_7B_MLP_CSV: &str =
    include_str!("../../profiles/data/vidur_a40_llama2_7b_tp1_mlp_median_ms.csv");

/// Where [`VIDUR_A40_LLAMA2_7B_MLP_CSV`] comes from.
pub const VIDUR_SOURCE: &str = "microsoft/vidur commit e26eb8f79fa9a6a7c38eac0f5291302402b20364, \
     data/profiling/compute/a40/meta-llama/Llama-2-7b-hf/mlp.csv (TP1 rows, median columns; \
     MIT licence, Copyright (c) Microsoft Corporation)";

/// The vendored table's path inside the engine crate.
pub const VIDUR_CSV_PATH: &str = "profiles/data/vidur_a40_llama2_7b_tp1_mlp_median_ms.csv";

/// The table's columns, in order.
pub const VIDUR_COLUMNS: [&str; 11] = [
    "num_tokens",
    "emb",
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
];

/// vidur's measured decode attention medians per layer on one A40 for
/// Llama-2-7B (from its `attention.csv`, not vendored): (batch, context
/// tokens per sequence, ms).
pub const A40_ATTENTION_DECODE_POINTS: [(u64, u64, f64); 4] = [
    (1, 32, 0.008),
    (16, 32, 0.052),
    (64, 352, 0.606),
    (128, 352, 1.162),
];

/// Layers of LLaMA-7B / Llama-2-7B.
pub const LAYERS: u32 = 32;
/// Hidden size of LLaMA-7B / Llama-2-7B.
pub const HIDDEN: u64 = 4096;
/// FFN size of LLaMA-7B / Llama-2-7B.
pub const FFN: u64 = 11008;
/// KV bytes per token per layer: K and V, 4096 values each, fp16.
pub const KV_BYTES_PER_TOKEN_PER_LAYER: f64 = (2 * HIDDEN * 2) as f64;
/// vidur's decode attention batching overhead (`A_decode · 1.1`).
pub const DECODE_ATTENTION_OVERHEAD: f64 = 1.1;
/// Host time per engine step (scheduling, input preparation, sampling, and
/// the LM head the operator table lacks), ms. A chosen constant, not measured.
pub const CPU_OVERHEAD_MS: f64 = 2.0;
/// A40 → A10 factor on the GPU time of a decode step (memory bandwidth ratio).
pub const A10_DECODE_SCALE: f64 = 1.16;
/// A40 → A10 factor on the GPU time of a prefill step (fp16 tensor ratio).
pub const A10_PREFILL_SCALE: f64 = 1.20;
/// The longest sequence a prefill step is assumed to hold (LLaMA-7B's context).
pub const MAX_SEQUENCE_TOKENS: usize = 2048;

/// FLOPs per token per layer of the four projections: QKV (4096 → 3·4096),
/// output (4096 → 4096), gate+up (4096 → 2·11008), down (11008 → 4096).
const GEMM_FLOPS_PER_TOKEN_PER_LAYER: f64 =
    (2 * (HIDDEN * 3 * HIDDEN + HIDDEN * HIDDEN + HIDDEN * 2 * FFN + FFN * HIDDEN)) as f64;

/// One row of the operator table after merging duplicates.
#[derive(Clone, Copy, Debug, PartialEq)]
struct OperatorRow {
    tokens: f64,
    /// Σ of the per-layer operators (running maximum), ms.
    layer_ms: f64,
    /// The embedding lookup (running maximum), ms.
    emb_ms: f64,
    /// The four projections, as measured (for the GEMM rate), ms.
    gemm_ms: f64,
}

/// vidur's per-operator table of one model on one device, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorTable {
    rows: Vec<OperatorRow>,
}

impl OperatorTable {
    /// Parses the CSV text (header [`VIDUR_COLUMNS`], one row per token
    /// count, times in ms; CRLF or LF). Rows with the same `num_tokens` are
    /// averaged.
    pub fn from_csv(text: &str) -> Result<OperatorTable, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let header: Vec<&str> = lines
            .next()
            .ok_or("empty table")?
            .split(',')
            .map(str::trim)
            .collect();
        if header != VIDUR_COLUMNS {
            return Err(format!(
                "header {header:?}, expected {:?}",
                VIDUR_COLUMNS.join(",")
            ));
        }
        // num_tokens -> (Σ of each column, count)
        let mut merged: BTreeMap<u64, ([f64; 10], u32)> = BTreeMap::new();
        for (i, line) in lines.enumerate() {
            let row = i + 2;
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != VIDUR_COLUMNS.len() {
                return Err(format!(
                    "line {row}: {} fields, expected {}",
                    cells.len(),
                    VIDUR_COLUMNS.len()
                ));
            }
            let tokens: u64 = cells[0]
                .parse()
                .map_err(|e| format!("line {row}: num_tokens {:?}: {e}", cells[0]))?;
            if tokens == 0 {
                return Err(format!("line {row}: num_tokens is 0"));
            }
            let entry = merged.entry(tokens).or_insert(([0.0; 10], 0));
            for (k, cell) in cells[1..].iter().enumerate() {
                let v: f64 = cell
                    .parse()
                    .map_err(|e| format!("line {row}: {} {cell:?}: {e}", VIDUR_COLUMNS[k + 1]))?;
                if !(v.is_finite() && v >= 0.0) {
                    return Err(format!("line {row}: {} is {v}", VIDUR_COLUMNS[k + 1]));
                }
                entry.0[k] += v;
            }
            entry.1 += 1;
        }
        if merged.is_empty() {
            return Err("no rows".to_string());
        }
        let col = |name: &str| VIDUR_COLUMNS.iter().position(|c| *c == name).unwrap() - 1;
        let gemm_cols = [
            col("attn_pre_proj"),
            col("attn_post_proj"),
            col("mlp_up_proj"),
            col("mlp_down_proj"),
        ];
        let emb = col("emb");
        let mut rows = Vec::with_capacity(merged.len());
        let (mut layer_max, mut emb_max) = (0.0f64, 0.0f64);
        for (tokens, (sums, count)) in merged {
            let mean = sums.map(|s| s / count as f64);
            let layer: f64 = (0..mean.len()).filter(|&k| k != emb).map(|k| mean[k]).sum();
            layer_max = layer_max.max(layer);
            emb_max = emb_max.max(mean[emb]);
            rows.push(OperatorRow {
                tokens: tokens as f64,
                layer_ms: layer_max,
                emb_ms: emb_max,
                gemm_ms: gemm_cols.iter().map(|&k| mean[k]).sum(),
            });
        }
        Ok(OperatorTable { rows })
    }

    /// Number of distinct token counts.
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    /// Whether the table has no rows (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// The largest measured token count.
    pub fn max_tokens(&self) -> u64 {
        self.rows.last().map_or(0, |r| r.tokens as u64)
    }

    /// (M(n), emb(n)): per-layer non-attention time and the embedding time at
    /// `tokens`, ms: linear between rows, proportional above the last one,
    /// the first row's below it.
    fn at(&self, tokens: f64) -> (f64, f64) {
        let first = self.rows[0];
        if tokens <= first.tokens {
            return (first.layer_ms, first.emb_ms);
        }
        let last = self.rows[self.rows.len() - 1];
        if tokens >= last.tokens {
            let f = tokens / last.tokens;
            return (last.layer_ms * f, last.emb_ms * f);
        }
        let i = self.rows.partition_point(|r| r.tokens <= tokens);
        let (a, b) = (self.rows[i - 1], self.rows[i]);
        let f = (tokens - a.tokens) / (b.tokens - a.tokens);
        (
            a.layer_ms + f * (b.layer_ms - a.layer_ms),
            a.emb_ms + f * (b.emb_ms - a.emb_ms),
        )
    }

    /// Per-layer non-attention time M(n) at `tokens`, ms.
    pub fn layer_ms(&self, tokens: f64) -> f64 {
        self.at(tokens).0
    }

    /// The effective fp16 GEMM rate at the largest measured token count:
    /// the four projections' FLOPs over their measured time, FLOP/s.
    pub fn gemm_flops_per_s(&self) -> f64 {
        let last = self.rows[self.rows.len() - 1];
        GEMM_FLOPS_PER_TOKEN_PER_LAYER * last.tokens / (last.gemm_ms * 1e-3)
    }
}

/// Memory-bound attention: `fixed_ms + bytes / bandwidth` per layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionFit {
    /// Per-layer kernel time independent of the KV read, ms.
    pub fixed_ms: f64,
    /// Effective KV read bandwidth, bytes/s.
    pub bandwidth_bytes_per_s: f64,
}

impl AttentionFit {
    /// Least squares (absolute ms) over `points` of (batch, context per
    /// sequence, ms), the KV bytes being batch · context · 16 KiB.
    pub fn calibrate(points: &[(u64, u64, f64)]) -> AttentionFit {
        let xs: Vec<Vec<f64>> = points
            .iter()
            .map(|&(b, c, _)| vec![1.0, (b * c) as f64 * KV_BYTES_PER_TOKEN_PER_LAYER])
            .collect();
        let ys: Vec<f64> = points.iter().map(|p| p.2).collect();
        let beta = super::least_squares(&xs, &ys);
        AttentionFit {
            fixed_ms: beta[0],
            bandwidth_bytes_per_s: 1e3 / beta[1],
        }
    }

    /// Time to read (or write) the KV of `tokens` tokens of one layer, ms.
    pub fn ms(&self, tokens: f64) -> f64 {
        self.fixed_ms + 1e3 * tokens * KV_BYTES_PER_TOKEN_PER_LAYER / self.bandwidth_bytes_per_s
    }
}

/// vidur's step model over a measured operator table (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct MeasuredStepModel {
    pub operators: OperatorTable,
    pub attention: AttentionFit,
    /// The rate prefill attention FLOPs run at, FLOP/s.
    pub attention_flops_per_s: f64,
    pub cpu_overhead_ms: f64,
    pub decode_scale: f64,
    pub prefill_scale: f64,
    pub max_sequence_tokens: usize,
}

impl MeasuredStepModel {
    /// The model of Llama-2-7B on the A40 from `csv` (vidur's table), with
    /// this module's constants and A10 scaling.
    pub fn llama2_7b_a40(csv: &str) -> Result<MeasuredStepModel, String> {
        let operators = OperatorTable::from_csv(csv)?;
        let attention_flops_per_s = operators.gemm_flops_per_s();
        Ok(MeasuredStepModel {
            operators,
            attention: AttentionFit::calibrate(&A40_ATTENTION_DECODE_POINTS),
            attention_flops_per_s,
            cpu_overhead_ms: CPU_OVERHEAD_MS,
            decode_scale: A10_DECODE_SCALE,
            prefill_scale: A10_PREFILL_SCALE,
            max_sequence_tokens: MAX_SEQUENCE_TOKENS,
        })
    }

    /// GPU time of a decode step on the A40: `batch` sequences attending to
    /// `context_tokens` tokens in all, ms.
    pub fn a40_decode_gpu_ms(&self, batch: usize, context_tokens: usize) -> f64 {
        let (m, emb) = self.operators.at(batch as f64);
        let attn = DECODE_ATTENTION_OVERHEAD * self.attention.ms(context_tokens as f64);
        LAYERS as f64 * (m + attn) + emb
    }

    /// GPU time of a prefill step on the A40 of sequences of
    /// `sequence_tokens` tokens each, ms.
    pub fn a40_prefill_gpu_ms(&self, sequence_tokens: &[usize]) -> f64 {
        let n: usize = sequence_tokens.iter().sum();
        if n == 0 {
            return 0.0;
        }
        let (m, emb) = self.operators.at(n as f64);
        let flops: f64 = sequence_tokens
            .iter()
            .map(|&l| 2.0 * HIDDEN as f64 * (l as f64) * (l as f64))
            .sum();
        let attn = self.attention.ms(n as f64) + 1e3 * flops / self.attention_flops_per_s;
        LAYERS as f64 * (m + attn) + emb
    }

    /// A whole decode step on the A40 (GPU + CPU overhead), ms.
    pub fn a40_decode_ms(&self, batch: usize, context_tokens: usize) -> f64 {
        self.a40_decode_gpu_ms(batch, context_tokens) + self.cpu_overhead_ms
    }

    /// A whole prefill step on the A40 (GPU + CPU overhead), ms.
    pub fn a40_prefill_ms(&self, sequence_tokens: &[usize]) -> f64 {
        self.a40_prefill_gpu_ms(sequence_tokens) + self.cpu_overhead_ms
    }

    /// `tokens` split as the profile assumes: full sequences of
    /// `max_sequence_tokens`, then the remainder.
    pub fn assumed_sequences(&self, tokens: usize) -> Vec<usize> {
        let max = self.max_sequence_tokens.max(1);
        let mut seqs = vec![max; tokens / max];
        let rest = tokens % max;
        if rest > 0 {
            seqs.push(rest);
        }
        seqs
    }

    /// A decode step on the A10 (scaled GPU time + CPU overhead), ms.
    pub fn decode_ms(&self, batch: usize, context_tokens: usize) -> f64 {
        self.decode_scale * self.a40_decode_gpu_ms(batch, context_tokens) + self.cpu_overhead_ms
    }

    /// A prefill step of `tokens` tokens on the A10 (scaled GPU time + CPU
    /// overhead), the tokens split by [`assumed_sequences`](Self::assumed_sequences), ms.
    pub fn prefill_ms(&self, tokens: usize) -> f64 {
        self.prefill_scale * self.a40_prefill_gpu_ms(&self.assumed_sequences(tokens))
            + self.cpu_overhead_ms
    }
}

impl LatencyProfile {
    /// The profile of LLaMA-7B (fp16) on one NVIDIA A10 **on a measured
    /// basis**: vidur's Llama-2-7B operator medians on an A40
    /// ([`VIDUR_A40_LLAMA2_7B_MLP_CSV`]) composed by [`MeasuredStepModel`]
    /// and scaled to the A10, with the derived profile's geometry (block 16,
    /// 792 blocks, 12,000 max batched tokens, decode batches padded to 8,
    /// 8 MiB KV per block, migration 15 GB/s, swap 22 GB/s) so the two
    /// compare. Decode rows go up to 256 (the scheduler's batch limit) so no
    /// decode of a real batch is extrapolated. The shipped file
    /// `profiles/llama-7b-a10-measured.json` is this profile's
    /// [`to_json_pretty`](Self::to_json_pretty).
    pub fn measured_llama7b_a10() -> LatencyProfile {
        Self::measured_llama7b_a10_from_csv(VIDUR_A40_LLAMA2_7B_MLP_CSV)
            .expect("the vendored vidur table gives a valid profile")
    }

    /// [`measured_llama7b_a10`](Self::measured_llama7b_a10) from another copy
    /// of vidur's table (same columns).
    pub fn measured_llama7b_a10_from_csv(csv: &str) -> Result<LatencyProfile, ProfileError> {
        let model =
            MeasuredStepModel::llama2_7b_a40(csv).map_err(|message| ProfileError::Invalid {
                origin: VIDUR_CSV_PATH.to_string(),
                message,
            })?;
        let derived = RooflineModel::LLAMA7B_A10;
        let (prefill, decode) = shipped_tables(
            &[8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 192, 256],
            |tokens| model.prefill_ms(tokens as usize),
            |batch, context| model.decode_ms(batch as usize, context as usize),
        );
        let a = model.attention;
        let last = model.operators.max_tokens();
        let data = ProfileData {
            format: PROFILE_FORMAT.to_string(),
            version: PROFILE_VERSION,
            model: "llama-7b-fp16".to_string(),
            hardware: "nvidia-a10 (scaled from nvidia-a40 measurements)".to_string(),
            provenance: Provenance {
                kind: ProfileKind::Measured,
                source: format!(
                    "MEASURED BASIS, COMPOSED AND SCALED: per-layer operator medians of Llama-2-7B \
                     (LLaMA-7B's architecture) on one NVIDIA A40, tensor parallel 1, from {VIDUR_SOURCE}; \
                     vendored as engine/{VIDUR_CSV_PATH}; composed into steps by vidur's step model \
                     and scaled to an A10; generated by \
                     llumen_engine::latency_model::LatencyProfile::measured_llama7b_a10()"
                ),
                notes: vec![
                    format!(
                        "non-attention time per layer M(n) = sum of the table's nine per-layer operators \
                         at n tokens, linear between rows; rows measured twice (2048, 4096) averaged; a \
                         running maximum over num_tokens removes the table's small dips; above {last} \
                         tokens M grows in proportion to the tokens; the embedding (emb) is counted once \
                         per step, not per layer"
                    ),
                    format!(
                        "attention is memory-bound: per layer {:.4} ms + KV bytes / {:.0} GB/s (16 KiB per \
                         token per layer, fp16 K and V), both fitted by least squares to vidur's four \
                         measured A40 decode-attention medians (batch 1 x 32 tokens 0.008 ms, 16 x 32 \
                         0.052, 64 x 352 0.606, 128 x 352 1.162; fitted {})",
                        a.fixed_ms,
                        a.bandwidth_bytes_per_s / 1e9,
                        A40_ATTENTION_DECODE_POINTS
                            .iter()
                            .map(|&(b, c, _)| format!("{:.3}", a.ms((b * c) as f64)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "decode(batch B, context C) = 32 * [M(B) + 1.1 * attention(C)] + emb(B) + CPU \
                     (vidur's 10% decode-attention batching overhead); the batch is padded to 8 \
                     before lookup; rows 8..256"
                        .to_string(),
                    format!(
                        "prefill(N) = 32 * [M(N) + attention KV write of N tokens + sum over sequences of \
                         2 * 4096 * l^2 FLOPs / {:.1} TFLOP/s] + emb(N) + CPU: the causal QK^T and PV \
                         FLOPs at the A40's effective fp16 GEMM rate measured by the table (the four \
                         projections' FLOPs at {last} tokens over their time); a step's N tokens are taken \
                         as sequences of LLaMA-7B's full {MAX_SEQUENCE_TOKENS}-token context plus a \
                         remainder (the costliest split: attention is at most ~5% of a prefill)",
                        model.attention_flops_per_s / 1e12
                    ),
                    format!(
                        "CPU = {CPU_OVERHEAD_MS} ms per step, a chosen constant (not measured): host-side \
                         scheduling, input preparation and sampling, and the LM head (~0.26 GB of \
                         weights, ~0.4 ms), which the operator table does not contain; not scaled"
                    ),
                    format!(
                        "ASSUMPTION, not measured: A40 -> A10 (both Ampere GA102; ~696 vs ~600 GB/s, \
                         ~150 vs ~125 TFLOP/s fp16 tensor): the GPU time of a decode step is multiplied by \
                         {A10_DECODE_SCALE}, of a prefill step by {A10_PREFILL_SCALE}"
                    ),
                    "geometry as in the derived profile (the Llumnix artifact's): block 16, 792 blocks \
                     (12,672 tokens), max batched tokens 12,000, decode batches padded to 8, 8 MiB of KV \
                     per block, migration 15 GB/s, swap 22 GB/s; times rounded to 1 us"
                        .to_string(),
                ],
            },
            block_size: 16,
            num_blocks: 792,
            max_batched_tokens: 12_000,
            kv_bytes_per_block: 16 * derived.kv_bytes_per_token as usize,
            migration_bandwidth_bytes_per_s: Some(15e9),
            swap_bandwidth_bytes_per_s: Some(22e9),
            prefill,
            decode,
        };
        LatencyProfile::from_data_at(data, "measured LLaMA-7B/A10 profile")
    }

    /// The shipped `profiles/llama-7b-a10-measured.json`, parsed.
    pub fn shipped_llama7b_a10_measured() -> LatencyProfile {
        LatencyProfile::from_json_str_at(
            super::LLAMA7B_A10_MEASURED_JSON,
            "profiles/llama-7b-a10-measured.json",
        )
        .expect("the shipped profile is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::super::LLAMA7B_A10_MEASURED_JSON;
    use super::*;

    fn model() -> MeasuredStepModel {
        MeasuredStepModel::llama2_7b_a40(VIDUR_A40_LLAMA2_7B_MLP_CSV).unwrap()
    }

    #[test]
    fn table_parses_and_is_monotone() {
        let t = OperatorTable::from_csv(VIDUR_A40_LLAMA2_7B_MLP_CSV).unwrap();
        // 261 rows, two token counts measured twice.
        assert_eq!(t.len(), 259);
        assert_eq!(t.max_tokens(), 4096);
        for w in t.rows.windows(2) {
            assert!(w[0].tokens < w[1].tokens);
            assert!(w[0].layer_ms <= w[1].layer_ms && w[0].emb_ms <= w[1].emb_ms);
        }
        // Row 1: 0.004+0.181+0.005+0.064+0.004+0.321+0.007+0.161+0.001 (emb apart).
        assert!(
            (t.layer_ms(1.0) - 0.748).abs() < 1e-9,
            "{}",
            t.layer_ms(1.0)
        );
        // Linear between rows, proportional above the last.
        let (m8, m16) = (t.layer_ms(8.0), t.layer_ms(16.0));
        assert!((t.layer_ms(12.0) - (m8 + m16) / 2.0).abs() < 1e-12);
        assert!((t.layer_ms(8192.0) - 2.0 * t.layer_ms(4096.0)).abs() < 1e-9);
        // The A40's effective GEMM rate: plausibly below its ~150 TFLOP/s peak.
        let r = t.gemm_flops_per_s();
        assert!((80e12..150e12).contains(&r), "{r}");
        // LF line ends parse the same; a wrong header is refused.
        let lf = VIDUR_A40_LLAMA2_7B_MLP_CSV.replace("\r\n", "\n");
        assert_eq!(OperatorTable::from_csv(&lf).unwrap(), t);
        let err = OperatorTable::from_csv("num_tokens,emb\n1,0.1\n").unwrap_err();
        assert!(err.contains("header"), "{err}");
        let bad = VIDUR_A40_LLAMA2_7B_MLP_CSV.replacen("0.181", "x", 1);
        let err = OperatorTable::from_csv(&bad).unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("attn_pre_proj"),
            "{err}"
        );
        assert!(LatencyProfile::measured_llama7b_a10_from_csv(&bad)
            .unwrap_err()
            .to_string()
            .contains(VIDUR_CSV_PATH));
    }

    #[test]
    fn attention_calibration_is_memory_bound() {
        let a = AttentionFit::calibrate(&A40_ATTENTION_DECODE_POINTS);
        // About the A40's 696 GB/s, a few tens of µs of fixed time.
        assert!((550e9..720e9).contains(&a.bandwidth_bytes_per_s), "{a:?}");
        assert!((0.0..0.05).contains(&a.fixed_ms), "{a:?}");
        // The two large (bandwidth-dominated) points within 3%, the small
        // ones within 0.02 ms.
        for &(b, c, ms) in &A40_ATTENTION_DECODE_POINTS {
            let fit = a.ms((b * c) as f64);
            if b >= 64 {
                assert!((fit - ms).abs() <= 0.03 * ms, "{b} {c}: {fit} vs {ms}");
            } else {
                assert!((fit - ms).abs() <= 0.02, "{b} {c}: {fit} vs {ms}");
            }
        }
    }

    /// MuxServe's measurements of LLaMA-7B on one A100-80GB
    /// (hao-ai-lab/MuxServe, examples/placement/llama.json; not vendored)
    /// against this model's A40-basis (unscaled) times.
    ///
    /// The A100-80GB (SXM) has ~2,039 GB/s and 312 TFLOP/s fp16 tensor; the
    /// A40 ~696 GB/s and ~150 TFLOP/s: ratios 2.93 (bandwidth) and 2.08
    /// (compute). A decode step is memory-bound, so the A40 should take at
    /// most ~2.9x the A100's time, less where fixed overheads (host time,
    /// launches) that do not scale with bandwidth weigh in: band [1.5, 3.2].
    /// A prefill of 512+ tokens is compute-bound: ~2.1x, band [1.5, 2.6].
    /// Independently of the hardware, the shapes must agree: batch-64 over
    /// batch-1 decode and 8x512 over 1x512 prefill within 10%.
    #[test]
    fn cross_check_against_muxserve_a100() {
        let m = model();
        // (what, A40 basis ms, A100 ms, band)
        let dec1 = m.a40_decode_ms(1, 32);
        let dec64 = m.a40_decode_ms(64, 64 * 128);
        let pre1 = m.a40_prefill_ms(&[512]);
        let pre8 = m.a40_prefill_ms(&[512; 8]);
        let checks = [
            ("decode 1 x 32", dec1, 11.26, (1.5, 3.2)),
            ("decode 64 x 128", dec64, 16.55, (1.5, 3.2)),
            ("prefill 1 x 512", pre1, 41.03, (1.5, 2.6)),
            ("prefill 8 x 512", pre8, 304.45, (1.5, 2.6)),
        ];
        for (what, a40, a100, (lo, hi)) in checks {
            let ratio = a40 / a100;
            println!("{what}: A40 basis {a40:.2} ms, MuxServe A100 {a100} ms, ratio {ratio:.2}");
            assert!(
                (lo..=hi).contains(&ratio),
                "{what}: A40 {a40} ms vs A100 {a100} ms: ratio {ratio} outside [{lo}, {hi}]"
            );
        }
        let (ours, theirs) = (dec64 / dec1, 16.55 / 11.26);
        println!("decode batch 64 / batch 1: {ours:.3} vs MuxServe {theirs:.3}");
        assert!((ours / theirs - 1.0).abs() <= 0.10, "{ours} vs {theirs}");
        let (ours, theirs) = (pre8 / pre1, 304.45 / 41.03);
        println!("prefill 8x512 / 1x512: {ours:.3} vs MuxServe {theirs:.3}");
        assert!((ours / theirs - 1.0).abs() <= 0.10, "{ours} vs {theirs}");
    }

    #[test]
    fn measured_profile_figures() {
        let p = LatencyProfile::measured_llama7b_a10();
        let d = LatencyProfile::derived_llama7b_a10();
        assert_eq!(p.provenance().kind, ProfileKind::Measured);
        assert!(p
            .provenance()
            .source
            .contains("e26eb8f79fa9a6a7c38eac0f5291302402b20364"));
        assert!(p.provenance().source.contains(VIDUR_CSV_PATH));
        let notes = p.provenance().notes.join("\n");
        for needle in [
            "ASSUMPTION",
            "1.16",
            "1.2",
            "least squares",
            "CPU = 2 ms",
            "TFLOP/s",
        ] {
            assert!(notes.contains(needle), "notes lack {needle:?}:\n{notes}");
        }
        // Same geometry as the derived profile.
        assert_eq!(
            (
                p.block_size(),
                p.num_blocks(),
                p.max_batched_tokens(),
                p.kv_bytes_per_block(),
                p.data().decode.batch_multiple
            ),
            (
                d.block_size(),
                d.num_blocks(),
                d.max_batched_tokens(),
                d.kv_bytes_per_block(),
                d.data().decode.batch_multiple
            )
        );
        assert_eq!(
            p.data().migration_bandwidth_bytes_per_s,
            d.data().migration_bandwidth_bytes_per_s
        );
        assert_eq!(
            p.data().swap_bandwidth_bytes_per_s,
            d.data().swap_bandwidth_bytes_per_s
        );
        assert_eq!(p.data().decode.rows.last().unwrap().batch, 256);

        println!("| step | measured-basis (ms) | derived (ms) |");
        println!("|---|---|---|");
        for (b, c) in [
            (1usize, 128usize),
            (1, 512),
            (1, 1024),
            (1, 2048),
            (8, 8 * 128),
            (8, 8 * 512),
            (32, 32 * 128),
            (32, 32 * 256),
            (32, 12_672),
            (64, 12_672),
        ] {
            println!(
                "| decode batch {b}, context {c} | {:.2} | {:.2} |",
                p.decode_time_ms(b, c),
                d.decode_time_ms(b, c)
            );
        }
        for t in [128usize, 512, 2048, 4096, 12_000] {
            println!(
                "| prefill {t} tokens | {:.2} | {:.2} |",
                p.prefill_time_ms(t),
                d.prefill_time_ms(t)
            );
        }
        // Batch-1 decode: ~24 ms of measured A40 layers, x1.16, + 2 ms.
        for ctx in [1usize, 128, 512, 1024] {
            let ms = p.step_time_us(0, 1, ctx) as f64 / 1e3;
            assert!(
                (28.0..34.0).contains(&ms),
                "batch-1 decode at {ctx}: {ms} ms"
            );
        }
        // Within ~20% of the roofline stand-in where both are memory-bound.
        let (pm, dm) = (p.decode_time_ms(1, 512), d.decode_time_ms(1, 512));
        assert!((pm / dm - 1.0).abs() < 0.2, "{pm} vs {dm}");
        // Monotone in every direction; batch 256 is a row, not extrapolated.
        assert!(p.decode_time_ms(256, 4096) > p.decode_time_ms(128, 4096));
        assert!(p.decode_time_ms(8, 8192) > p.decode_time_ms(8, 4096));
        assert!(p.prefill_time_ms(512) > p.decode_time_ms(1, 512));
        let big = p.prefill_time_ms(12_000);
        assert!((1500.0..2500.0).contains(&big), "{big}");
        // The table is the model's, rounded to 1 µs.
        let m = model();
        assert!((p.prefill_time_ms(512) - m.prefill_ms(512)).abs() < 1e-3);
        assert!((p.decode_time_ms(32, 4096) - m.decode_ms(32, 4096)).abs() < 1e-3);
        assert_eq!(m.assumed_sequences(5000), vec![2048, 2048, 904]);
        assert_eq!(m.assumed_sequences(2048), vec![2048]);
    }

    #[test]
    fn shipped_profile_measured_equals_generator() {
        crate::latency_model::tests::assert_shipped_is_generated(
            "llama-7b-a10-measured.json",
            LLAMA7B_A10_MEASURED_JSON,
            &LatencyProfile::measured_llama7b_a10(),
            &LatencyProfile::shipped_llama7b_a10_measured(),
        );
    }
}
