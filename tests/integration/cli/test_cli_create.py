"""vdisk create / resize / measure compared with qemu-img 7.2 on the same inputs."""
import json
import os
import shutil
import tempfile

import pytest

from conftest import assert_qemu_check_clean, qemu_img, run, vdisk, VDISK


def create_both(tmp, args, name="img"):
    """Run qemu-img create and vdisk create with the same args (last = size, "" = none)."""
    *opts, size = args
    sz = [size] if size != "" else []
    q = tmp / f"q-{name}"
    v = tmp / f"v-{name}"
    pq = run(["qemu-img", "create", *opts, str(q), *sz], check=False)
    pv = run([VDISK, "create", *opts, str(v), *sz], check=False)
    return q, v, pq, pv


def info_json(path, fmt=None):
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + [str(path)]
    d = json.loads(qemu_img(*args).stdout)
    for k in ("filename", "actual-size"):
        d.pop(k, None)
    return d


@pytest.mark.parametrize("args", [
    ["-f", "raw", "1M"],
    ["-f", "raw", "-o", "preallocation=full", "64k"],
    ["-f", "raw", "-o", "preallocation=falloc", "1536"],
    ["-f", "qcow2", "1G"],
    ["-f", "qcow2", "1.5M"],
    ["-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", "10M"],
    ["-f", "qcow2", "-o", "compat=0.10", "10M"],
    ["-f", "qcow2", "-o", "compat=v3,refcount_bits=8", "10M"],
    ["-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd", "10M"],
    ["-f", "qcow2", "-o", "preallocation=metadata", "3M"],
    ["-f", "qcow2", "-o", "preallocation=falloc,cluster_size=128k", "3M"],
    ["-f", "qcow2", "-o", "preallocation=full", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=1", "1M"],
    ["-f", "qcow2", "-o", "size=2M", ""],
    ["-f", "qcow2", "-q", "1M"],
    ["-f", "qcow2", "1000"],
    ["-f", "raw", "1000"],
])
def test_create_matches_qemu(tmp, args):
    q, v, pq, pv = create_both(tmp, args)
    assert pq.returncode == 0, pq.stderr
    assert pv.returncode == 0, pv.stderr
    assert pv.stdout == pq.stdout.replace(str(q), str(v))
    fmt = args[1]
    assert info_json(v, fmt) == info_json(q, fmt)
    if fmt == "qcow2":
        assert_qemu_check_clean(v)
        # Same metadata layout as qemu-img: the same map (offsets included).
        mq = qemu_img("map", "--output=json", q).stdout
        mv = qemu_img("map", "--output=json", v).stdout
        assert mv == mq
    qemu_img("compare", "-f", fmt, "-F", fmt, q, v)


def test_create_default_format_is_raw(tmp):
    p = vdisk("create", tmp / "x", "100k")
    assert p.stdout == f"Formatting '{tmp / 'x'}', fmt=raw size=102400\n"
    assert os.path.getsize(tmp / "x") == 102400


def test_create_with_backing_takes_size(tmp):
    base = tmp / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "7M")
    os.chdir(tmp)
    pq = qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "q.qcow2")
    pv = vdisk("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "v.qcow2")
    assert pv.stdout == pq.stdout.replace("q.qcow2", "v.qcow2")
    iv, iq = info_json(tmp / "v.qcow2"), info_json(tmp / "q.qcow2")
    assert iv == iq
    assert iv["backing-filename"] == "base.qcow2"  # recorded relative, as given
    assert_qemu_check_clean(tmp / "v.qcow2")


def test_create_backing_relative_to_image_dir(tmp):
    sub = tmp / "sub"
    sub.mkdir()
    qemu_img("create", "-f", "raw", sub / "b.raw", "2M")
    # The backing name is resolved relative to the new image's directory, not the cwd.
    vdisk("create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", sub / "o.qcow2")
    assert info_json(sub / "o.qcow2")["virtual-size"] == 2 << 20


def test_create_backing_unsafe(tmp):
    pv = vdisk("create", "-f", "qcow2", "-u", "-b", "nonexist.qcow2", "-F", "qcow2",
               tmp / "g.qcow2", "1M")
    assert "backing_file=nonexist.qcow2 backing_fmt=qcow2" in pv.stdout
    p = qemu_img("info", "--output=json", "-U", tmp / "g.qcow2")
    assert json.loads(p.stdout)["backing-filename"] == "nonexist.qcow2"


@pytest.mark.parametrize("args", [
    ["-f", "qcow2", ""],                               # no size
    ["-f", "qcow2", "12x"],                            # bad size
    ["-f", "qcow2", "-5"],                             # negative size / bad option
    ["-f", "foo", "1M"],                               # unknown format
    ["-f", "qcow2", "-o", "cluster_size=1000", "1M"],  # driver rejects
    ["-f", "qcow2", "-o", "bogus=1", "1M"],            # unknown option
    ["-f", "qcow2", "-o", "lazy_refcounts=maybe", "1M"],
    ["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=3", "1M"],
    ["-f", "qcow2", "-o", "compression_type=lz4", "1M"],
    ["-f", "raw", "-b", "x", "-F", "raw", "1M"],       # raw has no backing
    ["-f", "qcow2", "-F", "qcow2", "1M"],              # backing format without backing file
    ["-f", "qcow2", "-b", "nonexist.qcow2", "-F", "qcow2", ""],
    ["-f", "qcow2", "1E"],                             # the L1 table would be too large
    ["-f", "qcow2", "-o", "cluster_size=512", "3E"],
    ["-f", "qcow2", "-o", "cluster_size=2M", "4611686018427387905"],  # over 2^62
])
def test_create_errors_like_qemu(tmp, args):
    q, v, pq, pv = create_both(tmp, args)
    assert pq.returncode == 1
    assert pv.returncode == 1, pv.stdout
    # qemu-img's lines word for word (its usage hint and "Could not open backing image." line
    # included); only the program's and the image's names differ
    assert pv.stderr.replace(str(v), "IMG").replace("vdisk", "qemu-img") == \
        pq.stderr.replace(str(q), "IMG")


def test_create_backing_without_format_is_refused(tmp):
    qemu_img("create", "-f", "qcow2", tmp / "a.qcow2", "1M")
    p = vdisk("create", "-f", "qcow2", "-b", tmp / "a.qcow2", tmp / "b.qcow2", check=False)
    assert p.returncode == 1
    assert "Backing file specified without backing format" in p.stderr
    assert not (tmp / "b.qcow2").exists()


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "luks"])
@pytest.mark.parametrize("cmd", ["create -f", "convert -O"])
def test_option_help_without_target_is_qemu_imgs(tmp, fmt, cmd):
    """-o help with no target filename: the format's options (encryption's included) and the
    two closing lines, byte for byte as qemu-img 7.2."""
    args = [*cmd.split(), fmt, "-o", "help"]
    pv, pq = vdisk(*args), qemu_img(*args)
    assert pv.stdout == pq.stdout
    assert pv.stdout.endswith("\nThe protocol level may support further options.\n"
                              "Specify the target filename to include those options.\n")


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "luks"])
@pytest.mark.parametrize("cmd", ["create -f", "convert -O"])
def test_option_help_with_target_merges_the_file_protocols(tmp, fmt, cmd):
    """With a target: one merged list, file's extent_size_hint and nocow included, byte for byte
    as qemu-img 7.2, and nothing is created."""
    qemu_img("create", "-f", "raw", tmp / "src.raw", "1M")
    src = [tmp / "src.raw"] if cmd.startswith("convert") else []
    pv = vdisk(*cmd.split(), fmt, "-o", "help", *src, tmp / "x.img")
    pq = qemu_img(*cmd.split(), fmt, "-o", "help", *src, tmp / "x.img")
    assert pv.stdout == pq.stdout
    assert pv.stdout.startswith("Supported options:\n")
    assert "  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n" in pv.stdout
    assert not (tmp / "x.img").exists()


FILE_OPTS = ["nocow=on", "nocow=off", "nocow=yes", "extent_size_hint=1M", "extent_size_hint=0",
             "extent_size_hint=1.5k", "nocow=on,extent_size_hint=64k,preallocation=falloc",
             "extent_size_hint=4G", "extent_size_hint=-1", "extent_size_hint=abc", "nocow=bogus"]


@pytest.mark.parametrize("opts", FILE_OPTS)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_file_protocol_create_options_as_qemu_img(tmp, fmt, opts):
    """nocow and extent_size_hint: qemu-img's Formatting line (file's options last, raw's in
    file-posix's order), exit code, errors and warnings (on ext4: none, the hint is taken and
    FS_NOCOW_FL's refusal ignored); a hint over 4 GiB creates nothing."""
    q, v = tmp / f"q.{fmt}", tmp / f"v.{fmt}"
    pq = qemu_img("create", "-f", fmt, "-o", opts, q, "1M", check=False)
    pv = vdisk("create", "-f", fmt, "-o", opts, v, "1M", check=False)
    assert pv.returncode == pq.returncode
    assert pv.stdout == pq.stdout.replace(str(q), str(v))
    assert pv.stderr.replace(str(v), "IMG").replace("vdisk", "qemu-img") == \
        pq.stderr.replace(str(q), "IMG")
    assert v.exists() == q.exists()
    if pq.returncode == 0:
        assert info_json(v, fmt) == info_json(q, fmt)


@pytest.mark.parametrize("opts, warns", [
    ("extent_size_hint=1M", True), ("extent_size_hint=4k", True), ("", False),
    ("extent_size_hint=0", False), ("nocow=on", False),
])
@pytest.mark.parametrize("cmd", ["create", "convert"])
def test_extent_size_hint_failure_warns_only_when_given(cmd, opts, warns):
    """On tmpfs (no FS_XFLAG_EXTSIZE, no FS_NOCOW_FL) the image is made all the same; only a hint
    the user gave is warned about, in qemu-img's words."""
    d = tempfile.mkdtemp(dir="/dev/shm")
    try:
        qemu_img("create", "-f", "raw", os.path.join(d, "src.raw"), "1M")
        res = {}
        for tool, prog in (("q", "qemu-img"), ("v", VDISK)):
            out = os.path.join(d, f"{tool}.raw")
            o = ["-o", opts] if opts else []
            argv = ["create", "-f", "raw", *o, out, "1M"] if cmd == "create" else \
                ["convert", "-O", "raw", *o, os.path.join(d, "src.raw"), out]
            p = run([prog, *argv], check=False)
            res[tool] = (p.returncode, p.stderr.replace(os.path.basename(prog), "PROG"),
                         os.path.getsize(out))
        assert res["v"] == res["q"]
        warning = "PROG: warning: Failed to set extent size hint: Operation not supported\n"
        assert res["v"] == (0, warning if warns else "", 1 << 20)
    finally:
        shutil.rmtree(d)


# ---- resize ----

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("size,shrink", [("+1M", False), ("3M", False), ("-1M", True),
                                         ("1M", True), ("5242880", False)])
def test_resize_matches_qemu(tmp, fmt, size, shrink):
    paths = []
    for tool in ("q", "v"):
        p = tmp / f"{tool}.{fmt}"
        qemu_img("create", "-f", fmt, p, "2M")
        run(["qemu-io", "-f", fmt, "-c", "write -P 7 0 2M", str(p)])
        paths.append(p)
    extra = ["--shrink"] if shrink else []
    pq = qemu_img("resize", "-f", fmt, *extra, paths[0], size, check=False)
    pv = vdisk("resize", "-f", fmt, *extra, paths[1], size, check=False)
    assert (pv.returncode, pv.stdout) == (pq.returncode, pq.stdout), pv.stderr
    assert info_json(paths[1], fmt) == info_json(paths[0], fmt)
    qemu_img("compare", "-f", fmt, "-F", fmt, paths[0], paths[1])
    if fmt == "qcow2":
        assert_qemu_check_clean(paths[1])


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_resize_shrink_needs_flag(tmp, fmt):
    p = tmp / "x"
    qemu_img("create", "-f", fmt, p, "2M")
    r = vdisk("resize", "-f", fmt, p, "-1M", check=False)
    assert r.returncode == 1
    assert r.stderr == "vdisk: Use the --shrink option to perform a shrink operation.\n"
    assert info_json(p, fmt)["virtual-size"] == 2 << 20


def test_resize_quiet_and_errors(tmp):
    p = tmp / "x.qcow2"
    qemu_img("create", "-f", "qcow2", p, "2M")
    assert vdisk("resize", "-q", p, "+1M").stdout == ""
    for bad in ("0x", "-10M"):
        r = vdisk("resize", "--shrink", p, bad, check=False)
        q = qemu_img("resize", "--shrink", p, bad, check=False)  # its size hint: three lines
        assert (r.returncode, r.stderr.replace("vdisk", "qemu-img")) == (q.returncode, q.stderr)
    r = vdisk("resize", tmp / "missing", "1M", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1


# ---- measure ----

@pytest.fixture
def measure_src(tmp):
    p = tmp / "src.qcow2"
    qemu_img("create", "-f", "qcow2", p, "64M")
    run(["qemu-io", "-c", "write -P 1 0 3M", "-c", "write -P 2 20M 1M", "-c", "write -z 30M 1M",
         str(p)])
    r = tmp / "src.raw"
    qemu_img("convert", "-O", "raw", p, r)
    return p, r


@pytest.mark.parametrize("args", [
    ["-O", "qcow2", "--size", "1G"],
    ["-O", "qcow2", "--size", "1000"],
    ["-O", "raw", "--size", "1000"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "--size", "100M"],
    ["-O", "qcow2", "-o", "compat=0.10", "--size", "100M"],
    ["-O", "qcow2", "-o", "preallocation=metadata", "--size", "100M"],
    ["--output=json", "-O", "qcow2", "--size", "1G"],
    ["-O", "qcow2", "SRCQ"],
    ["-O", "qcow2", "-o", "compat=0.10", "SRCQ"],
    ["-O", "raw", "SRCQ"],
    ["-O", "qcow2", "-f", "raw", "SRCR"],
    ["--output=json", "-O", "qcow2", "SRCQ"],
])
def test_measure_matches_qemu(measure_src, args):
    args = [str(measure_src[0]) if a == "SRCQ" else str(measure_src[1]) if a == "SRCR" else a
            for a in args]
    pq = qemu_img("measure", *args)
    pv = vdisk("measure", *args)
    if "--output=json" in args:
        assert json.loads(pv.stdout) == json.loads(pq.stdout)
    assert pv.stdout == pq.stdout


def test_measure_errors(tmp):
    r = vdisk("measure", "-O", "qcow2", check=False)
    assert r.returncode == 1
    assert r.stderr == "vdisk: Either --size N or one filename must be specified.\n"
    qemu_img("create", "-f", "raw", tmp / "r", "1M")
    r = vdisk("measure", "-O", "qcow2", "--size", "1M", tmp / "r", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1


@pytest.mark.parametrize("opts", [
    "bogus=1", "lazy_refcounts=maybe", "cluster_size=x", "cluster_size=20E", "size=x",
    "size=20E", "refcount_bits=x", "refcount_bits=128", "refcount_bits=3", "compat=0.5",
    "preallocation=maybe", "cluster_size=1000", "compat=0.10,lazy_refcounts=on",
    "compat=0.10,refcount_bits=8", "compat=0.10,extended_l2=on", "compat=0.10,compression_type=zstd",
    "compression_type=lz4", "encrypt.format=xx", "encrypt.iter-time=x",
    "encrypt.format=luks,encrypt.iter-time=0",
])
@pytest.mark.parametrize("cmd", ["create", "convert", "measure"])
def test_option_list_errors_as_qemu_img(tmp, cmd, opts):
    """A bad -o list: create names the file before every error; convert names nothing for a
    malformed list and says "error while converting" for a refused value; measure ends a malformed
    list's error with "Invalid options for file format" - qemu-img's lines, word for word."""
    src = tmp / "src.qcow2"
    qemu_img("create", "-f", "qcow2", src, "1M")
    res = {}
    for tool, prog in (("q", "qemu-img"), ("v", VDISK)):
        out = tmp / f"{tool}.qcow2"
        argv = {"create": ["create", "-f", "qcow2", "-o", opts, out, "1M"],
                "convert": ["convert", "-O", "qcow2", "-o", opts, src, out],
                "measure": ["measure", "-O", "qcow2", "-o", opts, "--size", "1M"]}[cmd]
        p = run([prog, *map(str, argv)], check=False)
        res[tool] = (p.returncode, p.stderr.replace(str(out), "OUT").replace("vdisk", "qemu-img"))
        assert not out.exists() or cmd == "measure"
    if cmd == "measure" and opts in ("compression_type=lz4", "encrypt.format=xx"):
        # qemu-img 7.2's measure ignores these two; vdisk refuses what create refuses (README)
        assert res["q"] == (0, "")
        assert res["v"][0] == 1 and "does not accept value" in res["v"][1]
        return
    assert res["v"] == res["q"]
    assert res["q"][0] == 1 or (cmd == "measure" and "compat=0.10," in opts)


@pytest.mark.parametrize("args", [
    ["-O", "luks", "-o", "key-secret=s0,iter-time=10", "--size", "1G"],
    ["-O", "luks", "-o", "key-secret=s0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,"
     "ivgen-alg=essiv", "--size", "1M"],
    ["-O", "luks", "-o", "key-secret=s0,iter-time=10", "--output=json", "SRC"],
    ["-O", "luks", "--size", "1G"], ["-O", "luks", "-o", "key-secret=nope", "--size", "1G"],
    ["-O", "luks", "-o", "key-secret=s0,cipher-alg=des", "--size", "1G"],
    ["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
     "--size", "1G"],
    ["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,"
     "cluster_size=2M,encrypt.cipher-alg=aes-128", "--size", "1G"],
    ["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "SRC"],
    ["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"],
])
def test_measure_encrypted_as_qemu_img(tmp, args):
    """measure counts the LUKS header an encrypted image gets (raw LUKS: the header and every
    sector; qcow2: the header's clusters too) and, as qemu-img, needs the secret to know it."""
    src = tmp / "src.qcow2"
    qemu_img("create", "-f", "qcow2", src, "3M")
    run(["qemu-io", "-c", "write 0 1M", str(src)])
    argv = ["measure", "--object", "secret,id=s0,data=pw",
            *[str(src) if a == "SRC" else a for a in args]]
    for _ in range(5):  # qemu-img's PBKDF timing sometimes measures 0 under load: it retries
        q = run(["qemu-img", *argv], check=False)
        if "Unable to get accurate CPU usage" not in q.stderr:
            break
    v = vdisk(*argv, check=False)
    assert (v.returncode, v.stdout, v.stderr.replace("vdisk", "qemu-img")) == \
        (q.returncode, q.stdout, q.stderr)
