//! The latency-model backend: simulation of an engine step by a latency profile.
//!
//! **Owns**: the latency-profile format (a versioned JSON file: which model on
//! which hardware, whether the figures were measured or derived and from what,
//! the KV geometry, a prefill table and a decode table with their linear
//! fits), its loader and validation, the lookup that turns the work of one
//! engine step into a duration, the roofline generator of the shipped
//! stand-in profile `profiles/llama-7b-a10-derived.json`, the generator of
//! the measured-basis `profiles/llama-7b-a10-measured.json` (in
//! [`measured`]: vidur's A40 operator times composed into steps), and
//! [`LatencyModelBackend`], a [`ModelBackend`] whose steps cost what the
//! profile says and whose "KV cache" is a compact, verifiable byte pattern.
//!
//! **Never touches**: scheduling (what runs in a step is the local
//! scheduler's call), block allocation (the block manager's), clocks, threads,
//! QUIC, Wasm or sled. Its only I/O is [`LatencyProfile::from_path`], which a
//! caller invokes explicitly; a step is pure computation, so the simulator
//! advances virtual time by [`StepOutput::duration_us`] and never sleeps.
//!
//! # Profile format (version 1)
//!
//! ```json
//! {
//!   "format": "llumen-latency-profile",   // fixed tag
//!   "version": 1,                         // this build reads version 1 only
//!   "model": "llama-7b-fp16",             // label
//!   "hardware": "nvidia-a10",             // label
//!   "provenance": {
//!     "kind": "derived",                  // "measured" or "derived"
//!     "source": "…",                      // measured with what / derived from what
//!     "notes": ["…"]                      // optional free text
//!   },
//!   "block_size": 16,                     // tokens per KV block
//!   "num_blocks": 792,                    // KV capacity of one instance, blocks
//!   "max_batched_tokens": 12000,          // most tokens one step may carry
//!   "kv_bytes_per_block": 8388608,        // all layers, K and V
//!   "migration_bandwidth_bytes_per_s": 15000000000.0,   // optional
//!   "swap_bandwidth_bytes_per_s": 22000000000.0,        // optional
//!   "prefill": {
//!     "points": [ { "tokens": 16, "ms": 34.6 }, … ],     // total prefill tokens of a step
//!     "fit": { "a_ms_per_token": …, "b_ms": … }          // optional
//!   },
//!   "decode": {
//!     "batch_multiple": 8,                // lookups pad the batch up to a multiple of this
//!     "rows": [ { "batch": 8, "points": [ { "context_tokens": 64, "ms": 33.5 }, … ] }, … ],
//!     "fit": { "a_ms_per_seq": …, "b_ms_per_context_token": …, "c_ms": … }   // optional
//!   }
//! }
//! ```
//!
//! Unknown fields are rejected (a misspelt field is an error, not a default).
//! A file with another `format` tag or `version` is refused before anything
//! else is read.
//!
//! **Fits.** prefill(tokens) ≈ a·tokens + b and decode(batch, context) ≈
//! a·batch + b·context + c, in milliseconds. A fit given in the file is used
//! as is; otherwise it is computed at load by least squares over every table
//! point (decode: every (row batch, context) point). Coefficients that the
//! table cannot determine (e.g. a decode table with a single row says nothing
//! about the per-sequence cost) come out as 0.
//!
//! **Lookup rules** (all times in ms, converted to whole µs at the end):
//!
//! - *Prefill* of `t > 0` tokens: a table entry at `t` is returned as is;
//!   between two entries, linear interpolation; above the last entry
//!   `(t_n, y_n)`, `y_n + a·(t − t_n)`; below the first entry `(t_0, y_0)`,
//!   `max(y_0 − a·(t_0 − t), y_0·t/t_0)` (the second term keeps it positive).
//!   Extrapolation is anchored at the table's edge with the fit's slope, so the
//!   curve stays continuous and monotone even where the fit's intercept does
//!   not pass through the edge point.
//! - *Decode* of `n > 0` sequences holding `c` context tokens in all: the batch
//!   is first padded up to a multiple of `batch_multiple` (`k`). Within a row
//!   the context is looked up like prefill, with slope `b`. A row at `k` is
//!   used as is; between two rows, linear interpolation in the batch of the
//!   two rows' values at `c`; above the last row (batch `B`), that row's value
//!   plus `a·(k − B)` (the artifact's tables stopped at 56; a larger batch is
//!   extrapolated, never clamped, so it never looks cheaper); below the first
//!   row, like prefill below its first entry.
//! - *A step* costs prefill(prefill tokens) + decode(batch, context); a step
//!   with both parts pays both (two passes, no overlap assumed); an empty step
//!   costs 0. Negative fitted slopes are treated as 0 when extrapolating.
//!
//! **Validation** at load: format and version; positive geometry; non-empty
//! tables; keys (tokens, batch, context) positive and strictly increasing;
//! times finite, positive and non-decreasing along every key; every decode
//! row no faster than the row below it at every context (checked at every
//! point where either row's curve bends, which makes it exact); fits finite.
//!
//! # The backend
//!
//! [`LatencyModelBackend`] runs no model. A step's next tokens are
//! placeholders, a deterministic function of (sequence id, position) in a
//! configurable id range (by default `3..32000`, skipping LLaMA's special ids
//! 0–2): **they are not text**, only reproducible, so preemption, recompute
//! and migration produce the same tokens. Its duration comes from the profile.
//! Its KV store keeps, per block, one 64-bit digest per slot (of sequence,
//! position and token) rather than the bytes, so a simulated fleet costs
//! kilobytes; [`ModelBackend::export_blocks`] expands each block to exactly
//! `kv_bytes_per_block` bytes (a self-describing pattern; a never-written
//! slot has a deterministic filler) and [`ModelBackend::import_blocks`]
//! recognises the pattern, so what a destination exports after an import is
//! byte for byte what the source exported. Bytes that are not such a pattern
//! are kept verbatim.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, ForwardBatch, ModelBackend, StepOutput};
use crate::{BlockId, SeqId, TokenId};

/// The `format` tag of a latency profile.
pub const PROFILE_FORMAT: &str = "llumen-latency-profile";
/// The profile format version this build reads and writes.
pub const PROFILE_VERSION: u32 = 1;

/// The shipped stand-in profile for LLaMA-7B on one A10 (derived, not
/// measured); equal to `LatencyProfile::derived_llama7b_a10().to_json_pretty()`.
pub const LLAMA7B_A10_DERIVED_JSON: &str = include_str!("../profiles/llama-7b-a10-derived.json");

/// The shipped measured-basis profile for LLaMA-7B on one A10 (A40
/// operator measurements, composed and scaled); equal to
/// `LatencyProfile::measured_llama7b_a10().to_json_pretty()`.
pub const LLAMA7B_A10_MEASURED_JSON: &str = include_str!("../profiles/llama-7b-a10-measured.json");

pub mod measured;

// ---------------------------------------------------------------------------
// The file format
// ---------------------------------------------------------------------------

/// Whether a profile's figures were measured or derived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKind {
    /// Timed on the named hardware.
    Measured,
    /// Computed from a model of the hardware (e.g. a roofline), not timed.
    Derived,
}

impl fmt::Display for ProfileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProfileKind::Measured => "measured",
            ProfileKind::Derived => "derived",
        })
    }
}

/// Where a profile's figures come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub kind: ProfileKind,
    /// What it was measured with, or derived from.
    pub source: String,
    /// Free-text details (formulas, constants, caveats).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One prefill measurement: a step carrying `tokens` prefill tokens in all.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillPoint {
    pub tokens: u64,
    pub ms: f64,
}

/// prefill(tokens) ≈ `a_ms_per_token`·tokens + `b_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillFit {
    pub a_ms_per_token: f64,
    pub b_ms: f64,
}

impl PrefillFit {
    /// The fit's value at `tokens`, in ms.
    pub fn eval(&self, tokens: f64) -> f64 {
        self.a_ms_per_token * tokens + self.b_ms
    }
}

/// The prefill table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillTable {
    /// Strictly increasing `tokens`, non-decreasing `ms`.
    pub points: Vec<PrefillPoint>,
    /// Computed by least squares at load when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<PrefillFit>,
}

/// One decode measurement at a row's batch size.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodePoint {
    /// Σ over the batch of the tokens each sequence attends to (its context,
    /// the token being decoded included).
    pub context_tokens: u64,
    pub ms: f64,
}

/// The decode measurements at one batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeRow {
    pub batch: u64,
    /// Strictly increasing `context_tokens`, non-decreasing `ms`.
    pub points: Vec<DecodePoint>,
}

/// decode(batch, context) ≈ `a_ms_per_seq`·batch +
/// `b_ms_per_context_token`·context + `c_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeFit {
    pub a_ms_per_seq: f64,
    pub b_ms_per_context_token: f64,
    pub c_ms: f64,
}

impl DecodeFit {
    /// The fit's value at (`batch`, `context_tokens`), in ms.
    pub fn eval(&self, batch: f64, context_tokens: f64) -> f64 {
        self.a_ms_per_seq * batch + self.b_ms_per_context_token * context_tokens + self.c_ms
    }
}

/// The decode table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeTable {
    /// Lookups pad the batch size up to a multiple of this (1 = no padding).
    pub batch_multiple: u64,
    /// Strictly increasing `batch`.
    pub rows: Vec<DecodeRow>,
    /// Computed by least squares at load when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<DecodeFit>,
}

/// A latency profile as stored: the serde image of the JSON file. Build a
/// [`LatencyProfile`] from it to validate it and look times up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileData {
    /// Always [`PROFILE_FORMAT`].
    pub format: String,
    /// Always [`PROFILE_VERSION`].
    pub version: u32,
    pub model: String,
    pub hardware: String,
    pub provenance: Provenance,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV capacity of one instance, in blocks.
    pub num_blocks: usize,
    /// Most tokens one step may carry.
    pub max_batched_tokens: usize,
    /// Bytes of KV per block (all layers, K and V).
    pub kv_bytes_per_block: usize,
    /// Instance-to-instance KV copy bandwidth, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_bandwidth_bytes_per_s: Option<f64>,
    /// GPU-to-host swap bandwidth, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_bandwidth_bytes_per_s: Option<f64>,
    pub prefill: PrefillTable,
    pub decode: DecodeTable,
}

/// Why a profile could not be loaded.
#[derive(Debug)]
pub enum ProfileError {
    /// The file could not be read.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not JSON, or not the shape of a profile (missing / unknown / mistyped
    /// field); the message carries serde's line and column.
    Json {
        origin: String,
        source: serde_json::Error,
    },
    /// Another `format` tag or an unsupported `version`.
    Format { origin: String, message: String },
    /// Well-formed, but the figures break a rule (the message names the field).
    Invalid { origin: String, message: String },
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProfileError::Io { path, source } => {
                write!(
                    f,
                    "latency profile {}: cannot read: {source}",
                    path.display()
                )
            }
            ProfileError::Json { origin, source } => {
                write!(
                    f,
                    "latency profile {origin}: not a valid profile document: {source}"
                )
            }
            ProfileError::Format { origin, message } => {
                write!(f, "latency profile {origin}: {message}")
            }
            ProfileError::Invalid { origin, message } => {
                write!(f, "latency profile {origin}: invalid: {message}")
            }
        }
    }
}

impl std::error::Error for ProfileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProfileError::Io { source, .. } => Some(source),
            ProfileError::Json { source, .. } => Some(source),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// The validated profile
// ---------------------------------------------------------------------------

/// A validated latency profile, ready for lookups. Cheap to share behind an
/// `Arc` among the instances of a simulated fleet.
#[derive(Clone, Debug)]
pub struct LatencyProfile {
    data: ProfileData,
    prefill_fit: PrefillFit,
    decode_fit: DecodeFit,
    /// (tokens, ms)
    prefill_curve: Vec<(f64, f64)>,
    /// (batch, [(context, ms)])
    decode_rows: Vec<(f64, Vec<(f64, f64)>)>,
    /// Extrapolation slopes: the fit's, negatives treated as 0.
    prefill_slope: f64,
    decode_seq_slope: f64,
    decode_ctx_slope: f64,
}

/// Just enough of a document to check its tag and version first.
#[derive(Deserialize)]
struct Header {
    format: Option<serde_json::Value>,
    version: Option<serde_json::Value>,
}

impl LatencyProfile {
    /// Parses and validates a profile document.
    pub fn from_json_str(text: &str) -> Result<Self, ProfileError> {
        Self::from_json_str_at(text, "<string>")
    }

    /// Reads, parses and validates a profile file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ProfileError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str_at(&text, &path.display().to_string())
    }

    fn from_json_str_at(text: &str, origin: &str) -> Result<Self, ProfileError> {
        let json_err = |source| ProfileError::Json {
            origin: origin.to_string(),
            source,
        };
        let header: Header = serde_json::from_str(text).map_err(json_err)?;
        let format_err = |message: String| ProfileError::Format {
            origin: origin.to_string(),
            message,
        };
        match &header.format {
            Some(serde_json::Value::String(s)) if s == PROFILE_FORMAT => {}
            Some(other) => {
                return Err(format_err(format!(
                    "`format` is {other}, expected \"{PROFILE_FORMAT}\""
                )));
            }
            None => {
                return Err(format_err(format!(
                    "no `format` field (expected \"{PROFILE_FORMAT}\")"
                )))
            }
        }
        match &header.version {
            Some(v) if v.as_u64() == Some(PROFILE_VERSION as u64) => {}
            Some(v) => {
                return Err(format_err(format!(
                    "unsupported `version` {v}: this build reads version {PROFILE_VERSION}"
                )));
            }
            None => return Err(format_err("no `version` field".to_string())),
        }
        let data: ProfileData = serde_json::from_str(text).map_err(json_err)?;
        Self::from_data_at(data, origin)
    }

    /// Validates `data` (see the module docs for the rules) and computes the
    /// fits it does not carry.
    pub fn from_data(data: ProfileData) -> Result<Self, ProfileError> {
        Self::from_data_at(data, "<data>")
    }

    fn from_data_at(data: ProfileData, origin: &str) -> Result<Self, ProfileError> {
        validate(&data, origin)
    }

    /// The profile as a pretty-printed JSON document (with a final newline):
    /// the file format. Fits are written only if the data carried them.
    pub fn to_json_pretty(&self) -> String {
        let mut s = serde_json::to_string_pretty(&self.data).expect("a profile serialises");
        s.push('\n');
        s
    }

    /// The stored form.
    pub fn data(&self) -> &ProfileData {
        &self.data
    }
    pub fn model(&self) -> &str {
        &self.data.model
    }
    pub fn hardware(&self) -> &str {
        &self.data.hardware
    }
    pub fn provenance(&self) -> &Provenance {
        &self.data.provenance
    }
    pub fn block_size(&self) -> usize {
        self.data.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.data.num_blocks
    }
    /// KV capacity in tokens (`num_blocks × block_size`).
    pub fn kv_capacity_tokens(&self) -> usize {
        self.data.num_blocks * self.data.block_size
    }
    pub fn max_batched_tokens(&self) -> usize {
        self.data.max_batched_tokens
    }
    pub fn kv_bytes_per_block(&self) -> usize {
        self.data.kv_bytes_per_block
    }
    /// The local scheduler of an instance of this profile, as the simulator
    /// and a `--model profile:FILE` server both run it: the profile's block
    /// size, pool and batched-token limit, vLLM's 1% watermark and 256
    /// sequences per batch.
    pub fn scheduler_config(&self) -> crate::SchedulerConfig {
        self.scheduler_config_for(self.num_blocks())
    }
    /// [`scheduler_config`](Self::scheduler_config) with a pool of
    /// `num_blocks` instead of the profile's (its watermark 1% of it).
    pub fn scheduler_config_for(&self, num_blocks: usize) -> crate::SchedulerConfig {
        let mut config = crate::SchedulerConfig::with_blocks(num_blocks, self.block_size());
        config.max_batched_tokens = self.max_batched_tokens().max(config.max_batch_size);
        config
    }
    /// The prefill fit in use (stored, or fitted at load).
    pub fn prefill_fit(&self) -> PrefillFit {
        self.prefill_fit
    }
    /// The decode fit in use (stored, or fitted at load).
    pub fn decode_fit(&self) -> DecodeFit {
        self.decode_fit
    }

    /// A one-line label: model, hardware, kind.
    pub fn label(&self) -> String {
        format!(
            "{} on {} ({} profile)",
            self.data.model, self.data.hardware, self.data.provenance.kind
        )
    }

    /// The batch size a decode lookup uses: `batch` padded up to a multiple
    /// of the table's `batch_multiple`.
    pub fn padded_batch(&self, batch: usize) -> usize {
        let m = self.data.decode.batch_multiple as usize;
        batch.div_ceil(m) * m
    }

    /// Time of a prefill of `tokens` tokens in all, in ms (0 for 0 tokens).
    pub fn prefill_time_ms(&self, tokens: usize) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        eval_curve(&self.prefill_curve, tokens as f64, self.prefill_slope)
    }

    /// Time of a decode step of `batch` sequences attending to
    /// `context_tokens` tokens in all, in ms (0 for an empty batch).
    pub fn decode_time_ms(&self, batch: usize, context_tokens: usize) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        let key = self.padded_batch(batch) as f64;
        let ctx = context_tokens as f64;
        eval_rows(
            &self.decode_rows,
            key,
            ctx,
            self.decode_seq_slope,
            self.decode_ctx_slope,
        )
    }

    /// Duration of one engine step, in whole µs: `prefill_tokens` tokens of
    /// prefill plus a decode of `decode_batch` sequences with
    /// `decode_context_tokens` context tokens in all.
    pub fn step_time_us(
        &self,
        prefill_tokens: usize,
        decode_batch: usize,
        decode_context_tokens: usize,
    ) -> u64 {
        let ms = self.prefill_time_ms(prefill_tokens)
            + self.decode_time_ms(decode_batch, decode_context_tokens);
        ms_to_us(ms)
    }

    /// Time to copy `blocks` KV blocks at the profile's migration bandwidth,
    /// in µs; `None` when the profile has no migration bandwidth.
    pub fn block_transfer_time_us(&self, blocks: usize) -> Option<u64> {
        let bw = self.data.migration_bandwidth_bytes_per_s?;
        Some(migration_time_us(
            (blocks as u64).saturating_mul(self.data.kv_bytes_per_block as u64),
            bw,
        ))
    }

    /// The stand-in profile for LLaMA-7B (fp16) on one NVIDIA A10, **derived
    /// from a roofline, not measured** ([`RooflineModel::LLAMA7B_A10`]), with
    /// the geometry of the Llumnix artifact's simulator: block 16, 792 blocks,
    /// max batched tokens 12,000, decode batches padded to 8 with rows up to
    /// 56, migration 15 GB/s, swap 22 GB/s. The shipped file
    /// `profiles/llama-7b-a10-derived.json` is this profile's
    /// [`to_json_pretty`](Self::to_json_pretty).
    pub fn derived_llama7b_a10() -> LatencyProfile {
        let r = RooflineModel::LLAMA7B_A10;
        let (prefill, decode) = shipped_tables(
            &[8, 16, 24, 32, 40, 48, 56],
            |tokens| r.prefill_ms(tokens as f64),
            |batch, context| r.decode_ms(batch as f64, context as f64),
        );
        let data = ProfileData {
            format: PROFILE_FORMAT.to_string(),
            version: PROFILE_VERSION,
            model: "llama-7b-fp16".to_string(),
            hardware: "nvidia-a10".to_string(),
            provenance: Provenance {
                kind: ProfileKind::Derived,
                source: "NOT MEASURED: derived from an additive roofline of LLaMA-7B fp16 on one NVIDIA A10 \
                         (docs: llumnix-reference.md, Simulator); generated by \
                         llumen_engine::latency_model::LatencyProfile::derived_llama7b_a10()"
                    .to_string(),
                notes: vec![
                    format!(
                        "constants: memory bandwidth {} GB/s, fp16 tensor peak {} TFLOP/s, efficiency eta {}, \
                         weights {} GB, {} G parameters, KV {} bytes per token (32 layers x 4096 x K,V x 2 bytes)",
                        r.memory_bandwidth_bytes_per_s / 1e9,
                        r.peak_flops / 1e12,
                        r.efficiency,
                        r.weight_bytes / 1e9,
                        r.parameters / 1e9,
                        r.kv_bytes_per_token
                    ),
                    "prefill ms = 1e3 * [(weights + kv_per_token * tokens) / (eta * bandwidth) \
                     + 2 * parameters * tokens / (eta * peak)]"
                        .to_string(),
                    "decode ms = 1e3 * [(weights + kv_per_token * context) / (eta * bandwidth) \
                     + 2 * parameters * batch / (eta * peak)]"
                        .to_string(),
                    "memory and compute times are added (no overlap assumed, a conservative roofline); \
                     the quadratic attention FLOPs of prefill are left out (a total-token table cannot \
                     see per-sequence lengths; under 5% at 2k tokens per sequence); times rounded to 1 us"
                        .to_string(),
                    "geometry as in the Llumnix artifact's simulator: 0.9 memory utilisation, block 16, \
                     792 blocks (12,672 tokens), max batched tokens 12,000 (the serving experiment's \
                     12,800 is inside the prefill table); decode batches padded to 8, rows up to 56; \
                     migration 15 GB/s, swap 22 GB/s"
                        .to_string(),
                ],
            },
            block_size: 16,
            num_blocks: 792,
            max_batched_tokens: 12_000,
            kv_bytes_per_block: 16 * r.kv_bytes_per_token as usize,
            migration_bandwidth_bytes_per_s: Some(15e9),
            swap_bandwidth_bytes_per_s: Some(22e9),
            prefill,
            decode,
        };
        LatencyProfile::from_data(data).expect("the derived LLaMA-7B/A10 profile is valid")
    }

    /// The shipped `profiles/llama-7b-a10-derived.json`, parsed.
    pub fn shipped_llama7b_a10_derived() -> LatencyProfile {
        LatencyProfile::from_json_str_at(
            LLAMA7B_A10_DERIVED_JSON,
            "profiles/llama-7b-a10-derived.json",
        )
        .expect("the shipped profile is valid")
    }
}

/// Time to move `bytes` at `bandwidth_bytes_per_s`, in whole µs (rounded
/// up). A bandwidth that is not positive and finite never completes:
/// `u64::MAX`.
pub fn migration_time_us(bytes: u64, bandwidth_bytes_per_s: f64) -> u64 {
    if !(bandwidth_bytes_per_s.is_finite() && bandwidth_bytes_per_s > 0.0) {
        return u64::MAX;
    }
    let us = (bytes as f64 / bandwidth_bytes_per_s * 1e6).ceil();
    if us >= u64::MAX as f64 {
        u64::MAX
    } else {
        us as u64
    }
}

/// A roofline of one model on one device, from which a derived profile is
/// computed: memory time (bytes moved / (η · bandwidth)) plus compute time
/// (2 · parameters · tokens / (η · peak)), in ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RooflineModel {
    pub memory_bandwidth_bytes_per_s: f64,
    pub peak_flops: f64,
    /// Fraction of bandwidth and peak achieved (η).
    pub efficiency: f64,
    pub weight_bytes: f64,
    pub parameters: f64,
    pub kv_bytes_per_token: u64,
}

impl RooflineModel {
    /// LLaMA-7B fp16 on one A10 (llumnix-reference.md): 600 GB/s, 125 TFLOP/s,
    /// η = 0.7, 13.5 GB of weights, 6.7 G parameters, 512 KiB of KV per token.
    pub const LLAMA7B_A10: RooflineModel = RooflineModel {
        memory_bandwidth_bytes_per_s: 600e9,
        peak_flops: 125e12,
        efficiency: 0.7,
        weight_bytes: 13.5e9,
        parameters: 6.7e9,
        kv_bytes_per_token: 32 * 4096 * 2 * 2,
    };

    fn memory_ms(&self, bytes: f64) -> f64 {
        1e3 * bytes / (self.efficiency * self.memory_bandwidth_bytes_per_s)
    }
    fn compute_ms(&self, tokens: f64) -> f64 {
        1e3 * 2.0 * self.parameters * tokens / (self.efficiency * self.peak_flops)
    }
    /// Prefill of `tokens` tokens: read the weights, write their KV, compute.
    pub fn prefill_ms(&self, tokens: f64) -> f64 {
        self.memory_ms(self.weight_bytes + self.kv_bytes_per_token as f64 * tokens)
            + self.compute_ms(tokens)
    }
    /// Decode of `batch` sequences over `context` tokens: read the weights and
    /// the whole context's KV, compute one token per sequence.
    pub fn decode_ms(&self, batch: f64, context: f64) -> f64 {
        self.memory_ms(self.weight_bytes + self.kv_bytes_per_token as f64 * context)
            + self.compute_ms(batch)
    }
}

/// The tables of a shipped, generated profile: prefill at the Llumnix
/// artifact's token counts and decode at `batches` × its context lengths,
/// each time from the model's `prefill_ms(tokens)` / `decode_ms(batch,
/// context)`, rounded, no fit (computed at load).
pub(crate) fn shipped_tables(
    batches: &[u64],
    prefill_ms: impl Fn(u64) -> f64,
    decode_ms: impl Fn(u64, u64) -> f64,
) -> (PrefillTable, DecodeTable) {
    const PREFILL_TOKENS: [u64; 18] = [
        1, 16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 10240, 12000,
        12800,
    ];
    const CONTEXTS: [u64; 11] = [
        64, 128, 256, 512, 1024, 2048, 4096, 6144, 8192, 10240, 12672,
    ];
    let prefill = PrefillTable {
        points: PREFILL_TOKENS
            .iter()
            .map(|&tokens| PrefillPoint {
                tokens,
                ms: round_ms(prefill_ms(tokens)),
            })
            .collect(),
        fit: None,
    };
    let decode = DecodeTable {
        batch_multiple: 8,
        rows: batches
            .iter()
            .map(|&batch| DecodeRow {
                batch,
                points: CONTEXTS
                    .iter()
                    .map(|&context_tokens| DecodePoint {
                        context_tokens,
                        ms: round_ms(decode_ms(batch, context_tokens)),
                    })
                    .collect(),
            })
            .collect(),
        fit: None,
    };
    (prefill, decode)
}

fn round_ms(ms: f64) -> f64 {
    (ms * 1e3).round() / 1e3
}

fn ms_to_us(ms: f64) -> u64 {
    let us = (ms * 1e3).round();
    if us <= 0.0 {
        0
    } else if us >= u64::MAX as f64 {
        u64::MAX
    } else {
        us as u64
    }
}

// ---------------------------------------------------------------------------
// Lookup
// ---------------------------------------------------------------------------

/// Piecewise-linear curve through `pts` (strictly increasing x), extended
/// beyond the last point with `slope` and below the first with
/// `max(y0 − slope·(x0 − x), y0·x/x0)`.
fn eval_curve(pts: &[(f64, f64)], x: f64, slope: f64) -> f64 {
    let (x0, y0) = pts[0];
    if x <= x0 {
        if x == x0 {
            return y0;
        }
        return below_first(x0, y0, x, slope);
    }
    let (xn, yn) = pts[pts.len() - 1];
    if x >= xn {
        return yn + slope * (x - xn);
    }
    let i = pts.partition_point(|p| p.0 <= x);
    let (xa, ya) = pts[i - 1];
    let (xb, yb) = pts[i];
    if x == xa {
        return ya;
    }
    ya + (yb - ya) * (x - xa) / (xb - xa)
}

fn below_first(x0: f64, y0: f64, x: f64, slope: f64) -> f64 {
    let ext = y0 - slope * (x0 - x);
    let floor = y0 * x.max(0.0) / x0;
    ext.max(floor)
}

/// Where `below_first` switches from the proportional floor to the sloped
/// extension, if inside (0, x0).
fn below_first_kink(x0: f64, y0: f64, slope: f64) -> Option<f64> {
    let denom = slope - y0 / x0;
    if denom.abs() < 1e-300 {
        return None;
    }
    let x = (slope * x0 - y0) / denom;
    (x > 0.0 && x < x0).then_some(x)
}

fn eval_rows(
    rows: &[(f64, Vec<(f64, f64)>)],
    batch: f64,
    ctx: f64,
    seq_slope: f64,
    ctx_slope: f64,
) -> f64 {
    let (b0, ref r0) = rows[0];
    if batch <= b0 {
        let v0 = eval_curve(r0, ctx, ctx_slope);
        if batch == b0 {
            return v0;
        }
        return below_first(b0, v0, batch, seq_slope);
    }
    let (bn, ref rn) = rows[rows.len() - 1];
    if batch >= bn {
        return eval_curve(rn, ctx, ctx_slope) + seq_slope * (batch - bn);
    }
    let i = rows.partition_point(|r| r.0 <= batch);
    let (ba, ref ra) = rows[i - 1];
    let va = eval_curve(ra, ctx, ctx_slope);
    if batch == ba {
        return va;
    }
    let (bb, ref rb) = rows[i];
    let vb = eval_curve(rb, ctx, ctx_slope);
    va + (vb - va) * (batch - ba) / (bb - ba)
}

// ---------------------------------------------------------------------------
// Fits
// ---------------------------------------------------------------------------

/// Least squares `y ≈ X·β` by the normal equations, columns scaled to unit
/// magnitude, Gauss–Jordan with partial pivoting; coefficients the data
/// cannot determine are set to 0.
fn least_squares(xs: &[Vec<f64>], ys: &[f64]) -> Vec<f64> {
    let n = xs.first().map_or(0, |r| r.len());
    let mut scale = vec![0.0f64; n];
    for row in xs {
        for (s, v) in scale.iter_mut().zip(row) {
            *s = s.max(v.abs());
        }
    }
    for s in &mut scale {
        if *s == 0.0 {
            *s = 1.0;
        }
    }
    // Augmented normal matrix [XᵀX | Xᵀy] on scaled columns.
    let mut m = vec![vec![0.0f64; n + 1]; n];
    for (row, &y) in xs.iter().zip(ys) {
        for i in 0..n {
            let xi = row[i] / scale[i];
            for j in 0..n {
                m[i][j] += xi * row[j] / scale[j];
            }
            m[i][n] += xi * y;
        }
    }
    let max_diag = (0..n).map(|i| m[i][i].abs()).fold(0.0, f64::max);
    let eps = max_diag * 1e-12;
    let mut pivot_row = vec![None; n];
    let mut r = 0;
    for c in 0..n {
        if r == n {
            break;
        }
        let p = (r..n)
            .max_by(|&a, &b| m[a][c].abs().total_cmp(&m[b][c].abs()))
            .unwrap();
        if m[p][c].abs() <= eps {
            continue;
        }
        m.swap(r, p);
        let d = m[r][c];
        for v in m[r].iter_mut() {
            *v /= d;
        }
        let pivot = m[r].clone();
        for (k, row) in m.iter_mut().enumerate() {
            let f = row[c];
            if k != r && f != 0.0 {
                for (v, p) in row.iter_mut().zip(&pivot) {
                    *v -= f * p;
                }
            }
        }
        pivot_row[c] = Some(r);
        r += 1;
    }
    (0..n)
        .map(|c| pivot_row[c].map_or(0.0, |r| m[r][n] / scale[c]))
        .collect()
}

fn fit_prefill(points: &[PrefillPoint]) -> PrefillFit {
    let xs: Vec<Vec<f64>> = points.iter().map(|p| vec![p.tokens as f64, 1.0]).collect();
    let ys: Vec<f64> = points.iter().map(|p| p.ms).collect();
    let beta = least_squares(&xs, &ys);
    PrefillFit {
        a_ms_per_token: beta[0],
        b_ms: beta[1],
    }
}

fn fit_decode(rows: &[DecodeRow]) -> DecodeFit {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for row in rows {
        for p in &row.points {
            xs.push(vec![row.batch as f64, p.context_tokens as f64, 1.0]);
            ys.push(p.ms);
        }
    }
    let beta = least_squares(&xs, &ys);
    DecodeFit {
        a_ms_per_seq: beta[0],
        b_ms_per_context_token: beta[1],
        c_ms: beta[2],
    }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

fn validate(data: &ProfileData, origin: &str) -> Result<LatencyProfile, ProfileError> {
    let bad = |message: String| ProfileError::Invalid {
        origin: origin.to_string(),
        message,
    };
    if data.format != PROFILE_FORMAT {
        return Err(ProfileError::Format {
            origin: origin.to_string(),
            message: format!("`format` is {:?}, expected {PROFILE_FORMAT:?}", data.format),
        });
    }
    if data.version != PROFILE_VERSION {
        return Err(ProfileError::Format {
            origin: origin.to_string(),
            message: format!(
                "unsupported `version` {}: this build reads version {PROFILE_VERSION}",
                data.version
            ),
        });
    }
    for (name, v) in [
        ("model", &data.model),
        ("hardware", &data.hardware),
        ("provenance.source", &data.provenance.source),
    ] {
        if v.trim().is_empty() {
            return Err(bad(format!("`{name}` is empty")));
        }
    }
    for (name, v) in [
        ("block_size", data.block_size),
        ("num_blocks", data.num_blocks),
        ("max_batched_tokens", data.max_batched_tokens),
        ("kv_bytes_per_block", data.kv_bytes_per_block),
    ] {
        if v == 0 {
            return Err(bad(format!("`{name}` must be positive, got 0")));
        }
    }
    for (name, v) in [
        (
            "migration_bandwidth_bytes_per_s",
            data.migration_bandwidth_bytes_per_s,
        ),
        (
            "swap_bandwidth_bytes_per_s",
            data.swap_bandwidth_bytes_per_s,
        ),
    ] {
        if let Some(v) = v {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(format!(
                    "`{name}` must be positive and finite, got {v}"
                )));
            }
        }
    }

    // Prefill table.
    let pts = &data.prefill.points;
    if pts.is_empty() {
        return Err(bad(
            "`prefill.points` is empty: at least one (tokens, ms) point is needed".to_string(),
        ));
    }
    check_series(
        pts.iter().map(|p| (p.tokens, p.ms)),
        "prefill.points",
        "tokens",
        &bad,
    )?;

    // Decode table.
    let dec = &data.decode;
    if dec.batch_multiple == 0 {
        return Err(bad(
            "`decode.batch_multiple` must be positive (1 = no padding), got 0".to_string(),
        ));
    }
    if dec.rows.is_empty() {
        return Err(bad(
            "`decode.rows` is empty: at least one batch row is needed".to_string(),
        ));
    }
    for (i, row) in dec.rows.iter().enumerate() {
        let path = format!("decode.rows[{i}]");
        if row.batch == 0 {
            return Err(bad(format!("`{path}.batch` must be positive, got 0")));
        }
        if i > 0 && row.batch <= dec.rows[i - 1].batch {
            return Err(bad(format!(
                "`{path}.batch` = {} is not greater than the previous row's {} (rows must be in strictly increasing batch order)",
                row.batch,
                dec.rows[i - 1].batch
            )));
        }
        if row.points.is_empty() {
            return Err(bad(format!(
                "`{path}.points` is empty (batch {})",
                row.batch
            )));
        }
        check_series(
            row.points.iter().map(|p| (p.context_tokens, p.ms)),
            &format!("{path}.points"),
            "context_tokens",
            &bad,
        )?;
    }

    // Fits.
    let prefill_fit = match data.prefill.fit {
        Some(f) => {
            if !(f.a_ms_per_token.is_finite() && f.b_ms.is_finite()) {
                return Err(bad(format!(
                    "`prefill.fit` has a non-finite coefficient: {f:?}"
                )));
            }
            f
        }
        None => fit_prefill(pts),
    };
    let decode_fit = match dec.fit {
        Some(f) => {
            if !(f.a_ms_per_seq.is_finite()
                && f.b_ms_per_context_token.is_finite()
                && f.c_ms.is_finite())
            {
                return Err(bad(format!(
                    "`decode.fit` has a non-finite coefficient: {f:?}"
                )));
            }
            f
        }
        None => fit_decode(&dec.rows),
    };

    let profile = LatencyProfile {
        prefill_curve: pts.iter().map(|p| (p.tokens as f64, p.ms)).collect(),
        decode_rows: dec
            .rows
            .iter()
            .map(|r| {
                (
                    r.batch as f64,
                    r.points
                        .iter()
                        .map(|p| (p.context_tokens as f64, p.ms))
                        .collect(),
                )
            })
            .collect(),
        prefill_slope: prefill_fit.a_ms_per_token.max(0.0),
        decode_seq_slope: decode_fit.a_ms_per_seq.max(0.0),
        decode_ctx_slope: decode_fit.b_ms_per_context_token.max(0.0),
        prefill_fit,
        decode_fit,
        data: data.clone(),
    };

    // Each row no faster than the row below it, at every context. Both rows'
    // curves are linear between their points and kinks, so checking there
    // (and at 0) checks everywhere; beyond the last point both grow with the
    // same slope.
    let slope = profile.decode_ctx_slope;
    for i in 1..profile.decode_rows.len() {
        let (ba, ref ra) = profile.decode_rows[i - 1];
        let (bb, ref rb) = profile.decode_rows[i];
        let mut probes: Vec<f64> = vec![0.0];
        for r in [ra, rb] {
            probes.extend(r.iter().map(|p| p.0));
            probes.extend(below_first_kink(r[0].0, r[0].1, slope));
        }
        for &c in &probes {
            let (va, vb) = (eval_curve(ra, c, slope), eval_curve(rb, c, slope));
            if vb < va - 1e-9 * va.abs().max(1.0) {
                return Err(bad(format!(
                    "decode is not monotone in batch: at {c} context tokens, batch {bb} (`decode.rows[{i}]`) takes {vb} ms, \
                     less than batch {ba} (`decode.rows[{}]`) at {va} ms",
                    i - 1
                )));
            }
        }
    }
    Ok(profile)
}

fn check_series(
    series: impl Iterator<Item = (u64, f64)>,
    path: &str,
    key: &str,
    bad: &dyn Fn(String) -> ProfileError,
) -> Result<(), ProfileError> {
    let mut prev: Option<(u64, f64)> = None;
    for (i, (k, ms)) in series.enumerate() {
        if k == 0 {
            return Err(bad(format!("`{path}[{i}].{key}` must be positive, got 0")));
        }
        if !(ms.is_finite() && ms > 0.0) {
            return Err(bad(format!(
                "`{path}[{i}].ms` must be positive and finite, got {ms}"
            )));
        }
        if let Some((pk, pms)) = prev {
            if k <= pk {
                return Err(bad(format!(
                    "`{path}[{i}].{key}` = {k} is not greater than the previous point's {pk} (keys must be strictly increasing)"
                )));
            }
            if ms < pms {
                return Err(bad(format!(
                    "`{path}[{i}]`: {ms} ms at {key} {k} is less than {pms} ms at {key} {pk} (times must not decrease)"
                )));
            }
        }
        prev = Some((k, ms));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The backend
// ---------------------------------------------------------------------------

/// Magic at the head of every exported block.
const BLOCK_MAGIC: [u8; 8] = *b"llumKV\x00\x01";

/// What a block holds.
#[derive(Clone, Debug)]
enum BlockContent {
    /// One digest per slot; 0 = never written (exported as filler).
    Slots(Box<[u64]>),
    /// Imported bytes that were not a pattern of ours, kept verbatim.
    Raw(Box<[u8]>),
}

/// A [`ModelBackend`] for simulation: step times from a [`LatencyProfile`],
/// placeholder tokens (not text), and a compact KV store whose export and
/// import round-trip exactly. See the module docs.
#[derive(Clone, Debug)]
pub struct LatencyModelBackend {
    profile: Arc<LatencyProfile>,
    token_range: Range<TokenId>,
    kv_bytes_per_block: usize,
    blocks: HashMap<BlockId, BlockContent>,
    /// Keep the per-slot KV digests (see [`LatencyModelBackend::without_kv_contents`]).
    kv_contents: bool,
}

impl LatencyModelBackend {
    /// A backend timed by `profile` (a `LatencyProfile` or an
    /// `Arc<LatencyProfile>` shared by a fleet).
    pub fn new(profile: impl Into<Arc<LatencyProfile>>) -> Self {
        let profile = profile.into();
        let kv_bytes_per_block = profile.kv_bytes_per_block();
        Self {
            profile,
            token_range: 3..32_000,
            kv_bytes_per_block,
            blocks: HashMap::new(),
            kv_contents: true,
        }
    }

    /// Keeps no KV contents: steps write no slot digests, exports are the
    /// never-written filler pattern of each block and imports are checked
    /// for size only. Step times, tokens and exported sizes are unchanged;
    /// only the byte-for-byte round trip of migrated KV is given up. For
    /// the cluster simulator, where that bookkeeping (one hash-map write per
    /// token) is pure overhead.
    pub fn without_kv_contents(mut self) -> Self {
        self.kv_contents = false;
        self.blocks.clear();
        self
    }

    /// Placeholder tokens are drawn from `range` instead of `3..32000`.
    ///
    /// # Panics
    /// If `range` is empty.
    pub fn with_token_range(mut self, range: Range<TokenId>) -> Self {
        assert!(
            range.start < range.end,
            "placeholder token range {range:?} is empty"
        );
        self.token_range = range;
        self
    }

    /// Exports `bytes` per block instead of the profile's
    /// `kv_bytes_per_block` (e.g. to keep live migration tests light over
    /// loopback). Step times are unchanged; [`ModelBackend::kv_bytes_per_block`]
    /// reports the override.
    ///
    /// # Panics
    /// If `bytes` is 0.
    pub fn with_kv_bytes_per_block(mut self, bytes: usize) -> Self {
        assert!(bytes > 0, "kv_bytes_per_block must be positive");
        self.kv_bytes_per_block = bytes;
        self
    }

    /// Keeps no KV at all: no contents ([`without_kv_contents`](Self::without_kv_contents))
    /// and one header per exported block instead of the profile's
    /// `kv_bytes_per_block` ([`with_kv_bytes_per_block`](Self::with_kv_bytes_per_block)).
    /// Step times are unchanged. What the simulator's instances and a
    /// `--model profile` server run: migrations carry the block count, not
    /// bytes that stand for nothing.
    pub fn headers_only(self) -> Self {
        let header = self.header_len();
        self.with_kv_bytes_per_block(header).without_kv_contents()
    }

    pub fn profile(&self) -> &LatencyProfile {
        &self.profile
    }

    /// The placeholder token at `position` of sequence `seq` (a step that
    /// ends a sequence at position `p − 1` returns the token for `p`). Not
    /// text: a reproducible function of its arguments only.
    pub fn placeholder_token(&self, seq: SeqId, position: usize) -> TokenId {
        let span = (self.token_range.end - self.token_range.start) as u64;
        self.token_range.start
            + (mix3(0x746f_6b65_6e00_0000, seq, position as u64) % span) as TokenId
    }

    fn header_len(&self) -> usize {
        BLOCK_MAGIC.len() + 8 * self.profile.block_size()
    }

    fn write_slot(&mut self, block: BlockId, slot: usize, digest: u64) {
        let bs = self.profile.block_size();
        let content = self
            .blocks
            .entry(block)
            .or_insert_with(|| BlockContent::Slots(vec![0; bs].into()));
        if let BlockContent::Raw(raw) = content {
            // Foreign bytes partly overwritten: keep a digest of them per slot.
            let h = fnv1a(raw);
            *content = BlockContent::Slots(
                (0..bs)
                    .map(|i| mix3(h, i as u64, 0x7261_7700) | 1)
                    .collect(),
            );
        }
        if let BlockContent::Slots(slots) = content {
            slots[slot] = digest;
        }
    }

    /// The pattern of a slot-digest block: header (magic, one little-endian
    /// u64 per slot, fillers for never-written ones) repeated up to `n` bytes.
    fn block_pattern(&self, block: BlockId, slots: Option<&[u64]>, out: &mut Vec<u8>) {
        let bs = self.profile.block_size();
        let mut header = Vec::with_capacity(self.header_len());
        header.extend_from_slice(&BLOCK_MAGIC);
        for i in 0..bs {
            let v = slots.map_or(0, |s| s[i]);
            let v = if v == 0 {
                mix3(0x6669_6c6c_6572_0000, block.0 as u64, i as u64) | 1
            } else {
                v
            };
            header.extend_from_slice(&v.to_le_bytes());
        }
        let n = self.kv_bytes_per_block;
        let start = out.len();
        while out.len() - start + header.len() <= n {
            out.extend_from_slice(&header);
        }
        let rest = n - (out.len() - start);
        out.extend_from_slice(&header[..rest]);
    }

    /// The slot digests of an exported block, if `bytes` is one of our patterns.
    fn parse_pattern(&self, bytes: &[u8]) -> Option<Box<[u64]>> {
        let hl = self.header_len();
        if bytes.len() < hl || bytes[..BLOCK_MAGIC.len()] != BLOCK_MAGIC {
            return None;
        }
        let header = &bytes[..hl];
        let slots: Box<[u64]> = header[BLOCK_MAGIC.len()..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if slots.contains(&0) {
            return None;
        }
        if !bytes.chunks(hl).all(|c| c == &header[..c.len()]) {
            return None;
        }
        Some(slots)
    }
}

impl ModelBackend for LatencyModelBackend {
    fn describe(&self) -> String {
        let p = &self.profile;
        format!(
            "latency model of {} on {} ({} profile v{}: {} blocks of {} tokens); placeholder tokens, not text",
            p.model(),
            p.hardware(),
            p.provenance().kind,
            p.data().version,
            p.num_blocks(),
            p.block_size()
        )
    }

    fn step(&mut self, batch: &ForwardBatch) -> Result<StepOutput, BackendError> {
        let bs = self.profile.block_size();
        // Check everything first: a failed step changes nothing.
        for s in &batch.sequences {
            if s.tokens.is_empty() {
                return Err(BackendError(format!("sequence {}: no input tokens", s.seq)));
            }
            let end = s.start_position + s.tokens.len();
            let needed = end.div_ceil(bs);
            if s.block_table.len() < needed {
                return Err(BackendError(format!(
                    "sequence {}: block table has {} blocks, positions 0..{end} need {needed}",
                    s.seq,
                    s.block_table.len()
                )));
            }
        }
        let (mut prefill_tokens, mut decode_batch, mut decode_context) = (0usize, 0usize, 0usize);
        let mut next_tokens = Vec::with_capacity(batch.sequences.len());
        for s in &batch.sequences {
            if s.start_position == 0 || s.tokens.len() > 1 {
                prefill_tokens += s.tokens.len();
            } else {
                decode_batch += 1;
                decode_context += s.start_position + 1;
            }
            if self.kv_contents {
                for (i, &t) in s.tokens.iter().enumerate() {
                    let pos = s.start_position + i;
                    self.write_slot(
                        s.block_table[pos / bs],
                        pos % bs,
                        mix3(s.seq, pos as u64, t as u64) | 1,
                    );
                }
            }
            next_tokens.push(self.placeholder_token(s.seq, s.start_position + s.tokens.len()));
        }
        let duration_us = self
            .profile
            .step_time_us(prefill_tokens, decode_batch, decode_context);
        Ok(StepOutput {
            next_tokens,
            duration_us,
        })
    }

    fn kv_bytes_per_block(&self) -> usize {
        self.kv_bytes_per_block
    }

    fn export_blocks(&self, blocks: &[BlockId]) -> Result<Vec<u8>, BackendError> {
        let mut out = Vec::with_capacity(blocks.len() * self.kv_bytes_per_block);
        for &b in blocks {
            match self.blocks.get(&b) {
                Some(BlockContent::Raw(raw)) => out.extend_from_slice(raw),
                Some(BlockContent::Slots(slots)) => self.block_pattern(b, Some(&**slots), &mut out),
                None => self.block_pattern(b, None, &mut out),
            }
        }
        Ok(out)
    }

    fn import_blocks(&mut self, blocks: &[BlockId], data: &[u8]) -> Result<(), BackendError> {
        let n = self.kv_bytes_per_block;
        if data.len() != blocks.len() * n {
            return Err(BackendError(format!(
                "import of {} blocks needs {} bytes ({} per block), got {}",
                blocks.len(),
                blocks.len() * n,
                n,
                data.len()
            )));
        }
        if !self.kv_contents {
            return Ok(());
        }
        for (&b, chunk) in blocks.iter().zip(data.chunks_exact(n)) {
            let content = match self.parse_pattern(chunk) {
                Some(slots) => BlockContent::Slots(slots),
                None => BlockContent::Raw(chunk.into()),
            };
            self.blocks.insert(b, content);
        }
        Ok(())
    }
}

fn mix64(mut z: u64) -> u64 {
    // splitmix64 finaliser
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn mix3(a: u64, b: u64, c: u64) -> u64 {
    mix64(mix64(mix64(a) ^ b) ^ c)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SequenceInput;
    use proptest::prelude::*;

    fn data_with(
        prefill: Vec<(u64, f64)>,
        batch_multiple: u64,
        rows: Vec<(u64, Vec<(u64, f64)>)>,
    ) -> ProfileData {
        ProfileData {
            format: PROFILE_FORMAT.into(),
            version: PROFILE_VERSION,
            model: "test-model".into(),
            hardware: "test-hw".into(),
            provenance: Provenance {
                kind: ProfileKind::Measured,
                source: "unit test".into(),
                notes: vec![],
            },
            block_size: 4,
            num_blocks: 64,
            max_batched_tokens: 512,
            kv_bytes_per_block: 256,
            migration_bandwidth_bytes_per_s: Some(1e9),
            swap_bandwidth_bytes_per_s: None,
            prefill: PrefillTable {
                points: prefill
                    .into_iter()
                    .map(|(tokens, ms)| PrefillPoint { tokens, ms })
                    .collect(),
                fit: None,
            },
            decode: DecodeTable {
                batch_multiple,
                rows: rows
                    .into_iter()
                    .map(|(batch, pts)| DecodeRow {
                        batch,
                        points: pts
                            .into_iter()
                            .map(|(context_tokens, ms)| DecodePoint { context_tokens, ms })
                            .collect(),
                    })
                    .collect(),
                fit: None,
            },
        }
    }

    /// prefill = 0.2·t + 5; decode = 0.3·b + 0.001·c + 20 (exactly linear).
    fn linear_data() -> ProfileData {
        let prefill = [16u64, 64, 256, 1024]
            .iter()
            .map(|&t| (t, 0.2 * t as f64 + 5.0))
            .collect();
        let rows = [1u64, 4, 16]
            .iter()
            .map(|&b| {
                (
                    b,
                    [32u64, 128, 1024, 4096]
                        .iter()
                        .map(|&c| (c, 0.3 * b as f64 + 0.001 * c as f64 + 20.0))
                        .collect(),
                )
            })
            .collect();
        data_with(prefill, 1, rows)
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    fn err_of(data: ProfileData) -> String {
        LatencyProfile::from_data(data)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn fits_reproduce_linear_table_points() {
        let p = LatencyProfile::from_data(linear_data()).unwrap();
        let f = p.prefill_fit();
        assert!(
            close(f.a_ms_per_token, 0.2, 1e-9) && close(f.b_ms, 5.0, 1e-7),
            "{f:?}"
        );
        let d = p.decode_fit();
        assert!(close(d.a_ms_per_seq, 0.3, 1e-9), "{d:?}");
        assert!(close(d.b_ms_per_context_token, 0.001, 1e-12), "{d:?}");
        assert!(close(d.c_ms, 20.0, 1e-7), "{d:?}");
        for pt in &p.data().prefill.points {
            assert!(close(f.eval(pt.tokens as f64), pt.ms, 1e-7));
            assert!(close(p.prefill_time_ms(pt.tokens as usize), pt.ms, 1e-12));
        }
        for row in &p.data().decode.rows {
            for pt in &row.points {
                assert!(close(
                    d.eval(row.batch as f64, pt.context_tokens as f64),
                    pt.ms,
                    1e-7
                ));
                assert_eq!(
                    p.decode_time_ms(row.batch as usize, pt.context_tokens as usize),
                    pt.ms
                );
            }
        }
        // Off the table the lookup follows the (exact) fit.
        for t in [1usize, 7, 100, 5000, 20_000] {
            assert!(
                close(p.prefill_time_ms(t), f.eval(t as f64), 1e-6),
                "prefill {t}"
            );
        }
        for (b, c) in [(2usize, 40usize), (10, 2000), (32, 9000), (100, 10)] {
            assert!(
                close(p.decode_time_ms(b, c), d.eval(b as f64, c as f64), 1e-6),
                "decode {b} {c}"
            );
        }
    }

    #[test]
    fn derived_profile_fits_its_table() {
        let p = LatencyProfile::derived_llama7b_a10();
        let (f, d) = (p.prefill_fit(), p.decode_fit());
        for pt in &p.data().prefill.points {
            assert!(
                close(f.eval(pt.tokens as f64), pt.ms, 2e-3),
                "{pt:?} vs {}",
                f.eval(pt.tokens as f64)
            );
        }
        for row in &p.data().decode.rows {
            for pt in &row.points {
                assert!(
                    close(
                        d.eval(row.batch as f64, pt.context_tokens as f64),
                        pt.ms,
                        2e-3
                    ),
                    "{row:?}"
                );
            }
        }
        // The fits recover the roofline's coefficients.
        let r = RooflineModel::LLAMA7B_A10;
        assert!(close(f.b_ms, r.prefill_ms(0.0), 2e-3), "{f:?}");
        assert!(
            close(
                d.a_ms_per_seq,
                r.decode_ms(1.0, 0.0) - r.decode_ms(0.0, 0.0),
                1e-4
            ),
            "{d:?}"
        );
    }

    #[test]
    fn stored_fits_are_used_as_given() {
        let mut data = linear_data();
        data.prefill.fit = Some(PrefillFit {
            a_ms_per_token: 1.0,
            b_ms: 0.0,
        });
        data.decode.fit = Some(DecodeFit {
            a_ms_per_seq: 2.0,
            b_ms_per_context_token: 0.5,
            c_ms: 0.0,
        });
        let p = LatencyProfile::from_data(data).unwrap();
        assert_eq!(p.prefill_fit().a_ms_per_token, 1.0);
        // Above the last point (1024 → 209.8 ms), extrapolation uses the stored slope.
        assert!(close(p.prefill_time_ms(1124), 209.8 + 100.0, 1e-9));
        let last = 0.3 * 16.0 + 0.001 * 4096.0 + 20.0;
        assert!(close(p.decode_time_ms(16, 4196), last + 50.0, 1e-9));
        assert!(close(p.decode_time_ms(20, 4096), last + 8.0, 1e-9));
        // Stored fits are written back out.
        assert!(p.to_json_pretty().contains("a_ms_per_token"));
        assert!(!LatencyProfile::from_data(linear_data())
            .unwrap()
            .to_json_pretty()
            .contains("a_ms_per_token"));
    }

    #[test]
    fn interpolation_between_points() {
        // A curved table: linear interpolation between neighbours, not the fit.
        let data = data_with(
            vec![(100, 10.0), (200, 30.0), (400, 40.0)],
            1,
            vec![
                (8, vec![(100, 20.0), (300, 40.0)]),
                (16, vec![(100, 30.0), (300, 70.0)]),
            ],
        );
        let p = LatencyProfile::from_data(data).unwrap();
        assert!(close(p.prefill_time_ms(150), 20.0, 1e-12));
        assert!(close(p.prefill_time_ms(300), 35.0, 1e-12));
        assert_eq!(p.prefill_time_ms(200), 30.0);
        // Along context within a row.
        assert!(close(p.decode_time_ms(8, 200), 30.0, 1e-12));
        assert!(close(p.decode_time_ms(16, 250), 60.0, 1e-12));
        // Along batch between rows, and both at once.
        assert!(close(p.decode_time_ms(12, 100), 25.0, 1e-12));
        assert!(close(p.decode_time_ms(12, 200), 40.0, 1e-12));
        assert!(close(p.decode_time_ms(10, 300), 40.0 + 30.0 * 0.25, 1e-12));
        // Beyond the table: continuous at the edge, then the fit's slope.
        let a = p.prefill_fit().a_ms_per_token;
        assert!(a > 0.0);
        assert!(close(p.prefill_time_ms(500), 40.0 + 100.0 * a, 1e-9));
        let low = p.prefill_time_ms(1);
        assert!(low > 0.0 && low < 10.0, "{low}");
        assert!(p.prefill_time_ms(99) <= 10.0 && p.prefill_time_ms(99) > 9.0);
    }

    #[test]
    fn decode_batch_is_padded() {
        let p = LatencyProfile::derived_llama7b_a10();
        assert_eq!(p.padded_batch(1), 8);
        assert_eq!(p.padded_batch(8), 8);
        assert_eq!(p.padded_batch(9), 16);
        assert_eq!(p.padded_batch(57), 64);
        for b in 1..=8 {
            assert_eq!(p.decode_time_ms(b, 1000), p.decode_time_ms(8, 1000));
        }
        // Past the last row (56) the time keeps growing.
        assert!(p.decode_time_ms(57, 1000) > p.decode_time_ms(56, 1000));
        assert!(p.decode_time_ms(128, 1000) > p.decode_time_ms(64, 1000));
    }

    #[test]
    fn derived_batch1_decode_is_about_32ms() {
        let p = LatencyProfile::derived_llama7b_a10();
        assert_eq!(p.provenance().kind, ProfileKind::Derived);
        assert!(p.provenance().source.starts_with("NOT MEASURED"));
        for ctx in [1usize, 128, 512, 1024] {
            let ms = p.step_time_us(0, 1, ctx) as f64 / 1e3;
            assert!(
                (ms - 32.0).abs() <= 32.0 * 0.15,
                "batch-1 decode at {ctx} context: {ms} ms"
            );
        }
        // Geometry as in the Llumnix artifact.
        assert_eq!(
            (p.block_size(), p.num_blocks(), p.max_batched_tokens()),
            (16, 792, 12_000)
        );
        assert_eq!(p.kv_capacity_tokens(), 12_672);
        assert_eq!(p.kv_bytes_per_block(), 16 * 512 * 1024);
        assert_eq!(p.data().decode.rows.last().unwrap().batch, 56);
        // Prefill of 512 tokens is more than a decode step, and 12k tokens a
        // couple of seconds.
        assert!(p.prefill_time_ms(512) > p.decode_time_ms(1, 512));
        let big = p.prefill_time_ms(12_000);
        assert!((1500.0..2500.0).contains(&big), "{big}");
        // An 8 MiB block at 15 GB/s: 560 µs; one decode step moves ~57 blocks.
        assert_eq!(p.block_transfer_time_us(1), Some(560));
    }

    /// A shipped profile file is its generator's output (rewritten with
    /// `LLUMEN_REGENERATE_PROFILES=1`), and loads to the same profile.
    pub(crate) fn assert_shipped_is_generated(
        file: &str,
        shipped_json: &str,
        generated: &LatencyProfile,
        shipped: &LatencyProfile,
    ) {
        let text = generated.to_json_pretty();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("profiles")
            .join(file);
        if std::env::var_os("LLUMEN_REGENERATE_PROFILES").is_some() {
            std::fs::write(&path, &text).unwrap();
            return;
        }
        assert_eq!(
            shipped_json, text,
            "profiles/{file} is stale: run \
             `LLUMEN_REGENERATE_PROFILES=1 cargo test -p llumen-engine shipped_profile` to rewrite it"
        );
        assert_eq!(shipped.data(), generated.data());
        let from_file = LatencyProfile::from_path(&path).unwrap();
        for (prefill, batch, context) in [(0, 1, 100), (512, 8, 4096)] {
            assert_eq!(
                from_file.step_time_us(prefill, batch, context),
                shipped.step_time_us(prefill, batch, context)
            );
        }
    }

    #[test]
    fn shipped_profile_equals_generator() {
        assert_shipped_is_generated(
            "llama-7b-a10-derived.json",
            LLAMA7B_A10_DERIVED_JSON,
            &LatencyProfile::derived_llama7b_a10(),
            &LatencyProfile::shipped_llama7b_a10_derived(),
        );
    }

    #[test]
    fn json_round_trip() {
        let p = LatencyProfile::from_data(linear_data()).unwrap();
        let q = LatencyProfile::from_json_str(&p.to_json_pretty()).unwrap();
        // serde_json's default float parser may land one ulp off (its
        // `float_roundtrip` feature makes it exact): compare times loosely.
        let (mut a, mut b) = (p.data().clone(), q.data().clone());
        let times = |d: &mut ProfileData| -> Vec<f64> {
            let mut v: Vec<f64> = d
                .prefill
                .points
                .iter_mut()
                .map(|p| std::mem::take(&mut p.ms))
                .collect();
            for r in &mut d.decode.rows {
                v.extend(r.points.iter_mut().map(|p| std::mem::take(&mut p.ms)));
            }
            v
        };
        let (ta, tb) = (times(&mut a), times(&mut b));
        assert_eq!(a, b);
        assert!(
            ta.iter()
                .zip(&tb)
                .all(|(x, y)| (x - y).abs() <= 1e-12 * x.abs()),
            "{ta:?} {tb:?}"
        );
    }

    #[test]
    fn bad_documents_give_clear_errors() {
        let good = LatencyProfile::from_data(linear_data())
            .unwrap()
            .to_json_pretty();
        let e = LatencyProfile::from_json_str("{ not json").unwrap_err();
        assert!(
            matches!(e, ProfileError::Json { .. }) && e.to_string().contains("line 1"),
            "{e}"
        );
        let e = LatencyProfile::from_json_str(r#"{"format": "something-else", "version": 1}"#)
            .unwrap_err();
        assert!(
            matches!(e, ProfileError::Format { .. }) && e.to_string().contains("something-else"),
            "{e}"
        );
        let e = LatencyProfile::from_json_str(r#"{"version": 1}"#).unwrap_err();
        assert!(e.to_string().contains("no `format` field"), "{e}");
        let e = LatencyProfile::from_json_str(&good.replace("\"version\": 1", "\"version\": 2"))
            .unwrap_err();
        assert!(e.to_string().contains("unsupported `version` 2"), "{e}");
        let e = LatencyProfile::from_json_str(&good.replace("\"num_blocks\"", "\"num_blockz\""))
            .unwrap_err();
        assert!(
            matches!(e, ProfileError::Json { .. }) && e.to_string().contains("num_blockz"),
            "{e}"
        );
        let e = LatencyProfile::from_json_str(
            &good.replace("\"kind\": \"measured\"", "\"kind\": \"guessed\""),
        )
        .unwrap_err();
        assert!(e.to_string().contains("guessed"), "{e}");
        let e = LatencyProfile::from_json_str(&good.replace("\"ms\": 8.2", "\"ms\": -8.2"))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("`prefill.points[0].ms` must be positive"),
            "{e}"
        );
        let e = LatencyProfile::from_path("/nonexistent/profile.json").unwrap_err();
        assert!(
            matches!(e, ProfileError::Io { .. })
                && e.to_string().contains("/nonexistent/profile.json"),
            "{e}"
        );
    }

    #[test]
    fn invalid_tables_are_rejected() {
        let mut d = linear_data();
        d.prefill.points.clear();
        assert!(err_of(d).contains("`prefill.points` is empty"));

        let mut d = linear_data();
        d.prefill.points[2].tokens = 64;
        let e = err_of(d);
        assert!(
            e.contains(
                "`prefill.points[2].tokens` = 64 is not greater than the previous point's 64"
            ),
            "{e}"
        );

        let mut d = linear_data();
        d.prefill.points[3].ms = 1.0;
        let e = err_of(d);
        assert!(
            e.contains("`prefill.points[3]`") && e.contains("must not decrease"),
            "{e}"
        );

        let mut d = linear_data();
        d.prefill.points[0].ms = f64::NAN;
        assert!(err_of(d).contains("positive and finite"));

        let mut d = linear_data();
        d.decode.rows.clear();
        assert!(err_of(d).contains("`decode.rows` is empty"));

        let mut d = linear_data();
        d.decode.rows[1].points.clear();
        assert!(err_of(d).contains("`decode.rows[1].points` is empty"));

        let mut d = linear_data();
        d.decode.rows.swap(0, 1);
        assert!(err_of(d).contains("strictly increasing batch order"));

        let mut d = linear_data();
        d.decode.rows[2].points[1].ms = 1.0;
        let e = err_of(d);
        assert!(
            e.contains("`decode.rows[2].points[1]`") && e.contains("must not decrease"),
            "{e}"
        );

        // Each row within itself monotone, but batch 16 faster than batch 4.
        let mut d = linear_data();
        for p in &mut d.decode.rows[2].points {
            p.ms -= 5.0;
        }
        let e = err_of(d);
        assert!(
            e.contains("not monotone in batch") && e.contains("batch 16"),
            "{e}"
        );

        let mut d = linear_data();
        d.decode.batch_multiple = 0;
        assert!(err_of(d).contains("batch_multiple"));

        let mut d = linear_data();
        d.block_size = 0;
        assert!(err_of(d).contains("`block_size` must be positive"));

        let mut d = linear_data();
        d.migration_bandwidth_bytes_per_s = Some(0.0);
        assert!(err_of(d).contains("migration_bandwidth_bytes_per_s"));

        let mut d = linear_data();
        d.provenance.source = " ".into();
        assert!(err_of(d).contains("provenance.source"));
    }

    #[test]
    fn migration_time() {
        assert_eq!(migration_time_us(0, 15e9), 0);
        assert_eq!(migration_time_us(15_000_000_000, 15e9), 1_000_000);
        assert_eq!(migration_time_us(8 << 20, 15e9), 560);
        assert_eq!(migration_time_us(1, 0.0), u64::MAX);
        assert_eq!(migration_time_us(1, f64::NAN), u64::MAX);
    }

    fn arb_profile() -> impl Strategy<Value = LatencyProfile> {
        let incs = |n: usize| proptest::collection::vec(0.0f64..50.0, n);
        (
            proptest::collection::vec(1u64..500, 1..6),
            incs(6),
            1u64..9,
            proptest::collection::vec(1u64..20, 1..5),
            proptest::collection::vec(1u64..2000, 1..6),
            proptest::collection::vec(incs(6), 5),
        )
            .prop_map(|(pgaps, pincs, mult, bgaps, cgaps, rowincs)| {
                let mut t = 0;
                let mut y = 1.0;
                let prefill = pgaps
                    .iter()
                    .zip(&pincs)
                    .map(|(g, i)| {
                        t += g;
                        y += i;
                        (t, y)
                    })
                    .collect();
                let mut c = 0;
                let ctxs: Vec<u64> = cgaps
                    .iter()
                    .map(|g| {
                        c += g;
                        c
                    })
                    .collect();
                // Row i = row i-1 + non-negative increments, each row non-decreasing.
                let mut prev: Vec<f64> = vec![0.5; ctxs.len()];
                let mut b = 0;
                let rows = bgaps
                    .iter()
                    .enumerate()
                    .map(|(r, g)| {
                        b += g;
                        let mut acc = 0.0;
                        let cur: Vec<f64> = prev
                            .iter()
                            .zip(&rowincs[r])
                            .map(|(p, inc)| {
                                acc += inc;
                                p + 1.0 + acc
                            })
                            .collect();
                        prev = cur.clone();
                        (b, ctxs.iter().copied().zip(cur).collect())
                    })
                    .collect();
                LatencyProfile::from_data(data_with(prefill, mult, rows))
                    .expect("generated tables are valid")
            })
    }

    proptest! {
        #[test]
        fn step_time_is_monotone(p in prop_oneof![Just(LatencyProfile::derived_llama7b_a10()), arb_profile()],
                                 t in 0usize..20_000, dt in 0usize..5_000,
                                 b in 1usize..100, db in 0usize..40,
                                 c in 1usize..20_000, dc in 0usize..5_000) {
            prop_assert!(p.prefill_time_ms(t) <= p.prefill_time_ms(t + dt));
            let base = p.decode_time_ms(b, c);
            prop_assert!(base > 0.0);
            prop_assert!(base <= p.decode_time_ms(b + db, c) + 1e-9, "batch {} -> {}", b, b + db);
            prop_assert!(base <= p.decode_time_ms(b, c + dc) + 1e-9, "context {} -> {}", c, c + dc);
            prop_assert!(p.step_time_us(t, b, c) <= p.step_time_us(t + dt, b + db, c + dc));
        }
    }

    fn seq(seq: SeqId, start: usize, tokens: Vec<TokenId>, table: &[u32]) -> SequenceInput {
        SequenceInput {
            seq,
            tokens,
            start_position: start,
            block_table: table.iter().map(|&b| BlockId(b)).collect(),
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            output_index: 0,
        }
    }

    #[test]
    fn backend_step_timing_matches_profile() {
        let profile = Arc::new(LatencyProfile::derived_llama7b_a10());
        let mut be = LatencyModelBackend::new(profile.clone());
        assert!(
            be.describe().contains("llama-7b-fp16") && be.describe().contains("derived"),
            "{}",
            be.describe()
        );
        assert_eq!(be.kv_bytes_per_block(), 8 << 20);
        // Two prefills (100 and 20 tokens), a chunk continuing at 16 (counts as
        // prefill), and three decodes at positions 40, 7 and 300.
        let batch = ForwardBatch {
            sequences: vec![
                seq(1, 0, (0..100).collect(), &(0..7).collect::<Vec<_>>()),
                seq(2, 0, (0..20).collect(), &[7, 8]),
                seq(3, 16, (0..8).collect(), &[9, 10]),
                seq(4, 40, vec![5], &[11, 12, 13]),
                seq(5, 7, vec![6], &[14]),
                seq(6, 300, vec![7], &(15..34).collect::<Vec<_>>()),
            ],
        };
        let out = be.step(&batch).unwrap();
        assert_eq!(batch.prefill_tokens(), 128);
        assert_eq!(out.duration_us, profile.step_time_us(128, 3, 41 + 8 + 301));
        assert_eq!(out.next_tokens.len(), 6);
        let positions = [100, 20, 24, 41, 8, 301];
        for (s, (&tok, &pos)) in batch
            .sequences
            .iter()
            .zip(out.next_tokens.iter().zip(&positions))
        {
            assert_eq!(tok, be.placeholder_token(s.seq, pos));
            assert!((3..32_000).contains(&tok));
        }
        // A decode-only step of one sequence: the batch-1 decode time.
        let out = be
            .step(&ForwardBatch {
                sequences: vec![seq(4, 41, vec![9], &[11, 12, 13])],
            })
            .unwrap();
        assert_eq!(out.duration_us, profile.step_time_us(0, 1, 42));
        // Empty step: nothing to do, no time.
        assert_eq!(
            be.step(&ForwardBatch::default()).unwrap(),
            StepOutput {
                next_tokens: vec![],
                duration_us: 0
            }
        );
        // Tokens depend on (seq, position) only: another backend agrees.
        let other = LatencyModelBackend::new(LatencyProfile::from_data(linear_data()).unwrap());
        assert_eq!(other.placeholder_token(4, 42), be.placeholder_token(4, 42));
        assert_ne!(be.placeholder_token(4, 42), be.placeholder_token(4, 43));
        let narrow = LatencyModelBackend::new(profile).with_token_range(10..12);
        assert!((0..100).all(|p| (10..12).contains(&narrow.placeholder_token(1, p))));
    }

    #[test]
    fn backend_rejects_short_block_tables() {
        let mut be = LatencyModelBackend::new(LatencyProfile::from_data(linear_data()).unwrap());
        // block size 4: positions 0..9 need 3 blocks.
        let e = be
            .step(&ForwardBatch {
                sequences: vec![seq(1, 0, (0..9).collect(), &[0, 1])],
            })
            .unwrap_err();
        assert!(e.to_string().contains("need 3"), "{e}");
        let e = be
            .step(&ForwardBatch {
                sequences: vec![seq(1, 3, vec![], &[0])],
            })
            .unwrap_err();
        assert!(e.to_string().contains("no input tokens"), "{e}");
        // A failed step wrote nothing.
        assert!(be.blocks.is_empty());
    }

    #[test]
    fn export_import_round_trip() {
        let profile = Arc::new(LatencyProfile::from_data(linear_data()).unwrap());
        let n = profile.kv_bytes_per_block();
        let mut src = LatencyModelBackend::new(profile.clone());
        let mut dst = LatencyModelBackend::new(profile.clone());
        // 10 tokens over blocks 3, 5, 9 (block size 4), then two decodes.
        src.step(&ForwardBatch {
            sequences: vec![seq(7, 0, (100..110).collect(), &[3, 5, 9])],
        })
        .unwrap();
        src.step(&ForwardBatch {
            sequences: vec![seq(7, 10, vec![1], &[3, 5, 9])],
        })
        .unwrap();
        let blocks = [BlockId(3), BlockId(5), BlockId(9)];
        let bytes = src.export_blocks(&blocks).unwrap();
        assert_eq!(bytes.len(), 3 * n);
        // Exporting is deterministic and different blocks differ.
        assert_eq!(bytes, src.export_blocks(&blocks).unwrap());
        assert_ne!(bytes[..n], bytes[n..2 * n]);
        // Import into other block ids; the destination exports the same bytes.
        let dst_blocks = [BlockId(0), BlockId(1), BlockId(2)];
        dst.import_blocks(&dst_blocks, &bytes).unwrap();
        assert_eq!(dst.export_blocks(&dst_blocks).unwrap(), bytes);
        // The destination decodes on: block 2 (source 9) changes, others do not.
        dst.step(&ForwardBatch {
            sequences: vec![seq(7, 11, vec![2], &[0, 1, 2])],
        })
        .unwrap();
        let after = dst.export_blocks(&dst_blocks).unwrap();
        assert_eq!(after[..2 * n], bytes[..2 * n]);
        assert_ne!(after[2 * n..], bytes[2 * n..]);
        // The same decode on the source yields the same bytes (same KV content).
        src.step(&ForwardBatch {
            sequences: vec![seq(7, 11, vec![2], &[3, 5, 9])],
        })
        .unwrap();
        assert_eq!(src.export_blocks(&blocks).unwrap(), after);

        // Never-written blocks: deterministic filler, round-trips too.
        let fresh = LatencyModelBackend::new(profile.clone());
        let filler = fresh.export_blocks(&[BlockId(40), BlockId(41)]).unwrap();
        assert_eq!(
            filler,
            LatencyModelBackend::new(profile.clone())
                .export_blocks(&[BlockId(40), BlockId(41)])
                .unwrap()
        );
        assert_ne!(filler[..n], filler[n..]);
        dst.import_blocks(&[BlockId(60), BlockId(61)], &filler)
            .unwrap();
        assert_eq!(
            dst.export_blocks(&[BlockId(60), BlockId(61)]).unwrap(),
            filler
        );

        // Foreign bytes are kept verbatim.
        let foreign: Vec<u8> = (0..2 * n).map(|i| (i * 7 % 251) as u8).collect();
        dst.import_blocks(&[BlockId(20), BlockId(21)], &foreign)
            .unwrap();
        assert_eq!(
            dst.export_blocks(&[BlockId(20), BlockId(21)]).unwrap(),
            foreign
        );
        // ... until written to.
        dst.step(&ForwardBatch {
            sequences: vec![seq(8, 0, vec![1, 2], &[20])],
        })
        .unwrap();
        assert_ne!(dst.export_blocks(&[BlockId(20)]).unwrap(), foreign[..n]);

        // Wrong length is an error, and changes nothing.
        let e = dst
            .import_blocks(&[BlockId(0)], &bytes[..n - 1])
            .unwrap_err();
        assert!(e.to_string().contains(&format!("needs {n} bytes")), "{e}");
        assert_eq!(dst.export_blocks(&[BlockId(0)]).unwrap(), bytes[..n]);
    }

    #[test]
    fn round_trip_with_real_block_size_and_small_override() {
        // The derived profile: 8 MiB per block, kept as 16 digests.
        let profile = Arc::new(LatencyProfile::derived_llama7b_a10());
        let mut src = LatencyModelBackend::new(profile.clone());
        let mut dst = LatencyModelBackend::new(profile.clone());
        src.step(&ForwardBatch {
            sequences: vec![seq(1, 0, (0..20).collect(), &[4, 2])],
        })
        .unwrap();
        let bytes = src.export_blocks(&[BlockId(4), BlockId(2)]).unwrap();
        assert_eq!(bytes.len(), 2 * (8 << 20));
        dst.import_blocks(&[BlockId(0), BlockId(1)], &bytes)
            .unwrap();
        assert!(matches!(dst.blocks[&BlockId(0)], BlockContent::Slots(_)));
        assert_eq!(dst.export_blocks(&[BlockId(0), BlockId(1)]).unwrap(), bytes);

        // An override smaller than a header is kept raw, still exact.
        let mut a = LatencyModelBackend::new(profile.clone()).with_kv_bytes_per_block(64);
        let mut b = LatencyModelBackend::new(profile).with_kv_bytes_per_block(64);
        assert_eq!(a.kv_bytes_per_block(), 64);
        a.step(&ForwardBatch {
            sequences: vec![seq(1, 0, (0..20).collect(), &[4, 2])],
        })
        .unwrap();
        let bytes = a.export_blocks(&[BlockId(4), BlockId(2)]).unwrap();
        assert_eq!(bytes.len(), 128);
        b.import_blocks(&[BlockId(9), BlockId(8)], &bytes).unwrap();
        assert_eq!(b.export_blocks(&[BlockId(9), BlockId(8)]).unwrap(), bytes);
    }

    #[test]
    fn without_kv_contents_times_and_sizes_are_unchanged() {
        let profile = Arc::new(LatencyProfile::derived_llama7b_a10());
        let mut full = LatencyModelBackend::new(profile.clone()).with_kv_bytes_per_block(136);
        let mut bare = LatencyModelBackend::new(profile)
            .with_kv_bytes_per_block(136)
            .without_kv_contents();
        let batch = ForwardBatch {
            sequences: vec![
                seq(1, 0, (0..20).collect(), &[4, 2]),
                seq(2, 7, vec![3], &[5]),
            ],
        };
        assert_eq!(full.step(&batch).unwrap(), bare.step(&batch).unwrap());
        assert!(bare.blocks.is_empty());
        let bytes = bare.export_blocks(&[BlockId(4), BlockId(2)]).unwrap();
        assert_eq!(bytes.len(), 2 * 136);
        // Never-written blocks export their filler, whatever was computed.
        let fresh = LatencyModelBackend::new(Arc::new(LatencyProfile::derived_llama7b_a10()))
            .with_kv_bytes_per_block(136);
        assert_eq!(
            bytes,
            fresh.export_blocks(&[BlockId(4), BlockId(2)]).unwrap()
        );
        bare.import_blocks(&[BlockId(9), BlockId(8)], &bytes)
            .unwrap();
        assert!(bare.import_blocks(&[BlockId(9)], &bytes).is_err());
        assert!(bare.blocks.is_empty());
    }
}
