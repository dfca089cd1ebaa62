//! GGUF loader tests: a tiny model written as a GGUF with candle's writer
//! (q/k permuted as llama.cpp does) loads back bit-identically; broken files
//! fail with errors naming the problem; and, when the file is present, the
//! real SmolLM2-135M-Instruct answers a question.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};

use super::*;
use crate::candle::CandleBackend;
use crate::tokenizer::ChatMessage;
use crate::{BlockId, ForwardBatch, ModelBackend, SequenceInput, TokenId};

/// A file in the temp dir removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!(
            "llumen-gguf-test-{}-{name}.gguf",
            std::process::id()
        )))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn metadata(c: &LlamaConfig) -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    let mut tokens = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".to_string(),
        "<|im_end|>".to_string(),
    ];
    let mut types = vec![Value::I32(3); 3];
    // The 256 byte-level characters (GPT-2's table), then filler tokens.
    for b in 0..=255u32 {
        let keep = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if keep {
            char::from_u32(b).unwrap()
        } else {
            let n = (0..b)
                .filter(|&x| {
                    !((33..=126).contains(&x)
                        || (161..=172).contains(&x)
                        || (174..=255).contains(&x))
                })
                .count() as u32;
            char::from_u32(256 + n).unwrap()
        };
        tokens.push(c.to_string());
        types.push(Value::I32(1));
    }
    while tokens.len() < c.vocab {
        tokens.push(format!("tok{}", tokens.len()));
        types.push(Value::I32(1));
    }
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), u(c.layers)),
        ("llama.context_length".into(), u(c.max_position)),
        ("llama.embedding_length".into(), u(c.hidden)),
        ("llama.feed_forward_length".into(), u(c.intermediate)),
        ("llama.attention.head_count".into(), u(c.heads)),
        ("llama.attention.head_count_kv".into(), u(c.kv_heads)),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_eps as f32),
        ),
        ("llama.vocab_size".into(), u(c.vocab)),
        ("llama.rope.dimension_count".into(), u(c.head_dim)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
    ]
}

/// `w` under llama.cpp names, q/k permuted to the interleaved layout.
fn gguf_tensors(c: &LlamaConfig, w: &LlamaWeights) -> Vec<(String, Tensor)> {
    let mut t = vec![("token_embd.weight".to_string(), w.embed.clone())];
    for (i, l) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        t.push((n("attn_norm"), l.attn_norm.clone()));
        t.push((n("attn_q"), permute_rope_rows(&l.wq, c.heads).unwrap()));
        t.push((n("attn_k"), permute_rope_rows(&l.wk, c.kv_heads).unwrap()));
        t.push((n("attn_v"), l.wv.clone()));
        t.push((n("attn_output"), l.wo.clone()));
        t.push((n("ffn_norm"), l.ffn_norm.clone()));
        t.push((n("ffn_gate"), l.w_gate.clone()));
        t.push((n("ffn_up"), l.w_up.clone()));
        t.push((n("ffn_down"), l.w_down.clone()));
    }
    t.push(("output_norm.weight".into(), w.norm.clone()));
    if let Some(h) = &w.lm_head {
        t.push(("output.weight".into(), h.clone()));
    }
    t
}

fn write_gguf(path: &Path, md: &[(String, Value)], tensors: &[(String, Tensor)]) {
    let q: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let q: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &q).unwrap();
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn unpermute_maps_interleaved_rows_to_half_split() {
    // 2 heads of 4 rows, 1 column: row r holds r.
    let t = Tensor::from_vec((0..8).map(|r| r as f32).collect(), (8, 1), &Device::Cpu).unwrap();
    let u = unpermute_rope_rows(&t, 2).unwrap();
    // Head 0: GGUF rows 0,1,2,3 = (pair 0: 0,1), (pair 1: 2,3) -> HF 0,2 | 1,3.
    assert_eq!(flat(&u), [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    let p = permute_rope_rows(&u, 2).unwrap();
    assert_eq!(flat(&p), flat(&t));
    assert!(unpermute_rope_rows(&t, 3).is_err());
}

#[test]
fn tiny_model_round_trips_through_gguf() {
    for tied in [true, false] {
        let mut c = LlamaConfig::test_tiny();
        c.tie_embeddings = tied;
        let w = LlamaWeights::random(&c, 11, &Device::Cpu).unwrap();
        let f = TempFile::new(if tied { "tiny-tied" } else { "tiny-untied" });
        write_gguf(&f.0, &metadata(&c), &gguf_tensors(&c, &w));

        let m = load_gguf(&f.0, &Device::Cpu).unwrap();
        assert_eq!(m.config, c);
        assert_eq!(m.weights.source, WeightSource::File(f.0.clone()));
        assert_eq!(flat(&m.weights.embed), flat(&w.embed));
        for (a, b) in m.weights.layers.iter().zip(&w.layers) {
            assert_eq!(flat(&a.wq), flat(&b.wq));
            assert_eq!(flat(&a.wk), flat(&b.wk));
            assert_eq!(flat(&a.wv), flat(&b.wv));
            assert_eq!(flat(&a.w_down), flat(&b.w_down));
        }
        assert_eq!(m.weights.lm_head.is_some(), !tied);
        assert_eq!(m.tokenizer.vocab_size(), c.vocab);
        assert_eq!(
            m.tokenizer.encode("<|im_start|>a"),
            [1, 3 + b'a' as TokenId]
        );

        // Same logits from the loaded weights as from the originals.
        let run = |weights: LlamaWeights| {
            let mut be = CandleBackend::new(c.clone(), weights, 4, 16, Device::Cpu).unwrap();
            be.forward_logits(&ForwardBatch {
                sequences: vec![SequenceInput {
                    seq: 1,
                    tokens: vec![5, 77, 1000, 3],
                    start_position: 0,
                    block_table: vec![BlockId(0)],
                    temperature: 0.0,
                    top_p: 1.0,
                    seed: 0,
                    output_index: 0,
                }],
            })
            .unwrap()
        };
        assert_eq!(run(m.weights), run(w));
    }
}

#[test]
fn broken_files_fail_with_named_errors() {
    let c = LlamaConfig::test_tiny();
    let w = LlamaWeights::random(&c, 3, &Device::Cpu).unwrap();
    let md = metadata(&c);
    let tensors = gguf_tensors(&c, &w);

    let e = GgufFile::open("/nonexistent/llumen/model.gguf").unwrap_err();
    assert!(e.0.contains("cannot open"), "{e}");

    // Garbage.
    let f = TempFile::new("garbage");
    std::fs::write(&f.0, b"this is not a GGUF file at all, just some bytes").unwrap();
    let e = load_gguf(&f.0, &Device::Cpu).unwrap_err();
    assert!(e.0.contains("not a valid GGUF"), "{e}");
    assert!(e.to_string().contains(&*f.0.to_string_lossy()), "{e}");

    // Truncated: in the header, and in the tensor data.
    let good = TempFile::new("good");
    write_gguf(&good.0, &md, &tensors);
    let bytes = std::fs::read(&good.0).unwrap();
    let t = TempFile::new("truncated");
    for cut in [3, 100, 20_000] {
        std::fs::write(&t.0, &bytes[..cut]).unwrap();
        let e = load_gguf(&t.0, &Device::Cpu).unwrap_err();
        assert!(e.0.contains("not a valid GGUF"), "cut at {cut}: {e}");
    }
    std::fs::write(&t.0, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_gguf(&t.0, &Device::Cpu).unwrap_err();
    assert!(
        e.0.contains("tensor output_norm.weight") || e.0.contains("tensor blk.1."),
        "{e}"
    );
    assert!(e.0.contains("remaining in file"), "{e}");

    // A missing tensor, a mis-shaped one, a missing key, another architecture.
    let f = TempFile::new("broken");
    let without: Vec<_> = tensors
        .iter()
        .filter(|(n, _)| n != "blk.1.ffn_up.weight")
        .cloned()
        .collect();
    write_gguf(&f.0, &md, &without);
    let e = load_gguf(&f.0, &Device::Cpu).unwrap_err();
    assert!(e.0.contains("tensor blk.1.ffn_up.weight missing"), "{e}");

    let mut reshaped = tensors.clone();
    for (n, t) in reshaped.iter_mut() {
        if n == "blk.0.attn_k.weight" {
            *t = Tensor::zeros((c.q_dim(), c.hidden), DType::F32, &Device::Cpu).unwrap();
        }
    }
    write_gguf(&f.0, &md, &reshaped);
    let e = load_gguf(&f.0, &Device::Cpu).unwrap_err();
    assert!(
        e.0.contains("tensor blk.0.attn_k.weight: shape [128, 128]"),
        "{e}"
    );
    assert!(e.0.contains("expected [64, 128]"), "{e}");

    let no_layers: Vec<_> = md
        .iter()
        .filter(|(k, _)| k != "llama.block_count")
        .cloned()
        .collect();
    write_gguf(&f.0, &no_layers, &tensors);
    let e = load_gguf(&f.0, &Device::Cpu).unwrap_err();
    assert!(
        e.0.contains("metadata key llama.block_count missing"),
        "{e}"
    );

    let mut fewer = md.clone();
    for (k, v) in fewer.iter_mut() {
        if k == "llama.block_count" {
            *v = Value::U32(1);
        }
    }
    write_gguf(&f.0, &fewer, &tensors);
    let e = load_gguf(&f.0, &Device::Cpu).unwrap_err();
    assert!(e.0.contains("blk.1.attn_q.weight present"), "{e}");

    let mut other = md.clone();
    other[0].1 = Value::String("gemma".into());
    write_gguf(&f.0, &other, &tensors);
    let e = load_gguf(&f.0, &Device::Cpu).unwrap_err();
    assert!(e.0.contains("general.architecture is \"gemma\""), "{e}");

    let mut bad_tok = md.clone();
    for (k, v) in bad_tok.iter_mut() {
        if k == "tokenizer.ggml.model" {
            *v = Value::String("llama".into());
        }
    }
    write_gguf(&f.0, &bad_tok, &tensors);
    let e = load_gguf(&f.0, &Device::Cpu).unwrap_err();
    assert!(e.0.contains("tokenizer.ggml.model"), "{e}");
}

#[test]
fn default_model_path_is_in_the_cache_dir() {
    if let Some(p) = crate::models::smollm2_default_path() {
        assert!(p.ends_with(crate::models::SMOLLM2_FILE));
    }
}

/// Greedy chat answer of the real model (run in the dev profile).
#[test]
fn smollm2_answers_the_capital_of_france() {
    let Some(path) = crate::models::smollm2_path() else {
        eprintln!(
            "skipped: SmolLM2 GGUF not found (run scripts/fetch-smollm2.sh or set LLUMEN_SMOLLM2_GGUF)"
        );
        return;
    };
    let t0 = Instant::now();
    let m = load_gguf(&path, &Device::Cpu).unwrap();
    let load = t0.elapsed();
    assert_eq!(m.config, LlamaConfig::smollm2_135m());
    let tok = m.tokenizer;
    let prompt = tok
        .encode_chat(&[ChatMessage::user("What is the capital of France?")])
        .unwrap();

    let (bs, max_new) = (16, 24);
    let blocks = (prompt.len() + max_new).div_ceil(bs);
    let mut be = CandleBackend::new(m.config.clone(), m.weights, blocks, bs, Device::Cpu).unwrap();
    let table: Vec<BlockId> = (0..blocks as u32).map(BlockId).collect();
    let mut out: Vec<TokenId> = Vec::new();
    let mut text = String::new();
    let mut dec = tok.stream_decoder(true);
    let t1 = Instant::now();
    let mut prefill = None;
    while out.len() < max_new {
        let (tokens, start) = match out.last() {
            None => (prompt.clone(), 0),
            Some(&t) => (vec![t], prompt.len() + out.len() - 1),
        };
        let step = be
            .step(&ForwardBatch {
                sequences: vec![SequenceInput {
                    seq: 1,
                    tokens,
                    start_position: start,
                    block_table: table.clone(),
                    temperature: 0.0,
                    top_p: 1.0,
                    seed: 0,
                    output_index: out.len() as u32,
                }],
            })
            .unwrap();
        prefill.get_or_insert(t1.elapsed());
        let next = step.next_tokens[0];
        if tok.is_control(next) {
            break;
        }
        out.push(next);
        text.push_str(&dec.push(&tok, next));
    }
    text.push_str(&dec.finish());
    let total = t1.elapsed();
    eprintln!(
        "SmolLM2: load {:.2} s; prompt {} tokens, prefill {:.2} s; {} tokens generated in {:.2} s; answer {:?}",
        load.as_secs_f64(),
        prompt.len(),
        prefill.unwrap().as_secs_f64(),
        out.len(),
        total.as_secs_f64(),
        text
    );
    assert_eq!(text, tok.decode(&out, true));
    assert!(text.contains("Paris"), "answer: {text:?}");
}
