"""vdiskd as a process: inet listening, max-connections, --daemonize/--pidfile, bad command lines."""
import os
import signal
import socket
import time

import pytest

from conftest import VDISKD, assert_not_crashed, free_port, qemu_img, qemu_io, run
import nbd_helpers as H

SIZE = 4 * 1024 * 1024


def wait_tcp(port, proc, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, f"vdiskd exited {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError("vdiskd did not listen")


def held_connection(port, deadline):
    """A connection the server accepted and greeted, so it holds one of the server's slots.

    The server frees a closed client's slot when its connection thread sees the close, some time
    after the client is gone: a connection made just after qemu-io (or wait_tcp's probe) exited
    may still be refused (closed without a greeting). Wait for the slot instead of assuming it.
    """
    while True:
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        greeting = b""
        try:
            while len(greeting) < 18:
                chunk = c.recv(18 - len(greeting))
                if not chunk:
                    break
                greeting += chunk
        except ConnectionResetError:
            pass
        if len(greeting) == 18:
            assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
            return c
        c.close()
        assert time.time() < deadline, "the server never had a free connection slot"
        time.sleep(0.05)


def test_inet_and_max_connections(tmp):
    img = os.path.join(str(tmp), "d.raw")
    qemu_img("create", "-f", "raw", img, SIZE)
    port = free_port()
    d = H.Daemon(["--blockdev", H.blockdev_json(img),
                  "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},"
                                  "max-connections=2",
                  "--export", "type=nbd,id=e0,node-name=n0,writable=on"], "", tmp)
    try:
        wait_tcp(port, d.proc)
        H.wait_path(d.pidfile, d.proc)
        uri = f"nbd://127.0.0.1:{port}/n0"  # export name defaults to the node name
        qemu_io("-f", "raw", "-c", "write -P 0x42 0 64k", uri)
        # two connections held open; a third is refused
        end = time.time() + 15
        c1 = held_connection(port, end)
        c2 = held_connection(port, end)
        p = run(["nbdinfo", uri], check=False, timeout=20)
        assert p.returncode != 0
        c1.close()
        # The slot frees once the server has seen c1 go: wait for that state, not for a time.
        end = time.time() + 15
        while run(["nbdinfo", "--size", uri], check=False, timeout=20).returncode != 0:
            assert time.time() < end, "the closed connection's slot was never freed"
            time.sleep(0.05)
        p = qemu_io("-f", "raw", "-c", "read -P 0x42 0 64k", uri)
        c2.close()
        assert d.stop() == 0, d.output()
    finally:
        d.kill()


def test_daemonize_pidfile(tmp):
    img = os.path.join(str(tmp), "d.raw")
    qemu_img("create", "-f", "raw", img, SIZE)
    sock = os.path.join(str(tmp), "s")
    pidfile = os.path.join(str(tmp), "pid")
    p = run([VDISKD, "--daemonize", "--pidfile", pidfile, "--blockdev", H.blockdev_json(img),
             "--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", "type=nbd,id=e0,node-name=n0,name=exp,writable=on"], timeout=20)
    pid = int(open(pidfile).read())
    try:
        # ready when the parent returned
        qemu_io("-f", "raw", "-c", "write -P 7 0 4k", f"nbd+unix:///exp?socket={sock}")
        os.kill(pid, signal.SIGTERM)
        for _ in range(3000):  # 30 s: an ASan build's exit (leak check) is slow under load
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("daemon did not exit")
        assert not os.path.exists(pidfile)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    qemu_io("-f", "raw", "-c", "read -P 7 0 4k", img)


@pytest.mark.parametrize("args", [
    ["--export", "type=nbd,id=e0,node-name=n0"],                         # no server, no node
    ["--nbd-server", "addr.type=vsock"],
    ["--nbd-server", "addr.type=unix"],
    ["--nbd-server", "bogus=1"],
    ["--blockdev", "{not json"],
    ["--blockdev", '{"driver": "raw", "node-name": "x", "file": {"driver": "file", '
                   '"filename": "/nonexistent/img"}}'],
    ["--bogus-option"],
    ["extra-arg"],
])
def test_bad_command_lines(tmp, args):
    p = run([VDISKD, *args], check=False, timeout=20)
    assert_not_crashed(p)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip()


def test_export_errors(tmp):
    img = os.path.join(str(tmp), "d.raw")
    qemu_img("create", "-f", "raw", img, SIZE)
    sock = os.path.join(str(tmp), "s")
    base = ["--blockdev", H.blockdev_json(img), "--nbd-server", f"addr.type=unix,addr.path={sock}"]
    for exp in ("type=nbd,id=e0,node-name=nope", "type=fuse,id=e0,node-name=n0",
                "type=nbd,id=e0,node-name=n0,writable=maybe", "type=nbd,node-name=n0"):
        p = run([VDISKD, *base, "--export", exp], check=False, timeout=20)
        assert_not_crashed(p)
        assert p.returncode == 1 and p.stderr.strip(), (exp, p.stderr)
        assert not os.path.exists(sock)
    # a read-only node cannot be exported writable
    p = run([VDISKD, "--blockdev", H.blockdev_json(img, read_only=True), "--nbd-server",
             f"addr.type=unix,addr.path={sock}", "--export", "type=nbd,id=e0,node-name=n0,writable=on"],
            check=False, timeout=20)
    assert p.returncode == 1 and "read-only" in p.stderr, p.stderr


def test_qsd_keyval_syntax(tmp):
    img = os.path.join(str(tmp), "d.qcow2")
    qemu_img("create", "-f", "qcow2", img, SIZE)
    sock = os.path.join(str(tmp), "s")
    d = H.Daemon(["--blockdev", f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={img}",
                  "--nbd-server", f"addr.type=unix,addr.path={sock}",
                  "--export", "nbd,id=e0,node-name=disk0,writable=on,description=a,,b"], sock, tmp)
    try:
        d.wait_ready()
        qemu_io("-f", "raw", "-c", "write -P 3 0 64k", d.uri("disk0"))
        out = run(["nbdinfo", d.uri("disk0")]).stdout
        assert "description: a,b" in out, out
        assert d.stop() == 0, d.output()
    finally:
        d.kill()
    qemu_io("-f", "qcow2", "-c", "read -P 3 0 64k", img)
