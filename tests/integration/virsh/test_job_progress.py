"""Honest progress and control of a live copy (issue 9, item 4).

query-block-jobs keeps QEMU 7.2's members and adds QEMU 8.2's actively-synced plus vdisk's phase,
dirty bytes, copy and dirty rates and time to READY; offset never reaches len before READY;
block-job-change switches the copy mode as QEMU 8.2 (background -> write-blocking only); vdisk
blockjob --verbose shows it. A real NBD client writes throughout; the copy is checked with
qemu-img compare after the pivot.
"""
import contextlib
import time

import pytest

from qmp_client import QMPClient, QMPError
from test_virsh_cli import Server, NbdGuest, make_chain, domblklist, same_content

MiB = 1 << 20
QEMU_MEMBERS = {"device", "type", "len", "offset", "busy", "paused", "speed", "io-status",
                "ready", "status", "auto-finalize", "auto-dismiss"}


def job_info(q, dev="disk0"):
    jobs = [j for j in q.cmd("query-block-jobs") if j["device"] == dev]
    assert len(jobs) == 1, jobs
    return jobs[0]


def wait_copy_rate(q, timeout=60):
    """Poll (bounded) until the copy rate shows (two samples at least 1 s apart) or READY; offset
    never reaches len before READY meanwhile."""
    end = time.time() + timeout
    while True:
        info = job_info(q)
        assert info["ready"] or info["offset"] < info["len"], info
        if info["vdisk-copy-rate"] > 0 or info["ready"]:
            return info
        assert time.time() < end, info
        time.sleep(0.3)


@contextlib.contextmanager
def guest_on_chain(tmp, seed):
    """vdiskd serving make_chain's top with an NBD guest writing into [4M, 6M) (5 writes done)."""
    (base, top), ref = make_chain(tmp)
    srv = Server("vdiskd", tmp, top)
    g = None
    try:
        model = bytearray(ref.read_bytes())
        g = NbdGuest(srv.nbd, model, seed=seed, lo=4 * MiB, hi=6 * MiB)
        g.start()
        g.wait_writes(5)
        yield srv, g, model, base
    finally:
        if g is not None and g.is_alive():
            g.stop_ev.set()
            g.join(60)
        srv.stop()


@pytest.fixture
def copying(tmp):
    """A blockcopy at 1 MiB/s (about 5 s of work) with a guest writing through the export."""
    with guest_on_chain(tmp, 5) as (srv, g, model, _):
        p = srv.run("blockcopy", "exp0", tmp / "copy.qcow2", "--bandwidth", "1")
        assert p.stdout == "Block Copy started\n"
        with QMPClient(srv.qmp) as q:
            yield srv, q, g, model


def test_progress_fields_before_and_after_ready(tmp, copying):
    srv, q, g, model = copying
    info = job_info(q)
    assert QEMU_MEMBERS <= set(info), info
    assert info["ready"] is False and info["vdisk-phase"] == "copying", info
    assert info["actively-synced"] is False
    assert info["offset"] < info["len"], info  # never 100 % before READY
    assert info["vdisk-dirty-bytes"] > 0
    info = wait_copy_rate(q)
    if not info["ready"]:
        assert info["vdisk-dirty-rate"] >= 0
        if info["vdisk-copy-rate"] > info["vdisk-dirty-rate"]:
            assert info["vdisk-eta-ready"] >= 0
        else:
            assert "vdisk-eta-ready" not in info
        v = srv.run("blockjob", "exp0", "--info", "--verbose").stdout
        assert v.startswith("    Bandwidth limit: 1048576 bytes/s (1.000 MiB/s)\n    Phase: "
                            "copying, dirty "), v
        assert ", copy rate " in v and ", dirty rate " in v, v
    q.cmd("block-job-set-speed", device="disk0", speed=0)
    q.get_event("BLOCK_JOB_READY", timeout=60)
    info = job_info(q)  # ready; the guest's writes may add work again (offset < len), as QEMU
    assert info["ready"], info
    assert info["vdisk-eta-ready"] == 0 and info["vdisk-phase"] == "mirroring", info
    g.stop_checked()
    srv.run("blockjob", "exp0", "--pivot")
    assert domblklist(srv) == [["exp0", str(tmp / "copy.qcow2")]]


def test_active_commit_progress_fields(tmp):
    """An active commit at 1 MiB/s with a guest writing: mirror's progress members (phase, dirty
    bytes, rates, ETA; actively-synced false: guest writes reach base only through the job's
    copies), never 100 % before READY; after the pivot base holds the guest's disk."""
    with guest_on_chain(tmp, 6) as (srv, g, model, base):
        p = srv.run("blockcommit", "exp0", "--active", "--bandwidth", "1")
        assert p.stdout == "Active Block Commit started\n", p.stdout
        with QMPClient(srv.qmp) as q:
            info = job_info(q)
            assert QEMU_MEMBERS <= set(info) and info["type"] == "commit", info
            assert info["ready"] is False and info["vdisk-phase"] == "copying", info
            assert info["actively-synced"] is False and info["offset"] < info["len"], info
            end = time.time() + 30  # the job's first scan of the top marks what it holds
            while info["vdisk-dirty-bytes"] == 0:
                assert time.time() < end and not info["ready"], info
                time.sleep(0.1)
                info = job_info(q)
            assert info["vdisk-dirty-bytes"] <= 5 * MiB, info  # the top: 2 MiB + the guest's 2 MiB
            info = wait_copy_rate(q)
            if not info["ready"]:
                assert info["vdisk-copied-bytes"] > 0 and info["vdisk-dirty-rate"] >= 0, info
                if info["vdisk-copy-rate"] > info["vdisk-dirty-rate"]:
                    assert info["vdisk-eta-ready"] >= 0, info
                else:
                    assert "vdisk-eta-ready" not in info, info
                v = srv.run("blockjob", "exp0", "--info", "--verbose").stdout
                assert "    Phase: copying, dirty " in v and ", copy rate " in v, v
            q.cmd("block-job-set-speed", device=info["device"], speed=0)
            q.get_event("BLOCK_JOB_READY", timeout=60)
            info = job_info(q)
            assert info["ready"] and info["vdisk-eta-ready"] == 0, info
            assert info["vdisk-phase"] == "mirroring" and info["actively-synced"] is False, info
            g.stop_checked()
        srv.run("blockjob", "exp0", "--pivot")
        assert domblklist(srv) == [["exp0", str(base)]]
    raw = tmp / "model.raw"
    raw.write_bytes(bytes(model))
    same_content(base, raw)


def test_block_job_change_to_write_blocking(tmp, copying):
    srv, q, g, model = copying
    assert job_info(q)["vdisk-copy-mode"] == "background"
    q.cmd("block-job-change", id="disk0", type="mirror", **{"copy-mode": "background"})  # same
    q.cmd("block-job-change", id="disk0", type="mirror", **{"copy-mode": "write-blocking"})
    assert job_info(q)["vdisk-copy-mode"] == "write-blocking"
    e = q.error("block-job-change", {"id": "disk0", "type": "mirror",
                                     "copy-mode": "background"})
    assert "not implemented" in e, e
    q.cmd("block-job-set-speed", device="disk0", speed=0)
    q.get_event("BLOCK_JOB_READY", timeout=60)
    g.wait_writes(5)
    # ready, write-blocking and nothing dirty: actively synced (bounded poll: the last dirty
    # ranges of the background phase are copied by the job)
    end = time.time() + 30
    while not job_info(q)["actively-synced"]:
        assert time.time() < end, job_info(q)
        time.sleep(0.1)
    info = job_info(q)
    assert info["vdisk-dirty-bytes"] == 0, info
    g.stop_checked()
    v = srv.run("blockjob", "exp0", "--verbose").stdout
    assert "Phase: mirroring" in v and "ready in 0 s" in v and "actively synced: yes" in v, v
    srv.run("blockjob", "exp0", "--pivot")
    seen = tmp / "seen.raw"
    from conftest import qemu_img
    qemu_img("convert", "-f", "raw", "-O", "raw", srv.uri(), seen)
    assert seen.read_bytes() == bytes(model)
    srv.stop()
    qemu_img("compare", "-U", "-F", "raw", tmp / "copy.qcow2", seen)


@pytest.mark.parametrize("args,msg", [
    ({"id": "disk0", "type": "mirror"}, "Parameter 'copy-mode' is missing"),
    ({"id": "disk0", "type": "commit", "copy-mode": "write-blocking"},
     "Parameter 'copy-mode' is unexpected"),
    ({"id": "disk0", "type": "commit"}, "Job type mirror doesn't match requested type commit"),
    ({"id": "disk0", "type": "mirror", "copy-mode": 1}, "Invalid parameter type"),
    ({"id": "disk0", "type": "mirror", "copy-mode": "fast"}, "does not accept value"),
    ({"id": 7, "type": "mirror", "copy-mode": "write-blocking"}, "Invalid parameter type"),
])
def test_block_job_change_bad_input(tmp, copying, args, msg):
    srv, q, g, model = copying
    e = q.error("block-job-change", args)
    assert msg in e, e
    assert job_info(q)["vdisk-copy-mode"] == "background"  # unchanged


def test_block_job_change_unknown_job(tmp, copying):
    srv, q, g, model = copying
    e = q.error("block-job-change", {"id": "nope", "type": "mirror",
                                     "copy-mode": "write-blocking"}, cls="DeviceNotActive")
    assert e == "Block job 'nope' not found"
