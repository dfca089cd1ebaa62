//! The Wasm policy runtime against the real components built by
//! `scripts/build-policies.sh` (into `target/policies/`, or
//! `$LLUMEN_POLICY_DIR`): equivalence with the native logic, containment of
//! hostile guests, hot swap and rollback under a stream of decisions, the
//! history import and world type-checking.
//!
//! Deterministic: every random input comes from a seeded generator; nothing
//! asserts on wall-clock time except generous containment bounds.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Rng;
use llumen_fleet::synthetic;
use llumen_host::policy::{
    CallFailure, CompiledPolicy, Decision, DecisionSource, PolicyError, PolicyKind, PolicyRuntime,
    RuntimeConfig, StoreHistory,
};
use llumen_policy_logic::{
    self as logic, Fleet, InstanceLoad, MigrationPair, Policy, RequestMeta, ScalingDecision,
};
use llumen_store::Store;

// ---------------------------------------------------------------- helpers

/// A runtime whose deadline no honest call can miss, even on a machine
/// loaded by parallel builds and tests: these tests are about answers, not
/// time (the hostile ones set their own deadline).
fn runtime() -> PolicyRuntime {
    let config = RuntimeConfig {
        call_deadline: Duration::from_secs(5),
        ..RuntimeConfig::default()
    };
    PolicyRuntime::new(config, "llumnix").expect("runtime")
}

/// For hostile guests: a deadline long enough that honest work (building a
/// big list, growing memory to the cap) never races it on a loaded machine.
fn patient_runtime() -> PolicyRuntime {
    let config = RuntimeConfig {
        call_deadline: Duration::from_secs(1),
        ..RuntimeConfig::default()
    };
    PolicyRuntime::new(config, "llumnix").expect("runtime")
}

fn compiled(rt: &PolicyRuntime, name: &str) -> Arc<CompiledPolicy> {
    rt.compile(&common::component_bytes(name))
        .unwrap_or_else(|e| panic!("compiling {name}: {e}"))
}

fn assert_active<T: std::fmt::Debug>(d: &Decision<T>, policy: &CompiledPolicy) {
    assert_eq!(d.failure, None, "{d:?}");
    assert_eq!(
        d.source,
        DecisionSource::Active {
            name: policy.name.clone(),
            sha256: policy.sha256.clone()
        },
        "{d:?}"
    );
}

// ------------------------------------------------------- equivalence

/// Drives the Wasm policy (all four slots) and the native one with the same
/// seeded stream of fleet changes and questions; every answer must match
/// and come from the active Wasm version.
fn check_matches_native(name: &str, seed: u64, steps: usize) {
    let rt = runtime();
    let policy = compiled(&rt, name);
    assert_eq!(&*policy.name, name);
    for kind in PolicyKind::ALL {
        rt.swap(kind, policy.clone())
            .unwrap_or_else(|e| panic!("swap {name} into {kind}: {e}"));
    }
    // One native copy per slot: each Wasm slot is its own instance with its own state.
    let mut native: Vec<Box<dyn Policy>> = PolicyKind::ALL
        .iter()
        .map(|_| logic::by_name(name).unwrap())
        .collect();
    let mut fleet = Fleet::new();
    let mut rng = Rng::new(seed);
    let fleet_size = 2 + rng.below(30) as u32;
    for step in 0..steps as u64 {
        // A few instances report new loads; now and then one leaves or joins.
        for _ in 0..rng.below(4) {
            let instance = rng.below(fleet_size.into()) as u32;
            let load = synthetic::load(&mut rng, instance, step);
            fleet.upsert([load]);
            rt.observe(load);
        }
        if rng.chance(3) {
            let gone = rng.below(fleet_size.into()) as u32;
            fleet.remove(gone);
            rt.remove_instance(gone);
        }
        let request = synthetic::request(&mut rng, step);
        let ctx = format!("{name} seed {seed} step {step}");

        let d = rt.assign_priority(&request);
        assert_active(&d, &policy);
        assert_eq!(
            d.value,
            native[2].assign_priority(&fleet, &request),
            "{ctx}"
        );

        let d = rt.dispatch(&request);
        if fleet.serving().next().is_some() {
            assert_active(&d, &policy);
        }
        assert_eq!(d.value, native[0].dispatch(&fleet, &request), "{ctx}");
        // The runtime counts the request at its instance until the next
        // snapshot: so does the reference view.
        if let Some(load) = d.value.and_then(|i| fleet.get(i).copied()) {
            fleet.upsert([load.with_dispatched(request.prompt_tokens)]);
        }

        if step % 5 == 0 {
            let d = rt.plan_migration();
            let expected = if fleet.len() < 2 {
                Vec::new()
            } else {
                native[1].plan_migration(&fleet)
            };
            if fleet.len() >= 2 {
                assert_active(&d, &policy);
            }
            assert_eq!(d.value, expected, "{ctx}");
            let pair = d.value.first().copied().unwrap_or(MigrationPair {
                source: 0,
                destination: 1,
            });
            let n = 1 + rng.below(12) as usize;
            let candidates = synthetic::candidates(&mut rng, n);
            let d = rt.choose_migrations(pair, &candidates);
            assert_active(&d, &policy);
            assert_eq!(
                d.value,
                native[1].choose_migrations(&fleet, pair, &candidates),
                "{ctx}"
            );
        }
        if step % 7 == 0 {
            let d = rt.decide_scaling();
            let expected = native[3].decide_scaling(&fleet);
            assert_active(&d, &policy);
            assert_eq!(d.value, expected, "{ctx}");
        }
    }
    for kind in PolicyKind::ALL {
        let status = rt.status(kind);
        let failures: u64 = status.stats.values().map(|s| s.failures()).sum();
        assert_eq!(failures, 0, "{kind}: {status:?}");
    }
}

#[test]
fn llumnix_component_matches_native() {
    for seed in 1..=6 {
        check_matches_native("llumnix", seed, 300);
    }
}

#[test]
fn infaas_component_matches_native() {
    for seed in 11..=13 {
        check_matches_native("infaas", seed, 200);
    }
}

#[test]
fn round_robin_component_matches_native() {
    for seed in 21..=23 {
        check_matches_native("round-robin", seed, 200);
    }
}

#[test]
fn queue_length_component_matches_native() {
    for seed in 31..=33 {
        check_matches_native("queue-length", seed, 200);
    }
}

#[test]
fn core_module_and_packed_component_are_the_same_policy() {
    let rt = runtime();
    let core = std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../policies/target/wasm32-unknown-unknown/release/llumnix.wasm"),
    )
    .expect("core module built by scripts/build-policies.sh");
    let from_core = rt
        .compile(&core)
        .expect("a wit-bindgen core module is componentized on load");
    assert_eq!(from_core.sha256, compiled(&rt, "llumnix").sha256);
    assert!(matches!(
        rt.compile(b"not wasm at all"),
        Err(PolicyError::NotWasm)
    ));
}

// ------------------------------------------------------- containment

fn two_instance_fleet(rt: &PolicyRuntime) -> Fleet {
    let mut fleet = Fleet::new();
    for (instance, used) in [(0, 700), (1, 100)] {
        let load = InstanceLoad {
            instance,
            block_size: 16,
            total_blocks: 800,
            used_blocks: used,
            watermark_blocks: 8,
            running: 4,
            ..Default::default()
        };
        rt.observe(load);
        fleet.upsert([load]);
    }
    fleet
}

fn hostile_request(trigger: u64) -> RequestMeta {
    RequestMeta {
        id: 7,
        prompt_tokens: 10,
        max_tokens: 10,
        prefix_hash: trigger,
        ..Default::default()
    }
}

const SPIN: u64 = 0xBAD1;
const MEMORY_BOMB: u64 = 0xBAD2;
const PANIC: u64 = 0xBAD3;
const UNKNOWN_INSTANCE: u64 = 0xBAD4;
const HUGE_LIST_STEP_LATENCY: u32 = 0xBAD5;
const ABSURD_HEADROOM: u64 = 0xBAD6;

/// Each misbehaviour is contained within the deadline, answered by the
/// builtin (no earlier version), counted, and the next call is served by a
/// fresh instance of the same version.
#[test]
fn hostile_guest_is_contained_and_builtin_answers() {
    let rt = patient_runtime();
    let hostile = compiled(&rt, "hostile");
    rt.swap(PolicyKind::Dispatch, hostile.clone()).unwrap();
    let fleet = two_instance_fleet(&rt);
    let expected = logic::Llumnix::default().dispatch(&fleet, &hostile_request(0));
    assert_eq!(expected, Some(1));
    type IsExpected = fn(&CallFailure) -> bool;
    let cases: [(u64, IsExpected); 4] = [
        (SPIN, |f| *f == CallFailure::Timeout),
        (MEMORY_BOMB, |f| *f == CallFailure::MemoryLimit),
        (PANIC, |f| matches!(f, CallFailure::Trap(_))),
        (
            UNKNOWN_INSTANCE,
            |f| matches!(f, CallFailure::Invalid(m) if m.contains("unknown instance")),
        ),
    ];
    for (trigger, is_expected_failure) in cases {
        let started = Instant::now();
        let d = rt.dispatch(&hostile_request(trigger));
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(10),
            "trigger {trigger:#x} took {elapsed:?}"
        );
        let failure = d
            .failure
            .as_ref()
            .unwrap_or_else(|| panic!("trigger {trigger:#x}: no failure recorded"));
        assert!(
            is_expected_failure(failure),
            "trigger {trigger:#x}: {failure:?}"
        );
        assert_eq!(
            d.source,
            DecisionSource::Builtin {
                name: "llumnix".into()
            }
        );
        assert_eq!(d.value, expected, "the fallback answers");
        // The very next well-behaved call is served by the (re-instantiated) active version.
        let d = rt.dispatch(&hostile_request(0));
        assert_active(&d, &hostile);
        assert_eq!(d.value, expected);
    }
    let stats =
        &rt.status(PolicyKind::Dispatch).stats[&format!("hostile@{}", &hostile.sha256[..12])];
    assert_eq!(
        (
            stats.timeouts,
            stats.memory_limits,
            stats.traps,
            stats.invalid_answers
        ),
        (1, 1, 1, 1)
    );
}

#[test]
fn hostile_lists_and_headroom_are_rejected() {
    let rt = patient_runtime();
    let hostile = compiled(&rt, "hostile");
    rt.swap(PolicyKind::Migration, hostile.clone()).unwrap();
    rt.swap(PolicyKind::Priority, hostile.clone()).unwrap();
    let mut fleet = two_instance_fleet(&rt);
    // A huge answer list (100,000 pairs for two instances).
    let mut load = *fleet.get(0).unwrap();
    load.step_latency_us = HUGE_LIST_STEP_LATENCY;
    rt.observe(load);
    fleet.upsert([load]);
    let d = rt.plan_migration();
    assert!(
        matches!(&d.failure, Some(CallFailure::Invalid(m)) if m.contains("migration pairs")),
        "{d:?}"
    );
    assert_eq!(d.value, logic::Llumnix::default().plan_migration(&fleet));
    // An absurd headroom.
    let request = RequestMeta {
        requested_priority: 1,
        ..hostile_request(ABSURD_HEADROOM)
    };
    let d = rt.assign_priority(&request);
    assert!(
        matches!(&d.failure, Some(CallFailure::Invalid(m)) if m.contains("headroom")),
        "{d:?}"
    );
    assert_eq!(
        d.value,
        logic::Llumnix::default().assign_priority(&fleet, &request)
    );
}

/// With an earlier version in place, a failing call is answered by it, and
/// after `max_consecutive_failures` in a row the bad version is demoted.
#[test]
fn last_good_version_answers_then_bad_version_is_demoted() {
    let rt = runtime();
    let round_robin = compiled(&rt, "round-robin");
    let hostile = compiled(&rt, "hostile");
    rt.swap(PolicyKind::Dispatch, round_robin.clone()).unwrap();
    rt.swap(PolicyKind::Dispatch, hostile.clone()).unwrap();
    two_instance_fleet(&rt);
    let last_good = DecisionSource::LastGood {
        name: "round-robin".into(),
        sha256: round_robin.sha256.clone(),
    };
    for i in 0..RuntimeConfig::default().max_consecutive_failures {
        let d = rt.dispatch(&hostile_request(PANIC));
        assert!(matches!(d.failure, Some(CallFailure::Trap(_))), "{d:?}");
        assert_eq!(d.source, last_good, "failure {i}");
        assert_eq!(d.value, Some(i % 2), "round-robin takes turns");
    }
    assert_eq!(
        rt.active(PolicyKind::Dispatch).unwrap().sha256,
        round_robin.sha256,
        "hostile demoted"
    );
    let d = rt.dispatch(&hostile_request(PANIC));
    assert_active(&d, &round_robin);
}

#[test]
fn components_are_type_checked_against_the_slot_world() {
    let rt = runtime();
    let dispatch_only = compiled(&rt, "dispatch-only");
    assert_eq!(dispatch_only.kinds, [PolicyKind::Dispatch]);
    for kind in [
        PolicyKind::Migration,
        PolicyKind::Priority,
        PolicyKind::Scaling,
    ] {
        let err = rt.swap(kind, dispatch_only.clone()).unwrap_err();
        assert!(
            matches!(err, PolicyError::WrongWorld { kind: k, .. } if k == kind),
            "{err}"
        );
    }
    assert!(
        rt.active(PolicyKind::Migration).is_none(),
        "a refused swap changes nothing"
    );
}

/// The history import: `dispatch-only` picks the lowest mean step latency
/// over each instance's last four snapshots; with the in-memory history and
/// with snapshots persisted in sled.
#[test]
fn history_import_serves_recorded_snapshots() {
    let in_sled = Arc::new(StoreHistory::new(Arc::new(
        Store::temporary().expect("temporary sled store"),
    )));
    for rt in [
        runtime(),
        PolicyRuntime::with_history(RuntimeConfig::default(), "llumnix", in_sled).unwrap(),
    ] {
        check_history_import(&rt);
    }
}

fn check_history_import(rt: &PolicyRuntime) {
    let policy = compiled(rt, "dispatch-only");
    rt.swap(PolicyKind::Dispatch, policy.clone()).unwrap();
    // Instance 0's latest step is the fastest, but its recent mean is the worst.
    let latencies: [(u32, [u32; 5]); 3] = [
        (0, [90_000, 90_000, 90_000, 90_000, 1_000]),
        (1, [5, 30_000, 30_000, 30_000, 30_000]),
        (2, [0, 40_000, 40_000, 40_000, 40_000]),
    ];
    for step in 0..5 {
        for (instance, series) in latencies {
            rt.observe(InstanceLoad {
                instance,
                timestamp_us: step,
                total_blocks: 100,
                step_latency_us: series[step as usize],
                ..Default::default()
            });
        }
    }
    let d = rt.dispatch(&RequestMeta::default());
    assert_active(&d, &policy);
    assert_eq!(d.value, Some(1));
}

// ------------------------------------------------------- hot swap

/// A stream of decisions keeps flowing on one thread while another swaps
/// llumnix in over round-robin, rolls back, and swaps again. No call fails;
/// each answer is exactly what the version that answered computes; the
/// answering version changes exactly once per swap, between the last call
/// finished before the swap began and the first call started after it ended.
#[test]
fn hot_swap_and_rollback_under_a_decision_stream() {
    const CALLS: u64 = 3_000;
    let rt = Arc::new(runtime());
    let round_robin = compiled(&rt, "round-robin");
    let llumnix = compiled(&rt, "llumnix");
    rt.swap(PolicyKind::Dispatch, round_robin.clone()).unwrap();

    const FLEET_SIZE: u64 = 8;
    let fleet_size = FLEET_SIZE;
    let load_at = |i: u64| {
        let mut rng = Rng::new(i);
        let mut load = synthetic::load(&mut rng, (i % FLEET_SIZE) as u32, i);
        load.draining = false;
        load
    };
    for i in 0..fleet_size {
        rt.observe(load_at(i));
    }
    let started = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let swaps_done = Arc::new(AtomicU64::new(0));
    let swap_points = [CALLS / 4, CALLS / 2, 3 * CALLS / 4];
    let streamer = {
        let (rt, started, finished, swaps_done) = (
            rt.clone(),
            started.clone(),
            finished.clone(),
            swaps_done.clone(),
        );
        std::thread::spawn(move || {
            let mut answers = Vec::with_capacity(CALLS as usize);
            for k in 0..CALLS {
                // Calls race with each swap for a while; a little after each
                // swap point the stream waits for the swap, so every phase
                // is seen by at least some calls.
                if let Some(i) = swap_points.iter().position(|&p| k == p + 50) {
                    while swaps_done.load(Ordering::SeqCst) <= i as u64 {
                        std::thread::yield_now();
                    }
                }
                let i = fleet_size + k;
                rt.observe(load_at(i));
                started.fetch_add(1, Ordering::SeqCst);
                let d = rt.dispatch(&RequestMeta {
                    id: i,
                    ..Default::default()
                });
                finished.fetch_add(1, Ordering::SeqCst);
                answers.push(d);
            }
            answers
        })
    };
    let wait_for = |n: u64| {
        while finished.load(Ordering::SeqCst) < n {
            std::thread::yield_now();
        }
    };
    let mut windows = Vec::new();
    let mut swap_at = |n: u64, action: &dyn Fn()| {
        wait_for(n);
        let before = finished.load(Ordering::SeqCst);
        action();
        windows.push((before, started.load(Ordering::SeqCst)));
        swaps_done.fetch_add(1, Ordering::SeqCst);
    };
    swap_at(swap_points[0], &|| {
        rt.swap(PolicyKind::Dispatch, llumnix.clone()).unwrap()
    });
    swap_at(swap_points[1], &|| {
        assert_eq!(
            rt.rollback(PolicyKind::Dispatch).unwrap().sha256,
            round_robin.sha256
        )
    });
    swap_at(swap_points[2], &|| {
        rt.swap(PolicyKind::Dispatch, llumnix.clone()).unwrap()
    });
    let answers = streamer.join().unwrap();

    // Replay: the fleet as the streamer saw it, and a fresh native copy of
    // each version whenever the answering version changes (a swapped-in or
    // rolled-back version starts from a fresh instance).
    let mut fleet = Fleet::new();
    for i in 0..fleet_size {
        fleet.upsert([load_at(i)]);
    }
    let mut transitions = Vec::new();
    let mut current: Option<Arc<str>> = None;
    let mut native: Box<dyn Policy> = logic::by_name("round-robin").unwrap();
    for (k, d) in answers.iter().enumerate() {
        fleet.upsert([load_at(fleet_size + k as u64)]);
        assert_eq!(d.failure, None, "call {k} failed: {d:?}");
        let DecisionSource::Active { name, sha256 } = &d.source else {
            panic!("call {k} not served by the active version: {d:?}")
        };
        if current.as_ref() != Some(sha256) {
            if current.is_some() {
                transitions.push(k as u64);
            }
            current = Some(sha256.clone());
            native = logic::by_name(name).unwrap();
        }
        let request = RequestMeta {
            id: fleet_size + k as u64,
            ..Default::default()
        };
        assert_eq!(
            d.value,
            native.dispatch(&fleet, &request),
            "call {k} ({name})"
        );
        if let Some(load) = d.value.and_then(|i| fleet.get(i).copied()) {
            fleet.upsert([load.with_dispatched(request.prompt_tokens)]);
        }
    }
    assert_eq!(
        transitions.len(),
        3,
        "one switch per swap or rollback: {transitions:?}"
    );
    for (t, (before, after)) in transitions.iter().zip(&windows) {
        assert!(
            before <= t && t <= after,
            "switch at call {t}, swap window [{before}, {after}]"
        );
    }
}

#[test]
fn scaling_decision_round_trips() {
    let rt = runtime();
    let policy = compiled(&rt, "llumnix");
    rt.swap(PolicyKind::Scaling, policy.clone()).unwrap();
    for instance in 0..2 {
        rt.observe(InstanceLoad {
            instance,
            total_blocks: 100,
            watermark_blocks: 1,
            ..Default::default()
        });
    }
    let d = rt.decide_scaling();
    assert_active(&d, &policy);
    assert_eq!(d.value, ScalingDecision::Drain(1));
}
