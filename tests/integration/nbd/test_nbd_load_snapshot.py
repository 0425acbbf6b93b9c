"""vdiskd serving a qcow2 internal snapshot read-only (qemu-nbd -l's job), with qemu-nbd -l as
the oracle: the same snapshot read through both servers is the same bytes, and is what the guest
had written when the snapshot was taken; the image is never modified by serving it."""
import subprocess

import pytest

from conftest import (GuestModel, io_cmds, qemu_img, qemu_io, qemu_io_cmds, run, sha256, vdisk,
                      VDISKD, wait_unix_listening)
from nbd_helpers import start_daemon
from qmp_client import QMPError, file_node

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def image(tmp):
    """a.qcow2 with snapshots s1 (by vdisk) and s2 (by qemu-img) over different data, and newer
    data in the active layer; returns (path, {snapshot: model bytes})."""
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    model = GuestModel(SIZE)
    saved = {}
    steps = [
        ([("write", 0, 2 * MiB, 1), ("write", 5 * MiB, 64 << 10, 9)], "s1", vdisk),
        ([("write", MiB, MiB, 2), ("zero", 5 * MiB, 4096), ("discard", 0, 128 << 10)], "s2",
         qemu_img),
        ([("write", 0, 4 * MiB, 3)], None, None),
    ]
    for ops, name, tool in steps:
        qemu_io_cmds(img, io_cmds(ops))
        model.apply_all(ops)
        if name:
            tool("snapshot", "-c", name, img)
            saved[name] = bytes(model.data)
    saved["active"] = bytes(model.data)
    return img, saved


def serve(tmp, blockdev, name="snap"):
    return start_daemon(tmp, None, name=name, writable=False, blockdev=blockdev)


def nbd_read_all(uri, out):
    run(["nbdcopy", uri, str(out)])
    return out.read_bytes()


@pytest.mark.parametrize("snap", ["s1", "s2", "1", "2"])
def test_vdiskd_serves_snapshot_like_qemu_nbd(tmp, image, snap):
    img, saved = image
    expect = saved[{"1": "s1", "2": "s2"}.get(snap, snap)]
    before = sha256(img)
    d = serve(tmp, f"driver=qcow2,node-name=n0,read-only=on,snapshot={snap},"
                   f"file.driver=file,file.filename={img}")
    try:
        got = nbd_read_all(d.uri("snap"), tmp / "v.raw")
        # the export is read-only: a write is refused by the server
        p = qemu_io("-f", "raw", "-c", "write 0 512", d.uri("snap"), check=False)
        assert "Operation not permitted" in p.stdout + p.stderr or p.returncode != 0
    finally:
        assert d.stop() == 0, d.output()
        d.kill()
    assert got == expect
    # the oracle: qemu-nbd -l serving the same snapshot
    qsock = tmp / "q.sock"
    q = subprocess.Popen(["qemu-nbd", "-r", "-l", snap, "-f", "qcow2", "-k", str(qsock),
                          "-x", "q", str(img)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_unix_listening(qsock, q)
        assert nbd_read_all(f"nbd+unix:///q?socket={qsock}", tmp / "q.raw") == got
    finally:
        q.terminate()
        q.wait(timeout=30)
    assert sha256(img) == before


def test_snapshot_node_by_qmp_blockdev_add(tmp, image, vd):
    img, saved = image
    c = vd.client()
    node = {"driver": "qcow2", "node-name": "sn", "read-only": True, "snapshot": "s2",
            "file": file_node(img)}
    c.cmd("blockdev-add", **node)
    info = [n for n in c.cmd("query-named-block-nodes") if n["node-name"] == "sn"][0]
    assert info["ro"] is True
    sock = tmp / "n.sock"
    c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    c.cmd("block-export-add", type="nbd", id="e", **{"node-name": "sn"}, name="sn")
    assert nbd_read_all(f"nbd+unix:///sn?socket={sock}", tmp / "o.raw") == saved["s2"]
    with pytest.raises(QMPError) as e:
        c.cmd("block-export-add", type="nbd", id="w", **{"node-name": "sn"}, name="w",
              writable=True)
    assert e.value.error["class"] == "GenericError"
    c.cmd("block-export-del", id="e")
    c.close()


@pytest.mark.parametrize("opts,msg", [
    ("read-only=off,snapshot=s1", "'snapshot' (an internal snapshot) can only be opened with "
                                  "read-only=true"),
    ("read-only=on,snapshot=nope", "Can't find snapshot 'nope'"),
])
def test_bad_snapshot_option_refused(tmp, image, opts, msg):
    img, _ = image
    before = sha256(img)
    p = run([VDISKD, "--blockdev", f"driver=qcow2,node-name=n0,{opts},file.driver=file,"
             f"file.filename={img}"], check=False, timeout=30)
    assert p.returncode == 1 and p.stderr == f"vdiskd: --blockdev: {msg}\n", p.stderr
    assert sha256(img) == before


def test_snapshot_option_is_qcow2_only(tmp):
    raw = tmp / "r.raw"
    qemu_img("create", "-f", "raw", raw, MiB)
    p = run([VDISKD, "--blockdev", f"driver=raw,node-name=n0,read-only=on,snapshot=x,"
             f"file.driver=file,file.filename={raw}"], check=False, timeout=30)
    assert p.returncode == 1 and "snapshot" in p.stderr
