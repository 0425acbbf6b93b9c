"""blockdev-backup: a point-in-time copy while NBD clients write. The oracle for content is the
source as it was at the job's start (converted to raw before vdiskd opened it) and a model of the
guests' writes; qemu-img compare checks both, qemu-img check the images; argument errors are
compared with qemu-storage-daemon 7.2's.
"""
import json
import random
import shutil
import subprocess

import bitmap_helpers as B
import pytest
from conftest import assert_qemu_check_clean, qemu_img, qemu_io_cmds
from qmp_client import file_node, fmt_node, start_vdiskd

MiB = 1 << 20
SIZE = 16 * MiB


def source_image(tmp, name="src.qcow2", size=SIZE, seed=1):
    """A qcow2 image with data scattered over it (and holes), and its raw copy ref.raw."""
    path = tmp / name
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    rng = random.Random(seed)
    cmds = [f"write -P {rng.randrange(1, 255)} {rng.randrange(0, size // 4096) * 4096} "
            f"{rng.randrange(1, 64) * 4096}" for _ in range(60)]
    cmds = [c for c in cmds if int(c.split()[3]) + int(c.split()[4]) <= size]
    qemu_io_cmds(path, cmds)
    return path


def snapshot_raw(path, out):
    qemu_img("convert", "-O", "raw", path, out)
    return out


def assert_same(img, ref, fmt="qcow2", ref_fmt="raw"):
    p = qemu_img("compare", "-f", fmt, "-F", ref_fmt, img, ref, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


class Guest:
    """qemu-io clients writing random data over NBD, and a raw model of what they wrote."""

    def __init__(self, uri, model_path, seed, size=SIZE):
        self.uri, self.model, self.rng, self.size = uri, model_path, random.Random(seed), size
        self.spots = []  # the 64 KiB clusters written so far

    def write(self, nclients=2, per=40, spots=None):
        """Each client's writes go anywhere, or into the (start, length) regions of spots (so
        they hit what the job still has to copy); returns nothing, the model is updated."""
        procs, ops = [], []
        spots = spots or [(0, self.size)]
        for i in range(nclients):
            args = ["qemu-io", "-f", "raw"]
            for _ in range(per):
                # clients write disjoint 4 KiB-aligned slices, so the model is order-free
                start, length = self.rng.choice(spots)
                lo = start // 8192
                k = self.rng.randrange(lo, max(lo + 1, (start + length) // 8192))
                off = (k * 2 + i) * 4096
                self.spots.append((off // 65536 * 65536, 65536))
                ln = 4096 * self.rng.randrange(1, 2)
                pat = self.rng.randrange(1, 255)
                if self.rng.random() < 0.2:
                    args += ["-c", f"write -z {off} {ln}"]
                    ops.append((off, b"\0" * ln))
                else:
                    args += ["-c", f"write -P {pat} {off} {ln}"]
                    ops.append((off, bytes([pat]) * ln))
            procs.append(subprocess.Popen(args + [self.uri], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        # same-offset writes of one client are ordered; of two clients never overlap
        with open(self.model, "r+b") as f:
            for off, data in ops:
                f.seek(off)
                f.write(data)


def daemon(tmp, src, *extra_nodes):
    sock = tmp / "nbd.sock"
    args = ["--blockdev", json.dumps(fmt_node("qcow2", "src", src)),
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=src,name=exp,writable=on"]
    for n in extra_nodes:
        args += ["--blockdev", json.dumps(n)]
    return start_vdiskd(tmp, *args), f"nbd+unix:///exp?socket={sock}"


def run_backup(c, guest, spots=None, **args):
    """Start a backup paused, let the guest write (every write copies before it lands), resume
    while the guest writes again, wait for completion. Returns the completion event."""
    c.cmd("blockdev-backup", **{"job-id": "bk", "device": "src", "target": "tgt", **args})
    c.cmd("block-job-pause", device="bk")
    guest.write(spots=spots)
    c.cmd("block-job-resume", device="bk")
    guest.write(spots=spots)
    ev = c.get_event("BLOCK_JOB_COMPLETED", timeout=120)
    assert ev["data"]["type"] == "backup" and "error" not in ev["data"], ev
    return ev


def test_full_backup_is_the_disk_at_the_start(tmp):
    """sync=full onto an empty qcow2 while two NBD clients write before and during the copy: the
    target equals the disk as it was at the start, byte for byte; the disk equals the start plus
    every write (model); both images check clean."""
    src = source_image(tmp)
    ref = snapshot_raw(src, tmp / "ref.raw")
    model = shutil.copy(ref, tmp / "model.raw")
    tgt = tmp / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", tgt, SIZE)
    d, uri = daemon(tmp, src, fmt_node("qcow2", "tgt", tgt))
    try:
        with d.client() as c:
            ev = run_backup(c, Guest(uri, model, 5), sync="full", speed=8 * MiB)
            assert ev["data"]["len"] == ev["data"]["offset"] == SIZE
            assert c.cmd("query-block-jobs") == []
    finally:
        d.stop_checked()
    assert_same(tgt, ref)
    assert_same(src, model)
    assert_qemu_check_clean(tgt)
    assert_qemu_check_clean(src)


def add_late_writer(c, how):
    """A writable export of the backup's source made after the job started: by block-export-add,
    by nbd-server-add, or of a raw node added over the source (writes reach the source from
    above, through a node the job never saw). Returns the export's name."""
    if how == "block-export-add":
        c.cmd("block-export-add", type="nbd", id="late", node_name="src", name="late",
              writable=True)
    elif how == "nbd-server-add":
        c.cmd("nbd-server-add", device="src", name="late", writable=True)
    else:
        c.cmd("blockdev-add", driver="raw", node_name="over", file="src")
        c.cmd("block-export-add", type="nbd", id="late", node_name="over", name="late",
              writable=True)
    return "late"


@pytest.mark.parametrize("how", ["block-export-add", "nbd-server-add", "raw-node-over-source"])
def test_backup_copies_before_writes_of_an_export_added_after_the_start(tmp, how):
    """A writer that appears after blockdev-backup started (a new export of the source, or of a
    node over it) still copies before write: with the job paused, so that nothing but the
    copy-before-write can save the old data, two NBD clients write all over the disk through the
    late export; after the job completes the target equals the disk at the start (a raw
    snapshot taken before vdiskd opened it) and the disk equals the start plus the writes."""
    src = source_image(tmp, seed=11)
    ref = snapshot_raw(src, tmp / "ref.raw")
    model = shutil.copy(ref, tmp / "model.raw")
    tgt = tmp / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", tgt, SIZE)
    d, uri = daemon(tmp, src, fmt_node("qcow2", "tgt", tgt))
    try:
        with d.client() as c:
            c.cmd("blockdev-backup", job_id="bk", device="src", target="tgt", sync="full",
                  speed=4 * MiB)
            c.cmd("block-job-pause", device="bk")
            late = uri.replace("/exp?", "/" + add_late_writer(c, how) + "?")
            guest = Guest(late, model, 12)
            guest.write(per=60)
            c.cmd("block-job-resume", device="bk")
            guest.write(per=60)
            ev = c.get_event("BLOCK_JOB_COMPLETED", timeout=120)
            assert "error" not in ev["data"], ev
            c.cmd("block-export-del", id="late")
    finally:
        d.stop_checked()
    assert_same(tgt, ref)
    assert_same(src, model)
    assert_qemu_check_clean(tgt)
    assert_qemu_check_clean(src)


def test_top_backup_onto_an_overlay_of_the_base(tmp):
    """sync=top of base <- top onto a new overlay of the same base: the overlay chain reads like
    the disk at the start; only the top's clusters were copied (the rest reads from base)."""
    base = source_image(tmp, "base.qcow2", seed=2)
    top = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io_cmds(top, [f"write -P 9 {MiB} 192k", f"write -P 10 {7 * MiB} 64k"])
    ref = snapshot_raw(top, tmp / "ref.raw")
    model = shutil.copy(ref, tmp / "model.raw")
    tgt = tmp / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tgt)
    d, uri = daemon(tmp, top, {"driver": "qcow2", "node-name": "tgt", "file": file_node(tgt),
                               "backing": None})
    try:
        with d.client() as c:
            run_backup(c, Guest(uri, model, 6), sync="top",
                       spots=[(MiB, 192 * 1024), (7 * MiB, 64 * 1024), (0, SIZE)])
    finally:
        d.stop_checked()
    assert_same(tgt, ref)
    assert_same(top, model)
    allocated = [e for e in json.loads(qemu_img("map", "--output=json", tgt).stdout)
                 if e["depth"] == 0 and e["data"]]
    assert sum(e["length"] for e in allocated) <= 256 * 1024 + 64 * 1024 * 80
    assert_qemu_check_clean(tgt)
    assert base.exists()


def bitmap_count(c, name):
    nodes = c.cmd("query-named-block-nodes", flat=True)
    bms = [n for n in nodes if n["node-name"] == "src"][0].get("dirty-bitmaps") or []
    return [b for b in bms if b["name"] == name][0]["count"]


def test_incremental_backup_chain(tmp):
    """A full backup that syncs bitmap b0, guest writes, then sync=incremental onto an overlay of
    the full backup: the overlay chain reads like the disk at the incremental's start, the
    overlay holds only the written clusters, and b0 is empty again (on-success)."""
    src = source_image(tmp, seed=3)
    qemu_img("bitmap", "--add", src, "b0")
    full, inc = tmp / "full.qcow2", tmp / "inc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", full, SIZE)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2", inc)
    model = snapshot_raw(src, tmp / "model.raw")
    d, uri = daemon(tmp, src, fmt_node("qcow2", "tgt", full),
                    {"driver": "qcow2", "node-name": "inc", "file": file_node(inc),
                     "backing": None})
    guest = Guest(uri, model, 8)
    try:
        with d.client() as c:
            c.cmd("blockdev-backup", **{"job-id": "f", "device": "src", "target": "tgt",
                                        "sync": "full", "bitmap": "b0",
                                        "bitmap-mode": "on-success"})
            c.get_event("BLOCK_JOB_COMPLETED", timeout=120)
            assert bitmap_count(c, "b0") == 0
            guest.write(nclients=1, per=30)
            dirty = bitmap_count(c, "b0")
            assert dirty > 0
            ref = shutil.copy(model, tmp / "ref-inc.raw")  # the disk at the incremental's start
            c.cmd("blockdev-backup", **{"job-id": "i", "device": "src", "target": "inc",
                                        "sync": "incremental", "bitmap": "b0", "speed": 4 * MiB})
            c.cmd("block-job-pause", device="i")
            guest.write(nclients=1, per=10, spots=list(guest.spots))  # over what it must copy
            c.cmd("block-job-resume", device="i")
            ev = c.get_event("BLOCK_JOB_COMPLETED", timeout=120)
            assert "error" not in ev["data"] and ev["data"]["len"] == dirty
            # on-success: b0 now holds the writes made during the incremental job, no more
            assert 0 < bitmap_count(c, "b0") <= 10 * 65536
    finally:
        d.stop_checked()
    assert_same(inc, ref)
    assert_same(src, model)
    # data and zero clusters (written zeroes) of the overlay itself
    inc_data = sum(e["length"] for e in json.loads(qemu_img("map", "--output=json", inc).stdout)
                   if e["depth"] == 0)
    # zeroes written over what already read zero need no copy
    assert 0 < inc_data <= dirty
    assert_qemu_check_clean(inc)


def test_cancelled_incremental_gives_the_bitmap_back(tmp):
    """A cancelled incremental backup (bitmap-mode on-success) leaves b0 with its bits of the
    start plus what was written meanwhile; the bitmap is busy while the job runs."""
    src = source_image(tmp, seed=4)
    qemu_img("bitmap", "--add", src, "b0")
    qemu_io_cmds(src, [f"write -P 1 0 {4 * MiB}"])
    tgt = tmp / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", tgt, SIZE)
    d, _ = daemon(tmp, src, fmt_node("qcow2", "tgt", tgt))
    try:
        with d.client() as c:
            before = bitmap_count(c, "b0")
            assert before == 4 * MiB
            c.cmd("blockdev-backup", **{"job-id": "i", "device": "src", "target": "tgt",
                                        "sync": "incremental", "bitmap": "b0", "speed": 1})
            assert "in use by another operation" in c.error(
                "block-dirty-bitmap-clear", {"node": "src", "name": "b0"})
            c.cmd("block-job-cancel", device="i", force=True)
            ev = c.get_event("BLOCK_JOB_CANCELLED", timeout=60)
            assert ev["data"]["type"] == "backup"
            assert bitmap_count(c, "b0") == before
            c.cmd("block-dirty-bitmap-clear", node="src", name="b0")
    finally:
        d.stop_checked()
    assert B.qemu_bitmaps(src) == {"b0": (65536, ["auto"])}


def error_steps(tmp):
    src, tgt = tmp / "s.qcow2", tmp / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "8M")
    qemu_img("create", "-q", "-f", "qcow2", tgt, "8M")
    qemu_img("bitmap", "--add", src, "b0")

    def bk(**kw):
        return ("blockdev-backup", {"device": "src", "target": "tgt", **kw})
    return [
        ("blockdev-add", fmt_node("qcow2", "src", src)),
        ("blockdev-add", fmt_node("qcow2", "tgt", tgt)),
        bk(sync="bitmap"),
        bk(sync="incremental"),
        bk(sync="incremental", bitmap="nope"),
        bk(sync="none", bitmap="b0"),
        bk(sync="full", bitmap="b0"),
        bk(sync="incremental", bitmap="b0", **{"bitmap-mode": "never"}),
        bk(sync="full", **{"bitmap-mode": "never"}),
        bk(sync="full", device="nx"),
        bk(sync="full", target="nx"),
        bk(sync="full", target="src"),
        bk(sync="full", **{"x-perf": {"max-chunk": "big"}}),
        bk(sync="bitmap", bitmap="b0", **{"bitmap-mode": "never", "job-id": "j1",
                                          "auto-finalize": False}),
        bk(sync="full", **{"job-id": "j2"}),
        ("block-dirty-bitmap-clear", {"node": "src", "name": "b0"}),
    ]


def test_backup_errors_match_qsd(tmp):
    """Argument checks and refusals give qemu-storage-daemon's replies, in its order."""
    B.assert_replies_match_qsd(tmp, error_steps)
