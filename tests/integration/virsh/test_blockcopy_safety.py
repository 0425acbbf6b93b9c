"""A live copy driven with virsh's flags must never lose data (issue 9, item 1).

vdiskd serves a three-image chain base <- mid <- top as export exp0 (node disk0) while a real NBD
client writes concurrently; `vdisk blockcopy/blockcommit/snapshot-create` drive it. The oracle is
qemu-img compare of the images, opened on their own after the daemon stopped, against a byte model
of everything the guest wrote; refused commands must leave the destination file byte-identical.
"""
import json
import shutil

import pytest

from conftest import qemu_img, qemu_io, sha256
from test_virsh_cli import Server, NbdGuest, make_chain, same_content, backing_of, domblklist

MiB = 1 << 20


def guest_view(srv, tmp, name="seen.raw"):
    out = tmp / name
    qemu_img("convert", "-f", "raw", "-O", "raw", srv.uri(), out)
    return out.read_bytes()


def image_bytes(tmp, img, name):
    out = tmp / name
    qemu_img("convert", "-U", "-O", "raw", img, out)
    return out.read_bytes()


def first_diff(a, b):
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)


def node_names(srv):
    from qmp_client import QMPClient
    with QMPClient(srv.qmp) as q:
        return [n["node-name"] for n in q.cmd("query-named-block-nodes")]


@pytest.fixture
def chain3(tmp):
    (base, mid, top), ref = make_chain(tmp, layers=3)
    srv = Server("vdiskd", tmp, top)
    guest = {}
    try:
        yield base, mid, top, ref, srv, guest
    finally:
        g = guest.get("g")
        if g is not None:
            g.stop_ev.set()
            g.join(60)
        srv.stop()


def start_guest(srv, ref, guest, seed):
    """A guest writing in [4M, 8M) only: what the chain holds below 4M must come from the copy."""
    model = bytearray(ref.read_bytes())
    g = NbdGuest(srv.nbd, model, seed=seed, lo=4 * MiB, hi=8 * MiB)
    guest["g"] = g
    g.start()
    g.wait_writes(10)
    return g, model


def stop_guest(g, guest):
    g.stop_checked()
    guest["g"] = None


def test_shallow_reuse_external_onto_deeper_backing_copies_the_middle(tmp, chain3):
    """The source text's layout: the destination was created backed by base (below mid). The copy
    must bring mid's data too and rebase nothing away: the file alone equals the guest's disk."""
    base, mid, top, ref, srv, guest = chain3
    dest = tmp / "active.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dest)
    g, model = start_guest(srv, ref, guest, seed=11)
    p = srv.run("blockcopy", "exp0", dest, "--shallow", "--reuse-external", "--pivot",
                timeout=120)
    assert p.stdout == "\nSuccessfully pivoted\n", (p.stdout, p.stderr)
    assert domblklist(srv) == [["exp0", str(dest)]]
    g.wait_writes(10)
    stop_guest(g, guest)
    assert guest_view(srv, tmp) == bytes(model)
    srv.stop()
    # the backing name stays as the user wrote it, and the file on its own is the guest's disk
    assert backing_of(dest) == "base.qcow2"
    got = image_bytes(tmp, dest, "dest.raw")
    assert got == bytes(model), f"destination differs at {first_diff(got, bytes(model))}"
    qemu_img("check", "-q", dest)


def test_shallow_reuse_external_onto_foreign_backing_is_refused(tmp, chain3):
    """A destination backed by an image outside the source's chain: refused, file untouched, the
    guest stays on its disk."""
    base, mid, top, ref, srv, guest = chain3
    other = tmp / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", other, 8 * MiB)
    dest = tmp / "active.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "other.qcow2", "-F", "qcow2", dest)
    before = sha256(dest)
    p = srv.run("blockcopy", "exp0", dest, "--shallow", "--reuse-external", "--pivot",
                check=False)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "not part of the source's backing chain" in p.stderr, p.stderr
    assert "--backing-matches" in p.stderr, p.stderr
    assert sha256(dest) == before
    assert domblklist(srv) == [["exp0", str(top)]]
    assert srv.run("blockjob", "exp0", "--info").stdout == "No current block job for exp0\n"


def test_shallow_reuse_external_without_backing_is_refused(tmp, chain3):
    base, mid, top, ref, srv, guest = chain3
    dest = tmp / "active.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", dest, 8 * MiB)
    before = sha256(dest)
    p = srv.run("blockcopy", "exp0", dest, "--shallow", "--reuse-external", "--pivot",
                check=False)
    assert p.returncode == 1 and "has no backing file" in p.stderr, (p.stdout, p.stderr)
    assert sha256(dest) == before
    assert domblklist(srv) == [["exp0", str(top)]]


def test_backing_matches_trusts_a_copy_of_the_base(tmp, chain3):
    """--backing-matches: the user vouches that the foreign backing reads like the source's
    backing (here: a byte copy of mid's chain flattened). Only the top is copied and the
    destination keeps its own backing."""
    base, mid, top, ref, srv, guest = chain3
    copy = tmp / "midcopy.qcow2"
    qemu_img("convert", "-U", "-O", "qcow2", mid, copy)
    dest = tmp / "active.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "midcopy.qcow2", "-F", "qcow2", dest)
    g, model = start_guest(srv, ref, guest, seed=12)
    p = srv.run("blockcopy", "exp0", dest, "--shallow", "--reuse-external", "--backing-matches",
                "--pivot", timeout=120)
    assert p.stdout == "\nSuccessfully pivoted\n", (p.stdout, p.stderr)
    stop_guest(g, guest)
    srv.stop()
    assert backing_of(dest) == "midcopy.qcow2"
    got = image_bytes(tmp, dest, "dest.raw")
    assert got == bytes(model), f"destination differs at {first_diff(got, bytes(model))}"


def own_bytes(img):
    """Bytes the image itself holds (data and zero clusters), not its backing chain."""
    m = json.loads(qemu_img("map", "-U", "--output=json", img).stdout)
    return sum(e["length"] for e in m if e["depth"] == 0)


def test_blockdev_mirror_backing_matches_copies_only_the_top(tmp, chain3):
    """blockdev-mirror x-backing-matches onto a target node opened without its backing (what an
    NBD export of an overlay on another host looks like): the caller vouches that what lies
    below it (a flattened copy of mid's chain, named in its header) reads like the source's
    backing, so the target receives exactly the top's clusters (data and zeroes) and the file
    with its backing reads like the guest's disk; the guest, pivoted, still reads its disk."""
    from qmp_client import QMPClient
    base, mid, top, ref, srv, guest = chain3
    qemu_img("convert", "-U", "-O", "qcow2", mid, tmp / "midcopy.qcow2")
    dest = tmp / "trusted.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "midcopy.qcow2", "-F", "qcow2", dest)
    with QMPClient(srv.qmp) as q:
        q.cmd("blockdev-add", driver="qcow2", backing=None, **{"node-name": "t0"},
              file={"driver": "file", "filename": str(dest)})
        q.cmd("blockdev-mirror", device="disk0", target="t0", sync="top",
              **{"job-id": "m0", "x-backing-matches": True})
        q.get_event("BLOCK_JOB_READY", timeout=120)
        q.cmd("block-job-cancel", device="m0")  # ready: finish without a pivot
        ev = q.get_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" not in ev["data"], ev
        q.cmd("blockdev-del", **{"node-name": "t0"})
    assert guest_view(srv, tmp) == ref.read_bytes()
    srv.stop()
    same_content(dest, ref)
    assert own_bytes(dest) == own_bytes(top)


def test_existing_destination_without_reuse_external_is_refused(tmp, chain3):
    base, mid, top, ref, srv, guest = chain3
    dest = tmp / "precious.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", dest, 8 * MiB)
    qemu_io("-f", "qcow2", "-c", "write -P 0x5c 0 1M", dest)
    before = sha256(dest)
    p = srv.run("blockcopy", "exp0", dest, "--pivot", check=False)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "already exists" in p.stderr and "--reuse-external" in p.stderr, p.stderr
    assert sha256(dest) == before
    assert domblklist(srv) == [["exp0", str(top)]]


def test_commit_after_snapshot_and_active_commit_uses_the_served_chain(tmp, chain3):
    """snapshot, active commit --shallow --pivot (back onto top), then commit mid into base with a
    guest writing: node names stay unique, the served chain loses mid, and top on its own (after
    the daemon stopped) reads what the guest wrote."""
    base, mid, top, ref, srv, guest = chain3
    snap = tmp / "snap.qcow2"
    g, model = start_guest(srv, ref, guest, seed=13)
    srv.run("snapshot-create", "exp0", snap)
    p = srv.run("blockcommit", "exp0", "--active", "--shallow", "--pivot", timeout=120)
    assert p.stdout == "\nSuccessfully pivoted\n", (p.stdout, p.stderr)
    names = node_names(srv)
    assert len(names) == len(set(names)), names
    rows = domblklist(srv, details=True)
    assert [(r[0], r[3]) for r in rows] == [("exp0", str(top)), ("exp0[1]", str(mid)),
                                            ("exp0[2]", str(base))], rows
    p = srv.run("blockcommit", "exp0", "--top", "exp0[1]", "--shallow", "--wait", timeout=120)
    assert p.stdout == "\nCommit complete\n", (p.stdout, p.stderr)
    rows = domblklist(srv, details=True)
    assert [(r[0], r[3]) for r in rows] == [("exp0", str(top)), ("exp0[1]", str(base))], rows
    names = node_names(srv)
    assert len(names) == len(set(names)), names
    g.wait_writes(10)
    stop_guest(g, guest)
    assert guest_view(srv, tmp) == bytes(model)
    srv.stop()
    got = image_bytes(tmp, top, "top.raw")
    assert got == bytes(model), f"top differs at {first_diff(got, bytes(model))}"
    assert backing_of(top) in ("base.qcow2", str(base))
    qemu_img("check", "-q", top)


def test_blockcopy_of_a_middle_layer_is_refused(tmp, chain3):
    """A copy of exp0[1] could only pivot by rewriting the overlay's backing: refused, not a
    "Successfully pivoted" that changed nothing; no file created."""
    base, mid, top, ref, srv, guest = chain3
    dest = tmp / "x.qcow2"
    p = srv.run("blockcopy", "exp0[1]", dest, "--pivot", check=False)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Successfully" not in p.stdout
    assert "backing layer" in p.stderr, p.stderr
    assert not dest.exists()
    assert [r[3] for r in domblklist(srv, details=True)] == [str(top), str(mid), str(base)]


def test_disk_named_by_export_target_name(tmp):
    """The export id is the disk's target name (virsh's vda): every command takes it, with
    libvirt's vda[N] for backing layers."""
    (base, mid, top), ref = make_chain(tmp, layers=3)
    with Server("vdiskd", tmp, top) as srv:
        from qmp_client import QMPClient
        with QMPClient(srv.qmp) as q:
            q.cmd("block-export-add", type="nbd", id="vda", **{"node-name": "disk0"},
                  name="vda", writable=True)
            q.cmd("block-export-del", id="exp0")
        rows = domblklist(srv, details=True)
        assert [r[0] for r in rows] == ["vda", "vda[1]", "vda[2]"], rows
        dest = tmp / "copy.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dest)
        p = srv.run("blockcopy", "vda", dest, "--shallow", "--reuse-external", "--wait")
        assert p.stdout == "\nNow in mirroring phase\n"
        assert srv.run("blockjob", "vda", "--info").stderr == "\rBlock Copy: [100.00 %]"
        srv.run("blockjob", "vda", "--pivot")
        assert domblklist(srv) == [["vda", str(dest)]]
    same_content(dest, ref)
    assert backing_of(dest) == "base.qcow2"
