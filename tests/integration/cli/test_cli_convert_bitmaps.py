"""`vdisk convert --bitmaps [--skip-broken-bitmaps]` against qemu-img 7.2's: the persistent dirty
bitmaps of a qcow2 source made by qemu-img bitmap and dirtied by qemu-io reach the target with the
same names, order, granularities, flags and dirty bits (read by qemu-img info and by qemu-nbd +
nbdinfo), the data as qemu-img convert's; QEMU then uses vdisk's bitmaps and vdisk reads
qemu-img's. Refusals give qemu-img's stderr and exit code and create or change nothing.
"""
import json
import os
import shutil
import struct
import subprocess

import pytest

import bitmap_helpers as B
from conftest import VDISK, assert_qemu_check_clean, qemu_img, qemu_io_cmds, sha256, vdisk

MiB = 1 << 20
SIZE = 8 * MiB
IN_USE = 1


def bitmap_list(path):
    """qemu-img info's bitmaps in directory order: [(name, granularity, flags)]."""
    info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return [(b["name"], b["granularity"], b["flags"])
            for b in info["format-specific"]["data"].get("bitmaps", [])]


def dirty_bits(path, bitmaps):
    return {n: B.qemu_dirty_granules(path, n, g) for n, g, _ in bitmaps}


def set_in_use(path, name):
    """Mark bitmap `name` in use in the file, as a writer killed while it held it leaves it."""
    _, nb, size, doff = B.bitmap_ext(path)
    with open(path, "r+b") as f:
        f.seek(doff)
        d = f.read(size)
        o = 0
        for _ in range(nb):
            flags, _, _, nlen, extra = struct.unpack(">IBBHI", d[o + 12:o + 24])
            if d[o + 24 + extra:o + 24 + extra + nlen].decode() == name:
                f.seek(doff + o + 12)
                f.write(struct.pack(">I", flags | IN_USE))
                return
            o += (24 + extra + nlen + 7) // 8 * 8
    raise AssertionError(f"no bitmap {name} in {path}")


@pytest.fixture(scope="module")
def srcdir(tmp_path_factory):
    """src.qcow2: bitmaps in the order a (64k, enabled), tiny (512, enabled), big (1M, disabled),
    c (4k, disabled after its first write), each dirtied by qemu-io writes; broken.qcow2: the
    same with 'tiny' left in use."""
    d = tmp_path_factory.mktemp("bitmaps")
    src = str(d / "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", src, SIZE)
    qemu_img("bitmap", "--add", src, "a")
    qemu_img("bitmap", "--add", "-g", "512", src, "tiny")
    qemu_img("bitmap", "--add", "-g", "1M", "--disable", src, "big")
    qemu_img("bitmap", "--add", "-g", "4k", src, "c")
    qemu_io_cmds(src, ["write -P 1 0 8k", f"write -P 2 {5 * MiB + 1000} 100k"])
    qemu_img("bitmap", "--disable", src, "c")
    qemu_img("bitmap", "--enable", src, "big")
    qemu_io_cmds(src, [f"write -P 3 {7 * MiB} 4k", "write -z 65536 64k"])
    qemu_img("bitmap", "--disable", src, "big")
    shutil.copy(src, d / "broken.qcow2")
    set_in_use(str(d / "broken.qcow2"), "tiny")
    qemu_img("create", "-q", "-f", "raw", d / "r.raw", SIZE)
    return d


def test_source_bitmaps_are_what_the_tests_expect(srcdir):
    """The fixture really holds distinct bitmaps (else the comparisons below prove little)."""
    bms = bitmap_list(srcdir / "src.qcow2")
    assert [(n, g) for n, g, _ in bms] == [("a", 65536), ("tiny", 512), ("big", 1 << 20),
                                           ("c", 4096)]
    assert [f for _, _, f in bms] == [["auto"], ["auto"], [], []]
    bits = dirty_bits(srcdir / "src.qcow2", bms)
    assert bits["c"] == B.granules(0, 8192, 4096) | B.granules(5 * MiB + 1000, 100 << 10, 4096)
    assert bits["big"] == {7, 0}
    assert len({frozenset(b) for b in bits.values()}) == 4


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4096"], ["-c"], ["-n"]],
                         ids=["default", "cluster4k", "compressed", "no-create"])
def test_bitmaps_copied_as_qemu_img(srcdir, tmp, opts):
    """Both tools convert the same source with --bitmaps: the targets hold the source's bitmaps in
    its order with its flags, granularities and dirty bits, the same data, and check clean."""
    src = srcdir / "src.qcow2"
    q, v = tmp / "q.qcow2", tmp / "v.qcow2"
    if "-n" in opts:
        for t in (q, v):
            qemu_img("create", "-q", "-f", "qcow2", t, SIZE)
    pq = qemu_img("convert", "--bitmaps", "-O", "qcow2", *opts, src, q)
    pv = vdisk("convert", "--bitmaps", "-O", "qcow2", *opts, src, v)
    assert (pv.stdout, pv.stderr) == (pq.stdout, pq.stderr) == ("", "")
    want = bitmap_list(src)
    assert bitmap_list(v) == bitmap_list(q) == want
    assert dirty_bits(v, want) == dirty_bits(q, want) == dirty_bits(src, want)
    assert qemu_img("compare", q, v).returncode == 0
    assert_qemu_check_clean(v)
    # vdisk reads what qemu-img made as it reads its own
    info = [json.loads(vdisk("info", "--output=json", t).stdout)["format-specific"] for t in (q, v)]
    assert info[0]["data"]["bitmaps"] == info[1]["data"]["bitmaps"]


def test_copied_bitmaps_keep_recording_as_qemu_makes_them(srcdir, tmp):
    """After the convert an enabled bitmap goes on recording writes, a disabled one does not, in
    vdisk's target as in qemu-img's: QEMU writes to both, merges each into a fresh image's
    bitmap (qemu-img bitmap --merge -b) and the results agree."""
    src = srcdir / "src.qcow2"
    q, v = tmp / "q.qcow2", tmp / "v.qcow2"
    qemu_img("convert", "--bitmaps", "-O", "qcow2", src, q)
    vdisk("convert", "--bitmaps", "-O", "qcow2", src, v)
    merged = {}
    for t in (q, v):
        qemu_io_cmds(t, [f"write -P 9 {3 * MiB} 4k"])
        m = tmp / f"m-{t.name}"
        qemu_img("create", "-q", "-f", "qcow2", m, SIZE)
        for name, g, _ in bitmap_list(src):
            qemu_img("bitmap", "--add", "-g", g, m, name)
            qemu_img("bitmap", "--merge", name, "-b", t, "-F", "qcow2", m, name)
        merged[t.name] = dirty_bits(m, bitmap_list(src))
    assert merged["v.qcow2"] == merged["q.qcow2"]
    src_bits = dirty_bits(src, bitmap_list(src))
    assert merged["v.qcow2"]["a"] == src_bits["a"] | {48}
    assert merged["v.qcow2"]["c"] == src_bits["c"]


def test_vdisk_converts_a_qemu_img_converted_image(srcdir, tmp):
    """qemu-img converts with --bitmaps, vdisk converts that again: nothing lost on the way."""
    q, v = tmp / "q.qcow2", tmp / "v.qcow2"
    qemu_img("convert", "--bitmaps", "-O", "qcow2", srcdir / "src.qcow2", q)
    vdisk("convert", "--bitmaps", "-O", "qcow2", q, v)
    want = bitmap_list(srcdir / "src.qcow2")
    assert bitmap_list(v) == want
    assert dirty_bits(v, want) == dirty_bits(srcdir / "src.qcow2", want)


def test_skip_broken_bitmaps_as_qemu_img(srcdir, tmp):
    """An in-use bitmap is skipped with qemu-img's warning (also with -q); the others copied."""
    q, v = tmp / "q.qcow2", tmp / "v.qcow2"
    src = srcdir / "broken.qcow2"
    args = ["convert", "-q", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src]
    pq = qemu_img(*args, q)
    pv = vdisk(*args, v)
    assert pv.stderr.replace("vdisk", "qemu-img") == pq.stderr
    assert pq.stderr == "qemu-img: warning: Skipping inconsistent bitmap 'tiny'\n"
    want = [b for b in bitmap_list(srcdir / "src.qcow2") if b[0] != "tiny"]
    assert bitmap_list(v) == bitmap_list(q) == want
    assert dirty_bits(v, want) == dirty_bits(q, want)


def run_in(cwd, cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def files(d):
    return {p: sha256(d / p) for p in sorted(os.listdir(d))}


# (arguments, does qemu-img leave a file "t" behind?). qemu-img refuses a target format without
# bitmaps after creating the (empty) target; vdisk refuses before.
ERRORS = [
    (["--skip-broken-bitmaps", "-O", "qcow2", "src.qcow2", "t"], False),
    (["--bitmaps", "-O", "qcow2", "broken.qcow2", "t"], False),
    (["--bitmaps", "-O", "qcow2", "r.raw", "t"], False),
    (["--bitmaps", "-O", "qcow2", "src.qcow2", "src.qcow2", "t"], False),
    (["--bitmaps", "-C", "--salvage", "-O", "qcow2", "src.qcow2", "t"], False),
    (["--bitmaps", "-O", "raw", "src.qcow2", "t"], True),
    (["--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "src.qcow2", "t"], True),
    (["--bitmaps", "-n", "-O", "raw", "src.qcow2", "r.raw"], False),
]


@pytest.mark.parametrize("args,qemu_creates", ERRORS, ids=lambda a: " ".join(a)
                         if isinstance(a, list) else "")
def test_bitmaps_refused_as_qemu_img(srcdir, tmp, args, qemu_creates):
    """Exit code and whole stderr as qemu-img's; vdisk creates and changes nothing."""
    for d in ("q", "v"):
        shutil.copytree(srcdir, tmp / d)
    before = files(tmp / "v")
    pq = run_in(tmp / "q", ["qemu-img", "convert", *args])
    pv = run_in(tmp / "v", [VDISK, "convert", *args])
    assert pq.returncode == 1, pq.stderr
    assert (pv.returncode, pv.stderr.replace("vdisk", "qemu-img")) == (pq.returncode, pq.stderr)
    assert files(tmp / "v") == before
    assert os.path.exists(tmp / "q" / "t") == qemu_creates


@pytest.mark.parametrize("target", ["same-name", "bigger"])
def test_bitmaps_into_a_target_that_cannot_take_them(srcdir, tmp, target):
    """-n into a qcow2 that already has a bitmap of that name, or is larger than the source:
    qemu-img's message and exit code, checked on the first bitmap of its order; qemu-img has
    copied the data by then, vdisk fails before it writes anything."""
    size = SIZE * 2 if target == "bigger" else SIZE
    for d in ("q", "v"):
        (tmp / d).mkdir()
        qemu_img("create", "-q", "-f", "qcow2", tmp / d / "t.qcow2", size)
        if target == "same-name":
            qemu_img("bitmap", "--add", tmp / d / "t.qcow2", "c")
    orig = tmp / "orig.qcow2"
    shutil.copy(tmp / "v" / "t.qcow2", orig)
    args = ["convert", "-n", "--bitmaps", "-O", "qcow2", srcdir / "src.qcow2"]
    pq = qemu_img(*args, tmp / "q" / "t.qcow2", check=False)
    pv = vdisk(*args, tmp / "v" / "t.qcow2", check=False)
    assert pq.returncode == 1 and pq.stderr.startswith("qemu-img: Failed to ")
    assert (pv.returncode, pv.stderr.replace("vdisk", "qemu-img")) == (pq.returncode, pq.stderr)
    # the target reads as before and holds the bitmaps it held (the same bits, none added);
    # a bitmap the open marked in use is stored back, so the file's bytes may move
    t = tmp / "v" / "t.qcow2"
    assert qemu_img("compare", orig, t).returncode == 0
    assert bitmap_list(t) == bitmap_list(orig)
    assert dirty_bits(t, bitmap_list(t)) == dirty_bits(orig, bitmap_list(orig))
    assert_qemu_check_clean(t)
    if target == "bigger":
        assert sha256(t) == sha256(orig)
