"""Encrypted images (LUKS) against QEMU, both directions: raw LUKS images and qcow2 with
encrypt.format=luks made by qemu-img and written by qemu-io are read by vdisk/vdiskd, and images
vdisk makes and writes are read, checked and compared by qemu-img/qemu-io. Passwords come from
secret objects (--object secret, QMP object-add). A wrong password fails with QEMU's message and
leaves the image untouched. iter-time=10 keeps PBKDF2 short (the default is 2 s per open)."""
import atexit
import json
import os
import shutil
import tempfile

from conftest import VDISK, assert_not_crashed, qemu_img, qemu_io, run, sha256, vdisk
from nbd_helpers import start_daemon

PW = "correct horse"
SECRET = f"secret,id=s0,data={PW}"


def luks_opts(path, secret="s0"):
    return f"driver=luks,file.filename={path},key-secret={secret}"


# qemu-img's images by their create options: QEMU measures PBKDF2 for 0.5-2.5 CPU-s before every
# encrypted create, whatever iter-time asks for, so a test wanting the same image (format, options,
# size) as an earlier one in this worker gets a copy of the one qemu-img made then.
_TEMPLATES = {}


def qemu_create(*args):
    """qemu-img create of an encrypted image: args are qemu-img create's, ending PATH SIZE
    (conftest's qemu_img retries QEMU's PBKDF2 calibration flake). Made once per distinct
    options and size, then copied: each test still gets its own file written by qemu-img."""
    *opts, path, size = map(str, args)
    key = (*opts, size)
    if key not in _TEMPLATES:
        if not _TEMPLATES:
            tmpl_dir = tempfile.mkdtemp(prefix="vdisk-luks-templates-")
            atexit.register(shutil.rmtree, tmpl_dir, True)
            _TEMPLATES[None] = tmpl_dir
        tmpl = os.path.join(_TEMPLATES[None], f"{len(_TEMPLATES)}.img")
        qemu_img("create", "-q", "--object", SECRET, *opts, tmpl, size)
        _TEMPLATES[key] = tmpl
    shutil.copyfile(_TEMPLATES[key], path)


def qemu_create_luks(path, size="4M"):
    qemu_create("-f", "luks", "-o", "key-secret=s0,iter-time=10", path, size)


def qemu_io_luks(path, *cmds, pw=PW, check=True):
    args = ["--object", f"secret,id=s0,data={pw}", "--image-opts", luks_opts(path)]
    for c in cmds:
        args += ["-c", c]
    return qemu_io(*args, check=check)


def serve(tmp, path, fmt="luks", pw=PW, writable=True):
    """vdiskd serving an encrypted image over NBD, its password from --object secret."""
    node = {"driver": fmt, "node-name": "n0", "file": {"driver": "file", "filename": str(path)}}
    if fmt == "luks":
        node["key-secret"] = "s0"
    else:
        node["encrypt"] = {"format": "luks", "key-secret": "s0"}
    return start_daemon(tmp, path, writable=writable, blockdev=json.dumps(node),
                        extra=("--object", f"secret,id=s0,data={pw}"))


def nbd_io(d, *cmds, check=True, read_only=False):
    args = ["-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    return qemu_io(*args, d.uri(), check=check)


def test_raw_luks_written_by_qemu_served_by_vdiskd(tmp):
    img = tmp / "q.luks"
    qemu_create_luks(img)
    qemu_io_luks(img, "write -P 0xa5 0 64k", "write -P 0x3c 1M 8k", "write -P 0x11 4095k 1k")
    d = serve(tmp, img, writable=False)
    try:
        for cmd in ("read -P 0xa5 0 64k", "read -P 0x3c 1M 8k", "read -P 0x11 4095k 1k",
                    "read -P 0xa5 1000 3000"):
            out = nbd_io(d, cmd, check=False, read_only=True)
            assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, \
                f"{cmd}: {out.stdout}{out.stderr}"
        p = run(["nbdinfo", "--size", d.uri()])
        assert p.stdout.strip() == str(4 << 20)
    finally:
        assert d.stop() == 0, d.output()
        d.kill()


def test_raw_luks_created_and_written_by_vdisk_read_by_qemu(tmp):
    img = tmp / "v.luks"
    p = vdisk("create", "-f", "luks", "--object", SECRET, "-o", "key-secret=s0,iter-time=10",
              img, "4M")
    assert p.stdout == f"Formatting '{img}', fmt=luks size=4194304 key-secret=s0 iter-time=10\n"
    d = serve(tmp, img)
    try:
        # aligned and unaligned writes (the latter read-modify-write whole sectors)
        nbd_io(d, "write -P 0x5a 0 64k", "write -P 0x77 100 1000", "write -P 0x42 3M 1M")
    finally:
        assert d.stop() == 0, d.output()
        d.kill()
    for cmd in ("read -P 0x5a 0 100", "read -P 0x77 100 1000", "read -P 0x5a 1100 64436",
                "read -P 0x42 3M 1M"):
        out = qemu_io_luks(img, cmd, check=False)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, \
            f"{cmd}: {out.stdout}{out.stderr}"
    # the same bytes through QEMU's decryption and a plain model
    model = tmp / "model.raw"
    with open(model, "wb") as f:
        f.truncate(4 << 20)
        f.write(b"\x5a" * 65536)
        f.seek(100)
        f.write(b"\x77" * 1000)
        f.seek(3 << 20)
        f.write(b"\x42" * (1 << 20))
    plain = tmp / "plain.raw"
    qemu_img("convert", "--object", SECRET, "--image-opts", luks_opts(img), "-O", "raw", plain)
    # unwritten sectors of a fresh LUKS image are ciphertext of nothing: compare written ranges
    with open(plain, "rb") as a, open(model, "rb") as b:
        pa, pb = a.read(), b.read()
        assert pa[:65536] == pb[:65536]
        assert pa[3 << 20:] == pb[3 << 20:]
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format"] == "luks" and info["encrypted"] is True
    assert info["virtual-size"] == 4 << 20


def test_luks_info_matches_qemu_img(tmp):
    for maker in ("qemu", "vdisk"):
        img = tmp / f"{maker}.luks"
        if maker == "qemu":
            qemu_create_luks(img, "1M")
        else:
            vdisk("create", "-q", "-f", "luks", "--object", SECRET,
                  "-o", "key-secret=s0,iter-time=10", img, "1M")
        for args in ((), ("--output=json",)):
            ours = vdisk("info", *args, img).stdout
            theirs = qemu_img("info", *args, img).stdout
            assert ours == theirs, f"{maker} {args}:\n{ours}\n---\n{theirs}"


def ok(c, cmd, args):
    r = c.execute(cmd, args)
    assert r == {"return": {}}, f"{cmd} {args}: {r}"


def luks_node(name, img, secret=None, **extra):
    node = {"driver": "luks", "node-name": name, "file": {"driver": "file", "filename": str(img)}}
    if secret:
        node["key-secret"] = secret
    node.update(extra)
    return node


def test_wrong_password_refused_and_image_unchanged(tmp, vd):
    img = tmp / "w.luks"
    qemu_create_luks(img, "1M")
    before = sha256(img)
    with vd.client() as c:
        ok(c, "object-add", {"qom-type": "secret", "id": "bad", "data": "wrong"})
        assert c.error("blockdev-add", luks_node("n0", img, "bad")) == \
            "Invalid password, cannot unlock any keyslot"
        assert c.error("blockdev-add", luks_node("n1", img)) == \
            "Parameter 'key-secret' is required for cipher"
        assert c.error("blockdev-add", luks_node("n1", img, "nosuch")) == \
            "No secret with id 'nosuch'"
        # the right one, added over QMP, opens it; after object-del it is gone
        ok(c, "object-add", {"qom-type": "secret", "id": "good", "data": PW})
        ok(c, "blockdev-add", luks_node("n2", img, "good", **{"read-only": True}))
        ok(c, "object-del", {"id": "good"})
        assert c.error("blockdev-add", luks_node("n3", img, "good", **{"read-only": True})) == \
            "No secret with id 'good'"
        ok(c, "blockdev-del", {"node-name": "n2"})
    assert sha256(img) == before
    p = vdisk("create", "-f", "luks", "--object", "secret,id=s0,data=x", "-o", "key-secret=s9",
              tmp / "n.luks", "1M", check=False)
    assert_not_crashed(p)
    assert p.returncode == 1 and p.stderr.endswith("No secret with id 's9'\n"), p.stderr


def test_secret_object_forms(tmp, vd):
    """base64 and file secrets open the same image; bad objects get QEMU's messages."""
    import base64
    img = tmp / "f.luks"
    qemu_create_luks(img, "1M")
    pwfile = tmp / "pw"
    pwfile.write_text(PW)
    b64 = base64.b64encode(PW.encode()).decode()
    with vd.client() as c:
        ok(c, "object-add", {"qom-type": "secret", "id": "f", "file": str(pwfile)})
        ok(c, "object-add", {"qom-type": "secret", "id": "b", "data": b64, "format": "base64"})
        for i, sid in enumerate(("f", "b")):
            ok(c, "blockdev-add", luks_node(f"n{i}", img, sid, **{"read-only": True}))
        for args, msg in (({"id": "x"}, "Either 'file' or 'data' must be provided"),
                          ({"id": "x", "data": "a", "file": str(pwfile)},
                           "'data' and 'file' are mutually exclusive"),
                          ({"id": "f", "data": "a"},
                           "attempt to add duplicate property 'f' to object (type 'container')"),
                          ({"id": "x", "data": 5}, "Invalid parameter type for 'data', expected: string"),
                          ({"id": "x", "data": "a", "format": "hex"},
                           "Parameter 'format' does not accept value 'hex'")):
            assert c.error("object-add", {"qom-type": "secret", **args}) == msg
    p = vdisk("create", "-f", "luks", "--object", "secret,id=s0", "-o", "key-secret=s0",
              tmp / "n.luks", "1M", check=False)
    assert p.returncode == 1 and "Either 'file' or 'data' must be provided" in p.stderr
    assert not (tmp / "n.luks").exists()


def test_legacy_aes_refused(tmp):
    for opt in ("encryption=on", "encrypt.format=aes,encrypt.key-secret=s0"):
        img = tmp / "a.qcow2"
        p = vdisk("create", "-f", "qcow2", "--object", SECRET, "-o", opt, img, "1M", check=False)
        assert p.returncode == 1 and "Legacy AES-CBC" in p.stderr, p.stderr
        assert not img.exists()
    p = vdisk("create", "-f", "luks", tmp / "k.luks", "1M", check=False)
    assert p.returncode == 1
    assert p.stderr == f"vdisk: {tmp / 'k.luks'}: Parameter 'key-secret' is required for cipher\n"


# ---- qcow2 with encrypt.format=luks ----

def qcow2_opts(path, secret="s0"):
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={secret}"


def qemu_io_qcow2(path, *cmds, check=True):
    args = ["--object", SECRET, "--image-opts", qcow2_opts(path)]
    for c in cmds:
        args += ["-c", c]
    return qemu_io(*args, check=check)


def assert_pattern_reads(reader, checks):
    for cmd in checks:
        out = reader(cmd)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, \
            f"{cmd}: {out.stdout}{out.stderr}"


def test_qcow2_luks_written_by_qemu_served_by_vdiskd(tmp):
    img = tmp / "q.qcow2"
    qemu_create("-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                "encrypt.iter-time=10", img, "4M")
    qemu_io_qcow2(img, "write -P 0xa5 0 64k", "write -P 0x3c 1000k 100k", "write -z 2M 64k")
    d = serve(tmp, img, fmt="qcow2", writable=False)
    try:
        assert_pattern_reads(lambda c: nbd_io(d, c, check=False, read_only=True),
                             ("read -P 0xa5 0 64k", "read -P 0x3c 1000k 100k",
                              "read -P 0 2M 64k", "read -P 0 3M 1M", "read -P 0xa5 1000 3000"))
    finally:
        assert d.stop() == 0, d.output()
        d.kill()


def test_qcow2_luks_created_and_written_by_vdisk_read_by_qemu(tmp):
    img = tmp / "v.qcow2"
    p = vdisk("create", "-f", "qcow2", "--object", SECRET, "-o",
              "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", img, "4M")
    assert "encrypt.format=luks encrypt.key-secret=s0 encrypt.iter-time=10 cluster_size" in p.stdout
    d = serve(tmp, img, fmt="qcow2")
    try:
        # new clusters, partial clusters (copy-on-write of encrypted zeroes), unaligned writes
        nbd_io(d, "write -P 0x5a 0 64k", "write -P 0x77 100 1000", "write -P 0x42 200k 10k",
               "write -P 0x43 3M 1M", "write -P 0x44 3000k 333")
    finally:
        assert d.stop() == 0, d.output()
        d.kill()
    assert_pattern_reads(lambda c: qemu_io_qcow2(img, c, check=False),
                         ("read -P 0x5a 0 100", "read -P 0x77 100 1000", "read -P 0x5a 1100 64436",
                          "read -P 0 64k 136k", "read -P 0x42 200k 10k", "read -P 0 210k 46k",
                          "read -P 0x43 3M 1M", "read -P 0x44 3000k 333"))
    qemu_img("check", "--object", SECRET, "--image-opts", qcow2_opts(img))
    assert qemu_img("info", img).stdout == vdisk("info", img).stdout
    assert qemu_img("info", "--output=json", img).stdout == \
        vdisk("info", "--output=json", img).stdout
    # the guest's bytes are not in the file in clear
    assert b"\x43" * 4096 not in img.read_bytes()


def test_qcow2_luks_wrong_password_and_no_key(tmp, vd):
    img = tmp / "w.qcow2"
    qemu_create("-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                "encrypt.iter-time=10", img, "1M")
    before = sha256(img)
    node = {"driver": "qcow2", "node-name": "n0",
            "file": {"driver": "file", "filename": str(img)}}
    with vd.client() as c:
        ok(c, "object-add", {"qom-type": "secret", "id": "bad", "data": "nope"})
        assert c.error("blockdev-add", {**node, "encrypt": {"format": "luks",
                                                            "key-secret": "bad"}}) == \
            "Invalid password, cannot unlock any keyslot"
        assert c.error("blockdev-add", node) == \
            "Parameter 'encrypt.key-secret' is required for cipher"
        assert "not supported" in c.error("blockdev-add", {**node, "encrypt": {
            "format": "aes", "key-secret": "bad"}})
    assert sha256(img) == before
    p = vdisk("check", img, check=False)
    assert p.returncode == 1
    assert p.stderr == f"vdisk: Could not open '{img}': Parameter 'encrypt.key-secret' is " \
                       "required for cipher\n"
    assert sha256(img) == before


def test_convert_plain_to_encrypted_read_by_qemu(tmp):
    src = tmp / "plain.raw"
    with open(src, "wb") as f:
        f.truncate(2 << 20)
        f.write(os.urandom(300000))
    for fmt, opts, image_opts in (
            ("luks", "key-secret=s0,iter-time=10", luks_opts),
            ("qcow2", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", qcow2_opts)):
        dst = tmp / f"enc.{fmt}"
        vdisk("convert", "--object", SECRET, "-O", fmt, "-o", opts, src, dst)
        p = qemu_img("compare", "--object", SECRET, "--image-opts", image_opts(dst),
                     f"driver=raw,file.filename={src}", check=False)
        assert p.returncode == 0, p.stdout + p.stderr


def test_qcow2_luks_resize_preallocation_refused_plain_grow_reads_zeroes(tmp):
    """Preallocated clusters would hold plaintext zeroes that decrypt to noise: a resize with
    --preallocation is refused and leaves the file as it was; a plain grow reads zeroes."""
    img = tmp / "g.qcow2"
    qemu_create("-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,"
                "encrypt.iter-time=10", img, "1M")
    opts = f"driver=qcow2,file.filename={img},encrypt.key-secret=s0"
    qemu_io("--object", SECRET, "--image-opts", opts, "-c", "write -P 0x5a 0 1M")
    before = sha256(img)
    for mode in ("metadata", "falloc", "full"):
        p = vdisk("resize", "--object", SECRET, "--image-opts", f"--preallocation={mode}", opts,
                  "2M", check=False)
        assert p.returncode == 1, p.stdout + p.stderr
        assert "Preallocation of encrypted images is not supported" in p.stderr, p.stderr
        assert sha256(img) == before
    vdisk("resize", "--object", SECRET, "--image-opts", opts, "2M")
    assert json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"] == 2 << 20
    qemu_io("--object", SECRET, "--image-opts", opts, "-c", "read -P 0x5a 0 1M",
            "-c", "read -P 0 1M 1M")


def test_key_for_an_encrypted_backing_file_as_qemu(tmp):
    """backing.encrypt.key-secret (--image-opts, json:) unlocks the backing file the image names,
    two layers down too (backing.backing.*), as qemu-io takes it; without it the open fails."""
    sec = ["--object", "secret,id=s0,data=pw"]
    base, top, t2 = tmp / "base.qcow2", tmp / "top.qcow2", tmp / "t2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *sec, "-o",
             "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", base, "1M")
    qemu_io(*sec, "--image-opts", "-c", "write -P 7 0 64k",
            f"driver=qcow2,file.filename={base},encrypt.key-secret=s0")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_img("create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", t2)
    for spec in (f"driver=qcow2,file.filename={top},backing.encrypt.key-secret=s0",
                 f"driver=qcow2,file.filename={t2},backing.backing.encrypt.key-secret=s0"):
        for tool in (["qemu-io"], [VDISK, "io"]):
            out = run([*tool, *sec, "--image-opts", "-c", "read -P 7 0 64k", "-c",
                       "read -P 0 64k 64k", spec]).stdout
            assert "Pattern verification failed" not in out and out.count("read ") == 2, out
    js = ('json:{"driver":"qcow2","file":{"driver":"file","filename":"%s"},'
          '"backing":{"encrypt":{"key-secret":"s0"}}}' % top)
    vdisk("convert", *sec, "-O", "raw", js, tmp / "v.raw")
    qemu_img("convert", *sec, "-O", "raw", js, tmp / "q.raw")
    assert (tmp / "v.raw").read_bytes() == (tmp / "q.raw").read_bytes()
    p = vdisk("io", "-c", "read 0 512", top, check=False)
    assert p.returncode == 1 and "Parameter 'encrypt.key-secret' is required" in p.stderr
