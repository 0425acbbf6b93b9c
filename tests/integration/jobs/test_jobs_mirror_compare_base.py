"""A copy whose source cannot tell what it shares with the target's backing (a raw image, an NBD
export without block status) onto a target backed by the shared base: each unit of the source is
compared with what the target reads from its backing, and only the units that differ are written
(the source text's third case). Asserted on the target after the pivot: its content (qemu-img
compare with the source and the guest's writes) and its own allocation (qemu-img map: exactly the
units that differ from base, plus those the guest wrote during the copy)."""
import json
import random
import shutil
import subprocess

import pytest
from conftest import assert_qemu_check_clean, qemu_img, qemu_io_cmds
from qmp_client import file_node, fmt_node, start_vdiskd
from nbd_helpers import wait_path

MiB = 1 << 20
KiB = 1 << 10
SIZE = 16 * MiB
CL = 64 * KiB


def make_images(tmp, rng):
    """base.qcow2 with data over most of the disk; src.raw = base, then some clusters changed
    (data, and zeroes over base's data); tgt.qcow2 empty over base. Returns (src, tgt, changed
    cluster indexes)."""
    base = tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    qemu_io_cmds(base, [f"write -P {rng.randrange(1, 255)} {i * MiB} {MiB - 3 * CL}"
                        for i in range(SIZE // MiB)])
    src = tmp / "src.raw"
    qemu_img("convert", "-O", "raw", base, src)
    changed = sorted(rng.sample(range(SIZE // CL), 24))
    cmds = []
    for k, c in enumerate(changed):
        # a partial write still changes the whole 64 KiB unit; every 4th change is zeroes
        off = c * CL + rng.randrange(0, 15) * 4 * KiB
        cmds.append(f"write -z {c * CL} {CL}" if k % 4 == 0 else
                    f"write -P {rng.randrange(1, 255)} {off} {4 * KiB}")
    qemu_io_cmds(src, cmds, fmt="raw")
    # a change that wrote what base holds already (zeroes over a hole of base) is no change
    b = read_raw(tmp, base, "qcow2", "base.raw")
    s = src.read_bytes()
    changed = [c for c in changed if b[c * CL:(c + 1) * CL] != s[c * CL:(c + 1) * CL]]
    assert len(changed) >= 18, changed
    tgt = tmp / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tgt)
    return src, tgt, changed


def read_raw(tmp, img, fmt, name):
    out = tmp / name
    qemu_img("convert", "-f", fmt, "-O", "raw", img, out)
    return out.read_bytes()


def own_clusters(tgt):
    """The 64 KiB units the target's own layer holds (data or zero clusters)."""
    out = set()
    for e in json.loads(qemu_img("map", "--output=json", tgt).stdout):
        if e["depth"] == 0 and (e["data"] or e["zero"]) and e["start"] < SIZE:
            out.update(range(e["start"] // CL, (e["start"] + e["length"] + CL - 1) // CL))
    return out


def guest_writes(uri, model, rng, n):
    """n random writes through the guest's export (qemu-io over NBD), applied to model too;
    returns the 64 KiB units they touched."""
    cmds, touched = [], set()
    for _ in range(n):
        off = rng.randrange(0, SIZE // (4 * KiB)) * 4 * KiB
        ln = rng.randrange(1, 5) * 4 * KiB
        ln = min(ln, SIZE - off)
        pat = rng.randrange(1, 255)
        cmds += ["-c", f"write -P {pat} {off} {ln}"]
        model[off:off + ln] = bytes([pat]) * ln
        touched.update(range(off // CL, (off + ln - 1) // CL + 1))
    p = subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return touched


@pytest.mark.parametrize("source", ["raw", "nbdkit-noextents"])
def test_copy_compares_with_the_shared_base_when_allocation_is_unknown(tmp, source):
    rng = random.Random(7 if source == "raw" else 8)
    src, tgt, changed = make_images(tmp, rng)
    model = bytearray(src.read_bytes())
    sock = tmp / "nbd.sock"
    srv = None
    if source == "raw":
        node = fmt_node("raw", "disk0", src)
    else:
        # nbdkit's noextents filter: one "data" extent for everything (no allocation known)
        nsock = tmp / "kit.sock"
        srv = subprocess.Popen(["nbdkit", "-f", "-U", str(nsock), "--filter=noextents",
                                "file", str(src)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        wait_path(str(nsock), srv)
        node = {"driver": "raw", "node-name": "disk0",
                "file": {"driver": "nbd", "export": "",
                         "server": {"type": "unix", "path": str(nsock)}}}
    d = start_vdiskd(tmp, "--blockdev", json.dumps(node),
                     "--nbd-server", f"addr.type=unix,addr.path={sock}",
                     "--export", "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on")
    uri = f"nbd+unix:///disk0?socket={sock}"
    try:
        with d.client() as q:
            q.cmd("blockdev-add", driver="qcow2", node_name="tgt0", file=file_node(tgt))
            q.cmd("blockdev-mirror", job_id="m", device="disk0", target="tgt0", sync="full")
            touched = guest_writes(uri, model, rng, 12)
            q.get_event("BLOCK_JOB_READY", timeout=60)
            touched |= guest_writes(uri, model, rng, 12)
            q.cmd("block-job-complete", device="m")
            ev = q.get_event("BLOCK_JOB_COMPLETED", timeout=60)
            assert "error" not in ev["data"], ev
            touched |= guest_writes(uri, model, rng, 6)  # after the pivot: on the target
        d.stop_checked()
    finally:
        d.kill()
        if srv:
            srv.terminate()
            srv.wait()
    assert_qemu_check_clean(tgt)
    got = read_raw(tmp, tgt, "qcow2", "got.raw")
    assert got == bytes(model)
    own = own_clusters(tgt)
    # every unit that differs from base is the target's own; nothing else but the guest's
    assert set(changed) <= own, sorted(set(changed) - own)
    assert own <= set(changed) | touched, sorted(own - set(changed) - touched)
    assert len(own) < SIZE // CL // 4, len(own)
