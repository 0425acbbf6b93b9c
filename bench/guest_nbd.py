#!/usr/bin/python3
"""guest_nbd.py - what a guest sees after a snapshot: fio over NBD into a fresh overlay of the chain.

Driven by bench/run.sh (`make bench`). On bench/bench.py's generated chain (base <- sn1 <- sn2,
4 GiB * scale virtual), every run creates a new empty overlay over sn2 (`qemu-img create -b`), so
each 4k write allocates a 64 KiB cluster and copies the rest of it from the chain (copy on write),
as every write does after a snapshot; reads go through the overlay to the chain. vdiskd and qemu-nbd
serve that overlay in turn (page cache, writeback; freshly started per run), over TCP 127.0.0.1
and over a unix socket, and fio's nbd engine (libnbd) runs 4k randwrite / randread at a total queue
depth of 16 over 1 connection (iodepth 16) or 4 connections (multi-conn: 4 jobs of iodepth 4),
time based, no ramp (the allocating phase is the point). Servers alternate order per repetition.
Per run: IOPS, mean and p99 completion latency, the server's CPU time. Writes guest-nbd.md/.json.
"""
import argparse
import datetime
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import procstat

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = {"randwrite-4k": "randwrite", "randread-4k": "randread"}
LABEL = {"vdiskd": "vdiskd", "qemu-nbd": "qemu-nbd"}


def log(msg):
    print(f"[guest-nbd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*args):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{p.stdout}{p.stderr}")
    return p


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, kind, image, transport, rd, vdiskd):
        self.sock = os.path.join(rd, f"{kind}.sock")
        self.logpath = os.path.join(rd, f"{kind}.log")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.port = free_port() if transport == "tcp" else None
        if kind == "vdiskd":
            node = json.dumps({"driver": "qcow2", "node-name": "n0",
                               "file": {"driver": "file", "filename": image,
                                        "cache": {"direct": False}}})
            addr = (f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}" if self.port
                    else f"addr.type=unix,addr.path={self.sock}")
            argv = [vdiskd, "--blockdev", node, "--nbd-server", addr + ",max-connections=8",
                    "--export", "type=nbd,id=e0,node-name=n0,name=exp,writable=on"]
        else:
            argv = ["qemu-nbd", "-f", "qcow2", "--cache=writeback", "-e", "8", "--persistent",
                    "-x", "exp", image]
            argv[1:1] = ["-b", "127.0.0.1", "-p", str(self.port)] if self.port else ["-k", self.sock]
        self.log = open(self.logpath, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.time() + 20
        while not self._ready():
            if self.proc.poll() is not None or time.time() > end:
                self.stop()
                raise RuntimeError(f"{kind} did not start: {open(self.logpath).read()}")
            time.sleep(0.02)

    def _ready(self):
        if self.port is None:
            return os.path.exists(self.sock)
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def uri(self):
        return (f"nbd://127.0.0.1:{self.port}/exp" if self.port
                else f"nbd+unix:///exp?socket={self.sock}")

    def cpu_seconds(self):
        return procstat.cpu_seconds(self.proc.pid)

    def stop(self, kill=False):
        """kill: SIGKILL, no final flush (the overlay is thrown away right after, so its dirty
        pages are dropped instead of written back into the next run)."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
        procstat.stop(self.proc)
        self.log.close()


def run_fio(uri, rw, conns, runtime, out):
    depth = 16 // conns
    argv = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            f"--iodepth={depth}", f"--numjobs={conns}", "--group_reporting=1", "--time_based=1",
            f"--runtime={runtime}", "--randrepeat=0", "--output-format=json", f"--output={out}"]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr[-2000:]}")
    j = json.load(open(out))["jobs"][0]
    side = j["write"] if rw == "randwrite" else j["read"]
    clat = side["clat_ns"]
    return {"iops": side["iops"], "mean_ms": clat["mean"] / 1e6,
            "p99_ms": clat.get("percentile", {}).get("99.000000", 0) / 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vdiskd", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=20261125)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--transports", default="tcp,unix")
    ap.add_argument("--conns", default="1,4")
    ap.add_argument("--workloads", default="randwrite-4k,randread-4k")
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("vdisk_bench_gen", os.path.join(HERE, "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    src, chain = mod.gen(a.work, a.scale, a.seed)
    rd = os.path.join(a.work, "guest-run")
    os.makedirs(rd, exist_ok=True)
    configs = [(wl, tr, int(c)) for wl in a.workloads.split(",") for tr in a.transports.split(",")
               for c in a.conns.split(",")]
    servers = ["vdiskd", "qemu-nbd"]
    res = {}
    load0 = " ".join(open("/proc/loadavg").read().split()[:3])
    for rep in range(a.reps):
        for wl, tr, conns in configs:
            order = servers if (rep + len(res)) % 2 == 0 else servers[::-1]
            for kind in order:
                ov = os.path.join(rd, "overlay.qcow2")
                if os.path.exists(ov):
                    os.unlink(ov)
                sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.join(src, "sn2.qcow2"),
                   "-F", "qcow2", ov)
                srv = Server(kind, ov, tr, rd, a.vdiskd)
                try:
                    c0 = srv.cpu_seconds()
                    r = run_fio(srv.uri(), WORKLOADS[wl], conns, a.runtime,
                                os.path.join(rd, "fio.json"))
                    r["cpu_us_per_io"] = ((srv.cpu_seconds() - c0) * 1e6 /
                                          max(1, r["iops"] * a.runtime))
                except Exception as e:
                    r = {"error": str(e)}
                finally:
                    srv.stop(kill=True)
                    os.unlink(ov)
                key = f"{wl} {tr} {conns}conn"
                res.setdefault(key, {}).setdefault(kind, []).append(r)
                log(f"rep {rep + 1} {kind:8} {key:26} " +
                    (f"{r['iops']:.0f} IOPS, mean {r['mean_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
                     if "iops" in r else r["error"]))
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "scale": a.scale, "reps": a.reps, "runtime": a.runtime, "chain": chain,
            "loadavg_start": load0, "loadavg_end": " ".join(open("/proc/loadavg").read().split()[:3]),
            "fio": sh("fio", "--version").stdout.strip(),
            "qemu_nbd": sh("qemu-nbd", "--version").stdout.split("\n")[0]}
    with open(os.path.join(a.out, "guest-nbd.json"), "w") as f:
        json.dump({"meta": meta, "results": res}, f, indent=1)
    md = report(meta, res)
    with open(os.path.join(a.out, "guest-nbd.md"), "w") as f:
        f.write(md)
    print(md)


def report(meta, res):
    L = ["# Guest I/O after a snapshot: vdiskd vs qemu-nbd (fio over NBD into a fresh overlay)\n",
         f"{meta['date']}; chain scale {meta['scale']:g} ({meta['chain']['virtual_size'] >> 20} MiB "
         f"virtual); {meta['reps']} repetitions of {meta['runtime']} s per cell, servers "
         f"alternating; load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at "
         f"the end; {meta['fio']}, {meta['qemu_nbd']}. Total queue depth 16 (1 connection x 16, "
         f"or 4 connections x 4). Median [min–max] IOPS; 'worst pair' is the lowest "
         f"vdiskd/qemu-nbd ratio of the repetitions taken pairwise.\n",
         "| workload | transport | conns | vdiskd IOPS | qemu-nbd IOPS | ratio (medians) | worst "
         "pair | vdiskd mean / p99 ms | qemu-nbd mean / p99 ms | CPU µs/IO vdiskd / qemu-nbd |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for key, by in res.items():
        wl, tr, conns = key.split()
        v = [r for r in by.get("vdiskd", []) if "iops" in r]
        q = [r for r in by.get("qemu-nbd", []) if "iops" in r]
        if not v or not q:
            L.append(f"| {wl} | {tr} | {conns[0]} | error | error | - | - | - | - | - |")
            continue

        def m(rs, k):
            return statistics.median(r[k] for r in rs)

        def cell(rs):
            xs = [r["iops"] for r in rs]
            return f"{statistics.median(xs):,.0f} [{min(xs):,.0f}–{max(xs):,.0f}]"
        pairs = [x["iops"] / y["iops"] for x, y in zip(v, q) if y["iops"]]
        L.append(f"| {wl} | {tr} | {conns[0]} | {cell(v)} | {cell(q)} | "
                 f"{m(v, 'iops') / m(q, 'iops'):.2f} | {min(pairs):.2f} | "
                 f"{m(v, 'mean_ms'):.2f} / {m(v, 'p99_ms'):.2f} | "
                 f"{m(q, 'mean_ms'):.2f} / {m(q, 'p99_ms'):.2f} | "
                 f"{m(v, 'cpu_us_per_io'):.1f} / {m(q, 'cpu_us_per_io'):.1f} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
