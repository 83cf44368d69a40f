#!/usr/bin/env bash
# The test command: installs what is missing, checks formatting and lints, builds every
# image the tests use, and runs all tests (unit tests and integration tests against real
# Podman). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

scripts/setup.sh --deps-only

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

echo "== images used by the tests"
cargo build --locked --bin conductor
# The in-workspace agent (PID 1 of every workspace): static, so it runs in any image.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu -p conductor-agent
./target/debug/conductor env build --all --services

echo "== cargo test"
cargo test --locked --workspace -- --test-threads="${TEST_THREADS:-2}"

echo "== Python client tests (against a real conductor serve)"
clients/python/run-tests.sh

echo "== tests finished in $(( $(date +%s) - start ))s"
