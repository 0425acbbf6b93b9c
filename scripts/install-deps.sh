#!/usr/bin/env bash
# install-deps.sh - install the Debian 12 packages vdisk needs to build, test and demo.
# Idempotent: only packages that are missing are installed; nothing runs when all are present.
set -euo pipefail
pkgs=(
  build-essential meson ninja-build pkg-config
  zlib1g-dev libzstd-dev libjansson-dev libnbd-dev libcmocka-dev
  python3-pytest
  qemu-utils qemu-system-common qemu-block-extra libnbd-bin nbdkit fio
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "install-deps: installing ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
