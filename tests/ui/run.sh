#!/usr/bin/env bash
# Runs the dashboard's browser tests: playwright-core (pinned, no browser download)
# driving Debian's chromium headless against a real `conductor serve` with a token.
# Needs Node 20+ and npm; the conductor binary is target/debug/conductor (or
# $CONDUCTOR_BIN). Screenshots of every page go to target/ui-screenshots/.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
  else
    echo "tests/ui: /usr/bin/chromium is needed (apt-get install chromium), or set CHROMIUM" >&2
    exit 1
  fi
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "tests/ui: node and npm are needed" >&2
  exit 1
fi

# (Re)install when node_modules is missing or older than the lock file. Playwright's
# browser download is off: the tests use the system's chromium.
stamp=node_modules/.package-lock.json
if [ ! -f "$stamp" ] || [ package-lock.json -nt "$stamp" ] || [ package.json -nt "$stamp" ]; then
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null
fi

exec node --test --test-concurrency=1 "$@" dashboard.test.mjs
