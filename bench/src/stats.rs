//! Summaries of the benches' timing samples. Owns nothing else.

use serde::Serialize;

/// Percentiles of nanosecond samples.
#[derive(Serialize)]
pub struct Percentiles {
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub mean_ns: u64,
    pub max_ns: u64,
    pub samples: usize,
}

/// Nearest-rank percentiles, mean and max of `samples` (all 0 when empty).
pub fn percentiles(mut samples: Vec<u64>) -> Percentiles {
    samples.sort_unstable();
    if samples.is_empty() {
        return Percentiles {
            p50_ns: 0,
            p99_ns: 0,
            mean_ns: 0,
            max_ns: 0,
            samples: 0,
        };
    }
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50_ns: at(0.50),
        p99_ns: at(0.99),
        mean_ns: samples.iter().sum::<u64>() / samples.len() as u64,
        max_ns: samples[samples.len() - 1],
        samples: samples.len(),
    }
}
