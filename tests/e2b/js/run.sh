#!/usr/bin/env bash
# Runs the E2B JS SDK end-to-end tests against a real `conductor serve`.
# Needs Node 20+ and npm; the conductor binary is target/debug/conductor (or $CONDUCTOR_BIN).
set -euo pipefail
cd "$(dirname "$0")"

# Node.js and npm come with this kind of machine; elsewhere, Debian's (as root).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq nodejs npm >/dev/null \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq nodejs npm >/dev/null; }
  else
    echo "tests/e2b/js: node and npm are needed (apt-get install nodejs npm)" >&2
    exit 1
  fi
fi

# (Re)install when node_modules is missing or older than the lock file.
stamp=node_modules/.package-lock.json
if [ ! -f "$stamp" ] || [ package-lock.json -nt "$stamp" ] || [ package.json -nt "$stamp" ]; then
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
fi

exec node --test --test-concurrency=1 "$@" test/
