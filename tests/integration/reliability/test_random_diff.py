"""Seeded randomized differential test of vdisk's qcow2 write path.

Thousands of writes / zero writes / discards at unaligned offsets and lengths go through `vdisk io`
(many -c commands per process, several processes, so metadata is re-read between batches; one
case drives the same through stdin) and through a Python model of the guest-visible content.
Afterwards `qemu-img check` must be clean and `qemu-img compare` must find the image equal to the
model. The same ops also go through qemu-io on a twin image, which proves the model is QEMU's
behaviour and gives vdisk's read path a QEMU-written image to read.

Seed: $VDISK_TEST_SEED, else random; it is printed in every failure message.
Scale: $VDISK_TEST_SCALE multiplies the number of ops.
"""
import json
import os
import random
import shutil

import pytest

from conftest import (GuestModel, assert_map_agrees, assert_not_crashed, io_cmds, qemu_img, qemu_info, qemu_io_cmds,
                      run, scaled, vdisk, vdisk_io, VDISK)

MiB = 1 << 20
SEED = int(os.environ.get("VDISK_TEST_SEED", random.SystemRandom().randrange(1 << 31)))
BATCH = 400


def gen_ops(rnd, size, cluster, n):
    ops = []
    for _ in range(n):
        r = rnd.random()
        if r < 0.6:
            kind = "write"
        elif r < 0.8:
            kind = "zero"
        else:
            kind = "discard"
        if rnd.random() < 0.15:      # near a cluster boundary
            off = max(0, rnd.randrange(size // cluster) * cluster + rnd.randint(-700, 700))
        else:
            off = rnd.randrange(size)
        x = rnd.random()
        if x < 0.5:
            ln = rnd.randint(1, 4096)
        elif x < 0.9:
            ln = rnd.randint(1, 3 * cluster + 1000)
        else:
            ln = rnd.randint(1, 300 * 1024)
        off = min(off, size - 1)
        ln = max(1, min(ln, size - off))
        if kind == "write":
            ops.append(("write", off, ln, rnd.choice([rnd.randrange(1, 256), 0])))
        else:
            ops.append((kind, off, ln))
    return ops


def first_diff(path, model):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != len(model):
        return f"size {len(data)} != {len(model)}"
    for i in range(0, len(data), 4096):
        if data[i:i + 4096] != model[i:i + 4096]:
            j = next(k for k in range(i, min(i + 4096, len(data))) if data[k] != model[k])
            return f"first difference at byte {j}: image {data[j]:#x} model {model[j]:#x}"
    return None


def ops_touching(ops, off):
    return [(i, op) for i, op in enumerate(ops) if op[0] != "flush" and op[1] <= off < op[1] + op[2]]


def compressible(rnd, size):
    """Data that compresses (runs, text) with some incompressible 4 KiB blocks mixed in."""
    out = bytearray()
    while len(out) < size:
        k = rnd.random()
        if k < 0.5:
            out += bytes([rnd.randrange(256)]) * 4096
        elif k < 0.8:
            out += (b"block %08d of compressible text; " % len(out)) * 120
        else:
            out += rnd.randbytes(4096)
    return bytes(out[:size])


CASES = [
    # (cluster_size, create options, backing: None | "full" | "short" | "compressed" backing,
    #  or "self-compressed": the image itself starts as compressed clusters)
    (512, "", None),
    (4096, "", None),
    (65536, "", None),
    (65536, "", "full"),
    (4096, "", "short"),
    (65536, "extended_l2=on", "full"),
    (4096, "compat=0.10", "full"),
    (65536, "refcount_bits=1,lazy_refcounts=on", None),
    (65536, "", "compressed"),
    (4096, "", "self-compressed"),
    (65536, "compression_type=zstd", "self-compressed"),
]


@pytest.mark.parametrize("cluster,opts,backing", CASES,
                         ids=[f"cs{c}-{o or 'default'}-{b or 'nobacking'}" for c, o, b in CASES])
def test_random_writes(tmp, cluster, opts, backing):
    seed = SEED ^ (cluster * 131 + len(opts) * 7 + len(backing or ""))
    rnd = random.Random(seed)
    size = 4 * MiB
    tag = f"[seed VDISK_TEST_SEED={SEED} case-seed={seed}]"
    o = f"cluster_size={cluster}" + (f",{opts}" if opts else "")

    bdata = None
    bargs = []
    if backing in ("full", "short", "compressed"):
        bsize = size if backing != "short" else 3 * MiB + 4096
        braw = tmp / "base.raw"
        if backing == "compressed":
            bdata = compressible(rnd, bsize)
        else:
            bdata = rnd.randbytes(bsize // 2) + bytes(bsize // 4) + \
                bytes([0x42]) * (bsize - bsize // 2 - bsize // 4)
        braw.write_bytes(bdata)
        c = ["-c"] if backing == "compressed" else []
        qemu_img("convert", *c, "-f", "raw", "-O", "qcow2", braw, tmp / "base.qcow2")
        bargs = ["-b", "base.qcow2", "-F", "qcow2"]

    img, twin = tmp / "v.qcow2", tmp / "q.qcow2"
    initial = None
    if backing == "self-compressed":
        # the image itself starts out as compressed clusters (made by qemu-img convert -c)
        initial = compressible(rnd, size)
        (tmp / "init.raw").write_bytes(initial)
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", o, tmp / "init.raw", twin)
        shutil.copyfile(twin, img)
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", o, *bargs, twin, size)
        vdisk("create", "-f", "qcow2", "-o", o, *bargs, img, size)

    ops = gen_ops(rnd, size, cluster, scaled(1500))
    model = GuestModel(size, cluster, backing=bdata, v3="compat=0.10" not in opts)
    if initial is not None:
        model.data[:] = initial
    model.apply_all(ops)
    model.save(tmp / "model.raw")

    cmds = io_cmds(ops)
    for i in range(0, len(cmds), BATCH):
        qemu_io_cmds(twin, cmds[i:i + BATCH])
    d = first_diff_qemu(twin, tmp / "model.raw", tmp / "twin.raw")
    assert d is None, f"{tag} the model disagrees with qemu-io ({d}); fix the test"

    for i in range(0, len(cmds), BATCH):
        p = vdisk_io(img, cmds[i:i + BATCH], check=False, timeout=300)
        assert_not_crashed(p)
        assert p.returncode == 0, f"{tag} vdisk io batch {i // BATCH}: exit {p.returncode}\n{p.stderr[-2000:]}"

    chk = qemu_img("check", "-f", "qcow2", img, check=False)
    assert chk.returncode == 0, f"{tag} qemu-img check:\n{chk.stdout}{chk.stderr}"
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, tmp / "model.raw", check=False)
    if cmp.returncode != 0:
        qemu_img("convert", "-f", "qcow2", "-O", "raw", img, tmp / "img.raw")
        d = first_diff(tmp / "img.raw", model.data)
        off = int(d.split("byte ")[1].split(":")[0]) if d and "byte " in d else 0
        pytest.fail(f"{tag} image differs from the model: {d}\n"
                    f"ops touching it: {ops_touching(ops, off)[-8:]}")

    # block status: vdisk's map of both images is qemu-img's map
    assert_map_agrees(img)
    assert_map_agrees(twin)
    if "extended_l2=on" in opts:
        # what extended L2 is for: a write allocates only the subclusters it touches, as QEMU's
        # do, so the same writes leave the same guest ranges allocated as data in both images
        assert data_ranges(img) == data_ranges(twin), f"{tag} vdisk allocated otherwise than qemu-io"

    # vdisk reads its own image and QEMU's twin the same way as the model
    vdisk("convert", "-f", "qcow2", "-O", "raw", img, tmp / "v.raw")
    d = first_diff(tmp / "v.raw", model.data)
    assert d is None, f"{tag} vdisk convert of its own image: {d}"
    vdisk("convert", "-f", "qcow2", "-O", "raw", twin, tmp / "vq.raw")
    d = first_diff(tmp / "vq.raw", model.data)
    assert d is None, f"{tag} vdisk convert of qemu-io's twin: {d}"


def data_ranges(img):
    """The guest ranges qemu-img map shows as data held by img itself (not its backing file)."""
    m = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", img).stdout)
    out = []
    for e in m:
        if e["depth"] == 0 and e["data"]:
            if out and out[-1][1] == e["start"]:
                out[-1][1] += e["length"]
            else:
                out.append([e["start"], e["start"] + e["length"]])
    return out


def first_diff_qemu(img, model_raw, out_raw):
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, out_raw)
    with open(model_raw, "rb") as f:
        return first_diff(out_raw, f.read())


def test_random_writes_stdin(tmp):
    """The same kind of workload through `vdisk io` reading commands from stdin, with flushes."""
    seed = SEED ^ 0x5eed
    tag = f"[seed VDISK_TEST_SEED={SEED} case-seed={seed}]"
    rnd = random.Random(seed)
    size, cluster = 4 * MiB, 65536
    img = tmp / "s.qcow2"
    vdisk("create", "-f", "qcow2", img, size)
    ops = gen_ops(rnd, size, cluster, scaled(1000))
    ops = [op for i, op in enumerate(ops) for op in ([op, ("flush",)] if i % 50 == 49 else [op])]
    model = GuestModel(size, cluster).apply_all(ops)
    model.save(tmp / "model.raw")
    p = run([VDISK, "io", "-f", "qcow2", img], input="\n".join(io_cmds(ops)) + "\nflush\n",
            check=False, timeout=300)
    assert_not_crashed(p)
    assert p.returncode == 0, f"{tag} vdisk io (stdin): exit {p.returncode}\n{p.stderr[-2000:]}"
    chk = qemu_img("check", "-f", "qcow2", img, check=False)
    assert chk.returncode == 0, f"{tag} qemu-img check:\n{chk.stdout}{chk.stderr}"
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, tmp / "model.raw", check=False)
    assert cmp.returncode == 0, f"{tag} {cmp.stdout}"
    assert qemu_info(img).get("dirty-flag", False) is False
