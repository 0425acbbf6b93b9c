#!/usr/bin/python3
"""nbd_bench.py - NBD throughput of vdiskd vs qemu-nbd vs qemu-storage-daemon, with a local ceiling.

Driven by bench/nbd.sh (see there for the environment knobs). One qcow2 image, fully written by
qemu-io before any server sees it (so every read hits allocated data and every write is an
overwrite, never an allocation), is served in turn by each server over a unix socket with the same
caching (default: host page cache, writeback, the file read once beforehand so all start warm;
--cache none: O_DIRECT for every server and for fio locally), and fio's nbd engine (libnbd) runs the same
workloads against each: 2 jobs = 2 NBD connections, time based. The "local" column runs the same
workloads on a raw copy of the image (qemu-img convert) with a native fio engine: the ceiling.
Before each workload the image is fsync'ed so one run's dirty pages do not bill the next one.
Per server we also record its CPU time per workload (utime+stime from /proc/PID/stat) and its peak
RSS (VmHWM from /proc/PID/status) just before stopping it. Writes nbd.md and nbd.json to --out
(nbd-direct.md / .json with --cache none).
"""
import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import procstat

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# name -> (fio rw, block size, iodepth)
WORKLOADS = {
    "randread-4k": ("randread", "4k", 16),
    "randwrite-4k": ("randwrite", "4k", 16),
    "seqread-1M": ("read", "1M", 4),
    "seqwrite-1M": ("write", "1M", 4),
}
SERVERS = ["vdiskd", "vdiskd-alt", "qemu-nbd", "qsd", "local"]
LABEL = {"vdiskd": "vdiskd", "vdiskd-alt": "vdiskd (alt build)", "qemu-nbd": "qemu-nbd", "qsd": "QSD",
         "local": "local file"}
EXPORT = "exp"


def log(msg):
    print(f"[nbd-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*args, check=True):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and p.returncode != 0:
        sys.exit(f"nbd-bench: {' '.join(map(str, args))} failed ({p.returncode}):\n"
                 f"{p.stdout}{p.stderr}")
    return p


def parse_size(s):
    s = s.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": GiB * 1024}.get(s[-1:], 1)
    return int(float(s.rstrip("KMGT")) * mult)


def human(n):
    for unit, v in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= v and n % (v // 1024 or 1) == 0:
            return f"{n / v:g} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------- image

def prepare(work, size):
    """work/img.qcow2 (fully written, 64 KiB clusters) and work/img.raw (its raw copy); cached."""
    os.makedirs(work, exist_ok=True)
    qcow, raw, stamp = (os.path.join(work, n) for n in ("img.qcow2", "img.raw", "stamp"))
    want = f"size={size} v1\n"
    if os.path.exists(stamp) and open(stamp).read() == want and os.path.exists(qcow) \
            and os.path.exists(raw):
        log(f"reusing cached images in {work}")
        return qcow, raw
    for p in (stamp, qcow, raw):
        if os.path.exists(p):
            os.unlink(p)
    log(f"creating a {human(size)} qcow2 and writing all of it with qemu-io")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", qcow, size)
    chunk = 64 * MiB
    cmds = []
    for off in range(0, size, chunk):
        ln = min(chunk, size - off)
        # a different byte per chunk: the data is not zero, so nothing is skipped or deduplicated
        cmds += ["-c", f"write -q -P {0x11 + (off // chunk) % 0xee} {off} {ln}"]
    sh("qemu-io", "-f", "qcow2", *cmds, qcow)
    info = json.loads(sh("qemu-img", "map", "--output=json", "-f", "qcow2", qcow).stdout)
    holes = [e for e in info if not e.get("data")]
    if holes:
        sys.exit(f"nbd-bench: {qcow} still has unallocated ranges: {holes[:3]}")
    log("converting to raw for the local ceiling")
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-S", "0", qcow, raw)
    with open(stamp, "w") as f:
        f.write(want)
    return qcow, raw


def warm(path):
    """Read the file once so every server starts with it in the page cache (equal footing)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- servers

class Server:
    def __init__(self, kind, qcow, work, vdiskd, direct=False, vdiskd_alt=None):
        if kind == "vdiskd-alt":
            vdiskd = vdiskd_alt
        self.kind = kind
        self.sock = os.path.join(work, f"{kind}.sock")
        self.pidfile = os.path.join(work, f"{kind}.pid")
        self.logpath = os.path.join(work, f"{kind}.log")
        for p in (self.sock, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        if kind in ("vdiskd", "vdiskd-alt"):
            f = {"driver": "file", "filename": qcow}
            if direct:
                f["cache"] = {"direct": True}
            node = json.dumps({"driver": "qcow2", "node-name": "n0", "file": f})
            argv = [vdiskd, "--pidfile", self.pidfile, "--blockdev", node,
                    "--nbd-server", f"addr.type=unix,addr.path={self.sock},max-connections=2",
                    "--export", f"type=nbd,id=e0,node-name=n0,name={EXPORT},writable=on"]
        elif kind == "qemu-nbd":
            argv = ["qemu-nbd", "-f", "qcow2", "--cache=" + ("none" if direct else "writeback"),
                    "-e", "2", "--persistent",
                    "-k", self.sock, "-x", EXPORT, "--pid-file", self.pidfile, qcow]
        elif kind == "qsd":
            argv = ["qemu-storage-daemon", "--pidfile", self.pidfile,
                    "--blockdev", f"driver=file,node-name=f0,filename={qcow},"
                                  f"cache.direct={'on' if direct else 'off'}",
                    "--blockdev", "driver=qcow2,node-name=n0,file=f0",
                    "--nbd-server", f"addr.type=unix,addr.path={self.sock},max-connections=2",
                    "--export", f"type=nbd,id=e0,node-name=n0,name={EXPORT},writable=on"]
        else:
            raise ValueError(kind)
        self.argv = argv
        self.log = open(self.logpath, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self._wait_ready()

    def _wait_ready(self, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                sys.exit(f"nbd-bench: {self.kind} exited {self.proc.returncode}:\n"
                         + open(self.logpath).read())
            if os.path.exists(self.pidfile) and os.path.exists(self.sock):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(self.sock)
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            time.sleep(0.05)
        self.stop()
        sys.exit(f"nbd-bench: {self.kind} did not come up in {timeout}s")

    def uri(self):
        return f"nbd+unix:///{EXPORT}?socket={self.sock}"

    def cpu_seconds(self):
        """utime+stime of the whole process (all threads) so far."""
        return procstat.cpu_seconds(self.pid)

    def hwm_kib(self):
        return procstat.hwm_kib(self.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


# ---------------------------------------------------------------- fio

def fio(target, wl, size, runtime, ramp, local_engine, direct=False):
    rw, bs, depth = WORKLOADS[wl]
    half = size // 2
    args = ["fio", "--name=" + wl, "--output-format=json", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", "--numjobs=2", "--group_reporting=1", "--time_based=1",
            f"--runtime={runtime}", f"--ramp_time={ramp}", "--randrepeat=0", "--norandommap=1",
            # job i works on its own half of the disk: the sequential jobs do not read the same bytes
            f"--size={half}", f"--offset_increment={half}"]
    if target.startswith("nbd+unix:"):
        args += ["--ioengine=nbd", f"--uri={target}"]
    else:
        # invalidate=0: fio would otherwise drop the file from the page cache first, and the servers
        # all read through a warm page cache
        args += [f"--ioengine={local_engine}", f"--filename={target}", f"--direct={int(direct)}",
                 "--invalidate=0"]
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"nbd-bench: fio failed ({p.returncode}): {' '.join(args)}\n{p.stdout}{p.stderr}")
    out = p.stdout
    out = out[out.index("{"):]  # fio may print notes before the JSON
    job = json.loads(out)["jobs"][0]
    d = job["write" if "write" in rw else "read"]
    return {"iops": d["iops"], "MBps": d["bw_bytes"] / 1e6,
            "lat_us": d["clat_ns"]["mean"] / 1000 if d.get("clat_ns") else None,
            "errors": job.get("error", 0)}


# ---------------------------------------------------------------- report

def machine():
    m = {"nproc": os.cpu_count(), "kernel": platform.release()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                m["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            m["mem"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    m["loadavg"] = open("/proc/loadavg").read().split()[:3]
    return m


def vdisk_rev():
    """The source tree's commit (+ whether it has uncommitted changes), read-only git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = sh("git", "-C", root, "rev-parse", "--short", "HEAD", check=False)
    if p.returncode != 0:
        return ""
    dirty = sh("git", "-C", root, "status", "--porcelain", "--untracked-files=no", check=False)
    return f" (tree {p.stdout.strip()}{', with uncommitted changes' if dirty.stdout.strip() else ''})"


def fs_of(path):
    p = sh("df", "-PT", path, check=False).stdout.splitlines()
    if len(p) < 2:
        return "?"
    dev, fstype = p[1].split()[:2]
    rot = "?"
    base = os.path.basename(dev)
    for cand in (base, base.rstrip("0123456789"), base.rstrip("0123456789").rstrip("p")):
        q = f"/sys/block/{cand}/queue/rotational"
        if os.path.exists(q):
            rot = "rotational=" + open(q).read().strip() + " per sysfs"
            break
    return f"{dev} ({fstype}, {rot})"


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def report(res, rss, cpu, meta, servers, workloads):
    L = []
    L.append("# NBD throughput: vdiskd vs qemu-nbd vs qemu-storage-daemon\n")
    L.append(f"Date: {meta['date']}  ")
    m = meta["machine"]
    L.append(f"Machine: {m['nproc']} CPUs, {m.get('cpu', '?')}, {m['mem']} RAM, kernel {m['kernel']}, "
             f"load average at start {' '.join(m['loadavg'])}  ")
    L.append(f"Bench dir: {meta['work']} on {meta['fs']}  ")
    L.append(f"Image: qcow2, {human(meta['size'])} virtual, 64 KiB clusters, fully allocated; "
             + ("O_DIRECT (cache=none) for every server and the local file; "
                if meta["cache"] == "none" else "host page cache (writeback) for every server; ")
             + "unix sockets  ")
    L.append(f"fio {meta['fio']}: 2 jobs = 2 NBD connections (ioengine=nbd / libnbd), each on its own "
             f"half of the disk, time_based {meta['runtime']} s (+{meta['ramp']} s ramp) per workload, "
             f"median of {meta['reps']} interleaved repetition(s), each server freshly started per run; "
             f"local = ioengine={meta['local_engine']} "
             f"{'direct' if meta['cache'] == 'none' else 'buffered'} on the raw copy  ")
    L.append(f"Versions: {meta['versions']}\n")
    if meta.get("note"):
        L.append(f"**Note:** {meta['note']}\n")
    cols = [s for s in servers]
    hdr = "| workload | metric | " + " | ".join(LABEL[s] for s in cols)
    hdr += " | vdiskd÷qemu-nbd | vdiskd÷local |"
    L.append(hdr)
    L.append("|" + "---|" * (len(cols) + 4))
    for wl in workloads:
        for metric, digits in (("iops", 0), ("MBps", 1)):
            row = [wl if metric == "iops" else "", "IOPS" if metric == "iops" else "MB/s"]
            vals = {s: res.get(s, {}).get(wl, {}).get(metric) for s in cols}
            row += [fmt(vals[s], digits) for s in cols]
            row += [ratio(vals.get("vdiskd"), vals.get("qemu-nbd")),
                    ratio(vals.get("vdiskd"), vals.get("local"))]
            L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("Server CPU time per I/O (µs, all threads, utime+stime during the workload; lower is "
             "better, and less sensitive to a busy machine than IOPS):\n")
    srv = [s for s in cols if s != "local"]
    L.append("| workload | " + " | ".join(LABEL[s] for s in srv) + " |")
    L.append("|" + "---|" * (len(srv) + 1))
    for wl in workloads:
        row = [wl]
        for s in srv:
            row.append(fmt(cpu.get(s, {}).get(wl), 1))
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    if meta["reps"] > 1:
        L.append("Spread: IOPS of each repetition, in run order (how noisy this run was):\n")
        L.append("| workload | " + " | ".join(LABEL[s] for s in cols) + " |")
        L.append("|" + "---|" * (len(cols) + 1))
        for wl in workloads:
            row = [wl] + [" / ".join(f"{v:,.0f}" for v in res[s][wl]["all_iops"]) for s in cols]
            L.append("| " + " | ".join(row) + " |")
        L.append("")
    L.append("Peak RSS of each server (VmHWM at the end of each run; the largest over all runs):\n")
    L.append("| server | peak RSS |")
    L.append("|---|---|")
    for s in srv:
        L.append(f"| {LABEL[s]} | {fmt(rss.get(s) / 1024, 1) + ' MiB' if rss.get(s) else '-'} |")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vdiskd", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--ramp", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--local-engine", default="libaio")
    ap.add_argument("--cache", choices=("writeback", "none"), default="writeback",
                    help="none: O_DIRECT everywhere (vdiskd cache.direct, qemu-nbd --cache=none, "
                         "QSD cache.direct=on, fio direct=1 locally)")
    ap.add_argument("--perf", default="",
                    help="path prefix: perf-record vdiskd into PREFIX-<workload>.data")
    ap.add_argument("--note", default="")
    ap.add_argument("--vdiskd-alt", default="",
                    help="a second vdiskd build, run as server 'vdiskd-alt' (A/B in the same run)")
    a = ap.parse_args()

    size = parse_size(a.size)
    if size < 2 * MiB or size % (2 * MiB):
        sys.exit("nbd-bench: size must be a multiple of 2 MiB")
    servers = [s for s in a.servers.split(",") if s]
    workloads = [w for w in a.workloads.split(",") if w]
    for s in servers:
        if s not in SERVERS:
            sys.exit(f"nbd-bench: unknown server {s} (known: {', '.join(SERVERS)})")
        if s == "vdiskd-alt" and not a.vdiskd_alt:
            sys.exit("nbd-bench: server vdiskd-alt needs --vdiskd-alt (BENCH_NBD_VDISKD_ALT)")
    for w in workloads:
        if w not in WORKLOADS:
            sys.exit(f"nbd-bench: unknown workload {w} (known: {', '.join(WORKLOADS)})")
    work = os.path.abspath(a.work)
    os.makedirs(a.out, exist_ok=True)

    if a.perf:
        a.note = (a.note + " " if a.note else "") + ("perf was recording vdiskd during its runs: "
                                                     "its numbers include the profiler's overhead.")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "size": size, "runtime": a.runtime, "ramp": a.ramp,
            "local_engine": a.local_engine, "note": a.note, "cache": a.cache,
            "fio": sh("fio", "--version").stdout.strip()}
    qcow, raw = prepare(work, size)
    meta["work"], meta["fs"] = work, fs_of(work)
    meta["versions"] = "; ".join([
        sh("qemu-nbd", "--version").stdout.splitlines()[0],
        "qemu-storage-daemon " + sh("qemu-storage-daemon", "--version").stdout.split()[2],
        "vdiskd " + a.vdiskd + vdisk_rev()]
        + (["vdiskd (alt build) " + a.vdiskd_alt] if "vdiskd-alt" in servers else []))

    # Interleaved: for each repetition and workload, every server in turn, each one freshly started.
    # On a shared machine the load drifts; interleaving spreads that drift over all servers instead
    # of billing a busy minute to whichever server happened to run then.
    runs = {s: {wl: [] for wl in workloads} for s in servers}  # [(result, cpu seconds)]
    rss = {}
    for rep in range(a.reps):
        for wl in workloads:
            for s in servers:
                target = raw if s == "local" else qcow
                fsync(target)  # this run does not pay for the previous run's dirty pages
                if a.cache == "writeback":
                    warm(target)
                srv = perf = None
                try:
                    if s != "local":
                        srv = Server(s, qcow, work, a.vdiskd, direct=a.cache == "none",
                                     vdiskd_alt=a.vdiskd_alt)
                        if s == "vdiskd" and a.perf:
                            # dwarf unwinding: the build has no frame pointers; -F 999 keeps the
                            # data small. One file per workload (the last repetition's).
                            perf = subprocess.Popen(
                                ["perf", "record", "-q", "-F", "999", "--call-graph",
                                 "dwarf,16384", "-o", f"{a.perf}-{wl}.data", "-p", str(srv.pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                            time.sleep(0.5)  # let perf attach before the load starts
                    c0 = srv.cpu_seconds() if srv else None
                    r = fio(srv.uri() if srv else target, wl, size, a.runtime, a.ramp,
                            a.local_engine, direct=a.cache == "none")
                    c = None
                    if srv:
                        # the ramp seconds are billed to the CPU time too: scale them out
                        c = (srv.cpu_seconds() - c0) * a.runtime / (a.runtime + a.ramp)
                        rss[s] = max(rss.get(s, 0), srv.hwm_kib() or 0)
                    runs[s][wl].append((r, c))
                    log(f"rep {rep + 1}/{a.reps} {s:9} {wl:13} {r['iops']:10,.0f} IOPS "
                        f"{r['MBps']:9,.1f} MB/s" + (f"  cpu {c:.2f}s" if srv else ""))
                finally:
                    if perf:
                        perf.send_signal(2)
                        perf.wait()
                    if srv:
                        rc = srv.stop()
                        if rc not in (0, -15, 143):
                            log(f"warning: {s} exited {rc}, see {srv.logpath}")
    fsync(qcow)

    # the median over repetitions, metric by metric
    res, cpu = {}, {}
    for s in servers:
        res[s], cpu[s] = {}, {}
        for wl in workloads:
            rs = runs[s][wl]
            res[s][wl] = {k: statistics.median(r[k] for r, _ in rs) for k in ("iops", "MBps")}
            res[s][wl]["all_iops"] = [r["iops"] for r, _ in rs]
            if rs[0][1] is not None:
                # per run (that run's CPU over that run's I/Os), then the median
                cpu[s][wl] = statistics.median(c / (r["iops"] * a.runtime) * 1e6 if r["iops"]
                                               else float("inf") for r, c in rs)
    meta["reps"] = a.reps

    md = report(res, rss, cpu, meta, servers, workloads)
    base = "nbd" if a.cache == "writeback" else "nbd-direct"  # both modes' reports can coexist
    with open(os.path.join(a.out, base + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.out, base + ".json"), "w") as f:
        json.dump({"meta": meta, "results": res, "cpu_us_per_io": cpu, "rss_kib": rss,
                   "runs": runs}, f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
