"""vdisk snapshot (qcow2 internal snapshots) against qemu-img 7.2 as the oracle, both directions.

Snapshots vdisk creates are listed, applied, read (convert -l) and checked clean by qemu-img;
snapshots qemu-img creates are applied and deleted by vdisk; the table, messages and exit codes
match qemu-img's. Contents are compared with a model of what the guest wrote.
"""
import os
import random
import struct

import pytest

from conftest import (GuestModel, assert_qemu_check_clean, assert_same_guest_content, io_cmds,
                      qemu_img, qemu_io_cmds, run, sha256, vdisk, vdisk_io, VDISK)

MiB = 1 << 20
SIZE = 8 * MiB
ENV_UTC = dict(os.environ, TZ="UTC")


def list_snapshots(tool, img):
    cmd = [VDISK] if tool == "vdisk" else ["qemu-img"]
    return run([*cmd, "snapshot", "-l", str(img)], check=True).stdout


def snapshot_content(img, name, out):
    """What qemu-img reads from the snapshot (convert -l), as a raw file."""
    qemu_img("convert", "-U", "-f", "qcow2", "-l", f"snapshot.name={name}", "-O", "raw", img, out)
    return out


def vdisk_check_clean(img):
    p = vdisk("check", img, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def random_ops(rng, n, size=SIZE):
    ops = []
    for i in range(n):
        length = rng.choice([512, 4096, 65536, 3 * 65536 + 512, rng.randrange(1, 200000)])
        off = rng.randrange(0, size - length)
        r = rng.random()
        if r < 0.7:
            ops.append(("write", off, length, i % 250 + 1))
        elif r < 0.85:
            ops.append(("zero", off, length))
        else:
            ops.append(("discard", off, length))
    return ops


IMAGE_KINDS = {
    "default": [],
    "v2": ["-o", "compat=0.10"],
    "c512": ["-o", "cluster_size=512"],
    "extl2": ["-o", "extended_l2=on,cluster_size=128k"],
    "refbits2": ["-o", "refcount_bits=2"],
    "lazy": ["-o", "lazy_refcounts=on"],
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_snapshots_by_vdisk_read_back_by_qemu(tmp, kind):
    """vdisk takes snapshots between writes; each one reads (qemu-img convert -l) as the model did
    when it was taken, the active image as the model now; check is clean for both tools."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", *IMAGE_KINDS[kind], img, SIZE)
    cluster = 512 if kind == "c512" else (128 << 10 if kind == "extl2" else 65536)
    model = GuestModel(SIZE, cluster_size=cluster, v3=kind != "v2")
    rng = random.Random(kind)
    saved = {}
    nsnap = 2 if kind == "refbits2" else 3  # refcount_bits=2 holds at most 3 references
    for i in range(nsnap):
        ops = random_ops(rng, 12)
        # alternate the writer: vdisk io and qemu-io both write around the snapshots
        (vdisk_io if i % 2 else qemu_io_cmds)(img, io_cmds(ops))
        model.apply_all(ops)
        vdisk("snapshot", "-c", f"s{i}", img)
        saved[f"s{i}"] = bytes(model.data)
    ops = random_ops(rng, 12)
    vdisk_io(img, io_cmds(ops))
    model.apply_all(ops)
    assert_qemu_check_clean(img)
    vdisk_check_clean(img)
    for name, data in saved.items():
        ref = tmp / f"{name}.ref"
        ref.write_bytes(data)
        assert_same_guest_content(snapshot_content(img, name, tmp / f"{name}.raw"), ref, "raw")
    assert_same_guest_content(img, model.save(tmp / "now.ref"))
    assert list_snapshots("vdisk", img) == list_snapshots("qemu-img", img)


def test_refcount_overflow_refused_without_change(tmp):
    """refcount_bits=2 allows three references: the fourth snapshot fails like qemu-img's
    (-EINVAL), and leaves no trace (qemu-img leaks a cluster there; vdisk undoes its increments)."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=2", img, SIZE)
    qemu_io_cmds(img, ["write -P 5 0 256k"])
    for name in ("a", "b"):
        vdisk("snapshot", "-c", name, img)
    p = vdisk("snapshot", "-c", "c", img, check=False)
    assert p.returncode == 1
    assert p.stderr == "vdisk: Could not create snapshot 'c': -22 (Invalid argument)\n"
    assert_qemu_check_clean(img)
    assert "c" not in list_snapshots("qemu-img", img).split()


def test_refcount_bits_1_refused_unchanged(tmp):
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=1", img, SIZE)
    qemu_io_cmds(img, ["write -P 5 0 64k"])
    before = sha256(img)
    p = vdisk("snapshot", "-c", "s", img, check=False)
    assert (p.returncode, p.stderr) == (1, "vdisk: Could not create snapshot 's': -22 "
                                           "(Invalid argument)\n")
    assert sha256(img) == before


def test_qemu_snapshots_applied_and_deleted_by_vdisk(tmp):
    """qemu-img creates; vdisk applies one (qemu-io reads the old data back, by name and by id)
    and deletes them; qemu-img check stays clean and finds the clusters freed."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    model = GuestModel(SIZE)
    rng = random.Random(7)
    saved = []
    for i in range(3):
        ops = random_ops(rng, 10)
        qemu_io_cmds(img, io_cmds(ops))
        model.apply_all(ops)
        qemu_img("snapshot", "-c", f"q{i}", img)
        saved.append(bytes(model.data))
    ops = random_ops(rng, 10)
    qemu_io_cmds(img, io_cmds(ops))
    vdisk("snapshot", "-a", "q1", img)             # by name
    assert_qemu_check_clean(img)
    ref = tmp / "ref"
    ref.write_bytes(saved[1])
    assert_same_guest_content(img, ref)
    vdisk("snapshot", "-a", "1", img)              # by id
    ref.write_bytes(saved[0])
    assert_same_guest_content(img, ref)
    # writes after apply must leave the snapshots intact
    vdisk_io(img, ["write -P 99 0 1M"])
    ref.write_bytes(saved[0])
    assert_same_guest_content(snapshot_content(img, "q0", tmp / "q0.raw"), ref, "raw")
    for name in ("q1", "q0", "q2"):
        vdisk("snapshot", "-d", name, img)
        assert_qemu_check_clean(img)
    assert list_snapshots("qemu-img", img) == ""
    assert list_snapshots("vdisk", img) == ""
    # with every snapshot gone, what is left is one image's worth of clusters
    qemu_img("check", "-r", "all", img)
    fresh = tmp / "fresh.qcow2"
    qemu_img("convert", "-O", "qcow2", img, fresh)
    assert_same_guest_content(img, fresh, "qcow2", "qcow2")


def test_vdisk_snapshot_applied_and_deleted_by_qemu(tmp):
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    qemu_io_cmds(img, ["write -P 1 0 1M", "write -c -P 2 2M 64k", "write -z 3M 64k"])
    vdisk("snapshot", "-c", "v", img)
    qemu_io_cmds(img, ["write -P 3 0 2M", "write -P 4 2M 64k"])
    qemu_img("snapshot", "-a", "v", img)
    assert_qemu_check_clean(img)
    vdisk_io(img, ["read -P 1 0 1M", "read -P 2 2M 64k", "read -P 0 3M 64k", "read -P 0 1M 1M"])
    qemu_img("snapshot", "-d", "v", img)
    assert_qemu_check_clean(img)
    vdisk_check_clean(img)


def test_list_matches_qemu_img(tmp):
    """Same table, byte for byte (ids, duplicate and empty names, long names, dates, icount)."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    qemu_img("snapshot", "-c", "by-qemu", img)
    vdisk("snapshot", "-c", "dup", img)
    vdisk("snapshot", "-c", "dup", img)
    vdisk("snapshot", "-c", "", img)
    vdisk("snapshot", "-c", "a-rather-long-snapshot-name-that-pushes-columns", img)
    q = run(["qemu-img", "snapshot", "-l", str(img)]).stdout
    v = run([VDISK, "snapshot", "-l", str(img)]).stdout
    assert q == v and q.count("\n") == 7
    assert run([VDISK, "snapshot", "-q", "-U", "-l", str(img)]).stdout == q
    assert vdisk("info", img).stdout == qemu_img("info", img).stdout.replace("qemu-img", "vdisk")
    # -d takes the first snapshot of that name (qemu-img's rule); ids are never reused
    vdisk("snapshot", "-d", "dup", img)
    ids = [line.split()[0] for line in list_snapshots("qemu-img", img).splitlines()[2:]]
    assert ids == ["1", "3", "4", "5"]
    vdisk("snapshot", "-c", "next", img)
    assert list_snapshots("qemu-img", img).splitlines()[-1].split()[:2] == ["6", "next"]


def test_vm_state_and_unknown_extra_data_left_alone(tmp):
    """A snapshot entry with VM state size and extra data vdisk does not know survives other
    snapshots' creation and deletion byte for byte (only its offset in the table moves)."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    qemu_img("snapshot", "-c", "vm", img)
    # rewrite the entry: vm_state_size 4096 (32-bit field and the 64-bit extra field), and
    # 8 bytes of extra data after the 24 QEMU knows, growing the table in place (it has room)
    with open(img, "r+b") as f:
        f.seek(60)
        nb, off = struct.unpack(">IQ", f.read(12))
        assert nb == 1
        f.seek(off)
        ent = bytearray(f.read(40 + 24 + 1 + 2))
        id_len, name_len = struct.unpack(">HH", ent[12:16])
        extra_len = struct.unpack(">I", ent[36:40])[0]
        assert (extra_len, id_len, name_len) == (24, 1, 2)
        ent[32:36] = struct.pack(">I", 4096)
        ent[36:40] = struct.pack(">I", 32)
        extra = bytearray(ent[40:64])
        extra[0:8] = struct.pack(">Q", 4096)
        extra += b"\xde\xad\xbe\xef\x01\x02\x03\x04"
        new = bytes(ent[:40]) + bytes(extra) + b"1" + b"vm"
        new += bytes(-len(new) % 8)
        f.seek(off)
        f.write(new)
    before = list_snapshots("qemu-img", img)
    assert "4 KiB" in before
    vdisk("snapshot", "-c", "other", img)
    vdisk("snapshot", "-d", "other", img)
    assert list_snapshots("qemu-img", img) == before
    with open(img, "rb") as f:
        f.seek(60)
        nb, off = struct.unpack(">IQ", f.read(12))
        f.seek(off)
        assert f.read(len(new)) == new
    assert_qemu_check_clean(img)


def test_backing_chain_overlay_snapshot(tmp):
    """A snapshot of an overlay keeps reading through the backing file where it did."""
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, SIZE)
    qemu_io_cmds(base, ["write -P 1 0 4M"])
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io_cmds(top, ["write -P 2 1M 64k"])
    vdisk("snapshot", "-c", "s", top)
    vdisk_io(top, ["write -P 3 0 2M", "discard 2M 1M"])
    vdisk("snapshot", "-a", "s", top)
    qemu_io_cmds(top, ["read -P 1 0 1M", "read -P 2 1M 64k", "read -P 1 1088k 2944k"])
    assert_qemu_check_clean(top)


ERROR_CASES = [
    (["-a", "nope"], "qcow2"),
    (["-d", "nope"], "qcow2"),
    (["-c", "s"], "raw"),
    (["-a", "s"], "raw"),
    (["-d", "s"], "raw"),
    (["-U", "-c", "x"], "qcow2"),
    (["-U", "-d", "x"], "qcow2"),
]


@pytest.mark.parametrize("args,fmt", ERROR_CASES, ids=[" ".join(a) + " " + f for a, f in ERROR_CASES])
def test_errors_match_qemu_img(tmp, args, fmt):
    """Same message (after the program name) and exit code; the image is not modified."""
    img = tmp / f"a.{fmt}"
    qemu_img("create", "-f", fmt, img, SIZE)
    if fmt == "qcow2":
        qemu_img("snapshot", "-c", "x", img)
    before = sha256(img)
    q = run(["qemu-img", "snapshot", *args, str(img)], check=False)
    v = run([VDISK, "snapshot", *args, str(img)], check=False)
    assert v.returncode == q.returncode == 1
    qlast = [line for line in q.stderr.splitlines() if line.startswith("qemu-img: ")]
    vlast = [line for line in v.stderr.splitlines() if line.startswith("vdisk: ")]
    assert [line[len("vdisk: "):] for line in vlast] == [line[len("qemu-img: "):] for line in qlast]
    assert sha256(img) == before


@pytest.mark.parametrize("args", [["-l", "-c", "x", "IMG"], ["-a"], ["-x", "IMG"], ["IMG", "IMG"], ["IMG"]])
def test_usage_matches_qemu_img(tmp, args):
    """Usage errors: qemu-img's lines (program name aside) and exit code; no action: exit 0."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    before = sha256(img)
    argv = [str(img) if a == "IMG" else a for a in args]
    q = run(["qemu-img", "snapshot", *argv], check=False)
    v = run([VDISK, "snapshot", *argv], check=False)
    assert v.returncode == q.returncode
    # qemu-img's lines, its "Try 'qemu-img --help'" hint included (the program's name aside)
    assert v.stderr == q.stderr.replace("qemu-img", "vdisk")
    assert sha256(img) == before
