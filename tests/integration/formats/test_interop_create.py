"""Interop, vdisk -> QEMU: images made by `vdisk create` and written by `vdisk io` must be valid
qcow2 for QEMU (qemu-img check clean), carry the options asked for (qemu-img info), read exactly
like a raw model (qemu-img compare), and stay valid when QEMU writes to them afterwards.

Every `create -o` option is covered; a qemu-img-made twin with the same options is the oracle
for info fields and for the allocation map of a fresh (possibly preallocated) image.
"""
import os

import pytest

from conftest import (GuestModel, assert_qemu_check_clean, assert_same_guest_content,
                      io_cmds, qemu_img, qemu_info, qemu_io_cmds, qemu_map, vdisk, vdisk_io,
                      assert_not_crashed, pattern_reads, assert_map_agrees, merged_map)

MiB = 1 << 20

CREATE_OPTS = [
    "cluster_size=512",
    "cluster_size=4096",
    "cluster_size=65536",
    "cluster_size=2097152",
    "compat=0.10",
    "compat=1.1",
    "compat=0.10,cluster_size=4096",
    "lazy_refcounts=on",
    "lazy_refcounts=on,cluster_size=4096",
    "refcount_bits=1",
    "refcount_bits=2",
    "refcount_bits=4",
    "refcount_bits=8",
    "refcount_bits=32",
    "refcount_bits=64",
    "refcount_bits=1,cluster_size=512",
    "refcount_bits=64,cluster_size=512",
    "preallocation=off",
    "preallocation=metadata",
    "preallocation=falloc",
    "preallocation=full",
    "preallocation=metadata,cluster_size=4096",
    "preallocation=metadata,compat=0.10",
    "preallocation=full,cluster_size=2097152",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16384",
    "extended_l2=on,cluster_size=2097152",
    "compression_type=zlib",
    "compression_type=zstd",
    "extended_l2=on,compression_type=zstd,refcount_bits=8,lazy_refcounts=on,cluster_size=32768",
]

# Rejected by qemu-img create; vdisk must reject them too (cleanly, one error line).
BAD_CREATE_OPTS = [
    "cluster_size=256",
    "cluster_size=4194304",
    "cluster_size=3000",
    "refcount_bits=3",
    "refcount_bits=128",
    "compat=0.10,refcount_bits=8",
    "compat=0.10,lazy_refcounts=on",
    "compat=0.10,compression_type=zstd",
    "compat=0.10,extended_l2=on",
    "extended_l2=on,cluster_size=4096",
    "compression_type=lz4",
    "compat=0.9",
    "preallocation=bogus",
]


def _opts(optstr):
    return dict(kv.split("=", 1) for kv in optstr.split(","))


def _cluster(optstr):
    return int(_opts(optstr).get("cluster_size", 65536))


def _size(optstr):
    return 8 * MiB if _cluster(optstr) >= 1 * MiB else 4 * MiB


def workload(size, cluster):
    """Fixed ops touching cluster edges, unaligned spans, zero writes, discards, the last byte."""
    c = cluster
    ops = [
        ("write", 0, 512, 0x11),
        ("write", c - 100, 300, 0x22),                 # straddles the first cluster boundary
        ("write", 3 * c + 7, 2 * c + 1001, 0x33),      # unaligned, several clusters
        ("zero", 3 * c + 500, c, ),                    # zero write inside data
        ("zero", 10 * c, 2 * c),                       # zero write on unallocated clusters
        ("write", size // 2 - 4097, 8192 + 3, 0x44),
        ("discard", 3 * c + 13, 2 * c),                # partial + whole clusters
        ("write", size - 777, 777, 0x55),              # up to the last byte
        ("write", 1, 1, 0x66),                         # single byte rewrite
        ("write", size // 4, 3 * c, 0x77),
        ("discard", size // 4 + c, c),                 # whole cluster in the middle
        ("zero", size - 3000, 1000),
    ]
    return [op for op in ops if op[1] + op[2] <= size]


@pytest.mark.parametrize("optstr", CREATE_OPTS)
def test_vdisk_create_qemu_reads(tmp, optstr):
    size, cluster = _size(optstr), _cluster(optstr)
    img, twin, model = tmp / "v.qcow2", tmp / "q.qcow2", tmp / "model.raw"
    vdisk("create", "-f", "qcow2", "-o", optstr, img, size)
    qemu_img("create", "-q", "-f", "qcow2", "-o", optstr, twin, size)
    assert_qemu_check_clean(img)

    vi, qi = qemu_info(img), qemu_info(twin)
    assert vi["format"] == "qcow2"
    assert vi["virtual-size"] == size
    assert vi["cluster-size"] == qi["cluster-size"] == cluster
    assert vi["format-specific"]["data"] == qi["format-specific"]["data"], optstr
    assert vi.get("dirty-flag", False) is False

    # A fresh image maps like qemu-img's (preallocation shows as present/data/zero the same way).
    assert merged_map(qemu_map(img)) == merged_map(qemu_map(twin)), optstr
    prealloc = _opts(optstr).get("preallocation", "off")
    st = os.stat(img)
    if prealloc in ("falloc", "full"):
        assert st.st_blocks * 512 >= size, f"{prealloc}: only {st.st_blocks * 512} bytes allocated"
    if prealloc != "off":
        assert st.st_size >= size, f"{prealloc}: file is {st.st_size} bytes"
    else:
        twin_alloc = os.stat(twin).st_blocks * 512
        assert st.st_blocks * 512 <= twin_alloc + 4 * cluster, \
            f"preallocation=off: {st.st_blocks * 512} bytes allocated, qemu-img: {twin_alloc}"

    ops = workload(size, cluster)
    v3 = _opts(optstr).get("compat", "1.1") == "1.1"
    m = GuestModel(size, cluster, v3=v3).apply_all(ops)
    m.save(model)
    # the model is QEMU's behaviour: the same ops through qemu-io on the twin give the same content
    qemu_io_cmds(twin, io_cmds(ops))
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", twin, model, check=False)
    assert p.returncode == 0, f"model disagrees with qemu-io ({p.stdout}); fix the test"
    vdisk_io(img, io_cmds(ops) + ["flush"])
    assert_qemu_check_clean(img)
    assert_same_guest_content(img, model)
    # vdisk and qemu-io read back what vdisk wrote (a pattern read per uniform op range)
    vdisk_io(img, pattern_reads(m, ops))
    qemu_io_cmds(img, pattern_reads(m, ops))
    assert_map_agrees(img)

    # QEMU keeps writing to the vdisk-made image: still clean, still what the model says.
    more = [("write", size // 3 + 3, min(cluster, 65536) + 5, 0x88), ("zero", 0, 100)]
    qemu_io_cmds(img, io_cmds(more))
    m.apply_all(more).save(model)
    assert_qemu_check_clean(img)
    assert_same_guest_content(img, model)
    # and vdisk reads QEMU's writes: raw conversions are byte-identical
    vdisk("convert", "-f", "qcow2", "-O", "raw", img, tmp / "v.raw")
    with open(tmp / "v.raw", "rb") as f:
        assert f.read() == bytes(m.data)


@pytest.mark.parametrize("optstr", BAD_CREATE_OPTS)
def test_vdisk_create_rejects_what_qemu_rejects(tmp, optstr):
    q = qemu_img("create", "-q", "-f", "qcow2", "-o", optstr, tmp / "q.qcow2", "1M", check=False)
    assert q.returncode != 0, "oracle accepted it; fix the test"
    p = vdisk("create", "-f", "qcow2", "-o", optstr, tmp / "v.qcow2", "1M", check=False)
    assert_not_crashed(p)
    assert p.returncode != 0, f"vdisk create -o {optstr} succeeded\n{p.stdout}{p.stderr}"
    assert p.stderr.strip(), "no error message"


@pytest.mark.parametrize("size", ["0", "1", "511", "513", "1M", "1G", "3000000"])
def test_vdisk_create_sizes(tmp, size):
    """Odd virtual sizes: qemu-img rounds up to 512 bytes; vdisk must give the same size."""
    img, twin = tmp / "v.qcow2", tmp / "q.qcow2"
    vdisk("create", "-f", "qcow2", img, size)
    qemu_img("create", "-q", "-f", "qcow2", twin, size)
    assert qemu_info(img)["virtual-size"] == qemu_info(twin)["virtual-size"]
    assert_qemu_check_clean(img)


def test_vdisk_create_raw(tmp):
    img = tmp / "v.raw"
    vdisk("create", "-f", "raw", img, "3M")
    assert os.path.getsize(img) == 3 * MiB
    vdisk_io(img, ["write -P 9 100 5000"], fmt="raw")
    m = GuestModel(3 * MiB).apply_all([("write", 100, 5000, 9)])
    with open(img, "rb") as f:
        assert f.read() == bytes(m.data)


def test_vdisk_create_with_relative_backing(tmp):
    """-b with a relative name in another directory: recorded as given, size taken from the
    backing file, QEMU reads the backing data through it."""
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    base = tmp / "a" / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "3M")
    qemu_io_cmds(base, ["write -P 0x42 0 3M"])
    top = tmp / "b" / "top.qcow2"
    vdisk("create", "-f", "qcow2", "-b", "../a/base.qcow2", "-F", "qcow2", top)
    i = qemu_info(top)
    assert i["virtual-size"] == 3 * MiB
    assert i["backing-filename"] == "../a/base.qcow2"
    assert i["backing-filename-format"] == "qcow2"
    assert_qemu_check_clean(top)
    qemu_io_cmds(top, ["read -P 0x42 0 3M"])
    vdisk_io(top, ["write -P 0x43 1000 5000"])
    qemu_io_cmds(top, ["read -P 0x42 0 1000", "read -P 0x43 1000 5000", "read -P 0x42 6000 100000"])
    assert_qemu_check_clean(top)


def test_vdisk_create_missing_backing(tmp):
    q = qemu_img("create", "-q", "-f", "qcow2", "-b", "nonexist.qcow2", "-F", "qcow2",
                 tmp / "q.qcow2", check=False)
    assert q.returncode != 0
    p = vdisk("create", "-f", "qcow2", "-b", "nonexist.qcow2", "-F", "qcow2", tmp / "v.qcow2",
              check=False)
    assert_not_crashed(p)
    assert p.returncode != 0, "vdisk create with a missing backing file (no -u) succeeded"
    # -u: created without opening the backing file, like qemu-img
    vdisk("create", "-f", "qcow2", "-u", "-b", "nonexist.qcow2", "-F", "qcow2", tmp / "u.qcow2", "1M")
    i = qemu_info(tmp / "u.qcow2")
    assert i["backing-filename"] == "nonexist.qcow2" and i["virtual-size"] == MiB
