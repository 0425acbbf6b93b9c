"""vdiskd driven over QMP: the NBD server and exports started, listed and removed by QMP commands,
and the quit command shutting the daemon down cleanly (images flushed, exit 0)."""
import os
import socket
import struct

import pytest

from conftest import VDISKD, qemu_img, qemu_io, run, wait_unix_listening
import nbd_helpers as H

pytestmark = pytest.mark.skipif(not os.path.exists(VDISKD), reason="vdiskd not built")
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
