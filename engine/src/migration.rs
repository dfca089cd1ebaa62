//! Live migration of a running request from one engine to another, as a pure
//! state machine (in the manner of quinn-proto): no I/O, no threads, no
//! clock. Time comes in as `now_us`; messages go out as return values and
//! come in through `handle`. The transport (QUIC in the server, an in-memory
//! queue in the simulator and the tests) moves [`Message`]s, encoded with
//! [`Message::encode`] / [`Message::decode`].
//!
//! One [`SourceMigration`] per request leaving an engine; one
//! [`DestinationMigration`] per engine, serving every incoming migration.
//!
//! # Protocol (Llumnix's live migration)
//!
//! ```text
//! source                                        destination
//!   start ── Reserve{id, seq, block_size, blocks_needed, prompt, output} ──▶ reserve blocks (watermark, slot)
//!         ◀── Reserved{blocks} | Refused{reason} ───────────
//!   stage k (request keeps decoding): the blocks that became full since
//!   stage k−1, i.e. below kv_tokens / block_size
//!         ── Blocks{stage, first_block_index, num_blocks, data} ──▶ import (grow reservation)
//!         ◀── Ack{stage, next_block_index} | Refused ───────────
//!   … until the rest is small (≤ last_stage_max_blocks) or after
//!   max_precopy_stages pre-copy stages; then the last stage:
//!   detach between two steps, export the rest
//!         ── Commit{stage, sequence (outputs since Reserve), first_block_index, num_blocks, data} ──▶ import, grow, attach
//!         ◀── Committed | Refused ──────────────────────────
//!   forget the request  |  requeue it (recompute)
//! ```
//!
//! - The destination reserves `blocks_needed` = the blocks the sequence held
//!   at `start` plus [`MigrationConfig::reserve_slack_blocks`]. The sequence
//!   keeps growing while the stages run, so the destination **grows the
//!   reservation on demand** (each `Blocks` and the `Commit` may add blocks at
//!   its end, above the watermark like any reservation), which is Llumnix's
//!   "reserve before each stage". A failed growth refuses the migration.
//! - Pre-copy stages only copy *full* blocks: they never change again, so the
//!   copy taken while the request decodes is exact. The last stage copies the
//!   rest after [`crate::Scheduler::detach`]; its size is bounded by
//!   `last_stage_max_blocks` plus what the request wrote during the previous
//!   stage, independent of the sequence's length: that is the downtime.
//!   The token history travels the same way: `Reserve` carries the prompt
//!   and the outputs so far, the `Commit` only the outputs generated since
//!   (a few per pre-copy stage), so the last message does not grow with the
//!   context either.
//! - The source frees its blocks at detach (their contents are exported in
//!   the same call, before anything can reuse them) but keeps the detached
//!   sequence until `Committed`; only then is the request forgotten there. If
//!   the commit is refused or times out, the sequence is requeued at the
//!   source ([`crate::Scheduler::requeue`]) and recomputed: nothing is lost.
//!
//! # Aborts, races, timeouts
//!
//! - Request finished or aborted at the source during a pre-copy stage, or
//!   preempted (its blocks recomputed elsewhere in the pool): the next
//!   [`SourceMigration::on_engine_step`] (or the next message) notices, sends
//!   `Abort`, and the destination releases the reservation. The request
//!   carries on at the source (or is gone, as the client wanted).
//! - The destination refuses (no slot: at most `max_incoming` concurrent
//!   incoming migrations; not enough free blocks above the watermark; batch
//!   full; draining; block-size mismatch; duplicate id; protocol violation;
//!   failed import or commit): it releases whatever it held, replies
//!   `Refused`, and the source keeps the request (or requeues it if it was
//!   already detached).
//! - Dead source: a destination frees an incoming migration that has not
//!   heard from its source for `destination_idle_timeout_us` plus the
//!   transfer allowance of what its reservation may still bring
//!   ([`DestinationMigration::handle_timeout`]); a later message for it is
//!   answered `Refused{UnknownMigration}`.
//! - Dead destination: a source waiting for a reply longer than
//!   `source_reply_timeout_us` plus the transfer allowance of the message
//!   it sent (`MigrationConfig::min_transfer_bytes_per_s`: a big stage on a
//!   slow link is not a dead peer) aborts ([`SourceMigration::handle_timeout`]):
//!   before detach the request simply carries on; after detach (waiting for
//!   `Committed`) it is requeued and an `Abort` is still sent.
//! - The in-doubt window: if a `Committed` reply is lost, both sides may hold
//!   the request for a moment. The destination remembers committed
//!   migrations for `committed_memory_us`; an `Abort` for one of them aborts
//!   the committed copy, so only the source's copy survives. Tokens the
//!   destination streamed in between carry the same indices and (greedy or
//!   seeded sampling) the same values as the source's, so a client that keeps
//!   the first token per index sees a contiguous, duplicate-free stream.
//!   Without a route back at all (a partition that outlives the memory), the
//!   transport's connection loss must be reported as an abort by the host.
//!
//! Token indices continue across the move: the detached sequence carries its
//! outputs, and the destination's scheduler emits index `output.len()` next.
//!
//! # Assumptions
//!
//! - Every call that takes an `&mut Engine` is made between two engine steps
//!   (which is always the case with [`Engine::step`], which never leaves a
//!   step in flight).
//! - The transport delivers the messages of one migration reliably and in
//!   order (one QUIC stream), or not at all (then timeouts resolve it).
//! - Migration ids are unique per destination (e.g. source instance × counter).
//! - The state machines maintain [`crate::Scheduler::set_migrating_out`] /
//!   [`crate::Scheduler::set_migrating_in`] by increments and decrements, so
//!   several migrations on one engine compose.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use crate::{
    BlockId, DetachedSequence, Engine, ModelBackend, ReservationId, SamplingParams, SchedulerError,
    SeqId, TokenId,
};

/// Identifier of one migration, chosen by the source's host.
pub type MigrationId = u64;

/// Version byte at the start of every encoded [`Message`].
pub const WIRE_VERSION: u8 = 2;

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// Knobs of both sides (each side reads its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationConfig {
    /// Destination: most incoming migrations at a time (Llumnix: 1).
    pub max_incoming: usize,
    /// Source: the last stage starts once at most this many blocks remain
    /// to copy (Llumnix: 16).
    pub last_stage_max_blocks: usize,
    /// Source: most pre-copy stages; the last stage follows them whatever
    /// remains (Llumnix: 3).
    pub max_precopy_stages: u32,
    /// Source: blocks asked for on top of what the sequence holds at start
    /// (room to grow during the stages; the destination grows the
    /// reservation beyond it on demand).
    pub reserve_slack_blocks: usize,
    /// Source: how long to wait for each reply before aborting, on top of
    /// the transfer allowance of the message it answers.
    pub source_reply_timeout_us: u64,
    /// Destination: how long an incoming migration may stay silent before
    /// its reservation is freed (dead source), on top of the transfer
    /// allowance of what the reservation may still bring.
    pub destination_idle_timeout_us: u64,
    /// Both sides: the slowest transfer rate, bytes per second, a live
    /// peer is trusted to reach. A message of B KV bytes gets B / rate more
    /// time ([`transfer_allowance_us`](Self::transfer_allowance_us)): a
    /// fixed timeout alone would abort every long-context migration on a
    /// slow link (SmolLM2 at 8k tokens sends 372 MB in its first stage; a
    /// 7B model over 4 GB). 0: no allowance.
    pub min_transfer_bytes_per_s: u64,
    /// Destination: how long a committed migration is remembered (so that a
    /// late `Abort`, sent by a source that timed out waiting for `Committed`,
    /// can still remove the committed copy).
    pub committed_memory_us: u64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            max_incoming: 1,
            last_stage_max_blocks: 16,
            max_precopy_stages: 3,
            reserve_slack_blocks: 1,
            source_reply_timeout_us: 5_000_000,
            destination_idle_timeout_us: 10_000_000,
            min_transfer_bytes_per_s: 50_000_000,
            committed_memory_us: 60_000_000,
        }
    }
}

impl MigrationConfig {
    /// The time `bytes` may take at `min_transfer_bytes_per_s`.
    pub fn transfer_allowance_us(&self, bytes: u64) -> u64 {
        match self.min_transfer_bytes_per_s {
            0 => 0,
            rate => (u128::from(bytes) * 1_000_000 / u128::from(rate))
                .try_into()
                .unwrap_or(u64::MAX),
        }
    }
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// Why a destination refused (a reservation, a stage or the commit). It has
/// released everything it held for the migration when it sends this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// `max_incoming` migrations are already coming in.
    NoSlot,
    /// Not enough free blocks above the watermark (to reserve or to grow),
    /// or a sequence longer than this instance can ever hold.
    OutOfBlocks,
    /// The running batch has no room for one more sequence.
    BatchFull,
    /// The destination is being drained.
    Draining,
    /// The source's block size differs from the destination's.
    BlockSizeMismatch,
    /// The sequence id is already on the destination (or coming in).
    DuplicateSequence,
    /// The migration id is already in use (or was recently committed).
    DuplicateMigration,
    /// No such migration (never reserved, or freed after a timeout).
    UnknownMigration,
    /// A message out of order or inconsistent with the reservation.
    ProtocolViolation,
    /// The KV import failed.
    ImportFailed,
    /// The scheduler refused the migrated sequence.
    CommitFailed,
}

/// Why a source gave a migration up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortReason {
    /// The request finished or was aborted at the source during a stage.
    RequestGone,
    /// The request was preempted at the source (its KV is being recomputed).
    Preempted,
    /// The destination did not answer in time.
    Timeout,
    /// The host called [`SourceMigration::cancel`].
    Cancelled,
    /// The client cancelled the request ([`SourceMigration::cancel_request`]).
    ClientAborted,
    /// Exporting KV or detaching failed at the source.
    SourceError,
}

/// The state of a migrated sequence as the `Commit` message carries it: a
/// [`DetachedSequence`] without the source's block ids, and of its tokens
/// only the outputs generated since `Reserve` (which carried the prompt and
/// the outputs before).
#[derive(Clone, Debug, PartialEq)]
pub struct MigratedSequence {
    pub id: SeqId,
    /// Outputs `Reserve` carried: `new_output[0]` is output number
    /// `output_from` (the destination checks it holds exactly that many).
    pub output_from: u32,
    /// Outputs generated since `Reserve` (token indices continue from
    /// `output_from + new_output.len()`).
    pub new_output: Vec<TokenId>,
    pub sampling: SamplingParams,
    pub priority: u8,
    pub headroom_blocks: u32,
    pub arrival_us: u64,
    pub preemptions: u32,
    pub tokens_recomputed: u64,
    pub block_size: usize,
    /// Tokens whose KV the copied blocks hold.
    pub kv_tokens: usize,
}

impl MigratedSequence {
    /// The sequence's state for a destination that already holds its prompt
    /// and its first `output_from` outputs; `None` if it has fewer.
    pub fn from_detached(d: &DetachedSequence, output_from: usize) -> Option<Self> {
        Some(MigratedSequence {
            id: d.id,
            output_from: u32::try_from(output_from).ok()?,
            new_output: d.output.get(output_from..)?.to_vec(),
            sampling: d.sampling.clone(),
            priority: d.priority,
            headroom_blocks: d.headroom_blocks,
            arrival_us: d.arrival_us,
            preemptions: d.preemptions,
            tokens_recomputed: d.tokens_recomputed,
            block_size: d.block_size,
            kv_tokens: d.kv_tokens,
        })
    }

    /// The detached sequence to attach at the destination, given the prompt
    /// and the outputs `Reserve` carried (no block table: the blocks are the
    /// destination's reservation).
    pub fn to_detached(&self, prompt: Vec<TokenId>, mut output: Vec<TokenId>) -> DetachedSequence {
        output.extend_from_slice(&self.new_output);
        DetachedSequence {
            id: self.id,
            prompt,
            output,
            sampling: self.sampling.clone(),
            priority: self.priority,
            headroom_blocks: self.headroom_blocks,
            arrival_us: self.arrival_us,
            preemptions: self.preemptions,
            tokens_recomputed: self.tokens_recomputed,
            block_size: self.block_size,
            block_table: Vec::new(),
            kv_tokens: self.kv_tokens,
        }
    }
}

/// One protocol message. Source → destination: `Reserve`, `Blocks`,
/// `Commit`, `Abort`; destination → source: `Reserved`, `Ack`, `Committed`,
/// `Refused`.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Reserve {
        migration_id: MigrationId,
        seq: SeqId,
        block_size: u32,
        blocks_needed: u32,
        /// The request's prompt, and its outputs so far: the token history
        /// never changes, so it travels before the request stops.
        prompt: Vec<TokenId>,
        output: Vec<TokenId>,
    },
    Reserved {
        migration_id: MigrationId,
        blocks: u32,
    },
    Refused {
        migration_id: MigrationId,
        reason: RefuseReason,
    },
    /// A pre-copy stage: KV of blocks `first_block_index ..
    /// first_block_index + num_blocks` of the sequence, in token order.
    Blocks {
        migration_id: MigrationId,
        stage: u32,
        first_block_index: u32,
        num_blocks: u32,
        data: Vec<u8>,
    },
    /// The destination has imported every block below `next_block_index`.
    Ack {
        migration_id: MigrationId,
        stage: u32,
        next_block_index: u32,
    },
    /// The last stage: the detached sequence and the rest of its KV.
    Commit {
        migration_id: MigrationId,
        stage: u32,
        sequence: Box<MigratedSequence>,
        first_block_index: u32,
        num_blocks: u32,
        data: Vec<u8>,
    },
    Committed {
        migration_id: MigrationId,
    },
    Abort {
        migration_id: MigrationId,
        reason: AbortReason,
    },
}

impl Message {
    pub fn migration_id(&self) -> MigrationId {
        match self {
            Message::Reserve { migration_id, .. }
            | Message::Reserved { migration_id, .. }
            | Message::Refused { migration_id, .. }
            | Message::Blocks { migration_id, .. }
            | Message::Ack { migration_id, .. }
            | Message::Commit { migration_id, .. }
            | Message::Committed { migration_id }
            | Message::Abort { migration_id, .. } => *migration_id,
        }
    }

    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Reserve { .. } => "Reserve",
            Message::Reserved { .. } => "Reserved",
            Message::Refused { .. } => "Refused",
            Message::Blocks { .. } => "Blocks",
            Message::Ack { .. } => "Ack",
            Message::Commit { .. } => "Commit",
            Message::Committed { .. } => "Committed",
            Message::Abort { .. } => "Abort",
        }
    }

    /// Bytes of KV this message carries.
    pub fn kv_bytes(&self) -> usize {
        match self {
            Message::Blocks { data, .. } | Message::Commit { data, .. } => data.len(),
            _ => 0,
        }
    }
}

// ---------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------
//
// [version u8 = 1][tag u8][migration_id u64][fields…], little endian.
// Variable-length fields are a count then the items: u64 for KV bytes, u32
// for token lists. Decoding is strict: unknown version, tag or reason, a count that
// runs past the end, out-of-range values or trailing bytes are errors.

mod tag {
    pub const RESERVE: u8 = 1;
    pub const RESERVED: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const BLOCKS: u8 = 4;
    pub const ACK: u8 = 5;
    pub const COMMIT: u8 = 6;
    pub const COMMITTED: u8 = 7;
    pub const ABORT: u8 = 8;
}

/// Why bytes are not a valid [`Message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ends inside a field at byte `at`.
    Truncated {
        at: usize,
    },
    UnsupportedVersion(u8),
    UnknownMessage(u8),
    UnknownReason(u8),
    /// A value that does not fit its type here.
    OutOfRange {
        field: &'static str,
    },
    /// Bytes left after the message.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { at } => write!(f, "migration message truncated at byte {at}"),
            DecodeError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "migration message version {v} (this side speaks {WIRE_VERSION})"
                )
            }
            DecodeError::UnknownMessage(t) => write!(f, "unknown migration message tag {t}"),
            DecodeError::UnknownReason(r) => write!(f, "unknown migration reason code {r}"),
            DecodeError::OutOfRange { field } => {
                write!(f, "migration message field {field} out of range")
            }
            DecodeError::TrailingBytes(n) => {
                write!(f, "{n} trailing bytes after a migration message")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// A reason's wire code: its 1-based place in `all` (0 is never a reason).
fn reason_code<T: PartialEq + Copy>(all: &[T], reason: T) -> u8 {
    all.iter()
        .position(|r| *r == reason)
        .expect("every reason is listed") as u8
        + 1
}

/// The reason with wire code `c` in `all`, or a decode error.
fn reason_from_code<T: Copy>(all: &[T], c: u8) -> Result<T, DecodeError> {
    (c as usize)
        .checked_sub(1)
        .and_then(|i| all.get(i).copied())
        .ok_or(DecodeError::UnknownReason(c))
}

impl RefuseReason {
    const ALL: [RefuseReason; 11] = [
        RefuseReason::NoSlot,
        RefuseReason::OutOfBlocks,
        RefuseReason::BatchFull,
        RefuseReason::Draining,
        RefuseReason::BlockSizeMismatch,
        RefuseReason::DuplicateSequence,
        RefuseReason::DuplicateMigration,
        RefuseReason::UnknownMigration,
        RefuseReason::ProtocolViolation,
        RefuseReason::ImportFailed,
        RefuseReason::CommitFailed,
    ];
    fn code(self) -> u8 {
        reason_code(&Self::ALL, self)
    }
    fn from_code(c: u8) -> Result<Self, DecodeError> {
        reason_from_code(&Self::ALL, c)
    }
}

impl AbortReason {
    const ALL: [AbortReason; 6] = [
        AbortReason::RequestGone,
        AbortReason::Preempted,
        AbortReason::Timeout,
        AbortReason::Cancelled,
        AbortReason::ClientAborted,
        AbortReason::SourceError,
    ];
    fn code(self) -> u8 {
        reason_code(&Self::ALL, self)
    }
    fn from_code(c: u8) -> Result<Self, DecodeError> {
        reason_from_code(&Self::ALL, c)
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
/// KV payloads can pass 4 GiB (LLaMA-7B: 8 MiB per block), so their length
/// is a u64.
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u64(out, b.len() as u64);
    out.extend_from_slice(b);
}
/// Token lists have a u32 count (a sequence of 4 G tokens cannot exist).
fn put_tokens(out: &mut Vec<u8>, t: &[TokenId]) {
    put_u32(out, u32::try_from(t.len()).expect("over 4 G tokens"));
    for &x in t {
        put_u32(out, x);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated { at: self.at })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn usize(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        usize::try_from(self.u64()?).map_err(|_| DecodeError::OutOfRange { field })
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let at = self.at;
        let n = usize::try_from(self.u64()?).map_err(|_| DecodeError::Truncated { at })?;
        Ok(self.take(n)?.to_vec())
    }
    fn tokens(&mut self) -> Result<Vec<TokenId>, DecodeError> {
        let at = self.at;
        let n = self.u32()? as usize;
        let raw = self.take(n.checked_mul(4).ok_or(DecodeError::Truncated { at })?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

fn put_sequence(out: &mut Vec<u8>, s: &MigratedSequence) {
    put_u64(out, s.id);
    put_u32(out, s.output_from);
    put_tokens(out, &s.new_output);
    put_u32(out, s.sampling.temperature.to_bits());
    put_u32(out, s.sampling.top_p.to_bits());
    put_u64(out, s.sampling.seed);
    put_u32(out, s.sampling.max_tokens);
    put_tokens(out, &s.sampling.stop_token_ids);
    out.push(s.priority);
    put_u32(out, s.headroom_blocks);
    put_u64(out, s.arrival_us);
    put_u32(out, s.preemptions);
    put_u64(out, s.tokens_recomputed);
    put_u64(out, s.block_size as u64);
    put_u64(out, s.kv_tokens as u64);
}

fn read_sequence(r: &mut Reader<'_>) -> Result<MigratedSequence, DecodeError> {
    let id = r.u64()?;
    let output_from = r.u32()?;
    let new_output = r.tokens()?;
    let temperature = f32::from_bits(r.u32()?);
    let top_p = f32::from_bits(r.u32()?);
    let seed = r.u64()?;
    let max_tokens = r.u32()?;
    let stop_token_ids = r.tokens()?;
    let priority = r.u8()?;
    let headroom_blocks = r.u32()?;
    let arrival_us = r.u64()?;
    let preemptions = r.u32()?;
    let tokens_recomputed = r.u64()?;
    let block_size = r.usize("block_size")?;
    let kv_tokens = r.usize("kv_tokens")?;
    Ok(MigratedSequence {
        id,
        output_from,
        new_output,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed,
            max_tokens,
            stop_token_ids,
        },
        priority,
        headroom_blocks,
        arrival_us,
        preemptions,
        tokens_recomputed,
        block_size,
        kv_tokens,
    })
}

impl Message {
    /// The message's bytes (see the wire format above).
    pub fn encode(&self) -> Vec<u8> {
        let tokens = match self {
            Message::Reserve { prompt, output, .. } => prompt.len() + output.len(),
            Message::Commit { sequence, .. } => sequence.new_output.len(),
            _ => 0,
        };
        let mut out = Vec::with_capacity(128 + self.kv_bytes() + 4 * tokens);
        self.encode_into(&mut out);
        out
    }

    /// Appends the message's bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(WIRE_VERSION);
        let t = match self {
            Message::Reserve { .. } => tag::RESERVE,
            Message::Reserved { .. } => tag::RESERVED,
            Message::Refused { .. } => tag::REFUSED,
            Message::Blocks { .. } => tag::BLOCKS,
            Message::Ack { .. } => tag::ACK,
            Message::Commit { .. } => tag::COMMIT,
            Message::Committed { .. } => tag::COMMITTED,
            Message::Abort { .. } => tag::ABORT,
        };
        out.push(t);
        put_u64(out, self.migration_id());
        match self {
            Message::Reserve {
                seq,
                block_size,
                blocks_needed,
                prompt,
                output,
                ..
            } => {
                put_u64(out, *seq);
                put_u32(out, *block_size);
                put_u32(out, *blocks_needed);
                put_tokens(out, prompt);
                put_tokens(out, output);
            }
            Message::Reserved { blocks, .. } => put_u32(out, *blocks),
            Message::Refused { reason, .. } => out.push(reason.code()),
            Message::Blocks {
                stage,
                first_block_index,
                num_blocks,
                data,
                ..
            } => {
                put_u32(out, *stage);
                put_u32(out, *first_block_index);
                put_u32(out, *num_blocks);
                put_bytes(out, data);
            }
            Message::Ack {
                stage,
                next_block_index,
                ..
            } => {
                put_u32(out, *stage);
                put_u32(out, *next_block_index);
            }
            Message::Commit {
                stage,
                sequence,
                first_block_index,
                num_blocks,
                data,
                ..
            } => {
                put_u32(out, *stage);
                put_sequence(out, sequence);
                put_u32(out, *first_block_index);
                put_u32(out, *num_blocks);
                put_bytes(out, data);
            }
            Message::Committed { .. } => {}
            Message::Abort { reason, .. } => out.push(reason.code()),
        }
    }

    /// Parses one message, all of `bytes`. Never panics; any malformed input
    /// is an error.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader { buf: bytes, at: 0 };
        let version = r.u8()?;
        if version != WIRE_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let t = r.u8()?;
        let migration_id = r.u64()?;
        let msg = match t {
            tag::RESERVE => Message::Reserve {
                migration_id,
                seq: r.u64()?,
                block_size: r.u32()?,
                blocks_needed: r.u32()?,
                prompt: r.tokens()?,
                output: r.tokens()?,
            },
            tag::RESERVED => Message::Reserved {
                migration_id,
                blocks: r.u32()?,
            },
            tag::REFUSED => Message::Refused {
                migration_id,
                reason: RefuseReason::from_code(r.u8()?)?,
            },
            tag::BLOCKS => Message::Blocks {
                migration_id,
                stage: r.u32()?,
                first_block_index: r.u32()?,
                num_blocks: r.u32()?,
                data: r.bytes()?,
            },
            tag::ACK => Message::Ack {
                migration_id,
                stage: r.u32()?,
                next_block_index: r.u32()?,
            },
            tag::COMMIT => Message::Commit {
                migration_id,
                stage: r.u32()?,
                sequence: Box::new(read_sequence(&mut r)?),
                first_block_index: r.u32()?,
                num_blocks: r.u32()?,
                data: r.bytes()?,
            },
            tag::COMMITTED => Message::Committed { migration_id },
            tag::ABORT => Message::Abort {
                migration_id,
                reason: AbortReason::from_code(r.u8()?)?,
            },
            other => return Err(DecodeError::UnknownMessage(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

// ---------------------------------------------------------------------------
// Source side
// ---------------------------------------------------------------------------

/// Where a [`SourceMigration`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Not started.
    Idle,
    /// `Reserve` sent; waiting for `Reserved` or `Refused`.
    Reserving,
    /// Pre-copy stage `stage` sent; waiting for its `Ack`. The request is
    /// still decoding here.
    Copying { stage: u32 },
    /// The request is detached; `Commit` sent, waiting for `Committed`.
    Committing,
    /// Done: the destination runs the request.
    Committed,
    /// Done: the migration was given up (see the outcome).
    Aborted,
}

impl SourceState {
    pub fn is_terminal(self) -> bool {
        matches!(self, SourceState::Committed | SourceState::Aborted)
    }
}

/// One copy stage, as the source ran it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRecord {
    /// 1-based.
    pub stage: u32,
    /// The final (stop-and-copy) stage.
    pub last: bool,
    pub first_block_index: u32,
    pub blocks: u32,
    pub bytes: u64,
    pub sent_us: u64,
    /// When the destination acknowledged it (`Ack`, or `Committed` for the last).
    pub acked_us: Option<u64>,
}

/// How a migration ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationResult {
    /// The destination runs the request; the source forgot it.
    Committed,
    /// The destination refused. `requeued`: the request had been detached
    /// and went back to the source's queue (recompute); otherwise it never
    /// stopped decoding at the source.
    Refused {
        reason: RefuseReason,
        requeued: bool,
    },
    /// The source gave up (and told the destination). `requeued` as above.
    Aborted { reason: AbortReason, requeued: bool },
}

/// The record of a finished migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationOutcome {
    pub migration_id: MigrationId,
    pub seq: SeqId,
    pub result: MigrationResult,
    /// Every stage sent, the last (stop-and-copy) one included if reached.
    pub stages: Vec<StageRecord>,
    pub started_us: u64,
    pub finished_us: u64,
    /// When the request was detached (the last stage began).
    pub detached_us: Option<u64>,
    /// Virtual time the request was out of every batch because of the
    /// migration: detach → `Committed` (or → requeue when it failed).
    pub downtime_us: Option<u64>,
}

impl MigrationOutcome {
    pub fn committed(&self) -> bool {
        self.result == MigrationResult::Committed
    }
    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }
    pub fn blocks_per_stage(&self) -> Vec<u32> {
        self.stages.iter().map(|s| s.blocks).collect()
    }
    /// Blocks of the stop-and-copy stage, if it was reached.
    pub fn last_stage_blocks(&self) -> Option<u32> {
        self.stages.iter().find(|s| s.last).map(|s| s.blocks)
    }
    pub fn blocks_copied(&self) -> u64 {
        self.stages.iter().map(|s| u64::from(s.blocks)).sum()
    }
    pub fn bytes_copied(&self) -> u64 {
        self.stages.iter().map(|s| s.bytes).sum()
    }
}

/// Misuse of a [`SourceMigration`], or a message it cannot take. The
/// migration's state is unchanged unless said otherwise.
#[derive(Debug)]
pub enum MigrationError {
    /// `start` on a migration already started.
    AlreadyStarted,
    /// The request cannot be migrated now (unknown, waiting, in flight).
    Scheduler(SchedulerError),
    /// A message for another migration.
    WrongMigration {
        expected: MigrationId,
        got: MigrationId,
    },
    /// A message this state does not expect (ignored).
    UnexpectedMessage {
        state: SourceState,
        message: &'static str,
    },
    /// A detached sequence could not be put back in the source's queue. The
    /// migration has ended; the sequence travels in its
    /// [`SourceEvent::Ended`] (`stranded`) for the host to place again.
    Requeue(SchedulerError),
}

impl fmt::Display for MigrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationError::AlreadyStarted => write!(f, "migration already started"),
            MigrationError::Scheduler(e) => write!(f, "cannot migrate: {e}"),
            MigrationError::WrongMigration { expected, got } => {
                write!(
                    f,
                    "message for migration {got} given to migration {expected}"
                )
            }
            MigrationError::UnexpectedMessage { state, message } => {
                write!(f, "unexpected {message} in migration state {state:?}")
            }
            MigrationError::Requeue(e) => {
                write!(f, "could not requeue the detached sequence: {e}")
            }
        }
    }
}

impl std::error::Error for MigrationError {}

fn sat_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn bump_out<B: ModelBackend>(engine: &mut Engine<B>, up: bool) {
    let s = engine.scheduler_mut();
    let n = s.migrating_out();
    s.set_migrating_out(if up {
        n.saturating_add(1)
    } else {
        n.saturating_sub(1)
    });
}

fn bump_in<B: ModelBackend>(engine: &mut Engine<B>, up: bool) {
    let s = engine.scheduler_mut();
    let n = s.migrating_in();
    s.set_migrating_in(if up {
        n.saturating_add(1)
    } else {
        n.saturating_sub(1)
    });
}

/// The source side of one request's migration. See the module docs.
///
/// Drive it with: [`start`](Self::start) once; [`handle`](Self::handle) for
/// every message from the destination; [`on_engine_step`](Self::on_engine_step)
/// after every engine step; [`handle_timeout`](Self::handle_timeout) when
/// [`poll_timeout`](Self::poll_timeout) is due. Every call returns the
/// messages to send, in order. When [`state`](Self::state) is terminal,
/// [`outcome`](Self::outcome) says what happened.
#[derive(Debug)]
pub struct SourceMigration {
    config: MigrationConfig,
    id: MigrationId,
    seq: SeqId,
    state: SourceState,
    started_us: u64,
    deadline: Option<u64>,
    /// The request's preemption count at start (a change aborts).
    preemptions: u32,
    /// Outputs `Reserve` carried (the `Commit` carries the rest).
    outputs_reserved: usize,
    block_size: usize,
    /// Source block ids of the blocks sent so far (blocks `0..sent.len()`).
    sent: Vec<BlockId>,
    /// Blocks the destination acknowledged.
    acked: usize,
    stages: Vec<StageRecord>,
    detached: Option<DetachedSequence>,
    detached_us: Option<u64>,
    client_aborted: bool,
    outcome: Option<MigrationOutcome>,
    events: VecDeque<SourceEvent>,
}

/// What a [`SourceMigration`] reports, polled with
/// [`SourceMigration::poll_event`] (the destination's counterpart is
/// [`DestinationEvent`]).
#[derive(Clone, Debug, PartialEq)]
pub enum SourceEvent {
    /// The migration reached its end (exactly one per started migration).
    /// `stranded`: the request had been detached and could not be put back
    /// in the source's queue; it is no longer in the engine, and the host
    /// must place it again (from its token history) or fail it.
    Ended {
        outcome: MigrationOutcome,
        stranded: Option<Box<DetachedSequence>>,
    },
}

impl SourceMigration {
    /// A migration of request `seq`, not started.
    pub fn new(config: MigrationConfig, migration_id: MigrationId, seq: SeqId) -> Self {
        SourceMigration {
            config,
            id: migration_id,
            seq,
            state: SourceState::Idle,
            started_us: 0,
            deadline: None,
            preemptions: 0,
            outputs_reserved: 0,
            block_size: 0,
            sent: Vec::new(),
            acked: 0,
            stages: Vec::new(),
            detached: None,
            detached_us: None,
            client_aborted: false,
            outcome: None,
            events: VecDeque::new(),
        }
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    pub fn migration_id(&self) -> MigrationId {
        self.id
    }
    pub fn seq(&self) -> SeqId {
        self.seq
    }
    pub fn state(&self) -> SourceState {
        self.state
    }
    /// Set once the migration has ended.
    pub fn outcome(&self) -> Option<&MigrationOutcome> {
        self.outcome.as_ref()
    }
    /// Stages sent so far.
    pub fn stages(&self) -> &[StageRecord] {
        &self.stages
    }
    /// When the migration next needs [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.deadline
    }
    /// When the reply to a message carrying `kv_bytes` is overdue.
    fn reply_deadline(&self, now_us: u64, kv_bytes: usize) -> u64 {
        now_us
            .saturating_add(self.config.source_reply_timeout_us)
            .saturating_add(self.config.transfer_allowance_us(kv_bytes as u64))
    }
    /// Starts the migration of a running request: asks the destination for
    /// blocks. Refused (state unchanged) unless the request is running here
    /// and not in the step in flight.
    pub fn start<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        now_us: u64,
    ) -> Result<Vec<Message>, MigrationError> {
        if self.state != SourceState::Idle {
            return Err(MigrationError::AlreadyStarted);
        }
        let info = engine
            .scheduler()
            .sequence(self.seq)
            .ok_or(MigrationError::Scheduler(SchedulerError::UnknownSequence(
                self.seq,
            )))?;
        if info.state != crate::SequenceState::Running {
            return Err(MigrationError::Scheduler(SchedulerError::NotRunning(
                self.seq,
            )));
        }
        if info.in_flight {
            return Err(MigrationError::Scheduler(SchedulerError::SequenceInFlight(
                self.seq,
            )));
        }
        let (prompt, output) = engine
            .scheduler()
            .sequence_tokens(self.seq)
            .map(|(p, o)| (p.to_vec(), o.to_vec()))
            .ok_or(MigrationError::Scheduler(SchedulerError::UnknownSequence(
                self.seq,
            )))?;
        self.preemptions = info.preemptions;
        self.outputs_reserved = output.len();
        self.block_size = engine.scheduler().config().block_size;
        self.started_us = now_us;
        self.state = SourceState::Reserving;
        self.deadline = Some(self.reply_deadline(now_us, 0));
        bump_out(engine, true);
        Ok(vec![Message::Reserve {
            migration_id: self.id,
            seq: self.seq,
            block_size: sat_u32(self.block_size),
            blocks_needed: sat_u32(info.blocks + self.config.reserve_slack_blocks),
            prompt,
            output,
        }])
    }

    /// A message from the destination. Messages arriving after the end are
    /// ignored (`Ok(vec![])`).
    pub fn handle<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        message: Message,
        now_us: u64,
    ) -> Result<Vec<Message>, MigrationError> {
        if message.migration_id() != self.id {
            return Err(MigrationError::WrongMigration {
                expected: self.id,
                got: message.migration_id(),
            });
        }
        if self.state.is_terminal() {
            return Ok(Vec::new());
        }
        match (self.state, message) {
            (SourceState::Reserving, Message::Reserved { .. }) => {
                Ok(self.next_stage(engine, now_us))
            }
            (
                SourceState::Copying { stage },
                Message::Ack {
                    stage: acked_stage,
                    next_block_index,
                    ..
                },
            ) if acked_stage == stage && next_block_index as usize == self.sent.len() => {
                self.acked = self.sent.len();
                if let Some(s) = self.stages.last_mut() {
                    s.acked_us = Some(now_us);
                }
                Ok(self.next_stage(engine, now_us))
            }
            (
                SourceState::Reserving | SourceState::Copying { .. },
                Message::Refused { reason, .. },
            ) => {
                self.finish(
                    engine,
                    MigrationResult::Refused {
                        reason,
                        requeued: false,
                    },
                    now_us,
                );
                Ok(Vec::new())
            }
            (SourceState::Committing, Message::Committed { .. }) => {
                if let Some(s) = self.stages.last_mut() {
                    s.acked_us = Some(now_us);
                }
                self.detached = None;
                if self.client_aborted {
                    // The client left while the request was in transit: the
                    // destination's fresh copy goes too.
                    self.finish(
                        engine,
                        MigrationResult::Aborted {
                            reason: AbortReason::ClientAborted,
                            requeued: false,
                        },
                        now_us,
                    );
                    return Ok(vec![self.abort_message(AbortReason::ClientAborted)]);
                }
                self.finish(engine, MigrationResult::Committed, now_us);
                Ok(Vec::new())
            }
            (SourceState::Committing, Message::Refused { reason, .. }) => {
                let requeued = self.requeue(engine, now_us);
                let result = MigrationResult::Refused {
                    reason,
                    requeued: matches!(requeued, Ok(true)),
                };
                self.finish(engine, result, now_us);
                requeued.map(|_| Vec::new())
            }
            (state, message) => Err(MigrationError::UnexpectedMessage {
                state,
                message: message.kind(),
            }),
        }
    }

    /// Call after every engine step (and whenever the request may have
    /// changed): a request that finished, was aborted or was preempted
    /// during a pre-copy stage aborts the migration.
    pub fn on_engine_step<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        now_us: u64,
    ) -> Vec<Message> {
        match self.state {
            SourceState::Reserving | SourceState::Copying { .. } => {
                match self.check_alive(engine) {
                    Ok(()) => Vec::new(),
                    Err(reason) => self.abort_with(engine, reason, now_us),
                }
            }
            _ => Vec::new(),
        }
    }

    /// Gives up if the destination has not answered by
    /// [`poll_timeout`](Self::poll_timeout): before detach the request just
    /// carries on here; after it, it is requeued (recompute). An `Abort` is
    /// sent either way.
    pub fn handle_timeout<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        now_us: u64,
    ) -> Result<Vec<Message>, MigrationError> {
        match self.deadline {
            Some(d) if now_us >= d => self.give_up(engine, AbortReason::Timeout, now_us),
            _ => Ok(Vec::new()),
        }
    }

    /// The host gives the migration up (e.g. the pairing changed, shutdown).
    /// After detach this is the same as a timeout: requeue and `Abort`.
    pub fn cancel<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        now_us: u64,
    ) -> Result<Vec<Message>, MigrationError> {
        self.give_up(engine, AbortReason::Cancelled, now_us)
    }

    /// The client cancelled the request. Before detach it is aborted here
    /// and the migration aborts. In transit (committing), the migration goes
    /// on to its end: if committed, an `Abort` then removes the destination's
    /// copy; if refused, the sequence is dropped instead of requeued. After
    /// the end, it is aborted here if it is here (after a committed
    /// migration the host must abort it at the destination).
    pub fn cancel_request<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        now_us: u64,
    ) -> Vec<Message> {
        match self.state {
            SourceState::Reserving | SourceState::Copying { .. } => {
                engine.abort(self.seq);
                self.abort_with(engine, AbortReason::ClientAborted, now_us)
            }
            SourceState::Committing => {
                self.client_aborted = true;
                Vec::new()
            }
            SourceState::Idle | SourceState::Committed | SourceState::Aborted => {
                engine.abort(self.seq);
                Vec::new()
            }
        }
    }

    fn give_up<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        reason: AbortReason,
        now_us: u64,
    ) -> Result<Vec<Message>, MigrationError> {
        match self.state {
            SourceState::Reserving | SourceState::Copying { .. } => {
                Ok(self.abort_with(engine, reason, now_us))
            }
            SourceState::Committing => {
                let requeued = self.requeue(engine, now_us);
                let result = MigrationResult::Aborted {
                    reason,
                    requeued: matches!(requeued, Ok(true)),
                };
                self.finish(engine, result, now_us);
                let msg = self.abort_message(reason);
                requeued.map(|_| vec![msg])
            }
            SourceState::Idle | SourceState::Committed | SourceState::Aborted => Ok(Vec::new()),
        }
    }

    fn abort_message(&self, reason: AbortReason) -> Message {
        Message::Abort {
            migration_id: self.id,
            reason,
        }
    }

    /// Ends a migration that has not detached: the request is where it was.
    fn abort_with<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        reason: AbortReason,
        now_us: u64,
    ) -> Vec<Message> {
        self.finish(
            engine,
            MigrationResult::Aborted {
                reason,
                requeued: false,
            },
            now_us,
        );
        vec![self.abort_message(reason)]
    }

    /// Puts the detached sequence back in the queue (unless the client
    /// cancelled it). `Ok(true)` when requeued.
    fn requeue<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        now_us: u64,
    ) -> Result<bool, MigrationError> {
        let Some(d) = self.detached.take() else {
            return Ok(false);
        };
        if self.client_aborted {
            return Ok(false);
        }
        match engine.scheduler_mut().requeue(&d, now_us) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.detached = Some(d);
                Err(MigrationError::Requeue(e))
            }
        }
    }

    fn finish<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        result: MigrationResult,
        now_us: u64,
    ) {
        self.state = if result == MigrationResult::Committed {
            SourceState::Committed
        } else {
            SourceState::Aborted
        };
        self.deadline = None;
        bump_out(engine, false);
        let outcome = MigrationOutcome {
            migration_id: self.id,
            seq: self.seq,
            result,
            stages: self.stages.clone(),
            started_us: self.started_us,
            finished_us: now_us,
            detached_us: self.detached_us,
            downtime_us: self.detached_us.map(|d| now_us.saturating_sub(d)),
        };
        // A sequence still held here after the end was detached and could
        // not be requeued (a committed one was dropped before `finish`).
        let stranded = self.detached.take().map(Box::new);
        self.outcome = Some(outcome.clone());
        self.events
            .push_back(SourceEvent::Ended { outcome, stranded });
    }

    /// The request is still running here, unpreempted, with the blocks
    /// already sent still its first blocks.
    fn check_alive<B: ModelBackend>(&self, engine: &Engine<B>) -> Result<(), AbortReason> {
        let sched = engine.scheduler();
        let info = sched.sequence(self.seq).ok_or(AbortReason::RequestGone)?;
        if info.state != crate::SequenceState::Running || info.preemptions != self.preemptions {
            return Err(AbortReason::Preempted);
        }
        if info.in_flight {
            // Not between steps: a caller bug; never export half-written KV.
            return Err(AbortReason::SourceError);
        }
        let table = sched
            .block_table(self.seq)
            .map_err(|_| AbortReason::RequestGone)?;
        if table.get(..self.sent.len()) != Some(&self.sent[..]) {
            return Err(AbortReason::Preempted);
        }
        Ok(())
    }

    /// After `Reserved` or an `Ack`: another pre-copy stage, or the last.
    fn next_stage<B: ModelBackend>(&mut self, engine: &mut Engine<B>, now_us: u64) -> Vec<Message> {
        if let Err(reason) = self.check_alive(engine) {
            return self.abort_with(engine, reason, now_us);
        }
        let bm = engine.scheduler().block_manager();
        let kv_tokens = bm.num_tokens(self.seq).unwrap_or(0);
        let held = bm.num_blocks(self.seq).unwrap_or(0);
        let full = kv_tokens / self.block_size;
        let remaining = held.saturating_sub(self.acked);
        let precopies = self.stages.len();
        if remaining > self.config.last_stage_max_blocks
            && precopies < self.config.max_precopy_stages as usize
            && full > self.acked
        {
            let range = self.acked..full;
            let data = match engine.export_kv(self.seq, range.clone()) {
                Ok(d) => d,
                Err(_) => return self.abort_with(engine, AbortReason::SourceError, now_us),
            };
            let table = engine
                .scheduler()
                .block_table(self.seq)
                .expect("checked alive");
            self.sent.extend_from_slice(&table[range.clone()]);
            let stage = sat_u32(precopies + 1);
            self.stages.push(StageRecord {
                stage,
                last: false,
                first_block_index: sat_u32(range.start),
                blocks: sat_u32(range.len()),
                bytes: data.len() as u64,
                sent_us: now_us,
                acked_us: None,
            });
            self.state = SourceState::Copying { stage };
            self.deadline = Some(self.reply_deadline(now_us, data.len()));
            return vec![Message::Blocks {
                migration_id: self.id,
                stage,
                first_block_index: sat_u32(range.start),
                num_blocks: sat_u32(range.len()),
                data,
            }];
        }
        self.last_stage(engine, now_us)
    }

    /// The last stage failed at the source after detach: the request goes
    /// back in the queue here (recompute) and the destination is told.
    fn give_up_detached<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        detached: DetachedSequence,
        now_us: u64,
    ) -> Vec<Message> {
        let requeued = engine.scheduler_mut().requeue(&detached, now_us).is_ok();
        if !requeued {
            self.detached = Some(detached);
        }
        self.finish(
            engine,
            MigrationResult::Aborted {
                reason: AbortReason::SourceError,
                requeued,
            },
            now_us,
        );
        vec![self.abort_message(AbortReason::SourceError)]
    }

    /// Stop-and-copy: detach between two steps, export the rest, `Commit`.
    fn last_stage<B: ModelBackend>(&mut self, engine: &mut Engine<B>, now_us: u64) -> Vec<Message> {
        let detached = match engine.scheduler_mut().detach(self.seq) {
            Ok(d) => d,
            Err(_) => return self.abort_with(engine, AbortReason::SourceError, now_us),
        };
        let Some(sequence) = MigratedSequence::from_detached(&detached, self.outputs_reserved)
        else {
            // Fewer outputs than at `Reserve`: impossible without a
            // preemption, which `check_alive` catches; never send a history
            // the destination would splice wrongly.
            return self.give_up_detached(engine, detached, now_us);
        };
        let first = self.acked.min(detached.block_table.len());
        // The detached blocks are free at the source now; export them before
        // anything allocates blocks.
        let data = match engine
            .backend()
            .export_blocks(&detached.block_table[first..])
        {
            Ok(d) => d,
            Err(_) => return self.give_up_detached(engine, detached, now_us),
        };
        let num_blocks = detached.block_table.len() - first;
        let stage = sat_u32(self.stages.len() + 1);
        self.stages.push(StageRecord {
            stage,
            last: true,
            first_block_index: sat_u32(first),
            blocks: sat_u32(num_blocks),
            bytes: data.len() as u64,
            sent_us: now_us,
            acked_us: None,
        });
        let sequence = Box::new(sequence);
        self.detached = Some(detached);
        self.detached_us = Some(now_us);
        self.state = SourceState::Committing;
        self.deadline = Some(self.reply_deadline(now_us, data.len()));
        vec![Message::Commit {
            migration_id: self.id,
            stage,
            sequence,
            first_block_index: sat_u32(first),
            num_blocks: sat_u32(num_blocks),
            data,
        }]
    }
}

// ---------------------------------------------------------------------------
// Destination side
// ---------------------------------------------------------------------------

/// Why a destination gave a reservation back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The source sent `Abort`.
    SourceAborted(AbortReason),
    /// The destination refused a stage or the commit.
    Refused(RefuseReason),
    /// Nothing heard from the source for `destination_idle_timeout_us`.
    Timeout,
}

/// What happened to incoming migrations, for the host (routing of the
/// request's stream, metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationEvent {
    Reserved {
        migration_id: MigrationId,
        seq: SeqId,
        blocks: usize,
    },
    /// The request runs here now.
    Committed {
        migration_id: MigrationId,
        seq: SeqId,
        blocks: usize,
    },
    /// The reservation was given back; nothing of the request is here.
    Released {
        migration_id: MigrationId,
        seq: SeqId,
        reason: ReleaseReason,
    },
    /// An `Abort` for a migration already committed here: the committed
    /// copy was aborted (`aborted`: it was still here).
    AbortedAfterCommit {
        migration_id: MigrationId,
        seq: SeqId,
        reason: AbortReason,
        aborted: bool,
    },
}

/// Counters of a [`DestinationMigration`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestinationStats {
    pub reserved: u64,
    pub refused: u64,
    pub committed: u64,
    pub released: u64,
    pub timed_out: u64,
    pub aborted_after_commit: u64,
    pub stages: u64,
    pub blocks_imported: u64,
    pub bytes_imported: u64,
    /// Messages a destination never takes (`Reserved`, `Ack`, …) or for
    /// nothing it knows (`Abort` of an unknown migration).
    pub ignored: u64,
}

#[derive(Clone, Debug)]
struct Incoming {
    seq: SeqId,
    /// The token history `Reserve` carried.
    prompt: Vec<TokenId>,
    output: Vec<TokenId>,
    reservation: ReservationId,
    /// Blocks in the reservation.
    reserved: usize,
    /// Blocks imported (`0..next_block`).
    next_block: usize,
    /// Stages imported.
    stages: u32,
    last_heard_us: u64,
    /// Transfer allowance of the KV the reservation may still bring
    /// (`MigrationConfig::transfer_allowance_us`), added to the idle
    /// timeout: the next stage may be that big.
    allowance_us: u64,
}

impl Incoming {
    /// When it is taken for dead, given the idle timeout.
    fn expires_us(&self, idle_timeout_us: u64) -> u64 {
        self.last_heard_us
            .saturating_add(idle_timeout_us)
            .saturating_add(self.allowance_us)
    }
}

/// The destination side of every migration into one engine. See the module
/// docs. Feed it every message from sources ([`handle`](Self::handle)) and
/// call [`handle_timeout`](Self::handle_timeout) when
/// [`poll_timeout`](Self::poll_timeout) is due; read what happened from
/// [`poll_event`](Self::poll_event).
#[derive(Debug)]
pub struct DestinationMigration {
    config: MigrationConfig,
    incoming: BTreeMap<MigrationId, Incoming>,
    /// Committed migrations remembered until the given time.
    committed: BTreeMap<MigrationId, (SeqId, u64)>,
    events: VecDeque<DestinationEvent>,
    stats: DestinationStats,
}

impl DestinationMigration {
    pub fn new(config: MigrationConfig) -> Self {
        DestinationMigration {
            config,
            incoming: BTreeMap::new(),
            committed: BTreeMap::new(),
            events: VecDeque::new(),
            stats: DestinationStats::default(),
        }
    }

    /// Incoming migrations holding a reservation.
    pub fn num_incoming(&self) -> usize {
        self.incoming.len()
    }
    /// Whether a migration holds a reservation here.
    pub fn is_incoming(&self, migration_id: MigrationId) -> bool {
        self.incoming.contains_key(&migration_id)
    }
    pub fn stats(&self) -> &DestinationStats {
        &self.stats
    }
    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<DestinationEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work.
    pub fn poll_timeout(&self) -> Option<u64> {
        let idle = self.config.destination_idle_timeout_us;
        self.incoming
            .values()
            .map(|i| i.expires_us(idle))
            .chain(self.committed.values().map(|&(_, until)| until))
            .min()
    }

    /// Frees the reservations of incoming migrations silent for too long,
    /// and forgets old commits.
    pub fn handle_timeout<B: ModelBackend>(&mut self, engine: &mut Engine<B>, now_us: u64) {
        let idle = self.config.destination_idle_timeout_us;
        let expired: Vec<MigrationId> = self
            .incoming
            .iter()
            .filter(|(_, i)| now_us >= i.expires_us(idle))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.release(engine, id, ReleaseReason::Timeout);
            self.stats.timed_out += 1;
        }
        self.committed.retain(|_, &mut (_, until)| now_us < until);
    }

    /// A message from a source; returns the replies.
    pub fn handle<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        message: Message,
        now_us: u64,
    ) -> Vec<Message> {
        match message {
            Message::Reserve {
                migration_id,
                seq,
                block_size,
                blocks_needed,
                prompt,
                output,
            } => {
                vec![self.on_reserve(
                    engine,
                    migration_id,
                    Reservation {
                        seq,
                        block_size,
                        blocks_needed,
                        prompt,
                        output,
                    },
                    now_us,
                )]
            }
            Message::Blocks {
                migration_id,
                stage,
                first_block_index,
                num_blocks,
                data,
            } => vec![self.on_blocks(
                engine,
                migration_id,
                Stage {
                    stage,
                    first: first_block_index as usize,
                    count: num_blocks as usize,
                    data: &data,
                },
                now_us,
            )],
            Message::Commit {
                migration_id,
                stage,
                sequence,
                first_block_index,
                num_blocks,
                data,
            } => vec![self.on_commit(
                engine,
                migration_id,
                &sequence,
                Stage {
                    stage,
                    first: first_block_index as usize,
                    count: num_blocks as usize,
                    data: &data,
                },
                now_us,
            )],
            Message::Abort {
                migration_id,
                reason,
            } => {
                self.on_abort(engine, migration_id, reason);
                Vec::new()
            }
            Message::Reserved { .. }
            | Message::Refused { .. }
            | Message::Ack { .. }
            | Message::Committed { .. } => {
                self.stats.ignored += 1;
                Vec::new()
            }
        }
    }

    fn refused(&mut self, migration_id: MigrationId, reason: RefuseReason) -> Message {
        self.stats.refused += 1;
        Message::Refused {
            migration_id,
            reason,
        }
    }

    /// Releases an incoming migration's reservation and replies `Refused`.
    fn refuse<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        migration_id: MigrationId,
        reason: RefuseReason,
    ) -> Message {
        self.release(engine, migration_id, ReleaseReason::Refused(reason));
        self.refused(migration_id, reason)
    }

    fn release<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        migration_id: MigrationId,
        reason: ReleaseReason,
    ) {
        let Some(inc) = self.incoming.remove(&migration_id) else {
            return;
        };
        // The reservation exists while the migration is incoming; the
        // scheduler never drops it on its own.
        let _ = engine.release_reservation(inc.reservation);
        bump_in(engine, false);
        self.stats.released += 1;
        self.events.push_back(DestinationEvent::Released {
            migration_id,
            seq: inc.seq,
            reason,
        });
    }

    fn on_reserve<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        migration_id: MigrationId,
        ask: Reservation,
        now_us: u64,
    ) -> Message {
        let Reservation {
            seq,
            block_size,
            blocks_needed,
            prompt,
            output,
        } = ask;
        let reason = if self.incoming.contains_key(&migration_id)
            || self.committed.contains_key(&migration_id)
        {
            Some(RefuseReason::DuplicateMigration)
        } else if self.incoming.len() >= self.config.max_incoming {
            Some(RefuseReason::NoSlot)
        } else if engine.scheduler().draining() {
            Some(RefuseReason::Draining)
        } else if block_size as usize != engine.scheduler().config().block_size {
            Some(RefuseReason::BlockSizeMismatch)
        } else if engine.scheduler().contains(seq) || self.incoming.values().any(|i| i.seq == seq) {
            Some(RefuseReason::DuplicateSequence)
        } else if !engine.scheduler().can_accept_migration() {
            Some(RefuseReason::BatchFull)
        } else if prompt.is_empty() {
            Some(RefuseReason::ProtocolViolation)
        } else if prompt.len().saturating_add(output.len())
            > engine.scheduler().config().max_total_tokens()
        {
            // A history this instance could never hold: it would only be
            // refused at the commit, after every stage.
            Some(RefuseReason::OutOfBlocks)
        } else {
            None
        };
        if let Some(reason) = reason {
            return self.refused(migration_id, reason);
        }
        let blocks = blocks_needed as usize;
        let reservation = match engine.reserve_for_migration(blocks) {
            Ok(r) => r,
            Err(_) => return self.refused(migration_id, RefuseReason::OutOfBlocks),
        };
        bump_in(engine, true);
        self.incoming.insert(
            migration_id,
            Incoming {
                seq,
                prompt,
                output,
                reservation,
                reserved: blocks,
                next_block: 0,
                stages: 0,
                last_heard_us: now_us,
                allowance_us: self.config.transfer_allowance_us(
                    (blocks as u64).saturating_mul(engine.backend().kv_bytes_per_block() as u64),
                ),
            },
        );
        self.stats.reserved += 1;
        self.events.push_back(DestinationEvent::Reserved {
            migration_id,
            seq,
            blocks,
        });
        Message::Reserved {
            migration_id,
            blocks: blocks_needed,
        }
    }

    /// Checks a stage against the reservation, grows it if the sequence
    /// outgrew it, and imports the KV.
    fn import<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        migration_id: MigrationId,
        stage: &Stage<'_>,
        now_us: u64,
    ) -> Result<(), RefuseReason> {
        let per_block = engine.backend().kv_bytes_per_block();
        let inc = self
            .incoming
            .get_mut(&migration_id)
            .ok_or(RefuseReason::UnknownMigration)?;
        inc.last_heard_us = now_us;
        if stage.stage != inc.stages + 1
            || stage.first != inc.next_block
            || stage.count.checked_mul(per_block) != Some(stage.data.len())
        {
            return Err(RefuseReason::ProtocolViolation);
        }
        let end = stage
            .first
            .checked_add(stage.count)
            .ok_or(RefuseReason::ProtocolViolation)?;
        if end > inc.reserved {
            engine
                .scheduler_mut()
                .grow_reservation(inc.reservation, end - inc.reserved)
                .map_err(|_| RefuseReason::OutOfBlocks)?;
            inc.reserved = end;
        }
        if stage.count > 0 {
            engine
                .import_kv(inc.reservation, stage.first, stage.data)
                .map_err(|_| RefuseReason::ImportFailed)?;
        }
        inc.next_block = end;
        inc.stages += 1;
        // The next stage brings what the request wrote meanwhile: at most
        // the rest of the reservation, or a block beyond it.
        let still = inc.reserved.saturating_sub(end).max(1);
        inc.allowance_us = self
            .config
            .transfer_allowance_us((still as u64).saturating_mul(per_block as u64));
        self.stats.stages += 1;
        self.stats.blocks_imported += stage.count as u64;
        self.stats.bytes_imported += stage.data.len() as u64;
        Ok(())
    }

    fn on_blocks<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        migration_id: MigrationId,
        stage: Stage<'_>,
        now_us: u64,
    ) -> Message {
        match self.import(engine, migration_id, &stage, now_us) {
            Ok(()) => Message::Ack {
                migration_id,
                stage: stage.stage,
                next_block_index: sat_u32(self.incoming[&migration_id].next_block),
            },
            Err(reason) => self.refuse(engine, migration_id, reason),
        }
    }

    fn on_commit<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        migration_id: MigrationId,
        sequence: &MigratedSequence,
        stage: Stage<'_>,
        now_us: u64,
    ) -> Message {
        let Some(inc) = self.incoming.get(&migration_id) else {
            return self.refused(migration_id, RefuseReason::UnknownMigration);
        };
        let bs = engine.scheduler().config().block_size;
        if sequence.id != inc.seq || sequence.output_from as usize != inc.output.len() {
            return self.refuse(engine, migration_id, RefuseReason::ProtocolViolation);
        }
        if sequence.block_size != bs {
            return self.refuse(engine, migration_id, RefuseReason::BlockSizeMismatch);
        }
        if stage.first.checked_add(stage.count) != Some(sequence.kv_tokens.div_ceil(bs)) {
            return self.refuse(engine, migration_id, RefuseReason::ProtocolViolation);
        }
        if let Err(reason) = self.import(engine, migration_id, &stage, now_us) {
            return self.refuse(engine, migration_id, reason);
        }
        let inc = self
            .incoming
            .get_mut(&migration_id)
            .expect("import checked it");
        // The history is only needed once: take it (a failed commit
        // releases the migration anyway).
        let detached = sequence.to_detached(
            std::mem::take(&mut inc.prompt),
            std::mem::take(&mut inc.output),
        );
        if engine
            .commit_migration(&detached, inc.reservation, now_us)
            .is_err()
        {
            return self.refuse(engine, migration_id, RefuseReason::CommitFailed);
        }
        let inc = self.incoming.remove(&migration_id).expect("checked above");
        bump_in(engine, false);
        self.committed.insert(
            migration_id,
            (
                inc.seq,
                now_us.saturating_add(self.config.committed_memory_us),
            ),
        );
        self.stats.committed += 1;
        self.events.push_back(DestinationEvent::Committed {
            migration_id,
            seq: inc.seq,
            blocks: inc.next_block,
        });
        Message::Committed { migration_id }
    }

    fn on_abort<B: ModelBackend>(
        &mut self,
        engine: &mut Engine<B>,
        migration_id: MigrationId,
        reason: AbortReason,
    ) {
        if self.incoming.contains_key(&migration_id) {
            self.release(engine, migration_id, ReleaseReason::SourceAborted(reason));
        } else if let Some((seq, _)) = self.committed.remove(&migration_id) {
            let aborted = engine.abort(seq);
            self.stats.aborted_after_commit += 1;
            self.events.push_back(DestinationEvent::AbortedAfterCommit {
                migration_id,
                seq,
                reason,
                aborted,
            });
        } else {
            self.stats.ignored += 1;
        }
    }
}

/// What a `Reserve` asks for.
struct Reservation {
    seq: SeqId,
    block_size: u32,
    blocks_needed: u32,
    prompt: Vec<TokenId>,
    output: Vec<TokenId>,
}

/// One stage's KV as a destination receives it.
struct Stage<'a> {
    stage: u32,
    first: usize,
    count: usize,
    data: &'a [u8],
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_sequence() -> MigratedSequence {
        MigratedSequence {
            id: 42,
            output_from: 3,
            new_output: vec![7, 8],
            sampling: SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                seed: 99,
                max_tokens: 128,
                stop_token_ids: vec![2],
            },
            priority: 1,
            headroom_blocks: 5,
            arrival_us: 123_456,
            preemptions: 2,
            tokens_recomputed: 17,
            block_size: 16,
            kv_tokens: 5,
        }
    }

    fn samples() -> Vec<Message> {
        let mut v = vec![
            Message::Reserve {
                migration_id: 1,
                seq: 42,
                block_size: 16,
                blocks_needed: 9,
                prompt: vec![1, 2, 3],
                output: vec![4000],
            },
            Message::Reserved {
                migration_id: 1,
                blocks: 9,
            },
            Message::Blocks {
                migration_id: 1,
                stage: 1,
                first_block_index: 0,
                num_blocks: 2,
                data: (0..=255).collect(),
            },
            Message::Ack {
                migration_id: 1,
                stage: 1,
                next_block_index: 2,
            },
            Message::Commit {
                migration_id: u64::MAX,
                stage: 2,
                sequence: Box::new(sample_sequence()),
                first_block_index: 2,
                num_blocks: 0,
                data: Vec::new(),
            },
            Message::Committed { migration_id: 0 },
        ];
        for r in RefuseReason::ALL {
            v.push(Message::Refused {
                migration_id: 3,
                reason: r,
            });
        }
        for r in AbortReason::ALL {
            v.push(Message::Abort {
                migration_id: 4,
                reason: r,
            });
        }
        v
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode();
            assert_eq!(bytes[0], WIRE_VERSION);
            assert_eq!(Message::decode(&bytes), Ok(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn decoding_is_strict() {
        for m in samples() {
            let bytes = m.encode();
            // Every strict prefix is truncated.
            for n in 0..bytes.len() {
                assert!(
                    matches!(
                        Message::decode(&bytes[..n]),
                        Err(DecodeError::Truncated { .. })
                    ),
                    "{} prefix {n}",
                    m.kind()
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Message::decode(&longer), Err(DecodeError::TrailingBytes(1)));
            // An older or newer version (1: the prompt rode in `Commit`).
            for other in [WIRE_VERSION - 1, WIRE_VERSION + 1] {
                let mut v = bytes.clone();
                v[0] = other;
                assert_eq!(
                    Message::decode(&v),
                    Err(DecodeError::UnsupportedVersion(other))
                );
            }
            let mut bad_tag = bytes;
            bad_tag[1] = 200;
            assert_eq!(
                Message::decode(&bad_tag),
                Err(DecodeError::UnknownMessage(200))
            );
        }
        let mut refused = Message::Refused {
            migration_id: 1,
            reason: RefuseReason::NoSlot,
        }
        .encode();
        *refused.last_mut().unwrap() = 0;
        assert_eq!(
            Message::decode(&refused),
            Err(DecodeError::UnknownReason(0))
        );
        *refused.last_mut().unwrap() = 12;
        assert_eq!(
            Message::decode(&refused),
            Err(DecodeError::UnknownReason(12))
        );
        // A length prefix claiming far more than there is.
        let mut blocks = Message::Blocks {
            migration_id: 1,
            stage: 1,
            first_block_index: 0,
            num_blocks: 1,
            data: vec![1, 2, 3],
        }
        .encode();
        let at = blocks.len() - 3 - 8;
        blocks[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(&blocks),
            Err(DecodeError::Truncated { .. })
        ));
    }

    fn arb_tokens() -> impl Strategy<Value = Vec<TokenId>> {
        proptest::collection::vec(any::<u32>(), 0..20)
    }

    fn arb_sequence() -> impl Strategy<Value = MigratedSequence> {
        (
            (any::<u64>(), any::<u32>(), arb_tokens(), arb_tokens()),
            (-1.0e3f32..1.0e3, 0.0f32..1.0, any::<u64>(), any::<u32>()),
            (any::<u8>(), any::<u32>(), any::<u64>(), any::<u32>()),
            (any::<u64>(), 0usize..1 << 20, 0usize..1 << 40),
        )
            .prop_map(
                |(
                    (id, output_from, new_output, stop),
                    (temperature, top_p, seed, max_tokens),
                    (priority, headroom_blocks, arrival_us, preemptions),
                    (tokens_recomputed, block_size, kv_tokens),
                )| MigratedSequence {
                    id,
                    output_from,
                    new_output,
                    sampling: SamplingParams {
                        temperature,
                        top_p,
                        seed,
                        max_tokens,
                        stop_token_ids: stop,
                    },
                    priority,
                    headroom_blocks,
                    arrival_us,
                    preemptions,
                    tokens_recomputed,
                    block_size,
                    kv_tokens,
                },
            )
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let data = proptest::collection::vec(any::<u8>(), 0..64);
        prop_oneof![
            (
                (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
                (arb_tokens(), arb_tokens())
            )
                .prop_map(|((m, s, b, n), (prompt, output))| Message::Reserve {
                    migration_id: m,
                    seq: s,
                    block_size: b,
                    blocks_needed: n,
                    prompt,
                    output,
                }),
            (any::<u64>(), any::<u32>()).prop_map(|(m, b)| Message::Reserved {
                migration_id: m,
                blocks: b
            }),
            (any::<u64>(), 0..RefuseReason::ALL.len()).prop_map(|(m, i)| Message::Refused {
                migration_id: m,
                reason: RefuseReason::ALL[i],
            }),
            (
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                data.clone()
            )
                .prop_map(|(m, s, f, n, d)| Message::Blocks {
                    migration_id: m,
                    stage: s,
                    first_block_index: f,
                    num_blocks: n,
                    data: d,
                }),
            (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(m, s, n)| Message::Ack {
                migration_id: m,
                stage: s,
                next_block_index: n,
            }),
            (
                any::<u64>(),
                any::<u32>(),
                arb_sequence(),
                any::<u32>(),
                any::<u32>(),
                data
            )
                .prop_map(|(m, s, q, f, n, d)| Message::Commit {
                    migration_id: m,
                    stage: s,
                    sequence: Box::new(q),
                    first_block_index: f,
                    num_blocks: n,
                    data: d,
                }),
            any::<u64>().prop_map(|m| Message::Committed { migration_id: m }),
            (any::<u64>(), 0..AbortReason::ALL.len()).prop_map(|(m, i)| Message::Abort {
                migration_id: m,
                reason: AbortReason::ALL[i],
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_messages_round_trip(m in arb_message()) {
            let bytes = m.encode();
            prop_assert_eq!(Message::decode(&bytes), Ok(m));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(&bytes);
        }

        /// Random bytes behind a valid header reach every decoder.
        #[test]
        fn random_bodies_never_panic(
            tag in 0u8..10,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut bytes = vec![WIRE_VERSION, tag];
            bytes.extend_from_slice(&body);
            if let Ok(m) = Message::decode(&bytes) {
                // Whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(m.encode(), bytes);
            }
        }

        /// Corrupting one byte of a valid message never panics, and what
        /// still decodes re-encodes to the corrupted bytes.
        #[test]
        fn corrupted_messages_never_panic(
            m in arb_message(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = m.encode();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            if let Ok(d) = Message::decode(&bytes) {
                prop_assert_eq!(d.encode(), bytes);
            }
        }
    }
}
