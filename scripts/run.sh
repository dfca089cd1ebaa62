#!/usr/bin/env bash
# Sets up and runs llumen's main job on a fresh machine.
#
# Until `llumen serve` lands, the main job is the policy stack itself: build
# the policy components, show what each one is, and measure what a Wasm
# scheduling decision costs against native code (release build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

LLUMEN_PROFILE=release scripts/build-policies.sh
./target/release/llumen policy inspect target/policies/*.wasm
./target/release/llumen-bench policy-overhead "$@"
