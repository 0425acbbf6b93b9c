#!/usr/bin/env bash
# ceph-dev.sh - a throwaway single-node Ceph for tests and benchmarks: one monitor and one OSD
# with the memstore object store (data lives in the OSD's memory), on 127.0.0.1 only, auth none,
# pool size 1, and one pool "rbd" initialised for RBD. Everything (config, logs, sockets, pids)
# lives in DIR; "stop" kills the daemons it started there and removes DIR.
#
#   scripts/ceph-dev.sh start DIR [PORT]   prints the path of DIR/ceph.conf when the pool is usable
#   scripts/ceph-dev.sh stop DIR
#
# Clients use it with CEPH_CONF=DIR/ceph.conf, or rbd:rbd/IMAGE:conf=DIR/ceph.conf.
# Env: CEPH_DEV_MEM_MB (OSD memory store size, default 1024), CEPH_DEV_TIMEOUT (seconds, default 60).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR [PORT]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$2
timeout_s=${CEPH_DEV_TIMEOUT:-60}

die() { echo "ceph-dev: $*" >&2; exit 1; }

# Kill the daemons whose pid files are in DIR/run (only ours), wait for them, bounded.
stop_daemons() {
  local f pid pids=()
  for f in "$dir"/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    [[ "$pid" =~ ^[0-9]+$ ]] || continue
    # A recycled pid must not be ours to kill: check it is a ceph daemon using this DIR.
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$dir/ceph.conf"; then
      kill -KILL "$pid" 2>/dev/null || true  # memstore: nothing to save
      pids+=("$pid")
    fi
  done
  local i
  for i in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

free_port() {
  python3 -S -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Run a ceph CLI command with a bound on its wait (the CLI retries forever when the mon is down).
# With auth none a fresh client sometimes sends its first command before it has the monitor map
# ("wrong fsid", EPERM): retry, a bounded number of times.
cephc() {
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    timeout 20 ceph -c "$dir/ceph.conf" --connect-timeout 15 "$@" 2>>"$dir/log/cli.log" && return 0
    sleep 0.2
  done
  return 1
}

start() {
  [ ! -e "$dir/ceph.conf" ] || die "$dir already holds a cluster (stop it first)"
  command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null ||
    die "ceph-mon and ceph-osd are needed (scripts/install-deps.sh installs them)"
  local port=${3:-$(free_port)}
  mkdir -p "$dir"/{run,log,mon,osd}
  dir=$(cd "$dir" && pwd)
  local fsid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  local mem_mb=${CEPH_DEV_MEM_MB:-1024}
  cat >"$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$port
mon initial members = a
public addr = 127.0.0.1
ms bind msgr2 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
keyring = $dir/keyring
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon data = $dir/mon/\$cluster-\$id
osd data = $dir/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = $((mem_mb << 20))
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
# The OSD's own crush updates at boot hit the same race and abort its start; ceph-dev.sh places it.
osd crush update on start = false
osd class update on start = false
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# A throwaway cluster holds a few MiB: the host's disk being nearly full (the monitor refuses to
# start below 5% free by default, CI machines run at 95%) is none of its business.
mon data avail crit = 0
mon data avail warn = 0
osd max object name len = 256
osd max object namespace len = 64
[client]
admin socket =
log file = $dir/log/client.log
EOF
  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  monmaptool --create --addv a "[v1:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" ||
    die "ceph-mon --mkfs failed (see $dir/log)"
  ceph-mon -c "$dir/ceph.conf" -i a || die "ceph-mon did not start (see $dir/log/mon.a.log)"
  local osd_uuid id
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  id=$(cephc osd new "$osd_uuid") || die "the monitor did not answer (see $dir/log/mon.a.log)"
  mkdir -p "$dir/osd/ceph-$id"
  ceph-osd -c "$dir/ceph.conf" -i "$id" --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>&1 ||
    die "ceph-osd --mkfs failed (see $dir/log/osd.$id.log)"
  cephc osd crush add "osd.$id" 1.0 host=localhost root=default >/dev/null ||
    die "could not place osd.$id in the crush map"
  ceph-osd -c "$dir/ceph.conf" -i "$id" 2>/dev/null || die "ceph-osd did not start"
  cephc osd pool create rbd 8 8 >/dev/null || die "could not create pool rbd"
  # rbd pool init writes to the pool: it returns once the OSD is up and the PGs are active.
  local t0=$SECONDS
  until timeout 10 rbd -c "$dir/ceph.conf" pool init rbd 2>/dev/null; do
    [ $((SECONDS - t0)) -lt "$timeout_s" ] ||
      die "pool rbd not usable after ${timeout_s}s (see $dir/log)"
    sleep 0.2
  done
  echo "$dir/ceph.conf"
}

case "$cmd" in
  start)
    # On any failure, leave nothing running (DIR stays, with its logs, for a look).
    trap 'rc=$?; [ $rc = 0 ] || stop_daemons; exit $rc' EXIT
    start "$@"
    ;;
  stop)
    [ -d "$dir" ] || exit 0
    dir=$(cd "$dir" && pwd)
    stop_daemons
    rm -rf "$dir"
    ;;
  *) usage ;;
esac
