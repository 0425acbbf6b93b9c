"""`vdisk convert --salvage` against qemu-img 7.2's on sources that fail reads in chosen places:
blkdebug inject-error rules on chosen sectors (under raw and under qcow2), and an nbdkit sh plugin
whose reads and block-status answers fail at chosen offsets. The unreadable sectors become zeroes
with qemu-img's warnings (offset in that source, errno text), the exit code and the output image
are qemu-img's; without --salvage the same source fails as qemu-img's convert.
"""
import json
import os
import subprocess
import time

import pytest

from conftest import VDISK, qemu_img, qemu_io_cmds, run, sha256

MiB = 1 << 20


def blkdebug(fmt, image, rules):
    """A json: name of fmt over blkdebug over file `image`: rules are (sector, errno)."""
    return "json:" + json.dumps({"driver": fmt, "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": str(image)},
        "inject-error": [{"event": "read_aio", "errno": e, "sector": s} for s, e in rules]}})


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    """in.raw: 4 MiB of 0x11 with 0x22 from 1 MiB; q.qcow2: data at 64k..256k and 2M..2M+64k."""
    d = tmp_path_factory.mktemp("salvage")
    with open(d / "in.raw", "wb") as f:
        f.write(b"\x11" * MiB + b"\x22" * (3 * MiB))
    qemu_img("create", "-q", "-f", "qcow2", d / "q.qcow2", 4 * MiB)
    qemu_io_cmds(d / "q.qcow2", ["write -P 0x33 64k 192k", "write -P 0x44 2M 64k"])
    mp = json.loads(qemu_img("map", "--output=json", d / "q.qcow2").stdout)
    host = [e["offset"] for e in mp if e["data"]]
    # host sectors inside the first data extent: one alone, and 8 in a row (a whole 4 KiB run)
    s0 = host[0] // 512
    return {
        "raw": blkdebug("raw", d / "in.raw", [(3, 5), (2048 + 7, 5), (8000, 28)]
                        + [(16 + i, 5) for i in range(8)]),
        "qcow2": blkdebug("qcow2", d / "q.qcow2", [(s0 + 300, 5)]
                          + [(s0 + 64 + i, 61) for i in range(8)]),
        "concat": None,  # both of the above, one after the other
    }


CASES = [("raw", "raw", []), ("raw", "qcow2", []), ("qcow2", "raw", []),
         ("qcow2", "qcow2", ["-q"]), ("concat", "qcow2", [])]


@pytest.mark.parametrize("src,fmt,opts", CASES, ids=["-".join([a, b, *c]) for a, b, c in CASES])
def test_salvage_as_qemu_img(srcs, tmp, src, fmt, opts):
    """Same warnings (offsets in each source, errno texts; none with -q), exit 0, and an output
    that reads and maps as qemu-img's: unreadable sectors are zeroes, a whole zero 4 KiB run
    stays unallocated in a qcow2 target."""
    names = [srcs["raw"], srcs["qcow2"]] if src == "concat" else [srcs[src]]
    q, v = tmp / f"q.{fmt}", tmp / f"v.{fmt}"
    args = ["convert", "-m", "1", "--salvage", "-O", fmt, *opts, *names]
    pq = qemu_img(*args, q)
    pv = run([VDISK, *args, v])
    assert pv.stderr.replace("vdisk", "qemu-img") == pq.stderr
    lines = pq.stderr.splitlines()
    assert all(ln.startswith("qemu-img: warning: error while reading offset ") for ln in lines)
    assert len(lines) == (0 if opts else {"raw": 11, "qcow2": 9, "concat": 20}[src])
    assert qemu_img("compare", "-f", fmt, "-F", fmt, q, v).stdout == "Images are identical.\n"
    if fmt == "raw":
        assert sha256(q) == sha256(v)
    else:
        maps = [qemu_img("map", "--output=json", p).stdout for p in (q, v)]
        assert [[(e["start"], e["length"], e["data"]) for e in json.loads(m)] for m in maps][0] \
            == [[(e["start"], e["length"], e["data"]) for e in json.loads(m)] for m in maps][1]


def test_without_salvage_the_same_source_fails_as_qemu_img(srcs, tmp):
    args = ["convert", "-m", "1", "-O", "raw", srcs["qcow2"]]
    pq = qemu_img(*args, tmp / "q.raw", check=False)
    pv = run([VDISK, *args, tmp / "v.raw"], check=False)
    assert pq.returncode == 1
    assert (pv.returncode, pv.stderr.replace("vdisk", "qemu-img")) == (pq.returncode, pq.stderr)
    assert pq.stderr == "qemu-img: error while reading at byte 65536: Input/output error\n"


# A 16 KiB NBD source whose reads fail where they cover byte 12000 and whose block-status
# answers fail where they cover byte 6000 (nbdkit's sh plugin, one shell per request).
SCRIPT = r"""#!/bin/bash
case "$1" in
  get_size) echo 16384 ;;
  can_extents) exit 0 ;;
  can_write) exit 3 ;;
  pread) if [ "$4" -le 12000 ] && [ $(( $4 + $3 )) -gt 12000 ]; then
           echo "EIO bad read" >&2; exit 1; fi
         head -c "$3" /dev/zero | tr '\0' '\042' ;;
  extents) if [ "$4" -le 6000 ] && [ $(( $4 + $3 )) -gt 6000 ]; then
             echo "EIO bad extents" >&2; exit 1; fi
           echo "$4 $3 0" ;;
  *) exit 2 ;;
esac
"""


def test_salvage_block_status_and_read_errors_over_nbd(tmp):
    """A failing block-status query is retried on a quarter of the range down to one sector,
    which is then read as data, with qemu-img's warning; qemu-img prints that warning twice (its
    first pass over the image counts allocated sectors for -p), vdisk once, and twice as well
    under -p (README's deliberate differences). Output as qemu-img's."""
    script = tmp / "plugin.sh"
    script.write_text(SCRIPT)
    os.chmod(script, 0o755)
    sock = tmp / "nbd.sock"
    srv = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "sh", str(script)],
                           stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        args = ["convert", "-m", "1", "--salvage", "-f", "raw", "-O", "raw", uri]
        pq = qemu_img(*args, tmp / "q.raw")
        pv = run([VDISK, *args, tmp / "v.raw"])
        status = "warning: error while reading block status at offset 5632: Input/output error"
        read = "warning: error while reading offset 11776: Input/output error"
        assert pq.stderr == f"qemu-img: {status}\n" * 2 + f"qemu-img: {read}\n"
        assert pv.stderr == f"vdisk: {status}\nvdisk: {read}\n"
        assert sha256(tmp / "q.raw") == sha256(tmp / "v.raw")
        pq = qemu_img("convert", "-p", *args[1:], tmp / "q2.raw")
        pv = run([VDISK, "convert", "-p", *args[1:], tmp / "v2.raw"])
        assert pq.stderr == f"qemu-img: {status}\n" * 2 + f"qemu-img: {read}\n"
        assert (pv.stdout, pv.stderr.replace("vdisk: ", "qemu-img: ")) == (pq.stdout, pq.stderr)
        data = (tmp / "v.raw").read_bytes()
        assert data[11776:12288] == bytes(512) and data.count(0) == 512
        pv = run([VDISK, "convert", "-m", "1", "-f", "raw", "-O", "raw", uri, tmp / "x.raw"],
                 check=False)
        assert (pv.returncode, pv.stderr) == (
            1, "vdisk: error while reading block status at offset 0: Input/output error\n")
    finally:
        srv.terminate()
        srv.wait()
