"""qcow2 external data files (data_file, data_file_raw) against qemu-img / qemu-io 7.2.

Each test runs the same commands through vdisk and through QEMU's tools in two directories with
the same file names (QEMU resolves a relative data file name against the working directory, vdisk
against the image's directory; run from inside the directory both agree), then compares the
image files and the data files byte for byte, and reads each tool's result with the other."""
import os

import pytest

from conftest import (GuestModel, io_cmds, qemu_img, qemu_io, qemu_io_cmds, run, sha256, vdisk,
                      vdisk_io, VDISK)
from qmp_client import file_node

MiB = 1 << 20

OPS = [("write", 0, 100 << 10, 0x33), ("write", 3 * MiB, MiB, 0x44),
       ("zero", 64 << 10, 64 << 10), ("discard", 3 * MiB, 128 << 10),
       ("write", 2 * MiB + 512, 4096, 0x55)]
IO_CMDS = io_cmds(OPS) + ["write -z -u 1M 128k"]


def in_dir(d, *cmd, check=True):
    """Run a command with d as the working directory (relative data file names)."""
    return run_cwd(d, [str(c) for c in cmd], check)


def run_cwd(d, cmd, check):
    return run(cmd, check=check, cwd=str(d))


def io_args(cmds):
    out = []
    for c in cmds:
        out += ["-c", c]
    return out


def both(tmp, vd_cmd, q_cmd):
    """(vdisk dir, qemu dir): the same command through each tool, each in its own directory."""
    v, q = tmp / "v", tmp / "q"
    v.mkdir(exist_ok=True)
    q.mkdir(exist_ok=True)
    in_dir(v, VDISK, *vd_cmd)
    in_dir(q, *q_cmd)
    return v, q


def assert_same_files(v, q, *names):
    for n in names:
        assert (v / n).read_bytes() == (q / n).read_bytes(), f"{n} differs from qemu's"


@pytest.mark.parametrize("opts", ["data_file=d.raw", "data_file=d.raw,data_file_raw=on",
                                  "data_file=d.raw,preallocation=metadata",
                                  "data_file=d.raw,lazy_refcounts=on"])
def test_create_is_byte_identical_to_qemu_img(tmp, opts):
    v, q = both(tmp, ["create", "-f", "qcow2", "-o", opts, "a.qcow2", "4M"],
                ["qemu-img", "create", "-f", "qcow2", "-o", opts, "a.qcow2", "4M"])
    assert_same_files(v, q, "a.qcow2", "d.raw")
    out = in_dir(v, VDISK, "create", "-f", "qcow2", "-o", opts, "b.qcow2", "4M").stdout
    qout = in_dir(q, "qemu-img", "create", "-f", "qcow2", "-o", opts, "b.qcow2", "4M").stdout
    assert out == qout  # the "Formatting ..." line


@pytest.mark.parametrize("raw", ["off", "on"])
def test_writes_match_qemu_io_byte_for_byte(tmp, raw):
    opts = f"data_file=d.raw,data_file_raw={raw}"
    v, q = both(tmp, ["create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", "4M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", "4M"])
    in_dir(v, VDISK, "io", *io_args(IO_CMDS), "a.qcow2")
    in_dir(q, "qemu-io", *io_args(IO_CMDS), "a.qcow2")
    assert_same_files(v, q, "a.qcow2", "d.raw")
    # each tool reads the other's image as the model says
    model = GuestModel(4 * MiB)
    model.apply_all(OPS)
    model.apply(("zero", MiB, 128 << 10))
    for d in (v, q):
        in_dir(d, "qemu-img", "convert", "-O", "raw", "a.qcow2", "q.raw")
        in_dir(d, VDISK, "convert", "-O", "raw", "a.qcow2", "v.raw")
        assert (d / "q.raw").read_bytes() == bytes(model.data)
        assert (d / "v.raw").read_bytes() == bytes(model.data)
    if raw == "on":
        # a raw data file is the guest's disk by itself
        assert (v / "d.raw").read_bytes() == bytes(model.data)


def test_qemu_written_image_reads_and_maps_the_same_in_vdisk(tmp):
    q = tmp / "q"
    q.mkdir()
    in_dir(q, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "4M")
    in_dir(q, "qemu-io", *io_args(IO_CMDS), "a.qcow2")
    for out in ("json", "human"):
        assert in_dir(q, VDISK, "map", f"--output={out}", "a.qcow2").stdout == \
            in_dir(q, "qemu-img", "map", f"--output={out}", "a.qcow2").stdout
    for out in ("json", "human"):
        assert in_dir(q, VDISK, "check", f"--output={out}", "a.qcow2").stdout == \
            in_dir(q, "qemu-img", "check", f"--output={out}", "a.qcow2").stdout
    vinfo = in_dir(q, VDISK, "info", "a.qcow2").stdout
    qinfo = in_dir(q, "qemu-img", "info", "a.qcow2").stdout
    spec = lambda s: s[s.index("Format specific information:"):]
    assert spec(vinfo) == spec(qinfo)
    assert "    data file: d.raw\n    data file raw: false\n" in vinfo


def test_info_json_has_data_file_members_as_qemu(tmp):
    v, q = both(tmp, ["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on",
                      "a.qcow2", "1M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                 "data_file=d.raw,data_file_raw=on", "a.qcow2", "1M"])
    import json
    vs = json.loads(in_dir(v, VDISK, "info", "--output=json", "a.qcow2").stdout)["format-specific"]
    qs = json.loads(in_dir(q, "qemu-img", "info", "--output=json", "a.qcow2").stdout)[
        "format-specific"]
    assert vs == qs
    assert list(vs["data"]) == list(qs["data"])  # qemu-img's member order
    assert vs["data"]["data-file"] == "d.raw" and vs["data"]["data-file-raw"] is True


@pytest.mark.parametrize("raw", ["off", "on"])
def test_convert_to_data_file_image_matches_qemu(tmp, raw):
    src = tmp / "src.raw"
    src.write_bytes(os.urandom(3 * MiB) + bytes(MiB))
    opts = f"data_file=d.raw,data_file_raw={raw}"
    v, q = both(tmp, ["convert", "-O", "qcow2", "-o", opts, str(src), "a.qcow2"],
                ["qemu-img", "convert", "-O", "qcow2", "-o", opts, str(src), "a.qcow2"])
    assert_same_files(v, q, "a.qcow2", "d.raw")
    in_dir(v, "qemu-img", "compare", "a.qcow2", str(src))
    in_dir(q, VDISK, "compare", "a.qcow2", str(src))
    assert in_dir(v, VDISK, "check", "a.qcow2").stdout == \
        in_dir(q, "qemu-img", "check", "a.qcow2").stdout


def test_resize_grows_and_shrinks_the_data_file_as_qemu(tmp):
    v, q = tmp / "v", tmp / "q"
    v.mkdir()
    q.mkdir()
    steps = [["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M"],
             ["create", "-q", "-f", "qcow2", "-o", "data_file=e.raw,data_file_raw=on",
              "b.qcow2", "1M"],
             ["resize", "--shrink", "a.qcow2", "512k"], ["resize", "a.qcow2", "1M"],
             ["resize", "--preallocation=falloc", "a.qcow2", "2M"],
             ["resize", "--shrink", "b.qcow2", "512k"], ["resize", "b.qcow2", "3M"]]
    for d, img, io in ((v, [VDISK], [VDISK, "io"]), (q, ["qemu-img"], ["qemu-io"])):
        for i, step in enumerate(steps):
            in_dir(d, *img, *step)
            if i == 1:
                in_dir(d, *io, "-c", "write -P 1 0 1M", "a.qcow2")
                in_dir(d, *io, "-c", "write -P 2 0 1M", "b.qcow2")
    assert_same_files(v, q, "a.qcow2", "b.qcow2", "d.raw", "e.raw")
    assert os.path.getsize(v / "e.raw") == 3 * MiB
    assert in_dir(v, VDISK, "map", "--output=json", "b.qcow2").stdout == \
        in_dir(q, "qemu-img", "map", "--output=json", "b.qcow2").stdout


def test_amend_data_file_and_raw_bit_as_qemu(tmp):
    v, q = both(tmp, ["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on",
                      "a.qcow2", "1M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                 "data_file=d.raw,data_file_raw=on", "a.qcow2", "1M"])
    for opt in ("data_file_raw=on", "data_file=e.raw", "data_file_raw=off"):
        in_dir(v, VDISK, "amend", "-o", opt, "a.qcow2")
        in_dir(q, "qemu-img", "amend", "-o", opt, "a.qcow2")
        assert_same_files(v, q, "a.qcow2")
        if opt == "data_file=e.raw":
            os.rename(v / "d.raw", v / "e.raw")
            os.rename(q / "d.raw", q / "e.raw")
    # refused the same way, image unchanged
    for opt in ("data_file_raw=on",):
        before = sha256(v / "a.qcow2")
        pv = in_dir(v, VDISK, "amend", "-o", opt, "a.qcow2", check=False)
        pq = in_dir(q, "qemu-img", "amend", "-o", opt, "a.qcow2", check=False)
        assert (pv.returncode, pv.stderr.replace("vdisk:", "qemu-img:")) == \
            (pq.returncode, pq.stderr)
        assert sha256(v / "a.qcow2") == before
    in_dir(v, VDISK, "amend", "-o", "data_file=", "a.qcow2")
    in_dir(q, "qemu-img", "amend", "-o", "data_file=", "a.qcow2")
    assert_same_files(v, q, "a.qcow2")
    # without a recorded name the image opens only with a data-file option
    opts = '{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"},' \
           '"data-file":{"driver":"file","filename":"e.raw"}}'
    in_dir(v, VDISK, "io", "-c", "read 0 64k", "json:" + opts)
    p = in_dir(v, VDISK, "io", "-c", "read 0 64k", "a.qcow2", check=False)
    assert p.returncode != 0 and "'data-file' is required for this image" in p.stderr


def test_amend_data_file_on_plain_image_is_refused_as_qemu(tmp):
    v, q = both(tmp, ["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "1M"])
    for opt in ("data_file=x.raw", "data_file_raw=on"):
        pv = in_dir(v, VDISK, "amend", "-o", opt, "a.qcow2", check=False)
        pq = in_dir(q, "qemu-img", "amend", "-o", opt, "a.qcow2", check=False)
        assert (pv.returncode, pv.stderr.replace("vdisk:", "qemu-img:")) == \
            (pq.returncode, pq.stderr)
    assert_same_files(v, q, "a.qcow2")


@pytest.mark.parametrize("opts,extra", [
    ("data_file_raw=on", []),
    ("data_file=d.raw,compat=0.10", []),
    ("data_file=d.raw,data_file_raw=on,backing_file=b.qcow2,backing_fmt=qcow2", []),
])
def test_create_refusals_match_qemu_img(tmp, opts, extra):
    v, q = tmp / "v", tmp / "q"
    for d in (v, q):
        d.mkdir()
        in_dir(d, "qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "1M")
    pv = in_dir(v, VDISK, "create", "-f", "qcow2", "-o", opts, "a.qcow2", "1M", check=False)
    pq = in_dir(q, "qemu-img", "create", "-f", "qcow2", "-o", opts, "a.qcow2", "1M", check=False)
    assert pv.returncode == pq.returncode == 1
    assert pv.stderr.replace("vdisk:", "qemu-img:") == pq.stderr
    assert not (v / "d.raw").exists()


def test_snapshot_and_compression_are_refused_as_qemu(tmp):
    v, q = both(tmp, ["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2",
                 "1M"])
    before = sha256(v / "a.qcow2")
    pv = in_dir(v, VDISK, "snapshot", "-c", "s1", "a.qcow2", check=False)
    pq = in_dir(q, "qemu-img", "snapshot", "-c", "s1", "a.qcow2", check=False)
    assert (pv.returncode, pv.stderr.replace("vdisk:", "qemu-img:")) == (pq.returncode, pq.stderr)
    assert sha256(v / "a.qcow2") == before
    (tmp / "s.raw").write_bytes(b"\x07" * MiB)
    cmd = ["convert", "-c", "-O", "qcow2", "-o", "data_file=c.raw", str(tmp / "s.raw"), "c.qcow2"]
    pv = in_dir(v, VDISK, *cmd, check=False)
    pq = in_dir(q, "qemu-img", *cmd, check=False)
    assert (pv.returncode, pv.stderr.replace("vdisk:", "qemu-img:")) == (pq.returncode, pq.stderr)


def test_missing_data_file_fails_open_but_not_info(tmp):
    v, q = both(tmp, ["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2",
                 "1M"])
    os.unlink(v / "d.raw")
    os.unlink(q / "d.raw")
    pv = in_dir(v, VDISK, "io", "-c", "read 0 512", "a.qcow2", check=False)
    pq = in_dir(q, "qemu-img", "map", "a.qcow2", check=False)
    assert pv.returncode == pq.returncode == 1
    assert "Could not open 'a.qcow2': Could not open 'd.raw': No such file or directory" \
        in pv.stderr
    assert "Could not open 'a.qcow2': Could not open 'd.raw': No such file or directory" \
        in pq.stderr
    assert in_dir(v, VDISK, "info", "a.qcow2").stdout.endswith(
        in_dir(q, "qemu-img", "info", "a.qcow2").stdout.split("cluster_size:")[1])


def test_relative_data_file_resolves_against_the_image_directory(tmp):
    """A deliberate difference (README): vdisk finds d.raw next to the image from any working
    directory, where qemu-img 7.2 looks in its working directory."""
    d = tmp / "img"
    d.mkdir()
    in_dir(d, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M")
    in_dir(d, "qemu-io", "-c", "write -P 9 0 64k", "a.qcow2")
    vdisk_io(d / "a.qcow2", ["read -P 9 0 64k", "write -P 8 64k 64k"])
    in_dir(d, "qemu-io", "-c", "read -P 8 64k 64k", "a.qcow2")
    p = qemu_io("-c", "read 0 512", d / "a.qcow2", check=False)
    assert p.returncode != 0  # qemu-io from another directory does not find it
    # and create puts the data file next to the image
    vdisk("create", "-q", "-f", "qcow2", "-o", "data_file=n.raw", d / "n.qcow2", "1M")
    assert (d / "n.raw").exists()


def test_vdiskd_serves_a_data_file_image_like_qsd(tmp, vd, qsd):
    """blockdev-add with a data-file child, exported over NBD: qemu-io writes through vdiskd and
    through qemu-storage-daemon, and the two image/data file pairs come out identical."""
    v, q = both(tmp, ["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "4M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2",
                 "4M"])
    busy = []
    for d, dir_ in ((vd, v), (qsd, q)):
        with d.client() as c:
            # discard=unmap: QEMU ignores discards on a node without it
            c.cmd("blockdev-add", **file_node(dir_ / "a.qcow2", "f0", discard="unmap"))
            c.cmd("blockdev-add", **file_node(dir_ / "d.raw", "d0", discard="unmap"))
            c.cmd("blockdev-add", driver="qcow2", **{"node-name": "n0", "file": "f0",
                                                      "data-file": "d0", "discard": "unmap"})
            sock = str(dir_ / "nbd.sock")
            c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
            c.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "n0",
                                                               "writable": True})
            qemu_io("-f", "raw", *io_args(IO_CMDS), f"nbd+unix:///n0?socket={sock}")
            c.cmd("block-export-del", id="e0")
            c.cmd("nbd-server-stop")
            # the data file is n0's child: not deleted under it
            busy.append(c.error("blockdev-del", {"node-name": "d0"}))
            c.cmd("blockdev-del", **{"node-name": "n0"})
            c.cmd("blockdev-del", **{"node-name": "d0"})
            c.cmd("blockdev-del", **{"node-name": "f0"})
    assert_same_files(v, q, "a.qcow2", "d.raw")
    assert in_dir(v, "qemu-img", "check", "a.qcow2").returncode == 0
    assert busy[0] == busy[1]


def test_blockdev_add_data_file_errors_match_qsd(tmp, vd, qsd):
    replies = []
    for d, name in ((vd, "v"), (qsd, "q")):
        qemu_img("create", "-q", "-f", "qcow2", tmp / f"{name}.qcow2", "1M")
        (tmp / f"{name}.raw").write_bytes(bytes(MiB))
        with d.client() as c:
            c.cmd("blockdev-add", **file_node(tmp / f"{name}.qcow2", "f0"))
            c.cmd("blockdev-add", **file_node(tmp / f"{name}.raw", "d0"))
            replies.append(c.error("blockdev-add", {"driver": "qcow2", "node-name": "n0",
                                                    "file": "f0", "data-file": "d0"}))
    assert replies[0] == replies[1]


def test_encrypted_data_file_image_reads_both_ways(tmp):
    """encrypt.format=luks with a data file: the LUKS header in the image, ciphertext in the data
    file (host offset as IV); each tool reads what the other wrote."""
    sec = ["--object", "secret,id=s0,data=pw"]
    opts = "data_file=d.raw,encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
    v, q = both(tmp, ["create", "-q", "-f", "qcow2", *sec, "-o", opts, "a.qcow2", "1M"],
                ["qemu-img", "create", "-q", "-f", "qcow2", *sec, "-o", opts, "a.qcow2", "1M"])
    spec = "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=s0"
    for d, writer, reader in ((v, [VDISK, "io"], ["qemu-io"]), (q, ["qemu-io"], [VDISK, "io"])):
        in_dir(d, *writer, *sec, "--image-opts", "-c", "write -P 0x5a 0 64k", "-c",
               "write -P 0x5b 512k 4k", spec)
        out = in_dir(d, *reader, *sec, "--image-opts", "-c", "read -P 0x5a 0 64k", "-c",
                     "read -P 0x5b 512k 4k", "-c", "read -P 0 64k 64k", spec).stdout
        assert "Pattern verification failed" not in out and out.count("read ") == 3
        assert b"\x5a" * 4096 not in (d / "d.raw").read_bytes()  # ciphertext only
        in_dir(d, "qemu-img", "check", *sec, "--image-opts", spec)


@pytest.mark.parametrize("opts", ["data_file=c0.data", "data_file=c0.data,extended_l2=on"])
def test_guest_cluster_0_inside_reads_and_writes(tmp, opts):
    """Guest cluster 0 of a data-file image sits at host offset 0, a real offset there (not "no
    cluster"): reads and partial writes starting inside it must use it. vdisk once read the data
    file from 0 for any read starting inside cluster 0, and a partial write copied those wrong
    bytes back."""
    img = tmp / "c0.qcow2"
    in_dir(tmp, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img.name, "1M")
    in_dir(tmp, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4096", "-c", "write -P 2 4096 4096",
           "-c", "write -P 27 22528 8192", img.name)
    in_dir(tmp, VDISK, "io", "-f", "qcow2", "-c", "read -P 2 4096 4096", "-c", "read -P 27 22528 8192",
           "-c", "write -P 235 26847 100", img.name)
    in_dir(tmp, "qemu-io", "-f", "qcow2", "-c", "read -P 1 0 4096", "-c", "read -P 2 4096 4096",
           "-c", "read -P 27 22528 4319", "-c", "read -P 235 26847 100",
           "-c", "read -P 27 26947 3773", img.name)
    assert in_dir(tmp, "qemu-img", "check", img.name, check=False).returncode == 0
