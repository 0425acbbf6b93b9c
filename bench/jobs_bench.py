#!/usr/bin/python3
"""jobs_bench.py - block jobs over QMP: vdiskd vs qemu-storage-daemon (QSD) on the same chain.

Driven by bench/jobs.sh (see there for the environment knobs).
Chain: bench/bench.py's generator (base <- sn1 <- sn2, 4 GiB * scale virtual, base ~1.5 GiB * scale
of random data in scattered extents, sn1/sn2 ~256 MiB * scale each), cached in the work dir.
Every scenario runs on fresh copies (the files a daemon may write are copied, the read-only ones
are symlinked) with a freshly started daemon serving sn2 over NBD (unix socket, host page cache),
vdiskd and QSD interleaved scenario by scenario. Times are taken on this side of the QMP socket
(a reader thread stamps every event on arrival): command sent -> BLOCK_JOB_READY / _COMPLETED.
Guest load: fio's nbd engine, 4k randwrite iodepth 16 on the export, time based, logging every
completion with a Unix-epoch stamp (write_lat_log, log_unix_epoch); with a job it starts ramp
seconds before the job and is stopped (SIGINT) after BLOCK_JOB_COMPLETED, and IOPS / p99 / max
latency are computed from the completions between the job command and the COMPLETED event (so
they cover the copy and the pivot, at any scale); the no-job baseline runs fio alone.
Per scenario: the daemon's peak RSS (VmHWM) and CPU time (utime+stime) just before it stops.
Writes jobs.md and jobs.json to --out.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import procstat

MiB, GiB = 1 << 20, 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[jobs-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*args, check=True):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n"
                           f"{p.stdout}{p.stderr}")
    return p


def load_generator():
    """bench/bench.py's gen(work, scale, seed): the image benchmark's chain, reused as is."""
    spec = importlib.util.spec_from_file_location("vdisk_bench_gen", os.path.join(HERE, "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.gen


# ---------------------------------------------------------------- QMP

class QMPError(Exception):
    pass


class QMP:
    """QMP client whose reader thread stamps each message with time.monotonic() on arrival."""

    def __init__(self, path, timeout=20):
        end = time.time() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > end:
                    raise
                time.sleep(0.05)
        self.replies = queue.Queue()
        self.events = []          # (t, msg)
        self.ev_cond = threading.Condition()
        self.closed = False
        self.t = threading.Thread(target=self._reader, daemon=True)
        self.t.start()
        greeting = self.replies.get(timeout=timeout)
        if "QMP" not in greeting:
            raise QMPError(f"no QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _reader(self):
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    t = time.monotonic()
                    msg = json.loads(line)
                    if "event" in msg:
                        with self.ev_cond:
                            self.events.append((t, msg))
                            self.ev_cond.notify_all()
                    else:
                        self.replies.put(msg)
        except OSError:
            pass
        self.closed = True
        with self.ev_cond:
            self.ev_cond.notify_all()
        self.replies.put({"error": {"class": "Closed", "desc": "QMP connection closed"}})

    def send(self, command, args=None):
        """Send a command; returns the monotonic time just before it was sent and the reply."""
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        t = time.monotonic()
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        r = self.replies.get(timeout=120)
        return t, r

    def cmd(self, command, **args):
        _, r = self.send(command, {k.replace("_", "-"): v for k, v in args.items()})
        if "error" in r:
            raise QMPError(f"{command}: {r['error'].get('desc')}")
        return r["return"]

    def wait_event(self, names, job, timeout):
        """First event in names for job (device/id) not yet consumed: (t, msg) or None on timeout."""
        end = time.monotonic() + timeout
        with self.ev_cond:
            while True:
                for i, (t, m) in enumerate(self.events):
                    d = m.get("data", {})
                    if m["event"] in names and job in (d.get("device"), d.get("id")):
                        return self.events.pop(i)
                left = end - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                self.ev_cond.wait(left)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------- daemons

class Daemon:
    def __init__(self, kind, image, rd, vdiskd):
        self.kind = kind
        self.sock = os.path.join(rd, f"{kind}-nbd.sock")
        self.qmp_path = os.path.join(rd, f"{kind}-qmp.sock")
        self.pidfile = os.path.join(rd, f"{kind}.pid")
        self.logpath = os.path.join(rd, f"{kind}.log")
        for p in (self.sock, self.qmp_path, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        # Same options for both: page cache (cache.direct=off), the chain opened from the headers.
        if kind.startswith("vdiskd"):
            node = json.dumps({"driver": "qcow2", "node-name": "sn2",
                               "file": {"driver": "file", "node-name": "f2", "filename": image,
                                        "cache": {"direct": False}}})
            argv = [vdiskd, "-v", "--qmp", self.qmp_path, "--pidfile", self.pidfile,
                    "--blockdev", node]
            if kind == "vdiskd-state":  # jobs journal their progress (docs/resumable.md)
                state = os.path.join(rd, "state")
                os.makedirs(state, exist_ok=True)
                argv += ["--state-dir", state]
        else:
            argv = ["qemu-storage-daemon", "--pidfile", self.pidfile,
                    "--blockdev", f"driver=file,node-name=f2,filename={image},cache.direct=off",
                    "--blockdev", "driver=qcow2,node-name=sn2,file=f2",
                    "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=m",
                    "--monitor", "chardev=m"]
        argv += ["--nbd-server", f"addr.type=unix,addr.path={self.sock}",
                 "--export", "type=nbd,id=e,node-name=sn2,name=sn2,writable=on"]
        self.log = open(self.logpath, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        end = time.time() + 30
        while not (os.path.exists(self.pidfile) and os.path.exists(self.sock)
                   and os.path.exists(self.qmp_path)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited {self.proc.returncode}:\n{self.output()}")
            if time.time() > end:
                self.stop()
                raise RuntimeError(f"{kind} did not start:\n{self.output()}")
            time.sleep(0.02)
        self.q = QMP(self.qmp_path)

    def uri(self):
        return f"nbd+unix:///sn2?socket={self.sock}"

    def output(self):
        try:
            return open(self.logpath).read()
        except OSError:
            return ""

    def cpu_seconds(self):
        return procstat.cpu_seconds(self.pid)

    def hwm_kib(self):
        return procstat.hwm_kib(self.pid)

    def node_of(self, path):
        """Node name of the format node whose file is path (chain members get automatic names)."""
        real = os.path.realpath(path)
        for n in self.q.cmd("query-named-block-nodes"):
            if n.get("drv") == "qcow2" and os.path.realpath(n.get("file", "")) == real:
                return n["node-name"]
        raise RuntimeError(f"{self.kind}: no qcow2 node for {path}")

    def stop(self):
        try:
            self.q.close()
        except Exception:
            pass
        procstat.stop(self.proc)
        self.log.close()
        return self.proc.returncode


# ---------------------------------------------------------------- fio

def fio_argv(uri, runtime, rate_iops, logprefix):
    """fio 4k randwrite on the export; every completion goes to LOGPREFIX_clat.1.log stamped with
    the Unix epoch (ms), so the statistics can be cut to exactly the job's window."""
    a = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         "--iodepth=16", "--numjobs=1", "--time_based=1", f"--runtime={runtime}",
         "--randrepeat=0", "--norandommap=1", "--output-format=json",
         f"--output={logprefix}.json", f"--write_lat_log={logprefix}", "--log_avg_msec=0",
         "--log_unix_epoch=1"]
    if rate_iops:
        a.append(f"--rate_iops={rate_iops}")
    return a


SERIES_STEP = 0.1  # s: the timeline's bins (guest IOPS and latency over time, bench/plot.py)


def fio_window(logprefix, t0, t1, sub=None, series=None):
    """IOPS, p99 / max completion latency of the writes that completed in [t0, t1] (epoch s);
    sub: {name: (a, b)} sub-windows whose IOPS are returned as iops_NAME (e.g. the copy before
    READY and the pivot phase after block-job-complete); series: (a, b) epoch seconds: a timeline
    of completions in bins of SERIES_STEP (IOPS, mean and max latency), times relative to t0."""
    lo, hi = t0 * 1000, t1 * 1000
    lats = []
    worst = (-1, None)  # (latency ns, completion stamp ms): when the longest stall ended
    counts = {k: 0 for k in (sub or {})}
    nb = int((series[1] - series[0]) / SERIES_STEP) + 1 if series else 0
    bins_n, bins_sum, bins_max = [0] * nb, [0] * nb, [0] * nb
    with open(f"{logprefix}_clat.1.log") as f:
        for line in f:
            ts, lat = line.split(",", 2)[:2]
            ts = int(ts)
            if lo <= ts <= hi:
                lats.append(int(lat))
                worst = max(worst, (int(lat), ts))
            for k, (a, b) in (sub or {}).items():
                if a * 1000 <= ts <= b * 1000:
                    counts[k] += 1
            if nb:
                i = int((ts / 1000 - series[0]) / SERIES_STEP)
                if 0 <= i < nb:
                    bins_n[i] += 1
                    bins_sum[i] += int(lat)
                    bins_max[i] = max(bins_max[i], int(lat))
    for ext in ("_clat.1.log", "_lat.1.log", "_slat.1.log"):
        try:
            os.unlink(logprefix + ext)
        except OSError:
            pass
    if not lats:
        return {"iops": 0, "p99_ms": None, "max_ms": None, "ios": 0, "window_s": t1 - t0}
    lats.sort()
    res = {}
    if nb:
        res["series"] = {"t0": round(series[0] - t0, 3), "step": SERIES_STEP,
                         "iops": [round(n / SERIES_STEP) for n in bins_n],
                         "mean_ms": [round(bins_sum[i] / bins_n[i] / 1e6, 3) if bins_n[i] else None
                                     for i in range(nb)],
                         "max_ms": [round(m / 1e6, 2) if m else None for m in bins_max]}
    res.update({"iops": len(lats) / (t1 - t0), "p99_ms": lats[int(0.99 * (len(lats) - 1))] / 1e6,
           "max_ms": lats[-1] / 1e6, "mean_ms": sum(lats) / len(lats) / 1e6, "ios": len(lats),
           "window_s": t1 - t0,
           # seconds after the job command at which the longest stall began: tells copy, flush and
           # pivot phases apart
           "max_at_s": (worst[1] - worst[0] / 1e6) / 1000 - t0})
    for k, (a, b) in (sub or {}).items():
        res[f"iops_{k}"] = counts[k] / (b - a) if b > a else None
    return res


def fio_first_ts(logprefix):
    with open(f"{logprefix}_clat.1.log") as f:
        line = f.readline()
    return int(line.split(",", 1)[0]) / 1000 if line else None


class Guest:
    """fio running against the export until stop() (SIGINT: fio ends cleanly, writes its logs)."""

    def __init__(self, uri, rate_iops, ramp, logprefix, image):
        self.logprefix = logprefix
        self.proc = subprocess.Popen(fio_argv(uri, 3600, rate_iops, logprefix),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # fio connects and reaches a steady state before the job starts: wait until its writes
        # show (the guest's image grows by 1 MiB: allocating writes; a loaded machine can take
        # seconds to start fio), then `ramp` seconds more
        size0, end = os.path.getsize(image), time.time() + 20
        while (os.path.getsize(image) < size0 + MiB and time.time() < end
               and self.proc.poll() is None):
            time.sleep(0.02)
        time.sleep(ramp)
        if self.proc.poll() is not None:
            raise RuntimeError(f"fio exited early: {self.proc.stderr.read()}")

    def stop(self, t0, t1, sub=None, series=None):
        """Stop fio; statistics of the completions in [t0, t1] (epoch seconds)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise RuntimeError("fio did not stop on SIGINT")
        return fio_window(self.logprefix, t0, t1, sub, series)


# ---------------------------------------------------------------- scenarios

LOADS = ("idle", "capped", "uncapped")  # capped's rate comes from --rate-iops
TAIL_S = 0.8  # s of guest I/O kept after COMPLETED for the timeline


def scenario_list(loads, which):
    out = []
    for load in loads:
        if load != "idle":
            out.append((f"baseline ({load})", "baseline", load))
    for kind in ("mirror-full", "mirror-wb", "mirror-top", "mirror-base"):
        for load in loads:
            out.append((f"{kind} ({load})", kind, load))
    # stream/commit: idle, and under the capped load (what the guest sees, e.g. at the switch)
    for kind in ("stream", "commit", "commit-active"):
        for load in loads:
            if load != "uncapped":
                out.append((f"{kind} ({load})", kind, load))
    # item 2 of the issue: an external snapshot under the capped guest (its longest wait)
    for load in loads:
        if load != "uncapped":
            out.append((f"snapshot ({load})", "snapshot", load))
    for kind in ("commit-active",):  # item 1 of the issue: active commit under a guest at full speed
        if "uncapped" in loads:
            out.append((f"{kind} (uncapped)", kind, "uncapped"))
    if which:
        subs = [w for w in which.split(",") if w]
        # "=NAME" selects exactly that scenario name (e.g. "=mirror-full (uncapped)")
        out = [s for s in out if any(s[0] == w[1:] if w.startswith("=") else w in s[0]
                                     for w in subs)]
    return out


DESCR = {
    "baseline": "fio alone, no job: the reference for IOPS and p99",
    "mirror-full": "drive-mirror sync=full, mode=absolute-paths (the daemon creates a qcow2 target "
                   "with no backing), complete at READY (pivot)",
    "mirror-wb": "the same with copy-mode=write-blocking (guest writes reach the target "
                 "synchronously)",
    "mirror-top": "drive-mirror sync=top, mode=existing, target pre-created over sn1 (the source's "
                  "backing: virsh blockcopy --shallow --reuse-external), pivot",
    "mirror-base": "drive-mirror sync=top, mode=existing, target pre-created over base, vdiskd "
                   "base-node=base (copies sn1+sn2); QEMU's mirror has no base: vdiskd only",
    "stream": "block-stream device=sn2 base-node=base (pulls sn1 into sn2)",
    "commit": "block-commit device=sn2 top-node=sn1 base-node=base (non-active commit)",
    "commit-active": "block-commit device=sn2 base-node=sn1 (active commit: READY, then "
                     "block-job-complete pivots the export to sn1)",
    "snapshot": "blockdev-snapshot-sync node-name=sn2 (a new qcow2 overlay the daemon creates; "
                "the export moves onto it): no job, so 'COMPLETED' is the command's reply and the "
                "guest's figures cover [command, reply + 0.3 s]",
}


def prepare_run_dir(src, rd, kind):
    """Fresh copies of the files the job may write; symlinks for those it only reads."""
    if os.path.exists(rd):
        shutil.rmtree(rd)
    os.makedirs(rd)
    writable = {"commit": ("base", "sn2"), "commit-active": ("sn1", "sn2")}.get(kind, ("sn2",))
    for n in ("base", "sn1", "sn2"):
        s, d = os.path.join(src, f"{n}.qcow2"), os.path.join(rd, f"{n}.qcow2")
        if n in writable:
            shutil.copyfile(s, d)
        else:
            os.symlink(s, d)
    return os.path.join(rd, "sn2.qcow2")


def run_one(kind, load, daemon_kind, src, work, a, vsize):
    """One scenario on one daemon: returns a dict of measurements."""
    rd = os.path.join(work, "run")
    top = prepare_run_dir(src, rd, kind)
    # equal footing: the chain is in the page cache and the copies are not dirty (fsync of our
    # files only: a global sync would wait for the other users of a shared machine)
    for n in ("base", "sn1", "sn2"):
        fd = os.open(os.path.join(rd, f"{n}.qcow2"), os.O_RDONLY)
        try:
            os.fsync(fd)
            while os.read(fd, 8 * MiB):
                pass
        finally:
            os.close(fd)
    tgt = os.path.join(rd, "target.qcow2")
    if kind == "mirror-top":
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.join(rd, "sn1.qcow2"),
           "-F", "qcow2", tgt, vsize)
    elif kind == "mirror-base":
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.join(rd, "base.qcow2"),
           "-F", "qcow2", tgt, vsize)
    d = Daemon(daemon_kind, top, rd, a.vdiskd)
    res = {}
    guest = perf = None
    timeout = a.timeout
    try:
        rate = a.rate_iops if load == "capped" else 0
        if kind == "baseline":
            lp = os.path.join(rd, "fio")
            c0 = d.cpu_seconds()
            p = subprocess.run(fio_argv(d.uri(), a.fio_secs + a.ramp, rate, lp),
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"fio failed: {p.stderr}")
            first = fio_first_ts(lp)
            res["fio"] = fio_window(lp, first + a.ramp, first + a.ramp + a.fio_secs)
            res["cpu_s"] = d.cpu_seconds() - c0
            return res
        q = d.q
        nodes = {}
        if kind in ("stream", "commit", "commit-active"):
            nodes = {n: d.node_of(os.path.join(rd, f"{n}.qcow2")) for n in ("base", "sn1")}
        if (a.perf and daemon_kind.startswith("vdiskd") and kind.startswith(a.perf_kinds)
                and load in a.perf_loads):
            stem = os.path.join(a.out, f"perf-jobs-{a.tag + '-' if a.tag else ''}{kind}-{load}")
            if a.perf_trace:
                # every syscall of every thread (threads made later too: the job's, the NBD
                # connection's) with its time and duration: where the guest's requests wait
                pf = stem + ".strace"
                argv = ["strace", "-f", "-tt", "-T", "-o", pf, "-p", str(d.pid)]
            else:
                pf = stem + ".data"
                # dwarf unwinding: the default build has no frame pointers
                argv = ["perf", "record", "-q", "--call-graph", a.perf_callgraph,
                        "-F", str(a.perf_freq), "-o", pf, "-p", str(d.pid)]
            perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            res["perf"] = pf
        if load != "idle":
            guest = Guest(d.uri(), rate, a.ramp, os.path.join(rd, "fio"), top)
        c0 = d.cpu_seconds()
        if kind == "snapshot":
            # No job: the command's round trip, and what the guest saw around it (its longest
            # wait is the stall the switch to the new overlay cost it).
            w0 = time.time()
            t0, r = q.send("blockdev-snapshot-sync",
                           {"node-name": "sn2", "snapshot-file": os.path.join(rd, "snap.qcow2"),
                            "snapshot-node-name": "snap", "format": "qcow2"})
            if "error" in r:
                raise RuntimeError(f"blockdev-snapshot-sync: {r['error'].get('desc')}")
            res["completed_s"] = time.monotonic() - t0
            res["cpu_s"] = d.cpu_seconds() - c0
            if guest:
                time.sleep(TAIL_S)
                end = w0 + res["completed_s"] + 0.3
                res["fio"] = guest.stop(w0, end, {"copy": (w0, end)},
                                        (w0 - a.ramp + 0.2, end + TAIL_S))
                guest = None
            return res
        args = {"job-id": "j", "device": "sn2"}
        needs_complete = True
        if kind in ("mirror-full", "mirror-wb"):
            args.update(target=tgt, format="qcow2", sync="full", mode="absolute-paths")
            if kind == "mirror-wb":
                args["copy-mode"] = "write-blocking"
            cmd = "drive-mirror"
        elif kind == "mirror-top":
            args.update(target=tgt, format="qcow2", sync="top", mode="existing")
            cmd = "drive-mirror"
        elif kind == "mirror-base":
            args.update(target=tgt, format="qcow2", sync="top", mode="existing",
                        **{"base-node": os.path.join(rd, "base.qcow2")})
            cmd = "drive-mirror"
        elif kind == "stream":
            args.update({"base-node": nodes["base"]})
            cmd, needs_complete = "block-stream", False
        elif kind == "commit":
            args.update({"top-node": nodes["sn1"], "base-node": nodes["base"]})
            cmd, needs_complete = "block-commit", False
        elif kind == "commit-active":
            args.update({"base-node": nodes["sn1"]})
            cmd = "block-commit"
        w0 = time.time()
        t0, r = q.send(cmd, args)
        if "error" in r:
            raise RuntimeError(f"{cmd}: {r['error'].get('desc')}")
        if needs_complete:
            ev = q.wait_event(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
                              "j", timeout)
            if ev is None or ev[1]["event"] != "BLOCK_JOB_READY":
                res["timeout"] = ev is None
                res["error"] = (f"not READY within {timeout:.0f} s" if ev is None
                                else f"{ev[1]['event']}: {ev[1]['data'].get('error')}")
                if ev is None:
                    res["ready_s"] = None
                    q.send("block-job-cancel", {"device": "j", "force": True})
                    q.wait_event(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), "j", 60)
                return res
            res["ready_s"] = ev[0] - t0
            res["copied_bytes"] = ev[1]["data"].get("len")
            if a.complete_after:
                time.sleep(a.complete_after)  # the job stays READY (mirroring) meanwhile
            tc, r = q.send("block-job-complete", {"device": "j"})
            if "error" in r:
                raise RuntimeError(f"block-job-complete: {r['error'].get('desc')}")
        ev = q.wait_event(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), "j", timeout)
        if ev is None:
            res["error"] = f"not COMPLETED within {timeout:.0f} s"
            res["timeout"] = True
            q.send("block-job-cancel", {"device": "j", "force": True})
            q.wait_event(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), "j", 60)
            return res
        if ev[1]["event"] != "BLOCK_JOB_COMPLETED" or ev[1]["data"].get("error"):
            res["error"] = f"{ev[1]['event']}: {ev[1]['data'].get('error')}"
            return res
        res["completed_s"] = ev[0] - t0
        res.setdefault("copied_bytes", ev[1]["data"].get("len"))
        if needs_complete:
            res["pivot_s"] = ev[0] - tc
        res["cpu_s"] = d.cpu_seconds() - c0
        if guest:
            sub = {}
            if res.get("ready_s"):
                # the copy (job command -> READY) and the pivot phase (complete -> COMPLETED)
                sub = {"copy": (w0, w0 + res["ready_s"]),
                       "pivot": (w0 + (tc - t0), w0 + res["completed_s"])}
            else:
                sub = {"copy": (w0, w0 + res["completed_s"])}
            # the timeline shows the guest from before the job to a while after it
            time.sleep(TAIL_S)
            res["fio"] = guest.stop(w0, w0 + res["completed_s"], sub,
                                    (w0 - a.ramp + 0.2, w0 + res["completed_s"] + TAIL_S))
            guest = None
        if daemon_kind.startswith("vdiskd") and kind.startswith("mirror"):
            m = None
            for _ in range(20):  # the log line is written by the job thread around the event
                m = re.search(r"mirror 'j': pivoted to the target; guest I/O paused (\d+\.\d+) ms "
                              r"\((\d+) bytes copied", d.output())
                if m:
                    break
                time.sleep(0.05)
            if m:
                res["logged_pause_ms"] = float(m.group(1))
                res["paused_copy_bytes"] = int(m.group(2))
        if daemon_kind.startswith("vdiskd") and kind == "commit-active":
            m = None
            for _ in range(20):  # written by prepare around the event
                m = re.search(r"commit 'j': pivoted to the base; guest I/O paused (\d+) us "
                              r"\((\d+) bytes copied while paused, (\d+) syncs while paused",
                              d.output())
                if m:
                    break
                time.sleep(0.05)
            if m:
                res["logged_pause_ms"] = int(m.group(1)) / 1000
                res["paused_copy_bytes"] = int(m.group(2))
                # base is synced under drain only after a guest flush (fio here never flushes)
                res["paused_syncs"] = int(m.group(3))
        if a.verify and load == "idle" and kind.startswith("mirror"):
            # nothing wrote to the guest: the target must read like the source chain
            res["hwm_kib"] = d.hwm_kib()
            d.stop()
            p = sh("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", top, tgt, check=False)
            res["verified"] = p.returncode == 0
            if p.returncode != 0:
                log(f"VERIFY FAILED: {daemon_kind} {kind}: {p.stdout}{p.stderr}")
        return res
    finally:
        if guest:  # the job failed or timed out: stop the load, keep no statistics
            try:
                guest.stop(0, 0)
            except Exception as e:
                log(f"fio: {e}")
        if d.proc.poll() is None:
            try:
                res["hwm_kib"] = d.hwm_kib()
            except OSError:
                pass
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        rc = d.stop()
        if rc not in (0, -15, 143) and "verified" not in res:
            log(f"warning: {daemon_kind} exited {rc}; log {d.logpath}")
        shutil.copyfile(d.logpath, os.path.join(work, f"{daemon_kind}-last.log"))


# ---------------------------------------------------------------- report

def machine(work):
    m = {"nproc": os.cpu_count(), "kernel": platform.release()}
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            m["cpu"] = line.split(":", 1)[1].strip()
            break
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            m["mem"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    m["loadavg"] = " ".join(open("/proc/loadavg").read().split()[:3])
    p = sh("df", "-PT", work, check=False).stdout.splitlines()
    m["fs"] = " ".join(p[1].split()[:2]) if len(p) > 1 else "?"
    return m


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def f2(v, digits=2):
    return "-" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


LABELS = {"vdiskd": "vdiskd", "qsd": "QSD", "vdiskd-state": "vdiskd --state-dir"}


def report(meta, results, scen):
    # the two daemons compared: vdiskd and QSD, or vdiskd without and with --state-dir
    A, B = ((meta.get("daemons") or ["vdiskd"]) + ["qsd"])[:2]
    LA, LB = LABELS.get(A, A), LABELS.get(B, B)
    L = [f"# Block jobs: {LA} vs {'qemu-storage-daemon' if B == 'qsd' else LB}\n"]
    m = meta["machine"]
    L.append(f"Date: {meta['date']}  ")
    L.append(f"Machine: {m['nproc']} CPUs ({m.get('cpu', '?')}), {m['mem']} RAM, kernel "
             f"{m['kernel']}, work dir on {m['fs']}; load average at start {m['loadavg']}, "
             f"at end {meta['loadavg_end']}  ")
    L.append(f"Versions: {meta['versions']}  ")
    ly = meta["chain"]["layers"]
    L.append(f"Chain (bench/bench.py generator, scale {meta['scale']:g}, seed {meta['seed']}): "
             f"{meta['chain']['virtual_size'] / MiB:.0f} MiB virtual; "
             + ", ".join(f"{n} {ly[n]['data_bytes'] / MiB:.0f} MiB in {ly[n]['extents']} extents"
                         for n in ("base", "sn1", "sn2")) + "  ")
    L.append(f"Daemons serve sn2 over NBD (unix socket), cache.direct=off (host page cache) for "
             f"both; each scenario on fresh copies with a freshly started daemon, {LA} and {LB} "
             f"interleaved; {meta['reps']} repetition(s), median shown. Job defaults (no speed, "
             f"granularity or buf-size given).  ")
    L.append(f"Guest load: fio {meta['fio']} ioengine=nbd, randwrite 4k iodepth 16, 1 connection, "
             f"over the whole disk; capped = --rate_iops={meta['rate_iops']}; fio starts "
             f"{meta['ramp']} s before the job; IOPS, p99 and max latency are computed from fio's "
             f"per-I/O completion log over exactly [job command, BLOCK_JOB_COMPLETED] (copy and "
             f"pivot included); baseline = fio alone, {meta['fio_secs']} s after a {meta['ramp']} s "
             f"ramp.  ")
    L.append(f"Times are measured by the QMP client: command sent -> event received. "
             f"Jobs still running after {meta['timeout']:.0f} s are cancelled (shown as '>T').\n")
    if meta.get("note"):
        L.append(f"**Note:** {meta['note']}\n")
    L.append("Scenarios:\n")
    for k, v in DESCR.items():
        L.append(f"- **{k}**: {v}")
    L.append("")

    def vals_of(name, dk, key, sub=None):
        vals = []
        for r in results.get(name, {}).get(dk, []):
            v = r.get(sub, {}).get(key) if sub else r.get(key)
            if key in ("ready_s", "completed_s") and r.get("timeout"):
                v = float("inf")
            vals.append(v)
        return [v for v in vals if v is not None]

    spreads = {}  # (label, daemon) -> (min, max) of the repetitions, shown next to the median

    def get(name, dk, key, sub=None):
        vals = vals_of(name, dk, key, sub)
        if len(vals) > 1:
            spreads[(name, dk, key, sub)] = (min(vals), max(vals))
        return med(vals)

    def rel(name, dk, key, base_key=None):
        """The guest's figure during the job over its no-job baseline (same daemon, same load)."""
        load = name[name.find("(") + 1:name.find(")")]
        b = get(f"baseline ({load})", dk, base_key or key, "fio")
        v = get(name, dk, key, "fio")
        return None if v is None or not b else v / b

    def table(title, rows, unit_note=""):
        if not rows:
            return
        L.append(f"## {title}\n")
        if unit_note:
            L.append(unit_note + "\n")
        L.append(f"| scenario | {LA} | {LB} | {LA}/{LB} |")
        L.append("|---|---|---|---|")
        for label, v, qv, digits in rows:
            def cell(x):
                if x == float("inf"):
                    return f">{meta['timeout']:.0f}"
                c = f2(x, digits)
                for k, (lo, hi) in spreads.items():  # the spread of that very figure, if any
                    if x is not None and k[0] == label and med(vals_of(*k)) == x and lo != hi:
                        if lo != float("inf") and hi != float("inf"):
                            c += f" [{f2(lo, digits)}–{f2(hi, digits)}]"
                        break
                return c
            r = "-" if v == float("inf") or qv == float("inf") else ratio(v, qv)
            L.append(f"| {label} | {cell(v)} | {cell(qv)} | {r} |")
        L.append("")

    names = [s[0] for s in scen]
    jobs = [n for n in names if not n.startswith("baseline")]
    mirrors = [n for n in names if n.startswith("mirror") or n.startswith("commit-active")]
    L.append(f"{LA}/{LB} below 1 is better for {LA} in every table except guest IOPS (above 1 "
             "is better there).\n")
    table("Time to READY (s)", [(n, get(n, A, "ready_s"), get(n, B, "ready_s"), 3)
                                for n in mirrors])
    table("Time to COMPLETED (s, from the job command)",
          [(n, get(n, A, "completed_s"), get(n, B, "completed_s"), 3) for n in jobs])
    table("Pivot pause (ms): block-job-complete sent -> BLOCK_JOB_COMPLETED received",
          [(n, _ms(get(n, A, "pivot_s")), _ms(get(n, B, "pivot_s")), 1)
           for n in mirrors],
          "vdiskd's own measure of the guest-visible pause (drain -> exports resumed), from its "
          "log: " + ", ".join(f"{n}: {f2(get(n, A, 'logged_pause_ms'), 1)} ms"
                              + (f" ({f2(get(n, A, 'paused_syncs'), 0)} syncs)"
                                 if n.startswith("commit-active") else "")
                              for n in mirrors) + "; the bench's fio guest never flushes, so "
          "an active commit's pivot syncs nothing while it waits (docs/guest-priority.md)")
    table("Job length (MiB, the job's len at READY / COMPLETED: what the job copied, including "
          "re-copies of guest-dirtied data; stream/commit count the whole disk in both daemons)",
          [(n, _mib(get(n, A, "copied_bytes")), _mib(get(n, B, "copied_bytes")), 1)
           for n in jobs])
    loaded = [n for n in names if "(idle)" not in n]
    table("Guest IOPS during the job (fio 4k randwrite over NBD)",
          [(n, get(n, A, "iops", "fio"), get(n, B, "iops", "fio"), 0) for n in loaded])
    shares = [n for n in loaded if not n.startswith("baseline")]
    table("Guest IOPS during the job as a share of the same daemon's no-job IOPS (goal >= 0.5, "
          "aim 0.8)",
          [(n, rel(n, A, "iops"), rel(n, B, "iops"), 2) for n in shares])
    table("Guest mean latency during the job over the no-job mean (goal <= 2)",
          [(n, rel(n, A, "mean_ms"), rel(n, B, "mean_ms"), 2) for n in shares])
    table("Guest p99 latency during the job over the no-job p99 (goal <= 3)",
          [(n, rel(n, A, "p99_ms"), rel(n, B, "p99_ms"), 2) for n in shares])
    table("Guest IOPS during the copy only (job command -> READY; stream/commit: the whole job)",
          [(n, get(n, A, "iops_copy", "fio"), get(n, B, "iops_copy", "fio"), 0)
           for n in loaded])
    table("Guest IOPS during the pivot phase (block-job-complete -> COMPLETED)",
          [(n, get(n, A, "iops_pivot", "fio"), get(n, B, "iops_pivot", "fio"), 0)
           for n in loaded if n in mirrors])
    table("Guest p99 write latency during the job (ms, fio clat)",
          [(n, get(n, A, "p99_ms", "fio"), get(n, B, "p99_ms", "fio"), 2)
           for n in loaded])
    table("Guest max write latency during the job (ms, fio clat: the longest stall, usually "
          "the pivot)",
          [(n, get(n, A, "max_ms", "fio"), get(n, B, "max_ms", "fio"), 1)
           for n in loaded])
    table("Daemon CPU time during the job (s, utime+stime, all threads)",
          [(n, get(n, A, "cpu_s"), get(n, B, "cpu_s"), 2) for n in names])
    table("Peak RSS of the daemon (MiB, VmHWM at the end of the scenario)",
          [(n, _mib(get(n, A, "hwm_kib"), 1024), _mib(get(n, B, "hwm_kib"), 1024), 1)
           for n in names])
    errs = [(n, dk, r["error"]) for n in names for dk in (A, B)
            for r in results.get(n, {}).get(dk, []) if r.get("error")]
    ver = [(n, dk, r["verified"]) for n in names for dk in (A, B)
           for r in results.get(n, {}).get(dk, []) if "verified" in r]
    if ver:
        agg = {}
        for n, dk, ok in ver:
            k = (dk, n)
            agg[k] = (agg.get(k, (0, 0))[0] + bool(ok), agg.get(k, (0, 0))[1] + 1)
        L.append("Content check (idle mirrors: `qemu-img compare` source chain vs target after "
                 "the pivot; identical/runs): " + ", ".join(f"{dk} {n}: {g}/{t}"
                                                            for (dk, n), (g, t) in agg.items())
                 + "\n")
    if errs:
        L.append("Errors / timeouts:\n")
        for n, dk, e in errs:
            L.append(f"- {dk} {n}: {e}")
        L.append("")
    return "\n".join(L)


def _ms(v):
    return None if v is None else (v if v == float("inf") else v * 1000)


def _mib(v, unit=1):
    """v * unit bytes in MiB."""
    return None if v is None else v * unit / MiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vdiskd", default="")
    ap.add_argument("--work", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=20261125)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--loads", default="idle,capped,uncapped")
    ap.add_argument("--only", default="")
    ap.add_argument("--rate-iops", type=int, default=2000)
    ap.add_argument("--fio-secs", type=int, default=10)
    ap.add_argument("--ramp", type=int, default=1)
    ap.add_argument("--complete-after", type=float, default=0,
                    help="seconds between READY and block-job-complete (0: at once)")
    ap.add_argument("--timeout", type=float, default=0)
    ap.add_argument("--daemons", default="vdiskd,qsd")
    ap.add_argument("--perf", action="store_true")
    ap.add_argument("--perf-loads", default="idle")
    ap.add_argument("--perf-kinds", default="mirror",
                    help="comma-separated prefixes of the scenario kinds perf watches")
    ap.add_argument("--perf-trace", action="store_true",
                    help="strace -f -tt -T (every syscall, per thread) instead of perf record")
    ap.add_argument("--perf-callgraph", default="dwarf,8192")
    ap.add_argument("--perf-freq", type=int, default=499)
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument("--note", default="")
    ap.add_argument("--tag", default="", help="write jobs-TAG.md/.json instead of jobs.md/.json")
    ap.add_argument("--report-only", default="", help="re-render the markdown from a jobs.json")
    a = ap.parse_args()
    if a.report_only:
        j = json.load(open(a.report_only))
        loads = [x for x in j["meta"].get("loads", "idle,capped,uncapped").split(",") if x]
        scen = [s for s in scenario_list(loads, j["meta"].get("only", "")) if s[0] in j["results"]]
        md = report(j["meta"], j["results"], scen)
        with open(a.report_only[:-5] + ".md", "w") as f:
            f.write(md)
        print(md)
        return
    if not (a.vdiskd and a.work and a.out):
        sys.exit("jobs-bench: --vdiskd, --work and --out are required")
    a.perf_loads = a.perf_loads.split(",")
    a.perf_kinds = tuple(x for x in a.perf_kinds.split(",") if x)
    if not a.timeout:
        a.timeout = 60 + 240 * a.scale
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    a.out = os.path.abspath(a.out)
    loads = [x for x in a.loads.split(",") if x]
    for x in loads:
        if x not in LOADS:
            sys.exit(f"jobs-bench: unknown load {x} (idle, capped, uncapped)")
    daemons = [x for x in a.daemons.split(",") if x]

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(work), "scale": a.scale, "seed": a.seed, "reps": a.reps,
            "rate_iops": a.rate_iops, "ramp": a.ramp, "fio_secs": a.fio_secs,
            "timeout": a.timeout, "note": a.note, "fio": sh("fio", "--version").stdout.strip(),
            "loads": a.loads, "only": a.only, "daemons": daemons}
    if a.perf:
        meta["note"] = (a.note + " " if a.note else "") + \
            "perf was recording vdiskd during mirror runs: those numbers include its overhead."
    rev = sh("git", "-C", os.path.dirname(HERE), "rev-parse", "--short", "HEAD", check=False)
    meta["versions"] = (f"vdiskd {a.vdiskd} (tree {rev.stdout.strip()}, uncommitted changes "
                        f"possible); qemu-storage-daemon "
                        + sh("qemu-storage-daemon", "--version").stdout.split()[2])
    gen = load_generator()
    t = time.time()
    src, chain = gen(work, a.scale, a.seed)
    meta["chain"] = chain
    log(f"chain ready in {src} ({time.time() - t:.1f} s)")
    vsize = chain["virtual_size"]

    scen = scenario_list(loads, a.only)
    results = {}
    for rep in range(a.reps):
        for name, kind, load in scen:
            for dk in daemons:
                if kind == "mirror-base" and dk == "qsd":
                    continue
                try:
                    r = run_one(kind, load, dk, src, work, a, vsize)
                except Exception as e:  # keep going: one failure should not lose the whole run
                    r = {"error": f"{type(e).__name__}: {e}"}
                results.setdefault(name, {}).setdefault(dk, []).append(r)
                brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                         if k not in ("fio", "perf")}
                if "fio" in r:
                    brief["iops"] = round(r["fio"]["iops"])
                    for k in ("iops_copy", "iops_pivot"):
                        if r["fio"].get(k) is not None:
                            brief[k] = round(r["fio"][k])
                    brief["p99_ms"] = r["fio"]["p99_ms"]
                    brief["max_ms"] = r["fio"]["max_ms"]
                log(f"rep {rep + 1} {dk:6} {name:26} {brief}")
    shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)
    meta["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    md = report(meta, results, scen)
    stem = f"jobs-{a.tag}" if a.tag else "jobs"
    with open(os.path.join(a.out, stem + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    print(md)


if __name__ == "__main__":
    main()
