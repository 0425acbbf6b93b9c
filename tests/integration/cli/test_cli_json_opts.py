"""json: pseudo-filenames, --image-opts, the null-co driver and blkdebug fault injection, with
qemu-img / qemu-io as the oracle: the same command line must give the same output, exit code and
error text (vdisk's errors say "vdisk:" where QEMU's say "qemu-img:").
"""
import json
import os

import pytest

from conftest import VDISK, qemu_img, qemu_io, run, vdisk



def same(args, qemu="qemu-img", strip_ops=False):
    """Run the command with QEMU's tool and vdisk; compare exit code, stdout and stderr."""
    q = run([qemu, *args], check=False)
    v = vdisk(*(["io"] if qemu == "qemu-io" else []), *args, check=False)
    qout, vout = q.stdout, v.stdout
    if strip_ops:  # qemu-io's timing lines
        qout = "\n".join(x for x in qout.splitlines() if " ops; " not in x)
        vout = "\n".join(x for x in vout.splitlines() if " ops; " not in x)
    assert v.returncode == q.returncode, (q, v)
    assert vout == qout
    assert v.stderr.replace("vdisk: ", f"{qemu}: ") == q.stderr
    return v


def null_json(**kw):
    return "json:" + json.dumps({"driver": "null-co", **kw})


def blkdebug_raw(path, *rules, key="inject-error"):
    return "json:" + json.dumps({"driver": "raw", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": path}, key: list(rules)}})


@pytest.fixture
def raw_src(tmp_path):
    p = str(tmp_path / "src.raw")
    qemu_img("create", "-f", "raw", p, "1M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 1M", p)
    return p


def test_null_co_map_and_size_as_qemu(tmp_path):
    same(["map", "--output=json", null_json(size=1 << 20, **{"read-zeroes": True})])
    same(["map", "--output=json", null_json(size=1 << 20)])
    q = json.loads(qemu_img("info", "--output=json", null_json()).stdout)
    v = json.loads(vdisk("info", "--output=json", null_json()).stdout)
    assert v["virtual-size"] == q["virtual-size"] == 1 << 30
    assert v["format"] == q["format"] == "null-co"


def test_null_co_reads_zeroes_and_discards_writes():
    opts = "driver=null-co,size=1M,read-zeroes=on"
    p = vdisk("io", "--image-opts", "-c", "write -P 7 0 4k", "-c", "read -P 0 0 4k", opts)
    assert "read 4096/4096 bytes at offset 0" in p.stdout


def test_json_filename_for_a_qcow2_tree_reads_what_qemu_wrote(tmp_path):
    img = str(tmp_path / "a.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_io("-c", "write -P 3 64k 64k", img)
    tree = "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": img}})
    p = vdisk("io", "-c", "read -P 3 64k 64k", "-c", "read -P 0 0 64k", tree)
    assert p.stdout.count("read 65536/65536") == 2
    flat = "json:" + json.dumps({"file.driver": "file", "file.filename": img})  # format probed
    assert json.loads(vdisk("info", "--output=json", flat).stdout)["format"] == "qcow2"
    same(["map", "--output=json", tree])


def test_json_backing_name_written_by_qemu_is_followed(tmp_path):
    base = str(tmp_path / "base.qcow2")
    qemu_img("create", "-f", "qcow2", base, "1M")
    qemu_io("-c", "write -P 9 0 1M", base)
    top = str(tmp_path / "top.qcow2")
    backing = "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": base}})
    qemu_img("create", "-f", "qcow2", "-b", backing, "-F", "qcow2", top)
    vdisk("io", "-c", "write -P 1 0 64k", top)
    qemu_io("-c", "read -P 1 0 64k", "-c", "read -P 9 64k 960k", top)
    p = vdisk("io", "-c", "read -P 1 0 64k", "-c", "read -P 9 64k 960k", top)
    assert p.stdout.count("bytes at offset") == 2
    assert vdisk("check", top).returncode == 0


def test_image_opts_on_info_convert_compare_check(tmp_path):
    img = str(tmp_path / "i.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_io("-c", "write -P 4 0 512k", img)
    opts = f"driver=qcow2,file.driver=file,file.filename={img}"
    assert json.loads(vdisk("info", "--image-opts", "--output=json", opts).stdout)["format"] == "qcow2"
    out = str(tmp_path / "o.raw")
    vdisk("convert", "--image-opts", "-O", "raw", opts, out)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", img, out)
    vdisk("compare", "--image-opts", opts, f"driver=raw,file.filename={out}")
    vdisk("check", "--image-opts", opts)
    same(["map", "--image-opts", "--output=json", opts])


def test_image_opts_errors_as_qemu(tmp_path):
    img = str(tmp_path / "e.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    same(["info", "--image-opts", "-f", "qcow2", f"driver=qcow2,file.filename={img}"])
    same(["info", "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file",
                                                                    "filename": img}, "foo": 1})])
    same(["info", 'json:{"driver":"nosuch"}'])
    same(["info", "json:[1]"])
    p = vdisk("create", "--image-opts", "-f", "raw", str(tmp_path / "x.raw"), "1M", check=False)
    assert p.returncode == 1 and "--image-opts" in p.stderr


def test_blkdebug_failing_source_makes_convert_fail_as_qemu_img(tmp_path, raw_src):
    for errno_ in (5, 28):
        src = blkdebug_raw(raw_src, {"event": "read_aio", "errno": errno_})
        same(["convert", "-f", "raw", "-O", "raw", src, str(tmp_path / "out.raw")])


def test_blkdebug_config_file_form(tmp_path, raw_src):
    cfg = tmp_path / "rules.cfg"
    cfg.write_text('# fail the first data read\n[inject-error]\nevent = "read_aio"\n'
                   'errno = "5"\nonce = "on"\n')
    same(["convert", "-O", "raw", f"blkdebug:{cfg}:{raw_src}", str(tmp_path / "o.raw")])
    same(["-f", "raw", "-c", "read 0 512", "-c", "read -P 0x5a 0 512",
          f"blkdebug:{cfg}:{raw_src}"], qemu="qemu-io", strip_ops=True)


def test_blkdebug_once_sector_and_writes_as_qemu_io(raw_src):
    same(["-c", "read 0 512", "-c", "read 0 512",
          blkdebug_raw(raw_src, {"event": "read_aio", "errno": 5, "once": True})],
         qemu="qemu-io", strip_ops=True)
    same(["-c", "write 0 512", "-c", "write 4096 512", "-c", "write 4096 512",
          blkdebug_raw(raw_src, {"event": "write_aio", "errno": 5, "sector": 8})],
         qemu="qemu-io", strip_ops=True)


def test_blkdebug_set_state_arms_a_rule_later(raw_src):
    tree = "json:" + json.dumps({"driver": "raw", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": raw_src},
        "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}],
        "inject-error": [{"event": "read_aio", "state": 2, "errno": 5, "once": True}]}})
    v = same(["-c", "read 0 512", "-c", "read 0 512", "-c", "read 0 512", tree],
             qemu="qemu-io", strip_ops=True)
    assert "read failed: Input/output error" in v.stdout


def test_blkdebug_unknown_event_refused(raw_src):
    p = vdisk("info", blkdebug_raw(raw_src, {"event": "nosuch"}), check=False)
    q = qemu_img("info", blkdebug_raw(raw_src, {"event": "nosuch"}), check=False)
    assert p.returncode == q.returncode == 1
    assert "invalid parameter value: nosuch" in p.stderr and "nosuch" in q.stderr


@pytest.mark.parametrize("image", [
    ["--image-opts", "driver=null-co,size=1000"], ["--image-opts", "driver=null-co"],
    ["--image-opts", "driver=null-co,size=1000,read-zeroes=on"],
    ["--image-opts", "driver=null-co,read-zeroes=on"],
    ["--image-opts", "driver=null-co,size=4096,latency-ns=5"],
    ["--image-opts", "driver=raw,file.driver=null-co,file.size=1000"],
    ["--image-opts", "driver=raw,file.driver=null-co"],
    [null_json(size=1000)], [null_json(size=1000, **{"read-zeroes": True})], ["null-co://"],
    ["json:" + json.dumps({"driver": "raw", "file": {"driver": "null-co", "size": 1000}})],
])
@pytest.mark.parametrize("output", [[], ["--output=json"]])
def test_null_co_name_and_size_as_qemu_img(image, output):
    """QEMU names a null-co node by its options (a json: name, keys in QEMU's order, values as
    given) once size or read-zeroes is set, and counts its length in whole sectors."""
    v = same(["info", *output, *image])
    if "1000" in " ".join(image):
        assert "1024" in v.stdout and "json:" in v.stdout


def test_null_co_json_name_opens_again():
    """The json: name vdisk prints opens the same device (QEMU's users paste it back)."""
    first = json.loads(vdisk("info", "--output=json", "--image-opts",
                             "driver=raw,file.driver=null-co,file.size=1000").stdout)
    assert first["filename"].startswith("json:")
    same(["info", "--output=json", first["filename"]])


def _blkdebug_names(src, cfg):
    img = {"driver": "file", "filename": src}
    tree = lambda **kw: "json:" + json.dumps({"driver": "raw", "file": {  # noqa: E731
        "driver": "blkdebug", "image": img, **kw}})
    return [
        ["-f", "raw", f"blkdebug::{src}"], ["-f", "raw", f"blkdebug:{cfg}:{src}"], [tree()],
        [tree(config=cfg)], [tree(config=cfg, align=512)],
        [tree(**{"inject-error": [{"event": "read_aio", "errno": 5}]})],
        [tree(**{"inject-error": [{"errno": 5, "event": "read_aio", "sector": 9, "once": True}],
                 "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}]})],
        ["--image-opts", f"driver=raw,file.driver=blkdebug,file.image.filename={src},"
                         f"file.inject-error.0.event=read_aio,file.inject-error.0.errno=5"],
        ["--image-opts", f"driver=raw,file.driver=blkdebug,file.image.filename={src},"
                         f"file.config={cfg}"],
    ]


def test_blkdebug_node_named_as_qemu_img(tmp_path, raw_src):
    """QEMU names a blkdebug node blkdebug:CONFIG:IMAGE when only its config file and image name
    it, else json:{...} with its rules flattened (inject-error.0.event) in QEMU's key order; the
    raw node over it takes that name. vdisk's names are qemu-img's, and open again."""
    cfg = tmp_path / "rules.cfg"
    cfg.write_text('[inject-error]\nevent = "read_aio"\nsector = "9000"\n')
    names = []
    for image in _blkdebug_names(raw_src, str(cfg)):
        q = json.loads(qemu_img("info", "--output=json", *image).stdout)["filename"]
        v = json.loads(vdisk("info", "--output=json", *image).stdout)["filename"]
        assert v == q, image
        names.append(v)
    assert names[0] == f"blkdebug::{raw_src}" and names[3] == f"blkdebug:{cfg}:{raw_src}"
    assert all(n.startswith("json:") for n in names[4:8])
    again = json.loads(vdisk("info", "--output=json", names[6]).stdout)["filename"]
    assert again == names[6]


@pytest.mark.parametrize("cmd,backing", [
    ("info", "backing.driver=qcow2"), ("info", "backing.node-name=x"),
    ("info", "backing.driver=qcow2,backing.file.filename={base}"),
    ("map", "backing.driver=qcow2"), ("map", "backing.driver=raw"),
    ("check", "backing.driver=qcow2"), ("compare", "backing.driver=raw"),
    ("map", "backing.bogus=1"), ("map", "backing.driver=raw,backing.bogus=1"),
])
def test_backing_options_in_image_opts_as_qemu_img(tmp_path, cmd, backing):
    """backing.* options of --image-opts: refused by a command that opens no backing file (info)
    with qemu-img's message; elsewhere options for the backing file the image names, its driver
    overriding the recorded format (raw: the qcow2 base is read as raw bytes), one that driver
    does not take refused with qemu-img's message."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 7 0 64k", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    opts = f"driver=qcow2,file.filename={top}," + backing.format(base=base)
    v = same([cmd, "--image-opts", opts,
              *([f"driver=qcow2,file.filename={top}"] if cmd == "compare" else [])])
    if cmd == "info":
        assert v.returncode == 1 and "does not support the option 'backing." in v.stderr
    else:
        fails = (cmd, backing) == ("compare", "backing.driver=raw") or "bogus" in backing
        assert v.returncode == (1 if fails else 0)
        assert ("does not support the option 'bogus'" in v.stderr) == ("bogus" in backing)


@pytest.fixture(scope="module")
def chain3(tmp_path_factory):
    """base <- mid <- top, nob (no backing), one whose backing file is missing, one whose
    backing file is no qcow2, one over that, and a two-image backing loop."""
    d = tmp_path_factory.mktemp("chain3")
    q = lambda *a: qemu_img("create", "-q", "-f", "qcow2", *a)
    q(d / "base.qcow2", "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 7 0 64k", d / "base.qcow2")
    q("-b", "base.qcow2", "-F", "qcow2", d / "mid.qcow2")
    q("-b", "mid.qcow2", "-F", "qcow2", d / "top.qcow2")
    q(d / "nob.qcow2", "1M")
    q("-u", "-b", "missing.qcow2", "-F", "qcow2", d / "t2.qcow2", "1M")
    (d / "bad.qcow2").write_text("garbage\n")
    q("-u", "-b", "bad.qcow2", "-F", "qcow2", d / "t3.qcow2", "1M")
    q("-u", "-b", "t3.qcow2", "-F", "qcow2", d / "t4.qcow2", "1M")
    q(d / "l1.qcow2", "1M")
    q("-u", "-b", "l1.qcow2", "-F", "qcow2", d / "l2.qcow2", "1M")
    qemu_img("rebase", "-u", "-b", "l2.qcow2", "-F", "qcow2", d / "l1.qcow2")
    return d


@pytest.mark.parametrize("args", [
    "info --backing-chain --image-opts driver=qcow2,file.filename=top.qcow2,backing.driver=qcow2",
    "info --backing-chain --image-opts driver=qcow2,file.filename=top.qcow2,backing.bogus=1",
    "info --backing-chain --output=json --image-opts driver=qcow2,file.filename=top.qcow2",
    "info --backing-chain t2.qcow2", "info --backing-chain --output=json t4.qcow2",
    "info --backing-chain l1.qcow2", "info --backing-chain top.qcow2",
    "map t2.qcow2", "map t3.qcow2", "map t4.qcow2", "compare t4.qcow2 base.qcow2",
    "convert -O raw t4.qcow2 out.raw",
    "map --image-opts driver=qcow2,file.filename=top.qcow2,backing.backing.bogus=1",
    "map --image-opts driver=qcow2,file.filename=mid.qcow2,backing.backing.bogus=1",
    "map --image-opts driver=qcow2,file.filename=nob.qcow2,backing.bogus=1",
    "map --image-opts driver=qcow2,file.filename=nob.qcow2,backing.driver=qcow2",
    "map --image-opts driver=qcow2,file.filename=top.qcow2,backing.file.bogus=1",
    "map --output=json --image-opts driver=qcow2,file.filename=top.qcow2,backing.file.driver=file",
    "map --output=json --image-opts driver=qcow2,file.filename=top.qcow2,"
    "backing.file.locking=off,backing.backing.file.locking=off",
    "map --image-opts driver=raw,file.filename=base.qcow2,file.bogus=1",
])
def test_backing_errors_as_qemu_img(chain3, args, monkeypatch):
    """What qemu-img says when a backing file cannot be opened or its options are wrong: the
    "Could not open backing file: " prefix once per level, backing.* options on an image with
    no backing file, backing.file.* as the options of its protocol node, and info
    --backing-chain opening one image at a time (a missing backing file named itself, a loop
    as "creates an infinite loop", backing.* refused as by info alone)."""
    monkeypatch.chdir(chain3)
    same(args.split())


@pytest.fixture(scope="module")
def window_src(tmp_path_factory):
    p = tmp_path_factory.mktemp("window") / "w.raw"
    p.write_bytes(os.urandom(1 << 20))
    return p


@pytest.mark.parametrize("window", ["offset=4096,size=65536", "offset=4096", "offset=0",
                                    "offset=100,size=512", "size=1000", "offset=2000000",
                                    "offset=1000000,size=65536"])
def test_raw_offset_and_size_as_qemu_img(window_src, window):
    """raw's offset and size make the node a window onto its file: qemu-img's size, json: name,
    map and refusals (a size not in whole sectors, a window past the file's end)."""
    opts = f"driver=raw,file.filename={window_src},{window}"
    same(["info", "--output=json", "--image-opts", opts])
    same(["map", "--output=json", "--image-opts", opts])


def test_raw_window_reads_and_writes_as_qemu(window_src, tmp_path):
    """convert reads exactly the window; writes land inside it, one past its end fails (qemu-io
    and vdisk io leave the same file)."""
    opts = f"driver=raw,file.filename={window_src},offset=4096,size=65536"
    for tool, out in (("qemu-img", "q.raw"), ("vdisk", "v.raw")):
        run([VDISK if tool == "vdisk" else tool, "convert", "-O", "raw", "--image-opts", opts,
             tmp_path / out])
    want = window_src.read_bytes()[4096:4096 + 65536]
    assert (tmp_path / "q.raw").read_bytes() == (tmp_path / "v.raw").read_bytes() == want
    ops = ["write -P 5 0 4k", "write -P 6 61440 4k", "write -P 7 61440 8k", "write -z 8k 8k"]
    files = {}
    for name in ("q", "v"):
        f = tmp_path / f"{name}-w.raw"
        f.write_bytes(window_src.read_bytes())
        o = f"driver=raw,file.filename={f},offset=4096,size=65536"
        args = ["--image-opts", *[a for op in ops for a in ("-c", op)], o]
        p = run(["qemu-io", *args] if name == "q" else [VDISK, "io", *args], check=False)
        assert p.stdout.count("write failed: Input/output error") == 1, p.stdout
        files[name] = f.read_bytes()
    assert files["q"] == files["v"]
    assert files["v"][4096:8192] == b"\x05" * 4096 and files["v"][12288:20480] == bytes(8192)
    assert files["v"][69632:] == window_src.read_bytes()[69632:]
