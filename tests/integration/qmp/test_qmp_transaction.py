"""QMP transaction: all or nothing, with qemu-storage-daemon as the oracle. Each case runs on
vdiskd and on QSD, each over its own copy of the same images: the replies must be equal, and
so must the state after it (nodes, which node backs which, each node's bitmaps, which image
files exist) - a failing action leaves nothing of the actions before it."""
import os

import pytest

from conftest import qemu_img
from qmp_client import start_qsd, start_vdiskd


def state(c, d):
    """Format nodes with their bitmaps, the node the export serves, the image files."""
    nodes = {n["node-name"]: sorted(b["name"] for b in n.get("dirty-bitmaps", []))
             for n in c.cmd("query-named-block-nodes") if n["drv"] != "file"}
    exports = sorted(e["node-name"] for e in c.cmd("query-block-exports"))
    return nodes, exports, sorted(f for f in os.listdir(d) if f.endswith(".qcow2"))


@pytest.fixture
def pair(tmp):
    out, daemons = [], []
    try:
        for who in ("vd", "qsd"):
            d = os.path.join(str(tmp), who)
            os.makedirs(d)
            for img in ("base.qcow2", "ov.qcow2"):
                qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, img), "1M")
            daemons.append(start_vdiskd(d) if who == "vd" else start_qsd(d))
            c = daemons[-1].client()
            out.append((daemons[-1], c, d))
            for node, img in (("n0", "base.qcow2"), ("ov", "ov.qcow2")):
                c.cmd("blockdev-add", driver="qcow2", node_name=node,
                      file={"driver": "file", "filename": os.path.join(d, img)})
            c.cmd("block-dirty-bitmap-add", node="n0", name="old")
            # a guest's disk: the export holds the chain (QEMU drops an overlay nobody uses)
            c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": f"{d}/nbd.sock"}})
            c.cmd("block-export-add", type="nbd", id="e0", node_name="n0", writable=True)
        yield out
        for daemon, c, d in out:
            c.close()
        daemons[0].stop_checked()
    finally:
        for daemon in daemons:  # also when the setup failed half-way: nothing left running
            daemon.kill()


def both(pair, actions, **extra):
    """The transaction on both daemons: (vdiskd's reply, state), (QSD's reply, state)."""
    res = []
    for daemon, c, d in pair:
        acts = [{"type": t, "data": {k: v.replace("@", d) if isinstance(v, str) else v
                                     for k, v in data.items()}} for t, data in actions]
        r = c.execute("transaction", {"actions": acts, **extra})
        res.append((r, state(c, d)))
    return res


def snap(name, node="n0"):
    return ("blockdev-snapshot-sync", {"node-name": node, "snapshot-file": f"@/{name}.qcow2",
                                       "snapshot-node-name": name, "format": "qcow2"})


CASES = {
    # the last action fails: the bitmap added and the overlay opened before it are undone
    "fails-last": [("block-dirty-bitmap-add", {"node": "n0", "name": "b1"}), snap("s1"),
                   ("block-dirty-bitmap-clear", {"node": "n0", "name": "nope"})],
    "abort-action": [("block-dirty-bitmap-clear", {"node": "n0", "name": "old"}),
                     ("block-dirty-bitmap-add", {"node": "n0", "name": "b1"}), ("abort", {})],
    "duplicate-bitmap": [("block-dirty-bitmap-add", {"node": "n0", "name": "b1"}),
                         ("block-dirty-bitmap-add", {"node": "n0", "name": "b1"})],
    "busy-overlay": [snap("s1"), ("blockdev-snapshot", {"node": "n0", "overlay": "nx"})],
    "all-succeed": [("block-dirty-bitmap-add", {"node": "n0", "name": "b1"}),
                    ("block-dirty-bitmap-clear", {"node": "n0", "name": "old"}), snap("s1")],
    "blockdev-snapshot": [("blockdev-snapshot", {"node": "n0", "overlay": "ov"}),
                          ("block-dirty-bitmap-add", {"node": "ov", "name": "b2"})],
    "empty": [],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transaction_as_qsd(pair, case):
    (mine, my_state), (theirs, their_state) = both(pair, CASES[case])
    assert mine == theirs, (mine, theirs)
    assert my_state == their_state
    if "error" in mine:  # nothing changed: the fixture's two nodes, its bitmap, the export
        assert my_state[:2] == ({"n0": ["old"], "ov": []}, ["n0"]), my_state


BAD = [
    {"actions": 5},
    {},
    {"actions": [5]},
    {"actions": [{"data": {}}]},
    {"actions": [{"type": "nope", "data": {}}]},
    {"actions": [{"type": "abort"}]},
    {"actions": [{"type": "abort", "data": 5}]},
    {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": 5, "name": "b"}}]},
    {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "n0"}}]},
    {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "b",
                                                             "x": 1}}]},
    {"actions": [{"type": "blockdev-snapshot-sync", "data": {"node-name": "n0"}}]},
    {"actions": [{"type": "abort", "data": {}}], "properties": {"completion-mode": "all"}},
    {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "b"}}],
     "properties": {"completion-mode": "grouped"}},
    {"actions": [], "x": 1},
]


def test_bad_arguments_as_qsd(pair):
    for args in BAD:
        replies = [c.execute("transaction", args) for daemon, c, d in pair]
        assert replies[0] == replies[1], (args, replies)
        assert state(pair[0][1], pair[0][2]) == state(pair[1][1], pair[1][2])
