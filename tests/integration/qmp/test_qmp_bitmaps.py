"""block-dirty-bitmap-add/remove/clear/enable/disable/merge over vdiskd's QMP: replies and errors
compared with qemu-storage-daemon 7.2 command by command; bitmaps tracking live NBD writers and
stored in the image, read back by QEMU's tools."""
import os
import random
import subprocess

import bitmap_helpers as B
from conftest import assert_qemu_check_clean, qemu_img, qemu_io
from qmp_client import file_node, fmt_node, start_qsd, start_vdiskd

MiB = 1 << 20


def images(tmp):
    """q.qcow2 (10M, writable), r.raw (10M), a.qcow2 (20M, opened read-only, with b0 auto and
    b1 disabled at 512 B granularity, as qemu-img bitmap made them)."""
    qemu_img("create", "-q", "-f", "qcow2", tmp / "q.qcow2", "10M")
    qemu_img("create", "-q", "-f", "raw", tmp / "r.raw", "10M")
    qemu_img("create", "-q", "-f", "qcow2", tmp / "a.qcow2", "20M")
    qemu_img("bitmap", "--add", tmp / "a.qcow2", "b0")
    qemu_img("bitmap", "--add", "-g", "512", "--disable", tmp / "a.qcow2", "b1")
    return [
        ("blockdev-add", fmt_node("qcow2", "n0", tmp / "q.qcow2")),
        ("blockdev-add", fmt_node("raw", "r0", tmp / "r.raw")),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ro", "read-only": True,
                          "file": file_node(tmp / "a.qcow2", **{"read-only": True})}),
    ]


STEPS = [
    ("block-dirty-bitmap-add", {"node": "n0", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "nx", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": 256}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": 0}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": 4294967296}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": -1}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": "64k"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "p", "persistent": True,
                                "disabled": True}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "big", "granularity": 2147483648,
                                "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "fine", "granularity": 512}),
    ("block-dirty-bitmap-add", {"node": "r0", "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "r0", "name": "np"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": 1}),
    ("block-dirty-bitmap-add", {"node": "n0"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "q", "persistent": "yes"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "q", "bogus": 1}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "b0", "persistent": True}),
    ("block-dirty-bitmap-remove", {"node": "n0", "name": "zz"}),
    ("block-dirty-bitmap-remove", {"node": "nx", "name": "zz"}),
    ("block-dirty-bitmap-remove", {"node": "n0"}),
    ("block-dirty-bitmap-clear", {"node": "n0", "name": "zz"}),
    ("block-dirty-bitmap-clear", {"node": "n0", "name": "b0", "x": 1}),
    ("block-dirty-bitmap-enable", {"node": "n0", "name": "p"}),
    ("block-dirty-bitmap-disable", {"node": "n0", "name": "p"}),
    ("block-dirty-bitmap-enable", {"node": "n0", "name": "zz"}),
    ("block-dirty-bitmap-disable", {"node": 5, "name": "p"}),
    ("block-dirty-bitmap-clear", {"node": "ro", "name": "b0"}),
    ("block-dirty-bitmap-disable", {"node": "ro", "name": "b0"}),
    ("block-dirty-bitmap-enable", {"node": "ro", "name": "b1"}),
    ("block-dirty-bitmap-remove", {"node": "ro", "name": "b0"}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b0", "bitmaps": ["p"]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b0", "bitmaps": ["nope"]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "nope", "bitmaps": ["p"]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b0",
                                  "bitmaps": [{"node": "ro", "name": "b0"}]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b0",
                                  "bitmaps": [{"node": "nx", "name": "b0"}]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b0",
                                  "bitmaps": [{"node": "r0", "name": "np"}, "fine"]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b0", "bitmaps": [3]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b0", "bitmaps": [{"node": "n0"}]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b0", "bitmaps": "p"}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "b0",
                                  "bitmaps": [{"node": "n0", "name": "p", "x": 1}]}),
    ("block-dirty-bitmap-merge", {"node": "ro", "target": "b0", "bitmaps": ["b1"]}),
    ("block-dirty-bitmap-remove", {"node": "n0", "name": "fine"}),
    ("query-named-block-nodes", {"flat": True}),
]


def test_bitmap_commands_match_qsd(tmp):
    """Every reply (success or error class and text) and the dirty-bitmaps of every node in
    query-named-block-nodes are those of qemu-storage-daemon."""
    B.assert_replies_match_qsd(tmp, lambda t: images(t) + STEPS)


def test_bitmaps_of_the_image_appear_and_persist(tmp):
    """Persistent bitmaps added over QMP reach the image at quit (QEMU lists them, check is
    clean); non-persistent ones do not; a removed persistent bitmap leaves the image at once."""
    path = tmp / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    qemu_img("bitmap", "--add", path, "old")
    d = start_vdiskd(tmp, "--blockdev", f'{{"driver":"qcow2","node-name":"n0","file":'
                                        f'{{"driver":"file","filename":"{path}"}}}}')
    try:
        with d.client() as c:
            nodes = c.cmd("query-named-block-nodes", flat=True)
            n0 = [n for n in nodes if n["node-name"] == "n0"][0]
            assert n0["dirty-bitmaps"] == [{"name": "old", "recording": True,
                                            "persistent": True, "busy": False,
                                            "granularity": 65536, "count": 0}]
            c.cmd("block-dirty-bitmap-add", node="n0", name="keep", persistent=True,
                  granularity=4096)
            c.cmd("block-dirty-bitmap-add", node="n0", name="gone", persistent=True,
                  disabled=True)
            c.cmd("block-dirty-bitmap-add", node="n0", name="mem")
            c.cmd("block-dirty-bitmap-remove", node="n0", name="old")
            # removal is immediate in the image (the others are stored at close), as QEMU
            assert B.qemu_bitmaps(path) == {}
            c.cmd("block-dirty-bitmap-remove", node="n0", name="gone")
    finally:
        d.stop_checked()
    assert B.qemu_bitmaps(path) == {"keep": (4096, ["auto"])}
    assert_qemu_check_clean(path)


def test_live_writers_tracked_then_cleared_merged_and_stored(tmp):
    """Three qemu-io NBD clients write at once while bitmaps record: `count` equals the bytes of
    the granules they wrote (model), a disabled bitmap stays empty, merge gives the union, clear
    empties; at quit QEMU reads the persistent bitmaps with exactly the model's granules."""
    path = tmp / "img.qcow2"
    size = 32 * MiB
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    sock = tmp / "nbd.sock"
    d = start_vdiskd(tmp, "--blockdev", f'{{"driver":"qcow2","node-name":"n0","file":'
                                        f'{{"driver":"file","filename":"{path}"}}}}',
                     "--nbd-server", f"addr.type=unix,addr.path={sock}",
                     "--export", "type=nbd,id=e0,node-name=n0,name=exp,writable=on")
    uri = f"nbd+unix:///exp?socket={sock}"
    rng = random.Random(7)
    written = []

    def writers(n, per):
        procs = []
        for i in range(n):
            args = ["qemu-io", "-f", "raw"]
            for _ in range(per):
                off = rng.randrange(0, size - 1)
                ln = rng.randrange(1, min(100 * 1024, size - off) + 1)
                args += ["-c", f"write -P {i + 1} {off} {ln}"]
                written.append((off, ln))
            procs.append(subprocess.Popen(args + [uri], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err

    def count(c, name):
        nodes = c.cmd("query-named-block-nodes", flat=True)
        bms = [n for n in nodes if n["node-name"] == "n0"][0]["dirty-bitmaps"]
        return [b for b in bms if b["name"] == name][0]["count"]

    def model_bytes(gran, since=0, until=None):
        g = set()
        for off, ln in written[since:until]:
            g |= B.granules(off, ln, gran)
        return g, sum(min(gran, size - x * gran) for x in g)

    try:
        with d.client() as c:
            c.cmd("block-dirty-bitmap-add", node="n0", name="full", persistent=True)
            c.cmd("block-dirty-bitmap-add", node="n0", name="off", persistent=True,
                  disabled=True)
            writers(3, 40)
            first = len(written)
            assert count(c, "full") == model_bytes(65536)[1]
            assert count(c, "off") == 0
            c.cmd("block-dirty-bitmap-add", node="n0", name="inc", persistent=True,
                  granularity=4096)
            writers(3, 20)
            second = len(written)
            assert count(c, "inc") == model_bytes(4096, first)[1]
            c.cmd("block-dirty-bitmap-merge", node="n0", target="off", bitmaps=["inc"])
            assert count(c, "off") == model_bytes(65536, first)[1]
            c.cmd("block-dirty-bitmap-add", node="n0", name="tmp")
            writers(1, 5)
            c.cmd("block-dirty-bitmap-clear", node="n0", name="tmp")
            assert count(c, "tmp") == 0
    finally:
        d.stop_checked()
    assert B.qemu_bitmaps(path) == {"full": (65536, ["auto"]), "off": (65536, []),
                                    "inc": (4096, ["auto"])}
    assert B.qemu_dirty_granules(path, "full", 65536) == model_bytes(65536)[0]
    assert B.qemu_dirty_granules(path, "inc", 4096) == model_bytes(4096, first)[0]
    assert B.qemu_dirty_granules(path, "off", 65536) == model_bytes(65536, first, second)[0]
    assert_qemu_check_clean(path)
    # the reverse direction: QEMU writes, vdisk's stored bitmap keeps counting
    qemu_io("-f", "qcow2", "-c", "write 0 4k", str(path))
    assert 0 in B.qemu_dirty_granules(path, "full", 65536)


def test_inconsistent_bitmap_after_kill9_matches_qsd(tmp):
    """A bitmap left in use by kill -9 opens inconsistent in both daemons: the same flags in
    query-named-block-nodes, the same refusals, and it can be removed (then gone from the image)."""
    path = tmp / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    qemu_img("bitmap", "--add", path, "b0")
    bd = f'{{"driver":"qcow2","node-name":"n0","file":{{"driver":"file","filename":"{path}"}}}}'
    d = start_vdiskd(tmp, "--blockdev", bd)
    d.proc.kill()
    d.proc.wait()
    d.kill()
    assert B.qemu_bitmaps(path) == {"b0": (65536, ["auto", "in-use"])}
    steps = [("blockdev-add", fmt_node("qcow2", "n0", path)),
             ("block-dirty-bitmap-clear", {"node": "n0", "name": "b0"}),
             ("block-dirty-bitmap-enable", {"node": "n0", "name": "b0"}),
             ("block-dirty-bitmap-add", {"node": "n0", "name": "t"}),
             ("block-dirty-bitmap-merge", {"node": "n0", "target": "t", "bitmaps": ["b0"]}),
             ("query-named-block-nodes", {"flat": True})]
    replies = []
    for start, sub in ((start_qsd, "q"), (start_vdiskd, "v")):
        (tmp / sub).mkdir()
        dd = start(tmp / sub)
        try:
            with dd.client() as c:
                replies.append([c.execute(cmd, args) for cmd, args in steps])
        finally:
            dd.kill()
    q, v = replies
    assert q[:-1] == v[:-1]
    bq = [n for n in q[-1]["return"] if n["node-name"] == "n0"][0]["dirty-bitmaps"]
    bv = [n for n in v[-1]["return"] if n["node-name"] == "n0"][0]["dirty-bitmaps"]
    assert bq == bv and {"name": "b0", "recording": False, "persistent": True, "busy": False,
                         "granularity": 65536, "count": 0, "inconsistent": True} in bv
    d = start_vdiskd(tmp, "--blockdev", bd)
    try:
        with d.client() as c:
            c.cmd("block-dirty-bitmap-remove", node="n0", name="b0")
    finally:
        d.stop_checked()
    assert B.qemu_bitmaps(path) == {}
    assert_qemu_check_clean(path)


def test_snapshot_apply_refused_with_bitmaps_as_qemu(tmp):
    """`vdisk snapshot -a` on an image with a bitmap is refused as qemu-img refuses it: the guest
    data, the snapshot and the bitmap stay as they were (reverting would change data behind the
    bitmap's back). Like qemu-img, the read-write open re-stores the bitmap's metadata."""
    from conftest import vdisk
    path = tmp / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "8M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 64k", str(path))
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io("-f", "qcow2", "-c", "write -P 2 0 64k", str(path))
    qemu_img("bitmap", "--add", "--disable", path, "b0")
    pv = vdisk("snapshot", "-a", "s1", path, check=False)
    pq = qemu_img("snapshot", "-a", "s1", path, check=False)
    assert pv.returncode == pq.returncode == 1
    assert pv.stderr.split(": ", 1)[1] == pq.stderr.split(": ", 1)[1]
    qemu_io("-f", "qcow2", "-c", "read -P 2 0 64k", str(path))
    assert B.qemu_bitmaps(path) == {"b0": (65536, [])}
    assert "s1" in qemu_img("snapshot", "-l", path).stdout
    assert_qemu_check_clean(path)
