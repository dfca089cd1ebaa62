//! The snapshot history a policy may read through the `llumen:policy/history`
//! import. The runtime records every observed load here; the durable,
//! sled-backed history implements the same trait.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use llumen_policy_logic::{InstanceId, InstanceLoad};

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

#[cfg(test)]
mod tests {
    use super::*;

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
