//! `llumen-bench engine`: decode and prefill throughput of one engine
//! instance (scheduler + candle backend, the path that serves), and
//! `--write-profile`: a latency profile measured on this machine for the
//! simulator's latency-model backend.
//!
//! Weights: the tiny test model is random (seeded); SmolLM2-135M is loaded
//! from its GGUF file when installed (`scripts/fetch-smollm2.sh`), otherwise
//! random weights of its shape are used and the report says so (speed does
//! not depend on the values).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use llumen_engine::candle::gguf::load_gguf;
use llumen_engine::candle::{CandleBackend, LlamaConfig, LlamaWeights};
use llumen_engine::latency_model::{
    DecodePoint, DecodeRow, DecodeTable, LatencyProfile, PrefillPoint, PrefillTable, ProfileData,
    ProfileKind, Provenance, PROFILE_FORMAT, PROFILE_VERSION,
};
use llumen_engine::{
    models, Engine, ModelBackend, Request, SamplingParams, SchedulerConfig, TokenId,
};
use serde::Serialize;

const BLOCK: usize = 16;

#[derive(clap::Args)]
pub struct Args {
    /// Models: `tiny` (random test model) and/or `smollm2`.
    #[arg(long, value_delimiter = ',', default_value = "tiny,smollm2")]
    models: Vec<String>,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    batches: Vec<usize>,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 8)]
    decode_steps: usize,
    /// Context of each sequence while decoding (prompt length).
    #[arg(long, default_value_t = 32)]
    context_tokens: usize,
    /// Prompt length of the prefill measurement (4 prompts per step).
    #[arg(long, default_value_t = 128)]
    prefill_tokens: usize,
    /// Measure a latency profile of the first model and write it here.
    #[arg(long)]
    write_profile: Option<PathBuf>,
    /// Print one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct DecodeResult {
    batch: usize,
    step_ms: f64,
    tokens_per_s: f64,
    /// Weights (f32) plus the KV the batch attends to: what one decode
    /// step must read from memory at least.
    bytes_read_per_step: u64,
    /// bytes_read_per_step / step time.
    effective_gb_per_s: f64,
    /// effective_gb_per_s / the measured memory bandwidth.
    fraction_of_memory_bandwidth: f64,
}

#[derive(Serialize)]
struct ModelResult {
    model: String,
    backend: String,
    decode: Vec<DecodeResult>,
    prefill_tokens: usize,
    prefill_step_ms: f64,
    prefill_tokens_per_s: f64,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    threads: usize,
    /// Read bandwidth of this machine: summing a 512 MiB buffer on every
    /// core (best of 3), like `mbw`'s read test.
    memory_bandwidth_gb_per_s: f64,
    results: Vec<ModelResult>,
    profile_written: Option<PathBuf>,
}

/// SmolLM2's real weights, loaded once, when the GGUF file is installed.
fn smollm2_weights() -> Option<&'static (LlamaConfig, LlamaWeights)> {
    static WEIGHTS: OnceLock<Option<(LlamaConfig, LlamaWeights)>> = OnceLock::new();
    WEIGHTS
        .get_or_init(|| {
            let path = models::smollm2_path()?;
            match load_gguf(&path, &Device::Cpu) {
                Ok(model) => Some((model.config, model.weights)),
                Err(e) => {
                    eprintln!(
                        "{}: {e}; using random weights of SmolLM2's shape",
                        path.display()
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// What `model` names, for reports.
fn model_label(model: &str) -> Result<&'static str> {
    match model {
        "tiny" => Ok("tiny (random weights)"),
        "smollm2" if smollm2_weights().is_some() => {
            Ok("smollm2-135m-instruct (GGUF, dequantized to f32)")
        }
        "smollm2" => Ok(
            "smollm2-135m shape (random weights: scripts/fetch-smollm2.sh installs the real ones)",
        ),
        other => bail!("unknown model {other:?} (expected tiny or smollm2)"),
    }
}

/// Backend of `model` with room for `num_blocks` blocks.
fn backend(model: &str, num_blocks: usize) -> Result<CandleBackend> {
    let config = match model {
        "tiny" => LlamaConfig::test_tiny(),
        "smollm2" => {
            if let Some((config, weights)) = smollm2_weights() {
                return Ok(CandleBackend::new(
                    config.clone(),
                    weights.clone(),
                    num_blocks,
                    BLOCK,
                    Device::Cpu,
                )?);
            }
            LlamaConfig::smollm2_135m()
        }
        other => bail!("unknown model {other:?} (expected tiny or smollm2)"),
    };
    Ok(CandleBackend::random(
        config,
        42,
        num_blocks,
        BLOCK,
        Device::Cpu,
    )?)
}

fn prompt(seed: u64, len: usize) -> Vec<TokenId> {
    (0..len as u64)
        .map(|i| ((seed * 7919 + i * 104_729) % 4000 + 10) as TokenId)
        .collect()
}

fn request(id: u64, prompt_len: usize, max_tokens: u32) -> Request {
    Request {
        id,
        prompt: prompt(id, prompt_len),
        sampling: SamplingParams::greedy(max_tokens),
        priority: 0,
        headroom_blocks: 0,
        arrival_us: 0,
    }
}

/// An engine with `batch` sequences of `context` prompt tokens, prefilled,
/// ready to decode `steps` more tokens each.
fn decoding_engine(
    model: &str,
    batch: usize,
    context: usize,
    steps: usize,
) -> Result<Engine<CandleBackend>> {
    let per_seq = (context + steps + 2).div_ceil(BLOCK) + 1;
    let num_blocks = batch * per_seq + 8;
    let backend = backend(model, num_blocks)?;
    let mut config = SchedulerConfig::with_blocks(num_blocks, BLOCK);
    config.max_batched_tokens = config.max_batched_tokens.max(batch * context + 1);
    let mut engine = Engine::new(config, backend)?;
    for id in 0..batch as u64 {
        engine.add(request(id, context, (steps + 2) as u32), 0)?;
    }
    let report = engine.step(0)?;
    if report.batch_size != batch {
        bail!(
            "prefilled {} of {batch} sequences in one step",
            report.batch_size
        );
    }
    Ok(engine)
}

/// Median wall time of `steps` decode steps, in ms.
fn time_decode(engine: &mut Engine<CandleBackend>, steps: usize) -> Result<f64> {
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let started = Instant::now();
        engine.step(0)?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Wall time of one step prefilling `sequences` prompts of `tokens` each, in ms.
fn time_prefill(model: &str, sequences: usize, tokens: usize) -> Result<f64> {
    let num_blocks = sequences * (tokens.div_ceil(BLOCK) + 2) + 8;
    let backend = backend(model, num_blocks)?;
    let mut config = SchedulerConfig::with_blocks(num_blocks, BLOCK);
    config.max_batched_tokens = config.max_batched_tokens.max(sequences * tokens);
    let mut engine = Engine::new(config, backend)?;
    for id in 0..sequences as u64 {
        engine.add(request(id, tokens, 4), 0)?;
    }
    let started = Instant::now();
    let report = engine.step(0)?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if report.tokens != sequences * tokens {
        bail!(
            "prefill step carried {} tokens, expected {}",
            report.tokens,
            sequences * tokens
        );
    }
    Ok(ms)
}

/// Read bandwidth: every core sums its share of a 512 MiB buffer; best of 3.
fn memory_bandwidth_gb_per_s() -> f64 {
    let words = (512usize << 20) / 8;
    let buffer: Vec<u64> = (0..words as u64).collect();
    let threads = rayon_threads();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(words.div_ceil(threads))
                .map(|chunk| {
                    scope.spawn(move || chunk.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("summing thread"))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best / 1e9
}

fn measure(model: &str, args: &Args, bandwidth_gb_per_s: f64) -> Result<ModelResult> {
    let mut decode = Vec::new();
    let mut backend_label = String::new();
    for &batch in &args.batches {
        let mut engine = decoding_engine(model, batch, args.context_tokens, args.decode_steps)?;
        backend_label = engine.backend().describe();
        let step_ms = time_decode(&mut engine, args.decode_steps)?;
        let config = engine.backend().config();
        // Mid-run context: the prompt plus half the timed steps.
        let context = args.context_tokens + args.decode_steps / 2;
        let bytes =
            (config.num_params() * 4 + batch * context * config.kv_bytes_per_token()) as u64;
        let effective = bytes as f64 / (step_ms / 1e3) / 1e9;
        decode.push(DecodeResult {
            batch,
            step_ms,
            tokens_per_s: batch as f64 / (step_ms / 1e3),
            bytes_read_per_step: bytes,
            effective_gb_per_s: effective,
            fraction_of_memory_bandwidth: effective / bandwidth_gb_per_s,
        });
        eprintln!(
            "{model}: decode batch {batch}: {step_ms:.2} ms/step, {:.0} tok/s, reads >= {:.0} MB/step = {effective:.1} GB/s ({:.0}% of {bandwidth_gb_per_s:.1} GB/s)",
            batch as f64 / (step_ms / 1e3),
            bytes as f64 / 1e6,
            100.0 * effective / bandwidth_gb_per_s
        );
    }
    let prefill_ms = time_prefill(model, 4, args.prefill_tokens)?;
    let prefill_tokens = 4 * args.prefill_tokens;
    eprintln!(
        "{model}: prefill {prefill_tokens} tokens: {prefill_ms:.1} ms, {:.0} tok/s",
        prefill_tokens as f64 / (prefill_ms / 1e3)
    );
    Ok(ModelResult {
        model: model_label(model)?.into(),
        backend: backend_label,
        decode,
        prefill_tokens,
        prefill_step_ms: prefill_ms,
        prefill_tokens_per_s: prefill_tokens as f64 / (prefill_ms / 1e3),
    })
}

/// Times prefill and decode steps over a grid and writes a measured profile.
/// Timing noise is absorbed by a running maximum (the format requires times
/// that never decrease with more work).
fn write_profile(model: &str, path: &PathBuf) -> Result<()> {
    let mut prefill = Vec::new();
    let mut worst = 0f64;
    for tokens in [16usize, 64, 128, 256, 512] {
        let ms = (0..3)
            .map(|_| time_prefill(model, 1, tokens))
            .collect::<Result<Vec<_>>>()?;
        let mut ms = ms;
        ms.sort_by(f64::total_cmp);
        worst = worst.max(ms[1]);
        prefill.push(PrefillPoint {
            tokens: tokens as u64,
            ms: worst,
        });
    }
    let mut rows: Vec<DecodeRow> = Vec::new();
    for batch in [1usize, 8, 16, 32] {
        let mut points = Vec::new();
        for context in [32usize, 128, 384] {
            let mut engine = decoding_engine(model, batch, context, 3)?;
            let mut ms = time_decode(&mut engine, 3)?;
            // Never faster than less work: the smaller batch at the same
            // total context, or a smaller context at this batch.
            if let Some(prev) = rows.last() {
                ms = ms.max(row_at(&prev.points, (batch * context) as f64));
            }
            if let Some(prev) = points.last() {
                let prev: &DecodePoint = prev;
                ms = ms.max(prev.ms);
            }
            points.push(DecodePoint {
                context_tokens: (batch * context) as u64,
                ms,
            });
            eprintln!("profile: decode batch {batch} context {context}: {ms:.2} ms");
        }
        rows.push(DecodeRow {
            batch: batch as u64,
            points,
        });
    }
    let data = ProfileData {
        format: PROFILE_FORMAT.into(),
        version: PROFILE_VERSION,
        model: model_label(model)?.into(),
        hardware: format!("{}, {} threads", cpu_model(), rayon_threads()),
        provenance: Provenance {
            kind: ProfileKind::Measured,
            source: "llumen-bench engine --write-profile (candle backend, batch-invariant kernels)"
                .into(),
            notes: vec![
                "step times are medians of 3; made non-decreasing by a running maximum".into(),
            ],
        },
        block_size: BLOCK,
        num_blocks: 2048,
        max_batched_tokens: 4096,
        kv_bytes_per_block: backend(model, 1)?.kv_bytes_per_block(),
        migration_bandwidth_bytes_per_s: None,
        swap_bandwidth_bytes_per_s: None,
        prefill: PrefillTable {
            points: prefill,
            fit: None,
        },
        decode: DecodeTable {
            batch_multiple: 1,
            rows,
            fit: None,
        },
    };
    let profile =
        LatencyProfile::from_data(data).context("the measured profile does not validate")?;
    std::fs::write(path, profile.to_json_pretty())
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// A decode row's time at `context` tokens: linear between its points,
/// extended along its first or last segment beyond them.
fn row_at(points: &[DecodePoint], context: f64) -> f64 {
    let seg = match points
        .iter()
        .position(|p| p.context_tokens as f64 >= context)
    {
        Some(0) | None if points.len() < 2 => return points.first().map_or(0.0, |p| p.ms),
        Some(0) => 0,
        Some(i) => i - 1,
        None => points.len() - 2,
    };
    let (a, b) = (points[seg], points[seg + 1]);
    let slope = (b.ms - a.ms) / (b.context_tokens as f64 - a.context_tokens as f64);
    a.ms + slope * (context - a.context_tokens as f64)
}

/// The CPU's model name, from /proc/cpuinfo where there is one.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn run(args: &Args) -> Result<()> {
    let bandwidth = memory_bandwidth_gb_per_s();
    eprintln!(
        "memory read bandwidth: {bandwidth:.1} GB/s ({} threads)",
        rayon_threads()
    );
    let mut results = Vec::new();
    for model in &args.models {
        results.push(measure(model, args, bandwidth)?);
    }
    if let (Some(path), Some(model)) = (&args.write_profile, args.models.first()) {
        write_profile(model, path)?;
    }
    let report = Report {
        benchmark: "engine",
        threads: rayon_threads(),
        memory_bandwidth_gb_per_s: bandwidth,
        results,
        profile_written: args.write_profile.clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
