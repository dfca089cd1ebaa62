//! The simulator's tests: determinism, conservation (every request finishes
//! once with its length, no block leaks), migrations, auto-scaling,
//! priorities, and a policy comparison. They run the real components from
//! `target/policies` (built by `scripts/build-policies.sh`).

use super::synthetic::{poisson_cycle, poisson_fixed};
use super::*;
use crate::record::RequestSpec;
use llumen_host::front::admin::built_policy_dir as policy_dir;

fn config(instances: u32, policy: &str) -> SimConfig {
    SimConfig::new(
        instances,
        load_profile(None).unwrap(),
        PolicySet::named(policy, &policy_dir()),
    )
}

/// The same run, with a different policy for one kind.
fn with_kind(mut c: SimConfig, kind: llumen_host::policy::PolicyKind, policy: &str) -> SimConfig {
    *c.policies.get_mut(kind) = PolicySource::parse(policy, &policy_dir());
    c
}

fn run(c: &SimConfig, w: &[RequestSpec]) -> SimOutcome {
    let o = simulate(c, w).expect("simulation");
    check_conservation(w, &o);
    o
}

/// Every request finished (once: the simulator fails on a second finish)
/// with exactly its requested output, in a sane order of times; no engine
/// holds a block or a sequence at the end; every decision was the
/// component's own; migration counts agree.
fn check_conservation(w: &[RequestSpec], o: &SimOutcome) {
    assert_eq!(o.records.len(), w.len());
    for (spec, r) in w.iter().zip(&o.records) {
        assert_eq!(r.id, spec.id);
        assert_eq!(r.error, None, "request {}", spec.id);
        assert_eq!(r.output_tokens, spec.output_tokens, "request {}", spec.id);
        let first = r.first_token_us.expect("first token");
        let finish = r.finish_us.expect("finish");
        assert!(spec.arrival_us < first && first <= finish, "{r:?}");
        assert!(finish <= (o.fleet.run_seconds * 1e6).round() as u64);
        assert_eq!(r.preemptions == 0, r.preemption_loss_us == 0, "{r:?}");
    }
    let s = &o.stats;
    assert_eq!(
        (s.blocks_held_at_end, s.sequences_at_end),
        (0, 0),
        "leak: {s:?}"
    );
    assert_eq!(s.policy_failures, 0, "{:?}", s.first_policy_failure);
    assert_eq!(s.rejected_requests, 0);
    assert_eq!(s.migration_messages_refused, 0);
    let migrated: u64 = o.records.iter().map(|r| u64::from(r.migrations)).sum();
    assert_eq!(migrated, s.migrations_committed);
    assert_eq!(o.fleet.migrations_committed, s.migrations_committed);
    assert_eq!(
        s.migrations_started,
        s.migrations_committed + s.migrations_aborted + s.migrations_not_started
    );
    let preempted: u64 = o.records.iter().map(|r| u64::from(r.preemptions)).sum();
    assert_eq!(preempted, s.preemptions + s.migrations_requeued);
}

/// What must be identical across runs: everything but wall-clock times.
fn canonical(o: &SimOutcome) -> String {
    let mut fleet = o.fleet.clone();
    fleet.wall_seconds = 0.0;
    let mut stats = o.stats.clone();
    stats.wall_seconds = 0.0;
    stats.setup_seconds = 0.0;
    stats.speed_x = 0.0;
    stats.speed_x_with_setup = 0.0;
    serde_json::to_string(&(&o.records, &fleet, &stats)).unwrap()
}

fn p99_prefill_ms(o: &SimOutcome) -> f64 {
    crate::report::class_metrics(&o.records)
        .prefill_latency
        .p99_ms
}

/// Long and short requests alternating: a round-robin dispatch over two
/// instances loads one of them only (the other idles): migration's case.
fn lopsided(n: usize, seed: u64) -> Vec<RequestSpec> {
    poisson_cycle(n, 4.0, &[(1500, 600), (16, 8)], 0.0, seed)
}

#[test]
fn same_seed_gives_byte_identical_results() {
    let mut c = config(2, "llumnix");
    c = with_kind(c, llumen_host::policy::PolicyKind::Dispatch, "round-robin");
    let w = lopsided(120, 3);
    let a = run(&c, &w);
    let b = run(&c, &w);
    assert!(
        a.stats.migrations_committed > 0 && a.stats.preemptions > 0,
        "{:?}",
        a.stats
    );
    assert_eq!(canonical(&a), canonical(&b));
    // And so is the report's results.json (it leaves wall times out).
    let json = |o: &SimOutcome| {
        let meta = crate::report::RunMeta {
            policy: c.policies.label(),
            workload: "lopsided".into(),
            rate: 4.0,
            seed: 3,
            instances: c.instances,
        };
        let r = crate::report::RunResult::new(meta, &o.records, &o.fleet).with_requests(&o.records);
        crate::report::results_json(&[r], false)
    };
    assert_eq!(json(&a), json(&b));
    // A different workload seed changes the records.
    let other = run(&c, &lopsided(120, 4));
    assert_ne!(canonical(&a), canonical(&other));
}

#[test]
fn light_load_finishes_everything_on_every_policy() {
    let w = poisson_fixed(300, 20.0, 128, 64, 0.1, 1);
    for policy in [
        "llumnix",
        "infaas",
        "round-robin",
        "queue-length",
        "builtin:llumnix",
    ] {
        let o = run(&config(4, policy), &w);
        assert_eq!(o.stats.preemptions, 0, "{policy}");
        assert_eq!(o.fleet.samples.first().map(|s| s.instances), Some(4));
        assert!(o.stats.steps > 0 && o.stats.snapshots > 0, "{policy}");
        assert_eq!(o.stats.dispatch_calls, 300);
    }
}

#[test]
fn wasm_and_native_policies_decide_the_same() {
    // The components run the same logic as the host's builtins: the whole
    // run (dispatch, priorities, migrations) comes out identical.
    let wasm = config(2, "llumnix");
    let mut native = wasm.clone();
    native.policies = PolicySet::all(PolicySource::Builtin("llumnix".into()));
    let w = poisson_cycle(200, 12.0, &[(900, 300), (64, 32), (300, 100)], 0.2, 5);
    let a = run(&wasm, &w);
    assert!(a.stats.migrations_committed > 0, "{:?}", a.stats);
    assert_eq!(canonical(&a), canonical(&run(&native, &w)));
}

#[test]
fn llumnix_migrates_off_an_overloaded_instance_round_robin_never_does() {
    use llumen_host::policy::PolicyKind::{Dispatch, Migration};
    let w = lopsided(120, 11);
    // Round-robin dispatch piles the long requests on instance 0.
    let base = with_kind(config(2, "round-robin"), Dispatch, "round-robin");
    let llumnix = run(&with_kind(base.clone(), Migration, "llumnix"), &w);
    let s = &llumnix.stats;
    assert!(s.migrations_committed >= 5, "{s:?}");
    // The stop-and-copy stage is small (16 blocks + what the request wrote
    // during the stage before), whatever the sequence's length (~100 blocks
    // here); its downtime is its copy plus waiting for the destination's
    // step boundary, never the whole KV.
    assert!(s.migration_last_stage_blocks_max <= 18, "{s:?}");
    assert!(s.migration_downtime_us_max > 0);
    assert!(llumnix.records.iter().any(|r| r.migrations > 0));

    let rr = run(&with_kind(base, Migration, "round-robin"), &w);
    let s = &rr.stats;
    assert!(s.migration_plan_calls > 0);
    assert_eq!(
        (
            s.migrations_planned,
            s.migrations_started,
            s.migrations_committed
        ),
        (0, 0, 0),
        "{s:?}"
    );
    // Moving the load helps the queue on the loaded instance.
    assert!(p99_prefill_ms(&llumnix) < p99_prefill_ms(&rr));
}

#[test]
fn migrations_racing_with_finishing_requests_lose_nothing() {
    use llumen_host::policy::PolicyKind::Dispatch;
    // A slow link and short outputs: requests finish (or get preempted)
    // while their KV is in transit, migrations abort at every stage.
    let mut c = with_kind(config(2, "llumnix"), Dispatch, "round-robin");
    c.migration_bandwidth_bytes_per_s = Some(0.5e9);
    c.migration_message_latency_us = 20_000;
    c.migration_period_us = 20_000;
    let w = poisson_cycle(
        200,
        8.0,
        &[(1200, 40), (1200, 90), (16, 4), (16, 4)],
        0.0,
        21,
    );
    let o = run(&c, &w);
    let s = &o.stats;
    assert!(s.migrations_aborted > 0, "{s:?}");
    assert!(s.migrations_committed > 0, "{s:?}");
}

#[test]
fn autoscaling_grows_under_a_burst_and_shrinks_when_idle() {
    let mut c = config(1, "llumnix");
    c.scaling = Some(ScalingConfig {
        min_instances: 1,
        max_instances: 4,
        startup_delay_us: 2_000_000,
        period_us: 2_000_000,
        first_check_us: 0,
    });
    c.min_run_us = 90_000_000;
    let w = poisson_fixed(400, 40.0, 256, 128, 0.0, 2);
    let o = run(&c, &w);
    let s = &o.stats;
    assert!(s.scale_ups >= 1, "{s:?}");
    assert!(s.removals >= 1, "{s:?}");
    assert_eq!(s.max_instances, 4, "{s:?}");
    let counts: Vec<u32> = o.fleet.samples.iter().map(|x| x.instances).collect();
    assert_eq!(counts[0], 1);
    let peak = counts.iter().position(|&n| n == 4).expect("reached 4");
    assert!(counts[peak..].iter().any(|&n| n < 4), "{counts:?}");
    assert_eq!(*counts.last().unwrap(), 1, "{counts:?}");
    // Cost: less than four instances all along, more than one.
    let run_s = o.fleet.run_seconds;
    assert!(o.fleet.instance_seconds > 1.2 * run_s && o.fleet.instance_seconds < 3.0 * run_s);
    assert!(run_s >= 90.0);
    assert_eq!(o.fleet.scale_ups, s.scale_ups);
    assert_eq!(o.fleet.scale_downs, s.removals);
}

#[test]
fn high_priority_requests_are_served_first() {
    let c = config(2, "llumnix");
    let w = poisson_fixed(300, 14.0, 512, 128, 0.15, 8);
    let o = run(&c, &w);
    let high = crate::report::class_metrics(o.records.iter().filter(|r| r.high_priority));
    let normal = crate::report::class_metrics(o.records.iter().filter(|r| !r.high_priority));
    assert!(high.requests > 20);
    assert!(
        high.prefill_latency.mean_ms < normal.prefill_latency.mean_ms,
        "high {:?} normal {:?}",
        high.prefill_latency,
        normal.prefill_latency
    );
}

#[test]
fn llumnix_beats_round_robin_on_p99_prefill_near_saturation() {
    // Llumnix's Zipf 256/256 (variable lengths), 4 instances near saturation.
    let w = crate::workload::WorkloadSpec::parse("poisson;zipf:256:256;rate=1.5")
        .unwrap()
        .generate(600, 5, 0.0)
        .unwrap();
    let llumnix = run(&config(4, "llumnix"), &w);
    let rr = run(&config(4, "round-robin"), &w);
    assert!(llumnix.stats.migrations_committed > 0);
    let (l, r) = (p99_prefill_ms(&llumnix), p99_prefill_ms(&rr));
    assert!(l <= r, "llumnix p99 prefill {l} ms, round-robin {r} ms");
}

#[test]
fn fleet_samples_count_fragmentation() {
    // Long prompts that fit the fleet's free blocks only in sum.
    let w = poisson_fixed(60, 30.0, 7000, 32, 0.0, 4);
    let mut c = config(3, "round-robin");
    c.migration = false;
    c.sample_period_us = 100_000;
    let o = run(&c, &w);
    let samples = &o.fleet.samples;
    assert!(samples.iter().any(|s| s.waiting_demand_blocks > 0));
    assert!(
        samples.iter().any(|s| s.fragmented_demand_blocks > 0),
        "{samples:?}"
    );
    for s in samples {
        assert!(s.fragmented_demand_blocks <= s.waiting_demand_blocks);
        assert!(s.free_blocks_total <= 3 * 792);
    }
    assert_eq!(samples.last().unwrap().free_blocks_total, 3 * 792);
}

#[test]
fn bad_configurations_are_refused() {
    let w = poisson_fixed(5, 1.0, 16, 4, 0.0, 1);
    let c = config(0, "llumnix");
    assert!(simulate(&c, &w).is_err());
    let c = config(1, "no-such-policy");
    let e = simulate(&c, &w).unwrap_err().to_string();
    assert!(e.contains("build-policies"), "{e}");
    let mut c = config(1, "llumnix");
    c.policies = PolicySet {
        dispatch: PolicySource::Builtin("llumnix".into()),
        migration: PolicySource::Builtin("infaas".into()),
        ..c.policies.clone()
    };
    assert!(simulate(&c, &w).is_err());
    // A request that can never fit is recorded with an error, the rest run.
    let mut w = poisson_fixed(3, 1.0, 16, 4, 0.0, 1);
    w[1].prompt_tokens = 20_000;
    let o = simulate(&config(1, "llumnix"), &w).unwrap();
    assert!(o.records[1].error.is_some() && o.records[1].finish_us.is_none());
    assert!(o.records[0].error.is_none() && o.records[2].finish_us.is_some());
}

#[test]
fn runs_can_go_to_other_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SimConfig>();
    send_sync::<SimOutcome>();
}
