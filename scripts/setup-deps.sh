#!/usr/bin/env bash
# Installs the Debian packages longattn builds against. Idempotent: a second run checks and returns.
set -euo pipefail
packages=(cmake make g++ libopenmpi-dev openmpi-bin libboost-dev libboost-system-dev
          libspdlog-dev libfmt-dev libgtest-dev libucx-dev libopenblas-dev python3-numpy libssl-dev openssl
          iproute2 slurm-wlm munge)  # ip netns, Slurm and munge: the tests under tests/cluster
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
fetch_frontend() {
  # Header-only cudnn-frontend for the cudnn backend; only worth fetching where CUDA code builds.
  if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
    bash "$(dirname "$0")/fetch-cudnn-frontend.sh" || echo "setup-deps: continuing without the cudnn backend" >&2
  fi
}
if [ ${#missing[@]} -eq 0 ]; then fetch_frontend; exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "setup-deps: missing packages (${missing[*]}) and no apt-get here; install them by hand" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "setup-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fetch_frontend
