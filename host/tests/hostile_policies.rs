//! Hostile policies against the runtime, in process: every component of the
//! adversary library (`policies/testing/adversaries`, built by
//! scripts/build-policies.sh into `target/policies/hostile-<behaviour>.wasm`)
//! is contained in every kind of decision it misbehaves in; slow answers
//! within the deadline are accepted; demotion, retry on probation and the
//! doubling back-off run on a manual clock (no sleeps); the failure-window
//! rule demotes a policy that fails every other call; and a component that
//! imports WASI is refused.
//!
//! Deterministic: the adversaries misbehave on a fixed schedule (honest on an
//! instance's first decision, hostile from the second), the back-off runs on
//! a [`ManualClock`], and the only wall-clock assertions are generous
//! containment bounds.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use llumen_host::policy::{
    CallFailure, CompiledPolicy, Decision, DecisionSource, ManualClock, PolicyError, PolicyKind,
    PolicyRuntime, RuntimeConfig,
};
use llumen_policy_logic::{
    Fleet, InstanceLoad, Llumnix, MigrationCandidate, MigrationPair, Policy, RequestMeta,
};

// ---------------------------------------------------------------- helpers

fn compiled(rt: &PolicyRuntime, name: &str) -> Arc<CompiledPolicy> {
    rt.compile(&common::component_bytes(name))
        .unwrap_or_else(|e| panic!("compiling {name}: {e}"))
}

/// Four serving instances with different loads (so a duplicated pair is a
/// duplicate, not just too many pairs), observed by `rt`.
fn four_instance_fleet(rt: &PolicyRuntime) -> Fleet {
    let mut fleet = Fleet::new();
    for i in 0..4u32 {
        let load = InstanceLoad {
            instance: i,
            timestamp_us: 1,
            block_size: 16,
            total_blocks: 800,
            used_blocks: 150 * i + 40,
            watermark_blocks: 8,
            running: 2 + 3 * i,
            waiting: i / 2,
            head_of_line_demand_blocks: if i >= 2 { 30 } else { 0 },
            waiting_demand_blocks: 30 * (i / 2),
            step_latency_us: 20_000,
            ..Default::default()
        };
        rt.observe(load);
        fleet.upsert([load]);
    }
    fleet
}

fn request(id: u64) -> RequestMeta {
    RequestMeta {
        id,
        prompt_tokens: 100,
        max_tokens: 50,
        arrival_us: 1_000 + id,
        ..Default::default()
    }
}

fn candidates() -> Vec<MigrationCandidate> {
    (0..3)
        .map(|i| MigrationCandidate {
            id: 500 + i,
            blocks: 10 + i as u32,
            prompt_tokens: 100,
            output_tokens: 10,
            arrival_us: i,
            ..Default::default()
        })
        .collect()
}

const PAIR: MigrationPair = MigrationPair {
    source: 3,
    destination: 0,
};

/// One kind of question, asked of the runtime and of native llumnix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Dispatch,
    Plan,
    Choose,
    Assign,
    Decide,
}

impl Call {
    const ALL: [Call; 5] = [
        Call::Dispatch,
        Call::Plan,
        Call::Choose,
        Call::Assign,
        Call::Decide,
    ];

    fn kind(self) -> PolicyKind {
        match self {
            Call::Dispatch => PolicyKind::Dispatch,
            Call::Plan | Call::Choose => PolicyKind::Migration,
            Call::Assign => PolicyKind::Priority,
            Call::Decide => PolicyKind::Scaling,
        }
    }

    /// The runtime's decision, with its value rendered for comparison.
    fn ask(self, rt: &PolicyRuntime, id: u64) -> Decision<String> {
        fn render<T: std::fmt::Debug>(d: Decision<T>) -> Decision<String> {
            Decision {
                value: format!("{:?}", d.value),
                source: d.source,
                failure: d.failure,
            }
        }
        match self {
            Call::Dispatch => render(rt.dispatch(&request(id))),
            Call::Plan => render(rt.plan_migration()),
            Call::Choose => render(rt.choose_migrations(PAIR, &candidates())),
            Call::Assign => render(rt.assign_priority(&request(id))),
            Call::Decide => render(rt.decide_scaling()),
        }
    }

    /// What native llumnix answers on `fleet`.
    fn native(self, fleet: &Fleet, id: u64) -> String {
        let mut p = Llumnix::default();
        match self {
            Call::Dispatch => format!("{:?}", p.dispatch(fleet, &request(id))),
            Call::Plan => format!("{:?}", p.plan_migration(fleet)),
            Call::Choose => format!("{:?}", p.choose_migrations(fleet, PAIR, &candidates())),
            Call::Assign => format!("{:?}", p.assign_priority(fleet, &request(id))),
            Call::Decide => format!("{:?}", p.decide_scaling(fleet)),
        }
    }
}

/// The failure an adversary's hostile call must be classified as.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Timeout,
    MemoryLimit,
    Trap,
    Invalid(&'static str),
}

impl Expect {
    fn matches(self, f: &CallFailure) -> bool {
        match (self, f) {
            (Expect::Timeout, CallFailure::Timeout) => true,
            (Expect::MemoryLimit, CallFailure::MemoryLimit) => true,
            (Expect::Trap, CallFailure::Trap(_)) => true,
            (Expect::Invalid(part), CallFailure::Invalid(m)) => m.contains(part),
            _ => false,
        }
    }
}

/// Every (component, call) the adversary library misbehaves in, and how.
fn cases() -> Vec<(&'static str, Call, Expect)> {
    let mut cases = Vec::new();
    for (component, expect) in [
        ("hostile-spin", Expect::Timeout),
        ("hostile-memory", Expect::MemoryLimit),
        ("hostile-recursion", Expect::Trap),
        ("hostile-panic", Expect::Trap),
    ] {
        for call in Call::ALL {
            cases.push((component, call, expect));
        }
    }
    cases.extend([
        (
            "hostile-wrong-ids",
            Call::Dispatch,
            Expect::Invalid("dispatch chose unknown instance"),
        ),
        (
            "hostile-wrong-ids",
            Call::Plan,
            Expect::Invalid("migration names unknown instance"),
        ),
        (
            "hostile-wrong-ids",
            Call::Choose,
            Expect::Invalid("is not a migration candidate"),
        ),
        (
            "hostile-wrong-ids",
            Call::Decide,
            Expect::Invalid("drain of unknown instance"),
        ),
        (
            "hostile-duplicates",
            Call::Plan,
            Expect::Invalid("appears in more than one migration pair"),
        ),
        (
            "hostile-duplicates",
            Call::Choose,
            Expect::Invalid("chosen twice"),
        ),
        (
            "hostile-oversize",
            Call::Plan,
            Expect::Invalid("524288 migration pairs for a fleet of 4"),
        ),
        (
            "hostile-oversize",
            Call::Choose,
            Expect::Invalid("524288 requests chosen from 3 candidates"),
        ),
        (
            "hostile-self-migration",
            Call::Plan,
            Expect::Invalid("paired with itself"),
        ),
        (
            "hostile-nonsense",
            Call::Assign,
            Expect::Invalid("headroom of 4294967295 blocks"),
        ),
        (
            "hostile-nonsense",
            Call::Decide,
            Expect::Invalid("scale up by 4294967295"),
        ),
    ]);
    cases
}

/// Demotion off: these tests look at single calls.
fn containment_config() -> RuntimeConfig {
    RuntimeConfig {
        call_deadline: Duration::from_millis(300),
        max_consecutive_failures: u32::MAX,
        max_failures_in_window: 0,
        ..RuntimeConfig::default()
    }
}

// ------------------------------------------------------- containment

/// Every hostile call is classified as the right failure, answered by the
/// fallback (the builtin, or the last good Wasm version when there is one)
/// with exactly what native llumnix answers, within the deadline plus a
/// generous margin; the slot goes on serving.
#[test]
fn every_adversary_is_contained_in_every_kind() {
    let mut report = Vec::new();
    for with_last_good in [false, true] {
        for (component, call, expect) in cases() {
            let ctx = format!("{component} {call:?} (last good: {with_last_good})");
            // A fresh runtime per case: the hostile version's instance is
            // new, so its first decision is the honest one.
            let rt = PolicyRuntime::new(containment_config(), "llumnix").unwrap();
            let fleet = four_instance_fleet(&rt);
            let hostile = compiled(&rt, component);
            let llumnix = compiled(&rt, "llumnix");
            let kind = call.kind();
            if with_last_good {
                rt.swap(kind, llumnix.clone()).unwrap();
            }
            rt.swap(kind, hostile.clone())
                .unwrap_or_else(|e| panic!("{ctx}: the trial call must pass: {e}"));
            let honest = call.ask(&rt, 1);
            assert_eq!(honest.failure, None, "{ctx}: {honest:?}");
            assert!(
                matches!(&honest.source, DecisionSource::Active { name, .. } if &**name == component),
                "{ctx}: {honest:?}"
            );
            // The second decision is hostile, and contained.
            let started = Instant::now();
            let d = call.ask(&rt, 2);
            let elapsed = started.elapsed();
            let failure = d
                .failure
                .as_ref()
                .unwrap_or_else(|| panic!("{ctx}: no failure: {d:?}"));
            assert!(
                expect.matches(failure),
                "{ctx}: expected {expect:?}, got {failure:?}"
            );
            let expected_source = if with_last_good {
                DecisionSource::LastGood {
                    name: "llumnix".into(),
                    sha256: llumnix.sha256.clone(),
                }
            } else {
                DecisionSource::Builtin {
                    name: "llumnix".into(),
                }
            };
            assert_eq!(d.source, expected_source, "{ctx}");
            assert_eq!(
                d.value,
                call.native(&fleet, 2),
                "{ctx}: the fallback answers"
            );
            assert!(
                elapsed < Duration::from_secs(5),
                "{ctx}: contained in {elapsed:?}"
            );
            if component == "hostile-recursion" {
                assert!(
                    failure.to_string().contains("call stack exhausted"),
                    "{ctx}: {failure}"
                );
            }
            // (A trap's message ends with its cause, after the backtrace.)
            let what = failure.to_string();
            let what = what.find("wasm trap:").map_or(&*what, |i| &what[i..]);
            report.push(format!("{ctx}: {what} in {elapsed:.1?}"));
            // Serving goes on: the next call is answered (a poisoned
            // instance is replaced by a fresh one, honest again).
            let next = call.ask(&rt, 3);
            assert_eq!(next.value, call.native(&fleet, 3), "{ctx}: {next:?}");
            // Counted against the hostile version under the right reason.
            let status = rt.status(kind);
            let stats = &status.stats[&hostile.label];
            let counted = match expect {
                Expect::Timeout => stats.timeouts,
                Expect::MemoryLimit => stats.memory_limits,
                Expect::Trap => stats.traps,
                Expect::Invalid(_) => stats.invalid_answers,
            };
            // A poisoned instance is replaced (its successor's first answer
            // is honest); a merely wrong one keeps answering wrongly.
            let failed_calls = if matches!(expect, Expect::Invalid(_)) {
                2
            } else {
                1
            };
            assert_eq!(
                (counted, stats.failures()),
                (failed_calls, failed_calls),
                "{ctx}: {stats:?}"
            );
            // Every decision is timed, the contained one included.
            let latency = &status.decision_latency;
            assert_eq!(latency.count, 3, "{ctx}: {latency:?}");
            assert!(
                latency.max_ns >= elapsed.as_nanos() as u64 / 2,
                "{ctx}: {latency:?}"
            );
            if matches!(expect, Expect::Timeout) {
                // (The epoch moves in 1 ms ticks: give or take two.)
                assert!(
                    latency.max_ns >= 298_000_000,
                    "{ctx}: a timed-out decision lasts the deadline: {latency:?}"
                );
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// `hostile-leak` keeps 4 MiB per decision and answers honestly until its
/// memory reaches the cap: that call fails as a memory-limit failure, and the
/// next is served by a fresh instance. Demotion never triggers (one failure
/// in several calls).
#[test]
fn memory_growth_across_calls_hits_the_cap_and_a_fresh_instance_serves() {
    let rt = PolicyRuntime::new(RuntimeConfig::default(), "llumnix").unwrap();
    let mut fleet = four_instance_fleet(&rt);
    let leak = compiled(&rt, "hostile-leak");
    rt.swap(PolicyKind::Dispatch, leak.clone()).unwrap();
    let mut good_before_cap = 0;
    let mut failures = 0;
    for id in 0..40u64 {
        let d = rt.dispatch(&request(id));
        assert_eq!(d.value, Llumnix::default().dispatch(&fleet, &request(id)));
        // The runtime counts each dispatched request at its instance.
        if let Some(load) = d.value.and_then(|i| fleet.get(i).copied()) {
            fleet.upsert([load.with_dispatched(request(id).prompt_tokens)]);
        }
        match d.failure {
            None => {
                if failures == 0 {
                    good_before_cap += 1;
                }
            }
            Some(CallFailure::MemoryLimit) => failures += 1,
            Some(other) => panic!("call {id}: {other:?}"),
        }
    }
    // 32 MiB cap, 4 MiB a call: a handful of calls, then the cap.
    assert!((3..=8).contains(&good_before_cap), "{good_before_cap}");
    assert!(failures >= 4, "{failures}");
    assert_eq!(
        rt.active(PolicyKind::Dispatch).unwrap().sha256,
        leak.sha256,
        "not demoted"
    );
    assert_eq!(rt.status(PolicyKind::Dispatch).demotions, 0);
}

/// `hostile-slow` burns milliseconds per decision, far under the production
/// deadline (50 ms): every answer is accepted from the active version.
#[test]
fn slow_answers_within_the_deadline_are_accepted() {
    let rt = PolicyRuntime::new(RuntimeConfig::default(), "llumnix").unwrap();
    let fleet = four_instance_fleet(&rt);
    let slow = compiled(&rt, "hostile-slow");
    for kind in PolicyKind::ALL {
        rt.swap(kind, slow.clone()).unwrap();
    }
    let mut times = Vec::new();
    for (i, call) in Call::ALL.into_iter().cycle().take(20).enumerate() {
        let started = Instant::now();
        let d = call.ask(&rt, i as u64);
        times.push(started.elapsed());
        assert_eq!(d.failure, None, "{call:?}: {d:?}");
        assert!(matches!(d.source, DecisionSource::Active { .. }), "{d:?}");
        assert_eq!(d.value, call.native(&fleet, i as u64), "{call:?}");
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "hostile-slow: median decision {median:?}, slowest {:?}",
        times.last().unwrap()
    );
    assert!(
        median >= Duration::from_micros(500),
        "the busy work is real: {median:?}"
    );
    assert!(
        median < RuntimeConfig::default().call_deadline,
        "{median:?}"
    );
    for kind in PolicyKind::ALL {
        let status = rt.status(kind);
        let failures: u64 = status.stats.values().map(|s| s.failures()).sum();
        assert_eq!(failures, 0, "{kind}: {status:?}");
    }
}

/// A component that fails its very first call is refused at swap time: the
/// trial is containment too, and the slot does not change.
#[test]
fn a_policy_failing_its_trial_is_refused_and_nothing_changes() {
    let rt = PolicyRuntime::new(RuntimeConfig::default(), "llumnix").unwrap();
    four_instance_fleet(&rt);
    let blatant = compiled(&rt, "hostile-blatant");
    for kind in PolicyKind::ALL {
        let err = rt.swap(kind, blatant.clone()).unwrap_err();
        assert!(
            matches!(&err, PolicyError::Trial { kind: k, failure: CallFailure::Trap(_) } if *k == kind),
            "{kind}: {err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("trial {kind} call failed")),
            "{err}"
        );
        assert!(rt.active(kind).is_none());
    }
}

// ------------------------------------------------------- sandbox

/// A component importing WASI (clocks, filesystem, sockets) is refused when
/// compiled (i.e. at install), naming every import; so is a core module
/// built against WASI preview 1 (as `wasm32-wasip1`'s std is).
#[test]
fn policies_importing_wasi_are_refused() {
    let rt = PolicyRuntime::new(RuntimeConfig::default(), "llumnix").unwrap();
    let err = rt
        .compile(&common::component_bytes("wasi-reader"))
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, PolicyError::Sandbox { .. }), "{message}");
    for part in [
        "wasi:clocks/wall-clock@0.2.0",
        "wasi:filesystem/preopens@0.2.0",
        "wasi:sockets/instance-network@0.2.0",
        "policies cannot read files, the network or the clock",
    ] {
        assert!(message.contains(part), "{part:?} not in {message:?}");
    }

    // (module (import "wasi_snapshot_preview1" "clock_time_get"
    //   (func (param i32 i64 i32) (result i32))))
    let mut core = b"\0asm\x01\x00\x00\x00".to_vec();
    core.extend([0x01, 0x08, 0x01, 0x60, 0x03, 0x7f, 0x7e, 0x7f, 0x01, 0x7f]);
    let module = b"wasi_snapshot_preview1";
    let name = b"clock_time_get";
    let mut import = vec![0x01, module.len() as u8];
    import.extend(module);
    import.push(name.len() as u8);
    import.extend(name);
    import.extend([0x00, 0x00]);
    core.push(0x02);
    core.push(import.len() as u8);
    core.extend(import);
    let err = rt.compile(&core).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, PolicyError::Sandbox { .. })
            && message.contains("wasi_snapshot_preview1::clock_time_get")
            && message.contains("policies cannot read files, the network or the clock"),
        "{message}"
    );
}

// ------------------------------------------------------- demotion and back-off

/// The trigger-driven `hostile` guest (see policies/testing/hostile): this
/// prefix hash makes `dispatch` panic; any other answers like llumnix.
const PANIC: u64 = 0xBAD3;

fn backoff_config(clock: &ManualClock) -> RuntimeConfig {
    RuntimeConfig {
        max_consecutive_failures: 3,
        retry_backoff: Duration::from_secs(1),
        max_retry_backoff: Duration::from_secs(8),
        probation_calls: 3,
        clock: clock.clock(),
        ..RuntimeConfig::default()
    }
}

fn panicking(id: u64) -> RequestMeta {
    RequestMeta {
        prefix_hash: PANIC,
        ..request(id)
    }
}

fn source_name<T>(d: &Decision<T>) -> String {
    match &d.source {
        DecisionSource::Active { name, .. } => format!("active:{name}"),
        DecisionSource::LastGood { name, .. } => format!("last-good:{name}"),
        DecisionSource::Builtin { name } => format!("builtin:{name}"),
    }
}

/// Demotion, then a retry on probation only once the back-off has passed,
/// a failure on probation demoting again with twice the back-off (1 s, 2 s,
/// 4 s, 8 s, capped at 8 s), a passed probation resetting it, and the
/// counters in the slot's status. All on a manual clock.
#[test]
fn demotion_retry_after_backoff_and_doubling_on_a_manual_clock() {
    let clock = ManualClock::new();
    let rt = PolicyRuntime::new(backoff_config(&clock), "llumnix").unwrap();
    four_instance_fleet(&rt);
    let llumnix = compiled(&rt, "llumnix");
    let hostile = compiled(&rt, "hostile");
    rt.swap(PolicyKind::Dispatch, llumnix.clone()).unwrap();
    rt.swap(PolicyKind::Dispatch, hostile.clone()).unwrap();
    let mut id = 0;
    let mut next = || {
        id += 1;
        id
    };
    let active = |rt: &PolicyRuntime| rt.active(PolicyKind::Dispatch).unwrap().name.to_string();

    // Three failures in a row: demoted, llumnix (the last good) takes over.
    for _ in 0..3 {
        let d = rt.dispatch(&panicking(next()));
        assert!(matches!(d.failure, Some(CallFailure::Trap(_))), "{d:?}");
        assert_eq!(source_name(&d), "last-good:llumnix");
    }
    assert_eq!(active(&rt), "llumnix");
    let status = rt.status(PolicyKind::Dispatch);
    assert_eq!((status.demotions, status.retries), (1, 0));
    let pending = status.pending_retry.expect("hostile waits for its retry");
    assert_eq!(pending.version.sha256, hostile.sha256);
    assert_eq!((pending.backoff_ms, pending.retry_in_ms), (1000, 1000));

    let mut expected_backoff = 1000u64;
    let mut demotions = 1;
    for round in 0..5 {
        // Not before the back-off has passed.
        clock.advance(Duration::from_millis(expected_backoff - 1));
        let d = rt.dispatch(&panicking(next()));
        assert_eq!(
            (source_name(&d), d.failure),
            ("active:llumnix".into(), None),
            "round {round}"
        );
        assert_eq!(
            rt.status(PolicyKind::Dispatch)
                .pending_retry
                .unwrap()
                .retry_in_ms,
            1
        );
        // Then retried on probation, failing at once: demoted again,
        // answered by llumnix, the back-off doubled up to the cap.
        clock.advance(Duration::from_millis(1));
        let d = rt.dispatch(&panicking(next()));
        assert!(
            matches!(d.failure, Some(CallFailure::Trap(_))),
            "round {round}: {d:?}"
        );
        assert_eq!(source_name(&d), "last-good:llumnix", "round {round}");
        demotions += 1;
        expected_backoff = (expected_backoff * 2).min(8000);
        let status = rt.status(PolicyKind::Dispatch);
        assert_eq!(active(&rt), "llumnix", "round {round}");
        assert_eq!((status.demotions, status.retries), (demotions, round + 1));
        assert!(status.probation.is_none());
        let pending = status.pending_retry.unwrap();
        assert_eq!(
            (pending.backoff_ms, pending.retry_in_ms),
            (expected_backoff, expected_backoff),
            "round {round}"
        );
    }
    assert_eq!(expected_backoff, 8000, "capped");

    // A retry that behaves: probation (3 good calls) ends, back-off forgotten.
    clock.advance(Duration::from_millis(expected_backoff));
    for good in 1..=3 {
        let d = rt.dispatch(&request(next()));
        assert_eq!(
            (source_name(&d), d.failure),
            ("active:hostile".into(), None)
        );
        let probation = rt.status(PolicyKind::Dispatch).probation;
        if good < 3 {
            let p = probation.expect("still on probation");
            assert_eq!((p.good_calls, p.needed, p.backoff_ms), (good, 3, 8000));
        } else {
            assert!(probation.is_none(), "probation passed");
        }
    }
    let status = rt.status(PolicyKind::Dispatch);
    assert_eq!((status.demotions, status.retries), (6, 6));
    assert_eq!(
        status.previous.last().map(|v| v.sha256.clone()),
        Some(llumnix.sha256.clone()),
        "llumnix is the last good version again"
    );
    // Off probation, one failure is just a failure; three in a row demote
    // with the back-off back at its start.
    let d = rt.dispatch(&panicking(next()));
    assert_eq!(source_name(&d), "last-good:llumnix");
    assert_eq!(active(&rt), "hostile");
    for _ in 0..2 {
        rt.dispatch(&panicking(next()));
    }
    assert_eq!(active(&rt), "llumnix");
    let status = rt.status(PolicyKind::Dispatch);
    assert_eq!(status.demotions, 7);
    assert_eq!(status.pending_retry.unwrap().backoff_ms, 1000);
    let stats = &status.stats[&hostile.label];
    assert_eq!(
        (stats.demotions, stats.retries, stats.traps),
        (7, 6, 3 + 5 + 3)
    );
    assert_eq!(status.stats[&llumnix.label].demotions, 0);
}

/// An admin swap or rollback cancels a pending retry: the admin's choice
/// stands however much time passes.
#[test]
fn admin_swap_and_rollback_cancel_a_pending_retry() {
    for by_rollback in [false, true] {
        let clock = ManualClock::new();
        let rt = PolicyRuntime::new(backoff_config(&clock), "llumnix").unwrap();
        four_instance_fleet(&rt);
        let llumnix = compiled(&rt, "llumnix");
        let round_robin = compiled(&rt, "round-robin");
        let hostile = compiled(&rt, "hostile");
        rt.swap(PolicyKind::Dispatch, round_robin.clone()).unwrap();
        rt.swap(PolicyKind::Dispatch, llumnix.clone()).unwrap();
        rt.swap(PolicyKind::Dispatch, hostile.clone()).unwrap();
        for i in 0..3 {
            rt.dispatch(&panicking(i));
        }
        assert!(rt.status(PolicyKind::Dispatch).pending_retry.is_some());
        let expected = if by_rollback {
            // llumnix is active (hostile demoted); roll back to round-robin.
            rt.rollback(PolicyKind::Dispatch).unwrap();
            "round-robin"
        } else {
            rt.swap(PolicyKind::Dispatch, round_robin.clone()).unwrap();
            "round-robin"
        };
        let status = rt.status(PolicyKind::Dispatch);
        assert!(status.pending_retry.is_none(), "{status:?}");
        clock.advance(Duration::from_secs(3600));
        for i in 10..20 {
            let d = rt.dispatch(&panicking(i));
            assert_eq!(d.failure, None);
            assert_eq!(source_name(&d), format!("active:{expected}"));
        }
        assert_eq!(rt.status(PolicyKind::Dispatch).retries, 0);
    }
}

/// With a zero back-off a demoted version is never retried.
#[test]
fn zero_backoff_never_retries() {
    let clock = ManualClock::new();
    let rt = PolicyRuntime::new(
        RuntimeConfig {
            retry_backoff: Duration::ZERO,
            ..backoff_config(&clock)
        },
        "llumnix",
    )
    .unwrap();
    four_instance_fleet(&rt);
    rt.swap(PolicyKind::Dispatch, compiled(&rt, "hostile"))
        .unwrap();
    for i in 0..3 {
        let d = rt.dispatch(&panicking(i));
        assert_eq!(source_name(&d), "builtin:llumnix");
    }
    assert!(
        rt.active(PolicyKind::Dispatch).is_none(),
        "demoted to the builtin"
    );
    let status = rt.status(PolicyKind::Dispatch);
    assert_eq!(status.demotions, 1);
    assert!(status.pending_retry.is_none());
    clock.advance(Duration::from_secs(3600));
    rt.dispatch(&panicking(9));
    assert!(rt.active(PolicyKind::Dispatch).is_none());
}

/// A policy failing every other call never fails three times in a row, but
/// 8 failures among its last 16 calls demote it.
#[test]
fn alternating_failures_are_demoted_by_the_failure_window() {
    let clock = ManualClock::new();
    let rt = PolicyRuntime::new(backoff_config(&clock), "llumnix").unwrap();
    four_instance_fleet(&rt);
    let hostile = compiled(&rt, "hostile");
    rt.swap(PolicyKind::Dispatch, hostile.clone()).unwrap();
    for call in 0..15u64 {
        let r = if call % 2 == 0 {
            panicking(call)
        } else {
            request(call)
        };
        rt.dispatch(&r);
        let demoted = rt.active(PolicyKind::Dispatch).is_none();
        // Failures at calls 0, 2, …, 14: the 8th is call 14.
        assert_eq!(demoted, call == 14, "after call {call}");
    }
    assert_eq!(rt.status(PolicyKind::Dispatch).demotions, 1);
    assert_eq!(
        rt.status(PolicyKind::Dispatch).stats[&hostile.label].traps,
        8
    );
}
