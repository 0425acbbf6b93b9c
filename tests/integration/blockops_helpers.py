"""Shared pieces of the live chain tests (jobs/test_jobs_stream.py, jobs/test_jobs_commit.py,
jobs/test_jobs_snapshot.py).

A three-image qcow2 chain with known content and a byte model of what the guest sees; vdiskd serving
its top over NBD (unix socket); a guest writer (qemu-io over nbd+unix) whose writes are applied to
the model in the order qemu-io issues them (one request at a time); and comparisons against real
QEMU tools (qemu-img convert/info/check).
"""
import json
import os
import random
import re
import socket
import subprocess
import threading
import time

import pytest

from conftest import qemu_img, qemu_io, assert_qemu_check_clean
from qmp_client import start_vdiskd
import nbd_helpers as H

MiB = 1 << 20
KiB = 1 << 10
SIZE = 8 * MiB


def make_chain(tmp, names=("base", "mid", "top")):
    """base: 0x11 [0,2M), 0x33 [6M,7M); mid: 0x44 [1M,3M), zeroes [6M+64K,+64K); top: 0x22 [2.5M,4M).

    Backing names are recorded relative (as libvirt/QEMU do for images in one directory).
    """
    base, mid, top = (tmp / f"{n}.qcow2" for n in names)
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {2 * MiB}", "-c",
            f"write -P 0x33 {6 * MiB} {MiB}", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x44 {1 * MiB} {2 * MiB}", "-c",
            f"write -z {6 * MiB + 64 * KiB} {64 * KiB}", mid)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x22 {2 * MiB + 512 * KiB} {1536 * KiB}", top)
    model = bytearray(SIZE)
    model[0:2 * MiB] = b"\x11" * (2 * MiB)
    model[6 * MiB:7 * MiB] = b"\x33" * MiB
    model[1 * MiB:3 * MiB] = b"\x44" * (2 * MiB)
    model[6 * MiB + 64 * KiB:6 * MiB + 128 * KiB] = bytes(64 * KiB)
    model[2 * MiB + 512 * KiB:4 * MiB] = b"\x22" * (1536 * KiB)
    return base, mid, top, model


class Served:
    """vdiskd serving `top` (chain opened from its headers) as node disk0, export disk0."""

    def __init__(self, tmp, top, need=("block-stream",)):
        self.tmp = tmp
        self.sock = str(tmp / "nbd.sock")
        # Relative image names: run the daemon in the images' directory, as a user naming
        # "top.qcow2" would.
        cwd = os.getcwd()
        os.chdir(str(tmp))
        try:
            self.d = start_vdiskd(tmp, "--blockdev", json.dumps({
                "driver": "qcow2", "node-name": "disk0",
                "file": {"driver": "file", "filename": os.path.basename(str(top))}}),
                "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
        finally:
            os.chdir(cwd)
        self.q = self.d.client()
        names = {c["name"] for c in self.q.cmd("query-commands")}
        missing = [n for n in (*need, "query-block-jobs") if n not in names]
        if missing:
            self.close()
            pytest.fail(f"this vdiskd does not register {missing} (blockops_qmp_register / "
                        "jobs_qmp_register)")
        self.uri = f"nbd+unix:///disk0?socket={self.sock}"

    def close(self):
        self.q.close()
        self.d.kill()

    def stop(self):
        self.q.close()
        self.d.stop_checked()

    # `with Served(...) as s:` a body that returns stops the daemon checked (exit 0, no
    # sanitizer report); the daemon is killed whatever happened.
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.stop()
        finally:
            self.close()


def write_cmds(model, rng, n, pattern_base, lo=0, hi=SIZE, max_len=200 * KiB):
    """n random writes / write-zeroes as qemu-io -c arguments, applied to the model in order."""
    cmds = []
    for i in range(n):
        length = rng.randrange(1, max_len)
        off = rng.randrange(lo, hi - length)
        if rng.random() < 0.8:
            pat = (pattern_base + i) % 250 + 1
            cmds += ["-c", f"write -P {pat} {off} {length}"]
            model[off:off + length] = bytes([pat]) * length
        else:
            cmds += ["-c", f"write -z {off} {length}"]
            model[off:off + length] = bytes(length)
    return cmds


class Guest(threading.Thread):
    """A guest writing through NBD in the background (one qemu-io, sequential requests)."""

    def __init__(self, uri, cmds):
        super().__init__(daemon=True)
        self.uri, self.cmds, self.error = uri, cmds, None

    def run(self):
        try:
            qemu_io("-f", "raw", *self.cmds, self.uri, timeout=60)
        except BaseException as e:  # reported by join_checked
            self.error = e

    def join_checked(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive(), "guest writer hung"
        if self.error:
            raise self.error

    def run_checked(self):
        """Write all of it now: start, then join_checked."""
        self.start()
        self.join_checked()


class PipelinedGuest(threading.Thread):
    """A guest keeping `depth` writes of random extents in flight on one NBD connection
    (nbd_helpers.RawClient), batch after batch until stopped. The extents of one batch never
    overlap, so the model applies a batch whatever order the server completes it in. With
    flushes, every batch is followed by NBD_CMD_FLUSH; without, the guest never asks for one.
    It writes export `name`, inside [lo, hi)."""

    def __init__(self, sock, model, rng, depth=8, flushes=False, name="disk0", lo=0, hi=SIZE):
        super().__init__(daemon=True)
        self.c = H.RawClient(sock, timeout=60)
        self.c.greet()
        self.c.go(name, structured=False)
        self.model, self.rng, self.depth, self.flushes = model, rng, depth, flushes
        self.lo, self.hi = lo, hi
        self.batches, self.stop, self.error = 0, False, None

    def batch(self):
        taken, reqs = [], []
        while len(reqs) < self.depth:
            length = self.rng.randrange(512, 64 * KiB)
            off = self.rng.randrange(self.lo, self.hi - length)
            if any(off < e and s < off + length for s, e in taken):
                continue
            taken.append((off, off + length))
            reqs.append((off, self.rng.randbytes(length)))
        for i, (off, data) in enumerate(reqs):
            self.c.request(H.CMD_WRITE, off, len(data), i + 1, 0, data)
        for _ in reqs:
            cookie, err, _ = self.c.reply()
            assert err == 0, f"write {cookie} failed: {err}"
        for off, data in reqs:
            self.model[off:off + len(data)] = data
        if self.flushes:
            self.c.request(H.CMD_FLUSH, 0, 0, 100)
            assert self.c.reply()[1] == 0, "flush failed"

    def run(self):
        try:
            while not self.stop:
                self.batch()
                self.batches += 1
        except BaseException as e:  # reported by join_checked
            self.error = e

    def wait_batches(self, n, timeout=60):
        end = time.time() + timeout
        while self.batches < n and self.error is None:
            assert time.time() < end, f"guest made {self.batches} batches, not {n}"
            time.sleep(0.01)

    def join_checked(self):
        self.stop = True
        self.join(60)
        assert not self.is_alive(), "guest writer hung"
        self.c.close()
        if self.error:
            raise self.error


def wait_log(served, pattern):
    """The first match of pattern (a compiled regex) in vdiskd's log, waiting up to 5 s for the
    line (a job writes it around its event)."""
    for _ in range(100):
        m = pattern.search(served.d.output())
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(served.d.output())


def job_under_pipelined_guest(tmp, served, model, seed, pattern, what, command, **args):
    """`command` runs to BLOCK_JOB_COMPLETED while a PipelinedGuest (seeded) keeps writes in
    flight, and 3 batches more after it; the job's log line (pattern, group 1 the syncs made
    while the guest was paused) counts 0 syncs, and the guest reads the model."""
    g = PipelinedGuest(served.sock, model, random.Random(seed))
    g.start()
    g.wait_batches(5)
    served.q.cmd(command, **args)
    done = served.q.get_event("BLOCK_JOB_COMPLETED", timeout=30)
    assert "error" not in done["data"], done
    g.wait_batches(g.batches + 3)
    g.join_checked()
    m = wait_log(served, re.compile(pattern))
    assert int(m.group(1)) == 0, m.group(0)
    assert_same(guest_read(tmp, served.uri), bytes(model), what)


def guest_read(tmp, uri, name="guest.raw"):
    """Everything the guest sees now, read over NBD."""
    out = tmp / name
    qemu_img("convert", "-f", "raw", "-O", "raw", uri, out)
    return out.read_bytes()


def image_content(tmp, path, name):
    out = tmp / name
    qemu_img("convert", "-O", "raw", path, out)
    return out.read_bytes()


def assert_same(a, b, what):
    if a == b:
        return
    assert len(a) == len(b), f"{what}: length {len(a)} != {len(b)}"
    for i in range(len(a)):
        if a[i] != b[i]:
            raise AssertionError(f"{what}: first difference at {i}: {a[i]:#x} != {b[i]:#x}")


def chain_info(path):
    """[(filename, backing-filename, backing-filename-format)] of qemu-img info --backing-chain."""
    p = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", str(path)],
                       capture_output=True, text=True, check=True, cwd=os.path.dirname(str(path)))
    return [(os.path.basename(i["filename"]), i.get("backing-filename"),
             i.get("backing-filename-format")) for i in json.loads(p.stdout)]


def statuses(q, job_id):
    return [e["data"]["status"] for e in q.events
            if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]


def wait_status(q, job_id, status, timeout=20):
    end = time.time() + timeout
    while status not in statuses(q, job_id):
        assert time.time() < end, f"no status {status} for {job_id}; saw {q.events}"
        q.sock.settimeout(max(0.05, end - time.time()))
        try:
            q.events.append(q.recv())
        except socket.timeout:
            pass
        finally:
            q.sock.settimeout(10)


def check_clean(*paths):
    for p in paths:
        assert_qemu_check_clean(p)
