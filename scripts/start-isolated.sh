#!/usr/bin/env bash
# Runs conductor's HTTP service in the background in isolated-workspace mode.
#   start (default)  install what is missing, build the binary (release) and every environment
#                    and sidecar image, start `conductor serve`, wait until /health answers,
#                    show how to use it
#   stop             SIGTERM, wait for running tasks (shutdown_grace_period + 10 s), then SIGKILL
#   status           running or not, pid, health
# The configuration is the one `conductor` finds ($CONDUCTOR_CONFIG, ~/.claude-conductor/config/…,
# then config/standalone-isolated.yaml); the pid file is <base>/conductor.pid and the log
# <logs>/conductor.log. Usage: scripts/start-isolated.sh [start|stop|status]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release/conductor

# One value of `conductor paths` (JSON).
path_of() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])" <<<"$PATHS_JSON"; }

load_paths() {
  PATHS_JSON=$("$BIN" paths)
  PID_FILE=$(path_of pid_file)
  LOG_FILE=$(path_of log_file)
  API_URL=$(path_of api_url)
  GRACE=$(path_of shutdown_grace_period)
  KEY_REQUIRED=$(path_of api_key_required)
  KEY_FILE=$(path_of api_key_file)
}

running_pid() {
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid=$(cat "$PID_FILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

healthy() { curl -fsS --max-time 2 "$API_URL/health" 2>/dev/null; }

start() {
  if [ -x "$BIN" ]; then
    load_paths
    if pid=$(running_pid); then
      echo "conductor is already running (pid $pid) on $API_URL"
      return 0
    fi
  fi
  local began=$SECONDS
  scripts/setup.sh --no-images
  echo "== setup took $((SECONDS - began))s"
  load_paths
  # Every environment image and the sidecar images (postgres, redis; built locally, no
  # registry needed) in one batch: the base first, then several at once (--jobs, see
  # docs/configuration.md). Quick when they exist.
  echo "== environment and service images"
  local images=$SECONDS
  "$BIN" env build --all --services
  echo "== images took $((SECONDS - images))s"
  mkdir -p "$(dirname "$LOG_FILE")" "$(dirname "$PID_FILE")"
  echo "== starting conductor serve (log: $LOG_FILE)"
  nohup "$BIN" serve >>"$LOG_FILE" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PID_FILE"
  for _ in $(seq 1 60); do
    if healthy >/dev/null; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "conductor exited during start-up; last lines of $LOG_FILE:" >&2
      tail -n 30 "$LOG_FILE" >&2
      rm -f "$PID_FILE"
      exit 1
    fi
    sleep 1
  done
  if ! healthy >/dev/null; then
    echo "conductor did not answer $API_URL/health within 60 s; last lines of $LOG_FILE:" >&2
    tail -n 30 "$LOG_FILE" >&2
    exit 1
  fi
  local auth=""
  if [ "$KEY_REQUIRED" = "True" ]; then
    auth=" -H \"Authorization: Bearer \$(cat $KEY_FILE)\""
  fi
  cat <<EOF
conductor is running (pid $pid) on $API_URL — $(healthy)
(started in $((SECONDS - began))s)

Run a task:
  curl -X POST $API_URL/tasks$auth \\
    -H 'Content-Type: application/json' \\
    -d '{"task_type": "isolated_execution", "environment": "minimal", "commands": ["echo hello from \$(hostname)"]}'
Follow its output:   curl -N$auth "$API_URL/tasks/<task_id>/logs?follow=true"
Its result:          curl$auth $API_URL/tasks/<task_id>
API reference:       curl$auth $API_URL/openapi.json
Stop:                scripts/start-isolated.sh stop
EOF
}

stop() {
  load_paths
  local pid
  if ! pid=$(running_pid); then
    echo "conductor is not running"
    rm -f "$PID_FILE"
    return 0
  fi
  echo "stopping conductor (pid $pid); running tasks get ${GRACE}s to finish"
  kill -TERM "$pid"
  local waited=0 limit=$((GRACE + 10))
  while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$limit" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "conductor did not stop within ${limit}s; killing it (run 'conductor reconcile' to clean up)" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PID_FILE"
  echo "conductor stopped"
}

status() {
  load_paths
  local pid
  if pid=$(running_pid); then
    echo "conductor is running (pid $pid) on $API_URL"
    if h=$(healthy); then echo "health: $h"; else echo "health: not answering"; exit 1; fi
  else
    echo "conductor is not running"
    exit 3
  fi
}

if [ ! -x "$BIN" ] && [ "${1:-start}" != "start" ]; then
  echo "conductor is not built ($BIN missing): run scripts/start-isolated.sh first" >&2
  exit 1
fi
case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
