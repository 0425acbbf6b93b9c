"""Damaged and hostile images (corpus.py) against every read-side vdisk command.

For each damaged image and each of info, map, check, convert -O raw, compare and
io -c 'read 0 64k', run vdisk and the QEMU equivalent (on a copy) with a timeout, and require:
  - vdisk fails (non-zero exit) wherever QEMU fails;
  - where QEMU succeeds: `check` must succeed too with the same verdict (check's job is to
    diagnose damage: 0 = clean, 2/3 = problems found, and it is what `-r` repairs with); the other
    commands may succeed with QEMU's verdict (compare: same/different) or refuse cleanly -- being
    stricter than QEMU about a damaged image is allowed (info on a truncated image, say), reading
    it differently is not;
  - backing loops (where QEMU 7.2 itself recurses for minutes) must fail, except plain `info`;
  - a failure gives exactly one error line on stderr (io: or one "... failed" line on stdout,
    like qemu-io), never a signal, a sanitizer report or a hang;
  - when both convert, the raw outputs are identical;
  - no file of the image's chain changes (sha256) unless QEMU's same command changed it too.
"""
import json
import os
import shutil
import subprocess

import pytest

from conftest import VDISK, sha256
import corpus

TIMEOUT = 30
KiB = 1024


def _cmds(img, out, ref):
    """(name, vdisk argv, qemu argv) for one image; out = convert target, ref = raw to compare."""
    return {
        "info": ([VDISK, "info", "-f", "qcow2", img], ["qemu-img", "info", "-f", "qcow2", img]),
        # no -f: the format is probed (a damaged magic makes it raw, for both tools)
        "info-probe": ([VDISK, "info", "--output=json", img],
                       ["qemu-img", "info", "--output=json", img]),
        "map": ([VDISK, "map", "--output=json", "-f", "qcow2", img],
                ["qemu-img", "map", "--output=json", "-f", "qcow2", img]),
        "check": ([VDISK, "check", "-f", "qcow2", img], ["qemu-img", "check", "-f", "qcow2", img]),
        "convert": ([VDISK, "convert", "-f", "qcow2", "-O", "raw", img, out],
                    ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, out]),
        "compare": ([VDISK, "compare", "-f", "qcow2", "-F", "raw", img, ref],
                    ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref]),
        "io": ([VDISK, "io", "-f", "qcow2", "-c", "read 0 64k", img],
               ["qemu-io", "-f", "qcow2", "-c", "read 0 64k", img]),
    }


# QEMU 7.2 recurses through these chains for minutes; the expected outcome is hard-coded.
QEMU_HANGS = {"backing-loop", "backing-self"}
COMMANDS = ["info", "info-probe", "map", "check", "convert", "compare", "io"]


def outcome(cmd, rc):
    """Classify an exit code: 'ok', 'problems' (check found some / compare found a difference),
    or 'error'."""
    if rc == 0:
        return "ok"
    if cmd == "check" and rc in (2, 3):
        return "problems"
    if cmd == "compare" and rc == 1:
        return "problems"
    return "error"


@pytest.fixture(scope="module")
def corp(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    c = corpus.build_corpus(d / "src")
    # reference raw for compare: the good image's content
    ref = d / "good.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", d / "src" / "good.qcow2", ref],
                   check=True)
    return d, c, ref


def _copy_case(case, dest):
    """Copy a case's chain into dest (same names: relative backing names keep working)."""
    dest.mkdir()
    for f in case.files:
        shutil.copyfile(f, dest / f.name)
    # the loop cases and missing backing rely on names in the same directory only
    return dest / case.path.name


def _run(argv, timeout=TIMEOUT):
    try:
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: {' '.join(map(str, argv))} did not finish in {timeout} s")


def _case_names():
    # The names are fixed by corpus.build_corpus; building it once at collection is cheap (~1 s).
    import pathlib
    import tempfile
    with tempfile.TemporaryDirectory() as t:
        return sorted(corpus.build_corpus(pathlib.Path(t) / "c").keys())


CASE_NAMES = _case_names()


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(corp, tmp, name, cmd):
    d, c, ref = corp
    case = c[name]
    q_img = _copy_case(case, tmp / "q")
    v_img = _copy_case(case, tmp / "v")
    before = {f.name: sha256(tmp / "v" / f.name) for f in case.files}
    v_argv, _ = _cmds(v_img, tmp / "v.raw", ref)[cmd]
    _, q_argv = _cmds(q_img, tmp / "q.raw", ref)[cmd]

    if name in QEMU_HANGS:
        q = subprocess.CompletedProcess(q_argv, 0 if cmd.startswith("info") else 1,
                                        '{"format": "qcow2"}', "")
    else:
        q = _run(q_argv, timeout=120)
    v = _run(v_argv)
    ctx = f"[{name}: {case.what}] vdisk {cmd}: exit {v.returncode}\nstdout: {v.stdout[-1500:]}\n" \
          f"stderr: {v.stderr[-1500:]}\nqemu: exit {q.returncode}: {(q.stderr or q.stdout)[-500:]}"

    assert v.returncode >= 0, f"killed by signal {-v.returncode}; {ctx}"
    assert "Sanitizer" not in v.stderr and "runtime error:" not in v.stderr, ctx
    qo, vo = outcome(cmd, q.returncode), outcome(cmd, v.returncode)
    if qo == "error" or cmd == "check":
        assert vo == qo, f"qemu: {qo}, vdisk: {vo}; {ctx}"
    else:
        assert vo in (qo, "error"), f"qemu: {qo}, vdisk: {vo}; {ctx}"
    if vo == "error":
        err = [l for l in v.stderr.splitlines() if l.strip()]
        out_fail = [l for l in v.stdout.splitlines() if "failed" in l]
        if cmd == "io" and not err:
            assert len(out_fail) == 1, f"io failed without exactly one '... failed' line; {ctx}"
        else:
            assert len(err) == 1, f"want exactly one error line on stderr, got {len(err)}; {ctx}"
    if cmd == "info-probe" and vo == "ok" and qo == "ok":
        assert json.loads(v.stdout)["format"] == json.loads(q.stdout)["format"], \
            f"probed a different format; {ctx}"
    if cmd == "convert" and vo == "ok":
        with open(tmp / "q.raw", "rb") as a, open(tmp / "v.raw", "rb") as b:
            assert a.read() == b.read(), f"convert output differs from qemu-img's; {ctx}"

    q_changed = {f.name for f in case.files if sha256(tmp / "q" / f.name) != sha256(f)}
    for f in case.files:
        if f.name not in q_changed:
            assert sha256(tmp / "v" / f.name) == before[f.name], \
                f"vdisk {cmd} modified {f.name} (qemu did not); {ctx}"


# ---- repairable damage: vdisk check -r must do what qemu-img check -r does ----

def _refcount_entry(path, cluster_index):
    rt = corpus.get(path, "refcount_table_offset")
    rb = corpus.peek_u64(path, rt)
    return rb + 2 * cluster_index   # refcount_bits 16 (qemu-img's default)


def _make_repairable(d, kind):
    good = d / "good.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", good, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 200k", "-c",
                    "write -P 0x6b 1M 64k", good], check=True, capture_output=True)
    l2 = corpus.first_l2(good)
    data0 = corpus.peek_u64(good, l2) & corpus.L2_OFFSET_MASK
    size = os.path.getsize(good)
    if kind == "leak-extra-cluster":      # a cluster with refcount 1 that nothing uses
        with open(good, "ab") as f:
            f.write(bytes(65536 - size % 65536 if size % 65536 else 0) + bytes(65536))
        idx = os.path.getsize(good) // 65536 - 1
        corpus.poke(good, _refcount_entry(good, idx), (1).to_bytes(2, "big"))
    elif kind == "leak-refcount-too-high":
        corpus.poke(good, _refcount_entry(good, data0 // 65536), (2).to_bytes(2, "big"))
    elif kind == "corrupt-refcount-zero":  # a used cluster with refcount 0
        corpus.poke(good, _refcount_entry(good, data0 // 65536), (0).to_bytes(2, "big"))
    return good


@pytest.mark.parametrize("kind,mode", [("leak-extra-cluster", "leaks"),
                                       ("leak-refcount-too-high", "leaks"),
                                       ("corrupt-refcount-zero", "all")])
def test_check_repair_like_qemu(tmp, kind, mode):
    src = _make_repairable(tmp, kind)
    content = tmp / "content.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", src, content], check=True)
    q, v = tmp / "q.qcow2", tmp / "v.qcow2"
    shutil.copyfile(src, q)
    shutil.copyfile(src, v)
    qc = _run(["qemu-img", "check", "-f", "qcow2", q])
    vc = _run([VDISK, "check", "-f", "qcow2", v])
    assert vc.returncode == qc.returncode, \
        f"vdisk check exit {vc.returncode}, qemu-img {qc.returncode}\n{vc.stdout}{vc.stderr}\nqemu:\n{qc.stdout}"
    assert sha256(v) == sha256(src), "check without -r modified the image"
    qr = _run(["qemu-img", "check", "-r", mode, "-f", "qcow2", q])
    vr = _run([VDISK, "check", "-r", mode, "-f", "qcow2", v])
    assert vr.returncode == qr.returncode == 0, \
        f"repair: vdisk exit {vr.returncode}, qemu-img {qr.returncode}\n{vr.stdout}{vr.stderr}"
    after = _run(["qemu-img", "check", "-f", "qcow2", v])
    assert after.returncode == 0, f"still not clean after vdisk check -r {mode}:\n{after.stdout}"
    cmp = _run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", v, content])
    assert cmp.returncode == 0, f"repair changed the guest content: {cmp.stdout}"


# ---- the daemon: blockdev-add of a damaged image, read-write, changes nothing QSD leaves ----

def test_daemon_blockdev_add_of_damaged_images_changes_no_file(corp, tmp):
    """Every damaged image is opened read-write with blockdev-add (then blockdev-del) by vdiskd
    and, on a copy, by qemu-storage-daemon: vdiskd answers (error or success, never a crash or
    hang) and leaves every file of the chain as it was (sha256) unless QSD changed it too."""
    from qmp_client import start_qsd, start_vdiskd
    d, c, ref = corp
    (tmp / "vd").mkdir()
    (tmp / "qsd").mkdir()
    vd, qsd = start_vdiskd(str(tmp / "vd")), start_qsd(str(tmp / "qsd"))
    modified = []
    try:
        v, q = vd.client(), qsd.client()
        for i, name in enumerate(CASE_NAMES):
            case = c[name]
            imgs = {"v": _copy_case(case, tmp / f"v{i}"), "q": _copy_case(case, tmp / f"q{i}")}
            before = {f.name: sha256(f) for f in case.files}
            # (QSD recurses for minutes on a backing loop: vdiskd alone there, nothing may change)
            for who, client in (("v", v),) + ((("q", q),) if name not in QEMU_HANGS else ()):
                opts = {"driver": "qcow2", "node-name": f"n{i}", "file": {
                    "driver": "file", "filename": str(imgs[who])}}
                if "error" not in client.execute("blockdev-add", opts):
                    client.cmd("blockdev-del", node_name=f"n{i}")
            for f in case.files:
                q_same = sha256(tmp / f"q{i}" / f.name) == before[f.name]
                if q_same and sha256(tmp / f"v{i}" / f.name) != before[f.name]:
                    modified.append(f"{name}: {f.name} ({case.what})")
        assert v.cmd("query-named-block-nodes") == []
        v.close()
        q.close()
    finally:
        qsd.kill()
        vd.stop_checked()
    assert not modified, "vdiskd modified files QSD left alone:\n" + "\n".join(modified)
