"""External snapshots of a running guest through vdiskd (blockdev-snapshot-sync, blockdev-snapshot).

A guest (qemu-io over NBD, one request at a time) writes while the snapshot is taken. Afterwards the
old top must hold exactly the writes acknowledged before the switch - the model after some prefix of
the guest's writes - and the guest must see all of them: none lost, none reordered across the switch.
Overlay headers are compared with what qemu-storage-daemon 7.2 writes; qemu-img check must be clean.
"""
import random
import subprocess
import threading

from conftest import qemu_img
from blockops_helpers import (MiB, KiB, SIZE, make_chain, Served, guest_read,
                              image_content, assert_same, chain_info, check_clean,
                              wait_status)


def gen_ops(rng, n):
    ops = []
    for i in range(n):
        length = rng.randrange(512, 64 * KiB)
        off = rng.randrange(0, SIZE - length)
        ops.append((off, length, (i % 250) + 1 if rng.random() < 0.85 else None))
    return ops


def ops_cmds(ops):
    """qemu-io arguments; a 1 ms pause after each write keeps the guest busy for >= len(ops) ms
    (plus the writes' own latency, which grows with the machine's load as the snapshot's does),
    so a snapshot taken once the guest is under way lands in the middle of its writes."""
    cmds = []
    for off, length, pat in ops:
        cmds += ["-c", f"write -P {pat} {off} {length}" if pat else f"write -z {off} {length}",
                 "-c", "sleep 1"]
    return cmds


def apply(model, op):
    off, length, pat = op
    model[off:off + length] = bytes([pat]) * length if pat else bytes(length)


def switch_point(initial, ops, old_top):
    """The k such that old_top == initial + ops[:k] (none lost, none reordered), else fail."""
    model = bytearray(initial)
    if bytes(model) == old_top:
        return 0
    for k, op in enumerate(ops, 1):
        apply(model, op)
        if bytes(model) == old_top:
            return k
    raise AssertionError("the old top is not the disk after any prefix of the guest's writes")


def run_guest_around(s, ops, action, started=10):
    """Run the guest; once it has acknowledged `started` writes (qemu-io's line-buffered output
    says so), do action while the rest (>= 1 ms each) are still to come; wait for the guest.

    Event-driven: a fixed 0.3 s sleep before the action could end before a slow qemu-io (startup
    alone takes ~0.2 s on a loaded machine) wrote anything, and the snapshot then came first."""
    p = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", *ops_cmds(ops), s.uri],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, cv = [], threading.Condition()

    def reader():
        for line in p.stdout:
            with cv:
                out.append(line)
                cv.notify_all()
        with cv:
            out.append(None)  # EOF
            cv.notify_all()
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        with cv:
            ok = cv.wait_for(lambda: None in out or
                             sum(ln.startswith("wrote ") for ln in out) >= started, timeout=60)
        assert ok and None not in out, "guest did not get going:\n" + "".join(out[:-1])
        action()
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        t.join(10)
    text = "".join(ln for ln in out if ln is not None)
    assert p.returncode == 0 and "fail" not in text.lower() and "error" not in text.lower(), text
    assert sum(ln.startswith("wrote ") for ln in out if ln) == len(ops), text[-2000:]


def test_snapshot_sync_under_guest_writes(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    initial = bytes(model)
    s = Served(tmp_path, top, need=("blockdev-snapshot-sync",))
    ops = gen_ops(random.Random(21), 500)
    try:
        q = s.q
        run_guest_around(s, ops, lambda: q.cmd("blockdev-snapshot-sync", node_name="disk0",
                                               snapshot_file="snap1.qcow2",
                                               snapshot_node_name="snap1"))
        for op in ops:
            apply(model, op)
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view")
        # The new node is named; the old top keeps its name and is now the overlay's backing.
        assert "busy" in q.error("blockdev-snapshot-sync", {"node-name": "disk0",
                                                            "snapshot-file": "x.qcow2",
                                                            "snapshot-node-name": "x"})
        q.cmd("blockdev-snapshot-sync", node_name="snap1", snapshot_file=str(tmp_path / "snap2.qcow2"),
              snapshot_node_name="snap2", format="qcow2")
        s.stop()
    finally:
        s.close()
    snap1, snap2 = tmp_path / "snap1.qcow2", tmp_path / "snap2.qcow2"
    # As QSD: the backing is recorded by the name the old top was opened with.
    assert chain_info(snap1) == [("snap1.qcow2", "top.qcow2", "qcow2"),
                                 ("top.qcow2", "mid.qcow2", "qcow2"),
                                 ("mid.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    assert chain_info(snap2)[0] == ("snap2.qcow2", "snap1.qcow2", "qcow2")
    k = switch_point(initial, ops, image_content(tmp_path, top, "top.raw"))
    assert 0 < k < len(ops), f"the snapshot did not happen while the guest wrote (k={k})"
    assert_same(image_content(tmp_path, snap2, "snap2.raw"), bytes(model), "whole chain")
    info = qemu_img("info", "--output=json", snap1).stdout
    assert '"virtual-size": %d' % SIZE in info
    check_clean(base, mid, top, snap1, snap2)


def test_blockdev_snapshot_under_guest_writes(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    initial = bytes(model)
    ov = tmp_path / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", ov)
    s = Served(tmp_path, top, need=("blockdev-snapshot",))
    ops = gen_ops(random.Random(22), 500)
    try:
        q = s.q
        q.cmd("blockdev-add", driver="qcow2", node_name="ov",
              file={"driver": "file", "filename": str(ov)}, backing=None)
        run_guest_around(s, ops, lambda: q.cmd("blockdev-snapshot", node="disk0", overlay="ov"))
        for op in ops:
            apply(model, op)
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view")
        assert q.error("blockdev-snapshot", {"node": "disk0", "overlay": "ov"}) in (
            "The overlay already has a backing image",
            "Node 'disk0' is busy: node is used as backing hd of 'ov'")
        s.stop()
    finally:
        s.close()
    assert chain_info(ov)[0] == ("ov.qcow2", "top.qcow2", "qcow2")
    k = switch_point(initial, ops, image_content(tmp_path, top, "top.raw"))
    assert 0 < k < len(ops), f"the snapshot did not happen while the guest wrote (k={k})"
    assert_same(image_content(tmp_path, ov, "ov.raw"), bytes(model), "whole chain")
    check_clean(base, mid, top, ov)


def test_snapshot_errors(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top, need=("blockdev-snapshot-sync", "blockdev-snapshot")) as s:
        q = s.q
        e = q.error
        assert e("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": "x.qcow2"}) \
            == "New overlay node-name missing"
        assert e("blockdev-snapshot-sync", {"node-name": "nosuch", "snapshot-file": "y.qcow2",
                                            "snapshot-node-name": "y"}) == \
            "Cannot find device='' nor node-name='nosuch'"
        assert e("blockdev-snapshot-sync", {"snapshot-file": "y.qcow2"}) == \
            "Cannot find device='' nor node-name=''"
        assert e("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": "y.qcow2",
                                            "snapshot-node-name": "disk0"}) == \
            "New overlay node-name already in use"
        assert "is missing" in e("blockdev-snapshot-sync", {"node-name": "disk0"})
        assert e("blockdev-snapshot", {"node": "nosuch", "overlay": "disk0"}) == \
            "Cannot find device='nosuch' nor node-name='nosuch'"
        assert e("blockdev-snapshot", {"node": "disk0", "overlay": "nosuch"}) == \
            "Cannot find device='nosuch' nor node-name='nosuch'"
        assert not (tmp_path / "x.qcow2").exists() and not (tmp_path / "y.qcow2").exists()
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view")
    assert chain_info(top)[0] == ("top.qcow2", "mid.qcow2", "qcow2")


def test_mirror_and_stream_commit_exclude_each_other_without_exports(tmp_path):
    """The claims do not depend on an NBD export serving the device: a mirror refuses stream,
    commit and snapshots of its source, and a stream/commit refuses a mirror, both ways."""
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top, need=("block-stream", "block-commit", "drive-mirror")) as s:
        q = s.q
        q.cmd("block-export-del", id="exp0")
        q.get_event("BLOCK_EXPORT_DELETED", timeout=10)
        q.cmd("drive-mirror", job_id="m0", device="disk0", target=str(tmp_path / "m.qcow2"),
              sync="full", format="qcow2", speed=64 * KiB)
        busy = "Node 'disk0' is busy: block device is in use by block job: mirror"
        assert q.error("block-stream", {"job-id": "s0", "device": "disk0"}) == busy
        assert q.error("block-commit", {"job-id": "c0", "device": "disk0"}) == busy
        assert q.error("blockdev-snapshot-sync", {"node-name": "disk0",
                                                  "snapshot-file": "x.qcow2",
                                                  "snapshot-node-name": "x"}) == busy
        q.cmd("block-job-cancel", device="m0", force=True)
        q.get_event("BLOCK_JOB_CANCELLED", timeout=10)
        wait_status(q, "m0", "null")
        for job, args in (("stream", {"job_id": "s1", "device": "disk0", "speed": 64 * KiB}),
                          ("commit", {"job_id": "s1", "device": "disk0", "speed": 64 * KiB})):
            q.cmd("block-" + job, **args)
            assert q.error("drive-mirror", {"job-id": "m1", "device": "disk0", "sync": "full",
                                            "target": str(tmp_path / "never.qcow2")}) == \
                f"Node 'disk0' is busy: block device is in use by block job: {job}"
            assert not (tmp_path / "never.qcow2").exists()
            q.cmd("block-job-cancel", device="s1", force=True)
            q.get_event("BLOCK_JOB_CANCELLED", timeout=10)
            wait_status(q, "s1", "null")
            q.events.clear()
    check_clean(base, mid, top)


def test_refused_while_a_job_uses_the_device(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top, need=("blockdev-snapshot-sync", "block-stream", "drive-mirror")) as s:
        q = s.q
        q.cmd("drive-mirror", job_id="m0", device="disk0", target=str(tmp_path / "m.qcow2"),
              sync="full", format="qcow2", speed=64 * KiB)
        busy = "Node 'disk0' is busy: block device is in use by block job: mirror"
        assert q.error("blockdev-snapshot-sync", {"node-name": "disk0",
                                                  "snapshot-file": "x.qcow2",
                                                  "snapshot-node-name": "x"}) == busy
        assert q.error("block-stream", {"job-id": "s0", "device": "disk0"}) == busy
        q.cmd("block-job-cancel", device="m0", force=True)
        q.get_event("BLOCK_JOB_CANCELLED", timeout=10)
        q.cmd("block-stream", job_id="s1", device="disk0", speed=64 * KiB)
        assert q.error("blockdev-snapshot-sync", {"node-name": "disk0",
                                                  "snapshot-file": "x.qcow2",
                                                  "snapshot-node-name": "x"}) == \
            "Node 'disk0' is busy: block device is in use by block job: stream"
        q.cmd("block-job-cancel", device="s1")
        q.get_event("BLOCK_JOB_CANCELLED", timeout=10)
        assert not (tmp_path / "x.qcow2").exists()
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view")
    check_clean(base, mid, top)
