"""vdisk info / map / check: run on the same files as qemu-img and compare the output."""
import json
import os
import struct

import pytest

from conftest import qemu_img, qemu_io, run, vdisk


@pytest.fixture
def chain(tmp):
    """base.qcow2 <- top.qcow2 (relative backing name) with data, zeroes and a compressed cluster."""
    os.chdir(tmp)
    qemu_img("create", "-f", "qcow2", "base.qcow2", "16M")
    qemu_io("-c", "write -P 1 0 64k", "-c", "write -P 5 5M 1M", "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("-c", "write -P 2 128k 64k", "-c", "write -z 256k 64k", "-c", "write -z -u 512k 64k",
            "-c", "write -P 3 1M 100k", "-c", "write -c 4M 64k", "top.qcow2")
    return tmp


@pytest.fixture
def rawimg(tmp):
    p = tmp / "r.img"
    qemu_img("create", "-f", "raw", p, "10M")
    qemu_io("-f", "raw", "-c", "write -P 9 1M 64k", "-c", "write -P 8 3M 4k", p)
    return p


def both(*args, **kw):
    return qemu_img(*args, check=False), vdisk(*args, check=False)


def assert_same(pq, pv):
    assert pv.returncode == pq.returncode, pv.stderr
    assert pv.stdout == pq.stdout


# ---- info ----

@pytest.mark.parametrize("args", [
    ["top.qcow2"],
    ["-f", "qcow2", "top.qcow2"],
    ["--backing-chain", "top.qcow2"],
    ["--output=json", "top.qcow2"],
    ["--output=json", "--backing-chain", "top.qcow2"],
    ["--output=human", "-U", "base.qcow2"],
    ["-f", "raw", "top.qcow2"],
    ["--output=json", "-f", "raw", "base.qcow2"],
])
def test_info_matches_qemu(chain, args):
    pq, pv = both("info", *args)
    assert_same(pq, pv)


def test_info_raw(rawimg):
    for out in ("human", "json"):
        assert_same(*both("info", "-f", "raw", f"--output={out}", rawimg))
    # Probed top image.
    assert_same(*both("info", "--output=json", rawimg))


@pytest.mark.parametrize("opts", ["cluster_size=4k,lazy_refcounts=on", "compat=0.10",
                                  "extended_l2=on,compression_type=zstd", "refcount_bits=64"])
def test_info_format_specific(tmp, opts):
    p = tmp / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, p, "3M")
    assert_same(*both("info", p))
    assert_same(*both("info", "--output=json", p))


def test_info_relative_backing_actual_path(tmp):
    sub = tmp / "d"
    sub.mkdir()
    qemu_img("create", "-f", "qcow2", sub / "b.qcow2", "1M")
    qemu_img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", sub / "t.qcow2")
    os.chdir(tmp)
    assert_same(*both("info", "d/t.qcow2"))
    assert_same(*both("info", "--backing-chain", "--output=json", "d/t.qcow2"))


def test_info_missing_backing(tmp):
    qemu_img("create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", tmp / "t.qcow2",
             "1M")
    # Without --backing-chain the backing file is not needed.
    assert_same(*both("info", tmp / "t.qcow2"))
    pv = vdisk("info", "--backing-chain", tmp / "t.qcow2", check=False)
    assert pv.returncode == 1 and pv.stderr.startswith("vdisk: ") and pv.stderr.count("\n") == 1


def test_info_errors(tmp):
    for args in (["nonexist"], ["--output=xml", "x"], [], ["-f", "foo", "x"]):
        pv = vdisk("info", *args, check=False)
        pq = qemu_img("info", *args, check=False)  # qemu-img's lines ("Try ..." for usage)
        assert pv.returncode == 1
        assert pv.stderr.replace("vdisk", "qemu-img") == pq.stderr


def test_info_never_opens_read_write(chain):
    os.chmod("top.qcow2", 0o444)
    os.chmod("base.qcow2", 0o444)
    try:
        vdisk("info", "--backing-chain", "top.qcow2")
        vdisk("map", "top.qcow2", "--output=json")
        vdisk("check", "top.qcow2")
        vdisk("compare", "top.qcow2", "top.qcow2")
    finally:
        os.chmod("top.qcow2", 0o644)
        os.chmod("base.qcow2", 0o644)


# ---- map ----

@pytest.mark.parametrize("args", [
    ["--output=json", "top.qcow2"],
    ["--output=json", "base.qcow2"],
    ["base.qcow2"],
    ["--output=json", "--start-offset", "100k", "--max-length", "1M", "top.qcow2"],
    ["--output=json", "--start-offset=5M", "top.qcow2"],
    ["--output=json", "--max-length=12345", "top.qcow2"],
    ["--output=json", "-f", "raw", "top.qcow2"],
    ["-f", "raw", "top.qcow2"],
])
def test_map_matches_qemu(chain, args):
    pq, pv = both("map", *args)
    assert_same(pq, pv)


def test_map_human_compressed_fails_like_qemu(chain):
    pq, pv = both("map", "top.qcow2")
    assert pv.returncode == pq.returncode == 1
    assert pv.stdout.startswith("Offset          Length          Mapped to       File\n")
    assert pv.stderr == "vdisk: File contains external, encrypted or compressed clusters.\n"


def test_map_human_without_compressed(chain):
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "t2.qcow2")
    qemu_io("-c", "write -P 2 128k 64k", "-c", "write -P 3 1M 100k", "t2.qcow2")
    assert_same(*both("map", "t2.qcow2"))


def test_map_raw(rawimg):
    assert_same(*both("map", "-f", "raw", "--output=json", rawimg))
    assert_same(*both("map", "-f", "raw", rawimg))


def test_map_preallocated(tmp):
    p = tmp / "p.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "preallocation=metadata", p, "1M")
    qemu_io("-c", "write -P 1 64k 4k", p)
    assert_same(*both("map", "--output=json", p))


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full", "off"])
@pytest.mark.parametrize("cluster_size", ["4k", "64k"])
def test_map_data_over_file_holes(tmp, prealloc, cluster_size):
    """Data clusters whose host range is a hole: QEMU asks the file layer only for images it
    detects as metadata-preallocated and then reports them "zero": true, "data": true."""
    p = tmp / "p.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"preallocation={prealloc},cluster_size={cluster_size}",
             p, "8M")
    qemu_io("-c", "write -P 1 64k 4k", "-c", "write -P 2 3M 1M", "-c", "write -z 5M 64k",
            "-c", "discard 6M 128k", p)
    pq, pv = both("map", "--output=json", p)
    assert_same(pq, pv)
    if prealloc == "metadata":
        assert '"zero": true, "data": true' in pq.stdout
    assert_same(*both("map", p))
    assert_same(*both("info", "--output=json", p))


def test_raw_unaligned_file_rounds_up_to_512(tmp):
    """QEMU counts lengths in 512-byte sectors: a 1000-byte raw file is a 1024-byte image whose
    tail reads as zeroes (info, map, measure, compare, convert, and writes into the tail)."""
    os.chdir(tmp)
    with open("u.raw", "wb") as f:
        f.write(bytes(range(256)) * 3 + b"\xaa" * 232)
    for args in (["info", "u.raw"], ["info", "--output=json", "u.raw"],
                 ["map", "--output=json", "u.raw"], ["map", "u.raw"],
                 ["measure", "-O", "raw", "u.raw"], ["measure", "-O", "qcow2", "u.raw"],
                 ["measure", "-O", "raw", "--size", "1000"],
                 ["measure", "--output=json", "-O", "raw", "--size", "1000"],
                 ["compare", "-f", "raw", "-F", "raw", "u.raw", "u.raw"]):
        assert_same(*both(*args))
    for fmt in ("raw", "qcow2"):
        qemu_img("convert", "-O", fmt, "u.raw", f"q.{fmt}")
        vdisk("convert", "-O", fmt, "u.raw", f"v.{fmt}")
        assert qemu_img("compare", f"q.{fmt}", f"v.{fmt}").returncode == 0
        assert_same(*both("map", "--output=json", f"v.{fmt}"))
        assert os.path.getsize(f"v.{fmt}") == os.path.getsize(f"q.{fmt}") or fmt == "qcow2"
    for tool, name in ((qemu_io, "wq.raw"), (lambda *a: vdisk("io", *a), "wv.raw")):
        with open(name, "wb") as f:
            f.write(b"\x01" * 1000)
        tool("-f", "raw", "-c", "write -P 7 1000 24", name)
    assert open("wq.raw", "rb").read() == open("wv.raw", "rb").read()


def test_map_raw_holes_and_eof(tmp):
    """raw over file: holes in the file are zero extents, as qemu-img map (SEEK_DATA/HOLE)."""
    p = tmp / "h.raw"
    with open(p, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 4096)
        f.seek((3 << 20) + 512)
        f.write(b"y" * 100)
    assert_same(*both("map", "-f", "raw", "--output=json", p))
    assert_same(*both("map", "-f", "raw", p))


# ---- check ----

def test_check_clean(chain):
    for args in (["top.qcow2"], ["--output=json", "top.qcow2"], ["-q", "top.qcow2"],
                 ["-f", "qcow2", "base.qcow2"], ["--output=json", "base.qcow2"]):
        assert_same(*both("check", *args))


def test_check_raw_unsupported(rawimg):
    pq, pv = both("check", "-f", "raw", rawimg)
    assert pv.returncode == pq.returncode == 63
    assert pv.stderr == "vdisk: This image format does not support checks\n"


def _refcount_entry_offset(path, cluster_index):
    """Byte offset of the 16-bit refcount of cluster_index (default qcow2 v3 layout)."""
    with open(path, "rb") as f:
        hdr = f.read(104)
        cluster_bits = struct.unpack(">I", hdr[20:24])[0]
        rt_off = struct.unpack(">Q", hdr[48:56])[0]
        f.seek(rt_off)
        rb_off = struct.unpack(">Q", f.read(8))[0]
    assert cluster_index < (1 << cluster_bits) // 2
    return rb_off + 2 * cluster_index


def _set_refcount(path, cluster_index, value):
    off = _refcount_entry_offset(path, cluster_index)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">H", value))


@pytest.fixture
def leaky(tmp):
    p = tmp / "leak.qcow2"
    qemu_img("create", "-f", "qcow2", p, "8M")
    qemu_io("-c", "write -P 1 0 128k", p)
    # Two clusters appended to the file with refcount 1 that nobody references: leaks.
    end = os.path.getsize(p)
    assert end % 65536 == 0
    os.truncate(p, end + 2 * 65536)
    _set_refcount(p, end // 65536, 1)
    _set_refcount(p, end // 65536 + 1, 1)
    return p


def test_check_leaks(leaky, tmp):
    pq, pv = both("check", leaky)
    assert pq.returncode == 3
    assert_same(pq, pv)
    pq, pv = both("check", "--output=json", leaky)
    assert pv.returncode == 3
    assert json.loads(pv.stdout) == json.loads(pq.stdout)
    assert pv.stdout == pq.stdout


def test_check_repair_leaks(leaky, tmp):
    other = tmp / "leak2.qcow2"
    run(["cp", str(leaky), str(other)])
    pq = qemu_img("check", "-r", "leaks", other, check=False)
    pv = vdisk("check", "-r", "leaks", leaky, check=False)
    assert pv.returncode == pq.returncode == 0
    assert pv.stdout == pq.stdout
    assert qemu_img("check", leaky, check=False).returncode == 0


def test_check_corruption(tmp):
    p = tmp / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", p, "8M")
    qemu_io("-c", "write -P 1 0 64k", p)
    # Cluster 4 holds the data cluster just written: say nobody owns it.
    mp = json.loads(qemu_img("map", "--output=json", p).stdout)
    data_cluster = mp[0]["offset"] // 65536
    _set_refcount(p, data_cluster, 0)
    pq, pv = both("check", p)
    assert pq.returncode == 2
    assert_same(pq, pv)
    pq, pv = both("check", "--output=json", p)
    assert json.loads(pv.stdout) == json.loads(pq.stdout)
    # -r all repairs it, like qemu-img.
    cp = tmp / "bad2.qcow2"
    run(["cp", str(p), str(cp)])
    pq = qemu_img("check", "-r", "all", cp, check=False)
    pv = vdisk("check", "-r", "all", p, check=False)
    assert (pv.returncode, pv.stdout) == (pq.returncode, pq.stdout)
    assert qemu_img("check", p, check=False).returncode == 0


def test_check_errors(tmp):
    pv = vdisk("check", "-r", "bogus", "x", check=False)
    assert pv.returncode == 1
    assert pv.stderr == ("vdisk: Unknown option value for -r (expecting 'leaks' or 'all'): "
                         "bogus\nTry 'vdisk --help' for more information\n")
    pv = vdisk("check", tmp / "nonexist", check=False)
    assert pv.returncode == 1 and pv.stderr.count("\n") == 1


def test_check_garbage_file_does_not_crash(tmp):
    p = tmp / "junk.qcow2"
    with open(p, "wb") as f:
        f.write(b"QFI\xfb" + os.urandom(4096))
    pv = vdisk("check", "-f", "qcow2", p, check=False)
    assert pv.returncode in (1, 2, 3)
    assert "AddressSanitizer" not in pv.stderr


@pytest.mark.parametrize("tz", ["UTC", "America/New_York"])
def test_info_snapshot_list(chain, tz, monkeypatch):
    """Internal snapshots: qemu-img's "Snapshot list:" table (dates in local time), long tags
    pushing the columns right, also with --backing-chain and in JSON."""
    monkeypatch.setenv("TZ", tz)
    qemu_img("snapshot", "-c", "s1", "top.qcow2")
    qemu_io("-c", "write -P 7 0 64k", "top.qcow2")
    qemu_img("snapshot", "-c", "a-much-longer-snapshot-tag-name", "top.qcow2")
    for args in (["top.qcow2"], ["--backing-chain", "top.qcow2"], ["--output=json", "top.qcow2"]):
        pq, pv = both("info", *args)
        assert_same(pq, pv)
    pv = vdisk("info", "top.qcow2")
    assert "\nSnapshot list:\nID        TAG               VM SIZE" in pv.stdout
    assert "\na-much-longer-snapshot-tag-name      0 B " not in pv.stdout  # id column first
