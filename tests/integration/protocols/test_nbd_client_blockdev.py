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


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def congestion_of(port):
    """The congestion control `ss` shows for each established connection to 127.0.0.1:port."""
    out = subprocess.run(["ss", "-tinH", "state", "established", "dst", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=30).stdout
    known = ("reno", "cubic", "bbr", "bbr2", "dctcp", "vegas", "westwood", "htcp")
    return [w for w in out.split() if w in known]


def test_x_tcp_congestion_sets_it_on_the_nodes_connections_only(tmp_path):
    """x-tcp-congestion (a vdisk extension): the node's TCP sockets use the named congestion
    control, other connections keep the host's default; a name the kernel does not know, or a
    unix socket, is refused at blockdev-add."""
    default = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()
    want = "reno" if default != "reno" else "cubic"
    port = free_port()
    srv = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", "1M"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = None
    try:
        end = time.time() + 30
        while subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"],
                             capture_output=True, timeout=30).returncode != 0:
            assert srv.poll() is None and time.time() < end, "nbdkit did not start"
            time.sleep(0.1)
        d = start_vdiskd(tmp_path)
        q = d.client()
        server = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        q.cmd("blockdev-add", driver="nbd", node_name="plain", server=server)
        assert set(congestion_of(port)) == {default}, congestion_of(port)
        q.cmd("blockdev-add", driver="nbd", node_name="tuned", server=server,
              **{"x-tcp-congestion": want})
        # nbdkit's memory plugin allows multi-conn: 1..4 connections per node.
        got = congestion_of(port)
        assert want in got and default in got, got
        q.cmd("blockdev-del", node_name="plain")
        assert set(congestion_of(port)) == {want}, congestion_of(port)
        r = q.execute("blockdev-add", {"driver": "nbd", "node-name": "bad", "server": server,
                                       "x-tcp-congestion": "nosuchalgo"})
        assert "x-tcp-congestion=nosuchalgo" in r["error"]["desc"], r
        r = q.execute("blockdev-add", {"driver": "nbd", "node-name": "bad", "server": server,
                                       "x-tcp-congestion": "cubic&open-timeout=1"})
        assert "error" in r, r
        usock = str(tmp_path / "u.sock")
        u = subprocess.Popen(["nbdkit", "-f", "-U", usock, "memory", "1M"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_unix_listening(usock, u)
            r = q.execute("blockdev-add", {"driver": "nbd", "node-name": "bad",
                                           "server": {"type": "unix", "path": usock},
                                           "x-tcp-congestion": want})
            assert "not a TCP connection" in r["error"]["desc"], r
        finally:
            u.kill()
            u.wait(10)
        q.close()
        d.stop_checked()
        d = None
    finally:
        if d:
            d.kill()
        srv.kill()
        srv.wait(10)
