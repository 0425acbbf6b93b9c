#!/usr/bin/python3
"""hosts_bench.py - `make bench` part "hosts": storage beyond one host, vdiskd against
qemu-storage-daemon in the same run on the same data.
 1. ceph: blockdev-mirror (sync=full) of a raw disk of random data onto an RBD image of a
    throwaway single-node Ceph (scripts/ceph-dev.sh, memstore OSD), time to BLOCK_JOB_READY;
    the copy is compared with the source (qemu-img compare) once per daemon. The cluster is
    warmed up first (an uncounted write of the same size) and the daemons alternate going first.
 2. cross-host: blockdev-mirror onto an NBD export on "host B" across a veth link with a tbf rate
    limit, with and without nbdkit's delay filter (bench/cross_host_bench.py), as a fraction of
    the link's rate.
Writes OUT/hosts.json and OUT/hosts.md. Needs root (network namespaces), ceph-mon/ceph-osd/rbd,
qemu-storage-daemon with QEMU's rbd driver (qemu-block-extra), nbdkit.

  bench/hosts_bench.py --out DIR [--scale 1] [--reps 3] [--parts ceph,cross-host]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ.setdefault("VDISK_BUILD", os.path.join(ROOT, "build"))

from qmp_client import Daemon  # noqa: E402
from conftest import VDISKD  # noqa: E402
import cross_host_bench as xh  # noqa: E402

MiB = 1 << 20
CEPH_DEV = os.path.join(ROOT, "scripts", "ceph-dev.sh")


def random_file(path, size_mib):
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MiB))


def local_daemon(kind, tmp, name):
    qmp = os.path.join(tmp, f"{name}.qmp")
    if kind == "vdiskd":
        return Daemon([VDISKD, "--qmp", qmp], qmp, os.path.join(tmp, f"{name}.log"))
    return Daemon(["qemu-storage-daemon", "--chardev", f"socket,path={qmp},server=on,wait=off,id=c0",
                   "--monitor", "chardev=c0"], qmp, os.path.join(tmp, f"{name}.log"), probe=False)


def mirror_to_rbd(kind, tmp, conf, src, image, size):
    """One blockdev-mirror of src onto rbd/image (created here, removed after): MiB/s to READY."""
    subprocess.run(["rbd", "-c", conf, "create", "--size", f"{size // MiB}M", f"rbd/{image}"],
                   check=True, timeout=120)
    d = local_daemon(kind, tmp, f"ceph-{kind}")
    try:
        q = d.client()
        q.cmd("blockdev-add", driver="raw", node_name="src",
              file={"driver": "file", "filename": src})
        q.cmd("blockdev-add", driver="raw", node_name="ceph0",
              file={"driver": "rbd", "pool": "rbd", "image": image, "conf": conf})
        rate = xh.mirror_rate(q, "src", "ceph0", size)
        q.close()
    finally:
        d.kill()
    return rate


def rbd_identical(conf, src, image):
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src,
                        f"rbd:rbd/{image}:conf={conf}"], capture_output=True, text=True,
                       timeout=600)
    return p.returncode == 0


def warm_up(conf, size):
    """Write size once onto a scratch image, uncounted. The first copy onto a fresh memstore
    OSD is the slow one (the OSD grows its memory): in the three idle runs before this, the
    first repetition's copy - always vdiskd's - was 0.61-0.69x of its next two, QSD's
    0.92-0.97x of its."""
    subprocess.run(["rbd", "-c", conf, "create", "--size", f"{size // MiB}M", "rbd/warmup"],
                   check=True, timeout=120)
    subprocess.run(["rbd", "-c", conf, "bench", "--io-type", "write", "--io-size", "1M",
                    "--io-threads", "16", "--io-total", str(size), "--io-pattern", "seq",
                    "rbd/warmup"], check=True, timeout=600, capture_output=True)
    subprocess.run(["rbd", "-c", conf, "rm", "--no-progress", "rbd/warmup"], check=True,
                   timeout=300, capture_output=True)


def ceph_part(tmp, size_mib, reps):
    size = size_mib * MiB
    src = os.path.join(tmp, "src.raw")
    random_file(src, size_mib)
    cdir = os.path.join(tmp, "ceph")
    env = dict(os.environ, CEPH_DEV_MEM_MB=str(max(1024, 3 * size_mib + 512)))
    conf = subprocess.run([CEPH_DEV, "start", cdir], check=True, capture_output=True, text=True,
                          timeout=180, env=env).stdout.strip()
    res = {"size_mib": size_mib, "vdiskd": [], "qemu-storage-daemon": [], "identical": {}}
    try:
        warm_up(conf, size)
        n = 0
        for rep in range(reps):
            kinds = ("vdiskd", "qemu-storage-daemon")
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                n += 1
                image = f"bench{n}"
                res[kind].append(round(mirror_to_rbd(kind, tmp, conf, src, image, size), 1))
                if rep == 0:
                    res["identical"][kind] = rbd_identical(conf, src, image)
                subprocess.run(["rbd", "-c", conf, "rm", "--no-progress", f"rbd/{image}"],
                               check=True, timeout=300, capture_output=True)
    finally:
        subprocess.run([CEPH_DEV, "stop", cdir], timeout=120, capture_output=True)
    return res


# The cross-host variants, interleaved per repetition: (key, daemon, x-tcp-congestion).
CROSS_HOST_VARIANTS = (("vdiskd", "vdiskd", None),
                       ("qemu-storage-daemon", "qemu-storage-daemon", None),
                       ("vdiskd-cubic", "vdiskd", "cubic"))


def one_sample(row, key, run, tries=2):
    """run() once, again if it failed: a failed copy costs one sample, recorded with what the
    daemons said (row["failures"]), not the whole part. None if every try failed."""
    for _ in range(tries):
        try:
            return run()
        except xh.RunFailed as e:
            row.setdefault("failures", []).append(f"{key}: {e}")
            print(f"hosts bench: {key} failed: {e}", file=sys.stderr, flush=True)
    return None


def cross_host_part(tmp, size_mib, reps, rate="1gbit"):
    """The delay proxy sits on B in front of B's export: A's daemon is the TCP sender on the
    link, as in a deployment without a proxy (docs/rbd-and-hosts.md)."""
    src = os.path.join(tmp, "xsrc.raw")
    random_file(src, size_mib)
    out = []
    with xh.two_hosts(rate) as (nsa, nsb):
        for delay in (0, 5):
            row = {"rate": rate, "delay_ms": delay, "size_mib": size_mib,
                   "link_mib_per_s": round(xh.link_mib_per_s(rate), 1)}
            for key, _, _ in CROSS_HOST_VARIANTS:
                row[key] = []
            row["tcp"] = []
            for _ in range(reps):
                row["tcp"].append(round(xh.tcp_mib_per_s(nsa, nsb, size_mib * MiB), 1))
                for key, kind, cc in CROSS_HOST_VARIANTS:
                    mibs = one_sample(row, key, lambda: xh.one_run(
                        kind, nsa, nsb, tmp, src, size_mib * MiB, delay, proxy_on_b=True, cc=cc))
                    if mibs is not None:
                        row[key].append(round(mibs, 1))
            out.append(row)
    return out


def spread(xs):
    return f"{statistics.median(xs):,.1f} [{min(xs):,.1f}-{max(xs):,.1f}]" if xs else "-"


def markdown(res):
    L = ["# Beyond one host: Ceph RBD and host-to-host copy", "",
         "bench/hosts_bench.py: blockdev-mirror sync=full, time from the command to "
         "BLOCK_JOB_READY, MiB/s, median [min-max].", ""]
    c = res.get("ceph")
    if c:
        L += [f"## Onto Ceph RBD ({c['size_mib']} MiB of random data, single-node memstore "
              "cluster on this machine)", "",
              "| daemon | MiB/s | copy == source (qemu-img compare) |", "|---|---|---|"]
        for kind in ("vdiskd", "qemu-storage-daemon"):
            L.append(f"| {kind} | {spread(c[kind])} | {c['identical'].get(kind)} |")
        L.append("")
    x = res.get("cross-host")
    if x:
        L += ["## Across hosts (network namespaces, veth, tbf; nbdkit delay filter on B for "
              "latency; the daemon on A is the TCP sender)", "",
              "\"Of the link\" is against tc's nominal rate; \"of TCP\" against one bulk TCP stream "
              "A to B over the same link in the same run (what iperf would show: the nominal rate "
              "less the Ethernet/IP/TCP headers, at most 1448/1514 = 0.956x).", "",
              "| link | added latency | daemon | MiB/s | of the link | of TCP |",
              "|---|---|---|---|---|---|"]
        names = {"vdiskd-cubic": "vdiskd, x-tcp-congestion=cubic",
                 "tcp": "bulk TCP stream (reference)"}
        for row in x:
            tcp = statistics.median(row["tcp"]) if row.get("tcp") else None
            for key in ("tcp",) + tuple(k for k, _, _ in CROSS_HOST_VARIANTS):
                if not row.get(key):
                    continue
                m = statistics.median(row[key])
                of_tcp = f"{m / tcp:.2f}x" if tcp else "-"
                L.append(f"| {row['rate']} ({row['link_mib_per_s']} MiB/s) | {row['delay_ms']} ms "
                         f"| {names.get(key, key)} | {spread(row[key])} | "
                         f"{m / row['link_mib_per_s']:.2f}x | {of_tcp} |")
        L.append("")
        for row in x:
            for f in row.get("failures", []):
                L += [f"Failed run ({row['delay_ms']} ms, retried): {f}", ""]
    for part, err in res.get("errors", {}).items():
        L += [f"{part}: not measured ({err})", ""]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parts", default="ceph,cross-host")
    args = ap.parse_args()
    size_mib = max(16, int(256 * args.scale))
    parts = args.parts.split(",")
    res = {"errors": {}}
    with tempfile.TemporaryDirectory(prefix="vdisk-hosts-") as tmp:
        for name, fn in (("ceph", ceph_part), ("cross-host", cross_host_part)):
            if name not in parts:
                continue
            try:
                res[name] = fn(tmp, size_mib, args.reps)
            except Exception as e:  # a part that cannot run is reported, the others still run
                res["errors"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()  # to make bench's log: where it failed
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hosts.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "hosts.md"), "w") as f:
        f.write(markdown(res))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
