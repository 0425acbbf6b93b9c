"""Interop for `vdisk resize` and `vdisk measure`: same results as qemu-img on the same input.

resize: identical copies are resized by both tools; the new virtual size, guest content (old data
kept, grown area reads zero), allocation map and a clean qemu-img check must match.
measure: `--output=json` numbers (required, fully-allocated) equal qemu-img's.
"""
import json
import shutil

import pytest

from conftest import (GuestModel, assert_not_crashed, assert_qemu_check_clean,
                      assert_same_guest_content, io_cmds, qemu_img, qemu_info, qemu_io_cmds,
                      merged_map, qemu_map, vdisk)

MiB = 1 << 20


def _img(tmp, opts=""):
    p = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), p, "4M")
    qemu_io_cmds(p, io_cmds([("write", 0, 100000, 1), ("write", 3 * MiB + 5, 900000, 2),
                             ("zero", 2 * MiB, 65536)]))
    return p


@pytest.mark.parametrize("args", [
    ["+1M"], ["6M"], ["4194305"], ["--shrink", "3M"], ["--shrink", "3000000"],
    ["--preallocation=metadata", "+2M"], ["--preallocation=full", "+1M"],
    ["--preallocation=falloc", "8M"],
])
@pytest.mark.parametrize("opts", ["", "compat=0.10", "cluster_size=16384,extended_l2=on", "cluster_size=512"])
def test_resize_like_qemu(tmp, args, opts):
    src = _img(tmp, opts)
    q, v = tmp / "q.qcow2", tmp / "v.qcow2"
    shutil.copyfile(src, q)
    shutil.copyfile(src, v)
    qr = qemu_img("resize", "-q", "-f", "qcow2", q, *args, check=False)
    vr = vdisk("resize", "-f", "qcow2", v, *args, check=False)
    assert_not_crashed(vr)
    assert (vr.returncode == 0) == (qr.returncode == 0), \
        f"qemu-img exit {qr.returncode} ({qr.stderr.strip()}), vdisk exit {vr.returncode}: {vr.stderr}"
    if qr.returncode:
        return
    assert qemu_info(v)["virtual-size"] == qemu_info(q)["virtual-size"]
    assert_qemu_check_clean(v)
    assert_same_guest_content(v, q, "qcow2", "qcow2")
    assert merged_map(qemu_map(v)) == merged_map(qemu_map(q)), "allocation differs from qemu-img's"


def test_resize_shrink_needs_flag(tmp):
    src = _img(tmp)
    q = qemu_img("resize", "-f", "qcow2", src, "2M", check=False)
    assert q.returncode != 0
    p = vdisk("resize", "-f", "qcow2", src, "2M", check=False)
    assert_not_crashed(p)
    assert p.returncode != 0, "shrinking without --shrink succeeded"
    assert qemu_info(src)["virtual-size"] == 4 * MiB


def test_resize_raw(tmp):
    p = tmp / "r.raw"
    GuestModel(MiB).apply_all([("write", 0, MiB, 7)]).save(p)
    vdisk("resize", "-f", "raw", p, "+512k")
    data = p.read_bytes()
    assert len(data) == MiB + 512 * 1024
    assert data[:MiB] == bytes([7]) * MiB and data[MiB:] == bytes(512 * 1024)


@pytest.mark.parametrize("args", [
    ["--size", "1G", "-O", "qcow2"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4096"],
    ["--size", "10G", "-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=64"],
    ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on"],
    ["--size", "1G", "-O", "qcow2", "-o", "preallocation=metadata"],
    ["--size", "1G", "-O", "raw"],
    ["IMG", "-O", "qcow2"],
    ["IMG", "-O", "qcow2", "-o", "cluster_size=512"],
    ["IMG", "-O", "raw"],
])
def test_measure_like_qemu(tmp, args):
    src = _img(tmp)
    a = [str(src) if x == "IMG" else x for x in args]
    if "IMG" in args:
        a = ["-f", "qcow2"] + a
    q = json.loads(qemu_img("measure", "--output=json", *a).stdout)
    v = json.loads(vdisk("measure", "--output=json", *a).stdout)
    assert v.get("required") == q["required"] and v.get("fully-allocated") == q["fully-allocated"], \
        f"qemu-img measure {q}, vdisk {v}"
