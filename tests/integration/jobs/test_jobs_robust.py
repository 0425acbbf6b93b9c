"""Robustness of vdiskd's block jobs under a real, concurrently writing NBD guest.

Every test runs a guest that writes through vdiskd's NBD export (a small python NBD client, one
connection, requests in order; or pipelined batches) while a job runs, and compares the final
content byte for byte with a model of what the guest wrote:
  - target I/O errors (nbdkit error filter: EIO / ENOSPC) with on-target-error report / stop / enospc,
  - storage migration to another host's NBD export (a second vdiskd, or qemu-nbd),
  - seeded random pause / resume / set-speed / cancel / complete of mirror, stream and commit,
  - a guest outpacing a speed-limited mirror (automatic switch to write-blocking),
  - kill -9 of vdiskd in the middle of a job,
  - a pivot while a pipelining client has many writes in flight.
Every daemon (vdiskd, nbdkit, qemu-nbd) is killed by a finally, whatever the test did.

Also covered: a READY active commit whose speed limit the guest outpaces still finishes
block-job-complete and a soft block-job-cancel (bounded unthrottled rounds, then the drained tail);
on-target-error=stop in write-blocking mode (guest writes failing on the target while the job is
stopped only leave their range dirty: no second stop after the resume); a target whose block status
fails (treated as unknown: the range is copied, not reported as a source error).
"""
import os
import random
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import qemu_img, wait_unix_listening
from blockops_helpers import (MiB, KiB, SIZE, make_chain, Served, guest_read, image_content,
                              assert_same, chain_info, statuses, wait_status, check_clean)
from nbd_helpers import RawClient, start_daemon, CMD_WRITE, CMD_WZ, CMD_FLUSH


# ---------------------------------------------------------------------------------------------
# helpers

class Procs:
    """Cleanup stack: every process / Served registered here is killed at the end of the test."""

    def __init__(self):
        self.items = []

    def add(self, obj):
        self.items.append(obj)
        return obj

    def close_all(self):
        for obj in reversed(self.items):
            try:
                if isinstance(obj, subprocess.Popen):
                    if obj.poll() is None:
                        obj.kill()
                        obj.wait(timeout=10)
                elif isinstance(obj, Served):
                    obj.close()
                elif hasattr(obj, "stop_writer"):
                    obj.stop_writer()
                else:
                    obj.kill()
            except Exception:  # cleanup must go on with the others
                pass


@pytest.fixture
def procs():
    p = Procs()
    try:
        yield p
    finally:
        p.close_all()


def start_nbdkit(procs, tmp, name, *args):
    """nbdkit in the foreground on a unix socket; killed by procs."""
    sock = str(tmp / f"{name}.sock")
    log = open(str(tmp / f"{name}.log"), "w")
    p = procs.add(subprocess.Popen(["nbdkit", "-f", "-U", sock, *args], stdout=log,
                                   stderr=subprocess.STDOUT))
    log.close()
    wait_unix_listening(sock, p)
    return sock


def write_errors(errno_name, trigger=None):
    """nbdkit error filter arguments: every write, write-zeroes and trim fails with errno_name
    (while `trigger` exists, if given). Reads and block status keep working."""
    args = []
    for op in ("pwrite", "zero", "trim"):
        args += [f"error-{op}={errno_name}", f"error-{op}-rate=100%"]
        if trigger:
            args.append(f"error-{op}-file={trigger}")
    return args


def nbd_node(node, sock, export=""):
    return {"driver": "nbd", "node-name": node, "server": {"type": "unix", "path": sock},
            "export": export}


def nbd_content(tmp, sock, export, name):
    out = tmp / name
    qemu_img("convert", "-f", "raw", "-O", "raw", f"nbd+unix:///{export}?socket={sock}", out)
    return out.read_bytes()


class PyGuest(threading.Thread):
    """A guest on one NBD connection, one request at a time: random writes and write-zeroes,
    applied to the model in the order they were acknowledged (= issued). Runs `count` requests, or
    until stop_writer() when count is None. Every request must succeed; errors are collected."""

    def __init__(self, sock, export, model, seed, count=None, max_len=128 * KiB, flush_every=50,
                 pause=0.0):
        super().__init__(daemon=True)
        self.sock, self.export, self.model = sock, export, model
        self.rng = random.Random(seed)
        self.count, self.max_len, self.flush_every, self.pause = count, max_len, flush_every, pause
        self.errors, self.done, self.exc = [], 0, None
        self.stop_ev = threading.Event()

    def run(self):
        try:
            c = RawClient(self.sock, timeout=30)
            c.greet()
            c.go(self.export, structured=False)
            cookie = 0
            while not self.stop_ev.is_set() and (self.count is None or self.done < self.count):
                ln = self.rng.randrange(1, self.max_len)
                off = self.rng.randrange(0, SIZE - ln)
                cookie += 1
                if self.rng.random() < 0.85:
                    data = bytes([self.rng.randrange(1, 256)]) * ln
                    c.request(CMD_WRITE, off, ln, cookie, 0, data)
                else:
                    data = bytes(ln)
                    c.request(CMD_WZ, off, ln, cookie)
                rc, err, _ = c.reply()
                assert rc == cookie
                if err:
                    self.errors.append(("write", off, ln, err))
                else:
                    self.model[off:off + ln] = data
                self.done += 1
                if self.flush_every and self.done % self.flush_every == 0:
                    self.flush(c, cookie + 1000000)
                if self.pause:
                    time.sleep(self.pause)
            self.flush(c, 999999999)
            c.disc()
            c.close()
        except BaseException as e:  # reported by join_checked
            self.exc = e

    def flush(self, c, cookie):
        c.request(CMD_FLUSH, 0, 0, cookie)
        rc, err, _ = c.reply()
        if err:
            self.errors.append(("flush", 0, 0, err))

    def stop_writer(self):
        self.stop_ev.set()
        self.join(60)

    def join_checked(self, timeout=60):
        self.join(timeout)
        assert not self.is_alive(), "guest writer hung"
        if self.exc:
            raise self.exc
        assert self.errors == [], f"the guest saw errors: {self.errors[:10]}"


class JobGone(Exception):
    pass


def jcmd(q, cmd, **args):
    """A job verb; raises JobGone when the job no longer exists (it finished by itself)."""
    r = q.execute(cmd, {k.replace("_", "-"): v for k, v in args.items()})
    if "error" in r:
        if r["error"]["desc"].startswith("Block job") and "not found" in r["error"]["desc"]:
            raise JobGone(r["error"]["desc"])
        raise AssertionError(f"{cmd} {args}: {r['error']}")
    return r["return"]


def job_info(q, job_id):
    for j in q.cmd("query-block-jobs"):
        if j["device"] == job_id:
            return j
    return None


def wait_job(q, job_id, pred, timeout=15, what="condition"):
    end = time.time() + timeout
    while True:
        j = job_info(q, job_id)
        if j is not None and pred(j):
            return j
        assert time.time() < end, f"job {job_id}: no {what} within {timeout}s; last {j}"
        time.sleep(0.05)


def wait_progress(what, count, at_least, timeout=30):
    """Wait until count() >= at_least (a writer made progress): event-driven, not a fixed sleep
    that a loaded machine may not give the writer enough CPU in."""
    end = time.time() + timeout
    while count() < at_least:
        assert time.time() < end, f"{what}: {count()} < {at_least} after {timeout}s"
        time.sleep(0.01)


def events(q, name, job_id=None):
    """Events called name seen so far (drains what is readable without blocking)."""
    q.sock.settimeout(0.01)
    try:
        while True:
            q.events.append(q.recv())
    except (socket.timeout, BlockingIOError):
        pass
    finally:
        q.sock.settimeout(10)
    return [e for e in q.events if e["event"] == name
            and (job_id is None or e["data"].get("device", e["data"].get("id")) == job_id)]


def wait_event(q, name, job_id, timeout=20):
    end = time.time() + timeout
    while True:
        evs = events(q, name, job_id)
        if evs:
            return evs[0]
        assert time.time() < end, f"no {name} for {job_id} within {timeout}s; saw {q.events}"
        time.sleep(0.02)


def check_consistent(path):
    """qemu-img check after a crash: no corruption (leaks allowed: exit 0 or 3)."""
    p = qemu_img("check", "-f", "qcow2", path, check=False)
    assert p.returncode in (0, 3), f"qemu-img check {path}: exit {p.returncode}\n{p.stdout}{p.stderr}"
    assert "ERROR" not in p.stdout, p.stdout


def served(procs, tmp, top, need):
    s = Served(tmp, top, need=need)
    return procs.add(s)


# ---------------------------------------------------------------------------------------------
# 1. target I/O errors


@pytest.mark.parametrize("target,policy", [("error-EIO", "report"), ("full-ENOSPC", "report"),
                                           ("error-EIO", "enospc")])
def test_target_error_report_fails_job_guest_unharmed(tmp_path, procs, target, policy):
    """on-target-error=report (or enospc with an error that is not ENOSPC): BLOCK_JOB_ERROR (write,
    report), then BLOCK_JOB_COMPLETED with an error; the guest writing to the source meanwhile
    never sees an error and its data is intact. Targets: nbdkit's error filter (EIO) and nbdkit's
    full plugin (every write fails with ENOSPC)."""
    base, mid, top, model = make_chain(tmp_path)
    if target == "error-EIO":
        nk = start_nbdkit(procs, tmp_path, "nbdkit", "--filter=error", "memory", str(SIZE),
                          *write_errors("EIO"))
    else:
        nk = start_nbdkit(procs, tmp_path, "nbdkit", "full", str(SIZE))
    s = served(procs, tmp_path, top, ("blockdev-mirror",))
    q = s.q
    g = procs.add(PyGuest(s.sock, "disk0", model, seed=101, count=400))
    g.start()
    q.cmd("blockdev-add", **{k.replace("-", "_"): v for k, v in nbd_node("tgt", nk).items()})
    q.cmd("blockdev-mirror", job_id="m", device="disk0", target="tgt", sync="full",
          on_target_error=policy)
    err = wait_event(q, "BLOCK_JOB_ERROR", "m")
    assert err["data"] == {"device": "m", "operation": "write", "action": "report"}, err
    done = wait_event(q, "BLOCK_JOB_COMPLETED", "m")
    assert done["data"]["type"] == "mirror" and done["data"].get("error"), done
    assert ("No space left on device" if target == "full-ENOSPC" else "Input/output error") \
        in done["data"]["error"], done
    wait_status(q, "m", "null")
    assert "aborting" in statuses(q, "m"), statuses(q, "m")
    assert q.cmd("query-block-jobs") == []
    g.join_checked()
    assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view")
    # the failed target can go away; the guest is still on its chain
    q.cmd("blockdev-del", node_name="tgt")
    s.stop()
    assert_same(image_content(tmp_path, top, "top.raw"), bytes(model), "source chain")
    assert chain_info(top) == [("top.qcow2", "mid.qcow2", "qcow2"),
                               ("mid.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    check_clean(base, mid, top)


@pytest.mark.parametrize("errno_name,policy,iostatus,mode", [
    ("EIO", "stop", "failed", "background"), ("ENOSPC", "stop", "nospace", "background"),
    ("ENOSPC", "enospc", "nospace", "background"), ("EIO", "stop", "failed", "write-blocking")])
def test_target_error_stop_pauses_then_resumes(tmp_path, procs, errno_name, policy, iostatus,
                                               mode):
    """on-target-error=stop (or enospc with ENOSPC): the job pauses with io-status failed/nospace,
    the guest keeps writing without errors; once the target heals, resume, READY, pivot: the target
    (nbdkit's memory) holds exactly what the guest wrote; the source what it wrote before."""
    base, mid, top, model = make_chain(tmp_path)
    trigger = tmp_path / "fail-now"
    trigger.write_text("")
    nk = start_nbdkit(procs, tmp_path, "nbdkit", "--filter=error", "memory", str(SIZE),
                      *write_errors(errno_name, trigger))
    s = served(procs, tmp_path, top, ("blockdev-mirror",))
    q = s.q
    g = procs.add(PyGuest(s.sock, "disk0", model, seed=102, count=None, pause=0.002))
    g.start()
    q.cmd("blockdev-add", **{k.replace("-", "_"): v for k, v in nbd_node("tgt", nk).items()})
    q.cmd("blockdev-mirror", job_id="m", device="disk0", target="tgt", sync="full",
          on_target_error=policy, copy_mode=mode)
    err = wait_event(q, "BLOCK_JOB_ERROR", "m")
    assert err["data"] == {"device": "m", "operation": "write", "action": "stop"}, err
    j = wait_job(q, "m", lambda j: j["paused"], what="pause")
    assert j["io-status"] == iostatus and j["status"] in ("paused", "running"), j
    # the guest goes on meanwhile (wait for its writes rather than sleep: under load 0.5 s could
    # pass without one), and the job stays stopped while it does
    n0 = g.done
    wait_progress("guest writes while the job is stopped", lambda: g.done, n0 + 20)
    j = job_info(q, "m")
    assert j["paused"] and j["io-status"] == iostatus and not j["ready"], j
    assert not events(q, "BLOCK_JOB_COMPLETED", "m")
    assert not g.errors, g.errors
    trigger.unlink()
    q.cmd("block-job-resume", device="m")
    j = job_info(q, "m")
    assert j["io-status"] == "ok", j
    wait_event(q, "BLOCK_JOB_READY", "m", timeout=30)
    # the target is healthy: guest writes that failed on it while stopped do not stop it again
    time.sleep(0.3)
    j = job_info(q, "m")
    assert not j["paused"] and j["io-status"] == "ok", j
    assert len(events(q, "BLOCK_JOB_ERROR", "m")) == 1, events(q, "BLOCK_JOB_ERROR", "m")
    g.stop_writer()
    g.join_checked()
    source_model = bytes(model)
    q.cmd("block-job-complete", device="m")
    done = wait_event(q, "BLOCK_JOB_COMPLETED", "m")
    assert "error" not in done["data"], done
    # after the pivot the guest writes to the NBD target only
    g2 = procs.add(PyGuest(s.sock, "disk0", model, seed=103, count=100))
    g2.start()
    g2.join_checked()
    assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after pivot")
    s.stop()
    assert_same(nbd_content(tmp_path, nk, "", "tgt.raw"), bytes(model), "nbdkit target")
    assert_same(image_content(tmp_path, top, "top.raw"), source_model, "source chain")
    check_clean(base, mid, top)


# ---------------------------------------------------------------------------------------------
# 2. storage migration to another host's NBD export


@pytest.mark.parametrize("remote", ["vdiskd", "qemu-nbd"])
def test_mirror_to_remote_nbd_export_and_pivot(tmp_path, procs, remote):
    base, mid, top, model = make_chain(tmp_path)
    rdir = tmp_path / "remote"
    rdir.mkdir()
    rimg = rdir / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", rimg, SIZE)
    if remote == "vdiskd":
        rd = procs.add(start_daemon(rdir, str(rimg), fmt="qcow2", name="exp"))

        def rstop():
            rc = rd.stop()
            out = rd.output()
            assert "AddressSanitizer" not in out and "runtime error:" not in out, out
            return rc == 0
        rsock = rd.sock
    else:
        rsock = str(rdir / "qemu-nbd.sock")
        log = open(str(rdir / "qemu-nbd.log"), "w")
        p = procs.add(subprocess.Popen(["qemu-nbd", "-t", "-k", rsock, "-f", "qcow2", "-x", "exp",
                                        str(rimg)], stdout=log, stderr=subprocess.STDOUT))
        log.close()
        wait_unix_listening(rsock, p)

        def rstop():
            p.terminate()
            return p.wait(timeout=15) == 0
    s = served(procs, tmp_path, top, ("blockdev-mirror",))
    q = s.q
    g = procs.add(PyGuest(s.sock, "disk0", model, seed=201, count=None, pause=0.001))
    g.start()
    q.cmd("blockdev-add", **{k.replace("-", "_"): v
                             for k, v in nbd_node("remote0", rsock, "exp").items()})
    q.cmd("blockdev-mirror", job_id="mig", device="disk0", target="remote0", sync="full",
          speed=4 * MiB)
    # the guest writes while the rate-limited copy runs ...
    wait_progress("guest writes during the copy", lambda: g.done, 25)
    q.cmd("block-job-set-speed", device="mig", speed=0)
    wait_event(q, "BLOCK_JOB_READY", "mig", timeout=30)
    # ... and while ready
    wait_progress("guest writes while ready", lambda: g.done, g.done + 25)
    q.cmd("block-job-complete", device="mig")  # the guest is still writing
    done = wait_event(q, "BLOCK_JOB_COMPLETED", "mig")
    assert "error" not in done["data"], done
    # ... and goes on, now to the remote export
    wait_progress("guest writes after the pivot", lambda: g.done, g.done + 25)
    g.stop_writer()
    g.join_checked()
    assert g.done > 50, g.done
    assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view after migration")
    s.stop()
    assert rstop(), "the remote NBD server did not exit cleanly"
    check_clean(rimg)
    assert_same(image_content(tmp_path, rimg, "remote.raw"), bytes(model), "remote image")
    check_clean(base, mid, top)


# ---------------------------------------------------------------------------------------------
# 3. random-point control


def start_job(q, kind, tmp, speed):
    if kind == "mirror":
        q.cmd("drive-mirror", job_id="j", device="disk0", target=str(tmp / "tgt.qcow2"),
              sync="full", format="qcow2", speed=speed)
    elif kind == "stream":
        q.cmd("block-stream", job_id="j", device="disk0", speed=speed)
    else:
        q.cmd("block-commit", job_id="j", device="disk0", speed=speed)


@pytest.mark.parametrize("kind,ending", [
    ("mirror", "cancel-now"), ("mirror", "cancel-ready"), ("mirror", "complete"),
    ("commit", "cancel-now"), ("commit", "cancel-ready"), ("commit", "complete"),
    ("stream", "cancel-now"), ("stream", "finish")])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_control_under_writes(tmp_path, procs, kind, ending, seed):
    """Seeded random pause/resume and set-speed (incl. 0 = unlimited) at random moments of a job
    under guest writes, then the given ending: cancel at once (before READY as a rule: hard cancel,
    the guest stays on the untouched source), cancel once READY (no pivot), complete (pivot), or a
    stream's own end. The guest's view and the final active image match the model; the chain is
    as expected and every image passes qemu-img check."""
    rng = random.Random(seed * 1000 + {"mirror": 1, "stream": 2, "commit": 3}[kind]
                        + 10 * len(ending))
    base, mid, top, model = make_chain(tmp_path)
    s = served(procs, tmp_path, top, ("drive-mirror", "block-stream", "block-commit"))
    q = s.q
    g = procs.add(PyGuest(s.sock, "disk0", model, seed=seed, count=None, pause=0.002))
    g.start()
    start_job(q, kind, tmp_path, rng.choice([256 * KiB, 512 * KiB, MiB]))
    log = []
    finished = False
    for _ in range(rng.randrange(3, 7)):
        time.sleep(rng.uniform(0.02, 0.3))
        op = rng.choice(["pause", "speed", "speed0"])
        if job_info(q, "j") is None:
            finished = True  # a stream may finish by itself
            break
        log.append(op)
        try:
            if op == "pause":
                jcmd(q, "block-job-pause", device="j")
                time.sleep(rng.uniform(0.0, 0.3))
                j = job_info(q, "j")
                if j is None:
                    raise JobGone("finished while pausing")
                assert j["paused"], j
                jcmd(q, "block-job-resume", device="j")
            elif op == "speed":
                jcmd(q, "block-job-set-speed", device="j", speed=rng.choice([128 * KiB, 2 * MiB]))
            else:
                jcmd(q, "block-job-set-speed", device="j", speed=0)
                jcmd(q, "block-job-set-speed", device="j", speed=rng.choice([256 * KiB, MiB]))
        except JobGone:
            assert kind == "stream", log  # only a stream ends by itself
            finished = True
            break
    if finished:
        ending = "finish"  # a stream that ended by itself
    log.append(ending)
    pivot = False
    if ending in ("finish", "cancel-ready", "complete") and not finished:
        try:
            jcmd(q, "block-job-set-speed", device="j", speed=0)
        except JobGone:
            assert kind == "stream", log
    if ending == "finish":
        done = wait_event(q, "BLOCK_JOB_COMPLETED", "j", timeout=30)
        assert "error" not in done["data"], (done, log)
        pivot = True
    elif ending == "cancel-now":
        try:
            jcmd(q, "block-job-cancel", device="j")
        except JobGone:
            assert kind == "stream", log
        # If the job got READY just before the cancel, this is a soft cancel, which must catch up
        # with the guest: lift the limit (a ready active commit under a limit the guest outpaces
        # never catches up - reported separately, see the module docstring).
        q.execute("block-job-set-speed", {"device": "j", "speed": 0})
        # hard cancel before ready; a job that just got ready (or a stream that just finished)
        # completes instead
        end = time.time() + 20
        while not (events(q, "BLOCK_JOB_CANCELLED", "j") or
                   events(q, "BLOCK_JOB_COMPLETED", "j")):
            assert time.time() < end, (log, q.events, q.cmd("query-block-jobs"), s.d.output())
            time.sleep(0.02)
        c = events(q, "BLOCK_JOB_COMPLETED", "j")
        assert not c or "error" not in c[0]["data"], (c, log)
        pivot = kind == "stream" and bool(c)
        if not c:
            assert "ready" not in statuses(q, "j"), log
            cev = events(q, "BLOCK_JOB_CANCELLED", "j")[0]["data"]
            if kind != "stream":  # a stream may be cancelled after its last copy, before its end
                assert cev["offset"] < cev["len"], cev  # really before the end of the copy
    elif ending == "cancel-ready":
        wait_event(q, "BLOCK_JOB_READY", "j", timeout=30)
        time.sleep(rng.uniform(0, 0.2))
        q.cmd("block-job-cancel", device="j")
        done = wait_event(q, "BLOCK_JOB_COMPLETED", "j")
        assert "error" not in done["data"], (done, log)
    else:
        wait_event(q, "BLOCK_JOB_READY", "j", timeout=30)
        time.sleep(rng.uniform(0, 0.2))
        q.cmd("block-job-complete", device="j")
        done = wait_event(q, "BLOCK_JOB_COMPLETED", "j")
        assert "error" not in done["data"], (done, log)
        pivot = True
    wait_status(q, "j", "null")
    time.sleep(rng.uniform(0.05, 0.2))  # the guest goes on after the job
    g.stop_writer()
    g.join_checked()
    assert_same(guest_read(tmp_path, s.uri), bytes(model), f"guest view ({log})")
    s.stop()
    tgt = tmp_path / "tgt.qcow2"
    active = {"mirror": tgt, "commit": base, "stream": top}[kind] if pivot else top
    assert_same(image_content(tmp_path, active, "active.raw"), bytes(model),
                f"{active.name} ({log})")
    full = [("top.qcow2", "mid.qcow2", "qcow2"), ("mid.qcow2", "base.qcow2", "qcow2"),
            ("base.qcow2", None, None)]
    if kind == "stream" and pivot:
        assert chain_info(top) == [("top.qcow2", None, None)], log
    else:
        assert chain_info(top) == full, log  # the source chain is unchanged
    check_clean(base, mid, top)
    if kind == "mirror" and tgt.exists():
        check_clean(tgt)


# ---------------------------------------------------------------------------------------------
# 4. a guest outpacing a speed-limited mirror


def test_outpaced_mirror_switches_to_write_blocking_and_converges(tmp_path, procs):
    base, mid, top, model = make_chain(tmp_path)
    tgt = tmp_path / "tgt.qcow2"
    s = served(procs, tmp_path, top, ("drive-mirror",))
    q = s.q
    g = procs.add(PyGuest(s.sock, "disk0", model, seed=401, count=None, max_len=64 * KiB,
                          flush_every=0))
    g.start()
    q.cmd("drive-mirror", job_id="m", device="disk0", target=str(tgt), sync="full",
          format="qcow2", speed=256 * KiB)
    j = job_info(q, "m")
    assert j["vdisk-copy-mode"] == "background" and j["vdisk-auto-write-blocking"] is False, j
    # The switch needs three consecutive 1 s windows in which the guest re-dirties as fast as
    # the job copies; a guest slowed down by a loaded machine takes longer to get there.
    j = wait_job(q, "m", lambda j: j["vdisk-copy-mode"] == "write-blocking", timeout=60,
                 what="switch to write-blocking")
    assert j["vdisk-auto-write-blocking"] is True and not j["ready"], j
    assert j["speed"] == 256 * KiB, j  # the user's limit is kept
    # still under the uncapped writer: the job converges once the backlog is copied
    q.cmd("block-job-set-speed", device="m", speed=0)
    wait_event(q, "BLOCK_JOB_READY", "m", timeout=30)
    q.cmd("block-job-complete", device="m")
    done = wait_event(q, "BLOCK_JOB_COMPLETED", "m")
    assert "error" not in done["data"], done
    time.sleep(0.3)
    g.stop_writer()
    g.join_checked()
    assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view")
    s.stop()
    check_clean(tgt, base, mid, top)
    assert_same(image_content(tmp_path, tgt, "tgt.raw"), bytes(model), "target after pivot")


@pytest.mark.parametrize("verb", ["complete", "cancel"])
def test_outpaced_ready_commit_finishes(tmp_path, procs, verb):
    """A READY active commit under a speed limit the guest outpaces: block-job-complete (pivot to
    base) and a soft block-job-cancel (no pivot) both finish while the guest keeps writing, as the
    mirror does; the guest view and the resulting active image match the model."""
    base, mid, top, model = make_chain(tmp_path)
    s = served(procs, tmp_path, top, ("block-commit",))
    q = s.q
    q.cmd("block-commit", job_id="c", device="disk0")
    wait_event(q, "BLOCK_JOB_READY", "c", timeout=30)
    g = procs.add(PyGuest(s.sock, "disk0", model, seed=411, count=None, pause=0.002))
    g.start()
    q.cmd("block-job-set-speed", device="c", speed=256 * KiB)  # the guest now outpaces the copy
    time.sleep(0.8)
    n0 = g.done
    q.cmd("block-job-complete" if verb == "complete" else "block-job-cancel", device="c")
    done = wait_event(q, "BLOCK_JOB_COMPLETED", "c", timeout=60)
    assert "error" not in done["data"], done
    assert g.is_alive() and g.done > n0, (g.done, n0)  # finished while the guest was writing
    wait_status(q, "c", "null")
    time.sleep(0.2)  # the guest goes on after the job
    g.stop_writer()
    g.join_checked()
    assert_same(guest_read(tmp_path, s.uri), bytes(model), "guest view")
    s.stop()
    active = base if verb == "complete" else top
    assert_same(image_content(tmp_path, active, "active.raw"), bytes(model), active.name)
    if verb == "cancel":
        assert chain_info(top) == [("top.qcow2", "mid.qcow2", "qcow2"),
                                   ("mid.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    check_clean(base, mid, top)


def test_target_block_status_error_is_not_a_source_error(tmp_path, procs):
    """The target's block status failing (nbdkit error filter, error-extents) does not fail the
    mirror as a "source" error: the target's status is an optimisation, the range is copied. The
    job gets READY without BLOCK_JOB_ERROR and the pivoted target holds what the guest wrote."""
    base, mid, top, model = make_chain(tmp_path)
    nk = start_nbdkit(procs, tmp_path, "nbdkit", "--filter=error", "memory", str(SIZE),
                      "error-extents=EIO", "error-extents-rate=100%")
    s = served(procs, tmp_path, top, ("blockdev-mirror",))
    q = s.q
    g = procs.add(PyGuest(s.sock, "disk0", model, seed=412, count=200))
    g.start()
    q.cmd("blockdev-add", **{k.replace("-", "_"): v for k, v in nbd_node("tgt", nk).items()})
    q.cmd("blockdev-mirror", job_id="m", device="disk0", target="tgt", sync="full",
          on_target_error="stop")
    wait_event(q, "BLOCK_JOB_READY", "m", timeout=30)
    g.join_checked()
    source_model = bytes(model)
    q.cmd("block-job-complete", device="m")
    done = wait_event(q, "BLOCK_JOB_COMPLETED", "m")
    assert "error" not in done["data"], done
    assert events(q, "BLOCK_JOB_ERROR", "m") == []

    def read_no_extents(uri, name):
        # the target still fails block status: read its bytes without asking for extents
        out = tmp_path / name
        subprocess.run(["nbdcopy", "--no-extents", uri, str(out)], check=True, timeout=60)
        return out.read_bytes()
    assert_same(read_no_extents(s.uri, "guest.raw"), bytes(model), "guest view after pivot")
    s.stop()
    assert_same(read_no_extents(f"nbd+unix:///?socket={nk}", "tgt.raw"), bytes(model),
                "nbdkit target")
    assert_same(image_content(tmp_path, top, "top.raw"), source_model, "source chain")
    check_clean(base, mid, top)


# ---------------------------------------------------------------------------------------------
# 5. kill -9 mid-job


@pytest.mark.parametrize("kind", ["mirror", "stream", "commit"])
def test_kill9_mid_job_keeps_source_chain(tmp_path, procs, kind):
    base, mid, top, model = make_chain(tmp_path)
    s = served(procs, tmp_path, top, ("drive-mirror", "block-stream", "block-commit"))
    q = s.q
    # 64 KiB/s: a few MiB to copy takes tens of seconds, so the job is still mid-copy after the
    # guest's writes however slowly they go (at 256 KiB/s an active commit could get READY first)
    start_job(q, kind, tmp_path, 64 * KiB)
    # few, short writes: the guest must not allocate all of top (the stream would have nothing to do)
    g = PyGuest(s.sock, "disk0", model, seed=500 + len(kind), count=80, max_len=32 * KiB,
                flush_every=20)
    g.start()
    g.join_checked()  # every write acknowledged and flushed
    time.sleep(0.2)
    j = job_info(q, "j")
    assert j is not None and j["offset"] < j["len"], j  # really mid-job
    s.d.proc.kill()  # SIGKILL
    s.d.proc.wait(timeout=10)
    for img in (base, mid, top):
        check_consistent(img)
    assert chain_info(top) == [("top.qcow2", "mid.qcow2", "qcow2"),
                               ("mid.qcow2", "base.qcow2", "qcow2"), ("base.qcow2", None, None)]
    assert_same(image_content(tmp_path, top, "top.raw"), bytes(model), "source chain after kill")


# ---------------------------------------------------------------------------------------------
# 6. pivot with writes in flight

SLOT = 64 * KiB
WLEN = 32 * KiB
NSLOTS = SIZE // SLOT


class Pipeliner(threading.Thread):
    """Batches of `depth` writes to distinct slots sent back to back on one connection, then their
    replies; each write's data is its global index (8 bytes, repeated), so an image's slot tells
    which write it holds. Send order is the order the server admits the requests in."""

    def __init__(self, sock, export, seed, depth=48):
        super().__init__(daemon=True)
        self.sock, self.export, self.depth = sock, export, depth
        self.rng = random.Random(seed)
        self.writes = []  # slot of write i
        self.errors, self.exc = [], None
        self.stop_ev = threading.Event()
        self.batches = 0

    def run(self):
        try:
            c = RawClient(self.sock, timeout=30)
            c.greet()
            c.go(self.export, structured=False)
            while not self.stop_ev.is_set():
                slots = self.rng.sample(range(NSLOTS), self.depth)
                first = len(self.writes)
                for k, slot in enumerate(slots):
                    i = first + k
                    self.writes.append(slot)
                    c.request(CMD_WRITE, slot * SLOT, WLEN, i + 1, 0, struct.pack(">Q", i + 1)
                              * (WLEN // 8))
                seen = set()
                for _ in slots:
                    cookie, err, _ = c.reply()
                    seen.add(cookie)
                    if err:
                        self.errors.append((cookie - 1, err))
                assert seen == set(range(first + 1, first + self.depth + 1))
                self.batches += 1
            c.disc()
            c.close()
        except BaseException as e:
            self.exc = e

    def stop_writer(self):
        self.stop_ev.set()
        self.join(60)

    def slot_value(self, img, initial, slot):
        """Index of the write a slot holds (-1: the initial content)."""
        a = img[slot * SLOT:(slot + 1) * SLOT]
        assert a[WLEN:] == initial[slot * SLOT + WLEN:(slot + 1) * SLOT], f"slot {slot} tail"
        if a[:WLEN] == initial[slot * SLOT:slot * SLOT + WLEN]:
            return -1
        i = struct.unpack(">Q", a[:8])[0] - 1
        assert 0 <= i < len(self.writes) and self.writes[i] == slot, f"slot {slot}: garbage"
        assert a[:WLEN] == struct.pack(">Q", i + 1) * (WLEN // 8), f"slot {slot}: torn write {i}"
        return i

    def final_model(self, initial):
        m = bytearray(initial)
        for i, slot in enumerate(self.writes):
            m[slot * SLOT:slot * SLOT + WLEN] = struct.pack(">Q", i + 1) * (WLEN // 8)
        return bytes(m)

    def cut(self, img, initial):
        """The source must hold exactly writes[:c] for some c: returns (lo, hi) of possible c."""
        lo, hi = 0, len(self.writes)
        for slot in range(NSLOTS):
            i = self.slot_value(img, initial, slot)
            nxt = next((k for k in range(i + 1, len(self.writes)) if self.writes[k] == slot),
                       len(self.writes))
            lo, hi = max(lo, i + 1), min(hi, nxt)
        return lo, hi


@pytest.mark.parametrize("job", ["mirror-background", "mirror-write-blocking", "commit"])
def test_pivot_with_pipelined_writes_in_flight(tmp_path, procs, job):
    base, mid, top, model = make_chain(tmp_path)
    initial = bytes(model)
    tgt = tmp_path / "tgt.qcow2"
    s = served(procs, tmp_path, top, ("drive-mirror", "block-commit"))
    q = s.q
    if job == "commit":
        # the pivot target (base) must start with the guest-visible content for the model
        q.cmd("block-commit", job_id="j", device="disk0")
    else:
        q.cmd("drive-mirror", job_id="j", device="disk0", target=str(tgt), sync="full",
              format="qcow2", copy_mode=job.split("-", 1)[1])
    w = procs.add(Pipeliner(s.sock, "disk0", seed=600 + len(job)))
    w.start()
    wait_event(q, "BLOCK_JOB_READY", "j", timeout=30)
    wait_progress("pipelined batches while ready", lambda: w.batches if w.is_alive() else 1 << 30,
                  5)
    before = len(w.writes)
    q.cmd("block-job-complete", device="j")
    done = wait_event(q, "BLOCK_JOB_COMPLETED", "j")
    assert "error" not in done["data"], done
    after = len(w.writes)
    # Writes after the pivot (to the new image only): two more whole batches, so at least one
    # was sent after COMPLETED (a fixed sleep could pass without one on a loaded machine).
    b = w.batches
    wait_progress("pipelined batches after the pivot",
                  lambda: w.batches if w.is_alive() else 1 << 30, b + 2)
    w.stop_writer()
    assert w.exc is None, w.exc
    assert not w.is_alive(), "pipelining writer hung"
    assert w.errors == [], w.errors[:10]
    assert after > before, "no write was in flight around the pivot"
    final = w.final_model(initial)
    assert_same(guest_read(tmp_path, s.uri), final, "guest view")
    s.stop()
    new = base if job == "commit" else tgt
    check_clean(base, mid, top, new)
    assert_same(image_content(tmp_path, new, "new.raw"), final, "pivot target")
    if job != "commit":
        # the source holds exactly the writes admitted before the pivot's drain
        lo, hi = w.cut(image_content(tmp_path, top, "top.raw"), initial)
        assert lo <= hi, f"source is not a prefix of the writes: lo {lo} > hi {hi}"
        assert 0 < lo and hi < len(w.writes), (lo, hi, len(w.writes))
