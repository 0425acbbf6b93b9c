"""Interop, QEMU -> vdisk: images made by qemu-img / qemu-io (compressed zlib and zstd clusters,
zero clusters, extended L2 subclusters, 512 B and 2 MiB clusters, refcount_bits 1 and 64,
compat=0.10, 3-deep chains with relative backing names, raw bases) must read in vdisk exactly as in
QEMU:
  - `vdisk convert -O raw` and `qemu-img convert -O raw` produce byte-identical files,
  - `vdisk io -c 'read -P ..'` verifies every uniform extent (and fails on a wrong pattern),
  - `vdisk map --output=json` agrees with `qemu-img map --output=json` on present/zero/data
    (and on host offsets where QEMU reports one),
  - `vdisk info --output=json` reports what qemu-img info reports,
  - `vdisk check` finds it clean and `vdisk compare` finds it equal to QEMU's raw conversion,
  - none of this changes a byte of any image in the chain.
"""
import json
import os
import random
import zlib

import pytest

from conftest import (GuestModel, assert_not_crashed, io_cmds, pattern_reads, qemu_img, qemu_info,
                      qemu_io_cmds, qemu_map, sha256, vdisk)

KiB, MiB = 1 << 10, 1 << 20


def mixed_data(size, seed):
    """Incompressible, compressible and zero stretches, deterministic."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rnd.randrange(3)
        n = rnd.choice([511, 4096, 65536, 70000, 131072])
        if kind == 0:
            out += rnd.randbytes(n)
        elif kind == 1:
            out += (b"vdisk-compressible-%d " % rnd.randrange(1000)) * (n // 24 + 1)
        else:
            out += bytes(n)
    return bytes(out[:size])


def ops_for(size, cluster, seed, n=40, sub=None):
    """Writes / zero writes / discards at cluster-ish and unaligned positions."""
    rnd = random.Random(seed)
    unit = sub or cluster
    ops = []
    for i in range(n):
        kind = rnd.choice(["write", "write", "write", "zero", "discard"])
        if rnd.random() < 0.5:
            off = rnd.randrange(size // unit) * unit
            ln = unit * rnd.randint(1, 3)
        else:
            off = rnd.randrange(size)
            ln = rnd.randint(1, 3 * cluster)
        ln = min(ln, size - off)
        if kind == "write":
            ops.append(("write", off, ln, rnd.randrange(1, 256)))
        else:
            ops.append((kind, off, ln))
    return ops


class Case:
    """An image (chain) built by QEMU, with the guest content it must show."""

    def __init__(self, top, fmt, data, ops=(), files=()):
        self.top, self.fmt, self.data, self.ops, self.files = top, fmt, bytes(data), list(ops), files


def _qcow2_with_ops(d, name, size, opts, seed, backing=None, backing_fmt="qcow2", v3=True,
                    backing_data=None, sub=None, backing_name=None):
    img = d / name
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing_name or backing, "-F", backing_fmt]
    qemu_img(*args, img, size)
    cluster = qemu_info(img)["cluster-size"]
    ops = ops_for(size, cluster, seed, sub=sub)
    qemu_io_cmds(img, io_cmds(ops))
    m = GuestModel(size, cluster, backing=backing_data, v3=v3).apply_all(ops)
    return img, m, ops


def build(kind, d):
    d = d / "imgs"
    d.mkdir()
    size = 4 * MiB
    if kind.startswith("compressed"):
        _, ctype, cs = kind.split("-")
        cs = int(cs)
        size = 8 * MiB if cs >= 2 * MiB else 4 * MiB
        src = d / "src.raw"
        data = mixed_data(size, seed=zlib.crc32(kind.encode()))
        src.write_bytes(data)
        img = d / "c.qcow2"
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2",
                 "-o", f"compression_type={ctype},cluster_size={cs}", src, img)
        info = qemu_info(img)
        assert info["format-specific"]["data"]["compression-type"] == ctype
        # overwrite parts of some compressed clusters (QEMU decompresses and reallocates)
        ops = [("write", cs + 100, 200, 0xab), ("zero", 3 * cs - 50, 100),
               ("write", size - 5000, 5000, 0xcd)]
        qemu_io_cmds(img, io_cmds(ops))
        m = GuestModel(size, cs)
        m.data[:] = data
        m.apply_all(ops)
        os.unlink(src)
        return Case(img, "qcow2", m.data, ops)
    if kind == "zero-clusters":
        img = d / "z.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", img, size)
        ops = [("write", 0, size, 0x5a), ("zero", 65536, 3 * 65536), ("zero", 1 * MiB, 65536),
               ("write", 1 * MiB + 100, 10, 0x01)]
        qemu_io_cmds(img, io_cmds(ops) + ["write -z -u 2097152 131072"])
        ops.append(("zero", 2 * MiB, 131072))
        m = GuestModel(size).apply_all(ops)
        return Case(img, "qcow2", m.data, ops)
    if kind == "extended_l2":
        img, m, ops = _qcow2_with_ops(d, "x.qcow2", size, "extended_l2=on", 11, sub=2048)
        return Case(img, "qcow2", m.data, ops)
    if kind == "extended_l2-backing":
        base, mb, _ = _qcow2_with_ops(d, "b.qcow2", size, "", 12)
        img, m, ops = _qcow2_with_ops(d, "x.qcow2", size, "extended_l2=on,cluster_size=32768", 13,
                                      backing="b.qcow2", backing_data=mb.data, sub=1024)
        return Case(img, "qcow2", m.data, ops, files=[base])
    if kind.startswith("cluster-"):
        cs = int(kind.split("-")[1])
        size = 8 * MiB if cs >= 2 * MiB else 4 * MiB
        img, m, ops = _qcow2_with_ops(d, "cs.qcow2", size, f"cluster_size={cs}", cs)
        return Case(img, "qcow2", m.data, ops)
    if kind.startswith("refcount-"):
        bits = int(kind.split("-")[1])
        img, m, ops = _qcow2_with_ops(d, "r.qcow2", size, f"refcount_bits={bits}", bits)
        return Case(img, "qcow2", m.data, ops)
    if kind == "compat-0.10":
        img, m, ops = _qcow2_with_ops(d, "v2.qcow2", size, "compat=0.10", 21, v3=False)
        return Case(img, "qcow2", m.data, ops)
    if kind in ("chain3-relative", "chain3-compat-0.10"):
        opts = "compat=0.10" if kind.endswith("0.10") else ""
        v3 = not opts
        (d / "a").mkdir()
        (d / "b").mkdir()
        base, m0, _ = _qcow2_with_ops(d / "a", "base.qcow2", size, opts, 31, v3=v3)
        sn1, m1, _ = _qcow2_with_ops(d / "b", "sn1.qcow2", size, opts, 32, backing=str(base),
                                     backing_name="../a/base.qcow2", backing_data=m0.data, v3=v3)
        sn2, m2, ops = _qcow2_with_ops(d / "b", "sn2.qcow2", size, opts, 33, backing=str(sn1),
                                       backing_name="sn1.qcow2", backing_data=m1.data, v3=v3)
        assert qemu_info(sn1)["backing-filename"] == "../a/base.qcow2"
        return Case(sn2, "qcow2", m2.data, ops, files=[base, sn1])
    if kind == "raw-base-shorter":
        base = d / "base.raw"
        bdata = mixed_data(1 * MiB + 512, 41)
        base.write_bytes(bdata)
        img, m, ops = _qcow2_with_ops(d, "top.qcow2", size, "", 42, backing="base.raw",
                                      backing_fmt="raw", backing_data=bdata)
        return Case(img, "qcow2", m.data, ops, files=[base])
    if kind == "raw":
        img = d / "plain.raw"
        data = mixed_data(size, 51)
        img.write_bytes(data)
        return Case(img, "raw", data)
    raise ValueError(kind)


KINDS = [
    "compressed-zlib-65536", "compressed-zstd-65536", "compressed-zlib-512",
    "compressed-zstd-2097152", "compressed-zlib-4096",
    "zero-clusters", "extended_l2", "extended_l2-backing",
    "cluster-512", "cluster-2097152", "cluster-4096",
    "refcount-1", "refcount-64",
    "compat-0.10",
    "chain3-relative", "chain3-compat-0.10",
    "raw-base-shorter", "raw",
]


def _per_unit(m, size, unit=512):
    """Expand a qemu-img-style JSON map into one (present, zero, data, host offset) per unit."""
    out = [None] * (size // unit)
    for e in m:
        s, n = e["start"], e["length"]
        for pos in range(s, s + n, unit):
            off = e.get("offset")
            out[pos // unit] = (e["present"], e["zero"], e["data"],
                                None if off is None else off + pos - s)
    return out


def _images(case):
    return [case.top, *case.files]


@pytest.fixture(params=KINDS, scope="module")
def case(request, tmp_path_factory):
    c = build(request.param, tmp_path_factory.mktemp(request.param))
    c.sums = {str(p): sha256(p) for p in _images(c)}
    yield c
    for p in _images(c):
        assert sha256(p) == c.sums[str(p)], f"{p} was modified by a read-only vdisk command"


def test_convert_raw_identical(case, tmp):
    vq, vv = tmp / "q.raw", tmp / "v.raw"
    qemu_img("convert", "-U", "-f", case.fmt, "-O", "raw", case.top, vq)
    assert vq.read_bytes() == case.data, "test model disagrees with QEMU; fix the test"
    vdisk("convert", "-f", case.fmt, "-O", "raw", case.top, vv)
    a, b = vq.read_bytes(), vv.read_bytes()
    assert len(a) == len(b), f"size: qemu {len(a)} vdisk {len(b)}"
    if a != b:
        first = next(i for i in range(len(a)) if a[i] != b[i])
        pytest.fail(f"vdisk convert -O raw differs from qemu-img at byte {first} "
                    f"(qemu {a[first]:#x}, vdisk {b[first]:#x})")


def test_io_read_patterns(case):
    m = GuestModel(len(case.data))
    m.data[:] = case.data
    reads = pattern_reads(m, case.ops) + [f"read -P 0 {len(case.data) - 1} 0"][:0]
    # fixed probes: whole image in 1 MiB reads
    if reads:
        vdisk("io", "-f", case.fmt, *sum((["-c", r] for r in reads), []), case.top)
    # a wrong pattern must be reported as a failure
    bad = (case.data[0] + 1) & 0xff
    p = vdisk("io", "-f", case.fmt, "-c", f"read -P {bad} 0 512", case.top, check=False)
    assert_not_crashed(p)
    assert p.returncode != 0, "vdisk io read -P did not fail on a wrong pattern"


def test_map_agrees(case):
    size = len(case.data)
    q = _per_unit(qemu_map(case.top, case.fmt), size)
    p = vdisk("map", "--output=json", "-f", case.fmt, case.top)
    v = _per_unit(json.loads(p.stdout), size)
    for i, (a, b) in enumerate(zip(q, v)):
        if a is None or b is None or a[:3] != b[:3] or (a[3] is not None and a[3] != b[3]):
            pytest.fail(f"map differs at offset {i * 512}: qemu (present,zero,data,offset)={a} "
                        f"vdisk={b}")


def test_info_agrees(case):
    q = qemu_info(case.top, case.fmt, chain=True)
    v = json.loads(vdisk("info", "--output=json", "--backing-chain", "-f", case.fmt,
                         case.top).stdout)
    assert isinstance(v, list) and len(v) == len(q)
    keys = ["virtual-size", "format", "cluster-size", "backing-filename", "backing-filename-format",
            "format-specific", "dirty-flag", "actual-size"]
    for qi, vi in zip(q, v):
        for k in keys:
            assert vi.get(k) == qi.get(k), f"{qi['filename']}: {k}: qemu {qi.get(k)!r} vdisk {vi.get(k)!r}"
        assert os.path.realpath(vi["filename"]) == os.path.realpath(qi["filename"])
        if "full-backing-filename" in qi:
            assert os.path.realpath(vi.get("full-backing-filename", "")) == \
                os.path.realpath(qi["full-backing-filename"])


def test_check_and_compare(case, tmp):
    if case.fmt == "qcow2":
        p = vdisk("check", "-f", "qcow2", case.top, check=False)
        assert_not_crashed(p)
        assert p.returncode == 0, p.stdout + p.stderr
    ref = tmp / "ref.raw"
    ref.write_bytes(case.data)
    vdisk("compare", "-f", case.fmt, "-F", "raw", case.top, ref)
    # and a one-byte difference is found (exit 1, like qemu-img compare)
    m = bytearray(case.data)
    m[len(m) // 2 + 3] ^= 0xff
    ref.write_bytes(m)
    p = vdisk("compare", "-f", case.fmt, "-F", "raw", case.top, ref, check=False)
    assert_not_crashed(p)
    assert p.returncode == 1, f"vdisk compare exit {p.returncode}\n{p.stdout}{p.stderr}"
    # qemu-img: "Content mismatch at offset N!" with N the first differing 512-byte sector
    assert f"offset {(len(m) // 2 + 3) // 512 * 512}" in p.stdout, p.stdout
