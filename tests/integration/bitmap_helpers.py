"""Helpers for the dirty-bitmap tests: read a bitmap the way QEMU does, and model granules.

The oracle for a bitmap's contents is QEMU itself: qemu-nbd exports the image with `-B NAME` and
nbdinfo reads the `qemu:dirty-bitmap:NAME` meta context (nbdinfo starts qemu-nbd by socket
activation, so nothing is left listening).
"""
import json
import struct

from conftest import run
from qmp_client import start_qsd, start_vdiskd

BITMAP_EXT = 0x23852875


def qemu_dirty_granules(path, name, granularity, fmt="qcow2"):
    """Set of granule indexes QEMU reports dirty in bitmap `name` of the image at path."""
    p = run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--json", "--",
             "[", "qemu-nbd", "-r", "-B", name, "-f", fmt, str(path), "]"])
    return extents_to_granules(json.loads(p.stdout), granularity)


def extents_to_granules(extents, granularity):
    out = set()
    for e in extents:
        if e["type"] & 1:
            first = e["offset"] // granularity
            last = (e["offset"] + e["length"] - 1) // granularity
            out.update(range(first, last + 1))
    return out


def granules(off, length, granularity):
    """Granules a write of [off, off+length) dirties."""
    return set(range(off // granularity, (off + length - 1) // granularity + 1))


def qemu_bitmaps(path):
    """qemu-img info's bitmaps list: {name: (granularity, sorted flags)}."""
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    data = info["format-specific"]["data"]
    return {b["name"]: (b["granularity"], sorted(b["flags"])) for b in data.get("bitmaps", [])}


def bitmap_ext(path):
    """(offset of the extension's data in the file, nb_bitmaps, dir_size, dir_offset) or None."""
    with open(path, "rb") as f:
        hdr = f.read(65536)
    hlen = struct.unpack(">I", hdr[100:104])[0]
    off = hlen
    while off + 8 <= len(hdr):
        typ, ln = struct.unpack(">II", hdr[off:off + 8])
        if typ == 0:
            return None
        if typ == BITMAP_EXT:
            nb, _, size, doff = struct.unpack(">IIQQ", hdr[off + 8:off + 32])
            return off + 8, nb, size, doff
        off += 8 + (ln + 7) // 8 * 8
    return None


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _replies(tmp, start, steps_fn):
    d = start(tmp)
    try:
        with d.client() as c:
            steps = steps_fn(tmp)
            return steps, [c.execute(cmd, args) for cmd, args in steps]
    finally:
        if start is start_vdiskd:
            d.stop_checked()
        else:
            d.kill()


def _node_bitmaps(reply):
    return {n["node-name"]: n.get("dirty-bitmaps") for n in reply["return"]
            if not n["node-name"].startswith("#")}


def assert_replies_match_qsd(tmp, steps_fn):
    """Run the QMP commands steps_fn(dir) builds (dir: one of its own per daemon) on
    qemu-storage-daemon, then on vdiskd: every reply must be QSD's (success or error class and
    text); query-named-block-nodes is compared by each named node's dirty-bitmaps,
    query-block-exports by the export ids."""
    (tmp / "q").mkdir()
    (tmp / "v").mkdir()
    _, q = _replies(tmp / "q", start_qsd, steps_fn)
    steps, v = _replies(tmp / "v", start_vdiskd, steps_fn)
    for (cmd, args), rq, rv in zip(steps, q, v):
        if cmd == "query-named-block-nodes":
            assert _node_bitmaps(rv) == _node_bitmaps(rq)
        elif cmd == "query-block-exports":
            assert sorted(e["id"] for e in rv["return"]) == sorted(e["id"] for e in rq["return"])
        else:
            assert rv == rq, (cmd, args, rv, rq)
