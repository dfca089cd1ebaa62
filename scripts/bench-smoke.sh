#!/usr/bin/env bash
# Runs every `llumen-bench` subcommand once in a short mode, so that none can
# rot: each must exit 0 and print one JSON document on stdout (`--json`).
# Dev profile (the one scripts/test.sh uses, which calls this last), so
# nothing is built twice; about a minute on 2 cores once built.
#
# Needs the policy components (scripts/build-policies.sh; LLUMEN_POLICY_DIR
# may point elsewhere). Everything a run writes goes under
# target/bench-smoke/<subcommand>/ (stdout.json, stderr.log, out/), each run
# started in its own directory there, so nothing lands in the repository.
# Fails naming each subcommand that failed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

target_dir="${CARGO_TARGET_DIR:-$root/target}"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
policy_dir="${LLUMEN_POLICY_DIR:-$root/target/policies}"
case "$policy_dir" in /*) ;; *) policy_dir="$root/$policy_dir" ;; esac
export LLUMEN_POLICY_DIR="$policy_dir"
if [ ! -f "$policy_dir/llumnix.wasm" ]; then
    scripts/build-policies.sh
fi

# `live` and `fidelity` spawn the `llumen` next to the bench binary.
cargo build --locked -p llumen-bench -p llumen-host --bins
bench="$target_dir/debug/llumen-bench"

smoke="$target_dir/bench-smoke"
rm -rf "$smoke"
mkdir -p "$smoke"

# Per run: a limit well above its time here (a hung server must not hang CI).
limit_s=240
failed=()
summary=()

# smoke NAME ARGS...: `llumen-bench ARGS... --json`, in target/bench-smoke/NAME;
# the literal @OUT@ in ARGS becomes that run's output directory.
smoke() {
    local name=$1
    shift
    local dir="$smoke/$name"
    mkdir -p "$dir"
    local args=("${@//@OUT@/$dir/out}")
    printf 'bench-smoke: llumen-bench %s --json\n' "${args[*]}" >&2
    local start end secs rc=0
    start=$(date +%s.%N)
    (cd "$dir" && timeout --kill-after=10 "$limit_s" "$bench" "${args[@]}" --json \
        >"$dir/stdout.json" 2>"$dir/stderr.log") || rc=$?
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    local why=""
    if [ "$rc" -ne 0 ]; then
        why="exit status $rc"
        if [ "$rc" -eq 124 ]; then why="timed out after ${limit_s} s"; fi
        if [ "$rc" -eq 137 ]; then why="killed (SIGKILL: out of time after ${limit_s} s, or of memory)"; fi
    elif ! python3 -c 'import json, sys; json.load(sys.stdin)' <"$dir/stdout.json" 2>"$dir/json-error.log"; then
        why="stdout is not one JSON document ($(tail -n 1 "$dir/json-error.log"))"
    fi
    if [ -n "$why" ]; then
        printf 'bench-smoke: FAILED: %s (%s, %s s); the end of its stderr (%s):\n' \
            "$name" "$why" "$secs" "$dir/stderr.log" >&2
        # Without the backtrace frames (RUST_BACKTRACE may be set).
        grep -v -E '^ *[0-9]+: |^ +at |^Stack backtrace:' "$dir/stderr.log" | tail -n 30 >&2 || true
        failed+=("$name")
        summary+=("$(printf '%-16s %7s s  FAILED (%s)' "$name" "$secs" "$why")")
    else
        rm -f "$dir/json-error.log"
        summary+=("$(printf '%-16s %7s s  ok' "$name" "$secs")")
    fi
}

total_start=$(date +%s.%N)
smoke policy-overhead policy-overhead --instances 16,64 --iterations 1000
smoke dispatch dispatch --instances 16,64 --decisions 2000 --all-slots
smoke quic-overhead quic-overhead --requests 50 --warmup 10
smoke engine engine --models tiny --batches 1,4 --decode-steps 2 --context-tokens 16 --prefill-tokens 16
smoke migration migration --models tiny --lengths 256,512 --repeats 1 --others 1 --before-steps 1 \
    --transfer-mib 8 --message-mib 1
smoke live live --instances 2 --requests 40 --repeats 1 --warmup 2 \
    --workload 'poisson:rate=20;prompt=exp:32;output=exp:32' --out @OUT@
smoke compare compare --quick --profiles derived --requests 100 --calibration-requests 100 --out @OUT@
smoke sim sim --instances 2 --requests 200 --policy llumnix,infaas,round-robin \
    --workload 'poisson;zipf:256:256;rate=25' --out @OUT@
smoke fidelity fidelity --requests 40 --workload 'poisson:rate=20;prompt=zipf:128;output=zipf:64' \
    --instances 2 --blocks 64 --out @OUT@
total=$(awk -v a="$total_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

printf 'bench-smoke: %s\n' "${summary[@]}" >&2
printf 'bench-smoke: %s s in all; outputs under %s\n' "$total" "$smoke" >&2
if [ "${#failed[@]}" -gt 0 ]; then
    printf 'bench-smoke: FAILED: %s\n' "${failed[*]}" >&2
    exit 1
fi
