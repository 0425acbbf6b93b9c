"""vdisk amend against qemu-img amend / qemu-img info / qemu-img check / qemu-io as the oracle.

Each change is verified from QEMU's side (info shows the new options, check finds nothing, qemu-io
reads the guest data back, snapshots included), and the refusals are compared with qemu-img's own
texts and exit codes for the same command line on a copy of the same image.
"""
import json
import shutil
import subprocess

import pytest

from conftest import VDISK, assert_qemu_check_clean, qemu_img, qemu_io, run, vdisk


def info(path):
    return json.loads(qemu_img("info", "--output=json", path).stdout)


def specific(path):
    return info(path)["format-specific"]["data"]


def io_ok(path, *cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    p = qemu_io(*args, path)
    assert "Pattern verification failed" not in p.stdout, p.stdout


def populated(path, backing=None):
    """An image with data, zero clusters (plain and allocated), a snapshot and later writes."""
    if backing:
        qemu_img("create", "-f", "qcow2", "-b", backing, "-F", "qcow2", path)
    else:
        qemu_img("create", "-f", "qcow2", path, "16M")
    qemu_io("-c", "write -P 1 0 1M", "-c", "write -z 4M 1M", "-c", "write -P 2 8M 64k",
            "-c", "write -z 8M 64k", path)
    qemu_img("snapshot", "-c", "s1", path)
    qemu_io("-c", "write -P 3 0 64k", "-c", "write -z 64k 64k", "-c", "write -z -u 2M 64k", path)


def check_populated(path):
    io_ok(path, "read -P 3 0 64k", "read -P 0 64k 64k", "read -P 1 128k 896k",
          "read -P 0 2M 64k", "read -P 0 4M 1M", "read -P 0 8M 64k")


def test_downgrade_expands_zero_clusters_in_active_and_snapshot(tmp_path):
    img = str(tmp_path / "a.qcow2")
    populated(img)
    vdisk("amend", "-o", "compat=0.10", img)
    assert specific(img)["compat"] == "0.10"
    assert_qemu_check_clean(img)
    check_populated(img)
    qemu_img("snapshot", "-a", "s1", img)
    io_ok(img, "read -P 1 0 1M", "read -P 0 4M 1M", "read -P 0 8M 64k")
    assert_qemu_check_clean(img)


def test_downgrade_over_a_backing_file_keeps_zeroes_over_backing_data(tmp_path):
    base = str(tmp_path / "base.qcow2")
    qemu_img("create", "-f", "qcow2", base, "1M")
    qemu_io("-c", "write -P 7 0 1M", base)
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io("-c", "write -z 0 64k", "-c", "write -z -u 128k 64k", "-c", "write -P 9 256k 64k", top)
    vdisk("amend", "-o", "compat=0.10", top)
    assert specific(top)["compat"] == "0.10"
    assert_qemu_check_clean(top)
    io_ok(top, "read -P 0 0 64k", "read -P 7 64k 64k", "read -P 0 128k 64k",
          "read -P 7 192k 64k", "read -P 9 256k 64k", "read -P 7 320k 704k")


def test_upgrade_with_lazy_refcounts_and_refcount_width_then_qemu_writes(tmp_path):
    img = str(tmp_path / "v2.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", img, "8M")
    qemu_io("-c", "write -P 5 0 2M", img)
    qemu_img("snapshot", "-c", "s", img)
    vdisk("amend", "-o", "compat=1.1,lazy_refcounts=on,refcount_bits=4", img)
    d = specific(img)
    assert (d["compat"], d["lazy-refcounts"], d["refcount-bits"]) == ("1.1", True, 4)
    assert_qemu_check_clean(img)
    qemu_io("-c", "write -P 6 1M 2M", img)
    assert_qemu_check_clean(img)
    io_ok(img, "read -P 5 0 1M", "read -P 6 1M 2M")
    qemu_img("snapshot", "-a", "s", img)
    io_ok(img, "read -P 5 0 2M")


@pytest.mark.parametrize("bits", [1, 2, 8, 32, 64])
def test_refcount_width_change_keeps_image_valid(tmp_path, bits):
    img = str(tmp_path / "r.qcow2")
    qemu_img("create", "-f", "qcow2", img, "8M")
    qemu_io("-c", "write -P 4 0 3M", "-c", "write -c -P 5 4M 64k", img)
    vdisk("amend", "-o", f"refcount_bits={bits}", img)
    assert specific(img)["refcount-bits"] == bits
    assert_qemu_check_clean(img)
    io_ok(img, "read -P 4 0 3M", "read -P 5 4M 64k")
    qemu_io("-c", "write -P 8 2M 2M", img)
    assert_qemu_check_clean(img)


def test_refcount_width_too_small_for_a_snapshot_is_refused_unchanged(tmp_path):
    img = str(tmp_path / "s.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_io("-c", "write -P 1 0 64k", "-c", "write -P 1 256k 64k", img)
    qemu_img("snapshot", "-c", "s", img)
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(img, ref)
    before = open(img, "rb").read()
    q = qemu_img("amend", "-o", "refcount_bits=1", ref, check=False)
    v = vdisk("amend", "-o", "refcount_bits=1", img, check=False)
    assert (v.returncode, v.stderr.replace("vdisk:", "qemu-img:")) == (q.returncode, q.stderr)
    assert open(img, "rb").read() == before


def test_lazy_refcounts_off_again(tmp_path):
    img = str(tmp_path / "l.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "1M")
    vdisk("amend", "-o", "lazy_refcounts=off", img)
    assert specific(img)["lazy-refcounts"] is False
    vdisk("amend", "-o", "lazy_refcounts=on", img)
    assert specific(img)["lazy-refcounts"] is True


def test_size_grows_and_shrinks(tmp_path):
    img = str(tmp_path / "z.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    vdisk("amend", "-o", "size=3M", img)
    assert info(img)["virtual-size"] == 3 << 20
    vdisk("amend", "-o", "size=512k", img)
    assert info(img)["virtual-size"] == 512 << 10
    assert_qemu_check_clean(img)


def test_progress_and_quiet(tmp_path):
    img = str(tmp_path / "p.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(img, ref)
    q = qemu_img("amend", "-p", "-o", "compat=0.10", ref)
    v = vdisk("amend", "-p", "-o", "compat=0.10", img)
    assert v.stdout == q.stdout
    assert vdisk("amend", "-q", "-p", "-o", "compat=1.1", img).stdout == ""


@pytest.mark.parametrize("create,data,opts", [
    ("compat=0.10", None, "compat=1.1"),
    ("compat=0.10", "64M", "compat=1.1"),
    ("compat=1.1", None, "refcount_bits=64"),
    ("compat=1.1", None, "refcount_bits=1"),
    ("compat=1.1", "64M", "refcount_bits=64"),
    ("compat=1.1", "64M", "refcount_bits=1"),
    ("compat=1.1,cluster_size=4096", "64M", "refcount_bits=64"),
    ("compat=1.1,size=1G", None, "refcount_bits=8"),
    ("compat=0.10", "64M", "compat=1.1,refcount_bits=64"),
    ("refcount_bits=64", "1M", "compat=0.10,refcount_bits=16"),
])
def test_progress_bytes_as_qemu_img(tmp_path, create, data, opts):
    """amend -p prints qemu-img's bytes: an upgrade's 0/50/100 %, a refcount width change's
    steps over three walks of the old refcount table (about 100 lines of 1 %), and, with both,
    the upgrade weighed against the projected cost of the change still to come."""
    outs = {}
    for t, prog in (("q", "qemu-img"), ("v", VDISK)):
        img = str(tmp_path / (t + ".qcow2"))
        size = "1G" if "size=" in create else "64M"
        qemu_img("create", "-f", "qcow2", "-o", create.replace(",size=1G", ""), img, size)
        if data:
            qemu_io("-c", "write -P 7 0 " + data, img)
        p = subprocess.run([prog, "amend", "-p", "-o", opts, img], capture_output=True,
                           timeout=120)
        outs[t] = (p.returncode, p.stdout, p.stderr)
        io_ok(img, "read -P 7 0 " + data if data else "read -P 0 0 1M")
    assert outs["v"] == outs["q"]
    assert outs["q"][0] == 0 and outs["q"][1].startswith(b"    (0.00/100%)\r    (0.00/100%)\r")
    assert outs["q"][1].endswith(b"    (100.00/100%)\r    (100.00/100%)\r\n")
    if opts.startswith("refcount_bits"):
        assert outs["q"][1].count(b"\r") > 90
    elif opts == "compat=1.1":
        assert b"    (50.00/100%)\r" in outs["q"][1]


def test_help_lists_qemu_img_amend_options(tmp_path):
    img = str(tmp_path / "h.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    assert vdisk("amend", "-o", "help", img).stdout == qemu_img("amend", "-o", "help", img).stdout
    assert (vdisk("amend", "-f", "qcow2", "-o", "help").stdout ==
            qemu_img("amend", "-f", "qcow2", "-o", "help").stdout)


REFUSALS = [
    ("plain", ["-o", "cluster_size=4096"]),
    ("plain", ["-o", "preallocation=off"]),
    ("plain", ["-o", "encrypt.format=luks"]),
    ("plain", ["-o", "encrypt.new-secret=x"]),
    ("plain", ["-o", "backing_file=x"]),
    ("plain", ["-o", "backing_fmt=raw"]),
    ("plain", ["-o", "foo=1"]),
    ("plain", ["-o", "compat=1.2"]),
    ("plain", ["-o", "lazy_refcounts=maybe"]),
    ("plain", ["-o", "refcount_bits=3"]),
    ("plain", ["-o", "refcount_bits=128"]),
    ("plain", ["-o", "data_file=x"]),
    ("plain", ["-o", "data_file_raw=on"]),
    ("plain", ["-t", "bogus", "-o", "compat=1.1"]),
    ("raw", ["-f", "raw", "-o", "size=2M"]),
    ("raw", ["-f", "raw", "-o", "help"]),
    ("v2", ["-o", "lazy_refcounts=on"]),
    ("v2", ["-o", "refcount_bits=8"]),
    ("r8", ["-o", "compat=0.10"]),
    ("extl2", ["-o", "compat=0.10"]),
]


@pytest.mark.parametrize("kind,args", REFUSALS, ids=[" ".join(a) for _, a in REFUSALS])
def test_refusals_as_qemu_img(tmp_path, kind, args):
    opts = {"plain": ["-f", "qcow2"], "raw": ["-f", "raw"],
            "v2": ["-f", "qcow2", "-o", "compat=0.10"], "r8": ["-f", "qcow2", "-o", "refcount_bits=8"],
            "extl2": ["-f", "qcow2", "-o", "extended_l2=on"]}[kind]
    mine, ref = str(tmp_path / "v.img"), str(tmp_path / "q.img")
    qemu_img("create", *opts, mine, "1M")
    shutil.copy(mine, ref)
    before = open(mine, "rb").read()
    q = qemu_img("amend", *args, ref, check=False)
    v = vdisk("amend", *args, mine, check=False)
    assert q.returncode == 1
    assert v.returncode == q.returncode
    assert v.stderr.replace("vdisk: ", "qemu-img: ").replace(mine, ref) == q.stderr
    assert open(mine, "rb").read() == before


def test_refused_on_images_with_bitmaps_for_downgrade(tmp_path):
    img = str(tmp_path / "b.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_img("bitmap", "--add", img, "b0")
    p = vdisk("amend", "-o", "compat=0.10", img, check=False)
    assert p.returncode == 1 and "bitmaps" in p.stderr
    d = specific(img)
    assert d["compat"] == "1.1"
    assert [(b["name"], b["flags"]) for b in d["bitmaps"]] == [("b0", ["auto"])]
    assert_qemu_check_clean(img)


def test_missing_options_and_operands():
    p = vdisk("amend", "x.qcow2", check=False)
    assert (p.returncode, p.stderr) == (1, "vdisk: Must specify options (-o)\n"
                                           "Try 'vdisk --help' for more information\n")
    p = vdisk("amend", "-o", "compat=1.1", check=False)
    assert (p.returncode, p.stderr) == (1, "vdisk: Expecting one image file name\n")
    assert run([*["qemu-img"], "amend", "-o", "compat=1.1"], check=False).returncode == 1
