//! llumen-store: the manager's durable state on an embedded ordered
//! key-value store (sled, behind [`KvBackend`]).
//!
//! Owns: the load-snapshot time series ([`snapshots`]), the policy registry
//! (every uploaded component by sha256, the active version per kind and its
//! history, [`registry`]), the request journal the manager recovers from
//! after a crash (accepted / dispatched / finished events per request,
//! [`journal`]), benchmark results by name and time ([`bench_results`]), and
//! all their byte formats ([`codec`]). Never touches QUIC, Wasm (components
//! are opaque bytes here) or the engine, and never imports `llumen-host`.
//!
//! Durability: snapshot appends and journal events share one in-memory
//! buffer, written out together (one atomic batch per tree) by
//! [`Store::flush`] or when [`Store::batch_size`] entries are pending
//! (dropping the store flushes too), so they stay off the hot path. A crash loses at most the last
//! unflushed batch of snapshots and journal events; never a registered
//! policy or the active-version record. Reads merge the buffer, so they see
//! every append and journal event at once. Registry writes and bench results
//! are applied atomically and flushed to disk before they return.

pub mod backend;
pub mod bench_results;
pub mod codec;
pub mod error;
pub mod journal;
pub mod registry;
pub mod sled_backend;
pub mod snapshots;

pub use backend::{KvBackend, MemBackend, Tree};
pub use codec::{ActiveRecord, JournalEvent, JournalOutcome, PolicyMeta};
pub use error::{DecodeError, Result, StoreError};
pub use journal::DispatchRecord;
pub use llumen_policy_logic::InstanceLoad;
pub use registry::StoredPolicy;
pub use sled_backend::SledBackend;

use codec::{JournalKey, SnapshotKey};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Entries (snapshots and journal events) buffered before an append writes
/// them out.
pub const DEFAULT_BATCH_SIZE: usize = 256;

/// Appended snapshots and journal events not yet written to the backend.
#[derive(Default)]
struct Pending {
    snapshots: BTreeMap<SnapshotKey, InstanceLoad>,
    journal: BTreeMap<JournalKey, JournalEvent>,
}

impl Pending {
    fn len(&self) -> usize {
        self.snapshots.len() + self.journal.len()
    }
}

/// The store. Share it behind an `Arc`: every method takes `&self`.
pub struct Store<B: KvBackend = SledBackend> {
    backend: B,
    /// Appended snapshots and journal events not yet written.
    pending: Mutex<Pending>,
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

    /// Sets how many pending entries (snapshots plus journal events) trigger
    /// a write (at least 1).
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

    /// Number of appended snapshots and journal events not yet written to
    /// the backend.
    pub fn pending_len(&self) -> usize {
        self.pending().len()
    }

    /// Writes the pending snapshots and journal events (one atomic batch per
    /// tree), then makes everything durable. On error whatever was not
    /// written stays pending.
    pub fn flush(&self) -> Result<()> {
        self.write_pending()?;
        self.backend.flush()
    }

    /// Moves pending snapshots and journal events to the backend. The lock
    /// is held during the write so readers never miss an entry in transit.
    fn write_pending(&self) -> Result<()> {
        let mut pending = self.pending();
        if !pending.snapshots.is_empty() {
            let ops = pending
                .snapshots
                .iter()
                .map(|(k, s)| backend::Op::Insert(k.to_vec(), codec::encode_snapshot(s).to_vec()))
                .collect();
            self.backend.apply(Tree::Snapshots, ops)?;
            pending.snapshots.clear();
        }
        if !pending.journal.is_empty() {
            let ops = pending
                .journal
                .iter()
                .map(|(k, e)| backend::Op::Insert(k.to_vec(), codec::encode_journal_event(e)))
                .collect();
            self.backend.apply(Tree::Journal, ops)?;
            pending.journal.clear();
        }
        Ok(())
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B: KvBackend> Drop for Store<B> {
    fn drop(&mut self) {
        // Best effort: a failure here is what a crash would lose anyway.
        let _ = self.flush();
    }
}
