//! [`SledBackend`]: the [`KvBackend`] on sled 0.34 (one sled `Tree` per
//! [`Tree`]). The only module that names sled; never touches record
//! formats, the network, Wasm or the engine.

use crate::backend::{KvBackend, Op, Tree, Visit};
use crate::error::{Result, StoreError};
use std::path::Path;

pub struct SledBackend {
    db: sled::Db,
    /// One sled tree per [`Tree`], indexed by `tree as usize`.
    trees: Vec<sled::Tree>,
}

fn err(tree: &'static str, op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |e| StoreError::Backend {
        tree,
        op,
        source: Box::new(e),
    }
}

impl SledBackend {
    /// Opens (creating if needed) the database directory at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_config(sled::Config::new().path(path), &path.display().to_string())
    }

    /// A database in a temporary directory, deleted on drop.
    pub fn temporary() -> Result<Self> {
        Self::from_config(sled::Config::new().temporary(true), "<temporary>")
    }

    fn from_config(config: sled::Config, shown: &str) -> Result<Self> {
        let open_err = |e: sled::Error| StoreError::Open {
            path: shown.to_owned(),
            source: Box::new(e),
        };
        let db = config.open().map_err(open_err)?;
        let trees = Tree::ALL
            .iter()
            .map(|t| db.open_tree(t.name()).map_err(open_err))
            .collect::<Result<Vec<_>>>()?;
        Ok(SledBackend { trees, db })
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        &self.trees[tree as usize]
    }
}

impl KvBackend for SledBackend {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let v = self.tree(tree).get(key).map_err(err(tree.name(), "get"))?;
        Ok(v.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        tree: Tree,
        from: &[u8],
        to: Option<&[u8]>,
        reverse: bool,
        visit: Visit<'_>,
    ) -> Result<()> {
        let t = self.tree(tree);
        let iter = match to {
            Some(to) if to <= from => return Ok(()),
            Some(to) => t.range(from..to),
            None => t.range(from..),
        };
        let mut step = |item: sled::Result<(sled::IVec, sled::IVec)>| -> Result<bool> {
            let (k, v) = item.map_err(err(tree.name(), "scan"))?;
            visit(&k, &v)
        };
        if reverse {
            for item in iter.rev() {
                if !step(item)? {
                    break;
                }
            }
        } else {
            for item in iter {
                if !step(item)? {
                    break;
                }
            }
        }
        Ok(())
    }

    fn apply(&self, tree: Tree, ops: Vec<Op>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                Op::Insert(k, v) => batch.insert(k, v),
                Op::Remove(k) => batch.remove(k),
            }
        }
        self.tree(tree)
            .apply_batch(batch)
            .map_err(err(tree.name(), "apply batch"))
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(drop).map_err(err("(all)", "flush"))
    }

    fn next_id(&self) -> Result<u64> {
        self.db.generate_id().map_err(err("(all)", "generate id"))
    }
}
