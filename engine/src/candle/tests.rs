//! Tests of the candle backend on the tiny random model: agreement with a
//! scalar reference, batch invariance (prefill vs decode, alone vs batched,
//! migration by KV export/import), validation.

use super::weights::SplitMix64;
use super::*;
use crate::SequenceInput;

const BS: usize = 4; // small blocks: sequences span many of them

fn tiny_weights(seed: u64) -> LlamaWeights {
    LlamaWeights::random(&LlamaConfig::test_tiny(), seed, &Device::Cpu).unwrap()
}

fn backend(weights: &LlamaWeights, num_blocks: usize) -> CandleBackend {
    CandleBackend::new(
        LlamaConfig::test_tiny(),
        weights.clone(),
        num_blocks,
        BS,
        Device::Cpu,
    )
    .unwrap()
}

/// The batch-invariant kernels: the CPU default and the device-generic one.
const INVARIANT: [LinearKernel; 2] = [LinearKernel::RowDot, LinearKernel::FixedChunk(8)];

fn prompt(seed: u64, n: usize) -> Vec<TokenId> {
    let mut r = SplitMix64(seed);
    (0..n).map(|_| (r.next_u64() % 4096) as TokenId).collect()
}

fn input(
    seq: u64,
    tokens: &[TokenId],
    start: usize,
    table: &[u32],
    output_index: u32,
) -> SequenceInput {
    SequenceInput {
        seq,
        tokens: tokens.to_vec(),
        start_position: start,
        block_table: table.iter().map(|&b| BlockId(b)).collect(),
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        output_index,
    }
}

/// A sequence driven by the tests: its own block ids, tokens so far, how
/// many positions hold KV.
#[derive(Clone)]
struct Seq {
    id: u64,
    table: Vec<u32>,
    tokens: Vec<TokenId>,
    prompt_len: usize,
    computed: usize,
    outputs: Vec<TokenId>,
    logits: Vec<Vec<f32>>,
}

impl Seq {
    fn new(id: u64, table: Vec<u32>, prompt: Vec<TokenId>) -> Self {
        let prompt_len = prompt.len();
        Self {
            id,
            table,
            tokens: prompt,
            prompt_len,
            computed: 0,
            outputs: vec![],
            logits: vec![],
        }
    }
    /// The next input: everything not yet computed (prefill) or the last token.
    fn next_input(&self) -> SequenceInput {
        input(
            self.id,
            &self.tokens[self.computed..],
            self.computed,
            &self.table,
            self.outputs.len() as u32,
        )
    }
    fn accept(&mut self, token: TokenId, logits: Vec<f32>) {
        self.computed = self.tokens.len();
        self.tokens.push(token);
        self.outputs.push(token);
        self.logits.push(logits);
    }
}

/// One step over `seqs`; returns nothing, updates each sequence.
fn run_step(b: &mut CandleBackend, seqs: &mut [&mut Seq]) {
    let batch = ForwardBatch {
        sequences: seqs.iter().map(|s| s.next_input()).collect(),
    };
    let logits = b.forward_logits(&batch).unwrap();
    for (s, l) in seqs.iter_mut().zip(logits) {
        let t = sampler::argmax(&l);
        s.accept(t, l);
    }
}

fn bits(rows: &[Vec<f32>]) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|r| r.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn matches_a_scalar_reference_implementation() {
    let w = tiny_weights(1);
    let c = LlamaConfig::test_tiny();
    let mut b = backend(&w, 16);
    let toks = prompt(2, 9);
    let got = b
        .forward_logits(&ForwardBatch {
            sequences: vec![input(1, &toks, 0, &[3, 0, 7], 0)],
        })
        .unwrap();
    let want = reference_logits(&c, &w, &toks);
    let max_diff = got[0]
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(
        max_diff <= 1e-4 * scale.max(1.0),
        "max |diff| {max_diff} (logit scale {scale})"
    );
    assert_eq!(sampler::argmax(&got[0]), sampler::argmax(&want));
}

#[test]
fn prefill_then_decode_equals_token_by_token_and_recompute() {
    for kernel in INVARIANT {
        prefill_then_decode_case(kernel);
    }
}

fn prefill_then_decode_case(kernel: LinearKernel) {
    let backend = |w: &LlamaWeights, n: usize| backend(w, n).with_linear_kernel(kernel);
    let w = tiny_weights(3);
    let p = prompt(4, 13);
    // A: prefill the prompt, then decode.
    let mut a = backend(&w, 32);
    let mut sa = Seq::new(1, vec![5, 9, 2, 30, 11, 0, 17, 8], p.clone());
    for _ in 0..14 {
        run_step(&mut a, &mut [&mut sa]);
    }
    // B: feed the prompt one token at a time (decode-shaped steps), other blocks.
    let mut bk = backend(&w, 32);
    let mut sb = Seq::new(1, vec![1, 2, 3, 4, 5, 6, 7, 31], p.clone());
    for i in 0..p.len() - 1 {
        bk.forward_logits(&ForwardBatch {
            sequences: vec![input(1, &p[i..i + 1], i, &sb.table, 0)],
        })
        .unwrap();
        sb.computed = i + 1;
    }
    for _ in 0..14 {
        run_step(&mut bk, &mut [&mut sb]);
    }
    assert_eq!(sa.outputs, sb.outputs);
    assert_eq!(bits(&sa.logits), bits(&sb.logits), "logits bit-identical");
    let distinct: HashSet<_> = sa.outputs.iter().collect();
    assert!(
        distinct.len() > 3,
        "the random model should not be degenerate: {:?}",
        sa.outputs
    );

    // C: preempted after 6 outputs, recomputed as prompt + outputs in one prefill.
    let mut cb = backend(&w, 32);
    let mut sc = Seq::new(1, vec![12, 13, 14, 15, 16, 17, 18, 19], p.clone());
    sc.tokens.extend_from_slice(&sa.outputs[..6]);
    sc.outputs = sa.outputs[..6].to_vec();
    for _ in 6..14 {
        run_step(&mut cb, &mut [&mut sc]);
    }
    assert_eq!(sc.outputs, sa.outputs);
    assert_eq!(bits(&sc.logits), bits(&sa.logits[6..]));
    assert_eq!(sc.prompt_len, 13);
}

#[test]
fn chunked_prefill_equals_whole_prefill() {
    let w = tiny_weights(19);
    let p = prompt(20, 23);
    let mut a = backend(&w, 16);
    let whole = a
        .forward_logits(&ForwardBatch {
            sequences: vec![input(1, &p, 0, &[0, 1, 2, 3, 4, 5], 0)],
        })
        .unwrap();
    let mut b = backend(&w, 16);
    let table = [9, 8, 7, 6, 5, 4];
    let mut last = vec![];
    for (start, end) in [(0, 5), (5, 6), (6, 17), (17, 23)] {
        last = b
            .forward_logits(&ForwardBatch {
                sequences: vec![input(1, &p[start..end], start, &table, 0)],
            })
            .unwrap();
    }
    assert_eq!(bits(&whole), bits(&last));
}

#[test]
fn greedy_output_is_identical_alone_and_in_a_busy_batch() {
    for kernel in INVARIANT {
        busy_batch_case(kernel);
    }
}

fn busy_batch_case(kernel: LinearKernel) {
    let backend = |w: &LlamaWeights, n: usize| backend(w, n).with_linear_kernel(kernel);
    let w = tiny_weights(5);
    let steps = 16;
    let mut alone = backend(&w, 64);
    let mut s = Seq::new(7, (40..48).collect(), prompt(6, 9));
    for _ in 0..steps {
        run_step(&mut alone, &mut [&mut s]);
    }

    let mut busy = backend(&w, 64);
    let mut t = Seq::new(7, vec![3, 1, 41, 15, 9, 61, 5, 35], prompt(6, 9));
    let mut o1 = Seq::new(1, (50..60).collect(), prompt(10, 3));
    let mut o2 = Seq::new(2, (0..10).map(|i| 2 * i).collect(), prompt(11, 17));
    let mut o3 = Seq::new(3, (20..32).collect(), prompt(12, 30));
    for step in 0..steps {
        // Others join late (their prefill shares a step with t's decodes) and
        // o1 leaves early, so t's batch-mates change from step to step.
        let mut batch: Vec<&mut Seq> = Vec::new();
        if step < 10 {
            batch.push(&mut o1);
        }
        if step >= 3 {
            batch.push(&mut o2);
        }
        batch.push(&mut t);
        if step >= 6 {
            batch.push(&mut o3);
        }
        run_step(&mut busy, &mut batch);
    }
    assert_eq!(t.outputs, s.outputs);
    assert_eq!(bits(&t.logits), bits(&s.logits), "logits bit-identical");
    assert!(o2.outputs.len() == steps - 3 && o3.outputs.len() == steps - 6);
}

#[test]
fn decoding_continues_identically_after_kv_export_and_import() {
    for kernel in INVARIANT {
        migration_case(kernel);
    }
}

fn migration_case(kernel: LinearKernel) {
    let backend = |w: &LlamaWeights, n: usize| backend(w, n).with_linear_kernel(kernel);
    let w = tiny_weights(7);
    let mut a = backend(&w, 32);
    let mut sa = Seq::new(1, vec![0, 1, 2, 3, 4, 5, 6, 7], prompt(8, 10));
    let mut other = Seq::new(2, vec![8, 9, 10, 11, 12, 13, 14], prompt(9, 5));
    for _ in 0..5 {
        run_step(&mut a, &mut [&mut other, &mut sa]);
    }
    // KV of positions 0..15 lives in 4 blocks; move it to B under other ids.
    let used = sa.computed.div_ceil(BS);
    let src: Vec<BlockId> = sa.table[..used].iter().map(|&b| BlockId(b)).collect();
    let data = a.export_blocks(&src).unwrap();
    assert_eq!(data.len(), used * a.kv_bytes_per_block());

    let mut b = backend(&w, 24);
    let dst_ids = [20u32, 3, 17, 9, 0, 23, 11, 5];
    let dst: Vec<BlockId> = dst_ids[..used].iter().map(|&i| BlockId(i)).collect();
    b.import_blocks(&dst, &data).unwrap();
    assert!(
        b.export_blocks(&dst).unwrap() == data,
        "round trip is byte-exact"
    );
    // A staged copy (one block at a time, out of order) gives the same bytes.
    let mut c = backend(&w, 24);
    for i in (0..used).rev() {
        let one = a.export_blocks(&src[i..i + 1]).unwrap();
        c.import_blocks(&dst[i..i + 1], &one).unwrap();
    }
    assert!(
        c.export_blocks(&dst).unwrap() == data,
        "staged copy is byte-exact"
    );

    let mut sb = sa.clone();
    sb.table = dst_ids.to_vec();
    sb.logits.clear();
    let before = sa.logits.len();
    for _ in 0..10 {
        run_step(&mut a, &mut [&mut sa, &mut other]);
        run_step(&mut b, &mut [&mut sb]);
    }
    assert_eq!(sa.outputs, sb.outputs);
    assert_eq!(bits(&sa.logits[before..]), bits(&sb.logits));
}

#[test]
fn export_layout_is_block_major_little_endian() {
    let w = tiny_weights(9);
    let c = LlamaConfig::test_tiny();
    let mut a = backend(&w, 8);
    a.forward_logits(&ForwardBatch {
        sequences: vec![input(1, &prompt(1, 6), 0, &[5, 2], 0)],
    })
    .unwrap();
    let data = a.export_blocks(&[BlockId(2)]).unwrap();
    let per = BS * c.kv_dim();
    assert_eq!(a.kv_bytes_per_block(), c.layers * 2 * per * 4);
    // Block 2 holds positions 4 and 5 (offsets 0, 1); offsets 2, 3 were never written.
    let f = |i: usize| f32::from_le_bytes(data[i * 4..i * 4 + 4].try_into().unwrap());
    for l in 0..c.layers {
        for kind in 0..2 {
            let base = (l * 2 + kind) * per;
            let cache = if kind == 0 {
                &a.cache.k[l]
            } else {
                &a.cache.v[l]
            };
            let want = cache
                .narrow(0, 2 * BS, BS)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got: Vec<f32> = (0..per).map(|i| f(base + i)).collect();
            assert_eq!(got, want);
            assert!(got[..2 * c.kv_dim()].iter().any(|&x| x != 0.0));
            assert!(got[2 * c.kv_dim()..].iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn linear_rows_are_independent_of_neighbours_and_position() {
    for kernel in INVARIANT {
        linear_rows_case(kernel);
    }
}

fn linear_rows_case(kernel: LinearKernel) {
    let w = tiny_weights(11);
    let b = backend(&w, 4).with_linear_kernel(kernel);
    let mut r = SplitMix64(99);
    let mut rows = |n: usize, cols: usize| {
        let v: Vec<f32> = (0..n * cols)
            .map(|_| (r.next_f64() * 2.0 - 1.0) as f32)
            .collect();
        Tensor::from_vec(v, (n, cols), &Device::Cpu).unwrap()
    };
    let layer = &b.model.layers[0];
    let c = LlamaConfig::test_tiny();
    for (w_t, cols) in [
        (&layer.wqkv, c.hidden),
        (&layer.w_down, c.intermediate),
        (&layer.w_gate_up, c.hidden),
        (&b.model.lm_head, c.hidden),
    ] {
        let target = rows(1, cols);
        let alone = b
            .model
            .linear(&target, w_t)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0);
        for (before, after) in [(0, 0), (3, 0), (0, 7), (5, 12), (8, 8), (13, 2)] {
            let x = Tensor::cat(&[&rows(before, cols), &target, &rows(after, cols)], 0).unwrap();
            let got = b
                .model
                .linear(&x, w_t)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .remove(before);
            assert_eq!(
                bits(&[got]),
                bits(std::slice::from_ref(&alone)),
                "row at {before} of {}",
                before + 1 + after
            );
        }
    }
}

#[test]
fn all_linear_kernels_agree_approximately() {
    let w = tiny_weights(13);
    let toks = prompt(3, 20);
    let run = |mode| {
        let mut b = backend(&w, 8).with_linear_kernel(mode);
        b.forward_logits(&ForwardBatch {
            sequences: vec![input(1, &toks, 0, &[0, 1, 2, 3, 4], 0)],
        })
        .unwrap()
        .remove(0)
    };
    let fixed = run(LinearKernel::RowDot);
    let eight = run(LinearKernel::FixedChunk(8));
    let one = run(LinearKernel::FixedChunk(1));
    let batched = run(LinearKernel::Batched);
    for other in [&eight, &one, &batched] {
        let d = fixed
            .iter()
            .zip(other)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-3, "{d}");
    }
}

#[test]
fn step_samples_with_the_request_seed() {
    let w = tiny_weights(15);
    let p = prompt(5, 7);
    let sampled = |seed: u64, idx: u32| {
        let mut b = backend(&w, 8);
        let mut i = input(1, &p, 0, &[1, 2], idx);
        i.temperature = 1.5;
        i.top_p = 0.95;
        i.seed = seed;
        b.step(&ForwardBatch { sequences: vec![i] })
            .unwrap()
            .next_tokens[0]
    };
    assert_eq!(sampled(1, 0), sampled(1, 0));
    let draws: HashSet<_> = (0..12).map(|i| sampled(2, i)).collect();
    assert!(
        draws.len() > 1,
        "temperature 1.5 varies with the output index"
    );
    let mut b = backend(&w, 8);
    let out = b
        .step(&ForwardBatch {
            sequences: vec![input(1, &p, 0, &[1, 2], 0)],
        })
        .unwrap();
    let mut g = backend(&w, 8);
    let l = g
        .forward_logits(&ForwardBatch {
            sequences: vec![input(1, &p, 0, &[1, 2], 0)],
        })
        .unwrap();
    assert_eq!(out.next_tokens, vec![sampler::argmax(&l[0])]);
    assert!(b
        .step(&ForwardBatch::default())
        .unwrap()
        .next_tokens
        .is_empty());
}

#[test]
fn invalid_inputs_are_rejected_with_clear_errors() {
    let w = tiny_weights(17);
    let mut b = backend(&w, 8);
    let err = |b: &mut CandleBackend, seqs: Vec<SequenceInput>| {
        b.step(&ForwardBatch { sequences: seqs })
            .unwrap_err()
            .to_string()
    };
    let ok = input(1, &[1, 2, 3], 0, &[0], 0);
    assert!(err(&mut b, vec![input(1, &[1, 4096], 0, &[0], 0)])
        .contains("token id 4096 out of vocabulary"));
    assert!(err(&mut b, vec![input(1, &[1; 5], 0, &[0], 0)])
        .contains("block table has 1 blocks, positions 0..5 need 2"));
    assert!(err(&mut b, vec![input(1, &[1], 8, &[0, 1], 0)]).contains("need 3"));
    assert!(err(&mut b, vec![input(1, &[1], 0, &[8], 0)]).contains("block 8 out of range"));
    assert!(err(&mut b, vec![input(1, &[], 0, &[0], 0)]).contains("no tokens"));
    assert!(err(&mut b, vec![ok.clone(), input(1, &[1], 0, &[1], 0)]).contains("appears twice"));
    assert!(err(&mut b, vec![ok.clone(), input(2, &[1], 2, &[0], 0)]).contains("another sequence"));
    assert!(err(&mut b, vec![input(1, &[1], 4096, &[0; 1025], 0)]).contains("context of 4096"));
    let mut bad = ok.clone();
    bad.top_p = 0.0;
    assert!(err(&mut b, vec![bad]).contains("top_p"));
    let mut bad = ok.clone();
    bad.temperature = f32::NAN;
    assert!(err(&mut b, vec![bad]).contains("temperature"));
    // A failed step writes nothing: the KV cache is still all zeros.
    assert!(b
        .export_blocks(&[BlockId(0)])
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    // Export / import validation.
    assert!(b
        .export_blocks(&[BlockId(8)])
        .unwrap_err()
        .to_string()
        .contains("out of range"));
    assert!(b
        .export_blocks(&[BlockId(1), BlockId(1)])
        .unwrap_err()
        .to_string()
        .contains("twice"));
    let e = b
        .import_blocks(&[BlockId(1)], &[0u8; 10])
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs") && e.contains("got 10"), "{e}");
    assert!(b.export_blocks(&[]).unwrap().is_empty());
    b.step(&ForwardBatch {
        sequences: vec![ok],
    })
    .unwrap();
    // Construction errors.
    let c = LlamaConfig::test_tiny();
    assert!(CandleBackend::new(c.clone(), w.clone(), 8, 0, Device::Cpu).is_err());
    let mut other = c.clone();
    other.hidden = 64;
    let e = CandleBackend::new(other, w.clone(), 8, 4, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("embed"), "{e}");
}

#[test]
fn describe_names_model_weights_and_device() {
    let b = CandleBackend::random(LlamaConfig::test_tiny(), 42, 10, 16, Device::Cpu).unwrap();
    let d = b.describe();
    assert!(
        d.contains("llama 2L h128") && d.contains("seed 42") && d.contains("on cpu"),
        "{d}"
    );
    assert_eq!(b.kv_bytes_per_block(), 2 * 2 * 16 * 64 * 4);
}

#[test]
fn untied_lm_head_is_used() {
    let mut c = LlamaConfig::test_tiny();
    c.tie_embeddings = false;
    let w = LlamaWeights::random(&c, 1, &Device::Cpu).unwrap();
    let toks = prompt(1, 5);
    let want = reference_logits(&c, &w, &toks);
    let mut b = CandleBackend::new(c, w, 4, BS, Device::Cpu).unwrap();
    let got = b
        .forward_logits(&ForwardBatch {
            sequences: vec![input(1, &toks, 0, &[0, 1], 0)],
        })
        .unwrap();
    let d = got[0]
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-3, "{d}");
}

/// A scalar, cache-free f64 implementation of the HF Llama forward pass:
/// the logits after the last token of `tokens`.
fn reference_logits(c: &LlamaConfig, w: &LlamaWeights, tokens: &[TokenId]) -> Vec<f32> {
    let m = |t: &Tensor| -> Vec<Vec<f64>> {
        t.to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(f64::from).collect())
            .collect()
    };
    let v = |t: &Tensor| -> Vec<f64> {
        t.to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let lin = |w: &Vec<Vec<f64>>, x: &[f64]| -> Vec<f64> {
        w.iter()
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let norm = |x: &[f64], g: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + c.rms_eps).sqrt();
        x.iter().zip(g).map(|(a, g)| a * inv * g).collect()
    };
    let d = c.head_dim;
    let rope = |x: &mut [f64], pos: usize| {
        for h in 0..x.len() / d {
            let head = &mut x[h * d..(h + 1) * d];
            for i in 0..d / 2 {
                let ang = pos as f64 * c.rope_theta.powf(-2.0 * i as f64 / d as f64);
                let (a, b) = (head[i], head[i + d / 2]);
                head[i] = a * ang.cos() - b * ang.sin();
                head[i + d / 2] = b * ang.cos() + a * ang.sin();
            }
        }
    };
    let embed = m(&w.embed);
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| embed[t as usize].clone()).collect();
    for l in &w.layers {
        let (wq, wk, wv, wo) = (m(&l.wq), m(&l.wk), m(&l.wv), m(&l.wo));
        let (wg, wu, wd) = (m(&l.w_gate), m(&l.w_up), m(&l.w_down));
        let (an, fnm) = (v(&l.attn_norm), v(&l.ffn_norm));
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (p, x) in xs.iter().enumerate() {
            let h = norm(x, &an);
            let mut q = lin(&wq, &h);
            let mut k = lin(&wk, &h);
            rope(&mut q, p);
            rope(&mut k, p);
            qs.push(q);
            ks.push(k);
            vs.push(lin(&wv, &h));
        }
        for (p, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0.0; c.q_dim()];
            for h in 0..c.heads {
                let kvh = h / c.group();
                let q = &qs[p][h * d..(h + 1) * d];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][kvh * d..(kvh + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for i in 0..d {
                        att[h * d + i] += ej / z * vs[j][kvh * d + i];
                    }
                }
            }
            let o = lin(&wo, &att);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = norm(x, &fnm);
            let g = lin(&wg, &h);
            let u = lin(&wu, &h);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = lin(&wd, &act);
            x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
    }
    let h = norm(xs.last().unwrap(), &v(&w.norm));
    let head = m(w.lm_head.as_ref().unwrap_or(&w.embed));
    lin(&head, &h).into_iter().map(|x| x as f32).collect()
}

/// Throughput of the candle backend (run in release):
/// `cargo test --release -p llumen-engine candle_throughput -- --ignored --nocapture`.
/// `LLUMEN_BENCH_MODEL=smollm2` uses SmolLM2-135M's shape (random weights).
#[test]
#[ignore]
fn candle_throughput() {
    use std::time::Instant;
    let smol = std::env::var("LLUMEN_BENCH_MODEL").is_ok_and(|m| m == "smollm2");
    let config = if smol {
        LlamaConfig::smollm2_135m()
    } else {
        LlamaConfig::test_tiny()
    };
    let (steps, prefill_len) = if smol { (8, 128) } else { (64, 512) };
    let t0 = Instant::now();
    let w = LlamaWeights::random(&config, 1, &Device::Cpu).unwrap();
    eprintln!(
        "{} — random weights in {:.2} s, {} threads",
        config.shape_summary(),
        t0.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    let bs = 16;
    let modes: Vec<LinearKernel> = match std::env::var("LLUMEN_BENCH_MODES").ok().as_deref() {
        Some("default") => vec![LinearKernel::RowDot],
        _ => vec![
            LinearKernel::RowDot,
            LinearKernel::FixedChunk(16),
            LinearKernel::FixedChunk(8),
            LinearKernel::FixedChunk(1),
            LinearKernel::Batched,
        ],
    };
    let mut checksum = 0u64;
    for mode in modes {
        let new = || {
            CandleBackend::new(config.clone(), w.clone(), 1024, bs, Device::Cpu)
                .unwrap()
                .with_linear_kernel(mode)
        };
        // Decode at batch b: b sequences of 32-token prompts, prefilled one
        // step each, then `steps` decode steps of all b.
        let decode = |b: usize| {
            let mut be = new();
            let per_seq = 1024 / 16;
            let mut seqs: Vec<Seq> = (0..b)
                .map(|i| {
                    Seq::new(
                        i as u64,
                        ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect(),
                        prompt(100 + i as u64, 32),
                    )
                })
                .collect();
            for s in seqs.iter_mut() {
                run_step(&mut be, &mut [s]);
            }
            let t = Instant::now();
            for _ in 0..steps {
                let mut refs: Vec<&mut Seq> = seqs.iter_mut().collect();
                run_step(&mut be, &mut refs);
            }
            let dt = t.elapsed().as_secs_f64();
            (
                b as f64 * steps as f64 / dt,
                dt / steps as f64 * 1e3,
                seqs.swap_remove(0).logits,
            )
        };
        let (tps1, ms1, alone) = decode(1);
        let (tps16, ms16, batched) = decode(16);
        let invariant = bits(&alone) == bits(&batched);
        let mut be = new();
        let p = prompt(7, prefill_len);
        let table: Vec<u32> = (0..(prefill_len as u32).div_ceil(bs as u32)).collect();
        let t = Instant::now();
        let l = be
            .forward_logits(&ForwardBatch {
                sequences: vec![input(1, &p, 0, &table, 0)],
            })
            .unwrap();
        let pf = prefill_len as f64 / t.elapsed().as_secs_f64();
        checksum = l[0]
            .iter()
            .fold(checksum, |h, x| weights::mix64(h ^ x.to_bits() as u64));
        eprintln!(
            "{mode:?}: decode b1 {tps1:.0} tok/s ({ms1:.2} ms/step), b16 {tps16:.0} tok/s ({ms16:.2} ms/step), prefill {prefill_len} {pf:.0} tok/s; alone == in batch of 16 (bitwise): {invariant}"
        );
    }
    eprintln!("prefill logits checksum {checksum:016x}");
}
