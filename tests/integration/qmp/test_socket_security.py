"""Who can reach vdiskd's UNIX sockets: QMP and NBD sockets are created 0600 whatever the umask,
0660 and owned by the group given with --socket-group; idle QMP connections cannot lock the
management client out (beyond --qmp-max-clients the connection quiet longest is closed instead)."""
import grp
import os
import socket
import stat
import subprocess

import pytest

from conftest import VDISKD
from qmp_client import QMPClient, start_vdiskd



def start_with_umask(tmp, mask, *extra):
    old = os.umask(mask)  # inherited by the daemon
    try:
        return start_vdiskd(tmp, "--nbd-server", f"addr.type=unix,addr.path={tmp}/nbd.sock",
                            *extra)
    finally:
        os.umask(old)


def mode_and_gid(path):
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_sockets_are_0600_whatever_the_umask(tmp):
    d = start_with_umask(tmp, 0o000)
    try:
        assert mode_and_gid(tmp / "qmp.sock")[0] == 0o600
        assert mode_and_gid(tmp / "nbd.sock")[0] == 0o600
        with d.client() as c:  # the socket made by nbd-server-start too
            c.cmd("nbd-server-stop")
            c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": f"{tmp}/n2.sock"}})
            assert mode_and_gid(tmp / "n2.sock")[0] == 0o600
            c.cmd("nbd-server-stop")
        d.stop_checked()
    finally:
        d.kill()


@pytest.mark.parametrize("by", ["name", "gid"])
def test_socket_group_gives_0660_to_that_group(tmp, by):
    gid = os.getgid()
    group = grp.getgrgid(gid).gr_name if by == "name" else str(gid)
    d = start_with_umask(tmp, 0o077, "--socket-group", group)
    try:
        assert mode_and_gid(tmp / "qmp.sock") == (0o660, gid)
        assert mode_and_gid(tmp / "nbd.sock") == (0o660, gid)
        d.stop_checked()
    finally:
        d.kill()


def test_unknown_socket_group_is_refused(tmp):
    p = subprocess.run([VDISKD, "--qmp", str(tmp / "q.sock"), "--socket-group",
                        "no-such-group-vdisk"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "Unknown group 'no-such-group-vdisk'" in p.stderr
    assert not os.path.exists(tmp / "q.sock")


def idle_connections(path, n):
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))  # blocking: waits while the listen backlog is full
        s.settimeout(10)
        assert s.recv(4096).startswith(b'{"QMP"')  # accepted (the greeting), then idle
        socks.append(s)
    return socks


def test_idle_connections_cannot_lock_management_out(tmp):
    d = start_vdiskd(tmp)
    socks = []
    try:
        socks = idle_connections(tmp / "qmp.sock", 100)  # beyond the default limit of 64
        with d.client() as c:
            assert c.cmd("query-version")["qemu"]["major"] == 7
        d.stop_checked()
    finally:
        for s in socks:
            s.close()
        d.kill()


def test_max_clients_closes_the_quietest(tmp):
    d = start_vdiskd(tmp, "--qmp-max-clients", "2")
    try:
        first = QMPClient(str(tmp / "qmp.sock"))
        second = QMPClient(str(tmp / "qmp.sock"))
        assert second.cmd("query-version")  # second has spoken since first did
        with d.client() as third:
            assert third.cmd("query-block") == []
            with pytest.raises((EOFError, ConnectionResetError, BrokenPipeError)):
                first.execute("query-version")
            assert second.cmd("query-block") == []
        first.close()
        second.close()
        d.stop_checked()
    finally:
        d.kill()


def test_bad_max_clients_is_refused(tmp):
    p = subprocess.run([VDISKD, "--qmp", str(tmp / "q.sock"), "--qmp-max-clients", "0"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "--qmp-max-clients" in p.stderr
