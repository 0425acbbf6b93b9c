"""block-commit through vdiskd while a guest writes over NBD.

Non-active (top below the guest's image): mid's data goes into base, the guest's image then names
base, and nothing the guest wrote or reads changes. Active (top is the guest's image): the job keeps
base in sync with guest writes, goes READY, and block-job-complete moves the export onto base with no
write lost. Content is compared byte for byte with a model of the original chain plus every guest
write; events and resulting headers follow qemu-storage-daemon 7.2; qemu-img check must be clean.
"""
import random
import re
import time

import pytest

from blockops_helpers import (MiB, KiB, SIZE, make_chain, Served, write_cmds, Guest, guest_read,
                              PipelinedGuest, wait_log, job_under_pipelined_guest,
                              image_content, assert_same, chain_info, statuses, wait_status,
                              check_clean)


def test_commit_intermediate_with_concurrent_guest(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    below_top = image_content(tmp_path, mid, "mid0.raw")  # what base must hold afterwards
    with Served(tmp_path, top, need=("block-commit",)) as s:
        q = s.q
        # 2 MiB of mid's data at 64 KiB/s: >= 30 s of copying, far longer than the guest's 60
        # writes even on a loaded machine under ASan, so the guest really writes while the copy
        # runs (at 1 MiB/s a slow guest outlasted the copy and the overlap check failed).
        q.cmd("block-commit", job_id="c0", device="disk0", top="mid.qcow2", base="base.qcow2",
              speed=64 * KiB)
        jobs = q.cmd("query-block-jobs")
        assert len(jobs) == 1 and jobs[0]["type"] == "commit" and jobs[0]["len"] == SIZE
        rng = random.Random(11)
        Guest(s.uri, write_cmds(model, rng, 60, 0)).run_checked()
        assert q.cmd("query-block-jobs")[0]["status"] == "running", "the guest did not overlap"
        # A stream job needs the same chain: refused while the commit runs.
        assert "is busy" in q.error("block-stream", {"job-id": "s9", "device": "disk0"})
        assert q.error("block-job-complete", {"device": "c0"}) in (
            "The active block job 'c0' cannot be completed",
            "Job 'c0' in state 'running' cannot accept command verb 'complete'")
        q.cmd("block-job-set-speed", device="c0", speed=0)
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"], done
        assert done["data"]["offset"] == done["data"]["len"] == SIZE
        wait_status(q, "c0", "null")
        assert statuses(q, "c0") == ["created", "running", "waiting", "pending", "concluded",
                                     "null"]
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after commit")
        Guest(s.uri, write_cmds(model, rng, 10, 100)).run_checked()
        assert_same(guest_read(tmp_path, s.uri, "g2.raw"), bytes(model), "guest view, later")
    assert chain_info(top) == [("top.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    assert_same(image_content(tmp_path, base, "base.raw"), below_top, "base after commit")
    assert_same(image_content(tmp_path, top, "top.raw"), bytes(model), "chain after commit")
    check_clean(base, mid, top)


def test_active_commit_pivot_with_concurrent_guest(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top, need=("block-commit",)) as s:
        q = s.q
        # top's 1.5 MiB (plus what the guest dirties) at 64 KiB/s: the copy outlasts the guest's
        # 60 writes however slow the machine, so the job cannot be READY when we look.
        q.cmd("block-commit", job_id="c1", device="disk0", speed=64 * KiB)
        rng = random.Random(12)
        Guest(s.uri, write_cmds(model, rng, 60, 0)).run_checked()
        jobs = q.cmd("query-block-jobs")
        assert jobs[0]["status"] == "running" and not jobs[0]["ready"], jobs
        q.cmd("block-job-set-speed", device="c1", speed=0)
        ready = q.get_event("BLOCK_JOB_READY", timeout=20)
        assert ready["data"]["type"] == "commit" and ready["data"]["device"] == "c1"
        assert ready["data"]["offset"] == ready["data"]["len"] > 0
        # While ready, the job keeps base in sync with every write.
        Guest(s.uri, write_cmds(model, rng, 40, 100)).run_checked()
        q.cmd("block-job-complete", device="c1")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"], done
        wait_status(q, "c1", "null")
        assert statuses(q, "c1") == ["created", "running", "ready", "waiting", "pending",
                                     "concluded", "null"]
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after pivot")
        # After the pivot the export serves base: these land in base only.
        Guest(s.uri, write_cmds(model, rng, 20, 200)).run_checked()
        assert_same(guest_read(tmp_path, s.uri, "g2.raw"), bytes(model), "guest view on base")
    # QEMU leaves top and mid as they were (headers included); base holds the guest's disk.
    assert chain_info(top) == [("top.qcow2", "mid.qcow2", "qcow2"),
                               ("mid.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    assert_same(image_content(tmp_path, base, "base.raw"), bytes(model), "base after pivot")
    check_clean(base, mid, top)


def test_commit_errors(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top, need=("block-commit",)) as s:
        q = s.q
        assert q.error("block-commit", {"job-id": "c", "device": "disk0", "top": "mid.qcow2",
                                        "base": "top.qcow2"}) == \
            "Can't find 'top.qcow2' in the backing chain"
        assert q.error("block-commit", {"job-id": "c", "device": "disk0",
                                        "top": "nonex.qcow2"}) == \
            "Top image file nonex.qcow2 not found"
        assert q.error("block-commit", {"job-id": "c", "device": "disk0",
                                        "base": "nonex.qcow2"}) == \
            "Can't find 'nonex.qcow2' in the backing chain"
        assert q.error("block-commit", {"job-id": "c", "device": "disk0", "top": "base.qcow2"}) \
            == "cannot commit an image into itself"
        assert q.error("block-commit", {"job-id": "c", "device": "disk0", "top": "mid.qcow2",
                                        "base": "mid.qcow2"}) == \
            "cannot commit an image into itself"
        assert q.cmd("query-block-jobs") == []
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view")
    check_clean(base, mid, top)


def test_active_commit_soft_cancel_when_ready(tmp_path):
    """block-job-cancel of a ready active commit: base is in sync, the guest stays on top."""
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top, need=("block-commit",)) as s:
        q = s.q
        q.cmd("block-commit", job_id="c2", device="disk0")
        rng = random.Random(13)
        Guest(s.uri, write_cmds(model, rng, 30, 0)).run_checked()
        q.get_event("BLOCK_JOB_READY", timeout=20)
        q.cmd("block-job-cancel", device="c2")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"], done
        wait_status(q, "c2", "null")
        assert statuses(q, "c2") == ["created", "running", "ready", "waiting", "pending",
                                     "concluded", "null"]
        at_cancel = bytes(model)
        Guest(s.uri, write_cmds(model, rng, 20, 100)).run_checked()
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view (still on top)")
    assert chain_info(top)[0] == ("top.qcow2", "mid.qcow2", "qcow2")
    assert_same(image_content(tmp_path, base, "base.raw"), at_cancel, "base at cancel")
    assert_same(image_content(tmp_path, top, "top.raw"), bytes(model), "chain")
    check_clean(base, mid, top)


def test_commit_below_read_only_overlay(tmp_path):
    """Four images: commit mid into base under a guest writing to top2; the overlay above mid
    (top, a read-only backing layer) gets its header rewritten to name base."""
    base, mid, top, model = make_chain(tmp_path)
    from conftest import qemu_img
    top2 = tmp_path / "top2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", top2)
    with Served(tmp_path, top2, need=("block-commit",)) as s:
        q = s.q
        q.cmd("block-commit", job_id="c3", device="disk0", top="mid.qcow2", speed=2 * MiB)
        Guest(s.uri, write_cmds(model, random.Random(14), 40, 0)).run_checked()
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"], done
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after commit")
    assert chain_info(top2) == [("top2.qcow2", "top.qcow2", "qcow2"),
                                ("top.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    assert_same(image_content(tmp_path, top2, "top2.raw"), bytes(model), "chain")
    check_clean(base, mid, top, top2)


def test_commit_cancel_keeps_chain(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top, need=("block-commit",)) as s:
        q = s.q
        # 2 MiB at 64 KiB/s (>= 30 s): still running when the guest is done and we cancel
        q.cmd("block-commit", job_id="c4", device="disk0", top="mid.qcow2", speed=64 * KiB)
        Guest(s.uri, write_cmds(model, random.Random(15), 30, 0)).run_checked()
        q.cmd("block-job-cancel", device="c4")
        ev = q.get_event("BLOCK_JOB_CANCELLED", timeout=10)
        assert ev["data"]["type"] == "commit"
        wait_status(q, "c4", "null")
        assert statuses(q, "c4") == ["created", "running", "aborting", "concluded", "null"]
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after cancel")
        # The chain is whole again: a new commit can run and finish.
        q.cmd("block-commit", job_id="c5", device="disk0", top="mid.qcow2")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"], done
        assert_same(guest_read(tmp_path, s.uri, "g2.raw"), bytes(model), "after the 2nd commit")
    assert chain_info(top) == [("top.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    check_clean(base, mid, top)


def ready_active_commit(tmp_path, job_id):
    """The chain served by vdiskd with an active commit of its top, READY."""
    base, mid, top, model = make_chain(tmp_path)
    s = Served(tmp_path, top, need=("block-commit",))
    try:
        s.q.cmd("block-commit", job_id=job_id, device="disk0")
        s.q.get_event("BLOCK_JOB_READY", timeout=20)
    except BaseException:
        s.close()
        raise
    return base, mid, top, model, s


def pivot_log(s, job_id):
    """vdiskd's log line of the pivot (VDISK_LOG=info): groups are the bytes copied, the syncs made
    and the bytes left unsynced while the guest was drained."""
    pat = re.compile(rf"commit '{job_id}': pivoted to the base; guest I/O paused \d+ us "
                     r"\((\d+) bytes copied while paused, (\d+) syncs while paused, "
                     r"(\d+) bytes left")
    return wait_log(s, pat)


def wait_caught_up(q, job_id, quiet_polls=3, interval=0.2, timeout=60):
    """Wait (bounded) until the job has copied what an idle guest left dirty: vdisk-dirty-bytes 0 in
    several polls in a row (a chunk's bits clear when its copy starts, so one poll could catch a
    copy still in flight). Without it, complete could race the last copies on a loaded machine
    and find a tail to copy under drain, which is not what the idle-guest test is about."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < quiet_polls:
        assert time.monotonic() < deadline, f"job {job_id} still has dirty bytes after {timeout} s"
        jobs = {j["device"]: j for j in q.cmd("query-block-jobs")}
        quiet = quiet + 1 if jobs[job_id]["vdisk-dirty-bytes"] == 0 else 0
        time.sleep(interval)


def test_active_commit_pivot_of_idle_guest_syncs_nothing_while_paused(tmp_path, monkeypatch):
    """base is flushed before the exports are drained; with an idle guest the drained pivot has no
    tail to copy, so it syncs nothing while the guest waits (vdiskd logs the count of syncs its QMP
    thread made while drained: a count, not a timing). A non-active commit logs its count too."""
    monkeypatch.setenv("VDISK_LOG", "info")
    base, mid, top, model, s = ready_active_commit(tmp_path, "c5")
    try:
        q = s.q
        Guest(s.uri, write_cmds(model, random.Random(15), 30, 7)).run_checked()
        wait_caught_up(q, "c5")
        q.cmd("block-job-complete", device="c5")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"], done
        m = pivot_log(s, "c5")
        assert (int(m.group(1)), int(m.group(2))) == (0, 0), m.group(0)
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after pivot")
        s.stop()
    finally:
        s.close()
    assert_same(image_content(tmp_path, base, "base.raw"), bytes(model), "base after pivot")
    check_clean(base, mid, top)


def test_active_commit_complete_while_guest_writes(tmp_path):
    """block-job-complete while a guest keeps writing: with something dirty at that moment the
    job copies it in the drained tail instead of a finishing round first; no write is lost (the
    guest's connection follows the pivot), base reads like the model and every image is clean."""
    base, mid, top, model, s = ready_active_commit(tmp_path, "c6")
    try:
        q = s.q
        g = Guest(s.uri, write_cmds(model, random.Random(16), 300, 11))
        g.start()
        time.sleep(0.2)  # let the guest get going (not an assertion)
        q.cmd("block-job-complete", device="c6")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
        g.join_checked(120)
        assert "error" not in done["data"], done
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after pivot")
        s.stop()
    finally:
        s.close()
    assert chain_info(top) == [("top.qcow2", "mid.qcow2", "qcow2"),
                               ("mid.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    assert_same(image_content(tmp_path, base, "base.raw"), bytes(model), "base after pivot")
    check_clean(base, mid, top)


@pytest.mark.parametrize("flushes", [False, True], ids=["no-guest-flush", "guest-flushes"])
def test_active_commit_complete_under_pipelined_guest(tmp_path, monkeypatch, flushes):
    """block-job-complete while a guest keeps 8 writes in flight (and, in one case, flushes after
    every batch): base ends byte for byte like the model and clean. Base is synced while the
    guest waits only when the guest asked for durability since base last held every write
    durably: a guest that never flushes costs the drained pivot no sync at all (what it wrote
    since is synced by its next flush, of base); a flushing guest costs at most the tail's
    qcow2 flush (a data sync and one after the L2 tables), the rest synced before the drain."""
    monkeypatch.setenv("VDISK_LOG", "info")
    base, mid, top, model, s = ready_active_commit(tmp_path, "c7")
    try:
        q = s.q
        g = PipelinedGuest(s.sock, model, random.Random(17), flushes=flushes)
        g.start()
        g.wait_batches(5)
        q.cmd("block-job-complete", device="c7")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in done["data"], done
        g.wait_batches(g.batches + 3)  # these land in base, the guest's image now
        g.join_checked()
        m = pivot_log(s, "c7")
        syncs = int(m.group(2))
        assert syncs <= 2 if flushes else syncs == 0, m.group(0)
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after pivot")
        s.stop()
    finally:
        s.close()
    assert_same(image_content(tmp_path, base, "base.raw"), bytes(model), "base after pivot")
    check_clean(base, mid, top)


def test_commit_intermediate_under_pipelined_guest_syncs_nothing_while_paused(tmp_path,
                                                                              monkeypatch):
    """A non-active commit's end while a guest keeps 8 writes in flight: base is flushed, the
    guest image's header rewritten (naming base) and base reopened read-only before the guest
    is drained, so the drained switch of the chain makes no sync (it made the header's syncs
    before). Base holds what mid held, the guest's view equals the model, images are clean."""
    monkeypatch.setenv("VDISK_LOG", "info")
    base, mid, top, model = make_chain(tmp_path)
    below_top = image_content(tmp_path, mid, "mid0.raw")
    with Served(tmp_path, top, need=("block-commit",)) as s:
        job_under_pipelined_guest(
            tmp_path, s, model, 29, r"commit 'c8': committed; guest I/O paused \d+ us "
            r"\((\d+) syncs while paused\)", "guest view after commit",
            "block-commit", job_id="c8", device="disk0", top="mid.qcow2", base="base.qcow2")
    assert chain_info(top) == [("top.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    assert_same(image_content(tmp_path, base, "base.raw"), below_top, "base after commit")
    check_clean(base, mid, top)


def test_active_commit_sees_writes_through_a_node_over_the_top(tmp_path):
    """A raw node added over the top with its own export: a client writing through it (not through
    the top's export, whose requests the top's tracker sees) while the guest writes too and the
    commit is ready. The job learns of every write from the top's write hook, so base gets them
    all; before, those through the raw node were never marked and base lacked them."""
    base, mid, top, model, s = ready_active_commit(tmp_path, "c9")
    try:
        q = s.q
        q.cmd("blockdev-add", driver="raw", node_name="over", file="disk0")
        q.cmd("block-export-add", type="nbd", id="late", node_name="over", name="late",
              writable=True)
        # disjoint halves: each writer's order is its own, the model needs no order between them
        ws = [PipelinedGuest(s.sock, model, random.Random(21), name="late", lo=SIZE // 2),
              PipelinedGuest(s.sock, model, random.Random(22), hi=SIZE // 2)]
        for w in ws:
            w.start()
        for w in ws:
            w.wait_batches(20)
        for w in ws:
            w.join_checked()
        q.cmd("block-export-del", id="late")
        q.cmd("block-job-complete", device="c9")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in done["data"], done
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after pivot")
        s.stop()
    finally:
        s.close()
    assert_same(image_content(tmp_path, base, "base.raw"), bytes(model), "base after pivot")
    check_clean(base, mid, top)


def test_active_commit_pivot_with_a_writer_through_a_node_over_the_top(tmp_path):
    """A raw node over the top with its own export: a client writing through it without pause
    while the guest writes too, ACROSS block-job-complete. The pivot drains that writer with the
    guests (no write of it races the drained tail or the hook's removal) and, as QEMU's
    bdrv_replace_node, points the raw node at base: every acknowledged write of both, before,
    during and after the pivot, is in base; the top is no longer anyone's child (blockdev-del)."""
    base, mid, top, model, s = ready_active_commit(tmp_path, "c10")
    ws = []
    try:
        q = s.q
        q.cmd("blockdev-add", driver="raw", node_name="over", file="disk0")
        q.cmd("block-export-add", type="nbd", id="late", node_name="over", name="late",
              writable=True)
        # disjoint halves: each writer's order is its own, the model needs no order between them
        ws = [PipelinedGuest(s.sock, model, random.Random(23), name="late", lo=SIZE // 2),
              PipelinedGuest(s.sock, model, random.Random(24), hi=SIZE // 2)]
        for w in ws:
            w.start()
        for w in ws:
            w.wait_batches(5)
        q.cmd("block-job-complete", device="c10")
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in done["data"], done
        after = [w.batches for w in ws]
        for w, n in zip(ws, after):
            w.wait_batches(n + 5)  # both keep writing after the pivot, now into base
        for w in ws:
            w.join_checked()
        ws = []
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after pivot")
        late = f"nbd+unix:///late?socket={s.sock}"
        assert_same(guest_read(tmp_path, late, "late.raw"), bytes(model), "raw node after pivot")
        q.cmd("block-export-del", id="late")
        # Only the raw node's old edge to the top would keep it: the guest's export moved to base.
        q.cmd("blockdev-del", node_name="disk0")
        s.stop()
    finally:
        for w in ws:
            w.stop = True
        s.close()
    assert_same(image_content(tmp_path, base, "base.raw"), bytes(model), "base after pivot")
    check_clean(base, mid, top)
