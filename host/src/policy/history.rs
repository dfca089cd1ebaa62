//! The snapshot history a policy may read through the `llumen:policy/history`
//! import. The runtime records every observed load here: in memory
//! ([`RecentHistory`]) or durably in the store ([`StoreHistory`], sled).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use llumen_policy_logic::{InstanceId, InstanceLoad};
use llumen_store::{KvBackend, Store};

/// Recorded load snapshots, per instance, oldest first.
pub trait SnapshotHistory: Send + Sync {
    /// Record one snapshot.
    fn record(&self, load: &InstanceLoad);
    /// Up to `max` most recent snapshots of `instance`, oldest first.
    fn recent(&self, instance: InstanceId, max: usize) -> Vec<InstanceLoad>;
}

/// The last `capacity` snapshots of every instance, in memory.
pub struct RecentHistory {
    capacity: usize,
    by_instance: Mutex<HashMap<InstanceId, VecDeque<InstanceLoad>>>,
}

impl RecentHistory {
    /// Keep at most `capacity` snapshots per instance.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            by_instance: Mutex::default(),
        }
    }
}

impl SnapshotHistory for RecentHistory {
    fn record(&self, load: &InstanceLoad) {
        let mut map = self.by_instance.lock().unwrap_or_else(|e| e.into_inner());
        let ring = map.entry(load.instance).or_default();
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(*load);
    }

    fn recent(&self, instance: InstanceId, max: usize) -> Vec<InstanceLoad> {
        let map = self.by_instance.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&instance)
            .map(|ring| {
                ring.iter()
                    .skip(ring.len().saturating_sub(max))
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Snapshots persisted in the store: appends are batched by the store (off
/// the hot path), reads see buffered appends too. A store error is logged and
/// reads as an empty history: a policy must never fail because the disk did.
pub struct StoreHistory<B: KvBackend> {
    store: Arc<Store<B>>,
}

impl<B: KvBackend> StoreHistory<B> {
    pub fn new(store: Arc<Store<B>>) -> Self {
        Self { store }
    }
}

impl<B: KvBackend + Send + Sync> SnapshotHistory for StoreHistory<B> {
    fn record(&self, load: &InstanceLoad) {
        if let Err(e) = self.store.append(load) {
            tracing::warn!(instance = load.instance, error = %e, "recording a load snapshot failed");
        }
    }

    fn recent(&self, instance: InstanceId, max: usize) -> Vec<InstanceLoad> {
        self.store.recent(instance, max).unwrap_or_else(|e| {
            tracing::warn!(instance, error = %e, "reading snapshot history failed");
            Vec::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_history(h: &dyn SnapshotHistory, capacity: Option<usize>) {
        for t in 0..5 {
            h.record(&InstanceLoad {
                instance: 1,
                timestamp_us: t,
                ..Default::default()
            });
        }
        let ts: Vec<_> = h.recent(1, 3).iter().map(|l| l.timestamp_us).collect();
        assert_eq!(ts, [2, 3, 4]);
        let all: Vec<_> = h.recent(1, 10).iter().map(|l| l.timestamp_us).collect();
        assert_eq!(all.len(), capacity.unwrap_or(5).min(5));
        assert!(h.recent(9, 2).is_empty());
    }

    #[test]
    fn both_histories_serve_the_newest_oldest_first() {
        check_history(&RecentHistory::new(3), Some(3));
        check_history(&RecentHistory::new(100), None);
        let store = Arc::new(Store::temporary().expect("temporary sled store"));
        check_history(&StoreHistory::new(store), None);
    }

    #[test]
    fn keeps_the_newest_in_order() {
        let h = RecentHistory::new(3);
        for t in 0..5 {
            h.record(&InstanceLoad {
                instance: 1,
                timestamp_us: t,
                ..Default::default()
            });
        }
        let ts: Vec<_> = h.recent(1, 10).iter().map(|l| l.timestamp_us).collect();
        assert_eq!(ts, [2, 3, 4]);
        let ts: Vec<_> = h.recent(1, 2).iter().map(|l| l.timestamp_us).collect();
        assert_eq!(ts, [3, 4]);
        assert!(h.recent(9, 2).is_empty());
    }
}
