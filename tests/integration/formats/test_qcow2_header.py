"""A damaged qcow2 header field by field, with qemu-img as the oracle: `vdisk info`, `vdisk check`
and `vdisk io` (a read-write open) give qemu-img's / qemu-io's exit code and, where they refuse the
image, its error line word for word ("vdisk:" for "qemu-img:"). The driver's open and the
checker share one validator (qcow2_header_validate), so info and check must agree with QEMU alike;
a refused image is never modified."""
import json
import shutil
import struct

import pytest

from conftest import assert_not_crashed, qemu_img, run, sha256, vdisk, VDISK

# name: (offset, struct format, value) patches of a fresh 64M image (64k clusters), or a length
# to cut the file to. Several faults in one header: QEMU's order decides which one is reported.
CASES = {
    "magic": [(0, ">I", 0x12345678)],
    "version-1": [(4, ">I", 1)],
    "version-4": [(4, ">I", 4)],
    "cluster-bits-8": [(20, ">I", 8)],
    "cluster-bits-22": [(20, ">I", 22)],
    "header-length-50": [(100, ">I", 50)],
    "header-length-1M": [(100, ">I", 1 << 20)],
    "cut-at-50": 50,
    "cut-at-90": 90,
    "backing-offset-past-cluster": [(8, ">Q", 1 << 20)],
    "backing-name-past-cluster": [(8, ">Q", 65000), (16, ">I", 600)],
    "backing-name-1024": [(8, ">Q", 1000), (16, ">I", 1024)],
    "compression-type-7": [(104, "B", 7)],
    "compression-zstd-without-bit": [(104, "B", 1)],
    "compression-bit-with-zlib": [(72, ">Q", 8)],
    "unknown-incompatible-bit": [(72, ">Q", 1 << 20)],
    "refcount-order-7": [(96, ">I", 7)],
    "refcount-order-7-and-crypt-3": [(96, ">I", 7), (32, ">I", 3)],
    "crypt-method-3": [(32, ">I", 3)],
    "crypt-3-and-l1-too-small": [(32, ">I", 3), (36, ">I", 0)],
    "no-refcount-table": [(56, ">I", 0)],
    "no-refcount-table-and-l1-misaligned": [(56, ">I", 0), (40, ">Q", 0x10001)],
    "refcount-table-too-large": [(56, ">I", 1 << 20)],
    "refcount-table-misaligned": [(48, ">Q", 0x10001)],
    "l1-too-large": [(36, ">I", 1 << 30)],
    "l1-too-small": [(36, ">I", 0)],
    "l1-misaligned": [(40, ">Q", 0x10001)],
    "size-too-big": [(24, ">Q", 1 << 63)],
    "snapshot-table-too-large": [(60, ">I", 1 << 20)],
    "snapshot-table-misaligned": [(64, ">Q", 0x10001)],
    "corrupt-bit": [(72, ">Q", 2)],
}
# qemu-img check skips the snapshot table at open, then fails on a too large one ("Check failed:
# File too large", and -r all rewrites it); vdisk refuses it at open. Both exit 1, untouched.
CHECK_OPEN_DIFFERS = {"snapshot-table-too-large"}


def damaged(tmp, name):
    img = tmp / f"{name}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    fault = CASES[name]
    with open(img, "r+b") as f:
        if isinstance(fault, int):
            f.truncate(fault)
        for off, fmt, val in [] if isinstance(fault, int) else fault:
            f.seek(off)
            f.write(struct.pack(fmt, val))
    return img


def last_error(p, prog):
    lines = p.stderr.strip().splitlines()
    return lines[-1].replace(f"{prog}: ", "", 1) if p.returncode and lines else ""


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("cmd", ["info", "check"])
def test_damaged_header_as_qemu_img(tmp, name, cmd):
    img = damaged(tmp, name)
    before = sha256(img)
    q = qemu_img(cmd, "-f", "qcow2", img, check=False)
    v = vdisk(cmd, "-f", "qcow2", img, check=False)
    assert_not_crashed(v)
    assert sha256(img) == before
    assert v.returncode == q.returncode, f"vdisk {v.stderr}\nqemu-img {q.stderr}"
    if cmd == "check" and name in CHECK_OPEN_DIFFERS:
        assert q.stderr.endswith("qemu-img: Check failed: File too large\n")
        assert v.stderr == f"vdisk: Could not open '{img}': Snapshot table too large\n"
        return
    assert v.stderr.replace("vdisk: ", "") == q.stderr.replace("qemu-img: ", "")
    if cmd == "check" and q.returncode in (0, 2, 3):
        assert v.stdout == q.stdout


@pytest.mark.parametrize("name", ["corrupt-bit", "compression-bit-with-zlib", "l1-misaligned",
                                  "no-refcount-table", "cut-at-90", "unknown-incompatible-bit"])
def test_damaged_header_refused_for_writing_as_qemu_io(tmp, name):
    img = damaged(tmp, name)
    before = sha256(img)
    q = run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", img], check=False)
    v = run([VDISK, "io", "-f", "qcow2", "-c", "write 0 512", img], check=False)
    assert_not_crashed(v)
    assert q.returncode == v.returncode == 1
    assert sha256(img) == before
    qline = q.stderr.strip().splitlines()[-1].replace(f"qemu-io: can't open device {img}: ", "")
    assert last_error(v, "vdisk") == f"Could not open '{img}': {qline}"


def test_unknown_feature_named_by_the_feature_table(tmp):
    """An unknown incompatible bit that the image's feature name table names is reported by
    that name, by both tools."""
    img = tmp / "named.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    with open(img, "r+b") as f:
        hdr = f.read(65536)
        hlen = struct.unpack(">I", hdr[100:104])[0]
        off = hlen
        while True:  # find the feature name table QEMU wrote and add bit 9's entry
            typ, ln = struct.unpack(">II", hdr[off:off + 8])
            assert typ != 0, "no feature table"
            if typ == 0x6803f857:
                break
            off += 8 + ((ln + 7) & ~7)
        rest = hdr[off + 8 + ((ln + 7) & ~7):]
        entry = bytes([0, 9]) + b"teleportation".ljust(46, b"\0")
        f.seek(off + 4)
        f.write(struct.pack(">I", ln + 48))
        f.seek(off + 8 + ln)
        f.write(entry + rest[:65536 - (off + 8 + ln + 48)])
        f.seek(72)
        f.write(struct.pack(">Q", 1 << 9))
    copy = tmp / "copy.qcow2"
    shutil.copyfile(img, copy)
    q = qemu_img("info", "-f", "qcow2", copy, check=False)
    v = vdisk("info", "-f", "qcow2", img, check=False)
    assert "teleportation" in q.stderr
    assert last_error(v, "vdisk").replace(str(img), "X") == \
        last_error(q, "qemu-img").replace(str(copy), "X")


def unaligned_size_image(tmp, name):
    """A 1024-byte qcow2 whose header says 1000 bytes (a crafted size)."""
    p = tmp / name
    qemu_img("create", "-f", "qcow2", p, "1024")
    with open(p, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", 1000))
    return p


def size_field(p):
    with open(p, "rb") as f:
        f.seek(24)
        return struct.unpack(">Q", f.read(8))[0]


def test_size_not_a_sector_multiple_rounds_down_as_qemu(tmp):
    """A header size of 1000 is a 512-byte disk, as QEMU counts it (total_sectors = size / 512):
    info says 512, a write past 512 fails and changes nothing, a write inside leaves the field
    as it was, a resize (even to the same 512) writes the new size, convert copies 512 bytes."""
    q = unaligned_size_image(tmp, "q.qcow2")
    v = tmp / "v.qcow2"
    shutil.copy(q, v)
    assert json.loads(vdisk("info", "--output=json", v).stdout)["virtual-size"] == 512
    assert json.loads(qemu_img("info", "--output=json", q).stdout)["virtual-size"] == 512
    before = sha256(v)
    pv = vdisk("io", "-c", "write -P 0x41 1000 24", v, check=False)
    pq = run(["qemu-io", "-c", "write -P 0x41 1000 24", q], check=False)
    assert_not_crashed(pv)
    assert pq.returncode != 0 and pv.returncode == pq.returncode, (pq, pv)
    assert sha256(v) == before
    vdisk("io", "-c", "write -P 0x41 0 512", v)
    run(["qemu-io", "-c", "write -P 0x41 0 512", q])
    run(["qemu-io", "-c", "read -P 0x41 0 512", v])
    assert size_field(v) == size_field(q) == 1000
    qemu_img("check", v)
    out = tmp / "v.raw"
    vdisk("convert", "-O", "raw", v, out)
    assert out.read_bytes() == b"A" * 512
    for args, want in ((["512"], 512), (["--shrink", "512"], 512), (["2048"], 2048)):
        for tool in (qemu_img, vdisk):
            c = unaligned_size_image(tmp, "r.qcow2")
            tool("resize", c, *args)
            assert size_field(c) == want, (tool, args)
            assert json.loads(qemu_img("info", "--output=json", c).stdout)["virtual-size"] == want
    pq = qemu_img("resize", q, "1000", check=False)
    pv = vdisk("resize", v, "1000", check=False)
    assert pq.returncode == pv.returncode == 1
    assert pv.stderr.replace("vdisk:", "qemu-img:") == pq.stderr
    assert size_field(v) == 1000
