//! Host-side validation of every policy answer, before anything acts on it.
//! An answer that fails here is a [`CallFailure::Invalid`] and is replaced by
//! a fallback's.

use std::collections::HashSet;

use llumen_policy_logic::{
    Fleet, InstanceId, MigrationCandidate, MigrationPair, PriorityAssignment, RequestId,
    ScalingDecision,
};

use super::CallFailure;

fn invalid(msg: String) -> CallFailure {
    CallFailure::Invalid(msg)
}

/// The chosen instance exists and accepts requests.
pub fn dispatch(instance: InstanceId, fleet: &Fleet) -> Result<InstanceId, CallFailure> {
    match fleet.get(instance) {
        None => Err(invalid(format!(
            "dispatch chose unknown instance {instance}"
        ))),
        Some(l) if l.draining => Err(invalid(format!(
            "dispatch chose draining instance {instance}"
        ))),
        Some(_) => Ok(instance),
    }
}

/// Every instance is known, appears at most once, is never paired with
/// itself, and no destination is draining.
pub fn plan(pairs: Vec<MigrationPair>, fleet: &Fleet) -> Result<Vec<MigrationPair>, CallFailure> {
    if pairs.len() > fleet.len() / 2 {
        return Err(invalid(format!(
            "{} migration pairs for a fleet of {}",
            pairs.len(),
            fleet.len()
        )));
    }
    let mut seen = HashSet::with_capacity(pairs.len() * 2);
    for p in &pairs {
        if p.source == p.destination {
            return Err(invalid(format!("instance {} paired with itself", p.source)));
        }
        for id in [p.source, p.destination] {
            if fleet.get(id).is_none() {
                return Err(invalid(format!("migration names unknown instance {id}")));
            }
            if !seen.insert(id) {
                return Err(invalid(format!(
                    "instance {id} appears in more than one migration pair"
                )));
            }
        }
        if fleet.get(p.destination).is_some_and(|l| l.draining) {
            return Err(invalid(format!(
                "migration into draining instance {}",
                p.destination
            )));
        }
    }
    Ok(pairs)
}

/// Every chosen request is a candidate, chosen once.
pub fn choose(
    ids: Vec<RequestId>,
    candidates: &[MigrationCandidate],
) -> Result<Vec<RequestId>, CallFailure> {
    if ids.len() > candidates.len() {
        return Err(invalid(format!(
            "{} requests chosen from {} candidates",
            ids.len(),
            candidates.len()
        )));
    }
    let mut seen = HashSet::with_capacity(ids.len());
    for &id in &ids {
        if !candidates.iter().any(|c| c.id == id) {
            return Err(invalid(format!(
                "request {id} is not a migration candidate"
            )));
        }
        if !seen.insert(id) {
            return Err(invalid(format!("request {id} chosen twice")));
        }
    }
    Ok(ids)
}

/// Headroom no larger than the largest instance.
pub fn assign(a: PriorityAssignment, fleet: &Fleet) -> Result<PriorityAssignment, CallFailure> {
    let largest = fleet
        .loads()
        .iter()
        .map(|l| l.total_blocks)
        .max()
        .unwrap_or(1 << 20);
    if a.headroom_blocks > largest {
        return Err(invalid(format!(
            "headroom of {} blocks exceeds the largest instance ({largest} blocks)",
            a.headroom_blocks
        )));
    }
    Ok(a)
}

/// A scale-up within bounds; a drain of a known instance not already
/// draining and not the last one serving.
pub fn scaling(
    d: ScalingDecision,
    fleet: &Fleet,
    max_scale_up: u32,
) -> Result<ScalingDecision, CallFailure> {
    match d {
        ScalingDecision::ScaleUp(k) if k == 0 || k > max_scale_up => Err(invalid(format!(
            "scale up by {k} (allowed 1..={max_scale_up})"
        ))),
        ScalingDecision::Drain(id) => match fleet.get(id) {
            None => Err(invalid(format!("drain of unknown instance {id}"))),
            Some(l) if l.draining => {
                Err(invalid(format!("drain of instance {id}, already draining")))
            }
            Some(_) if fleet.serving().count() <= 1 => Err(invalid(format!(
                "drain of instance {id}, the last one serving"
            ))),
            Some(_) => Ok(d),
        },
        _ => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llumen_policy_logic::InstanceLoad;

    fn fleet() -> Fleet {
        let mut f = Fleet::new();
        f.reset((0..4).map(|i| InstanceLoad {
            instance: i,
            total_blocks: 100,
            draining: i == 3,
            ..Default::default()
        }));
        f
    }

    #[test]
    fn rejects_nonsense() {
        let f = fleet();
        assert!(dispatch(1, &f).is_ok());
        assert!(dispatch(3, &f).is_err());
        assert!(dispatch(9, &f).is_err());
        let p = |source, destination| MigrationPair {
            source,
            destination,
        };
        assert!(plan(vec![p(0, 1)], &f).is_ok());
        assert!(plan(vec![p(0, 0)], &f).is_err());
        assert!(plan(vec![p(0, 3)], &f).is_err());
        assert!(plan(vec![p(0, 1), p(1, 2)], &f).is_err());
        assert!(plan(vec![p(0, 1); 3], &f).is_err());
        let c = |id| MigrationCandidate {
            id,
            ..Default::default()
        };
        assert!(choose(vec![2], &[c(1), c(2)]).is_ok());
        assert!(choose(vec![2, 2], &[c(1), c(2)]).is_err());
        assert!(choose(vec![5], &[c(1), c(2)]).is_err());
        assert!(assign(
            PriorityAssignment {
                priority: 1,
                headroom_blocks: 100
            },
            &f
        )
        .is_ok());
        assert!(assign(
            PriorityAssignment {
                priority: 1,
                headroom_blocks: 101
            },
            &f
        )
        .is_err());
        assert!(scaling(ScalingDecision::ScaleUp(0), &f, 8).is_err());
        assert!(scaling(ScalingDecision::ScaleUp(9), &f, 8).is_err());
        assert!(scaling(ScalingDecision::Drain(3), &f, 8).is_err());
        assert!(scaling(ScalingDecision::Drain(2), &f, 8).is_ok());
        assert!(scaling(ScalingDecision::Drain(9), &f, 8).is_err());
        assert!(scaling(ScalingDecision::ScaleUp(u32::MAX), &f, 8).is_err());
        let mut last = Fleet::new();
        last.reset([0, 1].map(|i| InstanceLoad {
            instance: i,
            total_blocks: 100,
            draining: i == 1,
            ..Default::default()
        }));
        assert!(scaling(ScalingDecision::Drain(0), &last, 8).is_err());
    }

    /// The answers of the adversary library (policies/testing/adversaries)
    /// that only validation can catch, each with the rule that catches it.
    #[test]
    fn rejects_what_the_adversaries_answer() {
        let f = fleet();
        let p = |source, destination| MigrationPair {
            source,
            destination,
        };
        let msg = |r: Result<Vec<MigrationPair>, CallFailure>| match r {
            Err(CallFailure::Invalid(m)) => m,
            other => panic!("{other:?}"),
        };
        // Self-migration, a duplicated pair, wrong ids, oversize.
        assert!(msg(plan(vec![p(1, 1)], &f)).contains("paired with itself"));
        assert!(msg(plan(vec![p(0, 1), p(0, 1)], &f)).contains("more than one migration pair"));
        assert!(msg(plan(vec![p(0xDEAD_0000, 0xDEAD_0001)], &f)).contains("unknown instance"));
        assert!(msg(plan(vec![p(0, 1); 1 << 19], &f)).contains("migration pairs for a fleet of 4"));
        let c = |id| MigrationCandidate {
            id,
            ..Default::default()
        };
        let candidates = [c(1), c(2), c(3)];
        for (ids, expected) in [
            (vec![2, 2], "chosen twice"),
            (vec![u64::MAX - 0xDEAD], "not a migration candidate"),
            (vec![1; 1 << 19], "requests chosen from 3 candidates"),
        ] {
            match choose(ids, &candidates) {
                Err(CallFailure::Invalid(m)) => assert!(m.contains(expected), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
