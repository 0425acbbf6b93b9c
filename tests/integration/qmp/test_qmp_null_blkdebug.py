"""blockdev-add of null-co and blkdebug in vdiskd, with qemu-storage-daemon as the oracle: the
same commands are accepted or refused with the same replies, and what an NBD client reads from
an export of such a node is the same through both daemons."""
import pytest

from conftest import qemu_io, run
from qmp_client import file_node

MiB = 1 << 20


def _export_read(c, sock, node, cmds, writable=False):
    """Export node over NBD on sock, run qemu-io commands against it, stop; qemu-io's result."""
    c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    c.cmd("block-export-add", type="nbd", id="e0", writable=writable, **{"node-name": node})
    try:
        args = []
        for cmd in cmds:
            args += ["-c", cmd]
        return run(["qemu-io", "-f", "raw", *([] if writable else ["-r"]), *args,
                    f"nbd+unix:///{node}?socket={sock}"], check=False)
    finally:
        c.cmd("block-export-del", id="e0")
        c.cmd("nbd-server-stop")


def _both(vd, qsd, fn):
    return [fn(d, name) for d, name in ((vd, "v"), (qsd, "q"))]


@pytest.mark.parametrize("args", [
    {"size": MiB, "read-zeroes": True},
    {"read-zeroes": True},
    {"size": 4 * MiB, "latency-ns": 1000, "read-zeroes": True},
])
def test_null_co_node_size_and_zeroes_as_qsd(tmp, vd, qsd, args):
    def go(d, name):
        with d.client() as c:
            c.cmd("blockdev-add", driver="null-co", **{"node-name": "n0", **args})
            nodes = c.cmd("query-named-block-nodes", flat=True)
            size = [n["image"]["virtual-size"] for n in nodes if n["node-name"] == "n0"]
            p = _export_read(c, tmp / f"{name}.sock", "n0",
                             ["read -P 0 0 64k", "length", "write -P 1 0 4k", "read -P 0 0 4k"],
                             writable=True)
            c.cmd("blockdev-del", **{"node-name": "n0"})
            return size, p.returncode, "Pattern verification failed" in p.stdout, \
                [l for l in p.stdout.splitlines() if l.startswith(("wrote", "read ", "1 MiB",
                                                                 "4 MiB", "1 GiB"))]
    v, q = _both(vd, qsd, go)
    assert v == q
    assert v[0] == [args.get("size", 1 << 30)]
    assert v[1] == 0 and not v[2]  # zeroes read back, the write went nowhere
    assert len(v[3]) == 4, v[3]


def test_blkdebug_inject_error_reaches_the_nbd_client_as_qsd(tmp, vd, qsd):
    """A raw node over blkdebug over a file, read errors injected at sector 128 (64 KiB): an NBD
    client reads the first 64 KiB and gets EIO after, through both daemons."""
    img = tmp / "in.raw"
    img.write_bytes(b"\x05" * MiB)

    def go(d, name):
        with d.client() as c:
            c.cmd("blockdev-add", driver="blkdebug", **{
                "node-name": "b0", "image": file_node(img),
                "inject-error": [{"event": "read_aio", "errno": 5, "sector": 128}]})
            c.cmd("blockdev-add", driver="raw", **{"node-name": "r0", "file": "b0"})
            p = _export_read(c, tmp / f"{name}.sock", "r0",
                             ["read -P 5 0 64k", "read -P 5 64k 64k"])
            c.cmd("blockdev-del", **{"node-name": "r0"})
            c.cmd("blockdev-del", **{"node-name": "b0"})
            return (p.stdout.count("read 65536/65536 bytes at offset 0"),
                    "Input/output error" in p.stdout + p.stderr,
                    "offset 65536\n" in p.stdout)
    v, q = _both(vd, qsd, go)
    assert v == q == (1, True, False)


@pytest.mark.parametrize("args", [
    {"driver": "blkdebug", "node-name": "b1"},
    {"driver": "null-co", "node-name": "n1", "size": "big"},
    {"driver": "null-co", "node-name": "n1", "bogus": 1},
    {"driver": "blkdebug", "node-name": "b1", "image": {"driver": "file", "filename": "/nonexistent"}},
])
def test_null_co_and_blkdebug_refusals_match_qsd(tmp, vd, qsd, args):
    def go(d, name):
        with d.client() as c:
            return c.error("blockdev-add", args)
    v, q = _both(vd, qsd, go)
    assert v == q


def test_blkdebug_image_by_node_name_as_qsd(tmp, vd, qsd):
    """blkdebug's image named by an existing node (QSD's form): errors are injected into reads of
    that node's data; the node cannot be deleted while blkdebug uses it, and an unknown name is
    refused; the same replies and NBD reads through both daemons."""
    img = tmp / "in.raw"
    img.write_bytes(b"\x07" * MiB)

    def go(d, name):
        with d.client() as c:
            c.cmd("blockdev-add", **file_node(img, "f0"))
            missing = c.error("blockdev-add", {"driver": "blkdebug", "node-name": "bx",
                                               "image": "nosuch"})
            c.cmd("blockdev-add", driver="blkdebug", **{
                "node-name": "b0", "image": "f0",
                "inject-error": [{"event": "read_aio", "errno": 5, "sector": 256}]})
            c.cmd("blockdev-add", driver="raw", **{"node-name": "r0", "file": "b0"})
            # refused as another node's child, as QSD (a child link graph walkers see)
            busy = c.error("blockdev-del", {"node-name": "f0"})
            # one connection per read: after an error QSD's connection fails every later read
            outs = [_export_read(c, tmp / f"{name}.sock", "r0", [cmd]).stdout
                    for cmd in ("read -P 7 0 128k", "read -P 7 128k 64k", "read -P 7 192k 64k")]
            for n in ("r0", "b0", "f0"):
                c.cmd("blockdev-del", **{"node-name": n})
            return (missing, busy, ["bytes at offset" in o for o in outs],
                    ["Input/output error" in o for o in outs],
                    any("Pattern verification failed" in o for o in outs))
    v, q = _both(vd, qsd, go)
    assert v == q
    # the read covering sector 256 fails, those around it read the file's bytes
    assert v == ("Cannot find device='nosuch' nor node-name='nosuch'", "Block device f0 is in use",
                 [True, False, True],
                 [False, True, False], False)


def test_node_file_names_as_qsd(tmp, vd, qsd):
    """query-named-block-nodes' "file" of null-co and blkdebug nodes (and a raw node over them)
    as QSD names them: null-co:// or json:{...} once size / read-zeroes are given, blkdebug::IMAGE
    or json:{...} with the rules flattened in QEMU's key order; a raw node with offset and size is a
    window of that size, named by them."""
    for i in range(4):
        (tmp / f"d{i}.raw").write_bytes(bytes(MiB))
    adds = [
        {"driver": "null-co", "node-name": "n0"},
        {"driver": "null-co", "node-name": "n1", "size": MiB},
        {"driver": "null-co", "node-name": "n2", "size": MiB, "read-zeroes": True,
         "latency-ns": 5},
        {"driver": "raw", "node-name": "r0", "file": {"driver": "null-co", "size": 1000}},
        {"driver": "blkdebug", "node-name": "b0",
         "image": {"driver": "file", "filename": str(tmp / "d0.raw")}},
        {"driver": "blkdebug", "node-name": "b1",
         "image": {"driver": "file", "filename": str(tmp / "d1.raw")}, "align": 512,
         "inject-error": [{"event": "read_aio", "sector": 5, "errno": 5, "once": True}],
         "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}]},
        {"driver": "file", "node-name": "f2", "filename": str(tmp / "d2.raw")},
        {"driver": "blkdebug", "node-name": "b2", "image": "f2"},
        {"driver": "raw", "node-name": "r1", "file": "b1"},
        {"driver": "raw", "node-name": "r2", "file": "b2"},
        {"driver": "raw", "node-name": "w0", "offset": 4096, "size": 65536,
         "file": {"driver": "file", "filename": str(tmp / "d3.raw")}},
    ]

    def go(d, name):
        with d.client() as c:
            for a in adds:
                c.cmd("blockdev-add", **a)
            return {n["node-name"]: (n["file"], n["image"]["virtual-size"])
                    for n in c.cmd("query-named-block-nodes", flat=True)
                    if not n["node-name"].startswith("#")}
    v, q = _both(vd, qsd, go)
    assert v == q
    assert q["w0"][1] == 65536 and q["w0"][0].startswith('json:{"offset": 4096')
    q = {k: f for k, (f, _) in q.items()}
    assert q["n0"] == "null-co://" and q["r2"] == f"blkdebug::{tmp / 'd2.raw'}"
    assert q["r1"].startswith('json:{"driver": "raw", "file": {') and "inject-error.0.once" in q["b1"]
