"""vdisk convert / compare against qemu-img 7.2: same bytes, same allocation, same messages."""
import json
import os
import subprocess

import pytest

from conftest import VDISK, assert_qemu_check_clean, qemu_img, qemu_io, run, sha256, vdisk


@pytest.fixture
def src(tmp):
    """A qcow2 chain and a raw image with data, zero runs, holes and a small zero hole in data."""
    os.chdir(tmp)
    qemu_img("create", "-f", "qcow2", "base.qcow2", "8M")
    qemu_io("-c", "write -P 1 0 1M", "-c", "write -P 6 6M 64k", "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    qemu_io("-c", "write -P 2 512k 64k", "-c", "write -z 128k 64k", "-c", "write -P 3 2M 8k",
            "-c", "write -z 2099200 2k", "-c", "write -P 4 3M 100k", "-c", "write -c 5M 64k",
            "-c", "write -z 6M 64k", "top.qcow2")
    qemu_img("convert", "-O", "raw", "top.qcow2", "src.raw")
    return tmp


def convert_both(args, out_q, out_v):
    pq = qemu_img("convert", *args, out_q, check=False)
    pv = vdisk("convert", *args, out_v, check=False)
    assert pv.returncode == pq.returncode, pv.stderr
    assert pv.stdout == pq.stdout
    return pq, pv


def jmap(path, fmt="qcow2"):
    return json.loads(qemu_img("map", "-f", fmt, "--output=json", path).stdout)


@pytest.mark.parametrize("args", [
    ["-O", "raw", "top.qcow2"],
    ["-O", "raw", "-f", "raw", "src.raw"],
    ["-O", "raw", "-S", "0", "top.qcow2"],
    ["-O", "raw", "-S", "64k", "-f", "raw", "src.raw"],
    ["-O", "raw", "-m", "1", "-W", "top.qcow2"],
])
def test_convert_to_raw_byte_identical(src, args):
    convert_both(args, "q.raw", "v.raw")
    assert sha256("v.raw") == sha256("q.raw")
    assert os.path.getsize("v.raw") == os.path.getsize("q.raw")


@pytest.mark.parametrize("args", [
    ["-O", "qcow2", "top.qcow2"],
    ["-O", "qcow2", "-f", "raw", "src.raw"],
    ["-O", "qcow2", "-S", "0", "-f", "raw", "src.raw"],
    ["-O", "qcow2", "-S", "8k", "top.qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "top.qcow2"],
    ["-O", "qcow2", "-o", "compat=0.10,cluster_size=128k", "-f", "raw", "src.raw"],
    ["-O", "qcow2", "-o", "preallocation=metadata", "top.qcow2"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-O", "qcow2", "-f", "qcow2", "base.qcow2"],
])
def test_convert_to_qcow2_like_qemu(src, args):
    convert_both(args, "q.qcow2", "v.qcow2")
    qemu_img("compare", "q.qcow2", "v.qcow2")
    source = args[-1]
    qemu_img("compare", "-f", "raw" if source.endswith(".raw") else "qcow2", "-F", "qcow2",
             source, "v.qcow2")
    assert_qemu_check_clean("v.qcow2")
    # Same allocation as qemu-img's result (which clusters hold data, zeroes, or nothing).
    strip = lambda m: [{k: e[k] for k in ("start", "length", "depth", "present", "zero", "data")}
                       for e in m]
    assert strip(jmap("v.qcow2")) == strip(jmap("q.qcow2"))
    iq = json.loads(qemu_img("info", "--output=json", "q.qcow2").stdout)
    iv = json.loads(qemu_img("info", "--output=json", "v.qcow2").stdout)
    for k in ("filename", "actual-size"):
        iq.pop(k)
        iv.pop(k)
    assert iv == iq


@pytest.mark.parametrize("threads", ["1", "4"])
def test_convert_writes_in_order_with_many_chunks(tmp, threads):
    """Chunks read ahead by several workers are written in guest order (one worker writes every
    chunk ready in sequence): the output's clusters ascend with the guest offset as in
    qemu-img's output, and read like the source."""
    os.chdir(tmp)
    qemu_img("create", "-f", "qcow2", "s.qcow2", "48M")
    qemu_io(*[a for i in range(24) for a in
              ("-c", f"write -P {i + 1} {i * 2 * 1024 * 1024 + (i % 3) * 65536} {(i % 4) * 256 + 320}k")],
            "s.qcow2")
    convert_both(["-m", threads, "-O", "qcow2", "s.qcow2"], "q.qcow2", "v.qcow2")
    qemu_img("compare", "s.qcow2", "v.qcow2")
    assert_qemu_check_clean("v.qcow2")
    for out in ("q.qcow2", "v.qcow2"):
        data = [e for e in jmap(out) if e["data"]]
        assert len(data) == 24, out
        offs = [e["offset"] for e in data]
        assert offs == sorted(offs), out


def test_convert_result_reads_like_source(src):
    for fmt in ("raw", "qcow2"):
        vdisk("convert", "-O", fmt, "top.qcow2", f"o.{fmt}")
        qemu_img("compare", "-F", fmt, "top.qcow2", f"o.{fmt}")
        qemu_img("compare", "-f", "raw", "-F", fmt, "src.raw", f"o.{fmt}")


def test_convert_compressed(src):
    convert_both(["-c", "-O", "qcow2", "top.qcow2"], "q.qcow2", "v.qcow2")
    qemu_img("compare", "top.qcow2", "v.qcow2")
    assert_qemu_check_clean("v.qcow2")
    chk = json.loads(qemu_img("check", "--output=json", "v.qcow2").stdout)
    assert chk["compressed-clusters"] > 0
    # Compressed output is smaller than an uncompressed conversion.
    vdisk("convert", "-O", "qcow2", "top.qcow2", "plain.qcow2")
    assert os.path.getsize("v.qcow2") < os.path.getsize("plain.qcow2")


def test_convert_compressed_unaligned_tail(tmp):
    os.chdir(tmp)
    qemu_img("create", "-f", "raw", "s.raw", "200k")
    qemu_io("-f", "raw", "-c", "write -P 5 0 200k", "s.raw")
    convert_both(["-c", "-O", "qcow2", "-f", "raw", "s.raw"], "q.qcow2", "v.qcow2")
    qemu_img("compare", "-f", "raw", "s.raw", "v.qcow2")
    assert_qemu_check_clean("v.qcow2")


def test_convert_backing_different_from_source_backing(src):
    """-B naming another image: the output must still read exactly like the source."""
    qemu_img("create", "-f", "qcow2", "other.qcow2", "8M")
    qemu_io("-c", "write -P 9 0 8M", "other.qcow2")
    vdisk("convert", "-O", "qcow2", "-B", "other.qcow2", "-F", "qcow2", "top.qcow2", "v.qcow2")
    info = json.loads(qemu_img("info", "--output=json", "v.qcow2").stdout)
    assert info["backing-filename"] == "other.qcow2"
    qemu_img("compare", "top.qcow2", "v.qcow2")
    assert_qemu_check_clean("v.qcow2")


def test_convert_no_create(src):
    qemu_img("create", "-f", "qcow2", "q.qcow2", "8M")
    qemu_io("-c", "write -P 7 0 8M", "q.qcow2")
    run(["cp", "q.qcow2", "v.qcow2"])
    convert_both(["-n", "-O", "qcow2", "top.qcow2"], "q.qcow2", "v.qcow2")
    qemu_img("compare", "top.qcow2", "v.qcow2")
    qemu_img("compare", "q.qcow2", "v.qcow2")
    assert_qemu_check_clean("v.qcow2")
    # raw target, existing garbage must be overwritten (zero ranges too)
    with open("v.raw", "wb") as f:
        f.write(b"\xff" * (8 << 20))
    vdisk("convert", "-n", "-O", "raw", "top.qcow2", "v.raw")
    assert sha256("v.raw") == sha256("src.raw")


@pytest.mark.parametrize("target", ["driver=qcow2,file.filename={}.qcow2",
                                    "driver=raw,file.driver=file,file.filename={}.raw"])
def test_convert_target_image_opts(src, target):
    """--target-image-opts (with -n): the target named by an option list, written as qemu-img
    writes it; without -n, or with -O as well, qemu-img's refusals."""
    for t in ("q", "v"):
        qemu_img("create", "-f", "qcow2", f"{t}.qcow2", "8M")
        qemu_io("-c", "write -P 7 0 8M", f"{t}.qcow2")
        with open(f"{t}.raw", "wb") as f:
            f.write(b"\xff" * (8 << 20))
    convert_both(["-n", "--target-image-opts", "top.qcow2"], target.format("q"),
                 target.format("v"))
    out = "qcow2" if "qcow2" in target else "raw"
    qemu_img("compare", "-f", "qcow2", "-F", out, "top.qcow2", f"v.{out}")
    assert sha256(f"v.{out}") == sha256(f"q.{out}") or out == "qcow2"
    for args in (["--target-image-opts"], ["-n", "--target-image-opts", "-O", out]):
        pq, pv = convert_both([*args, "top.qcow2"], target.format("q"), target.format("v"))
        assert pq.returncode == 1
        assert pv.stderr.replace("vdisk", "qemu-img").replace("v.", "q.") == pq.stderr


def test_convert_target_is_zero(src):
    qemu_img("create", "-f", "raw", "v.raw", "8M")
    vdisk("convert", "-n", "--target-is-zero", "-O", "raw", "top.qcow2", "v.raw")
    assert sha256("v.raw") == sha256("src.raw")
    p = vdisk("convert", "--target-is-zero", "-O", "raw", "top.qcow2", "w.raw", check=False)
    assert p.returncode == 1 and p.stderr.startswith("vdisk: ")


def test_convert_concatenate(src):
    convert_both(["-O", "raw", "-f", "raw", "src.raw", "src.raw"], "q.raw", "v.raw")
    assert sha256("v.raw") == sha256("q.raw")


def test_convert_progress(src):
    # (text mode turns each \r into \n)
    pq = run(["qemu-img", "convert", "-p", "-O", "raw", "top.qcow2", "q.raw"])
    pv = vdisk("convert", "-p", "-O", "raw", "top.qcow2", "v.raw")
    assert pv.stdout.startswith("    (0.00/100%)\n")
    assert pv.stdout.endswith("    (100.00/100%)\n    (100.00/100%)\n")
    assert pq.stdout.endswith("    (100.00/100%)\n    (100.00/100%)\n")
    assert sha256("v.raw") == sha256("q.raw")


def test_convert_quiet_and_cache_options(src):
    p = vdisk("convert", "-q", "-t", "none", "-T", "writeback", "-O", "raw", "top.qcow2", "v.raw")
    assert p.stdout == "" and p.stderr == ""
    assert sha256("v.raw") == sha256("src.raw")


@pytest.mark.parametrize("args", [
    ["-O", "foo", "top.qcow2", "x"],
    ["-O", "raw", "nonexist", "x"],
    ["-O", "raw", "-S", "1000", "top.qcow2", "x"],
    ["-O", "raw", "-c", "top.qcow2", "x"],
    ["-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "x"],
    ["-O", "qcow2", "-F", "qcow2", "top.qcow2", "x"],
    ["-O", "raw"],
    ["-O", "qcow2", "-o", "cluster_size=3", "top.qcow2", "x"],
])
def test_convert_errors(src, args):
    pq = qemu_img("convert", *args, check=False)
    pv = vdisk("convert", *args, check=False)
    assert pq.returncode == 1
    assert pv.returncode == 1
    assert pv.stderr.startswith("vdisk: ") and pv.stderr.count("\n") == 1, pv.stderr


# ---- compare ----

def compare_both(*args):
    pq = qemu_img("compare", *args, check=False)
    pv = vdisk("compare", *args, check=False)
    assert (pv.returncode, pv.stdout) == (pq.returncode, pq.stdout), pv.stderr
    return pv


def test_compare_identical(src):
    assert compare_both("top.qcow2", "src.raw").returncode == 0
    assert compare_both("-f", "qcow2", "-F", "raw", "top.qcow2", "src.raw").stdout == \
        "Images are identical.\n"
    compare_both("base.qcow2", "base.qcow2")


@pytest.mark.parametrize("where", ["0", "3196928", "7340543", "2099200"])
def test_compare_mismatch_offset(src, where):
    run(["cp", "src.raw", "d.raw"])
    qemu_io("-f", "raw", "-c", f"write -P 0x55 {where} 1", "d.raw")
    pv = compare_both("-F", "raw", "top.qcow2", "d.raw")
    assert pv.returncode == 1 and pv.stdout.startswith("Content mismatch at offset ")
    compare_both("-f", "raw", "d.raw", "top.qcow2")


def test_compare_size_mismatch(src):
    run(["cp", "src.raw", "big.raw"])
    os.truncate("big.raw", 10 << 20)
    assert compare_both("-f", "raw", "-F", "raw", "src.raw", "big.raw").returncode == 0
    assert compare_both("-s", "-f", "raw", "-F", "raw", "src.raw", "big.raw").returncode == 1
    qemu_io("-f", "raw", "-c", "write -P 1 9M 512", "big.raw")
    assert compare_both("-f", "raw", "-F", "raw", "big.raw", "src.raw").returncode == 1


def test_compare_strict_allocation(src):
    vdisk("convert", "-O", "qcow2", "top.qcow2", "flat.qcow2")
    # Same content, different allocation: strict mode reports it like qemu-img.
    assert compare_both("-s", "top.qcow2", "flat.qcow2").returncode == 1


def test_compare_errors(src):
    pv = vdisk("compare", "top.qcow2", "nonexist", check=False)
    assert pv.returncode == 2 and pv.stderr.count("\n") == 1
    pv = vdisk("compare", "top.qcow2", check=False)
    pq = qemu_img("compare", "top.qcow2", check=False)  # a usage error: 1, as qemu-img's
    assert (pv.returncode, pv.stderr.replace("vdisk", "qemu-img")) == (pq.returncode, pq.stderr)
    assert pv.returncode == 1
    pv = vdisk("compare", "-q", "top.qcow2", "src.raw")
    assert pv.stdout == ""


def test_compare_progress(src):
    pv = vdisk("compare", "-p", "top.qcow2", "src.raw")
    assert pv.stdout.startswith("    (0.00/100%)\n")
    assert pv.stdout.endswith("    (100.00/100%)\nImages are identical.\n\n")


def test_convert_backing_for_flat_source(src):
    """A source without backing converted onto -B: only differences land in the new image."""
    qemu_img("create", "-f", "qcow2", "bk.qcow2", "8M")
    qemu_io("-c", "write -P 1 0 1M", "-c", "write -P 9 4M 2M", "bk.qcow2")
    vdisk("convert", "-O", "qcow2", "-B", "bk.qcow2", "-F", "qcow2", "-f", "raw", "src.raw",
          "v.qcow2")
    qemu_img("compare", "-f", "raw", "src.raw", "v.qcow2")
    assert_qemu_check_clean("v.qcow2")
    m = jmap("v.qcow2")
    # The first MiB equals the backing except where top.qcow2 changed it: mostly not copied.
    top_layer = sum(e["length"] for e in m if e["depth"] == 0 and e["present"])
    assert top_layer < 8 << 20


def _sync_calls(cmd, tmp):
    """Number of fdatasync/fsync calls a command makes (via strace)."""
    log = tmp / "strace.txt"
    # LeakSanitizer cannot run under ptrace: keep sanitizer builds usable here.
    env = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0")
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=fdatasync,fsync", "-o", str(log),
                    *map(str, cmd)], check=True, capture_output=True, env=env, timeout=120)
    return sum(1 for l in open(log) if "sync(" in l)


def test_convert_cache_unsafe_never_syncs(src):
    """convert's default target cache is unsafe (qemu-img: cache = "unsafe"): besides creating the
    target, the copy itself syncs nothing; -t writeback syncs at the end."""
    def count(tool, *args):
        for f in ("o.qcow2",):
            if os.path.exists(f):
                os.unlink(f)
        return _sync_calls([tool, "convert", *args, "-O", "qcow2", "top.qcow2", "o.qcow2"], src)
    vdisk_bin = VDISK
    q_unsafe = count("qemu-img")
    v_unsafe = count(vdisk_bin)
    assert v_unsafe <= q_unsafe
    v_unsafe_t = count(vdisk_bin, "-t", "unsafe")
    assert v_unsafe_t == v_unsafe
    assert count(vdisk_bin, "-t", "writeback") > v_unsafe
    assert qemu_img("compare", "top.qcow2", "o.qcow2").returncode == 0
    assert_qemu_check_clean("o.qcow2")


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_convert_compressed_threads(tmp, ctype):
    """convert -c with several workers (image > 8 MiB): clusters are compressed in parallel
    outside the qcow2 lock; qemu-img must read the result back identically and check it clean,
    with the same compressed/plain cluster split as its own output."""
    os.chdir(tmp)
    rnd = os.urandom(1 << 20)
    with open("s.raw", "wb") as f:
        for i in range(12):
            # compressible text, incompressible random data and zero runs, interleaved
            f.write(rnd.hex().encode()[: 1 << 20] if i % 3 == 0 else
                    rnd if i % 3 == 1 else bytes(1 << 20))
    opts = f"compression_type={ctype}"
    qemu_img("convert", "-c", "-o", opts, "-f", "raw", "-O", "qcow2", "s.raw", "q.qcow2")
    vdisk("convert", "-c", "-m", "4", "-o", opts, "-f", "raw", "-O", "qcow2", "s.raw", "v.qcow2")
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", "s.raw", "v.qcow2").returncode == 0
    assert_qemu_check_clean("v.qcow2")
    cq = json.loads(qemu_img("check", "--output=json", "q.qcow2").stdout)
    cv = json.loads(qemu_img("check", "--output=json", "v.qcow2").stdout)
    for k in ("allocated-clusters", "compressed-clusters"):
        assert cv[k] == cq[k], k


def test_convert_progress_after_a_read_error_ends_at_100_as_qemu_img(tmp):
    """qemu-img -p prints 100 % and ends the line also when the copy fails (then the error)."""
    (tmp / "in.raw").write_bytes(os.urandom(4 << 20))
    src = ('json:{"driver":"raw","file":{"driver":"blkdebug","image":{"driver":"file",'
           f'"filename":"{tmp / "in.raw"}"}},"inject-error":[{{"event":"read_aio","errno":5,'
           '"sector":4096}]}}')
    outs = []
    for tool in ("qemu-img", VDISK):
        p = subprocess.run([tool, "convert", "-p", "-O", "raw", src, str(tmp / "o.raw")],
                           capture_output=True, timeout=120)
        assert p.returncode == 1
        assert p.stderr.decode().endswith("error while reading at byte 2097152: "
                                          "Input/output error\n")
        outs.append(p.stdout)
    for out in outs:
        assert out.startswith(b"    (0.00/100%)\r")
        assert out.endswith(b"\r    (100.00/100%)\r\n")


def _progress_both(*args):
    """stdout (bytes: the \r are qemu-img's) and exit code of qemu-img and of vdisk."""
    outs = []
    for tool in ("qemu-img", VDISK):
        p = subprocess.run([tool, *args], capture_output=True, timeout=120)
        assert p.returncode in (0, 1), p.stderr
        outs.append((p.returncode, p.stdout))
    return outs


@pytest.mark.parametrize("args", [
    ["convert", "-p", "-O", "qcow2", "sparse.raw"],
    ["convert", "-p", "-O", "raw", "few.qcow2"],
    ["convert", "-p", "-O", "qcow2", "full.raw"],
    ["convert", "-p", "-S", "0", "-O", "qcow2", "sparse.raw"],
    ["convert", "-p", "-c", "-O", "qcow2", "few.qcow2"],
    ["convert", "-p", "-O", "qcow2", "odd.raw"],
    ["convert", "-p", "-O", "qcow2", "-B", "sparse.raw", "-F", "raw", "few.qcow2"],
    ["compare", "-p", "sparse.raw", "sparse.qcow2"],
    ["compare", "-p", "few.qcow2", "few.qcow2"],
    ["compare", "-p", "full.raw", "full.raw"],
    ["compare", "-p", "odd.raw", "full.raw"],
    ["compare", "-p", "top.qcow2", "src.raw"],
])
def test_progress_steps_as_qemu_img(src, args):
    """-p prints the steps qemu-img prints: convert weighs chunks by the data it copies (and
    zeroes under -S 0; a compressed chunk a cluster at a time), compare by bytes compared,
    small steps add up until one is shown, and compare ends at its last step."""
    qemu_img("create", "-f", "raw", "sparse.raw", "4M")
    qemu_io("-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 2M 64k", "sparse.raw")
    qemu_img("convert", "-O", "qcow2", "sparse.raw", "sparse.qcow2")
    qemu_img("create", "-f", "qcow2", "few.qcow2", "4M")
    qemu_io("-c", "write -P 1 0 64k", "-c", "write -P 2 1M 128k", "-c", "write -P 3 3M 64k",
            "few.qcow2")
    qemu_img("create", "-f", "raw", "full.raw", "9M")
    qemu_io("-f", "raw", "-c", "write -P 1 0 9M", "full.raw")
    qemu_img("create", "-f", "raw", "odd.raw", "300k")
    qemu_io("-f", "raw", "-c", "write -P 1 10k 200k", "odd.raw")
    (rq, oq), (rv, ov) = _progress_both(*(args + ["q.out"] if args[0] == "convert" else args))
    assert oq.startswith(b"    (0.00/100%)\r") and (oq.count(b"\r") >= 2 or rq == 1), oq
    assert (rv, ov) == (rq, oq)
