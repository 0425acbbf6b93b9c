"""The block jobs' copy engine (src/jobs/copy.c): several copies in flight, unthrottled, while a real
NBD guest keeps writing; and drive-mirror's `unmap`.

Every test runs a guest writing through vdiskd's NBD export concurrently with the job (one
connection, one request at a time, applied to a model in acknowledgement order) and compares the
final content byte for byte with the model. The disks are large enough (and the jobs unthrottled)
that the engine keeps several 1 MiB copies in flight while the guest writes into the same ranges:
a copy of old data landing after a newer guest write would show up as a difference.
"""
import contextlib
import json
import os
import random
import threading

import pytest

from conftest import qemu_img, qemu_io
from blockops_helpers import (MiB, KiB, Served, image_content, assert_same, chain_info,
                              wait_status, check_clean)
from nbd_helpers import RawClient, CMD_WRITE, CMD_WZ, CMD_FLUSH


BIG = 48 * MiB


class RangeGuest(threading.Thread):
    """One NBD connection, sequential random writes / write-zeroes within [lo, hi), applied to the
    model as acknowledged; runs until stop_writer(). Every request must succeed."""

    def __init__(self, sock, model, seed, lo, hi, max_len=256 * KiB):
        super().__init__(daemon=True)
        self.sock, self.model, self.lo, self.hi, self.max_len = sock, model, lo, hi, max_len
        self.rng = random.Random(seed)
        self.done, self.errors, self.exc = 0, [], None
        self.stop_ev = threading.Event()
        self.progress = threading.Condition()

    def run(self):
        try:
            c = RawClient(self.sock, timeout=60)
            c.greet()
            c.go("disk0", structured=False)
            cookie = 0
            while not self.stop_ev.is_set():
                ln = self.rng.randrange(1, self.max_len)
                off = self.rng.randrange(self.lo, self.hi - ln)
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
                    self.errors.append((off, ln, err))
                else:
                    self.model[off:off + ln] = data
                with self.progress:
                    self.done += 1
                    self.progress.notify_all()
            cookie += 1
            c.request(CMD_FLUSH, 0, 0, cookie)
            c.reply()
            c.disc()
            c.close()
        except BaseException as e:  # reported by stop_checked
            self.exc = e
        finally:
            with self.progress:
                self.done = max(self.done, 0)
                self.progress.notify_all()

    def wait_done(self, n, timeout=120):
        """Wait until n requests completed (event driven: the guest signals every completion)."""
        with self.progress:
            ok = self.progress.wait_for(lambda: self.done >= n or not self.is_alive()
                                        or self.exc is not None, timeout)
        assert ok and self.done >= n, f"guest completed {self.done} < {n} requests ({self.exc})"

    def stop_checked(self):
        self.stop_ev.set()
        self.join(120)
        assert not self.is_alive(), "guest writer hung"
        if self.exc:
            raise self.exc
        assert self.errors == [], f"the guest saw errors: {self.errors[:10]}"


def big_chain(tmp):
    """base: 0x11 over [0, 24M) and 0x33 over [32M, 40M); top over base: 0x22 over [8M, 20M) and
    zeroes over [36M, 37M). Enough data for many 1 MiB copies."""
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, BIG)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x11 0 {24 * MiB}",
            "-c", f"write -P 0x33 {32 * MiB} {8 * MiB}", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x22 {8 * MiB} {12 * MiB}",
            "-c", f"write -z {36 * MiB} {MiB}", top)
    model = bytearray(BIG)
    model[0:24 * MiB] = b"\x11" * (24 * MiB)
    model[32 * MiB:40 * MiB] = b"\x33" * (8 * MiB)
    model[8 * MiB:20 * MiB] = b"\x22" * (12 * MiB)
    model[36 * MiB:37 * MiB] = bytes(MiB)
    return base, top, model


def served(tmp, top):
    return Served(tmp, top, need=("drive-mirror", "block-stream", "block-commit"))


@contextlib.contextmanager
def guest_running(tmp, top, model, seed, hi=BIG, warmup=20):
    """vdiskd serving top and a RangeGuest writing [0, hi), `warmup` requests in. On a normal exit
    the guest is stopped and checked (no errors seen) and the daemon stopped cleanly; on an error
    both are torn down."""
    s = served(tmp, top)
    g = None
    try:
        g = RangeGuest(s.sock, model, seed=seed, lo=0, hi=hi)
        g.start()
        g.wait_done(warmup)
        yield s, g
        g.stop_checked()
        g = None
        s.stop()
    finally:
        if g:
            g.stop_ev.set()
        s.close()


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_unthrottled_mirror_with_copies_in_flight_and_guest(tmp_path, copy_mode):
    base, top, model = big_chain(tmp_path)
    tgt = tmp_path / "tgt.qcow2"
    with guest_running(tmp_path, top, model, seed=5) as (s, g):
        s.q.cmd("drive-mirror", **{"job-id": "m", "device": "disk0", "target": str(tgt),
                                   "sync": "full", "format": "qcow2", "copy-mode": copy_mode})
        s.q.get_event("BLOCK_JOB_READY", timeout=120)
        g.wait_done(g.done + 50)  # the guest keeps writing while ready
        s.q.cmd("block-job-complete", device="m")
        done = s.q.get_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" not in done["data"], done
        g.wait_done(g.done + 20)  # and after the pivot, onto the target
    check_clean(tgt, top)
    assert_same(image_content(tmp_path, tgt, "tgt.raw"), bytes(model), "target after pivot")
    assert qemu_img("info", "--output=json", tgt).stdout.count("backing-filename") == 0


def test_unthrottled_stream_with_guest(tmp_path):
    base, top, model = big_chain(tmp_path)
    with guest_running(tmp_path, top, model, seed=6) as (s, g):
        s.q.cmd("block-stream", **{"job-id": "st", "device": "disk0"})
        done = s.q.get_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" not in done["data"], done
        g.wait_done(g.done + 20)
    check_clean(top)
    assert chain_info(top) == [("top.qcow2", None, None)]
    assert_same(image_content(tmp_path, top, "top.raw"), bytes(model), "streamed top")


def test_unthrottled_active_commit_with_guest(tmp_path):
    base, top, model = big_chain(tmp_path)
    with guest_running(tmp_path, top, model, seed=7) as (s, g):
        s.q.cmd("block-commit", **{"job-id": "c", "device": "disk0"})
        s.q.get_event("BLOCK_JOB_READY", timeout=120)
        g.wait_done(g.done + 50)
        s.q.cmd("block-job-complete", device="c")
        done = s.q.get_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" not in done["data"], done
        g.wait_done(g.done + 20)  # now onto base
    check_clean(base, top)
    assert_same(image_content(tmp_path, base, "base.raw"), bytes(model), "base after pivot")


@pytest.mark.parametrize("kind", ["commit", "mirror"])
def test_early_writeback_after_every_copy_with_guest(tmp_path, monkeypatch, kind):
    """The copy engine's early writeback (sync_file_range of the destination's file, no sync)
    started after every 64 KiB copied while a guest writes: an active commit's base and a
    mirror's target still read exactly what the guest's model holds after the pivot."""
    monkeypatch.setenv("VDISK_COPY_WRITEBACK", str(64 * KiB))
    base, top, model = big_chain(tmp_path)
    tgt = tmp_path / "tgt.qcow2"
    with guest_running(tmp_path, top, model, seed=9) as (s, g):
        if kind == "commit":
            s.q.cmd("block-commit", **{"job-id": "j", "device": "disk0"})
        else:
            s.q.cmd("drive-mirror", **{"job-id": "j", "device": "disk0", "target": str(tgt),
                                       "sync": "full", "format": "qcow2"})
        s.q.get_event("BLOCK_JOB_READY", timeout=120)
        g.wait_done(g.done + 50)
        s.q.cmd("block-job-complete", device="j")
        done = s.q.get_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" not in done["data"], done
        g.wait_done(g.done + 20)
    dst = base if kind == "commit" else tgt
    check_clean(dst)
    assert_same(image_content(tmp_path, dst, "dst.raw"), bytes(model), f"{kind} destination")


def thread_names(pid):
    """The comm of every thread of process pid (what top -H and perf sched show)."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
    return names


def test_threads_named_by_role(tmp_path):
    """vdiskd's threads carry their role while an active commit copies under a guest: the job's
    thread, its copy workers, the NBD connection's reader and writer, the request pool, QMP."""
    base, top, model = big_chain(tmp_path)
    with guest_running(tmp_path, top, model, seed=8) as (s, g):
        s.q.cmd("block-commit", **{"job-id": "c", "device": "disk0"})
        s.q.get_event("BLOCK_JOB_READY", timeout=120)
        names = thread_names(s.d.proc.pid)  # the job and its engine live until complete
        s.q.cmd("block-job-complete", device="c")
        done = s.q.get_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" not in done["data"], done
    for want in ("qmp", "nbd-accept", "nbd-pool", "job c", "copy/0", "copy/1"):
        assert want in names, (want, sorted(set(names)))
    assert any(n.startswith("nbd-conn fd") for n in names), sorted(names)
    assert any(n.startswith("nbd-writer fd") for n in names), sorted(names)
    check_clean(base, top)
    assert_same(image_content(tmp_path, base, "base.raw"), bytes(model), "base after pivot")


def zero_region_map(path, lo, hi):
    """qemu-img map entries of path overlapping [lo, hi)."""
    m = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", path).stdout)
    return [e for e in m if e["start"] < hi and e["start"] + e["length"] > lo]


@pytest.mark.parametrize("unmap", [None, True, False])
def test_drive_mirror_unmap(tmp_path, unmap):
    """Where the source reads zeroes and an existing target holds data, unmap (default true) frees
    the target's clusters; unmap=false writes zeroes and keeps them allocated. Same content either
    way; the guest writes [0, 16M) meanwhile, the zero region is [24M, 48M)."""
    src = tmp_path / "src.qcow2"
    tgt = tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, BIG)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x44 0 {24 * MiB}", src)
    qemu_img("create", "-q", "-f", "qcow2", tgt, BIG)
    qemu_io("-f", "qcow2", "-c", f"write -P 0x55 {20 * MiB} {28 * MiB}", tgt)
    model = bytearray(BIG)
    model[0:24 * MiB] = b"\x44" * (24 * MiB)
    with guest_running(tmp_path, src, model, seed=8, hi=16 * MiB, warmup=10) as (s, g):
        args = {"job-id": "m", "device": "disk0", "target": str(tgt), "sync": "full",
                "format": "qcow2", "mode": "existing"}
        if unmap is not None:
            args["unmap"] = unmap
        s.q.cmd("drive-mirror", **args)
        s.q.get_event("BLOCK_JOB_READY", timeout=120)
        g.wait_done(g.done + 30)
        s.q.cmd("block-job-complete", device="m")
        done = s.q.get_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" not in done["data"], done
    check_clean(tgt)
    assert_same(image_content(tmp_path, tgt, "tgt.raw"), bytes(model), "target")
    zmap = zero_region_map(tgt, 24 * MiB, BIG)
    assert zmap and all(e["zero"] and not e["data"] for e in zmap), zmap
    if unmap is False:
        # zeroes written in place: the clusters keep their host offsets
        assert all("offset" in e for e in zmap), zmap
    else:
        assert not any("offset" in e for e in zmap), zmap


def test_drive_mirror_unmap_must_be_boolean(tmp_path):
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, 8 * MiB)
    s = served(tmp_path, src)
    try:
        r = s.q.execute("drive-mirror", {"job-id": "m", "device": "disk0",
                                         "target": str(tmp_path / "t.qcow2"), "sync": "full",
                                         "format": "qcow2", "unmap": "yes"})
        assert r["error"]["desc"] == "Invalid parameter type for 'unmap', expected: boolean"
        assert not (tmp_path / "t.qcow2").exists()
        # blockdev-mirror has no unmap in QEMU's schema: refused as unexpected
        r = s.q.execute("blockdev-mirror", {"job-id": "m", "device": "disk0", "target": "disk0",
                                            "sync": "full", "unmap": False})
        assert r["error"]["desc"] == "Parameter 'unmap' is unexpected"
        s.stop()
    finally:
        s.close()
