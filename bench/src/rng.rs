//! The benchmarks' seeded random numbers: the engine's [`SplitMix64`]
//! stream, so the same seed gives the same fleets, requests and workloads on
//! every run. Owns nothing else: the draws the workload generators need
//! beyond the stream's own (`open_unit_f64`, `exponential`, `normal`,
//! `gamma`).

use llumen_engine::SplitMix64;

/// SplitMix64 with the workload generators' draws.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed))
    }

    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u32) -> u32 {
        self.0.below(u64::from(n)) as u32
    }
}

/// Continuous draws for the workload generators (`workload.rs`). They only
/// consume the SplitMix64 stream (one step a uniform), so a seed keeps
/// giving the same draws.
impl Rng {
    /// Uniform in `[0, 1)`, 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        self.0.next_f64()
    }

    /// Uniform in `(0, 1)`: never 0, so its logarithm is finite.
    pub fn open_unit_f64(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * self.open_unit_f64().ln()
    }

    /// Standard normal (Box–Muller; one draw per call, the pair's second
    /// value is dropped so the state stays a single `u64`).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.open_unit_f64();
        let u2 = self.unit_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Gamma with `shape` k > 0 and `scale` θ > 0 (mean kθ, variance kθ²):
    /// Marsaglia–Tsang (2000) for k ≥ 1; for k < 1 the boost
    /// Gamma(k) = Gamma(k + 1) · U^(1/k).
    pub fn gamma(&mut self, shape: f64, scale: f64) -> f64 {
        if shape < 1.0 {
            let g = self.gamma(shape + 1.0, 1.0);
            let u = self.open_unit_f64();
            return g * u.powf(1.0 / shape) * scale;
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = self.open_unit_f64();
            let x2 = x * x;
            if u < 1.0 - 0.0331 * x2 * x2 || u.ln() < 0.5 * x2 + d * (1.0 - v + v.ln()) {
                return d * v * scale;
            }
        }
    }
}
