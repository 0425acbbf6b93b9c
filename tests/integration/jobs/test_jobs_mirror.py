"""Live block copy through vdiskd: drive-mirror of a qcow2 chain served over NBD while a guest
(qemu-io over NBD) keeps writing; pivot with block-job-complete; then the target is compared byte for
byte with a model of what the guest wrote, and qemu-img check must find it clean. Cancel before ready
must leave the guest on an untouched source. Event and reply shapes follow qemu-storage-daemon 7.2.
"""
import contextlib
import json
import os
import random
import re
import time

import pytest

from conftest import qemu_img, qemu_io, assert_qemu_check_clean
from qmp_client import start_vdiskd
from blockops_helpers import statuses, wait_status, write_cmds


MiB = 1 << 20
SIZE = 8 * MiB


def make_chain(tmp):
    """base: 0x11 in [0, 2M), 0x33 in [6M, 7M); top over base: 0x22 in [2M, 4M), zeroes at 6M+64K."""
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {2 * MiB}", "-c",
            f"write -P 0x33 {6 * MiB} {MiB}", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x22 {2 * MiB} {2 * MiB}", "-c",
            f"write -z {6 * MiB + 65536} 65536", top)
    model = bytearray(SIZE)
    model[0:2 * MiB] = b"\x11" * (2 * MiB)
    model[2 * MiB:4 * MiB] = b"\x22" * (2 * MiB)
    model[6 * MiB:7 * MiB] = b"\x33" * MiB
    model[6 * MiB + 65536:6 * MiB + 131072] = bytes(65536)
    return base, top, model


def start(tmp, top):
    sock = str(tmp / "nbd.sock")
    d = start_vdiskd(tmp, "-v", "--blockdev", json.dumps({
        "driver": "qcow2", "node-name": "disk0",
        "file": {"driver": "file", "filename": str(top)}}),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
    q = d.client()
    names = {c["name"] for c in q.cmd("query-commands")}
    if "drive-mirror" not in names:
        q.close()
        d.kill()
        pytest.fail("this vdiskd does not register the job commands (jobs_qmp_register)")
    return d, q, f"nbd+unix:///disk0?socket={sock}"


@contextlib.contextmanager
def served(tmp, top):
    """start(): the daemon, its QMP client and the guest's URI. A body that returns stops the
    daemon with SIGTERM and checks it (exit 0, no sanitizer report); one that raises kills it."""
    d, q, uri = start(tmp, top)
    try:
        yield d, q, uri
        q.close()
        d.stop_checked()
    finally:
        q.close()
        d.kill()


def guest_writes(uri, model, rng, n, pattern_base):
    """n random writes / write-zeroes through NBD in one qemu-io run, applied to the model."""
    qemu_io("-f", "raw", *write_cmds(model, rng, n, pattern_base, max_len=300 * 1024), uri,
            timeout=120)


def read_image(tmp, path, name):
    out = tmp / name
    qemu_img("convert", "-O", "raw", path, out)
    return out.read_bytes()


def assert_reads(tmp, path, name, expected):
    """The image at path, converted to raw by qemu-img (as tmp/name), holds exactly expected."""
    got = read_image(tmp, path, name)
    assert got == bytes(expected), first_diff(got, expected)


def first_diff(a, b):
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i, a[i], b[i]
    return None


def test_mirror_pivot_with_concurrent_guest(tmp):
    base, top, model = make_chain(tmp)
    tgt = tmp / "tgt.qcow2"
    rng = random.Random(1)
    with served(tmp, top) as (d, q, uri):
        q.cmd("drive-mirror", job_id="m0", device="disk0", target=str(tgt), sync="top",
              format="qcow2", speed=128 * 1024)
        jobs = q.cmd("query-block-jobs")
        assert len(jobs) == 1 and jobs[0]["device"] == "m0" and jobs[0]["type"] == "mirror"
        assert jobs[0]["status"] == "running" and jobs[0]["speed"] == 128 * 1024
        for k in ("len", "offset", "busy", "paused", "io-status", "ready", "auto-finalize",
                  "auto-dismiss"):
            assert k in jobs[0], k
        # The guest writes while the (rate-limited) copy runs.
        guest_writes(uri, model, rng, 60, 0)
        jobs = q.cmd("query-block-jobs")
        # 2 MiB (plus what the guest dirtied) to copy at 128 KiB/s, >= 16 s: the guest wrote
        # while the copy was running, however slowly its 60 writes went (at 1 MiB/s a guest on a
        # loaded machine could outlast the copy and find the job READY).
        assert jobs[0]["status"] == "running" and jobs[0]["offset"] < jobs[0]["len"], jobs
        q.cmd("block-job-set-speed", device="m0", speed=0)
        ready = q.get_event("BLOCK_JOB_READY", timeout=30)
        assert ready["data"]["device"] == "m0" and ready["data"]["type"] == "mirror"
        assert ready["data"]["offset"] == ready["data"]["len"]
        # ... and while ready.
        guest_writes(uri, model, rng, 40, 100)
        q.cmd("block-job-complete", device="m0")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in done["data"], done
        wait_status(q, "m0", "null")
        assert statuses(q, "m0") == ["created", "running", "ready", "waiting", "pending",
                                     "concluded", "null"]
        assert q.cmd("query-block-jobs") == []
        # After the pivot the export serves the target: these writes must land there only.
        source_model = bytes(model)
        guest_writes(uri, model, rng, 20, 200)
        # The pivot's guest-visible pause is measured and logged.
        m = re.search(r"mirror 'm0': pivoted to the target; guest I/O paused (\d+)\.(\d+) ms",
                      d.output())
        assert m, d.output()
        assert int(m.group(1)) < 2000, m.group(0)
    assert_qemu_check_clean(tgt)
    assert_qemu_check_clean(top)
    info = json.loads(qemu_img("info", "--output=json", tgt).stdout)
    # recorded relative to the target (vdisk keeps backing names relative by default)
    assert os.path.realpath(os.path.join(os.path.dirname(str(tgt)), info["backing-filename"])) \
        == os.path.realpath(base)
    assert_reads(tmp, tgt, "tgt.raw", model)
    assert_reads(tmp, top, "top.raw", source_model)
    # Sparse: the shared base was not copied into the target.
    tmap = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", tgt).stdout)
    assert not any(e["data"] and e["depth"] == 0 and e["start"] < 2 * MiB
                   and e["start"] + e["length"] <= 2 * MiB and e["length"] >= MiB for e in tmap)


def test_mirror_cancel_before_ready_leaves_source(tmp):
    base, top, model = make_chain(tmp)
    tgt = tmp / "tgt.qcow2"
    rng = random.Random(2)
    with served(tmp, top) as (d, q, uri):
        q.cmd("drive-mirror", job_id="m1", device="disk0", target=str(tgt), sync="full",
              format="qcow2", speed=64 * 1024)
        guest_writes(uri, model, rng, 30, 7)
        err = q.error("block-job-complete", {"device": "m1"})
        assert err == "Job 'm1' in state 'running' cannot accept command verb 'complete'"
        q.cmd("block-job-cancel", device="m1")
        ev = q.get_event("BLOCK_JOB_CANCELLED", timeout=15)
        assert ev["data"]["device"] == "m1" and ev["data"]["offset"] < ev["data"]["len"]
        wait_status(q, "m1", "null")
        assert statuses(q, "m1") == ["created", "running", "aborting", "concluded", "null"]
        # The guest is still on the source.
        guest_writes(uri, model, rng, 10, 50)
        assert q.cmd("query-block-jobs") == []
        r = q.execute("block-job-cancel", {"device": "m1"})
        assert r["error"]["desc"] == "Block job 'm1' not found", r
        # QEMU's class is DeviceNotActive; GenericError until the server maps ENODEV to it.
        assert r["error"]["class"] in ("DeviceNotActive", "GenericError"), r
    assert_qemu_check_clean(top)
    assert_reads(tmp, top, "top.raw", model)


def node_names(q):
    return {n["node-name"] for n in q.cmd("query-named-block-nodes")}


def test_drive_mirror_target_dropped_after_cancel(tmp):
    """As QEMU, drive-mirror's own target node leaves the graph when the job ends without a pivot
    (hard cancel before ready, soft cancel once ready); its node-name can be reused at once."""
    base, top, model = make_chain(tmp)
    with served(tmp, top) as (d, q, uri):
        q.cmd("drive-mirror", job_id="m5", device="disk0", target=str(tmp / "t5.qcow2"),
              sync="full", format="qcow2", node_name="tgt5", speed=64 * 1024)
        assert "tgt5" in node_names(q)
        q.cmd("block-job-cancel", device="m5")
        q.get_event("BLOCK_JOB_CANCELLED", timeout=15)
        wait_status(q, "m5", "null")
        assert "tgt5" not in node_names(q)
        # Soft cancel of a ready mirror: finished without pivot, the target is dropped too.
        q.cmd("drive-mirror", job_id="m6", device="disk0", target=str(tmp / "t6.qcow2"),
              sync="full", format="qcow2", node_name="tgt5")
        q.get_event("BLOCK_JOB_READY", timeout=30)
        q.cmd("block-job-cancel", device="m6")
        q.get_event("BLOCK_JOB_COMPLETED", timeout=15)
        wait_status(q, "m6", "null")
        assert "tgt5" not in node_names(q)
        assert node_names(q) >= {"disk0"}
        # A pivot keeps it: the export now serves it.
        q.cmd("drive-mirror", job_id="m7", device="disk0", target=str(tmp / "t7.qcow2"),
              sync="full", format="qcow2", node_name="tgt7")
        q.get_event("BLOCK_JOB_READY", timeout=30)
        q.cmd("block-job-complete", device="m7")
        q.get_event("BLOCK_JOB_COMPLETED", timeout=15)
        wait_status(q, "m7", "null")
        assert "tgt7" in node_names(q)
        assert [e["node-name"] for e in q.cmd("query-block-exports")] == ["tgt7"]


def test_job_verbs_over_qmp(tmp):
    base, top, model = make_chain(tmp)
    with served(tmp, top) as (d, q, uri):
        assert q.error("drive-mirror", {"job-id": "9x", "device": "disk0", "sync": "full",
                                        "target": str(tmp / "never.qcow2")}) == \
            "Invalid job ID '9x'"
        assert not (tmp / "never.qcow2").exists()  # refused before any image is created
        q.cmd("drive-mirror", job_id="m2", device="disk0", target=str(tmp / "t2.qcow2"),
              sync="full", format="qcow2", auto_finalize=False, auto_dismiss=False)
        q.get_event("BLOCK_JOB_READY", timeout=30)
        # One mirror per node; a second is refused before any image is created.
        assert q.error("drive-mirror", {"job-id": "m3", "device": "disk0", "sync": "full",
                                        "target": str(tmp / "never.qcow2")}) == \
            "Node 'disk0' is busy: block device is in use by block job: mirror"
        assert not (tmp / "never.qcow2").exists()
        assert q.error("drive-mirror", {"device": "nope", "sync": "full", "target": "x"}) \
            == "Cannot find device='nope' nor node-name='nope'"  # GenericError, as QSD 7.2
        q.cmd("job-pause", id="m2")
        assert q.error("job-pause", {"id": "m2"}) == "Job is already paused"
        j = q.cmd("query-block-jobs")[0]
        assert j["paused"] is True and j["ready"] is True
        q.cmd("job-resume", id="m2")
        assert q.error("job-resume", {"id": "m2"}) == "Can't resume a job that was not paused"
        assert q.error("job-finalize", {"id": "m2"}) == \
            "Job 'm2' in state 'ready' cannot accept command verb 'finalize'"
        assert q.error("job-cancel", {"id": "nope"}) == "Job not found"
        q.cmd("job-complete", id="m2")
        pend = q.get_event("BLOCK_JOB_PENDING", timeout=15)
        assert pend["data"] == {"type": "mirror", "id": "m2"}
        assert q.cmd("query-jobs")[0]["status"] == "pending"
        q.cmd("job-finalize", id="m2")
        q.get_event("BLOCK_JOB_COMPLETED", timeout=15)
        assert q.cmd("query-jobs")[0]["status"] == "concluded"
        q.cmd("job-dismiss", id="m2")
        assert q.cmd("query-jobs") == []
    assert_qemu_check_clean(tmp / "t2.qcow2")
    assert_reads(tmp, tmp / "t2.qcow2", "t2.raw", model)


def test_sigterm_during_mirror_exits_cleanly(tmp):
    """Shutdown with a running job: the job is cancelled, guests' data stays on the source."""
    base, top, model = make_chain(tmp)
    with served(tmp, top) as (d, q, uri):
        q.cmd("drive-mirror", job_id="m3", device="disk0", target=str(tmp / "t3.qcow2"),
              sync="full", format="qcow2", speed=64 * 1024)
        guest_writes(uri, model, random.Random(3), 10, 9)
    assert_qemu_check_clean(top)
    assert_reads(tmp, top, "top.raw", model)


def test_blockdev_mirror_write_blocking_to_added_node(tmp):
    """blockdev-mirror into a node made by blockdev-add; copy-mode write-blocking; pivot."""
    base, top, model = make_chain(tmp)
    tgt = tmp / "bd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", tgt, SIZE)
    rng = random.Random(4)
    with served(tmp, top) as (d, q, uri):
        q.cmd("blockdev-add", driver="qcow2", node_name="tgt0",
              file={"driver": "file", "filename": str(tgt)})
        q.cmd("blockdev-mirror", job_id="m4", device="disk0", target="tgt0", sync="top",
              copy_mode="write-blocking", granularity=65536, buf_size=MiB, speed=MiB)
        j = q.cmd("query-block-jobs")[0]
        assert j["vdisk-copy-mode"] == "write-blocking"
        guest_writes(uri, model, rng, 40, 20)
        q.cmd("block-job-set-speed", device="m4", speed=0)
        q.get_event("BLOCK_JOB_READY", timeout=30)
        guest_writes(uri, model, rng, 20, 80)
        q.cmd("block-job-complete", device="m4")
        q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
        after = bytes(model)
        guest_writes(uri, model, rng, 10, 120)
    assert_qemu_check_clean(tgt)
    assert_reads(tmp, tgt, "bd.raw", model)
    assert_reads(tmp, top, "top.raw", after)


def test_base_node_copies_above_base_and_skips_target_clusters(tmp):
    """vdisk's base-node (seed semantics): base <- sn1 <- sn2, copy sn1+sn2 only, the target's
    backing becomes base, clusters already allocated in an existing target are not copied."""
    base, sn1, model = make_chain(tmp)          # base <- top(=sn1)
    sn2 = tmp / "sn2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", sn2)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x44 {5 * MiB} {MiB}", sn2)
    model[5 * MiB:6 * MiB] = b"\x44" * MiB
    # An existing target over base that already holds sn1's [2M, 3M) (same bytes).
    active = tmp / "active.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", active, SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x22 {2 * MiB} {MiB}", active)
    with served(tmp, sn2) as (d, q, uri):
        q.cmd("drive-mirror", job_id="m5", device="disk0", target=str(active), mode="existing",
              format="qcow2", sync="top", base_node=str(base), auto_dismiss=False)
        ready = q.get_event("BLOCK_JOB_READY", timeout=30)
        # Above base: sn1's 2 MiB + 64K zero + sn2's 1 MiB, minus the 1 MiB the target has.
        assert ready["data"]["len"] <= 2 * MiB + 65536 + 65536, ready
        guest_writes(uri, model, random.Random(5), 20, 30)
        q.cmd("block-job-complete", device="m5")
        q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
        q.cmd("block-job-dismiss", id="m5")
    assert_qemu_check_clean(active)
    info = json.loads(qemu_img("info", "--output=json", active).stdout)
    assert os.path.realpath(os.path.join(str(tmp), info["backing-filename"])) == \
        os.path.realpath(base)
    assert_reads(tmp, active, "active.raw", model)


def test_sync_none_raw_full_and_mirror_back_by_node_name(tmp):
    """sync=none copies only new writes (the target is an overlay of the source); a raw full copy
    gets every byte; a target named with node-name can itself be mirrored after the pivot."""
    base, top, model = make_chain(tmp)
    ov, raw, back = tmp / "overlay.qcow2", tmp / "full.raw", tmp / "back.qcow2"
    rng = random.Random(6)
    with served(tmp, top) as (d, q, uri):
        # sync=none, soft cancel after ready: the overlay holds what the guest wrote meanwhile.
        q.cmd("drive-mirror", job_id="n0", device="disk0", target=str(ov), sync="none",
              format="qcow2")
        q.get_event("BLOCK_JOB_READY", timeout=15)
        guest_writes(uri, model, rng, 15, 40)
        q.cmd("block-job-cancel", device="n0")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=15)
        assert "error" not in done["data"], done
        wait_status(q, "n0", "null")
        # raw, sync=full, pivot, the new node is called "r0".
        q.cmd("drive-mirror", device="disk0", job_id="r", target=str(raw), sync="full",
              format="raw", node_name="r0")
        q.get_event("BLOCK_JOB_READY", timeout=15)
        guest_writes(uri, model, rng, 15, 60)
        q.cmd("block-job-complete", device="r")
        q.get_event("BLOCK_JOB_COMPLETED", timeout=15)
        wait_status(q, "r", "null")
        # Now the export serves r0: mirror it again, by its node name, back to qcow2.
        q.cmd("drive-mirror", device="r0", target=str(back), sync="full", format="qcow2",
              job_id="b")
        guest_writes(uri, model, rng, 15, 80)
        q.get_event("BLOCK_JOB_READY", timeout=15)
        q.cmd("block-job-complete", device="b")
        q.get_event("BLOCK_JOB_COMPLETED", timeout=15)
        guest_writes(uri, model, rng, 5, 100)
    info = json.loads(qemu_img("info", "--output=json", ov).stdout)
    # recorded relative to the target (vdisk keeps backing names relative by default)
    assert os.path.realpath(os.path.join(os.path.dirname(str(ov)), info["backing-filename"])) \
        == os.path.realpath(top)
    assert info["format"] == "qcow2"
    assert_qemu_check_clean(back)
    assert_reads(tmp, back, "back.raw", model)


def test_sigterm_with_pending_and_concluded_jobs(tmp):
    """Shutdown with a job parked in PENDING (auto-finalize off): aborted, no leak, source kept."""
    base, top, model = make_chain(tmp)
    with served(tmp, top) as (d, q, uri):
        q.cmd("drive-mirror", job_id="p0", device="disk0", target=str(tmp / "p0.qcow2"),
              sync="top", format="qcow2", auto_finalize=False, auto_dismiss=False)
        q.get_event("BLOCK_JOB_READY", timeout=15)
        guest_writes(uri, model, random.Random(8), 10, 3)
        q.cmd("block-job-complete", device="p0")
        q.get_event("BLOCK_JOB_PENDING", timeout=15)
    assert_reads(tmp, top, "top.raw", model)


def paused_line(d, pattern, timeout=5):
    """The pivot's log line (written on the QMP thread around the final events)."""
    end = time.time() + timeout
    while True:
        m = re.search(pattern, d.output())
        if m or time.time() > end:
            return m
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_mirror_pivot_of_idle_guest_syncs_nothing_while_paused(tmp, mode):
    """The target is flushed before READY and again at complete while the guest still runs (as
    QEMU's mirror does), so when the guest is idle during the pivot there is nothing left to copy or
    sync while its I/O is drained. vdiskd counts the syncs (fdatasyncs) its QMP thread issues while
    the exports are drained and logs them: 0 here. A count, not a wall-clock threshold. The source
    (the target's temporary backing) is not synced for the target either."""
    base, top, model = make_chain(tmp)
    tgt = tmp / "tgt.qcow2"
    rng = random.Random(31)
    with served(tmp, top) as (d, q, uri):
        q.cmd("drive-mirror", job_id="m5", device="disk0", target=str(tgt), sync="full",
              copy_mode=mode, speed=4 * MiB)
        guest_writes(uri, model, rng, 30, 0)  # while the copy runs
        q.cmd("block-job-set-speed", device="m5", speed=0)
        q.get_event("BLOCK_JOB_READY", timeout=30)
        guest_writes(uri, model, rng, 30, 50)  # while ready: copied (or written through) + flushed
        q.cmd("block-job-complete", device="m5")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in done["data"], done
        m = paused_line(d, r"mirror 'm5': pivoted to the target; guest I/O paused [\d.]+ ms "
                           r"\((\d+) bytes copied while paused, (\d+) syncs while paused\)")
        assert m, d.output()
        assert (int(m.group(1)), int(m.group(2))) == (0, 0), m.group(0)
        guest_writes(uri, model, rng, 10, 100)  # on the target now
    assert_qemu_check_clean(tgt)
    assert_reads(tmp, tgt, "tgt.raw", model)


def test_mirror_complete_while_guest_writes(tmp):
    """block-job-complete while a guest keeps writing: the pre-pivot copy+flush rounds (the later
    ones write-blocking) and the drained tail lose no write; the target reads like the model."""
    import threading
    base, top, model = make_chain(tmp)
    tgt = tmp / "tgt.qcow2"
    rng = random.Random(33)
    with served(tmp, top) as (d, q, uri):
        q.cmd("drive-mirror", job_id="m8", device="disk0", target=str(tgt), sync="full")
        q.get_event("BLOCK_JOB_READY", timeout=30)
        errors = []

        def writer():
            try:
                guest_writes(uri, model, rng, 400, 0)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.3)
        q.cmd("block-job-complete", device="m8")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
        t.join(120)
        assert not t.is_alive() and not errors, errors
        assert "error" not in done["data"], done
        guest_writes(uri, model, rng, 10, 100)  # on the target now
    assert_qemu_check_clean(tgt)
    assert_reads(tmp, tgt, "tgt.raw", model)


@pytest.mark.parametrize("cmd", ["block-export-add", "nbd-server-add", "raw-node-over-source"])
def test_export_added_during_mirror_writes_through_the_copy(tmp, cmd):
    """An export of the source added over QMP while a mirror runs, or an export of a raw node
    added over the source: its writes reach the target (the job hooks every write to the source,
    as QEMU's dirty bitmap sees every writer of the node)."""
    base, top, model = make_chain(tmp)
    tgt = tmp / "late.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", tgt, SIZE)
    rng = random.Random(9)
    with served(tmp, top) as (d, q, uri):
        q.cmd("blockdev-add", driver="qcow2", node_name="tgt0",
              file={"driver": "file", "filename": str(tgt)})
        q.cmd("blockdev-mirror", job_id="m9", device="disk0", target="tgt0", sync="top")
        q.get_event("BLOCK_JOB_READY", timeout=30)
        # everything is copied now: only tracked writes can still reach the target
        if cmd == "block-export-add":
            q.cmd("block-export-add", type="nbd", id="late", node_name="disk0", name="late",
                  writable=True)
        elif cmd == "nbd-server-add":
            q.cmd("nbd-server-add", device="disk0", name="late", writable=True)
        else:
            q.cmd("blockdev-add", driver="raw", node_name="over", file="disk0")
            q.cmd("block-export-add", type="nbd", id="late", node_name="over", name="late",
                  writable=True)
        late = uri.replace("/disk0?", "/late?")
        guest_writes(late, model, rng, 30, 40)
        q.cmd("block-job-complete", device="m9")
        q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
    assert_qemu_check_clean(tgt)
    assert_reads(tmp, tgt, "late.raw", model)


@pytest.mark.parametrize("sync_mode,via", [("background", None), ("write-blocking", None),
                                           ("background", "blkdebug")])
def test_pivot_with_a_writer_through_a_node_over_the_source(tmp, sync_mode, via):
    """A raw node added over the source with its own export: a client writing through it without
    pause while the guest writes too and the mirror pivots. The pivot drains that writer as well as
    the guests (no write races the drained tail) and, as QEMU's node replacement, points the node at
    the target: every write of both, before, during and after the pivot, is in the target.
    via blkdebug: the raw node sits on a blkdebug node whose image names the source, a child link
    the graph walkers must see as well."""
    from blockops_helpers import PipelinedGuest
    base, top, model = make_chain(tmp)
    tgt = tmp / "over.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", tgt, SIZE)
    sock = str(tmp / "nbd.sock")
    writers = []
    try:
        with served(tmp, top) as (d, q, uri):
            q.cmd("blockdev-add", driver="qcow2", node_name="tgt0",
                  file={"driver": "file", "filename": str(tgt)})
            q.cmd("blockdev-mirror", job_id="mo", device="disk0", target="tgt0", sync="top",
                  copy_mode=sync_mode)
            q.get_event("BLOCK_JOB_READY", timeout=30)
            under = "disk0"
            if via:
                q.cmd("blockdev-add", driver="blkdebug", node_name="dbg", image="disk0")
                under = "dbg"
            q.cmd("blockdev-add", driver="raw", node_name="over", file=under)
            q.cmd("block-export-add", type="nbd", id="late", node_name="over", name="late",
                  writable=True)
            # disjoint halves: each writer's order is its own, the model needs no order between them
            writers = [PipelinedGuest(sock, model, random.Random(5), name="late", lo=SIZE // 2),
                       PipelinedGuest(sock, model, random.Random(6), name="disk0", hi=SIZE // 2)]
            for w in writers:
                w.start()
            for w in writers:
                w.wait_batches(5)
            q.cmd("block-job-complete", device="mo")
            done = q.get_event("BLOCK_JOB_COMPLETED", timeout=60)
            assert "error" not in done["data"], done
            after = [w.batches for w in writers]
            for w, n in zip(writers, after):
                w.wait_batches(n + 5)  # both keep writing after the pivot
            for w in writers:
                w.join_checked()
            writers = []
    finally:
        for w in writers:
            w.stop = True
    assert_qemu_check_clean(tgt)
    assert_reads(tmp, tgt, "over.raw", model)


def test_start_waits_for_a_write_in_flight_through_another_node(tmp):
    """A write through a raw node over the source (not an export of the source: the start drains
    those) is still in flight when the mirror starts, held 2 s by nbdkit's delay filter under the
    source. The job's first hook waits for it, so either the first copy of its range reads it or
    the hook marks it; before, it ran on unhooked while the copy read the old data, and the target
    never got it."""
    import subprocess
    import nbd_helpers as H
    src, tgt = tmp / "src.raw", tmp / "delay-tgt.qcow2"
    src.write_bytes(b"\x11" * SIZE)
    model = bytearray(b"\x11" * SIZE)
    qemu_img("create", "-q", "-f", "qcow2", tgt, SIZE)
    kit = tmp / "kit.sock"
    srv = subprocess.Popen(["nbdkit", "-f", "-U", str(kit), "--filter=delay", "file",
                            str(src), "delay-write=2"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    H.wait_path(str(kit), srv)
    sock = str(tmp / "nbd.sock")
    d = start_vdiskd(tmp, "--blockdev", json.dumps({
        "driver": "raw", "node-name": "disk0",
        "file": {"driver": "nbd", "export": "", "server": {"type": "unix", "path": str(kit)}}}),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
    c = None
    try:
        with d.client() as q:
            q.cmd("blockdev-add", driver="raw", node_name="over", file="disk0")
            q.cmd("block-export-add", type="nbd", id="late", node_name="over", name="late",
                  writable=True)
            c = H.RawClient(sock, timeout=30)
            c.greet()
            c.go("late", structured=False)
            off, data = 3 * MiB + 4096, b"\x5a" * (256 * 1024)
            c.request(H.CMD_WRITE, off, len(data), 7, 0, data)
            model[off:off + len(data)] = data
            time.sleep(0.5)  # the write is inside nbdkit's delay now
            q.cmd("blockdev-add", driver="qcow2", node_name="tgt0",
                  file={"driver": "file", "filename": str(tgt)})
            q.cmd("blockdev-mirror", job_id="md", device="disk0", target="tgt0", sync="full")
            cookie, err, _ = c.reply()
            assert (cookie, err) == (7, 0)
            q.get_event("BLOCK_JOB_READY", timeout=60)
            q.cmd("block-job-complete", device="md")
            ev = q.get_event("BLOCK_JOB_COMPLETED", timeout=60)
            assert "error" not in ev["data"], ev
        c.close()
        c = None
        d.stop_checked()
    finally:
        if c:
            c.close()
        d.kill()
        srv.terminate()
        srv.wait()
    assert_qemu_check_clean(tgt)
    assert_reads(tmp, tgt, "delay.raw", model)


def test_pivot_onto_a_target_whose_chain_holds_the_source(tmp):
    """A user-built target chain that contains the source: tgt -> mid -> disk0 (the served
    source). The pivot points the nodes over the source at the target except those the target
    itself reaches (QEMU's should_update_child): mid keeps disk0, no tgt -> mid -> tgt loop, and the
    guest reads and writes the chain on. (QSD refuses this blockdev-mirror outright: disk0 has a
    parent, "Need a root block node"; vdiskd copies a node another one backs when an export serves
    it, so it must repoint without a loop.)"""
    base, top, model = make_chain(tmp)
    mid, tgt = tmp / "mid.qcow2", tmp / "tgt.qcow2"
    for p in (mid, tgt):
        qemu_img("create", "-q", "-f", "qcow2", p, SIZE)
    rng = random.Random(9)
    with served(tmp, top) as (d, q, uri):
        q.cmd("blockdev-add", driver="qcow2", node_name="mid",
              file={"driver": "file", "filename": str(mid)}, backing="disk0")
        q.cmd("blockdev-add", driver="qcow2", node_name="tgt",
              file={"driver": "file", "filename": str(tgt)}, backing="mid")
        q.cmd("blockdev-mirror", job_id="mc", device="disk0", target="tgt", sync="full")
        guest_writes(uri, model, rng, 20, 0)
        q.get_event("BLOCK_JOB_READY", timeout=30)
        q.cmd("block-job-complete", device="mc")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in done["data"], done
        nodes = {n["node-name"]: n.get("backing_file") for n in q.cmd("query-named-block-nodes")}
        assert (nodes["tgt"], nodes["mid"]) == (str(mid), str(top)), nodes
        guest_writes(uri, model, rng, 20, 100)  # after the pivot: into tgt
        qemu_img("convert", "-f", "raw", "-O", "raw", uri, tmp / "guest.raw")
        got = (tmp / "guest.raw").read_bytes()
        assert got == bytes(model), first_diff(got, model)
        assert "backing hd of 'tgt'" in q.error("blockdev-del", {"node-name": "mid"})
    for p in (top, mid, tgt):
        assert_qemu_check_clean(p)
