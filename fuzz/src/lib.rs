//! Seeded, structure-aware fuzzing of everything llumen parses from the
//! network: the QUIC frame decoder (with the server's per-kind limits), the
//! migration chunk header, the engine's live-migration messages, the load
//! snapshot codec and the admin gate (token check + command parsing).
//!
//! **Owns**: input generation (valid values of every frame and message
//! kind, then byte-level mutations: bit flips, overwrites, insertions,
//! deletions, truncations, duplicated ranges, forged length prefixes,
//! splices), the feeding of inputs in random splits as a stream delivers
//! them, the invariants checked on every execution, and the counts.
//! **Never touches**: sockets, files, clocks (a run is a pure function of
//! its seed and execution count, so a failure replays from the seed it
//! prints), the server's state.
//!
//! Invariants, per execution: no panic; an unmutated input decodes to
//! exactly what was encoded; whatever a decoder accepts re-encodes to bytes
//! that decode to the same value; the frame decoder never buffers more than
//! one frame's limit plus the bytes of the latest read; a wrong admin token
//! is refused whatever the command; a frame is refused by its kind's limit
//! as soon as its header arrives.
//!
//! `cargo run --release -p llumen-fuzz -- --executions 10000000` is the
//! dedicated run; `fuzz/tests/short_run.rs` runs every target briefly in CI.

use std::fmt;

use llumen_engine::{
    AbortReason, MigratedSequence, MigrationMessage, RefuseReason, SamplingParams, SplitMix64,
};
use llumen_host::front::admin::{self, AdminCommand};
use llumen_host::front::api::{
    ChatTurn, ErrorCode, FinishReason, FinishRecord, GenerateRequest, PromptInput, ServeError,
    TokenChunk,
};
use llumen_host::transport::protocol::{
    self, decode, encode, limit_by_kind, parse_migration_chunk_header, Assignment, Frame,
    FrameDecoder, JoinInfo, LEN_BYTES, MAX_ADMIN_FRAME, MIGRATION_CHUNK_HEADER,
};
use llumen_policy_logic::InstanceLoad;
use llumen_store::codec::{decode_snapshot, encode_snapshot};

/// A fuzz target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Frames,
    ChunkHeader,
    Migration,
    Snapshot,
    Admin,
}

impl Target {
    pub const ALL: [Target; 5] = [
        Target::Frames,
        Target::ChunkHeader,
        Target::Migration,
        Target::Snapshot,
        Target::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Frames => "frames",
            Target::ChunkHeader => "chunk-header",
            Target::Migration => "migration",
            Target::Snapshot => "snapshot",
            Target::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a run of one target did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub executions: u64,
    /// Inputs left unmutated (must decode exactly).
    pub pristine: u64,
    /// Values a decoder accepted (pristine or not).
    pub accepted: u64,
    /// Inputs refused with a typed error.
    pub refused: u64,
    /// Bytes fed to the decoders.
    pub bytes: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.executions += o.executions;
        self.pristine += o.pristine;
        self.accepted += o.accepted;
        self.refused += o.refused;
        self.bytes += o.bytes;
    }
}

/// Runs inputs number `executions` (a range, so that threads can share a
/// run) of `target` from `seed`: input `i` depends on `seed` and `i` only.
/// Panics (with the seed and execution number to replay) when an
/// invariant breaks.
pub fn run(target: Target, seed: u64, executions: std::ops::Range<u64>) -> Counts {
    let mut counts = Counts::default();
    for i in executions {
        let mut rng = SplitMix64(seed ^ i.wrapping_mul(0xA076_1D64_78BD_642F));
        let replay = || format!("target {target}, seed {seed}, execution {i}");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match target {
            Target::Frames => frames(&mut rng, &mut counts),
            Target::ChunkHeader => chunk_header(&mut rng, &mut counts),
            Target::Migration => migration(&mut rng, &mut counts),
            Target::Snapshot => snapshot(&mut rng, &mut counts),
            Target::Admin => admin_gate(&mut rng, &mut counts),
        }));
        if let Err(e) = result {
            let what = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("fuzz failure ({}): {what}", replay());
        }
        counts.executions += 1;
    }
    counts
}

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

fn below(rng: &mut SplitMix64, n: u64) -> u64 {
    rng.next_u64() % n.max(1)
}

fn chance(rng: &mut SplitMix64, one_in: u64) -> bool {
    below(rng, one_in) == 0
}

/// A length: mostly small, sometimes at interesting sizes.
fn size(rng: &mut SplitMix64, max: usize) -> usize {
    match below(rng, 8) {
        0 => 0,
        1 => 1,
        2 => max,
        _ => below(rng, max as u64 + 1) as usize,
    }
}

fn text(rng: &mut SplitMix64, max: usize) -> String {
    const PIECES: [&str; 8] = ["a", "Z", " ", "\n", "é", "✓", "🦀", "\0"];
    (0..size(rng, max))
        .map(|_| PIECES[below(rng, PIECES.len() as u64) as usize])
        .collect()
}

fn bytes(rng: &mut SplitMix64, max: usize) -> Vec<u8> {
    (0..size(rng, max)).map(|_| rng.next_u64() as u8).collect()
}

fn ids(rng: &mut SplitMix64, max: usize) -> Vec<u32> {
    (0..size(rng, max))
        .map(|_| match below(rng, 4) {
            0 => rng.next_u64() as u32,
            _ => below(rng, 50_000) as u32,
        })
        .collect()
}

fn unit_f32(rng: &mut SplitMix64) -> f32 {
    (below(rng, 1001) as f32) / 1000.0
}

fn any_u32(rng: &mut SplitMix64) -> u32 {
    match below(rng, 4) {
        0 => 0,
        1 => u32::MAX,
        _ => rng.next_u64() as u32,
    }
}

fn load(rng: &mut SplitMix64) -> InstanceLoad {
    InstanceLoad {
        instance: any_u32(rng),
        timestamp_us: rng.next_u64(),
        block_size: any_u32(rng),
        total_blocks: any_u32(rng),
        used_blocks: any_u32(rng),
        watermark_blocks: any_u32(rng),
        running: any_u32(rng),
        waiting: any_u32(rng),
        preempted: any_u32(rng),
        head_of_line_demand_blocks: any_u32(rng),
        waiting_demand_blocks: any_u32(rng),
        high_priority_requests: any_u32(rng),
        headroom_blocks: any_u32(rng),
        migrating_out: any_u32(rng),
        migrating_in: any_u32(rng),
        step_latency_us: any_u32(rng),
        draining: chance(rng, 2),
    }
}

/// A valid frame of any kind.
pub fn frame(rng: &mut SplitMix64) -> Frame {
    match below(rng, 17) {
        0..=2 => {
            let mut g = GenerateRequest::text(text(rng, 40), any_u32(rng));
            g.input = match below(rng, 3) {
                0 => PromptInput::Text(text(rng, 60)),
                1 => PromptInput::Tokens(ids(rng, 40)),
                _ => PromptInput::Chat(
                    (0..size(rng, 4))
                        .map(|_| ChatTurn {
                            role: text(rng, 8),
                            content: text(rng, 30),
                        })
                        .collect(),
                ),
            };
            g.temperature = unit_f32(rng) * 2.0;
            g.top_p = unit_f32(rng);
            g.seed = rng.next_u64();
            g.priority = rng.next_u64() as u8;
            g.stop = (0..size(rng, 3)).map(|_| text(rng, 6)).collect();
            g.stop_token_ids = ids(rng, 4);
            g.ignore_eos = chance(rng, 2);
            Frame::Generate(g)
        }
        3 => Frame::Tokens(TokenChunk {
            index: any_u32(rng),
            ids: ids(rng, 16),
            text: text(rng, 20),
        }),
        4 => Frame::Finished(FinishRecord {
            request_id: rng.next_u64(),
            reason: if chance(rng, 2) {
                FinishReason::Stop
            } else {
                FinishReason::Length
            },
            prompt_tokens: any_u32(rng),
            completion_tokens: any_u32(rng),
            queue_us: rng.next_u64(),
            ttft_us: rng.next_u64(),
            total_us: rng.next_u64(),
            instance: any_u32(rng),
            moves: any_u32(rng),
        }),
        5 => Frame::Error(ServeError::new(
            ErrorCode::ALL[below(rng, ErrorCode::ALL.len() as u64) as usize],
            text(rng, 30),
        )),
        6 => Frame::Admin {
            token: text(rng, 64),
            command_json: admin_json(rng),
            blob: bytes(rng, 200),
        },
        7 => Frame::AdminReply {
            json: text(rng, 80),
        },
        8 => Frame::Join(JoinInfo {
            token: text(rng, 64),
            model: text(rng, 10),
            block_size: any_u32(rng),
            total_blocks: any_u32(rng),
            max_model_len: any_u32(rng),
            migration_addr: text(rng, 20),
        }),
        9 => Frame::Welcome {
            instance: any_u32(rng),
        },
        10 => Frame::Load(load(rng)),
        11 => Frame::Assign(Assignment {
            request_id: rng.next_u64(),
            prompt: ids(rng, 40),
            generated: ids(rng, 10),
            max_tokens: any_u32(rng),
            temperature: unit_f32(rng),
            top_p: unit_f32(rng),
            seed: rng.next_u64(),
            stop_token_ids: ids(rng, 4),
            priority: rng.next_u64() as u8,
            headroom_blocks: any_u32(rng),
        }),
        12 => Frame::Migrate {
            token: text(rng, 64),
            destination: any_u32(rng),
        },
        13 => Frame::MigrationChunk {
            last: chance(rng, 2),
            bytes: bytes(rng, 300),
        },
        14 => Frame::MigrateOut {
            migration_id: rng.next_u64(),
            request: rng.next_u64(),
            destination: any_u32(rng),
            addr: text(rng, 20),
        },
        15 => Frame::Resume {
            token: text(rng, 64),
            request: rng.next_u64(),
            instance: any_u32(rng),
        },
        _ => {
            if chance(rng, 2) {
                Frame::Moved {
                    instance: any_u32(rng),
                }
            } else {
                Frame::Candidates
            }
        }
    }
}

/// A valid migration message of any kind.
pub fn migration_message(rng: &mut SplitMix64) -> MigrationMessage {
    let migration_id = rng.next_u64();
    const REFUSE: [RefuseReason; 3] = [
        RefuseReason::NoSlot,
        RefuseReason::OutOfBlocks,
        RefuseReason::Draining,
    ];
    const ABORT: [AbortReason; 4] = [
        AbortReason::RequestGone,
        AbortReason::Preempted,
        AbortReason::Timeout,
        AbortReason::SourceError,
    ];
    match below(rng, 8) {
        0 => MigrationMessage::Reserve {
            migration_id,
            seq: rng.next_u64(),
            block_size: any_u32(rng),
            blocks_needed: any_u32(rng),
            prompt: ids(rng, 64),
            output: ids(rng, 16),
        },
        1 => MigrationMessage::Reserved {
            migration_id,
            blocks: any_u32(rng),
        },
        2 => MigrationMessage::Refused {
            migration_id,
            reason: REFUSE[below(rng, 3) as usize],
        },
        3 => MigrationMessage::Blocks {
            migration_id,
            stage: any_u32(rng),
            first_block_index: any_u32(rng),
            num_blocks: any_u32(rng),
            data: bytes(rng, 256),
        },
        4 => MigrationMessage::Ack {
            migration_id,
            stage: any_u32(rng),
            next_block_index: any_u32(rng),
        },
        5 => {
            let mut sampling = SamplingParams::greedy(any_u32(rng));
            sampling.temperature = unit_f32(rng);
            sampling.top_p = unit_f32(rng);
            sampling.seed = rng.next_u64();
            sampling.stop_token_ids = ids(rng, 4);
            MigrationMessage::Commit {
                migration_id,
                stage: any_u32(rng),
                sequence: Box::new(MigratedSequence {
                    id: rng.next_u64(),
                    output_from: any_u32(rng),
                    new_output: ids(rng, 16),
                    sampling,
                    priority: rng.next_u64() as u8,
                    headroom_blocks: any_u32(rng),
                    arrival_us: rng.next_u64(),
                    preemptions: any_u32(rng),
                    tokens_recomputed: rng.next_u64(),
                    block_size: below(rng, 1 << 16) as usize,
                    kv_tokens: below(rng, 1 << 20) as usize,
                }),
                first_block_index: any_u32(rng),
                num_blocks: any_u32(rng),
                data: bytes(rng, 256),
            }
        }
        6 => MigrationMessage::Committed { migration_id },
        _ => MigrationMessage::Abort {
            migration_id,
            reason: ABORT[below(rng, 4) as usize],
        },
    }
}

/// A valid admin command of any kind, as the client sends it.
pub fn admin_command(rng: &mut SplitMix64) -> AdminCommand {
    let kinds = ["dispatch", "migration", "priority", "scaling", "nope", ""];
    let kind = kinds[below(rng, kinds.len() as u64) as usize].to_string();
    let sha = || -> Option<String> { None };
    let sha256 = if chance(rng, 2) {
        Some(text(rng, 64))
    } else {
        sha()
    };
    let params: Vec<String> = (0..below(rng, 3))
        .map(|_| format!("{}={}", text(rng, 12), text(rng, 12)))
        .collect();
    match below(rng, 8) {
        0 => AdminCommand::Status,
        1 => AdminCommand::PolicyList,
        2 => AdminCommand::PolicyInstall,
        3 => AdminCommand::PolicySwap {
            kind,
            sha256,
            params,
        },
        4 => AdminCommand::PolicyRollback { kind },
        5 => AdminCommand::PolicyShadow {
            kind,
            sha256,
            stop: chance(rng, 2),
            params,
        },
        6 => AdminCommand::PolicyReplay {
            kind,
            sha256,
            params,
            from_us: rng.next_u64(),
            to_us: rng.next_u64(),
            limit: below(rng, 1000) as usize,
        },
        _ => AdminCommand::Migrate {
            source: any_u32(rng),
            destination: any_u32(rng),
            request: chance(rng, 2).then(|| rng.next_u64()),
        },
    }
}

fn admin_json(rng: &mut SplitMix64) -> String {
    serde_json::to_string(&admin_command(rng)).expect("commands serialise")
}

// ---------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------

/// Applies 1..=4 random byte-level mutations; `frame_starts` are offsets of
/// length prefixes worth forging.
fn mutate(rng: &mut SplitMix64, data: &mut Vec<u8>, frame_starts: &[usize]) {
    for _ in 0..1 + below(rng, 4) {
        let len = data.len() as u64;
        match below(rng, 9) {
            0 if len > 0 => {
                let at = below(rng, len) as usize;
                data[at] ^= 1 << below(rng, 8);
            }
            1 if len > 0 => {
                let at = below(rng, len) as usize;
                data[at] = [0, 1, 0x7f, 0x80, 0xff][below(rng, 5) as usize];
            }
            2 => {
                let at = below(rng, len + 1) as usize;
                let extra = bytes(rng, 16);
                data.splice(at..at, extra);
            }
            3 if len > 0 => {
                let at = below(rng, len) as usize;
                let n = 1 + below(rng, (len - at as u64).min(32)) as usize;
                data.drain(at..at + n);
            }
            4 => data.truncate(below(rng, len + 1) as usize),
            5 if len > 0 => {
                let at = below(rng, len) as usize;
                let n = 1 + below(rng, (len - at as u64).min(64)) as usize;
                let copy = data[at..at + n].to_vec();
                let to = below(rng, len + 1) as usize;
                data.splice(to..to, copy);
            }
            6 if !frame_starts.is_empty() => {
                // A forged length prefix.
                let at = frame_starts[below(rng, frame_starts.len() as u64) as usize];
                if at + LEN_BYTES <= data.len() {
                    let old = u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
                    let forged = match below(rng, 6) {
                        0 => 0,
                        1 => 1,
                        2 => old.wrapping_add(1),
                        3 => old.wrapping_sub(1),
                        4 => u32::MAX,
                        _ => (MAX_ADMIN_FRAME as u32).wrapping_add(below(rng, 3) as u32),
                    };
                    data[at..at + 4].copy_from_slice(&forged.to_be_bytes());
                }
            }
            7 if len > 0 => {
                // Another kind byte (at a frame's kind offset).
                if let Some(&at) =
                    frame_starts.get(below(rng, frame_starts.len().max(1) as u64) as usize)
                {
                    if at + LEN_BYTES + 1 < data.len() {
                        data[at + LEN_BYTES + 1] = rng.next_u64() as u8;
                    }
                }
            }
            _ => {
                let other = encode(&frame(rng));
                let at = below(rng, len + 1) as usize;
                data.splice(at..at, other);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

fn frames(rng: &mut SplitMix64, counts: &mut Counts) {
    let n = 1 + below(rng, 4) as usize;
    let originals: Vec<Frame> = (0..n).map(|_| frame(rng)).collect();
    let mut data = Vec::new();
    let mut starts = Vec::new();
    for f in &originals {
        starts.push(data.len());
        data.extend_from_slice(&encode(f));
    }
    let pristine = chance(rng, 4);
    if !pristine {
        mutate(rng, &mut data, &starts);
    }
    counts.bytes += data.len() as u64;
    // Fed as a stream delivers it: random splits.
    let mut decoder = FrameDecoder::new(MAX_ADMIN_FRAME).with_kind_limit(limit_by_kind);
    let mut got = Vec::new();
    let mut at = 0;
    let mut failed = false;
    while at < data.len() && !failed {
        let step = 1 + below(rng, 64.min(data.len() as u64 - at as u64 + 1)) as usize;
        let end = (at + step).min(data.len());
        decoder.push(&data[at..end]);
        at = end;
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => {
                    check_round_trip(&f);
                    got.push(f);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(
            failed || decoder.pending() <= LEN_BYTES + MAX_ADMIN_FRAME + step,
            "the decoder buffers {} bytes",
            decoder.pending()
        );
    }
    counts.accepted += got.len() as u64;
    if failed || decoder.finish().is_err() {
        counts.refused += 1;
    }
    if pristine {
        counts.pristine += 1;
        assert!(!failed, "a pristine stream was refused");
        let bytes = |fs: &[Frame]| fs.iter().map(encode).collect::<Vec<_>>();
        assert_eq!(
            bytes(&got),
            bytes(&originals),
            "a pristine stream decoded differently"
        );
    }
    // The one-shot decoder on the first frame's bytes agrees with the
    // stream decoder.
    let first_len = starts.get(1).copied().unwrap_or(data.len()).min(data.len());
    if let Ok(f) = decode(&data[..first_len], MAX_ADMIN_FRAME) {
        check_round_trip(&f);
    }
}

fn check_round_trip(f: &Frame) {
    let again = encode(f);
    let back =
        decode(&again, usize::MAX >> 1).expect("an accepted frame re-encodes to valid bytes");
    // Compared as bytes: a float field may hold NaN (the codec carries
    // any bit pattern; request validation refuses it later).
    assert_eq!(
        encode(&back),
        again,
        "an accepted frame does not survive a round trip"
    );
    // Every accepted frame obeys its kind's limit.
    let kind = again[LEN_BYTES + 1];
    assert!(
        again.len() - LEN_BYTES <= limit_by_kind(kind).max(MAX_ADMIN_FRAME),
        "an accepted frame is over its kind's limit"
    );
}

fn chunk_header(rng: &mut SplitMix64, counts: &mut Counts) {
    let payload = size(rng, 64);
    let last = chance(rng, 2);
    let mut h = protocol::migration_chunk_header(last, payload).to_vec();
    let pristine = chance(rng, 4);
    if !pristine {
        for _ in 0..1 + below(rng, 3) {
            let at = below(rng, MIGRATION_CHUNK_HEADER as u64) as usize;
            h[at] = rng.next_u64() as u8;
        }
    }
    counts.bytes += h.len() as u64;
    let header: [u8; MIGRATION_CHUNK_HEADER] = h[..].try_into().unwrap();
    match parse_migration_chunk_header(&header) {
        Ok((l, n)) => {
            counts.accepted += 1;
            assert!(n <= protocol::MAX_MIGRATION_CHUNK);
            // Agrees with the frame codec.
            let mut frame = h.clone();
            frame.extend(std::iter::repeat_n(7u8, n));
            assert_eq!(
                decode(&frame, protocol::MAX_MIGRATION_CHUNK + 64),
                Ok(Frame::MigrationChunk {
                    last: l,
                    bytes: vec![7; n]
                })
            );
        }
        Err(_) => counts.refused += 1,
    }
    if pristine {
        counts.pristine += 1;
        assert_eq!(parse_migration_chunk_header(&header), Ok((last, payload)));
    }
}

fn migration(rng: &mut SplitMix64, counts: &mut Counts) {
    let original = migration_message(rng);
    let mut data = original.encode();
    let pristine = chance(rng, 4);
    if !pristine {
        mutate(rng, &mut data, &[]);
    }
    counts.bytes += data.len() as u64;
    match MigrationMessage::decode(&data) {
        Ok(m) => {
            counts.accepted += 1;
            let again = m.encode();
            let back = MigrationMessage::decode(&again).expect("re-encodes");
            assert_eq!(
                back.encode(),
                again,
                "an accepted message does not survive a round trip"
            );
            if pristine {
                assert_eq!(again, original.encode());
            }
        }
        Err(_) => {
            counts.refused += 1;
            assert!(!pristine, "a pristine message was refused");
        }
    }
    if pristine {
        counts.pristine += 1;
    }
}

fn snapshot(rng: &mut SplitMix64, counts: &mut Counts) {
    let original = load(rng);
    let mut data = encode_snapshot(&original).to_vec();
    let pristine = chance(rng, 4);
    if !pristine {
        mutate(rng, &mut data, &[]);
    }
    counts.bytes += data.len() as u64;
    match decode_snapshot(&data) {
        Ok(l) => {
            counts.accepted += 1;
            assert_eq!(decode_snapshot(&encode_snapshot(&l)), Ok(l));
            if pristine {
                assert_eq!(l, original);
            }
        }
        Err(_) => {
            counts.refused += 1;
            assert!(!pristine, "a pristine snapshot was refused");
        }
    }
    if pristine {
        counts.pristine += 1;
    }
}

fn admin_gate(rng: &mut SplitMix64, counts: &mut Counts) {
    const EXPECTED: &str = "3f1c0d6a9b2e4f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";
    let token = match below(rng, 6) {
        0 | 1 => EXPECTED.to_string(),
        2 => String::new(),
        3 => EXPECTED[..below(rng, 64) as usize].to_string(),
        4 => format!("{EXPECTED}{}", text(rng, 3)),
        _ => {
            let mut t = EXPECTED.as_bytes().to_vec();
            let at = below(rng, 64) as usize;
            t[at] = b"0123456789abcdef"[below(rng, 16) as usize];
            String::from_utf8(t).expect("ASCII")
        }
    };
    let original = admin_command(rng);
    let mut json = serde_json::to_vec(&original).expect("serialises");
    let pristine = chance(rng, 3);
    if !pristine {
        mutate(rng, &mut json, &[]);
    }
    let json = String::from_utf8_lossy(&json).into_owned();
    counts.bytes += json.len() as u64;
    let result = admin::authorize(EXPECTED, &token, &json);
    if token != EXPECTED {
        let e = result.expect_err("a wrong token was accepted");
        assert_eq!(e.code, ErrorCode::Unauthorized);
        counts.refused += 1;
    } else {
        match result {
            Ok(c) => {
                counts.accepted += 1;
                if pristine {
                    assert_eq!(c, original);
                }
            }
            Err(e) => {
                assert_eq!(e.code, ErrorCode::Malformed, "{e}");
                assert!(!pristine, "a pristine command was refused: {e}");
                counts.refused += 1;
            }
        }
    }
    if pristine {
        counts.pristine += 1;
    }
}
