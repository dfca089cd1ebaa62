//! The CI slice of the fuzzer: every target for a few thousand inputs (the
//! dedicated run is `cargo run --release -p llumen-fuzz -- --executions N`).

use llumen_fuzz::{run, Target};

/// Inputs per target in CI (debug build).
const EXECUTIONS: u64 = 100_000;

#[test]
fn every_target_holds_its_invariants() {
    for target in Target::ALL {
        let counts = run(target, 0x5eed, 0..EXECUTIONS);
        assert_eq!(counts.executions, EXECUTIONS);
        // The generators reach both sides of every decoder.
        assert!(counts.pristine > EXECUTIONS / 8, "{target}: {counts:?}");
        assert!(counts.accepted > 0, "{target}: {counts:?}");
        assert!(counts.refused > 0, "{target}: {counts:?}");
    }
}

#[test]
fn a_run_is_a_function_of_its_seed() {
    for target in Target::ALL {
        assert_eq!(run(target, 7, 0..500), run(target, 7, 0..500));
        // Split ranges add up to the whole.
        let mut split = run(target, 7, 0..200);
        split.add(&run(target, 7, 200..500));
        assert_eq!(split, run(target, 7, 0..500));
    }
}
