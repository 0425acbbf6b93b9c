"""blockdev-add / blockdev-del / query-named-block-nodes over vdiskd's QMP, with
qemu-storage-daemon 7.2 as the oracle for reply shapes and error texts."""

import os
import pytest

from conftest import qemu_img
from qmp_client import file_node, fmt_node, running, start_qsd, start_vdiskd


@pytest.fixture
def images(tmp):
    """base.raw <- mid.qcow2 <- top.qcow2 (formats recorded), plus a lone qcow2."""
    base = tmp / "base.raw"
    qemu_img("create", "-f", "raw", base, "1M")
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", tmp / "mid.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", tmp / "top.qcow2")
    qemu_img("create", "-f", "qcow2", tmp / "lone.qcow2", "2M")
    return tmp


def run_both(tmp, steps):
    """Run steps (list of (cmd, args)) on qemu-storage-daemon, then on vdiskd; return replies."""
    out = []
    for start in (start_qsd, start_vdiskd):
        with running(start, tmp) as d, d.client() as c:
            out.append([c.execute(cmd, args) for cmd, args in steps])
    return out


def named(nodes):
    return {n["node-name"]: n for n in nodes if not n["node-name"].startswith("#")}


IMAGE_KEYS_IGNORED = {"actual-size"}  # allocation differs by who wrote the image last


def compare_node(q, v):
    assert set(q) == set(v), (sorted(q), sorted(v))
    for k in ("node-name", "ro", "drv", "backing_file_depth", "encrypted", "detect_zeroes",
              "bps", "iops", "write_threshold", "cache"):
        assert q[k] == v[k], (k, q[k], v[k])
    if not q["file"].startswith("json:"):  # QEMU names explicit graphs json:{...}
        assert q["file"] == v["file"]
    if not (q.get("backing_file") or "").startswith("json:"):
        assert q.get("backing_file") == v.get("backing_file")
    qi, vi = q["image"], v["image"]
    while qi:
        assert set(qi) - IMAGE_KEYS_IGNORED == set(vi) - IMAGE_KEYS_IGNORED, (sorted(qi),
                                                                             sorted(vi))
        for k in ("virtual-size", "format", "cluster-size", "backing-filename",
                  "backing-filename-format", "dirty-flag"):
            assert qi.get(k) == vi.get(k), (k, qi.get(k), vi.get(k))
        if not qi["filename"].startswith("json:"):
            assert qi["filename"] == vi["filename"]
        qi, vi = qi.get("backing-image"), vi.get("backing-image")


def test_query_named_block_nodes_matches_qsd(images):
    t = images
    steps = [
        ("blockdev-add", file_node(t / "base.raw", "fbase")),
        ("blockdev-add", {"driver": "raw", "node-name": "base", "file": "fbase",
                          "read-only": True}),
        # One image at a time, backing given by node-name reference.
        ("blockdev-add", fmt_node("qcow2", "mid", t / "mid.qcow2", backing="base",
                                  read_only=True)),
        ("blockdev-add", fmt_node("qcow2", "top", t / "top.qcow2", backing="mid")),
        # The chain opened from the image headers.
        ("blockdev-add", fmt_node("qcow2", "lone", t / "lone.qcow2", cache={"direct": False})),
        ("query-named-block-nodes", None),
        ("query-named-block-nodes", {"flat": True}),
    ]
    q, v = run_both(t, steps)
    for i, (rq, rv) in enumerate(zip(q, v)):
        assert ("error" in rq) == ("error" in rv), (steps[i], rq, rv)
    for idx in (-2, -1):
        qn, vn = named(q[idx]["return"]), named(v[idx]["return"])
        assert set(qn) == set(vn)
        for name in qn:
            compare_node(qn[name], vn[name])
        # Every node is listed, the unnamed children too (QEMU: "#blockNNN").
        assert len(q[idx]["return"]) == len(v[idx]["return"])
    top = named(v[-2]["return"])["top"]
    assert top["backing_file_depth"] == 2
    assert top["image"]["backing-image"]["backing-image"]["format"] == "raw"


def test_header_chain_and_backing_null_match_qsd(images):
    t = images
    steps = [
        ("blockdev-add", fmt_node("qcow2", "top", t / "top.qcow2", read_only=True)),
        ("blockdev-add", fmt_node("qcow2", "alone", t / "lone.qcow2", backing=None)),
        ("query-named-block-nodes", None),
    ]
    q, v = run_both(t, steps)
    assert [("error" in r) for r in q] == [("error" in r) for r in v], (q, v)
    qn, vn = named(q[-1]["return"]), named(v[-1]["return"])
    for name in qn:
        compare_node(qn[name], vn[name])
    assert vn["top"]["backing_file_depth"] == 2
    assert vn["top"]["image"]["backing-filename"] == "mid.qcow2"
    assert len(q[-1]["return"]) == len(v[-1]["return"])


# Errors whose text vdiskd copies from QEMU; checked against qemu-storage-daemon live.
def schema_error_cases(t):
    raw = str(t / "base.raw")
    return [
        {},
        {"driver": "file"},
        {"driver": 3},
        {"driver": "bogus", "node-name": "x"},
        {"driver": "file", "node-name": "x", "filename": 3},
        {"driver": "file", "node-name": "x", "filename": raw, "foo": 1},
        {"driver": "file", "node-name": "x", "filename": raw, "read-only": "yes"},
        {"driver": "file", "node-name": "x", "filename": raw, "cache": {"direct": "x"}},
        {"driver": "file", "node-name": "x", "filename": raw, "cache": {"foo": True}},
        {"driver": "file", "node-name": "x", "filename": raw, "cache": 1},
        {"driver": "file", "node-name": 3, "filename": raw},
        {"driver": "file", "filename": raw},
        {"driver": "file", "node-name": "1bad", "filename": raw},
        {"driver": "file", "node-name": "", "filename": raw},
        {"driver": "file", "node-name": "a" * 40, "filename": raw},
        {"driver": "file", "node-name": "x", "filename": raw + ".missing"},
        {"driver": "file", "node-name": "x", "filename": raw, "aio": "bogus"},
        {"driver": "raw", "node-name": "x"},
        {"driver": "raw", "node-name": "x", "file": "nonode"},
        {"driver": "raw", "node-name": "x", "file": 5},
        {"driver": "raw", "node-name": "x", "file": {"driver": "file"}},
        {"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": raw, "z": 1}},
        {"driver": "raw", "node-name": "x", "file": file_node(raw), "backing": None},
        {"driver": "qcow2", "node-name": "x", "file": file_node(raw)},
        {"driver": "qcow2", "node-name": "x", "file": file_node(t / "lone.qcow2"), "backing": 5},
        {"driver": "qcow2", "node-name": "x", "file": file_node(t / "lone.qcow2"),
         "backing": "nonode"},
        {"driver": "qcow2", "node-name": "x", "file": file_node(t / "top.qcow2"),
         "backing": {"driver": "raw", "file": {"driver": "file", "filename": raw,
                                               "read-only": 1}}},
        {"driver": "qcow2", "node-name": "x", "file": file_node(raw, "x")},
        {"driver": "qcow2", "node-name": "x", "file": file_node(t / "lone.qcow2"),
         "discard": "bogus"},
        {"driver": "nbd", "node-name": "x"},
    ]


def test_blockdev_add_errors_match_qsd(images):
    cases = schema_error_cases(images)
    q, v = run_both(images, [("blockdev-add", a) for a in cases])
    for args, rq, rv in zip(cases, q, v):
        assert rq["error"]["class"] == "GenericError", (args, rq)
        assert rv == rq, args


def test_blockdev_add_errors_keep_graph_clean(vd, images):
    with vd.client() as c:
        for args in schema_error_cases(images):
            c.execute("blockdev-add", args)
        assert c.cmd("query-named-block-nodes") == []
        # A failure deep in the tree leaves nothing half-built behind either.
        desc = c.error("blockdev-add", fmt_node("qcow2", "t", images / "top.qcow2",
                                                backing={"driver": "qcow2", "file": file_node(
                                                    images / "base.raw")}))
        assert "qcow2" in desc
        assert c.cmd("query-named-block-nodes") == []


def test_vdiskd_specific_refusals(vd, images):
    raw = str(images / "base.raw")
    with vd.client() as c:
        msg = c.error("blockdev-add", {"driver": "vmdk", "node-name": "x",
                                       "file": file_node(raw)})
        assert "not supported by vdiskd" in msg
        # the list comes from the driver registry: every driver blockdev-add offers
        assert all(d in msg.split("supported:")[1] for d in ("file", "raw", "qcow2", "nbd", "rbd"))
        assert "not supported" in c.error(
            "blockdev-add", dict(file_node(raw, "x"), **{"detect-zeroes": "on"}))
        # raw's offset is supported now (a window onto the file, as QEMU's): no longer refused
        c.cmd("blockdev-add", **fmt_node("raw", "x", raw, offset=512))
        sizes = [n["image"]["virtual-size"] for n in c.cmd("query-named-block-nodes", flat=True)
                 if n["node-name"] == "x"]
        assert sizes == [os.path.getsize(raw) - 512]
        c.cmd("blockdev-del", **{"node-name": "x"})
        assert "Parameter 'encrypt.format' is missing" == c.error(
            "blockdev-add", fmt_node("qcow2", "x", images / "lone.qcow2", encrypt={}))
        assert "force-share" in c.error(
            "blockdev-add", dict(file_node(raw, "x"), **{"force-share": True}))
        nbd = c.execute("blockdev-add", {"driver": "nbd", "node-name": "n",
                                         "server": {"type": "unix", "path": "/nonexistent"},
                                         "export": "e"})
        assert nbd["error"] == {"class": "GenericError", "desc": "Failed to connect to "
                                "'/nonexistent': No such file or directory"}  # as QSD says
        assert "address resolution failed for localhost:nbdport: Servname not supported for " \
            "ai_socktype" == c.error("blockdev-add", {
                "driver": "nbd", "node-name": "n",
                "server": {"type": "inet", "host": "localhost", "port": "nbdport"}})
        assert "Parameter 'server.type' is missing" == c.error(
            "blockdev-add", {"driver": "nbd", "node-name": "n", "server": {}})
        assert "Parameter 'server.port' is missing" == c.error(
            "blockdev-add", {"driver": "nbd", "node-name": "n",
                             "server": {"type": "inet", "host": "localhost"}})
        assert "Parameter 'server.bad' is unexpected" == c.error(
            "blockdev-add", {"driver": "nbd", "node-name": "n",
                             "server": {"type": "unix", "path": "/x", "bad": 1}})
        assert c.cmd("query-named-block-nodes") == []


def test_options_take_effect(vd, images):
    t = images
    with vd.client() as c:
        c.cmd("blockdev-add", **fmt_node("qcow2", "ro", t / "lone.qcow2", read_only=True,
                                         cache={"direct": True, "no-flush": False}))
        c.cmd("blockdev-add", **fmt_node("raw", "rw", t / "base.raw"))
        nodes = {n["node-name"]: n for n in c.cmd("query-named-block-nodes")}
        assert nodes["ro"]["ro"] is True
        assert nodes["ro"]["cache"]["direct"] is True
        assert nodes["rw"]["ro"] is False
        assert nodes["rw"]["cache"] == {"writeback": True, "direct": False, "no-flush": False}
        # Children inherit read-only and cache.direct (as in QEMU).
        kids = [n for n in nodes.values() if n["file"] == str(t / "lone.qcow2")
                and n["drv"] == "file"]
        assert kids and kids[0]["ro"] is True and kids[0]["cache"]["direct"] is True
        # A read-write format on a read-only protocol node is refused.
        c.cmd("blockdev-add", **file_node(t / "mid.qcow2", "fro", **{"read-only": True}))
        assert "read-only" in c.error("blockdev-add", {"driver": "qcow2", "node-name": "x",
                                                       "file": "fro", "backing": None})
        c.cmd("blockdev-add", driver="qcow2", node_name="okro", file="fro", read_only=True,
              backing=None)


def test_blockdev_del(vd, images):
    t = images
    with vd.client() as c:
        c.cmd("blockdev-add", **file_node(t / "base.raw", "f"))
        c.cmd("blockdev-add", driver="raw", node_name="r", file="f", read_only=True)
        c.cmd("blockdev-add", **fmt_node("qcow2", "m", t / "mid.qcow2", backing="r"))
        c.cmd("blockdev-add", **fmt_node("qcow2", "q", t / "lone.qcow2"))
        c.cmd("blockdev-add", driver="qcow2", node_name="q2",
              file=file_node(t / "top.qcow2", "inner"), backing=None)
        assert c.error("blockdev-del", {"node-name": "f"}) == "Block device f is in use"
        assert c.error("blockdev-del", {"node-name": "r"}) == \
            "Node 'r' is busy: node is used as backing hd of 'm'"
        assert c.error("blockdev-del", {"node-name": "zz"}) == \
            "Failed to find node with node-name='zz'"
        assert c.error("blockdev-del", {"node-name": "inner"}) == \
            "Node inner is not owned by the monitor"
        assert c.error("blockdev-del", {}) == "Parameter 'node-name' is missing"
        assert c.error("blockdev-del", {"node-name": 3}) == \
            "Invalid parameter type for 'node-name', expected: string"
        assert c.error("blockdev-del", {"node-name": "q", "x": 1}) == "Parameter 'x' is unexpected"
        # Exported node: busy until the export goes.
        sock = str(t / "nbd.sock")
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        c.cmd("block-export-add", type="nbd", id="e", node_name="q")
        assert c.error("blockdev-del", {"node-name": "q"}) == "Node q is in use"
        c.cmd("block-export-del", id="e")
        c.cmd("blockdev-del", node_name="q")
        # Top-down teardown works; the names are free again afterwards.
        for n in ("m", "r", "f", "q2"):
            c.cmd("blockdev-del", node_name=n)
        assert c.cmd("query-named-block-nodes") == []
        c.cmd("blockdev-add", **file_node(t / "base.raw", "f"))
        c.cmd("blockdev-add", driver="qcow2", node_name="inner2",
              file=file_node(t / "top.qcow2", "inner"), backing=None)


def test_blockdev_del_messages_match_qsd(images):
    t = images
    steps = [
        ("blockdev-add", file_node(t / "base.raw", "f")),
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f", "read-only": True}),
        ("blockdev-add", fmt_node("qcow2", "m", t / "mid.qcow2", backing="r")),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "backing": None,
                          "file": file_node(t / "lone.qcow2", "inner")}),
        ("blockdev-del", {"node-name": "f"}),
        ("blockdev-del", {"node-name": "r"}),
        ("blockdev-del", {"node-name": "zz"}),
        ("blockdev-del", {"node-name": "inner"}),
        ("blockdev-del", {"node-name": "m"}),
        ("blockdev-del", {"node-name": "r"}),
        ("blockdev-del", {"node-name": "f"}),
    ]
    q, v = run_both(t, steps)
    assert q == v


def test_duplicate_names(vd, images):
    t = images
    with vd.client() as c:
        c.cmd("blockdev-add", **fmt_node("qcow2", "a", t / "lone.qcow2"))
        dup = "Duplicate nodes with node-name='a'"
        assert c.error("blockdev-add", file_node(t / "base.raw", "a")) == dup
        assert c.error("blockdev-add", fmt_node("raw", "b", t / "base.raw") | {
            "file": file_node(t / "base.raw", "a")}) == dup
        assert c.error("blockdev-add", {"driver": "raw", "node-name": "c",
                                        "file": file_node(t / "base.raw", "c")}) == \
            "Duplicate nodes with node-name='c'"


def test_data_through_assembled_chain(vd, images):
    """A chain built one node at a time serves the right bytes (read via an NBD export)."""
    t = images
    qemu_img("create", "-f", "raw", t / "b2.raw", "1M")
    from conftest import qemu_io
    qemu_io("-f", "raw", "-c", "write -P 0x11 0 64k", t / "b2.raw")
    qemu_img("create", "-f", "qcow2", t / "t2.qcow2", "1M")  # no backing in its header
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 64k 64k", t / "t2.qcow2")
    with vd.client() as c:
        c.cmd("blockdev-add", **fmt_node("raw", "b2", t / "b2.raw", read_only=True))
        c.cmd("blockdev-add", **fmt_node("qcow2", "t2", t / "t2.qcow2", backing="b2"))
        sock = str(t / "nbd.sock")
        c.cmd("nbd-server-start", addr={"type": "unix", "path": sock})
        c.cmd("block-export-add", type="nbd", id="e", node_name="t2")
        uri = f"nbd+unix:///t2?socket={sock}"
        qemu_io("-f", "raw", "-r", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 64k 64k",
                "-c", "read -P 0 128k 64k", uri)


def test_one_writer_per_image_like_qsd(images):
    """Two format nodes on one host file with a writer among them are refused (QEMU's image
    locking); read-only sharing is fine. Same success/failure pattern as qemu-storage-daemon."""
    t = images
    steps = [
        ("blockdev-add", fmt_node("qcow2", "a", t / "lone.qcow2")),
        ("blockdev-add", fmt_node("qcow2", "b", t / "lone.qcow2")),
        ("blockdev-add", fmt_node("qcow2", "b2", t / "lone.qcow2", read_only=True)),
        ("blockdev-add", file_node(t / "mid.qcow2", "f")),
        ("blockdev-add", {"driver": "qcow2", "node-name": "c", "file": "f", "backing": None}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "d", "file": "f", "backing": None}),
        ("blockdev-add", {"driver": "raw", "node-name": "e", "file": "f"}),
        ("blockdev-add", fmt_node("raw", "base", t / "base.raw")),
        # top's header chain opens base.raw read-only under a writer: refused.
        ("blockdev-add", fmt_node("qcow2", "top", t / "top.qcow2", read_only=True)),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-del", {"node-name": "a"}),
        ("blockdev-add", fmt_node("qcow2", "r1", t / "lone.qcow2", read_only=True)),
        ("blockdev-add", fmt_node("qcow2", "r2", t / "lone.qcow2", read_only=True)),
    ]
    q, v = run_both(t, steps)
    pattern = lambda rs: ["error" if "error" in r else "ok" for r in rs]  # noqa: E731
    # One deliberate difference: QEMU lets raw "e" open read-write on the file qcow2 "c" writes
    # (it only refuses once something writes through "e"); vdiskd refuses at once.
    assert pattern(q)[6] == "ok" and pattern(v)[6] == "error"
    assert pattern(v)[:6] + pattern(v)[7:] == pattern(q)[:6] + pattern(q)[7:], (q, v)
    assert pattern(v) == ["ok", "error", "error", "ok", "ok", "error", "error", "ok", "error",
                          "ok", "ok", "ok", "ok"]
    assert "lock" in v[1]["error"]["desc"]
    assert v[1]["error"]["class"] == "GenericError"
