//! Latency of whole decisions (the active version's call and any fallback
//! behind it): a log-linear histogram per slot and the summary status shows.
//!
//! A decision is recorded with a weight: the number of decisions it stands
//! for (the runtime times one in 8 of a settled slot's decisions and counts
//! it 8 times), so counts and quantiles are estimates of all decisions.
//!
//! Buckets: eight per power of two (each at most 12.5% wide), exact below
//! 8 ns; 496 buckets cover every `u64` of nanoseconds. A quantile is the
//! upper end of the bucket it falls in, clamped to the largest value seen,
//! so it never under-states and over-states by at most 12.5%.
//!
//! This module owns the arithmetic only; it never reads a clock.

use serde::{Deserialize, Serialize};

const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) * SUB as usize;

fn index(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros();
    let mantissa = (ns >> (exp - SUB_BITS)) - SUB;
    ((u64::from(exp - SUB_BITS) + 1) * SUB + mantissa) as usize
}

/// The smallest value in bucket `i` (`u64::MAX` past the last bucket).
fn lower(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let exp = i / SUB - 1 + u64::from(SUB_BITS);
    let mantissa = i % SUB;
    (SUB + mantissa)
        .checked_shl((exp - u64::from(SUB_BITS)) as u32)
        .filter(|&v| v >> (exp - u64::from(SUB_BITS)) == SUB + mantissa)
        .unwrap_or(u64::MAX)
}

/// Counts of decision latencies.
#[derive(Clone, Debug)]
pub(crate) struct LatencyHistogram {
    counts: Vec<u64>,
    count: u64,
    timed: u64,
    sum_ns: u64,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            timed: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl LatencyHistogram {
    /// One timed decision that stands for `weight` decisions.
    pub(crate) fn record(&mut self, ns: u64, weight: u64) {
        self.counts[index(ns)] += weight;
        self.count += weight;
        self.timed += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns.saturating_mul(weight));
        self.max_ns = self.max_ns.max(ns);
    }

    pub(crate) fn summary(&self) -> LatencySummary {
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| (lower(i + 1).saturating_sub(1), n))
            .collect();
        LatencySummary::from_buckets(buckets, self.sum_ns, self.timed, Some(self.max_ns))
    }
}

/// Decision latencies of one slot, for status displays and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Decisions (estimated: the sum of the weights).
    pub count: u64,
    /// Decisions actually timed.
    pub timed: u64,
    /// Total time (estimated, as `count`).
    pub sum_ns: u64,
    /// Slowest timed decision (exact; for a [`LatencySummary::since`]
    /// difference, the upper end of the slowest bucket).
    pub max_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    /// Non-empty buckets as (largest value in the bucket, count), ascending.
    pub buckets: Vec<(u64, u64)>,
}

impl LatencySummary {
    fn from_buckets(
        buckets: Vec<(u64, u64)>,
        sum_ns: u64,
        timed: u64,
        max_ns: Option<u64>,
    ) -> Self {
        let count = buckets.iter().map(|&(_, n)| n).sum();
        let max_ns = max_ns.unwrap_or_else(|| buckets.last().map_or(0, |&(upper, _)| upper));
        let mut s = Self {
            count,
            timed,
            sum_ns,
            max_ns,
            buckets,
            ..Self::default()
        };
        s.p50_ns = s.quantile(0.5);
        s.p90_ns = s.quantile(0.9);
        s.p99_ns = s.quantile(0.99);
        s.p999_ns = s.quantile(0.999);
        s
    }

    /// The `q` quantile (0 < q ≤ 1): the upper end of the bucket holding
    /// the ⌈q·count⌉-th smallest value, at most `max_ns`; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for &(upper, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return upper.min(self.max_ns);
            }
        }
        self.max_ns
    }

    /// The decisions timed since `earlier` (a summary of the same slot taken
    /// before this one).
    pub fn since(&self, earlier: &LatencySummary) -> LatencySummary {
        let buckets = self
            .buckets
            .iter()
            .filter_map(|&(upper, n)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|&&(u, _)| u == upper)
                    .map_or(0, |&(_, n)| n);
                (n > before).then(|| (upper, n - before))
            })
            .collect();
        LatencySummary::from_buckets(
            buckets,
            self.sum_ns.saturating_sub(earlier.sum_ns),
            self.timed.saturating_sub(earlier.timed),
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_u64_contiguously_and_are_narrow() {
        assert_eq!(index(0), 0);
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        for i in 0..BUCKETS - 1 {
            let (lo, hi) = (lower(i), lower(i + 1));
            assert!(lo < hi, "bucket {i}");
            assert_eq!(index(lo), i);
            assert_eq!(index(hi - 1), i);
            // At most 12.5% wide.
            assert!(
                (hi - lo) as f64 <= (lo.max(1) as f64) / 8.0 + 1.0,
                "bucket {i}"
            );
        }
        assert_eq!(lower(BUCKETS), u64::MAX);
    }

    #[test]
    fn quantiles_never_understate_and_are_within_a_bucket() {
        let mut h = LatencyHistogram::default();
        for ns in 1..=1000u64 {
            h.record(ns * 1000, 1);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.max_ns, 1_000_000);
        for (q, exact) in [(0.5, 500_000u64), (0.9, 900_000), (0.99, 990_000)] {
            let got = s.quantile(q);
            assert!(
                got >= exact && got as f64 <= exact as f64 * 1.125,
                "{q}: {got}"
            );
        }
        assert_eq!(s.quantile(1.0), 1_000_000);
        assert_eq!(LatencySummary::default().quantile(0.99), 0);
    }

    #[test]
    fn since_is_the_difference() {
        let mut h = LatencyHistogram::default();
        for _ in 0..100 {
            h.record(1_000, 1);
        }
        let before = h.summary();
        for _ in 0..98 {
            h.record(1_000, 1);
        }
        h.record(30_000_000, 1);
        h.record(30_000_000, 1);
        let phase = h.summary().since(&before);
        assert_eq!(phase.count, 100);
        assert_eq!(phase.sum_ns, 98_000 + 60_000_000);
        assert!(phase.p99_ns >= 30_000_000 && phase.p99_ns < 34_000_000);
        assert!(phase.p50_ns >= 1_000 && phase.p50_ns < 1_125);
        assert!(
            h.summary().p99_ns < 30_000_000,
            "over all 200 it is the fast ones"
        );
    }

    #[test]
    fn weights_stand_for_unsampled_decisions() {
        let mut h = LatencyHistogram::default();
        // 80 fast decisions sampled 1 in 8, then 3 slow ones timed exactly.
        for _ in 0..10 {
            h.record(1_000, 8);
        }
        for _ in 0..3 {
            h.record(50_000_000, 1);
        }
        let s = h.summary();
        assert_eq!((s.count, s.timed), (83, 13));
        assert_eq!(s.sum_ns, 80_000 + 150_000_000);
        assert!(s.p90_ns < 1_125, "{s:?}");
        assert!(s.p99_ns >= 50_000_000, "{s:?}");
    }
}
