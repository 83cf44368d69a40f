#!/usr/bin/env bash
# Installs what conductor needs on Debian/Ubuntu (podman, runc, debootstrap, e2fsprogs…),
# builds the conductor binary (release) and the base + minimal images. Idempotent: quick the
# second time. Missing packages are installed while cargo compiles.
# Usage: scripts/setup.sh [--no-images | --deps-only]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "setup: run as root (or install sudo): apt-get needs root, and workspace volumes are loop mounts" >&2; exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: Rust (cargo) is missing: install a stable toolchain from https://rustup.rs and re-run" >&2; exit 1
fi

declare -A pkg_of=(
  [podman]=podman [runc]=runc [debootstrap]=debootstrap [mkfs.ext4]=e2fsprogs [mkfs.xfs]=xfsprogs
  [tar]=tar [mount]=mount [ip]=iproute2 [python3]=python3 [curl]=curl
  [iptables-restore]=iptables [ip6tables-restore]=iptables [nsenter]=util-linux
)
missing=()
for cmd in "${!pkg_of[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/sbin/$cmd" ] || missing+=("${pkg_of[$cmd]}")
done
# uidmap and catatonit are used by Podman; python3-venv for the Python client tests.
for p in uidmap python3-venv; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done

apt_log=""
install_missing() {
  [ ${#missing[@]} -gt 0 ] || return 0
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
}
# Waits for the apt-get started in the background; shows its output when it failed.
wait_apt() {
  [ -n "${apt_pid:-}" ] || return 0
  if ! wait "$apt_pid"; then
    echo "setup: installing ${missing[*]} failed:" >&2
    cat "$apt_log" >&2
    exit 1
  fi
  apt_pid=""
}

if [ "${1:-}" = "--deps-only" ]; then
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    install_missing >/dev/null
  fi
  exit 0
fi

# apt-get (network and dpkg) runs while cargo compiles (CPU): on a fresh machine that hides
# the ~2 minutes of package installation behind the build.
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} (in the background, while conductor compiles)"
  [ -z "$SUDO" ] || $SUDO -v # ask for the password now, not in the middle of the build
  apt_log=$(mktemp)
  install_missing >"$apt_log" 2>&1 &
  apt_pid=$!
  trap 'rm -f "$apt_log"' EXIT
fi

echo "setup: building conductor (release)"
cargo build --release --locked --bin conductor
# The in-workspace agent (PID 1 of every workspace): static, so it runs in any image.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target x86_64-unknown-linux-gnu -p conductor-agent
wait_apt

if [ "${1:-}" != "--no-images" ]; then
  ./target/release/conductor env build minimal
fi
echo "setup: done. Try: ./target/release/conductor doctor"
