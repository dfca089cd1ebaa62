//! Next-token sampling on a logits row (pure Rust, no tensors).
//!
//! **Owns**: greedy argmax and seeded temperature / nucleus (top-p)
//! sampling. The draw for a request's `n`-th output token depends only on
//! `(seed, n, logits, temperature, top_p)`, never on a global RNG, on the
//! batch or on the instance, so sampling is reproducible across preemption
//! with recompute and across live migration. **Never touches**: tensors, the
//! KV cache, scheduling, I/O.
//!
//! Numerics: probabilities are computed in f64 from the f32 logits, kept
//! tokens are ordered by probability (ties: lower token id first), and the
//! uniform draw comes from SplitMix64 seeded by `mix(seed, n)`.

use super::weights::{mix64, SplitMix64};
use crate::TokenId;

/// Index of the largest logit; the lowest index wins ties; NaNs are ignored
/// (an empty or all-NaN row gives 0).
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if l <= b => {}
            _ => best = Some((i, l)),
        }
    }
    best.map_or(0, |(i, _)| i as TokenId)
}

/// The uniform draw in `[0, 1)` used for output token `output_index` of a
/// request seeded with `seed`.
pub fn uniform(seed: u64, output_index: u32) -> f64 {
    let mut rng = SplitMix64(mix64(seed) ^ mix64(0x5EED_0000_0000_0000 ^ output_index as u64));
    rng.next_f64()
}

/// Samples the next token: greedy when `temperature <= 0` (or not finite),
/// otherwise softmax at `temperature` restricted to the smallest set of most
/// probable tokens whose mass reaches `top_p` (`top_p >= 1` keeps all).
pub fn sample(
    logits: &[f32],
    temperature: f32,
    top_p: f32,
    seed: u64,
    output_index: u32,
) -> TokenId {
    if !(temperature.is_finite() && temperature > 0.0) {
        return argmax(logits);
    }
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax(logits);
    }
    let t = temperature as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan())
        .map(|(i, &l)| (i as u32, ((l as f64 - max as f64) / t).exp()))
        .filter(|&(_, p)| p > 0.0)
        .collect();
    let total: f64 = probs.iter().map(|&(_, p)| p).sum();
    let mut kept_mass = total;
    if top_p.is_finite() && top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let target = (top_p.max(0.0) as f64) * total;
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, &(_, p)) in probs.iter().enumerate() {
            cum += p;
            if cum >= target {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        kept_mass = probs.iter().map(|&(_, p)| p).sum();
    }
    let u = uniform(seed, output_index) * kept_mass;
    let mut cum = 0.0;
    for &(i, p) in &probs {
        cum += p;
        if u < cum {
            return i;
        }
    }
    probs.last().map_or(0, |&(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seed: u64, n: usize) -> Vec<f32> {
        let mut r = SplitMix64(seed);
        (0..n).map(|_| (r.next_f64() * 8.0 - 4.0) as f32).collect()
    }

    #[test]
    fn argmax_lowest_index_on_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN, -0.5]), 3);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn greedy_when_temperature_is_zero_or_top_p_tiny() {
        let l = row(1, 1000);
        let g = argmax(&l);
        assert_eq!(sample(&l, 0.0, 1.0, 5, 0), g);
        assert_eq!(sample(&l, -1.0, 0.5, 5, 3), g);
        for n in 0..50 {
            assert_eq!(
                sample(&l, 1.0, 1e-9, 42, n),
                g,
                "top_p ~ 0 keeps only the argmax"
            );
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varies() {
        let l = row(2, 4096);
        let a: Vec<_> = (0..64).map(|n| sample(&l, 1.0, 0.9, 11, n)).collect();
        let b: Vec<_> = (0..64).map(|n| sample(&l, 1.0, 0.9, 11, n)).collect();
        let c: Vec<_> = (0..64).map(|n| sample(&l, 1.0, 0.9, 12, n)).collect();
        assert_eq!(a, b, "same seed and index, same token");
        assert_ne!(a, c, "another seed draws differently");
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(
            distinct.len() > 10,
            "temperature 1 over 4096 spread logits varies: {distinct:?}"
        );
        // Out of order (as after a preemption): the n-th draw does not depend on history.
        assert_eq!(sample(&l, 1.0, 0.9, 11, 40), a[40]);
    }

    #[test]
    fn top_p_restricts_to_the_nucleus() {
        // Probabilities ~ [0.6, 0.3, 0.1 spread over the rest].
        let mut l = vec![-20.0f32; 100];
        l[7] = 10.0;
        l[3] = 10.0 - (2.0f32).ln();
        for n in 0..200 {
            let t = sample(&l, 1.0, 0.5, 9, n);
            assert_eq!(t, 7, "0.5 of the mass is reached by token 7 alone");
            let t = sample(&l, 1.0, 0.9, 9, n);
            assert!(t == 7 || t == 3, "{t}");
        }
        let draws: Vec<_> = (0..200).map(|n| sample(&l, 1.0, 0.9, 9, n)).collect();
        assert!(draws.contains(&3) && draws.contains(&7));
    }

    #[test]
    fn uniform_is_in_range_and_spread() {
        let xs: Vec<f64> = (0..10_000).map(|n| uniform(3, n)).collect();
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
