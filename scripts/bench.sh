#!/usr/bin/env bash
# The whole benchmark in one run, on this machine: speed (time to first command, exec
# latency, throughput, idle memory), snapshots, and the workspace lifecycle, each against
# raw Podman, and egress (proxy mode's throughput, connect latency and memory per
# connection against a direct connection, to a local upstream in a network namespace), as
# Markdown tables on stdout (docs/performance.md holds the last run), and fork (a workspace
# holding 1 GiB forked into 1 and 8 copies, beside `cp -a` of the same data), and e2b (the
# official E2B Python SDK's create -> run `true` -> kill loop against conductor's native API).
#
#   scripts/bench.sh                 # everything (~15 min on 2 cores)
#   scripts/bench.sh speed snapshots # some of: speed snapshots lifecycle egress fork e2b
#
# Knobs (environment): BENCH_N (speed iterations, 30; egress latency requests, 50),
# BENCH_N_SLOW (snapshots, lifecycle and fork iterations, 3, 20 and 3), BENCH_TASKS (throughput
# tasks, 200), BENCH_IDLE (idle workspaces, 50), BENCH_RUNS (egress 1 GiB transfers, 3),
# BENCH_CONNS (egress idle tunnels, 200), BENCH_NOFILE and BENCH_PIDS (the egress
# workspace's limits, 4096 and 1024: the defaults stop the relay at ~170 tunnels).
# Needs what scripts/setup.sh installs: root, Podman, the static agent, the minimal image;
# egress also the python-dev image (built here when missing), iproute2 and curl, and the
# address range 198.51.100.248/30 free (it makes the namespace cbench-egress and a veth).
set -euo pipefail
cd "$(dirname "$0")/.."

benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(speed snapshots lifecycle egress fork e2b)
for b in "${benches[@]}"; do
    case "$b" in
        speed | snapshots | lifecycle | egress | fork | e2b) ;;
        *) echo "unknown bench '$b' (speed, snapshots, lifecycle, egress, fork, e2b)" >&2; exit 2 ;;
    esac
done

echo "== building the static agent and conductor" >&2
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
    --target x86_64-unknown-linux-gnu -p conductor-agent
cargo build --release --quiet --bin conductor
echo "== making sure the minimal environment exists" >&2
./target/release/conductor env build minimal >&2
if [[ " ${benches[*]} " == *" egress "* ]]; then
    echo "== making sure the python-dev environment exists" >&2
    ./target/release/conductor env build python-dev >&2
fi

echo "# conductor benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r)"
for b in "${benches[@]}"; do
    echo
    echo "## $b"
    echo
    if [ "$b" = e2b ]; then
        # The SDK in its test virtualenv (made by the suite's run script, pinned versions).
        tests/e2b/python/run.sh --co -q >/dev/null
        CONDUCTOR_BIN=target/release/conductor tests/e2b/python/.venv/bin/python tests/e2b/python/bench.py \
            --iterations "${BENCH_N:-20}" || exit 1
        continue
    fi
    # Snapshot rounds are slower; keep their default unless asked.
    if [ "$b" = speed ] || [ "$b" = egress ]; then
        cargo bench --quiet --bench "$b" 2>&1 | grep -v '^running\|^test result' || exit 1
    else
        BENCH_N="${BENCH_N_SLOW:-}" cargo bench --quiet --bench "$b" 2>&1 | grep -v '^running\|^test result' || exit 1
    fi
done
