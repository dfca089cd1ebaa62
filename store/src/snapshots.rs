//! The load-snapshot time series: append (buffered), point and range reads
//! per instance and across instances, and retention. Keys are
//! instance ++ timestamp_us ++ seq (big-endian; seq from
//! [`KvBackend::next_id`], unique across reopens), so equal timestamps stay
//! distinct and a prefix scan is a time-ordered scan. Reads merge the
//! in-memory buffer with the backend. Time ranges are half-open
//! `[from_us, to_us)`. Never touches the network, Wasm or the engine.

use crate::backend::{KvBackend, Op, Tree};
use crate::codec::{self, snapshot_key, SnapshotKey};
use crate::error::{DecodeError, KeyDisplay, Result, StoreError};
use crate::{InstanceLoad, Store};
use std::collections::BTreeMap;
use std::ops::Bound;

fn corrupt(key: &[u8], source: DecodeError) -> StoreError {
    StoreError::Corrupt {
        tree: Tree::Snapshots.name(),
        key: KeyDisplay(key.to_vec()),
        source,
    }
}

/// Decodes one stored entry and checks that key and value agree.
fn decode_entry(key: &[u8], value: &[u8]) -> Result<(SnapshotKey, InstanceLoad)> {
    let (inst, ts, _) = codec::parse_snapshot_key(key).map_err(|e| corrupt(key, e))?;
    let s = codec::decode_snapshot(value).map_err(|e| corrupt(key, e))?;
    if (s.instance, s.timestamp_us) != (inst, ts) {
        return Err(corrupt(
            key,
            DecodeError::Invalid("key does not match the value's instance/timestamp"),
        ));
    }
    Ok((key.try_into().expect("length checked"), s))
}

/// First key past every key of `instance` (None: end of the key space).
fn instance_end(instance: u32) -> Option<SnapshotKey> {
    instance.checked_add(1).map(|next| snapshot_key(next, 0, 0))
}

impl<B: KvBackend> Store<B> {
    /// Buffers one snapshot; writes the buffer (shared with journal events)
    /// when it reaches [`Store::batch_size`]. Visible to reads at once; durable after the
    /// next [`Store::flush`].
    pub fn append(&self, snapshot: &InstanceLoad) -> Result<()> {
        let seq = self.backend.next_id()?;
        let key = snapshot_key(snapshot.instance, snapshot.timestamp_us, seq);
        let full = {
            let mut pending = self.pending();
            pending.snapshots.insert(key, *snapshot);
            pending.len() >= self.batch_size
        };
        if full {
            self.flush()?;
        }
        Ok(())
    }

    /// Up to `max` entries of `[from, to)` from both the buffer and the
    /// backend, ascending (or the last `max`, still ascending, if `newest`).
    fn collect(
        &self,
        from: SnapshotKey,
        to: Option<SnapshotKey>,
        newest: bool,
        max: usize,
    ) -> Result<Vec<(SnapshotKey, InstanceLoad)>> {
        if max == 0 || to.is_some_and(|to| to <= from) {
            return Ok(Vec::new());
        }
        // Buffer first, then backend: a snapshot flushed in between shows up
        // in both (merged by key) rather than in neither.
        let mut merged: BTreeMap<SnapshotKey, InstanceLoad> = {
            let pending = self.pending();
            let range = pending.snapshots.range((
                Bound::Included(from),
                to.map_or(Bound::Unbounded, Bound::Excluded),
            ));
            if newest {
                range.rev().take(max).map(|(k, s)| (*k, *s)).collect()
            } else {
                range.take(max).map(|(k, s)| (*k, *s)).collect()
            }
        };
        let mut taken = 0;
        self.backend.scan(
            Tree::Snapshots,
            &from,
            to.as_ref().map(|t| &t[..]),
            newest,
            &mut |k, v| {
                let (key, s) = decode_entry(k, v)?;
                merged.insert(key, s);
                taken += 1;
                Ok(taken < max)
            },
        )?;
        let n = merged.len();
        let skip = if newest { n.saturating_sub(max) } else { 0 };
        Ok(merged.into_iter().skip(skip).take(max).collect())
    }

    /// The newest snapshot of `instance` (by timestamp, then append order).
    pub fn latest(&self, instance: u32) -> Result<Option<InstanceLoad>> {
        Ok(self.recent(instance, 1)?.pop())
    }

    /// The newest `max` snapshots of `instance`, oldest first.
    pub fn recent(&self, instance: u32, max: usize) -> Result<Vec<InstanceLoad>> {
        let from = snapshot_key(instance, 0, 0);
        Ok(self
            .collect(from, instance_end(instance), true, max)?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    /// Snapshots of `instance` with `from_us <= timestamp_us < to_us`,
    /// oldest first.
    pub fn range(&self, instance: u32, from_us: u64, to_us: u64) -> Result<Vec<InstanceLoad>> {
        if from_us >= to_us {
            return Ok(Vec::new());
        }
        let (from, to) = (
            snapshot_key(instance, from_us, 0),
            snapshot_key(instance, to_us, 0),
        );
        Ok(self
            .collect(from, Some(to), false, usize::MAX)?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    /// Snapshots of every instance in `[from_us, to_us)`, ordered by
    /// timestamp, then instance, then append order.
    pub fn range_all(&self, from_us: u64, to_us: u64) -> Result<Vec<InstanceLoad>> {
        if from_us >= to_us {
            return Ok(Vec::new());
        }
        let mut all = Vec::new();
        for inst in self.instances()? {
            let (from, to) = (snapshot_key(inst, from_us, 0), snapshot_key(inst, to_us, 0));
            all.extend(self.collect(from, Some(to), false, usize::MAX)?);
        }
        all.sort_unstable_by_key(|(k, s)| (s.timestamp_us, *k));
        Ok(all.into_iter().map(|(_, s)| s).collect())
    }

    /// Instances with at least one snapshot, ascending.
    pub fn instances(&self) -> Result<Vec<u32>> {
        let mut found: Vec<u32> = self
            .pending()
            .snapshots
            .keys()
            .map(|k| u32::from_be_bytes([k[0], k[1], k[2], k[3]]))
            .collect();
        // Seek from instance to instance: one short scan per instance.
        let mut next = Some(0u32);
        while let Some(from) = next {
            next = None;
            self.backend.scan(
                Tree::Snapshots,
                &snapshot_key(from, 0, 0),
                None,
                false,
                &mut |k, _| {
                    let (inst, _, _) = codec::parse_snapshot_key(k).map_err(|e| corrupt(k, e))?;
                    found.push(inst);
                    next = inst.checked_add(1);
                    Ok(false)
                },
            )?;
        }
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }

    /// Keeps the newest `per_instance` snapshots of every instance; returns
    /// how many were removed. Flushes the buffer first.
    pub fn retain_newest(&self, per_instance: usize) -> Result<usize> {
        self.remove_where(|inst| {
            (
                snapshot_key(inst, 0, 0),
                instance_end(inst),
                true,
                per_instance,
            )
        })
    }

    /// Removes every snapshot older than `cutoff_us`; returns how many.
    /// Flushes the buffer first.
    pub fn retain_since(&self, cutoff_us: u64) -> Result<usize> {
        self.remove_where(|inst| {
            (
                snapshot_key(inst, 0, 0),
                Some(snapshot_key(inst, cutoff_us, 0)),
                false,
                0,
            )
        })
    }

    /// Per instance, scans `[from, to)` (descending if `rev`), keeps the
    /// first `skip` keys and removes the rest in one batch.
    fn remove_where(
        &self,
        plan: impl Fn(u32) -> (SnapshotKey, Option<SnapshotKey>, bool, usize),
    ) -> Result<usize> {
        self.flush()?;
        let mut removed = 0;
        for inst in self.instances()? {
            let (from, to, rev, skip) = plan(inst);
            let mut ops = Vec::new();
            let mut seen = 0;
            self.backend.scan(
                Tree::Snapshots,
                &from,
                to.as_ref().map(|t| &t[..]),
                rev,
                &mut |k, _| {
                    seen += 1;
                    if seen > skip {
                        ops.push(Op::Remove(k.to_vec()));
                    }
                    Ok(true)
                },
            )?;
            removed += ops.len();
            if !ops.is_empty() {
                self.backend.apply(Tree::Snapshots, ops)?;
            }
        }
        self.backend.flush()?;
        Ok(removed)
    }
}
