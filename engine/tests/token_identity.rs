//! Token-for-token identity of greedy decoding through the whole engine
//! (scheduler + candle backend over the paged KV cache): a request decoded
//! alone, inside a busy batch that changes under it, after preemption and
//! recompute, and after moving (KV and all) to a second engine mid-decode
//! must produce the same tokens.

mod common;

use std::collections::BTreeMap;

use common::{engine, normal_request, BLOCK};

use llumen_engine::candle::CandleBackend;
use llumen_engine::{Engine, FinishReason, ModelBackend, Request, SeqEvent, SeqId, TokenId};

const TARGET: SeqId = 1;

fn request(id: SeqId, prompt_len: usize, max_tokens: u32, priority: u8) -> Request {
    Request {
        priority,
        ..normal_request(id, prompt_len, max_tokens)
    }
}

/// Output tokens and finish events seen so far, per sequence.
#[derive(Default)]
struct Outputs {
    tokens: BTreeMap<SeqId, Vec<TokenId>>,
    finished: BTreeMap<SeqId, (FinishReason, u32)>,
}

impl Outputs {
    fn absorb(&mut self, events: Vec<SeqEvent>) {
        for e in events {
            match e {
                SeqEvent::Token { seq, token, index } => {
                    let out = self.tokens.entry(seq).or_default();
                    assert_eq!(
                        out.len(),
                        index as usize,
                        "token indices of {seq} are contiguous"
                    );
                    out.push(token);
                }
                SeqEvent::Finished {
                    seq,
                    reason,
                    preemptions,
                    ..
                } => {
                    assert!(
                        self.finished.insert(seq, (reason, preemptions)).is_none(),
                        "{seq} finished twice"
                    );
                }
            }
        }
    }
}

/// Steps until idle (virtual clock), calling `between` before every step.
fn drive(
    engine: &mut Engine<CandleBackend>,
    out: &mut Outputs,
    mut between: impl FnMut(u64, &mut Engine<CandleBackend>),
) {
    let mut now = 0;
    for step in 0..10_000u64 {
        between(step, engine);
        if engine.scheduler().is_idle() {
            return;
        }
        let report = engine.step(now).expect("step");
        now += report.duration_us.max(1);
        out.absorb(report.events);
    }
    panic!("engine did not drain");
}

fn decode_alone() -> Vec<TokenId> {
    let mut e = engine(64);
    e.add(request(TARGET, 37, 40, 0), 0).unwrap();
    let mut out = Outputs::default();
    drive(&mut e, &mut out, |_, _| {});
    assert_eq!(out.finished[&TARGET].0, FinishReason::Length);
    out.tokens.remove(&TARGET).unwrap()
}

#[test]
fn same_tokens_inside_a_busy_changing_batch() {
    let alone = decode_alone();
    assert_eq!(alone.len(), 40);
    let mut e = engine(64);
    e.add(request(TARGET, 37, 40, 0), 0).unwrap();
    for (id, len) in [(10, 3), (11, 60), (12, 17)] {
        e.add(request(id, len, 25, 0), 0).unwrap();
    }
    let mut out = Outputs::default();
    // More requests join while the target decodes; one is cancelled.
    drive(&mut e, &mut out, |step, e| match step {
        5 => {
            e.add(request(20, 44, 12, 0), 0).unwrap();
            e.add(request(21, 5, 30, 0), 0).unwrap();
        }
        9 => assert!(e.abort(11)),
        _ => {}
    });
    assert_eq!(out.tokens[&TARGET], alone);
    assert!(e.scheduler().block_manager().check_invariants().is_ok());
}

#[test]
fn same_tokens_after_preemption_and_recompute() {
    let alone = decode_alone();
    // 12 blocks: the target (low priority, youngest) is preempted when the
    // high-priority requests grow.
    let mut e = engine(12);
    for id in [2, 3, 4] {
        e.add(request(id, 30, 60, 1), 0).unwrap();
    }
    e.add(request(TARGET, 37, 40, 0), 10).unwrap();
    let mut out = Outputs::default();
    drive(&mut e, &mut out, |_, _| {});
    let (reason, preemptions) = out.finished[&TARGET];
    assert_eq!(reason, FinishReason::Length);
    assert!(
        preemptions >= 1,
        "the target was never preempted; the test needs a smaller pool"
    );
    assert_eq!(out.tokens[&TARGET], alone);
}

#[test]
fn same_tokens_after_migrating_to_another_engine_mid_decode() {
    let alone = decode_alone();
    let mut source = engine(64);
    let mut destination = engine(64);
    source.add(request(TARGET, 37, 40, 0), 0).unwrap();
    source.add(request(30, 20, 50, 0), 0).unwrap();
    // The destination is busy too, so the target lands on other block ids.
    destination.add(request(40, 70, 30, 0), 0).unwrap();
    destination.add(request(41, 9, 30, 0), 0).unwrap();
    let (mut src_out, mut dst_out) = (Outputs::default(), Outputs::default());
    let mut now = 0;
    while src_out.tokens.get(&TARGET).map_or(0, Vec::len) < 13 {
        let r = source.step(now).unwrap();
        src_out.absorb(r.events);
        let r = destination.step(now).unwrap();
        dst_out.absorb(r.events);
        now += 1_000;
    }
    let (detached, kv) = source.detach_with_kv(TARGET, now).unwrap();
    assert_eq!(
        kv.len(),
        detached.block_table.len() * source.backend().kv_bytes_per_block()
    );
    destination.attach_with_kv(&detached, &kv, now).unwrap();
    assert!(!source.scheduler().contains(TARGET));
    // The client's stream continues: indices go on from where the source stopped.
    dst_out
        .tokens
        .insert(TARGET, src_out.tokens[&TARGET].clone());
    drive(&mut source, &mut src_out, |_, _| {});
    drive(&mut destination, &mut dst_out, |_, _| {});
    assert_eq!(
        src_out.tokens[&TARGET].len(),
        13,
        "nothing more decoded at the source"
    );
    assert_eq!(dst_out.tokens[&TARGET], alone);
    assert!(!src_out.finished.contains_key(&TARGET));
    assert_eq!(dst_out.finished[&TARGET].0, FinishReason::Length);
}

/// The staged protocol at engine level: full blocks are copied while the
/// request keeps decoding at the source; only the rest moves after it stops.
#[test]
fn same_tokens_after_a_staged_copy_while_decoding() {
    let alone = decode_alone();
    let mut source = engine(64);
    let mut destination = engine(64);
    source.add(request(TARGET, 37, 40, 0), 0).unwrap();
    destination.add(request(50, 33, 20, 0), 0).unwrap();
    let (mut src_out, mut dst_out) = (Outputs::default(), Outputs::default());
    let mut now = 0;
    let step = |source: &mut Engine<CandleBackend>, src_out: &mut Outputs, now: &mut u64| {
        src_out.absorb(source.step(*now).unwrap().events);
        *now += 1_000;
    };
    while src_out.tokens.get(&TARGET).map_or(0, Vec::len) < 5 {
        step(&mut source, &mut src_out, &mut now);
    }
    // Stage 1: the blocks full so far (37 + 4 tokens have KV: 2 full blocks).
    let reservation = destination.reserve_for_migration(4).unwrap();
    let stage1 = source.export_kv(TARGET, 0..2).unwrap();
    destination.import_kv(reservation, 0, &stage1).unwrap();
    // The request keeps decoding meanwhile.
    for _ in 0..6 {
        step(&mut source, &mut src_out, &mut now);
    }
    // Last stage: stop it, copy the rest, commit at the destination.
    let decoded_at_source = src_out.tokens[&TARGET].len();
    let detached = source.scheduler_mut().detach(TARGET).unwrap();
    let rest = source
        .backend()
        .export_blocks(&detached.block_table[2..])
        .unwrap();
    destination.import_kv(reservation, 2, &rest).unwrap();
    destination
        .commit_migration(&detached, reservation, now)
        .unwrap();
    dst_out
        .tokens
        .insert(TARGET, src_out.tokens[&TARGET].clone());
    drive(&mut destination, &mut dst_out, |_, _| {});
    assert!(decoded_at_source >= 11);
    assert_eq!(dst_out.tokens[&TARGET], alone);
    assert!(source
        .scheduler()
        .block_manager()
        .check_invariants()
        .is_ok());
    assert!(destination
        .scheduler()
        .block_manager()
        .check_invariants()
        .is_ok());
}

#[test]
fn bad_requests_are_refused_at_the_door() {
    let mut e = engine(8);
    let mut r = request(5, 4, 4, 0);
    r.prompt[2] = 4096;
    let err = e.add(r, 0).unwrap_err().to_string();
    assert!(err.contains("outside the model's vocabulary"), "{err}");
    // A prompt that can never fit the KV pool is refused too, not queued forever.
    let err = e
        .add(request(6, 8 * BLOCK + 1, 4, 0), 0)
        .unwrap_err()
        .to_string();
    assert!(!err.is_empty());
    assert!(e.scheduler().is_idle());
}
