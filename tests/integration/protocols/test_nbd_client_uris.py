"""vdisk as an NBD *client* (src/protocols/nbd.c): images opened over nbd:// and nbd+unix:// URIs.

Servers are real peers (qemu-nbd, nbdkit), each started on a unix socket (or TCP port) in the
test's temp dir and always killed by the fixture's finally. The oracle is qemu-img / qemu-io
looking at the same URI (or the image file behind it after the server is gone).
"""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import daemon_log, free_port, qemu_img, qemu_io, run, sha256, vdisk

MiB = 1024 * 1024


def uri(sock, export=""):
    return f"nbd+unix:///{export}?socket={sock}"


def _wait_socket(path, proc=None, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise AssertionError(f"server socket {path} did not appear")


def _alive(pid):
    """Running (a daemonized server's zombie may linger when nobody reaps it: that is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_pidfile(pidfile, sig=signal.SIGTERM):
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    for _ in range(250):
        if not _alive(pid):
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Servers:
    """Starts servers in tmp; kill_all() stops every one of them (called from the fixture)."""

    def __init__(self, tmp):
        self.tmp = str(tmp)
        self.pidfiles = []
        self.n = 0

    def _paths(self):
        self.n += 1
        return (os.path.join(self.tmp, f"srv{self.n}.sock"),
                os.path.join(self.tmp, f"srv{self.n}.pid"))

    def qemu_nbd(self, image, fmt="qcow2", export=None, extra=()):
        """Persistent qemu-nbd (-t) on a unix socket; returns the socket path."""
        sock, pidfile = self._paths()
        args = ["qemu-nbd", "-t", "-f", fmt, "-k", sock, "--fork", "--pid-file", pidfile]
        if export is not None:
            args += ["-x", export]
        self.pidfiles.append(pidfile)
        run([*args, *extra, image])
        _wait_socket(sock)
        return sock

    def nbdkit(self, *args, tcp_port=None):
        """nbdkit in the background; unix socket path returned (or the TCP port's URI base)."""
        sock, pidfile = self._paths()
        self.pidfiles.append(pidfile)
        if tcp_port:
            run(["nbdkit", "-i", "127.0.0.1", "-p", str(tcp_port), "-P", pidfile, *args])
            end = time.time() + 10
            while time.time() < end:
                try:
                    socket.create_connection(("127.0.0.1", tcp_port), timeout=1).close()
                    return f"nbd://127.0.0.1:{tcp_port}"
                except OSError:
                    time.sleep(0.02)
            raise AssertionError("nbdkit did not listen")
        run(["nbdkit", "-U", sock, "-P", pidfile, *args])
        _wait_socket(sock)
        return sock

    def kill_all(self, sig=signal.SIGTERM):
        for p in self.pidfiles:
            _kill_pidfile(p, sig)
        self.pidfiles = []


@pytest.fixture
def srv(tmp_path):
    s = Servers(tmp_path)
    try:
        yield s
    finally:
        s.kill_all()


@pytest.fixture
def qcow2_img(tmp_path):
    """8 MiB qcow2 with data, an explicit zero cluster and holes."""
    img = str(tmp_path / "src.qcow2")
    qemu_img("create", "-f", "qcow2", img, 8 * MiB)
    qemu_io("-f", "qcow2", "-c", "write -P 5 64k 128k", "-c", "write -z 1M 64k",
            "-c", "write -P 9 3M 4k", "-c", "write -P 7 8323072 65536", img)
    return img


def _vdisk_json(*args):
    return json.loads(vdisk(*args).stdout)


def _qemu_json(*args):
    return json.loads(qemu_img(*args).stdout)


# ---- info / map against qemu-img on the same URI ----

def test_info_matches_qemu(srv, qcow2_img):
    u = uri(srv.qemu_nbd(qcow2_img, "qcow2"))
    v = _vdisk_json("info", "--output=json", u)
    q = _qemu_json("info", "--output=json", u)
    assert v["virtual-size"] == q["virtual-size"] == 8 * MiB
    assert v["format"] == q["format"] == "raw"
    assert "actual-size" not in v  # "disk size: unavailable", as qemu-img says
    human = vdisk("info", u).stdout
    assert "virtual size: 8 MiB (8388608 bytes)" in human


@pytest.mark.parametrize("fmt_args", [(), ("-f", "raw")])
def test_map_matches_qemu(srv, qcow2_img, fmt_args):
    u = uri(srv.qemu_nbd(qcow2_img, "qcow2"))
    v = _vdisk_json("map", "--output=json", *fmt_args, u)
    q = _qemu_json("map", "--output=json", *fmt_args, u)
    assert v == q
    # The content the extents describe: data where written, zero elsewhere.
    assert any(e["data"] and e["start"] == 65536 for e in v)


def test_probe_qcow2_over_nbd(srv, qcow2_img):
    """A qcow2 file exported as raw bytes: vdisk probes the format through NBD, like qemu-img."""
    u = uri(srv.qemu_nbd(qcow2_img, "raw"))
    v = _vdisk_json("info", "--output=json", u)
    q = _qemu_json("info", "--output=json", u)
    assert v["format"] == q["format"] == "qcow2"
    assert v["virtual-size"] == q["virtual-size"] == 8 * MiB
    vm = _vdisk_json("map", "--output=json", "-f", "qcow2", u)
    qm = _qemu_json("map", "--output=json", "-f", "qcow2", u)
    strip = lambda m: [{k: e[k] for k in ("start", "length", "data", "zero")} for e in m]
    assert strip(vm) == strip(qm)


def test_tcp_uri(srv):
    port = free_port()
    base = srv.nbdkit("pattern", "2M", tcp_port=port)
    u = f"{base}/anything"
    assert _vdisk_json("info", "--output=json", u)["virtual-size"] == 2 * MiB
    # The pattern plugin: each 8-byte word is its big-endian offset; compare with qemu-io.
    p = vdisk("io", "-f", "raw", "-c", "read -v 65536 16", u)
    q = qemu_io("-f", "raw", "-r", "-c", "read -v 65536 16", u)
    assert p.stdout.splitlines()[0] == q.stdout.splitlines()[0]


# ---- writes read back by qemu-io ----

def test_io_writes_read_back_by_qemu_io(srv):
    sock = srv.nbdkit("memory", "16M")
    u = uri(sock)
    vdisk("io", "-f", "raw",
          "-c", "write -P 1 0 4k",
          "-c", "write -P 2 1000 70000",        # unaligned
          "-c", "write -P 3 1M 3M",              # bigger than one request
          "-c", "write -P 4 8M 1M", "-c", "write -z 8M 64k",
          "-c", "write -P 5 10M 1M", "-c", "discard 10M 1M",
          "-c", "write -f -P 6 12M 4k", "-c", "flush", u)
    qemu_io("-f", "raw",
            "-c", "read -P 1 0 1000", "-c", "read -P 2 1000 70000",
            "-c", "read -P 0 71000 10000",
            "-c", "read -P 3 1M 3M", "-c", "read -P 0 8M 64k", "-c", "read -P 4 8454144 983040",
            "-c", "read -P 6 12M 4k", u)
    # Trimmed memory reads back zero on nbdkit's memory plugin.
    qemu_io("-f", "raw", "-c", "read -P 0 10M 1M", u)


def test_io_into_qcow2_served_by_qemu_nbd(srv, tmp_path):
    """vdisk io through qemu-nbd's qcow2 export; the image file then checked with qemu-io."""
    img = str(tmp_path / "t.qcow2")
    qemu_img("create", "-f", "qcow2", img, 4 * MiB)
    sock = srv.qemu_nbd(img, "qcow2", export="exp")
    vdisk("io", "-f", "raw", "-c", "write -P 0x5a 4096 8192", "-c", "write -z 1M 1M",
          uri(sock, "exp"))
    srv.kill_all()
    qemu_io("-f", "qcow2", "-c", "read -P 0x5a 4096 8192", "-c", "read -P 0 0 4096",
            "-c", "read -P 0 1M 1M", img)


def test_write_zeroes_fallback_when_server_cannot_zero(srv, tmp_path):
    log = str(tmp_path / "kit.log")
    sock = srv.nbdkit("--filter=log", "--filter=nozero", "memory", "4M", f"logfile={log}",
                      "zeromode=notrim")
    u = uri(sock)
    vdisk("io", "-f", "raw", "-c", "write -P 8 0 128k", "-c", "write -z 4096 65536", u)
    qemu_io("-f", "raw", "-c", "read -P 8 0 4096", "-c", "read -P 0 4096 65536",
            "-c", "read -P 8 69632 61440", u)


def test_zero_flags_on_the_wire(srv, tmp_path):
    """write -z sends NBD_CMD_WRITE_ZEROES with NO_HOLE (trim=0), -u allows a hole, -f is FUA."""
    log = str(tmp_path / "kit.log")
    sock = srv.nbdkit("--filter=log", "memory", "4M", f"logfile={log}")
    vdisk("io", "-f", "raw", "-c", "write -z 0 64k", "-c", "write -z -u 64k 64k",
          "-c", "write -f -P 1 1M 4k", uri(sock))
    text = open(log).read()
    assert "Zero id=" in text
    lines = [l for l in text.splitlines() if " Zero " in l and "return" not in l]
    assert "offset=0x0 count=0x10000 trim=0" in lines[0]
    assert "offset=0x10000 count=0x10000 trim=1" in lines[1]
    assert any("Write" in l and "offset=0x100000" in l and "fua=1" in l for l in text.splitlines())


def test_min_and_max_block_size(srv):
    """A server with 4 KiB minimum / 64 KiB maximum blocks that rejects anything else."""
    sock = srv.nbdkit("--filter=blocksize-policy", "memory", "2M", "blocksize-minimum=4096",
                      "blocksize-maximum=65536", "blocksize-error-policy=error")
    u = uri(sock)
    vdisk("io", "-f", "raw", "-c", "write -P 3 100 300000", "-c", "read -P 3 100 300000",
          "-c", "write -z 5 9000", "-c", "read -P 0 5 9000", "-c", "read -P 0 0 100", u)
    qemu_io("-f", "raw", "-c", "read -P 0 0 100", "-c", "read -P 0 5 9000",
            "-c", "read -P 3 9005 291095", "-c", "read -P 0 300100 100000", u)


# ---- convert ----

def test_convert_from_nbd_identical_to_qemu_img(srv, qcow2_img, tmp_path):
    u = uri(srv.qemu_nbd(qcow2_img, "qcow2"))
    a, b = str(tmp_path / "v.qcow2"), str(tmp_path / "q.qcow2")
    vdisk("convert", "-O", "qcow2", u, a)
    qemu_img("convert", "-O", "qcow2", u, b)
    assert sha256(a) == sha256(b)
    qemu_img("compare", "-U", "-f", "qcow2", "-F", "qcow2", a, qcow2_img)


def test_convert_from_nbd_to_raw(srv, qcow2_img, tmp_path):
    u = uri(srv.qemu_nbd(qcow2_img, "qcow2"))
    out = str(tmp_path / "o.raw")
    vdisk("convert", "-f", "raw", "-O", "raw", u, out)
    qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", out, qcow2_img)


def test_convert_into_nbd_target(srv, qcow2_img, tmp_path):
    """convert -n into an existing export (what storage migration without shared storage does)."""
    sock = srv.nbdkit("memory", "8M")
    u = uri(sock)
    vdisk("convert", "-n", "-O", "raw", qcow2_img, u)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", qcow2_img, u)


# ---- read-only exports and errors ----

def test_read_only_export_refuses_writes(srv):
    sock = srv.nbdkit("-r", "pattern", "1M")
    u = uri(sock)
    p = vdisk("io", "-f", "raw", "-c", "write -P 3 0 4k", u, check=False)
    assert p.returncode != 0
    assert "Operation not permitted" in p.stdout + p.stderr
    # Unchanged: the pattern plugin's first word is offset 0, the second 8.
    q = qemu_io("-f", "raw", "-r", "-c", "read -v 0 16", u).stdout
    assert "00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 08" in q
    # Reading works, and so does convert from it.
    vdisk("io", "-f", "raw", "-c", "read 0 64k", u)


def _one_line_error(p, needle):
    assert p.returncode != 0
    assert p.returncode > 0, p.stderr  # not a signal
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert needle in lines[0], p.stderr
    return lines[0]


def test_unreachable_server(tmp_path):
    """No server at the address: qemu-img's words and exit code for info, map, compare,
    convert (source and -n target) and create, for TCP (port given or NBD's 10809 by default),
    a unix socket, a name that does not resolve and a port that is no number."""
    os.chdir(tmp_path)
    qemu_img("create", "-f", "raw", "a.raw", "64k")
    port = free_port()
    sock = str(tmp_path / "nobody.sock")
    dead = (f"nbd://127.0.0.1:{port}/exp", uri(sock, "exp"), "nbd://nonexistent.invalid/x")
    cases = [["info", d] for d in dead]
    cases += [["map", "--output=json", dead[1]], ["compare", dead[0], "a.raw"],
              ["convert", "-O", "qcow2", dead[1], "o.qcow2"],
              ["convert", "-n", "-O", "raw", "a.raw", dead[0]],
              ["create", "-f", "qcow2", dead[0], "1M"],
              ["info", "--image-opts", f"driver=nbd,path={sock}"],
              ["info", "--image-opts", "driver=nbd,host=localhost,port=nbdport"],
              ["info", "--image-opts",
               f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,"
               f"file.server.port={port}"]]
    for args in cases:
        pq, pv = _both(*args)
        assert pq.returncode == pv.returncode and pq.returncode in (1, 2), (args, pq.stderr)
        assert pv.stdout == pq.stdout, args
        assert pv.stderr.replace("vdisk: ", "qemu-img: ") == pq.stderr, args
    for args in cases[:2]:  # the text itself, so a qemu-img that changed is noticed
        assert ("Failed to connect to '127.0.0.1:%d': Connection refused" % port
                if "127.0.0.1" in args[1] else
                f"Failed to connect to '{sock}': No such file or directory") in \
            vdisk(*args, check=False).stderr
    assert not os.path.exists("o.qcow2")


def test_unknown_export(srv, qcow2_img):
    sock = srv.qemu_nbd(qcow2_img, "qcow2", export="exp")
    u = uri(sock, "nope")
    line = _one_line_error(vdisk("info", u, check=False), u)
    assert "nope" in line.split(u, 1)[1]


def test_server_read_errors(srv, tmp_path):
    sock = srv.nbdkit("--filter=error", "memory", "4M", "error-pread=EIO",
                      "error-pread-rate=100%")
    u = uri(sock)
    # Data to read (an all-zero export would be converted from block status alone).
    vdisk("io", "-f", "raw", "-c", "write -P 1 64k 64k", u)
    p = vdisk("io", "-f", "raw", "-c", "read 0 4k", u, check=False)
    assert p.returncode != 0 and p.returncode > 0
    assert "Input/output error" in p.stdout + p.stderr
    p = vdisk("convert", "-f", "raw", "-O", "qcow2", u, str(tmp_path / "o.qcow2"), check=False)
    assert p.returncode > 0
    assert "Input/output error" in p.stderr


def test_server_write_errors(srv):
    sock = srv.nbdkit("--filter=error", "memory", "4M", "error-pwrite=ENOSPC",
                      "error-pwrite-rate=100%")
    p = vdisk("io", "-f", "raw", "-c", "write -P 1 0 4k", uri(sock), check=False)
    assert p.returncode > 0
    assert "No space left on device" in p.stdout + p.stderr


def test_unsupported_scheme(tmp_path):
    p = vdisk("info", "nbdx://127.0.0.1/e", check=False)
    _one_line_error(p, "nbdx://127.0.0.1/e")


def _most_in_flight(logfile):
    """The most requests nbdkit's log filter saw outstanding at once on one connection."""
    out, most = {}, 0
    with open(logfile) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 5 or not parts[2].startswith("connection="):
                continue
            conn, what, rid = parts[2], parts[3], parts[4]
            if what.startswith("..."):
                out.get(conn, set()).discard(rid)
            elif rid.startswith("id="):
                out.setdefault(conn, set()).add(rid)
                most = max(most, len(out[conn]))
    return most


def test_client_keeps_many_requests_in_flight_on_one_connection(srv, tmp_path):
    """A write larger than the server's maximum block size goes out as pieces that are all in
    flight together (libnbd's aio calls), not one round trip after the other; the delay filter
    only makes the overlap visible in nbdkit's log, nothing here is timed."""
    log = str(tmp_path / "nbdkit.log")
    sock = srv.nbdkit("--filter=log", "--filter=delay", "--filter=blocksize-policy", "memory",
                      "4M", f"logfile={log}", "delay-write=20ms", "blocksize-maximum=65536",
                      "blocksize-preferred=4096", "blocksize-minimum=1")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(4 * MiB))
    vdisk("convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(sock))
    assert "identical" in qemu_img("compare", "-f", "raw", "-F", "raw", str(src),
                                   uri(sock)).stdout
    assert _most_in_flight(log) >= 4, open(log).read()[-2000:]


# ---- vdiskd: another server's export as a block node (blockdev-add driver nbd) ----

def _vdiskd_on(back, tmp_path):
    from conftest import VDISKD
    dsock = str(tmp_path / "d.sock")
    node = json.dumps({"driver": "raw", "node-name": "n0",
                       "file": {"driver": "nbd", "export": "",
                                "server": {"type": "unix", "path": back}}})
    log = daemon_log(str(tmp_path / "vdiskd.log"))
    proc = subprocess.Popen([VDISKD, "--blockdev", node,
                             "--nbd-server", f"addr.type=unix,addr.path={dsock}",
                             "--export", "type=nbd,id=e,node-name=n0,name=exp,writable=on"],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, log, dsock


def _stop(proc, log):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.seek(0)
    out = log.read()
    log.close()
    return out


def test_vdiskd_backend_server_dies(srv, tmp_path):
    """The server behind a node goes away: requests fail with EIO, nobody crashes or hangs."""
    back = srv.nbdkit("memory", "8M")
    proc, log, dsock = _vdiskd_on(back, tmp_path)
    try:
        _wait_socket(dsock)
        srv.kill_all(signal.SIGKILL)  # a crash: nbdkit would wait for its clients on SIGTERM
        p = qemu_io("-f", "raw", "-c", "write -P 4 0 64k", uri(dsock, "exp"), check=False)
        assert "Input/output error" in p.stdout + p.stderr
    finally:
        out = _stop(proc, log)
    assert proc.returncode == 0, out


def test_vdiskd_blockdev_on_nbd_export(srv, tmp_path):
    """vdiskd re-exports a node whose bytes live in nbdkit: writes land in nbdkit's memory."""
    back = srv.nbdkit("memory", "8M")
    proc, log, dsock = _vdiskd_on(back, tmp_path)
    try:
        _wait_socket(dsock)
        qemu_io("-f", "raw", "-c", "write -P 4 64k 1M", "-c", "write -z 2M 64k", uri(dsock, "exp"))
        # Through vdiskd's flush on close, the bytes are in the backend export.
        qemu_io("-f", "raw", "-c", "read -P 4 64k 1M", "-c", "read -P 0 0 64k", uri(back))
        vm = _vdisk_json("map", "--output=json", "-f", "raw", uri(dsock, "exp"))
        qm = _qemu_json("map", "--output=json", "-f", "raw", uri(back))
        strip = lambda m: [(e["start"], e["length"], e["data"], e["zero"]) for e in m]
        assert strip(vm) == strip(qm)
    finally:
        out = _stop(proc, log)
    assert proc.returncode == 0, out


# ---- odd-sized exports: QEMU counts lengths in whole 512-byte sectors ----

def _both(*args):
    return (qemu_img(*args, check=False), vdisk(*args, check=False))


def _assert_same(pq, pv):
    assert (pv.returncode, pv.stdout) == (pq.returncode, pq.stdout), pv.stderr


def test_odd_sized_export_is_rounded_up_like_qemu(srv, tmp_path):
    """A 1000-byte export (nbdkit memory 1000) is a 1024-byte node to QEMU: info, map, measure,
    compare and convert agree with qemu-img; the tail reads zeroes and writes past the
    export's real end fail as qemu-io's do (ENOSPC for a write, EINVAL for a discard)."""
    os.chdir(tmp_path)
    sock = srv.nbdkit("memory", "1000")
    u = uri(sock)
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 1000", u)
    assert json.loads(vdisk("info", "--output=json", "-f", "raw", u).stdout) == {
        "virtual-size": 1024, "filename": f"nbd+unix://?socket={sock}", "format": "raw"}
    for args in (["info", "--output=json", "-f", "raw", u], ["info", u],
                 ["map", "--output=json", "-f", "raw", u], ["map", "-f", "raw", u],
                 ["measure", "-O", "raw", "-f", "raw", u],
                 ["measure", "--output=json", "-O", "qcow2", "-f", "raw", u]):
        _assert_same(*_both(*args))
    with open("ref.raw", "wb") as f:
        f.write(b"\x5a" * 1000 + b"\0" * 24)
    _assert_same(*_both("compare", "-f", "raw", "-F", "raw", u, "ref.raw"))
    assert vdisk("compare", "-f", "raw", "-F", "raw", u, "ref.raw").returncode == 0
    for fmt in ("raw", "qcow2"):
        qemu_img("convert", "-f", "raw", "-O", fmt, u, f"q.{fmt}")
        vdisk("convert", "-f", "raw", "-O", fmt, u, f"v.{fmt}")
        _assert_same(*_both("info", "--output=json", f"v.{fmt}"))
        assert qemu_img("compare", "-F", "raw", f"v.{fmt}", "ref.raw").returncode == 0
        assert qemu_img("compare", f"q.{fmt}", f"v.{fmt}").returncode == 0
    ops = ["read -P 0x5a 990 10", "read -P 0 1000 24", "write -P 7 1000 24",
           "write -P 7 990 20", "write -z 1000 24", "discard 1000 24", "read -P 0 1024 1"]
    pq = qemu_io("-f", "raw", *(a for op in ops for a in ("-c", op)), u, check=False)
    pv = vdisk("io", "-f", "raw", *(a for op in ops for a in ("-c", op)), u, check=False)
    assert [ln for ln in pv.stdout.splitlines() if "/sec" not in ln] == \
        [ln for ln in pq.stdout.splitlines() if "/sec" not in ln]
    assert "write failed: No space left on device" in pv.stdout
    assert "discard failed: Invalid argument" in pv.stdout
    # Nothing of the refused writes reached the export.
    assert run(["nbdcopy", u, "-"]).stdout == "\x5a" * 1000


def test_qemu_nbd_odd_sized_file_read_and_written_by_vdisk(srv, tmp_path):
    """qemu-nbd serves a 1000-byte file as 1024 bytes; vdisk reads the zero tail and its write
    there grows the file, as qemu-io's does."""
    data = bytes(range(250)) * 4
    for tool, name in ((lambda *a: qemu_io(*a), "q.raw"), (lambda *a: vdisk("io", *a), "v.raw")):
        p = str(tmp_path / name)
        with open(p, "wb") as f:
            f.write(data)
        u = uri(srv.qemu_nbd(p, "raw"))
        assert json.loads(vdisk("info", "--output=json", "-f", "raw", u).stdout)[
            "virtual-size"] == 1024
        tool("-f", "raw", "-c", "read -P 0 1000 24", "-c", "write -P 0x41 1000 24", u)
        srv.kill_all()
        with open(p, "rb") as f:
            assert f.read() == data + b"\x41" * 24


def test_node_named_as_qemu_names_it(srv):
    """QEMU names an nbd node nbd://HOST:PORT[/EXPORT] or nbd+unix://[/EXPORT]?socket=PATH
    whatever form the URI had (default port spelled out, no "/" for the empty export, nbd+tcp://
    its other spelling of nbd://)."""
    port = free_port()
    base = srv.nbdkit("memory", "64k", tcp_port=port)
    sock = srv.nbdkit("memory", "64k")
    for u in (base, base + "/", base + "/exp", f"nbd://127.0.0.1:{port}/exp",
              uri(sock), uri(sock, "exp"), f"nbd+unix://?socket={sock}",
              f"nbd+tcp://127.0.0.1:{port}/exp", f"nbd+tcp://127.0.0.1:{port}"):
        for args in (["info", u], ["info", "--output=json", "-f", "raw", u], ["map", u]):
            _assert_same(*_both(*args))


def test_node_with_empty_export_option_named_as_qemu_names_it(srv):
    """An export given as "" by options (not a URI) keeps the path's "/" in QEMU's name:
    nbd://HOST:PORT/ and nbd+unix:///?socket=PATH; absent, there is none."""
    port = free_port()
    srv.nbdkit("memory", "64k", tcp_port=port)
    sock = srv.nbdkit("memory", "64k")
    inet = f"server.type=inet,server.host=127.0.0.1,server.port={port}"
    unix = f"server.type=unix,server.path={sock}"
    for opts, name in ((f"{inet},export=", f"nbd://127.0.0.1:{port}/"),
                       (f"host=127.0.0.1,port={port},export=", f"nbd://127.0.0.1:{port}/"),
                       (f"{unix},export=", f"nbd+unix:///?socket={sock}"),
                       (unix, f"nbd+unix://?socket={sock}"), (inet, f"nbd://127.0.0.1:{port}")):
        for args in (["info", "--image-opts", f"driver=nbd,{opts}"],
                     ["info", "--output=json", "--image-opts", f"driver=nbd,{opts}"]):
            pq, pv = _both(*args)
            _assert_same(pq, pv)
            assert pq.returncode == 0 and name in pq.stdout, pq.stdout
    tree = {"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)},
            "export": ""}
    pq, pv = _both("info", "json:" + json.dumps(tree))
    _assert_same(pq, pv)
    assert f"image: nbd://127.0.0.1:{port}/\n" in pv.stdout


def test_invalid_nbd_urls_as_qemu_img(tmp_path):
    """What QEMU's nbd_parse_uri refuses - nbd:// without a host or with a query, nbd+unix://
    without exactly one socket= or with a host - is "No valid URL specified", exit 1, before
    any connection."""
    sock = str(tmp_path / "s.sock")
    for u in ("nbd://", "nbd:///exp", "nbd://:10809", "nbd://:10809/exp", "nbd://localhost/?x=y",
              "nbd+unix://", "nbd+unix:///", "nbd+unix:///exp", "nbd+tcp://", "nbd+tcp://h/?x=y",
              f"nbd+unix:///?socket={sock}&x=y", f"nbd+unix://localhost/?socket={sock}"):
        pq, pv = _both("info", u)
        assert (pv.returncode, pv.stdout) == (pq.returncode, pq.stdout) == (1, "")
        assert pv.stderr.replace("vdisk: ", "qemu-img: ") == pq.stderr == \
            f"qemu-img: Could not open '{u}': No valid URL specified\n"


def test_nbd_by_options_as_qemu_img(srv):
    """An nbd node named by options (--image-opts, json:) as qemu-img takes them: server.*
    and export, also as a raw node's file; an incomplete address refused in QEMU's words."""
    sock = srv.nbdkit("-e", "foo", "memory", "1000")
    srv_opts = f"server.type=unix,server.path={sock}"
    tree = {"driver": "nbd", "server": {"type": "unix", "path": sock}, "export": "foo"}
    for args in (["info", "--image-opts", f"driver=nbd,{srv_opts},export=foo"],
                 ["map", "--output=json", "--image-opts", f"driver=nbd,{srv_opts}"],
                 ["info", "--output=json", "--image-opts",
                  f"driver=raw,file.driver=nbd,file.{srv_opts.replace(',', ',file.')}"],
                 ["info", "--output=json", "json:" + json.dumps(tree)],
                 ["map", "--output=json", "json:" + json.dumps({"driver": "raw", "file": tree})]):
        pq, pv = _both(*args)
        assert pq.returncode == 0 and ("1024" in pq.stdout or "1000" in pq.stdout), pq.stderr
        _assert_same(pq, pv)
    for opts in ("driver=nbd", "driver=nbd,server.type=unix",
                 "driver=nbd,server.type=inet,server.port=10809"):
        pq, pv = _both("info", "--image-opts", opts)
        assert pq.returncode == pv.returncode == 1
        assert pv.stderr.replace("vdisk: ", "qemu-img: ") == pq.stderr


def test_nbd_legacy_address_options_as_qemu_img(srv):
    """QEMU's legacy nbd options (path=, host=[,port=], export=) as qemu-img takes them in
    --image-opts, a raw node's file.* and json:; a missing port is 10809; mixed with server.*,
    path with host or port, or only a port: refused in qemu-img's words, exit 1."""
    sock = srv.nbdkit("-e", "foo", "memory", "1M")
    port = free_port()
    srv.nbdkit("memory", "2M", tcp_port=port)
    for args in (["info", "--image-opts", f"driver=nbd,path={sock}"],
                 ["info", "--image-opts", f"driver=nbd,path={sock},export=foo"],
                 ["info", "--image-opts", f"driver=nbd,host=127.0.0.1,port={port}"],
                 ["info", "--output=json", "--image-opts",
                  f"driver=raw,file.driver=nbd,file.path={sock},file.export=foo"],
                 ["map", "--output=json", "--image-opts",
                  f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port}"],
                 ["info", "json:" + json.dumps({"driver": "nbd", "host": "127.0.0.1",
                                                "port": port})],
                 ["info", "json:" + json.dumps({"driver": "nbd", "server": {
                     "type": "inet", "host": "127.0.0.1", "port": port}})],
                 ["info", "--output=json", "json:" + json.dumps(
                     {"file": {"driver": "nbd", "path": sock, "export": "foo"}})]):
        pq, pv = _both(*args)
        assert pq.returncode == 0 and ("1048576" in pq.stdout or "2097152" in pq.stdout), \
            pq.stderr
        _assert_same(pq, pv)
    for opts in (f"driver=nbd,path={sock},host=127.0.0.1",
                 f"driver=nbd,path={sock},port={port}",
                 f"driver=nbd,path={sock},server.type=unix,server.path={sock}",
                 f"driver=nbd,host=127.0.0.1,port={port},server.type=inet",
                 f"driver=nbd,port={port}",
                 "driver=nbd,server.type=inet,server.host=127.0.0.1",
                 f"driver=nbd,server.host=127.0.0.1,server.port={port}"):
        pq, pv = _both("info", "--image-opts", opts)
        assert pq.returncode == pv.returncode == 1, opts
        assert pv.stdout == pq.stdout == ""
        assert pv.stderr.replace("vdisk: ", "qemu-img: ", 1) == pq.stderr
