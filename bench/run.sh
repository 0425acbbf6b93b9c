#!/usr/bin/env bash
# run.sh - `make bench`: the whole benchmark in one invocation, QEMU's tools measured in the same
# run on the same files (~20-25 min at the defaults on 2 cores; BENCH_SCALE=0.1 for a ~5 min check):
#  1. offline: vdisk vs qemu-img on the generated chain (bench/bench.py: convert, commit, rebase...);
#  2. guest NBD: fio over NBD into a fresh overlay of the chain (allocating 4k writes, 4k reads),
#     vdiskd vs qemu-nbd, TCP and unix, 1 and 4 connections (bench/guest_nbd.py);
#  3. block jobs under a guest: vdiskd vs qemu-storage-daemon, mirror (background and
#     write-blocking), stream, commit, active commit, idle / capped (2000 IOPS) / uncapped fio
#     4k random writes (bench/jobs_bench.py), and the guest's IOPS/latency timeline through each job
#     (bench/plot.py -> jobs-timeline.png);
#  4. hosts (~3 min at scale 1): blockdev-mirror onto Ceph RBD (a throwaway memstore cluster) and
#     across a veth link (1 Gbit/s tbf, 0 and 5 ms added latency), vdiskd vs qemu-storage-daemon
#     (bench/hosts_bench.py; root, ceph, qemu-block-extra, nbdkit: a part that cannot run is noted
#     in hosts.md, the run goes on).
# The chain: bench/bench.py's generator, seeded (4 GiB * scale virtual; base 1.5 GiB * scale of
# random data, sn1/sn2 256 MiB * scale scattered over the disk; 64 KiB clusters; made with qemu-img).
# Results (committed, not an ignored folder): bench/results/ - machine.md, results.md/.json,
# guest-nbd.md/.json, jobs.md/.json, jobs-timeline.png; then BENCHMARKS.md is regenerated from them
# (bench/report.py; BENCH_REPORT=0: not, BENCH_REPORT_TO=FILE: elsewhere).
# Env: BENCH_SCALE (1), BENCH_REPS (3: medians of 3 with the spread everywhere), BENCH_SEED,
#      BENCH_PARTS (offline,nbd,jobs,hosts), BENCH_OUT (bench/results), BENCH_WORK (cached chain and
#      run files: /var/tmp/vdisk-bench), BENCH_NBD_RUNTIME (3 s per NBD cell),
#      BENCH_JOBS_SCENARIOS (comma-separated scenario names or substrings, see jobs_bench.py),
#      BENCH_ONLY / BENCH_DROP_CACHES (offline part, see bench.py), VDISK, VDISKD.
# Needs: qemu-img, qemu-nbd, qemu-storage-daemon, fio (nbd engine), gnuplot, /usr/bin/time,
#        python3, ~2.5 GiB * scale of disk for the chain plus ~5 GiB * scale while running.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VDISK="${VDISK:-$ROOT/build/src/tools/vdisk}"
VDISKD="${VDISKD:-$ROOT/build/src/tools/vdiskd}"
SCALE="${BENCH_SCALE:-1}"
REPS="${BENCH_REPS:-3}"
SEED="${BENCH_SEED:-20261125}"
PARTS="${BENCH_PARTS:-offline,nbd,jobs,hosts}"
OUT="${BENCH_OUT:-$ROOT/bench/results}"
WORK="${BENCH_WORK:-/var/tmp/vdisk-bench}"
# What fits ~25 min at scale 1 with 3 repetitions on 2 cores (measured: ~20 s per job run at scale
# 1); BENCH_JOBS_SCENARIOS="mirror,stream,commit" (substrings) runs every scenario, ~2x longer.
SCENARIOS="${BENCH_JOBS_SCENARIOS:-=baseline (capped),=baseline (uncapped),=mirror-full (idle),=mirror-full (uncapped),=mirror-wb (uncapped),=stream (capped),=commit-active (capped)}"
for t in "$VDISK" "$VDISKD"; do
    [ -x "$t" ] || { echo "bench: $t not found; run 'make' first" >&2; exit 2; }
done
for t in qemu-img qemu-nbd qemu-storage-daemon fio gnuplot; do
    command -v "$t" >/dev/null || { echo "bench: $t missing (scripts/install-deps.sh)" >&2; exit 2; }
done
[ -x /usr/bin/time ] || { echo "bench: /usr/bin/time missing (apt-get install time)" >&2; exit 2; }
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench: this fio has no nbd engine" >&2; exit 2; }
mkdir -p "$OUT" "$WORK"
PY=/usr/bin/python3
t0=$(date +%s)
stamp() { echo "[bench $(date -u +%H:%M:%S)] $*" >&2; }

{
    echo "# The machine of this run"
    echo
    echo "- started $(date -u '+%Y-%m-%d %H:%M UTC'); \`make bench\` BENCH_SCALE=$SCALE BENCH_REPS=$REPS seed $SEED"
    echo "- $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)"
    echo "- kernel $(uname -r); $(. /etc/os-release; echo "$PRETTY_NAME")"
    echo "- work dir $WORK on $(df -PT "$WORK" | awk 'NR==2 {print $1, $2}') ($(lsblk -dno NAME,ROTA,MODEL "$(df -P "$WORK" | awk 'NR==2 {print $1}' | sed 's/[0-9]*$//')" 2>/dev/null | tr -s ' ' || echo '?'))"
    echo "- $(qemu-img --version | head -1); $(fio --version); gnuplot $(gnuplot --version | cut -d' ' -f2-3)"
    echo "- vdisk tree $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || echo ' (with uncommitted changes in src/)'), build $(grep -m1 "buildtype" "$ROOT/build/meson-info/intro-buildoptions.json" >/dev/null 2>&1 && echo debugoptimized || echo '?') (meson default: -O2 -g)"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (the machine is shared: other people's builds and tests run on the same cores)"
} > "$OUT/machine.md"

if [[ ",$PARTS," == *",offline,"* ]]; then
    stamp "part 1/4: offline commands, vdisk vs qemu-img"
    $PY "$ROOT/bench/bench.py" --vdisk "$VDISK" --work "$WORK" --out "$OUT" --scale "$SCALE" \
        --reps "$REPS" --seed "$SEED" --only "${BENCH_ONLY:-}" \
        $([ "${BENCH_DROP_CACHES:-0}" = 1 ] && echo --drop-caches) > /dev/null
fi
if [[ ",$PARTS," == *",nbd,"* ]]; then
    stamp "part 2/4: guest I/O over NBD into a fresh overlay, vdiskd vs qemu-nbd"
    $PY "$ROOT/bench/guest_nbd.py" --vdiskd "$VDISKD" --work "$WORK" --out "$OUT" \
        --scale "$SCALE" --seed "$SEED" --reps "$REPS" --runtime "${BENCH_NBD_RUNTIME:-3}" > /dev/null
fi
if [[ ",$PARTS," == *",jobs,"* ]]; then
    stamp "part 3/4: block jobs under guest load, vdiskd vs qemu-storage-daemon"
    $PY "$ROOT/bench/jobs_bench.py" --vdiskd "$VDISKD" --work "$WORK" --out "$OUT" \
        --scale "$SCALE" --seed "$SEED" --reps "$REPS" --loads idle,capped,uncapped \
        --only "$SCENARIOS" --rate-iops 2000 --fio-secs 5 --ramp 1 > /dev/null
    $PY "$ROOT/bench/plot.py" "$OUT/jobs.json" "$OUT/jobs-timeline.png"
fi
if [[ ",$PARTS," == *",hosts,"* ]]; then
    stamp "part 4/4: onto Ceph and across hosts, vdiskd vs qemu-storage-daemon"
    VDISK_BUILD="$(dirname "$(dirname "$(dirname "$VDISKD")")")" $PY "$ROOT/bench/hosts_bench.py" \
        --out "$OUT" --scale "$SCALE" --reps "$REPS" > /dev/null || stamp "part 4 failed (hosts.md)"
fi
# BENCHMARKS.md from this run (the goals checked by script; bench/results/notes.md: the reading)
if [ "${BENCH_REPORT:-1}" = 1 ]; then
    $PY "$ROOT/bench/report.py" "$OUT" "${BENCH_REPORT_TO:-$ROOT/BENCHMARKS.md}" "$OUT/notes.md"
fi
echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); wall time $(( $(date +%s) - t0 )) s" >> "$OUT/machine.md"
stamp "done in $(( $(date +%s) - t0 )) s: $OUT"
