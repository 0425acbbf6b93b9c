"""Two hosts on one machine: network namespaces A and B joined by a veth pair whose addresses exist
only inside them, a tbf qdisc limiting the rate on both ends (jobs/test_jobs_cross_host.py,
protocols/test_nbd_client_link_failure.py)."""
import contextlib
import os

from conftest import VDISKD, run
from qmp_client import Daemon

A_ADDR, B_ADDR = "10.231.77.1", "10.231.77.2"


def sh(*cmd):
    return run(list(cmd), timeout=30)


@contextlib.contextmanager
def two_hosts(rate="200mbit"):
    """Namespaces A and B, veth A<->B with addresses inside them, tbf on both ends; removed after."""
    tag = f"vd{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    created = []
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        sh("ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        for ns, dev, addr in ((a, "va", A_ADDR), (b, "vb", B_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", rate, "burst", "256kb", "latency", "50ms")
        yield a, b
    finally:
        for ns in created:
            run(["ip", "netns", "del", ns], check=False, timeout=30)


def vdiskd_in(ns, tmp, name, *extra):
    qmp = str(tmp / f"{name}-qmp.sock")
    return Daemon(["ip", "netns", "exec", ns, VDISKD, "--qmp", qmp, *extra], qmp,
                  str(tmp / f"{name}.log"))
