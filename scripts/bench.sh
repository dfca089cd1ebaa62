#!/usr/bin/env bash
# The micro benchmarks on a release build: policy-overhead (Wasm vs native
# decision cost), dispatch (decisions per second through the global
# scheduler), quic-overhead (request round trip vs a bare quinn echo),
# migration (live-migration downtime vs context length, QUIC vs TCP) and
# engine (decode/prefill tokens per second). Extra arguments go to each.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

LLUMEN_PROFILE=release scripts/build-policies.sh
scripts/fetch-smollm2.sh >/dev/null
cargo build --locked --release -p llumen-bench
for bench in policy-overhead dispatch quic-overhead migration engine; do
    ./target/release/llumen-bench "$bench" "$@"
done
