#!/usr/bin/env bash
# The test command: installs what is missing, checks formatting and lints, builds every
# image the tests use, and runs all tests (unit tests and integration tests against real
# Podman). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# A one-shot run gains nothing from incremental compilation, whose cache is the largest part
# of target/ (tens of GB after a few runs). Developers re-running locally can keep it on.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi

# Missing packages (Podman, debootstrap…) are installed while fmt and clippy run; as root
# only, where apt-get cannot stop to ask for a password.
deps_log=$(mktemp)
trap 'rm -f "$deps_log"' EXIT
if [ "$(id -u)" -eq 0 ]; then
  scripts/setup.sh --deps-only >"$deps_log" 2>&1 &
  deps=$!
else
  scripts/setup.sh --deps-only
  deps=""
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

echo "== images used by the tests"
# The tests run the dev profile (target/debug/conductor): the same build makes the images.
cargo build --locked --bin conductor
# The in-workspace agent (PID 1 of every workspace): static, so it runs in any image. The
# same command as scripts/setup.sh, so start-isolated.sh and this script share its build.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu -p conductor-agent
if [ -n "$deps" ]; then
  if ! wait "$deps"; then
    cat "$deps_log" >&2
    echo "test: installing the dependencies failed" >&2
    exit 1
  fi
  cat "$deps_log"
fi
images=$(date +%s)
./target/debug/conductor env build --all --services
echo "== images ready in $(( $(date +%s) - images ))s"

echo "== cargo test"
cargo test --locked --workspace --no-fail-fast -- --skip a_workspace_on_a_real_cluster --test-threads="${TEST_THREADS:-2}"
echo "== Kubernetes cluster suite (runs when KUBECONFIG is set, says SKIPPED otherwise)"
cargo test --locked --test kube_cluster -- --nocapture

echo "== Kubernetes objects loaded into the official Python client's models (kubernetes 34.1.0, API 1.34)"
tests/kube/run.sh

echo "== Python client tests (against a real conductor serve)"
clients/python/run-tests.sh

echo "== E2B SDK tests: the official Python and JS SDKs (pinned) against a real conductor serve"
tests/e2b/python/run.sh
tests/e2b/js/run.sh

echo "== dashboard browser tests (Playwright driving Debian's chromium against a real conductor serve)"
tests/ui/run.sh

echo "== target/ uses $(du -sh target 2>/dev/null | cut -f1), $(df -h --output=avail . | tail -1 | tr -d ' ') free"
echo "== tests finished in $(( $(date +%s) - start ))s"
