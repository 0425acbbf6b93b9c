"""vdisk dd and vdisk bench against qemu-img 7.2: dd's output (size rule, bytes) is what qemu-img
dd writes for the same operands; bench prints qemu-img's lines, writes its pattern where qemu-img
would, and both refuse the same mistakes with the same words and exit codes."""
import pytest

from conftest import assert_qemu_check_clean, qemu_img, qemu_io, qemu_io_cmds, run, sha256, VDISK

MiB = 1 << 20


@pytest.fixture
def src(tmp):
    img = tmp / "src.qcow2"
    qemu_img("create", "-f", "qcow2", img, 4 * MiB)
    qemu_io_cmds(img, ["write -P 5 0 1M", "write -P 6 1536k 100k", "write -c -P 7 3M 64k"])
    return img


DD_CASES = [
    [], ["bs=64k", "count=3", "skip=1"], ["bs=1k", "count=2", "skip=1"], ["skip=100"],
    ["bs=1000"], ["bs=1M", "count=100"], ["bs=1.5k", "count=1k"], ["skip=9000"], ["count=0"],
]


@pytest.mark.parametrize("ops", DD_CASES, ids=[" ".join(c) or "defaults" for c in DD_CASES])
@pytest.mark.parametrize("ofmt", ["raw", "qcow2"])
def test_dd_output_matches_qemu_img(tmp, src, ops, ofmt):
    q = run(["qemu-img", "dd", "-O", ofmt, *ops, f"if={src}", f"of={tmp / 'q.out'}"], check=False)
    v = run([VDISK, "dd", "-f", "qcow2", "-O", ofmt, *ops, f"if={src}", f"of={tmp / 'v.out'}"],
            check=False)
    assert v.returncode == q.returncode == 0
    assert v.stderr == q.stderr.replace("qemu-img", "vdisk")
    p = qemu_img("compare", "-f", ofmt, "-F", ofmt, tmp / "q.out", tmp / "v.out", check=False)
    assert p.returncode == 0, p.stdout
    qi = qemu_img("info", "--output=json", "-f", ofmt, tmp / "q.out").stdout
    vi = qemu_img("info", "--output=json", "-f", ofmt, tmp / "v.out").stdout
    assert '"virtual-size"' in qi and qi.split('"virtual-size"')[1].split(",")[0] == \
        vi.split('"virtual-size"')[1].split(",")[0]
    if ofmt == "qcow2":
        assert_qemu_check_clean(tmp / "v.out")


@pytest.mark.parametrize("ops", [["bs=abc"], ["bs=0"], ["bs=4G"], ["count=abc"], ["skip=-1"],
                                 ["foo=1"], ["bogus"]])
def test_dd_bad_operands_like_qemu_img(tmp, src, ops):
    q = run(["qemu-img", "dd", *ops, f"if={src}", f"of={tmp / 'q.out'}"], check=False)
    v = run([VDISK, "dd", *ops, f"if={src}", f"of={tmp / 'v.out'}"], check=False)
    assert v.returncode == q.returncode == 1
    assert v.stderr.replace("vdisk: ", "") == q.stderr.replace("qemu-img: ", "")
    assert not (tmp / "v.out").exists()


def test_dd_needs_both_files(src):
    for args in ([f"if={src}"], ["of=/nonexistent/x"]):
        v = run([VDISK, "dd", *args], check=False)
        assert (v.returncode, v.stderr) == (1, "vdisk: Must specify both input and output files\n")


def bench_lines(out):
    """qemu-img bench's output with the (timing) number taken out of the last line."""
    lines = out.splitlines()
    assert lines[-1].startswith("Run completed in ") and lines[-1].endswith(" seconds.")
    return lines[:-1]


BENCH_CASES = [
    ["-c", "1000"],
    ["-w", "-c", "100", "-d", "4", "-s", "8k", "-S", "16k", "-o", "4096", "--pattern=7",
     "--flush-interval=10"],
    ["-w", "-c", "50", "-d", "8", "--flush-interval=8", "--no-drain", "--pattern=0x2a"],
    ["-c", "3", "-d", "2", "-S", "3M"],
    ["-q", "-c", "10", "-U"],
    ["-c", "0"],
    ["-c", "10", "-t", "none"],
    # native AIO with O_DIRECT, io_uring with or without: vdisk's one engine does the I/O
    ["-n", "-c", "10", "-t", "none"], ["-i", "native", "-w", "-c", "10", "-t", "directsync"],
    ["-i", "io_uring", "-c", "10"], ["-n", "-i", "io_uring", "-c", "10", "-t", "none"],
    ["-i", "threads", "-c", "10"],
]


@pytest.mark.parametrize("args", BENCH_CASES, ids=[" ".join(a) for a in BENCH_CASES])
def test_bench_prints_like_qemu_img(tmp, args):
    qimg, vimg = tmp / "q.qcow2", tmp / "v.qcow2"
    for img in (qimg, vimg):
        qemu_img("create", "-f", "qcow2", img, 4 * MiB)
    q = run(["qemu-img", "bench", "-f", "qcow2", *args, str(qimg)])
    v = run([VDISK, "bench", "-f", "qcow2", *args, str(vimg)])
    assert bench_lines(v.stdout) == bench_lines(q.stdout)
    assert v.stderr == ""
    # writes leave what qemu-img's leave: same guest content, and check clean
    p = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", qimg, vimg, check=False)
    assert p.returncode == 0, p.stdout
    assert_qemu_check_clean(vimg)


@pytest.mark.parametrize("args", [
    ["-c", "abc"], ["-d", "x"], ["-s", "-1"], ["--pattern=300"], ["--flush-interval=10"],
    ["-w", "--flush-interval=10"], ["-t", "bogus"], ["-o", "5M", "-c", "1"], ["-x"],
    ["-S", "1Q"], ["-o", "-1"], ["-i", "bogus"],
    # native AIO needs cache.direct=on; -i threads never clears -n; -i and -t fail where given
    ["-n"], ["-i", "native", "-w"], ["-i", "io_uring", "-n"], ["-n", "-i", "threads"],
    ["-n", "-t", "unsafe"], ["-t", "bogus", "-i", "bogus"], ["-i", "bogus", "-t", "bogus"],
    ["-n", "-U", "-w"],
])
def test_bench_errors_like_qemu_img(tmp, args):
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, 4 * MiB)
    before = sha256(img)
    q = run(["qemu-img", "bench", *args, str(img)], check=False)
    v = run([VDISK, "bench", *args, str(img)], check=False)
    assert v.returncode == q.returncode == 1
    assert v.stdout == q.stdout
    # word for word, usage errors' "Try '... --help'" line included (the program's name aside)
    assert v.stderr.replace("vdisk", "qemu-img") == q.stderr
    assert sha256(img) == before


@pytest.mark.parametrize("name", ["missing.raw", "null-co://"])
def test_bench_native_checks_only_files_like_qemu_img(tmp, name):
    """-n's cache.direct check is file-posix's: an absent file fails to open first, null-co has
    no check."""
    q = run(["qemu-img", "bench", "-n", "-c", "1", name], check=False, cwd=tmp)
    v = run([VDISK, "bench", "-n", "-c", "1", name], check=False, cwd=tmp)
    assert v.returncode == q.returncode
    assert v.stderr.replace("vdisk", "qemu-img") == q.stderr
    if q.returncode == 0:
        assert bench_lines(v.stdout) == bench_lines(q.stdout)
    else:
        assert v.stdout == q.stdout == ""


def test_bench_write_pattern_lands_where_asked(tmp):
    img = tmp / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, 4 * MiB)
    run([VDISK, "bench", "-w", "-c", "8", "-d", "3", "-s", "4k", "-S", "64k", "-o", "8k",
         "--pattern=0x5a", str(img)])
    cmds = []
    for i in range(8):
        cmds += ["-c", f"read -P 0x5a {8192 + i * 65536} 4k",
                 "-c", f"read -P 0 {8192 + i * 65536 + 4096} 60k"]
    p = qemu_io("-f", "qcow2", *cmds, img)
    assert "Pattern verification failed" not in p.stdout
