"""corpus.py - damaged qcow2 images, made from good images that qemu-img/qemu-io built.

build_corpus(dir) returns {name: Damaged}. Each Damaged names the file to open (`path`), the files
of its chain (`files`, for the unchanged-sha256 check) and what it models. The damage is done
with struct on the on-disk layout (docs: QEMU's docs/interop/qcow2.txt), never through a tool, so
the corpus does not depend on the code under test.

Usable standalone: `python3 corpus.py OUTDIR` writes the corpus and lists it.
"""
import os
import random
import shutil
import struct
import subprocess
import sys

QCOW2_MAGIC = b"QFI\xfb"
MiB = 1 << 20

# header field: (offset, struct format)
H = {
    "magic": (0, ">4s"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"), "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
L2_OFFSET_MASK = 0x00fffffffffffe00
COPIED = 1 << 63
COMPRESSED = 1 << 62


class Damaged:
    def __init__(self, name, path, files, what):
        self.name, self.path, self.files, self.what = name, path, list(files), what


def _q(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def _qio(img, *cmds):
    a = []
    for c in cmds:
        a += ["-c", c]
    subprocess.run(["qemu-io", "-f", "qcow2", *a, str(img)], check=True, capture_output=True)


def get(path, field):
    off, fmt = H[field]
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def put(path, field, value):
    off, fmt = H[field]
    poke(path, off, struct.pack(fmt, value))


def poke(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def peek_u64(path, off):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def first_l2(path):
    """Host offset of the L2 table that L1[0] points to."""
    return peek_u64(path, get(path, "l1_table_offset")) & L2_OFFSET_MASK


def make_good(d):
    """Good images made by QEMU: plain v3, compressed, and a 2-deep chain."""
    good = d / "good.qcow2"
    _q("create", "-f", "qcow2", good, "4M")
    _qio(good, "write -P 0x11 0 64k", "write -P 0x22 1M 200k", "write -z 2M 64k",
         "write -P 0x33 3M 4k")
    rnd = random.Random(7)
    raw = d / "comp-src.raw"
    raw.write_bytes(b"".join(bytes([rnd.randrange(4)]) * 512 for _ in range(8192)))
    comp = d / "comp.qcow2"
    _q("convert", "-c", "-f", "raw", "-O", "qcow2", raw, comp)
    os.unlink(raw)
    base = d / "base.qcow2"
    _q("create", "-f", "qcow2", base, "4M")
    _qio(base, "write -P 0x44 0 1M")
    return good, comp, base


def build_corpus(d):
    d.mkdir(parents=True, exist_ok=True)
    good, comp, base = make_good(d)
    out = {}

    def mk(name, what, src=None, mutate=None, files=()):
        p = d / f"{name}.qcow2"
        if src is not None:
            shutil.copyfile(src, p)
        if mutate:
            mutate(p)
        out[name] = Damaged(name, p, [p, *files], what)

    size = os.path.getsize(good)
    l1 = get(good, "l1_table_offset")
    rt = get(good, "refcount_table_offset")
    l2 = first_l2(good)
    rb = peek_u64(good, rt)                       # first refcount block
    data0 = peek_u64(good, l2) & L2_OFFSET_MASK    # host cluster of guest cluster 0

    # --- sizes ---
    mk("empty", "zero-size file", mutate=lambda p: p.write_bytes(b""))
    mk("one-byte", "a 1-byte file", mutate=lambda p: p.write_bytes(b"Q"))
    for cut in (4, 48, 72, 104, 65536, l1 + 4, l2 + 100, data0 + 100, size - 1):
        mk(f"trunc-{cut}", f"good image cut at byte {cut}", good,
           lambda p, c=cut: os.truncate(p, c))
    mk("raw-as-qcow2", "1 MiB of random bytes opened with -f qcow2",
       mutate=lambda p: p.write_bytes(random.Random(1).randbytes(MiB)))

    # --- header fields ---
    mk("bad-magic", "magic QFI\\0", good, lambda p: put(p, "magic", b"QFI\x00"))
    for v in (1, 4, 0xffffffff):
        mk(f"version-{v}", f"version {v}", good, lambda p, v=v: put(p, "version", v))
    for cb in (0, 8, 22, 30, 63, 0xffffffff):
        mk(f"cluster-bits-{cb}", f"cluster_bits {cb}", good,
           lambda p, cb=cb: put(p, "cluster_bits", cb))
    mk("l1-size-huge", "l1_size 0x7fffffff", good, lambda p: put(p, "l1_size", 0x7fffffff))
    mk("l1-size-max", "l1_size 0xffffffff", good, lambda p: put(p, "l1_size", 0xffffffff))
    mk("l1-size-0", "l1_size 0 for a 4 MiB image with data", good, lambda p: put(p, "l1_size", 0))
    mk("l1-past-eof", "L1 table offset past EOF", good,
       lambda p: put(p, "l1_table_offset", 1 << 40))
    mk("l1-misaligned", "L1 table offset not cluster aligned", good,
       lambda p: put(p, "l1_table_offset", l1 + 8))
    mk("l1-on-header", "L1 table on top of the header", good, lambda p: put(p, "l1_table_offset", 0))
    mk("rt-past-eof", "refcount table offset past EOF", good,
       lambda p: put(p, "refcount_table_offset", 1 << 40))
    mk("rt-misaligned", "refcount table offset not cluster aligned", good,
       lambda p: put(p, "refcount_table_offset", rt + 512))
    mk("rt-zero", "refcount table at offset 0", good, lambda p: put(p, "refcount_table_offset", 0))
    mk("rt-clusters-huge", "refcount_table_clusters 0xffffffff", good,
       lambda p: put(p, "refcount_table_clusters", 0xffffffff))
    mk("refcount-order-7", "refcount_order 7 (128-bit refcounts)", good,
       lambda p: put(p, "refcount_order", 7))
    mk("size-huge", "virtual size 2^62 with a small L1", good, lambda p: put(p, "size", 1 << 62))
    mk("header-length-0", "header_length 0", good, lambda p: put(p, "header_length", 0))
    mk("header-length-huge", "header_length 0xffffffff", good,
       lambda p: put(p, "header_length", 0xffffffff))
    mk("snapshots-past-eof", "5 snapshots at an offset past EOF", good,
       lambda p: (put(p, "nb_snapshots", 5), put(p, "snapshots_offset", 1 << 40)))
    mk("snapshots-huge", "nb_snapshots 0xffffffff", good,
       lambda p: (put(p, "nb_snapshots", 0xffffffff), put(p, "snapshots_offset", 65536 * 5)))
    mk("incompat-unknown", "unknown incompatible feature bit 60", good,
       lambda p: put(p, "incompatible_features", 1 << 60))
    mk("incompat-data-file", "external data file bit without a data file", good,
       lambda p: put(p, "incompatible_features", 1 << 2))
    mk("incompat-compression-bogus", "compression type 7", good,
       lambda p: (put(p, "incompatible_features", 1 << 3), put(p, "compression_type", 7)))
    mk("dirty-no-lazy", "dirty bit set on an image without lazy refcounts", good,
       lambda p: put(p, "incompatible_features", 1 << 0))
    mk("corrupt-bit", "corrupt bit set", good, lambda p: put(p, "incompatible_features", 1 << 1))
    for m in (1, 2, 3):
        mk(f"crypt-{m}", f"encryption method {m}", good, lambda p, m=m: put(p, "crypt_method", m))
    mk("ext-len-huge", "header extension with length 0xffffffff", good,
       lambda p: poke(p, get(p, "header_length"), struct.pack(">II", 0x12345678, 0xffffffff)))

    # --- metadata pointing to the wrong places ---
    mk("l2-into-refcount-table", "L1[0] points at the refcount table", good,
       lambda p: poke(p, l1, struct.pack(">Q", COPIED | rt)))
    mk("l2-into-refcount-block", "L1[0] points at a refcount block", good,
       lambda p: poke(p, l1, struct.pack(">Q", COPIED | rb)))
    mk("l2-on-header", "L1[0] points at the header", good,
       lambda p: poke(p, l1, struct.pack(">Q", COPIED | 0)))
    mk("l2-table-past-eof", "L1[0] points past EOF", good,
       lambda p: poke(p, l1, struct.pack(">Q", COPIED | (1 << 40))))
    mk("l2-table-misaligned", "L1[0] not cluster aligned", good,
       lambda p: poke(p, l1, struct.pack(">Q", COPIED | (l2 + 512))))
    mk("l2-entry-past-eof", "L2[0] data cluster past EOF", good,
       lambda p: poke(p, l2, struct.pack(">Q", COPIED | (1 << 40))))
    mk("l2-entry-misaligned", "L2[0] data cluster not cluster aligned", good,
       lambda p: poke(p, l2, struct.pack(">Q", COPIED | (data0 + 512))))
    mk("l2-entry-on-l1", "L2[0] data cluster is the L1 table", good,
       lambda p: poke(p, l2, struct.pack(">Q", COPIED | l1)))
    mk("l2-entry-reserved-bits", "L2[0] with reserved bits 1-8 set", good,
       lambda p: poke(p, l2, struct.pack(">Q", peek_u64(p, l2) | 0x1fe)))

    cl1 = get(comp, "l1_table_offset")
    cl2 = peek_u64(comp, cl1) & L2_OFFSET_MASK
    # 64 KiB clusters: x = 62 - (cluster_bits - 8) = 54 bits of offset, then the sector count
    x = 62 - (16 - 8)
    csize = os.path.getsize(comp)
    mk("compressed-size-huge", "compressed L2 entry with the largest sector count", comp,
       lambda p: poke(p, cl2, struct.pack(">Q", COMPRESSED | (((1 << (62 - x)) - 1) << x) |
                                          (peek_u64(p, cl2) & ((1 << x) - 1)))))
    mk("compressed-past-eof", "compressed L2 entry pointing past EOF", comp,
       lambda p: poke(p, cl2, struct.pack(">Q", COMPRESSED | (1 << 40))))
    mk("compressed-garbage", "compressed cluster data overwritten with garbage", comp,
       lambda p: poke(p, peek_u64(p, cl2) & ((1 << x) - 1), b"\xff" * 512))
    mk("compressed-truncated", "compressed image cut inside its compressed data", comp,
       lambda p: os.truncate(p, csize - 3000))

    # --- backing files ---
    shutil.copyfile(base, d / "b-base.qcow2")
    _q("create", "-f", "qcow2", "-b", "b-base.qcow2", "-F", "qcow2", d / "b-top.qcow2")
    top = d / "b-top.qcow2"
    bfo = get(top, "backing_file_offset")
    mk("backing-name-huge", "backing file name length 0xffffffff", top,
       lambda p: put(p, "backing_file_size", 0xffffffff), files=[d / "b-base.qcow2"])
    mk("backing-name-1024", "backing file name length 1024 (past the header cluster end?)", top,
       lambda p: put(p, "backing_file_size", 1024), files=[d / "b-base.qcow2"])
    mk("backing-offset-past-eof", "backing file name offset past EOF", top,
       lambda p: put(p, "backing_file_offset", 1 << 40), files=[d / "b-base.qcow2"])
    mk("backing-missing", "backing file does not exist", top,
       lambda p: (poke(p, bfo, b"nonexist.qcow2"), put(p, "backing_file_size", 14)))
    # a <- b <- a
    la, lb = d / "loop-a.qcow2", d / "loop-b.qcow2"
    _q("create", "-f", "qcow2", "-u", "-b", "loop-b.qcow2", "-F", "qcow2", la, "4M")
    _q("create", "-f", "qcow2", "-u", "-b", "loop-a.qcow2", "-F", "qcow2", lb, "4M")
    out["backing-loop"] = Damaged("backing-loop", la, [la, lb], "a <- b <- a")
    ls = d / "loop-self.qcow2"
    _q("create", "-f", "qcow2", "-u", "-b", "loop-self.qcow2", "-F", "qcow2", ls, "4M")
    out["backing-self"] = Damaged("backing-self", ls, [ls], "a <- a")
    mk("backing-fmt-bogus", "backing format 'nosuchfmt'", None,
       lambda p: _q("create", "-f", "qcow2", "-u", "-b", "b-base.qcow2", "-F", "qcow2", p, "4M")
       or _set_backing_fmt(p, b"nosuchfmt"), files=[d / "b-base.qcow2"])
    return out


def _set_backing_fmt(p, fmt):
    """Rewrite the backing-format header extension (type 0xe2792aca) in place, same length."""
    with open(p, "r+b") as f:
        hl = get(p, "header_length")
        off = hl
        while True:
            f.seek(off)
            t, ln = struct.unpack(">II", f.read(8))
            if t == 0:
                raise AssertionError("no backing format extension")
            if t == 0xe2792aca:
                f.seek(off + 8)
                f.write(fmt[:ln].ljust(ln, b"\0"))
                if len(fmt) != ln:
                    f.seek(off + 4)
                    f.write(struct.pack(">I", min(len(fmt), ln)))
                return
            off += 8 + (ln + 7) // 8 * 8


if __name__ == "__main__":
    import pathlib
    c = build_corpus(pathlib.Path(sys.argv[1]))
    for k, v in c.items():
        print(f"{k:32} {v.path}  -- {v.what}")
