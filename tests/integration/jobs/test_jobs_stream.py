"""block-stream through vdiskd while a guest writes over NBD: the intermediate images' data is pulled
into the top, newer guest writes are never overwritten by copies of old backing data, the top's header
then names the base (or nothing), and the guest-visible content equals a model of the original chain
plus every guest write. Event sequence and resulting headers follow qemu-storage-daemon 7.2.
"""
import random

from blockops_helpers import (MiB, KiB, SIZE, make_chain, Served, write_cmds, Guest, guest_read,
                              job_under_pipelined_guest, image_content, assert_same, chain_info, statuses,
                              wait_status, check_clean)


def test_stream_to_base_with_concurrent_guest(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top) as s:
        q = s.q
        # 1.5 MiB to pull from mid at 128 KiB/s (>= 10 s; at 1 MiB/s a guest slowed down by a
        # loaded machine outlasted the copy): the guest writes while the copy runs, also into
        # the ranges being streamed (mid's [1M, 3M)).
        q.cmd("block-stream", job_id="s0", device="disk0", base="base.qcow2", speed=128 * KiB)
        jobs = q.cmd("query-block-jobs")
        assert len(jobs) == 1 and jobs[0]["type"] == "stream" and jobs[0]["device"] == "s0"
        assert jobs[0]["len"] == SIZE and jobs[0]["speed"] == 128 * KiB
        rng = random.Random(7)
        g = Guest(s.uri, write_cmds(model, rng, 40, 0, lo=512 * KiB, hi=4 * MiB, max_len=100 * KiB)
                  + write_cmds(model, rng, 20, 100))
        g.start()
        g.join_checked()
        assert q.cmd("query-block-jobs")[0]["status"] == "running", "the guest did not overlap"
        q.cmd("block-job-set-speed", device="s0", speed=0)
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"], done
        assert done["data"]["type"] == "stream" and done["data"]["len"] == SIZE
        assert done["data"]["offset"] == SIZE
        wait_status(q, "s0", "null")
        assert statuses(q, "s0") == ["created", "running", "waiting", "pending", "concluded",
                                     "null"]
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after stream")
        # The guest keeps writing on the shortened chain.
        Guest(s.uri, write_cmds(model, rng, 10, 200)).run_checked()
        assert_same(guest_read(tmp_path, s.uri, "g2.raw"), bytes(model), "guest view, later")
    assert chain_info(top) == [("top.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    assert_same(image_content(tmp_path, top, "top.raw"), bytes(model), "top image")
    check_clean(base, mid, top)


def test_stream_whole_chain(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top) as s:
        q = s.q
        q.cmd("block-stream", job_id="s1", device="disk0", speed=2 * MiB)
        rng = random.Random(8)
        Guest(s.uri, write_cmds(model, rng, 40, 3)).run_checked()
        done = q.get_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"], done
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after stream")
    assert chain_info(top) == [("top.qcow2", None, None)]
    assert_same(image_content(tmp_path, top, "top.raw"), bytes(model), "top image")
    check_clean(base, mid, top)


def test_graph_queries_while_stream_finishes(tmp_path):
    """A job's end drops the streamed images from the chain. That happens on the QMP thread,
    between commands, so a client walking the graph meanwhile always sees a whole chain (under
    ASan/TSan a graph change from the job's thread showed up here as a race)."""
    base, mid, top, model = make_chain(tmp_path)
    s = Served(tmp_path, top)
    q2 = s.d.client()
    try:
        s.q.cmd("block-stream", job_id="s9", device="disk0", speed=8 * MiB)
        seen = set()
        for _ in range(5000):
            nodes = q2.cmd("query-named-block-nodes")
            seen.add(len(nodes))
            top_node = next(n for n in nodes if n["node-name"] == "disk0")
            # Either the whole old chain (3 images + files) or the streamed top alone.
            assert top_node["image"].get("backing-filename") in ("mid.qcow2", None), top_node
            assert q2.cmd("query-block-exports")[0]["node-name"] == "disk0"
            if any(e["event"] == "BLOCK_JOB_COMPLETED" for e in q2.events):
                break
        done = s.q.get_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"], done
        wait_status(s.q, "s9", "null")
        nodes = q2.cmd("query-named-block-nodes")
        assert "backing-filename" not in next(n for n in nodes
                                              if n["node-name"] == "disk0")["image"]
        assert len(nodes) == 2, nodes  # top and its file node
        q2.close()
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after stream")
        s.stop()
    finally:
        q2.close()
        s.close()
    check_clean(base, mid, top)


def test_stream_errors(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top) as s:
        q = s.q
        assert q.error("block-stream", {"job-id": "x", "device": "disk0", "base": "base.qcow2",
                                        "base-node": "b"}) == \
            "'base' and 'base-node' cannot be specified at the same time"
        assert q.error("block-stream", {"job-id": "x", "device": "disk0",
                                        "base": "nonexist.qcow2"}) == \
            "Can't find 'nonexist.qcow2' in the backing chain"
        assert q.error("block-stream", {"job-id": "x", "device": "disk0",
                                        "backing-file": "x.qcow2"}) == \
            "backing file specified, but streaming the entire chain"
        assert q.error("block-stream", {"job-id": "x", "device": "nosuch"}) == \
            "Cannot find device='nosuch' nor node-name='nosuch'"
        assert "is missing" in q.error("block-stream", {"job-id": "x"})
        assert q.cmd("query-block-jobs") == []
    assert chain_info(top)[0] == ("top.qcow2", "mid.qcow2", "qcow2")


def test_stream_cancel_keeps_chain(tmp_path):
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top) as s:
        q = s.q
        # ~3.5 MiB to pull at 64 KiB/s (>= 50 s): still running when we cancel
        q.cmd("block-stream", job_id="s2", device="disk0", speed=64 * KiB)
        Guest(s.uri, write_cmds(model, random.Random(9), 30, 5)).run_checked()
        assert q.error("block-job-complete", {"device": "s2"}) == \
            "Job 's2' in state 'running' cannot accept command verb 'complete'"
        q.cmd("block-job-cancel", device="s2")
        ev = q.get_event("BLOCK_JOB_CANCELLED", timeout=10)
        assert ev["data"]["type"] == "stream" and ev["data"]["offset"] < SIZE
        wait_status(q, "s2", "null")
        assert statuses(q, "s2") == ["created", "running", "aborting", "concluded", "null"]
        assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after cancel")
    # Part of mid's data may already be in top; the chain and what it reads are unchanged.
    assert chain_info(top)[0] == ("top.qcow2", "mid.qcow2", "qcow2")
    assert_same(image_content(tmp_path, top, "top.raw"), bytes(model), "chain")
    check_clean(base, mid, top)


def test_stream_pivot_under_pipelined_guest_syncs_nothing_while_paused(tmp_path, monkeypatch):
    """The stream's end while a guest keeps 8 writes in flight: the copy is made durable before
    the guest is drained, and with the guest drained only the top's header is written (synced
    after the guest resumed, before BLOCK_JOB_COMPLETED), so vdiskd logs 0 syncs while paused
    (it made 4 before). Content equals the model, the header names base, images are clean."""
    monkeypatch.setenv("VDISK_LOG", "info")
    base, mid, top, model = make_chain(tmp_path)
    with Served(tmp_path, top) as s:
        job_under_pipelined_guest(
            tmp_path, s, model, 23, r"stream 's7': '[^']*' now backed by \S+; guest I/O paused "
            r"[\d.]+ ms \((\d+) syncs while paused\)", "guest view after stream",
            "block-stream", job_id="s7", device="disk0", base="base.qcow2")
    assert chain_info(top) == [("top.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    assert_same(image_content(tmp_path, top, "top.raw"), bytes(model), "top image")
    check_clean(base, mid, top)
