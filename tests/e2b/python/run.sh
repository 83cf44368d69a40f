#!/usr/bin/env bash
# Runs the E2B Python SDK end-to-end tests against a real `conductor serve`.
#
#   tests/e2b/python/run.sh [pytest args...]
#
# Creates a venv at ${E2B_PY_VENV:-tests/e2b/python/.venv} when missing, installs
# requirements.txt into it (quietly) and runs pytest on this directory. The server
# binary is $CONDUCTOR_BIN or target/debug/conductor (build it first with
# `cargo build --bin conductor`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
venv="${E2B_PY_VENV:-$here/.venv}"
case "$venv" in /*) ;; *) venv="$repo/$venv" ;; esac

if [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian ships venv/ensurepip separately.
        rm -rf "$venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get install -y -qq python3-venv >/dev/null \
                || { apt-get update -qq >/dev/null && apt-get install -y -qq python3-venv >/dev/null; }
        fi
        python3 -m venv "$venv"
    fi
fi
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi

cd "$repo"
exec "$venv/bin/python" -m pytest "$here" -p no:cacheprovider "$@"
