#!/usr/bin/python3
"""cross_host_bench.py - live copy throughput across a real link: vdiskd against
qemu-storage-daemon, both mirroring the same source (sync=full, blockdev-mirror) onto an NBD export
on "host B" (a network namespace joined by a veth pair with a tbf rate limit) behind nbdkit's delay
filter (latency per request). Prints MiB/s per daemon and the link rate. Root (namespaces).

  bench/cross_host_bench.py [--size-mib 512] [--rate 1gbit] [--delay-ms 5] [--reps 1]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
os.environ.setdefault("VDISK_BUILD", os.path.join(ROOT, "build"))

from qmp_client import Daemon  # noqa: E402
from conftest import VDISKD  # noqa: E402
from netns_helpers import two_hosts, B_ADDR  # noqa: E402

MiB = 1 << 20


def wait_unix(path, proc, timeout=20):
    """path exists (a unix socket bound in another network namespace: /proc/net/unix of ours
    does not list it)."""
    end = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "process exited early"
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


def daemon(kind, ns, tmp, name):
    qmp = os.path.join(tmp, f"{name}.qmp")
    if kind == "vdiskd":
        argv = [VDISKD, "--qmp", qmp]
    else:
        argv = ["qemu-storage-daemon", "--chardev", f"socket,path={qmp},server=on,wait=off,id=c0",
                "--monitor", "chardev=c0"]
    # Never probe qemu-storage-daemon by connecting: QEMU 7.2's socket chardev aborts
    # ("tcp_chr_change_state: Assertion `s->state == TCP_CHARDEV_STATE_DISCONNECTED'") when the
    # client's connection is accepted before it saw the probe's close, and the client reads EOF.
    # Daemon then watches the daemon's own namespace's /proc/PID/net/unix for the listener.
    return Daemon(["ip", "netns", "exec", ns, *argv], qmp, os.path.join(tmp, f"{name}.log"),
                  probe=kind == "vdiskd")


def mirror_rate(q, device, target, size):
    """blockdev-mirror sync=full of device onto target: MiB/s up to BLOCK_JOB_READY. Then
    cancelled (after READY: the target stays a complete copy)."""
    t0 = time.monotonic()
    q.cmd("blockdev-mirror", job_id="m", device=device, target=target, sync="full")
    q.get_event("BLOCK_JOB_READY", timeout=3600)
    secs = time.monotonic() - t0
    q.cmd("block-job-cancel", device="m")
    q.get_event("BLOCK_JOB_COMPLETED", timeout=600)
    return size / MiB / secs


class RunFailed(Exception):
    """One copy across the link failed; the message says how and what the daemons said."""


def log_tail(d, lines=8):
    try:
        return " | ".join(d.output().strip().splitlines()[-lines:])
    except (OSError, ValueError):
        return "(log closed)"


def describe_failure(e, daemons, proxy):
    """e, plus which process had already exited (a daemon that died closes its QMP socket: the
    client sees only "QMP connection closed") and the last lines of each daemon's log."""
    here = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == __file__]
    where = f" at {here[-1].name}: {here[-1].line}" if here else ""
    parts = [f"{type(e).__name__}: {e}{where}"]
    for host, d in daemons.items():
        if d is None:
            continue
        try:
            rc = d.proc.wait(timeout=1)  # one that is dying: its exit status, not "running"
        except subprocess.TimeoutExpired:
            rc = None
        state = "running" if rc is None else f"exited {rc}"
        parts.append(f"daemon on {host} {state}; log: {log_tail(d)}")
    if proxy is not None and proxy.poll() is not None:
        parts.append(f"nbdkit proxy exited {proxy.returncode}")
    return "; ".join(parts)


def one_run(kind, nsa, nsb, tmp, src, size, delay_ms, proxy_on_b=False, cc=None):
    """proxy_on_b: the delay proxy runs on B in front of B's export (A's daemon is then the TCP
    sender on the link, as without a proxy); else on A, where nbdkit sends over TCP. cc: vdiskd's
    x-tcp-congestion for its connections (proxy_on_b only)."""
    tgt = os.path.join(tmp, "target.raw")
    with open(tgt, "wb") as f:
        f.truncate(size)
    b = daemon("vdiskd", nsb, tmp, "b")
    proxy = a = None
    try:
        qb = b.client()
        qb.cmd("blockdev-add", driver="raw", node_name="t",
               file={"driver": "file", "filename": tgt})
        bsock = os.path.join(tmp, "b-export.sock")
        if proxy_on_b:
            qb.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": bsock}})
        else:
            qb.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": B_ADDR,
                                                                      "port": "10809"}})
        qb.cmd("block-export-add", type="nbd", id="e", node_name="t", name="incoming",
               writable=True)
        psock = os.path.join(tmp, "proxy.sock")
        if os.path.exists(psock):
            os.unlink(psock)  # the last run's: wait_unix waits for the new one
        delays = [f"delay-read={delay_ms}ms", f"delay-write={delay_ms}ms",
                  f"delay-zero={delay_ms}ms"]
        if proxy_on_b:
            proxy = subprocess.Popen(
                ["ip", "netns", "exec", nsb, "nbdkit", "-f", "-i", B_ADDR, "-p", "10810",
                 "--filter=delay", "nbd", f"socket={bsock}", "export=incoming", *delays],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            end = time.time() + 30
            while subprocess.run(["ip", "netns", "exec", nsa, "nbdinfo", "--size",
                                  f"nbd://{B_ADDR}:10810/incoming"], capture_output=True,
                                 timeout=30).returncode != 0:
                assert proxy.poll() is None and time.time() < end, "proxy did not start"
                time.sleep(0.1)
            server = {"type": "inet", "host": B_ADDR, "port": "10810"}
        else:
            proxy = subprocess.Popen(
                ["ip", "netns", "exec", nsa, "nbdkit", "-f", "-U", psock, "--filter=delay",
                 "nbd", f"hostname={B_ADDR}", "port=10809", "export=incoming", *delays],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_unix(psock, proxy)
            server = {"type": "unix", "path": psock}
        a = daemon(kind, nsa, tmp, "a")
        q = a.client()
        q.cmd("blockdev-add", driver="raw", node_name="src",
              file={"driver": "file", "filename": src})
        remote = {"driver": "nbd", "server": server, "export": "incoming"}
        if cc:
            remote["x-tcp-congestion"] = cc
        q.cmd("blockdev-add", driver="raw", node_name="remote", file=remote)
        rate = mirror_rate(q, "src", "remote", size)
        q.close()
        qb.close()
        return rate
    except Exception as e:
        raise RunFailed(describe_failure(e, {"A": a, "B": b}, proxy)) from e
    finally:
        for d in (a, b):
            if d:
                d.kill()
        if proxy and proxy.poll() is None:
            proxy.terminate()
            try:
                proxy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                # nbdkit waits for its clients to go; one left by a failed run must not turn
                # the cleanup into the part's failure.
                proxy.kill()
                proxy.wait(timeout=15)


TCP_SINK = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
n, t0 = 0, None
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    if t0 is None:
        t0 = time.monotonic()
    n += len(d)
print(n, time.monotonic() - t0, flush=True)
"""


def tcp_mib_per_s(nsa, nsb, size, port=10811):
    """What one bulk TCP stream from A to B carries over the same link, in MiB/s of payload
    (as iperf would report it): the rate a user measures for "the link". Below tc's nominal
    rate by the Ethernet/IP/TCP headers (1448 bytes of payload per 1514 on the wire)."""
    sink = subprocess.Popen(["ip", "netns", "exec", nsb, sys.executable, "-c", TCP_SINK, B_ADDR,
                             str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "listening", "tcp sink did not start"
        send = ("import socket, sys\n"
                "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
                "buf = b'x' * (1 << 20)\n"
                "for _ in range(int(sys.argv[3])):\n"
                "    s.sendall(buf)\n"
                "s.close()\n")
        subprocess.run(["ip", "netns", "exec", nsa, sys.executable, "-c", send, B_ADDR, str(port),
                        str(size // MiB)], check=True, timeout=600)
        out, _ = sink.communicate(timeout=60)
        nbytes, secs = out.split()
        assert int(nbytes) == size // MiB * MiB, f"tcp sink received {nbytes} bytes"
        return int(nbytes) / MiB / float(secs)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(timeout=15)


def link_mib_per_s(rate):
    """tc's rate ("1gbit", "200mbit", "500kbit") in MiB/s of payload at most."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1}
    for u, mult in units.items():
        if rate.endswith(u):
            return float(rate[:-len(u)]) * mult / 8 / MiB
    raise ValueError(f"rate {rate!r}: expected a number with gbit, mbit or kbit")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--delay-ms", type=int, default=5)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="vdisk-xhost-") as tmp:
        src = os.path.join(tmp, "src.raw")
        with open(src, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        with two_hosts(args.rate) as (nsa, nsb):
            print(json.dumps({"tcp_mib_per_s": round(tcp_mib_per_s(nsa, nsb, size), 1)}),
                  flush=True)
            for kind in ("vdiskd", "qemu-storage-daemon"):
                rates = [one_run(kind, nsa, nsb, tmp, src, size, args.delay_ms)
                         for _ in range(args.reps)]
                print(json.dumps({"daemon": kind, "size_mib": args.size_mib, "rate": args.rate,
                                  "delay_ms": args.delay_ms,
                                  "mib_per_s": [round(r, 1) for r in rates],
                                  "link_mib_per_s": round(link_mib_per_s(args.rate), 1),
                                  "of_link": round(max(rates) / link_mib_per_s(args.rate), 2)}),
                      flush=True)


if __name__ == "__main__":
    main()
