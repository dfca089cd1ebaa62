//! The smallest useful policy, written against the WIT with nothing but
//! wit-bindgen: it implements only the `dispatch-policy` world and sends each
//! request to the serving instance with the lowest mean step latency over its
//! last four recorded snapshots (read through the `history` import; ties go
//! to the lowest id). The tests use it to check the history import and that a
//! component is type-checked against the world of the slot it is put in.

use std::cell::RefCell;

// Built against the frozen 0.1.0 contract (see ../wit-0.1.0/README.md):
// it proves a 0.1.0 component still loads on a 0.1.x host.
wit_bindgen::generate!({ world: "dispatch-policy", path: "../wit-0.1.0" });

use exports::llumen::policy::{dispatch, fleet};
use llumen::policy::history;
use llumen::policy::types::{InstanceId, InstanceLoad, PolicyInfo, RequestMeta};

/// Snapshots of history each decision looks at.
const WINDOW: u32 = 4;

thread_local! {
    static FLEET: RefCell<Vec<InstanceLoad>> = const { RefCell::new(Vec::new()) };
}

struct LowestLatency;

impl fleet::Guest for LowestLatency {
    fn info() -> PolicyInfo {
        PolicyInfo {
            name: "lowest-latency".into(),
            version: "0.1.0".into(),
        }
    }
    fn reset(loads: Vec<InstanceLoad>) {
        FLEET.with(|f| *f.borrow_mut() = Vec::new());
        Self::upsert(loads);
    }
    fn upsert(loads: Vec<InstanceLoad>) {
        FLEET.with(|f| {
            let mut fleet = f.borrow_mut();
            for load in loads {
                match fleet.iter_mut().find(|l| l.instance == load.instance) {
                    Some(slot) => *slot = load,
                    None => fleet.push(load),
                }
            }
        })
    }
    fn remove(instance: InstanceId) {
        FLEET.with(|f| f.borrow_mut().retain(|l| l.instance != instance))
    }
}

impl dispatch::Guest for LowestLatency {
    fn dispatch(_request: RequestMeta) -> InstanceId {
        FLEET.with(|f| {
            f.borrow()
                .iter()
                .filter(|l| !l.draining)
                .map(|l| {
                    let recent = history::recent(l.instance, WINDOW);
                    let n = recent.len().max(1) as u64;
                    let mean = recent
                        .iter()
                        .map(|s| u64::from(s.step_latency_us))
                        .sum::<u64>()
                        / n;
                    (mean, l.instance)
                })
                .min()
                .map(|(_, id)| id)
                .unwrap_or(u32::MAX)
        })
    }
}

export!(LowestLatency);
