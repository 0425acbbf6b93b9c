#!/usr/bin/env bash
# demo-live.sh - live block copy, end to end, as in the seed's example (`make demo`, second part).
# base <- sn1 <- sn2 is served by vdiskd over NBD while a "guest" (qemu-io over NBD) keeps writing;
# `vdisk blockcopy --reuse-external --base-node <base>` copies sn1+sn2 onto active.qcow2 (backed by
# base), pivots, and the chain becomes base <- active. Then the guest-visible content is read back
# over NBD and compared with a model of everything the guest wrote; qemu-img checks every image.
# Exits non-zero on any mismatch. Env: VDISK_BUILD (default build/), KEEP=1 keeps the temp dir.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${VDISK_BUILD:-$ROOT/build}"
VDISK="$BUILD/src/tools/vdisk"
VDISKD="$BUILD/src/tools/vdiskd"
for b in "$VDISK" "$VDISKD"; do
    [ -x "$b" ] || { echo "demo-live: $b not found; run 'make' first" >&2; exit 2; }
done
for t in qemu-img qemu-io python3; do
    command -v "$t" >/dev/null || { echo "demo-live: $t is needed (scripts/install-deps.sh)" >&2; exit 2; }
done

WORK="$(mktemp -d /tmp/vdisk-demo-live.XXXXXX)"
DPID="" WPID=""
cleanup() {
    [ -n "$WPID" ] && kill "$WPID" 2>/dev/null && wait "$WPID" 2>/dev/null
    if [ -n "$DPID" ] && kill -0 "$DPID" 2>/dev/null; then
        kill "$DPID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$DPID" 2>/dev/null
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "(kept $WORK)"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cd "$WORK" || exit 2

FAILS=0
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
say() {                                           # print a command as a person would type it
    local a out="$"
    for a in "$@"; do
        case "$a" in "$VDISK") a=vdisk ;; "$VDISKD") a=vdiskd ;; esac
        case "$a" in
            "&"|"# "*|...) out+=" $a" ;;              # shell syntax and comments stay as they are
            *[[:space:]\"\'\#\&\;\?\{\}\$]*|"") out+=" '$a'" ;;
            *) out+=" $a" ;;
        esac
    done
    printf '%s\n' "$out"
}
run() {                                           # print, run, stop the demo if it fails
    say "$@"
    if ! "$@"; then echo "demo-live: command failed: $*" >&2; exit 1; fi
}
verify() {                                        # verify "what" cmd...: quiet unless it fails
    local what="$1"; shift
    local out
    if out="$("$@" 2>&1)"; then
        printf '   ok: %s\n' "$what"
    else
        printf '   FAIL: %s\n   $ %s\n%s\n' "$what" "$*" "$out" | sed 's/^/   /'
        FAILS=$((FAILS + 1))
    fi
}

QMP="$WORK/vdiskd.qmp"
NBD="$WORK/nbd.sock"
URI="nbd+unix:///disk0?socket=$NBD"
echo "vdisk live block copy demo in $WORK using $BUILD"

step "1. The chain the guest runs on: base <- sn1 <- sn2 (64 MiB, data in every layer)"
run "$VDISK" create -q -f qcow2 base.qcow2 64M
run "$VDISK" io -f qcow2 -c 'write -P 0xaa 0 4M' -c 'write -P 0xbb 16M 4M' -c 'write -P 0xcc 60M 4M' base.qcow2
run "$VDISK" create -q -f qcow2 -b base.qcow2 -F qcow2 sn1.qcow2
run "$VDISK" io -f qcow2 -c 'write -P 0x11 2M 4M' -c 'write -z 17M 1M' sn1.qcow2
run "$VDISK" create -q -f qcow2 -b sn1.qcow2 -F qcow2 sn2.qcow2
run "$VDISK" io -f qcow2 -c 'write -P 0x22 5M 3M' -c 'write -P 0x33 40M 2M' sn2.qcow2
run "$VDISK" info --backing-chain sn2.qcow2
# The guest-visible content before the guest starts, read by QEMU's own tool: the model's start.
qemu-img convert -f qcow2 -O raw sn2.qcow2 model.raw || exit 1

step "2. vdiskd serves sn2 (with its chain) over NBD, controlled over QMP"
say "$VDISKD" -v --qmp "$QMP" \
    --blockdev "{\"driver\":\"qcow2\",\"node-name\":\"disk0\",\"file\":{\"driver\":\"file\",\"filename\":\"$WORK/sn2.qcow2\"}}" \
    --nbd-server "addr.type=unix,addr.path=$NBD" \
    --export type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on --pidfile vdiskd.pid "&"
"$VDISKD" -v --qmp "$QMP" \
    --blockdev "{\"driver\":\"qcow2\",\"node-name\":\"disk0\",\"file\":{\"driver\":\"file\",\"filename\":\"$WORK/sn2.qcow2\"}}" \
    --nbd-server "addr.type=unix,addr.path=$NBD" \
    --export type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on \
    --pidfile vdiskd.pid >vdiskd.log 2>&1 &
DPID=$!
for _ in $(seq 100); do                          # the pidfile appears once the export is served
    [ -s vdiskd.pid ] && [ -S "$NBD" ] && [ -S "$QMP" ] && break
    kill -0 "$DPID" 2>/dev/null || { echo "demo-live: vdiskd exited:"; cat vdiskd.log; exit 1; }
    sleep 0.1
done
[ -s vdiskd.pid ] || { echo "demo-live: vdiskd did not start:"; cat vdiskd.log; exit 1; }
export VDISK_SOCKET="$QMP"
echo "export VDISK_SOCKET=$QMP"
run "$VDISK" domblklist --details
# The base's node name, as the daemon named it when it opened the chain (e.g. #block4).
BASE_NODE="$("$VDISK" domblklist --details | awk -v f="$WORK/base.qcow2" '$4 == f { print $2 }')"
[ -n "$BASE_NODE" ] || { echo "demo-live: base.qcow2 not found in the daemon's chain"; exit 1; }
echo "   base.qcow2 is node '$BASE_NODE'"

step "3. A guest writes to the disk over NBD, continuously (qemu-io; every write is logged)"
# One qemu-io run per round (~10 a second), 4 writes of 4K..64K at 512-byte aligned offsets with
# known patterns: about 1.5 MiB/s, well under the copy's bandwidth so the mirror converges.
# A write enters guest.log only after qemu-io reported success; any failure stops the workload.
guest() {
    local round=0 cmds off len pat i
    RANDOM=42
    while [ ! -e stop ]; do
        round=$((round + 1))
        cmds=() lines=""
        for i in 1 2 3 4; do
            len=$(( (RANDOM % 16 + 1) * 4096 ))
            off=$(( (RANDOM * 4 + RANDOM % 4) * 512 % (64 * 1048576 - len) / 512 * 512 ))
            pat=$(( (round * 4 + i) % 255 + 1 ))
            cmds+=(-c "write -P $pat $off $len")
            lines+="$off $len $pat"$'\n'
        done
        if ! out="$(qemu-io -f raw "${cmds[@]}" "$URI" 2>&1)" || \
                grep -qiE 'error|fail' <<<"$out"; then
            echo "round $round FAILED: $out" >guest.err
            return 1
        fi
        printf '%s' "$lines" >>guest.log
        # rename(2) is atomic: a reader never sees the file truncated (empty) mid-update
        echo "$round" >guest.rounds.tmp && mv -f guest.rounds.tmp guest.rounds
        sleep 0.05
    done
}
say qemu-io -f raw -c "write -P PAT OFF LEN" ... "$URI" "# 4 writes a round, in a loop, in the background"
: >guest.log
guest &
WPID=$!
sleep 1
echo "   the guest has done $(cat guest.rounds 2>/dev/null || echo 0) rounds of 4 writes"

step "4. The destination: active.qcow2 backed by base (the part both sides share)"
run "$VDISK" create -q -f qcow2 -b base.qcow2 -F qcow2 active.qcow2
run "$VDISK" info --backing-chain active.qcow2

step "5. Live copy sn1+sn2 onto active while the guest writes, then pivot the guest to it"
# --reuse-external: keep our active.qcow2; --base-node: copy only what lies above base (sn1, sn2)
# and promise active's backing is base; --bandwidth 8 (MiB/s) keeps the copy visible for ~1 s.
R0=$(cat guest.rounds 2>/dev/null || echo 0)
T0=$(date +%s.%N)
run "$VDISK" blockcopy disk0 active.qcow2 --reuse-external --format qcow2 \
    --base-node "$BASE_NODE" --bandwidth 8 --pivot --verbose
T1=$(date +%s.%N)
R1=$(cat guest.rounds 2>/dev/null || echo 0)
printf '   copy + pivot took %.1f s; the guest completed %d rounds meanwhile\n' \
    "$(python3 -c "print($T1 - $T0)")" $((R1 - R0))
grep -o "pivoted to the target.*" vdiskd.log | sed 's/^/   vdiskd: /'
run "$VDISK" domblklist --details
sleep 1                                           # the guest keeps writing, now to active only

step "6. The new chain: base <- active"
run "$VDISK" info -U --backing-chain active.qcow2     # -U: the daemon holds the image
verify "active.qcow2's backing file is base.qcow2" python3 - <<EOF
import json, os, subprocess
i = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", "active.qcow2"],
                              capture_output=True, text=True, check=True).stdout)
b = os.path.join("$WORK", i.get("backing-filename", ""))
assert os.path.realpath(b) == os.path.realpath("$WORK/base.qcow2"), i.get("backing-filename")
EOF

step "7. Stop the guest; check what it sees through the pivoted export against the model"
touch stop
wait "$WPID"; rc=$?; WPID=""
if [ "$rc" -ne 0 ] || [ -e guest.err ]; then
    echo "   FAIL: the guest saw an I/O error:"; cat guest.err 2>/dev/null
    FAILS=$((FAILS + 1))
fi
echo "   the guest did $(cat guest.rounds) rounds, $(wc -l <guest.log) writes in all"
python3 - <<'EOF' || exit 1
# Replay every write the guest logged onto the chain's initial content.
with open("model.raw", "r+b") as m:
    for line in open("guest.log"):
        off, n, pat = map(int, line.split())
        m.seek(off)
        m.write(bytes([pat]) * n)
EOF
say qemu-img compare -f raw -F raw "$URI" model.raw
verify "the guest reads (over NBD, after the pivot) exactly what it wrote" \
    qemu-img compare -f raw -F raw "$URI" model.raw
echo "   and the guest's last write reads back (vdisk io exits 1 on a pattern mismatch):"
set -- $(tail -1 guest.log)
run "$VDISK" io -f raw -c "read -P $3 $1 $2" "$URI"

step "8. Stop vdiskd (flushes and exits 0), then check every image with QEMU's tools"
echo '$ kill $(cat vdiskd.pid)'
kill "$DPID"
wait "$DPID"; rc=$?; DPID=""
verify "vdiskd exited 0" test "$rc" -eq 0
verify "vdiskd's log has no error or sanitizer report" \
    bash -c '! grep -Ei "AddressSanitizer|LeakSanitizer|runtime error:|vdiskd?\[error\]" vdiskd.log'
for img in base sn1 sn2 active; do
    verify "qemu-img check $img.qcow2 is clean" qemu-img check -q "$img.qcow2"
done
verify "qemu-img compare active.qcow2 (base <- active) with the model" \
    qemu-img compare -f qcow2 -F raw active.qcow2 model.raw
verify "vdisk compare active.qcow2 with the model" "$VDISK" compare -q -f qcow2 -F raw active.qcow2 model.raw
verify "base was not copied: active holds only sn1+sn2's data and the guest's writes" \
    python3 - <<'EOF'
# Only sn1/sn2's clusters and the guest's writes may be allocated in active (depth 0).
import json, subprocess
m = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "active.qcow2"],
                              capture_output=True, text=True, check=True).stdout)
own = sum(e["length"] for e in m if e["depth"] == 0 and e["data"])
written = set()
for line in open("guest.log"):
    off, n, _ = map(int, line.split())
    written.update(range(off // 65536, (off + n - 1) // 65536 + 1))
# sn1 + sn2 hold 4M + 1M (zeroes) + 3M + 2M at most; base's 12 MiB must stay in base.
limit = (4 + 1 + 3 + 2) * 1048576 + len(written) * 65536
assert own <= limit, f"active holds {own} bytes of data, more than {limit}"
EOF
say "$VDISK" map --output=json active.qcow2 "# summed up:"
"$VDISK" map --output=json active.qcow2 | python3 -c '
import json, sys
by = {}
for e in json.load(sys.stdin):
    k = "active.qcow2 itself" if e["depth"] == 0 else "base.qcow2 (shared)" if e["data"] else "nowhere (zeroes)"
    by[k] = by.get(k, 0) + e["length"]
for k, v in by.items():
    print(f"   {v / 1048576:6.2f} MiB read from {k}")
'

echo
if [ "$FAILS" -ne 0 ]; then
    echo "demo-live: $FAILS verification(s) FAILED"
    exit 1
fi
echo "demo-live: all verifications passed"
