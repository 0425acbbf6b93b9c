#!/usr/bin/env bash
# demo.sh - an offline, readable tour of vdisk (`make demo`).
# Builds a chain base <- sn1 <- sn2 with data written by `vdisk io`, shows it with info/map, then
# converts, commits, rebases and checks it -- verifying each result with QEMU's own tools
# (qemu-img check / compare, qemu-io read -P). Exits non-zero if any verification fails.
# Env: VDISK (default build/src/tools/vdisk), KEEP=1 keeps the temp dir.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VDISK="${VDISK:-$ROOT/build/src/tools/vdisk}"
if [ ! -x "$VDISK" ]; then
    echo "demo: $VDISK not found; run 'make' first" >&2
    exit 2
fi
for t in qemu-img qemu-io; do
    command -v "$t" >/dev/null || { echo "demo: $t is needed (scripts/install-deps.sh)" >&2; exit 2; }
done

WORK="$(mktemp -d /tmp/vdisk-demo.XXXXXX)"
cleanup() { [ "${KEEP:-0}" = 1 ] && echo "(kept $WORK)" || rm -rf "$WORK"; }
trap cleanup EXIT
cd "$WORK" || exit 2

FAILS=0
if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B="" N=""; fi
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
say() {                                           # print a command as a person would type it
    local a out="$"
    for a in "$@"; do
        [ "$a" = vd ] && a=vdisk
        case "$a" in *[[:space:]]*|"") out+=" '$a'" ;; *) out+=" $a" ;; esac
    done
    printf '%s\n' "$out"
}
show() { say "$@"; "$@"; }                        # print a command, then run it
run() {                                           # print, run, stop the demo if it fails
    say "$@"
    if ! "$@"; then echo "demo: command failed: $*" >&2; exit 1; fi
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
vd() { "$VDISK" "$@"; }

echo "vdisk demo in $WORK using $VDISK"

step "1. A 64 MiB base image, written with vdisk io (qemu-io syntax)"
run vd create -f qcow2 base.qcow2 64M
run vd io -f qcow2 -c 'write -P 0xaa 0 1M' -c 'write -P 0xbb 8M 2M' -c 'write -P 0xcc 60M 4M' base.qcow2
verify "qemu-img check base.qcow2 is clean" qemu-img check -q base.qcow2
verify "qemu-io reads base's patterns" qemu-io -f qcow2 -c 'read -P 0xaa 0 1M' \
    -c 'read -P 0xbb 8M 2M' -c 'read -P 0xcc 60M 4M' -c 'read -P 0 1M 7M' base.qcow2

step "2. Two snapshots on top: sn1 <- sn2 (relative backing names)"
run vd create -f qcow2 -b base.qcow2 -F qcow2 sn1.qcow2
run vd io -f qcow2 -c 'write -P 0x11 512k 1M' -c 'write -z 9M 64k' sn1.qcow2
run vd create -f qcow2 -b sn1.qcow2 -F qcow2 sn2.qcow2
run vd io -f qcow2 -c 'write -P 0x22 1000 3000' -c 'discard 60M 1M' -c 'write -P 0x33 32M 1M' sn2.qcow2
verify "qemu-img check sn1 and sn2 are clean" bash -c 'qemu-img check -q sn1.qcow2 && qemu-img check -q sn2.qcow2'

# What a guest should see through sn2, as a raw model built independently with dd.
python3 - <<'EOF'
MiB = 1 << 20
d = bytearray(64 * MiB)
def w(off, n, b): d[off:off + n] = bytes([b]) * n
w(0, MiB, 0xaa); w(8 * MiB, 2 * MiB, 0xbb); w(60 * MiB, 4 * MiB, 0xcc)   # base
w(512 * 1024, MiB, 0x11); w(9 * MiB, 65536, 0)                            # sn1
w(1000, 3000, 0x22); w(60 * MiB, MiB, 0); w(32 * MiB, MiB, 0x33)          # sn2 (discard: zeroes)
open("expected.raw", "wb").write(d)
EOF
verify "qemu-img compare: sn2 shows the expected guest content" \
    qemu-img compare -f qcow2 -F raw sn2.qcow2 expected.raw
verify "vdisk io read -P through the chain" vd io -f qcow2 -c 'read -P 0x22 1000 3000' \
    -c 'read -P 0x11 524288 1048576' -c 'read -P 0 9M 64k' -c 'read -P 0xbb 10420224 65536' sn2.qcow2

step "3. Inspect the chain"
show vd info --backing-chain sn2.qcow2
show vd map sn2.qcow2
show vd map --output=json sn2.qcow2
verify "vdisk map --output=json agrees with qemu-img map (present/zero/data/depth)" python3 - <<EOF
import json, subprocess
def m(cmd):
    out = {}
    for e in json.loads(subprocess.run(cmd, capture_output=True, check=True, text=True).stdout):
        for p in range(e["start"], e["start"] + e["length"], 65536):
            out[p] = (e["present"], e["zero"], e["data"], e["depth"])
    return out
a = m(["$VDISK", "map", "--output=json", "sn2.qcow2"])
b = m(["qemu-img", "map", "--output=json", "sn2.qcow2"])
bad = [p for p in b if a.get(p) != b[p]]
assert not bad, f"first difference at {bad[0]}: vdisk {a.get(bad[0])} qemu {b[bad[0]]}"
EOF

step "4. Flatten with convert (and a compressed copy)"
run vd convert -O qcow2 sn2.qcow2 flat.qcow2
run vd convert -c -O qcow2 -o compression_type=zstd sn2.qcow2 flat-zstd.qcow2
show ls -ls flat.qcow2 flat-zstd.qcow2
verify "qemu-img check flat and flat-zstd" bash -c 'qemu-img check -q flat.qcow2 && qemu-img check -q flat-zstd.qcow2'
verify "qemu-img compare flat.qcow2 with the model" qemu-img compare -F raw flat.qcow2 expected.raw
verify "qemu-img compare flat-zstd.qcow2 with the model" qemu-img compare -F raw flat-zstd.qcow2 expected.raw

step "5. Commit sn2 into sn1: sn1 now holds sn2's data"
run vd commit sn2.qcow2
verify "qemu-img check sn1 after commit" qemu-img check -q sn1.qcow2
verify "sn1 shows what sn2 showed" qemu-img compare -F raw sn1.qcow2 expected.raw
verify "sn2 (now empty) still shows the same" qemu-img compare -F raw sn2.qcow2 expected.raw

step "6. Safe rebase of sn2 straight onto base (sn1 drops out of its chain)"
run vd rebase -b base.qcow2 -F qcow2 sn2.qcow2
show vd info --backing-chain sn2.qcow2
verify "qemu-img info: sn2's backing file is base.qcow2" bash -c \
    'qemu-img info --output=json sn2.qcow2 | grep -q "\"backing-filename\": \"base.qcow2\""'
verify "qemu-img check sn2 after rebase" qemu-img check -q sn2.qcow2
verify "sn2's guest content is unchanged" qemu-img compare -F raw sn2.qcow2 expected.raw

step "7. vdisk check and vdisk compare"
show vd check sn2.qcow2
verify "vdisk check: every image clean" bash -c "for i in base sn1 sn2 flat flat-zstd; do $VDISK check -q \$i.qcow2 || exit 1; done"
show vd compare sn2.qcow2 flat.qcow2
verify "vdisk compare: sn2 and flat identical" vd compare -q sn2.qcow2 flat.qcow2
verify "vdisk compare: finds a difference from base (exit 1)" bash -c \
    "$VDISK compare -q sn2.qcow2 base.qcow2; test \$? -eq 1"

echo
if [ "$FAILS" -ne 0 ]; then
    echo "demo: $FAILS verification(s) FAILED"
    exit 1
fi
echo "demo: all verifications passed"
