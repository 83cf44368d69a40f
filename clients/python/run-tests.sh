#!/usr/bin/env bash
# Tests of the Python client against a real conductor service (started by the tests from
# ../../target/debug/conductor, or $CONDUCTOR_BIN). Creates a virtualenv in .venv (or
# $CONDUCTOR_PY_VENV), installs the package with its test dependencies, and runs pytest;
# arguments go to pytest. Exits non-zero when a test fails.
# Usage: clients/python/run-tests.sh [pytest args...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${CONDUCTOR_PY_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "== creating virtualenv $venv"
    "$python" -m venv "$venv"
fi
echo "== installing the package and its test dependencies"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$here[test]"
# A plain install of an unchanged version may keep the old build: install this tree's.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$here"

echo "== pytest"
cd "$here"
exec "$venv/bin/python" -m pytest "$@"
