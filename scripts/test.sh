#!/usr/bin/env bash
# Sets up everything the tests need on a fresh machine (the Wasm guest
# toolchain and the policy components) and runs every test. One cargo profile
# (dev) throughout, so nothing is built twice.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# One test build takes about 3 GB under target/ (debug line tables only; see
# Cargo.toml's dev profile). Say how much room there is, for a failed link's sake.
echo "test.sh: $(df -Ph "$root" | awk 'NR==2 {print $4}') free on the disk of $root"

scripts/build-policies.sh
# The real model (98 MB through pip): its tests run only when it is present.
scripts/fetch-smollm2.sh >/dev/null
# The real Python `openai` client, for the HTTP end-to-end test (a venv under
# target/, through pip).
LLUMEN_OPENAI_PYTHON=$(scripts/setup-python-openai.sh | tail -n 1)
export LLUMEN_OPENAI_PYTHON
# The shared policy logic belongs to the guest workspace; test it natively there.
cargo test --locked --manifest-path policies/logic/Cargo.toml
cargo test --locked --workspace
# Every llumen-bench subcommand once, in a short mode (same dev build).
scripts/bench-smoke.sh
