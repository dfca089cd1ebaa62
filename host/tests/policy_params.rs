//! Policy parameters through the WIT (`llumen:policy/params`, 0.1.1): a
//! component is configured at load, its decisions follow the parameters and
//! agree with the native builtin configured the same way, bad parameters
//! are refused with the name, and a 0.1.0 component (no `params`) still
//! loads but takes none.
//!
//! Needs the components built by `scripts/build-policies.sh`.

mod common;

use std::sync::Arc;

use llumen_fleet::synthetic;
use llumen_host::policy::{
    CompiledPolicy, DecisionSource, PolicyError, PolicyKind, PolicyRuntime, RuntimeConfig,
};
use llumen_policy_logic::{self as logic, MigrationCandidate, MigrationPair, Param, Policy};

fn runtime() -> PolicyRuntime {
    let config = RuntimeConfig {
        call_deadline: std::time::Duration::from_secs(1),
        ..RuntimeConfig::default()
    };
    PolicyRuntime::new(config, "llumnix").expect("runtime")
}

fn compiled(rt: &PolicyRuntime, name: &str) -> Arc<CompiledPolicy> {
    rt.compile(&common::component_bytes(name))
        .unwrap_or_else(|e| panic!("compiling {name}: {e}"))
}

fn params(list: &[(&str, &str)]) -> Vec<Param> {
    list.iter().map(|(k, v)| Param::new(*k, *v)).collect()
}

#[test]
fn describe_lists_the_native_parameters() {
    let rt = runtime();
    let llumnix = compiled(&rt, "llumnix");
    let specs = rt.describe(&llumnix).unwrap();
    assert_eq!(specs, logic::Llumnix::default().param_specs());
    assert!(specs
        .iter()
        .any(|s| s.name == "select" && s.default_value == "lcfs"));
    // Round-robin takes none; a 0.1.0 component has no `params` at all.
    assert!(rt
        .describe(&compiled(&rt, "round-robin"))
        .unwrap()
        .is_empty());
    assert!(rt
        .describe(&compiled(&rt, "dispatch-only"))
        .unwrap()
        .is_empty());
}

#[test]
fn configured_versions_are_labelled_and_refusals_name_the_parameter() {
    let rt = runtime();
    let llumnix = compiled(&rt, "llumnix");
    let same = rt.configure(&llumnix, &[]).unwrap();
    assert!(
        Arc::ptr_eq(&same, &llumnix),
        "no parameters: the same version"
    );
    let sjf = rt
        .configure(
            &llumnix,
            &params(&[("select", "sjf"), ("migrate-out-below", "10")]),
        )
        .unwrap();
    assert!(
        sjf.label.ends_with("[select=sjf,migrate-out-below=10]"),
        "{}",
        sjf.label
    );
    assert_eq!(sjf.sha256, llumnix.sha256, "one component, two versions");

    let refused = |policy: &Arc<CompiledPolicy>, list: &[(&str, &str)]| -> String {
        match rt.configure(policy, &params(list)) {
            Err(e @ PolicyError::Params { .. }) => e.to_string(),
            other => panic!("expected a parameter refusal, got {other:?}"),
        }
    };
    let e = refused(&llumnix, &[("select", "fifo")]);
    assert!(
        e.contains("\"select\"") && e.contains("lcfs, sjf, ljf"),
        "{e}"
    );
    let e = refused(&llumnix, &[("no-such", "1")]);
    assert!(e.contains("unknown parameter"), "{e}");
    let e = refused(&llumnix, &[("select", "sjf"), ("select", "ljf")]);
    assert!(e.contains("given twice"), "{e}");
    let e = refused(&compiled(&rt, "round-robin"), &[("select", "sjf")]);
    assert!(e.contains("takes no parameters"), "{e}");
    let e = refused(&compiled(&rt, "dispatch-only"), &[("a", "1")]);
    assert!(e.contains("does not export llumen:policy/params"), "{e}");

    // The builtin behind every slot can be configured for builtin-only runs,
    // all or nothing.
    assert!(rt.configure_builtin(&params(&[("select", "ljf")])).is_ok());
    assert!(rt.configure_builtin(&params(&[("select", "x")])).is_err());
}

/// The configured component and the native builtin with the same parameters
/// make the same decisions over seeded random fleets; with other parameters
/// the decisions differ somewhere.
#[test]
fn configured_component_agrees_with_configured_builtin() {
    let rt = runtime();
    let llumnix = compiled(&rt, "llumnix");
    let variants: [&[(&str, &str)]; 4] = [
        &[("select", "sjf"), ("fit-check", "off")],
        &[("select", "ljf"), ("migration-load", "head-of-line")],
        &[("priority-reserve", "headroom:128"), ("deficit", "divide")],
        &[
            ("migrate-out-below", "10"),
            ("migrate-in-above", "10"),
            ("drain-pick", "emptiest"),
        ],
    ];
    for variant in variants {
        let list = params(variant);
        let policy = rt.configure(&llumnix, &list).unwrap();
        for kind in PolicyKind::ALL {
            rt.swap(kind, policy.clone()).unwrap();
        }
        let mut native = logic::configured("llumnix", &list).unwrap().unwrap();
        let mut rng = llumen_engine::SplitMix64::new(0x9a7a ^ variant.len() as u64);
        for round in 0..60u64 {
            let loads: Vec<_> = (0..8)
                .map(|i| synthetic::load(&mut rng, i, round))
                .collect();
            for l in &loads {
                rt.observe(*l);
            }
            let mut fleet = logic::Fleet::new();
            fleet.reset(loads.iter().copied());
            let request = synthetic::request(&mut rng, round);
            let d = rt.dispatch(&request);
            assert!(
                matches!(d.source, DecisionSource::Active { .. }),
                "{variant:?}: {:?}",
                d.failure
            );
            assert_eq!(
                d.value,
                native.dispatch(&fleet, &request),
                "{variant:?} round {round}"
            );
            // The runtime counts its own dispatch until the next snapshot.
            if let Some(load) = d.value.and_then(|i| fleet.get(i).copied()) {
                fleet.upsert([load.with_dispatched(request.prompt_tokens)]);
            }
            let plan = rt.plan_migration();
            assert_eq!(
                plan.value,
                native.plan_migration(&fleet),
                "{variant:?} round {round}"
            );
            let pair = MigrationPair {
                source: 0,
                destination: 1,
            };
            let candidates: Vec<MigrationCandidate> = synthetic::candidates(&mut rng, 6);
            let chosen = rt.choose_migrations(pair, &candidates);
            assert_eq!(
                chosen.value,
                native.choose_migrations(&fleet, pair, &candidates),
                "{variant:?} round {round}"
            );
            assert_eq!(rt.decide_scaling().value, native.decide_scaling(&fleet));
            assert_eq!(
                rt.assign_priority(&request).value,
                native.assign_priority(&fleet, &request)
            );
        }
    }
}
