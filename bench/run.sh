#!/usr/bin/env bash
# run.sh - `make bench`: time vdisk against qemu-img on a generated qcow2 chain (bench/bench.py).
# Env: BENCH_SCALE (1 = 4 GiB virtual, 1.5 GiB base data, 2 x 256 MiB snapshots; 0.05 for a
#      quick smoke run), BENCH_REPS (3), BENCH_SEED, BENCH_WORK (generated chain, cached:
#      /var/tmp/vdisk-bench), BENCH_ONLY (comma-separated substrings of operation names),
#      BENCH_DROP_CACHES=1 (cold cache: drop the page cache before every run; root),
#      VDISK (default build/src/tools/vdisk). Results: bench/out/results.md (+ .json).
# Needs: qemu-img, /usr/bin/time (Debian package `time`), python3, ~2.5 GiB * scale of free disk
# for the cached chain plus ~4 GiB * scale while a raw conversion runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VDISK="${VDISK:-$ROOT/build/src/tools/vdisk}"
[ -x "$VDISK" ] || { echo "bench: $VDISK not found; run 'make' first" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "bench: /usr/bin/time missing (apt-get install time)" >&2; exit 2; }
command -v qemu-img >/dev/null || { echo "bench: qemu-img missing (qemu-utils)" >&2; exit 2; }
exec /usr/bin/python3 "$ROOT/bench/bench.py" \
    --vdisk "$VDISK" \
    --work "${BENCH_WORK:-/var/tmp/vdisk-bench}" \
    --out "$ROOT/bench/out" \
    --scale "${BENCH_SCALE:-1}" \
    --reps "${BENCH_REPS:-3}" \
    --seed "${BENCH_SEED:-20261125}" \
    --only "${BENCH_ONLY:-}" \
    $([ "${BENCH_DROP_CACHES:-0}" = 1 ] && echo --drop-caches)
