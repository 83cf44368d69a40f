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
./target/debug/conductor env build --all --services

echo "== cargo test"
cargo test --locked --workspace -- --test-threads="${TEST_THREADS:-2}"

echo "== tests finished in $(( $(date +%s) - start ))s"
