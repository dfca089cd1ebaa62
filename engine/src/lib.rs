//! llumen-engine: one inference instance of llumen (what vLLM is to Llumnix).
//!
//! - [`block_manager`]: the paged KV block pool and block tables.
//! - [`request`]: a request's tokens, sampling parameters and life.
//! - [`backend`]: the model backend interface one engine step goes through.
//! - [`scheduler`]: the local scheduler: continuous batching, preemption by
//!   recompute, load snapshots and the migration hooks.
//! - [`engine`]: one instance: the scheduler driving a backend, step by step.
//! - [`migration`]: the live-migration protocol (source and destination state
//!   machines, wire messages).
//! - [`candle`]: the real transformer backend (candle-core, paged KV cache).
//! - [`latency_model`]: latency profiles and the simulation backend timed by them.
//! - [`tokenizer`]: byte-level BPE from GGUF metadata, streaming decode, ChatML.
//! - [`models`]: where model files live (SmolLM2's GGUF); [`candle::gguf`] loads them.
//!
//! The engine knows nothing of QUIC, Wasm or sled, does no I/O of its own
//! and reads no clock: callers pass time in, so the simulator runs the same
//! code as the server. (Model loading — [`candle::gguf`],
//! [`Tokenizer::from_gguf`] — reads files, at startup only.)

pub mod backend;
pub mod block_manager;
pub mod candle;
pub mod engine;
pub mod latency_model;
pub mod migration;
pub mod models;
pub mod request;
pub mod scheduler;
pub mod tokenizer;

pub use backend::{BackendError, ForwardBatch, ModelBackend, SequenceInput, StepOutput};
pub use block_manager::{
    BlockError, BlockId, BlockManager, BlockUsage, ReservationId, SeqId, Slot, DEFAULT_BLOCK_SIZE,
};
pub use candle::weights::{mix64, SplitMix64};
pub use engine::{Engine, EngineError, StepReport};
pub use latency_model::{LatencyModelBackend, LatencyProfile, ProfileError};
pub use migration::{
    AbortReason, DecodeError, DestinationEvent, DestinationMigration, DestinationStats,
    Message as MigrationMessage, MigratedSequence, MigrationConfig, MigrationError, MigrationId,
    MigrationOutcome, MigrationResult, RefuseReason, ReleaseReason, SourceEvent, SourceMigration,
    SourceState, StageRecord,
};
pub use request::{FinishReason, Request, SamplingParams, TokenId};
pub use scheduler::{
    DetachedSequence, Scheduler, SchedulerConfig, SchedulerError, SchedulerStats, SeqEvent,
    SequenceInfo, SequenceState, StepKind, StepPlan,
};
pub use tokenizer::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer, TokenizerError};
