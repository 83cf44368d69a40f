#!/usr/bin/env bash
# Loads every object `conductor kube render` prints into the models of the official Python
# `kubernetes` client for the targeted API (1.34), and fails on any field those models do
# not know or any value they change (issue 17; the Rust side is tests/kube.rs).
#
#   tests/kube/run.sh
#
# Creates a venv at ${KUBE_PY_VENV:-tests/kube/.venv} when missing and installs
# requirements.txt into it. The binary is $CONDUCTOR_BIN or target/debug/conductor.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${KUBE_PY_VENV:-$here/.venv}"
case "$venv" in /*) ;; *) venv="$repo/$venv" ;; esac

if [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
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
exec "$venv/bin/python" "$here/validate.py" "${CONDUCTOR_BIN:-target/debug/conductor}"
