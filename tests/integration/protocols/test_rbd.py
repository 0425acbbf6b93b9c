"""Ceph RBD as storage: vdisk's rbd protocol against a real single-node Ceph (scripts/ceph-dev.sh,
one per module), with QEMU's own rbd driver (qemu-img/qemu-io, qemu-block-extra) as the oracle in
both directions, and a live copy of a running guest's disk onto Ceph while a guest writes over NBD.
"""
import json
import os
import random
import subprocess
import time

import pytest

from conftest import ROOT, VDISK, assert_not_crashed, qemu_img, qemu_io, run, vdisk
from qmp_client import start_vdiskd
from blockops_helpers import Guest, assert_same, write_cmds

# one Ceph cluster (module fixture) serves every test here: keep them on one xdist worker.
pytestmark = pytest.mark.xdist_group("ceph")

MiB = 1 << 20
KiB = 1 << 10
CEPH_DEV = os.path.join(ROOT, "scripts", "ceph-dev.sh")


@pytest.fixture(scope="module")
def ceph(tmp_path_factory):
    """A throwaway cluster for this module; stopped (daemons killed, directory removed) at the end."""
    d = tmp_path_factory.mktemp("ceph") / "cluster"
    try:
        p = run([CEPH_DEV, "start", str(d)], timeout=120)
        yield p.stdout.strip()
    finally:
        run([CEPH_DEV, "stop", str(d)], check=False, timeout=60)


_n = [0]


def rbd_img(conf, stem):
    """A fresh image name in pool rbd (each test its own), as QEMU's filename form."""
    _n[0] += 1
    return f"rbd:rbd/{stem}{_n[0]}:conf={conf}"


def rbd_cli(conf, *args):
    return run(["rbd", "-c", conf, *args], timeout=60)


def pattern_file(path, size, extents):
    """A raw file of size bytes, zero except extents [(off, len, byte)]; returns its bytes."""
    buf = bytearray(size)
    for off, ln, b in extents:
        buf[off:off + ln] = bytes([b]) * ln
    path.write_bytes(bytes(buf))
    return bytes(buf)


def read_rbd_with_qemu(tmp, name, fmt="raw"):
    out = tmp / "qemu-read.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", name, out)
    return out.read_bytes()


def test_create_info_resize(ceph, tmp):
    img = rbd_img(ceph, "cr")
    vdisk("create", "-f", "raw", img, "64M")
    for tool in (vdisk, qemu_img):
        info = json.loads(tool("info", "-f", "raw", "--output=json", img).stdout)
        assert info["virtual-size"] == 64 * MiB and info["format"] == "raw"
    vdisk("resize", "-f", "raw", img, "96M")
    assert json.loads(qemu_img("info", "-f", "raw", "--output=json", img).stdout)[
        "virtual-size"] == 96 * MiB
    p = vdisk("resize", "-f", "raw", img, "32M", check=False)
    assert_not_crashed(p)
    assert p.returncode != 0 and "shrink" in p.stderr
    vdisk("resize", "-f", "raw", "--shrink", img, "32M")
    name = img.split(":")[1]
    assert json.loads(rbd_cli(ceph, "info", "--format=json", name).stdout)["size"] == 32 * MiB
    # An existing image is not overwritten by create (as qemu-img: "File exists").
    p = vdisk("create", "-f", "raw", img, "8M", check=False)
    assert p.returncode != 0 and "exists" in p.stderr


def test_convert_to_rbd_is_sparse_and_qemu_reads_it(ceph, tmp):
    size = 48 * MiB
    src = tmp / "src.raw"
    want = pattern_file(src, size, [(0, MiB, 0x11), (20 * MiB + 3, 5 * KiB, 0x22),
                                    (47 * MiB, MiB, 0x33)])
    img = rbd_img(ceph, "cv")
    vdisk("convert", "-f", "raw", "-O", "raw", src, img)
    # QEMU's rbd driver is the oracle for what vdisk wrote.
    assert "identical" in qemu_img("compare", "-f", "raw", "-F", "raw", src, img).stdout
    assert_same(read_rbd_with_qemu(tmp, img), want, "rbd image read by qemu-img")
    # Sparse: only the three 4 MiB objects holding data are allocated.
    du = json.loads(rbd_cli(ceph, "du", "--format=json", img.split(":")[1]).stdout)
    assert du["images"][0]["used_size"] == 3 * 4 * MiB, du
    # Block status from the object map, as QEMU reports it.
    vmap = json.loads(vdisk("map", "-f", "raw", "--output=json", img).stdout)
    qmap = json.loads(qemu_img("map", "-f", "raw", "--output=json", img).stdout)
    strip = lambda m: [(e["start"], e["length"], e["data"], e["zero"]) for e in m]
    assert strip(vmap) == strip(qmap)
    assert [e["data"] for e in vmap] == [True, False, True, False, True]


def test_vdisk_reads_what_qemu_wrote(ceph, tmp):
    src = tmp / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, 16 * MiB)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x5a {MiB} {3 * MiB}", "-c",
            f"write -P 0xa5 {9 * MiB + 512} 4096", src)
    img = rbd_img(ceph, "qw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", src, img)
    assert "identical" in vdisk("compare", "-f", "qcow2", "-F", "raw", src, img).stdout
    out = tmp / "back.qcow2"
    vdisk("convert", "-f", "raw", "-O", "qcow2", img, out)
    assert "identical" in qemu_img("compare", "-f", "qcow2", "-F", "qcow2", src, out).stdout
    # A difference is found too (the comparison can fail).
    qemu_io("-f", "raw", "-c", f"write -P 0x01 {12 * MiB} 512", img)
    p = vdisk("compare", "-f", "qcow2", "-F", "raw", src, img, check=False)
    assert p.returncode == 1 and str(12 * MiB) in p.stdout


def test_write_zeroes_discard_and_io(ceph, tmp):
    img = rbd_img(ceph, "io")
    vdisk("create", "-f", "raw", img, "16M")
    vdisk("io", "-f", "raw", "-c", f"write -P 0x77 0 {12 * MiB}", "-c",
          f"write -z {MiB} {MiB}", "-c", f"discard {8 * MiB} {4 * MiB}", "-c", "flush", img)
    qemu_io("-f", "raw", "-c", f"read -P 0x77 0 {MiB}", "-c", f"read -P 0 {MiB} {MiB}",
            "-c", f"read -P 0x77 {2 * MiB} {6 * MiB}", "-c", f"read -P 0 {8 * MiB} {8 * MiB}",
            img)
    # The discarded object is gone (sparse again), the written ones stay.
    du = json.loads(rbd_cli(ceph, "du", "--format=json", img.split(":")[1]).stdout)
    assert du["images"][0]["used_size"] == 2 * 4 * MiB, du
    # vdisk reads what qemu-io wrote, unaligned.
    qemu_io("-f", "raw", "-c", f"write -P 0x3c {5 * MiB + 7} 1000", img)
    vdisk("io", "-f", "raw", "-c", f"read -P 0x3c {5 * MiB + 7} 1000", "-c",
          f"read -P 0x77 {5 * MiB + 1007} 9", img)


def test_qcow2_on_rbd(ceph, tmp):
    img = rbd_img(ceph, "q2")
    vdisk("create", "-f", "qcow2", img, "32M")
    qemu_io("-f", "qcow2", "-c", f"write -P 0x42 0 {3 * MiB}", img)
    vdisk("io", "-f", "qcow2", "-c", f"read -P 0x42 0 {3 * MiB}", "-c",
          f"write -P 0x24 {20 * MiB} {2 * MiB}", img)
    vdisk("check", "-f", "qcow2", img)
    qemu_img("check", "-f", "qcow2", img)
    qemu_io("-f", "qcow2", "-c", f"read -P 0x24 {20 * MiB} {2 * MiB}", "-c",
            f"read -P 0 {3 * MiB} {17 * MiB}", img)


def test_snapshot_is_read_only_and_frozen(ceph, tmp):
    img = rbd_img(ceph, "sn")
    vdisk("create", "-f", "raw", img, "8M")
    vdisk("io", "-f", "raw", "-c", "write -P 0x61 0 1M", img)
    name = img.split(":")[1]
    rbd_cli(ceph, "snap", "create", f"{name}@s1")
    vdisk("io", "-f", "raw", "-c", "write -P 0x62 0 1M", img)
    snap = img.replace(name, f"{name}@s1")
    p = vdisk("io", "-f", "raw", "-c", "write -P 0x63 0 4k", snap, check=False)
    assert_not_crashed(p)
    assert "not permitted" in (p.stdout + p.stderr)
    vdisk("io", "-f", "raw", "-c", "read -P 0x61 0 1M", snap)
    qemu_io("-f", "raw", "-r", "-c", "read -P 0x61 0 1M", snap)
    qemu_io("-f", "raw", "-c", "read -P 0x62 0 1M", img)


@pytest.mark.parametrize("name,msg", [
    ("rbd:", "pool name is required"),
    ("rbd:rbd", "pool name is required"),
    ("rbd:rbd/:conf={conf}", "image name is empty"),
    ("rbd:rbd/x:conf", "not KEY=VALUE"),
    ("rbd:nopool/x:conf={conf}", "cannot open pool 'nopool'"),
    ("rbd:rbd/missing:conf={conf}", "cannot open image 'missing'"),
    ("rbd:rbd/missing@s:conf={conf}", "cannot open image 'missing' at snapshot s"),
    ("rbd:rbd/missing:conf=/nonexistent.conf", "cannot read the Ceph configuration"),
])
def test_bad_names_fail_cleanly(ceph, name, msg):
    p = vdisk("info", "-f", "raw", name.format(conf=ceph), check=False)
    assert_not_crashed(p)
    assert p.returncode == 1 and msg in p.stderr, p.stderr


def test_blockdev_add_rbd_options(ceph, tmp):
    """blockdev-add driver=rbd with QEMU's option names; unsupported ones are refused."""
    img = rbd_img(ceph, "bd")
    vdisk("create", "-f", "raw", img, "4M")
    qemu_io("-f", "raw", "-c", "write -P 0x19 0 4M", img)
    image = img.split(":")[1].split("/")[1]
    d = start_vdiskd(tmp)
    q = d.client()
    try:
        q.cmd("blockdev-add", driver="raw", node_name="r0",
              file={"driver": "rbd", "pool": "rbd", "image": image, "conf": ceph})
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert nodes["r0"]["image"]["virtual-size"] == 4 * MiB
        err = q.error("blockdev-add", {"driver": "rbd", "node-name": "r1", "pool": "rbd",
                                       "image": image, "conf": ceph, "key-secret": "s"})
        assert "key-secret" in err
        err = q.error("blockdev-add", {"driver": "rbd", "node-name": "r2", "pool": "rbd",
                                       "conf": ceph})
        assert "image" in err
        err = q.error("blockdev-add", {"driver": "rbd", "node-name": "r3", "pool": 5,
                                       "image": image, "conf": ceph})
        assert "pool" in err
        q.close()
        d.stop_checked()
    finally:
        q.close()
        d.kill()


def test_live_copy_of_running_guest_onto_ceph(ceph, tmp):
    """A guest's local qcow2 chain copied live onto a Ceph image (raw, full) while the guest writes
    over NBD; pivot; the guest then runs from Ceph through vdiskd's export; byte-exact vs a model,
    read back through QEMU's rbd driver."""
    size = 16 * MiB
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, size)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {4 * MiB}", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x22 {6 * MiB} {2 * MiB}", top)
    model = bytearray(size)
    model[0:4 * MiB] = b"\x11" * (4 * MiB)
    model[6 * MiB:8 * MiB] = b"\x22" * (2 * MiB)
    img = rbd_img(ceph, "live")
    vdisk("create", "-f", "raw", img, size)
    image = img.split(":")[1].split("/")[1]

    sock = str(tmp / "nbd.sock")
    d = start_vdiskd(tmp, "--blockdev", json.dumps({
        "driver": "qcow2", "node-name": "disk0",
        "file": {"driver": "file", "filename": str(top)}}),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
    q = d.client()
    uri = f"nbd+unix:///disk0?socket={sock}"
    rng = random.Random(10)
    try:
        q.cmd("blockdev-add", driver="raw", node_name="ceph0",
              file={"driver": "rbd", "pool": "rbd", "image": image, "conf": ceph})
        q.cmd("blockdev-mirror", job_id="c0", device="disk0", target="ceph0", sync="full",
              speed=4 * MiB)
        g = Guest(uri, write_cmds(model, rng, 60, 0, hi=size))
        g.start()
        g.join_checked(120)
        q.cmd("block-job-set-speed", device="c0", speed=0)
        q.get_event("BLOCK_JOB_READY", timeout=60)
        g = Guest(uri, write_cmds(model, rng, 30, 80, hi=size))
        g.start()
        g.join_checked(120)
        source_frozen = bytes(model)
        q.cmd("block-job-complete", device="c0")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in done["data"], done
        # The guest now runs from Ceph: its writes land there, the local image stays as it was.
        g = Guest(uri, write_cmds(model, rng, 30, 160, hi=size))
        g.start()
        g.join_checked(120)
        out = tmp / "guest.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", uri, out)
        assert_same(out.read_bytes(), bytes(model), "guest's view after the pivot")
        q.close()
        d.stop_checked()
    finally:
        q.close()
        d.kill()
    assert_same(read_rbd_with_qemu(tmp, img), bytes(model), "Ceph image read by QEMU's rbd")
    local = tmp / "local.raw"
    qemu_img("convert", "-O", "raw", top, local)
    assert_same(local.read_bytes(), source_frozen, "local image after the pivot")


def test_virsh_blockcopy_onto_ceph_as_readme_shows(ceph, tmp):
    """`vdisk blockcopy disk0 rbd:... --format raw --pivot` creates the image, copies, pivots;
    then the README's move to another host sharing the Ceph cluster."""
    src = tmp / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, 8 * MiB)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x44 {MiB} {3 * MiB}", src)
    img = rbd_img(ceph, "vc")
    sock = str(tmp / "nbd.sock")
    d = start_vdiskd(tmp, "--blockdev", json.dumps({
        "driver": "qcow2", "node-name": "disk0",
        "file": {"driver": "file", "filename": str(src)}}),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
    uri = f"nbd+unix:///disk0?socket={sock}"
    try:
        p = vdisk("blockcopy", "--socket", d.qmp_path, "disk0", img, "--format", "raw",
                  "--verbose", "--pivot", timeout=120)
        assert "Successfully pivoted" in p.stdout
        qemu_io("-f", "raw", "-c", "write -P 0x55 0 64k", uri)
        # The README's move to another host on the same Ceph: A lets the image go ...
        q = d.client()
        node = [e for e in q.cmd("query-block-exports") if e["id"] == "exp0"][0]["node-name"]
        q.cmd("block-export-del", id="exp0")
        end = time.time() + 30
        while q.cmd("query-block-exports"):
            assert time.time() < end, "export not removed"
            time.sleep(0.05)
        q.cmd("blockdev-del", node_name=node)
        q.close()
        d.stop_checked()
    finally:
        d.kill()
    # ... and "host B" serves the same RBD image; the guest continues there.
    pool_image = img.split(":")[1]
    sock_b = str(tmp / "nbd-b.sock")
    db = start_vdiskd(tmp, "--blockdev", json.dumps({
        "driver": "raw", "node-name": "disk0",
        "file": {"driver": "rbd", "pool": pool_image.split("/")[0],
                 "image": pool_image.split("/")[1], "conf": ceph}}),
        "--nbd-server", f"addr.type=unix,addr.path={sock_b}",
        "--export", "type=nbd,id=disk0,node-name=disk0,name=disk0,writable=on")
    try:
        qemu_io("-f", "raw", "-c", f"write -P 0x66 {7 * MiB} 64k",
                f"nbd+unix:///disk0?socket={sock_b}")
        db.stop_checked()
    finally:
        db.kill()
    want = bytearray(8 * MiB)
    want[MiB:4 * MiB] = b"\x44" * (3 * MiB)
    want[0:64 * KiB] = b"\x55" * (64 * KiB)
    want[7 * MiB:7 * MiB + 64 * KiB] = b"\x66" * (64 * KiB)
    assert_same(read_rbd_with_qemu(tmp, img), bytes(want), "Ceph image after blockcopy and move")
    # The guest's post-pivot write went to Ceph only.
    qemu_io("-f", "qcow2", "-c", "read -P 0 0 64k", src)


def test_librbd_is_loaded_only_when_an_rbd_node_opens(tmp):
    """librbd is dlopen'ed on first use: a vdisk that never touches Ceph does not load it (so a
    broken or absent librbd costs nothing), and an rbd open reports why it cannot load it."""
    fake = tmp / "libs"
    fake.mkdir()
    (fake / "librados.so.2").write_bytes(b"not an ELF file")
    env = dict(os.environ, LD_LIBRARY_PATH=str(fake))
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    p = subprocess.run([VDISK, "info", str(img)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert "file format: qcow2" in p.stdout
    p = subprocess.run([VDISK, "info", "rbd:rbd/none"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert_not_crashed(p)
    assert p.returncode == 1
    assert "cannot load librbd" in p.stderr and "librados.so.2" in p.stderr, p.stderr
    maps = subprocess.run(["ldd", VDISK], capture_output=True, text=True, timeout=60).stdout
    assert "librbd" not in maps and "librados" not in maps, maps
