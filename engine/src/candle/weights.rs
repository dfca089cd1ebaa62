//! Weights of a Llama-family model as candle tensors ([`LlamaWeights`]) and a
//! deterministic random initialiser for tests and for serving without a
//! model file.
//!
//! **Owns**: the weight layout contract between loaders and the forward pass
//! (names, shapes, dtype, rotary layout) and its validation. **Never
//! touches**: the KV cache, scheduling, block allocation, files (a loader,
//! e.g. GGUF, lives elsewhere and only has to fill a [`LlamaWeights`]).
//!
//! # Layout contract (HF `transformers` Llama convention)
//!
//! All tensors are `f32`, contiguous, on one [`Device`]. Linear weights are
//! stored `[out_features, in_features]` (y = x · Wᵀ), exactly as in an HF
//! checkpoint:
//!
//! | field | shape |
//! |---|---|
//! | `embed` | `[vocab, hidden]` |
//! | `layers[i].attn_norm`, `ffn_norm` | `[hidden]` |
//! | `layers[i].wq` | `[heads * head_dim, hidden]` |
//! | `layers[i].wk`, `wv` | `[kv_heads * head_dim, hidden]` |
//! | `layers[i].wo` | `[hidden, heads * head_dim]` |
//! | `layers[i].w_gate`, `w_up` | `[intermediate, hidden]` |
//! | `layers[i].w_down` | `[hidden, intermediate]` |
//! | `norm` | `[hidden]` |
//! | `lm_head` | `[vocab, hidden]`, or `None` when the embedding is tied |
//!
//! Rows of `wq`/`wk` are grouped by head (head `h` is rows
//! `h*head_dim .. (h+1)*head_dim`) and, inside a head, in HF's **half-split
//! rotary layout**: element `i < head_dim/2` is rotated with element
//! `i + head_dim/2` at frequency `rope_theta^(-2i/head_dim)` (`rotate_half`).
//! llama.cpp's GGUF files store q/k interleaved (pairs `2i, 2i+1`); a GGUF
//! loader must undo that permutation (per head, row `2i` -> `i`, row `2i+1`
//! -> `i + head_dim/2`) before filling these fields.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::LlamaConfig;
use crate::BackendError;

/// Where weights came from (for [`crate::ModelBackend::describe`]).
#[derive(Clone, Debug, PartialEq)]
pub enum WeightSource {
    /// [`LlamaWeights::random`] with this seed.
    Random { seed: u64 },
    /// Loaded from a model file (e.g. a GGUF).
    File(PathBuf),
}

impl std::fmt::Display for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightSource::Random { seed } => write!(f, "random weights (seed {seed})"),
            WeightSource::File(p) => write!(f, "weights from {}", p.display()),
        }
    }
}

/// One decoder layer's weights (see the module doc for shapes).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    pub ffn_norm: Tensor,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
}

/// All weights of a Llama-family model (see the module doc for the layout).
/// Cloning is cheap: candle tensors share their storage.
#[derive(Clone, Debug)]
pub struct LlamaWeights {
    pub source: WeightSource,
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
}

/// SplitMix64: the deterministic generator behind random weights and the
/// sampler (no dependency, same stream on every platform).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }
    /// Uniform in `[0, 1)` with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in `0..n` (0 when `n` is 0), from one draw (`next_u64() % n`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo))
    }
    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// Fisher–Yates, in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The SplitMix64 finaliser (a good 64-bit mixer): [`SplitMix64`]'s output
/// is `mix64` of its state after each step.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn candle_err(e: candle_core::Error) -> BackendError {
    BackendError(format!("candle: {e}"))
}

impl LlamaWeights {
    /// Deterministic random weights: every tensor is filled from its own
    /// SplitMix64 stream (seeded by `seed` and the tensor's index), uniform in
    /// `±sqrt(3 / fan_in)` (unit variance-preserving) for linear layers,
    /// and for the embedding (`fan_in = hidden`: with tied embeddings this keeps
    /// the logits near unit scale and the input token from dominating its own
    /// prediction), ones for the norms. The same `(config,
    /// seed)` gives bit-identical weights on every run and platform.
    pub fn random(config: &LlamaConfig, seed: u64, device: &Device) -> Result<Self, BackendError> {
        config.validate().map_err(BackendError)?;
        let mut index = 0u64;
        let mut next = |rows: usize, cols: usize, bound: f64| -> Result<Tensor, BackendError> {
            index += 1;
            let mut rng = SplitMix64(mix64(seed ^ mix64(index)));
            let data: Vec<f32> = (0..rows * cols)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            Tensor::from_vec(data, (rows, cols), device).map_err(candle_err)
        };
        let lin = |fan_in: usize| (3.0 / fan_in as f64).sqrt();
        let ones = |n: usize| Tensor::ones(n, DType::F32, device).map_err(candle_err);
        let (h, q, kv, f) = (
            config.hidden,
            config.q_dim(),
            config.kv_dim(),
            config.intermediate,
        );
        let embed = next(config.vocab, h, lin(h))?;
        let mut layers = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            layers.push(LayerWeights {
                attn_norm: ones(h)?,
                wq: next(q, h, lin(h))?,
                wk: next(kv, h, lin(h))?,
                wv: next(kv, h, lin(h))?,
                wo: next(h, q, lin(q))?,
                ffn_norm: ones(h)?,
                w_gate: next(f, h, lin(h))?,
                w_up: next(f, h, lin(h))?,
                w_down: next(h, f, lin(f))?,
            });
        }
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(next(config.vocab, h, lin(h))?)
        };
        Ok(Self {
            source: WeightSource::Random { seed },
            embed,
            layers,
            norm: ones(h)?,
            lm_head,
        })
    }

    /// The device the weights live on (that of `embed`).
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Checks every tensor against `config` (shape, dtype, device, tying);
    /// the message names the first offending tensor.
    pub fn validate(&self, config: &LlamaConfig) -> Result<(), String> {
        let device = self.device().location();
        let check = |name: &str, t: &Tensor, dims: &[usize]| -> Result<(), String> {
            if t.dims() != dims {
                return Err(format!(
                    "weight {name}: shape {:?}, expected {:?}",
                    t.dims(),
                    dims
                ));
            }
            if t.dtype() != DType::F32 {
                return Err(format!(
                    "weight {name}: dtype {:?}, expected f32",
                    t.dtype()
                ));
            }
            if t.device().location() != device {
                return Err(format!(
                    "weight {name}: on {:?}, embedding on {:?}",
                    t.device().location(),
                    device
                ));
            }
            Ok(())
        };
        let (h, q, kv, f) = (
            config.hidden,
            config.q_dim(),
            config.kv_dim(),
            config.intermediate,
        );
        check("embed", &self.embed, &[config.vocab, h])?;
        if self.layers.len() != config.layers {
            return Err(format!(
                "weights have {} layers, config {}",
                self.layers.len(),
                config.layers
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            check(&format!("layers.{i}.attn_norm"), &l.attn_norm, &[h])?;
            check(&format!("layers.{i}.wq"), &l.wq, &[q, h])?;
            check(&format!("layers.{i}.wk"), &l.wk, &[kv, h])?;
            check(&format!("layers.{i}.wv"), &l.wv, &[kv, h])?;
            check(&format!("layers.{i}.wo"), &l.wo, &[h, q])?;
            check(&format!("layers.{i}.ffn_norm"), &l.ffn_norm, &[h])?;
            check(&format!("layers.{i}.w_gate"), &l.w_gate, &[f, h])?;
            check(&format!("layers.{i}.w_up"), &l.w_up, &[f, h])?;
            check(&format!("layers.{i}.w_down"), &l.w_down, &[h, f])?;
        }
        check("norm", &self.norm, &[h])?;
        match (&self.lm_head, config.tie_embeddings) {
            (None, true) => {}
            (Some(t), false) => check("lm_head", t, &[config.vocab, h])?,
            (None, false) => {
                return Err("weights lack lm_head but the config does not tie embeddings".into())
            }
            (Some(_), true) => {
                return Err("weights carry an lm_head but the config ties embeddings".into())
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_deterministic_and_valid() {
        let c = LlamaConfig::test_tiny();
        let a = LlamaWeights::random(&c, 7, &Device::Cpu).unwrap();
        let b = LlamaWeights::random(&c, 7, &Device::Cpu).unwrap();
        let d = LlamaWeights::random(&c, 8, &Device::Cpu).unwrap();
        a.validate(&c).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a.layers[1].wk), v(&b.layers[1].wk));
        assert_ne!(v(&a.layers[1].wk), v(&d.layers[1].wk));
        assert_eq!(a.source.to_string(), "random weights (seed 7)");
        let mut untied = c.clone();
        untied.tie_embeddings = false;
        assert!(a.validate(&untied).unwrap_err().contains("lm_head"));
        let mut wrong = c.clone();
        wrong.intermediate += 1;
        assert!(a.validate(&wrong).unwrap_err().contains("w_gate"));
    }
}
