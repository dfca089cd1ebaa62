//! llumen-store: the manager's durable state on an embedded ordered
//! key-value store (sled, behind [`KvBackend`]).
//!
//! Owns: the load-snapshot time series ([`snapshots`]), the policy registry
//! (every uploaded component by sha256, the active version per kind and its
//! history, [`registry`]), and their byte formats ([`codec`]). Never touches
//! QUIC, Wasm (components are opaque bytes here) or the engine, and never
//! imports `llumen-host`.
//!
//! Durability: snapshot appends are buffered in memory and written as one
//! atomic batch by [`Store::flush`] or when [`Store::batch_size`] snapshots
//! are pending (dropping the store flushes too), so a crash loses at most the
//! unflushed batch. Reads merge the buffer, so they see every append at once.
//! Registry writes are applied atomically and flushed to disk before they
//! return.

pub mod backend;
pub mod codec;
pub mod error;
pub mod registry;
pub mod sled_backend;
pub mod snapshots;

pub use backend::{KvBackend, MemBackend, Tree};
pub use codec::{ActiveRecord, PolicyMeta};
pub use error::{DecodeError, Result, StoreError};
pub use llumen_policy_logic::InstanceLoad;
pub use registry::StoredPolicy;
pub use sled_backend::SledBackend;

use codec::SnapshotKey;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Snapshots buffered before an append writes them out.
pub const DEFAULT_BATCH_SIZE: usize = 256;

/// The store. Share it behind an `Arc`: every method takes `&self`.
pub struct Store<B: KvBackend = SledBackend> {
    backend: B,
    /// Appended snapshots not yet written to the backend.
    pending: Mutex<BTreeMap<SnapshotKey, InstanceLoad>>,
    batch_size: usize,
    /// Serialises registry read-modify-writes (active/history).
    registry_lock: Mutex<()>,
}

impl Store<SledBackend> {
    /// Opens (creating if needed) a sled database in directory `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::with_backend(SledBackend::open(path.as_ref())?))
    }

    /// A sled database in a temporary directory, removed on drop (tests).
    pub fn temporary() -> Result<Self> {
        Ok(Self::with_backend(SledBackend::temporary()?))
    }
}

impl<B: KvBackend> Store<B> {
    pub fn with_backend(backend: B) -> Self {
        Store {
            backend,
            pending: Mutex::default(),
            batch_size: DEFAULT_BATCH_SIZE,
            registry_lock: Mutex::default(),
        }
    }

    /// Sets how many pending snapshots trigger a write (at least 1).
    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Number of appended snapshots not yet written to the backend.
    pub fn pending_len(&self) -> usize {
        self.pending().len()
    }

    /// Writes the pending snapshots as one atomic batch, then makes
    /// everything durable. On error the snapshots stay pending.
    pub fn flush(&self) -> Result<()> {
        self.write_pending()?;
        self.backend.flush()
    }

    /// Moves pending snapshots to the backend. The lock is held during the
    /// write so readers never miss a snapshot in transit.
    fn write_pending(&self) -> Result<()> {
        let mut pending = self.pending();
        if pending.is_empty() {
            return Ok(());
        }
        let ops = pending
            .iter()
            .map(|(k, s)| backend::Op::Insert(k.to_vec(), codec::encode_snapshot(s).to_vec()))
            .collect();
        self.backend.apply(Tree::Snapshots, ops)?;
        pending.clear();
        Ok(())
    }

    fn pending(&self) -> MutexGuard<'_, BTreeMap<SnapshotKey, InstanceLoad>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B: KvBackend> Drop for Store<B> {
    fn drop(&mut self) {
        // Best effort: a failure here is what a crash would lose anyway.
        let _ = self.flush();
    }
}
