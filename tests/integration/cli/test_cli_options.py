"""Options qemu-img 7.2 honours must be honoured (or refused with its words), never accepted and
ignored: convert -C/-r/-l, commit -r, measure -l, -t/-T cache modes, rebase -T/-U, qemu-io's -C."""
import json
import os
import re
import subprocess
import time

import pytest

from conftest import VDISK, qemu_img, qemu_io, run, sha256, vdisk


def same_error(pq, pv):
    """Same exit status and the same message lines (vdisk's prefix instead of qemu-img's)."""
    assert pv.returncode == pq.returncode, (pq.stderr, pv.stderr)
    qlines = [l.split(": ", 1)[1] for l in pq.stderr.splitlines() if ": " in l]
    vlines = [l.split(": ", 1)[1] for l in pv.stderr.splitlines() if ": " in l]
    assert vlines == qlines, (pq.stderr, pv.stderr)


@pytest.fixture
def imgs(tmp):
    os.chdir(tmp)
    qemu_img("create", "-f", "raw", "src.raw", "24M")
    qemu_io("-f", "raw", "-c", "write -P 7 0 6M", "-c", "write -P 9 12M 4M", "src.raw")
    qemu_img("create", "-f", "qcow2", "src.qcow2", "24M")
    qemu_io("-c", "write -P 1 0 3M", "-c", "write -z 4M 1M", "-c", "write -P 2 8M 2M",
            "src.qcow2")
    return tmp


def strace_vdisk(calls, trace, *args, check=True):
    """vdisk under strace (LeakSanitizer cannot run under ptrace: leaks are checked elsewhere)."""
    env = dict(os.environ, ASAN_OPTIONS="abort_on_error=1:detect_leaks=0")
    p = subprocess.run(["strace", "-f", "-qq", "-e", f"trace={calls}", "-o", trace, VDISK,
                        *args], capture_output=True, text=True, timeout=120, env=env)
    assert not check or p.returncode == 0, p.stderr
    return p


def copy_file_range_bytes(trace):
    """Bytes the traced process moved with copy_file_range."""
    total = 0
    for line in open(trace):
        m = re.search(r"copy_file_range\(.*\) = (\d+)", line)
        if m:
            total += int(m.group(1))
    return total


# ---- convert -C: copy offloading ----

@pytest.mark.parametrize("src,fmt", [("src.raw", "raw"), ("src.qcow2", "qcow2")])
def test_convert_C_copies_data_with_copy_file_range(imgs, src, fmt):
    qemu_img("convert", "-C", "-f", fmt, "-O", "raw", src, "q.raw")
    strace_vdisk("copy_file_range", "trace.txt", "convert", "-C", "-f", fmt, "-O", "raw", src,
                 "v.raw")
    assert sha256("v.raw") == sha256("q.raw")
    extents = json.loads(qemu_img("map", "-f", fmt, "--output=json", src).stdout)
    data = sum(e["length"] for e in extents if e["data"] and not e["zero"])
    # every data byte went through the kernel, none through a buffer of ours
    assert copy_file_range_bytes("trace.txt") == data


def test_convert_without_C_does_not_offload(imgs):
    strace_vdisk("copy_file_range", "trace.txt", "convert", "-f", "raw", "-O", "raw", "src.raw",
                 "v.raw")
    assert copy_file_range_bytes("trace.txt") == 0
    assert sha256("v.raw") == sha256("src.raw")


def test_convert_C_to_qcow2_matches_qemu_img(imgs):
    """A target vdisk cannot offload into (qcow2) still gets every byte, as qemu-img's fallback."""
    qemu_img("convert", "-C", "-f", "raw", "-O", "qcow2", "src.raw", "q.qcow2")
    vdisk("convert", "-C", "-f", "raw", "-O", "qcow2", "src.raw", "v.qcow2")
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", "v.qcow2", "q.qcow2").returncode == 0
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", "v.qcow2", "src.raw").returncode == 0


@pytest.mark.parametrize("args", [
    ["-C", "-c", "-O", "qcow2"],
    ["-C", "-S", "4k", "-O", "raw"],
    ["-C", "-S", "0", "-O", "raw"],
    ["-n", "-o", "cluster_size=4k", "-O", "qcow2"],
])
def test_convert_refusals_match_qemu_img(imgs, args):
    pq = qemu_img("convert", *args, "src.qcow2", "q.out", check=False)
    pv = vdisk("convert", *args, "src.qcow2", "v.out", check=False)
    same_error(pq, pv)
    assert pv.returncode == 1
    assert not os.path.exists("v.out")


# ---- -r rate limits ----

@pytest.mark.parametrize("cmd", [["convert", "-O", "raw", "src.qcow2", "X.out"],
                                 ["commit", "src.qcow2"]])
@pytest.mark.parametrize("rate", ["1x", "-1", "", "1.5"])
def test_rate_limit_parse_errors_match_qemu_img(imgs, cmd, rate):
    q = [a.replace("X", "q") for a in cmd]
    v = [a.replace("X", "v") for a in cmd]
    pq = qemu_img(q[0], "-r", rate, *q[1:], check=False)
    pv = vdisk(v[0], "-r", rate, *v[1:], check=False)
    assert pv.returncode == pq.returncode
    if pq.returncode:
        assert "Invalid rate limit specified" in pq.stderr
        assert "Invalid rate limit specified" in pv.stderr


def test_convert_rate_limit_holds_the_writes_back(imgs):
    """10 MiB of data at 4 MiB/s cannot be written in under 2 s (the first chunk goes at once).
    A lower bound only: a slow machine cannot make it fail; ignoring -r (before) did."""
    t0 = time.monotonic()
    vdisk("convert", "-r", "4M", "-f", "raw", "-O", "raw", "src.raw", "v.raw")
    assert time.monotonic() - t0 >= 2.0
    assert sha256("v.raw") == sha256("src.raw")
    vdisk("convert", "-r", "0", "-f", "raw", "-O", "qcow2", "src.raw", "v0.qcow2")
    assert qemu_img("compare", "-F", "raw", "v0.qcow2", "src.raw").returncode == 0


def test_commit_rate_limit_holds_the_writes_back(imgs):
    qemu_img("create", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("-c", "write -P 5 1M 4M", "top.qcow2")
    qemu_img("convert", "-O", "raw", "top.qcow2", "want.raw")
    t0 = time.monotonic()
    vdisk("commit", "-r", "1M", "top.qcow2")
    assert time.monotonic() - t0 >= 2.0  # 4 MiB at 1 MiB/s, see above
    assert qemu_img("compare", "-F", "raw", "src.qcow2", "want.raw").returncode == 0


# ---- -l snapshot_param ----

@pytest.fixture
def snapped(imgs):
    qemu_img("snapshot", "-c", "first", "src.qcow2")
    qemu_io("-c", "write -P 3 0 1M", "src.qcow2")
    qemu_img("snapshot", "-c", "second", "src.qcow2")
    qemu_io("-c", "write -P 4 2M 1M", "src.qcow2")
    return imgs


@pytest.mark.parametrize("param", ["first", "1", "second", "snapshot.name=first",
                                   "snapshot.id=2", "snapshot.id=1,snapshot.name=first"])
def test_convert_l_reads_the_snapshot(snapped, param):
    qemu_img("convert", "-l", param, "-O", "raw", "src.qcow2", "q.raw")
    vdisk("convert", "-l", param, "-O", "raw", "src.qcow2", "v.raw")
    assert sha256("v.raw") == sha256("q.raw")
    qemu_img("convert", "-O", "raw", "src.qcow2", "now.raw")
    assert sha256("v.raw") != sha256("now.raw")  # the snapshot, not the active image


@pytest.mark.parametrize("param", ["nosuch", "snapshot.id=1,snapshot.name=second",
                                   "snapshot.foo=1", "snapshot.name=first,foo=2", ""])
def test_convert_l_errors_match_qemu_img(snapped, param):
    pq = qemu_img("convert", "-l", param, "-O", "raw", "src.qcow2", "q.raw", check=False)
    pv = vdisk("convert", "-l", param, "-O", "raw", "src.qcow2", "v.raw", check=False)
    same_error(pq, pv)


def test_convert_l_refusals_match_qemu_img(snapped):
    pq = qemu_img("convert", "-l", "first", "src.qcow2", "src.qcow2", "q.raw", check=False)
    pv = vdisk("convert", "-l", "first", "src.qcow2", "src.qcow2", "v.raw", check=False)
    same_error(pq, pv)
    pq = qemu_img("convert", "-l", "first", "-f", "raw", "src.raw", "q.raw", check=False)
    pv = vdisk("convert", "-l", "first", "-f", "raw", "src.raw", "v.raw", check=False)
    same_error(pq, pv)


def test_measure_l_measures_the_snapshot(snapped):
    args = ["measure", "--output=json", "-O", "qcow2", "-l", "first", "src.qcow2"]
    assert vdisk(*args).stdout == qemu_img(*args).stdout


# ---- cache modes ----

@pytest.mark.parametrize("cmd", [
    ["commit", "-t", "bogus", "top.qcow2"],
    ["rebase", "-t", "bogus", "-b", "src.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-T", "bogus", "-b", "src.qcow2", "-F", "qcow2", "top.qcow2"],
    ["check", "-T", "bogus", "top.qcow2"],
    ["compare", "-T", "bogus", "top.qcow2", "src.qcow2"],
    ["convert", "-t", "bogus", "top.qcow2", "out.raw"],
    ["convert", "-T", "bogus", "top.qcow2", "out.raw"],
])
def test_invalid_cache_mode_refused_as_qemu_img(imgs, cmd):
    qemu_img("create", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", "top.qcow2")
    before = sha256("top.qcow2")
    pq = qemu_img(*cmd, check=False)
    pv = vdisk(*cmd, check=False)
    same_error(pq, pv)
    assert sha256("top.qcow2") == before


def test_io_invalid_cache_mode_refused_as_qemu_io(imgs):
    pq = qemu_io("-t", "bogus", "-c", "read 0 512", "src.qcow2", check=False)
    pv = vdisk("io", "-t", "bogus", "-c", "read 0 512", "src.qcow2", check=False)
    same_error(pq, pv)


def opened_direct(trace, name):
    return any(name in l and "O_DIRECT" in l for l in open(trace))


@pytest.mark.parametrize("cmd,direct_file", [
    (["check", "-T", "none", "top.qcow2"], "top.qcow2"),
    (["rebase", "-T", "none", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"], "new.qcow2"),
    (["rebase", "-T", "directsync", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
     "src.qcow2"),
])
def test_source_cache_none_opens_with_o_direct(imgs, cmd, direct_file):
    qemu_img("create", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_img("create", "-f", "qcow2", "new.qcow2", "24M")
    strace_vdisk("openat", "trace.txt", *cmd)
    assert opened_direct("trace.txt", direct_file)
    strace_vdisk("openat", "trace2.txt",
                 *[a if a not in ("none", "directsync") else "writeback" for a in cmd])
    assert not opened_direct("trace2.txt", direct_file)


# ---- rebase -U ----

def holds_write_perm_lock(ino):
    """Someone holds QEMU's "write" permission lock byte (100 + 1) on inode ino (/proc/locks)."""
    for line in open("/proc/locks"):
        f = line.split()
        if "OFDLCK" in f and f[-3].endswith(f":{ino}") and int(f[-2]) <= 101 <= int(f[-1]):
            return True
    return False


def test_rebase_U_opens_a_backing_another_process_writes(imgs):
    """Without -U the new backing's write lock (held by qemu-io) stops both tools; with it both
    rebase, and the result is the same."""
    for who in ("q", "v"):
        qemu_img("create", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", f"{who}top.qcow2")
    qemu_img("create", "-f", "qcow2", "new.qcow2", "24M")
    holder = subprocess.Popen(["qemu-io", "new.qcow2"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 30
        # wait for its locks without opening the image (an open could race qemu-io's locking)
        ino = os.stat("new.qcow2").st_ino
        while not holds_write_perm_lock(ino):
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.05)
        args = ["rebase", "-b", "new.qcow2", "-F", "qcow2"]
        pq = qemu_img(*args, "qtop.qcow2", check=False)
        pv = vdisk(*args, "vtop.qcow2", check=False)
        assert pq.returncode == pv.returncode == 1
        # vdisk's lock message says more than qemu-img's (one line, names -U): same start
        assert pv.stderr.split(": ", 1)[1].startswith(pq.stderr.split(": ", 1)[1].split("\n")[0])
        qemu_img(*args[:1], "-U", *args[1:], "qtop.qcow2")
        vdisk(*args[:1], "-U", *args[1:], "vtop.qcow2")
    finally:
        holder.communicate("quit\n", timeout=30)
    assert qemu_img("compare", "vtop.qcow2", "qtop.qcow2").returncode == 0
    assert qemu_img("compare", "-F", "qcow2", "vtop.qcow2", "src.qcow2").returncode == 0


# ---- options qemu-img does not have ----

def test_resize_refuses_U_as_qemu_img(imgs):
    pq = qemu_img("resize", "-U", "src.qcow2", "32M", check=False)
    pv = vdisk("resize", "-U", "src.qcow2", "32M", check=False)
    assert pv.returncode == pq.returncode == 1
    assert pv.stderr.splitlines()[0].split(": ", 1)[1] == pq.stderr.splitlines()[0].split(": ", 1)[1]
    assert qemu_img("info", "--output=json", "src.qcow2").stdout.count('"virtual-size": 25165824')


# ---- vdisk io (qemu-io) ----

@pytest.mark.parametrize("cmd", ["read -C 0 4k", "write -C 0 4k", "discard -C 0 64k"])
def test_io_C_prints_qemu_io_machine_format(imgs, cmd):
    pq = qemu_io("-c", cmd, "src.qcow2")
    pv = vdisk("io", "-c", cmd, "src.qcow2")
    mq = re.match(r"^(\d+),(\d+),(\d+):(\d\d):(\d\d\.\d\d),([0-9.]+),([0-9.]+)\n$", pq.stdout)
    mv = re.match(r"^(\d+),(\d+),(\d+):(\d\d):(\d\d\.\d\d),([0-9.]+),([0-9.]+)\n$", pv.stdout)
    assert mq and mv, (pq.stdout, pv.stdout)
    assert mv.group(1, 2) == mq.group(1, 2)


def test_io_write_b_is_refused_not_written_to_the_disk(imgs):
    qemu_img("convert", "-O", "raw", "src.qcow2", "before.raw")
    before = sha256("before.raw")
    p = vdisk("io", "-c", "write -b -P 0x55 0 512", "src.qcow2", check=False)
    assert p.returncode == 1 and "not supported" in p.stdout
    qemu_img("convert", "-O", "raw", "src.qcow2", "after.raw")
    assert sha256("after.raw") == before


# ---- qemu-img's words when an image cannot be opened ----

@pytest.mark.parametrize("cmd", [
    ["info", "{missing}"], ["check", "{missing}"], ["map", "{missing}"],
    ["convert", "{missing}", "out.raw"], ["compare", "src.qcow2", "{missing}"],
    ["snapshot", "-l", "{missing}"], ["commit", "{missing}"], ["rebase", "-b", "", "{missing}"],
    ["measure", "-O", "qcow2", "{missing}"], ["dd", "if={missing}", "of=out.raw"],
    ["bench", "-c", "1", "{missing}"], ["info", "-f", "qcow2", "src.raw"],
    ["check", "-f", "bogus", "src.qcow2"], ["convert", "-f", "bogus", "src.qcow2", "out.raw"],
    ["map", "-f", "bogus", "src.qcow2"], ["resize", "-f", "bogus", "src.qcow2", "32M"],
])
def test_open_errors_word_for_word(imgs, cmd):
    cmd = [a.replace("{missing}", "missing.img") for a in cmd]
    pq = qemu_img(*cmd, check=False)
    pv = vdisk(*cmd, check=False)
    same_error(pq, pv)
    assert pv.returncode in (1, 2)


# ---- the warning for a raw image whose format was probed ----

@pytest.mark.parametrize("cmd", [
    ["resize", "IMG", "2M"], ["amend", "-o", "size=1M", "IMG"], ["rebase", "-u", "-b", "", "IMG"],
    ["rebase", "-u", "IMG"],
    ["snapshot", "-c", "s1", "IMG"], ["commit", "IMG"], ["bitmap", "--add", "IMG", "b0"],
    ["check", "-r", "all", "IMG"], ["info", "IMG"], ["map", "IMG"], ["compare", "IMG", "IMG"],
    ["convert", "IMG", "out.raw"], ["convert", "-n", "-O", "raw", "IMG", "IMG2"],
])
def test_probed_raw_warning_word_for_word(tmp, cmd):
    """Opened read-write without -f, a raw image gets QEMU's three-line warning (naming the
    file) before anything else the command says; opened read-only, none - as qemu-img."""
    os.chdir(tmp)
    out = {}
    for tool, argv0 in (("q", ["qemu-img"]), ("v", [VDISK])):
        qemu_img("create", "-f", "raw", f"{tool}.raw", "1M")
        qemu_img("create", "-f", "raw", f"{tool}2.raw", "1M")
        args = [a.replace("IMG2", f"{tool}2.raw").replace("IMG", f"{tool}.raw") for a in cmd]
        p = run([*argv0, *args], check=False)
        err = p.stderr.replace(f"{tool}.raw", "IMG").replace("vdisk", "qemu-img")
        out[tool] = (p.returncode, re.sub(r"#block\d+", "#blockN", err))  # QEMU's node names
        if os.path.exists("out.raw"):
            os.unlink("out.raw")
    assert out["v"] == out["q"]
    warned = out["q"][1].startswith("WARNING: Image format was not specified for 'IMG' and "
                                    "probing guessed raw.\n")
    assert warned == (cmd[0] not in ("info", "map", "compare", "convert") and cmd[:2] != ["check", "IMG"])


@pytest.mark.parametrize("name_len", [600, 1100])
def test_rebase_header_room_errors_as_qemu_img(tmp, name_len):
    """A backing name with no room in a 512-byte header cluster (ENOSPC: qemu-img's own words)
    or longer than 1023 bytes (EINVAL): the same message, the image unchanged."""
    os.chdir(tmp)
    for tool in ("q", "v"):
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", f"{tool}.qcow2", "1M")
    before = sha256("v.qcow2")
    name = "x" * name_len
    pq = qemu_img("rebase", "-u", "-b", name, "-F", "raw", "q.qcow2", check=False)
    pv = vdisk("rebase", "-u", "-b", name, "-F", "raw", "v.qcow2", check=False)
    same_error(pq, pv)
    assert pv.stderr.replace("vdisk", "qemu-img") == pq.stderr
    assert sha256("v.qcow2") == before
