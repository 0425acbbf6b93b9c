"""Write-zeroes leaves a qcow2 image with the allocation QEMU's leaves, not only its content.

The same zero requests go through qemu-io on one copy of an image and through `vdisk io` on the
other; `qemu-img map` (present / zero / data, and whether a host offset is kept) must then be the
same. Each scenario (a state a cluster is in, times a zero request) gets its own clusters of one
image, so a whole matrix costs one qemu-io and one vdisk process per image kind: extended L2 on
and off, v2 (no zero flag), each with and without a backing file (which holds data, zero
clusters, zero bytes stored as data, or nothing, and ends halfway through the overlay). Half of
the scenarios are set up before an internal snapshot, so their clusters are shared with it.

What QEMU does and vdisk once did differently (same content either way):
- a zero request over what already reads zeroes is marked zero (map's "present"), not left alone;
- a partial one over an unallocated subcluster (cluster) whose backing file reads zeroes there
  sets the zero bit (flag) instead of writing zeroes;
- zeroing a whole cluster shared with a snapshot keeps its host cluster (zero flag on the shared
  entry) unless the request may unmap;
- a partial request is cut at subcluster (cluster) boundaries and each piece decided on its
  own: zeroes written into a compressed cluster make it a normal one, whose whole subclusters
  the rest of the request then zeroes in metadata;
- a v2 image without a backing file drops whole clusters even without unmap;
- (data writes) with extended L2 a partial write into a cluster shared with a snapshot copies
  from its first allocated subcluster to its last, not the whole cluster; a write from a
  compressed cluster into an empty one allocates only the touched subclusters of the second;
  the rest of a new cluster is zeroed in the file (not written) only where no layer of the
  chain allocates it (a zero cluster, or a backing file holding it or ending before it, gets
  its zeroes written).
"""
import itertools
import json
import re

import pytest

from conftest import VDISK, assert_qemu_check_clean, qemu_img, qemu_io, run

CS = 65536
PRE = {  # the state of the scenario's first cluster before the zero request
    "unallocated": [],
    "data": ["write -P 5 {c} 64k"],
    "one subcluster": ["write -P 5 {c+6144} 2048"],
    "zeroed data": ["write -P 5 {c} 64k", "write -z {c} 64k"],
    "zero": ["write -z {c} 64k"],
    "data, zeroed inside": ["write -P 5 {c} 64k", "write -z {c+4096} 8192"],
    "compressed": ["write -c -P 6 {c} 64k"],
}
OPS = {  # the zero request, relative to the scenario's first cluster
    "whole cluster": "write -z {c} 64k",
    "whole cluster, unmap": "write -z -u {c} 64k",
    "inside a subcluster": "write -z {c+1024} 512",
    "whole subclusters": "write -z {c+4096} 8192",
    "across subclusters": "write -z {c+1000} 5000",
    "to a subcluster's end": "write -z {c+6656} 1536",
    "across clusters": "write -z {c+60000} 10000",
    "over two clusters": "write -z {c+1000} 140000",
    # data writes: copy-on-write of compressed and shared clusters, and what it zeroes
    "data inside a subcluster": "write -P 7 {c+1024} 512",
    "data across clusters": "write -P 7 {c+60000} 10000",
    "data over two clusters": "write -P 7 {c+1000} 140000",
}
SPAN = 3 * CS  # clusters per scenario: the request may reach into the next two


def expand(cmd, c):
    return re.sub(r"\{([^}]*)\}", lambda m: str(eval(m.group(1), {"c": c})), cmd)


def c_args(cmds):
    return [a for c in cmds for a in ("-c", c)]


def layout(m, start, end):
    """The map entries over [start, end), relative to start, host offsets reduced to 'has one'."""
    out = []
    for e in m:
        a, b = max(e["start"], start), min(e["start"] + e["length"], end)
        if a < b:
            k = (e["depth"], e["present"], e["zero"], e["data"], "offset" in e)
            if out and out[-1][2] == k and out[-1][1] == a - start:
                out[-1] = (out[-1][0], b - start, k)
            else:
                out.append((a - start, b - start, k))
    return out


@pytest.mark.parametrize("opts", ["extended_l2=on", "extended_l2=off", "compat=0.10"])
@pytest.mark.parametrize("backing", [False, True], ids=["no backing", "backing"])
def test_zero_requests_allocate_as_qemu(tmp, opts, backing):
    scen = [(pre, op, i * SPAN) for i, (pre, op) in enumerate(itertools.product(PRE, OPS))]
    size = len(scen) * SPAN
    back = []
    if backing:
        base = tmp / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, size // 2)
        kinds = ["write -P 9 {c} 64k", "write -z {c} 64k", "write -P 0 {c} 64k", None]
        cmds = [expand(kinds[(c // CS) % 4], c) for c in range(0, size // 2, CS)
                if kinds[(c // CS) % 4]]
        qemu_io("-f", "qcow2", *c_args(cmds), base)
        back = ["-b", base, "-F", "qcow2"]
    q, v = tmp / "q.qcow2", tmp / "v.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, *back, q, size)
    # odd scenarios are set up before the snapshot (their clusters shared with it), even after
    shared = [expand(t, c) for n, (pre, _, c) in enumerate(scen) if n % 2 for t in PRE[pre]]
    own = [expand(t, c) for n, (pre, _, c) in enumerate(scen) if not n % 2 for t in PRE[pre]]
    qemu_io("-f", "qcow2", *c_args(shared), q)
    qemu_img("snapshot", "-c", "s1", q)
    qemu_io("-f", "qcow2", *c_args(own), q)
    run(["cp", "--sparse=never", str(q), str(v)])  # no holes where qemu-io's image has none
    ops = [expand(OPS[op], c) for _, op, c in scen]
    qemu_io("-f", "qcow2", *c_args(ops), q)
    run([VDISK, "io", "-f", "qcow2", *c_args(ops), str(v)])

    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", v, q, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_qemu_check_clean(str(v))
    qm, vm = (json.loads(qemu_img("map", "--output=json", "-f", "qcow2", i).stdout)
              for i in (q, v))
    differ = [(pre, op, "shared" if n % 2 else "own", layout(qm, c, c + SPAN),
               layout(vm, c, c + SPAN))
              for n, (pre, op, c) in enumerate(scen)
              if layout(qm, c, c + SPAN) != layout(vm, c, c + SPAN)]
    assert not differ, "\n".join(f"{d[:3]}:\n  qemu  {d[3]}\n  vdisk {d[4]}" for d in differ)


@pytest.mark.parametrize("opts", ["extended_l2=on", "extended_l2=off"])
def test_cow_areas_zeroed_only_together(tmp, opts):
    """A write allocating two clusters of an overlay, whose head copy-on-write area comes from
    data in the backing file and whose tail's reads zeroes (nothing below): QEMU zeroes the new
    clusters' untouched parts in the file only when both areas read zeroes, so here it writes
    the tail's zeroes out too; map must say the same of vdisk's image."""
    base, q, v = tmp / "b.qcow2", tmp / "q.qcow2", tmp / "v.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, base, 4 * CS)
    qemu_io("-f", "qcow2", "-c", "write -P 3 64k 64k", base)
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", base, "-F", "qcow2", q, 4 * CS)
    run(["cp", "--sparse=never", str(q), str(v)])
    op = "write -P 11 91648 67584"  # from inside cluster 1 into cluster 2
    qemu_io("-f", "qcow2", "-c", op, q)
    run([VDISK, "io", "-f", "qcow2", "-c", op, str(v)])
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", v, q, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    qm, vm = (layout(json.loads(qemu_img("map", "--output=json", "-f", "qcow2", i).stdout),
                     0, 4 * CS) for i in (q, v))
    assert vm == qm


def test_cow_zero_check_asks_the_areas_only(tmp):
    """QEMU's is_zero_cow asks whether the copy-on-write areas (the parts of the new cluster the
    write leaves) are unallocated below, not the whole cluster: over a 4 KiB-cluster backing
    file holding data only where the write lands, the rest of the new cluster is zeroed in the
    file, not written. The file's own map (qemu-img map -f raw) then matches qemu-io's, up to
    vdisk's end of file (where vdisk leaves a new cluster's unwritten tail a hole: zeroes)."""
    base = tmp / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, 4 * CS)
    qemu_io("-f", "qcow2", "-c", "write -P 1 4k 4k", "-c", "write -P 1 136k 4k", base)
    q, v = tmp / "q.qcow2", tmp / "v.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", q, 4 * CS)
    run(["cp", "--sparse=never", str(q), str(v)])
    before = v.stat().st_size
    ops = ["write -P 2 0 12k", "write -P 3 132k 8k", "write -P 4 200k 4k"]
    qemu_io("-f", "qcow2", *c_args(ops), q)
    run([VDISK, "io", "-f", "qcow2", *c_args(ops), str(v)])
    # The file maps first: a read caches pages, and ext4 then calls QEMU's zeroed (unwritten)
    # ranges data.
    vend = v.stat().st_size
    qf, vf = (layout(json.loads(qemu_img("map", "--output=json", "-f", "raw", i).stdout),
                     0, vend) for i in (q, v))
    assert vf == qf
    assert any(e[2][2] and e[0] >= before for e in vf), vf  # zeroed, not written, parts
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", v, q, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_qemu_check_clean(str(v))
