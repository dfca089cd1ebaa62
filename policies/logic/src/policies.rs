//! The first-party policies: `llumnix`, `infaas`, `round-robin`, `queue-length`.
//!
//! `llumnix` follows the Llumnix artifact (`AlibabaPAI/llumnix`, branch
//! `osdi24ae`) by default; each point where the paper or an earlier llumen
//! differs is a parameter value ([`LlumnixParams`]). One deliberate
//! departure stays on by default and can be switched off: the fit check in
//! the migration pick (`fit-check = balanced`). The monotone deficit past saturation
//! ([`Deficit::Monotone`]) is a parameter value, off by default.
//! docs/ARCHITECTURE.md lists both with their measurements.

use crate::params::{check_unique, parse_choice, parse_value, Param, ParamError, ParamSpec};
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

/// The named first-party policy with `params` set; `Ok(None)` for an
/// unknown name.
pub fn configured(name: &str, params: &[Param]) -> Result<Option<Box<dyn Policy>>, ParamError> {
    let Some(mut policy) = by_name(name) else {
        return Ok(None);
    };
    policy.configure(params)?;
    Ok(Some(policy))
}

fn info(name: &str) -> PolicyInfo {
    PolicyInfo {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Most instances one scale-up answer may ask for (the host refuses more:
/// its `max_scale_up`); the fleet's bounds cap it further.
pub const SCALE_UP_LIMIT: u32 = 64;

/// How instances holding high-priority requests keep room for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriorityReserve {
    /// The artifact's rule (`all-but:N`): an instance holding any
    /// high-priority request counts all but `target_blocks` of its blocks
    /// as used (the artifact: total − 1,600 tokens / 16 = total − 100), in
    /// its migration load and in the dispatch load a normal request sees; a
    /// high-priority request sees the reserve on the instances *without*
    /// high-priority requests. Priority instances thus shed normal load by
    /// migration and take no new normal requests while others have room.
    AllBut { target_blocks: u32 },
    /// `headroom:N`: each high-priority request asks for `N` blocks of
    /// headroom (one shared reserve per instance: the largest), subtracted
    /// from that instance's loads; dispatch keeps high-priority requests in
    /// a pool of instances while it has room.
    Headroom { blocks: u32 },
}

/// What the migration load subtracts for the waiting queue
/// (de-fragmentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationLoad {
    /// `all-waiting`: the demand of every waiting request (the artifact,
    /// where de-fragmentation is on in every run).
    AllWaiting,
    /// `head-of-line`: the first waiting request's demand only (the paper).
    HeadOfLine,
    /// `none`: no de-fragmentation; the waiting queue counts for nothing.
    Off,
}

/// Which running request a migration moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// `lcfs`: the last-arrived normal-priority request that has produced
    /// output (the artifact's default).
    Lcfs,
    /// `sjf`: the shortest (prompt + output so far) with output.
    Sjf,
    /// `ljf`: the longest with output.
    Ljf,
}

/// Free blocks per request once an instance is past saturation (negative
/// free blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deficit {
    /// `monotone` (llumen's departure): the deficit times the requests, so
    /// more requests always reads as more loaded ([`Freeness::per_request`]).
    Monotone,
    /// `divide` (the artifact): the deficit divided by the requests, so past
    /// saturation the longest queue looks the freest.
    Divide,
}

/// Which requests the migration pick may move to a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitCheck {
    /// `off`: any (the artifact: the destination refuses what does not fit).
    Off,
    /// `on` / `room`: one the destination has room for (its free blocks
    /// above the watermark, one block of growth to spare).
    Room,
    /// `balanced`: one that leaves the destination's migration freeness not
    /// below `migrate-out-below` once it runs there, so a move never makes
    /// its destination a source (or too full for the arrivals it is about to
    /// be sent).
    Balanced,
}

/// Which instance a scale-down drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainPick {
    /// `highest-id`: the newest serving instance (the artifact).
    HighestId,
    /// `emptiest`: the one with the fewest requests, then blocks.
    Emptiest,
}

/// Parameters of the Llumnix rules; the defaults are the artifact's values,
/// but for the documented departure `fit_check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlumnixParams {
    /// Migration sources: migration freeness below this (`migrate-out-below`).
    pub migrate_out_below: i64,
    /// Migration destinations: migration freeness above this (`migrate-in-above`).
    pub migrate_in_above: i64,
    /// Scale up when the fleet's average freeness is below this.
    pub scale_up_below: i64,
    /// Scale down when the average without one instance is above this.
    pub scale_down_above: i64,
    /// Most instances one scale-up asks for; 0: as many as the average
    /// needs (the fleet's bounds cap it, as in the artifact).
    pub max_scale_up: u32,
    pub priority_reserve: PriorityReserve,
    pub migration_load: MigrationLoad,
    pub select: Selection,
    pub deficit: Deficit,
    /// Pick only a request the destination has room for (llumen's
    /// departure; the artifact tries any and the destination refuses).
    pub fit_check: FitCheck,
    pub drain_pick: DrainPick,
}

impl Default for LlumnixParams {
    fn default() -> Self {
        Self {
            migrate_out_below: 3,
            migrate_in_above: 3,
            scale_up_below: 10,
            scale_down_above: 60,
            max_scale_up: 0,
            priority_reserve: PriorityReserve::AllBut { target_blocks: 100 },
            migration_load: MigrationLoad::AllWaiting,
            select: Selection::Lcfs,
            deficit: Deficit::Divide,
            fit_check: FitCheck::Balanced,
            drain_pick: DrainPick::HighestId,
        }
    }
}

const RESERVE_CHOICES: &str = "all-but:N (an instance holding a high-priority request counts all but N blocks as used; the artifact: all-but:100) or headroom:N (N blocks per high-priority request, priority pools)";

impl PriorityReserve {
    fn text(self) -> String {
        match self {
            PriorityReserve::AllBut { target_blocks } => format!("all-but:{target_blocks}"),
            PriorityReserve::Headroom { blocks } => format!("headroom:{blocks}"),
        }
    }

    fn parse(p: &Param) -> Result<Self, ParamError> {
        let bad = || ParamError {
            name: p.name.clone(),
            message: format!("{:?} is not {RESERVE_CHOICES}", p.value),
        };
        let (rule, n) = p.value.split_once(':').ok_or_else(bad)?;
        let n: u32 = n.parse().map_err(|_| bad())?;
        match rule {
            "all-but" => Ok(PriorityReserve::AllBut { target_blocks: n }),
            "headroom" => Ok(PriorityReserve::Headroom { blocks: n }),
            _ => Err(bad()),
        }
    }
}

const MIGRATION_LOADS: [(&str, MigrationLoad); 3] = [
    ("all-waiting", MigrationLoad::AllWaiting),
    ("head-of-line", MigrationLoad::HeadOfLine),
    ("none", MigrationLoad::Off),
];
const SELECTIONS: [(&str, Selection); 3] = [
    ("lcfs", Selection::Lcfs),
    ("sjf", Selection::Sjf),
    ("ljf", Selection::Ljf),
];
const DEFICITS: [(&str, Deficit); 2] =
    [("monotone", Deficit::Monotone), ("divide", Deficit::Divide)];
const DRAIN_PICKS: [(&str, DrainPick); 2] = [
    ("highest-id", DrainPick::HighestId),
    ("emptiest", DrainPick::Emptiest),
];
const FIT_CHECKS: [(&str, FitCheck); 4] = [
    ("on", FitCheck::Room),
    ("room", FitCheck::Room),
    ("balanced", FitCheck::Balanced),
    ("off", FitCheck::Off),
];

fn text_of<T: PartialEq + Copy>(choices: &[(&'static str, T)], v: T) -> &'static str {
    choices
        .iter()
        .find(|(_, c)| *c == v)
        .map(|(t, _)| *t)
        .expect("every value has a name")
}

impl LlumnixParams {
    /// The parameters, their current values as defaults, and meanings.
    pub fn specs(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::new("migrate-out-below", self.migrate_out_below, "migration sources: instances whose migration freeness (free blocks per request) is below this integer (the paper's T; Fig 11 uses 3 or 10)"),
            ParamSpec::new("migrate-in-above", self.migrate_in_above, "migration destinations: instances whose migration freeness is above this integer"),
            ParamSpec::new("scale-up-below", self.scale_up_below, "scale up when the fleet's average freeness is below this integer"),
            ParamSpec::new("scale-down-above", self.scale_down_above, "drain an instance when the average without it is above this integer"),
            ParamSpec::new("max-scale-up", self.max_scale_up, "most instances one scale-up adds; 0: as many as the average needs (at most 64; the fleet's bounds cap it)"),
            ParamSpec::new("priority-reserve", self.priority_reserve.text(), RESERVE_CHOICES),
            ParamSpec::new("migration-load", text_of(&MIGRATION_LOADS, self.migration_load), "what the migration load subtracts for the waiting queue: all-waiting (the artifact's de-fragmentation), head-of-line (the paper's) or none"),
            ParamSpec::new("select", text_of(&SELECTIONS, self.select), "the request a migration moves: lcfs (last-arrived normal request with output), sjf (shortest with output), ljf (longest with output)"),
            ParamSpec::new("deficit", text_of(&DEFICITS, self.deficit), "free blocks per request past saturation: monotone (deficit times requests; llumen) or divide (the artifact)"),
            ParamSpec::new("fit-check", text_of(&FIT_CHECKS, self.fit_check), "on (or room): move only a request the destination has room for (llumen); balanced: only one that leaves the destination above the migration threshold (not a source itself); off: any (the artifact)"),
            ParamSpec::new("drain-pick", text_of(&DRAIN_PICKS, self.drain_pick), "the instance a scale-down drains: highest-id (the artifact) or emptiest"),
        ]
    }

    /// These parameters with `params` set, all or nothing.
    pub fn configured(&self, params: &[Param]) -> Result<Self, ParamError> {
        check_unique(params)?;
        let mut next = *self;
        let threshold = "an integer";
        for p in params {
            match p.name.as_str() {
                "migrate-out-below" => next.migrate_out_below = parse_value(p, threshold)?,
                "migrate-in-above" => next.migrate_in_above = parse_value(p, threshold)?,
                "scale-up-below" => next.scale_up_below = parse_value(p, threshold)?,
                "scale-down-above" => next.scale_down_above = parse_value(p, threshold)?,
                "max-scale-up" => next.max_scale_up = parse_value(p, "a count")?,
                "priority-reserve" => next.priority_reserve = PriorityReserve::parse(p)?,
                "migration-load" => next.migration_load = parse_choice(p, &MIGRATION_LOADS)?,
                "select" => next.select = parse_choice(p, &SELECTIONS)?,
                "deficit" => next.deficit = parse_choice(p, &DEFICITS)?,
                "fit-check" => next.fit_check = parse_choice(p, &FIT_CHECKS)?,
                "drain-pick" => next.drain_pick = parse_choice(p, &DRAIN_PICKS)?,
                other => return Err(ParamError::unknown(other, &self.specs())),
            }
        }
        // Thresholds far outside any block count would overflow nothing (the
        // comparisons are exact) but are surely a typo.
        for (name, t) in [
            ("migrate-out-below", next.migrate_out_below),
            ("migrate-in-above", next.migrate_in_above),
            ("scale-up-below", next.scale_up_below),
            ("scale-down-above", next.scale_down_above),
        ] {
            if t.unsigned_abs() > 1 << 31 {
                return Err(ParamError {
                    name: name.into(),
                    message: format!("{t} is outside ±2^31 blocks per request"),
                });
            }
        }
        if next.scale_down_above < next.scale_up_below {
            return Err(ParamError {
                name: "scale-down-above".into(),
                message: format!(
                    "{} is below scale-up-below {}: the fleet would grow and shrink at once",
                    next.scale_down_above, next.scale_up_below
                ),
            });
        }
        Ok(next)
    }

    fn per_request(&self, free: i64, requests: u64) -> Freeness {
        match self.deficit {
            Deficit::Monotone => Freeness::per_request(free, requests),
            Deficit::Divide => Freeness::ratio(free, requests),
        }
    }

    /// Blocks held back on `load` for high-priority requests, as seen by a
    /// request of priority `high` (`None`: by the migration load, which
    /// reserves where high-priority requests are).
    fn reserve(&self, load: &InstanceLoad, high: Option<bool>) -> i64 {
        let holds_high = load.high_priority_requests > 0;
        match self.priority_reserve {
            PriorityReserve::AllBut { target_blocks } => {
                let reserved = (i64::from(load.total_blocks) - i64::from(target_blocks)).max(0);
                // Migration and normal requests: reserved where high-priority
                // requests are; high-priority requests: where they are not.
                if holds_high != high.unwrap_or(false) {
                    reserved
                } else {
                    0
                }
            }
            PriorityReserve::Headroom { .. } => i64::from(load.headroom_blocks),
        }
    }

    /// Dispatch freeness of `load` for a request of priority `high`:
    /// (available − Σ waiting demand − reserve) per request (running +
    /// waiting); −∞ while draining.
    pub fn dispatch_freeness(&self, load: &InstanceLoad, high: bool) -> Freeness {
        if load.draining {
            return Freeness::NegInf;
        }
        let virtual_free = load.available_blocks()
            - i64::from(load.waiting_demand_blocks)
            - self.reserve(load, Some(high));
        self.per_request(virtual_free, u64::from(load.requests()))
    }

    /// Migration freeness with de-fragmentation: (available − waiting
    /// demand ([`MigrationLoad`]) − reserve) per (running + [waiting > 0]);
    /// +∞ with no request at all, −∞ while draining.
    pub fn migration_freeness(&self, load: &InstanceLoad) -> Freeness {
        if load.draining {
            return Freeness::NegInf;
        }
        let demand = match self.migration_load {
            MigrationLoad::AllWaiting => load.waiting_demand_blocks,
            MigrationLoad::HeadOfLine => load.head_of_line_demand_blocks,
            MigrationLoad::Off => 0,
        };
        let virtual_free = load.available_blocks() - i64::from(demand) - self.reserve(load, None);
        let requests = u64::from(load.running) + u64::from(load.waiting > 0);
        if requests == 0 {
            return Freeness::PosInf;
        }
        self.per_request(virtual_free, requests)
    }
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

/// Llumnix: freeness-based dispatch with a priority reserve, migration
/// pairing with de-fragmentation, and a freeness band for scaling.
#[derive(Clone, Debug, Default)]
pub struct Llumnix {
    pub params: LlumnixParams,
}

impl Policy for Llumnix {
    fn info(&self) -> PolicyInfo {
        info("llumnix")
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        self.params.specs()
    }

    fn configure(&mut self, params: &[Param]) -> Result<(), ParamError> {
        self.params = self.params.configured(params)?;
        Ok(())
    }

    /// The freest instance by dispatch freeness as the request sees it.
    /// With `all-but:N` (the artifact) that is the whole rule: the reserve
    /// steers normal requests away from priority instances and
    /// high-priority requests towards them. With `headroom:N`, a normal
    /// request avoids instances holding high-priority requests; a
    /// high-priority one goes where high-priority requests already are while
    /// such an instance has room (its freeness is not below the migration
    /// threshold); otherwise the pool grows by the freest instance. When the
    /// preferred pool is empty, every serving instance is a candidate.
    fn dispatch(&mut self, fleet: &Fleet, request: &RequestMeta) -> Option<InstanceId> {
        let p = self.params;
        let high = request.priority > 0;
        if let PriorityReserve::AllBut { .. } = p.priority_reserve {
            return freest(fleet.serving(), |l| p.dispatch_freeness(l, high));
        }
        // One pass: the freest in the preferred pool and the freest overall.
        let mut in_pool: Option<(Freeness, InstanceId)> = None;
        let mut overall: Option<(Freeness, InstanceId)> = None;
        for load in fleet.serving() {
            let f = p.dispatch_freeness(load, high);
            if overall.is_none_or(|(best, _)| f > best) {
                overall = Some((f, load.instance));
            }
            if (load.high_priority_requests > 0) == high && in_pool.is_none_or(|(best, _)| f > best)
            {
                in_pool = Some((f, load.instance));
            }
        }
        if high {
            in_pool = in_pool.filter(|(f, _)| !f.below(p.migrate_out_below));
        }
        in_pool.or(overall).map(|(_, id)| id)
    }

    /// Sources: migration freeness below the low threshold, or preempted
    /// requests, or draining — most loaded first (an instance with nothing
    /// running has nothing to move and is left out). Destinations: above the
    /// high threshold, no preemption, not draining — least loaded first. The
    /// i-th source pairs with the i-th destination. As in the artifact,
    /// instances already migrating are paired too; the host skips a pair
    /// whose instance is at its migration limit.
    fn plan_migration(&mut self, fleet: &Fleet) -> Vec<MigrationPair> {
        let p = self.params;
        let mut sources: Vec<(Freeness, InstanceId)> = fleet
            .loads()
            .iter()
            .filter(|l| l.running > 0)
            .map(|l| (p.migration_freeness(l), l))
            .filter(|(f, l)| f.below(p.migrate_out_below) || l.preempted > 0 || l.draining)
            .map(|(f, l)| (f, l.instance))
            .collect();
        let mut destinations: Vec<(Freeness, InstanceId)> = fleet
            .serving()
            .filter(|l| l.preempted == 0)
            .map(|l| (p.migration_freeness(l), l.instance))
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

    /// One request that has produced output, by the selection rule: LCFS
    /// takes the last-arrived normal-priority one, SJF / LJF the shortest /
    /// longest (prompt + output so far) of any priority; among those the
    /// destination accepts by `fit-check` ([`FitCheck`]): a move the
    /// destination must refuse costs a round trip and blocks the pair for
    /// the period.
    fn choose_migrations(
        &mut self,
        fleet: &Fleet,
        pair: MigrationPair,
        candidates: &[MigrationCandidate],
    ) -> Vec<RequestId> {
        let p = self.params;
        let destination = fleet.get(pair.destination);
        let fits = |c: &MigrationCandidate| match (p.fit_check, destination) {
            (FitCheck::Off, _) | (_, None) => true,
            (FitCheck::Room, Some(d)) => i64::from(c.blocks) < d.available_blocks(),
            (FitCheck::Balanced, Some(d)) => {
                let after = InstanceLoad {
                    used_blocks: d.used_blocks.saturating_add(c.blocks),
                    running: d.running.saturating_add(1),
                    ..*d
                };
                i64::from(c.blocks) < d.available_blocks()
                    && !p.migration_freeness(&after).below(p.migrate_out_below)
            }
        };
        let eligible = candidates
            .iter()
            .filter(|c| c.output_tokens > 0)
            .filter(|c| p.select != Selection::Lcfs || c.priority == 0)
            .filter(|c| fits(c));
        let length =
            |c: &&MigrationCandidate| u64::from(c.prompt_tokens) + u64::from(c.output_tokens);
        let picked = match p.select {
            Selection::Lcfs => eligible.max_by_key(|c| (c.arrival_us, c.id)),
            Selection::Sjf => eligible.min_by_key(|c| (length(c), c.id)),
            Selection::Ljf => eligible.max_by_key(|c| (length(c), core::cmp::Reverse(c.id))),
        };
        picked.map(|c| vec![c.id]).unwrap_or_default()
    }

    /// A high-priority request keeps its requested priority; with
    /// `headroom:N` it also asks for `N` blocks of headroom (with `all-but`
    /// the reserve is the load metric's, and the request asks for none).
    fn assign_priority(&mut self, _fleet: &Fleet, request: &RequestMeta) -> PriorityAssignment {
        if request.requested_priority == 0 {
            return PriorityAssignment::default();
        }
        PriorityAssignment {
            priority: request.requested_priority,
            headroom_blocks: match self.params.priority_reserve {
                PriorityReserve::Headroom { blocks } => blocks,
                PriorityReserve::AllBut { .. } => 0,
            },
        }
    }

    fn decide_scaling(&mut self, fleet: &Fleet) -> ScalingDecision {
        freeness_band_scaling(fleet, &self.params)
    }
}

/// Llumnix auto-scaling (the artifact's `avg_load` strategy): the serving
/// instances as one virtual instance, whose freeness is (Σ available −
/// Σ waiting demand) per (Σ running + [anything waits]). Below
/// `scale_up_below`, add enough empty instances of the average capacity to
/// get back above it (at most `max_scale_up` when that is not 0); above
/// `scale_down_above` even without the capacity of the instance a drain
/// would pick ([`DrainPick`]), drain it. No new drain while one is in
/// progress.
fn freeness_band_scaling(fleet: &Fleet, p: &LlumnixParams) -> ScalingDecision {
    let serving: Vec<&InstanceLoad> = fleet.serving().collect();
    if serving.is_empty() {
        return ScalingDecision::ScaleUp(1);
    }
    let capacity = |l: &InstanceLoad| i64::from(l.total_blocks) - i64::from(l.watermark_blocks);
    let demand: i64 = serving
        .iter()
        .map(|l| i64::from(l.waiting_demand_blocks))
        .sum();
    let virtual_free: i64 = serving.iter().map(|l| l.available_blocks()).sum::<i64>() - demand;
    let waiting = serving.iter().any(|l| l.waiting > 0);
    let requests: u64 =
        serving.iter().map(|l| u64::from(l.running)).sum::<u64>() + u64::from(waiting);
    let average = p.per_request(virtual_free, requests);
    if average.below(p.scale_up_below) {
        let mean_capacity =
            (serving.iter().map(|l| capacity(l)).sum::<i64>() / serving.len() as i64).max(1);
        let missing = p.scale_up_below * requests as i64 - virtual_free;
        let k = ((missing + mean_capacity - 1) / mean_capacity).max(1);
        let cap = if p.max_scale_up == 0 {
            i64::from(SCALE_UP_LIMIT)
        } else {
            i64::from(p.max_scale_up.min(SCALE_UP_LIMIT))
        };
        return ScalingDecision::ScaleUp(k.min(cap) as u32);
    }
    if serving.len() < 2 || fleet.loads().iter().any(|l| l.draining) {
        return ScalingDecision::Hold;
    }
    let victim = match p.drain_pick {
        DrainPick::HighestId => serving.iter().max_by_key(|l| l.instance),
        DrainPick::Emptiest => serving
            .iter()
            .min_by_key(|l| (l.requests(), l.used_blocks, core::cmp::Reverse(l.instance))),
    }
    .expect("serving is not empty");
    // Its requests move to the others, so the fleet loses its whole capacity.
    let without = p.per_request(virtual_free - capacity(victim), requests);
    if without.above(p.scale_down_above) {
        ScalingDecision::Drain(victim.instance)
    } else {
        ScalingDecision::Hold
    }
}

/// INFaaS++: dispatch to the freest instance by the same load metric as
/// Llumnix (no priority reserve), never migrate, no headroom (the trait's
/// defaults); scales on the same freeness band. Takes the same parameters
/// as `llumnix` (only the scaling ones and `deficit` matter).
#[derive(Clone, Debug, Default)]
pub struct Infaas {
    pub params: LlumnixParams,
}

impl Policy for Infaas {
    fn info(&self) -> PolicyInfo {
        info("infaas")
    }
    fn param_specs(&self) -> Vec<ParamSpec> {
        self.params.specs()
    }
    fn configure(&mut self, params: &[Param]) -> Result<(), ParamError> {
        self.params = self.params.configured(params)?;
        Ok(())
    }
    fn dispatch(&mut self, fleet: &Fleet, _request: &RequestMeta) -> Option<InstanceId> {
        let p = LlumnixParams {
            priority_reserve: PriorityReserve::Headroom { blocks: 0 },
            ..self.params
        };
        freest(fleet.serving(), |l| p.dispatch_freeness(l, false))
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

    fn with(params: &[(&str, &str)]) -> Llumnix {
        let mut p = Llumnix::default();
        let params: Vec<Param> = params.iter().map(|(k, v)| Param::new(*k, *v)).collect();
        p.configure(&params).expect("valid parameters");
        p
    }

    #[test]
    fn llumnix_dispatches_to_freest_and_honours_priority_pools() {
        let mut hot = load(0, 90, 4, 0);
        hot.high_priority_requests = 1;
        let f = fleet(&[hot, load(1, 50, 5, 0), load(2, 10, 5, 0)]);
        let mut p = with(&[("priority-reserve", "headroom:128")]);
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
    fn llumnix_artifact_reserve_steers_both_priorities() {
        // 792 blocks, all but 100 reserved where high-priority requests are.
        let big = |instance, used, running| InstanceLoad {
            total_blocks: 792,
            watermark_blocks: 8,
            ..load(instance, used, running, 0)
        };
        let mut priority = big(0, 100, 2);
        priority.high_priority_requests = 1;
        let f = fleet(&[priority, big(1, 400, 20)]);
        let mut p = Llumnix::default();
        let high = RequestMeta {
            priority: 1,
            requested_priority: 1,
            ..Default::default()
        };
        // Normal: instance 0 reads (792 − 100 − 8 − 692) / 2 = −4 per
        // request; instance 1 (384 / 20) is freer.
        assert_eq!(p.dispatch(&f, &RequestMeta::default()), Some(1));
        // High: instance 1 carries the reserve for it instead.
        assert_eq!(p.dispatch(&f, &high), Some(0));
        // The priority instance sheds normal load: it is a migration source.
        assert!(p.params.migration_freeness(&priority).below(3));
        assert_eq!(
            p.plan_migration(&f),
            [MigrationPair {
                source: 0,
                destination: 1
            }]
        );
        // It asks the engine for no headroom of its own.
        assert_eq!(p.assign_priority(&f, &high).headroom_blocks, 0);
        let p = with(&[("priority-reserve", "headroom:128")]);
        assert_eq!(p.clone().assign_priority(&f, &high).headroom_blocks, 128);
    }

    #[test]
    fn llumnix_migration_load_variants() {
        let mut queued = load(0, 40, 2, 3);
        queued.head_of_line_demand_blocks = 10;
        queued.waiting_demand_blocks = 50;
        // all-waiting: (59 − 50) / 3; head-of-line: (59 − 10) / 3; none: 59 / 3.
        let f = |v: &str| {
            with(&[("migration-load", v)])
                .params
                .migration_freeness(&queued)
        };
        assert_eq!(f("all-waiting"), Freeness::ratio(9, 3));
        assert_eq!(f("head-of-line"), Freeness::ratio(49, 3));
        assert_eq!(f("none"), Freeness::ratio(59, 3));
        // Nothing running but a queue: one request's worth, not +∞ (the
        // artifact), so a blocked queue is no migration destination.
        let mut blocked = load(1, 90, 0, 1);
        blocked.waiting_demand_blocks = 30;
        let p = Llumnix::default().params;
        assert!(p.migration_freeness(&blocked).below(0));
        assert_eq!(p.migration_freeness(&load(2, 0, 0, 0)), Freeness::PosInf);
        // Past saturation: divide ranks the longer queue freer, monotone not.
        let (short, long) = (load(3, 99, 1, 0), load(4, 99, 8, 0));
        let mut over = [short, long];
        for l in &mut over {
            l.waiting = 1;
            l.waiting_demand_blocks = 20;
        }
        let m = with(&[("deficit", "monotone")]).params;
        let d = Llumnix::default().params;
        assert!(m.migration_freeness(&over[1]) < m.migration_freeness(&over[0]));
        assert!(d.migration_freeness(&over[1]) > d.migration_freeness(&over[0]));
    }

    #[test]
    fn llumnix_parameters_are_validated_all_or_nothing() {
        let mut p = Llumnix::default();
        let before = p.params;
        let bad = [
            Param::new("migrate-out-below", "10"),
            Param::new("select", "fifo"),
        ];
        let e = p.configure(&bad).unwrap_err();
        assert_eq!(e.name, "select");
        assert_eq!(p.params, before, "nothing changes on an error");
        assert!(p
            .configure(&[Param::new("nope", "1")])
            .unwrap_err()
            .message
            .contains("known: migrate-out-below"));
        assert!(p
            .configure(&[Param::new("priority-reserve", "all-but")])
            .is_err());
        assert!(p.configure(&[Param::new("scale-down-above", "5")]).is_err());
        assert!(p
            .configure(&[Param::new("migrate-in-above", "99999999999")])
            .is_err());
        p.configure(&[
            Param::new("migrate-out-below", "10"),
            Param::new("migrate-in-above", "10"),
        ])
        .unwrap();
        assert_eq!(
            (p.params.migrate_out_below, p.params.migrate_in_above),
            (10, 10)
        );
        // Every spec's default reads back as the same parameters.
        let defaults: Vec<Param> = LlumnixParams::default()
            .specs()
            .into_iter()
            .map(|s| Param::new(s.name, s.default_value))
            .collect();
        assert_eq!(
            LlumnixParams::default().configured(&defaults).unwrap(),
            LlumnixParams::default()
        );
        // Policies without parameters refuse any.
        assert!(RoundRobin::default()
            .configure(&[Param::new("a", "1")])
            .is_err());
        assert!(RoundRobin::default().configure(&[]).is_ok());
        assert!(configured("infaas", &[Param::new("scale-up-below", "5")])
            .unwrap()
            .is_some());
        assert!(configured("nope", &[]).unwrap().is_none());
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
        blocked.waiting_demand_blocks = 55;
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
        // Balanced (the default): not a move that would make the destination
        // a source. 20 blocks free over 5 running: 10 more blocks leave
        // (20 - 10) / 6 < 3 free per request; room only asks for 10 < 20.
        let crowded = fleet(&[load(1, 79, 5, 0)]);
        let small = [sized(1, 10, 10)];
        assert!(Llumnix::default()
            .choose_migrations(&crowded, pair, &small)
            .is_empty());
        let mut room = with(&[("fit-check", "room")]);
        assert_eq!(room.choose_migrations(&crowded, pair, &small), [1]);
        // Without the fit check, the last-come regardless of room.
        let mut unchecked = with(&[("fit-check", "off")]);
        assert_eq!(unchecked.choose_migrations(&f, pair, &cands), [2]);
        // SJF / LJF by prompt + output, any priority, output required.
        let job = |id, priority, prompt_tokens, output_tokens| MigrationCandidate {
            prompt_tokens,
            ..c(id, priority, output_tokens, id)
        };
        let cands = [
            job(1, 0, 50, 5),
            job(2, 1, 10, 2),
            job(3, 0, 90, 9),
            job(4, 0, 1, 0),
        ];
        let any = Fleet::new();
        assert_eq!(
            with(&[("select", "sjf")]).choose_migrations(&any, pair, &cands),
            [2]
        );
        assert_eq!(
            with(&[("select", "ljf")]).choose_migrations(&any, pair, &cands),
            [3]
        );
    }

    #[test]
    fn llumnix_scales_inside_the_band() {
        let mut p = Llumnix::default();
        // 2 instances, 30 requests each, few free blocks -> scale up
        let f = fleet(&[load(0, 90, 30, 0), load(1, 90, 30, 0)]);
        assert!(matches!(p.decide_scaling(&f), ScalingDecision::ScaleUp(k) if k >= 1));
        // nearly idle -> drain the highest id (the artifact)
        let f = fleet(&[load(0, 0, 0, 0), load(1, 0, 0, 0)]);
        assert_eq!(p.decide_scaling(&f), ScalingDecision::Drain(1));
        let f = fleet(&[load(0, 0, 0, 0), load(1, 5, 1, 0)]);
        assert_eq!(p.decide_scaling(&f), ScalingDecision::Drain(1));
        let mut emptiest = with(&[("drain-pick", "emptiest")]);
        assert_eq!(emptiest.decide_scaling(&f), ScalingDecision::Drain(0));
        // Scale-up adds as many as the average needs unless capped.
        let many: Vec<_> = (0..4).map(|i| load(i, 95, 30, 0)).collect();
        let f4 = fleet(&many);
        let ScalingDecision::ScaleUp(k) = p.decide_scaling(&f4) else {
            panic!("overloaded")
        };
        assert!(k > 4, "{k}");
        let mut capped = with(&[("max-scale-up", "2")]);
        assert_eq!(capped.decide_scaling(&f4), ScalingDecision::ScaleUp(2));
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
