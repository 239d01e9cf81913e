#!/usr/bin/env bash
# Installs what edgekit needs on a fresh Debian/Ubuntu machine, idempotently:
#   scripts/setup.sh          the compiler side (torch, onnx, onnxruntime, TVM) and the aarch64 cross toolchain
#   scripts/setup.sh --dev    the same, plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."

# espeak-ng, flite and sox synthesise the keyword-spotting demo's data (examples/kws) and the stream tests' speech.
apt_packages=(g++ gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user espeak-ng flite sox)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "edgekit setup: installing ${missing[*]} (apt)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

extra="compile"
[ "${1:-}" = "--dev" ] && extra="dev"
echo "edgekit setup: installing edgekit[$extra] (pip, pinned versions)"
python3 -m pip install -q --disable-pip-version-check -e ".[$extra]"
