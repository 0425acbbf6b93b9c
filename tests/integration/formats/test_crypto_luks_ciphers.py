"""Every LUKS cipher, mode, IV generator and hash qemu-img 7.2 creates, against QEMU both ways:
qemu-img makes the image and qemu-io writes it, vdisk reads it; vdisk makes and writes one,
qemu-io reads it; `info` matches qemu-img's. What qemu-img refuses, vdisk refuses with the same
text, exit code and (no) file. 192-bit keys outside xts (qemu-img 7.2 aborts on them) are checked
against cryptsetup and openssl instead. iter-time=10 keeps PBKDF2 short."""
import json
import re
import subprocess

import pytest

from conftest import assert_not_crashed, qemu_img, qemu_io, run, vdisk
from test_crypto_luks import PW, SECRET, luks_opts, qemu_create

# cipher-alg, cipher-mode, ivgen-alg[:ivgen-hash-alg], hash-alg: each family, mode, IV generator
# and hash at least once, the AES-192-XTS that GnuTLS lacks, and an IV hash kept with plain
COMBOS = [
    ("aes-192", "xts", "plain64", "sha256"),
    ("aes-192", "xts", "essiv", "sha256"),
    ("aes-128", "ecb", "plain64", "md5"),
    ("aes-256", "ctr", "plain:sha1", "sha512"),
    ("serpent-192", "xts", "plain64", "ripemd160"),
    ("serpent-128", "ctr", "essiv", "sha224"),
    ("serpent-256", "cbc", "plain", "sha384"),
    ("twofish-256", "xts", "essiv", "sha1"),
    ("twofish-128", "cbc", "essiv:md5", "sha256"),
    ("twofish-192", "xts", "plain", "sha256"),
    ("cast5-128", "cbc", "essiv:md5", "sha256"),
    ("cast5-128", "ecb", "plain64", "sha256"),
    ("cast5-128", "ctr", "plain", "sha256"),
]

# guest writes at sector-unaligned-to-cluster offsets, across sector boundaries
WRITES = [(0x5a, 0, 4096), (0xa5, 7680, 1024), (0x3c, 65536 + 512, 12288), (0x11, 1048576 - 512, 512)]


def opts(combo, prefix=""):
    alg, mode, ivgen, hash_alg = combo
    o = [f"cipher-alg={alg}", f"cipher-mode={mode}", f"hash-alg={hash_alg}"]
    ivalg, _, ivhash = ivgen.partition(":")
    o.append(f"ivgen-alg={ivalg}")
    if ivhash:
        o.append(f"ivgen-hash-alg={ivhash}")
    return ",".join(f"{prefix}{x}" for x in o)


def image_opts(img, fmt):
    if fmt == "luks":
        return luks_opts(img)
    return f"driver=qcow2,file.filename={img},encrypt.key-secret=s0"


def write_cmds():
    return [f"write -P {p:#x} {o} {n}" for p, o, n in WRITES]


def read_cmds():
    return [f"read -P {p:#x} {o} {n}" for p, o, n in WRITES]


def c_args(cmds):
    return [a for c in cmds for a in ("-c", c)]


def assert_qemu_reads(img, fmt):
    p = qemu_io("--object", SECRET, "--image-opts", image_opts(img, fmt), *c_args(read_cmds()))
    assert "Pattern verification failed" not in p.stdout and p.stderr == "", p.stdout + p.stderr


def assert_vdisk_reads(img, fmt):
    p = vdisk("io", "--object", SECRET, "--image-opts", image_opts(img, fmt), *c_args(read_cmds()),
              check=False)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr


def assert_same_info(img):
    ours = vdisk("info", "--output=json", img).stdout
    theirs = qemu_img("info", "--output=json", img).stdout
    assert json.loads(ours) == json.loads(theirs)
    assert ours == theirs


def header_mode(img):
    with open(img, "rb") as f:
        h = f.read(104)
    return h[8:40].rstrip(b"\0").decode(), h[40:72].rstrip(b"\0").decode()


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c).replace(":", "_"))
def test_cipher_both_ways_with_qemu(tmp, combo):
    theirs, ours = tmp / "q.luks", tmp / "v.luks"
    qemu_create("-f", "luks", "-o", f"key-secret=s0,iter-time=10,{opts(combo)}", theirs, "1M")
    qemu_io("--object", SECRET, "--image-opts", luks_opts(theirs), *c_args(write_cmds()))
    assert_vdisk_reads(theirs, "luks")
    assert_same_info(theirs)

    vdisk("create", "-q", "-f", "luks", "--object", SECRET, "-o",
          f"key-secret=s0,iter-time=10,{opts(combo)}", ours, "1M")
    assert header_mode(ours) == header_mode(theirs)
    vdisk("io", "--object", SECRET, "--image-opts", luks_opts(ours), *c_args(write_cmds()))
    assert_qemu_reads(ours, "luks")
    assert_same_info(ours)
    # a wrong password opens neither
    p = vdisk("io", "--object", "secret,id=s0,data=nope", "--image-opts", luks_opts(theirs),
              "-c", "read 0 512", check=False)
    assert p.returncode == 1 and "Invalid password, cannot unlock any keyslot" in p.stderr


def test_qcow2_aes_192_xts_both_ways(tmp):
    combo = ("aes-192", "xts", "plain64", "sha256")
    theirs, ours = tmp / "q.qcow2", tmp / "v.qcow2"
    enc = f"encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,{opts(combo, 'encrypt.')}"
    qemu_create("-f", "qcow2", "-o", enc, theirs, "1M")
    qemu_io("--object", SECRET, "--image-opts", image_opts(theirs, "qcow2"), *c_args(write_cmds()))
    assert_vdisk_reads(theirs, "qcow2")
    vdisk("create", "-q", "-f", "qcow2", "--object", SECRET, "-o", enc, ours, "1M")
    vdisk("io", "--object", SECRET, "--image-opts", image_opts(ours, "qcow2"), *c_args(write_cmds()))
    assert_qemu_reads(ours, "qcow2")
    for img in (theirs, ours):
        info = json.loads(vdisk("info", "--output=json", img).stdout)
        assert info == json.loads(qemu_img("info", "--output=json", img).stdout)
        assert info["format-specific"]["data"]["encrypt"]["cipher-alg"] == "aes-192"
        p = qemu_img("check", "--object", SECRET, "--image-opts", image_opts(img, "qcow2"))
        assert "No errors were found" in p.stdout


REFUSED = [
    "cipher-alg=cast5-128,cipher-mode=xts",
    "cipher-alg=des",
    "cipher-alg=3des",
    "cipher-alg=sm4",
    "cipher-mode=gcm",
    "ivgen-alg=benbi",
    "ivgen-hash-alg=sha3",
    "hash-alg=whirlpool",
    "ivgen-alg=essiv,ivgen-hash-alg=sha1",
    "cipher-alg=aes-128,ivgen-alg=essiv,ivgen-hash-alg=sha512",
    "cipher-alg=serpent-256,ivgen-alg=essiv,ivgen-hash-alg=sha384",
    "cipher-alg=twofish-128,ivgen-alg=essiv,ivgen-hash-alg=ripemd160",
    "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv",
    "iter-time=abc",
]


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_refused_as_qemu_img(tmp, fmt):
    for o in REFUSED:
        prefix = "encrypt." if fmt == "qcow2" else ""
        o = ",".join(prefix + x for x in o.split(","))
        base = "encrypt.format=luks,encrypt.key-secret=s0" if fmt == "qcow2" else "key-secret=s0"
        got = []
        for tool, name in ((qemu_img, "theirs"), (vdisk, "ours")):
            img = tmp / f"{name}.img"
            p = tool("create", "-q", "-f", fmt, "--object", SECRET, "-o", f"{base},{o}", img, "1M",
                     check=False)
            assert_not_crashed(p)
            got.append((p.returncode, re.sub(r"^\S+: \S+: ", "", p.stderr), img.exists()))
        assert got[1] == got[0], f"{o}: qemu-img {got[0]}, vdisk {got[1]}"
        assert got[0][0] == 1


def patch(img, off, text, width=32):
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(text.encode().ljust(width, b"\0"))


@pytest.mark.parametrize("field,value", [
    (40, "xts"), (40, "gcm-plain64"), (40, "cbc-essiv"), (40, "cbc-benbi"), (40, "cbc-essiv:sha3"),
    (40, "cbc-essiv:sha1"), (40, "cbc-essiv:sha384"), (40, "xts-plain64"), (8, "des"),
    (8, "cast5"), (8, "serpent"), (72, "whirlpool"),
])
def test_unsupported_header_refused_as_qemu(tmp, field, value):
    """A header naming what QEMU cannot run: the same message from info and from an open (and
    where it names another valid cipher, both open it and find the password wrong)."""
    img = tmp / "h.luks"
    vdisk("create", "-q", "-f", "luks", "--object", SECRET, "-o",
          "key-secret=s0,iter-time=10,cipher-mode=cbc", img, "1M")  # a 32-byte key
    patch(img, field, value)
    before = img.read_bytes()
    for args in (("info", img), ("io", "--object", SECRET, "--image-opts", luks_opts(img),
                                 "-c", "read 0 512")):
        theirs = (qemu_img if args[0] == "info" else qemu_io)(*args[1:] if args[0] == "io"
                                                              else args, check=False)
        ours = vdisk(*args, check=False)
        assert_not_crashed(ours)
        failed = theirs.returncode != 0 or "Pattern verification" in theirs.stdout
        msg = theirs.stderr.strip().split(": ")[-1]
        assert (ours.returncode != 0) == failed and ours.stderr.strip().endswith(msg), \
            f"{args[0]}: qemu {theirs.stderr!r}, vdisk {ours.stderr!r}"
    assert img.read_bytes() == before


def cryptsetup_master_key(img, tmp):
    pw = tmp / "pw"
    pw.write_text(PW)
    out = run(["cryptsetup", "luksDump", "--dump-master-key", "-q", "--key-file", str(pw),
               str(img)]).stdout
    dump = out[out.index("MK dump:") + len("MK dump:"):]
    key = "".join(re.findall(r"\b[0-9a-f]{2}\b", dump))
    payload = int(re.search(r"Payload offset:\s*(\d+)", out).group(1)) * 512
    return key, payload


def openssl_decrypt(img, key, payload, sector):
    with open(img, "rb") as f:
        f.seek(payload + sector * 512)
        ct = f.read(512)
    iv = sector.to_bytes(16, "little").hex()  # plain64
    p = subprocess.run(["openssl", "enc", "-d", "-aes-192-cbc", "-nopad", "-K", key, "-iv", iv],
                       input=ct, capture_output=True, check=True)
    return p.stdout


def test_aes_192_cbc_against_cryptsetup_and_openssl(tmp):
    """192-bit keys outside xts: qemu-img 7.2 aborts making them (its key material is not whole
    sectors); cryptsetup makes them. Both ways against cryptsetup, the data against openssl."""
    theirs, ours = tmp / "cs.luks", tmp / "v.luks"
    with open(theirs, "wb") as f:
        f.truncate(4 << 20)
    run(["cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode", "--pbkdf-force-iterations",
         "1000", "-c", "aes-cbc-plain64", "-s", "192", "--key-file", "-", str(theirs)], input=PW)
    vdisk("create", "-q", "-f", "luks", "--object", SECRET, "-o",
          "key-secret=s0,iter-time=10,cipher-alg=aes-192,cipher-mode=cbc", ours, "1M")
    run(["cryptsetup", "luksOpen", "--test-passphrase", "--key-file", "-", str(ours)], input=PW)
    for img in (theirs, ours):
        vdisk("io", "--object", SECRET, "--image-opts", luks_opts(img), *c_args(write_cmds()))
        assert_vdisk_reads(img, "luks")
        key, payload = cryptsetup_master_key(img, tmp)
        assert len(key) == 48
        for pat, off, n in WRITES:
            for s in range(off // 512, (off + n) // 512):
                assert openssl_decrypt(img, key, payload, s) == bytes([pat]) * 512, (img, s)


@pytest.mark.parametrize("key_bytes", [33, 65, 0, 66])
def test_header_key_size_refused_as_qemu(tmp, key_bytes):
    """The header's key size is untrusted: an odd one for xts (65 would pass as two 32-byte AES
    keys and overrun every 64-byte key buffer) or one no cipher has is refused as QEMU refuses
    it, before any password is tried. The key slots are moved apart so that the size passes the
    slots' overlap check and reaches the cipher's."""
    img = tmp / "k.luks"
    qemu_img("create", "-q", "-f", "luks", "--object", SECRET, "-o", "key-secret=s0,iter-time=10",
             img, "1M")  # aes-256-xts: 64 key bytes, slots 504 sectors apart
    with open(img, "r+b") as f:
        f.seek(108)
        f.write(key_bytes.to_bytes(4, "big"))
        f.seek(104)
        f.write((8 + 8 * 528).to_bytes(4, "big"))  # payload offset, after 8 slots of 528 sectors
        for i in range(8):
            f.seek(208 + 48 * i + 40)
            f.write((8 + 528 * i).to_bytes(4, "big"))
    before = img.read_bytes()
    args = ("--object", SECRET, "--image-opts", luks_opts(img), "-c", "read 0 512")
    theirs = qemu_io(*args, check=False)
    ours = vdisk("io", *args, check=False)
    assert_not_crashed(ours)
    assert theirs.returncode != 0 and ours.returncode != 0
    msg = theirs.stderr.strip().split(": ")[-1]
    assert ours.stderr.strip().endswith(msg), f"qemu {theirs.stderr!r}, vdisk {ours.stderr!r}"
    assert img.read_bytes() == before
