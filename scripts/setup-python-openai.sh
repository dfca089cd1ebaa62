#!/usr/bin/env bash
# Creates a Python virtual environment with the official `openai` package
# (used by host/tests/openai_client.py to check llumen's OpenAI-compatible
# HTTP front end with a real client) and prints the path of its python on
# stdout (everything else goes to stderr).
#
# Idempotent: a venv already in place where `import openai` works is kept.
# Location: ${LLUMEN_PY_VENV:-<repo>/target/py-openai} (a relative
# LLUMEN_PY_VENV is taken relative to the current directory).
#
# Needs: python3 with the venv and ensurepip modules. On Debian/Ubuntu they
# come with the apt package python3-venv; when it is missing the script
# installs it if it runs as root or `sudo -n` works, else it stops with a
# message saying what to install.
#
# Usage:
#   py=$(scripts/setup-python-openai.sh)
#   LLUMEN_HTTP_BASE=http://127.0.0.1:8000/v1 "$py" host/tests/openai_client.py
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LLUMEN_PY_VENV:-$root/target/py-openai}
case $venv in
/*) ;;
*) venv=$PWD/$venv ;;
esac
py=$venv/bin/python

log() { echo "setup-python-openai: $*" >&2; }

if [[ -x $py ]] && "$py" -c 'import openai' >/dev/null 2>&1; then
    echo "$py"
    exit 0
fi

command -v python3 >/dev/null 2>&1 || {
    log "python3 is not installed"
    exit 1
}

has_venv() { python3 -c 'import venv, ensurepip' >/dev/null 2>&1; }

if ! has_venv; then
    ver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    if [[ $(id -u) -eq 0 ]]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
        sudo=(sudo -n)
    else
        log "python3 lacks the venv/ensurepip modules; install them with" \
            "'sudo apt-get install -y python3-venv' (or python$ver-venv) and run this again"
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "python3 lacks the venv/ensurepip modules and apt-get is not available;" \
            "install the venv module for python$ver and run this again"
        exit 1
    fi
    log "installing python3-venv with apt-get"
    apt_install() {
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "$@" >&2
    }
    if ! apt_install python3-venv; then
        "${sudo[@]}" apt-get update -q >&2 || true
        apt_install python3-venv || true
    fi
    # Some releases package ensurepip per minor version only.
    has_venv || apt_install "python$ver-venv" || true
    if ! has_venv; then
        log "python3 still lacks the venv/ensurepip modules after installing python3-venv;" \
            "install python$ver-venv by hand"
        exit 1
    fi
fi

# A half-made venv (interrupted run, moved python) is rebuilt from scratch.
if [[ -e $venv && ! -x $py ]]; then
    log "removing the incomplete venv at $venv"
    rm -rf "$venv"
fi
if [[ ! -x $py ]]; then
    log "creating the venv at $venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" >&2
fi

log "installing openai"
"$py" -m pip install --quiet --disable-pip-version-check openai >&2
"$py" -c 'import openai' || {
    log "openai was installed but cannot be imported"
    exit 1
}
echo "$py"
