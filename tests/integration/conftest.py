"""Shared fixtures for vdisk's integration tests.

Binaries come from $VDISK_BUILD (default: build/ at the repo root). Real peers (qemu-img, qemu-io,
qemu-nbd, nbdinfo, ...) are the oracle; helpers here run them and fail loudly with their output.
"""
import hashlib
import os
import shutil
import socket
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("VDISK_BUILD", os.path.join(ROOT, "build"))
VDISK = os.path.join(BUILD, "src", "tools", "vdisk")
VDISKD = os.path.join(BUILD, "src", "tools", "vdiskd")
# Preloaded into QEMU's tools by run(): their PBKDF2 calibration reads a scaled thread clock,
# so an encrypted create costs ~0.1 instead of 1-3 CPU-s (tests/peers/pbkdf-clock.c says why
# that changes nothing the tests compare).
PBKDF_CLOCK = os.path.join(BUILD, "tests", "peers", "pbkdf-clock.so")

# ASan: abort on the first error so a memory bug is a failed test, not a log line. make check's
# ASan build has UBSan trap (an illegal instruction, no libubsan: see the Makefile); handle_sigill
# makes ASan report that trap with the stack of the undefined behaviour (file:line).
os.environ.setdefault("ASAN_OPTIONS", "abort_on_error=1:detect_leaks=1:handle_sigill=1")
os.environ.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")


def run(cmd, check=True, timeout=120, input=None, cwd=None):
    """Run a command; return CompletedProcess with text output. check=True asserts exit 0.
    QEMU's tools (qemu-*) run with PBKDF_CLOCK preloaded."""
    peer = os.path.basename(str(cmd[0])).startswith("qemu-")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, cwd=cwd,
                       env=dict(os.environ, LD_PRELOAD=PBKDF_CLOCK) if peer else None)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def daemon_log(path):
    """A file for a daemon's stdout/stderr that the test may read back while it runs. It is
    opened for appending (O_APPEND): the child shares this open file, so a read that seeks to 0
    would otherwise move the offset the daemon writes at, and its next lines would overwrite
    earlier ones."""
    open(path, "w").close()
    return open(path, "a+")


def vdisk(*args, check=True, timeout=120, input=None):
    return run([VDISK, *map(str, args)], check=check, timeout=timeout, input=input)


def qemu_img(*args, check=True, timeout=120):
    """qemu-img, retried only where QEMU itself failed to calibrate PBKDF2: making an encrypted
    image measures its thread's CPU time, which reads 0 ms now and then on a fast or busy machine
    ("Unable to get accurate CPU usage", QEMU's crypto/pbkdf.c). That is the peer's own flake,
    not an answer about the image, so it gets up to 10 tries; any other failure is returned."""
    for _ in range(10):
        p = run(["qemu-img", *map(str, args)], check=False, timeout=timeout)
        if p.returncode == 0 or "Unable to get accurate CPU usage" not in p.stderr:
            break
    if check and p.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def qemu_io(*args, check=True, timeout=120):
    return run(["qemu-io", *map(str, args)], check=check, timeout=timeout)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def assert_qemu_check_clean(path, fmt="qcow2"):
    """qemu-img check must report no corruption and no leak (exit 0)."""
    p = qemu_img("check", "-f", fmt, path, check=False)
    assert p.returncode == 0, f"qemu-img check {path}: exit {p.returncode}\n{p.stdout}{p.stderr}"


def assert_not_crashed(p):
    """A failing command must fail cleanly: an exit code, not a signal or a sanitizer report."""
    assert p.returncode >= 0, f"killed by signal {-p.returncode}\n{p.stderr}"
    assert "AddressSanitizer" not in p.stderr and "runtime error:" not in p.stderr, p.stderr


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


# A passed test's tmp_path is removed once its teardown is over and raised nothing (a failed or
# skipped one's stays for the post-mortem, and so does that of a test whose teardown failed: a
# daemon's sanitizer report found when the vd fixture stops it). pytest 7.2 keeps every test's
# directory until the session ends: a whole run grew /tmp by ~12 GB, and CI's machine had
# 15 GiB free. The autouse fixture is set up before the test's other fixtures, so it is torn
# down after them: tests that os.chdir(tmp) get the worker's directory back first, so no later
# test starts in a removed one.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if rep.when == "call":
        item.vdisk_passed = rep.passed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    outcome = yield
    path = getattr(item, "vdisk_tmp_path", None)
    if path is not None and getattr(item, "vdisk_passed", False) and outcome.excinfo is None:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _remove_tmp_path_of_passed_test(request):
    cwd = os.getcwd()
    yield
    os.chdir(cwd)
    request.node.vdisk_tmp_path = request.node.funcargs.get("tmp_path")


# The real peers the tests use as the oracle (scripts/install-deps.sh installs them all).
PEERS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo", "nbdcopy", "nbdkit",
         "fio", "strace")


def pytest_sessionstart(session):
    """A missing binary or peer fails the run: no test skips because vdisk or vdiskd was not
    built or a peer is not installed."""
    missing = [p for p in (VDISK, VDISKD, PBKDF_CLOCK) if not os.access(p, os.X_OK)]
    if missing:
        raise pytest.UsageError(f"not built: {', '.join(missing)} (run make, or set VDISK_BUILD)")
    missing = [p for p in PEERS if not shutil.which(p)]
    if missing:
        raise pytest.UsageError(f"not installed: {', '.join(missing)} (scripts/install-deps.sh)")


@pytest.fixture
def vd(tmp):
    """A vdiskd with a QMP socket in tmp; stopped and checked (exit status, sanitizer output)
    at the end, also after a test sent "quit"."""
    from qmp_client import start_vdiskd  # qmp_client imports this module
    d = start_vdiskd(tmp)
    try:
        yield d
    except BaseException:
        d.kill()
        raise
    d.stop_checked()


@pytest.fixture
def qsd(tmp):
    """qemu-storage-daemon with a QMP socket in tmp (the oracle for reply shapes)."""
    from qmp_client import start_qsd
    d = start_qsd(tmp)
    try:
        yield d
    finally:
        d.kill()


def free_port():
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def unix_listening(path, pid=None):
    """True once a unix socket bound to path is listening. bind() creates the path but connect()
    is refused until listen(), a window a loaded machine can stretch (QEMU's tools and vdiskd
    both bind, then listen), so the path's existence is no readiness signal. Read from
    /proc/net/unix (flag __SO_ACCEPTCON): no connection is spent, as QEMU's monitor serves one at
    a time. pid: read the list of that process's network namespace (/proc/PID/net/unix), for a
    daemon in another one (ip netns exec), whose sockets /proc/net/unix does not list."""
    path = str(path)
    with open(f"/proc/{pid}/net/unix" if pid else "/proc/net/unix") as f:
        next(f, None)
        for line in f:
            fields = line.rstrip("\n").split(None, 7)
            if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def wait_unix_listening(path, proc, timeout=30):
    """Wait (event-driven, generous deadline) until proc listens on the unix socket path."""
    end = time.time() + timeout
    while not unix_listening(path):
        assert proc.poll() is None, f"{proc.args[0]} exited {proc.returncode}"
        assert time.time() < end, f"nothing listening on {path} after {timeout}s"
        time.sleep(0.02)


# ---- Appended for the interop / differential / crash / bad-input suites ----
import json as _json

# Multiplier for the randomized and crash suites (iterations, op counts). 1 = the fast default.
TEST_SCALE = float(os.environ.get("VDISK_TEST_SCALE", "1"))


def scaled(n, minimum=1):
    return max(minimum, int(n * TEST_SCALE))


def qemu_info(path, fmt=None, chain=False):
    """qemu-img info --output=json (-U: never fight a lock); a list when chain=True."""
    args = ["info", "-U", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    if chain:
        args.append("--backing-chain")
    return _json.loads(qemu_img(*args, path).stdout)


def qemu_map(path, fmt="qcow2"):
    return _json.loads(qemu_img("map", "-U", "--output=json", "-f", fmt, path).stdout)


def merged_map(entries, keys=("present", "zero", "data")):
    """A map's extents as [(values of keys), length], adjacent extents with equal keys merged:
    comparable between tools that split extents differently."""
    out = []
    for e in entries:
        k = tuple(e[key] for key in keys)
        if out and out[-1][0] == k:
            out[-1][1] += e["length"]
        else:
            out.append([k, e["length"]])
    return out


def io_cmds(ops):
    """Turn model ops into qemu-io / vdisk io command strings.

    ops: ("write", off, len, pattern) | ("zero", off, len) | ("discard", off, len) | ("flush",)
    """
    out = []
    for op in ops:
        if op[0] == "write":
            out.append(f"write -P {op[3]} {op[1]} {op[2]}")
        elif op[0] == "zero":
            out.append(f"write -z {op[1]} {op[2]}")
        elif op[0] == "discard":
            out.append(f"discard {op[1]} {op[2]}")
        elif op[0] == "flush":
            out.append("flush")
        else:
            raise ValueError(op)
    return out


def _c_args(cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    return args


def vdisk_io(path, cmds, fmt="qcow2", check=True, timeout=120):
    return vdisk("io", "-f", fmt, *_c_args(cmds), path, check=check, timeout=timeout)


def qemu_io_cmds(path, cmds, fmt="qcow2", check=True, timeout=120):
    return qemu_io("-f", fmt, *_c_args(cmds), path, check=check, timeout=timeout)


class GuestModel:
    """What a guest reads from a qcow2 image after a sequence of ops, with QEMU's semantics.

    write/zero change exactly the bytes named. discard (qemu-io `discard`, i.e. not a full
    discard) only acts on whole clusters inside the range -- qcow2 ignores partial clusters --
    and those then read as zeroes, except on a compat=0.10 image with a backing file: v2 has no
    zero flag and unallocating would expose the backing file, so QEMU (7.2) leaves them alone.
    """

    def __init__(self, size, cluster_size=65536, backing=None, v3=True):
        self.size = size
        self.cluster = cluster_size
        self.v3 = v3
        self.backing = None
        if backing is not None:
            self.backing = bytes(backing[:size]) + bytes(max(0, size - len(backing)))
        self.data = bytearray(self.backing) if self.backing is not None else bytearray(size)

    def apply(self, op):
        kind = op[0]
        if kind == "write":
            _, off, n, pat = op
            self.data[off:off + n] = bytes([pat & 0xff]) * n
        elif kind == "zero":
            _, off, n = op
            self.data[off:off + n] = bytes(n)
        elif kind == "discard":
            _, off, n = op
            c = self.cluster
            start = -(-off // c) * c
            end = (off + n) // c * c
            if end > start:
                if self.backing is not None and not self.v3:
                    pass
                else:
                    self.data[start:end] = bytes(end - start)
        elif kind == "flush":
            pass
        else:
            raise ValueError(op)

    def apply_all(self, ops):
        for op in ops:
            self.apply(op)
        return self

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.data)
        return path


def assert_same_guest_content(img, ref, img_fmt="qcow2", ref_fmt="raw", strict=False):
    """qemu-img compare: guest-visible content identical (strict: allocation too)."""
    args = ["compare", "-U", "-f", img_fmt, "-F", ref_fmt]
    if strict:
        args.append("-s")
    p = qemu_img(*args, img, ref, check=False)
    assert p.returncode == 0, f"qemu-img compare {img} {ref}: exit {p.returncode}\n{p.stdout}{p.stderr}"


def pattern_reads(model, ops, limit=200):
    """`read -P` commands for op ranges whose model content is uniform (what vdisk io can check)."""
    out = []
    for op in ops:
        if len(op) < 3 or op[2] == 0:
            continue
        off, n = op[1], op[2]
        chunk = model.data[off:off + n]
        if chunk.count(chunk[0]) == len(chunk):
            out.append(f"read -P {chunk[0]} {off} {n}")
        if len(out) >= limit:
            break
    return out


def map_units(entries, size, unit=512):
    """Expand a qemu-img-style JSON map to one (present, zero, data, depth, host offset) per unit."""
    out = [None] * (size // unit)
    for e in entries:
        s, n = e["start"], e["length"]
        off = e.get("offset")
        for pos in range(s, min(s + n, size), unit):
            out[pos // unit] = (e["present"], e["zero"], e["data"], e.get("depth"),
                                None if off is None else off + pos - s)
    return out


def assert_map_agrees(img, fmt="qcow2"):
    """`vdisk map --output=json` == `qemu-img map --output=json`, unit by unit."""
    q = qemu_map(img, fmt)
    size = sum(e["length"] for e in q)
    v = _json.loads(vdisk("map", "--output=json", "-f", fmt, img).stdout)
    qu, vu = map_units(q, size), map_units(v, size)
    for i, (a, b) in enumerate(zip(qu, vu)):
        if a != b:
            raise AssertionError(f"map of {img} differs at offset {i * 512}: qemu-img "
                                 f"(present, zero, data, depth, offset)={a} vdisk={b}")
