"""qemu:dirty-bitmap:NAME over NBD: vdiskd exports bitmaps (--export bitmaps.N=, block-export-add
`bitmaps`, nbd-server-add `bitmap`) and serves them as qemu-nbd / qemu-storage-daemon do. The
oracles: QEMU's servers on the same image (nbdinfo --list/--map, qemu-img map with
x-dirty-bitmap, raw LIST/SET_META_CONTEXT and BLOCK_STATUS), qemu-storage-daemon's QMP replies,
and a model of the granules live NBD writers dirtied.
"""
import json
import os
import random
import struct
import subprocess

import bitmap_helpers as B
import nbd_helpers as H
from conftest import qemu_img, qemu_io_cmds, run, wait_unix_listening
from qmp_client import file_node, fmt_node, start_vdiskd

MiB = 1 << 20
SIZE = 24 * MiB


def bitmap_image(tmp):
    """img.qcow2 with bitmaps QEMU made and dirtied: b0 (64k), fine (512 B), off (disabled, 1M)."""
    path = str(tmp / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, SIZE)
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "512", path, "fine")
    qemu_img("bitmap", "--add", "-g", "1M", path, "off")
    qemu_io_cmds(path, ["write -P 1 0 1k", f"write -P 2 {3 * MiB + 700} 70k",
                        f"write -P 3 {9 * MiB} 2M"])
    qemu_img("bitmap", "--disable", path, "off")
    qemu_io_cmds(path, [f"write -P 4 {20 * MiB} 4k", f"write -z {22 * MiB} 8k"])
    return path


def start_vdiskd_export(tmp, path, bitmaps):
    """vdiskd exporting path read-only (node too) with bitmaps.N=... for each bitmap."""
    return H.start_daemon(tmp, path, "qcow2", writable=False, read_only_node=True,
                          bitmaps=bitmaps)


class QemuNbd:
    """qemu-nbd serving path read-only with -B for each bitmap, on a unix socket (killed by
    close)."""

    def __init__(self, tmp, path, bitmaps):
        self.sock = os.path.join(str(tmp), "qemu-nbd.sock")
        args = ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-x", "exp", "-k", self.sock]
        for b in bitmaps:
            args += ["-B", b]
        self.proc = subprocess.Popen(args + [path], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_unix_listening(self.sock, self.proc)

    def uri(self, name="exp"):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=30)


def nbdinfo_map(uri, ctx):
    return json.loads(run(["nbdinfo", f"--map={ctx}", "--json", uri]).stdout)


def contexts(uri):
    out = run(["nbdinfo", "--list", "--json", uri]).stdout
    return sorted(json.loads(out)["exports"][0]["contexts"])


def qemu_img_map(sock, ctx):
    """qemu-img map through QEMU's NBD client reporting ctx as its allocation (x-dirty-bitmap):
    a dirty range shows as data=false."""
    opts = f"driver=nbd,server.type=unix,server.path={sock},export=exp,x-dirty-bitmap={ctx}"
    return json.loads(qemu_img("map", "--output=json", "--image-opts", opts).stdout)


def test_exported_bitmaps_read_as_from_qemu_nbd(tmp):
    """nbdinfo --list shows the same contexts, --map of every bitmap and of base:allocation and
    qemu-img map with x-dirty-bitmap give the same answers from vdiskd as from qemu-nbd."""
    path = bitmap_image(tmp)
    names = ["b0", "fine", "off"]
    (tmp / "v").mkdir()
    d = start_vdiskd_export(tmp / "v", path, names)
    q = QemuNbd(tmp, path, names)
    try:
        assert contexts(d.uri()) == contexts(q.uri()) == [
            "base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:fine",
            "qemu:dirty-bitmap:off"]
        for ctx in ["base:allocation"] + [f"qemu:dirty-bitmap:{n}" for n in names]:
            got = nbdinfo_map(d.uri(), ctx)
            assert got == nbdinfo_map(q.uri(), ctx), ctx
            if ctx != "base:allocation":
                assert qemu_img_map(d.sock, ctx) == qemu_img_map(q.sock, ctx), ctx
        # the model: b0 has the granules of every write, off only of those before --disable
        dirty = B.extents_to_granules(nbdinfo_map(d.uri(), "qemu:dirty-bitmap:b0"), 65536)
        want = set()
        for off, ln in [(0, 1024), (3 * MiB + 700, 70 * 1024), (9 * MiB, 2 * MiB),
                        (20 * MiB, 4096), (22 * MiB, 8192)]:
            want |= B.granules(off, ln, 65536)
        assert dirty == want
        assert B.extents_to_granules(nbdinfo_map(d.uri(), "qemu:dirty-bitmap:off"), MiB) == \
            {0, 3, 9, 10}
    finally:
        q.close()
        assert d.stop() == 0


# ---------------- raw protocol: LIST / SET_META_CONTEXT and BLOCK_STATUS ----------------

def meta_opt(c, opt, queries, name="exp"):
    nm = name.encode()
    data = struct.pack(">I", len(nm)) + nm + struct.pack(">I", len(queries))
    for q in queries:
        data += struct.pack(">I", len(q)) + q.encode()
    c.opt(opt, data)
    reps = c.opt_replies()
    assert reps[-1][0] == H.REP_ACK, reps
    return {d[4:].decode(): struct.unpack(">I", d[:4])[0] for t, d in reps if t == H.REP_META}


def block_status(c, off, length, flags=0, cookie=7):
    """{context id: [(length, flags), ...]} of one BLOCK_STATUS, checking the chunk framing:
    one chunk per context, DONE on the last only."""
    c.request(H.CMD_BS, off, length, cookie, flags)
    out = {}
    while True:
        magic, cflags, typ, ck, ln = struct.unpack(">IHHQI", c.recv(20))
        assert magic == H.STRUCT_MAGIC and ck == cookie
        payload = c.recv(ln)
        assert typ == 5, (typ, payload)
        ctx = struct.unpack(">I", payload[:4])[0]
        assert ctx not in out
        out[ctx] = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, ln, 8)]
        if cflags & 1:
            return out


def session(sock, queries, requests):
    """What one client sees: the LIST answers, the SET answer, then each BLOCK_STATUS by
    context name."""
    c = H.RawClient(sock)
    try:
        c.greet()
        c.opt(H.OPT_STRUCTURED_REPLY)
        assert c.opt_replies()[-1][0] == H.REP_ACK
        lists = {q: sorted(meta_opt(c, H.OPT_LIST_META, [q] if q else []))
                 for q in ["", "base:", "qemu:", "qemu:dirty-bitmap:", "qemu:dirty-bitmap:b0",
                           "qemu:dirty-bitmap:nope", "qemu:allocation-depth", "other:"]}
        ids = meta_opt(c, H.OPT_SET_META, queries)
        c.go("exp", structured=False)
        names = {v: k for k, v in ids.items()}
        status = []
        for off, length, flags in requests:
            st = block_status(c, off, length, flags)
            status.append({names[k]: v for k, v in st.items()})
        return lists, sorted(ids), status
    finally:
        c.close()


def test_meta_context_negotiation_and_block_status_as_qemu_nbd(tmp):
    """LIST with namespaces, SET with several contexts (unknown ones ignored), and BLOCK_STATUS
    (whole disk, unaligned, REQ_ONE) give the same context names and the same extents per
    context as qemu-nbd, one chunk per context."""
    path = bitmap_image(tmp)
    names = ["b0", "fine", "off"]
    (tmp / "v").mkdir()
    d = start_vdiskd_export(tmp / "v", path, names)
    q = QemuNbd(tmp, path, names)
    queries = ["qemu:dirty-bitmap:fine", "nope:x", "base:allocation", "qemu:dirty-bitmap:b0",
               "qemu:dirty-bitmap:"]
    requests = [(0, SIZE, 0), (3 * MiB + 100, 5 * MiB, 0), (3 * MiB + 1000, 200000, H.FLAG_REQ_ONE),
                (SIZE - 4096, 4096, 0)]
    try:
        got = session(d.sock, queries, requests)
        assert got == session(q.sock, queries, requests)
        assert got[1] == ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:fine"]
    finally:
        q.close()
        assert d.stop() == 0


# ---------------- QMP: block-export-add bitmaps / nbd-server-add bitmap ----------------

def qmp_steps(tmp):
    """Two chains: base.qcow2 (bitmap 'deep', disabled) <- top.qcow2 (bitmaps 'live' enabled,
    'frozen' disabled), opened writable as node 'top'; plus a read-only node 'ro'."""
    base, top, ro = tmp / "base.qcow2", tmp / "top.qcow2", tmp / "ro.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_img("bitmap", "--add", "--disable", base, "deep")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_img("bitmap", "--add", top, "live")
    qemu_img("bitmap", "--add", "--disable", top, "frozen")
    qemu_img("create", "-q", "-f", "qcow2", ro, "8M")
    qemu_img("bitmap", "--add", ro, "rolive")
    sock = str(tmp / "nbd.sock")

    def add(id_, **kw):
        return ("block-export-add", {"type": "nbd", "id": id_, "node-name": "top", **kw})
    return [
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": file_node(top)}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ro", "read-only": True,
                          "file": file_node(ro, **{"read-only": True})}),
        add("e1", name="e1", bitmaps=["nope"]),
        add("e1", name="e1", bitmaps=[{"node": "top", "name": "nope"}]),
        add("e1", name="e1", bitmaps=[{"node": "zz", "name": "live"}]),
        add("e1", name="e1", bitmaps=[3]),
        add("e1", name="e1", bitmaps="live"),
        add("e1", name="e1", bitmaps=[{"node": "top"}]),
        add("e1", name="e1", bitmaps=["live"]),                  # read-only export, enabled
        add("e1", name="e1", bitmaps=["frozen"]),                # read-only export, disabled: ok
        add("e2", name="e2", bitmaps=["frozen"]),                # busy
        add("e3", name="e3", writable=True, bitmaps=["live", "deep"]),  # deep: from the backing
        ("block-dirty-bitmap-remove", {"node": "top", "name": "frozen"}),
        ("block-dirty-bitmap-clear", {"node": "top", "name": "live"}),
        ("block-dirty-bitmap-disable", {"node": "top", "name": "live"}),
        ("block-dirty-bitmap-add", {"node": "top", "name": "mem"}),
        ("nbd-server-add", {"device": "top", "name": "legacy", "bitmap": "mem"}),
        ("nbd-server-add", {"device": "top", "name": "legacy2", "bitmap": "frozen"}),
        ("nbd-server-add", {"device": "top", "name": "legacy3", "bitmap": 5}),
        ("block-export-add", {"type": "nbd", "id": "e4", "node-name": "ro",
                              "bitmaps": ["rolive"]}),  # read-only node: an enabled one is fine
        ("query-named-block-nodes", {"flat": True}),
        ("block-export-del", {"id": "e1"}),
        ("block-dirty-bitmap-clear", {"node": "top", "name": "frozen"}),
        ("query-block-exports", {}),
    ]


def test_export_bitmap_commands_match_qsd(tmp):
    """Every reply (and the busy flags in query-named-block-nodes) is qemu-storage-daemon's."""
    B.assert_replies_match_qsd(tmp, qmp_steps)


def test_live_writers_dirty_what_the_export_reports(tmp):
    """A writable export with an enabled bitmap: three qemu-io clients write at once; the
    qemu:dirty-bitmap context then reports exactly the granules they wrote (model), the bitmap
    is busy until the export goes, and at quit QEMU reads the same bits from the image."""
    path = str(tmp / "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, SIZE)
    qemu_img("bitmap", "--add", "-g", "16k", path, "track")
    sock = tmp / "nbd.sock"
    d = start_vdiskd(tmp, "--blockdev", json.dumps(fmt_node("qcow2", "n0", path)),
                     "--nbd-server", f"addr.type=unix,addr.path={sock}",
                     "--export", "type=nbd,id=e0,node-name=n0,name=exp,writable=on,"
                                 "bitmaps.0=track")
    uri = f"nbd+unix:///exp?socket={sock}"
    rng = random.Random(11)
    want = set()
    try:
        procs = []
        for i in range(3):
            args = ["qemu-io", "-f", "raw"]
            for _ in range(30):
                off = rng.randrange(0, SIZE - 1)
                ln = rng.randrange(1, min(90 * 1024, SIZE - off) + 1)
                args += ["-c", f"write -P {i + 1} {off} {ln}" if i else f"write -z {off} {ln}"]
                want |= B.granules(off, ln, 16384)
            procs.append(subprocess.Popen(args + [uri], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        assert B.extents_to_granules(nbdinfo_map(uri, "qemu:dirty-bitmap:track"), 16384) == want
        with d.client() as c:
            err = c.error("block-dirty-bitmap-clear", {"node": "n0", "name": "track"})
            assert "in use by another operation" in err
            c.cmd("block-export-del", id="e0")
            c.cmd("block-dirty-bitmap-disable", node="n0", name="track")
    finally:
        d.stop_checked()
    assert B.qemu_dirty_granules(path, "track", 16384) == want
    assert B.qemu_bitmaps(path) == {"track": (16384, [])}
