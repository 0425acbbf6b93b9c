"""A lost link under the NBD client (src/protocols/nbd.c): QEMU's nbd options reconnect-delay and
open-timeout, and vdisk's stall detection (x-stall-timeout). vdiskd serves a guest (qemu-io) from
an nbd node whose server goes away (nbdkit killed and restarted on the same socket) or whose link
goes silent (a veth in the test's own network namespaces set down): the guest's I/O waits while
reconnect-delay lasts and completes right once the server is back, or fails with EIO after it;
never wrong data, never an endless hang. Assertions are on content and state, never on time.
"""
import json
import os
import subprocess
import time

import pytest

from conftest import VDISKD, qemu_img, qemu_io, run
import qmp_client
from qmp_client import Daemon
from netns_helpers import two_hosts, vdiskd_in, B_ADDR

MiB = 1 << 20
SIZE = 4 * MiB


def wait_for(pred, what, timeout=90):
    end = time.time() + timeout
    while not pred():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def nbdkit_file(path, listen, ns=None):
    """nbdkit's file plugin on path; listen = ["-U", sock] or ["-i", addr, "-p", port]."""
    pre = ["ip", "netns", "exec", ns] if ns else []
    p = subprocess.Popen([*pre, "nbdkit", "-f", *listen, "file", str(path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if listen[0] == "-U":
        wait_for(lambda: os.path.exists(listen[1]) or p.poll() is not None, "nbdkit's socket")
    else:
        # Listening inside ns: probe from there.
        wait_for(lambda: p.poll() is not None or run(
            ["ip", "netns", "exec", ns, "nbdinfo", "--size", f"nbd://{listen[1]}:{listen[3]}"],
            check=False, timeout=30).returncode == 0, "nbdkit listening")
    assert p.poll() is None, "nbdkit exited"
    return p


def stop(p):
    if p and p.poll() is None:
        p.kill()
        p.wait(timeout=15)


def all_reconnected(d):
    """Every connection vdiskd lost (multi-conn: up to 4) is back."""
    log = d.output()
    return 0 < log.count("lost the connection") == log.count("reconnected")


def stop_both(srv, d):
    """After a failure: nbdkit and vdiskd killed (a passing test stopped vdiskd checked)."""
    stop(srv)
    if d:
        d.kill()


def served(tmp, nbd_file, name="d", ns=None):
    """vdiskd serving a raw node on an nbd node (nbd_file: the nbd driver's options) to the
    guest over a unix socket; returns (daemon, guest URI)."""
    sock = str(tmp / f"{name}-guest.sock")
    args = ["--blockdev", json.dumps({"driver": "raw", "node-name": "disk0",
                                      "file": dict(driver="nbd", **nbd_file)}),
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"]
    if ns:
        d = vdiskd_in(ns, tmp, name, *args)
    else:
        qmp = str(tmp / f"{name}-qmp.sock")
        d = Daemon([VDISKD, "--qmp", qmp, *args], qmp, str(tmp / f"{name}.log"))
    return d, f"nbd+unix:///disk0?socket={sock}"


def image(tmp, size=SIZE):
    f = tmp / "remote.raw"
    qemu_img("create", "-q", "-f", "raw", f, size)
    qemu_io("-f", "raw", "-c", f"write -P 0x11 0 {size}", f)
    return f


def expect(f, runs):
    """f's bytes are the (offset, length, byte) runs, 0x11 elsewhere."""
    want = bytearray(b"\x11" * SIZE)
    for off, n, b in runs:
        want[off:off + n] = bytes([b]) * n
    assert f.read_bytes() == bytes(want)


def guest(uri, *cmds):
    """qemu-io on the guest's URI, in the background."""
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.Popen([*argv, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finished(p, timeout=120):
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def test_guest_io_waits_for_the_server_to_come_back_within_reconnect_delay(tmp):
    f = image(tmp)
    sock = str(tmp / "srv.sock")
    srv = nbdkit_file(f, ["-U", sock])
    d = None
    try:
        d, uri = served(tmp, {"server": {"type": "unix", "path": sock}, "reconnect-delay": 300})
        qemu_io("-f", "raw", "-c", f"write -P 0x22 0 {MiB}", uri)
        stop(srv)
        wait_for(lambda: "lost the connection" in d.output(), "vdiskd to see the loss")
        g = guest(uri, f"write -P 0x33 {MiB} {MiB}", f"read -P 0x22 0 {MiB}",
                  f"read -P 0x33 {MiB} {MiB}")
        time.sleep(1)
        assert g.poll() is None, "the guest's I/O did not wait for the server: " + g.stdout.read()
        os.unlink(sock)
        srv = nbdkit_file(f, ["-U", sock])
        rc, out = finished(g)
        assert rc == 0 and "Pattern verification failed" not in out, out
        assert "reconnected" in d.output()
        d.stop_checked()
        d = None
    finally:
        stop_both(srv, d)
    expect(f, [(0, MiB, 0x22), (MiB, MiB, 0x33)])


def test_guest_io_fails_with_eio_after_reconnect_delay_then_works_once_server_is_back(tmp):
    f = image(tmp)
    sock = str(tmp / "srv.sock")
    srv = nbdkit_file(f, ["-U", sock])
    d = None
    try:
        d, uri = served(tmp, {"server": {"type": "unix", "path": sock}, "reconnect-delay": 1})
        stop(srv)
        wait_for(lambda: "lost the connection" in d.output(), "vdiskd to see the loss")
        p = qemu_io("-f", "raw", "-c", f"write -P 0x44 0 {MiB}", "-c", f"read 0 {MiB}", uri,
                    check=False)
        assert "Input/output error" in p.stdout + p.stderr, p.stdout + p.stderr
        os.unlink(sock)
        srv = nbdkit_file(f, ["-U", sock])
        # The client keeps reconnecting in the background: no restart of vdiskd needed.
        wait_for(lambda: all_reconnected(d), "the reconnection")
        qemu_io("-f", "raw", "-c", f"write -P 0x55 {2 * MiB} 64k",
                "-c", f"read -P 0x11 {MiB} {MiB}", "-c", f"read -P 0x55 {2 * MiB} 64k", uri)
        d.stop_checked()
        d = None
    finally:
        stop_both(srv, d)
    # The failed write reached nothing or all of its bytes (never other data).
    data = f.read_bytes()
    assert data[:MiB] in (b"\x11" * MiB, b"\x44" * MiB) or set(data[:MiB]) <= {0x11, 0x44}
    assert data[MiB:2 * MiB] == b"\x11" * MiB
    assert data[2 * MiB:2 * MiB + 65536] == b"\x55" * 65536


def test_open_timeout_waits_for_a_server_that_starts_late(tmp):
    f = image(tmp)
    sock = str(tmp / "late.sock")
    qmp = str(tmp / "d-qmp.sock")
    d = Daemon([VDISKD, "--qmp", qmp], qmp, str(tmp / "d.log"))
    srv = None
    try:
        q = d.client()
        # Without open-timeout a missing server fails the open at once.
        r = q.execute("blockdev-add", {"driver": "nbd", "node-name": "n0",
                                       "server": {"type": "unix", "path": sock}})
        assert "error" in r, r
        q.close()
        opener = subprocess.Popen(
            ["/usr/bin/python3", "-c",
             "import sys; sys.path.insert(0, sys.argv[2]); from qmp_client import QMPClient;"
             "q = QMPClient(sys.argv[1]); print(q.execute('blockdev-add', {'driver': 'nbd',"
             " 'node-name': 'n1', 'server': {'type': 'unix', 'path': sys.argv[3]},"
             " 'open-timeout': 300}))", qmp, os.path.dirname(qmp_client.__file__), sock],
            stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        assert opener.poll() is None, "blockdev-add did not wait for the server"
        srv = nbdkit_file(f, ["-U", sock])
        out, _ = opener.communicate(timeout=120)
        assert "error" not in out and "return" in out, out
        q = d.client()
        nodes = q.cmd("query-named-block-nodes")
        assert [n for n in nodes if n["node-name"] == "n1"], nodes
        q.close()
        d.stop_checked()
        d = None
    finally:
        stop_both(srv, d)


def link(ns, dev, state):
    run(["ip", "-n", ns, "link", "set", dev, state], timeout=30)


def silent_link_run(tmp, reconnect_delay):
    """Host B serves remote.raw over the veth; vdiskd on A serves it to the guest through an nbd
    node with a 2 s stall timeout. The link goes silent (B's end set down) while the guest
    writes; returns (guest's exit status, output, vdiskd log, the file)."""
    f = image(tmp)
    with two_hosts("1gbit") as (nsa, nsb):
        srv = nbdkit_file(f, ["-i", B_ADDR, "-p", "10809"], ns=nsb)
        d = None
        try:
            d, uri = served(tmp, {"server": {"type": "inet", "host": B_ADDR, "port": "10809"},
                                  "reconnect-delay": reconnect_delay, "x-stall-timeout": 2},
                            ns=nsa)
            qemu_io("-f", "raw", "-c", f"write -P 0x22 0 {MiB}", uri)
            link(nsb, "vb", "down")
            g = guest(uri, f"write -P 0x33 {MiB} {MiB}", f"read -P 0x33 {MiB} {MiB}")
            wait_for(lambda: "no progress" in d.output(), "the stall to be seen")
            if reconnect_delay > 10:
                assert g.poll() is None, "the guest's I/O did not wait: " + g.stdout.read()
            else:
                rc, out = finished(g)
            link(nsb, "vb", "up")
            if reconnect_delay > 10:
                rc, out = finished(g)
            else:
                wait_for(lambda: all_reconnected(d), "the reconnection")
                qemu_io("-f", "raw", "-c", f"read -P 0x22 0 {MiB}", uri)
            log = d.output()
            d.stop_checked()
            d = None
        finally:
            stop_both(srv, d)
    return rc, out, log, f


def test_silent_link_is_detected_and_guest_io_completes_after_the_link_returns(tmp):
    rc, out, log, f = silent_link_run(tmp, 300)
    assert rc == 0 and "Pattern verification failed" not in out, out
    assert "reconnected" in log, log
    expect(f, [(0, MiB, 0x22), (MiB, MiB, 0x33)])


def test_silent_link_gives_the_guest_eio_after_reconnect_delay_never_wrong_data(tmp):
    rc, out, log, f = silent_link_run(tmp, 1)
    assert "Input/output error" in out, out
    assert "Pattern verification failed" not in out, out
    data = f.read_bytes()
    assert data[:MiB] == b"\x22" * MiB
    assert set(data[MiB:2 * MiB]) <= {0x11, 0x33}
    assert data[2 * MiB:] == b"\x11" * (SIZE - 2 * MiB)


def test_mirror_across_a_silent_link_follows_on_target_error_stop_then_resumes(tmp):
    """A mirror onto B over the veth, on-target-error=stop, reconnect-delay 0: the silent link
    fails the copy's writes (stall timeout), the job pauses instead of hanging; once the link is
    back (the client reconnects by itself) block-job-resume finishes the copy, byte-exact."""
    src = tmp / "src.raw"
    src.write_bytes(os.urandom(SIZE))
    tgt = tmp / "remote.raw"
    qemu_img("create", "-q", "-f", "raw", tgt, SIZE)
    with two_hosts("1gbit") as (nsa, nsb):
        srv = nbdkit_file(tgt, ["-i", B_ADDR, "-p", "10809"], ns=nsb)
        d = None
        try:
            d = vdiskd_in(nsa, tmp, "a")
            q = d.client()
            q.cmd("blockdev-add", driver="raw", node_name="src",
                  file={"driver": "file", "filename": str(src)})
            q.cmd("blockdev-add", driver="raw", node_name="tgt",
                  file={"driver": "nbd", "x-stall-timeout": 2, "reconnect-delay": 0,
                        "server": {"type": "inet", "host": B_ADDR, "port": "10809"}})
            q.cmd("blockdev-mirror", job_id="m", device="src", target="tgt", sync="full",
                  speed=MiB, on_target_error="stop")
            link(nsb, "vb", "down")
            err = q.get_event("BLOCK_JOB_ERROR", timeout=120)
            assert err["data"]["action"] == "stop" and err["data"]["operation"] == "write", err
            wait_for(lambda: q.cmd("query-block-jobs")[0]["paused"], "the job to pause")
            link(nsb, "vb", "up")
            wait_for(lambda: all_reconnected(d), "the reconnection")
            q.cmd("block-job-set-speed", device="m", speed=0)
            q.cmd("block-job-resume", device="m")
            q.get_event("BLOCK_JOB_READY", timeout=120)
            q.cmd("block-job-cancel", device="m")
            done = q.get_event("BLOCK_JOB_COMPLETED", timeout=120)
            assert "error" not in done["data"], done
            q.close()
            d.stop_checked()
            d = None
        finally:
            stop_both(srv, d)
    assert tgt.read_bytes() == src.read_bytes()


class HoldingServer:
    """A minimal NBD server (fixed newstyle, OPT_GO, simple replies) on a unix socket, serving
    a bytearray. The first write it receives it reads whole and then holds, unanswered, with
    its connection's reading stopped: a live server stuck on one request, as a server whose
    storage hangs is. It applies the held write late: at once after a write of other bytes to
    an overlapping range was applied on a later connection (the stale write of the issue), or
    else `late` seconds after a later connection arrived."""

    def __init__(self, path, size, late=0.5):
        import socket
        import threading
        self.data = bytearray(b"\x11" * size)
        self.lock = threading.Condition()
        self.held = None          # (offset, bytes) while held
        self.applied_late = None  # what the late write overwrote: the data there before it
        self.newer_overlap = False
        self.conns = 0
        self.late = late
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.threads = []
        self.done = False
        self.accepter = threading.Thread(target=self.accept_loop, daemon=True)
        self.accepter.start()

    def accept_loop(self):
        import threading
        while not self.done:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns += 1
                n = self.conns
                self.lock.notify_all()
            t = threading.Thread(target=self.serve, args=(c, n), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def recv_all(c, n):
        b = b""
        while len(b) < n:
            k = c.recv(n - len(b))
            if not k:
                raise EOFError
            b += k
        return b

    def serve(self, c, n):
        import struct
        try:
            c.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
            self.recv_all(c, 4)
            while True:
                _, opt, ln = struct.unpack(">QII", self.recv_all(c, 16))
                self.recv_all(c, ln)
                if opt == 7:  # OPT_GO: NBD_INFO_EXPORT (size, HAS_FLAGS|SEND_FLUSH), ACK
                    info = struct.pack(">HQH", 0, len(self.data), 1 | 4)
                    c.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, 3, len(info)) + info)
                    c.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, 1, 0))
                    break
                c.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, 2**31 + 1, 0))
            while True:
                _, _, typ, handle, off, ln = struct.unpack(">IHHQQI", self.recv_all(c, 28))
                if typ == 2:  # DISC
                    return
                payload = self.recv_all(c, ln) if typ == 1 else b""
                reply = b""
                with self.lock:
                    if typ == 1 and self.held is None and self.applied_late is None:
                        self.held = (off, payload)
                        self.hold(n)
                        return
                    if typ == 0:
                        reply = bytes(self.data[off:off + ln])
                    elif typ == 1:
                        self.data[off:off + ln] = payload
                        h = self.held
                        if h and off < h[0] + len(h[1]) and h[0] < off + ln and payload != h[1]:
                            self.newer_overlap = True
                            self.lock.notify_all()
                c.sendall(struct.pack(">IIQ", 0x67446698, 0, handle) + reply)
        except (EOFError, OSError):
            return
        finally:
            c.close()

    def hold(self, n):
        """Called with the lock held: wait for a later connection, then for the trigger."""
        import time
        end = time.time() + 120
        while self.conns <= n and time.time() < end and not self.done:
            self.lock.wait(0.1)
        late_at = time.time() + self.late
        while not self.newer_overlap and time.time() < min(late_at, end) and not self.done:
            self.lock.wait(0.05)
        off, payload = self.held
        self.applied_late = bytes(self.data[off:off + len(payload)])
        self.data[off:off + len(payload)] = payload
        self.held = None

    def close(self):
        self.done = True
        with self.lock:
            self.lock.notify_all()
        self.sock.close()
        for t in self.threads:
            t.join(timeout=30)


@pytest.mark.parametrize("reconnect_delay", [60, 0])
def test_a_write_held_by_a_stalled_server_never_lands_after_a_newer_write(tmp, reconnect_delay):
    """The server reads the guest's write (0xAA) and sits on it; the client's stall detection
    resets the connection and reconnects; the server applies the held write late. With
    reconnect-delay the guest's write completes, without it it fails with EIO; either way the
    guest's next write (0xBB) to the same range completes and must be what stays: the held
    write was not sent again before the server could have applied it, and the later write
    waited for that too (the stall kill's fence)."""
    sock = str(tmp / "hold.sock")
    srv = HoldingServer(sock, SIZE)
    d = None
    try:
        d, uri = served(tmp, {"server": {"type": "unix", "path": sock},
                              "reconnect-delay": reconnect_delay, "x-stall-timeout": 3})
        p = qemu_io("-f", "raw", "-c", "write -P 0xaa 0 64k", "-c", "write -P 0xbb 0 64k",
                    "-c", "read -P 0xbb 0 64k", uri, check=False)
        out = p.stdout + p.stderr
        log = d.output()
        d.stop_checked()
        d = None
    finally:
        if d:
            d.kill()
        srv.close()
    # The held write did land late, over the data before it (not over 0xBB: that came later).
    assert srv.applied_late is not None and srv.held is None
    assert "Pattern verification failed" not in out, out
    assert ("Input/output error" in out) == (reconnect_delay == 0), out
    assert out.count("wrote 65536/65536") == (2 if reconnect_delay else 1), out
    assert bytes(srv.data[:65536]) == b"\xbb" * 65536, "a stale write landed after a newer one"
    assert bytes(srv.data[65536:]) == b"\x11" * (SIZE - 65536)
    assert "no progress" in log and "reconnected" in log, log
    assert "may still be applied" in log, log


def nbdkit_variant(path, sock, extra):
    """nbdkit's file plugin on path at sock, with extra arguments (filters and their keys)."""
    filters = [a for a in extra if a.startswith("--filter=")]
    keys = [a for a in extra if not a.startswith("--filter=")]
    p = subprocess.Popen(["nbdkit", "-f", "-U", sock, *filters, "file", str(path), *keys],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(sock) or p.poll() is not None, "nbdkit's socket")
    assert p.poll() is None, "nbdkit exited"
    return p


@pytest.mark.parametrize("other,what", [
    (["--filter=blocksize", "minblock=4096"], "block sizes"),
    (["--filter=nozero"], "write zeroes"),
    (["--filter=multi-conn", "multi-conn-mode=disable"], "multi-conn"),
    (["--filter=exportname", "exportdesc=fixed:another disk"], "export description"),
    (["--filter=truncate", "truncate=2M"], "size"),
])
def test_a_reconnection_to_another_export_fails_the_io_until_the_original_is_back(tmp, other,
                                                                                 what):
    """nbdkit is restarted on the same socket serving the same file but as an export that
    differs in one property NBD shows: the client must not take it for the export it opened.
    The guest's I/O fails with EIO at once (not after reconnect-delay), nothing is written;
    once the original export is back the node reconnects by itself and works."""
    f = image(tmp)
    sock = str(tmp / "srv.sock")
    srv = nbdkit_file(f, ["-U", sock])
    d = None
    try:
        d, uri = served(tmp, {"server": {"type": "unix", "path": sock}, "reconnect-delay": 300})
        q = d.client()
        qemu_io("-f", "raw", "-c", f"write -P 0x22 0 {MiB}", uri)
        stop(srv)
        os.unlink(sock)
        srv = nbdkit_variant(f, sock, other)
        ev = q.get_event("X_NBD_EXPORT_CHANGED", timeout=60)
        assert ev["data"]["changed"] == what and ev["data"]["uri"].endswith(sock), ev
        wait_for(lambda: "serves a different export" in d.output(), "the new server's check")
        assert f"its {what} changed" in d.output(), d.output()
        g = guest(uri, f"write -P 0x33 {MiB} 64k", f"read -P 0x22 0 64k")
        rc, out = finished(g, timeout=60)
        assert out.count("Input/output error") == 2, out
        stop(srv)
        os.unlink(sock)
        srv = nbdkit_file(f, ["-U", sock])
        wait_for(lambda: all_reconnected(d), "the reconnection to the original export")
        qemu_io("-f", "raw", "-c", f"read -P 0x22 0 {MiB}", "-c", f"write -P 0x44 {MiB} 64k",
                uri)
        q.close()
        d.stop_checked()
        d = None
    finally:
        stop_both(srv, d)
    expect(f, [(0, MiB, 0x22), (MiB, 65536, 0x44)])
