//! The storage seam: [`KvBackend`], an ordered key-value store with a few
//! named trees, atomic per-tree batches and an explicit durability flush.
//! [`crate::Store`] holds all record logic on top of it, so replacing sled
//! (see [`crate::sled_backend`]) means writing one more impl of this trait.
//! [`MemBackend`] is a volatile in-memory impl for tests. This module knows
//! nothing about record formats, and never touches the network, Wasm or the
//! engine.

use crate::error::Result;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The trees (key spaces) the store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tree {
    /// Load snapshots: key = instance ++ timestamp ++ seq.
    Snapshots,
    /// Policy components and metadata, keyed by sha256 (see `registry`).
    Policies,
    /// Per-kind active version and history.
    Active,
    /// Request journal: key = request ++ seq (see `journal`).
    Journal,
    /// Benchmark results: key = name ++ 0x00 ++ timestamp (see
    /// `bench_results`).
    BenchResults,
}

impl Tree {
    /// Every tree, in declaration order (`Tree::ALL[t as usize] == t`).
    pub const ALL: [Tree; 5] = [
        Tree::Snapshots,
        Tree::Policies,
        Tree::Active,
        Tree::Journal,
        Tree::BenchResults,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tree::Snapshots => "snapshots",
            Tree::Policies => "policies",
            Tree::Active => "active",
            Tree::Journal => "journal",
            Tree::BenchResults => "bench_results",
        }
    }
}

/// One write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Insert(Vec<u8>, Vec<u8>),
    Remove(Vec<u8>),
}

/// Scan visitor: gets (key, value), returns `Ok(false)` to stop early.
pub type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<bool>;

/// An ordered byte-key store. Implementations must be safe to share across
/// threads; each method is individually consistent.
pub trait KvBackend: Send + Sync + 'static {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Visits keys in `[from, to)` (`to = None`: to the end) in ascending
    /// order, or descending when `reverse`, until `visit` returns false.
    fn scan(
        &self,
        tree: Tree,
        from: &[u8],
        to: Option<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()>;

    /// Applies all ops atomically: after a crash either all or none are seen.
    fn apply(&self, tree: Tree, ops: Vec<Op>) -> Result<()>;

    /// Makes everything applied so far durable (fsync).
    fn flush(&self) -> Result<()>;

    /// A number larger than any it returned before, also across reopens.
    fn next_id(&self) -> Result<u64>;
}

fn bounds<'a>(from: &'a [u8], to: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (
        Bound::Included(from),
        to.map_or(Bound::Unbounded, Bound::Excluded),
    )
}

type MemTree = BTreeMap<Vec<u8>, Vec<u8>>;

/// Volatile [`KvBackend`] on `BTreeMap`s (nothing survives a drop).
#[derive(Default)]
pub struct MemBackend {
    trees: Mutex<BTreeMap<Tree, MemTree>>,
    ids: AtomicU64,
}

impl KvBackend for MemBackend {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let trees = self.trees.lock().unwrap_or_else(|e| e.into_inner());
        Ok(trees.get(&tree).and_then(|t| t.get(key)).cloned())
    }

    fn scan(
        &self,
        tree: Tree,
        from: &[u8],
        to: Option<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()> {
        if to.is_some_and(|to| to <= from) {
            return Ok(());
        }
        // Copy the range out so `visit` may call back into the backend.
        let items: Vec<(Vec<u8>, Vec<u8>)> = {
            let trees = self.trees.lock().unwrap_or_else(|e| e.into_inner());
            let Some(t) = trees.get(&tree) else {
                return Ok(());
            };
            let r = t
                .range::<[u8], _>(bounds(from, to))
                .map(|(k, v)| (k.clone(), v.clone()));
            if reverse {
                r.rev().collect()
            } else {
                r.collect()
            }
        };
        for (k, v) in items {
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn apply(&self, tree: Tree, ops: Vec<Op>) -> Result<()> {
        let mut trees = self.trees.lock().unwrap_or_else(|e| e.into_inner());
        let t = trees.entry(tree).or_default();
        for op in ops {
            match op {
                Op::Insert(k, v) => t.insert(k, v),
                Op::Remove(k) => t.remove(&k),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn next_id(&self) -> Result<u64> {
        Ok(self.ids.fetch_add(1, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::Tree;

    #[test]
    fn all_lists_every_tree_in_declaration_order_with_distinct_names() {
        for (i, t) in Tree::ALL.into_iter().enumerate() {
            assert_eq!(t as usize, i);
        }
        let mut names: Vec<_> = Tree::ALL.map(Tree::name).to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Tree::ALL.len());
    }
}
