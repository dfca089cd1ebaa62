#!/usr/bin/env bash
# Sets up and runs llumen's main job on a fresh machine: `llumen serve` with
# its embedded defaults (release build).
#
# Builds the policy components (the Wasm guest toolchain is installed when
# missing), fetches SmolLM2-135M-Instruct (through pip), builds `llumen`, then
# serves: a manager with 2 in-process SmolLM2 instances, QUIC on
# 127.0.0.1:7878 (clients, admin, joining instances), the OpenAI API and
# Prometheus metrics on http://127.0.0.1:8080, sled and the certificate and
# admin token under ~/.local/share/llumen, llumnix for every policy kind.
# It runs until Ctrl-C (or SIGTERM). Extra arguments go to `llumen serve`
# (see `llumen serve --help`). Try, from another shell:
#
#   target/release/llumen generate "What is the capital of France?"
#   target/release/llumen status
#   curl -s localhost:8080/v1/completions -H 'content-type: application/json' \
#        -d '{"model":"x","prompt":"The capital of France is","max_tokens":8,"temperature":0}'
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

LLUMEN_PROFILE=release scripts/build-policies.sh
scripts/fetch-smollm2.sh >/dev/null
cargo build --locked --release -p llumen-host --bin llumen
exec ./target/release/llumen serve --policy-dir target/policies "$@"
