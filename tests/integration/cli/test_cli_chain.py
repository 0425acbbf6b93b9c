"""vdisk commit / rebase on identical chains built twice: results must match qemu-img's."""
import itertools
import json
import os
import subprocess

import pytest

from conftest import VDISK, assert_qemu_check_clean, qemu_img, qemu_io, run, vdisk


def make_chain(prefix):
    """{p}base (4M) <- {p}mid <- {p}top (6M), relative names, overlapping writes and zeroes."""
    qemu_img("create", "-f", "qcow2", f"{prefix}base.qcow2", "4M")
    qemu_io("-c", "write -P 1 0 1M", "-c", "write -P 7 3M 1M", f"{prefix}base.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", f"{prefix}base.qcow2", "-F", "qcow2",
             f"{prefix}mid.qcow2")
    qemu_io("-c", "write -P 2 512k 1M", "-c", "write -z 3M 64k", f"{prefix}mid.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", f"{prefix}mid.qcow2", "-F", "qcow2",
             f"{prefix}top.qcow2", "6M")
    qemu_io("-c", "write -P 3 1M 512k", "-c", "write -P 4 5M 4k", "-c", "write -z 3211264 4k",
            f"{prefix}top.qcow2")


@pytest.fixture
def chains(tmp):
    os.chdir(tmp)
    make_chain("q")
    make_chain("v")
    qemu_img("convert", "-O", "raw", "qtop.qcow2", "ref.raw")
    return tmp


def map_of(path):
    """Allocation map without host offsets (qemu-img commit itself is not deterministic there)."""
    out = qemu_img("map", "--output=json", path).stdout
    return [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(out)]


def backing(path):
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    return info.get("backing-filename"), info.get("backing-filename-format")


def same_result(*names):
    for n in names:
        qemu_img("compare", f"q{n}.qcow2", f"v{n}.qcow2")
        assert map_of(f"v{n}.qcow2") == map_of(f"q{n}.qcow2"), n
        assert_qemu_check_clean(f"v{n}.qcow2")


# ---- commit ----

@pytest.mark.parametrize("extra", [[], ["-d"], ["-q"], ["-p"], ["-f", "qcow2"], ["-t", "none"]])
def test_commit_into_backing(chains, extra):
    pq = qemu_img("commit", *extra, "qtop.qcow2")
    pv = vdisk("commit", *extra, "vtop.qcow2")
    if "-p" not in extra:
        assert pv.stdout == pq.stdout
    assert pv.stdout.endswith("" if "-q" in extra else "Image committed.\n")
    same_result("top", "mid", "base")
    qemu_img("compare", "-f", "raw", "ref.raw", "vtop.qcow2")


def _commit_chain(p):
    """{p}base (4M data 1M) <- {p}mid (64k at 1M, 128k at 3M) <- {p}top (zeroes at 512k, 64k at
    2M): what each commit writes is a few clusters, far from the image's size."""
    qemu_img("create", "-f", "qcow2", f"{p}base.qcow2", "4M")
    qemu_io("-c", "write -P 1 0 1M", f"{p}base.qcow2")
    for lower, upper, cmds in (("base", "mid", ["write -P 2 1M 64k", "write -P 3 3M 128k"]),
                               ("mid", "top", ["write -z 512k 64k", "write -P 4 2M 64k"]),
                               ("base", "lone", ["write -P 5 1M 1M"]), ("base", "none", [])):
        qemu_img("create", "-f", "qcow2", "-b", f"{p}{lower}.qcow2", "-F", "qcow2",
                 f"{p}{upper}.qcow2")
        if cmds:
            qemu_io(*[a for c in cmds for a in ("-c", c)], f"{p}{upper}.qcow2")


def _steps(out):
    """-p output's steps, each repeat shown once: qemu-img's job loop prints its current step
    once per event-loop turn, how many times depends on timing."""
    lines = out.split(b"\r")
    return [l for i, l in enumerate(lines) if i == 0 or l != lines[i - 1]]


@pytest.mark.parametrize("args, ranges", [
    (["top.qcow2"], [64, 64]), (["-d", "mid.qcow2"], [64, 128]),
    (["-b", "BASE", "top.qcow2"], [64, 64, 64, 128]), (["lone.qcow2"], [1024]),
    (["none.qcow2"], []),
])
def test_commit_progress_steps_as_qemu_img(tmp, args, ranges):
    """commit -p weighs by what it writes into base (qemu-img's job mirrors what is allocated
    above base: the ranges, KiB), not by the image's size: 0, a step per range written, 100
    twice (once when nothing is written). qemu-img's job writes the ranges concurrently, so which
    partial sums it shows, and how often, depends on timing: each must be a sum of ranges."""
    os.chdir(tmp)
    _commit_chain("q")
    _commit_chain("v")
    outs = {}
    for t, prog in (("q", "qemu-img"), ("v", VDISK)):
        argv = [a.replace("BASE", f"{t}base.qcow2") if a == "BASE" else
                a if a.startswith("-") else t + a for a in args]
        p = subprocess.run([prog, "commit", "-p", *argv], capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        outs[t] = p.stdout
    q = _steps(outs["q"])
    assert q[0] == b"    (0.00/100%)" and q[-2:] == [b"    (100.00/100%)", b"\nImage committed.\n"]
    sums = {f"    ({100 * sum(c) / sum(ranges):.2f}/100%)".encode()
            for k in range(1, len(ranges)) for c in itertools.combinations(ranges, k)}
    assert set(q[1:-2]) <= sums | {b"    (100.00/100%)"}, q
    # vdisk: every range in offset order, each step once
    done, expect = 0, []
    for r in ranges[:-1]:
        done += r
        expect.append(f"{100 * done / sum(ranges):.2f}")
    hundreds = 2 if ranges else 1
    assert outs["q"].count(b"(100.00/100%)") >= hundreds
    assert outs["v"] == b"".join(f"    ({s}/100%)\r".encode()
                                 for s in ["0.00", *expect, *["100.00"] * hundreds]) + \
        b"\nImage committed.\n"


def test_commit_to_base_through_intermediate(chains):
    pq = qemu_img("commit", "-b", "qbase.qcow2", "qtop.qcow2")
    pv = vdisk("commit", "-b", "vbase.qcow2", "vtop.qcow2")
    assert pv.stdout == pq.stdout
    same_result("top", "base")
    qemu_img("compare", "-f", "raw", "ref.raw", "vbase.qcow2")
    # -b implies -d: the top still reads the same through the (now invalid) chain above base.
    assert map_of("vtop.qcow2") == map_of("qtop.qcow2")


def test_commit_grows_base(chains):
    vdisk("commit", "vtop.qcow2")
    qemu_img("commit", "qtop.qcow2")
    assert json.loads(qemu_img("info", "--output=json", "vmid.qcow2").stdout)["virtual-size"] \
        == 6 << 20
    same_result("mid")


def test_commit_raw_base(tmp):
    os.chdir(tmp)
    for p in "qv":
        qemu_img("create", "-f", "raw", f"{p}b.raw", "2M")
        qemu_io("-f", "raw", "-c", "write -P 1 0 2M", f"{p}b.raw")
        qemu_img("create", "-f", "qcow2", "-b", f"{p}b.raw", "-F", "raw", f"{p}t.qcow2")
        qemu_io("-c", "write -P 2 64k 64k", "-c", "write -z 1M 4k", f"{p}t.qcow2")
    qemu_img("commit", "qt.qcow2")
    vdisk("commit", "vt.qcow2")
    qemu_img("compare", "-f", "raw", "-F", "raw", "qb.raw", "vb.raw")
    qemu_img("compare", "qt.qcow2", "vt.qcow2")


@pytest.mark.parametrize("args,msg", [
    (["qbase.qcow2"], "Image does not have a backing file"),
    (["-b", "nonexist.qcow2", "qtop.qcow2"], "Did not find 'nonexist.qcow2' in the backing chain"),
    (["nonexist.qcow2"], None),
])
def test_commit_errors(chains, args, msg):
    pq = qemu_img("commit", *args, check=False)
    pv = vdisk("commit", *args, check=False)
    assert pv.returncode == pq.returncode == 1
    assert pv.stderr.startswith("vdisk: ") and pv.stderr.count("\n") == 1
    if msg:
        assert msg in pv.stderr


# ---- rebase ----

def test_rebase_onto_other_image(chains):
    for p in "qv":
        qemu_img("create", "-f", "qcow2", f"{p}other.qcow2", "5M")
        qemu_io("-c", "write -P 9 0 2M", f"{p}other.qcow2")
    pq = qemu_img("rebase", "-b", "qother.qcow2", "-F", "qcow2", "qtop.qcow2")
    pv = vdisk("rebase", "-b", "vother.qcow2", "-F", "qcow2", "vtop.qcow2")
    assert pv.stdout == pq.stdout == ""
    assert backing("vtop.qcow2") == ("vother.qcow2", "qcow2")
    qemu_img("compare", "-f", "raw", "ref.raw", "vtop.qcow2")
    qemu_img("compare", "qtop.qcow2", "vtop.qcow2")
    assert map_of("vtop.qcow2") == map_of("qtop.qcow2")
    assert_qemu_check_clean("vtop.qcow2")


def test_rebase_onto_base_in_chain(chains):
    qemu_img("rebase", "-b", "qbase.qcow2", "-F", "qcow2", "qtop.qcow2")
    vdisk("rebase", "-b", "vbase.qcow2", "-F", "qcow2", "vtop.qcow2")
    assert backing("vtop.qcow2") == ("vbase.qcow2", "qcow2")
    qemu_img("compare", "-f", "raw", "ref.raw", "vtop.qcow2")
    assert map_of("vtop.qcow2") == map_of("qtop.qcow2")
    assert_qemu_check_clean("vtop.qcow2")


def test_rebase_flatten(chains):
    qemu_img("rebase", "-b", "", "qtop.qcow2")
    vdisk("rebase", "-b", "", "vtop.qcow2")
    assert backing("vtop.qcow2") == (None, None)
    qemu_img("compare", "-f", "raw", "ref.raw", "vtop.qcow2")
    assert map_of("vtop.qcow2") == map_of("qtop.qcow2")
    assert_qemu_check_clean("vtop.qcow2")


def test_rebase_unsafe_only_rewrites_header(chains):
    before = map_of("vtop.qcow2")
    vdisk("rebase", "-u", "-b", "does-not-exist.qcow2", "-F", "qcow2", "vtop.qcow2")
    assert backing("vtop.qcow2") == ("does-not-exist.qcow2", "qcow2")
    vdisk("rebase", "-u", "-b", "vmid.qcow2", "-F", "qcow2", "vtop.qcow2")
    assert map_of("vtop.qcow2") == before
    qemu_img("compare", "-f", "raw", "ref.raw", "vtop.qcow2")
    assert_qemu_check_clean("vtop.qcow2")


def test_rebase_many_extents_matches_qemu_img(tmp):
    """Safe rebase writes extent k while it reads extent k+1 (two buffer slots): with dozens of
    extents, some differing only in part of a cluster, some past the old backing's end, the
    result reads and allocates as qemu-img's does."""
    os.chdir(tmp)
    for p in "qv":
        qemu_img("create", "-f", "qcow2", f"{p}base.qcow2", "24M")
        qemu_img("create", "-f", "qcow2", "-b", f"{p}base.qcow2", "-F", "qcow2",
                 f"{p}mid.qcow2", "20M")
        qemu_img("create", "-f", "qcow2", "-b", f"{p}mid.qcow2", "-F", "qcow2",
                 f"{p}top.qcow2", "24M")
        qemu_img("create", "-f", "qcow2", f"{p}new.qcow2", "24M")
        base, mid, new, top = [], [], [], []
        for i in range(40):
            off = i * 512 * 1024
            base.append(f"write -P {i % 50 + 1} {off} 192k")
            mid.append(f"write -P {i % 50 + 100} {off + (i % 3) * 64 * 1024} {(i % 4 + 1) * 16}k")
            new.append(f"write -P {i % 50 + 1 if i % 2 else 200} {off} 192k")
            if i % 5 == 0:
                top.append(f"write -P 250 {off + 128 * 1024} 64k")
        new.append("write -P 201 21M 1M")  # past the old chain's 20M: rebase writes zeroes
        for img, cmds in ((f"{p}base.qcow2", base), (f"{p}mid.qcow2", mid),
                          (f"{p}new.qcow2", new), (f"{p}top.qcow2", top)):
            qemu_io(*[a for c in cmds for a in ("-c", c)], img)
    qemu_img("convert", "-O", "raw", "qtop.qcow2", "ref.raw")
    qemu_img("rebase", "-b", "qnew.qcow2", "-F", "qcow2", "qtop.qcow2")
    vdisk("rebase", "-b", "vnew.qcow2", "-F", "qcow2", "vtop.qcow2")
    assert backing("vtop.qcow2") == ("vnew.qcow2", "qcow2")
    qemu_img("compare", "-f", "raw", "ref.raw", "vtop.qcow2")
    qemu_img("compare", "qtop.qcow2", "vtop.qcow2")
    assert map_of("vtop.qcow2") == map_of("qtop.qcow2")
    assert_qemu_check_clean("vtop.qcow2")


def test_rebase_keeps_relative_name(tmp):
    d = tmp / "imgs"
    d.mkdir()
    os.chdir(tmp)
    qemu_img("create", "-f", "qcow2", d / "a.qcow2", "1M")
    qemu_io("-c", "write -P 1 0 1M", d / "a.qcow2")
    qemu_img("create", "-f", "qcow2", d / "b.qcow2", "1M")
    qemu_img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", d / "t.qcow2")
    # The new name is relative to the image's directory, not to the cwd.
    vdisk("rebase", "-b", "b.qcow2", "-F", "qcow2", "imgs/t.qcow2")
    assert backing(d / "t.qcow2") == ("b.qcow2", "qcow2")
    qemu_img("compare", d / "a.qcow2", d / "t.qcow2")


def test_rebase_progress_and_quiet(chains):
    assert vdisk("rebase", "-q", "-p", "-b", "", "vtop.qcow2").stdout == ""
    pv = vdisk("rebase", "-p", "-b", "vmid.qcow2", "-F", "qcow2", "vtop.qcow2")
    assert pv.stdout.startswith("    (0.00/100%)")


@pytest.mark.parametrize("args", [
    ["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],    # onto a layer of its chain
    ["-b", "", "top.qcow2"],                              # flatten: a piece past 100 %
    ["-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
    ["-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-u", "-b", "x", "top.qcow2"],                       # no -F: refused, 100 % all the same
    ["-b", "x", "-F", "qcow2", "top.qcow2"], ["-u", "-b", "x", "-F", "qcow2", "gone.qcow2"],
    ["-t", "bogus", "-u", "-b", "x", "-F", "qcow2", "top.qcow2"],
    ["-u", "-b", "x", "-F", "bogus", "top.qcow2"],
])
def test_rebase_progress_bytes_as_qemu_img(tmp, args):
    """rebase -p prints qemu-img's bytes: 0 % before anything is opened (so also before an
    error), a fixed 100 / (size / 2 MiB) % per piece read from the backing files, never past
    100, and 100 % once the backing name is set (or refused); -u prints 0 and 100."""
    os.chdir(tmp)
    _commit_chain("q")
    _commit_chain("v")
    outs = {}
    for t, prog in (("q", "qemu-img"), ("v", VDISK)):
        argv = [a if a.startswith("-") or a in ("", "x", "qcow2", "bogus") else t + a
                for a in args]
        p = subprocess.run([prog, "rebase", "-p", *argv], capture_output=True, timeout=120)
        outs[t] = (p.returncode, p.stdout, p.stderr.replace(os.path.basename(prog).encode(), b"P")
                   .replace(b"vgone", b"qgone").replace(b"vtop", b"qtop"))
    assert outs["v"] == outs["q"]
    assert outs["q"][1].startswith(b"    (0.00/100%)\r") and outs["q"][1].endswith(b"\r\n")
    if args[0] == "-b" and args[1] == "":
        assert outs["q"][1].count(b"(100.00/100%)") == 3  # the third piece stops at 100


@pytest.mark.parametrize("args", [
    ["-b", "qmid.qcow2", "qtop.qcow2"],                # no -F
    ["-b", "nonexist.qcow2", "-F", "qcow2", "qtop.qcow2"],
    ["qtop.qcow2"],                                    # no -b
    ["-b", "", "nonexist.qcow2"],
    ["-b", "qmid.qcow2", "nonexist.qcow2"],            # the image's open fails first
    ["-b", "qmid.qcow2", "-F", "bogus", "nonexist.qcow2"],
    ["-b", "qmid.qcow2", "-F", "bogus", "qtop.qcow2"],
])
def test_rebase_errors(chains, args):
    pq = qemu_img("rebase", *args, check=False)
    pv = vdisk("rebase", *[a.replace("qtop", "vtop") for a in args], check=False)
    assert pq.returncode == 1
    assert pv.returncode == 1
    # qemu-img's lines word for word (a usage error's "Try ..." line too), names aside
    assert pv.stderr.replace("vdisk", "qemu-img").replace("vtop", "qtop") == pq.stderr
    # A failed rebase leaves the image untouched.
    assert backing("vtop.qcow2") == ("vmid.qcow2", "qcow2")
    qemu_img("compare", "-f", "raw", "ref.raw", "vtop.qcow2")


@pytest.mark.parametrize("opts", ["compat=0.10", "extended_l2=on",
                                  "cluster_size=4k,refcount_bits=1"])
def test_commit_and_flatten_other_layouts(tmp, opts):
    os.chdir(tmp)
    qemu_img("create", "-f", "qcow2", "-o", opts, "b.qcow2", "4M")
    qemu_io("-c", "write -P 1 0 2M", "b.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", opts, "-b", "b.qcow2", "-F", "qcow2", "t.qcow2")
    qemu_io("-c", "write -P 2 1M 8k", "-c", "write -z 100k 3k", "-c", "discard 1536k 64k",
            "t.qcow2")
    qemu_img("convert", "-O", "raw", "t.qcow2", "ref.raw")
    run(["cp", "t.qcow2", "flat.qcow2"])
    vdisk("rebase", "-b", "", "flat.qcow2")
    qemu_img("compare", "-f", "raw", "ref.raw", "flat.qcow2")
    assert_qemu_check_clean("flat.qcow2")
    vdisk("commit", "t.qcow2")
    for img in ("b.qcow2", "t.qcow2"):
        qemu_img("compare", "-f", "raw", "ref.raw", img)
        assert_qemu_check_clean(img)


@pytest.mark.parametrize("cmd", ["commit", "rebase"])
def test_cache_unsafe_syncs_nothing(tmp, cmd):
    """-t unsafe (VD_OPEN_NO_FLUSH): like qemu-img, commit and rebase then never fdatasync;
    the default (writeback) does."""
    os.chdir(tmp)

    def syncs(tool, cache):
        for f in ("b.qcow2", "t.qcow2", "n.qcow2"):
            qemu_img("create", "-f", "qcow2", f, "4M")
        qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2")
        qemu_io("-c", "write -P 3 0 1M", "t.qcow2")
        args = ["commit"] if cmd == "commit" else ["rebase", "-b", "n.qcow2", "-F", "qcow2"]
        # LeakSanitizer cannot run under ptrace: keep sanitizer builds usable here.
        env = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0")
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=fdatasync,fsync", "-o", "st.txt",
                        tool, *args, "-t", cache, "t.qcow2"],
                       check=True, capture_output=True, env=env, timeout=120)
        assert_qemu_check_clean("t.qcow2")
        return sum(1 for l in open("st.txt") if "sync(" in l)

    assert syncs(VDISK, "unsafe") == syncs("qemu-img", "unsafe") == 0
    assert syncs(VDISK, "writeback") > 0
