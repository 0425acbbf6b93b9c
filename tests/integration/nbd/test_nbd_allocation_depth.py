"""qemu:allocation-depth over NBD: vdiskd serves QEMU's metadata context (--export
allocation-depth=on, block-export-add "allocation-depth": true) as qemu-nbd -A does. Per extent:
0 where no layer of the chain holds it, 1 the exported image itself, 2 its backing, and so on.
The oracle is qemu-nbd -A on the same three-layer chain, read by nbdinfo --map.
"""
import json
import subprocess

import nbd_helpers as H
from conftest import qemu_img, qemu_io_cmds, run, wait_unix_listening
from qmp_client import start_vdiskd

MiB = 1 << 20
SIZE = 16 * MiB
CTX = "qemu:allocation-depth"


def chain(tmp):
    """base <- mid <- top, each layer holding some ranges (a zero cluster in mid over base's data,
    ranges nobody holds); returns top's path."""
    base, mid, top = (str(tmp / f"{n}.qcow2") for n in ("base", "mid", "top"))
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io_cmds(base, ["write -P 0x11 0 2M", f"write -P 0x12 {6 * MiB} 1M"])
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qemu_io_cmds(mid, [f"write -P 0x21 {MiB} 2M", f"write -z {6 * MiB} 512k"])
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu_io_cmds(top, [f"write -P 0x31 {2 * MiB} 1M", f"write -P 0x32 {8 * MiB} 64k"])
    return top


def depth_map(uri):
    """[(offset, length, depth)] from nbdinfo, neighbours of the same depth merged."""
    out = run(["nbdinfo", "--json", f"--map={CTX}", uri], timeout=60).stdout
    merged = []
    for e in json.loads(out):
        off, ln, depth = e["offset"], e["length"], e["type"]
        if merged and merged[-1][2] == depth and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + ln, depth)
        else:
            merged.append((off, ln, depth))
    return merged


def depth_at(extents, off):
    return next(d for o, n, d in extents if o <= off < o + n)


def qemu_nbd_map(tmp, top):
    sock = str(tmp / "qemu-nbd.sock")
    p = subprocess.Popen(["qemu-nbd", "-r", "-t", "-A", "-f", "qcow2", "-x", "exp", "-k", sock,
                          top], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_unix_listening(sock, p)
        return depth_map(f"nbd+unix:///exp?socket={sock}")
    finally:
        p.kill()
        p.wait(timeout=30)


def test_export_serves_allocation_depth_as_qemu_nbd(tmp):
    top = chain(tmp)
    want = qemu_nbd_map(tmp, top)
    # The chain has every depth: nobody (0), top (1), mid (2), base (3).
    assert {d for _, _, d in want} == {0, 1, 2, 3}, want
    d = H.start_daemon(tmp, top, "qcow2", writable=False, read_only_node=True,
                       allocation_depth=True)
    try:
        assert depth_map(d.uri()) == want
        # base:allocation is still context one, unchanged next to it.
        assert run(["nbdinfo", "--map", d.uri()], timeout=60).returncode == 0
    finally:
        d.kill()


def test_allocation_depth_only_when_the_export_asks_for_it(tmp):
    """Without allocation-depth the context is not offered (as qemu-nbd without -A); with
    block-export-add's member it is, and follows the guest's writes to the top layer."""
    top = chain(tmp)
    d = H.start_daemon(tmp, top, "qcow2", writable=False, read_only_node=True)
    try:
        p = subprocess.run(["nbdinfo", f"--map={CTX}", d.uri()], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode != 0, p.stdout
        listed = run(["nbdinfo", "--json", "--list", d.uri("")], timeout=60).stdout
        assert CTX not in listed, listed
    finally:
        d.kill()
    want = qemu_nbd_map(tmp, top)
    sock = str(tmp / "nbd2.sock")
    v = start_vdiskd(tmp)
    try:
        q = v.client()
        q.cmd("blockdev-add", driver="qcow2", node_name="n0",
              file={"driver": "file", "filename": top})
        q.cmd("nbd-server-start", addr={"type": "unix", "path": sock})
        q.cmd("block-export-add", type="nbd", id="e0", node_name="n0", name="exp",
              writable=True, allocation_depth=True)
        uri = f"nbd+unix:///exp?socket={sock}"
        before = depth_map(uri)
        assert before == want, before
        assert depth_at(before, 12 * MiB) == 0 and depth_at(before, 6 * MiB) == 2, before
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0x41 {12 * MiB} 1M",
             "-c", f"write -P 0x42 {6 * MiB} 64k", uri], timeout=60)
        after = depth_map(uri)
        assert depth_at(after, 12 * MiB) == 1 and depth_at(after, 13 * MiB - 1) == 1, after
        assert depth_at(after, 13 * MiB) == 0 and depth_at(after, 6 * MiB) == 1, after
        assert depth_at(after, 6 * MiB + 65536) == 2, after
        q.close()
        v.stop_checked()
    finally:
        v.kill()
