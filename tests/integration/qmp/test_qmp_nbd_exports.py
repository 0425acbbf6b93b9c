"""NBD control over vdiskd's QMP: nbd-server-start/stop, block-export-add/del,
query-block-exports, legacy nbd-server-add/remove, BLOCK_EXPORT_DELETED. Data checked with
qemu-io / qemu-img through the exports; replies compared with qemu-storage-daemon 7.2.
At the end: the same over nbd_helpers' raw NBD client, and "quit" flushing what clients wrote."""
import os
import socket
import subprocess
import time

import pytest

import nbd_helpers as H
from conftest import free_port, qemu_img, qemu_io, run, wait_unix_listening
from qmp_client import file_node, fmt_node, running, start_qsd, start_vdiskd


@pytest.fixture
def img(tmp):
    p = tmp / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 64k", p)
    return p


def strip_events(replies):
    return [r for r in replies if "event" not in r]


def run_both(tmp, steps):
    out = []
    for start in (start_qsd, start_vdiskd):
        with running(start, tmp) as d, d.client() as c:
            replies = []
            for cmd, args in steps:
                replies.append(c.execute(cmd, args))
            out.append((replies, [(e["event"], e.get("data")) for e in c.events]))
    return out


def test_server_and_export_replies_match_qsd(tmp, img):
    sock = str(tmp / "nbd.sock")
    steps = [
        ("blockdev-add", fmt_node("qcow2", "d", img)),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d"}),
        ("nbd-server-stop", None),
        ("nbd-server-add", {"device": "d"}),
        ("nbd-server-start", {}),
        ("nbd-server-start", {"addr": {"type": "inet"}}),
        ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1"}}}),
        ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                "port": 10}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                              "max-connections": "a"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                              "max-connections": -1}),
        ("nbd-server-start", {"addr": {"type": "bogus", "data": {}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock, "x": 1}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                              "max-connections": 4}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock + "2"}}}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d"}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d"}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "d"}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "nonode"}),
        ("block-export-add", {"type": "bogus", "id": "e1", "node-name": "d"}),
        ("block-export-add", {"id": "e1", "node-name": "d"}),
        ("block-export-add", {"type": "nbd", "node-name": "d"}),
        ("block-export-add", {"type": "nbd", "id": "e1"}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "d", "writable": "y"}),
        ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "d", "bogus": 1}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "d", "name": "other",
                              "writable": True, "description": "hello",
                              "writethrough": True}),
        ("query-block-exports", None),
        ("query-block-exports", {"x": 1}),
        ("blockdev-del", {"node-name": "d"}),
        ("block-export-del", {"id": "zz"}),
        ("block-export-del", {"id": "e0", "mode": "bogus"}),
        ("block-export-del", {}),
        ("block-export-del", {"id": "e0"}),
        ("block-export-del", {"id": "e0"}),
        ("nbd-server-add", {"device": "d"}),
        ("nbd-server-add", {"device": "d"}),
        ("nbd-server-add", {"device": "d", "name": "x", "writable": False,
                            "description": "legacy"}),
        ("nbd-server-add", {"device": "nonode"}),
        ("nbd-server-add", {"device": "d", "writable": "x"}),
        ("nbd-server-add", {}),
        ("nbd-server-remove", {"name": "x"}),
        ("nbd-server-remove", {"name": "x"}),
        ("nbd-server-remove", {}),
        ("nbd-server-remove", {"name": "d", "mode": "hard"}),
        ("query-block-exports", None),
        ("nbd-server-stop", None),
        ("nbd-server-stop", None),
        ("query-block-exports", None),
        ("blockdev-del", {"node-name": "d"}),
    ]
    (q, qev), (v, vev) = run_both(tmp, steps)
    for (cmd, args), rq, rv in zip(steps, q, v):
        if cmd == "query-block-exports" and "return" in rq:
            # Same set; the listing order is an implementation detail.
            key = lambda e: e["id"]  # noqa: E731
            assert sorted(rq["return"], key=key) == sorted(rv["return"], key=key)
            continue
        assert rv == rq, (cmd, args)
    assert qev == vev
    assert [e for e in vev] == [("BLOCK_EXPORT_DELETED", {"id": i})
                                for i in ("e0", "x", "d", "e2")]


def test_export_serves_data_inet_and_unix_flat(vd, tmp, img):
    port = free_port()
    with vd.client() as c:
        c.cmd("blockdev-add", **fmt_node("qcow2", "d", img, read_only=True))
        c.cmd("nbd-server-start", addr={"type": "inet",
                                        "data": {"host": "127.0.0.1", "port": str(port)}})
        c.cmd("block-export-add", type="nbd", id="e", node_name="d", name="disk",
              description="the disk")
        p = run(["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/disk"])
        assert '"export-size": 1048576' in p.stdout
        assert "the disk" in p.stdout
        qemu_io("-f", "raw", "-r", "-c", "read -P 0x5a 0 64k", "-c", "read -P 0 64k 64k",
                f"nbd://127.0.0.1:{port}/disk")
        c.cmd("nbd-server-stop")
        assert c.get_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e"}
        # The flat SocketAddress form is accepted too (newer QEMU interfaces, --nbd-server).
        sock = str(tmp / "flat.sock")
        c.cmd("nbd-server-start", addr={"type": "unix", "path": sock})
        c.cmd("nbd-server-add", device="d")
        qemu_io("-f", "raw", "-r", "-c", "read -P 0x5a 0 64k", f"nbd+unix:///d?socket={sock}")
        assert c.error("nbd-server-start", {"addr": {"type": "unix", "path": sock,
                                                     "tls-creds": "x"}}) == \
            "Parameter 'addr.tls-creds' is unexpected"
        c.cmd("nbd-server-stop")
        assert c.error("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                            "tls-creds": "t"}) == "No TLS credentials with id 't'"
        assert "not supported" in c.error("nbd-server-start",
                                          {"addr": {"type": "vsock",
                                                    "data": {"cid": "1", "port": "2"}}})


def test_writable_export_and_readonly_refusal(vd, tmp, img):
    sock = str(tmp / "nbd.sock")
    with vd.client() as c:
        c.cmd("blockdev-add", **fmt_node("qcow2", "d", img))
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        c.cmd("block-export-add", type="nbd", id="e", node_name="d", writable=True)
        uri = f"nbd+unix:///d?socket={sock}"
        qemu_io("-f", "raw", "-c", "write -P 0x77 128k 64k", uri)
        qemu_io("-f", "raw", "-r", "-c", "read -P 0x77 128k 64k", uri)
        c.cmd("block-export-del", id="e")
        c.cmd("blockdev-del", node_name="d")
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x77 128k 64k", "-c", "read -P 0x5a 0 64k", img)
    qemu_img("check", img)
    with vd.client() as c:
        c.cmd("blockdev-add", **fmt_node("qcow2", "ro", img, read_only=True))
        assert c.error("block-export-add", {"type": "nbd", "id": "e", "node-name": "ro",
                                            "writable": True}) == \
            "Cannot export read-only node as writable"
        assert c.error("block-export-add", {"type": "nbd", "id": "1bad", "node-name": "ro"}) == \
            "Invalid block export id"
        c.cmd("block-export-add", type="nbd", id="e", node_name="ro")
        p = run(["qemu-io", "-f", "raw", "-c", "write 0 512", f"nbd+unix:///ro?socket={sock}"],
                check=False)
        assert "Permission denied" in p.stdout + p.stderr or p.returncode != 0


def test_export_del_safe_vs_hard_with_client(vd, tmp, img):
    sock = str(tmp / "nbd.sock")
    with vd.client() as c:
        c.cmd("blockdev-add", **fmt_node("qcow2", "d", img))
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        c.cmd("block-export-add", type="nbd", id="e", node_name="d")
        nc = H.RawClient(sock)
        try:
            nc.greet()
            nc.go("d")
            assert c.error("block-export-del", {"id": "e"}).startswith("export 'e' still in use")
            assert [x["id"] for x in c.cmd("query-block-exports")] == ["e"]
            assert c.error("nbd-server-remove", {"name": "d"}).startswith(
                "export 'e' still in use")
            c.cmd("block-export-del", id="e", mode="hard")
            assert c.get_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e"}
            assert nc.closed_by_server()
        finally:
            nc.close()
        assert c.cmd("query-block-exports") == []
        c.cmd("blockdev-del", node_name="d")


def test_unsupported_export_options(vd, img):
    with vd.client() as c:
        c.cmd("blockdev-add", **fmt_node("qcow2", "d", img))
        assert "not supported" in c.error("block-export-add", {"type": "fuse", "id": "e",
                                                               "node-name": "d",
                                                               "mountpoint": "/x"})
        # (exported bitmaps are supported: nbd/test_nbd_dirty_bitmap.py)


def test_quit_with_exports_flushes(tmp, img):
    d = start_vdiskd(tmp)
    sock = str(tmp / "nbd.sock")
    try:
        with d.client() as c:
            c.cmd("blockdev-add", **fmt_node("qcow2", "d", img))
            c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
            c.cmd("block-export-add", type="nbd", id="e", node_name="d", writable=True)
            qemu_io("-f", "raw", "-c", "write -P 0x33 256k 64k", f"nbd+unix:///d?socket={sock}")
            assert c.execute("quit") == {"return": {}}
            assert d.wait() == 0
    except BaseException:
        d.kill()
        raise
    d.stop_checked()
    qemu_img("check", img)
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x33 256k 64k", img)


def test_nbd_client_nodes(vd, tmp, img):
    """blockdev-add driver=nbd (the client): as a node, under raw, and as the backing of a
    local qcow2 overlay; served back out through vdiskd's own export."""
    remote = str(tmp / "remote.sock")
    qsd = subprocess.Popen(["qemu-storage-daemon", "--blockdev",
                            f"driver=file,node-name=f,filename={img}", "--blockdev",
                            "driver=qcow2,node-name=q,file=f,read-only=on", "--nbd-server",
                            f"addr.type=unix,addr.path={remote}", "--export",
                            "type=nbd,id=e,node-name=q,name=base"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_unix_listening(remote, qsd)  # the path exists from bind(), before listen()
        top = tmp / "top.qcow2"
        qemu_img("create", "-f", "qcow2", top, "1M")  # no backing in the header
        qemu_io("-f", "qcow2", "-c", "write -P 0x66 64k 64k", top)
        server = {"type": "unix", "path": remote}
        with vd.client() as c:
            c.cmd("blockdev-add", driver="nbd", node_name="n0", server=server, export="base",
                  read_only=True)
            c.cmd("blockdev-add", driver="raw", node_name="rb", read_only=True,
                  file={"driver": "nbd", "server": server, "export": "base"})
            c.cmd("blockdev-add", **fmt_node("qcow2", "top", top, backing="rb"))
            nodes = {n["node-name"]: n for n in c.cmd("query-named-block-nodes")}
            assert nodes["n0"]["drv"] == "nbd"
            assert nodes["top"]["backing_file_depth"] == 1
            assert nodes["top"]["image"]["backing-image"]["virtual-size"] == 1048576
            desc = c.error("blockdev-add", {"driver": "nbd", "node-name": "bad",
                                            "server": server, "export": "nope"})
            assert "nope" in desc
            assert c.error("blockdev-add", {"driver": "nbd", "node-name": "bad",
                                            "server": {"type": "unix",
                                                       "path": str(tmp / "none.sock")}})
            sock = str(tmp / "out.sock")
            c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
            c.cmd("block-export-add", type="nbd", id="e", node_name="top")
            qemu_io("-f", "raw", "-r", "-c", "read -P 0x5a 0 64k", "-c", "read -P 0x66 64k 64k",
                    "-c", "read -P 0 128k 64k", f"nbd+unix:///top?socket={sock}")
            c.cmd("block-export-del", id="e")
            for n in ("top", "rb", "n0"):
                c.cmd("blockdev-del", node_name=n)
    finally:
        qsd.terminate()
        qsd.wait(15)


def test_server_start_failures_are_generic_errors(vd, tmp):
    """Lower-layer failures (ENOENT included) are GenericError, as in QEMU, never DeviceNotFound."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        with vd.client() as c:
            for addr in ({"type": "unix", "data": {"path": str(tmp / "no" / "dir.sock")}},
                         {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}},
                         {"type": "inet", "data": {"host": "no.such.host.invalid",
                                                   "port": "1"}}):
                assert c.error("nbd-server-start", {"addr": addr})  # class checked: Generic
            assert c.error("nbd-server-stop") == "NBD server not running"
    finally:
        busy.close()


# ---- with a raw NBD client (nbd_helpers): lifecycle, and quit with clients attached ----

SIZE = 8 * 1024 * 1024


@pytest.fixture
def qmpd(tmp):
    qsock = os.path.join(str(tmp), "qmp.sock")
    d = H.Daemon(["--qmp", qsock], os.path.join(str(tmp), "nbd.sock"), tmp)
    try:
        wait_unix_listening(qsock, d.proc)  # the path exists from bind(), before listen()
        q = H.Qmp(qsock)
        yield d, q
        q.close()
    finally:
        d.kill()


def test_qmp_nbd_lifecycle(tmp, qmpd):
    d, q = qmpd
    img = os.path.join(str(tmp), "d.qcow2")
    qemu_img("create", "-f", "qcow2", img, SIZE)
    r = q.cmd("blockdev-add", driver="qcow2", **{"node-name": "disk0"},
              file={"driver": "file", "filename": img})
    assert "return" in r, r
    assert "return" in q.cmd("nbd-server-start",
                             addr={"type": "unix", "data": {"path": d.sock}}), "start"
    assert "error" in q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": d.sock}})
    r = q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"}, name="exp",
              writable=True)
    assert "return" in r, r
    qemu_io("-f", "raw", "-c", "write -P 0x21 0 1M", "-c", "flush", d.uri())
    r = q.cmd("query-block-exports")
    assert [e["id"] for e in r["return"]] == ["e0"], r
    # a connected client blocks a soft delete, not a hard one
    c = H.RawClient(d.sock)
    c.greet()
    c.go()
    assert "error" in q.cmd("block-export-del", id="e0")
    assert c.read(0, 4096, cookie=1) == (1, 0, b"\x21" * 4096)
    assert "return" in q.cmd("block-export-del", id="e0", mode="hard")
    assert c.closed_by_server()
    c.close()
    assert q.cmd("query-block-exports")["return"] == []
    # the node is free again: it can be deleted
    assert "return" in q.cmd("nbd-server-stop")
    assert "return" in q.cmd("blockdev-del", **{"node-name": "disk0"})
    assert "return" in q.cmd("quit")
    d.proc.wait(timeout=15)
    assert d.proc.returncode == 0, d.output()
    qemu_io("-f", "qcow2", "-c", "read -P 0x21 0 1M", img)
    assert qemu_img("check", "-f", "qcow2", img, check=False).returncode == 0


def test_quit_with_clients_flushes(tmp, qmpd):
    d, q = qmpd
    img = os.path.join(str(tmp), "d.qcow2")
    qemu_img("create", "-f", "qcow2", img, SIZE)
    assert "return" in q.cmd("blockdev-add", driver="qcow2", **{"node-name": "n0"},
                             file={"driver": "file", "filename": img})
    assert "return" in q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": d.sock}})
    assert "return" in q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "n0"},
                             name="exp", writable=True)
    c = H.RawClient(d.sock)
    c.greet()
    c.go()
    # writes acknowledged without any flush must survive an orderly quit
    for i in range(16):
        assert c.write(i * 65536, bytes([i + 1]) * 65536, cookie=i)[:2] == (i, 0)
    assert "return" in q.cmd("quit")
    d.proc.wait(timeout=15)
    assert d.proc.returncode == 0, d.output()
    c.close()
    for i in range(16):
        qemu_io("-f", "qcow2", "-c", f"read -P {i + 1} {i * 64}k 64k", img)
    assert qemu_img("check", "-f", "qcow2", img, check=False).returncode == 0


def test_cmdline_export_listed_over_qmp(tmp):
    img = os.path.join(str(tmp), "d.raw")
    qemu_img("create", "-f", "raw", img, SIZE)
    qsock = os.path.join(str(tmp), "qmp.sock")
    d = H.start_daemon(tmp, img, extra=["--qmp", qsock])
    try:
        wait_unix_listening(qsock, d.proc)  # the path exists from bind(), before listen()
        q = H.Qmp(qsock)
        exps = q.cmd("query-block-exports")["return"]
        assert len(exps) == 1 and exps[0]["id"] == "e0" and exps[0]["node-name"] == "n0"
        q.close()
        assert d.stop() == 0, d.output()
    finally:
        d.kill()


def test_odd_sized_nodes_and_exports_match_qsd(tmp):
    """A 1000-byte file and a 1000-byte NBD export (nbdkit memory 1000) are 1024-byte nodes and
    exports in both daemons: node sizes, export sizes, the zero tail served, a write into the
    file's tail growing it to 1024 bytes, and one into the NBD export's tail refused (ENOSPC)."""
    data = bytes(range(200)) * 5
    msock = str(tmp / "mem.sock")
    mem = subprocess.Popen(["nbdkit", "-f", "-U", msock, "memory", "1000"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = []
    try:
        wait_unix_listening(msock, mem)
        for start in (start_qsd, start_vdiskd):
            name = "qsd" if start is start_qsd else "vd"
            path = tmp / f"{name}.raw"
            path.write_bytes(data)
            sock = str(tmp / f"{name}-exp.sock")
            with running(start, tmp) as d, d.client() as c:
                c.cmd("blockdev-add", **file_node(path, "f"))
                c.cmd("blockdev-add", driver="raw", node_name="r", file="f")
                c.cmd("blockdev-add", driver="nbd", node_name="n",
                      server={"type": "unix", "path": msock})
                sizes = {n["node-name"]: n["image"]["virtual-size"]
                         for n in c.cmd("query-named-block-nodes")}
                c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
                for node, w in (("f", True), ("n", True), ("r", False)):
                    c.cmd("block-export-add", type="nbd", id=node, node_name=node,
                          name=node, writable=w)
                u = {e: f"nbd+unix:///{e}?socket={sock}" for e in ("f", "n", "r")}
                export_sizes = {e: run(["nbdinfo", "--size", u[e]]).stdout.strip()
                                for e in u}
                served = subprocess.run(["nbdcopy", u["r"], "-"], capture_output=True,
                                        check=True).stdout
                wf = qemu_io("-f", "raw", "-c", "write -P 0x41 1000 24", u["f"])
                wn = qemu_io("-f", "raw", "-c", "write -P 0x41 1000 24", u["n"],
                             check=False)
                for node in ("f", "n", "r"):
                    c.cmd("block-export-del", id=node, mode="hard")
            results.append((sizes, export_sizes, served, "wrote 24/24" in wf.stdout,
                            wn.stdout.strip(), path.read_bytes()))
    finally:
        mem.terminate()
        mem.wait(15)
    assert results[1] == results[0]
    sizes, export_sizes, served, wrote, wn, content = results[1]
    assert sizes == {"f": 1024, "r": 1024, "n": 1024}
    assert export_sizes == {"f": "1024", "n": "1024", "r": "1024"}
    assert served == data + bytes(24)
    assert wrote and wn == "write failed: No space left on device"
    assert content == data + b"\x41" * 24
