//! The first-party policies: `llumnix`, `infaas`, `round-robin`, `queue-length`.

use crate::{
    Fleet, Freeness, InstanceId, InstanceLoad, MigrationCandidate, MigrationPair, Policy,
    PolicyInfo, PriorityAssignment, RequestId, RequestMeta, ScalingDecision,
};

/// Names of the policies [`by_name`] knows.
pub const POLICY_NAMES: [&str; 4] = ["llumnix", "infaas", "round-robin", "queue-length"];

/// A fresh instance of the named first-party policy, with default parameters.
pub fn by_name(name: &str) -> Option<Box<dyn Policy>> {
    Some(match name {
        "llumnix" => Box::new(Llumnix::default()),
        "infaas" => Box::new(Infaas::default()),
        "round-robin" => Box::new(RoundRobin::default()),
        "queue-length" => Box::new(QueueLength),
        _ => return None,
    })
}

fn info(name: &str) -> PolicyInfo {
    PolicyInfo {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Dispatch freeness: (available − Σ waiting demand − headroom) per request
/// (running + waiting; a deficit multiplies, see [`Freeness::per_request`]);
/// a draining instance has infinite usage.
pub fn dispatch_freeness(load: &InstanceLoad) -> Freeness {
    if load.draining {
        return Freeness::NegInf;
    }
    let virtual_free = load.available_blocks()
        - i64::from(load.waiting_demand_blocks)
        - i64::from(load.headroom_blocks);
    Freeness::per_request(virtual_free, u64::from(load.requests()))
}

/// Migration freeness with de-fragmentation: (available − head-of-line demand
/// − headroom) per (running + [waiting > 0]) ([`Freeness::per_request`]); +∞
/// with nothing running (nothing to move), −∞ while draining.
pub fn migration_freeness(load: &InstanceLoad) -> Freeness {
    if load.draining {
        return Freeness::NegInf;
    }
    if load.running == 0 {
        return Freeness::PosInf;
    }
    let virtual_free = load.available_blocks()
        - i64::from(load.head_of_line_demand_blocks)
        - i64::from(load.headroom_blocks);
    Freeness::per_request(
        virtual_free,
        u64::from(load.running) + u64::from(load.waiting > 0),
    )
}

/// The instance with the highest key; ties go to the lowest instance id.
fn freest<'a, K: Ord>(
    loads: impl Iterator<Item = &'a InstanceLoad>,
    key: impl Fn(&InstanceLoad) -> K,
) -> Option<InstanceId> {
    let mut best: Option<(K, InstanceId)> = None;
    for load in loads {
        let k = key(load);
        if best.as_ref().is_none_or(|(bk, _)| k > *bk) {
            best = Some((k, load.instance));
        }
    }
    best.map(|(_, id)| id)
}

/// Parameters of the Llumnix rules (the artifact's values by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlumnixParams {
    /// Migration sources: migration freeness below this.
    pub migrate_out_below: i64,
    /// Migration destinations: migration freeness above this.
    pub migrate_in_above: i64,
    /// Scale up when the fleet's average freeness is below this.
    pub scale_up_below: i64,
    /// Scale down when the average without one instance stays above this.
    pub scale_down_above: i64,
    /// Most instances one scale-up asks for.
    pub max_scale_up: u32,
    /// Headroom (blocks) of a high-priority request: 2,048 tokens of room.
    pub high_priority_headroom_blocks: u32,
}

impl Default for LlumnixParams {
    fn default() -> Self {
        Self {
            migrate_out_below: 3,
            migrate_in_above: 3,
            scale_up_below: 10,
            scale_down_above: 60,
            max_scale_up: 4,
            high_priority_headroom_blocks: 128,
        }
    }
}

/// Llumnix: freeness-based dispatch with priority pools, migration pairing
/// with de-fragmentation, priority headroom, and a freeness band for scaling.
#[derive(Clone, Debug, Default)]
pub struct Llumnix {
    pub params: LlumnixParams,
}

impl Policy for Llumnix {
    fn info(&self) -> PolicyInfo {
        info("llumnix")
    }

    /// The freest instance by dispatch freeness. A normal request avoids
    /// instances holding high-priority requests (they carry the headroom); a
    /// high-priority one goes where high-priority requests already are while
    /// such an instance has room (its freeness is not below the migration
    /// threshold, so it would not shed load at once); otherwise the pool
    /// grows by the freest instance. When the preferred pool is empty, every
    /// serving instance is a candidate.
    fn dispatch(&mut self, fleet: &Fleet, request: &RequestMeta) -> Option<InstanceId> {
        let high = request.priority > 0;
        // One pass: the freest in the preferred pool and the freest overall.
        let mut in_pool: Option<(Freeness, InstanceId)> = None;
        let mut overall: Option<(Freeness, InstanceId)> = None;
        for load in fleet.serving() {
            let f = dispatch_freeness(load);
            if overall.is_none_or(|(best, _)| f > best) {
                overall = Some((f, load.instance));
            }
            if (load.high_priority_requests > 0) == high && in_pool.is_none_or(|(best, _)| f > best)
            {
                in_pool = Some((f, load.instance));
            }
        }
        if high {
            in_pool = in_pool.filter(|(f, _)| !f.below(self.params.migrate_out_below));
        }
        in_pool.or(overall).map(|(_, id)| id)
    }

    /// Sources: migration freeness below the low threshold, or preempted
    /// requests, or draining — most loaded first. Destinations: above the high
    /// threshold, no preemption, not draining — least loaded first. The i-th
    /// source pairs with the i-th destination. Instances already migrating
    /// take no part (one migration in or out at a time).
    fn plan_migration(&mut self, fleet: &Fleet) -> Vec<MigrationPair> {
        let p = self.params;
        let mut sources: Vec<(Freeness, InstanceId)> = fleet
            .loads()
            .iter()
            .filter(|l| !l.migrating() && l.running > 0)
            .map(|l| (migration_freeness(l), l))
            .filter(|(f, l)| f.below(p.migrate_out_below) || l.preempted > 0 || l.draining)
            .map(|(f, l)| (f, l.instance))
            .collect();
        let mut destinations: Vec<(Freeness, InstanceId)> = fleet
            .serving()
            .filter(|l| !l.migrating() && l.preempted == 0)
            .map(|l| (migration_freeness(l), l.instance))
            .filter(|(f, id)| f.above(p.migrate_in_above) && !sources.iter().any(|s| s.1 == *id))
            .collect();
        sources.sort();
        destinations.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        sources
            .iter()
            .zip(&destinations)
            .map(|(s, d)| MigrationPair {
                source: s.1,
                destination: d.1,
            })
            .collect()
    }

    /// The last-come normal-priority request that has produced output.
    fn choose_migrations(
        &mut self,
        fleet: &Fleet,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Vec<RequestId> {
        // Only a request the destination has room for (its free blocks
        // above the watermark, one block of growth to spare): a move the
        // destination must refuse costs a round trip and blocks the pair
        // for the period.
        let room = fleet
            .get(pair.destination)
            .map_or(i64::MAX, |d| d.available_blocks());
        candidates
            .iter()
            .filter(|c| c.priority == 0 && c.output_tokens > 0)
            .filter(|c| i64::from(c.blocks) < room)
            .max_by_key(|c| (c.arrival_us, c.id))
            .map(|c| vec![c.id])
            .unwrap_or_default()
    }

    fn assign_priority(&mut self, _fleet: &Fleet, request: &RequestMeta) -> PriorityAssignment {
        if request.requested_priority > 0 {
            PriorityAssignment {
                priority: request.requested_priority,
                headroom_blocks: self.params.high_priority_headroom_blocks,
            }
        } else {
            PriorityAssignment::default()
        }
    }

    fn decide_scaling(&mut self, fleet: &Fleet) -> ScalingDecision {
        freeness_band_scaling(fleet, &self.params)
    }
}

/// Llumnix auto-scaling: the fleet as one virtual instance (serving
/// instances only). Below `scale_up_below`, add enough instances of the
/// average capacity to get back above it; above `scale_down_above` even
/// without the emptiest instance's capacity, drain that instance. No new
/// drain while one is in progress.
fn freeness_band_scaling(fleet: &Fleet, p: &LlumnixParams) -> ScalingDecision {
    let serving: Vec<&InstanceLoad> = fleet.serving().collect();
    if serving.is_empty() {
        return ScalingDecision::ScaleUp(1);
    }
    let capacity = |l: &InstanceLoad| i64::from(l.total_blocks) - i64::from(l.watermark_blocks);
    let demand: i64 = serving
        .iter()
        .map(|l| i64::from(l.waiting_demand_blocks) + i64::from(l.headroom_blocks))
        .sum();
    let virtual_free: i64 = serving.iter().map(|l| l.available_blocks()).sum::<i64>() - demand;
    let requests: u64 = serving.iter().map(|l| u64::from(l.requests())).sum();
    let average = Freeness::ratio(virtual_free, requests);
    if average.below(p.scale_up_below) {
        let mean_capacity =
            (serving.iter().map(|l| capacity(l)).sum::<i64>() / serving.len() as i64).max(1);
        let missing = p.scale_up_below * requests as i64 - virtual_free;
        let k = (missing + mean_capacity - 1) / mean_capacity;
        return ScalingDecision::ScaleUp(k.clamp(1, i64::from(p.max_scale_up)) as u32);
    }
    if serving.len() < 2 || fleet.loads().iter().any(|l| l.draining) {
        return ScalingDecision::Hold;
    }
    let emptiest = serving
        .iter()
        .min_by_key(|l| (l.requests(), l.used_blocks, core::cmp::Reverse(l.instance)))
        .expect("serving is not empty");
    // Its requests move to the others, so the fleet loses its whole capacity.
    let without = Freeness::ratio(virtual_free - capacity(emptiest), requests);
    if without.above(p.scale_down_above) {
        ScalingDecision::Drain(emptiest.instance)
    } else {
        ScalingDecision::Hold
    }
}

/// INFaaS++: dispatch to the freest instance by the same load metric as
/// Llumnix (no priority pools), never migrate, no headroom (the trait's
/// defaults); scales on the same freeness band.
#[derive(Clone, Debug, Default)]
pub struct Infaas {
    pub params: LlumnixParams,
}

impl Policy for Infaas {
    fn info(&self) -> PolicyInfo {
        info("infaas")
    }
    fn dispatch(&mut self, fleet: &Fleet, _request: &RequestMeta) -> Option<InstanceId> {
        freest(fleet.serving(), dispatch_freeness)
    }
    fn decide_scaling(&mut self, fleet: &Fleet) -> ScalingDecision {
        freeness_band_scaling(fleet, &self.params)
    }
}

/// Round-robin ("balanced"): the serving instance this policy has sent the
/// fewest requests so far (ties: lowest id). No migration, no scaling.
#[derive(Clone, Debug, Default)]
pub struct RoundRobin {
    /// (instance, requests dispatched to it), ascending by instance.
    dispatched: Vec<(InstanceId, u64)>,
}

impl RoundRobin {
    fn count(&self, instance: InstanceId) -> u64 {
        self.dispatched
            .binary_search_by_key(&instance, |e| e.0)
            .map(|i| self.dispatched[i].1)
            .unwrap_or(0)
    }
}

impl Policy for RoundRobin {
    fn info(&self) -> PolicyInfo {
        info("round-robin")
    }
    fn dispatch(&mut self, fleet: &Fleet, _request: &RequestMeta) -> Option<InstanceId> {
        let chosen = freest(fleet.serving(), |l| {
            core::cmp::Reverse(self.count(l.instance))
        })?;
        match self.dispatched.binary_search_by_key(&chosen, |e| e.0) {
            Ok(i) => self.dispatched[i].1 += 1,
            Err(i) => self.dispatched.insert(i, (chosen, 1)),
        }
        Some(chosen)
    }
}

/// Queue-length (least outstanding requests, as in vLLM's production stack):
/// the serving instance with the fewest waiting, then running requests, then
/// used blocks. No migration, no scaling.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueLength;

impl Policy for QueueLength {
    fn info(&self) -> PolicyInfo {
        info("queue-length")
    }
    fn dispatch(&mut self, fleet: &Fleet, _request: &RequestMeta) -> Option<InstanceId> {
        freest(fleet.serving(), |l| {
            core::cmp::Reverse((l.waiting, l.running, l.used_blocks))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(instance: InstanceId, used: u32, running: u32, waiting: u32) -> InstanceLoad {
        InstanceLoad {
            instance,
            block_size: 16,
            total_blocks: 100,
            used_blocks: used,
            watermark_blocks: 1,
            running,
            waiting,
            ..Default::default()
        }
    }

    fn fleet(loads: &[InstanceLoad]) -> Fleet {
        let mut f = Fleet::new();
        f.reset(loads.iter().copied());
        f
    }

    #[test]
    fn llumnix_dispatches_to_freest_and_honours_priority_pools() {
        let mut hot = load(0, 90, 4, 0);
        hot.high_priority_requests = 1;
        let f = fleet(&[hot, load(1, 50, 5, 0), load(2, 10, 5, 0)]);
        let mut p = Llumnix::default();
        let normal = RequestMeta::default();
        let high = RequestMeta {
            priority: 1,
            requested_priority: 1,
            ..Default::default()
        };
        assert_eq!(p.dispatch(&f, &normal), Some(2));
        // The high-priority pool (instance 0) is full: freeness
        // (99 − 90) / 4 is below the migration threshold, so the pool grows
        // by the freest instance.
        assert_eq!(p.dispatch(&f, &high), Some(2));
        // With room in the pool, high-priority requests join it.
        let mut roomy = load(0, 40, 4, 0);
        roomy.high_priority_requests = 1;
        let f2 = fleet(&[roomy, load(1, 50, 5, 0), load(2, 10, 5, 0)]);
        assert_eq!(p.dispatch(&f2, &high), Some(0));
        assert_eq!(p.dispatch(&f2, &normal), Some(2));
        let mut draining = load(2, 0, 0, 0);
        draining.draining = true;
        let f = fleet(&[load(1, 50, 5, 0), draining]);
        assert_eq!(p.dispatch(&f, &normal), Some(1));
        assert_eq!(p.dispatch(&fleet(&[draining]), &normal), None);
    }

    #[test]
    fn llumnix_pairs_most_loaded_with_least_loaded() {
        // freeness: 0 -> (99-95)/4 = 1; 1 -> (99-90)/3 = 3 (not below 3); 2 -> 89/1; 3 -> 49/5
        let mut preempted = load(4, 20, 2, 1);
        preempted.preempted = 1;
        let f = fleet(&[
            load(0, 95, 4, 0),
            load(1, 90, 3, 0),
            load(2, 10, 1, 0),
            load(3, 50, 5, 0),
            preempted,
        ]);
        let mut p = Llumnix::default();
        let pairs = p.plan_migration(&f);
        assert_eq!(
            pairs,
            [
                MigrationPair {
                    source: 0,
                    destination: 2
                },
                MigrationPair {
                    source: 4,
                    destination: 3
                }
            ]
        );
    }

    #[test]
    fn llumnix_head_of_line_demand_makes_a_source() {
        let mut blocked = load(0, 40, 2, 1);
        blocked.head_of_line_demand_blocks = 55;
        let f = fleet(&[blocked, load(1, 10, 1, 0)]);
        assert_eq!(
            Llumnix::default().plan_migration(&f),
            [MigrationPair {
                source: 0,
                destination: 1
            }]
        );
    }

    #[test]
    fn llumnix_chooses_last_come_normal_request_with_output() {
        let c = |id, priority, output_tokens, arrival_us| MigrationCandidate {
            id,
            priority,
            output_tokens,
            arrival_us,
            ..Default::default()
        };
        let cands = [
            c(1, 0, 5, 10),
            c(2, 0, 3, 30),
            c(3, 1, 9, 40),
            c(4, 0, 0, 50),
        ];
        let pair = MigrationPair {
            source: 0,
            destination: 1,
        };
        assert_eq!(
            Llumnix::default().choose_migrations(&Fleet::new(), pair, &cands),
            [2]
        );
        // A destination with 20 free blocks above its watermark takes a
        // 10-block request, not a 30-block one: the last-come that fits.
        let sized = |id, blocks, arrival_us| MigrationCandidate {
            blocks,
            ..c(id, 0, 5, arrival_us)
        };
        let cands = [sized(1, 10, 10), sized(2, 30, 30)];
        let f = fleet(&[load(1, 79, 1, 0)]); // 100 − 79 − 1 = 20 available
        assert_eq!(Llumnix::default().choose_migrations(&f, pair, &cands), [1]);
        let f = fleet(&[load(1, 95, 1, 0)]);
        assert!(Llumnix::default()
            .choose_migrations(&f, pair, &cands)
            .is_empty());
    }

    #[test]
    fn llumnix_scales_inside_the_band() {
        let mut p = Llumnix::default();
        // 2 instances, 30 requests each, few free blocks -> scale up
        let f = fleet(&[load(0, 90, 30, 0), load(1, 90, 30, 0)]);
        assert!(matches!(p.decide_scaling(&f), ScalingDecision::ScaleUp(k) if k >= 1));
        // nearly idle -> drain the emptiest (ties: highest id)
        let f = fleet(&[load(0, 0, 0, 0), load(1, 0, 0, 0)]);
        assert_eq!(p.decide_scaling(&f), ScalingDecision::Drain(1));
        // (98 + 98 - 99) / 2 = 48.5 without one instance: not above 60 -> hold
        let f = fleet(&[load(0, 1, 1, 0), load(1, 1, 1, 0)]);
        assert_eq!(p.decide_scaling(&f), ScalingDecision::Hold);
        // moderately loaded -> hold
        let f = fleet(&[load(0, 40, 3, 0), load(1, 40, 3, 0)]);
        assert_eq!(p.decide_scaling(&f), ScalingDecision::Hold);
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let f = fleet(&[load(3, 0, 0, 0), load(7, 99, 9, 9), load(9, 0, 0, 0)]);
        let mut p = RoundRobin::default();
        let picks: Vec<_> = (0..6)
            .map(|_| p.dispatch(&f, &RequestMeta::default()).unwrap())
            .collect();
        assert_eq!(picks, [3, 7, 9, 3, 7, 9]);
    }

    #[test]
    fn queue_length_prefers_short_queues() {
        let f = fleet(&[load(0, 10, 5, 2), load(1, 50, 9, 0), load(2, 5, 9, 0)]);
        assert_eq!(QueueLength.dispatch(&f, &RequestMeta::default()), Some(2));
    }

    #[test]
    fn by_name_knows_every_policy() {
        for name in POLICY_NAMES {
            assert_eq!(by_name(name).unwrap().info().name, name);
        }
        assert!(by_name("nope").is_none());
    }
}
