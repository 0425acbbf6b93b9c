"""`vdisk bitmap` against `qemu-img bitmap` (7.2): the same actions on two copies of an image give
the same stored bitmaps (qemu-img info, flags and granularity) and the same dirty bits (read by
qemu-nbd + nbdinfo); errors give qemu-img's message and exit code and leave the file untouched.
Both directions: bitmaps vdisk writes are used by QEMU's commands and the reverse.
"""
import json

import pytest

import bitmap_helpers as B
from conftest import assert_qemu_check_clean, qemu_img, qemu_io_cmds, sha256, vdisk, vdisk_io

MiB = 1 << 20
SIZE = 32 * MiB


def dirty_image(tmp, name="img.qcow2"):
    """An image whose bitmaps QEMU created and dirtied: b0 (64k, written twice), b4k (disabled
    after its first write), and a second file other.qcow2 with bitmap 'ext'."""
    path = str(tmp / name)
    qemu_img("create", "-q", "-f", "qcow2", path, SIZE)
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "4k", path, "b4k")
    qemu_io_cmds(path, ["write -P 1 0 8k", f"write -P 2 {5 * MiB} 100k"])
    qemu_img("bitmap", "--disable", path, "b4k")
    qemu_io_cmds(path, [f"write -P 3 {20 * MiB} 4k"])
    other = str(tmp / "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", other, SIZE)
    qemu_img("bitmap", "--add", "-g", "128k", other, "ext")
    qemu_io_cmds(other, [f"write -P 4 {30 * MiB} 1k"])
    return path, other


def state(path):
    """Everything QEMU reports about the image's bitmaps: info's list and each one's dirty bits."""
    bitmaps = B.qemu_bitmaps(path)
    bits = {n: B.qemu_dirty_granules(path, n, g) for n, (g, _) in bitmaps.items()}
    return bitmaps, bits


# Each scenario: a list of invocations (argument lists after "bitmap"); {other} is the second file.
SCENARIOS = {
    "add-defaults": [["--add", "{img}", "new"]],
    "add-granularity-disabled": [["--add", "-g", "1M", "--disable", "{img}", "big"]],
    "clear-enable": [["--clear", "--enable", "{img}", "b4k"]],
    "remove": [["--remove", "{img}", "b0"]],
    "merge-same-file": [["--add", "-g", "512", "{img}", "m"], ["--merge", "b0", "{img}", "m"],
                        ["--merge", "b4k", "{img}", "m"]],
    "merge-other-file": [["--merge", "ext", "-b", "{other}", "-F", "qcow2", "{img}", "b0"]],
    "many-actions-in-order": [["--add", "--merge", "b4k", "--disable", "--clear", "--merge", "b0",
                               "{img}", "t"]],
    "add-then-remove": [["--add", "--remove", "{img}", "gone"]],
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_same_actions_same_bitmaps_as_qemu_img(tmp, name):
    """vdisk bitmap and qemu-img bitmap, given the same actions on copies of one image, leave the
    same bitmaps (names, granularities, flags, dirty bits) and both images check clean."""
    (tmp / "q").mkdir()
    (tmp / "v").mkdir()
    results = {}
    for tool, sub in (("qemu", "q"), ("vdisk", "v")):
        img, other = dirty_image(tmp / sub)
        for inv in SCENARIOS[name]:
            args = [a.format(img=img, other=other) for a in inv]
            if tool == "qemu":
                qemu_img("bitmap", *args)
            else:
                vdisk("bitmap", *args)
        assert_qemu_check_clean(img)
        results[tool] = state(img)
    assert results["vdisk"] == results["qemu"]


def test_vdisk_bitmap_added_then_tracks_qemu_and_vdisk_writes(tmp):
    """A bitmap `vdisk bitmap` adds is tracked by QEMU's writes and by vdisk's, and QEMU merges and
    removes it; vdisk info lists what qemu-img info lists at every step."""
    img = str(tmp / "a.qcow2")
    vdisk("create", "-q", "-f", "qcow2", img, SIZE)
    vdisk("bitmap", "--add", "-g", "8k", img, "vb")
    vdisk("bitmap", "--add", "--disable", img, "frozen")
    assert B.qemu_bitmaps(img) == {"vb": (8192, ["auto"]), "frozen": (65536, [])}
    qemu_io_cmds(img, ["write -P 7 0 10k"])
    vdisk_io(img, [f"write -P 8 {3 * MiB} 1k"])
    want = B.granules(0, 10240, 8192) | B.granules(3 * MiB, 1024, 8192)
    assert B.qemu_dirty_granules(img, "vb", 8192) == want
    assert B.qemu_dirty_granules(img, "frozen", 65536) == set()
    qemu_img("bitmap", "--merge", "vb", img, "frozen")
    assert B.qemu_dirty_granules(img, "frozen", 65536) == {0, 48}
    assert vdisk_info_bitmaps(img) == qemu_info_bitmaps(img)
    qemu_img("bitmap", "--remove", img, "vb")
    assert B.qemu_bitmaps(img) == {"frozen": (65536, [])}
    assert vdisk_info_bitmaps(img) == qemu_info_bitmaps(img)
    assert_qemu_check_clean(img)


def qemu_info_bitmaps(path):
    return json.loads(qemu_img("info", "-U", "--output=json", path).stdout)[
        "format-specific"]["data"].get("bitmaps")


def vdisk_info_bitmaps(path):
    return json.loads(vdisk("info", "-U", "--output=json", path).stdout)[
        "format-specific"]["data"].get("bitmaps")


def test_info_text_lists_bitmaps_as_qemu_img(tmp):
    """vdisk info's human output of an image with bitmaps (flags auto and none) equals qemu-img
    info's, line for line."""
    img, _ = dirty_image(tmp)
    q = qemu_img("info", "-U", img).stdout
    v = vdisk("info", "-U", img).stdout
    assert "bitmaps:" in q
    assert v == q


# (arguments, whether qemu-img's message equals vdisk's word for word, whether the image is opened)
BAD = [
    ([], True, False),
    (["--add"], True, False),
    (["--add", "{img}"], True, False),
    (["-g", "4k", "--remove", "{img}", "b0"], True, False),
    (["-F", "qcow2", "--add", "{img}", "z"], True, False),
    (["-b", "{other}", "--add", "{img}", "z"], True, False),
    (["--add", "-g", "xx", "{img}", "z"], False, False),  # qemu splits it on two lines
    (["--frobnicate", "{img}", "z"], True, False),
    (["--merge", "ext", "-b", "{missing}", "{img}", "b0"], False, True),  # qemu repeats "Could not open"
    (["--add", "-g", "1000", "{img}", "z"], True, True),
    (["--add", "-g", "4G", "{img}", "z"], True, True),
    (["--add", "{img}", "b0"], True, True),
    (["--add", "{img}", ""], True, True),
    (["--remove", "{img}", "nope"], True, True),
    (["--clear", "{img}", "nope"], True, True),
    (["--merge", "nope", "{img}", "b0"], True, True),
    (["--merge", "nope", "-b", "{other}", "{img}", "b0"], True, True),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_errors_as_qemu_img_and_bitmaps_unchanged(tmp, case):
    """Bad invocations fail with exit 1 (qemu-img's) and qemu-img's message. Refused before the
    image is opened, the file keeps every byte; refused by an action, the bitmaps stay exactly as
    they were (opening read-write re-stores them, as qemu-img's open does: same names, flags,
    bits, a clean check - not the same bytes)."""
    args, same_text, opened = BAD[case]
    img, other = dirty_image(tmp)
    names = dict(img=img, other=other, missing=str(tmp / "missing.qcow2"))
    args = [a.format(**names) for a in args]
    before, before_state = sha256(img), state(img)
    q = qemu_img("bitmap", *args, check=False)
    assert state(img) == before_state
    v = vdisk("bitmap", *args, check=False)
    assert (v.returncode, q.returncode) == (1, 1)
    assert v.stdout == ""
    assert state(img) == before_state
    assert_qemu_check_clean(img)
    if not opened:
        assert sha256(img) == before, "vdisk bitmap changed an image it should not have opened"
    qmsg = q.stderr.splitlines()[0].removeprefix("qemu-img: ")
    vmsg = v.stderr.splitlines()[0].removeprefix("vdisk: ")
    if same_text:
        assert vmsg == qmsg
    else:
        assert vmsg.split(" ")[:3] == qmsg.split(" ")[:3]


def test_failing_action_keeps_the_earlier_ones(tmp):
    """As qemu-img: actions run in order and stop at the first failure; what ran before stays."""
    results = []
    for sub in ("q", "v"):
        (tmp / sub).mkdir()
        img, _ = dirty_image(tmp / sub)
        tool = qemu_img if sub == "q" else vdisk
        p = tool("bitmap", "--add", "--merge", "nope", "--disable", img, "n1", check=False)
        assert p.returncode == 1
        assert_qemu_check_clean(img)
        results.append(state(img))
    assert results[0] == results[1]
    assert results[1][0]["n1"] == (65536, ["auto"])  # added, not disabled


def test_raw_image_refused(tmp):
    """A raw image cannot hold bitmaps: refused as qemu-img refuses it, the file unchanged."""
    raw = tmp / "r.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    before = sha256(raw)
    v = vdisk("bitmap", "-f", "raw", "--add", raw, "x", check=False)
    assert v.returncode == 1
    assert "Can't store persistent bitmaps to" in v.stderr
    assert sha256(raw) == before


def test_merge_source_file_opened_read_only(tmp):
    """-b FILE is only read: its bytes stay the same, its bitmap stays as it was."""
    img, other = dirty_image(tmp)
    before = sha256(other)
    vdisk("bitmap", "--merge", "ext", "-b", other, img, "b0")
    assert sha256(other) == before
    assert B.qemu_dirty_granules(img, "b0", 65536) >= {30 * MiB // 65536}
