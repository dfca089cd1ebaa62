//! Capacity calibration: the `C` of the study's rescaling rule
//! ([`crate::study::RateSet`]).
//!
//! A workload's capacity on a profile is the Poisson rate at which
//! INFaaS++ on the study's fleet reaches a mean prefill latency of
//! [`QUEUE_ONSET_PREFILL_MS`] (1 s): below it requests rarely queue for
//! long, above it the queues grow for the whole run. It is found by a
//! bisection on the rate in log space, from a quarter to four times the
//! paper's midpoint, each probe one seeded simulation: the same inputs
//! give the same capacity, bit for bit.
//!
//! **Owns**: the criterion, the bisection and its record ([`Capacity`]).
//! **Never touches**: simulations (the caller's probe runs them), the
//! study's tables, files.

use anyhow::Result;
use serde::Serialize;

use crate::study::round_rate;

/// The mean prefill latency that marks the onset of queueing (ms).
pub const QUEUE_ONSET_PREFILL_MS: f64 = 1000.0;

/// The bisection's bracket around the paper's midpoint: [M / 4, 4 M].
pub const BRACKET: f64 = 4.0;

/// One probe of a calibration.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Probe {
    pub rate: f64,
    pub prefill_mean_ms: f64,
}

/// What a calibration found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Capacity {
    /// The profile's name.
    pub profile: String,
    /// The calibrated workload (Poisson arrivals of its lengths).
    pub spec: String,
    /// The paper's midpoint the bracket is centred on (req/s).
    pub anchor_rps: f64,
    /// The rate at which INFaaS++'s mean prefill latency reaches 1 s.
    pub capacity_rps: f64,
    /// False when every probe fell on one side (the capacity is then the
    /// bracket's end, and the rescaled rates only a bound).
    pub bracketed: bool,
    pub requests: usize,
    pub probes: Vec<Probe>,
}

/// Bisects for the rate at which `probe(rate)` (a mean prefill latency in
/// ms, increasing with the rate) crosses [`QUEUE_ONSET_PREFILL_MS`], in
/// `steps` probes between `anchor / BRACKET` and `anchor × BRACKET`.
/// Returns the geometric middle of the final bracket.
pub fn find_onset(
    anchor: f64,
    steps: u32,
    mut probe: impl FnMut(f64) -> Result<f64>,
) -> Result<(f64, bool, Vec<Probe>)> {
    let (lo0, hi0) = (anchor / BRACKET, anchor * BRACKET);
    let (mut lo, mut hi) = (lo0, hi0);
    let mut probes = Vec::new();
    for _ in 0..steps {
        let rate = round_rate((lo * hi).sqrt());
        let prefill_mean_ms = probe(rate)?;
        probes.push(Probe {
            rate,
            prefill_mean_ms,
        });
        if prefill_mean_ms < QUEUE_ONSET_PREFILL_MS {
            lo = rate;
        } else {
            hi = rate;
        }
    }
    let bracketed = lo > lo0 && hi < hi0;
    Ok((round_rate((lo * hi).sqrt()), bracketed, probes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bisection_finds_the_crossing() {
        // Prefill grows steeply past 12.5 req/s.
        let f = |r: f64| {
            Ok(if r < 12.5 {
                200.0
            } else {
                200.0 + (r - 12.5) * 1e4
            })
        };
        let (c, bracketed, probes) = find_onset(10.0, 10, f).unwrap();
        assert!(bracketed);
        assert_eq!(probes.len(), 10);
        assert_eq!(probes[0].rate, 10.0, "the first probe is the anchor");
        assert!((c - 12.6).abs() < 0.2, "{c}");
        // Deterministic.
        assert_eq!(find_onset(10.0, 10, f).unwrap().0, c);
    }

    #[test]
    fn an_unbracketed_capacity_says_so() {
        let (c, bracketed, _) = find_onset(10.0, 6, |_| Ok(10.0)).unwrap();
        assert!(!bracketed);
        assert!(c > 35.0, "{c}");
        let (c, bracketed, _) = find_onset(10.0, 6, |_| Ok(5000.0)).unwrap();
        assert!(!bracketed);
        assert!(c < 2.9, "{c}");
    }
}
