//! Seeded, plausible inputs of the decisions, for benchmarks and tests of
//! policies and the manager: instance loads, requests and migration
//! candidates drawn from a [`SplitMix64`], so the same seed gives the same
//! fleet and the same questions on every run and platform.
//!
//! Owns only the shape of those inputs and their invariants (see [`load`]).
//! **Never touches** the core's state: [`InstanceCore`](crate::InstanceCore)
//! and [`Controller`](crate::Controller) do not use it; their loads come
//! from real engines.

use llumen_engine::SplitMix64;
use llumen_policy_logic::{InstanceLoad, MigrationCandidate, RequestMeta};

/// Uniform in `0..n` (0 when `n` is 0).
fn below(rng: &mut SplitMix64, n: u32) -> u32 {
    rng.below(u64::from(n)) as u32
}

/// A plausible load of instance `instance` at `timestamp_us`, with these
/// invariants: `used_blocks ≤ total_blocks`; with nothing waiting, no
/// head-of-line nor waiting demand; otherwise `waiting_demand_blocks ≥
/// head_of_line_demand_blocks > 0`; `preempted ≤ waiting`. Now and then
/// preempted, draining, migrating (in or out), with headroom reserved or
/// high-priority requests.
pub fn load(rng: &mut SplitMix64, instance: u32, timestamp_us: u64) -> InstanceLoad {
    let total = 200 + below(rng, 800);
    let used = below(rng, total + 1);
    let running = below(rng, 40);
    let waiting = if rng.chance(40) { below(rng, 10) } else { 0 };
    let hol = if waiting > 0 { 1 + below(rng, 120) } else { 0 };
    InstanceLoad {
        instance,
        timestamp_us,
        block_size: 16,
        total_blocks: total,
        used_blocks: used,
        watermark_blocks: total / 100,
        running,
        waiting,
        preempted: if waiting > 0 && rng.chance(20) {
            below(rng, waiting) + 1
        } else {
            0
        },
        head_of_line_demand_blocks: hol,
        waiting_demand_blocks: hol + waiting.saturating_sub(1) * below(rng, 60),
        high_priority_requests: if rng.chance(15) { 1 + below(rng, 3) } else { 0 },
        headroom_blocks: if rng.chance(15) { below(rng, 128) } else { 0 },
        migrating_out: u32::from(rng.chance(10)),
        migrating_in: u32::from(rng.chance(10)),
        step_latency_us: 10_000 + below(rng, 40_000),
        draining: rng.chance(8),
    }
}

/// A request `id` arriving at `id` ms: 1 to 2048 prompt tokens, 1 to 512
/// output tokens, high priority (asked and assigned) one time in ten.
pub fn request(rng: &mut SplitMix64, id: u64) -> RequestMeta {
    let requested_priority = u8::from(rng.chance(10));
    RequestMeta {
        id,
        prompt_tokens: 1 + below(rng, 2048),
        max_tokens: 1 + below(rng, 512),
        requested_priority,
        priority: requested_priority,
        prefix_hash: rng.next_u64() & 0xFFFF_FFFF_0000,
        arrival_us: id * 1_000,
    }
}

/// `n` running requests of one instance (ids from 10 000) that a migration
/// plan could move.
pub fn candidates(rng: &mut SplitMix64, n: usize) -> Vec<MigrationCandidate> {
    (0..n)
        .map(|i| MigrationCandidate {
            id: 10_000 + i as u64,
            priority: u8::from(rng.chance(15)),
            blocks: 1 + below(rng, 200),
            prompt_tokens: below(rng, 2048),
            output_tokens: below(rng, 300),
            arrival_us: rng.below(1_000_000),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_keep_their_invariants_and_replay_from_the_seed() {
        let mut rng = SplitMix64::new(7);
        let mut seen = [false; 4];
        for t in 0..5_000 {
            let l = load(&mut rng, (t % 13) as u32, t);
            assert!(l.used_blocks <= l.total_blocks, "{l:?}");
            assert!(l.preempted <= l.waiting, "{l:?}");
            if l.waiting == 0 {
                assert_eq!(
                    (l.head_of_line_demand_blocks, l.waiting_demand_blocks),
                    (0, 0)
                );
            } else {
                assert!(l.head_of_line_demand_blocks > 0, "{l:?}");
                assert!(
                    l.waiting_demand_blocks >= l.head_of_line_demand_blocks,
                    "{l:?}"
                );
            }
            seen[0] |= l.draining;
            seen[1] |= l.migrating();
            seen[2] |= l.preempted > 0;
            seen[3] |= l.headroom_blocks > 0 && l.high_priority_requests > 0;
        }
        assert_eq!(seen, [true; 4], "every rare state shows up");
        let draw = |seed| {
            let mut rng = SplitMix64::new(seed);
            (
                load(&mut rng, 1, 2),
                request(&mut rng, 3),
                candidates(&mut rng, 4),
            )
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11).0, draw(12).0);
    }
}
