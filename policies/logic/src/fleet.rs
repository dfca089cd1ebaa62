//! A policy's view of the fleet: the latest load of every instance.

use crate::{InstanceId, InstanceLoad};

/// The latest [`InstanceLoad`] of every known instance, ordered by instance id
/// (so iteration order, and with it every tie-break, is deterministic).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fleet {
    loads: Vec<InstanceLoad>,
}

impl Fleet {
    /// An empty fleet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace the whole view.
    pub fn reset(&mut self, loads: impl IntoIterator<Item = InstanceLoad>) {
        self.loads.clear();
        self.upsert(loads);
    }

    /// Insert or replace the loads of these instances.
    pub fn upsert(&mut self, loads: impl IntoIterator<Item = InstanceLoad>) {
        for load in loads {
            match self
                .loads
                .binary_search_by_key(&load.instance, |l| l.instance)
            {
                Ok(i) => self.loads[i] = load,
                Err(i) => self.loads.insert(i, load),
            }
        }
    }

    /// Forget an instance; true if it was known.
    pub fn remove(&mut self, instance: InstanceId) -> bool {
        match self.position(instance) {
            Some(i) => {
                self.loads.remove(i);
                true
            }
            None => false,
        }
    }

    /// The latest load of `instance`.
    pub fn get(&self, instance: InstanceId) -> Option<&InstanceLoad> {
        self.position(instance).map(|i| &self.loads[i])
    }

    /// All loads, ascending by instance id.
    pub fn loads(&self) -> &[InstanceLoad] {
        &self.loads
    }

    /// Number of known instances.
    pub fn len(&self) -> usize {
        self.loads.len()
    }

    /// True when no instance is known.
    pub fn is_empty(&self) -> bool {
        self.loads.is_empty()
    }

    /// Instances that accept new requests (not draining).
    pub fn serving(&self) -> impl Iterator<Item = &InstanceLoad> {
        self.loads.iter().filter(|l| !l.draining)
    }

    fn position(&self, instance: InstanceId) -> Option<usize> {
        self.loads
            .binary_search_by_key(&instance, |l| l.instance)
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(instance: InstanceId, used: u32) -> InstanceLoad {
        InstanceLoad {
            instance,
            used_blocks: used,
            ..Default::default()
        }
    }

    #[test]
    fn upsert_keeps_order_and_replaces() {
        let mut fleet = Fleet::new();
        fleet.upsert([load(5, 1), load(2, 1), load(9, 1)]);
        fleet.upsert([load(2, 7)]);
        let ids: Vec<_> = fleet.loads().iter().map(|l| l.instance).collect();
        assert_eq!(ids, [2, 5, 9]);
        assert_eq!(fleet.get(2).unwrap().used_blocks, 7);
        assert!(fleet.remove(5));
        assert!(!fleet.remove(5));
        assert_eq!(fleet.len(), 2);
        fleet.reset([load(1, 0)]);
        assert_eq!(fleet.len(), 1);
    }
}
