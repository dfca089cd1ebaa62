//! Every latency profile shipped in `engine/profiles/` loads and validates,
//! and says whether it was measured or derived.

use llumen_engine::latency_model::ProfileKind;
use llumen_engine::LatencyProfile;

#[test]
fn every_shipped_profile_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut loaded = 0;
    for entry in std::fs::read_dir(&dir).expect("engine/profiles") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let profile = LatencyProfile::from_path(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let kind = profile.provenance().kind;
            assert!(matches!(kind, ProfileKind::Measured | ProfileKind::Derived));
            // A decode step never gets cheaper with a bigger batch.
            assert!(
                profile.step_time_us(0, 16, 16 * 256) >= profile.step_time_us(0, 1, 256),
                "{}",
                path.display()
            );
            loaded += 1;
        }
    }
    assert!(
        loaded >= 2,
        "expected the derived LLaMA-7B/A10 and the measured SmolLM2 profiles in {}",
        dir.display()
    );
}
