"""Persistent dirty bitmaps in qcow2 images (the bitmaps extension), with QEMU as the oracle.

Bitmaps QEMU created are kept and tracked by vdisk's writes; a writable open marks them in use
(so kill -9 leaves them inconsistent, as QEMU's would be); a clean close stores them; damaged
directories are refused without touching the file.
"""
import random
import struct
import subprocess

import pytest

import bitmap_helpers as B
import nbd_helpers as H
from conftest import (assert_not_crashed, assert_qemu_check_clean, qemu_img, qemu_io, sha256, vdisk,
                      vdisk_io)

MiB = 1 << 20
SIZE = 64 * MiB


def make_image(tmp, name="img.qcow2", size=SIZE, bitmaps=(("b0", None, True),)):
    path = str(tmp / name)
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    for bname, gran, enabled in bitmaps:
        args = ["bitmap", "--add"]
        if gran:
            args += ["-g", gran]
        if not enabled:
            args.append("--disable")
        qemu_img(*args, path, bname)
    return path


def random_ops(rng, n, size=SIZE):
    ops = []
    for _ in range(n):
        off = rng.randrange(0, size - 1)
        length = rng.randrange(1, min(300 * 1024, size - off) + 1)
        kind = rng.choice(["write", "write", "zero", "discard"])
        ops.append((kind, off, length))
    return ops


def op_cmd(op):
    kind, off, length = op
    if kind == "write":
        return f"write -P {off % 251} {off} {length}"
    if kind == "zero":
        return f"write -z {off} {length}"
    return f"discard {off} {length}"


def test_vdisk_writes_set_qemu_bitmaps_exactly(tmp):
    """Every write, write-zeroes and discard by `vdisk io` sets its granules in each enabled
    bitmap QEMU created (any granularity), and nothing else; a disabled bitmap stays clean."""
    path = make_image(tmp, bitmaps=(("b0", None, True), ("b4k", 4096, True),
                                    ("off", 65536, False)))
    rng = random.Random(9)
    ops = random_ops(rng, 40)
    vdisk_io(path, [op_cmd(o) for o in ops])
    want64, want4 = set(), set()
    for _, off, length in ops:
        want64 |= B.granules(off, length, 65536)
        want4 |= B.granules(off, length, 4096)
    assert B.qemu_dirty_granules(path, "b0", 65536) == want64
    assert B.qemu_dirty_granules(path, "b4k", 4096) == want4
    assert B.qemu_dirty_granules(path, "off", 65536) == set()
    assert B.qemu_bitmaps(path) == {"b0": (65536, ["auto"]), "b4k": (4096, ["auto"]),
                                    "off": (65536, [])}
    assert_qemu_check_clean(path)


def test_bits_accumulate_across_opens_and_qemu_writes(tmp):
    """Bits stored by vdisk survive a QEMU write session and the reverse: both tools add to the
    same bitmap."""
    path = make_image(tmp)
    vdisk_io(path, ["write -P 1 0 4k"])
    qemu_img("bitmap", "--add", path, "later")  # QEMU rewrites the directory vdisk stored
    qemu_io("-f", "qcow2", "-c", f"write -P 2 {10 * MiB} 4k", path)
    vdisk_io(path, ["write -P 3 %d 128k" % (20 * MiB)])
    assert B.qemu_dirty_granules(path, "b0", 65536) == {0, 160, 320, 321}
    assert B.qemu_dirty_granules(path, "later", 65536) == {160, 320, 321}
    assert_qemu_check_clean(path)


def test_qemu_img_bitmap_operations_are_read_by_vdisk(tmp):
    """Images changed by qemu-img bitmap --merge/--clear/--enable/--disable/--remove read the same
    in `vdisk info`, and vdisk keeps tracking the enabled ones."""
    path = make_image(tmp, bitmaps=(("a", None, True), ("b", 4096, True), ("c", None, True)))
    vdisk_io(path, ["write -P 1 0 4k"])
    qemu_img("bitmap", "--disable", path, "a")
    qemu_img("bitmap", "--clear", path, "b")
    qemu_img("bitmap", "--remove", path, "c")
    qemu_img("bitmap", "--add", "--disable", path, "m")
    qemu_img("bitmap", "--merge", "a", path, "m")
    qemu_img("bitmap", "--enable", path, "m")
    assert vdisk("info", path).stdout == qemu_img("info", path).stdout
    assert vdisk("info", "--output=json", path).stdout == \
        qemu_img("info", "--output=json", path).stdout
    vdisk_io(path, ["write -P 2 %d 4k" % (2 * MiB)])
    assert B.qemu_dirty_granules(path, "a", 65536) == {0}
    assert B.qemu_dirty_granules(path, "b", 4096) == {512}
    assert B.qemu_dirty_granules(path, "m", 65536) == {0, 32}
    assert_qemu_check_clean(path)


def test_vdisk_resize_keeps_bitmaps_valid(tmp):
    """A resize keeps the bitmaps: QEMU reads them at the new size with the old bits."""
    path = make_image(tmp, size=8 * MiB)
    vdisk_io(path, ["write -P 1 %d 64k" % (7 * MiB)])
    vdisk("resize", path, "+8M")
    vdisk_io(path, ["write -P 1 %d 4k" % (15 * MiB)])
    assert B.qemu_dirty_granules(path, "b0", 65536) == {112, 240}
    assert qemu_img("info", "--output=json", path).stdout.count('"virtual-size": 16777216')
    assert_qemu_check_clean(path)


def test_daemon_marks_bitmaps_in_use_and_kill9_leaves_them_inconsistent(tmp):
    """While vdiskd holds an image read-write its bitmaps are in use on disk (qemu-img info -U
    shows it); kill -9 leaves them so, QEMU's check stays clean, and the next open reports them
    inconsistent and keeps them (they are never silently wrong)."""
    path = make_image(tmp)
    d = H.start_daemon(tmp, path, fmt="qcow2")
    try:
        assert B.qemu_bitmaps(path) == {"b0": (65536, ["auto", "in-use"])}
        qemu_io("-f", "raw", "-c", "write -P 7 0 4k", "-c", "flush", d.uri())
    finally:
        d.proc.kill()
        d.kill()
    assert B.qemu_bitmaps(path) == {"b0": (65536, ["auto", "in-use"])}
    assert_qemu_check_clean(path)
    # vdisk opens it, writes, closes: the inconsistent bitmap stays in use, untouched
    vdisk_io(path, ["write -P 5 %d 4k" % MiB])
    assert B.qemu_bitmaps(path) == {"b0": (65536, ["auto", "in-use"])}
    assert_qemu_check_clean(path)
    # QEMU can remove it; vdisk then sees none
    qemu_img("bitmap", "--remove", path, "b0")
    assert '"bitmaps"' not in vdisk("info", "--output=json", path).stdout


def test_daemon_tracks_concurrent_nbd_writers_and_stores_on_stop(tmp):
    """Four NBD clients (qemu-io) write at once; after a clean stop the bitmap QEMU reads is exactly the
    granules they wrote (a model kept by the writers), no longer in use."""
    path = make_image(tmp, bitmaps=(("b0", None, True), ("fine", 4096, True)))
    d = H.start_daemon(tmp, path, fmt="qcow2")
    rng = random.Random(4)
    written, procs = [], []
    try:
        for i in range(4):
            cmds = []
            for _ in range(60):
                off = rng.randrange(0, SIZE - 1)
                n = rng.randrange(1, min(128 * 1024, SIZE - off) + 1)
                cmds.append(f"write -z {off} {n}" if rng.random() < 0.2
                            else f"write -P {i + 1} {off} {n}")
                written.append((off, n))
            args = ["qemu-io", "-f", "raw"]
            for c in cmds:
                args += ["-c", c]
            procs.append(subprocess.Popen(args + [d.uri()], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        assert d.stop() == 0, d.output()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        d.kill()
    want64, want4 = set(), set()
    for off, n in written:
        want64 |= B.granules(off, n, 65536)
        want4 |= B.granules(off, n, 4096)
    assert B.qemu_bitmaps(path) == {"b0": (65536, ["auto"]), "fine": (4096, ["auto"])}
    assert B.qemu_dirty_granules(path, "b0", 65536) == want64
    assert B.qemu_dirty_granules(path, "fine", 4096) == want4
    assert_qemu_check_clean(path)


def test_stale_extension_is_dropped_as_qemu_does(tmp):
    """A bitmaps extension whose autoclear bit a program without bitmap support cleared is stale:
    vdisk's first writable open drops it, exactly as QEMU does to a copy of the same file
    (same info, same check verdict: leaked clusters)."""
    path = make_image(tmp)
    vdisk_io(path, ["write -P 1 0 4k"])
    B.patch(path, 88, struct.pack(">Q", 0))  # autoclear: bitmaps bit cleared
    ref = str(tmp / "ref.qcow2")
    with open(path, "rb") as a, open(ref, "wb") as b:
        b.write(a.read())
    vdisk_io(path, ["write -P 2 %d 4k" % MiB])
    qemu_io("-f", "qcow2", "-c", f"write -P 2 {MiB} 4k", ref)
    assert B.qemu_bitmaps(path) == B.qemu_bitmaps(ref) == {}
    assert B.bitmap_ext(path) is None and B.bitmap_ext(ref) is None
    pv = qemu_img("check", path, check=False)
    pr = qemu_img("check", ref, check=False)
    assert pv.returncode == pr.returncode == 3, (pv.stdout, pr.stdout)
    assert pv.stdout.split("\n")[0] == pr.stdout.split("\n")[0]


def damage_cases(path):
    """(description, file offset, bytes) for one corruption each of a one-bitmap image."""
    ext_off, nb, size, doff = B.bitmap_ext(path)
    return [
        ("directory past the end of the file", ext_off + 16, struct.pack(">Q", 1 << 40)),
        ("misaligned directory", ext_off + 16, struct.pack(">Q", doff + 8)),
        ("zero bitmaps", ext_off, struct.pack(">I", 0)),
        ("directory size too small", ext_off + 8, struct.pack(">Q", 8)),
        ("directory size too large", ext_off + 8, struct.pack(">Q", 1 << 40)),
        ("two bitmaps announced, one stored", ext_off, struct.pack(">I", 2)),
        ("name size zero", doff + 18, struct.pack(">H", 0)),
        ("name runs past the directory", doff + 18, struct.pack(">H", 1000)),
        ("granularity 2^40", doff + 17, bytes([40])),
        ("unknown type", doff + 16, bytes([7])),
        ("unknown flag", doff + 12, struct.pack(">I", 0x80 | 2)),
        ("wrong table size", doff + 8, struct.pack(">I", 5)),
        ("table past the end", doff, struct.pack(">Q", 1 << 40)),
        ("misaligned table", doff, struct.pack(">Q", 512)),
        ("extension length", ext_off - 4, struct.pack(">I", 16)),
    ]


@pytest.mark.parametrize("case", range(15))
def test_damaged_directory_refused_file_untouched(tmp, case):
    """A damaged bitmap directory: vdisk info, io and resize fail with one clear error line,
    never crash, and leave the file byte for byte as it was."""
    path = make_image(tmp)
    vdisk_io(path, ["write -P 1 0 64k"])  # a table with a data cluster
    what, off, data = damage_cases(path)[case]
    B.patch(path, off, data)
    before = sha256(path)
    for args in (["info", path], ["io", "-c", "write 0 4k", path], ["resize", path, "+1M"],
                 ["io", "-r", "-c", "read 0 4k", path]):
        p = vdisk(*args, check=False)
        assert_not_crashed(p)
        assert p.returncode != 0, f"{what}: vdisk {args[0]} accepted it\n{p.stdout}"
        assert "bitmap" in p.stderr.lower(), f"{what}: {p.stderr}"
        assert len(p.stderr.strip().split("\n")) == 1, p.stderr
    assert sha256(path) == before, what


def test_damaged_table_entry_refused(tmp):
    """A reserved bit in a bitmap table entry is refused at open like any other damage."""
    path = make_image(tmp)
    vdisk_io(path, ["write -P 1 0 64k"])
    _, _, _, doff = B.bitmap_ext(path)
    with open(path, "rb") as f:
        f.seek(doff)
        table = struct.unpack(">Q", f.read(8))[0]
    B.patch(path, table, struct.pack(">Q", 0x2))
    before = sha256(path)
    p = vdisk("io", "-c", "write 0 4k", path, check=False)
    assert_not_crashed(p)
    assert p.returncode != 0 and "bitmap" in p.stderr
    assert sha256(path) == before
