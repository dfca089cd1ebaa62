//! Which model the instances serve and how text becomes tokens and back.
//!
//! Owns model selection (`--model`), loading it once per process (weights
//! are shared by every in-process instance), the per-instance backend and
//! scheduler limits, starting an instance's llumlet over the right backend
//! (candle for real models, the latency model for `profile:FILE`), and the
//! [`TextCodec`]. Must never drive an engine (the llumlet does) nor touch
//! sockets.

use std::path::PathBuf;
use std::sync::Arc;

use llumen_engine::candle::gguf::load_gguf;
use llumen_engine::candle::weights::LlamaWeights;
use llumen_engine::candle::{CandleBackend, Device, LlamaConfig};
use llumen_engine::tokenizer::ChatMessage;
use llumen_engine::{
    models, Engine, LatencyModelBackend, LatencyProfile, MigrationConfig, SchedulerConfig,
    StreamDecoder, Tokenizer,
};

use crate::control::llumlet::{Llumlet, LoadSink, Routes};

use crate::front::api::{ChatTurn, ErrorCode, PromptInput, ServeError};

/// Fixes the CPU thread count candle's matmul uses (`RAYON_NUM_THREADS`,
/// unless already set) to the machine's parallelism. Without it candle 0.11
/// re-reads /proc/cpuinfo on every matmul (about a quarter of a busy engine
/// thread). Call once at the start of `main`, before any thread exists.
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Seed of the test model's random weights (every process builds the same
/// model, so a joined instance and an in-process one agree token for token).
pub const TINY_SEED: u64 = 0x11u64;

/// What `--model` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelChoice {
    /// SmolLM2-135M-Instruct when its file is installed, else the tiny model.
    Auto,
    /// The small random-weight test model (byte-level text codec).
    Tiny,
    /// SmolLM2-135M-Instruct from its default path.
    Smollm2,
    /// A GGUF file.
    Gguf(PathBuf),
    /// A latency profile instead of a model (`profile:FILE`, or
    /// `profile:llama-7b-a10` for the shipped stand-in): steps take the
    /// profile's time in real time and produce placeholder tokens, so a live
    /// server and the simulator run the same fleet.
    Profile(Option<PathBuf>),
}

impl std::str::FromStr for ModelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => ModelChoice::Auto,
            "tiny" | "test" => ModelChoice::Tiny,
            "smollm2" | "smollm2-135m" => ModelChoice::Smollm2,
            path if path.ends_with(".gguf") => ModelChoice::Gguf(path.into()),
            "profile" | "profile:llama-7b-a10" => ModelChoice::Profile(None),
            other if other.starts_with("profile:") => {
                ModelChoice::Profile(Some(other["profile:".len()..].into()))
            }
            other => {
                return Err(format!(
                    "unknown model {other:?}: expected auto, tiny, smollm2, a .gguf path or profile:FILE"
                ))
            }
        })
    }
}

/// Text <-> tokens for the served model.
pub enum TextCodec {
    /// A real tokenizer (BPE from the GGUF file) with its chat template.
    Bpe(Box<Tokenizer>),
    /// The test model's codec: token id = byte value (ids >= 256 decode to
    /// one printable ASCII character); chat turns are joined as `role: content\n`.
    Bytes { vocab: usize },
}

impl TextCodec {
    pub fn vocab_size(&self) -> usize {
        match self {
            TextCodec::Bpe(t) => t.vocab_size(),
            TextCodec::Bytes { vocab } => *vocab,
        }
    }

    /// The end-of-sequence token, if the model has one.
    pub fn eos(&self) -> Option<u32> {
        match self {
            TextCodec::Bpe(t) => t.eos_id(),
            TextCodec::Bytes { .. } => None,
        }
    }

    /// Tokens of a prompt.
    pub fn encode(&self, input: &PromptInput) -> Result<Vec<u32>, ServeError> {
        let tokens = match (self, input) {
            (_, PromptInput::Tokens(t)) => {
                let vocab = self.vocab_size();
                if let Some(bad) = t.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ServeError::new(
                        ErrorCode::InvalidParameter,
                        format!("token id {bad} is outside the model's vocabulary of {vocab}"),
                    ));
                }
                t.clone()
            }
            (TextCodec::Bpe(t), PromptInput::Text(s)) => t.encode(s),
            (TextCodec::Bpe(t), PromptInput::Chat(turns)) => {
                let messages: Vec<ChatMessage> = turns
                    .iter()
                    .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
                    .collect();
                t.encode_chat(&messages).map_err(|e| {
                    ServeError::new(ErrorCode::InvalidParameter, format!("chat template: {e}"))
                })?
            }
            (TextCodec::Bytes { .. }, PromptInput::Text(s)) => s.bytes().map(u32::from).collect(),
            (TextCodec::Bytes { .. }, PromptInput::Chat(turns)) => turns
                .iter()
                .flat_map(|ChatTurn { role, content }| format!("{role}: {content}\n").into_bytes())
                .map(u32::from)
                .collect(),
        };
        if tokens.is_empty() {
            return Err(ServeError::new(
                ErrorCode::InvalidParameter,
                "the prompt has no tokens",
            ));
        }
        Ok(tokens)
    }

    /// A streaming decoder (special tokens skipped).
    pub fn decoder(&self) -> TextDecoder {
        TextDecoder {
            inner: match self {
                TextCodec::Bpe(t) => t.stream_decoder(true),
                TextCodec::Bytes { .. } => StreamDecoder::default(),
            },
        }
    }

    /// Appends the text of `id` to a stream.
    pub fn push(&self, decoder: &mut TextDecoder, id: u32) -> String {
        match self {
            TextCodec::Bpe(t) => decoder.inner.push(t, id),
            TextCodec::Bytes { .. } => match u8::try_from(id) {
                Ok(b) => decoder.inner.push_bytes(&[b]),
                // Ids past the byte range show as printable ASCII, so the
                // random model's output is visible text.
                Err(_) => char::from(b' ' + (id % 95) as u8).to_string(),
            },
        }
    }
}

/// The state of one output stream's decoding.
pub struct TextDecoder {
    inner: StreamDecoder,
}

impl TextDecoder {
    /// Text held back at the end (an incomplete UTF-8 character).
    pub fn finish(&mut self) -> String {
        self.inner.finish()
    }
}

/// A model loaded once per process.
pub struct LoadedModel {
    pub name: String,
    kind: ModelKind,
    pub codec: Arc<TextCodec>,
}

/// What steps an instance's engine.
enum ModelKind {
    /// A transformer on candle.
    Candle {
        config: LlamaConfig,
        weights: LlamaWeights,
    },
    /// A latency profile (the simulator's backend, in real time).
    Profile(Arc<LatencyProfile>),
}

/// Vocabulary of a profile model's byte codec: the latency backend's
/// placeholder tokens are drawn below it.
const PROFILE_VOCAB: u32 = 32_000;

/// Per-instance sizes.
#[derive(Clone, Debug)]
pub struct InstanceShape {
    pub num_blocks: usize,
    pub block_size: usize,
}

impl LoadedModel {
    /// Loads the model `choice` names, on the CPU.
    pub fn load(choice: &ModelChoice) -> Result<Self, String> {
        let path = match choice {
            ModelChoice::Tiny => None,
            ModelChoice::Auto => models::smollm2_path(),
            ModelChoice::Smollm2 => Some(models::smollm2_path().ok_or(
                "SmolLM2-135M-Instruct is not installed: run scripts/fetch-smollm2.sh (or set LLUMEN_SMOLLM2_GGUF)",
            )?),
            ModelChoice::Gguf(p) => Some(p.clone()),
            ModelChoice::Profile(file) => {
                let profile = match file {
                    Some(p) => LatencyProfile::from_path(p)
                        .map_err(|e| format!("loading the latency profile {}: {e}", p.display()))?,
                    None => LatencyProfile::shipped_llama7b_a10_derived(),
                };
                return Ok(Self {
                    name: format!("profile:{}", profile.model()),
                    codec: Arc::new(TextCodec::Bytes {
                        vocab: PROFILE_VOCAB as usize,
                    }),
                    kind: ModelKind::Profile(Arc::new(profile)),
                });
            }
        };
        match path {
            None => {
                let config = LlamaConfig::test_tiny();
                let weights = LlamaWeights::random(&config, TINY_SEED, &Device::Cpu)
                    .map_err(|e| e.to_string())?;
                Ok(Self {
                    name: "llumen-tiny-test".into(),
                    codec: Arc::new(TextCodec::Bytes {
                        vocab: config.vocab,
                    }),
                    kind: ModelKind::Candle { config, weights },
                })
            }
            Some(path) => {
                let model = load_gguf(&path, &Device::Cpu)
                    .map_err(|e| format!("loading {}: {e}", path.display()))?;
                let name = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(|s| s.split('.').next().unwrap_or(s).to_string())
                    .unwrap_or_else(|| "model".into());
                Ok(Self {
                    name,
                    kind: ModelKind::Candle {
                        config: model.config,
                        weights: model.weights,
                    },
                    codec: Arc::new(TextCodec::Bpe(Box::new(model.tokenizer))),
                })
            }
        }
    }

    /// The default KV pool of one instance: 512 blocks of 16 tokens for the
    /// test model, 256 for real models (SmolLM2: 188 MB of f32 KV), the
    /// profile's pool for a profile.
    pub fn default_shape(&self) -> InstanceShape {
        match &self.kind {
            ModelKind::Profile(p) => InstanceShape {
                num_blocks: p.num_blocks(),
                block_size: p.block_size(),
            },
            ModelKind::Candle { .. } => InstanceShape {
                num_blocks: if matches!(*self.codec, TextCodec::Bytes { .. }) {
                    512
                } else {
                    256
                },
                block_size: 16,
            },
        }
    }

    /// The block size an instance must use (a profile's steps are timed for
    /// its own), if the model fixes one.
    pub fn required_block_size(&self) -> Option<usize> {
        match &self.kind {
            ModelKind::Profile(p) => Some(p.block_size()),
            ModelKind::Candle { .. } => None,
        }
    }

    /// Longest prompt + output one instance of `shape` serves.
    pub fn max_model_len(&self, shape: &InstanceShape) -> usize {
        let pool = shape.num_blocks.saturating_sub(shape.num_blocks / 100) * shape.block_size;
        match &self.kind {
            ModelKind::Candle { config, .. } => config.max_position.min(pool),
            ModelKind::Profile(_) => pool,
        }
    }

    /// The scheduler limits of one instance.
    pub fn scheduler_config(&self, shape: &InstanceShape) -> SchedulerConfig {
        match &self.kind {
            // The simulator's instance, with this pool.
            ModelKind::Profile(p) => p.scheduler_config_for(shape.num_blocks),
            ModelKind::Candle { .. } => {
                let mut config = SchedulerConfig::with_blocks(shape.num_blocks, shape.block_size);
                let max_len = self.max_model_len(shape);
                config.max_model_len = Some(max_len);
                config.max_batched_tokens = config.max_batched_tokens.max(max_len);
                config.max_batch_size = 64;
                config
            }
        }
    }

    /// The transformer's configuration (`None` for a latency profile).
    pub fn llama_config(&self) -> Option<&LlamaConfig> {
        match &self.kind {
            ModelKind::Candle { config, .. } => Some(config),
            ModelKind::Profile(_) => None,
        }
    }

    /// A candle backend over the shared weights with its own KV cache (for
    /// benches that drive an engine themselves; a profile has none).
    pub fn backend(&self, shape: &InstanceShape) -> Result<CandleBackend, String> {
        match &self.kind {
            ModelKind::Candle { config, weights } => CandleBackend::new(
                config.clone(),
                weights.clone(),
                shape.num_blocks,
                shape.block_size,
                Device::Cpu,
            )
            .map_err(|e| e.to_string()),
            ModelKind::Profile(_) => {
                Err(format!("{} is a latency profile, not a model", self.name))
            }
        }
    }

    /// Starts instance `id`'s llumlet over an engine of `shape` (a candle
    /// backend over the shared weights, or the profile's latency backend
    /// with one header per KV block, as in the simulator).
    pub fn spawn_llumlet(
        &self,
        id: u32,
        shape: &InstanceShape,
        sink: LoadSink,
        routes: Routes,
        migration: MigrationConfig,
    ) -> Result<Llumlet, String> {
        let config = self.scheduler_config(shape);
        match &self.kind {
            ModelKind::Candle { .. } => {
                let backend = self.backend(shape)?;
                let engine = Engine::new(config, backend).map_err(|e| e.to_string())?;
                Llumlet::spawn(id, engine, sink, routes, migration).map_err(|e| e.to_string())
            }
            ModelKind::Profile(p) => {
                let backend = LatencyModelBackend::new(p.clone())
                    .with_token_range(256..PROFILE_VOCAB)
                    .headers_only();
                let engine = Engine::new(config, backend).map_err(|e| e.to_string())?;
                Llumlet::spawn(id, engine, sink, routes, migration).map_err(|e| e.to_string())
            }
        }
    }
}
