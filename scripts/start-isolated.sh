#!/usr/bin/env bash
# Starts conductor in isolated-workspace mode: installs what is missing, builds the binary
# and the images, checks the host, and runs a first command in a fresh workspace.
# Usage: scripts/start-isolated.sh [start|stop|status]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release/conductor

case "${1:-start}" in
  start)
    scripts/setup.sh
    "$BIN" doctor || true
    echo "== a first command in a fresh minimal workspace"
    "$BIN" run --env minimal -- 'echo "hello from $(hostname) as uid $(id -u) in $(pwd)"; git --version'
    ;;
  stop)
    echo "nothing is running in the background"
    ;;
  status)
    "$BIN" ws ls
    ;;
  *)
    echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
