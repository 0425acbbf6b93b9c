#!/usr/bin/env bash
# jobs.sh - block-jobs benchmark: vdiskd vs qemu-storage-daemon (QSD 7.2) driven over QMP.
# On bench/bench.py's generated chain (base <- sn1 <- sn2, 4 GiB * scale virtual, base ~1.5 GiB *
# scale of random data in scattered extents, sn1/sn2 ~256 MiB * scale), served over NBD by each
# daemon in turn (fresh copies, fresh daemon per scenario, same options: page cache):
# drive-mirror sync=full / sync=top (target over sn1) / vdiskd base-node (target over base): time
# to READY and COMPLETED and the pivot pause, idle and under a fio 4k randwrite load through NBD
# (capped and uncapped; guest IOPS, p99 and max latency during the job vs fio alone, and guest IOPS
# during the copy (job command -> READY) and during the pivot phase (complete -> COMPLETED) apart);
# block-stream and block-commit (non-active and active); daemon CPU time and peak RSS (VmHWM).
# See bench/jobs_bench.py for the method. Results: bench/out/jobs.md (+ jobs.json).
# Env: BENCH_JOBS_SCALE (1; 0.05-0.25 for a quick run), BENCH_JOBS_REPS (1; median shown),
#      BENCH_JOBS_LOADS (idle,capped,uncapped), BENCH_JOBS_ONLY (comma-separated substrings of
#      scenario names, e.g. "mirror-full,stream"), BENCH_JOBS_RATE_IOPS (capped load, 2000),
#      BENCH_JOBS_FIO_SECS (baseline fio run, 10), BENCH_JOBS_RAMP (fio seconds before the job, 1),
#      BENCH_JOBS_COMPLETE_AFTER (seconds the job stays READY before block-job-complete, 0),
#      BENCH_JOBS_TIMEOUT (seconds per job phase before cancelling it; 60 + 240 * scale),
#      BENCH_JOBS_SEED, BENCH_JOBS_WORK (cached chain + run dir: /var/tmp/vdisk-bench-jobs),
#      BENCH_JOBS_DAEMONS (vdiskd,qsd; vdiskd,vdiskd-state compares vdiskd without and with
#      --state-dir, its jobs journalling their progress: the guest's cost of docs/resumable.md),
#      BENCH_JOBS_VERIFY (1: qemu-img compare after idle mirrors),
#      BENCH_JOBS_TAG (write bench/out/jobs-TAG.md/.json instead, e.g. for a profiling run),
#      BENCH_JOBS_NOTE (a line of text put at the top of the report),
#      BENCH_JOBS_PERF=1 (perf record vdiskd during its mirror runs into
#      bench/out/perf-jobs-[TAG-]SCENARIO-LOAD.data; BENCH_JOBS_PERF_LOADS (idle),
#      BENCH_JOBS_PERF_CALLGRAPH (dwarf,8192), BENCH_JOBS_PERF_FREQ (499); then
#      `perf report -i FILE --no-children --sort pid,sym`), BENCH_JOBS_PERF_KINDS (prefixes of
#      the scenarios it watches: mirror), BENCH_JOBS_PERF_TRACE=1 (`strace -f -tt -T` instead:
#      every syscall of every thread with its duration, in bench/out/perf-jobs-...strace),
#      VDISKD (default build/src/tools/vdiskd; the default debugoptimized build is fine).
#      vdiskd's copy-engine knobs pass through the environment: VDISK_COPY_WORKERS, VDISK_COPY_UNIT,
#      VDISK_COPY_NICE, VDISK_COPY_GUEST_PRIORITY, VDISK_COPY_GUEST_FLOOR, VDISK_COPY_GUEST_CONVERGE,
#      VDISK_COPY_WRITEBACK
#      (docs/concurrency.md, docs/guest-priority.md).
#      Re-render the markdown from a saved json: bench/jobs_bench.py --report-only bench/out/jobs.json
# Needs: qemu-storage-daemon, qemu-img, fio with the nbd engine, python3, perf (optional), and
# ~2.5 GiB * scale of disk for the cached chain plus ~5 GiB * scale for a run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VDISKD="${VDISKD:-$ROOT/build/src/tools/vdiskd}"
[ -x "$VDISKD" ] || { echo "bench-jobs: $VDISKD not found; run 'make' first (or set VDISKD)" >&2; exit 2; }
for t in fio qemu-img qemu-storage-daemon; do
    command -v "$t" >/dev/null || { echo "bench-jobs: $t missing" >&2; exit 2; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench-jobs: this fio has no nbd engine" >&2; exit 2; }
exec /usr/bin/python3 "$ROOT/bench/jobs_bench.py" \
    --vdiskd "$VDISKD" \
    --work "${BENCH_JOBS_WORK:-/var/tmp/vdisk-bench-jobs}" \
    --out "$ROOT/bench/out" \
    --scale "${BENCH_JOBS_SCALE:-1}" \
    --seed "${BENCH_JOBS_SEED:-20261125}" \
    --reps "${BENCH_JOBS_REPS:-1}" \
    --loads "${BENCH_JOBS_LOADS:-idle,capped,uncapped}" \
    --only "${BENCH_JOBS_ONLY:-}" \
    --rate-iops "${BENCH_JOBS_RATE_IOPS:-2000}" \
    --fio-secs "${BENCH_JOBS_FIO_SECS:-10}" \
    --ramp "${BENCH_JOBS_RAMP:-1}" \
    --complete-after "${BENCH_JOBS_COMPLETE_AFTER:-0}" \
    --timeout "${BENCH_JOBS_TIMEOUT:-0}" \
    --daemons "${BENCH_JOBS_DAEMONS:-vdiskd,qsd}" \
    --note "${BENCH_JOBS_NOTE:-}" \
    --tag "${BENCH_JOBS_TAG:-}" \
    --perf-loads "${BENCH_JOBS_PERF_LOADS:-idle}" \
    --perf-callgraph "${BENCH_JOBS_PERF_CALLGRAPH:-dwarf,8192}" \
    --perf-freq "${BENCH_JOBS_PERF_FREQ:-499}" \
    --perf-kinds "${BENCH_JOBS_PERF_KINDS:-mirror}" \
    $([ "${BENCH_JOBS_PERF_TRACE:-0}" = 1 ] && echo --perf-trace) \
    $([ "${BENCH_JOBS_PERF:-0}" = 1 ] && echo --perf) \
    $([ "${BENCH_JOBS_VERIFY:-1}" = 0 ] && echo --no-verify)
