//! A minimal seeded workload for the simulator's own tests (independent of
//! the generators' evolution): Poisson arrivals, fixed lengths, a
//! high-priority fraction. The workload generators proper live in
//! `workload.rs`.
//!
//! **Owns**: nothing but this generator. **Never touches**: the simulation.

use crate::record::RequestSpec;
use crate::rng::Rng;

/// `n` requests arriving as a Poisson process of `rate_per_s`, each with
/// `prompt` prompt tokens and `output` output tokens; each is high priority
/// with probability `high_fraction`. Ids are dense from 0 in arrival order.
pub fn poisson_fixed(
    n: usize,
    rate_per_s: f64,
    prompt: u32,
    output: u32,
    high_fraction: f64,
    seed: u64,
) -> Vec<RequestSpec> {
    poisson_cycle(n, rate_per_s, &[(prompt, output)], high_fraction, seed)
}

/// As [`poisson_fixed`], the i-th request taking the (prompt, output)
/// lengths `shapes[i % shapes.len()]` (e.g. long and short alternating: a
/// round-robin dispatch over two instances then loads one of them only).
pub fn poisson_cycle(
    n: usize,
    rate_per_s: f64,
    shapes: &[(u32, u32)],
    high_fraction: f64,
    seed: u64,
) -> Vec<RequestSpec> {
    let mut rng = Rng::new(seed ^ 0x5157_4f52_4b4c_4f41);
    let mut unit = move || rng.open_unit_f64();
    let mut t = 0.0f64;
    (0..n as u64)
        .map(|id| {
            t += -unit().ln() / rate_per_s;
            let (prompt, output) = shapes[id as usize % shapes.len()];
            RequestSpec {
                id,
                arrival_us: (t * 1e6) as u64,
                prompt_tokens: prompt,
                output_tokens: output,
                high_priority: unit() < high_fraction,
            }
        })
        .collect()
}
