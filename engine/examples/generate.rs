//! Generates a chat answer with SmolLM2-135M-Instruct through one engine
//! instance (scheduler + candle backend over the paged KV cache), streaming
//! the text as it is decoded. Until `llumen generate` talks to a server, this
//! is how to talk to the model:
//!
//! ```sh
//! scripts/fetch-smollm2.sh
//! cargo run --release -p llumen-engine --example generate -- "What is the capital of France?"
//! ```
//!
//! Options: `--max-tokens N` (default 128), `--temperature T` (default 0:
//! greedy), `--seed S`.

use std::io::Write;
use std::time::Instant;

use candle_core::Device;
use llumen_engine::candle::{gguf::load_gguf, CandleBackend};
use llumen_engine::tokenizer::ChatMessage;
use llumen_engine::{models, Engine, Request, SamplingParams, SchedulerConfig, SeqEvent};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut max_tokens, mut temperature, mut seed, mut prompt) = (128u32, 0f32, 0u64, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--max-tokens" => {
                max_tokens = args.next().ok_or("--max-tokens needs a value")?.parse()?
            }
            "--temperature" => {
                temperature = args.next().ok_or("--temperature needs a value")?.parse()?
            }
            "--seed" => seed = args.next().ok_or("--seed needs a value")?.parse()?,
            _ => prompt = Some(arg),
        }
    }
    let prompt =
        prompt.ok_or("usage: generate [--max-tokens N] [--temperature T] [--seed S] PROMPT")?;
    let path = models::smollm2_path().ok_or(
        "SmolLM2-135M-Instruct is not installed: run scripts/fetch-smollm2.sh (or set LLUMEN_SMOLLM2_GGUF)",
    )?;

    let started = Instant::now();
    let model = load_gguf(&path, &Device::Cpu)?;
    let tokenizer = model.tokenizer;
    let block_size = 16;
    let num_blocks = 256;
    let backend = CandleBackend::new(
        model.config,
        model.weights,
        num_blocks,
        block_size,
        Device::Cpu,
    )?;
    eprintln!(
        "loaded {} in {:.2} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );

    let tokens = tokenizer.encode_chat(&[ChatMessage::user(prompt)])?;
    let mut sampling = SamplingParams {
        temperature,
        seed,
        ..SamplingParams::greedy(max_tokens)
    };
    sampling.stop_token_ids.extend(tokenizer.eos_id());
    let mut engine = Engine::new(
        SchedulerConfig::with_blocks(num_blocks, block_size),
        backend,
    )?;
    engine.add(
        Request {
            id: 1,
            prompt: tokens,
            sampling,
            priority: 0,
            headroom_blocks: 0,
            arrival_us: 0,
        },
        0,
    )?;

    let mut decoder = tokenizer.stream_decoder(true);
    let mut stdout = std::io::stdout();
    let (mut now, mut generated) = (0u64, 0usize);
    let decode_started = Instant::now();
    while !engine.scheduler().is_idle() {
        let report = engine.step(now)?;
        now += report.duration_us;
        for event in report.events {
            if let SeqEvent::Token { token, .. } = event {
                generated += 1;
                write!(stdout, "{}", decoder.push(&tokenizer, token))?;
                stdout.flush()?;
            }
        }
    }
    writeln!(stdout, "{}", decoder.finish())?;
    eprintln!(
        "{generated} tokens in {:.2} s",
        decode_started.elapsed().as_secs_f64()
    );
    Ok(())
}
