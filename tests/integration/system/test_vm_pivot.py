"""A real VM through a live block copy: qemu-system-x86_64 (TCG) boots a Linux guest whose virtio
disk is nbd+unix://... served by vdiskd; the guest writes and reads /dev/$D continuously (dd with
O_DIRECT, timestamps from /proc/uptime) while the test runs the seed's live copy over QMP --
drive-mirror of base <- sn1 <- sn2 onto an existing active.qcow2 (backed by base) with vdisk's
base-node, then block-job-complete (pivot). The guest must keep running with no I/O error; at the
end it checksums the disk, and the test checks those sums, and the final image file, against a
model of everything the guest wrote. The longest gap between two guest writes around the pivot is
measured (the pivot pause the guest saw) and printed.

Needs Debian packages qemu-system-x86 (with seabios), busybox-static and a kernel image (e.g.
linux-image-cloud-amd64, or the host's /boot/vmlinuz-*); skipped, naming what is missing, without
them. The initramfs (busybox + the virtio modules + /init) is built here, in Python.
"""
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import statistics
import struct
import subprocess
import threading
import time

import pytest

from conftest import qemu_img, qemu_io, assert_qemu_check_clean
from qmp_client import start_vdiskd

MiB = 1 << 20
SIZE = 64 * MiB
BLOCK = 65536
NB = 256            # the guest writes 64 KiB blocks in [0, 16 MiB): over base, sn1 and sn2 data
K = 8               # writes per round
PAT = 0xA0          # block pattern q (0..15) is the byte PAT + q
QEMU = "qemu-system-x86_64"
BUSYBOX = os.environ.get("VDISK_VM_BUSYBOX", "/bin/busybox")
ACCEL = os.environ.get("VDISK_VM_ACCEL", "tcg")
IO_ERRORS = re.compile(r"I/O error|blk_update_request|Buffer I/O error|VDGUEST (DDFAIL|READ MISMATCH)")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.list); do
    insmod "/lib/mod/$m" || echo "VDGUEST INSMOD FAIL $m"
done
i=0
while { [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; } && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vdb ] || { echo "VDGUEST NO DISK"; poweroff -f; }
# vda: the NBD disk under test; vdb: a one-sector control disk the test writes "stop" into.
D=vda; C=vdb
[ "$(cat /sys/block/$D/size)" -lt 64 ] && { D=vdb; C=vda; }
q=0
while [ $q -lt 16 ]; do s=$(md5sum </pat/$q); eval "pm$q=${s%% *}"; q=$((q + 1)); done
now() { read up _ </proc/uptime; c=${up#*.}; T=$(( ${up%.*} * 100 + ${c#0} )); }
echo "VDGUEST READY $(cat /sys/block/$D/size) sectors"
r=0; maxgap=0; maxr=0; errs=0
now; prev=$T
while true; do
    r=$((r + 1)); rmax=0; i=0
    while [ $i -lt @K@ ]; do
        b=$(( (r * 37 + i * 32) % @NB@ )); q=$(( (r + i) % 16 ))
        if ! dd if=/pat/$q of=/dev/$D bs=65536 seek=$b count=1 oflag=direct conv=notrunc \
                2>/tmp/dd.err; then
            echo "VDGUEST DDFAIL round=$r block=$b"; cat /tmp/dd.err; errs=$((errs + 1))
        fi
        now; gap=$((T - prev)); prev=$T
        [ $gap -gt $rmax ] && rmax=$gap
        i=$((i + 1))
    done
    # read back the round's last block, bypassing the page cache
    s=$(dd if=/dev/$D bs=65536 skip=$b count=1 iflag=direct 2>/dev/null | md5sum)
    eval "want=\$pm$q"
    [ "${s%% *}" = "$want" ] || { echo "VDGUEST READ MISMATCH round=$r block=$b"; errs=$((errs + 1)); }
    [ $rmax -gt $maxgap ] && { maxgap=$rmax; maxr=$r; }
    echo "VDGUEST ROUND $r t=$T maxgap_cs=$rmax"
    dd if=/dev/$C of=/tmp/ctl bs=512 count=1 iflag=direct 2>/dev/null
    read -r cmd </tmp/ctl
    [ "$cmd" = stop ] && break
done
sync
echo "VDGUEST STOP rounds=$r maxgap_cs=$maxgap at_round=$maxr errors=$errs"
s=$(dd if=/dev/$D bs=1048576 count=16 iflag=direct 2>/dev/null | md5sum); echo "VDGUEST MD5 region ${s%% *}"
s=$(dd if=/dev/$D bs=1048576 iflag=direct 2>/dev/null | md5sum); echo "VDGUEST MD5 disk ${s%% *}"
echo "VDGUEST DONE"
poweroff -f
""".replace("@K@", str(K)).replace("@NB@", str(NB))


# ------------------------------------------------------------------ what the VM needs

def _is_static_elf(path):
    """True for an ELF64 executable without a PT_INTERP (no dynamic loader needed)."""
    try:
        with open(path, "rb") as f:
            hdr = f.read(64)
            if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
                return False
            phoff, = struct.unpack_from("<Q", hdr, 32)
            phentsize, phnum = struct.unpack_from("<HH", hdr, 54)
            f.seek(phoff)
            ph = f.read(phentsize * phnum)
        return all(struct.unpack_from("<I", ph, i * phentsize)[0] != 3 for i in range(phnum))
    except OSError:
        return False


def _module_plan(kver):
    """Ordered module files for virtio-pci + virtio-blk (builtin ones are skipped), or None."""
    p = subprocess.run(["modprobe", "-S", kver, "-a", "--show-depends", "virtio_pci",
                        "virtio_blk"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return None
    out = []
    for line in p.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "insmod" and parts[1] not in out:
            out.append(parts[1])
    return out


def find_kernel():
    """(vmlinuz, [module paths]) for a kernel whose virtio modules are installed, else a reason."""
    cands = [os.environ["VDISK_VM_KERNEL"]] if os.environ.get("VDISK_VM_KERNEL") else \
        sorted(glob.glob("/boot/vmlinuz-*"), reverse=True)
    if not cands:
        return None, "no guest kernel (/boot/vmlinuz-*): apt-get install linux-image-cloud-amd64"
    if not shutil.which("modprobe"):
        return None, "modprobe (kmod) not installed"
    for k in cands:
        kver = os.path.basename(k).replace("vmlinuz-", "", 1)
        mods = _module_plan(kver)
        if mods is not None and os.access(k, os.R_OK):
            return (k, mods), None
    return None, (f"no kernel among {cands} has its virtio modules in /lib/modules: "
                  "apt-get install linux-image-cloud-amd64")


def requirements():
    if not shutil.which(QEMU):
        return None, f"{QEMU} not installed: apt-get install qemu-system-x86"
    if not glob.glob("/usr/share/seabios/bios*.bin") and not os.path.exists(
            "/usr/share/qemu/bios-256k.bin"):
        return None, "no x86 BIOS for QEMU: apt-get install seabios"
    if not _is_static_elf(BUSYBOX):
        return None, f"{BUSYBOX} is not a static busybox: apt-get install busybox-static"
    return find_kernel()


def _module_bytes(path):
    data = open(path, "rb").read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", path], capture_output=True, check=True).stdout
    return data


def build_initramfs(path, modules):
    """A newc cpio (written here: no root or mknod needed for /dev/console) with busybox, the
    modules, the 16 pattern files and /init."""
    entries = []  # (name, mode, data, rdev major, minor)

    def d(name):
        entries.append((name, 0o040755, b"", 0, 0))

    def f(name, data, mode=0o100644):
        entries.append((name, mode, data, 0, 0))

    for n in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/mod", "pat"):
        d(n)
    entries.append(("dev/console", 0o020600, b"", 5, 1))
    f("bin/busybox", open(BUSYBOX, "rb").read(), 0o100755)
    f("init", INIT.encode(), 0o100755)
    names = []
    for m in modules:
        name = re.sub(r"\.(xz|gz|zst)$", "", os.path.basename(m))
        f("lib/mod/" + name, _module_bytes(m))
        names.append(name)
    f("modules.list", ("\n".join(names) + "\n").encode())
    for q in range(16):
        f(f"pat/{q}", bytes([PAT + q]) * BLOCK)
    out = bytearray()
    for ino, (name, mode, data, major, minor) in enumerate(entries + [("TRAILER!!!", 0, b"", 0, 0)],
                                                           1):
        nm = name.encode() + b"\0"
        out += b"070701" + b"".join(b"%08X" % v for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(nm), 0))
        out += nm
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    with open(path, "wb") as fh:
        fh.write(out)


# ------------------------------------------------------------------ the guest's console

class Console:
    """Reads the VM's serial console (stdout) in a thread; every line gets a host timestamp."""

    def __init__(self, proc, logpath):
        self.proc = proc
        self.lines = []      # (host monotonic time, text)
        self.cv = threading.Condition()
        self.log = open(logpath, "w")
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        for raw in self.proc.stdout:
            text = raw.decode(errors="replace").rstrip("\r\n")
            with self.cv:
                self.lines.append((time.monotonic(), text))
                self.log.write(text + "\n")
                self.log.flush()
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def text(self):
        with self.cv:
            return "\n".join(t for _, t in self.lines)

    def wait_for(self, pattern, timeout, after=0):
        """First line matching pattern with index >= after: (index, match)."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                for i in range(after, len(self.lines)):
                    m = rx.search(self.lines[i][1])
                    if m:
                        return i, m
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.t.is_alive()):
                    raise AssertionError(f"guest console: no /{pattern}/ within {timeout}s "
                                         f"(qemu rc={self.proc.poll()}):\n" + self.text()[-4000:])
                self.cv.wait(min(left, 0.5))

    def rounds(self):
        """[(host time, round, t_cs, maxgap_cs)] from the guest's ROUND lines."""
        out = []
        with self.cv:
            for ts, t in self.lines:
                m = re.search(r"VDGUEST ROUND (\d+) t=(\d+) maxgap_cs=(\d+)", t)
                if m:
                    out.append((ts, int(m.group(1)), int(m.group(2)), int(m.group(3))))
        return out

    def run_for(self, seconds, rounds, timeout=60):
        """Let the guest write for at least seconds and at least rounds more rounds."""
        t0 = time.monotonic()
        self.wait_rounds(rounds, timeout)
        while time.monotonic() - t0 < seconds:
            assert self.proc.poll() is None, "qemu exited:\n" + self.text()[-3000:]
            time.sleep(0.1)

    def wait_rounds(self, n, timeout):
        """Wait until n more ROUND lines than now were printed; returns the last round number."""
        have = len(self.rounds())
        end = time.monotonic() + timeout
        while len(self.rounds()) < have + n:
            assert time.monotonic() < end, "guest stopped writing:\n" + self.text()[-3000:]
            assert self.proc.poll() is None, "qemu exited:\n" + self.text()[-3000:]
            with self.cv:
                self.cv.wait(0.5)
        return self.rounds()[-1][1]


# ------------------------------------------------------------------ the test

def guest_write(m, r, i):
    """The guest's i-th write of round r, applied to the model m (a bytearray)."""
    b, q = (r * 37 + i * 32) % NB, (r + i) % 16
    m[b * BLOCK:(b + 1) * BLOCK] = bytes([PAT + q]) * BLOCK


def model_after(initial, rounds):
    m = bytearray(initial)
    for r in range(1, rounds + 1):
        for i in range(K):
            guest_write(m, r, i)
    return bytes(m)


def source_frozen_at_pivot(src, initial, r_before, r_after):
    """True when src is the guest's disk after some write between the end of round r_before (the
    last one finished before block-job-complete) and the end of round r_after (the first one that
    finished after the pivot): the source got every write up to the pivot and none after."""
    m = bytearray(model_after(initial, r_before))
    if src == m:
        return True
    for r in range(r_before + 1, r_after + 1):
        for i in range(K):
            guest_write(m, r, i)
            if src == m:
                return True
    return False


def make_chain(tmp):
    """base <- sn1 <- sn2 (64 MiB) with data in every layer, written by QEMU's qemu-io."""
    base, sn1, sn2 = tmp / "base.qcow2", tmp / "sn1.qcow2", tmp / "sn2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 0xaa 0 {4 * MiB}", "-c",
            f"write -P 0xbb {20 * MiB} {4 * MiB}", "-c", f"write -P 0xcc {60 * MiB} {4 * MiB}", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", sn1)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 {2 * MiB} {4 * MiB}", "-c",
            f"write -z {21 * MiB} {MiB}", sn1)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "sn1.qcow2", "-F", "qcow2", sn2)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x22 {12 * MiB} {8 * MiB}", "-c",
            f"write -P 0x33 {40 * MiB} {2 * MiB}", sn2)
    ref = tmp / "initial.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", sn2, ref)
    return base, sn2, ref.read_bytes()


def base_node_name(q, base):
    for n in q.cmd("query-named-block-nodes"):
        if n["drv"] == "qcow2" and os.path.realpath(n["file"]) == os.path.realpath(base):
            return n["node-name"]
    raise AssertionError("base.qcow2 is not a node of the daemon")


def first_diff(a, b):
    for i in range(0, min(len(a), len(b)), BLOCK):
        if a[i:i + BLOCK] != b[i:i + BLOCK]:
            return f"first differing 64K block at {i:#x}: got {a[i]:#x}.. want {b[i]:#x}.."
    return "lengths differ"


def test_vm_keeps_running_through_pivot(tmp):
    what, reason = requirements()
    if what is None:
        pytest.skip(reason)
    kernel, modules = what
    t_start = time.monotonic()
    initrd = tmp / "initrd.cpio"
    build_initramfs(initrd, modules)
    base, sn2, initial = make_chain(tmp)
    active = tmp / "active.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", active, SIZE)

    nbd = str(tmp / "nbd.sock")
    d = start_vdiskd(tmp, "-v", "--blockdev", json.dumps({
        "driver": "qcow2", "node-name": "disk0",
        "file": {"driver": "file", "filename": str(sn2)}}),
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
    ctl = tmp / "ctl.raw"    # the guest polls its first line; "stop" ends its loop
    ctl.write_bytes(bytes(4096))
    q = vm = None
    try:
        q = d.client()
        assert "drive-mirror" in {c["name"] for c in q.cmd("query-commands")}, \
            "this vdiskd does not register drive-mirror"
        end = time.time() + 10
        while not os.path.exists(nbd):
            assert time.time() < end, d.output()
            time.sleep(0.02)
        bnode = base_node_name(q, base)

        argv = [QEMU, "-machine", f"pc,accel={ACCEL}", "-m", "256", "-smp", "1", "-nodefaults",
                "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio",
                "-kernel", kernel, "-initrd", str(initrd),
                "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
                "-drive", f"file=nbd+unix:///disk0?socket={nbd},format=raw,if=virtio,cache=none",
                "-drive", f"file={ctl},format=raw,if=virtio"]
        vm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        con = Console(vm, str(tmp / "console.log"))
        con.wait_for(r"VDGUEST READY", timeout=90)
        t_ready = time.monotonic()
        con.wait_rounds(3, timeout=30)

        # The seed's live copy: sn1+sn2 onto active (backed by base), pivot.
        q.cmd("drive-mirror", job_id="vm", device="disk0", target=str(active), mode="existing",
              format="qcow2", sync="full", base_node=bnode, speed=MiB)
        t_mirror = time.monotonic()
        # 15 MiB above base at 1 MiB/s (>= 15 s): the guest writes while the copy runs, and its 3
        # rounds fit in the copy however slow TCG is on a loaded machine (at 4 MiB/s, 3.75 s, a
        # slow guest round let the job get READY first); then full speed (the guest dirties
        # several MiB/s, re-copied each time: a rate limit could starve it).
        con.run_for(1.5, 3)
        assert q.cmd("query-block-jobs")[0]["ready"] is False
        q.cmd("block-job-set-speed", device="vm", speed=0)
        ready = q.get_event("BLOCK_JOB_READY", timeout=60)
        t_synced = time.monotonic()
        assert ready["data"]["device"] == "vm"
        con.run_for(1.0, 3)                 # mirrored writes while ready
        t_complete = time.monotonic()
        q.cmd("block-job-complete", device="vm")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=60)
        t_pivot = time.monotonic()
        assert "error" not in done["data"], done
        con.run_for(2.0, 3)                 # the guest goes on, on active.qcow2 now
        # The export now serves active.qcow2, whose backing is base.
        names = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        exports = q.cmd("query-block-exports")
        assert len(exports) == 1, exports
        top = names[exports[0]["node-name"]]
        assert os.path.realpath(top["file"]) == os.path.realpath(active), top
        assert os.path.realpath(top["image"]["backing-image"]["filename"]) == \
            os.path.realpath(base), top

        with open(ctl, "r+b") as f:
            f.write(b"stop\n")
            f.flush()
            os.fsync(f.fileno())
        _, stop = con.wait_for(r"VDGUEST STOP rounds=(\d+) maxgap_cs=(\d+) at_round=(\d+) "
                               r"errors=(\d+)", timeout=60)
        _, md5_region = con.wait_for(r"VDGUEST MD5 region ([0-9a-f]{32})", timeout=60)
        _, md5_disk = con.wait_for(r"VDGUEST MD5 disk ([0-9a-f]{32})", timeout=60)
        con.wait_for(r"VDGUEST DONE", timeout=30)
        vm.wait(timeout=30)
        con.t.join(5)
        console = con.text()

        bad = [ln for ln in console.splitlines() if IO_ERRORS.search(ln)]
        assert not bad, "the guest saw I/O errors:\n" + "\n".join(bad[:20])
        assert int(stop.group(4)) == 0, console[-3000:]
        assert "INSMOD FAIL" not in console, console

        rounds = int(stop.group(1))
        model = model_after(initial, rounds)
        assert md5_region.group(1) == hashlib.md5(model[:NB * BLOCK]).hexdigest(), \
            "the guest's final read of its 16 MiB region differs from the model"
        assert md5_disk.group(1) == hashlib.md5(model).hexdigest(), \
            "the guest's final read of the whole disk differs from the model"

        # The pause the guest saw: the longest gap between two of its writes in the rounds that
        # ran while the pivot happened, against the usual gap.
        rs = con.rounds()
        around = [g for ts, r, t, g in rs if t_complete <= ts <= t_pivot + 2.0]
        # the round printed after the pivot may have started before it: include the next one
        after = [g for ts, r, t, g in rs if ts > t_pivot][:1]
        normal = [g for ts, r, t, g in rs if ts < t_mirror]
        copying = [g for ts, r, t, g in rs if t_mirror < ts <= t_synced]
        assert copying, "no guest round completed while the mirror was copying"
        pivot_gap = max(around + after) * 10
        median = statistics.median(normal) * 10 if normal else 0
        m = re.search(r"guest I/O paused ([\d.]+) ms", d.output())
        print(f"\nVM pivot: boot to READY {t_ready - t_start:.1f}s (incl. image setup); "
              f"mirror to ready {t_synced - t_mirror:.1f}s ({len(copying)} guest rounds, longest "
              f"write gap {max(copying) * 10} ms); complete->COMPLETED "
              f"{(t_pivot - t_complete) * 1000:.0f} ms; guest rounds {rounds}; "
              f"longest write gap around the pivot {pivot_gap} ms (usual max per round "
              f"{median:.0f} ms, 10 ms resolution, includes dd's fork/exec under TCG); "
              f"vdiskd says guest I/O paused {m.group(1) if m else '?'} ms")
        assert pivot_gap < 5000, f"the guest stalled {pivot_gap} ms around the pivot"

        q.close()
        q = None
        d.stop_checked()
    finally:
        if vm is not None and vm.poll() is None:
            vm.kill()
            vm.wait()
        if q is not None:
            q.close()
        d.kill()

    for img in ("base.qcow2", "sn1.qcow2", "sn2.qcow2", "active.qcow2"):
        assert_qemu_check_clean(tmp / img)
    info = json.loads(qemu_img("info", "--output=json", active).stdout)
    assert os.path.realpath(os.path.join(str(tmp), info["backing-filename"])) == \
        os.path.realpath(base), info
    qemu_img("convert", "-f", "qcow2", "-O", "raw", active, tmp / "active.raw")
    got = (tmp / "active.raw").read_bytes()
    assert got == model, first_diff(got, model)
    # The source (sn2) kept the guest's writes up to the pivot, and got none after it.
    r_before = max(r for ts, r, t, g in rs if ts < t_complete)
    r_after = min(r for ts, r, t, g in rs if ts > t_pivot)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", sn2, tmp / "sn2.raw")
    assert source_frozen_at_pivot((tmp / "sn2.raw").read_bytes(), initial, r_before, r_after), \
        f"sn2 is not the guest's disk as of the pivot (between rounds {r_before} and {r_after})"
    # base was shared, not copied: its data outside what sn1/sn2/the guest wrote ([20M, 24M) less
    # sn1's zeroes at 21M, and [60M, 64M)) is not allocated in active.
    amap = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", active).stdout)
    own = [(e["start"], e["start"] + e["length"]) for e in amap if e["depth"] == 0 and e["data"]]
    for lo, hi in ((20 * MiB, 21 * MiB), (22 * MiB, 24 * MiB), (60 * MiB, 64 * MiB)):
        assert not any(s < hi and e > lo for s, e in own), (lo, hi, own)
    print(f"VM pivot test total {time.monotonic() - t_start:.1f}s")
