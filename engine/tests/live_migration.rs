//! The live-migration protocol end to end: two engines (tiny random Llama on
//! the candle CPU backend), a source and a destination state machine, and an
//! in-memory link that carries encoded messages with a latency, all in
//! virtual time (one engine step = 1 ms). Every test ends with both
//! schedulers consistent, every block back in the free pool and no
//! migration left counted.

mod common;

use std::collections::{BTreeMap, VecDeque};

use common::{engine, normal_request as request, BLOCK};

use llumen_engine::candle::CandleBackend;
use llumen_engine::migration::Message;
use llumen_engine::{
    AbortReason, DestinationEvent, DestinationMigration, Engine, FinishReason, MigratedSequence,
    MigrationConfig, MigrationResult, ModelBackend, RefuseReason, ReleaseReason, SamplingParams,
    SeqEvent, SeqId, SourceEvent, SourceMigration, SourceState, TokenId,
};

const TARGET: SeqId = 1;
const MIGRATION: u64 = 77;
/// Virtual duration of one engine step.
const STEP_US: u64 = 1_000;

/// Greedy output of a request decoded alone on a fresh engine.
fn alone(prompt_len: usize, max_tokens: u32) -> Vec<TokenId> {
    let mut e = engine(128);
    e.add(request(TARGET, prompt_len, max_tokens), 0).unwrap();
    let mut out = Vec::new();
    while !e.scheduler().is_idle() {
        for ev in e.step(0).unwrap().events {
            if let SeqEvent::Token { seq, token, .. } = ev {
                assert_eq!(seq, TARGET);
                out.push(token);
            }
        }
    }
    assert_eq!(out.len(), max_tokens as usize);
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// The client's view: one token stream per request, merged from both
/// engines; indices must be contiguous. With `allow_duplicates`, an index
/// seen twice must carry the same token (the in-doubt window).
#[derive(Default)]
struct Stream {
    tokens: BTreeMap<SeqId, Vec<TokenId>>,
    finished: BTreeMap<SeqId, (Side, FinishReason)>,
    duplicates: usize,
    allow_duplicates: bool,
}

impl Stream {
    fn absorb(&mut self, side: Side, events: Vec<SeqEvent>) {
        for e in events {
            match e {
                SeqEvent::Token { seq, token, index } => {
                    let out = self.tokens.entry(seq).or_default();
                    let i = index as usize;
                    if i < out.len() {
                        assert!(
                            self.allow_duplicates,
                            "{seq}: index {i} streamed twice (from {side:?})"
                        );
                        assert_eq!(out[i], token, "{seq}: index {i} differs on {side:?}");
                        self.duplicates += 1;
                    } else {
                        assert_eq!(i, out.len(), "{seq}: token indices have a gap");
                        out.push(token);
                    }
                }
                SeqEvent::Finished { seq, reason, .. } => {
                    let first = self.finished.insert(seq, (side, reason));
                    assert!(
                        first.is_none() || self.allow_duplicates,
                        "{seq} finished twice"
                    );
                }
            }
        }
    }
    fn of(&self, seq: SeqId) -> &[TokenId] {
        self.tokens.get(&seq).map_or(&[], Vec::as_slice)
    }
}

/// Two engines, their migration state machines and the link between them.
struct World {
    src: Engine<CandleBackend>,
    dst: Engine<CandleBackend>,
    source: SourceMigration,
    dest: DestinationMigration,
    now: u64,
    /// Messages in flight: (delivery time, encoded bytes), FIFO per direction.
    to_dst: VecDeque<(u64, Vec<u8>)>,
    to_src: VecDeque<(u64, Vec<u8>)>,
    /// Link latency: base + per KV block carried.
    base_latency_us: u64,
    per_block_us: u64,
    /// Drop every message towards the destination (dead destination).
    cut_to_dst: bool,
    /// Drop these replies towards the source.
    drop_to_src: Vec<&'static str>,
    /// The source state machine is dead (its messages and calls stop).
    source_dead: bool,
    started: bool,
    stream: Stream,
    dest_events: Vec<DestinationEvent>,
    /// Messages sent, by kind, in order (source's and destination's).
    sent: Vec<(Side, &'static str)>,
    /// Every `Commit` sent: its encoded bytes besides the KV, and the
    /// outputs it carries.
    commits: Vec<(usize, usize)>,
}

impl World {
    fn new(src_blocks: usize, dst_blocks: usize, config: MigrationConfig) -> Self {
        World {
            src: engine(src_blocks),
            dst: engine(dst_blocks),
            source: SourceMigration::new(config.clone(), MIGRATION, TARGET),
            dest: DestinationMigration::new(config),
            now: 0,
            to_dst: VecDeque::new(),
            to_src: VecDeque::new(),
            base_latency_us: 700,
            per_block_us: 300,
            cut_to_dst: false,
            drop_to_src: Vec::new(),
            source_dead: false,
            started: false,
            stream: Stream::default(),
            dest_events: Vec::new(),
            sent: Vec::new(),
            commits: Vec::new(),
        }
    }

    fn latency(&self, m: &Message) -> u64 {
        let per_block = self.src.backend().kv_bytes_per_block();
        self.base_latency_us + self.per_block_us * (m.kv_bytes() / per_block) as u64
    }

    fn post(&mut self, from: Side, messages: Vec<Message>) {
        for m in messages {
            self.sent.push((from, m.kind()));
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes).as_ref(), Ok(&m));
            if let Message::Commit { sequence, .. } = &m {
                self.commits
                    .push((bytes.len() - m.kv_bytes(), sequence.new_output.len()));
            }
            let latency = self.latency(&m);
            let (queue, dropped) = match from {
                Side::Source => (&mut self.to_dst, self.cut_to_dst || self.source_dead),
                Side::Destination => (
                    &mut self.to_src,
                    self.drop_to_src.contains(&m.kind()) || self.source_dead,
                ),
            };
            if dropped {
                continue;
            }
            let at = (self.now + latency).max(queue.back().map_or(0, |b| b.0));
            queue.push_back((at, bytes));
        }
    }

    /// Starts the migration (between two steps).
    fn start(&mut self) {
        let msgs = self.source.start(&mut self.src, self.now).expect("start");
        self.started = true;
        self.post(Side::Source, msgs);
    }

    /// One tick: deliver what is due, run timeouts, step both engines.
    fn tick(&mut self) {
        while self.to_dst.front().is_some_and(|m| m.0 <= self.now) {
            let (_, bytes) = self.to_dst.pop_front().unwrap();
            let m = Message::decode(&bytes).expect("valid bytes");
            let replies = self.dest.handle(&mut self.dst, m, self.now);
            self.post(Side::Destination, replies);
        }
        while self.to_src.front().is_some_and(|m| m.0 <= self.now) {
            let (_, bytes) = self.to_src.pop_front().unwrap();
            let m = Message::decode(&bytes).expect("valid bytes");
            let replies = self
                .source
                .handle(&mut self.src, m, self.now)
                .expect("source handles the reply");
            self.post(Side::Source, replies);
        }
        if !self.source_dead && self.source.poll_timeout().is_some_and(|t| t <= self.now) {
            let msgs = self
                .source
                .handle_timeout(&mut self.src, self.now)
                .expect("timeout");
            self.post(Side::Source, msgs);
        }
        if self.dest.poll_timeout().is_some_and(|t| t <= self.now) {
            self.dest.handle_timeout(&mut self.dst, self.now);
        }
        while let Some(e) = self.dest.poll_event() {
            self.dest_events.push(e);
        }
        if !self.src.scheduler().is_idle() {
            let r = self.src.step(self.now).expect("source step");
            self.stream.absorb(Side::Source, r.events);
        }
        if self.started && !self.source_dead {
            let msgs = self.source.on_engine_step(&mut self.src, self.now);
            self.post(Side::Source, msgs);
        }
        if !self.dst.scheduler().is_idle() {
            let r = self.dst.step(self.now).expect("destination step");
            self.stream.absorb(Side::Destination, r.events);
        }
        self.check();
        self.now += STEP_US;
    }

    fn check(&self) {
        self.src
            .scheduler()
            .check_invariants()
            .expect("source invariants");
        self.dst
            .scheduler()
            .check_invariants()
            .expect("destination invariants");
    }

    /// Ticks until the target has `n` output tokens.
    fn run_until_tokens(&mut self, n: usize) {
        for _ in 0..10_000 {
            if self.stream.of(TARGET).len() >= n {
                return;
            }
            self.tick();
        }
        panic!("the target never reached {n} tokens");
    }

    fn run_until(&mut self, mut done: impl FnMut(&World) -> bool) {
        for _ in 0..10_000 {
            if done(self) {
                return;
            }
            self.tick();
        }
        panic!("condition never met");
    }

    /// Runs to the end: both engines idle, the migration over, the link empty.
    fn drain(&mut self) {
        self.run_until(|w| {
            w.src.scheduler().is_idle()
                && w.dst.scheduler().is_idle()
                && w.to_dst.is_empty()
                && w.to_src.is_empty()
                && (!w.started || w.source_dead || w.source.state().is_terminal())
                && (w.source_dead || w.dest.num_incoming() == 0)
        });
        // Let the destination forget old commits too.
        self.now += 100_000_000;
        self.tick();
        self.assert_nothing_leaked();
    }

    fn assert_nothing_leaked(&self) {
        self.check();
        for (name, e) in [("source", &self.src), ("destination", &self.dst)] {
            let bm = e.scheduler().block_manager();
            assert_eq!(
                (bm.free_blocks(), bm.reserved_blocks(), bm.used_blocks()),
                (bm.total_blocks(), 0, 0),
                "{name}: blocks leaked"
            );
            assert_eq!(e.scheduler().migrating_in(), 0, "{name}: migrating_in");
            assert_eq!(e.scheduler().migrating_out(), 0, "{name}: migrating_out");
        }
        assert_eq!(self.dest.num_incoming(), 0);
        assert_eq!(self.dest.poll_timeout(), None);
    }

    fn outcome_result(&self) -> MigrationResult {
        self.source.outcome().expect("migration over").result
    }
}

fn fast_stages() -> MigrationConfig {
    MigrationConfig {
        last_stage_max_blocks: 2,
        ..MigrationConfig::default()
    }
}

#[test]
fn multi_stage_migration_gives_the_same_greedy_output() {
    let reference = alone(120, 40);
    let mut w = World::new(64, 64, fast_stages());
    w.src.add(request(TARGET, 120, 40), 0).unwrap();
    w.src.add(request(30, 20, 50), 0).unwrap();
    // The destination is busy too: the target lands on other block ids.
    w.dst.add(request(40, 50, 30), 0).unwrap();
    w.dst.add(request(41, 9, 30), 0).unwrap();
    w.run_until_tokens(5);
    w.start();
    assert_eq!(w.src.scheduler().migrating_out(), 1);
    w.run_until(|w| w.source.state().is_terminal());
    let out = w.source.outcome().unwrap().clone();
    assert_eq!(out.result, MigrationResult::Committed);
    assert!(
        out.num_stages() >= 2,
        "stages: {:?}",
        out.blocks_per_stage()
    );
    let last = out.last_stage_blocks().unwrap();
    assert!(last <= 2, "last stage of {last} blocks");
    assert!(out.stages[0].blocks >= 7, "stage 1 copies the full blocks");
    let per_block = w.src.backend().kv_bytes_per_block() as u64;
    assert_eq!(out.bytes_copied(), out.blocks_copied() * per_block);
    let downtime = out.downtime_us.unwrap();
    assert!(
        downtime > 0 && downtime <= 2 * (700 + 2 * 300) + 2 * STEP_US,
        "{downtime}"
    );
    // The source forgot it; the destination runs it.
    assert!(!w.src.scheduler().contains(TARGET));
    assert!(w.dst.scheduler().contains(TARGET));
    assert!(w
        .dest_events
        .iter()
        .any(|e| matches!(e, DestinationEvent::Committed { seq: TARGET, .. })));
    let at_source = w.stream.of(TARGET).len();
    eprintln!(
        "multi-stage: blocks per stage {:?}, downtime {downtime} us, {} tokens at the source",
        out.blocks_per_stage(),
        at_source
    );
    w.drain();
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert_eq!(
        w.stream.finished[&TARGET],
        (Side::Destination, FinishReason::Length)
    );
    assert!(at_source > 5, "the request kept decoding during the stages");
    // Every block of the sequence at detach was copied exactly once.
    let kv_at_detach = 120 + at_source - 1;
    assert_eq!(out.blocks_copied() as usize, kv_at_detach.div_ceil(BLOCK));
    assert_eq!(w.dst.scheduler().stats().attached, 1);
    assert_eq!(w.dest.stats().committed, 1);
    assert_eq!(w.dest.stats().stages as usize, out.num_stages());
    for id in [30, 40, 41] {
        assert!(w.stream.finished.contains_key(&id));
    }
}

/// Downtime is the last stage, whose size does not grow with the sequence.
#[test]
fn the_last_stage_does_not_grow_with_the_sequence() {
    // Also: the `Commit`'s bytes besides the KV, less 4 per output it
    // carries (the outputs since `Reserve`): the same for every length,
    // the prompt went with `Reserve`.
    let mut commit_fixed_bytes = Vec::new();
    let mut run = |prompt_len: usize, config: MigrationConfig| {
        let reference = alone(prompt_len, 40);
        let mut w = World::new(64, 64, config);
        w.src.add(request(TARGET, prompt_len, 40), 0).unwrap();
        w.run_until_tokens(2);
        w.start();
        w.drain();
        assert_eq!(w.stream.of(TARGET), reference.as_slice());
        assert_eq!(w.stream.finished[&TARGET].0, Side::Destination);
        let out = w.source.outcome().unwrap().clone();
        assert!(out.committed());
        let [(bytes, outputs)] = w.commits[..] else {
            panic!("one Commit, not {:?}", w.commits);
        };
        assert!(outputs < 40, "the Commit carried {outputs} outputs");
        commit_fixed_bytes.push(bytes - 4 * outputs);
        out
    };
    let config = MigrationConfig::default(); // 16-block last stage, 3 pre-copies
    let short = run(100, config.clone());
    let long = run(700, config.clone());
    let stop_and_copy = run(
        700,
        MigrationConfig {
            max_precopy_stages: 0,
            ..config
        },
    );
    // The short one fits the last stage at once; the long one copies its
    // bulk while decoding and stops only for a few blocks.
    assert_eq!(short.num_stages(), 1);
    assert!(long.num_stages() >= 2);
    for o in [&short, &long] {
        assert!(
            o.last_stage_blocks().unwrap() <= 16,
            "{:?}",
            o.blocks_per_stage()
        );
    }
    assert!(long.last_stage_blocks().unwrap() <= short.last_stage_blocks().unwrap());
    assert!(long.blocks_copied() >= 44);
    let (d_short, d_long, d_full) = (
        short.downtime_us.unwrap(),
        long.downtime_us.unwrap(),
        stop_and_copy.downtime_us.unwrap(),
    );
    for (name, o) in [
        ("short", &short),
        ("long", &long),
        ("stop-and-copy", &stop_and_copy),
    ] {
        eprintln!(
            "{name}: blocks per stage {:?}, downtime {:?} us",
            o.blocks_per_stage(),
            o.downtime_us
        );
    }
    assert!(
        d_long <= d_short + STEP_US,
        "downtime {d_long} vs {d_short}"
    );
    assert!(stop_and_copy.last_stage_blocks().unwrap() >= 44);
    assert!(
        d_full > 3 * d_long,
        "stop-and-copy {d_full} vs staged {d_long}"
    );
    assert!(
        commit_fixed_bytes.windows(2).all(|w| w[0] == w[1]) && commit_fixed_bytes[0] < 200,
        "Commit bytes besides KV and outputs: {commit_fixed_bytes:?}"
    );
}

#[test]
fn a_destination_without_blocks_refuses_and_the_request_carries_on() {
    let reference = alone(120, 30);
    // 6 blocks: the 8-block sequence does not fit.
    let mut w = World::new(64, 6, fast_stages());
    w.src.add(request(TARGET, 120, 30), 0).unwrap();
    w.run_until_tokens(3);
    w.start();
    w.run_until(|w| w.source.state().is_terminal());
    assert_eq!(
        w.outcome_result(),
        MigrationResult::Refused {
            reason: RefuseReason::OutOfBlocks,
            requeued: false
        }
    );
    assert!(w.src.scheduler().contains(TARGET));
    assert_eq!(w.source.outcome().unwrap().num_stages(), 0);
    w.drain();
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert_eq!(w.stream.finished[&TARGET].0, Side::Source);
    assert_eq!(w.src.scheduler().stats().detached, 0);
}

#[test]
fn a_taken_migration_slot_refuses_and_the_request_carries_on() {
    let reference = alone(120, 30);
    let mut w = World::new(64, 64, fast_stages());
    w.src.add(request(TARGET, 120, 30), 0).unwrap();
    // Another source's migration holds the only slot.
    let other = w.dest.handle(
        &mut w.dst,
        Message::Reserve {
            migration_id: 500,
            seq: 900,
            block_size: BLOCK as u32,
            blocks_needed: 4,
            prompt: vec![1, 2, 3],
            output: vec![4],
        },
        0,
    );
    assert_eq!(
        other,
        vec![Message::Reserved {
            migration_id: 500,
            blocks: 4
        }]
    );
    assert_eq!(w.dst.scheduler().block_manager().reserved_blocks(), 4);
    w.run_until_tokens(3);
    w.start();
    w.run_until(|w| w.source.state().is_terminal());
    assert_eq!(
        w.outcome_result(),
        MigrationResult::Refused {
            reason: RefuseReason::NoSlot,
            requeued: false
        }
    );
    // The other migration aborts; its reservation goes back.
    let now = w.now;
    let r = w.dest.handle(
        &mut w.dst,
        Message::Abort {
            migration_id: 500,
            reason: AbortReason::Cancelled,
        },
        now,
    );
    assert!(r.is_empty());
    assert_eq!(w.dst.scheduler().block_manager().reserved_blocks(), 0);
    w.drain();
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert_eq!(w.stream.finished[&TARGET].0, Side::Source);
}

#[test]
fn a_request_finishing_during_a_stage_aborts_the_migration() {
    let reference = alone(120, 12);
    let mut w = World::new(64, 64, fast_stages());
    // A slow link: stage 1 outlasts the request's last tokens.
    w.per_block_us = 3_000;
    w.src.add(request(TARGET, 120, 12), 0).unwrap();
    w.run_until_tokens(8);
    w.start();
    w.run_until(|w| w.source.state().is_terminal());
    assert_eq!(
        w.outcome_result(),
        MigrationResult::Aborted {
            reason: AbortReason::RequestGone,
            requeued: false
        }
    );
    let out = w.source.outcome().unwrap();
    assert_eq!(out.num_stages(), 1, "aborted during stage 1");
    assert_eq!(out.detached_us, None);
    assert_eq!(
        w.stream.finished[&TARGET],
        (Side::Source, FinishReason::Length)
    );
    w.drain();
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert!(w.dest_events.iter().any(|e| matches!(
        e,
        DestinationEvent::Released {
            reason: ReleaseReason::SourceAborted(AbortReason::RequestGone),
            ..
        }
    )));
    assert_eq!(w.dst.scheduler().stats().attached, 0);
}

#[test]
fn a_client_abort_during_a_stage_aborts_the_migration() {
    let reference = alone(120, 40);
    let mut w = World::new(64, 64, fast_stages());
    w.per_block_us = 2_000;
    w.src.add(request(TARGET, 120, 40), 0).unwrap();
    w.run_until_tokens(4);
    w.start();
    w.run_until(|w| matches!(w.source.state(), SourceState::Copying { .. }));
    w.tick();
    assert!(w.src.abort(TARGET), "the client cancels at the source");
    w.run_until(|w| w.source.state().is_terminal());
    assert_eq!(
        w.outcome_result(),
        MigrationResult::Aborted {
            reason: AbortReason::RequestGone,
            requeued: false
        }
    );
    w.drain();
    let got = w.stream.of(TARGET);
    assert_eq!(got, &reference[..got.len()]);
    assert!(!w.stream.finished.contains_key(&TARGET));
    assert_eq!(w.dst.scheduler().stats().attached, 0);
    assert_eq!(w.dest.stats().released, 1);
}

#[test]
fn a_client_abort_while_in_transit_removes_the_committed_copy() {
    let reference = alone(120, 40);
    let mut w = World::new(64, 64, fast_stages());
    w.src.add(request(TARGET, 120, 40), 0).unwrap();
    w.run_until_tokens(4);
    w.start();
    w.run_until(|w| w.source.state() == SourceState::Committing);
    let now = w.now;
    let msgs = w.source.cancel_request(&mut w.src, now);
    assert!(msgs.is_empty(), "nothing to say until the commit answers");
    w.run_until(|w| w.source.state().is_terminal());
    assert_eq!(
        w.outcome_result(),
        MigrationResult::Aborted {
            reason: AbortReason::ClientAborted,
            requeued: false
        }
    );
    w.drain();
    assert!(w.dest_events.iter().any(|e| matches!(
        e,
        DestinationEvent::AbortedAfterCommit {
            seq: TARGET,
            aborted: true,
            ..
        }
    )));
    let got = w.stream.of(TARGET);
    assert_eq!(got, &reference[..got.len()]);
    assert!(!w.stream.finished.contains_key(&TARGET));
    assert!(!w.src.scheduler().contains(TARGET) && !w.dst.scheduler().contains(TARGET));
}

/// The sequence outgrows its reservation while the destination fills up:
/// the commit cannot grow it, the destination refuses, the source requeues
/// and recomputes, and the output is unchanged.
#[test]
fn a_failed_commit_requeues_at_the_source() {
    let reference = alone(45, 30);
    let config = MigrationConfig {
        reserve_slack_blocks: 0,
        ..MigrationConfig::default()
    };
    // 12 blocks, no watermark.
    let mut w = World::new(64, 12, config);
    w.base_latency_us = 3_000;
    w.src.add(request(TARGET, 45, 30), 0).unwrap();
    // 45 + 1 tokens: KV of 45 tokens in 3 blocks, 3 tokens from the 4th.
    w.run_until_tokens(1);
    w.start();
    w.run_until(|w| w.dest.num_incoming() == 1);
    assert_eq!(w.dst.scheduler().block_manager().reserved_blocks(), 3);
    // Another request takes the 9 blocks the reservation left.
    w.dst.add(request(60, 129, 8), w.now).unwrap();
    w.run_until(|w| w.source.state().is_terminal());
    let out = w.source.outcome().unwrap().clone();
    assert_eq!(
        out.result,
        MigrationResult::Refused {
            reason: RefuseReason::OutOfBlocks,
            requeued: true
        }
    );
    assert_eq!(out.num_stages(), 1);
    assert_eq!(out.last_stage_blocks(), Some(4));
    assert!(out.downtime_us.is_some());
    assert_eq!(w.dst.scheduler().block_manager().reserved_blocks(), 0);
    assert!(
        w.src.scheduler().contains(TARGET),
        "back in the source's queue"
    );
    assert_eq!(w.src.scheduler().stats().requeued, 1);
    w.drain();
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert_eq!(w.stream.finished[&TARGET].0, Side::Source);
    assert!(w.src.scheduler().stats().tokens_recomputed > 0);
    assert!(w.stream.finished.contains_key(&60));
}

#[test]
fn a_destination_frees_an_orphaned_reservation() {
    let reference = alone(120, 40);
    let config = MigrationConfig {
        destination_idle_timeout_us: 50_000,
        ..fast_stages()
    };
    let mut w = World::new(64, 64, config);
    w.src.add(request(TARGET, 120, 40), 0).unwrap();
    w.run_until_tokens(3);
    w.start();
    w.run_until(|w| w.dest.num_incoming() == 1);
    // The source dies right after its Reserve went out.
    w.source_dead = true;
    w.to_src.clear();
    let reserved_at = w.now;
    assert!(w.dst.scheduler().block_manager().reserved_blocks() > 0);
    assert_eq!(w.dst.scheduler().migrating_in(), 1);
    w.run_until(|w| w.dest.num_incoming() == 0);
    assert!(
        w.now - reserved_at >= 49_000,
        "freed only after the timeout"
    );
    assert_eq!(w.dst.scheduler().block_manager().reserved_blocks(), 0);
    assert_eq!(w.dst.scheduler().migrating_in(), 0);
    assert!(w.dest_events.iter().any(|e| matches!(
        e,
        DestinationEvent::Released {
            reason: ReleaseReason::Timeout,
            ..
        }
    )));
    assert_eq!(w.dest.stats().timed_out, 1);
    // A straggler from the dead source is refused.
    let now = w.now;
    let per_block = w.dst.backend().kv_bytes_per_block();
    let r = w.dest.handle(
        &mut w.dst,
        Message::Blocks {
            migration_id: MIGRATION,
            stage: 1,
            first_block_index: 0,
            num_blocks: 1,
            data: vec![0; per_block],
        },
        now,
    );
    assert_eq!(
        r,
        vec![Message::Refused {
            migration_id: MIGRATION,
            reason: RefuseReason::UnknownMigration
        }]
    );
    // The request, never detached, finishes at the source. (The dead
    // source's migration counter is the host's to reset.)
    w.src.scheduler_mut().set_migrating_out(0);
    w.drain();
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert_eq!(w.stream.finished[&TARGET].0, Side::Source);
}

#[test]
fn a_source_times_out_when_the_destination_never_answers() {
    let reference = alone(120, 40);
    let config = MigrationConfig {
        source_reply_timeout_us: 20_000,
        ..fast_stages()
    };
    let mut w = World::new(64, 64, config);
    w.cut_to_dst = true;
    w.src.add(request(TARGET, 120, 40), 0).unwrap();
    w.run_until_tokens(3);
    let started = w.now;
    w.start();
    w.run_until(|w| w.source.state().is_terminal());
    assert!(w.now - started >= 20_000);
    assert_eq!(
        w.outcome_result(),
        MigrationResult::Aborted {
            reason: AbortReason::Timeout,
            requeued: false
        }
    );
    assert_eq!(w.source.poll_timeout(), None);
    assert_eq!(w.sent.last(), Some(&(Side::Source, "Abort")));
    w.drain();
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert_eq!(w.stream.finished[&TARGET].0, Side::Source);
    assert_eq!(w.src.scheduler().stats().detached, 0);
}

/// A link slow enough that the first stage alone outlasts both timeouts:
/// with the transfer allowance (the link is twice the trusted minimum rate)
/// the migration commits; with none, the same link times the source out
/// and the request simply carries on. Either way the output is the
/// reference and nothing leaks.
#[test]
fn a_big_stage_on_a_slow_link_gets_time_in_proportion_to_its_bytes() {
    let reference = alone(120, 200);
    for allowance in [true, false] {
        let per_block_us = 4_000;
        let probe = World::new(64, 64, fast_stages());
        let per_block = probe.src.backend().kv_bytes_per_block() as u64;
        let link_bytes_per_s = per_block * 1_000_000 / per_block_us;
        let config = MigrationConfig {
            source_reply_timeout_us: 10_000,
            destination_idle_timeout_us: 10_000,
            min_transfer_bytes_per_s: if allowance { link_bytes_per_s / 2 } else { 0 },
            ..fast_stages()
        };
        let mut w = World::new(64, 64, config);
        w.per_block_us = per_block_us;
        w.src.add(request(TARGET, 120, 200), 0).unwrap();
        w.run_until_tokens(3);
        w.start();
        w.run_until(|w| w.source.state().is_terminal());
        let out = w.source.outcome().unwrap().clone();
        let first_stage_us = out.stages[0].acked_us.map(|a| a - out.stages[0].sent_us);
        if allowance {
            assert_eq!(out.result, MigrationResult::Committed);
            // 7 full blocks at 4 ms each: over twice the reply timeout.
            assert!(first_stage_us.unwrap() > 20_000, "{first_stage_us:?}");
        } else {
            assert_eq!(
                out.result,
                MigrationResult::Aborted {
                    reason: AbortReason::Timeout,
                    requeued: false
                }
            );
            assert_eq!(first_stage_us, None);
        }
        w.drain();
        assert_eq!(
            w.stream.of(TARGET),
            reference.as_slice(),
            "allowance {allowance}"
        );
        let finished_at = if allowance {
            Side::Destination
        } else {
            Side::Source
        };
        assert_eq!(w.stream.finished[&TARGET].0, finished_at);
    }
}

#[test]
fn the_transfer_allowance_is_bytes_over_the_trusted_rate() {
    let config = MigrationConfig {
        min_transfer_bytes_per_s: 50_000_000,
        ..MigrationConfig::default()
    };
    assert_eq!(config.transfer_allowance_us(0), 0);
    // SmolLM2's first stage at 8k tokens: 372 MB → 7.4 s.
    assert_eq!(config.transfer_allowance_us(371_589_120), 7_431_782);
    assert_eq!(config.transfer_allowance_us(u64::MAX), u64::MAX / 50);
    let crawl = MigrationConfig {
        min_transfer_bytes_per_s: 1,
        ..config.clone()
    };
    assert_eq!(crawl.transfer_allowance_us(u64::MAX), u64::MAX);
    let none = MigrationConfig {
        min_transfer_bytes_per_s: 0,
        ..config
    };
    assert_eq!(none.transfer_allowance_us(1 << 40), 0);
}

/// The in-doubt window: the destination commits but its `Committed` is
/// lost. The source times out, requeues, and its `Abort` removes the
/// destination's copy: one copy survives, and what the destination streamed
/// in between repeats the same tokens at the same indices.
#[test]
fn a_lost_commit_reply_requeues_and_removes_the_committed_copy() {
    let reference = alone(120, 40);
    let config = MigrationConfig {
        source_reply_timeout_us: 10_000,
        ..fast_stages()
    };
    let mut w = World::new(64, 64, config);
    w.drop_to_src = vec!["Committed"];
    w.stream.allow_duplicates = true;
    w.src.add(request(TARGET, 120, 40), 0).unwrap();
    w.run_until_tokens(4);
    w.start();
    w.run_until(|w| w.source.state().is_terminal());
    let out = w.source.outcome().unwrap().clone();
    assert_eq!(
        out.result,
        MigrationResult::Aborted {
            reason: AbortReason::Timeout,
            requeued: true
        }
    );
    assert!(w.src.scheduler().contains(TARGET));
    w.drain();
    assert!(w.dest_events.iter().any(|e| matches!(
        e,
        DestinationEvent::AbortedAfterCommit {
            seq: TARGET,
            reason: AbortReason::Timeout,
            aborted: true,
            ..
        }
    )));
    assert!(w.stream.duplicates > 0, "the destination decoded meanwhile");
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert_eq!(w.stream.finished[&TARGET].0, Side::Source);
}

/// A link too slow for the copy to converge: the last stage comes after
/// `max_precopy_stages` pre-copy stages anyway.
#[test]
fn pre_copy_stages_are_capped() {
    let reference = alone(40, 150);
    let config = MigrationConfig {
        last_stage_max_blocks: 0,
        max_precopy_stages: 3,
        ..MigrationConfig::default()
    };
    let mut w = World::new(64, 64, config);
    // One block per 16 ms: the request fills a block while one is copied.
    w.per_block_us = 16_000;
    w.src.add(request(TARGET, 40, 150), 0).unwrap();
    w.run_until_tokens(3);
    w.start();
    w.drain();
    let out = w.source.outcome().unwrap().clone();
    eprintln!(
        "capped: blocks per stage {:?}, downtime {:?} us",
        out.blocks_per_stage(),
        out.downtime_us
    );
    assert!(out.committed());
    assert_eq!(out.num_stages(), 4, "{:?}", out.blocks_per_stage());
    assert!(out.stages[3].last && !out.stages[2].last);
    assert!(out.stages.iter().all(|s| s.blocks > 0));
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert_eq!(w.stream.finished[&TARGET].0, Side::Destination);
}

/// Preempted at the source during a stage: its KV is being recomputed in
/// other blocks, so the migration aborts and the request carries on there.
#[test]
fn a_preemption_during_a_stage_aborts_the_migration() {
    let reference = alone(37, 40);
    let mut w = World::new(12, 64, fast_stages());
    w.per_block_us = 5_000;
    // The high-priority requests grow and push the target out.
    for id in [2, 3, 4] {
        let mut r = request(id, 30, 60);
        r.priority = 1;
        w.src.add(r, 0).unwrap();
    }
    w.src.add(request(TARGET, 37, 40), 10).unwrap();
    w.run_until(|w| {
        !w.stream.of(TARGET).is_empty() && w.src.scheduler().running_ids().contains(&TARGET)
    });
    w.start();
    w.run_until(|w| w.source.state().is_terminal());
    assert_eq!(
        w.outcome_result(),
        MigrationResult::Aborted {
            reason: AbortReason::Preempted,
            requeued: false
        }
    );
    w.drain();
    assert_eq!(w.stream.of(TARGET), reference.as_slice());
    assert_eq!(w.stream.finished[&TARGET].0, Side::Source);
    assert!(w.src.scheduler().stats().preemptions > 0);
    assert_eq!(w.dst.scheduler().stats().attached, 0);
}

#[test]
fn misdirected_unexpected_and_inconsistent_messages_change_nothing() {
    let reserve =
        |migration_id, seq, block_size: u32, blocks_needed, prompt, output| Message::Reserve {
            migration_id,
            seq,
            block_size,
            blocks_needed,
            prompt,
            output,
        };
    let blocks = |migration_id, first_block_index, num_blocks, data| Message::Blocks {
        migration_id,
        stage: 1,
        first_block_index,
        num_blocks,
        data,
    };
    let refused = |migration_id, reason| {
        vec![Message::Refused {
            migration_id,
            reason,
        }]
    };
    let mut w = World::new(64, 64, fast_stages());
    w.src.add(request(TARGET, 120, 40), 0).unwrap();
    w.run_until_tokens(2);
    let now = w.now;
    // Not started yet: a reply is unexpected.
    let err = w
        .source
        .handle(
            &mut w.src,
            Message::Reserved {
                migration_id: MIGRATION,
                blocks: 9,
            },
            now,
        )
        .unwrap_err();
    assert!(err.to_string().contains("unexpected Reserved"), "{err}");
    assert_eq!(w.source.state(), SourceState::Idle);
    // Another migration's message.
    assert!(w
        .source
        .handle(&mut w.src, Message::Committed { migration_id: 5 }, now)
        .is_err());
    // Start twice.
    w.start();
    assert!(w.source.start(&mut w.src, now).is_err());
    assert_eq!(w.source.state(), SourceState::Reserving);
    // A waiting or unknown request cannot be migrated.
    let mut other = SourceMigration::new(fast_stages(), 8, 999);
    assert!(other.start(&mut w.src, now).is_err());
    assert_eq!(w.src.scheduler().migrating_out(), 1);

    // Destination: a stage out of order is a protocol violation; the
    // reservation goes.
    let mut d = DestinationMigration::new(fast_stages());
    let r = d.handle(
        &mut w.dst,
        reserve(9, 5, BLOCK as u32, 3, vec![1, 2, 3], vec![4]),
        now,
    );
    assert_eq!(
        r,
        vec![Message::Reserved {
            migration_id: 9,
            blocks: 3
        }]
    );
    let per_block = w.dst.backend().kv_bytes_per_block();
    let r = d.handle(&mut w.dst, blocks(9, 1, 1, vec![0; per_block]), now);
    assert_eq!(r, refused(9, RefuseReason::ProtocolViolation));
    assert_eq!(d.num_incoming(), 0);
    // Wrong block size, and data that does not match its block count.
    let r = d.handle(
        &mut w.dst,
        reserve(10, 5, 8, 3, vec![1, 2, 3], vec![4]),
        now,
    );
    assert_eq!(r, refused(10, RefuseReason::BlockSizeMismatch));
    d.handle(
        &mut w.dst,
        reserve(11, 5, BLOCK as u32, 3, vec![1, 2, 3], vec![4]),
        now,
    );
    let r = d.handle(&mut w.dst, blocks(11, 0, 2, vec![0; per_block]), now);
    assert_eq!(r, refused(11, RefuseReason::ProtocolViolation));
    // A `Reserve` without a prompt, and a `Commit` whose outputs do not
    // continue the ones `Reserve` carried, are protocol violations; a
    // history longer than this instance can ever hold is refused at once.
    let r = d.handle(
        &mut w.dst,
        reserve(12, 6, BLOCK as u32, 1, Vec::new(), Vec::new()),
        now,
    );
    assert_eq!(r, refused(12, RefuseReason::ProtocolViolation));
    let too_long = w.dst.scheduler().config().max_total_tokens();
    let r = d.handle(
        &mut w.dst,
        reserve(12, 6, BLOCK as u32, 1, vec![1; too_long], vec![2]),
        now,
    );
    assert_eq!(r, refused(12, RefuseReason::OutOfBlocks));
    d.handle(
        &mut w.dst,
        reserve(13, 6, BLOCK as u32, 1, vec![1, 2, 3], vec![4, 5]),
        now,
    );
    let r = d.handle(
        &mut w.dst,
        Message::Commit {
            migration_id: 13,
            stage: 1,
            sequence: Box::new(MigratedSequence {
                id: 6,
                output_from: 1,
                new_output: vec![6],
                sampling: SamplingParams::greedy(10),
                priority: 0,
                headroom_blocks: 0,
                arrival_us: 0,
                preemptions: 0,
                tokens_recomputed: 0,
                block_size: BLOCK,
                kv_tokens: 5,
            }),
            first_block_index: 0,
            num_blocks: 1,
            data: vec![0; per_block],
        },
        now,
    );
    assert_eq!(r, refused(13, RefuseReason::ProtocolViolation));
    assert_eq!(d.num_incoming(), 0);
    // Replies a destination never takes are ignored.
    assert!(d
        .handle(&mut w.dst, Message::Committed { migration_id: 11 }, now)
        .is_empty());
    assert_eq!(d.stats().ignored, 1);
    assert_eq!(w.dst.scheduler().block_manager().reserved_blocks(), 0);
    assert_eq!(w.dst.scheduler().migrating_in(), 0);
    // The real migration still goes through.
    w.drain();
    assert!(w.source.outcome().unwrap().committed());
}

/// A detached request that cannot go back in the source's queue (here its
/// id was taken meanwhile) is not dropped: the end event hands it over,
/// with its token history, for the host to place again.
#[test]
fn a_requeue_that_fails_after_detach_hands_the_request_over_in_the_end_event() {
    let mut w = World::new(64, 64, fast_stages());
    w.src.add(request(TARGET, 120, 40), 0).unwrap();
    w.run_until_tokens(4);
    w.start();
    w.run_until(|w| w.source.state() == SourceState::Committing);
    // The source's queue now refuses the sequence back.
    w.src.add(request(TARGET, 16, 4), w.now).unwrap();
    let deadline = w.source.poll_timeout().expect("waiting for Committed");
    let result = w.source.handle_timeout(&mut w.src, deadline);
    assert!(
        matches!(result, Err(llumen_engine::MigrationError::Requeue(_))),
        "{result:?}"
    );
    match w.source.poll_event() {
        Some(SourceEvent::Ended { outcome, stranded }) => {
            assert_eq!(
                outcome.result,
                MigrationResult::Aborted {
                    reason: AbortReason::Timeout,
                    requeued: false
                }
            );
            let stranded = stranded.expect("the detached sequence is handed over");
            assert_eq!(stranded.id, TARGET);
            assert_eq!(stranded.output.len(), w.stream.of(TARGET).len());
        }
        other => panic!("expected the end event, got {other:?}"),
    }
    assert_eq!(w.source.poll_event(), None, "one end event");
}
