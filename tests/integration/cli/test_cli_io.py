"""vdisk io (qemu-io style) compared with qemu-io, plus the tool's global behaviour."""
import json
import os
import re
import subprocess

import pytest

from conftest import VDISK, assert_qemu_check_clean, qemu_img, qemu_io, run, sha256, vdisk

TIMING = re.compile(r"^.*, \d+ ops; .* \(.*/sec and .* ops/sec\)$")


def strip_timing(text):
    return "\n".join(l for l in text.splitlines() if not TIMING.match(l))


def io_both(tmp, fmt, cmds, size="4M", setup=None, extra=()):
    paths = []
    for tool in ("q", "v"):
        p = tmp / f"{tool}.{fmt}"
        qemu_img("create", "-f", fmt, p, size)
        if setup:
            qemu_io("-f", fmt, *sum((["-c", c] for c in setup), []), p)
        paths.append(p)
    cargs = sum((["-c", c] for c in cmds), [])
    pq = qemu_io("-f", fmt, *extra, *cargs, paths[0], check=False)
    pv = vdisk("io", "-f", fmt, *extra, *cargs, paths[1], check=False)
    return paths, pq, pv


CMDS = [
    ["write -P 0xab 0 64k", "read -P 0xab 0 64k", "read -P 0 64k 64k"],
    ["write 1k 1536", "read -v 1000 100"],
    ["write -P 1 100 1", "read -P 1 100 1", "read -P 0 0 100", "read -v 90 20"],
    ["write -z 0 64k", "write -P 3 1M 4k", "discard 1M 4k", "read -P 0 0 4k"],
    ["write -z -u 0 128k", "read -P 0 0 128k"],
    ["write -P 7 3M 1M", "flush", "length", "read -P 7 3M 1M"],
    ["write -P 5 0 4k", "map"],
    ["write -P 5 64k 64k", "write -z 256k 64k", "alloc 0 1M", "alloc 64k 64k", "map"],
    ["write -P 2 0 1k", "write -P 2 1k 1k", "read -q -P 2 0 2k", "write -q 0 1"],
    ["length", "info"],
]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("cmds", CMDS, ids=range(len(CMDS)))
def test_io_matches_qemu_io(tmp, fmt, cmds):
    paths, pq, pv = io_both(tmp, fmt, cmds)
    assert pq.returncode == 0
    assert pv.returncode == 0, pv.stderr
    assert strip_timing(pv.stdout) == strip_timing(pq.stdout)
    # Every timing line has qemu-io's shape.
    assert len([l for l in pv.stdout.splitlines() if TIMING.match(l)]) == \
        len([l for l in pq.stdout.splitlines() if TIMING.match(l)])
    qemu_img("compare", "-f", fmt, "-F", fmt, paths[0], paths[1])
    if fmt == "qcow2":
        assert_qemu_check_clean(paths[1])


def test_io_compressed_write(tmp):
    paths, pq, pv = io_both(tmp, "qcow2", ["write -c -P 9 0 64k", "read -P 9 0 64k"])
    assert pv.returncode == 0
    assert strip_timing(pv.stdout) == strip_timing(pq.stdout)
    assert_qemu_check_clean(paths[1])
    qemu_img("compare", paths[0], paths[1])


def test_io_backing_chain(tmp):
    os.chdir(tmp)
    qemu_img("create", "-f", "qcow2", "b.qcow2", "1M")
    qemu_io("-c", "write -P 1 0 1M", "b.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2")
    cmds = ["write -P 2 64k 4k", "read -P 1 0 64k", "read -P 2 64k 4k", "read -P 1 68k 60k",
            "map", "alloc 0 1M", "write -z -u 128k 64k", "read -P 0 128k 64k", "map", "info"]
    cargs = sum((["-c", c] for c in cmds), [])
    run(["cp", "t.qcow2", "t2.qcow2"])
    pq = qemu_io(*cargs, "t2.qcow2")
    pv = vdisk("io", *cargs, "t.qcow2")
    assert strip_timing(pv.stdout) == strip_timing(pq.stdout)
    qemu_img("compare", "t.qcow2", "t2.qcow2")


def test_io_pattern_failure_exits_nonzero(tmp):
    paths, pq, pv = io_both(tmp, "raw", ["write -P 1 0 512", "read -P 2 0 512"])
    assert strip_timing(pv.stdout) == strip_timing(pq.stdout)
    assert "Pattern verification failed at offset 0, 512 bytes" in pv.stdout
    assert pv.returncode == 1  # qemu-io says 0; vdisk deliberately fails


def test_io_read_past_end(tmp):
    paths, pq, pv = io_both(tmp, "raw", ["read 4M 1", "write 4095k 2k"])
    assert strip_timing(pv.stdout) == strip_timing(pq.stdout)
    assert pv.returncode == 1


def test_io_bad_command_and_args(tmp):
    _, pq, pv = io_both(tmp, "raw", ["bogus"])
    assert pv.stderr == pq.stderr == 'command "bogus" not found\n'
    assert pv.returncode == 1
    _, pq, pv = io_both(tmp, "raw", ["read x 1", "write -P 300 0 1", "write -z -P 1 0 1"])
    assert strip_timing(pv.stdout) == strip_timing(pq.stdout)
    assert pv.returncode == 1


def test_io_read_only(tmp):
    p = tmp / "r.raw"
    qemu_img("create", "-f", "raw", p, "1M")
    os.chmod(p, 0o444)
    pv = vdisk("io", "-r", "-f", "raw", "-c", "read 0 4k", p)
    assert pv.stdout.startswith("read 4096/4096 bytes at offset 0\n")
    pv = vdisk("io", "-r", "-f", "raw", "-c", "write 0 4k", p, check=False)
    assert pv.returncode == 1


def test_io_stdin_mode_flush_marker(tmp):
    p = tmp / "s.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    proc = subprocess.Popen([VDISK, "io", str(p)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("write -P 4 0 64k\n")
        proc.stdin.write("flush\n")
        proc.stdin.flush()
        # The marker must arrive while the process is still running (stdout flushed per command).
        lines = [proc.stdout.readline(), proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0] == "wrote 65536/65536 bytes at offset 0\n"
        assert lines[2] == "flushed\n"
        proc.stdin.write("read -P 4 0 64k\nquit\n")
        proc.stdin.close()
        out = proc.stdout.read()
        assert out.startswith("read 65536/65536 bytes at offset 0\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_qemu_check_clean(p)


def test_io_stdin_failure_status(tmp):
    p = tmp / "s.raw"
    qemu_img("create", "-f", "raw", p, "1M")
    pv = vdisk("io", "-f", "raw", p, input="write -P 1 0 1k\nread -P 2 0 1k\n", check=False)
    assert pv.returncode == 1


# ---- global behaviour ----

def test_help_and_version():
    p = vdisk("--help")
    for cmd in ("create", "info", "map", "check", "compare", "convert", "commit", "rebase",
                "resize", "measure", "io"):
        assert f"  {cmd} " in p.stdout
    assert "--allow-probe" in p.stdout
    assert vdisk("--version").stdout.startswith("vdisk version ")
    assert vdisk("info", "--help").stdout.startswith("usage: vdisk info")


def supported_formats(help_text):
    line = [l for l in help_text.splitlines() if l.startswith("Supported formats:")]
    assert len(line) == 1, help_text
    return line[0].split(":", 1)[1].split()


def test_help_lists_the_drivers_it_has(tmp):
    """The help's "Supported formats:" line, as qemu-img's: the driver registry's names, sorted,
    each one of qemu-img's; the formats `vdisk create` makes are there, one it lacks is not and
    is refused by name."""
    ours = supported_formats(vdisk("--help").stdout)
    assert ours == sorted(ours)
    assert set(ours) <= set(supported_formats(qemu_img("--help").stdout)), ours
    for fmt in ("qcow2", "raw", "luks"):
        assert fmt in ours, ours
    assert "vmdk" not in ours
    p = vdisk("create", "-f", "vmdk", tmp / "x.vmdk", "1M", check=False)
    assert p.returncode == 1 and "Unknown file format 'vmdk'" in p.stderr, p.stderr


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["info"], ["info", "--bogus", "x"],
                                  ["convert", "-O"], ["map", "a", "b"]])
def test_usage_errors_as_qemu_img(args):
    """qemu-img's message and its "Try '... --help' for more information" line, exit 1."""
    p = vdisk(*args, check=False)
    q = qemu_img(*args, check=False)
    assert p.returncode == q.returncode == 1
    assert p.stderr.replace("vdisk", "qemu-img") == q.stderr
    assert p.stderr.endswith("\nTry 'vdisk --help' for more information\n"), p.stderr


def test_backing_without_format_needs_allow_probe(tmp):
    os.chdir(tmp)
    qemu_img("create", "-f", "raw", "b.raw", "1M")
    qemu_io("-f", "raw", "-c", "write -P 3 0 1M", "b.raw")
    qemu_img("create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "t.qcow2", "1M")
    # Hide the backing format header extension (unknown extensions are ignored): no format
    # is recorded any more, as in images made by old tools.
    data = bytearray(open("t.qcow2", "rb").read())
    i = data.index((0xE2792ACA).to_bytes(4, "big"), 72)
    data[i:i + 4] = (0x12345678).to_bytes(4, "big")
    open("t.qcow2", "wb").write(bytes(data))
    assert "backing-filename-format" not in qemu_img("info", "--output=json", "t.qcow2").stdout
    p = vdisk("io", "-c", "read -P 3 0 4k", "t.qcow2", check=False)
    assert p.returncode == 1 and p.stderr.startswith("vdisk: ")
    p = vdisk("--allow-probe", "io", "-c", "read -P 3 0 4k", "t.qcow2")
    assert p.stdout.startswith("read 4096/4096")
    p = vdisk("compare", "--allow-probe", "-F", "raw", "t.qcow2", "b.raw")
    assert p.stdout == "Images are identical.\n"


def test_damaged_image_fails_cleanly(tmp):
    p = tmp / "d.qcow2"
    qemu_img("create", "-f", "qcow2", p, "4M")
    qemu_io("-c", "write -P 1 0 1M", p)
    data = bytearray(open(p, "rb").read())
    # Point the L1 table far past the end of the file.
    data[40:48] = (1 << 50).to_bytes(8, "big")
    open(p, "wb").write(bytes(data))
    for args in (["info", p], ["map", "--output=json", p], ["check", p],
                 ["convert", "-O", "raw", p, tmp / "o.raw"], ["compare", p, p],
                 ["io", "-c", "read 0 4k", p]):
        r = vdisk(*args, check=False)
        assert r.returncode >= 0, r.stderr
        assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr
        if args[0] == "check":
            # qemu-img check's exit codes: 2 = corruptions found, 3 = only leaks found; the
            # report (ERROR/Leaked lines on stderr, summary on stdout) is qemu-img's own.
            q = qemu_img("check", p, check=False)
            assert (r.returncode, r.stdout, r.stderr) == (q.returncode, q.stdout, q.stderr)
            assert r.returncode == 2
            continue
        if r.returncode:
            assert r.stderr.startswith("vdisk: ") or "failed" in r.stdout, (args, r.stderr)


def test_image_locking_and_force_share(tmp):
    """An image QEMU has open read-write is refused unless -U (read-only commands)."""
    p = tmp / "lk.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    holder = subprocess.Popen(["qemu-io", str(p)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # qemu-io answers a command only once the image is open (and locked).
        holder.stdin.write("length\n")
        holder.stdin.flush()
        assert "1 MiB" in holder.stdout.readline()
        r = vdisk("info", p, check=False)
        assert r.returncode == 1 and r.stderr.startswith("vdisk: ") and r.stderr.count("\n") == 1
        assert vdisk("info", "-U", p).stdout.startswith(f"image: {p}\n")
        assert vdisk("map", "-U", "--output=json", p).returncode == 0
        r = vdisk("io", "-c", "write 0 4k", p, check=False)
        assert r.returncode == 1
    finally:
        holder.stdin.write("quit\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    assert vdisk("info", p).returncode == 0


def _write_sync_sequence(cmd, img, tmp):
    """The image's pwrite*/fdatasync/fsync calls in order ('w' / 's'), and whether the image was
    opened with O_DIRECT, from strace."""
    log = tmp / "strace.txt"
    env = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0")
    subprocess.run(["strace", "-f", "-qq", "-e",
                    "trace=openat,pwrite64,pwritev,pwritev2,fdatasync,fsync", "-o", str(log),
                    *map(str, cmd)], check=True, capture_output=True, env=env, timeout=120)
    seq, direct = "", False
    for line in open(log):
        if "openat(" in line and str(img) in line and "O_DIRECT" in line:
            direct = True
        elif "pwrite" in line and "= -1" not in line:
            seq += "w"
        elif "sync(" in line:
            seq += "s"
    return seq, direct


@pytest.mark.parametrize("tool", ["qemu-io", "vdisk"])
@pytest.mark.parametrize("cache", ["writeback", "writethrough", "directsync", "none"])
def test_cache_mode_syncs_each_write_as_qemu(tmp, tool, cache):
    """-t writethrough and directsync make each write durable before the next one starts (a sync
    after every write), as QEMU's disabled write cache does; writeback and none do not; none and
    directsync open with O_DIRECT. qemu-io is checked against the same rules."""
    img = tmp / "r.raw"
    qemu_img("create", "-q", "-f", "raw", img, "4M")
    argv = ["qemu-io"] if tool == "qemu-io" else [VDISK, "io"]
    writes = ["write -P 1 0 64k", "write -P 2 64k 64k", "write -P 3 1M 64k", "write -P 4 2M 4k"]
    seq, direct = _write_sync_sequence([*argv, "-f", "raw", "-t", cache,
                                        *sum((["-c", w] for w in writes), []), img], img, tmp)
    assert seq.count("w") == len(writes), seq
    assert direct == (cache in ("none", "directsync"))
    if cache in ("writethrough", "directsync"):
        assert "ww" not in seq and seq.startswith("ws"), seq
    else:
        assert seq.startswith("wwww"), seq
    qemu_io("-f", "raw", "-c", "read -P 4 2M 4k", "-c", "read -P 2 64k 64k", img)


def test_untouched_parts_of_a_new_overlay_cluster_stay_holes(tmp):
    """README's deliberate difference: a 4 KiB write into a new cluster of an overlay whose
    backing has nothing there leaves the rest of the cluster unwritten (a hole before the data,
    and past the end of the file after it) where qemu-io writes zeroes: the images read the same
    and check clean; qemu-img map shows those parts as zero:true data:true in vdisk's only."""
    qemu_img("create", "-f", "qcow2", tmp / "base.qcow2", "4M")
    for tool in ("q", "v"):
        qemu_img("create", "-f", "qcow2", "-b", tmp / "base.qcow2", "-F", "qcow2",
                 tmp / f"{tool}.qcow2")
    qemu_io("-c", "write -P 1 1056k 4k", tmp / "q.qcow2")
    vdisk("io", "-c", "write -P 1 1056k 4k", tmp / "v.qcow2")
    qemu_img("compare", tmp / "q.qcow2", tmp / "v.qcow2")
    assert_qemu_check_clean(tmp / "v.qcow2")

    def top(tool):
        m = qemu_img("map", "--output=json", tmp / f"{tool}.qcow2").stdout
        return [(e["start"], e["length"], e["zero"], e["data"]) for e in json.loads(m)
                if e["depth"] == 0]
    assert top("q") == [(1 << 20, 65536, False, True)]
    assert top("v") == [(1 << 20, 32768, True, True), (1056 << 10, 4096, False, True),
                        (1060 << 10, 28672, True, True)]
    assert os.path.getsize(tmp / "v.qcow2") < os.path.getsize(tmp / "q.qcow2")
