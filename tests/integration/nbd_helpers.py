"""Helpers for the NBD tests: start/stop vdiskd, and a tiny raw-socket NBD client for edge cases.

Every daemon started here is killed by the fixture's finally, whatever the test did.
"""
import os
import socket
import struct
import subprocess
import time

from conftest import VDISKD, daemon_log

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 6

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WZ, CMD_BS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, EINVAL, ENOSPC, ENOTSUP = 1, 5, 22, 28, 95
TF_READ_ONLY = 2


def blockdev_json(path, fmt="raw", node="n0", read_only=False):
    ro = ', "read-only": true' if read_only else ""
    return ('{"driver": "%s", "node-name": "%s", "file": {"driver": "file", "filename": "%s"}%s}'
            % (fmt, node, path, ro))


class Daemon:
    """A running vdiskd; .sock is the NBD unix socket, .uri(name) an NBD URI."""

    def __init__(self, args, sock, tmp):
        self.sock = sock
        self.log = daemon_log(os.path.join(str(tmp), "vdiskd.log"))
        # the pidfile appears once every export is served: our readiness signal
        self.pidfile = os.path.join(str(tmp), "vdiskd.pid")
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        self.proc = subprocess.Popen([VDISKD, "--pidfile", self.pidfile, *args], stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def uri(self, name="exp"):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def wait_ready(self, timeout=10):
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"vdiskd exited {self.proc.returncode}:\n{self.output()}")
            if os.path.exists(self.pidfile) and os.path.exists(self.sock):
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(self.sock)
                    s.close()
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise AssertionError("vdiskd did not start:\n" + self.output())

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig=15, timeout=15):
        """Signal the daemon and wait; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("vdiskd did not exit on signal %d:\n%s" % (sig, self.output()))
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def start_daemon(tmp, image, fmt="raw", writable=True, name="exp", extra=(), read_only_node=False,
                 description=None, bitmaps=(), blockdev=None, allocation_depth=False):
    """vdiskd exporting node n0: image opened as fmt, or the blockdev JSON text given."""
    sock = os.path.join(str(tmp), "nbd.sock")
    exp = f"type=nbd,id=e0,node-name=n0,name={name},writable={'on' if writable else 'off'}"
    exp += "".join(f",bitmaps.{i}={b}" for i, b in enumerate(bitmaps))
    if allocation_depth:
        exp += ",allocation-depth=on"
    if description:
        exp += ",description=" + description.replace(",", ",,")
    args = ["--blockdev", blockdev or blockdev_json(image, fmt, read_only=read_only_node),
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", exp, *extra]
    d = Daemon(args, sock, tmp)
    try:
        d.wait_ready()
    except BaseException:
        d.kill()
        raise
    return d


# ---------------- raw-socket client ----------------

class NbdError(Exception):
    pass


class RawClient:
    def __init__(self, path, timeout=10):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.structured = False

    def close(self):
        self.s.close()

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"EOF after {len(buf)}/{n} bytes")
            buf += chunk
        return buf

    def send(self, data):
        self.s.sendall(data)

    def closed_by_server(self, timeout=30):
        """True when the server closed the connection (EOF or reset) within timeout (a deadline
        for a loaded machine, not the expected latency: the close usually comes at once)."""
        self.s.settimeout(timeout)
        try:
            while True:
                d = self.s.recv(65536)
                if not d:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    # handshake
    def greet(self, cflags=3):
        magic, opts, hflags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBDMAGIC and opts == IHAVEOPT, (hex(magic), hex(opts))
        assert hflags & 1
        self.send(struct.pack(">I", cflags))
        return hflags

    def opt(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REPLY_MAGIC, hex(magic)
        return opt, rtype, self.recv(length)

    def opt_replies(self):
        """All replies to one option until ACK or an error; returns list of (type, data)."""
        out = []
        while True:
            _, rtype, data = self.opt_reply()
            out.append((rtype, data))
            if rtype == REP_ACK or rtype & 2**31:
                return out

    def go(self, name="exp", structured=True, meta=False):
        if structured:
            self.opt(OPT_STRUCTURED_REPLY)
            assert self.opt_replies()[-1][0] == REP_ACK
            self.structured = True
        if meta:
            nm = name.encode()
            q = b"base:allocation"
            self.opt(OPT_SET_META, struct.pack(">I", len(nm)) + nm + struct.pack(">II", 1, len(q)) + q)
            reps = self.opt_replies()
            assert reps[-1][0] == REP_ACK and reps[0][0] == REP_META, reps
        nm = name.encode()
        self.opt(OPT_GO, struct.pack(">I", len(nm)) + nm + struct.pack(">H", 0))
        reps = self.opt_replies()
        if reps[-1][0] != REP_ACK:
            raise NbdError(reps[-1][0])
        for t, d in reps:
            if t == REP_INFO and struct.unpack(">H", d[:2])[0] == 0:
                self.size, self.tflags = struct.unpack(">QH", d[2:12])
        return reps

    # transmission
    def request(self, cmd, offset, length, cookie, flags=0, data=b""):
        self.send(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length) + data)

    def reply(self, read_len=None):
        """One full reply. Returns (cookie, error, payload). Reads reassemble chunks into bytes."""
        magic = struct.unpack(">I", self.recv(4))[0]
        if magic == SIMPLE_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv(12))
            data = self.recv(read_len) if (read_len and err == 0) else b""
            return cookie, err, data
        assert magic == STRUCT_MAGIC, hex(magic)
        # structured: collect chunks of this cookie until DONE (assumes no interleaving per call)
        pieces, err, cookie, extents = {}, 0, None, []
        while True:
            flags, typ, cookie, length = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(length)
            if typ == 1:
                off = struct.unpack(">Q", payload[:8])[0]
                pieces[off] = payload[8:]
            elif typ == 2:
                off, ln = struct.unpack(">QI", payload)
                pieces[off] = b"\0" * ln
            elif typ == 5:
                ctx = struct.unpack(">I", payload[:4])[0]
                for i in range(4, len(payload), 8):
                    extents.append(struct.unpack(">II", payload[i:i + 8]))
            elif typ & 0x8000:
                err = struct.unpack(">I", payload[:4])[0]
            if flags & 1:
                break
            magic = struct.unpack(">I", self.recv(4))[0]
            assert magic == STRUCT_MAGIC
        if extents:
            return cookie, err, extents
        data = b"".join(pieces[k] for k in sorted(pieces))
        return cookie, err, data

    def read(self, offset, length, cookie=1, flags=0):
        self.request(CMD_READ, offset, length, cookie, flags)
        return self.reply(read_len=length)

    def write(self, offset, data, cookie=2, flags=0):
        self.request(CMD_WRITE, offset, len(data), cookie, flags, data)
        return self.reply()

    def disc(self):
        self.request(CMD_DISC, 0, 0, 99)


class Qmp:
    """Minimal QMP client: greeting, qmp_capabilities, commands; events are collected aside."""

    def __init__(self, path, timeout=10):
        import json as _json
        self.json = _json
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.events = []
        greeting = self._read()
        assert "QMP" in greeting, greeting
        r = self.cmd("qmp_capabilities")
        assert "return" in r, r

    def _read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("QMP closed")
        return self.json.loads(line)

    def cmd(self, _command, **args):
        msg = {"execute": _command}
        if args:
            msg["arguments"] = args
        self.f.write(self.json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            return r

    def close(self):
        self.f.close()
        self.s.close()


def wait_path(path, proc, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"vdiskd exited {proc.returncode}")
        if os.path.exists(path):
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear")
