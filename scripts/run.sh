#!/usr/bin/env bash
# Sets up and runs llumen's main job on a fresh machine (release build).
#
# Until `llumen serve` lands, the main job is what exists of the serving
# path: build the policy components and show what each one is, measure what
# a Wasm scheduling decision costs against native code, then fetch
# SmolLM2-135M-Instruct and answer a question through one engine instance.
# Extra arguments go to `llumen-bench policy-overhead`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

LLUMEN_PROFILE=release scripts/build-policies.sh
cargo build --locked --release -p llumen-bench -p llumen-engine --bins --example generate
./target/release/llumen policy inspect target/policies/*.wasm
./target/release/llumen-bench policy-overhead "$@"
scripts/fetch-smollm2.sh >/dev/null
./target/release/examples/generate "What is the capital of France?"
