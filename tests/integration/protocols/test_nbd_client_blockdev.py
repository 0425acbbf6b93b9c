"""blockdev-add of NBD client nodes over vdiskd's QMP: a server that accepts but never answers
must not block the monitor (--nbd-connect-timeout bounds connect + handshake), and export names
that need escaping in an NBD URI ("a b?c", "%", "#") open the right export."""
import socket
import subprocess
import threading
import time

import pytest

from conftest import VDISKD, qemu_img, qemu_io, wait_unix_listening
from qmp_client import start_vdiskd


class SilentServer:
    """A unix socket that accepts connections and never sends a byte (a hung NBD server)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.conns = []
        self.stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
                self.conns.append(c)
            except (socket.timeout, OSError):
                pass

    def close(self):
        self.stop = True
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def test_blockdev_add_nbd_to_a_silent_server_times_out(tmp_path):
    silent = SilentServer(str(tmp_path / "silent.sock"))
    d = start_vdiskd(tmp_path, "--nbd-connect-timeout", "1000")
    try:
        q = d.client()
        t0 = time.monotonic()
        desc = q.error("blockdev-add", {"driver": "nbd", "node-name": "n0", "export": "e",
                                        "server": {"type": "unix",
                                                   "path": str(tmp_path / "silent.sock")}})
        took = time.monotonic() - t0
        assert "did not complete the connection and handshake within 1000 ms" in desc, desc
        assert took < 8, took
        assert silent.conns, "vdiskd never connected"
        # The monitor is alive and the failed node left nothing behind.
        assert q.cmd("query-version")["qemu"]["major"] == 7
        assert "n0" not in {n["node-name"] for n in q.cmd("query-named-block-nodes")}
        q.close()
        d.stop_checked()
    finally:
        d.kill()
        silent.close()


def test_nbd_connect_timeout_option_is_checked(tmp_path):
    r = subprocess.run([VDISKD, "--nbd-connect-timeout", "soon"], capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 1
    assert "--nbd-connect-timeout" in r.stderr


@pytest.mark.parametrize("name", ["a b?c", "100%#x", "/slash&amp"])
def test_blockdev_add_nbd_export_name_needing_escapes(tmp_path, name):
    img = tmp_path / "d.raw"
    qemu_img("create", "-q", "-f", "raw", img, "1M")
    qemu_io("-f", "raw", "-c", "write -P 0x6b 0 64k", img)
    sock = str(tmp_path / "qnbd.sock")
    srv = subprocess.Popen(["qemu-nbd", "-k", sock, "-x", name, "-f", "raw", "-t", str(img)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = None
    try:
        wait_unix_listening(sock, srv)  # the path exists from bind(), before listen()
        d = start_vdiskd(tmp_path)
        q = d.client()
        q.cmd("blockdev-add", driver="nbd", node_name="n0", export=name,
              server={"type": "unix", "path": sock})
        q.cmd("blockdev-add", driver="raw", node_name="r0", file="n0")
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert nodes["n0"]["image"]["virtual-size"] == 1 << 20
        # Serve it back and read through it: the right export was opened.
        vsock = str(tmp_path / "v.sock")
        q.cmd("nbd-server-start", addr={"type": "unix", "path": vsock})
        q.cmd("block-export-add", type="nbd", id="x", node_name="r0", name="x")
        out = qemu_io("-f", "raw", "-r", "-c", "read -P 0x6b 0 64k",
                      f"nbd+unix:///x?socket={vsock}").stdout
        assert "read 65536/65536" in out, out
        q.close()
        d.stop_checked()
    finally:
        if d:
            d.kill()
        srv.terminate()
        srv.wait(10)
