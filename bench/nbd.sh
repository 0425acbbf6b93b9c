#!/usr/bin/env bash
# nbd.sh - NBD throughput benchmark: vdiskd vs qemu-nbd vs qemu-storage-daemon vs the local file.
# The same fully written qcow2 is served by each server in turn (unix socket, host page cache) and
# fio's nbd engine runs 4k randread/randwrite (iodepth 16) and 1M seq read/write (iodepth 4) over
# 2 connections; see bench/nbd_bench.py for the method. Results: bench/out/nbd.md (+ nbd.json;
# nbd-direct.* with BENCH_NBD_CACHE=none).
# Env: BENCH_NBD_SIZE (virtual size, default 4G; e.g. 256M for a quick run),
#      BENCH_NBD_RUNTIME (seconds per workload, 10), BENCH_NBD_RAMP (1), BENCH_NBD_REPS (1; the
#      median is reported, runs are interleaved server by server),
#      BENCH_NBD_SERVERS (vdiskd,qemu-nbd,qsd,local), BENCH_NBD_WORKLOADS
#      (randread-4k,randwrite-4k,seqread-1M,seqwrite-1M), BENCH_NBD_LOCAL_ENGINE (libaio),
#      BENCH_NBD_CACHE (writeback = host page cache for all, the default; none = O_DIRECT for all),
#      BENCH_NBD_WORK (cached images + sockets + server logs: /var/tmp/vdisk-bench-nbd),
#      BENCH_NBD_PERF (a path prefix: `perf record --call-graph dwarf` vdiskd into PREFIX-<workload>.data;
#      then `perf report -i PREFIX-randread-4k.data --no-children`),
#      BENCH_NBD_NOTE (a line of text put at the top of the report), VDISKD (build/src/tools/vdiskd),
#      BENCH_NBD_VDISKD_ALT (a second vdiskd build; add server vdiskd-alt to BENCH_NBD_SERVERS to
#      compare two builds in the same run).
# Needs: fio (with the nbd engine), qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon, python3, and
# about 2 x BENCH_NBD_SIZE of free disk in the work dir.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VDISKD="${VDISKD:-$ROOT/build/src/tools/vdiskd}"
[ -x "$VDISKD" ] || { echo "bench-nbd: $VDISKD not found; run 'make' first (or set VDISKD)" >&2; exit 2; }
for t in fio qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
    command -v "$t" >/dev/null || { echo "bench-nbd: $t missing" >&2; exit 2; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench-nbd: this fio has no nbd engine" >&2; exit 2; }
exec /usr/bin/python3 "$ROOT/bench/nbd_bench.py" \
    --vdiskd "$VDISKD" \
    --work "${BENCH_NBD_WORK:-/var/tmp/vdisk-bench-nbd}" \
    --out "$ROOT/bench/out" \
    --size "${BENCH_NBD_SIZE:-4G}" \
    --runtime "${BENCH_NBD_RUNTIME:-10}" \
    --ramp "${BENCH_NBD_RAMP:-1}" \
    --reps "${BENCH_NBD_REPS:-1}" \
    --servers "${BENCH_NBD_SERVERS:-vdiskd,qemu-nbd,qsd,local}" \
    --workloads "${BENCH_NBD_WORKLOADS:-randread-4k,randwrite-4k,seqread-1M,seqwrite-1M}" \
    --local-engine "${BENCH_NBD_LOCAL_ENGINE:-libaio}" \
    --cache "${BENCH_NBD_CACHE:-writeback}" \
    --perf "${BENCH_NBD_PERF:-}" \
    --note "${BENCH_NBD_NOTE:-}" \
    --vdiskd-alt "${BENCH_NBD_VDISKD_ALT:-}"
