#!/usr/bin/env bash
# Builds the policy guests under policies/ into WebAssembly components in
# target/policies/<name>.wasm (first-party policies and the test guests).
#
# Toolchain: a rustc that already has the wasm32-unknown-unknown standard
# library (e.g. after `rustup target add wasm32-unknown-unknown`) is used as
# is. Otherwise Debian's rustc-web / cargo-web / rust-web-src are installed
# (only the package registries are needed) and std is built for wasm with
# -Zbuild-std. Either way the core modules are then packed into components by
# `llumen policy pack`, so both routes give the same interface.
#
# Idempotent; a rebuild with nothing changed takes about a second.
# LLUMEN_PROFILE (dev or release, default dev) picks the host build used to pack.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=wasm32-unknown-unknown
core_dir="$root/policies/target/$target/release"
out_dir="${LLUMEN_POLICY_DIR:-$root/target/policies}"
guests=(llumnix round_robin infaas queue_length hostile dispatch_only wasi_reader)
# The adversary library (policies/testing/adversaries): one example target,
# hence one component, per misbehaviour.
adversaries=(spin memory leak recursion panic slow wrong_ids duplicates oversize self_migration nonsense blatant)
# Libraries (each guest's cdylib) and the adversaries' examples.
build_args=(--locked --release --target "$target" --workspace --lib --examples)

log() { printf 'build-policies: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

host_sysroot=$(rustc --print sysroot)
remap=(--remap-path-prefix="${CARGO_HOME:-$HOME/.cargo}=/cargo" --remap-path-prefix="$root=/llumen")

if [ -d "$host_sysroot/lib/rustlib/$target/lib" ]; then
    log "using the installed $target target of $(rustc --version)"
    (cd "$root/policies" && env -u RUSTC_BOOTSTRAP RUSTFLAGS="${remap[*]}" \
        cargo build "${build_args[@]}")
else
    debian_packages=(rustc-web cargo-web rust-web-src)
    missing=()
    for p in "${debian_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing Debian's ${missing[*]} (wasm backend and std source)"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # The wasm linker: rust-lld from the rustup toolchain, else Debian's lld.
    linker="$host_sysroot/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld"
    if [ ! -x "$linker" ]; then
        linker=$(command -v rust-lld || command -v wasm-ld || command -v wasm-ld-19 || true)
    fi
    if [ -z "$linker" ]; then
        log "installing Debian's lld-19 for wasm-ld"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lld-19 >/dev/null
        linker=/usr/bin/wasm-ld-19
    fi
    log "using Debian's $(/usr/bin/rustc --version) with -Zbuild-std (linker: $linker)"
    # /usr/bin/cargo by path: ~/.cargo/bin/cargo (rustup) shadows it on PATH.
    (cd "$root/policies" && env -u RUSTFLAGS -u RUSTUP_TOOLCHAIN -u CARGO_BUILD_TARGET \
        RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTFLAGS="${remap[*]}" \
        "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=$linker" \
        /usr/bin/cargo build "${build_args[@]}" -Zbuild-std=std,panic_abort)
fi

profile="${LLUMEN_PROFILE:-dev}"
modules=()
for g in "${guests[@]}"; do modules+=("$core_dir/$g.wasm"); done
for a in "${adversaries[@]}"; do modules+=("$core_dir/examples/hostile_$a.wasm"); done
log "packing ${#modules[@]} components into $out_dir"
# Same cargo profile as what runs next (tests: dev; main job: release), so
# the host is built once.
(cd "$root" && cargo run --quiet --locked --profile "$profile" -p llumen-host --bin llumen -- policy pack --out "$out_dir" "${modules[@]}")
