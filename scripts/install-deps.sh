#!/usr/bin/env bash
# install-deps.sh - install the Debian 12 packages vdisk needs to build, test and demo.
# Idempotent: only packages that are missing are installed; nothing runs when all are present.
# The real-VM test's packages (a guest kernel, qemu-system-x86, busybox-static) are installed best
# effort: if they cannot be had, that one test skips and says why.
set -euo pipefail
required=(
  build-essential meson ninja-build pkg-config
  zlib1g-dev libzstd-dev libjansson-dev libnbd-dev libcmocka-dev libgnutls28-dev nettle-dev gnutls-bin
  python3-pytest python3-pytest-timeout python3-pytest-xdist
  qemu-utils qemu-system-common qemu-block-extra libnbd-bin nbdkit fio strace time gnuplot-nox
  scdoc man-db groff-base systemd bash-completion
  librbd-dev ceph-mon ceph-osd ceph-common iproute2
)
optional=(qemu-system-x86 busybox-static linux-image-cloud-amd64)

missing_of() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
updated=0
install() {
  [ "$updated" = 1 ] || { $sudo apt-get update -qq; updated=1; }
  $sudo apt-get install -y -qq --no-install-recommends "$@"
}

mapfile -t missing < <(missing_of "${required[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  install "${missing[@]}"
fi
mapfile -t missing < <(missing_of "${optional[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing (for the real-VM test) ${missing[*]}" >&2
  install "${missing[@]}" || echo "install-deps: warning: could not install ${missing[*]}; the real-VM test will skip" >&2
fi
