//! llumen-engine: one inference instance of llumen.
//!
//! So far: the paged KV [`block_manager`]. The engine knows nothing of QUIC,
//! Wasm or sled.

pub mod block_manager;

pub use block_manager::{
    BlockError, BlockId, BlockManager, BlockUsage, ReservationId, SeqId, Slot, DEFAULT_BLOCK_SIZE,
};
