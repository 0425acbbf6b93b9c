"""A small QMP client for the tests, plus starters for vdiskd --qmp and qemu-storage-daemon.

QMPClient reads the greeting, negotiates (unless told not to), runs commands, and keeps the events
it sees while waiting for replies in .events (get_event() waits for more). Every daemon started
here must be stopped by the caller's finally (the fixtures in the test modules do it).
"""
import contextlib
import json
import os
import socket
import subprocess
import time

from conftest import VDISKD, daemon_log, unix_listening


_NO_ID = object()


class QMPError(Exception):
    def __init__(self, error):
        super().__init__(f"{error.get('class')}: {error.get('desc')}")
        self.error = error


class QMPClient:
    def __init__(self, path, negotiate=True, timeout=10, repeated_greeting_ok=False):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.greeting = self.recv()
        if negotiate:
            r = self.execute("qmp_capabilities")
            if repeated_greeting_ok and "QMP" in r:
                # qemu-storage-daemon was once seen to greet a connection twice (the second
                # greeting read as qmp_capabilities' reply; cause not found): a peer's quirk that
                # says nothing about vdisk, so for QSD only, the real reply is the next one
                r = self.recv_reply()
            assert r == {"return": {}}, r

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv_line(self):
        """One raw line (without CR/LF); raises EOFError when the server closed."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def recv(self):
        return json.loads(self.recv_line())

    def recv_reply(self):
        """Next message that is not an event (events are kept in .events)."""
        while True:
            msg = self.recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def execute(self, cmd, args=None, id=_NO_ID):
        """Send a command; return the whole reply object ({"return": ..} or {"error": ..})."""
        req = {"execute": cmd}
        if args is not None:
            req["arguments"] = args
        if id is not _NO_ID:
            req["id"] = id
        self.send_raw(json.dumps(req) + "\n")
        return self.recv_reply()

    def cmd(self, cmd, **args):
        """Run a command that must succeed; keyword names use '_' for '-'. Returns "return"."""
        r = self.execute(cmd, {k.replace("_", "-"): v for k, v in args.items()})
        if "error" in r:
            raise QMPError(r["error"])
        return r["return"]

    def error(self, cmd, args=None, cls="GenericError"):
        """Run a command that must fail with class cls; returns the error's desc."""
        r = self.execute(cmd, args)
        assert "error" in r, f"{cmd} {args}: expected an error, got {r}"
        assert set(r) == {"error"}, r
        assert set(r["error"]) == {"class", "desc"}, r
        assert r["error"]["class"] == cls, r
        return r["error"]["desc"]

    def get_event(self, name, timeout=30):
        """Return (and remove) the first event called name, waiting up to timeout seconds (a
        deadline for a loaded machine running an ASan build, not an expected latency)."""
        end = time.time() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            left = end - time.time()
            if left <= 0:
                raise AssertionError(f"no {name} event within {timeout}s; saw {self.events}")
            self.sock.settimeout(left)
            try:
                self.events.append(self.recv())
            except socket.timeout:
                pass
            finally:
                self.sock.settimeout(10)


def wait_socket(path, proc, log, timeout=30, probe=True):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}:\n{read_log(log)}")
        if not probe:
            # bind() creates the path before listen(): wait for the listening socket itself
            if unix_listening(path, proc.pid):
                return
            time.sleep(0.02)
            continue
        if os.path.exists(path):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                s.close()
                return
            except OSError:
                pass
        time.sleep(0.02)
    raise AssertionError("daemon did not start:\n" + read_log(log))


def read_log(log):
    log.flush()
    log.seek(0)
    return log.read()


class Daemon:
    """vdiskd (or qemu-storage-daemon) with a QMP socket at .qmp_path."""

    def __init__(self, argv, qmp_path, logpath, probe=True):
        self.qmp_path = qmp_path
        self.is_qemu = os.path.basename(argv[0]) == "qemu-storage-daemon"
        self.log = daemon_log(logpath)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_socket(qmp_path, self.proc, self.log, probe=probe)
        except BaseException:
            self.kill()
            raise

    def client(self, negotiate=True):
        return QMPClient(self.qmp_path, negotiate=negotiate, repeated_greeting_ok=self.is_qemu)

    def output(self):
        return read_log(self.log)

    def wait(self, timeout=15):
        return self.proc.wait(timeout=timeout)

    def stop_checked(self):
        """Stop (SIGTERM) and assert a clean exit: status 0, no sanitizer report."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("daemon did not exit on SIGTERM:\n" + self.output())
        out = self.output()
        self.log.close()
        assert "AddressSanitizer" not in out and "runtime error:" not in out, out
        assert "LeakSanitizer" not in out and "ThreadSanitizer" not in out, out
        assert rc == 0, f"daemon exited {rc}:\n{out}"

    def kill(self):
        if self.log.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_vdiskd(tmp, *extra):
    path = os.path.join(str(tmp), "qmp.sock")
    return Daemon([VDISKD, "--qmp", path, *extra], path, os.path.join(str(tmp), "vdiskd.log"))


def start_qsd(tmp):
    path = os.path.join(str(tmp), "qsd-qmp.sock")
    return Daemon(["qemu-storage-daemon", "--chardev",
                   f"socket,path={path},server=on,wait=off,id=c0", "--monitor", "chardev=c0"],
                  path, os.path.join(str(tmp), "qsd.log"),
                  # QEMU's monitor serves one connection at a time: don't spend a connection
                  # on probing it (wait_socket watches for its listening socket instead).
                  probe=False)


@contextlib.contextmanager
def running(start, tmp):
    """start(tmp)'s daemon for a with-block (the QSD-vs-vdiskd comparisons): killed if the block
    raises; else vdiskd is stopped with its exit and log checked (stop_checked) and
    qemu-storage-daemon, which has no such check, killed."""
    d = start(tmp)
    try:
        yield d
    except BaseException:
        d.kill()
        raise
    if start is start_vdiskd:
        d.stop_checked()
    else:
        d.kill()


def file_node(path, node=None, **extra):
    o = {"driver": "file", "filename": str(path)}
    if node:
        o["node-name"] = node
    o.update(extra)
    return o


def fmt_node(fmt, node, path, **extra):
    o = {"driver": fmt, "node-name": node, "file": file_node(path)}
    o.update({k.replace("_", "-"): v for k, v in extra.items()})
    return o
