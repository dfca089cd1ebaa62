//! Shape of a Llama-family decoder ([`LlamaConfig`]) and its presets.
//!
//! **Owns**: the hyper-parameters a forward pass and a weight loader agree on
//! (sizes, RoPE base, RMSNorm epsilon, context length, tied embeddings) and
//! derived sizes (KV bytes per token). **Never touches**: tensors, files,
//! scheduling or block allocation.

/// Hyper-parameters of a Llama-style decoder-only transformer (HF `LlamaConfig`
/// naming in spirit: pre-norm RMSNorm, rotary positions, grouped-query
/// attention, SwiGLU feed-forward).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Model (residual stream) width: HF `hidden_size`.
    pub hidden: usize,
    /// Feed-forward width: HF `intermediate_size`.
    pub intermediate: usize,
    /// Decoder layers: HF `num_hidden_layers`.
    pub layers: usize,
    /// Query heads: HF `num_attention_heads`.
    pub heads: usize,
    /// Key/value heads (grouped-query attention): HF `num_key_value_heads`.
    /// Must divide `heads`; query head `h` reads KV head `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    /// Width of one head (even; RoPE rotates its two halves).
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab: usize,
    /// RoPE base: frequency `i` is `rope_theta^(-2i / head_dim)`.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Longest sequence (prompt + output) the model accepts; sizes the RoPE table.
    pub max_position: usize,
    /// The LM head is the token embedding (SmolLM2 does this).
    pub tie_embeddings: bool,
}

impl LlamaConfig {
    /// A small random-weight model for tests: 2 layers, hidden 128, 4 query /
    /// 2 KV heads of 32, FFN 352, vocab 4096 (about 1.1 M parameters), tied
    /// embeddings. Fast in the debug profile.
    pub fn test_tiny() -> Self {
        Self {
            hidden: 128,
            intermediate: 352,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            vocab: 4096,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            max_position: 4096,
            tie_embeddings: true,
        }
    }

    /// SmolLM2-135M's shape: 30 layers, hidden 576, FFN 1536, 9 query / 3 KV
    /// heads of 64, RoPE theta 1e5, vocab 49,152, context 8192, tied
    /// embeddings, RMSNorm eps 1e-5.
    pub fn smollm2_135m() -> Self {
        Self {
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            vocab: 49_152,
            rope_theta: 100_000.0,
            rms_eps: 1e-5,
            max_position: 8192,
            tie_embeddings: true,
        }
    }

    /// Width of all query heads together (`heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of all KV heads together (`kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Bytes of KV cache one token occupies (all layers, K and V, f32).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * 2 * self.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Number of parameters (the tied LM head counted once).
    pub fn num_params(&self) -> usize {
        let h = self.hidden;
        let per_layer = 2 * h // norms
            + self.q_dim() * h * 2 // wq, wo
            + self.kv_dim() * h * 2 // wk, wv
            + 3 * self.intermediate * h;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab * h
        };
        self.vocab * h + self.layers * per_layer + h + head
    }

    /// Checks the sizes are usable; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("vocab", self.vocab),
            ("max_position", self.max_position),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("model config: {name} must be positive"));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "model config: heads ({}) must be a multiple of kv_heads ({})",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "model config: head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if self.vocab > u32::MAX as usize || self.max_position > u32::MAX as usize {
            return Err("model config: vocab and max_position must fit in u32".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!(
                "model config: rope_theta ({}) must be positive",
                self.rope_theta
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(format!(
                "model config: rms_eps ({}) must be >= 0",
                self.rms_eps
            ));
        }
        Ok(())
    }

    /// One-line shape summary, e.g. `llama 30L h576 ffn1536 9q/3kv x64 vocab49152 ctx8192 tied`.
    pub fn shape_summary(&self) -> String {
        format!(
            "llama {}L h{} ffn{} {}q/{}kv x{} vocab{} ctx{}{} ({:.1} M params)",
            self.layers,
            self.hidden,
            self.intermediate,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.vocab,
            self.max_position,
            if self.tie_embeddings { " tied" } else { "" },
            self.num_params() as f64 / 1e6
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        LlamaConfig::test_tiny().validate().unwrap();
        let s = LlamaConfig::smollm2_135m();
        s.validate().unwrap();
        // 134.5 M parameters as the GGUF file says.
        assert!(
            (134_000_000..135_000_000).contains(&s.num_params()),
            "{}",
            s.num_params()
        );
        assert_eq!(s.group(), 3);
        assert_eq!(s.kv_bytes_per_token(), 30 * 2 * 192 * 4);
    }

    #[test]
    fn invalid_configs_are_named() {
        let mut c = LlamaConfig::test_tiny();
        c.kv_heads = 3;
        assert!(c.validate().unwrap_err().contains("kv_heads"));
        let mut c = LlamaConfig::test_tiny();
        c.head_dim = 33;
        assert!(c.validate().unwrap_err().contains("head_dim"));
        let mut c = LlamaConfig::test_tiny();
        c.vocab = 0;
        assert!(c.validate().unwrap_err().contains("vocab"));
    }
}
