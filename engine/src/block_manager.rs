//! Paged KV-cache block manager of one inference instance.
//!
//! **Owns**: the bookkeeping of a fixed pool of KV blocks (`block_size` tokens
//! each): the free list, the block table and token count of every sequence,
//! the blocks reserved for incoming migrations, and the watermark (blocks kept
//! free for running requests to grow into). It hands out [`BlockId`]s; the
//! model backend owns the memory those ids index, and the local scheduler
//! decides what to admit, grow, preempt or migrate.
//!
//! **Never touches**: tensors or KV bytes, QUIC, Wasm, sled, files, threads or
//! the clock. Every operation is pure, synchronous and deterministic, so the
//! simulator and the live engine run exactly the same code.
//!
//! Invariants (checked by [`BlockManager::check_invariants`] in the tests after
//! every operation): `free + used + reserved == total`; every block is in
//! exactly one place (the free list, one sequence's table, or one
//! reservation); a sequence of `n` tokens holds exactly `blocks_needed(n)`
//! blocks. A failed operation leaves the manager unchanged.
//!
//! Reuse order: the free list is a LIFO stack. A fresh manager hands out block
//! 0 first, then 1, 2, …; freed blocks are pushed back so that the most
//! recently freed block is the next one handed out (a freed table is pushed in
//! reverse, so its first block comes back first).
//!
//! Watermark: admission ([`BlockManager::allocate`], [`BlockManager::reserve`])
//! must leave `free >= watermark`; growth of admitted sequences
//! ([`BlockManager::append_slot`]) may use the watermark and fails only when no
//! block is free, which is the scheduler's cue to preempt.

use std::collections::BTreeMap;
use std::fmt;

/// Default number of tokens per KV block (as in vLLM / Llumnix).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Identifier of a sequence (request) on this instance.
pub type SeqId = u64;

/// Index of one physical KV block, `0..total_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The block's index into the backend's KV storage.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Handle of a set of blocks reserved for an incoming migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReservationId(pub u64);

/// Where one token's key/value goes: block and offset inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub block: BlockId,
    /// `0..block_size`; 0 means the block was freshly allocated for this token.
    pub offset: usize,
}

/// Counters for an instance-load snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockUsage {
    pub block_size: usize,
    pub total: usize,
    pub free: usize,
    pub used: usize,
    pub reserved: usize,
    pub watermark: usize,
    pub sequences: usize,
}

/// Why a block-manager operation failed. The manager is unchanged after any error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockError {
    /// The sequence holds no blocks here.
    UnknownSequence(SeqId),
    /// The sequence already has a block table.
    AlreadyAllocated(SeqId),
    /// Not enough blocks: `needed` blocks asked, `available` could be given
    /// (free blocks above the watermark for admission, free blocks for growth).
    OutOfBlocks { needed: usize, available: usize },
    /// The reservation does not exist (never made, committed or released).
    UnknownReservation(ReservationId),
    /// Committing `needed` blocks' worth of tokens from a reservation of `reserved`.
    ReservationTooSmall {
        reservation: ReservationId,
        reserved: usize,
        needed: usize,
    },
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockError::UnknownSequence(s) => {
                write!(f, "unknown sequence {s}: it holds no KV blocks")
            }
            BlockError::AlreadyAllocated(s) => write!(f, "sequence {s} already has a block table"),
            BlockError::OutOfBlocks { needed, available } => {
                write!(
                    f,
                    "out of KV blocks: {needed} needed, {available} available"
                )
            }
            BlockError::UnknownReservation(r) => {
                write!(
                    f,
                    "unknown block reservation {} (never made, committed or released)",
                    r.0
                )
            }
            BlockError::ReservationTooSmall {
                reservation,
                reserved,
                needed,
            } => write!(
                f,
                "block reservation {} holds {reserved} blocks but {needed} are needed",
                reservation.0
            ),
        }
    }
}

impl std::error::Error for BlockError {}

#[derive(Clone, Debug)]
struct SeqBlocks {
    table: Vec<BlockId>,
    tokens: usize,
}

/// The paged KV block manager of one instance. See the module docs.
#[derive(Clone, Debug)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    watermark: usize,
    /// LIFO stack: the last element is handed out next.
    free: Vec<BlockId>,
    seqs: BTreeMap<SeqId, SeqBlocks>,
    reservations: BTreeMap<ReservationId, Vec<BlockId>>,
    reserved: usize,
    next_reservation: u64,
}

impl BlockManager {
    /// A pool of `total_blocks` blocks of `block_size` tokens, keeping
    /// `watermark` blocks free at admission.
    ///
    /// # Panics
    /// If `block_size == 0`, `watermark > total_blocks` or `total_blocks > u32::MAX`.
    pub fn new(total_blocks: usize, block_size: usize, watermark: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(
            watermark <= total_blocks,
            "watermark {watermark} exceeds {total_blocks} blocks"
        );
        assert!(total_blocks <= u32::MAX as usize, "too many blocks");
        BlockManager {
            block_size,
            total: total_blocks,
            watermark,
            free: (0..total_blocks as u32).rev().map(BlockId).collect(),
            seqs: BTreeMap::new(),
            reservations: BTreeMap::new(),
            reserved: 0,
            next_reservation: 0,
        }
    }

    /// Blocks needed to hold `tokens` tokens (`ceil(tokens / block_size)`).
    pub fn blocks_needed(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Whether a prompt of `prompt_tokens` can be admitted now, leaving
    /// `free >= watermark`.
    pub fn can_allocate(&self, prompt_tokens: usize) -> bool {
        self.blocks_needed(prompt_tokens) <= self.available_blocks()
    }

    /// Whether a prompt of `prompt_tokens` could ever be admitted (on an empty
    /// pool). When false, the scheduler should reject it rather than wait.
    pub fn can_ever_allocate(&self, prompt_tokens: usize) -> bool {
        self.blocks_needed(prompt_tokens) <= self.total - self.watermark
    }

    /// Give `seq` a block table for its `prompt_tokens` (admission: checks the watermark).
    pub fn allocate(&mut self, seq: SeqId, prompt_tokens: usize) -> Result<&[BlockId], BlockError> {
        if self.seqs.contains_key(&seq) {
            return Err(BlockError::AlreadyAllocated(seq));
        }
        let needed = self.blocks_needed(prompt_tokens);
        self.admit(needed)?;
        let table = self.take(needed);
        let entry = self.seqs.entry(seq).or_insert(SeqBlocks {
            table,
            tokens: prompt_tokens,
        });
        Ok(&entry.table)
    }

    /// Make room for one more token of `seq` and return its slot. Takes a new
    /// block when the last one is full (the watermark may be used); on
    /// [`BlockError::OutOfBlocks`] the scheduler should preempt.
    pub fn append_slot(&mut self, seq: SeqId) -> Result<Slot, BlockError> {
        let bs = self.block_size;
        let entry = self
            .seqs
            .get_mut(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?;
        let offset = entry.tokens % bs;
        if entry.tokens == entry.table.len() * bs {
            let block = self.free.pop().ok_or(BlockError::OutOfBlocks {
                needed: 1,
                available: 0,
            })?;
            entry.table.push(block);
        }
        entry.tokens += 1;
        let block = *entry
            .table
            .last()
            .expect("a sequence with tokens has a block");
        Ok(Slot { block, offset })
    }

    /// Return all blocks of `seq` to the free list (finished, aborted,
    /// preempted by recompute, or migrated away).
    pub fn free(&mut self, seq: SeqId) -> Result<(), BlockError> {
        let entry = self
            .seqs
            .remove(&seq)
            .ok_or(BlockError::UnknownSequence(seq))?;
        self.give_back(entry.table);
        Ok(())
    }

    /// The block table of `seq`, in token order.
    pub fn block_table(&self, seq: SeqId) -> Result<&[BlockId], BlockError> {
        self.seqs
            .get(&seq)
            .map(|e| e.table.as_slice())
            .ok_or(BlockError::UnknownSequence(seq))
    }

    /// Number of tokens `seq` holds.
    pub fn num_tokens(&self, seq: SeqId) -> Result<usize, BlockError> {
        self.seqs
            .get(&seq)
            .map(|e| e.tokens)
            .ok_or(BlockError::UnknownSequence(seq))
    }

    /// Number of blocks `seq` holds.
    pub fn num_blocks(&self, seq: SeqId) -> Result<usize, BlockError> {
        self.block_table(seq).map(<[BlockId]>::len)
    }

    /// Blocks held per sequence, in sequence-id order.
    pub fn blocks_per_sequence(&self) -> impl Iterator<Item = (SeqId, usize)> + '_ {
        self.seqs.iter().map(|(s, e)| (*s, e.table.len()))
    }

    /// Whether `seq` holds a block table here.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Reserve `n` blocks for an incoming migration (admission: checks the watermark).
    pub fn reserve(&mut self, n: usize) -> Result<ReservationId, BlockError> {
        self.admit(n)?;
        let id = ReservationId(self.next_reservation);
        self.next_reservation += 1;
        let blocks = self.take(n);
        self.reserved += n;
        self.reservations.insert(id, blocks);
        Ok(id)
    }

    /// Adds `n` more blocks at the end of a reservation (admission: checks
    /// the watermark): an incoming migration whose sequence grew while its
    /// KV was being copied. On error the reservation is unchanged.
    pub fn grow_reservation(&mut self, r: ReservationId, n: usize) -> Result<(), BlockError> {
        if !self.reservations.contains_key(&r) {
            return Err(BlockError::UnknownReservation(r));
        }
        self.admit(n)?;
        let more = self.take(n);
        self.reserved += n;
        self.reservations
            .get_mut(&r)
            .expect("checked above")
            .extend(more);
        Ok(())
    }

    /// The blocks of a reservation, so the KV import can write into them before commit.
    pub fn reservation_blocks(&self, r: ReservationId) -> Result<&[BlockId], BlockError> {
        self.reservations
            .get(&r)
            .map(Vec::as_slice)
            .ok_or(BlockError::UnknownReservation(r))
    }

    /// Turn a reservation into the block table of `seq` holding `num_tokens`
    /// tokens (in the reservation's block order). Blocks beyond
    /// `blocks_needed(num_tokens)` go back to the free list.
    pub fn commit(
        &mut self,
        r: ReservationId,
        seq: SeqId,
        num_tokens: usize,
    ) -> Result<&[BlockId], BlockError> {
        let reserved = self
            .reservations
            .get(&r)
            .ok_or(BlockError::UnknownReservation(r))?
            .len();
        if self.seqs.contains_key(&seq) {
            return Err(BlockError::AlreadyAllocated(seq));
        }
        let needed = self.blocks_needed(num_tokens);
        if needed > reserved {
            return Err(BlockError::ReservationTooSmall {
                reservation: r,
                reserved,
                needed,
            });
        }
        let mut table = self.reservations.remove(&r).expect("checked above");
        self.reserved -= reserved;
        let surplus = table.split_off(needed);
        self.give_back(surplus);
        let entry = self.seqs.entry(seq).or_insert(SeqBlocks {
            table,
            tokens: num_tokens,
        });
        Ok(&entry.table)
    }

    /// Give a reservation's blocks back (migration aborted or timed out).
    pub fn release(&mut self, r: ReservationId) -> Result<(), BlockError> {
        let blocks = self
            .reservations
            .remove(&r)
            .ok_or(BlockError::UnknownReservation(r))?;
        self.reserved -= blocks.len();
        self.give_back(blocks);
        Ok(())
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn total_blocks(&self) -> usize {
        self.total
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    /// Blocks in sequences' block tables.
    pub fn used_blocks(&self) -> usize {
        self.total - self.free.len() - self.reserved
    }
    /// Blocks held by reservations.
    pub fn reserved_blocks(&self) -> usize {
        self.reserved
    }
    pub fn watermark_blocks(&self) -> usize {
        self.watermark
    }
    /// Free blocks above the watermark (Llumnix's `A`); what admission may take.
    pub fn available_blocks(&self) -> usize {
        self.free.len().saturating_sub(self.watermark)
    }
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// All counters at once, for a load snapshot.
    pub fn usage(&self) -> BlockUsage {
        BlockUsage {
            block_size: self.block_size,
            total: self.total,
            free: self.free_blocks(),
            used: self.used_blocks(),
            reserved: self.reserved,
            watermark: self.watermark,
            sequences: self.seqs.len(),
        }
    }

    /// Full consistency check, O(total): every block in exactly one place,
    /// counters add up, tables sized to their token counts. For tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut owner: Vec<Option<String>> = vec![None; self.total];
        let places = self.free.iter().map(|b| (*b, "free list".to_string()));
        let tables = self
            .seqs
            .iter()
            .flat_map(|(s, e)| e.table.iter().map(move |b| (*b, format!("sequence {s}"))));
        let res = self
            .reservations
            .iter()
            .flat_map(|(r, v)| v.iter().map(move |b| (*b, format!("reservation {}", r.0))));
        for (b, place) in places.chain(tables).chain(res) {
            let slot = owner
                .get_mut(b.index())
                .ok_or(format!("block {} out of range", b.0))?;
            if let Some(prev) = slot.replace(place.clone()) {
                return Err(format!("block {} is in both {prev} and {place}", b.0));
            }
        }
        if let Some(i) = owner.iter().position(Option::is_none) {
            return Err(format!("block {i} is lost"));
        }
        let used: usize = self.seqs.values().map(|e| e.table.len()).sum();
        let reserved: usize = self.reservations.values().map(Vec::len).sum();
        if reserved != self.reserved || self.free.len() + used + reserved != self.total {
            return Err(format!(
                "free {} + used {used} + reserved {reserved} != total {}",
                self.free.len(),
                self.total
            ));
        }
        for (s, e) in &self.seqs {
            if e.table.len() != self.blocks_needed(e.tokens) {
                return Err(format!(
                    "sequence {s}: {} tokens in {} blocks",
                    e.tokens,
                    e.table.len()
                ));
            }
        }
        Ok(())
    }

    /// Admission check: taking `needed` blocks must leave `free >= watermark`.
    fn admit(&self, needed: usize) -> Result<(), BlockError> {
        let available = self.available_blocks();
        if needed > available {
            return Err(BlockError::OutOfBlocks { needed, available });
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Vec<BlockId> {
        let at = self.free.len() - n;
        let mut blocks = self.free.split_off(at);
        blocks.reverse();
        blocks
    }

    fn give_back(&mut self, blocks: Vec<BlockId>) {
        self.free.extend(blocks.into_iter().rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> Vec<BlockId> {
        v.iter().copied().map(BlockId).collect()
    }

    #[test]
    fn grow_reservation_appends_and_respects_watermark() {
        let mut m = BlockManager::new(10, 4, 2);
        let r = m.reserve(3).unwrap();
        m.grow_reservation(r, 2).unwrap();
        assert_eq!(m.reservation_blocks(r).unwrap(), ids(&[0, 1, 2, 3, 4]));
        assert_eq!(m.reserved_blocks(), 5);
        assert_eq!(
            m.grow_reservation(r, 4),
            Err(BlockError::OutOfBlocks {
                needed: 4,
                available: 3
            })
        );
        assert_eq!(
            m.grow_reservation(ReservationId(9), 1),
            Err(BlockError::UnknownReservation(ReservationId(9)))
        );
        m.check_invariants().unwrap();
        m.release(r).unwrap();
        assert_eq!((m.free_blocks(), m.reserved_blocks()), (10, 0));
        m.check_invariants().unwrap();
    }

    #[test]
    fn blocks_needed_rounds_up() {
        let m = BlockManager::new(10, DEFAULT_BLOCK_SIZE, 0);
        assert_eq!(
            [0, 1, 16, 17, 32, 33].map(|t| m.blocks_needed(t)),
            [0, 1, 1, 2, 2, 3]
        );
    }

    #[test]
    fn allocate_hands_out_lowest_first_and_counts() {
        let mut m = BlockManager::new(10, 4, 2);
        assert_eq!(m.allocate(1, 9).unwrap(), ids(&[0, 1, 2]));
        assert_eq!(m.allocate(2, 4).unwrap(), ids(&[3]));
        assert_eq!(m.block_table(1).unwrap(), ids(&[0, 1, 2]));
        assert_eq!((m.num_tokens(1), m.num_blocks(1)), (Ok(9), Ok(3)));
        let u = m.usage();
        assert_eq!(
            (
                u.total,
                u.free,
                u.used,
                u.reserved,
                u.watermark,
                u.sequences
            ),
            (10, 6, 4, 0, 2, 2)
        );
        assert_eq!(
            m.blocks_per_sequence().collect::<Vec<_>>(),
            vec![(1, 3), (2, 1)]
        );
        assert_eq!(m.allocate(1, 1), Err(BlockError::AlreadyAllocated(1)));
        m.check_invariants().unwrap();
    }

    #[test]
    fn admission_respects_watermark() {
        let mut m = BlockManager::new(10, 4, 2);
        assert!(m.can_allocate(32) && !m.can_allocate(33));
        assert!(m.can_ever_allocate(32) && !m.can_ever_allocate(33));
        assert_eq!(
            m.allocate(1, 33),
            Err(BlockError::OutOfBlocks {
                needed: 9,
                available: 8
            })
        );
        assert!(!m.contains(1));
        m.allocate(1, 32).unwrap();
        assert_eq!((m.free_blocks(), m.available_blocks()), (2, 0));
        assert!(m.can_allocate(0) && !m.can_allocate(1));
        m.check_invariants().unwrap();
    }

    #[test]
    fn append_slot_fills_then_grows_into_watermark_then_fails() {
        let mut m = BlockManager::new(3, 2, 1);
        m.allocate(7, 3).unwrap();
        assert_eq!(
            m.append_slot(7),
            Ok(Slot {
                block: BlockId(1),
                offset: 1
            })
        );
        assert_eq!(
            m.append_slot(7),
            Ok(Slot {
                block: BlockId(2),
                offset: 0
            })
        );
        assert_eq!(
            m.append_slot(7),
            Ok(Slot {
                block: BlockId(2),
                offset: 1
            })
        );
        assert_eq!((m.free_blocks(), m.num_tokens(7)), (0, Ok(6)));
        assert_eq!(
            m.append_slot(7),
            Err(BlockError::OutOfBlocks {
                needed: 1,
                available: 0
            })
        );
        assert_eq!(m.num_tokens(7), Ok(6));
        assert_eq!(m.append_slot(8), Err(BlockError::UnknownSequence(8)));
        m.check_invariants().unwrap();
    }

    #[test]
    fn empty_sequence_gets_its_first_block_on_append() {
        let mut m = BlockManager::new(2, 4, 0);
        assert!(m.allocate(1, 0).unwrap().is_empty());
        assert_eq!(
            m.append_slot(1),
            Ok(Slot {
                block: BlockId(0),
                offset: 0
            })
        );
        m.check_invariants().unwrap();
    }

    #[test]
    fn free_returns_blocks_lifo() {
        let mut m = BlockManager::new(8, 4, 0);
        m.allocate(1, 8).unwrap();
        m.allocate(2, 4).unwrap();
        m.free(1).unwrap();
        assert_eq!(m.free(1), Err(BlockError::UnknownSequence(1)));
        assert_eq!(m.block_table(1), Err(BlockError::UnknownSequence(1)));
        assert_eq!(m.free_blocks(), 7);
        // Sequence 1's blocks come back first, in their original order.
        assert_eq!(m.allocate(3, 12).unwrap(), ids(&[0, 1, 3]));
        m.check_invariants().unwrap();
    }

    #[test]
    fn reserve_commit_release() {
        let mut m = BlockManager::new(10, 4, 2);
        assert_eq!(
            m.reserve(9),
            Err(BlockError::OutOfBlocks {
                needed: 9,
                available: 8
            })
        );
        let r = m.reserve(4).unwrap();
        assert_eq!(m.reservation_blocks(r).unwrap(), ids(&[0, 1, 2, 3]));
        assert_eq!(
            (m.reserved_blocks(), m.used_blocks(), m.free_blocks()),
            (4, 0, 6)
        );
        m.allocate(1, 1).unwrap();
        assert_eq!(m.commit(r, 1, 4), Err(BlockError::AlreadyAllocated(1)));
        let too_small = BlockError::ReservationTooSmall {
            reservation: r,
            reserved: 4,
            needed: 5,
        };
        assert_eq!(m.commit(r, 2, 17), Err(too_small));
        // 10 tokens need 3 blocks: the 4th goes back to the free list.
        assert_eq!(m.commit(r, 2, 10).unwrap(), ids(&[0, 1, 2]));
        assert_eq!(
            (m.reserved_blocks(), m.used_blocks(), m.free_blocks()),
            (0, 4, 6)
        );
        assert_eq!(
            m.append_slot(2),
            Ok(Slot {
                block: BlockId(2),
                offset: 2
            })
        );
        assert_eq!(m.commit(r, 3, 1), Err(BlockError::UnknownReservation(r)));
        let r2 = m.reserve(2).unwrap();
        assert_ne!(r, r2);
        m.release(r2).unwrap();
        assert_eq!(m.release(r2), Err(BlockError::UnknownReservation(r2)));
        assert_eq!(
            m.reservation_blocks(r2),
            Err(BlockError::UnknownReservation(r2))
        );
        assert_eq!((m.reserved_blocks(), m.free_blocks()), (0, 6));
        m.check_invariants().unwrap();
    }

    #[test]
    fn errors_display_clearly() {
        let cases = [
            (BlockError::UnknownSequence(3), "unknown sequence 3"),
            (
                BlockError::AlreadyAllocated(3),
                "sequence 3 already has a block table",
            ),
            (
                BlockError::OutOfBlocks {
                    needed: 2,
                    available: 1,
                },
                "out of KV blocks: 2 needed, 1 available",
            ),
            (
                BlockError::UnknownReservation(ReservationId(5)),
                "unknown block reservation 5",
            ),
            (
                BlockError::ReservationTooSmall {
                    reservation: ReservationId(5),
                    reserved: 1,
                    needed: 2,
                },
                "reservation 5 holds 1 blocks but 2 are needed",
            ),
        ];
        for (e, want) in cases {
            let boxed: Box<dyn std::error::Error> = Box::new(e);
            assert!(boxed.to_string().contains(want), "{boxed}");
        }
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;
        use proptest::test_runner::{RngAlgorithm, RngSeed};

        #[derive(Clone, Debug)]
        enum Op {
            Allocate(SeqId, usize),
            Append(SeqId),
            Free(SeqId),
            Reserve(usize),
            /// Commit the i-th live reservation (mod count).
            Commit(usize, SeqId, usize),
            /// Release the i-th live reservation (mod count).
            Release(usize),
            /// Release any reservation ever issued, possibly dead (a timeout
            /// racing a commit): must fail cleanly when dead.
            Abort(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            let seq = 0u64..6;
            prop_oneof![
                3 => (seq.clone(), 0usize..40).prop_map(|(s, t)| Op::Allocate(s, t)),
                6 => seq.clone().prop_map(Op::Append),
                2 => seq.clone().prop_map(Op::Free),
                2 => (0usize..6).prop_map(Op::Reserve),
                2 => (any::<usize>(), seq, 0usize..30).prop_map(|(i, s, t)| Op::Commit(i, s, t)),
                1 => any::<usize>().prop_map(Op::Release),
                1 => any::<usize>().prop_map(Op::Abort),
            ]
        }

        /// Reference model: tokens per sequence and size per live reservation.
        #[derive(Default)]
        struct Model {
            seqs: BTreeMap<SeqId, usize>,
            live: BTreeMap<ReservationId, usize>,
            issued: Vec<ReservationId>,
        }

        fn step(m: &mut BlockManager, model: &mut Model, op: &Op) {
            let (available, free) = (m.available_blocks(), m.free_blocks());
            let pick = |i: usize, model: &Model| {
                model.live.keys().nth(i % model.live.len().max(1)).copied()
            };
            match *op {
                Op::Allocate(s, t) => {
                    let ok = !model.seqs.contains_key(&s) && m.blocks_needed(t) <= available;
                    assert_eq!(m.allocate(s, t).is_ok(), ok);
                    if ok {
                        model.seqs.insert(s, t);
                    }
                }
                Op::Append(s) => {
                    let r = m.append_slot(s);
                    match model.seqs.get_mut(&s) {
                        None => assert_eq!(r, Err(BlockError::UnknownSequence(s))),
                        Some(t) if *t % m.block_size() != 0 || free > 0 => {
                            let slot = r.unwrap();
                            assert_eq!(slot.offset, *t % m.block_size());
                            assert_eq!(m.block_table(s).unwrap().last(), Some(&slot.block));
                            *t += 1;
                        }
                        Some(_) => assert!(matches!(r, Err(BlockError::OutOfBlocks { .. }))),
                    }
                }
                Op::Free(s) => assert_eq!(m.free(s).is_ok(), model.seqs.remove(&s).is_some()),
                Op::Reserve(n) => match m.reserve(n) {
                    Ok(r) => {
                        assert!(n <= available && !model.issued.contains(&r));
                        model.live.insert(r, n);
                        model.issued.push(r);
                    }
                    Err(e) => assert_eq!(
                        e,
                        BlockError::OutOfBlocks {
                            needed: n,
                            available
                        }
                    ),
                },
                Op::Commit(i, s, t) => {
                    let Some(r) = pick(i, model) else { return };
                    let ok = !model.seqs.contains_key(&s) && m.blocks_needed(t) <= model.live[&r];
                    assert_eq!(m.commit(r, s, t).is_ok(), ok);
                    if ok {
                        model.live.remove(&r);
                        model.seqs.insert(s, t);
                    }
                }
                Op::Release(i) => {
                    let Some(r) = pick(i, model) else { return };
                    m.release(r).unwrap();
                    model.live.remove(&r);
                }
                Op::Abort(i) => {
                    let Some(&r) = model.issued.get(i % model.issued.len().max(1)) else {
                        return;
                    };
                    let was_live = model.live.remove(&r).is_some();
                    let res = m.release(r);
                    assert_eq!(res.is_ok(), was_live);
                    if !was_live {
                        assert_eq!(res, Err(BlockError::UnknownReservation(r)));
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 512,
                failure_persistence: None,
                rng_algorithm: RngAlgorithm::ChaCha,
                rng_seed: RngSeed::Fixed(0x11_0e_4e_b1),
                ..ProptestConfig::default()
            })]

            #[test]
            fn invariants_hold_under_random_operations(
                total in 0usize..24,
                block_size in 1usize..6,
                watermark_pct in 0usize..=30,
                ops in proptest::collection::vec(op(), 1..200),
            ) {
                let mut m = BlockManager::new(total, block_size, total * watermark_pct / 100);
                let mut model = Model::default();
                for op in &ops {
                    step(&mut m, &mut model, op);
                    prop_assert_eq!(m.check_invariants(), Ok(()), "after {:?}", op);
                    let used: usize = model.seqs.values().map(|t| m.blocks_needed(*t)).sum();
                    let reserved: usize = model.live.values().sum();
                    prop_assert_eq!((m.used_blocks(), m.reserved_blocks()), (used, reserved));
                    prop_assert_eq!(m.free_blocks() + used + reserved, total);
                    prop_assert_eq!(m.num_sequences(), model.seqs.len());
                    for (s, t) in &model.seqs {
                        prop_assert_eq!(m.num_tokens(*s), Ok(*t));
                    }
                }
            }
        }
    }
}
