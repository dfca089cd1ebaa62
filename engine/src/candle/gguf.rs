//! Loads a llama.cpp GGUF file (e.g. SmolLM2-135M-Instruct, Q4_1) into a
//! [`LlamaConfig`], f32 [`LlamaWeights`] and its [`Tokenizer`].
//!
//! **Owns**: reading the file (candle's `gguf_file` reader), the config from
//! `{arch}.*` metadata, llama.cpp tensor names -> [`LlamaWeights`] fields,
//! dequantization to f32 on the CPU, and undoing llama.cpp's q/k rotary
//! permutation. **Never touches**: the forward pass, the KV cache,
//! scheduling. Every error names the file and the missing or mis-shaped key
//! or tensor.
//!
//! # Name map
//!
//! | GGUF | [`LlamaWeights`] |
//! |---|---|
//! | `token_embd.weight` | `embed` |
//! | `blk.N.attn_norm.weight` | `layers[N].attn_norm` |
//! | `blk.N.attn_q.weight`, `attn_k` | `layers[N].wq`, `wk` (un-permuted, see below) |
//! | `blk.N.attn_v.weight`, `attn_output` | `layers[N].wv`, `wo` |
//! | `blk.N.ffn_norm.weight` | `layers[N].ffn_norm` |
//! | `blk.N.ffn_gate.weight`, `ffn_up`, `ffn_down` | `layers[N].w_gate`, `w_up`, `w_down` |
//! | `output_norm.weight` | `norm` |
//! | `output.weight` (absent when tied) | `lm_head` |
//!
//! GGUF dimensions are stored innermost first; candle's reader reverses them,
//! so a linear weight reads as `[out, in]`, the HF layout. llama.cpp's
//! converter permutes q/k rows per head from HF's half-split rotary order to
//! interleaved pairs (HF row `j * head_dim/2 + i` -> GGUF row `2i + j`); the
//! loader undoes it (GGUF row `2i` -> row `i`, `2i+1` -> `i + head_dim/2`).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::{LayerWeights, LlamaConfig, LlamaWeights, WeightSource};
use crate::tokenizer::{value_as_i64, Tokenizer};
use crate::BackendError;

/// A GGUF loading error; the message names the file and what is wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufError(pub String);

impl std::fmt::Display for GgufError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GGUF: {}", self.0)
    }
}

impl std::error::Error for GgufError {}

impl From<GgufError> for BackendError {
    fn from(e: GgufError) -> Self {
        BackendError(e.to_string())
    }
}

/// Everything a GGUF file gives: shape, weights (f32) and tokenizer.
#[derive(Clone, Debug)]
pub struct GgufModel {
    pub config: LlamaConfig,
    pub weights: LlamaWeights,
    pub tokenizer: Tokenizer,
}

/// Loads config, weights (dequantized to f32 on the CPU, then moved to
/// `device`) and tokenizer from the GGUF file at `path`.
pub fn load_gguf(path: impl AsRef<Path>, device: &Device) -> Result<GgufModel, GgufError> {
    let mut file = GgufFile::open(path)?;
    let config = file.config()?;
    let tokenizer = file.tokenizer()?;
    if tokenizer.vocab_size() != config.vocab {
        return Err(file.error(format!(
            "the tokenizer has {} tokens, the model a vocabulary of {}",
            tokenizer.vocab_size(),
            config.vocab
        )));
    }
    let weights = file.weights(&config, device)?;
    Ok(GgufModel {
        config,
        weights,
        tokenizer,
    })
}

/// An open GGUF file whose header (metadata, tensor directory) has been read.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<File>,
    content: Content,
}

/// A value read from metadata, by kind.
enum Want {
    Int,
    Float,
}

impl GgufFile {
    /// Opens `path` and reads its header; fails on a missing file or one
    /// that is not a readable GGUF (bad magic, truncated header, ...).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)
            .map_err(|e| GgufError(format!("{}: cannot open: {e}", path.display())))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| GgufError(format!("{}: not a valid GGUF file: {e}", path.display())))?;
        Ok(Self {
            path,
            reader,
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/values.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Tensor names in the file, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v
    }

    fn error(&self, msg: impl std::fmt::Display) -> GgufError {
        GgufError(format!("{}: {msg}", self.path.display()))
    }

    fn value(&self, key: &str, want: Want) -> Result<Option<f64>, GgufError> {
        let Some(v) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        let got = match (want, v) {
            (Want::Float, Value::F32(x)) => {
                // Shortest decimal of the f32 (1e-5 stays 1e-5, not 9.99999974e-6).
                Some(x.to_string().parse::<f64>().unwrap_or(*x as f64))
            }
            (Want::Float, Value::F64(x)) => Some(*x),
            (_, v) => value_as_i64(v).map(|i| i as f64),
        };
        match got {
            Some(x) => Ok(Some(x)),
            None => Err(self.error(format!(
                "metadata {key}: expected a number, found {:?}",
                v.value_type()
            ))),
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, GgufError> {
        match self.value(key, Want::Int)? {
            None => Ok(None),
            Some(x) if x >= 0.0 && x <= u32::MAX as f64 => Ok(Some(x as usize)),
            Some(x) => Err(self.error(format!("metadata {key}: {x} out of range"))),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize, GgufError> {
        self.usize_opt(key)?
            .ok_or_else(|| self.error(format!("metadata key {key} missing")))
    }

    fn string_opt(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.error(format!(
                "metadata {key}: expected a string, found {:?}",
                v.value_type()
            ))),
        }
    }

    /// `general.architecture` (must be `llama`).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        match self.string_opt("general.architecture")? {
            Some("llama") => Ok("llama"),
            Some(a) => Err(self.error(format!(
                "general.architecture is {a:?}; only \"llama\" models are supported"
            ))),
            None => Err(self.error("metadata key general.architecture missing")),
        }
    }

    /// The model's shape from `llama.*` metadata, checked against the tensor
    /// directory (embedding size, attention and FFN widths, tied head).
    pub fn config(&self) -> Result<LlamaConfig, GgufError> {
        let arch = self.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = self.usize_req(&key("embedding_length"))?;
        let heads = self.usize_req(&key("attention.head_count"))?;
        if heads == 0 {
            return Err(self.error(format!("metadata {}: 0 heads", key("attention.head_count"))));
        }
        let kv_heads = self
            .usize_opt(&key("attention.head_count_kv"))?
            .unwrap_or(heads);
        let head_dim = match self.usize_opt(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(self.error(format!(
                    "embedding_length {hidden} is not a multiple of head_count {heads} and {} is missing",
                    key("attention.key_length")
                )))
            }
        };
        if let Some(v) = self.usize_opt(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(self.error(format!(
                    "{} = {v} differs from the key length {head_dim}: unsupported",
                    key("attention.value_length")
                )));
            }
        }
        if let Some(r) = self.usize_opt(&key("rope.dimension_count"))? {
            if r != head_dim {
                return Err(self.error(format!(
                    "{} = {r} but heads are {head_dim} wide: partial rotary embeddings are unsupported",
                    key("rope.dimension_count")
                )));
            }
        }
        if let Some(s) = self.string_opt(&key("rope.scaling.type"))? {
            if s != "none" {
                return Err(self.error(format!(
                    "{} = {s:?}: RoPE scaling is unsupported",
                    key("rope.scaling.type")
                )));
            }
        }
        let embd = self.tensor_dims("token_embd.weight")?;
        let vocab = match self.usize_opt(&key("vocab_size"))? {
            Some(v) => v,
            None => match self.content.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => embd.first().copied().unwrap_or(0),
            },
        };
        let config = LlamaConfig {
            hidden,
            intermediate: self.usize_req(&key("feed_forward_length"))?,
            layers: self.usize_req(&key("block_count"))?,
            heads,
            kv_heads,
            head_dim,
            vocab,
            rope_theta: self
                .value(&key("rope.freq_base"), Want::Float)?
                .unwrap_or(10_000.0),
            rms_eps: self
                .value(&key("attention.layer_norm_rms_epsilon"), Want::Float)?
                .ok_or_else(|| {
                    self.error(format!(
                        "metadata key {} missing",
                        key("attention.layer_norm_rms_epsilon")
                    ))
                })?,
            max_position: self.usize_req(&key("context_length"))?,
            tie_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
        };
        config.validate().map_err(|e| self.error(e))?;
        self.check_tensors(&config)?;
        Ok(config)
    }

    /// The tokenizer from `tokenizer.*` metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer, GgufError> {
        Tokenizer::from_gguf_metadata(&self.content.metadata).map_err(|e| self.error(e))
    }

    fn tensor_dims(&self, name: &str) -> Result<&[usize], GgufError> {
        self.content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims())
            .ok_or_else(|| self.error(format!("tensor {name} missing")))
    }

    fn check_tensor(&self, name: &str, dims: &[usize], why: &str) -> Result<(), GgufError> {
        let got = self.tensor_dims(name)?;
        if got != dims {
            return Err(self.error(format!(
                "tensor {name}: shape {got:?} (as [out, in]), expected {dims:?} ({why})"
            )));
        }
        Ok(())
    }

    /// Checks every tensor `config` needs is present with its shape.
    fn check_tensors(&self, c: &LlamaConfig) -> Result<(), GgufError> {
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.intermediate);
        let why_q = format!("heads {} x head_dim {}, hidden {h}", c.heads, c.head_dim);
        let why_kv = format!(
            "kv_heads {} x head_dim {}, hidden {h}",
            c.kv_heads, c.head_dim
        );
        let why_f = format!("feed_forward_length {f}, hidden {h}");
        let why_h = format!("embedding_length {h}");
        self.check_tensor(
            "token_embd.weight",
            &[c.vocab, h],
            &format!("vocab {}, hidden {h}", c.vocab),
        )?;
        for i in 0..c.layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            self.check_tensor(&n("attn_norm"), &[h], &why_h)?;
            self.check_tensor(&n("attn_q"), &[q, h], &why_q)?;
            self.check_tensor(&n("attn_k"), &[kv, h], &why_kv)?;
            self.check_tensor(&n("attn_v"), &[kv, h], &why_kv)?;
            self.check_tensor(&n("attn_output"), &[h, q], &why_q)?;
            self.check_tensor(&n("ffn_norm"), &[h], &why_h)?;
            self.check_tensor(&n("ffn_gate"), &[f, h], &why_f)?;
            self.check_tensor(&n("ffn_up"), &[f, h], &why_f)?;
            self.check_tensor(&n("ffn_down"), &[h, f], &why_f)?;
        }
        if self
            .content
            .tensor_infos
            .contains_key(&format!("blk.{}.attn_q.weight", c.layers))
        {
            return Err(self.error(format!(
                "tensor blk.{}.attn_q.weight present but the metadata says {} layers",
                c.layers, c.layers
            )));
        }
        self.check_tensor("output_norm.weight", &[h], &why_h)?;
        if !c.tie_embeddings {
            self.check_tensor(
                "output.weight",
                &[c.vocab, h],
                &format!("vocab {}, hidden {h}", c.vocab),
            )?;
        }
        Ok(())
    }

    /// Reads `name` and dequantizes it to a contiguous f32 tensor on the CPU.
    fn read_f32(&mut self, name: &str) -> Result<Tensor, GgufError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.error(format!("tensor {name} missing")))?;
        let t = info
            .read(
                &mut self.reader,
                self.content.tensor_data_offset,
                &Device::Cpu,
            )
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| {
                GgufError(format!(
                    "{}: tensor {name} ({:?}): {e}",
                    self.path.display(),
                    info.ggml_dtype
                ))
            })?;
        Ok(t)
    }

    /// All weights of `config` (from [`GgufFile::config`]), dequantized to f32
    /// on the CPU, q/k un-permuted to HF's rotary layout, then moved to
    /// `device`.
    pub fn weights(
        &mut self,
        config: &LlamaConfig,
        device: &Device,
    ) -> Result<LlamaWeights, GgufError> {
        self.check_tensors(config)?;
        let path = self.path.clone();
        let cerr = |name: &str, e: candle_core::Error| {
            GgufError(format!("{}: tensor {name}: {e}", path.display()))
        };
        let get =
            |this: &mut Self, name: String, rope: Option<usize>| -> Result<Tensor, GgufError> {
                let t = this.read_f32(&name)?;
                let t = match rope {
                    Some(heads) => unpermute_rope_rows(&t, heads).map_err(|e| cerr(&name, e))?,
                    None => t,
                };
                t.to_device(device).map_err(|e| cerr(&name, e))
            };
        let embed = get(self, "token_embd.weight".into(), None)?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: get(self, n("attn_norm"), None)?,
                wq: get(self, n("attn_q"), Some(config.heads))?,
                wk: get(self, n("attn_k"), Some(config.kv_heads))?,
                wv: get(self, n("attn_v"), None)?,
                wo: get(self, n("attn_output"), None)?,
                ffn_norm: get(self, n("ffn_norm"), None)?,
                w_gate: get(self, n("ffn_gate"), None)?,
                w_up: get(self, n("ffn_up"), None)?,
                w_down: get(self, n("ffn_down"), None)?,
            });
        }
        let norm = get(self, "output_norm.weight".into(), None)?;
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(get(self, "output.weight".into(), None)?)
        };
        let weights = LlamaWeights {
            source: WeightSource::File(self.path.clone()),
            embed,
            layers,
            norm,
            lm_head,
        };
        weights.validate(config).map_err(|e| self.error(e))?;
        Ok(weights)
    }
}

/// Undoes llama.cpp's q/k permutation: within each of `heads` heads of `d`
/// rows, row `2i` goes to `i` and row `2i+1` to `i + d/2`.
pub fn unpermute_rope_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        candle_core::bail!("{rows} rows do not split into {heads} heads of an even width");
    }
    let half = rows / heads / 2;
    t.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// llama.cpp's converter permutation (HF half-split -> GGUF interleaved), the
/// inverse of [`unpermute_rope_rows`]; for writing test files.
pub fn permute_rope_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        candle_core::bail!("{rows} rows do not split into {heads} heads of an even width");
    }
    let half = rows / heads / 2;
    t.reshape((heads, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

#[cfg(test)]
mod tests;
